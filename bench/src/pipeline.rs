//! Order within a 5-tuple and request turnaround, as a WebRTC client sees them (any TURN server
//! over UDP on loopback: uturn or coturn).
//!
//! - **Pipelined pairs**: CreatePermission followed at once by a Send indication to the new peer,
//!   and ChannelBind followed at once by ChannelData on the new channel, as browsers send their
//!   first ICE check. Counts the checks the peer received (each peer on its own 127.0.x.y, so
//!   every pair needs a new permission).
//! - **Turnaround**: sequential authenticated requests on the allocation (CreatePermission for
//!   a peer it already has, ChannelBind refreshing a bound channel), each timed from send to
//!   response, in an HdrHistogram (microseconds).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use serde::Serialize;
use uturn_proto::wire::{attr, Class, Message, Method, TransactionId};

use crate::client::{build, Client};
use crate::stats::{latency_histogram, Latency};

/// What to run.
#[derive(Debug, Clone)]
pub struct PipelineRun {
    /// The TURN server (UDP).
    pub server: SocketAddr,
    /// Long-term credential.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Pipelined pairs of each kind (at most 200: one loopback address per pair).
    pub pairs: u8,
    /// Sequential requests timed for the turnaround, of each kind.
    pub requests: usize,
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    /// Pairs of each kind sent.
    pub pairs: u8,
    /// Send indications the peer received right behind their CreatePermission.
    pub send_relayed: u8,
    /// ChannelData the peer received right behind their ChannelBind.
    pub channel_data_relayed: u8,
    /// CreatePermission round trips, microseconds.
    pub create_permission: Latency,
    /// ChannelBind (refresh) round trips, microseconds.
    pub channel_bind: Latency,
    /// Requests that got no answer within 1 s (not in the histograms).
    pub unanswered: u64,
}

/// A UDP peer on 127.0.`net`.`1 + i` (a permission is per IP, so each pipelined pair gets its
/// own address), reading with a 1.5 s timeout.
pub fn peer_on(net: u8, i: u8) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::from(([127, 0, net, 1 + i], 0)))?;
    s.set_read_timeout(Some(Duration::from_millis(1500)))?;
    Ok(s)
}

/// True when the next datagram `peer` receives within its timeout is `tag`.
pub fn received(peer: &UdpSocket, tag: &[u8]) -> bool {
    let mut buf = [0u8; 2048];
    matches!(peer.recv_from(&mut buf), Ok((n, _)) if &buf[..n] == tag)
}

/// A signed CreatePermission for `peer` with a fresh transaction ID (not sent).
pub fn create_permission(c: &Client, peer: SocketAddr) -> Vec<u8> {
    c.signed_request(Method::CREATE_PERMISSION, TransactionId(rand::random()), |w| {
        w.xor_address(attr::XOR_PEER_ADDRESS, &peer).map(drop)
    })
}

/// A signed ChannelBind of `channel` to `peer` with a fresh transaction ID (not sent).
pub fn channel_bind(c: &Client, channel: u16, peer: SocketAddr) -> Vec<u8> {
    c.signed_request(Method::CHANNEL_BIND, TransactionId(rand::random()), |w| {
        w.u32(attr::CHANNEL_NUMBER, (channel as u32) << 16)?;
        w.xor_address(attr::XOR_PEER_ADDRESS, &peer).map(drop)
    })
}

/// Waits at most `limit` for the response to `req`; its round trip, or `None`.
fn answered_within(c: &Client, req: &[u8], sent: Instant, limit: Duration) -> Option<Duration> {
    let tid = Message::parse(req).ok()?.transaction_id();
    while sent.elapsed() < limit {
        let d = c.recv()?;
        if Message::parse(&d).is_ok_and(|m| m.transaction_id() == tid && m.class() != Class::Indication) {
            return Some(sent.elapsed());
        }
    }
    None
}

/// Runs both parts against `run.server`. Errors: the Allocate or a set-up request failed.
pub fn run(run: &PipelineRun) -> Result<PipelineReport, String> {
    let mut c = Client::new(run.server, &run.user, &run.password, "");
    c.try_allocate()?;
    let pairs = run.pairs.min(200);
    let (mut send_relayed, mut channel_data_relayed) = (0, 0);
    for i in 0..pairs {
        let p = peer_on(20, i).map_err(|e| e.to_string())?;
        let pa = p.local_addr().map_err(|e| e.to_string())?;
        let tag = format!("send check {i}");
        let ind = build(Method::SEND, Class::Indication, TransactionId(rand::random()), None, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, &pa)?;
            w.bytes(attr::DATA, tag.as_bytes()).map(drop)
        });
        let req = create_permission(&c, pa);
        c.send_raw(&req);
        c.send_raw(&ind);
        let _ = answered_within(&c, &req, Instant::now(), Duration::from_secs(1));
        send_relayed += received(&p, tag.as_bytes()) as u8;

        let q = peer_on(21, i).map_err(|e| e.to_string())?;
        let qa = q.local_addr().map_err(|e| e.to_string())?;
        let channel = 0x4000 + u16::from(i);
        let tag = format!("channel check {i}");
        let mut cd = channel.to_be_bytes().to_vec();
        cd.extend_from_slice(&(tag.len() as u16).to_be_bytes());
        cd.extend_from_slice(tag.as_bytes());
        let req = channel_bind(&c, channel, qa);
        c.send_raw(&req);
        c.send_raw(&cd);
        let _ = answered_within(&c, &req, Instant::now(), Duration::from_secs(1));
        channel_data_relayed += received(&q, tag.as_bytes()) as u8;
    }

    // Turnaround: requests on the allocation, one at a time.
    let peer = peer_on(22, 0).map_err(|e| e.to_string())?.local_addr().map_err(|e| e.to_string())?;
    c.try_create_permission(&[peer])?;
    c.try_channel_bind(0x4FFF, peer)?;
    let (mut perm, mut bind) = (latency_histogram(), latency_histogram());
    let mut unanswered = 0;
    for k in 0..run.requests * 2 {
        let (req, h) = if k % 2 == 0 {
            (create_permission(&c, peer), &mut perm)
        } else {
            (channel_bind(&c, 0x4FFF, peer), &mut bind)
        };
        let sent = Instant::now();
        c.send_raw(&req);
        match answered_within(&c, &req, sent, Duration::from_secs(1)) {
            Some(rtt) => {
                let _ = h.record(rtt.as_micros().max(1) as u64);
            }
            None => unanswered += 1,
        }
    }
    Ok(PipelineReport {
        pairs,
        send_relayed,
        channel_data_relayed,
        create_permission: Latency::of(&perm),
        channel_bind: Latency::of(&bind),
        unanswered,
    })
}
