//! UDP sockets: per-worker SO_REUSEPORT listeners and per-allocation relay sockets (socket2).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};

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

/// Binds one worker's TCP listener on `addr` with SO_REUSEPORT (TURN over TCP or TLS, RFC 8656
/// §3.1): the kernel spreads new connections over the workers' listeners, and each connection
/// stays with the worker that accepted it. Non-blocking, backlog 1024.
pub fn bind_stream_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
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

/// Attaches to `socket`'s SO_REUSEPORT group a classic BPF program that returns the id of the
/// CPU the datagram arrived on, modulo `workers` (SO_ATTACH_REUSEPORT_CBPF, socket(7)): the
/// kernel then hands each datagram to the group's socket with that index, which is worker
/// `cpu % workers`'s (workers bind their listeners in index order and are pinned to cores in
/// the same order). For hosts whose NIC queues are pinned one per core; a client's 5-tuple then
/// stays on one worker only while its flow stays on one RSS queue. The program applies to the
/// whole group, so attaching it once per listen address is enough.
pub fn attach_reuseport_cpu(socket: &UdpSocket, workers: usize) -> io::Result<()> {
    let n = workers.max(1) as u32;
    // ld #cpu (ancillary SKF_AD_CPU); mod #n; ret a
    let mut prog = [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
        },
        libc::sock_filter { code: (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16, jt: 0, jf: 0, k: n },
        libc::sock_filter { code: (libc::BPF_RET | libc::BPF_A) as u16, jt: 0, jf: 0, k: 0 },
    ];
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_mut_ptr() };
    // SAFETY: `fprog` points at `prog`, both live for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The IP addresses of this host's interfaces now (getifaddrs(3)), IPv4 and IPv6, loopback
/// included: what a listener on 0.0.0.0 or :: answers on (the peer policy denies them as the
/// relay's own addresses, docs/security.md).
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list it allocated into `head`; it is freed below, once.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` points at a sockaddr whose family says its real type and size.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once; no reference into it outlives this.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses_include_loopback() {
        let ips = local_addresses().unwrap();
        assert!(ips.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{ips:?}");
    }

    #[test]
    fn a_cpu_steering_program_attaches_to_a_reuseport_group() {
        let a = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let b = bind_listener(addr).unwrap();
        attach_reuseport_cpu(&a, 2).unwrap();
        // Every datagram lands on the socket of index cpu % 2, so both together receive all.
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..20 {
            tx.send_to(b"x", addr).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut buf = [0u8; 4];
        let mut got = 0;
        for s in [&a, &b] {
            while s.recv_from(&mut buf).is_ok() {
                got += 1;
            }
        }
        assert_eq!(got, 20);
    }
}
