//! `uturn check-config` (like `nginx -t`): the configuration the relay would load, checked
//! without serving: exit 0 with a summary, 1 with the reason. Runs the real binary.

use std::process::{Command, Stdio};

use uturn_tests::tempfile_lite::TempFile;
use uturn_tests::{uturn_bin, uturn_cli};

/// `uturn ARGS` with extra environment variables; (exit code, stdout, stderr).
fn run_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(uturn_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run uturn");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

#[test]
fn a_good_file_passes_with_a_summary_and_no_secret() {
    let secrets = TempFile::new("secrets", "s3cret-one\ns3cret-two\n");
    let cfg = TempFile::new(
        "uturn.toml",
        &format!(
            "listen = [\"0.0.0.0:3478\", \"tcp://0.0.0.0:3478\"]\nrelay-ip = [\"192.0.2.10\", \"192.0.2.11\"]\n\
             port-range = \"50000-50999\"\nrealm = \"example.org\"\nstatic-auth-secret-file = \"{}\"\n\
             admin-listen = \"127.0.0.1:3480\"\nfleet-redis = \"redis://:pw@redis.example:6379/0\"\nnode-id = \"n1\"\n",
            secrets.0.display()
        ),
    );
    let path = cfg.0.display().to_string();
    for args in [vec!["check-config", "--config", &path], vec!["--config", &path, "check-config"]] {
        let (code, out, err) = uturn_cli(&args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        assert!(out.contains(&format!("configuration {path} is ok")), "{out}");
        assert!(out.contains("192.0.2.10, 192.0.2.11 ports 50000-50999 (2000 relayed transport addresses)"), "{out}");
        assert!(out.contains("TURN REST API (2 secret(s))") && out.contains("example.org"), "{out}");
        assert!(out.contains("redis://redis.example:6379/0 as node n1"), "{out}");
        assert!(!out.contains("s3cret") && !out.contains(":pw@"), "a secret in the summary: {out}");
    }
}

#[test]
fn bad_configurations_fail_with_the_reason() {
    let unknown = TempFile::new("unknown.toml", "listen = [\"127.0.0.1:3478\"]\nlisten-port = 3478\n");
    let (code, out, err) = uturn_cli(&["check-config", "--config", &unknown.0.display().to_string()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("unknown field `listen-port`") && err.contains("test failed"), "{err}");
    assert!(!out.contains("is ok"), "{out}");

    let syntax = TempFile::new("syntax.toml", "listen = [\"127.0.0.1:3478\"\n");
    let (code, _, err) = uturn_cli(&["check-config", "--config", &syntax.0.display().to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("parsing"), "{err}");

    let (code, _, err) = uturn_cli(&["check-config", "--config", "/nonexistent/uturn.toml"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("reading /nonexistent/uturn.toml"), "{err}");

    // Valid TOML the relay refuses: the admin API off loopback without a token.
    let open_admin = TempFile::new("admin.toml", "admin-listen = \"0.0.0.0:3480\"\n");
    let (code, _, err) = uturn_cli(&["check-config", "--config", &open_admin.0.display().to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("admin-listen off loopback needs admin-token"), "{err}");

    // The flags before the subcommand count like the relay's: the demo credential off loopback.
    let (code, _, err) = uturn_cli(&["--listen", "0.0.0.0:3478", "--relay-ip", "192.0.2.1", "check-config"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("demo credential"), "{err}");

    // TLS files are opened as at start.
    let tls = TempFile::new(
        "tls.toml",
        "listen = [\"tls://127.0.0.1:5349\"]\ntls-cert = \"/nonexistent/c.pem\"\ntls-key = \"/nonexistent/k.pem\"\n",
    );
    let (code, _, err) = uturn_cli(&["check-config", "--config", &tls.0.display().to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tls-cert /nonexistent/c.pem"), "{err}");

    // external-ip = "auto" without its STUN server.
    let auto = TempFile::new("auto.toml", "external-ip = \"auto\"\n");
    let (code, _, err) = uturn_cli(&["check-config", "--config", &auto.0.display().to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("needs external-ip-stun"), "{err}");
}

#[test]
fn environment_variables_count_like_flags() {
    let cfg = TempFile::new("env.toml", "listen = [\"0.0.0.0:3478\"]\nrelay-ip = \"192.0.2.10\"\n");
    let path = cfg.0.display().to_string();
    // Off loopback with only the demo credential: refused...
    let (code, _, err) = run_env(&["check-config", "--config", &path], &[]);
    assert_eq!(code, 1, "{err}");
    // ...and accepted with a REST secret from the environment, as the relay would take it.
    let (code, out, err) = run_env(&["check-config", "--config", &path], &[("UTURN_STATIC_AUTH_SECRET", "x")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("TURN REST API (1 secret(s))"), "{out}");
    // The file may come from UTURN_CONFIG (the container image's way).
    let (code, out, err) =
        run_env(&["check-config"], &[("UTURN_CONFIG", path.as_str()), ("UTURN_STATIC_AUTH_SECRET", "x")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("192.0.2.10 ports"), "{out}");
}

#[test]
fn the_documented_example_passes() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/uturn.example.toml");
    let (code, out, err) = uturn_cli(&["check-config", "--config", example]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("127.0.0.1 ports 49152-65535"), "{out}");
}
