//! Passing sockets to another process (hot upgrade): file descriptors over a Unix stream socket
//! as SCM_RIGHTS ancillary data (unix(7)). The receiving process gets new descriptors for the
//! same open sockets, so their queued datagrams and their SO_REUSEPORT group membership move
//! with them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Descriptors sent per message; the kernel caps one message at 253 (SCM_MAX_FD).
pub const FDS_PER_MESSAGE: usize = 200;

/// Bytes of control buffer for `n` descriptors (CMSG_SPACE), as u64s for alignment.
fn cmsg_words(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let bytes = unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) } as usize;
    bytes.div_ceil(8)
}

/// A message header with one data byte (`iov`) and the control buffer `cbuf`; both must outlive
/// the header's use.
fn header(iov: &mut libc::iovec, cbuf: &mut [u64]) -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(cbuf);
    msg
}

/// Sends `fds` over `stream`, [`FDS_PER_MESSAGE`] per message, each message carrying one data
/// byte (a stream socket carries ancillary data only with data).
pub fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        let mut cbuf = vec![0u64; cmsg_words(chunk.len())];
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        let msg = header(&mut iov, &mut cbuf);
        let data_len = std::mem::size_of_val(chunk);
        // SAFETY: `msg` points at `cbuf`, which is CMSG_SPACE(data_len) bytes or more, so
        // CMSG_FIRSTHDR is non-null and the header plus `data_len` bytes fit inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len as u32) as usize;
            std::ptr::copy_nonoverlapping(chunk.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), data_len);
        }
        // SAFETY: every pointer in `msg` (iov, byte, cbuf) is valid for the call's duration.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n != 1 {
            return Err(io::Error::other("sendmsg sent no data byte"));
        }
    }
    Ok(())
}

/// Receives exactly `count` descriptors sent by [`send_fds`] (close-on-exec set). Errors on EOF
/// or a message with a truncated control buffer.
pub fn recv_fds(stream: &UnixStream, count: usize) -> io::Result<Vec<OwnedFd>> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let want = (count - out.len()).min(FDS_PER_MESSAGE);
        let mut cbuf = vec![0u64; cmsg_words(want)];
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        let mut msg = header(&mut iov, &mut cbuf);
        // SAFETY: `msg` points at live buffers for the call's duration.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the sender closed before every socket came"));
        }
        let before = out.len();
        // SAFETY: the kernel filled `msg.msg_control` with well-formed cmsgs within
        // `msg_controllen`; CMSG_FIRSTHDR/CMSG_NXTHDR stay inside it, and each SCM_RIGHTS
        // payload holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors now owned by this process.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let n = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..n {
                        out.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("control data truncated: descriptors lost"));
        }
        if out.len() == before {
            return Err(io::Error::other("a handover message carried no descriptor"));
        }
    }
    Ok(out)
}

/// Clears close-on-exec on `fd`, so a process started next inherits it (the old process's
/// handover socket; it is dropped right after the spawn).
pub fn inheritable(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor the caller owns; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of the inherited descriptor `fd` (named in the environment by the process
/// that started this one) as a Unix stream, close-on-exec again. Errors when `fd` is not an open
/// Unix stream socket.
pub fn inherited_stream(fd: RawFd) -> io::Result<UnixStream> {
    // SAFETY: fcntl only reads the descriptor's flags; an fd that is not open fails with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open, was left to this process by its parent for exactly this
    // use, and nothing else here owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on a descriptor this process now owns.
    if unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let s = UnixStream::from(owned);
    s.peer_addr()?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn sockets_cross_with_their_queued_datagrams() {
        let (a, b) = UnixStream::pair().unwrap();
        let socks: Vec<UdpSocket> = (0..450).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"queued", socks[449].local_addr().unwrap()).unwrap();
        let fds: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).collect();
        send_fds(&a, &fds).unwrap();
        let got = recv_fds(&b, fds.len()).unwrap();
        assert_eq!(got.len(), 450, "three messages of at most {FDS_PER_MESSAGE}");
        let moved: Vec<UdpSocket> = got.into_iter().map(UdpSocket::from).collect();
        for (s, m) in socks.iter().zip(&moved) {
            assert_eq!(s.local_addr().unwrap(), m.local_addr().unwrap());
        }
        drop(socks);
        let mut buf = [0u8; 16];
        moved[449].set_read_timeout(Some(std::time::Duration::from_secs(1))).unwrap();
        let (n, _) = moved[449].recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"queued");
        drop(a);
        assert!(recv_fds(&b, 1).is_err(), "EOF is an error");
    }
}
