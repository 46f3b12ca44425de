//! A small pcapng writer (IETF draft-ietf-opsawg-pcapng) for `uturn trace --pcap`: one
//! interface of link type RAW (101: the packet starts with its IPv4 or IPv6 header), one
//! Enhanced Packet Block per traced message, with IP and UDP headers synthesized from the
//! message's 5-tuple so Wireshark's STUN/TURN dissector decodes it. A message cut by the tap
//! (relayed payload past the snap length) is written with its captured length below its
//! original length, as a capture with a short snap length is.
//!
//! Messages of TCP and TLS clients are written as UDP datagrams of the same 5-tuple (one message
//! each, decrypted), with a comment naming their real transport: a TCP stream would need
//! sequence numbers the tap does not see.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};

/// LINKTYPE_RAW: raw IPv4 or IPv6.
const LINKTYPE_RAW: u16 = 101;

/// Writes pcapng blocks to `W`.
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    out: W,
    packets: u64,
}

impl<W: Write> PcapWriter<W> {
    /// Writes the Section Header Block and the one Interface Description Block (microsecond
    /// timestamps). Errors: `out`'s.
    pub fn new(mut out: W) -> io::Result<Self> {
        // Section Header Block: magic, version 1.0, section length unknown (-1).
        let mut shb = Vec::new();
        shb.extend(0x1A2B_3C4Du32.to_le_bytes());
        shb.extend(1u16.to_le_bytes());
        shb.extend(0u16.to_le_bytes());
        shb.extend((-1i64).to_le_bytes());
        option(&mut shb, 4, b"uturn trace"); // shb_userappl
        option(&mut shb, 0, b"");
        block(&mut out, 0x0A0D_0D0A, &shb)?;
        let mut idb = Vec::new();
        idb.extend(LINKTYPE_RAW.to_le_bytes());
        idb.extend(0u16.to_le_bytes());
        idb.extend(0u32.to_le_bytes()); // snaplen: none
        option(&mut idb, 2, b"uturn"); // if_name
        option(&mut idb, 0, b"");
        block(&mut out, 1, &idb)?;
        Ok(PcapWriter { out, packets: 0 })
    }

    /// Writes one UDP datagram from `src` to `dst` at `ts` (seconds since the Unix epoch)
    /// carrying `payload`, of which the first `payload.len()` of `orig_len` bytes were captured;
    /// `comment` becomes the packet's comment. Errors: `out`'s, or `src` and `dst` of different
    /// families (InvalidInput).
    pub fn udp(
        &mut self,
        ts: f64,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
        orig_len: usize,
        comment: Option<&str>,
    ) -> io::Result<()> {
        let orig_len = orig_len.max(payload.len());
        let udp_len = 8 + orig_len;
        let mut pkt = Vec::with_capacity(48 + payload.len());
        let (ip_header_len, pseudo) = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let total = (20 + udp_len) as u16;
                let mut h = [0u8; 20];
                h[0] = 0x45;
                h[2..4].copy_from_slice(&total.to_be_bytes());
                h[4..6].copy_from_slice(&(self.packets as u16).to_be_bytes());
                h[6] = 0x40; // DF
                h[8] = 64;
                h[9] = 17;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                let c = checksum(&h, 0);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                pkt.extend(h);
                let mut p = Vec::new();
                p.extend(s.octets());
                p.extend(d.octets());
                p.extend([0, 17]);
                p.extend((udp_len as u16).to_be_bytes());
                (20, p)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut h = [0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
                h[6] = 17;
                h[7] = 64;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                pkt.extend(h);
                let mut p = Vec::new();
                p.extend(s.octets());
                p.extend(d.octets());
                p.extend((udp_len as u32).to_be_bytes());
                p.extend([0, 0, 0, 17]);
                (40, p)
            }
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "addresses of different families")),
        };
        let mut udp = [0u8; 8];
        udp[0..2].copy_from_slice(&src.port().to_be_bytes());
        udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
        udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        // The checksum covers the whole datagram: right when it was captured whole; for a cut one
        // it covers what was captured (Wireshark does not check UDP checksums by default).
        let mut sum = Vec::with_capacity(pseudo.len() + 8 + payload.len());
        sum.extend(&pseudo);
        sum.extend(udp);
        sum.extend(payload);
        let c = match checksum(&sum, 0) {
            0 => 0xFFFF,
            c => c,
        };
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        pkt.extend(udp);
        pkt.extend(payload);
        let captured = pkt.len();
        let original = ip_header_len + udp_len;
        let micros = (ts * 1e6).max(0.0) as u64;
        let mut epb = Vec::with_capacity(captured + 64);
        epb.extend(0u32.to_le_bytes()); // interface 0
        epb.extend(((micros >> 32) as u32).to_le_bytes());
        epb.extend((micros as u32).to_le_bytes());
        epb.extend((captured as u32).to_le_bytes());
        epb.extend((original as u32).to_le_bytes());
        epb.extend(&pkt);
        pad(&mut epb);
        if let Some(c) = comment {
            option(&mut epb, 1, c.as_bytes()); // opt_comment
            option(&mut epb, 0, b"");
        }
        block(&mut self.out, 6, &epb)?;
        self.packets += 1;
        Ok(())
    }

    /// Packets written.
    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// Flushes and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One's-complement sum of 16-bit words (RFC 1071), folded and inverted.
fn checksum(b: &[u8], init: u32) -> u16 {
    let mut s = init;
    for c in b.chunks(2) {
        s += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while s > 0xFFFF {
        s = (s & 0xFFFF) + (s >> 16);
    }
    !(s as u16)
}

fn pad(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
}

fn option(v: &mut Vec<u8>, code: u16, value: &[u8]) {
    v.extend(code.to_le_bytes());
    v.extend((value.len() as u16).to_le_bytes());
    v.extend(value);
    pad(v);
}

fn block(out: &mut impl Write, typ: u32, body: &[u8]) -> io::Result<()> {
    let len = (12 + body.len()) as u32;
    out.write_all(&typ.to_le_bytes())?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(body)?;
    out.write_all(&len.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_well_formed() {
        let mut w = PcapWriter::new(Vec::new()).unwrap();
        let a: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:3478".parse().unwrap();
        w.udp(1.5, a, b, &[0u8; 21], 30, Some("x")).unwrap();
        let v = w.finish().unwrap();
        // Walk the blocks: each length is repeated at its end.
        let mut at = 0;
        let mut n = 0;
        while at < v.len() {
            let len = u32::from_le_bytes(v[at + 4..at + 8].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0);
            assert_eq!(&v[at + len - 4..at + len], &v[at + 4..at + 8]);
            at += len;
            n += 1;
        }
        assert_eq!(n, 3);
        assert!(w_ipv4_checksum_ok(&v));
    }

    fn w_ipv4_checksum_ok(v: &[u8]) -> bool {
        // The EPB's packet starts 28 bytes into the third block.
        let shb = u32::from_le_bytes(v[4..8].try_into().unwrap()) as usize;
        let idb = u32::from_le_bytes(v[shb + 4..shb + 8].try_into().unwrap()) as usize;
        let ip = &v[shb + idb + 28..shb + idb + 48];
        checksum(ip, 0) == 0
    }
}
