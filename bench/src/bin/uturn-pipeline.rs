//! `uturn-pipeline`: does a TURN server keep a client's order (a check sent right behind its
//! CreatePermission or ChannelBind is relayed), and how long do requests on an allocation take?
//! See `uturn_bench::pipeline`; scripts/bench-ordering.sh runs it beside coturn.

use std::net::SocketAddr;

use clap::Parser;
use uturn_bench::pipeline::{run, PipelineRun};

/// Pipelined CreatePermission+Send and ChannelBind+ChannelData, then request round trips.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The TURN server's UDP address.
    #[arg(long, default_value = "127.0.0.1:3478")]
    server: SocketAddr,
    /// Username.
    #[arg(long, default_value = "demo")]
    user: String,
    /// Password.
    #[arg(long, default_value = "demo")]
    password: String,
    /// Pipelined pairs of each kind (at most 200).
    #[arg(long, default_value_t = 20)]
    pairs: u8,
    /// Sequential requests of each kind timed for the turnaround.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Label for the JSON report.
    #[arg(long, default_value = "")]
    contestant: String,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
}

fn main() {
    let a = Args::parse();
    let cfg =
        PipelineRun { server: a.server, user: a.user, password: a.password, pairs: a.pairs, requests: a.requests };
    match run(&cfg) {
        Ok(r) if a.json => {
            let mut v = serde_json::to_value(&r).expect("a report serializes");
            v["contestant"] = a.contestant.into();
            println!("{v}");
        }
        Ok(r) => println!(
            "{}CreatePermission+Send relayed {}/{}, ChannelBind+ChannelData relayed {}/{}; \
             CreatePermission round trip p50 {} us p99 {} us, ChannelBind p50 {} us p99 {} us, unanswered {}",
            if a.contestant.is_empty() { String::new() } else { format!("{}: ", a.contestant) },
            r.send_relayed,
            r.pairs,
            r.channel_data_relayed,
            r.pairs,
            r.create_permission.p50_us,
            r.create_permission.p99_us,
            r.channel_bind.p50_us,
            r.channel_bind.p99_us,
            r.unanswered
        ),
        Err(e) => {
            eprintln!("uturn-pipeline: {e}");
            std::process::exit(1);
        }
    }
}
