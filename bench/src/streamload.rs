//! One-way ChannelData load over TURN-over-TCP or TLS (RFC 8656 §3.1, §12.5), for
//! `uturn-load --transport tcp|tls`: `clients` connections, each with an allocation and a channel
//! bound to one UDP peer socket, send `size`-byte ChannelData at `rate` packets/s in all, round
//! robin, for `warmup + duration` seconds; the peer counts what arrives by sequence number. Given
//! the server's PID, the report has its CPU microseconds per relayed packet over the measured
//! window and its memory.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::stream::StreamClient;
use crate::procstat;

/// What to run.
#[derive(Debug, Clone)]
pub struct StreamLoad {
    /// The relay's TCP or TLS listen address.
    pub server: SocketAddr,
    /// TLS (else plain TCP).
    pub tls: bool,
    /// Credentials.
    pub user: String,
    /// Credentials.
    pub password: String,
    /// Connections (each its own allocation).
    pub clients: usize,
    /// Offered ChannelData packets/s over all connections.
    pub rate: u64,
    /// Payload bytes (at least 8: a sequence number).
    pub size: usize,
    /// Seconds before measuring.
    pub warmup: f64,
    /// Seconds measured.
    pub duration: f64,
    /// The relay's PID, for its CPU time and memory.
    pub server_pid: Option<u32>,
}

/// The result.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    /// "tcp" or "tls".
    pub transport: &'static str,
    /// Connections.
    pub clients: usize,
    /// Offered packets/s.
    pub offered_pps: u64,
    /// Payload bytes.
    pub size: usize,
    /// Packets sent in the measured window.
    pub sent: u64,
    /// Of those, received by the peer.
    pub delivered: u64,
    /// Delivered packets/s.
    pub delivered_pps: f64,
    /// Lost, percent of sent.
    pub loss_pct: f64,
    /// Server CPU microseconds per delivered packet (with `server_pid`).
    pub server_cpu_us_per_pkt: Option<f64>,
    /// Server resident memory at the end, bytes (with `server_pid`).
    pub server_rss_bytes: Option<u64>,
}

/// Runs it. Errors: a connection, Allocate or ChannelBind failed, or a write failed.
pub fn run(cfg: &StreamLoad) -> Result<StreamReport, String> {
    let peer = UdpSocket::bind(SocketAddr::new(cfg.server.ip(), 0)).map_err(|e| e.to_string())?;
    peer.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
    let peer_addr = peer.local_addr().map_err(|e| e.to_string())?;
    let mut clients = Vec::with_capacity(cfg.clients);
    for i in 0..cfg.clients {
        let mut c = StreamClient::connect(cfg.server, cfg.tls, &cfg.user, &cfg.password, "")
            .map_err(|e| format!("connection {i}: {e}"))?;
        c.allocate().map_err(|e| format!("connection {i}: {e}"))?;
        c.bind_channel(0x4000, peer_addr).map_err(|e| format!("connection {i}: {e}"))?;
        clients.push(c);
    }
    // Sequence numbers at or above `first_measured` count.
    let first_measured = Arc::new(AtomicU64::new(u64::MAX));
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let (first, delivered, stop) = (first_measured.clone(), delivered.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = peer.recv_from(&mut buf) {
                    if n >= 8 && u64::from_be_bytes(buf[..8].try_into().unwrap()) >= first.load(Ordering::Relaxed) {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let size = cfg.size.max(8);
    let mut payload = vec![0x5au8; size];
    let interval = Duration::from_secs_f64(1.0 / cfg.rate.max(1) as f64);
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(cfg.warmup);
    let end = measure_from + Duration::from_secs_f64(cfg.duration);
    let (mut seq, mut next, mut sent) = (0u64, start, 0u64);
    let mut cpu_start = None;
    while Instant::now() < end {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_micros(200)));
            continue;
        }
        if cpu_start.is_none() && now >= measure_from {
            first_measured.store(seq, Ordering::Relaxed);
            cpu_start = Some((now, cfg.server_pid.and_then(|p| procstat::cpu_micros(p).ok())));
        }
        payload[..8].copy_from_slice(&seq.to_be_bytes());
        let c = &mut clients[(seq % cfg.clients as u64) as usize];
        c.send_channel_data(0x4000, &payload).map_err(|e| format!("write: {e}"))?;
        if cpu_start.is_some() {
            sent += 1;
        }
        seq += 1;
        next += interval;
    }
    let cpu_end = cfg.server_pid.and_then(|p| procstat::cpu_micros(p).ok());
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let _ = counter.join();
    let delivered = delivered.load(Ordering::Relaxed);
    let elapsed = cpu_start.map_or(cfg.duration, |(t, _)| t.elapsed().as_secs_f64().min(cfg.duration));
    let cpu = match (cpu_start.and_then(|(_, c)| c), cpu_end) {
        (Some(a), Some(b)) if delivered > 0 => Some((b - a) as f64 / delivered as f64),
        _ => None,
    };
    Ok(StreamReport {
        transport: if cfg.tls { "tls" } else { "tcp" },
        clients: cfg.clients,
        offered_pps: cfg.rate,
        size,
        sent,
        delivered,
        delivered_pps: delivered as f64 / elapsed.max(1e-9),
        loss_pct: if sent == 0 { 0.0 } else { 100.0 * sent.saturating_sub(delivered) as f64 / sent as f64 },
        server_cpu_us_per_pkt: cpu,
        server_rss_bytes: cfg.server_pid.and_then(|p| procstat::rss_bytes(p).ok()),
    })
}
