//! The per-source budget for requests whose MESSAGE-INTEGRITY the worker has not verified
//! (Binding, the 401 round of every Allocate, forged or unknown credentials, unknown methods), so
//! the relay can never be made to answer much to a spoofed address, nor be used to flood its own
//! control plane.
//!
//! The table has a fixed size and every datagram costs O(1): a keyed hash picks one set of
//! [`WAYS`] entries, and the source is looked up among them. A source not found takes the place
//! of the set's entry with the most tokens (the one closest to idle: an entry idle for a second
//! has refilled completely, so forgetting it changes nothing). The hash is SipHash keyed from the OS
//! random source, so an attacker cannot aim spoofed sources at the set of a victim. A source evicted while
//! busy starts again with a full bucket: under a spray of more than [`SETS`] × [`WAYS`] active
//! sources at once, a source may get more than its budget, never less, and no request scans the
//! table. IPv4 sources are keyed by address, IPv6 sources by their /64 (one subscriber's prefix,
//! which an attacker rotates addresses within).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::Instant;

/// Sets in the table (a power of two).
pub const SETS: usize = 2048;
/// Entries per set.
pub const WAYS: usize = 4;
/// Tokens are counted in millionths, so refill keeps fractions exactly.
const MICRO: u64 = 1_000_000;

/// The key a source is budgeted under: an IPv4 address (IPv4-mapped IPv6 included) or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceKey(u128);

impl SourceKey {
    /// `ip`'s key: IPv4 (and `::ffff:a.b.c.d`) by the address, IPv6 by its first 64 bits.
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => SourceKey(0xFFFF_0000_0000 | u32::from(v4) as u128),
            // The low 64 bits of a v4 key are never all zero; a /64 key's always are.
            IpAddr::V6(v6) => SourceKey(u128::from(v6) & !(u64::MAX as u128)),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    used: bool,
    key: u128,
    /// Millionths of a token.
    tokens: u64,
    /// Microseconds since the limiter's origin when `tokens` was last brought up to date.
    stamp_us: u64,
}

/// Token buckets per source: `rate` requests per second, a burst of `rate`, in a fixed table of
/// [`SETS`] × [`WAYS`] entries (32 bytes each, 256 KiB in all, allocated once).
#[derive(Debug)]
pub struct SourceLimiter {
    /// Requests per second per source; 0 disables the limiter.
    rate: u64,
    origin: Instant,
    /// SipHash keyed from the OS random source (std's `RandomState`).
    hasher: RandomState,
    sets: Box<[[Entry; WAYS]]>,
}

impl SourceLimiter {
    /// A limiter of `rate` requests/s (and a burst of `rate`) per source; 0 disables it and
    /// allocates no table. `origin` anchors its clock (any instant not after the first request).
    pub fn new(rate: u32, origin: Instant) -> Self {
        let sets = if rate == 0 { Vec::new() } else { vec![[Entry::default(); WAYS]; SETS] };
        SourceLimiter { rate: rate as u64, origin, hasher: RandomState::new(), sets: sets.into_boxed_slice() }
    }

    /// Takes one token from `ip`'s budget; false means "drop this request". O(1): touches one
    /// set of [`WAYS`] entries.
    #[inline]
    pub fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        if self.rate == 0 {
            return true;
        }
        let key = SourceKey::of(ip).0;
        let now_us = now.saturating_duration_since(self.origin).as_micros() as u64;
        let (rate, full) = (self.rate, self.rate * MICRO);
        let set = &mut self.sets[self.hasher.hash_one(key) as usize & (SETS - 1)];
        let refilled =
            |e: &Entry| e.tokens.saturating_add(now_us.saturating_sub(e.stamp_us).saturating_mul(rate)).min(full);
        let entry = match set.iter().position(|e| e.used && e.key == key) {
            Some(i) => {
                let e = &mut set[i];
                e.tokens = refilled(e);
                &mut set[i]
            }
            None => {
                // A free entry, else the one nearest to full (idle longest, or least used).
                let victim = set
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, e)| if e.used { refilled(e) } else { u64::MAX })
                    .map_or(0, |(i, _)| i);
                set[victim] = Entry { used: true, key, tokens: full, stamp_us: now_us };
                &mut set[victim]
            }
        };
        entry.stamp_us = now_us;
        if entry.tokens < MICRO {
            return false;
        }
        entry.tokens -= MICRO;
        true
    }

    /// Sources tracked now (an O(table) count, for tests and metrics; never on the packet path).
    pub fn tracked(&self) -> usize {
        self.sets.iter().flatten().filter(|e| e.used).count()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bursts_then_refills_per_source() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(10, t0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!((0..20).filter(|_| l.allow(t0, a)).count(), 10);
        assert!(l.allow(t0, b), "another IP has its own bucket");
        assert!(!l.allow(t0 + Duration::from_millis(50), a));
        assert!(l.allow(t0 + Duration::from_millis(100), a), "one token per 100 ms");
        assert!(!l.allow(t0 + Duration::from_millis(150), a), "the fraction is kept, not rounded up");
        assert!(l.allow(t0 + Duration::from_millis(200), a));
        assert_eq!((0..20).filter(|_| l.allow(t0 + Duration::from_secs(5), a)).count(), 10, "capped at the burst");
        assert!(SourceLimiter::new(0, t0).allow(t0, a));
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(5, t0);
        let allowed =
            (0..20u16).filter(|i| l.allow(t0, IpAddr::from([0x2001, 0xdb8, 1, 2, *i, 0xbeef, 0, *i]))).count();
        assert_eq!(allowed, 5, "rotating addresses within one /64 draws on one budget");
        assert!(l.allow(t0, "2001:db8:1:3::1".parse().unwrap()), "the next /64 has its own");
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        assert_eq!((0..10).filter(|_| l.allow(t0, mapped)).count(), 5);
        assert!(!l.allow(t0, "192.0.2.9".parse().unwrap()), "IPv4-mapped is the IPv4 source");
        assert_ne!(SourceKey::of("::1".parse().unwrap()), SourceKey::of("0.0.0.1".parse().unwrap()));
    }

    #[test]
    fn a_spray_of_spoofed_sources_never_evicts_a_drained_flooder() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(50, t0);
        let flooder: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!((0..100).filter(|_| l.allow(t0, flooder)).count(), 50);
        // Far more spoofed sources than the table holds, all within the same millisecond.
        for i in 0..(4 * SETS * WAYS) as u32 {
            l.allow(t0, IpAddr::from((0x0a00_0000 | i).to_be_bytes()));
        }
        assert!(l.tracked() <= SETS * WAYS, "the table never grows");
        assert!(!l.allow(t0, flooder), "the flooder's empty bucket was kept: fuller entries go first");
    }
}
