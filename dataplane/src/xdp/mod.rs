//! The XDP fast path for ChannelData (`bpf/channel_relay.c`): loading and attaching the program
//! with aya, and the handles the workers and the metrics exporter keep on its maps.
//!
//! One program serves the whole host: [`XdpFastPath::load`] attaches it to every interface that
//! holds a listen or relay address (or those configured) and lists them in its redirect map.
//! Each worker installs and removes its own channel routes through its own descriptors
//! ([`XdpMaps`] is shared, each worker opens its maps from it), as
//! [`uturn_proto::WorkerState::take_offload_events`] reports them; the worker's tables stay the
//! authority, and the program hands everything it does not route to the socket path.
//!
//! Dropping the [`XdpFastPath`] detaches the program (aya holds the attachment as a bpf_link, so
//! a crashed process detaches too) and the maps go with the last descriptor.

pub(crate) mod maps;

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use aya::maps::{Map, MapData, PerCpuArray};

pub(crate) use maps::WorkerRoutes;

/// Where the XDP program runs (`xdp` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// No XDP: every datagram takes the socket path.
    #[default]
    Off,
    /// In the driver, before any socket buffer is allocated (the fast one; needs driver support).
    Native,
    /// In the kernel's generic hook, after the socket buffer (works on every interface,
    /// including loopback; slower than native, still before the IP and UDP stacks).
    Generic,
}

impl XdpMode {
    /// Lower-case name, as the configuration spells it.
    pub fn name(self) -> &'static str {
        match self {
            XdpMode::Off => "off",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
}

impl std::str::FromStr for XdpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(XdpMode::Off),
            "native" => Ok(XdpMode::Native),
            "generic" => Ok(XdpMode::Generic),
            _ => Err(format!("xdp must be \"off\", \"native\" or \"generic\", not {s:?}")),
        }
    }
}

/// How to load the fast path.
#[derive(Debug, Clone)]
pub struct XdpOptions {
    /// Native or generic (Off never loads).
    pub mode: XdpMode,
    /// Interfaces to attach to; empty: every interface holding one of the addresses given to
    /// [`XdpFastPath::load`].
    pub interfaces: Vec<String>,
    /// Channel routes the maps hold, all workers together (each route is one channel binding,
    /// both directions).
    pub routes: u32,
    /// Workers (each gets an equal share of the route counter slots).
    pub workers: usize,
}

/// Why the fast path could not start.
#[derive(Debug)]
pub struct XdpError(String);

impl fmt::Display for XdpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for XdpError {}

fn err(context: &str, e: impl fmt::Display) -> XdpError {
    XdpError(format!("{context}: {e}"))
}

/// Converts `Instant`s to `CLOCK_MONOTONIC` nanoseconds, the clock of `bpf_ktime_get_ns`
/// (std's `Instant` reads the same clock on Linux; the offset is measured once).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MonotonicClock {
    base: Instant,
    base_ns: u64,
}

impl MonotonicClock {
    fn new() -> Self {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let base = Instant::now();
        MonotonicClock { base, base_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64 }
    }

    /// `t` in CLOCK_MONOTONIC nanoseconds.
    pub(crate) fn ns(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.base) {
            Some(d) => self.base_ns.saturating_add(d.as_nanos() as u64),
            None => self.base_ns.saturating_sub(self.base.duration_since(t).as_nanos() as u64),
        }
    }
}

/// Descriptors of the program's maps, shared by the workers (each opens its own duplicates).
#[derive(Debug)]
pub struct XdpMaps {
    client_routes: OwnedFd,
    peer_routes: OwnedFd,
    client_routes6: OwnedFd,
    peer_routes6: OwnedFd,
    route_traffic: OwnedFd,
    worker_traffic: OwnedFd,
    verdicts: OwnedFd,
    clock: MonotonicClock,
    slots_per_worker: u32,
}

impl XdpMaps {
    /// Counter slots of worker `index`'s routes.
    pub fn slots(&self, index: usize) -> Range<u32> {
        let start = index as u32 * self.slots_per_worker;
        start..start + self.slots_per_worker
    }

    /// A verdict reader for the metrics exporter.
    pub fn verdicts(&self) -> io::Result<XdpVerdicts> {
        let map = maps::open(&self.verdicts)?;
        Ok(XdpVerdicts { map: PerCpuArray::try_from(map).map_err(io::Error::other)? })
    }

    pub(crate) fn worker_routes(&self, index: usize) -> io::Result<WorkerRoutes> {
        WorkerRoutes::new(self, index, self.slots(index))
    }
}

/// What the program did with packets, summed over CPUs: (name, packets) in `enum verdict` order.
pub struct XdpVerdicts {
    map: PerCpuArray<MapData, u64>,
}

impl fmt::Debug for XdpVerdicts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("XdpVerdicts")
    }
}

/// Names of `enum verdict` in `bpf/channel_relay.h`, in order.
pub const VERDICTS: [&str; 15] = [
    "to_peer_tx",
    "to_peer_redirect",
    "to_client_tx",
    "to_client_redirect",
    "pass_not_udp",
    "pass_ip_options",
    "pass_fragment",
    "pass_bad_length",
    "pass_no_route",
    "pass_expired",
    "pass_channel_length",
    "pass_too_large",
    "pass_fib",
    "pass_no_tx_port",
    "pass_adjust",
];

impl XdpVerdicts {
    /// Packets per verdict since the program was loaded.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        VERDICTS
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, self.map.get(&(i as u32), 0).map_or(0, |v| v.iter().sum())))
            .collect()
    }
}

/// The loaded and attached program. Keep it for as long as the relay runs.
pub struct XdpFastPath {
    ebpf: aya::Ebpf,
    maps: std::sync::Arc<XdpMaps>,
    interfaces: Vec<(String, u32)>,
    mode: XdpMode,
    /// The attachments, one per interface (empty while detached).
    links: Vec<aya::programs::xdp::XdpLinkId>,
}

impl fmt::Debug for XdpFastPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpFastPath").field("interfaces", &self.interfaces).field("mode", &self.mode).finish()
    }
}

#[cfg(uturn_xdp)]
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/channel_relay.o"));
#[cfg(not(uturn_xdp))]
static PROGRAM: &[u8] = &[];

/// True when this build carries the XDP program (clang was there when it was built).
pub fn available() -> bool {
    !PROGRAM.is_empty()
}

impl XdpFastPath {
    /// Loads (and the kernel verifies) the program for `opts.interfaces`, or for every interface
    /// holding one of `addresses` (the listen and relay IPs), and fills its redirect map; [`attach`](Self::attach) then attaches it in
    /// `opts.mode`. Needs CAP_BPF and CAP_NET_ADMIN (root). A hot upgrade's new process loads
    /// before it takes over and attaches once the old process has detached.
    pub fn load(opts: &XdpOptions, addresses: &[IpAddr]) -> Result<XdpFastPath, XdpError> {
        if !available() {
            return Err(XdpError("this build has no XDP program: clang was missing when uturn was built".into()));
        }
        let names = if opts.interfaces.is_empty() { interfaces_holding(addresses)? } else { opts.interfaces.clone() };
        if names.is_empty() {
            return Err(XdpError("no interface holds a listen or relay address; set xdp-interfaces".into()));
        }
        let workers = opts.workers.max(1) as u32;
        let slots_per_worker = (opts.routes / workers).max(1);
        let routes = slots_per_worker * workers;
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries("client_routes", routes)
            .map_max_entries("peer_routes", routes)
            .map_max_entries("client_routes6", routes)
            .map_max_entries("peer_routes6", routes)
            .map_max_entries("route_traffic", routes)
            .map_max_entries("worker_traffic", workers.max(1))
            .load(PROGRAM)
            .map_err(|e| err("loading the XDP program", e))?;
        if opts.mode == XdpMode::Off {
            return Err(XdpError("xdp is off".into()));
        }
        let mut interfaces = Vec::new();
        for name in &names {
            let c = std::ffi::CString::new(name.as_str()).map_err(|e| err("interface name", e))?;
            // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
            let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
            if index == 0 {
                return Err(XdpError(format!("no interface named {name}")));
            }
            interfaces.push((name.clone(), index));
        }
        {
            let map = ebpf.map_mut("tx_ports").ok_or_else(|| XdpError("the program has no tx_ports map".into()))?;
            let mut ports = aya::maps::DevMapHash::try_from(map).map_err(|e| err("tx_ports", e))?;
            for (name, index) in &interfaces {
                ports.insert(*index, *index, None, 0).map_err(|e| err(&format!("tx_ports for {name}"), e))?;
            }
        }
        program(&mut ebpf)?.load().map_err(|e| err("verifying the XDP program", e))?;
        let fd = |name: &str| -> Result<OwnedFd, XdpError> {
            let map = ebpf.map(name).ok_or_else(|| XdpError(format!("the program has no {name} map")))?;
            map_fd(map).ok_or_else(|| XdpError(format!("{name}: unexpected map type")))?.map_err(|e| err(name, e))
        };
        let maps = XdpMaps {
            client_routes: fd("client_routes")?,
            peer_routes: fd("peer_routes")?,
            client_routes6: fd("client_routes6")?,
            peer_routes6: fd("peer_routes6")?,
            route_traffic: fd("route_traffic")?,
            worker_traffic: fd("worker_traffic")?,
            verdicts: fd("verdicts")?,
            clock: MonotonicClock::new(),
            slots_per_worker,
        };
        Ok(XdpFastPath { ebpf, maps: std::sync::Arc::new(maps), interfaces, mode: opts.mode, links: Vec::new() })
    }

    /// Attaches the loaded program to its interfaces (again, after [`detach`](Self::detach)).
    pub fn attach(&mut self) -> Result<(), XdpError> {
        if !self.links.is_empty() {
            return Ok(());
        }
        let mode = match self.mode {
            XdpMode::Native => aya::programs::XdpMode::Driver,
            _ => aya::programs::XdpMode::Skb,
        };
        let program = program(&mut self.ebpf)?;
        for (name, index) in &self.interfaces {
            match program.attach_to_if_index(*index, mode) {
                Ok(link) => self.links.push(link),
                Err(e) => {
                    for link in self.links.drain(..) {
                        let _ = program.detach(link);
                    }
                    return Err(err(&format!("attaching XDP ({}) to {name}", self.mode.name()), e));
                }
            }
        }
        Ok(())
    }

    /// Detaches the program from every interface (a hot upgrade's new process attaches its
    /// own); the maps stay.
    pub fn detach(&mut self) {
        if let Ok(program) = program(&mut self.ebpf) {
            for link in self.links.drain(..) {
                let _ = program.detach(link);
            }
        }
    }

    /// The maps, for the workers and the metrics exporter.
    pub fn maps(&self) -> std::sync::Arc<XdpMaps> {
        self.maps.clone()
    }

    /// Interfaces the program is attached to.
    pub fn interfaces(&self) -> Vec<String> {
        self.interfaces.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The mode it runs in.
    pub fn mode(&self) -> XdpMode {
        self.mode
    }
}

fn program(ebpf: &mut aya::Ebpf) -> Result<&mut aya::programs::Xdp, XdpError> {
    ebpf.program_mut("uturn_channel_relay")
        .ok_or_else(|| XdpError("the object has no uturn_channel_relay program".into()))?
        .try_into()
        .map_err(|e| err("uturn_channel_relay", e))
}

/// A duplicate of `map`'s descriptor.
fn map_fd(map: &Map) -> Option<io::Result<OwnedFd>> {
    let data = match map {
        Map::HashMap(d) | Map::PerCpuArray(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().try_clone_to_owned())
}

/// Names of the interfaces holding one of `addresses`.
fn interfaces_holding(addresses: &[IpAddr]) -> Result<Vec<String>, XdpError> {
    let mut names = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head to `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(err("getifaddrs", io::Error::last_os_error()));
    }
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: `ifa_addr` is non-null and points to a sockaddr of the family it names.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        let ip = match family {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        if !addresses.contains(&ip) {
            continue;
        }
        // SAFETY: `ifa_name` is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_maps_instants_onto_clock_monotonic() {
        let c = MonotonicClock::new();
        let later = c.base + std::time::Duration::from_millis(1500);
        assert_eq!(c.ns(later) - c.ns(c.base), 1_500_000_000);
        assert!(c.ns(c.base) > 0);
    }

    #[test]
    fn loopback_holds_127_0_0_1_and_1() {
        let names = interfaces_holding(&["127.0.0.1".parse().unwrap()]).unwrap();
        assert_eq!(names, vec!["lo".to_string()]);
        let names = interfaces_holding(&["::1".parse().unwrap()]).unwrap();
        assert!(names.is_empty() || names == vec!["lo".to_string()], "{names:?}");
    }
}
