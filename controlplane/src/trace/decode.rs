//! Decoding a traced message for people: the STUN header (RFC 8489 §5), each attribute with
//! its value (XOR addresses decoded, §14.2), error codes with what they mean for an operator.
//! Tolerant of messages the tap cut (a Send or Data indication's DATA value, ChannelData's
//! payload): it decodes what is there and reports the cut.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde_json::{json, Map, Value};
use uturn_proto::wire::{attr, decode_xor_address, TransactionId};

/// The RFC 5389 magic cookie.
const MAGIC_COOKIE: u32 = 0x2112_A442;

/// A decoded STUN message header and the few attribute values the tracer reasons on.
#[derive(Debug, Clone, Default)]
pub struct Decoded {
    /// Method name (`Allocate`, ...).
    pub method: &'static str,
    /// Method number (RFC 8489 §5).
    pub method_code: u16,
    /// `request`, `indication`, `success` or `error`.
    pub class: &'static str,
    /// Transaction ID, hex.
    pub tid: String,
    /// USERNAME, when present.
    pub username: Option<String>,
    /// XOR-PEER-ADDRESS values.
    pub peers: Vec<SocketAddr>,
    /// LIFETIME, seconds.
    pub lifetime: Option<u32>,
    /// CHANNEL-NUMBER.
    pub channel: Option<u16>,
    /// ERROR-CODE's number.
    pub error: Option<u16>,
    /// DATA's length, bytes (as declared, even when the value was cut).
    pub data_len: Option<usize>,
    /// The attributes, decoded, in order.
    pub attributes: Vec<Value>,
}

/// Decodes a STUN message (`None` when `bytes` is not one: shorter than its header or without
/// the magic cookie).
pub fn stun(bytes: &[u8]) -> Option<Decoded> {
    if bytes.len() < 20 || bytes[0] & 0xC0 != 0 {
        return None;
    }
    let typ = u16::from_be_bytes([bytes[0], bytes[1]]);
    if u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) != MAGIC_COOKIE {
        return None;
    }
    let method_code = (typ & 0x000F) | ((typ & 0x00E0) >> 1) | ((typ & 0x3E00) >> 2);
    let class = match ((typ >> 7) & 0b10) | ((typ >> 4) & 0b1) {
        0 => "request",
        1 => "indication",
        2 => "success",
        _ => "error",
    };
    let mut tid = [0u8; 12];
    tid.copy_from_slice(&bytes[8..20]);
    let tid = TransactionId(tid);
    let mut d =
        Decoded { method: method_name(method_code), method_code, class, tid: hex(&tid.0), ..Decoded::default() };
    let declared = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
    let end = (20 + declared).min(bytes.len());
    let mut at = 20;
    while at + 4 <= end {
        let t = u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        let l = u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize;
        let value = &bytes[at + 4..(at + 4 + l).min(end)];
        let cut = value.len() < l;
        let a = attribute(&mut d, t, l, value, cut, &tid);
        d.attributes.push(a);
        at += 4 + l.div_ceil(4) * 4;
    }
    Some(d)
}

fn attribute(d: &mut Decoded, t: u16, l: usize, v: &[u8], cut: bool, tid: &TransactionId) -> Value {
    let name = attribute_name(t);
    let mut a = Map::new();
    a.insert("name".into(), name.map_or_else(|| json!(format!("0x{t:04X}")), |n| json!(n)));
    let text = || String::from_utf8_lossy(v).into_owned();
    let value: Option<Value> = match t {
        attr::XOR_PEER_ADDRESS | attr::XOR_RELAYED_ADDRESS | attr::XOR_MAPPED_ADDRESS => {
            match decode_xor_address(v, tid) {
                Ok(addr) => {
                    if t == attr::XOR_PEER_ADDRESS {
                        d.peers.push(addr);
                    }
                    Some(json!(addr.to_string()))
                }
                Err(_) => Some(json!("(malformed address)")),
            }
        }
        attr::MAPPED_ADDRESS | attr::ALTERNATE_SERVER => {
            Some(json!(plain_address(v).map_or("(malformed address)".into(), |a| a.to_string())))
        }
        attr::USERNAME => {
            d.username = Some(text());
            Some(json!(text()))
        }
        attr::REALM | attr::NONCE | attr::SOFTWARE => Some(json!(text())),
        attr::LIFETIME if v.len() == 4 => {
            let s = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
            d.lifetime = Some(s);
            Some(json!(s))
        }
        attr::CHANNEL_NUMBER if v.len() == 4 => {
            let c = u16::from_be_bytes([v[0], v[1]]);
            d.channel = Some(c);
            Some(json!(format!("0x{c:04X}")))
        }
        attr::REQUESTED_TRANSPORT if !v.is_empty() => Some(json!(match v[0] {
            attr::TRANSPORT_UDP => "UDP".to_string(),
            attr::TRANSPORT_TCP => "TCP".to_string(),
            p => format!("protocol {p}"),
        })),
        attr::REQUESTED_ADDRESS_FAMILY | attr::ADDITIONAL_ADDRESS_FAMILY if !v.is_empty() => Some(json!(match v[0] {
            attr::FAMILY_IPV4 => "IPv4",
            attr::FAMILY_IPV6 => "IPv6",
            _ => "unknown",
        })),
        attr::ERROR_CODE | attr::ADDRESS_ERROR_CODE if v.len() >= 4 => {
            let code = (v[2] & 0x07) as u16 * 100 + v[3] as u16;
            let reason = String::from_utf8_lossy(&v[4..]).into_owned();
            if t == attr::ERROR_CODE {
                d.error = Some(code);
            }
            a.insert("code".into(), json!(code));
            a.insert("reason".into(), json!(reason));
            Some(json!(format!("{code} {reason}")))
        }
        attr::DATA => {
            d.data_len = Some(l);
            Some(json!(format!("{l} bytes")))
        }
        attr::CONNECTION_ID if v.len() == 4 => Some(json!(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))),
        attr::FINGERPRINT | attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256 | attr::USERHASH => {
            Some(json!(hex(v)))
        }
        _ => None,
    };
    if let Some(v) = value {
        a.insert("value".into(), v);
    }
    if cut {
        a.insert("cut".into(), json!(true));
    }
    Value::Object(a)
}

/// A MAPPED-ADDRESS style value (RFC 8489 §14.1).
fn plain_address(v: &[u8]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]);
    let ip: IpAddr = match v.get(1)? {
        1 if v.len() == 8 => Ipv4Addr::new(v[4], v[5], v[6], v[7]).into(),
        2 if v.len() == 20 => Ipv6Addr::from(<[u8; 16]>::try_from(&v[4..20]).ok()?).into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The method's name (RFC 8489, RFC 8656, RFC 6062).
pub fn method_name(m: u16) -> &'static str {
    match m {
        0x001 => "Binding",
        0x003 => "Allocate",
        0x004 => "Refresh",
        0x006 => "Send",
        0x007 => "Data",
        0x008 => "CreatePermission",
        0x009 => "ChannelBind",
        0x00A => "Connect",
        0x00B => "ConnectionBind",
        0x00C => "ConnectionAttempt",
        _ => "unknown method",
    }
}

fn attribute_name(t: u16) -> Option<&'static str> {
    Some(match t {
        attr::MAPPED_ADDRESS => "MAPPED-ADDRESS",
        attr::USERNAME => "USERNAME",
        attr::MESSAGE_INTEGRITY => "MESSAGE-INTEGRITY",
        attr::ERROR_CODE => "ERROR-CODE",
        attr::UNKNOWN_ATTRIBUTES => "UNKNOWN-ATTRIBUTES",
        attr::CHANNEL_NUMBER => "CHANNEL-NUMBER",
        attr::LIFETIME => "LIFETIME",
        attr::XOR_PEER_ADDRESS => "XOR-PEER-ADDRESS",
        attr::DATA => "DATA",
        attr::REALM => "REALM",
        attr::NONCE => "NONCE",
        attr::XOR_RELAYED_ADDRESS => "XOR-RELAYED-ADDRESS",
        attr::REQUESTED_ADDRESS_FAMILY => "REQUESTED-ADDRESS-FAMILY",
        attr::EVEN_PORT => "EVEN-PORT",
        attr::REQUESTED_TRANSPORT => "REQUESTED-TRANSPORT",
        attr::DONT_FRAGMENT => "DONT-FRAGMENT",
        attr::MESSAGE_INTEGRITY_SHA256 => "MESSAGE-INTEGRITY-SHA256",
        attr::PASSWORD_ALGORITHM => "PASSWORD-ALGORITHM",
        attr::USERHASH => "USERHASH",
        attr::XOR_MAPPED_ADDRESS => "XOR-MAPPED-ADDRESS",
        attr::RESERVATION_TOKEN => "RESERVATION-TOKEN",
        attr::ADDITIONAL_ADDRESS_FAMILY => "ADDITIONAL-ADDRESS-FAMILY",
        attr::ADDRESS_ERROR_CODE => "ADDRESS-ERROR-CODE",
        attr::PASSWORD_ALGORITHMS => "PASSWORD-ALGORITHMS",
        attr::ALTERNATE_SERVER => "ALTERNATE-SERVER",
        attr::CONNECTION_ID => "CONNECTION-ID",
        attr::SOFTWARE => "SOFTWARE",
        attr::FINGERPRINT => "FINGERPRINT",
        0x0024 => "PRIORITY",
        0x0025 => "USE-CANDIDATE",
        0x8029 => "ICE-CONTROLLED",
        0x802A => "ICE-CONTROLLING",
        _ => return None,
    })
}

/// What an error code means for an operator (RFC 8489 §14.8, RFC 8656 §19, RFC 6062 §6.3).
/// `peers`: the XOR-PEER-ADDRESS values of the request it answers (named for a 403);
/// `signed`: whether that request carried credentials (USERNAME), when known (told apart for
/// a 401).
pub fn error_meaning(code: u16, peers: &[SocketAddr], signed: Option<bool>) -> String {
    match code {
        300 => "try another server: the client should follow ALTERNATE-SERVER (a draining relay)".into(),
        400 => "bad request: the relay could not parse the request or a required attribute is missing".into(),
        401 => match signed {
            Some(false) => "the challenge (REALM, NONCE) to a request without credentials: normal, the client \
                            retries with them"
                .into(),
            Some(true) => "credentials rejected: a wrong password, an unknown user, a realm mismatch or an \
                           expired REST credential"
                .into(),
            None => "unauthenticated: the normal challenge to a request without credentials; with them, a \
                     wrong password, an unknown user or an expired REST credential"
                .into(),
        },
        403 => {
            let who: Vec<String> = peers.iter().map(|p| p.ip().to_string()).collect();
            let who = if who.is_empty() { "the requested peer".to_string() } else { who.join(", ") };
            format!(
                "peer address denied by policy: {who} (denied-peer-ip / allowed-peer-ip, or the relay's own \
                 addresses)"
            )
        }
        420 => {
            "unknown attribute: the request carries a comprehension-required attribute the relay does not know".into()
        }
        437 => "allocation mismatch: an Allocate on a 5-tuple that already has an allocation, or another request \
                on one that has none (expired, or the client's NAT rebound it to a new address)"
            .into(),
        438 => "stale nonce, the client retries with the new NONCE".into(),
        440 => "address family not supported by this relay".into(),
        441 => "wrong credentials: the request is signed by another user than the allocation's".into(),
        442 => "unsupported transport protocol (REQUESTED-TRANSPORT other than UDP, or TCP where not enabled)".into(),
        443 => "peer address family mismatch: the peer's family differs from the relayed address's".into(),
        446 => "connection already exists to that peer (RFC 6062)".into(),
        447 => "connection to the peer timed out or failed (RFC 6062)".into(),
        486 => "allocation quota reached: the user (or the relay) has as many allocations as allowed".into(),
        500 => "server error".into(),
        508 => "insufficient capacity: the relay has no relay port or table room left".into(),
        _ => "unknown error code".into(),
    }
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_an_error_response_and_xor_addresses() {
        let tid = TransactionId([7; 12]);
        let mut buf = [0u8; 256];
        let mut w = uturn_proto::wire::MessageWriter::new(
            &mut buf,
            uturn_proto::wire::Method::CREATE_PERMISSION,
            uturn_proto::wire::Class::Error,
            tid,
        )
        .unwrap();
        w.error_code(403, "Forbidden").unwrap();
        let peer: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        w.xor_address(attr::XOR_PEER_ADDRESS, &peer).unwrap();
        let n = w.finish();
        let d = stun(&buf[..n]).unwrap();
        assert_eq!((d.method, d.class, d.error), ("CreatePermission", "error", Some(403)));
        assert_eq!(d.peers, vec![peer]);
        assert!(error_meaning(403, &d.peers, None).starts_with("peer address denied by policy: 10.1.2.3"));
        assert!(stun(&[0x40, 0, 0, 4, 1, 2, 3, 4]).is_none());
    }
}
