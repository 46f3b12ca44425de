//! TCP allocations (RFC 6062) in a worker: the allocation without a relay socket, the
//! ConnectionBind hand-off, and the data connection pairs.
//!
//! The control plane's TCP relay owns each TCP allocation's listener, accepts and connects its
//! peer connections and holds them until a ConnectionBind names them. The ConnectionBind comes
//! on a new client connection, on whichever worker the kernel gave it to: that worker forwards
//! it like any request and keeps the bytes after it as they are ([`Role::Binding`]). On
//! success it receives the peer connection ([`ToWorker::BindData`]) and from then on moves
//! bytes between the two connections, both in its own stream slab, with no hop to another
//! thread ([`Role::ClientData`], [`Role::PeerData`]). When one closes the other does, and the
//! relay hears of it ([`FromWorker::DataClosed`]).

use std::net::TcpStream;
use std::time::Instant;

use tracing::debug;
use uturn_proto::relay::{Command, Effect, Install};
use uturn_proto::{FiveTuple, Transport};

use super::{Io, WorkerCore};
use crate::messages::{FromWorker, ToWorker};
use crate::stream::{CloseReason, ConnId, ConnectionSlot, Role};

/// Bytes a client connection may receive after its ConnectionBind before the answer comes;
/// beyond that it is closed (a client that floods before it is bound).
const BINDING_BUFFER: usize = 64 * 1024;

impl WorkerCore {
    /// Installs a TCP allocation (RFC 6062 §5.1): in the tables like any other, without a relay
    /// socket. Ends it at once when its connection closed meanwhile.
    pub(super) fn install_tcp(&mut self, now: Instant, install: Install) {
        let out = self.state.handle_command(now, Command::Install(install), &mut self.reply);
        let path = self.path_of(&out.five_tuple);
        match out.effect {
            Effect::Installed(id) => {
                if path.is_none() {
                    if let Some(ended) = self.state.end_connection(&out.five_tuple) {
                        self.log_end(now, &ended);
                        self.release_ended(&ended);
                    }
                    return;
                }
                self.state.mark_tcp(id);
                let session = self.session_of(&out.five_tuple);
                debug!(worker = self.index, session, client = %out.five_tuple.client, "TCP allocation installed");
            }
            Effect::InstallRefused { tid } => self.release(out.five_tuple, tid),
            _ => {}
        }
        if let (Some(super::ClientPath::Stream(conn)), true) = (path, out.reply_len > 0) {
            let reply = &self.reply[..out.reply_len];
            self.streams.queue(conn, reply);
        }
    }

    /// Applies the TCP relay's answers: [`ToWorker::BindData`], [`ToWorker::BindFailed`] and
    /// [`ToWorker::CloseData`].
    pub(super) fn data_command(&mut self, now: Instant, msg: ToWorker, io: &mut impl Io) {
        match msg {
            ToWorker::BindData { five_tuple, peer, connection_id, response, slot } => {
                self.bind_data(now, five_tuple, (peer, slot), connection_id, &response, io)
            }
            ToWorker::BindFailed { five_tuple, response } => {
                let Some(id) = self.streams.lookup(&five_tuple) else { return };
                self.streams.queue(id, &response);
                if let Some(c) = self.streams.get_mut(id) {
                    c.role = Role::Framed;
                }
                // What the client sent after the request is framed again.
                self.on_stream_data(now, id, &[], io);
            }
            ToWorker::CloseData { five_tuple } => {
                if let Some(id) = self.streams.lookup(&five_tuple) {
                    self.close_connection(now, id, CloseReason::DataClosed, io);
                }
            }
            _ => {}
        }
    }

    /// RFC 6062 §5.4: the client connection `five_tuple` becomes the client data connection of
    /// `peer`; what either side sent meanwhile goes across first.
    fn bind_data(
        &mut self,
        now: Instant,
        five_tuple: FiveTuple,
        (peer, slot): (TcpStream, ConnectionSlot),
        connection_id: u32,
        response: &[u8],
        io: &mut impl Io,
    ) {
        let client = self
            .streams
            .lookup(&five_tuple)
            .filter(|&id| self.streams.get_mut(id).is_some_and(|c| c.role == Role::Binding));
        let (Some(client), Ok(peer_addr), Ok(relayed)) = (client, peer.peer_addr(), peer.local_addr()) else {
            // The client data connection closed before the answer: the peer one goes too.
            let _ = peer.shutdown(std::net::Shutdown::Both);
            self.data_closed(connection_id);
            return;
        };
        self.streams.queue(client, response);
        let peer_ft = FiveTuple { client: peer_addr, server: relayed, transport: Transport::Tcp };
        let peer_id = self.streams.adopt_peer(now, peer, peer_ft, slot);
        if let Some(c) = self.streams.get_mut(client) {
            c.role = Role::ClientData { partner: peer_id, connection_id };
        }
        let opened = match self.streams.get_mut(peer_id) {
            Some(p) => {
                p.role = Role::PeerData { partner: client };
                io.open_stream(peer_id, &p.socket)
            }
            None => false,
        };
        if !opened {
            return self.close_connection(now, client, CloseReason::Peer, io);
        }
        debug!(worker = self.index, connection_id, client = %five_tuple.client, peer = %peer_addr, "data connection bound");
        // The client's bytes that followed its ConnectionBind.
        let held = self.streams.get_mut(client).map(|c| std::mem::take(&mut c.inbuf)).unwrap_or_default();
        if !held.is_empty() && !self.streams.queue(peer_id, &held) {
            self.close_connection(now, client, CloseReason::Overrun, io);
        }
    }

    /// Bytes received on a connection that is not framed: held while its ConnectionBind is
    /// answered, or relayed as they are to the other connection of its data pair. A partner
    /// whose write queue cannot take them ends the pair ([`CloseReason::Overrun`]).
    pub(super) fn on_unframed(&mut self, now: Instant, id: ConnId, bytes: &[u8], io: &mut impl Io) {
        let Some(c) = self.streams.get_mut(id) else { return };
        let role = c.role;
        let tls = c.is_tls();
        if tls {
            let received = c.receive_tls(bytes, BINDING_BUFFER.max(uturn_proto::wire::stream::MAX_FRAME * 2));
            if !c.out.is_empty() {
                self.streams.mark_dirty(id);
            }
            if let Err(reason) = received {
                return self.close_connection(now, id, reason, io);
            }
        }
        let partner = match role {
            Role::Framed => return,
            Role::Binding => {
                let Some(c) = self.streams.get_mut(id) else { return };
                if !tls {
                    if c.inbuf.len() + bytes.len() > BINDING_BUFFER {
                        return self.close_connection(now, id, CloseReason::Overrun, io);
                    }
                    c.inbuf.extend_from_slice(bytes);
                }
                return;
            }
            Role::ClientData { partner, .. } | Role::PeerData { partner } => partner,
        };
        let (queued, n) = if tls {
            let Some(c) = self.streams.get_mut(id) else { return };
            let plain = std::mem::take(&mut c.inbuf);
            let queued = plain.is_empty() || self.streams.queue(partner, &plain);
            let n = plain.len();
            if let Some(c) = self.streams.get_mut(id) {
                c.inbuf = plain;
                c.inbuf.clear();
            }
            (queued, n)
        } else {
            (self.streams.queue(partner, bytes), bytes.len())
        };
        if queued {
            self.streams.counters.data_bytes += n as u64;
            self.pause_if_full(id, partner, io);
        } else {
            let gone = self.streams.get_mut(partner).is_none();
            let reason = if gone { CloseReason::DataClosed } else { CloseReason::Overrun };
            self.close_connection(now, id, reason, io);
        }
    }

    /// Backpressure: stops reading `id` while its partner has more than a quarter of its write
    /// queue waiting, so a fast sender never overruns a slow reader's queue.
    fn pause_if_full(&mut self, id: ConnId, partner: ConnId, io: &mut impl Io) {
        let high = self.streams.limits.write_queue / 4;
        if self.streams.get_mut(partner).is_none_or(|p| p.queued() < high) {
            return;
        }
        if let Some(c) = self.streams.get_mut(id) {
            if !c.paused {
                c.paused = true;
                io.pause_stream(id, &c.socket);
            }
        }
    }

    /// Bytes of connection `id` were written: when its queue has drained below an eighth of
    /// the limit, the other connection of its data pair is read again.
    pub(crate) fn on_written(&mut self, id: ConnId, io: &mut impl Io) {
        let low = self.streams.limits.write_queue / 8;
        let Some(c) = self.streams.get_mut(id) else { return };
        if c.close_when_flushed {
            if c.queued() == 0 {
                self.close_connection(Instant::now(), id, CloseReason::DataClosed, io);
            }
            return;
        }
        let partner = match c.role {
            Role::ClientData { partner, .. } | Role::PeerData { partner } if c.queued() < low => partner,
            _ => return,
        };
        if let Some(p) = self.streams.get_mut(partner) {
            if p.paused {
                p.paused = false;
                io.resume_stream(partner, &p.socket);
            }
        }
    }

    /// After connection of `role` closed for `reason`: closes the other one of its data pair
    /// (at once, or after writing what waits for it when this one ended with EOF), and reports
    /// the pair's end once (from the client data side).
    pub(super) fn close_partner(&mut self, now: Instant, role: Role, reason: CloseReason, io: &mut impl Io) {
        let partner = match role {
            Role::ClientData { partner, connection_id } => {
                self.data_closed(connection_id);
                partner
            }
            Role::PeerData { partner } => partner,
            Role::Framed | Role::Binding => return,
        };
        if reason == CloseReason::Peer {
            if let Some(p) = self.streams.get_mut(partner).filter(|p| p.queued() > 0) {
                // Not read any more: its bytes would have nowhere to go.
                p.close_when_flushed = true;
                if !p.paused {
                    p.paused = true;
                    io.pause_stream(partner, &p.socket);
                }
                return;
            }
        }
        self.close_connection(now, partner, CloseReason::DataClosed, io);
    }

    fn data_closed(&mut self, connection_id: u32) {
        let _ = self.events.send(FromWorker::DataClosed { connection_id });
    }
}
