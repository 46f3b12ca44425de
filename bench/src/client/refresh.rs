//! Keeping TURN state alive during a long run without blocking the traffic loop: a sans-I/O
//! scheduler of Refresh (allocation), CreatePermission and ChannelBind transactions.
//!
//! The relay's permission and channel lifetimes (RFC 8656 §9: 300 s, §12: 600 s) are server
//! configuration and are not signalled on the wire, so their refresh intervals are given
//! ([`Intervals`], defaults 240 s and 480 s as a real client uses); an allocation is refreshed
//! at half the LIFETIME the server granted, or at a given interval.
//!
//! The [`Refresher`] never touches a socket: [`Refresher::poll`] hands the datagrams to send to
//! a callback, and the caller feeds every STUN response its receive loop sees
//! ([`is_response`] tells them apart from relayed data) to [`Refresher::on_response`]. So
//! relayed data arriving while a refresh is outstanding is counted as usual and never taken
//! for (or lost to) a control answer. A 438 Stale Nonce teaches the fresh nonce and the
//! request is retried once; requests are retransmitted (500 ms, doubling, at most 2 s apart,
//! 7 sends in all) and every transaction that does not end in a success response counts as a
//! failure ([`RefreshStats::failures`]), after which it is tried again an eighth of its
//! interval later (at least 1 s).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use uturn_proto::wire::{attr, integrity, Class, IntegrityKey, Message, Method, TransactionId};

use super::{build, error_code, Client};

/// The STUN magic cookie (RFC 8489 §5).
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// First retransmission timeout.
const RTO: Duration = Duration::from_millis(500);
/// Longest gap between retransmissions.
const MAX_RTO: Duration = Duration::from_secs(2);
/// Sends of one request before it times out.
const MAX_SENDS: u32 = 7;

/// True when `d` is a STUN success or error response (not a request, an indication, a
/// ChannelData message or a bare payload). Looks at the 20-byte header only, so it is cheap
/// enough for a receive loop's every datagram.
pub fn is_response(d: &[u8]) -> bool {
    if d.len() < 20 || d[0] & 0xC0 != 0 || d[4..8] != MAGIC_COOKIE {
        return false;
    }
    // Class bits C1 (0x0100) and C0 (0x0010) of the message type: 0b10 success, 0b11 error.
    u16::from_be_bytes([d[0], d[1]]) & 0x0100 != 0
}

/// What a transaction refreshes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// The allocation (Refresh, RFC 8656 §8).
    Allocation,
    /// The permission for the session's peer (CreatePermission, RFC 8656 §10).
    Permission,
    /// The channel binding to the session's peer (ChannelBind, RFC 8656 §12).
    Channel,
}

impl Kind {
    /// Lower-case name, as used in failure reasons.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Allocation => "allocation",
            Kind::Permission => "permission",
            Kind::Channel => "channel",
        }
    }

    fn method(self) -> Method {
        match self {
            Kind::Allocation => Method::REFRESH,
            Kind::Permission => Method::CREATE_PERMISSION,
            Kind::Channel => Method::CHANNEL_BIND,
        }
    }
}

/// How often each piece of state is refreshed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Intervals {
    /// Allocation refresh interval; `None`: half the LIFETIME the server last granted.
    pub allocation: Option<Duration>,
    /// Permission refresh interval (default 240 s, for the 300 s permission lifetime).
    pub permission: Duration,
    /// Channel binding refresh interval (default 480 s, for the 600 s channel lifetime).
    pub channel: Duration,
}

impl Default for Intervals {
    fn default() -> Self {
        Intervals { allocation: None, permission: Duration::from_secs(240), channel: Duration::from_secs(480) }
    }
}

/// The state one session holds and when it was last set up or refreshed.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// The LIFETIME the server granted the allocation, seconds (also the LIFETIME each Refresh
    /// asks for).
    pub lifetime: u32,
    /// When the allocation was made or last refreshed.
    pub allocated_at: Instant,
    /// The peer with a permission (and, with `channel`, a channel binding).
    pub peer: SocketAddr,
    /// When the permission was installed or last refreshed; `None`: no permission to keep.
    pub permitted_at: Option<Instant>,
    /// The channel number bound to `peer` and when it was bound; `None`: no channel.
    pub channel: Option<(u16, Instant)>,
}

/// Counters of a run's refresh transactions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RefreshStats {
    /// Allocation refreshes that succeeded.
    pub allocation: u64,
    /// Permission refreshes that succeeded.
    pub permission: u64,
    /// Channel binding refreshes that succeeded.
    pub channel: u64,
    /// Transactions that ended in anything but a success: an error response (a 438 only when
    /// its retry got another), a timeout, a success whose MESSAGE-INTEGRITY does not verify.
    pub failures: u64,
    /// `failures` by reason, e.g. `"permission: 403"`, `"allocation: timeout"`.
    pub failure_reasons: BTreeMap<String, u64>,
    /// 438 Stale Nonce answers seen (each retried once with the fresh nonce).
    pub stale_nonces: u64,
    /// Retransmitted requests.
    pub retransmits: u64,
}

struct Session {
    user: String,
    realm: String,
    key: IntegrityKey,
    nonce: Vec<u8>,
    peer: SocketAddr,
    channel: Option<u16>,
    lifetime: u32,
}

struct Pending {
    session: usize,
    kind: Kind,
    bytes: Vec<u8>,
    sends: u32,
    stale_retry: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Time to refresh this session's state of this kind.
    Due(usize, Kind),
    /// Time to (re)send this transaction, or to give up on it.
    Send([u8; 12]),
}

/// Schedules, builds and tracks the refresh transactions of many sessions (see the module
/// documentation).
pub struct Refresher {
    intervals: Intervals,
    sessions: Vec<Session>,
    pending: HashMap<[u8; 12], Pending>,
    timers: BinaryHeap<Reverse<(Instant, u64, Event)>>,
    seq: u64,
    stats: RefreshStats,
}

impl Refresher {
    /// An empty refresher with these intervals.
    pub fn new(intervals: Intervals) -> Refresher {
        Refresher {
            intervals,
            sessions: Vec::new(),
            pending: HashMap::new(),
            timers: BinaryHeap::new(),
            seq: 0,
            stats: RefreshStats::default(),
        }
    }

    /// Takes over refreshing the state in `plan` for `client`'s allocation (copying its
    /// username, realm, key and current nonce); returns the session's index, which
    /// [`poll`](Self::poll) passes to its send callback and [`on_response`](Self::on_response)
    /// expects. Indexes count from 0 in the order sessions are added.
    pub fn add(&mut self, client: &Client, plan: Plan) -> usize {
        let i = self.sessions.len();
        self.sessions.push(Session {
            user: client.user.clone(),
            realm: client.realm.clone(),
            key: client.key,
            nonce: client.nonce.clone(),
            peer: plan.peer,
            channel: plan.channel.map(|(c, _)| c),
            lifetime: plan.lifetime,
        });
        self.schedule(plan.allocated_at + self.interval(i, Kind::Allocation), Event::Due(i, Kind::Allocation));
        if let Some(at) = plan.permitted_at {
            self.schedule(at + self.interval(i, Kind::Permission), Event::Due(i, Kind::Permission));
        }
        if let Some((_, at)) = plan.channel {
            self.schedule(at + self.interval(i, Kind::Channel), Event::Due(i, Kind::Channel));
        }
        i
    }

    /// The counters so far.
    pub fn stats(&self) -> &RefreshStats {
        &self.stats
    }

    /// The nonce session `i` last learned (to hand back to its [`Client`]).
    pub fn nonce(&self, i: usize) -> &[u8] {
        &self.sessions[i].nonce
    }

    /// Requests outstanding (sent, no final answer yet).
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The earliest time something is scheduled, if anything is.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _, _))| *t)
    }

    /// Does everything due by `now`, sending at most `budget` datagrams (the rest waits for the
    /// next call, so a crowd of sessions due at once is spread over several calls): starts the
    /// refreshes that are due, retransmits, and gives up on requests that ran out of
    /// retransmissions. `send(session, datagram)` must send `datagram` from that session's
    /// client socket to the relay, without blocking; a datagram it drops is retransmitted
    /// later. Returns the number of datagrams handed to `send`.
    pub fn poll(&mut self, now: Instant, budget: usize, mut send: impl FnMut(usize, &[u8])) -> usize {
        let mut sent = 0;
        while sent < budget {
            match self.timers.peek() {
                Some(Reverse((t, _, _))) if *t <= now => {}
                _ => break,
            }
            let Some(Reverse((_, _, ev))) = self.timers.pop() else { break };
            match ev {
                Event::Due(i, kind) => self.start(now, i, kind, false),
                Event::Send(tid) => {
                    let Some(p) = self.pending.get_mut(&tid) else { continue };
                    if p.sends >= MAX_SENDS {
                        let (session, kind) = (p.session, p.kind);
                        self.pending.remove(&tid);
                        self.fail(now, session, kind, "timeout".into());
                        continue;
                    }
                    if p.sends > 0 {
                        self.stats.retransmits += 1;
                    }
                    let wait = (RTO * 2u32.pow(p.sends.min(4))).min(MAX_RTO);
                    p.sends += 1;
                    send(p.session, &p.bytes);
                    sent += 1;
                    self.schedule(now + wait, Event::Send(tid));
                }
            }
        }
        sent
    }

    /// Handles a STUN response that arrived on session `i`'s client socket at `now`. Responses
    /// to no outstanding transaction of that session (late duplicates, setup leftovers) are
    /// ignored. A 438 schedules the retry for the next [`poll`](Self::poll).
    pub fn on_response(&mut self, now: Instant, i: usize, datagram: &[u8]) {
        let Ok(m) = Message::parse(datagram) else { return };
        let tid = m.transaction_id().0;
        if !matches!(m.class(), Class::Success | Class::Error) || self.pending.get(&tid).is_none_or(|p| p.session != i)
        {
            return;
        }
        let Some(p) = self.pending.remove(&tid) else { return };
        let kind = p.kind;
        if m.method() != kind.method() {
            return self.fail(now, i, kind, format!("answered with {}", m.method().name()));
        }
        match m.class() {
            Class::Success => {
                let key = self.sessions[i].key;
                if !m.integrity_parts().is_some_and(|parts| integrity::verify(key.as_bytes(), &parts)) {
                    return self.fail(now, i, kind, "bad MESSAGE-INTEGRITY".into());
                }
                match kind {
                    Kind::Allocation => {
                        if let Some(Ok(l)) = m.u32_attr(attr::LIFETIME) {
                            self.sessions[i].lifetime = l;
                        }
                        self.stats.allocation += 1;
                    }
                    Kind::Permission => self.stats.permission += 1,
                    Kind::Channel => self.stats.channel += 1,
                }
                self.schedule(now + self.interval(i, kind), Event::Due(i, kind));
            }
            Class::Error => {
                let code = error_code(&m);
                if code == Some(438) {
                    self.stats.stale_nonces += 1;
                    if let Some(n) = m.nonce() {
                        self.sessions[i].nonce = n.to_vec();
                    }
                    if !p.stale_retry {
                        return self.start(now, i, kind, true);
                    }
                }
                let code = code.map_or_else(|| "error without ERROR-CODE".into(), |c| c.to_string());
                self.fail(now, i, kind, code);
            }
            Class::Request | Class::Indication => {}
        }
    }

    fn interval(&self, i: usize, kind: Kind) -> Duration {
        let d = match kind {
            Kind::Allocation => self
                .intervals
                .allocation
                .unwrap_or_else(|| Duration::from_millis(u64::from(self.sessions[i].lifetime) * 500)),
            Kind::Permission => self.intervals.permission,
            Kind::Channel => self.intervals.channel,
        };
        d.max(Duration::from_millis(100))
    }

    fn schedule(&mut self, at: Instant, ev: Event) {
        self.seq += 1;
        self.timers.push(Reverse((at, self.seq, ev)));
    }

    /// Builds a fresh transaction refreshing `kind` for session `i` and queues its first send.
    fn start(&mut self, now: Instant, i: usize, kind: Kind, stale_retry: bool) {
        let s = &self.sessions[i];
        let tid = TransactionId(rand::random());
        let (peer, channel, lifetime) = (s.peer, s.channel, s.lifetime);
        let bytes = build(kind.method(), Class::Request, tid, Some(s.key.as_bytes()), |w| {
            match kind {
                Kind::Allocation => {
                    w.u32(attr::LIFETIME, lifetime)?;
                }
                Kind::Permission => {
                    w.xor_address(attr::XOR_PEER_ADDRESS, &peer)?;
                }
                Kind::Channel => {
                    w.u32(attr::CHANNEL_NUMBER, u32::from(channel.unwrap_or(0)) << 16)?;
                    w.xor_address(attr::XOR_PEER_ADDRESS, &peer)?;
                }
            }
            w.bytes(attr::USERNAME, s.user.as_bytes())?;
            w.bytes(attr::REALM, s.realm.as_bytes())?;
            w.bytes(attr::NONCE, &s.nonce)?;
            Ok(())
        });
        self.pending.insert(tid.0, Pending { session: i, kind, bytes, sends: 0, stale_retry });
        self.schedule(now, Event::Send(tid.0));
    }

    fn fail(&mut self, now: Instant, i: usize, kind: Kind, reason: String) {
        self.stats.failures += 1;
        *self.stats.failure_reasons.entry(format!("{}: {reason}", kind.name())).or_default() += 1;
        let retry = (self.interval(i, kind) / 8).max(Duration::from_secs(1));
        self.schedule(now + retry, Event::Due(i, kind));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uturn_proto::wire::MessageWriter;

    fn answer(req: &[u8], class: Class, key: Option<&[u8]>, f: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
        let m = Message::parse(req).unwrap();
        build(m.method(), class, m.transaction_id(), key, |w| {
            f(w);
            Ok(())
        })
    }

    fn setup(intervals: Intervals) -> (Refresher, Client, Instant) {
        let c = Client::new("127.0.0.1:9".parse().unwrap(), "u", "p", "r");
        let mut r = Refresher::new(intervals);
        let t0 = Instant::now();
        let peer = "127.0.0.1:7".parse().unwrap();
        r.add(&c, Plan { lifetime: 10, allocated_at: t0, peer, permitted_at: Some(t0), channel: Some((0x4001, t0)) });
        (r, c, t0)
    }

    fn collect(r: &mut Refresher, now: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        r.poll(now, 100, |i, d| {
            assert_eq!(i, 0);
            out.push(d.to_vec());
        });
        out
    }

    #[test]
    fn schedules_at_the_intervals_and_counts_successes() {
        let iv = Intervals { allocation: None, permission: Duration::from_secs(2), channel: Duration::from_secs(3) };
        let (mut r, c, t0) = setup(iv);
        assert!(collect(&mut r, t0 + Duration::from_millis(1900)).is_empty());
        let sent = collect(&mut r, t0 + Duration::from_secs(2));
        assert_eq!(sent.len(), 1);
        assert_eq!(Message::parse(&sent[0]).unwrap().method(), Method::CREATE_PERMISSION);
        let t = t0 + Duration::from_secs(2);
        r.on_response(t, 0, &answer(&sent[0], Class::Success, Some(c.key.as_bytes()), |_| {}));
        assert_eq!((r.stats().permission, r.in_flight()), (1, 0));
        // Channel at 3 s, allocation at half of LIFETIME 10 = 5 s, permission again at 4 s.
        let sent = collect(&mut r, t0 + Duration::from_secs(5));
        let methods: Vec<_> = sent.iter().map(|d| Message::parse(d).unwrap().method()).collect();
        assert_eq!(methods, [Method::CHANNEL_BIND, Method::CREATE_PERMISSION, Method::REFRESH]);
        let lifetime = Message::parse(&sent[2]).unwrap().u32_attr(attr::LIFETIME).unwrap().unwrap();
        assert_eq!(lifetime, 10);
        r.on_response(
            t,
            0,
            &answer(&sent[2], Class::Success, Some(c.key.as_bytes()), |w| {
                w.u32(attr::LIFETIME, 4).unwrap();
            }),
        );
        assert_eq!(r.stats().allocation, 1);
        assert_eq!(r.sessions[0].lifetime, 4, "the granted LIFETIME sets the next interval");
    }

    #[test]
    fn stale_nonce_is_learned_and_retried_once() {
        let iv = Intervals { allocation: Some(Duration::from_secs(1)), ..Intervals::default() };
        let (mut r, c, t0) = setup(iv);
        let t = t0 + Duration::from_secs(1);
        let sent = collect(&mut r, t);
        assert_eq!(sent.len(), 1);
        let stale = |req: &[u8], nonce: &[u8]| {
            answer(req, Class::Error, None, |w| {
                w.error_code(438, "Stale Nonce").unwrap();
                w.bytes(attr::REALM, b"r").unwrap();
                w.bytes(attr::NONCE, nonce).unwrap();
            })
        };
        r.on_response(t, 0, &stale(&sent[0], b"fresh-nonce"));
        let retry = collect(&mut r, t);
        assert_eq!(retry.len(), 1);
        let m = Message::parse(&retry[0]).unwrap();
        assert_eq!(m.nonce(), Some(&b"fresh-nonce"[..]));
        assert_ne!(m.transaction_id(), Message::parse(&sent[0]).unwrap().transaction_id());
        assert_eq!(r.stats().failures, 0);
        // A second 438 for the retry is a failure.
        r.on_response(t, 0, &stale(&retry[0], b"newer"));
        assert_eq!((r.stats().failures, r.stats().stale_nonces), (1, 2));
        assert!(collect(&mut r, t).is_empty());
        let _ = c;
    }

    #[test]
    fn retransmits_then_times_out() {
        let iv = Intervals { allocation: Some(Duration::from_secs(100)), ..Intervals::default() };
        let (mut r, _c, t0) = setup(iv);
        let mut t = t0 + Duration::from_secs(100);
        let mut sends = 0;
        for _ in 0..40 {
            sends += collect(&mut r, t).len();
            t += Duration::from_millis(500);
        }
        assert_eq!(sends, MAX_SENDS as usize);
        assert_eq!(r.stats().retransmits, u64::from(MAX_SENDS) - 1);
        assert_eq!(r.stats().failure_reasons.get("allocation: timeout"), Some(&1));
    }

    #[test]
    fn responses_are_told_from_data() {
        let c = Client::new("127.0.0.1:9".parse().unwrap(), "u", "p", "r");
        let req = c.signed_request(Method::REFRESH, TransactionId([1; 12]), |_| Ok(()));
        assert!(!is_response(&req));
        assert!(is_response(&answer(&req, Class::Success, None, |_| {})));
        assert!(is_response(&answer(&req, Class::Error, None, |_| {})));
        let ind = build(Method::DATA, Class::Indication, TransactionId([2; 12]), None, |_| Ok(()));
        assert!(!is_response(&ind));
        assert!(!is_response(&[0x40, 0x01, 0, 4, 1, 2, 3, 4]));
    }
}
