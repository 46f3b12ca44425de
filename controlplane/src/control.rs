//! The control plane's request handling: long-term-credential authentication (RFC 8489 §9.2),
//! Allocate policy (RFC 8656 §7.2: transport, address family, lifetime, quotas, relay port) and
//! the checks of Refresh, CreatePermission and ChannelBind that need no data-plane state
//! (§8, §10, §12). What passes becomes a command for the worker that owns the 5-tuple.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use tracing::{debug, info, warn};
use uturn_dataplane::ToWorker;
use uturn_proto::relay::{Command, Install};
use uturn_proto::response::{self, ErrorCode};
use uturn_proto::wire::{attr, ChannelNumber, Class, IntegrityKey, Message, Method, TransactionId};
use uturn_proto::FiveTuple;

use crate::credentials::cache::LookupKey;
use crate::credentials::{Credentials, Resolved};
use crate::metrics::{AuthOutcome, ControlMetrics};
use crate::policy::PeerPolicy;
use crate::ports::PortSlice;
use auth::{Auth, Parked};
use relay_ports::PortRequest;
use uturn_proto::nonce::Challenger;

/// Largest response the control plane builds, bytes.
const RESPONSE_BUF: usize = 1024;
/// How long a port reserved by EVEN-PORT's R bit waits for its RESERVATION-TOKEN (RFC 8656
/// §7.2 suggests about 30 s).
const RESERVATION_TTL: Duration = Duration::from_secs(30);
/// Requests that may wait for a user-store lookup at once; more are dropped (clients
/// retransmit).
pub const MAX_PARKED: usize = 4096;
/// How long a parked request waits for its lookup before it is dropped.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// The policy and credentials the control plane applies.
#[derive(Debug, Clone)]
pub struct Policy {
    /// IPs relayed transport addresses are bound to: one or more per family served (RFC 8656
    /// §7.2: an Allocate that names no family gets IPv4). Allocations of one family spread over
    /// its addresses in turn, so a node holds more than one port range's worth.
    pub relay_ips: Vec<IpAddr>,
    /// Relay addresses behind a 1:1 NAT: (bound private IP, advertised public IP). The
    /// XOR-RELAYED-ADDRESS of a socket bound to the private one names the public one.
    pub external_ips: Vec<(IpAddr, IpAddr)>,
    /// Lifetime granted when the client asks for less or nothing.
    pub default_lifetime: Duration,
    /// Longest lifetime granted.
    pub max_lifetime: Duration,
    /// Allocations per user (0: unlimited).
    pub user_quota: u32,
    /// Allocations in total (0: unlimited).
    pub total_quota: u32,
    /// Peer address policy.
    pub peers: PeerPolicy,
    /// Accept channel numbers up to 0x7FFF (RFC 5766) instead of 0x4FFF (RFC 8656).
    pub rfc5766_channels: bool,
}

/// Who holds an allocation: its user (shared with the credential table, no copy per
/// allocation), the Allocate transaction that made it, and when it expires unless refreshed (as
/// the control plane last granted; the worker's clock decides, this one lets a new Allocate on a
/// lapsed 5-tuple through without waiting for the worker's report).
struct Owner {
    user: Arc<str>,
    tid: TransactionId,
    expires: Instant,
    /// The worker holding the allocation.
    worker: usize,
    /// Its session id.
    session: u64,
    /// The family of its relayed transport address (peers must match it, RFC 8656 §9.1, §12.2).
    v6: bool,
    /// A dual allocation: it has a relayed address of each family, so peers of both are allowed.
    dual: bool,
    /// A TCP allocation (RFC 6062): its relayed transport address, a listener of the TCP relay
    /// (boxed: 8 bytes in every record instead of 32, for the few TCP allocations).
    tcp: Option<Box<SocketAddr>>,
    /// When it was granted, Unix milliseconds (its usage records' start).
    started_ms: u64,
}

/// The control plane's record of one allocation, as a hot upgrade hands it over.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OwnerSnapshot {
    /// The client's 5-tuple.
    pub five_tuple: FiveTuple,
    /// The authenticated username.
    pub user: String,
    /// Transaction ID of the Allocate that made it.
    pub tid: TransactionId,
    /// Milliseconds until it expires (as the control plane last granted).
    pub lifetime_left_ms: u64,
    /// The worker holding it.
    pub worker: usize,
    /// Its session id.
    pub session: u64,
    /// Its relayed transport address is IPv6 (absent in a handover from an older process:
    /// IPv4).
    #[serde(default)]
    pub v6: bool,
    /// A dual allocation (a relayed address of each family).
    #[serde(default)]
    pub dual: bool,
    /// When it was granted, Unix milliseconds (absent from an older process: the time of the
    /// import).
    #[serde(default)]
    pub started_ms: u64,
}

/// What the control plane hands to the next process in a hot upgrade.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControlSnapshot {
    /// Every allocation's owner record.
    pub owners: Vec<OwnerSnapshot>,
    /// The next session id to give.
    pub next_session: u64,
}

/// Who an authenticated Allocate is from: the user, the key to sign with, and the most lifetime
/// its credential allows (strict expiry).
struct Granted {
    user: Arc<str>,
    key: IntegrityKey,
    cap: Option<Duration>,
}

/// Control-plane counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct ControlStats {
    /// Requests received from workers.
    pub requests: u64,
    /// Allocations granted.
    pub allocations: u64,
    /// Error responses sent, all codes.
    pub errors: u64,
    /// Commands dropped because a worker's queue was full.
    pub queue_full: u64,
    /// Requests parked for a user-store lookup.
    pub parked: u64,
    /// Requests dropped because the parking table or the lookup queue was full, or their
    /// lookup took longer than 5 s.
    pub parked_dropped: u64,
    /// Requests over TCP/TLS answered 508 because their store lookup could not be queued or
    /// parked, or did not end in time (over UDP those are dropped: the client retransmits).
    pub busy_refusals: u64,
}

/// The control plane's state. Single-threaded: one control thread owns it.
pub struct ControlPlane {
    policy: Policy,
    credentials: Credentials,
    challenger: Challenger,
    /// Requests waiting for a store lookup, by what they wait for.
    parked: HashMap<LookupKey, Vec<Parked>>,
    parked_count: usize,
    /// Bytes of the requests in `parked` (bounded by `auth::MAX_PARKED_BYTES`).
    parked_bytes: usize,
    ports: Vec<PortSlice>,
    /// One record per allocation, in a dense vector indexed by a table of positions (so the
    /// 68-byte 5-tuple and the record are not spread over a power-of-two table's empty buckets;
    /// see the memory budget in docs/architecture.md). Removal is `swap_remove`.
    owners: IndexMap<FiveTuple, Owner, hashbrown::DefaultHashBuilder>,
    per_user: HashMap<Arc<str>, u32>,
    /// Relay sockets held for RESERVATION-TOKENs, with their deadlines.
    reservations: HashMap<[u8; 8], (Instant, UdpSocket)>,
    buf: Vec<u8>,
    /// The session id the next allocation gets.
    next_session: u64,
    /// Which relay address of its family the next allocation tries first.
    next_relay_ip: usize,
    /// While draining: new Allocates are refused, with 300 and this ALTERNATE-SERVER when one
    /// is set, else 508.
    draining: Option<Option<SocketAddr>>,
    /// TCP allocations (RFC 6062), when a TCP relay runs: without one, REQUESTED-TRANSPORT TCP
    /// earns 442.
    tcp: Option<tcp::TcpAllocations>,
    /// Allocates refused because every relay port was taken (a rate-limited log).
    ports_exhausted: refusals::RefusalLog,
    /// Allocates refused because no relay socket could be had (out of descriptors or memory).
    bind_refusals: refusals::RefusalLog,
    /// Counters.
    pub stats: ControlStats,
    /// What the metrics endpoint shows.
    pub metrics: Arc<ControlMetrics>,
    /// Where an Allocate goes while this node is over budget (crate::fleet::redirect).
    pub redirect: crate::fleet::redirect::Redirector,
    /// Fleet quotas (`fleet-redis` with `user-quota`): the quota thread, and the Allocates
    /// waiting for its verdict.
    fleet_quota: Option<crate::fleet::quota::FleetQuota>,
    quota_parked: HashMap<FiveTuple, fleet_quota::QuotaParked>,
}

impl ControlPlane {
    /// A control plane for `workers` workers sharing `port_range`; `challenger` mints and checks
    /// nonces (the workers hold clones of it).
    pub fn new(
        policy: Policy,
        credentials: Credentials,
        workers: usize,
        port_range: (u16, u16),
        challenger: Challenger,
    ) -> Self {
        ControlPlane {
            credentials,
            challenger,
            parked: HashMap::new(),
            parked_count: 0,
            parked_bytes: 0,
            ports: PortSlice::split(port_range.0, port_range.1, workers),
            owners: IndexMap::default(),
            per_user: HashMap::new(),
            reservations: HashMap::new(),
            buf: vec![0; RESPONSE_BUF],
            policy,
            next_session: 1,
            next_relay_ip: 0,
            draining: None,
            tcp: None,
            ports_exhausted: refusals::RefusalLog::new("Allocates refused: relay ports exhausted (508)"),
            bind_refusals: refusals::RefusalLog::new(
                "Allocates refused: no relay socket, out of descriptors or memory (508)",
            ),
            stats: ControlStats::default(),
            metrics: Arc::new(ControlMetrics::default()),
            redirect: Default::default(),
            fleet_quota: None,
            quota_parked: HashMap::new(),
        }
    }

    /// Stops granting allocations: from now on an Allocate gets 300 Try Alternate with
    /// ALTERNATE-SERVER `alternate` (RFC 8489 §10), or 508 without one. Existing allocations
    /// are untouched.
    pub fn drain(&mut self, alternate: Option<SocketAddr>) {
        if self.draining.is_none() {
            info!(alternate = ?alternate, allocations = self.owners.len(), "draining: new allocations refused");
        }
        self.draining = Some(alternate);
        self.metrics.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// True while draining.
    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }

    /// `Some(alternate)` while draining.
    pub fn draining(&self) -> Option<Option<SocketAddr>> {
        self.draining
    }

    /// The owner records and session counter, for the next process (hot upgrade).
    pub fn export(&self, now: Instant) -> ControlSnapshot {
        // TCP allocations end with their connections at the freeze: none is handed over.
        let owners = self
            .owners
            .iter()
            .filter(|(_, o)| o.tcp.is_none())
            .map(|(ft, o)| OwnerSnapshot {
                five_tuple: *ft,
                user: o.user.to_string(),
                tid: o.tid,
                lifetime_left_ms: o.expires.saturating_duration_since(now).as_millis() as u64,
                worker: o.worker,
                session: o.session,
                v6: o.v6,
                dual: o.dual,
                started_ms: o.started_ms,
            })
            .collect();
        ControlSnapshot { owners, next_session: self.next_session }
    }

    /// Takes over the previous process's owner records (hot upgrade); the quotas count them.
    pub fn import(&mut self, now: Instant, snap: ControlSnapshot) {
        self.next_session = self.next_session.max(snap.next_session);
        for o in snap.owners {
            let user: Arc<str> = o.user.into();
            *self.per_user.entry(user.clone()).or_default() += 1;
            let expires = now + Duration::from_millis(o.lifetime_left_ms);
            let owner = Owner {
                user,
                tid: o.tid,
                expires,
                worker: o.worker,
                session: o.session,
                v6: o.v6,
                dual: o.dual,
                tcp: None,
                started_ms: if o.started_ms == 0 { crate::usage::now_ms() } else { o.started_ms },
            };
            if let Some(old) = self.owners.insert(o.five_tuple, owner) {
                // Not expected (5-tuples are unique); keep the quota honest anyway.
                if let Some(n) = self.per_user.get_mut(&old.user) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        for user in self.per_user.keys() {
            self.publish_count(user);
        }
    }

    /// Ends the allocation with session id `session`; returns the command for its worker.
    pub fn revoke_session(&mut self, session: u64) -> Option<(usize, ToWorker)> {
        let (ft, o) = self.owners.iter().find(|(_, o)| o.session == session)?;
        info!(session, client = %ft.client, user = %o.user, "session revoked");
        Some((o.worker, ToWorker::Command(Command::Revoke { five_tuple: *ft, tid: o.tid })))
    }

    /// Number of allocations the control plane accounts for.
    pub fn allocations(&self) -> usize {
        self.owners.len()
    }

    /// A worker reported that `ft`'s allocation made by Allocate `tid` is gone: release its quota.
    /// A report about an older allocation on a 5-tuple that has a newer one changes nothing.
    /// Returns its user and start (Unix ms) when it was the one on record.
    pub fn released(&mut self, ft: &FiveTuple, tid: TransactionId) -> Option<(Arc<str>, u64)> {
        let o = self.owners.get(ft).filter(|o| o.tid == tid)?;
        let owner = (o.user.clone(), o.started_ms);
        self.forget(ft);
        Some(owner)
    }

    /// Each allocation's session id with its start (Unix ms) and client transport (interim
    /// usage records).
    pub fn usage_starts(&self) -> HashMap<u64, (u64, uturn_proto::relay::Transport)> {
        self.owners.iter().map(|(ft, o)| (o.session, (o.started_ms, ft.transport))).collect()
    }

    /// Drops `ft`'s owner record and its quota.
    fn forget(&mut self, ft: &FiveTuple) {
        if let Some(o) = self.owners.swap_remove(ft) {
            if let Some(n) = self.per_user.get_mut(&o.user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_user.remove(&o.user);
                }
            }
            self.publish_count(&o.user);
            if let Some(relayed) = o.tcp.as_deref().copied() {
                self.tcp_released(*ft, relayed);
            }
            debug!(client = %ft.client, user = %o.user, "allocation released");
        }
    }

    /// An Install could not be queued to its worker: forget the allocation, so the client's
    /// retransmission is handled afresh.
    pub fn install_dropped(&mut self, install: &Install) {
        let _ = self.released(&install.five_tuple, install.tid);
    }

    /// Handles one request a worker forwarded (received by the worker at `received`); returns
    /// what to push to worker `worker`.
    pub fn handle_request(
        &mut self,
        now: Instant,
        worker: usize,
        ft: FiveTuple,
        bytes: &[u8],
        received: Instant,
    ) -> Option<ToWorker> {
        self.handle(now, worker, ft, bytes, None, received)
    }

    /// [`handle_request`](Self::handle_request); with `known`, the user's resolution comes from
    /// a store answer instead of a new lookup (a parked request, handled again).
    fn handle(
        &mut self,
        now: Instant,
        worker: usize,
        ft: FiveTuple,
        bytes: &[u8],
        known: Option<Resolved>,
        received: Instant,
    ) -> Option<ToWorker> {
        self.stats.requests += 1;
        let msg = Message::parse(bytes).ok()?;
        if msg.class() != Class::Request {
            return None;
        }
        let answer = self.answer(now, worker, ft, &msg, bytes, known, received);
        if answer.is_some() && msg.method() == Method::ALLOCATE {
            self.metrics.allocate_latency(Instant::now().saturating_duration_since(received));
        }
        answer
    }

    #[allow(clippy::too_many_arguments)]
    fn answer(
        &mut self,
        now: Instant,
        worker: usize,
        ft: FiveTuple,
        msg: &Message<'_>,
        bytes: &[u8],
        known: Option<Resolved>,
        received: Instant,
    ) -> Option<ToWorker> {
        let msg = *msg;
        // No response cache: every answer built here is a function of the request, the state and
        // (for nonces) a time window, so a retransmission gets the same bytes; the one answer
        // that is not (Allocate success) is kept and resent by the worker.
        self.expire_reservations(now);
        let (user, key, expires_unix) = match self.authenticate(now, &ft, &msg, known) {
            Auth::Ok { user, key, expires_unix } => (user, key, expires_unix),
            // A refused ConnectionBind's connection is framed again (RFC 6062 §5.4).
            Auth::Reply(response) if msg.method() == Method::CONNECTION_BIND => {
                return Some(ToWorker::BindFailed { five_tuple: ft, response })
            }
            Auth::Reply(bytes) => return Some(reply(ft, bytes)),
            Auth::Pending(lookup) => {
                if self.park(now, lookup, worker, ft, bytes, received) {
                    return None;
                }
                return self.refuse_busy(ft, &msg);
            }
            Auth::Drop => {
                self.stats.parked_dropped += 1;
                return self.refuse_busy(ft, &msg);
            }
        };
        let cap = self.credential_cap(expires_unix);
        // RFC 8656 §7.2 and §5: after authentication comes the 5-tuple check (437), and only then
        // the request's own attributes, unknown comprehension-required ones (420) first.
        match msg.method() {
            Method::ALLOCATE => {
                self.allocate(now, worker, ft, &msg, Granted { user, key, cap }, Some((bytes, received)))
            }
            // RFC 6062 §5.4: on a new connection, which has no allocation.
            Method::CONNECTION_BIND => self.connection_bind(worker, ft, &msg, user, key),
            m => {
                // RFC 8656 §5: requests on an allocation need its 5-tuple and its credentials.
                let owner = match self.owners.get(&ft) {
                    None => Err(ErrorCode::AllocationMismatch),
                    Some(o) if o.user != user => {
                        self.metrics.auth(AuthOutcome::WrongCredentials);
                        Err(ErrorCode::WrongCredentials)
                    }
                    Some(_) if !msg.unknown_required().is_empty() => Err(ErrorCode::UnknownAttribute),
                    Some(_) => Ok(()),
                };
                let cmd = owner.and_then(|()| match m {
                    Method::REFRESH => self.refresh(now, ft, &msg, key, cap).map(Some),
                    Method::CREATE_PERMISSION => self.create_permission(ft, &msg, key).map(Some),
                    Method::CHANNEL_BIND => self.channel_bind(ft, &msg, key).map(Some),
                    // RFC 6062 §5.2: the TCP relay answers.
                    Method::CONNECT => self.connect(ft, &msg, key).map(|()| None),
                    _ => Err(ErrorCode::BadRequest),
                });
                match cmd {
                    Ok(None) => None,
                    Ok(Some(c)) => Some(ToWorker::Command(c)),
                    Err(code) => {
                        let r = self.error(&msg, code, Some(&key));
                        Some(reply(ft, r))
                    }
                }
            }
        }
    }

    /// The credential sources (for reload and counters).
    pub fn credentials_mut(&mut self) -> &mut Credentials {
        &mut self.credentials
    }

    /// Replaces the (private, public) relay address pairs advertised in XOR-RELAYED-ADDRESS
    /// from now on (`external-ip = "auto"` on SIGHUP); allocations made before keep theirs.
    pub fn set_external_ips(&mut self, pairs: Vec<(std::net::IpAddr, std::net::IpAddr)>) {
        self.policy.external_ips = pairs;
    }

    /// Ends every allocation of `user` (a username, or the user id of REST usernames
    /// `<expiry><sep><user>`); returns the commands for the workers that hold them. The
    /// workers report the ends, which release the quotas.
    pub fn revoke(&mut self, user: &str) -> Vec<(usize, ToWorker)> {
        let sep = self.credentials.separator();
        let matches = |name: &str| {
            name == user
                || crate::credentials::rest::expiry(name, sep).is_some()
                    && name.split_once(sep).is_some_and(|(_, id)| id == user)
        };
        let out: Vec<(usize, ToWorker)> = self
            .owners
            .iter()
            .filter(|(_, o)| matches(&o.user))
            .map(|(ft, o)| (o.worker, ToWorker::Command(Command::Revoke { five_tuple: *ft, tid: o.tid })))
            .collect();
        info!(user, allocations = out.len(), "user revoked");
        out
    }

    /// A 401 or 438 with REALM and a fresh NONCE (RFC 8489 §9.2.4).
    fn challenge(&mut self, now: Instant, ft: &FiveTuple, msg: &Message<'_>, code: ErrorCode) -> Vec<u8> {
        self.stats.errors += 1;
        if msg.method() == Method::ALLOCATE {
            self.metrics.refused(code.code());
        }
        let n = self
            .challenger
            .write(&mut self.buf, msg.method(), msg.transaction_id(), code, now, &ft.nonce_address())
            .unwrap_or(0);
        self.buf[..n].to_vec()
    }

    fn error(&mut self, msg: &Message<'_>, code: ErrorCode, key: Option<&IntegrityKey>) -> Vec<u8> {
        self.stats.errors += 1;
        if msg.method() == Method::ALLOCATE {
            self.metrics.refused(code.code());
        }
        debug!(method = msg.method().name(), code = code.code(), "error response");
        let n = response::error(&mut self.buf, msg.method(), msg.transaction_id(), code, msg.unknown_required(), key)
            .unwrap_or(0);
        self.buf[..n].to_vec()
    }

    /// Allocate after authentication (RFC 8656 §7.2 steps 2-8). With `request` (its bytes and
    /// when the worker received it), an Allocate that passes the local checks is parked for the
    /// fleet quota when one counts; without, the fleet has answered already.
    fn allocate(
        &mut self,
        now: Instant,
        worker: usize,
        ft: FiveTuple,
        msg: &Message<'_>,
        granted: Granted,
        request: Option<(&[u8], Instant)>,
    ) -> Option<ToWorker> {
        let Granted { user, key, cap } = granted;
        let tid = msg.transaction_id();
        if self.owners.get(&ft).is_some_and(|o| o.expires <= now) {
            // Lapsed: the worker ends it at the latest when it sees the Install below.
            self.forget(&ft);
        }
        let checked = if let Some(o) = self.owners.get(&ft) {
            if o.tid == tid {
                // A retransmission racing its own Install: the worker answers the next one.
                return None;
            }
            // RFC 8656 §7.2 step 2.
            Err(ErrorCode::AllocationMismatch)
        } else if let Some(over) = self.redirect.over_budget(self.draining.is_some(), self.owners.len()) {
            // RFC 8489 §10, RFC 8656 §6.2: over budget, a signed 300 names another node
            // (crate::fleet::redirect); without one, a draining node answers 508 and a full one
            // goes on to the quota check below (486).
            use crate::fleet::redirect::OverBudget;
            match self.redirect.pick(&ft, self.draining.flatten()) {
                Some(alt) => {
                    self.stats.errors += 1;
                    self.metrics.refused(ErrorCode::TryAlternate.code());
                    info!(client = %ft.client, %user, alternate = %alt, reason = ?over, "Allocate redirected (300)");
                    let n =
                        response::try_alternate(&mut self.buf, Method::ALLOCATE, tid, &alt, Some(&key)).unwrap_or(0);
                    return Some(reply(ft, self.buf[..n].to_vec()));
                }
                None if over == OverBudget::Draining => {
                    let r = self.error(msg, ErrorCode::InsufficientCapacity, Some(&key));
                    return Some(reply(ft, r));
                }
                None if !msg.unknown_required().is_empty() && !tcp::dont_fragment_only(msg) => {
                    Err(ErrorCode::UnknownAttribute)
                }
                None => self.check_allocate(&ft, msg, &user),
            }
        } else if !msg.unknown_required().is_empty() && !tcp::dont_fragment_only(msg) {
            Err(ErrorCode::UnknownAttribute)
        } else {
            self.check_allocate(&ft, msg, &user)
        };
        let (user, key) = match (&checked, request) {
            (Ok(_), Some((bytes, received))) if self.fleet_quota.is_some() => {
                match self.park_for_quota(now, worker, ft, tid, bytes, received, Granted { user, key, cap }) {
                    Ok(()) => return None,
                    Err(g) => (g.user, g.key),
                }
            }
            _ => (user, key),
        };
        match checked {
            Err(code) => {
                let r = self.error(msg, code, Some(&key));
                Some(reply(ft, r))
            }
            Ok(Checked { lifetime, tcp: true, v6, .. }) => {
                let lifetime = cap.map_or(lifetime, |c| lifetime.min(c));
                self.allocate_tcp(now, worker, ft, msg, Granted { user, key, cap: None }, lifetime, v6)
            }
            Ok(Checked { lifetime, port, v6, dual, tcp: false }) => {
                let lifetime = cap.map_or(lifetime, |c| lifetime.min(c));
                let (socket, token) = match self.relay_socket(now, worker, port, v6) {
                    Ok(Some(pair)) => pair,
                    Ok(None) => return Some(self.not_bound(worker, ft, msg, &key, None)),
                    Err(e) => return Some(self.not_bound(worker, ft, msg, &key, Some(e))),
                };
                let relayed = socket.local_addr().ok()?;
                let advertised = self.advertised(relayed);
                // RFC 8656 §7.2: a dual allocation's IPv6 address; a family not served, or
                // no port left in it, is told in ADDRESS-ERROR-CODE and the IPv4 one stands.
                let (additional, address_error) = if !dual {
                    (None, None)
                } else if !self.policy.relay_ips.iter().any(IpAddr::is_ipv6) {
                    (None, Some(ErrorCode::AddressFamilyNotSupported))
                } else {
                    match self.relay_socket(now, worker, PortRequest::Any, true) {
                        Ok(Some((s, _))) => (Some(s), None),
                        Ok(None) | Err(_) => (None, Some(ErrorCode::InsufficientCapacity)),
                    }
                };
                let additional_addr = additional.as_ref().and_then(|s| s.local_addr().ok());
                let advertised_additional = additional_addr.map(|a| self.advertised(a));
                let bytes = self.allocate_success(
                    msg,
                    &ft,
                    &advertised,
                    advertised_additional.as_ref(),
                    address_error,
                    lifetime,
                    token,
                    &key,
                );
                let session = self.next_session;
                self.next_session += 1;
                let owner = Owner {
                    user: user.clone(),
                    tid,
                    expires: now + lifetime,
                    worker,
                    session,
                    v6: relayed.is_ipv6(),
                    dual: additional.is_some(),
                    tcp: None,
                    started_ms: crate::usage::now_ms(),
                };
                self.record_grant(ft, owner);
                info!(
                    session,
                    worker,
                    client = %ft.client,
                    server = %ft.server,
                    %user,
                    transport = %ft.transport,
                    relayed = %advertised,
                    additional = ?advertised_additional,
                    lifetime_s = lifetime.as_secs(),
                    "allocation granted"
                );
                // The worker keeps the response and answers retransmissions.
                Some(ToWorker::Install(
                    Install {
                        five_tuple: ft,
                        tid,
                        relayed,
                        additional: additional_addr,
                        lifetime,
                        response: bytes.into(),
                        key,
                        session,
                        user,
                    },
                    socket,
                    additional,
                ))
            }
        }
    }

    /// Records a granted allocation's owner and counts it (quota, counters, metrics).
    fn record_grant(&mut self, ft: FiveTuple, owner: Owner) {
        *self.per_user.entry(owner.user.clone()).or_default() += 1;
        self.publish_count(&owner.user);
        self.owners.insert(ft, owner);
        self.stats.allocations += 1;
        self.metrics.granted();
    }

    /// The answer to an Allocate whose relayed transport address could not be bound: 508 when
    /// every port is taken (`error` is `None`) or the process is out of descriptors or memory
    /// (both logged as rate-limited summaries), 500 when binding failed otherwise.
    fn not_bound(
        &mut self,
        worker: usize,
        ft: FiveTuple,
        msg: &Message<'_>,
        key: &IntegrityKey,
        error: Option<std::io::Error>,
    ) -> ToWorker {
        let now = Instant::now();
        let code = match error {
            None => {
                self.ports_exhausted.record(now, worker, || "every relay port is taken".into());
                ErrorCode::InsufficientCapacity
            }
            // RFC 8656 §7.2: a capacity limit is 508 (the client tries another server).
            Some(e) if refusals::is_capacity_error(&e) => {
                self.bind_refusals.record(now, worker, || e.to_string());
                ErrorCode::InsufficientCapacity
            }
            Some(e) => {
                warn!(worker, "binding a relayed transport address failed: {e}");
                ErrorCode::ServerError
            }
        };
        let r = self.error(msg, code, Some(key));
        reply(ft, r)
    }

    /// Checks an Allocate on `ft` (RFC 8656 §7.2, RFC 6062 §5.1): what to allocate.
    fn check_allocate(&self, ft: &FiveTuple, msg: &Message<'_>, user: &str) -> Result<Checked, ErrorCode> {
        let transport = msg.get(attr::REQUESTED_TRANSPORT).ok_or(ErrorCode::BadRequest)?;
        if transport.len() != 4 {
            return Err(ErrorCode::BadRequest);
        }
        let tcp = match transport[0] {
            attr::TRANSPORT_UDP => false,
            attr::TRANSPORT_TCP if self.tcp.is_some() => true,
            _ => return Err(ErrorCode::UnsupportedTransportProtocol),
        };
        let family = msg.get(attr::REQUESTED_ADDRESS_FAMILY);
        let token = msg.get(attr::RESERVATION_TOKEN);
        let even = msg.get(attr::EVEN_PORT);
        // RFC 6062 §5.1: a TCP allocation only over TCP or TLS, and without the UDP-only
        // attributes; ADDITIONAL-ADDRESS-FAMILY (no dual TCP allocation) is refused the same way.
        if tcp
            && (ft.transport == uturn_proto::Transport::Udp
                || token.is_some()
                || even.is_some()
                || msg.get(attr::DONT_FRAGMENT).is_some()
                || msg.get(attr::ADDITIONAL_ADDRESS_FAMILY).is_some())
        {
            return Err(ErrorCode::BadRequest);
        }
        if (family.is_some() || even.is_some()) && token.is_some() {
            return Err(ErrorCode::BadRequest);
        }
        if let Some(t) = token {
            // RFC 8656 §18.10: a token is 8 bytes; anything else is a malformed request (400).
            // §7.2 step 5: a well-formed token that reserves nothing (unknown, expired) earns 508.
            let Ok(t) = <[u8; 8]>::try_from(t) else { return Err(ErrorCode::BadRequest) };
            if !self.reservations.contains_key(&t) {
                return Err(ErrorCode::InsufficientCapacity);
            }
        }
        if family.is_some() && msg.get(attr::ADDITIONAL_ADDRESS_FAMILY).is_some() {
            // RFC 8656 §7.2 item 6: REQUESTED-ADDRESS-FAMILY and ADDITIONAL-ADDRESS-FAMILY
            // together are a 400.
            return Err(ErrorCode::BadRequest);
        }
        if family.is_some_and(|f| f.len() != 4) || even.is_some_and(|e| e.len() != 1) {
            return Err(ErrorCode::BadRequest);
        }
        // RFC 8656 §7.2: no REQUESTED-ADDRESS-FAMILY means IPv4; a family this relay has no
        // relay address for earns 440.
        let v6 = match family.map(|f| f[0]) {
            None => false,
            Some(attr::FAMILY_IPV4) => false,
            Some(attr::FAMILY_IPV6) => true,
            Some(_) => return Err(ErrorCode::BadRequest),
        };
        if !self.policy.relay_ips.iter().any(|ip| ip.is_ipv6() == v6) {
            return Err(ErrorCode::AddressFamilyNotSupported);
        }
        // RFC 8656 §7.2 item 7: ADDITIONAL-ADDRESS-FAMILY asks for an IPv6 address besides the
        // IPv4 one; any other value is a 400.
        let dual = match msg.get(attr::ADDITIONAL_ADDRESS_FAMILY) {
            None => false,
            Some(f) if f.len() == 4 && f[0] == attr::FAMILY_IPV6 => true,
            Some(_) => return Err(ErrorCode::BadRequest),
        };
        let quota = |q: u32, n: usize| q != 0 && n >= q as usize;
        if quota(self.policy.total_quota, self.owners.len())
            || quota(self.policy.user_quota, self.per_user.get(user).copied().unwrap_or(0) as usize)
        {
            return Err(ErrorCode::AllocationQuotaReached);
        }
        let lifetime = self.lifetime(msg)?;
        let port = match (token, even) {
            (Some(t), _) => PortRequest::Reserved(t.try_into().map_err(|_| ErrorCode::BadRequest)?),
            (None, Some(e)) if e.first().is_some_and(|b| b & 0x80 != 0) => PortRequest::EvenAndReserveNext,
            (None, Some(_)) => PortRequest::Even,
            (None, None) => PortRequest::Any,
        };
        let lifetime = if lifetime.is_zero() { self.policy.default_lifetime } else { lifetime };
        Ok(Checked { lifetime, port, v6, dual, tcp })
    }

    /// The granted lifetime: the requested one clamped to [default, max]; zero stays zero
    /// (Refresh deletes); absent means default (RFC 8656 §7.2, §8).
    fn lifetime(&self, msg: &Message<'_>) -> Result<Duration, ErrorCode> {
        match msg.u32_attr(attr::LIFETIME) {
            None => Ok(self.policy.default_lifetime),
            Some(Err(_)) => Err(ErrorCode::BadRequest),
            Some(Ok(0)) => Ok(Duration::ZERO),
            Some(Ok(s)) => {
                Ok(Duration::from_secs(s as u64).clamp(self.policy.default_lifetime, self.policy.max_lifetime))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn allocate_success(
        &mut self,
        msg: &Message<'_>,
        ft: &FiveTuple,
        relayed: &SocketAddr,
        additional: Option<&SocketAddr>,
        address_error: Option<ErrorCode>,
        lifetime: Duration,
        token: Option<[u8; 8]>,
        key: &IntegrityKey,
    ) -> Vec<u8> {
        let n = (|| {
            let mut w = response::start(&mut self.buf, Method::ALLOCATE, Class::Success, msg.transaction_id())?;
            w.xor_address(attr::XOR_RELAYED_ADDRESS, relayed)?;
            if let Some(a) = additional {
                w.xor_address(attr::XOR_RELAYED_ADDRESS, a)?;
            }
            if let Some(code) = address_error {
                // RFC 8656 §18.12: the family not allocated, then class and number.
                let n = code.code();
                let mut v = vec![attr::FAMILY_IPV6, 0, (n / 100) as u8, (n % 100) as u8];
                v.extend_from_slice(code.reason().as_bytes());
                w.bytes(attr::ADDRESS_ERROR_CODE, &v)?;
            }
            w.xor_address(attr::XOR_MAPPED_ADDRESS, &ft.client)?;
            w.u32(attr::LIFETIME, lifetime.as_secs() as u32)?;
            if let Some(t) = token {
                w.bytes(attr::RESERVATION_TOKEN, &t)?;
            }
            response::seal(w, Some(key))
        })()
        .unwrap_or(0);
        self.buf[..n].to_vec()
    }

    fn refresh(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        key: IntegrityKey,
        cap: Option<Duration>,
    ) -> Result<Command, ErrorCode> {
        // RFC 8656 §8: a REQUESTED-ADDRESS-FAMILY whose value does not match the allocation's
        // family earns 443; a malformed value (not 4 bytes, or an unknown family) does not
        // match either, so it gets 443 too (docs/rfc-compliance.md).
        if let Some(f) = msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let (v6, dual) = self.owners.get(&ft).map_or((false, false), |o| (o.v6, o.dual));
            let want = if v6 { attr::FAMILY_IPV6 } else { attr::FAMILY_IPV4 };
            if f.len() != 4 || (f[0] != want && !(dual && f[0] == attr::FAMILY_IPV6)) {
                return Err(ErrorCode::PeerAddressFamilyMismatch);
            }
        }
        let lifetime = self.lifetime(msg)?;
        let lifetime = cap.map_or(lifetime, |c| lifetime.min(c));
        if let Some(o) = self.owners.get_mut(&ft) {
            // The worker refuses (437) and reports the end if the allocation has lapsed there.
            o.expires = now + lifetime;
        }
        Ok(Command::Refresh { five_tuple: ft, tid: msg.transaction_id(), lifetime, key })
    }

    /// RFC 8656 §9.1, §12.2: a peer of the other family than `ft`'s relayed address earns 443.
    fn check_peer(
        &self,
        ft: &FiveTuple,
        peer: Result<SocketAddr, uturn_proto::wire::AddressError>,
    ) -> Result<SocketAddr, ErrorCode> {
        let peer = peer.map_err(|_| ErrorCode::BadRequest)?;
        let (v6, dual, tcp) = self.owners.get(ft).map_or((false, false, false), |o| (o.v6, o.dual, o.tcp.is_some()));
        if peer.is_ipv6() != v6 && !dual {
            return Err(ErrorCode::PeerAddressFamilyMismatch);
        }
        // A TCP allocation may not reach the relay's own addresses on any port (RFC 8656 §21).
        let allowed = if tcp { self.policy.peers.allows_tcp(peer) } else { self.policy.peers.allows(peer) };
        if !allowed {
            return Err(ErrorCode::Forbidden);
        }
        Ok(peer)
    }

    /// RFC 8656 §10.2: every XOR-PEER-ADDRESS must pass, or none is installed.
    fn create_permission(&self, ft: FiveTuple, msg: &Message<'_>, key: IntegrityKey) -> Result<Command, ErrorCode> {
        let peers =
            msg.peer_addresses().map(|p| self.check_peer(&ft, p).map(|a| a.ip())).collect::<Result<Vec<_>, _>>()?;
        if peers.is_empty() {
            return Err(ErrorCode::BadRequest);
        }
        self.tcp_permit(&ft, &peers);
        Ok(Command::CreatePermission { five_tuple: ft, tid: msg.transaction_id(), peers, key })
    }

    /// RFC 8656 §12.2: CHANNEL-NUMBER in 0x4000-0x4FFF and one allowed XOR-PEER-ADDRESS.
    fn channel_bind(&self, ft: FiveTuple, msg: &Message<'_>, key: IntegrityKey) -> Result<Command, ErrorCode> {
        // RFC 6062: a TCP allocation's data flows on data connections, never on channels.
        if self.owners.get(&ft).is_some_and(|o| o.tcp.is_some()) {
            return Err(ErrorCode::BadRequest);
        }
        let number = match msg.u32_attr(attr::CHANNEL_NUMBER) {
            Some(Ok(v)) => (v >> 16) as u16,
            _ => return Err(ErrorCode::BadRequest),
        };
        let channel =
            if self.policy.rfc5766_channels { ChannelNumber::new_rfc5766(number) } else { ChannelNumber::new(number) };
        let channel = channel.ok_or(ErrorCode::BadRequest)?;
        let peer = self.check_peer(&ft, msg.xor_address(attr::XOR_PEER_ADDRESS).ok_or(ErrorCode::BadRequest)?)?;
        Ok(Command::ChannelBind { five_tuple: ft, tid: msg.transaction_id(), channel, peer, key })
    }
}

/// What a checked Allocate asks for.
struct Checked {
    /// The lifetime, before the credential's cap.
    lifetime: Duration,
    /// Which relay port.
    port: PortRequest,
    /// The relayed address is IPv6.
    v6: bool,
    /// An IPv6 relayed address besides the IPv4 one (a dual allocation).
    dual: bool,
    /// A TCP allocation (RFC 6062).
    tcp: bool,
}

fn reply(five_tuple: FiveTuple, bytes: Vec<u8>) -> ToWorker {
    ToWorker::Command(Command::Reply { five_tuple, bytes })
}

mod auth;
mod fleet_quota;
mod refusals;
mod relay_ports;
mod tcp;
#[cfg(test)]
mod tests;
