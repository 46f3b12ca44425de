//! The live status page (`GET /` on the admin endpoint) and the Grafana dashboard
//! (docs/grafana/uturn.json), against the started binary with traffic flowing.
//!
//! - The status page in Debian's headless Chromium (`tests/python/status_page.py`, driven over
//!   the DevTools pipe like the browser call): its counts lie between two `/metrics` scrapes
//!   taken around the page's refresh, a session's timeline tells allocate → permission →
//!   channel → refresh → end with its traffic, the token travels in the URL fragment only, a
//!   user name with markup stays text. The screenshot goes to `target/artifacts/status-page.png`
//!   (CI keeps it).
//! - The endpoint itself: the static files need no token, the data does; a Host that is not
//!   loopback is refused without a token.
//! - The Grafana dashboard: every metric its PromQL queries name is in a real scrape.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uturn_tests::{peer_socket, run_with_timeout, Client, Relay};

const TOKEN: &str = "status-page-test-token";
const HTML_USER: &str = "<i>mallory</i>";

fn free_tcp_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// One HTTP/1.1 GET with extra header lines; returns (status, content type, body).
fn get(addr: SocketAddr, path: &str, headers: &[String]) -> (u16, String, String) {
    // The endpoints start just after the workers answer: wait for the listener (at most 5 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("connect {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(s, "GET {path} HTTP/1.1\r\n{extra}Connection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let ct = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_string))
        .unwrap_or_default();
    (status, ct, body.to_string())
}

/// A UDP peer that echoes every datagram back, until `stop`.
fn echo_peer(stop: Arc<AtomicBool>) -> (SocketAddr, JoinHandle<()>) {
    let peer = peer_socket();
    peer.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let addr = peer.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((n, from)) = peer.recv_from(&mut buf) {
                let _ = peer.send_to(&buf[..n], from);
            }
        }
    });
    (addr, h)
}

/// A client with an allocation, a permission and channel 0x4001 to `peer`, refreshed once.
fn client_with_channel(relay: SocketAddr, user: &str, peer: SocketAddr) -> Client {
    let mut c = Client::new(relay, user, &format!("{user}-pw"), "uturn.local");
    c.allocate();
    assert_eq!(c.create_permission(&[peer]).code(), None, "{user}: CreatePermission");
    assert_eq!(c.channel_bind(0x4001, peer).code(), None, "{user}: ChannelBind");
    assert_eq!(c.refresh(600).code(), None, "{user}: Refresh");
    c
}

/// Media-like traffic from the live clients: ChannelData and Send indications to `peer`
/// (echoed back), and Send indications to a peer without a permission (no_permission drops),
/// every 20 ms, until `stop` (at most 120 s).
fn traffic(clients: Vec<Client>, peer: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    // Permissions are per IP (RFC 8656 §9): another loopback IP has none.
    let unpermitted: SocketAddr = "127.0.0.2:9".parse().unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut i = 0u32;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            for c in &clients {
                c.send_channel_data(0x4001, &[i as u8; 160]);
                if i.is_multiple_of(5) {
                    c.send_indication(peer, &[1; 100]);
                    c.send_indication(unpermitted, &[2; 100]);
                }
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

fn user_args() -> Vec<String> {
    ["demo", "carol", HTML_USER].iter().flat_map(|u| ["--user".to_string(), format!("{u}:{u}-pw")]).collect()
}

fn artifact(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    target.join("artifacts").join(name)
}

#[test]
fn status_page_in_chromium_matches_metrics_while_traffic_flows() {
    let (admin, metrics) = (free_tcp_addr(), free_tcp_addr());
    let mut args: Vec<String> = vec![
        "--admin-listen".into(),
        admin.to_string(),
        "--admin-token".into(),
        TOKEN.into(),
        "--metrics-listen".into(),
        metrics.to_string(),
    ];
    args.extend(user_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = Relay::start("uring", "", &args);
    let stop = Arc::new(AtomicBool::new(false));
    let (peer, echo) = echo_peer(stop.clone());

    // A session that ends: allocate, permission, channel, refresh, traffic, Refresh 0.
    let carol = client_with_channel(relay.addr, "carol", peer);
    for i in 0..20u8 {
        carol.send_channel_data(0x4001, &[i; 100]);
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(carol.refresh(0).code(), None, "Refresh 0");
    // Live sessions: two with media, one whose user name is markup, with a 403 on its timeline
    // (the relay's own listen address is no peer).
    let live = vec![client_with_channel(relay.addr, "demo", peer), client_with_channel(relay.addr, "demo", peer)];
    let mut html = Client::new(relay.addr, HTML_USER, &format!("{HTML_USER}-pw"), "uturn.local");
    html.allocate();
    assert_eq!(html.create_permission(&[peer]).code(), None);
    assert_eq!(html.create_permission(&[relay.addr]).code(), Some(403));
    let sender = traffic(live, peer, stop.clone());
    // A few seconds of samples for the charts.
    std::thread::sleep(Duration::from_secs(4));

    let shot = artifact("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/status_page.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .args(["--admin", &format!("http://{admin}"), "--token", TOKEN])
        .args(["--metrics", &format!("http://{metrics}/metrics")])
        .args(["--expect-sessions", "3", "--ended-user", "carol", "--html-user", HTML_USER])
        .arg("--screenshot")
        .arg(&shot);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    echo.join().unwrap();
    drop(html);
    println!("{out}");
    assert!(
        ok && out.contains("status page: ok"),
        "status page check failed:\n{out}\n--- uturn log ---\n{}",
        relay.log()
    );
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000, "{} bytes", png.len());
    eprintln!("status page screenshot: {}", shot.display());
}

#[test]
fn status_data_needs_the_token_and_the_page_does_not() {
    let admin = free_tcp_addr();
    let relay = Relay::start("epoll", "", &["--admin-listen", &admin.to_string(), "--admin-token", TOKEN]);
    let host = format!("Host: {admin}");
    let bearer = format!("Authorization: Bearer {TOKEN}");
    // The page and its files hold no data: served without the token, with their types.
    for (path, ct) in [("/", "text/html"), ("/status.css", "text/css"), ("/status.js", "text/javascript")] {
        let (status, got, body) = get(admin, path, std::slice::from_ref(&host));
        assert_eq!((status, got.starts_with(ct)), (200, true), "{path}: {got}");
        assert!(!body.is_empty() && !body.contains(TOKEN));
    }
    for path in ["/status.json", "/timeline", "/timeline/ended", "/sessions"] {
        assert_eq!(get(admin, path, std::slice::from_ref(&host)).0, 401, "{path} without the token");
        assert_eq!(get(admin, path, &[host.clone(), "Authorization: Bearer wrong".into()]).0, 401, "{path}");
        let (status, ct, body) = get(admin, path, &[host.clone(), bearer.clone()]);
        assert_eq!((status, ct.as_str()), (200, "application/json"), "{path}: {body}");
        let _: serde_json::Value = serde_json::from_str(&body).expect(path);
    }
    let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
    c.allocate();
    let (_, _, body) = get(admin, "/status.json", &[host.clone(), bearer.clone()]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["node"]["workers"], 2, "{v}");
    assert_eq!(v["node"]["backend"], "epoll");
    assert_eq!(v["node"]["xdp"], "off");
    assert!(v["node"]["listeners"][0].as_str().unwrap().contains(&relay.addr.to_string()), "{v}");
    let (_, _, body) = get(admin, "/timeline", &[host.clone(), bearer.clone()]);
    let t: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(t["sessions"][0]["user"], "demo", "{t}");
    assert!(t["sessions"][0]["end"].is_null());
    let id = t["sessions"][0]["id"].as_u64().unwrap();
    let (status, _, one) = get(admin, &format!("/timeline/{id}"), &[host.clone(), bearer.clone()]);
    assert_eq!((status, serde_json::from_str::<serde_json::Value>(&one).unwrap()), (200, t["sessions"][0].clone()));
    let (_, _, ended) = get(admin, "/timeline/ended", &[host.clone(), bearer.clone()]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&ended).unwrap()["sessions"], serde_json::json!([]));
    assert_eq!(c.refresh(0).code(), None);
    std::thread::sleep(Duration::from_millis(200));
    let (_, _, ended) = get(admin, "/timeline/ended", &[host.clone(), bearer.clone()]);
    let ended: serde_json::Value = serde_json::from_str(&ended).unwrap();
    assert_eq!(
        (ended["sessions"][0]["id"].as_u64(), &ended["sessions"][0]["end"]["reason"]),
        (Some(id), &serde_json::json!("deleted")),
        "{ended}"
    );
    assert_eq!(get(admin, "/timeline/999", &[host.clone(), bearer.clone()]).0, 404);
    assert_eq!(get(admin, "/timeline/x", &[host.clone(), bearer]).0, 404);
    drop(relay);

    // Without a token: loopback Host only, for the page as for the data.
    let admin = free_tcp_addr();
    let _relay = Relay::start("epoll", "", &["--admin-listen", &admin.to_string()]);
    assert_eq!(get(admin, "/", &[format!("Host: {admin}")]).0, 200);
    assert_eq!(get(admin, "/status.json", &[format!("Host: {admin}")]).0, 200);
    for path in ["/", "/status.js", "/status.json"] {
        assert_eq!(get(admin, path, &[format!("Host: evil.example:{}", admin.port())]).0, 403, "{path}");
    }
}

/// The metric names a PromQL expression reads: identifiers that are not functions (followed
/// by `(`), keywords, label names (inside `{}` or a `by`/`without` list), ranges, strings or
/// `$variables`.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    // Keywords, and aggregation operators (they need not be followed by `(`: `sum by (x) (…)`).
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
    ];
    let b = expr.as_bytes();
    let mut out = BTreeSet::new();
    let (mut i, mut depth_brace, mut depth_bracket) = (0, 0, 0);
    let mut grouping = false; // inside the parentheses after by/without/on/ignoring
    while i < b.len() {
        let c = b[i] as char;
        match c {
            '"' | '\'' => {
                i += 1;
                while i < b.len() && b[i] as char != c {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' => (depth_brace, i) = (depth_brace + 1, i + 1),
            '}' => (depth_brace, i) = (depth_brace - 1, i + 1),
            '[' => (depth_bracket, i) = (depth_bracket + 1, i + 1),
            ']' => (depth_bracket, i) = (depth_bracket - 1, i + 1),
            ')' if grouping => (grouping, i) = (false, i + 1),
            '$' => {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut j = i;
                while j < b.len() && b[j] == b' ' {
                    j += 1;
                }
                let call = j < b.len() && b[j] == b'(';
                if ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&word) {
                    grouping = call;
                    if call {
                        i = j + 1;
                    }
                } else if depth_brace == 0
                    && depth_bracket == 0
                    && !grouping
                    && !call
                    && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
                {
                    out.insert(word.to_string());
                }
            }
            c if c.is_ascii_digit() => {
                // A number, or a duration such as 5m.
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Every PromQL query in a Grafana dashboard: panel targets' `expr` and templating queries.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) if s.contains("uturn_") => {
                        // label_values(METRIC, label): the metric (a selector) is the query.
                        match s.strip_prefix("label_values(").and_then(|r| r.split_once(',')) {
                            Some((metric, _)) => out.push(metric.to_string()),
                            None => out.push(s.clone()),
                        }
                    }
                    _ => dashboard_queries(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

/// What a scrape holds: series names of the samples, and each family's TYPE.
fn scrape_names(text: &str) -> (BTreeSet<String>, HashMap<String, String>) {
    let mut samples = BTreeSet::new();
    let mut types = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(n), Some(t)) = (parts.next(), parts.next()) {
                types.insert(n.to_string(), t.to_string());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_string());
        }
    }
    (samples, types)
}

/// The names of `wanted` a scrape lacks: a name must be a sample's series name, of a family
/// with a TYPE line: its own, or for `_bucket`, `_sum` and `_count` a histogram's (or summary's).
fn missing(wanted: &BTreeSet<String>, text: &str) -> Vec<String> {
    let (samples, types) = scrape_names(text);
    wanted
        .iter()
        .filter(|m| {
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| m.strip_suffix(s));
            let histogram =
                base.is_some_and(|b| matches!(types.get(b).map(String::as_str), Some("histogram" | "summary")));
            !samples.contains(*m) || !(types.contains_key(*m) || histogram)
        })
        .cloned()
        .collect()
}

#[test]
fn promql_names_are_told_from_functions_labels_and_ranges() {
    let names = promql_metrics(
        r#"histogram_quantile(0.99, sum by (le) (rate(uturn_allocate_latency_seconds_bucket{instance=~"$instance"}[$__rate_interval])))"#,
    );
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["uturn_allocate_latency_seconds_bucket"]);
    let names = promql_metrics(
        r#"sum without (worker) (rate(uturn_drops_total{reason!="x"}[5m])) / on(instance) group_left uturn_build_info * 8"#,
    );
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["uturn_build_info", "uturn_drops_total"]);
    let scrape = "# TYPE uturn_a histogram\nuturn_a_bucket{le=\"1\"} 1\nuturn_a_count 1\n# TYPE uturn_b gauge\nuturn_b_count 1\n# TYPE uturn_d_count gauge\nuturn_d_count 2\n";
    let wanted: BTreeSet<String> =
        ["uturn_a_bucket", "uturn_a_count", "uturn_a_sum", "uturn_b_count", "uturn_c", "uturn_d_count"]
            .map(String::from)
            .into();
    assert_eq!(missing(&wanted, scrape), ["uturn_a_sum", "uturn_b_count", "uturn_c"]);
}

#[test]
fn grafana_dashboard_queries_only_metrics_a_real_scrape_has() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/uturn.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("docs/grafana/uturn.json")).expect("valid JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let wanted: BTreeSet<String> = queries.iter().flat_map(|q| promql_metrics(q)).collect();
    assert!(wanted.len() >= 15, "the dashboard queries only {wanted:?}");
    assert!(wanted.iter().all(|m| m.starts_with("uturn_")), "{wanted:?}");
    let panels = dashboard["panels"].as_array().expect("panels");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().map_or(0, Vec::len);
        assert!(targets > 0, "panel {} has no query", p["title"]);
    }

    // A real scrape, with traffic relayed, so counters and histograms have samples.
    let metrics = free_tcp_addr();
    let relay = Relay::start("epoll", "", &["--metrics-listen", &metrics.to_string()]);
    let peer = peer_socket();
    let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
    c.allocate();
    assert_eq!(c.channel_bind(0x4001, peer.local_addr().unwrap()).code(), None);
    let mut buf = [0u8; 1500];
    for i in 0..10u8 {
        c.send_channel_data(0x4001, &[i; 100]);
        let (n, from) = peer.recv_from(&mut buf).expect("relayed to the peer");
        peer.send_to(&buf[..n], from).unwrap();
        c.recv().expect("relayed back");
    }
    let _ = UdpSocket::bind("127.0.0.1:0").unwrap().send_to(b"not turn", relay.addr);
    std::thread::sleep(Duration::from_millis(1200));
    let (status, _, text) = get(metrics, "/metrics", &[format!("Host: {metrics}")]);
    assert_eq!(status, 200);
    assert!(text.contains("uturn_packets_relayed_total{worker="), "{text}");
    let absent = missing(&wanted, &text);
    assert!(absent.is_empty(), "the dashboard queries metrics a scrape does not have: {absent:?}\n{text}");
    println!("dashboard: {} metrics, all in the scrape: {wanted:?}", wanted.len());
}
