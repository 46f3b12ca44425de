//! `uturn check`: probe any TURN server (uturn, coturn, eturnal...) step by step and say in
//! plain words where it fails. Input: RFC 7065 URIs or a WebRTC `iceServers` JSON; credentials
//! from `--user`/`--password`, minted from `--secret` (TURN REST API), or the JSON's own.
//! Every step has a verdict and a timing ([`steps`]); a failure has a class with its own exit
//! code ([`diagnosis::EXIT_CODES`]). Documented in docs/operations.md ("Troubleshooting").

pub mod conn;
pub mod data;
pub mod diagnosis;
pub mod output;
pub mod session;
pub mod steps;
pub mod uri;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::Args;

use crate::credentials::rest;
use crate::store::StoreUrl;
use diagnosis::{Class, Diagnosis};
use output::{Report, ServerReport};
use steps::{Creds, Runner};

/// `uturn check`.
#[derive(Debug, Args)]
#[command(after_help = diagnosis::EXIT_CODES)]
pub struct CheckArgs {
    /// Servers: turn:HOST[:PORT][?transport=udp|tcp], turns:HOST[:PORT][?transport=tcp],
    /// stun:HOST[:PORT] (RFC 7065, RFC 7064).
    pub uris: Vec<String>,
    /// A WebRTC iceServers JSON file (`-`: stdin); every URL in it is checked with its entry's
    /// username and credential.
    #[arg(long, value_name = "FILE")]
    pub ice_servers: Option<PathBuf>,
    /// USERNAME; with --secret, the user id of the minted REST username.
    #[arg(long)]
    pub user: Option<String>,
    /// Password (or UTURN_PASSWORD: a flag shows in /proc/PID/cmdline).
    #[arg(long, env = crate::secrets::ENV_PASSWORD, hide_env_values = true)]
    pub password: Option<String>,
    /// Mint a TURN REST credential with this shared secret, as a WebRTC service does (or
    /// UTURN_CHECK_SECRET).
    #[arg(long, env = "UTURN_CHECK_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Lifetime of the minted REST credential: 1h, 30m, 90s or seconds.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// Separator between expiry and user id in REST usernames.
    #[arg(long, default_value_t = rest::DEFAULT_SEPARATOR)]
    pub separator: char,
    /// The realm the credentials are for: a server with another REALM fails with "realm
    /// mismatch" (without it, the server's realm is used).
    #[arg(long)]
    pub realm: Option<String>,
    /// The relay's user store (sqlite:///path or redis://...): on 401, tells an unknown user
    /// from a wrong password.
    #[arg(long)]
    pub store: Option<String>,
    /// PEM certificate(s) to trust for turns: besides the system's roots (a private CA or a
    /// self-signed relay certificate).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Datagrams sent each way in each data round trip.
    #[arg(long, default_value_t = 10)]
    pub count: u32,
    /// Seconds a request waits for its response (UDP retransmits within it).
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
    /// Loss (percent of the datagrams sent both ways) above which a round trip fails.
    #[arg(long, default_value_t = 20)]
    pub max_loss: u32,
    /// One JSON document on stdout instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// What the steps need from the arguments.
pub struct Options {
    /// Per-transaction timeout.
    pub timeout: Duration,
    /// Datagrams each way per round trip.
    pub count: u32,
    /// Loss threshold, percent.
    pub max_loss: u32,
    /// Expected realm.
    pub realm: Option<String>,
    /// The relay's user store.
    pub store: Option<StoreUrl>,
    /// REST separator.
    pub separator: char,
    /// Show progress bars (stderr is a terminal and not --json).
    pub progress: bool,
    ca: Option<PathBuf>,
    tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

impl Options {
    /// The TLS client configuration (built once).
    pub fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.tls.get_or_init(|| conn::tls_config(self.ca.as_deref())).clone()
    }
}

/// Runs `uturn check`; returns the exit code.
pub fn run(a: CheckArgs) -> ExitCode {
    match run_inner(a) {
        Ok(code) => ExitCode::from(code),
        Err(d) => {
            eprintln!("uturn check: {}", d.message);
            ExitCode::from(d.class.exit_code())
        }
    }
}

fn usage(m: impl Into<String>) -> Diagnosis {
    Diagnosis::new(Class::Usage, m)
}

fn run_inner(a: CheckArgs) -> Result<u8, Diagnosis> {
    if a.count == 0 || !(a.timeout > 0.0 && a.timeout <= 300.0) {
        return Err(usage("--count must be at least 1 and --timeout within (0, 300] seconds"));
    }
    let mut targets: Vec<(uri::ServerUri, Option<Creds>)> = Vec::new();
    let cli_creds = cli_creds(&a)?;
    for u in &a.uris {
        targets.push((uri::parse(u).map_err(usage)?, cli_creds.clone()));
    }
    if let Some(path) = &a.ice_servers {
        let text = if path.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| usage(format!("stdin: {e}")))?;
            s
        } else {
            std::fs::read_to_string(path).map_err(|e| usage(format!("{}: {e}", path.display())))?
        };
        for s in uri::parse_ice_servers(&text).map_err(usage)? {
            let creds = match (s.username, s.credential) {
                (Some(username), Some(password)) => Some(Creds { username, password }),
                _ => cli_creds.clone(),
            };
            targets.push((s.uri, creds));
        }
    }
    if targets.is_empty() {
        return Err(usage("name at least one server (turn:HOST:PORT...) or --ice-servers FILE"));
    }
    let store = a.store.as_deref().map(str::parse::<StoreUrl>).transpose().map_err(|e| usage(e.to_string()))?;
    let opts = Options {
        timeout: Duration::from_secs_f64(a.timeout),
        count: a.count,
        max_loss: a.max_loss,
        realm: a.realm.clone(),
        store,
        separator: a.separator,
        progress: !a.json && std::io::stderr().is_terminal(),
        ca: a.ca.clone(),
        tls: OnceLock::new(),
    };
    let mut report = Report { exit_code: 0, servers: Vec::new() };
    for (u, creds) in &targets {
        let mut stdout = std::io::stdout();
        if !a.json {
            output::header(&mut stdout, &u.text, creds.as_ref().map(|c| c.username.as_str()));
        }
        let json = a.json;
        let mut sink = |s: &steps::Step| {
            if !json {
                output::step_line(&mut std::io::stdout(), s);
            }
        };
        let mut runner = Runner::new(&opts, &mut sink);
        let diagnosis = runner.check(u, creds.as_ref());
        let code = diagnosis.as_ref().map_or(0, |d| d.class.exit_code());
        let r = ServerReport {
            uri: u.text.clone(),
            transport: u.transport.name(),
            passed: diagnosis.is_none(),
            exit_code: code,
            diagnosis,
            redirected_to: runner.redirected_to.map(|a| a.to_string()),
            steps: std::mem::take(&mut runner.steps),
        };
        if !a.json {
            output::verdict(&mut stdout, &r);
        }
        if report.exit_code == 0 {
            report.exit_code = code;
        }
        report.servers.push(r);
    }
    if a.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| Diagnosis::new(Class::Other, e.to_string()))?;
        println!("{text}");
    }
    Ok(report.exit_code)
}

/// The credentials of the command line: --user and --password, else minted from --secret.
fn cli_creds(a: &CheckArgs) -> Result<Option<Creds>, Diagnosis> {
    match (&a.user, &a.password, &a.secret) {
        (Some(user), Some(p), _) => Ok(Some(Creds { username: user.clone(), password: p.clone() })),
        (_, _, Some(secret)) if !secret.is_empty() => {
            let ttl = rest::parse_ttl(&a.ttl).map_err(usage)?;
            let m = rest::mint(secret.as_bytes(), crate::credentials::unix_now(), ttl, a.user.as_deref(), a.separator);
            Ok(Some(Creds { username: m.username, password: m.password }))
        }
        (_, _, Some(_)) => Err(usage("--secret must not be empty")),
        // A password without --user (UTURN_PASSWORD left in the environment) is no credential:
        // a turn: URI then stops at `authenticate` with exit 2; a stun: URI needs none.
        _ => Ok(None),
    }
}
