//! Lifetimes end to end, with short lifetimes set in the config: permissions and channel
//! bindings stop relaying when they expire, and an expired allocation is gone (437) with its
//! relay socket closed.

use std::net::UdpSocket;
use std::time::Duration;

use uturn_tests::{peer_socket, Client, Relay, BACKENDS};

const CONFIG: &str = "default-lifetime = 4\nmax-lifetime = 4\npermission-lifetime = 2\nchannel-lifetime = 2\n";

#[test]
fn permissions_channels_and_allocations_expire() {
    for backend in BACKENDS {
        let relay = Relay::start(backend, CONFIG, &[]);
        let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
        let relayed = c.allocate();
        let peer = peer_socket();
        let peer_addr = peer.local_addr().unwrap();
        assert_eq!(c.channel_bind(0x4001, peer_addr).code(), None);
        peer.send_to(b"fresh", relayed).unwrap();
        assert_eq!(c.recv().unwrap()[4..], b"fresh"[..], "{backend}: relayed while bound");

        std::thread::sleep(Duration::from_millis(2300));
        peer.send_to(b"late", relayed).unwrap();
        assert!(c.recv().is_none(), "{backend}: permission expired, peer data dropped");
        c.send_channel_data(0x4001, b"late");
        let mut buf = [0u8; 64];
        assert!(peer.recv_from(&mut buf).is_err(), "{backend}: channel expired, client data dropped");

        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(c.refresh(4).code(), Some(437), "{backend}: allocation expired");
        // The relayed transport address was released.
        assert!(UdpSocket::bind(relayed).is_ok(), "{backend}: relay socket closed");
        let log = relay.log();
        let ended = log.lines().find(|l| l.contains("allocation ended")).unwrap_or_else(|| panic!("{log}"));
        assert!(ended.contains("reason=\"expired\"") && ended.contains("session=1"), "{ended}");
        assert!(ended.contains("packets_to_client=1") && ended.contains("bytes_to_client=5"), "{ended}");
    }
}

#[test]
fn refresh_keeps_an_allocation_alive() {
    let relay = Relay::start("uring", CONFIG, &[]);
    let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
    c.allocate();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(2000));
        assert_eq!(c.refresh(4).code(), None);
    }
    assert_eq!(c.refresh(0).code(), None, "LIFETIME 0 deletes");
    assert_eq!(c.refresh(4).code(), Some(437));
}
