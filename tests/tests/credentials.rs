//! Credentials against the running relay: TURN REST API usernames minted by `uturn credential`
//! (and by openssl), rotation over two secrets, expiry and strict expiry, coturn's
//! `turnutils_uclient -W`, RFC 8489 SHA-256 and USERHASH exchanges built by a test client, a
//! SIGHUP that changes the static users, and `uturn admin revoke`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use uturn_tests::uturn_proto::wire::integrity::{userhash, MacAlgorithm, PasswordAlgorithm};
use uturn_tests::uturn_proto::wire::{attr, Class, IntegrityKey, Message, Method, TransactionId};
use uturn_tests::{build, peer_socket, run_with_timeout, uturn_cli, Client, Relay, BACKENDS};

const BACKEND: &str = BACKENDS[0];

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// `uturn credential ...` → (username, password).
fn mint(secret: &str, ttl: &str, user: &str) -> (String, String) {
    let (code, out, err) = uturn_cli(&["credential", "--secret", secret, "--ttl", ttl, "--user", user]);
    assert_eq!(code, 0, "{err}");
    let field = |k: &str| out.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string()).unwrap();
    let (u, p) = (field("username:"), field("password:"));
    // The iceServers snippet carries the same pair.
    let snippet = &out[out.find('{').unwrap()..];
    assert!(snippet.contains("\"iceServers\""), "{out}");
    assert!(
        snippet.contains(&format!("\"username\": \"{u}\"")) && snippet.contains(&format!("\"credential\": \"{p}\"")),
        "{out}"
    );
    (u, p)
}

/// base64(HMAC-SHA1(secret, username)) computed by openssl, independently of uturn.
fn openssl_password(secret: &str, username: &str) -> String {
    let script = format!("printf '%s' '{username}' | openssl dgst -binary -sha1 -hmac '{secret}' | openssl base64");
    let out = Command::new("sh").args(["-c", &script]).output().expect("openssl (scripts/test.sh installs it)");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn allocate(relay: &Relay, user: &str, password: &str) -> Result<(Client, SocketAddr), String> {
    let mut c = Client::new(relay.addr, user, password, "uturn.local");
    let relayed = c.try_allocate()?;
    Ok((c, relayed))
}

/// The error of an Allocate that must fail.
fn refused(relay: &Relay, user: &str, password: &str) -> String {
    match allocate(relay, user, password) {
        Ok(_) => panic!("{user} allocated"),
        Err(e) => e,
    }
}

#[test]
fn rest_credentials_rotation_and_expiry() {
    let relay = Relay::start(BACKEND, "", &["--static-auth-secret", "north", "--static-auth-secret", "south"]);
    // Minted by the CLI with the first secret.
    let (u, p) = mint("north", "1h", "alice");
    assert!(u.ends_with(":alice"));
    let (mut c, _) = allocate(&relay, &u, &p).unwrap();
    assert_eq!(c.try_refresh(600), Ok(600));
    // Minted with the second (older) secret, by openssl: still accepted during rotation.
    let user = format!("{}:bob", unix_now() + 600);
    allocate(&relay, &user, &openssl_password("south", &user)).unwrap();
    // A secret the relay does not know.
    let err = refused(&relay, &user, &openssl_password("west", &user));
    assert!(err.contains("401"), "{err}");
    // Expired ten seconds ago, correctly signed: 401.
    let user = format!("{}:carol", unix_now() - 10);
    let err = refused(&relay, &user, &openssl_password("north", &user));
    assert!(err.contains("401"), "{err}");
    // A name that is not a REST username is no user at all (no static users are configured).
    let err = refused(&relay, "demo", "demo");
    assert!(err.contains("401"), "{err}");
}

#[test]
fn expired_rest_credential_keeps_its_allocation_unless_strict_expiry() {
    for strict in [false, true] {
        let mut args = vec!["--static-auth-secret", "north"];
        if strict {
            args.push("--strict-expiry");
        }
        let relay = Relay::start(BACKEND, "", &args);
        let expiry = unix_now() + 3;
        let user = format!("{expiry}:dave");
        let (mut c, relayed) = allocate(&relay, &user, &openssl_password("north", &user)).unwrap();
        let granted = c.lifetime.unwrap();
        if strict {
            assert!(granted <= 3, "strict expiry granted {granted} s");
        } else {
            assert_eq!(granted, 600);
        }
        let peer = peer_socket();
        c.try_create_permission(&[peer.local_addr().unwrap()]).unwrap();
        // Wait past the credential's expiry (and the capped lifetime).
        while unix_now() <= expiry + 1 {
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(500));
        let refreshed = c.try_refresh(600);
        peer.send_to(b"after expiry", relayed).unwrap();
        let mut buf = [0u8; 1500];
        let got = c.recv().is_some_and(|d| {
            buf[..d.len()].copy_from_slice(&d);
            Message::parse(&d).is_ok_and(|m| m.get(attr::DATA) == Some(&b"after expiry"[..]))
        });
        if strict {
            assert!(refreshed.is_err(), "strict: a Refresh after expiry must fail");
            assert!(!got, "strict: the allocation must have ended with its credential");
        } else {
            assert_eq!(refreshed, Ok(600), "the allocation lives on through Refreshes");
            assert!(got, "data must still flow");
        }
    }
}

#[test]
fn turnutils_uclient_with_a_shared_secret() {
    let relay = Relay::start(BACKEND, "", &["--static-auth-secret", "north", "--rfc5766-channels"]);
    let (_peer, peer_port) = uturn_tests::start_turnutils_peer();
    let mut cmd = Command::new("turnutils_uclient");
    cmd.args(["-W", "north", "-u", "alice", "-p", &relay.addr.port().to_string()])
        .args(["-n", "50", "-l", "180", "-m", "2", "-e", "127.0.0.1", "-r", &peer_port.to_string()])
        .arg("127.0.0.1");
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(ok, "turnutils_uclient -W failed:\n{out}\n--- uturn log ---\n{}", relay.log());
    assert!(out.contains("Total lost packets 0 (0.000000%)"), "{out}");
    // uclient -W sends REST usernames `<expiry>:alice`.
    let log = relay.log();
    let granted = log.lines().find(|l| l.contains("allocation granted")).unwrap_or_else(|| panic!("{log}"));
    let user = granted.split("user=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
    let expiry: u64 = user.strip_suffix(":alice").unwrap_or_else(|| panic!("{granted}")).parse().unwrap();
    assert!(expiry > unix_now(), "{granted}");
    // And with a wrong secret nothing is allocated.
    let mut cmd = Command::new("turnutils_uclient");
    cmd.args(["-W", "wrong", "-u", "alice", "-p", &relay.addr.port().to_string()])
        .args(["-n", "5", "-l", "180", "-e", "127.0.0.1", "-r", &peer_port.to_string()])
        .arg("127.0.0.1");
    let (_, out) = run_with_timeout(&mut cmd, Duration::from_secs(30));
    assert!(!out.contains("Total lost packets 0 (0.000000%)"), "{out}");
}

/// The 401 of an RFC 8489 relay: the nonce cookie and PASSWORD-ALGORITHMS.
fn challenge(sock: &std::net::UdpSocket, relay: SocketAddr) -> (Vec<u8>, Vec<u8>, String) {
    let req = build(Method::ALLOCATE, Class::Request, TransactionId(rand::random()), None, |w| {
        w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop)
    });
    let r = transact(sock, relay, &req);
    let m = Message::parse(&r).unwrap();
    assert_eq!(uturn_tests::error_code(&m), Some(401));
    let nonce = m.nonce().unwrap().to_vec();
    assert!(nonce.starts_with(b"obMatJos2"), "nonce cookie missing: {:?}", String::from_utf8_lossy(&nonce));
    let algs = m.get(attr::PASSWORD_ALGORITHMS).expect("PASSWORD-ALGORITHMS").to_vec();
    assert_eq!(algs, [0, 2, 0, 0, 0, 1, 0, 0], "SHA-256 then MD5");
    (nonce, algs, String::from_utf8(m.realm().unwrap().to_vec()).unwrap())
}

fn transact(sock: &std::net::UdpSocket, relay: SocketAddr, req: &[u8]) -> Vec<u8> {
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let tid = &req[8..20];
    for _ in 0..4 {
        sock.send_to(req, relay).unwrap();
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf) {
                if n >= 20 && &buf[8..20] == tid {
                    return buf[..n].to_vec();
                }
            }
        }
    }
    panic!("no answer");
}

enum Name<'a> {
    User(&'a str),
    Hash([u8; 32]),
}

/// A request signed the RFC 8489 way: PASSWORD-ALGORITHM SHA-256 and MESSAGE-INTEGRITY-SHA256.
fn sha256_request(
    method: Method,
    name: &Name<'_>,
    realm: &str,
    nonce: &[u8],
    algs: Option<&[u8]>,
    key: &IntegrityKey,
    body: impl Fn(&mut uturn_tests::uturn_proto::wire::MessageWriter<'_>),
) -> Vec<u8> {
    build(method, Class::Request, TransactionId(rand::random()), None, |w| {
        body(w);
        match name {
            Name::User(u) => w.bytes(attr::USERNAME, u.as_bytes())?,
            Name::Hash(h) => w.bytes(attr::USERHASH, h)?,
        };
        w.bytes(attr::REALM, realm.as_bytes())?;
        w.bytes(attr::NONCE, nonce)?;
        if let Some(a) = algs {
            w.bytes(attr::PASSWORD_ALGORITHMS, a)?;
        }
        w.bytes(attr::PASSWORD_ALGORITHM, &[0, 2, 0, 0])?;
        w.integrity_sha256(key.as_bytes())?;
        w.fingerprint()?;
        Ok(())
    })
}

#[test]
fn sha256_and_userhash_exchanges() {
    let relay = Relay::start(BACKEND, "[users]\nalice = \"wonderland\"\n", &[]);
    let udp = |w: &mut uturn_tests::uturn_proto::wire::MessageWriter<'_>| {
        w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).unwrap();
    };
    for by_hash in [false, true] {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (nonce, algs, realm) = challenge(&sock, relay.addr);
        let key = IntegrityKey::derive(PasswordAlgorithm::Sha256, "alice", &realm, "wonderland");
        let name = if by_hash { Name::Hash(userhash("alice", &realm)) } else { Name::User("alice") };
        // PASSWORD-ALGORITHM without the PASSWORD-ALGORITHMS echo: 400 (RFC 8489 §9.2.4).
        let r = transact(&sock, relay.addr, &sha256_request(Method::ALLOCATE, &name, &realm, &nonce, None, &key, udp));
        assert_eq!(uturn_tests::error_code(&Message::parse(&r).unwrap()), Some(400));
        // A wrong password: 401.
        let bad = IntegrityKey::derive(PasswordAlgorithm::Sha256, "alice", &realm, "looking-glass");
        let r = transact(
            &sock,
            relay.addr,
            &sha256_request(Method::ALLOCATE, &name, &realm, &nonce, Some(&algs), &bad, udp),
        );
        assert_eq!(uturn_tests::error_code(&Message::parse(&r).unwrap()), Some(401));
        // The real thing: success, signed with MESSAGE-INTEGRITY-SHA256 only.
        let r = transact(
            &sock,
            relay.addr,
            &sha256_request(Method::ALLOCATE, &name, &realm, &nonce, Some(&algs), &key, udp),
        );
        let m = Message::parse(&r).unwrap();
        assert_eq!(uturn_tests::error_code(&m), None, "Allocate by_hash={by_hash}: {:?}", m.get(attr::ERROR_CODE));
        let parts = m.integrity_parts().unwrap();
        assert_eq!(parts.algorithm, MacAlgorithm::HmacSha256);
        assert!(key.verify(&parts));
        assert!(m.raw_attributes().all(|a| a.typ != attr::MESSAGE_INTEGRITY), "no SHA-1 MESSAGE-INTEGRITY");
        assert!(matches!(m.xor_address(attr::XOR_RELAYED_ADDRESS), Some(Ok(_))));
        // A Refresh on the allocation (verified in the worker) is answered the same way.
        let lifetime = |w: &mut uturn_tests::uturn_proto::wire::MessageWriter<'_>| {
            w.u32(attr::LIFETIME, 300).unwrap();
        };
        let r = transact(
            &sock,
            relay.addr,
            &sha256_request(Method::REFRESH, &name, &realm, &nonce, Some(&algs), &key, lifetime),
        );
        let m = Message::parse(&r).unwrap();
        assert_eq!(uturn_tests::error_code(&m), None);
        assert!(key.verify(&m.integrity_parts().unwrap()));
        assert_eq!(m.integrity_parts().unwrap().algorithm, MacAlgorithm::HmacSha256);
    }
    // An RFC 5389 client (MD5, MESSAGE-INTEGRITY, no PASSWORD-ALGORITHM) is unaffected.
    let (mut c, _) = allocate(&relay, "alice", "wonderland").unwrap();
    assert_eq!(c.try_refresh(0), Ok(0));
}

#[test]
fn sighup_reloads_static_users_and_keeps_allocations() {
    let relay = Relay::start(BACKEND, "[users]\nalice = \"one\"\n", &[]);
    let (mut c, relayed) = allocate(&relay, "alice", "one").unwrap();
    let peer = peer_socket();
    c.try_channel_bind(0x4001, peer.local_addr().unwrap()).unwrap();
    std::fs::write(relay.config_path(), "[users]\nbob = \"two\"\n").unwrap();
    relay.signal("HUP");
    assert!(relay.wait_log("credentials reloaded", Duration::from_secs(5)), "{}", relay.log());
    assert!(relay.log().contains("added=1") && relay.log().contains("removed=1"), "{}", relay.log());
    allocate(&relay, "bob", "two").unwrap();
    let err = refused(&relay, "alice", "one");
    assert!(err.contains("401"), "{err}");
    // alice's existing allocation still relays both ways.
    c.send_channel_data(0x4001, b"still here");
    let mut buf = [0u8; 1500];
    let (n, from) = peer.recv_from(&mut buf).expect("ChannelData relayed after the reload");
    assert_eq!((&buf[..n], from), (&b"still here"[..], relayed));
    peer.send_to(b"and back", relayed).unwrap();
    let d = c.recv().expect("peer data relayed after the reload");
    assert_eq!(&d[4..12], b"and back");
    // A config that does not parse leaves the running credentials alone.
    std::fs::write(relay.config_path(), "users = 3\n").unwrap();
    relay.signal("HUP");
    assert!(relay.wait_log("configuration not reloaded", Duration::from_secs(5)), "{}", relay.log());
    allocate(&relay, "bob", "two").unwrap();
}

#[test]
fn admin_revoke_ends_a_users_allocations() {
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let admin = format!("127.0.0.1:{admin_port}");
    let relay = Relay::start(
        BACKEND,
        "user-quota = 1\n[users]\nalice = \"a\"\nbob = \"b\"\n",
        &["--admin-listen", &admin, "--admin-token", "t0ken"],
    );
    let (mut a, _) = allocate(&relay, "alice", "a").unwrap();
    let (mut b, _) = allocate(&relay, "bob", "b").unwrap();
    let url = format!("http://{admin}");
    // Without the token: refused.
    let (code, _, err) = uturn_cli(&["admin", "--admin-url", &url, "revoke", "alice"]);
    assert_eq!(code, 1, "{err}");
    let (code, out, err) = uturn_cli(&["admin", "--admin-url", &url, "--admin-token", "t0ken", "revoke", "alice"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"revoked\":1"), "{out}");
    // alice's allocation is gone (437), bob's lives, and alice's quota is free again.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut refreshed = a.try_refresh(600);
    while refreshed.is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        refreshed = a.try_refresh(600);
    }
    assert!(refreshed.unwrap_err().contains("437"));
    assert_eq!(b.try_refresh(600), Ok(600));
    allocate(&relay, "alice", "a").unwrap();
    // No relay listening: exit code 6.
    let (code, _, _) = uturn_cli(&["admin", "--admin-url", "http://127.0.0.1:1", "revoke", "alice"]);
    assert_eq!(code, 6);
}

#[test]
fn sighup_keeps_the_realm_the_relay_started_with() {
    let relay = Relay::start(BACKEND, "[users]\nalice = \"one\"\n", &[]);
    std::fs::write(relay.config_path(), "realm = \"elsewhere.org\"\n[users]\nalice = \"one\"\n").unwrap();
    relay.signal("HUP");
    assert!(relay.wait_log("credentials reloaded", Duration::from_secs(5)), "{}", relay.log());
    assert!(relay.log().contains("needs a restart"), "{}", relay.log());
    // The 401s still offer uturn.local and its static users still verify in it.
    let mut c = Client::new(relay.addr, "alice", "one", "uturn.local").with_expected_realm(Some("uturn.local"));
    c.try_allocate().unwrap();
}

/// `uturn ARGS` with extra environment variables (20 s limit) → (exit code, stdout, stderr).
fn uturn_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(uturn_tests::uturn_bin());
    cmd.args(args).envs(env.iter().copied()).stdin(std::process::Stdio::null());
    let out = cmd.output().expect("uturn");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

/// Issue 21 §4: secrets given as files or environment variables, never on the command line, so
/// they show neither in /proc/PID/cmdline nor in the arguments a hot upgrade runs again.
#[test]
fn secrets_from_files_and_the_environment_stay_off_the_command_line() {
    let dir = std::env::temp_dir().join(format!("uturn-secrets-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let users = write("users", "# NAME:PASSWORD\nalice:file-pass-1\n");
    let secrets = write("secrets", "rest-secret-new\nrest-secret-old\n");
    let token = write("token", "admin-t0ken-from-file\n");
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let admin = format!("127.0.0.1:{admin_port}");
    let relay = Relay::start_with_env(
        BACKEND,
        "",
        &[
            "--users-file",
            &users,
            "--static-auth-secret-file",
            &secrets,
            "--admin-listen",
            &admin,
            "--admin-token-file",
            &token,
        ],
        &[("UTURN_USER", "bob:env-pass-2")],
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", relay.pid())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    for secret in ["file-pass-1", "env-pass-2", "rest-secret", "admin-t0ken"] {
        assert!(!cmdline.contains(secret), "{secret} in {cmdline}");
    }
    // The users of the file and of UTURN_USER; the demo user is gone.
    allocate(&relay, "alice", "file-pass-1").unwrap();
    allocate(&relay, "bob", "env-pass-2").unwrap();
    assert!(refused(&relay, "demo", "demo").contains("401"));
    // A REST credential minted from the secrets file's first line, and one from the second.
    let (code, out, err) = uturn_cli(&["credential", "--secret-file", &secrets, "--ttl", "1h", "--user", "carol"]);
    assert_eq!(code, 0, "{err}");
    let field = |k: &str| out.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string()).unwrap();
    allocate(&relay, &field("username:"), &field("password:")).unwrap();
    let name = format!("{}:dave", unix_now() + 600);
    allocate(&relay, &name, &openssl_password("rest-secret-old", &name)).unwrap();
    // The admin token from a file (relay) and from UTURN_ADMIN_TOKEN (CLI).
    let url = format!("http://{admin}");
    let (code, _, err) = uturn_env(&["admin", "--admin-url", &url, "sessions"], &[]);
    assert_ne!(code, 0, "no token: {err}");
    let (code, out, err) =
        uturn_env(&["admin", "--admin-url", &url, "sessions"], &[("UTURN_ADMIN_TOKEN", "admin-t0ken-from-file")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alice"), "{out}");
    let (code, _, err) = uturn_env(&["admin", "--admin-url", &url, "--admin-token-file", &token, "sessions"], &[]);
    assert_eq!(code, 0, "{err}");
    // A value and its file at once is a usage error, not a silent choice.
    let (code, _, err) =
        uturn_env(&["admin", "--admin-url", &url, "--admin-token-file", &token, "--admin-token", "x", "sessions"], &[]);
    assert_eq!(code, 2, "{err}");
    // `uturn admin` passwords from a file and from UTURN_PASSWORD give the same key as the flag.
    let pw = write("pw", "s3cret\n");
    let key = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["admin", "key", "--user", "erin", "--realm", "example.org"];
        args.extend_from_slice(extra);
        let (code, out, err) = uturn_env(&args, env);
        assert_eq!(code, 0, "{err}");
        out
    };
    let flag = key(&["--password", "s3cret"], &[]);
    assert_eq!(key(&["--password-file", &pw], &[]), flag);
    assert_eq!(key(&[], &[("UTURN_PASSWORD", "s3cret")]), flag);
    let (code, _, err) = uturn_env(&["admin", "key", "--user", "erin", "--realm", "example.org"], &[]);
    assert_eq!(code, 2, "no password: {err}");
    // A config file may name the files too.
    let cfg =
        format!("admin-token-file = \"{token}\"\nstatic-auth-secret-file = \"{secrets}\"\nusers-file = \"{users}\"\n");
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let admin2 = format!("127.0.0.1:{admin_port}");
    let relay2 = Relay::start(BACKEND, &cfg, &["--admin-listen", &admin2]);
    allocate(&relay2, "alice", "file-pass-1").unwrap();
    allocate(&relay2, &name, &openssl_password("rest-secret-old", &name)).unwrap();
    let (code, _, err) = uturn_env(
        &["admin", "--admin-url", &format!("http://{admin2}"), "sessions"],
        &[("UTURN_ADMIN_TOKEN", "admin-t0ken-from-file")],
    );
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
