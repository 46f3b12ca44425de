//! Where long-term credentials come from (RFC 8489 §9.2) and how the control plane gets them
//! without waiting: static users from the configuration, TURN REST API usernames verified
//! with shared secrets ([`rest`]), and a user store (SQLite or Redis, [`crate::store`]) behind
//! a bounded key cache ([`cache`]) and a pool of store threads ([`lookup`]).
//!
//! [`Credentials::resolve`] answers at once from static users, REST secrets or the cache; on a
//! cache miss it queues a store lookup and answers [`Resolved::Pending`], and the control
//! plane parks the request until [`Credentials::poll`] reports the answer.

pub mod cache;
pub mod lookup;
pub mod rest;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::HashMap;
use tracing::{info, warn};
use uturn_proto::wire::integrity::{userhash, PasswordAlgorithm};
use uturn_proto::wire::IntegrityKey;

use crate::store::{StoreUrl, UserKeys};
use cache::{CacheLimits, Cached, KeyCache, LookupKey, StoredUser, Who};
use lookup::LookupPool;

/// Lookups that may wait for a store thread at once.
const LOOKUP_QUEUE: usize = 4096;

/// Everything about credentials that the configuration sets (and SIGHUP reloads).
#[derive(Debug, Clone)]
pub struct CredentialConfig {
    /// The realm offered in 401s; static users belong to it.
    pub realm: String,
    /// Further realms served: a request naming one is verified with that realm's store users.
    pub realms: Vec<String>,
    /// Static users of the default realm and their passwords.
    pub users: BTreeMap<String, String>,
    /// TURN REST API shared secrets: any verifies, the first mints.
    pub secrets: Vec<String>,
    /// Separator between expiry and user id in REST usernames.
    pub separator: char,
    /// End an allocation made with a REST credential when the credential expires.
    pub strict_expiry: bool,
    /// The user store, if any.
    pub store: Option<StoreUrl>,
    /// How long a store answer is fresh (store changes reach the relay within it).
    pub cache_ttl: Duration,
    /// How long a "no such user" answer is fresh.
    pub negative_ttl: Duration,
    /// Most known users cached.
    pub cache_size: usize,
    /// Most bytes the cached known users take ([`cache::entry_bytes`]); "no such user"
    /// answers get an eighth of it.
    pub cache_bytes: usize,
    /// Most "no such user" answers cached (a tier of their own, so unknown names never evict
    /// known users).
    pub negative_cache_size: usize,
    /// How long past `cache_ttl` a known user's answer is kept to serve during a store outage.
    pub stale_ttl: Duration,
    /// Store threads.
    pub store_threads: usize,
}

/// Who a request names.
#[derive(Debug, Clone, Copy)]
pub enum Identity<'a> {
    /// USERNAME (RFC 8489 §14.3).
    Name(&'a str),
    /// USERHASH (RFC 8489 §14.4).
    Hash(&'a [u8; 32]),
}

/// A user's identity and keys, as the control plane verifies with them.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The username (for quotas, logs and the owner check).
    pub user: Arc<str>,
    /// The long-term keys.
    pub keys: UserKeys,
    /// When a REST credential expires, Unix seconds.
    pub expires_unix: Option<u64>,
}

impl Candidate {
    /// The key of `alg`, if this user has one (a store user may lack the SHA-256 key).
    pub fn key(&self, alg: PasswordAlgorithm) -> Option<IntegrityKey> {
        match alg {
            PasswordAlgorithm::Md5 => Some(IntegrityKey::from_md5(self.keys.md5)),
            PasswordAlgorithm::Sha256 => self.keys.sha256.map(IntegrityKey::from_sha256),
        }
    }
}

/// The outcome of [`Credentials::resolve`].
#[derive(Debug, Clone)]
pub enum Resolved {
    /// Users whose keys to try, in order (one, or one per REST secret).
    Found(Vec<Candidate>),
    /// A REST username whose expiry has passed; the candidates still verify a request on an
    /// allocation it made, unless strict expiry is on.
    Expired(Vec<Candidate>),
    /// No such user (or a realm not served): 401.
    Unknown,
    /// A store lookup is under way: park the request under this key.
    Pending(LookupKey),
    /// The lookup could not even be queued (the queue is full): drop the request.
    Busy,
    /// The store is unreachable and nothing is cached: 500.
    Unavailable,
}

/// Counters about credentials.
#[derive(Debug, Default, Clone, Copy)]
pub struct CredentialStats {
    /// Answers taken from the cache while fresh.
    pub cache_hits: u64,
    /// Lookups sent to the store.
    pub store_lookups: u64,
    /// Store lookups that failed.
    pub store_errors: u64,
    /// Stale cache entries served while the store was unreachable.
    pub stale_served: u64,
}

/// The credential sources the control plane consults.
pub struct Credentials {
    config: CredentialConfig,
    realms: HashSet<Arc<str>>,
    statics: HashMap<Arc<str>, UserKeys>,
    static_hashes: HashMap<[u8; 32], Arc<str>>,
    secrets: Vec<Vec<u8>>,
    sha256: bool,
    cache: KeyCache,
    pool: Option<LookupPool>,
    /// Lookups queued and not answered yet.
    in_flight: HashSet<LookupKey>,
    /// True while the store is failing (one WARN when it starts, one INFO when it ends).
    outage: bool,
    /// Counters.
    pub stats: CredentialStats,
}

impl Credentials {
    /// Credentials from `config`; with a store, starts its threads (answers unpark
    /// `control`). `sha256` derives SHA-256 keys for static and REST users.
    pub fn new(config: CredentialConfig, sha256: bool, control: std::thread::Thread) -> std::io::Result<Self> {
        let pool = match &config.store {
            Some(url) => Some(LookupPool::start(url, config.store_threads, LOOKUP_QUEUE, control)?),
            None => None,
        };
        let cache = KeyCache::new(CacheLimits {
            ttl: config.cache_ttl,
            stale_ttl: config.stale_ttl,
            negative_ttl: config.negative_ttl,
            entries: config.cache_size,
            bytes: config.cache_bytes,
            negative_entries: config.negative_cache_size,
        });
        let mut c = Credentials {
            config: config.clone(),
            realms: HashSet::new(),
            statics: HashMap::new(),
            static_hashes: HashMap::new(),
            secrets: Vec::new(),
            sha256,
            cache,
            pool,
            in_flight: HashSet::new(),
            outage: false,
            stats: CredentialStats::default(),
        };
        c.apply(config);
        Ok(c)
    }

    fn apply(&mut self, config: CredentialConfig) {
        self.realms = std::iter::once(&config.realm).chain(&config.realms).map(|r| Arc::from(r.as_str())).collect();
        self.statics = config
            .users
            .iter()
            .map(|(u, p)| (Arc::from(u.as_str()), UserKeys::derive(u, &config.realm, p, self.sha256)))
            .collect();
        self.static_hashes = self.statics.keys().map(|u| (userhash(u, &config.realm), u.clone())).collect();
        self.secrets = config.secrets.iter().map(|s| s.as_bytes().to_vec()).collect();
        self.config = config;
    }

    /// Replaces static users, secrets, further realms and strict expiry (SIGHUP), forgets the
    /// cache, and logs what changed. The realm offered in 401s, the store, its threads and the
    /// cache's sizes stay as they were started.
    pub fn reload(&mut self, config: CredentialConfig) {
        let old: HashSet<&String> = self.config.users.keys().collect();
        let new: HashSet<&String> = config.users.keys().collect();
        let added = new.difference(&old).count();
        let removed = old.difference(&new).count();
        let changed = new.intersection(&old).filter(|u| self.config.users.get(**u) != config.users.get(**u)).count();
        info!(
            users = config.users.len(),
            added,
            removed,
            password_changed = changed,
            secrets = config.secrets.len(),
            secrets_changed = config.secrets != self.config.secrets,
            realms = 1 + config.realms.len(),
            strict_expiry = config.strict_expiry,
            "credentials reloaded"
        );
        // What the relay was started with stays: the realm its 401s offer (every worker's
        // challenger holds it), the store with its threads, and the cache's sizes;
        // `server::apply_reload` logs a WARN when the file changed them.
        let kept = &self.config;
        let next = CredentialConfig {
            realm: kept.realm.clone(),
            store: kept.store.clone(),
            cache_ttl: kept.cache_ttl,
            negative_ttl: kept.negative_ttl,
            cache_size: kept.cache_size,
            cache_bytes: kept.cache_bytes,
            negative_cache_size: kept.negative_cache_size,
            stale_ttl: kept.stale_ttl,
            store_threads: kept.store_threads,
            ..config
        };
        self.apply(next);
        self.cache.clear();
    }

    /// True when REST secrets are configured and strict expiry is on.
    pub fn strict_expiry(&self) -> bool {
        self.config.strict_expiry
    }

    /// The first REST secret (the one that mints), if any.
    pub fn first_secret(&self) -> Option<String> {
        self.config.secrets.first().cloned()
    }

    /// The REST username separator.
    pub fn separator(&self) -> char {
        self.config.separator
    }

    /// True when `realm` is served.
    pub fn serves_realm(&self, realm: &str) -> bool {
        self.realms.contains(realm)
    }

    /// Finds who `who` is in `realm` at `now`: REST usernames first (when secrets are
    /// configured), then static users (default realm), then the cache and the store.
    pub fn resolve(&mut self, now: Instant, realm: &str, who: Identity<'_>) -> Resolved {
        let Some(realm) = self.realms.get(realm).cloned() else { return Resolved::Unknown };
        let default_realm = *realm == *self.config.realm;
        if let Identity::Name(name) = who {
            if !self.secrets.is_empty() {
                if let Some(expiry) = rest::expiry(name, self.config.separator) {
                    return self.rest(name, &realm, expiry);
                }
            }
        }
        if default_realm {
            let found = match who {
                Identity::Name(n) => self.statics.get_key_value(n).map(|(u, k)| (u.clone(), *k)),
                Identity::Hash(h) => {
                    self.static_hashes.get(h).and_then(|u| self.statics.get_key_value(u)).map(|(u, k)| (u.clone(), *k))
                }
            };
            if let Some((user, keys)) = found {
                return Resolved::Found(vec![Candidate { user, keys, expires_unix: None }]);
            }
        }
        if self.pool.is_none() {
            return Resolved::Unknown;
        }
        if let Identity::Name(n) = who {
            // A name no store can hold (RFC 8489 §14.3) is no user, and is not worth a lookup
            // or a cache entry.
            if crate::store::validate_name(n).is_err() {
                return Resolved::Unknown;
            }
        }
        self.cache.expire(now);
        let key = LookupKey {
            realm,
            who: match who {
                Identity::Name(n) => Who::Name(n.into()),
                Identity::Hash(h) => Who::Hash(*h),
            },
        };
        match self.cache.get(now, &key) {
            Cached::Fresh(u) => {
                self.stats.cache_hits += 1;
                return found(u);
            }
            Cached::Stale(u) if self.outage => {
                self.stats.stale_served += 1;
                return found(u);
            }
            Cached::Stale(_) | Cached::Miss => {}
        }
        if self.in_flight.contains(&key) {
            return Resolved::Pending(key);
        }
        let Some(pool) = &self.pool else { return Resolved::Unknown };
        if !pool.submit(key.clone()) {
            return Resolved::Busy;
        }
        self.stats.store_lookups += 1;
        self.in_flight.insert(key.clone());
        Resolved::Pending(key)
    }

    /// A REST username: one candidate per secret (RFC-less "TURN REST API": password =
    /// base64(HMAC-SHA1(secret, username))).
    fn rest(&self, name: &str, realm: &str, expiry: u64) -> Resolved {
        let user: Arc<str> = name.into();
        let candidates = self
            .secrets
            .iter()
            .map(|s| Candidate {
                user: user.clone(),
                keys: UserKeys::derive(name, realm, &rest::password(s, name), self.sha256),
                expires_unix: Some(expiry),
            })
            .collect();
        if expiry <= unix_now() {
            Resolved::Expired(candidates)
        } else {
            Resolved::Found(candidates)
        }
    }

    /// Takes the store's answers that arrived: caches them and returns, for each, the key and
    /// what the requests parked under it now resolve to.
    pub fn poll(&mut self, now: Instant) -> Vec<(LookupKey, Resolved)> {
        let mut done = Vec::new();
        let Some(pool) = &self.pool else { return done };
        while let Some(answer) = pool.try_answer() {
            self.in_flight.remove(&answer.key);
            let resolved = match answer.result {
                Ok(user) => {
                    if self.outage {
                        self.outage = false;
                        info!("user store reachable again");
                    }
                    let r = found(user.as_ref());
                    self.cache.insert(now, answer.key.clone(), user);
                    r
                }
                Err(e) => {
                    self.stats.store_errors += 1;
                    if !self.outage {
                        self.outage = true;
                        warn!("user store unavailable ({e}); serving cached keys until it is back");
                    }
                    match self.cache.get(now, &answer.key) {
                        Cached::Fresh(u) | Cached::Stale(u) => {
                            self.stats.stale_served += 1;
                            found(u)
                        }
                        Cached::Miss => Resolved::Unavailable,
                    }
                }
            };
            done.push((answer.key, resolved));
        }
        done
    }

    /// Cached store answers.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Bytes the cached store answers take ([`cache::entry_bytes`]).
    pub fn cached_bytes(&self) -> usize {
        self.cache.bytes()
    }
}

fn found(user: Option<&StoredUser>) -> Resolved {
    match user {
        Some(u) => Resolved::Found(vec![Candidate { user: u.name.clone(), keys: u.keys, expires_unix: None }]),
        None => Resolved::Unknown,
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
