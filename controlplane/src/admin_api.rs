//! The admin endpoint (`--admin-listen IP:PORT`): a small HTTP/1.1 API for operators and for
//! `uturn admin revoke`. It is loopback only unless a bearer token (`--admin-token`) is set.
//!
//! Served by [`crate::http_endpoint`] (bounded head, body, time and connections). Without a
//! token the endpoint trusts its loopback address, so it answers only requests whose `Host`
//! names a loopback IP or `localhost` with its port (DNS rebinding), 403 otherwise. Requests
//! that change state (POST, DELETE) are refused with 403 when they look cross-site: a
//! `Sec-Fetch-Site` other than `same-origin`/`none`, an `Origin` other than the endpoint's own,
//! or a content type an HTML form can send, so a web page cannot drain or revoke.
//!
//! Routes (JSON answers):
//! - `GET /health`: 200 `ok` while the control loop runs.
//! - `GET /ready`: 200 while serving, 503 while draining (load balancers stop sending).
//! - `GET /sessions`: every allocation: id, user, client, server, relayed, age_s,
//!   expires_in_s, permissions, channels, to_peer and to_client traffic.
//! - `GET /sessions/ID`: one allocation, or 404.
//! - `DELETE /sessions/ID`: ends that allocation (`{"session":ID,"revoked":0|1}`).
//! - `DELETE /users/NAME/sessions`: ends every allocation of user NAME (percent-encoded; a
//!   REST user id matches its ephemeral usernames); answers `{"user":NAME,"revoked":N}`.
//! - `POST /drain`: stop granting allocations; the process exits when the last one ends or
//!   `drain-timeout` passes (`{"draining":true,"allocations":N}`).
//! - `GET /`, `/status.css`, `/status.js`: the live status page ([`crate::status`]; these hold
//!   no data and need no token), `GET /status.json`: its data, `GET /timeline`: the sessions'
//!   timelines ([`crate::timeline`]; `/timeline/ended`: the ended ones, `/timeline/ID`: one).
//! - `GET /trace?user=NAME|session=ID|client=IP[:PORT][&rate=N][&max_s=N][&snaplen=N]`: a
//!   stream of JSON lines (`application/x-ndjson`) of the matching sessions' messages, traffic
//!   and flags ([`crate::trace`]); 400 for a bad query, 429 when [`crate::trace::MAX_TRACES`]
//!   traces are active. The stream is exempt from the connection time limit; it ends at `max_s`.
//! - `GET /fleet`, `GET /sessions?fleet=1`, `POST /ice-servers`, and `DELETE /users/NAME/sessions`
//!   on every node of a fleet: see [`crate::fleet::admin`].
//!
//! The HTTP thread never touches control-plane or worker state: it hands each request to the
//! control loop over a queue and waits (at most 2 s) for the answer; for sessions the control
//! loop asks every worker, and the workers answer this thread directly.

use std::net::TcpListener;
use std::sync::Arc;
use std::thread::Thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use hyper::http::Method;
use tracing::info;
use uturn_proto::relay::SessionInfo;

use crate::http_endpoint::{cross_site, host_is_loopback, HttpServer, Request, Response, Stream};

/// How long the HTTP thread waits for the control loop.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// What an admin request asks the control loop to do.
#[derive(Debug)]
pub enum AdminAction {
    /// End every allocation of this user.
    Revoke(String),
    /// End the allocation with this session id.
    RevokeSession(u64),
    /// List the sessions (all, or the one with this id).
    Sessions(Option<u64>),
    /// Stop granting allocations.
    Drain,
    /// Say whether the relay takes new allocations.
    Ready,
    /// The sessions' timelines (the status page): all, the ended ones, or one session's.
    Timeline(TimelineQuery),
}

/// Which timelines [`AdminAction::Timeline`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimelineQuery {
    /// `GET /timeline` or `GET /timeline/ended`.
    List(crate::timeline::Which),
    /// `GET /timeline/ID`.
    Session(u64),
}

/// What the control loop answers.
#[derive(Debug)]
pub enum AdminReply {
    /// Status code and JSON body.
    Json(u16, String),
    /// The workers answer on `rx`, `workers` of them, each with its sessions.
    Sessions {
        /// Where the workers' answers come.
        rx: Receiver<(usize, Vec<SessionInfo>)>,
        /// How many answers to wait for.
        workers: usize,
    },
}

/// One admin request, with where its answer goes.
#[derive(Debug)]
pub struct AdminRequest {
    /// What to do.
    pub action: AdminAction,
    /// The answer channel.
    pub reply: Sender<AdminReply>,
}

/// A running admin endpoint.
pub struct AdminApi {
    _server: HttpServer,
    /// Requests for the control loop.
    pub requests: Receiver<AdminRequest>,
}

impl AdminApi {
    /// Serves on `listener` (bound to the admin address, or handed over by the previous
    /// process); each request unparks `control`. `token`: the bearer token required in
    /// `Authorization` (required by the configuration off loopback); without one, only
    /// requests whose Host is loopback with the listener's port are answered. `board`: what
    /// `GET /status.json` shows.
    /// `fleet`: the fleet routes' shared state (crate::fleet::admin).
    pub fn start(
        listener: TcpListener,
        token: Option<String>,
        control: Thread,
        board: Arc<crate::status::StatusBoard>,
        fleet: Option<Arc<crate::fleet::FleetShared>>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (tx, requests) = crossbeam_channel::bounded(64);
        let token_for_traces = token.clone();
        let handler = move |r: &Request| {
            // The status page's static files hold no data: served without the token (a browser
            // cannot send one on navigation; the page's script sends it on its requests), but
            // without a token only to a loopback Host like everything else.
            if let (true, Some((content_type, body))) = (r.method == Method::GET, crate::status::asset(&r.path)) {
                if token.is_some() || host_is_loopback(&r.headers, addr.port()) {
                    return Response { status: 200, content_type, body: body.into() };
                }
            }
            if r.method == Method::GET && r.path == "/status.json" && gate(r, addr.port(), token.as_deref()).is_none() {
                return Response { status: 200, content_type: "application/json", body: board.to_json() };
            }
            let (status, body) = route(r, addr.port(), token.as_deref(), &tx, &control, fleet.as_deref());
            let content_type =
                if body.starts_with(['{', '[']) { "application/json" } else { "text/plain; charset=utf-8" };
            Response { status, content_type, body }
        };
        let trace_token = token_for_traces;
        let streams = move |r: &Request| trace_stream(r, addr.port(), trace_token.as_deref());
        let server = HttpServer::start_streaming("uturn-admin", listener, Arc::new(handler), Arc::new(streams))?;
        info!(%addr, "admin endpoint listening");
        Ok(AdminApi { _server: server, requests })
    }
}

/// `GET /trace`: the stream of a new trace, or the answer that refuses it; `None` for every
/// other route.
fn trace_stream(request: &Request, port: u16, token: Option<&str>) -> Option<Result<Stream, Response>> {
    if request.path != "/trace" {
        return None;
    }
    let refuse = |status: u16, body: String| Err(Response { status, content_type: "application/json", body });
    if let Some(denied) = gate(request, port, token) {
        return Some(refuse(denied.0, denied.1));
    }
    if request.method != Method::GET {
        return Some(refuse(405, "{\"error\":\"GET only\"}".into()));
    }
    let spec = match crate::trace::TraceSpec::from_query(&request.query) {
        Ok(s) => s,
        Err(e) => return Some(refuse(400, serde_json::json!({ "error": e }).to_string())),
    };
    Some(match crate::trace::start(spec) {
        Ok(chunks) => Ok(Stream { content_type: "application/x-ndjson", chunks }),
        Err(crate::trace::StartError::TooMany) => {
            refuse(429, format!("{{\"error\":\"{} traces are active already (the cap)\"}}", crate::trace::MAX_TRACES))
        }
    })
}

/// The refusal of a request without the bearer token (when one is set) or, without a token,
/// with a Host that is not loopback; `None` when it may go on.
fn gate(request: &Request, port: u16, token: Option<&str>) -> Option<(u16, String)> {
    match token {
        Some(t) => {
            let want = format!("Bearer {t}");
            let ok = request
                .headers
                .get_all(hyper::http::header::AUTHORIZATION)
                .iter()
                .any(|v| constant_time_eq(v.as_bytes(), want.as_bytes()));
            if !ok {
                return Some((401, "{\"error\":\"bearer token required\"}".into()));
            }
        }
        None if !host_is_loopback(&request.headers, port) => {
            return Some((
                403,
                format!("{{\"error\":\"Host must be a loopback address or localhost with port {port}\"}}"),
            ));
        }
        None => {}
    }
    None
}

fn route(
    request: &Request,
    port: u16,
    token: Option<&str>,
    tx: &Sender<AdminRequest>,
    control: &Thread,
    fleet: Option<&crate::fleet::FleetShared>,
) -> (u16, String) {
    if let Some(refusal) = gate(request, port, token) {
        return refusal;
    }
    if let Some(why) = cross_site(&request.method, &request.headers) {
        return (403, format!("{{\"error\":\"cross-site request refused: {why}\"}}"));
    }
    let path = request.path.as_str();
    let method = &request.method;
    let (get, delete, post) = (method == Method::GET, method == Method::DELETE, method == Method::POST);
    let session_id = path.strip_prefix("/sessions/").map(|id| id.parse::<u64>());
    if let (true, Some(name)) = (delete, path.strip_prefix("/users/").and_then(|r| r.strip_suffix("/sessions"))) {
        let Some(user) = percent_decode(name) else { return (400, "{\"error\":\"bad user name\"}".into()) };
        if let Some(answer) = fleet.and_then(|f| crate::fleet::admin::route(f, request, Some(&user), tx, control)) {
            return answer;
        }
        return ask(tx, control, AdminAction::Revoke(user));
    }
    // GET /fleet, GET /sessions?fleet=1, POST /ice-servers (crate::fleet::admin).
    if let Some(answer) = fleet.and_then(|f| crate::fleet::admin::route(f, request, None, tx, control)) {
        return answer;
    }
    match session_id {
        _ if get && path == "/health" => (200, "ok".into()),
        _ if get && path == "/ready" => ask(tx, control, AdminAction::Ready),
        _ if get && path == "/sessions" => ask(tx, control, AdminAction::Sessions(None)),
        _ if post && path == "/drain" => ask(tx, control, AdminAction::Drain),
        _ if get && path.starts_with("/timeline") => match timeline_query(&path["/timeline".len()..]) {
            Some(query) => ask(tx, control, AdminAction::Timeline(query)),
            None => (404, "{\"error\":\"no such route\"}".into()),
        },
        Some(Err(_)) if get || delete => (400, "{\"error\":\"bad session id\"}".into()),
        Some(Ok(id)) if get => ask(tx, control, AdminAction::Sessions(Some(id))),
        Some(Ok(id)) if delete => ask(tx, control, AdminAction::RevokeSession(id)),
        _ => (404, "{\"error\":\"no such route\"}".into()),
    }
}

/// The timelines asked for by the rest of a `/timeline` path: empty (all), `/ended`, `/ID`.
fn timeline_query(rest: &str) -> Option<TimelineQuery> {
    match rest {
        "" => Some(TimelineQuery::List(crate::timeline::Which::All)),
        "/ended" => Some(TimelineQuery::List(crate::timeline::Which::Ended)),
        _ => rest.strip_prefix('/')?.parse().ok().map(TimelineQuery::Session),
    }
}

/// Hands `action` to the control loop over `tx` (unparking `control`) and waits (at most 2 s) for
/// its answer: status and JSON body.
pub fn ask(tx: &Sender<AdminRequest>, control: &Thread, action: AdminAction) -> (u16, String) {
    let filter = match action {
        AdminAction::Sessions(f) => Some(f),
        _ => None,
    };
    let (reply, answer) = crossbeam_channel::bounded(1);
    if tx.try_send(AdminRequest { action, reply }).is_err() {
        return (503, "{\"error\":\"busy\"}".into());
    }
    control.unpark();
    match answer.recv_timeout(ANSWER_TIMEOUT) {
        Ok(AdminReply::Json(status, body)) => (status, body),
        Ok(AdminReply::Sessions { rx, workers }) => sessions(&rx, workers, filter.flatten()),
        Err(_) => (503, "{\"error\":\"the control loop did not answer\"}".into()),
    }
}

/// Collects the workers' session lists (each worker answers between two loop iterations).
fn sessions(rx: &Receiver<(usize, Vec<SessionInfo>)>, workers: usize, id: Option<u64>) -> (u16, String) {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut all: Vec<SessionInfo> = Vec::new();
    for _ in 0..workers {
        match rx.recv_deadline(deadline) {
            Ok((_, list)) => all.extend(list),
            Err(_) => return (503, "{\"error\":\"a worker did not answer\"}".into()),
        }
    }
    all.sort_by_key(|s| s.id);
    match id {
        None => (200, serde_json::to_string(&all).unwrap_or_default()),
        Some(id) => match all.into_iter().find(|s| s.id == id) {
            Some(s) => (200, serde_json::to_string(&s).unwrap_or_default()),
            None => (404, format!("{{\"error\":\"no session {id}\"}}")),
        },
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes `%XX` escapes; `None` for a malformed escape or a result that is not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
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
