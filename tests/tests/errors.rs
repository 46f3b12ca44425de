//! Every error code uturn answers with, each provoked by a crafted request against the started
//! binary, plus the behaviours around them (retransmissions, SOFTWARE, FINGERPRINT, bad input),
//! on both I/O backends.

use std::net::SocketAddr;
use std::time::Duration;

use uturn_tests::uturn_proto::wire::{attr, Class, Message, Method, TransactionId};
use uturn_tests::{build, peer_socket, Client, Relay, BACKENDS};

const TRANSPORT_UDP: u32 = 17 << 24;

fn client(relay: &Relay) -> Client {
    Client::new(relay.addr, "demo", "demo", "uturn.local")
}

fn each_backend(config: &str, args: &[&str], test: impl Fn(&Relay)) {
    for backend in BACKENDS {
        let relay = Relay::start(backend, config, args);
        test(&relay);
        assert!(!relay.log().contains("ERROR"), "{backend}: {}", relay.log());
    }
}

#[test]
fn binding_request_answers_xor_mapped_address_software_and_fingerprint() {
    each_backend("", &[], |relay| {
        let c = client(relay);
        let r = c.unauthenticated(Method::BINDING, |_| Ok(()));
        let m = r.msg();
        assert_eq!(m.class(), Class::Success);
        assert_eq!(m.xor_address(attr::XOR_MAPPED_ADDRESS), Some(Ok(c.sock.local_addr().unwrap())));
        assert_eq!(m.get(attr::SOFTWARE), None, "unauthenticated answers carry no SOFTWARE (amplification)");
        assert!(m.raw_attributes().any(|a| a.typ == attr::FINGERPRINT), "FINGERPRINT added (and verified by parse)");
    });
}

#[test]
fn unauthenticated_allocate_gets_401_with_realm_and_nonce() {
    each_backend("", &[], |relay| {
        let c = client(relay);
        let r = c.unauthenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP).map(drop));
        assert_eq!(r.code(), Some(401));
        let m = r.msg();
        assert_eq!(m.realm(), Some(&b"uturn.local"[..]));
        // RFC 8489 §9.2: the nonce cookie with the security-feature bits, then 24 characters.
        let nonce = m.nonce().unwrap();
        assert!(nonce.starts_with(b"obMatJos2wAAA"), "{:?}", String::from_utf8_lossy(nonce));
        assert_eq!(nonce.len(), 13 + 24);
        assert_eq!(m.get(attr::PASSWORD_ALGORITHMS), Some(&[0, 2, 0, 0, 0, 1, 0, 0][..]));
        assert!(!m.has_integrity());
    });
}

#[test]
fn wrong_password_and_unknown_user_get_the_same_401() {
    each_backend("", &[], |relay| {
        let mut good = client(relay);
        good.learn_nonce();
        let tid = TransactionId([9; 12]);
        let allocate = |c: &Client| {
            c.signed_request(Method::ALLOCATE, tid, |w| w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP).map(drop))
        };
        let mut wrong = Client::new(relay.addr, "demo", "not-demo", "uturn.local");
        wrong.nonce = good.nonce.clone();
        wrong.sock = good.sock.try_clone().unwrap();
        let mut unknown = Client::new(relay.addr, "mallory", "demo", "uturn.local");
        unknown.nonce = good.nonce.clone();
        unknown.sock = good.sock.try_clone().unwrap();
        let a = wrong.transact(&allocate(&wrong)).unwrap();
        // A different transaction ID, so the retransmission cache does not answer.
        let b = unknown
            .transact(&unknown.signed_request(Method::ALLOCATE, TransactionId([8; 12]), |w| {
                w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP).map(drop)
            }))
            .unwrap();
        assert_eq!((a.code(), b.code()), (Some(401), Some(401)));
        // Identical apart from the transaction ID (and the FINGERPRINT over it), nonce included
        // when minted within the same second.
        let strip = |v: &[u8]| {
            let mut v = v.to_vec();
            v[8..20].fill(0);
            let n = v.len();
            v[n - 4..].fill(0);
            v
        };
        if a.msg().nonce() == b.msg().nonce() {
            assert_eq!(strip(&a.0), strip(&b.0));
        }
        assert_eq!(a.0.len(), b.0.len());
    });
}

#[test]
fn integrity_without_nonce_is_400() {
    each_backend("", &[], |relay| {
        let c = client(relay);
        let req = build(Method::ALLOCATE, Class::Request, TransactionId([1; 12]), Some(c.key.as_bytes()), |w| {
            w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP)?;
            w.bytes(attr::USERNAME, b"demo")?;
            w.bytes(attr::REALM, b"uturn.local").map(drop)
        });
        assert_eq!(c.transact(&req).unwrap().code(), Some(400));
    });
}

#[test]
fn allocate_errors_420_437_440_442_508_and_retransmission() {
    each_backend("", &[], |relay| {
        let mut c = client(relay);
        c.learn_nonce();
        let r = c.authenticated(Method::ALLOCATE, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP)?;
            w.u32(0x0031, 7).map(drop)
        });
        assert_eq!(r.code(), Some(420));
        assert_eq!(r.msg().get(attr::UNKNOWN_ATTRIBUTES), Some(&[0x00, 0x31][..]));
        let r = c.authenticated(Method::ALLOCATE, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP)?;
            w.bytes(attr::DONT_FRAGMENT, &[]).map(drop)
        });
        assert_eq!(r.code(), Some(420), "DONT-FRAGMENT is not honoured, so it is unknown (RFC 8656 §7.2)");
        assert_eq!(
            c.authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, 6 << 24).map(drop)).code(),
            Some(442)
        );
        assert_eq!(c.authenticated(Method::ALLOCATE, |_| Ok(())).code(), Some(400), "REQUESTED-TRANSPORT missing");
        let r = c.authenticated(Method::ALLOCATE, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP)?;
            w.u32(attr::REQUESTED_ADDRESS_FAMILY, 0x02 << 24).map(drop)
        });
        assert_eq!(r.code(), Some(440));
        let r = c.authenticated(Method::ALLOCATE, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP)?;
            w.bytes(attr::RESERVATION_TOKEN, &[1, 2, 3, 4, 5, 6, 7, 8]).map(drop)
        });
        assert_eq!(r.code(), Some(508), "unknown reservation token");
        // Success, then the same request again gets the same bytes, and a new one 437.
        let req = c.signed_request(Method::ALLOCATE, TransactionId([4; 12]), |w| {
            w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP).map(drop)
        });
        let first = c.transact(&req).unwrap();
        assert_eq!(first.code(), None);
        assert!(first.msg().get(attr::SOFTWARE).unwrap().starts_with(b"uturn/"), "SOFTWARE names uturn");
        let again = c.transact(&req).unwrap();
        assert_eq!(first.0, again.0, "a retransmitted Allocate gets the same answer");
        assert_eq!(
            c.authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP).map(drop)).code(),
            Some(437)
        );
    });
}

#[test]
fn requests_without_allocation_get_437() {
    each_backend("", &[], |relay| {
        let mut c = client(relay);
        c.learn_nonce();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(c.refresh(600).code(), Some(437));
        assert_eq!(c.create_permission(&[peer]).code(), Some(437));
        assert_eq!(c.channel_bind(0x4000, peer).code(), Some(437));
    });
}

#[test]
fn forbidden_peers_get_403_and_install_nothing() {
    each_backend("", &["--deny-peer", "127.0.0.99/32"], |relay| {
        let mut c = client(relay);
        c.allocate();
        let peer = peer_socket();
        let good = peer.local_addr().unwrap();
        for bad in ["0.0.0.1:5000", "224.0.0.1:5000", "255.255.255.255:5000", "127.0.0.99:5000"] {
            let bad: SocketAddr = bad.parse().unwrap();
            assert_eq!(c.create_permission(&[bad]).code(), Some(403), "{bad}");
            assert_eq!(c.channel_bind(0x4001, bad).code(), Some(403), "{bad}");
        }
        // One forbidden peer among several: 403 and no permission for the good one either.
        assert_eq!(c.create_permission(&[good, "0.0.0.1:1".parse().unwrap()]).code(), Some(403));
        c.send_indication(good, b"must not arrive");
        let mut buf = [0u8; 64];
        assert!(peer.recv_from(&mut buf).is_err(), "no permission was installed");
        assert_eq!(
            c.create_permission(&["[::1]:5000".parse().unwrap()]).code(),
            Some(443),
            "IPv6 peer on an IPv4 relay"
        );
    });
}

#[test]
fn channel_numbers_outside_rfc_8656_get_400() {
    each_backend("", &[], |relay| {
        let mut c = client(relay);
        c.allocate();
        let peer = peer_socket().local_addr().unwrap();
        for ch in [0x3FFF, 0x5000, 0x7FFF, 0x8000] {
            assert_eq!(c.channel_bind(ch, peer).code(), Some(400), "{ch:#x}");
        }
        assert_eq!(c.channel_bind(0x4FFF, peer).code(), None);
        let other = peer_socket().local_addr().unwrap();
        assert_eq!(c.channel_bind(0x4FFF, other).code(), Some(400), "channel rebound to another peer");
        assert_eq!(c.channel_bind(0x4000, peer).code(), Some(400), "peer bound to a second channel");
        let r = c.authenticated(Method::CHANNEL_BIND, |w| w.xor_address(attr::XOR_PEER_ADDRESS, &peer).map(drop));
        assert_eq!(r.code(), Some(400), "CHANNEL-NUMBER missing");
    });
}

#[test]
fn stale_nonce_gets_438_with_a_fresh_nonce() {
    each_backend("nonce-lifetime = 1\n", &[], |relay| {
        let mut c = client(relay);
        c.learn_nonce();
        std::thread::sleep(Duration::from_millis(2100));
        let r = c.authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP).map(drop));
        assert_eq!(r.code(), Some(438));
        let fresh = r.msg().nonce().unwrap().to_vec();
        assert_ne!(fresh, c.nonce);
        c.nonce = fresh;
        let r = c.authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP).map(drop));
        assert_eq!(r.code(), None, "the fresh nonce works");
        // A forged nonce is no better than a stale one.
        c.nonce = vec![b'0'; 24];
        assert_eq!(c.refresh(600).code(), Some(438));
    });
}

#[test]
fn another_users_credentials_on_an_allocation_get_441() {
    let config = "[users]\nalice = \"alice-pw\"\nbob = \"bob-pw\"\n";
    each_backend(config, &[], |relay| {
        let mut alice = Client::new(relay.addr, "alice", "alice-pw", "uturn.local");
        alice.allocate();
        let mut bob = Client::new(relay.addr, "bob", "bob-pw", "uturn.local");
        bob.sock = alice.sock.try_clone().unwrap();
        bob.nonce = alice.nonce.clone();
        assert_eq!(bob.refresh(600).code(), Some(441));
        assert_eq!(alice.refresh(600).code(), None);
    });
}

#[test]
fn quota_gets_486_and_port_exhaustion_508() {
    each_backend("user-quota = 1\n", &[], |relay| {
        let mut a = client(relay);
        a.allocate();
        let mut b = client(relay);
        b.learn_nonce();
        let r = b.authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP).map(drop));
        assert_eq!(r.code(), Some(486));
        // Deleting the first allocation frees the quota.
        assert_eq!(a.refresh(0).code(), None);
        std::thread::sleep(Duration::from_millis(100));
        let r = b.authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP).map(drop));
        assert_eq!(r.code(), None);
    });
    let port = uturn_tests::free_udp_port();
    // Two workers, two ports: each worker's slice holds one port.
    let config = format!("port-range = \"{port}-{}\"\n", port + 1);
    each_backend(&config, &[], |relay| {
        let mut results = Vec::new();
        for _ in 0..6 {
            let mut c = client(relay);
            c.learn_nonce();
            let r = c.authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP).map(drop));
            results.push((r.code(), c));
        }
        assert!(results.iter().filter(|(code, _)| code.is_none()).count() <= 2);
        assert!(
            results.iter().any(|(code, _)| *code == Some(508)),
            "{:?}",
            results.iter().map(|r| r.0).collect::<Vec<_>>()
        );
    });
}

#[test]
fn data_flows_both_ways_and_bad_input_is_dropped() {
    each_backend("", &[], |relay| {
        let mut c = client(relay);
        let relayed = c.allocate();
        let peer = peer_socket();
        let peer_addr = peer.local_addr().unwrap();
        let mut buf = [0u8; 2048];
        // Send indication -> peer, and the peer's answer as a Data indication.
        assert_eq!(c.create_permission(&[peer_addr]).code(), None);
        c.send_indication(peer_addr, b"via send");
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"via send"[..], relayed));
        peer.send_to(b"back as data", relayed).unwrap();
        let d = c.recv().unwrap();
        let m = Message::parse(&d).unwrap();
        assert_eq!((m.method(), m.class()), (Method::DATA, Class::Indication));
        assert_eq!(
            (m.get(attr::DATA), m.xor_address(attr::XOR_PEER_ADDRESS)),
            (Some(&b"back as data"[..]), Some(Ok(peer_addr)))
        );
        // ChannelData both ways once bound.
        assert_eq!(c.channel_bind(0x4001, peer_addr).code(), None);
        c.send_channel_data(0x4001, b"via channel");
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"via channel");
        peer.send_to(b"back on channel", relayed).unwrap();
        assert_eq!(c.recv().unwrap(), [&[0x40, 0x01, 0x00, 15][..], b"back on channel"].concat());
        // Garbage, bad ChannelData lengths, unbound channels, stray responses and indications:
        // no answer, and the session carries on.
        let junk: [&[u8]; 6] = [
            &[0xFF; 40],
            &[0x40, 0x01, 0x01, 0x00, 1, 2],
            &[0x40, 0x02, 0x00, 0x01, 9],
            &[0x00, 0x01, 0x00],
            &[0x01, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            &[],
        ];
        for j in junk {
            c.send_raw(j);
        }
        c.send_raw(&build(Method::BINDING, Class::Indication, TransactionId([5; 12]), None, |_| Ok(())));
        assert!(c.recv().is_none(), "nothing answers bad input or indications");
        assert!(peer.recv_from(&mut buf).is_err(), "nothing reached the peer");
        c.send_channel_data(0x4001, b"still alive");
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"still alive");
    });
}

#[test]
fn sigterm_stops_the_relay_within_a_second() {
    for backend in BACKENDS {
        let mut relay = Relay::start(backend, "", &[]);
        let mut c = client(&relay);
        c.allocate();
        let status = relay.terminate(Duration::from_secs(1)).expect("exited within 1 s");
        assert!(status.success(), "{backend}: {status:?}\n{}", relay.log());
    }
}
