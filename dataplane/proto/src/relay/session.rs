//! A session (an allocation, RFC 8656 §2.2) seen from outside its worker: what the admin API
//! shows about it ([`SessionInfo`]), and the whole of it as a hot upgrade hands it to the next
//! process ([`AllocationSnapshot`]). Instants do not cross processes, so every deadline travels as
//! the time left, measured when the snapshot was taken.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::wire::{ChannelNumber, IntegrityKey, TransactionId};

use super::{Allocation, AllocationId, ChannelList, FiveTuple, PermissionList, Timer, WorkerState};

/// Application data relayed one way: datagrams and their payload bytes (the ChannelData or
/// DATA contents, without headers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Traffic {
    /// Datagrams.
    pub packets: u64,
    /// Payload bytes.
    pub bytes: u64,
}

impl Traffic {
    /// Counts one datagram of `len` payload bytes.
    #[inline]
    pub fn add(&mut self, len: usize) {
        self.packets += 1;
        self.bytes += len as u64;
    }
}

/// What the admin API shows about one allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SessionInfo {
    /// Session id.
    pub id: u64,
    /// The authenticated username.
    pub user: String,
    /// The client's transport address.
    pub client: SocketAddr,
    /// The server transport address the client uses.
    pub server: SocketAddr,
    /// The relayed transport address.
    pub relayed: SocketAddr,
    /// A dual allocation's second relayed transport address.
    pub additional: Option<SocketAddr>,
    /// Seconds since the allocation was made.
    pub age_s: u64,
    /// Seconds until it expires unless refreshed.
    pub expires_in_s: u64,
    /// Peer IPs with a live permission.
    pub permissions: Vec<IpAddr>,
    /// Live channel bindings: channel number and peer.
    pub channels: Vec<(u16, SocketAddr)>,
    /// Client to peers.
    pub to_peer: Traffic,
    /// Peers to client.
    pub to_client: Traffic,
}

/// Everything about one allocation that the next process needs to serve it as if nothing had
/// happened: its tables' rows, its key, its retransmission answer and its totals.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AllocationSnapshot {
    /// The client's 5-tuple.
    pub five_tuple: FiveTuple,
    /// The relayed transport address (the socket travels beside the snapshot).
    pub relayed: SocketAddr,
    /// A dual allocation's second relayed transport address (its socket follows the first).
    #[cfg_attr(feature = "serde", serde(default))]
    pub additional: Option<SocketAddr>,
    /// Milliseconds until the allocation expires unless refreshed.
    pub lifetime_left_ms: u64,
    /// Transaction ID of the Allocate that made it.
    pub alloc_tid: TransactionId,
    /// The Allocate success response, resent to retransmissions.
    pub alloc_response: Vec<u8>,
    /// The user's long-term key.
    pub key: IntegrityKey,
    /// Session id.
    pub session: u64,
    /// The authenticated username.
    pub user: String,
    /// Milliseconds since the allocation was made.
    pub age_ms: u64,
    /// Permissions: peer IP and milliseconds left.
    pub permissions: Vec<(IpAddr, u64)>,
    /// Channel bindings: channel number, peer and milliseconds left.
    pub channels: Vec<(u16, SocketAddr, u64)>,
    /// Client to peers so far.
    pub to_peer: Traffic,
    /// Peers to client so far.
    pub to_client: Traffic,
}

/// Why [`WorkerState::import`] refused a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportError {
    /// The 5-tuple already has an allocation here.
    FiveTupleTaken,
    /// The lifetime has run out.
    Expired,
    /// A channel number outside 0x4000-0x7FFF.
    BadChannel(u16),
}

fn left_ms(deadline: Instant, now: Instant) -> u64 {
    deadline.saturating_duration_since(now).as_millis() as u64
}

fn info(now: Instant, tables: &super::Tables, id: AllocationId, a: &Allocation) -> SessionInfo {
    SessionInfo {
        id: a.session,
        user: a.user.to_string(),
        client: a.five_tuple.client,
        server: a.five_tuple.server,
        relayed: a.relayed,
        additional: a.additional.as_deref().copied(),
        age_s: now.saturating_duration_since(a.created).as_secs(),
        expires_in_s: a.expires.saturating_duration_since(now).as_secs(),
        permissions: a
            .permissions
            .iter()
            .copied()
            .filter(|ip| tables.permissions.get(&(id.index, *ip)).is_some_and(|e| *e > now))
            .collect(),
        channels: a
            .channels
            .iter()
            .filter_map(|c| tables.channels.get(&(id.index, *c)).filter(|b| b.expires > now).map(|b| (c.get(), b.peer)))
            .collect(),
        to_peer: a.to_peer,
        to_client: a.to_client,
    }
}

impl WorkerState {
    /// The live allocations (expiry at `now` decides, swept or not), in slab order.
    pub fn sessions(&self, now: Instant) -> Vec<SessionInfo> {
        self.tables.iter().filter(|(_, a)| a.expires > now).map(|(id, a)| info(now, &self.tables, id, a)).collect()
    }

    /// Snapshots of the live allocations with their ids here (so the caller pairs each with its
    /// relay socket). Permissions and bindings already past their deadline are left out.
    pub fn export(&self, now: Instant) -> Vec<(AllocationId, AllocationSnapshot)> {
        let t = &self.tables;
        t.iter()
            .filter(|(_, a)| a.expires > now)
            .map(|(id, a)| {
                let permissions = a
                    .permissions
                    .iter()
                    .filter_map(|ip| {
                        t.permissions.get(&(id.index, *ip)).filter(|e| **e > now).map(|e| (*ip, left_ms(*e, now)))
                    })
                    .collect();
                let channels = a
                    .channels
                    .iter()
                    .filter_map(|c| {
                        t.channels
                            .get(&(id.index, *c))
                            .filter(|b| b.expires > now)
                            .map(|b| (c.get(), b.peer, left_ms(b.expires, now)))
                    })
                    .collect();
                let snap = AllocationSnapshot {
                    five_tuple: a.five_tuple,
                    relayed: a.relayed,
                    additional: a.additional.as_deref().copied(),
                    lifetime_left_ms: left_ms(a.expires, now),
                    alloc_tid: a.alloc_tid,
                    alloc_response: a.alloc_response.to_vec(),
                    key: a.key,
                    session: a.session,
                    user: a.user.to_string(),
                    age_ms: now.saturating_duration_since(a.created).as_millis() as u64,
                    permissions,
                    channels,
                    to_peer: a.to_peer,
                    to_client: a.to_client,
                };
                (id, snap)
            })
            .collect()
    }

    /// Installs an allocation from another process's snapshot, deadlines counted from `now`;
    /// returns its id here. Its bandwidth bucket starts full.
    pub fn import(&mut self, now: Instant, s: AllocationSnapshot) -> Result<AllocationId, ImportError> {
        if s.lifetime_left_ms == 0 {
            return Err(ImportError::Expired);
        }
        if self.tables.lookup(&s.five_tuple).is_some() {
            return Err(ImportError::FiveTupleTaken);
        }
        let mut channels = Vec::with_capacity(s.channels.len());
        for (n, peer, left) in &s.channels {
            let c = ChannelNumber::new_rfc5766(*n).ok_or(ImportError::BadChannel(*n))?;
            channels.push((c, *peer, *left));
        }
        let expires = now + Duration::from_millis(s.lifetime_left_ms);
        let id = self.tables.insert(Allocation {
            five_tuple: s.five_tuple,
            relayed: s.relayed,
            additional: s.additional.map(Box::new),
            expires,
            alloc_tid: s.alloc_tid,
            alloc_response: s.alloc_response.into(),
            key: s.key,
            permissions: PermissionList::new(),
            channels: ChannelList::new(),
            tokens: self.config.bandwidth.unwrap_or(0),
            refilled: now,
            session: s.session,
            user: s.user.into(),
            created: now.checked_sub(Duration::from_millis(s.age_ms)).unwrap_or(now),
            to_peer: s.to_peer,
            to_client: s.to_client,
            tcp: false,
        });
        self.timers.schedule(expires, Timer::Allocation(id));
        for (ip, left) in s.permissions {
            let e = now + Duration::from_millis(left);
            if self.tables.set_permission(id, ip, e) {
                self.timers.schedule(e, Timer::Permission(id, ip));
            }
        }
        for (c, peer, left) in channels {
            let e = now + Duration::from_millis(left);
            if self.tables.set_channel(id, c, peer, e) {
                self.timers.schedule(e, Timer::Channel(id, c));
            }
        }
        self.touch_offload(id);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::RelayConfig;

    #[test]
    fn an_empty_worker_exports_nothing_and_refuses_expired_snapshots() {
        let now = Instant::now();
        let mut w = WorkerState::new(RelayConfig::default(), now, 1);
        assert!(w.export(now).is_empty());
        let s = AllocationSnapshot {
            five_tuple: FiveTuple::udp("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()),
            relayed: "127.0.0.1:3".parse().unwrap(),
            additional: None,
            lifetime_left_ms: 0,
            alloc_tid: TransactionId([1; 12]),
            alloc_response: vec![],
            key: IntegrityKey::from_md5([0; 16]),
            session: 7,
            user: "u".into(),
            age_ms: 0,
            permissions: vec![],
            channels: vec![],
            to_peer: Traffic::default(),
            to_client: Traffic::default(),
        };
        assert_eq!(w.import(now, s.clone()), Err(ImportError::Expired));
        let bad = AllocationSnapshot { lifetime_left_ms: 1000, channels: vec![(1, s.relayed, 10)], ..s.clone() };
        assert_eq!(w.import(now, bad), Err(ImportError::BadChannel(1)));
        assert_eq!(w.tables().allocation_count(), 0, "a refused snapshot leaves nothing behind");
        let ok = AllocationSnapshot { lifetime_left_ms: 1000, ..s.clone() };
        w.import(now, ok.clone()).unwrap();
        assert_eq!(w.import(now, ok), Err(ImportError::FiveTupleTaken));
    }
}
