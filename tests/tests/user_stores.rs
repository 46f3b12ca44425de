//! The relay with a user store: one suite run against a real SQLite file and a real
//! `redis-server` that the test starts (users managed with `uturn admin`, several realms,
//! changes seen within the cache TTL, SHA-256-less users), and a Redis outage mid-test.

use std::time::{Duration, Instant};

use uturn_tests::uturn_proto::wire::{attr, IntegrityKey, Method};
use uturn_tests::{uturn_cli, Client, RedisServer, Relay, BACKENDS};

const BACKEND: &str = BACKENDS[0];
const REALM: &str = "example.org";

fn admin(store: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["admin", "--store", store];
    all.extend_from_slice(args);
    uturn_cli(&all)
}

fn add(store: &str, name: &str, realm: &str, password: &str) {
    let (code, _, err) = admin(store, &["user", "add", name, "--realm", realm, "--password", password]);
    assert_eq!(code, 0, "{err}");
}

/// Relay config for a store: short cache TTLs so changes show within the test.
fn config(store: &str) -> String {
    format!(
        "realm = \"{REALM}\"\nrealms = [\"other.org\"]\nuser-store = \"{store}\"\nuser-cache-ttl = 1\nuser-cache-negative-ttl = 1\n"
    )
}

fn allocate(relay: &Relay, user: &str, password: &str) -> Result<Client, String> {
    let mut c = Client::new(relay.addr, user, password, REALM);
    c.try_allocate()?;
    Ok(c)
}

fn refused(relay: &Relay, user: &str, password: &str) -> String {
    match allocate(relay, user, password) {
        Ok(_) => panic!("{user} allocated"),
        Err(e) => e,
    }
}

/// Allocates in `realm`, which the relay serves but does not offer in its 401.
fn allocate_in_realm(relay: &Relay, user: &str, password: &str, realm: &str) -> Option<u16> {
    let mut c = Client::new(relay.addr, user, password, REALM);
    c.learn_nonce();
    c.realm = realm.into();
    c.key = IntegrityKey::long_term(user, realm, password);
    let r = c.authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop));
    r.code()
}

/// Waits (at most 5 s) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: not within 5 s");
}

fn suite(store: &str) {
    add(store, "alice", REALM, "wonderland");
    add(store, "alice", "other.org", "elsewhere");
    let (code, _, _) = admin(store, &["user", "add", "alice", "--realm", REALM, "--password", "x"]);
    assert_eq!(code, 4, "duplicate user");
    let (code, _, _) = admin(store, &["user", "add", "bob", "--realm", "", "--password", "x"]);
    assert_eq!(code, 5, "bad realm");
    let (code, out, _) = admin(store, &["user", "list"]);
    assert_eq!(code, 0);
    assert_eq!(out, "example.org\talice\nother.org\talice\n");

    let relay = Relay::start(BACKEND, &config(store), &[]);
    let mut a = allocate(&relay, "alice", "wonderland").unwrap();
    assert_eq!(a.try_refresh(600), Ok(600));
    assert!(refused(&relay, "alice", "elsewhere").contains("401"));
    assert!(refused(&relay, "nobody", "x").contains("401"));
    // The same name in another realm is another user.
    assert_eq!(allocate_in_realm(&relay, "alice", "elsewhere", "other.org"), None);
    assert_eq!(allocate_in_realm(&relay, "alice", "wonderland", "other.org"), Some(401));
    // A realm the relay does not serve.
    assert_eq!(allocate_in_realm(&relay, "alice", "wonderland", "nowhere.org"), Some(401));

    // Changes in the store reach the running relay within the cache TTL.
    add(store, "carol", REALM, "c1");
    eventually("a new user allocates", || allocate(&relay, "carol", "c1").is_ok());
    let (code, _, err) = admin(store, &["user", "passwd", "carol", "--realm", REALM, "--password", "c2"]);
    assert_eq!(code, 0, "{err}");
    eventually("the new password works", || allocate(&relay, "carol", "c2").is_ok());
    assert!(refused(&relay, "carol", "c1").contains("401"));
    let (code, _, _) = admin(store, &["user", "delete", "carol", "--realm", REALM]);
    assert_eq!(code, 0);
    eventually("a deleted user is refused", || allocate(&relay, "carol", "c2").is_err());
    let (code, _, _) = admin(store, &["user", "delete", "carol", "--realm", REALM]);
    assert_eq!(code, 7, "no such user");
    // The allocation made before all this lives on.
    assert_eq!(a.try_refresh(600), Ok(600));
    let log = relay.log();
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
}

#[test]
fn sqlite_store() {
    let path = std::env::temp_dir().join(format!("uturn-users-{}-{}.db", std::process::id(), rand::random::<u32>()));
    let store = format!("sqlite://{}", path.display());
    // `uturn admin` on a missing file says so with exit code 3, and the relay refuses to start.
    let (code, _, err) = admin(&store, &["user", "list"]);
    assert_eq!(code, 3, "{err}");
    let mut relay = std::process::Command::new(uturn_tests::uturn_bin());
    relay.args(["--listen", "127.0.0.1:0", "--user-store", &store]);
    let (ok, out) = uturn_tests::run_with_timeout(&mut relay, Duration::from_secs(10));
    assert!(!ok && out.contains("no user database"), "{out}");
    suite(&store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[test]
fn redis_store() {
    let redis = RedisServer::start();
    suite(&redis.url());
}

#[test]
fn redis_outage_serves_cached_users_without_stalling() {
    let mut redis = RedisServer::start();
    let store = redis.url();
    add(&store, "alice", REALM, "wonderland");
    let cfg = format!("{}[users]\nstatic = \"s\"\n", config(&store));
    let relay = Relay::start(BACKEND, &cfg, &[]);
    allocate(&relay, "alice", "wonderland").unwrap();
    redis.kill();
    // Past the cache TTL: the entry is stale, the store is gone.
    std::thread::sleep(Duration::from_millis(1500));
    // A cached user keeps allocating: one miss finds the store down, then the stale entry serves.
    let t = Instant::now();
    allocate(&relay, "alice", "wonderland").unwrap();
    let first = t.elapsed();
    let t = Instant::now();
    allocate(&relay, "alice", "wonderland").unwrap();
    let second = t.elapsed();
    // Liveness bounds, not performance: one connect timeout (1 s) at most, then no store wait.
    assert!(first < Duration::from_secs(3), "first allocate during the outage took {first:?}");
    assert!(second < Duration::from_secs(2), "second allocate during the outage took {second:?}");
    // A user never seen gets 500 Server Error.
    let e = refused(&relay, "stranger", "x");
    assert!(e.contains("500"), "{e}");
    // Static users never wait for the store.
    let t = Instant::now();
    allocate(&relay, "static", "s").unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    let log = relay.log();
    let warns = log.lines().filter(|l| l.contains(" WARN ") && l.contains("user store unavailable")).count();
    assert_eq!(warns, 1, "one WARN line per outage:\n{log}");
}
