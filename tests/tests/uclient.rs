//! coturn's `turnutils_uclient` against the started uturn binary: channel mode, Send-indication
//! mode (`-s`), client-to-client (`-y`) and several clients (`-m`), over UDP, TCP (`-t`) and TLS
//! (`-t -S`, a certificate generated at test time), and RFC 6062 TCP allocations (`-T`, over TCP
//! and TLS), on both I/O backends, with every message received.

use std::process::Command;
use std::time::Duration;

use uturn_tests::{run_with_timeout, Relay, TlsFiles};

/// The last "tot_send_msgs=X, tot_recv_msgs=Y" uclient printed.
fn totals(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("tot_send_msgs=") && !l.contains("msz="))
        .unwrap_or_else(|| panic!("no totals in:\n{out}"));
    let num = |key: &str| -> u64 {
        let rest = &line[line.find(key).unwrap() + key.len()..];
        rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()
    };
    (num("tot_send_msgs="), num("tot_recv_msgs="))
}

/// Runs uclient over `transport` (udp, tcp or tls) with `mode_args` (e.g. `-s`), `messages` per
/// client and `clients` clients, and asserts every message came back.
fn uclient_over(backend: &str, transport: &str, mode_args: &[&str], messages: u64, clients: u64) {
    // turnutils_uclient picks channel numbers up to 0x7FFF (RFC 5766), see docs/rfc-compliance.md.
    let tls = TlsFiles::generate();
    // With `-T` each client Connects to the others' relayed addresses, which are the relay's
    // own: a TCP allocation reaches them only through allow-peer (docs/security.md).
    let config = if mode_args.contains(&"-T") { "allow-peer = [\"127.0.0.1/32\"]\n" } else { "" };
    let relay = if transport == "udp" {
        Relay::start(backend, config, &["--rfc5766-channels"])
    } else {
        Relay::start_streams(backend, config, &["--rfc5766-channels"], &tls)
    };
    let (port, transport_args): (u16, &[&str]) = match transport {
        "udp" => (relay.addr.port(), &[]),
        "tcp" => (relay.tcp.unwrap().port(), &["-t"]),
        _ => (relay.tls.unwrap().port(), &["-t", "-S"]),
    };
    // `-T` (RFC 6062 TCP allocations) implies client-to-client: each client Connects to the
    // relayed address of every later one.
    let tcp_allocations = mode_args.contains(&"-T");
    let client_to_client = mode_args.contains(&"-y") || tcp_allocations;
    let (_peer, peer_port) = if client_to_client {
        (None, 0)
    } else {
        let (g, p) = uturn_tests::start_turnutils_peer();
        (Some(g), p)
    };
    let mut cmd = Command::new("turnutils_uclient");
    cmd.args(transport_args).args(mode_args).args(["-u", "demo", "-w", "demo", "-p", &port.to_string()]).args([
        "-n",
        &messages.to_string(),
        "-l",
        "180",
        "-m",
        &clients.to_string(),
    ]);
    if !client_to_client {
        cmd.args(["-e", "127.0.0.1", "-r", &peer_port.to_string()]);
    }
    cmd.arg("127.0.0.1");
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(90));
    assert!(ok, "turnutils_uclient failed:\n{out}\n--- uturn log ---\n{}", relay.log());
    assert!(out.contains("Total lost packets 0 (0.000000%)"), "loss reported:\n{out}");
    let (sent, received) = totals(&out);
    assert_eq!(sent, received, "{out}");
    assert!(sent >= messages * clients, "sent {sent} < {messages} x {clients}:\n{out}");
    assert!(!relay.log().contains("ERROR"), "{}", relay.log());
    if tcp_allocations {
        // Both data connections of each Connect (the Connect side and the ConnectionAttempt
        // side) were bound.
        let pairs = clients * (clients - 1);
        assert!(out.contains(&format!("{pairs} connections are completed")), "not every data connection bound:\n{out}");
        assert_eq!(
            relay.log().matches("INFO uturn_controlplane::tcp_relay: data connection bound").count() as u64,
            pairs
        );
    }
    if transport != "udp" {
        let log = relay.log();
        assert!(log.contains(&format!("transport={transport}")), "no {transport} connection in the log:\n{log}");
        assert!(log.contains("reason=\"connection closed\""), "allocations must end with their connections:\n{log}");
    }
}

macro_rules! both_backends {
    ($($name:ident: $transport:expr, $mode:expr, $n:expr, $m:expr;)*) => {
        mod uring {
            $( #[test] fn $name() { super::uclient_over("uring", $transport, $mode, $n, $m) } )*
        }
        mod epoll {
            $( #[test] fn $name() { super::uclient_over("epoll", $transport, $mode, $n, $m) } )*
        }
    };
}

both_backends! {
    channel_data: "udp", &[], 60, 2;
    send_indications: "udp", &["-s"], 60, 2;
    client_to_client: "udp", &["-y"], 60, 2;
    many_clients_channel_data: "udp", &[], 40, 10;
    tcp_channel_data: "tcp", &[], 100, 4;
    tcp_send_indications: "tcp", &["-s"], 100, 4;
    tls_channel_data: "tls", &[], 100, 4;
    tls_send_indications: "tls", &["-s"], 100, 4;
    tcp_allocations_over_tcp: "tcp", &["-T"], 30, 4;
    tcp_allocations_over_tls: "tls", &["-T"], 30, 4;
}
