//! The per-source budget end to end (docs/security.md): no request draws an answer or reaches
//! the control plane outside its source's budget unless the worker verified its
//! MESSAGE-INTEGRITY; forged integrity buys nothing; the default lets a big NAT through; a flood
//! from one address does not make other clients' Allocates fail. Every source is an address of
//! 127.0.0.0/8 on loopback; every loop is bounded.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use uturn_proto::wire::{attr, Class, Method, TransactionId};
use uturn_tests::{build, Client, Relay};

const UDP: u32 = 17 << 24;

fn socket_on(ip: [u8; 4]) -> UdpSocket {
    let s = UdpSocket::bind(SocketAddr::from((ip, 0))).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    s
}

/// Reads answers on `s` until it stays quiet for 300 ms (at most `limit` reads).
fn drain(s: &UdpSocket, limit: usize) -> usize {
    let mut buf = [0u8; 1500];
    (0..limit).take_while(|_| s.recv_from(&mut buf).is_ok()).count()
}

/// A request with a forged MESSAGE-INTEGRITY: an HMAC under a random key, so 20 random bytes.
fn forged(method: Method) -> Vec<u8> {
    let key: [u8; 16] = rand::random();
    build(method, Class::Request, TransactionId(rand::random()), Some(&key), |w| {
        if method == Method::ALLOCATE {
            w.u32(attr::REQUESTED_TRANSPORT, UDP)?;
        }
        w.bytes(attr::USERNAME, b"demo")?;
        w.bytes(attr::REALM, b"uturn.local")?;
        w.bytes(attr::NONCE, b"obj-0000000000000000000000").map(drop)
    })
}

fn plain(method: Method) -> Vec<u8> {
    build(method, Class::Request, TransactionId(rand::random()), None, |w| {
        if method == Method::ALLOCATE {
            w.u32(attr::REQUESTED_TRANSPORT, UDP)?;
        }
        Ok(())
    })
}

/// Sends `count` requests made by `make` from `s` spread over `over`, while a second thread
/// counts the answers (so none is lost to a full receive buffer); returns (answers, seconds).
fn flood(relay: &Relay, s: &UdpSocket, count: usize, over: Duration, make: impl Fn() -> Vec<u8>) -> (usize, f64) {
    let reader = s.try_clone().unwrap();
    let counter = std::thread::spawn(move || drain(&reader, count));
    let start = Instant::now();
    for i in 0..count {
        s.send_to(&make(), relay.addr).unwrap();
        let due = over.mul_f64(i as f64 / count as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    (counter.join().unwrap(), elapsed)
}

#[test]
fn forged_integrity_buys_no_more_answers_than_none() {
    // 200 per source for the relay: each of the two workers answers a source 100 a second, with
    // a burst of 100. One socket is one 5-tuple, served by one worker.
    let relay = Relay::start("uring", "unauth-rate = 200\n", &[]);
    let kinds: [(&str, [u8; 4], fn() -> Vec<u8>); 4] = [
        ("plain Binding", [127, 0, 1, 1], || plain(Method::BINDING)),
        ("Binding with forged MESSAGE-INTEGRITY", [127, 0, 1, 2], || forged(Method::BINDING)),
        ("Allocate with forged MESSAGE-INTEGRITY", [127, 0, 1, 3], || forged(Method::ALLOCATE)),
        ("unknown method", [127, 0, 1, 4], || plain(Method(0x0123))),
    ];
    for (name, ip, make) in kinds {
        let s = socket_on(ip);
        let (answers, secs) = flood(&relay, &s, 3000, Duration::from_secs(1), make);
        println!("flood: 3000 x {name} in {secs:.2} s from one source -> {answers} answers");
        let budget = 100.0 + 100.0 * secs;
        assert!(answers as f64 <= budget + 10.0, "{name}: {answers} answers, budget {budget:.0}");
        assert!(answers >= 90, "{name}: {answers} answers: the budget itself is served");
    }
    let status_log = relay.log();
    assert!(!status_log.contains("panicked"), "{status_log}");
}

#[test]
fn the_default_answers_a_big_nat_and_caps_a_flood() {
    let relay = Relay::start("uring", "", &[]);
    // 500 clients behind one public address, each a Binding and an unauthenticated Allocate
    // within one second: every one answered.
    let nat: Vec<UdpSocket> = (0..500).map(|_| socket_on([127, 0, 2, 1])).collect();
    let start = Instant::now();
    for s in &nat {
        s.send_to(&plain(Method::BINDING), relay.addr).unwrap();
        s.send_to(&plain(Method::ALLOCATE), relay.addr).unwrap();
    }
    let sent_in = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let mut buf = [0u8; 1500];
    let answered: usize = nat
        .iter()
        .map(|s| {
            s.set_nonblocking(true).unwrap();
            (0..4).take_while(|_| s.recv_from(&mut buf).is_ok()).count()
        })
        .sum();
    println!("NAT: 500 clients x (Binding + Allocate) from one address in {sent_in:?} -> {answered} of 1000 answered");
    assert!(sent_in < Duration::from_secs(1));
    assert_eq!(answered, 1000, "every client behind the NAT is answered");
    // A flood from one source still gets at most its share: 2000/s for the relay, so 1000 a
    // second with a burst of 1000 from the one worker its 5-tuple lands on.
    let kinds: [(&str, [u8; 4], fn() -> Vec<u8>); 3] = [
        ("plain Bindings", [127, 0, 2, 2], || plain(Method::BINDING)),
        ("Bindings with forged MESSAGE-INTEGRITY", [127, 0, 2, 3], || forged(Method::BINDING)),
        ("Allocates with forged MESSAGE-INTEGRITY", [127, 0, 2, 4], || forged(Method::ALLOCATE)),
    ];
    for (name, ip, make) in kinds {
        let s = socket_on(ip);
        let (answers, secs) = flood(&relay, &s, 3000, Duration::from_secs(1), make);
        println!("flood at the default: 3000 {name} in {secs:.2} s from one source -> {answers} answers");
        assert!(answers as f64 <= 1000.0 + 1000.0 * secs + 20.0, "{name}: {answers} answers in {secs:.2} s");
    }
}

#[test]
fn a_forged_flood_from_one_address_does_not_starve_other_clients_allocations() {
    let relay = Relay::start("uring", "", &[]);
    let addr = relay.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two sockets on one address (so both workers are likely hit), 40,000 forged Allocates a
    // second each (twenty times the default budget of the whole relay), for at most 20 s.
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let s = socket_on([127, 0, 3, 1]);
                let reqs: Vec<Vec<u8>> = (0..64).map(|_| forged(Method::ALLOCATE)).collect();
                let start = Instant::now();
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && start.elapsed() < Duration::from_secs(20) {
                    let _ = s.send_to(&reqs[sent as usize % reqs.len()], addr);
                    sent += 1;
                    // Paced in batches of 400 (10 ms at 40,000/s).
                    if sent % 400 == 0 {
                        if let Some(wait) = Duration::from_micros(sent * 25).checked_sub(start.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
                sent
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut failures = Vec::new();
    let mut clients = Vec::new();
    for i in 0..40 {
        std::thread::sleep(Duration::from_millis(50));
        let mut c = Client::new(addr, "demo", "demo", "uturn.local");
        match c.try_allocate() {
            Ok(_) => clients.push(c),
            Err(e) => failures.push(format!("client {i}: {e}")),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: u64 = flooders.into_iter().map(|t| t.join().unwrap()).sum();
    println!(
        "starvation: {sent} forged Allocates from one address while 40 clients allocated: {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    let log = relay.log();
    assert!(!log.contains("panicked"), "{log}");
}
