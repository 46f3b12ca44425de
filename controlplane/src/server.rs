//! Starting and stopping uturn: the workers (one per core), the control thread, and the queues
//! between them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crossbeam_channel::TryRecvError;
use tracing::{error, info, warn};
use uturn_dataplane::{EventSender, FromWorker, IoBackend, ToWorker, WorkerConfig, WorkerHandle};
use uturn_proto::nonce::{Challenger, NonceKey};
use uturn_proto::relay::RelayConfig;

use crate::admin_api::{AdminAction, AdminApi};
use crate::config::{BackendChoice, Config};
use crate::control::{ControlPlane, Policy};
use crate::credentials::Credentials;
use crate::policy::PeerPolicy;

/// Commands a worker's queue holds before the control plane drops more (clients retransmit).
const COMMAND_QUEUE: usize = 16_384;
/// Events taken from one worker's queue before the control thread turns to the next.
const FAIR_SHARE: usize = 32;
/// Events handled between checks for stopped workers and shutdown.
const MAX_BATCH: usize = 4096;

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

/// What the signal handlers set: stop (SIGINT, SIGTERM) and reload (SIGHUP).
#[derive(Debug, Clone, Default)]
pub struct Signals {
    /// Set to stop.
    pub shutdown: Arc<AtomicBool>,
    /// Set to re-read the configuration's credentials.
    pub reload: Arc<AtomicBool>,
}

/// Re-reads the configuration (SIGHUP); `None` when there is nothing to re-read.
pub type Reloader = Box<dyn Fn() -> Result<Config>>;

/// Runs uturn until `signals.shutdown` is set; returns after every worker has stopped. On
/// `signals.reload`, `reloader` re-reads the configuration and the credentials are replaced.
pub fn run(config: &Config, signals: Signals, reloader: Option<Reloader>) -> Result<()> {
    let shutdown = signals.shutdown.clone();
    let backend = choose_backend(config.io_backend)?;
    match uturn_dataplane::raise_fd_limit() {
        Ok(n) => info!(open_files = n, "file descriptor limit (one per allocation)"),
        Err(e) => warn!("could not raise the open-file limit: {e}"),
    }
    info!(backend = backend.name(), workers = config.workers, "starting data plane");
    // One nonce key (secret from the OS CSPRNG) for the control plane and every worker: workers
    // answer the first, unauthenticated request of an Allocate with 401 themselves.
    let nonce_key = NonceKey::new(rand::random(), config.nonce_lifetime.as_secs().max(1));
    let challenger = Challenger::new(&config.credentials.realm, nonce_key, Challenger::origin_for(Instant::now()))
        .offering(&config.password_algorithms);
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
    // Each worker's share of a source's budget: a source's 5-tuples spread over the workers
    // (SO_REUSEPORT hashing), so the relay as a whole answers a source about `unauth-rate`
    // unverified requests per second (docs/security.md).
    let unauth_share = config.unauth_rate.div_ceil(config.workers.max(1) as u32);
    // One queue per worker to the control plane, taken from in turn (a fair share each).
    let mut events_rx = Vec::with_capacity(config.workers);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut workers: Vec<WorkerHandle> = Vec::with_capacity(config.workers);
    for index in 0..config.workers {
        let cfg = WorkerConfig {
            index,
            core: if cores.is_empty() { None } else { Some(cores[index % cores.len()]) },
            listen: config.listen.clone(),
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
        };
        let (events_tx, rx) = crossbeam_channel::unbounded::<FromWorker>();
        let sender = EventSender::new(events_tx, std::thread::current());
        events_rx.push((rx, sender.unverified_gauge()));
        match uturn_dataplane::spawn(cfg, sender) {
            Ok(h) => workers.push(h),
            Err(e) => {
                for w in &workers {
                    w.stop();
                }
                return Err(e).context("starting workers");
            }
        }
    }
    let policy = Policy {
        relay_ip: config.relay_ip,
        default_lifetime: config.default_lifetime,
        max_lifetime: config.max_lifetime,
        user_quota: config.user_quota,
        total_quota: config.total_quota,
        peers: PeerPolicy::new(config.relay_ip, &config.listen, &config.allow_peer, &config.deny_peer),
        rfc5766_channels: config.rfc5766_channels,
    };
    info!("{}", policy.peers.describe());
    if let Some(url) = &config.credentials.store {
        info!(store = %url, threads = config.credentials.store_threads, "user store");
    }
    let mut control = ControlPlane::new(policy, credentials, config.workers, config.port_range, challenger);
    let admin = match config.admin_listen {
        Some(addr) => match AdminApi::start(addr, config.admin_token.clone(), std::thread::current()) {
            Ok(a) => Some(a),
            Err(e) => {
                for w in &workers {
                    w.stop();
                }
                return Err(e).with_context(|| format!("admin endpoint on {addr}"));
            }
        },
        None => None,
    };

    let mut failed = false;
    while !shutdown.load(Ordering::Relaxed) {
        // Take up to FAIR_SHARE events from each worker's queue in turn, so one worker's flood
        // cannot starve the clients of the others; stop after MAX_BATCH so the checks below
        // run, then sleep until a worker unparks this thread (no spinning: the core may be a
        // worker's).
        let mut handled = 0;
        let mut disconnected;
        loop {
            let mut round = 0;
            disconnected = 0;
            for (rx, unverified) in &events_rx {
                for _ in 0..FAIR_SHARE {
                    match rx.try_recv() {
                        Ok(ev) => {
                            if matches!(ev, FromWorker::Request { verified: false, .. }) {
                                unverified.taken();
                            }
                            handle_event(&mut control, &workers, ev);
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
                break;
            }
        }
        if disconnected == events_rx.len() {
            break;
        }
        // Requests whose store lookups were answered.
        for (worker, msg) in control.poll_lookups(Instant::now()) {
            handled += 1;
            push(&mut control, &workers, worker, msg);
        }
        if let Some(api) = &admin {
            while let Ok(req) = api.requests.try_recv() {
                handled += 1;
                match req.action {
                    AdminAction::Revoke(user) => {
                        let commands = control.revoke(&user);
                        let revoked = commands.len();
                        for (worker, msg) in commands {
                            push(&mut control, &workers, worker, msg);
                        }
                        let _ = req.reply.send(serde_json::json!({ "user": user, "revoked": revoked }).to_string());
                    }
                }
            }
        }
        if signals.reload.swap(false, Ordering::Relaxed) {
            reload(&mut control, config, reloader.as_ref());
        }
        if handled == 0 {
            std::thread::park_timeout(Duration::from_millis(100));
        }
        if let Some(w) = workers.iter().find(|w| w.is_finished()) {
            error!(worker = w.index(), "worker stopped unexpectedly; shutting down so a supervisor can restart uturn");
            failed = true;
            break;
        }
    }
    info!("stopping");
    for w in &workers {
        w.stop();
    }
    for w in workers {
        let index = w.index();
        if let Some(c) = w.join() {
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
    let s = control.stats;
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

fn handle_event(control: &mut ControlPlane, workers: &[WorkerHandle], ev: FromWorker) {
    match ev {
        FromWorker::Request { worker, five_tuple, bytes, .. } => {
            let Some(msg) = control.handle_request(Instant::now(), worker, five_tuple, &bytes) else { return };
            push(control, workers, worker, msg);
        }
        FromWorker::Released { five_tuple, tid } => control.released(&five_tuple, tid),
    }
}

/// Queues `msg` to `worker`; a full queue drops it (and an Install's allocation is forgotten).
fn push(control: &mut ControlPlane, workers: &[WorkerHandle], worker: usize, msg: ToWorker) {
    if let Err(rejected) = workers[worker].send(msg) {
        control.stats.queue_full += 1;
        if let ToWorker::Install(i, _socket) = rejected {
            // The socket closes here; forget the allocation the worker never saw.
            control.install_dropped(&i);
        }
    }
}

/// SIGHUP: re-reads the configuration and replaces the credentials; keys that need a restart
/// are logged when they changed. Existing allocations are untouched.
fn reload(control: &mut ControlPlane, running: &Config, reloader: Option<&Reloader>) {
    let Some(reloader) = reloader else {
        info!("SIGHUP: no configuration file to re-read");
        return;
    };
    match reloader() {
        Ok(new) => {
            for (key, changed) in running.restart_only_changes(&new) {
                if changed {
                    warn!(key, "SIGHUP: this key changed but needs a restart; the running value stays");
                }
            }
            control.credentials_mut().reload(new.credentials.clone());
        }
        Err(e) => warn!("SIGHUP: configuration not reloaded, the running one stays: {e:#}"),
    }
}
