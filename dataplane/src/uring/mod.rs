//! The io_uring backend.
//!
//! - Every listener and relay socket has one multishot `RecvMsg` (kernel 6.0+) that draws
//!   buffers from a provided-buffer ring (kernel 5.19+). The kernel writes a 16-byte
//!   `io_uring_recvmsg_out` header and a 32-byte address field before each payload, so the
//!   payload starts at byte 48 = [`PEER_HEADROOM`]: a peer datagram is framed as ChannelData or a
//!   Data indication by writing over those 48 bytes after reading the address, with no copy.
//! - Relayed datagrams are sent with `Send` and a destination address (sendto, kernel 6.0+)
//!   straight from the receive buffer; the buffer goes back to the ring when the send completes.
//!   Replies are copied into the send slot. `Send` rather than `SendMsg` spares the kernel a
//!   msghdr and iovec copy per datagram.
//! - Consecutive relayed datagrams for one destination from one socket (a video frame's
//!   packets) are sent as one `SendMsg` with `UDP_SEGMENT` (see `gso.rs`). If the kernel
//!   refuses GSO on this host, the worker logs it once and sends datagrams one by one;
//!   `UTURN_GSO=0` in the environment turns it off from the start.
//! - Listener and relay sockets are registered files (a fixed-file table), so no operation takes
//!   a file reference per datagram. Sockets past the table's size fall back to plain fds.
//! - Submissions are batched: one `io_uring_enter` per loop iteration submits every send queued
//!   while processing the previous batch of completions and waits for the next.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::types::{Fd, Fixed, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use tracing::warn;
use uturn_proto::relay::{AllocationId, PEER_HEADROOM, PEER_TAILROOM};

use crate::bufring::BufRing;
use crate::core::{ClientVerdict, Io, PeerVerdict, WorkerCore};
use crate::gso::Run;
use crate::stream::ConnId;
use crate::sys::{sockaddr_from_bytes, Waker};
use crate::worker::Stop;

pub use probe::probe;
use send::SendSlot;
use stream::StreamSend;

/// Provided buffers per worker (a power of two).
const BUF_COUNT: u16 = 4096;
/// Bytes per provided buffer: 48 bytes of header and address, then up to
/// 2048 - 48 - 3 = 1997 payload bytes. Longer datagrams are dropped (MSG_TRUNC) and counted.
const BUF_SIZE: usize = 2048;
/// Address field size in the multishot recvmsg layout (fits `sockaddr_in6`).
const NAME_LEN: usize = 32;
/// Where the payload starts in a provided buffer.
const PAYLOAD_AT: usize = 16 + NAME_LEN;
const _: () = assert!(PAYLOAD_AT == PEER_HEADROOM);
/// Buffer group id of the provided-buffer ring.
const BGID: u16 = 0;
/// Sends in flight per worker.
const SEND_SLOTS: usize = 2048;
const SQ_ENTRIES: u32 = 4096;
/// Relay sockets per worker that get a registered-file slot (the table costs 8 bytes a slot);
/// allocations beyond it use plain fds.
const FIXED_RELAYS: u32 = 65_536;
/// Longest a frozen worker waits for its receives' cancellations and its sends.
const QUIESCE_LIMIT: Duration = Duration::from_secs(2);

/// How an operation names its socket: a registered-file slot, or a plain fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileRef {
    Fixed(u32),
    Raw(RawFd),
}

/// Builds `$op` with the socket `$file` as a `Fixed` slot or an `Fd`.
macro_rules! with_file {
    ($file:expr, |$t:ident| $op:expr) => {
        match $file {
            FileRef::Fixed(slot) => {
                let $t = Fixed(slot);
                $op
            }
            FileRef::Raw(fd) => {
                let $t = Fd(fd);
                $op
            }
        }
    };
}

mod probe;
mod send;
mod stream;

const KIND_SHIFT: u32 = 60;
const KIND_LISTENER: u64 = 1;
const KIND_RELAY: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_WAKER: u64 = 4;
const KIND_CANCEL: u64 = 5;
const KIND_ACCEPT: u64 = 6;
const KIND_STREAM_RECV: u64 = 7;
const KIND_STREAM_SEND: u64 = 8;
const GEN_MASK: u32 = 0x07FF_FFFF;
/// Set in a relay tag's generation field for a dual allocation's second relay socket.
const ADDITIONAL_BIT: u32 = 0x0800_0000;

fn tag(kind: u64, low: u64) -> u64 {
    (kind << KIND_SHIFT) | low
}
fn additional_tag(id: AllocationId) -> u64 {
    relay_tag(id) | (ADDITIONAL_BIT as u64) << 32
}
fn relay_tag(id: AllocationId) -> u64 {
    tag(KIND_RELAY, ((id.generation & GEN_MASK) as u64) << 32 | id.index as u64)
}

struct UringIo {
    // Field order matters: the ring must be dropped before the buffers it references.
    ring: IoUring,
    bufs: BufRing,
    slots: Box<[SendSlot]>,
    free_slots: Vec<u32>,
    recv_hdr: Box<libc::msghdr>,
    /// Listener `i` as operations name it (registered slot `i`, or its fd).
    listener_files: Vec<FileRef>,
    /// Registered-file slots exist (`register_files_sparse` succeeded).
    fixed_files: bool,
    /// Registered slots reserved for relay sockets (slab indexes `0..relay_slots`).
    relay_slots: u32,
    waker_buf: Box<u64>,
    /// Sends dropped for lack of a free slot.
    send_slots_exhausted: u64,
    /// Sends that completed with an error.
    send_errors: u64,
    /// Datagrams dropped because they did not fit a provided buffer (MSG_TRUNC).
    truncated: u64,
    /// Submissions the kernel refused (receives were retried, sends dropped).
    submit_failures: u64,
    /// Registered-file table updates that failed (the socket ran on its plain fd).
    fixed_update_failures: u64,
    /// Per relay slab index: its current socket sits in its registered slot. Only then do
    /// operations name the slot; otherwise they use the socket's fd, so a failed update never
    /// leaves sends or receives on an empty slot or on another allocation's socket.
    relay_registered: Vec<bool>,
    /// Test hook (`UTURN_FAULT_INJECTION=register-files-fail`): every relay registration fails.
    #[cfg(feature = "fault-injection")]
    fail_registration: bool,
    /// Receives and cancels to queue again next iteration.
    pending: Vec<squeue::Entry>,
    /// Relayed datagrams waiting to go out as one GSO send.
    run: Run<FileRef>,
    /// False once the kernel refused a GSO send (then every datagram goes alone).
    gso: bool,
    /// GSO sends, and the datagrams they carried.
    gso_sends: u64,
    gso_segments: u64,
    /// User data of every multishot receive armed and not yet ended (a completion without
    /// `IORING_CQE_F_MORE`): what a freeze must see end before the sockets move.
    armed: hashbrown::HashSet<u64>,
    /// Set by a freeze: ended receives are not armed again.
    freezing: bool,
    /// TCP listener `i`'s descriptor (its accepts name it by fd).
    stream_listener_fds: Vec<RawFd>,
    /// The send in flight per connection slot (after `ring`: dropped once the ring is gone).
    stream_sends: Vec<StreamSend>,
}

impl UringIo {
    /// Queues `sqe`, submitting first when the SQ is full. False when it could not be queued
    /// (the kernel refused the submit, e.g. EBUSY while completions overflow): the caller must
    /// release whatever the entry would have owned.
    fn push(&mut self, sqe: &squeue::Entry) -> bool {
        // SAFETY: every SQE built here points only at memory owned by `self` (send slots,
        // `recv_hdr`, `waker_buf`) or the provided buffers, all of which outlive the operation:
        // slots and buffers are released only on the operation's completion.
        while unsafe { self.ring.submission().push(sqe) }.is_err() {
            if self.ring.submit().is_err() {
                self.submit_failures += 1;
                return false;
            }
        }
        true
    }

    /// Queues `sqe` now or, if the kernel refuses, next iteration: receives and cancels must
    /// never be lost, or a socket would be left without a receive.
    fn push_or_retry(&mut self, sqe: squeue::Entry) {
        if !self.push(&sqe) {
            self.pending.push(sqe);
        }
    }

    fn arm_recv(&mut self, file: FileRef, user_data: u64) {
        self.armed.insert(user_data);
        let hdr = &*self.recv_hdr as *const libc::msghdr;
        let sqe = with_file!(file, |t| opcode::RecvMsgMulti::new(t, hdr, BGID).build().user_data(user_data));
        self.push_or_retry(sqe);
    }

    /// Issues every queued send before the registered-file table changes: a send resolves its
    /// fixed slot when issued, and must not find the slot emptied or holding another
    /// allocation's socket.
    fn issue_queued(&mut self) {
        self.flush_run();
        if !self.ring.submission().is_empty() && self.ring.submit().is_err() {
            self.submit_failures += 1;
        }
    }

    /// The registered slot reserved for relay slab index `index`, if the table has one.
    fn reserved_slot(&self, index: u32) -> Option<u32> {
        (self.fixed_files && index < self.relay_slots).then(|| self.listener_files.len() as u32 + index)
    }

    /// The registered slot holding relay slab index `index`'s current socket, if it is there.
    fn relay_slot(&self, index: u32) -> Option<u32> {
        if self.relay_registered.get(index as usize).copied().unwrap_or(false) {
            self.reserved_slot(index)
        } else {
            None
        }
    }

    fn set_registered(&mut self, index: u32, registered: bool) {
        let i = index as usize;
        if self.relay_registered.len() <= i {
            self.relay_registered.resize(i + 1, false);
        }
        self.relay_registered[i] = registered;
    }

    /// Puts `fd` into registered slot `slot` (-1 empties it).
    fn update_slot(&mut self, slot: u32, fd: RawFd) -> io::Result<()> {
        #[cfg(feature = "fault-injection")]
        if self.fail_registration && fd >= 0 {
            return Err(io::Error::other("fault injection: register-files-fail"));
        }
        self.ring.submitter().register_files_update(slot, &[fd]).map(drop)
    }

    /// How operations name the relay socket `fd` of slab index `index`.
    fn relay_file(&self, index: u32, fd: RawFd) -> FileRef {
        self.relay_slot(index).map_or(FileRef::Raw(fd), FileRef::Fixed)
    }

    fn arm_waker(&mut self, fd: RawFd) {
        let sqe = opcode::Read::new(Fd(fd), (&mut *self.waker_buf as *mut u64).cast(), 8)
            .build()
            .user_data(tag(KIND_WAKER, 0));
        self.push_or_retry(sqe);
    }

    /// Retries the receives and cancels that could not be queued earlier.
    fn retry_pending(&mut self) {
        for sqe in std::mem::take(&mut self.pending) {
            self.push_or_retry(sqe);
        }
    }
}

impl Io for UringIo {
    fn register_relay(&mut self, id: AllocationId, socket: &UdpSocket) {
        self.issue_queued();
        let mut registered = false;
        if let Some(slot) = self.reserved_slot(id.index) {
            match self.update_slot(slot, socket.as_raw_fd()) {
                Ok(()) => registered = true,
                Err(e) => {
                    self.fixed_update_failures += 1;
                    // Every later operation on this allocation (receives, re-arms, sends) names
                    // the socket by its fd: `relay_file` sees the slot is not its own.
                    if self.fixed_update_failures == 1 {
                        warn!(error = %e, slot, "registering a relay socket failed; it runs on its plain fd (later failures are counted, see the shutdown log)");
                    }
                }
            }
        }
        self.set_registered(id.index, registered);
        let file = self.relay_file(id.index, socket.as_raw_fd());
        self.arm_recv(file, relay_tag(id));
    }
    fn deregister_relay(&mut self, id: AllocationId, _socket: &UdpSocket) {
        self.issue_queued();
        // Empty the registered slot so the table no longer keeps the socket open; requests
        // still using it hold the old table node until they complete.
        if let Some(slot) = self.relay_slot(id.index) {
            if self.update_slot(slot, -1).is_err() {
                self.fixed_update_failures += 1;
            }
        }
        self.set_registered(id.index, false);
        // The caller closes the socket next; the cancel drops the ring's reference to it.
        // A receive still waiting in `pending` must not be armed on a closed (or reused) fd.
        let ud = relay_tag(id);
        self.pending.retain(|e| e.get_user_data() != ud);
        self.armed.remove(&ud);
        let sqe = opcode::AsyncCancel::new(ud).build().user_data(tag(KIND_CANCEL, 0));
        self.push_or_retry(sqe);
    }
    fn send_reply(&mut self, listener: usize, to: SocketAddr, bytes: &[u8]) {
        let file = self.listener_files[listener];
        self.send(file, to, Err(bytes), bytes.len(), None);
    }
    fn send_to_peer_additional(&mut self, socket: &UdpSocket, peer: SocketAddr, bytes: &[u8]) {
        self.send(FileRef::Raw(socket.as_raw_fd()), peer, Err(bytes), bytes.len(), None);
    }
    fn register_additional(&mut self, id: AllocationId, socket: &UdpSocket) {
        // Second sockets are named by their fd (the registered table has one slot per index).
        self.arm_recv(FileRef::Raw(socket.as_raw_fd()), additional_tag(id));
    }
    fn deregister_additional(&mut self, id: AllocationId, _socket: &UdpSocket) {
        let ud = additional_tag(id);
        self.pending.retain(|e| e.get_user_data() != ud);
        self.armed.remove(&ud);
        let sqe = opcode::AsyncCancel::new(ud).build().user_data(tag(KIND_CANCEL, 0));
        self.push_or_retry(sqe);
    }
    fn send_to_peer(&mut self, id: AllocationId, socket: &UdpSocket, peer: SocketAddr, bytes: &[u8]) {
        let file = self.relay_file(id.index, socket.as_raw_fd());
        self.send(file, peer, Err(bytes), bytes.len(), None);
    }
    fn open_stream(&mut self, id: ConnId, socket: &std::net::TcpStream) -> bool {
        self.arm_stream_recv(id, std::os::fd::AsRawFd::as_raw_fd(socket));
        true
    }
    fn pause_stream(&mut self, id: ConnId, _socket: &std::net::TcpStream) {
        self.cancel_stream_recv(id);
    }
    fn resume_stream(&mut self, id: ConnId, socket: &std::net::TcpStream) {
        self.rearm_stream_recv(id, std::os::fd::AsRawFd::as_raw_fd(socket));
    }
    fn close_stream(&mut self, _id: ConnId, _socket: &std::net::TcpStream) {
        // The shutdown that follows ends the connection's receive and send; their completions
        // find the slot's generation moved on.
    }
}

fn new_ring() -> io::Result<IoUring> {
    // DEFER_TASKRUN (6.1+) runs completion work only when we wait, so a whole batch is reaped
    // in one go; fall back to a plain ring where unsupported.
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(SQ_ENTRIES * 4)
        .build(SQ_ENTRIES)
        .or_else(|_| IoUring::builder().setup_cqsize(SQ_ENTRIES * 4).build(SQ_ENTRIES))
}

/// Runs the worker until `stop` says so and returns its core: with its allocations closed, or,
/// frozen, with every receive cancelled and every send completed ([`quiesce`]).
pub(crate) fn run(mut core: WorkerCore, waker: &Waker, stop: Stop<'_>) -> io::Result<WorkerCore> {
    let ring = new_ring()?;
    let listener_fds: Vec<RawFd> = core.listeners.iter().map(|l| l.socket.as_raw_fd()).collect();
    // A sparse table of listener slots, then one slot per relay slab index (5.19+); without it
    // every socket is named by its fd.
    // The kernel refuses a table larger than the open-file limit (EMFILE).
    let limit = crate::sys::fd_limit().unwrap_or(1024).saturating_sub(listener_fds.len() as u64 + 64);
    let relay_slots = (FIXED_RELAYS as u64).min(limit) as u32;
    let fixed_files = ring
        .submitter()
        .register_files_sparse(listener_fds.len() as u32 + relay_slots)
        .and_then(|_| ring.submitter().register_files_update(0, &listener_fds))
        .is_ok();
    if !fixed_files {
        tracing::info!(worker = core.index, "io_uring registered files unavailable; sockets are named by their fds");
    }
    let listener_files = listener_fds
        .iter()
        .enumerate()
        .map(|(i, &fd)| if fixed_files { FileRef::Fixed(i as u32) } else { FileRef::Raw(fd) })
        .collect();
    let bufs = BufRing::new(&ring, BUF_COUNT, BUF_SIZE, BGID)?;
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
    recv_hdr.msg_namelen = NAME_LEN as libc::socklen_t;
    recv_hdr.msg_controllen = 0;
    let slots: Box<[SendSlot]> = (0..SEND_SLOTS).map(|_| SendSlot::new()).collect();
    let mut io = UringIo {
        ring,
        bufs,
        slots,
        free_slots: (0..SEND_SLOTS as u32).rev().collect(),
        recv_hdr,
        listener_files,
        fixed_files,
        relay_slots,
        fixed_update_failures: 0,
        relay_registered: Vec::new(),
        #[cfg(feature = "fault-injection")]
        fail_registration: crate::fault::fails_file_registration(),
        waker_buf: Box::new(0),
        send_slots_exhausted: 0,
        send_errors: 0,
        truncated: 0,
        submit_failures: 0,
        pending: Vec::new(),
        run: Run::new(),
        // UTURN_GSO=0 turns GSO off (to compare, or where a NIC driver mishandles it).
        gso: std::env::var("UTURN_GSO").map_or(true, |v| v != "0"),
        gso_sends: 0,
        gso_segments: 0,
        armed: hashbrown::HashSet::new(),
        freezing: false,
        stream_listener_fds: core.stream_listeners.iter().map(|l| l.socket.as_raw_fd()).collect(),
        stream_sends: Vec::new(),
    };
    for i in 0..io.stream_listener_fds.len() {
        io.arm_accept(i);
    }
    for i in 0..io.listener_files.len() {
        io.arm_recv(io.listener_files[i], tag(KIND_LISTENER, i as u64));
    }
    // A resumed worker's allocations.
    for r in core.relays.iter().flatten() {
        io.register_relay(r.id, &r.socket);
        if let Some(a) = &r.additional {
            io.register_additional(r.id, a);
        }
    }
    io.arm_waker(waker.raw_fd());
    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(SQ_ENTRIES as usize * 4);

    while !stop.stopping() {
        io.retry_pending();
        io.bufs.publish();
        let wait = core
            .state
            .poll_timeout()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .min(core.longest_sleep())
            .min(core.streams.accept_backoff.wait(Instant::now()))
            .max(Duration::from_millis(1));
        let ts = Timespec::from(wait);
        let args = SubmitArgs::new().timespec(&ts);
        // Commands queued after this check find the flag set and write the eventfd.
        waker.sleeping(true);
        let want = if core.commands_pending() { 0 } else { 1 };
        let entered = enter(&io.ring, want, &args);
        waker.sleeping(false);
        entered?;
        let now = Instant::now();
        reap(&mut core, &mut io, now, &mut cqes, waker);
        io.flush_run();
        core.drain_commands(now, &mut io);
        core.expire(now, &mut io);
        stream::retry_accepts(&mut core, &mut io, now);
        stream::flush_streams(&mut core, &mut io);
    }
    // Connections do not survive a freeze: their allocations end with them.
    core.close_connections(Instant::now(), &mut io);
    if stop.freezing() {
        quiesce(&mut core, &mut io, waker);
    } else {
        core.drain_commands(Instant::now(), &mut io);
        core.close_all(&mut io);
    }
    if io.gso_sends > 0 {
        tracing::info!(
            worker = core.index,
            gso_sends = io.gso_sends,
            gso_datagrams = io.gso_segments,
            gso = io.gso,
            "relayed datagrams sent in UDP GSO runs"
        );
    }
    if io.send_slots_exhausted > 0
        || io.send_errors > 0
        || io.truncated > 0
        || io.submit_failures > 0
        || io.fixed_update_failures > 0
    {
        warn!(
            worker = core.index,
            fixed_update_failures = io.fixed_update_failures,
            slots_exhausted = io.send_slots_exhausted,
            send_errors = io.send_errors,
            truncated = io.truncated,
            submit_failures = io.submit_failures,
            "datagrams dropped by the io_uring backend"
        );
    }
    Ok(core)
}

/// Readies a frozen worker's sockets to move to another process: applies the queued commands,
/// cancels every multishot receive, and reaps completions (relaying what was already received,
/// as usual) until every receive has ended and every send has completed. After it, no datagram
/// is held by the ring: each one is either sent or still queued in its socket.
fn quiesce(core: &mut WorkerCore, io: &mut UringIo, waker: &Waker) {
    core.drain_commands(Instant::now(), io);
    io.freezing = true;
    // Receives not yet queued are never armed; queued cancels still go.
    let unarmed: Vec<u64> =
        io.pending.iter().map(|e| e.get_user_data()).filter(|ud| ud >> KIND_SHIFT != KIND_CANCEL).collect();
    for ud in unarmed {
        io.armed.remove(&ud);
    }
    io.pending.retain(|e| e.get_user_data() >> KIND_SHIFT == KIND_CANCEL);
    let targets: Vec<u64> = io.armed.iter().copied().collect();
    for ud in targets {
        io.push_or_retry(opcode::AsyncCancel::new(ud).build().user_data(tag(KIND_CANCEL, 0)));
    }
    let deadline = Instant::now() + QUIESCE_LIMIT;
    let ts = Timespec::from(Duration::from_millis(10));
    let mut cqes: Vec<(u64, i32, u32)> = Vec::new();
    loop {
        io.flush_run();
        io.retry_pending();
        if io.armed.is_empty() && io.free_slots.len() == SEND_SLOTS && io.pending.is_empty() && !io.stream_sends_busy()
        {
            break;
        }
        if Instant::now() >= deadline {
            warn!(
                worker = core.index,
                receives = io.armed.len(),
                sends = SEND_SLOTS - io.free_slots.len(),
                "freeze: operations still in flight after {QUIESCE_LIMIT:?}; handing the sockets over anyway"
            );
            break;
        }
        if let Err(e) = enter(&io.ring, 1, &SubmitArgs::new().timespec(&ts)) {
            warn!(worker = core.index, "freeze: io_uring_enter failed: {e}");
            break;
        }
        reap(core, io, Instant::now(), &mut cqes, waker);
    }
}

/// Submits what is queued and waits for `want` completions or the timeout in `args`; a timeout,
/// a signal or a full completion queue (EBUSY) is not an error.
fn enter(ring: &IoUring, want: usize, args: &SubmitArgs<'_, '_>) -> io::Result<()> {
    match ring.submitter().submit_with_args(want, args) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Takes every completion off the ring (into `cqes`, reused) and dispatches each.
fn reap(core: &mut WorkerCore, io: &mut UringIo, now: Instant, cqes: &mut Vec<(u64, i32, u32)>, waker: &Waker) {
    cqes.clear();
    cqes.extend(io.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
    for &(ud, res, flags) in cqes.iter() {
        dispatch(core, io, now, ud, res, flags, waker);
    }
}

fn dispatch(core: &mut WorkerCore, io: &mut UringIo, now: Instant, ud: u64, res: i32, flags: u32, waker: &Waker) {
    let low = ud & ((1 << KIND_SHIFT) - 1);
    match ud >> KIND_SHIFT {
        KIND_SEND => {
            let slot = &mut io.slots[low as usize];
            if let Some(bid) = slot.bid.take() {
                io.bufs.recycle(bid);
            }
            let refused =
                res < 0 && !slot.bids.is_empty() && matches!(-res, libc::EIO | libc::EINVAL | libc::EOPNOTSUPP);
            if refused {
                // GSO is not available on this path (no checksum offload, an MTU below the
                // segment, an old kernel): turn it off and send the run's datagrams one by one.
                let (file, to) = slot.gso_dest.take().expect("a GSO send records its destination");
                let parts: Vec<(*const u8, usize, u16)> =
                    slot.iovs.iter().zip(&slot.bids).map(|(v, &b)| (v.iov_base as *const u8, v.iov_len, b)).collect();
                slot.bids.clear();
                io.free_slots.push(low as u32);
                if io.gso {
                    io.gso = false;
                    warn!(
                        worker = core.index,
                        error = %io::Error::from_raw_os_error(-res),
                        "the kernel refused a UDP GSO send; this worker now sends datagrams one by one"
                    );
                }
                for (data, len, bid) in parts {
                    if !io.send_now(file, to, Ok(data), len, Some(bid)) {
                        io.bufs.recycle(bid);
                    }
                }
                return;
            }
            for &bid in &slot.bids {
                io.bufs.recycle(bid);
            }
            slot.bids.clear();
            io.free_slots.push(low as u32);
            if res < 0 {
                io.send_errors += 1;
            }
        }
        KIND_LISTENER => {
            let listener = low as usize;
            if !cqueue::more(flags) {
                io.armed.remove(&ud);
                if !io.freezing {
                    io.arm_recv(io.listener_files[listener], ud);
                }
            }
            let Some(bid) = cqueue::buffer_select(flags) else { return };
            if res > 0 {
                on_listener(core, io, now, listener, bid, res as usize);
            } else {
                io.bufs.recycle(bid);
            }
        }
        KIND_RELAY => {
            let index = (low & 0xFFFF_FFFF) as usize;
            let additional = (low >> 32) as u32 & ADDITIONAL_BIT != 0;
            let generation = (low >> 32) as u32 & GEN_MASK;
            let live = matches!(core.relays.get(index), Some(Some(r)) if r.id.generation & GEN_MASK == generation);
            if !cqueue::more(flags) {
                io.armed.remove(&ud);
            }
            if live && !cqueue::more(flags) && res != -libc::ECANCELED && !io.freezing {
                if let Some(Some(r)) = core.relays.get(index) {
                    match (&r.additional, additional) {
                        (Some(a), true) => io.arm_recv(FileRef::Raw(a.as_raw_fd()), additional_tag(r.id)),
                        (_, true) => {}
                        _ => {
                            let (file, id) = (io.relay_file(r.id.index, r.socket.as_raw_fd()), r.id);
                            io.arm_recv(file, relay_tag(id));
                        }
                    }
                }
            }
            let Some(bid) = cqueue::buffer_select(flags) else { return };
            if res > 0 && live {
                on_relay(core, io, now, index, bid, res as usize);
            } else {
                io.bufs.recycle(bid);
            }
        }
        KIND_WAKER => io.arm_waker(waker.raw_fd()),
        KIND_ACCEPT => stream::on_accept(core, io, now, ud, res, cqueue::more(flags)),
        KIND_STREAM_RECV => {
            stream::on_recv(core, io, now, ud, low, res, cqueue::more(flags), cqueue::buffer_select(flags))
        }
        KIND_STREAM_SEND => stream::on_send(core, io, now, low, res),
        _ => {}
    }
}

/// Splits a multishot recvmsg buffer into (source address, payload length); `None` for a
/// truncated datagram or an unreadable address.
fn received(buf: &[u8], hdr: &libc::msghdr) -> Option<(SocketAddr, usize)> {
    let out = RecvMsgOut::parse(buf, hdr).ok()?;
    if out.is_payload_truncated() || out.is_name_data_truncated() {
        return None;
    }
    Some((sockaddr_from_bytes(out.name_data())?, out.payload_data().len()))
}

fn on_listener(core: &mut WorkerCore, io: &mut UringIo, now: Instant, listener: usize, bid: u16, len: usize) {
    let buf = io.bufs.buf(bid);
    let Some((from, n)) = received(&buf[..len], &io.recv_hdr) else {
        io.truncated += 1;
        io.bufs.recycle(bid);
        return;
    };
    let datagram = &buf[PAYLOAD_AT..PAYLOAD_AT + n];
    let base = buf.as_ptr();
    match core.on_client(now, listener, from, datagram) {
        ClientVerdict::ToPeer { relay, peer, payload } => {
            let file = match core.relays.get(relay) {
                Some(Some(r)) => match r.socket_for(&peer) {
                    (s, true) => FileRef::Raw(s.as_raw_fd()),
                    (s, false) => io.relay_file(r.id.index, s.as_raw_fd()),
                },
                _ => {
                    io.bufs.recycle(bid);
                    return;
                }
            };
            // SAFETY: `payload` lies within the datagram, which lies within buffer `bid`.
            let data = unsafe { base.add(PAYLOAD_AT + payload.start) };
            io.relay(file, peer, data, payload.len(), bid);
        }
        ClientVerdict::Reply(n) => {
            io.bufs.recycle(bid);
            let file = io.listener_files[listener];
            let reply = core.reply(n);
            io.send(file, from, Err(reply), n, None);
        }
        ClientVerdict::Done | ClientVerdict::Forwarded { .. } => io.bufs.recycle(bid),
    }
}

fn on_relay(core: &mut WorkerCore, io: &mut UringIo, now: Instant, index: usize, bid: u16, len: usize) {
    let hdr = &*io.recv_hdr;
    let buf = io.bufs.buf(bid);
    let Some((peer, n)) = received(&buf[..len], hdr) else {
        io.truncated += 1;
        io.bufs.recycle(bid);
        return;
    };
    if PAYLOAD_AT + n + PEER_TAILROOM > buf.len() {
        io.truncated += 1;
        io.bufs.recycle(bid);
        return;
    }
    let base = buf.as_ptr();
    match core.on_peer(now, index, peer, buf, PAYLOAD_AT..PAYLOAD_AT + n) {
        PeerVerdict::Datagram { listener, client, message } => {
            let file = io.listener_files[listener];
            // SAFETY: `message` lies within buffer `bid` (it was framed in place there).
            let data = unsafe { base.add(message.start) };
            io.relay(file, client, data, message.len(), bid);
        }
        PeerVerdict::Queued | PeerVerdict::Drop => io.bufs.recycle(bid),
    }
}
