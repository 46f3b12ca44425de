//! The XDP fast path end to end, in network namespaces this test creates (client, relay,
//! peer; `uturn_tests::netns`), with the program attached in native mode and again in generic
//! mode:
//! - coturn's `turnutils_uclient` in the client namespace relays through uturn to
//!   `turnutils_peer` in the peer namespace with zero loss, and the metrics show the ChannelData
//!   took the XDP path (the program's verdicts and the workers' totals agree);
//! - a hot upgrade with XDP native: the new process relays through its own program, no loss;
//! - a raw client (`tests/python/turn_probe.py`), over IPv4 and over IPv6, shows STUN, an unbound channel and garbage
//!   still reach the socket path and are answered or counted there, a binding whose permission
//!   lapsed stops relaying at once in both directions, a renewed one relays through XDP again,
//!   and a deleted allocation relays nothing.
//!
//! Needs root (namespaces, bpf()). Where that is missing, or the kernel refuses bpf(), each
//! test prints why and returns without asserting.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use uturn_tests::netns::{
    Topology, PEER_IP, PEER_IP6, RELAY_CLIENT_SIDE, RELAY_CLIENT_SIDE6, RELAY_PEER_SIDE, RELAY_PEER_SIDE6,
};
use uturn_tests::{run_with_timeout, uturn_bin, Guard};

const METRICS: &str = "127.0.0.1:9100";

/// A uturn running in the relay namespace with XDP attached; killed by PID on drop.
struct XdpRelay {
    child: Guard,
    log: PathBuf,
    ns: String,
}

impl XdpRelay {
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.0.try_wait().ok().flatten()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The metrics exposition, fetched inside the relay namespace.
    fn metrics(&self) -> String {
        let script = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())";
        let out = Topology::command(&self.ns, "python3")
            .args(["-c", script, &format!("http://{METRICS}/metrics")])
            .output()
            .expect("python3");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sum of the samples of `name` whose labels contain every one of `labels`.
    fn sum(&self, text: &str, name: &str, labels: &[&str]) -> u64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Waits up to 5 s for `cond` over a fresh scrape (the workers publish every 250 ms).
    fn wait_metrics(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        self.wait_metrics_for(what, Duration::from_secs(5), cond)
    }

    /// Waits up to `limit` for `cond` over a fresh scrape.
    fn wait_metrics_for(&self, what: &str, limit: Duration, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let m = self.metrics();
            if cond(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "{what} never held:\n{m}\n--- uturn log ---\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The addresses a test uses: IPv4, or IPv6 (RFC 6156 allocations).
#[derive(Clone, Copy)]
struct Family {
    listen: &'static str,
    relay: &'static str,
    peer: &'static str,
    peers: &'static str,
}

const V4: Family = Family { listen: RELAY_CLIENT_SIDE, relay: RELAY_PEER_SIDE, peer: PEER_IP, peers: "10.201.2.0/24" };
const V6: Family =
    Family { listen: RELAY_CLIENT_SIDE6, relay: RELAY_PEER_SIDE6, peer: PEER_IP6, peers: "fd00:201:2::/64" };

/// `ip` and `port` as a socket address.
fn sa(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The namespaces and a relay in `mode`, or `None` (with the reason printed) where this machine
/// cannot run XDP.
fn start(mode: &str, tag: &str, config: &str) -> Option<(Topology, XdpRelay)> {
    start_family(mode, tag, config, V4)
}

fn start_family(mode: &str, tag: &str, config: &str, f: Family) -> Option<(Topology, XdpRelay)> {
    if !is_root() {
        eprintln!("skipping the XDP test: it needs root (network namespaces and bpf())");
        return None;
    }
    let prefix = format!("x{}{tag}", std::process::id() % 100_000);
    let topo = match Topology::create(&prefix) {
        Ok(t) => t,
        Err(e) if e.contains("Operation not permitted") => {
            eprintln!("skipping the XDP test: network namespaces refused here ({e})");
            return None;
        }
        Err(e) => panic!("creating the namespaces: {e}"),
    };
    let dir = std::env::temp_dir();
    let log = dir.join(format!("uturn-xdp-{prefix}.log"));
    let cfg = dir.join(format!("uturn-xdp-{prefix}.toml"));
    std::fs::write(&cfg, config).unwrap();
    let child = Topology::command(&topo.relay(), uturn_bin().to_str().unwrap())
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--listen", &sa(f.listen, 3478), "--relay-ip", f.relay])
        .args(["--user", "u:p", "--allow-peer", f.peers, "--rfc5766-channels", "--workers", "2"])
        .args(["--xdp", mode, "--metrics-listen", METRICS])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("uturn");
    let mut relay = XdpRelay { child: Guard(child), log, ns: topo.relay() };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = relay.log();
        if text.contains("worker started") && text.matches("worker started").count() >= 2 {
            assert!(text.contains("XDP fast path attached"), "{text}");
            break;
        }
        if let Some(status) = relay.exited() {
            if text.contains("Operation not permitted") || text.contains("bpf") && text.contains("EPERM") {
                eprintln!("skipping the XDP test: the kernel refused bpf() here:\n{text}");
                return None;
            }
            panic!("uturn exited ({status}) before serving:\n{text}");
        }
        assert!(Instant::now() < deadline, "uturn did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The program is attached to both relay-side interfaces.
    let links = Command::new("ip").args(["-n", &topo.relay(), "link", "show"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    let attached = links.matches("prog/xdp").count();
    assert_eq!(attached, 2, "XDP on both veths of the relay namespace:\n{links}");
    let wanted = if mode == "native" { " xdp " } else { " xdpgeneric " };
    assert!(links.contains(wanted), "attached in {mode} mode:\n{links}");
    Some((topo, relay))
}

/// Of `relayed` datagrams (both directions), all took the XDP path but those sent before the
/// kernel had resolved the next hop's neighbour (`pass_fib`: the socket path sent them, which
/// resolves it), and the program's verdicts agree with what the workers credited.
fn took_the_xdp_path(relay: &XdpRelay, m: &str, relayed: u64) {
    let xdp_to_peer = relay.sum(m, "uturn_xdp_packets_relayed_total", &["to_peer"]);
    let xdp_to_client = relay.sum(m, "uturn_xdp_packets_relayed_total", &["to_client"]);
    let verdict = |v: &str| relay.sum(m, "uturn_xdp_verdicts_total", &[&format!("verdict=\"{v}\"")]);
    println!("through XDP: {xdp_to_peer} to peers, {xdp_to_client} to clients; {} before ARP", verdict("pass_fib"));
    assert_eq!(xdp_to_peer + xdp_to_client + verdict("pass_fib"), relayed, "{m}");
    assert!(verdict("pass_fib") <= 20, "{m}");
    assert_eq!(verdict("to_peer_redirect") + verdict("to_peer_tx"), xdp_to_peer, "{m}");
    assert_eq!(verdict("to_client_redirect") + verdict("to_client_tx"), xdp_to_client, "{m}");
}

/// coturn's `turnutils_peer` echoing on PEER_IP:3480 in the peer namespace.
fn uclient_peer(topo: &Topology) -> Guard {
    let peer = Topology::command(&topo.peer(), "turnutils_peer")
        .args(["-L", PEER_IP, "-p", "3480"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnutils_peer (Debian package coturn)");
    std::thread::sleep(Duration::from_millis(300));
    Guard(peer)
}

fn uclient(mode: &str, tag: &str) {
    let Some((topo, relay)) = start(mode, tag, "") else { return };
    let _peer = uclient_peer(&topo);
    let (messages, clients) = (500u64, 4u64);
    let mut cmd = Topology::command(&topo.client(), "turnutils_uclient");
    cmd.args(["-u", "u", "-w", "p", "-p", "3478", "-n", &messages.to_string(), "-m", &clients.to_string()]).args([
        "-l",
        "120",
        "-e",
        PEER_IP,
        "-r",
        "3480",
        RELAY_CLIENT_SIDE,
    ]);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(90));
    assert!(ok, "turnutils_uclient failed:\n{out}\n--- uturn log ---\n{}", relay.log());
    assert!(out.contains("Total lost packets 0 (0.000000%)"), "loss reported:\n{out}");
    let sent = messages * clients;
    let name = "uturn_packets_relayed_total";
    let m = relay.wait_metrics("every datagram counted as relayed", |m| {
        relay.sum(m, name, &["to_peer"]) == sent && relay.sum(m, name, &["to_client"]) == sent
    });
    println!("{mode}: {sent} datagrams each way");
    took_the_xdp_path(&relay, &m, 2 * sent);
    let verdicts = |v: &str| relay.sum(&m, "uturn_xdp_verdicts_total", &[&format!("verdict=\"{v}\"")]);
    assert!(verdicts("pass_no_route") > 0, "STUN went up to the socket path:\n{m}");
    // The allocations' totals (logged when they end) include what XDP relayed.
    let deadline = Instant::now() + Duration::from_secs(5);
    let logged = loop {
        let log = relay.log();
        let total: u64 = log
            .lines()
            .filter(|l| l.contains("allocation ended"))
            .filter_map(|l| l.split("packets_to_peer=").nth(1)?.split(' ').next()?.parse::<u64>().ok())
            .sum();
        if total >= sent || Instant::now() > deadline {
            break total;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(logged, sent, "per-allocation totals:\n{}", relay.log());
    assert!(!relay.log().contains("ERROR"), "{}", relay.log());
}

fn probe(mode: &str, tag: &str, f: Family) {
    let Some((topo, relay)) = start_family(mode, tag, "permission-lifetime = 3\n", f) else { return };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/turn_probe.py");
    let peer = Topology::command(&topo.peer(), "python3")
        .arg(&script)
        .args(["peer", "--listen", &sa(f.peer, 3490)])
        .stdout(Stdio::null())
        .spawn()
        .expect("python3");
    let _peer = Guard(peer);
    std::thread::sleep(Duration::from_millis(300));
    let mut cmd = Topology::command(&topo.client(), "python3");
    cmd.arg(&script).args(["client", "--server", &sa(f.listen, 3478), "--user", "u"]).args([
        "--password",
        "p",
        "--peer",
        &sa(f.peer, 3490),
        "--count",
        "200",
        "--lapse",
        "3",
    ]);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(ok, "turn_probe.py failed:\n{out}\n--- uturn log ---\n{}", relay.log());
    let step = |name: &str| -> String {
        out.lines()
            .find(|l| l.contains(&format!("\"step\": \"{name}\"")))
            .unwrap_or_else(|| panic!("no {name} step:\n{out}"))
            .to_string()
    };
    assert!(step("binding").contains("\"code\": 0"), "STUN Binding answered by the socket path:\n{out}");
    assert!(step("allocate").contains(&format!("\"relayed\": [\"{}\"", f.relay)), "{out}");
    assert!(step("channel_bind").contains("\"code\": 0"), "{out}");
    assert!(step("bound").contains("\"received\": 200"), "every ChannelData echoed:\n{out}");
    assert!(
        step("lapsed").contains("\"received\": 0, \"burst_received\": 0"),
        "nothing relayed either way once the permission lapsed:\n{out}"
    );
    assert!(step("renewed").contains("\"received\": 200"), "relayed again after CreatePermission:\n{out}");
    assert!(step("deleted").contains("\"received\": 0"), "nothing after the allocation was deleted:\n{out}");
    let drops = |m: &str, reason: &str| relay.sum(m, "uturn_drops_total", &[&format!("reason=\"{reason}\"")]);
    // The socket path saw and counted what the program handed up: 200 lapsed ChannelData and
    // the peer's 20-datagram burst without a permission, 200 after the deletion, 5 on the
    // unbound channel, 5 garbage datagrams.
    let m = relay.wait_metrics("the socket path's drop counts", |m| {
        drops(m, "no_permission") == 220 && drops(m, "no_allocation") == 200
    });
    assert_eq!(drops(&m, "unbound_channel"), 5, "{m}");
    assert_eq!(drops(&m, "not_turn"), 5, "{m}");
    // 200 bound + the BURST request + 200 renewed to the peer, 400 echoes back.
    assert_eq!(relay.sum(&m, "uturn_packets_relayed_total", &["to_peer"]), 401, "{m}");
    assert_eq!(relay.sum(&m, "uturn_packets_relayed_total", &["to_client"]), 400, "{m}");
    took_the_xdp_path(&relay, &m, 801);
    let verdict = |v: &str| relay.sum(&m, "uturn_xdp_verdicts_total", &[&format!("verdict=\"{v}\"")]);
    assert!(verdict("pass_no_route") >= 10 + 200, "unbound, garbage and post-deletion datagrams went up:\n{m}");
    assert!(!relay.log().contains("ERROR"), "{}", relay.log());
}

/// A hot upgrade (SIGUSR2) while uclient relays through XDP: the new process verifies its
/// program, attaches once the old one has detached, and relays through XDP; nothing is lost.
fn hot_upgrade(mode: &str, tag: &str) {
    let Some((topo, relay)) = start(mode, tag, "") else { return };
    let _peer = uclient_peer(&topo);
    let out_path = std::env::temp_dir().join(format!("uturn-xdp-upgrade-{tag}-{}.log", std::process::id()));
    let client = Topology::command(&topo.client(), "turnutils_uclient")
        .args(["-u", "u", "-w", "p", "-p", "3478", "-n", "2000", "-m", "2", "-l", "120"])
        .args(["-e", PEER_IP, "-r", "3480", RELAY_CLIENT_SIDE])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnutils_uclient");
    let mut client = Guard(client);
    // Once traffic flows through XDP, upgrade.
    // uclient allocates for both clients first, then sends (slower on a loaded machine).
    relay.wait_metrics_for("traffic through XDP before the upgrade", Duration::from_secs(30), |m| {
        relay.sum(m, "uturn_xdp_packets_relayed_total", &["to_peer"]) > 100
    });
    let old = relay.child.0.id();
    Command::new("kill").args(["-USR2", &old.to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_pid = loop {
        let log = relay.log();
        if let Some(l) = log.lines().find(|l| l.contains("the new process serves")) {
            break l.split("pid=").nth(1).and_then(|p| p.split(' ').next()).and_then(|p| p.parse::<u32>().ok());
        }
        assert!(!log.contains("hot upgrade failed"), "{log}");
        assert!(Instant::now() < deadline, "no handover:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    .expect("new pid in the log");
    // The new process is not our child: end it by PID whatever happens below.
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg(self.0.to_string()).status();
        }
    }
    let _new = KillOnDrop(new_pid);
    let deadline = Instant::now() + Duration::from_secs(90);
    while client.0.try_wait().ok().flatten().is_none() {
        assert!(Instant::now() < deadline, "uclient did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    assert!(out.contains("Total lost packets 0 (0.000000%)"), "loss across the upgrade:\n{out}\n{}", relay.log());
    // The metrics endpoint now answers from the new process, whose workers relayed through its
    // own XDP program.
    let m = relay.wait_metrics_for("the new process relaying through XDP", Duration::from_secs(10), |m| {
        relay.sum(m, "uturn_xdp_packets_relayed_total", &["to_peer"]) > 100
    });
    let links = Command::new("ip").args(["-n", &topo.relay(), "link", "show"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&links.stdout).matches("prog/xdp").count(), 2, "attached after the upgrade");
    println!("{mode}: after the upgrade, through XDP: {}", relay.sum(&m, "uturn_xdp_packets_relayed_total", &[]));
    assert!(relay.log().contains("handover_ms"), "{}", relay.log());
}

#[test]
fn native_hot_upgrade_keeps_relaying_through_xdp() {
    hot_upgrade("native", "nh");
}

#[test]
fn native_uclient_relays_through_xdp() {
    uclient("native", "nu");
}

#[test]
fn generic_uclient_relays_through_xdp() {
    uclient("generic", "gu");
}

#[test]
fn native_bindings_start_and_stop_at_once() {
    probe("native", "np", V4);
}

#[test]
fn generic_bindings_start_and_stop_at_once() {
    probe("generic", "gp", V4);
}

#[test]
fn native_ipv6_bindings_start_and_stop_at_once() {
    probe("native", "n6", V6);
}

#[test]
fn generic_ipv6_bindings_start_and_stop_at_once() {
    probe("generic", "g6", V6);
}
