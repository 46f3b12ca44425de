//! The epoll backend (mio): readiness-driven `recvfrom`/`sendto`, one system call per datagram.
//! It runs where io_uring is unavailable (old kernels, seccomp profiles that block it).

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use uturn_proto::relay::{AllocationId, PEER_HEADROOM, PEER_TAILROOM};

use crate::core::{ClientVerdict, Io, PeerVerdict, WorkerCore};
use crate::stream::{AcceptBackoff, CloseReason, ConnId};
use crate::sys::Waker;
use crate::worker::Stop;

const WAKER: Token = Token(usize::MAX);
/// Tokens below this are UDP listeners; TCP listener `i` is `STREAM_LISTENER_BASE + i`.
const STREAM_LISTENER_BASE: usize = 1 << 15;
/// Relay slot `i` is `RELAY_BASE + i`.
const RELAY_BASE: usize = 1 << 16;
/// A dual allocation's second relay socket of slot `i` is `ADDITIONAL_BASE + i`.
const ADDITIONAL_BASE: usize = 1 << 32;
/// Connection slot `i` is `CONN_BASE + i` (a closed connection is deregistered before its slot
/// is reused, so no event of it reaches the next tenant).
const CONN_BASE: usize = 1 << 40;
/// Receive buffer: headroom for in-place framing plus the largest UDP payload.
const BUF_LEN: usize = PEER_HEADROOM + 65_536 + PEER_TAILROOM;

struct EpollIo {
    poll: Poll,
    listeners: Vec<UdpSocket>,
    /// Connection slots to read again after a pause (their readiness edge may have passed).
    resumed: Vec<u32>,
}

impl Io for EpollIo {
    fn register_relay(&mut self, id: AllocationId, socket: &UdpSocket) {
        let fd = socket.as_raw_fd();
        let _ = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(RELAY_BASE + id.index as usize),
            Interest::READABLE,
        );
    }
    fn deregister_relay(&mut self, _id: AllocationId, socket: &UdpSocket) {
        let fd = socket.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
    }
    fn send_reply(&mut self, listener: usize, to: SocketAddr, bytes: &[u8]) {
        let _ = self.listeners[listener].send_to(bytes, to);
    }
    fn send_to_peer(&mut self, _id: AllocationId, socket: &UdpSocket, peer: SocketAddr, bytes: &[u8]) {
        let _ = socket.send_to(bytes, peer);
    }
    fn send_to_peer_additional(&mut self, socket: &UdpSocket, peer: SocketAddr, bytes: &[u8]) {
        let _ = socket.send_to(bytes, peer);
    }
    fn register_additional(&mut self, id: AllocationId, socket: &UdpSocket) {
        let fd = socket.as_raw_fd();
        let token = Token(ADDITIONAL_BASE + id.index as usize);
        let _ = self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE);
    }
    fn deregister_additional(&mut self, _id: AllocationId, socket: &UdpSocket) {
        let fd = socket.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
    }
    fn open_stream(&mut self, id: ConnId, socket: &TcpStream) -> bool {
        let fd = socket.as_raw_fd();
        let token = Token(CONN_BASE + id.index as usize);
        self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE | Interest::WRITABLE).is_ok()
    }
    fn pause_stream(&mut self, _id: ConnId, _socket: &TcpStream) {
        // `drain_stream` stops at a paused connection.
    }
    fn resume_stream(&mut self, id: ConnId, _socket: &TcpStream) {
        self.resumed.push(id.index);
    }
    fn close_stream(&mut self, _id: ConnId, socket: &TcpStream) {
        let fd = socket.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
    }
}

/// Runs the worker until `stop` says so and returns its core: with its allocations closed, or
/// frozen (nothing is in flight between system calls, so a frozen worker's sockets are quiet
/// as soon as the loop ends).
pub(crate) fn run(mut core: WorkerCore, waker: &Waker, stop: Stop<'_>) -> io::Result<WorkerCore> {
    let poll = Poll::new()?;
    let listeners: Vec<UdpSocket> = core.listeners.iter().map(|l| l.socket.try_clone()).collect::<io::Result<_>>()?;
    for (i, l) in listeners.iter().enumerate() {
        poll.registry().register(&mut SourceFd(&l.as_raw_fd()), Token(i), Interest::READABLE)?;
    }
    poll.registry().register(&mut SourceFd(&waker.raw_fd()), WAKER, Interest::READABLE)?;
    let stream_listeners: Vec<TcpListener> =
        core.stream_listeners.iter().map(|l| l.socket.try_clone()).collect::<io::Result<_>>()?;
    for (i, l) in stream_listeners.iter().enumerate() {
        poll.registry().register(&mut SourceFd(&l.as_raw_fd()), Token(STREAM_LISTENER_BASE + i), Interest::READABLE)?;
    }
    let mut io = EpollIo { poll, listeners, resumed: Vec::new() };
    // A resumed worker's allocations: registering a socket that already holds datagrams
    // reports it readable at once.
    for r in core.relays.iter().flatten() {
        io.register_relay(r.id, &r.socket);
        if let Some(a) = &r.additional {
            io.register_additional(r.id, a);
        }
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; BUF_LEN];
    while !stop.stopping() {
        let timeout = core
            .state
            .poll_timeout()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .min(core.longest_sleep())
            .min(core.streams.accept_backoff.wait(Instant::now()));
        // Commands queued after this check find the flag set and write the eventfd.
        waker.sleeping(true);
        let timeout = if core.commands_pending() || !io.resumed.is_empty() { Duration::ZERO } else { timeout };
        let polled = io.poll.poll(&mut events, Some(timeout));
        waker.sleeping(false);
        if let Err(e) = polled {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let now = Instant::now();
        for ev in events.iter() {
            match ev.token() {
                WAKER => waker.drain(),
                Token(t) if t < STREAM_LISTENER_BASE => drain_listener(&mut core, &mut io, t, &mut buf, now),
                Token(t) if t < RELAY_BASE => {
                    accept_all(&mut core, &mut io, &stream_listeners, t - STREAM_LISTENER_BASE, now)
                }
                Token(t) if t < ADDITIONAL_BASE => {
                    drain_relay(&mut core, &mut io, t - RELAY_BASE, false, &mut buf, now)
                }
                Token(t) if t < CONN_BASE => drain_relay(&mut core, &mut io, t - ADDITIONAL_BASE, true, &mut buf, now),
                Token(t) => {
                    let index = (t - CONN_BASE) as u32;
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        drain_stream(&mut core, &mut io, index, &mut buf, now);
                    }
                    if ev.is_writable() {
                        if let Some(c) = core.streams.slot_mut(index) {
                            let id = ConnId { index, generation: c.generation };
                            core.streams.mark_dirty(id);
                        }
                    }
                }
            }
        }
        flush_streams(&mut core, &mut io, now);
        core.drain_commands(now, &mut io);
        core.expire(now, &mut io);
        // Accepts put off for want of descriptors: the backlog gives no new readiness edge.
        for i in core.streams.accept_backoff.take_due(now) {
            accept_all(&mut core, &mut io, &stream_listeners, i, now);
        }
        flush_streams(&mut core, &mut io, now);
        // Bounded: a pair that pauses again waits for the next turn of the loop.
        for _ in 0..4 {
            if io.resumed.is_empty() {
                break;
            }
            for index in std::mem::take(&mut io.resumed) {
                drain_stream(&mut core, &mut io, index, &mut buf, now);
            }
            flush_streams(&mut core, &mut io, now);
        }
    }
    // Connections do not survive a freeze: their allocations end with them.
    core.close_connections(Instant::now(), &mut io);
    // Commands queued before the stop are applied either way (an Install's socket must not be
    // lost in the queue of a frozen worker).
    core.drain_commands(Instant::now(), &mut io);
    if !stop.freezing() {
        core.close_all(&mut io);
    }
    Ok(core)
}

/// Consecutive receive errors (other than WouldBlock) after which a drain loop gives up.
const MAX_RECV_ERRORS: u32 = 64;

/// The drain loops' policy for one receive: a datagram, `None` to try again after a transient
/// error, or `Err(())` to stop (the socket is drained, or keeps failing).
fn received<T>(r: io::Result<T>, errors: &mut u32) -> Result<Option<T>, ()> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(()),
        Err(_) if *errors < MAX_RECV_ERRORS => {
            *errors += 1;
            Ok(None)
        }
        Err(_) => Err(()),
    }
}

fn drain_listener(core: &mut WorkerCore, io: &mut EpollIo, listener: usize, buf: &mut [u8], now: Instant) {
    let mut errors = 0;
    loop {
        let (n, from) = match received(io.listeners[listener].recv_from(buf), &mut errors) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(()) => return,
        };
        match core.on_client(now, listener, from, &buf[..n]) {
            ClientVerdict::Done | ClientVerdict::Forwarded { .. } => {}
            ClientVerdict::Reply(len) => {
                let _ = io.listeners[listener].send_to(core.reply(len), from);
            }
            ClientVerdict::ToPeer { relay, peer, payload } => {
                if let Some(Some(r)) = core.relays.get(relay) {
                    let _ = r.socket_for(&peer).0.send_to(&buf[payload], peer);
                }
            }
        }
    }
}

/// Reads relay slot `slot`'s socket (its `additional` one for a dual allocation's second
/// address) until it would block.
fn drain_relay(core: &mut WorkerCore, io: &mut EpollIo, slot: usize, additional: bool, buf: &mut [u8], now: Instant) {
    if !matches!(core.relays.get(slot), Some(Some(_))) {
        return;
    }
    let mut errors = 0;
    loop {
        let result = match core.relays.get(slot) {
            Some(Some(r)) => {
                let socket = if additional { r.additional.as_ref() } else { Some(&r.socket) };
                match socket {
                    Some(s) => s.recv_from(&mut buf[PEER_HEADROOM..BUF_LEN - PEER_TAILROOM]),
                    None => return,
                }
            }
            _ => return,
        };
        let (n, peer) = match received(result, &mut errors) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(()) => return,
        };
        if let PeerVerdict::Datagram { listener, client, message } =
            core.on_peer(now, slot, peer, buf, PEER_HEADROOM..PEER_HEADROOM + n)
        {
            let _ = io.listeners[listener].send_to(&buf[message], client);
        }
    }
}

/// Accepts every pending connection on TCP listener `i`.
fn accept_all(core: &mut WorkerCore, io: &mut EpollIo, listeners: &[TcpListener], i: usize, now: Instant) {
    let Some(listener) = listeners.get(i) else { return };
    let mut errors = 0;
    loop {
        if core.streams.accept_backoff.deferred(i) {
            // Out of descriptors a moment ago: the retry timer accepts again.
            return;
        }
        let accepted = listener.accept();
        if let Err(errno) = accepted.as_ref().map_err(|e| e.raw_os_error().unwrap_or(0)) {
            if AcceptBackoff::is_resource_error(errno) {
                return core.streams.defer_accept(core.index, i, now, errno);
            }
        }
        let socket = match received(accepted, &mut errors) {
            Ok(Some((s, _))) => s,
            Ok(None) => continue,
            Err(()) => return,
        };
        if socket.set_nonblocking(true).is_err() {
            continue;
        }
        let fd = socket.as_raw_fd();
        let Some(id) = core.on_accept(now, i, socket) else { continue };
        let token = Token(CONN_BASE + id.index as usize);
        if io.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE | Interest::WRITABLE).is_err() {
            core.close_connection(now, id, CloseReason::Peer, io);
        }
    }
}

/// Reads connection slot `index` until it would block, handing each chunk to the core.
fn drain_stream(core: &mut WorkerCore, io: &mut EpollIo, index: u32, buf: &mut [u8], now: Instant) {
    loop {
        let Some(c) = core.streams.slot_mut(index) else { return };
        if c.paused {
            return;
        }
        let id = ConnId { index, generation: c.generation };
        match c.socket.read(buf) {
            Ok(0) => return core.close_connection(now, id, CloseReason::Peer, io),
            Ok(n) => core.on_stream_data(now, id, &buf[..n], io),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return core.close_connection(now, id, CloseReason::Peer, io),
        }
    }
}

/// Writes what waits on every connection with queued bytes, until the socket would block (a
/// writable event brings it back).
fn flush_streams(core: &mut WorkerCore, io: &mut EpollIo, now: Instant) {
    for id in std::mem::take(&mut core.streams.dirty) {
        let Some(c) = core.streams.get_mut(id) else { continue };
        c.dirty = false;
        if c.write_out(now).is_err() {
            core.close_connection(now, id, CloseReason::Peer, io);
        } else {
            core.on_written(id, io);
        }
    }
}
