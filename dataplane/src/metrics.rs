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

use crate::hold::HoldCounters;
use crate::proxy::{ProxyCounters, PROXY_REFUSALS};
use crate::stream::{StreamCounters, CLOSE_REASONS};

/// Stream values published: open, accepted, refused, queue drops, data bytes, then one per
/// close reason.
const STREAM_VALUES: usize = 8 + CLOSE_REASONS.len();

/// How often a busy worker publishes its counters. An idle worker publishes when it wakes,
/// at least once a second.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);

/// Upper bounds of the request turnaround histogram's buckets, seconds (the last bucket, +Inf,
/// is implicit).
pub const TURNAROUND_BUCKETS: [f64; 14] =
    [0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0];

/// The time from a request's receipt in the worker to the control plane's answer applied in the
/// worker (the Install, permission or channel binding in its tables, the response sent), for
/// the requests a 5-tuple's datagrams are held behind: a histogram over
/// [`TURNAROUND_BUCKETS`] plus the total and count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Turnaround {
    /// Requests per bucket: `buckets[i]` counts turnarounds at most `TURNAROUND_BUCKETS[i]`
    /// seconds and over the bucket before; the last counts the rest (not cumulative).
    pub buckets: [u64; TURNAROUND_BUCKETS.len() + 1],
    /// Requests recorded.
    pub count: u64,
    /// Sum of their turnarounds, nanoseconds.
    pub sum_ns: u64,
}

impl Turnaround {
    /// Records one turnaround.
    pub(crate) fn record(&mut self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = TURNAROUND_BUCKETS.iter().position(|le| secs <= *le).unwrap_or(TURNAROUND_BUCKETS.len());
        self.buckets[i] += 1;
        self.count += 1;
        self.sum_ns += took.as_nanos() as u64;
    }

    /// Adds `other`'s counts (a sum over workers).
    pub fn add(&mut self, other: &Turnaround) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
    }
}

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
    /// Held, dropped, expired.
    holds: [AtomicU64; 3],
    /// Buckets, then count and sum (ns).
    turnaround: [AtomicU64; TURNAROUND_BUCKETS.len() + 3],
    /// PROXY protocol: stream accepted and refusals, then datagram accepted and refusals.
    proxy: [AtomicU64; 2 + 2 * PROXY_REFUSALS.len()],
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
            holds: std::array::from_fn(|_| AtomicU64::new(0)),
            turnaround: std::array::from_fn(|_| AtomicU64::new(0)),
            proxy: std::array::from_fn(|_| AtomicU64::new(0)),
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
    /// Datagrams held behind a request at the control plane (order within a 5-tuple).
    pub holds: HoldCounters,
    /// Request turnaround, receipt to answer applied.
    pub turnaround: Turnaround,
    /// PROXY protocol headers taken and refused.
    pub proxy: ProxyCounters,
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
        let h = &sample.holds;
        for (a, v) in self.holds.iter().zip([h.held, h.dropped, h.expired]) {
            a.store(v, Ordering::Relaxed);
        }
        let t = &sample.turnaround;
        for (a, v) in self.turnaround.iter().zip(t.buckets.iter().copied().chain([t.count, t.sum_ns])) {
            a.store(v, Ordering::Relaxed);
        }
        let p = &sample.proxy;
        let values = [p.streams_accepted]
            .into_iter()
            .chain(p.streams_refused)
            .chain([p.datagrams_accepted])
            .chain(p.datagrams_refused);
        for (a, v) in self.proxy.iter().zip(values) {
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
            holds: HoldCounters {
                held: self.holds[0].load(Ordering::Relaxed),
                dropped: self.holds[1].load(Ordering::Relaxed),
                expired: self.holds[2].load(Ordering::Relaxed),
            },
            turnaround: {
                let n = TURNAROUND_BUCKETS.len() + 1;
                Turnaround {
                    buckets: std::array::from_fn(|i| self.turnaround[i].load(Ordering::Relaxed)),
                    count: self.turnaround[n].load(Ordering::Relaxed),
                    sum_ns: self.turnaround[n + 1].load(Ordering::Relaxed),
                }
            },
            proxy: {
                let p = |i: usize| self.proxy[i].load(Ordering::Relaxed);
                let n = PROXY_REFUSALS.len();
                ProxyCounters {
                    streams_accepted: p(0),
                    streams_refused: std::array::from_fn(|i| p(1 + i)),
                    datagrams_accepted: p(1 + n),
                    datagrams_refused: std::array::from_fn(|i| p(2 + n + i)),
                }
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
                closed: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
                rate_limited: 12,
                accept_deferred: 13,
                refusals: 14,
            },
            holds: HoldCounters { held: 3, dropped: 2, expired: 1 },
            turnaround: {
                let mut t = Turnaround::default();
                t.record(Duration::from_micros(40));
                t.record(Duration::from_secs(2));
                t
            },
            proxy: ProxyCounters {
                streams_accepted: 3,
                streams_refused: [1, 2, 3, 4],
                datagrams_accepted: 8,
                datagrams_refused: [5, 6, 7, 9],
            },
        };
        m.publish(&s);
        assert_eq!(m.sample(), s);
        assert_eq!(std::mem::align_of::<WorkerMetrics>(), 128);
    }
}
