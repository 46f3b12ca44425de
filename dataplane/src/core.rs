//! The backend-independent part of a worker: it feeds datagrams and commands to the
//! [`WorkerState`], keeps the relay sockets, and talks to the control plane. Each backend calls
//! it with the bytes it received and does what it returns.

use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::time::Instant;

use crossbeam_channel::Receiver;
use tracing::{debug, warn};
use uturn_proto::relay::{AllocationId, ClientOutput, Command, Effect, PeerOutput};
use uturn_proto::{FiveTuple, WorkerState};

use crate::messages::{EventSender, FromWorker, ToWorker};

/// Reply buffer size, bytes: every STUN response uturn builds fits.
const REPLY_BUF: usize = 1500;
/// Requests waiting for the control plane beyond which a worker drops new ones (the client
/// retransmits). Release reports are never dropped, so quotas never leak.
pub(crate) const MAX_PENDING_REQUESTS: usize = 4096;

/// What a backend does with I/O the core decides on.
pub(crate) trait Io {
    /// Start receiving on a new relay socket; datagrams come back tagged with `id`.
    fn register_relay(&mut self, id: AllocationId, socket: &UdpSocket);
    /// Stop receiving on a relay socket about to be closed.
    fn deregister_relay(&mut self, id: AllocationId, socket: &UdpSocket);
    /// Send `bytes` (a STUN response) to `to` from listener `listener`.
    fn send_reply(&mut self, listener: usize, to: SocketAddr, bytes: &[u8]);
}

/// A listening socket of this worker.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) socket: UdpSocket,
    pub(crate) addr: SocketAddr,
}

/// A relay socket and where its allocation's client is.
#[derive(Debug)]
pub(crate) struct Relay {
    pub(crate) id: AllocationId,
    pub(crate) socket: UdpSocket,
    /// Index of the listener the client's 5-tuple uses.
    pub(crate) listener: usize,
}

/// Where a client datagram goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientVerdict {
    /// Nothing to send.
    Done,
    /// Send `reply()` bytes back to the client.
    Reply(usize),
    /// Send `datagram[payload]` from relay slot `relay` to `peer`.
    ToPeer { relay: usize, peer: SocketAddr, payload: Range<usize> },
}

/// A worker's state apart from its I/O backend.
pub(crate) struct WorkerCore {
    pub(crate) index: usize,
    pub(crate) state: WorkerState,
    pub(crate) listeners: Vec<Listener>,
    /// Relay sockets indexed by allocation slab index.
    pub(crate) relays: Vec<Option<Relay>>,
    commands: Receiver<ToWorker>,
    /// Unbounded; requests are capped by [`MAX_PENDING_REQUESTS`].
    events: EventSender,
    reply: Vec<u8>,
    expired: Vec<(AllocationId, FiveTuple)>,
    /// Requests dropped because the control-plane queue was full.
    pub(crate) control_queue_full: u64,
    /// Test hook (`UTURN_FAULT_INJECTION=worker-panic`): panic on a datagram carrying
    /// [`FAULT_MARKER`], to exercise what a worker failure does to the process.
    pub(crate) fault_injection: bool,
}

/// The datagram content that makes a worker panic when fault injection is on.
pub(crate) const FAULT_MARKER: &[u8] = b"uturn-fault-injection:worker-panic";

impl WorkerCore {
    pub(crate) fn new(
        index: usize,
        state: WorkerState,
        listeners: Vec<Listener>,
        commands: Receiver<ToWorker>,
        events: EventSender,
    ) -> Self {
        WorkerCore {
            index,
            state,
            listeners,
            relays: Vec::new(),
            commands,
            events,
            reply: vec![0; REPLY_BUF],
            expired: Vec::new(),
            control_queue_full: 0,
            fault_injection: std::env::var("UTURN_FAULT_INJECTION").is_ok_and(|v| v == "worker-panic"),
        }
    }

    /// The reply written by the last [`ClientVerdict::Reply`].
    pub(crate) fn reply(&self, len: usize) -> &[u8] {
        &self.reply[..len]
    }

    /// A datagram from `from` on listener `listener`.
    #[inline]
    pub(crate) fn on_client(
        &mut self,
        now: Instant,
        listener: usize,
        from: SocketAddr,
        datagram: &[u8],
    ) -> ClientVerdict {
        if self.fault_injection && datagram.windows(FAULT_MARKER.len()).any(|w| w == FAULT_MARKER) {
            panic!("fault injection: worker {} told to panic by {from}", self.index);
        }
        let five_tuple = FiveTuple { client: from, server: self.listeners[listener].addr };
        match self.state.handle_client_datagram(now, &five_tuple, datagram, &mut self.reply) {
            ClientOutput::Relay { alloc, peer, payload } => {
                ClientVerdict::ToPeer { relay: alloc.index as usize, peer, payload }
            }
            ClientOutput::Reply(n) => ClientVerdict::Reply(n),
            ClientOutput::Drop => ClientVerdict::Done,
            ClientOutput::Authenticate => {
                if self.events.len() >= MAX_PENDING_REQUESTS {
                    // Never block the data plane on the control plane; the client retransmits.
                    self.control_queue_full += 1;
                } else {
                    let req = FromWorker::Request { worker: self.index, five_tuple, bytes: datagram.to_vec() };
                    let _ = self.events.send(req);
                }
                ClientVerdict::Done
            }
        }
    }

    /// A datagram from `peer` on relay slot `relay` (tagged with `generation`), its payload at
    /// `buf[payload]`. Returns the listener, client address and framed message range.
    #[inline]
    pub(crate) fn on_peer(
        &mut self,
        now: Instant,
        relay: usize,
        generation: u32,
        peer: SocketAddr,
        buf: &mut [u8],
        payload: Range<usize>,
    ) -> Option<(usize, SocketAddr, Range<usize>)> {
        let r = self.relays.get(relay)?.as_ref()?;
        if r.id.generation != generation {
            return None;
        }
        let listener = r.listener;
        match self.state.handle_peer_datagram(now, r.id, peer, buf, payload) {
            PeerOutput::ToClient { five_tuple, message } => Some((listener, five_tuple.client, message)),
            PeerOutput::Drop => None,
        }
    }

    /// True when control-plane commands are queued (checked before the worker sleeps).
    pub(crate) fn commands_pending(&self) -> bool {
        !self.commands.is_empty()
    }

    /// Applies every queued control-plane command.
    pub(crate) fn drain_commands(&mut self, now: Instant, io: &mut impl Io) {
        while let Ok(msg) = self.commands.try_recv() {
            let (cmd, socket) = match msg {
                ToWorker::Install(i, s) => (Command::Install(i), Some(s)),
                ToWorker::Command(c) => (c, None),
            };
            let out = self.state.handle_command(now, cmd, &mut self.reply);
            let listener = self.listener_of(&out.five_tuple);
            match (out.effect, socket) {
                (Effect::Installed(id), Some(socket)) => {
                    io.register_relay(id, &socket);
                    let slot = id.index as usize;
                    if self.relays.len() <= slot {
                        self.relays.resize_with(slot + 1, || None);
                    }
                    self.relays[slot] = Some(Relay { id, socket, listener });
                    debug!(worker = self.index, client = %out.five_tuple.client, "allocation installed");
                }
                (Effect::InstallRefused, _) => self.release(out.five_tuple),
                (Effect::Removed(id), _) => {
                    self.close_relay(id, io);
                    self.release(out.five_tuple);
                }
                _ => {}
            }
            if out.reply_len > 0 {
                io.send_reply(listener, out.five_tuple.client, &self.reply[..out.reply_len]);
            }
        }
    }

    /// Expires what is due; closes the relay sockets of expired allocations.
    pub(crate) fn expire(&mut self, now: Instant, io: &mut impl Io) {
        let mut expired = std::mem::take(&mut self.expired);
        self.state.handle_timeout(now, &mut expired);
        for (id, ft) in expired.drain(..) {
            debug!(worker = self.index, client = %ft.client, "allocation expired");
            self.close_relay(id, io);
            self.release(ft);
        }
        self.expired = expired;
    }

    /// Removes every allocation (shutdown).
    pub(crate) fn close_all(&mut self, io: &mut impl Io) {
        for (id, _) in self.state.drain() {
            self.close_relay(id, io);
        }
    }

    fn close_relay(&mut self, id: AllocationId, io: &mut impl Io) {
        if let Some(slot) = self.relays.get_mut(id.index as usize) {
            if matches!(slot, Some(r) if r.id == id) {
                if let Some(r) = slot.take() {
                    io.deregister_relay(id, &r.socket);
                }
            }
        }
    }

    fn release(&mut self, five_tuple: FiveTuple) {
        if self.events.send(FromWorker::Released { five_tuple }).is_err() {
            warn!(worker = self.index, "control plane gone: allocation release not reported");
        }
    }

    fn listener_of(&self, ft: &FiveTuple) -> usize {
        self.listeners.iter().position(|l| l.addr == ft.server).unwrap_or(0)
    }
}
