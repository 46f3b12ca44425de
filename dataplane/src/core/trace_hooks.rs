//! The worker's side of the trace tap (`crate::trace`): the traced variants of the datagram
//! handlers, taken only while a trace is active. Each handles the datagram exactly as the
//! untraced path does, then copies what matched into the tap's queue (never blocking).

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use uturn_proto::relay::Counters;
use uturn_proto::FiveTuple;

use super::{ClientVerdict, PeerVerdict, WorkerCore};
use crate::trace::{snap, Direction, DropReason, Origin, Tap, TapEvent};

/// What the tap records of an allocation.
type Owner = (u64, Option<Arc<str>>, Option<SocketAddr>);

impl WorkerCore {
    /// Session, user and relayed address of `ft`'s allocation (none yet: 0).
    fn owner(&self, ft: &FiveTuple) -> Owner {
        match self.state.tables().lookup_allocation(ft) {
            Some((_, a)) => (a.session, Some(a.user.clone()), Some(a.relayed)),
            None => (0, None, None),
        }
    }

    /// [`Self::handle_message`], then the message (and the worker's answer) copied when a
    /// trace matches.
    pub(super) fn on_message_traced(&mut self, now: Instant, ft: &FiveTuple, datagram: &[u8]) -> ClientVerdict {
        if self.holds.holds(ft) {
            // Held behind a request at the control plane: copied when it is handled.
            return self.handle_message(now, ft, datagram);
        }
        let before = *self.state.counters();
        // Its allocation as it was when it arrived (a Refresh of lifetime 0 ends it).
        let (session, user, relayed) = self.owner(ft);
        let verdict = self.handle_message(now, ft, datagram);
        let filter = self.tap.filter_arc();
        let matched = filter.matches(ft, session, user.as_deref());
        let pending = !matched && session == 0 && filter.by_user() && unattributed_exchange(datagram);
        if !matched && !pending {
            return verdict;
        }
        let peer = match &verdict {
            ClientVerdict::ToPeer { peer, .. } => Some(*peer),
            _ => self.channel_peer(ft, datagram),
        };
        let dropped = match verdict {
            ClientVerdict::Done => drop_reason(&before, self.state.counters()),
            _ => None,
        };
        let event = TapEvent {
            at: SystemTime::now(),
            worker: self.index,
            five_tuple: *ft,
            session,
            user: user.clone(),
            relayed,
            direction: Direction::FromClient,
            origin: Origin::Worker,
            peer,
            dropped,
            pending,
            len: datagram.len(),
            bytes: snap(datagram, filter.snaplen).to_vec(),
        };
        let tap = Tap::get();
        tap.send(event);
        if let ClientVerdict::Reply(n) = verdict {
            let reply = &self.reply[..n];
            tap.send(TapEvent {
                at: SystemTime::now(),
                worker: self.index,
                five_tuple: *ft,
                session,
                user,
                relayed,
                direction: Direction::ToClient,
                origin: Origin::Worker,
                peer: None,
                dropped: None,
                pending,
                len: n,
                bytes: reply.to_vec(),
            });
        }
        verdict
    }

    /// [`Self::handle_peer`], then what went to the client (or the drop) copied when a trace
    /// matches.
    pub(super) fn on_peer_traced(
        &mut self,
        now: Instant,
        relay: usize,
        peer: SocketAddr,
        buf: &mut [u8],
        payload: Range<usize>,
    ) -> PeerVerdict {
        let Some(Some(r)) = self.relays.get(relay) else { return PeerVerdict::Drop };
        let alloc = r.id;
        let before = *self.state.counters();
        let len = payload.len();
        let (verdict, message) = self.handle_peer(now, relay, peer, buf, payload);
        let Some(a) = self.state.tables().get(alloc) else { return verdict };
        let (ft, session, user, relayed) = (a.five_tuple, a.session, a.user.clone(), a.relayed);
        let filter = self.tap.filter_arc();
        if !filter.matches(&ft, session, Some(&user)) {
            return verdict;
        }
        let (direction, dropped, len, bytes) = match message {
            Some(m) => (Direction::ToClient, None, m.len(), snap(&buf[m], filter.snaplen).to_vec()),
            None => (Direction::FromPeer, drop_reason(&before, self.state.counters()), len, Vec::new()),
        };
        Tap::get().send(TapEvent {
            at: SystemTime::now(),
            worker: self.index,
            five_tuple: ft,
            session,
            user: Some(user),
            relayed: Some(relayed),
            direction,
            origin: Origin::Worker,
            peer: Some(peer),
            dropped,
            pending: false,
            len,
            bytes,
        });
        verdict
    }

    /// The answer the worker sends to a request the control plane handled (in `reply`), copied
    /// when a trace matches.
    pub(super) fn tap_reply(&mut self, ft: &FiveTuple, n: usize) {
        let (session, user, relayed) = self.owner(ft);
        let filter = self.tap.filter_arc();
        let reply = &self.reply[..n];
        let matched = filter.matches(ft, session, user.as_deref());
        let pending = !matched && session == 0 && filter.by_user() && unattributed_exchange(reply);
        if !matched && !pending {
            return;
        }
        Tap::get().send(TapEvent {
            at: SystemTime::now(),
            worker: self.index,
            five_tuple: *ft,
            session,
            user,
            relayed,
            direction: Direction::ToClient,
            origin: Origin::ControlPlane,
            peer: None,
            dropped: None,
            pending,
            len: n,
            bytes: reply.to_vec(),
        });
    }

    /// The peer bound to a ChannelData message's channel, if any.
    fn channel_peer(&self, ft: &FiveTuple, datagram: &[u8]) -> Option<SocketAddr> {
        if datagram.len() < 4 || datagram[0] & 0xC0 != 0x40 {
            return None;
        }
        let t = self.state.tables();
        let (id, _) = t.lookup_allocation(ft)?;
        let channel = uturn_proto::wire::ChannelData::parse(datagram).ok()?.channel();
        t.channels.get(&(id.index, channel)).map(|b| b.peer)
    }
}

/// True for a STUN request or response other than Binding: on a 5-tuple with no allocation, a
/// user trace needs it until the tracer learns whose it is (its USERNAME, or the allocation it
/// makes).
fn unattributed_exchange(message: &[u8]) -> bool {
    if message.len() < 20 || message[0] & 0xC0 != 0 {
        return false;
    }
    let typ = u16::from_be_bytes([message[0], message[1]]);
    typ & 0x0110 != 0x0010 && typ & 0x3EEF != 0x0001
}

/// Which drop counter the handler incremented.
fn drop_reason(before: &Counters, after: &Counters) -> Option<DropReason> {
    Some(if after.no_permission > before.no_permission {
        DropReason::NoPermission
    } else if after.unbound_channel > before.unbound_channel {
        DropReason::UnboundChannel
    } else if after.no_allocation > before.no_allocation {
        DropReason::NoAllocation
    } else if after.bandwidth_drops > before.bandwidth_drops {
        DropReason::Bandwidth
    } else if after.malformed_channel_data > before.malformed_channel_data
        || after.dropped_indications > before.dropped_indications
        || after.malformed_stun > before.malformed_stun
    {
        DropReason::Other
    } else {
        return None;
    })
}
