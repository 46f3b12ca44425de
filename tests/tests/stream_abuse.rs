//! TURN over TCP and TLS against one abusive host and at the process's descriptor limit
//! (docs/security.md, "TCP and TLS connections"; issue 21): connection slots are counted per
//! source across the workers, only traffic that proves a connection in use keeps it open, a
//! large frame leaves no large buffer behind, new connections are charged to a per-source rate,
//! requests a relay cannot take now are answered (508) instead of dropped over streams, and
//! running out of descriptors neither spins a worker nor loses the waiting connection, and
//! refuses Allocates with 508 and a summary log line. Every test runs both backends.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use uturn_bench::client::stream::{tcp_from, StreamClient};
use uturn_tests::uturn_proto::wire::{Class, Method, TransactionId};
use uturn_tests::{build, Client, Relay, TlsFiles, BACKENDS};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn request(method: Method) -> Vec<u8> {
    build(method, Class::Request, TransactionId(rand::random()), None, |_| Ok(()))
}

/// A raw TCP connection to `server` from `from` (another 127.x address stands for another host).
fn raw(from: IpAddr, server: SocketAddr) -> TcpStream {
    let s = tcp_from(SocketAddr::new(from, 0), server).expect("connect");
    s.set_nodelay(true).unwrap();
    s
}

/// True when the server has not closed `s` within `wait` (bytes it sent are read and dropped).
fn still_open(s: &TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match (&*s).read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return true,
            Err(_) => return false,
        }
    }
}

/// Reads one whole STUN message (20-byte header plus its length) within `wait`.
fn read_message(s: &TcpStream, wait: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut head = [0u8; 20];
    (&*s).read_exact(&mut head).ok()?;
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    let mut m = head.to_vec();
    m.resize(20 + len, 0);
    (&*s).read_exact(&mut m[20..]).ok()?;
    Some(m)
}

/// A Prometheus value summed over its label sets (`name{...} v` and `name v` lines).
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The relay's open descriptors, and its soft and hard RLIMIT_NOFILE.
fn fds(pid: u32) -> (u64, String, String) {
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let v: Vec<&str> = line.split_whitespace().collect();
    (open, v[3].to_string(), v[4].to_string())
}

/// Sets the relay's RLIMIT_NOFILE (soft:hard) with util-linux `prlimit`.
fn set_nofile(pid: u32, soft: &str, hard: &str) {
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:{hard}")])
        .output()
        .expect("prlimit (util-linux)");
    assert!(out.status.success(), "prlimit: {}", String::from_utf8_lossy(&out.stderr));
}

/// CPU seconds (user + system) the process has used, over all its threads.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name: utime and stime are the 14th and 15th of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn vm_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn one_host_cannot_hold_every_connection_slot() {
    let tls = TlsFiles::generate();
    for backend in BACKENDS {
        // Two workers: before, each counted its own 4 per address.
        let config = "max-connections = 10\nmax-connections-per-ip = 4\nstream-idle-timeout = 2\n";
        let relay = Relay::start_streams(backend, config, &[], &tls);
        let server = relay.tcp.unwrap();
        // The flood: two hosts, 20 connections each, every one kept busy with 20-byte Binding
        // indications (which prove nothing).
        let mut flood = Vec::new();
        for host in ["127.0.0.1", "127.0.0.2"] {
            for _ in 0..20 {
                flood.push(raw(ip(host), server));
            }
        }
        flood.retain(|s| still_open(s, Duration::from_millis(50)));
        assert_eq!(flood.len(), 8, "{backend}: 4 per host across both workers, {} held", flood.len());
        // A legitimate client from a third host is admitted and keeps its allocation.
        let mut good = StreamClient::connect_from(
            SocketAddr::new(ip("127.0.0.3"), 0),
            server,
            false,
            "demo",
            "demo",
            "uturn.local",
        )
        .expect("connect");
        good.allocate().unwrap_or_else(|e| panic!("{backend}: the legitimate client was refused: {e}"));
        let indication = build(Method::BINDING, Class::Indication, TransactionId([1; 12]), None, |_| Ok(()));
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) && !flood.is_empty() {
            flood.retain(|s| (&*s).write_all(&indication).is_ok() && still_open(s, Duration::from_millis(100)));
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!(
            flood.is_empty(),
            "{backend}: {} connections sending only Binding indications outlived the 2 s idle timeout",
            flood.len()
        );
        assert!(good.transact(&request(Method::BINDING)).is_ok(), "{backend}: the allocation's connection survives");
        // Their slots are free again.
        let again = raw(ip("127.0.0.1"), server);
        assert!(still_open(&again, Duration::from_millis(200)), "{backend}");
    }
}

#[test]
fn a_large_frame_leaves_no_large_buffer_behind() {
    let tls = TlsFiles::generate();
    for backend in BACKENDS {
        let relay = Relay::start_streams(backend, "max-connections-per-ip = 1000\n", &[], &tls);
        for over_tls in [true, false] {
            let server = if over_tls { relay.tls.unwrap() } else { relay.tcp.unwrap() };
            // From three addresses, within the default rate of new connections per source.
            let mut conns: Vec<StreamClient> = (0..150)
                .map(|i| {
                    let from = SocketAddr::new(ip(&format!("127.0.0.{}", 1 + i % 3)), 0);
                    StreamClient::connect_from(from, server, over_tls, "demo", "demo", "uturn.local").unwrap()
                })
                .collect();
            // Every connection has been read and written once before the baseline.
            for c in &mut conns {
                assert!(c.transact(&request(Method::BINDING)).is_ok(), "{backend}");
            }
            std::thread::sleep(Duration::from_millis(300));
            let before = vm_rss_kib(relay.pid());
            // ChannelData of 65,000 bytes on an unbound channel (dropped), sent in two writes so
            // the first part waits in the connection's receive buffer for the rest.
            let mut frame = vec![0x40, 0x00];
            frame.extend_from_slice(&65_000u16.to_be_bytes());
            frame.resize(4 + 65_000, 0x5a);
            for c in &mut conns {
                c.send_raw(&frame[..1000]).unwrap();
                std::thread::sleep(Duration::from_millis(3));
                c.send_raw(&frame[1000..]).unwrap();
            }
            std::thread::sleep(Duration::from_millis(500));
            for c in &mut conns {
                assert!(c.transact(&request(Method::BINDING)).is_ok(), "{backend}: connection still served");
            }
            let grown = vm_rss_kib(relay.pid()).saturating_sub(before);
            println!("{backend} tls={over_tls}: RSS grew {grown} KiB for 150 connections after a 64 KiB frame each");
            // Before: ~68 KiB per connection kept over TCP (10 MB), ~90 KiB over TLS (13.5 MB). rustls
            // keeps some of its own (its record buffers, allocator fragmentation between them).
            let limit = if over_tls { 7680 } else { 4096 };
            assert!(grown < limit, "{backend} tls={over_tls}: RSS grew {grown} KiB over 150 connections");
        }
    }
}

#[test]
fn new_connections_are_charged_to_a_per_source_rate() {
    let tls = TlsFiles::generate();
    for backend in BACKENDS {
        // 4 per second for the relay: each of the two workers 2/s with a burst of 2.
        let config = "connections-per-second-per-ip = 4\nmax-connections-per-ip = 1000\n";
        let m_addr: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let relay = Relay::start_streams(backend, config, &["--metrics-listen", &m_addr.to_string()], &tls);
        let server = relay.tls.unwrap();
        let burst: Vec<TcpStream> = (0..30).map(|_| raw(ip("127.0.0.1"), server)).collect();
        let open = burst.iter().filter(|s| still_open(s, Duration::from_millis(50))).count();
        assert!((2..=6).contains(&open), "{backend}: {open} of 30 connections from one source kept");
        // Another source still gets its TLS session.
        let mut other = StreamClient::connect_from(
            SocketAddr::new(ip("127.0.0.2"), 0),
            server,
            true,
            "demo",
            "demo",
            "uturn.local",
        )
        .expect("another source's TLS handshake");
        assert!(other.transact(&request(Method::BINDING)).is_ok());
        std::thread::sleep(Duration::from_millis(1200));
        let text = scrape(m_addr);
        let limited = metric_sum(&text, "uturn_connections_rate_limited_total");
        assert!(limited >= 24.0, "{backend}: {limited} counted\n{text}");
    }
}

#[test]
fn requests_over_streams_are_answered_not_dropped_when_the_budget_is_spent() {
    let tls = TlsFiles::generate();
    for backend in BACKENDS {
        // 2 requests/s per source per worker, burst 2.
        let relay = Relay::start_streams(backend, "unauth-rate = 4\n", &[], &tls);
        for over_tls in [false, true] {
            let server = if over_tls { relay.tls.unwrap() } else { relay.tcp.unwrap() };
            let mut c = StreamClient::connect(server, over_tls, "demo", "demo", "uturn.local").unwrap();
            std::thread::sleep(Duration::from_millis(1100));
            let (mut ok, mut refused) = (0, 0);
            for _ in 0..6 {
                let r = c.transact(&request(Method::BINDING)).unwrap_or_else(|e| panic!("{backend}: {e}"));
                match r.code() {
                    None => ok += 1,
                    Some(508) => refused += 1,
                    Some(code) => panic!("{backend}: unexpected {code}"),
                }
            }
            assert!(ok >= 1 && refused >= 3, "{backend} tls={over_tls}: {ok} answered, {refused} refused");
            // A ConnectionBind on the spent budget is refused (508) and its connection stays
            // framed: the next request is a request, not RFC 6062 data.
            let r = c.transact(&request(Method::CONNECTION_BIND)).expect("an answer to the ConnectionBind");
            assert_eq!(r.code(), Some(508), "{backend}");
            std::thread::sleep(Duration::from_millis(1100));
            let r = c.transact(&request(Method::BINDING)).expect("the connection is still framed");
            assert_eq!(r.code(), None, "{backend}");
        }
        // Over UDP the client retransmits: still dropped.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        for _ in 0..8 {
            udp.send_to(&request(Method::BINDING), relay.addr).unwrap();
        }
        let mut buf = [0u8; 1500];
        let answered = (0..8).take_while(|_| udp.recv_from(&mut buf).is_ok()).count();
        assert!(answered < 8, "{backend}: UDP requests over the budget are dropped");
    }
}

#[test]
fn out_of_descriptors_accepts_back_off_and_resume() {
    let tls = TlsFiles::generate();
    // The relay runs with a hard limit of 64 descriptors (it raises its soft limit to that):
    // an io_uring accept takes the limit when it is armed, so it must be in force from the start.
    let wrapper = uturn_tests::tempfile_lite::TempFile::new(
        "nofile64.sh",
        &format!("#!/bin/sh\nexec prlimit --nofile=64:64 -- {} \"$@\"\n", uturn_tests::uturn_bin().display()),
    );
    std::fs::set_permissions(&wrapper.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for backend in BACKENDS {
        let m_addr: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let args = ["--metrics-listen", &m_addr.to_string()];
        let relay = Relay::start_streams_from(&wrapper.0, backend, "max-connections-per-ip = 1000\n", &args, &tls);
        let pid = relay.pid();
        let server = relay.tcp.unwrap();
        // Connections are accepted until the descriptors run out, then wait in the backlog.
        let mut accepted = Vec::new();
        let mut waiting = Vec::new();
        for _ in 0..80 {
            let s = raw(ip("127.0.0.1"), server);
            (&s).write_all(&request(Method::BINDING)).unwrap();
            if read_message(&s, Duration::from_millis(300)).is_some() {
                assert!(waiting.is_empty(), "{backend}: accepted after a refusal");
                accepted.push(s);
            } else {
                waiting.push(s);
                if waiting.len() == 3 {
                    break;
                }
            }
        }
        assert_eq!(waiting.len(), 3, "{backend}: never out of descriptors ({} accepted)", accepted.len());
        let cpu0 = cpu_seconds(pid);
        std::thread::sleep(Duration::from_secs(2));
        let spent = cpu_seconds(pid) - cpu0;
        println!("{backend}: {spent:.2} CPU seconds in 2 s out of descriptors");
        assert!(spent < 0.5, "{backend}: {spent:.2} CPU seconds in 2 s while out of descriptors");
        // Descriptors free up: the waiting connections are served without any new arrival.
        accepted.truncate(accepted.len() - 6);
        for (i, s) in waiting.iter().enumerate() {
            let m = read_message(s, Duration::from_secs(3));
            assert!(m.is_some(), "{backend}: waiting connection {i} not served after descriptors freed up");
        }
        drop(accepted);
        std::thread::sleep(Duration::from_millis(1200));
        let text = scrape(m_addr);
        let deferred = metric_sum(&text, "uturn_accepts_deferred_total");
        println!("{backend}: {deferred} accepts deferred");
        assert!((1.0..=60.0).contains(&deferred), "{backend}: {deferred} deferred accepts\n{text}");
        assert!(relay.log().contains("accepting connections put off"), "{backend}");
    }
}

#[test]
fn an_allocate_at_the_descriptor_limit_gets_508_and_one_log_line() {
    for backend in BACKENDS {
        let relay = Relay::start(backend, "", &[]);
        let pid = relay.pid();
        std::thread::sleep(Duration::from_millis(300));
        let (open, soft, hard) = fds(pid);
        set_nofile(pid, &open.to_string(), &hard);
        // Allocations take the holes below the limit first.
        let mut held = Vec::new();
        for _ in 0..64 {
            let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
            match c.try_allocate() {
                Ok(_) => held.push(c),
                Err(e) if e.contains("508") => break,
                Err(e) => panic!("{backend}: {e}"),
            }
        }
        let mut refused = 1;
        for _ in 1..30 {
            let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
            match c.try_allocate() {
                Err(e) if e.contains("508") => refused += 1,
                other => panic!("{backend}: {other:?}"),
            }
        }
        set_nofile(pid, &soft, &hard);
        assert_eq!(refused, 30);
        let log = relay.log();
        let lines = log.lines().filter(|l| l.contains("WARN") && l.contains("refused")).count();
        assert!((1..=2).contains(&lines), "{backend}: {lines} WARN lines for 30 refusals:\n{log}");
        assert!(!log.contains("binding a relayed transport address failed"), "{backend}");
        let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
        assert!(c.try_allocate().is_ok(), "{backend}: allocates again once descriptors are free");
    }
}
