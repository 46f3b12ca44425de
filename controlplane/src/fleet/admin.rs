//! The admin endpoint's fleet routes (served on its HTTP thread, behind its token rule):
//!
//! - `GET /fleet`: the live nodes, `{"node":ID,"fleet":bool,"redis":"up"|"down"|"off",
//!   "nodes":[NodeInfo...]}` (this node alone without `fleet-redis`).
//! - `GET /sessions?fleet=1`: every node's sessions,
//!   `{"sessions":[{"node":ID,...session}],"nodes":{ID:N},"missing":N}`.
//! - `DELETE /users/NAME/sessions` with a fleet: ends the user's allocations on every node,
//!   `{"user":NAME,"revoked":TOTAL,"nodes":{ID:N},"missing":N}`; when Redis is unreachable, on
//!   this node only, with `"fleet_error"` saying why.
//! - `POST /ice-servers`: see [`super::ice`].

use std::thread::Thread;

use crossbeam_channel::Sender;
use hyper::http::Method;

use super::broadcast::{broadcast, Gathered};
use super::FleetShared;
use crate::admin_api::{ask, AdminAction, AdminRequest};
use crate::http_endpoint::Request;

/// Answers `request` when it is a fleet route; `None` for the admin endpoint's own routes.
/// `user` is the decoded NAME of a `DELETE /users/NAME/sessions`.
pub fn route(
    fleet: &FleetShared,
    request: &Request,
    user: Option<&str>,
    tx: &Sender<AdminRequest>,
    control: &Thread,
) -> Option<(u16, String)> {
    let path = request.path.as_str();
    let query = request.query.as_str();
    let fleet_wide = query.split('&').any(|p| p == "fleet=1" || p == "fleet=true");
    if request.method == Method::GET && path == "/fleet" {
        let redis = match (fleet.in_fleet(), fleet.connected.load(std::sync::atomic::Ordering::Relaxed)) {
            (false, _) => "off",
            (true, true) => "up",
            (true, false) => "down",
        };
        let v = serde_json::json!({
            "node": fleet.node_id,
            "fleet": fleet.in_fleet(),
            "redis": redis,
            "nodes": fleet.live_nodes(),
        });
        return Some((200, v.to_string()));
    }
    if request.method == Method::POST && path == "/ice-servers" {
        return Some(super::ice::answer(fleet, &request.body, crate::credentials::unix_now()));
    }
    let url = fleet.redis_url.as_deref()?;
    if request.method == Method::GET && path == "/sessions" && fleet_wide {
        return Some(match broadcast(url, "sessions", None) {
            Ok(g) => sessions(&g),
            Err(e) => (503, serde_json::json!({ "error": format!("fleet: Redis unreachable: {e}") }).to_string()),
        });
    }
    if let (true, Some(user)) = (request.method == Method::DELETE, user) {
        return Some(match broadcast(url, "revoke", Some(user)) {
            Ok(g) if !g.answers.is_empty() => revoked(user, &g),
            Ok(_) | Err(_) => {
                // Redis is down (or no subscriber, this one included, is up): this node alone.
                let (status, body) = ask(tx, control, AdminAction::Revoke(user.to_owned()));
                let mut v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    let n = o.get("revoked").cloned().unwrap_or_default();
                    o.insert("nodes".into(), serde_json::json!({ fleet.node_id.clone(): n }));
                    o.insert("fleet_error".into(), "Redis unreachable: ended on this node only".into());
                }
                (status, v.to_string())
            }
        });
    }
    None
}

fn revoked(user: &str, g: &Gathered) -> (u16, String) {
    let mut nodes = serde_json::Map::new();
    let mut total = 0;
    for a in &g.answers {
        let n = a.body.get("revoked").and_then(serde_json::Value::as_u64).unwrap_or(0);
        total += n;
        nodes.insert(a.node.clone(), n.into());
    }
    let v = serde_json::json!({ "user": user, "revoked": total, "nodes": nodes, "missing": g.missing });
    (200, v.to_string())
}

fn sessions(g: &Gathered) -> (u16, String) {
    let mut nodes = serde_json::Map::new();
    let mut all = Vec::new();
    for a in &g.answers {
        let list = a.body.as_array().cloned().unwrap_or_default();
        nodes.insert(a.node.clone(), list.len().into());
        for mut s in list {
            if let Some(o) = s.as_object_mut() {
                o.insert("node".into(), a.node.clone().into());
            }
            all.push(s);
        }
    }
    let v = serde_json::json!({ "sessions": all, "nodes": nodes, "missing": g.missing });
    (200, v.to_string())
}
