//! What the control plane pushes into a worker, and what the worker reports back
//! (RFC 8656 §7-§12 requests after they have been authenticated).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::wire::{ChannelNumber, IntegrityKey, TransactionId};

use super::{AllocationId, Ended, FiveTuple};

/// An authenticated Allocate that the control plane granted (RFC 8656 §7.2): the relayed
/// transport address is already bound and `response` is the complete, signed success response.
#[derive(Debug, Clone)]
pub struct Install {
    /// The client's 5-tuple.
    pub five_tuple: FiveTuple,
    /// Transaction ID of the Allocate request, to recognise retransmissions.
    pub tid: TransactionId,
    /// The relayed transport address.
    pub relayed: SocketAddr,
    /// A dual allocation's second relayed transport address (the other family).
    pub additional: Option<SocketAddr>,
    /// Granted lifetime.
    pub lifetime: Duration,
    /// The signed Allocate success response, resent verbatim to retransmissions.
    pub response: Box<[u8]>,
    /// The user's long-term key: signs the worker's own answers (a 437 when the 5-tuple is
    /// taken) and verifies later requests on the allocation.
    pub key: IntegrityKey,
    /// Session id, unique in this relay process and the ones it hands over to.
    pub session: u64,
    /// The authenticated username.
    pub user: Arc<str>,
}

/// An authenticated request on an existing allocation. The worker applies it to its tables and
/// answers the client with a response signed with `key`.
#[derive(Debug, Clone)]
pub enum Command {
    /// Install a new allocation (Allocate success).
    Install(Install),
    /// Refresh (RFC 8656 §8): `lifetime` already clamped by policy; zero deletes.
    Refresh {
        /// The client's 5-tuple.
        five_tuple: FiveTuple,
        /// Request transaction ID.
        tid: TransactionId,
        /// Granted lifetime; `Duration::ZERO` deletes the allocation.
        lifetime: Duration,
        /// Key to sign the response with.
        key: IntegrityKey,
    },
    /// CreatePermission (RFC 8656 §10): every peer already passed the peer policy.
    CreatePermission {
        /// The client's 5-tuple.
        five_tuple: FiveTuple,
        /// Request transaction ID.
        tid: TransactionId,
        /// Peer IP addresses to install or refresh.
        peers: Vec<IpAddr>,
        /// Key to sign the response with.
        key: IntegrityKey,
    },
    /// ChannelBind (RFC 8656 §12.2): the peer already passed the peer policy.
    ChannelBind {
        /// The client's 5-tuple.
        five_tuple: FiveTuple,
        /// Request transaction ID.
        tid: TransactionId,
        /// Channel to bind.
        channel: ChannelNumber,
        /// Peer transport address to bind it to.
        peer: SocketAddr,
        /// Key to sign the response with.
        key: IntegrityKey,
    },
    /// End the allocation that Allocate `tid` made on `five_tuple` (an operator revoked its
    /// user), with no answer to the client; a newer allocation on the 5-tuple stays.
    Revoke {
        /// The client's 5-tuple.
        five_tuple: FiveTuple,
        /// Transaction ID of the Allocate that made the allocation.
        tid: TransactionId,
    },
    /// Send `bytes` (a response the control plane built, e.g. 401) to the client.
    Reply {
        /// The client's 5-tuple.
        five_tuple: FiveTuple,
        /// The whole STUN message.
        bytes: Vec<u8>,
    },
}

/// What applying a [`Command`] produced, beyond the reply written to the caller's buffer.
// One per control-plane command, never per datagram: an unboxed `Ended` (with its relayed
// addresses, for usage records) costs less than an allocation per removal.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond the reply.
    None,
    /// An allocation was installed under this id: start receiving on its relay socket.
    Installed(AllocationId),
    /// An Install was refused (the 5-tuple already has a live allocation): close the offered
    /// relay socket and tell the control plane that the allocation of Allocate `tid` was not made.
    InstallRefused {
        /// Transaction ID of the refused Allocate.
        tid: TransactionId,
    },
    /// An Install repeated the Allocate of the live allocation on its 5-tuple (same transaction
    /// ID): the original success was resent; close the offered relay socket and report nothing
    /// (the allocation lives on).
    DuplicateInstall,
    /// The allocation was deleted (Refresh with LIFETIME 0): close its relay socket and tell the
    /// control plane.
    Removed(Ended),
}
