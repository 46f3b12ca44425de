//! Spawning a worker thread and the handle the control plane keeps for it.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Sender, TrySendError};
use tracing::{error, info};
use uturn_proto::nonce::Challenger;
use uturn_proto::relay::{AllocationSnapshot, Counters, ImportError, RelayConfig};
use uturn_proto::WorkerState;

use crate::core::{ClientPath, Listener, Relay, WorkerCore};
use crate::messages::{EventSender, ToWorker};
use crate::metrics::WorkerMetrics;
use crate::proxy::{DatagramProxy, ProxyProtocol};
use crate::socket::{bind_listener, bind_stream_listener};
use crate::stream::tls::TlsServer;
use crate::stream::{ConnectionCount, StreamLimits, StreamListener, Streams};
use crate::sys::Waker;
use crate::xdp::{WorkerRoutes, XdpMaps};
use uturn_proto::ListenAddr;

/// Which I/O backend a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    /// io_uring: multishot receive into provided buffers, relayed datagrams sent in place from
    /// the receive buffer as batched `Send` ops (the kernel still copies the payload; these are
    /// not `SendZc` zero-copy sends).
    Uring,
    /// epoll through mio: one system call per datagram.
    Epoll,
}

impl IoBackend {
    /// Lower-case name, as `--io-backend` spells it.
    pub fn name(self) -> &'static str {
        match self {
            IoBackend::Uring => "uring",
            IoBackend::Epoll => "epoll",
        }
    }
}

/// How to start one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Worker index, 0-based.
    pub index: usize,
    /// Core to pin the thread to, if any.
    pub core: Option<core_affinity::CoreId>,
    /// UDP listen addresses (each bound with SO_REUSEPORT).
    pub listen: Vec<SocketAddr>,
    /// TCP and TLS listen addresses (each bound with SO_REUSEPORT).
    pub stream_listen: Vec<ListenAddr>,
    /// Caps and deadlines of client connections.
    pub stream_limits: StreamLimits,
    /// The TLS server side (certificate and ALPN), needed by `tls://` listen addresses.
    pub tls: Option<TlsServer>,
    /// Connections open on the whole relay (one count shared by every worker).
    pub connections: ConnectionCount,
    /// The I/O backend.
    pub backend: IoBackend,
    /// Permission and channel lifetimes.
    pub relay: RelayConfig,
    /// Capacity of the command queue from the control plane, in messages.
    pub command_queue: usize,
    /// Lets the worker answer unauthenticated requests with 401 itself (shared nonce key).
    pub challenger: Option<Challenger>,
    /// Where the worker publishes its counters (kept by the caller across a resume).
    pub metrics: Arc<WorkerMetrics>,
    /// The XDP fast path's maps, when it runs: the worker installs its channel routes there.
    pub xdp: Option<Arc<XdpMaps>>,
    /// PROXY protocol from trusted load balancers on the TCP/TLS and UDP listeners.
    pub proxy: ProxyProtocol,
}

/// How a worker starts.
#[derive(Debug)]
pub enum Start {
    /// Bind new listener sockets; no allocations.
    Fresh,
    /// Serve a frozen worker's sockets and state: this process's own after a failed hot
    /// upgrade, or the previous process's (see [`FrozenWorker::adopt`]).
    Resume(Box<FrozenWorker>),
}

/// A worker stopped for a hot upgrade: its listener and relay sockets, still open and still in
/// their SO_REUSEPORT group, and its tables. No receive is armed on any of them, so every
/// datagram that arrives meanwhile waits in the socket's buffer for whoever serves it next.
#[derive(Debug)]
pub struct FrozenWorker {
    state: WorkerState,
    listeners: Vec<Listener>,
    /// TCP listeners (kept for a resume in this process; a new process binds its own).
    stream_listeners: Vec<StreamListener>,
    relays: Vec<Option<Relay>>,
    /// The worker's handle on this process's XDP maps (`None` in an adopted worker: the new
    /// process installs its routes in its own maps).
    routes: Option<WorkerRoutes>,
}

/// How a worker thread ended.
#[derive(Debug)]
pub struct WorkerExit {
    /// Its final counters.
    pub counters: Counters,
    /// Its sockets and state when it was frozen ([`WorkerHandle::freeze`]); `None` after a stop.
    pub frozen: Option<FrozenWorker>,
}

impl FrozenWorker {
    /// The listener sockets, in the order of the worker's `listen` addresses.
    pub fn listeners(&self) -> impl Iterator<Item = &UdpSocket> {
        self.listeners.iter().map(|l| &l.socket)
    }

    /// The TCP listener sockets, in the order of the worker's `stream_listen` addresses.
    pub fn stream_listeners(&self) -> impl Iterator<Item = &std::net::TcpListener> {
        self.stream_listeners.iter().map(|l| &l.socket)
    }

    /// A snapshot of every live allocation at `now`, with its relay socket (and a dual
    /// allocation's second one).
    pub fn export(&self, now: Instant) -> Vec<(AllocationSnapshot, &UdpSocket, Option<&UdpSocket>)> {
        self.state
            .export(now)
            .into_iter()
            .filter_map(|(id, snap)| match self.relays.get(id.index as usize) {
                Some(Some(r)) if r.id == id => Some((snap, &r.socket, r.additional.as_ref())),
                _ => None,
            })
            .collect()
    }

    /// Allocations held.
    pub fn allocations(&self) -> usize {
        self.state.tables().allocation_count()
    }

    /// A worker for `cfg` that serves another process's sockets: `listeners` in the order of
    /// `cfg.listen` (each must be bound to its address), `stream_listeners` in the order of
    /// `cfg.stream_listen` (none: it binds its own; connections that queued meanwhile in the old
    /// process's backlog are then reset when it exits), and each allocation with its relay
    /// socket(s). Snapshots the tables refuse are returned with their error (their sockets close).
    pub fn adopt(
        cfg: &WorkerConfig,
        now: Instant,
        listeners: Vec<UdpSocket>,
        stream_listeners: Vec<std::net::TcpListener>,
        allocations: Vec<(AllocationSnapshot, UdpSocket, Option<UdpSocket>)>,
    ) -> io::Result<(FrozenWorker, Vec<(u64, ImportError)>)> {
        if listeners.len() != cfg.listen.len() {
            return Err(io::Error::other(format!(
                "worker {}: {} listener sockets handed over for {} listen addresses",
                cfg.index,
                listeners.len(),
                cfg.listen.len()
            )));
        }
        let mut ls = Vec::with_capacity(listeners.len());
        for (socket, addr) in listeners.into_iter().zip(&cfg.listen) {
            let bound = socket.local_addr()?;
            if bound != *addr {
                return Err(io::Error::other(format!("listener bound to {bound}, configured {addr}")));
            }
            socket.set_nonblocking(true)?;
            ls.push(Listener { socket, addr: *addr });
        }
        let mut state = new_state(cfg);
        let mut relays: Vec<Option<Relay>> = Vec::new();
        let mut refused = Vec::new();
        for (snap, socket, additional) in allocations {
            let (session, ft) = (snap.session, snap.five_tuple);
            match state.import(now, snap) {
                Ok(id) => {
                    socket.set_nonblocking(true)?;
                    if let Some(a) = &additional {
                        a.set_nonblocking(true)?;
                    }
                    let slot = id.index as usize;
                    if relays.len() <= slot {
                        relays.resize_with(slot + 1, || None);
                    }
                    let listener = cfg.listen.iter().position(|a| *a == ft.server).unwrap_or(0);
                    relays[slot] = Some(Relay::new(id, socket, additional, ClientPath::Datagram(listener)));
                }
                Err(e) => refused.push((session, e)),
            }
        }
        let stream_listeners = if stream_listeners.is_empty() {
            bind_stream_listeners(cfg)?
        } else {
            if stream_listeners.len() != cfg.stream_listen.len() {
                return Err(io::Error::other(format!(
                    "worker {}: {} TCP listeners handed over for {} tcp/tls listen addresses",
                    cfg.index,
                    stream_listeners.len(),
                    cfg.stream_listen.len()
                )));
            }
            let mut ls = Vec::with_capacity(stream_listeners.len());
            for (socket, l) in stream_listeners.into_iter().zip(&cfg.stream_listen) {
                let bound = socket.local_addr()?;
                if bound != l.addr {
                    return Err(io::Error::other(format!("TCP listener bound to {bound}, configured {l}")));
                }
                socket.set_nonblocking(true)?;
                ls.push(StreamListener { socket, addr: l.addr, transport: l.transport });
            }
            ls
        };
        Ok((FrozenWorker { state, listeners: ls, stream_listeners, relays, routes: None }, refused))
    }
}

/// Binds `cfg`'s TCP listeners.
fn bind_stream_listeners(cfg: &WorkerConfig) -> io::Result<Vec<StreamListener>> {
    cfg.stream_listen
        .iter()
        .map(|l| {
            let socket =
                bind_stream_listener(l.addr).map_err(|e| io::Error::new(e.kind(), format!("bind {l}: {e}")))?;
            Ok(StreamListener { socket, addr: l.addr, transport: l.transport })
        })
        .collect()
}

fn new_state(cfg: &WorkerConfig) -> WorkerState {
    let mut state = WorkerState::new(cfg.relay, Instant::now(), rand::random());
    if let Some(c) = &cfg.challenger {
        state.set_challenger(c.clone());
    }
    state
}

/// The control plane's handle on a running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    index: usize,
    commands: Sender<ToWorker>,
    waker: Arc<Waker>,
    shutdown: Arc<AtomicBool>,
    freeze: Arc<AtomicBool>,
    thread: Option<JoinHandle<WorkerExit>>,
}

impl WorkerHandle {
    /// The worker's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Queues `msg` for the worker and wakes it if it sleeps (an awake worker drains its
    /// queue before it next sleeps, so no system call is spent on it). Never blocks: when the
    /// queue is full the message is handed back (the client will retransmit).
    pub fn send(&self, msg: ToWorker) -> Result<(), ToWorker> {
        match self.commands.try_send(msg) {
            Ok(()) => {
                self.waker.wake_if_sleeping();
                Ok(())
            }
            Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => Err(m),
        }
    }

    /// Asks the worker to stop (it closes its allocations' sockets on the way out).
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
        self.waker.wake();
    }

    /// Asks the worker to stop for a hot upgrade: it cancels its receives, finishes the sends
    /// in flight and the commands queued, and hands back its sockets and tables
    /// ([`WorkerExit::frozen`]) instead of closing them.
    pub fn freeze(&self) {
        self.freeze.store(true, Ordering::Relaxed);
        self.stop();
    }

    /// Waits for the worker thread to end; `None` if it panicked.
    pub fn join(mut self) -> Option<WorkerExit> {
        self.thread.take().and_then(|t| t.join().ok())
    }

    /// True once the worker thread has ended (for example after a panic).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

/// Starts a worker thread: with [`Start::Fresh`] it binds its listeners first (so bind errors
/// surface here). `events` is its queue to the control plane.
pub fn spawn(cfg: WorkerConfig, events: EventSender, start: Start) -> io::Result<WorkerHandle> {
    let (mut state, listeners, stream_listeners, relays, routes) = match start {
        Start::Fresh => {
            let mut listeners = Vec::with_capacity(cfg.listen.len());
            for addr in &cfg.listen {
                let socket = bind_listener(*addr).map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
                listeners.push(Listener { socket, addr: *addr });
            }
            (new_state(&cfg), listeners, bind_stream_listeners(&cfg)?, Vec::new(), None)
        }
        Start::Resume(f) => {
            let f = *f;
            (f.state, f.listeners, f.stream_listeners, f.relays, f.routes)
        }
    };
    // A resumed worker of this process keeps its routes; a fresh or adopted one starts its own.
    let routes = match (routes, &cfg.xdp) {
        (Some(r), _) => Some(r),
        (None, Some(maps)) => {
            if state.enable_offload(maps.slots(cfg.index)) {
                Some(maps.worker_routes(cfg.index)?)
            } else {
                tracing::warn!(
                    worker = cfg.index,
                    "bandwidth cap set: channel bindings stay on the socket path, not XDP"
                );
                None
            }
        }
        (None, None) => None,
    };
    let (tx, rx) = crossbeam_channel::bounded(cfg.command_queue);
    let waker = Arc::new(Waker::new()?);
    let shutdown = Arc::new(AtomicBool::new(false));
    let freeze = Arc::new(AtomicBool::new(false));
    let (w, s, f) = (waker.clone(), shutdown.clone(), freeze.clone());
    let index = cfg.index;
    let thread = std::thread::Builder::new().name(format!("uturn-worker-{index}")).spawn(move || {
        if let Some(core) = cfg.core {
            if !core_affinity::set_for_current(core) {
                tracing::warn!(worker = index, core = core.id, "could not pin worker to core");
            }
        }
        let streams =
            Streams::new(cfg.stream_limits.clone(), cfg.tls.clone(), cfg.connections.clone(), cfg.proxy.clone());
        let mut core = WorkerCore::new(
            index,
            state,
            listeners,
            stream_listeners,
            streams,
            relays,
            rx,
            events,
            cfg.metrics.clone(),
        );
        core.routes = routes;
        if cfg.proxy.datagrams {
            core.proxied = Some(DatagramProxy::new(cfg.proxy.clone()));
        }
        let stop = Stop { shutdown: &s, freeze: &f };
        let result = match cfg.backend {
            IoBackend::Uring => crate::uring::run(core, &w, stop),
            IoBackend::Epoll => crate::epoll::run(core, &w, stop),
        };
        match result {
            Ok(mut core) => {
                core.collect_offloaded();
                core.publish();
                if core.control_queue_full > 0 {
                    tracing::warn!(
                        worker = index,
                        dropped = core.control_queue_full,
                        "requests dropped: control-plane queue full"
                    );
                }
                let counters = *core.state.counters();
                let frozen = f.load(Ordering::Relaxed).then(|| {
                    let WorkerCore { state, listeners, stream_listeners, relays, routes, .. } = core;
                    FrozenWorker { state, listeners, stream_listeners, relays, routes }
                });
                WorkerExit { counters, frozen }
            }
            Err(e) => {
                error!(worker = index, backend = cfg.backend.name(), "worker failed: {e}");
                WorkerExit { counters: Counters::default(), frozen: None }
            }
        }
    })?;
    info!(worker = index, backend = cfg.backend.name(), "worker started");
    Ok(WorkerHandle { index, commands: tx, waker, shutdown, freeze, thread: Some(thread) })
}

/// What a backend's loop watches: `shutdown` ends it; with `freeze` also set, the backend
/// quiesces its sockets and keeps its allocations instead of closing them.
#[derive(Clone, Copy)]
pub(crate) struct Stop<'a> {
    pub(crate) shutdown: &'a AtomicBool,
    pub(crate) freeze: &'a AtomicBool,
}

impl Stop<'_> {
    pub(crate) fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }
    pub(crate) fn freezing(&self) -> bool {
        self.freeze.load(Ordering::Relaxed)
    }
}
