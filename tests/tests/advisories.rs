//! coturn's 2025–2026 security advisories as regression tests against a real uturn process on
//! loopback (issue 21 §6; the table is in docs/security.md, "coturn advisories"). Those covered
//! elsewhere are pointed to from that table, not repeated here.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use uturn_tests::uturn_proto::wire::{attr, Method};
use uturn_tests::{run_with_timeout, uturn_bin, uturn_cli, Client, RedisServer, Relay, BACKENDS};

const BACKEND: &str = BACKENDS[0];

fn v6_port() -> u16 {
    UdpSocket::bind("[::1]:0").unwrap().local_addr().unwrap().port()
}

/// Allocates on `relay` (demo user) asking for `family` (attr::FAMILY_IPV4 / _IPV6), with
/// `extra` attributes; returns the client and the response.
fn allocate(server: SocketAddr, family: Option<u8>, extra: &[(u16, &[u8])]) -> (Client, uturn_tests::Response) {
    let mut c = Client::new(server, "demo", "demo", "uturn.local");
    c.learn_nonce();
    let r = c
        .transact_authenticated(Method::ALLOCATE, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, 17 << 24)?;
            if let Some(f) = family {
                w.u32(attr::REQUESTED_ADDRESS_FAMILY, (f as u32) << 24)?;
            }
            for (t, v) in extra {
                w.bytes(*t, v)?;
            }
            Ok(())
        })
        .unwrap();
    (c, r)
}

fn relayed(r: &uturn_tests::Response) -> SocketAddr {
    assert_eq!(r.code(), None, "Allocate failed");
    r.msg().xor_address(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap()
}

/// CVE-2025-69217 (coturn ≤ 4.7: relay ports from a weak PRNG, nonces guessable). uturn draws
/// each relay port's search start from the CSPRNG (controlplane/src/ports.rs) and mints nonces
/// as an HMAC under a random per-process key, bound to the client's address
/// (dataplane/proto/src/nonce.rs).
#[test]
fn cve_2025_69217_relay_ports_and_nonces_are_not_predictable() {
    let relay = Relay::start(BACKEND, "port-range = \"50000-59999\"\n", &[]);
    let ports: Vec<u16> = (0..16).map(|_| relayed(&allocate(relay.addr, None, &[]).1).port()).collect();
    // A counter or a time-seeded PRNG gives steps of 1 or 2; a CSPRNG over 10,000 ports almost
    // never (16 draws: a chance below 1e-20 that even half the steps are that small).
    let small = ports.windows(2).filter(|w| w[1].abs_diff(w[0]) <= 2).count();
    assert!(small < 8, "relay ports follow each other: {ports:?}");
    let distinct: std::collections::HashSet<_> = ports.iter().collect();
    assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    // Nonces: one client socket asks two relays (two processes, two keys) and gets different
    // nonces; a nonce from one is refused by the other (438), and by the same relay for another
    // client address.
    let other = Relay::start(BACKEND, "", &[]);
    let mut a = Client::new(relay.addr, "demo", "demo", "uturn.local");
    a.learn_nonce();
    let mut b = Client::new(other.addr, "demo", "demo", "uturn.local");
    b.learn_nonce();
    assert_ne!(a.nonce, b.nonce);
    let mut c = Client::new(other.addr, "demo", "demo", "uturn.local");
    c.nonce = a.nonce.clone();
    let r = c.authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop));
    assert_eq!(r.code(), Some(438), "another process's nonce");
    let mut d = Client::new(relay.addr, "demo", "demo", "uturn.local");
    d.nonce = a.nonce.clone();
    let r = d.authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop));
    assert_eq!(r.code(), Some(438), "another client address's nonce");
}

/// CVE-2026-27624 and its 4.13 sequel (`::ffff:127.0.0.1` and other IPv6 spellings of IPv4
/// reaching loopback or the relay itself), 4.13.1 (169.254.169.254, link-local, ULA peers) and
/// 6to4 / NAT64 / IPv4-compatible / IPv4-translated forms. On an IPv6 allocation, every
/// spelling of the relay's own listener, of the metadata address, of private ranges, and
/// link-local, site-local and ULA peers get 403.
#[test]
fn cve_2026_27624_ipv4_spellings_link_local_and_ula_peers_are_denied() {
    let p6 = v6_port();
    let relay = Relay::start(
        BACKEND,
        "",
        &["--listen", &format!("[::1]:{p6}"), "--relay-ip", "127.0.0.1", "--relay-ip", "::1"],
    );
    let (c, r) = allocate(relay.addr, Some(attr::FAMILY_IPV6), &[]);
    assert!(relayed(&r).is_ipv6());
    let port = relay.addr.port();
    let own = [
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("[::ffff:0:127.0.0.1]:{port}"),
        format!("[::127.0.0.1]:{port}"),
        format!("[64:ff9b::7f00:1]:{port}"),
        format!("[::1]:{p6}"),
    ];
    let denied = [
        "[2002:7f00:1::1]:5000",       // 6to4 of 127.0.0.1 (and any 6to4)
        "[::ffff:169.254.169.254]:80", // cloud metadata, mapped
        "[64:ff9b::a9fe:a9fe]:80",     // cloud metadata, NAT64
        "[::169.254.169.254]:80",      // cloud metadata, IPv4-compatible
        "[::ffff:0:a9fe:a9fe]:80",     // cloud metadata, IPv4-translated
        "[::ffff:10.0.0.1]:5000",
        "[64:ff9b::c0a8:101]:5000", // 192.168.1.1
        "[64:ff9b:1::a00:1]:5000",  // local-use NAT64
        "[fe80::1]:5000",           // link-local
        "[fec0::1]:5000",           // site-local
        "[fd00::1]:5000",           // ULA
        "[fc00::1]:5000",
        "[2001::1]:5000", // Teredo
        "[ff02::1]:5000",
        "[::]:5000",
    ];
    for peer in own.iter().map(String::as_str).chain(denied) {
        let peer: SocketAddr = peer.parse().unwrap();
        assert_eq!(c.create_permission(&[peer]).code(), Some(403), "CreatePermission {peer}");
        assert_eq!(c.channel_bind(0x4001, peer).code(), Some(403), "ChannelBind {peer}");
    }
    // A public IPv6 peer is allowed (the permission needs no route).
    assert_eq!(c.create_permission(&["[2001:db8::1]:5000".parse().unwrap()]).code(), None);
}

/// coturn 4.16: IPv6 denied ranges whose bounds were not aligned to a prefix denied the wrong
/// addresses. uturn takes CIDRs only (ipnet): host bits in a `deny-peer` entry are masked off,
/// so "2001:db8:1234::1/36" denies exactly 2001:db8:1000::/36; a range written "A-B" is refused
/// at start, not half-applied.
#[test]
fn coturn_4_16_unaligned_ipv6_deny_ranges() {
    let p6 = v6_port();
    let relay = Relay::start(
        BACKEND,
        "deny-peer = [\"2001:db8:1234::1/36\"]\n",
        &["--listen", &format!("[::1]:{p6}"), "--relay-ip", "127.0.0.1", "--relay-ip", "::1"],
    );
    let (c, r) = allocate(relay.addr, Some(attr::FAMILY_IPV6), &[]);
    relayed(&r);
    for (peer, code) in [
        ("[2001:db8:1000::1]:5000", Some(403)),
        ("[2001:db8:1234::1]:5000", Some(403)),
        ("[2001:db8:1fff:ffff:ffff:ffff:ffff:ffff]:5000", Some(403)),
        ("[2001:db8:fff:ffff:ffff:ffff:ffff:ffff]:5000", None),
        ("[2001:db8:2000::]:5000", None),
    ] {
        assert_eq!(c.create_permission(&[peer.parse().unwrap()]).code(), code, "{peer}");
    }
    let cfg = uturn_tests::tempfile_lite::TempFile::new("range.toml", "deny-peer = [\"2001:db8::1-2001:db8::5\"]\n");
    let mut cmd = std::process::Command::new(uturn_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--config"]).arg(&cfg.0);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(10));
    assert!(!ok && out.contains("deny-peer"), "a range is refused at start: {out}");
}

/// coturn 4.17: EVEN-PORT with R=0 reserved (and leaked) the next port. uturn binds one even
/// port and nothing else: the odd port after it stays free for anyone, no RESERVATION-TOKEN is
/// answered, and allocating and deleting many times in a 20-port range never runs out.
#[test]
fn coturn_4_17_even_port_without_r_reserves_nothing() {
    let lo = 40000 + 2 * (rand::random::<u16>() % 5000);
    let range = format!("{lo}-{}", lo + 19);
    let relay = Relay::start(BACKEND, &format!("port-range = \"{range}\"\n"), &[]);
    for i in 0..60 {
        let (mut c, r) = allocate(relay.addr, None, &[(attr::EVEN_PORT, &[0x00])]);
        let addr = relayed(&r);
        assert_eq!(addr.port() % 2, 0, "allocation {i}");
        assert!(r.msg().get(attr::RESERVATION_TOKEN).is_none(), "R=0 earns no token");
        // The next port is not held by the relay.
        let next = UdpSocket::bind(SocketAddr::new(addr.ip(), addr.port() + 1));
        assert!(next.is_ok(), "allocation {i}: port {} is held", addr.port() + 1);
        drop(next);
        assert_eq!(c.try_refresh(0), Ok(0));
    }
}

/// coturn 4.13: USERNAME and REALM spliced into Redis commands. uturn sends every value as its
/// own RESP bulk string (the `redis` crate) and passes names to its Lua scripts as ARGV, so no
/// name can add a command or widen a key. Against a redis-server the test starts: names full of
/// Redis and Lua syntax are stored and found as themselves, lookups with such names get 401,
/// and nothing else in the store changes.
#[test]
fn coturn_4_13_usernames_are_never_redis_syntax() {
    let redis = RedisServer::start();
    injection_suite(&redis.url());
}

/// coturn 4.12: SQL injection through the username. uturn's SQLite queries bind every value
/// (`?1`, `?2`); against a real SQLite file, names full of SQL are stored and found as
/// themselves and change nothing else.
#[test]
fn coturn_4_12_usernames_are_never_sql() {
    let path = std::env::temp_dir().join(format!("uturn-adv-{}-{}.db", std::process::id(), rand::random::<u32>()));
    injection_suite(&format!("sqlite://{}", path.display()));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

const REALM: &str = "example.org";

fn injection_suite(store: &str) {
    let admin = |args: &[&str]| {
        let mut all = vec!["admin", "--store", store];
        all.extend_from_slice(args);
        uturn_cli(&all)
    };
    let add = |name: &str, pw: &str| {
        let (code, _, err) = admin(&["user", "add", name, "--realm", REALM, "--password", pw]);
        assert_eq!(code, 0, "{name}: {err}");
    };
    add("alice", "wonderland");
    let evil = [
        "x' OR '1'='1",
        "x'; DROP TABLE users; --",
        "alice' --",
        "x\" OR \"\"=\"",
        "*",
        "alice*",
        "x FLUSHALL",
        "x') .. redis.call('FLUSHALL') .. ('",
        "]]..redis.call('DEL','uturn:users:example.org')..[[",
        "$5 *1 FLUSHALL",
    ];
    for name in evil {
        add(name, "pw");
    }
    let (code, out, _) = admin(&["user", "list", "--realm", REALM]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1 + evil.len(), "{out}");
    let relay = Relay::start(
        BACKEND,
        &format!("realm = \"{REALM}\"\nuser-store = \"{store}\"\nuser-cache-ttl = 1\nunauth-rate = 0\n"),
        &[],
    );
    let try_alloc = |user: &str, pw: &str| {
        let mut c = Client::new(relay.addr, user, pw, REALM);
        c.try_allocate().map(drop)
    };
    try_alloc("alice", "wonderland").unwrap();
    for name in evil {
        // Each is a user with its own password, and nobody else's.
        try_alloc(name, "pw").unwrap_or_else(|e| panic!("{name}: {e}"));
        let e = try_alloc(name, "wonderland").unwrap_err();
        assert!(e.contains("401"), "{name}: {e}");
    }
    // Names that were never added, shaped to match others or break out of a query.
    for name in ["alice' OR name LIKE '%", "%", "al%", "alice\r\nFLUSHALL", "alice\u{0}", "' UNION SELECT md5_key"] {
        let e = try_alloc(name, "wonderland").unwrap_err();
        assert!(e.contains("401") || e.contains("400"), "{name:?}: {e}");
    }
    // Nothing was deleted or flushed: every user is still listed and alice still allocates.
    let (_, out2, _) = admin(&["user", "list", "--realm", REALM]);
    assert_eq!(out2, out);
    try_alloc("alice", "wonderland").unwrap();
}
