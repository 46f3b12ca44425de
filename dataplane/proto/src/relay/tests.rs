//! State-machine tests with a simulated clock: every lifetime is crossed by moving `now`, never
//! by sleeping.

use super::*;
use crate::wire::{IntegrityKey, MessageWriter};

const KEY: IntegrityKey = IntegrityKey::from_md5([7; 16]);

fn ft() -> FiveTuple {
    FiveTuple::udp("192.0.2.10:5000".parse().unwrap(), "198.51.100.1:3478".parse().unwrap())
}
fn peer() -> SocketAddr {
    "203.0.113.5:6000".parse().unwrap()
}
fn tid(n: u8) -> TransactionId {
    TransactionId([n; 12])
}
fn ch(n: u16) -> ChannelNumber {
    ChannelNumber::new(n).unwrap()
}

fn request(method: Method, t: TransactionId) -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    let n = MessageWriter::new(&mut buf, method, Class::Request, t).unwrap().finish();
    buf.truncate(n);
    buf
}

/// The ids, 5-tuples and Allocate transactions of ended allocations.
fn ends(v: Vec<Ended>) -> Vec<(AllocationId, FiveTuple, TransactionId)> {
    v.into_iter().map(|e| (e.id, e.five_tuple, e.tid)).collect()
}

fn parse_error_code(reply: &[u8]) -> Option<u16> {
    let m = Message::parse(reply).ok()?;
    let v = m.get(attr::ERROR_CODE)?;
    Some(v[2] as u16 * 100 + v[3] as u16)
}

struct Harness {
    state: WorkerState,
    t0: Instant,
    out: Vec<u8>,
}

impl Harness {
    fn new() -> Self {
        Harness::with(RelayConfig::default())
    }
    fn with(config: RelayConfig) -> Self {
        let t0 = Instant::now();
        Harness { state: WorkerState::new(config, t0, 42), t0, out: vec![0; 1500] }
    }
    fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }
    fn command(&mut self, secs: u64, cmd: Command) -> CommandOutput {
        let now = self.at(secs);
        self.state.handle_command(now, cmd, &mut self.out)
    }
    fn install(&mut self, secs: u64, lifetime: u64) -> AllocationId {
        self.install_with(secs, lifetime, KEY)
    }
    fn install_with(&mut self, secs: u64, lifetime: u64, key: IntegrityKey) -> AllocationId {
        let out = self.command(
            secs,
            Command::Install(Install {
                five_tuple: ft(),
                tid: tid(1),
                relayed: "198.51.100.1:50000".parse().unwrap(),
                additional: None,
                lifetime: Duration::from_secs(lifetime),
                response: vec![9u8; 40].into_boxed_slice(),
                key,
                session: 1,
                user: "user".into(),
            }),
        );
        match out.effect {
            Effect::Installed(id) => id,
            e => panic!("install failed: {e:?}"),
        }
    }
    fn bind(&mut self, secs: u64, c: u16, p: SocketAddr) -> CommandOutput {
        self.command(secs, Command::ChannelBind { five_tuple: ft(), tid: tid(3), channel: ch(c), peer: p, key: KEY })
    }
    fn client(&mut self, secs: u64, datagram: &[u8]) -> ClientOutput {
        let now = self.at(secs);
        self.state.handle_client_datagram(now, &ft(), datagram, &mut self.out)
    }
    /// A peer datagram with `payload`, placed after the required headroom.
    fn peer(&mut self, secs: u64, id: AllocationId, from: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; PEER_HEADROOM + payload.len() + PEER_TAILROOM];
        buf[PEER_HEADROOM..PEER_HEADROOM + payload.len()].copy_from_slice(payload);
        let now = self.at(secs);
        match self.state.handle_peer_datagram(now, id, from, &mut buf, PEER_HEADROOM..PEER_HEADROOM + payload.len()) {
            PeerOutput::ToClient { five_tuple, message } => {
                assert_eq!(five_tuple, ft());
                Some(buf[message].to_vec())
            }
            PeerOutput::Drop => None,
        }
    }
    fn tick(&mut self, secs: u64) -> Vec<Ended> {
        let mut expired = Vec::new();
        let now = self.at(secs);
        self.state.handle_timeout(now, &mut expired);
        self.state.tables().check_consistency().unwrap();
        expired
    }
}

#[test]
fn binding_request_gets_xor_mapped_address() {
    let mut h = Harness::new();
    let ClientOutput::Reply(n) = h.client(0, &request(Method::BINDING, tid(5))) else { panic!() };
    let m = Message::parse(&h.out[..n]).unwrap();
    assert_eq!((m.method(), m.class(), m.transaction_id()), (Method::BINDING, Class::Success, tid(5)));
    assert_eq!(m.xor_address(attr::XOR_MAPPED_ADDRESS), Some(Ok(ft().client)));
    assert_eq!(m.get(attr::SOFTWARE), None, "unauthenticated answers stay minimal");
}

#[test]
fn binding_with_unknown_required_attribute_gets_420() {
    let mut h = Harness::new();
    let mut buf = vec![0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Method::BINDING, Class::Request, tid(5)).unwrap();
    w.u32(0x0033, 1).unwrap();
    let n = w.finish();
    let ClientOutput::Reply(r) = h.client(0, &buf[..n]) else { panic!() };
    assert_eq!(parse_error_code(&h.out[..r]), Some(420));
    let m = Message::parse(&h.out[..r]).unwrap();
    assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES), Some(&[0x00, 0x33][..]));
}

#[test]
fn authenticated_methods_go_to_the_control_plane() {
    let mut h = Harness::new();
    for m in [Method::ALLOCATE, Method::REFRESH, Method::CREATE_PERMISSION, Method::CHANNEL_BIND] {
        assert_eq!(h.client(0, &request(m, tid(2))), ClientOutput::Authenticate { verified: false });
    }
    assert_eq!(h.state.counters().requests_forwarded, 4);
}

#[test]
fn retransmitted_allocate_gets_the_same_response_and_a_new_one_gets_437() {
    let mut h = Harness::new();
    h.install(0, 600);
    assert_eq!(h.client(1, &request(Method::ALLOCATE, tid(1))), ClientOutput::Reply(40));
    assert_eq!(&h.out[..40], &[9u8; 40][..]);
    // A different transaction reaches the control plane, whose Install the worker refuses.
    assert_eq!(h.client(1, &request(Method::ALLOCATE, tid(2))), ClientOutput::Authenticate { verified: false });
    let out = h.command(1, Command::Install(second_install()));
    assert_eq!(out.effect, Effect::InstallRefused { tid: tid(2) });
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), Some(437));
    assert_eq!(h.state.tables().allocation_count(), 1);
}

#[test]
fn channel_data_flows_both_ways_once_bound() {
    let mut h = Harness::new();
    let id = h.install(0, 600);
    let cd = [0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c', 0];
    assert_eq!(h.client(0, &cd), ClientOutput::Drop, "unbound channel");
    assert_eq!(h.state.counters().unbound_channel, 1);
    let out = h.bind(0, 0x4001, peer());
    let m = Message::parse(&h.out[..out.reply_len]).unwrap();
    assert_eq!((m.method(), m.class()), (Method::CHANNEL_BIND, Class::Success));
    assert!(crate::wire::integrity::verify(KEY.as_bytes(), &m.integrity_parts().unwrap()));
    assert_eq!(h.client(1, &cd), ClientOutput::Relay { alloc: id, peer: peer(), payload: 4..7 });
    assert_eq!(h.peer(1, id, peer(), b"xyz").unwrap(), vec![0x40, 0x01, 0x00, 0x03, b'x', b'y', b'z']);
    assert_eq!(h.state.counters().relayed_to_client, 1);
    assert_eq!(h.state.counters().relayed_to_peer, 1);
}

#[test]
fn data_indication_when_permitted_but_unbound() {
    let mut h = Harness::new();
    let id = h.install(0, 600);
    assert_eq!(h.peer(0, id, peer(), b"hello"), None, "no permission yet");
    h.command(0, Command::CreatePermission { five_tuple: ft(), tid: tid(4), peers: vec![peer().ip()], key: KEY });
    let msg = h.peer(1, id, peer(), b"hello").unwrap();
    let m = Message::parse(&msg).unwrap();
    assert_eq!((m.method(), m.class()), (Method::DATA, Class::Indication));
    assert_eq!(m.xor_address(attr::XOR_PEER_ADDRESS), Some(Ok(peer())));
    assert_eq!(m.get(attr::DATA), Some(&b"hello"[..]));
    // Another port on the same IP is covered by the permission (RFC 8656 §9).
    let other: SocketAddr = "203.0.113.5:7000".parse().unwrap();
    assert!(h.peer(1, id, other, b"x").is_some());
    let v6: SocketAddr = "[2001:db8::5]:7000".parse().unwrap();
    assert_eq!(h.peer(1, id, v6, b"x"), None);
}

#[test]
fn send_indication_needs_a_permission() {
    let mut h = Harness::new();
    let id = h.install(0, 600);
    let mut buf = vec![0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Method::SEND, Class::Indication, tid(8)).unwrap();
    w.xor_address(attr::XOR_PEER_ADDRESS, &peer()).unwrap();
    w.bytes(attr::DATA, b"payload").unwrap();
    let n = w.finish();
    assert_eq!(h.client(0, &buf[..n]), ClientOutput::Drop);
    assert_eq!(h.state.counters().no_permission, 1);
    h.command(0, Command::CreatePermission { five_tuple: ft(), tid: tid(4), peers: vec![peer().ip()], key: KEY });
    let ClientOutput::Relay { alloc, peer: p, payload } = h.client(0, &buf[..n]) else { panic!() };
    assert_eq!((alloc, p, &buf[payload]), (id, peer(), &b"payload"[..]));
}

#[test]
fn permission_expires_after_300_seconds_unless_refreshed() {
    let mut h = Harness::new();
    let id = h.install(0, 3600);
    h.command(0, Command::CreatePermission { five_tuple: ft(), tid: tid(4), peers: vec![peer().ip()], key: KEY });
    h.tick(299);
    assert!(h.peer(299, id, peer(), b"a").is_some());
    h.command(200, Command::CreatePermission { five_tuple: ft(), tid: tid(5), peers: vec![peer().ip()], key: KEY });
    h.tick(301);
    assert!(h.peer(301, id, peer(), b"a").is_some(), "refreshed at 200 s, lives to 500 s");
    assert_eq!(h.state.tables().permissions.len(), 1);
    h.tick(501);
    assert!(h.peer(501, id, peer(), b"a").is_none());
    assert!(h.state.tables().permissions.is_empty(), "the timer removed the entry");
}

#[test]
fn channel_expires_after_600_seconds() {
    let mut h = Harness::new();
    let id = h.install(0, 3600);
    h.bind(0, 0x4001, peer());
    // Keep the permission alive past the channel, so only the channel's expiry matters.
    for t in [250u64, 500, 700] {
        h.command(t, Command::CreatePermission { five_tuple: ft(), tid: tid(9), peers: vec![peer().ip()], key: KEY });
    }
    h.tick(599);
    assert_eq!(h.peer(599, id, peer(), b"z").unwrap()[0], 0x40);
    h.tick(601);
    assert!(h.state.tables().channels.is_empty());
    // Still permitted, so the peer's data now arrives as a Data indication.
    assert_eq!(h.peer(601, id, peer(), b"z").unwrap()[0..2], [0x00, 0x17]);
    let cd = [0x40, 0x01, 0x00, 0x01, b'q'];
    assert_eq!(h.client(601, &cd), ClientOutput::Drop);
}

#[test]
fn allocation_expires_and_refresh_extends_it() {
    let mut h = Harness::new();
    let id = h.install(0, 600);
    h.bind(0, 0x4001, peer());
    let out = h
        .command(500, Command::Refresh { five_tuple: ft(), tid: tid(6), lifetime: Duration::from_secs(600), key: KEY });
    let m = Message::parse(&h.out[..out.reply_len]).unwrap();
    assert_eq!(m.u32_attr(attr::LIFETIME), Some(Ok(600)));
    assert!(h.tick(601).is_empty(), "refreshed at 500 s: lives to 1100 s");
    assert_eq!(ends(h.tick(1101)), vec![(id, ft(), tid(1))]);
    assert_eq!(h.state.tables().allocation_count(), 0);
    assert!(h.state.tables().channels.is_empty() && h.state.tables().permissions.is_empty());
    assert_eq!(h.state.counters().allocations_expired, 1);
    assert_eq!(h.peer(1101, id, peer(), b"late"), None, "stale id names nothing");
}

#[test]
fn refresh_zero_deletes_and_requests_without_allocation_get_437() {
    let mut h = Harness::new();
    let id = h.install(0, 600);
    let out = h.command(10, Command::Refresh { five_tuple: ft(), tid: tid(6), lifetime: Duration::ZERO, key: KEY });
    assert!(matches!(out.effect, Effect::Removed(e) if (e.id, e.five_tuple, e.tid) == (id, ft(), tid(1))));
    assert_eq!(Message::parse(&h.out[..out.reply_len]).unwrap().u32_attr(attr::LIFETIME), Some(Ok(0)));
    for cmd in [
        Command::Refresh { five_tuple: ft(), tid: tid(6), lifetime: Duration::ZERO, key: KEY },
        Command::CreatePermission { five_tuple: ft(), tid: tid(4), peers: vec![peer().ip()], key: KEY },
        Command::ChannelBind { five_tuple: ft(), tid: tid(3), channel: ch(0x4001), peer: peer(), key: KEY },
    ] {
        let out = h.command(11, cmd);
        assert_eq!(parse_error_code(&h.out[..out.reply_len]), Some(437));
    }
    // The slot is reused with a new generation; the old id names nothing.
    let id2 = h.install(12, 600);
    assert_eq!(id2.index, id.index);
    assert_ne!(id2.generation, id.generation);
    assert!(h.state.tables().get(id).is_none());
}

#[test]
fn channel_and_peer_bind_one_to_one() {
    let mut h = Harness::new();
    h.install(0, 600);
    let out = h.bind(0, 0x4001, peer());
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), None);
    let other: SocketAddr = "203.0.113.6:6000".parse().unwrap();
    let out = h.bind(0, 0x4001, other);
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), Some(400), "channel rebound to another peer");
    let out = h.bind(0, 0x4002, peer());
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), Some(400), "peer bound to another channel");
    let out = h.bind(0, 0x4001, peer());
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), None, "same binding refreshes");
    assert_eq!(h.state.tables().channels.len(), 1);
    h.state.tables().check_consistency().unwrap();
}

#[test]
fn garbage_is_counted_never_answered() {
    let mut h = Harness::new();
    h.install(0, 600);
    let inputs: [&[u8]; 6] = [
        &[],
        &[0xFF; 30],
        &[0x40, 0x01],
        &[0x40, 0x01, 0xFF, 0xFF, 1],
        &[0u8; 19],
        &[0x01, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ];
    for d in inputs {
        assert_eq!(h.client(0, d), ClientOutput::Drop, "{d:?}");
    }
    let c = h.state.counters();
    assert_eq!((c.not_turn, c.malformed_channel_data, c.malformed_stun, c.dropped_responses), (2, 2, 1, 1));
}

fn signed(method: Method, t: TransactionId, key: &IntegrityKey) -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    let mut w = MessageWriter::new(&mut buf, method, Class::Request, t).unwrap();
    w.integrity(key.as_bytes()).unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

#[test]
fn unverified_requests_of_every_kind_share_their_sources_budget() {
    let config = RelayConfig { unauthenticated_rate: 10, ..RelayConfig::default() };
    let mut h = Harness::with(config);
    let t0 = h.t0;
    // A forged MESSAGE-INTEGRITY (20 random-looking bytes) proves nothing: plain and forged
    // Bindings, forged Allocates and Refreshes and unknown methods all draw on one budget.
    let forged = IntegrityKey::from_md5([0xA5; 16]);
    let kinds = [
        request(Method::BINDING, tid(1)),
        signed(Method::BINDING, tid(2), &forged),
        signed(Method::ALLOCATE, tid(3), &forged),
        signed(Method::REFRESH, tid(4), &forged),
        request(Method(0x0123), tid(5)),
    ];
    let admitted = (0..50).filter(|i| h.client(0, &kinds[i % kinds.len()]) != ClientOutput::Drop).count();
    assert_eq!(admitted, 10, "a burst of the configured rate, whatever the request");
    assert_eq!(h.state.counters().rate_limited, 40);
    assert_eq!(
        h.state.counters().requests_forwarded,
        4,
        "two forged Allocates and two Refreshes reached the control plane"
    );
    // A tenth of a second later one more token has come back.
    let t = Duration::from_millis(100);
    assert_ne!(h.state.handle_client_datagram(t0 + t, &ft(), &kinds[2], &mut h.out), ClientOutput::Drop);
    assert_eq!(h.state.handle_client_datagram(t0 + t, &ft(), &kinds[2], &mut h.out), ClientOutput::Drop);
}

#[test]
fn requests_verified_with_the_allocations_key_skip_the_budget() {
    let config = RelayConfig { unauthenticated_rate: 5, ..RelayConfig::default() };
    let mut h = Harness::with(config);
    let t0 = h.t0;
    h.install(0, 600);
    while h.client(0, &request(Method::BINDING, tid(9))) != ClientOutput::Drop {}
    // The budget is spent; the allocation's own client still refreshes, binds and permits.
    for m in [Method::REFRESH, Method::CREATE_PERMISSION, Method::CHANNEL_BIND] {
        assert_eq!(h.client(0, &signed(m, tid(4), &KEY)), ClientOutput::Authenticate { verified: true });
    }
    assert_eq!(h.state.counters().requests_verified, 3);
    // The same requests under another key, or from another 5-tuple, are not verified.
    assert_eq!(h.client(0, &signed(Method::REFRESH, tid(4), &IntegrityKey::from_md5([1; 16]))), ClientOutput::Drop);
    let other = FiveTuple::udp("192.0.2.10:5001".parse().unwrap(), ft().server);
    let r = h.state.handle_client_datagram(t0, &other, &signed(Method::REFRESH, tid(4), &KEY), &mut h.out);
    assert_eq!(r, ClientOutput::Drop, "same source IP, no allocation: on the spent budget");
}

#[test]
fn per_allocation_caps_and_bandwidth() {
    let config = RelayConfig { max_permissions: 2, max_channels: 1, bandwidth: Some(1000), ..RelayConfig::default() };
    let mut h = Harness::with(config);
    let id = h.install(0, 600);
    let ips = |n: u8| (1..=n).map(|i| IpAddr::from([203, 0, 113, i])).collect::<Vec<_>>();
    let out = h.command(0, Command::CreatePermission { five_tuple: ft(), tid: tid(4), peers: ips(3), key: KEY });
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), Some(508), "three permissions exceed the cap of two");
    assert!(h.state.tables().permissions.is_empty(), "none installed");
    let out = h.command(0, Command::CreatePermission { five_tuple: ft(), tid: tid(5), peers: ips(2), key: KEY });
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), None);
    let p1 = SocketAddr::from(([203, 0, 113, 1], 6000));
    let out = h.bind(0, 0x4001, p1);
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), None);
    let p2 = SocketAddr::from(([203, 0, 113, 2], 6000));
    let out = h.bind(0, 0x4002, p2);
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), Some(508), "one channel at most");
    assert_eq!(h.state.counters().capacity_refusals, 2);
    // 1000 bytes/s: two 400-byte payloads pass, the third is dropped until tokens refill.
    let payload = [0u8; 400];
    let mut cd = vec![0x40, 0x01, 0x01, 0x90];
    cd.extend_from_slice(&payload);
    assert!(matches!(h.client(0, &cd), ClientOutput::Relay { .. }));
    assert!(matches!(h.client(0, &cd), ClientOutput::Relay { .. }));
    assert_eq!(h.client(0, &cd), ClientOutput::Drop);
    assert!(h.peer(0, id, p1, &payload).is_none(), "the cap covers both directions");
    assert_eq!(h.state.counters().bandwidth_drops, 2);
    assert!(matches!(h.client(1, &cd), ClientOutput::Relay { .. }), "refilled after a second");
}

#[test]
fn churn_leaves_no_timers_behind() {
    let mut h = Harness::new();
    for i in 0..20_000u64 {
        h.install(i / 100, 600);
        let out = h.command(
            i / 100,
            Command::CreatePermission { five_tuple: ft(), tid: tid(4), peers: vec![peer().ip()], key: KEY },
        );
        assert_eq!(parse_error_code(&h.out[..out.reply_len]), None);
        let out =
            h.command(i / 100, Command::Refresh { five_tuple: ft(), tid: tid(6), lifetime: Duration::ZERO, key: KEY });
        assert!(matches!(out.effect, Effect::Removed(_)));
    }
    assert_eq!(h.state.tables().allocation_count(), 0);
    assert!(h.state.timer_count() <= 1024 + 2, "stale timers compacted: {}", h.state.timer_count());
}

#[test]
fn with_a_challenger_the_worker_answers_the_first_allocate_with_401() {
    use crate::nonce::{Challenger, NonceCheck, NonceKey};
    let mut h = Harness::new();
    let challenger = Challenger::new("uturn.local", NonceKey::new([9; 32], 600), Challenger::origin_for(h.t0));
    h.state.set_challenger(challenger.clone());
    let ClientOutput::Reply(n) = h.client(0, &request(Method::ALLOCATE, tid(1))) else { panic!("answered locally") };
    let reply = h.out[..n].to_vec();
    let m = Message::parse(&reply).unwrap();
    assert_eq!(parse_error_code(&reply), Some(401));
    assert_eq!(m.realm(), Some(&b"uturn.local"[..]));
    assert_eq!(
        challenger.check(m.nonce().unwrap(), h.at(1), &ft().client),
        NonceCheck::Valid,
        "the control plane accepts it"
    );
    assert_eq!(h.state.counters().requests_forwarded, 0);
    // The same request again gets the same bytes (the nonce time window), with no state kept.
    let ClientOutput::Reply(n2) = h.client(0, &request(Method::ALLOCATE, tid(1))) else { panic!() };
    assert_eq!(&h.out[..n2], &reply[..]);
    // Requests carrying MESSAGE-INTEGRITY still go to the control plane.
    let mut buf = vec![0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Request, tid(2)).unwrap();
    w.integrity(KEY.as_bytes()).unwrap();
    let len = w.finish();
    assert_eq!(h.client(0, &buf[..len]), ClientOutput::Authenticate { verified: false });
}

/// A second Allocate's Install on `ft()` (transaction 2, another relay port).
fn second_install() -> Install {
    Install {
        five_tuple: ft(),
        tid: tid(2),
        relayed: "198.51.100.1:50002".parse().unwrap(),
        additional: None,
        lifetime: Duration::from_secs(600),
        response: vec![1u8; 40].into_boxed_slice(),
        key: KEY,
        session: 1,
        user: "user".into(),
    }
}

fn signed_with(reply: &[u8], key: &IntegrityKey) -> bool {
    let m = Message::parse(reply).unwrap();
    m.integrity_parts().is_some_and(|p| wire::integrity::verify(key.as_bytes(), &p))
}

#[test]
fn expiry_is_exact_before_the_sweep() {
    let mut h = Harness::new();
    let id = h.install(0, 10);
    h.bind(0, 0x4001, peer());
    let cd = [0x40, 0x01, 0x00, 0x01, b'x', 0, 0, 0];
    assert!(matches!(h.client(9, &cd), ClientOutput::Relay { .. }));
    // No tick has run: the wheel has not swept, yet at its deadline the allocation relays nothing.
    assert_eq!(h.client(10, &cd), ClientOutput::Drop);
    assert_eq!(h.peer(10, id, peer(), b"y"), None);
    // A Refresh cannot revive it: a signed 437, and the allocation is reported ended.
    let refresh = Command::Refresh { five_tuple: ft(), tid: tid(4), lifetime: Duration::from_secs(600), key: KEY };
    let out = h.command(10, refresh);
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), Some(437));
    assert!(signed_with(&h.out[..out.reply_len], &KEY));
    assert!(h.state.poll_timeout().is_some_and(|t| t <= h.at(10)), "the ended allocation is due at once");
    assert_eq!(ends(h.tick(10)), vec![(id, ft(), tid(1))]);
    assert_eq!(h.tick(11), vec![], "reported once");
    // A new Allocate on the 5-tuple installs; one over a live allocation gets a signed 437.
    h.install(11, 600);
    let out = h.command(12, Command::Install(second_install()));
    assert_eq!(out.effect, Effect::InstallRefused { tid: tid(2) });
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), Some(437));
    assert!(signed_with(&h.out[..out.reply_len], &KEY), "the worker's 437 carries MESSAGE-INTEGRITY");
}

#[test]
fn an_allocate_over_an_expired_unswept_allocation_replaces_it() {
    let mut h = Harness::new();
    let old = h.install(0, 10);
    let out = h.command(10, Command::Install(second_install()));
    assert!(matches!(out.effect, Effect::Installed(_)));
    assert_eq!(ends(h.tick(10)), vec![(old, ft(), tid(1))], "the old one is reported");
    assert_eq!(h.state.tables().allocation_count(), 1);
}

#[test]
fn an_expired_binding_does_not_block_a_new_one() {
    let mut h = Harness::new();
    h.install(0, 3600);
    h.bind(0, 0x4001, peer());
    let other: SocketAddr = "203.0.113.6:6000".parse().unwrap();
    let out = h.bind(599, 0x4001, other);
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), Some(400), "bound to another peer for 600 s");
    // At its deadline the binding is gone, swept or not (no tick has run).
    let out = h.bind(600, 0x4001, other);
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), None);
    let out = h.bind(600, 0x4002, peer());
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), None, "the old peer is free for another channel");
    h.state.tables().check_consistency().unwrap();
}

#[test]
fn only_a_live_nonce_makes_a_request_verified() {
    use crate::nonce::NonceKey;
    let mut h = Harness::new();
    let t0 = h.t0;
    let challenger = Challenger::new("uturn.local", NonceKey::new([5; 32], 60), Challenger::origin_for(t0));
    h.state.set_challenger(challenger.clone());
    h.install(0, 3600);
    let mut buf = vec![0u8; 512];
    let n = challenger.write(&mut buf, Method::REFRESH, tid(1), ErrorCode::Unauthenticated, t0, &ft().client).unwrap();
    let nonce = Message::parse(&buf[..n]).unwrap().nonce().unwrap().to_vec();
    let refresh = |nonce: &[u8]| {
        let mut buf = vec![0u8; 256];
        let mut w = MessageWriter::new(&mut buf, Method::REFRESH, Class::Request, tid(4)).unwrap();
        w.bytes(attr::NONCE, nonce).unwrap();
        w.integrity(KEY.as_bytes()).unwrap();
        let n = w.finish();
        buf.truncate(n);
        buf
    };
    assert_eq!(h.client(10, &refresh(&nonce)), ClientOutput::Authenticate { verified: true });
    // The same request replayed after the nonce lifetime goes back on the source's budget.
    assert_eq!(h.client(120, &refresh(&nonce)), ClientOutput::Authenticate { verified: false });
    assert_eq!(h.client(10, &refresh(b"forged-nonce-0000000000")), ClientOutput::Authenticate { verified: false });
}

#[test]
fn expired_unswept_bindings_do_not_count_against_the_cap() {
    let config = RelayConfig { max_channels: 1, ..RelayConfig::default() };
    let mut h = Harness::with(config);
    h.install(0, 3600);
    h.bind(0, 0x4001, peer());
    let other: SocketAddr = "203.0.113.6:6000".parse().unwrap();
    let out = h.bind(599, 0x4002, other);
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), Some(508), "one live binding is the cap");
    let out = h.bind(600, 0x4002, other);
    assert_eq!(parse_error_code(&h.out[..out.reply_len]), None, "the expired one is not counted");
}

#[test]
fn no_stored_success_after_the_deadline_and_a_repeated_install_releases_nothing() {
    let mut h = Harness::new();
    h.install(0, 10);
    let again = Install {
        five_tuple: ft(),
        tid: tid(1),
        relayed: "198.51.100.1:50003".parse().unwrap(),
        additional: None,
        lifetime: Duration::from_secs(600),
        response: vec![2u8; 40].into_boxed_slice(),
        key: KEY,
        session: 1,
        user: "user".into(),
    };
    let out = h.command(5, Command::Install(again));
    assert_eq!(out.effect, Effect::DuplicateInstall, "the live allocation's owner must not be released");
    assert_eq!(&h.out[..out.reply_len], &[9u8; 40][..], "the original success");
    assert_eq!(h.client(9, &request(Method::ALLOCATE, tid(1))), ClientOutput::Reply(40));
    assert_eq!(h.client(10, &request(Method::ALLOCATE, tid(1))), ClientOutput::Authenticate { verified: false });
}

#[test]
fn an_install_for_a_new_allocate_ends_one_within_a_second_of_its_deadline() {
    let mut h = Harness::new();
    let old = h.install(0, 10);
    // The control plane saw the lapse a little earlier than the worker's deadline.
    let out = h.command(9, Command::Install(second_install()));
    assert!(matches!(out.effect, Effect::Installed(_)));
    assert_eq!(ends(h.tick(9)), vec![(old, ft(), tid(1))]);
}

fn signed_refresh(t: TransactionId, lifetime: u32, key: &IntegrityKey) -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    let mut w = MessageWriter::new(&mut buf, Method::REFRESH, Class::Request, t).unwrap();
    w.u32(attr::LIFETIME, lifetime).unwrap();
    w.sign(key).unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

#[test]
fn a_verified_refresh_to_zero_is_answered_and_deletes_in_the_worker() {
    let mut h = Harness::new();
    let id = h.install(0, 600);
    // Another lifetime still goes to the control plane (policy clamps it).
    assert_eq!(h.client(1, &signed_refresh(tid(6), 300, &KEY)), ClientOutput::Authenticate { verified: true });
    let ClientOutput::Reply(n) = h.client(1, &signed_refresh(tid(7), 0, &KEY)) else { panic!("not answered") };
    let m = Message::parse(&h.out[..n]).unwrap();
    assert_eq!((m.method(), m.class(), m.transaction_id()), (Method::REFRESH, Class::Success, tid(7)));
    assert_eq!(m.u32_attr(attr::LIFETIME), Some(Ok(0)));
    assert!(signed_with(&h.out[..n], &KEY));
    assert!(h.state.tables().get(id).is_none());
    assert_eq!(h.state.counters().deleted_in_worker, 1);
    // The shell hears of the end at its next tick (closes the socket, tells the control plane).
    let ended = h.tick(1);
    assert_eq!(ended.iter().map(|e| (e.id, e.tid)).collect::<Vec<_>>(), vec![(id, tid(1))]);
    // A retransmission finds no allocation: it is not verified and goes on the budget.
    assert_eq!(h.client(1, &signed_refresh(tid(7), 0, &KEY)), ClientOutput::Authenticate { verified: false });
    // A key the allocation does not have deletes nothing.
    let id = h.install(2, 600);
    let forged = IntegrityKey::from_md5([1; 16]);
    assert_eq!(h.client(2, &signed_refresh(tid(8), 0, &forged)), ClientOutput::Authenticate { verified: false });
    assert!(h.state.tables().get(id).is_some());
}

#[test]
fn a_sha256_allocation_answers_with_message_integrity_sha256() {
    let mut h = Harness::new();
    let key = IntegrityKey::derive(crate::wire::integrity::PasswordAlgorithm::Sha256, "u", "r", "p");
    h.install_with(0, 600, key);
    let ClientOutput::Reply(n) = h.client(1, &signed_refresh(tid(7), 0, &key)) else { panic!("not answered") };
    let m = Message::parse(&h.out[..n]).unwrap();
    let parts = m.integrity_parts().unwrap();
    assert_eq!(parts.algorithm, crate::wire::integrity::MacAlgorithm::HmacSha256);
    assert!(key.verify(&parts));
}

#[test]
fn an_exported_allocation_serves_the_same_in_a_new_worker_with_its_deadlines_and_totals() {
    let mut h = Harness::new();
    let id = h.install(0, 600);
    h.bind(100, 0x4001, peer());
    let cd = [0x40, 0x01, 0x00, 0x04, 1, 2, 3, 4];
    assert!(matches!(h.client(100, &cd), ClientOutput::Relay { .. }));
    assert!(h.peer(100, id, peer(), b"hello").is_some());
    let snaps = h.state.export(h.at(200));
    assert_eq!(snaps.len(), 1);
    let (sid, snap) = snaps[0].clone();
    assert_eq!(sid, id);
    assert_eq!((snap.lifetime_left_ms, snap.age_ms), (400_000, 200_000));
    assert_eq!(snap.permissions, vec![(peer().ip(), 200_000)], "ChannelBind at 100 s: permission to 400 s");
    assert_eq!(snap.channels, vec![(0x4001, peer(), 500_000)], "binding to 700 s");
    assert_eq!((snap.to_peer, snap.to_client), (Traffic { packets: 1, bytes: 4 }, Traffic { packets: 1, bytes: 5 }));

    // The next process's clock: its `t0` is the old one's 200 s.
    let mut next = Harness::new();
    let nid = next.state.import(next.at(0), snap).unwrap();
    next.state.tables().check_consistency().unwrap();
    assert!(matches!(next.client(1, &cd), ClientOutput::Relay { peer: p, .. } if p == peer()));
    let framed = next.peer(1, nid, peer(), b"hi").unwrap();
    assert_eq!(&framed[..4], &[0x40, 0x01, 0x00, 0x02], "peer data goes back on the channel");
    let s = &next.state.sessions(next.at(1))[0];
    assert_eq!((s.id, s.user.as_str(), s.age_s), (1, "user", 201));
    assert_eq!((s.to_peer.packets, s.to_client.packets), (2, 2), "totals carry over");
    // Retransmitted Allocate still gets the original answer.
    assert!(matches!(next.client(1, &request(Method::ALLOCATE, tid(1))), ClientOutput::Reply(40)));
    // Deadlines carried over: the permission lapses at old 400 s, the allocation at old 600 s.
    assert!(next.tick(201).is_empty());
    assert_eq!(next.client(201, &cd), ClientOutput::Drop, "permission gone");
    assert_eq!(ends(next.tick(401)), vec![(nid, ft(), tid(1))]);
}

#[test]
fn counters_round_trip_through_their_value_list() {
    let c = Counters { relayed_to_peer: 3, allocations_created: 9, bytes_to_client: 7, ..Counters::default() };
    assert_eq!(Counters::NAMES.len(), c.values().len());
    assert_eq!(Counters::from_values(&c.values()), c);
    assert_eq!(Counters::NAMES[0], "relayed_to_peer");
}

/// Channel routes for the kernel fast path follow the tables: a route per live binding with a
/// live permission, carrying the earliest deadline, removed when any of the three ends.
mod offload {
    use super::*;

    impl Harness {
        fn events(&mut self) -> Vec<OffloadEvent> {
            let mut v = Vec::new();
            self.state.take_offload_events(&mut v);
            v
        }
    }

    fn installs(v: &[OffloadEvent]) -> Vec<(u16, bool, Instant)> {
        v.iter()
            .filter_map(|e| match e {
                OffloadEvent::Install { route, fresh } => Some((route.channel.get(), *fresh, route.expires)),
                OffloadEvent::Remove(_) => None,
            })
            .collect()
    }

    fn removes(v: &[OffloadEvent]) -> Vec<u16> {
        v.iter()
            .filter_map(|e| match e {
                OffloadEvent::Remove(r) => Some(r.channel.get()),
                OffloadEvent::Install { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_binding_is_routed_until_its_permission_lapses_and_again_once_renewed() {
        let mut h = Harness::new();
        assert!(h.state.enable_offload(0..16));
        let id = h.install(0, 600);
        assert!(h.events().is_empty(), "an allocation without a binding has no route");
        h.bind(10, 0x4001, peer());
        let ev = h.events();
        // The permission (310 s) ends before the binding (610 s) and the allocation (600 s).
        assert_eq!(installs(&ev), vec![(0x4001, true, h.at(310))]);
        let OffloadEvent::Install { route, .. } = ev[0] else { unreachable!() };
        assert_eq!((route.alloc, route.client, route.server, route.peer), (id, ft().client, ft().server, peer()));
        assert_eq!(route.relayed, "198.51.100.1:50000".parse().unwrap());
        // A CreatePermission moves the deadline: the same slot, not fresh.
        h.command(100, Command::CreatePermission { five_tuple: ft(), tid: tid(4), peers: vec![peer().ip()], key: KEY });
        assert_eq!(installs(&h.events()), vec![(0x4001, false, h.at(400))]);
        h.tick(200);
        assert!(h.events().is_empty(), "nothing changed");
        // The permission lapses while the binding lives: the route goes.
        h.tick(401);
        assert_eq!(removes(&h.events()), vec![0x4001]);
        assert!(h.state.offloaded_routes().is_empty());
        // Renewed: the route comes back, fresh (its slot counters start at zero).
        h.command(402, Command::CreatePermission { five_tuple: ft(), tid: tid(5), peers: vec![peer().ip()], key: KEY });
        assert_eq!(installs(&h.events()), vec![(0x4001, true, h.at(600))]);
    }

    #[test]
    fn routes_end_with_their_allocation_and_at_shutdown() {
        let mut h = Harness::new();
        h.state.enable_offload(0..16);
        h.install(0, 600);
        h.bind(0, 0x4001, peer());
        h.bind(0, 0x4002, "203.0.113.6:6000".parse().unwrap());
        assert_eq!(installs(&h.events()).len(), 2);
        let out = h.command(10, Command::Refresh { five_tuple: ft(), tid: tid(6), lifetime: Duration::ZERO, key: KEY });
        assert!(matches!(out.effect, Effect::Removed(_)));
        let mut gone = removes(&h.events());
        gone.sort_unstable();
        assert_eq!(gone, vec![0x4001, 0x4002]);
        h.install(20, 600);
        h.bind(20, 0x4003, peer());
        assert_eq!(installs(&h.events()).len(), 1);
        h.state.drain();
        assert_eq!(removes(&h.events()), vec![0x4003]);
    }

    #[test]
    fn slots_run_out_mixed_families_and_caps_stay_on_the_socket_path() {
        let mut h = Harness::new();
        h.state.enable_offload(7..8);
        h.install(0, 600);
        h.bind(0, 0x4001, peer());
        h.bind(0, 0x4002, "[2001:db8::1]:6000".parse().unwrap());
        h.bind(0, 0x4003, "203.0.113.6:6000".parse().unwrap());
        let ev = h.events();
        assert_eq!(installs(&ev).len(), 1, "{ev:?}");
        let OffloadEvent::Install { route, .. } = ev[0] else { unreachable!() };
        assert_eq!(route.slot, 7);
        assert_eq!(
            h.state.offload_slot_shortfall(),
            1,
            "an IPv6 peer of an IPv4 client is not carried, the third binding lacks a slot"
        );
        // Both permissions lapse: the one route goes and its slot is free again.
        h.tick(301);
        let ev = h.events();
        assert_eq!(removes(&ev).len(), 1);
        let capped = RelayConfig { bandwidth: Some(1000), ..RelayConfig::default() };
        assert!(!Harness::with(capped).state.enable_offload(0..16));
    }

    #[test]
    fn credited_traffic_reaches_the_allocation_and_the_counters() {
        let mut h = Harness::new();
        h.state.enable_offload(0..16);
        let id = h.install(0, 600);
        let t = |packets, bytes| Traffic { packets, bytes };
        assert!(h.state.credit_allocation(id, t(3, 300), t(2, 200)));
        h.state.credit_worker(t(3, 300), t(2, 200));
        let a = h.state.tables().get(id).unwrap();
        assert_eq!((a.to_peer, a.to_client), (t(3, 300), t(2, 200)));
        let c = h.state.counters();
        assert_eq!((c.relayed_to_peer, c.offloaded_to_peer, c.bytes_to_client, c.offloaded_to_client), (3, 3, 200, 2));
        h.command(1, Command::Refresh { five_tuple: ft(), tid: tid(6), lifetime: Duration::ZERO, key: KEY });
        assert!(!h.state.credit_allocation(id, t(1, 1), t(0, 0)), "a dead allocation takes no credit");
    }
}
