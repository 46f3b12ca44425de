//! The fleet nonce secret: one secret for the stateless nonces (RFC 8489 §9.2,
//! `uturn_proto::nonce`) of every node, so a nonce minted by one node is accepted by every
//! other (coturn's `--stateless-nonce-secret`, coturn issue 1999). A client that a balancer
//! moves to another node is not challenged again.
//!
//! Where it comes from, first match wins:
//! 1. `nonce-secret-file`: a file holding 64 hex digits (32 bytes; surrounding white space is
//!    ignored), e.g. `openssl rand -hex 32 > /etc/uturn/nonce-secret`.
//! 2. `fleet-redis`: the key [`REDIS_KEY`] (64 hex digits). The first node to start writes a
//!    random one with `SET NX`; every node then reads it with `GET`. One round trip each, at
//!    start only: nothing on the packet path or the control loop talks to Redis for nonces.
//! 3. Neither, or Redis unreachable at start (one WARN): a random secret of this node's own, as
//!    a node alone always had.
//!
//! With a shared secret, nonce times count UNIX seconds ([`uturn_proto::nonce::Challenger::with_epoch`]),
//! so the nodes' clocks must agree to within a nonce window (a tenth of `nonce-lifetime`, at
//! most 10 s; NTP does far better). Rotation is in docs/credentials.md ("Fleet nonce secret").

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::store::mask_redis;

/// The Redis key of the fleet's nonce secret (a string of 64 hex digits).
pub const REDIS_KEY: &str = "uturn:fleet:nonce-secret";
/// The longest the start waits for Redis (connect, SET NX, GET).
pub const REDIS_DEADLINE: Duration = Duration::from_secs(3);

/// Where this node's nonce secret came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `nonce-secret-file`.
    File,
    /// The fleet's Redis ([`REDIS_KEY`]).
    Redis,
    /// This node's own random secret (no fleet secret configured, or Redis unreachable).
    Local,
}

/// The nonce secret shared by the fleet, or `None` (with [`Source::Local`]) when this node
/// mints its own. Errors: `nonce-secret-file` cannot be read or does not hold 64 hex digits
/// (the relay refuses to start: a node with a wrong secret would challenge every moved client),
/// or Redis holds something else than 64 hex digits under [`REDIS_KEY`].
pub fn fleet_secret(file: Option<&Path>, redis: Option<&str>) -> Result<(Option<[u8; 32]>, Source)> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| format!("nonce-secret-file {}", path.display()))?;
        let secret = parse_hex(text.trim())
            .with_context(|| format!("nonce-secret-file {}: expected 64 hex digits", path.display()))?;
        info!(file = %path.display(), "nonce secret from nonce-secret-file: nonces are valid on every node sharing it");
        return Ok((Some(secret), Source::File));
    }
    let Some(url) = redis else { return Ok((None, Source::Local)) };
    match from_redis(url) {
        Ok(text) => {
            let secret = parse_hex(text.trim())
                .with_context(|| format!("{REDIS_KEY} in {}: expected 64 hex digits", mask_redis(url)))?;
            info!(key = REDIS_KEY, "nonce secret from fleet-redis: nonces are valid on every node of the fleet");
            Ok((Some(secret), Source::Redis))
        }
        Err(e) => {
            warn!(
                "fleet-redis: the fleet nonce secret could not be read ({e:#}); this node mints nonces with its own \
                 secret until restarted, so clients moved here are challenged once more (438)"
            );
            Ok((None, Source::Local))
        }
    }
}

/// 32 bytes from exactly 64 hex digits (either case).
pub fn parse_hex(text: &str) -> Result<[u8; 32]> {
    let b = text.as_bytes();
    if b.len() != 64 {
        bail!("{} characters", b.len());
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        match (digit(b[2 * i]), digit(b[2 * i + 1])) {
            (Some(h), Some(l)) => *o = h << 4 | l,
            _ => bail!("not a hex digit at {}", 2 * i),
        }
    }
    Ok(out)
}

/// `SET NX` a fresh random secret under [`REDIS_KEY`], then `GET` it (ours or the one another
/// node set first), within [`REDIS_DEADLINE`] (on a helper thread: the `redis` crate's
/// connection set-up has no read timeout of its own).
fn from_redis(url: &str) -> Result<String> {
    let client = ::redis::Client::open(url).with_context(|| format!("fleet-redis {}", mask_redis(url)))?;
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new().name("uturn-nonce-secret".into()).spawn(move || {
        let got = (|| -> ::redis::RedisResult<String> {
            let mut c = client.get_connection_with_timeout(REDIS_DEADLINE)?;
            c.set_read_timeout(Some(REDIS_DEADLINE))?;
            c.set_write_timeout(Some(REDIS_DEADLINE))?;
            let fresh: [u8; 32] = rand::random();
            let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
            let _: Option<String> = ::redis::cmd("SET").arg(REDIS_KEY).arg(hex).arg("NX").query(&mut c)?;
            ::redis::cmd("GET").arg(REDIS_KEY).query(&mut c)
        })();
        let _ = tx.send(got);
    })?;
    match rx.recv_timeout(REDIS_DEADLINE) {
        Ok(r) => r.with_context(|| mask_redis(url)),
        Err(_) => bail!("{}: no answer within {REDIS_DEADLINE:?}", mask_redis(url)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_secrets() {
        let s = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let k = parse_hex(s).unwrap();
        assert_eq!(k[0], 0x00);
        assert_eq!(k[15], 0xff);
        assert_eq!(k[31], 0xff);
        assert!(parse_hex(&s[..63]).is_err());
        assert!(parse_hex(&s.replace('a', "g")).is_err());
        assert!(parse_hex(&format!("+{}", &s[1..])).is_err());
    }

    #[test]
    fn a_file_wins_and_must_hold_the_secret() {
        let dir = std::env::temp_dir().join(format!("uturn-nonce-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, format!("{}\n", "ab".repeat(32))).unwrap();
        let (k, src) = fleet_secret(Some(&good), Some("redis://127.0.0.1:1/0")).unwrap();
        assert_eq!((k, src), (Some([0xab; 32]), Source::File));
        let bad = dir.join("bad");
        std::fs::write(&bad, "short").unwrap();
        assert!(fleet_secret(Some(&bad), None).is_err());
        assert!(fleet_secret(Some(&dir.join("missing")), None).is_err());
        assert_eq!(fleet_secret(None, None).unwrap(), (None, Source::Local));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
