//! Usage records (docs/operations.md, "Usage records") against the started binary: allocations
//! relay a known number of datagrams each way through a raw client and a peer socket, then end
//! (Refresh 0, expiry); the Redis stream (a `redis-server` the test starts) and the JSON-lines
//! file then hold exactly one final record per allocation with the exact packet and byte counts;
//! interim records while they live; a Redis outage delays records without losing them; a hot
//! upgrade (SIGUSR2) in between loses none and keeps each allocation's start and totals.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use uturn_tests::{peer_socket, Client, RedisServer, Relay};

const CHANNEL: u16 = 0x4000;

/// One allocation the test drove: what its records must say.
#[derive(Debug, Clone)]
struct Expected {
    client: SocketAddr,
    relayed: SocketAddr,
    packets_to_peer: u64,
    bytes_to_peer: u64,
    packets_to_client: u64,
    bytes_to_client: u64,
}

/// A live allocation with its peer.
struct Flow {
    c: Client,
    peer: UdpSocket,
    expected: Expected,
}

/// Allocates on `relay` and binds a channel to a fresh peer.
fn open(relay: SocketAddr) -> Flow {
    let mut c = Client::new(relay, "demo", "demo", "uturn.local");
    let relayed = c.try_allocate().expect("Allocate");
    let peer = peer_socket();
    c.try_channel_bind(CHANNEL, peer.local_addr().unwrap()).expect("ChannelBind");
    let client = c.sock.local_addr().unwrap();
    let expected =
        Expected { client, relayed, packets_to_peer: 0, bytes_to_peer: 0, packets_to_client: 0, bytes_to_client: 0 };
    Flow { c, peer, expected }
}

/// Relays `up` datagrams client to peer and `down` peer to client, each received before the
/// next is sent (so every one is counted exactly), of sizes that differ per datagram.
fn relay_traffic(f: &mut Flow, up: usize, down: usize) {
    let mut buf = [0u8; 1500];
    for i in 0..up {
        let payload = vec![b'u'; 10 + (i * 7) % 200];
        f.c.send_channel_data(CHANNEL, &payload);
        let (n, from) = f.peer.recv_from(&mut buf).expect("the peer receives the client's datagram");
        assert_eq!((n, from), (payload.len(), f.expected.relayed));
        f.expected.packets_to_peer += 1;
        f.expected.bytes_to_peer += n as u64;
    }
    for i in 0..down {
        let payload = vec![b'd'; 1 + (i * 13) % 300];
        f.peer.send_to(&payload, f.expected.relayed).unwrap();
        let got = f.c.recv().expect("the client receives the peer's datagram");
        assert_eq!(&got[4..], &payload[..]);
        f.expected.packets_to_client += 1;
        f.expected.bytes_to_client += payload.len() as u64;
    }
}

/// The fields of every entry of the stream `key`.
fn stream(url: &str, key: &str) -> Vec<HashMap<String, String>> {
    let client = redis::Client::open(url).unwrap();
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1)) else { return vec![] };
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE").arg(key).arg("-").arg("+").query(&mut conn).unwrap();
    entries.into_iter().map(|(_, kv)| kv.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect()).collect()
}

/// The records of the JSON-lines file at `path`, as string maps (numbers as text).
fn file_records(path: &std::path::Path) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            v.as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                .collect()
        })
        .collect()
}

fn finals(records: &[HashMap<String, String>]) -> Vec<&HashMap<String, String>> {
    records.iter().filter(|r| r["kind"] == "final").collect()
}

/// Waits (at most `limit`) until `read` returns at least `n` final records.
fn wait_finals(
    n: usize,
    limit: Duration,
    read: impl Fn() -> Vec<HashMap<String, String>>,
) -> Vec<HashMap<String, String>> {
    let deadline = Instant::now() + limit;
    loop {
        let records = read();
        if finals(&records).len() >= n || Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every flow has exactly one final record, with its addresses, reason and exact totals.
fn check_finals(records: &[HashMap<String, String>], flows: &[(Expected, &str)], node: &str, log: &str) {
    let finals = finals(records);
    assert_eq!(finals.len(), flows.len(), "one final record per allocation: {records:#?}\n{log}");
    let mut sessions = std::collections::HashSet::new();
    for (e, reason) in flows {
        let mine: Vec<_> = finals.iter().filter(|r| r["client"] == e.client.to_string()).collect();
        assert_eq!(mine.len(), 1, "{e:?}: {records:#?}");
        let r = mine[0];
        assert!(sessions.insert(r["session"].clone()), "session ids are unique: {records:#?}");
        assert_eq!(r["node"], node);
        assert_eq!(r["user"], "demo");
        assert_eq!(r["transport"], "udp");
        assert_eq!(r["relayed"], e.relayed.to_string());
        assert_eq!(r["reason"], *reason, "{r:?}");
        let num = |k: &str| r[k].parse::<u64>().unwrap_or_else(|_| panic!("{k} in {r:?}"));
        assert_eq!(
            [num("packets_to_peer"), num("bytes_to_peer"), num("packets_to_client"), num("bytes_to_client")],
            [e.packets_to_peer, e.bytes_to_peer, e.packets_to_client, e.bytes_to_client],
            "exact totals of {e:?}: {r:?}"
        );
        assert!(num("start_ms") > 1_600_000_000_000 && num("start_ms") <= num("end_ms"), "{r:?}");
    }
}

/// `n` allocations, each with its own counts; the first half end with Refresh 0, the others
/// expire (`max-lifetime` of the relay).
fn drive(relay: SocketAddr, n: usize) -> Vec<(Expected, &'static str)> {
    let mut flows: Vec<Flow> = (0..n).map(|_| open(relay)).collect();
    for (i, f) in flows.iter_mut().enumerate() {
        relay_traffic(f, 3 + i * 2, 2 + i);
    }
    flows
        .into_iter()
        .enumerate()
        .map(|(i, mut f)| {
            if i < n / 2 {
                f.c.try_refresh(0).expect("Refresh 0");
                (f.expected, "deleted")
            } else {
                (f.expected, "expired")
            }
        })
        .collect()
}

fn metric(relay_metrics: SocketAddr, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&relay_metrics, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {relay_metrics}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[test]
fn usage_records_reach_the_redis_stream_with_exact_counts_and_survive_an_outage() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let metrics = free_tcp();
    let config = format!(
        "fleet-redis = \"{url}\"\nnode-id = \"node-a\"\nusage-stream = \"test:usage\"\nusage-stream-maxlen = 1000\n\
         default-lifetime = 3\nmax-lifetime = 3\nmetrics-listen = \"{metrics}\"\n"
    );
    let relay = Relay::start("epoll", &config, &[]);
    let flows = drive(relay.addr, 6);
    let records = wait_finals(6, Duration::from_secs(20), || stream(&url, "test:usage"));
    check_finals(&records, &flows, "node-a", &relay.log());
    assert_eq!(metric(metrics, "uturn_usage_records_written_total{dest=\"redis\"}"), Some(6.0));
    assert_eq!(metric(metrics, "uturn_usage_records_pending"), Some(0.0));

    // Redis goes away: records wait, and reach the stream once it is back (same port).
    let port = redis.port;
    redis.kill();
    let flows2 = drive(relay.addr, 4);
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(metrics, "uturn_usage_records_pending") != Some(4.0) {
        assert!(Instant::now() < deadline, "4 records pending while Redis is down\n{}", relay.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Relaying and allocating go on meanwhile.
    let mut extra = open(relay.addr);
    relay_traffic(&mut extra, 1, 1);
    let _redis2 = RedisServer::start_on(port);
    let records = wait_finals(4, Duration::from_secs(20), || stream(&url, "test:usage"));
    check_finals(&records, &flows2, "node-a", &relay.log());
    let log = relay.log();
    let warns: Vec<&str> = log.lines().filter(|l| l.contains("WARN") && l.contains("fleet-redis unreachable")).collect();
    assert_eq!(warns.len(), 1, "one WARN:\n{log}");
    assert!(warns[0].contains("usage records: "), "the usage writer noticed: {}", warns[0]);
    assert_eq!(metric(metrics, "uturn_usage_records_dropped_total"), Some(0.0));
}

#[test]
fn usage_records_go_to_the_file_without_redis_with_interim_records() {
    let path = std::env::temp_dir().join(format!("uturn-usage-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let config = format!(
        "usage-file = \"{}\"\nusage-interval = 1\nnode-id = \"node-f\"\ndefault-lifetime = 4\nmax-lifetime = 4\n",
        path.display()
    );
    let relay = Relay::start("uring", &config, &[]);
    let flows = drive(relay.addr, 4);
    let records = wait_finals(4, Duration::from_secs(20), || file_records(&path));
    let _ = std::fs::remove_file(&path);
    check_finals(&records, &flows, "node-f", &relay.log());
    // The allocations that expired lived 4 s after their traffic: interim records with their
    // totals so far, the last of them equal to the final totals.
    for (e, reason) in flows.iter().filter(|(_, r)| *r == "expired") {
        let interim: Vec<_> =
            records.iter().filter(|r| r["kind"] == "interim" && r["client"] == e.client.to_string()).collect();
        assert!(interim.len() >= 2, "interim records every second for {e:?} ({reason}): {records:#?}");
        let last = interim.last().unwrap();
        let fin = records.iter().find(|r| r["kind"] == "final" && r["client"] == e.client.to_string()).unwrap();
        for k in ["session", "start_ms", "packets_to_peer", "bytes_to_peer", "packets_to_client", "bytes_to_client"] {
            assert_eq!(last[k], fin[k], "{k}: {last:?} vs {fin:?}");
        }
        assert!(!last.contains_key("reason"));
    }
}

/// The new process's PID, from the old one's log line.
fn new_pid(log: &str) -> Option<u32> {
    log.lines()
        .find(|l| l.contains("hot upgrade: new process started"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
}

#[test]
fn a_hot_upgrade_loses_no_usage_record() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let path = std::env::temp_dir().join(format!("uturn-usage-upgrade-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let config = format!(
        "fleet-redis = \"{url}\"\nusage-file = \"{}\"\nnode-id = \"node-u\"\ndefault-lifetime = 60\nmax-lifetime = 60\n",
        path.display()
    );
    let mut relay = Relay::start("epoll", &config, &[]);
    let mut flows: Vec<Flow> = (0..4).map(|_| open(relay.addr)).collect();
    for (i, f) in flows.iter_mut().enumerate() {
        relay_traffic(f, 5 + i, 4 + i);
    }
    // One ends before the upgrade while Redis is down: its record waits in the old process,
    // which hands it to the new one (it is in the file at once).
    let port = redis.port;
    redis.kill();
    let mut gone = flows.pop().unwrap();
    gone.c.try_refresh(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !relay.log().lines().any(|l| l.contains("fleet-redis unreachable") && l.contains("usage records: ")) {
        assert!(Instant::now() < deadline, "{}", relay.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let before_upgrade = SystemTimeMs::now();
    relay.signal("USR2");
    let served = relay.wait_log("the new process serves", Duration::from_secs(30));
    let pid = new_pid(&relay.log());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(served, "{}", relay.log());
        assert!(relay.terminate_after(Duration::from_secs(15)).is_some_and(|s| s.success()), "{}", relay.log());
        let _redis2 = RedisServer::start_on(port);
        // More traffic on the new process, then the end of every allocation.
        for (i, f) in flows.iter_mut().enumerate() {
            relay_traffic(f, 2 + i, 3);
            f.c.try_refresh(0).expect("Refresh 0 on the new process");
        }
        let mut expected: Vec<(Expected, &str)> = flows.iter().map(|f| (f.expected.clone(), "deleted")).collect();
        expected.push((gone.expected.clone(), "deleted"));
        let records = wait_finals(4, Duration::from_secs(20), || stream(&url, "uturn:usage"));
        check_finals(&records, &expected, "node-u", &relay.log());
        let file = wait_finals(4, Duration::from_secs(10), || file_records(&path));
        check_finals(&file, &expected, "node-u", &relay.log());
        // The handed-over allocations keep the start the old process gave them.
        for f in &flows {
            let r = records.iter().find(|r| r["client"] == f.expected.client.to_string()).unwrap();
            assert!(r["start_ms"].parse::<u64>().unwrap() < before_upgrade.0, "{r:?}");
        }
        assert!(!relay.log().contains("usage records not written"), "{}", relay.log());
        for l in relay.log().lines().filter(|l| l.contains("hot upgrade")) {
            println!("{l}");
        }
        println!("{} final records in the stream and the file, {} entries in all", expected.len(), records.len());
    }));
    if let Some(pid) = pid {
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            if std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    let _ = std::fs::remove_file(&path);
    if let Err(e) = result {
        eprintln!("{}", relay.log());
        std::panic::resume_unwind(e);
    }
}

/// Unix milliseconds.
struct SystemTimeMs(u64);

impl SystemTimeMs {
    fn now() -> Self {
        SystemTimeMs(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64)
    }
}

#[test]
fn a_stop_writes_the_open_allocations_records_with_reason_shutdown() {
    let path = std::env::temp_dir().join(format!("uturn-usage-stop-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let config = format!("usage-file = \"{}\"\nnode-id = \"node-s\"\n", path.display());
    let mut relay = Relay::start("epoll", &config, &[]);
    let mut flows: Vec<Flow> = (0..3).map(|_| open(relay.addr)).collect();
    for (i, f) in flows.iter_mut().enumerate() {
        relay_traffic(f, 4 + i, 6 - i);
    }
    assert!(file_records(&path).is_empty(), "no record while they live (no usage-interval)");
    assert!(relay.terminate(Duration::from_secs(10)).is_some_and(|s| s.success()), "{}", relay.log());
    let records = file_records(&path);
    let _ = std::fs::remove_file(&path);
    let expected: Vec<(Expected, &str)> = flows.iter().map(|f| (f.expected.clone(), "shutdown")).collect();
    check_finals(&records, &expected, "node-s", &relay.log());
}
