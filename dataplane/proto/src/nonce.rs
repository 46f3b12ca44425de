//! Stateless nonces (RFC 8489 §9.2): an HMAC over the issue time and the client's address, so
//! any thread can verify one without shared mutable state, and a nonce minted for one client is
//! worthless from another address.
//!
//! Format (ASCII, short because every byte of a 401 counts towards the relay's amplification
//! ratio): when the relay offers RFC 8489's security features, the nonce cookie `obMatJos2`
//! and 4 base64 characters of the 24 security-feature bits (§9.2: bit 0 "password algorithms",
//! bit 1 "username anonymity"); then 8 hex digits of the issue time in seconds and 16 hex digits
//! of HMAC-SHA1(secret, time || client IP || client port) truncated to 64 bits. 37 characters
//! with the cookie, 24 without.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::response::{self, ErrorCode};
use crate::wire::integrity::PasswordAlgorithm;
use crate::wire::{attr, Class, Message, Method, TransactionId, WriteError};

/// Length of the time-and-MAC part of a nonce, bytes.
pub const NONCE_LEN: usize = 24;
/// The nonce cookie that announces RFC 8489's security features (§9.2).
pub const NONCE_COOKIE: &str = "obMatJos2";
/// The cookie followed by the feature bits this relay sets: password algorithms and username
/// anonymity (bits 0 and 1: 0xC00000, base64 `wAAA`).
const COOKIE_WITH_FEATURES: &str = "obMatJos2wAAA";

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
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
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

    /// The secret (handed to the next process in a hot upgrade, so its nonces stay valid).
    pub fn secret(&self) -> [u8; 32] {
        self.secret
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
        // Strictly lowercase hex digits, as minted: `from_str_radix` would take a leading '+'
        // (and uppercase), so several texts would name one nonce.
        let hex = |range: std::ops::Range<usize>| {
            nonce.get(range)?.iter().try_fold(0u32, |acc, &c| {
                let d = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    _ => return None,
                };
                Some(acc << 4 | u32::from(d))
            })
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
/// nonce key, the clock origin and the password algorithms offered. Immutable and cheap to
/// clone, so every worker answers the unauthenticated first request of an Allocate itself, byte
/// for byte as the control plane would, and the control plane checks the nonces it sees.
#[derive(Debug, Clone)]
pub struct Challenger {
    realm: Arc<str>,
    key: NonceKey,
    origin: Instant,
    /// Seconds added to the time since `origin`: 0 for a node alone; in a fleet the UNIX time
    /// at `origin`, so every node counts the same seconds (see [`Challenger::with_epoch`]).
    epoch: u64,
    /// PASSWORD-ALGORITHMS' value as sent, in order of preference; empty when only MD5 is
    /// offered (an RFC 5389 challenge: no cookie, no PASSWORD-ALGORITHMS, no USERHASH).
    algorithms: Arc<[u8]>,
}

impl Challenger {
    /// A challenger for `realm` offering only MD5, as RFC 5389 servers do; nonce times count
    /// seconds from `origin`.
    pub fn new(realm: &str, key: NonceKey, origin: Instant) -> Self {
        Challenger { realm: realm.into(), key, origin, epoch: 0, algorithms: Arc::from(&[][..]) }
    }

    /// The same challenger counting nonce times as `epoch_secs` plus the seconds since its
    /// origin. A fleet whose nodes share the nonce secret sets the origin to now and
    /// `epoch_secs` to the UNIX time now (seconds), so a nonce minted by one node is checked on
    /// the same clock by every other (their wall clocks agreeing to within a nonce window).
    pub fn with_epoch(mut self, epoch_secs: u64) -> Self {
        self.epoch = epoch_secs;
        self
    }

    /// The same challenger offering `algorithms` in order of preference (RFC 8489 §9.2.4): with
    /// anything beyond MD5 alone, nonces carry the cookie with the password-algorithms and
    /// username-anonymity bits and 401/438 carry PASSWORD-ALGORITHMS.
    pub fn offering(mut self, algorithms: &[PasswordAlgorithm]) -> Self {
        let mut value = Vec::with_capacity(algorithms.len() * 4);
        if algorithms != [PasswordAlgorithm::Md5] {
            for a in algorithms {
                value.extend_from_slice(&a.number().to_be_bytes());
                value.extend_from_slice(&[0, 0]);
            }
        }
        self.algorithms = value.into();
        self
    }

    /// True when RFC 8489's security features are offered (the nonce cookie is sent).
    pub fn security_features(&self) -> bool {
        !self.algorithms.is_empty()
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

    /// The nonce key.
    pub fn key(&self) -> &NonceKey {
        &self.key
    }

    /// The clock origin nonce times count from.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    fn secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() + self.epoch
    }

    /// Seconds added to the time since the origin (0 unless set by [`with_epoch`](Self::with_epoch)).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn prefix(&self) -> &'static str {
        if self.security_features() {
            COOKIE_WITH_FEATURES
        } else {
            ""
        }
    }

    /// Checks a received nonce for `client` at `now`.
    pub fn check(&self, nonce: &[u8], now: Instant, client: &SocketAddr) -> NonceCheck {
        match nonce.strip_prefix(self.prefix().as_bytes()) {
            Some(rest) => self.key.check(rest, self.secs(now), client),
            None => NonceCheck::Invalid,
        }
    }

    /// The password algorithm an authenticated request uses (RFC 8489 §9.2.4): MD5 when it
    /// carries neither PASSWORD-ALGORITHM nor PASSWORD-ALGORITHMS, or when no features are
    /// offered; else both must be present, PASSWORD-ALGORITHMS must be the list this relay sent
    /// and PASSWORD-ALGORITHM one of its entries, or the answer is 400.
    pub fn password_algorithm(&self, msg: &Message<'_>) -> Result<PasswordAlgorithm, ErrorCode> {
        if !self.security_features() {
            return Ok(PasswordAlgorithm::Md5);
        }
        match (msg.password_algorithm(), msg.get(attr::PASSWORD_ALGORITHMS)) {
            (None, None) => Ok(PasswordAlgorithm::Md5),
            (Some(Ok(alg)), Some(list)) if list == &self.algorithms[..] && self.offers(alg) => Ok(alg),
            _ => Err(ErrorCode::BadRequest),
        }
    }

    fn offers(&self, alg: PasswordAlgorithm) -> bool {
        self.algorithms.chunks_exact(4).any(|c| u16::from_be_bytes([c[0], c[1]]) == alg.number())
    }

    /// Writes a `code` (401 or 438) error response with REALM, a fresh NONCE for `client` and,
    /// with security features, PASSWORD-ALGORITHMS; unsigned and without SOFTWARE (an answer to
    /// a stranger stays small). Returns its length.
    pub fn write(
        &self,
        out: &mut [u8],
        method: Method,
        tid: TransactionId,
        code: ErrorCode,
        now: Instant,
        client: &SocketAddr,
    ) -> Result<usize, WriteError> {
        let mut nonce = String::with_capacity(COOKIE_WITH_FEATURES.len() + NONCE_LEN);
        nonce.push_str(self.prefix());
        nonce.push_str(&self.key.mint(self.secs(now), client));
        let mut w = response::start_unauthenticated(out, method, Class::Error, tid)?;
        w.error_code(code.code(), code.reason())?;
        w.bytes(attr::REALM, self.realm.as_bytes())?;
        w.bytes(attr::NONCE, nonce.as_bytes())?;
        if self.security_features() {
            w.bytes(attr::PASSWORD_ALGORITHMS, &self.algorithms)?;
        }
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

    #[test]
    fn only_the_minted_lowercase_hex_is_accepted() {
        let k = NonceKey::new([5; 32], 600);
        let c: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        // Issued at 1000 = "000003e8": a leading zero that '+' could stand for.
        let n = k.mint(1000, &c).into_bytes();
        assert_eq!(&n[..8], b"000003e8");
        assert_eq!(k.check(&n, 1000, &c), NonceCheck::Valid);
        let mut plus = n.clone();
        plus[0] = b'+';
        assert_eq!(k.check(&plus, 1000, &c), NonceCheck::Invalid, "'+' is no hex digit");
        let mut upper = n.clone();
        upper[6] = b'E';
        assert_eq!(k.check(&upper, 1000, &c), NonceCheck::Invalid, "only the minted (lowercase) form");
        for bad in [b' ', b'-', b'g', b'x'] {
            let mut m = n.clone();
            m[0] = bad;
            assert_eq!(k.check(&m, 1000, &c), NonceCheck::Invalid, "{}", bad as char);
        }
        // The MAC digits too: a '+' before a digit of a byte below 0x10 never verifies.
        for i in 8..n.len() {
            if n[i] == b'0' && i % 2 == 0 {
                let mut m = n.clone();
                m[i] = b'+';
                assert_eq!(k.check(&m, 1000, &c), NonceCheck::Invalid, "at {i}");
            }
        }
    }

    #[test]
    fn nodes_sharing_a_secret_and_an_epoch_take_each_others_nonces() {
        // Two nodes started 100 s apart: with the same secret but each counting from its own
        // start, B sees A's nonce issued in its future (invalid); counting UNIX seconds
        // (with_epoch), it is valid on both.
        let t0 = Instant::now();
        let (a_start, b_start) = (t0, t0 + Duration::from_secs(100));
        let now = t0 + Duration::from_secs(130);
        let client: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let key = NonceKey::new([9; 32], 600);
        let mut out = [0u8; 256];
        let mint = |c: &Challenger, out: &mut [u8]| {
            let n = c
                .write(out, Method::ALLOCATE, TransactionId([1; 12]), ErrorCode::Unauthenticated, now, &client)
                .unwrap();
            Message::parse(&out[..n]).unwrap().nonce().unwrap().to_vec()
        };
        let (a, b) = (Challenger::new("r", key.clone(), a_start), Challenger::new("r", key.clone(), b_start));
        let nonce = mint(&a, &mut out);
        assert_eq!(b.check(&nonce, now, &client), NonceCheck::Invalid, "own clocks differ");
        let unix = 1_765_000_000;
        let a = a.with_epoch(unix);
        let b = b.with_epoch(unix + 100);
        let nonce = mint(&a, &mut out);
        assert_eq!(b.check(&nonce, now, &client), NonceCheck::Valid);
        assert_eq!(a.check(&mint(&b, &mut out), now, &client), NonceCheck::Valid);
        // Another secret never verifies, shared clock or not.
        let c = Challenger::new("r", NonceKey::new([8; 32], 600), b_start).with_epoch(unix + 100);
        assert_eq!(c.check(&nonce, now, &client), NonceCheck::Invalid);
        assert_eq!(b.check(&nonce, now + Duration::from_secs(600), &client), NonceCheck::Stale);
    }

    #[test]
    fn cookie_and_password_algorithms() {
        let c = Challenger::new("r", NonceKey::new([1; 32], 600), Instant::now())
            .offering(&[PasswordAlgorithm::Sha256, PasswordAlgorithm::Md5]);
        let client: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let mut out = [0u8; 256];
        let now = Instant::now();
        let n = c
            .write(&mut out, Method::ALLOCATE, TransactionId([3; 12]), ErrorCode::Unauthenticated, now, &client)
            .unwrap();
        let m = Message::parse(&out[..n]).unwrap();
        let nonce = m.nonce().unwrap();
        assert!(nonce.starts_with(b"obMatJos2wAAA"));
        assert_eq!(nonce.len(), 13 + NONCE_LEN);
        assert_eq!(c.check(nonce, now, &client), NonceCheck::Valid);
        // The same time-and-MAC part without the cookie is not ours.
        assert_eq!(c.check(&nonce[13..], now, &client), NonceCheck::Invalid);
        assert_eq!(m.get(attr::PASSWORD_ALGORITHMS), Some(&[0, 2, 0, 0, 0, 1, 0, 0][..]));
        // An RFC 5389 challenger sends neither.
        let plain = Challenger::new("r", NonceKey::new([1; 32], 600), Instant::now());
        let n = plain
            .write(&mut out, Method::ALLOCATE, TransactionId([3; 12]), ErrorCode::Unauthenticated, now, &client)
            .unwrap();
        let m = Message::parse(&out[..n]).unwrap();
        assert_eq!(m.nonce().unwrap().len(), NONCE_LEN);
        assert!(m.get(attr::PASSWORD_ALGORITHMS).is_none());
    }
}
