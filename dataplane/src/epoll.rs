//! The epoll backend (mio): readiness-driven `recvfrom`/`sendto`, one system call per datagram.
//! It runs where io_uring is unavailable (old kernels, seccomp profiles that block it).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use uturn_proto::relay::{AllocationId, PEER_HEADROOM, PEER_TAILROOM};

use crate::core::{ClientVerdict, Io, WorkerCore};
use crate::sys::Waker;
use crate::worker::Stop;

const WAKER: Token = Token(usize::MAX);
/// Tokens below this are listeners; relay slot `i` is `RELAY_BASE + i`.
const RELAY_BASE: usize = 1 << 16;
/// Receive buffer: headroom for in-place framing plus the largest UDP payload.
const BUF_LEN: usize = PEER_HEADROOM + 65_536 + PEER_TAILROOM;

struct EpollIo {
    poll: Poll,
    listeners: Vec<UdpSocket>,
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
    let mut io = EpollIo { poll, listeners };
    // A resumed worker's allocations: registering a socket that already holds datagrams
    // reports it readable at once.
    for r in core.relays.iter().flatten() {
        io.register_relay(r.id, &r.socket);
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; BUF_LEN];
    while !stop.stopping() {
        let timeout = core
            .state
            .poll_timeout()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .min(core.longest_sleep());
        // Commands queued after this check find the flag set and write the eventfd.
        waker.sleeping(true);
        let timeout = if core.commands_pending() { Duration::ZERO } else { timeout };
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
                Token(t) if t < RELAY_BASE => drain_listener(&mut core, &mut io, t, &mut buf, now),
                Token(t) => drain_relay(&mut core, &mut io, t - RELAY_BASE, &mut buf, now),
            }
        }
        core.drain_commands(now, &mut io);
        core.expire(now, &mut io);
    }
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
            ClientVerdict::Done => {}
            ClientVerdict::Reply(len) => {
                let _ = io.listeners[listener].send_to(core.reply(len), from);
            }
            ClientVerdict::ToPeer { relay, peer, payload } => {
                if let Some(Some(r)) = core.relays.get(relay) {
                    let _ = r.socket.send_to(&buf[payload], peer);
                }
            }
        }
    }
}

fn drain_relay(core: &mut WorkerCore, io: &mut EpollIo, slot: usize, buf: &mut [u8], now: Instant) {
    if !matches!(core.relays.get(slot), Some(Some(_))) {
        return;
    }
    let mut errors = 0;
    loop {
        let result = match core.relays.get(slot) {
            Some(Some(r)) => r.socket.recv_from(&mut buf[PEER_HEADROOM..BUF_LEN - PEER_TAILROOM]),
            _ => return,
        };
        let (n, peer) = match received(result, &mut errors) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(()) => return,
        };
        if let Some((listener, client, msg)) = core.on_peer(now, slot, peer, buf, PEER_HEADROOM..PEER_HEADROOM + n) {
            let _ = io.listeners[listener].send_to(&buf[msg], client);
        }
    }
}
