//! Property tests: random and mutated bytes never panic the parsers or the state machine, and
//! every message that parses re-encodes to the same bytes.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use uturn_proto::relay::{Command, Install, RelayConfig, PEER_HEADROOM, PEER_TAILROOM};
use uturn_proto::wire::channel_data::{self, ChannelData};
use uturn_proto::wire::{
    attr, Class, IntegrityKey, Message, MessageWriter, Method, ParseError, TransactionId, WriteError,
};
use uturn_proto::{FiveTuple, WorkerState};

/// How a seed message ends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Trailer {
    /// Neither MESSAGE-INTEGRITY nor FINGERPRINT: every mutation of an attribute value still
    /// parses, so the attribute walk and the state machine behind it see them.
    Bare,
    /// MESSAGE-INTEGRITY only.
    Integrity,
    /// FINGERPRINT only.
    Fingerprint,
    /// MESSAGE-INTEGRITY then FINGERPRINT.
    Both,
}

fn message(
    method: Method,
    class: Class,
    trailer: Trailer,
    body: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), WriteError>,
) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut w = MessageWriter::new(&mut buf, method, class, TransactionId([3; 12])).unwrap();
    body(&mut w).unwrap();
    if matches!(trailer, Trailer::Integrity | Trailer::Both) {
        w.integrity(&[1; 16]).unwrap();
    }
    if matches!(trailer, Trailer::Fingerprint | Trailer::Both) {
        w.fingerprint().unwrap();
    }
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// STUN seeds (with their trailer), then ChannelData seeds.
fn stun_seeds() -> Vec<(Vec<u8>, Trailer)> {
    use Trailer::*;
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let peer6: SocketAddr = "[2001:db8::1]:3478".parse().unwrap();
    let udp = u32::from(attr::TRANSPORT_UDP) << 24;
    let mut out = Vec::new();
    // The original seeds: every method with a bit of everything, signed and fingerprinted.
    for method in [Method::BINDING, Method::ALLOCATE, Method::CHANNEL_BIND, Method::SEND] {
        let class = if method == Method::SEND { Class::Indication } else { Class::Request };
        for trailer in [Both, Bare] {
            out.push((
                message(method, class, trailer, |w| {
                    w.bytes(attr::USERNAME, b"demo")?;
                    w.xor_address(attr::XOR_PEER_ADDRESS, &peer)?;
                    w.u32(attr::CHANNEL_NUMBER, 0x4001_0000)?;
                    w.bytes(attr::DATA, b"data!").map(drop)
                }),
                trailer,
            ));
        }
    }
    // Without FINGERPRINT, so mutations reach the attribute walk and the state machine.
    out.push((message(Method::BINDING, Class::Request, Bare, |_| Ok(())), Bare));
    out.push((
        message(Method::BINDING, Class::Request, Bare, |w| {
            w.bytes(attr::SOFTWARE, b"fuzz seed")?;
            w.bytes(0x0031, b"unknown, comprehension-required").map(drop)
        }),
        Bare,
    ));
    out.push((
        message(Method::SEND, Class::Indication, Bare, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, &peer)?;
            w.bytes(attr::DONT_FRAGMENT, &[])?;
            w.bytes(attr::DATA, b"odd-length payload").map(drop)
        }),
        Bare,
    ));
    out.push((
        message(Method::SEND, Class::Indication, Bare, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, &peer6)?;
            w.bytes(attr::DATA, &[0xAB; 33]).map(drop)
        }),
        Bare,
    ));
    out.push((
        message(Method::ALLOCATE, Class::Request, Bare, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, udp)?;
            w.u32(attr::LIFETIME, 600)?;
            w.u32(attr::REQUESTED_ADDRESS_FAMILY, u32::from(attr::FAMILY_IPV6) << 24)?;
            w.bytes(attr::EVEN_PORT, &[0x80]).map(drop)
        }),
        Bare,
    ));
    out.push((message(Method::REFRESH, Class::Request, Bare, |w| w.u32(attr::LIFETIME, 0).map(drop)), Bare));
    out.push((
        message(Method::CREATE_PERMISSION, Class::Request, Bare, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, &peer)?;
            w.xor_address(attr::XOR_PEER_ADDRESS, &"192.0.2.7:1".parse().unwrap())?;
            w.xor_address(attr::XOR_PEER_ADDRESS, &peer6).map(drop)
        }),
        Bare,
    ));
    out.push((
        message(Method::ALLOCATE, Class::Error, Bare, |w| {
            w.error_code(420, "Unknown Attribute")?;
            w.unknown_attributes(&[0x0031, 0x0032]).map(drop)
        }),
        Bare,
    ));
    out.push((
        message(Method::BINDING, Class::Success, Bare, |w| w.xor_address(attr::XOR_MAPPED_ADDRESS, &peer).map(drop)),
        Bare,
    ));
    // MESSAGE-INTEGRITY without FINGERPRINT: signed requests as clients send them, and attributes
    // after MESSAGE-INTEGRITY (which do not count).
    for method in [Method::ALLOCATE, Method::REFRESH, Method::CREATE_PERMISSION, Method::CHANNEL_BIND] {
        out.push((
            message(method, Class::Request, Integrity, |w| {
                w.u32(attr::REQUESTED_TRANSPORT, udp)?;
                w.bytes(attr::USERNAME, b"demo")?;
                w.bytes(attr::REALM, b"uturn.local")?;
                w.bytes(attr::NONCE, b"0123456789abcdef")?;
                w.u32(attr::CHANNEL_NUMBER, 0x4002_0000)?;
                w.xor_address(attr::XOR_PEER_ADDRESS, &peer).map(drop)
            }),
            Integrity,
        ));
    }
    out.push((
        message(Method::ALLOCATE, Class::Request, Bare, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, udp)?;
            w.integrity(&[1; 16])?;
            w.u32(attr::LIFETIME, 0)?;
            w.bytes(0x0031, b"after MESSAGE-INTEGRITY").map(drop)
        }),
        Integrity,
    ));
    // FINGERPRINT without MESSAGE-INTEGRITY.
    out.push((
        message(Method::BINDING, Class::Request, Fingerprint, |w| w.bytes(attr::SOFTWARE, b"fp only").map(drop)),
        Fingerprint,
    ));
    out
}

fn channel_data_seeds() -> Vec<Vec<u8>> {
    vec![
        vec![0x40, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0], // bound channel, padded
        vec![0x40, 0x01, 0x00, 0x00],                         // bound channel, empty
        vec![0x4F, 0xFF, 0x00, 0x03, 9, 9, 9],                // unbound channel, unpadded
        vec![0x7F, 0xFF, 0x00, 0x01, 0x42, 0, 0, 0],          // RFC 5766 range
    ]
}

fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| stun_seeds().into_iter().map(|(m, _)| m).chain(channel_data_seeds()).collect())
}

fn reencodes_identically(bytes: &[u8]) {
    if let Ok(m) = Message::parse(bytes) {
        let mut buf = vec![0u8; bytes.len() + 4];
        let mut w = MessageWriter::new(&mut buf, m.method(), m.class(), m.transaction_id()).unwrap();
        for a in m.raw_attributes() {
            w.raw(&a).unwrap();
        }
        let n = w.finish();
        assert_eq!(&buf[..n], bytes);
    }
}

fn drive(state: &mut WorkerState, now: Instant, datagram: &[u8]) {
    let ft = FiveTuple::udp("127.0.0.1:5000".parse().unwrap(), "127.0.0.1:3478".parse().unwrap());
    let mut out = vec![0u8; 1500];
    let _ = state.handle_client_datagram(now, &ft, datagram, &mut out);
    reframes_identically(datagram);
}

/// Whatever parses as ChannelData re-frames to the datagram's prefix (the rest is padding).
fn reframes_identically(datagram: &[u8]) {
    if let Ok(cd) = ChannelData::parse(datagram) {
        let len = cd.payload().len();
        assert_eq!(u16::from_be_bytes([datagram[2], datagram[3]]) as usize, len);
        let mut framed = vec![0u8; channel_data::HEADER_LEN + len];
        channel_data::write_header(&mut framed, cd.channel(), len as u16);
        framed[channel_data::HEADER_LEN..].copy_from_slice(cd.payload());
        assert_eq!(&framed[..], &datagram[..framed.len()]);
    }
}

fn state_with_allocation(now: Instant) -> (WorkerState, uturn_proto::relay::AllocationId) {
    let mut s = WorkerState::new(RelayConfig::default(), now, 1);
    let ft = FiveTuple::udp("127.0.0.1:5000".parse().unwrap(), "127.0.0.1:3478".parse().unwrap());
    let mut out = vec![0u8; 1500];
    let install = Install {
        five_tuple: ft,
        tid: TransactionId([1; 12]),
        relayed: "127.0.0.1:50000".parse().unwrap(),
        additional: None,
        lifetime: Duration::from_secs(600),
        response: vec![0u8; 20].into(),
        key: uturn_proto::wire::IntegrityKey::from_md5([1; 16]),
        session: 1,
        user: "user".into(),
    };
    let r = s.handle_command(now, Command::Install(install), &mut out);
    let uturn_proto::relay::Effect::Installed(id) = r.effect else { panic!() };
    s.handle_command(
        now,
        Command::ChannelBind {
            five_tuple: ft,
            tid: TransactionId([2; 12]),
            channel: uturn_proto::wire::ChannelNumber::new(0x4001).unwrap(),
            peer: "127.0.0.1:9".parse().unwrap(),
            key: IntegrityKey::from_md5([1; 16]),
        },
        &mut out,
    );
    (s, id)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let now = Instant::now();
        let (mut s, id) = state_with_allocation(now);
        drive(&mut s, now, &bytes);
        reencodes_identically(&bytes);
        let mut buf = vec![0u8; PEER_HEADROOM + bytes.len() + PEER_TAILROOM];
        buf[PEER_HEADROOM..PEER_HEADROOM + bytes.len()].copy_from_slice(&bytes);
        let _ = s.handle_peer_datagram(now, id, "127.0.0.1:9".parse().unwrap(), &mut buf, PEER_HEADROOM..PEER_HEADROOM + bytes.len());
        s.tables().check_consistency().unwrap();
    }

    #[test]
    fn mutated_messages_never_panic(
        seed in any::<proptest::sample::Index>(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = seed.get(seeds()).clone();
        for (at, x) in flips {
            let i = at % bytes.len();
            bytes[i] ^= x;
        }
        if cut % 3 == 0 {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        let now = Instant::now();
        let (mut s, _) = state_with_allocation(now);
        drive(&mut s, now, &bytes);
        reencodes_identically(&bytes);
        s.tables().check_consistency().unwrap();
    }
}

#[test]
fn seeds_parse() {
    for (s, trailer) in stun_seeds() {
        let m = Message::parse(&s).unwrap_or_else(|e| panic!("{trailer:?} seed {s:02x?}: {e:?}"));
        let last = m.raw_attributes().last().map(|a| a.typ);
        assert_eq!(m.has_integrity(), matches!(trailer, Trailer::Integrity | Trailer::Both), "{s:02x?}");
        assert_eq!(last == Some(attr::FINGERPRINT), matches!(trailer, Trailer::Fingerprint | Trailer::Both));
        reencodes_identically(&s);
    }
    for s in channel_data_seeds() {
        assert!(ChannelData::parse(&s).is_ok(), "{s:02x?}");
        reframes_identically(&s);
    }
}

/// Without FINGERPRINT most one-byte changes to the attributes still parse, so the mutation
/// property reaches the attribute walk, the re-encoding and the state machine; with it nearly
/// every change stops at the CRC check (which is why the seeds above mostly lack it).
#[test]
fn mutations_get_past_the_fingerprint_check() {
    let mut parsed_fp = 0;
    let mut tried_fp = 0;
    for (s, trailer) in stun_seeds() {
        let mut parsed = 0;
        let mut errors = Vec::new();
        for i in 20..s.len() {
            let mut m = s.clone();
            m[i] ^= 0x55;
            match Message::parse(&m) {
                Ok(_) => parsed += 1,
                Err(e) => errors.push(e),
            }
            reencodes_identically(&m);
        }
        let tried = s.len() - 20;
        if matches!(trailer, Trailer::Fingerprint | Trailer::Both) {
            parsed_fp += parsed;
            tried_fp += tried;
        } else if tried > 0 {
            assert!(parsed * 2 > tried, "{trailer:?} seed {s:02x?}: only {parsed}/{tried} mutations parse");
            assert!(!errors.contains(&ParseError::BadFingerprint), "{s:02x?}: {errors:?}");
        }
    }
    assert!(parsed_fp * 5 < tried_fp, "{parsed_fp}/{tried_fp} mutations of fingerprinted seeds parse");
}
