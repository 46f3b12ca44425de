//! The control plane's key cache: what the user store answered, kept for a bounded time, in a
//! bounded number of entries and bytes, so that a known user's Allocate never waits on the
//! store and a store outage falls back to what was last seen.
//!
//! Known users and "no such user" answers live in two separate tiers: a flood of unknown names
//! (which any unauthenticated client can send) fills and evicts only the small negative tier,
//! never the users the store knows (issue 21 §2).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;

use crate::store::UserKeys;

/// Who a request names (RFC 8489 §14.3 USERNAME, §14.4 USERHASH), in which realm.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LookupKey {
    /// The realm the request named.
    pub realm: Arc<str>,
    /// The user, by name or by USERHASH.
    pub who: Who,
}

/// A user named by USERNAME or by USERHASH.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Who {
    /// USERNAME.
    Name(Arc<str>),
    /// USERHASH: SHA-256(username ":" realm).
    Hash([u8; 32]),
}

/// A user the store knows: its name (learned from the store for a USERHASH) and its keys.
#[derive(Debug, Clone)]
pub struct StoredUser {
    /// The username.
    pub name: Arc<str>,
    /// The long-term keys.
    pub keys: UserKeys,
}

/// What the cache holds for a key.
#[derive(Debug, Clone, Copy)]
pub enum Cached<'a> {
    /// An answer younger than its TTL: `None` is a cached "no such user".
    Fresh(Option<&'a StoredUser>),
    /// A known user's answer older than its TTL, kept (for the stale TTL) to serve while the
    /// store is unreachable.
    Stale(Option<&'a StoredUser>),
    /// Nothing.
    Miss,
}

/// The sizes of a [`KeyCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// How long a known user's answer is fresh.
    pub ttl: Duration,
    /// How long past `ttl` a known user's answer is kept to serve during a store outage; then
    /// it is dropped.
    pub stale_ttl: Duration,
    /// How long a "no such user" answer is kept (and fresh); then it is dropped.
    pub negative_ttl: Duration,
    /// Most known users held.
    pub entries: usize,
    /// Most bytes the known users' entries may take ([`entry_bytes`]).
    pub bytes: usize,
    /// Most "no such user" answers held; their bytes are bounded by `bytes / 8`.
    pub negative_entries: usize,
}

/// The heap bytes one entry costs, approximately: the hash-table slot (at hashbrown's 7/8 load),
/// the eviction-queue slot, the `Arc` header of the name, the name's bytes, and the bytes of a
/// name learned from the store for a USERHASH.
pub fn entry_bytes(key: &LookupKey, user: Option<&StoredUser>) -> usize {
    const SLOT: usize = (std::mem::size_of::<(LookupKey, Entry)>() + 1) * 8 / 7;
    const QUEUE: usize = std::mem::size_of::<(LookupKey, u64)>();
    const ARC_HEADER: usize = 2 * std::mem::size_of::<usize>();
    let name = match &key.who {
        Who::Name(n) => ARC_HEADER + n.len(),
        Who::Hash(_) => 0,
    };
    let learned = match (&key.who, user) {
        (Who::Hash(_), Some(u)) => ARC_HEADER + u.name.len(),
        _ => 0,
    };
    SLOT + QUEUE + name + learned
}

struct Entry {
    user: Option<StoredUser>,
    fetched: Instant,
    /// Its insertion number: the eviction queue's record of it carries the same.
    seq: u64,
    bytes: usize,
}

/// One tier: a map bounded in entries and bytes, whose entries leave oldest first, or when
/// `keep` has passed since they were fetched.
struct Tier {
    map: HashMap<LookupKey, Entry>,
    /// Insertion order; a record whose `seq` is not its key's entry's any more is skipped.
    order: VecDeque<(LookupKey, u64)>,
    next_seq: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    keep: Duration,
}

impl Tier {
    fn new(max_entries: usize, max_bytes: usize, keep: Duration) -> Tier {
        Tier {
            map: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
            keep,
        }
    }

    fn get(&self, now: Instant, key: &LookupKey) -> Option<&Entry> {
        self.map.get(key).filter(|e| now.saturating_duration_since(e.fetched) < self.keep)
    }

    fn remove(&mut self, key: &LookupKey) {
        if let Some(e) = self.map.remove(key) {
            self.bytes -= e.bytes;
        }
    }

    fn insert(&mut self, now: Instant, key: LookupKey, user: Option<StoredUser>) {
        self.remove(&key);
        let bytes = entry_bytes(&key, user.as_ref());
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += bytes;
        self.order.push_back((key.clone(), seq));
        self.map.insert(key, Entry { user, fetched: now, seq, bytes });
        self.evict(now);
    }

    /// Drops entries past `keep`, then the oldest beyond the bounds.
    fn evict(&mut self, now: Instant) {
        while let Some((key, seq)) = self.order.front() {
            let live = self.map.get(key).filter(|e| e.seq == *seq);
            let drop = match live {
                None => true, // replaced or removed: only the record is left
                Some(e) => {
                    now.saturating_duration_since(e.fetched) >= self.keep
                        || self.map.len() > self.max_entries
                        || self.bytes > self.max_bytes
                }
            };
            if !drop {
                break;
            }
            if let Some((key, seq)) = self.order.pop_front() {
                if self.map.get(&key).is_some_and(|e| e.seq == seq) {
                    self.remove(&key);
                }
            }
        }
        // Records of replaced entries wait behind live ones: compact when they dominate.
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|(k, s)| map.get(k).is_some_and(|e| e.seq == *s));
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
        self.bytes = 0;
    }
}

/// A bounded cache of store answers in two tiers. Known users: at most `entries` entries and
/// `bytes` bytes (the oldest inserted go first), fresh for `ttl`, then stale (served only
/// while the store is unreachable) for `stale_ttl`, then dropped. "No such user": at most
/// `negative_entries` entries and `bytes / 8` bytes, fresh for `negative_ttl`, then dropped.
pub struct KeyCache {
    known: Tier,
    unknown: Tier,
    ttl: Duration,
}

impl KeyCache {
    /// An empty cache with these limits (each tier holds at least one entry).
    pub fn new(limits: CacheLimits) -> Self {
        KeyCache {
            known: Tier::new(limits.entries, limits.bytes, limits.ttl.saturating_add(limits.stale_ttl)),
            unknown: Tier::new(limits.negative_entries, limits.bytes / 8, limits.negative_ttl),
            ttl: limits.ttl,
        }
    }

    /// What is cached for `key` at `now`.
    pub fn get(&self, now: Instant, key: &LookupKey) -> Cached<'_> {
        if let Some(e) = self.known.get(now, key) {
            return if now.saturating_duration_since(e.fetched) < self.ttl {
                Cached::Fresh(e.user.as_ref())
            } else {
                Cached::Stale(e.user.as_ref())
            };
        }
        match self.unknown.get(now, key) {
            Some(e) => Cached::Fresh(e.user.as_ref()),
            None => Cached::Miss,
        }
    }

    /// Stores the store's answer for `key`, fetched at `now` (callers pass a `now` that never
    /// goes back), in its tier, dropping what it replaces in the other tier, what has expired,
    /// and the oldest entries beyond the bounds.
    pub fn insert(&mut self, now: Instant, key: LookupKey, user: Option<StoredUser>) {
        if user.is_some() {
            self.unknown.remove(&key);
            self.known.insert(now, key, user);
        } else {
            self.known.remove(&key);
            self.unknown.insert(now, key, user);
        }
    }

    /// Drops the entries whose time has passed at `now` (cheap: only those leave).
    pub fn expire(&mut self, now: Instant) {
        self.known.evict(now);
        self.unknown.evict(now);
    }

    /// Forgets everything (a reload: the next request asks the store again).
    pub fn clear(&mut self) {
        self.known.clear();
        self.unknown.clear();
    }

    /// Entries held, both tiers.
    pub fn len(&self) -> usize {
        self.known.map.len() + self.unknown.map.len()
    }

    /// Known users held, and "no such user" answers held.
    pub fn tiers(&self) -> (usize, usize) {
        (self.known.map.len(), self.unknown.map.len())
    }

    /// Bytes the entries take ([`entry_bytes`]), both tiers.
    pub fn bytes(&self) -> usize {
        self.known.bytes + self.unknown.bytes
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> LookupKey {
        LookupKey { realm: "r".into(), who: Who::Name(n.into()) }
    }

    fn user(n: &str) -> StoredUser {
        StoredUser { name: n.into(), keys: UserKeys { md5: [1; 16], sha256: None } }
    }

    fn limits(entries: usize, negative_entries: usize) -> CacheLimits {
        CacheLimits {
            ttl: Duration::from_secs(60),
            stale_ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(5),
            entries,
            bytes: 64 << 20,
            negative_entries,
        }
    }

    #[test]
    fn fresh_then_stale_then_gone_and_negative_shorter() {
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut c = KeyCache::new(limits(10, 10));
        c.insert(t, key("a"), Some(user("a")));
        c.insert(t, key("b"), None);
        assert!(matches!(c.get(t + s(59), &key("a")), Cached::Fresh(Some(_))));
        assert!(matches!(c.get(t + s(60), &key("a")), Cached::Stale(Some(_))));
        assert!(matches!(c.get(t + s(659), &key("a")), Cached::Stale(Some(_))));
        assert!(matches!(c.get(t + s(660), &key("a")), Cached::Miss), "past the stale TTL");
        assert!(matches!(c.get(t + s(4), &key("b")), Cached::Fresh(None)));
        assert!(matches!(c.get(t + s(5), &key("b")), Cached::Miss), "a negative answer is not kept stale");
        assert!(matches!(c.get(t, &key("c")), Cached::Miss));
        // Expiry frees the entries, not only hides them.
        c.expire(t + s(5));
        assert_eq!(c.tiers(), (1, 0));
        c.expire(t + s(660));
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn bounded_oldest_first() {
        let t = Instant::now();
        let mut c = KeyCache::new(limits(3, 3));
        for n in ["a", "b", "c", "a", "d"] {
            c.insert(t, key(n), Some(user(n)));
        }
        assert_eq!(c.len(), 3);
        // "a" was inserted again after "b" and "c": "b" was the oldest.
        assert!(matches!(c.get(t, &key("b")), Cached::Miss));
        for n in ["a", "c", "d"] {
            assert!(matches!(c.get(t, &key(n)), Cached::Fresh(Some(_))), "{n}");
        }
        c.clear();
        assert!(c.is_empty() && c.bytes() == 0);
    }

    #[test]
    fn unknown_names_never_evict_known_users() {
        let t = Instant::now();
        let mut c = KeyCache::new(limits(100, 10));
        c.insert(t, key("alice"), Some(user("alice")));
        for i in 0..10_000 {
            c.insert(t, key(&format!("stranger-{i}")), None);
        }
        assert_eq!(c.tiers(), (1, 10));
        assert!(matches!(c.get(t, &key("alice")), Cached::Fresh(Some(_))));
        assert!(matches!(c.get(t, &key("stranger-9999")), Cached::Fresh(None)));
        assert!(matches!(c.get(t, &key("stranger-0")), Cached::Miss));
        // A user deleted from the store leaves the known tier; one added leaves the negative tier.
        c.insert(t, key("alice"), None);
        assert_eq!(c.tiers(), (0, 10));
        c.insert(t, key("stranger-9999"), Some(user("stranger-9999")));
        assert_eq!(c.tiers(), (1, 9));
    }

    #[test]
    fn bounded_in_bytes() {
        let t = Instant::now();
        let long = "n".repeat(500);
        let per = entry_bytes(&key(&long), Some(&user(&long)));
        assert!(per > 500 + 64, "{per}");
        let mut c = KeyCache::new(CacheLimits { bytes: 10 * per, ..limits(1_000, 1_000) });
        for i in 0..100 {
            let n = format!("{long}{i:03}");
            c.insert(t, key(&n), Some(user(&n)));
            c.insert(t, key(&format!("x{n}")), None);
        }
        let (known, unknown) = c.tiers();
        assert!((9..=10).contains(&known), "{known}");
        // The negative tier gets an eighth of the bytes.
        assert!(unknown <= 2, "{unknown}");
        assert!(c.bytes() <= 10 * per + 10 * per / 8, "{}", c.bytes());
        // Replacing entries keeps the accounting right and the queue short.
        let n = format!("{long}099");
        for _ in 0..1_000 {
            c.insert(t, key(&n), Some(user(&n)));
        }
        assert_eq!(c.tiers().0, known);
        assert!(c.known.order.len() <= 2 * c.known.map.len() + 64);
        let sum: usize = c.known.map.values().map(|e| e.bytes).sum();
        assert_eq!(sum, c.known.bytes);
    }
}
