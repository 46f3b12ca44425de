//! Channel routes for a kernel fast path (XDP): which channel bindings (RFC 8656 §12) may be
//! relayed without the worker, and until when.
//!
//! The worker's tables stay the only authority on expiry. A channel binding is offloadable
//! while its allocation, the binding itself and the permission for the peer's IP all live; its
//! route carries the earliest of the three deadlines, so the fast path stops at that instant by
//! itself (it hands the datagram to the socket path, which drops it as expired) even before the
//! timer wheel sweeps the state and the route is removed. Every change to an allocation marks it
//! dirty; [`WorkerState::take_offload_events`] recomputes the dirty allocations' routes and
//! reports the difference as [`OffloadEvent`]s for the shell to apply to the kernel's maps.
//!
//! With a per-allocation bandwidth cap nothing is offloaded: the fast path does not count
//! tokens, so a capped allocation stays on the socket path, which does.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

use hashbrown::HashMap;

use crate::wire::ChannelNumber;

use super::{AllocationId, FiveTuple, Traffic, Transport, WorkerState};

/// One channel binding as the fast path relays it, both ways: ChannelData on `channel` from
/// `client` to `server` goes out from `relayed` to `peer`; a datagram from `peer` to `relayed`
/// goes out from `server` to `client` as ChannelData on `channel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelRoute {
    /// The allocation the binding belongs to.
    pub alloc: AllocationId,
    /// The client's transport address (its 5-tuple's source).
    pub client: SocketAddr,
    /// The server transport address the client sends to.
    pub server: SocketAddr,
    /// The allocation's relayed transport address.
    pub relayed: SocketAddr,
    /// The peer the channel is bound to.
    pub peer: SocketAddr,
    /// The channel number.
    pub channel: ChannelNumber,
    /// When the route stops: the earliest of the allocation's, the binding's and the
    /// permission's deadlines.
    pub expires: Instant,
    /// The route's traffic counter slot, unique among the routes of all workers (each worker
    /// is given its own range).
    pub slot: u32,
}

/// A change to the routes the fast path holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadEvent {
    /// Insert a route, or update its deadline. `fresh` is true when its slot was free before, so
    /// its counters must be zeroed.
    Install {
        /// The route.
        route: ChannelRoute,
        /// True for a new route, false for a new deadline of an installed one.
        fresh: bool,
    },
    /// Remove a route (the binding, permission or allocation ended, or its addresses changed);
    /// its slot is free for another route once this event is applied, so read its counters first.
    Remove(ChannelRoute),
}

/// The routes one worker has offloaded and the allocations whose routes must be recomputed.
#[derive(Debug)]
pub(super) struct Offload {
    /// Routes installed, by allocation slab index.
    routes: HashMap<u32, Vec<ChannelRoute>>,
    /// Allocations changed since the last sync (duplicates allowed).
    dirty: Vec<AllocationId>,
    /// Free counter slots.
    free: Vec<u32>,
    /// Bindings that would have been offloaded but found no free slot.
    pub(super) no_slot: u64,
}

impl Offload {
    pub(super) fn new(slots: Range<u32>) -> Self {
        Offload { routes: HashMap::new(), dirty: Vec::new(), free: slots.rev().collect(), no_slot: 0 }
    }

    #[inline]
    pub(super) fn touch(&mut self, id: AllocationId) {
        self.dirty.push(id);
    }

    /// Routes installed now.
    pub(super) fn installed(&self) -> impl Iterator<Item = &ChannelRoute> {
        self.routes.values().flatten()
    }
}

/// True when the fast path can carry a route between these addresses: one family throughout
/// (IPv4, or IPv6 per RFC 6156; it does not translate between them), and a concrete server
/// address to send from. Only UDP 5-tuples: the program sees single datagrams, not TCP streams.
fn carried(ft: &FiveTuple, relayed: SocketAddr, peer: SocketAddr) -> bool {
    let (client, server) = (ft.client, ft.server);
    if ft.transport != Transport::Udp {
        return false;
    }
    let v4 = client.is_ipv4();
    [server, relayed, peer].iter().all(|a| a.is_ipv4() == v4) && !server.ip().is_unspecified()
}

impl WorkerState {
    /// Starts tracking channel routes for a kernel fast path, with counter slots from `slots`.
    /// Returns false (and tracks nothing) when a bandwidth cap is configured: capped
    /// allocations are not offloaded.
    pub fn enable_offload(&mut self, slots: Range<u32>) -> bool {
        if self.config.bandwidth.is_some() {
            return false;
        }
        let mut o = Offload::new(slots);
        for (id, _) in self.tables.iter() {
            o.touch(id);
        }
        self.offload = Some(o);
        true
    }

    /// Marks `id`'s routes for recomputation (no-op without offload).
    #[inline]
    pub(super) fn touch_offload(&mut self, id: AllocationId) {
        if let Some(o) = &mut self.offload {
            o.touch(id);
        }
    }

    /// Recomputes the routes of every allocation changed since the last call and appends the
    /// difference to `events`: removals first, so a slot freed here may be reused by an install
    /// in the same batch only after its removal.
    pub fn take_offload_events(&mut self, events: &mut Vec<OffloadEvent>) {
        let Some(o) = &mut self.offload else { return };
        if o.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut o.dirty);
        dirty.sort_unstable_by_key(|id| (id.index, id.generation));
        dirty.dedup_by_key(|id| id.index);
        let mut installs = Vec::new();
        for id in dirty.drain(..) {
            self.sync_routes(id.index, events, &mut installs);
        }
        events.append(&mut installs);
        if let Some(o) = &mut self.offload {
            o.dirty = dirty;
        }
    }

    /// The routes the tables allow now for the allocation in slab slot `index`, diffed against
    /// those installed.
    fn sync_routes(&mut self, index: u32, removes: &mut Vec<OffloadEvent>, installs: &mut Vec<OffloadEvent>) {
        let Some(o) = &mut self.offload else { return };
        let old = o.routes.remove(&index).unwrap_or_default();
        let t = &self.tables;
        let live = t.iter_slot(index);
        let mut new: Vec<ChannelRoute> = Vec::new();
        if let Some((id, a)) = live {
            for ch in &a.channels {
                let Some(b) = t.channels.get(&(index, *ch)) else { continue };
                let Some(&perm) = t.permissions.get(&(index, b.peer.ip())) else { continue };
                let Some(relayed) = a.relayed_for(&b.peer) else { continue };
                if !carried(&a.five_tuple, relayed, b.peer) {
                    continue;
                }
                let expires = a.expires.min(b.expires).min(perm);
                let existing = old.iter().find(|r| r.alloc == id && r.channel == *ch && r.peer == b.peer);
                let route = ChannelRoute {
                    alloc: id,
                    client: a.five_tuple.client,
                    server: a.five_tuple.server,
                    relayed,
                    peer: b.peer,
                    channel: *ch,
                    expires,
                    slot: existing.map_or(u32::MAX, |r| r.slot),
                };
                new.push(route);
            }
        }
        // Removals: installed routes with no counterpart now.
        for r in &old {
            if !new.iter().any(|n| n.slot == r.slot) {
                removes.push(OffloadEvent::Remove(*r));
                o.free.push(r.slot);
            }
        }
        new.retain_mut(|r| {
            if r.slot != u32::MAX {
                if old.iter().any(|x| x.slot == r.slot && x.expires != r.expires) {
                    installs.push(OffloadEvent::Install { route: *r, fresh: false });
                }
                return true;
            }
            match o.free.pop() {
                Some(slot) => {
                    r.slot = slot;
                    installs.push(OffloadEvent::Install { route: *r, fresh: true });
                    true
                }
                None => {
                    o.no_slot += 1;
                    false
                }
            }
        });
        if !new.is_empty() {
            o.routes.insert(index, new);
        }
    }

    /// Routes installed now (for the shell to read their counters).
    pub fn offloaded_routes(&self) -> Vec<ChannelRoute> {
        self.offload.as_ref().map_or_else(Vec::new, |o| o.installed().copied().collect())
    }

    /// Bindings not offloaded for want of a counter slot.
    pub fn offload_slot_shortfall(&self) -> u64 {
        self.offload.as_ref().map_or(0, |o| o.no_slot)
    }

    /// Credits traffic the fast path relayed for allocation `id` to its totals. Returns false
    /// when `id` is no longer live (the caller adds it to the allocation's [`super::Ended`]).
    pub fn credit_allocation(&mut self, id: AllocationId, to_peer: Traffic, to_client: Traffic) -> bool {
        match self.tables.get_mut(id) {
            Some(a) => {
                a.to_peer.packets += to_peer.packets;
                a.to_peer.bytes += to_peer.bytes;
                a.to_client.packets += to_client.packets;
                a.to_client.bytes += to_client.bytes;
                true
            }
            None => false,
        }
    }

    /// Credits traffic the fast path relayed for this worker to its counters (relayed packets
    /// and bytes, and the offloaded share of them).
    pub fn credit_worker(&mut self, to_peer: Traffic, to_client: Traffic) {
        let c = &mut self.counters;
        c.relayed_to_peer += to_peer.packets;
        c.bytes_to_peer += to_peer.bytes;
        c.relayed_to_client += to_client.packets;
        c.bytes_to_client += to_client.bytes;
        c.offloaded_to_peer += to_peer.packets;
        c.offloaded_to_client += to_client.packets;
    }
}
