//! The per-worker tables (RFC 8656 §2.2, §9, §12): allocations in a slab, and hash maps from
//! 5-tuple to allocation, (allocation, channel) to peer, (allocation, peer) to channel and
//! (allocation, peer IP) to permission expiry. Removing an allocation removes everything it owns.

use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use smallvec::SmallVec;

use crate::wire::{ChannelNumber, IntegrityKey, TransactionId};

use super::{AllocationId, FiveTuple, Traffic};

/// An allocation's peer IPs with a permission: the first one inline (32 bytes, no heap block for
/// the common single peer), more on the heap.
pub type PermissionList = SmallVec<[IpAddr; 1]>;
/// An allocation's bound channels: up to four inline (24 bytes), more on the heap.
pub type ChannelList = SmallVec<[ChannelNumber; 4]>;

/// One allocation (RFC 8656 §2.2).
#[derive(Debug)]
pub struct Allocation {
    /// The client's 5-tuple.
    pub five_tuple: FiveTuple,
    /// The relayed transport address.
    pub relayed: SocketAddr,
    /// A dual allocation's second relayed transport address, of the other family (RFC 8656
    /// §7.2, ADDITIONAL-ADDRESS-FAMILY); boxed, as few allocations are dual (8 bytes in each
    /// slot instead of 32).
    pub additional: Option<Box<SocketAddr>>,
    /// When the allocation expires unless refreshed.
    pub expires: Instant,
    /// Transaction ID of the Allocate that created it.
    pub alloc_tid: TransactionId,
    /// The Allocate success response, for retransmissions.
    pub alloc_response: Box<[u8]>,
    /// The long-term key (RFC 8489 §9.2.2) of the user who made it: the worker verifies the
    /// MESSAGE-INTEGRITY of requests on this allocation with it, so they skip the per-source
    /// budget.
    pub key: IntegrityKey,
    /// Peer IPs with a permission (keys of [`Tables::permissions`]).
    pub permissions: PermissionList,
    /// Bound channels (keys of [`Tables::channels`]).
    pub channels: ChannelList,
    /// Bandwidth tokens left, bytes (see `RelayConfig::bandwidth`).
    pub tokens: u64,
    /// When `tokens` was last refilled.
    pub refilled: Instant,
    /// The session id the control plane gave it (in every log line and admin answer about it).
    pub session: u64,
    /// The user who made it (as authenticated: a REST username keeps its expiry prefix).
    pub user: Arc<str>,
    /// When it was made.
    pub created: Instant,
    /// Application data relayed from the client to peers.
    pub to_peer: Traffic,
    /// Application data relayed from peers to the client.
    pub to_client: Traffic,
    /// A TCP allocation (RFC 6062): its relayed transport address is a TCP listener that the
    /// control plane's TCP relay holds, and its data flows on separate connections, so Send
    /// indications on it are dropped.
    pub tcp: bool,
}

impl Allocation {
    /// The relayed transport address that reaches `peer`: the one of its family (RFC 8656 §9.1:
    /// a peer of neither family has no permission, so nothing is relayed to it).
    #[inline]
    pub fn relayed_for(&self, peer: &SocketAddr) -> Option<SocketAddr> {
        if self.relayed.is_ipv4() == peer.is_ipv4() {
            Some(self.relayed)
        } else {
            self.additional.as_deref().copied().filter(|a| a.is_ipv4() == peer.is_ipv4())
        }
    }
}

/// A channel binding (RFC 8656 §12).
#[derive(Debug, Clone, Copy)]
pub struct ChannelBinding {
    /// The peer transport address the channel is bound to.
    pub peer: SocketAddr,
    /// When the binding expires unless refreshed.
    pub expires: Instant,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    allocation: Option<Allocation>,
}

/// All allocation state of one worker.
#[derive(Debug, Default)]
pub struct Tables {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// 5-tuple -> allocation: the slab indices of the live allocations, hashed by their
    /// [`Allocation::five_tuple`] and compared through the slab, so the 68-byte 5-tuple is stored
    /// once (in the slab) and each bucket here is 4 bytes (see the memory budget in
    /// docs/architecture.md).
    /// Each entry is (slab index, the hash's high 32 bits): the probe compares the latter, so it
    /// stays within the table, and only the one candidate is checked in the slab.
    by_five_tuple: HashTable<(u32, u32)>,
    /// The hasher of `by_five_tuple`.
    hasher: DefaultHashBuilder,
    /// (allocation slot, channel) -> binding.
    pub channels: HashMap<(u32, ChannelNumber), ChannelBinding>,
    /// (allocation slot, peer transport address) -> channel: the keys of `channels`, hashed by
    /// the slot and the binding's peer and compared through `channels`, so each bucket is 8
    /// bytes rather than 40 (see [`channel_to`](Self::channel_to)).
    /// Each entry is (slot, channel, the hash's high 16 bits), compared like `by_five_tuple`'s.
    peer_channels: HashTable<(u32, ChannelNumber, u16)>,
    /// (allocation slot, peer IP) -> permission expiry.
    pub permissions: HashMap<(u32, IpAddr), Instant>,
}

impl Tables {
    /// Number of live allocations.
    pub fn allocation_count(&self) -> usize {
        self.by_five_tuple.len()
    }

    /// The channel bound to `peer` on the allocation in slot `index`, with its binding (expired
    /// or not: the caller checks). One lookup here and one in `channels`, as a map from
    /// (slot, peer) to channel would take.
    #[inline]
    pub fn channel_to(&self, index: u32, peer: SocketAddr) -> Option<(ChannelNumber, &ChannelBinding)> {
        let hash = self.hasher.hash_one((index, peer));
        let fp = (hash >> 48) as u16;
        let bound = |ch: ChannelNumber| self.channels.get(&(index, ch)).filter(|b| b.peer == peer).map(|b| (ch, b));
        let &(_, ch, _) = self.peer_channels.find(hash, |&(i, _, f)| i == index && f == fp)?;
        if let Some(found) = bound(ch) {
            return Some(found);
        }
        // Another peer of this allocation whose hash shares those bits: look at every candidate.
        self.peer_channels.iter_hash(hash).find_map(|&(i, ch, f)| if i == index && f == fp { bound(ch) } else { None })
    }

    /// Removes `(index, channel)`, bound to `peer`, from `peer_channels`.
    fn unindex_peer(&mut self, index: u32, channel: ChannelNumber, peer: SocketAddr) {
        let hash = self.hasher.hash_one((index, peer));
        if let Ok(entry) = self.peer_channels.find_entry(hash, |&(i, ch, _)| i == index && ch == channel) {
            entry.remove();
        }
    }

    /// The ids of the live allocations.
    pub fn ids(&self) -> Vec<AllocationId> {
        self.by_five_tuple
            .iter()
            .map(|&(index, _)| AllocationId { index, generation: self.slots[index as usize].generation })
            .collect()
    }

    /// The five-tuple of the allocation in slab slot `index` (a live one: the table holds only
    /// those).
    #[inline]
    fn five_tuple_at(slots: &[Slot], index: u32) -> Option<&FiveTuple> {
        slots.get(index as usize).and_then(|s| s.allocation.as_ref()).map(|a| &a.five_tuple)
    }

    /// Every allocation in the slab with its id.
    pub fn iter(&self) -> impl Iterator<Item = (AllocationId, &Allocation)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.allocation.as_ref().map(|a| (AllocationId { index: i as u32, generation: s.generation }, a))
        })
    }

    /// Inserts `a` and returns its id. The caller has checked the 5-tuple is free.
    pub fn insert(&mut self, a: Allocation) -> AllocationId {
        let ft = a.five_tuple;
        let index = match self.free.pop() {
            Some(i) => {
                let slot = &mut self.slots[i as usize];
                slot.allocation = Some(a);
                i
            }
            None => {
                self.slots.push(Slot { generation: 0, allocation: Some(a) });
                (self.slots.len() - 1) as u32
            }
        };
        let id = AllocationId { index, generation: self.slots[index as usize].generation };
        let Tables { slots, by_five_tuple, hasher, .. } = self;
        let hash = hasher.hash_one(ft);
        let same = |&(i, _): &(u32, u32)| i != index && Tables::five_tuple_at(slots, i) == Some(&ft);
        if let Ok(old) = by_five_tuple.find_entry(hash, same) {
            old.remove();
        }
        by_five_tuple.insert_unique(hash, (index, (hash >> 32) as u32), |&(i, _)| {
            Tables::five_tuple_at(slots, i).map_or(0, |ft| hasher.hash_one(ft))
        });
        id
    }

    /// The allocation in slab slot `index`, with its id, if the slot is occupied.
    pub fn iter_slot(&self, index: u32) -> Option<(AllocationId, &Allocation)> {
        let slot = self.slots.get(index as usize)?;
        slot.allocation.as_ref().map(|a| (AllocationId { index, generation: slot.generation }, a))
    }

    /// The live allocation `id` names, if any (a stale id whose slot was reused yields `None`).
    pub fn get(&self, id: AllocationId) -> Option<&Allocation> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.allocation.as_ref()
    }

    /// Mutable access to the live allocation `id` names.
    pub fn get_mut(&mut self, id: AllocationId) -> Option<&mut Allocation> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.allocation.as_mut()
    }

    /// The allocation of a 5-tuple.
    #[inline]
    pub fn lookup(&self, ft: &FiveTuple) -> Option<AllocationId> {
        self.lookup_allocation(ft).map(|(id, _)| id)
    }

    /// The allocation of a 5-tuple, with its id (one visit to the slab).
    #[inline]
    pub fn lookup_allocation(&self, ft: &FiveTuple) -> Option<(AllocationId, &Allocation)> {
        let hash = self.hasher.hash_one(ft);
        let fp = (hash >> 32) as u32;
        let live = |index: u32| match self.slots.get(index as usize) {
            Some(Slot { generation, allocation: Some(a) }) if a.five_tuple == *ft => {
                Some((AllocationId { index, generation: *generation }, a))
            }
            _ => None,
        };
        let &(index, _) = self.by_five_tuple.find(hash, |&(_, f)| f == fp)?;
        if let Some(id) = live(index) {
            return Some(id);
        }
        // Another 5-tuple whose hash shares those bits: look at every candidate.
        self.by_five_tuple.iter_hash(hash).find_map(|&(i, f)| if f == fp { live(i) } else { None })
    }

    /// Removes allocation `id` with its permissions and channels; returns it if it was live.
    pub fn remove(&mut self, id: AllocationId) -> Option<Allocation> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let a = slot.allocation.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.index);
        let hash = self.hasher.hash_one(a.five_tuple);
        if let Ok(entry) = self.by_five_tuple.find_entry(hash, |&(i, _)| i == id.index) {
            entry.remove();
        }
        for ip in &a.permissions {
            self.permissions.remove(&(id.index, *ip));
        }
        for ch in &a.channels {
            if let Some(b) = self.channels.remove(&(id.index, *ch)) {
                self.unindex_peer(id.index, *ch, b.peer);
            }
        }
        Some(a)
    }

    /// Installs or refreshes a permission; returns true when it is new.
    pub fn set_permission(&mut self, id: AllocationId, ip: IpAddr, expires: Instant) -> bool {
        let new = self.permissions.insert((id.index, ip), expires).is_none();
        if new {
            if let Some(a) = self.get_mut(id) {
                a.permissions.push(ip);
            }
        }
        new
    }

    /// Removes a permission.
    pub fn remove_permission(&mut self, id: AllocationId, ip: IpAddr) {
        if self.permissions.remove(&(id.index, ip)).is_some() {
            if let Some(a) = self.get_mut(id) {
                a.permissions.retain(|p| *p != ip);
            }
        }
    }

    /// Binds or refreshes `channel` to `peer`; returns true when the binding is new.
    /// The caller has checked neither is bound to something else.
    pub fn set_channel(
        &mut self,
        id: AllocationId,
        channel: ChannelNumber,
        peer: SocketAddr,
        expires: Instant,
    ) -> bool {
        let new = self.channels.insert((id.index, channel), ChannelBinding { peer, expires }).is_none();
        if new {
            let Tables { channels, peer_channels, hasher, .. } = self;
            let hash = hasher.hash_one((id.index, peer));
            peer_channels.insert_unique(hash, (id.index, channel, (hash >> 48) as u16), |&(i, ch, _)| {
                channels.get(&(i, ch)).map_or(0, |b| hasher.hash_one((i, b.peer)))
            });
            if let Some(a) = self.get_mut(id) {
                a.channels.push(channel);
            }
        }
        new
    }

    /// Removes a channel binding.
    pub fn remove_channel(&mut self, id: AllocationId, channel: ChannelNumber) {
        if let Some(b) = self.channels.remove(&(id.index, channel)) {
            self.unindex_peer(id.index, channel, b.peer);
            if let Some(a) = self.get_mut(id) {
                a.channels.retain(|c| *c != channel);
            }
        }
    }

    /// Checks that every index agrees with the slab; returns a description of the first
    /// disagreement. For tests and fuzzing.
    pub fn check_consistency(&self) -> Result<(), String> {
        let live: Vec<(AllocationId, &Allocation)> = self.iter().collect();
        if live.len() != self.by_five_tuple.len() {
            return Err(format!("{} live allocations but {} 5-tuples", live.len(), self.by_five_tuple.len()));
        }
        let (mut perms, mut chans) = (0, 0);
        for (id, a) in &live {
            if self.lookup(&a.five_tuple) != Some(*id) {
                return Err(format!("5-tuple {:?} does not map to {:?}", a.five_tuple, id));
            }
            for ip in &a.permissions {
                if !self.permissions.contains_key(&(id.index, *ip)) {
                    return Err(format!("permission {ip} of {id:?} missing"));
                }
            }
            for ch in &a.channels {
                let b = self.channels.get(&(id.index, *ch)).ok_or(format!("channel {ch:?} missing"))?;
                if self.channel_to(id.index, b.peer).map(|(c, _)| c) != Some(*ch) {
                    return Err(format!("peer {} of channel {ch:?} not indexed", b.peer));
                }
            }
            perms += a.permissions.len();
            chans += a.channels.len();
        }
        if perms != self.permissions.len() || chans != self.channels.len() || chans != self.peer_channels.len() {
            return Err(format!(
                "lists hold {perms} permissions / {chans} channels, maps {} / {} / {}",
                self.permissions.len(),
                self.channels.len(),
                self.peer_channels.len()
            ));
        }
        Ok(())
    }
}
