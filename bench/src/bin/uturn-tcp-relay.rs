//! `uturn-tcp-relay`: bulk data through RFC 6062 TCP allocations. `--pairs` control
//! connections (TCP or TLS) each make a TCP allocation, Connect to a local peer listener and
//! bind a data connection; then half the pairs carry `--bytes` from the peer to the client and
//! half from the client to the peer, as fast as both ends go. The report gives the wall time,
//! the throughput (MB/s, both directions together) and, given the server's PID, its CPU
//! microseconds per MB relayed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;
use uturn_bench::client::stream::StreamClient;
use uturn_bench::procstat;
use uturn_proto::wire::{attr, Method};

#[derive(Parser, Debug)]
#[command(about = "Bulk data through RFC 6062 TCP allocations")]
struct Args {
    /// The relay's TCP (or, with --tls, TLS) listen address.
    #[arg(long)]
    server: SocketAddr,
    /// Control and data connections over TLS.
    #[arg(long)]
    tls: bool,
    /// Data connection pairs.
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Bytes each pair carries.
    #[arg(long, default_value_t = 50_000_000)]
    bytes: usize,
    /// The relay's PID, for its CPU time.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value = "demo")]
    user: String,
    #[arg(long, default_value = "demo")]
    password: String,
    #[arg(long, default_value = "uturn.local")]
    realm: String,
    /// A JSON line instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    pairs: usize,
    bytes_per_pair: usize,
    seconds: f64,
    mb_per_s: f64,
    server_cpu_us_per_mb: Option<f64>,
}

/// One bound pair: the client's control and data connections and the peer's end.
struct Pair {
    _control: StreamClient,
    data: StreamClient,
    peer: std::net::TcpStream,
}

fn pair(args: &Args) -> Result<Pair, String> {
    let connect = || StreamClient::connect(args.server, args.tls, &args.user, &args.password, &args.realm);
    let mut control = connect().map_err(|e| e.to_string())?;
    control.allocate_transport(6, |_| Ok(()))?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let peer_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let r = control
        .transact_authenticated(Method::CONNECT, |w| w.xor_address(attr::XOR_PEER_ADDRESS, &peer_addr).map(drop))?;
    let id = r.msg().get(attr::CONNECTION_ID).ok_or(format!("Connect failed: {:?}", r.code()))?.to_vec();
    let (peer, _) = listener.accept().map_err(|e| e.to_string())?;
    let mut data = connect().map_err(|e| e.to_string())?;
    data.adopt_credentials(&control);
    let r = data.transact_authenticated(Method::CONNECTION_BIND, |w| w.bytes(attr::CONNECTION_ID, &id).map(drop))?;
    if let Some(code) = r.code() {
        return Err(format!("ConnectionBind failed with {code}"));
    }
    Ok(Pair { _control: control, data, peer })
}

/// Moves `bytes` across one pair, one way; true when all arrived.
fn carry(p: Pair, bytes: usize, from_peer: bool) -> bool {
    let Pair { _control, mut data, mut peer } = p;
    let chunk = vec![0x5au8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(120);
    if from_peer {
        let mut writer = peer.try_clone().expect("clone");
        let send = std::thread::spawn(move || {
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len());
                if writer.write_all(&chunk[..n]).is_err() {
                    return;
                }
                left -= n;
            }
        });
        let mut got = 0;
        while got < bytes && Instant::now() < deadline {
            match data.recv_raw(Duration::from_millis(500)) {
                Ok(b) => got += b.len(),
                Err(_) => break,
            }
        }
        let _ = send.join();
        got >= bytes
    } else {
        let recv = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            let _ = peer.set_read_timeout(Some(Duration::from_secs(5)));
            while got < bytes {
                match peer.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            got
        });
        let mut left = bytes;
        while left > 0 && Instant::now() < deadline {
            let n = left.min(chunk.len());
            if data.send_raw(&chunk[..n]).is_err() {
                break;
            }
            left -= n;
        }
        recv.join().unwrap_or(0) >= bytes
    }
}

fn main() {
    let args = Args::parse();
    let pairs: Vec<Pair> =
        (0..args.pairs).map(|_| pair(&args).unwrap_or_else(|e| panic!("setting up a pair: {e}"))).collect();
    let cpu0 = args.server_pid.and_then(|p| procstat::cpu_micros(p).ok());
    let t0 = Instant::now();
    let bytes = args.bytes;
    let threads: Vec<_> =
        pairs.into_iter().enumerate().map(|(i, p)| std::thread::spawn(move || carry(p, bytes, i % 2 == 0))).collect();
    let ok = threads.into_iter().all(|t| t.join().unwrap_or(false));
    let seconds = t0.elapsed().as_secs_f64();
    let cpu1 = args.server_pid.and_then(|p| procstat::cpu_micros(p).ok());
    assert!(ok, "not every byte arrived");
    let mb = (args.bytes * args.pairs) as f64 / 1e6;
    let report = Report {
        pairs: args.pairs,
        bytes_per_pair: args.bytes,
        seconds,
        mb_per_s: mb / seconds,
        server_cpu_us_per_mb: cpu0.zip(cpu1).map(|(a, b)| (b - a) as f64 / mb),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
    } else {
        println!(
            "{} pairs x {} bytes in {:.2} s: {:.1} MB/s, server CPU {} us/MB",
            report.pairs,
            report.bytes_per_pair,
            report.seconds,
            report.mb_per_s,
            report.server_cpu_us_per_mb.map_or("-".into(), |c| format!("{c:.0}"))
        );
    }
}
