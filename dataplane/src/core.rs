//! The backend-independent part of a worker: it feeds datagrams and commands to the
//! [`WorkerState`], keeps the relay sockets, and talks to the control plane. Each backend calls
//! it with the bytes it received and does what it returns.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;
use tracing::{debug, info, warn};
use uturn_proto::relay::{AllocationId, ClientOutput, Command, Effect, Ended, OffloadEvent, PeerOutput, Traffic};
use uturn_proto::wire::stream::channel_data_padding;
use uturn_proto::wire::{self as wire, DatagramKind};
use uturn_proto::wire::{Class, Message, Method, TransactionId};
use uturn_proto::{FiveTuple, Transport, WorkerState};

use crate::hold::{HoldLimits, Holds};
use crate::messages::{EventSender, FromWorker, ToWorker};
use crate::metrics::{Turnaround, WorkerMetrics, WorkerSample, PUBLISH_INTERVAL};
use crate::stream::{CloseReason, ConnId, Connection, Role, StreamListener, Streams};
use crate::xdp::WorkerRoutes;

/// Reply buffer size, bytes: every STUN response uturn builds fits.
const REPLY_BUF: usize = 1500;
/// Requests admitted on their source's budget (not verified in the worker) that may wait in this
/// worker's own queue to the control plane (counted apart from the other events); beyond it new
/// ones are dropped (the client
/// retransmits). Each worker has its own queue and the control thread takes from them in turn, so
/// a flood that fills one worker's queue cannot take the others' turns.
pub(crate) const MAX_PENDING_REQUESTS: usize = 1024;
/// Events in the queue beyond which any request, even one the worker verified (Refresh,
/// CreatePermission, ChannelBind on a live allocation), is dropped. Release reports are never
/// dropped, so quotas never leak.
pub(crate) const MAX_PENDING_EVENTS: usize = 4 * MAX_PENDING_REQUESTS;

/// What a backend does with I/O the core decides on.
pub(crate) trait Io {
    /// Start receiving on a new relay socket; datagrams come back tagged with `id`.
    fn register_relay(&mut self, id: AllocationId, socket: &UdpSocket);
    /// Stop receiving on a relay socket about to be closed.
    fn deregister_relay(&mut self, id: AllocationId, socket: &UdpSocket);
    /// Start receiving on a dual allocation's second relay socket (tagged as `id`'s additional).
    fn register_additional(&mut self, id: AllocationId, socket: &UdpSocket);
    /// Stop receiving on a dual allocation's second relay socket about to be closed.
    fn deregister_additional(&mut self, id: AllocationId, socket: &UdpSocket);
    /// Send `bytes` (a STUN response) to `to` from listener `listener`.
    fn send_reply(&mut self, listener: usize, to: SocketAddr, bytes: &[u8]);
    /// Send `bytes` (copied: they sit in a connection's buffer) from allocation `id`'s relay
    /// socket to `peer`.
    fn send_to_peer(&mut self, id: AllocationId, socket: &UdpSocket, peer: SocketAddr, bytes: &[u8]);
    /// Send `bytes` (copied) from a dual allocation's second relay socket to `peer`.
    fn send_to_peer_additional(&mut self, socket: &UdpSocket, peer: SocketAddr, bytes: &[u8]);
    /// Start receiving on a connection the worker did not accept (an RFC 6062 peer data
    /// connection); false when it cannot (the caller closes it).
    fn open_stream(&mut self, id: ConnId, socket: &TcpStream) -> bool;
    /// Forget a connection about to be closed (its socket is shut down right after).
    fn close_stream(&mut self, id: ConnId, socket: &TcpStream);
    /// Stop reading connection `id` for now (its [`Connection::paused`] is set).
    fn pause_stream(&mut self, id: ConnId, socket: &TcpStream);
    /// Read connection `id` again (its [`Connection::paused`] is cleared).
    fn resume_stream(&mut self, id: ConnId, socket: &TcpStream);
}

/// Where an allocation's client is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientPath {
    /// By datagram, from this listener (index into the worker's UDP listeners).
    Datagram(usize),
    /// On this connection.
    Stream(ConnId),
}

/// Where a peer datagram went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerVerdict {
    /// Dropped (counted).
    Drop,
    /// Send `buf[message]` from UDP listener `listener` to `client`.
    Datagram { listener: usize, client: SocketAddr, message: Range<usize> },
    /// Copied into a connection's write queue (flushed with the dirty connections).
    Queued,
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
    /// A dual allocation's second relay socket (the other family, RFC 8656 §7.2).
    pub(crate) additional: Option<UdpSocket>,
    /// The first socket's family is IPv6 (so the second one's is IPv4).
    pub(crate) first_v6: bool,
    /// How the allocation's client is reached.
    pub(crate) client: ClientPath,
}

impl Relay {
    /// The socket that sends to `peer` (the one of its family) and whether it is the
    /// additional one.
    #[inline]
    pub(crate) fn socket_for(&self, peer: &SocketAddr) -> (&UdpSocket, bool) {
        match &self.additional {
            Some(a) if self.first_v6 != peer.is_ipv6() => (a, true),
            _ => (&self.socket, false),
        }
    }

    /// A relay whose first socket is `socket` (its family read once, here).
    pub(crate) fn new(id: AllocationId, socket: UdpSocket, additional: Option<UdpSocket>, client: ClientPath) -> Self {
        let first_v6 = socket.local_addr().is_ok_and(|a| a.is_ipv6());
        Relay { id, socket, additional, first_v6, client }
    }
}

/// Where a client datagram goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientVerdict {
    /// Nothing to send.
    Done,
    /// A request went to the control plane (which answers); `verified` when its
    /// MESSAGE-INTEGRITY verified in the worker.
    Forwarded { verified: bool },
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
    /// TCP listeners (`tcp://` and `tls://` listen addresses).
    pub(crate) stream_listeners: Vec<StreamListener>,
    /// Client connections (TURN over TCP and TLS).
    pub(crate) streams: Streams,
    /// Relay sockets indexed by allocation slab index.
    pub(crate) relays: Vec<Option<Relay>>,
    commands: Receiver<ToWorker>,
    /// This worker's own queue to the control plane; unbounded, requests are capped by
    /// [`MAX_PENDING_REQUESTS`] and [`MAX_PENDING_EVENTS`].
    events: EventSender,
    reply: Vec<u8>,
    expired: Vec<Ended>,
    /// Requests dropped because this worker's control-plane queue was full.
    pub(crate) control_queue_full: u64,
    /// Where the counters are published for the exporter.
    metrics: Arc<WorkerMetrics>,
    /// When the counters are next published.
    next_publish: Instant,
    /// This worker's channel routes in the XDP fast path, when it runs.
    pub(crate) routes: Option<WorkerRoutes>,
    offload_events: Vec<OffloadEvent>,
    /// Fast-path traffic of routes removed after their allocation ended, added to its
    /// [`Ended`] before that is logged (cleared every loop iteration).
    offload_credit: Vec<(AllocationId, Traffic, Traffic)>,
    /// Route map updates the kernel refused (a full map): those bindings stay on the socket path.
    pub(crate) offload_refused: u64,
    /// Each 5-tuple's datagrams held behind its request at the control plane (order within a
    /// 5-tuple, `hold.rs`).
    holds: Holds,
    /// From a request's receipt to its answer applied, for the requests held for.
    turnaround: Turnaround,
    /// 5-tuples whose hold is overdue (reused buffer).
    overdue_holds: Vec<FiveTuple>,
    /// The trace filter this worker last read (`trace.rs`; used only while a trace is active).
    tap: crate::trace::WorkerTap,
    /// Test hook, compiled only with the `fault-injection` feature (which only the end-to-end
    /// tests enable): panic on a datagram carrying [`crate::fault::MARKER`].
    #[cfg(feature = "fault-injection")]
    fault_injection: bool,
    /// `proxy-protocol-udp`: datagrams carry a PROXY v2 header; the balancers' return paths.
    pub(crate) proxied: Option<crate::proxy::DatagramProxy>,
}

impl WorkerCore {
    /// A core serving `state` on `listeners`; `relays` are the relay sockets of the allocations
    /// `state` already holds (by slab index), which the backend registers when it starts.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        index: usize,
        state: WorkerState,
        listeners: Vec<Listener>,
        stream_listeners: Vec<StreamListener>,
        streams: Streams,
        relays: Vec<Option<Relay>>,
        commands: Receiver<ToWorker>,
        events: EventSender,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        WorkerCore {
            index,
            state,
            listeners,
            stream_listeners,
            streams,
            relays,
            commands,
            events,
            reply: vec![0; REPLY_BUF],
            expired: Vec::new(),
            control_queue_full: 0,
            metrics,
            next_publish: Instant::now(),
            routes: None,
            offload_events: Vec::new(),
            offload_credit: Vec::new(),
            offload_refused: 0,
            holds: Holds::new(HoldLimits::default()),
            turnaround: Turnaround::default(),
            overdue_holds: Vec::new(),
            tap: crate::trace::WorkerTap::default(),
            #[cfg(feature = "fault-injection")]
            fault_injection: crate::fault::enabled(),
            proxied: None,
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
        #[cfg(feature = "fault-injection")]
        crate::fault::check(self.fault_injection, self.index, from, datagram);
        if self.proxied.is_some() {
            return self.on_proxied_datagram(now, listener, from, datagram);
        }
        let five_tuple = FiveTuple::udp(from, self.listeners[listener].addr);
        self.on_message(now, &five_tuple, datagram)
    }

    /// One message from a client (a UDP datagram, or one framed on a connection). While a trace
    /// is active it goes through [`Self::on_message_traced`] (one branch otherwise).
    #[inline]
    fn on_message(&mut self, now: Instant, five_tuple: &FiveTuple, datagram: &[u8]) -> ClientVerdict {
        if crate::trace::active() {
            return self.on_message_traced(now, five_tuple, datagram);
        }
        self.handle_message(now, five_tuple, datagram)
    }

    /// One message from a client, untraced.
    #[inline]
    fn handle_message(&mut self, now: Instant, five_tuple: &FiveTuple, datagram: &[u8]) -> ClientVerdict {
        if self.holds.holds(five_tuple) {
            // A request of this 5-tuple is at the control plane: what follows it waits, in
            // order, and is handled once the answer is applied (or dropped past the bounds).
            if !self.holds.push(five_tuple, datagram) {
                // Past the hold's bounds: dropped, but a request over TCP/TLS, whose client does
                // not retransmit, hears 508.
                if let Some(n) = crate::stream::refusal(&mut self.reply, five_tuple, datagram) {
                    self.streams.counters.refusals += 1;
                    return ClientVerdict::Reply(n);
                }
            }
            return ClientVerdict::Done;
        }
        match self.state.handle_client_datagram(now, five_tuple, datagram, &mut self.reply) {
            ClientOutput::Relay { alloc, peer, payload } => {
                ClientVerdict::ToPeer { relay: alloc.index as usize, peer, payload }
            }
            ClientOutput::Reply(n) => ClientVerdict::Reply(n),
            ClientOutput::Drop => ClientVerdict::Done,
            ClientOutput::Authenticate { verified } => {
                let full = self.events.len() >= MAX_PENDING_EVENTS
                    || (!verified && self.events.unverified() >= MAX_PENDING_REQUESTS);
                if full {
                    // Never block the data plane on the control plane; a UDP client retransmits,
                    // one over TCP/TLS does not and hears 508 instead.
                    self.control_queue_full += 1;
                    if let Some(n) = crate::stream::refusal(&mut self.reply, five_tuple, datagram) {
                        self.streams.counters.refusals += 1;
                        return ClientVerdict::Reply(n);
                    }
                } else {
                    let req = FromWorker::Request {
                        worker: self.index,
                        five_tuple: *five_tuple,
                        bytes: datagram.to_vec(),
                        verified,
                        received: now,
                    };
                    // Only a request verified with the allocation's key holds its 5-tuple: an
                    // unsigned or forged one (a spoofed UDP source) never delays a client's media.
                    if self.events.send(req).is_ok() && verified {
                        if let Some(tid) = held_for(datagram) {
                            self.holds.begin(*five_tuple, tid, now);
                        }
                    }
                    return ClientVerdict::Forwarded { verified };
                }
                ClientVerdict::Done
            }
        }
    }

    /// A connection accepted on stream listener `listener`; `None` when a cap refused it (the
    /// caller drops the socket, which closes it).
    pub(crate) fn on_accept(&mut self, now: Instant, listener: usize, socket: TcpStream) -> Option<ConnId> {
        let l = self.stream_listeners.get(listener)?;
        let (server, transport) = (l.addr, l.transport);
        let client = socket.peer_addr().ok()?;
        let five_tuple = FiveTuple { client, server, transport };
        let id = self.streams.admit(now, socket, five_tuple);
        match id {
            Some(_) => debug!(worker = self.index, client = %client, %transport, "connection accepted"),
            None if self.streams.proxy.streams && !self.streams.proxy.trusts(client.ip()) => {
                debug!(worker = self.index, client = %client, %transport, "connection refused: not in proxy-trusted")
            }
            None => debug!(worker = self.index, client = %client, %transport, "connection refused: over a cap"),
        }
        id
    }

    /// Bytes received on connection `id` (TLS records over TLS): every whole message in them is
    /// handled like a datagram; the rest waits for more. Closes the connection when its framing
    /// or TLS fails.
    pub(crate) fn on_stream_data(&mut self, now: Instant, id: ConnId, bytes: &[u8], io: &mut impl Io) {
        let Some(c) = self.streams.get_mut(id) else { return };
        if c.awaiting_proxy {
            return self.on_proxy_header(now, id, bytes, io);
        }
        if c.role != Role::Framed {
            return self.on_unframed(now, id, bytes, io);
        }
        let ft = c.five_tuple;
        let mut inbuf = std::mem::take(&mut c.inbuf);
        let received = if c.is_tls() {
            c.inbuf = inbuf;
            let r = c.receive_tls(bytes, wire::stream::MAX_FRAME * 2);
            inbuf = std::mem::take(&mut c.inbuf);
            if !c.out.is_empty() {
                self.streams.mark_dirty(id);
            }
            r.map(|()| None)
        } else if inbuf.is_empty() {
            // Plain TCP with nothing pending: take the messages straight from the receive
            // buffer, keep only an incomplete tail.
            Ok(Some(bytes))
        } else {
            inbuf.extend_from_slice(bytes);
            Ok(None)
        };
        let result = received.and_then(|direct| match direct {
            Some(b) => {
                let taken = self.take_messages(now, id, &ft, b, io);
                taken.map(|at| inbuf.extend_from_slice(&b[at..]))
            }
            None => {
                let taken = self.take_messages(now, id, &ft, &inbuf, io);
                taken.map(|at| drop(inbuf.drain(..at)))
            }
        });
        match result {
            Ok(()) => {
                if let Some(c) = self.streams.get_mut(id) {
                    // Bytes held after a ConnectionBind are data, not a message in progress.
                    let partial = !inbuf.is_empty() && c.role == Role::Framed;
                    c.partial_since = if partial { c.partial_since.or(Some(now)) } else { None };
                    c.inbuf = inbuf;
                    c.shrink_buffers();
                }
            }
            Err(reason) => self.close_connection(now, id, reason, io),
        }
    }

    /// Handles the whole messages at the start of `buf`; returns where the incomplete rest
    /// begins.
    fn take_messages(
        &mut self,
        now: Instant,
        id: ConnId,
        ft: &FiveTuple,
        buf: &[u8],
        io: &mut impl Io,
    ) -> Result<usize, CloseReason> {
        let mut at = 0;
        while let Some(r) = Connection::next_message(buf, &mut at)? {
            if let Some(c) = self.streams.get_mut(id) {
                c.partial_since = None;
            }
            let message = &buf[r];
            match self.on_message(now, ft, message) {
                ClientVerdict::Forwarded { .. } if is_connection_bind(message) => {
                    // RFC 6062 §5.4: what follows a ConnectionBind is the data connection's
                    // data, kept as it is until the control plane answers (only one that went
                    // there: a refused or dropped one leaves the connection framed).
                    if let Some(c) = self.streams.get_mut(id) {
                        c.role = Role::Binding;
                    }
                    return Ok(at);
                }
                // Only traffic that proves the connection in use restarts its idle timer.
                ClientVerdict::Forwarded { verified } => {
                    if verified {
                        self.streams.mark_used(id, now);
                    }
                }
                ClientVerdict::Done => {}
                ClientVerdict::Reply(n) => {
                    let reply = &self.reply[..n];
                    self.streams.queue(id, reply);
                }
                ClientVerdict::ToPeer { relay, peer, payload } => {
                    self.streams.mark_used(id, now);
                    self.send_to_peer(relay, peer, &message[payload], io)
                }
            }
        }
        if at < buf.len() && wire::classify(&buf[at..]) == DatagramKind::Other {
            return Err(CloseReason::BadFraming);
        }
        Ok(at)
    }

    /// Sends `payload` (copied) from relay slot `relay`'s socket of `peer`'s family to `peer`.
    fn send_to_peer(&mut self, relay: usize, peer: SocketAddr, payload: &[u8], io: &mut impl Io) {
        if let Some(Some(r)) = self.relays.get(relay) {
            let (socket, additional) = r.socket_for(&peer);
            if additional {
                io.send_to_peer_additional(socket, peer, payload);
            } else {
                io.send_to_peer(r.id, socket, peer, payload);
            }
        }
    }

    /// Closes connection `id`: ends its allocation (RFC 8656 §3.1), shuts the socket down.
    pub(crate) fn close_connection(&mut self, now: Instant, id: ConnId, reason: CloseReason, io: &mut impl Io) {
        let Some(mut c) = self.streams.remove(id, reason) else { return };
        if reason.is_abortive() {
            // An abuser's queued bytes (ours and the kernel's) are dropped at once: RST.
            let _ = socket2::SockRef::from(&c.socket).set_linger(Some(std::time::Duration::ZERO));
        } else if reason != CloseReason::Peer {
            c.send_close_notify();
            // Best effort: what the client should still hear (an alert, close_notify).
            let _ = std::io::Write::write(&mut c.socket, &c.out);
        }
        io.close_stream(id, &c.socket);
        let _ = c.socket.shutdown(std::net::Shutdown::Both);
        self.holds.forget(&c.five_tuple);
        debug!(
            worker = self.index,
            client = %c.five_tuple.client,
            transport = %c.five_tuple.transport,
            reason = reason.name(),
            "connection closed"
        );
        if let Some(mut ended) = self.state.end_connection(&c.five_tuple) {
            self.sync_offload();
            self.add_offload_credit(&mut ended);
            self.offload_credit.clear();
            self.log_end(now, &ended);
            self.close_relay(ended.id, io);
            self.release_ended(&ended);
        }
        self.close_partner(now, c.role, reason, io);
    }

    /// Closes every connection (shutdown or freeze).
    pub(crate) fn close_connections(&mut self, now: Instant, io: &mut impl Io) {
        for id in self.streams.ids() {
            self.close_connection(now, id, CloseReason::Shutdown, io);
        }
    }

    /// A datagram from `peer` on relay slot `relay`, its payload at `buf[payload]` (with
    /// [`PEER_HEADROOM`](uturn_proto::relay::PEER_HEADROOM) before and
    /// [`PEER_TAILROOM`](uturn_proto::relay::PEER_TAILROOM) after it). The backend has checked
    /// that the datagram came from the slot's current socket (io_uring tags each receive with
    /// the allocation's generation; epoll reads the slot's socket itself).
    #[inline]
    pub(crate) fn on_peer(
        &mut self,
        now: Instant,
        relay: usize,
        peer: SocketAddr,
        buf: &mut [u8],
        payload: Range<usize>,
    ) -> PeerVerdict {
        if crate::trace::active() {
            return self.on_peer_traced(now, relay, peer, buf, payload);
        }
        self.handle_peer(now, relay, peer, buf, payload).0
    }

    /// A datagram from a peer, untraced; with the range of the message framed for the client.
    #[inline]
    fn handle_peer(
        &mut self,
        now: Instant,
        relay: usize,
        peer: SocketAddr,
        buf: &mut [u8],
        payload: Range<usize>,
    ) -> (PeerVerdict, Option<Range<usize>>) {
        let Some(Some(r)) = self.relays.get(relay) else { return (PeerVerdict::Drop, None) };
        let (path, alloc, len) = (r.client, r.id, payload.len());
        match self.state.handle_peer_datagram(now, r.id, peer, buf, payload) {
            PeerOutput::ToClient { five_tuple, message } => match path {
                ClientPath::Datagram(listener) => match self.datagram_to(&five_tuple) {
                    Some(client) => (PeerVerdict::Datagram { listener, client, message: message.clone() }, Some(message)),
                    None => {
                        // `proxy-protocol-udp` with no balancer known for the client (yet).
                        self.state.uncount_to_client(alloc, len);
                        (PeerVerdict::Drop, None)
                    }
                },
                ClientPath::Stream(conn) => {
                    // RFC 8656 §12.5: ChannelData is padded to 4 bytes on a stream (a Data
                    // indication already is); the tailroom holds the padding.
                    let pad = if wire::classify(&buf[message.clone()]) == DatagramKind::ChannelData {
                        channel_data_padding(message.len())
                    } else {
                        0
                    };
                    let end = message.end + pad;
                    if end > buf.len() {
                        return (PeerVerdict::Drop, None);
                    }
                    buf[message.end..end].fill(0);
                    if !self.streams.queue(conn, &buf[message.start..end]) {
                        self.state.uncount_to_client(alloc, len);
                    }
                    (PeerVerdict::Queued, Some(message))
                }
            },
            PeerOutput::Drop => (PeerVerdict::Drop, None),
        }
    }

    /// The longest the backend may sleep without a timer due: with XDP routes installed the
    /// worker sees none of their traffic, so it wakes every [`PUBLISH_INTERVAL`] to credit it.
    /// With connections open it wakes every second to apply their deadlines.
    pub(crate) fn longest_sleep(&self) -> std::time::Duration {
        if let Some(d) = self.holds.next_deadline() {
            // A held 5-tuple is released at its deadline even without an answer.
            d.saturating_duration_since(Instant::now()).max(std::time::Duration::from_millis(1))
        } else if self.routes.is_some() {
            PUBLISH_INTERVAL
        } else if self.streams.len() > 0 {
            std::time::Duration::from_secs(1)
        } else {
            std::time::Duration::MAX
        }
    }

    /// True when control-plane commands are queued (checked before the worker sleeps).
    pub(crate) fn commands_pending(&self) -> bool {
        !self.commands.is_empty()
    }

    /// Applies every queued control-plane command.
    pub(crate) fn drain_commands(&mut self, now: Instant, io: &mut impl Io) {
        while let Ok(msg) = self.commands.try_recv() {
            let answers = answer_of(&msg);
            self.apply(now, msg, io);
            if let Some((ft, tid)) = answers {
                self.answered(now, &ft, tid, io);
            }
        }
        self.offload_credit.clear();
    }

    /// Applies one control-plane message.
    fn apply(&mut self, now: Instant, msg: ToWorker, io: &mut impl Io) {
        {
            let (cmd, socket) = match msg {
                ToWorker::Install(i, s, a) => (Command::Install(i), Some((s, a))),
                ToWorker::InstallTcp(i) => {
                    self.install_tcp(now, i);
                    return;
                }
                ToWorker::Command(c) => (c, None),
                msg @ (ToWorker::BindData { .. } | ToWorker::BindFailed { .. } | ToWorker::CloseData { .. }) => {
                    self.data_command(now, msg, io);
                    return;
                }
                ToWorker::Sessions(reply) => {
                    self.collect_offloaded();
                    let _ = reply.send((self.index, self.state.sessions(now)));
                    return;
                }
            };
            // Described only when debug logging is on (no allocation per command otherwise).
            let event = match &cmd {
                _ if !tracing::enabled!(tracing::Level::DEBUG) => None,
                Command::CreatePermission { peers, .. } => Some(format!("permission for {peers:?}")),
                Command::ChannelBind { channel, peer, .. } => Some(format!("channel {:#06x} to {peer}", channel.get())),
                _ => None,
            };
            let out = self.state.handle_command(now, cmd, &mut self.reply);
            self.sync_offload();
            let path = self.path_of(&out.five_tuple);
            if let Some(event) = event {
                let granted = Message::parse(&self.reply[..out.reply_len]).is_ok_and(|m| m.class() == Class::Success);
                let session = self.session_of(&out.five_tuple);
                debug!(worker = self.index, session, client = %out.five_tuple.client, granted, "{event}");
            }
            match (out.effect, socket) {
                (Effect::Installed(id), Some(socket)) => {
                    let slot = id.index as usize;
                    if self.relays.len() <= slot {
                        self.relays.resize_with(slot + 1, || None);
                    }
                    // An Install over an allocation that had expired unswept ends it and may
                    // reuse its slab slot: that relay socket is deregistered before the new one
                    // takes the slot (its end is reported by the next `expire`).
                    if let Some(old) = self.relays[slot].take() {
                        io.deregister_relay(old.id, &old.socket);
                        if let Some(a) = &old.additional {
                            io.deregister_additional(old.id, a);
                        }
                    }
                    let (socket, additional) = socket;
                    let session = self.session_of(&out.five_tuple);
                    match path {
                        Some(client) => {
                            io.register_relay(id, &socket);
                            if let Some(a) = &additional {
                                io.register_additional(id, a);
                            }
                            self.relays[slot] = Some(Relay::new(id, socket, additional, client));
                            debug!(worker = self.index, session, client = %out.five_tuple.client, "allocation installed");
                        }
                        None => {
                            // Its connection closed while the control plane granted it.
                            if let Some(ended) = self.state.end_connection(&out.five_tuple) {
                                self.sync_offload();
                                self.log_end(now, &ended);
                                self.release_ended(&ended);
                            }
                            return;
                        }
                    }
                }
                (Effect::InstallRefused { tid }, _) => self.release(out.five_tuple, tid),
                (Effect::Removed(mut ended), _) => {
                    self.add_offload_credit(&mut ended);
                    self.log_end(now, &ended);
                    self.close_relay(ended.id, io);
                    self.release_ended(&ended);
                }
                _ => {}
            }
            if out.reply_len > 0 {
                if crate::trace::active() {
                    self.tap_reply(&out.five_tuple, out.reply_len);
                }
                match path {
                    Some(ClientPath::Datagram(listener)) => {
                        if let Some(to) = self.datagram_to(&out.five_tuple) {
                            io.send_reply(listener, to, &self.reply[..out.reply_len])
                        }
                    }
                    Some(ClientPath::Stream(conn)) => {
                        let reply = &self.reply[..out.reply_len];
                        if crate::stream::is_success(reply) {
                            self.streams.mark_used(conn, now);
                        }
                        self.streams.queue(conn, reply);
                    }
                    None => {}
                }
            }
        }
    }

    /// Applies the route changes the tables made to the XDP maps. A removed route's traffic is
    /// credited to its allocation, or kept for its [`Ended`] when the allocation is gone.
    fn sync_offload(&mut self) {
        let Some(routes) = &mut self.routes else { return };
        self.state.take_offload_events(&mut self.offload_events);
        for ev in self.offload_events.drain(..) {
            match ev {
                OffloadEvent::Install { route, fresh } => {
                    if let Err(e) = routes.install(&route, fresh) {
                        self.offload_refused += 1;
                        debug!(worker = self.index, channel = route.channel.get(), "channel route not offloaded: {e}");
                    }
                }
                OffloadEvent::Remove(route) => {
                    let (to_peer, to_client) = routes.remove(&route);
                    if !self.state.credit_allocation(route.alloc, to_peer, to_client) {
                        self.offload_credit.push((route.alloc, to_peer, to_client));
                    }
                }
            }
        }
    }

    /// Adds the fast-path traffic of `e`'s removed routes to its totals.
    fn add_offload_credit(&mut self, e: &mut Ended) {
        for (id, to_peer, to_client) in &self.offload_credit {
            if *id == e.id {
                e.to_peer.packets += to_peer.packets;
                e.to_peer.bytes += to_peer.bytes;
                e.to_client.packets += to_client.packets;
                e.to_client.bytes += to_client.bytes;
            }
        }
    }

    /// Credits what the fast path relayed on every installed route to its allocation (before
    /// the totals are shown or handed over).
    pub(crate) fn collect_offloaded(&mut self) {
        let Some(routes) = &mut self.routes else { return };
        for r in self.state.offloaded_routes() {
            let (to_peer, to_client) = routes.take_slot(r.slot);
            self.state.credit_allocation(r.alloc, to_peer, to_client);
        }
    }

    /// Expires what is due; closes the relay sockets of expired allocations. Publishes the
    /// counters when [`PUBLISH_INTERVAL`] has passed.
    pub(crate) fn expire(&mut self, now: Instant, io: &mut impl Io) {
        let mut expired = std::mem::take(&mut self.expired);
        self.state.handle_timeout(now, &mut expired);
        self.sync_offload();
        for mut e in expired.drain(..) {
            self.add_offload_credit(&mut e);
            self.log_end(now, &e);
            self.close_relay(e.id, io);
            self.release_ended(&e);
        }
        self.offload_credit.clear();
        self.expired = expired;
        let mut overdue = std::mem::take(&mut self.overdue_holds);
        self.holds.overdue(now, &mut overdue);
        for ft in overdue.drain(..) {
            // The control plane never answered (dropped under overload): handle what waited.
            self.release_hold(now, &ft, io);
        }
        self.overdue_holds = overdue;
        let tables = self.state.tables();
        for (id, reason) in self.streams.overdue(now, |ft| tables.lookup(ft).is_some()) {
            self.close_connection(now, id, reason, io);
        }
        if now >= self.next_publish {
            if let Some(routes) = &mut self.routes {
                let (to_peer, to_client) = routes.take_worker();
                self.state.credit_worker(to_peer, to_client);
            }
            self.publish();
            self.next_publish = now + PUBLISH_INTERVAL;
        }
    }

    /// Copies the counters and table sizes to the exporter's [`WorkerMetrics`].
    pub(crate) fn publish(&self) {
        let t = self.state.tables();
        self.metrics.publish(&WorkerSample {
            counters: *self.state.counters(),
            allocations: t.allocation_count() as u64,
            permissions: t.permissions.len() as u64,
            channels: t.channels.len() as u64,
            control_queue_full: self.control_queue_full,
            holds: self.holds.counters,
            turnaround: self.turnaround,
            connections: self.streams.len() as u64,
            streams: self.streams.counters,
            proxy: self.streams.proxy_counters,
        });
    }

    /// Removes every allocation (shutdown).
    pub(crate) fn close_all(&mut self, io: &mut impl Io) {
        self.close_connections(Instant::now(), io);
        let mut ended = self.state.drain();
        self.sync_offload();
        for e in &mut ended {
            self.add_offload_credit(e);
        }
        self.offload_credit.clear();
        if let Some(routes) = &mut self.routes {
            let (to_peer, to_client) = routes.take_worker();
            self.state.credit_worker(to_peer, to_client);
        }
        if !ended.is_empty() {
            info!(worker = self.index, allocations = ended.len(), "allocations closed at shutdown");
        }
        for e in ended {
            debug!(worker = self.index, session = e.session, client = %e.five_tuple.client, "allocation closed at shutdown");
            self.close_relay(e.id, io);
            // Its usage record (the control plane takes it before it stops).
            self.release_ended(&e);
        }
        self.publish();
    }

    /// The session id of `ft`'s allocation (0 when it has none).
    fn session_of(&self, ft: &FiveTuple) -> u64 {
        let t = self.state.tables();
        t.lookup(ft).and_then(|id| t.get(id)).map_or(0, |a| a.session)
    }

    /// The log line of an ended allocation, with its totals (RFC 8656 §2.2 session).
    fn log_end(&self, now: Instant, e: &Ended) {
        info!(
            worker = self.index,
            session = e.session,
            client = %e.five_tuple.client,
            reason = e.reason.name(),
            duration_s = now.saturating_duration_since(e.created).as_secs_f64(),
            packets_to_peer = e.to_peer.packets,
            bytes_to_peer = e.to_peer.bytes,
            packets_to_client = e.to_client.packets,
            bytes_to_client = e.to_client.bytes,
            "allocation ended"
        );
    }

    fn close_relay(&mut self, id: AllocationId, io: &mut impl Io) {
        if let Some(slot) = self.relays.get_mut(id.index as usize) {
            if matches!(slot, Some(r) if r.id == id) {
                if let Some(r) = slot.take() {
                    io.deregister_relay(id, &r.socket);
                    if let Some(a) = &r.additional {
                        io.deregister_additional(id, a);
                    }
                }
            }
        }
    }

    fn release(&mut self, five_tuple: FiveTuple, tid: TransactionId) {
        self.report_release(FromWorker::Released { five_tuple, tid, ended: None });
    }

    /// Reports an ended allocation with its totals (its quota, and its usage record).
    pub(crate) fn release_ended(&mut self, e: &Ended) {
        self.report_release(FromWorker::Released { five_tuple: e.five_tuple, tid: e.tid, ended: Some(Box::new(*e)) });
    }

    fn report_release(&mut self, ev: FromWorker) {
        if self.events.send(ev).is_err() {
            warn!(worker = self.index, "control plane gone: allocation release not reported");
        }
    }

    /// How `ft`'s client is reached: its UDP listener, or its connection (`None` once that
    /// has closed).
    fn path_of(&self, ft: &FiveTuple) -> Option<ClientPath> {
        match ft.transport {
            Transport::Udp => {
                Some(ClientPath::Datagram(self.listeners.iter().position(|l| l.addr == ft.server).unwrap_or(0)))
            }
            _ => self.streams.lookup(ft).map(ClientPath::Stream),
        }
    }
}

/// True for a ConnectionBind request (RFC 6062 §4.4): message type 0x000B.
fn is_connection_bind(message: &[u8]) -> bool {
    message.len() >= 2 && u16::from_be_bytes([message[0], message[1]]) == Method::CONNECTION_BIND.0
}

mod ordering;
use ordering::{answer_of, held_for};
mod proxied;
mod tcp_data;
mod trace_hooks;
