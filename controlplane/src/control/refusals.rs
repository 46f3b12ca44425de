//! Answers for requests the control plane cannot take now, and the rate-limited log of
//! Allocates refused for want of capacity.
//!
//! Over TCP and TLS a client does not retransmit (RFC 8489 §6.2.2), so a request the control
//! plane would drop (its store lookup cannot be queued or parked, or did not finish in time) is
//! answered 508 Insufficient Capacity (RFC 8656 §6.2) instead; over UDP it is still dropped, and
//! the client's retransmission tries again. An Allocate whose relayed transport address cannot
//! be bound because the process is out of descriptors or memory is also a 508 (RFC 8656 §7.2:
//! the client tries another server), and those refusals are logged as a summary, at most one
//! line per [`SUMMARY_INTERVAL`], never one line each.

use std::time::{Duration, Instant};

use tracing::warn;
use uturn_dataplane::ToWorker;
use uturn_proto::response::ErrorCode;
use uturn_proto::wire::{Message, Method};
use uturn_proto::{FiveTuple, Transport};

use super::{reply, ControlPlane};

/// The longest refusals of one kind wait to be logged as one summary line.
pub(super) const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Counts refusals of one kind and logs them at most once per [`SUMMARY_INTERVAL`]: the first at
/// once, then the number since the last line.
#[derive(Debug)]
pub(super) struct RefusalLog {
    what: &'static str,
    /// Refusals not yet logged.
    pending: u64,
    /// When the last line was logged.
    logged: Option<Instant>,
    /// The last refusal's cause.
    cause: String,
}

impl RefusalLog {
    pub(super) const fn new(what: &'static str) -> Self {
        RefusalLog { what, pending: 0, logged: None, cause: String::new() }
    }

    /// One refusal at `now`, for `cause`.
    pub(super) fn record(&mut self, now: Instant, worker: usize, cause: impl FnOnce() -> String) {
        self.pending += 1;
        if self.logged.is_none_or(|t| now.saturating_duration_since(t) >= SUMMARY_INTERVAL) {
            self.cause = cause();
            self.log(now, worker);
        }
    }

    /// Logs what waits once the interval has passed (called from the control loop).
    pub(super) fn flush(&mut self, now: Instant) {
        if self.pending > 0 && self.logged.is_some_and(|t| now.saturating_duration_since(t) >= SUMMARY_INTERVAL) {
            self.log(now, usize::MAX);
        }
    }

    fn log(&mut self, now: Instant, worker: usize) {
        let worker = (worker != usize::MAX).then_some(worker);
        let since_s = self.logged.map(|t| now.saturating_duration_since(t).as_secs());
        warn!(
            worker,
            refused = self.pending,
            since_s,
            cause = %self.cause,
            "{} (at most one line per {} s)",
            self.what,
            SUMMARY_INTERVAL.as_secs()
        );
        self.pending = 0;
        self.logged = Some(now);
    }
}

/// True for the errors of binding a relayed transport address that mean "no capacity now":
/// out of descriptors (EMFILE, ENFILE) or kernel memory (ENOBUFS, ENOMEM).
pub(super) fn is_capacity_error(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

impl ControlPlane {
    /// The answer to a request the control plane cannot take now (its store lookup cannot be
    /// queued or parked, or did not end in time): `None` over UDP (dropped, the client
    /// retransmits), 508 over TCP/TLS. A refused ConnectionBind's connection is framed again.
    pub(super) fn refuse_busy(&mut self, ft: FiveTuple, msg: &Message<'_>) -> Option<ToWorker> {
        if ft.transport == Transport::Udp {
            return None;
        }
        self.stats.busy_refusals += 1;
        let response = self.error(msg, ErrorCode::InsufficientCapacity, None);
        Some(if msg.method() == Method::CONNECTION_BIND {
            ToWorker::BindFailed { five_tuple: ft, response }
        } else {
            reply(ft, response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_summed_up_once_per_interval() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new("test refusals");
        log.record(t0, 0, || "first".into());
        assert_eq!((log.pending, log.logged), (0, Some(t0)), "the first refusal is logged at once");
        for i in 1..1000 {
            log.record(t0 + Duration::from_millis(i), 0, || unreachable!("not logged within the interval"));
        }
        assert_eq!(log.pending, 999);
        log.flush(t0 + Duration::from_secs(5));
        assert_eq!(log.pending, 999, "nothing before the interval has passed");
        log.flush(t0 + SUMMARY_INTERVAL);
        assert_eq!((log.pending, log.logged), (0, Some(t0 + SUMMARY_INTERVAL)));
    }
}
