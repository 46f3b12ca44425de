//! A checked, zero-copy view of one STUN message (RFC 8489 §5, §14).
//!
//! [`Message::parse`] validates the header and walks every attribute once; after it succeeds no
//! accessor can fail on bounds. Attribute values are slices of the received datagram.

use std::net::SocketAddr;

use super::address::{decode_xor_address, AddressError};
use super::attr;
use super::integrity::{self, IntegrityParts, MacAlgorithm, PasswordAlgorithm};
use super::MAGIC_COOKIE;

/// Length of the STUN header in bytes (RFC 8489 §5).
pub const HEADER_LEN: usize = 20;
/// Most comprehension-required unknown attribute types remembered for a 420 answer.
pub const MAX_UNKNOWN: usize = 8;

/// The 96-bit STUN transaction ID (RFC 8489 §5).
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TransactionId(pub [u8; 12]);

/// A STUN method (12 bits, RFC 8489 §5; TURN methods in RFC 8656 §17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Method(pub u16);

impl Method {
    /// Binding (RFC 8489 §18.2).
    pub const BINDING: Method = Method(0x001);
    /// Allocate (RFC 8656 §7).
    pub const ALLOCATE: Method = Method(0x003);
    /// Refresh (RFC 8656 §8).
    pub const REFRESH: Method = Method(0x004);
    /// Send, indication only (RFC 8656 §11).
    pub const SEND: Method = Method(0x006);
    /// Data, indication only (RFC 8656 §11).
    pub const DATA: Method = Method(0x007);
    /// CreatePermission (RFC 8656 §10).
    pub const CREATE_PERMISSION: Method = Method(0x008);
    /// ChannelBind (RFC 8656 §12).
    pub const CHANNEL_BIND: Method = Method(0x009);
    /// Connect: open a TCP connection to a peer from a TCP allocation (RFC 6062 §4.3).
    pub const CONNECT: Method = Method(0x00A);
    /// ConnectionBind: make a new client connection the data connection of a peer connection
    /// (RFC 6062 §4.4).
    pub const CONNECTION_BIND: Method = Method(0x00B);
    /// ConnectionAttempt, indication only: a peer connected to a TCP allocation's relayed
    /// transport address (RFC 6062 §4.5).
    pub const CONNECTION_ATTEMPT: Method = Method(0x00C);

    /// The method's name as the RFCs spell it, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Method::BINDING => "Binding",
            Method::ALLOCATE => "Allocate",
            Method::REFRESH => "Refresh",
            Method::SEND => "Send",
            Method::DATA => "Data",
            Method::CREATE_PERMISSION => "CreatePermission",
            Method::CHANNEL_BIND => "ChannelBind",
            Method::CONNECT => "Connect",
            Method::CONNECTION_BIND => "ConnectionBind",
            Method::CONNECTION_ATTEMPT => "ConnectionAttempt",
            _ => "unknown",
        }
    }
}

/// A STUN message class (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Request (0b00).
    Request,
    /// Indication (0b01).
    Indication,
    /// Success response (0b10).
    Success,
    /// Error response (0b11).
    Error,
}

/// Encodes method and class into the 14-bit message type (RFC 8489 §5, figure 3).
pub const fn message_type(method: Method, class: Class) -> u16 {
    let m = method.0;
    let c: u16 = match class {
        Class::Request => 0b00,
        Class::Indication => 0b01,
        Class::Success => 0b10,
        Class::Error => 0b11,
    };
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
}

fn split_type(t: u16) -> (Method, Class) {
    let method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2);
    let class = match ((t >> 4) & 1) | ((t >> 7) & 2) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    };
    (Method(method), class)
}

/// Why bytes are not an acceptable STUN message. Every variant means "silently discard"
/// (RFC 8489 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than the 20-byte header.
    TooShort,
    /// The top two bits are not zero.
    NotStun,
    /// The magic cookie is not 0x2112A442.
    BadCookie,
    /// The length field is not a multiple of 4, or 20 + length differs from the datagram length.
    BadLength,
    /// An attribute's length runs past the end of the message.
    AttributeOverflow,
    /// MESSAGE-INTEGRITY is not 20 bytes, MESSAGE-INTEGRITY-SHA256 is not 16-32 bytes in steps
    /// of 4 (RFC 8489 §14.6), or FINGERPRINT is not 4 bytes.
    BadAttributeLength,
    /// FINGERPRINT is not the last attribute.
    FingerprintNotLast,
    /// FINGERPRINT does not match the CRC-32 of the message (RFC 8489 §14.7).
    BadFingerprint,
}

/// One attribute as received: type, value, and the padding bytes that followed it (kept as
/// received, because MESSAGE-INTEGRITY covers them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAttribute<'a> {
    /// Attribute type.
    pub typ: u16,
    /// Value, `length` bytes.
    pub value: &'a [u8],
    /// 0-3 padding bytes after the value.
    pub padding: &'a [u8],
}

/// A checked view of one STUN message. Only attributes before the first integrity attribute
/// count (RFC 8489 §14.5, §14.6: after MESSAGE-INTEGRITY only MESSAGE-INTEGRITY-SHA256 and
/// FINGERPRINT may follow, after MESSAGE-INTEGRITY-SHA256 only FINGERPRINT; anything else is
/// ignored); of duplicates, the first counts.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    bytes: &'a [u8],
    method: Method,
    class: Class,
    tid: TransactionId,
    /// End offset of the attributes that count (start of the first integrity attribute, or
    /// FINGERPRINT, or end).
    counted_end: u16,
    /// Offset of MESSAGE-INTEGRITY.
    integrity_at: Option<u16>,
    /// Offset and value length of MESSAGE-INTEGRITY-SHA256.
    integrity_sha256_at: Option<(u16, u8)>,
    unknown: [u16; MAX_UNKNOWN],
    unknown_len: u8,
}

impl<'a> Message<'a> {
    /// Checks `datagram` as one complete STUN message (the UDP framing of RFC 8489 §6.2.1: the
    /// datagram is exactly one message), walking every attribute and verifying FINGERPRINT when
    /// present.
    pub fn parse(datagram: &'a [u8]) -> Result<Self, ParseError> {
        if datagram.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        if datagram[0] & 0xC0 != 0 {
            return Err(ParseError::NotStun);
        }
        if be32(datagram, 4) != MAGIC_COOKIE {
            return Err(ParseError::BadCookie);
        }
        let length = be16(datagram, 2) as usize;
        if length % 4 != 0 || HEADER_LEN + length != datagram.len() || datagram.len() > u16::MAX as usize {
            return Err(ParseError::BadLength);
        }
        let (method, class) = split_type(be16(datagram, 0));
        let mut tid = TransactionId::default();
        tid.0.copy_from_slice(&datagram[8..20]);
        let mut msg = Message {
            bytes: datagram,
            method,
            class,
            tid,
            counted_end: datagram.len() as u16,
            integrity_at: None,
            integrity_sha256_at: None,
            unknown: [0; MAX_UNKNOWN],
            unknown_len: 0,
        };
        let mut pos = HEADER_LEN;
        while pos < datagram.len() {
            if pos + 4 > datagram.len() {
                return Err(ParseError::AttributeOverflow);
            }
            let typ = be16(datagram, pos);
            let len = be16(datagram, pos + 2) as usize;
            let next = pos + 4 + ((len + 3) & !3);
            if next > datagram.len() {
                return Err(ParseError::AttributeOverflow);
            }
            if typ == attr::FINGERPRINT {
                if len != 4 {
                    return Err(ParseError::BadAttributeLength);
                }
                if next != datagram.len() {
                    return Err(ParseError::FingerprintNotLast);
                }
                if integrity::fingerprint(&datagram[..pos]) != be32(datagram, pos + 4) {
                    return Err(ParseError::BadFingerprint);
                }
                if !msg.has_integrity() {
                    msg.counted_end = pos as u16;
                }
            } else if msg.integrity_sha256_at.is_some() {
                // Ignored (§14.6).
            } else if typ == attr::MESSAGE_INTEGRITY_SHA256 {
                if !(16..=32).contains(&len) || len % 4 != 0 {
                    return Err(ParseError::BadAttributeLength);
                }
                msg.integrity_sha256_at = Some((pos as u16, len as u8));
                if msg.integrity_at.is_none() {
                    msg.counted_end = pos as u16;
                }
            } else if msg.integrity_at.is_none() {
                if typ == attr::MESSAGE_INTEGRITY {
                    if len != 20 {
                        return Err(ParseError::BadAttributeLength);
                    }
                    msg.integrity_at = Some(pos as u16);
                    msg.counted_end = pos as u16;
                } else if attr::is_comprehension_required(typ) && !attr::is_understood(typ) {
                    msg.note_unknown(typ);
                }
            }
            pos = next;
        }
        Ok(msg)
    }

    fn note_unknown(&mut self, typ: u16) {
        let n = self.unknown_len as usize;
        if n < MAX_UNKNOWN && !self.unknown[..n].contains(&typ) {
            self.unknown[n] = typ;
            self.unknown_len += 1;
        }
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.method
    }
    /// The class.
    pub fn class(&self) -> Class {
        self.class
    }
    /// The transaction ID.
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }
    /// Unknown comprehension-required attribute types (at most [`MAX_UNKNOWN`]); non-empty means
    /// a request earns 420 (RFC 8489 §6.3.1.1) and an indication is dropped.
    pub fn unknown_required(&self) -> &[u16] {
        &self.unknown[..self.unknown_len as usize]
    }

    /// Every attribute in order, including MESSAGE-INTEGRITY, FINGERPRINT and ignored ones.
    pub fn raw_attributes(&self) -> Attributes<'a> {
        Attributes { bytes: self.bytes, pos: HEADER_LEN, end: self.bytes.len() }
    }

    /// The attributes that count: those before MESSAGE-INTEGRITY (or FINGERPRINT).
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes { bytes: self.bytes, pos: HEADER_LEN, end: self.counted_end as usize }
    }

    /// The value of the first counted attribute of type `typ`.
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.attributes().find(|a| a.typ == typ).map(|a| a.value)
    }

    /// USERNAME as bytes (RFC 8489 §14.3).
    pub fn username(&self) -> Option<&'a [u8]> {
        self.get(attr::USERNAME)
    }
    /// REALM as bytes.
    pub fn realm(&self) -> Option<&'a [u8]> {
        self.get(attr::REALM)
    }
    /// NONCE as bytes.
    pub fn nonce(&self) -> Option<&'a [u8]> {
        self.get(attr::NONCE)
    }

    /// A 32-bit attribute value (LIFETIME) or `None` when absent; `Some(Err)` when not 4 bytes.
    pub fn u32_attr(&self, typ: u16) -> Option<Result<u32, AddressError>> {
        self.get(typ).map(|v| if v.len() == 4 { Ok(be32(v, 0)) } else { Err(AddressError::BadLength) })
    }

    /// Decodes the first counted XOR-address attribute of type `typ`.
    pub fn xor_address(&self, typ: u16) -> Option<Result<SocketAddr, AddressError>> {
        self.get(typ).map(|v| decode_xor_address(v, &self.tid))
    }

    /// Every counted XOR-PEER-ADDRESS, decoded (CreatePermission may carry several, RFC 8656 §10).
    pub fn peer_addresses(&self) -> impl Iterator<Item = Result<SocketAddr, AddressError>> + 'a {
        let tid = self.tid;
        self.attributes().filter(|a| a.typ == attr::XOR_PEER_ADDRESS).map(move |a| decode_xor_address(a.value, &tid))
    }

    /// The parts the integrity attribute covers (RFC 8489 §14.5, §14.6): the length to put in
    /// the header, the bytes after the length field up to the attribute, and the received HMAC.
    /// MESSAGE-INTEGRITY-SHA256 is preferred when both are present (§9.2.4: a server that
    /// supports it checks it).
    pub fn integrity_parts(&self) -> Option<IntegrityParts<'a>> {
        let (at, len, algorithm) = match (self.integrity_sha256_at, self.integrity_at) {
            (Some((at, len)), _) => (at as usize, len as usize, MacAlgorithm::HmacSha256),
            (None, Some(at)) => (at as usize, 20, MacAlgorithm::HmacSha1),
            (None, None) => return None,
        };
        Some(IntegrityParts {
            type_bytes: &self.bytes[0..2],
            adjusted_length: (at + 4 + len - HEADER_LEN) as u16,
            rest: &self.bytes[4..at],
            mac: &self.bytes[at + 4..at + 4 + len],
            algorithm,
        })
    }

    /// True when MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 is present.
    pub fn has_integrity(&self) -> bool {
        self.integrity_at.is_some() || self.integrity_sha256_at.is_some()
    }

    /// USERHASH (RFC 8489 §14.4) when present and 32 bytes; `Some(Err(()))` when malformed.
    pub fn userhash(&self) -> Option<Result<&'a [u8; 32], ()>> {
        self.get(attr::USERHASH).map(|v| <&[u8; 32]>::try_from(v).map_err(|_| ()))
    }

    /// PASSWORD-ALGORITHM (RFC 8489 §14.12): `None` when absent, `Some(Err(()))` when malformed
    /// or naming an algorithm uturn does not implement. Parameters are ignored (neither MD5 nor
    /// SHA-256 has any).
    pub fn password_algorithm(&self) -> Option<Result<PasswordAlgorithm, ()>> {
        self.get(attr::PASSWORD_ALGORITHM).map(|v| {
            if v.len() < 4 || 4 + be16(v, 2) as usize > v.len() {
                return Err(());
            }
            PasswordAlgorithm::from_number(be16(v, 0)).ok_or(())
        })
    }
}

/// Iterator over attributes of a checked message; never fails.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    bytes: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = RawAttribute<'a>;
    fn next(&mut self) -> Option<RawAttribute<'a>> {
        if self.pos + 4 > self.end {
            return None;
        }
        let typ = be16(self.bytes, self.pos);
        let len = be16(self.bytes, self.pos + 2) as usize;
        let start = self.pos + 4;
        let padded = (len + 3) & !3;
        // `parse` proved every attribute fits; `get` keeps that a non-panicking fact.
        let value = self.bytes.get(start..start + len)?;
        let padding = self.bytes.get(start + len..start + padded)?;
        self.pos = start + padded;
        Some(RawAttribute { typ, value, padding })
    }
}

#[inline]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
#[inline]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_type_round_trips() {
        for m in [Method::BINDING, Method::ALLOCATE, Method::CHANNEL_BIND, Method(0xFFF)] {
            for c in [Class::Request, Class::Indication, Class::Success, Class::Error] {
                assert_eq!(split_type(message_type(m, c)), (m, c));
            }
        }
        assert_eq!(message_type(Method::BINDING, Class::Success), 0x0101);
        assert_eq!(message_type(Method::ALLOCATE, Class::Error), 0x0113);
        assert_eq!(message_type(Method::SEND, Class::Indication), 0x0016);
        assert_eq!(message_type(Method::DATA, Class::Indication), 0x0017);
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(Message::parse(&[0; 19]).unwrap_err(), ParseError::TooShort);
        let mut m = [0u8; 20];
        m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        assert!(Message::parse(&m).is_ok());
        m[0] = 0x40;
        assert_eq!(Message::parse(&m).unwrap_err(), ParseError::NotStun);
        m[0] = 0;
        m[3] = 4;
        assert_eq!(Message::parse(&m).unwrap_err(), ParseError::BadLength);
        m[3] = 0;
        m[4] = 0;
        assert_eq!(Message::parse(&m).unwrap_err(), ParseError::BadCookie);
    }

    #[test]
    fn attribute_past_the_end_is_rejected() {
        let mut m = vec![0u8, 1, 0, 8, 0x21, 0x12, 0xA4, 0x42];
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&[0x00, 0x06, 0x00, 0x09, b'a', b'b', b'c', b'd']);
        assert_eq!(Message::parse(&m).unwrap_err(), ParseError::AttributeOverflow);
    }

    #[test]
    fn message_integrity_sha256_signs_verifies_and_ends_the_counted_attributes() {
        use crate::wire::{IntegrityKey, MessageWriter};
        let key = IntegrityKey::derive(PasswordAlgorithm::Sha256, "u", "r", "p");
        let mut buf = [0u8; 256];
        let mut w = MessageWriter::new(&mut buf, Method::REFRESH, Class::Request, TransactionId([9; 12])).unwrap();
        w.bytes(attr::USERNAME, b"u").unwrap();
        w.integrity(key.as_bytes()).unwrap();
        w.sign(&key).unwrap();
        w.bytes(attr::LIFETIME, &[0, 0, 0, 0]).unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        let parts = m.integrity_parts().unwrap();
        assert_eq!(parts.algorithm, MacAlgorithm::HmacSha256);
        assert_eq!(parts.mac.len(), 32);
        assert!(key.verify(&parts));
        assert!(!IntegrityKey::derive(PasswordAlgorithm::Sha256, "u", "r", "q").verify(&parts));
        // LIFETIME after the integrity attributes does not count; USERNAME before them does.
        assert!(m.get(attr::LIFETIME).is_none());
        assert_eq!(m.username(), Some(&b"u"[..]));
        // A MESSAGE-INTEGRITY-SHA256 of 12 bytes is malformed.
        let mut w = MessageWriter::new(&mut buf, Method::REFRESH, Class::Request, TransactionId([9; 12])).unwrap();
        w.bytes(attr::MESSAGE_INTEGRITY_SHA256, &[0; 12]).unwrap();
        let n = w.finish();
        assert_eq!(Message::parse(&buf[..n]).unwrap_err(), ParseError::BadAttributeLength);
    }

    #[test]
    fn password_algorithm_and_userhash_accessors() {
        use crate::wire::MessageWriter;
        let mut buf = [0u8; 128];
        let mut w = MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Request, TransactionId([1; 12])).unwrap();
        w.bytes(attr::PASSWORD_ALGORITHM, &[0, 2, 0, 0]).unwrap();
        w.bytes(attr::USERHASH, &[5; 32]).unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.password_algorithm(), Some(Ok(PasswordAlgorithm::Sha256)));
        assert_eq!(m.userhash(), Some(Ok(&[5u8; 32])));
        assert!(m.unknown_required().is_empty());
        let mut w = MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Request, TransactionId([1; 12])).unwrap();
        w.bytes(attr::PASSWORD_ALGORITHM, &[0, 9, 0, 0]).unwrap();
        w.bytes(attr::USERHASH, &[5; 31]).unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.password_algorithm(), Some(Err(())));
        assert_eq!(m.userhash(), Some(Err(())));
    }
}
