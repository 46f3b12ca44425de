//! Usage records for billing and audit: one [`UsageRecord`] per allocation at its end, and, with
//! `usage-interval`, interim records while it lives. They go to a Redis stream (`XADD` capped
//! with `MAXLEN ~`, when `fleet-redis` is set) and/or to a JSON-lines file (`usage-file`).
//!
//! The control thread only builds a record and offers it to a bounded queue
//! ([`QUEUE`] records; a full queue drops it, counted). The writer thread ([`writer`]) owns the
//! Redis connection and the file; while Redis is unreachable its records wait in a bounded buffer
//! ([`PENDING_MAX`]; the oldest are dropped, counted) and are written once it answers again.
//! Nothing here is on the packet path: the workers report an allocation's totals with its end
//! (`FromWorker::Released`), and the interim totals come from the same per-allocation counters
//! that `GET /sessions` shows.

mod writer;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::{Deserialize, Serialize};
use tracing::warn;
use uturn_proto::relay::{Ended, SessionInfo, Traffic, Transport};

/// Records the control thread may queue for the writer before it drops more.
pub const QUEUE: usize = 16_384;
/// Records the writer keeps while its destination is unreachable before it drops the oldest.
pub const PENDING_MAX: usize = 100_000;
/// Default stream key.
pub const DEFAULT_STREAM: &str = "uturn:usage";
/// Default `usage-stream-maxlen`: entries the stream keeps (approximately, `MAXLEN ~`).
pub const DEFAULT_MAXLEN: u64 = 1_000_000;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds since the Unix epoch at `at` (an instant of this process, in the past).
pub fn instant_ms(at: Instant) -> u64 {
    now_ms().saturating_sub(Instant::now().saturating_duration_since(at).as_millis() as u64)
}

/// Whether a record closes its allocation's account or reports it while it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The allocation ended: its totals are final.
    Final,
    /// The allocation lives: totals so far (cumulative since its start).
    Interim,
}

/// One usage record. Times are Unix milliseconds (UTC); packets and bytes count application
/// data (ChannelData or DATA payloads, without TURN headers), cumulative since the start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// `final` or `interim`.
    pub kind: Kind,
    /// The node (`node-id`).
    pub node: String,
    /// The session id (as in logs and the admin API); unique per node.
    pub session: u64,
    /// The authenticated username.
    pub user: String,
    /// The client's transport: `udp`, `tcp` or `tls`.
    pub transport: String,
    /// The client's transport address.
    pub client: SocketAddr,
    /// The server transport address the client used.
    pub server: SocketAddr,
    /// The relayed transport address (as advertised, `external-ip` applied).
    pub relayed: SocketAddr,
    /// A dual allocation's second relayed transport address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional: Option<SocketAddr>,
    /// When the allocation was granted, Unix ms.
    pub start_ms: u64,
    /// When it ended (`final`), or when these totals were read (`interim`), Unix ms.
    pub end_ms: u64,
    /// Why it ended (`final` only): expired, deleted, revoked, shutdown, connection closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Datagrams relayed from the client to peers.
    pub packets_to_peer: u64,
    /// Payload bytes relayed from the client to peers.
    pub bytes_to_peer: u64,
    /// Datagrams relayed from peers to the client.
    pub packets_to_client: u64,
    /// Payload bytes relayed from peers to the client.
    pub bytes_to_client: u64,
}

impl UsageRecord {
    /// The record as Redis stream fields (name, text value), in a fixed order.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("kind", if self.kind == Kind::Final { "final" } else { "interim" }.to_string()),
            ("node", self.node.clone()),
            ("session", self.session.to_string()),
            ("user", self.user.clone()),
            ("transport", self.transport.clone()),
            ("client", self.client.to_string()),
            ("server", self.server.to_string()),
            ("relayed", self.relayed.to_string()),
        ];
        if let Some(a) = self.additional {
            f.push(("additional", a.to_string()));
        }
        f.push(("start_ms", self.start_ms.to_string()));
        f.push(("end_ms", self.end_ms.to_string()));
        if let Some(r) = &self.reason {
            f.push(("reason", r.clone()));
        }
        f.extend([
            ("packets_to_peer", self.packets_to_peer.to_string()),
            ("bytes_to_peer", self.bytes_to_peer.to_string()),
            ("packets_to_client", self.packets_to_client.to_string()),
            ("bytes_to_client", self.bytes_to_client.to_string()),
        ]);
        f
    }

    fn set_traffic(&mut self, to_peer: Traffic, to_client: Traffic) {
        self.packets_to_peer = to_peer.packets;
        self.bytes_to_peer = to_peer.bytes;
        self.packets_to_client = to_client.packets;
        self.bytes_to_client = to_client.bytes;
    }
}

/// Where usage records go and how often interim records are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageConfig {
    /// This node's name (`node-id`).
    pub node: String,
    /// The Redis URL (`fleet-redis`) when records go to a stream.
    pub redis: Option<String>,
    /// The stream key (`usage-stream`, default [`DEFAULT_STREAM`]).
    pub stream: String,
    /// Entries the stream keeps, approximately (`usage-stream-maxlen`, `XADD … MAXLEN ~ N`).
    pub maxlen: u64,
    /// The JSON-lines file records are appended to (`usage-file`).
    pub file: Option<PathBuf>,
    /// Interim records every this long while an allocation lives (`usage-interval`, seconds;
    /// `None`: only final records).
    pub interval: Option<Duration>,
    /// Relay addresses behind a 1:1 NAT (`external-ip`): records name the advertised one.
    pub external_ips: Vec<(IpAddr, IpAddr)>,
}

impl UsageConfig {
    /// True when records go anywhere.
    pub fn enabled(&self) -> bool {
        self.redis.is_some() || self.file.is_some()
    }
}

/// The writer's counters, shown by the metrics endpoint.
#[derive(Debug, Default)]
pub struct UsageCounters {
    /// Records written to the Redis stream.
    pub written_redis: AtomicU64,
    /// Records written to the file.
    pub written_file: AtomicU64,
    /// Records lost: the queue was full, the buffer overflowed, a write failed for good, or the
    /// process exited before Redis answered.
    pub dropped: AtomicU64,
    /// Records queued or buffered, not yet written everywhere.
    pub pending: AtomicU64,
}

/// What the control thread sends the writer.
enum Msg {
    Record(Box<UsageRecord>),
    /// Interim records: the workers answer on `replies` (`workers` of them); `starts` gives
    /// each live session's start (Unix ms) and transport.
    Interim {
        starts: HashMap<u64, (u64, Transport)>,
        replies: Receiver<(usize, Vec<SessionInfo>)>,
        workers: usize,
    },
    /// Queue these for the stream again (taken for a hot upgrade that failed).
    Requeue(Vec<UsageRecord>),
    /// Hand every record not yet written over (a hot upgrade passes them to the next process).
    Take(Sender<Vec<UsageRecord>>),
    /// Write what is pending (until the deadline), then end.
    Stop(Instant),
}

/// The control thread's handle on the writer thread.
pub struct Usage {
    config: UsageConfig,
    tx: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    /// The counters the metrics endpoint shows.
    pub counters: Arc<UsageCounters>,
    next_interim: Option<Instant>,
}

impl Usage {
    /// Starts the writer thread, seeded with `inherited` records for the stream (those the
    /// previous process of a hot upgrade had not written to it); `None` when records go
    /// nowhere.
    pub fn start(config: UsageConfig, counters: Arc<UsageCounters>, inherited: Vec<UsageRecord>) -> Option<Usage> {
        if !config.enabled() {
            return None;
        }
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let w = writer::Writer::new(config.clone(), counters.clone(), inherited);
        let thread = match std::thread::Builder::new().name("uturn-usage".into()).spawn(move || w.run(rx)) {
            Ok(t) => t,
            Err(e) => {
                warn!("usage records off: cannot start their writer thread: {e}");
                return None;
            }
        };
        let next_interim = config.interval.map(|i| Instant::now() + i);
        Some(Usage { config, tx, thread: Some(thread), counters, next_interim })
    }

    fn offer(&self, msg: Msg) {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(Msg::Record(_))) | Err(TrySendError::Disconnected(Msg::Record(_))) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                self.counters.pending.fetch_sub(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }

    /// Queues the final record of `e` (an allocation a worker reported ended), owned by `user`
    /// since `start_ms` (from the control plane's record; `None` when it had none).
    pub fn ended(&self, e: &Ended, owner: Option<(Arc<str>, u64)>) {
        let (user, start_ms) = match owner {
            Some((u, s)) => (u.to_string(), s),
            None => (String::new(), instant_ms(e.created)),
        };
        let mut r = UsageRecord {
            kind: Kind::Final,
            node: self.config.node.clone(),
            session: e.session,
            user,
            transport: e.five_tuple.transport.to_string(),
            client: e.five_tuple.client,
            server: e.five_tuple.server,
            relayed: advertised(&self.config.external_ips, e.relayed),
            additional: e.additional.map(|a| advertised(&self.config.external_ips, a)),
            start_ms,
            end_ms: now_ms(),
            reason: Some(e.reason.name().to_string()),
            packets_to_peer: 0,
            bytes_to_peer: 0,
            packets_to_client: 0,
            bytes_to_client: 0,
        };
        r.set_traffic(e.to_peer, e.to_client);
        self.counters.pending.fetch_add(1, Ordering::Relaxed);
        self.offer(Msg::Record(Box::new(r)));
    }

    /// True when interim records are due at `now` (and schedules the next round).
    pub fn interim_due(&mut self, now: Instant) -> bool {
        match (self.next_interim, self.config.interval) {
            (Some(t), Some(i)) if now >= t => {
                self.next_interim = Some(now + i);
                true
            }
            _ => false,
        }
    }

    /// Queues a round of interim records: `workers` workers answer on `replies`; `starts` maps
    /// each live session to its start and transport.
    pub fn interim(
        &self,
        starts: HashMap<u64, (u64, Transport)>,
        replies: Receiver<(usize, Vec<SessionInfo>)>,
        workers: usize,
    ) {
        self.offer(Msg::Interim { starts, replies, workers });
    }

    /// The records not yet written, taken from the writer (waits at most `limit`; what the
    /// writer has not handed over by then it writes itself before it exits).
    pub fn take_pending(&self, limit: Duration) -> Vec<UsageRecord> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send_timeout(Msg::Take(tx), limit).is_err() {
            return Vec::new();
        }
        rx.recv_timeout(limit).unwrap_or_default()
    }

    /// Queues `records` again (taken for a hot upgrade that then failed).
    pub fn restore(&self, records: Vec<UsageRecord>) {
        if !records.is_empty() {
            let n = records.len() as u64;
            if self.tx.send_timeout(Msg::Requeue(records), Duration::from_secs(1)).is_err() {
                self.counters.dropped.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Writes what is queued (for at most `limit`), then stops the writer. What is still
    /// unwritten then is counted as dropped and logged.
    pub fn finish(mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        if self.tx.send_deadline(Msg::Stop(deadline), deadline).is_err() {
            warn!("usage records: the writer did not take the stop in time");
        }
        if let Some(t) = self.thread.take() {
            while !t.is_finished() && Instant::now() < deadline + Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        let left = self.counters.pending.load(Ordering::Relaxed);
        if left > 0 {
            warn!(records = left, "usage records not written before exit");
        }
    }
}

/// The address `bound` is advertised as (`external-ip`).
fn advertised(external: &[(IpAddr, IpAddr)], bound: SocketAddr) -> SocketAddr {
    match external.iter().find(|(private, _)| *private == bound.ip()) {
        Some((_, public)) => SocketAddr::new(*public, bound.port()),
        None => bound,
    }
}

/// Interim records from the workers' session lists: one per session found in `starts`.
fn interim_records(
    config: &UsageConfig,
    starts: &HashMap<u64, (u64, Transport)>,
    sessions: Vec<SessionInfo>,
    at_ms: u64,
) -> Vec<UsageRecord> {
    sessions
        .into_iter()
        .filter_map(|s| {
            let (start_ms, transport) = *starts.get(&s.id)?;
            let mut r = UsageRecord {
                kind: Kind::Interim,
                node: config.node.clone(),
                session: s.id,
                user: s.user,
                transport: transport.to_string(),
                client: s.client,
                server: s.server,
                relayed: advertised(&config.external_ips, s.relayed),
                additional: s.additional.map(|a| advertised(&config.external_ips, a)),
                start_ms,
                end_ms: at_ms,
                reason: None,
                packets_to_peer: 0,
                bytes_to_peer: 0,
                packets_to_client: 0,
                bytes_to_client: 0,
            };
            r.set_traffic(s.to_peer, s.to_client);
            Some(r)
        })
        .collect()
}

#[cfg(test)]
mod tests;
