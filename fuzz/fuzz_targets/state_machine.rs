//! The per-worker state machine driven by a script of operations from several 5-tuples:
//! client datagrams, control-plane commands, peer datagrams and time passing. After every step
//! the tables' counts match their contents.
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use uturn_proto::relay::{AllocationId, Command, Effect, Install, RelayConfig, PEER_HEADROOM, PEER_TAILROOM};
use uturn_proto::wire::{ChannelNumber, IntegrityKey, TransactionId};
use uturn_proto::{FiveTuple, WorkerState};

fn five_tuple(i: u8) -> FiveTuple {
    FiveTuple::udp(SocketAddr::from(([127, 0, 0, 1], 5000 + (i % 4) as u16)), "127.0.0.1:3478".parse().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let config = RelayConfig { max_permissions: 4, max_channels: 3, bandwidth: Some(10_000), ..RelayConfig::default() };
    let mut s = WorkerState::new(config, t0, 7);
    let mut out = vec![0u8; 1500];
    let mut ids: Vec<AllocationId> = Vec::new();
    let key = IntegrityKey::from_md5([3; 16]);
    let mut ops = data.chunks(6);
    while let Some(op) = ops.next() {
        let [kind, who, a, b, c, d] = [op.first(), op.get(1), op.get(2), op.get(3), op.get(4), op.get(5)].map(|x| x.copied().unwrap_or(0));
        let ft = five_tuple(who);
        let peer = SocketAddr::from(([127, 0, 0, 1 + (a % 3)], 9000 + (b % 3) as u16));
        let tid = TransactionId([c; 12]);
        match kind % 8 {
            0 => {
                let install = Install {
                    five_tuple: ft,
                    tid,
                    relayed: SocketAddr::from(([127, 0, 0, 1], 50000 + who as u16)),
                    additional: None,
                    lifetime: Duration::from_secs(1 + (d as u64 % 20)),
                    response: vec![d; 20].into(),
                    key: uturn_proto::wire::IntegrityKey::from_md5([1; 16]),
                    session: 1,
                    user: "user".into(),
                };
                if let Effect::Installed(id) = s.handle_command(now, Command::Install(install), &mut out).effect {
                    ids.push(id);
                }
            }
            1 => {
                s.handle_command(now, Command::Refresh { five_tuple: ft, tid, lifetime: Duration::from_secs(d as u64 % 5), key }, &mut out);
            }
            2 => {
                let peers: Vec<IpAddr> = (0..(d % 4)).map(|i| IpAddr::from([127, 0, 0, 1 + (a.wrapping_add(i) % 6)])).collect();
                s.handle_command(now, Command::CreatePermission { five_tuple: ft, tid, peers, key }, &mut out);
            }
            3 => {
                let channel = ChannelNumber::new(0x4000 + (d % 5) as u16).unwrap();
                s.handle_command(now, Command::ChannelBind { five_tuple: ft, tid, channel, peer, key }, &mut out);
            }
            4 => {
                let len = (d as usize).min(op.len());
                let mut datagram = vec![0x40, d % 5, 0, len as u8];
                datagram.extend_from_slice(&op[..len]);
                s.handle_client_datagram(now, &ft, &datagram, &mut out);
            }
            5 => {
                if let Some(id) = ids.get(a as usize % ids.len().max(1)) {
                    let mut buf = vec![0u8; PEER_HEADROOM + 64 + PEER_TAILROOM];
                    s.handle_peer_datagram(now, *id, peer, &mut buf, PEER_HEADROOM..PEER_HEADROOM + (d as usize % 64));
                }
            }
            6 => {
                now += Duration::from_millis(d as u64 * 100);
                let mut expired = Vec::new();
                s.handle_timeout(now, &mut expired);
            }
            _ => {
                s.handle_client_datagram(now, &ft, op, &mut out);
            }
        }
        s.tables().check_consistency().unwrap();
        let live = s.tables().allocation_count();
        assert!(live <= 4, "at most one allocation per 5-tuple");
    }
});
