//! The ChannelData and Send paths in both directions, on a worker with one allocation, a bound
//! channel and a permission: any client datagram and any peer payload; tables stay consistent.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use uturn_proto::relay::{
    ClientOutput, Command, Effect, Install, PeerOutput, RelayConfig, PEER_HEADROOM, PEER_TAILROOM,
};
use uturn_proto::wire::channel_data::{self, ChannelData};
use uturn_proto::wire::{ChannelNumber, IntegrityKey, TransactionId};
use uturn_proto::{FiveTuple, WorkerState};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let ft = FiveTuple::udp("127.0.0.1:5000".parse().unwrap(), "127.0.0.1:3478".parse().unwrap());
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut s = WorkerState::new(RelayConfig::default(), now, 1);
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
    let Effect::Installed(id) = s.handle_command(now, Command::Install(install), &mut out).effect else { panic!() };
    let channel = ChannelNumber::new(0x4001).unwrap();
    let key = IntegrityKey::from_md5([1; 16]);
    s.handle_command(
        now,
        Command::ChannelBind { five_tuple: ft, tid: TransactionId([2; 12]), channel, peer, key },
        &mut out,
    );
    // Whatever parses as ChannelData re-frames to the bytes it was parsed from: the length field
    // is the payload's length, and header plus payload are the datagram's prefix (the rest is
    // padding, ignored over UDP).
    let parsed = ChannelData::parse(data).ok();
    if let Some(cd) = parsed {
        let len = cd.payload().len();
        assert_eq!(u16::from_be_bytes([data[2], data[3]]) as usize, len);
        let mut framed = vec![0u8; channel_data::HEADER_LEN + len];
        channel_data::write_header(&mut framed, cd.channel(), len as u16);
        framed[channel_data::HEADER_LEN..].copy_from_slice(cd.payload());
        assert_eq!(&framed[..], &data[..framed.len()]);
    }
    match (s.handle_client_datagram(now, &ft, data, &mut out), parsed) {
        // ChannelData is relayed only on the bound channel, to its peer, and what goes to the
        // peer is exactly its payload.
        (ClientOutput::Relay { peer: to, payload, .. }, Some(cd)) => {
            assert_eq!(cd.channel(), channel);
            assert_eq!(to, peer);
            assert_eq!(payload, channel_data::HEADER_LEN..channel_data::HEADER_LEN + cd.payload().len());
            assert_eq!(&data[payload], cd.payload());
        }
        // Otherwise it was a Send indication, which relays a slice of the datagram.
        (ClientOutput::Relay { payload, .. }, None) => {
            assert!(payload.start <= payload.end && payload.end <= data.len())
        }
        (ClientOutput::Reply(n), _) => assert!(n <= out.len()),
        _ => {}
    }
    let mut buf = vec![0u8; PEER_HEADROOM + data.len() + PEER_TAILROOM];
    buf[PEER_HEADROOM..PEER_HEADROOM + data.len()].copy_from_slice(data);
    let payload = PEER_HEADROOM..PEER_HEADROOM + data.len();
    if let PeerOutput::ToClient { five_tuple, message } = s.handle_peer_datagram(now, id, peer, &mut buf, payload) {
        assert_eq!(five_tuple, ft);
        assert!(message.end <= buf.len());
        // The peer is bound to `channel`, so its datagram reaches the client as ChannelData that
        // parses back to the peer's bytes, with a length field equal to their length, and is
        // exactly what the crate's own framing of that payload writes.
        let framed = &buf[message];
        assert!(data.len() <= u16::MAX as usize, "too long for ChannelData or a Data indication");
        let cd = ChannelData::parse(framed).expect("a bound peer's datagram is framed as ChannelData");
        assert_eq!(cd.channel(), channel);
        assert_eq!(cd.payload(), data);
        assert_eq!(u16::from_be_bytes([framed[2], framed[3]]) as usize, data.len());
        let mut expected = vec![0u8; channel_data::HEADER_LEN + data.len()];
        channel_data::write_header(&mut expected, channel, data.len() as u16);
        expected[channel_data::HEADER_LEN..].copy_from_slice(data);
        assert_eq!(framed, &expected[..]);
    }
    s.tables().check_consistency().unwrap();
});
