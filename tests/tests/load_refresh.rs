//! `uturn-load` on runs longer than every lifetime: against a relay configured with lifetimes
//! of a few seconds (permission 3 s, channel 4 s, allocation 5 s, nonce 4 s), the generator's
//! refreshes (CreatePermission, ChannelBind, Refresh at half the granted LIFETIME, each
//! retried once on 438 Stale Nonce) keep every packet flowing, in channel mode with echo
//! (relayed data and refresh answers share the client sockets) and in send mode; without
//! refreshes the same run loses traffic. And the generator takes the realm from the server's
//! 401: no `--realm` works against any realm, a wrong `--realm` fails naming both realms.
//!
//! Needs the `uturn` and `uturn-load` binaries built (`cargo build --bin uturn --bin
//! uturn-load`; scripts/test.sh builds every target). All traffic stays on 127.0.0.1.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use uturn_tests::{run_with_timeout, Relay};

/// Short lifetimes; `unauth-rate = 0` so setting up several clients at once from 127.0.0.1 is
/// never rate-limited.
const SHORT: &str = "default-lifetime = 5\nmax-lifetime = 5\npermission-lifetime = 3\nchannel-lifetime = 4\n\
                     nonce-lifetime = 4\nunauth-rate = 0\n";

/// Refresh flags fitting `SHORT` (allocations: half the granted 5 s, the default).
const REFRESH: [&str; 4] = ["--permission-refresh", "1.5", "--channel-refresh", "2"];

const CLIENTS: u64 = 4;
const RATE: u64 = 400;
const SECONDS: u64 = 15;

/// Path of `uturn-load`: `$UTURN_LOAD_BIN`, else next to this test's profile directory, else
/// `target/{debug,release}` of this workspace. Panics if missing or too old for the refresh
/// flags.
fn load_bin() -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("UTURN_LOAD_BIN") {
        candidates.push(p.into());
    }
    // target/<profile>/deps/load_refresh-<hash> -> target/<profile>/uturn-load
    if let Some(profile_dir) = std::env::current_exe().ok().and_then(|e| e.parent()?.parent().map(PathBuf::from)) {
        candidates.push(profile_dir.join("uturn-load"));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    candidates.extend(["debug", "release"].map(|p| target.join(p).join("uturn-load")));
    let Some(bin) = candidates.into_iter().find(|p| p.exists()) else {
        panic!("uturn-load not found: run `cargo build -p uturn-bench --bin uturn-load` first");
    };
    let help = Command::new(&bin).arg("--help").output().expect("run uturn-load --help");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--permission-refresh"),
        "{} predates the refresh flags: rebuild it (`cargo build -p uturn-bench --bin uturn-load`)",
        bin.display()
    );
    bin
}

/// Runs `uturn-load --server <relay> <args>` (at most 45 s); returns (success, output).
fn load(relay: &Relay, args: &[&str]) -> (bool, String) {
    let server = relay.addr.to_string();
    run_with_timeout(
        Command::new(load_bin()).args(["--server", &server, "--quiet"]).args(args),
        Duration::from_secs(45),
    )
}

/// The number after `"key":` in the JSON report line of `out`.
fn field(out: &str, key: &str) -> u64 {
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON report in:\n{out}"));
    let pat = format!("\"{key}\":");
    let at = line.find(&pat).unwrap_or_else(|| panic!("no {key} in {line}")) + pat.len();
    let digits: String = line[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("{key} is not a count in {line}"))
}

/// The count `kind` inside the report's `"refreshes"` object.
fn refreshes(out: &str, kind: &str) -> u64 {
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or("");
    let at = line.find("\"refreshes\":").unwrap_or_else(|| panic!("no refreshes in {line}"));
    field(&format!("{{{}", &line[at + "\"refreshes\":{".len()..]), kind)
}

/// A traffic run of `SECONDS` s (1 s warm-up) in `mode` with the short refresh intervals.
fn long_run(relay: &Relay, mode: &str, extra: &[&str]) -> String {
    let (rate, clients, secs) = (RATE.to_string(), CLIENTS.to_string(), SECONDS.to_string());
    let mut args = vec!["--json", "--mode", mode, "--clients", &clients, "--rate", &rate, "--duration", &secs];
    args.extend(["--warmup", "1", "--size", "100"]);
    args.extend(REFRESH);
    args.extend(extra);
    let (ok, out) = load(relay, &args);
    assert!(ok, "uturn-load {args:?} failed:\n{out}\n--- relay log ---\n{}", relay.log());
    out
}

/// Zero loss, zero refresh failures, and every kind of refresh (and a stale nonce) seen.
fn assert_kept_alive(out: &str, channel: bool) {
    let (sent, lost) = (field(out, "sent"), field(out, "lost"));
    assert!(sent >= RATE * SECONDS * 9 / 10, "sent only {sent}:\n{out}");
    assert_eq!(lost, 0, "traffic lost across lifetimes:\n{out}");
    assert_eq!(field(out, "refresh_failures"), 0, "{out}");
    // Per client over ~16 s: permission every 1.5 s, channel every 2 s, allocation every 2.5 s.
    assert!(refreshes(out, "permission") >= CLIENTS * 8, "{out}");
    assert!(refreshes(out, "allocation") >= CLIENTS * 5, "{out}");
    if channel {
        assert!(refreshes(out, "channel") >= CLIENTS * 6, "{out}");
    } else {
        assert_eq!(refreshes(out, "channel"), 0, "{out}");
    }
    assert!(field(out, "stale_nonces") >= 1, "nonces live 4 s: some refresh must have met a 438:\n{out}");
}

#[test]
fn channel_mode_refreshes_keep_echo_traffic_flowing() {
    let relay = Relay::start("uring", SHORT, &[]);
    let out = long_run(&relay, "channel", &["--echo"]);
    assert_kept_alive(&out, true);
}

#[test]
fn send_mode_refreshes_keep_traffic_flowing() {
    let relay = Relay::start("epoll", SHORT, &[]);
    let out = long_run(&relay, "send", &[]);
    assert_kept_alive(&out, false);
}

#[test]
fn without_refreshes_traffic_stops_when_lifetimes_end() {
    // The control for the tests above: the same relay, refreshes pushed past the run.
    let relay = Relay::start("epoll", SHORT, &[]);
    let (rate, clients) = (RATE.to_string(), CLIENTS.to_string());
    let args = [
        "--json",
        "--clients",
        &clients,
        "--rate",
        &rate,
        "--duration",
        "7",
        "--warmup",
        "0.5",
        "--permission-refresh",
        "1000",
        "--channel-refresh",
        "1000",
        "--allocation-refresh",
        "1000",
    ];
    let (ok, out) = load(&relay, &args);
    assert!(ok, "{out}");
    let (sent, lost) = (field(&out, "sent"), field(&out, "lost"));
    assert!(lost > sent / 4, "the channel (4 s) and allocation (5 s) expire mid-run: {lost} of {sent} lost\n{out}");
    assert_eq!(refreshes(&out, "permission") + refreshes(&out, "channel") + refreshes(&out, "allocation"), 0);
}

#[test]
fn realm_comes_from_the_servers_401() {
    let relay = Relay::start("epoll", "realm = \"bench.local\"\nunauth-rate = 0\n", &["--user", "bench:secret"]);
    let short = ["--json", "--user", "bench", "--password", "secret", "--clients", "2", "--rate", "200"];
    let short: Vec<&str> = short.iter().copied().chain(["--duration", "1", "--warmup", "0.2"]).collect();

    // No --realm: the key is derived from the realm in the 401.
    let (ok, out) = load(&relay, &short);
    assert!(ok, "no --realm against realm bench.local:\n{out}");
    assert_eq!(field(&out, "lost"), 0, "{out}");
    assert!(field(&out, "delivered") > 0, "{out}");
    let (ok, out) = load(
        &relay,
        &["--json", "--user", "bench", "--password", "secret", "--mode", "allocs", "--count", "8", "--clients", "2"],
    );
    assert!(ok, "{out}");
    assert_eq!(field(&out, "succeeded"), 8, "{out}");

    // A matching --realm is fine.
    let mut args = short.clone();
    args.extend(["--realm", "bench.local"]);
    let (ok, out) = load(&relay, &args);
    assert!(ok, "--realm bench.local:\n{out}");

    // A mismatching --realm fails at once, naming both realms.
    for mode in ["channel", "allocs"] {
        let mut args = short.clone();
        args.extend(["--realm", "other.realm", "--mode", mode]);
        let (ok, out) = load(&relay, &args);
        assert!(!ok, "--realm other.realm against bench.local must fail ({mode}):\n{out}");
        assert!(
            out.contains("\"other.realm\"") && out.contains("\"bench.local\"") && out.contains("realm"),
            "the error names both realms ({mode}):\n{out}"
        );
        assert!(!out.lines().any(|l| l.starts_with('{')), "no report on failure:\n{out}");
    }
}
