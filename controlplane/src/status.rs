//! The live status page of the admin endpoint: `GET /` (HTML), `/status.css`, `/status.js`
//! (embedded in the binary, no external assets) and `GET /status.json`, the data the page
//! polls: the node, live counts, per-worker relayed packets and bits per second over the last
//! [`RING_LEN`] seconds, and refusals and drops by reason. The page also reads `GET /sessions`
//! and `GET /timeline` ([`crate::timeline`]).
//!
//! The numbers come from the same sources as `/metrics` (each worker's published
//! [`WorkerMetrics`], the control plane's [`ControlMetrics`]), so the page and a scrape taken at
//! the same moment agree. A sampler thread reads the workers' relayed counters once per
//! [`SAMPLE_INTERVAL`] into a ring of [`RING_LEN`] samples (a few KiB per worker).
//!
//! Authentication: the three static files hold no data and are served without the token (a
//! browser's navigation cannot send an `Authorization` header), still only to a loopback Host
//! when no token is set. Everything with data (`/status.json`, `/sessions`, `/timeline`) needs
//! the bearer token when one is set: the page takes it from the URL fragment
//! (`http://HOST:PORT/#token=T`, never sent to the server nor logged), keeps it in the tab's
//! `sessionStorage`, removes it from the address bar, and sends it as `Authorization: Bearer`
//! on its requests (docs/operations.md).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use serde_json::{json, Value};
use uturn_dataplane::{WorkerMetrics, WorkerSample};

use crate::metrics::ControlMetrics;

/// How often the sampler reads the workers' counters.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Samples kept: five minutes at one a second.
pub const RING_LEN: usize = 300;

/// The page and its assets: path, content type, body.
const ASSETS: [(&str, &str, &str); 3] = [
    ("/", "text/html; charset=utf-8", include_str!("status/index.html")),
    ("/status.css", "text/css; charset=utf-8", include_str!("status/status.css")),
    ("/status.js", "text/javascript; charset=utf-8", include_str!("status/status.js")),
];

/// The static file at `path` (content type and body), or `None`.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    ASSETS.iter().find(|(p, _, _)| *p == path || (*p == "/" && path == "/index.html")).map(|(_, t, b)| (*t, *b))
}

/// What the page says about the node (fixed at start).
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    /// I/O backend (`uring` or `epoll`).
    pub backend: &'static str,
    /// Worker threads.
    pub workers: usize,
    /// The XDP fast path: `off`, or its mode and interfaces.
    pub xdp: String,
    /// Listen addresses with their transports (`udp://…`, `tcp://…`, `tls://…`).
    pub listeners: Vec<String>,
    /// Relay IPs.
    pub relay_ips: Vec<String>,
    /// Relay port range, inclusive.
    pub port_range: (u16, u16),
    /// The realm.
    pub realm: String,
}

/// One sample: when (since start), and per worker the relayed totals: packets to peer, packets
/// to client, bytes to peer, bytes to client.
#[derive(Debug, Clone)]
struct Point {
    at: Duration,
    workers: Vec<[u64; 4]>,
}

/// What the status page reads: shared by the admin endpoint's thread and the sampler.
#[derive(Debug)]
pub struct StatusBoard {
    node: NodeInfo,
    started: Instant,
    workers: Vec<Arc<WorkerMetrics>>,
    control: Arc<ControlMetrics>,
    ring: Mutex<VecDeque<Point>>,
}

/// The running sampler; stops (and joins) on drop.
pub struct Sampler {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn totals(s: &WorkerSample) -> [u64; 4] {
    let c = &s.counters;
    [c.relayed_to_peer, c.relayed_to_client, c.bytes_to_peer, c.bytes_to_client]
}

impl StatusBoard {
    /// A board over `workers`' and `control`'s metrics, started at `started`.
    pub fn new(
        node: NodeInfo,
        started: Instant,
        workers: Vec<Arc<WorkerMetrics>>,
        control: Arc<ControlMetrics>,
    ) -> Arc<Self> {
        Arc::new(StatusBoard { node, started, workers, control, ring: Mutex::new(VecDeque::with_capacity(RING_LEN)) })
    }

    /// Starts the thread that samples once per [`SAMPLE_INTERVAL`]. Errors: the thread could
    /// not be made.
    pub fn start_sampler(self: &Arc<Self>) -> std::io::Result<Sampler> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let board = self.clone();
        let thread = std::thread::Builder::new().name("uturn-status".into()).spawn(move || loop {
            board.sample();
            match stopped.recv_timeout(SAMPLE_INTERVAL) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        })?;
        Ok(Sampler { stop: Some(stop), thread: Some(thread) })
    }

    /// Takes one sample into the ring (the oldest leaves past [`RING_LEN`]).
    pub fn sample(&self) {
        let point =
            Point { at: self.started.elapsed(), workers: self.workers.iter().map(|w| totals(&w.sample())).collect() };
        if let Ok(mut ring) = self.ring.lock() {
            if ring.len() == RING_LEN {
                ring.pop_front();
            }
            ring.push_back(point);
        }
    }

    /// The JSON of `GET /status.json`. Counts are read now (the same values a `/metrics` scrape
    /// shows); `series` holds per worker the rates between consecutive samples, oldest first,
    /// `t` their times in seconds before now.
    pub fn to_json(&self) -> String {
        let samples: Vec<WorkerSample> = self.workers.iter().map(|w| w.sample()).collect();
        let sum = |f: &dyn Fn(&WorkerSample) -> u64| samples.iter().map(f).sum::<u64>();
        let c = &self.control;
        let workers: Vec<Value> = samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let [pp, pc, bp, bc] = totals(s);
                json!({
                    "worker": i, "allocations": s.allocations, "permissions": s.permissions,
                    "channels": s.channels, "connections": s.connections,
                    "packets_to_peer": pp, "packets_to_client": pc, "bytes_to_peer": bp, "bytes_to_client": bc,
                })
            })
            .collect();
        let mut drops: Vec<(&str, u64)> = Vec::new();
        for s in &samples {
            for (reason, n) in crate::metrics::drop_reasons(s) {
                match drops.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, v)) => *v += n,
                    None => drops.push((reason, n)),
                }
            }
        }
        drops.push(("hold_full", sum(&|s| s.holds.dropped)));
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "node": {
                "backend": self.node.backend,
                "workers": self.node.workers,
                "xdp": self.node.xdp,
                "listeners": self.node.listeners,
                "relay_ips": self.node.relay_ips,
                "port_range": [self.node.port_range.0, self.node.port_range.1],
                "realm": self.node.realm,
                "draining": c.draining.load(Ordering::Relaxed),
            },
            "totals": {
                "allocations": sum(&|s| s.allocations),
                "permissions": sum(&|s| s.permissions),
                "channels": sum(&|s| s.channels),
                "connections": sum(&|s| s.connections),
                "packets_to_peer": sum(&|s| s.counters.relayed_to_peer),
                "packets_to_client": sum(&|s| s.counters.relayed_to_client),
                "bytes_to_peer": sum(&|s| s.counters.bytes_to_peer),
                "bytes_to_client": sum(&|s| s.counters.bytes_to_client),
                "allocations_granted": c.allocations_granted(),
                "allocations_expired": sum(&|s| s.counters.allocations_expired),
            },
            "workers": workers,
            "series": self.series(),
            "refusals": {
                "allocate": c.refused_by_code().into_iter().collect::<serde_json::Map<_, _>>(),
                "auth": c.auth_outcomes().into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "capacity": sum(&|s| s.counters.capacity_refusals),
                "connections_refused": sum(&|s| s.streams.refused),
            },
            "drops": drops.into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        })
        .to_string()
    }

    fn series(&self) -> Value {
        let ring: Vec<Point> = self.ring.lock().map(|r| r.iter().cloned().collect()).unwrap_or_default();
        let now = self.started.elapsed();
        let t: Vec<f64> =
            ring.iter().skip(1).map(|p| -(now.saturating_sub(p.at).as_secs_f64() * 10.0).round() / 10.0).collect();
        let workers: Vec<Value> = (0..self.workers.len())
            .map(|w| {
                let mut rates: [Vec<f64>; 4] = Default::default();
                for pair in ring.windows(2) {
                    let dt = pair[1].at.saturating_sub(pair[0].at).as_secs_f64().max(1e-3);
                    let (a, b) = (pair[0].workers.get(w), pair[1].workers.get(w));
                    for (k, rate) in rates.iter_mut().enumerate() {
                        let d = match (a, b) {
                            (Some(a), Some(b)) => b[k].saturating_sub(a[k]) as f64,
                            _ => 0.0,
                        };
                        // Packets per second; bits per second for the byte counters.
                        let scale = if k >= 2 { 8.0 } else { 1.0 };
                        rate.push((d * scale / dt).round());
                    }
                }
                let [pps_to_peer, pps_to_client, bps_to_peer, bps_to_client] = rates;
                json!({ "pps_to_peer": pps_to_peer, "pps_to_client": pps_to_client,
                        "bps_to_peer": bps_to_peer, "bps_to_client": bps_to_client })
            })
            .collect();
        json!({ "interval_s": SAMPLE_INTERVAL.as_secs_f64(), "t": t, "workers": workers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_served_and_self_contained() {
        let (ct, html) = asset("/").unwrap();
        assert!(ct.starts_with("text/html"));
        assert!(html.contains("/status.js") && html.contains("/status.css"));
        assert!(asset("/status.js").is_some() && asset("/nope").is_none());
        for (_, _, body) in ASSETS {
            // No external assets: nothing fetched from another origin.
            for external in ["src=\"http", "href=\"http", "url(", "@import", "fetch(\"http", "src=\"//", "href=\"//"] {
                assert!(!body.contains(external), "{external}");
            }
        }
    }

    #[test]
    fn the_ring_is_bounded_and_rates_come_from_consecutive_samples() {
        let board = StatusBoard::new(NodeInfo::default(), Instant::now(), vec![Arc::default()], Arc::default());
        for _ in 0..RING_LEN + 5 {
            board.sample();
        }
        assert_eq!(board.ring.lock().unwrap().len(), RING_LEN);
        let v: Value = serde_json::from_str(&board.to_json()).unwrap();
        assert_eq!(v["series"]["workers"][0]["pps_to_peer"].as_array().unwrap().len(), RING_LEN - 1);
        assert_eq!(v["totals"]["allocations"], 0);
        assert_eq!(v["drops"]["no_permission"], 0);
    }
}
