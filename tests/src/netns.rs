//! Three network namespaces joined by two veth pairs, for tests that must cross real
//! interfaces (XDP): a client, a relay and a peer host.
//!
//! ```text
//!  client ns            relay ns                         peer ns
//!  {p}c0 10.201.1.1 --- {p}c1 10.201.1.2 | {p}p1 10.201.2.2 --- {p}p0 10.201.2.1
//!       fd00:201:1::1       fd00:201:1::2   fd00:201:2::2       fd00:201:2::1
//! ```
//!
//! The relay namespace forwards IPv4 and IPv6 (`bpf_fib_lookup` refuses to answer on an interface that
//! does not). The outer veth ends have GRO on, so frames an XDP program transmits or redirects
//! into them are delivered (veth needs NAPI on the receiving end), and TX checksum offload off on
//! every end, so locally generated datagrams carry full checksums. Every name is prefixed, so
//! tests in parallel do not meet; the namespaces (and with them the veths) are deleted on drop.

use std::process::{Command, Output};

/// Address of the client host.
pub const CLIENT_IP: &str = "10.201.1.1";
/// The relay's address on the client side (its listen address).
pub const RELAY_CLIENT_SIDE: &str = "10.201.1.2";
/// The relay's address on the peer side (its relay address).
pub const RELAY_PEER_SIDE: &str = "10.201.2.2";
/// Address of the peer host.
pub const PEER_IP: &str = "10.201.2.1";
/// The client host's IPv6 address.
pub const CLIENT_IP6: &str = "fd00:201:1::1";
/// The relay's IPv6 address on the client side.
pub const RELAY_CLIENT_SIDE6: &str = "fd00:201:1::2";
/// The relay's IPv6 address on the peer side.
pub const RELAY_PEER_SIDE6: &str = "fd00:201:2::2";
/// The peer host's IPv6 address.
pub const PEER_IP6: &str = "fd00:201:2::1";

/// The three namespaces; deleted on drop.
pub struct Topology {
    prefix: String,
}

fn run(args: &[&str]) -> Result<Output, String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(out)
}

impl Topology {
    /// Creates the namespaces `{prefix}c`, `{prefix}r`, `{prefix}p` (prefix at most 10 bytes:
    /// interface names are limited to 15). Fails when not root or `ip`/`ethtool` is missing.
    pub fn create(prefix: &str) -> Result<Topology, String> {
        assert!(prefix.len() <= 10, "prefix too long for interface names");
        let t = Topology { prefix: prefix.to_string() };
        // Leftovers of a killed run with the same prefix.
        for n in ["c", "r", "p"] {
            let _ = Command::new("ip").args(["netns", "del", &format!("{prefix}{n}")]).output();
        }
        let (c, r, p) = (t.ns("c"), t.ns("r"), t.ns("p"));
        for ns in [&c, &r, &p] {
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let (c0, c1, p0, p1) = (t.ifname("c0"), t.ifname("c1"), t.ifname("p0"), t.ifname("p1"));
        run(&["ip", "link", "add", &c0, "netns", &c, "type", "veth", "peer", "name", &c1, "netns", &r])?;
        run(&["ip", "link", "add", &p0, "netns", &p, "type", "veth", "peer", "name", &p1, "netns", &r])?;
        for (ns, dev, cidr) in [
            (&c, &c0, format!("{CLIENT_IP}/24")),
            (&r, &c1, format!("{RELAY_CLIENT_SIDE}/24")),
            (&r, &p1, format!("{RELAY_PEER_SIDE}/24")),
            (&p, &p0, format!("{PEER_IP}/24")),
        ] {
            run(&["ip", "-n", ns, "addr", "add", &cidr, "dev", dev])?;
        }
        // nodad: usable at once, not after duplicate address detection.
        for (ns, dev, cidr) in [
            (&c, &c0, format!("{CLIENT_IP6}/64")),
            (&r, &c1, format!("{RELAY_CLIENT_SIDE6}/64")),
            (&r, &p1, format!("{RELAY_PEER_SIDE6}/64")),
            (&p, &p0, format!("{PEER_IP6}/64")),
        ] {
            run(&["ip", "-n", ns, "-6", "addr", "add", &cidr, "dev", dev, "nodad"])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        run(&["ip", "-n", &c, "route", "add", "default", "via", RELAY_CLIENT_SIDE])?;
        run(&["ip", "-n", &p, "route", "add", "default", "via", RELAY_PEER_SIDE])?;
        run(&["ip", "-n", &c, "-6", "route", "add", "default", "via", RELAY_CLIENT_SIDE6])?;
        run(&["ip", "-n", &p, "-6", "route", "add", "default", "via", RELAY_PEER_SIDE6])?;
        run(&["ip", "netns", "exec", &r, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"])?;
        run(&["ip", "netns", "exec", &r, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        for (ns, dev) in [(&c, &c0), (&p, &p0)] {
            run(&["ip", "netns", "exec", ns, "ethtool", "-K", dev, "gro", "on", "tx", "off"])?;
        }
        for dev in [&c1, &p1] {
            run(&["ip", "netns", "exec", &r, "ethtool", "-K", dev, "tx", "off"])?;
        }
        Ok(t)
    }

    fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }

    fn ifname(&self, end: &str) -> String {
        format!("{}{end}", self.prefix)
    }

    /// The client namespace's name.
    pub fn client(&self) -> String {
        self.ns("c")
    }

    /// The relay namespace's name.
    pub fn relay(&self) -> String {
        self.ns("r")
    }

    /// The peer namespace's name.
    pub fn peer(&self) -> String {
        self.ns("p")
    }

    /// `program args...` to run inside namespace `ns` (`ip netns exec` execs it, so the child's
    /// PID is the program's).
    pub fn command(ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for role in ["c", "r", "p"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(role)]).output();
        }
    }
}
