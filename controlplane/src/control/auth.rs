//! Authentication (RFC 8489 §9.2.4) and the requests parked while a user store answers: the
//! part of the control plane that decides who sent a request, without ever waiting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;
use uturn_dataplane::ToWorker;
use uturn_proto::nonce::NonceCheck;
use uturn_proto::response::ErrorCode;
use uturn_proto::wire::integrity::PasswordAlgorithm;
use uturn_proto::wire::{IntegrityKey, Message, Method};
use uturn_proto::FiveTuple;

use super::{ControlPlane, MAX_PARKED, PARK_TIMEOUT};
use crate::credentials::cache::LookupKey;
use crate::credentials::{Candidate, Identity, Resolved};
use crate::metrics::AuthOutcome;

/// The longest NONCE, in bytes (RFC 8489 §14.10: fewer than 128 characters, "which can be as
/// long as 763 bytes").
pub(crate) const MAX_NONCE_BYTES: usize = 763;

/// True when USERNAME, REALM and NONCE are within RFC 8489's lengths: USERNAME fewer than 509
/// bytes (§14.3), REALM and NONCE fewer than 128 characters and at most 763 bytes (§14.9,
/// §14.10). A REALM that is not UTF-8 passes here and is "not served" (401) later.
pub(crate) fn within_rfc_limits(identity: Identity<'_>, realm: &[u8], nonce: &[u8]) -> bool {
    use crate::store::{MAX_NAME_BYTES, MAX_REALM_BYTES, MAX_REALM_CHARS};
    let chars = |b: &[u8]| std::str::from_utf8(b).map_or(0, |s| s.chars().count());
    let name_ok = match identity {
        Identity::Name(n) => n.len() <= MAX_NAME_BYTES,
        Identity::Hash(_) => true,
    };
    name_ok
        && realm.len() <= MAX_REALM_BYTES
        && chars(realm) <= MAX_REALM_CHARS
        && nonce.len() <= MAX_NONCE_BYTES
        && chars(nonce) <= MAX_REALM_CHARS
}

/// The most bytes of requests parked for the store at once: with [`MAX_PARKED`] requests, it
/// bounds what a flood of large requests (up to 64 KiB each over TCP/TLS) can hold while the
/// store is slow.
pub(crate) const MAX_PARKED_BYTES: usize = 16 << 20;

/// Outcome of authentication.
pub(super) enum Auth {
    Ok {
        user: Arc<str>,
        key: IntegrityKey,
        expires_unix: Option<u64>,
    },
    Reply(Vec<u8>),
    /// Waiting for the user store: park the request under this key.
    Pending(LookupKey),
    /// Drop the request (overload); the client retransmits.
    Drop,
}

/// A request waiting for a user-store lookup.
pub(super) struct Parked {
    worker: usize,
    five_tuple: FiveTuple,
    bytes: Box<[u8]>,
    since: Instant,
    /// When the worker received it.
    received: Instant,
}

impl ControlPlane {
    /// RFC 8489 §9.2.4, in its order: no integrity attribute -> 401 with REALM, NONCE and
    /// PASSWORD-ALGORITHMS; missing USERNAME (or USERHASH), REALM or NONCE, or one longer than
    /// RFC 8489 allows (USERNAME 509 bytes or more, §14.3; REALM or NONCE 128 characters or
    /// more, or over 763 bytes, §14.9, §14.10) -> 400; a
    /// PASSWORD-ALGORITHM(S) that does not match the offer -> 400; bad or expired nonce -> 438
    /// with a fresh one; unknown user, realm not served, expired REST credential or wrong HMAC
    /// -> 401. Unknown user and wrong password give byte-identical answers. A user the store
    /// has not answered for yet parks the request.
    pub(super) fn authenticate(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message<'_>,
        known: Option<Resolved>,
    ) -> Auth {
        let Some(parts) = msg.integrity_parts() else {
            self.metrics.auth(AuthOutcome::Challenged);
            return Auth::Reply(self.challenge(now, ft, msg, ErrorCode::Unauthenticated));
        };
        let features = self.challenger.security_features();
        let identity = match (msg.username(), msg.userhash()) {
            (Some(u), _) => std::str::from_utf8(u).ok().map(Identity::Name),
            (None, Some(Ok(h))) if features => Some(Identity::Hash(h)),
            _ => None,
        };
        let (Some(identity), Some(realm), Some(nonce)) = (identity, msg.realm(), msg.nonce()) else {
            // A USERNAME that is not UTF-8 is as good as none.
            self.metrics.auth(AuthOutcome::BadRequest);
            return Auth::Reply(self.error(msg, ErrorCode::BadRequest, None));
        };
        if !within_rfc_limits(identity, realm, nonce) {
            // Nothing past the RFC's lengths is looked up, cached or parked (issue 21 §2).
            self.metrics.auth(AuthOutcome::BadRequest);
            return Auth::Reply(self.error(msg, ErrorCode::BadRequest, None));
        }
        let alg = match self.challenger.password_algorithm(msg) {
            Ok(a) => a,
            Err(code) => {
                self.metrics.auth(AuthOutcome::BadRequest);
                return Auth::Reply(self.error(msg, code, None));
            }
        };
        if self.challenger.check(nonce, now, &ft.nonce_address()) != NonceCheck::Valid {
            self.metrics.auth(AuthOutcome::StaleNonce);
            return Auth::Reply(self.challenge(now, ft, msg, ErrorCode::StaleNonce));
        }
        let resolved = match (known, std::str::from_utf8(realm)) {
            (Some(k), _) => k,
            (None, Ok(r)) => self.credentials.resolve(now, r, identity),
            (None, Err(_)) => Resolved::Unknown,
        };
        self.verify(now, ft, msg, &parts, alg, resolved)
    }

    /// The last step of [`authenticate`](Self::authenticate): the candidates' keys against the
    /// request's integrity attribute.
    fn verify(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message<'_>,
        parts: &uturn_proto::wire::IntegrityParts<'_>,
        alg: PasswordAlgorithm,
        resolved: Resolved,
    ) -> Auth {
        let (candidates, expired) = match resolved {
            Resolved::Found(c) => (c, false),
            Resolved::Expired(c) => (c, true),
            Resolved::Unknown => (Vec::new(), false),
            Resolved::Pending(key) => return Auth::Pending(key),
            Resolved::Busy => return Auth::Drop,
            Resolved::Unavailable => {
                self.metrics.auth(AuthOutcome::StoreUnavailable);
                return Auth::Reply(self.error(msg, ErrorCode::ServerError, None));
            }
        };
        let mac = parts.algorithm;
        let hit = candidates.iter().find_map(|c: &Candidate| {
            let key = c.key(alg)?;
            key.verify(parts).then(|| (c.user.clone(), key.signing_with(mac), c.expires_unix))
        });
        if hit.is_none() && candidates.is_empty() {
            // An unknown user costs the same HMAC as a known one, so timing does not tell them apart.
            let _ = IntegrityKey::from_md5([0; 16]).verify(parts);
        }
        match hit {
            // RFC-less REST rule (as eturnal): an expired credential still verifies requests on
            // the allocation it made, unless strict expiry ends that allocation with it.
            Some((user, key, expires_unix))
                if !expired
                    || (msg.method() != Method::ALLOCATE
                        && !self.credentials.strict_expiry()
                        && self.owners.get(ft).is_some_and(|o| o.user == user)) =>
            {
                self.metrics.auth(AuthOutcome::Ok);
                Auth::Ok { user, key, expires_unix }
            }
            _ => {
                self.metrics.auth(AuthOutcome::Rejected);
                debug!(client = %ft.client, method = msg.method().name(), expired, "authentication failed");
                Auth::Reply(self.challenge(now, ft, msg, ErrorCode::Unauthenticated))
            }
        }
    }

    /// The most lifetime an allocation may be granted under strict expiry: the time left on
    /// its REST credential.
    pub(super) fn credential_cap(&self, expires_unix: Option<u64>) -> Option<Duration> {
        let exp = expires_unix.filter(|_| self.credentials.strict_expiry())?;
        Some(Duration::from_secs(exp.saturating_sub(crate::credentials::unix_now()).max(1)))
    }

    /// Parks a request until the store answers for `lookup`; false (not parked, counted) when
    /// the table is full ([`MAX_PARKED`] requests or [`MAX_PARKED_BYTES`] bytes).
    pub(super) fn park(
        &mut self,
        now: Instant,
        lookup: LookupKey,
        worker: usize,
        five_tuple: FiveTuple,
        bytes: &[u8],
        received: Instant,
    ) -> bool {
        if self.parked_count >= MAX_PARKED || self.parked_bytes + bytes.len() > MAX_PARKED_BYTES {
            self.stats.parked_dropped += 1;
            return false;
        }
        self.stats.parked += 1;
        self.parked_count += 1;
        self.parked_bytes += bytes.len();
        self.parked.entry(lookup).or_default().push(Parked {
            worker,
            five_tuple,
            bytes: bytes.into(),
            since: now,
            received,
        });
        self.metrics.set_parked(self.parked_count);
        true
    }

    /// Handles the requests whose store lookups were answered; returns what to push to which
    /// worker. Parked requests older than 5 s are dropped.
    pub fn poll_lookups(&mut self, now: Instant) -> Vec<(usize, ToWorker)> {
        let mut out = Vec::new();
        for (key, resolved) in self.credentials.poll(now) {
            let Some(waiting) = self.parked.remove(&key) else { continue };
            self.parked_count -= waiting.len();
            self.parked_bytes -= waiting.iter().map(|p| p.bytes.len()).sum::<usize>();
            for p in waiting {
                // The answer itself decides (not a new lookup: with a zero cache TTL that would
                // park the request again). Unavailable becomes 500 in `verify`.
                if let Some(a) = self.handle(now, p.worker, p.five_tuple, &p.bytes, Some(resolved.clone()), p.received)
                {
                    out.push((p.worker, a));
                }
            }
        }
        if self.parked_count > 0 {
            let before = self.parked_count;
            // Over TCP/TLS a request timed out here is answered (508), not dropped.
            let mut timed_out = Vec::new();
            self.parked.retain(|_, v| {
                v.retain_mut(|p| {
                    let keep = now.saturating_duration_since(p.since) < PARK_TIMEOUT;
                    if !keep && p.five_tuple.transport != uturn_proto::Transport::Udp {
                        timed_out.push((p.worker, p.five_tuple, std::mem::take(&mut p.bytes)));
                    }
                    keep
                });
                !v.is_empty()
            });
            self.parked_count = self.parked.values().map(Vec::len).sum();
            self.parked_bytes = self.parked.values().flatten().map(|p| p.bytes.len()).sum();
            self.stats.parked_dropped += (before - self.parked_count) as u64;
            for (worker, ft, bytes) in timed_out {
                if let Some(a) = Message::parse(&bytes).ok().and_then(|m| self.refuse_busy(ft, &m)) {
                    out.push((worker, a));
                }
            }
        }
        out.extend(self.poll_fleet_quota(now));
        self.ports_exhausted.flush(now);
        self.bind_refusals.flush(now);
        self.metrics.set_parked(self.parked_count);
        self.metrics.set_user_cache(self.credentials.cached(), self.credentials.cached_bytes());
        out
    }

    /// Requests waiting for the store.
    pub fn parked(&self) -> usize {
        self.parked_count
    }
}
