//! A fleet of three uturn nodes on loopback sharing one real `redis-server` (issue 22): the
//! registry (`GET /fleet`, `POST /ice-servers`) shows the three nodes and drops a killed one
//! within the TTL; revoke on node C ends a user's allocations on A and B; `/sessions?fleet=1`
//! lists every node's sessions; a node at its budget redirects a new Allocate (signed 300) to
//! the least loaded live node, where the raw client and coturn's `turnutils_uclient` then
//! allocate; Redis killed mid-run stalls nothing and logs one WARN per node; without Redis, a
//! static `alternate-server` list is used in turn. The `/ice-servers` answer is handed
//! unchanged to headless Chromium (tests/python/browser_call.py --rtc-config).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use uturn_tests::uturn_proto::wire::integrity::{self, IntegrityKey};
use uturn_tests::uturn_proto::wire::{attr, Method};
use uturn_tests::{peer_socket, run_with_timeout, uturn_cli, Client, RedisServer, Relay};

const BACKEND: &str = "epoll";
const REALM: &str = "uturn.local";
const CONFIG: &str = "static-auth-secret = \"fleet-secret\"\n[users]\nalice = \"a\"\nbob = \"b\"\nfill = \"f\"\n";

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 request with an optional JSON body; returns (status, body).
fn http(method: &str, addr: SocketAddr, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// One node of the test fleet: the relay and its admin address.
struct Node {
    relay: Relay,
    admin: SocketAddr,
    id: &'static str,
}

impl Node {
    fn start(id: &'static str, redis: Option<&str>, extra_config: &str, extra: &[&str]) -> Node {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let admin_s = admin.to_string();
        let mut args = vec!["--admin-listen", &admin_s, "--node-id", id];
        if let Some(url) = redis {
            args.extend(["--fleet-redis", url]);
        }
        args.extend(extra);
        let relay = Relay::start(BACKEND, &format!("{extra_config}{CONFIG}"), &args);
        Node { relay, admin, id }
    }

    fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = http("GET", self.admin, path, None);
        assert_eq!(status, 200, "GET {path} on {}: {body}", self.id);
        json(&body)
    }

    /// The node ids `GET /fleet` lists.
    fn fleet_ids(&self) -> Vec<String> {
        let v = self.get("/fleet");
        v["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap().to_owned()).collect()
    }

    /// The entry of node `id` in this node's `GET /fleet`.
    fn entry(&self, id: &str) -> Option<serde_json::Value> {
        let v = self.get("/fleet");
        v["nodes"].as_array().unwrap().iter().find(|n| n["node"] == id).cloned()
    }
}

/// Polls `f` every 100 ms until it is true or `limit` passes; returns how long it took.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn allocate(node: &Node, user: &str, pass: &str) -> Client {
    let mut c = Client::new(node.relay.addr, user, pass, REALM);
    c.try_allocate().unwrap_or_else(|e| panic!("Allocate on {}: {e}\n{}", node.id, node.relay.log()));
    c
}

/// Allocate on `c`'s server: `Ok(relayed)`, or `Err(alternate)` for a 300 Try Alternate whose
/// MESSAGE-INTEGRITY verifies with the user's key (RFC 8489 §10: the 300 is signed).
fn allocate_or_redirect(c: &mut Client, user: &str, pass: &str) -> Result<SocketAddr, SocketAddr> {
    c.learn_nonce();
    let r =
        c.transact_authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop)).unwrap();
    let m = r.msg();
    match r.code() {
        None => Ok(m.xor_address(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap()),
        Some(300) => {
            let key = IntegrityKey::long_term(user, REALM, pass);
            assert!(m.integrity_parts().is_some_and(|p| integrity::verify(key.as_bytes(), &p)), "300 not signed");
            let a = m.get(attr::ALTERNATE_SERVER).expect("300 with ALTERNATE-SERVER");
            assert_eq!(a[1], 1, "an IPv4 alternate for an IPv4 request");
            let port = u16::from_be_bytes([a[2], a[3]]);
            Err(SocketAddr::from(([a[4], a[5], a[6], a[7]], port)))
        }
        Some(code) => panic!("Allocate answered {code}"),
    }
}

/// The refresh answer of `c` after at most 3 s of retries while it still succeeds.
fn refresh_until_gone(c: &mut Client) -> Result<u32, String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut r = c.try_refresh(600);
    while r.is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        r = c.try_refresh(600);
    }
    r
}

fn ice_servers(node: &Node, body: &str) -> serde_json::Value {
    let (status, text) = http("POST", node.admin, "/ice-servers", Some(body));
    assert_eq!(status, 200, "{text}");
    json(&text)
}

fn ice_urls(v: &serde_json::Value) -> Vec<String> {
    v["iceServers"][0]["urls"].as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_owned()).collect()
}

fn udp_url(node: &Node) -> String {
    format!("turn:127.0.0.1:{}?transport=udp", node.relay.addr.port())
}

#[test]
fn registry_revoke_sessions_and_a_killed_node() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = Node::start("node-a", Some(&url), "", &[]);
    let b = Node::start("node-b", Some(&url), "", &[]);
    let c = Node::start("node-c", Some(&url), "", &[]);
    let all = ["node-a", "node-b", "node-c"];
    for n in [&a, &b, &c] {
        assert!(
            wait_until(Duration::from_secs(5), || n.fleet_ids() == all).is_some(),
            "{} sees {:?}",
            n.id,
            n.fleet_ids()
        );
    }
    let fleet = a.get("/fleet");
    println!("GET /fleet on node-a: {fleet:#}");
    assert_eq!((fleet["fleet"].as_bool(), fleet["redis"].as_str()), (Some(true), Some("up")));
    let entry = a.entry("node-b").unwrap();
    assert_eq!(entry["health"], "ready");
    assert_eq!(entry["addresses"][0]["url"], udp_url(&b));

    // /ice-servers names the three nodes, with a REST credential that allocates on each.
    let ice = ice_servers(&c, r#"{"user":"carol","ttl":600}"#);
    let urls = ice_urls(&ice);
    for n in [&a, &b, &c] {
        assert!(urls.contains(&udp_url(n)), "{urls:?}");
    }
    assert_eq!(ice["nodes"], serde_json::json!(all));
    let (user, cred) =
        (ice["iceServers"][0]["username"].as_str().unwrap(), ice["iceServers"][0]["credential"].as_str().unwrap());
    assert!(user.ends_with(":carol"), "{user}");
    for n in [&a, &b, &c] {
        Client::new(n.relay.addr, user, cred, REALM).try_allocate().unwrap();
    }
    // The TTL is bounded by ice-servers-max-ttl (default one day); bad bodies are 400s.
    assert_eq!(ice_servers(&a, r#"{"user":"x","ttl":999999999}"#)["ttl"], 86400);
    assert_eq!(http("POST", a.admin, "/ice-servers", Some(r#"{"user":"x"}"#)).0, 400);
    assert_eq!(http("POST", a.admin, "/ice-servers", Some(r#"{"user":"x","ttl":60,"transports":["sctp"]}"#)).0, 400);

    // Revoke on node C ends alice's allocations on A and B (and only hers).
    let mut on_a = allocate(&a, "alice", "a");
    let mut on_b = allocate(&b, "alice", "a");
    let mut bob = allocate(&b, "bob", "b");
    let sessions = a.get("/sessions?fleet=1");
    println!("GET /sessions?fleet=1 on node-a: {sessions}");
    assert_eq!(sessions["missing"], 0);
    assert_eq!(sessions["nodes"], serde_json::json!({"node-a": 2, "node-b": 3, "node-c": 1}), "{sessions}");
    let alice_on_b = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["user"] == "alice" && s["node"] == "node-b")
        .count();
    assert_eq!(alice_on_b, 1, "{sessions}");
    let (status, body) = http("DELETE", c.admin, "/users/alice/sessions", None);
    println!("DELETE /users/alice/sessions on node-c: {body}");
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["revoked"], 2, "{body}");
    assert_eq!(v["nodes"], serde_json::json!({"node-a": 1, "node-b": 1, "node-c": 0}), "{body}");
    assert!(refresh_until_gone(&mut on_a).unwrap_err().contains("437"));
    assert!(refresh_until_gone(&mut on_b).unwrap_err().contains("437"));
    assert_eq!(bob.try_refresh(600), Ok(600));
    // The CLI goes through the same route: bob's allocation on B ends from node C.
    let (code, out, err) = uturn_cli(&["admin", "--admin-url", &format!("http://{}", c.admin), "revoke", "bob"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"node-b\":1") && out.contains("\"revoked\":1"), "{out}");
    assert!(refresh_until_gone(&mut bob).unwrap_err().contains("437"));

    // A killed node leaves /fleet and /ice-servers within its entry's TTL (3 s) plus a heartbeat.
    b.relay.signal("KILL");
    let killed = Instant::now();
    let gone = wait_until(Duration::from_secs(8), || a.fleet_ids() == ["node-a", "node-c"]);
    let took = gone.unwrap_or_else(|| panic!("node-b still listed: {:?}", a.fleet_ids()));
    println!("node-b left node-a's /fleet {:.1} s after SIGKILL", killed.elapsed().as_secs_f64());
    assert!(took <= Duration::from_millis(4500), "{took:?}");
    let urls = ice_urls(&ice_servers(&c, r#"{"user":"carol","ttl":60}"#));
    assert!(!urls.contains(&udp_url(&b)) && urls.contains(&udp_url(&a)), "{urls:?}");
    // A revoke with a node gone counts the live ones only.
    let (status, body) = http("DELETE", a.admin, "/users/nobody/sessions", None);
    assert_eq!(status, 200);
    assert_eq!(json(&body)["nodes"], serde_json::json!({"node-a": 0, "node-c": 0}), "{body}");
}

#[test]
fn a_node_at_its_budget_redirects_to_the_least_loaded_node() {
    let redis = RedisServer::start();
    let url = redis.url();
    // Each node's budget is 3 allocations.
    let budget = "total-quota = 3\n";
    let a = Node::start("node-a", Some(&url), budget, &["--rfc5766-channels"]);
    let b = Node::start("node-b", Some(&url), budget, &["--rfc5766-channels"]);
    let c = Node::start("node-c", Some(&url), budget, &["--rfc5766-channels"]);
    // A full (3 of 3), B at 2 of 3, C at 1 of 3: C is the least loaded.
    let _held: Vec<Client> = [(&a, 3), (&b, 2), (&c, 1)]
        .into_iter()
        .flat_map(|(n, k)| (0..k).map(move |_| allocate(n, "fill", "f")))
        .collect();
    let published = wait_until(Duration::from_secs(6), || {
        let (ea, eb, ec) = (a.entry("node-a").unwrap(), a.entry("node-b"), a.entry("node-c"));
        ea["over_budget"] == true
            && eb.is_some_and(|e| e["allocations"] == 2)
            && ec.is_some_and(|e| e["allocations"] == 1 && e["over_budget"] == false)
    });
    assert!(published.is_some(), "{}", a.get("/fleet"));
    println!("GET /fleet on node-a: {}", a.get("/fleet"));

    // The raw client: a signed 300 naming node C, then an allocation there that relays.
    let mut client = Client::new(a.relay.addr, "alice", "a", REALM);
    let alternate = allocate_or_redirect(&mut client, "alice", "a").unwrap_err();
    assert_eq!(alternate, c.relay.addr, "the least loaded live node");
    assert!(a.relay.log().contains("Allocate redirected (300)"), "{}", a.relay.log());
    let mut moved = Client::new(alternate, "alice", "a", REALM);
    moved.try_allocate().unwrap();
    let peer = peer_socket();
    assert_eq!(moved.channel_bind(0x4001, peer.local_addr().unwrap()).code(), None);
    moved.send_channel_data(0x4001, b"after the redirect");
    let mut buf = [0u8; 64];
    let (n, _) = peer.recv_from(&mut buf).expect("relayed by node C");
    assert_eq!(&buf[..n], b"after the redirect");

    // Now C holds 2 like B: the tie goes by allocations, then relayed bits, then node id; fill
    // C so B is the only node within budget, and wait until A sees it.
    let _more = allocate(&c, "fill", "f");
    assert!(
        wait_until(Duration::from_secs(6), || a.entry("node-c").is_some_and(|e| e["over_budget"] == true)).is_some(),
        "{}",
        a.get("/fleet")
    );
    // coturn's turnutils_uclient follows the 300 from A to B and relays there, every message.
    let (_peer_guard, peer_port) = uturn_tests::start_turnutils_peer();
    let mut cmd = Command::new("turnutils_uclient");
    cmd.args([
        "-u",
        "bob",
        "-w",
        "b",
        "-p",
        &a.relay.addr.port().to_string(),
        "-n",
        "20",
        "-l",
        "120",
        "-m",
        "1",
        "-c",
    ])
    .args(["-e", "127.0.0.1", "-r", &peer_port.to_string(), "127.0.0.1"]);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(ok, "turnutils_uclient failed:\n{out}\n--- node-a ---\n{}", a.relay.log());
    assert!(out.contains("Total lost packets 0 (0.000000%)"), "{out}");
    let log_b = b.relay.log();
    assert!(log_b.contains("user=bob") && log_b.contains("allocation granted"), "bob allocated on node B:\n{log_b}");
    assert!(!c.relay.log().contains("user=bob"), "never to a node over budget");

    // Nothing is within budget any more: A answers 486 as a lone node would (no loop).
    let mut last = Vec::new();
    while b.entry("node-b").unwrap()["allocations"].as_u64().unwrap() < 3 {
        last.push(allocate(&b, "fill", "f"));
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert!(
        wait_until(Duration::from_secs(6), || a.entry("node-b").is_some_and(|e| e["over_budget"] == true)).is_some()
    );
    let mut late = Client::new(a.relay.addr, "alice", "a", REALM);
    let err = late.try_allocate().unwrap_err();
    assert!(err.contains("486"), "{err}");
}

#[test]
fn redis_killed_mid_run_stalls_no_node() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let nodes: Vec<Node> =
        ["node-a", "node-b", "node-c"].into_iter().map(|id| Node::start(id, Some(&url), "", &[])).collect();
    for n in &nodes {
        assert!(wait_until(Duration::from_secs(5), || n.fleet_ids().len() == 3).is_some());
    }
    let peer = peer_socket();
    let clients: Vec<Client> = nodes
        .iter()
        .map(|n| {
            let c = allocate(n, "alice", "a");
            assert_eq!(c.channel_bind(0x4001, peer.local_addr().unwrap()).code(), None);
            c
        })
        .collect();
    redis.kill();
    // Relaying goes on during the outage, every datagram counted per node, and so does
    // allocating; the admin endpoint answers at once.
    let start = Instant::now();
    let mut relayed = [0u32; 3];
    for round in 0..30u8 {
        for (i, c) in clients.iter().enumerate() {
            c.send_channel_data(0x4001, &[round, i as u8]);
            let mut buf = [0u8; 16];
            let (n, _) = peer.recv_from(&mut buf).expect("relayed while Redis is down");
            assert_eq!(&buf[..n], &[round, i as u8]);
            relayed[i] += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(relayed, [30; 3]);
    for n in &nodes {
        let t = Instant::now();
        allocate(n, "bob", "b");
        assert!(t.elapsed() < Duration::from_secs(1), "Allocate on {} took {:?}", n.id, t.elapsed());
        let t = Instant::now();
        assert_eq!(http("GET", n.admin, "/health", None).0, 200);
        assert!(t.elapsed() < Duration::from_millis(500));
        let v = n.get("/fleet");
        assert_eq!((v["redis"].as_str(), v["nodes"].as_array().unwrap().len()), (Some("down"), 1), "{v}");
        // Revoke falls back to this node and says so.
        let (status, body) = http("DELETE", n.admin, "/users/bob/sessions", None);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"revoked\":1") && body.contains("fleet_error"), "{body}");
        let log = n.relay.log();
        let warns = log.lines().filter(|l| l.contains("WARN") && l.contains("fleet-redis unreachable")).count();
        assert_eq!(warns, 1, "one WARN on {}:\n{log}", n.id);
        assert!(log.contains("fleet registry: no registry"), "the registry noticed:\n{log}");
    }
    println!(
        "Redis down for {:.1} s: relayed {relayed:?} datagrams per node, allocated on each",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn without_redis_a_static_alternate_server_list_is_used_in_turn() {
    let config = "total-quota = 1\nalternate-server = [\"127.0.0.1:3001\", \"127.0.0.1:3002\", \"[::1]:3003\"]\n";
    let node = Node::start("lone", None, config, &[]);
    let _held = allocate(&node, "fill", "f");
    let picks: Vec<u16> = (0..4)
        .map(|_| {
            let mut c = Client::new(node.relay.addr, "alice", "a", REALM);
            allocate_or_redirect(&mut c, "alice", "a").unwrap_err().port()
        })
        .collect();
    assert_eq!(picks, [3001, 3002, 3001, 3002], "in turn, IPv4 only for an IPv4 request");
    // /fleet lists this node alone; /ice-servers names its URL.
    let v = node.get("/fleet");
    assert_eq!((v["fleet"].as_bool(), v["redis"].as_str()), (Some(false), Some("off")));
    assert!(wait_until(Duration::from_secs(3), || node.get("/fleet")["nodes"][0]["over_budget"] == true).is_some());
    let ice = ice_servers(&node, r#"{"user":"x","ttl":60,"transports":["udp"]}"#);
    assert_eq!(ice_urls(&ice), [udp_url(&node)]);
    // SIGHUP with a new secret only: /ice-servers mints from it, and the node accepts it.
    let rotated = format!("{config}{}", CONFIG.replace("fleet-secret", "rotated-secret"));
    std::fs::write(node.relay.config_path(), rotated).unwrap();
    node.relay.signal("HUP");
    assert!(node.relay.wait_log("credentials reloaded", Duration::from_secs(5)), "{}", node.relay.log());
    let ice = ice_servers(&node, r#"{"user":"x","ttl":60,"transports":["udp"]}"#);
    let (user, cred) =
        (ice["iceServers"][0]["username"].as_str().unwrap(), ice["iceServers"][0]["credential"].as_str().unwrap());
    let mut c = Client::new(node.relay.addr, user, cred, REALM);
    // The node is full: a verified request is redirected (300), a wrong credential would be 401.
    assert!(allocate_or_redirect(&mut c, user, cred).is_err());
    // The flag repeats too, and a single value still works.
    let one = Node::start("one", None, "total-quota = 1\n", &["--alternate-server", "127.0.0.1:3009"]);
    let _held = allocate(&one, "fill", "f");
    let mut c = Client::new(one.relay.addr, "alice", "a", REALM);
    assert_eq!(allocate_or_redirect(&mut c, "alice", "a").unwrap_err().port(), 3009);
    // No list, no fleet: 486 as before.
    let plain = Node::start("plain", None, "total-quota = 1\n", &[]);
    let _held = allocate(&plain, "fill", "f");
    let err = Client::new(plain.relay.addr, "alice", "a", REALM).try_allocate().unwrap_err();
    assert!(err.contains("486"), "{err}");
}

#[test]
fn chromium_calls_with_the_ice_servers_answer_as_is() {
    let redis = RedisServer::start();
    let url = redis.url();
    let nodes: Vec<Node> =
        ["node-a", "node-b", "node-c"].into_iter().map(|id| Node::start(id, Some(&url), "", &[])).collect();
    assert!(wait_until(Duration::from_secs(5), || nodes[0].fleet_ids().len() == 3).is_some());
    let (status, answer) =
        http("POST", nodes[0].admin, "/ice-servers", Some(r#"{"user":"browser","ttl":300,"transports":["udp"]}"#));
    assert_eq!(status, 200, "{answer}");
    println!("POST /ice-servers: {answer}");
    assert_eq!(ice_urls(&json(&answer)).len(), 3);
    let file = uturn_tests::tempfile_lite::TempFile::new("rtc.json", &answer);
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/browser_call.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(python);
    cmd.arg(script).args(["--host", "127.0.0.1", "--timeout", "40", "--rtc-config"]).arg(&file.0);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(45));
    let logs: String = nodes.iter().map(|n| format!("--- {} ---\n{}", n.id, n.relay.log())).collect();
    assert!(ok, "the browser call failed:\n{out}\n{logs}");
    assert!(out.contains("browser call over udp: ok"), "{out}");
    for line in out.lines().filter(|l| l.starts_with("browser call") || l.starts_with("connect time")) {
        println!("{line}");
    }
    // The browser's allocations used the minted REST username.
    assert!(logs.contains(":browser"), "{logs}");
}
