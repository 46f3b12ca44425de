//! The TCP relay driven turn by turn, with real sockets on loopback: its caps, what an
//! allocation's end and the sweep look at, and ConnectionBind's ownership check.

use std::io::Read;

use uturn_proto::wire::Message;

use super::*;

struct T {
    relay: Relay,
    out: Receiver<(usize, ToWorker)>,
    count: ConnectionCount,
    events: Events,
}

fn relay(max_connections: usize, per_user: usize) -> T {
    let (_cmds, rx) = crossbeam_channel::unbounded();
    let (tx, out) = crossbeam_channel::unbounded();
    let count = ConnectionCount::default();
    let limits = PeerLimits { connections: count.clone(), max_connections, per_user };
    let poll = Poll::new().unwrap();
    let relay = Relay::new(poll, rx, tx, std::thread::current(), Duration::from_secs(300), limits, Arc::default());
    T { relay, out, count, events: Events::with_capacity(64) }
}

fn ft(port: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::from(([127, 0, 0, 1], port)),
        server: "127.0.0.1:3478".parse().unwrap(),
        transport: uturn_proto::Transport::Tcp,
    }
}

fn key() -> IntegrityKey {
    IntegrityKey::long_term("demo", "uturn.local", "demo")
}

/// The error code of a reply, `None` for a success.
fn code(bytes: &[u8]) -> Option<u16> {
    Message::parse(bytes).unwrap().get(attr::ERROR_CODE).map(|v| v[2] as u16 * 100 + v[3] as u16)
}

fn connection_id(bytes: &[u8]) -> Option<u32> {
    let m = Message::parse(bytes).unwrap();
    m.get(attr::CONNECTION_ID).and_then(|v| <[u8; 4]>::try_from(v).ok()).map(u32::from_be_bytes)
}

/// True when the relay has closed `p` (EOF or reset), false while it is open (a read times
/// out: the relay never writes to a peer connection here).
fn closed(p: &mut TcpStream) -> bool {
    p.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    match p.read(&mut [0u8; 16]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
    }
}

impl T {
    /// A TCP allocation of `user` on control connection `ft(port)`, with a permission for
    /// 127.0.0.1; its relayed address.
    fn allocation(&mut self, port: u16, user: &str) -> SocketAddr {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let relayed = listener.local_addr().unwrap();
        let now = Instant::now();
        let five_tuple = ft(port);
        self.relay.command(now, TcpCommand::Listen { five_tuple, worker: 0, session: 0, user: user.into(), listener });
        self.relay.command(now, TcpCommand::Permit { five_tuple, peers: vec!["127.0.0.1".parse().unwrap()] });
        relayed
    }

    /// `n` (at most 100) peers connect to `relayed`, and the relay accepts what is queued.
    fn peers(&mut self, port: u16, relayed: SocketAddr, n: usize) -> Vec<TcpStream> {
        let v: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(relayed).unwrap()).collect();
        self.relay.accept(Instant::now(), ft(port));
        v
    }

    fn connect(&mut self, port: u16, peer: SocketAddr) {
        let tid = TransactionId(rand::random());
        self.relay.command(Instant::now(), TcpCommand::Connect { five_tuple: ft(port), peer, tid, key: key() });
    }

    /// Turns the loop until a response for the control connection arrives (at most 3 s);
    /// ConnectionAttempt indications are skipped.
    fn reply(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok((_, ToWorker::Command(Command::Reply { bytes, .. }))) = self.out.try_recv() {
                if Message::parse(&bytes).unwrap().class() != Class::Indication {
                    return bytes;
                }
                continue;
            }
            self.relay.turn(&mut self.events, Duration::from_millis(20));
        }
        panic!("no reply");
    }

    fn bind(&mut self, id: u32, user: &str, port: u16) -> ToWorker {
        let tid = TransactionId(rand::random());
        let cmd =
            TcpCommand::Bind { connection_id: id, user: user.into(), five_tuple: ft(port), worker: 1, tid, key: key() };
        self.relay.command(Instant::now(), cmd);
        self.out.try_recv().expect("an answer").1
    }
}

#[test]
fn an_allocations_end_and_the_sweep_touch_only_their_own_entries() {
    let mut t = relay(10_000, 10_000);
    let a = t.allocation(1, "demo");
    let b = t.allocation(2, "demo");
    let mut mine = t.peers(1, a, 3);
    let mut others = t.peers(2, b, 100);
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    t.connect(1, target.local_addr().unwrap());
    assert_eq!((t.relay.pending.len(), t.relay.connecting.len()), (103, 1));
    assert_eq!(t.count.get(), 104, "pending and connecting peer connections hold max-connections slots");

    t.relay.visited = 0;
    t.relay.command(Instant::now(), TcpCommand::Close { five_tuple: ft(1) });
    assert_eq!(t.relay.visited, 4, "the end of allocation 1 looked at its own 4 connections only");
    assert_eq!((t.relay.pending.len(), t.relay.connecting.len()), (100, 0));
    assert_eq!(t.count.get(), 100);
    assert_eq!(t.relay.per_user.get("demo"), Some(&100));
    assert!(t.relay.allocations[&ft(2)].conns.len() == 100);
    for p in &mut mine {
        assert!(closed(p), "a peer connection of the ended allocation stayed open");
    }
    for p in others.iter_mut().take(5) {
        assert!(!closed(p), "another allocation's peer connection was closed");
    }

    // Nothing due: the sweep looks at nothing; all due: it looks at those (and the stale
    // entries of the ended allocation) once.
    t.relay.visited = 0;
    t.relay.sweep(Instant::now() + Duration::from_secs(1));
    assert_eq!(t.relay.visited, 0, "a sweep with nothing due scanned entries");
    t.relay.sweep(Instant::now() + BIND_TIMEOUT + Duration::from_secs(1));
    assert_eq!(t.relay.visited, 104);
    assert!(t.relay.pending.is_empty() && t.count.get() == 0 && t.relay.per_user.is_empty());
    assert!(t.relay.allocations[&ft(2)].conns.is_empty());
    assert!(closed(&mut others[0]));
}

#[test]
fn peer_connections_count_against_max_connections_and_the_user() {
    // Node-wide: two client connections hold 2 of 5 slots, so 3 peer connections fit.
    let mut t = relay(5, 1000);
    let clients = [t.count.try_reserve(5).unwrap(), t.count.try_reserve(5).unwrap()];
    let a = t.allocation(1, "demo");
    let mut peers = t.peers(1, a, 6);
    assert_eq!(t.relay.pending.len(), 3);
    assert_eq!(t.count.get(), 5);
    assert_eq!(t.relay.counters.refused_node.load(Ordering::Relaxed), 3);
    assert_eq!(peers.iter_mut().map(closed).filter(|c| *c).count(), 3, "the peers past the cap are closed");
    assert!(t.count.try_reserve(5).is_none(), "a new client connection is refused meanwhile");
    // A Connect past the cap: 508.
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    t.connect(1, target.local_addr().unwrap());
    assert_eq!(code(&t.reply()), Some(508));
    // The allocation's end gives its slots back.
    t.relay.command(Instant::now(), TcpCommand::Close { five_tuple: ft(1) });
    assert_eq!(t.count.get(), 2);
    drop(clients);
    assert_eq!(t.count.get(), 0);

    // Per user: demo's two allocations share 4.
    let mut t = relay(1000, 4);
    let (a, b, c) = (t.allocation(1, "demo"), t.allocation(2, "demo"), t.allocation(3, "eve"));
    let _pa = t.peers(1, a, 3);
    let _pb = t.peers(2, b, 3);
    let _pc = t.peers(3, c, 3);
    assert_eq!(t.relay.allocations[&ft(1)].conns.len(), 3);
    assert_eq!(t.relay.allocations[&ft(2)].conns.len(), 1);
    assert_eq!(t.relay.allocations[&ft(3)].conns.len(), 3, "another user is not held back");
    assert_eq!(t.relay.counters.refused_user.load(Ordering::Relaxed), 2);
    assert_eq!(t.count.get(), 7);
}

#[test]
fn another_users_connection_bind_leaves_the_pending_connection_to_its_owner() {
    let mut t = relay(100, 100);
    t.allocation(1, "demo");
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = target.local_addr().unwrap();
    t.connect(1, peer);
    let r = t.reply();
    assert_eq!(code(&r), None, "Connect failed");
    let id = connection_id(&r).unwrap();

    // eve names demo's CONNECTION-ID: 400, and the pending connection stays.
    match t.bind(id, "eve", 50) {
        ToWorker::BindFailed { response, .. } => assert_eq!(code(&response), Some(400)),
        other => panic!("expected BindFailed, got {other:?}"),
    }
    assert!(t.relay.pending.contains_key(&id), "another user's ConnectionBind took the pending connection");
    // demo's own ConnectionBind succeeds.
    match t.bind(id, "demo", 51) {
        ToWorker::BindData { connection_id, response, .. } => {
            assert_eq!((connection_id, code(&response)), (id, None));
        }
        other => panic!("expected BindData, got {other:?}"),
    }
    assert_eq!(t.count.get(), 0, "the slot left with the dropped BindData");
    // After the pair closes, the peer is free again: a Connect to it is not 446 (the same
    // 4-tuple may still be in TIME_WAIT, so the kernel may refuse it: 447).
    t.relay.command(Instant::now(), TcpCommand::DataClosed { connection_id: id });
    assert!(t.relay.allocations[&ft(1)].conns.is_empty() && t.relay.per_user.is_empty());
    t.connect(1, peer);
    assert_ne!(code(&t.reply()), Some(446), "Connect after the pair closed");
}
