//! The data round trip of `uturn check`: a peer socket the check runs itself, and real data
//! relayed both ways through the allocation, by Send indication (RFC 8656 §11) or by
//! ChannelData (§12). The client sends to the peer through the relay (outbound); the peer
//! answers to the advertised XOR-RELAYED-ADDRESS, as any remote peer would (inbound). Counting
//! each direction apart is what tells a blocked relay port range (out, never back) from a
//! relay that forwards nothing, and the address the peer sees the relay's datagrams come from
//! tells whether `external-ip` matches the advertised relayed address.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use uturn_proto::wire::{attr, channel_data, ChannelNumber, Class, Message, MessageWriter, Method, TransactionId};

use super::conn::{is_timeout, local_wildcard, remaining};
use super::session::{Incoming, Session};

/// How the client sends its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Send indications; the relay answers with Data indications.
    Send,
    /// ChannelData on this channel number, both ways.
    Channel(u16),
}

/// The peer: a UDP socket and its address as the relay sees it.
pub struct Peer {
    sock: UdpSocket,
    /// XOR-PEER-ADDRESS for the permission and the channel binding.
    pub addr: SocketAddr,
    /// How the address was learned: "local" or "reflexive" (a Binding to the server).
    pub how: &'static str,
}

impl Peer {
    /// A peer socket on the local address that routes to `server`. Off loopback it learns its
    /// reflexive address with a Binding to the server's UDP port (a check run behind a NAT
    /// needs the relay to reach the NAT's public side), else it keeps the local one.
    pub fn new(server: SocketAddr, timeout: Duration) -> io::Result<Peer> {
        let route = UdpSocket::bind(local_wildcard(server))?;
        route.connect(server)?;
        let ip = route.local_addr()?.ip();
        let sock = UdpSocket::bind(SocketAddr::new(ip, 0))?;
        let local = sock.local_addr()?;
        if server.ip().is_loopback() {
            return Ok(Peer { sock, addr: local, how: "local" });
        }
        let mapped = reflexive(&sock, server, timeout.min(Duration::from_secs(1)));
        Ok(match mapped {
            Some(a) => Peer { sock, addr: a, how: "reflexive" },
            None => Peer { sock, addr: local, how: "local" },
        })
    }
}

/// The reflexive address of `sock` by a STUN Binding to `server`, None without an answer.
fn reflexive(sock: &UdpSocket, server: SocketAddr, wait: Duration) -> Option<SocketAddr> {
    let tid = TransactionId(rand::random());
    let mut buf = [0u8; 64];
    let n = MessageWriter::new(&mut buf, Method::BINDING, Class::Request, tid).ok()?.finish();
    sock.send_to(&buf[..n], server).ok()?;
    let deadline = Instant::now() + wait;
    let mut rx = [0u8; 1500];
    while let Some(left) = remaining(deadline) {
        sock.set_read_timeout(Some(left)).ok()?;
        let (n, from) = sock.recv_from(&mut rx).ok()?;
        let Ok(m) = Message::parse(&rx[..n]) else { continue };
        if from == server && m.transaction_id() == tid {
            return m.xor_address(attr::XOR_MAPPED_ADDRESS)?.ok();
        }
    }
    None
}

/// What a round trip measured.
#[derive(Debug, Default, Clone)]
pub struct RoundTrip {
    /// Datagrams the client sent.
    pub sent: u32,
    /// Of those, how many reached the peer (outbound).
    pub out_ok: u32,
    /// Datagrams the peer sent to the relayed address.
    pub peer_sent: u32,
    /// Of those, how many reached the client (inbound).
    pub in_ok: u32,
    /// Client → relay → peer → relay → client times of the datagrams that made the whole trip.
    pub rtts: Vec<Duration>,
    /// The address the relay's datagrams came from, as the peer saw them.
    pub seen_from: Option<SocketAddr>,
}

impl RoundTrip {
    /// Datagrams lost of those sent both ways, in percent (0-100).
    pub fn loss_percent(&self) -> f64 {
        let sent = self.sent + self.peer_sent;
        if sent == 0 {
            return 0.0;
        }
        100.0 * f64::from(sent - self.out_ok - self.in_ok) / f64::from(sent)
    }

    /// Median RTT, in milliseconds.
    pub fn median_ms(&self) -> Option<f64> {
        let mut v = self.rtts.clone();
        v.sort_unstable();
        v.get(v.len() / 2).map(|d| d.as_secs_f64() * 1000.0)
    }
}

/// Sends `count` datagrams client → peer through the relay and, for each, one peer →
/// `relayed` back, each leg waiting at most `wait`.
pub fn round_trip(
    session: &mut Session,
    peer: &Peer,
    relayed: SocketAddr,
    mode: Mode,
    count: u32,
    wait: Duration,
    bar: Option<&ProgressBar>,
) -> io::Result<RoundTrip> {
    let mut rt = RoundTrip::default();
    let tag: u32 = rand::random();
    let mut rx = vec![0u8; 65_536];
    for i in 0..count {
        let out = format!("uturn-check {tag:08x} out {i}");
        let start = Instant::now();
        session.conn.send(&frame(mode, peer.addr, out.as_bytes()))?;
        rt.sent += 1;
        // Outbound: the peer waits for this datagram.
        let deadline = start + wait;
        while let Some(left) = remaining(deadline) {
            peer.sock.set_read_timeout(Some(left))?;
            match peer.sock.recv_from(&mut rx) {
                Ok((n, from)) if &rx[..n] == out.as_bytes() => {
                    rt.out_ok += 1;
                    rt.seen_from = Some(from);
                    break;
                }
                Ok(_) => continue,
                Err(e) if is_timeout(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
        }
        // Inbound: the peer answers to the advertised relayed address, as a remote peer does.
        let back = format!("uturn-check {tag:08x} back {i}");
        match peer.sock.send_to(back.as_bytes(), relayed) {
            Ok(_) => rt.peer_sent += 1,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => rt.peer_sent += 1,
            Err(e) => return Err(e),
        }
        let deadline = Instant::now() + wait;
        while let Some(got) = session.next_data(deadline)? {
            let payload = match got {
                Incoming::Data(_, p) | Incoming::Channel(_, p) => p,
            };
            if payload == back.as_bytes() {
                rt.in_ok += 1;
                rt.rtts.push(start.elapsed());
                break;
            }
        }
        if let Some(b) = bar {
            b.inc(1);
        }
    }
    Ok(rt)
}

/// A Send indication to `peer` (with DATA) or a ChannelData message carrying `payload`.
fn frame(mode: Mode, peer: SocketAddr, payload: &[u8]) -> Vec<u8> {
    match mode {
        Mode::Channel(n) => {
            let mut v = vec![0u8; channel_data::HEADER_LEN + payload.len()];
            let ch = ChannelNumber::new(n).unwrap_or_else(|| unreachable!("the check binds 0x4000"));
            channel_data::write_header(&mut v, ch, payload.len() as u16);
            v[channel_data::HEADER_LEN..].copy_from_slice(payload);
            v
        }
        Mode::Send => {
            let mut buf = vec![0u8; 128 + payload.len()];
            let n = (|| {
                let mut w =
                    MessageWriter::new(&mut buf, Method::SEND, Class::Indication, TransactionId(rand::random()))?;
                w.xor_address(attr::XOR_PEER_ADDRESS, &peer)?.bytes(attr::DATA, payload)?.fingerprint()?;
                Ok::<_, uturn_proto::wire::WriteError>(w.finish())
            })()
            .unwrap_or(0);
            buf.truncate(n);
            buf
        }
    }
}
