//! Operator-facing hardening: no secret in the start-up banner, and the io_uring registered-file
//! fallback keeps every allocation on its own relayed transport address.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use uturn_tests::{free_udp_port, peer_socket, uturn_bin, Client, Relay};

/// Runs the binary for a moment and returns what it printed on stdout.
fn banner(args: &[&str]) -> String {
    let port = free_udp_port().to_string();
    let mut child = Command::new(uturn_bin())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--workers", "1", "--log-level", "warn"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn uturn");
    std::thread::sleep(Duration::from_millis(700));
    let _ = child.kill();
    let _ = child.wait();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    out
}

#[test]
fn the_banner_prints_no_password_but_the_loopback_demo_one() {
    let real = banner(&["--user", "alice:Sup3r-s3cret-pw", "--user", "bob:an0ther-one"]);
    assert!(real.contains("iceServers") && real.contains("\"alice\""), "{real}");
    assert!(!real.contains("Sup3r-s3cret-pw") && !real.contains("an0ther-one"), "a password was printed:\n{real}");
    assert!(real.contains("<password>"), "{real}");
    let demo = banner(&[]);
    assert!(demo.contains("\"credential\": \"demo\""), "the public loopback demo credential is shown:\n{demo}");
}

#[test]
fn failed_file_registration_keeps_each_allocation_on_its_own_relayed_address() {
    let relay = Relay::start_with_env("uring", "", &[], &[("UTURN_FAULT_INJECTION", "register-files-fail")]);
    // Several allocations in turn, some slots reused after a delete: each must send from and
    // receive on its own relayed transport address, named by its plain fd.
    for round in 0..3 {
        let mut sessions = Vec::new();
        for _ in 0..4 {
            let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
            let relayed = c.allocate();
            let peer = peer_socket();
            let peer_addr = peer.local_addr().unwrap();
            assert_eq!(c.channel_bind(0x4001, peer_addr).code(), None);
            sessions.push((c, relayed, peer));
        }
        for (i, (c, relayed, peer)) in sessions.iter().enumerate() {
            let payload = format!("round {round} session {i}");
            c.send_channel_data(0x4001, payload.as_bytes());
            let mut buf = [0u8; 1500];
            let (n, from) = peer.recv_from(&mut buf).expect("relayed to the peer");
            assert_eq!(&buf[..n], payload.as_bytes());
            assert_eq!(from, *relayed, "round {round}: session {i}'s data left from another relayed address");
            peer.send_to(b"back", relayed).unwrap();
            let back = c.recv().expect("relayed back to the client");
            assert_eq!(&back[4..8], b"back");
        }
        for (c, _, _) in &sessions {
            assert_eq!(c.refresh(0).code(), None);
        }
    }
    let log = relay.log();
    assert!(log.contains("registering a relay socket failed"), "the fallback is logged:\n{log}");
}
