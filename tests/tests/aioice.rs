//! Python's `aioice` TURN client allocates on the started uturn and exchanges data with an echo
//! peer through the relay, on both I/O backends.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use uturn_tests::{run_with_timeout, Relay};

fn aioice(backend: &str) {
    let relay = Relay::start(backend, "", &[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/aioice_relay.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(python);
    cmd.arg(script).args(["127.0.0.1", &relay.addr.port().to_string(), "demo", "demo", "30"]);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(ok, "aioice client failed:\n{out}\n--- uturn log ---\n{}", relay.log());
    assert!(out.contains("30 echoes through the relay"), "{out}");
    assert!(relay.log().contains("allocation granted"));
}

#[test]
fn aioice_uring() {
    aioice("uring");
}

#[test]
fn aioice_epoll() {
    aioice("epoll");
}
