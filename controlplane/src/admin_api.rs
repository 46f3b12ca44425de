//! The admin endpoint (`--admin-listen IP:PORT`): a small HTTP/1.1 API for operators and for
//! `uturn admin revoke`. It is loopback only unless a bearer token (`--admin-token`) is set.
//!
//! Routes:
//! - `GET /health`: 200 `ok` while the control loop runs.
//! - `DELETE /users/NAME/sessions`: ends every allocation of user NAME (percent-encoded; a
//!   REST user id matches its ephemeral usernames); answers `{"user":NAME,"revoked":N}`.
//!
//! The HTTP thread never touches control-plane state: it hands each request to the control
//! loop over a queue and waits (at most 2 s) for the answer.

use std::net::SocketAddr;
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use tracing::{info, warn};

/// How long the HTTP thread waits for the control loop.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// What an admin request asks the control loop to do.
#[derive(Debug)]
pub enum AdminAction {
    /// End every allocation of this user.
    Revoke(String),
}

/// One admin request, with where its answer goes (a JSON body).
#[derive(Debug)]
pub struct AdminRequest {
    /// What to do.
    pub action: AdminAction,
    /// The answer channel.
    pub reply: Sender<String>,
}

/// A running admin endpoint.
pub struct AdminApi {
    server: std::sync::Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    /// Requests for the control loop.
    pub requests: Receiver<AdminRequest>,
}

impl AdminApi {
    /// Listens on `addr`; each request unparks `control`. `token`: the bearer token required
    /// in `Authorization` (required by the configuration off loopback).
    pub fn start(addr: SocketAddr, token: Option<String>, control: Thread) -> std::io::Result<Self> {
        let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
        let server = std::sync::Arc::new(server);
        let (tx, requests) = crossbeam_channel::bounded(64);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("uturn-admin".into())
            .spawn(move || serve(&s, token.as_deref(), &tx, &control))?;
        info!(%addr, "admin endpoint listening");
        Ok(AdminApi { server, thread: Some(thread), requests })
    }
}

impl Drop for AdminApi {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(server: &tiny_http::Server, token: Option<&str>, tx: &Sender<AdminRequest>, control: &Thread) {
    for request in server.incoming_requests() {
        let (status, body) = route(&request, token, tx, control);
        let response = tiny_http::Response::from_string(body).with_status_code(status);
        if let Err(e) = request.respond(response) {
            warn!("admin endpoint: answering failed: {e}");
        }
    }
}

fn route(
    request: &tiny_http::Request,
    token: Option<&str>,
    tx: &Sender<AdminRequest>,
    control: &Thread,
) -> (u16, String) {
    if let Some(t) = token {
        let want = format!("Bearer {t}");
        let ok = request
            .headers()
            .iter()
            .any(|h| h.field.equiv("Authorization") && constant_time_eq(h.value.as_str().as_bytes(), want.as_bytes()));
        if !ok {
            return (401, "{\"error\":\"bearer token required\"}".into());
        }
    }
    let url = request.url();
    let path = url.split('?').next().unwrap_or("");
    match (request.method(), path.strip_prefix("/users/").and_then(|r| r.strip_suffix("/sessions"))) {
        (tiny_http::Method::Delete, Some(name)) => {
            let Some(user) = percent_decode(name) else { return (400, "{\"error\":\"bad user name\"}".into()) };
            ask(tx, control, AdminAction::Revoke(user))
        }
        _ if path == "/health" && *request.method() == tiny_http::Method::Get => (200, "ok".into()),
        _ => (404, "{\"error\":\"no such route\"}".into()),
    }
}

fn ask(tx: &Sender<AdminRequest>, control: &Thread, action: AdminAction) -> (u16, String) {
    let (reply, answer) = crossbeam_channel::bounded(1);
    if tx.try_send(AdminRequest { action, reply }).is_err() {
        return (503, "{\"error\":\"busy\"}".into());
    }
    control.unpark();
    match answer.recv_timeout(ANSWER_TIMEOUT) {
        Ok(body) => (200, body),
        Err(_) => (503, "{\"error\":\"the control loop did not answer\"}".into()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes `%XX` escapes; `None` for a malformed escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

/// Percent-encodes a user name for a URL path segment.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_round_trip() {
        for s in ["alice", "1700000000:alice", "マトリックス", "a b/c%"] {
            assert_eq!(percent_decode(&percent_encode(s)).as_deref(), Some(s));
        }
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%FF"), None);
    }
}
