//! Operating uturn against the started binary: the Prometheus endpoint, the admin API, drain,
//! and the hot upgrade (SIGUSR2) with traffic flowing and every packet counted.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use uturn_tests::uturn_proto::wire::{attr, Message};
use uturn_tests::{free_udp_port, peer_socket, uturn_bin, uturn_cli, Client, Relay, BACKENDS};

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 request; returns (status, body).
fn http(method: &str, addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The value of the metric line `name{labels}` (exact match of everything before the value).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

/// Sum of every series of `name` whose labels contain `filter`.
fn metric_sum(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

fn echo_once(c: &Client, peer: &UdpSocket, channel: u16, payload: &[u8]) -> Vec<u8> {
    c.send_channel_data(channel, payload);
    let mut buf = [0u8; 1500];
    let (n, from) = peer.recv_from(&mut buf).expect("peer receives the relayed data");
    peer.send_to(&buf[..n], from).unwrap();
    c.recv().expect("the echo comes back on the channel")
}

#[test]
fn metrics_admin_api_and_drain() {
    for backend in BACKENDS {
        let (metrics, admin) = (free_tcp_port(), free_tcp_port());
        let m_addr: SocketAddr = format!("127.0.0.1:{metrics}").parse().unwrap();
        let a_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
        let mut relay = Relay::start(
            backend,
            "",
            &[
                "--metrics-listen",
                &m_addr.to_string(),
                "--admin-listen",
                &a_addr.to_string(),
                "--alternate-server",
                "127.0.0.1:3479",
                "--drain-timeout",
                "30",
            ],
        );
        let peer = peer_socket();
        let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
        c.allocate();
        assert_eq!(c.channel_bind(0x4001, peer.local_addr().unwrap()).code(), None);
        for i in 0..10u8 {
            assert_eq!(echo_once(&c, &peer, 0x4001, &[i; 100])[4..], [i; 100]);
        }
        // Workers publish every 250 ms (and at least once a second when idle).
        std::thread::sleep(Duration::from_millis(1200));
        let (status, text) = http("GET", m_addr, "/metrics");
        assert_eq!(status, 200);
        assert_eq!(metric_sum(&text, "uturn_allocations", ""), 1.0, "{text}");
        assert_eq!(metric_sum(&text, "uturn_channels", ""), 1.0);
        assert_eq!(metric_sum(&text, "uturn_packets_relayed_total", "direction=\"to_peer\""), 10.0);
        assert_eq!(metric_sum(&text, "uturn_packets_relayed_total", "direction=\"to_client\""), 10.0);
        assert_eq!(metric_sum(&text, "uturn_bytes_relayed_total", "direction=\"to_client\""), 1000.0);
        assert!(metric(&text, "uturn_auth_total{outcome=\"ok\"}").unwrap() >= 2.0, "Allocate and ChannelBind");
        assert_eq!(metric(&text, &format!("uturn_io_backend{{backend=\"{backend}\"}}")), Some(1.0));
        assert_eq!(metric(&text, "uturn_allocate_latency_seconds_count"), Some(1.0));
        assert!(metric(&text, "uturn_receive_queue_drops_total{socket=\"listener\"}").is_some());
        println!("--- metrics sample ({backend}) ---\n{text}");

        let (status, body) = http("GET", a_addr, "/sessions");
        assert_eq!(status, 200, "{body}");
        let id: u64 =
            body.split("\"id\":").nth(1).and_then(|r| r.split(',').next()).and_then(|v| v.parse().ok()).expect(&body);
        assert!(body.contains("\"user\":\"demo\"") && body.contains("\"packets\":10"), "{body}");
        let (status, one) = http("GET", a_addr, &format!("/sessions/{id}"));
        assert_eq!(status, 200);
        assert!(one.starts_with('{') && one.contains(&format!("\"id\":{id}")), "{one}");
        assert_eq!(http("GET", a_addr, "/sessions/999999").0, 404);
        assert_eq!(http("GET", a_addr, "/sessions/x").0, 400);
        assert_eq!(http("GET", a_addr, "/ready").0, 200);
        assert!(relay.log().contains(&format!("session={id}")), "log lines carry the session id");
        let url = format!("http://{a_addr}");
        let (code, out, err) = uturn_cli(&["admin", "--admin-url", &url, "sessions", &id.to_string()]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("\"user\":\"demo\""), "{out}");
        let (code, _, err) = uturn_cli(&["admin", "--admin-url", &url, "revoke", "--session", "424242"]);
        assert_eq!(code, 1, "an unknown session is an HTTP 404: {err}");

        // Drain: 300 with ALTERNATE-SERVER for new Allocates, the old allocation relays on.
        let (code, body, err) = uturn_cli(&["admin", "--admin-url", &url, "drain"]);
        assert_eq!((code, body.contains("\"allocations\":1")), (0, true), "{body}{err}");
        assert_eq!(http("GET", a_addr, "/ready").0, 503);
        let mut late = Client::new(relay.addr, "demo", "demo", "uturn.local");
        let err = late.try_allocate().unwrap_err();
        assert!(err.contains("300"), "{err}");
        late.learn_nonce();
        let r = late.authenticated(uturn_tests::uturn_proto::wire::Method::ALLOCATE, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop)
        });
        let m: Message<'_> = r.msg();
        assert_eq!(m.get(attr::ALTERNATE_SERVER), Some(&[0, 1, 0x0d, 0x97, 127, 0, 0, 1][..]));
        assert_eq!(echo_once(&c, &peer, 0x4001, b"still")[4..], *b"still");
        // Revoking the last session ends the drain: the process exits 0.
        assert_eq!(http("DELETE", a_addr, &format!("/sessions/{id}")).0, 200);
        let st = relay.terminate_after(Duration::from_secs(5)).expect("a drained relay exits");
        assert!(st.success(), "{st:?}\n{}", relay.log());
        let log = relay.log();
        assert!(log.contains("reason=\"revoked\"") || log.contains("reason=revoked"), "{log}");
        assert!(log.contains("drained"), "{log}");
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut relay = Relay::start("epoll", "", &["--log-format", "json"]);
    let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
    c.allocate();
    assert!(relay.wait_log("allocation granted", Duration::from_secs(2)));
    relay.terminate(Duration::from_secs(2));
    let log = relay.log();
    let granted = log.lines().find(|l| l.contains("allocation granted")).expect(&log);
    assert!(granted.starts_with('{') && granted.ends_with('}'), "{granted}");
    assert!(granted.contains("\"session\":1") && granted.contains("\"user\":\"demo\""), "{granted}");
    for l in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(l.starts_with('{'), "every line is JSON: {l}");
    }
}

/// The PID whose open sockets include the UDP socket bound to `port` (from /proc).
fn udp_port_owners(port: u16) -> HashSet<u32> {
    socket_owners(&["/proc/net/udp", "/proc/net/udp6"], port, None)
}

/// The PIDs holding a socket of `tables` bound to `port`, in kernel state `state` if given
/// (`0A`: LISTEN), from /proc.
fn socket_owners(tables: &[&str], port: u16, state: Option<&str>) -> HashSet<u32> {
    let mut inodes = HashSet::new();
    for table in tables {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let p = f.get(1).and_then(|l| l.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            if p == Some(port) && state.is_none_or(|st| f.get(3) == Some(&st)) {
                inodes.insert(format!("socket:[{}]", f[9]));
            }
        }
    }
    let mut pids = HashSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(t) = std::fs::read_link(fd.path()) {
                if inodes.contains(&*t.to_string_lossy()) {
                    pids.insert(pid);
                }
            }
        }
    }
    pids
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split_whitespace().nth(2).is_some_and(|st| st == "Z"))
        .unwrap_or(false)
}

const CLIENTS: usize = 64;
/// Peer sockets the clients' channels are bound to.
const PEERS: usize = 8;
/// Packets per second over all clients.
const RATE: u64 = 10_000;

fn hot_upgrade(backend: &str) {
    // Started from a copy, which is replaced (a new inode at the same path) before SIGUSR2: the
    // upgrade must start whatever binary the path holds then.
    let dir = std::env::temp_dir().join(format!("uturn-upgrade-{}-{backend}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("uturn");
    std::fs::copy(uturn_bin(), &bin).unwrap();
    let port = free_udp_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let lo = 49152 + (rand::random::<u16>() % 15000);
    let log_path = dir.join("uturn.log");
    let mut old = Command::new(&bin)
        .args(["--listen", &addr.to_string(), "--workers", "2", "--io-backend", backend])
        .args(["--port-range", &format!("{lo}-{}", lo + 399)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut new_pid: Option<u32> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log().contains("worker started") || udp_port_owners(port).is_empty() {
            assert!(Instant::now() < deadline, "uturn did not start:\n{}", log());
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        // Eight peers (client i sends to peer i % 8), each echoing every datagram back to the
        // relayed address it came from and counting the sequence numbers per client. Eight
        // receive buffers absorb the burst the new process relays from the queued sockets.
        let peers: Vec<UdpSocket> = (0..PEERS).map(|_| peer_socket()).collect();
        let mut clients = Vec::with_capacity(CLIENTS);
        for i in 0..CLIENTS {
            let mut c = Client::new(addr, "demo", "demo", "uturn.local");
            c.try_allocate().unwrap_or_else(|e| panic!("{e}\n{}", log()));
            assert_eq!(c.channel_bind(0x4001, peers[i % PEERS].local_addr().unwrap()).code(), None);
            c.sock.set_nonblocking(true).unwrap();
            clients.push(c);
        }
        // An "upgraded" binary at the path the relay was started from (a new inode).
        let staged = dir.join("uturn.new");
        std::fs::copy(uturn_bin(), &staged).unwrap();
        std::fs::rename(&staged, &bin).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let echoes: Vec<_> = peers
            .into_iter()
            .map(|peer| {
                let s2 = stop.clone();
                std::thread::spawn(move || {
                    peer.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                    let mut seen: Vec<HashSet<u32>> = vec![HashSet::new(); CLIENTS];
                    let mut buf = [0u8; 1500];
                    while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok((n, from)) = peer.recv_from(&mut buf) {
                            if n >= 8 {
                                let client = u32::from_be_bytes(buf[0..4].try_into().unwrap()) as usize;
                                let seq = u32::from_be_bytes(buf[4..8].try_into().unwrap());
                                seen[client % CLIENTS].insert(seq);
                            }
                            let _ = peer.send_to(&buf[..n], from);
                        }
                    }
                    seen
                })
            })
            .collect();
        let mut echoed: Vec<HashSet<u32>> = vec![HashSet::new(); CLIENTS];
        let drain = |clients: &[Client], echoed: &mut Vec<HashSet<u32>>| {
            let mut buf = [0u8; 1500];
            for (i, c) in clients.iter().enumerate() {
                while let Ok(n) = c.sock.recv(&mut buf) {
                    if n >= 12 {
                        echoed[i].insert(u32::from_be_bytes(buf[8..12].try_into().unwrap()));
                    }
                }
            }
        };
        // Traffic at RATE packets/s, the upgrade signalled at 1 s. It runs for at least 3 s and
        // until 1 s after the new process serves (on a loaded machine the new process can take
        // seconds to become ready), 25 s at most.
        let started = Instant::now();
        let mut served_at: Option<Instant> = None;
        let mut last_log_check = Instant::now();
        let mut sent = 0u64;
        let mut signalled = false;
        let mut payload = [0u8; 64];
        loop {
            let elapsed = started.elapsed();
            if signalled && served_at.is_none() && last_log_check.elapsed() >= Duration::from_millis(100) {
                last_log_check = Instant::now();
                let text = log();
                assert!(!text.contains("hot upgrade failed"), "{text}");
                if text.contains("the new process serves") {
                    served_at = Some(Instant::now());
                }
            }
            let upgraded = served_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(1));
            if elapsed >= Duration::from_secs(3) && upgraded {
                break;
            }
            assert!(elapsed < Duration::from_secs(25), "the upgrade did not finish within 25 s:\n{}", log());
            let due = (elapsed.as_secs_f64() * RATE as f64) as u64;
            while sent < due {
                let client = (sent % CLIENTS as u64) as usize;
                let seq = (sent / CLIENTS as u64) as u32;
                payload[0..4].copy_from_slice(&(client as u32).to_be_bytes());
                payload[4..8].copy_from_slice(&seq.to_be_bytes());
                clients[client].send_channel_data(0x4001, &payload);
                sent += 1;
            }
            if !signalled && started.elapsed() >= Duration::from_secs(1) {
                let st = Command::new("kill").args(["-USR2", &old.id().to_string()]).status().unwrap();
                assert!(st.success());
                signalled = true;
            }
            drain(&clients, &mut echoed);
            std::thread::sleep(Duration::from_micros(500));
        }
        let total = sent;
        let settle = Instant::now();
        while settle.elapsed() < Duration::from_secs(2) {
            drain(&clients, &mut echoed);
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut seen: Vec<HashSet<u32>> = vec![HashSet::new(); CLIENTS];
        for e in echoes {
            for (i, s) in e.join().unwrap().into_iter().enumerate() {
                seen[i].extend(s);
            }
        }
        let sent_to = |i: usize| ((total + (CLIENTS - 1 - i) as u64) / CLIENTS as u64) as usize;
        let to_peer: usize = seen.iter().map(HashSet::len).sum();
        let to_client: usize = echoed.iter().map(HashSet::len).sum();
        println!("hot upgrade ({backend}): sent {total}, peer got {to_peer}, clients got {to_client} back");
        let text = log();
        let line = text.lines().find(|l| l.contains("the new process serves")).unwrap_or_else(|| panic!("{text}"));
        println!("{line}");
        new_pid = line.split("pid=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|p| p.parse().ok());
        for (i, s) in seen.iter().enumerate() {
            assert_eq!(s.len(), sent_to(i), "client {i} to peer: lost {}\n{text}", sent_to(i) - s.len());
        }
        for (i, s) in echoed.iter().enumerate() {
            assert_eq!(s.len(), sent_to(i), "peer to client {i}: lost {}\n{text}", sent_to(i) - s.len());
        }
        let new_pid = new_pid.expect("the log names the new PID");
        let st = old.wait().unwrap();
        assert!(st.success(), "the old process exits cleanly: {st:?}");
        assert_eq!(udp_port_owners(port), HashSet::from([new_pid]), "the listen port belongs to the new PID");
        // A new allocation works and relays on the new process.
        let mut fresh = Client::new(addr, "demo", "demo", "uturn.local");
        fresh.try_allocate().unwrap_or_else(|e| panic!("{e}\n{}", log()));
        let peer2 = peer_socket();
        assert_eq!(fresh.channel_bind(0x4002, peer2.local_addr().unwrap()).code(), None);
        assert_eq!(echo_once(&fresh, &peer2, 0x4002, b"after")[4..], *b"after");
        assert!(!text.contains("ERROR"), "{text}");
    }));
    if new_pid.is_none() {
        new_pid = log()
            .lines()
            .find(|l| l.contains("hot upgrade: new process started"))
            .and_then(|l| l.split("pid=").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok());
    }
    // End what this test started, by PID: the old process and the one the upgrade started.
    let _ = old.kill();
    let _ = old.wait();
    if let Some(pid) = new_pid {
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn hot_upgrade_loses_no_packet_uring() {
    hot_upgrade("uring");
}

#[test]
fn hot_upgrade_loses_no_packet_epoll() {
    hot_upgrade("epoll");
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() {
    let dir = std::env::temp_dir().join(format!("uturn-upgrade-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("uturn");
    std::fs::copy(uturn_bin(), &bin).unwrap();
    let real = dir.join("uturn.real");
    std::fs::copy(uturn_bin(), &real).unwrap();
    let mut relay = Relay::start_from(&bin, "uring", "", &[]);
    let peer = peer_socket();
    let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
    c.allocate();
    assert_eq!(c.channel_bind(0x4001, peer.local_addr().unwrap()).code(), None);
    let write_script = |body: &str| {
        let staged = dir.join("uturn.new");
        std::fs::write(&staged, format!("#!/bin/sh\n{body}\n")).unwrap();
        Command::new("chmod").args(["755", &staged.to_string_lossy()]).status().unwrap();
        std::fs::rename(&staged, &bin).unwrap();
    };
    // 1. A binary that does not even start: the old process never froze.
    write_script("exit 3");
    relay.signal("USR2");
    assert!(relay.wait_log("hot upgrade failed", Duration::from_secs(10)), "{}", relay.log());
    assert_eq!(echo_once(&c, &peer, 0x4001, b"one")[4..], *b"one");
    // 2. A new process that is ready, takes the handover and then refuses it (another worker
    //    count): the old process froze its workers and must resume them with their tables.
    let real_s = real.to_string_lossy();
    write_script(&format!(
        "a=\"\"; for x in \"$@\"; do if [ \"$prev\" = --workers ]; then x=3; fi; a=\"$a '$x'\"; prev=$x; done; eval exec '{real_s}' $a"
    ));
    relay.signal("USR2");
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay.log().matches("hot upgrade failed").count() < 2 {
        assert!(Instant::now() < deadline, "{}", relay.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = relay.log();
    assert!(log.contains("3 workers") || log.contains("this configuration 3"), "{log}");
    assert!(log.contains("workers resumed"), "{log}");
    assert_eq!(echo_once(&c, &peer, 0x4001, b"two")[4..], *b"two", "the allocation survived the freeze");
    let mut fresh = Client::new(relay.addr, "demo", "demo", "uturn.local");
    fresh.try_allocate().unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    assert_eq!(udp_port_owners(relay.addr.port()), HashSet::from([relay.pid()]));
    assert!(relay.terminate(Duration::from_secs(2)).is_some_and(|s| s.success()));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The PID holding a listening TCP socket on `port` (from /proc).
fn tcp_listen_owners(port: u16) -> HashSet<u32> {
    socket_owners(&["/proc/net/tcp", "/proc/net/tcp6"], port, Some("0A"))
}

/// A hot upgrade with TCP and TLS listeners: the TCP listeners move to the new process (the
/// same sockets), connections open at the freeze are closed with their allocations (TLS state
/// cannot move; docs/operations.md), and new TCP and TLS connections relay on the new process.
#[test]
fn a_hot_upgrade_hands_over_the_tcp_listeners() {
    use uturn_bench::client::stream::StreamClient;
    let tls = uturn_tests::TlsFiles::generate();
    let mut relay = Relay::start_streams("uring", "", &[], &tls);
    let (tcp, tls_addr) = (relay.tcp.unwrap(), relay.tls.unwrap());
    let peer = peer_socket();
    let old_pid = relay.pid();
    let mut before = StreamClient::connect(tcp, false, "demo", "demo", "uturn.local").unwrap();
    before.allocate().unwrap();
    assert_eq!(tcp_listen_owners(tls_addr.port()), HashSet::from([old_pid]));
    relay.signal("USR2");
    assert!(relay.wait_log("the new process serves", Duration::from_secs(20)), "{}", relay.log());
    let log = relay.log();
    let new_pid: u32 = log
        .lines()
        .find(|l| l.contains("the new process serves"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the log names the new PID");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(relay.terminate_after(Duration::from_secs(10)).is_some_and(|s| s.success()), "old process exits");
        assert!(before.closed_within(Duration::from_secs(3)), "a connection open at the freeze is closed");
        assert!(relay.log().contains("reason=\"connection closed\""));
        assert_eq!(tcp_listen_owners(tcp.port()), HashSet::from([new_pid]), "the same TCP listener, new owner");
        assert_eq!(tcp_listen_owners(tls_addr.port()), HashSet::from([new_pid]));
        for (addr, over_tls) in [(tcp, false), (tls_addr, true)] {
            let mut c = StreamClient::connect(addr, over_tls, "demo", "demo", "uturn.local").unwrap();
            let relayed = c.allocate().unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
            c.bind_channel(0x4000, peer.local_addr().unwrap()).unwrap();
            c.send_channel_data(0x4000, b"after the upgrade").unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = peer.recv_from(&mut buf).expect("relayed by the new process");
            assert_eq!((&buf[..n], from), (&b"after the upgrade"[..], relayed));
        }
    }));
    let _ = Command::new("kill").args(["-TERM", &new_pid.to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(new_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(new_pid) {
        let _ = Command::new("kill").args(["-KILL", &new_pid.to_string()]).status();
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
