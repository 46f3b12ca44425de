//! The STUN parser: any bytes; a message that parses re-encodes to exactly the same bytes, and
//! every accessor is total on it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uturn_proto::wire::{attr, integrity, Message, MessageWriter};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::parse(data) else { return };
    let mut buf = vec![0u8; data.len() + 8];
    let mut w = MessageWriter::new(&mut buf, m.method(), m.class(), m.transaction_id()).unwrap();
    for a in m.raw_attributes() {
        w.raw(&a).unwrap();
    }
    let n = w.finish();
    assert_eq!(&buf[..n], data, "a parsed message re-encodes to the same bytes");
    let _ = (m.username(), m.realm(), m.nonce(), m.unknown_required());
    let _ = m.xor_address(attr::XOR_PEER_ADDRESS);
    let _ = m.u32_attr(attr::LIFETIME);
    let _ = m.peer_addresses().count();
    if let Some(p) = m.integrity_parts() {
        let _ = integrity::verify(&[0u8; 16], &p);
    }
});
