//! MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5), the long-term credential key (§9.2.2) and
//! FINGERPRINT (CRC-32 XOR 0x5354554e, §14.7).

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;

type HmacSha1 = Hmac<Sha1>;

/// The XOR constant FINGERPRINT applies to the CRC-32 (RFC 8489 §14.7).
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// A long-term credential key: MD5(username ":" realm ":" SASLprep(password)), 16 bytes
/// (RFC 8489 §9.2.2). It is the HMAC-SHA1 key of MESSAGE-INTEGRITY.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IntegrityKey(pub [u8; 16]);

impl std::fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IntegrityKey(..)")
    }
}

impl IntegrityKey {
    /// Derives the long-term key. The password goes through SASLprep (RFC 4013) when it is a
    /// valid stringprep input; otherwise it is used as given (as coturn does).
    pub fn long_term(username: &str, realm: &str, password: &str) -> Self {
        let prepared = stringprep::saslprep(password);
        let password: &str = prepared.as_deref().unwrap_or(password);
        let mut md5 = Md5::new();
        md5.update(username.as_bytes());
        md5.update(b":");
        md5.update(realm.as_bytes());
        md5.update(b":");
        md5.update(password.as_bytes());
        IntegrityKey(md5.finalize().into())
    }
}

impl AsRef<[u8]> for IntegrityKey {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// What MESSAGE-INTEGRITY covers (RFC 8489 §14.5): the message type, the length field as the
/// HMAC sees it, and the bytes after the length field up to the attribute; with the received
/// HMAC when it comes from [`Message::integrity_parts`](super::Message::integrity_parts).
#[derive(Debug, Clone, Copy)]
pub struct IntegrityParts<'a> {
    /// The 2-byte message type.
    pub type_bytes: &'a [u8],
    /// The length field value the HMAC is computed with.
    pub adjusted_length: u16,
    /// Bytes 4.. up to the MESSAGE-INTEGRITY attribute (cookie, transaction ID, attributes).
    pub rest: &'a [u8],
    /// The received HMAC-SHA1 (20 bytes); empty when computing one.
    pub mac: &'a [u8],
}

fn hmac_over(key: &[u8], parts: &IntegrityParts<'_>) -> HmacSha1 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for HMAC.
    let mut mac = <HmacSha1 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(parts.type_bytes);
    mac.update(&parts.adjusted_length.to_be_bytes());
    mac.update(parts.rest);
    mac
}

/// Verifies a message's MESSAGE-INTEGRITY with `key` in constant time. `key` is an
/// [`IntegrityKey`] for long-term credentials or the SASLprep'd password for short-term ones.
pub fn verify(key: &[u8], parts: &IntegrityParts<'_>) -> bool {
    hmac_over(key, parts).verify_slice(parts.mac).is_ok()
}

/// Computes HMAC-SHA1 over `header_type`, `length`, then `rest` (see [`IntegrityParts`]).
pub fn compute(key: &[u8], parts: &IntegrityParts<'_>) -> [u8; 20] {
    hmac_over(key, parts).finalize().into_bytes().into()
}

/// FINGERPRINT value of `covered` (the message up to the FINGERPRINT attribute, with the header
/// length already counting the FINGERPRINT attribute).
pub fn fingerprint(covered: &[u8]) -> u32 {
    crc32fast::hash(covered) ^ FINGERPRINT_XOR
}
