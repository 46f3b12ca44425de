//! The per-worker TURN state machine (RFC 8656): one [`WorkerState`] per data-plane worker owns
//! the allocations whose client 5-tuples the kernel steers to that worker.
//!
//! Contract (sans-IO): feed every client datagram to [`WorkerState::handle_client_datagram`], every
//! peer datagram to [`WorkerState::handle_peer_datagram`], every control-plane [`Command`] to
//! [`WorkerState::handle_command`], and call [`WorkerState::handle_timeout`] once
//! [`WorkerState::poll_timeout`] has passed. Each call takes `now` and returns what to send.

mod apply;
mod command;
mod five_tuple;
mod offload;
mod session;
mod tables;
mod timers;

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

pub use command::{Command, Effect, Install};
pub use five_tuple::{FiveTuple, ListenAddr, Transport};
pub use offload::{ChannelRoute, OffloadEvent};
pub use session::{AllocationSnapshot, ImportError, SessionInfo, Traffic};
pub use tables::{Allocation, ChannelBinding, ChannelList, PermissionList, Tables};

use crate::nonce::{Challenger, NonceCheck};
use crate::ratelimit::SourceLimiter;
use crate::response::{self, ErrorCode};
use crate::wire::{
    self, address, attr, channel_data, ChannelData, ChannelNumber, Class, DatagramKind, Message, Method, TransactionId,
};

/// An allocation's slot in its worker's slab plus a generation, so an id that outlives its
/// allocation never names the slot's next tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllocationId {
    /// Slab index.
    pub index: u32,
    /// Generation of the slot when the allocation was made.
    pub generation: u32,
}

/// An allocation that ended (expired, deleted by a Refresh with LIFETIME 0, or removed at
/// shutdown): the shell closes its relay socket and tells the control plane, which matches it to
/// its own record by the Allocate transaction ID (a newer allocation on the same 5-tuple is not
/// mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The allocation's id in this worker.
    pub id: AllocationId,
    /// Its client's 5-tuple.
    pub five_tuple: FiveTuple,
    /// Its relayed transport address (as bound).
    pub relayed: SocketAddr,
    /// A dual allocation's second relayed transport address.
    pub additional: Option<SocketAddr>,
    /// Transaction ID of the Allocate that made it.
    pub tid: TransactionId,
    /// Its session id.
    pub session: u64,
    /// When it was made (its duration is the end time minus this).
    pub created: Instant,
    /// Application data relayed from the client to peers over its life.
    pub to_peer: Traffic,
    /// Application data relayed from peers to the client over its life.
    pub to_client: Traffic,
    /// Why it ended.
    pub reason: EndReason,
}

/// Why an allocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Its lifetime ran out (RFC 8656 §7: no Refresh in time).
    Expired,
    /// A Refresh with LIFETIME 0 deleted it (RFC 8656 §8).
    Deleted,
    /// An operator revoked it (its user, or the session).
    Revoked,
    /// The relay stopped.
    Shutdown,
    /// The client's TCP or TLS connection closed (RFC 8656 §3.1).
    ConnectionClosed,
}

impl EndReason {
    /// Lower-case name, as logs spell it.
    pub fn name(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Deleted => "deleted",
            EndReason::Revoked => "revoked",
            EndReason::Shutdown => "shutdown",
            EndReason::ConnectionClosed => "connection closed",
        }
    }
}

impl Ended {
    /// The end of allocation `id`, with its totals.
    pub fn of(id: AllocationId, a: &Allocation, reason: EndReason) -> Self {
        Ended {
            reason,
            id,
            five_tuple: a.five_tuple,
            relayed: a.relayed,
            additional: a.additional.as_deref().copied(),
            tid: a.alloc_tid,
            session: a.session,
            created: a.created,
            to_peer: a.to_peer,
            to_client: a.to_client,
        }
    }
}

/// Bytes a peer datagram needs in front of its payload so it can be framed in place: a 20-byte
/// STUN header, a 24-byte IPv6 XOR-PEER-ADDRESS and a 4-byte DATA header (RFC 8656 §11.4).
pub const PEER_HEADROOM: usize = 48;
/// Bytes a peer datagram needs after its payload (DATA padding).
pub const PEER_TAILROOM: usize = 3;

/// Lifetimes and limits the worker applies itself (RFC 8656 §9, §12).
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// Permission lifetime; RFC 8656 §9 fixes 300 s.
    pub permission_lifetime: Duration,
    /// Channel binding lifetime; RFC 8656 §12 fixes 600 s.
    pub channel_lifetime: Duration,
    /// Most permissions (peer IPs) one allocation may hold; more earn 508.
    pub max_permissions: usize,
    /// Most channel bindings one allocation may hold; more earn 508.
    pub max_channels: usize,
    /// Relayed payload bytes per second per allocation, both directions together; `None` is
    /// unlimited. The burst allowance is one second's worth.
    pub bandwidth: Option<u64>,
    /// Requests whose MESSAGE-INTEGRITY this worker has not verified (Binding, the 401 round,
    /// unknown methods, a first authenticated Allocate, anything with a forged or unknown key)
    /// accepted per second per source (IPv4 address or IPv6 /64) by this worker, with a burst of
    /// the same size (0: unlimited); more are dropped silently and counted in
    /// [`Counters::rate_limited`]. The server gives each worker its share of `unauth-rate`.
    pub unauthenticated_rate: u32,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
            max_permissions: 128,
            max_channels: 128,
            bandwidth: None,
            unauthenticated_rate: 1000,
        }
    }
}

/// Per-worker counters (packets unless stated otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Client datagrams relayed to a peer (ChannelData or Send).
    pub relayed_to_peer: u64,
    /// Peer datagrams relayed to a client (ChannelData or Data indication).
    pub relayed_to_client: u64,
    /// STUN datagrams that failed [`Message::parse`].
    pub malformed_stun: u64,
    /// ChannelData datagrams with a bad header or length.
    pub malformed_channel_data: u64,
    /// Datagrams that are neither STUN nor ChannelData.
    pub not_turn: u64,
    /// ChannelData / Send / requests from a 5-tuple without an allocation (dropped).
    pub no_allocation: u64,
    /// ChannelData on an unbound or expired channel.
    pub unbound_channel: u64,
    /// Send indications or peer datagrams without a permission.
    pub no_permission: u64,
    /// Indications dropped: malformed Send, unknown attributes, or any other indication.
    pub dropped_indications: u64,
    /// Responses received from clients (dropped).
    pub dropped_responses: u64,
    /// Requests handed to the control plane.
    pub requests_forwarded: u64,
    /// Requests whose MESSAGE-INTEGRITY verified with their allocation's key in the worker, and
    /// that therefore bypassed the per-source budget.
    pub requests_verified: u64,
    /// Requests answered by the worker itself (Binding, retransmitted Allocate, errors).
    pub requests_answered: u64,
    /// Allocations that expired.
    pub allocations_expired: u64,
    /// Datagrams dropped by the per-allocation bandwidth cap.
    pub bandwidth_drops: u64,
    /// CreatePermission / ChannelBind refused with 508 by the per-allocation caps.
    pub capacity_refusals: u64,
    /// Requests dropped by the per-source budget (none of them had a MESSAGE-INTEGRITY the worker
    /// could verify).
    pub rate_limited: u64,
    /// Allocations deleted by a Refresh with LIFETIME 0 that the worker verified and answered
    /// itself.
    pub deleted_in_worker: u64,
    /// Application-data bytes relayed to peers (the payloads of `relayed_to_peer`).
    pub bytes_to_peer: u64,
    /// Application-data bytes relayed to clients (the payloads of `relayed_to_client`).
    pub bytes_to_client: u64,
    /// Allocations installed.
    pub allocations_created: u64,
    /// ChannelData relayed to peers by the kernel fast path (XDP), included in
    /// `relayed_to_peer`.
    pub offloaded_to_peer: u64,
    /// Peer datagrams relayed to clients by the kernel fast path, included in
    /// `relayed_to_client`.
    pub offloaded_to_client: u64,
}

/// Implements [`Counters::NAMES`] and [`Counters::values`] from one list of the fields.
macro_rules! counter_list {
    ($($field:ident),* $(,)?) => {
        impl Counters {
            /// The counters' field names, in the order of [`values`](Self::values).
            pub const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];

            /// The counters' values, in the order of [`NAMES`](Self::NAMES).
            pub fn values(&self) -> Vec<u64> {
                vec![$(self.$field),*]
            }

            /// Counters from values in the order of [`NAMES`](Self::NAMES) (missing ones are 0).
            pub fn from_values(v: &[u64]) -> Self {
                let mut it = v.iter().copied();
                Counters { $($field: it.next().unwrap_or(0)),* }
            }
        }
    };
}

counter_list!(
    relayed_to_peer,
    relayed_to_client,
    malformed_stun,
    malformed_channel_data,
    not_turn,
    no_allocation,
    unbound_channel,
    no_permission,
    dropped_indications,
    dropped_responses,
    requests_forwarded,
    requests_verified,
    requests_answered,
    allocations_expired,
    bandwidth_drops,
    capacity_refusals,
    rate_limited,
    deleted_in_worker,
    bytes_to_peer,
    bytes_to_client,
    allocations_created,
    offloaded_to_peer,
    offloaded_to_client,
);

/// What to do with a client datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOutput {
    /// Nothing to send (dropped, counted).
    Drop,
    /// Send `out[..len]` back to the client.
    Reply(usize),
    /// Send `datagram[payload]` from `alloc`'s relayed transport address to `peer`.
    Relay {
        /// The allocation whose relay socket sends.
        alloc: AllocationId,
        /// Destination peer.
        peer: SocketAddr,
        /// The application data within the datagram.
        payload: Range<usize>,
    },
    /// A request with MESSAGE-INTEGRITY (Allocate, Refresh, CreatePermission, ChannelBind): hand
    /// the datagram to the control plane, which authenticates it and answers with a [`Command`].
    Authenticate {
        /// True when the worker verified MESSAGE-INTEGRITY with the key of the 5-tuple's
        /// allocation; false when the request was admitted on its source's budget instead.
        verified: bool,
    },
}

/// What to do with a peer datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerOutput {
    /// Nothing to send (dropped, counted).
    Drop,
    /// Send `buf[message]` (ChannelData or Data indication built in place) to the client.
    ToClient {
        /// The client's 5-tuple.
        five_tuple: FiveTuple,
        /// The framed message within the buffer.
        message: Range<usize>,
    },
}

/// What applying a [`Command`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// The client to answer.
    pub five_tuple: FiveTuple,
    /// Length of the reply in the caller's buffer (0: nothing to send).
    pub reply_len: usize,
    /// What the shell must do about sockets and the control plane.
    pub effect: Effect,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Timer {
    Allocation(AllocationId),
    Permission(AllocationId, IpAddr),
    Channel(AllocationId, ChannelNumber),
}

/// The state of one worker: its tables, timers and counters.
#[derive(Debug)]
pub struct WorkerState {
    config: RelayConfig,
    tables: Tables,
    timers: timers::Timers,
    fired: Vec<Timer>,
    counters: Counters,
    /// The per-source budget of requests not verified in the worker.
    unauthenticated: SourceLimiter,
    /// Allocations found expired by a request before the timer wheel swept them, reported by the
    /// next [`handle_timeout`](Self::handle_timeout).
    reaped: Vec<Ended>,
    /// Answers the unauthenticated first request of an Allocate (401) without the control plane.
    challenger: Option<Challenger>,
    /// xorshift64 state for Data indication transaction IDs (seeded by the caller from a CSPRNG).
    rng: u64,
    /// Channel routes for a kernel fast path, when the shell enabled one.
    offload: Option<offload::Offload>,
}

impl WorkerState {
    /// A worker with no allocations. `now` anchors the timer wheel; `seed` seeds the transaction
    /// IDs of Data indications (any value; zero is replaced).
    pub fn new(config: RelayConfig, now: Instant, seed: u64) -> Self {
        WorkerState {
            config,
            tables: Tables::default(),
            timers: timers::Timers::new(now, Duration::from_secs(1)),
            fired: Vec::new(),
            counters: Counters::default(),
            unauthenticated: SourceLimiter::new(config.unauthenticated_rate, now),
            reaped: Vec::new(),
            challenger: None,
            rng: seed | 1,
            offload: None,
        }
    }

    /// Lets the worker answer requests without MESSAGE-INTEGRITY with 401 itself (RFC 8489
    /// §9.2.4 step 1), saving the round trip to the control plane; without it they are forwarded.
    pub fn set_challenger(&mut self, challenger: Challenger) {
        self.challenger = Some(challenger);
    }

    /// The tables (read-only), for the shell and tests.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next run; `None` with nothing to expire.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.reaped.is_empty() {
            // Due at once: any instant not after now will do.
            return Some(self.timers.origin());
        }
        self.timers.next_deadline()
    }

    /// Handles one datagram from a client. `out` receives any reply (at least 512 bytes).
    pub fn handle_client_datagram(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        datagram: &[u8],
        out: &mut [u8],
    ) -> ClientOutput {
        match wire::classify(datagram) {
            DatagramKind::ChannelData => self.client_channel_data(now, ft, datagram),
            DatagramKind::Stun => match Message::parse(datagram) {
                Ok(msg) => self.client_stun(now, ft, &msg, datagram, out),
                Err(_) => {
                    self.counters.malformed_stun += 1;
                    ClientOutput::Drop
                }
            },
            DatagramKind::Other => {
                self.counters.not_turn += 1;
                ClientOutput::Drop
            }
        }
    }

    /// RFC 8656 §12.5: ChannelData from the client goes to the bound peer.
    #[inline]
    fn client_channel_data(&mut self, now: Instant, ft: &FiveTuple, datagram: &[u8]) -> ClientOutput {
        let cd = match ChannelData::parse(datagram) {
            Ok(cd) => cd,
            Err(_) => {
                self.counters.malformed_channel_data += 1;
                return ClientOutput::Drop;
            }
        };
        let Some((alloc, a)) = self.tables.lookup_allocation(ft) else {
            self.counters.no_allocation += 1;
            return ClientOutput::Drop;
        };
        if a.expires <= now {
            // RFC 8656 §7: an expired allocation relays nothing, swept or not.
            self.counters.no_allocation += 1;
            return ClientOutput::Drop;
        }
        match self.tables.channels.get(&(alloc.index, cd.channel())) {
            Some(b) if b.expires > now => {
                let peer = b.peer;
                // RFC 8656 §9: data flows only while the peer's permission lives; a ChannelBind
                // refreshes it, but a client may let it lapse while the binding lasts.
                if !self.has_permission(now, alloc, peer.ip()) {
                    self.counters.no_permission += 1;
                    return ClientOutput::Drop;
                }
                let len = cd.payload().len();
                if !self.within_bandwidth(now, alloc, len) {
                    return ClientOutput::Drop;
                }
                self.count_to_peer(alloc, len);
                ClientOutput::Relay { alloc, peer, payload: channel_data::HEADER_LEN..channel_data::HEADER_LEN + len }
            }
            _ => {
                self.counters.unbound_channel += 1;
                ClientOutput::Drop
            }
        }
    }

    fn client_stun(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message<'_>,
        datagram: &[u8],
        out: &mut [u8],
    ) -> ClientOutput {
        match (msg.class(), msg.method()) {
            (Class::Indication, Method::SEND) => self.client_send(now, ft, msg, datagram),
            (Class::Indication, _) => {
                self.counters.dropped_indications += 1;
                ClientOutput::Drop
            }
            (Class::Success | Class::Error, _) => {
                self.counters.dropped_responses += 1;
                ClientOutput::Drop
            }
            (Class::Request, method) => {
                // No request draws an answer or reaches the control plane outside its source's
                // budget unless its MESSAGE-INTEGRITY verified here, with the key of the
                // allocation on this 5-tuple: the answers go to an address nobody has proven,
                // and the control thread's time is shared by every client.
                let verified = self.verify_on_allocation(now, ft, msg);
                if verified {
                    self.counters.requests_verified += 1;
                } else if !self.unauthenticated.allow(now, ft.client.ip()) {
                    self.counters.rate_limited += 1;
                    if ft.transport != Transport::Udp {
                        // Over TCP/TLS the client does not retransmit (RFC 8489 §6.2.2): a drop
                        // would cost it the whole transaction timeout. Its address is proven by
                        // the connection, so the answer reflects nothing: 508 (RFC 8656 §6.2).
                        let tid = msg.transaction_id();
                        let code = ErrorCode::InsufficientCapacity;
                        return self.answer(response::error(out, method, tid, code, &[], None));
                    }
                    return ClientOutput::Drop;
                }
                self.client_request(now, ft, msg, method, verified, out)
            }
        }
    }

    /// True when `msg` carries a MESSAGE-INTEGRITY (or -SHA256) that verifies with the key of
    /// `ft`'s allocation (RFC 8489 §14.5, §14.6). Costs one HMAC, only for requests on an
    /// allocation.
    /// The NONCE must be one the relay minted for this client and still valid, so a captured
    /// request replayed after the nonce lifetime goes back on the budget.
    fn verify_on_allocation(&self, now: Instant, ft: &FiveTuple, msg: &Message<'_>) -> bool {
        let Some(parts) = msg.integrity_parts() else { return false };
        let Some(a) = self.tables.lookup(ft).and_then(|id| self.tables.get(id)) else { return false };
        if let Some(c) = &self.challenger {
            if !msg.nonce().is_some_and(|n| c.check(n, now, &ft.nonce_address()) == NonceCheck::Valid) {
                return false;
            }
        }
        a.key.verify(&parts)
    }

    /// A request admitted by [`client_stun`](Self::client_stun).
    fn client_request(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message<'_>,
        method: Method,
        verified: bool,
        out: &mut [u8],
    ) -> ClientOutput {
        match method {
            Method::BINDING => self.answer(binding_response(ft, msg, out)),
            Method::ALLOCATE => {
                // RFC 8656 §7.2: a retransmitted Allocate gets the original success response.
                if let Some(a) = self.tables.lookup(ft).and_then(|id| self.tables.get(id)) {
                    // Only while the allocation lives: after its deadline the client must not
                    // be told it holds one.
                    if a.expires > now && a.alloc_tid == msg.transaction_id() && a.alloc_response.len() <= out.len() {
                        out[..a.alloc_response.len()].copy_from_slice(&a.alloc_response);
                        self.counters.requests_answered += 1;
                        return ClientOutput::Reply(a.alloc_response.len());
                    }
                }
                if let Some(reply) = self.challenge(now, ft, msg, out) {
                    return reply;
                }
                self.counters.requests_forwarded += 1;
                ClientOutput::Authenticate { verified }
            }
            // RFC 6062 §5.4: ConnectionBind only over TCP or TLS (400 over UDP). It comes on a
            // new connection without an allocation, so it is never verified here.
            Method::CONNECTION_BIND if ft.transport == Transport::Udp => {
                self.answer(response::error(out, method, msg.transaction_id(), ErrorCode::BadRequest, &[], None))
            }
            Method::REFRESH
            | Method::CREATE_PERMISSION
            | Method::CHANNEL_BIND
            | Method::CONNECT
            | Method::CONNECTION_BIND => {
                if method == Method::REFRESH && verified {
                    if let Some(n) = self.delete_verified(now, ft, msg, out) {
                        self.counters.requests_answered += 1;
                        return ClientOutput::Reply(n);
                    }
                }
                if let Some(reply) = self.challenge(now, ft, msg, out) {
                    return reply;
                }
                self.counters.requests_forwarded += 1;
                ClientOutput::Authenticate { verified }
            }
            m => self.answer(response::error(out, m, msg.transaction_id(), ErrorCode::BadRequest, &[], None)),
        }
    }

    /// 401 with REALM and NONCE for a request without MESSAGE-INTEGRITY, when a challenger is set.
    fn challenge(&mut self, now: Instant, ft: &FiveTuple, msg: &Message<'_>, out: &mut [u8]) -> Option<ClientOutput> {
        if msg.has_integrity() {
            return None;
        }
        let c = self.challenger.as_ref()?;
        let written =
            c.write(out, msg.method(), msg.transaction_id(), ErrorCode::Unauthenticated, now, &ft.nonce_address());
        Some(self.answer(written))
    }

    fn answer(&mut self, written: Result<usize, wire::WriteError>) -> ClientOutput {
        match written {
            Ok(n) => {
                self.counters.requests_answered += 1;
                ClientOutput::Reply(n)
            }
            Err(_) => ClientOutput::Drop,
        }
    }

    /// RFC 8656 §11.2: a Send indication with a permission is relayed; anything else is dropped.
    fn client_send(&mut self, now: Instant, ft: &FiveTuple, msg: &Message<'_>, datagram: &[u8]) -> ClientOutput {
        let peer = msg.xor_address(attr::XOR_PEER_ADDRESS);
        let data = msg.get(attr::DATA);
        let (Some(Ok(peer)), Some(data), []) = (peer, data, msg.unknown_required()) else {
            self.counters.dropped_indications += 1;
            return ClientOutput::Drop;
        };
        let alloc = match self.tables.lookup(ft) {
            Some(id) if self.tables.get(id).is_some_and(|a| a.expires > now && !a.tcp) => id,
            // RFC 6062 §4: a TCP allocation's data flows on its data connections, never in
            // Send indications.
            Some(id) if self.tables.get(id).is_some_and(|a| a.tcp) => {
                self.counters.dropped_indications += 1;
                return ClientOutput::Drop;
            }
            _ => {
                self.counters.no_allocation += 1;
                return ClientOutput::Drop;
            }
        };
        if !self.has_permission(now, alloc, peer.ip()) {
            self.counters.no_permission += 1;
            return ClientOutput::Drop;
        }
        if !self.within_bandwidth(now, alloc, data.len()) {
            return ClientOutput::Drop;
        }
        self.count_to_peer(alloc, data.len());
        // `data` borrows from `datagram`; its position is the payload range.
        let start = data.as_ptr() as usize - datagram.as_ptr() as usize;
        ClientOutput::Relay { alloc, peer, payload: start..start + data.len() }
    }

    /// Counts a relayed client datagram of `len` payload bytes, in the worker's counters and the
    /// allocation's totals.
    #[inline]
    fn count_to_peer(&mut self, alloc: AllocationId, len: usize) {
        self.counters.relayed_to_peer += 1;
        self.counters.bytes_to_peer += len as u64;
        if let Some(a) = self.tables.get_mut(alloc) {
            a.to_peer.add(len);
        }
    }

    /// Counts a relayed peer datagram of `len` payload bytes.
    #[inline]
    fn count_to_client(&mut self, alloc: AllocationId, len: usize) {
        self.counters.relayed_to_client += 1;
        self.counters.bytes_to_client += len as u64;
        if let Some(a) = self.tables.get_mut(alloc) {
            a.to_client.add(len);
        }
    }

    /// Takes back the count of a peer datagram of `len` payload bytes that
    /// [`handle_peer_datagram`](Self::handle_peer_datagram) framed but the shell could not send
    /// (a client connection's write queue was full).
    pub fn uncount_to_client(&mut self, alloc: AllocationId, len: usize) {
        self.counters.relayed_to_client = self.counters.relayed_to_client.saturating_sub(1);
        self.counters.bytes_to_client = self.counters.bytes_to_client.saturating_sub(len as u64);
        if let Some(a) = self.tables.get_mut(alloc) {
            a.to_client.packets = a.to_client.packets.saturating_sub(1);
            a.to_client.bytes = a.to_client.bytes.saturating_sub(len as u64);
        }
    }

    /// The per-allocation token bucket: refills at `bandwidth` bytes/s up to one second's worth,
    /// and takes `len` bytes or refuses (counted).
    #[inline]
    fn within_bandwidth(&mut self, now: Instant, alloc: AllocationId, len: usize) -> bool {
        let Some(rate) = self.config.bandwidth else { return true };
        let Some(a) = self.tables.get_mut(alloc) else { return false };
        let elapsed = now.saturating_duration_since(a.refilled).as_nanos();
        let refill = (rate as u128 * elapsed / 1_000_000_000) as u64;
        if refill > 0 {
            a.tokens = (a.tokens + refill).min(rate);
            // Advance only by the time the whole tokens account for, keeping the fraction.
            a.refilled += Duration::from_nanos((refill as u128 * 1_000_000_000 / rate as u128) as u64);
            if a.tokens == rate {
                a.refilled = now;
            }
        }
        if a.tokens >= len as u64 {
            a.tokens -= len as u64;
            true
        } else {
            self.counters.bandwidth_drops += 1;
            false
        }
    }

    #[inline]
    pub(super) fn has_permission(&self, now: Instant, alloc: AllocationId, ip: IpAddr) -> bool {
        matches!(self.tables.permissions.get(&(alloc.index, ip)), Some(&exp) if exp > now)
    }

    /// Handles one datagram a peer sent to `alloc`'s relayed transport address. The payload is
    /// `buf[payload]`; the caller leaves [`PEER_HEADROOM`] bytes before it and [`PEER_TAILROOM`]
    /// after it so the ChannelData or Data indication is framed in place (RFC 8656 §11.4, §12.4).
    #[inline]
    pub fn handle_peer_datagram(
        &mut self,
        now: Instant,
        alloc: AllocationId,
        peer: SocketAddr,
        buf: &mut [u8],
        payload: Range<usize>,
    ) -> PeerOutput {
        let Some(a) = self.tables.get(alloc) else {
            self.counters.no_allocation += 1;
            return PeerOutput::Drop;
        };
        if a.expires <= now || payload.start < PEER_HEADROOM || payload.end + PEER_TAILROOM > buf.len() {
            self.counters.no_allocation += 1;
            return PeerOutput::Drop;
        }
        let five_tuple = a.five_tuple;
        if !self.has_permission(now, alloc, peer.ip()) {
            self.counters.no_permission += 1;
            return PeerOutput::Drop;
        }
        let len = payload.end - payload.start;
        if !self.within_bandwidth(now, alloc, len) {
            return PeerOutput::Drop;
        }
        if let Some((ch, b)) = self.tables.channel_to(alloc.index, peer) {
            if b.expires > now && len <= u16::MAX as usize {
                let start = payload.start - channel_data::HEADER_LEN;
                channel_data::write_header(&mut buf[start..], ch, len as u16);
                self.count_to_client(alloc, len);
                return PeerOutput::ToClient { five_tuple, message: start..payload.end };
            }
        }
        // Data indication: header, XOR-PEER-ADDRESS, DATA header, payload, padding.
        let alen = address::encoded_len(&peer);
        let start = payload.start - (20 + 4 + alen + 4);
        let padded_end = payload.start + ((len + 3) & !3);
        let body_len = padded_end - start - 20;
        if body_len > u16::MAX as usize {
            self.counters.dropped_indications += 1;
            return PeerOutput::Drop;
        }
        let tid = self.next_tid();
        let hdr = &mut buf[start..payload.start];
        hdr[0..2].copy_from_slice(&wire::message::message_type(Method::DATA, Class::Indication).to_be_bytes());
        hdr[2..4].copy_from_slice(&(body_len as u16).to_be_bytes());
        hdr[4..8].copy_from_slice(&wire::MAGIC_COOKIE.to_be_bytes());
        hdr[8..20].copy_from_slice(&tid.0);
        hdr[20..22].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
        hdr[22..24].copy_from_slice(&(alen as u16).to_be_bytes());
        address::encode_xor_address(&peer, &tid, &mut hdr[24..24 + alen]);
        hdr[24 + alen..26 + alen].copy_from_slice(&attr::DATA.to_be_bytes());
        hdr[26 + alen..28 + alen].copy_from_slice(&(len as u16).to_be_bytes());
        buf[payload.end..padded_end].fill(0);
        self.count_to_client(alloc, len);
        PeerOutput::ToClient { five_tuple, message: start..padded_end }
    }

    fn next_tid(&mut self) -> TransactionId {
        let mut t = TransactionId::default();
        for chunk in t.0.chunks_mut(4) {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            chunk.copy_from_slice(&(self.rng as u32).to_be_bytes());
        }
        t
    }

    /// Expires what is due at `now`: permissions, channel bindings and allocations. Each ended
    /// allocation is appended to `expired` (its relay socket must be closed and the control plane
    /// told), including those a request found expired before the sweep.
    pub fn handle_timeout(&mut self, now: Instant, expired: &mut Vec<Ended>) {
        expired.append(&mut self.reaped);
        let mut fired = std::mem::take(&mut self.fired);
        self.timers.advance(now, &mut fired);
        for t in fired.drain(..) {
            let (Timer::Allocation(id) | Timer::Permission(id, _) | Timer::Channel(id, _)) = t;
            self.touch_offload(id);
            match t {
                Timer::Allocation(id) => {
                    let Some(a) = self.tables.get(id) else { continue };
                    if a.expires <= now {
                        let ended = Ended::of(id, a, EndReason::Expired);
                        self.tables.remove(id);
                        self.counters.allocations_expired += 1;
                        expired.push(ended);
                    } else {
                        self.timers.schedule(a.expires, t);
                    }
                }
                Timer::Permission(id, ip) => {
                    let Some(&exp) = self.tables.permissions.get(&(id.index, ip)) else { continue };
                    if self.tables.get(id).is_none() {
                        continue;
                    }
                    if exp <= now {
                        self.tables.remove_permission(id, ip);
                    } else {
                        self.timers.schedule(exp, t);
                    }
                }
                Timer::Channel(id, ch) => {
                    let Some(b) = self.tables.channels.get(&(id.index, ch)).copied() else { continue };
                    if self.tables.get(id).is_none() {
                        continue;
                    }
                    if b.expires <= now {
                        self.tables.remove_channel(id, ch);
                    } else {
                        self.timers.schedule(b.expires, t);
                    }
                }
            }
        }
        self.fired = fired;
        self.compact_timers();
    }

    /// Timer entries filed (live and stale), for tests and metrics.
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// Drops timer entries whose allocation, permission or channel is gone once they outnumber
    /// the live ones: deleting an allocation leaves its timers filed until their deadline (up to
    /// the maximum lifetime), which under churn would grow without this. Amortised O(1) per
    /// deletion: it runs only after as many deletions as there are live timers.
    pub(super) fn compact_timers(&mut self) {
        let t = &self.tables;
        let live = t.allocation_count() + t.permissions.len() + t.channels.len();
        if self.timers.len() <= 2 * live + 1024 {
            return;
        }
        self.timers.retain(|timer| match *timer {
            Timer::Allocation(id) => t.get(id).is_some(),
            Timer::Permission(id, ip) => t.get(id).is_some() && t.permissions.contains_key(&(id.index, ip)),
            Timer::Channel(id, ch) => t.get(id).is_some() && t.channels.contains_key(&(id.index, ch)),
        });
    }

    /// Removes every allocation (shutdown), returning them.
    pub fn drain(&mut self) -> Vec<Ended> {
        let ids = self.tables.ids();
        let mut all: Vec<Ended> = std::mem::take(&mut self.reaped);
        for id in ids {
            self.touch_offload(id);
            if let Some(a) = self.tables.remove(id) {
                all.push(Ended::of(id, &a, EndReason::Shutdown));
            }
        }
        all
    }
}

/// RFC 8489 §18.2: Binding success with XOR-MAPPED-ADDRESS, or 420 for unknown attributes.
fn binding_response(ft: &FiveTuple, msg: &Message<'_>, out: &mut [u8]) -> Result<usize, wire::WriteError> {
    let tid = msg.transaction_id();
    if !msg.unknown_required().is_empty() {
        return response::error(out, Method::BINDING, tid, ErrorCode::UnknownAttribute, msg.unknown_required(), None);
    }
    let mut w = response::start_unauthenticated(out, Method::BINDING, Class::Success, tid)?;
    w.xor_address(attr::XOR_MAPPED_ADDRESS, &ft.client)?;
    response::seal(w, None)
}

#[cfg(test)]
mod tests;
