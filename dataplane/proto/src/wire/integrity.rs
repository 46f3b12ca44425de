//! MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5), MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256,
//! §14.6), the long-term credential keys (§9.2.2, PASSWORD-ALGORITHM MD5 and SHA-256, §18.5),
//! USERHASH (§14.4) and FINGERPRINT (CRC-32 XOR 0x5354554e, §14.7).

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;
use sha2::Sha256;

type HmacSha1 = Hmac<Sha1>;
type HmacSha256 = Hmac<Sha256>;

/// The XOR constant FINGERPRINT applies to the CRC-32 (RFC 8489 §14.7).
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// The hash that derives a long-term key from username, realm and password (RFC 8489 §18.5,
/// the PASSWORD-ALGORITHM registry: MD5 is 0x0001, SHA-256 is 0x0002).
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordAlgorithm {
    /// MD5, 16-byte key: what RFC 5389 clients use, and the default without PASSWORD-ALGORITHM.
    Md5,
    /// SHA-256, 32-byte key.
    Sha256,
}

impl PasswordAlgorithm {
    /// The registry number carried in PASSWORD-ALGORITHM(S).
    pub const fn number(self) -> u16 {
        match self {
            PasswordAlgorithm::Md5 => 0x0001,
            PasswordAlgorithm::Sha256 => 0x0002,
        }
    }

    /// The algorithm with registry number `n`, if uturn implements it.
    pub const fn from_number(n: u16) -> Option<Self> {
        match n {
            0x0001 => Some(PasswordAlgorithm::Md5),
            0x0002 => Some(PasswordAlgorithm::Sha256),
            _ => None,
        }
    }
}

/// Which integrity attribute a message carries, or is to be signed with.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MacAlgorithm {
    /// MESSAGE-INTEGRITY: HMAC-SHA1, 20 bytes (RFC 8489 §14.5).
    HmacSha1,
    /// MESSAGE-INTEGRITY-SHA256: HMAC-SHA256, 32 bytes (RFC 8489 §14.6).
    HmacSha256,
}

/// A long-term credential key (RFC 8489 §9.2.2): MD5 or SHA-256 of
/// `username ":" realm ":" password`, 16 or 32 bytes, together with the integrity attribute
/// that messages signed with it carry. The same key verifies either attribute; the MAC choice
/// only matters when signing (a response carries the attribute its request carried, §9.2.4).
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct IntegrityKey {
    bytes: [u8; 32],
    algorithm: PasswordAlgorithm,
    mac: MacAlgorithm,
}

impl std::fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IntegrityKey({:?}, {:?}, ..)", self.algorithm, self.mac)
    }
}

impl IntegrityKey {
    /// The MD5 long-term key, signing with MESSAGE-INTEGRITY: what every RFC 5389 client uses.
    /// The password goes through SASLprep (RFC 4013) when it is a valid stringprep input;
    /// otherwise it is used as given (as coturn does).
    pub fn long_term(username: &str, realm: &str, password: &str) -> Self {
        Self::derive(PasswordAlgorithm::Md5, username, realm, password)
    }

    /// The long-term key of `algorithm` (RFC 8489 §9.2.2), signing with MESSAGE-INTEGRITY for
    /// MD5 and MESSAGE-INTEGRITY-SHA256 for SHA-256. The password is prepared as in
    /// [`long_term`](Self::long_term) (SASLprep; OpaqueString, RFC 8265, agrees with it for the
    /// passwords real deployments use).
    pub fn derive(algorithm: PasswordAlgorithm, username: &str, realm: &str, password: &str) -> Self {
        let prepared = stringprep::saslprep(password);
        let password: &str = prepared.as_deref().unwrap_or(password);
        let parts: [&[u8]; 5] = [username.as_bytes(), b":", realm.as_bytes(), b":", password.as_bytes()];
        match algorithm {
            PasswordAlgorithm::Md5 => {
                let mut h = Md5::new();
                parts.iter().for_each(|p| h.update(p));
                Self::from_md5(h.finalize().into())
            }
            PasswordAlgorithm::Sha256 => {
                let mut h = Sha256::new();
                parts.iter().for_each(|p| h.update(p));
                Self::from_sha256(h.finalize().into())
            }
        }
    }

    /// A stored MD5 key (16 bytes), signing with MESSAGE-INTEGRITY.
    pub const fn from_md5(key: [u8; 16]) -> Self {
        let mut bytes = [0u8; 32];
        let mut i = 0;
        while i < 16 {
            bytes[i] = key[i];
            i += 1;
        }
        IntegrityKey { bytes, algorithm: PasswordAlgorithm::Md5, mac: MacAlgorithm::HmacSha1 }
    }

    /// A stored SHA-256 key (32 bytes), signing with MESSAGE-INTEGRITY-SHA256.
    pub fn from_sha256(key: [u8; 32]) -> Self {
        IntegrityKey { bytes: key, algorithm: PasswordAlgorithm::Sha256, mac: MacAlgorithm::HmacSha256 }
    }

    /// The same key, signing with `mac`.
    pub fn signing_with(mut self, mac: MacAlgorithm) -> Self {
        self.mac = mac;
        self
    }

    /// The key bytes: 16 for MD5, 32 for SHA-256.
    pub fn as_bytes(&self) -> &[u8] {
        match self.algorithm {
            PasswordAlgorithm::Md5 => &self.bytes[..16],
            PasswordAlgorithm::Sha256 => &self.bytes,
        }
    }

    /// The hash that derived the key.
    pub fn algorithm(&self) -> PasswordAlgorithm {
        self.algorithm
    }

    /// The integrity attribute messages signed with this key carry.
    pub fn mac(&self) -> MacAlgorithm {
        self.mac
    }

    /// Verifies a received MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 (whichever `parts`
    /// describes) in constant time.
    pub fn verify(&self, parts: &IntegrityParts<'_>) -> bool {
        verify(self.as_bytes(), parts)
    }
}

/// USERHASH (RFC 8489 §14.4): SHA-256(username ":" realm), 32 bytes.
pub fn userhash(username: &str, realm: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.finalize().into()
}

/// What an integrity attribute covers (RFC 8489 §14.5, §14.6): the message type, the length
/// field as the HMAC sees it, and the bytes after the length field up to the attribute; with
/// the received HMAC when it comes from [`Message::integrity_parts`](super::Message::integrity_parts).
#[derive(Debug, Clone, Copy)]
pub struct IntegrityParts<'a> {
    /// The 2-byte message type.
    pub type_bytes: &'a [u8],
    /// The length field value the HMAC is computed with.
    pub adjusted_length: u16,
    /// Bytes 4.. up to the integrity attribute (cookie, transaction ID, attributes).
    pub rest: &'a [u8],
    /// The received HMAC: 20 bytes for HMAC-SHA1; 16 to 32 (a multiple of 4) for HMAC-SHA256,
    /// which may be truncated (§14.6). Empty when computing one.
    pub mac: &'a [u8],
    /// Which attribute: MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256.
    pub algorithm: MacAlgorithm,
}

fn feed<M: Mac>(mut mac: M, parts: &IntegrityParts<'_>) -> M {
    mac.update(parts.type_bytes);
    mac.update(&parts.adjusted_length.to_be_bytes());
    mac.update(parts.rest);
    mac
}

fn hmac_sha1(key: &[u8]) -> HmacSha1 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for HMAC.
    <HmacSha1 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

fn hmac_sha256(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// Verifies a message's integrity attribute with the raw `key` in constant time: an
/// [`IntegrityKey`]'s bytes for long-term credentials, or the SASLprep'd password for short-term
/// ones. A truncated MESSAGE-INTEGRITY-SHA256 is compared on its length (§14.6).
pub fn verify(key: &[u8], parts: &IntegrityParts<'_>) -> bool {
    match parts.algorithm {
        MacAlgorithm::HmacSha1 => feed(hmac_sha1(key), parts).verify_slice(parts.mac).is_ok(),
        MacAlgorithm::HmacSha256 => {
            parts.mac.len() >= 16 && feed(hmac_sha256(key), parts).verify_truncated_left(parts.mac).is_ok()
        }
    }
}

/// Computes HMAC-SHA1 over `header_type`, `length`, then `rest` (see [`IntegrityParts`]).
pub fn compute(key: &[u8], parts: &IntegrityParts<'_>) -> [u8; 20] {
    feed(hmac_sha1(key), parts).finalize().into_bytes().into()
}

/// Computes HMAC-SHA256, 32 bytes, over the same input as [`compute`].
pub fn compute_sha256(key: &[u8], parts: &IntegrityParts<'_>) -> [u8; 32] {
    feed(hmac_sha256(key), parts).finalize().into_bytes().into()
}

/// FINGERPRINT value of `covered` (the message up to the FINGERPRINT attribute, with the header
/// length already counting the FINGERPRINT attribute).
pub fn fingerprint(covered: &[u8]) -> u32 {
    crc32fast::hash(covered) ^ FINGERPRINT_XOR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_both_algorithms() {
        // RFC 5769 §2.4's user (the MD5 key is checked against the vector in tests/rfc5769.rs).
        let md5 =
            IntegrityKey::long_term("\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}", "example.org", "TheMatrIX");
        assert_eq!(md5.as_bytes().len(), 16);
        assert_eq!(md5.mac(), MacAlgorithm::HmacSha1);
        let sha = IntegrityKey::derive(PasswordAlgorithm::Sha256, "alice", "example.org", "pw");
        let mut h = Sha256::new();
        h.update(b"alice:example.org:pw");
        assert_eq!(sha.as_bytes(), &h.finalize()[..]);
        assert_eq!(sha.mac(), MacAlgorithm::HmacSha256);
        assert_eq!(PasswordAlgorithm::from_number(2), Some(PasswordAlgorithm::Sha256));
        assert_eq!(PasswordAlgorithm::from_number(3), None);
        assert_eq!(format!("{sha:?}"), "IntegrityKey(Sha256, HmacSha256, ..)");
    }

    /// coturn's non-constant-time HMAC compare (issue 21 §6): `verify` goes through the `hmac`
    /// crate's `verify_slice` / `verify_truncated_left`, which compare with `subtle`'s
    /// constant-time equality. What a test can check is the result: a MAC wrong in any one byte,
    /// first, middle or last, is refused, and so is a prefix of a right one (a compare that
    /// stopped at the shorter length would take it).
    #[test]
    fn a_mac_wrong_in_any_byte_or_cut_short_is_refused() {
        let key = [9u8; 16];
        let mut parts = IntegrityParts {
            type_bytes: &[0, 3],
            adjusted_length: 32,
            rest: b"\x21\x12\xa4\x42transaction!",
            mac: &[],
            algorithm: MacAlgorithm::HmacSha1,
        };
        let good = compute(&key, &parts);
        parts.mac = &good;
        assert!(verify(&key, &parts));
        for i in 0..good.len() {
            let mut bad = good;
            bad[i] ^= 0x01;
            assert!(!verify(&key, &IntegrityParts { mac: &bad, ..parts }), "byte {i} wrong");
        }
        for len in [0, 1, 4, 19] {
            parts.mac = &good[..len];
            assert!(!verify(&key, &parts), "HMAC-SHA1 cut to {len} bytes");
        }
        let mut long = good.to_vec();
        long.push(0);
        assert!(!verify(&key, &IntegrityParts { mac: &long, ..parts }), "a longer MAC");
        parts.algorithm = MacAlgorithm::HmacSha256;
        let key = [9u8; 32];
        let good = compute_sha256(&key, &parts);
        for len in [0, 4, 12] {
            parts.mac = &good[..len];
            assert!(!verify(&key, &parts), "HMAC-SHA256 cut to {len} bytes");
        }
        let mut bad = good;
        bad[31] ^= 0x80;
        assert!(!verify(&key, &IntegrityParts { mac: &bad, ..parts }), "last byte of HMAC-SHA256");
    }

    #[test]
    fn truncated_sha256_mac_verifies_on_its_length_only_from_16_bytes() {
        let key = [7u8; 32];
        let mut parts = IntegrityParts {
            type_bytes: &[0, 1],
            adjusted_length: 36,
            rest: b"abcd",
            mac: &[],
            algorithm: MacAlgorithm::HmacSha256,
        };
        let full = compute_sha256(&key, &parts);
        parts.mac = &full[..16];
        assert!(verify(&key, &parts));
        parts.mac = &full[..12];
        assert!(!verify(&key, &parts));
        let mut bad = full;
        bad[3] ^= 1;
        parts.mac = &bad;
        assert!(!verify(&key, &parts));
    }
}
