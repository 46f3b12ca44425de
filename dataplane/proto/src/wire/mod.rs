//! The STUN/TURN wire format (RFC 8489 §5-§14, RFC 8656 §12, §18).
//!
//! Received bytes are classified by their first two bits ([`classify`]) before any parsing:
//! `0b00` is STUN, `0b01` is ChannelData, anything else is not ours.

pub mod address;
pub mod attr;
pub mod channel_data;
pub mod integrity;
pub mod message;
pub mod stream;
pub mod writer;

pub use address::{decode_xor_address, AddressError};
pub use channel_data::{ChannelData, ChannelNumber};
pub use integrity::{fingerprint, IntegrityKey, IntegrityParts};
pub use message::{Class, Message, Method, ParseError, TransactionId};
pub use writer::{MessageWriter, WriteError};

/// The STUN magic cookie (RFC 8489 §5), in network byte order on the wire.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// What a datagram is, judged by its first two bits (RFC 8656 §12: "the first two bits ... are
/// 0b00 for STUN and 0b01 for ChannelData").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    /// Top bits 0b00: a STUN message (still to be parsed and checked).
    Stun,
    /// Top bits 0b01: a ChannelData message (still to be checked).
    ChannelData,
    /// Empty, or top bits 0b10 / 0b11: neither; silently discarded.
    Other,
}

/// Classifies a datagram by its first byte, without parsing it.
#[inline]
pub fn classify(datagram: &[u8]) -> DatagramKind {
    match datagram.first().map(|b| b >> 6) {
        Some(0b00) => DatagramKind::Stun,
        Some(0b01) => DatagramKind::ChannelData,
        _ => DatagramKind::Other,
    }
}
