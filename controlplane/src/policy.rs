//! Peer address policy (RFC 8656 §21.1, §21.2.3): which peers a client may get a permission or
//! channel for. Checked by the control plane on CreatePermission and ChannelBind (403); Send
//! indications and peer datagrams need a permission, so they inherit it.

use std::net::IpAddr;

use ipnet::IpNet;

/// Default denials: "this network", multicast, limited broadcast; loopback unless the relay
/// itself is on loopback.
fn default_denied(relay_is_loopback: bool) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = ["0.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32", "::/128", "ff00::/8"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    if !relay_is_loopback {
        v.push("127.0.0.0/8".parse().unwrap());
        v.push("::1/128".parse().unwrap());
    }
    v
}

/// The peer policy: `allow` entries win over everything, then `deny` entries and the defaults.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl PeerPolicy {
    /// Builds the policy for a relay on `relay_ip` with the operator's `allow`/`deny` CIDRs.
    pub fn new(relay_ip: IpAddr, allow: &[IpNet], deny: &[IpNet]) -> Self {
        let mut d = default_denied(normalize(relay_ip).is_loopback());
        d.extend_from_slice(deny);
        PeerPolicy { allow: allow.to_vec(), deny: d }
    }

    /// True when a client may reach `peer`. IPv4-mapped IPv6 addresses are judged as the IPv4
    /// address they carry.
    pub fn allows(&self, peer: IpAddr) -> bool {
        let ip = normalize(peer);
        if self.allow.iter().any(|n| n.contains(&ip) || n.contains(&peer)) {
            return true;
        }
        !self.deny.iter().any(|n| n.contains(&ip) || n.contains(&peer))
    }
}

/// Reduces an IPv4-mapped IPv6 address (::ffff:a.b.c.d) to its IPv4 address.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_on_a_public_relay() {
        let p = PeerPolicy::new(ip("192.0.2.1"), &[], &[]);
        for bad in [
            "0.0.0.1",
            "224.0.0.1",
            "239.1.2.3",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "ff02::1",
            "::",
        ] {
            assert!(!p.allows(ip(bad)), "{bad}");
        }
        for good in ["198.51.100.7", "2001:db8::1"] {
            assert!(p.allows(ip(good)), "{good}");
        }
    }

    #[test]
    fn loopback_relay_may_reach_loopback_peers_and_flags_override() {
        let p = PeerPolicy::new(ip("127.0.0.1"), &[], &[]);
        assert!(p.allows(ip("127.0.0.1")));
        assert!(!p.allows(ip("0.0.0.0")));
        let p =
            PeerPolicy::new(ip("192.0.2.1"), &["127.0.0.0/8".parse().unwrap()], &["198.51.100.0/24".parse().unwrap()]);
        assert!(p.allows(ip("127.0.0.5")));
        assert!(!p.allows(ip("198.51.100.9")));
    }
}
