//! `POST /ice-servers`: the RTCConfiguration a WebRTC application hands to
//! `new RTCPeerConnection(...)` as is, with fresh TURN REST credentials
//! (docs/credentials.md) and the URLs of the fleet's healthy nodes.
//!
//! Request body (JSON): `user` (required, the REST user id), `ttl` (seconds, required, at
//! least 1; more than `ice-servers-max-ttl` is cut to it), `transports` (optional: any of
//! `udp`, `tcp`, `tls`; default all), `region` (optional: only nodes of that region).
//!
//! Answer 200:
//! `{"iceServers":[{"urls":[...],"username":"<expiry>:<user>","credential":"<base64>"}],
//!   "ttl":N,"expires":UNIX,"nodes":["<node-id>",...]}`. `urls` are RFC 7065 URLs of every live
//! node that takes allocations (ready, within budget; all live ready nodes when none is
//! within budget), this node's alone without a fleet. Errors: 400 (bad body), 409 (no
//! `static-auth-secret`), 503 (no node matches).

use std::time::Duration;

use serde::Deserialize;

use super::{FleetShared, NodeInfo};
use crate::credentials::rest;

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceRequest {
    /// The REST user id.
    pub user: String,
    /// Seconds the credential lives.
    pub ttl: u64,
    /// `udp`, `tcp`, `tls`; absent: all.
    #[serde(default)]
    pub transports: Option<Vec<String>>,
    /// Only nodes of this region.
    #[serde(default)]
    pub region: Option<String>,
}

/// Answers a `POST /ice-servers` body: status and JSON.
pub fn answer(fleet: &FleetShared, body: &[u8], now_unix: u64) -> (u16, String) {
    let err = |status: u16, msg: &str| (status, serde_json::json!({ "error": msg }).to_string());
    let req: IceRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return err(400, &format!("bad body: {e}")),
    };
    if req.user.is_empty() || req.user.len() > 256 {
        return err(400, "user must be 1 to 256 bytes");
    }
    if req.ttl == 0 {
        return err(400, "ttl must be at least 1 s");
    }
    let transports = req.transports.unwrap_or_else(|| vec!["udp".into(), "tcp".into(), "tls".into()]);
    if transports.is_empty() || transports.iter().any(|t| !matches!(t.as_str(), "udp" | "tcp" | "tls")) {
        return err(400, "transports: a non-empty list of udp, tcp, tls");
    }
    let minting = fleet.minting.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(secret) = minting.secret else {
        return err(409, "no static-auth-secret: /ice-servers mints TURN REST credentials from the first one");
    };
    let ttl = Duration::from_secs(req.ttl).min(minting.max_ttl);
    let live: Vec<NodeInfo> = fleet
        .live_nodes()
        .into_iter()
        .filter(|n| n.health == "ready" && req.region.as_ref().is_none_or(|r| n.region.as_ref() == Some(r)))
        .collect();
    let accepting: Vec<&NodeInfo> = live.iter().filter(|n| n.accepting()).collect();
    let chosen: Vec<&NodeInfo> = if accepting.is_empty() { live.iter().collect() } else { accepting };
    let urls: Vec<&str> = chosen
        .iter()
        .flat_map(|n| n.addresses.iter())
        .filter(|a| transports.contains(&a.transport))
        .map(|a| a.url.as_str())
        .collect();
    if urls.is_empty() {
        return err(503, "no healthy node with those transports and region");
    }
    let minted = rest::mint(secret.as_bytes(), now_unix, ttl, Some(&req.user), minting.separator);
    let v = serde_json::json!({
        "iceServers": [{ "urls": urls, "username": minted.username, "credential": minted.password }],
        "ttl": ttl.as_secs(),
        "expires": minted.expires_unix,
        "nodes": chosen.iter().map(|n| n.node.as_str()).collect::<Vec<_>>(),
    });
    (200, v.to_string())
}
