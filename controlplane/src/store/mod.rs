//! User stores: where the long-term credentials of RFC 8489 §9.2 live.
//!
//! A store holds, per (realm, username), the long-term keys `MD5(name ":" realm ":" password)`
//! and optionally `SHA-256(name ":" realm ":" password)` (RFC 8489 §9.2.2), never the password,
//! and can find a user by its USERHASH (RFC 8489 §14.4). Two back ends implement [`UserStore`]:
//! a SQLite file ([`sqlite`]) and a Redis database ([`redis`]); [`open`] picks one from a
//! [`StoreUrl`]. Each store thread of the control plane opens its own store, so the stores are
//! `Send` but not `Sync`, and the relay threads never wait on them.
//!
//! Writes (`add`, `add_many`, `set_keys`, `delete`) validate the realm (RFC 8489 §14.9) and the
//! name (§14.3) and fail with [`StoreError::BadRealm`] / [`StoreError::BadName`]. Lookups and
//! `list` do not fail on such input: no user with that realm or name can be stored, so they
//! answer "no such user" (`None`, an empty list).

#![forbid(unsafe_code)]

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use uturn_proto::wire::integrity::PasswordAlgorithm;
use uturn_proto::wire::IntegrityKey;

pub mod redis;
pub mod sqlite;

/// The longest realm accepted, in bytes (RFC 8489 §14.9: fewer than 128 characters, "which can
/// be as long as 763 bytes").
pub const MAX_REALM_BYTES: usize = 763;
/// The most characters a realm may have (RFC 8489 §14.9: fewer than 128).
pub const MAX_REALM_CHARS: usize = 127;
/// The longest username accepted, in bytes (RFC 8489 §14.3: fewer than 509 bytes).
pub const MAX_NAME_BYTES: usize = 508;

/// The long-term keys stored for one user (RFC 8489 §9.2.2): never the password.
///
/// `Debug` shows which keys are present, never their bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UserKeys {
    /// `MD5(name ":" realm ":" password)`, the key of MESSAGE-INTEGRITY (RFC 8489 §9.2.2).
    pub md5: [u8; 16],
    /// `SHA-256(name ":" realm ":" password)`, the key of MESSAGE-INTEGRITY-SHA256, when stored.
    pub sha256: Option<[u8; 32]>,
}

impl UserKeys {
    /// MD5(name ":" realm ":" password), and with `sha256` also SHA-256(name ":" realm ":" password)
    /// (RFC 8489 §9.2.2), the password prepared with SASLprep exactly as the relay derives the
    /// keys of static and REST users ([`IntegrityKey::derive`]).
    pub fn derive(name: &str, realm: &str, password: &str, sha256: bool) -> UserKeys {
        let mut md5 = [0u8; 16];
        md5.copy_from_slice(IntegrityKey::derive(PasswordAlgorithm::Md5, name, realm, password).as_bytes());
        let sha256 = sha256.then(|| {
            let mut k = [0u8; 32];
            k.copy_from_slice(IntegrityKey::derive(PasswordAlgorithm::Sha256, name, realm, password).as_bytes());
            k
        });
        UserKeys { md5, sha256 }
    }
}

impl fmt::Debug for UserKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserKeys")
            .field("md5", &format_args!("<16 bytes>"))
            .field("sha256", &format_args!("{}", if self.sha256.is_some() { "Some(<32 bytes>)" } else { "None" }))
            .finish()
    }
}

/// USERHASH (RFC 8489 §14.4): SHA-256(name ":" realm), 32 bytes.
pub use uturn_proto::wire::integrity::userhash;

/// One stored user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    /// The realm (RFC 8489 §14.9) the user belongs to.
    pub realm: String,
    /// The username (RFC 8489 §14.3).
    pub name: String,
    /// The user's long-term keys.
    pub keys: UserKeys,
}

/// Why a store operation failed; each maps to a documented `uturn admin` exit code via
/// [`StoreError::exit_code`].
#[derive(Debug)]
pub enum StoreError {
    /// The SQLite file does not exist (exit 3).
    MissingDatabase(String),
    /// `add` of a user that exists (exit 4).
    Duplicate {
        /// The realm of the existing user.
        realm: String,
        /// The name of the existing user.
        name: String,
    },
    /// A realm that is empty, longer than 763 bytes or 127 characters, or holds control
    /// characters (RFC 8489 §14.9) (exit 5).
    BadRealm(String),
    /// A username that is empty, 509 bytes or longer, or holds control characters
    /// (RFC 8489 §14.3) (exit 5).
    BadName(String),
    /// The store cannot be reached or answered with an error: Redis down, a SQLite I/O error,
    /// a stored value that is not a key (exit 6).
    Unavailable(String),
    /// `delete` / `set_keys` of a user that does not exist (exit 7).
    NotFound {
        /// The realm looked in.
        realm: String,
        /// The name that was not found.
        name: String,
    },
    /// A URL that is not `sqlite://` or `redis://` (exit 2).
    BadUrl(String),
}

impl StoreError {
    /// The `uturn admin` exit status for this error: 2 bad URL, 3 missing database,
    /// 4 duplicate, 5 bad realm or name, 6 store unavailable, 7 no such user.
    pub fn exit_code(&self) -> u8 {
        match self {
            StoreError::BadUrl(_) => 2,
            StoreError::MissingDatabase(_) => 3,
            StoreError::Duplicate { .. } => 4,
            StoreError::BadRealm(_) | StoreError::BadName(_) => 5,
            StoreError::Unavailable(_) => 6,
            StoreError::NotFound { .. } => 7,
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::MissingDatabase(p) => write!(f, "no user database at {p}"),
            StoreError::Duplicate { realm, name } => write!(f, "user {name:?} already exists in realm {realm:?}"),
            StoreError::BadRealm(why) => write!(f, "bad realm: {why}"),
            StoreError::BadName(why) => write!(f, "bad username: {why}"),
            StoreError::Unavailable(why) => write!(f, "user store unavailable: {why}"),
            StoreError::NotFound { realm, name } => write!(f, "no user {name:?} in realm {realm:?}"),
            StoreError::BadUrl(why) => write!(f, "bad store URL: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// A user database. Each store thread of the control plane opens its own with [`open`], so
/// implementations need not be `Sync`.
pub trait UserStore: Send {
    /// The keys of `name` in `realm`, or None when there is no such user.
    fn lookup(&mut self, realm: &str, name: &str) -> Result<Option<UserKeys>, StoreError>;
    /// The user whose USERHASH in `realm` is `hash` (RFC 8489 §14.4), with its keys.
    fn lookup_userhash(&mut self, realm: &str, hash: &[u8; 32]) -> Result<Option<(String, UserKeys)>, StoreError>;
    /// Adds a user; Duplicate if it exists.
    fn add(&mut self, user: &UserRecord) -> Result<(), StoreError>;
    /// Adds many users in one transaction / pipeline (used to load 1,000,000 users for
    /// benchmarks). Fails with Duplicate on the first user that exists.
    fn add_many(&mut self, users: &[UserRecord]) -> Result<(), StoreError>;
    /// Replaces a user's keys (password change); NotFound if absent.
    fn set_keys(&mut self, realm: &str, name: &str, keys: &UserKeys) -> Result<(), StoreError>;
    /// Deletes a user; NotFound if absent.
    fn delete(&mut self, realm: &str, name: &str) -> Result<(), StoreError>;
    /// Every (realm, name), sorted (by the bytes of realm, then of name), optionally of one realm.
    fn list(&mut self, realm: Option<&str>) -> Result<Vec<(String, String)>, StoreError>;
}

/// Checks a realm against RFC 8489 §14.9: non-empty, fewer than 128 characters and at most
/// 763 bytes, no control characters.
pub fn validate_realm(realm: &str) -> Result<(), StoreError> {
    if realm.is_empty() {
        return Err(StoreError::BadRealm("empty".into()));
    }
    if realm.len() > MAX_REALM_BYTES || realm.chars().count() > MAX_REALM_CHARS {
        return Err(StoreError::BadRealm(format!(
            "{} bytes, {} characters (at most {MAX_REALM_BYTES} bytes and {MAX_REALM_CHARS} characters)",
            realm.len(),
            realm.chars().count()
        )));
    }
    if realm.chars().any(char::is_control) {
        return Err(StoreError::BadRealm(format!("{realm:?} holds a control character")));
    }
    Ok(())
}

/// Checks a username against RFC 8489 §14.3: non-empty, fewer than 509 bytes, no control
/// characters.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    if name.is_empty() {
        return Err(StoreError::BadName("empty".into()));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(StoreError::BadName(format!("{} bytes (at most {MAX_NAME_BYTES})", name.len())));
    }
    if name.chars().any(char::is_control) {
        return Err(StoreError::BadName(format!("{name:?} holds a control character")));
    }
    Ok(())
}

/// Both checks, realm first.
fn validate(realm: &str, name: &str) -> Result<(), StoreError> {
    validate_realm(realm)?;
    validate_name(name)
}

/// Whether a user with this realm and name could be stored at all (lookups answer None if not).
fn storable(realm: &str, name: &str) -> bool {
    validate(realm, name).is_ok()
}

/// Lowercase hex of `bytes`.
fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// The bytes of hex text (either case) into `out`; false if `hex` is not exactly
/// `2 * out.len()` hex digits.
fn from_hex(hex: &[u8], out: &mut [u8]) -> bool {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    if hex.len() != out.len() * 2 {
        return false;
    }
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(h), Some(l)) => *o = h << 4 | l,
            _ => return false,
        }
    }
    true
}

/// Where a store lives, parsed from a URL: `sqlite:///abs/path.db` (also `sqlite://relative.db`
/// and `sqlite:relative.db`), `redis://host:port/db` (db optional, default 0; also
/// `redis://:password@host:port/db`), and `rediss://...` for Redis over TLS (rustls; the server's
/// certificate is verified against the system's roots, or the PEM file `SSL_CERT_FILE` names).
///
/// `Display` and `Debug` mask a Redis password as `***`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A SQLite database file.
    Sqlite(PathBuf),
    /// A Redis database: the URL as given (it may hold a password; print it with `Display`).
    Redis(String),
}

impl FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<StoreUrl, StoreError> {
        if let Some(rest) = s.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(StoreError::BadUrl(format!("{s:?} names no file")));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("redis://") || s.starts_with("rediss://") {
            return match ::redis::IntoConnectionInfo::into_connection_info(s) {
                Ok(_) => Ok(StoreUrl::Redis(s.to_owned())),
                Err(e) => Err(StoreError::BadUrl(format!("{}: {e}", mask_redis(s)))),
            };
        }
        let shown = if s.contains('@') { "<hidden>".to_owned() } else { format!("{s:?}") };
        Err(StoreError::BadUrl(format!("{shown} is neither sqlite://, redis:// nor rediss://")))
    }
}

/// A URL with the password of its user info (what follows the first ':' before the host's '@')
/// replaced by `***`: `redis://`, `rediss://` or any other scheme. A URL without user info, or
/// with a user but no password, is returned as it is.
pub fn mask_redis(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_owned() };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    // The last '@' ends the user info: a password with a raw '@' or '/' is masked whole (an '@'
    // further on masks more than needed, never less).
    let Some(at) = rest.rfind('@') else { return url.to_owned() };
    let (userinfo, host) = rest.split_at(at);
    match userinfo.find(':') {
        Some(colon) => format!("{scheme}{}:***{host}", &userinfo[..colon]),
        None => url.to_owned(),
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            StoreUrl::Redis(u) => f.write_str(&mask_redis(u)),
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            StoreUrl::Redis(u) => f.debug_tuple("Redis").field(&mask_redis(u)).finish(),
        }
    }
}

/// Opens a store. `create`: create the SQLite file (and schema) if missing; without it a missing
/// file is MissingDatabase. Redis ignores `create`; it connects with 1 s timeouts (connect, read,
/// write), so a dead Redis fails fast with Unavailable, and after an I/O error a call reconnects
/// once before it returns Unavailable.
pub fn open(url: &StoreUrl, create: bool) -> Result<Box<dyn UserStore>, StoreError> {
    Ok(match url {
        StoreUrl::Sqlite(path) => Box::new(sqlite::SqliteStore::open(path, create)?),
        StoreUrl::Redis(u) => Box::new(redis::RedisStore::open(u)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC5769_USER: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0; 32];
        assert!(from_hex(s.as_bytes(), &mut out));
        out
    }

    #[test]
    fn store_derive_rfc5769_long_term_key() {
        // RFC 5769 §2.4; expected value from `printf '%s' 'マトリックス:example.org:TheMatrIX' | md5sum`.
        let k = UserKeys::derive(RFC5769_USER, "example.org", "TheMatrIX", false);
        assert_eq!(to_hex(&k.md5), "e8ca7ad59d5eb0518e312911d2dab2a9");
        assert_eq!(k.sha256, None);
        // ... | sha256sum
        let k = UserKeys::derive(RFC5769_USER, "example.org", "TheMatrIX", true);
        assert_eq!(to_hex(&k.md5), "e8ca7ad59d5eb0518e312911d2dab2a9");
        assert_eq!(k.sha256, Some(hex32("dd295a613b9058c3c23d6dc7165bda072304d989c9d0af3a8c7e184b4f9bb4a1")));
    }

    #[test]
    fn store_userhash_rfc8489_b1() {
        // RFC 8489 Appendix B.1 USERHASH, also `printf '%s' 'マトリックス:example.org' | sha256sum`.
        assert_eq!(
            userhash(RFC5769_USER, "example.org"),
            hex32("4a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704")
        );
    }

    #[test]
    fn store_keys_debug_hides_bytes() {
        let k = UserKeys { md5: [0xab; 16], sha256: Some([0xcd; 32]) };
        let d = format!("{k:?}");
        assert!(!d.contains("171") && !d.contains("ab") && !d.contains("205"), "{d}");
        assert!(d.contains("Some"));
    }

    #[test]
    fn store_hex_round_trip() {
        let b: Vec<u8> = (0..=255).collect();
        let h = to_hex(&b);
        let mut back = vec![0; 256];
        assert!(from_hex(h.as_bytes(), &mut back));
        assert_eq!(b, back);
        assert!(from_hex(b"ABcd", &mut [0; 2]));
        assert!(!from_hex(b"abc", &mut [0; 2]));
        assert!(!from_hex(b"zz", &mut [0; 1]));
    }

    #[test]
    fn store_url_parse() {
        let p = |s: &str| s.parse::<StoreUrl>();
        assert_eq!(
            p("sqlite:///var/lib/uturn/users.db").ok(),
            Some(StoreUrl::Sqlite("/var/lib/uturn/users.db".into()))
        );
        assert_eq!(p("sqlite://users.db").ok(), Some(StoreUrl::Sqlite("users.db".into())));
        assert_eq!(p("sqlite:users.db").ok(), Some(StoreUrl::Sqlite("users.db".into())));
        assert_eq!(p("redis://127.0.0.1:6379/2").ok(), Some(StoreUrl::Redis("redis://127.0.0.1:6379/2".into())));
        assert_eq!(p("redis://localhost").ok(), Some(StoreUrl::Redis("redis://localhost".into())));
        assert_eq!(p("rediss://r.example:6380/1").ok(), Some(StoreUrl::Redis("rediss://r.example:6380/1".into())));
        for bad in ["", "sqlite:", "sqlite://", "postgres://x/y", "users.db", "redis://h/notadb", "http://a:b@c"] {
            let e = p(bad).err();
            assert!(matches!(e, Some(StoreError::BadUrl(_))), "{bad:?}: {e:?}");
            assert_eq!(e.map(|e| e.exit_code()), Some(2));
        }
        let e = p("http://a:sekrit@c").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(!e.contains("sekrit"), "{e}");
    }

    #[test]
    fn store_url_display_masks_password() {
        let u: StoreUrl = "redis://:s3cret@10.0.0.1:6380/1".parse().expect("valid");
        assert_eq!(u.to_string(), "redis://:***@10.0.0.1:6380/1");
        assert!(!format!("{u:?}").contains("s3cret"));
        let u: StoreUrl = "redis://admin:s3cret@h/0".parse().expect("valid");
        assert_eq!(u.to_string(), "redis://admin:***@h/0");
        let u: StoreUrl = "redis://h:1/0".parse().expect("valid");
        assert_eq!(u.to_string(), "redis://h:1/0");
        // Any scheme with user info: rediss:// (TLS) and whatever a later store may take.
        assert_eq!(mask_redis("rediss://:s3cret@h:6380/0"), "rediss://:***@h:6380/0");
        assert_eq!(mask_redis("rediss://u:s3cret@h/0"), "rediss://u:***@h/0");
        assert_eq!(mask_redis("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(mask_redis("redis://:p/w@h/0"), "redis://:***@h/0");
        assert_eq!(mask_redis("redis://user@h/0"), "redis://user@h/0");
        assert_eq!(mask_redis("no scheme:pw@h"), "no scheme:pw@h");
        let u: StoreUrl = "sqlite:///a/b.db".parse().expect("valid");
        assert_eq!(u.to_string(), "sqlite:///a/b.db");
        assert_eq!(u.to_string().parse::<StoreUrl>().ok(), Some(u));
    }

    #[test]
    fn store_validation() {
        assert!(validate_realm("example.org").is_ok());
        assert!(validate_realm(&"r".repeat(MAX_REALM_CHARS)).is_ok());
        assert!(validate_realm(&"\u{30DE}".repeat(MAX_REALM_CHARS)).is_ok()); // 381 bytes
        assert!(matches!(validate_realm(""), Err(StoreError::BadRealm(_))));
        assert!(matches!(validate_realm(&"r".repeat(128)), Err(StoreError::BadRealm(_))));
        assert!(matches!(validate_realm("a\nb"), Err(StoreError::BadRealm(_))));
        assert!(validate_name(&"n".repeat(MAX_NAME_BYTES)).is_ok());
        assert!(matches!(validate_name(&"n".repeat(509)), Err(StoreError::BadName(_))));
        assert!(matches!(validate_name(""), Err(StoreError::BadName(_))));
        assert!(matches!(validate_name("a\u{7f}"), Err(StoreError::BadName(_))));
        assert_eq!(StoreError::BadName(String::new()).exit_code(), 5);
    }
}
