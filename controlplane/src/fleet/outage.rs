//! One WARN per Redis outage for the whole node. The fleet registry, the fleet quota and the
//! usage-record writer each talk to `fleet-redis` from a thread of their own, so each notices an
//! outage on its own; the operator gets one WARN (from whichever notices first) naming what
//! every part does meanwhile, the others' notices at INFO, and one INFO when Redis answers again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

/// Unix ms the current outage began; 0 while Redis answers.
static DOWN_SINCE_MS: AtomicU64 = AtomicU64::new(0);
/// Unix ms of the last failure any part saw.
static LAST_FAILURE_MS: AtomicU64 = AtomicU64::new(0);
/// An outage ends when a part gets an answer this long (ms) after the last failure any part saw,
/// so parts that notice a little apart do not end and begin it again.
const SETTLE_MS: u64 = 1000;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64).max(1)
}

/// `part` (e.g. "fleet quota") failed to reach Redis with `error`; `fallback` says what it does
/// meanwhile. Logs the node's one WARN when this begins an outage, INFO otherwise.
pub fn failed(part: &str, error: &dyn std::fmt::Display, fallback: &str) {
    let now = now_ms();
    LAST_FAILURE_MS.store(now, Ordering::Relaxed);
    if DOWN_SINCE_MS.compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
        warn!(
            part,
            "fleet-redis unreachable ({error}): this node goes on alone (registry, fleet revoke and redirects off; user-quota counted per node; usage records wait in memory) until Redis answers; {part}: {fallback}"
        );
    } else {
        info!(part, "fleet-redis unreachable ({error}); {part}: {fallback}");
    }
}

/// `part` got an answer from Redis: ends the outage (one INFO) once no part failed for a second.
pub fn answered(part: &str) {
    let since = DOWN_SINCE_MS.load(Ordering::Relaxed);
    if since == 0 {
        return;
    }
    let now = now_ms();
    if now.saturating_sub(LAST_FAILURE_MS.load(Ordering::Relaxed)) < SETTLE_MS {
        return;
    }
    if DOWN_SINCE_MS.compare_exchange(since, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
        info!(part, after_s = (now - since) / 1000, "fleet-redis answers again: the fleet's shared state is back");
    }
}

/// True while an outage is under way (some part failed and none has had an answer since).
pub fn is_down() -> bool {
    DOWN_SINCE_MS.load(Ordering::Relaxed) != 0
}
