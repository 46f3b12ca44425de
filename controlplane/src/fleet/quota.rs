//! Per-user allocation quotas across a fleet (`user-quota` with `fleet-redis`): a user holds at
//! most `user-quota` allocations on all the nodes together, and a node that dies gives its
//! share back within a lease.
//!
//! # Layout in Redis
//!
//! | key                                   | type   | field            | value                      |
//! |---------------------------------------|--------|------------------|----------------------------|
//! | `uturn:quota:user:<user>`             | hash   | `<node>/<boot>`  | the user's allocations there |
//! | `uturn:quota:alive:<node>/<boot>`     | string |                  | `1`, expires after the lease |
//!
//! `<node>` is `node-id`, `<boot>` 8 random hex digits drawn at each start, so a restarted
//! node never inherits the counts of its previous life. A node refreshes its alive key every
//! third of `quota-lease` (default 10 s); a crashed node's key lapses within the lease, and from
//! then on its fields count for nothing (the check below deletes them as it meets them). A
//! node that stops cleanly deletes its alive key at once. User hashes expire an hour after
//! their last write ([`USER_TTL`]); a live node re-publishes all its counts every
//! [`REPUBLISH_EVERY`], so only abandoned hashes expire.
//!
//! # The check, and why it parks the Allocate
//!
//! An Allocate that passes every local check (the node's own count of the user included) is
//! parked, like a request waiting for the user store, while this module's thread runs one Lua
//! script ([`CHECK`], atomic in Redis): it sums the user's counts on the live nodes other than
//! this one, adds this node's own count as the control plane knows it, refuses (486) at
//! `user-quota`, and otherwise writes this node's count plus one before answering. So two
//! nodes racing for a user's last allocation cannot both win: the fleet total is exact, at the
//! cost of one Redis round trip on an Allocate of a user with a quota (the control loop goes on
//! with other work meanwhile; the packet path is never involved). A locally refreshed fleet
//! view would cost no round trip but let every node overshoot by what it grants between two
//! refreshes; an exact quota is what billing and abuse limits need.
//!
//! After the Allocate ends either way, and whenever an allocation ends, the control plane
//! sends the user's count on this node; the thread keeps the latest per user and writes it
//! (HSET, or HDEL at zero) before its next check, or within [`FLUSH_EVERY`] (50 ms): the control
//! plane's count is the truth, Redis a copy of it that lags by at most that for decreases.
//!
//! # Redis operations
//!
//! Per Allocate of a user with a quota: 1 EVAL (inside: one HGETALL, one EXISTS per other node
//! holding the user, one HSET, one PEXPIRE). Per allocation end: 1 HDEL when it was the user's
//! last on this node, else 2 writes (HSET + PEXPIRE), coalesced per user over 50 ms and sent in
//! the same pipelined round trip as the next checks. A count Redis holds already is not written
//! again. So a user costs at most 3 commands per allocation lifetime, and a user who allocates
//! and ends allocations faster than every 50 ms costs little more than the EVAL
//! (`scripts/bench-fleet.sh`, docs/scaling.md). Commands are pipelined: everything queued while
//! a round trip runs goes in the next one. Per node: one SET PX every lease/3. Without
//! `user-quota` nothing is written.
//!
//! # Redis unreachable
//!
//! A failed round trip (1 s timeouts) marks Redis down: one WARN per outage, Allocates are
//! checked against this node's own count alone (as a node without a fleet does), and the
//! thread retries every second. When Redis answers again, the thread re-publishes every count
//! of this node (its Redis may have lost them), logs one INFO and checks across the fleet again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tracing::{debug, info};
use uturn_proto::wire::TransactionId;
use uturn_proto::FiveTuple;

use crate::store::mask_redis;

/// Prefix of the per-user hash of counts per node.
pub const USER_PREFIX: &str = "uturn:quota:user:";
/// Prefix of the per-node alive keys (the lease).
pub const ALIVE_PREFIX: &str = "uturn:quota:alive:";
/// How long a user hash lives after its last write.
pub const USER_TTL: Duration = Duration::from_secs(3600);
/// How often a live node writes all its counts again.
pub const REPUBLISH_EVERY: Duration = Duration::from_secs(600);
/// Read, write and connect timeout of the connection.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// How long after a failure the thread tries Redis again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Default `quota-lease`, seconds.
pub const DEFAULT_LEASE_SECS: u64 = 10;
/// Longest a changed count of this node waits before it is written to Redis. Only decreases
/// wait (a granted Allocate is written by its check at once), so meanwhile other nodes see this
/// node's count too high, never too low: a quota is never exceeded, at worst reached this much
/// early.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Most jobs in one pipelined round trip.
const BATCH: usize = 1024;

/// KEYS user hash; ARGV this node's field, quota, this node's count, alive prefix, hash TTL in
/// ms. Returns {1, fleet total with this Allocate} when granted (this node's field is then
/// count + 1), {0, fleet total} when the quota is reached. Fields of nodes whose alive key
/// lapsed are deleted and not counted.
pub const CHECK: &str = "
local h = redis.call('HGETALL', KEYS[1])
local total = tonumber(ARGV[3])
for i = 1, #h, 2 do
  if h[i] ~= ARGV[1] then
    if redis.call('EXISTS', ARGV[4] .. h[i]) == 1 then
      total = total + tonumber(h[i + 1])
    else
      redis.call('HDEL', KEYS[1], h[i])
    end
  end
end
if total >= tonumber(ARGV[2]) then return {0, total} end
redis.call('HSET', KEYS[1], ARGV[1], tonumber(ARGV[3]) + 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1, total + 1}";

/// The fleet's answer to one Allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Below the quota on the fleet: this node's count in Redis already includes it.
    Allowed,
    /// The fleet total (on the live nodes, this one included) is at the quota: 486.
    Denied {
        /// The user's allocations on the fleet.
        fleet: u32,
    },
    /// Redis could not answer: the node's own count decides.
    Unavailable,
}

/// The verdict for the Allocate `tid` on `five_tuple`.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// The Allocate's 5-tuple.
    pub five_tuple: FiveTuple,
    /// Its transaction.
    pub tid: TransactionId,
    /// What the fleet says.
    pub verdict: Verdict,
}

/// Counters of the quota thread (`uturn_fleet_quota_*` in the metrics).
#[derive(Debug, Default)]
pub struct QuotaMetrics {
    /// Redis commands sent (pipelined ones counted one by one).
    pub redis_ops: AtomicU64,
    /// Round trips or connection attempts that failed.
    pub redis_errors: AtomicU64,
    /// Allocates checked against the fleet.
    pub checks: AtomicU64,
    /// Of those, refused because the fleet total was at the quota.
    pub denied: AtomicU64,
    /// True while Redis answers (quotas count across the fleet).
    pub up: AtomicBool,
}

enum Job {
    Check { five_tuple: FiveTuple, tid: TransactionId, user: Arc<str>, local: u32 },
    Count { user: Arc<str>, n: u32 },
}

/// The control loop's side of the quota thread. Nothing here blocks: jobs go over an
/// unbounded queue, answers come back over another and unpark the control thread.
pub struct FleetQuota {
    jobs: Option<Sender<Job>>,
    answers: Receiver<Answer>,
    metrics: Arc<QuotaMetrics>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FleetQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetQuota").field("up", &self.is_up()).finish_non_exhaustive()
    }
}

impl FleetQuota {
    /// Starts the quota thread for node `node_id` on the Redis at `url`, with `quota`
    /// allocations per user (> 0) and a lease of `lease`; each answer unparks `control`.
    /// Errors: `url` is not a Redis URL, or the thread cannot be started. Redis being
    /// unreachable is no error (see the module docs).
    pub fn start(url: &str, node_id: &str, quota: u32, lease: Duration, control: Thread) -> anyhow::Result<Self> {
        let client = ::redis::Client::open(url).map_err(|e| anyhow::anyhow!("fleet-redis {}: {e}", mask_redis(url)))?;
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
        let (answers_tx, answers) = crossbeam_channel::unbounded();
        let metrics = Arc::new(QuotaMetrics::default());
        let field = format!("{node_id}/{:08x}", rand::random::<u32>());
        let mut state = QuotaThread {
            client,
            shown: mask_redis(url),
            conn: None,
            alive_key: format!("{ALIVE_PREFIX}{field}"),
            field,
            quota,
            lease: lease.max(Duration::from_secs(1)),
            mirror: HashMap::new(),
            dirty: HashMap::new(),
            last_flush: Instant::now(),
            warned: false,
            first: true,
            last_try: None,
            last_alive: Instant::now(),
            last_republish: Instant::now(),
            metrics: metrics.clone(),
            answers: answers_tx,
            control,
        };
        let thread = std::thread::Builder::new().name("uturn-fleet-quota".into()).spawn(move || state.run(&jobs_rx))?;
        Ok(FleetQuota { jobs: Some(jobs_tx), answers, metrics, thread: Some(thread) })
    }

    /// True while Redis answers: Allocates are then checked across the fleet.
    pub fn is_up(&self) -> bool {
        self.metrics.up.load(Ordering::Relaxed)
    }

    /// The thread's counters.
    pub fn metrics(&self) -> Arc<QuotaMetrics> {
        self.metrics.clone()
    }

    /// Asks the fleet whether `user`, holding `local` allocations on this node, may have one
    /// more (the Allocate `tid` on `five_tuple`); the answer comes from
    /// [`try_answer`](Self::try_answer). False when the thread is gone.
    pub fn check(&self, five_tuple: FiveTuple, tid: TransactionId, user: Arc<str>, local: u32) -> bool {
        self.send(Job::Check { five_tuple, tid, user, local })
    }

    /// Publishes that `user` now holds `n` allocations on this node.
    pub fn count(&self, user: Arc<str>, n: u32) {
        self.send(Job::Count { user, n });
    }

    fn send(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }

    /// The next verdict that arrived, if any.
    pub fn try_answer(&self) -> Option<Answer> {
        self.answers.try_recv().ok()
    }
}

impl Drop for FleetQuota {
    fn drop(&mut self) {
        // Closing the queue ends the thread after its current round trip; it deletes its
        // alive key on the way out, so this node's counts stop counting at once.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct QuotaThread {
    client: ::redis::Client,
    shown: String,
    conn: Option<::redis::Connection>,
    field: String,
    alive_key: String,
    quota: u32,
    lease: Duration,
    /// This node's count per user as written to Redis (while Redis is down: as last told by
    /// the control plane), re-published after an outage; a count Redis holds already is not
    /// written again.
    mirror: HashMap<Arc<str>, u32>,
    /// Counts of this node that changed since Redis last had them (allocation ends, Allocates
    /// that failed after their check): written at most every [`FLUSH_EVERY`], or before the next
    /// check, one write per user however many changes came in between.
    dirty: HashMap<Arc<str>, u32>,
    last_flush: Instant,
    /// The WARN of the current outage was logged.
    warned: bool,
    /// Redis has not answered yet since the start.
    first: bool,
    last_try: Option<Instant>,
    last_alive: Instant,
    last_republish: Instant,
    metrics: Arc<QuotaMetrics>,
    answers: Sender<Answer>,
    control: Thread,
}

fn user_key(user: &str) -> String {
    format!("{USER_PREFIX}{user}")
}

impl QuotaThread {
    fn run(&mut self, jobs: &Receiver<Job>) {
        let tick = self.lease / 3;
        loop {
            let mut batch = Vec::new();
            let wait = if self.dirty.is_empty() { tick.min(RETRY_AFTER) } else { FLUSH_EVERY };
            match jobs.recv_timeout(wait) {
                Ok(j) => batch.push(j),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while batch.len() < BATCH {
                match jobs.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            if self.conn.is_none() && self.last_try.is_none_or(|t| t.elapsed() >= RETRY_AFTER) {
                self.reconnect();
            }
            let verdicts = if self.conn.is_some() {
                self.round_trip(&batch)
            } else {
                self.apply_counts(&batch);
                None
            };
            self.answer(&batch, verdicts);
            if self.conn.is_some() && self.last_alive.elapsed() >= tick {
                self.refresh_lease();
            }
        }
        // A clean stop: this node's counts lapse now rather than after the lease.
        if let Some(c) = self.conn.as_mut() {
            let _: ::redis::RedisResult<()> = ::redis::cmd("DEL").arg(&self.alive_key).query(c);
        }
    }

    /// Keeps the mirror of this node's counts while Redis is down.
    fn apply_counts(&mut self, batch: &[Job]) {
        for (user, n) in self.dirty.drain() {
            if n == 0 {
                self.mirror.remove(&user);
            } else {
                self.mirror.insert(user, n);
            }
        }
        for job in batch {
            if let Job::Count { user, n } = job {
                if *n == 0 {
                    self.mirror.remove(user);
                } else {
                    self.mirror.insert(user.clone(), *n);
                }
            }
        }
    }

    /// Redis failed: drop the connection, go local, WARN once per outage.
    fn down(&mut self, e: &dyn std::fmt::Display) {
        self.conn = None;
        self.last_try = Some(Instant::now());
        self.metrics.redis_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.up.store(false, Ordering::Relaxed);
        if !self.warned {
            self.warned = true;
            super::outage::failed("fleet quota", e, "user-quota is enforced by this node alone");
        } else {
            debug!(redis = %self.shown, "fleet quota: Redis still unreachable: {e}");
        }
    }

    /// Connects, then writes the alive key and every count of this node.
    fn reconnect(&mut self) {
        self.last_try = Some(Instant::now());
        let conn = self.client.get_connection_with_timeout(TIMEOUT).and_then(|c| {
            c.set_read_timeout(Some(TIMEOUT))?;
            c.set_write_timeout(Some(TIMEOUT))?;
            Ok(c)
        });
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => return self.down(&e),
        };
        let ttl = USER_TTL.as_millis() as u64;
        let mut p = ::redis::pipe();
        p.cmd("SET").arg(&self.alive_key).arg(1).arg("PX").arg(self.lease.as_millis() as u64).ignore();
        for (user, n) in &self.mirror {
            let key = user_key(user);
            p.cmd("HSET").arg(&key).arg(&self.field).arg(*n).ignore();
            p.cmd("PEXPIRE").arg(&key).arg(ttl).ignore();
        }
        self.metrics.redis_ops.fetch_add(1 + 2 * self.mirror.len() as u64, Ordering::Relaxed);
        if let Err(e) = p.query::<()>(&mut conn) {
            return self.down(&e);
        }
        self.conn = Some(conn);
        self.last_alive = Instant::now();
        self.last_republish = Instant::now();
        self.metrics.up.store(true, Ordering::Relaxed);
        if self.first {
            info!(redis = %self.shown, node = %self.field, quota = self.quota, lease_s = self.lease.as_secs(),
                "fleet quota: user-quota counts allocations on every node");
        } else {
            info!(redis = %self.shown, users = self.mirror.len(),
                "fleet quota: Redis answers again; this node's counts re-published, quotas count across the fleet");
        }
        self.first = false;
        self.warned = false;
        super::outage::answered("fleet quota");
    }

    /// One pipelined round trip for `batch`; the verdicts of its checks in order, or `None`
    /// when Redis failed (then it is down).
    fn round_trip(&mut self, batch: &[Job]) -> Option<Vec<Verdict>> {
        let ttl = USER_TTL.as_millis() as u64;
        let mut checks = false;
        // Users whose last job here is a check: a granted check writes their newer count itself,
        // so their changed count is held back (written later only if the check is refused).
        let mut checked_last: HashMap<&Arc<str>, bool> = HashMap::new();
        for job in batch {
            match job {
                Job::Count { user, .. } => checked_last.insert(user, false),
                Job::Check { user, .. } => checked_last.insert(user, true),
            };
        }
        for job in batch {
            match job {
                // Redis holds this count already (the check that granted it wrote it).
                Job::Count { user, n } if self.mirror.get(user).copied().unwrap_or(0) == *n => {
                    self.dirty.remove(user);
                }
                Job::Count { user, n } => {
                    self.dirty.insert(user.clone(), *n);
                }
                Job::Check { .. } => checks = true,
            }
        }
        let flush = !self.dirty.is_empty() && self.last_flush.elapsed() >= FLUSH_EVERY;
        if !checks && !flush {
            return Some(Vec::new());
        }
        let mut p = ::redis::pipe();
        let mut ops = 0;
        // The changed counts first: a check below overwrites its user's with a newer one.
        if flush {
            self.last_flush = Instant::now();
            let held: Vec<(Arc<str>, u32)> =
                self.dirty.iter().filter(|(u, _)| checked_last.get(u) == Some(&true)).map(|(u, n)| (u.clone(), *n)).collect();
            let due: Vec<(Arc<str>, u32)> = self.dirty.drain().collect();
            self.dirty.extend(held.iter().cloned());
            for (user, n) in due.into_iter().filter(|(u, _)| checked_last.get(u) != Some(&true)) {
                if n > 0 {
                    p.cmd("HSET").arg(user_key(&user)).arg(&self.field).arg(n).ignore();
                    p.cmd("PEXPIRE").arg(user_key(&user)).arg(ttl).ignore();
                    ops += 2;
                    self.mirror.insert(user, n);
                } else {
                    p.cmd("HDEL").arg(user_key(&user)).arg(&self.field).ignore();
                    ops += 1;
                    self.mirror.remove(&user);
                }
            }
        }
        for job in batch {
            match job {
                Job::Count { .. } => {}
                Job::Check { user, local, .. } => {
                    p.cmd("EVAL").arg(CHECK).arg(1).arg(user_key(user));
                    p.arg(&self.field).arg(self.quota).arg(*local).arg(ALIVE_PREFIX).arg(ttl);
                    ops += 1;
                }
            }
        }
        self.metrics.redis_ops.fetch_add(ops, Ordering::Relaxed);
        let conn = self.conn.as_mut()?;
        match p.query::<Vec<(i64, i64)>>(conn) {
            Ok(results) => Some(
                results
                    .into_iter()
                    .map(|(ok, total)| {
                        if ok == 1 {
                            Verdict::Allowed
                        } else {
                            Verdict::Denied { fleet: total.clamp(0, u32::MAX as i64) as u32 }
                        }
                    })
                    .collect(),
            ),
            Err(e) => {
                self.down(&e);
                None
            }
        }
    }

    /// Sends the checks' verdicts (Unavailable without Redis) and unparks the control thread.
    fn answer(&mut self, batch: &[Job], verdicts: Option<Vec<Verdict>>) {
        let mut verdicts = verdicts.unwrap_or_default().into_iter();
        let mut any = false;
        // Where each user's last count change in the batch is.
        let mut last_count: HashMap<&Arc<str>, usize> = HashMap::new();
        for (i, job) in batch.iter().enumerate() {
            if let Job::Count { user, .. } = job {
                last_count.insert(user, i);
            }
        }
        for (i, job) in batch.iter().enumerate() {
            let Job::Check { five_tuple, tid, user, local } = job else { continue };
            let verdict = verdicts.next().unwrap_or(Verdict::Unavailable);
            self.metrics.checks.fetch_add(1, Ordering::Relaxed);
            match verdict {
                Verdict::Allowed => {
                    // As written in Redis, until the control plane's count follows; a change held
                    // back from before this check is older than what the check wrote.
                    self.mirror.insert(user.clone(), local + 1);
                    if last_count.get(user).is_none_or(|&c| c < i) && self.conn.is_some() {
                        self.dirty.remove(user);
                    }
                }
                Verdict::Denied { fleet } => {
                    self.metrics.denied.fetch_add(1, Ordering::Relaxed);
                    debug!(%user, fleet, quota = self.quota, "fleet quota reached");
                }
                Verdict::Unavailable => {}
            }
            any = true;
            if self.answers.send(Answer { five_tuple: *five_tuple, tid: *tid, verdict }).is_err() {
                return;
            }
        }
        if any {
            self.control.unpark();
        }
    }

    /// Extends this node's lease, and re-publishes its counts when due.
    fn refresh_lease(&mut self) {
        let Some(conn) = self.conn.as_mut() else { return };
        let mut p = ::redis::pipe();
        p.cmd("SET").arg(&self.alive_key).arg(1).arg("PX").arg(self.lease.as_millis() as u64).ignore();
        let mut ops = 1;
        let republish = self.last_republish.elapsed() >= REPUBLISH_EVERY;
        if republish {
            let ttl = USER_TTL.as_millis() as u64;
            for (user, n) in &self.mirror {
                p.cmd("HSET").arg(user_key(user)).arg(&self.field).arg(*n).ignore();
                p.cmd("PEXPIRE").arg(user_key(user)).arg(ttl).ignore();
                ops += 2;
            }
        }
        self.metrics.redis_ops.fetch_add(ops, Ordering::Relaxed);
        match p.query::<()>(conn) {
            Ok(()) => {
                self.last_alive = Instant::now();
                if republish {
                    self.last_republish = Instant::now();
                }
            }
            Err(e) => self.down(&e),
        }
    }
}
