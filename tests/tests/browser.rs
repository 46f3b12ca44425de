//! A real browser through uturn: Debian's headless Chromium, driven over the DevTools protocol
//! (`tests/python/browser_call.py`), opens two RTCPeerConnections with
//! `iceTransportPolicy: "relay"` once each for TURN over UDP, TCP and TLS (the TLS certificate
//! generated at test time and trusted by its SPKI hash), and checks a data channel both ways,
//! an Opus track's inbound RTP, and that the selected pair is relay↔relay on uturn's relayed
//! addresses with `relayProtocol` udp / tcp / tls. The whole browser run stays under 60 s.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use uturn_tests::{run_with_timeout, Relay, TlsFiles};

#[test]
fn chromium_calls_through_uturn_over_udp_tcp_and_tls() {
    let tls = TlsFiles::generate();
    let relay = Relay::start_streams("uring", "", &[], &tls);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/browser_call.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .args(["--host", "127.0.0.1", "--user", "demo", "--password", "demo", "--timeout", "55"])
        .args(["--udp-port", &relay.addr.port().to_string()])
        .args(["--tcp-port", &relay.tcp.unwrap().port().to_string()])
        .args(["--tls-port", &relay.tls.unwrap().port().to_string(), "--tls-name", "localhost"])
        .arg("--cert")
        .arg(&tls.cert);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(ok, "the browser call failed:\n{out}\n--- uturn log ---\n{}", relay.log());
    // The connect time of each call (creating the PCs to both connected), for the record
    // (scripts/bench-ordering.sh compares it with coturn's).
    for line in out.lines().filter(|l| l.starts_with("connect time over")) {
        eprintln!("{line}");
    }
    for t in ["udp", "tcp", "tls"] {
        assert!(out.contains(&format!("browser call over {t}: ok")), "{t}:\n{out}");
        assert!(out.contains(&format!("connect time over {t}: ")), "{t}: no connect time:\n{out}");
        assert!(out.contains(&format!("\"relayProtocol\": \"{t}\"")), "{t}:\n{out}");
    }
    let log = relay.log();
    assert!(log.contains("transport=tcp") && log.contains("transport=tls"), "{log}");
}
