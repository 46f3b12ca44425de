//! A per-source-IP token bucket for requests answered without authentication (Binding, and the
//! 401 that opens every Allocate), so a relay can never be made to send much to a spoofed
//! address. The table is bounded: when it reaches its cap, idle entries are pruned.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use hashbrown::HashMap;

/// Entries kept before idle ones are pruned.
const MAX_ENTRIES: usize = 65_536;

/// Token buckets keyed by source IP: `rate` requests per second with a burst of `rate`.
#[derive(Debug)]
pub struct PerIpLimiter {
    rate: u32,
    buckets: HashMap<IpAddr, (u32, Instant)>,
}

impl PerIpLimiter {
    /// A limiter of `rate` requests/s per IP; 0 disables it.
    pub fn new(rate: u32) -> Self {
        PerIpLimiter { rate, buckets: HashMap::new() }
    }

    /// Takes one token for `ip`; false means "drop this request".
    pub fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        let rate = self.rate;
        if rate == 0 {
            return true;
        }
        if self.buckets.len() >= MAX_ENTRIES && !self.buckets.contains_key(&ip) {
            // An entry idle for a second has refilled completely: forgetting it changes nothing.
            self.buckets.retain(|_, (_, t)| now.saturating_duration_since(*t) < Duration::from_secs(1));
            if self.buckets.len() >= MAX_ENTRIES {
                return false;
            }
        }
        let (tokens, last) = self.buckets.entry(ip).or_insert((rate, now));
        let refill = (now.saturating_duration_since(*last).as_micros() as u64 * rate as u64 / 1_000_000) as u32;
        if refill > 0 {
            *tokens = tokens.saturating_add(refill).min(rate);
            // Advance only by the time the whole tokens account for, keeping the fraction.
            *last += Duration::from_micros(refill as u64 * 1_000_000 / rate as u64);
            if *tokens == rate {
                *last = now;
            }
        }
        if *tokens == 0 {
            return false;
        }
        *tokens -= 1;
        true
    }

    /// Number of IPs tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no IP is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_per_ip() {
        let t0 = Instant::now();
        let mut l = PerIpLimiter::new(10);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!((0..20).filter(|_| l.allow(t0, a)).count(), 10);
        assert!(l.allow(t0, b), "another IP has its own bucket");
        assert!(!l.allow(t0 + Duration::from_millis(50), a));
        assert!(l.allow(t0 + Duration::from_millis(100), a), "one token per 100 ms");
        assert_eq!((0..20).filter(|_| l.allow(t0 + Duration::from_secs(5), a)).count(), 10, "capped at the burst");
        assert!(PerIpLimiter::new(0).allow(t0, a));
    }

    #[test]
    fn the_table_stays_bounded() {
        let t0 = Instant::now();
        let mut l = PerIpLimiter::new(1);
        for i in 0..(MAX_ENTRIES as u32 + 10) {
            l.allow(t0, IpAddr::from(i.to_be_bytes()));
        }
        assert!(l.len() <= MAX_ENTRIES);
        l.allow(t0 + Duration::from_secs(2), "198.51.100.1".parse().unwrap());
        assert!(l.len() < 10, "idle entries pruned");
    }
}
