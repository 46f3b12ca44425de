//! Bursts of equal-size datagrams, like the packets of a video frame, in both directions and
//! in both framings (ChannelData, and Send/Data indications): every datagram arrives whole and
//! in order. On the io_uring backend such runs leave as UDP GSO sends (one `sendmsg` with
//! `UDP_SEGMENT`); the test also runs it with GSO turned off (`UTURN_GSO=0`) and on epoll.

use std::ffi::{c_int, c_void};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use uturn_tests::uturn_proto::wire::{attr, Message, Method};
use uturn_tests::{peer_socket, Client, Relay};

const BURSTS: usize = 20;
const PER_BURST: usize = 48;
const SIZE: usize = 1000;

/// Payload `i` of a burst: `SIZE` bytes (the last of each burst shorter, as a frame's last
/// packet is), led by its index so order and content can be checked.
fn payload(i: usize) -> Vec<u8> {
    let len = if i % PER_BURST == PER_BURST - 1 { SIZE / 3 } else { SIZE };
    let mut p = vec![(i % 251) as u8; len];
    p[..8].copy_from_slice(&(i as u64).to_be_bytes());
    p
}

/// What the client receives from `peer`: the payload of a ChannelData message on `channel`, or
/// of a Data indication from `peer`.
fn client_payload(d: &[u8], channel: Option<u16>, peer: SocketAddr) -> Option<Vec<u8>> {
    match channel {
        Some(ch) => (d.len() >= 4 && d[..2] == ch.to_be_bytes()).then(|| d[4..].to_vec()),
        None => {
            let m = Message::parse(d).ok()?;
            if m.method() != Method::DATA || m.xor_address(attr::XOR_PEER_ADDRESS)?.ok()? != peer {
                return None;
            }
            m.get(attr::DATA).map(|v| v.to_vec())
        }
    }
}

fn bursts_arrive_whole_and_in_order(backend: &str, env: &[(&str, &str)]) -> String {
    let mut relay = Relay::start_with_env(backend, "", &[], env);
    let mut c = Client::new(relay.addr, "demo", "demo", "uturn.local");
    let relayed = c.allocate();
    let (chan_peer, ind_peer) = (peer_socket(), peer_socket());
    let (chan_addr, ind_addr) = (chan_peer.local_addr().unwrap(), ind_peer.local_addr().unwrap());
    assert_eq!(c.channel_bind(0x4001, chan_addr).code(), None);
    assert_eq!(c.create_permission(&[ind_addr]).code(), None);
    let mut buf = vec![0u8; 2048];
    for (channel, peer, peer_addr) in [(Some(0x4001u16), &chan_peer, chan_addr), (None, &ind_peer, ind_addr)] {
        let label = format!("{backend} {env:?} {}", if channel.is_some() { "ChannelData" } else { "indications" });
        for b in 0..BURSTS {
            let range = b * PER_BURST..(b + 1) * PER_BURST;
            // Client -> peer: the burst goes out back to back, then the peer reads it.
            for i in range.clone() {
                match channel {
                    Some(ch) => c.send_channel_data(ch, &payload(i)),
                    None => c.send_indication(peer_addr, &payload(i)),
                }
            }
            for i in range.clone() {
                let (n, from) = peer.recv_from(&mut buf).unwrap_or_else(|e| panic!("{label}: datagram {i} lost: {e}"));
                assert_eq!(from, relayed, "{label}");
                assert_eq!(&buf[..n], &payload(i)[..], "{label}: datagram {i} to the peer");
            }
            // Peer -> client.
            for i in range.clone() {
                peer.send_to(&payload(i), relayed).unwrap();
            }
            for i in range {
                let got = loop {
                    let d = c.recv().unwrap_or_else(|| panic!("{label}: datagram {i} to the client lost"));
                    if let Some(p) = client_payload(&d, channel, peer_addr) {
                        break p;
                    }
                };
                assert_eq!(got, payload(i), "{label}: datagram {i} to the client");
            }
        }
    }
    let status = relay.terminate(Duration::from_secs(2)).expect("stops");
    assert!(status.success());
    let log = relay.log();
    assert!(!log.contains("panicked"), "{log}");
    log
}

/// The `gso_datagrams=` total from the workers' exit lines.
fn gso_datagrams(log: &str) -> u64 {
    log.lines().filter_map(|l| l.split("gso_datagrams=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok()).sum()
}

/// `SOL_UDP` and `UDP_SEGMENT` (linux/udp.h).
const SOL_UDP: c_int = 17;
const UDP_SEGMENT: c_int = 103;

extern "C" {
    fn setsockopt(fd: c_int, level: c_int, name: c_int, value: *const c_void, len: u32) -> c_int;
}

/// Whether this kernel does UDP GSO on loopback, as the relay's sends need it: a socket with
/// `UDP_SEGMENT` set sends one 2.5-segment buffer, and the receiver must get it cut into
/// datagrams of the segment size. `Err` (the reason) only where the kernel lacks it: no
/// `UDP_SEGMENT` option (before 4.18), or the GSO send refused with the errors the relay treats
/// as "no GSO here" (EIO, EINVAL, EOPNOTSUPP). Anything else fails the test.
fn kernel_udp_gso() -> Result<(), String> {
    const SEGMENT: usize = 1000;
    const ENOPROTOOPT: i32 = 92;
    const EINVAL: i32 = 22;
    const EIO: i32 = 5;
    const EOPNOTSUPP: i32 = 95;
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let size = SEGMENT as c_int;
    // SAFETY: a valid socket, and a pointer to a live c_int with its exact size.
    let rc = unsafe {
        setsockopt(
            tx.as_raw_fd(),
            SOL_UDP,
            UDP_SEGMENT,
            (&size as *const c_int).cast(),
            std::mem::size_of::<c_int>() as u32,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(ENOPROTOOPT | EINVAL)) {
            return Err(format!("setsockopt(SOL_UDP, UDP_SEGMENT): {e}"));
        }
        panic!("GSO probe: setsockopt(SOL_UDP, UDP_SEGMENT) failed unexpectedly: {e}");
    }
    let sent = vec![7u8; SEGMENT * 5 / 2];
    if let Err(e) = tx.send_to(&sent, rx.local_addr().unwrap()) {
        if matches!(e.raw_os_error(), Some(EIO | EINVAL | EOPNOTSUPP)) {
            return Err(format!("a GSO send on loopback: {e}"));
        }
        panic!("GSO probe: the send failed unexpectedly: {e}");
    }
    let mut buf = vec![0u8; 65536];
    let mut lens = Vec::new();
    while lens.iter().sum::<usize>() < sent.len() {
        let (n, _) = rx.recv_from(&mut buf).unwrap_or_else(|e| panic!("GSO probe: receive after {lens:?}: {e}"));
        lens.push(n);
    }
    assert_eq!(lens, [SEGMENT, SEGMENT, SEGMENT / 2], "GSO probe: how a {}-byte GSO send arrived", sent.len());
    Ok(())
}

#[test]
fn uring_with_gso() {
    if let Err(why) = kernel_udp_gso() {
        eprintln!("SKIP uring_with_gso: this kernel has no usable UDP GSO on loopback ({why})");
        return;
    }
    let log = bursts_arrive_whole_and_in_order("uring", &[]);
    // The probe above showed the kernel does UDP GSO on loopback: a relay that fell back to
    // sending one by one is a failure here, not a pass.
    assert!(
        !log.contains("refused a UDP GSO send"),
        "the kernel does UDP GSO (probed), yet the relay fell back to single sends:\n{log}"
    );
    // 2 framings x 2 directions x 20 bursts of 48: some of them reach a worker in one batch.
    assert!(gso_datagrams(&log) > 0, "no GSO run was sent:\n{log}");
}

#[test]
fn uring_without_gso() {
    let log = bursts_arrive_whole_and_in_order("uring", &[("UTURN_GSO", "0")]);
    assert_eq!(gso_datagrams(&log), 0, "{log}");
}

#[test]
fn epoll() {
    bursts_arrive_whole_and_in_order("epoll", &[]);
}
