//! The control plane's side of fleet quotas ([`crate::fleet::quota`]): an Allocate that passed
//! every local check is parked while the quota thread asks Redis, then finished (or refused
//! with 486) when the verdict comes back; every change of a user's count on this node is
//! published. Nothing here waits.

use std::sync::Arc;
use std::time::Instant;

use tracing::debug;
use uturn_dataplane::ToWorker;
use uturn_proto::response::ErrorCode;
use uturn_proto::wire::{Message, TransactionId};
use uturn_proto::FiveTuple;

use super::{reply, ControlPlane, Granted, MAX_PARKED, PARK_TIMEOUT};
use crate::fleet::quota::{FleetQuota, Verdict};

/// An authenticated Allocate waiting for the fleet's verdict.
pub(super) struct QuotaParked {
    worker: usize,
    tid: TransactionId,
    bytes: Box<[u8]>,
    granted: Granted,
    since: Instant,
    received: Instant,
}

impl ControlPlane {
    /// Counts `user-quota` across the fleet through `quota` (started by the server when
    /// `fleet-redis` and `user-quota` are set). Set before a hot upgrade's owners are imported,
    /// so their counts are published.
    pub fn set_fleet_quota(&mut self, quota: FleetQuota) {
        let _ = self.metrics.fleet_quota.set(quota.metrics());
        self.fleet_quota = Some(quota);
    }

    /// The quota thread, when quotas count across the fleet.
    pub fn fleet_quota(&self) -> Option<&FleetQuota> {
        self.fleet_quota.as_ref()
    }

    /// Publishes `user`'s count of allocations on this node (after it changed).
    pub(super) fn publish_count(&self, user: &Arc<str>) {
        if let Some(q) = &self.fleet_quota {
            q.count(user.clone(), self.per_user.get(user).copied().unwrap_or(0));
        }
    }

    /// Parks the Allocate `msg` (raw `bytes`) of `granted.user` on `ft` for the fleet's
    /// verdict; `Err(granted)` hands it back when the fleet is not asked (no fleet quota,
    /// Redis down, the parking table full, the thread gone): the local check stands.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn park_for_quota(
        &mut self,
        now: Instant,
        worker: usize,
        ft: FiveTuple,
        tid: TransactionId,
        bytes: &[u8],
        received: Instant,
        granted: Granted,
    ) -> Result<(), Granted> {
        let Some(q) = self.fleet_quota.as_ref().filter(|q| q.is_up() && self.policy.user_quota != 0) else {
            return Err(granted);
        };
        if self.quota_parked.contains_key(&ft) {
            // A retransmission (or a second Allocate) while the first waits: the first answers.
            return Ok(());
        }
        if self.quota_parked.len() >= MAX_PARKED {
            return Err(granted);
        }
        // Allocates of the same user still waiting count as granted, so two racing on this
        // node cannot both take the last one.
        let waiting = self.quota_parked.values().filter(|p| p.granted.user == granted.user).count() as u32;
        let local = self.per_user.get(&granted.user).copied().unwrap_or(0) + waiting;
        if !q.check(ft, tid, granted.user.clone(), local) {
            return Err(granted);
        }
        self.quota_parked.insert(ft, QuotaParked { worker, tid, bytes: bytes.into(), granted, since: now, received });
        Ok(())
    }

    /// Finishes the Allocates whose fleet verdicts arrived; drops those waiting longer than
    /// 5 s (over TCP/TLS answered 508). Returns what to push to which worker.
    pub(super) fn poll_fleet_quota(&mut self, now: Instant) -> Vec<(usize, ToWorker)> {
        let mut out = Vec::new();
        let Some(q) = &self.fleet_quota else { return out };
        let mut answers = Vec::new();
        while let Some(a) = q.try_answer() {
            answers.push(a);
        }
        for a in answers {
            let Some(p) = self.quota_parked.remove(&a.five_tuple) else { continue };
            if p.tid != a.tid {
                self.quota_parked.insert(a.five_tuple, p);
                continue;
            }
            let user = p.granted.user.clone();
            let before = self.per_user.get(&user).copied();
            let Ok(msg) = Message::parse(&p.bytes) else { continue };
            let answer = match a.verdict {
                Verdict::Denied { fleet } => {
                    debug!(%user, fleet, client = %a.five_tuple.client, "Allocate refused: user-quota reached on the fleet");
                    let r = self.error(&msg, ErrorCode::AllocationQuotaReached, Some(&p.granted.key));
                    Some(reply(a.five_tuple, r))
                }
                Verdict::Allowed | Verdict::Unavailable => {
                    self.allocate(now, p.worker, a.five_tuple, &msg, p.granted, None)
                }
            };
            // The count Redis holds for this node becomes the control plane's again: the check
            // wrote count + 1; a granted allocation published its count already, else it is
            // written back here.
            if self.per_user.get(&user).copied() == before {
                self.publish_count(&user);
            }
            if let Some(answer) = answer {
                self.metrics.allocate_latency(Instant::now().saturating_duration_since(p.received));
                out.push((p.worker, answer));
            }
        }
        if !self.quota_parked.is_empty() {
            let late: Vec<FiveTuple> = self
                .quota_parked
                .iter()
                .filter(|(_, p)| now.saturating_duration_since(p.since) >= PARK_TIMEOUT)
                .map(|(ft, _)| *ft)
                .collect();
            for ft in late {
                let Some(p) = self.quota_parked.remove(&ft) else { continue };
                self.stats.parked_dropped += 1;
                self.publish_count(&p.granted.user);
                if let Some(a) = Message::parse(&p.bytes).ok().and_then(|m| self.refuse_busy(ft, &m)) {
                    out.push((p.worker, a));
                }
            }
        }
        out
    }
}
