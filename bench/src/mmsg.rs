//! Batched UDP I/O with `recvmmsg(2)` / `sendmmsg(2)`: one system call moves up to
//! [`BATCH`] datagrams, and the buffers are allocated once.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams per system call.
pub const BATCH: usize = 64;
/// Bytes per datagram buffer.
pub const BUF: usize = 2048;

fn to_storage(addr: &SocketAddr) -> (libc::sockaddr_in6, libc::socklen_t) {
    // SAFETY: sockaddr_in6 is plain data; all-zero is valid.
    let mut out: libc::sockaddr_in6 = unsafe { MaybeUninit::zeroed().assume_init() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in (16 bytes) fits in sockaddr_in6 (28 bytes); both are plain data.
            unsafe { std::ptr::write((&mut out as *mut libc::sockaddr_in6).cast::<libc::sockaddr_in>(), sin) };
            (out, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            out.sin6_port = a.port().to_be();
            out.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            out.sin6_flowinfo = a.flowinfo();
            out.sin6_scope_id = a.scope_id();
            (out, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

fn from_storage(s: &libc::sockaddr_in6) -> Option<SocketAddr> {
    match s.sin6_family as i32 {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in here (family AF_INET); it is a prefix of the
            // sockaddr_in6 storage.
            let sin = unsafe { &*(s as *const libc::sockaddr_in6).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(s.sin6_addr.s6_addr),
            u16::from_be(s.sin6_port),
            s.sin6_flowinfo,
            s.sin6_scope_id,
        ))),
        _ => None,
    }
}

/// Buffers for one `recvmmsg` call.
pub struct RecvBatch {
    bufs: Vec<[u8; BUF]>,
    addrs: Vec<libc::sockaddr_in6>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    count: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    /// Allocates [`BATCH`] buffers of [`BUF`] bytes.
    pub fn new() -> Self {
        // SAFETY: sockaddr_in6 and mmsghdr are plain data; all-zero is valid.
        let zero_addr: libc::sockaddr_in6 = unsafe { MaybeUninit::zeroed().assume_init() };
        RecvBatch {
            bufs: vec![[0u8; BUF]; BATCH],
            addrs: vec![zero_addr; BATCH],
            iovs: Vec::with_capacity(BATCH),
            // SAFETY: as above.
            hdrs: (0..BATCH).map(|_| unsafe { MaybeUninit::zeroed().assume_init() }).collect(),
            count: 0,
        }
    }

    /// Receives up to [`BATCH`] datagrams without blocking; returns how many (0 if none).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.iovs.clear();
        for b in self.bufs.iter_mut() {
            self.iovs.push(libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: BUF });
        }
        for i in 0..BATCH {
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at buffers, iovecs and addresses owned by `self` that
        // live across the call; BATCH matches the header count.
        let n = unsafe {
            libc::recvmmsg(fd, self.hdrs.as_mut_ptr(), BATCH as u32, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            self.count = 0;
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        self.count = n as usize;
        Ok(self.count)
    }

    /// Datagrams held from the last receive.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Datagram `i` of the last receive and its source.
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let len = self.hdrs[i].msg_len as usize;
        (&self.bufs[i][..len.min(BUF)], from_storage(&self.addrs[i]))
    }
}

/// Buffers for one `sendmmsg` call; fill with [`push`](Self::push), send with
/// [`flush`](Self::flush).
pub struct SendBatch {
    bufs: Vec<[u8; BUF]>,
    lens: Vec<usize>,
    addrs: Vec<(libc::sockaddr_in6, libc::socklen_t)>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl SendBatch {
    /// Allocates [`BATCH`] buffers of [`BUF`] bytes.
    pub fn new() -> Self {
        SendBatch {
            bufs: vec![[0u8; BUF]; BATCH],
            lens: Vec::with_capacity(BATCH),
            addrs: Vec::with_capacity(BATCH),
            iovs: Vec::with_capacity(BATCH),
            // SAFETY: mmsghdr is plain data; all-zero is valid.
            hdrs: (0..BATCH).map(|_| unsafe { MaybeUninit::zeroed().assume_init() }).collect(),
        }
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// True when another push would overflow.
    pub fn is_full(&self) -> bool {
        self.lens.len() == BATCH
    }

    /// Queues a datagram to `to`; `fill` writes it into a [`BUF`]-byte buffer and returns its
    /// length.
    pub fn push(&mut self, to: &SocketAddr, fill: impl FnOnce(&mut [u8]) -> usize) {
        let i = self.lens.len();
        assert!(i < BATCH, "SendBatch overflow");
        let n = fill(&mut self.bufs[i]).min(BUF);
        self.lens.push(n);
        self.addrs.push(to_storage(to));
    }

    /// Sends everything queued on `fd` (blocking socket semantics as configured); returns the
    /// number of datagrams the kernel took.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.lens.len();
        if n == 0 {
            return Ok(0);
        }
        self.iovs.clear();
        for i in 0..n {
            self.iovs.push(libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: self.lens[i] });
        }
        for i in 0..n {
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i].0 as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = self.addrs[i].1;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
        }
        let mut sent = 0;
        let mut result = Ok(0);
        while sent < n {
            // SAFETY: headers sent..n point at buffers, iovecs and addresses owned by `self`.
            let r = unsafe { libc::sendmmsg(fd, self.hdrs[sent..].as_mut_ptr(), (n - sent) as u32, 0) };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                result = Err(e);
                break;
            }
            sent += r as usize;
        }
        self.lens.clear();
        self.addrs.clear();
        result.map(|_: usize| sent)
    }
}
