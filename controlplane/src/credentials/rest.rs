//! The "TURN REST API" ephemeral credential scheme (draft-uberti-behave-turn-rest-00; coturn's
//! `use-auth-secret` / `static-auth-secret`).
//!
//! A web backend and the relay share a secret. The backend mints a username that carries its
//! own expiry, `<expiry>` or `<expiry><sep><user-id>` with `<expiry>` in seconds since the Unix
//! epoch, and the password `base64(HMAC-SHA1(secret, username))` (standard alphabet, with
//! padding). The relay recomputes the password from the username, so it needs no per-user state;
//! it then uses that password as an ordinary long-term credential (RFC 8489 §9.2). This is what
//! coturn, Twilio-style services and `turnutils_uclient -W` compute.
//!
//! Only the leading-timestamp form is recognised: coturn's alternative order
//! `<user-id><sep><expiry>` is not, so [`expiry`] answers `None` for it and such a name is looked
//! up as a static or stored user instead.
//!
//! Everything here is pure: the caller passes the time, and no function panics on any input.

#![forbid(unsafe_code)]

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Default separator between expiry and user id.
pub const DEFAULT_SEPARATOR: char = ':';

/// The password of a REST username under `secret`: base64(HMAC-SHA1(secret, username)), with the
/// standard base64 alphabet and `=` padding (28 characters). `secret` may have any length.
pub fn password(secret: &[u8], username: &str) -> String {
    // HMAC accepts keys of any length (RFC 2104 §2: longer keys are hashed first), so
    // `new_from_slice` cannot fail.
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(username.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// A username for `user_id` (None: just the expiry) expiring at `expiry_unix` (seconds since the
/// Unix epoch): `<expiry_unix>` or `<expiry_unix><sep><user_id>`, the expiry in decimal without
/// leading zeros. `Some("")` gives `<expiry_unix><sep>`.
pub fn username(expiry_unix: u64, user_id: Option<&str>, sep: char) -> String {
    match user_id {
        None => expiry_unix.to_string(),
        Some(id) => format!("{expiry_unix}{sep}{id}"),
    }
}

/// The expiry (seconds since the Unix epoch) a REST username carries, or None when it is not a
/// REST username: it must start with one or more ASCII decimal digits (no sign) that fit a `u64`,
/// followed by the end of the name or by `sep`; what follows `sep` is the user id and may be
/// anything. Only the leading-timestamp form is accepted, not coturn's alternative order
/// `<user-id><sep><expiry>`. A digit separator never matches a REST username usefully.
pub fn expiry(username: &str, sep: char) -> Option<u64> {
    let head = match username.split_once(sep) {
        Some((head, _user_id)) => head,
        None => username,
    };
    if head.is_empty() || !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits, so the only possible failure is overflow.
    head.parse().ok()
}

/// One minted pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    /// The REST username, `<expires_unix>` or `<expires_unix><sep><user-id>`.
    pub username: String,
    /// `base64(HMAC-SHA1(secret, username))`.
    pub password: String,
    /// When the pair expires, seconds since the Unix epoch.
    pub expires_unix: u64,
}

/// Mints a pair valid for `ttl` from `now_unix` (seconds since the Unix epoch): the expiry is
/// `now_unix + ttl` in whole seconds (a fraction of a second in `ttl` is dropped; the sum
/// saturates at `u64::MAX`), the username is [`username`] of it and `user_id` with `sep`, and
/// the password is [`password`] of that username under `secret`.
pub fn mint(secret: &[u8], now_unix: u64, ttl: Duration, user_id: Option<&str>, sep: char) -> Minted {
    let expires_unix = now_unix.saturating_add(ttl.as_secs());
    let username = username(expires_unix, user_id, sep);
    let password = password(secret, &username);
    Minted { username, password, expires_unix }
}

/// Parses a TTL like "8h", "30m", "90s", "1d", "3600" (seconds) into a Duration; Err(String)
/// with a message otherwise. The number is ASCII decimal digits, optionally followed by one
/// lowercase unit: `s` seconds, `m` minutes, `h` hours, `d` days (86400 s); no unit means
/// seconds. Surrounding whitespace is ignored. Zero, a sign, a fraction, a compound such as
/// "1h30m", an unknown unit and a value over `u64::MAX` seconds are errors.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits_end = t.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(t.len());
    // `digits_end` is the index of an ASCII byte or the end, so both halves are valid `str`s.
    let (number, unit) = t.split_at(digits_end);
    if number.is_empty() {
        return Err(format!("invalid TTL {s:?}: expected a number of seconds or a number with s, m, h or d"));
    }
    let multiplier: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("invalid TTL {s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    let secs = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("invalid TTL {s:?}: too large"))?;
    if secs == 0 {
        return Err(format!("invalid TTL {s:?}: must be at least one second"));
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known answers computed independently with OpenSSL 3.0:
    //   printf '%s' '1700000000:alice' | openssl dgst -binary -sha1 -hmac 'north' | openssl base64
    //   printf '%s' '1700000000' | openssl dgst -binary -sha1 -hmac 'north' | openssl base64
    //   printf '%s' '1700000000|bob' | openssl dgst -binary -sha1 -hmac 'south' | openssl base64
    #[test]
    fn password_known_answers() {
        assert_eq!(password(b"north", "1700000000:alice"), "Cd/49soE35ICqcJF/bCTn8Z4OyE=");
        assert_eq!(password(b"north", "1700000000"), "CWyHi3zCeWqXBir9thl4m+iZPRY=");
        assert_eq!(password(b"south", "1700000000|bob"), "ETlDJ41CnmjTx2yUmYMdHZtySYo=");
    }

    #[test]
    fn password_accepts_any_secret_length() {
        assert_eq!(password(b"", "1").len(), 28);
        assert_eq!(password(&[0xAB; 200], "1700000000:alice").len(), 28);
        assert_ne!(password(b"north", "1700000000:alice"), password(b"north2", "1700000000:alice"));
    }

    #[test]
    fn username_formatting() {
        assert_eq!(username(1_700_000_000, None, DEFAULT_SEPARATOR), "1700000000");
        assert_eq!(username(1_700_000_000, Some("alice"), DEFAULT_SEPARATOR), "1700000000:alice");
        assert_eq!(username(1_700_000_000, Some("bob"), '|'), "1700000000|bob");
        assert_eq!(username(0, Some("x"), '-'), "0-x");
        assert_eq!(username(u64::MAX, Some("é"), '·'), "18446744073709551615·é");
    }

    #[test]
    fn expiry_of_rest_names() {
        assert_eq!(expiry("1700000000", ':'), Some(1_700_000_000));
        assert_eq!(expiry("1700000000:alice", ':'), Some(1_700_000_000));
        assert_eq!(expiry("1700000000:", ':'), Some(1_700_000_000));
        assert_eq!(expiry("1700000000:a:b", ':'), Some(1_700_000_000));
        assert_eq!(expiry("1700000000|bob", '|'), Some(1_700_000_000));
        assert_eq!(expiry("0", ':'), Some(0));
        assert_eq!(expiry("18446744073709551615", ':'), Some(u64::MAX));
        assert_eq!(expiry("001700000000", ':'), Some(1_700_000_000));
    }

    #[test]
    fn expiry_of_other_names() {
        for name in [
            "alice",
            "12ab",
            ":5",
            "",
            "99999999999999999999999",
            "18446744073709551616",
            "alice:1700000000", // coturn's alternative order is not accepted
            "+5",
            "-5",
            " 5",
            "5 ",
            "1700000000|bob", // wrong separator
            "١٢٣",            // non-ASCII digits
        ] {
            assert_eq!(expiry(name, ':'), None, "{name:?}");
        }
        assert_eq!(expiry("1700000000:alice", '|'), None);
    }

    #[test]
    fn parse_ttl_accepts() {
        assert_eq!(parse_ttl("8h"), Ok(Duration::from_secs(8 * 3600)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl(" 2h\n"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_ttl("18446744073709551615"), Ok(Duration::from_secs(u64::MAX)));
        assert_eq!(parse_ttl("213503982334601d"), Ok(Duration::from_secs(213_503_982_334_601 * 86_400)));
    }

    #[test]
    fn parse_ttl_rejects() {
        for s in [
            "",
            " ",
            "h",
            "8x",
            "8H",
            "-1h",
            "+1h",
            "1.5h",
            "1h30m",
            "0",
            "0s",
            "8 h",
            "99999999999999999999999",
            "213503982334602d",
            "é",
            "8hé",
        ] {
            let err = parse_ttl(s).expect_err(s);
            assert!(err.starts_with("invalid TTL"), "{s:?}: {err}");
        }
    }

    #[test]
    fn mint_round_trip() {
        let m = mint(b"north", 1_699_971_200, Duration::from_secs(8 * 3600), Some("alice"), ':');
        assert_eq!(m.expires_unix, 1_700_000_000);
        assert_eq!(m.username, "1700000000:alice");
        assert_eq!(m.password, "Cd/49soE35ICqcJF/bCTn8Z4OyE=");
        assert_eq!(password(b"north", &m.username), m.password);
        assert_eq!(expiry(&m.username, ':'), Some(m.expires_unix));

        let m = mint(b"k", 10, Duration::from_millis(1999), None, ':');
        assert_eq!((m.username.as_str(), m.expires_unix), ("11", 11));
        assert_eq!(password(b"k", &m.username), m.password);

        let m = mint(b"k", u64::MAX - 1, Duration::from_secs(10), Some("x"), '|');
        assert_eq!(m.expires_unix, u64::MAX);
        assert_eq!(expiry(&m.username, '|'), Some(u64::MAX));
    }
}
