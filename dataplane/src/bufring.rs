//! The io_uring provided-buffer ring (Linux 5.19+): the buffers multishot receives write into,
//! so a datagram is received, framed in place and sent from the same memory.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// A provided-buffer ring and its buffers (IORING_REGISTER_PBUF_RING): `count` buffers of
/// `size` bytes each (one allocation, zeroed), handed to the kernel for multishot receives and
/// returned with [`recycle`](Self::recycle) + [`publish`](Self::publish).
pub(crate) struct BufRing {
    entries: *mut BufRingEntry,
    entries_layout: Layout,
    bufs: *mut u8,
    bufs_layout: Layout,
    count: u16,
    size: usize,
    /// Next tail value to publish.
    tail: u16,
}

impl BufRing {
    pub(crate) fn new(ring: &IoUring, count: u16, size: usize, bgid: u16) -> io::Result<Self> {
        let entries_layout = Layout::from_size_align(count as usize * std::mem::size_of::<BufRingEntry>(), 4096)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let bufs_layout = Layout::from_size_align(count as usize * size, 64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both layouts have non-zero size (count and size are non-zero constants).
        let (entries, bufs) =
            unsafe { (alloc_zeroed(entries_layout).cast::<BufRingEntry>(), alloc_zeroed(bufs_layout)) };
        if entries.is_null() || bufs.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut me = BufRing { entries, entries_layout, bufs, bufs_layout, count, size, tail: 0 };
        // SAFETY: `entries` is page-aligned memory for `count` entries that lives until `me` is
        // dropped, and `me` is dropped only after the ring (see `UringIo` field order).
        unsafe { ring.submitter().register_buf_ring_with_flags(entries as u64, count, bgid, 0)? };
        for bid in 0..count {
            me.recycle(bid);
        }
        me.publish();
        Ok(me)
    }

    /// The whole buffer `bid`.
    pub(crate) fn buf(&mut self, bid: u16) -> &mut [u8] {
        debug_assert!(bid < self.count);
        // SAFETY: `bid < count`, so the range lies inside the allocation; the kernel handed this
        // buffer to us in a completion and will not touch it until `recycle(bid)` is published,
        // and `&mut self` prevents a second live slice.
        unsafe { std::slice::from_raw_parts_mut(self.bufs.add(bid as usize * self.size), self.size) }
    }

    /// Returns buffer `bid` to the ring (visible to the kernel after [`publish`](Self::publish)).
    pub(crate) fn recycle(&mut self, bid: u16) {
        let mask = self.count - 1;
        // SAFETY: `tail & mask < count`, inside the entries allocation; the kernel only reads
        // entries between its head and the published tail, and this one is past the tail.
        let e = unsafe { &mut *self.entries.add((self.tail & mask) as usize) };
        // SAFETY: `bid < count` keeps the address inside the buffers allocation.
        e.set_addr(unsafe { self.bufs.add(bid as usize * self.size) } as u64);
        e.set_len(self.size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes recycled buffers to the kernel.
    pub(crate) fn publish(&self) {
        // SAFETY: `entries` is the ring base; its tail field is a u16 the kernel reads
        // atomically; a release store orders the entry writes before it.
        let tail = unsafe { &*(BufRingEntry::tail(self.entries).cast::<AtomicU16>()) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; the ring that used them is gone.
        unsafe {
            dealloc(self.entries.cast(), self.entries_layout);
            dealloc(self.bufs, self.bufs_layout);
        }
    }
}
