//! `uturn trace`: follows a user's, a session's or a client's TURN exchanges on a running relay
//! through its admin endpoint (`GET /trace`, [`crate::trace`]) and prints them as they happen,
//! one line each, with the relay's flags; `--pcap FILE` also writes them as a pcapng that
//! Wireshark decodes ([`crate::trace::pcap`]). Exit codes: 0 when the trace ended (its
//! `--duration`, or the relay closed it), 2 usage, 6 relay unreachable or refusing (429: too many
//! traces; 401: token), 1 other errors (the pcap file).

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use clap::Args;
use serde_json::Value;

use crate::trace::pcap::PcapWriter;

/// `uturn trace`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["user", "session", "client"])))]
pub struct TraceArgs {
    /// The relay's admin endpoint.
    #[arg(long, default_value = "http://127.0.0.1:3480")]
    pub admin: String,
    /// Bearer token of the admin endpoint (or UTURN_ADMIN_TOKEN).
    #[arg(long, env = crate::secrets::ENV_ADMIN_TOKEN, hide_env_values = true)]
    pub token: Option<String>,
    /// Follow every allocation of this user (a REST user id matches its ephemeral usernames).
    #[arg(long)]
    pub user: Option<String>,
    /// Follow the allocation with this session id (as in the logs and `uturn admin sessions`).
    #[arg(long)]
    pub session: Option<u64>,
    /// Follow every 5-tuple of this client, IP or IP:PORT.
    #[arg(long)]
    pub client: Option<String>,
    /// Also write what is traced to this pcapng file (Wireshark, tshark).
    #[arg(long)]
    pub pcap: Option<PathBuf>,
    /// Bytes of relayed payload (Data indications, ChannelData) to keep: 0 keeps their
    /// headers only, since the payload is the user's media.
    #[arg(long, default_value_t = 0)]
    pub snaplen: usize,
    /// Messages a second the relay sends at most (it counts the rest); default the relay's.
    #[arg(long)]
    pub rate: Option<u32>,
    /// Stop after this many seconds (the relay ends the trace).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Print the relay's JSON lines as they come instead of human lines.
    #[arg(long)]
    pub json: bool,
}

/// Runs `uturn trace`; returns the exit code.
pub fn run(a: TraceArgs) -> ExitCode {
    match trace(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("uturn trace: {message}");
            ExitCode::from(code)
        }
    }
}

fn query(a: &TraceArgs) -> String {
    let enc = crate::admin_api::percent_encode;
    let mut q = match (&a.user, a.session, &a.client) {
        (Some(u), _, _) => format!("user={}", enc(u)),
        (_, Some(s), _) => format!("session={s}"),
        (_, _, Some(c)) => format!("client={}", enc(c)),
        _ => String::new(),
    };
    if a.snaplen > 0 {
        q += &format!("&snaplen={}", a.snaplen);
    }
    if let Some(r) = a.rate {
        q += &format!("&rate={r}");
    }
    if let Some(d) = a.duration {
        q += &format!("&max_s={d}");
    }
    q
}

fn trace(a: &TraceArgs) -> Result<(), (u8, String)> {
    let url = format!("{}/trace?{}", a.admin.trim_end_matches('/'), query(a));
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        // The relay sends a line every second at least.
        .timeout_read(Duration::from_secs(15))
        .build();
    let mut req = agent.get(&url);
    if let Some(t) = &a.token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let response = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            let body = r.into_string().unwrap_or_default();
            return Err((6, format!("the relay refused the trace: {code} {}", body.trim())));
        }
        Err(e) => return Err((6, format!("cannot reach {url}: {e}"))),
    };
    let mut pcap = match &a.pcap {
        Some(p) => {
            let f = std::fs::File::create(p).map_err(|e| (1, format!("{}: {e}", p.display())))?;
            Some(PcapWriter::new(BufWriter::new(f)).map_err(|e| (1, format!("{}: {e}", p.display())))?)
        }
        None => None,
    };
    let (mut stun, mut data) = (0u64, 0u64);
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(response.into_reader()).lines() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                eprintln!("uturn trace: the relay closed the stream ({e})");
                break;
            }
        };
        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
        if let Some(w) = &mut pcap {
            match write_packet(w, &v) {
                Ok(Some(true)) => stun += 1,
                Ok(Some(false)) => data += 1,
                Ok(None) => {}
                Err(e) => return Err((1, format!("pcap: {e}"))),
            }
        }
        let text = if a.json { Some(line.clone()) } else { human(&v) };
        if let Some(t) = text {
            if writeln!(out, "{t}").is_err() {
                break;
            }
            let _ = out.flush();
        }
        if v["type"] == "end" {
            break;
        }
    }
    if let (Some(w), Some(p)) = (pcap, &a.pcap) {
        let n = w.packets();
        w.finish().map_err(|e| (1, format!("{}: {e}", p.display())))?;
        eprintln!(
            "uturn trace: {n} packets ({stun} STUN messages, {data} relayed datagrams) written to {}",
            p.display()
        );
    }
    Ok(())
}

/// Writes a message line to the pcap: `Some(true)` for a STUN message, `Some(false)` for
/// relayed data, `None` for a line that is no message.
fn write_packet<W: Write>(w: &mut PcapWriter<W>, v: &Value) -> std::io::Result<Option<bool>> {
    if v["type"] != "message" {
        return Ok(None);
    }
    let raw = v["raw"].as_str().and_then(|r| base64::engine::general_purpose::STANDARD.decode(r).ok());
    let (Some(raw), Some(client), Some(server)) = (raw, addr(&v["client"]), addr(&v["server"])) else {
        return Ok(None);
    };
    if raw.is_empty() {
        return Ok(None);
    }
    let (src, dst) = match v["dir"].as_str() {
        Some("from-client") => (client, server),
        Some("to-client") => (server, client),
        _ => return Ok(None),
    };
    let len = v["len"].as_u64().unwrap_or(raw.len() as u64) as usize;
    let transport = v["transport"].as_str().unwrap_or("udp");
    let mut comment = format!("session {}", v["session"]);
    if transport != "udp" {
        comment += &format!("; received over {transport}");
    }
    if let Some(d) = v["dropped"].as_str() {
        comment += &format!("; dropped by the relay: {d}");
    }
    let ts = v["ts"].as_f64().unwrap_or(0.0);
    w.udp(ts, src, dst, &raw, len, Some(&comment))?;
    // A message is a STUN message unless it is relayed data (ChannelData, Send/Data indication).
    let relayed = v["kind"] == "channel-data" || matches!(v["method"].as_str(), Some("Send" | "Data"));
    Ok(Some(!relayed))
}

fn addr(v: &Value) -> Option<SocketAddr> {
    v.as_str()?.parse().ok()
}

/// The human line of a JSON line (`None`: not shown, e.g. each relayed datagram and ticks).
fn human(v: &Value) -> Option<String> {
    let ts = v["ts"].as_f64().unwrap_or(0.0);
    let secs = ts as u64;
    let when = format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        ((ts.fract()) * 1000.0) as u64
    );
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    match v["type"].as_str()? {
        "start" => Some(format!("tracing {} (at most {} messages/s); Ctrl-C to stop", s("target"), v["rate"])),
        "end" => Some(format!("{when} trace ended: {}", s("reason"))),
        "flag" => Some(format!("{when} ⚠ {} session {}: {}", s("flag"), v["session"], s("detail"))),
        "traffic" => Some(format!(
            "{when} session {} peer {}{}: → {} pkt {} B  ← {} pkt {} B in the last second (total → {} pkt, ← {} pkt)",
            v["session"],
            s("peer"),
            v["channel"].as_str().map_or(String::new(), |c| format!(" channel {c}")),
            v["to_peer"]["packets"],
            v["to_peer"]["bytes"],
            v["to_client"]["packets"],
            v["to_client"]["bytes"],
            v["total_to_peer"]["packets"],
            v["total_to_client"]["packets"],
        )),
        "tick" => {
            let (sup, slow, tap) =
                (v["suppressed"].as_u64()?, v["slow_reader_dropped"].as_u64()?, v["tap_dropped"].as_u64()?);
            (sup + slow + tap > 0).then(|| format!("{when} (not shown: {sup} over the rate cap, {slow} to a slow reader; {tap} lost in the relay's tap queue)"))
        }
        "message" => {
            let arrow = match v["dir"].as_str() {
                Some("from-client") => "→",
                Some("to-client") => "←",
                _ => "×",
            };
            let transport = match v["transport"].as_str() {
                Some("udp") | None => String::new(),
                Some(t) => format!("/{t}"),
            };
            let who = format!(
                "session {}{} {}{transport} {}",
                v["session"],
                v["user"].as_str().map_or(String::new(), |u| format!(" ({u})")),
                s("client"),
                arrow
            );
            if let Some(d) = v["dropped"].as_str() {
                let what = if v["kind"] == "stun" { s("method") } else { s("kind") };
                let peer = v["peer"].as_str().map_or(String::new(), |p| format!(" peer {p}"));
                return Some(format!("{when} {who} {what}{peer} dropped: {d}"));
            }
            if v["kind"] != "stun" || matches!(v["method"].as_str(), Some("Send" | "Data")) {
                return None;
            }
            let mut line = format!("{when} {who} {} {}", s("method"), s("class"));
            if let Some(e) = v.get("error") {
                line += &format!(
                    " {} {}: {}",
                    e["code"],
                    e["reason"].as_str().unwrap_or(""),
                    e["meaning"].as_str().unwrap_or("")
                );
            }
            for a in v["attributes"].as_array().into_iter().flatten() {
                let name = a["name"].as_str().unwrap_or("");
                if matches!(
                    name,
                    "MESSAGE-INTEGRITY"
                        | "MESSAGE-INTEGRITY-SHA256"
                        | "FINGERPRINT"
                        | "ERROR-CODE"
                        | "SOFTWARE"
                        | "NONCE"
                ) {
                    continue;
                }
                match a.get("value") {
                    Some(val) => line += &format!(" {name}={}", val.as_str().map_or(val.to_string(), str::to_string)),
                    None => line += &format!(" {name}"),
                }
            }
            Some(line)
        }
        _ => None,
    }
}
