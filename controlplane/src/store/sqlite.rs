//! The SQLite user store: one file, one table.
//!
//! ```sql
//! CREATE TABLE users (
//!     realm      TEXT NOT NULL,
//!     name       TEXT NOT NULL,
//!     md5_key    BLOB NOT NULL,   -- 16 bytes: MD5(name ":" realm ":" password)
//!     sha256_key BLOB,            -- 32 bytes: SHA-256(name ":" realm ":" password), or NULL
//!     userhash   BLOB NOT NULL,   -- 32 bytes: SHA-256(name ":" realm) (RFC 8489 §14.4)
//!     PRIMARY KEY (realm, name)
//! ) WITHOUT ROWID;
//! CREATE INDEX users_userhash ON users (realm, userhash);
//! ```
//!
//! The schema version is `PRAGMA user_version` ([`SCHEMA_VERSION`]). The database runs in WAL
//! mode with a busy timeout ([`BUSY_TIMEOUT`]), so an `uturn admin` write never fails a lookup of
//! a running relay, and a second connection sees a write as soon as it commits. Lookups use
//! cached prepared statements: they run on the Allocate path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{ffi, params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::{storable, userhash, validate, validate_realm, StoreError, UserKeys, UserRecord, UserStore};

/// The schema version this build writes and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;
/// How long a statement waits for another connection's write lock before it fails.
pub const BUSY_TIMEOUT: Duration = Duration::from_millis(1000);
/// The page cache of an `add_many` of more than 10,000 users, in KiB (allocated as used).
const BULK_CACHE_KIB: u32 = 256 * 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    realm      TEXT NOT NULL,
    name       TEXT NOT NULL,
    md5_key    BLOB NOT NULL CHECK (length(md5_key) = 16),
    sha256_key BLOB CHECK (sha256_key IS NULL OR length(sha256_key) = 32),
    userhash   BLOB NOT NULL CHECK (length(userhash) = 32),
    PRIMARY KEY (realm, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS users_userhash ON users (realm, userhash);
";

const LOOKUP: &str = "SELECT md5_key, sha256_key FROM users WHERE realm = ?1 AND name = ?2";
const LOOKUP_USERHASH: &str = "SELECT name, md5_key, sha256_key FROM users WHERE realm = ?1 AND userhash = ?2";
const INSERT: &str = "INSERT INTO users (realm, name, md5_key, sha256_key, userhash) VALUES (?1, ?2, ?3, ?4, ?5)";
const UPDATE: &str = "UPDATE users SET md5_key = ?3, sha256_key = ?4 WHERE realm = ?1 AND name = ?2";
const DELETE: &str = "DELETE FROM users WHERE realm = ?1 AND name = ?2";
const LIST_ALL: &str = "SELECT realm, name FROM users ORDER BY realm, name";
const LIST_REALM: &str = "SELECT realm, name FROM users WHERE realm = ?1 ORDER BY name";

/// A user store in a SQLite file. One per thread: it is `Send`, not `Sync`.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens the database at `path`. With `create`, a missing file is created with the schema;
    /// without it, a missing file is [`StoreError::MissingDatabase`]. An existing file without
    /// the schema gets it; one with a newer schema version is refused (Unavailable).
    pub fn open(path: &Path, create: bool) -> Result<SqliteStore, StoreError> {
        let shown = path.display().to_string();
        if !create && !path.exists() {
            return Err(StoreError::MissingDatabase(shown));
        }
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
            // The keys authenticate as well as the passwords (RFC 8489 §9.2.2): the file is the
            // owner's alone. SQLite would create it 0644; an empty file is an empty database,
            // and SQLite gives its -wal and -shm files the database file's mode.
            create_private(path).map_err(|e| StoreError::Unavailable(format!("{shown}: {e}")))?;
        }
        let conn = Connection::open_with_flags(path, flags).map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::CannotOpen) if !create && !path.exists() => {
                StoreError::MissingDatabase(shown.clone())
            }
            _ => unavailable(&shown, &e),
        })?;
        let mut store = SqliteStore { conn, path: path.to_owned() };
        store.init().map_err(|e| unavailable(&shown, &e))?;
        let version = store.schema_version().map_err(|e| unavailable(&shown, &e))?;
        if version != SCHEMA_VERSION {
            return Err(StoreError::Unavailable(format!(
                "{shown}: schema version {version}, this build knows {SCHEMA_VERSION}"
            )));
        }
        Ok(store)
    }

    /// The file this store was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn schema_version(&self) -> rusqlite::Result<i64> {
        self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))
    }

    /// Busy timeout, WAL, and the schema if the file has none (under a write lock, so two
    /// processes creating the same file do not race).
    fn init(&mut self) -> rusqlite::Result<()> {
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
        // Returns the new mode as a row; "wal" except on file systems that cannot (then the
        // default rollback journal still works, only with less concurrency).
        let _mode: String = self.conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        self.conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        if self.schema_version()? != 0 {
            return Ok(());
        }
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version == 0 {
            tx.execute_batch(SCHEMA)?;
            tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
        }
        tx.commit()
    }

    /// `add_many` in one transaction: all users or (on any error, when `tx` drops) none.
    fn add_all(&mut self, users: &[UserRecord], path: &str) -> Result<(), StoreError> {
        let tx =
            self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| unavailable(path, &e))?;
        {
            let mut stmt = tx.prepare_cached(INSERT).map_err(|e| unavailable(path, &e))?;
            for u in users {
                match insert(&mut stmt, u) {
                    Ok(()) => {}
                    Err(e) if is_duplicate(&e) => {
                        return Err(StoreError::Duplicate { realm: u.realm.clone(), name: u.name.clone() })
                    }
                    Err(e) => return Err(unavailable(path, &e)),
                }
            }
        }
        tx.commit().map_err(|e| unavailable(path, &e))
    }

    fn err(&self, e: &rusqlite::Error) -> StoreError {
        unavailable(&self.path.display().to_string(), e)
    }
}

/// Creates `path` empty with mode 0600 unless it exists (then it is left as it is).
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Every SQLite failure other than a duplicate key: I/O, a lock held past the busy timeout,
/// a corrupt file or a stored key of the wrong length.
fn unavailable(path: &str, e: &rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("{path}: {e}"))
}

fn is_duplicate(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

fn keys_at(row: &rusqlite::Row<'_>, md5: usize) -> rusqlite::Result<UserKeys> {
    Ok(UserKeys { md5: row.get(md5)?, sha256: row.get(md5 + 1)? })
}

fn insert(stmt: &mut rusqlite::CachedStatement<'_>, u: &UserRecord) -> Result<(), rusqlite::Error> {
    let hash = userhash(&u.name, &u.realm);
    let sha = u.keys.sha256.as_ref().map(|k| &k[..]);
    stmt.execute(params![u.realm, u.name, &u.keys.md5[..], sha, &hash[..]]).map(drop)
}

impl UserStore for SqliteStore {
    fn lookup(&mut self, realm: &str, name: &str) -> Result<Option<UserKeys>, StoreError> {
        if !storable(realm, name) {
            return Ok(None);
        }
        let found = self
            .conn
            .prepare_cached(LOOKUP)
            .and_then(|mut s| s.query_row(params![realm, name], |r| keys_at(r, 0)).optional());
        found.map_err(|e| self.err(&e))
    }

    fn lookup_userhash(&mut self, realm: &str, hash: &[u8; 32]) -> Result<Option<(String, UserKeys)>, StoreError> {
        if validate_realm(realm).is_err() {
            return Ok(None);
        }
        let found = self.conn.prepare_cached(LOOKUP_USERHASH).and_then(|mut s| {
            s.query_row(params![realm, &hash[..]], |r| Ok((r.get::<_, String>(0)?, keys_at(r, 1)?))).optional()
        });
        found.map_err(|e| self.err(&e))
    }

    fn add(&mut self, user: &UserRecord) -> Result<(), StoreError> {
        validate(&user.realm, &user.name)?;
        let r = self.conn.prepare_cached(INSERT).and_then(|mut s| insert(&mut s, user));
        match r {
            Ok(()) => Ok(()),
            Err(e) if is_duplicate(&e) => {
                Err(StoreError::Duplicate { realm: user.realm.clone(), name: user.name.clone() })
            }
            Err(e) => Err(self.err(&e)),
        }
    }

    fn add_many(&mut self, users: &[UserRecord]) -> Result<(), StoreError> {
        for u in users {
            validate(&u.realm, &u.name)?;
        }
        let path = self.path.display().to_string();
        // The USERHASH index is written in random order: with the default 2 MiB page cache a
        // million users spill pages to the WAL again and again. Grow it for the load only.
        let cache: i64 =
            self.conn.query_row("PRAGMA cache_size", [], |r| r.get(0)).map_err(|e| unavailable(&path, &e))?;
        let big = users.len() > 10_000;
        if big {
            self.conn
                .execute_batch(&format!("PRAGMA cache_size = -{BULK_CACHE_KIB}"))
                .map_err(|e| unavailable(&path, &e))?;
        }
        let r = self.add_all(users, &path);
        if big {
            let restored = self.conn.execute_batch(&format!("PRAGMA cache_size = {cache}"));
            if r.is_ok() {
                restored.map_err(|e| unavailable(&path, &e))?;
            }
        }
        r
    }

    fn set_keys(&mut self, realm: &str, name: &str, keys: &UserKeys) -> Result<(), StoreError> {
        validate(realm, name)?;
        let sha = keys.sha256.as_ref().map(|k| &k[..]);
        let n = self.conn.prepare_cached(UPDATE).and_then(|mut s| s.execute(params![realm, name, &keys.md5[..], sha]));
        match n {
            Ok(0) => Err(StoreError::NotFound { realm: realm.to_owned(), name: name.to_owned() }),
            Ok(_) => Ok(()),
            Err(e) => Err(self.err(&e)),
        }
    }

    fn delete(&mut self, realm: &str, name: &str) -> Result<(), StoreError> {
        validate(realm, name)?;
        let n = self.conn.prepare_cached(DELETE).and_then(|mut s| s.execute(params![realm, name]));
        match n {
            Ok(0) => Err(StoreError::NotFound { realm: realm.to_owned(), name: name.to_owned() }),
            Ok(_) => Ok(()),
            Err(e) => Err(self.err(&e)),
        }
    }

    fn list(&mut self, realm: Option<&str>) -> Result<Vec<(String, String)>, StoreError> {
        if realm.is_some_and(|r| validate_realm(r).is_err()) {
            return Ok(Vec::new());
        }
        let rows = |r: &rusqlite::Row<'_>| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?));
        let all = match realm {
            None => self.conn.prepare_cached(LIST_ALL).and_then(|mut s| s.query_map([], rows)?.collect()),
            Some(realm) => self.conn.prepare_cached(LIST_REALM).and_then(|mut s| s.query_map([realm], rows)?.collect()),
        };
        all.map_err(|e| self.err(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        std::env::temp_dir().join(format!("uturn-store-unit-{tag}-{}-{nanos}.db", std::process::id()))
    }

    #[test]
    fn a_created_database_and_its_wal_are_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let p = temp("mode");
        let mut s = SqliteStore::open(&p, true).unwrap();
        let keys = UserKeys { md5: [1; 16], sha256: None };
        s.add(&UserRecord { realm: "r".into(), name: "n".into(), keys }).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let mut f = p.as_os_str().to_owned();
            f.push(suffix);
            let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{suffix}: {mode:o}");
        }
        drop(s);
        // An existing file is opened as it is, not re-created or re-moded.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let s = SqliteStore::open(&p, true).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o640);
        assert!(s.path() == p);
        drop(s);
        cleanup(&p);
    }

    fn cleanup(p: &Path) {
        for suffix in ["", "-wal", "-shm"] {
            let mut s = p.as_os_str().to_owned();
            s.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(s));
        }
    }

    #[test]
    fn store_sqlite_schema_version_and_wal() {
        let p = temp("schema");
        let s = SqliteStore::open(&p, true).expect("create");
        assert_eq!(s.schema_version().ok(), Some(SCHEMA_VERSION));
        let mode: String = s.conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("pragma");
        assert_eq!(mode, "wal");
        drop(s);
        // A file from a newer build is refused, not misread.
        let c = Connection::open(&p).expect("raw open");
        c.execute_batch("PRAGMA user_version = 99").expect("bump");
        drop(c);
        let e = SqliteStore::open(&p, false).err();
        assert!(matches!(e, Some(StoreError::Unavailable(_))), "{e:?}");
        cleanup(&p);
    }

    #[test]
    fn store_sqlite_corrupt_key_is_unavailable() {
        let p = temp("corrupt");
        let mut s = SqliteStore::open(&p, true).expect("create");
        // Bypass the CHECK constraints as an operator's tool might (writable_schema is not
        // needed: drop and recreate without them).
        s.conn
            .execute_batch(
                "DROP TABLE users; CREATE TABLE users (realm TEXT NOT NULL, name TEXT NOT NULL, md5_key BLOB NOT NULL,
                 sha256_key BLOB, userhash BLOB NOT NULL, PRIMARY KEY (realm, name)) WITHOUT ROWID;
                 INSERT INTO users VALUES ('r', 'n', x'00', NULL, x'00');",
            )
            .expect("raw schema");
        let e = s.lookup("r", "n").err();
        assert!(matches!(e, Some(StoreError::Unavailable(_))), "{e:?}");
        drop(s);
        cleanup(&p);
    }
}
