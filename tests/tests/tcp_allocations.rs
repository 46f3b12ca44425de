//! TCP allocations (RFC 6062) against real TCP peers on loopback, over TCP and TLS control
//! connections, on both I/O backends: Connect and ConnectionAttempt, ConnectionBind on a new
//! connection (whichever worker the kernel gives it to), bytes both ways as they are, the
//! 446/447/400 errors, a peer without a permission closed at once, and every connection
//! closed when the allocation's control connection closes (§5.5); peer connections held to
//! `max-connections`, and the relay's own services refused as peers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use uturn_bench::client::stream::StreamClient;
use uturn_tests::uturn_proto::wire::{attr, Class, Message, Method};
use uturn_tests::{uturn_cli, Client, Relay, Response, TlsFiles};

/// The peers here listen on 127.0.0.1, the relay's own address: a TCP allocation reaches them
/// only when `allow-peer` lists it (docs/security.md).
const ALLOW_LOOPBACK: &str = "allow-peer = [\"127.0.0.1/32\"]\n";

fn control(relay: &Relay, tls: bool) -> StreamClient {
    let addr = if tls { relay.tls.unwrap() } else { relay.tcp.unwrap() };
    StreamClient::connect(addr, tls, "demo", "demo", "uturn.local").expect("connect")
}

/// A TCP allocation on a new control connection; returns it and its relayed address.
fn tcp_allocation(relay: &Relay, tls: bool) -> (StreamClient, SocketAddr) {
    let mut c = control(relay, tls);
    let r = c.allocate_transport(6, |_| Ok(())).expect("TCP Allocate");
    let relayed = r.msg().xor_address(attr::XOR_RELAYED_ADDRESS).expect("XOR-RELAYED-ADDRESS").unwrap();
    (c, relayed)
}

fn connection_id(r: &Response) -> Option<u32> {
    r.msg().get(attr::CONNECTION_ID).and_then(|v| <[u8; 4]>::try_from(v).ok()).map(u32::from_be_bytes)
}

fn connect(c: &mut StreamClient, peer: SocketAddr) -> Response {
    c.transact_authenticated(Method::CONNECT, |w| w.xor_address(attr::XOR_PEER_ADDRESS, &peer).map(drop))
        .expect("Connect answered")
}

/// A new data connection bound to `id` with `ctl`'s credentials; the ConnectionBind response.
fn data_connection(relay: &Relay, tls: bool, ctl: &StreamClient, id: u32) -> (StreamClient, Response) {
    let mut d = control(relay, tls);
    d.adopt_credentials(ctl);
    let r = d
        .transact_authenticated(Method::CONNECTION_BIND, |w| w.bytes(attr::CONNECTION_ID, &id.to_be_bytes()).map(drop))
        .expect("ConnectionBind answered");
    (d, r)
}

/// Reads from a data connection until `want` bytes arrived (at most 10 s).
fn read_data(d: &mut StreamClient, want: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        got.extend(d.recv_raw(Duration::from_millis(200)).expect("data connection open"));
    }
    got
}

fn read_peer(p: &mut TcpStream, want: usize) -> Vec<u8> {
    p.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < want && Instant::now() < deadline {
        match p.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    got
}

/// True once `p` sees the relay close it (EOF or reset) within `limit`.
fn peer_closed_within(p: &mut TcpStream, limit: Duration) -> bool {
    p.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match p.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// The next ConnectionAttempt indication on `c` (at most 3 s): its CONNECTION-ID and
/// XOR-PEER-ADDRESS.
fn connection_attempt(c: &mut StreamClient) -> Option<(u32, SocketAddr)> {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let Ok(Some(m)) = c.recv(Duration::from_millis(200)) else { continue };
        let Ok(msg) = Message::parse(&m) else { continue };
        if msg.class() == Class::Indication && msg.method() == Method::CONNECTION_ATTEMPT {
            let id = msg.get(attr::CONNECTION_ID).and_then(|v| <[u8; 4]>::try_from(v).ok()).map(u32::from_be_bytes)?;
            let peer = msg.xor_address(attr::XOR_PEER_ADDRESS)?.ok()?;
            return Some((id, peer));
        }
    }
    None
}

fn relays_both_ways(backend: &str, tls: bool) {
    let files = TlsFiles::generate();
    let relay = Relay::start_streams(backend, ALLOW_LOOPBACK, &[], &files);
    let peer = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (mut ctl, relayed) = tcp_allocation(&relay, tls);

    // Client-initiated (§5.2): the peer sees the connection come from the relayed address.
    let r = connect(&mut ctl, peer_addr);
    assert_eq!(r.code(), None, "Connect failed");
    let id = connection_id(&r).expect("CONNECTION-ID in the Connect success");
    let (mut from_relay, seen) = peer.accept().unwrap();
    assert_eq!(seen, relayed, "the outgoing connection's local endpoint is the relayed address");
    // Sent before the ConnectionBind: held, then delivered (§5.4).
    from_relay.write_all(b"early bytes from the peer").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (mut data, r) = data_connection(&relay, tls, &ctl, id);
    assert_eq!(r.code(), None, "ConnectionBind failed");
    assert_eq!(read_data(&mut data, 25), b"early bytes from the peer");
    // Bytes that look like STUN or ChannelData are data here: relayed as they are.
    let mut stun_like = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    stun_like.extend_from_slice(&[7u8; 300]);
    data.send_raw(&stun_like).unwrap();
    assert_eq!(read_peer(&mut from_relay, stun_like.len()), stun_like);
    // 4 MB, 16 times the write queue, from a peer that writes as fast as it can: the relay
    // holds it back (backpressure) instead of dropping the pair.
    let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut writer = from_relay.try_clone().unwrap();
    let sent = big.clone();
    let bulk = std::thread::spawn(move || writer.write_all(&sent).is_ok());
    assert!(read_data(&mut data, big.len()) == big, "4 MB from the peer arrive whole and in order");
    assert!(bulk.join().unwrap(), "the peer's bulk write failed");

    // §5.2: a second Connect to the same peer is 446; a refused connection is 447.
    assert_eq!(connect(&mut ctl, peer_addr).code(), Some(446));
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    assert_eq!(connect(&mut ctl, closed).code(), Some(447));

    // §5.4: an unknown CONNECTION-ID is 400, and that connection goes on reading STUN.
    let (mut stray, r) = data_connection(&relay, tls, &ctl, id ^ 0x5555_5555);
    assert_eq!(r.code(), Some(400));
    let binding = uturn_tests::build(Method::BINDING, Class::Request, Default::default(), None, |_| Ok(()));
    assert_eq!(stray.transact(&binding).expect("Binding after a refused ConnectionBind").code(), None);
    // The CONNECTION-ID already bound is not pending any more: 400.
    let (_again, r) = data_connection(&relay, tls, &ctl, id);
    assert_eq!(r.code(), Some(400));

    // Peer-initiated (§5.3), with a permission: ConnectionAttempt, then a bound pair.
    let r = ctl
        .transact_authenticated(Method::CREATE_PERMISSION, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, &peer_addr).map(drop)
        })
        .unwrap();
    assert_eq!(r.code(), None);
    let mut incoming = TcpStream::connect(relayed).unwrap();
    let (id2, from) = connection_attempt(&mut ctl).expect("ConnectionAttempt");
    assert_eq!(from, incoming.local_addr().unwrap());
    let (mut data2, r) = data_connection(&relay, tls, &ctl, id2);
    assert_eq!(r.code(), None);
    incoming.write_all(b"ping").unwrap();
    assert_eq!(read_data(&mut data2, 4), b"ping");
    data2.send_raw(b"pong").unwrap();
    assert_eq!(read_peer(&mut incoming, 4), b"pong");

    // The peer sends 1 MB and closes at once, to a client that reads slowly (so bytes wait in
    // the relay when the peer's close arrives): every byte still arrives, then the data
    // connection closes.
    data2.set_recv_buffer(16 * 1024);
    let last: Vec<u8> = (0..1_000_000u32).map(|i| (i % 249) as u8).collect();
    let sent = last.clone();
    let closer = std::thread::spawn(move || {
        let ok = incoming.write_all(&sent).is_ok();
        drop(incoming);
        ok
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < last.len() && Instant::now() < deadline {
        match data2.recv_raw(Duration::from_millis(200)) {
            Ok(b) => got.extend(b),
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(got == last, "the peer's last bytes before its close were lost: {} of {}", got.len(), last.len());
    assert!(closer.join().unwrap());
    assert!(data2.closed_within(Duration::from_secs(3)), "data connection outlived its peer connection");
    // The client data side closes: the peer side closes.
    let mut incoming = TcpStream::connect(relayed).unwrap();
    let (id3, _) = connection_attempt(&mut ctl).expect("ConnectionAttempt");
    let (data3, r) = data_connection(&relay, tls, &ctl, id3);
    assert_eq!(r.code(), None);
    drop(data3);
    assert!(peer_closed_within(&mut incoming, Duration::from_secs(3)), "peer connection outlived its data connection");

    // §5.5 / RFC 8656 §3.1: the control connection closes, the allocation ends, and its
    // data connections close.
    drop(ctl);
    assert!(data.closed_within(Duration::from_secs(3)), "data connection outlived its allocation");
    assert!(peer_closed_within(&mut from_relay, Duration::from_secs(3)), "peer connection outlived its allocation");
    let log = relay.log();
    assert!(log.contains("data connection bound"), "{log}");
    assert!(!log.contains("ERROR") && !log.contains("panicked"), "{log}");
}

fn permission_and_policy(backend: &str) {
    let files = TlsFiles::generate();
    let relay = Relay::start_streams(backend, ALLOW_LOOPBACK, &[], &files);
    let (mut ctl, relayed) = tcp_allocation(&relay, false);
    // §5.3: no permission for the peer: closed at once, and the client hears nothing.
    let mut uninvited = TcpStream::connect(relayed).unwrap();
    assert!(peer_closed_within(&mut uninvited, Duration::from_secs(3)), "a peer without a permission was kept");
    assert!(connection_attempt(&mut ctl).is_none(), "ConnectionAttempt for a peer without a permission");
    // RFC 6062: a TCP allocation has no channels; a Connect needs XOR-PEER-ADDRESS.
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let r = ctl
        .transact_authenticated(Method::CHANNEL_BIND, |w| {
            w.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)?;
            w.xor_address(attr::XOR_PEER_ADDRESS, &peer).map(drop)
        })
        .unwrap();
    assert_eq!(r.code(), Some(400), "ChannelBind on a TCP allocation");
    let r = ctl.transact_authenticated(Method::CONNECT, |_| Ok(())).unwrap();
    assert_eq!(r.code(), Some(400), "Connect without XOR-PEER-ADDRESS");
    // The relay's own listen addresses are not peers (docs/security.md): 403.
    let r = connect(&mut ctl, relay.tcp.unwrap());
    assert_eq!(r.code(), Some(403), "Connect to the relay itself");

    // §5.1: EVEN-PORT (or RESERVATION-TOKEN, DONT-FRAGMENT) with TCP is 400.
    let mut c = control(&relay, false);
    let err = c.allocate_transport(6, |w| w.bytes(attr::EVEN_PORT, &[0x80]).map(drop)).err().expect("refused");
    assert!(err.contains("400"), "{err}");
    let mut c = control(&relay, false);
    let err = c.allocate_transport(6, |w| w.bytes(attr::DONT_FRAGMENT, &[]).map(drop)).err().expect("refused");
    assert!(err.contains("400"), "{err}");
    // A Connect on a UDP allocation is 400.
    let mut udp_alloc = control(&relay, false);
    udp_alloc.allocate().unwrap();
    assert_eq!(connect(&mut udp_alloc, peer).code(), Some(400));

    // §5.1, §5.4 over UDP: REQUESTED-TRANSPORT TCP and ConnectionBind are 400.
    let mut udp = Client::new(relay.addr, "demo", "demo", "uturn.local");
    udp.learn_nonce();
    let r =
        udp.transact_authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, 6 << 24).map(drop)).unwrap();
    assert_eq!(r.code(), Some(400), "TCP allocation over UDP");
    let r = udp.unauthenticated(Method::CONNECTION_BIND, |w| w.bytes(attr::CONNECTION_ID, &[0, 0, 0, 1]).map(drop));
    assert_eq!(r.code(), Some(400), "ConnectionBind over UDP");
    assert!(!relay.log().contains("panicked"));
}

/// The ConnectionAttempts that arrive on `c` until none has for 1 s (at most 10 s).
fn count_attempts(c: &mut StreamClient) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut quiet_since = Instant::now();
    let mut n = 0;
    while Instant::now() < deadline && quiet_since.elapsed() < Duration::from_secs(1) {
        let Ok(Some(m)) = c.recv(Duration::from_millis(100)) else { continue };
        if Message::parse(&m).is_ok_and(|m| m.method() == Method::CONNECTION_ATTEMPT) {
            n += 1;
            quiet_since = Instant::now();
        }
    }
    n
}

/// A new TCP client connection: true when the relay serves it (a Binding is answered), false
/// when it was refused (closed at accept).
fn client_admitted(relay: &Relay) -> bool {
    let Ok(mut c) = StreamClient::connect(relay.tcp.unwrap(), false, "demo", "demo", "uturn.local") else {
        return false;
    };
    let binding = uturn_tests::build(Method::BINDING, Class::Request, Default::default(), None, |_| Ok(()));
    c.transact(&binding).is_ok()
}

/// Pending peer connections take `max-connections` slots (issue 21: 100 pending with a cap of
/// 30, and new clients still admitted): with 30, a control connection and 29 peers fill the
/// relay; the other 71 peers are closed at accept, a new client is refused, and the
/// allocation's end frees the slots.
fn pending_peers_count_against_max_connections(backend: &str) {
    let files = TlsFiles::generate();
    let relay = Relay::start_streams(backend, &format!("max-connections = 30\n{ALLOW_LOOPBACK}"), &[], &files);
    let (mut ctl, relayed) = tcp_allocation(&relay, false);
    let r = ctl
        .transact_authenticated(Method::CREATE_PERMISSION, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, &"127.0.0.1:1".parse().unwrap()).map(drop)
        })
        .unwrap();
    assert_eq!(r.code(), None);
    let mut peers: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(relayed).unwrap()).collect();
    assert_eq!(count_attempts(&mut ctl), 29, "ConnectionAttempts past max-connections");
    let closed = peers.iter_mut().map(|p| peer_closed_within(p, Duration::from_millis(150))).filter(|c| *c).count();
    assert_eq!(closed, 71, "peer connections past the cap must be closed");
    assert!(!client_admitted(&relay), "a new client was admitted past max-connections");
    // The allocation ends: its pending connections close and give their slots back.
    drop(ctl);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client_admitted(&relay) {
        assert!(Instant::now() < deadline, "slots not given back after the allocation's end");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!relay.log().contains("panicked"));
}

#[test]
fn uring_pending_peers_count_against_max_connections() {
    pending_peers_count_against_max_connections("uring")
}

#[test]
fn epoll_pending_peers_count_against_max_connections() {
    pending_peers_count_against_max_connections("epoll")
}

/// RFC 8656 §21, issue 21: a TCP allocation cannot Connect to the relay's own services: its
/// TLS listener, admin and metrics endpoints always (403), another TCP server on the relay's
/// address unless `allow-peer` lists that address.
#[test]
fn connect_to_the_relays_own_services_is_403() {
    let files = TlsFiles::generate();
    let free = || TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (metrics, admin) = (free(), free());
    let (m, a) = (metrics.to_string(), admin.to_string());
    let args = ["--metrics-listen", m.as_str(), "--admin-listen", a.as_str()];
    let relay = Relay::start_streams("epoll", ALLOW_LOOPBACK, &args, &files);
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut ctl, _) = tcp_allocation(&relay, false);
    for (what, addr) in
        [("tcp://", relay.tcp.unwrap()), ("tls://", relay.tls.unwrap()), ("metrics", metrics), ("admin", admin)]
    {
        assert_eq!(connect(&mut ctl, addr).code(), Some(403), "Connect to the relay's own {what} listener {addr}");
    }
    assert_eq!(connect(&mut ctl, local.local_addr().unwrap()).code(), None, "allow-peer lists 127.0.0.1");
    drop(relay);

    // Without allow-peer, no port of the relay's own address.
    let relay = Relay::start_streams("epoll", "", &[], &files);
    let (mut ctl, _) = tcp_allocation(&relay, false);
    let r = connect(&mut ctl, local.local_addr().unwrap());
    assert_eq!(r.code(), Some(403), "Connect to another TCP server on the relay's address");
    assert_eq!(connect(&mut ctl, relay.tls.unwrap()).code(), Some(403));
}

/// Issue 21: a `tcp://` listen port (or admin, metrics) inside `port-range` would let a TCP
/// allocation's relayed address join the listeners' SO_REUSEPORT group: refused at start with a
/// clear error, and on SIGHUP (the running configuration stays).
#[test]
fn a_listener_inside_the_relay_port_range_is_refused() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (lo, hi) = (port.saturating_sub(10).max(1024), port.saturating_add(10));
    let udp = format!("127.0.0.1:{}", uturn_tests::free_udp_port());
    let tcp = format!("tcp://127.0.0.1:{port}");
    let range = format!("{lo}-{hi}");
    let (code, _, stderr) = uturn_cli(&["--listen", &udp, "--listen", &tcp, "--port-range", &range, "--user", "a:b"]);
    assert_ne!(code, 0, "started with a tcp:// listener inside port-range");
    assert!(stderr.contains(&format!("{tcp}: port {port} is inside port-range {range}")), "{stderr}");

    // SIGHUP: a file that puts metrics-listen inside the range is refused.
    let files = TlsFiles::generate();
    let range = "61000-61099";
    let relay = Relay::start_streams("epoll", &format!("port-range = \"{range}\"\n"), &[], &files);
    std::fs::write(relay.config_path(), format!("port-range = \"{range}\"\nmetrics-listen = \"127.0.0.1:61050\"\n"))
        .unwrap();
    relay.signal("HUP");
    let refused = "configuration not reloaded, the running one stays: metrics-listen: port 61050 is inside port-range";
    assert!(relay.wait_log(refused, Duration::from_secs(5)), "{}", relay.log());
    // Still serving, from the running configuration.
    let (_ctl, relayed) = tcp_allocation(&relay, false);
    assert!((61000..=61099).contains(&relayed.port()));
}

#[test]
fn uring_tcp_allocation_over_tcp() {
    relays_both_ways("uring", false)
}

#[test]
fn uring_tcp_allocation_over_tls() {
    relays_both_ways("uring", true)
}

#[test]
fn epoll_tcp_allocation_over_tcp() {
    relays_both_ways("epoll", false)
}

#[test]
fn epoll_tcp_allocation_over_tls() {
    relays_both_ways("epoll", true)
}

#[test]
fn uring_permissions_and_errors() {
    permission_and_policy("uring")
}

#[test]
fn epoll_permissions_and_errors() {
    permission_and_policy("epoll")
}
