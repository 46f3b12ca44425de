//! RFC 5769 test vectors through the wire code: parse, verify MESSAGE-INTEGRITY and FINGERPRINT,
//! decode addresses, and re-encode each message byte for byte.

use std::net::SocketAddr;

use uturn_proto::wire::{attr, integrity, Class, IntegrityKey, Message, MessageWriter, Method};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

const REQUEST: &str = "00010058 2112a442 b7e7a701 bc34d686 fa87dfae
80220010 5354554e 20746573 7420636c 69656e74
00240004 6e0001ff
80290008 932ff9b1 51263b36
00060009 6576746a 3a683676 59202020
00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2
80280004 e57a3bcf";

const IPV4_RESPONSE: &str = "0101003c 2112a442 b7e7a701 bc34d686 fa87dfae
8022000b 74657374 20766563 746f7220
00200008 0001a147 e112a643
00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7
80280004 c07d4c96";

const IPV6_RESPONSE: &str = "01010048 2112a442 b7e7a701 bc34d686 fa87dfae
8022000b 74657374 20766563 746f7220
00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9
00080014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
80280004 c8fb0b4c";

const LONG_TERM_REQUEST: &str = "00010060 2112a442 78ad3433 c6ad72c0 29da412e
00060012 e3839ee3 8388e383 aae38383 e382afe3 82b90000
0015001c 662f2f34 39396b39 35346436 4f4c3334 6f4c3946 53547679 36347341
0014000b 6578616d 706c652e 6f726700
00080014 f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666";

const SHORT_TERM_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

/// Rebuilds `msg` from its attributes before MESSAGE-INTEGRITY (kept byte for byte, padding
/// included), then recomputes MESSAGE-INTEGRITY with `key` and FINGERPRINT when the original had it.
fn reencode(msg: &Message<'_>, key: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 1024];
    let mut w = MessageWriter::new(&mut buf, msg.method(), msg.class(), msg.transaction_id()).unwrap();
    for a in msg.attributes() {
        w.raw(&a).unwrap();
    }
    w.integrity(key).unwrap();
    if msg.raw_attributes().any(|a| a.typ == attr::FINGERPRINT) {
        w.fingerprint().unwrap();
    }
    let n = w.finish();
    buf.truncate(n);
    buf
}

#[test]
fn sample_request_short_term() {
    let bytes = hex(REQUEST);
    let msg = Message::parse(&bytes).expect("vector 2.1 parses and its FINGERPRINT verifies");
    assert_eq!((msg.method(), msg.class()), (Method::BINDING, Class::Request));
    assert_eq!(msg.username(), Some(&b"evtj:h6vY"[..]));
    assert_eq!(msg.get(attr::SOFTWARE), Some(&b"STUN test client"[..]));
    // PRIORITY (0x0024) is an ICE attribute a TURN server does not understand.
    assert_eq!(msg.unknown_required(), &[0x0024]);
    assert!(integrity::verify(SHORT_TERM_PASSWORD, &msg.integrity_parts().unwrap()));
    assert!(!integrity::verify(b"wrong", &msg.integrity_parts().unwrap()));
    assert_eq!(reencode(&msg, SHORT_TERM_PASSWORD), bytes);
}

#[test]
fn sample_ipv4_response() {
    let bytes = hex(IPV4_RESPONSE);
    let msg = Message::parse(&bytes).unwrap();
    assert_eq!((msg.method(), msg.class()), (Method::BINDING, Class::Success));
    let mapped = msg.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap();
    assert_eq!(mapped, "192.0.2.1:32853".parse::<SocketAddr>().unwrap());
    assert!(integrity::verify(SHORT_TERM_PASSWORD, &msg.integrity_parts().unwrap()));
    assert_eq!(reencode(&msg, SHORT_TERM_PASSWORD), bytes);
}

#[test]
fn sample_ipv6_response() {
    let bytes = hex(IPV6_RESPONSE);
    let msg = Message::parse(&bytes).unwrap();
    let mapped = msg.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap();
    assert_eq!(mapped, "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse::<SocketAddr>().unwrap());
    assert!(integrity::verify(SHORT_TERM_PASSWORD, &msg.integrity_parts().unwrap()));
    assert_eq!(reencode(&msg, SHORT_TERM_PASSWORD), bytes);
}

#[test]
fn sample_request_long_term() {
    let bytes = hex(LONG_TERM_REQUEST);
    let msg = Message::parse(&bytes).unwrap();
    let username = std::str::from_utf8(msg.username().unwrap()).unwrap();
    assert_eq!(username, "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}");
    assert_eq!(msg.nonce(), Some(&b"f//499k954d6OL34oL9FSTvy64sA"[..]));
    assert_eq!(msg.realm(), Some(&b"example.org"[..]));
    let key = IntegrityKey::long_term(username, "example.org", "The\u{00AD}M\u{00AA}tr\u{2168}");
    assert_eq!(key, IntegrityKey::long_term(username, "example.org", "TheMatrIX"));
    assert!(integrity::verify(key.as_bytes(), &msg.integrity_parts().unwrap()));
    assert_eq!(reencode(&msg, key.as_bytes()), bytes);
}

#[test]
fn corrupted_fingerprint_is_rejected() {
    let mut bytes = hex(REQUEST);
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    assert_eq!(Message::parse(&bytes).unwrap_err(), uturn_proto::wire::ParseError::BadFingerprint);
}

#[test]
fn corrupted_body_fails_integrity() {
    let bytes = hex(LONG_TERM_REQUEST);
    let mut bad = bytes.clone();
    bad[30] ^= 0x01; // inside USERNAME
    let msg = Message::parse(&bad).unwrap();
    let key = IntegrityKey::long_term("\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}", "example.org", "TheMatrIX");
    assert!(!integrity::verify(key.as_bytes(), &msg.integrity_parts().unwrap()));
}
