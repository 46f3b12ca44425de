//! Order within a 5-tuple (`crate::hold`): which requests hold their 5-tuple's later
//! datagrams, which control-plane messages answer them, and the release of what was held once
//! the answer is applied.

use std::time::Instant;

use uturn_proto::relay::Command;
use uturn_proto::wire::{Method, TransactionId};
use uturn_proto::FiveTuple;

use super::{is_connection_bind, ClientPath, ClientVerdict, Io, WorkerCore};
use crate::messages::ToWorker;
use crate::stream::Role;

impl WorkerCore {
    /// The control plane answered request `tid` of `ft` (the answer is applied): records the
    /// turnaround and, when nothing else of `ft` is pending, handles its held datagrams.
    pub(super) fn answered(&mut self, now: Instant, ft: &FiveTuple, tid: TransactionId, io: &mut impl Io) {
        if self.holds.is_empty() {
            return;
        }
        if let Some((took, done)) = self.holds.answered(ft, tid, Instant::now()) {
            self.turnaround.record(took);
            if done {
                self.release_hold(now, ft, io);
            }
        }
    }

    /// Handles `ft`'s held datagrams in arrival order, as if they had just arrived; a request
    /// among them that goes to the control plane holds the rest again.
    pub(super) fn release_hold(&mut self, now: Instant, ft: &FiveTuple, io: &mut impl Io) {
        for datagram in self.holds.release(ft) {
            let conn = match self.path_of(ft) {
                Some(ClientPath::Stream(conn)) => Some(conn),
                _ => None,
            };
            match self.on_message(now, ft, &datagram) {
                ClientVerdict::Forwarded { verified } => match conn {
                    // As in `take_messages`: a ConnectionBind that went to the control plane
                    // makes its connection a data connection in waiting.
                    Some(conn) if is_connection_bind(&datagram) => {
                        if let Some(c) = self.streams.get_mut(conn) {
                            c.role = Role::Binding;
                        }
                    }
                    Some(conn) if verified => self.streams.mark_used(conn, now),
                    _ => {}
                },
                ClientVerdict::Done => {}
                ClientVerdict::Reply(n) => match self.path_of(ft) {
                    Some(ClientPath::Datagram(listener)) => {
                        if let Some(to) = self.datagram_to(ft) {
                            io.send_reply(listener, to, &self.reply[..n])
                        }
                    }
                    Some(ClientPath::Stream(conn)) => {
                        let reply = &self.reply[..n];
                        self.streams.queue(conn, reply);
                    }
                    None => {}
                },
                ClientVerdict::ToPeer { relay, peer, payload } => {
                    if let Some(conn) = conn {
                        self.streams.mark_used(conn, now);
                    }
                    self.send_to_peer(relay, peer, &datagram[payload], io)
                }
            }
        }
    }
}

/// The transaction ID of a request whose 5-tuple waits for its answer: every request the worker
/// forwards but Connect and ConnectionBind (RFC 6062), whose answers wait for a peer's TCP
/// connection and whose data connection holds its own bytes.
pub(super) fn held_for(request: &[u8]) -> Option<TransactionId> {
    let t = request.get(..20)?;
    let method = u16::from_be_bytes([t[0], t[1]]);
    if method == Method::CONNECT.0 || method == Method::CONNECTION_BIND.0 {
        return None;
    }
    Some(TransactionId(t[8..20].try_into().ok()?))
}

/// The request a control-plane message answers, as (5-tuple, transaction ID): an Install, a
/// Refresh, CreatePermission or ChannelBind to apply, or a reply the control plane built (a
/// response carries its request's transaction ID).
pub(super) fn answer_of(msg: &ToWorker) -> Option<(FiveTuple, TransactionId)> {
    match msg {
        ToWorker::Install(i, ..) | ToWorker::InstallTcp(i) => Some((i.five_tuple, i.tid)),
        ToWorker::Command(
            Command::Refresh { five_tuple, tid, .. }
            | Command::CreatePermission { five_tuple, tid, .. }
            | Command::ChannelBind { five_tuple, tid, .. },
        ) => Some((*five_tuple, *tid)),
        ToWorker::Command(Command::Reply { five_tuple, bytes }) => {
            Some((*five_tuple, TransactionId(bytes.get(8..20)?.try_into().ok()?)))
        }
        _ => None,
    }
}
