//! The Redis user store, over a synchronous connection (no async runtime).
//!
//! # Layout
//!
//! Operators may populate it from their own tooling; all values are text:
//!
//! | key                       | type | field                         | value                                   |
//! |---------------------------|------|-------------------------------|-----------------------------------------|
//! | `uturn:users:<realm>`     | hash | username                      | keys, hex (below)                       |
//! | `uturn:userhash:<realm>`  | hash | USERHASH, 64 lowercase hex    | username                                |
//! | `uturn:realms`            | set  |                               | every realm that has users              |
//!
//! - `<realm>` is the realm verbatim, e.g. `uturn:users:example.org`.
//! - keys: the 16-byte MD5 key `MD5(name ":" realm ":" password)` as 32 hex digits, optionally
//!   followed by the 32-byte SHA-256 key `SHA-256(name ":" realm ":" password)` as 64 more
//!   (RFC 8489 §9.2.2). Either case is read; raw binary (16 or 48 bytes) is read too.
//!   `printf '%s' 'alice:example.org:secret' | md5sum` gives the first part.
//! - USERHASH is `SHA-256(name ":" realm)` (RFC 8489 §14.4):
//!   `printf '%s' 'alice:example.org' | sha256sum`. Only users listed here are found by USERHASH.
//! - `uturn:realms` is used by `list` only; lookups do not need it.
//!
//! For example:
//! ```text
//! HSET uturn:users:example.org alice 0123...(32 or 96 hex digits)
//! HSET uturn:userhash:example.org 4a3c...(64 hex digits) alice
//! SADD uturn:realms example.org
//! ```
//!
//! `add`, `set_keys` and `delete` run as Lua scripts (`EVAL`), so each is atomic, and `add`
//! fails on an existing user (HSETNX) without touching it. `add_many` writes batches of up to
//! [`BATCH`] users of one realm, each all-or-nothing: WATCH the realm's user hash, HMGET to find
//! an existing user, then MULTI / HSET / HSET / SADD / EXEC (again if another client wrote to
//! the realm meanwhile). A failed `add_many` leaves the batches before the failing one written.
//!
//! # Failures
//!
//! Connect, read and write timeouts are [`TIMEOUT`] (1 s). Connecting runs on a helper thread
//! that the caller waits on for at most [`CONNECT_DEADLINE`]: the connection set-up commands of
//! the `redis` crate are read without a timeout, and a server that accepts TCP but never answers
//! (a stopped process, a proxy without a back end) must not hang a store thread. While such an
//! attempt is outstanding, calls fail at once with Unavailable instead of starting another.
//! After an I/O error on an established connection, a call reconnects once and retries; a
//! write whose reply was lost may then report Duplicate or NotFound for its own first attempt.

use std::collections::HashSet;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::thread;
use std::time::Duration;

use ::redis::{Client, Connection, RedisError, RedisResult};

use super::{from_hex, mask_redis, storable, to_hex, userhash, validate, validate_realm};
use super::{StoreError, UserKeys, UserRecord, UserStore};

/// Connect, read and write timeout of the connection.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// The longest a call waits for a connection (TCP connect plus the set-up commands).
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(2);
/// Users per `add_many` transaction.
pub const BATCH: usize = 10_000;
/// How often an `add_many` batch is tried when other clients keep writing to its realm.
const WATCH_TRIES: usize = 3;
/// Prefix of the per-realm hash of users.
pub const USERS_PREFIX: &str = "uturn:users:";
/// Prefix of the per-realm hash USERHASH -> name.
pub const USERHASH_PREFIX: &str = "uturn:userhash:";
/// The set of realms.
pub const REALMS: &str = "uturn:realms";

/// KEYS users, userhash, realms; ARGV name, keys, userhash, realm. 1 added, 0 exists.
const ADD: &str = "
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[4])
return 1";

/// KEYS users; ARGV name, keys. 1 replaced, 0 no such user.
const SET_KEYS: &str = "
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1";

/// KEYS users, userhash, realms; ARGV name, userhash, realm. 1 deleted, 0 no such user.
const DELETE: &str = "
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[3], ARGV[3]) end
return 1";

/// A user store in a Redis database. One per thread: it is `Send`, not `Sync`.
pub struct RedisStore {
    client: Client,
    /// The URL with its password masked, for messages.
    shown: String,
    conn: Option<Connection>,
    /// A connection attempt that outlived [`CONNECT_DEADLINE`] and is still running.
    pending: Option<Receiver<RedisResult<Connection>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("url", &self.shown).field("connected", &self.conn.is_some()).finish()
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://[:password@]host[:port][/db]`); Unavailable if it
    /// does not answer within [`CONNECT_DEADLINE`], BadUrl if the URL is not one.
    pub fn open(url: &str) -> Result<RedisStore, StoreError> {
        let shown = mask_redis(url);
        let client = Client::open(url).map_err(|e| StoreError::BadUrl(format!("{shown}: {e}")))?;
        let mut store = RedisStore { client, shown, conn: None, pending: None };
        let conn = store.connect()?;
        store.conn = Some(conn);
        Ok(store)
    }

    fn unavailable(&self, e: &RedisError) -> StoreError {
        StoreError::Unavailable(format!("{}: {e}", self.shown))
    }

    /// A new connection with its timeouts set, waited for at most [`CONNECT_DEADLINE`].
    fn connect(&mut self) -> Result<Connection, StoreError> {
        if let Some(rx) = self.pending.take() {
            match rx.try_recv() {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(_)) | Err(TryRecvError::Disconnected) => {}
                Err(TryRecvError::Empty) => {
                    self.pending = Some(rx);
                    return Err(StoreError::Unavailable(format!(
                        "{}: an earlier connection attempt is still unanswered",
                        self.shown
                    )));
                }
            }
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let client = self.client.clone();
        let spawned = thread::Builder::new().name("uturn-redis-connect".into()).spawn(move || {
            let conn = client.get_connection_with_timeout(TIMEOUT).and_then(|c| {
                c.set_read_timeout(Some(TIMEOUT))?;
                c.set_write_timeout(Some(TIMEOUT))?;
                Ok(c)
            });
            // The caller may have given up on us: then the connection is dropped.
            let _ = tx.send(conn);
        });
        if let Err(e) = spawned {
            return Err(StoreError::Unavailable(format!("{}: cannot start a connect thread: {e}", self.shown)));
        }
        match rx.recv_timeout(CONNECT_DEADLINE) {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(self.unavailable(&e)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.pending = Some(rx);
                Err(StoreError::Unavailable(format!("{}: no answer within {CONNECT_DEADLINE:?}", self.shown)))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(StoreError::Unavailable(format!("{}: the connect thread failed", self.shown)))
            }
        }
    }

    /// Runs `f` on the connection, connecting first if there is none. After an I/O error on a
    /// connection that this call did not make, reconnects once and runs `f` again.
    fn call<T>(&mut self, mut f: impl FnMut(&mut Connection) -> RedisResult<T>) -> Result<T, StoreError> {
        let mut fresh = false;
        loop {
            let mut conn = match self.conn.take() {
                Some(c) => c,
                None => {
                    fresh = true;
                    self.connect()?
                }
            };
            match f(&mut conn) {
                Ok(v) => {
                    self.conn = Some(conn);
                    return Ok(v);
                }
                // The connection is unusable (and after a timeout out of step): drop it.
                Err(e) if e.is_io_error() || e.is_unrecoverable_error() => {
                    if fresh {
                        return Err(self.unavailable(&e));
                    }
                }
                Err(e) => {
                    self.conn = Some(conn);
                    return Err(self.unavailable(&e));
                }
            }
        }
    }

    /// Adds `batch`, users of `realm` with distinct names, all or none: WATCH the realm's hash,
    /// HMGET for an existing user, then HSET both hashes in MULTI/EXEC, again if another client
    /// wrote to the realm in between. Native commands rather than a script: a million users
    /// load in about half the time, and the server is never busy for long.
    fn add_batch(&mut self, realm: &str, batch: &[UserRecord]) -> Result<(), StoreError> {
        let (ukey, hkey) = (users_key(realm), userhash_key(realm));
        let mut hmget = ::redis::cmd("HMGET");
        hmget.arg(&ukey);
        let mut tx = ::redis::pipe();
        tx.atomic().cmd("HSET").arg(&ukey);
        for u in batch {
            hmget.arg(&u.name);
            tx.arg(&u.name).arg(keys_value(&u.keys));
        }
        tx.ignore().cmd("HSET").arg(&hkey);
        for u in batch {
            tx.arg(to_hex(&userhash(&u.name, realm))).arg(&u.name);
        }
        tx.ignore().cmd("SADD").arg(REALMS).arg(realm).ignore();
        for _ in 0..WATCH_TRIES {
            let outcome = self.call(|c| {
                ::redis::cmd("WATCH").arg(&ukey).query::<()>(c)?;
                let got: Vec<Option<Vec<u8>>> = hmget.query(c)?;
                if let Some(i) = got.iter().position(Option::is_some) {
                    ::redis::cmd("UNWATCH").query::<()>(c)?;
                    return Ok(Some(i));
                }
                // Nil (None) when EXEC was aborted by a write to the watched hash.
                let done: Option<()> = tx.query(c)?;
                Ok(done.map(|()| batch.len()))
            })?;
            match outcome {
                Some(i) if i == batch.len() => return Ok(()),
                Some(i) => {
                    let name = batch.get(i).map_or_else(String::new, |u| u.name.clone());
                    return Err(StoreError::Duplicate { realm: realm.to_owned(), name });
                }
                None => continue,
            }
        }
        Err(StoreError::Unavailable(format!("{}: {ukey} kept changing during add_many", self.shown)))
    }

    /// The keys of `name` from a hash value, or Unavailable when the value is not keys.
    fn parse_keys(&self, realm: &str, name: &str, v: &[u8]) -> Result<UserKeys, StoreError> {
        let mut md5 = [0; 16];
        let mut sha = [0; 32];
        let ok = match v.len() {
            16 => {
                md5.copy_from_slice(v);
                Some(None)
            }
            48 => {
                md5.copy_from_slice(&v[..16]);
                sha.copy_from_slice(&v[16..]);
                Some(Some(sha))
            }
            32 => from_hex(v, &mut md5).then_some(None),
            96 => (from_hex(&v[..32], &mut md5) && from_hex(&v[32..], &mut sha)).then_some(Some(sha)),
            _ => None,
        };
        match ok {
            Some(sha256) => Ok(UserKeys { md5, sha256 }),
            None => Err(StoreError::Unavailable(format!(
                "{}: the value of {name:?} in {USERS_PREFIX}{realm} is not 32 or 96 hex digits",
                self.shown
            ))),
        }
    }
}

fn users_key(realm: &str) -> String {
    format!("{USERS_PREFIX}{realm}")
}

fn userhash_key(realm: &str) -> String {
    format!("{USERHASH_PREFIX}{realm}")
}

/// The stored form of `keys`: hex of md5, then of sha256 if any.
fn keys_value(keys: &UserKeys) -> String {
    let mut v = to_hex(&keys.md5);
    if let Some(sha) = &keys.sha256 {
        v.push_str(&to_hex(sha));
    }
    v
}

fn eval(script: &str, keys: &[&str]) -> ::redis::Cmd {
    let mut c = ::redis::cmd("EVAL");
    c.arg(script).arg(keys.len()).arg(keys);
    c
}

impl UserStore for RedisStore {
    fn lookup(&mut self, realm: &str, name: &str) -> Result<Option<UserKeys>, StoreError> {
        if !storable(realm, name) {
            return Ok(None);
        }
        let key = users_key(realm);
        let v: Option<Vec<u8>> = self.call(|c| ::redis::cmd("HGET").arg(&key).arg(name).query(c))?;
        v.map(|v| self.parse_keys(realm, name, &v)).transpose()
    }

    fn lookup_userhash(&mut self, realm: &str, hash: &[u8; 32]) -> Result<Option<(String, UserKeys)>, StoreError> {
        if validate_realm(realm).is_err() {
            return Ok(None);
        }
        let (hkey, field) = (userhash_key(realm), to_hex(hash));
        let name: Option<String> = self.call(|c| ::redis::cmd("HGET").arg(&hkey).arg(&field).query(c))?;
        let Some(name) = name else { return Ok(None) };
        // A stale entry (the user deleted by other tooling) is no user.
        Ok(self.lookup(realm, &name)?.map(|k| (name, k)))
    }

    fn add(&mut self, user: &UserRecord) -> Result<(), StoreError> {
        validate(&user.realm, &user.name)?;
        let (ukey, hkey) = (users_key(&user.realm), userhash_key(&user.realm));
        let mut cmd = eval(ADD, &[&ukey, &hkey, REALMS]);
        cmd.arg(&user.name)
            .arg(keys_value(&user.keys))
            .arg(to_hex(&userhash(&user.name, &user.realm)))
            .arg(&user.realm);
        let added: i64 = self.call(|c| cmd.query(c))?;
        if added == 1 {
            Ok(())
        } else {
            Err(StoreError::Duplicate { realm: user.realm.clone(), name: user.name.clone() })
        }
    }

    fn add_many(&mut self, users: &[UserRecord]) -> Result<(), StoreError> {
        let mut seen = HashSet::with_capacity(users.len());
        for u in users {
            validate(&u.realm, &u.name)?;
            if !seen.insert((&u.realm, &u.name)) {
                return Err(StoreError::Duplicate { realm: u.realm.clone(), name: u.name.clone() });
            }
        }
        drop(seen);
        let mut rest = users;
        while let Some(first) = rest.first() {
            // The longest run of one realm, at most BATCH users.
            let n = rest.iter().take(BATCH).take_while(|u| u.realm == first.realm).count();
            let (batch, tail) = rest.split_at(n);
            rest = tail;
            self.add_batch(&first.realm, batch)?;
        }
        Ok(())
    }

    fn set_keys(&mut self, realm: &str, name: &str, keys: &UserKeys) -> Result<(), StoreError> {
        validate(realm, name)?;
        let ukey = users_key(realm);
        let mut cmd = eval(SET_KEYS, &[&ukey]);
        cmd.arg(name).arg(keys_value(keys));
        let done: i64 = self.call(|c| cmd.query(c))?;
        if done == 1 {
            Ok(())
        } else {
            Err(StoreError::NotFound { realm: realm.to_owned(), name: name.to_owned() })
        }
    }

    fn delete(&mut self, realm: &str, name: &str) -> Result<(), StoreError> {
        validate(realm, name)?;
        let (ukey, hkey) = (users_key(realm), userhash_key(realm));
        let mut cmd = eval(DELETE, &[&ukey, &hkey, REALMS]);
        cmd.arg(name).arg(to_hex(&userhash(name, realm))).arg(realm);
        let done: i64 = self.call(|c| cmd.query(c))?;
        if done == 1 {
            Ok(())
        } else {
            Err(StoreError::NotFound { realm: realm.to_owned(), name: name.to_owned() })
        }
    }

    fn list(&mut self, realm: Option<&str>) -> Result<Vec<(String, String)>, StoreError> {
        let realms: Vec<String> = match realm {
            Some(r) if validate_realm(r).is_err() => return Ok(Vec::new()),
            Some(r) => vec![r.to_owned()],
            None => self.call(|c| ::redis::cmd("SMEMBERS").arg(REALMS).query(c))?,
        };
        let mut out = Vec::new();
        for realm in realms {
            let key = users_key(&realm);
            // HSCAN rather than HKEYS: a realm of a million users does not block the server.
            let mut cursor: u64 = 0;
            loop {
                let (next, fields): (u64, Vec<Vec<u8>>) =
                    self.call(|c| ::redis::cmd("HSCAN").arg(&key).arg(cursor).arg("COUNT").arg(1000).query(c))?;
                // Fields and values alternate; a name that is not UTF-8 cannot be a username.
                let names = fields.into_iter().step_by(2).filter_map(|n| String::from_utf8(n).ok());
                out.extend(names.map(|name| (realm.clone(), name)));
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        out.sort_unstable();
        // HSCAN may return a field twice.
        out.dedup();
        Ok(out)
    }
}
