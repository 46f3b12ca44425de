//! Peer address policy (RFC 8656 §21.1, §21.2.3; RFC 6156 §9.1): which peers a client may get
//! a permission or a channel for, or Connect to (RFC 6062). Checked by the control plane on every
//! path that names a peer (CreatePermission, ChannelBind, Connect: 403); Send indications and
//! peer datagrams need a permission, so they inherit it.
//!
//! The relay's own services are never peers: every listener of its own (UDP, TCP and TLS client
//! listeners, admin, metrics) is denied always, and a TCP allocation is denied the relay's own
//! addresses on any port unless `allow-peer` lists them (RFC 8656 §21: a loop through the relay
//! would make the client's traffic come from the relay itself).
//!
//! Every address is normalised first: IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible
//! (::a.b.c.d) and NAT64 (64:ff9b::/96) forms are judged as the IPv4 address they carry, so
//! a denied IPv4 range cannot be reached through an IPv6 spelling (coturn CVE-2020-26262).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Always denied: "this network", multicast, reserved/broadcast, link-local (the cloud metadata
/// address 169.254.169.254 lives there), unspecified, site-local (deprecated, RFC 3879), Teredo
/// and 6to4 (RFC 6156 §9.1: MUST NOT; 6to4 also spells any IPv4 address, 2002:7f00::/24 loopback).
pub const DENIED: &[&str] = &[
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "169.254.0.0/16",
    "::/128",
    "ff00::/8",
    "fe80::/10",
    "fec0::/10",
    "2001::/32",
    "2002::/16",
];
/// Denied unless the relay address itself is loopback.
pub const LOOPBACK: &[&str] = &["127.0.0.0/8", "::1/128"];
/// Private ranges: denied unless `allow-peer` lists them.
/// `64:ff9b:1::/48` is the local-use NAT64 prefix (RFC 8215): a site's own translator, which
/// can embed any IPv4 address (its loopback and private ranges too) in more than one layout.
pub const PRIVATE: &[&str] =
    &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7", "64:ff9b:1::/48"];

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().expect("built-in CIDR")).collect()
}

/// The relay's own addresses, as the peer policy sees them.
#[derive(Debug, Clone, Default)]
pub struct OwnAddresses {
    /// Relay IPs (`relay-ip`).
    pub relay_ips: Vec<IpAddr>,
    /// Every listener of the process: UDP, TCP and TLS listen addresses, `admin-listen`,
    /// `metrics-listen`.
    pub listeners: Vec<SocketAddr>,
    /// `external-ip` pairs (public, private).
    pub external: Vec<(IpAddr, IpAddr)>,
    /// The host's interface addresses (used when a listener's IP is unspecified: it answers on
    /// all of them).
    pub host: Vec<IpAddr>,
}

/// The peer policy. Order: the relay's own listeners are always refused (and, for a TCP
/// allocation, its own addresses unless `allow` lists them); then an `allow` entry admits; then
/// the default denials, `deny` entries and private ranges refuse.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    /// The relay's own listening transport addresses with a concrete IP (and their
    /// `external-ip` public forms).
    own: Vec<SocketAddr>,
    /// Ports of listeners on an unspecified IP (0.0.0.0, ::): denied at every own address.
    own_any_ip: Vec<u16>,
    /// The relay's own IPs, normalised: relay IPs, listen IPs, `external-ip` public addresses,
    /// and, when a listener's IP is unspecified, the host's addresses.
    own_ips: Vec<IpAddr>,
    /// A listener's IP is unspecified: every loopback address is the relay's own too.
    own_loopback: bool,
}

impl PeerPolicy {
    /// The policy for a relay with addresses `own`, with the operator's `allow`/`deny` CIDRs.
    /// Loopback peers are allowed only when a relay address is loopback.
    pub fn new(own: &OwnAddresses, allow: &[IpNet], deny: &[IpNet]) -> Self {
        let relay_ips = &own.relay_ips;
        let mut d = nets(DENIED);
        if !relay_ips.iter().any(|ip| normalize(*ip).is_loopback()) {
            d.extend(nets(LOOPBACK));
        }
        d.extend(nets(PRIVATE));
        d.extend_from_slice(deny);
        let public_of = |ip: IpAddr| own.external.iter().filter(move |(_, private)| *private == ip).map(|(p, _)| *p);
        let mut listeners = Vec::new();
        let mut own_any_ip = Vec::new();
        let mut own_ips: Vec<IpAddr> = relay_ips.iter().copied().flat_map(|ip| public_of(ip).chain([ip])).collect();
        let mut own_loopback = false;
        for l in &own.listeners {
            if l.ip().is_unspecified() {
                own_any_ip.push(l.port());
                own_loopback = true;
            } else {
                listeners.push(*l);
                listeners.extend(public_of(l.ip()).map(|p| SocketAddr::new(p, l.port())));
                own_ips.push(l.ip());
            }
        }
        if own_loopback {
            own_ips.extend_from_slice(&own.host);
        }
        for ip in &mut own_ips {
            *ip = normalize(*ip);
        }
        own_ips.sort();
        own_ips.dedup();
        own_any_ip.sort_unstable();
        own_any_ip.dedup();
        PeerPolicy { allow: allow.to_vec(), deny: d, own: listeners, own_any_ip, own_ips, own_loopback }
    }

    /// True when `ip` (normalised) is one of the relay's own addresses.
    fn is_own_ip(&self, ip: IpAddr) -> bool {
        (self.own_loopback && ip.is_loopback()) || self.own_ips.contains(&ip)
    }

    /// True when a client may reach `peer` (UDP allocations; for TCP ones see
    /// [`allows_tcp`](Self::allows_tcp)).
    pub fn allows(&self, peer: SocketAddr) -> bool {
        let ip = normalize(peer.ip());
        if self.own.iter().any(|l| l.port() == peer.port() && normalize(l.ip()) == ip) {
            return false;
        }
        if self.own_any_ip.contains(&peer.port()) && self.is_own_ip(ip) {
            return false;
        }
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        !self.deny.iter().any(|n| n.contains(&ip) || n.contains(&peer.ip()))
    }

    /// True when a TCP allocation (RFC 6062) may reach `peer`: as [`allows`](Self::allows), and
    /// not at an address of the relay's own on any port (its other TCP services: SSH, a local
    /// Redis, another allocation's relayed address) unless `allow-peer` lists that address.
    pub fn allows_tcp(&self, peer: SocketAddr) -> bool {
        let ip = normalize(peer.ip());
        if self.is_own_ip(ip) && !self.allow.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allows(peer)
    }

    /// One line for the startup log.
    pub fn describe(&self) -> String {
        format!(
            "peers denied: {} (private ranges {} unless allow-peer lists them); allowed by allow-peer: {}",
            self.deny.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            PRIVATE.join(", "),
            if self.allow.is_empty() {
                "none".into()
            } else {
                self.allow.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            }
        )
    }
}

/// Reduces IPv4-mapped (::ffff:0:0/96), IPv4-translated (::ffff:0:0:0/96, RFC 2765),
/// IPv4-compatible (::/96 other than :: and ::1) and NAT64 (64:ff9b::/96, RFC 6052) IPv6
/// addresses to the IPv4 address they carry.
pub fn normalize(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    let s = v6.segments();
    let embedded = || IpAddr::V4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => embedded(),
        [0, 0, 0, 0, 0xffff, 0, _, _] => embedded(),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => embedded(),
        [0, 0, 0, 0, 0, 0, _, _] if v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST => embedded(),
        _ => ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn at(ip: IpAddr) -> SocketAddr {
        SocketAddr::new(ip, 5000)
    }
    fn own(relay_ips: &[&str], listeners: &[&str]) -> OwnAddresses {
        OwnAddresses {
            relay_ips: relay_ips.iter().map(|s| ip(s)).collect(),
            listeners: listeners.iter().map(|s| s.parse().unwrap()).collect(),
            ..OwnAddresses::default()
        }
    }
    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Every IPv6 spelling of an IPv4 address.
    fn spellings(v4: Ipv4Addr) -> Vec<IpAddr> {
        let o = v4.octets();
        let (hi, lo) = (u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]]));
        vec![
            IpAddr::V4(v4),
            IpAddr::V6(v4.to_ipv6_mapped()),
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, hi, lo)),
            IpAddr::V6(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, hi, lo)),
            // IPv4-translated (RFC 2765), 6to4 (RFC 3056), local-use NAT64 (RFC 8215, /96 layout).
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, hi, lo)),
            IpAddr::V6(Ipv6Addr::new(0x2002, hi, lo, 0, 0, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, hi, lo)),
        ]
    }

    /// First, second and last address of each IPv4 range in `list`.
    fn samples(list: &[&str]) -> Vec<Ipv4Addr> {
        let mut out = Vec::new();
        for n in list {
            if let Ok(IpNet::V4(n)) = n.parse::<IpNet>() {
                let first = u32::from(n.network());
                let last = u32::from(n.broadcast());
                out.extend([first, first.saturating_add(1).min(last), last].map(Ipv4Addr::from));
            }
        }
        out
    }

    #[test]
    fn every_spelling_of_every_denied_ipv4_range_is_denied() {
        let p = PeerPolicy::new(&own(&["192.0.2.1"], &[]), &[], &[]);
        for v4 in samples(DENIED).into_iter().chain(samples(LOOPBACK)).chain(samples(PRIVATE)) {
            for form in spellings(v4) {
                assert!(!p.allows(at(form)), "{form} ({v4}) must be denied");
            }
        }
        for v6 in [
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "fec0::1",
            "2001::1",
            "2001:0:ffff::1",
            "2002:c000:201::1",
            "fc00::1",
            "fd12::1",
        ] {
            assert!(!p.allows(at(ip(v6))), "{v6}");
        }
        for good in
            ["198.51.100.7", "8.8.8.8", "::ffff:198.51.100.7", "64:ff9b::808:808", "2001:db8::1", "2400:cb00::1"]
        {
            assert!(p.allows(at(ip(good))), "{good}");
        }
    }

    #[test]
    fn loopback_relay_may_reach_loopback_but_not_its_listener() {
        let listen: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        let p = PeerPolicy::new(&own(&["127.0.0.1"], &["127.0.0.1:3478"]), &[], &[]);
        assert!(p.allows("127.0.0.1:5000".parse().unwrap()));
        assert!(p.allows("[::ffff:127.0.0.1]:5000".parse().unwrap()));
        assert!(!p.allows(listen));
        assert!(!p.allows("[::ffff:127.0.0.1]:3478".parse().unwrap()), "listener through a mapped address");
        assert!(!p.allows("0.0.0.0:5000".parse().unwrap()));
        assert!(!p.allows("10.1.2.3:5000".parse().unwrap()), "private stays denied");
        let any = PeerPolicy::new(&own(&["192.0.2.1"], &["0.0.0.0:3478"]), &[], &[]);
        assert!(any.allows("198.51.100.7:3478".parse().unwrap()), "another host's port 3478 is fine");
        assert!(!any.allows("192.0.2.1:3478".parse().unwrap()), "the relay IP's listener");
    }

    #[test]
    fn allow_and_deny_flags() {
        let p = PeerPolicy::new(
            &own(&["192.0.2.1"], &[]),
            &["10.0.0.0/8".parse().unwrap()],
            &["198.51.100.0/24".parse().unwrap()],
        );
        assert!(p.allows(at(ip("10.9.9.9"))));
        assert!(p.allows(at(ip("::ffff:10.9.9.9"))), "allowed through a mapped spelling too");
        assert!(!p.allows(at(ip("192.168.1.1"))));
        assert!(!p.allows(at(ip("198.51.100.9"))));
        assert!(p.describe().contains("10.0.0.0/8"));
    }

    #[test]
    fn every_own_listener_is_denied_and_tcp_allocations_are_denied_own_addresses() {
        // Concrete listeners: UDP, TCP, TLS, admin and metrics alike (the policy sees addresses).
        let mut o = own(&["192.0.2.1"], &["192.0.2.1:3478", "192.0.2.1:5349", "127.0.0.1:8080", "127.0.0.1:9090"]);
        o.external = vec![(ip("203.0.113.5"), ip("192.0.2.1"))];
        let p = PeerPolicy::new(&o, &["127.0.0.0/8".parse().unwrap()], &[]);
        for l in ["192.0.2.1:3478", "192.0.2.1:5349", "127.0.0.1:8080", "127.0.0.1:9090", "203.0.113.5:3478"] {
            assert!(!p.allows(sa(l)), "{l}: an own listener, even with allow-peer");
            assert!(!p.allows_tcp(sa(l)), "{l}");
        }
        // Other ports of the relay's addresses: fine for UDP allocations, not for TCP ones
        // (unless allow-peer lists them: 127.0.0.0/8 here).
        for other in ["192.0.2.1:22", "203.0.113.5:6379", "[::ffff:192.0.2.1]:22"] {
            assert!(p.allows(sa(other)), "{other}");
            assert!(!p.allows_tcp(sa(other)), "{other}: the relay's own address, TCP");
        }
        assert!(p.allows_tcp(sa("127.0.0.1:6379")), "allow-peer lists 127.0.0.0/8");
        assert!(p.allows_tcp(sa("198.51.100.7:22")), "another host");
        let allowed = PeerPolicy::new(&o, &["192.0.2.1/32".parse().unwrap()], &[]);
        assert!(allowed.allows_tcp(sa("192.0.2.1:22")));
        assert!(!allowed.allows_tcp(sa("192.0.2.1:3478")), "the listener stays denied");

        // A listener on 0.0.0.0: loopback and every host address at its port, and every one of
        // them for TCP allocations.
        let mut o = own(&["192.0.2.1"], &["0.0.0.0:3478", "0.0.0.0:9090"]);
        o.host = vec![ip("127.0.0.1"), ip("192.0.2.1"), ip("198.51.100.20")];
        let p = PeerPolicy::new(&o, &[], &[]);
        for l in ["198.51.100.20:3478", "198.51.100.20:9090", "192.0.2.1:9090", "127.0.0.5:3478"] {
            assert!(!p.allows(sa(l)), "{l}");
        }
        assert!(p.allows(sa("198.51.100.20:22")));
        assert!(!p.allows_tcp(sa("198.51.100.20:22")), "a host address");
        assert!(p.allows_tcp(sa("198.51.100.21:22")));
    }
}
