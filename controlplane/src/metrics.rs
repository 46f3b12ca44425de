//! The Prometheus endpoint (`--metrics-listen IP:PORT`, off by default): `GET /metrics` in the
//! text exposition format, every name prefixed `uturn_`.
//!
//! Sources, none of them locked on the packet path:
//! - each worker's [`WorkerMetrics`], which the worker publishes a few times a second;
//! - the control plane's [`ControlMetrics`] (atomics the control thread adds to);
//! - the kernel's per-socket receive-queue drop counts (what `SO_RXQ_OVFL` reports), read from
//!   `/proc/self/net/udp` and `udp6` for this process's sockets, at most once per
//!   [`DROP_COUNTS_INTERVAL`] (a reading costs O(open descriptors)).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::http::Method;
use tracing::info;
use uturn_dataplane::{WorkerMetrics, WorkerSample};

use crate::http_endpoint::{host_is_loopback, HttpServer, Request, Response};

/// Allocate error codes counted one by one (others count as `other`).
const CODES: [u16; 14] = [300, 400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 486, 500, 508];
/// Upper bounds of the Allocate latency histogram's buckets, seconds.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// Authentication outcomes (RFC 8489 §9.2.4), as `uturn_auth_total{outcome}` labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// MESSAGE-INTEGRITY verified with a known user's key.
    Ok,
    /// No integrity attribute: answered 401 with a nonce (the control plane's share; workers
    /// answer most first requests themselves, counted in `requests_answered`).
    Challenged,
    /// Unknown user, wrong password, expired REST credential or realm not served: 401.
    Rejected,
    /// A nonce that is not (or no longer) valid: 438.
    StaleNonce,
    /// Credentials differ from the allocation's: 441.
    WrongCredentials,
    /// The user store could not answer: 500.
    StoreUnavailable,
    /// USERNAME, REALM or NONCE missing, or a PASSWORD-ALGORITHM mismatch: 400.
    BadRequest,
}

const OUTCOMES: [(AuthOutcome, &str); 7] = [
    (AuthOutcome::Ok, "ok"),
    (AuthOutcome::Challenged, "challenged"),
    (AuthOutcome::Rejected, "rejected"),
    (AuthOutcome::StaleNonce, "stale_nonce"),
    (AuthOutcome::WrongCredentials, "wrong_credentials"),
    (AuthOutcome::StoreUnavailable, "store_unavailable"),
    (AuthOutcome::BadRequest, "bad_request"),
];

/// The control plane's metrics: written by the control thread, read by the exporter.
#[derive(Debug)]
pub struct ControlMetrics {
    allocations_granted: AtomicU64,
    refused: [AtomicU64; CODES.len() + 1],
    auth: [AtomicU64; OUTCOMES.len()],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
    parked: AtomicU64,
    /// Store answers in the credential cache, and their bytes.
    user_cache: [AtomicU64; 2],
    /// RFC 6062 peer connections the TCP relay refused, by cap (written by its thread).
    pub peer_refusals: Arc<crate::tcp_relay::RelayCounters>,
    /// True while the relay drains (new Allocates refused).
    pub draining: AtomicBool,
    /// Usage records written, dropped and pending (written by the usage writer).
    pub usage: Arc<crate::usage::UsageCounters>,
    /// The fleet quota thread's counters, once it runs (`fleet-redis` with `user-quota`).
    pub fleet_quota: std::sync::OnceLock<Arc<crate::fleet::quota::QuotaMetrics>>,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        ControlMetrics {
            allocations_granted: AtomicU64::new(0),
            refused: std::array::from_fn(|_| AtomicU64::new(0)),
            auth: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_count: AtomicU64::new(0),
            latency_sum_ns: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            user_cache: std::array::from_fn(|_| AtomicU64::new(0)),
            peer_refusals: Arc::default(),
            draining: AtomicBool::new(false),
            usage: Arc::default(),
            fleet_quota: std::sync::OnceLock::new(),
        }
    }
}

impl ControlMetrics {
    /// An Allocate was granted.
    pub fn granted(&self) {
        self.allocations_granted.fetch_add(1, Ordering::Relaxed);
    }

    /// An Allocate was answered with error `code`.
    pub fn refused(&self, code: u16) {
        let i = CODES.iter().position(|c| *c == code).unwrap_or(CODES.len());
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// One authentication ended with `outcome`.
    pub fn auth(&self, outcome: AuthOutcome) {
        let i = OUTCOMES.iter().position(|(o, _)| *o == outcome).unwrap_or(0);
        self.auth[i].fetch_add(1, Ordering::Relaxed);
    }

    /// An Allocate was answered `latency` after its worker received it.
    pub fn allocate_latency(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        for (b, le) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
            if secs <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns.fetch_add(latency.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The credential cache now holds `entries` store answers taking `bytes` bytes.
    pub fn set_user_cache(&self, entries: usize, bytes: usize) {
        self.user_cache[0].store(entries as u64, Ordering::Relaxed);
        self.user_cache[1].store(bytes as u64, Ordering::Relaxed);
    }

    /// Requests now parked for a store lookup.
    pub fn set_parked(&self, n: usize) {
        self.parked.store(n as u64, Ordering::Relaxed);
    }

    /// Allocates answered so far (the latency histogram's count).
    pub fn allocates_answered(&self) -> u64 {
        self.latency_count.load(Ordering::Relaxed)
    }

    // The status page's readings (crate::status), the values /metrics shows.

    /// Allocates granted so far (`allocations_granted_total`).
    pub fn allocations_granted(&self) -> u64 {
        self.allocations_granted.load(Ordering::Relaxed)
    }

    /// Allocates refused, by STUN error code (`other` last), as `allocations_refused_total`.
    pub fn refused_by_code(&self) -> Vec<(String, serde_json::Value)> {
        let codes = CODES.iter().map(|c| c.to_string()).chain(std::iter::once("other".to_string()));
        codes.zip(&self.refused).map(|(c, v)| (c, v.load(Ordering::Relaxed).into())).collect()
    }

    /// Authentication outcomes, as `auth_total` labels them.
    pub fn auth_outcomes(&self) -> Vec<(&'static str, u64)> {
        OUTCOMES.iter().zip(&self.auth).map(|((_, l), v)| (*l, v.load(Ordering::Relaxed))).collect()
    }
}

/// Everything a scrape reads.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Each worker's published metrics, by worker index.
    pub workers: Vec<Arc<WorkerMetrics>>,
    /// The control plane's.
    pub control: Arc<ControlMetrics>,
    /// The I/O backend in use (`uring` or `epoll`).
    pub backend: &'static str,
    /// Listen ports, to tell listener sockets from relay sockets in the kernel's drop counts.
    pub listen_ports: Vec<u16>,
    /// The XDP program's verdict counters, when the fast path runs.
    pub xdp: Option<Arc<uturn_dataplane::XdpVerdicts>>,
}

/// A running metrics endpoint.
pub struct MetricsExporter {
    _server: HttpServer,
}

impl MetricsExporter {
    /// Serves `GET /metrics` on `listener` (bound to `metrics-listen`, or handed over by the
    /// previous process) from `sources`, through [`crate::http_endpoint`]'s bounds. On a
    /// loopback listener only requests whose Host is loopback with its port are answered (403
    /// otherwise: DNS rebinding). The kernel's drop counts are read at most once per
    /// [`DROP_COUNTS_INTERVAL`].
    pub fn start(listener: TcpListener, sources: Sources) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let drops = DropCounts::new(DROP_COUNTS_INTERVAL);
        let handler = move |r: &Request| {
            let text = "text/plain; charset=utf-8";
            if addr.ip().is_loopback() && !host_is_loopback(&r.headers, addr.port()) {
                let body = format!("Host must be a loopback address or localhost with port {}\n", addr.port());
                return Response { status: 403, content_type: text, body };
            }
            if r.path == "/metrics" && r.method == Method::GET {
                let body = render_with(&sources, drops.get(&sources.listen_ports));
                Response { status: 200, content_type: "text/plain; version=0.0.4", body }
            } else {
                Response { status: 404, content_type: text, body: "not found\n".into() }
            }
        };
        let server = HttpServer::start("uturn-metrics", listener, Arc::new(handler))?;
        info!(%addr, "metrics endpoint listening on /metrics");
        Ok(MetricsExporter { _server: server })
    }
}

/// How long one reading of the kernel's drop counts serves scrapes: each reading costs a
/// readlink per open descriptor and a parse of `/proc/self/net/udp{,6}`, O(allocations).
pub const DROP_COUNTS_INTERVAL: Duration = Duration::from_secs(5);

/// Drops at (listener, relay) sockets; `None` where /proc cannot be read.
type RxqDrops = Option<(u64, u64)>;

/// The kernel's receive-queue drop counts, read at most once per interval.
#[derive(Debug)]
struct DropCounts {
    interval: Duration,
    /// When the last reading was taken, and what it found.
    last: Mutex<Option<(Instant, RxqDrops)>>,
    /// Readings taken (the test counts them).
    readings: AtomicU64,
}

impl DropCounts {
    fn new(interval: Duration) -> Self {
        DropCounts { interval, last: Mutex::new(None), readings: AtomicU64::new(0) }
    }

    /// The counts, read again when the last reading is older than the interval.
    fn get(&self, listen_ports: &[u16]) -> Option<(u64, u64)> {
        let Ok(mut last) = self.last.lock() else { return receive_queue_drops(listen_ports) };
        if let Some((at, counts)) = *last {
            if at.elapsed() < self.interval {
                return counts;
            }
        }
        let counts = receive_queue_drops(listen_ports);
        self.readings.fetch_add(1, Ordering::Relaxed);
        *last = Some((Instant::now(), counts));
        counts
    }
}

/// One metric family: HELP and TYPE lines, then `samples` (label set, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: impl IntoIterator<Item = (String, f64)>) {
    let _ = writeln!(out, "# HELP uturn_{name} {help}\n# TYPE uturn_{name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "uturn_{name} {v}");
        } else {
            let _ = writeln!(out, "uturn_{name}{{{labels}}} {v}");
        }
    }
}

/// The exposition text for one scrape.
pub fn render(src: &Sources) -> String {
    render_with(src, receive_queue_drops(&src.listen_ports))
}

/// The exposition text with the kernel's drop counts `rxq` (listeners, relays) already read.
fn render_with(src: &Sources, rxq: Option<(u64, u64)>) -> String {
    let samples: Vec<WorkerSample> = src.workers.iter().map(|w| w.sample()).collect();
    render_samples(src, &samples, rxq)
}

/// Drop reasons: label and the worker counter (or extra) each comes from.
pub fn drop_reasons(s: &WorkerSample) -> [(&'static str, u64); 10] {
    let c = &s.counters;
    [
        ("no_permission", c.no_permission),
        ("no_allocation", c.no_allocation),
        ("unbound_channel", c.unbound_channel),
        ("bandwidth_cap", c.bandwidth_drops),
        ("malformed_stun", c.malformed_stun),
        ("malformed_channel_data", c.malformed_channel_data),
        ("not_turn", c.not_turn),
        ("rate_limited", c.rate_limited),
        ("dropped_indications", c.dropped_indications),
        ("control_queue_full", s.control_queue_full),
    ]
}

fn render_samples(src: &Sources, samples: &[WorkerSample], rxq: Option<(u64, u64)>) -> String {
    let mut out = String::with_capacity(8192);
    let per_worker = |f: &dyn Fn(&WorkerSample) -> u64| -> Vec<(String, f64)> {
        samples.iter().enumerate().map(|(i, s)| (format!("worker=\"{i}\""), f(s) as f64)).collect()
    };
    let _ = writeln!(
        out,
        "# HELP uturn_build_info The running version.\n# TYPE uturn_build_info gauge\nuturn_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    family(
        &mut out,
        "io_backend",
        "gauge",
        "The I/O backend the workers run (1).",
        [(format!("backend=\"{}\"", src.backend), 1.0)],
    );
    family(&mut out, "allocations", "gauge", "Live allocations.", per_worker(&|s| s.allocations));
    family(
        &mut out,
        "allocations_created_total",
        "counter",
        "Allocations installed.",
        per_worker(&|s| s.counters.allocations_created),
    );
    family(
        &mut out,
        "allocations_expired_total",
        "counter",
        "Allocations whose lifetime ran out.",
        per_worker(&|s| s.counters.allocations_expired),
    );
    family(
        &mut out,
        "allocations_deleted_in_worker_total",
        "counter",
        "Allocations deleted by a Refresh with LIFETIME 0 that the worker answered.",
        per_worker(&|s| s.counters.deleted_in_worker),
    );
    family(&mut out, "connections", "gauge", "TCP and TLS client connections open.", per_worker(&|s| s.connections));
    family(
        &mut out,
        "connections_accepted_total",
        "counter",
        "TCP and TLS client connections accepted.",
        per_worker(&|s| s.streams.accepted),
    );
    family(
        &mut out,
        "connections_refused_total",
        "counter",
        "Connections refused at accept by max-connections or max-connections-per-ip.",
        per_worker(&|s| s.streams.refused),
    );
    family(
        &mut out,
        "connections_rate_limited_total",
        "counter",
        "Connections refused at accept because their source (IPv4 address, IPv6 /64) opened more per second than connections-per-second-per-ip (also in connections_refused_total).",
        per_worker(&|s| s.streams.rate_limited),
    );
    family(
        &mut out,
        "accepts_deferred_total",
        "counter",
        "Accepts of TCP/TLS connections put off because the process was out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), each retried after a backoff.",
        per_worker(&|s| s.streams.accept_deferred),
    );
    family(
        &mut out,
        "stream_requests_refused_total",
        "counter",
        "Requests over TCP/TLS answered 508 instead of dropped because this worker's queue to the control plane was full.",
        per_worker(&|s| s.streams.refusals),
    );
    family(
        &mut out,
        "connections_closed_total",
        "counter",
        "Client connections closed, by reason.",
        uturn_dataplane::CLOSE_REASONS
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("reason=\"{r}\""), samples.iter().map(|s| s.streams.closed[i]).sum::<u64>() as f64)),
    );
    family(
        &mut out,
        "connection_queue_drops_total",
        "counter",
        "Messages for a client dropped because its connection's write queue was full.",
        per_worker(&|s| s.streams.queue_drops),
    );
    family(
        &mut out,
        "tcp_data_bytes_total",
        "counter",
        "Bytes relayed between the data connections of TCP allocations (RFC 6062), both directions.",
        per_worker(&|s| s.streams.data_bytes),
    );
    render_holds(&mut out, samples);
    render_proxy(&mut out, samples);
    family(&mut out, "permissions", "gauge", "Permissions held (peer IPs).", per_worker(&|s| s.permissions));
    family(&mut out, "channels", "gauge", "Channel bindings held.", per_worker(&|s| s.channels));
    let dir = |f: &dyn Fn(&WorkerSample) -> (u64, u64)| -> Vec<(String, f64)> {
        samples
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                let (p, c) = f(s);
                [
                    (format!("worker=\"{i}\",direction=\"to_peer\""), p as f64),
                    (format!("worker=\"{i}\",direction=\"to_client\""), c as f64),
                ]
            })
            .collect()
    };
    family(
        &mut out,
        "packets_relayed_total",
        "counter",
        "Datagrams relayed.",
        dir(&|s| (s.counters.relayed_to_peer, s.counters.relayed_to_client)),
    );
    family(
        &mut out,
        "bytes_relayed_total",
        "counter",
        "Application-data bytes relayed.",
        dir(&|s| (s.counters.bytes_to_peer, s.counters.bytes_to_client)),
    );
    if let Some(x) = &src.xdp {
        family(
            &mut out,
            "xdp_packets_relayed_total",
            "counter",
            "Datagrams the XDP fast path relayed (included in packets_relayed_total).",
            dir(&|s| (s.counters.offloaded_to_peer, s.counters.offloaded_to_client)),
        );
        family(
            &mut out,
            "xdp_verdicts_total",
            "counter",
            "Packets the XDP program saw, by what it did (to_* relayed; pass_* handed to the socket path).",
            x.read().into_iter().map(|(v, n)| (format!("verdict=\"{v}\""), n as f64)),
        );
    }
    let drops: Vec<(String, f64)> = samples
        .iter()
        .enumerate()
        .flat_map(|(i, s)| drop_reasons(s).map(|(r, v)| (format!("worker=\"{i}\",reason=\"{r}\""), v as f64)))
        .collect();
    family(&mut out, "drops_total", "counter", "Datagrams and requests dropped, by reason.", drops);
    family(
        &mut out,
        "capacity_refusals_total",
        "counter",
        "CreatePermission/ChannelBind refused with 508 by the per-allocation caps.",
        per_worker(&|s| s.counters.capacity_refusals),
    );
    family(
        &mut out,
        "requests_answered_total",
        "counter",
        "Requests the worker answered itself.",
        per_worker(&|s| s.counters.requests_answered),
    );
    family(
        &mut out,
        "requests_forwarded_total",
        "counter",
        "Requests handed to the control plane.",
        per_worker(&|s| s.counters.requests_forwarded),
    );
    let c = &src.control;
    family(
        &mut out,
        "allocations_granted_total",
        "counter",
        "Allocates the control plane granted.",
        [(String::new(), c.allocations_granted.load(Ordering::Relaxed) as f64)],
    );
    let refused = CODES
        .iter()
        .map(|code| code.to_string())
        .chain(std::iter::once("other".to_string()))
        .zip(&c.refused)
        .map(|(code, v)| (format!("code=\"{code}\""), v.load(Ordering::Relaxed) as f64));
    family(
        &mut out,
        "allocations_refused_total",
        "counter",
        "Allocates answered with an error, by STUN error code.",
        refused,
    );
    let quota = c.refused[CODES.iter().position(|c| *c == 486).unwrap_or(0)].load(Ordering::Relaxed);
    family(
        &mut out,
        "quota_refusals_total",
        "counter",
        "Allocates refused by a quota (486).",
        [(String::new(), quota as f64)],
    );
    let auth =
        OUTCOMES.iter().zip(&c.auth).map(|((_, l), v)| (format!("outcome=\"{l}\""), v.load(Ordering::Relaxed) as f64));
    family(
        &mut out,
        "auth_total",
        "counter",
        "Authentication outcomes of the requests the control plane handled.",
        auth,
    );
    family(
        &mut out,
        "user_cache_entries",
        "gauge",
        "Store answers (known users and unknown names) in the credential cache.",
        [(String::new(), c.user_cache[0].load(Ordering::Relaxed) as f64)],
    );
    family(
        &mut out,
        "user_cache_bytes",
        "gauge",
        "Bytes the credential cache's entries take (estimated per entry; bounded by user-cache-bytes).",
        [(String::new(), c.user_cache[1].load(Ordering::Relaxed) as f64)],
    );
    let r = &c.peer_refusals;
    family(
        &mut out,
        "tcp_peer_connections_refused_total",
        "counter",
        "RFC 6062 peer connections refused, by the cap: per allocation (256), per user (max-peer-connections-per-user), node (max-connections).",
        [("allocation", &r.refused_allocation), ("user", &r.refused_user), ("node", &r.refused_node)]
            .map(|(cap, v)| (format!("cap=\"{cap}\""), v.load(Ordering::Relaxed) as f64)),
    );
    family(
        &mut out,
        "parked_requests",
        "gauge",
        "Requests waiting for a user-store lookup.",
        [(String::new(), c.parked.load(Ordering::Relaxed) as f64)],
    );
    family(
        &mut out,
        "draining",
        "gauge",
        "1 while the relay drains.",
        [(String::new(), c.draining.load(Ordering::Relaxed) as u8 as f64)],
    );
    render_usage(&mut out, &c.usage);
    if let Some(q) = c.fleet_quota.get() {
        render_fleet_quota(&mut out, q);
    }
    if let Some((listener, relay)) = rxq {
        family(
            &mut out,
            "receive_queue_drops_total",
            "counter",
            "Datagrams the kernel dropped at uturn's full socket receive queues (SO_RXQ_OVFL's count).",
            [("socket=\"listener\"".to_string(), listener as f64), ("socket=\"relay\"".to_string(), relay as f64)],
        );
    }
    let _ = writeln!(
        out,
        "# HELP uturn_allocate_latency_seconds From a worker receiving an Allocate to the control plane queuing its answer.\n# TYPE uturn_allocate_latency_seconds histogram"
    );
    for (le, b) in LATENCY_BUCKETS.iter().zip(&c.latency_buckets) {
        let _ = writeln!(out, "uturn_allocate_latency_seconds_bucket{{le=\"{le}\"}} {}", b.load(Ordering::Relaxed));
    }
    let count = c.latency_count.load(Ordering::Relaxed);
    let _ = writeln!(out, "uturn_allocate_latency_seconds_bucket{{le=\"+Inf\"}} {count}");
    let _ =
        writeln!(out, "uturn_allocate_latency_seconds_sum {}", c.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
    let _ = writeln!(out, "uturn_allocate_latency_seconds_count {count}");
    out
}

/// Usage records (docs/operations.md, "Usage records").
fn render_usage(out: &mut String, u: &crate::usage::UsageCounters) {
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    family(
        out,
        "usage_records_written_total",
        "counter",
        "Usage records written, by destination.",
        [("dest=\"redis\"".to_string(), n(&u.written_redis)), ("dest=\"file\"".to_string(), n(&u.written_file))],
    );
    family(
        out,
        "usage_records_dropped_total",
        "counter",
        "Usage records lost: queue or buffer full, a failed write, or Redis unreachable at exit.",
        [(String::new(), n(&u.dropped))],
    );
    family(
        out,
        "usage_records_pending",
        "gauge",
        "Usage records queued or waiting for Redis.",
        [(String::new(), n(&u.pending))],
    );
}

/// Fleet quotas (`fleet-redis` with `user-quota`): Redis commands and failures, Allocates
/// checked and refused across the fleet, and whether Redis answers.
fn render_fleet_quota(out: &mut String, q: &crate::fleet::quota::QuotaMetrics) {
    let n = |v: &AtomicU64| [(String::new(), v.load(Ordering::Relaxed) as f64)];
    family(
        out,
        "fleet_quota_redis_ops_total",
        "counter",
        "Redis commands the fleet quota thread sent.",
        n(&q.redis_ops),
    );
    family(
        out,
        "fleet_quota_redis_errors_total",
        "counter",
        "Fleet quota round trips or connection attempts to Redis that failed.",
        n(&q.redis_errors),
    );
    family(
        out,
        "fleet_quota_checks_total",
        "counter",
        "Allocates checked against the fleet's user-quota.",
        n(&q.checks),
    );
    family(
        out,
        "fleet_quota_denied_total",
        "counter",
        "Allocates refused (486) because the fleet total was at user-quota.",
        n(&q.denied),
    );
    family(
        out,
        "fleet_quota_redis_up",
        "gauge",
        "1 while Redis answers (quotas count across the fleet), 0 while each node counts alone.",
        [(String::new(), q.up.load(Ordering::Relaxed) as u8 as f64)],
    );
}

/// Order within a 5-tuple: datagrams held behind a request at the control plane, what the
/// bounds dropped, holds released without an answer, and the request turnaround histogram.
fn render_holds(out: &mut String, samples: &[WorkerSample]) {
    let per_worker = |f: &dyn Fn(&WorkerSample) -> u64| -> Vec<(String, f64)> {
        samples.iter().enumerate().map(|(i, s)| (format!("worker=\"{i}\""), f(s) as f64)).collect()
    };
    family(
        out,
        "held_datagrams_total",
        "counter",
        "Datagrams of a 5-tuple held while its request was at the control plane, then handled in order.",
        per_worker(&|s| s.holds.held),
    );
    family(
        out,
        "hold_drops_total",
        "counter",
        "Datagrams dropped because a 5-tuple's or the worker's hold was full.",
        per_worker(&|s| s.holds.dropped),
    );
    family(
        out,
        "holds_expired_total",
        "counter",
        "Holds released after 1 s without the control plane's answer.",
        per_worker(&|s| s.holds.expired),
    );
    let mut t = uturn_dataplane::Turnaround::default();
    for s in samples {
        t.add(&s.turnaround);
    }
    let _ = writeln!(
        out,
        "# HELP uturn_request_turnaround_seconds From a worker receiving a request to the control plane's answer applied in the worker.\n# TYPE uturn_request_turnaround_seconds histogram"
    );
    let mut cumulative = 0;
    for (le, b) in uturn_dataplane::TURNAROUND_BUCKETS.iter().zip(t.buckets) {
        cumulative += b;
        let _ = writeln!(out, "uturn_request_turnaround_seconds_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "uturn_request_turnaround_seconds_bucket{{le=\"+Inf\"}} {}", t.count);
    let _ = writeln!(out, "uturn_request_turnaround_seconds_sum {}", t.sum_ns as f64 / 1e9);
    let _ = writeln!(out, "uturn_request_turnaround_seconds_count {}", t.count);
}

/// The kernel's drop counts summed over this process's UDP sockets: (listeners, relays), told
/// apart by local port. `None` where /proc cannot be read.
fn receive_queue_drops(listen_ports: &[u16]) -> Option<(u64, u64)> {
    let mut inodes = HashSet::new();
    for e in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        if let Ok(target) = std::fs::read_link(e.path()) {
            let t = target.to_string_lossy();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                if let Ok(n) = n.parse::<u64>() {
                    inodes.insert(n);
                }
            }
        }
    }
    let (mut listener, mut relay) = (0u64, 0u64);
    for table in ["/proc/self/net/udp", "/proc/self/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            let (Some(local), Some(inode), Some(drops)) = (f.get(1), f.get(9), f.get(12)) else { continue };
            let (Ok(inode), Ok(drops)) = (inode.parse::<u64>(), drops.parse::<u64>()) else { continue };
            if !inodes.contains(&inode) {
                continue;
            }
            let port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()).unwrap_or(0);
            if listen_ports.contains(&port) {
                listener += drops;
            } else {
                relay += drops;
            }
        }
    }
    Some((listener, relay))
}

/// PROXY protocol (`proxy-protocol`, `proxy-protocol-udp`): headers taken, and connections
/// closed or datagrams dropped for their header, by transport (`tcp` counts TCP and TLS) and
/// reason.
fn render_proxy(out: &mut String, samples: &[WorkerSample]) {
    let sum = |f: &dyn Fn(&WorkerSample) -> u64| samples.iter().map(f).sum::<u64>() as f64;
    family(
        out,
        "proxy_headers_total",
        "counter",
        "PROXY protocol headers taken: connections (tcp, for TCP and TLS) and datagrams (udp).",
        [
            ("transport=\"tcp\"".to_string(), sum(&|s| s.proxy.streams_accepted)),
            ("transport=\"udp\"".to_string(), sum(&|s| s.proxy.datagrams_accepted)),
        ],
    );
    let refused = uturn_dataplane::PROXY_REFUSALS.iter().enumerate().flat_map(|(i, r)| {
        [
            (format!("transport=\"tcp\",reason=\"{r}\""), sum(&|s| s.proxy.streams_refused[i])),
            (format!("transport=\"udp\",reason=\"{r}\""), sum(&|s| s.proxy.datagrams_refused[i])),
        ]
    });
    family(
        out,
        "proxy_refused_total",
        "counter",
        "Connections closed (tcp) and datagrams dropped (udp) for their PROXY header: from outside proxy-trusted, without a header, with a malformed one, or (tcp) without one in time.",
        refused.collect::<Vec<_>>(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use uturn_proto::relay::Counters;

    #[test]
    fn exposition_has_every_family_with_worker_labels_and_a_cumulative_histogram() {
        let control = Arc::new(ControlMetrics::default());
        control.refused(486);
        control.refused(999);
        control.auth(AuthOutcome::StaleNonce);
        control.allocate_latency(Duration::from_micros(70));
        control.allocate_latency(Duration::from_millis(3));
        control.set_user_cache(3, 300);
        control.peer_refusals.refused_node.fetch_add(2, Ordering::Relaxed);
        let src = Sources { workers: vec![], control, backend: "epoll", listen_ports: vec![3478], xdp: None };
        let mut turnaround = uturn_dataplane::Turnaround::default();
        turnaround.buckets[2] = 3;
        turnaround.buckets[4] = 1;
        turnaround.count = 4;
        let sample = WorkerSample {
            counters: Counters { relayed_to_peer: 10, bytes_to_client: 160, no_permission: 2, ..Counters::default() },
            allocations: 1,
            holds: uturn_dataplane::HoldCounters { held: 5, dropped: 1, expired: 0 },
            turnaround,
            ..WorkerSample::default()
        };
        let text = render_samples(&src, &[sample, WorkerSample::default()], Some((1, 2)));
        for line in [
            "uturn_io_backend{backend=\"epoll\"} 1",
            "uturn_allocations{worker=\"0\"} 1",
            "uturn_allocations{worker=\"1\"} 0",
            "uturn_packets_relayed_total{worker=\"0\",direction=\"to_peer\"} 10",
            "uturn_bytes_relayed_total{worker=\"0\",direction=\"to_client\"} 160",
            "uturn_drops_total{worker=\"0\",reason=\"no_permission\"} 2",
            "uturn_allocations_refused_total{code=\"486\"} 1",
            "uturn_allocations_refused_total{code=\"other\"} 1",
            "uturn_quota_refusals_total 1",
            "uturn_auth_total{outcome=\"stale_nonce\"} 1",
            "uturn_receive_queue_drops_total{socket=\"relay\"} 2",
            "uturn_allocate_latency_seconds_bucket{le=\"0.00005\"} 0",
            "uturn_allocate_latency_seconds_bucket{le=\"0.0001\"} 1",
            "uturn_allocate_latency_seconds_bucket{le=\"0.005\"} 2",
            "uturn_allocate_latency_seconds_bucket{le=\"+Inf\"} 2",
            "uturn_allocate_latency_seconds_count 2",
            "uturn_user_cache_entries 3",
            "uturn_user_cache_bytes 300",
            "uturn_tcp_peer_connections_refused_total{cap=\"node\"} 2",
            "uturn_tcp_peer_connections_refused_total{cap=\"user\"} 0",
            "uturn_held_datagrams_total{worker=\"0\"} 5",
            "uturn_hold_drops_total{worker=\"0\"} 1",
            "uturn_request_turnaround_seconds_bucket{le=\"0.00001\"} 0",
            "uturn_request_turnaround_seconds_bucket{le=\"0.00005\"} 3",
            "uturn_request_turnaround_seconds_bucket{le=\"0.00025\"} 4",
            "uturn_request_turnaround_seconds_bucket{le=\"+Inf\"} 4",
            "uturn_request_turnaround_seconds_count 4",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(l.starts_with("uturn_"), "{l}");
            assert!(l.rsplit(' ').next().unwrap().parse::<f64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn drop_counts_are_read_once_per_interval() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        let cached = DropCounts::new(Duration::from_secs(3600));
        for _ in 0..100 {
            assert_eq!(cached.get(&[port]), Some((0, 0)));
        }
        assert_eq!(cached.readings.load(Ordering::Relaxed), 1, "100 scrapes in the interval, one reading");
        let fresh = DropCounts::new(Duration::ZERO);
        for _ in 0..3 {
            fresh.get(&[port]);
        }
        assert_eq!(fresh.readings.load(Ordering::Relaxed), 3, "past the interval every scrape reads again");
    }

    #[test]
    fn this_process_sockets_are_found_in_proc() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        assert_eq!(receive_queue_drops(&[port]), Some((0, 0)));
    }
}
