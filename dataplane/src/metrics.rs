//! What a worker publishes for the metrics exporter.
//!
//! The packet path counts in the worker's own [`Counters`] (plain integers in memory only its
//! thread touches). A few times a second, and when it stops, the worker copies them into its
//! [`WorkerMetrics`] with relaxed atomic stores; the exporter reads them with relaxed loads. So
//! no lock and no cache line shared with another thread is touched per datagram (coturn's
//! hot-path statistics lock, coturn PR 1954, is what this avoids), and a scrape sees each worker's
//! counts at most [`PUBLISH_INTERVAL`] old.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use uturn_proto::relay::Counters;

use crate::stream::{StreamCounters, CLOSE_REASONS};

/// Stream values published: open, accepted, refused, queue drops, data bytes, then one per
/// close reason.
const STREAM_VALUES: usize = 8 + CLOSE_REASONS.len();

/// How often a busy worker publishes its counters. An idle worker publishes when it wakes,
/// at least once a second.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);

/// One worker's published counters and table sizes. Written only by its worker, read by the
/// exporter; aligned so that two workers' metrics never share a cache line.
#[derive(Debug)]
#[repr(align(128))]
pub struct WorkerMetrics {
    counters: Box<[AtomicU64]>,
    allocations: AtomicU64,
    permissions: AtomicU64,
    channels: AtomicU64,
    control_queue_full: AtomicU64,
    streams: [AtomicU64; STREAM_VALUES],
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            counters: Counters::NAMES.iter().map(|_| AtomicU64::new(0)).collect(),
            allocations: AtomicU64::new(0),
            permissions: AtomicU64::new(0),
            channels: AtomicU64::new(0),
            control_queue_full: AtomicU64::new(0),
            streams: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// A copy of one worker's published metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerSample {
    /// The state machine's counters.
    pub counters: Counters,
    /// Live allocations.
    pub allocations: u64,
    /// Permissions held (peer IPs over all allocations).
    pub permissions: u64,
    /// Channel bindings held.
    pub channels: u64,
    /// Requests dropped because the worker's queue to the control plane was full.
    pub control_queue_full: u64,
    /// TCP and TLS client connections open.
    pub connections: u64,
    /// Connection counters (accepted, refused, closed by reason, queue drops).
    pub streams: StreamCounters,
}

impl WorkerMetrics {
    /// Stores `sample` (called by the worker).
    pub(crate) fn publish(&self, sample: &WorkerSample) {
        for (a, v) in self.counters.iter().zip(sample.counters.values()) {
            a.store(v, Ordering::Relaxed);
        }
        self.allocations.store(sample.allocations, Ordering::Relaxed);
        self.permissions.store(sample.permissions, Ordering::Relaxed);
        self.channels.store(sample.channels, Ordering::Relaxed);
        self.control_queue_full.store(sample.control_queue_full, Ordering::Relaxed);
        let st = &sample.streams;
        let values = [sample.connections, st.accepted, st.refused, st.queue_drops, st.data_bytes]
            .into_iter()
            .chain(st.closed)
            .chain([st.rate_limited, st.accept_deferred, st.refusals]);
        for (a, v) in self.streams.iter().zip(values) {
            a.store(v, Ordering::Relaxed);
        }
    }

    /// The last published values.
    pub fn sample(&self) -> WorkerSample {
        let values: Vec<u64> = self.counters.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        WorkerSample {
            counters: Counters::from_values(&values),
            allocations: self.allocations.load(Ordering::Relaxed),
            permissions: self.permissions.load(Ordering::Relaxed),
            channels: self.channels.load(Ordering::Relaxed),
            control_queue_full: self.control_queue_full.load(Ordering::Relaxed),
            connections: self.streams[0].load(Ordering::Relaxed),
            streams: StreamCounters {
                accepted: self.streams[1].load(Ordering::Relaxed),
                refused: self.streams[2].load(Ordering::Relaxed),
                queue_drops: self.streams[3].load(Ordering::Relaxed),
                data_bytes: self.streams[4].load(Ordering::Relaxed),
                closed: std::array::from_fn(|i| self.streams[5 + i].load(Ordering::Relaxed)),
                rate_limited: self.streams[5 + CLOSE_REASONS.len()].load(Ordering::Relaxed),
                accept_deferred: self.streams[6 + CLOSE_REASONS.len()].load(Ordering::Relaxed),
                refusals: self.streams[7 + CLOSE_REASONS.len()].load(Ordering::Relaxed),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_sample_reads_back_whole() {
        let m = WorkerMetrics::default();
        let s = WorkerSample {
            counters: Counters { relayed_to_client: 5, rate_limited: 2, ..Counters::default() },
            allocations: 3,
            permissions: 4,
            channels: 1,
            control_queue_full: 9,
            connections: 2,
            streams: StreamCounters {
                accepted: 7,
                refused: 1,
                queue_drops: 6,
                data_bytes: 11,
                closed: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                rate_limited: 12,
                accept_deferred: 13,
                refusals: 14,
            },
        };
        m.publish(&s);
        assert_eq!(m.sample(), s);
        assert_eq!(std::mem::align_of::<WorkerMetrics>(), 128);
    }
}
