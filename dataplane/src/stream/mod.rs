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
//! Abuse limits ([`StreamLimits`], docs/security.md): connections per source address and in
//! total, a TLS handshake deadline, a deadline for a message once its first byte arrived
//! (slowloris), an idle timeout for connections without an allocation, and a bounded write
//! queue per connection whose stalled reader is disconnected.

pub(crate) mod conn;
pub(crate) mod tls;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use uturn_proto::{FiveTuple, Transport};

pub(crate) use conn::{CloseReason, Connection, Role};

/// Limits on client connections (TURN over TCP and TLS).
#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// Connections open at once on the whole relay (all workers share the count).
    pub max_connections: usize,
    /// Connections open at once from one source IP address, per worker.
    pub max_per_source: usize,
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

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_connections: 10_000,
            max_per_source: 64,
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            write_queue: 256 * 1024,
            stall_timeout: Duration::from_secs(10),
        }
    }
}

/// Connections open on the whole relay, shared by the workers (touched only on accept and close).
#[derive(Debug, Default, Clone)]
pub struct ConnectionCount(Arc<AtomicUsize>);

impl ConnectionCount {
    /// Connections open now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Takes one slot of `max` (RFC 6062: for a peer connection the TCP relay accepts or
    /// opens), or `None` when all `max` are taken. The slot is given back when dropped, or kept
    /// by the worker that adopts the connection ([`ToWorker::BindData`](crate::ToWorker)).
    pub fn try_reserve(&self, max: usize) -> Option<ConnectionSlot> {
        if self.0.fetch_add(1, Ordering::Relaxed) >= max {
            self.0.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionSlot(Some(self.0.clone())))
    }
}

/// One connection counted in a [`ConnectionCount`] (`max-connections`): a peer data connection
/// (RFC 6062) from the moment the TCP relay accepts or starts it. Dropping it gives the slot
/// back; a worker that adopts the connection keeps it until the connection closes.
#[derive(Debug)]
pub struct ConnectionSlot(Option<Arc<AtomicUsize>>);

impl ConnectionSlot {
    /// The slot stays counted; the connection that holds it gives it back when it closes.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(count) = self.0.take() {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
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
    /// Connections closed, by reason, in the order of [`CLOSE_REASONS`].
    pub closed: [u64; CLOSE_REASONS.len()],
    /// Messages for a client dropped because its write queue was full.
    pub queue_drops: u64,
    /// Bytes relayed between RFC 6062 data connections (both directions).
    pub data_bytes: u64,
}

/// The reasons a connection closes, as metrics label them.
pub const CLOSE_REASONS: [&str; 10] = [
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
];

/// One worker's client connections.
pub(crate) struct Streams {
    slots: Vec<(u32, Option<Connection>)>,
    free: Vec<u32>,
    by_five_tuple: HashMap<FiveTuple, ConnId>,
    per_source: HashMap<IpAddr, u32>,
    open: usize,
    total: ConnectionCount,
    pub(crate) limits: StreamLimits,
    pub(crate) tls: Option<tls::TlsServer>,
    /// Connections with bytes to hand to the kernel.
    pub(crate) dirty: Vec<ConnId>,
    pub(crate) counters: StreamCounters,
    next_sweep: Instant,
}

impl Streams {
    pub(crate) fn new(limits: StreamLimits, tls: Option<tls::TlsServer>, total: ConnectionCount) -> Self {
        Streams {
            slots: Vec::new(),
            free: Vec::new(),
            by_five_tuple: HashMap::new(),
            per_source: HashMap::new(),
            open: 0,
            total,
            limits,
            tls,
            dirty: Vec::new(),
            counters: StreamCounters::default(),
            next_sweep: Instant::now(),
        }
    }

    /// Connections open in this worker.
    pub(crate) fn len(&self) -> usize {
        self.open
    }

    /// Admits a connection from `five_tuple` unless a cap says no; over TLS it starts the
    /// handshake state. `None` when refused (the caller closes the socket).
    pub(crate) fn admit(&mut self, now: Instant, socket: std::net::TcpStream, five_tuple: FiveTuple) -> Option<ConnId> {
        let ip = five_tuple.client.ip();
        let from_source = self.per_source.get(&ip).copied().unwrap_or(0) as usize;
        let tls = match five_tuple.transport {
            Transport::Tls => match self.tls.as_ref().map(|t| t.accept()) {
                Some(Ok(c)) => Some(c),
                _ => None,
            },
            _ => None,
        };
        if from_source >= self.limits.max_per_source || (five_tuple.transport == Transport::Tls && tls.is_none()) {
            self.counters.refused += 1;
            return None;
        }
        if self.total.0.fetch_add(1, Ordering::Relaxed) >= self.limits.max_connections {
            self.total.0.fetch_sub(1, Ordering::Relaxed);
            self.counters.refused += 1;
            return None;
        }
        let id = self.insert(now, socket, five_tuple, tls);
        *self.per_source.entry(ip).or_default() += 1;
        self.counters.accepted += 1;
        Some(id)
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
        let ip = c.five_tuple.client.ip();
        // Peer data connections are not counted per source (see `adopt_peer`).
        if !matches!(c.role, Role::PeerData { .. }) {
            if let Some(n) = self.per_source.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_source.remove(&ip);
                }
            }
        }
        self.open -= 1;
        self.total.0.fetch_sub(1, Ordering::Relaxed);
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
            let reason = if c.handshaking() && now.duration_since(c.opened) >= l.handshake_timeout {
                Some(CloseReason::HandshakeTimeout)
            } else if c.partial_since.is_some_and(|t| now.duration_since(t) >= l.frame_timeout) {
                Some(CloseReason::FrameTimeout)
            } else if c.queued() > 0 && now.duration_since(c.last_progress) >= l.stall_timeout {
                Some(CloseReason::Stalled)
            } else if now.duration_since(c.last_message) >= l.idle_timeout
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
