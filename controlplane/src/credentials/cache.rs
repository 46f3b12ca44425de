//! The control plane's key cache: what the user store answered, kept for a bounded time and in
//! bounded number, so that a known user's Allocate never waits on the store and a store outage
//! falls back to what was last seen.

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
    /// An answer older than its TTL, kept for store outages.
    Stale(Option<&'a StoredUser>),
    /// Nothing.
    Miss,
}

struct Entry {
    user: Option<StoredUser>,
    fetched: Instant,
}

/// A bounded cache of store answers: at most `capacity` entries (the oldest inserted goes
/// first), positive answers fresh for `ttl`, negative ones for `negative_ttl`. Entries past
/// their TTL stay until evicted, to serve while the store is unreachable.
pub struct KeyCache {
    map: HashMap<LookupKey, Entry>,
    order: VecDeque<LookupKey>,
    capacity: usize,
    ttl: Duration,
    negative_ttl: Duration,
}

impl KeyCache {
    /// An empty cache of at most `capacity` entries (at least 1).
    pub fn new(capacity: usize, ttl: Duration, negative_ttl: Duration) -> Self {
        KeyCache { map: HashMap::new(), order: VecDeque::new(), capacity: capacity.max(1), ttl, negative_ttl }
    }

    /// What is cached for `key` at `now`.
    pub fn get(&self, now: Instant, key: &LookupKey) -> Cached<'_> {
        match self.map.get(key) {
            None => Cached::Miss,
            Some(e) => {
                let ttl = if e.user.is_some() { self.ttl } else { self.negative_ttl };
                if now.saturating_duration_since(e.fetched) < ttl {
                    Cached::Fresh(e.user.as_ref())
                } else {
                    Cached::Stale(e.user.as_ref())
                }
            }
        }
    }

    /// Stores the store's answer for `key`, fetched at `now`, evicting the oldest entries
    /// beyond the capacity.
    pub fn insert(&mut self, now: Instant, key: LookupKey, user: Option<StoredUser>) {
        let fresh = Entry { user, fetched: now };
        if self.map.insert(key.clone(), fresh).is_none() {
            self.order.push_back(key);
            while self.map.len() > self.capacity {
                match self.order.pop_front() {
                    Some(old) => {
                        self.map.remove(&old);
                    }
                    None => break,
                }
            }
        }
    }

    /// Forgets everything (a reload: the next request asks the store again).
    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
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

    #[test]
    fn fresh_then_stale_and_negative_shorter() {
        let t = Instant::now();
        let mut c = KeyCache::new(10, Duration::from_secs(60), Duration::from_secs(5));
        c.insert(t, key("a"), Some(user("a")));
        c.insert(t, key("b"), None);
        assert!(matches!(c.get(t + Duration::from_secs(59), &key("a")), Cached::Fresh(Some(_))));
        assert!(matches!(c.get(t + Duration::from_secs(60), &key("a")), Cached::Stale(Some(_))));
        assert!(matches!(c.get(t + Duration::from_secs(4), &key("b")), Cached::Fresh(None)));
        assert!(matches!(c.get(t + Duration::from_secs(5), &key("b")), Cached::Stale(None)));
        assert!(matches!(c.get(t, &key("c")), Cached::Miss));
    }

    #[test]
    fn bounded_oldest_first() {
        let t = Instant::now();
        let mut c = KeyCache::new(3, Duration::from_secs(60), Duration::from_secs(5));
        for n in ["a", "b", "c", "a", "d"] {
            c.insert(t, key(n), Some(user(n)));
        }
        assert_eq!(c.len(), 3);
        assert!(matches!(c.get(t, &key("a")), Cached::Miss));
        for n in ["b", "c", "d"] {
            assert!(matches!(c.get(t, &key(n)), Cached::Fresh(Some(_))), "{n}");
        }
        c.clear();
        assert!(c.is_empty());
    }
}
