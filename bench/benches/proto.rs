//! Criterion benchmarks of the per-packet and per-request work in `uturn-proto`: parsing a STUN
#![allow(missing_docs)] // criterion_group! generates undocumented items
//! request, verifying MESSAGE-INTEGRITY, building a response, and the ChannelData fast path
//! (5-tuple, channel and permission lookups) in tables of 1 and 100,000 allocations.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use uturn_proto::ratelimit::SourceLimiter;
use uturn_proto::relay::{Command, Effect, Install, RelayConfig, PEER_HEADROOM, PEER_TAILROOM};
use uturn_proto::response;
use uturn_proto::wire::{
    attr, integrity, ChannelNumber, Class, IntegrityKey, Message, MessageWriter, Method, TransactionId,
};
use uturn_proto::{FiveTuple, WorkerState};

fn refresh_request(key: &IntegrityKey) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut w = MessageWriter::new(&mut buf, Method::REFRESH, Class::Request, TransactionId([7; 12])).unwrap();
    w.u32(attr::LIFETIME, 600).unwrap();
    w.bytes(attr::USERNAME, b"demo").unwrap();
    w.bytes(attr::REALM, b"uturn.local").unwrap();
    w.bytes(attr::NONCE, &[b'a'; 40]).unwrap();
    w.integrity(key.as_bytes()).unwrap();
    w.fingerprint().unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

fn five_tuple(i: u32) -> FiveTuple {
    FiveTuple::udp(
        SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 40000)),
        "127.0.0.1:3478".parse().unwrap(),
    )
}

/// A worker state with `n` allocations, each with one channel bound to one permitted peer.
fn state_with(n: u32) -> WorkerState {
    let now = Instant::now();
    let mut s = WorkerState::new(RelayConfig::default(), now, 1);
    let mut out = vec![0u8; 1500];
    let key = IntegrityKey::from_md5([1; 16]);
    for i in 0..n {
        let ft = five_tuple(i);
        let install = Install {
            five_tuple: ft,
            tid: TransactionId([0; 12]),
            relayed: SocketAddr::from(([127, 0, 0, 1], 50000)),
            additional: None,
            lifetime: Duration::from_secs(3600),
            response: vec![0u8; 100].into(),
            key: uturn_proto::wire::IntegrityKey::from_md5([1; 16]),
            session: 1,
            user: "user".into(),
        };
        let Effect::Installed(_) = s.handle_command(now, Command::Install(install), &mut out).effect else { panic!() };
        let peer = SocketAddr::from(([192, 0, 2, 1], 6000));
        let channel = ChannelNumber::new(0x4001).unwrap();
        s.handle_command(
            now,
            Command::ChannelBind { five_tuple: ft, tid: TransactionId([1; 12]), channel, peer, key },
            &mut out,
        );
    }
    s
}

fn benches(c: &mut Criterion) {
    let key = IntegrityKey::long_term("demo", "uturn.local", "demo");
    let req = refresh_request(&key);
    c.bench_function("parse STUN request (Refresh, 6 attributes, FINGERPRINT checked)", |b| {
        b.iter(|| Message::parse(black_box(&req)).unwrap().transaction_id())
    });
    let msg = Message::parse(&req).unwrap();
    c.bench_function("verify MESSAGE-INTEGRITY (HMAC-SHA1)", |b| {
        b.iter(|| integrity::verify(black_box(key.as_bytes()), &msg.integrity_parts().unwrap()))
    });
    let mut out = vec![0u8; 1500];
    c.bench_function("build Allocate success (XOR addresses, LIFETIME, MI, FINGERPRINT)", |b| {
        b.iter(|| {
            let mut w = response::start(&mut out, Method::ALLOCATE, Class::Success, TransactionId([7; 12])).unwrap();
            w.xor_address(attr::XOR_RELAYED_ADDRESS, &"127.0.0.1:50000".parse().unwrap()).unwrap();
            w.xor_address(attr::XOR_MAPPED_ADDRESS, &"127.0.0.1:40000".parse().unwrap()).unwrap();
            w.u32(attr::LIFETIME, 600).unwrap();
            response::seal(w, Some(&key)).unwrap()
        })
    });
    let mut cd = vec![0x40, 0x01, 0x00, 160];
    cd.extend_from_slice(&[0u8; 160]);
    for n in [1u32, 100_000] {
        let mut s = state_with(n);
        let now = Instant::now();
        let ft = five_tuple(n / 2);
        c.bench_function(&format!("ChannelData client->peer lookup, {n} allocations"), |b| {
            b.iter(|| s.handle_client_datagram(now, black_box(&ft), black_box(&cd), &mut out))
        });
        let id = s.tables().lookup(&ft).unwrap();
        let peer = SocketAddr::from(([192, 0, 2, 1], 6000));
        let mut buf = vec![0u8; PEER_HEADROOM + 160 + PEER_TAILROOM];
        c.bench_function(&format!("peer->ChannelData framing in place, {n} allocations"), |b| {
            b.iter_batched_ref(
                || (),
                |_| s.handle_peer_datagram(now, id, black_box(peer), &mut buf, PEER_HEADROOM..PEER_HEADROOM + 160),
                BatchSize::SmallInput,
            )
        });
    }
}

/// The per-source budget with its table full of spoofed sources: every datagram from a new
/// source costs one keyed hash and one set of four entries, never a scan.
fn limiter(c: &mut Criterion) {
    let t0 = Instant::now();
    let mut l = SourceLimiter::new(1000, t0);
    let sources: Vec<IpAddr> = (0..1u32 << 20).map(|i| IpAddr::from((0x0a00_0000 | i).to_be_bytes())).collect();
    for ip in &sources[..65_536] {
        l.allow(t0, *ip);
    }
    let mut i = 0usize;
    c.bench_function("per-source budget, table full, new spoofed source each datagram", |b| {
        b.iter(|| {
            i = (i + 1) & (sources.len() - 1);
            l.allow(t0, black_box(sources[i]))
        })
    });
    let known: IpAddr = "198.51.100.7".parse().unwrap();
    // A flooding known source: the clock moves 1 µs a datagram, so one in a thousand passes.
    let mut us = 0u64;
    c.bench_function("per-source budget, table full, known source flooding", |b| {
        b.iter(|| {
            us += 1;
            l.allow(t0 + Duration::from_micros(us), black_box(known))
        })
    });
    let v6: Vec<IpAddr> = (0..4096u16).map(|i| IpAddr::from([0x2001, 0xdb8, i, 0, 0, 0, 0, i])).collect();
    c.bench_function("per-source budget, IPv6 /64 key", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            l.allow(t0, black_box(v6[i]))
        })
    });
}

// No plots: with the workspace's plotters (ab_glyph, no system fonts) criterion's SVG charts
// panic on a missing font; the figures are in the text output and target/criterion/*.json.
criterion_group! {
    name = proto;
    config = Criterion::default().without_plots();
    targets = benches, limiter
}
criterion_main!(proto);
