//! (XOR-)address attribute values (RFC 8489 §14.1, §14.2; RFC 8656 §18.3, §18.5).
//!
//! Value layout: 1 reserved byte, 1 family byte (0x01 IPv4, 0x02 IPv6), 2-byte port, then 4 or 16
//! address bytes. The XOR forms XOR the port with the cookie's top 16 bits, an IPv4 address with
//! the cookie, and an IPv6 address with the cookie followed by the 12-byte transaction ID.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{TransactionId, MAGIC_COOKIE};

/// Why an address attribute value could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressError {
    /// The value is not 8 (IPv4) or 20 (IPv6) bytes long for its family.
    BadLength,
    /// The family byte is neither 0x01 nor 0x02.
    BadFamily,
}

/// Encoded length in bytes of an (XOR-)address value for `addr`: 8 for IPv4, 20 for IPv6.
#[inline]
pub const fn encoded_len(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    }
}

/// Decodes an XOR-MAPPED/PEER/RELAYED-ADDRESS value with the message's transaction ID.
pub fn decode_xor_address(value: &[u8], tid: &TransactionId) -> Result<SocketAddr, AddressError> {
    let (family, port, raw) = split(value)?;
    let port = port ^ (MAGIC_COOKIE >> 16) as u16;
    match family {
        0x01 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(raw);
            let ip = u32::from_be_bytes(a) ^ MAGIC_COOKIE;
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        _ => {
            let mut a = [0u8; 16];
            a.copy_from_slice(raw);
            xor_v6(&mut a, tid);
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
        }
    }
}

/// Writes the XOR-encoded value of `addr` into `out`, which must be exactly
/// [`encoded_len`]`(addr)` bytes long.
pub fn encode_xor_address(addr: &SocketAddr, tid: &TransactionId, out: &mut [u8]) {
    out[0] = 0;
    out[2..4].copy_from_slice(&(addr.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = 0x01;
            out[4..8].copy_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
        }
        IpAddr::V6(ip) => {
            out[1] = 0x02;
            let mut a = ip.octets();
            xor_v6(&mut a, tid);
            out[4..20].copy_from_slice(&a);
        }
    }
}

fn split(value: &[u8]) -> Result<(u8, u16, &[u8]), AddressError> {
    if value.len() < 4 {
        return Err(AddressError::BadLength);
    }
    let family = value[1];
    let port = u16::from_be_bytes([value[2], value[3]]);
    let want = match family {
        0x01 => 8,
        0x02 => 20,
        _ => return Err(AddressError::BadFamily),
    };
    if value.len() != want {
        return Err(AddressError::BadLength);
    }
    Ok((family, port, &value[4..]))
}

fn xor_v6(a: &mut [u8; 16], tid: &TransactionId) {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    for (i, b) in a.iter_mut().enumerate() {
        *b ^= if i < 4 { cookie[i] } else { tid.0[i - 4] };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_round_trip_v4_and_v6() {
        let tid = TransactionId([7; 12]);
        for addr in ["192.0.2.1:32853", "[2001:db8:1234:5678:11:2233:4455:6677]:32853"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut buf = vec![0u8; encoded_len(&addr)];
            encode_xor_address(&addr, &tid, &mut buf);
            assert_eq!(decode_xor_address(&buf, &tid), Ok(addr));
        }
    }

    #[test]
    fn rejects_bad_family_and_length() {
        let tid = TransactionId([0; 12]);
        assert_eq!(decode_xor_address(&[0, 3, 0, 0, 1, 2, 3, 4], &tid), Err(AddressError::BadFamily));
        assert_eq!(decode_xor_address(&[0, 1, 0, 0, 1, 2, 3], &tid), Err(AddressError::BadLength));
        assert_eq!(decode_xor_address(&[0, 2, 0, 0, 1, 2, 3, 4], &tid), Err(AddressError::BadLength));
    }
}
