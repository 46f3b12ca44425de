//! Sockets in another network namespace: the XDP benchmark (scripts/bench-xdp.sh) runs the
//! generator in a client namespace and needs its peer sockets in the peer namespace, across the
//! relay, so that every relayed datagram crosses real (veth) interfaces.
//!
//! A socket belongs to the namespace it was created in, whichever thread later uses it, so a
//! short-lived thread enters the namespace (`setns` changes only the calling thread's), binds,
//! and hands the socket back.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Binds a UDP socket to `addr` inside the network namespace `name` (`/run/netns/NAME`, as
/// `ip netns add` makes it). Needs CAP_SYS_ADMIN.
pub fn bind_udp_in(name: &str, addr: SocketAddr) -> io::Result<UdpSocket> {
    let path = format!("/run/netns/{name}");
    let ns = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: `ns` is an open namespace file for the duration of the call; setns with
            // CLONE_NEWNET moves only this thread, which ends right after binding.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            UdpSocket::bind(addr)
        })
        .join()
        .map_err(|_| io::Error::other("setns thread panicked"))?
    })
}
