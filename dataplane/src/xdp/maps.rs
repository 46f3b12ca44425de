//! The XDP program's maps as Rust sees them (mirrors of `bpf/channel_relay.h`), and a worker's
//! handle on them: [`WorkerRoutes`] installs and removes the worker's channel routes and reads
//! what the program relayed for them.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use uturn_proto::relay::{ChannelRoute, Traffic};

use super::MonotonicClock;

/// `struct client_key`: ChannelData from `client` to the listen address `server` on `channel`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientKey {
    client_ip: u32,
    server_ip: u32,
    client_port: u16,
    server_port: u16,
    channel: u16,
    zero: u16,
}

/// `struct client_route`: relayed address -> peer, the counter slot, the worker, the deadline.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientRoute {
    relayed_ip: u32,
    peer_ip: u32,
    relayed_port: u16,
    peer_port: u16,
    slot: u32,
    worker: u32,
    zero: u32,
    expires_ns: u64,
}

/// `struct peer_key`: a datagram from `peer` to the relayed address.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerKey {
    peer_ip: u32,
    relayed_ip: u32,
    peer_port: u16,
    relayed_port: u16,
}

/// `struct peer_route`: listen address -> client on `channel`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerRoute {
    server_ip: u32,
    client_ip: u32,
    server_port: u16,
    client_port: u16,
    channel: u16,
    zero: u16,
    slot: u32,
    worker: u32,
    expires_ns: u64,
}

/// `struct client_key6`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientKey6 {
    client_ip: [u8; 16],
    server_ip: [u8; 16],
    client_port: u16,
    server_port: u16,
    channel: u16,
    zero: u16,
}

/// `struct client_route6`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientRoute6 {
    relayed_ip: [u8; 16],
    peer_ip: [u8; 16],
    relayed_port: u16,
    peer_port: u16,
    slot: u32,
    worker: u32,
    zero: u32,
    expires_ns: u64,
}

/// `struct peer_key6`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerKey6 {
    peer_ip: [u8; 16],
    relayed_ip: [u8; 16],
    peer_port: u16,
    relayed_port: u16,
}

/// `struct peer_route6`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerRoute6 {
    server_ip: [u8; 16],
    client_ip: [u8; 16],
    server_port: u16,
    client_port: u16,
    channel: u16,
    zero: u16,
    slot: u32,
    worker: u32,
    expires_ns: u64,
}

/// `struct traffic`: packets and payload bytes each way, per CPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TrafficCounters {
    pub(crate) packets_to_peer: u64,
    pub(crate) bytes_to_peer: u64,
    pub(crate) packets_to_client: u64,
    pub(crate) bytes_to_client: u64,
}

// SAFETY: each type is `repr(C)` with explicit fields that leave no padding (the `zero` fields
// fill what would be holes; `layouts_match_the_c_header` checks the sizes), and every bit pattern
// of its integer fields is a valid value, which is what aya requires to copy them to and from
// the kernel as bytes.
unsafe impl aya::Pod for ClientKey {}
// SAFETY: as above.
unsafe impl aya::Pod for ClientRoute {}
// SAFETY: as above.
unsafe impl aya::Pod for PeerKey {}
// SAFETY: as above.
unsafe impl aya::Pod for PeerRoute {}
// SAFETY: as above.
unsafe impl aya::Pod for TrafficCounters {}
// SAFETY: as above.
unsafe impl aya::Pod for ClientKey6 {}
// SAFETY: as above.
unsafe impl aya::Pod for ClientRoute6 {}
// SAFETY: as above.
unsafe impl aya::Pod for PeerKey6 {}
// SAFETY: as above.
unsafe impl aya::Pod for PeerRoute6 {}

impl TrafficCounters {
    fn sum(values: &PerCpuValues<TrafficCounters>) -> TrafficCounters {
        values.iter().fold(TrafficCounters::default(), |a, v| TrafficCounters {
            packets_to_peer: a.packets_to_peer + v.packets_to_peer,
            bytes_to_peer: a.bytes_to_peer + v.bytes_to_peer,
            packets_to_client: a.packets_to_client + v.packets_to_client,
            bytes_to_client: a.bytes_to_client + v.bytes_to_client,
        })
    }

    /// What was added since `last` (counters only grow while a slot is in use).
    fn since(self, last: TrafficCounters) -> (Traffic, Traffic) {
        (
            Traffic {
                packets: self.packets_to_peer.saturating_sub(last.packets_to_peer),
                bytes: self.bytes_to_peer.saturating_sub(last.bytes_to_peer),
            },
            Traffic {
                packets: self.packets_to_client.saturating_sub(last.packets_to_client),
                bytes: self.bytes_to_client.saturating_sub(last.bytes_to_client),
            },
        )
    }
}

fn ip4(a: SocketAddr) -> u32 {
    match a.ip() {
        std::net::IpAddr::V4(v4) => u32::from_ne_bytes(v4.octets()),
        std::net::IpAddr::V6(_) => u32::from_ne_bytes(Ipv4Addr::UNSPECIFIED.octets()),
    }
}

fn ip6(a: SocketAddr) -> [u8; 16] {
    match a.ip() {
        std::net::IpAddr::V6(v6) => v6.octets(),
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
    }
}

fn port(a: SocketAddr) -> u16 {
    a.port().to_be()
}

fn map_err(e: MapError) -> io::Error {
    io::Error::other(e)
}

/// Opens a map of the loaded program through a duplicate of its descriptor.
pub(crate) fn open(fd: &OwnedFd) -> io::Result<Map> {
    let dup = fd.as_fd().try_clone_to_owned()?;
    let data = MapData::from_fd(dup).map_err(map_err)?;
    Map::from_map_data(data).map_err(map_err)
}

/// One worker's handle on the route maps: its own descriptors, so no lock is shared with the
/// other workers (the kernel serialises map updates itself).
pub(crate) struct WorkerRoutes {
    worker: u32,
    client: BpfHashMap<MapData, ClientKey, ClientRoute>,
    peer: BpfHashMap<MapData, PeerKey, PeerRoute>,
    client6: BpfHashMap<MapData, ClientKey6, ClientRoute6>,
    peer6: BpfHashMap<MapData, PeerKey6, PeerRoute6>,
    route_traffic: PerCpuArray<MapData, TrafficCounters>,
    worker_traffic: PerCpuArray<MapData, TrafficCounters>,
    clock: MonotonicClock,
    cpus: usize,
    /// What was last credited per slot (indexed by slot minus `first_slot`).
    credited: Vec<TrafficCounters>,
    first_slot: u32,
    /// What was last credited from this worker's totals.
    worker_credited: TrafficCounters,
}

impl std::fmt::Debug for WorkerRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerRoutes").field("worker", &self.worker).finish_non_exhaustive()
    }
}

impl WorkerRoutes {
    pub(crate) fn new(fds: &super::XdpMaps, worker: usize, slots: std::ops::Range<u32>) -> io::Result<Self> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        Ok(WorkerRoutes {
            worker: worker as u32,
            client: BpfHashMap::try_from(open(&fds.client_routes)?).map_err(map_err)?,
            peer: BpfHashMap::try_from(open(&fds.peer_routes)?).map_err(map_err)?,
            client6: BpfHashMap::try_from(open(&fds.client_routes6)?).map_err(map_err)?,
            peer6: BpfHashMap::try_from(open(&fds.peer_routes6)?).map_err(map_err)?,
            route_traffic: PerCpuArray::try_from(open(&fds.route_traffic)?).map_err(map_err)?,
            worker_traffic: PerCpuArray::try_from(open(&fds.worker_traffic)?).map_err(map_err)?,
            clock: fds.clock,
            cpus,
            credited: vec![TrafficCounters::default(); slots.len()],
            first_slot: slots.start,
            worker_credited: TrafficCounters::default(),
        })
    }

    fn entries(&self, r: &ChannelRoute) -> (ClientKey, ClientRoute, PeerKey, PeerRoute) {
        let expires_ns = self.clock.ns(r.expires);
        let client_key = ClientKey {
            client_ip: ip4(r.client),
            server_ip: ip4(r.server),
            client_port: port(r.client),
            server_port: port(r.server),
            channel: r.channel.get(),
            zero: 0,
        };
        let client_route = ClientRoute {
            relayed_ip: ip4(r.relayed),
            peer_ip: ip4(r.peer),
            relayed_port: port(r.relayed),
            peer_port: port(r.peer),
            slot: r.slot,
            worker: self.worker,
            zero: 0,
            expires_ns,
        };
        let peer_key = PeerKey {
            peer_ip: ip4(r.peer),
            relayed_ip: ip4(r.relayed),
            peer_port: port(r.peer),
            relayed_port: port(r.relayed),
        };
        let peer_route = PeerRoute {
            server_ip: ip4(r.server),
            client_ip: ip4(r.client),
            server_port: port(r.server),
            client_port: port(r.client),
            channel: r.channel.get(),
            zero: 0,
            slot: r.slot,
            worker: self.worker,
            expires_ns,
        };
        (client_key, client_route, peer_key, peer_route)
    }

    fn entries6(&self, r: &ChannelRoute) -> (ClientKey6, ClientRoute6, PeerKey6, PeerRoute6) {
        let expires_ns = self.clock.ns(r.expires);
        let ck = ClientKey6 {
            client_ip: ip6(r.client),
            server_ip: ip6(r.server),
            client_port: port(r.client),
            server_port: port(r.server),
            channel: r.channel.get(),
            zero: 0,
        };
        let cr = ClientRoute6 {
            relayed_ip: ip6(r.relayed),
            peer_ip: ip6(r.peer),
            relayed_port: port(r.relayed),
            peer_port: port(r.peer),
            slot: r.slot,
            worker: self.worker,
            zero: 0,
            expires_ns,
        };
        let pk = PeerKey6 {
            peer_ip: ip6(r.peer),
            relayed_ip: ip6(r.relayed),
            peer_port: port(r.peer),
            relayed_port: port(r.relayed),
        };
        let pr = PeerRoute6 {
            server_ip: ip6(r.server),
            client_ip: ip6(r.client),
            server_port: port(r.server),
            client_port: port(r.client),
            channel: r.channel.get(),
            zero: 0,
            slot: r.slot,
            worker: self.worker,
            expires_ns,
        };
        (ck, cr, pk, pr)
    }

    /// Inserts `r` (or moves its deadline). A fresh route's slot counters are zeroed first.
    pub(crate) fn install(&mut self, r: &ChannelRoute, fresh: bool) -> io::Result<()> {
        if fresh {
            let zero = PerCpuValues::try_from(vec![TrafficCounters::default(); self.cpus]).map_err(io::Error::other)?;
            self.route_traffic.set(r.slot, zero, 0).map_err(map_err)?;
            if let Some(c) = self.credited.get_mut(r.slot.wrapping_sub(self.first_slot) as usize) {
                *c = TrafficCounters::default();
            }
        }
        if r.client.is_ipv6() {
            let (ck, cr, pk, pr) = self.entries6(r);
            self.client6.insert(ck, cr, 0).map_err(map_err)?;
            self.peer6.insert(pk, pr, 0).map_err(map_err)?;
        } else {
            let (ck, cr, pk, pr) = self.entries(r);
            self.client.insert(ck, cr, 0).map_err(map_err)?;
            self.peer.insert(pk, pr, 0).map_err(map_err)?;
        }
        Ok(())
    }

    /// Removes `r`; returns what the program relayed for it since it was last credited.
    pub(crate) fn remove(&mut self, r: &ChannelRoute) -> (Traffic, Traffic) {
        // Either may be missing if its insert failed; nothing else removes them.
        if r.client.is_ipv6() {
            let (ck, _, pk, _) = self.entries6(r);
            let _ = self.client6.remove(&ck);
            let _ = self.peer6.remove(&pk);
        } else {
            let (ck, _, pk, _) = self.entries(r);
            let _ = self.client.remove(&ck);
            let _ = self.peer.remove(&pk);
        }
        self.take_slot(r.slot)
    }

    /// What the program relayed on `slot` since it was last credited.
    pub(crate) fn take_slot(&mut self, slot: u32) -> (Traffic, Traffic) {
        let Ok(values) = self.route_traffic.get(&slot, 0) else { return Default::default() };
        let now = TrafficCounters::sum(&values);
        match self.credited.get_mut(slot.wrapping_sub(self.first_slot) as usize) {
            Some(last) => {
                let d = now.since(*last);
                *last = now;
                d
            }
            None => Default::default(),
        }
    }

    /// What the program relayed for this worker since this was last called.
    pub(crate) fn take_worker(&mut self) -> (Traffic, Traffic) {
        let Ok(values) = self.worker_traffic.get(&self.worker, 0) else { return Default::default() };
        let now = TrafficCounters::sum(&values);
        let d = now.since(self.worker_credited);
        self.worker_credited = now;
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_c_header() {
        // Sizes of the structs in bpf/channel_relay.h (clang lays them out with no padding).
        assert_eq!(std::mem::size_of::<ClientKey>(), 16);
        assert_eq!(std::mem::size_of::<ClientRoute>(), 32);
        assert_eq!(std::mem::size_of::<PeerKey>(), 12);
        assert_eq!(std::mem::size_of::<PeerRoute>(), 32);
        assert_eq!(std::mem::size_of::<TrafficCounters>(), 32);
        assert_eq!(std::mem::size_of::<ClientKey6>(), 40);
        assert_eq!(std::mem::size_of::<ClientRoute6>(), 56);
        assert_eq!(std::mem::size_of::<PeerKey6>(), 36);
        assert_eq!(std::mem::size_of::<PeerRoute6>(), 56);
        let a: SocketAddr = "10.1.2.3:3478".parse().unwrap();
        // Network byte order in memory, as in the packet.
        assert_eq!(ip4(a).to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(port(a).to_ne_bytes(), 3478u16.to_be_bytes());
    }
}
