//! The io_uring capability probe: what the backend needs of the kernel, checked once at start.

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::types::{Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, IoUring};

use super::NAME_LEN;
use crate::bufring::BufRing;

/// Checks that this kernel and process can run the io_uring backend: a ring can be created
/// (seccomp may forbid it), a provided-buffer ring registers (5.19+), and a multishot RecvMsg
/// (6.0+) really delivers a datagram sent to a loopback socket.
pub fn probe() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut p = io_uring::Probe::new();
    ring.submitter().register_probe(&mut p).map_err(|e| format!("io_uring probe: {e}"))?;
    for (op, name) in
        [(opcode::RecvMsg::CODE, "RecvMsg"), (opcode::Send::CODE, "Send"), (opcode::AsyncCancel::CODE, "AsyncCancel")]
    {
        if !p.is_supported(op) {
            return Err(format!("io_uring opcode {name} unsupported"));
        }
    }
    let bufs = BufRing::new(&ring, 8, 256, 1).map_err(|e| format!("provided-buffer ring: {e} (needs Linux 5.19+)"));
    let result = bufs.and_then(|_bufs| probe_multishot(ring));
    result
}

/// Arms a multishot RecvMsg on a loopback socket, sends it one datagram and waits (at most 1 s)
/// for the completion. Consumes the ring so it is gone before the caller frees the buffers.
fn probe_multishot(mut ring: IoUring) -> Result<(), String> {
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("probe socket: {e}"))?;
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_namelen = NAME_LEN as libc::socklen_t;
    let sqe = opcode::RecvMsgMulti::new(Fd(sock.as_raw_fd()), &hdr as *const _, 1).build().user_data(1);
    // SAFETY: `hdr` and the buffer group outlive the operation: the ring is dropped at the end
    // of this function, before `hdr`, and the caller keeps the buffers alive past that.
    unsafe { ring.submission().push(&sqe) }.map_err(|_| "probe: SQ full".to_string())?;
    ring.submit().map_err(|e| format!("probe submit: {e}"))?;
    sock.send_to(b"uturn io_uring probe", sock.local_addr().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let ts = Timespec::from(Duration::from_secs(1));
    let args = SubmitArgs::new().timespec(&ts);
    let _ = ring.submitter().submit_with_args(1, &args);
    let cqe = ring.completion().next().ok_or("multishot RecvMsg gave no completion (needs Linux 6.0+)")?;
    if cqe.result() < 0 {
        return Err(format!("multishot RecvMsg failed: {}", io::Error::from_raw_os_error(-cqe.result())));
    }
    if cqueue::buffer_select(cqe.flags()).is_none() {
        return Err("multishot RecvMsg did not select a provided buffer".into());
    }
    drop(ring);
    Ok(())
}
