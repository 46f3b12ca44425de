//! Per-session timelines for the status page (`GET /timeline` on the admin endpoint): what
//! happened to each allocation (RFC 8656 §2.2 session), in order: the Allocate, the
//! CreatePermission and ChannelBind requests granted, Refreshes, error responses, an operator's
//! revocation, and the end with why and the traffic relayed each way.
//!
//! The control thread records what it pushes to the workers (so an event means "granted by the
//! control plane and queued to the worker"; a per-allocation cap the worker applies may still
//! refuse a permission or channel with 508, counted in `capacity_refusals`), and the workers'
//! end reports (the totals in [`uturn_dataplane::FromWorker::Released`]). Requests the worker answers alone
//! (retransmissions, a Refresh with LIFETIME 0 it verified itself) show only through their
//! effect (the end, reason `deleted`).
//!
//! Memory is bounded: at most [`MAX_TRACKED`] live sessions have a timeline (later ones are
//! counted in `untracked`), each keeps its last [`MAX_EVENTS`] events (repeats of the same event
//! are folded into one with a count, older ones counted in `omitted`), and the last
//! [`MAX_ENDED`] ended sessions are kept. About 2 KiB per session at most, so under 10 MiB in
//! all. Sessions a hot upgrade handed over have no timeline in the new process.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use uturn_dataplane::ToWorker;
use uturn_proto::relay::{Command, Install, Traffic};
use uturn_proto::wire::{attr, Class, Message, TransactionId};
use uturn_proto::FiveTuple;

/// Live sessions with a timeline at most.
pub const MAX_TRACKED: usize = 4096;
/// Ended sessions kept.
pub const MAX_ENDED: usize = 256;
/// Events kept per session (after the Allocate, which is always kept).
pub const MAX_EVENTS: usize = 32;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
enum What {
    /// CreatePermission granted for these peer IPs (RFC 8656 §10).
    Permission(Vec<IpAddr>),
    /// ChannelBind granted (RFC 8656 §12).
    Channel(u16, SocketAddr),
    /// Refresh granted with this lifetime, seconds (0 deletes, RFC 8656 §8).
    Refresh(u64),
    /// An error response to a request on the allocation: method name and error code.
    Refused(&'static str, u16),
    /// An operator revoked the allocation (admin API).
    Revoked,
}

impl What {
    fn kind(&self) -> &'static str {
        match self {
            What::Permission(_) => "permission",
            What::Channel(..) => "channel",
            What::Refresh(_) => "refresh",
            What::Refused(..) => "refused",
            What::Revoked => "revoked",
        }
    }

    fn detail(&self) -> String {
        match self {
            What::Permission(peers) => peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "),
            What::Channel(n, peer) => format!("0x{n:04X} \u{2192} {peer}"),
            What::Refresh(0) => "lifetime 0 (delete)".into(),
            What::Refresh(s) => format!("lifetime {s} s"),
            What::Refused(method, code) => format!("{method}: {code} {}", meaning(*code)),
            What::Revoked => "by an operator".into(),
        }
    }
}

/// One event: when (milliseconds after the Allocate; the last one when folded), what, and how
/// many times in a row.
#[derive(Debug, Clone)]
struct Event {
    first_ms: u64,
    last_ms: u64,
    what: What,
    count: u32,
}

/// How a session ended.
#[derive(Debug, Clone)]
struct End {
    at_ms: u64,
    reason: &'static str,
    /// Totals each way (None when the worker did not report them, e.g. an Install refused).
    traffic: Option<(Traffic, Traffic)>,
}

/// One session's timeline.
#[derive(Debug, Clone)]
struct SessionLog {
    id: u64,
    tid: TransactionId,
    five_tuple: FiveTuple,
    user: Arc<str>,
    worker: usize,
    relayed: SocketAddr,
    tcp: bool,
    lifetime_s: u64,
    started: Instant,
    started_unix_ms: u64,
    events: VecDeque<Event>,
    omitted: u64,
    end: Option<End>,
}

impl SessionLog {
    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_millis() as u64
    }

    fn push(&mut self, now: Instant, what: What) {
        let ms = self.ms(now);
        if let Some(last) = self.events.back_mut() {
            if last.what == what {
                last.count = last.count.saturating_add(1);
                last.last_ms = ms;
                return;
            }
        }
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
            self.omitted += 1;
        }
        self.events.push_back(Event { first_ms: ms, last_ms: ms, what, count: 1 });
    }

    fn to_json(&self) -> Value {
        let traffic = |t: &Traffic| json!({ "packets": t.packets, "bytes": t.bytes });
        let events: Vec<Value> = self
            .events
            .iter()
            .map(|e| {
                json!({ "at_ms": e.first_ms, "last_ms": e.last_ms, "kind": e.what.kind(),
                        "detail": e.what.detail(), "count": e.count })
            })
            .collect();
        let end = self.end.as_ref().map(|e| {
            json!({
                "at_ms": e.at_ms,
                "reason": e.reason,
                "to_peer": e.traffic.as_ref().map(|(p, _)| traffic(p)),
                "to_client": e.traffic.as_ref().map(|(_, c)| traffic(c)),
            })
        });
        json!({
            "id": self.id,
            "user": &*self.user,
            "client": self.five_tuple.client,
            "server": self.five_tuple.server,
            "transport": self.five_tuple.transport.to_string(),
            "worker": self.worker,
            "relayed": self.relayed,
            "tcp_allocation": self.tcp,
            "lifetime_s": self.lifetime_s,
            "started_unix_ms": self.started_unix_ms,
            "events": events,
            "omitted": self.omitted,
            "end": end,
        })
    }
}

/// The timelines (owned by the control thread).
#[derive(Debug, Default)]
pub struct Timeline {
    live: HashMap<u64, SessionLog>,
    by_tuple: HashMap<FiveTuple, u64>,
    ended: VecDeque<SessionLog>,
    /// Allocations made while [`MAX_TRACKED`] sessions had a timeline.
    untracked: u64,
}

impl Timeline {
    /// Records what the control thread queues to worker `worker` (an Install starts a
    /// timeline; requests on a tracked allocation add to it).
    pub fn observe(&mut self, now: Instant, worker: usize, msg: &ToWorker) {
        match msg {
            ToWorker::Install(i, ..) => self.start(now, worker, i, false),
            ToWorker::InstallTcp(i) => self.start(now, worker, i, true),
            ToWorker::Command(c) => {
                let (ft, what) = match c {
                    Command::CreatePermission { five_tuple, peers, .. } => {
                        (five_tuple, What::Permission(peers.clone()))
                    }
                    Command::ChannelBind { five_tuple, channel, peer, .. } => {
                        (five_tuple, What::Channel(channel.get(), *peer))
                    }
                    Command::Refresh { five_tuple, lifetime, .. } => (five_tuple, What::Refresh(lifetime.as_secs())),
                    Command::Revoke { five_tuple, .. } => (five_tuple, What::Revoked),
                    Command::Reply { five_tuple, bytes } => {
                        if !self.by_tuple.contains_key(five_tuple) {
                            return;
                        }
                        let Some(what) = refusal(bytes) else { return };
                        (five_tuple, what)
                    }
                    Command::Install(_) => return,
                };
                if let Some(log) = self.by_tuple.get(ft).and_then(|id| self.live.get_mut(id)) {
                    log.push(now, what);
                }
            }
            _ => {}
        }
    }

    fn start(&mut self, now: Instant, worker: usize, i: &Install, tcp: bool) {
        if self.live.len() >= MAX_TRACKED {
            self.untracked += 1;
            return;
        }
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64;
        // A new allocation on a 5-tuple replaces an older one there (its end report follows).
        if let Some(old) = self.by_tuple.insert(i.five_tuple, i.session) {
            self.finish(now, old, "replaced", None);
        }
        self.live.insert(
            i.session,
            SessionLog {
                id: i.session,
                tid: i.tid,
                five_tuple: i.five_tuple,
                user: i.user.clone(),
                worker,
                relayed: i.relayed,
                tcp,
                lifetime_s: i.lifetime.as_secs(),
                started: now,
                started_unix_ms: unix_ms,
                events: VecDeque::new(),
                omitted: 0,
                end: None,
            },
        );
    }

    /// A worker reported that session `session` ended (`reason` as logs spell it) with these
    /// totals.
    pub fn ended(&mut self, now: Instant, session: u64, reason: &'static str, to_peer: Traffic, to_client: Traffic) {
        self.finish(now, session, reason, Some((to_peer, to_client)));
    }

    /// A worker released the allocation Allocate `tid` made on `ft` (after its end report, or
    /// without one when the Install was refused or could not be queued).
    pub fn released(&mut self, now: Instant, ft: &FiveTuple, tid: TransactionId) {
        let Some(id) = self.by_tuple.get(ft).copied() else { return };
        if self.live.get(&id).is_some_and(|l| l.tid == tid) {
            self.finish(now, id, "not installed", None);
        }
    }

    fn finish(&mut self, now: Instant, session: u64, reason: &'static str, traffic: Option<(Traffic, Traffic)>) {
        let Some(mut log) = self.live.remove(&session) else { return };
        if self.by_tuple.get(&log.five_tuple) == Some(&session) {
            self.by_tuple.remove(&log.five_tuple);
        }
        log.end = Some(End { at_ms: log.ms(now), reason, traffic });
        if self.ended.len() == MAX_ENDED {
            self.ended.pop_front();
        }
        self.ended.push_back(log);
    }

    /// Live sessions with a timeline.
    pub fn tracked(&self) -> usize {
        self.live.len()
    }

    /// The JSON `GET /timeline` (`which` = [`Which::All`]) and `GET /timeline/ended`
    /// ([`Which::Ended`]) answer: `{"sessions":[...],"untracked":N,"limits":{...}}`, sessions
    /// by id. Times: `started_unix_ms` (Unix milliseconds), event and end times in milliseconds
    /// after the Allocate. All of them is up to a few MiB, built on the control thread: the
    /// status page asks for the ended ones and for each opened live one only.
    pub fn to_json(&self, which: Which) -> String {
        let live = self.live.values().filter(|_| which == Which::All);
        let mut all: Vec<&SessionLog> = live.chain(self.ended.iter()).collect();
        all.sort_by_key(|l| l.id);
        json!({
            "sessions": all.iter().map(|l| l.to_json()).collect::<Vec<_>>(),
            "untracked": self.untracked,
            "limits": { "live": MAX_TRACKED, "ended": MAX_ENDED, "events": MAX_EVENTS },
        })
        .to_string()
    }

    /// The JSON of one session's timeline (`GET /timeline/ID`), live or ended; `None` when
    /// there is none.
    pub fn session_json(&self, id: u64) -> Option<String> {
        let log = self.live.get(&id).or_else(|| self.ended.iter().find(|l| l.id == id))?;
        Some(log.to_json().to_string())
    }
}

/// Which timelines [`Timeline::to_json`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Live and ended sessions.
    All,
    /// The ended sessions kept.
    Ended,
}

/// The method and code of an error response, `None` for anything else.
fn refusal(bytes: &[u8]) -> Option<What> {
    let msg = Message::parse(bytes).ok()?;
    if msg.class() != Class::Error {
        return None;
    }
    let code = msg.get(attr::ERROR_CODE).filter(|v| v.len() >= 4).map(|v| v[2] as u16 % 8 * 100 + v[3] as u16)?;
    Some(What::Refused(msg.method().name(), code))
}

/// What an error code means to an operator (RFC 8656 §19, RFC 8489 §14.8).
fn meaning(code: u16) -> &'static str {
    match code {
        300 => "try alternate (draining)",
        400 => "bad request",
        401 => "unauthenticated",
        403 => "forbidden: peer address denied by policy",
        437 => "allocation mismatch",
        438 => "stale nonce (the client retries)",
        440 => "address family not supported",
        441 => "wrong credentials",
        442 => "unsupported transport protocol",
        443 => "peer address family mismatch",
        486 => "allocation quota reached",
        500 => "server error",
        508 => "insufficient capacity",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uturn_proto::relay::Transport;
    use uturn_proto::wire::{ChannelNumber, IntegrityKey};

    fn ft(port: u16) -> FiveTuple {
        FiveTuple {
            client: SocketAddr::from(([127, 0, 0, 1], port)),
            server: SocketAddr::from(([127, 0, 0, 1], 3478)),
            transport: Transport::Udp,
        }
    }

    fn install(session: u64, port: u16) -> ToWorker {
        ToWorker::InstallTcp(Install {
            five_tuple: ft(port),
            tid: TransactionId([session as u8; 12]),
            relayed: SocketAddr::from(([127, 0, 0, 1], 50000)),
            additional: None,
            lifetime: Duration::from_secs(600),
            response: Box::new([]),
            key: IntegrityKey::long_term("u", "r", "p"),
            session,
            user: "alice".into(),
        })
    }

    fn refresh(port: u16, s: u64) -> ToWorker {
        ToWorker::Command(Command::Refresh {
            five_tuple: ft(port),
            tid: TransactionId([9; 12]),
            lifetime: Duration::from_secs(s),
            key: IntegrityKey::long_term("u", "r", "p"),
        })
    }

    #[test]
    fn a_session_is_told_in_order_and_repeats_fold() {
        let mut t = Timeline::default();
        let now = Instant::now();
        t.observe(now, 1, &install(7, 1000));
        let key = IntegrityKey::long_term("u", "r", "p");
        let peer = SocketAddr::from(([127, 0, 0, 2], 9));
        let perm = ToWorker::Command(Command::CreatePermission {
            five_tuple: ft(1000),
            tid: TransactionId([1; 12]),
            peers: vec![peer.ip()],
            key,
        });
        t.observe(now, 1, &perm);
        let bind = ToWorker::Command(Command::ChannelBind {
            five_tuple: ft(1000),
            tid: TransactionId([2; 12]),
            channel: ChannelNumber::new(0x4001).unwrap(),
            peer,
            key,
        });
        t.observe(now, 1, &bind);
        for _ in 0..5 {
            t.observe(now, 1, &refresh(1000, 600));
        }
        t.observe(now, 1, &refresh(2000, 600)); // no allocation there: ignored
        let traffic = Traffic { packets: 3, bytes: 300 };
        t.ended(now, 7, "deleted", traffic, traffic);
        t.released(now, &ft(1000), TransactionId([7; 12]));
        let v: Value = serde_json::from_str(&t.to_json(Which::Ended)).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&t.session_json(7).unwrap()).unwrap(), v["sessions"][0]);
        assert!(t.session_json(8).is_none());
        let s = &v["sessions"][0];
        assert_eq!(s["id"], 7);
        assert_eq!(s["user"], "alice");
        let kinds: Vec<&str> = s["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["permission", "channel", "refresh"]);
        assert_eq!(s["events"][2]["count"], 5);
        assert_eq!(s["events"][1]["detail"], "0x4001 \u{2192} 127.0.0.2:9");
        assert_eq!(s["end"]["reason"], "deleted");
        assert_eq!(s["end"]["to_client"]["bytes"], 300);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn memory_is_bounded() {
        let mut t = Timeline::default();
        let now = Instant::now();
        for s in 0..(MAX_TRACKED as u64 + 10) {
            t.observe(now, 0, &install(s, s as u16));
        }
        assert_eq!(t.tracked(), MAX_TRACKED);
        assert_eq!(t.untracked, 10);
        for i in 0..(MAX_EVENTS as u64 * 2) {
            t.observe(now, 0, &refresh(0, 100 + i));
        }
        let log = &t.live[&0];
        assert_eq!(log.events.len(), MAX_EVENTS);
        assert_eq!(log.omitted, MAX_EVENTS as u64);
        for s in 0..MAX_TRACKED as u64 {
            t.ended(now, s, "expired", Traffic::default(), Traffic::default());
        }
        assert_eq!(t.ended.len(), MAX_ENDED);
        assert_eq!((t.tracked(), t.by_tuple.len()), (0, 0));
    }

    #[test]
    fn an_error_reply_on_a_tracked_allocation_is_a_refusal() {
        let mut t = Timeline::default();
        let now = Instant::now();
        t.observe(now, 0, &install(1, 1000));
        let mut buf = [0u8; 256];
        let n = (|| {
            let mut w = uturn_proto::response::start(
                &mut buf,
                uturn_proto::wire::Method::CREATE_PERMISSION,
                Class::Error,
                TransactionId([3; 12]),
            )?;
            w.bytes(attr::ERROR_CODE, &[0, 0, 4, 3])?;
            uturn_proto::response::seal(w, None)
        })()
        .unwrap();
        t.observe(now, 0, &ToWorker::Command(Command::Reply { five_tuple: ft(1000), bytes: buf[..n].to_vec() }));
        let v: Value = serde_json::from_str(&t.to_json(Which::All)).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&t.to_json(Which::Ended)).unwrap()["sessions"], json!([]));
        let e = &v["sessions"][0]["events"][0];
        assert_eq!(e["kind"], "refused");
        assert!(e["detail"].as_str().unwrap().starts_with("CreatePermission: 403 forbidden"), "{e}");
    }
}
