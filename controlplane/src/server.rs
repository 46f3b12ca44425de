//! Starting and stopping uturn: the workers (one per core), the control thread, and the queues
//! between them.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crossbeam_channel::TryRecvError;
use tracing::{error, info, warn};
use uturn_dataplane::{
    ConnectionCount, EventSender, FromWorker, FrozenWorker, IoBackend, Start, TlsServer, ToWorker, WorkerConfig,
    WorkerHandle, WorkerMetrics, XdpFastPath, XdpMode, XdpOptions,
};
use uturn_proto::nonce::{Challenger, NonceKey};
use uturn_proto::relay::RelayConfig;

use crate::admin_api::{AdminAction, AdminApi, AdminReply, AdminRequest, TimelineQuery};
use crate::config::{BackendChoice, Config};
use crate::control::{ControlPlane, Policy};
use crate::credentials::Credentials;
use crate::metrics::{MetricsExporter, Sources};
use crate::notify;
use crate::policy::PeerPolicy;
use crate::upgrade::{Handover, Successor, Upgrade};

/// Commands a worker's queue holds before the control plane drops more (clients retransmit).
const COMMAND_QUEUE: usize = 16_384;
/// Events taken from one worker's queue before the control thread turns to the next.
const FAIR_SHARE: usize = 32;
/// Events handled between checks for stopped workers and shutdown.
const MAX_BATCH: usize = 4096;
/// How long an exiting process gives the usage writer to write what is queued.
const USAGE_FLUSH: Duration = Duration::from_secs(5);

/// Picks the I/O backend, probing io_uring when asked for `auto`.
pub fn choose_backend(choice: BackendChoice) -> Result<IoBackend> {
    match choice {
        BackendChoice::Epoll => Ok(IoBackend::Epoll),
        BackendChoice::Uring => {
            uturn_dataplane::probe_uring().map_err(|e| anyhow::anyhow!("io_uring unavailable: {e}"))?;
            Ok(IoBackend::Uring)
        }
        BackendChoice::Auto => match uturn_dataplane::probe_uring() {
            Ok(()) => Ok(IoBackend::Uring),
            Err(e) => {
                warn!("io_uring unavailable ({e}); falling back to epoll");
                Ok(IoBackend::Epoll)
            }
        },
    }
}

/// The environment variable a hot upgrade sets for the new process.
pub const UPGRADE_ENV: &str = crate::upgrade::ENV_FD;

/// What the signal handlers set: stop (SIGINT, SIGTERM), reload (SIGHUP) and hot upgrade
/// (SIGUSR2).
#[derive(Debug, Clone, Default)]
pub struct Signals {
    /// Set to stop.
    pub shutdown: Arc<AtomicBool>,
    /// Set to re-read the configuration's credentials.
    pub reload: Arc<AtomicBool>,
    /// Set to start the binary at the path this process was started from and hand it over.
    pub upgrade: Arc<AtomicBool>,
}

/// Re-reads the configuration (SIGHUP); `None` when there is nothing to re-read.
pub type Reloader = Box<dyn Fn() -> Result<Config> + Send + Sync>;

/// Runs uturn until `signals.shutdown` is set, a drain ends, or a hot upgrade hands everything
/// to a new process; returns after every worker has stopped. On `signals.reload`, `reloader`
/// re-reads the configuration and the credentials are replaced. A process started by a hot
/// upgrade (`UTURN_UPGRADE_FD` set) takes its sockets and state from the old one.
pub fn run(config: &Config, signals: Signals, reloader: Option<Reloader>) -> Result<()> {
    let mut successor = Successor::from_env().context("hot upgrade")?;
    // The binary and arguments a hot upgrade starts: the path as it was at start, which may
    // hold a new binary by then.
    let exe = std::env::current_exe().context("the path of this binary")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let backend = choose_backend(config.io_backend)?;
    match uturn_dataplane::raise_fd_limit() {
        Ok(n) => info!(open_files = n, "file descriptor limit (one per allocation)"),
        Err(e) => warn!("could not raise the open-file limit: {e}"),
    }
    info!(backend = backend.name(), workers = config.workers, "starting data plane");
    // The credential sources (and the store threads) before any worker, so a store that cannot
    // even start its threads stops uturn before it serves.
    if let Some(url) = &config.credentials.store {
        // A missing SQLite file or a bad URL is a configuration error; an unreachable Redis is
        // an outage the relay rides out (cached keys, 500 for the others).
        match crate::store::open(url, false) {
            Ok(_) => {}
            Err(e @ crate::store::StoreError::Unavailable(_)) => warn!("user store: {e}; starting anyway"),
            Err(e) => bail!("user store {url}: {e}"),
        }
    }
    let sha256 = config.password_algorithms.contains(&uturn_proto::wire::integrity::PasswordAlgorithm::Sha256);
    let credentials = Credentials::new(config.credentials.clone(), sha256, std::thread::current())
        .context("starting the user-store threads")?;
    // Loading verifies the XDP program (a few hundred milliseconds): done before a hot upgrade
    // freezes the old process, attached only once it has detached.
    let xdp = load_xdp(config)?;
    // Everything that takes time is done: take the old process's sockets and state now.
    let inherited = match successor.as_mut() {
        Some(s) => match s.receive() {
            Ok(h) => Some(h),
            Err(e) => {
                s.failed(&format!("{e:#}"));
                return Err(e).context("hot upgrade: receiving the old process's state");
            }
        },
        None => None,
    };
    let started = Instant::now();
    let mut server = match Server::start(config, backend, credentials, inherited, xdp) {
        Ok(s) => s,
        Err(e) => {
            if let Some(s) = successor.as_mut() {
                s.failed(&format!("{e:#}"));
            }
            return Err(e);
        }
    };
    if let Some(s) = successor.as_mut() {
        s.serving().context("hot upgrade: telling the old process")?;
        info!(
            pid = std::process::id(),
            allocations = server.control.allocations(),
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "hot upgrade: serving the old process's sockets and allocations"
        );
    }
    notify::ready(successor.is_some());
    let reloader = reloader.map(Arc::new);
    let outcome = server.serve(&signals, reloader.as_ref(), &exe, &args);
    server.finish(outcome)
}

/// Loads the XDP fast path when `xdp` is native or generic (attached by [`Server::start`]).
fn load_xdp(config: &Config) -> Result<Option<XdpFastPath>> {
    if config.xdp == XdpMode::Off {
        return Ok(None);
    }
    let mut addresses: Vec<std::net::IpAddr> = config.udp_listen().iter().map(|a| a.ip()).collect();
    addresses.extend(config.relay_ips.iter().copied());
    let opts = XdpOptions {
        mode: config.xdp,
        interfaces: config.xdp_interfaces.clone(),
        routes: config.xdp_routes,
        workers: config.workers,
    };
    Ok(Some(XdpFastPath::load(&opts, &addresses).context("xdp")?))
}

/// The running relay: its workers, the queues from them, the control plane and the endpoints.
struct Server<'a> {
    config: &'a Config,
    backend: IoBackend,
    challenger: Challenger,
    /// Per worker: its configuration (kept to resume it after a failed upgrade).
    worker_cfgs: Vec<WorkerConfig>,
    workers: Vec<WorkerHandle>,
    /// Per worker: its event queue's sender (kept for a resume) and receiver.
    senders: Vec<EventSender>,
    events_rx: Vec<(crossbeam_channel::Receiver<FromWorker>, uturn_dataplane::UnverifiedGauge)>,
    control: ControlPlane,
    admin: Option<(AdminApi, TcpListener)>,
    metrics: Option<(MetricsExporter, TcpListener)>,
    /// When a drain ends at the latest.
    drain_deadline: Option<Instant>,
    upgrade: Option<Upgrade>,
    /// The XDP fast path, when configured (detached while a hot upgrade hands over).
    xdp: Option<XdpFastPath>,
    /// The TLS server side of `tls://` listen addresses (its certificate reloads on SIGHUP).
    tls: Option<TlsServer>,
    /// What the TCP relay (RFC 6062 TCP allocations; runs with `tcp://` or `tls://` listen
    /// addresses) has for the workers.
    tcp_events: Option<crossbeam_channel::Receiver<(usize, ToWorker)>>,
    /// The sessions' timelines and the status page's sampler (with the admin endpoint).
    timeline: crate::timeline::Timeline,
    status: Option<crate::status::Sampler>,
    /// The usage-record writer, when records go anywhere.
    usage: Option<crate::usage::Usage>,
    /// The fleet (registry, fleet-wide admin requests; threads only with `fleet-redis`), this
    /// node's load meter and when it last sampled.
    fleet: crate::fleet::Fleet,
    load: crate::fleet::registry::LoadMeter,
    load_sampled: Instant,
}

/// The listener of an HTTP endpoint configured at `addr` (`setting` names it in errors): the one
/// a hot upgrade handed over when it is bound to that address, else a new one bound there.
/// A handed-over listener on another address is closed here (the old process closes its copy
/// when it exits), so the new configuration's address and token rule always go together. Where
/// the new address cannot be bound beside the old one (0.0.0.0:P to 127.0.0.1:P), the upgrade
/// is refused: the old process keeps serving with its rule, and a restart moves the endpoint.
fn endpoint_listener(setting: &str, addr: SocketAddr, inherited: Option<TcpListener>) -> Result<TcpListener> {
    if let Some(l) = inherited {
        let was = l.local_addr()?;
        if was.ip() == addr.ip() && (was.port() == addr.port() || addr.port() == 0) {
            return Ok(l);
        }
        drop(l);
        return TcpListener::bind(addr).with_context(|| {
            format!("{setting} changed from {was} to {addr}, which cannot be bound beside the old process's listener: restart instead of upgrading")
        });
    }
    TcpListener::bind(addr).with_context(|| format!("{setting} {addr}"))
}

/// How the serving loop ended.
enum Outcome {
    /// Stop the workers and exit.
    Stop { failed: bool },
    /// A new process serves everything: exit without touching the sockets.
    HandedOver,
}

impl<'a> Server<'a> {
    fn start(
        config: &'a Config,
        backend: IoBackend,
        credentials: Credentials,
        inherited: Option<(Handover, Vec<OwnedFd>)>,
        mut xdp: Option<XdpFastPath>,
    ) -> Result<Server<'a>> {
        let now = Instant::now();
        // One nonce key (secret from the OS CSPRNG, or the old process's) for the control plane
        // and every worker: workers answer the first, unauthenticated request of an Allocate
        // with 401 themselves.
        // A fleet secret (nonce-secret-file, or fleet-redis) wins over both, and nonce times
        // then count UNIX seconds, so every node of the fleet accepts every node's nonces.
        let (fleet_secret, _) = crate::fleet::nonce_secret::fleet_secret(
            config.nonce_secret_file.as_deref(),
            config.fleet_redis.as_deref(),
        )?;
        // The instant of the last whole UNIX second and that second: counted from there, nonce
        // times are the UNIX time in whole seconds, the same on every node.
        let unix_epoch = {
            let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            match now.checked_sub(Duration::from_nanos(since.subsec_nanos().into())) {
                Some(origin) => (origin, since.as_secs()),
                None => (now, since.as_secs()),
            }
        };
        let (nonce_key, origin) = match &inherited {
            _ if fleet_secret.is_some() => {
                (NonceKey::new(fleet_secret.unwrap_or_default(), config.nonce_lifetime.as_secs().max(1)), unix_epoch.0)
            }
            Some((h, _)) => (
                NonceKey::new(h.nonce_secret, h.nonce_lifetime_s),
                now.checked_sub(Duration::from_millis(h.nonce_origin_age_ms)).unwrap_or(now),
            ),
            None => {
                (NonceKey::new(rand::random(), config.nonce_lifetime.as_secs().max(1)), Challenger::origin_for(now))
            }
        };
        let epoch = if fleet_secret.is_some() { unix_epoch.1 } else { 0 };
        let challenger = Challenger::new(&config.credentials.realm, nonce_key, origin)
            .with_epoch(epoch)
            .offering(&config.password_algorithms);
        // Each worker's share of a source's budget: a source's 5-tuples spread over the workers
        // (SO_REUSEPORT hashing), so the relay as a whole answers a source about `unauth-rate`
        // unverified requests per second (docs/security.md).
        let unauth_share = config.unauth_rate.div_ceil(config.workers.max(1) as u32);
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        if let Some(x) = xdp.as_mut() {
            x.attach().context("xdp")?;
            info!(
                mode = config.xdp.name(),
                interfaces = ?x.interfaces(),
                routes = config.xdp_routes,
                "XDP fast path attached: ChannelData on bound channels is relayed before the socket path"
            );
        }
        let xdp_maps = xdp.as_ref().map(|x| x.maps());
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(TlsServer::from_pem_files(cert, key).context("tls-cert / tls-key")?),
            _ => None,
        };
        let connections = ConnectionCount::default();
        let worker_cfgs: Vec<WorkerConfig> = (0..config.workers)
            .map(|index| WorkerConfig {
                index,
                core: if cores.is_empty() { None } else { Some(cores[index % cores.len()]) },
                listen: config.udp_listen(),
                stream_listen: config.stream_listen(),
                // Like the request budget: each worker takes its share of the per-source rate.
                stream_limits: config.stream_limits.per_worker(config.workers),
                tls: tls.clone(),
                connections: connections.clone(),
                backend,
                relay: RelayConfig {
                    permission_lifetime: config.permission_lifetime,
                    channel_lifetime: config.channel_lifetime,
                    max_permissions: config.max_permissions,
                    max_channels: config.max_channels,
                    bandwidth: (config.max_bandwidth > 0).then_some(config.max_bandwidth),
                    unauthenticated_rate: unauth_share,
                },
                command_queue: COMMAND_QUEUE,
                challenger: Some(challenger.clone()),
                metrics: Arc::new(WorkerMetrics::default()),
                xdp: xdp_maps.clone(),
                proxy: config.proxy.clone(),
            })
            .collect();
        let (handover, mut fds) = match inherited {
            Some((h, fds)) => (Some(h), fds.into_iter()),
            None => (None, Vec::new().into_iter()),
        };
        let mut admin_listener = None;
        let mut metrics_listener = None;
        let mut starts: Vec<Start> = Vec::with_capacity(config.workers);
        if let Some(h) = &handover {
            if h.workers.len() != config.workers {
                bail!("the old process ran {} workers, this configuration {}", h.workers.len(), config.workers);
            }
            if h.admin {
                admin_listener = fds.next().map(TcpListener::from);
            }
            if h.metrics {
                metrics_listener = fds.next().map(TcpListener::from);
            }
        }
        let mut snapshots =
            handover.as_ref().map(|h| h.workers.iter().map(|w| w.allocations.clone()).collect::<Vec<_>>());
        for (i, cfg) in worker_cfgs.iter().enumerate() {
            let Some(h) = &handover else {
                starts.push(Start::Fresh);
                continue;
            };
            let listeners: Vec<UdpSocket> = fds.by_ref().take(h.workers[i].listeners).map(UdpSocket::from).collect();
            let stream_listeners: Vec<TcpListener> =
                fds.by_ref().take(h.workers[i].stream_listeners).map(TcpListener::from).collect();
            let allocs = std::mem::take(&mut snapshots.as_mut().expect("handover")[i]);
            let mut taken = Vec::with_capacity(allocs.len());
            for snap in allocs {
                let socket = fds.next().map(UdpSocket::from);
                let additional = if snap.additional.is_some() { fds.next().map(UdpSocket::from) } else { None };
                match socket {
                    Some(s) if snap.additional.is_none() || additional.is_some() => taken.push((snap, s, additional)),
                    _ => bail!("worker {i}: relay sockets missing in the handover"),
                }
            }
            let (frozen, refused) = FrozenWorker::adopt(cfg, now, listeners, stream_listeners, taken)
                .with_context(|| format!("worker {i}: taking over its sockets"))?;
            for (session, e) in refused {
                warn!(worker = i, session, "hot upgrade: allocation not taken over: {e:?}");
            }
            starts.push(Start::Resume(Box::new(frozen)));
        }
        let policy = Policy {
            relay_ips: config.relay_ips.clone(),
            external_ips: config.external_ips.clone(),
            default_lifetime: config.default_lifetime,
            max_lifetime: config.max_lifetime,
            user_quota: config.user_quota,
            total_quota: config.total_quota,
            peers: PeerPolicy::new(&own_addresses(config), &config.allow_peer, &config.deny_peer),
            rfc5766_channels: config.rfc5766_channels,
        };
        info!("{}", policy.peers.describe());
        let fleet = start_fleet(config)?;
        let mut control = ControlPlane::new(policy, credentials, config.workers, config.port_range, challenger.clone());
        control.redirect = crate::fleet::redirect::Redirector::new(
            config.alternate_server.clone(),
            Some(fleet.shared.clone()),
            crate::fleet::redirect::Budget {
                total_quota: config.total_quota,
                max_bytes_per_s: config.node_max_bandwidth,
            },
            config.listen.iter().map(|l| l.addr).chain(fleet.shared.local().addresses.iter().map(|a| a.addr)).collect(),
        );
        let mut server = Server {
            config,
            backend,
            challenger: challenger.clone(),
            worker_cfgs,
            workers: Vec::with_capacity(config.workers),
            senders: Vec::with_capacity(config.workers),
            events_rx: Vec::with_capacity(config.workers),
            control,
            admin: None,
            metrics: None,
            drain_deadline: None,
            upgrade: None,
            xdp,
            tls,
            tcp_events: None,
            timeline: Default::default(),
            status: None,
            usage: None,
            fleet,
            load: Default::default(),
            load_sampled: now,
        };
        if let (Some(url), true) = (&config.fleet_redis, config.user_quota > 0) {
            let quota = crate::fleet::quota::FleetQuota::start(
                url,
                &config.node_id,
                config.user_quota,
                config.quota_lease,
                std::thread::current(),
            )
            .context("fleet quota")?;
            server.control.set_fleet_quota(quota);
        }
        if !config.stream_listen().is_empty() {
            let (tx, rx) = crossbeam_channel::unbounded();
            let limits = crate::tcp_relay::PeerLimits {
                connections: connections.clone(),
                max_connections: config.stream_limits.max_connections,
                per_user: config.max_peer_connections_per_user,
            };
            let relay = crate::tcp_relay::TcpRelay::spawn(
                tx,
                std::thread::current(),
                config.permission_lifetime,
                limits,
                server.control.metrics.peer_refusals.clone(),
            )
            .context("starting the TCP relay")?;
            let listen_ports = config.stream_listen().iter().map(|l| l.addr.port()).collect();
            server.control.set_tcp_relay(relay, listen_ports);
            server.tcp_events = Some(rx);
        }
        for (cfg, start) in server.worker_cfgs.clone().into_iter().zip(starts) {
            let (events_tx, rx) = crossbeam_channel::unbounded::<FromWorker>();
            let sender = EventSender::new(events_tx, std::thread::current());
            server.events_rx.push((rx, sender.unverified_gauge()));
            server.senders.push(sender.clone());
            match uturn_dataplane::spawn(cfg, sender, start) {
                Ok(h) => server.workers.push(h),
                Err(e) => {
                    server.stop_workers();
                    return Err(e).context("starting workers");
                }
            }
        }
        if config.reuseport_cpu && handover.is_none() {
            // The program applies to each listen address's whole SO_REUSEPORT group; a handed
            // over group keeps the one attached before.
            for addr in &config.udp_listen() {
                let probe = uturn_dataplane::bind_listener(*addr).and_then(|s| {
                    uturn_dataplane::attach_reuseport_cpu(&s, config.workers)?;
                    Ok(s)
                });
                match probe {
                    // Closing the extra socket leaves the program on the group.
                    Ok(_) => {
                        info!(%addr, workers = config.workers, "reuseport-cpu: datagrams go to the worker on the receiving CPU")
                    }
                    Err(e) => warn!(%addr, "reuseport-cpu: could not attach the steering program: {e}"),
                }
            }
        }
        if let Some(url) = &config.credentials.store {
            info!(store = %url, threads = config.credentials.store_threads, "user store");
        }
        let usage = crate::usage::UsageConfig {
            node: config.node_id.clone(),
            redis: config.fleet_redis.clone().filter(|_| !config.usage.stream.is_empty()),
            stream: config.usage.stream.clone(),
            maxlen: config.usage.stream_maxlen,
            file: config.usage.file.clone(),
            interval: (config.usage.interval_s > 0).then(|| Duration::from_secs(config.usage.interval_s)),
            external_ips: config.external_ips.clone(),
        };
        let inherited = handover.as_ref().map(|h| h.usage.clone()).unwrap_or_default();
        server.usage = crate::usage::Usage::start(usage, server.control.metrics.usage.clone(), inherited);
        if let Some(h) = handover {
            server.control.import(now, h.control);
            if let Some(alt) = h.draining {
                server.control.drain(alt);
                server.drain_deadline = Some(now + config.drain_timeout);
            }
        }
        let result = server.start_endpoints(admin_listener, metrics_listener);
        if let Err(e) = result {
            server.stop_workers();
            return Err(e);
        }
        Ok(server)
    }

    /// The admin and metrics endpoints, on handed-over listeners or freshly bound ones (see
    /// [`endpoint_listener`]).
    fn start_endpoints(&mut self, admin: Option<TcpListener>, metrics: Option<TcpListener>) -> Result<()> {
        let c = self.config;
        if let Some(addr) = c.admin_listen {
            let listener = endpoint_listener("admin-listen", addr, admin)?;
            if !listener.local_addr()?.ip().is_loopback() && c.admin_token.is_none() {
                bail!("the admin endpoint on {} is off loopback and admin-token is not set", listener.local_addr()?);
            }
            let keep = listener.try_clone()?;
            let board = self.status_board();
            self.status = Some(board.start_sampler().context("status page sampler")?);
            let fleet = Some(self.fleet.shared.clone());
            let api = AdminApi::start(listener, c.admin_token.clone(), std::thread::current(), board, fleet)
                .with_context(|| format!("admin endpoint on {addr}"))?;
            self.admin = Some((api, keep));
        }
        if let Some(addr) = c.metrics_listen {
            let listener = endpoint_listener("metrics-listen", addr, metrics)?;
            if !listener.local_addr()?.ip().is_loopback() && !c.metrics_allow_remote {
                bail!(
                    "the metrics endpoint on {} is off loopback and metrics-allow-remote is not set",
                    listener.local_addr()?
                );
            }
            let keep = listener.try_clone()?;
            let sources = Sources {
                workers: self.worker_cfgs.iter().map(|w| w.metrics.clone()).collect(),
                control: self.control.metrics.clone(),
                backend: self.backend.name(),
                listen_ports: c.udp_listen().iter().map(|a| a.port()).collect(),
                xdp: match &self.xdp {
                    Some(x) => Some(Arc::new(x.maps().verdicts().context("xdp verdict counters")?)),
                    None => None,
                },
            };
            let exporter =
                MetricsExporter::start(listener, sources).with_context(|| format!("metrics endpoint on {addr}"))?;
            self.metrics = Some((exporter, keep));
        }
        Ok(())
    }

    /// What the status page shows about this node, over the workers' and control plane's metrics.
    fn status_board(&self) -> Arc<crate::status::StatusBoard> {
        let c = self.config;
        let xdp = match &self.xdp {
            Some(x) => format!("{} on {}", c.xdp.name(), x.interfaces().join(", ")),
            None => "off".into(),
        };
        let node = crate::status::NodeInfo {
            backend: self.backend.name(),
            workers: c.workers,
            xdp,
            listeners: c.listen.iter().map(|l| l.to_string()).collect(),
            relay_ips: c.relay_ips.iter().map(|ip| ip.to_string()).collect(),
            port_range: c.port_range,
            realm: c.credentials.realm.clone(),
        };
        let workers = self.worker_cfgs.iter().map(|w| w.metrics.clone()).collect();
        crate::status::StatusBoard::new(node, Instant::now(), workers, self.control.metrics.clone())
    }

    /// SIGHUP: re-reads the TLS certificate and key from their files (the paths are
    /// restart-only). New handshakes present the new certificate; open connections keep theirs.
    fn reload_tls(&self) {
        let (Some(tls), Some(cert), Some(key)) = (&self.tls, &self.config.tls_cert, &self.config.tls_key) else {
            return;
        };
        match tls.reload(cert, key) {
            Ok(()) => info!(cert = %cert.display(), "SIGHUP: TLS certificate reloaded"),
            Err(e) => warn!("SIGHUP: TLS certificate not reloaded, the current one stays: {e}"),
        }
    }

    fn stop_workers(&mut self) {
        for w in &self.workers {
            w.stop();
        }
    }

    /// The control loop.
    fn serve(
        &mut self,
        signals: &Signals,
        reloader: Option<&Arc<Reloader>>,
        exe: &Path,
        args: &[std::ffi::OsString],
    ) -> Outcome {
        let shutdown = &signals.shutdown;
        // A SIGHUP reload under way on its own thread, and whether another SIGHUP came meanwhile.
        let (mut reloading, mut reload_again) = (None, false);
        while !shutdown.load(Ordering::Relaxed) {
            // Take up to FAIR_SHARE events from each worker's queue in turn, so one worker's
            // flood cannot starve the clients of the others; stop after MAX_BATCH so the checks
            // below run, then sleep until a worker unparks this thread (no spinning: the core
            // may be a worker's).
            let (mut handled, all_gone) = self.take_events();
            if all_gone {
                break;
            }
            // Requests whose store lookups were answered.
            for (worker, msg) in self.control.poll_lookups(Instant::now()) {
                handled += 1;
                self.push(worker, msg);
            }
            handled += self.admin_requests();
            handled += self.tcp_relay_events();
            self.usage_interim();
            if signals.reload.swap(false, Ordering::Relaxed) {
                if reloading.is_some() {
                    reload_again = true;
                } else {
                    reloading = start_reload(reloader);
                }
                self.reload_tls();
            }
            self.fleet_tick();
            if let Some(rx) = &reloading {
                match rx.try_recv() {
                    Ok(result) => {
                        handled += 1;
                        apply_reload(&mut self.control, self.config, result);
                        // POST /ice-servers mints with the credentials the reload loaded.
                        let credentials = self.control.credentials_mut();
                        let (secret, separator) = (credentials.first_secret(), credentials.separator());
                        self.fleet.shared.set_minting(secret, separator, self.config.ice_servers_max_ttl);
                        reloading = if std::mem::take(&mut reload_again) { start_reload(reloader) } else { None };
                    }
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => {
                        warn!("SIGHUP: the reload thread ended without an answer; the running configuration stays");
                        reloading = None;
                    }
                }
            }
            if signals.upgrade.swap(false, Ordering::Relaxed) {
                self.start_upgrade(exe, args);
            }
            if self.upgrade.is_some() {
                handled += 1;
                if self.poll_upgrade() {
                    return Outcome::HandedOver;
                }
            }
            if let Some(deadline) = self.drain_deadline {
                if self.control.allocations() == 0 {
                    info!("drained: the last allocation ended; exiting");
                    break;
                }
                if Instant::now() >= deadline {
                    info!(allocations = self.control.allocations(), "drain-timeout passed; exiting");
                    break;
                }
            }
            if handled == 0 {
                let wait = if self.upgrade.is_some() { Duration::from_millis(5) } else { Duration::from_millis(100) };
                std::thread::park_timeout(wait);
            }
            if let Some(w) = self.workers.iter().find(|w| w.is_finished()) {
                error!(
                    worker = w.index(),
                    "worker stopped unexpectedly; shutting down so a supervisor can restart uturn"
                );
                return Outcome::Stop { failed: true };
            }
            if self.workers.len() != self.worker_cfgs.len() {
                error!("a worker was lost in a hot upgrade; shutting down so a supervisor can restart uturn");
                return Outcome::Stop { failed: true };
            }
        }
        Outcome::Stop { failed: false }
    }

    /// Takes the workers' events in fair turns; returns how many, and whether every worker's
    /// queue has disconnected.
    fn take_events(&mut self) -> (usize, bool) {
        let mut handled = 0;
        loop {
            let mut round = 0;
            let mut disconnected = 0;
            for i in 0..self.events_rx.len() {
                for _ in 0..FAIR_SHARE {
                    match self.events_rx[i].0.try_recv() {
                        Ok(ev) => {
                            if matches!(ev, FromWorker::Request { verified: false, .. }) {
                                self.events_rx[i].1.taken();
                            }
                            self.handle_event(ev);
                            round += 1;
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            disconnected += 1;
                            break;
                        }
                    }
                }
            }
            handled += round;
            if round == 0 || handled >= MAX_BATCH {
                return (handled, disconnected == self.events_rx.len());
            }
        }
    }

    fn handle_event(&mut self, ev: FromWorker) {
        match ev {
            FromWorker::Request { worker, five_tuple, bytes, received, .. } => {
                let Some(msg) = self.control.handle_request(Instant::now(), worker, five_tuple, &bytes, received)
                else {
                    return;
                };
                self.push(worker, msg);
            }
            FromWorker::Released { five_tuple, tid, ended } => {
                let owner = self.control.released(&five_tuple, tid);
                match ended {
                    Some(e) => {
                        self.timeline.ended(Instant::now(), e.session, e.reason.name(), e.to_peer, e.to_client);
                        if let Some(usage) = &self.usage {
                            usage.ended(&e, owner);
                        }
                    }
                    None => self.timeline.released(Instant::now(), &five_tuple, tid),
                }
            }
            FromWorker::DataClosed { connection_id } => self.control.tcp_data_closed(connection_id),
        }
    }

    /// Asks the workers for their sessions' totals when interim usage records are due; the
    /// usage writer waits for the answers (the control loop does not).
    fn usage_interim(&mut self) {
        let Some(usage) = self.usage.as_mut() else { return };
        if !usage.interim_due(Instant::now()) {
            return;
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let workers = self.workers.iter().filter(|w| w.send(ToWorker::Sessions(tx.clone())).is_ok()).count();
        usage.interim(self.control.usage_starts(), rx, workers);
    }

    /// Pushes what the TCP relay has for the workers; returns how many.
    fn tcp_relay_events(&mut self) -> usize {
        let Some(rx) = &self.tcp_events else { return 0 };
        let events: Vec<(usize, ToWorker)> = rx.try_iter().collect();
        let n = events.len();
        for (worker, msg) in events {
            self.push(worker, msg);
        }
        n
    }

    /// Queues `msg` to `worker`; a full queue drops it (and an Install's allocation is forgotten).
    fn push(&mut self, worker: usize, msg: ToWorker) {
        self.timeline.observe(Instant::now(), worker, &msg);
        if let Err(rejected) = self.workers[worker].send(msg) {
            self.control.stats.queue_full += 1;
            match rejected {
                // The socket closes here; forget the allocation the worker never saw.
                ToWorker::Install(i, _, _) | ToWorker::InstallTcp(i) => {
                    self.timeline.released(Instant::now(), &i.five_tuple, i.tid);
                    self.control.install_dropped(&i)
                }
                // The peer data connection closes here.
                ToWorker::BindData { connection_id, .. } => self.control.tcp_data_closed(connection_id),
                _ => {}
            }
        }
    }

    /// Once a second: measures this node's load and writes its registry entry
    /// (crate::fleet; the heartbeat thread publishes it).
    fn fleet_tick(&mut self) {
        let now = Instant::now();
        if now.saturating_duration_since(self.load_sampled) < crate::fleet::HEARTBEAT {
            return;
        }
        self.load_sampled = now;
        let relayed: u64 = self
            .worker_cfgs
            .iter()
            .map(|w| {
                let c = w.metrics.sample().counters;
                c.bytes_to_peer + c.bytes_to_client
            })
            .sum();
        self.load.sample(now, relayed);
        self.control.redirect.bytes_per_s = self.load.bytes_per_s;
        let allocations = self.control.allocations();
        let draining = self.control.is_draining();
        let over = self.control.redirect.over_budget(draining, allocations).is_some();
        let load = self.control.redirect.budget.load(allocations, self.load.bytes_per_s);
        let mut me = self.fleet.shared.local.lock().unwrap_or_else(|e| e.into_inner());
        me.health = if draining { "draining" } else { "ready" }.into();
        me.over_budget = over;
        me.allocations = allocations as u64;
        me.relayed_bps = self.load.bytes_per_s.saturating_mul(8);
        me.cpu_percent = self.load.cpu_percent;
        me.load = load;
        me.updated_ms = crate::fleet::unix_ms();
    }

    /// Answers the admin endpoint's and the fleet's queued requests; returns how many.
    fn admin_requests(&mut self) -> usize {
        let mut requests: Vec<AdminRequest> = self.fleet.requests.try_iter().collect();
        if let Some((api, _)) = &self.admin {
            requests.extend(api.requests.try_iter());
        }
        let n = requests.len();
        for req in requests {
            let answer = self.admin_answer(req.action);
            let _ = req.reply.send(answer);
        }
        n
    }

    fn admin_answer(&mut self, action: AdminAction) -> AdminReply {
        let json = |status: u16, v: serde_json::Value| AdminReply::Json(status, v.to_string());
        match action {
            AdminAction::Revoke(user) => {
                let commands = self.control.revoke(&user);
                let revoked = commands.len();
                for (worker, msg) in commands {
                    self.push(worker, msg);
                }
                json(200, serde_json::json!({ "user": user, "revoked": revoked }))
            }
            AdminAction::RevokeSession(id) => match self.control.revoke_session(id) {
                Some((worker, msg)) => {
                    self.push(worker, msg);
                    json(200, serde_json::json!({ "session": id, "revoked": 1 }))
                }
                None => json(404, serde_json::json!({ "session": id, "revoked": 0 })),
            },
            AdminAction::Sessions(_) => {
                let (tx, rx) = crossbeam_channel::unbounded();
                let workers = self.workers.iter().filter(|w| w.send(ToWorker::Sessions(tx.clone())).is_ok()).count();
                AdminReply::Sessions { rx, workers }
            }
            AdminAction::Drain => {
                self.control.drain(self.config.alternate_server.first().copied());
                self.load_sampled = Instant::now() - crate::fleet::HEARTBEAT;
                if self.drain_deadline.is_none() {
                    self.drain_deadline = Some(Instant::now() + self.config.drain_timeout);
                }
                notify::status("draining");
                json(200, serde_json::json!({ "draining": true, "allocations": self.control.allocations() }))
            }
            AdminAction::Ready if self.control.is_draining() => {
                json(503, serde_json::json!({ "ready": false, "draining": true }))
            }
            AdminAction::Ready => json(200, serde_json::json!({ "ready": true })),
            AdminAction::Timeline(TimelineQuery::List(which)) => AdminReply::Json(200, self.timeline.to_json(which)),
            AdminAction::Timeline(TimelineQuery::Session(id)) => match self.timeline.session_json(id) {
                Some(body) => AdminReply::Json(200, body),
                None => json(404, serde_json::json!({ "error": format!("no timeline for session {id}") })),
            },
        }
    }

    /// Stops the workers (unless a new process has them) and logs their totals.
    fn finish(mut self, outcome: Outcome) -> Result<()> {
        let failed = match outcome {
            // The workers are joined; their sockets close here, the new process holds its own
            // descriptors for them. Usage records queued meanwhile are written first.
            Outcome::HandedOver => {
                if let Some(usage) = self.usage.take() {
                    usage.finish(USAGE_FLUSH);
                }
                return Ok(());
            }
            Outcome::Stop { failed } => failed,
        };
        info!("stopping");
        notify::stopping();
        self.stop_workers();
        for w in std::mem::take(&mut self.workers) {
            let index = w.index();
            if let Some(c) = w.join().map(|e| e.counters) {
                info!(
                    worker = index,
                    relayed_to_peer = c.relayed_to_peer,
                    relayed_to_client = c.relayed_to_client,
                    malformed = c.malformed_stun + c.malformed_channel_data + c.not_turn,
                    no_allocation = c.no_allocation,
                    unbound_channel = c.unbound_channel,
                    no_permission = c.no_permission,
                    dropped_indications = c.dropped_indications,
                    rate_limited = c.rate_limited,
                    bandwidth_drops = c.bandwidth_drops,
                    capacity_refusals = c.capacity_refusals,
                    allocations_expired = c.allocations_expired,
                    deleted_in_worker = c.deleted_in_worker,
                    "worker stopped"
                );
            }
        }
        // The allocations the workers closed at shutdown: their quotas and usage records.
        let _ = self.take_events();
        if let Some(usage) = self.usage.take() {
            usage.finish(USAGE_FLUSH);
        }
        let s = self.control.stats;
        info!(
            requests = s.requests,
            allocations = s.allocations,
            errors = s.errors,
            worker_queue_full = s.queue_full,
            "control plane stopped"
        );
        if failed {
            bail!("a worker stopped unexpectedly");
        }
        Ok(())
    }
}

mod hot_upgrade;

/// The fleet's shared state from `config` and its threads (only with `fleet-redis`).
fn start_fleet(config: &Config) -> Result<crate::fleet::Fleet> {
    use crate::fleet::{FleetShared, NodeInfo};
    let local = NodeInfo {
        node: config.node_id.clone(),
        region: config.region.clone(),
        addresses: crate::fleet::registry::addresses(config),
        health: "ready".into(),
        over_budget: false,
        allocations: 0,
        relayed_bps: 0,
        cpu_percent: 0.0,
        load: 0.0,
        updated_ms: crate::fleet::unix_ms(),
    };
    if let Some(url) = &config.fleet_redis {
        // A URL that does not parse is a configuration error; an unreachable Redis is an outage
        // the node rides out alone.
        redis::Client::open(url.as_str()).with_context(|| format!("fleet-redis {}", crate::fleet::shown(url)))?;
    }
    let shared = FleetShared::new(config.node_id.clone(), config.fleet_redis.clone(), local, Default::default());
    shared.set_minting(
        config.credentials.secrets.first().cloned(),
        config.credentials.separator,
        config.ice_servers_max_ttl,
    );
    if let Some(url) = &config.fleet_redis {
        info!(node = %config.node_id, redis = %crate::fleet::shown(url), "fleet: registry and fleet-wide admin requests in Redis");
    }
    crate::fleet::Fleet::start(shared, std::thread::current()).context("starting the fleet threads")
}

/// The relay's own addresses for the peer policy: every listener of the process (UDP, TCP, TLS,
/// admin, metrics), the relay and external IPs, and the host's addresses (a listener on an
/// unspecified IP answers on all of them; read once at start).
fn own_addresses(config: &Config) -> crate::policy::OwnAddresses {
    let mut listeners: Vec<std::net::SocketAddr> = config.listen.iter().map(|l| l.addr).collect();
    listeners.extend(config.admin_listen);
    listeners.extend(config.metrics_listen);
    let host = if listeners.iter().any(|l| l.ip().is_unspecified()) {
        uturn_dataplane::local_addresses().unwrap_or_else(|e| {
            warn!("cannot list the host's addresses ({e}); peers on them are judged by the other rules");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    crate::policy::OwnAddresses {
        relay_ips: config.relay_ips.clone(),
        listeners,
        external: config.external_ips.clone(),
        host,
    }
}

/// SIGHUP: re-reads the configuration on a thread of its own, since it may ask a STUN server
/// (`external-ip = "auto"`, crate::discovery) and the control loop never waits; the result
/// comes back on the returned channel and unparks the control thread. `None`: nothing to
/// re-read, or no thread could be started (logged).
fn start_reload(reloader: Option<&Arc<Reloader>>) -> Option<crossbeam_channel::Receiver<Result<Config>>> {
    let Some(reloader) = reloader else {
        info!("SIGHUP: no configuration file to re-read");
        return None;
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    let reloader = Arc::clone(reloader);
    let control = std::thread::current();
    let spawned = std::thread::Builder::new().name("uturn-reload".into()).spawn(move || {
        let _ = tx.send(reloader());
        control.unpark();
    });
    match spawned {
        Ok(_) => Some(rx),
        Err(e) => {
            warn!("SIGHUP: cannot start the reload thread ({e}); the running configuration stays");
            None
        }
    }
}

/// Applies a SIGHUP's re-read configuration: replaces the credentials (and the discovered
/// external IPs); keys that need a restart are logged when they changed. Existing allocations
/// are untouched.
fn apply_reload(control: &mut ControlPlane, running: &Config, result: Result<Config>) {
    match result {
        Ok(new) => {
            for (key, changed) in running.restart_only_changes(&new) {
                if changed {
                    warn!(key, "SIGHUP: this key changed but needs a restart; the running value stays");
                }
            }
            control.credentials_mut().reload(new.credentials.clone());
            if new.external_ip_auto {
                control.set_external_ips(new.external_ips.clone());
            }
        }
        Err(e) => warn!("SIGHUP: configuration not reloaded, the running one stays: {e:#}"),
    }
}
