//! TURN over TCP and TLS (RFC 8656 §3.1): a worker's client connections.
//!
//! Each worker has its own SO_REUSEPORT TCP listener per `tcp://` / `tls://` listen address, so
//! the kernel spreads connections over the workers as it spreads UDP 5-tuples, and a connection
//! is served start to end by the worker that accepted it: its 5-tuple (with transport `tcp` or
//! `tls`), its allocation and that allocation's relay socket live on one core. The relayed side
//! stays UDP. [`Streams`] holds the connections by [`ConnId`]; the backends move bytes, the
//! worker core ([`crate::core`]) frames them (`uturn_proto::wire::stream`) and feeds each
//! message to the same state machine as a UDP datagram.
//!
//! Abuse limits ([`StreamLimits`], docs/security.md): connections per source (an IPv4 address or
//! an IPv6 /64, counted across the workers) and in total, new connections per second per source,
//! a TLS handshake deadline, a deadline for a message once its first byte arrived (slowloris), an
//! idle timeout for connections without an allocation (reset only by traffic that proves the
//! connection in use), a bounded write queue per connection whose stalled reader is
//! disconnected, and a backoff of accepts while the process is out of descriptors.

pub(crate) mod conn;
pub(crate) mod tls;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use uturn_proto::ratelimit::{SourceKey, SourceLimiter};
use uturn_proto::response::{self, ErrorCode};
use uturn_proto::wire::{Class, Message};
use uturn_proto::{FiveTuple, Transport};

pub(crate) use conn::{CloseReason, Connection, Role};

use crate::proxy::{ProxyCounters, ProxyProtocol, Refusal};

/// Limits on client connections (TURN over TCP and TLS).
#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// Connections open at once on the whole relay (all workers share the count).
    pub max_connections: usize,
    /// Connections open at once from one source, on the whole relay: an IPv4 address, or an
    /// IPv6 /64 (keyed as the per-source request budget keys sources). Counted in a table
    /// shared by the workers ([`ConnectionCount`]); sources whose keys share a slot share the
    /// count, which only makes the cap stricter.
    pub max_per_source: usize,
    /// New connections per second (and burst) from one source, keyed like `max_per_source`;
    /// each worker enforces its share ([`per_worker`](Self::per_worker), as the request budget
    /// is shared). Beyond it a connection is closed at accept, before any TLS handshake (whose
    /// CPU cost it bounds). 0 disables it.
    pub connection_rate: u32,
    /// Longest a TLS handshake may take, from accept.
    pub handshake_timeout: Duration,
    /// Longest a message may take to arrive once its first byte has (slowloris).
    pub frame_timeout: Duration,
    /// Longest a connection without an allocation may stay open without a whole message.
    pub idle_timeout: Duration,
    /// Bytes that may wait to be written to one connection; relayed data beyond it is dropped.
    pub write_queue: usize,
    /// Longest bytes may wait to be written with none written: the reader has stalled and the
    /// connection is closed.
    pub stall_timeout: Duration,
}

impl StreamLimits {
    /// The limits one of `workers` workers applies: its share of `connection_rate`
    /// (rounded up); the rest are relay-wide.
    pub fn per_worker(&self, workers: usize) -> StreamLimits {
        let connection_rate = self.connection_rate.div_ceil(workers.max(1) as u32);
        StreamLimits { connection_rate, ..self.clone() }
    }
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_connections: 10_000,
            max_per_source: 64,
            connection_rate: 100,
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            write_queue: 256 * 1024,
            stall_timeout: Duration::from_secs(10),
        }
    }
}

/// Slots of the per-source connection table (a power of two): 64 KiB of counters.
pub(crate) const SOURCE_SLOTS: usize = 16 * 1024;

/// Connections open on the whole relay, in total and per source, shared by the workers: one
/// atomic total and a fixed table of [`SOURCE_SLOTS`] atomic counters indexed by a keyed hash
/// (SipHash, keyed from the OS random source once per process) of the source's [`SourceKey`]
/// (IPv4 address, IPv6 /64). Touched only on accept and close, never on the packet path.
///
/// Sources whose keys land in one slot share its count: a collision can only refuse a
/// connection earlier, never admit one past the cap. With the key secret an attacker cannot aim
/// at a victim's slot; one holding `n` full slots refuses about `n / SOURCE_SLOTS` of other sources.
#[derive(Debug, Clone)]
pub struct ConnectionCount(Arc<SharedCount>);

#[derive(Debug)]
struct SharedCount {
    total: AtomicUsize,
    per_source: Box<[AtomicU32]>,
    hasher: RandomState,
}

impl Default for ConnectionCount {
    fn default() -> Self {
        ConnectionCount(Arc::new(SharedCount {
            total: AtomicUsize::new(0),
            per_source: (0..SOURCE_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            hasher: RandomState::new(),
        }))
    }
}

impl ConnectionCount {
    /// Connections open now.
    pub fn get(&self) -> usize {
        self.0.total.load(Ordering::Relaxed)
    }

    fn slot(&self, ip: IpAddr) -> &AtomicU32 {
        let h = self.0.hasher.hash_one(SourceKey::of(ip)) as usize;
        &self.0.per_source[h & (SOURCE_SLOTS - 1)]
    }

    /// Counts one more connection from `ip` unless its source holds `max` already; false when
    /// refused (nothing counted).
    pub(crate) fn try_add_source(&self, ip: IpAddr, max: usize) -> bool {
        let max = max.min(u32::MAX as usize) as u32;
        self.slot(ip).fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).is_ok()
    }

    /// Uncounts a connection from `ip` that [`try_add_source`](Self::try_add_source) counted.
    pub(crate) fn remove_source(&self, ip: IpAddr) {
        let _ = self.slot(ip).fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Connections counted now for `ip`'s source (and any source sharing its slot).
    pub fn from_source(&self, ip: IpAddr) -> usize {
        self.slot(ip).load(Ordering::Relaxed) as usize
    }

    /// Takes one slot of `max` (RFC 6062: for a peer connection the TCP relay accepts or
    /// opens), or `None` when all `max` are taken. The slot is given back when dropped, or kept
    /// by the worker that adopts the connection ([`ToWorker::BindData`](crate::ToWorker)).
    pub fn try_reserve(&self, max: usize) -> Option<ConnectionSlot> {
        if self.0.total.fetch_add(1, Ordering::Relaxed) >= max {
            self.0.total.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionSlot(Some(self.0.clone())))
    }
}

/// One connection counted in a [`ConnectionCount`] (`max-connections`): a peer data connection
/// (RFC 6062) from the moment the TCP relay accepts or starts it. Dropping it gives the slot
/// back; a worker that adopts the connection keeps it until the connection closes.
#[derive(Debug)]
pub struct ConnectionSlot(Option<Arc<SharedCount>>);

impl ConnectionSlot {
    /// The slot stays counted; the connection that holds it gives it back when it closes.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(count) = self.0.take() {
            count.total.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Accepts put off while the process is out of descriptors (EMFILE, ENFILE) or memory: per
/// TCP listener the instant its accept is tried again, after a delay that doubles from
/// [`ACCEPT_BACKOFF_MIN`] to [`ACCEPT_BACKOFF_MAX`] while accepts keep failing. Without it the
/// pending connection fails every accept at once (io_uring re-arms in a loop; epoll hears no new
/// readiness edge and leaves the backlog waiting).
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    due: Vec<Option<Instant>>,
    delay: Duration,
    /// Accepts put off, and when the last warning was logged.
    logged: Option<Instant>,
    since_log: u64,
}

/// The first delay of an accept after it ran out of descriptors.
pub(crate) const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest delay between two tries of an accept that keeps running out of descriptors.
pub(crate) const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    /// True for the accept errors that a retry after a while may cure (descriptors, memory).
    pub(crate) fn is_resource_error(errno: i32) -> bool {
        matches!(errno, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    }

    /// Puts listener `i`'s accept off; true when a warning is due (at most one per 10 s).
    fn defer(&mut self, i: usize, now: Instant) -> Option<u64> {
        if self.due.len() <= i {
            self.due.resize(i + 1, None);
        }
        self.delay = (self.delay * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
        self.due[i] = Some(now + self.delay);
        self.since_log += 1;
        if self.logged.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
            self.logged = Some(now);
            return Some(std::mem::take(&mut self.since_log));
        }
        None
    }

    /// An accept succeeded: the next failure starts from the shortest delay again.
    fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }

    /// The listeners whose accept is due again at `now` (taken off the list).
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<usize> {
        let mut due = Vec::new();
        for (i, d) in self.due.iter_mut().enumerate() {
            if d.is_some_and(|t| t <= now) {
                *d = None;
                due.push(i);
            }
        }
        due
    }

    /// The longest a backend may sleep before an accept is due (`Duration::MAX` when none is).
    pub(crate) fn wait(&self, now: Instant) -> Duration {
        self.due.iter().flatten().map(|t| t.saturating_duration_since(now)).min().unwrap_or(Duration::MAX)
    }

    /// True while listener `i`'s accept is put off.
    pub(crate) fn deferred(&self, i: usize) -> bool {
        self.due.get(i).is_some_and(Option::is_some)
    }
}

/// The answer over TCP or TLS to a request the relay cannot take now (its source's budget is
/// spent, the queue to the control plane is full): 508 Insufficient Capacity (RFC 8656 §6.2,
/// §7.2), written to `out`. Over streams a client does not retransmit (RFC 8489 §6.2.2), so a
/// silent drop would cost it the whole transaction timeout (39.5 s); over UDP the caller drops
/// (the client retransmits). `None` for UDP or when `request` is not a STUN request.
pub(crate) fn refusal(out: &mut [u8], five_tuple: &FiveTuple, request: &[u8]) -> Option<usize> {
    if five_tuple.transport == Transport::Udp {
        return None;
    }
    let msg = Message::parse(request).ok().filter(|m| m.class() == Class::Request)?;
    response::error(out, msg.method(), msg.transaction_id(), ErrorCode::InsufficientCapacity, &[], None).ok()
}

/// True when `reply` is a success response (its class bits, RFC 8489 §5).
pub(crate) fn is_success(reply: &[u8]) -> bool {
    reply.len() >= 2 && (u16::from_be_bytes([reply[0], reply[1]]) & 0x0110) == 0x0100
}

/// A connection's slot in its worker's slab plus a generation (completions of a closed
/// connection never reach the slot's next tenant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConnId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

/// A TCP listener of this worker.
#[derive(Debug)]
pub(crate) struct StreamListener {
    pub(crate) socket: TcpListener,
    pub(crate) addr: SocketAddr,
    pub(crate) transport: Transport,
}

/// Per-worker connection counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamCounters {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections refused at accept (over a cap).
    pub refused: u64,
    /// Connections refused at accept because their source opened too many per second
    /// ([`StreamLimits::connection_rate`]); also counted in `refused`.
    pub rate_limited: u64,
    /// Accepts put off because the process was out of descriptors or memory (EMFILE, ENFILE,
    /// ENOBUFS, ENOMEM), each retried after a backoff.
    pub accept_deferred: u64,
    /// Requests over TCP/TLS answered 508 instead of dropped (source budget spent, control-plane
    /// queue full).
    pub refusals: u64,
    /// Connections closed, by reason, in the order of [`CLOSE_REASONS`].
    pub closed: [u64; CLOSE_REASONS.len()],
    /// Messages for a client dropped because its write queue was full.
    pub queue_drops: u64,
    /// Bytes relayed between RFC 6062 data connections (both directions).
    pub data_bytes: u64,
}

/// The reasons a connection closes, as metrics label them.
pub const CLOSE_REASONS: [&str; 12] = [
    "peer",
    "bad_framing",
    "tls",
    "handshake_timeout",
    "frame_timeout",
    "idle",
    "stalled",
    "shutdown",
    "data_closed",
    "overrun",
    "proxy",
    "refused",
];

/// One worker's client connections.
pub(crate) struct Streams {
    slots: Vec<(u32, Option<Connection>)>,
    free: Vec<u32>,
    by_five_tuple: HashMap<FiveTuple, ConnId>,
    open: usize,
    /// New connections per second per source (allocated only with stream listeners).
    connection_rate: SourceLimiter,
    pub(crate) accept_backoff: AcceptBackoff,
    total: ConnectionCount,
    pub(crate) limits: StreamLimits,
    pub(crate) tls: Option<tls::TlsServer>,
    /// Connections with bytes to hand to the kernel.
    pub(crate) dirty: Vec<ConnId>,
    pub(crate) counters: StreamCounters,
    next_sweep: Instant,
    /// `proxy-protocol`: connections begin with a PROXY header from a trusted balancer.
    pub(crate) proxy: ProxyProtocol,
    pub(crate) proxy_counters: ProxyCounters,
}

impl Streams {
    pub(crate) fn new(
        limits: StreamLimits,
        tls: Option<tls::TlsServer>,
        total: ConnectionCount,
        proxy: ProxyProtocol,
    ) -> Self {
        Streams {
            slots: Vec::new(),
            free: Vec::new(),
            by_five_tuple: HashMap::new(),
            open: 0,
            connection_rate: SourceLimiter::new(limits.connection_rate, Instant::now()),
            accept_backoff: AcceptBackoff::default(),
            total,
            limits,
            tls,
            dirty: Vec::new(),
            counters: StreamCounters::default(),
            next_sweep: Instant::now(),
            proxy,
            proxy_counters: ProxyCounters::default(),
        }
    }

    /// Connections open in this worker.
    pub(crate) fn len(&self) -> usize {
        self.open
    }

    /// Admits a connection from `five_tuple` unless a cap says no; over TLS it starts the
    /// handshake state. `None` when refused (the caller closes the socket). With
    /// `proxy-protocol` only a trusted balancer is admitted, and the per-source caps wait for
    /// the real client its header names ([`take_proxy_header`](Self::take_proxy_header)).
    pub(crate) fn admit(&mut self, now: Instant, socket: std::net::TcpStream, five_tuple: FiveTuple) -> Option<ConnId> {
        self.accept_backoff.succeeded();
        let ip = five_tuple.client.ip();
        let proxied = self.proxy.streams;
        if proxied {
            if !self.proxy.trusts(ip) {
                self.proxy_counters.refuse_stream(Refusal::Untrusted);
                return None;
            }
        } else if !self.admit_source(now, ip) {
            return None;
        }
        let tls = match five_tuple.transport {
            Transport::Tls => match self.tls.as_ref().map(|t| t.accept()) {
                Some(Ok(c)) => Some(c),
                _ => {
                    if !proxied {
                        self.total.remove_source(ip);
                    }
                    self.counters.refused += 1;
                    return None;
                }
            },
            _ => None,
        };
        let total = &self.total.0.total;
        if total.fetch_add(1, Ordering::Relaxed) >= self.limits.max_connections {
            total.fetch_sub(1, Ordering::Relaxed);
            if !proxied {
                self.total.remove_source(ip);
            }
            self.counters.refused += 1;
            return None;
        }
        let id = self.insert(now, socket, five_tuple, tls);
        if proxied {
            if let Some(c) = self.get_mut(id) {
                c.awaiting_proxy = true;
                c.counted_source = false;
            }
        }
        self.counters.accepted += 1;
        Some(id)
    }

    /// The per-source caps of a new connection from `ip`: its rate first (a source over it
    /// costs no TLS state and no shared counter), then its count. False when refused (counted).
    fn admit_source(&mut self, now: Instant, ip: IpAddr) -> bool {
        if !self.connection_rate.allow(now, ip) {
            self.counters.rate_limited += 1;
            self.counters.refused += 1;
            return false;
        }
        if !self.total.try_add_source(ip, self.limits.max_per_source) {
            self.counters.refused += 1;
            return false;
        }
        true
    }

    /// Connection `id`'s PROXY header arrived whole: `source` (the real client, `None` to keep
    /// the balancer's address) becomes its 5-tuple's client, and the per-source caps apply to
    /// it now. `Err` (the caller closes the connection) when a cap refuses it
    /// ([`CloseReason::Refused`]) or another open connection has that 5-tuple already
    /// ([`CloseReason::Proxy`], counted as malformed).
    pub(crate) fn take_proxy_header(
        &mut self,
        now: Instant,
        id: ConnId,
        source: Option<SocketAddr>,
    ) -> Result<FiveTuple, CloseReason> {
        let Some(c) = self.get_mut(id) else { return Err(CloseReason::Peer) };
        c.awaiting_proxy = false;
        let old = c.five_tuple;
        let mut ft = old;
        if let Some(s) = source {
            ft.client = SocketAddr::new(s.ip().to_canonical(), s.port());
        }
        if ft != old && self.by_five_tuple.contains_key(&ft) {
            self.proxy_counters.refuse_stream(Refusal::Malformed);
            return Err(CloseReason::Proxy);
        }
        if !self.admit_source(now, ft.client.ip()) {
            return Err(CloseReason::Refused);
        }
        self.by_five_tuple.remove(&old);
        self.by_five_tuple.insert(ft, id);
        if let Some(c) = self.get_mut(id) {
            c.counted_source = true;
            c.five_tuple = ft;
        }
        self.proxy_counters.streams_accepted += 1;
        Ok(ft)
    }

    /// Listener `i`'s accept failed for want of descriptors or memory: it is tried again after
    /// a backoff (counted; a warning at most every 10 s with the count since the last one).
    pub(crate) fn defer_accept(&mut self, worker: usize, i: usize, now: Instant, errno: i32) {
        self.counters.accept_deferred += 1;
        if let Some(n) = self.accept_backoff.defer(i, now) {
            tracing::warn!(
                worker,
                listener = i,
                deferred = n,
                error = %std::io::Error::from_raw_os_error(errno),
                "accepting connections put off: out of descriptors or memory (retried with backoff)"
            );
        }
    }

    /// Connection `id` proved itself in use (a verified request, a success answer from the
    /// control plane, relayed data): its idle timer starts again.
    pub(crate) fn mark_used(&mut self, id: ConnId, now: Instant) {
        if let Some(c) = self.get_mut(id) {
            c.last_used = now;
        }
    }

    /// Puts a connection in a free slot (counted in `open`; the caller counted it in `total`).
    fn insert(
        &mut self,
        now: Instant,
        socket: std::net::TcpStream,
        five_tuple: FiveTuple,
        tls: Option<rustls::ServerConnection>,
    ) -> ConnId {
        let _ = socket.set_nodelay(true);
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push((0, None));
                (self.slots.len() - 1) as u32
            }
        };
        let generation = self.slots[index as usize].0;
        let id = ConnId { index, generation };
        self.slots[index as usize].1 = Some(Connection::new(socket, five_tuple, generation, tls, now));
        self.by_five_tuple.insert(five_tuple, id);
        self.open += 1;
        id
    }

    /// Takes in a peer data connection (RFC 6062) that the control plane's TCP relay accepted
    /// or connected, with the `max-connections` slot the relay took for it then: no per-source
    /// cap (the relay capped it per allocation and per user), and the total does not grow (the
    /// slot is already counted; the connection gives it back when it closes). Its role is set
    /// by the caller.
    pub(crate) fn adopt_peer(
        &mut self,
        now: Instant,
        socket: std::net::TcpStream,
        five_tuple: FiveTuple,
        slot: ConnectionSlot,
    ) -> ConnId {
        slot.keep();
        self.insert(now, socket, five_tuple, None)
    }

    /// The connection `id` names, if it is still open.
    pub(crate) fn get_mut(&mut self, id: ConnId) -> Option<&mut Connection> {
        match self.slots.get_mut(id.index as usize) {
            Some((g, Some(c))) if *g == id.generation => Some(c),
            _ => None,
        }
    }

    /// The connection in slab slot `index`, whatever its generation.
    pub(crate) fn slot_mut(&mut self, index: u32) -> Option<&mut Connection> {
        self.slots.get_mut(index as usize).and_then(|(_, c)| c.as_mut())
    }

    /// The open connection of `ft`.
    pub(crate) fn lookup(&self, ft: &FiveTuple) -> Option<ConnId> {
        self.by_five_tuple.get(ft).copied()
    }

    /// Every open connection's id.
    pub(crate) fn ids(&self) -> Vec<ConnId> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, (g, c))| c.as_ref().map(|_| ConnId { index: i as u32, generation: *g }))
            .collect()
    }

    /// Marks `id` for a flush.
    pub(crate) fn mark_dirty(&mut self, id: ConnId) {
        if let Some(c) = self.get_mut(id) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    /// Queues `message` to `id`, counting a drop when the queue is full. True when queued.
    pub(crate) fn queue(&mut self, id: ConnId, message: &[u8]) -> bool {
        let limit = self.limits.write_queue;
        let Some(c) = self.get_mut(id) else { return false };
        if !c.queue(message, limit) {
            self.counters.queue_drops += 1;
            return false;
        }
        self.mark_dirty(id);
        true
    }

    /// Removes connection `id` and returns it (its socket still open; the caller shuts it down).
    pub(crate) fn remove(&mut self, id: ConnId, reason: CloseReason) -> Option<Connection> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.0 != id.generation || slot.1.is_none() {
            return None;
        }
        let c = slot.1.take()?;
        slot.0 = slot.0.wrapping_add(1);
        self.free.push(id.index);
        self.by_five_tuple.remove(&c.five_tuple);
        // Peer data connections are not counted per source (see `adopt_peer`), nor are
        // connections whose PROXY header has not come.
        if c.counted_source && !matches!(c.role, Role::PeerData { .. }) {
            self.total.remove_source(c.five_tuple.client.ip());
        }
        self.open -= 1;
        self.total.0.total.fetch_sub(1, Ordering::Relaxed);
        let i = CLOSE_REASONS.iter().position(|r| *r == reason.name()).unwrap_or(0);
        self.counters.closed[i] += 1;
        Some(c)
    }

    /// The connections a limit ends at `now` (checked at most once a second); `has_allocation`
    /// tells which 5-tuples hold an allocation (those never idle out).
    pub(crate) fn overdue(
        &mut self,
        now: Instant,
        has_allocation: impl Fn(&FiveTuple) -> bool,
    ) -> Vec<(ConnId, CloseReason)> {
        if now < self.next_sweep || self.open == 0 {
            return Vec::new();
        }
        self.next_sweep = now + Duration::from_secs(1);
        let l = &self.limits;
        let mut due = Vec::new();
        for (i, (g, c)) in self.slots.iter().enumerate() {
            let Some(c) = c else { continue };
            let id = ConnId { index: i as u32, generation: *g };
            let reason = if c.awaiting_proxy && now.duration_since(c.opened) >= l.handshake_timeout {
                self.proxy_counters.refuse_stream(Refusal::Timeout);
                Some(CloseReason::Proxy)
            } else if c.handshaking() && now.duration_since(c.opened) >= l.handshake_timeout {
                Some(CloseReason::HandshakeTimeout)
            } else if c.partial_since.is_some_and(|t| now.duration_since(t) >= l.frame_timeout) {
                Some(CloseReason::FrameTimeout)
            } else if c.queued() > 0 && now.duration_since(c.last_progress) >= l.stall_timeout {
                Some(CloseReason::Stalled)
            } else if now.duration_since(c.last_used) >= l.idle_timeout
                && matches!(c.role, Role::Framed | Role::Binding)
                && !has_allocation(&c.five_tuple)
            {
                Some(CloseReason::Idle)
            } else {
                None
            };
            if let Some(r) = reason {
                due.push((id, r));
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_per_source_across_workers_and_ipv6_by_its_64() {
        let shared = ConnectionCount::default();
        let (a, b) = (shared.clone(), shared.clone());
        // Two workers, one IPv6 /64 rotating its addresses: one count.
        let in_64 = |i: u16| IpAddr::from([0x2001, 0xdb8, 7, 9, i, 0xbeef, i, 1]);
        let admitted = (0..20u16)
            .filter(|i| if i % 2 == 0 { a.try_add_source(in_64(*i), 4) } else { b.try_add_source(in_64(*i), 4) })
            .count();
        assert_eq!(admitted, 4);
        assert_eq!(shared.from_source(in_64(99)), 4);
        // IPv4-mapped is the IPv4 source; another /64 has its own count (one of three other
        // prefixes at least: a slot collision only makes the cap stricter).
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(a.try_add_source(v4, 1));
        assert!(!b.try_add_source("::ffff:192.0.2.1".parse().unwrap(), 1));
        let others =
            (1..4u16).filter(|p| a.try_add_source(IpAddr::from([0x2001, 0xdb8, 7, 9 + p, 0, 0, 0, 1]), 4)).count();
        assert!(others >= 2, "{others}");
        // Closing frees the place, from either worker.
        b.remove_source(in_64(1000));
        assert!(a.try_add_source(in_64(5), 4));
        a.remove_source(v4);
        assert_eq!(shared.from_source(v4), 0);
        a.remove_source(v4);
        assert_eq!(shared.from_source(v4), 0, "never below zero");
    }

    #[test]
    fn accept_backoff_doubles_to_its_cap_and_resets() {
        let t0 = Instant::now();
        let mut b = AcceptBackoff::default();
        assert_eq!(b.wait(t0), Duration::MAX);
        assert!(b.defer(1, t0).is_some(), "the first one is logged");
        assert_eq!(b.wait(t0), ACCEPT_BACKOFF_MIN);
        assert!(b.deferred(1) && !b.deferred(0));
        assert!(b.take_due(t0).is_empty());
        assert_eq!(b.take_due(t0 + ACCEPT_BACKOFF_MIN), vec![1]);
        let mut delays = Vec::new();
        for _ in 0..10 {
            assert!(b.defer(1, t0).is_none(), "one warning per 10 s");
            delays.push(b.wait(t0));
        }
        assert_eq!(delays[0], ACCEPT_BACKOFF_MIN * 2);
        assert_eq!(*delays.last().unwrap(), ACCEPT_BACKOFF_MAX);
        b.succeeded();
        b.take_due(t0 + ACCEPT_BACKOFF_MAX);
        b.defer(1, t0);
        assert_eq!(b.wait(t0), ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn streams_are_refused_with_508_and_udp_is_not() {
        use uturn_proto::wire::{MessageWriter, Method, TransactionId};
        let mut req = [0u8; 64];
        let n =
            MessageWriter::new(&mut req, Method::ALLOCATE, Class::Request, TransactionId([3; 12])).unwrap().finish();
        let ft = |transport| FiveTuple {
            client: "192.0.2.1:5000".parse().unwrap(),
            server: "192.0.2.2:3478".parse().unwrap(),
            transport,
        };
        let mut out = [0u8; 512];
        assert_eq!(refusal(&mut out, &ft(Transport::Udp), &req[..n]), None);
        let len = refusal(&mut out, &ft(Transport::Tls), &req[..n]).expect("a 508");
        let m = Message::parse(&out[..len]).unwrap();
        assert_eq!((m.class(), m.transaction_id()), (Class::Error, TransactionId([3; 12])));
        let code = m.get(uturn_proto::wire::attr::ERROR_CODE).unwrap();
        assert_eq!(code[2] as u16 * 100 + code[3] as u16, 508);
        assert!(!is_success(&out[..len]));
    }
}
