//! Public address discovery for `external-ip = "auto"`: a relay on a cloud host (behind a 1:1
//! NAT) asks a STUN server it is told about (`external-ip-stun = "host:port"`) what its relay
//! addresses look like from outside, and advertises the answer in XOR-RELAYED-ADDRESS.
//!
//! One STUN Binding request (RFC 8489 §6.2.1, over UDP, retransmitted after 500 ms, 1 s and
//! 2 s) is sent from each relay IP (bound to port 0 there) to the server; the IP of the
//! success response's XOR-MAPPED-ADDRESS (RFC 8489 §14.2) becomes the public address of that
//! relay IP. It runs at start and on SIGHUP (docs/operations.md, "Public address discovery").
//! The port of the mapping is not used: a 1:1 NAT keeps ports, and one that does not is
//! logged.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};
use uturn_proto::wire::{attr, Class, Message, MessageWriter, Method, TransactionId};

use crate::config::Config;

/// Waits between the transmissions of one Binding request (RFC 8489 §6.2.1: RTO 500 ms,
/// doubling); after the last one the request has failed (3.5 s in all).
const WAITS: [Duration; 3] = [Duration::from_millis(500), Duration::from_millis(1000), Duration::from_millis(2000)];

/// What one Binding request found: the relay IP it was sent from and what the server saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The local (private) address the request left from: relay IP and an ephemeral port.
    pub local: SocketAddr,
    /// XOR-MAPPED-ADDRESS of the success response: the address as the server saw it.
    pub mapped: SocketAddr,
}

/// Sends a Binding request from `relay_ip` (port 0) to `server` (`host:port`, resolved here,
/// the first address of `relay_ip`'s family) and returns the mapping.
///
/// Errors: `server` does not resolve to an address of that family, the socket cannot be bound,
/// no answer within 3.5 s, an error response (its code), or a success response without a
/// valid XOR-MAPPED-ADDRESS.
pub fn binding(relay_ip: IpAddr, server: &str) -> Result<Mapping> {
    let target = server
        .to_socket_addrs()
        .with_context(|| format!("external-ip-stun {server:?}: cannot resolve (expected host:port)"))?
        .find(|a| a.is_ipv4() == relay_ip.is_ipv4())
        .with_context(|| format!("external-ip-stun {server:?}: no address of {relay_ip}'s family"))?;
    let socket = UdpSocket::bind(SocketAddr::new(relay_ip, 0)).with_context(|| format!("binding {relay_ip}:0"))?;
    let local = socket.local_addr()?;
    let tid = TransactionId(rand::random());
    let mut request = [0u8; 64];
    let len = {
        let mut w = MessageWriter::new(&mut request, Method::BINDING, Class::Request, tid).expect("64 bytes hold it");
        w.fingerprint().expect("64 bytes hold it");
        w.finish()
    };
    let mut buf = [0u8; 1500];
    for wait in WAITS {
        socket.send_to(&request[..len], target).with_context(|| format!("sending a Binding request to {target}"))?;
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket.set_read_timeout(Some(left))?;
            let (n, from) = match socket.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                // An ICMP port unreachable from an earlier transmission: retransmit anyway.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e).context("receiving the Binding response"),
            };
            // Only the server's answer to this transaction counts (RFC 8489 §6.3).
            let Ok(msg) = Message::parse(&buf[..n]) else { continue };
            if from != target || msg.transaction_id() != tid || msg.method() != Method::BINDING {
                continue;
            }
            match msg.class() {
                Class::Success => {}
                Class::Error => bail!("{target} answered the Binding request with an error response"),
                _ => continue,
            }
            let mapped = msg
                .xor_address(attr::XOR_MAPPED_ADDRESS)
                .with_context(|| format!("{target}: Binding success response without XOR-MAPPED-ADDRESS"))?
                .map_err(|e| anyhow::anyhow!("{target}: bad XOR-MAPPED-ADDRESS: {e:?}"))?;
            return Ok(Mapping { local, mapped });
        }
    }
    bail!("no Binding response from {target} within 3.5 s (external-ip-stun {server:?})")
}

/// For `external-ip = "auto"`: asks `external-ip-stun` once per relay IP and sets
/// `config.external_ips` to (relay IP, mapped IP) pairs, logging each mapping. Does nothing
/// for any other configuration.
///
/// Errors: as [`binding`], for any relay IP (the relay then does not start, or SIGHUP keeps
/// the running configuration). On SIGHUP it runs on the reload thread (crate::server), not in
/// the control loop.
pub fn resolve(config: &mut Config) -> Result<()> {
    let Some(server) = config.external_ip_stun.clone().filter(|_| config.external_ip_auto) else {
        return Ok(());
    };
    // One request per relay IP, all at once: the wait is one round trip (3.5 s at worst, when
    // the server does not answer), whatever the number of relay IPs.
    let answers: Vec<Result<Mapping>> = std::thread::scope(|scope| {
        let asks: Vec<_> = config
            .relay_ips
            .iter()
            .map(|&ip| {
                scope.spawn({
                    let server = &server;
                    move || binding(ip, server)
                })
            })
            .collect();
        asks.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("discovery thread panicked"))))
            .collect()
    });
    let mut pairs = Vec::with_capacity(config.relay_ips.len());
    for (&ip, answer) in config.relay_ips.iter().zip(answers) {
        let m = answer.with_context(|| format!("public address discovery for relay-ip {ip}"))?;
        info!(
            relay_ip = %ip, local = %m.local, mapped = %m.mapped, stun = %server,
            "public address discovery: relayed transport addresses on {ip} are advertised as {}", m.mapped.ip()
        );
        if m.mapped.port() != m.local.port() {
            warn!(
                relay_ip = %ip, local = %m.local, mapped = %m.mapped,
                "public address discovery: the NAT changes ports, so peers cannot reach relayed transport \
                 addresses at the advertised port; external-ip = \"auto\" needs a 1:1 NAT"
            );
        }
        pairs.push((ip, m.mapped.ip()));
    }
    config.external_ips = pairs;
    Ok(())
}
