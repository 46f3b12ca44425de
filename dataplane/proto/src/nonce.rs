//! Stateless nonces (RFC 8489 §9.2): an HMAC over the issue time and the client's address, so
//! any thread can verify one without shared mutable state, and a nonce minted for one client is
//! worthless from another address.
//!
//! Format (24 ASCII characters, short because every byte of a 401 counts towards the relay's
//! amplification ratio): 8 hex digits of the issue time in seconds, then 16 hex digits of
//! HMAC-SHA1(secret, time || client IP || client port) truncated to 64 bits.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::response::{self, ErrorCode};
use crate::wire::{attr, Class, Method, TransactionId, WriteError};

/// Length of a nonce in bytes.
pub const NONCE_LEN: usize = 24;

/// The outcome of checking a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Minted by us for this client and not older than the lifetime.
    Valid,
    /// Minted by us for this client but expired: answer 438 (RFC 8489 §9.2.4).
    Stale,
    /// Not ours, or for another client: answered like a stale one, 438 with a fresh nonce
    /// (RFC 8489 §9.2.4: the nonce is not valid).
    Invalid,
}

/// Mints and verifies nonces with a process-wide secret.
#[derive(Clone)]
pub struct NonceKey {
    secret: [u8; 32],
    lifetime_secs: u64,
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceKey").field("lifetime_secs", &self.lifetime_secs).finish_non_exhaustive()
    }
}

impl NonceKey {
    /// A key with `secret` (from a CSPRNG) whose nonces live `lifetime_secs` seconds.
    pub fn new(secret: [u8; 32], lifetime_secs: u64) -> Self {
        NonceKey { secret, lifetime_secs }
    }

    fn mac(&self, issued: u32, client: &SocketAddr) -> [u8; 8] {
        let mut m = <Hmac<Sha1> as Mac>::new_from_slice(&self.secret).unwrap_or_else(|_| unreachable!());
        m.update(&issued.to_be_bytes());
        match client.ip() {
            IpAddr::V4(ip) => m.update(&ip.octets()),
            IpAddr::V6(ip) => m.update(&ip.octets()),
        }
        m.update(&client.port().to_be_bytes());
        let full = m.finalize().into_bytes();
        let mut out = [0u8; 8];
        out.copy_from_slice(&full[..8]);
        out
    }

    /// A nonce for `client` issued at `now_secs` (seconds on the control plane's clock, which
    /// starts near zero, so 32 bits last 136 years). The issue time is rounded down to a window
    /// of a tenth of the lifetime (at most 10 s), so a retransmitted request gets the very same
    /// 401 without the server keeping any state; a nonce lives between 90% and 100% of the
    /// lifetime.
    pub fn mint(&self, now_secs: u64, client: &SocketAddr) -> String {
        let window = (self.lifetime_secs / 10).clamp(1, 10);
        let issued = (now_secs - now_secs % window) as u32;
        let mut s = format!("{issued:08x}");
        for b in self.mac(issued, client) {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Checks a received nonce for `client` at `now_secs`. The MAC is compared in constant time.
    pub fn check(&self, nonce: &[u8], now_secs: u64, client: &SocketAddr) -> NonceCheck {
        let hex = |range: std::ops::Range<usize>| {
            std::str::from_utf8(nonce.get(range)?).ok().and_then(|h| u32::from_str_radix(h, 16).ok())
        };
        if nonce.len() != NONCE_LEN {
            return NonceCheck::Invalid;
        }
        let Some(issued) = hex(0..8) else { return NonceCheck::Invalid };
        let mut got = [0u8; 8];
        for (i, b) in got.iter_mut().enumerate() {
            let Some(v) = hex(8 + 2 * i..10 + 2 * i) else { return NonceCheck::Invalid };
            *b = v as u8;
        }
        let want = self.mac(issued, client);
        let diff = want.iter().zip(got.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        let issued = issued as u64;
        if diff != 0 || issued > now_secs {
            return NonceCheck::Invalid;
        }
        if now_secs - issued >= self.lifetime_secs {
            NonceCheck::Stale
        } else {
            NonceCheck::Valid
        }
    }
}

/// Everything needed to challenge a client with 401 or 438 (RFC 8489 §9.2.4): the realm, the
/// nonce key and the clock origin. Immutable and cheap to clone, so every worker answers the
/// unauthenticated first request of an Allocate itself, byte for byte as the control plane
/// would, and the control plane checks the nonces it sees.
#[derive(Debug, Clone)]
pub struct Challenger {
    realm: Arc<str>,
    key: NonceKey,
    origin: Instant,
}

impl Challenger {
    /// A challenger for `realm`; nonce times count seconds from `origin`.
    pub fn new(realm: &str, key: NonceKey, origin: Instant) -> Self {
        Challenger { realm: realm.into(), key, origin }
    }

    /// The clock origin for a process starting at `now` (one second before, so the first nonce
    /// is not time 0).
    pub fn origin_for(now: Instant) -> Instant {
        now.checked_sub(Duration::from_secs(1)).unwrap_or(now)
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    fn secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    /// Checks a received nonce for `client` at `now`.
    pub fn check(&self, nonce: &[u8], now: Instant, client: &SocketAddr) -> NonceCheck {
        self.key.check(nonce, self.secs(now), client)
    }

    /// Writes a `code` (401 or 438) error response with REALM and a fresh NONCE for `client`,
    /// unsigned and without SOFTWARE (an answer to a stranger stays small). Returns its length.
    pub fn write(
        &self,
        out: &mut [u8],
        method: Method,
        tid: TransactionId,
        code: ErrorCode,
        now: Instant,
        client: &SocketAddr,
    ) -> Result<usize, WriteError> {
        let nonce = self.key.mint(self.secs(now), client);
        let mut w = response::start_unauthenticated(out, method, Class::Error, tid)?;
        w.error_code(code.code(), code.reason())?;
        w.bytes(attr::REALM, self.realm.as_bytes())?;
        w.bytes(attr::NONCE, nonce.as_bytes())?;
        response::seal(w, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_then_stale_and_bound_to_client() {
        let k = NonceKey::new([5; 32], 600);
        let c: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let n = k.mint(1000, &c);
        assert_eq!(n.len(), NONCE_LEN);
        assert_eq!(k.check(n.as_bytes(), 1000, &c), NonceCheck::Valid);
        assert_eq!(k.check(n.as_bytes(), 1599, &c), NonceCheck::Valid);
        assert_eq!(k.check(n.as_bytes(), 1600, &c), NonceCheck::Stale);
        assert_eq!(k.check(n.as_bytes(), 1000, &"192.0.2.1:4001".parse().unwrap()), NonceCheck::Invalid);
        assert_eq!(NonceKey::new([6; 32], 600).check(n.as_bytes(), 1000, &c), NonceCheck::Invalid);
        let mut forged = n.into_bytes();
        forged[23] = if forged[23] == b'0' { b'1' } else { b'0' };
        assert_eq!(k.check(&forged, 1000, &c), NonceCheck::Invalid);
        assert_eq!(k.check(b"short", 1000, &c), NonceCheck::Invalid);
    }
}
