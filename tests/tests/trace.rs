//! `uturn trace` against the started binary: traces by user, session and client see the
//! decoded exchanges; the relay flags one-way media, permission-less Send, retransmissions,
//! NAT rebinding and stopped refreshes; the caps (concurrent traces, rate) and the token hold;
//! and Wireshark (tshark) decodes the pcapng with no malformed frame or expert warning and as
//! many STUN messages as the trace streamed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use uturn_tests::uturn_proto::wire::{attr, Method, TransactionId};
use uturn_tests::{peer_socket, uturn_bin, Client, Guard, Relay, BACKENDS};

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A relay with an admin endpoint (and `extra` arguments); returns it and the endpoint.
fn relay(backend: &str, config: &str, extra: &[&str]) -> (Relay, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let mut args = vec!["--admin-listen".to_string(), admin.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Relay::start(backend, config, &args), admin)
}

/// A running `uturn trace --json`, its lines collected by a thread.
struct Trace {
    child: Guard,
    lines: Arc<Mutex<Vec<Value>>>,
    stderr: PathBuf,
}

impl Trace {
    /// Starts `uturn trace --admin http://ADMIN --json ARGS` and waits for its start line.
    fn start(admin: SocketAddr, args: &[&str]) -> Trace {
        let stderr =
            std::env::temp_dir().join(format!("uturn-trace-{}-{}.err", std::process::id(), rand::random::<u32>()));
        let mut child = Command::new(uturn_bin())
            .args(["trace", "--admin", &format!("http://{admin}"), "--json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn uturn trace");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    l.lock().unwrap().push(v);
                }
            }
        });
        let t = Trace { child: Guard(child), lines, stderr };
        t.wait(|v| v["type"] == "start", "the start line");
        t
    }

    /// Waits (at most 10 s) for a line matching `f`; returns it.
    fn wait(&self, f: impl Fn(&Value) -> bool, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(v) = self.lines.lock().unwrap().iter().find(|v| f(v)) {
                return v.clone();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no {what} in the trace:\n{}\nstderr: {}", self.dump(), self.err());
    }

    fn all(&self, f: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.lines.lock().unwrap().iter().filter(|v| f(v)).cloned().collect()
    }

    fn dump(&self) -> String {
        self.lines.lock().unwrap().iter().map(|v| format!("{v}\n")).collect()
    }

    fn err(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (at most 20 s) for the process to exit; its exit code.
    fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.0.try_wait() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(200));
                return st.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("uturn trace did not end:\n{}", self.dump());
    }
}

fn is_msg(v: &Value, method: &str, class: &str) -> bool {
    v["type"] == "message" && v["method"] == method && v["class"] == class
}

fn attr_value(v: &Value, name: &str) -> Option<String> {
    let a = v["attributes"].as_array()?.iter().find(|a| a["name"] == name)?;
    Some(a["value"].as_str().map_or_else(|| a["value"].to_string(), String::from))
}

fn flag(t: &Trace, name: &str) -> Value {
    t.wait(|v| v["type"] == "flag" && v["flag"] == name, &format!("{name} flag"))
}

/// A raw `GET path` on the admin endpoint; returns the status and whatever body came within
/// `read_for`, and the open stream.
fn get(admin: SocketAddr, path: &str, token: Option<&str>, read_for: Duration) -> (u16, String, TcpStream) {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(read_for)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "GET {path} HTTP/1.1\r\nHost: {admin}\r\n{auth}\r\n").unwrap();
    let mut buf = vec![0u8; 4096];
    let mut text = String::new();
    let deadline = Instant::now() + read_for;
    while Instant::now() < deadline && !text.contains("\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text, s)
}

/// tshark's verdict on a pcapng: (frames, frames with STUN message headers, frames
/// dissected as STUN or ChannelData, frames malformed or with an expert warning or error).
fn tshark(pcap: &Path) -> (usize, usize, usize, String) {
    let count = |filter: &str| -> (usize, String) {
        let out = Command::new("tshark")
            .args(["-n", "-r"])
            .arg(pcap)
            .args(["-Y", filter])
            .output()
            .expect("tshark (Debian package tshark) is installed");
        assert!(out.status.success(), "tshark failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.lines().count(), text)
    };
    let (frames, _) = count("frame");
    let (stun, _) = count("stun.type");
    let (any, _) = count("stun");
    let (bad, text) = count("_ws.malformed || _ws.expert.severity >= warning");
    (frames, stun, any, if bad == 0 { String::new() } else { text })
}

#[test]
fn trace_by_user_decodes_exchanges_flags_and_writes_a_pcap_tshark_accepts() {
    for backend in BACKENDS {
        let (relay, admin) = relay(backend, "", &["--deny-peer", "127.0.0.99/32"]);
        let pcap = std::env::temp_dir().join(format!("uturn-trace-{backend}-{}.pcapng", std::process::id()));
        let mut t = Trace::start(admin, &["--user", "demo", "--duration", "14", "--pcap", pcap.to_str().unwrap()]);
        let peer = peer_socket();
        let peer_addr = peer.local_addr().unwrap();
        let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
        let relayed = c.allocate();
        assert_eq!(c.create_permission(&[peer_addr]).code(), None);
        assert_eq!(c.channel_bind(0x4001, peer_addr).code(), None);
        assert_eq!(c.refresh(600).code(), None);
        let denied: SocketAddr = "127.0.0.99:5000".parse().unwrap();
        assert_eq!(c.create_permission(&[denied]).code(), Some(403));
        for i in 0..5u8 {
            c.send_channel_data(0x4001, &[i; 100]);
            let mut buf = [0u8; 1500];
            let (n, from) = peer.recv_from(&mut buf).expect("the peer receives the relayed data");
            peer.send_to(&buf[..n], from).unwrap();
            assert!(c.recv().is_some(), "the echo comes back");
        }

        // The exchanges, decoded.
        let challenge = t.wait(|v| is_msg(v, "Allocate", "error"), "Allocate 401");
        assert_eq!(challenge["error"]["code"], 401, "{challenge}");
        assert!(challenge["error"]["meaning"].as_str().unwrap().contains("the challenge"), "{challenge}");
        let ok = t.wait(|v| is_msg(v, "Allocate", "success"), "Allocate success");
        assert_eq!(attr_value(&ok, "XOR-RELAYED-ADDRESS"), Some(relayed.to_string()), "{ok}");
        assert_eq!(attr_value(&ok, "XOR-MAPPED-ADDRESS"), Some(local_of(&c)), "{ok}");
        let session = ok["session"].as_u64().unwrap();
        assert!(session > 0 && ok["user"] == "demo", "{ok}");
        let cp = t.wait(|v| is_msg(v, "CreatePermission", "request") && v["session"] == session, "CreatePermission");
        assert_eq!(attr_value(&cp, "XOR-PEER-ADDRESS"), Some(peer_addr.to_string()), "{cp}");
        t.wait(|v| is_msg(v, "CreatePermission", "success"), "CreatePermission success");
        let cb = t.wait(|v| is_msg(v, "ChannelBind", "request"), "ChannelBind");
        assert_eq!(attr_value(&cb, "CHANNEL-NUMBER").as_deref(), Some("0x4001"), "{cb}");
        assert_eq!(attr_value(&cb, "XOR-PEER-ADDRESS"), Some(peer_addr.to_string()), "{cb}");
        t.wait(|v| is_msg(v, "ChannelBind", "success"), "ChannelBind success");
        let refresh = t.wait(|v| is_msg(v, "Refresh", "success"), "Refresh success");
        assert_eq!(attr_value(&refresh, "LIFETIME").as_deref(), Some("600"), "{refresh}");
        let forbidden = t.wait(|v| is_msg(v, "CreatePermission", "error"), "403");
        assert_eq!(forbidden["error"]["code"], 403);
        let meaning = forbidden["error"]["meaning"].as_str().unwrap();
        assert!(meaning.starts_with("peer address denied by policy: 127.0.0.99"), "{meaning}");
        // Traffic each way on the channel, once a second.
        t.wait(
            |v| {
                v["type"] == "traffic"
                    && v["channel"] == "0x4001"
                    && v["total_to_peer"]["packets"] == 5
                    && v["total_to_client"]["packets"] == 5
                    && v["total_to_peer"]["bytes"] == 500
            },
            "traffic 5/5 on channel 0x4001",
        );

        // Send to a peer without permission: dropped and flagged.
        let stranger: SocketAddr = "127.0.0.2:9".parse().unwrap(); // permissions are per IP
        c.send_indication(stranger, b"no permission");
        let f = flag(&t, "dropped-no-permission");
        assert_eq!(f["session"], session, "{f}");
        let dropped = t.wait(|v| v["dropped"] == "no permission" && v["method"] == "Send", "the dropped Send");
        assert_eq!(dropped["peer"], stranger.to_string());

        // A retransmitted request (the same transaction ID twice).
        let tid = TransactionId(rand::random());
        let req = c.signed_request(Method::REFRESH, tid, |w| w.u32(attr::LIFETIME, 600).map(drop));
        c.send_raw(&req);
        std::thread::sleep(Duration::from_millis(100));
        c.send_raw(&req);
        let f = flag(&t, "retransmission");
        assert!(f["detail"].as_str().unwrap().contains("Refresh"), "{f}");

        // NAT rebinding: the same user's Refresh from a new 5-tuple with no allocation.
        let mut moved = Client::new(relay.addr, "demo", "demo", "uturn.local");
        moved.learn_nonce();
        assert_eq!(moved.refresh(600).code(), Some(437));
        let f = flag(&t, "nat-rebinding");
        assert!(f["detail"].as_str().unwrap().contains(&format!("session {session}")), "{f}");
        let mismatch = t.wait(|v| is_msg(v, "Refresh", "error") && v["error"]["code"] == 437, "437");
        assert!(mismatch["error"]["meaning"].as_str().unwrap().contains("rebound"), "{mismatch}");

        // One-way media: ChannelData to a peer that never answers, for more than 3 s.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let silent_addr = silent.local_addr().unwrap();
        assert_eq!(c.channel_bind(0x4002, silent_addr).code(), None);
        for _ in 0..45 {
            c.send_channel_data(0x4002, &[7; 160]);
            std::thread::sleep(Duration::from_millis(100));
        }
        let f = flag(&t, "one-way-media");
        assert_eq!(f["peer"], silent_addr.to_string(), "{f}");
        assert!(f["detail"].as_str().unwrap().starts_with("client → peer only"), "{f}");
        // The other client's traffic is not in this trace.
        let mut other = Client::new(relay.addr, "other", "other", "uturn.local");
        let _ = other.try_allocate();

        assert_eq!(t.wait_exit(), 0, "{}", t.err());
        assert!(t.all(|v| v["type"] == "end").len() == 1, "{}", t.dump());
        assert!(t.all(|v| v["user"] == "other").is_empty(), "another user's session is not traced");
        let messages = t.all(|v| v["type"] == "message" && !v["raw"].as_str().unwrap_or("").is_empty());
        let stun = messages.iter().filter(|v| v["kind"] == "stun").count();
        let (frames, stun_frames, any, bad) = tshark(&pcap);
        println!("--- tshark verdict ({backend}): {frames} frames, {stun_frames} STUN messages, {any} STUN or ChannelData; malformed or warnings: {}", if bad.is_empty() { "none" } else { &bad });
        assert!(bad.is_empty(), "tshark flags frames:\n{bad}");
        assert_eq!(frames, messages.len(), "one frame per traced message");
        assert_eq!(stun_frames, stun, "tshark sees every traced STUN message");
        assert_eq!(any, frames, "every frame decodes as STUN or ChannelData");
        assert!(
            t.err().contains(&format!("{frames} packets ({} STUN messages", stun - sends(&messages))),
            "{}",
            t.err()
        );
        let _ = std::fs::remove_file(&pcap);
    }
}

/// Send and Data indications among `messages` (the CLI counts them as relayed datagrams).
fn sends(messages: &[Value]) -> usize {
    messages.iter().filter(|v| v["method"] == "Send" || v["method"] == "Data").count()
}

#[test]
fn trace_by_session_and_by_client_and_stopped_refreshes() {
    let (relay, admin) = relay("uring", "default-lifetime = 6\n", &[]);
    let peer = peer_socket();
    let peer_addr = peer.local_addr().unwrap();
    let mut a = Client::new(relay.addr, "demo", "demo", "uturn.local");
    let mut b = Client::new(relay.addr, "demo", "demo", "uturn.local");
    a.allocate();
    b.allocate();
    let (_, body, _) = get(admin, "/sessions", None, Duration::from_secs(2));
    let sessions: Vec<Value> = serde_json::from_str(body.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(sessions.len(), 2, "{body}");
    let sa = sessions[0]["id"].as_u64().unwrap();
    let a_client = sessions[0]["client"].as_str().unwrap().to_string();
    let (a, b) = if sessions[0]["client"].as_str() == Some(&local_of(&a)) { (a, b) } else { (b, a) };

    // By session: an allocation made before the trace; the other session is not in it.
    let by_session = Trace::start(admin, &["--session", &sa.to_string(), "--duration", "9"]);
    // By client IP:PORT: the other allocation's 5-tuple.
    let b_local = local_of(&b);
    let by_client = Trace::start(admin, &["--client", &b_local, "--duration", "9"]);
    assert_eq!(a.refresh(6).code(), None);
    assert_eq!(a.create_permission(&[peer_addr]).code(), None);
    assert_eq!(b.channel_bind(0x4005, peer_addr).code(), None);
    let cp = by_session.wait(|v| is_msg(v, "CreatePermission", "success"), "CreatePermission success");
    assert_eq!(cp["client"], a_client);
    let cb = by_client.wait(|v| is_msg(v, "ChannelBind", "success"), "ChannelBind success");
    assert_eq!(cb["client"], b_local);
    // Neither sees the other's.
    std::thread::sleep(Duration::from_millis(300));
    assert!(by_session.all(|v| v["method"] == "ChannelBind").is_empty(), "{}", by_session.dump());
    assert!(by_client.all(|v| v["method"] == "CreatePermission").is_empty(), "{}", by_client.dump());
    // A client that stops refreshing (lifetime 6 s): flagged before the allocation ends.
    let f = flag(&by_session, "refreshes-stopped");
    assert_eq!(f["session"], sa, "{f}");
    assert!(f["detail"].as_str().unwrap().contains("of a 6 s lifetime"), "{f}");
}

/// The client's local address.
fn local_of(c: &Client) -> String {
    // The relay reports the client's address in XOR-MAPPED-ADDRESS; a Binding gives it.
    let r = c.unauthenticated(Method::BINDING, |_| Ok(()));
    r.msg().xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap().to_string()
}

#[test]
fn trace_caps_and_token() {
    let (relay, admin) = relay("uring", "", &["--admin-token", "sesame"]);
    // The token is required.
    let (status, text, _s) = get(admin, "/trace?user=demo", None, Duration::from_secs(2));
    assert_eq!(status, 401, "{text}");
    let out = Command::new(uturn_bin())
        .args(["trace", "--admin", &format!("http://{admin}"), "--user", "demo"])
        .env_remove("UTURN_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    assert_eq!(get(admin, "/trace?bogus=1", Some("sesame"), Duration::from_secs(2)).0, 400);
    assert_eq!(get(admin, "/trace?user=a&session=1", Some("sesame"), Duration::from_secs(2)).0, 400);

    // At most 4 traces at once: the fifth hears 429; once one ends another may start.
    let mut open = Vec::new();
    for i in 0..4 {
        let (status, text, s) =
            get(admin, &format!("/trace?user=u{i}&max_s=30"), Some("sesame"), Duration::from_secs(2));
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("application/x-ndjson"), "{text}");
        open.push(s);
    }
    let (status, text, _s) = get(admin, "/trace?user=u5", Some("sesame"), Duration::from_secs(2));
    assert_eq!(status, 429, "{text}");
    // A stream outlives the 15 s connection limit of the other routes? (It stays open here.)
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = 0;
    while Instant::now() < deadline {
        let (st, _, s) = get(admin, "/trace?user=u6&max_s=5", Some("sesame"), Duration::from_secs(2));
        status = st;
        if st == 200 {
            open.push(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(status, 200, "a closed trace frees its slot");
    drop(open);

    // The rate cap: 3 messages a second; the rest counted as suppressed.
    std::thread::sleep(Duration::from_millis(1500));
    let c = Client::new(relay.addr, "demo", "demo", "uturn.local");
    let local = local_of(&c);
    let t = Trace::start_with_token(admin, &["--client", &local, "--rate", "3", "--duration", "4"], "sesame");
    for _ in 0..40 {
        let _ = c.unauthenticated(Method::BINDING, |_| Ok(()));
    }
    let tick = t.wait(|v| v["type"] == "tick" && v["suppressed"].as_u64().unwrap_or(0) > 0, "suppressed count");
    let shown = t.all(|v| v["type"] == "message").len();
    assert!(shown < 80, "80 messages (40 requests and answers) were capped: {shown} shown; {tick}");
}

impl Trace {
    fn start_with_token(admin: SocketAddr, args: &[&str], token: &str) -> Trace {
        let mut all = vec!["--token", token];
        all.extend_from_slice(args);
        Trace::start(admin, &all)
    }
}

#[test]
fn trace_stream_outlives_the_connection_time_limit() {
    let (_relay, admin) = relay("epoll", "", &[]);
    let (status, _, mut s) = get(admin, "/trace?client=127.0.0.1&max_s=18", None, Duration::from_secs(2));
    assert_eq!(status, 200);
    // Ticks keep coming after the 15 s every other connection is held at most.
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let start = Instant::now();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(17) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => break,
        }
    }
    assert!(start.elapsed() >= Duration::from_secs(16), "the stream ended early after {:?}:\n{text}", start.elapsed());
    assert!(text.matches("\"type\":\"tick\"").count() >= 14, "{text}");
}
