//! Fleet-wide admin requests over Redis pub/sub: revoke a user's allocations and list the
//! sessions on every node.
//!
//! The asking node (its admin endpoint's HTTP thread, never the control loop) publishes a
//! [`Request`] on [`CONTROL_CHANNEL`]; `PUBLISH` answers how many subscribers got it, which is
//! how many answers to wait for. Every node's subscriber thread (the asking node's included)
//! hands the request to its control loop like an admin request, and pushes its answer on the
//! request's reply list (`RPUSH`, `EXPIRE` 10 s). The asker pops answers (`BLPOP`) until it has
//! them all or [`ANSWER_TIMEOUT`] passes; nodes that did not answer in time are counted as
//! `missing`. A node whose subscriber is down at that moment (Redis restarting) is neither
//! counted nor waited for: the answer names the nodes that answered.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::Thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::{connect, FleetShared, ANSWER_TIMEOUT, CONTROL_CHANNEL, REPLY_PREFIX};
use crate::admin_api::{ask, AdminAction, AdminRequest};

/// A fleet-wide admin request, as published (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// `revoke` or `sessions`.
    pub op: String,
    /// For `revoke`: the user (a REST user id matches its ephemeral usernames).
    #[serde(default)]
    pub user: Option<String>,
    /// The list each node pushes its [`Answer`] on.
    pub reply: String,
}

/// One node's answer (JSON on the reply list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The answering node's id.
    pub node: String,
    /// The HTTP status its own admin endpoint would have answered.
    pub status: u16,
    /// The JSON body its own admin endpoint would have answered.
    pub body: serde_json::Value,
}

/// The answers to one fleet-wide request.
#[derive(Debug, Clone, Default)]
pub struct Gathered {
    /// The nodes' answers, sorted by node id.
    pub answers: Vec<Answer>,
    /// Subscribers that got the request but did not answer within [`ANSWER_TIMEOUT`].
    pub missing: usize,
}

/// Publishes `op` (with `user`) to the fleet behind `url` and gathers the answers.
pub fn broadcast(url: &str, op: &str, user: Option<&str>) -> redis::RedisResult<Gathered> {
    let mut conn = connect(url)?;
    // BLPOP blocks on the server up to the deadline: the socket waits a little longer.
    conn.set_read_timeout(Some(ANSWER_TIMEOUT + Duration::from_secs(1)))?;
    let reply = format!("{REPLY_PREFIX}{:016x}", rand::random::<u64>());
    let request = Request { op: op.into(), user: user.map(str::to_owned), reply: reply.clone() };
    let receivers: usize = redis::cmd("PUBLISH")
        .arg(CONTROL_CHANNEL)
        .arg(serde_json::to_string(&request).unwrap_or_default())
        .query(&mut conn)?;
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut answers = Vec::with_capacity(receivers);
    while answers.len() < receivers {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let popped: Option<(String, String)> =
            redis::cmd("BLPOP").arg(&reply).arg(left.as_secs_f64().max(0.01)).query(&mut conn)?;
        let Some((_, v)) = popped else { break };
        if let Ok(a) = serde_json::from_str::<Answer>(&v) {
            answers.push(a);
        }
    }
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&reply).query(&mut conn);
    answers.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(Gathered { missing: receivers.saturating_sub(answers.len()), answers })
}

/// Starts the subscriber thread: it answers fleet-wide requests by asking the control loop
/// over `tx` (unparking `control`), like the admin endpoint does.
pub fn spawn_subscriber(
    shared: Arc<FleetShared>,
    url: String,
    tx: Sender<AdminRequest>,
    control: Thread,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("uturn-fleet-subscriber".into())
        .spawn(move || subscriber(&shared, &url, &tx, &control))?;
    Ok(())
}

fn subscriber(shared: &FleetShared, url: &str, tx: &Sender<AdminRequest>, control: &Thread) {
    while !shared.stop.load(Ordering::Relaxed) {
        // The heartbeat logs the outage (one WARN); this thread retries quietly.
        if let Err(e) = subscribe_and_serve(shared, url, tx, control) {
            debug!("fleet subscriber: {e}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn subscribe_and_serve(
    shared: &FleetShared,
    url: &str,
    tx: &Sender<AdminRequest>,
    control: &Thread,
) -> redis::RedisResult<()> {
    let mut sub = connect(url)?;
    let mut out: Option<redis::Connection> = None;
    let mut pubsub = sub.as_pubsub();
    pubsub.subscribe(CONTROL_CHANNEL)?;
    pubsub.set_read_timeout(Some(Duration::from_secs(1)))?;
    while !shared.stop.load(Ordering::Relaxed) {
        let msg = match pubsub.get_message() {
            Ok(m) => m,
            Err(e) if e.is_timeout() => continue,
            Err(e) => return Err(e),
        };
        let Ok(payload) = msg.get_payload::<String>() else { continue };
        let Ok(request) = serde_json::from_str::<Request>(&payload) else { continue };
        if !request.reply.starts_with(REPLY_PREFIX) {
            continue;
        }
        let action = match (request.op.as_str(), request.user) {
            ("revoke", Some(user)) => AdminAction::Revoke(user),
            ("sessions", _) => AdminAction::Sessions(None),
            _ => continue,
        };
        let (status, body) = ask(tx, control, action);
        let answer = Answer {
            node: shared.node_id.clone(),
            status,
            body: serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
        };
        let conn = match out.as_mut() {
            Some(c) => c,
            None => out.insert(connect(url)?),
        };
        let pushed: redis::RedisResult<()> = redis::pipe()
            .cmd("RPUSH")
            .arg(&request.reply)
            .arg(serde_json::to_string(&answer).unwrap_or_default())
            .ignore()
            .cmd("EXPIRE")
            .arg(&request.reply)
            .arg(10)
            .ignore()
            .query(conn);
        if pushed.is_err() {
            out = None;
        }
    }
    Ok(())
}
