//! Spawning a worker thread and the handle the control plane keeps for it.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Sender, TrySendError};
use tracing::{error, info};
use uturn_proto::nonce::Challenger;
use uturn_proto::relay::{Counters, RelayConfig};
use uturn_proto::WorkerState;

use crate::core::{Listener, WorkerCore};
use crate::messages::{EventSender, ToWorker};
use crate::socket::bind_listener;
use crate::sys::Waker;

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
    /// Listen addresses (each bound with SO_REUSEPORT).
    pub listen: Vec<SocketAddr>,
    /// The I/O backend.
    pub backend: IoBackend,
    /// Permission and channel lifetimes.
    pub relay: RelayConfig,
    /// Capacity of the command queue from the control plane, in messages.
    pub command_queue: usize,
    /// Lets the worker answer unauthenticated requests with 401 itself (shared nonce key).
    pub challenger: Option<Challenger>,
}

/// The control plane's handle on a running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    index: usize,
    commands: Sender<ToWorker>,
    waker: Arc<Waker>,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<Counters>>,
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

    /// Waits for the worker thread to end and returns its final counters.
    pub fn join(mut self) -> Option<Counters> {
        self.thread.take().and_then(|t| t.join().ok())
    }

    /// True once the worker thread has ended (for example after a panic).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

/// Binds the worker's listeners (so bind errors surface here) and starts its thread.
/// `events` is the shared queue to the control plane.
pub fn spawn(cfg: WorkerConfig, events: EventSender) -> io::Result<WorkerHandle> {
    let mut listeners = Vec::with_capacity(cfg.listen.len());
    for addr in &cfg.listen {
        let socket = bind_listener(*addr).map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
        listeners.push(Listener { socket, addr: *addr });
    }
    let (tx, rx) = crossbeam_channel::bounded(cfg.command_queue);
    let waker = Arc::new(Waker::new()?);
    let shutdown = Arc::new(AtomicBool::new(false));
    let (w, s) = (waker.clone(), shutdown.clone());
    let index = cfg.index;
    let thread = std::thread::Builder::new().name(format!("uturn-worker-{index}")).spawn(move || {
        if let Some(core) = cfg.core {
            if !core_affinity::set_for_current(core) {
                tracing::warn!(worker = index, core = core.id, "could not pin worker to core");
            }
        }
        let mut state = WorkerState::new(cfg.relay, Instant::now(), rand::random());
        if let Some(c) = cfg.challenger {
            state.set_challenger(c);
        }
        let core = WorkerCore::new(index, state, listeners, rx, events);
        let result = run(core, cfg.backend, &w, &s);
        match result {
            Ok(c) => c,
            Err(e) => {
                error!(worker = index, backend = cfg.backend.name(), "worker failed: {e}");
                Counters::default()
            }
        }
    })?;
    info!(worker = index, backend = cfg.backend.name(), "worker started");
    Ok(WorkerHandle { index, commands: tx, waker, shutdown, thread: Some(thread) })
}

fn run(core: WorkerCore, backend: IoBackend, waker: &Waker, shutdown: &AtomicBool) -> io::Result<Counters> {
    let counters = std::cell::Cell::new(Counters::default());
    let finish = |c: &WorkerCore| {
        counters.set(*c.state.counters());
        if c.control_queue_full > 0 {
            tracing::warn!(
                worker = c.index,
                dropped = c.control_queue_full,
                "requests dropped: control-plane queue full"
            );
        }
    };
    match backend {
        IoBackend::Uring => crate::uring::run(core, waker, shutdown, finish)?,
        IoBackend::Epoll => crate::epoll::run(core, waker, shutdown, finish)?,
    }
    Ok(counters.get())
}
