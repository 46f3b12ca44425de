//! Applying the control plane's [`Command`]s to a worker's tables (RFC 8656 §7.2 install, §8
//! Refresh, §10 CreatePermission, §12.2 ChannelBind). Expiry is exact at every decision: an
//! allocation, permission or channel binding whose deadline has passed is treated as gone even
//! when the timer wheel has not swept it yet.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::response::{self, ErrorCode};
use crate::wire::{self, attr, ChannelNumber, Class, IntegrityKey, MessageWriter, Method, TransactionId};

use super::{
    Allocation, AllocationId, ChannelList, Command, CommandOutput, Effect, EndReason, Ended, FiveTuple, Install,
    PermissionList, Timer, Traffic, WorkerState,
};

/// How far ahead of its deadline an allocation may be ended by an Install for a new Allocate on
/// its 5-tuple (the control plane's view of the deadline trails the worker's by the queueing
/// delay of the original Install; 1 s is far beyond that and far below any lifetime).
const LAPSE_MARGIN: Duration = Duration::from_secs(1);

impl WorkerState {
    /// Applies a control-plane [`Command`]; any reply for the client is written to `out`
    /// (at least 512 bytes). Every error answer to an authenticated request is signed with its
    /// key (RFC 8489 §9.2.4).
    pub fn handle_command(&mut self, now: Instant, cmd: Command, out: &mut [u8]) -> CommandOutput {
        let out = self.apply_command(now, cmd, out);
        if self.offload.is_some() {
            if let Some(id) = self.tables.lookup(&out.five_tuple) {
                self.touch_offload(id);
            }
        }
        out
    }

    fn apply_command(&mut self, now: Instant, cmd: Command, out: &mut [u8]) -> CommandOutput {
        match cmd {
            Command::Install(i) => self.install(now, i, out),
            Command::Reply { five_tuple, bytes } => {
                let reply_len = if bytes.len() <= out.len() {
                    out[..bytes.len()].copy_from_slice(&bytes);
                    bytes.len()
                } else {
                    0
                };
                CommandOutput { five_tuple, reply_len, effect: Effect::None }
            }
            Command::Revoke { five_tuple, tid } => {
                let id = self
                    .tables
                    .lookup(&five_tuple)
                    .filter(|id| self.tables.get(*id).is_some_and(|a| a.alloc_tid == tid));
                let effect = match id.and_then(|id| self.end(id, EndReason::Revoked)) {
                    Some(ended) => Effect::Removed(ended),
                    None => Effect::None,
                };
                CommandOutput { five_tuple, reply_len: 0, effect }
            }
            Command::Refresh { five_tuple, tid, lifetime, key } => {
                let method = Method::REFRESH;
                let Some(id) = self.live_allocation(now, &five_tuple) else {
                    return self.refuse(ErrorCode::AllocationMismatch, five_tuple, method, tid, &key, out);
                };
                let effect = if lifetime.is_zero() {
                    match self.end(id, EndReason::Deleted) {
                        Some(ended) => Effect::Removed(ended),
                        None => Effect::None,
                    }
                } else {
                    if let Some(a) = self.tables.get_mut(id) {
                        // The pending timer sees the later deadline and files itself again.
                        a.expires = now + lifetime;
                    }
                    Effect::None
                };
                let reply_len = success(out, method, tid, &key, |w| {
                    w.u32(attr::LIFETIME, lifetime.as_secs() as u32)?;
                    Ok(())
                });
                CommandOutput { five_tuple, reply_len, effect }
            }
            Command::CreatePermission { five_tuple, tid, peers, key } => {
                let method = Method::CREATE_PERMISSION;
                let Some(id) = self.live_allocation(now, &five_tuple) else {
                    return self.refuse(ErrorCode::AllocationMismatch, five_tuple, method, tid, &key, out);
                };
                let held = self.live_permissions(now, id);
                let mut new: Vec<IpAddr> =
                    peers.iter().copied().filter(|ip| !self.has_permission(now, id, *ip)).collect();
                new.sort_unstable();
                new.dedup();
                if held + new.len() > self.config.max_permissions {
                    return self.refuse(ErrorCode::InsufficientCapacity, five_tuple, method, tid, &key, out);
                }
                for ip in peers {
                    self.permit(now, id, ip);
                }
                let reply_len = success(out, method, tid, &key, |_| Ok(()));
                CommandOutput { five_tuple, reply_len, effect: Effect::None }
            }
            Command::ChannelBind { five_tuple, tid, channel, peer, key } => {
                let method = Method::CHANNEL_BIND;
                let Some(id) = self.live_allocation(now, &five_tuple) else {
                    return self.refuse(ErrorCode::AllocationMismatch, five_tuple, method, tid, &key, out);
                };
                // A binding past its deadline is unbound (RFC 8656 §12), swept or not: it neither
                // conflicts nor counts against the cap.
                self.unbind_if_expired(now, id, channel);
                if let Some((other, _)) = self.tables.channel_to(id.index, peer) {
                    self.unbind_if_expired(now, id, other);
                }
                // RFC 8656 §12.2: a channel and a peer bind one to one.
                let channel_taken = matches!(self.tables.channels.get(&(id.index, channel)), Some(b) if b.peer != peer);
                let peer_taken = matches!(self.tables.channel_to(id.index, peer), Some((c, _)) if c != channel);
                if channel_taken || peer_taken {
                    return self.refuse(ErrorCode::BadRequest, five_tuple, method, tid, &key, out);
                }
                let channels = self
                    .tables
                    .get(id)
                    .map_or(0, |a| a.channels.iter().filter(|c| self.channel_live(now, id, **c)).count());
                let permissions = self.live_permissions(now, id);
                let new_channel = !self.channel_live(now, id, channel);
                let new_permission = !self.has_permission(now, id, peer.ip());
                if (new_channel && channels >= self.config.max_channels)
                    || (new_permission && permissions >= self.config.max_permissions)
                {
                    return self.refuse(ErrorCode::InsufficientCapacity, five_tuple, method, tid, &key, out);
                }
                let expires = now + self.config.channel_lifetime;
                if self.tables.set_channel(id, channel, peer, expires) {
                    self.timers.schedule(expires, Timer::Channel(id, channel));
                }
                self.permit(now, id, peer.ip());
                let reply_len = success(out, method, tid, &key, |_| Ok(()));
                CommandOutput { five_tuple, reply_len, effect: Effect::None }
            }
        }
    }

    /// The allocation of `ft` if it is live at `now`. One whose lifetime has run out but that the
    /// timer wheel has not swept yet is ended here (reported by the next
    /// [`handle_timeout`](Self::handle_timeout)), so no request can revive it.
    pub(super) fn live_allocation(&mut self, now: Instant, ft: &FiveTuple) -> Option<AllocationId> {
        let id = self.tables.lookup(ft)?;
        let expires = self.tables.get(id)?.expires;
        if expires > now {
            return Some(id);
        }
        self.reap(id, EndReason::Expired);
        None
    }

    /// Marks allocation `id` as a TCP allocation (RFC 6062): the shell installed it without a
    /// relay socket, and Send indications on it are dropped.
    pub fn mark_tcp(&mut self, id: AllocationId) {
        if let Some(a) = self.tables.get_mut(id) {
            a.tcp = true;
        }
    }

    /// Ends the allocation on `ft`, if any, because its client's TCP or TLS connection closed
    /// (RFC 8656 §3.1: an allocation over a stream lives no longer than its connection). Returns
    /// its end for the shell to report; the connection's next allocation is a new one.
    pub fn end_connection(&mut self, ft: &FiveTuple) -> Option<Ended> {
        let id = self.tables.lookup(ft)?;
        self.end(id, EndReason::ConnectionClosed)
    }

    /// Ends allocation `id` because its lifetime ran out; reported by the next
    /// [`handle_timeout`](Self::handle_timeout).
    fn reap(&mut self, id: AllocationId, reason: EndReason) {
        if let Some(ended) = self.end(id, reason) {
            if reason == EndReason::Expired {
                self.counters.allocations_expired += 1;
            }
            self.reaped.push(ended);
        }
    }

    /// Permissions of `id` live at `now` (swept or not, expired ones do not count).
    fn live_permissions(&self, now: Instant, id: AllocationId) -> usize {
        self.tables.get(id).map_or(0, |a| a.permissions.iter().filter(|ip| self.has_permission(now, id, **ip)).count())
    }

    /// True when `channel` of `id` is bound and its binding is live at `now`.
    fn channel_live(&self, now: Instant, id: AllocationId, channel: ChannelNumber) -> bool {
        matches!(self.tables.channels.get(&(id.index, channel)), Some(b) if b.expires > now)
    }

    /// Removes `channel`'s binding if it has expired but not been swept (RFC 8656 §12: it is
    /// unbound).
    fn unbind_if_expired(&mut self, now: Instant, id: AllocationId, channel: ChannelNumber) {
        if matches!(self.tables.channels.get(&(id.index, channel)), Some(b) if b.expires <= now) {
            self.tables.remove_channel(id, channel);
        }
    }

    /// Removes allocation `id` with everything it owns.
    /// A Refresh with LIFETIME 0 whose MESSAGE-INTEGRITY this worker verified with the
    /// allocation's key (RFC 8656 §8: delete the allocation): answered here, without the two
    /// crossings to the control plane and back, because deleting needs no policy. The
    /// allocation ends now; its socket closes and the control plane hears `Released` in the
    /// same loop iteration. Returns the reply's length, or `None` when the request needs the
    /// control plane (another lifetime, REQUESTED-ADDRESS-FAMILY, unknown attributes, no live
    /// allocation).
    pub(super) fn delete_verified(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &wire::Message<'_>,
        out: &mut [u8],
    ) -> Option<usize> {
        if msg.u32_attr(attr::LIFETIME) != Some(Ok(0))
            || !msg.unknown_required().is_empty()
            || msg.get(attr::REQUESTED_ADDRESS_FAMILY).is_some()
        {
            return None;
        }
        let mac = msg.integrity_parts()?.algorithm;
        let id = self.live_allocation(now, ft)?;
        let key = self.tables.get(id)?.key.signing_with(mac);
        let n = success(out, Method::REFRESH, msg.transaction_id(), &key, |w| {
            w.u32(attr::LIFETIME, 0)?;
            Ok(())
        });
        if n == 0 {
            return None;
        }
        self.reap(id, EndReason::Deleted);
        self.counters.deleted_in_worker += 1;
        Some(n)
    }

    fn end(&mut self, id: AllocationId, reason: EndReason) -> Option<Ended> {
        self.touch_offload(id);
        let a = self.tables.remove(id)?;
        self.compact_timers();
        Some(Ended::of(id, &a, reason))
    }

    fn install(&mut self, now: Instant, i: Install, out: &mut [u8]) -> CommandOutput {
        let five_tuple = i.five_tuple;
        if let Some(id) = self.live_allocation(now, &five_tuple) {
            // The control plane sends an Install for another transaction only once it has seen
            // the allocation lapse by its own clock, which runs behind the worker's deadline by
            // the Install's queueing delay: within that margin the old allocation ends here.
            let lapsing = self.tables.get(id).is_some_and(|a| a.alloc_tid != i.tid && a.expires <= now + LAPSE_MARGIN);
            if lapsing {
                self.reap(id, EndReason::Expired);
            }
        }
        if let Some(existing) = self.live_allocation(now, &five_tuple).and_then(|id| self.tables.get(id)) {
            // A second Allocate on a 5-tuple that already has an allocation (RFC 8656 §7.2 step 2):
            // the original success to its retransmission, a signed 437 to anything else.
            if existing.alloc_tid == i.tid {
                let n = existing.alloc_response.len();
                let reply_len = if n <= out.len() {
                    out[..n].copy_from_slice(&existing.alloc_response);
                    n
                } else {
                    0
                };
                return CommandOutput { five_tuple, reply_len, effect: Effect::DuplicateInstall };
            }
            let reply_len =
                response::error(out, Method::ALLOCATE, i.tid, ErrorCode::AllocationMismatch, &[], Some(&i.key))
                    .unwrap_or(0);
            return CommandOutput { five_tuple, reply_len, effect: Effect::InstallRefused { tid: i.tid } };
        }
        let reply_len = if i.response.len() <= out.len() {
            out[..i.response.len()].copy_from_slice(&i.response);
            i.response.len()
        } else {
            0
        };
        let expires = now + i.lifetime;
        let id = self.tables.insert(Allocation {
            five_tuple,
            relayed: i.relayed,
            additional: i.additional.map(Box::new),
            expires,
            alloc_tid: i.tid,
            alloc_response: i.response,
            key: i.key,
            permissions: PermissionList::new(),
            channels: ChannelList::new(),
            tokens: self.config.bandwidth.unwrap_or(0),
            refilled: now,
            session: i.session,
            user: i.user,
            created: now,
            to_peer: Traffic::default(),
            to_client: Traffic::default(),
            tcp: false,
        });
        self.counters.allocations_created += 1;
        self.timers.schedule(expires, Timer::Allocation(id));
        CommandOutput { five_tuple, reply_len, effect: Effect::Installed(id) }
    }

    fn permit(&mut self, now: Instant, id: AllocationId, ip: IpAddr) {
        let expires = now + self.config.permission_lifetime;
        if self.tables.set_permission(id, ip, expires) {
            self.timers.schedule(expires, Timer::Permission(id, ip));
        }
    }

    /// A signed error response to a command (437 without a live allocation, 400 for a binding
    /// conflict, 508 over a cap).
    fn refuse(
        &mut self,
        code: ErrorCode,
        five_tuple: FiveTuple,
        method: Method,
        tid: TransactionId,
        key: &IntegrityKey,
        out: &mut [u8],
    ) -> CommandOutput {
        if code == ErrorCode::InsufficientCapacity {
            self.counters.capacity_refusals += 1;
        }
        let reply_len = response::error(out, method, tid, code, &[], Some(key)).unwrap_or(0);
        CommandOutput { five_tuple, reply_len, effect: Effect::None }
    }
}

/// Writes a signed success response with `body` attributes; returns its length (0 if `out` is
/// too small).
fn success(
    out: &mut [u8],
    method: Method,
    tid: TransactionId,
    key: &IntegrityKey,
    body: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), wire::WriteError>,
) -> usize {
    let build = |out: &mut [u8]| {
        let mut w = response::start(out, method, Class::Success, tid)?;
        body(&mut w)?;
        response::seal(w, Some(key))
    };
    build(out).unwrap_or(0)
}
