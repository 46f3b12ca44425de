//! Property tests: random and mutated bytes never panic the parsers or the state machine, and
//! every message that parses re-encodes to the same bytes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use uturn_proto::relay::{Command, Install, RelayConfig, PEER_HEADROOM, PEER_TAILROOM};
use uturn_proto::wire::{ChannelData, Class, IntegrityKey, Message, MessageWriter, Method, TransactionId};
use uturn_proto::{FiveTuple, WorkerState};

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let tid = TransactionId([3; 12]);
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for method in [Method::BINDING, Method::ALLOCATE, Method::CHANNEL_BIND, Method::SEND] {
        let class = if method == Method::SEND { Class::Indication } else { Class::Request };
        let mut buf = vec![0u8; 256];
        let mut w = MessageWriter::new(&mut buf, method, class, tid).unwrap();
        w.bytes(0x0006, b"demo").unwrap();
        w.xor_address(0x0012, &peer).unwrap();
        w.u32(0x000C, 0x4001_0000).unwrap();
        w.bytes(0x0013, b"data!").unwrap();
        w.integrity(&[1; 16]).unwrap();
        w.fingerprint().unwrap();
        let n = w.finish();
        buf.truncate(n);
        out.push(buf);
    }
    out.push(vec![0x40, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0]);
    out
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
    let ft = FiveTuple { client: "127.0.0.1:5000".parse().unwrap(), server: "127.0.0.1:3478".parse().unwrap() };
    let mut out = vec![0u8; 1500];
    let _ = state.handle_client_datagram(now, &ft, datagram, &mut out);
    let _ = ChannelData::parse(datagram);
}

fn state_with_allocation(now: Instant) -> (WorkerState, uturn_proto::relay::AllocationId) {
    let mut s = WorkerState::new(RelayConfig::default(), now, 1);
    let ft = FiveTuple { client: "127.0.0.1:5000".parse().unwrap(), server: "127.0.0.1:3478".parse().unwrap() };
    let mut out = vec![0u8; 1500];
    let install = Install {
        five_tuple: ft,
        tid: TransactionId([1; 12]),
        relayed: "127.0.0.1:50000".parse().unwrap(),
        lifetime: Duration::from_secs(600),
        response: vec![0u8; 20].into(),
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
            key: IntegrityKey([1; 16]),
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
        seed in 0usize..5,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = seeds()[seed].clone();
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
    for s in seeds().iter().take(4) {
        let m = Message::parse(s).unwrap();
        assert!(m.has_integrity());
        reencodes_identically(s);
    }
}
