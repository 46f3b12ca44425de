//! Load-aware ALTERNATE-SERVER (RFC 8489 §10, RFC 8656 §6.2): where a node over its own budget
//! sends a new Allocate.
//!
//! A node is over budget while it drains, holds `total-quota` allocations, or relays
//! `node-max-bandwidth` bytes/s or more. Then a new Allocate (after authentication, so the 300
//! is signed) is answered 300 Try Alternate with:
//! 1. with a fleet: the live node of the registry with the least load (see
//!    [`NodeInfo::load`]) that takes allocations (ready and within its own budget, as it last
//!    published) and has an address of the request's transport and family;
//! 2. else the static `alternate-server` list, in turn (round robin), skipping addresses of
//!    the other family;
//! 3. else nothing: a draining node answers 508, one at `total-quota` 486, one over
//!    `node-max-bandwidth` grants the allocation anyway (the budget is a preference).
//!
//! No loop: a node never names itself (its id, or the address the request came to), never a
//! node that is draining or over budget, and only redirects while it is over budget itself,
//! so a node that accepts never passes a client on. Two nodes' views can disagree for up to a
//! heartbeat (1 s): A, just over budget, may send a client to B that has just gone over too,
//! and B then sends it on to a third node, never back to A while A publishes that it is over
//! budget. What remains is bounded by the client: RFC 8489 §10 says a client redirected to a
//! server it already sent the request to in the last five minutes MUST fail the transaction
//! instead of following (coturn's and libwebrtc's clients follow at most one redirect).

use std::net::SocketAddr;
use std::sync::Arc;

use uturn_proto::FiveTuple;

use super::FleetShared;

/// What a node's budget is made of.
#[derive(Debug, Clone, Copy, Default)]
pub struct Budget {
    /// `total-quota`, allocations (0: none).
    pub total_quota: u32,
    /// `node-max-bandwidth`, relayed bytes/s (0: none).
    pub max_bytes_per_s: u64,
}

impl Budget {
    /// The load as a fraction of the budget (the largest of its parts; 0 without a budget).
    pub fn load(&self, allocations: usize, bytes_per_s: u64) -> f64 {
        let a = if self.total_quota > 0 { allocations as f64 / self.total_quota as f64 } else { 0.0 };
        let b = if self.max_bytes_per_s > 0 { bytes_per_s as f64 / self.max_bytes_per_s as f64 } else { 0.0 };
        a.max(b)
    }
}

/// Why a node is over budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverBudget {
    /// It drains.
    Draining,
    /// It holds `total-quota` allocations.
    Allocations,
    /// It relays `node-max-bandwidth` or more.
    Bandwidth,
}

/// Picks the ALTERNATE-SERVER of a redirected Allocate.
#[derive(Debug, Default)]
pub struct Redirector {
    /// The static `alternate-server` list.
    list: Vec<SocketAddr>,
    /// Which entry of `list` is next.
    next: usize,
    /// The fleet registry, when there is one.
    fleet: Option<Arc<FleetShared>>,
    /// This node's own addresses (listen and published), never named as an alternate.
    own: Vec<SocketAddr>,
    /// This node's budget.
    pub budget: Budget,
    /// Relayed bytes/s over the last second (the control loop's load meter).
    pub bytes_per_s: u64,
}

impl Redirector {
    /// A redirector over the static `list`, the `fleet` registry (with `fleet-redis`), and
    /// this node's `budget`; `own` are this node's addresses (never an alternate).
    pub fn new(list: Vec<SocketAddr>, fleet: Option<Arc<FleetShared>>, budget: Budget, own: Vec<SocketAddr>) -> Self {
        Redirector { list, next: 0, fleet: fleet.filter(|f| f.in_fleet()), own, budget, bytes_per_s: 0 }
    }

    /// True when `a` may be named to a request that came to `server`: of its family, and none
    /// of this node's addresses.
    fn usable(&self, a: SocketAddr, server: SocketAddr) -> bool {
        a.is_ipv6() == server.is_ipv6() && a != server && !self.own.contains(&a)
    }

    /// Why this node, holding `allocations`, is over its budget, if it is (`draining` given).
    pub fn over_budget(&self, draining: bool, allocations: usize) -> Option<OverBudget> {
        if draining {
            Some(OverBudget::Draining)
        } else if self.budget.total_quota > 0 && allocations >= self.budget.total_quota as usize {
            Some(OverBudget::Allocations)
        } else if self.budget.max_bytes_per_s > 0 && self.bytes_per_s >= self.budget.max_bytes_per_s {
            Some(OverBudget::Bandwidth)
        } else {
            None
        }
    }

    /// The alternate for an Allocate on `ft`: the registry's least loaded accepting node, else
    /// the static list's next entry of the family of `ft`'s server address, else `fallback`
    /// (the alternate a hot upgrade handed over with a drain) — never `ft`'s server address.
    pub fn pick(&mut self, ft: &FiveTuple, fallback: Option<SocketAddr>) -> Option<SocketAddr> {
        let v6 = ft.server.is_ipv6();
        if let Some(fleet) = &self.fleet {
            let best = fleet
                .live_nodes()
                .into_iter()
                .filter(|n| n.node != fleet.node_id && n.accepting())
                .filter_map(|n| n.address(ft.transport, v6).filter(|a| self.usable(*a, ft.server)).map(|a| (n, a)))
                .min_by(|(a, _), (b, _)| {
                    a.load
                        .total_cmp(&b.load)
                        .then(a.allocations.cmp(&b.allocations))
                        .then(a.relayed_bps.cmp(&b.relayed_bps))
                        .then(a.node.cmp(&b.node))
                });
            if let Some((_, addr)) = best {
                return Some(addr);
            }
        }
        for _ in 0..self.list.len() {
            let a = self.list[self.next % self.list.len()];
            self.next = (self.next + 1) % self.list.len();
            if self.usable(a, ft.server) {
                return Some(a);
            }
        }
        fallback.filter(|a| self.usable(*a, ft.server))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uturn_proto::Transport;

    fn ft(server: &str) -> FiveTuple {
        FiveTuple {
            client: "127.0.0.9:5000".parse().unwrap(),
            server: server.parse().unwrap(),
            transport: Transport::Udp,
        }
    }

    #[test]
    fn static_list_in_turn_skipping_self_and_the_other_family() {
        let list: Vec<SocketAddr> = ["127.0.0.1:1000", "[::1]:1000", "127.0.0.1:2000", "127.0.0.1:3000"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let mut r = Redirector::new(list.clone(), None, Budget::default(), Vec::new());
        let f = ft("127.0.0.1:3000");
        let picks: Vec<_> = (0..4).map(|_| r.pick(&f, None).unwrap().port()).collect();
        assert_eq!(picks, [1000, 2000, 1000, 2000]);
        // Its own published address is skipped even when the request came to another one.
        let mut r = Redirector::new(list, None, Budget::default(), vec!["127.0.0.1:2000".parse().unwrap()]);
        let picks: Vec<_> = (0..2).map(|_| r.pick(&f, None).unwrap().port()).collect();
        assert_eq!(picks, [1000, 1000]);
        let mut empty = Redirector::new(Vec::new(), None, Budget::default(), Vec::new());
        assert_eq!(empty.pick(&f, None), None);
        assert_eq!(empty.pick(&f, Some("127.0.0.1:3000".parse().unwrap())), None, "never itself");
    }

    #[test]
    fn budget() {
        let r = Redirector::new(Vec::new(), None, Budget { total_quota: 2, max_bytes_per_s: 0 }, Vec::new());
        assert_eq!(r.over_budget(false, 1), None);
        assert_eq!(r.over_budget(false, 2), Some(OverBudget::Allocations));
        assert_eq!(r.over_budget(true, 0), Some(OverBudget::Draining));
        assert_eq!(Budget { total_quota: 4, max_bytes_per_s: 100 }.load(1, 50), 0.5);
    }
}
