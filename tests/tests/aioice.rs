//! Python's `aioice` TURN client allocates on the started uturn and exchanges data with an echo
//! peer through the relay, over UDP, TCP and TLS (ALPN `stun.turn`, the test's certificate
//! verified), on both I/O backends.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use uturn_tests::{run_with_timeout, Relay, TlsFiles};

fn aioice(backend: &str) {
    aioice_over(backend, "udp");
}

fn aioice_over(backend: &str, transport: &str) {
    let tls = TlsFiles::generate();
    let relay = Relay::start_streams(backend, "", &[], &tls);
    let port = match transport {
        "udp" => relay.addr.port(),
        "tcp" => relay.tcp.unwrap().port(),
        _ => relay.tls.unwrap().port(),
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/aioice_relay.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(python);
    cmd.arg(script).args(["127.0.0.1", &port.to_string(), "demo", "demo", "30", transport]).arg(&tls.cert);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(ok, "aioice client failed:\n{out}\n--- uturn log ---\n{}", relay.log());
    assert!(out.contains("30 echoes through the relay"), "{out}");
    assert!(relay.log().contains("allocation granted"));
    if transport != "udp" {
        assert!(relay.log().contains(&format!("transport={transport}")), "{}", relay.log());
    }
}

#[test]
fn aioice_tcp_uring() {
    aioice_over("uring", "tcp");
}

#[test]
fn aioice_tls_uring() {
    aioice_over("uring", "tls");
}

#[test]
fn aioice_tcp_epoll() {
    aioice_over("epoll", "tcp");
}

#[test]
fn aioice_tls_epoll() {
    aioice_over("epoll", "tls");
}

#[test]
fn aioice_uring() {
    aioice("uring");
}

#[test]
fn aioice_epoll() {
    aioice("epoll");
}
