//! `uturn trace`, the relay's side: the tracer thread that drains the workers' trace tap
//! ([`uturn_dataplane::trace`]), decodes what each active trace matches, flags the patterns
//! operators hunt for ([`analysis`]) and streams it as JSON lines to the admin endpoint's
//! `GET /trace` clients.
//!
//! Bounds: at most [`MAX_TRACES`] traces at once (the next one hears 429), each at most
//! [`MAX_RATE`] messages a second (its `rate`; the rest are counted, not sent), each for at most
//! its `max_s` seconds ([`MAX_DURATION`]); the tap's queue is bounded ([`uturn_dataplane::trace::TAP_QUEUE`],
//! drops counted) and each client's stream too ([`STREAM_QUEUE`] lines; a slow reader loses
//! lines, counted). The tracer thread starts with the first trace and stops with the last one.

pub mod analysis;
pub mod decode;
pub mod pcap;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use hyper::body::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{info, warn};
use uturn_dataplane::trace::{user_matches, Tap, TapEvent, TapFilter};
use uturn_proto::FiveTuple;

use analysis::Analysis;

/// Traces active at once, at most (the next `GET /trace` hears 429).
pub const MAX_TRACES: usize = 4;
/// Messages a second one trace streams at most; a trace may ask for fewer (`rate=`).
pub const MAX_RATE: u32 = 1000;
/// Messages a second a trace streams unless it asks otherwise.
pub const DEFAULT_RATE: u32 = 200;
/// The longest a trace lasts (`max_s=`, default and cap).
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Payload bytes of relayed data a trace may ask to see (`snaplen=`), at most.
pub const MAX_SNAPLEN: usize = 1500;
/// JSON lines queued for one client at most; past it lines are dropped and counted.
pub const STREAM_QUEUE: usize = 1024;
/// How long an Allocate exchange of a 5-tuple nobody claimed yet waits for its user (a user
/// trace attributes it when the authenticated request comes).
const PENDING_FOR: Duration = Duration::from_secs(10);
/// Unattributed events kept at most.
const MAX_PENDING: usize = 4096;

/// What a trace follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every allocation of this user (a REST username `EXPIRY:NAME` matches `NAME`).
    User(String),
    /// The allocation with this session id.
    Session(u64),
    /// Every 5-tuple of this client IP (and port).
    Client(IpAddr, Option<u16>),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::User(u) => write!(f, "user={u}"),
            Target::Session(s) => write!(f, "session={s}"),
            Target::Client(ip, Some(p)) => write!(f, "client={}", std::net::SocketAddr::new(*ip, *p)),
            Target::Client(ip, None) => write!(f, "client={ip}"),
        }
    }
}

/// A trace as asked for.
#[derive(Debug, Clone)]
pub struct TraceSpec {
    /// What it follows.
    pub target: Target,
    /// Messages a second at most (1..=[`MAX_RATE`]).
    pub rate: u32,
    /// How long it lasts at most.
    pub max: Duration,
    /// Payload bytes of relayed datagrams to copy (0: headers only).
    pub snaplen: usize,
}

impl TraceSpec {
    /// Parses a `GET /trace` query: exactly one of `user=NAME`, `session=ID`,
    /// `client=IP[:PORT]`, plus optional `rate=N`, `max_s=N`, `snaplen=N` (each capped).
    /// Errors: a sentence for the 400 answer.
    pub fn from_query(query: &str) -> Result<TraceSpec, String> {
        let mut target = None;
        let mut spec = TraceSpec { target: Target::Session(0), rate: DEFAULT_RATE, max: MAX_DURATION, snaplen: 0 };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = crate::admin_api::percent_decode(&v.replace('+', " ")).ok_or(format!("bad value for {k}"))?;
            let number = |max: u64| v.parse::<u64>().ok().filter(|n| *n > 0).map(|n| n.min(max));
            let t = match k {
                "user" => Some(Target::User(v.clone())),
                "session" => Some(Target::Session(v.parse().map_err(|_| "bad session id")?)),
                "client" => Some(match v.parse::<std::net::SocketAddr>() {
                    Ok(a) => Target::Client(a.ip(), Some(a.port())),
                    Err(_) => Target::Client(v.parse().map_err(|_| "client must be IP or IP:PORT")?, None),
                }),
                "rate" => {
                    spec.rate = number(MAX_RATE as u64).ok_or("rate must be a positive number")? as u32;
                    None
                }
                "max_s" => {
                    spec.max =
                        Duration::from_secs(number(MAX_DURATION.as_secs()).ok_or("max_s must be a positive number")?);
                    None
                }
                "snaplen" => {
                    spec.snaplen = v.parse::<usize>().map_err(|_| "snaplen must be a number")?.min(MAX_SNAPLEN);
                    None
                }
                _ => return Err(format!("unknown parameter {k}")),
            };
            if let Some(t) = t {
                if target.replace(t).is_some() {
                    return Err("give exactly one of user, session, client".into());
                }
            }
        }
        spec.target = target.ok_or("give one of user=NAME, session=ID, client=IP[:PORT]")?;
        Ok(spec)
    }
}

/// Why a trace was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartError {
    /// [`MAX_TRACES`] are active (429).
    TooMany,
}

/// Traces active or starting (the cap is checked against it).
static ACTIVE_TRACES: AtomicUsize = AtomicUsize::new(0);
/// The tracer thread's inbox, while it runs.
static INBOX: Mutex<Option<Sender<Trace>>> = Mutex::new(None);

/// Starts a trace: its JSON lines arrive on the receiver until the trace ends (its `max`, or
/// the receiver dropped). Errors: [`StartError::TooMany`].
pub fn start(spec: TraceSpec) -> Result<mpsc::Receiver<Bytes>, StartError> {
    let taken = ACTIVE_TRACES.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_TRACES).then_some(n + 1));
    if taken.is_err() {
        return Err(StartError::TooMany);
    }
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let trace = Trace::new(spec, tx);
    let mut inbox = INBOX.lock().unwrap_or_else(|e| e.into_inner());
    let sent = match inbox.as_ref() {
        Some(s) => s.send(trace).map_err(|e| e.0),
        None => Err(trace),
    };
    if let Err(trace) = sent {
        // No tracer thread (the first trace, or the last one just ended): start one.
        let (s, r) = crossbeam_channel::unbounded();
        let _ = s.send(trace);
        match std::thread::Builder::new().name("uturn-tracer".into()).spawn(move || run(r)) {
            Ok(_) => *inbox = Some(s),
            Err(e) => {
                warn!("trace: the tracer thread could not start: {e}");
                ACTIVE_TRACES.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
    Ok(rx)
}

/// Traces active now.
pub fn active() -> usize {
    ACTIVE_TRACES.load(Ordering::Acquire)
}

/// One active trace.
struct Trace {
    id: u64,
    spec: TraceSpec,
    tx: mpsc::Sender<Bytes>,
    deadline: Instant,
    /// Messages sent in the current second, and that second's start.
    sent: u32,
    second: Instant,
    /// Messages not sent: over the rate cap, and lost to a slow reader.
    suppressed: u64,
    slow: u64,
    /// 5-tuples a user trace attributed to its user from their USERNAME.
    claimed: Vec<FiveTuple>,
    analysis: Analysis,
    closed: bool,
}

impl Trace {
    fn new(spec: TraceSpec, tx: mpsc::Sender<Bytes>) -> Trace {
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        let now = Instant::now();
        Trace {
            id: NEXT.fetch_add(1, Ordering::Relaxed) as u64,
            deadline: now + spec.max,
            spec,
            tx,
            sent: 0,
            second: now,
            suppressed: 0,
            slow: 0,
            claimed: Vec::new(),
            analysis: Analysis::default(),
            closed: false,
        }
    }

    /// True when `ev` (attributed, not pending) is this trace's.
    fn matches(&self, ev: &TapEvent) -> bool {
        let ft = &ev.five_tuple;
        match &self.spec.target {
            Target::User(u) => ev.user.as_deref().is_some_and(|x| user_matches(x, u)) || self.claimed.contains(ft),
            Target::Session(s) => ev.session == *s,
            Target::Client(ip, port) => ft.client.ip() == *ip && port.is_none_or(|p| p == ft.client.port()),
        }
    }

    /// Sends one line (uncapped: control lines); false once the client is gone.
    fn line(&mut self, v: &Value) -> bool {
        let mut s = v.to_string();
        s.push('\n');
        match self.tx.try_send(Bytes::from(s)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.slow += 1;
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.closed = true;
                false
            }
        }
    }

    /// Handles one of its events: analysis (always), then the message line within the rate cap,
    /// then any flag it raised.
    fn event(&mut self, ev: &TapEvent, now: Instant) {
        let (line, flags) = self.analysis.event(ev, now);
        if now.duration_since(self.second) >= Duration::from_secs(1) {
            self.second = now;
            self.sent = 0;
        }
        if self.sent < self.spec.rate {
            self.sent += 1;
            self.line(&line);
        } else {
            self.suppressed += 1;
        }
        for f in flags {
            self.line(&f);
        }
    }

    /// Once a second: traffic per permission/channel, flags due, counts of what was not sent.
    fn tick(&mut self, now: Instant) {
        let lines = self.analysis.tick(now);
        for l in lines {
            self.line(&l);
        }
        let tick = json!({
            "type": "tick",
            "ts": unix_now(),
            "suppressed": self.suppressed,
            "slow_reader_dropped": self.slow,
            "tap_dropped": Tap::get().dropped(),
        });
        self.line(&tick);
    }
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> f64 {
    unix(SystemTime::now())
}

/// Seconds since the Unix epoch.
fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The union of the traces' filters, for the workers.
fn union(traces: &[Trace]) -> Option<TapFilter> {
    if traces.is_empty() {
        return None;
    }
    let mut f = TapFilter::default();
    for t in traces {
        match &t.spec.target {
            Target::User(u) => f.users.push(u.clone()),
            Target::Session(s) => f.sessions.push(*s),
            Target::Client(ip, p) => f.clients.push((*ip, *p)),
        }
        f.snaplen = f.snaplen.max(t.spec.snaplen);
    }
    Some(f)
}

/// Unattributed Allocate exchanges, by 5-tuple, for user traces.
#[derive(Default)]
struct Pending {
    by_tuple: HashMap<FiveTuple, Vec<(Instant, TapEvent)>>,
    count: usize,
}

impl Pending {
    fn push(&mut self, now: Instant, ev: TapEvent) {
        if self.count >= MAX_PENDING {
            self.expire(now);
            if self.count >= MAX_PENDING {
                return;
            }
        }
        self.count += 1;
        self.by_tuple.entry(ev.five_tuple).or_default().push((now, ev));
    }

    fn take(&mut self, ft: &FiveTuple) -> Vec<TapEvent> {
        let v = self.by_tuple.remove(ft).unwrap_or_default();
        self.count -= v.len();
        v.into_iter().map(|(_, e)| e).collect()
    }

    fn expire(&mut self, now: Instant) {
        self.by_tuple.retain(|_, v| {
            v.retain(|(t, _)| now.duration_since(*t) < PENDING_FOR);
            !v.is_empty()
        });
        self.count = self.by_tuple.values().map(Vec::len).sum();
    }
}

/// The tracer thread: drains the tap, dispatches, ticks each second; ends with the last trace.
fn run(inbox: Receiver<Trace>) {
    let tap = Tap::get();
    let mut traces: Vec<Trace> = Vec::new();
    let mut pending = Pending::default();
    let mut next_tick = Instant::now() + Duration::from_secs(1);
    loop {
        let mut changed = false;
        while let Ok(t) = inbox.try_recv() {
            info!(trace = t.id, target = %t.spec.target, rate = t.spec.rate, "trace started");
            let hello = json!({
                "type": "start",
                "trace": t.id,
                "target": t.spec.target.to_string(),
                "rate": t.spec.rate,
                "max_s": t.spec.max.as_secs(),
                "snaplen": t.spec.snaplen,
                "ts": unix_now(),
            });
            traces.push(t);
            changed = true;
            // The filter is installed before the client hears that the trace runs.
            tap.set_filter(union(&traces));
            if let Some(t) = traces.last_mut() {
                t.line(&hello);
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + Duration::from_secs(1);
            pending.expire(now);
            for t in &mut traces {
                if now >= t.deadline {
                    t.line(&json!({"type": "end", "reason": "max duration reached", "ts": unix_now()}));
                    t.closed = true;
                } else {
                    t.tick(now);
                }
            }
        }
        let before = traces.len();
        traces.retain(|t| {
            if t.closed {
                info!(trace = t.id, target = %t.spec.target, suppressed = t.suppressed, "trace ended");
            }
            !t.closed
        });
        let ended = before - traces.len();
        if ended > 0 || changed {
            ACTIVE_TRACES.fetch_sub(ended, Ordering::AcqRel);
            if traces.is_empty() {
                // Stop unless a trace is starting: then it is already in the inbox.
                let mut inbox_slot = INBOX.lock().unwrap_or_else(|e| e.into_inner());
                if inbox.is_empty() {
                    tap.set_filter(None);
                    *inbox_slot = None;
                    while tap.receiver().try_recv().is_ok() {}
                    return;
                }
            } else {
                tap.set_filter(union(&traces));
            }
        }
        let wait = next_tick.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
        match tap.receiver().recv_timeout(wait) {
            Ok(ev) => {
                dispatch(&mut traces, &mut pending, ev);
                // Take what else is queued, up to a bound, before looking at the inbox again.
                for _ in 0..1024 {
                    match tap.receiver().try_recv() {
                        Ok(ev) => dispatch(&mut traces, &mut pending, ev),
                        Err(_) => break,
                    }
                }
            }
            Err(_) => continue,
        }
    }
}

/// Hands `ev` to the traces it belongs to (a pending one to the user trace its USERNAME names,
/// with what waited for it, or to the pending store).
fn dispatch(traces: &mut [Trace], pending: &mut Pending, ev: TapEvent) {
    let now = Instant::now();
    if ev.pending {
        let name = decode::stun(&ev.bytes).and_then(|d| d.username);
        let mut taken = false;
        for t in traces.iter_mut() {
            let claims = match (&t.spec.target, &name) {
                (Target::User(u), Some(n)) => user_matches(n, u),
                _ => false,
            };
            if claims && !t.claimed.contains(&ev.five_tuple) {
                t.claimed.push(ev.five_tuple);
                if t.claimed.len() > 256 {
                    t.claimed.remove(0);
                }
            }
            if claims || t.matches(&ev) {
                if !taken {
                    for old in pending.take(&ev.five_tuple) {
                        t.event(&old, now);
                    }
                }
                taken = true;
                t.event(&ev, now);
            }
        }
        if !taken {
            pending.push(now, ev);
        }
        return;
    }
    let mut backlog: Option<Vec<TapEvent>> = None;
    for t in traces.iter_mut() {
        if t.matches(&ev) {
            if matches!(t.spec.target, Target::User(_)) {
                let old = backlog.get_or_insert_with(|| pending.take(&ev.five_tuple));
                for o in old.iter() {
                    t.event(o, now);
                }
            }
            t.event(&ev, now);
        }
    }
}
