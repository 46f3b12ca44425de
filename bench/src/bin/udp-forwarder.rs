//! `udp-forwarder`: the floor contestant of the benchmark. A bare UDP relay with no TURN logic:
//! one thread, recvmmsg/sendmmsg, datagrams from clients on `--listen` go to `--forward-to`
//! from a second socket, and datagrams coming back to that socket go to the client named by the
//! generator's payload header (client index). Whatever it costs per packet is what the kernel
//! costs a user-space relay.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use clap::Parser;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use uturn_bench::mmsg::{RecvBatch, SendBatch};
use uturn_bench::payload;

/// Bare UDP forwarder (benchmark floor).
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Client-facing address.
    #[arg(long, default_value = "127.0.0.1:3479")]
    listen: SocketAddr,
    /// Where client datagrams go (the generator's raw-mode peer).
    #[arg(long)]
    forward_to: SocketAddr,
    /// Stop after this many seconds (0: run until killed).
    #[arg(long, default_value_t = 0)]
    duration: u64,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listen = UdpSocket::bind(args.listen)?;
    let out = UdpSocket::bind(SocketAddr::new(args.listen.ip(), 0))?;
    listen.set_nonblocking(true)?;
    out.set_nonblocking(true)?;
    let mut poll = Poll::new()?;
    poll.registry().register(&mut SourceFd(&listen.as_raw_fd()), Token(0), Interest::READABLE)?;
    poll.registry().register(&mut SourceFd(&out.as_raw_fd()), Token(1), Interest::READABLE)?;
    eprintln!("udp-forwarder {} -> {} (from {})", listen.local_addr()?, args.forward_to, out.local_addr()?);
    let deadline = (args.duration > 0).then(|| Instant::now() + Duration::from_secs(args.duration));
    let mut clients: Vec<Option<SocketAddr>> = Vec::new();
    let (mut rx, mut tx) = (RecvBatch::new(), SendBatch::new());
    let mut events = Events::with_capacity(8);
    loop {
        if deadline.is_some_and(|d| Instant::now() > d) {
            return Ok(());
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        for ev in events.iter() {
            let from_clients = ev.token() == Token(0);
            let (rfd, wfd) = if from_clients {
                (listen.as_raw_fd(), out.as_raw_fd())
            } else {
                (out.as_raw_fd(), listen.as_raw_fd())
            };
            while rx.recv(rfd)? > 0 {
                for i in 0..rx.count() {
                    let (data, from) = rx.get(i);
                    let to = if from_clients {
                        // Learn the client's address from the payload's client index.
                        if let (Some(s), Some(from)) = (payload::read(data), from) {
                            let c = s.client as usize;
                            if c < 1 << 16 {
                                if clients.len() <= c {
                                    clients.resize(c + 1, None);
                                }
                                clients[c] = Some(from);
                            }
                        }
                        Some(args.forward_to)
                    } else {
                        payload::read(data).and_then(|s| clients.get(s.client as usize).copied().flatten())
                    };
                    if let Some(to) = to {
                        tx.push(&to, |b| {
                            b[..data.len()].copy_from_slice(data);
                            data.len()
                        });
                    }
                }
                // A full transmit queue drops the batch, as a relay must rather than block.
                match tx.flush(wfd) {
                    Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return Err(e),
                    _ => {}
                }
            }
        }
    }
}
