//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, v1 text and v2 binary) from trusted load
//! balancers: the header that names the real client of a TCP/TLS connection (sent once, before
//! any other byte, the TLS handshake included) or of a UDP datagram (v2 only, a header on every
//! datagram).
//!
//! The header is parsed by the `ppp` crate, once per connection (off the per-packet path) and
//! once per datagram only where `proxy-protocol-udp` is on. A source outside `proxy-trusted`, a
//! missing, malformed or (on a connection) late header closes the connection or drops the
//! datagram, counted by [`PROXY_REFUSALS`] reason (docs/security.md).
//!
//! After a valid header the real client address is the client of the 5-tuple: the peer policy,
//! the per-source budgets, the logs and XOR-MAPPED-ADDRESS all see it. A `LOCAL` header (a
//! balancer's health check) or an address family without addresses (`UNKNOWN`, `AF_UNSPEC`,
//! AF_UNIX) keeps the connection's own source, as the specification asks.

use std::net::{IpAddr, SocketAddr};

use hashbrown::HashMap;
use ipnet::IpNet;
use ppp::{v1, v2, HeaderResult, PartialResult};
use uturn_proto::FiveTuple;

/// Where the PROXY protocol is expected and from whom.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyProtocol {
    /// Every TCP and TLS connection starts with a PROXY v1 or v2 header (`proxy-protocol`).
    pub streams: bool,
    /// Every UDP datagram starts with a PROXY v2 header (`proxy-protocol-udp`).
    pub datagrams: bool,
    /// The balancers' addresses (`proxy-trusted`); any other source is refused on a listener
    /// that expects the header. IPv4-mapped IPv6 sources match as IPv4.
    pub trusted: Vec<IpNet>,
}

impl ProxyProtocol {
    /// True when `ip` is inside a `proxy-trusted` network.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|n| n.contains(&ip))
    }
}

/// Why a connection or datagram was refused, as metrics label them (`reason`).
pub const PROXY_REFUSALS: [&str; 4] = ["untrusted", "missing", "malformed", "timeout"];

/// Why a PROXY header was refused (an index into [`PROXY_REFUSALS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The source is not in `proxy-trusted`.
    Untrusted = 0,
    /// The first bytes are not a PROXY header (a client talking straight to the relay).
    Missing = 1,
    /// A PROXY header that does not parse, is too long, or names a 5-tuple already open.
    Malformed = 2,
    /// The header did not arrive whole within the handshake timeout (connections only).
    Timeout = 3,
}

/// PROXY protocol counters of one worker.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProxyCounters {
    /// Connections whose header was taken.
    pub streams_accepted: u64,
    /// Connections closed for their header, by reason ([`PROXY_REFUSALS`] order).
    pub streams_refused: [u64; PROXY_REFUSALS.len()],
    /// Datagrams whose header was taken.
    pub datagrams_accepted: u64,
    /// Datagrams dropped for their header, by reason ([`PROXY_REFUSALS`] order).
    pub datagrams_refused: [u64; PROXY_REFUSALS.len()],
}

impl ProxyCounters {
    pub(crate) fn refuse_stream(&mut self, r: Refusal) {
        self.streams_refused[r as usize] += 1;
    }

    pub(crate) fn refuse_datagram(&mut self, r: Refusal) {
        self.datagrams_refused[r as usize] += 1;
    }
}

/// The longest header a connection may send, bytes: v2's 16 bytes plus addresses and TLVs
/// (balancers send a few dozen bytes of TLVs: AWS's VPC endpoint ID, HAProxy's SSL ones).
pub(crate) const MAX_HEADER: usize = 16 + 4096;

/// A header read off the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The real client, or `None` to keep the connection's own source (LOCAL, UNKNOWN).
    pub(crate) source: Option<SocketAddr>,
    /// The header's length, bytes (what follows is the client's own traffic).
    pub(crate) len: usize,
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// Parses the v1 or v2 header at the start of a connection's bytes: `Ok(None)` while it is
/// incomplete (the caller waits for more, up to [`MAX_HEADER`] bytes).
pub(crate) fn parse_stream(buf: &[u8]) -> Result<Option<Header>, Refusal> {
    let n = buf.len().min(V2_SIGNATURE.len());
    let m = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V2_SIGNATURE[..n] && buf[..m] != V1_PREFIX[..m] {
        return Err(Refusal::Missing);
    }
    let parsed = HeaderResult::parse(buf);
    if parsed.is_incomplete() {
        return if buf.len() >= MAX_HEADER { Err(Refusal::Malformed) } else { Ok(None) };
    }
    match parsed {
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            Ok(Some(Header { source, len: h.header.len() }))
        }
        HeaderResult::V2(Ok(h)) => v2_header(&h).map(Some),
        _ => Err(Refusal::Malformed),
    }
}

/// Parses the v2 header at the start of a datagram (v1 has no UDP form); the datagram must hold
/// it whole.
pub(crate) fn parse_datagram(datagram: &[u8]) -> Result<Header, Refusal> {
    let n = datagram.len().min(V2_SIGNATURE.len());
    if datagram[..n] != V2_SIGNATURE[..n] || n < V2_SIGNATURE.len() {
        return Err(Refusal::Missing);
    }
    match v2::Header::try_from(datagram) {
        Ok(h) => v2_header(&h),
        Err(_) => Err(Refusal::Malformed),
    }
}

fn v2_header(h: &v2::Header<'_>) -> Result<Header, Refusal> {
    let source = match (h.command, h.addresses) {
        (v2::Command::Local, _) => None,
        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
        (v2::Command::Proxy, _) => None,
    };
    if source.is_some_and(|s| s.port() == 0 || s.ip().is_unspecified()) {
        return Err(Refusal::Malformed);
    }
    Ok(Header { source, len: h.len() })
}

/// `proxy-protocol-udp`: the return path of each client a balancer sent datagrams for. The real
/// client is the 5-tuple's client; what the relay sends to that client (responses, Data
/// indications, ChannelData) goes to the balancer address the client's last datagram came
/// from, without a header (the balancer keeps one socket per client flow and knows whose it
/// is, as for any UDP flow it proxies).
#[derive(Debug, Default)]
pub(crate) struct DatagramProxy {
    pub(crate) config: ProxyProtocol,
    /// 5-tuple (real client) to the balancer address that carries it.
    via: HashMap<FiveTuple, SocketAddr>,
}

/// Return paths a worker keeps before it forgets those of 5-tuples without an allocation.
const MAX_RETURN_PATHS: usize = 64 * 1024;

impl DatagramProxy {
    pub(crate) fn new(config: ProxyProtocol) -> Self {
        DatagramProxy { config, via: HashMap::new() }
    }

    /// Notes that `ft`'s client is reached through `balancer`; when the table is full, the
    /// return paths of 5-tuples `live` says hold no allocation are forgotten first.
    pub(crate) fn learn(&mut self, ft: FiveTuple, balancer: SocketAddr, live: impl Fn(&FiveTuple) -> bool) {
        if self.via.get(&ft) == Some(&balancer) {
            return;
        }
        if self.via.len() >= MAX_RETURN_PATHS {
            self.via.retain(|ft, _| live(ft));
        }
        self.via.insert(ft, balancer);
    }

    /// Where datagrams for `ft`'s client go: the balancer that carries it (`None`: unknown,
    /// dropped rather than sent around the balancer).
    pub(crate) fn via(&self, ft: &FiveTuple) -> Option<SocketAddr> {
        self.via.get(ft).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addr: &[u8], tail: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(0x20 | command);
        b.push(family);
        b.extend_from_slice(&(addr.len() as u16).to_be_bytes());
        b.extend_from_slice(addr);
        b.extend_from_slice(tail);
        b
    }

    #[test]
    fn v1_and_v2_headers_name_the_real_client_and_their_length() {
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 3478\r\n\x00\x01";
        let h = parse_stream(v1).unwrap().unwrap();
        assert_eq!(h.source, Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(h.len, v1.len() - 2);
        let v1u = b"PROXY UNKNOWN\r\nrest";
        assert_eq!(parse_stream(v1u).unwrap().unwrap(), Header { source: None, len: 15 });
        let addr = [192, 0, 2, 9, 198, 51, 100, 1, 0x9c, 0x40, 0x0d, 0x96];
        let b = v2(1, 0x11, &addr, b"TURN");
        let h = parse_stream(&b).unwrap().unwrap();
        assert_eq!(h.source, Some("192.0.2.9:40000".parse().unwrap()));
        assert_eq!(&b[h.len..], b"TURN");
        let d = v2(1, 0x12, &addr, b"x");
        assert_eq!(parse_datagram(&d).unwrap().len, d.len() - 1);
        // LOCAL: the balancer's own (health check) traffic.
        assert_eq!(parse_datagram(&v2(0, 0, &[], b"x")).unwrap(), Header { source: None, len: 16 });
        let mut v6 = [0u8; 36];
        v6[..16].copy_from_slice(&"2001:db8::5".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6[32..34].copy_from_slice(&5000u16.to_be_bytes());
        let h = parse_datagram(&v2(1, 0x22, &v6, b"")).unwrap();
        assert_eq!(h.source, Some("[2001:db8::5]:5000".parse().unwrap()));
    }

    #[test]
    fn partial_headers_wait_and_bad_ones_are_refused() {
        assert_eq!(parse_stream(b"PRO"), Ok(None));
        assert_eq!(parse_stream(b"PROXY TCP4 192.0.2.7 198.51"), Ok(None));
        assert_eq!(parse_stream(&V2_SIGNATURE[..5]), Ok(None));
        let addr = [192, 0, 2, 9, 198, 51, 100, 1, 0x9c, 0x40, 0x0d, 0x96];
        let b = v2(1, 0x11, &addr, b"");
        assert_eq!(parse_stream(&b[..20]), Ok(None));
        // A STUN message straight from a client, or TLS: no header.
        assert_eq!(parse_stream(&[0x00, 0x01, 0x00, 0x00, 0x21, 0x12]), Err(Refusal::Missing));
        assert_eq!(parse_stream(&[0x16, 0x03, 0x01]), Err(Refusal::Missing));
        assert_eq!(parse_datagram(&[0x00, 0x01, 0x00, 0x00]), Err(Refusal::Missing));
        assert_eq!(parse_datagram(&b[..20]), Err(Refusal::Malformed), "a datagram holds its header whole");
        assert_eq!(parse_stream(b"PROXY TCP4 999.0.2.7 198.51.100.1 1 2\r\n"), Err(Refusal::Malformed));
        assert_eq!(parse_stream(b"PROXY SCTP 1\r\n"), Err(Refusal::Malformed));
        assert_eq!(parse_stream(&v2(7, 0x11, &addr, b"")), Err(Refusal::Malformed), "bad command");
        assert_eq!(parse_stream(&v2(1, 0x11, &addr[..8], b"")), Err(Refusal::Malformed), "short addresses");
        let zero = [0u8; 12];
        assert_eq!(parse_datagram(&v2(1, 0x12, &zero, b"")), Err(Refusal::Malformed), "0.0.0.0:0");
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(200, b'1');
        assert_eq!(parse_stream(&long), Err(Refusal::Malformed));
    }

    #[test]
    fn return_paths_follow_the_last_balancer_and_keep_live_ones_when_full() {
        let server: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let ft = |i: u32| FiveTuple::udp(SocketAddr::from((i.to_be_bytes(), 1000)), server);
        let (b1, b2): (SocketAddr, SocketAddr) = ("10.0.0.1:5000".parse().unwrap(), "10.0.0.2:6000".parse().unwrap());
        let mut p = DatagramProxy::new(ProxyProtocol::default());
        assert_eq!(p.via(&ft(1)), None);
        p.learn(ft(1), b1, |_| true);
        assert_eq!(p.via(&ft(1)), Some(b1));
        p.learn(ft(1), b2, |_| true);
        assert_eq!(p.via(&ft(1)), Some(b2), "the last balancer carries the client");
        for i in 2..MAX_RETURN_PATHS as u32 + 1 {
            p.learn(ft(i), b1, |_| true);
        }
        // Full: only the 5-tuples with an allocation (here the first one) are kept.
        p.learn(ft(u32::MAX), b1, |f| *f == ft(1));
        assert_eq!(p.via.len(), 2);
        assert_eq!((p.via(&ft(1)), p.via(&ft(u32::MAX)), p.via(&ft(2))), (Some(b2), Some(b1), None));
    }

    #[test]
    fn trust_is_by_network_and_mapped_addresses_match_as_ipv4() {
        let p = ProxyProtocol {
            trusted: vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            ..Default::default()
        };
        assert!(p.trusts("10.1.2.3".parse().unwrap()));
        assert!(p.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(p.trusts("::1".parse().unwrap()));
        assert!(!p.trusts("11.0.0.1".parse().unwrap()));
        assert!(!ProxyProtocol::default().trusts("10.1.2.3".parse().unwrap()));
    }
}
