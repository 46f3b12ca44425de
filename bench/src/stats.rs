//! Per-run receive statistics: delivered packets, loss, duplicates, reordering and latency
//! percentiles (hdrhistogram, microseconds).

use hdrhistogram::Histogram;
use serde::Serialize;

/// What the receiving side saw for one client.
pub struct ClientStats {
    /// Bit per sequence number: received at least once.
    seen: Vec<u64>,
    highest: Option<u64>,
    /// Unique packets received with seq in the measured window.
    pub received: u64,
    /// Packets received again.
    pub duplicates: u64,
    /// Packets that arrived after a higher sequence number.
    pub reordered: u64,
}

impl ClientStats {
    /// Tracks sequence numbers `0..capacity`.
    pub fn new(capacity: u64) -> Self {
        ClientStats {
            seen: vec![0; capacity.div_ceil(64) as usize],
            highest: None,
            received: 0,
            duplicates: 0,
            reordered: 0,
        }
    }

    /// Records `seq`; returns false for a duplicate (or a number beyond the capacity).
    pub fn record(&mut self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        let Some(word) = self.seen.get_mut(w) else { return false };
        if *word & (1 << b) != 0 {
            self.duplicates += 1;
            return false;
        }
        *word |= 1 << b;
        self.received += 1;
        match self.highest {
            Some(h) if seq < h => self.reordered += 1,
            _ => self.highest = Some(seq),
        }
        true
    }

    /// Unique packets received with sequence numbers in `lo..hi`.
    pub fn received_in(&self, lo: u64, hi: u64) -> u64 {
        (lo..hi).filter(|&s| self.seen.get((s / 64) as usize).is_some_and(|w| w & (1 << (s % 64)) != 0)).count() as u64
    }
}

/// A latency histogram in microseconds (1 µs to 60 s, 3 significant digits).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct Latency {
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
}

impl Latency {
    /// Percentiles of `h` (zeros when empty).
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_and_reordering() {
        let mut s = ClientStats::new(64);
        for seq in [0, 1, 3, 2, 3, 99, 100] {
            s.record(seq);
        }
        assert_eq!((s.received, s.duplicates, s.reordered), (4, 1, 1), "99 and 100 are beyond the capacity");
        assert_eq!(s.received_in(1, 4), 3);
    }
}
