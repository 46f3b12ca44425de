//! The PROXY protocol in the worker core (`crate::proxy`): a connection's header before its
//! first message, and the header on every datagram with `proxy-protocol-udp`.

use std::net::SocketAddr;
use std::time::Instant;

use tracing::debug;
use uturn_proto::FiveTuple;

use super::{ClientVerdict, Io, WorkerCore};
use crate::proxy::{self, Refusal};
use crate::stream::{CloseReason, ConnId};

impl WorkerCore {
    /// Bytes received on connection `id` before its PROXY header is whole: they gather in its
    /// `inbuf` until the header parses; what follows the header (STUN, ChannelData or TLS
    /// records) is then handled as the connection's first bytes. A connection whose first
    /// bytes are not a header, or whose header is malformed, is closed (counted by reason); one
    /// whose header does not come in time is closed by [`crate::stream::Streams::overdue`].
    pub(super) fn on_proxy_header(&mut self, now: Instant, id: ConnId, bytes: &[u8], io: &mut impl Io) {
        let Some(c) = self.streams.get_mut(id) else { return };
        c.inbuf.extend_from_slice(bytes);
        let header = match proxy::parse_stream(&c.inbuf) {
            Ok(None) => return,
            Ok(Some(h)) => h,
            Err(r) => {
                debug!(worker = self.index, balancer = %c.five_tuple.client, reason = ?r, "PROXY header refused");
                self.streams.proxy_counters.refuse_stream(r);
                return self.close_connection(now, id, CloseReason::Proxy, io);
            }
        };
        let rest = c.inbuf.split_off(header.len);
        c.inbuf = Vec::new();
        let balancer = c.five_tuple.client;
        match self.streams.take_proxy_header(now, id, header.source) {
            Ok(ft) => {
                debug!(
                    worker = self.index,
                    %balancer,
                    client = %ft.client,
                    transport = %ft.transport,
                    "PROXY header: the connection is the real client's"
                );
                if !rest.is_empty() {
                    self.on_stream_data(now, id, &rest, io);
                }
            }
            Err(reason) => self.close_connection(now, id, reason, io),
        }
    }

    /// A datagram on a `proxy-protocol-udp` listener from `from` (a balancer): its PROXY v2
    /// header names the real client, whose 5-tuple the message after the header belongs to;
    /// the balancer is noted as that client's return path. Dropped (counted) from an untrusted
    /// source or without a valid header. The verdict's ranges are within `datagram`.
    #[inline(never)]
    pub(super) fn on_proxied_datagram(
        &mut self,
        now: Instant,
        listener: usize,
        from: SocketAddr,
        datagram: &[u8],
    ) -> ClientVerdict {
        let Some(p) = self.proxied.as_mut() else { return ClientVerdict::Done };
        if !p.config.trusts(from.ip()) {
            self.streams.proxy_counters.refuse_datagram(Refusal::Untrusted);
            return ClientVerdict::Done;
        }
        let h = match proxy::parse_datagram(datagram) {
            Ok(h) => h,
            Err(r) => {
                self.streams.proxy_counters.refuse_datagram(r);
                return ClientVerdict::Done;
            }
        };
        let client = h.source.map(|s| SocketAddr::new(s.ip().to_canonical(), s.port())).unwrap_or(from);
        let ft = FiveTuple::udp(client, self.listeners[listener].addr);
        let tables = self.state.tables();
        p.learn(ft, from, |ft| tables.lookup(ft).is_some());
        self.streams.proxy_counters.datagrams_accepted += 1;
        match self.on_message(now, &ft, &datagram[h.len..]) {
            ClientVerdict::ToPeer { relay, peer, payload } => {
                ClientVerdict::ToPeer { relay, peer, payload: payload.start + h.len..payload.end + h.len }
            }
            v => v,
        }
    }

    /// Where a datagram for `ft`'s client goes: the client itself, or with
    /// `proxy-protocol-udp` the balancer that carries it (`None`, dropped, when none is known).
    #[inline]
    pub(crate) fn datagram_to(&self, ft: &FiveTuple) -> Option<SocketAddr> {
        match &self.proxied {
            None => Some(ft.client),
            Some(p) => p.via(ft),
        }
    }
}
