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
use crate::core::{ClientVerdict, Io, WorkerCore};
use crate::gso::{Run, Segment};
use crate::sys::{sockaddr_from_bytes, RawSockAddr, Waker};
use crate::worker::Stop;

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

/// `UDP_SEGMENT` (linux/udp.h): the cmsg type that sets the GSO segment size.
const UDP_SEGMENT: libc::c_int = 103;
/// Control buffer for one `UDP_SEGMENT` cmsg, as u64s for alignment (CMSG_SPACE(2) = 24 bytes).
const GSO_CMSG_WORDS: usize = 3;

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

const KIND_SHIFT: u32 = 60;
const KIND_LISTENER: u64 = 1;
const KIND_RELAY: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_WAKER: u64 = 4;
const KIND_CANCEL: u64 = 5;
const GEN_MASK: u32 = 0x0FFF_FFFF;

fn tag(kind: u64, low: u64) -> u64 {
    (kind << KIND_SHIFT) | low
}
fn relay_tag(id: AllocationId) -> u64 {
    tag(KIND_RELAY, ((id.generation & GEN_MASK) as u64) << 32 | id.index as u64)
}

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

/// One in-flight send: its destination address (and, for a GSO send, its msghdr, iovecs and
/// control message) must stay put until the completion.
struct SendSlot {
    addr: RawSockAddr,
    /// GSO sends only: the header, one iovec per segment, the `UDP_SEGMENT` cmsg, and the
    /// provided buffers to recycle on completion.
    hdr: libc::msghdr,
    iovs: Vec<libc::iovec>,
    cmsg: [u64; GSO_CMSG_WORDS],
    bids: Vec<u16>,
    /// GSO sends only: the socket and destination, to resend one by one if GSO is refused.
    gso_dest: Option<(FileRef, SocketAddr)>,
    /// Provided buffer to recycle when the send completes.
    bid: Option<u16>,
    /// Storage for replies (copied, they are small and rare).
    owned: Vec<u8>,
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

    /// Queues a send of `len` bytes at `data` to `to` from `file`, after any waiting GSO run
    /// (so datagrams leave in the order they were relayed). `bid`, if any, is recycled when the
    /// send completes; `data` must point into that buffer or is copied into the slot's
    /// `owned`. Returns false (and sends nothing) when no slot is free.
    fn send(
        &mut self,
        file: FileRef,
        to: SocketAddr,
        data: Result<*const u8, &[u8]>,
        len: usize,
        bid: Option<u16>,
    ) -> bool {
        self.flush_run();
        self.send_now(file, to, data, len, bid)
    }

    /// Relays the datagram at `data` (`len` bytes in provided buffer `bid`) to `to` from
    /// `file`: it joins the waiting GSO run when it can, or starts one. The buffer is always
    /// taken care of (recycled on completion or on failure).
    fn relay(&mut self, file: FileRef, to: SocketAddr, data: *const u8, len: usize, bid: u16) {
        if !self.gso || !self.run.accepts(file, to, len) {
            self.flush_run();
        }
        if self.gso && self.run.accepts(file, to, len) {
            self.run.push(file, to, Segment { data, len, bid });
        } else if !self.send_now(file, to, Ok(data), len, Some(bid)) {
            self.bufs.recycle(bid);
        }
    }

    /// Sends the waiting run: a single datagram as a plain send, more as one GSO `SendMsg`.
    fn flush_run(&mut self) {
        let Some((file, to, seg)) = self.run.key() else { return };
        if let [one] = self.run.segments() {
            let one = *one;
            self.run.clear();
            if !self.send_now(file, to, Ok(one.data), one.len, Some(one.bid)) {
                self.bufs.recycle(one.bid);
            }
            return;
        }
        let Some(i) = self.free_slots.pop() else {
            self.send_slots_exhausted += self.run.segments().len() as u64;
            for s in self.run.segments() {
                self.bufs.recycle(s.bid);
            }
            self.run.clear();
            return;
        };
        let slot = &mut self.slots[i as usize];
        slot.bid = None;
        slot.bids.clear();
        slot.iovs.clear();
        for s in self.run.segments() {
            slot.bids.push(s.bid);
            slot.iovs.push(libc::iovec { iov_base: s.data as *mut libc::c_void, iov_len: s.len });
        }
        let segments = self.run.segments().len() as u64;
        self.run.clear();
        slot.gso_dest = Some((file, to));
        let addr_len = slot.addr.set(&to);
        slot.hdr.msg_name = slot.addr.as_ptr();
        slot.hdr.msg_namelen = addr_len;
        slot.hdr.msg_iov = slot.iovs.as_mut_ptr();
        slot.hdr.msg_iovlen = slot.iovs.len() as _;
        slot.hdr.msg_control = slot.cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        slot.hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
        // SAFETY: msg_control points at the slot's `cmsg`, 24 bytes, 8-aligned, which holds
        // CMSG_SPACE(2) bytes, so the first header and its 2 data bytes lie inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&slot.hdr);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as _;
            libc::CMSG_DATA(c).cast::<u16>().write_unaligned(seg as u16);
        }
        let hdr = &slot.hdr as *const libc::msghdr;
        let sqe = with_file!(file, |t| opcode::SendMsg::new(t, hdr).build().user_data(tag(KIND_SEND, i as u64)));
        if self.push(&sqe) {
            self.gso_sends += 1;
            self.gso_segments += segments;
        } else {
            let slot = &mut self.slots[i as usize];
            for &bid in &slot.bids {
                self.bufs.recycle(bid);
            }
            slot.bids.clear();
            self.free_slots.push(i);
        }
    }

    /// Queues one send now (see [`send`](Self::send), which flushes the GSO run first).
    fn send_now(
        &mut self,
        file: FileRef,
        to: SocketAddr,
        data: Result<*const u8, &[u8]>,
        len: usize,
        bid: Option<u16>,
    ) -> bool {
        let Some(i) = self.free_slots.pop() else {
            self.send_slots_exhausted += 1;
            return false;
        };
        let slot = &mut self.slots[i as usize];
        let base = match data {
            Ok(p) => p,
            Err(bytes) => {
                slot.owned.clear();
                slot.owned.extend_from_slice(bytes);
                slot.owned.as_ptr()
            }
        };
        slot.bid = bid;
        let addr_len = slot.addr.set(&to);
        let addr = slot.addr.as_ptr().cast::<libc::sockaddr>().cast_const();
        let sqe = with_file!(file, |t| opcode::Send::new(t, base, len as u32)
            .dest_addr(addr)
            .dest_addr_len(addr_len)
            .build()
            .user_data(tag(KIND_SEND, i as u64)));
        if !self.push(&sqe) {
            // Not queued: the slot is free again and the caller recycles the buffer.
            self.slots[i as usize].bid = None;
            self.free_slots.push(i);
            return false;
        }
        true
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
    let slots: Box<[SendSlot]> = (0..SEND_SLOTS)
        .map(|_| SendSlot {
            addr: RawSockAddr::zeroed(),
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            hdr: unsafe { std::mem::zeroed() },
            iovs: Vec::new(),
            cmsg: [0; GSO_CMSG_WORDS],
            bids: Vec::new(),
            gso_dest: None,
            bid: None,
            owned: Vec::new(),
        })
        .collect();
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
    };
    for i in 0..io.listener_files.len() {
        io.arm_recv(io.listener_files[i], tag(KIND_LISTENER, i as u64));
    }
    // A resumed worker's allocations.
    for r in core.relays.iter().flatten() {
        io.register_relay(r.id, &r.socket);
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
    }
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
        if io.armed.is_empty() && io.free_slots.len() == SEND_SLOTS && io.pending.is_empty() {
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
            let generation = (low >> 32) as u32;
            let live = matches!(core.relays.get(index), Some(Some(r)) if r.id.generation & GEN_MASK == generation);
            if !cqueue::more(flags) {
                io.armed.remove(&ud);
            }
            if live && !cqueue::more(flags) && res != -libc::ECANCELED && !io.freezing {
                if let Some(Some(r)) = core.relays.get(index) {
                    let (file, id) = (io.relay_file(r.id.index, r.socket.as_raw_fd()), r.id);
                    io.arm_recv(file, relay_tag(id));
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
                Some(Some(r)) => io.relay_file(r.id.index, r.socket.as_raw_fd()),
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
        ClientVerdict::Done => io.bufs.recycle(bid),
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
        Some((listener, client, msg)) => {
            let file = io.listener_files[listener];
            // SAFETY: `msg` lies within buffer `bid` (it was framed in place there).
            let data = unsafe { base.add(msg.start) };
            io.relay(file, client, data, msg.len(), bid);
        }
        None => io.bufs.recycle(bid),
    }
}
