//! `uturn check` end to end: the real binary probes real relays on loopback (uturn, and
//! Debian's coturn), healthy and deliberately broken, and each failure must come out as its own
//! verdict line, JSON class and exit code (docs/operations.md, Troubleshooting).
//!
//! Failures that need a firewall (UDP dropped while TCP answers; the relay port range blocked
//! inbound) run relay and check inside a private network namespace with an nftables rule
//! dropping exactly that traffic: real packets really dropped, as a firewall does, and nothing
//! outside the namespace touched.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uturn_tests::{free_udp_port, uturn_bin, uturn_cli, Client, Guard, Relay, TlsFiles};

const BACKEND: &str = "epoll";
const ALLOW_LOOPBACK: &[&str] = &["--allow-peer", "127.0.0.1/32"];

/// Runs `prog args` (stdin from `input`), at most 60 s; (exit code, stdout, stderr).
fn run(prog: &Path, args: &[&str], input: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(text) = input {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    wait_output(child, Duration::from_secs(60))
}

fn wait_output(mut child: Child, limit: Duration) -> (i32, String, String) {
    // Read both pipes on threads so a full pipe never blocks the child.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break -1;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (code, t_out.join().unwrap(), t_err.join().unwrap())
}

/// `uturn check ARGS`.
fn check(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let r = run(&uturn_bin(), &all, None);
    println!("$ uturn {}\n{}{}(exit {})", all.join(" "), r.1, r.2, r.0);
    r
}

/// The human line of `step`, asserting its mark.
fn line<'a>(out: &'a str, mark: &str, step: &str) -> &'a str {
    out.lines()
        .find(|l| l.trim_start().starts_with(&format!("{mark} {step} ")))
        .unwrap_or_else(|| panic!("no `{mark} {step}` line in:\n{out}"))
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// A relay for the realm `check.test` with user alice:secret, loopback peers allowed.
fn healthy(extra: &[&str]) -> Relay {
    let mut args = vec!["--realm", "check.test", "--user", "alice:secret"];
    args.extend_from_slice(ALLOW_LOOPBACK);
    args.extend_from_slice(extra);
    Relay::start(BACKEND, "", &args)
}

fn turn(addr: SocketAddr) -> String {
    format!("turn:{addr}?transport=udp")
}

const STEPS: [&str; 10] = [
    "resolve",
    "reach",
    "challenge",
    "authenticate",
    "allocate",
    "permission",
    "send-roundtrip",
    "channel-bind",
    "channel-roundtrip",
    "refresh",
];

#[test]
fn healthy_relay_passes_every_step_over_udp_tcp_and_tls() {
    let tls = TlsFiles::generate();
    let mut args = vec!["--realm", "check.test", "--user", "alice:secret"];
    args.extend_from_slice(ALLOW_LOOPBACK);
    let relay = Relay::start_streams(BACKEND, "", &args, &tls);
    let ca = tls.cert.display().to_string();
    let (udp, tcp, tls_uri) = (
        turn(relay.addr),
        format!("turn:{}?transport=tcp", relay.tcp.unwrap()),
        format!("turns:{}?transport=tcp", relay.tls.unwrap()),
    );
    for uri in [&udp, &tcp, &tls_uri] {
        let (code, out, err) = check(&[uri, "--user", "alice", "--password", "secret", "--count", "5", "--ca", &ca]);
        assert_eq!(code, 0, "{out}{err}");
        for s in STEPS {
            line(&out, "✔", s);
        }
        assert!(!out.contains('✘'), "{out}");
        assert!(line(&out, "✔", "challenge").contains("realm \"check.test\""), "{out}");
        assert!(line(&out, "✔", "send-roundtrip").contains("5/5 out, 5/5 back"), "{out}");
        assert!(line(&out, "✔", "channel-roundtrip").contains("5/5 out, 5/5 back"), "{out}");
        assert!(out.contains("PASS"), "{out}");
    }
    assert!(line(&check(&[&tls_uri, "--user", "alice", "--password", "secret", "--ca", &ca]).1, "✔", "connect")
        .contains("ALPN stun.turn"));

    // --json: the decoded values and the counts.
    let (code, out, _) = check(&[&udp, "--user", "alice", "--password", "secret", "--count", "4", "--json"]);
    assert_eq!(code, 0);
    let v = json(&out);
    assert_eq!(v["exit_code"].as_i64(), Some(0));
    let s = &v["servers"][0];
    assert_eq!(s["passed"].as_bool(), Some(true));
    assert_eq!(s["transport"].as_str(), Some("udp"));
    let steps = &s["steps"];
    let names: Vec<&str> = (0..10).filter_map(|i| steps[i]["step"].as_str()).collect();
    assert_eq!(names, STEPS);
    let alloc = &steps[4]["data"];
    let relayed: SocketAddr = alloc["relayed"].as_str().unwrap().parse().unwrap();
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    assert_eq!(alloc["lifetime_s"].as_i64(), Some(600));
    assert_eq!(alloc["integrity_verified"].as_bool(), Some(true));
    let reach = &steps[1]["data"];
    assert!(reach["reflexive"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(
        reach["reflexive"].as_str(),
        reach["local"].as_str().map(|l| l.replace("0.0.0.0", "127.0.0.1")).as_deref()
    );
    let rt = &steps[8]["data"];
    assert_eq!((rt["sent"].as_i64(), rt["came_back"].as_i64()), (Some(4), Some(4)));
    assert_eq!(rt["peer_saw_relay_at"].as_str(), Some(relayed.to_string().as_str()));
    assert!(rt["rtt_median_ms"].as_f64().unwrap() > 0.0);
    // The check deleted its allocation (Refresh 0): the relay logs it.
    assert!(relay.wait_log("deleted", Duration::from_secs(2)) || relay.log().contains("Refresh"), "{}", relay.log());
}

#[test]
fn stun_uri_runs_only_the_binding_steps() {
    let relay = healthy(&[]);
    let (code, out, _) = check(&[&format!("stun:{}", relay.addr)]);
    assert_eq!(code, 0, "{out}");
    line(&out, "✔", "reach");
    assert!(!out.contains("challenge"), "{out}");
}

#[test]
fn credential_failures_are_told_apart() {
    let dir = std::env::temp_dir().join(format!("uturn-check-store-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite://{}", dir.join("users.db").display());
    let (code, _, err) =
        uturn_cli(&["admin", "--store", &db, "user", "add", "bob", "--realm", "check.test", "--password", "pw"]);
    assert_eq!(code, 0, "{err}");
    let mut args = vec!["--realm", "check.test", "--user-store", &db, "--static-auth-secret", "s3cret"];
    args.extend_from_slice(ALLOW_LOOPBACK);
    let relay = Relay::start(BACKEND, "", &args);
    let uri = turn(relay.addr);

    // The store's user passes; so does a REST credential minted from the shared secret.
    assert_eq!(check(&[&uri, "--user", "bob", "--password", "pw", "--count", "2"]).0, 0);
    let (code, out, _) = check(&[&uri, "--secret", "s3cret", "--user", "carol", "--count", "2"]);
    assert_eq!(code, 0, "{out}");

    // Wrong password: without --store the relay's answer cannot tell it from an unknown user.
    let (code, out, _) = check(&[&uri, "--user", "bob", "--password", "nope"]);
    assert_eq!(code, 20, "{out}");
    assert!(line(&out, "✘", "authenticate").contains("wrong password, or unknown user"), "{out}");
    // With --store it can.
    let (code, out, _) = check(&[&uri, "--user", "bob", "--password", "nope", "--store", &db]);
    assert_eq!(code, 20, "{out}");
    assert!(line(&out, "✘", "authenticate").contains("wrong password: user \"bob\" exists"), "{out}");
    let (code, out, _) = check(&[&uri, "--user", "mallory", "--password", "pw", "--store", &db, "--json"]);
    assert_eq!(code, 21, "{out}");
    let v = json(&out);
    assert_eq!(v["servers"][0]["diagnosis"]["class"].as_str(), Some("unknown-user"));
    assert!(v["servers"][0]["diagnosis"]["message"].as_str().unwrap().contains("no user \"mallory\""));

    // Realm mismatch: credentials made for another realm.
    let (code, out, _) = check(&[&uri, "--user", "bob", "--password", "pw", "--realm", "other.test"]);
    assert_eq!(code, 22, "{out}");
    let l = line(&out, "✘", "challenge");
    assert!(l.contains("realm mismatch") && l.contains("\"check.test\"") && l.contains("\"other.test\""), "{out}");

    // An expired REST credential (minted valid for 1 s, used 2 s later).
    let (code, minted, err) = uturn_cli(&["credential", "--secret", "s3cret", "--ttl", "1s", "--user", "dave"]);
    assert_eq!(code, 0, "{err}");
    let field = |k: &str| minted.lines().find_map(|l| l.strip_prefix(k)).unwrap().trim().to_owned();
    let (user, pass) = (field("username:"), field("password:"));
    std::thread::sleep(Duration::from_millis(2100));
    let (code, out, _) = check(&[&uri, "--user", &user, "--password", &pass]);
    assert_eq!(code, 23, "{out}");
    assert!(line(&out, "✘", "authenticate").contains("REST credential") && out.contains("expired"), "{out}");
    // A REST credential minted with another secret is a wrong password.
    assert_eq!(check(&[&uri, "--secret", "other", "--user", "erin"]).0, 20);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A UDP "load balancer" spreading datagrams round robin over two relays (one upstream socket
/// per relay, so each relay sees one steady 5-tuple); ended on drop.
struct RoundRobin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl RoundRobin {
    fn start(backends: [SocketAddr; 2]) -> RoundRobin {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        front.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let ups: Vec<Arc<UdpSocket>> = backends
            .iter()
            .map(|b| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.connect(b).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                Arc::new(s)
            })
            .collect();
        let mut threads = Vec::new();
        {
            let (front, stop, client, ups) = (front.clone(), stop.clone(), client.clone(), ups.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = front.recv_from(&mut buf) {
                        *client.lock().unwrap() = Some(from);
                        let _ = ups[n % 2].send(&buf[..len]);
                        n += 1;
                    }
                }
            }));
        }
        for up in ups {
            let (front, stop, client) = (front.clone(), stop.clone(), client.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(len) = up.recv(&mut buf) {
                        if let Some(c) = *client.lock().unwrap() {
                            let _ = front.send_to(&buf[..len], c);
                        }
                    }
                }
            }));
        }
        RoundRobin { addr: front.local_addr().unwrap(), stop, threads }
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn stale_nonce_loop_behind_a_balancer_of_nodes_that_share_no_nonce_secret() {
    // Two independent relays behind one address: each refuses the other's nonce, so every
    // signed request hears 438 with a nonce the next node refuses in turn.
    let (a, b) = (healthy(&[]), healthy(&[]));
    let lb = RoundRobin::start([a.addr, b.addr]);
    let (code, out, _) = check(&[&turn(lb.addr), "--user", "alice", "--password", "secret"]);
    assert_eq!(code, 24, "{out}");
    assert!(line(&out, "✘", "authenticate").contains("stale-nonce loop"), "{out}");
    // Each relay alone passes.
    assert_eq!(check(&[&turn(a.addr), "--user", "alice", "--password", "secret", "--count", "2"]).0, 0);
}

#[test]
fn peer_denied_by_policy_is_403() {
    // A policy that denies the peer's address (127.0.0.1, where the check's peer is).
    let relay =
        Relay::start(BACKEND, "", &["--realm", "check.test", "--user", "alice:secret", "--deny-peer", "127.0.0.0/8"]);
    let (code, out, _) = check(&[&turn(relay.addr), "--user", "alice", "--password", "secret", "--json"]);
    assert_eq!(code, 32, "{out}");
    let v = json(&out);
    let s = &v["servers"][0];
    assert_eq!(s["diagnosis"]["class"].as_str(), Some("peer-denied"));
    let steps = &s["steps"];
    assert_eq!(steps[5]["step"].as_str(), Some("permission"));
    assert_eq!(steps[5]["ok"].as_bool(), Some(false));
    assert!(steps[5]["detail"].as_str().unwrap().starts_with("403"), "{out}");
    assert_eq!(steps[4]["ok"].as_bool(), Some(true), "the allocation itself succeeded");
}

#[test]
fn out_of_capacity_is_508() {
    // A relay range of one port, held by another client's allocation.
    let port = free_udp_port();
    let config = format!("port-range = \"{port}-{port}\"\n");
    let mut args = vec!["--realm", "check.test", "--user", "alice:secret"];
    args.extend_from_slice(ALLOW_LOOPBACK);
    let relay = Relay::start(BACKEND, &config, &args);
    let mut holder = Client::new(relay.addr, "alice", "secret", "check.test");
    assert_eq!(holder.allocate().port(), port);
    let (code, out, _) = check(&[&turn(relay.addr), "--user", "alice", "--password", "secret"]);
    assert_eq!(code, 30, "{out}");
    line(&out, "✔", "authenticate");
    assert!(line(&out, "✘", "allocate").contains("508"), "{out}");
    assert!(out.contains("out of capacity"), "{out}");
    // Once the holder lets go, the same relay passes.
    assert_eq!(holder.refresh(0).code(), None);
    assert_eq!(check(&[&turn(relay.addr), "--user", "alice", "--password", "secret", "--count", "2"]).0, 0);
}

#[test]
fn alternate_server_is_followed_once_and_said() {
    let alternate = healthy(&[]);
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let alt = alternate.addr.to_string();
    let draining =
        healthy(&["--admin-listen", &admin.to_string(), "--alternate-server", &alt, "--drain-timeout", "60"]);
    // An allocation keeps the draining relay up.
    let mut holder = Client::new(draining.addr, "alice", "secret", "check.test");
    holder.allocate();
    let (code, _, err) = uturn_cli(&["admin", "--admin-url", &format!("http://{admin}"), "drain"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = check(&[&turn(draining.addr), "--user", "alice", "--password", "secret", "--count", "2"]);
    assert_eq!(code, 31, "{out}");
    let l = line(&out, "✘", "allocate");
    assert!(l.contains("300 Try Alternate") && l.contains(&alt), "{out}");
    assert!(line(&out, "✔", "alternate").contains(&format!("following ALTERNATE-SERVER {alt} once")), "{out}");
    // The alternate's steps follow, and pass.
    let after: String = out.split("once: the steps below").nth(1).unwrap().to_owned();
    for s in ["reach", "challenge", "authenticate", "allocate", "send-roundtrip", "channel-roundtrip", "refresh"] {
        line(&after, "✔", s);
    }
    assert!(out.contains("the alternate passed every step"), "{out}");
    let (code, out, _) =
        check(&[&turn(draining.addr), "--user", "alice", "--password", "secret", "--count", "2", "--json"]);
    assert_eq!(code, 31);
    let v = json(&out);
    let s = &v["servers"][0];
    assert_eq!(s["redirected_to"].as_str(), Some(alt.as_str()));
    assert_eq!(s["diagnosis"]["class"].as_str(), Some("redirected"));
}

#[test]
fn tls_certificate_that_does_not_match_the_name() {
    let tls = TlsFiles::generate();
    // Replace the certificate with one for another name only.
    let st = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=wrong.example", "-addext", "subjectAltName=DNS:wrong.example"])
        .arg("-keyout")
        .arg(&tls.key)
        .arg("-out")
        .arg(&tls.cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let mut args = vec!["--realm", "check.test", "--user", "alice:secret"];
    args.extend_from_slice(ALLOW_LOOPBACK);
    let relay = Relay::start_streams(BACKEND, "", &args, &tls);
    let ca = tls.cert.display().to_string();
    let uri = format!("turns:{}?transport=tcp", relay.tls.unwrap());
    let (code, out, _) = check(&[&uri, "--user", "alice", "--password", "secret", "--ca", &ca]);
    assert_eq!(code, 13, "{out}");
    let l = line(&out, "✘", "connect");
    assert!(l.contains("does not match the name \"127.0.0.1\""), "{out}");
    // Not trusted at all (no --ca): also a TLS failure, worded differently.
    let (code, out, _) = check(&[&uri, "--user", "alice", "--password", "secret"]);
    assert_eq!(code, 13, "{out}");
    assert!(!line(&out, "✘", "connect").contains("does not match the name"), "{out}");
}

#[test]
fn external_ip_that_does_not_match_the_relayed_address() {
    // The relay binds its relayed sockets on 127.0.0.1 but advertises 127.0.0.9: peers that
    // answer to the advertised address reach nothing (no socket there).
    let relay = healthy(&["--relay-ip", "127.0.0.1", "--external-ip", "127.0.0.9/127.0.0.1"]);
    let (code, out, _) = check(&[&turn(relay.addr), "--user", "alice", "--password", "secret", "--count", "3"]);
    assert_eq!(code, 40, "{out}");
    assert!(line(&out, "✔", "allocate").contains("relayed 127.0.0.9:"), "{out}");
    let l = line(&out, "✘", "send-roundtrip");
    assert!(l.contains("external-ip mismatch") && l.contains("come from 127.0.0.1:"), "{out}");
}

/// A private network namespace with loopback up; deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("uck{tag}{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
        ok(&["netns", "add", &name]);
        ok(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    fn cmd(&self, prog: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(prog);
        c
    }

    /// Drops UDP datagrams to `ports` arriving in the namespace (an nftables input rule).
    fn drop_udp(&self, ports: &str) {
        let rules = format!("table inet ucheck {{\n chain input {{\n  type filter hook input priority 0;\n  udp dport {ports} drop\n }}\n}}\n");
        let mut c = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success(), "nft (Debian package nftables) must be installed");
    }

    /// uturn on 127.0.0.1:3478 (UDP and TCP), relay ports 61000-61099, inside; ready when
    /// `uturn check stun:` passes inside.
    fn relay(&self) -> Guard {
        let child = self
            .cmd(&uturn_bin())
            .args(["--listen", "127.0.0.1:3478", "--listen", "tcp://127.0.0.1:3478", "--port-range", "61000-61099"])
            .args(["--workers", "1", "--io-backend", BACKEND, "--realm", "check.test", "--user", "alice:secret"])
            .args(ALLOW_LOOPBACK)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let guard = Guard(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.check(&["stun:127.0.0.1:3478", "--timeout", "0.3"]).0 == 0 {
                return guard;
            }
        }
        panic!("uturn did not come up in namespace {}", self.0);
    }

    fn check(&self, args: &[&str]) -> (i32, String, String) {
        let child = self
            .cmd(&uturn_bin())
            .arg("check")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let r = wait_output(child, Duration::from_secs(60));
        println!("$ (netns {}) uturn check {}\n{}{}(exit {})", self.0, args.join(" "), r.1, r.2, r.0);
        r
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn udp_dropped_by_a_firewall_while_tcp_answers() {
    let ns = Netns::new("u");
    let _relay = ns.relay();
    ns.drop_udp("3478");
    let (code, out, _) =
        ns.check(&["turn:127.0.0.1:3478", "--user", "alice", "--password", "secret", "--timeout", "1"]);
    assert_eq!(code, 12, "{out}");
    let l = line(&out, "✘", "reach");
    assert!(l.contains("no answer over UDP") && l.contains("TCP 127.0.0.1:3478 answers"), "{out}");
    // The same relay over TCP passes.
    let (code, out, _) =
        ns.check(&["turn:127.0.0.1:3478?transport=tcp", "--user", "alice", "--password", "secret", "--count", "2"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn relay_port_range_blocked_inbound() {
    let ns = Netns::new("i");
    let _relay = ns.relay();
    // Datagrams to the relayed transport addresses are dropped: what peers send never arrives,
    // while the relay's own datagrams to the peer (to the peer's port) go out.
    ns.drop_udp("61000-61099");
    let (code, out, _) = ns.check(&["turn:127.0.0.1:3478", "--user", "alice", "--password", "secret", "--count", "3"]);
    assert_eq!(code, 41, "{out}");
    let l = line(&out, "✘", "send-roundtrip");
    assert!(l.contains("data goes out but never comes back") && l.contains("3 of 3 reached the peer"), "{out}");
}

#[test]
fn udp_server_that_answers_nothing() {
    // A bound socket that never answers (and no TCP listener): plain unreachable.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let uri = turn(silent.local_addr().unwrap());
    let (code, out, _) = check(&[&uri, "--user", "a", "--password", "b", "--timeout", "0.5"]);
    assert_eq!(code, 11, "{out}");
    assert!(line(&out, "✘", "reach").contains("no answer"), "{out}");
}

#[test]
fn ice_servers_json_checks_every_server_with_its_credentials() {
    let good = healthy(&[]);
    let denied =
        Relay::start(BACKEND, "", &["--realm", "check.test", "--user", "alice:secret", "--deny-peer", "127.0.0.0/8"]);
    let ice = format!(
        r#"{{"iceServers":[{{"urls":"stun:{g}"}},{{"urls":["turn:{g}?transport=udp"],"username":"alice","credential":"secret"}},{{"urls":"turn:{d}","username":"alice","credential":"secret"}}]}}"#,
        g = good.addr,
        d = denied.addr
    );
    let r = run(&uturn_bin(), &["check", "--ice-servers", "-", "--count", "2", "--json"], Some(&ice));
    println!("{}{}", r.1, r.2);
    assert_eq!(r.0, 32, "the first failing server's code");
    let v = json(&r.1);
    let passed: Vec<Option<bool>> = (0..3).map(|i| v["servers"][i]["passed"].as_bool()).collect();
    assert_eq!(passed, [Some(true), Some(true), Some(false)]);
    // The same from a file, human output: three headers.
    let path = std::env::temp_dir().join(format!("uturn-check-ice-{}.json", std::process::id()));
    std::fs::write(&path, &ice).unwrap();
    let (code, out, _) = check(&["--ice-servers", path.to_str().unwrap(), "--count", "2"]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, 32);
    assert_eq!(out.matches("PASS").count(), 2, "{out}");
    assert_eq!(out.matches("FAIL (peer-denied, exit 32)").count(), 1, "{out}");
}

#[test]
fn usage_errors_and_the_documented_exit_codes() {
    let (code, out, _) = check(&["--help"]);
    assert_eq!(code, 0);
    for c in ["  12  no answer over UDP", "  24  stale-nonce loop", "  41  data goes out but never comes back"] {
        assert!(out.contains(c), "{out}");
    }
    assert_eq!(check(&["turn:host?transport=sctp"]).0, 2);
    assert_eq!(check(&[]).0, 2);
    assert_eq!(check(&["--ice-servers", "/nonexistent/ice.json"]).0, 2);
    let (code, _, err) = check(&["turn:no-such-host.invalid:3478", "--user", "a", "--password", "b"]);
    assert_eq!(code, 10, "{err}");
    // A turn: URI without credentials stops after the challenge.
    let relay = healthy(&[]);
    let (code, out, _) = check(&[&turn(relay.addr)]);
    assert_eq!(code, 2, "{out}");
    line(&out, "✔", "challenge");
    assert!(line(&out, "✘", "authenticate").contains("no credentials"), "{out}");
}

/// Debian's coturn (`turnserver`) on loopback with a test config; killed by PID on drop.
fn coturn() -> (Guard, SocketAddr, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("uturn-check-coturn-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_udp_port();
    let lo = 50000 + rand::random::<u16>() % 10000;
    let conf = format!(
        "listening-ip=127.0.0.1\nlistening-port={port}\nrelay-ip=127.0.0.1\nmin-port={lo}\nmax-port={}\n\
         realm=coturn.test\nuser=alice:secret\nlt-cred-mech\nfingerprint\nno-tls\nno-dtls\nno-cli\n\
         allow-loopback-peers\nuserdb={}\npidfile={}\nlog-file=stdout\nsimple-log\n",
        lo + 99,
        dir.join("turndb").display(),
        dir.join("pid").display()
    );
    std::fs::write(dir.join("turnserver.conf"), conf).unwrap();
    let child = Command::new("turnserver")
        .arg("-c")
        .arg(dir.join("turnserver.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnserver (Debian package coturn) must be installed: scripts/test.sh installs it");
    let guard = Guard(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check(&[&format!("stun:{addr}"), "--timeout", "0.3"]).0 == 0 {
            return (guard, addr, dir);
        }
    }
    panic!("coturn did not come up on {addr}");
}

#[test]
fn coturn_healthy_and_wrong_password() {
    let (_coturn, addr, dir) = coturn();
    for uri in [turn(addr), format!("turn:{addr}?transport=tcp")] {
        let (code, out, _) = check(&[&uri, "--user", "alice", "--password", "secret", "--count", "3"]);
        assert_eq!(code, 0, "{out}");
        for s in STEPS {
            line(&out, "✔", s);
        }
        assert!(line(&out, "✔", "reach").contains("Coturn"), "{out}");
    }
    let (code, out, _) = check(&[&turn(addr), "--user", "alice", "--password", "wrong"]);
    assert_eq!(code, 20, "{out}");
    assert!(line(&out, "✔", "challenge").contains("\"coturn.test\""), "{out}");
    line(&out, "✘", "authenticate");
    let _ = std::fs::remove_dir_all(dir);
}
