//! Relayed transport addresses for UDP allocations (RFC 8656 §7.2): the relay address of the
//! family in turn, a port of the worker's slice first, EVEN-PORT and RESERVATION-TOKEN, and the
//! address advertised behind a 1:1 NAT (`external-ip`).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Instant;

use super::{ControlPlane, RESERVATION_TTL};

impl ControlPlane {
    /// Binds (or takes from a reservation) the relay socket; with the R bit also reserves the
    /// next port and returns its token.
    pub(super) fn relay_socket(
        &mut self,
        now: Instant,
        worker: usize,
        port: PortRequest,
        v6: bool,
    ) -> std::io::Result<Option<(UdpSocket, Option<[u8; 8]>)>> {
        if let PortRequest::Reserved(t) = port {
            return Ok(self.reservations.remove(&t).map(|(_, s)| (s, None)));
        }
        // The family's relay addresses in turn, starting with the next one: allocations spread
        // over them, and one whose range is full passes to the next.
        let ips: Vec<IpAddr> = self.policy.relay_ips.iter().copied().filter(|ip| ip.is_ipv6() == v6).collect();
        let first = self.next_relay_ip;
        self.next_relay_ip = self.next_relay_ip.wrapping_add(1);
        for j in 0..ips.len() {
            let ip = ips[(first + j) % ips.len()];
            if let Some(bound) = self.relay_socket_on(now, worker, port, ip)? {
                return Ok(Some(bound));
            }
        }
        Ok(None)
    }

    /// [`relay_socket`](Self::relay_socket) on one relay address.
    fn relay_socket_on(
        &mut self,
        now: Instant,
        worker: usize,
        port: PortRequest,
        ip: IpAddr,
    ) -> std::io::Result<Option<(UdpSocket, Option<[u8; 8]>)>> {
        // The worker's own slice first, then the others in turn: 508 only when the whole range
        // is taken.
        let n = self.ports.len();
        for k in 0..n {
            let slice = &mut self.ports[(worker + k) % n];
            let bound = match port {
                PortRequest::Any => slice.bind(ip, false)?.map(|s| (s, None)),
                PortRequest::Even => slice.bind(ip, true)?.map(|s| (s, None)),
                PortRequest::EvenAndReserveNext => match slice.bind_pair(ip)? {
                    Some((s, reserved)) => {
                        let token: [u8; 8] = rand::random();
                        self.reservations.insert(token, (now + RESERVATION_TTL, reserved));
                        Some((s, Some(token)))
                    }
                    None => None,
                },
                PortRequest::Reserved(_) => None,
            };
            if bound.is_some() {
                return Ok(bound);
            }
        }
        Ok(None)
    }

    /// The address to advertise for relayed transport address `bound` (its public one behind a
    /// 1:1 NAT, `external-ip`).
    pub(super) fn advertised(&self, bound: SocketAddr) -> SocketAddr {
        match self.policy.external_ips.iter().find(|(private, _)| *private == bound.ip()) {
            Some((_, public)) => SocketAddr::new(*public, bound.port()),
            None => bound,
        }
    }

    /// Drops reservations nobody claimed in time.
    pub(super) fn expire_reservations(&mut self, now: Instant) {
        if !self.reservations.is_empty() {
            self.reservations.retain(|_, (deadline, _)| *deadline > now);
        }
    }
}

/// Which relay port an Allocate asks for (RFC 8656 §7.2, §18.7, §18.10).
#[derive(Debug, Clone, Copy)]
pub(super) enum PortRequest {
    Any,
    Even,
    /// EVEN-PORT with the R bit: an even port, and the next one reserved for a token.
    EvenAndReserveNext,
    /// RESERVATION-TOKEN: the port reserved under this token.
    Reserved([u8; 8]),
}
