//! How `uturn check` shows its results: one line per step with ✔ or ✘, its timing and the
//! reason (human, printed as each step completes), or one JSON document at the end (`--json`).

use std::io::Write;

use serde::Serialize;

use super::diagnosis::Diagnosis;
use super::steps::Step;

/// The result of one server.
#[derive(Debug, Serialize)]
pub struct ServerReport {
    /// The URI as given.
    pub uri: String,
    /// udp, tcp or tls.
    pub transport: &'static str,
    /// True when every step passed.
    pub passed: bool,
    /// This server's exit code (0 when it passed).
    pub exit_code: u8,
    /// Why it failed.
    pub diagnosis: Option<Diagnosis>,
    /// The ALTERNATE-SERVER followed, if any.
    pub redirected_to: Option<String>,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// The whole run (`--json`).
#[derive(Debug, Serialize)]
pub struct Report {
    /// The process exit code: the first failed server's, 0 when all passed.
    pub exit_code: u8,
    /// Each server checked.
    pub servers: Vec<ServerReport>,
}

/// The human header line of a server.
pub fn header(out: &mut dyn Write, uri: &str, user: Option<&str>) {
    let who = user.map_or(String::new(), |u| format!(" as {u:?}"));
    let _ = writeln!(out, "{uri}{who}");
}

/// The human line of a step: `  ✔ reach           Binding: ... (0.21 ms)`.
pub fn step_line(out: &mut dyn Write, s: &Step) {
    let mark = if s.ok { "✔" } else { "✘" };
    let _ = writeln!(out, "  {mark} {:<17} {} ({:.2} ms)", s.step, s.detail, s.ms);
}

/// The human verdict line of a server.
pub fn verdict(out: &mut dyn Write, r: &ServerReport) {
    let _ = match &r.diagnosis {
        None => writeln!(out, "  PASS: every step passed"),
        Some(d) if r.steps.last().is_some_and(|s| s.detail == d.message) => {
            writeln!(out, "  FAIL ({}, exit {})", class_name(d), r.exit_code)
        }
        Some(d) => writeln!(out, "  FAIL ({}, exit {}): {}", class_name(d), r.exit_code, d.message),
    };
}

fn class_name(d: &Diagnosis) -> String {
    serde_json::to_value(d.class).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}
