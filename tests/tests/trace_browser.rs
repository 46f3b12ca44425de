//! A browser call, traced: headless Chromium calls itself through uturn over UDP, TCP and TLS
//! (`tests/python/browser_call.py`, as in `browser.rs`) while `uturn trace --user demo` runs
//! twice, once printing human lines and once as JSON lines writing a pcapng; tshark must decode
//! that pcapng with no malformed frame and no expert warning or error, and count as many STUN
//! messages as the trace streamed. The human trace and tshark's verdict are printed (the closing
//! note of issue 24 and docs/trace-example.md show them).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use uturn_tests::{run_with_timeout, uturn_bin, Guard, Relay, TlsFiles};

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `uturn trace ARGS` with its stdout and stderr in files.
fn trace(admin: &str, args: &[&str], out: &PathBuf, err: &PathBuf) -> Guard {
    Guard(
        Command::new(uturn_bin())
            .args(["trace", "--admin", admin, "--user", "demo", "--duration", "40", "--rate", "1000"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(out).unwrap())
            .stderr(std::fs::File::create(err).unwrap())
            .spawn()
            .expect("spawn uturn trace"),
    )
}

fn wait_exit(g: &mut Guard, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = g.0.try_wait() {
            return st.success();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn tshark(args: &[&str]) -> String {
    let out = Command::new("tshark").args(args).output().expect("tshark (Debian package tshark)");
    assert!(out.status.success(), "tshark {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_traced_browser_call_and_tsharks_verdict_on_its_pcap() {
    let tls = TlsFiles::generate();
    let admin = format!("127.0.0.1:{}", free_tcp_port());
    let relay = Relay::start_streams("uring", "", &["--admin-listen", &admin], &tls);
    let url = format!("http://{admin}");
    let tmp = std::env::temp_dir().join(format!("uturn-trace-browser-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let f = |n: &str| tmp.join(n);
    let pcap = f("call.pcapng");
    let mut human = trace(&url, &[], &f("human.txt"), &f("human.err"));
    let mut json = trace(&url, &["--json", "--pcap", pcap.to_str().unwrap()], &f("json.txt"), &f("json.err"));
    // Both traces run before the call starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(std::fs::read_to_string(f("human.txt")).unwrap_or_default().contains("tracing user=demo")
        && std::fs::read_to_string(f("json.txt")).unwrap_or_default().contains("\"type\":\"start\""))
    {
        assert!(Instant::now() < deadline, "the traces did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/browser_call.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .args(["--host", "127.0.0.1", "--user", "demo", "--password", "demo", "--timeout", "35"])
        .args(["--udp-port", &relay.addr.port().to_string()])
        .args(["--tcp-port", &relay.tcp.unwrap().port().to_string()])
        .args(["--tls-port", &relay.tls.unwrap().port().to_string(), "--tls-name", "localhost"])
        .arg("--cert")
        .arg(&tls.cert);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(40));
    assert!(ok, "the browser call failed:\n{out}\n--- uturn log ---\n{}", relay.log());
    // End the traces: the relay ends them at --duration; stop them sooner by ending the relay
    // (after the last traffic lines).
    std::thread::sleep(Duration::from_millis(1500));
    drop(relay);
    assert!(wait_exit(&mut human, Duration::from_secs(50)), "the human trace did not end");
    assert!(wait_exit(&mut json, Duration::from_secs(50)), "the JSON trace did not end");

    let human_text = std::fs::read_to_string(f("human.txt")).unwrap();
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(f("json.txt")).unwrap().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let messages: Vec<_> =
        lines.iter().filter(|v| v["type"] == "message" && !v["raw"].as_str().unwrap_or("").is_empty()).collect();
    let stun = messages.iter().filter(|v| v["kind"] == "stun").count();
    for t in ["udp", "tcp", "tls"] {
        assert!(
            messages.iter().any(|v| v["transport"] == t && v["method"] == "Allocate" && v["class"] == "success"),
            "the trace shows the {t} allocations"
        );
    }
    assert!(lines.iter().any(|v| v["type"] == "traffic"), "traffic lines");
    // A call that ends its allocations (Refresh 0) is no NAT rebinding.
    let rebinding: Vec<_> = lines.iter().filter(|v| v["flag"] == "nat-rebinding").collect();
    assert!(rebinding.is_empty(), "a plain call flagged as rebinding: {rebinding:?}");
    assert!(human_text.contains("Allocate success XOR-RELAYED-ADDRESS="), "{human_text}");

    let p = pcap.to_str().unwrap();
    let frames = tshark(&["-n", "-r", p]).lines().count();
    let stun_frames = tshark(&["-n", "-r", p, "-Y", "stun.type"]).lines().count();
    let any_stun = tshark(&["-n", "-r", p, "-Y", "stun"]).lines().count();
    let bad = tshark(&["-n", "-r", p, "-Y", "_ws.malformed || _ws.expert.severity >= warning"]);
    let expert = tshark(&["-n", "-q", "-r", p, "-z", "expert"]);
    println!("--- uturn trace --user demo (a Chromium call over UDP, TCP and TLS) ---\n{human_text}");
    println!("--- {}", std::fs::read_to_string(f("json.err")).unwrap_or_default().trim());
    println!(
        "--- tshark verdict: {frames} frames, {stun_frames} STUN messages (the trace streamed {stun}), \
         {any_stun} decoded as STUN or ChannelData; malformed or warning frames: {}",
        bad.lines().count()
    );
    println!("--- tshark -z expert ---\n{}", expert.trim());
    assert!(bad.is_empty(), "tshark flags frames:\n{bad}");
    assert_eq!(frames, messages.len(), "one frame per traced message");
    assert_eq!(stun_frames, stun, "tshark sees every traced STUN message");
    let _ = std::fs::remove_dir_all(&tmp);
}
