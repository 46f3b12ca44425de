//! Client connections on io_uring (TURN over TCP and TLS): one multishot `Accept` per TCP
//! listener, one multishot `Recv` per connection drawing from the same provided-buffer ring as
//! the datagram sockets, and at most one `Send` in flight per connection, from a buffer the
//! backend owns until its completion (so a connection closed meanwhile never frees memory the
//! kernel still reads). What queues behind a send waits in the connection's own bounded queue.

use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::Instant;

use io_uring::opcode;
use io_uring::types::Fd;

use super::{tag, UringIo, BGID, GEN_MASK, KIND_ACCEPT, KIND_CANCEL, KIND_STREAM_RECV, KIND_STREAM_SEND};
use crate::core::WorkerCore;
use crate::stream::{AcceptBackoff, CloseReason, ConnId};

/// Send buffers kept for reuse up to this capacity, bytes; larger ones are freed once sent.
const KEEP_SEND_CAPACITY: usize = 64 * 1024;

/// The send in flight on one connection slot.
#[derive(Default)]
pub(super) struct StreamSend {
    buf: Vec<u8>,
    /// Bytes of `buf` the kernel has written.
    done: usize,
    /// The generation of the connection it writes for.
    generation: u32,
    busy: bool,
}

fn conn_tag(kind: u64, id: ConnId) -> u64 {
    tag(kind, ((id.generation & GEN_MASK) as u64) << 32 | id.index as u64)
}

fn untag(low: u64) -> (u32, u32) {
    ((low & 0xFFFF_FFFF) as u32, (low >> 32) as u32)
}

impl UringIo {
    /// Arms the multishot accept of TCP listener `i`.
    pub(super) fn arm_accept(&mut self, i: usize) {
        let ud = tag(KIND_ACCEPT, i as u64);
        self.armed.insert(ud);
        let sqe = opcode::AcceptMulti::new(Fd(self.stream_listener_fds[i]))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(ud);
        self.push_or_retry(sqe);
    }

    pub(super) fn arm_stream_recv(&mut self, id: ConnId, fd: RawFd) {
        let ud = conn_tag(KIND_STREAM_RECV, id);
        self.armed.insert(ud);
        let sqe = opcode::RecvMulti::new(Fd(fd), BGID).build().user_data(ud);
        self.push_or_retry(sqe);
    }

    /// Ends connection `id`'s multishot receive (backpressure); its last completion does not
    /// re-arm it while the connection is paused.
    pub(super) fn cancel_stream_recv(&mut self, id: ConnId) {
        let ud = conn_tag(KIND_STREAM_RECV, id);
        if self.armed.contains(&ud) {
            let sqe = opcode::AsyncCancel::new(ud).build().user_data(tag(KIND_CANCEL, 0));
            self.push_or_retry(sqe);
        }
    }

    /// Arms connection `id`'s receive again unless it is still armed (a cancelled one that has
    /// not ended re-arms itself at its last completion, the connection being unpaused).
    pub(super) fn rearm_stream_recv(&mut self, id: ConnId, fd: RawFd) {
        if !self.armed.contains(&conn_tag(KIND_STREAM_RECV, id)) {
            self.arm_stream_recv(id, fd);
        }
    }

    /// True while a connection send is in flight.
    pub(super) fn stream_sends_busy(&self) -> bool {
        self.stream_sends.iter().any(|s| s.busy)
    }

    /// Submits the next send of connection `id` (its whole queue), unless one is in flight.
    fn start_stream_send(&mut self, core: &mut WorkerCore, id: ConnId) {
        let i = id.index as usize;
        if self.stream_sends.len() <= i {
            self.stream_sends.resize_with(i + 1, StreamSend::default);
        }
        if self.stream_sends[i].busy {
            return;
        }
        let Some(c) = core.streams.get_mut(id) else { return };
        if c.out.is_empty() {
            return;
        }
        let fd = c.socket.as_raw_fd();
        let s = &mut self.stream_sends[i];
        s.buf.clear();
        std::mem::swap(&mut s.buf, &mut c.out);
        c.in_flight += s.buf.len();
        s.done = 0;
        s.generation = id.generation;
        s.busy = true;
        self.submit_stream_send(i, fd);
    }

    fn submit_stream_send(&mut self, i: usize, fd: RawFd) {
        let s = &self.stream_sends[i];
        let id = ConnId { index: i as u32, generation: s.generation };
        // SAFETY (of the pointer): `buf` belongs to this backend and is neither touched nor
        // freed until this send's completion (`busy`).
        let sqe = opcode::Send::new(Fd(fd), s.buf[s.done..].as_ptr(), (s.buf.len() - s.done) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(conn_tag(KIND_STREAM_SEND, id));
        if !self.push(&sqe) {
            // Not queued: nothing is in flight; the connection is closed by the caller's next
            // sweep as stalled if this keeps happening.
            let s = &mut self.stream_sends[i];
            s.busy = false;
            s.buf.clear();
        }
    }
}

/// Starts a send on every connection the core queued bytes for.
pub(super) fn flush_streams(core: &mut WorkerCore, io: &mut UringIo) {
    if core.streams.dirty.is_empty() {
        return;
    }
    for id in std::mem::take(&mut core.streams.dirty) {
        if let Some(c) = core.streams.get_mut(id) {
            c.dirty = false;
            io.start_stream_send(core, id);
        }
    }
}

/// A completion of TCP listener `i`'s multishot accept: `res` is the new descriptor.
pub(super) fn on_accept(core: &mut WorkerCore, io: &mut UringIo, now: Instant, ud: u64, res: i32, more: bool) {
    let i = (ud & 0xFFFF_FFFF) as usize;
    // Out of descriptors (or memory): the multishot accept ended, and armed again at once it
    // would fail again at once for as long as a connection waits in the backlog (a busy loop).
    // It is armed again after a backoff instead (`retry_accepts`).
    let starved = res < 0 && AcceptBackoff::is_resource_error(-res);
    if !more {
        io.armed.remove(&ud);
        if starved {
            core.streams.defer_accept(core.index, i, now, -res);
        } else if !io.freezing && i < io.stream_listener_fds.len() {
            io.arm_accept(i);
        }
    }
    if res < 0 {
        return;
    }
    // SAFETY: a successful accept completion hands this process a new descriptor that nothing
    // else owns; `TcpStream` takes ownership and closes it on drop.
    let socket = unsafe { TcpStream::from_raw_fd(res) };
    let fd = socket.as_raw_fd();
    if let Some(id) = core.on_accept(now, i, socket) {
        io.arm_stream_recv(id, fd);
    }
}

/// Arms again the accepts put off for want of descriptors whose backoff has passed.
pub(super) fn retry_accepts(core: &mut WorkerCore, io: &mut UringIo, now: Instant) {
    for i in core.streams.accept_backoff.take_due(now) {
        let ud = tag(KIND_ACCEPT, i as u64);
        if !io.freezing && i < io.stream_listener_fds.len() && !io.armed.contains(&ud) {
            io.arm_accept(i);
        }
    }
}

/// A completion of a connection's multishot receive: `res` bytes in provided buffer `bid`.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_recv(
    core: &mut WorkerCore,
    io: &mut UringIo,
    now: Instant,
    ud: u64,
    low: u64,
    res: i32,
    more: bool,
    bid: Option<u16>,
) {
    let (index, generation) = untag(low);
    let id = core
        .streams
        .slot_mut(index)
        .filter(|c| c.generation & GEN_MASK == generation)
        .map(|c| ConnId { index, generation: c.generation });
    if !more {
        io.armed.remove(&ud);
    }
    let Some(id) = id else {
        if let Some(b) = bid {
            io.bufs.recycle(b);
        }
        return;
    };
    match (res, bid) {
        (n, Some(b)) if n > 0 => {
            let buf = io.bufs.buf(b);
            // SAFETY: provided buffer `b` is this backend's until it is recycled below; nothing
            // writes it meanwhile (the kernel gave it to this completion), so a slice of it may
            // outlive the borrow of `io` that found it.
            let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr(), n as usize) };
            core.on_stream_data(now, id, bytes, io);
            io.bufs.recycle(b);
        }
        (0, _) => return core.close_connection(now, id, CloseReason::Peer, io),
        (n, b) => {
            if let Some(b) = b {
                io.bufs.recycle(b);
            }
            // Out of provided buffers, or cancelled for backpressure: the multishot ended and is
            // armed again below (unless paused); any other error ends the connection.
            if n < 0 && n != -libc::ENOBUFS && n != -libc::ECANCELED {
                return core.close_connection(now, id, CloseReason::Peer, io);
            }
        }
    }
    if !more && !io.freezing {
        if let Some(c) = core.streams.get_mut(id).filter(|c| !c.paused) {
            let fd = c.socket.as_raw_fd();
            io.arm_stream_recv(id, fd);
        }
    }
}

/// A completion of a connection's send.
pub(super) fn on_send(core: &mut WorkerCore, io: &mut UringIo, now: Instant, low: u64, res: i32) {
    let (index, _) = untag(low);
    let i = index as usize;
    let Some(s) = io.stream_sends.get_mut(i) else { return };
    let generation = s.generation;
    let id = ConnId { index, generation };
    let written = res.max(0) as usize;
    s.done += written;
    let live = core.streams.get_mut(id).map(|c| {
        c.written(written, now);
        c.socket.as_raw_fd()
    });
    if res < 0 {
        if live.is_some() {
            core.close_connection(now, id, CloseReason::Peer, io);
        }
    } else if let (Some(fd), true) = (live, s.done < s.buf.len()) {
        // A short write: the rest goes next.
        io.submit_stream_send(i, fd);
        return;
    }
    let s = &mut io.stream_sends[i];
    s.busy = false;
    s.buf.clear();
    if s.buf.capacity() > KEEP_SEND_CAPACITY {
        s.buf = Vec::new();
    }
    if live.is_some() {
        core.on_written(id, io);
    }
    // Whatever queued meanwhile (on this connection, or a new tenant of the slot) goes now.
    if let Some(c) = core.streams.slot_mut(index) {
        let id = ConnId { index, generation: c.generation };
        io.start_stream_send(core, id);
    }
}
