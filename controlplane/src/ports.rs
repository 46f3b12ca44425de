//! Relay port assignment (RFC 8656 §7.2, §18.7): each worker has its own slice of the relay port
//! range, so assignment needs no lock. Ports held by other sockets (the range overlaps Linux's
//! ephemeral ports) are skipped.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};

use uturn_dataplane::bind_relay;

/// The slice of the relay port range one worker draws from.
#[derive(Debug, Clone)]
pub struct PortSlice {
    lo: u16,
    hi: u16,
    next: u16,
}

impl PortSlice {
    /// Splits `lo..=hi` into `n` contiguous slices (the last takes the remainder). Each slice
    /// starts at a random offset so restarts do not reuse the same ports first.
    pub fn split(lo: u16, hi: u16, n: usize) -> Vec<PortSlice> {
        let total = (hi - lo) as usize + 1;
        let n = n.clamp(1, total);
        let per = total / n;
        (0..n)
            .map(|i| {
                let a = lo as usize + i * per;
                let b = if i + 1 == n { hi as usize } else { a + per - 1 };
                let start = a + rand::random::<usize>() % (b - a + 1);
                PortSlice { lo: a as u16, hi: b as u16, next: start as u16 }
            })
            .collect()
    }

    /// Number of ports in the slice.
    pub fn len(&self) -> usize {
        (self.hi - self.lo) as usize + 1
    }

    /// Always false: a slice holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Starts the next search at a port drawn from the CSPRNG, so relayed transport addresses
    /// cannot be predicted (RFC 8656 §7.2 and §21: guessing one would let an attacker aim at an
    /// allocation).
    fn randomize(&mut self) {
        self.next = self.lo + (rand::random::<u32>() % self.len() as u32) as u16;
    }

    /// Binds a relay socket on `ip` at a random free port of the slice (an even one when `even`,
    /// RFC 8656 §18.7). Returns `None` when every port is taken (508 Insufficient Capacity).
    pub fn bind(&mut self, ip: IpAddr, even: bool) -> io::Result<Option<UdpSocket>> {
        self.bind_with(ip, even, bind_relay)
    }

    /// [`bind`](Self::bind) with another socket type: `bind` binds one address, and an
    /// `AddrInUse` from it moves on to the next port (a TCP allocation's listener, RFC 6062).
    pub fn bind_with<T>(
        &mut self,
        ip: IpAddr,
        even: bool,
        mut bind: impl FnMut(SocketAddr) -> io::Result<T>,
    ) -> io::Result<Option<T>> {
        self.randomize();
        for _ in 0..self.len() {
            let port = self.next;
            self.next = if self.next >= self.hi { self.lo } else { self.next + 1 };
            if even && port % 2 == 1 {
                continue;
            }
            match bind(SocketAddr::new(ip, port)) {
                Ok(s) => return Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Binds an even port and the odd port after it (EVEN-PORT with the R bit, RFC 8656
    /// §18.7): the first socket serves the allocation, the second is held for a
    /// RESERVATION-TOKEN. `None` when no such pair is free.
    pub fn bind_pair(&mut self, ip: IpAddr) -> io::Result<Option<(UdpSocket, UdpSocket)>> {
        self.randomize();
        for _ in 0..self.len() {
            let port = self.next;
            self.next = if self.next >= self.hi { self.lo } else { self.next + 1 };
            if port % 2 == 1 || port >= self.hi {
                continue;
            }
            let first = match bind_relay(SocketAddr::new(ip, port)) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            };
            match bind_relay(SocketAddr::new(ip, port + 1)) {
                Ok(second) => return Ok(Some((first, second))),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_range_without_overlap() {
        let s = PortSlice::split(49152, 65535, 3);
        assert_eq!(s.iter().map(PortSlice::len).sum::<usize>(), 16384);
        assert_eq!((s[0].lo, s[2].hi), (49152, 65535));
        assert_eq!(s[0].hi + 1, s[1].lo);
    }

    #[test]
    fn skips_ports_in_use_and_reports_exhaustion() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut slice = loop {
            let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let p = probe.local_addr().unwrap().port();
            drop(probe);
            if p < 65535 {
                break PortSlice { lo: p, hi: p + 1, next: p };
            }
        };
        let held = UdpSocket::bind(SocketAddr::new(ip, slice.lo)).ok();
        let a = slice.bind(ip, false).unwrap();
        assert!(a.is_some());
        if held.is_some() {
            assert_eq!(a.as_ref().unwrap().local_addr().unwrap().port(), slice.hi, "held port skipped");
            assert!(slice.bind(ip, false).unwrap().is_none(), "both ports taken");
        }
    }
}
