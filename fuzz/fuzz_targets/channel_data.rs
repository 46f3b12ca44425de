//! The ChannelData and Send paths in both directions, on a worker with one allocation, a bound
//! channel and a permission: any client datagram and any peer payload; tables stay consistent.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use uturn_proto::relay::{ClientOutput, Command, Effect, Install, PeerOutput, RelayConfig, PEER_HEADROOM, PEER_TAILROOM};
use uturn_proto::wire::{ChannelNumber, IntegrityKey, TransactionId};
use uturn_proto::{FiveTuple, WorkerState};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let ft = FiveTuple { client: "127.0.0.1:5000".parse().unwrap(), server: "127.0.0.1:3478".parse().unwrap() };
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut s = WorkerState::new(RelayConfig::default(), now, 1);
    let mut out = vec![0u8; 1500];
    let install = Install {
        five_tuple: ft,
        tid: TransactionId([1; 12]),
        relayed: "127.0.0.1:50000".parse().unwrap(),
        lifetime: Duration::from_secs(600),
        response: vec![0u8; 20].into(),
    };
    let Effect::Installed(id) = s.handle_command(now, Command::Install(install), &mut out).effect else { panic!() };
    let channel = ChannelNumber::new(0x4001).unwrap();
    let key = IntegrityKey([1; 16]);
    s.handle_command(now, Command::ChannelBind { five_tuple: ft, tid: TransactionId([2; 12]), channel, peer, key }, &mut out);
    match s.handle_client_datagram(now, &ft, data, &mut out) {
        ClientOutput::Relay { payload, .. } => assert!(payload.end <= data.len() && payload.start <= payload.end),
        ClientOutput::Reply(n) => assert!(n <= out.len()),
        _ => {}
    }
    let mut buf = vec![0u8; PEER_HEADROOM + data.len() + PEER_TAILROOM];
    buf[PEER_HEADROOM..PEER_HEADROOM + data.len()].copy_from_slice(data);
    let payload = PEER_HEADROOM..PEER_HEADROOM + data.len();
    if let PeerOutput::ToClient { message, .. } = s.handle_peer_datagram(now, id, peer, &mut buf, payload.clone()) {
        assert!(message.end <= buf.len());
        assert_eq!(&buf[message.end - data.len().min(message.len())..message.end].len(), &data.len().min(message.len()));
    }
    s.tables().check_consistency().unwrap();
});
