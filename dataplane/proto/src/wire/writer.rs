//! Builds STUN messages into a caller-owned buffer (RFC 8489 §5, §14), never allocating.

use std::net::SocketAddr;

use super::address::{encode_xor_address, encoded_len};
use super::attr;
use super::integrity::{self, IntegrityKey, IntegrityParts, MacAlgorithm, FINGERPRINT_XOR};
use super::message::{message_type, Class, Method, RawAttribute, TransactionId, HEADER_LEN};
use super::MAGIC_COOKIE;

/// The buffer given to [`MessageWriter`] is too small for the message being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteError;

/// Writes one STUN message into `buf[..]`, keeping the header's length field current after every
/// attribute. Attribute values are zero-padded to 4 bytes.
#[derive(Debug)]
pub struct MessageWriter<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl<'b> MessageWriter<'b> {
    /// Starts a message of `method`/`class` with transaction ID `tid`.
    pub fn new(buf: &'b mut [u8], method: Method, class: Class, tid: TransactionId) -> Result<Self, WriteError> {
        if buf.len() < HEADER_LEN {
            return Err(WriteError);
        }
        buf[0..2].copy_from_slice(&message_type(method, class).to_be_bytes());
        buf[2..4].copy_from_slice(&0u16.to_be_bytes());
        buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf[8..20].copy_from_slice(&tid.0);
        Ok(MessageWriter { buf, len: HEADER_LEN })
    }

    /// The transaction ID being written.
    pub fn transaction_id(&self) -> TransactionId {
        let mut t = TransactionId::default();
        t.0.copy_from_slice(&self.buf[8..20]);
        t
    }

    /// Reserves an attribute of `value_len` bytes with zero padding and returns its value slice.
    fn reserve(&mut self, typ: u16, value_len: usize) -> Result<&mut [u8], WriteError> {
        let padded = (value_len + 3) & !3;
        let end = self.len + 4 + padded;
        if end > self.buf.len() || value_len > u16::MAX as usize || end - HEADER_LEN > u16::MAX as usize {
            return Err(WriteError);
        }
        let at = self.len;
        self.buf[at..at + 2].copy_from_slice(&typ.to_be_bytes());
        self.buf[at + 2..at + 4].copy_from_slice(&(value_len as u16).to_be_bytes());
        self.buf[at + 4 + value_len..end].fill(0);
        self.len = end;
        self.set_length((end - HEADER_LEN) as u16);
        Ok(&mut self.buf[at + 4..at + 4 + value_len])
    }

    fn set_length(&mut self, len: u16) {
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends an attribute with an opaque value.
    pub fn bytes(&mut self, typ: u16, value: &[u8]) -> Result<&mut Self, WriteError> {
        self.reserve(typ, value.len())?.copy_from_slice(value);
        Ok(self)
    }

    /// Appends an attribute exactly as received, padding bytes included.
    pub fn raw(&mut self, a: &RawAttribute<'_>) -> Result<&mut Self, WriteError> {
        let at = self.len + 4 + a.value.len();
        self.bytes(a.typ, a.value)?;
        self.buf[at..at + a.padding.len()].copy_from_slice(a.padding);
        Ok(self)
    }

    /// Appends a 32-bit attribute (LIFETIME, RFC 8656 §18.2).
    pub fn u32(&mut self, typ: u16, v: u32) -> Result<&mut Self, WriteError> {
        self.bytes(typ, &v.to_be_bytes())
    }

    /// Appends an XOR-encoded address attribute: XOR-MAPPED-ADDRESS (RFC 8489 §14.2),
    /// XOR-PEER-ADDRESS (RFC 8656 §18.3) or XOR-RELAYED-ADDRESS (RFC 8656 §18.5).
    pub fn xor_address(&mut self, typ: u16, addr: &SocketAddr) -> Result<&mut Self, WriteError> {
        let tid = self.transaction_id();
        let v = self.reserve(typ, encoded_len(addr))?;
        encode_xor_address(addr, &tid, v);
        Ok(self)
    }

    /// Appends a plain (not XOR-encoded) address attribute in MAPPED-ADDRESS form (RFC 8489
    /// §14.1): ALTERNATE-SERVER (§14.15).
    pub fn address(&mut self, typ: u16, addr: &SocketAddr) -> Result<&mut Self, WriteError> {
        let v = self.reserve(typ, encoded_len(addr))?;
        v[0] = 0;
        match addr {
            SocketAddr::V4(a) => {
                v[1] = 0x01;
                v[2..4].copy_from_slice(&a.port().to_be_bytes());
                v[4..8].copy_from_slice(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                v[1] = 0x02;
                v[2..4].copy_from_slice(&a.port().to_be_bytes());
                v[4..20].copy_from_slice(&a.ip().octets());
            }
        }
        Ok(self)
    }

    /// Appends ERROR-CODE with `code` (300-699) and a reason phrase (RFC 8489 §14.8).
    pub fn error_code(&mut self, code: u16, reason: &str) -> Result<&mut Self, WriteError> {
        let v = self.reserve(attr::ERROR_CODE, 4 + reason.len())?;
        v[0] = 0;
        v[1] = 0;
        v[2] = (code / 100) as u8;
        v[3] = (code % 100) as u8;
        v[4..].copy_from_slice(reason.as_bytes());
        Ok(self)
    }

    /// Appends UNKNOWN-ATTRIBUTES listing `types` (RFC 8489 §14.13).
    pub fn unknown_attributes(&mut self, types: &[u16]) -> Result<&mut Self, WriteError> {
        let v = self.reserve(attr::UNKNOWN_ATTRIBUTES, types.len() * 2)?;
        for (chunk, t) in v.chunks_exact_mut(2).zip(types) {
            chunk.copy_from_slice(&t.to_be_bytes());
        }
        Ok(self)
    }

    /// Appends MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5) computed with the raw `key` over
    /// everything written so far.
    pub fn integrity(&mut self, key: &[u8]) -> Result<&mut Self, WriteError> {
        let mac = integrity::compute(key, &self.covered(20));
        self.bytes(attr::MESSAGE_INTEGRITY, &mac)
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256, 32 bytes, RFC 8489 §14.6) computed with
    /// the raw `key` over everything written so far.
    pub fn integrity_sha256(&mut self, key: &[u8]) -> Result<&mut Self, WriteError> {
        let mac = integrity::compute_sha256(key, &self.covered(32));
        self.bytes(attr::MESSAGE_INTEGRITY_SHA256, &mac)
    }

    /// Appends the integrity attribute `key` signs with (see [`IntegrityKey::mac`]).
    pub fn sign(&mut self, key: &IntegrityKey) -> Result<&mut Self, WriteError> {
        match key.mac() {
            MacAlgorithm::HmacSha1 => self.integrity(key.as_bytes()),
            MacAlgorithm::HmacSha256 => self.integrity_sha256(key.as_bytes()),
        }
    }

    /// What an integrity attribute of `mac_len` bytes appended now covers.
    fn covered(&self, mac_len: usize) -> IntegrityParts<'_> {
        let at = self.len;
        IntegrityParts {
            type_bytes: &self.buf[0..2],
            adjusted_length: (at + 4 + mac_len - HEADER_LEN) as u16,
            rest: &self.buf[4..at],
            mac: &[],
            algorithm: if mac_len == 20 { MacAlgorithm::HmacSha1 } else { MacAlgorithm::HmacSha256 },
        }
    }

    /// Appends FINGERPRINT; it must be the last attribute.
    pub fn fingerprint(&mut self) -> Result<&mut Self, WriteError> {
        let at = self.len;
        self.reserve(attr::FINGERPRINT, 4)?;
        let crc = crc32fast::hash(&self.buf[..at]) ^ FINGERPRINT_XOR;
        self.buf[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
        Ok(self)
    }

    /// Bytes written so far (the message length including the header).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a message has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Finishes the message and returns its length in bytes.
    pub fn finish(self) -> usize {
        self.len
    }
}
