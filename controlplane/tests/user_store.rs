//! One suite of user-store behaviour, run against a real SQLite file and a real `redis-server`
//! that this test starts (and kills) itself. `redis-server` must be installed: without it the
//! Redis test fails rather than skips.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uturn_controlplane::store::{self, userhash, StoreError, StoreUrl, UserKeys, UserRecord, UserStore};

fn user(realm: &str, name: &str, password: &str, sha256: bool) -> UserRecord {
    UserRecord { realm: realm.into(), name: name.into(), keys: UserKeys::derive(name, realm, password, sha256) }
}

fn names(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(r, n)| (r.to_string(), n.to_string())).collect()
}

/// The behaviour every back end shares. Expects an empty store.
fn suite(s: &mut dyn UserStore) {
    let alice = user("example.org", "alice", "wonderland", true);
    let bob = user("example.org", "bob", "builder", false);
    let alice2 = user("example.net", "alice", "other", true);

    // add + lookup, both keys; a user without a SHA-256 key.
    s.add(&alice).expect("add alice");
    s.add(&bob).expect("add bob");
    assert_eq!(s.lookup("example.org", "alice").expect("lookup"), Some(alice.keys));
    assert!(alice.keys.sha256.is_some());
    assert_eq!(s.lookup("example.org", "bob").expect("lookup"), Some(bob.keys));
    assert_eq!(bob.keys.sha256, None);

    // Unknown users, unknown realms, names that cannot be stored.
    assert_eq!(s.lookup("example.org", "carol").expect("lookup"), None);
    assert_eq!(s.lookup("nowhere.example", "alice").expect("lookup"), None);
    assert_eq!(s.lookup("example.org", "ali\nce").expect("lookup"), None);
    assert_eq!(s.lookup("", "alice").expect("lookup"), None);

    // The same name in two realms is two users.
    s.add(&alice2).expect("add alice@example.net");
    assert_eq!(s.lookup("example.net", "alice").expect("lookup"), Some(alice2.keys));
    assert_eq!(s.lookup("example.org", "alice").expect("lookup"), Some(alice.keys));
    assert_ne!(alice.keys, alice2.keys);

    // Duplicate leaves the existing user alone.
    let again = user("example.org", "alice", "changed", true);
    match s.add(&again) {
        Err(e @ StoreError::Duplicate { .. }) => {
            assert_eq!(e.exit_code(), 4);
            assert!(matches!(&e, StoreError::Duplicate { realm, name } if realm == "example.org" && name == "alice"));
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert_eq!(s.lookup("example.org", "alice").expect("lookup"), Some(alice.keys));

    // set_keys replaces the keys, including dropping / adding the SHA-256 key.
    let new = UserKeys::derive("alice", "example.org", "new password", false);
    s.set_keys("example.org", "alice", &new).expect("set_keys");
    assert_eq!(s.lookup("example.org", "alice").expect("lookup"), Some(new));
    let new = UserKeys::derive("alice", "example.org", "newer", true);
    s.set_keys("example.org", "alice", &new).expect("set_keys");
    assert_eq!(s.lookup("example.org", "alice").expect("lookup"), Some(new));
    assert_eq!(s.lookup("example.net", "alice").expect("lookup"), Some(alice2.keys));

    // NotFound for unknown users.
    for e in [s.set_keys("example.org", "carol", &new).err(), s.delete("example.org", "carol").err()] {
        assert!(matches!(&e, Some(StoreError::NotFound { realm, name }) if realm == "example.org" && name == "carol"));
        assert_eq!(e.map(|e| e.exit_code()), Some(7));
    }

    // lookup_userhash finds the user in its realm only.
    let h = userhash("bob", "example.org");
    assert_eq!(s.lookup_userhash("example.org", &h).expect("userhash"), Some(("bob".to_string(), bob.keys)));
    assert_eq!(s.lookup_userhash("example.net", &h).expect("userhash"), None);
    assert_eq!(s.lookup_userhash("example.org", &[0; 32]).expect("userhash"), None);
    let h = userhash("alice", "example.net");
    assert_eq!(s.lookup_userhash("example.net", &h).expect("userhash"), Some(("alice".to_string(), alice2.keys)));

    // list: sorted, filtered by realm.
    s.add(&user("example.org", "Zed", "z", false)).expect("add Zed");
    s.add(&user("example.org", "\u{30DE}\u{30C8}\u{30EA}", "m", false)).expect("add unicode");
    let all = s.list(None).expect("list");
    assert_eq!(
        all,
        names(&[
            ("example.net", "alice"),
            ("example.org", "Zed"),
            ("example.org", "alice"),
            ("example.org", "bob"),
            ("example.org", "\u{30DE}\u{30C8}\u{30EA}"),
        ])
    );
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted);
    assert_eq!(s.list(Some("example.net")).expect("list"), names(&[("example.net", "alice")]));
    assert_eq!(s.list(Some("nowhere.example")).expect("list"), vec![]);

    // delete, then the user (and its USERHASH) is gone; the other realm's alice stays.
    s.delete("example.org", "bob").expect("delete");
    assert_eq!(s.lookup("example.org", "bob").expect("lookup"), None);
    assert_eq!(s.lookup_userhash("example.org", &userhash("bob", "example.org")).expect("userhash"), None);
    assert!(matches!(s.delete("example.org", "bob"), Err(StoreError::NotFound { .. })));
    s.delete("example.net", "alice").expect("delete");
    assert_eq!(s.list(Some("example.net")).expect("list"), vec![]);
    assert_eq!(s.lookup("example.org", "alice").expect("lookup"), Some(new));

    // Bad realms and names are refused on every write.
    let k = UserKeys::derive("x", "y", "z", false);
    for realm in ["", "tab\there", &"r".repeat(128), &"\u{1F600}".repeat(200)] {
        let e = s.add(&UserRecord { realm: realm.into(), name: "x".into(), keys: k }).err();
        assert!(matches!(e, Some(StoreError::BadRealm(_))), "{realm:?}: {e:?}");
        assert_eq!(e.map(|e| e.exit_code()), Some(5));
        assert!(matches!(s.set_keys(realm, "x", &k), Err(StoreError::BadRealm(_))));
        assert!(matches!(s.delete(realm, "x"), Err(StoreError::BadRealm(_))));
    }
    for name in ["", "nul\0", "del\u{7f}", &"n".repeat(509)] {
        let e = s.add(&UserRecord { realm: "example.org".into(), name: name.into(), keys: k }).err();
        assert!(matches!(e, Some(StoreError::BadName(_))), "{name:?}: {e:?}");
        assert_eq!(e.map(|e| e.exit_code()), Some(5));
        assert!(matches!(s.set_keys("example.org", name, &k), Err(StoreError::BadName(_))));
        assert!(matches!(s.delete("example.org", name), Err(StoreError::BadName(_))));
    }
    let longest = "n".repeat(508);
    s.add(&user("example.org", &longest, "p", false)).expect("508-byte name");
    assert!(s.lookup("example.org", &longest).expect("lookup").is_some());

    // add_many: 20,000 users over two realms, then spot lookups.
    let mut many: Vec<UserRecord> =
        (0..15_000).map(|i| user("bulk.example", &format!("user{i:05}"), &format!("pw{i}"), i % 2 == 0)).collect();
    many.extend((0..5_000).map(|i| user("bulk2.example", &format!("u{i}"), "pw", true)));
    let t = Instant::now();
    s.add_many(&many).expect("add_many");
    eprintln!("add_many of {} users: {:?}", many.len(), t.elapsed());
    for i in [0usize, 1, 9_999, 10_000, 14_999, 15_000, 19_999] {
        let u = &many[i];
        assert_eq!(s.lookup(&u.realm, &u.name).expect("lookup"), Some(u.keys), "{}", u.name);
        let h = userhash(&u.name, &u.realm);
        assert_eq!(s.lookup_userhash(&u.realm, &h).expect("userhash"), Some((u.name.clone(), u.keys)));
    }
    assert_eq!(s.list(Some("bulk.example")).expect("list").len(), 15_000);
    assert_eq!(s.list(Some("bulk2.example")).expect("list").len(), 5_000);
    // A batch holding an existing user is refused.
    let e =
        s.add_many(&[user("bulk.example", "fresh", "p", false), user("bulk.example", "user00042", "p", false)]).err();
    assert!(matches!(&e, Some(StoreError::Duplicate { name, .. }) if name == "user00042"), "{e:?}");
    assert_eq!(s.lookup("bulk.example", "fresh").expect("lookup"), None, "a failed batch writes nothing");
    let e = s.add_many(&[user("bulk.example", "twice", "p", false), user("bulk.example", "twice", "q", false)]).err();
    assert!(matches!(&e, Some(StoreError::Duplicate { name, .. }) if name == "twice"), "{e:?}");
    assert!(matches!(s.add_many(&[user("bulk.example", "", "p", false)]), Err(StoreError::BadName(_))));
    s.add_many(&[]).expect("empty add_many");
}

/// A database file under the temp dir, removed (with its WAL files) on drop.
struct TempDb(PathBuf);

impl TempDb {
    fn new(tag: &str) -> TempDb {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        TempDb(std::env::temp_dir().join(format!("uturn-user-store-{tag}-{}-{nanos}.db", std::process::id())))
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.0.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::remove_file(Path::new(&p));
        }
    }
}

#[test]
fn sqlite_suite() {
    let db = TempDb::new("suite");
    let url: StoreUrl = format!("sqlite://{}", db.0.display()).parse().expect("url");
    assert_eq!(url, StoreUrl::Sqlite(db.0.clone()));

    // Without create, a missing file is MissingDatabase (exit 3), and is not created.
    let e = store::open(&url, false).err();
    assert!(matches!(e, Some(StoreError::MissingDatabase(_))), "{e:?}");
    assert_eq!(e.map(|e| e.exit_code()), Some(3));
    assert!(!db.0.exists());

    let mut s = store::open(&url, true).expect("create");
    suite(&mut *s);

    // A second connection (as a running relay's store thread beside `uturn admin`) sees the
    // first one's writes, and the first sees the second's.
    let mut other = store::open(&url, false).expect("open existing");
    s.add(&user("second.example", "dave", "pw", true)).expect("add");
    let dave = UserKeys::derive("dave", "second.example", "pw", true);
    assert_eq!(other.lookup("second.example", "dave").expect("lookup"), Some(dave));
    other.delete("second.example", "dave").expect("delete");
    assert_eq!(s.lookup("second.example", "dave").expect("lookup"), None);
    // Reopening keeps the data.
    drop(s);
    let mut again = store::open(&url, false).expect("reopen");
    assert_eq!(again.list(Some("bulk2.example")).expect("list").len(), 5_000);
}

/// A `redis-server` on a free loopback port, killed (and reaped) on drop, even on panic.
struct RedisServer {
    child: Child,
    port: u16,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn pong(port: u16) -> bool {
    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0; 7];
    c.write_all(b"PING\r\n").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl RedisServer {
    /// Starts one; panics (fails the test) if `redis-server` is not installed.
    fn start() -> RedisServer {
        for _ in 0..3 {
            let port = free_port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(std::env::temp_dir())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run redis-server ({e}): install it (e.g. apt-get install redis-server); this test needs a real Redis")
                });
            let mut server = RedisServer { child, port };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if pong(port) {
                    return server;
                }
                if let Ok(Some(_)) = server.child.try_wait() {
                    break; // lost the port race: try another
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("redis-server did not answer PING within 5 s");
    }

    fn url(&self) -> StoreUrl {
        format!("redis://127.0.0.1:{}/0", self.port).parse().expect("url")
    }
}

#[test]
fn redis_suite() {
    let server = RedisServer::start();
    let url = server.url();
    let mut s = store::open(&url, false).expect("open redis");
    suite(&mut *s);

    // A second connection sees the first one's writes.
    let mut other = store::open(&url, true).expect("open redis again");
    s.add(&user("second.example", "dave", "pw", true)).expect("add");
    assert!(other.lookup("second.example", "dave").expect("lookup").is_some());

    // Values written by an operator's own tooling, in the documented layout.
    let keys = UserKeys::derive("erin", "ops.example", "pw", true);
    let mut hex = String::new();
    for b in keys.md5.iter().chain(keys.sha256.iter().flatten()) {
        hex.push_str(&format!("{b:02X}"));
    }
    let mut raw = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    let cmd =
        format!("*4\r\n$4\r\nHSET\r\n$23\r\nuturn:users:ops.example\r\n$4\r\nerin\r\n${}\r\n{hex}\r\n", hex.len());
    raw.write_all(cmd.as_bytes()).expect("write");
    let mut reply = [0; 4];
    raw.read_exact(&mut reply).expect("read");
    assert_eq!(&reply, b":1\r\n");
    assert_eq!(other.lookup("ops.example", "erin").expect("lookup"), Some(keys));
    drop(other);

    // Kill the server: the next lookup fails fast with Unavailable (liveness bound, not a
    // performance assertion), and keeps failing without hanging.
    drop(server);
    for _ in 0..2 {
        let t = Instant::now();
        let e = s.lookup("example.org", "alice").err();
        let took = t.elapsed();
        assert!(matches!(e, Some(StoreError::Unavailable(_))), "{e:?}");
        assert_eq!(e.map(|e| e.exit_code()), Some(6));
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
    assert!(matches!(s.add(&user("r", "n", "p", false)), Err(StoreError::Unavailable(_))));

    // Nothing listening: open fails with Unavailable.
    let url: StoreUrl = format!("redis://127.0.0.1:{}/0", free_port()).parse().expect("url");
    let t = Instant::now();
    let e = store::open(&url, false).err();
    assert!(matches!(e, Some(StoreError::Unavailable(_))), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
}

#[test]
fn redis_silent_server_does_not_hang() {
    // A listener that accepts (in the kernel) but never answers, like a stopped redis-server.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url: StoreUrl =
        format!("redis://:hunter2@127.0.0.1:{}/0", l.local_addr().expect("addr").port()).parse().expect("url");
    for _ in 0..2 {
        let t = Instant::now();
        let e = store::open(&url, false).err();
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
        match e {
            Some(e @ StoreError::Unavailable(_)) => assert!(!e.to_string().contains("hunter2"), "{e}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    drop(l);
}

#[test]
fn urls() {
    assert!(matches!("mysql://x".parse::<StoreUrl>(), Err(StoreError::BadUrl(_))));
    let u: StoreUrl = "redis://:pw@127.0.0.1:6379/3".parse().expect("url");
    assert_eq!(u.to_string(), "redis://:***@127.0.0.1:6379/3");
}

/// Loads 1,000,000 users into each back end (the benchmark set-up); run by hand with
/// `cargo test --release -p uturn-controlplane --test user_store -- --ignored --nocapture`.
#[test]
#[ignore = "slow: a million users"]
fn million_users() {
    let users: Vec<UserRecord> = (0..1_000_000)
        .map(|i| {
            let name = format!("user{i}");
            UserRecord {
                realm: "bench.example".into(),
                keys: UserKeys::derive(&name, "bench.example", "pw", true),
                name,
            }
        })
        .collect();
    let db = TempDb::new("million");
    let server = RedisServer::start();
    for url in [format!("sqlite://{}", db.0.display()).parse().expect("url"), server.url()] {
        let mut s = store::open(&url, true).expect("open");
        let t = Instant::now();
        s.add_many(&users).expect("add_many");
        eprintln!("{url}: add_many of {} users in {:?}", users.len(), t.elapsed());
        let t = Instant::now();
        for u in users.iter().step_by(1000) {
            assert_eq!(s.lookup(&u.realm, &u.name).expect("lookup"), Some(u.keys));
        }
        eprintln!("{url}: 1000 lookups in {:?}", t.elapsed());
    }
}
