//! A fleet of three uturn nodes on loopback sharing one real `redis-server` (issue 22):
//! `user-quota` counts a user's allocations on every node and a killed node's share lapses
//! within its lease; a nonce minted by one node is accepted by another; Redis killed mid-run
//! leaves each node enforcing the quota alone, with one WARN, until a new Redis catches up.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use uturn_proto::wire::{attr, Message, Method, TransactionId};
use uturn_tests::{Client, RedisServer, Relay, BACKENDS};

const BACKEND: &str = BACKENDS[0];
/// `quota-lease` of the nodes, seconds.
const LEASE: u64 = 2;

/// A node of the fleet on `redis` named `id`, with alice's password `pw` and `extra` config.
fn node(redis: &RedisServer, id: &str, extra: &str) -> Relay {
    let config = format!("quota-lease = {LEASE}\n{extra}\n[users]\nalice = \"pw\"\nbob = \"pw\"\n");
    Relay::start(BACKEND, &config, &["--fleet-redis", &redis.url(), "--node-id", id])
}

/// Waits until `relay` logged that its quotas count across the fleet.
fn wait_fleet_quota(relay: &Relay) {
    assert!(
        relay.wait_log("fleet quota: user-quota counts allocations on every node", Duration::from_secs(5)),
        "{}",
        relay.log()
    );
}

/// An allocation of `user` on `relay` (the client keeps it alive), or the error.
fn allocate(relay: &Relay, user: &str) -> Result<Client, String> {
    let mut c = Client::new(relay.addr, user, "pw", "x");
    c.try_allocate().map(|_| c)
}

/// The error of an Allocate of `user` on `relay` that must fail.
fn refused(relay: &Relay, user: &str) -> String {
    match allocate(relay, user) {
        Ok(_) => panic!("{user} was granted an allocation on {}", relay.addr),
        Err(e) => e,
    }
}

/// The sum of the counts of `user` in Redis over every node field (live or not): `HVALS`,
/// spoken in RESP on a plain socket.
fn redis_counts(redis: &RedisServer, user: &str) -> u32 {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let key = format!("uturn:quota:user:{user}");
    write!(s, "*2\r\n$5\r\nHVALS\r\n${}\r\n{key}\r\n", key.len()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let n: usize = line.trim().strip_prefix('*').and_then(|n| n.parse().ok()).expect("an array");
    let mut sum = 0;
    for _ in 0..n {
        // A bulk string: its length line, then the value.
        line.clear();
        r.read_line(&mut line).unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        sum += line.trim().parse::<u32>().expect("a count");
    }
    sum
}

fn kill_by_pid(relay: &Relay) {
    let ok = Command::new("kill").args(["-KILL", &relay.pid().to_string()]).status().unwrap().success();
    assert!(ok, "kill -KILL {}", relay.pid());
}

#[test]
fn a_users_quota_holds_across_nodes_and_a_killed_nodes_share_lapses() {
    let redis = RedisServer::start();
    let nodes: Vec<Relay> = ["a", "b", "c"].iter().map(|id| node(&redis, id, "user-quota = 3")).collect();
    nodes.iter().for_each(wait_fleet_quota);
    // One allocation of alice on each node: the fleet total reaches the quota.
    let mut held: Vec<Client> = nodes.iter().map(|n| allocate(n, "alice").unwrap()).collect();
    assert_eq!(redis_counts(&redis, "alice"), 3);
    // Each node alone holds 1 of 3, yet every node refuses the fourth.
    for n in &nodes {
        let e = allocate(n, "alice").err().expect("the fleet total is at user-quota");
        assert!(e.contains("486"), "{e}");
    }
    // Another user is not affected.
    let _bob = allocate(&nodes[0], "bob").unwrap();
    // A clean end gives the quota back at once.
    held[0].try_refresh(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let again = loop {
        match allocate(&nodes[0], "alice") {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline && e.contains("486") => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("alice's quota not given back after a Refresh 0: {e}"),
        }
    };
    held[0] = again;
    assert!(refused(&nodes[1], "alice").contains("486"));
    // Node c crashes (SIGKILL: no goodbye): its share lapses within the lease.
    kill_by_pid(&nodes[2]);
    let killed = Instant::now();
    let mut last = String::new();
    let granted = loop {
        match allocate(&nodes[1], "alice") {
            Ok(c) => break Some(c),
            Err(e) if killed.elapsed() < Duration::from_secs(LEASE + 3) => {
                last = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                last = e;
                break None;
            }
        }
    };
    let lapsed = killed.elapsed();
    assert!(granted.is_some(), "the killed node still holds alice's quota after {lapsed:?}: {last}");
    eprintln!("a killed node's share lapsed after {lapsed:?} (lease {LEASE} s)");
    assert!(refused(&nodes[0], "alice").contains("486"), "a and b hold 3 again");
    // The dead node's field was dropped by the check that met it.
    assert_eq!(redis_counts(&redis, "alice"), 3);
}

/// Sends an Allocate signed with `c`'s credentials and nonce from `c`'s socket to `to`, and
/// returns the answer.
fn allocate_at(c: &Client, to: SocketAddr) -> Message<'static> {
    let tid = TransactionId(rand::random());
    let req = c.signed_request(Method::ALLOCATE, tid, |w| w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop));
    let mut buf = vec![0u8; 2048];
    for _ in 0..4 {
        c.sock.send_to(&req, to).unwrap();
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            let Ok((n, _)) = c.sock.recv_from(&mut buf) else { break };
            if Message::parse(&buf[..n]).is_ok_and(|m| m.transaction_id() == tid) {
                let bytes: &'static [u8] = Box::leak(buf[..n].to_vec().into_boxed_slice());
                return Message::parse(bytes).unwrap();
            }
        }
    }
    panic!("no answer from {to}");
}

fn code(m: &Message<'_>) -> Option<u16> {
    uturn_tests::error_code(m)
}

#[test]
fn a_nonce_from_one_node_is_accepted_by_another() {
    let redis = RedisServer::start();
    // Nonce windows of 1 s (nonce-lifetime 10), and b started 1.5 s after a: the nodes agree on
    // nonce times only by counting UNIX seconds, not each from its own start.
    let a = node(&redis, "a", "nonce-lifetime = 10");
    std::thread::sleep(Duration::from_millis(1500));
    let b = node(&redis, "b", "nonce-lifetime = 10");
    let alone = Relay::start(BACKEND, "[users]\nalice = \"pw\"\n", &[]);
    assert!(a.wait_log("nonce secret from fleet-redis", Duration::from_secs(5)), "{}", a.log());
    let mut c = Client::new(a.addr, "alice", "pw", "x");
    c.learn_nonce();
    // A's nonce, on B: no 438, the allocation is made there, signed with alice's key.
    let m = allocate_at(&c, b.addr);
    assert_eq!(code(&m), None, "node b refused node a's nonce");
    assert!(m.xor_address(attr::XOR_RELAYED_ADDRESS).is_some());
    assert!(m.integrity_parts().is_some_and(|p| uturn_proto::wire::integrity::verify(c.key.as_bytes(), &p)));
    // A node outside the fleet has its own secret: the same nonce earns 438 there.
    let m = allocate_at(&c, alone.addr);
    assert_eq!(code(&m), Some(438), "a node without the fleet secret accepted a foreign nonce");
    // The same with nonce-secret-file and no Redis at all.
    let dir = std::env::temp_dir().join(format!("uturn-fleet-nonce-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, format!("{}\n", "5a".repeat(32))).unwrap();
    let cfg = format!("nonce-secret-file = {:?}\n[users]\nalice = \"pw\"\n", secret.display().to_string());
    let d = Relay::start(BACKEND, &cfg, &[]);
    let e = Relay::start(BACKEND, &cfg, &[]);
    let mut c = Client::new(d.addr, "alice", "pw", "x");
    c.learn_nonce();
    let m = allocate_at(&c, e.addr);
    assert_eq!(code(&m), None, "nonce-secret-file: node e refused node d's nonce");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn redis_killed_mid_run_quotas_go_local_with_one_warn_then_catch_up() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let nodes: Vec<Relay> = ["a", "b", "c"].iter().map(|id| node(&redis, id, "user-quota = 2")).collect();
    nodes.iter().for_each(wait_fleet_quota);
    let mut held = vec![allocate(&nodes[0], "alice").unwrap(), allocate(&nodes[1], "alice").unwrap()];
    assert!(refused(&nodes[2], "alice").contains("486"), "fleet total 2 of 2");
    redis.kill();
    // No node stalls: each grants up to user-quota of its own (a: 1 more, c: 2), no more.
    held.push(allocate(&nodes[0], "alice").unwrap());
    assert!(refused(&nodes[0], "alice").contains("486"), "node a alone: 2 of 2");
    held.push(allocate(&nodes[2], "alice").unwrap());
    held.push(allocate(&nodes[2], "alice").unwrap());
    assert!(refused(&nodes[2], "alice").contains("486"), "node c alone: 2 of 2");
    // Relaying goes on: a Refresh and a permission on an allocation made before the outage.
    held[1].try_refresh(600).unwrap();
    held[1].try_create_permission(&["127.0.0.1:9".parse().unwrap()]).unwrap();
    // Let every node notice (its lease refresh fails) and retry a few times.
    std::thread::sleep(Duration::from_secs(3));
    for n in &nodes {
        let log = n.log();
        let warns: Vec<&str> = log.lines().filter(|l| l.contains("WARN") && l.contains("fleet-redis unreachable")).collect();
        assert_eq!(warns.len(), 1, "exactly one WARN per node for the outage:\n{log}");
    }
    // Redis comes back empty on the same port: every node re-publishes its counts.
    let redis = RedisServer::start_on(port);
    for n in &nodes {
        assert!(n.wait_log("fleet quota: Redis answers again", Duration::from_secs(5)), "{}", n.log());
    }
    assert_eq!(redis_counts(&redis, "alice"), 5, "a 2 + b 1 + c 2, re-published");
    // Across the fleet again: alice is over quota everywhere, even on b (1 of its own).
    assert!(refused(&nodes[1], "alice").contains("486"));
    // Still one WARN each.
    for n in &nodes {
        let warns = n.log().lines().filter(|l| l.contains("WARN") && l.contains("fleet-redis unreachable")).count();
        assert_eq!(warns, 1, "{}", n.log());
    }
    drop(held);
}
