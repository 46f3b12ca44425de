//! Adversarial input against the started binary: malformed headers and attributes, attributes
//! after MESSAGE-INTEGRITY, bad FINGERPRINT, forbidden peers in every spelling, oversized
//! datagrams, a flood of 100,000 garbage datagrams beside a live session that must lose
//! nothing, and what a worker panic does. On both I/O backends.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use uturn_tests::uturn_proto::wire::{attr, Class, MessageWriter, Method, TransactionId};
use uturn_tests::{build, peer_socket, Client, Relay, BACKENDS};

const UDP: u32 = 17 << 24;

fn client(relay: &Relay) -> Client {
    Client::new(relay.addr, "demo", "demo", "uturn.local")
}

/// A signed Allocate whose `after` attributes follow MESSAGE-INTEGRITY (then FINGERPRINT).
fn allocate_with_trailer(c: &Client, after: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
    let mut buf = vec![0u8; 1024];
    let mut w = MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Request, TransactionId(rand::random())).unwrap();
    w.u32(attr::REQUESTED_TRANSPORT, UDP).unwrap();
    w.bytes(attr::USERNAME, c.user.as_bytes()).unwrap();
    w.bytes(attr::REALM, c.realm.as_bytes()).unwrap();
    w.bytes(attr::NONCE, &c.nonce).unwrap();
    w.integrity(c.key.as_bytes()).unwrap();
    after(&mut w);
    w.fingerprint().unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

#[test]
fn malformed_stun_is_dropped_silently() {
    for backend in BACKENDS {
        let relay = Relay::start(backend, "", &[]);
        let mut c = client(&relay);
        c.learn_nonce();
        let good = c.signed_request(Method::ALLOCATE, TransactionId([3; 12]), |w| {
            w.u32(attr::REQUESTED_TRANSPORT, UDP).map(drop)
        });
        let mut bad = Vec::new();
        bad.push(good[..19].to_vec()); // truncated header
        let mut long = good.clone();
        long[2..4].copy_from_slice(&((good.len() as u16) + 40).to_be_bytes()); // length beyond datagram
        bad.push(long);
        let mut short = good.clone();
        short[2..4].copy_from_slice(&((good.len() as u16) - 24).to_be_bytes()); // length shorter
        bad.push(short);
        let mut attr_over = good.clone();
        attr_over[22..24].copy_from_slice(&0x0400u16.to_be_bytes()); // first attribute runs past the end
        bad.push(attr_over);
        let mut fp = good.clone();
        let n = fp.len();
        fp[n - 1] ^= 0xFF; // bad FINGERPRINT
        bad.push(fp);
        let mut cookie = good.clone();
        cookie[4] ^= 1;
        bad.push(cookie);
        let mut odd = good.clone();
        odd.push(0); // datagram one byte longer than the message
        bad.push(odd);
        for b in &bad {
            c.send_raw(b);
        }
        assert!(c.recv().is_none(), "{backend}: no answer to malformed STUN");
        // The well-formed request still works afterwards.
        assert_eq!(c.transact(&good).unwrap().code(), None, "{backend}");
    }
}

#[test]
fn attributes_after_integrity_are_ignored_and_duplicates_take_the_first() {
    for backend in BACKENDS {
        let relay = Relay::start(backend, "", &[]);
        let mut c = client(&relay);
        c.learn_nonce();
        // An unknown comprehension-required attribute and a TCP transport after MI: ignored.
        let req = allocate_with_trailer(&c, |w| {
            w.u32(0x0031, 1).unwrap();
            w.u32(attr::REQUESTED_TRANSPORT, 6 << 24).unwrap();
        });
        let r = c.transact(&req).unwrap();
        assert_eq!(r.code(), None, "{backend}: trailing attributes must not count");
        // Duplicate LIFETIME: the first (0 = delete) counts, not the second.
        let r = c.authenticated(Method::REFRESH, |w| {
            w.u32(attr::LIFETIME, 0)?;
            w.u32(attr::LIFETIME, 600).map(drop)
        });
        assert_eq!(r.msg().u32_attr(attr::LIFETIME), Some(Ok(0)), "{backend}");
        assert_eq!(c.refresh(600).code(), Some(437), "{backend}: deleted by the first LIFETIME");
    }
}

#[test]
fn forbidden_peers_in_every_spelling() {
    for backend in BACKENDS {
        let relay = Relay::start(backend, "", &[]);
        let mut c = client(&relay);
        c.allocate();
        let listener = relay.addr;
        let forbidden: Vec<SocketAddr> = [
            "169.254.169.254:80", // cloud metadata (link-local)
            "10.0.0.1:5000",
            "172.16.0.1:5000",
            "192.168.1.1:5000",
            "100.64.0.1:5000",
            "240.0.0.1:5000",
            "255.255.255.255:5000",
            "0.0.0.0:5000",
            "224.0.0.251:5353",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .chain([listener])
        .collect();
        for peer in forbidden {
            assert_eq!(c.create_permission(&[peer]).code(), Some(403), "{backend}: {peer}");
            assert_eq!(c.channel_bind(0x4002, peer).code(), Some(403), "{backend}: {peer}");
            c.send_indication(peer, b"x");
        }
        // IPv6 spellings of IPv4 addresses on an IPv4 relay: family mismatch, never installed.
        for v6 in ["[::ffff:127.0.0.1]:5000", "[::127.0.0.1]:5000", "[64:ff9b::7f00:1]:5000", "[::1]:5000"] {
            let peer: SocketAddr = v6.parse().unwrap();
            assert_eq!(c.create_permission(&[peer]).code(), Some(443), "{backend}: {peer}");
        }
        assert!(c.recv().is_none(), "{backend}: Send indications to forbidden peers are dropped silently");
    }
}

/// The sum of `field=N` over the log lines that contain `message` (one per worker).
fn logged_total(log: &str, message: &str, field: &str) -> u64 {
    let key = format!("{field}=");
    log.lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| l.split(key.as_str()).nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn oversized_datagrams_are_dropped_and_the_session_continues() {
    for backend in BACKENDS {
        let mut relay = Relay::start(backend, "", &[]);
        let mut c = client(&relay);
        let relayed = c.allocate();
        let peer = peer_socket();
        let peer_addr = peer.local_addr().unwrap();
        assert_eq!(c.channel_bind(0x4001, peer_addr).code(), None, "{backend}");
        let mut buf = vec![0u8; 65_536];

        // Too big on both backends: the largest IPv4 UDP payload (65,507 bytes) from the bound
        // peer would be 65,511 bytes as ChannelData, which no IPv4 datagram carries. io_uring
        // drops it on receipt (past its 2048-byte buffers), epoll when the kernel refuses the
        // send; either way nothing, and nothing cut short, reaches the client.
        peer.send_to(&vec![1u8; 65_507], relayed).unwrap();
        let got = c.recv();
        assert_eq!(got.map(|d| d.len()), None, "{backend}: a 65,507-byte peer datagram reached the client");
        // 9,000 bytes that are not a STUN message (length field 0): never answered.
        c.send_raw(&vec![0u8; 9000]);
        let got = c.recv();
        assert_eq!(got.map(|d| d.len()), None, "{backend}: a 9,000-byte non-message was answered");

        // Past the io_uring backend's 2048-byte buffers but a fine UDP datagram: a 4,004-byte
        // ChannelData message from the client and an 8,000-byte datagram from the peer. io_uring
        // drops both (MSG_TRUNC: never a truncated prefix relayed); epoll's 64 KiB buffers hold
        // them, and it relays them whole.
        let mut big = vec![0x40, 0x01, 0x0F, 0xA0];
        big.extend(vec![7u8; 4000]);
        c.send_raw(&big);
        peer.send_to(&vec![1u8; 8000], relayed).unwrap();
        let to_peer = peer.recv_from(&mut buf).ok().map(|(n, from)| (buf[..n].to_vec(), from));
        let to_client = c.recv();
        if backend == "uring" {
            assert_eq!(to_peer.map(|(d, _)| d.len()), None, "{backend}: 4,004-byte ChannelData relayed to the peer");
            assert_eq!(to_client.map(|d| d.len()), None, "{backend}: 8,000-byte peer datagram relayed to the client");
        } else {
            assert_eq!(to_peer, Some((vec![7u8; 4000], relayed)), "{backend}: ChannelData payload to the peer");
            let d = to_client.unwrap_or_else(|| panic!("{backend}: 8,000-byte peer datagram not relayed"));
            assert_eq!(d.len(), 8004, "{backend}");
            assert_eq!(d[..4], [0x40, 0x01, 0x1F, 0x40], "{backend}: ChannelData header");
            assert!(d[4..].iter().all(|&b| b == 1), "{backend}: payload to the client");
        }
        // Nothing else came of any of it.
        assert!(peer.recv_from(&mut buf).is_err(), "{backend}: stray datagram to the peer");
        assert!(c.recv().is_none(), "{backend}: stray datagram to the client");

        // The session continues, both ways, and the relay still answers requests.
        c.send_channel_data(0x4001, b"after the big ones");
        let (n, from) = peer.recv_from(&mut buf).unwrap_or_else(|e| panic!("{backend}: client -> peer: {e}"));
        assert_eq!((&buf[..n], from), (&b"after the big ones"[..], relayed), "{backend}");
        peer.send_to(b"and back", relayed).unwrap();
        let back = c.recv().unwrap_or_else(|| panic!("{backend}: peer -> client lost"));
        assert_eq!(back, b"\x40\x01\x00\x08and back", "{backend}");
        assert_eq!(c.refresh(600).code(), None, "{backend}: Refresh after the big ones");

        let status = relay.terminate(Duration::from_secs(2)).expect("stops");
        assert!(status.success(), "{backend}");
        let log = relay.log();
        assert!(!log.contains("panicked"), "{log}");
        if backend == "uring" {
            // The four datagrams past its buffers were dropped as truncated, and counted.
            let truncated = logged_total(&log, "datagrams dropped by the io_uring backend", "truncated");
            assert_eq!(truncated, 4, "{backend}: datagrams dropped as truncated\n{log}");
        }
    }
}

fn garbage(i: u32, rng: &mut impl rand::RngCore) -> Vec<u8> {
    let len = (rng.next_u32() % 300) as usize;
    let mut d = vec![0u8; len];
    rng.fill_bytes(&mut d);
    match i % 5 {
        0 => d,
        1 if len >= 20 => {
            // STUN-looking header with random attributes.
            d[0] &= 0x3F;
            d[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
            d
        }
        2 if len >= 4 => {
            // ChannelData on random (mostly unbound) channels with random lengths.
            d[0] = 0x40 | (d[0] & 0x3F);
            d
        }
        3 => build(Method::SEND, Class::Indication, TransactionId([i as u8; 12]), None, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, &"127.0.0.1:9".parse().unwrap())?;
            w.bytes(attr::DATA, &d).map(drop)
        }),
        _ => build(Method::ALLOCATE, Class::Request, TransactionId([i as u8; 12]), None, |w| {
            w.bytes(0x0031, &d).map(drop)
        }),
    }
}

#[test]
fn a_garbage_flood_does_not_cost_a_live_session_a_packet() {
    for backend in BACKENDS {
        let mut relay = Relay::start(backend, "", &[]);
        let mut c = client(&relay);
        let relayed = c.allocate();
        let peer = peer_socket();
        let peer_addr = peer.local_addr().unwrap();
        assert_eq!(c.channel_bind(0x4001, peer_addr).code(), None);
        let target = relay.addr;
        let flood = std::thread::spawn(move || {
            let socks: Vec<UdpSocket> = (0..8).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
            let mut rng = rand::thread_rng();
            let start = Instant::now();
            for i in 0..100_000u32 {
                let _ = socks[(i % 8) as usize].send_to(&garbage(i, &mut rng), target);
                // About 40,000 datagrams/s: a flood, but within what loopback buffers absorb.
                if i % 400 == 0 {
                    let due = Duration::from_micros(i as u64 * 25);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        });
        // Ping-pong through the relay while the flood runs: every packet must come back.
        let mut buf = [0u8; 2048];
        let mut exchanged = 0;
        while !flood.is_finished() || exchanged < 200 {
            let msg = format!("live {exchanged}");
            c.send_channel_data(0x4001, msg.as_bytes());
            let (n, from) = peer.recv_from(&mut buf).expect("client -> peer lost during the flood");
            assert_eq!((&buf[..n], from), (msg.as_bytes(), relayed));
            peer.send_to(msg.as_bytes(), relayed).unwrap();
            let back = loop {
                let d = c.recv().expect("peer -> client lost during the flood");
                if d.starts_with(&[0x40, 0x01]) {
                    break d;
                }
            };
            assert_eq!(&back[4..], msg.as_bytes(), "{backend}");
            exchanged += 1;
        }
        flood.join().unwrap();
        assert!(exchanged >= 200, "{backend}: {exchanged}");
        let status = relay.terminate(Duration::from_secs(2)).expect("stops");
        assert!(status.success(), "{backend}");
        let log = relay.log();
        let malformed: u64 = log
            .lines()
            .filter(|l| l.contains("worker stopped"))
            .filter_map(|l| {
                l.split("malformed=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .trim_matches(|c: char| !c.is_ascii_digit())
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        assert!(malformed > 10_000, "{backend}: garbage counted as malformed: {malformed}\n{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
}

#[test]
fn a_worker_panic_stops_the_process_with_a_clear_log() {
    for backend in BACKENDS {
        let mut relay = Relay::start_with_env(backend, "", &[], &[("UTURN_FAULT_INJECTION", "worker-panic")]);
        let c = client(&relay);
        c.send_raw(b"uturn-fault-injection:worker-panic");
        let status = relay.terminate_after(Duration::from_secs(3));
        let log = relay.log();
        let status = status.unwrap_or_else(|| panic!("{backend}: still running after a worker panic\n{log}"));
        assert!(!status.success(), "{backend}: exit status must tell a supervisor to restart");
        assert!(log.contains("worker stopped unexpectedly"), "{log}");
    }
}

/// Bytes answered per byte received for every request a stranger can send without credentials;
/// printed for docs/security.md and bounded here.
#[test]
fn unauthenticated_answers_are_small_and_rate_limited() {
    // 100 per source for the relay: 50 per worker, and one socket is served by one worker.
    let relay = Relay::start("uring", "unauth-rate = 100\n", &[]);
    let c = client(&relay);
    let tid = || TransactionId(rand::random());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("Binding request (20 B)", build(Method::BINDING, Class::Request, tid(), None, |_| Ok(()))),
        ("Allocate, no attributes (20 B)", build(Method::ALLOCATE, Class::Request, tid(), None, |_| Ok(()))),
        (
            "Allocate with REQUESTED-TRANSPORT (28 B)",
            build(Method::ALLOCATE, Class::Request, tid(), None, |w| w.u32(attr::REQUESTED_TRANSPORT, UDP).map(drop)),
        ),
        ("Refresh, no attributes (20 B)", build(Method::REFRESH, Class::Request, tid(), None, |_| Ok(()))),
        ("unknown method 0x0FF (20 B)", build(Method(0x0FF), Class::Request, tid(), None, |_| Ok(()))),
    ];
    for (name, req) in &cases {
        let r = c.transact(req).expect("answered");
        let ratio = r.0.len() as f64 / req.len() as f64;
        println!("amplification: {name}: {} B -> {} B = {ratio:.2}x", req.len(), r.0.len());
        // The largest is the 401 (ERROR-CODE "Unauthenticated", REALM, a NONCE with RFC 8489's
        // cookie, PASSWORD-ALGORITHMS): 124 B for 20 B.
        assert!(ratio <= 6.2, "{name}: {ratio:.2}");
    }
    // Offering MD5 alone gives RFC 5389's smaller 401: 96 B.
    let md5_only = Relay::start("uring", "password-algorithms = [\"md5\"]\n", &[]);
    let r = client(&md5_only).transact(&cases[1].1).expect("answered");
    println!("amplification with password-algorithms = [\"md5\"]: 20 B -> {} B", r.0.len());
    assert_eq!(r.0.len(), 96);
    // Indications, responses and garbage are never answered (ratio 0).
    c.send_raw(&build(Method::SEND, Class::Indication, tid(), None, |_| Ok(())));
    c.send_raw(&build(Method::BINDING, Class::Success, tid(), None, |_| Ok(())));
    c.send_raw(&[0xFF; 100]);
    assert!(c.recv().is_none());
    // A burst from one source IP (one 5-tuple, one worker): at most its worker's share, 50.
    let req = build(Method::BINDING, Class::Request, tid(), None, |_| Ok(()));
    for _ in 0..400 {
        c.send_raw(&req);
    }
    let mut answers = 0;
    while c.recv().is_some() {
        answers += 1;
    }
    println!("rate limit: 400 Binding requests in a burst from one IP -> {answers} answers");
    assert!((30..=55).contains(&answers), "{answers} answers");
}
