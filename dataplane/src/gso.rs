//! Grouping relayed datagrams for UDP generic segmentation offload (GSO, `UDP_SEGMENT`,
//! Linux 4.18+).
//!
//! Media arrives in bursts: a video frame is several datagrams of one size sent back to back,
//! so consecutive datagrams a worker relays often leave the same socket for the same
//! destination. Such a run is sent as one `sendmsg` with a `UDP_SEGMENT` control message: the
//! kernel walks the routing, IP and device layers once for the run and cuts it into the same
//! datagrams on the wire (or at the receiving socket on loopback). The rules are the kernel's:
//! every segment has the size of the first, except the last, which may be shorter; at most
//! [`MAX_SEGMENTS`] segments and [`MAX_BYTES`] bytes. Segments larger than [`MAX_SEGMENT`] are
//! never grouped, so a run always fits a 1500-byte MTU and never needs IP fragmentation, which
//! GSO refuses.
//!
//! This module only decides what joins a run; `uring.rs` sends it.

use std::net::SocketAddr;

/// Most segments in one GSO send (the kernel allows 64 since 4.18, 128 since 5.x).
pub(crate) const MAX_SEGMENTS: usize = 64;
/// Largest segment grouped, bytes: 1500-byte MTU less IPv6 (40) and UDP (8) headers.
pub(crate) const MAX_SEGMENT: usize = 1452;
/// Most payload bytes in one GSO send (a UDP datagram's 65,507-byte limit, with margin).
pub(crate) const MAX_BYTES: usize = 60_000;

/// One datagram of a run: where its bytes are and the provided buffer holding them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Address of the first byte (inside provided buffer `bid`).
    pub(crate) data: *const u8,
    /// Length, bytes.
    pub(crate) len: usize,
    /// Provided buffer to recycle once the send completes.
    pub(crate) bid: u16,
}

/// The run being built: datagrams for one (socket, destination), in arrival order.
#[derive(Debug)]
pub(crate) struct Run<F> {
    key: Option<(F, SocketAddr)>,
    /// Size of every segment but possibly the last, bytes.
    seg: usize,
    total: usize,
    /// A shorter segment was added: nothing may follow it.
    closed: bool,
    segments: Vec<Segment>,
}

impl<F: Copy + Eq> Run<F> {
    pub(crate) fn new() -> Self {
        Run { key: None, seg: 0, total: 0, closed: false, segments: Vec::with_capacity(MAX_SEGMENTS) }
    }

    /// True when nothing is waiting.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Whether a datagram of `len` bytes from `file` to `to` may be added to this run.
    /// An empty run takes any datagram up to [`MAX_SEGMENT`] bytes.
    pub(crate) fn accepts(&self, file: F, to: SocketAddr, len: usize) -> bool {
        if len == 0 || len > MAX_SEGMENT {
            return false;
        }
        match self.key {
            None => true,
            Some(k) => {
                k == (file, to)
                    && !self.closed
                    && len <= self.seg
                    && self.segments.len() < MAX_SEGMENTS
                    && self.total + len <= MAX_BYTES
            }
        }
    }

    /// Adds a datagram the run [`accepts`](Self::accepts).
    pub(crate) fn push(&mut self, file: F, to: SocketAddr, s: Segment) {
        debug_assert!(self.accepts(file, to, s.len));
        if self.key.is_none() {
            self.key = Some((file, to));
            self.seg = s.len;
        } else if s.len < self.seg {
            self.closed = true;
        }
        self.total += s.len;
        self.segments.push(s);
    }

    /// The socket, destination and segment size of a non-empty run.
    pub(crate) fn key(&self) -> Option<(F, SocketAddr, usize)> {
        self.key.map(|(f, to)| (f, to, self.seg))
    }

    /// The datagrams, in order.
    pub(crate) fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Empties the run (after it was sent or its buffers recycled).
    pub(crate) fn clear(&mut self) {
        self.key = None;
        self.seg = 0;
        self.total = 0;
        self.closed = false;
        self.segments.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(len: usize, bid: u16) -> Segment {
        Segment { data: std::ptr::null(), len, bid }
    }
    const A: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 1000));
    const B: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 1001));

    #[test]
    fn same_socket_destination_and_size_join() {
        let mut r = Run::new();
        assert!(r.accepts(1, A, 1200));
        r.push(1, A, seg(1200, 0));
        assert!(r.accepts(1, A, 1200));
        r.push(1, A, seg(1200, 1));
        assert!(!r.accepts(2, A, 1200), "another socket");
        assert!(!r.accepts(1, B, 1200), "another destination");
        assert!(!r.accepts(1, A, 1201), "a longer segment");
        assert_eq!(r.key(), Some((1, A, 1200)));
        assert_eq!(r.segments().iter().map(|s| s.bid).collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn a_shorter_segment_ends_the_run() {
        let mut r = Run::new();
        r.push(1, A, seg(1000, 0));
        assert!(r.accepts(1, A, 400));
        r.push(1, A, seg(400, 1));
        assert!(!r.accepts(1, A, 400), "nothing follows the short last segment");
        assert!(!r.accepts(1, A, 1000));
        r.clear();
        assert!(r.is_empty());
        assert!(r.accepts(1, A, 400));
    }

    #[test]
    fn limits_on_count_bytes_and_segment_size() {
        let mut r = Run::new();
        assert!(!r.accepts(1, A, MAX_SEGMENT + 1), "too big to group");
        assert!(!r.accepts(1, A, 0));
        for i in 0..MAX_SEGMENTS {
            assert!(r.accepts(1, A, 100), "segment {i}");
            r.push(1, A, seg(100, i as u16));
        }
        assert!(!r.accepts(1, A, 100), "segment count limit");
        let mut r = Run::new();
        let per = 1400;
        for i in 0..MAX_BYTES / per {
            r.push(1, A, seg(per, i as u16));
        }
        assert!(!r.accepts(1, A, per), "byte limit");
    }
}
