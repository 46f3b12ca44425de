//! `scripts/tune-host.sh`: a dry run on this host changes nothing and prints every change; a
//! real run inside a network namespace that the test creates (with a veth pair) changes that
//! namespace's sysctls, leaves the host's alone, and `--revert` restores them.

use std::path::PathBuf;
use std::process::Command;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/tune-host.sh")
}

/// Root, or `sudo -n` (scripts/test.sh runs as root or with sudo).
fn privileged(args: &[&str]) -> std::process::Output {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    let mut cmd = if root { Command::new(args[0]) } else { Command::new("sudo") };
    if root {
        cmd.args(&args[1..]);
    } else {
        cmd.arg("-n").args(args);
    }
    cmd.output().expect("run")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn config(range: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("uturn-tune-{}-{}.toml", std::process::id(), rand::random::<u32>()));
    std::fs::write(&p, format!("port-range = \"{range}\"\n")).unwrap();
    p
}

#[test]
fn dry_run_prints_every_change_and_makes_none() {
    let cfg = config("50000-50100");
    let before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap();
    let state = std::env::temp_dir().join(format!("uturn-tune-state-{}", rand::random::<u32>()));
    let out = Command::new("bash")
        .arg(script())
        .args(["--dry-run", "--persist", "--busy-poll", "50", "--config"])
        .arg(&cfg)
        .env("UTURN_TUNE_STATE", &state)
        .env("UTURN_SYSCTL_D", std::env::temp_dir().join("uturn-tune-sysctl-d-never"))
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    for needle in [
        "net/ipv4/ip_local_reserved_ports = 50000-50100",
        "net/core/rmem_max",
        "net/core/netdev_max_backlog",
        "net/ipv4/udp_mem",
        "net/core/busy_poll",
        "CPU governor",
        "NIC queue IRQs",
        "--workers",
        "dry run: nothing was changed",
    ] {
        assert!(log.contains(needle), "missing {needle:?} in:\n{log}");
    }
    assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap(), before);
    assert!(!state.exists(), "a dry run saves nothing");
    let _ = std::fs::remove_file(cfg);
}

#[test]
fn real_run_in_a_network_namespace_and_revert() {
    let ns = format!("uturn-tune-{}", rand::random::<u32>());
    let added = privileged(&["ip", "netns", "add", &ns]);
    assert!(added.status.success(), "ip netns add (needs root): {}", text(&added));
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = privileged(&["ip", "netns", "del", &self.0]);
        }
    }
    let _ns = Ns(ns.clone());
    let veth = format!("vt{}", rand::random::<u16>());
    let link =
        privileged(&["ip", "-n", &ns, "link", "add", &veth, "type", "veth", "peer", "name", &format!("{veth}p")]);
    assert!(link.status.success(), "{}", text(&link));
    let host_reserved = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap();
    let read_ns = |key: &str| {
        let o = privileged(&["ip", "netns", "exec", &ns, "cat", &format!("/proc/sys/{key}")]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let somaxconn = read_ns("net/core/somaxconn");
    let cfg = config("50000-50100");
    let state = std::env::temp_dir().join(format!("uturn-tune-state-{}", rand::random::<u32>()));
    let state_s = state.display().to_string();
    let script_s = script().display().to_string();
    let cfg_s = cfg.display().to_string();
    let env_state = format!("UTURN_TUNE_STATE={state_s}");
    let run = |extra: &[&str]| {
        let mut args = vec!["ip", "netns", "exec", &ns, "env", &env_state, "bash", &script_s, "--iface", &veth];
        args.extend_from_slice(extra);
        privileged(&args)
    };
    let out = run(&["--config", &cfg_s]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    // Per-namespace sysctls change; global ones are read-only in a namespace and are skipped.
    assert_eq!(read_ns("net/ipv4/ip_local_reserved_ports"), "50000-50100", "{log}");
    assert!(log.contains(&format!("skip   {veth} (no MSI IRQs)")), "{log}");
    assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap(), host_reserved);
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(saved.contains("ip_local_reserved_ports"), "{saved}");
    let out = run(&["--revert"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(read_ns("net/ipv4/ip_local_reserved_ports"), "");
    assert_eq!(read_ns("net/core/somaxconn"), somaxconn);
    assert!(!state.exists(), "revert removes the saved state");
    let _ = std::fs::remove_file(cfg);
}

#[test]
fn notrack_dry_run_prints_the_ruleset_for_the_configured_ports() {
    let cfg = std::env::temp_dir().join(format!("uturn-tune-nt-{}.toml", rand::random::<u32>()));
    std::fs::write(&cfg, "listen = [\"0.0.0.0:3478\", \"tls://0.0.0.0:5349\"]\nport-range = \"50000-50100\"\n")
        .unwrap();
    let state = std::env::temp_dir().join(format!("uturn-tune-state-{}", rand::random::<u32>()));
    let out = Command::new("bash")
        .arg(script())
        .args(["--dry-run", "--notrack", "--config"])
        .arg(&cfg)
        .env("UTURN_TUNE_STATE", &state)
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    for needle in [
        "listen ports 3478,5349, relay ports 50000-50100",
        "type filter hook prerouting priority raw",
        "udp dport { 3478,5349 } counter notrack",
        "udp dport 50000-50100 counter notrack",
        "udp sport 50000-50100 counter notrack",
        "tcp sport { 3478,5349 } counter notrack",
        "dry run: nothing was changed",
    ] {
        assert!(log.contains(needle), "missing {needle:?} in:\n{log}");
    }
    assert!(!log.contains("set    nftables"), "{log}");
    assert!(!state.exists(), "a dry run saves nothing");
    let _ = std::fs::remove_file(cfg);
}

#[test]
fn notrack_in_a_network_namespace_exempts_the_ports_and_revert_removes_it() {
    let ns = format!("uturn-nt-{}", rand::random::<u32>());
    let added = privileged(&["ip", "netns", "add", &ns]);
    assert!(added.status.success(), "ip netns add (needs root): {}", text(&added));
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = privileged(&["ip", "netns", "del", &self.0]);
        }
    }
    let _ns = Ns(ns.clone());
    assert!(privileged(&["ip", "-n", &ns, "link", "set", "lo", "up"]).status.success());
    let cfg = config("50000-50100");
    let state = std::env::temp_dir().join(format!("uturn-tune-state-{}", rand::random::<u32>()));
    let (script_s, cfg_s) = (script().display().to_string(), cfg.display().to_string());
    let env_state = format!("UTURN_TUNE_STATE={}", state.display());
    let in_ns = |args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", &ns];
        all.extend_from_slice(args);
        privileged(&all)
    };
    let out = in_ns(&["env", &env_state, "bash", &script_s, "--notrack", "--iface", "lo", "--config", &cfg_s]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("set    nftables table inet uturn_notrack"), "{log}");
    // A datagram to the listen port inside the namespace goes through the notrack rule.
    assert!(in_ns(&["bash", "-c", "echo x > /dev/udp/127.0.0.1/3478"]).status.success());
    let listed = text(&in_ns(&["nft", "list", "table", "inet", "uturn_notrack"]));
    let hit = listed
        .lines()
        .find(|l| l.contains("local client to listen"))
        .unwrap_or_else(|| panic!("no local-client rule in:\n{listed}"));
    assert!(hit.contains("udp dport 3478 counter packets 1 "), "{listed}");
    assert!(listed.contains("udp dport 50000-50100 counter packets 0 bytes 0 notrack"), "{listed}");
    // The host's own ruleset is untouched.
    assert!(!text(&privileged(&["nft", "list", "tables"])).contains("uturn_notrack"));
    let out = in_ns(&["env", &env_state, "bash", &script_s, "--revert"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&in_ns(&["nft", "list", "tables"])).contains("uturn_notrack"));
    assert!(!state.exists(), "revert removes the saved state");
    let _ = std::fs::remove_file(cfg);
}
