//! Control-plane tests with a simulated clock: authentication order, nonce expiry, lifetimes,
//! quotas and the retransmission cache. Relay sockets are real (127.0.0.1).

use super::*;
use uturn_proto::nonce::NonceKey;
use uturn_proto::wire::{integrity, MessageWriter, WriteError};

const REALM: &str = "uturn.local";

fn policy() -> Policy {
    Policy {
        relay_ips: vec!["127.0.0.1".parse().unwrap()],
        external_ips: vec![],
        default_lifetime: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        user_quota: 2,
        total_quota: 0,
        peers: PeerPolicy::new(
            &crate::policy::OwnAddresses { relay_ips: vec!["127.0.0.1".parse().unwrap()], ..Default::default() },
            &[],
            &[],
        ),
        rfc5766_channels: false,
    }
}

/// Static users demo and eve, no store.
fn credentials() -> Credentials {
    let config = crate::credentials::CredentialConfig {
        realm: REALM.into(),
        realms: Vec::new(),
        users: std::collections::BTreeMap::from([("demo".into(), "demo".into()), ("eve".into(), "eve".into())]),
        secrets: Vec::new(),
        separator: ':',
        strict_expiry: false,
        store: None,
        cache_ttl: Duration::from_secs(60),
        negative_ttl: Duration::from_secs(5),
        cache_size: 100,
        cache_bytes: 1 << 20,
        negative_cache_size: 100,
        stale_ttl: Duration::from_secs(600),
        store_threads: 1,
    };
    Credentials::new(config, true, std::thread::current()).unwrap()
}

fn ft(port: u16) -> FiveTuple {
    FiveTuple::udp(SocketAddr::from(([127, 0, 0, 1], port)), "127.0.0.1:3478".parse().unwrap())
}

struct H {
    cp: ControlPlane,
    t0: Instant,
}

impl H {
    fn new() -> H {
        let t0 = Instant::now();
        let lo = 40000 + rand::random::<u16>() % 20000;
        let challenger = Challenger::new(REALM, NonceKey::new([3; 32], 10), Challenger::origin_for(t0));
        H { cp: ControlPlane::new(policy(), credentials(), 1, (lo, lo + 50), challenger), t0 }
    }
    fn at(&self, s: u64) -> Instant {
        self.t0 + Duration::from_secs(s)
    }
    fn send(&mut self, s: u64, ft: FiveTuple, bytes: &[u8]) -> Option<ToWorker> {
        let now = self.at(s);
        self.cp.handle_request(now, 0, ft, bytes, now)
    }
}

fn request(
    method: Method,
    tid: u8,
    auth: Option<(&str, &str, &[u8])>,
    f: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), WriteError>,
) -> Vec<u8> {
    let mut buf = vec![0u8; 1024];
    let mut w = MessageWriter::new(&mut buf, method, Class::Request, TransactionId([tid; 12])).unwrap();
    f(&mut w).unwrap();
    if let Some((user, pass, nonce)) = auth {
        w.bytes(attr::USERNAME, user.as_bytes()).unwrap();
        w.bytes(attr::REALM, REALM.as_bytes()).unwrap();
        w.bytes(attr::NONCE, nonce).unwrap();
        w.integrity(IntegrityKey::long_term(user, REALM, pass).as_bytes()).unwrap();
    }
    let n = w.finish();
    buf.truncate(n);
    buf
}

fn udp(w: &mut MessageWriter<'_>) -> Result<(), WriteError> {
    w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop)
}

fn reply_bytes(out: Option<ToWorker>) -> Vec<u8> {
    match out {
        Some(ToWorker::Command(Command::Reply { bytes, .. })) => bytes,
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn code(bytes: &[u8]) -> Option<u16> {
    Message::parse(bytes).unwrap().get(attr::ERROR_CODE).map(|v| v[2] as u16 * 100 + v[3] as u16)
}

fn nonce_of(bytes: &[u8]) -> Vec<u8> {
    Message::parse(bytes).unwrap().nonce().unwrap().to_vec()
}

#[test]
fn challenge_then_allocate_installs_a_signed_allocation() {
    let mut h = H::new();
    let r = reply_bytes(h.send(0, ft(1000), &request(Method::ALLOCATE, 1, None, udp)));
    assert_eq!(code(&r), Some(401));
    let nonce = nonce_of(&r);
    let req = request(Method::ALLOCATE, 2, Some(("demo", "demo", &nonce)), |w| {
        udp(w)?;
        w.u32(attr::LIFETIME, 99_999).map(drop)
    });
    let Some(ToWorker::Install(install, socket, _)) = h.send(1, ft(1000), &req) else { panic!("no install") };
    assert_eq!(install.lifetime, Duration::from_secs(3600), "clamped to max-lifetime");
    assert_eq!(socket.local_addr().unwrap(), install.relayed);
    let m = Message::parse(&install.response).unwrap();
    let key = IntegrityKey::long_term("demo", REALM, "demo");
    assert!(integrity::verify(key.as_bytes(), &m.integrity_parts().unwrap()));
    assert_eq!(m.xor_address(attr::XOR_RELAYED_ADDRESS), Some(Ok(install.relayed)));
    assert_eq!(m.xor_address(attr::XOR_MAPPED_ADDRESS), Some(Ok(ft(1000).client)));
    assert_eq!(m.u32_attr(attr::LIFETIME), Some(Ok(3600)));
    assert_eq!(h.cp.allocations(), 1);
    // A retransmission racing the Install binds no second socket and is left to the worker,
    // which answers it from the response it keeps.
    assert!(h.send(2, ft(1000), &req).is_none());
}

#[test]
fn nonces_expire_and_are_bound_to_the_client() {
    let mut h = H::new();
    let nonce = nonce_of(&reply_bytes(h.send(0, ft(1000), &request(Method::ALLOCATE, 1, None, udp))));
    let late = request(Method::ALLOCATE, 2, Some(("demo", "demo", &nonce)), udp);
    let r = reply_bytes(h.send(11, ft(1000), &late));
    assert_eq!(code(&r), Some(438));
    assert_ne!(nonce_of(&r), nonce);
    let elsewhere = request(Method::ALLOCATE, 3, Some(("demo", "demo", &nonce)), udp);
    assert_eq!(code(&reply_bytes(h.send(1, ft(1001), &elsewhere))), Some(438), "nonce of another client");
}

#[test]
fn quota_is_released_when_the_worker_reports_it() {
    let mut h = H::new();
    let mut installed = Vec::new();
    for port in [1000, 1001, 1002] {
        let nonce = nonce_of(&reply_bytes(h.send(0, ft(port), &request(Method::ALLOCATE, 1, None, udp))));
        installed.push(h.send(0, ft(port), &request(Method::ALLOCATE, 2, Some(("demo", "demo", &nonce)), udp)));
    }
    assert!(matches!(installed[0], Some(ToWorker::Install(..))));
    assert!(matches!(installed[1], Some(ToWorker::Install(..))));
    assert_eq!(code(&reply_bytes(installed.pop().unwrap())), Some(486), "user-quota = 2");
    h.cp.released(&ft(1000), TransactionId([9; 12]));
    assert_eq!(h.cp.allocations(), 2, "a report about another allocation (another Allocate) frees nothing");
    h.cp.released(&ft(1000), TransactionId([2; 12]));
    let nonce = nonce_of(&reply_bytes(h.send(1, ft(1002), &request(Method::ALLOCATE, 3, None, udp))));
    let again = h.send(1, ft(1002), &request(Method::ALLOCATE, 4, Some(("demo", "demo", &nonce)), udp));
    assert!(matches!(again, Some(ToWorker::Install(..))));
}

#[test]
fn requests_on_an_allocation_become_commands() {
    let mut h = H::new();
    let nonce = nonce_of(&reply_bytes(h.send(0, ft(1000), &request(Method::ALLOCATE, 1, None, udp))));
    assert!(matches!(
        h.send(0, ft(1000), &request(Method::ALLOCATE, 2, Some(("demo", "demo", &nonce)), udp)),
        Some(ToWorker::Install(..))
    ));
    let peer: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let bind = request(Method::CHANNEL_BIND, 5, Some(("demo", "demo", &nonce)), |w| {
        w.u32(attr::CHANNEL_NUMBER, 0x4001 << 16)?;
        w.xor_address(attr::XOR_PEER_ADDRESS, &peer).map(drop)
    });
    match h.send(1, ft(1000), &bind) {
        Some(ToWorker::Command(Command::ChannelBind { channel, peer: p, .. })) => {
            assert_eq!((channel.get(), p), (0x4001, peer));
        }
        other => panic!("{other:?}"),
    }
    let refresh = request(Method::REFRESH, 6, Some(("demo", "demo", &nonce)), |w| w.u32(attr::LIFETIME, 0).map(drop));
    assert!(
        matches!(h.send(1, ft(1000), &refresh), Some(ToWorker::Command(Command::Refresh { lifetime, .. })) if lifetime.is_zero())
    );
    let eve = request(Method::REFRESH, 7, Some(("eve", "eve", &nonce)), |_| Ok(()));
    assert_eq!(code(&reply_bytes(h.send(1, ft(1000), &eve))), Some(441));
    let other = nonce_of(&reply_bytes(h.send(1, ft(2000), &request(Method::REFRESH, 9, None, |_| Ok(())))));
    let none = request(Method::REFRESH, 8, Some(("demo", "demo", &other)), |_| Ok(()));
    assert_eq!(code(&reply_bytes(h.send(1, ft(2000), &none))), Some(437));
}

#[test]
fn even_port_with_reservation() {
    let mut h = H::new();
    let nonce = nonce_of(&reply_bytes(h.send(0, ft(1000), &request(Method::ALLOCATE, 1, None, udp))));
    let req = request(Method::ALLOCATE, 2, Some(("demo", "demo", &nonce)), |w| {
        udp(w)?;
        w.bytes(attr::EVEN_PORT, &[0x80]).map(drop)
    });
    let Some(ToWorker::Install(first, _s1, _)) = h.send(0, ft(1000), &req) else { panic!() };
    assert_eq!(first.relayed.port() % 2, 0);
    let token = Message::parse(&first.response).unwrap().get(attr::RESERVATION_TOKEN).unwrap().to_vec();
    let nonce2 = nonce_of(&reply_bytes(h.send(0, ft(1001), &request(Method::ALLOCATE, 3, None, udp))));
    let claim = request(Method::ALLOCATE, 4, Some(("demo", "demo", &nonce2)), |w| {
        udp(w)?;
        w.bytes(attr::RESERVATION_TOKEN, &token).map(drop)
    });
    let Some(ToWorker::Install(second, _s2, _)) = h.send(1, ft(1001), &claim) else { panic!() };
    assert_eq!(second.relayed.port(), first.relayed.port() + 1);
}

/// Allocates on `ft` for demo (the 401 round, then the signed request with `extra` attributes).
fn allocate_with(
    h: &mut H,
    s: u64,
    ft: FiveTuple,
    tid: u8,
    extra: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), WriteError>,
) -> Option<ToWorker> {
    let nonce = nonce_of(&reply_bytes(h.send(s, ft, &request(Method::ALLOCATE, tid, None, udp))));
    h.send(
        s,
        ft,
        &request(Method::ALLOCATE, tid + 1, Some(("demo", "demo", &nonce)), |w| {
            udp(w)?;
            extra(w)
        }),
    )
}

#[test]
fn allocate_checks_follow_rfc_8656_section_7_2() {
    let mut h = H::new();
    // Step 6: REQUESTED-ADDRESS-FAMILY with ADDITIONAL-ADDRESS-FAMILY is a 400.
    let both = allocate_with(&mut h, 0, ft(1000), 1, |w| {
        w.u32(attr::REQUESTED_ADDRESS_FAMILY, (attr::FAMILY_IPV4 as u32) << 24)?;
        w.u32(attr::ADDITIONAL_ADDRESS_FAMILY, (attr::FAMILY_IPV6 as u32) << 24).map(drop)
    });
    assert_eq!(code(&reply_bytes(both)), Some(400));
    // A RESERVATION-TOKEN of the wrong length is malformed (400); a well-formed one that
    // reserves nothing is a 508.
    let short = allocate_with(&mut h, 0, ft(1001), 3, |w| w.bytes(attr::RESERVATION_TOKEN, &[1, 2, 3]).map(drop));
    assert_eq!(code(&reply_bytes(short)), Some(400));
    let unknown = allocate_with(&mut h, 0, ft(1002), 5, |w| w.bytes(attr::RESERVATION_TOKEN, &[7; 8]).map(drop));
    assert_eq!(code(&reply_bytes(unknown)), Some(508));
    // Step 2 before the attributes: on a 5-tuple in use, an unknown comprehension-required
    // attribute still gets 437, not 420; on a free one it gets 420.
    assert!(matches!(allocate_with(&mut h, 0, ft(1003), 7, |_| Ok(())), Some(ToWorker::Install(..))));
    let taken = allocate_with(&mut h, 0, ft(1003), 9, |w| w.u32(0x0033, 1).map(drop));
    let r = reply_bytes(taken);
    assert_eq!(code(&r), Some(437));
    assert!(integrity::verify(
        IntegrityKey::long_term("demo", REALM, "demo").as_bytes(),
        &Message::parse(&r).unwrap().integrity_parts().unwrap()
    ));
    let free = allocate_with(&mut h, 0, ft(1004), 11, |w| w.u32(0x0033, 1).map(drop));
    assert_eq!(code(&reply_bytes(free)), Some(420));
}

#[test]
fn refresh_with_a_malformed_family_gets_443_and_unknown_attributes_come_after_437() {
    let mut h = H::new();
    assert!(matches!(allocate_with(&mut h, 0, ft(1000), 1, |_| Ok(())), Some(ToWorker::Install(..))));
    let nonce = nonce_of(&reply_bytes(h.send(0, ft(1000), &request(Method::REFRESH, 3, None, |_| Ok(())))));
    let auth = Some(("demo", "demo", &nonce[..]));
    for value in [&[attr::FAMILY_IPV6, 0, 0, 0][..], &[attr::FAMILY_IPV4, 0][..], &[9, 0, 0, 0][..]] {
        let r = request(Method::REFRESH, 4, auth, |w| w.bytes(attr::REQUESTED_ADDRESS_FAMILY, value).map(drop));
        assert_eq!(code(&reply_bytes(h.send(0, ft(1000), &r))), Some(443), "family {value:?}");
    }
    let r = request(Method::REFRESH, 5, auth, |w| w.u32(0x0033, 1).map(drop));
    assert_eq!(code(&reply_bytes(h.send(0, ft(1000), &r))), Some(420));
    let other = nonce_of(&reply_bytes(h.send(0, ft(1001), &request(Method::REFRESH, 7, None, |_| Ok(())))));
    let r = request(Method::REFRESH, 8, Some(("demo", "demo", &other)), |w| w.u32(0x0033, 1).map(drop));
    assert_eq!(code(&reply_bytes(h.send(0, ft(1001), &r))), Some(437), "no allocation comes first");
}

#[test]
fn a_full_slice_borrows_from_the_others_before_508() {
    let t0 = Instant::now();
    let lo = loop {
        // Two free adjacent ports, one slice each for two workers.
        let p = 40000 + rand::random::<u16>() % 20000;
        let a = std::net::UdpSocket::bind(("127.0.0.1", p));
        let b = std::net::UdpSocket::bind(("127.0.0.1", p + 1));
        if a.is_ok() && b.is_ok() {
            break p;
        }
    };
    let challenger = Challenger::new(REALM, NonceKey::new([3; 32], 10), Challenger::origin_for(t0));
    let policy = Policy { user_quota: 0, ..policy() };
    let mut h = H { cp: ControlPlane::new(policy, credentials(), 2, (lo, lo + 1), challenger), t0 };
    let Some(ToWorker::Install(first, _a, _)) = allocate_with(&mut h, 0, ft(1000), 1, |_| Ok(())) else { panic!() };
    let Some(ToWorker::Install(second, _b, _)) = allocate_with(&mut h, 0, ft(1001), 3, |_| Ok(())) else {
        panic!("worker 0's slice is full but worker 1's port is free")
    };
    let mut ports = [first.relayed.port(), second.relayed.port()];
    ports.sort_unstable();
    assert_eq!(ports, [lo, lo + 1]);
    assert_eq!(code(&reply_bytes(allocate_with(&mut h, 0, ft(1002), 5, |_| Ok(())))), Some(508), "whole range taken");
}

#[test]
fn a_lapsed_allocation_does_not_block_a_new_allocate() {
    let mut h = H::new();
    let Some(ToWorker::Install(old, _s, _)) = allocate_with(&mut h, 0, ft(1000), 1, |_| Ok(())) else { panic!() };
    // 600 s later (no Refresh, and the worker has not reported yet) the 5-tuple is free again.
    let Some(ToWorker::Install(new, _t, _)) = allocate_with(&mut h, 600, ft(1000), 3, |_| Ok(())) else {
        panic!("lapsed allocation still blocks its 5-tuple")
    };
    assert_eq!(h.cp.allocations(), 1);
    // The worker's late report about the old allocation leaves the new one alone.
    h.cp.released(&ft(1000), old.tid);
    assert_eq!(h.cp.allocations(), 1);
    h.cp.released(&ft(1000), new.tid);
    assert_eq!(h.cp.allocations(), 0);
}

/// A control plane whose users live in a fresh SQLite file (user "sam", password "pw"), with a
/// cache TTL of `ttl`.
fn with_store(ttl: Duration) -> (H, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("uturn-cp-{}-{}.db", std::process::id(), rand::random::<u32>()));
    let url = crate::store::StoreUrl::Sqlite(path.clone());
    let mut s = crate::store::open(&url, true).unwrap();
    let keys = crate::store::UserKeys::derive("sam", REALM, "pw", true);
    s.add(&crate::store::UserRecord { realm: REALM.into(), name: "sam".into(), keys }).unwrap();
    let config = crate::credentials::CredentialConfig {
        realm: REALM.into(),
        realms: Vec::new(),
        users: Default::default(),
        secrets: Vec::new(),
        separator: ':',
        strict_expiry: false,
        store: Some(url),
        cache_ttl: ttl,
        negative_ttl: ttl,
        cache_size: 100,
        cache_bytes: 1 << 20,
        negative_cache_size: 100,
        stale_ttl: Duration::from_secs(600),
        store_threads: 1,
    };
    let credentials = Credentials::new(config, true, std::thread::current()).unwrap();
    let t0 = Instant::now();
    let lo = 40000 + rand::random::<u16>() % 20000;
    let challenger = Challenger::new(REALM, NonceKey::new([3; 32], 600), Challenger::origin_for(t0));
    (H { cp: ControlPlane::new(policy(), credentials, 1, (lo, lo + 50), challenger), t0 }, path)
}

/// Polls the store answers for at most 2 s.
fn answered(h: &mut H) -> Vec<(usize, ToWorker)> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let out = h.cp.poll_lookups(h.at(1));
        if !out.is_empty() {
            return out;
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
    Vec::new()
}

#[test]
fn a_store_user_parks_the_request_then_is_served_from_the_cache() {
    for ttl in [Duration::from_secs(60), Duration::ZERO] {
        let (mut h, path) = with_store(ttl);
        let nonce = nonce_of(&reply_bytes(h.send(0, ft(2000), &request(Method::ALLOCATE, 1, None, udp))));
        let req = request(Method::ALLOCATE, 2, Some(("sam", "pw", &nonce)), udp);
        assert!(h.send(1, ft(2000), &req).is_none(), "parked for the store");
        assert_eq!(h.cp.parked(), 1);
        // Another user is looked up too (no static users here): it waits on its own lookup
        // and ends in a 401.
        let wrong = request(Method::ALLOCATE, 3, Some(("demo", "demo", &nonce)), udp);
        assert!(h.send(1, ft(2000), &wrong).is_none());
        let out = answered(&mut h);
        assert!(out.iter().any(|(_, m)| matches!(m, ToWorker::Install(..))), "ttl {ttl:?}: {out:?}");
        let mut all = out;
        if h.cp.parked() > 0 {
            all.extend(answered(&mut h));
        }
        assert!(all
            .iter()
            .any(|(_, m)| matches!(m, ToWorker::Command(Command::Reply { bytes, .. }) if code(bytes) == Some(401))));
        assert_eq!(h.cp.parked(), 0);
        // With a TTL, the next Allocate from the same user is answered at once.
        let nonce = nonce_of(&reply_bytes(h.send(1, ft(2001), &request(Method::ALLOCATE, 5, None, udp))));
        let again = request(Method::ALLOCATE, 4, Some(("sam", "pw", &nonce)), udp);
        let out = h.send(1, ft(2001), &again);
        if ttl.is_zero() {
            assert!(out.is_none(), "no cache: parked again");
            assert!(answered(&mut h).iter().any(|(_, m)| matches!(m, ToWorker::Install(..))));
        } else {
            assert!(matches!(out, Some(ToWorker::Install(..))), "{out:?}");
        }
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}

#[test]
fn draining_refuses_allocates_with_508_and_the_owner_records_move_to_the_next_process() {
    let mut h = H::new();
    let nonce = nonce_of(&reply_bytes(h.send(0, ft(1000), &request(Method::ALLOCATE, 1, None, udp))));
    let Some(ToWorker::Install(first, _socket, _)) =
        h.send(0, ft(1000), &request(Method::ALLOCATE, 2, Some(("demo", "demo", &nonce)), udp))
    else {
        panic!("no install")
    };
    assert_eq!(first.session, 1);
    h.cp.drain(None);
    let nonce = nonce_of(&reply_bytes(h.send(1, ft(1001), &request(Method::ALLOCATE, 6, None, udp))));
    let r = reply_bytes(h.send(1, ft(1001), &request(Method::ALLOCATE, 3, Some(("demo", "demo", &nonce)), udp)));
    assert_eq!(code(&r), Some(508), "no alternate-server: 508");
    assert!(Message::parse(&r).unwrap().has_integrity(), "signed, the request was authenticated");
    let snap = h.cp.export(h.at(1));
    assert_eq!(snap.owners.len(), 1);
    assert_eq!((snap.owners[0].session, snap.next_session), (1, 2));
    // The next process: its quotas count the imported allocation, its sessions continue.
    let mut next = H::new();
    next.cp.import(next.at(0), snap);
    assert_eq!(next.cp.allocations(), 1);
    let (worker, cmd) = next.cp.revoke_session(1).expect("the imported session can be revoked");
    assert!(worker == 0 && matches!(cmd, ToWorker::Command(Command::Revoke { tid, .. }) if tid == first.tid));
    let nonce = nonce_of(&reply_bytes(next.send(0, ft(1002), &request(Method::ALLOCATE, 4, None, udp))));
    let Some(ToWorker::Install(second, _s, _)) =
        next.send(0, ft(1002), &request(Method::ALLOCATE, 5, Some(("demo", "demo", &nonce)), udp))
    else {
        panic!("no install")
    };
    assert_eq!(second.session, 2, "session ids are not reused after a handover");
}

/// A control plane relaying on `relay_ips`, with `external` NAT mappings.
fn with_relays(relay_ips: &[&str], external: &[(&str, &str)]) -> H {
    let mut h = H::new();
    h.cp.policy.relay_ips = relay_ips.iter().map(|s| s.parse().unwrap()).collect();
    h.cp.policy.user_quota = 0;
    h.cp.policy.total_quota = 0;
    h.cp.policy.external_ips = external.iter().map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap())).collect();
    h
}

/// Allocates on `ft` with the attributes `extra` adds; the Install or the error code.
fn allocate_on(
    h: &mut H,
    ft: FiveTuple,
    tid: u8,
    extra: impl Fn(&mut MessageWriter<'_>) -> Result<(), WriteError>,
) -> Result<(Install, SocketAddr), u16> {
    let r = reply_bytes(h.send(0, ft, &request(Method::ALLOCATE, tid, None, udp)));
    let nonce = nonce_of(&r);
    let req = request(Method::ALLOCATE, tid + 1, Some(("demo", "demo", &nonce)), |w| {
        udp(w)?;
        extra(w)
    });
    match h.send(0, ft, &req) {
        Some(ToWorker::Install(i, socket, _)) => {
            let m = Message::parse(&i.response).unwrap();
            let advertised = m.xor_address(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
            assert_eq!(i.relayed, socket.local_addr().unwrap());
            Ok((i, advertised))
        }
        other => Err(code(&reply_bytes(other)).expect("an error response")),
    }
}

#[test]
fn families_follow_requested_address_family_and_peers_must_match() {
    let family =
        |f: u8| move |w: &mut MessageWriter<'_>| w.u32(attr::REQUESTED_ADDRESS_FAMILY, (f as u32) << 24).map(drop);
    // IPv4 only: IPv6 is not served (440); no family means IPv4 (RFC 8656 §7.2).
    let mut h = with_relays(&["127.0.0.1"], &[]);
    assert_eq!(allocate_on(&mut h, ft(1), 10, family(attr::FAMILY_IPV6)).unwrap_err(), 440);
    let (i, _) = allocate_on(&mut h, ft(2), 20, |_| Ok(())).unwrap();
    assert!(i.relayed.is_ipv4());
    // Both families: IPv6 on request; a peer of the other family earns 443.
    let mut h = with_relays(&["127.0.0.1", "::1"], &[]);
    let (i, _) = allocate_on(&mut h, ft(3), 30, family(attr::FAMILY_IPV6)).unwrap();
    assert!(i.relayed.is_ipv6());
    // The nonce in hand (the Allocate above used the same one) signs a CreatePermission.
    let nonce = nonce_of(&reply_bytes(h.send(0, ft(3), &request(Method::ALLOCATE, 39, None, udp))));
    let perm = request(Method::CREATE_PERMISSION, 40, Some(("demo", "demo", &nonce)), |w| {
        w.xor_address(attr::XOR_PEER_ADDRESS, &"127.0.0.1:5000".parse().unwrap()).map(drop)
    });
    let r = reply_bytes(h.send(0, ft(3), &perm));
    assert_eq!(code(&r), Some(443));
    let (i, _) = allocate_on(&mut h, ft(4), 50, family(attr::FAMILY_IPV4)).unwrap();
    assert!(i.relayed.is_ipv4());
}

#[test]
fn allocations_spread_over_relay_addresses_and_external_ip_is_advertised() {
    let mut h = with_relays(&["127.0.0.1", "127.0.0.2"], &[("127.0.0.2", "203.0.113.7")]);
    let mut bound = Vec::new();
    for k in 0..4u8 {
        let (i, advertised) = allocate_on(&mut h, ft(100 + k as u16), 60 + 2 * k, |_| Ok(())).unwrap();
        if i.relayed.ip() == "127.0.0.2".parse::<IpAddr>().unwrap() {
            assert_eq!(advertised, SocketAddr::new("203.0.113.7".parse().unwrap(), i.relayed.port()));
        } else {
            assert_eq!(advertised, i.relayed);
        }
        bound.push(i.relayed.ip());
    }
    assert!(bound.contains(&"127.0.0.1".parse().unwrap()) && bound.contains(&"127.0.0.2".parse().unwrap()));
}

fn tcp_ft(port: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::from(([127, 0, 0, 1], port)),
        server: "127.0.0.1:3478".parse().unwrap(),
        transport: uturn_proto::Transport::Tcp,
    }
}

/// A TCP Allocate (REQUESTED-TRANSPORT 6) on `ft` after its 401; the answer and the nonce.
fn tcp_allocate(h: &mut H, ft: FiveTuple, tid: u8) -> (Option<ToWorker>, Vec<u8>) {
    let tcp = |w: &mut MessageWriter<'_>| w.u32(attr::REQUESTED_TRANSPORT, 6 << 24).map(drop);
    let nonce = nonce_of(&reply_bytes(h.send(0, ft, &request(Method::ALLOCATE, tid, None, tcp))));
    let out = h.send(0, ft, &request(Method::ALLOCATE, tid + 1, Some(("demo", "demo", &nonce)), tcp));
    (out, nonce)
}

#[test]
fn tcp_allocations_follow_rfc_6062_section_5_1() {
    let mut h = H::new();
    // Without a TCP relay (no TCP or TLS listener): 442, as for any other transport.
    assert_eq!(code(&reply_bytes(tcp_allocate(&mut h, tcp_ft(1000), 1).0)), Some(442));
    let (tx, _rx) = crossbeam_channel::unbounded();
    let limits = crate::tcp_relay::PeerLimits { connections: Default::default(), max_connections: 100, per_user: 100 };
    let relay = crate::tcp_relay::TcpRelay::spawn(
        tx,
        std::thread::current(),
        Duration::from_secs(300),
        limits,
        Default::default(),
    )
    .unwrap();
    h.cp.set_tcp_relay(relay, Default::default());
    // Over UDP: 400.
    assert_eq!(code(&reply_bytes(tcp_allocate(&mut h, ft(1001), 3).0)), Some(400));
    // Over TCP: installed without a relay socket; the relayed address listens.
    let (out, nonce) = tcp_allocate(&mut h, tcp_ft(1002), 5);
    let Some(ToWorker::InstallTcp(install)) = out else { panic!("no TCP install: {out:?}") };
    assert!(std::net::TcpStream::connect(install.relayed).is_ok(), "relayed address not listening");
    // RFC 6062: no channels on a TCP allocation.
    let bind = request(Method::CHANNEL_BIND, 7, Some(("demo", "demo", &nonce)), |w| {
        w.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)?;
        w.xor_address(attr::XOR_PEER_ADDRESS, &"127.0.0.1:9".parse().unwrap()).map(drop)
    });
    assert_eq!(code(&reply_bytes(h.send(0, tcp_ft(1002), &bind))), Some(400));
    // A ConnectionBind on the control connection itself (it holds the allocation): 400.
    let cb = request(Method::CONNECTION_BIND, 8, Some(("demo", "demo", &nonce)), |w| {
        w.bytes(attr::CONNECTION_ID, &[0, 0, 0, 1]).map(drop)
    });
    match h.send(0, tcp_ft(1002), &cb) {
        Some(ToWorker::BindFailed { response, .. }) => assert_eq!(code(&response), Some(400)),
        other => panic!("expected BindFailed, got {other:?}"),
    }
    // The end of the allocation closes its listener (the relay thread does it at once).
    h.cp.released(&tcp_ft(1002), install.tid);
    let deadline = Instant::now() + Duration::from_secs(3);
    while std::net::TcpStream::connect(install.relayed).is_ok() {
        assert!(Instant::now() < deadline, "the relayed listener outlived its allocation");
        std::thread::sleep(Duration::from_millis(20));
    }
}
