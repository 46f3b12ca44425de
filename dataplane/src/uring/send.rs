//! Sends: the slots that keep each in-flight send's address (and a GSO send's msghdr, iovecs
//! and control message) in place until its completion, single sends, and runs of relayed
//! datagrams for one destination sent as one `UDP_SEGMENT` (GSO) `SendMsg`.

use std::net::SocketAddr;

use io_uring::opcode;
use io_uring::types::{Fd, Fixed};

use super::{tag, FileRef, UringIo, KIND_SEND};
use crate::gso::Segment;
use crate::sys::RawSockAddr;

/// `UDP_SEGMENT` (linux/udp.h): the cmsg type that sets the GSO segment size.
const UDP_SEGMENT: libc::c_int = 103;
/// Control buffer for one `UDP_SEGMENT` cmsg, as u64s for alignment (CMSG_SPACE(2) = 24 bytes).
pub(super) const GSO_CMSG_WORDS: usize = 3;

/// One in-flight send: its destination address (and, for a GSO send, its msghdr, iovecs and
/// control message) must stay put until the completion.
pub(super) struct SendSlot {
    pub(super) addr: RawSockAddr,
    /// GSO sends only: the header, one iovec per segment, the `UDP_SEGMENT` cmsg, and the
    /// provided buffers to recycle on completion.
    pub(super) hdr: libc::msghdr,
    pub(super) iovs: Vec<libc::iovec>,
    pub(super) cmsg: [u64; GSO_CMSG_WORDS],
    pub(super) bids: Vec<u16>,
    /// GSO sends only: the socket and destination, to resend one by one if GSO is refused.
    pub(super) gso_dest: Option<(FileRef, SocketAddr)>,
    /// Provided buffer to recycle when the send completes.
    pub(super) bid: Option<u16>,
    /// Storage for replies (copied, they are small and rare).
    pub(super) owned: Vec<u8>,
}

impl SendSlot {
    /// A free slot.
    pub(super) fn new() -> Self {
        SendSlot {
            addr: RawSockAddr::zeroed(),
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            hdr: unsafe { std::mem::zeroed() },
            iovs: Vec::new(),
            cmsg: [0; GSO_CMSG_WORDS],
            bids: Vec::new(),
            gso_dest: None,
            bid: None,
            owned: Vec::new(),
        }
    }
}

impl UringIo {
    /// Queues a send of `len` bytes at `data` to `to` from `file`, after any waiting GSO run
    /// (so datagrams leave in the order they were relayed). `bid`, if any, is recycled when the
    /// send completes; `data` must point into that buffer or is copied into the slot's
    /// `owned`. Returns false (and sends nothing) when no slot is free.
    pub(super) fn send(
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
    pub(super) fn relay(&mut self, file: FileRef, to: SocketAddr, data: *const u8, len: usize, bid: u16) {
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
    pub(super) fn flush_run(&mut self) {
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
    pub(super) fn send_now(
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
