//! The few raw system calls the workers need beyond socket2 and io-uring: an eventfd to wake a
//! worker, and conversions between `SocketAddr` and the kernel's sockaddr layouts.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};

/// An eventfd that wakes a worker blocked in io_uring or epoll, and whether it is blocked.
///
/// The worker calls [`sleeping(true)`](Self::sleeping), then checks its queue, then blocks; a
/// sender queues, then calls [`wake_if_sleeping`](Self::wake_if_sleeping). Both sides put a
/// SeqCst fence between their write and their read, so either the worker sees the message or
/// the sender sees the flag: no wake-up is lost, and an awake worker costs no `write`.
#[derive(Debug)]
pub(crate) struct Waker {
    fd: OwnedFd,
    asleep: AtomicBool,
}

impl Waker {
    /// Creates a non-blocking eventfd.
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a negative return is an error, anything else a new fd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Waker { fd: unsafe { OwnedFd::from_raw_fd(fd) }, asleep: AtomicBool::new(false) })
    }

    /// The worker is about to block (`true`; check the queue after this) or has woken.
    pub(crate) fn sleeping(&self, asleep: bool) {
        self.asleep.store(asleep, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Wakes the worker if it is (about to be) blocked. Call after queueing.
    pub(crate) fn wake_if_sleeping(&self) {
        fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst) {
            self.wake();
        }
    }

    /// Adds 1 to the counter, making the fd readable.
    pub(crate) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an fd we own; failure (counter overflow,
        // EAGAIN) only means the fd is already readable.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter (epoll backend; the io_uring backend reads it through the ring).
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live local from an fd we own; non-blocking.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Raises the soft limit on open files to the hard limit (one socket per allocation) and
/// returns the new soft limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads only the local struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur as u64)
}

/// The current soft limit on open files (RLIMIT_NOFILE), or `None` if it cannot be read.
pub(crate) fn fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the local struct.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim.rlim_cur as u64)
}

/// A sockaddr for IPv4 or IPv6, with a stable address while it lives in a send slot.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) union RawSockAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl RawSockAddr {
    pub(crate) fn zeroed() -> Self {
        RawSockAddr {
            v6: libc::sockaddr_in6 {
                sin6_family: 0,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
                sin6_scope_id: 0,
            },
        }
    }

    /// Stores `addr`, returning the length to give the kernel.
    pub(crate) fn set(&mut self, addr: &SocketAddr) -> libc::socklen_t {
        match addr {
            SocketAddr::V4(a) => {
                self.v4 = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                    sin_zero: [0; 8],
                };
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            SocketAddr::V6(a) => {
                self.v6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                    sin6_scope_id: a.scope_id(),
                };
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }

    pub(crate) fn as_ptr(&mut self) -> *mut libc::c_void {
        (self as *mut Self).cast()
    }
}

/// Decodes the kernel's sockaddr bytes (as io_uring's recvmsg multishot returns them).
pub(crate) fn sockaddr_from_bytes(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*b.first()?, *b.get(1)?]) as i32;
    let port = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
    match family {
        libc::AF_INET => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 => {
            let flow = u32::from_ne_bytes(b.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(b.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flow, scope)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trip() {
        for a in ["127.0.0.1:3478", "[::1]:49152"] {
            let addr: SocketAddr = a.parse().unwrap();
            let mut raw = RawSockAddr::zeroed();
            let len = raw.set(&addr) as usize;
            let bytes: [u8; 28] = raw_bytes(&raw);
            assert_eq!(sockaddr_from_bytes(&bytes[..len]), Some(addr));
        }
    }

    fn raw_bytes(raw: &RawSockAddr) -> [u8; 28] {
        let mut out = [0u8; 28];
        // Read back through the IPv6 view of the union, field by field.
        // SAFETY: both views are plain integers; every bit pattern is valid.
        let v6 = unsafe { raw.v6 };
        out[0..2].copy_from_slice(&v6.sin6_family.to_ne_bytes());
        out[2..4].copy_from_slice(&v6.sin6_port.to_ne_bytes());
        out[4..8].copy_from_slice(&v6.sin6_flowinfo.to_ne_bytes());
        out[8..24].copy_from_slice(&v6.sin6_addr.s6_addr);
        out[24..28].copy_from_slice(&v6.sin6_scope_id.to_ne_bytes());
        out
    }
}
