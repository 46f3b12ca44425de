//! IPv6 (RFC 8656 §7.1-7.2, RFC 6156) on [::1]: a client reaching uturn over IPv6 (UDP and TCP),
//! an IPv6 relayed transport address with a round trip to a [::1] peer, an IPv4 client relayed
//! through an IPv6 address and back, the default family (IPv4) and 440 / 443 where families do
//! not match, and dual allocations (ADDITIONAL-ADDRESS-FAMILY): an IPv4 and an IPv6 relayed
//! address on one allocation, each relaying to peers of its family.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use uturn_bench::client::stream::StreamClient;
use uturn_tests::uturn_proto::wire::{attr, Method};
use uturn_tests::{Client, Relay, TlsFiles};

fn v6_port() -> u16 {
    UdpSocket::bind("[::1]:0").unwrap().local_addr().unwrap().port()
}

/// Allocates asking for `family`; returns the relayed address.
fn allocate(c: &mut Client, family: Option<u8>) -> Result<SocketAddr, u16> {
    c.learn_nonce();
    let r = c
        .transact_authenticated(Method::ALLOCATE, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, 17 << 24)?;
            if let Some(f) = family {
                w.u32(attr::REQUESTED_ADDRESS_FAMILY, (f as u32) << 24)?;
            }
            Ok(())
        })
        .unwrap();
    match r.code() {
        Some(code) => Err(code),
        None => Ok(r.msg().xor_address(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap()),
    }
}

/// Binds channel 0x4000 to `peer` and checks a ChannelData round trip each way.
fn round_trip(c: &mut Client, peer: &UdpSocket, relayed: SocketAddr) {
    let peer_addr = peer.local_addr().unwrap();
    c.try_channel_bind(0x4000, peer_addr).unwrap();
    c.send_channel_data(0x4000, b"to the peer over IPv6");
    let mut buf = [0u8; 1500];
    let (n, from) = peer.recv_from(&mut buf).expect("the peer got the datagram");
    assert_eq!(&buf[..n], b"to the peer over IPv6");
    assert_eq!(from, relayed, "the datagram came from the relayed transport address");
    peer.send_to(b"back to the client", relayed).unwrap();
    let got = c.recv().expect("ChannelData back");
    assert_eq!(&got[4..], b"back to the client");
}

#[test]
fn ipv6_clients_relayed_addresses_and_peers() {
    let p6 = v6_port();
    let l6 = format!("[::1]:{p6}");
    let tcp6 = format!("tcp://[::1]:{p6}");
    let tls = TlsFiles::generate();
    let relay = Relay::start_streams(
        "uring",
        "",
        &["--listen", &l6, "--listen", &tcp6, "--relay-ip", "127.0.0.1", "--relay-ip", "::1"],
        &tls,
    );
    let server6: SocketAddr = l6.parse().unwrap();
    let peer6 = UdpSocket::bind("[::1]:0").unwrap();
    peer6.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let peer4 = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer4.set_read_timeout(Some(Duration::from_secs(2))).unwrap();

    // An IPv6 client, an IPv6 relayed address, an IPv6 peer.
    let mut c = Client::new(server6, "demo", "demo", "uturn.local");
    let relayed = allocate(&mut c, Some(attr::FAMILY_IPV6)).unwrap();
    assert!(relayed.is_ipv6() && relayed.ip().is_loopback(), "{relayed}");
    round_trip(&mut c, &peer6, relayed);
    // An IPv4 peer on an IPv6 allocation: 443 (RFC 8656 §12.2).
    let r = c
        .transact_authenticated(Method::CREATE_PERMISSION, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, &peer4.local_addr().unwrap()).map(drop)
        })
        .unwrap();
    assert_eq!(r.code(), Some(443));

    // An IPv6 client that names no family gets IPv4 (§7.2) and reaches an IPv4 peer.
    let mut d = Client::new(server6, "demo", "demo", "uturn.local");
    let relayed = allocate(&mut d, None).unwrap();
    assert!(relayed.is_ipv4(), "{relayed}");
    round_trip(&mut d, &peer4, relayed);

    // An IPv4 client relayed through an IPv6 address (RFC 6156).
    let mut e = Client::new(relay.addr, "demo", "demo", "uturn.local");
    let relayed = allocate(&mut e, Some(attr::FAMILY_IPV6)).unwrap();
    assert!(relayed.is_ipv6());
    round_trip(&mut e, &peer6, relayed);

    // TURN over TCP on [::1].
    let mut t = StreamClient::connect(server6, false, "demo", "demo", "uturn.local").unwrap();
    let relayed = t.allocate().unwrap();
    t.bind_channel(0x4000, peer4.local_addr().unwrap()).unwrap();
    t.send_channel_data(0x4000, b"over tcp6").unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = peer4.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"over tcp6"[..], relayed));
    assert!(relay.log().contains("transport=tcp"));
}

#[test]
fn a_family_the_relay_does_not_serve_gets_440() {
    let relay = Relay::start("epoll", "", &[]);
    let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
    assert_eq!(allocate(&mut c, Some(attr::FAMILY_IPV6)), Err(440));
    assert!(allocate(&mut c, Some(attr::FAMILY_IPV4)).unwrap().is_ipv4());
}

/// Every XOR-RELAYED-ADDRESS in an Allocate success (a dual allocation has two).
fn relayed_addresses(r: &uturn_tests::Response) -> Vec<SocketAddr> {
    let m = r.msg();
    let tid = m.transaction_id();
    m.attributes()
        .filter(|a| a.typ == attr::XOR_RELAYED_ADDRESS)
        .map(|a| uturn_tests::uturn_proto::wire::decode_xor_address(a.value, &tid).unwrap())
        .collect()
}

fn dual_allocate(c: &mut Client) -> uturn_tests::Response {
    c.learn_nonce();
    c.transact_authenticated(Method::ALLOCATE, |w| {
        w.u32(attr::REQUESTED_TRANSPORT, 17 << 24)?;
        w.u32(attr::ADDITIONAL_ADDRESS_FAMILY, (attr::FAMILY_IPV6 as u32) << 24).map(drop)
    })
    .unwrap()
}

#[test]
fn a_dual_allocation_relays_to_peers_of_both_families() {
    for backend in ["uring", "epoll"] {
        let relay = Relay::start(backend, "", &["--relay-ip", "127.0.0.1", "--relay-ip", "::1"]);
        let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
        let r = dual_allocate(&mut c);
        assert_eq!(r.code(), None, "{backend}");
        let addrs = relayed_addresses(&r);
        assert_eq!(addrs.len(), 2, "{backend}: {addrs:?}");
        assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6(), "{backend}: {addrs:?}");
        let peer4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer6 = UdpSocket::bind("[::1]:0").unwrap();
        for p in [&peer4, &peer6] {
            p.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        c.try_create_permission(&[peer4.local_addr().unwrap(), peer6.local_addr().unwrap()]).unwrap();
        c.try_channel_bind(0x4001, peer6.local_addr().unwrap()).unwrap();
        // Send indications to each family leave from the relayed address of that family.
        for (peer, relayed) in [(&peer4, addrs[0]), (&peer6, addrs[1])] {
            c.send_indication(peer.local_addr().unwrap(), b"dual");
            let mut buf = [0u8; 64];
            let (n, from) = peer.recv_from(&mut buf).expect("the peer got the Send");
            assert_eq!((&buf[..n], from), (&b"dual"[..], relayed), "{backend}");
            peer.send_to(b"answer", relayed).unwrap();
            let got = c.recv().expect("the answer");
            assert!(got.windows(6).any(|w| w == b"answer"), "{backend}");
        }
        // ChannelData on the IPv6 channel.
        c.send_channel_data(0x4001, b"channel six");
        let mut buf = [0u8; 64];
        let (n, from) = peer6.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"channel six"[..], addrs[1]), "{backend}");
    }
}

#[test]
fn a_dual_allocation_without_ipv6_gets_ipv4_and_address_error_code_440() {
    let relay = Relay::start("uring", "", &[]);
    let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
    let r = dual_allocate(&mut c);
    assert_eq!(r.code(), None);
    assert_eq!(relayed_addresses(&r).len(), 1);
    let err = r.msg().get(attr::ADDRESS_ERROR_CODE).expect("ADDRESS-ERROR-CODE");
    assert_eq!((err[0], err[2] as u16 * 100 + err[3] as u16), (attr::FAMILY_IPV6, 440));
    // ADDITIONAL-ADDRESS-FAMILY IPv4 is a 400.
    let mut d = Client::new(relay.addr, "demo", "demo", "uturn.local");
    d.learn_nonce();
    let r = d
        .transact_authenticated(Method::ALLOCATE, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, 17 << 24)?;
            w.u32(attr::ADDITIONAL_ADDRESS_FAMILY, (attr::FAMILY_IPV4 as u32) << 24).map(drop)
        })
        .unwrap();
    assert_eq!(r.code(), Some(400));
}
