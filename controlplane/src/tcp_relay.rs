//! The TCP relay (RFC 6062): the control plane's thread that sets up the peer side of TCP
//! allocations. The workers forward the bytes.
//!
//! Each TCP allocation's relayed transport address is a listener held here. A peer that
//! connects to it with a permission becomes a pending peer data connection and the client
//! hears a ConnectionAttempt (§5.3); a Connect from the client opens a connection from the
//! relayed address (§5.2). A pending connection is not read: the kernel's receive window holds
//! the peer back until a ConnectionBind names its CONNECTION-ID (§5.4), when it goes, with the
//! signed success response, to the worker that holds the client's new data connection, in a
//! [`ToWorker::BindData`]. From then on that worker relays the pair; it reports the end with
//! `DataClosed`. When the allocation ends, every connection it has closes (§5.5).
//!
//! Caps (docs/security.md): each connection the relay accepts or opens takes a slot of
//! `max-connections` at once (shared with the workers' client connections; the slot moves with
//! the connection to the worker that binds it), and counts against its allocation
//! ([`MAX_CONNECTIONS_PER_ALLOCATION`]) and its user (`max-peer-connections-per-user`). The
//! state is indexed so that an allocation's end costs O(its own connections) and the sweep
//! O(what is due): each allocation keeps its connections by peer, and deadlines wait in FIFO
//! queues (every deadline is `now` plus one constant, so insertion order is deadline order).
//!
//! The relay runs its own mio loop and talks only to the control thread: commands come in
//! over a channel plus a waker, and what must reach a worker goes out as `(worker, message)`
//! pairs that the control thread pushes (so worker queues keep one producer).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};
use uturn_dataplane::{ConnectionCount, ConnectionSlot, ToWorker};
use uturn_proto::relay::Command;
use uturn_proto::response::{self, ErrorCode};
use uturn_proto::wire::{attr, Class, IntegrityKey, MessageWriter, Method, TransactionId};
use uturn_proto::FiveTuple;

/// How long a Connect may take before it earns 447 (RFC 6062 §5.2: at least 30 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a peer data connection waits for its ConnectionBind before it is closed (RFC 6062
/// §5.2, §5.3).
pub const BIND_TIMEOUT: Duration = Duration::from_secs(30);
/// Peer connections (connecting, pending and bound) one TCP allocation may hold at once; a
/// Connect beyond it earns 508 and an incoming connection beyond it is closed.
pub const MAX_CONNECTIONS_PER_ALLOCATION: usize = 256;
/// Backlog of a relayed transport address's listener.
const LISTEN_BACKLOG: i32 = 128;
/// The waker's token; listener and connecting tokens count up from 1.
const WAKER: Token = Token(0);
/// Response buffer, bytes.
const BUF: usize = 512;

/// The caps on peer connections (RFC 6062) beyond the per-allocation one.
#[derive(Debug, Clone)]
pub struct PeerLimits {
    /// The relay's connection count (`max-connections`), shared with the workers.
    pub connections: ConnectionCount,
    /// `max-connections`: connections open at once on the whole relay, client and peer.
    pub max_connections: usize,
    /// `max-peer-connections-per-user`: peer connections (connecting, pending and bound) of all
    /// the TCP allocations of one user at once.
    pub per_user: usize,
}

/// Peer connections the relay refused, by the cap that refused them (logged when it stops).
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Over [`MAX_CONNECTIONS_PER_ALLOCATION`].
    pub refused_allocation: AtomicU64,
    /// Over `max-peer-connections-per-user`.
    pub refused_user: AtomicU64,
    /// Over `max-connections`.
    pub refused_node: AtomicU64,
}

/// What the control thread asks of the TCP relay.
#[derive(Debug)]
pub enum TcpCommand {
    /// A TCP allocation was granted: listen on its relayed transport address.
    Listen {
        /// The client's control connection.
        five_tuple: FiveTuple,
        /// The worker holding it.
        worker: usize,
        /// Its session id (in logs).
        session: u64,
        /// The authenticated username (a ConnectionBind must come from the same user).
        user: Arc<str>,
        /// The listener, bound and listening, non-blocking.
        listener: TcpListener,
    },
    /// CreatePermission on a TCP allocation: peers from these IPs may connect (RFC 6062 §5.3).
    Permit {
        /// The allocation's control connection.
        five_tuple: FiveTuple,
        /// The peer IPs.
        peers: Vec<IpAddr>,
    },
    /// Connect (RFC 6062 §5.2): open a connection to `peer`, answer the client.
    Connect {
        /// The allocation's control connection.
        five_tuple: FiveTuple,
        /// The peer.
        peer: SocketAddr,
        /// The request's transaction ID.
        tid: TransactionId,
        /// The key that signs the answer.
        key: IntegrityKey,
    },
    /// ConnectionBind (RFC 6062 §5.4) received on client connection `five_tuple` of `worker`.
    Bind {
        /// The CONNECTION-ID it names.
        connection_id: u32,
        /// Its authenticated username.
        user: Arc<str>,
        /// The new client connection.
        five_tuple: FiveTuple,
        /// The worker holding that connection.
        worker: usize,
        /// The request's transaction ID.
        tid: TransactionId,
        /// The key that signs the answer.
        key: IntegrityKey,
    },
    /// The TCP allocation of `five_tuple` ended: close its listener and connections.
    Close {
        /// The allocation's control connection.
        five_tuple: FiveTuple,
    },
    /// A worker reported that the data connection pair `connection_id` closed.
    DataClosed {
        /// The CONNECTION-ID.
        connection_id: u32,
    },
}

/// The control thread's handle on the TCP relay thread. Dropping it stops the thread.
pub struct TcpRelay {
    /// Refusals by cap.
    pub counters: Arc<RelayCounters>,
    commands: Sender<TcpCommand>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl TcpRelay {
    /// Starts the relay thread. What it has for workers goes into `out`, after which it unparks
    /// `control`. `permission_lifetime` is how long a CreatePermission lets peers connect.
    /// `limits` caps the peer connections beyond each allocation's 256; refusals are counted in
    /// `counters` (the metrics').
    pub fn spawn(
        out: Sender<(usize, ToWorker)>,
        control: Thread,
        permission_lifetime: Duration,
        limits: PeerLimits,
        counters: Arc<RelayCounters>,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (commands, rx) = crossbeam_channel::unbounded();
        let mut relay = Relay::new(poll, rx, out, control, permission_lifetime, limits, counters.clone());
        let thread = std::thread::Builder::new().name("uturn-tcp-relay".into()).spawn(move || relay.run())?;
        Ok(TcpRelay { counters, commands, waker, thread: Some(thread) })
    }

    /// Queues `cmd` and wakes the relay.
    pub fn send(&self, cmd: TcpCommand) {
        if self.commands.send(cmd).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        // A closed channel stops the loop.
        let (dead, _) = crossbeam_channel::bounded(0);
        self.commands = dead;
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds a relayed transport address for a TCP allocation and listens on it. SO_REUSEADDR and
/// SO_REUSEPORT let the allocation's outgoing connections (Connect) use the same address, so
/// two listeners could share a port: the caller never binds a port it already holds.
pub fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = relay_socket(addr)?;
    s.listen(LISTEN_BACKLOG)?;
    Ok(s.into())
}

/// A non-blocking TCP socket bound to relayed transport address `addr`.
fn relay_socket(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// One TCP allocation.
struct TcpAllocation {
    worker: usize,
    session: u64,
    user: Arc<str>,
    listener: TcpListener,
    relayed: SocketAddr,
    token: Token,
    /// Peer IPs allowed to connect, until when.
    permissions: HashMap<IpAddr, Instant>,
    /// Its connections (connecting, pending, bound) by peer, with their CONNECTION-IDs: one
    /// connection per peer, so a second Connect to one is 446 (RFC 6062 §5.2); the allocation's
    /// end closes exactly these.
    conns: HashMap<SocketAddr, u32>,
}

/// A Connect in progress.
struct Connecting {
    alloc: FiveTuple,
    peer: SocketAddr,
    stream: TcpStream,
    token: Token,
    tid: TransactionId,
    key: IntegrityKey,
    deadline: Instant,
    slot: ConnectionSlot,
}

/// A peer data connection waiting for its ConnectionBind.
struct Pending {
    alloc: FiveTuple,
    peer: SocketAddr,
    stream: TcpStream,
    deadline: Instant,
    slot: ConnectionSlot,
}

/// A bound pair, relayed by `worker`.
struct Bound {
    alloc: FiveTuple,
    peer: SocketAddr,
    worker: usize,
    data: FiveTuple,
}

/// What a poll token names.
#[derive(Clone, Copy)]
enum Source {
    Listener(FiveTuple),
    Connecting(u32),
}

struct Relay {
    poll: Poll,
    commands: Receiver<TcpCommand>,
    out: Sender<(usize, ToWorker)>,
    control: Thread,
    permission_lifetime: Duration,
    allocations: HashMap<FiveTuple, TcpAllocation>,
    tokens: HashMap<Token, Source>,
    /// By CONNECTION-ID.
    connecting: HashMap<u32, Connecting>,
    pending: HashMap<u32, Pending>,
    bound: HashMap<u32, Bound>,
    /// Connects by deadline (FIFO: every deadline is `now + CONNECT_TIMEOUT`); an entry whose
    /// connection has moved on is skipped when it comes due.
    connect_deadlines: VecDeque<(Instant, u32)>,
    /// Pending connections by deadline (FIFO: `now + BIND_TIMEOUT`), the same way.
    bind_deadlines: VecDeque<(Instant, u32)>,
    /// Peer connections (connecting, pending, bound) per user.
    per_user: HashMap<Arc<str>, usize>,
    limits: PeerLimits,
    counters: Arc<RelayCounters>,
    /// Entries that allocation ends and sweeps looked at (tests check the indexing).
    #[cfg(test)]
    visited: usize,
    next_token: usize,
    next_sweep: Instant,
    buf: Vec<u8>,
}

impl Relay {
    fn new(
        poll: Poll,
        commands: Receiver<TcpCommand>,
        out: Sender<(usize, ToWorker)>,
        control: Thread,
        permission_lifetime: Duration,
        limits: PeerLimits,
        counters: Arc<RelayCounters>,
    ) -> Self {
        Relay {
            poll,
            commands,
            out,
            control,
            permission_lifetime,
            allocations: HashMap::new(),
            tokens: HashMap::new(),
            connecting: HashMap::new(),
            pending: HashMap::new(),
            bound: HashMap::new(),
            connect_deadlines: VecDeque::new(),
            bind_deadlines: VecDeque::new(),
            per_user: HashMap::new(),
            limits,
            counters,
            #[cfg(test)]
            visited: 0,
            next_token: 1,
            next_sweep: Instant::now(),
            buf: vec![0; BUF],
        }
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        while self.turn(&mut events, Duration::from_secs(1)) {}
        self.log_counters();
    }

    /// One turn of the loop: waits up to `timeout` for sockets, then handles their events, the
    /// queued commands and what is due. False when the relay must stop.
    fn turn(&mut self, events: &mut Events, timeout: Duration) -> bool {
        if let Err(e) = self.poll.poll(events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                warn!("TCP relay: poll failed: {e}");
                return false;
            }
        }
        let now = Instant::now();
        for ev in events.iter() {
            match self.tokens.get(&ev.token()).copied() {
                Some(Source::Listener(ft)) => self.accept(now, ft),
                Some(Source::Connecting(id)) => self.connected(now, id),
                None => {}
            }
        }
        loop {
            match self.commands.try_recv() {
                Ok(cmd) => self.command(now, cmd),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return false,
            }
        }
        if now >= self.next_sweep {
            self.sweep(now);
            self.next_sweep = now + Duration::from_secs(1);
        }
        true
    }

    fn command(&mut self, now: Instant, cmd: TcpCommand) {
        match cmd {
            TcpCommand::Listen { five_tuple, worker, session, user, listener } => {
                let Ok(relayed) = listener.local_addr() else { return };
                let token = self.token(Source::Listener(five_tuple));
                let fd = listener.as_raw_fd();
                if let Err(e) = self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE) {
                    warn!(session, "TCP relay: cannot watch the relayed address {relayed}: {e}");
                }
                let a = TcpAllocation {
                    worker,
                    session,
                    user,
                    listener,
                    relayed,
                    token,
                    permissions: HashMap::new(),
                    conns: HashMap::new(),
                };
                if let Some(old) = self.allocations.insert(five_tuple, a) {
                    self.drop_allocation(five_tuple, old);
                }
            }
            TcpCommand::Permit { five_tuple, peers } => {
                if let Some(a) = self.allocations.get_mut(&five_tuple) {
                    // Expired ones go here, O(this allocation's permissions), not in the sweep.
                    a.permissions.retain(|_, until| *until > now);
                    for ip in peers {
                        a.permissions.insert(ip, now + self.permission_lifetime);
                    }
                }
            }
            TcpCommand::Connect { five_tuple, peer, tid, key } => self.connect(now, five_tuple, peer, tid, key),
            TcpCommand::Bind { connection_id, user, five_tuple, worker, tid, key } => {
                self.bind(connection_id, &user, five_tuple, worker, tid, key)
            }
            TcpCommand::Close { five_tuple } => {
                if let Some(a) = self.allocations.remove(&five_tuple) {
                    self.drop_allocation(five_tuple, a);
                }
            }
            TcpCommand::DataClosed { connection_id } => {
                if let Some(b) = self.bound.remove(&connection_id) {
                    self.release(&b.alloc, b.peer);
                    debug!(connection_id, peer = %b.peer, "data connection closed");
                }
            }
        }
    }

    fn token(&mut self, source: Source) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        self.tokens.insert(t, source);
        t
    }

    /// A CONNECTION-ID unused here, unpredictable (it names a peer connection to whoever holds
    /// the user's credentials).
    fn new_connection_id(&self) -> u32 {
        loop {
            let id: u32 = rand::random();
            if id != 0
                && !self.connecting.contains_key(&id)
                && !self.pending.contains_key(&id)
                && !self.bound.contains_key(&id)
            {
                return id;
            }
        }
    }

    /// Checks the caps for a new connection of allocation `ft` to `peer` and counts it there and
    /// for its user; the `max-connections` slot it takes comes back with it. `Err` names the cap
    /// that refused it: 446 for a peer the allocation is connected to, 508 for the others.
    fn admit(&mut self, ft: FiveTuple, peer: SocketAddr, id: u32) -> Result<ConnectionSlot, ErrorCode> {
        let Some(a) = self.allocations.get(&ft) else { return Err(ErrorCode::AllocationMismatch) };
        if a.conns.contains_key(&peer) {
            return Err(ErrorCode::ConnectionAlreadyExists);
        }
        let c = &self.counters;
        if a.conns.len() >= MAX_CONNECTIONS_PER_ALLOCATION {
            c.refused_allocation.fetch_add(1, Ordering::Relaxed);
            return Err(ErrorCode::InsufficientCapacity);
        }
        if self.per_user.get(&a.user).copied().unwrap_or(0) >= self.limits.per_user {
            c.refused_user.fetch_add(1, Ordering::Relaxed);
            return Err(ErrorCode::InsufficientCapacity);
        }
        let Some(slot) = self.limits.connections.try_reserve(self.limits.max_connections) else {
            c.refused_node.fetch_add(1, Ordering::Relaxed);
            return Err(ErrorCode::InsufficientCapacity);
        };
        let user = a.user.clone();
        if let Some(a) = self.allocations.get_mut(&ft) {
            a.conns.insert(peer, id);
        }
        *self.per_user.entry(user).or_default() += 1;
        Ok(slot)
    }

    /// A connection of allocation `alloc` to `peer` ended (its `max-connections` slot went with
    /// it, or stays with the worker that holds it).
    fn release(&mut self, alloc: &FiveTuple, peer: SocketAddr) {
        let Some(a) = self.allocations.get_mut(alloc) else { return };
        if a.conns.remove(&peer).is_some() {
            let user = a.user.clone();
            self.user_released(&user, 1);
        }
    }

    fn user_released(&mut self, user: &Arc<str>, n: usize) {
        if let Some(c) = self.per_user.get_mut(user) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.per_user.remove(user);
            }
        }
    }

    fn log_counters(&self) {
        let c = &self.counters;
        info!(
            refused_allocation = c.refused_allocation.load(Ordering::Relaxed),
            refused_user = c.refused_user.load(Ordering::Relaxed),
            refused_node = c.refused_node.load(Ordering::Relaxed),
            "TCP relay stopped: peer connections refused by cap"
        );
    }

    /// Peers connecting to allocation `ft`'s relayed transport address (RFC 6062 §5.3).
    fn accept(&mut self, now: Instant, ft: FiveTuple) {
        loop {
            let Some(a) = self.allocations.get_mut(&ft) else { return };
            let (stream, peer) = match a.listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(session = a.session, "TCP relay: accept failed: {e}");
                    return;
                }
            };
            // §5.3: no permission, closed at once (dropping the stream closes it).
            let permitted = a.permissions.get(&peer.ip()).is_some_and(|&until| until > now);
            let (worker, session) = (a.worker, a.session);
            if !permitted {
                debug!(session, %peer, "peer connection refused: no permission");
                continue;
            }
            let id = self.new_connection_id();
            let slot = match self.admit(ft, peer, id) {
                Ok(slot) => slot,
                Err(code) => {
                    debug!(session, %peer, code = code.code(), "peer connection refused: over a cap");
                    continue;
                }
            };
            self.insert_pending(id, Pending { alloc: ft, peer, stream, deadline: now + BIND_TIMEOUT, slot });
            let n = connection_attempt(&mut self.buf, &peer, id);
            debug!(session, %peer, connection_id = id, "peer connected: ConnectionAttempt");
            self.send(worker, reply(ft, self.buf[..n].to_vec()));
        }
    }

    /// Connect (RFC 6062 §5.2) on allocation `ft` to `peer`.
    fn connect(&mut self, now: Instant, ft: FiveTuple, peer: SocketAddr, tid: TransactionId, key: IntegrityKey) {
        let Some(a) = self.allocations.get(&ft) else {
            // The allocation ended while the request was on its way.
            return self.answer_error(None, ft, Method::CONNECT, tid, ErrorCode::AllocationMismatch, key);
        };
        let (worker, relayed, session) = (a.worker, a.relayed, a.session);
        let id = self.new_connection_id();
        let slot = match self.admit(ft, peer, id) {
            Ok(slot) => slot,
            Err(code) => {
                debug!(session, %peer, code = code.code(), "Connect refused");
                return self.answer_error(Some(worker), ft, Method::CONNECT, tid, code, key);
            }
        };
        let started = relay_socket(relayed).and_then(|s| match s.connect(&peer.into()) {
            Ok(()) => Ok(s),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(s),
            Err(e) => Err(e),
        });
        let socket = match started {
            Ok(s) => s,
            Err(e) => {
                debug!(session, %peer, "Connect failed at once: {e}");
                self.release(&ft, peer);
                return self.answer_error(
                    Some(worker),
                    ft,
                    Method::CONNECT,
                    tid,
                    ErrorCode::ConnectionTimeoutOrFailure,
                    key,
                );
            }
        };
        let stream: TcpStream = socket.into();
        let token = self.token(Source::Connecting(id));
        let fd = stream.as_raw_fd();
        if self.poll.registry().register(&mut SourceFd(&fd), token, Interest::WRITABLE).is_err() {
            self.tokens.remove(&token);
            self.release(&ft, peer);
            return self.answer_error(Some(worker), ft, Method::CONNECT, tid, ErrorCode::ServerError, key);
        }
        let deadline = now + CONNECT_TIMEOUT;
        self.connect_deadlines.push_back((deadline, id));
        self.connecting.insert(id, Connecting { alloc: ft, peer, stream, token, tid, key, deadline, slot });
    }

    /// Holds `p` until its ConnectionBind or its deadline.
    fn insert_pending(&mut self, id: u32, p: Pending) {
        self.bind_deadlines.push_back((p.deadline, id));
        self.pending.insert(id, p);
    }

    /// Connect `id`'s socket became writable: connected, or failed.
    fn connected(&mut self, now: Instant, id: u32) {
        let Some(c) = self.connecting.get(&id) else { return };
        let failed = match c.stream.take_error() {
            Ok(Some(_)) | Err(_) => true,
            Ok(None) => match c.stream.peer_addr() {
                Ok(_) => false,
                // Not connected yet (a spurious wake-up): wait for the next event.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(_) => true,
            },
        };
        let Some(c) = self.connecting.remove(&id) else { return };
        self.tokens.remove(&c.token);
        let fd = c.stream.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        let Some(worker) = self.allocations.get(&c.alloc).map(|a| a.worker) else { return };
        if failed {
            self.release(&c.alloc, c.peer);
            debug!(peer = %c.peer, "Connect failed: 447");
            return self.answer_error(
                Some(worker),
                c.alloc,
                Method::CONNECT,
                c.tid,
                ErrorCode::ConnectionTimeoutOrFailure,
                c.key,
            );
        }
        let n = success_with_id(&mut self.buf, Method::CONNECT, c.tid, id, &c.key);
        debug!(peer = %c.peer, connection_id = id, "Connect succeeded");
        self.send(worker, reply(c.alloc, self.buf[..n].to_vec()));
        let p = Pending { alloc: c.alloc, peer: c.peer, stream: c.stream, deadline: now + BIND_TIMEOUT, slot: c.slot };
        self.insert_pending(id, p);
    }

    /// ConnectionBind (RFC 6062 §5.4): hands pending connection `id` to `worker` with the
    /// success response, or answers 400 (no such pending connection, or another user's: that
    /// one stays pending for its owner).
    fn bind(&mut self, id: u32, user: &str, data: FiveTuple, worker: usize, tid: TransactionId, key: IntegrityKey) {
        let owned =
            self.pending.get(&id).and_then(|p| self.allocations.get(&p.alloc)).is_some_and(|a| &*a.user == user);
        // Only its owner's ConnectionBind takes the pending connection out.
        let Some(p) = owned.then(|| self.pending.remove(&id)).flatten() else {
            let n =
                response::error(&mut self.buf, Method::CONNECTION_BIND, tid, ErrorCode::BadRequest, &[], Some(&key))
                    .unwrap_or(0);
            debug!(connection_id = id, client = %data.client, "ConnectionBind refused: 400");
            let response = self.buf[..n].to_vec();
            return self.send(worker, ToWorker::BindFailed { five_tuple: data, response });
        };
        if p.stream.set_nonblocking(true).is_err() {
            self.release(&p.alloc, p.peer);
            let n =
                response::error(&mut self.buf, Method::CONNECTION_BIND, tid, ErrorCode::ServerError, &[], Some(&key))
                    .unwrap_or(0);
            let response = self.buf[..n].to_vec();
            return self.send(worker, ToWorker::BindFailed { five_tuple: data, response });
        }
        let n = success_with_id(&mut self.buf, Method::CONNECTION_BIND, tid, id, &key);
        let response = self.buf[..n].to_vec();
        let session = self.allocations.get(&p.alloc).map_or(0, |a| a.session);
        info!(session, connection_id = id, peer = %p.peer, client = %data.client, worker, "data connection bound");
        self.bound.insert(id, Bound { alloc: p.alloc, peer: p.peer, worker, data });
        let bind = ToWorker::BindData { five_tuple: data, peer: p.stream, connection_id: id, response, slot: p.slot };
        self.send(worker, bind);
    }

    /// Closes what allocation `ft` held (RFC 6062 §5.5): O(its own connections).
    fn drop_allocation(&mut self, ft: FiveTuple, a: TcpAllocation) {
        self.tokens.remove(&a.token);
        let fd = a.listener.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        self.user_released(&a.user, a.conns.len());
        for (_, id) in a.conns {
            #[cfg(test)]
            {
                self.visited += 1;
            }
            if let Some(c) = self.connecting.remove(&id) {
                debug_assert!(c.alloc == ft);
                self.tokens.remove(&c.token);
                let fd = c.stream.as_raw_fd();
                let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            } else if self.pending.remove(&id).is_some() {
                // Dropped: the peer connection closes and its slot is given back.
            } else if let Some(b) = self.bound.remove(&id) {
                self.send(b.worker, ToWorker::CloseData { five_tuple: b.data });
            }
        }
        debug!(session = a.session, relayed = %a.relayed, "TCP allocation closed");
    }

    /// Connects that timed out earn 447; pending connections never bound are closed. O(the
    /// deadlines due): the queues are in deadline order.
    fn sweep(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.connect_deadlines.front() {
            if deadline > now {
                break;
            }
            self.connect_deadlines.pop_front();
            #[cfg(test)]
            {
                self.visited += 1;
            }
            // Still connecting, with this deadline (not an id that has moved on or was reused).
            if self.connecting.get(&id).is_none_or(|c| c.deadline != deadline) {
                continue;
            }
            let Some(c) = self.connecting.remove(&id) else { continue };
            self.tokens.remove(&c.token);
            let fd = c.stream.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            self.release(&c.alloc, c.peer);
            let worker = self.allocations.get(&c.alloc).map(|a| a.worker);
            self.answer_error(worker, c.alloc, Method::CONNECT, c.tid, ErrorCode::ConnectionTimeoutOrFailure, c.key);
        }
        while let Some(&(deadline, id)) = self.bind_deadlines.front() {
            if deadline > now {
                break;
            }
            self.bind_deadlines.pop_front();
            #[cfg(test)]
            {
                self.visited += 1;
            }
            if self.pending.get(&id).is_none_or(|p| p.deadline != deadline) {
                continue;
            }
            if let Some(p) = self.pending.remove(&id) {
                debug!(connection_id = id, peer = %p.peer, "peer connection closed: no ConnectionBind in 30 s");
                self.release(&p.alloc, p.peer);
            }
        }
    }

    /// Answers `method` with `code` on allocation `ft` (held by `worker`; nothing when unknown).
    fn answer_error(
        &mut self,
        worker: Option<usize>,
        ft: FiveTuple,
        method: Method,
        tid: TransactionId,
        code: ErrorCode,
        key: IntegrityKey,
    ) {
        let Some(worker) = worker else { return };
        let n = response::error(&mut self.buf, method, tid, code, &[], Some(&key)).unwrap_or(0);
        let bytes = self.buf[..n].to_vec();
        self.send(worker, reply(ft, bytes));
    }

    fn send(&self, worker: usize, msg: ToWorker) {
        if self.out.send((worker, msg)).is_ok() {
            self.control.unpark();
        }
    }
}

/// A success response to `method` carrying CONNECTION-ID `id`, signed with `key`.
fn success_with_id(buf: &mut [u8], method: Method, tid: TransactionId, id: u32, key: &IntegrityKey) -> usize {
    (|| {
        let mut w = response::start(buf, method, Class::Success, tid)?;
        w.bytes(attr::CONNECTION_ID, &id.to_be_bytes())?;
        response::seal(w, Some(key))
    })()
    .unwrap_or(0)
}

/// A ConnectionAttempt indication (RFC 6062 §4.5): XOR-PEER-ADDRESS and CONNECTION-ID.
fn connection_attempt(buf: &mut [u8], peer: &SocketAddr, id: u32) -> usize {
    (|| {
        let mut w =
            MessageWriter::new(buf, Method::CONNECTION_ATTEMPT, Class::Indication, TransactionId(rand::random()))?;
        w.xor_address(attr::XOR_PEER_ADDRESS, peer)?;
        w.bytes(attr::CONNECTION_ID, &id.to_be_bytes())?;
        response::seal(w, None)
    })()
    .unwrap_or(0)
}

fn reply(five_tuple: FiveTuple, bytes: Vec<u8>) -> ToWorker {
    ToWorker::Command(Command::Reply { five_tuple, bytes })
}

#[cfg(test)]
mod tests;
