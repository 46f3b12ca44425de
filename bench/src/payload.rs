//! The generator's payload: magic, client index, sequence number and send time, so the
//! receiving side measures loss, duplicates, reordering and latency. 24 bytes, then zero fill.

/// "UTRN".
pub const MAGIC: u32 = 0x5554_524E;
/// Smallest payload that carries the header, bytes.
pub const MIN_SIZE: usize = 24;

/// The decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Client index.
    pub client: u32,
    /// Sequence number within the client, from 0.
    pub seq: u64,
    /// Send time, nanoseconds since the generator started.
    pub sent_ns: u64,
}

/// Writes a payload of `size` bytes (at least [`MIN_SIZE`]) into `out`; returns `size`.
#[inline]
pub fn write(out: &mut [u8], size: usize, s: Stamp) -> usize {
    out[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&s.client.to_be_bytes());
    out[8..16].copy_from_slice(&s.seq.to_be_bytes());
    out[16..24].copy_from_slice(&s.sent_ns.to_be_bytes());
    out[24..size].fill(0);
    size
}

/// Reads the header, if `p` is one of ours.
#[inline]
pub fn read(p: &[u8]) -> Option<Stamp> {
    if p.len() < MIN_SIZE || p[0..4] != MAGIC.to_be_bytes() {
        return None;
    }
    let u64_at = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().unwrap_or([0; 8]));
    Some(Stamp { client: u32::from_be_bytes([p[4], p[5], p[6], p[7]]), seq: u64_at(8), sent_ns: u64_at(16) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut b = [0xFFu8; 100];
        let s = Stamp { client: 7, seq: 1 << 40, sent_ns: 123_456_789 };
        assert_eq!(write(&mut b, 100, s), 100);
        assert_eq!(read(&b[..100]), Some(s));
        assert!(b[24..100].iter().all(|&x| x == 0));
        assert_eq!(read(&b[..20]), None);
    }
}
