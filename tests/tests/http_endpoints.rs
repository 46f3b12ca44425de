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
    let metrics = Target {
        name: "metrics",
        addr: format!("127.0.0.1:{m}").parse().unwrap(),
        path: "/metrics",
        token: None,
    };
    let admin =
        Target { name: "admin", addr: format!("127.0.0.1:{a}").parse().unwrap(), path: "/sessions", token: Some(TOKEN) };
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
