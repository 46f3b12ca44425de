//! `uturn check-config`: loads and validates the configuration exactly as the relay would at
//! start (the embedded default, `--config` and the flags, `UTURN_*` environment variables,
//! every `*-file`), then also opens what the relay opens before serving without binding any
//! socket: the TLS certificate and key, and the STUN server of `external-ip = "auto"`. Like
//! `nginx -t`, it prints a summary and exits 0, or prints the reason and exits 1.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use crate::config::{Cli, Config};

/// `uturn check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The TOML configuration file to check (the same as the relay's --config, which may also
    /// be given before the subcommand).
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Runs the check: exit 0 with a summary on stdout, or 1 with `uturn: configuration
/// FILE: <reason>` on stderr.
pub fn run(cli: &mut Cli, args: &CheckConfigArgs) -> ExitCode {
    if let Some(path) = &args.config {
        cli.config = Some(path.clone());
    }
    let name = cli.config.as_ref().map_or_else(|| "(embedded default)".to_owned(), |p| p.display().to_string());
    match check(cli) {
        Ok(config) => {
            print!("{}", summary(&config));
            println!("uturn: configuration {name} is ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("uturn: configuration {name}: {e:#}");
            eprintln!("uturn: configuration {name} test failed");
            ExitCode::from(1)
        }
    }
}

/// The configuration the relay would run, or why it would not start.
fn check(cli: &Cli) -> Result<Config> {
    let mut config = Config::load(cli)?;
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        uturn_dataplane::TlsServer::from_pem_files(cert, key)
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .with_context(|| format!("tls-cert {} / tls-key {}", cert.display(), key.display()))?;
    }
    crate::discovery::resolve(&mut config)?;
    Ok(config)
}

/// One line per part of the configuration an operator checks before a start: no secret.
pub fn summary(c: &Config) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<12}{v}\n"));
    for l in &c.listen {
        line("listen", l.to_string());
    }
    let ports = u64::from(c.port_range.1 - c.port_range.0) + 1;
    let ips: Vec<String> = c.relay_ips.iter().map(ToString::to_string).collect();
    line(
        "relay",
        format!(
            "{} ports {}-{} ({} relayed transport addresses)",
            ips.join(", "),
            c.port_range.0,
            c.port_range.1,
            ports * c.relay_ips.len() as u64
        ),
    );
    for (private, public) in &c.external_ips {
        line("external", format!("{private} advertised as {public}"));
    }
    if c.external_ip_auto && c.external_ips.is_empty() {
        line("external", "auto (none found)".into());
    }
    line("realm", c.credentials.realm.clone());
    let mut creds = Vec::new();
    if !c.credentials.users.is_empty() {
        creds.push(format!("{} static user(s)", c.credentials.users.len()));
    }
    if !c.credentials.secrets.is_empty() {
        creds.push(format!("TURN REST API ({} secret(s))", c.credentials.secrets.len()));
    }
    if let Some(store) = &c.credentials.store {
        creds.push(format!("user store {store}"));
    }
    line("credentials", creds.join(", "));
    line("workers", c.workers.to_string());
    if let Some(a) = c.admin_listen {
        line("admin", format!("http://{a} ({})", if c.admin_token.is_some() { "bearer token" } else { "loopback" }));
    }
    if let Some(a) = c.metrics_listen {
        line("metrics", format!("http://{a}/metrics"));
    }
    if let Some(url) = &c.fleet_redis {
        // The URL may carry a password: print its host part only.
        let shown = match url.split_once("://") {
            Some((scheme, rest)) => format!("{scheme}://{}", rest.rsplit('@').next().unwrap_or(rest)),
            None => "(not a URL)".into(),
        };
        line("fleet", format!("{shown} as node {}", c.node_id));
    }
    out
}
