//! Framing of STUN messages and ChannelData on a byte stream (TURN over TCP or TLS, RFC 8656
//! §3.1, §12.5): a stream carries no datagram boundaries, so each message is delimited by its own
//! length field. A STUN message is its 20-byte header plus the header's length (a multiple of 4,
//! RFC 8489 §5); ChannelData is its 4-byte header plus its length, padded to a multiple of 4
//! bytes (RFC 8656 §12.5: "over TCP and TLS-over-TCP, the ChannelData message MUST be padded").
//! Anything else on a stream means the framing is lost: the connection must be closed.

use super::channel_data;

/// Longest message a stream may carry, bytes: a STUN header and a 65,535-byte body, or a
/// ChannelData header, 65,535 payload bytes and 1 byte of padding.
pub const MAX_FRAME: usize = 4 + 65_535 + 1;

/// What the bytes at the start of a stream buffer hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A whole message: `message` bytes long, followed by `consumed - message` bytes of
    /// padding; the next message starts at `consumed`.
    Complete {
        /// The message's own length (STUN header + body, or ChannelData header + payload).
        message: usize,
        /// Bytes it takes on the stream, padding included.
        consumed: usize,
    },
    /// Not enough bytes yet: at least `needed` in all (a lower bound while the length field
    /// itself has not arrived).
    Incomplete {
        /// Bytes the buffer must hold before the frame can be taken.
        needed: usize,
    },
    /// Neither STUN nor ChannelData, or a STUN length that is not a multiple of 4: the stream's
    /// framing is lost.
    Invalid,
}

/// Finds the first message in `buf` (RFC 8656 §12.5).
pub fn next_frame(buf: &[u8]) -> Frame {
    let Some(&first) = buf.first() else { return Frame::Incomplete { needed: 4 } };
    if buf.len() < 4 {
        // The first byte alone already tells garbage from a message.
        return match first >> 6 {
            0b00 | 0b01 => Frame::Incomplete { needed: 4 },
            _ => Frame::Invalid,
        };
    }
    let length = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let (message, consumed) = match first >> 6 {
        0b00 => {
            if length % 4 != 0 {
                return Frame::Invalid;
            }
            (20 + length, 20 + length)
        }
        0b01 => {
            let message = channel_data::HEADER_LEN + length;
            (message, (message + 3) & !3)
        }
        _ => return Frame::Invalid,
    };
    if buf.len() < consumed {
        Frame::Incomplete { needed: consumed }
    } else {
        Frame::Complete { message, consumed }
    }
}

/// Bytes of zero padding a ChannelData message of `len` bytes (header included) needs on a
/// stream (RFC 8656 §12.5).
#[inline]
pub fn channel_data_padding(len: usize) -> usize {
    ((len + 3) & !3) - len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_frames_by_header_length() {
        let mut m = vec![0x00, 0x01, 0x00, 0x08];
        m.extend_from_slice(&[0; 24]);
        assert_eq!(next_frame(&m), Frame::Complete { message: 28, consumed: 28 });
        assert_eq!(next_frame(&m[..27]), Frame::Incomplete { needed: 28 });
        assert_eq!(next_frame(&m[..2]), Frame::Incomplete { needed: 4 });
        m[3] = 0x07;
        assert_eq!(next_frame(&m), Frame::Invalid);
    }

    #[test]
    fn channel_data_is_padded_on_a_stream() {
        let m = [0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0, 0x40];
        assert_eq!(next_frame(&m), Frame::Complete { message: 9, consumed: 12 });
        assert_eq!(next_frame(&m[..11]), Frame::Incomplete { needed: 12 });
        assert_eq!(channel_data_padding(9), 3);
        assert_eq!(channel_data_padding(8), 0);
    }

    #[test]
    fn anything_else_loses_the_framing() {
        assert_eq!(next_frame(&[0x80]), Frame::Invalid);
        assert_eq!(next_frame(&[0xC0, 0, 0, 0]), Frame::Invalid);
        assert_eq!(next_frame(&[]), Frame::Incomplete { needed: 4 });
    }
}
