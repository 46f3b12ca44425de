//! ChannelData messages (RFC 8656 §12.4) and channel numbers.

use super::message::be16;

/// Length of the ChannelData header: 2-byte channel number, 2-byte length.
pub const HEADER_LEN: usize = 4;

/// A channel number: 0x4000..=0x4FFF, the range RFC 8656 §12 allows ([`ChannelNumber::new`]),
/// or 0x4000..=0x7FFF, the older range of RFC 5766 §11 ([`ChannelNumber::new_rfc5766`]).
///
/// coturn accepts up to 0x7FFF and its `turnutils_uclient` picks numbers up to 0x7FFF. uturn
/// follows RFC 8656 by default (a ChannelBind outside 0x4000-0x4FFF gets 400) and accepts the
/// RFC 5766 range only when the operator sets `rfc5766-channels`.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelNumber(u16);

impl ChannelNumber {
    /// Lowest valid channel number.
    pub const MIN: u16 = 0x4000;
    /// Highest valid channel number.
    pub const MAX: u16 = 0x4FFF;

    /// Validates a channel number.
    pub const fn new(n: u16) -> Option<Self> {
        if n >= Self::MIN && n <= Self::MAX {
            Some(ChannelNumber(n))
        } else {
            None
        }
    }
    /// Validates a channel number against the RFC 5766 range 0x4000..=0x7FFF.
    pub const fn new_rfc5766(n: u16) -> Option<Self> {
        if n >= Self::MIN && n <= 0x7FFF {
            Some(ChannelNumber(n))
        } else {
            None
        }
    }
    /// True when the number is in the RFC 8656 range 0x4000..=0x4FFF.
    pub const fn is_rfc8656(self) -> bool {
        self.0 <= Self::MAX
    }
    /// The number.
    pub const fn get(self) -> u16 {
        self.0
    }
}

/// Why a datagram is not acceptable ChannelData; each means "silently discard" (RFC 8656 §12.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelDataError {
    /// Shorter than the 4-byte header.
    TooShort,
    /// Channel number outside 0x4000..=0x7FFF (the top bits say ChannelData, but it is not).
    BadChannel,
    /// The length field claims more bytes than the datagram holds.
    LengthMismatch,
}

/// A checked view of a ChannelData message. Over UDP trailing padding (or any extra bytes past
/// the length) is ignored (RFC 8656 §12.5). The number is only checked structurally
/// (0x4000..=0x7FFF); whether it is bound is the channel table's business.
#[derive(Debug, Clone, Copy)]
pub struct ChannelData<'a> {
    channel: ChannelNumber,
    payload: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Checks `datagram` as ChannelData.
    #[inline]
    pub fn parse(datagram: &'a [u8]) -> Result<Self, ChannelDataError> {
        if datagram.len() < HEADER_LEN {
            return Err(ChannelDataError::TooShort);
        }
        let channel = ChannelNumber::new_rfc5766(be16(datagram, 0)).ok_or(ChannelDataError::BadChannel)?;
        let len = be16(datagram, 2) as usize;
        let payload = datagram.get(HEADER_LEN..HEADER_LEN + len).ok_or(ChannelDataError::LengthMismatch)?;
        Ok(ChannelData { channel, payload })
    }
    /// The channel number.
    pub fn channel(&self) -> ChannelNumber {
        self.channel
    }
    /// The application data, `length` bytes.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }
}

/// Writes a ChannelData header for `len` payload bytes into `out[0..4]`.
#[inline]
pub fn write_header(out: &mut [u8], channel: ChannelNumber, len: u16) {
    out[0..2].copy_from_slice(&channel.get().to_be_bytes());
    out[2..4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_range_is_rfc_8656() {
        assert!(ChannelNumber::new(0x3FFF).is_none());
        assert!(ChannelNumber::new(0x4000).is_some());
        assert!(ChannelNumber::new(0x4FFF).is_some());
        assert!(ChannelNumber::new(0x5000).is_none());
        assert!(ChannelNumber::new(0x7FFF).is_none());
        assert!(ChannelNumber::new_rfc5766(0x7FFF).is_some_and(|c| !c.is_rfc8656()));
        assert!(ChannelNumber::new_rfc5766(0x8000).is_none());
    }

    #[test]
    fn length_rules() {
        assert_eq!(ChannelData::parse(&[0x40, 0]).unwrap_err(), ChannelDataError::TooShort);
        assert_eq!(ChannelData::parse(&[0x40, 0, 0, 5, 1, 2, 3]).unwrap_err(), ChannelDataError::LengthMismatch);
        assert_eq!(ChannelData::parse(&[0x80, 0, 0, 0]).unwrap_err(), ChannelDataError::BadChannel);
        assert!(ChannelData::parse(&[0x50, 0, 0, 0]).is_ok());
        let cd = ChannelData::parse(&[0x40, 1, 0, 3, 1, 2, 3, 0]).unwrap();
        assert_eq!(cd.channel().get(), 0x4001);
        assert_eq!(cd.payload(), &[1, 2, 3]);
    }
}
