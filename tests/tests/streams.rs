//! TURN over TCP and TLS under abuse (docs/security.md, "TCP and TLS connections"): a stalled
//! reader is disconnected while other sessions keep flowing, slowloris and idle connections are
//! cut off, a TLS handshake has a deadline, connections are capped per source and in total,
//! bytes that are neither STUN nor ChannelData close only their own connection, and a
//! certificate replaced on SIGHUP serves new handshakes without dropping an established one.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use uturn_bench::client::stream::StreamClient;
use uturn_tests::{peer_socket, Client, Relay, TlsFiles};

fn connect(relay: &Relay, tls: bool) -> StreamClient {
    let addr = if tls { relay.tls.unwrap() } else { relay.tcp.unwrap() };
    StreamClient::connect(addr, tls, "demo", "demo", "uturn.local").expect("connect")
}

/// An echo peer on its own thread: echoes `limit` datagrams or stops after `for_how_long`.
fn echo_peer(for_how_long: Duration) -> (SocketAddr, std::thread::JoinHandle<u64>) {
    let s = peer_socket();
    let addr = s.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let deadline = Instant::now() + for_how_long;
        let mut n = 0;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if let Ok((len, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..len], from);
                n += 1;
            }
        }
        n
    });
    (addr, h)
}

/// A stream client with an allocation and channel 0x4000 bound to `peer`.
fn bound(relay: &Relay, tls: bool, peer: SocketAddr) -> (StreamClient, SocketAddr) {
    let mut c = connect(relay, tls);
    let relayed = c.allocate().expect("allocate");
    c.bind_channel(0x4000, peer).expect("channel bind");
    (c, relayed)
}

/// One ChannelData round trip through the relay (payload `tag`), within 2 s.
fn round_trip(c: &mut StreamClient, tag: &[u8]) -> bool {
    c.send_channel_data(0x4000, tag).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match c.recv(Duration::from_millis(200)) {
            Ok(Some(m)) if m.len() >= 4 && &m[4..] == tag => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

#[test]
fn a_stalled_reader_is_dropped_while_other_sessions_keep_flowing() {
    for backend in ["uring", "epoll"] {
        let tls = TlsFiles::generate();
        let config = "stream-write-queue = 65536\nstream-stall-timeout = 2\n";
        let relay = Relay::start_streams(backend, config, &[], &tls);
        let (echo, echo_thread) = echo_peer(Duration::from_secs(12));
        // The stalled client: a tiny receive buffer it never reads.
        let (stalled, stalled_relayed) = bound(&relay, false, echo);
        stalled.set_recv_buffer(65536);
        // Healthy clients over TCP, TLS and UDP.
        let (mut tcp, _) = bound(&relay, false, echo);
        let (mut tls_client, _) = bound(&relay, true, echo);
        let mut udp = Client::new(relay.addr, "demo", "demo", "uturn.local");
        udp.allocate();
        assert_eq!(udp.channel_bind(0x4000, echo).code(), None);
        // A flooding peer aims 1,000-byte datagrams at the stalled client's relayed address.
        let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut perm = stalled;
        assert!(perm
            .transact_authenticated(uturn_tests::uturn_proto::wire::Method::CREATE_PERMISSION, |w| {
                w.xor_address(uturn_tests::uturn_proto::wire::attr::XOR_PEER_ADDRESS, &flood.local_addr().unwrap())
                    .map(drop)
            })
            .is_ok_and(|r| r.code().is_none()));
        let payload = vec![0x55u8; 1000];
        let start = Instant::now();
        let mut rounds = 0;
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(5) {
            for _ in 0..200 {
                let _ = flood.send_to(&payload, stalled_relayed);
                sent += 1;
            }
            let tag = format!("round {rounds}");
            assert!(round_trip(&mut tcp, tag.as_bytes()), "{backend}: TCP session stalled at round {rounds}");
            assert!(round_trip(&mut tls_client, tag.as_bytes()), "{backend}: TLS session stalled at round {rounds}");
            udp.send_channel_data(0x4000, tag.as_bytes());
            let got = udp.recv().expect("UDP echo");
            assert_eq!(&got[4..], tag.as_bytes(), "{backend}: UDP session");
            rounds += 1;
        }
        assert!(sent >= 20_000 || rounds > 10, "{backend}: the flood ran ({sent} datagrams, {rounds} rounds)");
        assert!(
            relay.wait_log("reason=\"stalled\"", Duration::from_secs(5)),
            "{backend}: the stalled reader was not disconnected:\n{}",
            relay.log()
        );
        assert!(relay.wait_log("reason=\"connection closed\"", Duration::from_secs(2)));
        let t = Instant::now();
        let closed = perm.closed_within(Duration::from_secs(3));
        eprintln!("{backend}: stalled connection closed={closed} after {:?}", t.elapsed());
        assert!(closed, "{backend}: stalled connection still open");
        // Everyone else is still served.
        assert!(round_trip(&mut tcp, b"after"), "{backend}");
        assert!(round_trip(&mut tls_client, b"after"), "{backend}");
        drop(echo_thread);
    }
}

#[test]
fn slowloris_idle_and_handshake_deadlines_cut_connections_off() {
    let tls = TlsFiles::generate();
    let config = "stream-frame-timeout = 2\nstream-idle-timeout = 2\ntls-handshake-timeout = 2\n";
    let relay = Relay::start_streams("uring", config, &[], &tls);
    // Slowloris: a Binding request one byte every 400 ms.
    let mut slow = connect(&relay, false);
    let req = uturn_tests::build(
        uturn_tests::uturn_proto::wire::Method::BINDING,
        uturn_tests::uturn_proto::wire::Class::Request,
        uturn_tests::uturn_proto::wire::TransactionId(rand::random()),
        None,
        |_| Ok(()),
    );
    let started = Instant::now();
    let mut cut = false;
    for b in &req {
        if slow.send_raw(&[*b]).is_err() || slow.recv(Duration::from_millis(400)).is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut || slow.closed_within(Duration::from_secs(2)), "slowloris connection survived");
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(relay.wait_log("reason=\"frame_timeout\"", Duration::from_secs(2)), "{}", relay.log());
    // Idle: a Binding answered, then silence.
    let mut idle = connect(&relay, false);
    let r = idle.transact(&req).expect("Binding over TCP");
    assert!(r.msg().xor_address(uturn_tests::uturn_proto::wire::attr::XOR_MAPPED_ADDRESS).is_some());
    assert!(idle.closed_within(Duration::from_secs(5)), "idle connection survived");
    assert!(relay.wait_log("reason=\"idle\"", Duration::from_secs(2)), "{}", relay.log());
    // An allocation keeps its connection open past the idle timeout.
    let mut busy = connect(&relay, false);
    busy.allocate().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(busy.transact(&req).is_ok(), "a connection with an allocation must not idle out");
    // A TLS handshake that never starts.
    let silent = std::net::TcpStream::connect(relay.tls.unwrap()).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut &silent, &mut buf);
    assert!(matches!(n, Ok(0) | Err(_)), "the server kept a silent TLS connection: {n:?}");
    assert!(relay.wait_log("reason=\"handshake_timeout\"", Duration::from_secs(2)), "{}", relay.log());
}

/// Connections that stay open (a Binding answered) out of `n` attempts.
fn open_connections(relay: &Relay, n: usize) -> (Vec<StreamClient>, usize) {
    let req = uturn_tests::build(
        uturn_tests::uturn_proto::wire::Method::BINDING,
        uturn_tests::uturn_proto::wire::Class::Request,
        uturn_tests::uturn_proto::wire::TransactionId([7; 12]),
        None,
        |_| Ok(()),
    );
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        let mut c = connect(relay, false);
        if c.transact(&req).is_ok() {
            open.push(c);
        } else {
            refused += 1;
        }
    }
    (open, refused)
}

#[test]
fn connections_are_capped_per_source_and_in_total() {
    let tls = TlsFiles::generate();
    let relay = Relay::start_streams("uring", "max-connections-per-ip = 3\n", &[], &tls);
    let (open, refused) = open_connections(&relay, 10);
    // Three per source on the whole relay, whichever of the two workers accepts.
    assert_eq!(open.len(), 3, "{} open", open.len());
    assert_eq!(open.len() + refused, 10);
    drop(open);
    let relay = Relay::start_streams("epoll", "max-connections = 4\n", &[], &tls);
    let (open, refused) = open_connections(&relay, 7);
    assert_eq!((open.len(), refused), (4, 3));
    drop(open);
    // Closed connections free their places.
    std::thread::sleep(Duration::from_millis(300));
    let (again, _) = open_connections(&relay, 2);
    assert_eq!(again.len(), 2);
}

#[test]
fn bad_framing_closes_only_its_own_connection() {
    let tls = TlsFiles::generate();
    let relay = Relay::start_streams("uring", "", &[], &tls);
    let (echo, _t) = echo_peer(Duration::from_secs(5));
    let (mut good, _) = bound(&relay, true, echo);
    let mut bad = connect(&relay, false);
    bad.send_raw(&[0xff; 64]).unwrap();
    assert!(bad.closed_within(Duration::from_secs(3)));
    assert!(relay.wait_log("reason=\"bad_framing\"", Duration::from_secs(2)));
    assert!(round_trip(&mut good, b"still here"));
}

#[test]
fn a_certificate_replaced_on_sighup_serves_new_handshakes_without_dropping_old_ones() {
    let tls = TlsFiles::generate();
    let relay = Relay::start_streams("uring", "", &[], &tls);
    let (echo, _t) = echo_peer(Duration::from_secs(10));
    let (mut old, _) = bound(&relay, true, echo);
    let first = old.server_cert.clone().expect("a certificate");
    assert!(round_trip(&mut old, b"before"));
    tls.regenerate();
    relay.signal("HUP");
    assert!(relay.wait_log("TLS certificate reloaded", Duration::from_secs(5)), "{}", relay.log());
    let fresh = connect(&relay, true);
    let second = fresh.server_cert.clone().expect("a certificate");
    assert_ne!(first, second, "new handshakes must present the new certificate");
    assert!(round_trip(&mut old, b"after"), "the established TLS connection must survive the reload");
}
