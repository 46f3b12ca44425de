//! Public address discovery (`external-ip = "auto"` with `external-ip-stun`): the relay asks a
//! STUN server, here a second uturn on loopback, for each relay address's mapping at start and
//! on SIGHUP (on a thread of its own: Allocates are answered meanwhile), and advertises the
//! mapped address in XOR-RELAYED-ADDRESS.
//!
//! On loopback there is no NAT, so the mapped address is the relay address the Binding request
//! left from (127.0.0.2 here, not the listen address): the test checks that the relay reports
//! and advertises exactly what the STUN server answered, that it refuses to start when the
//! server does not answer, and that SIGHUP asks again.

use std::time::Duration;

use uturn_tests::{free_udp_port, uturn_cli, Client, Relay, BACKENDS};

#[test]
fn the_relay_advertises_what_the_stun_server_saw() {
    for backend in BACKENDS {
        let stun = Relay::start(backend, "", &[]);
        let config =
            format!("relay-ip = \"127.0.0.2\"\nexternal-ip = \"auto\"\nexternal-ip-stun = \"{}\"\n", stun.addr);
        let relay = Relay::start(backend, &config, &[]);
        let line = "public address discovery: relayed transport addresses on 127.0.0.2 are advertised as 127.0.0.2";
        assert!(relay.wait_log(line, Duration::from_secs(5)), "{}", relay.log());
        assert!(relay.log().contains(&format!("stun={}", stun.addr)), "{}", relay.log());
        let mut client = Client::new(relay.addr, "demo", "demo", "uturn.local");
        let relayed = client.allocate();
        assert_eq!(relayed.ip().to_string(), "127.0.0.2", "XOR-RELAYED-ADDRESS");

        // SIGHUP asks again; with the STUN server gone the running configuration stays.
        relay.signal("HUP");
        let again = |log: &str| log.matches(line).count();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while again(&relay.log()) < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(again(&relay.log()), 2, "{}", relay.log());
        drop(stun);
        relay.signal("HUP");
        // The reload waits on the silent server for 3.5 s on a thread of its own: the control
        // loop answers an Allocate meanwhile, before the reload gives up.
        let mut client = Client::new(relay.addr, "demo", "demo", "uturn.local");
        assert_eq!(client.allocate().ip().to_string(), "127.0.0.2");
        assert!(
            !relay.log().contains("configuration not reloaded"),
            "Allocate waited for the reload:\n{}",
            relay.log()
        );
        assert!(
            relay.wait_log("configuration not reloaded, the running one stays", Duration::from_secs(8)),
            "{}",
            relay.log()
        );
        assert!(relay.log().contains("no Binding response from"), "{}", relay.log());
        // Still serving with the mapping it had.
        let mut client = Client::new(relay.addr, "demo", "demo", "uturn.local");
        assert_eq!(client.allocate().ip().to_string(), "127.0.0.2");
    }
}

#[test]
fn no_answer_means_no_start_and_check_config_says_why() {
    // Nobody listens on this port: three transmissions, then the relay refuses to start.
    let silent = format!("127.0.0.1:{}", free_udp_port());
    let args = ["--relay-ip", "127.0.0.2", "--external-ip", "auto", "--external-ip-stun", &silent];
    let started = std::time::Instant::now();
    let (code, out, err) = uturn_cli(&[&args[..], &["check-config"]].concat());
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&format!("no Binding response from {silent}")), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let (code, _, err) = uturn_cli(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("public address discovery for relay-ip 127.0.0.2"), "{err}");

    // With a STUN server that answers, check-config shows the mapping.
    let stun = Relay::start("epoll", "", &[]);
    let server = stun.addr.to_string();
    let args = ["--relay-ip", "127.0.0.2", "--external-ip", "auto", "--external-ip-stun", &server, "check-config"];
    let (code, out, err) = uturn_cli(&args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("127.0.0.2 advertised as 127.0.0.2"), "{out}");
    // "auto" stands alone.
    let (code, _, err) = uturn_cli(&["--external-ip", "auto", "--external-ip", "192.0.2.1", "check-config"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("must be the only external-ip entry"), "{err}");
}
