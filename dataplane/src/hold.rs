//! Order within a 5-tuple: while a request from a 5-tuple is at the control plane, the worker
//! holds that 5-tuple's later datagrams (Send indications, ChannelData, further requests) in
//! arrival order, and handles them right after the answer is applied.
//!
//! A browser sends its first ICE connectivity check right behind CreatePermission, or behind
//! ChannelBind, without waiting for the answer (RFC 8656 §9 and §12 let a client pipeline; the
//! relay handles a client's messages in the order they arrive). The control plane decides every
//! permission and channel binding and pushes it into the worker; without a hold, the check would
//! reach the worker's tables before the permission and be dropped, and the call would wait one
//! ICE retransmission.
//!
//! Bounds (docs/security.md): per 5-tuple [`HoldLimits::datagrams_per_tuple`] datagrams and
//! [`HoldLimits::bytes_per_tuple`] bytes; per worker [`HoldLimits::datagrams`] and
//! [`HoldLimits::bytes`]; a datagram past them is dropped and counted (`hold_dropped`). A hold
//! lasts at most [`HoldLimits::time`]: a request the control plane never answers (dropped under
//! overload) releases its 5-tuple's datagrams then, in order (`hold_expired`). Only the 5-tuple
//! whose request is pending waits; no other client's traffic is touched, and a worker with
//! nothing pending pays one `is_empty` check per datagram.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use uturn_proto::wire::TransactionId;
use uturn_proto::FiveTuple;

/// The bounds of the hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// Datagrams (or framed stream messages) held for one 5-tuple.
    pub datagrams_per_tuple: usize,
    /// Bytes held for one 5-tuple.
    pub bytes_per_tuple: usize,
    /// Datagrams held by one worker, all 5-tuples together.
    pub datagrams: usize,
    /// Bytes held by one worker, all 5-tuples together.
    pub bytes: usize,
    /// The longest a 5-tuple's datagrams wait for the control plane's answer, from the request's
    /// receipt; then they are handled anyway.
    pub time: Duration,
}

impl Default for HoldLimits {
    /// 64 datagrams and 128 KiB per 5-tuple (a stream message is at most 65,540 bytes), 8,192
    /// datagrams and 8 MiB per worker, 1 s (the store lookups' own timeout).
    fn default() -> Self {
        HoldLimits {
            datagrams_per_tuple: 64,
            bytes_per_tuple: 128 * 1024,
            datagrams: 8192,
            bytes: 8 * 1024 * 1024,
            time: Duration::from_secs(1),
        }
    }
}

/// What the hold did, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldCounters {
    /// Datagrams held behind a request at the control plane.
    pub held: u64,
    /// Datagrams dropped because a hold was past its bounds.
    pub dropped: u64,
    /// Holds released by [`HoldLimits::time`] because the control plane never answered.
    pub expired: u64,
}

/// One 5-tuple's requests at the control plane and the datagrams waiting behind them.
#[derive(Debug)]
struct Hold {
    /// Transaction IDs of its requests at the control plane, with their receipt (almost always
    /// one).
    pending: Vec<(TransactionId, Instant)>,
    /// Datagrams in arrival order.
    queue: VecDeque<Box<[u8]>>,
    /// Bytes in `queue`.
    bytes: usize,
    /// When the datagrams are handled even without an answer.
    deadline: Instant,
}

/// A worker's holds, keyed by 5-tuple. Touched only by the worker's own thread.
#[derive(Debug, Default)]
pub(crate) struct Holds {
    by_tuple: HashMap<FiveTuple, Hold>,
    /// Deadlines in the order they were set (every one is a receipt plus [`HoldLimits::time`],
    /// so the order is the deadlines' order); an entry whose hold has gone or moved on is
    /// skipped when it comes up.
    deadlines: VecDeque<(Instant, FiveTuple)>,
    /// Datagrams held, all 5-tuples.
    datagrams: usize,
    /// Bytes held, all 5-tuples.
    bytes: usize,
    limits: HoldLimits,
    pub(crate) counters: HoldCounters,
}

impl Holds {
    /// Holds bounded by `limits`.
    pub(crate) fn new(limits: HoldLimits) -> Self {
        Holds { limits, ..Holds::default() }
    }

    /// True when `ft` has a request at the control plane, so its datagrams must wait.
    #[inline]
    pub(crate) fn holds(&self, ft: &FiveTuple) -> bool {
        !self.by_tuple.is_empty() && self.by_tuple.contains_key(ft)
    }

    /// True when nothing is held or pending.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_tuple.is_empty()
    }

    /// Request `tid` from `ft`, received at `received`, went to the control plane.
    pub(crate) fn begin(&mut self, ft: FiveTuple, tid: TransactionId, received: Instant) {
        let deadline = received + self.limits.time;
        let h = self.by_tuple.entry(ft).or_insert_with(|| Hold {
            pending: Vec::with_capacity(1),
            queue: VecDeque::new(),
            bytes: 0,
            deadline,
        });
        h.pending.push((tid, received));
        h.deadline = h.deadline.max(deadline);
        self.deadlines.push_back((deadline, ft));
    }

    /// Keeps a copy of `datagram` behind `ft`'s pending request. False when a bound refused it
    /// (dropped and counted). Call only when [`holds`](Self::holds) is true.
    pub(crate) fn push(&mut self, ft: &FiveTuple, datagram: &[u8]) -> bool {
        let l = self.limits;
        let Some(h) = self.by_tuple.get_mut(ft) else { return false };
        let n = datagram.len();
        if h.queue.len() >= l.datagrams_per_tuple
            || h.bytes + n > l.bytes_per_tuple
            || self.datagrams >= l.datagrams
            || self.bytes + n > l.bytes
        {
            self.counters.dropped += 1;
            return false;
        }
        h.queue.push_back(datagram.into());
        h.bytes += n;
        self.datagrams += 1;
        self.bytes += n;
        self.counters.held += 1;
        true
    }

    /// The control plane answered request `tid` of `ft`. Returns the time since its receipt
    /// (`None` when it was not pending: expired, or not one the worker holds for), and whether
    /// `ft` has nothing pending any more (its datagrams can be released).
    pub(crate) fn answered(&mut self, ft: &FiveTuple, tid: TransactionId, now: Instant) -> Option<(Duration, bool)> {
        let h = self.by_tuple.get_mut(ft)?;
        let i = h.pending.iter().position(|(t, _)| *t == tid)?;
        let (_, received) = h.pending.swap_remove(i);
        Some((now.saturating_duration_since(received), h.pending.is_empty()))
    }

    /// Ends `ft`'s hold and returns its datagrams in arrival order (empty when none). The caller
    /// handles them; one that is a request may start a new hold.
    pub(crate) fn release(&mut self, ft: &FiveTuple) -> VecDeque<Box<[u8]>> {
        match self.by_tuple.remove(ft) {
            Some(h) => {
                self.datagrams -= h.queue.len();
                self.bytes -= h.bytes;
                h.queue
            }
            None => VecDeque::new(),
        }
    }

    /// Forgets `ft`'s hold and drops its datagrams (its connection closed).
    pub(crate) fn forget(&mut self, ft: &FiveTuple) {
        drop(self.release(ft));
    }

    /// The 5-tuples whose hold is past its deadline at `now` (counted as expired); the caller
    /// [`release`](Self::release)s each.
    /// O(deadlines due), not O(holds).
    pub(crate) fn overdue(&mut self, now: Instant, out: &mut Vec<FiveTuple>) {
        while let Some(&(at, ft)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            // Only the hold's own, latest deadline counts; an earlier entry of a hold that a
            // later request extended, or of one already released, is stale.
            if self.by_tuple.get(&ft).is_some_and(|h| h.deadline <= now) && !out.contains(&ft) {
                out.push(ft);
                self.counters.expired += 1;
            }
        }
        if self.by_tuple.is_empty() {
            self.deadlines.clear();
        }
    }

    /// The earliest deadline still queued (possibly of a hold already released: the caller
    /// then wakes early and finds nothing due).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if self.by_tuple.is_empty() {
            return None;
        }
        self.deadlines.front().map(|(at, _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn ft(port: u16) -> FiveTuple {
        FiveTuple::udp(SocketAddr::from(([127, 0, 0, 1], port)), SocketAddr::from(([127, 0, 0, 1], 3478)))
    }

    #[test]
    fn datagrams_wait_in_order_until_every_pending_request_is_answered() {
        let now = Instant::now();
        let mut h = Holds::new(HoldLimits::default());
        let (a, b) = (ft(1000), ft(1001));
        assert!(!h.holds(&a));
        h.begin(a, TransactionId([1; 12]), now);
        h.begin(a, TransactionId([2; 12]), now);
        assert!(h.holds(&a) && !h.holds(&b), "only the requesting 5-tuple waits");
        assert!(h.push(&a, b"first"));
        assert!(h.push(&a, b"second"));
        assert_eq!(h.answered(&a, TransactionId([9; 12]), now), None, "not a pending request");
        assert_eq!(h.answered(&a, TransactionId([1; 12]), now), Some((Duration::ZERO, false)));
        assert_eq!(h.answered(&a, TransactionId([2; 12]), now), Some((Duration::ZERO, true)));
        let q: Vec<_> = h.release(&a).into_iter().collect();
        assert_eq!(q, vec![b"first".to_vec().into_boxed_slice(), b"second".to_vec().into_boxed_slice()]);
        assert!(h.is_empty());
        assert_eq!((h.datagrams, h.bytes), (0, 0));
        assert_eq!(h.counters, HoldCounters { held: 2, dropped: 0, expired: 0 });
    }

    #[test]
    fn a_released_hold_leaves_no_due_deadline_and_an_extended_one_expires_late() {
        let now = Instant::now();
        let mut h = Holds::new(HoldLimits::default());
        let (a, b) = (ft(1), ft(2));
        h.begin(a, TransactionId([1; 12]), now);
        h.begin(b, TransactionId([1; 12]), now);
        assert_eq!(h.answered(&a, TransactionId([1; 12]), now), Some((Duration::ZERO, true)));
        h.release(&a);
        // b's request was answered late and a held request of b went out again.
        h.answered(&b, TransactionId([1; 12]), now);
        h.begin(b, TransactionId([2; 12]), now + Duration::from_millis(500));
        let mut due = Vec::new();
        h.overdue(now + Duration::from_secs(1), &mut due);
        assert!(due.is_empty(), "a's hold is gone and b's runs to 1.5 s: {due:?}");
        h.overdue(now + Duration::from_millis(1500), &mut due);
        assert_eq!(due, vec![b]);
        assert_eq!(h.counters.expired, 1);
    }

    #[test]
    fn bounds_per_tuple_and_per_worker_drop_and_count() {
        let now = Instant::now();
        let limits =
            HoldLimits { datagrams_per_tuple: 2, bytes_per_tuple: 10, datagrams: 3, bytes: 100, ..Default::default() };
        let mut h = Holds::new(limits);
        let (a, b) = (ft(1), ft(2));
        h.begin(a, TransactionId([1; 12]), now);
        h.begin(b, TransactionId([1; 12]), now);
        assert!(h.push(&a, b"12345"));
        assert!(!h.push(&a, b"1234567"), "bytes per 5-tuple");
        assert!(h.push(&a, b"12345"));
        assert!(!h.push(&a, b"1"), "datagrams per 5-tuple");
        assert!(h.push(&b, b"1"));
        assert!(!h.push(&b, b"2"), "datagrams per worker");
        assert_eq!(h.counters.dropped, 3);
        h.forget(&a);
        assert!(h.push(&b, b"2"), "room again once a hold is gone");
    }

    #[test]
    fn an_unanswered_request_releases_its_datagrams_at_the_deadline() {
        let now = Instant::now();
        let mut h = Holds::new(HoldLimits::default());
        let a = ft(7);
        h.begin(a, TransactionId([1; 12]), now);
        assert!(h.push(&a, b"x"));
        let mut due = Vec::new();
        h.overdue(now + Duration::from_millis(999), &mut due);
        assert!(due.is_empty());
        assert_eq!(h.next_deadline(), Some(now + Duration::from_secs(1)));
        h.overdue(now + Duration::from_secs(1), &mut due);
        assert_eq!(due, vec![a]);
        assert!(h.deadlines.is_empty(), "due deadlines are taken off the queue");
        assert_eq!(h.release(&a).len(), 1);
        assert_eq!(h.counters.expired, 1);
        assert_eq!(h.answered(&a, TransactionId([1; 12]), now), None, "a late answer finds nothing");
    }
}
