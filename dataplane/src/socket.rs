//! UDP sockets: per-worker SO_REUSEPORT listeners and per-allocation relay sockets (socket2).

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// Kernel socket buffer size requested for listeners and relay sockets, bytes. The kernel caps
/// it at net.core.{r,w}mem_max (see scripts/tune-host.sh).
const SOCKET_BUFFER: usize = 4 << 20;

fn udp(addr: &SocketAddr) -> io::Result<Socket> {
    // Non-blocking (and close-on-exec, socket2's default) from the start: no fcntl calls,
    // which count when an allocation is made and deleted thousands of times a second.
    let s = Socket::new(Domain::for_address(*addr), Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    Ok(s)
}

/// Binds one worker's listener on `addr` with SO_REUSEPORT, so every worker binds the same
/// address and the kernel shards client 5-tuples between them (RFC 8656 §2: the 5-tuple stays
/// on one socket, hence one worker).
pub fn bind_listener(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = udp(&addr)?;
    s.set_reuse_port(true)?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Binds a relay socket (an allocation's relayed transport address) on exactly `addr`.
/// EADDRINUSE is returned as is so the caller can try the next port.
pub fn bind_relay(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = udp(&addr)?;
    let _ = s.set_recv_buffer_size(1 << 20);
    s.bind(&addr.into())?;
    Ok(s.into())
}
