//! `uturn-load`: a TURN traffic generator. N clients, each on its own UDP socket, each doing
//! the full 401 -> authenticated Allocate, CreatePermission and ChannelBind to its own peer
//! socket, then paced traffic (ChannelData or Send indications, one-way or echo) for a set
//! duration after a warm-up. Payloads carry a sequence number and a send timestamp; the report
//! gives delivered packets/s, loss, duplicates, reordering, latency percentiles and, given the
//! server's PID, the server's CPU microseconds per relayed packet.
//!
//! `--mode raw` sends bare payloads to a plain UDP forwarder (the benchmark floor);
//! `--mode allocs` measures authenticated allocations per second; `--mode hold` measures the
//! server's memory per idle allocation.
//!
//! Like a real client, the generator takes the realm from the server's 401 and derives the key
//! MD5(username:realm:password) from it (`--realm`, when given, must match), and in the
//! channel and send modes keeps its state alive for runs of any length: each allocation is
//! refreshed at half the LIFETIME the server granted (`--allocation-refresh` to override), the
//! permission every `--permission-refresh` seconds (240) and the channel binding every
//! `--channel-refresh` seconds (480). Refreshes go out from the sending loop without blocking
//! it; their answers are picked out of the client sockets by the receive loop, so relayed data
//! is never mistaken for them. A 438 Stale Nonce is learned from and retried once; the report
//! counts refreshes and `refresh_failures`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;
use uturn_bench::client::refresh::{self, Intervals, Plan, RefreshStats, Refresher};
use uturn_bench::client::Client;
use uturn_bench::mmsg::{RecvBatch, SendBatch};
use uturn_bench::payload::{self, Stamp};
use uturn_bench::procstat;
use uturn_bench::stats::{latency_histogram, ClientStats, Latency};
use uturn_proto::wire::{attr, Class, Message, MessageWriter, Method, TransactionId};

/// How the clients reach the relay (RFC 8656 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// One ChannelData per datagram.
    Udp,
    /// ChannelData framed on TCP connections.
    Tcp,
    /// ChannelData framed on TLS connections (ALPN stun.turn).
    Tls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// ChannelData (RFC 8656 §12).
    Channel,
    /// Send/Data indications (RFC 8656 §11).
    Send,
    /// Bare payloads to a UDP forwarder (no TURN).
    Raw,
    /// Authenticated allocations per second.
    Allocs,
    /// Hold --count idle allocations and report the server's memory per allocation.
    Hold,
    /// Send --rate random garbage datagrams per second (random bytes, STUN-looking headers,
    /// ChannelData on unbound channels) from --clients sockets for --duration.
    Garbage,
}

/// TURN traffic generator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TURN server (or forwarder in raw mode).
    #[arg(long, default_value = "127.0.0.1:3478")]
    server: SocketAddr,
    /// Username.
    #[arg(long, default_value = "demo")]
    user: String,
    /// Allocs mode: spread the allocations over N users named `<user>0` .. `<user>N-1` (picked
    /// at random, all with `--password`), so a user store sees lookups that miss its cache.
    /// 0 or 1: every allocation uses `--user` as given.
    #[arg(long, default_value_t = 0)]
    users: u64,
    /// Password.
    #[arg(long, default_value = "demo")]
    password: String,
    /// Realm the server must use. By default the realm is taken from the server's 401 (the key
    /// is always derived from that one); given, a server naming another realm is an error.
    #[arg(long)]
    realm: Option<String>,
    /// Channel and send modes: seconds between CreatePermission refreshes (a permission lives
    /// 300 s on a standard relay; real clients refresh at 240 s).
    #[arg(long, default_value_t = 240.0, value_name = "SECS")]
    permission_refresh: f64,
    /// Channel mode: seconds between ChannelBind refreshes (a binding lives 600 s on a
    /// standard relay; real clients refresh at 480 s).
    #[arg(long, default_value_t = 480.0, value_name = "SECS")]
    channel_refresh: f64,
    /// Channel, send and hold modes: seconds between allocation refreshes (default: half the
    /// LIFETIME the server granted).
    #[arg(long, value_name = "SECS")]
    allocation_refresh: Option<f64>,
    /// Clients (each its own socket and allocation); threads in allocs/hold mode.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Total offered packets per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Datagrams each client sends back to back per turn, like the packets of one video frame
    /// (1: clients take turns packet by packet, the default).
    #[arg(long, default_value_t = 1)]
    burst: u64,
    /// Payload size, bytes (at least 24).
    #[arg(long, default_value_t = 160)]
    size: usize,
    /// Measured duration, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up before measuring, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Traffic mode.
    #[arg(long, value_enum, default_value_t = Mode::Channel)]
    mode: Mode,
    /// The peer sends every packet back; latency is the round trip.
    #[arg(long)]
    echo: bool,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Server PID, to report its CPU time per relayed packet and its memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Raw mode: the address the peer socket binds (the forwarder's --forward-to).
    #[arg(long, default_value = "127.0.0.1:3481")]
    peer: SocketAddr,
    /// Allocs/hold mode: allocations to make.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Allocs mode: delete each allocation with Refresh LIFETIME 0.
    #[arg(long)]
    delete: bool,
    /// Hold mode: give each allocation a permission for `--peer`'s IP and channel 0x4000 bound
    /// to `--peer`, as every call has (nothing is sent to the peer). The hold is meant to end
    /// well within the permission's 300 s (RFC 8656 §9): neither is refreshed.
    #[arg(long)]
    with_channel: bool,
    /// Pin the generator's threads to this core.
    #[arg(long)]
    cpu: Option<usize>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// Client transport: udp, or tcp / tls (the server is then the relay's tcp:// or tls://
    /// address; channel mode, one-way, `--clients` connections; see `uturn_bench::streamload`).
    #[arg(long, value_enum, default_value = "udp")]
    transport: Transport,
    /// Label for the JSON report (the contestant's name in scripts/bench-compare.sh).
    #[arg(long, default_value = "")]
    contestant: String,
    /// Scenario name for the JSON report.
    #[arg(long, default_value = "")]
    scenario: String,
    /// Create the peer sockets in this network namespace (`/run/netns/NAME`), so relayed
    /// datagrams cross real interfaces (scripts/bench-xdp.sh).
    #[arg(long)]
    peer_netns: Option<String>,
    /// Bind the peer sockets to this IP (default: the relayed address's IP, which is local on
    /// loopback).
    #[arg(long)]
    peer_ip: Option<std::net::IpAddr>,
    /// Also report the machine's CPU per relayed packet: busy time of all CPUs from /proc/stat
    /// (softirq included, where XDP runs), minus this generator's own CPU time and minus the
    /// machine's idle-time busy rate measured for 1 s before the run.
    #[arg(long)]
    machine_cpu: bool,
    /// With `--machine-cpu`: processes (or kernel threads, such as the peer side's NAPI
    /// threads) whose CPU time is the generator's or the peer's, subtracted too (repeatable).
    #[arg(long = "exclude-pid")]
    exclude_pids: Vec<u32>,
}

#[derive(Serialize, Default)]
struct TrafficReport {
    contestant: String,
    scenario: String,
    server: String,
    mode: String,
    echo: bool,
    clients: usize,
    burst: u64,
    offered_pps: u64,
    size: usize,
    duration_s: f64,
    sent: u64,
    delivered: u64,
    delivered_pps: f64,
    lost: u64,
    loss_pct: f64,
    duplicates: u64,
    reordered: u64,
    latency: Latency,
    /// Packets the server relayed in the window: delivered, twice that in echo runs.
    relayed: u64,
    server_cpu_us_per_packet: Option<f64>,
    server_cpu_pct: Option<f64>,
    /// Server context switches (all threads) per 1,000 relayed packets: how well it batches.
    server_switches_per_kpkt: Option<f64>,
    /// With `--machine-cpu`: every CPU's busy time (softirq included) minus the generator's
    /// and the idle baseline, per relayed packet, microseconds.
    machine_cpu_us_per_packet: Option<f64>,
    generator_cpu_us_per_packet: f64,
    generator_cpu_pct: f64,
    /// Successful refreshes during the run, by kind.
    refreshes: RefreshCounts,
    /// Refresh transactions that failed (error response, timeout, bad integrity).
    refresh_failures: u64,
    /// `refresh_failures` by kind and reason.
    refresh_failure_reasons: std::collections::BTreeMap<String, u64>,
    /// 438 Stale Nonce answers to refreshes (each retried once with the fresh nonce).
    stale_nonces: u64,
    /// Retransmitted refresh requests.
    refresh_retransmits: u64,
}

#[derive(Serialize, Default)]
struct RefreshCounts {
    allocation: u64,
    permission: u64,
    channel: u64,
}

impl TrafficReport {
    fn set_refresh(&mut self, st: &RefreshStats) {
        self.refreshes = RefreshCounts { allocation: st.allocation, permission: st.permission, channel: st.channel };
        self.refresh_failures = st.failures;
        self.refresh_failure_reasons = st.failure_reasons.clone();
        self.stale_nonces = st.stale_nonces;
        self.refresh_retransmits = st.retransmits;
    }
}

fn main() {
    let args = Args::parse();
    let _ = uturn_dataplane::raise_fd_limit();
    if let Some(c) = args.cpu {
        core_affinity::set_for_current(core_affinity::CoreId { id: c });
    }
    if args.transport != Transport::Udp {
        return streams(&args);
    }
    let result = check_args(&args).and_then(|()| match args.mode {
        Mode::Allocs => allocs(&args),
        Mode::Hold => hold(&args),
        Mode::Garbage => garbage(&args),
        _ => traffic(&args),
    });
    if let Err(e) = result {
        eprintln!("uturn-load: {e}");
        std::process::exit(1);
    }
}

/// `--transport tcp|tls`: one-way ChannelData over connections.
fn streams(args: &Args) {
    let cfg = uturn_bench::streamload::StreamLoad {
        server: args.server,
        tls: args.transport == Transport::Tls,
        user: args.user.clone(),
        password: args.password.clone(),
        clients: args.clients.max(1),
        rate: args.rate,
        size: args.size,
        warmup: args.warmup,
        duration: args.duration,
        server_pid: args.server_pid,
    };
    match uturn_bench::streamload::run(&cfg) {
        Ok(r) if args.json => println!("{}", serde_json::to_string(&r).expect("a report serializes")),
        Ok(r) => println!(
            "{}: {} connections, offered {} pps, sent {}, delivered {} ({:.0} pps), loss {:.3}%, server CPU {} us/pkt, RSS {} KiB",
            r.transport,
            r.clients,
            r.offered_pps,
            r.sent,
            r.delivered,
            r.delivered_pps,
            r.loss_pct,
            r.server_cpu_us_per_pkt.map_or("-".into(), |c| format!("{c:.2}")),
            r.server_rss_bytes.map_or("-".into(), |b| (b / 1024).to_string()),
        ),
        Err(e) => {
            eprintln!("uturn-load: {e}");
            std::process::exit(1);
        }
    }
}

/// Validates the refresh intervals and, with `--realm`, checks it against the realm of the
/// server's 401 (one unauthenticated Allocate) so a mismatch fails at once with both names.
fn check_args(args: &Args) -> Result<(), String> {
    let ok = |v: f64| v.is_finite() && v > 0.0;
    if !ok(args.permission_refresh) || !ok(args.channel_refresh) || !args.allocation_refresh.is_none_or(ok) {
        return Err("--permission-refresh, --channel-refresh and --allocation-refresh must be positive seconds".into());
    }
    let (Some(want), Mode::Channel | Mode::Send | Mode::Allocs | Mode::Hold) = (&args.realm, args.mode) else {
        return Ok(());
    };
    let mut probe = Client::new(args.server, &args.user, &args.password, want);
    probe.try_learn_nonce().map_err(|e| format!("{}: {e}", args.server))?;
    if probe.realm != *want {
        return Err(format!(
            "--realm {want:?} does not match the server's realm {:?} (from its 401); omit --realm to use the server's",
            probe.realm
        ));
    }
    Ok(())
}

/// A TURN client with `--user`/`--password` that takes the realm from the server's 401 (and
/// insists on `--realm` when given).
fn new_client(server: SocketAddr, user: &str, password: &str, realm: Option<&str>) -> Client {
    Client::new(server, user, password, realm.unwrap_or_default()).with_expected_realm(realm)
}

/// The refresh intervals from the flags.
fn intervals(args: &Args) -> Intervals {
    Intervals {
        allocation: args.allocation_refresh.map(Duration::from_secs_f64),
        permission: Duration::from_secs_f64(args.permission_refresh),
        channel: Duration::from_secs_f64(args.channel_refresh),
    }
}

/// One generator client: its TURN client socket, its peer socket, its relayed address.
struct Session {
    /// The TURN client (absent in raw mode, where `sock` is a bare socket).
    turn: Option<Client>,
    client: UdpSocket,
    peer: Option<UdpSocket>,
    relayed: SocketAddr,
    peer_addr: SocketAddr,
    channel: u16,
    /// What the TURN session holds and since when (absent in raw mode).
    plan: Option<Plan>,
}

fn setup(args: &Args) -> Result<(Vec<Session>, Option<UdpSocket>), String> {
    let mut sessions = Vec::with_capacity(args.clients);
    if args.mode == Mode::Raw {
        let peer = bind_peer(args, args.peer).map_err(|e| format!("bind raw peer {}: {e}", args.peer))?;
        for _ in 0..args.clients {
            let local = if args.server.ip().is_loopback() {
                args.server.ip()
            } else {
                std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            };
            let client = UdpSocket::bind(SocketAddr::new(local, 0)).map_err(|e| e.to_string())?;
            sessions.push(Session {
                turn: None,
                client,
                peer: None,
                relayed: args.server,
                peer_addr: args.peer,
                channel: 0,
                plan: None,
            });
        }
        return Ok((sessions, Some(peer)));
    }
    for i in 0..args.clients {
        // A fresh socket may reuse the port of a previous run's client whose allocation the
        // server still keeps (coturn holds deleted allocations for a second): try another.
        let mut attempt = 0;
        let (mut c, relayed) = loop {
            let mut c = new_client(args.server, &args.user, &args.password, args.realm.as_deref());
            match c.try_allocate() {
                Ok(r) => break (c, r),
                Err(e) if attempt < 5 => {
                    attempt += 1;
                    eprintln!("client {i}: allocate: {e}; retrying on a new socket");
                }
                Err(e) => return Err(format!("client {i}: allocate: {e}")),
            }
        };
        let peer =
            bind_peer(args, SocketAddr::new(args.peer_ip.unwrap_or(relayed.ip()), 0)).map_err(|e| e.to_string())?;
        let peer_addr = peer.local_addr().map_err(|e| e.to_string())?;
        let allocated_at = Instant::now();
        let lifetime = c.lifetime.ok_or_else(|| format!("client {i}: Allocate success without LIFETIME"))?;
        let channel = 0x4000 + (i % 0x1000) as u16;
        c.try_create_permission(&[peer_addr]).map_err(|e| format!("client {i}: {e}"))?;
        let permitted_at = Some(Instant::now());
        let mut bound = None;
        if args.mode == Mode::Channel {
            c.try_channel_bind(channel, peer_addr).map_err(|e| format!("client {i}: {e}"))?;
            bound = Some((channel, Instant::now()));
        }
        let client = c.sock.try_clone().map_err(|e| e.to_string())?;
        let plan = Plan { lifetime, allocated_at, peer: peer_addr, permitted_at, channel: bound };
        sessions.push(Session {
            turn: Some(c),
            client,
            peer: Some(peer),
            relayed,
            peer_addr,
            channel,
            plan: Some(plan),
        });
    }
    Ok((sessions, None))
}

/// A peer socket bound to `addr`, in `--peer-netns` if given.
fn bind_peer(args: &Args, addr: SocketAddr) -> std::io::Result<UdpSocket> {
    match &args.peer_netns {
        Some(ns) => uturn_bench::netns::bind_udp_in(ns, addr),
        None => UdpSocket::bind(addr),
    }
}

/// Busy time of every CPU together (user, nice, system, irq, softirq; not steal, which is the
/// hypervisor's) from /proc/stat, microseconds.
fn machine_busy_micros() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0 };
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = [0, 1, 2, 5, 6].iter().filter_map(|i| f.get(*i)).sum::<u64>();
    busy * 10_000 // USER_HZ = 100
}

/// The machine's busy rate without traffic, microseconds of CPU per second, minus this
/// process's own: what background work adds to a window of the run.
fn idle_busy_rate(excluded: &[u32]) -> f64 {
    let (m0, g0, t0) = (machine_busy_micros(), own_micros(excluded), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let (m1, g1) = (machine_busy_micros(), own_micros(excluded));
    (m1.saturating_sub(m0).saturating_sub(g1.saturating_sub(g0))) as f64 / t0.elapsed().as_secs_f64()
}

/// CPU time of this generator and of the `excluded` processes, microseconds.
fn own_micros(excluded: &[u32]) -> u64 {
    std::iter::once(std::process::id())
        .chain(excluded.iter().copied())
        .filter_map(|p| procstat::cpu_micros(p).ok())
        .sum()
}

/// Shared between the sender and the receiver.
struct Shared {
    start: Instant,
    stop: AtomicBool,
    delivered: AtomicU64,
}

fn now_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

fn traffic(args: &Args) -> Result<(), String> {
    if args.size < payload::MIN_SIZE || args.size > 1400 {
        return Err(format!("--size must be in {}..=1400", payload::MIN_SIZE));
    }
    let (mut sessions, raw_peer) = setup(args)?;
    let idle_rate = if args.machine_cpu { Some(idle_busy_rate(&args.exclude_pids)) } else { None };
    // Refreshes for every TURN session; session i is refresher session i.
    let mut refresher = Refresher::new(intervals(args));
    for s in &sessions {
        if let (Some(c), Some(plan)) = (&s.turn, s.plan) {
            refresher.add(c, plan);
        }
    }
    let (control_tx, control_rx) = std::sync::mpsc::channel::<(usize, Vec<u8>)>();
    for s in &sessions {
        s.client.set_nonblocking(true).map_err(|e| e.to_string())?;
        if let Some(p) = &s.peer {
            p.set_nonblocking(true).map_err(|e| e.to_string())?;
        }
    }
    if let Some(p) = &raw_peer {
        p.set_nonblocking(true).map_err(|e| e.to_string())?;
    }
    let total = args.warmup + args.duration;
    let per_client_capacity = ((args.rate as f64 * (total + 1.0)) / args.clients as f64 * 1.2) as u64 + 1024;
    let shared = Arc::new(Shared { start: Instant::now(), stop: AtomicBool::new(false), delivered: AtomicU64::new(0) });
    let warmup_ns = (args.warmup * 1e9) as u64;
    let end_ns = (total * 1e9) as u64;

    // The receiver: peer sockets, and client sockets when echoing or when refresh answers come
    // back on them (every TURN session).
    let recv_fds: Vec<(Token, i32)> = {
        let mut v = Vec::new();
        for (i, s) in sessions.iter().enumerate() {
            if let Some(p) = &s.peer {
                v.push((Token(2 * i), p.as_raw_fd()));
            }
            if args.echo || s.turn.is_some() {
                v.push((Token(2 * i + 1), s.client.as_raw_fd()));
            }
        }
        if let Some(p) = &raw_peer {
            v.push((Token(usize::MAX - 1), p.as_raw_fd()));
        }
        v
    };
    let (echo, mode, clients, cpu) = (args.echo, args.mode, args.clients, args.cpu);
    let sh = shared.clone();
    let receiver = std::thread::spawn(move || {
        if let Some(c) = cpu {
            core_affinity::set_for_current(core_affinity::CoreId { id: c });
        }
        receive(&sh, &recv_fds, &control_tx, echo, mode, clients, per_client_capacity, warmup_ns, end_ns)
    });

    // The sender (this thread), paced in 200 µs ticks.
    let progress = (!args.quiet && !args.json).then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    });
    let mut batch = SendBatch::new();
    let mut seqs = vec![0u64; sessions.len()];
    let mut measured_from = vec![None::<u64>; sessions.len()];
    let mut sent = 0u64;
    let mut next_client = 0usize;
    let mut scratch = vec![0u8; 1500];
    let mut cpu_at_warmup = None;
    let mut switches_at_warmup = None;
    let mut machine_at_warmup = 0u64;
    let mut excluded_at_warmup = 0u64;
    let mut last_progress = Instant::now();
    loop {
        let t = now_ns(shared.start);
        if t >= end_ns {
            break;
        }
        if t >= warmup_ns && cpu_at_warmup.is_none() {
            switches_at_warmup = args.server_pid.map(procstat::context_switches);
            machine_at_warmup = machine_busy_micros();
            excluded_at_warmup = own_micros(&args.exclude_pids);
            cpu_at_warmup = Some((
                args.server_pid.map(procstat::cpu_micros),
                procstat::cpu_micros(std::process::id()),
                Instant::now(),
            ));
            for (i, m) in measured_from.iter_mut().enumerate() {
                *m = Some(seqs[i]);
            }
        }
        let due = (args.rate as u128 * t as u128 / 1_000_000_000) as u64;
        let mut todo = due.saturating_sub(sent);
        while todo > 0 {
            // Round-robin: up to one batch per client per pass.
            let i = next_client;
            next_client = (next_client + 1) % sessions.len();
            let fair = todo.div_ceil(sessions.len() as u64).max(1);
            let k = todo.min(fair.max(args.burst)).min(64);
            let s = &sessions[i];
            for _ in 0..k {
                let stamp = Stamp { client: i as u32, seq: seqs[i], sent_ns: now_ns(shared.start) };
                seqs[i] += 1;
                let size = args.size;
                batch.push(&s.relayed_or_server(args), |b| frame(mode, b, &mut scratch, size, stamp, s));
            }
            if let Err(e) = batch.flush(s.client.as_raw_fd()) {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(format!("send: {e}"));
                }
            }
            sent += k;
            todo -= k;
        }
        // Refreshes: answers the receiver picked out of the client sockets, then whatever is
        // due (a bounded number of sends per tick, none of them waiting for an answer).
        let now = Instant::now();
        while let Ok((i, d)) = control_rx.try_recv() {
            refresher.on_response(now, i, &d);
        }
        refresher.poll(now, 32, |i, d| {
            // Non-blocking; a datagram the kernel refuses is retransmitted later.
            let _ = sessions[i].client.send_to(d, args.server);
        });
        if let Some(pb) = &progress {
            if last_progress.elapsed() > Duration::from_millis(250) {
                last_progress = Instant::now();
                let secs = t as f64 / 1e9;
                let d = shared.delivered.load(Ordering::Relaxed);
                pb.set_message(format!(
                    "{secs:5.1}s  offered {:>8.0} pkt/s  delivered {:>8.0} pkt/s  loss so far {:.3}%",
                    sent as f64 / secs,
                    d as f64 / secs,
                    100.0 * (sent.saturating_sub(d)) as f64 / sent.max(1) as f64
                ));
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let machine_end = machine_busy_micros();
    let excluded_end = own_micros(&args.exclude_pids);
    let cpu_end = (args.server_pid.map(procstat::cpu_micros), procstat::cpu_micros(std::process::id()), Instant::now());
    let switches_end = args.server_pid.map(procstat::context_switches);
    if let Some(pb) = progress {
        pb.finish_and_clear();
    }
    // Let in-flight packets land, then stop the receiver.
    std::thread::sleep(Duration::from_millis(500));
    shared.stop.store(true, Ordering::Relaxed);
    let (stats, hist) = receiver.join().map_err(|_| "receiver panicked".to_string())?;
    let now = Instant::now();
    while let Ok((i, d)) = control_rx.try_recv() {
        refresher.on_response(now, i, &d);
    }
    for (i, s) in sessions.iter_mut().enumerate() {
        if let Some(c) = &mut s.turn {
            c.nonce = refresher.nonce(i).to_vec();
        }
    }
    delete_allocations(&mut sessions);

    let mut report = TrafficReport {
        contestant: args.contestant.clone(),
        scenario: args.scenario.clone(),
        server: args.server.to_string(),
        mode: format!("{:?}", args.mode).to_lowercase(),
        echo: args.echo,
        clients: args.clients,
        burst: args.burst,
        offered_pps: args.rate,
        size: args.size,
        duration_s: args.duration,
        ..Default::default()
    };
    report.set_refresh(refresher.stats());
    for (i, st) in stats.iter().enumerate() {
        let lo = measured_from[i].unwrap_or(0);
        let hi = seqs[i];
        report.sent += hi - lo;
        report.delivered += st.received_in(lo, hi);
        report.duplicates += st.duplicates;
        report.reordered += st.reordered;
    }
    report.lost = report.sent.saturating_sub(report.delivered);
    report.loss_pct = 100.0 * report.lost as f64 / report.sent.max(1) as f64;
    report.latency = Latency::of(&hist);
    report.relayed = if args.echo && args.mode != Mode::Raw { 2 * report.delivered } else { report.delivered };
    if args.echo && args.mode == Mode::Raw {
        report.relayed = 2 * report.delivered;
    }
    if let Some((s0, g0, t0)) = cpu_at_warmup {
        let wall = cpu_end.2.duration_since(t0).as_secs_f64();
        report.delivered_pps = report.delivered as f64 / wall;
        if let (Some(Ok(a)), Some(Ok(b))) = (s0, cpu_end.0) {
            report.server_cpu_us_per_packet = Some((b - a) as f64 / report.relayed.max(1) as f64);
            report.server_cpu_pct = Some(100.0 * (b - a) as f64 / 1e6 / wall);
        }
        if let (Some(Ok(a)), Some(Ok(b))) = (switches_at_warmup, switches_end) {
            report.server_switches_per_kpkt = Some(1000.0 * b.saturating_sub(a) as f64 / report.relayed.max(1) as f64);
        }
        if let Some(idle) = idle_rate {
            let own = excluded_end.saturating_sub(excluded_at_warmup) as f64;
            let machine = machine_end.saturating_sub(machine_at_warmup) as f64 - own - idle * wall;
            report.machine_cpu_us_per_packet = Some(machine.max(0.0) / report.relayed.max(1) as f64);
        }
        if let (Ok(a), Ok(b)) = (g0, cpu_end.1) {
            report.generator_cpu_us_per_packet = (b - a) as f64 / report.sent.max(1) as f64;
            report.generator_cpu_pct = 100.0 * (b - a) as f64 / 1e6 / wall;
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        print_traffic(&report);
    }
    Ok(())
}

/// Deletes every allocation (Refresh LIFETIME 0), so the next run's clients, which may get the
/// same ephemeral ports, do not meet a 437.
fn delete_allocations(sessions: &mut [Session]) {
    for s in sessions {
        if let Some(c) = &mut s.turn {
            let _ = s.client.set_nonblocking(false);
            let _ = c.transact_authenticated(Method::REFRESH, |w| w.u32(attr::LIFETIME, 0).map(drop));
        }
    }
}

impl Session {
    fn relayed_or_server(&self, args: &Args) -> SocketAddr {
        // Every client datagram goes to the server (TURN) or the forwarder (raw).
        let _ = self.relayed;
        args.server
    }
}

/// Writes one client datagram (ChannelData, Send indication or bare payload) into `b`.
fn frame(mode: Mode, b: &mut [u8], scratch: &mut [u8], size: usize, stamp: Stamp, s: &Session) -> usize {
    match mode {
        Mode::Channel => {
            b[0..2].copy_from_slice(&s.channel.to_be_bytes());
            b[2..4].copy_from_slice(&(size as u16).to_be_bytes());
            4 + payload::write(&mut b[4..], size, stamp)
        }
        Mode::Send => {
            payload::write(scratch, size, stamp);
            let tid = TransactionId([(stamp.seq & 0xFF) as u8; 12]);
            let Ok(mut w) = MessageWriter::new(b, Method::SEND, Class::Indication, tid) else { return 0 };
            let ok = w.xor_address(attr::XOR_PEER_ADDRESS, &s.peer_addr).is_ok()
                && w.bytes(attr::DATA, &scratch[..size]).is_ok();
            if ok {
                w.finish()
            } else {
                0
            }
        }
        _ => payload::write(b, size, stamp),
    }
}

/// The payload inside a datagram a client receives from the relay.
fn unframe(d: &[u8]) -> Option<&[u8]> {
    match d.first()? >> 6 {
        0b01 if d.len() >= 4 => {
            let len = u16::from_be_bytes([d[2], d[3]]) as usize;
            d.get(4..4 + len)
        }
        0b00 => Message::parse(d).ok().and_then(|m| m.get(attr::DATA)),
        _ => Some(d),
    }
}

#[allow(clippy::too_many_arguments)]
fn receive(
    shared: &Shared,
    fds: &[(Token, i32)],
    control: &std::sync::mpsc::Sender<(usize, Vec<u8>)>,
    echo: bool,
    mode: Mode,
    clients: usize,
    capacity: u64,
    warmup_ns: u64,
    end_ns: u64,
) -> (Vec<ClientStats>, hdrhistogram::Histogram<u64>) {
    let mut stats: Vec<ClientStats> = (0..clients).map(|_| ClientStats::new(capacity)).collect();
    let mut hist = latency_histogram();
    let mut poll = Poll::new().expect("epoll");
    for (tok, fd) in fds {
        poll.registry().register(&mut SourceFd(fd), *tok, Interest::READABLE).expect("register");
    }
    let mut events = Events::with_capacity(1024);
    let (mut rx, mut tx) = (RecvBatch::new(), SendBatch::new());
    let raw = mode == Mode::Raw;
    while !shared.stop.load(Ordering::Relaxed) {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(50)));
        for ev in events.iter() {
            let Token(t) = ev.token();
            let fd = fds.iter().find(|(tok, _)| tok.0 == t).map(|(_, fd)| *fd).unwrap_or(-1);
            let is_peer = t % 2 == 0 || t == usize::MAX - 1;
            while let Ok(n) = rx.recv(fd) {
                if n == 0 {
                    break;
                }
                let now = now_ns(shared.start);
                for i in 0..n {
                    let (d, from) = rx.get(i);
                    if is_peer && echo {
                        if let Some(from) = from {
                            tx.push(&from, |b| {
                                b[..d.len()].copy_from_slice(d);
                                d.len()
                            });
                        }
                        continue;
                    }
                    if !is_peer && !raw && refresh::is_response(d) {
                        // A refresh answer on client socket t / 2: the sender handles it.
                        let _ = control.send((t / 2, d.to_vec()));
                        continue;
                    }
                    let p = if is_peer || raw { Some(d) } else { unframe(d) };
                    let Some(stamp) = p.and_then(payload::read) else { continue };
                    let Some(st) = stats.get_mut(stamp.client as usize) else { continue };
                    if st.record(stamp.seq) {
                        shared.delivered.fetch_add(1, Ordering::Relaxed);
                        if stamp.sent_ns >= warmup_ns && stamp.sent_ns < end_ns {
                            let _ = hist.record(((now.saturating_sub(stamp.sent_ns)) / 1000).max(1));
                        }
                    }
                }
                if !tx.is_empty() {
                    let _ = tx.flush(fd);
                }
            }
        }
    }
    (stats, hist)
}

fn print_traffic(r: &TrafficReport) {
    println!(
        "server            {}  mode {}{}  clients {}  size {} B",
        r.server,
        r.mode,
        if r.echo { " echo" } else { "" },
        r.clients,
        r.size
    );
    println!("offered           {} pkt/s for {:.1} s", r.offered_pps, r.duration_s);
    println!("sent / delivered  {} / {}  ({:.0} pkt/s delivered)", r.sent, r.delivered, r.delivered_pps);
    println!(
        "loss              {} ({:.4}%)  duplicates {}  reordered {}",
        r.lost, r.loss_pct, r.duplicates, r.reordered
    );
    let l = &r.latency;
    println!(
        "latency (µs)      p50 {}  p99 {}  p99.9 {}  max {}{}",
        l.p50_us,
        l.p99_us,
        l.p999_us,
        l.max_us,
        if r.echo { "  (round trip)" } else { "  (one way)" }
    );
    if let (Some(us), Some(pct)) = (r.server_cpu_us_per_packet, r.server_cpu_pct) {
        println!("server CPU        {us:.2} µs per relayed packet ({pct:.0}% of a core)");
    }
    if let Some(s) = r.server_switches_per_kpkt {
        println!("server wake-ups   {s:.1} context switches per 1,000 relayed packets");
    }
    println!(
        "generator CPU     {:.2} µs per sent packet ({:.0}% of a core)",
        r.generator_cpu_us_per_packet, r.generator_cpu_pct
    );
    if r.mode != "raw" {
        let f = &r.refreshes;
        println!(
            "refreshes         allocation {}  permission {}  channel {}  failures {}{}  stale nonces {}",
            f.allocation,
            f.permission,
            f.channel,
            r.refresh_failures,
            if r.refresh_failures > 0 { format!(" {:?}", r.refresh_failure_reasons) } else { String::new() },
            r.stale_nonces
        );
    }
}

#[derive(Serialize)]
struct AllocsReport {
    contestant: String,
    server: String,
    attempted: usize,
    succeeded: usize,
    failures: std::collections::BTreeMap<String, usize>,
    allocs_per_s: f64,
    latency: Latency,
    server_cpu_us_per_alloc: Option<f64>,
    deleted: bool,
}

/// Authenticated Allocate throughput: each of `--clients` threads makes allocations from fresh
/// sockets (401 round, authenticated Allocate timed, optional Refresh 0).
fn allocs(args: &Args) -> Result<(), String> {
    let threads = args.clients.clamp(1, 256);
    let per = args.count.div_ceil(threads);
    let cpu0 = args.server_pid.map(procstat::cpu_micros);
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (server, user, pass, realm, delete, users) =
                (args.server, args.user.clone(), args.password.clone(), args.realm.clone(), args.delete, args.users);
            std::thread::spawn(move || {
                let mut hist = latency_histogram();
                let mut failures = std::collections::BTreeMap::<String, usize>::new();
                let mut ok = 0usize;
                for _ in 0..per {
                    let name =
                        if users > 1 { format!("{user}{}", rand::random::<u64>() % users) } else { user.clone() };
                    let mut c = new_client(server, &name, &pass, realm.as_deref());
                    if c.try_learn_nonce().is_err() {
                        *failures.entry("no 401".into()).or_default() += 1;
                        continue;
                    }
                    let req = c.signed_request(Method::ALLOCATE, TransactionId(rand::random()), |w| {
                        w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop)
                    });
                    let t = Instant::now();
                    match c.transact(&req) {
                        Some(r) => match r.code() {
                            None => {
                                let _ = hist.record((t.elapsed().as_micros() as u64).max(1));
                                ok += 1;
                                if delete {
                                    let _ = c.transact_authenticated(Method::REFRESH, |w| {
                                        w.u32(attr::LIFETIME, 0).map(drop)
                                    });
                                }
                            }
                            Some(code) => *failures.entry(code.to_string()).or_default() += 1,
                        },
                        None => *failures.entry("timeout".into()).or_default() += 1,
                    }
                }
                (ok, failures, hist)
            })
        })
        .collect();
    let mut report = AllocsReport {
        contestant: args.contestant.clone(),
        server: args.server.to_string(),
        attempted: per * threads,
        succeeded: 0,
        failures: Default::default(),
        allocs_per_s: 0.0,
        latency: Latency::default(),
        server_cpu_us_per_alloc: None,
        deleted: args.delete,
    };
    let mut hist = latency_histogram();
    for h in handles {
        let (ok, f, hh) = h.join().map_err(|_| "allocs thread panicked")?;
        report.succeeded += ok;
        for (k, v) in f {
            *report.failures.entry(k).or_default() += v;
        }
        let _ = hist.add(&hh);
    }
    let wall = t0.elapsed().as_secs_f64();
    report.allocs_per_s = report.succeeded as f64 / wall;
    report.latency = Latency::of(&hist);
    if let (Some(Ok(a)), Some(pid)) = (cpu0, args.server_pid) {
        if let Ok(b) = procstat::cpu_micros(pid) {
            report.server_cpu_us_per_alloc = Some((b - a) as f64 / report.succeeded.max(1) as f64);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        println!(
            "allocations       {} of {} in {wall:.2} s: {:.0}/s{}",
            report.succeeded,
            report.attempted,
            report.allocs_per_s,
            if args.delete { " (each deleted)" } else { "" }
        );
        println!("failures          {:?}", report.failures);
        let l = report.latency;
        println!(
            "Allocate latency  p50 {} µs  p99 {} µs  p99.9 {} µs  max {} µs",
            l.p50_us, l.p99_us, l.p999_us, l.max_us
        );
        if let Some(us) = report.server_cpu_us_per_alloc {
            println!("server CPU        {us:.1} µs per allocation");
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct HoldReport {
    contestant: String,
    server: String,
    allocations: usize,
    /// Each allocation has a permission and a channel binding (`--with-channel`).
    with_channel: bool,
    rss_before: u64,
    rss_after: u64,
    user_bytes_per_allocation: f64,
    kernel_bytes_per_allocation: f64,
    /// Allocation refreshes made while allocating (a long --count outlives half a LIFETIME).
    refreshes: u64,
    /// Of those, the ones that failed.
    refresh_failures: u64,
}

/// Makes `--count` allocations, keeps them idle, and reports the server's resident memory and
/// the kernel's UDP socket memory per allocation. Allocations made early are refreshed (at half
/// their granted LIFETIME, or every `--allocation-refresh` seconds) while later ones are still
/// being made; no data flows, so the blocking Refresh cannot miss anything.
fn hold(args: &Args) -> Result<(), String> {
    use std::cmp::Reverse;
    let pid = args.server_pid.ok_or("--mode hold needs --server-pid")?;
    let rss0 = procstat::rss_bytes(pid).map_err(|e| e.to_string())?;
    let k0 = procstat::kernel_udp_bytes().unwrap_or(0);
    let interval = |lifetime: Option<u32>| match args.allocation_refresh {
        Some(s) => Duration::from_secs_f64(s),
        None => Duration::from_millis(u64::from(lifetime.unwrap_or(600)) * 500).max(Duration::from_millis(100)),
    };
    let mut held: Vec<Client> = Vec::with_capacity(args.count);
    let mut due = std::collections::BinaryHeap::<Reverse<(Instant, usize)>>::new();
    let (mut refreshes, mut refresh_failures) = (0u64, 0u64);
    for i in 0..args.count {
        let mut c = new_client(args.server, &args.user, &args.password, args.realm.as_deref());
        c.try_allocate().map_err(|e| format!("allocation {i}: {e}"))?;
        if args.with_channel {
            c.try_create_permission(&[args.peer]).map_err(|e| format!("allocation {i}: {e}"))?;
            c.try_channel_bind(0x4000, args.peer).map_err(|e| format!("allocation {i}: {e}"))?;
        }
        due.push(Reverse((Instant::now() + interval(c.lifetime), i)));
        held.push(c);
        while let Some(&Reverse((at, j))) = due.peek() {
            if at > Instant::now() {
                break;
            }
            due.pop();
            let c = &mut held[j];
            let ask = c.lifetime.unwrap_or(600);
            refreshes += 1;
            if c.try_refresh(ask).is_err() {
                refresh_failures += 1;
            }
            due.push(Reverse((Instant::now() + interval(c.lifetime), j)));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss1 = procstat::rss_bytes(pid).map_err(|e| e.to_string())?;
    let k1 = procstat::kernel_udp_bytes().unwrap_or(0);
    let n = args.count.max(1) as f64;
    // The generator's own client sockets are in the kernel figure too: half the sockets are ours.
    let report = HoldReport {
        contestant: args.contestant.clone(),
        server: args.server.to_string(),
        allocations: args.count,
        with_channel: args.with_channel,
        rss_before: rss0,
        rss_after: rss1,
        user_bytes_per_allocation: (rss1 as f64 - rss0 as f64) / n,
        kernel_bytes_per_allocation: (k1 as f64 - k0 as f64) / n / 2.0,
        refreshes,
        refresh_failures,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        println!(
            "{} idle allocations: server RSS {} -> {} bytes, {:.0} B/allocation user space, ~{:.0} B/allocation kernel",
            report.allocations, rss0, rss1, report.user_bytes_per_allocation, report.kernel_bytes_per_allocation
        );
    }
    drop(held);
    Ok(())
}

/// A garbage flood: datagrams the relay must drop and count, never answer with more than a
/// rate-limited 401, never crash on.
fn garbage(args: &Args) -> Result<(), String> {
    use rand::RngCore;
    let socks: Vec<UdpSocket> = (0..args.clients.max(1))
        .map(|_| UdpSocket::bind(SocketAddr::new(args.server.ip(), 0)).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut rng = rand::thread_rng();
    let start = Instant::now();
    let total = (args.rate as f64 * args.duration) as u64;
    let mut buf = [0u8; 600];
    for i in 0..total {
        let len = (rng.next_u32() % 600) as usize;
        rng.fill_bytes(&mut buf[..len]);
        match i % 4 {
            1 if len >= 20 => {
                buf[0] &= 0x3F;
                buf[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
            }
            2 if len >= 4 => buf[0] = 0x40 | (buf[0] & 0x0F),
            _ => {}
        }
        let _ = socks[(i % socks.len() as u64) as usize].send_to(&buf[..len], args.server);
        if i % 256 == 0 {
            let due = Duration::from_secs_f64(i as f64 / args.rate.max(1) as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let report = serde_json::json!({ "contestant": args.contestant, "garbage_sent": total, "seconds": start.elapsed().as_secs_f64() });
    println!("{report}");
    Ok(())
}
