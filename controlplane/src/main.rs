//! The `uturn` binary: parse flags and config, print what is served, run until SIGINT/SIGTERM
//! (SIGHUP reloads credentials, SIGUSR2 hands everything to a new binary).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use uturn_controlplane::admin::Command;
use uturn_controlplane::config::{Cli, Config};
use uturn_controlplane::{discovery, server};

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    match cli.command.take() {
        Some(Command::CheckConfig(args)) => return uturn_controlplane::check_config::run(&mut cli, &args),
        Some(cmd) => return uturn_controlplane::admin::run(cmd),
        None => {}
    }
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("uturn: {e:#}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal, so log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log_json {
        // One JSON object per line, fields flattened beside `message`.
        logs.json().flatten_event(true).init();
    } else {
        logs.with_ansi(ansi).init();
    }
    // `external-ip = "auto"`: the public address is asked of a STUN server before serving
    // (logged, so after the logs are set up).
    let mut config = config;
    if let Err(e) = discovery::resolve(&mut config) {
        eprintln!("uturn: {e:#}");
        return ExitCode::from(2);
    }

    let signals = server::Signals::default();
    let handlers = [
        (signal_hook::consts::SIGINT, &signals.shutdown),
        (signal_hook::consts::SIGTERM, &signals.shutdown),
        (signal_hook::consts::SIGHUP, &signals.reload),
        (signal_hook::consts::SIGUSR2, &signals.upgrade),
    ];
    for (sig, flag) in handlers {
        if let Err(e) = signal_hook::flag::register(sig, Arc::clone(flag)) {
            eprintln!("uturn: cannot install signal handler: {e}");
            return ExitCode::FAILURE;
        }
    }
    // A process started by a hot upgrade prints no banner: its predecessor's is on screen.
    if std::env::var_os(server::UPGRADE_ENV).is_none() {
        print_banner(&config);
    }
    // SIGHUP re-reads the same file and flags (and asks the STUN server of `external-ip =
    // "auto"` again).
    let reloader: server::Reloader =
        Box::new(move || Config::load(&cli).and_then(|mut c| discovery::resolve(&mut c).map(|()| c)));
    match server::run(&config, signals, Some(reloader)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uturn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_banner(c: &Config) {
    println!("uturn {} - TURN relay (RFC 8656)", env!("CARGO_PKG_VERSION"));
    for l in &c.listen {
        println!("  listening   {l}");
    }
    let ips: Vec<String> = c.relay_ips.iter().map(ToString::to_string).collect();
    println!("  relay       {} ports {}-{}", ips.join(", "), c.port_range.0, c.port_range.1);
    for (private, public) in &c.external_ips {
        println!("  external    {private} advertised as {public}");
    }
    println!("  realm       {}", c.credentials.realm);
    println!("  workers     {}", c.workers);
    if !c.credentials.secrets.is_empty() {
        println!(
            "  credentials TURN REST API ({} secret(s)): mint with `uturn credential --secret ...`",
            c.credentials.secrets.len()
        );
    }
    if let Some(store) = &c.credentials.store {
        println!("  user store  {store}");
    }
    let snippet = ice_servers(c);
    println!("WebRTC RTCPeerConnection configuration:\n{snippet:#}");
}

/// The `iceServers` snippet for the banner. It shows a password only for the loopback demo
/// credential, which is public anyway; for real users it shows the first username and a
/// placeholder, so no secret reaches a terminal, a log file or journald.
fn ice_servers(c: &Config) -> serde_json::Value {
    let user = c.credentials.users.keys().next().map(String::as_str).unwrap_or("<username>");
    let pass = if c.is_loopback_demo() {
        c.credentials.users.get(user).map(String::as_str).unwrap_or("")
    } else {
        "<password>"
    };
    let urls: Vec<String> = c
        .listen
        .iter()
        .map(|l| {
            // turns: over TLS (RFC 7065), which runs on TCP.
            let (scheme, transport) = match l.transport {
                uturn_proto::Transport::Udp => ("turn", "udp"),
                uturn_proto::Transport::Tcp => ("turn", "tcp"),
                uturn_proto::Transport::Tls => ("turns", "tcp"),
            };
            format!("{scheme}:{}?transport={transport}", l.addr)
        })
        .collect();
    serde_json::json!({ "iceServers": [{ "urls": urls, "username": user, "credential": pass }] })
}
