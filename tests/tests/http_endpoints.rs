//! The admin and metrics endpoints under attack by unauthenticated clients (issue 21 §2, §3,
//! §4): an endless header, a header trickled byte by byte (slowloris) and hundreds of idle
//! connections, each against `/metrics` and the token-protected admin port, while a TURN
//! client relays through the same process. The relay's threads and RSS (from /proc) must stay
//! bounded, the attacking connections must be closed by the server, and legitimate requests
//! must still be answered. Also: the Host and cross-site checks of an admin endpoint without a
//! token, and the token rule across a hot upgrade (SIGUSR2) that changes `admin-listen`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use uturn_tests::{peer_socket, Client, Relay};

const TOKEN: &str = "s3cret-token";

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// (threads, VmRSS in KiB) of `pid`, from /proc/PID/status.
fn proc_status(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Threads:"), field("VmRSS:"))
}

/// One endpoint under attack.
#[derive(Clone, Copy)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    path: &'static str,
    token: Option<&'static str>,
}

/// One HTTP/1.1 request with `extra` header lines; returns (status, body). Status 0 when the
/// connection failed or closed without an answer.
fn request(method: &str, addr: SocketAddr, path: &str, extra: &[String]) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { return (0, String::new()) };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    for h in extra {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
    if s.write_all(head.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A legitimate request to `t` (Host as a client sends it, and the token where needed).
fn legit(t: Target) -> (u16, String) {
    let mut extra = vec![format!("Host: {}", t.addr)];
    if let Some(tok) = t.token {
        extra.push(format!("Authorization: Bearer {tok}"));
    }
    request("GET", t.addr, t.path, &extra)
}

/// A legitimate request answered 200 within `limit` (retried every 100 ms).
fn legit_ok_within(t: Target, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if legit(t).0 == 200 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A TURN client with an allocation and a channel to an echoing peer.
struct Turn {
    client: Client,
    peer: UdpSocket,
}

impl Turn {
    fn new(relay: &Relay) -> Turn {
        let peer = peer_socket();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut client = Client::new(relay.addr, "demo", "demo", "uturn.local");
        client.allocate();
        assert_eq!(client.channel_bind(0x4001, peer.local_addr().unwrap()).code(), None);
        Turn { client, peer }
    }

    /// Relays `payload` to the peer and back; true when both legs arrived.
    fn relays(&self, payload: &[u8]) -> bool {
        self.client.send_channel_data(0x4001, payload);
        let mut buf = [0u8; 1500];
        let Ok((n, from)) = self.peer.recv_from(&mut buf) else { return false };
        if buf[..n] != *payload {
            return false;
        }
        self.peer.send_to(&buf[..n], from).unwrap();
        self.client.recv().is_some_and(|m| m.len() >= 4 && m[4..] == *payload)
    }
}

/// True once the server has closed `s` (EOF or reset), waiting at most until `deadline`
/// (one short read past it).
fn closed_by_server(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.clamp(Duration::from_millis(1), Duration::from_millis(100)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {} // an error answer (431, 408): read on to the close
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// Starts a relay with `/metrics` and a token-protected admin port on loopback.
fn relay_with_endpoints() -> (Relay, Target, Target) {
    let (m, a) = (free_tcp_port(), free_tcp_port());
    let metrics =
        Target { name: "metrics", addr: format!("127.0.0.1:{m}").parse().unwrap(), path: "/metrics", token: None };
    let admin = Target {
        name: "admin",
        addr: format!("127.0.0.1:{a}").parse().unwrap(),
        path: "/sessions",
        token: Some(TOKEN),
    };
    let relay = Relay::start(
        "epoll",
        "",
        &[
            "--metrics-listen",
            &metrics.addr.to_string(),
            "--admin-listen",
            &admin.addr.to_string(),
            "--admin-token",
            TOKEN,
        ],
    );
    (relay, metrics, admin)
}

/// Peak (threads, RSS KiB) of `pid` sampled while `during` runs on another thread; `during`
/// is bounded by its own deadlines.
fn sample_while<T: Send + 'static>(pid: u32, during: std::thread::JoinHandle<T>) -> ((u64, u64), T) {
    let mut peak = proc_status(pid);
    while !during.is_finished() {
        let (t, r) = proc_status(pid);
        peak = (peak.0.max(t), peak.1.max(r));
        std::thread::sleep(Duration::from_millis(20));
    }
    (peak, during.join().unwrap())
}

/// Connections that each send one endless header line (4 MiB at most each).
const FILL_CONNECTIONS: usize = 8;
const FILL_BYTES: usize = 4 << 20;

#[test]
fn an_endless_header_is_cut_off_with_bounded_memory() {
    let (relay, metrics, admin) = relay_with_endpoints();
    let turn = Turn::new(&relay);
    for t in [metrics, admin] {
        assert_eq!(legit(t).0, 200, "{}", t.name);
        let before = proc_status(relay.pid());
        let attack = std::thread::spawn(move || {
            let conns: Vec<_> = (0..FILL_CONNECTIONS)
                .map(|_| {
                    std::thread::spawn(move || {
                        let mut s = TcpStream::connect(t.addr).unwrap();
                        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                        let head = format!("GET {} HTTP/1.1\r\nHost: {}\r\nX-Fill: ", t.path, t.addr);
                        s.write_all(head.as_bytes()).unwrap();
                        let chunk = vec![b'a'; 64 << 10];
                        let mut sent = 0;
                        while sent < FILL_BYTES {
                            match s.write(&chunk) {
                                Ok(n) => sent += n,
                                Err(_) => break,
                            }
                        }
                        (sent, closed_by_server(&mut s, Instant::now() + Duration::from_secs(10)))
                    })
                })
                .collect();
            conns.into_iter().map(|c| c.join().unwrap()).collect::<Vec<_>>()
        });
        let (peak, results) = sample_while(relay.pid(), attack);
        let sent: usize = results.iter().map(|r| r.0).sum();
        println!(
            "endless header ({}): {FILL_CONNECTIONS} connections sent {} KiB; threads {} -> peak {}, \
             RSS {} KiB -> peak {} KiB (+{} KiB)",
            t.name,
            sent >> 10,
            before.0,
            peak.0,
            before.1,
            peak.1,
            peak.1.saturating_sub(before.1)
        );
        assert!(results.iter().all(|r| r.1), "{}: every attacking connection is closed by the server", t.name);
        assert!(
            peak.1.saturating_sub(before.1) < 8 << 10,
            "{}: RSS grew by {} KiB for {} KiB of header",
            t.name,
            peak.1 - before.1,
            sent >> 10
        );
        assert!(peak.0 <= before.0 + 2, "{}: threads {} -> {}", t.name, before.0, peak.0);
        assert_eq!(legit(t).0, 200, "{}: a legitimate request is still answered", t.name);
        assert!(turn.relays(t.name.as_bytes()), "the relay keeps relaying");
    }
}

/// Slowloris connections per endpoint, each sending one header byte every 100 ms.
const SLOW_CONNECTIONS: usize = 32;
/// How long a slowloris connection trickles at most.
const SLOW_LIMIT: Duration = Duration::from_secs(15);

#[test]
fn a_header_trickled_byte_by_byte_is_timed_out() {
    let (relay, metrics, admin) = relay_with_endpoints();
    let turn = Turn::new(&relay);
    let before = proc_status(relay.pid());
    let started = Instant::now();
    let attack = std::thread::spawn(move || {
        let conns: Vec<_> = (0..SLOW_CONNECTIONS * 2)
            .map(|i| {
                let t = if i % 2 == 0 { metrics } else { admin };
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(t.addr).unwrap();
                    let head = format!("GET {} HTTP/1.1\r\nHost: {}\r\nX-Slow: ", t.path, t.addr);
                    let began = Instant::now();
                    for b in head.bytes().chain(std::iter::repeat(b'a')) {
                        if s.write_all(&[b]).is_err() {
                            return Some(began.elapsed());
                        }
                        if began.elapsed() > SLOW_LIMIT {
                            return None;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    None
                })
            })
            .collect();
        conns.into_iter().map(|c| c.join().unwrap()).collect::<Vec<_>>()
    });
    // While the attack runs: legitimate requests and relayed data.
    std::thread::sleep(Duration::from_millis(500));
    let mut answered = 0;
    for t in [metrics, admin] {
        answered += legit_ok_within(t, Duration::from_secs(2)) as usize;
    }
    let relayed = turn.relays(b"during slowloris");
    let (peak, results) = sample_while(relay.pid(), attack);
    let closed: Vec<Duration> = results.iter().flatten().copied().collect();
    println!(
        "slowloris: {} connections, {} closed by the server (latest after {:?}), {} trickled on for {:?}; \
         threads {} -> peak {}, RSS {} KiB -> peak {} KiB; took {:?}",
        results.len(),
        closed.len(),
        closed.iter().max(),
        results.len() - closed.len(),
        SLOW_LIMIT,
        before.0,
        peak.0,
        before.1,
        peak.1,
        started.elapsed()
    );
    assert_eq!(closed.len(), results.len(), "every slowloris connection is closed by the server");
    assert!(closed.iter().all(|d| *d < Duration::from_secs(10)), "{closed:?}");
    assert!(peak.0 <= before.0 + 4, "threads {} -> {}", before.0, peak.0);
    assert_eq!(answered, 2, "legitimate requests are answered during the attack");
    assert!(relayed && turn.relays(b"after slowloris"), "the relay keeps relaying");
}

/// Idle connections per endpoint.
const IDLE_CONNECTIONS: usize = 300;

#[test]
fn hundreds_of_idle_connections_hold_no_thread_and_are_closed() {
    let (relay, metrics, admin) = relay_with_endpoints();
    let turn = Turn::new(&relay);
    let before = proc_status(relay.pid());
    let mut idle: Vec<TcpStream> = Vec::with_capacity(IDLE_CONNECTIONS * 2);
    for t in [metrics, admin] {
        for _ in 0..IDLE_CONNECTIONS {
            if let Ok(s) = TcpStream::connect_timeout(&t.addr, Duration::from_secs(2)) {
                idle.push(s);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let during = proc_status(relay.pid());
    // Legitimate requests while the idle connections are open (or being closed).
    let answered: Vec<bool> = [metrics, admin].map(|t| legit_ok_within(t, Duration::from_secs(2))).to_vec();
    let relayed = turn.relays(b"during the idle flood");
    let started = Instant::now();
    let open = idle.len();
    let deadline = started + Duration::from_secs(12);
    let still_open = idle.iter_mut().map(|s| !closed_by_server(s, deadline)).filter(|open| *open).count();
    let after = proc_status(relay.pid());
    println!(
        "idle connections: {open} opened; threads {} -> {} (RSS {} -> {} KiB); {} still open {:?} later; \
         threads after {}",
        before.0,
        during.0,
        before.1,
        during.1,
        still_open,
        started.elapsed(),
        after.0
    );
    assert!(during.0 <= before.0 + 4, "threads {} -> {} with {open} idle connections", before.0, during.0);
    assert!(during.1 < before.1 + (8 << 10), "RSS {} -> {} KiB", before.1, during.1);
    assert_eq!(still_open, 0, "the server closes idle connections");
    assert_eq!(answered, vec![true, true], "legitimate requests are answered during the flood");
    assert!(relayed && turn.relays(b"after the idle flood"), "the relay keeps relaying");
}

/// `Host: VALUE` as a header line.
fn host(value: &str) -> String {
    format!("Host: {value}")
}

#[test]
fn an_endpoint_without_a_token_answers_only_loopback_hosts_and_no_cross_site_change() {
    let (a, m) = (free_tcp_port(), free_tcp_port());
    let admin: SocketAddr = format!("127.0.0.1:{a}").parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{m}").parse().unwrap();
    let relay =
        Relay::start("epoll", "", &["--admin-listen", &admin.to_string(), "--metrics-listen", &metrics.to_string()]);
    let turn = Turn::new(&relay);
    // DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends its own
    // name as Host.
    for (addr, path) in [(admin, "/sessions"), (metrics, "/metrics")] {
        let port = addr.port();
        let (status, body) = request("GET", addr, path, &[host(&format!("evil.example:{port}"))]);
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(request("GET", addr, path, &[host(&format!("127.0.0.1:{}", port ^ 1))]).0, 403, "another port");
        assert_eq!(request("GET", addr, path, &[]).0, 403, "no Host");
        for ok in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            assert_eq!(request("GET", addr, path, &[host(&ok)]).0, 200, "{path} with Host {ok}");
        }
    }
    let own = host(&admin.to_string());
    // A web page's plain form POST, with the headers a browser adds, and without them (an older
    // browser): neither drains the relay.
    let form = [
        own.clone(),
        "Origin: http://evil.example".into(),
        "Sec-Fetch-Site: cross-site".into(),
        "Content-Type: application/x-www-form-urlencoded".into(),
    ];
    let (status, body) = request("POST", admin, "/drain", &form);
    assert_eq!(status, 403, "{body}");
    assert_eq!(request("POST", admin, "/drain", &[own.clone(), "Content-Type: text/plain".into()]).0, 403);
    assert_eq!(request("POST", admin, "/drain", &[own.clone(), "Origin: null".into()]).0, 403);
    // A page's fetch() DELETE (its preflight gets no CORS answer; sent anyway, it is refused).
    let fetch = [own.clone(), "Origin: http://evil.example".into(), "Sec-Fetch-Site: cross-site".into()];
    assert_eq!(request("DELETE", admin, "/users/demo/sessions", &fetch).0, 403);
    assert_eq!(request("GET", admin, "/ready", std::slice::from_ref(&own)).0, 200, "not draining");
    let (status, sessions) = request("GET", admin, "/sessions", std::slice::from_ref(&own));
    assert!(status == 200 && sessions.contains("\"user\":\"demo\""), "the session lives on: {sessions}");
    assert!(turn.relays(b"still relaying"));
    // Same-origin and command-line requests still work.
    let same = [own.clone(), format!("Origin: http://{admin}"), "Sec-Fetch-Site: same-origin".into()];
    assert_eq!(request("DELETE", admin, "/sessions/424242", &same).0, 404, "routed (no such session)");
    let (status, body) = request("POST", admin, "/drain", std::slice::from_ref(&own));
    assert_eq!(status, 200, "{body}");
    assert_eq!(request("GET", admin, "/ready", std::slice::from_ref(&own)).0, 503);
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

/// Ends the process `pid` that a hot upgrade started (TERM, then KILL after 3 s).
fn end(pid: u32) {
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid) {
        let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
}

/// The PID of the process a hot upgrade started, from the old process's log.
fn upgraded_pid(log: &str) -> Option<u32> {
    log.lines()
        .find(|l| l.contains("hot upgrade: new process started"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
}

/// A hot upgrade whose configuration moves the admin endpoint to another port and drops the
/// token: the new process serves the new port without a token, and the old port (with its
/// token rule) is gone, never served without a token.
#[test]
fn a_hot_upgrade_that_moves_admin_listen_rebinds_it() {
    let (p, q) = (free_tcp_port(), free_tcp_port());
    let old: SocketAddr = format!("127.0.0.1:{p}").parse().unwrap();
    let new: SocketAddr = format!("127.0.0.1:{q}").parse().unwrap();
    let mut relay = Relay::start("epoll", &format!("admin-listen = \"{old}\"\nadmin-token = \"{TOKEN}\"\n"), &[]);
    assert_eq!(request("GET", old, "/sessions", &[host(&old.to_string())]).0, 401);
    std::fs::write(relay.config_path(), format!("admin-listen = \"{new}\"\n")).unwrap();
    relay.signal("USR2");
    let served = relay.wait_log("the new process serves", Duration::from_secs(20));
    let new_pid = upgraded_pid(&relay.log());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(served, "{}", relay.log());
        assert!(relay.terminate_after(Duration::from_secs(10)).is_some_and(|s| s.success()), "old process exits");
        let (status, body) = request("GET", old, "/sessions", &[host(&old.to_string())]);
        assert_eq!(status, 0, "the old admin port is closed, not served without its token: {status} {body}");
        let (status, body) = request("GET", new, "/sessions", &[host(&new.to_string())]);
        assert_eq!(status, 200, "the new admin address serves: {body}\n{}", relay.log());
    }));
    if let Some(pid) = new_pid {
        end(pid);
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// The review's case: admin on 0.0.0.0 with a token, changed to loopback without one. The new
/// address cannot be bound beside the old listener, so the upgrade is refused and the old
/// process keeps serving, token required.
#[test]
fn a_hot_upgrade_that_would_drop_the_token_is_refused() {
    let p = free_tcp_port();
    let any: SocketAddr = format!("0.0.0.0:{p}").parse().unwrap();
    let lo: SocketAddr = format!("127.0.0.1:{p}").parse().unwrap();
    let relay = Relay::start("epoll", &format!("admin-listen = \"{any}\"\nadmin-token = \"{TOKEN}\"\n"), &[]);
    let turn = Turn::new(&relay);
    assert_eq!(request("GET", lo, "/sessions", &[host(&lo.to_string())]).0, 401);
    std::fs::write(relay.config_path(), format!("admin-listen = \"{lo}\"\n")).unwrap();
    relay.signal("USR2");
    let failed = relay.wait_log("hot upgrade failed", Duration::from_secs(20));
    let new_pid = upgraded_pid(&relay.log());
    let log = relay.log();
    if let Some(pid) = new_pid.filter(|_| log.contains("the new process serves")) {
        end(pid);
    }
    assert!(failed, "{log}");
    assert!(log.contains("admin-listen changed"), "{log}");
    assert!(!log.contains("the new process serves"), "{log}");
    let (status, body) = request("GET", lo, "/sessions", &[host(&lo.to_string())]);
    assert_eq!(status, 401, "the token is still required: {body}");
    let with_token = [host(&lo.to_string()), format!("Authorization: Bearer {TOKEN}")];
    assert_eq!(request("GET", lo, "/sessions", &with_token).0, 200);
    assert!(turn.relays(b"the old process serves on"));
}
