//! Control-plane tests with a simulated clock: authentication order, nonce expiry, lifetimes,
//! quotas and the retransmission cache. Relay sockets are real (127.0.0.1).

use super::*;
use uturn_proto::nonce::NonceKey;
use uturn_proto::wire::{integrity, MessageWriter, WriteError};

const REALM: &str = "uturn.local";

fn policy() -> Policy {
    Policy {
        realm: REALM.into(),
        users: BTreeMap::from([("demo".into(), "demo".into()), ("eve".into(), "eve".into())]),
        relay_ip: "127.0.0.1".parse().unwrap(),
        default_lifetime: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        user_quota: 2,
        total_quota: 0,
        peers: PeerPolicy::new("127.0.0.1".parse().unwrap(), &[], &[], &[]),
        rfc5766_channels: false,
    }
}

fn ft(port: u16) -> FiveTuple {
    FiveTuple { client: SocketAddr::from(([127, 0, 0, 1], port)), server: "127.0.0.1:3478".parse().unwrap() }
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
        H { cp: ControlPlane::new(policy(), 1, (lo, lo + 50), challenger), t0 }
    }
    fn at(&self, s: u64) -> Instant {
        self.t0 + Duration::from_secs(s)
    }
    fn send(&mut self, s: u64, ft: FiveTuple, bytes: &[u8]) -> Option<ToWorker> {
        let now = self.at(s);
        self.cp.handle_request(now, 0, ft, bytes)
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
        w.integrity(&IntegrityKey::long_term(user, REALM, pass).0).unwrap();
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
    let Some(ToWorker::Install(install, socket)) = h.send(1, ft(1000), &req) else { panic!("no install") };
    assert_eq!(install.lifetime, Duration::from_secs(3600), "clamped to max-lifetime");
    assert_eq!(socket.local_addr().unwrap(), install.relayed);
    let m = Message::parse(&install.response).unwrap();
    let key = IntegrityKey::long_term("demo", REALM, "demo");
    assert!(integrity::verify(&key.0, &m.integrity_parts().unwrap()));
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
    h.cp.released(&ft(1000));
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
    let Some(ToWorker::Install(first, _s1)) = h.send(0, ft(1000), &req) else { panic!() };
    assert_eq!(first.relayed.port() % 2, 0);
    let token = Message::parse(&first.response).unwrap().get(attr::RESERVATION_TOKEN).unwrap().to_vec();
    let nonce2 = nonce_of(&reply_bytes(h.send(0, ft(1001), &request(Method::ALLOCATE, 3, None, udp))));
    let claim = request(Method::ALLOCATE, 4, Some(("demo", "demo", &nonce2)), |w| {
        udp(w)?;
        w.bytes(attr::RESERVATION_TOKEN, &token).map(drop)
    });
    let Some(ToWorker::Install(second, _s2)) = h.send(1, ft(1001), &claim) else { panic!() };
    assert_eq!(second.relayed.port(), first.relayed.port() + 1);
}
