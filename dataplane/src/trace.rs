//! The trace tap: while an operator traces a user, a session or a client (`uturn trace`, the
//! admin endpoint's `GET /trace`), the workers copy the STUN/TURN messages of the matching
//! allocations (and the headers of their relayed datagrams) into one bounded queue that the
//! control plane's tracer drains. A worker never blocks on it: a full queue drops the copy and
//! counts it ([`Tap::dropped`]).
//!
//! Cost when no trace is active: one relaxed load of [`ACTIVE`] and one branch per datagram
//! ([`active`]). While one is active a worker re-reads the [`TapFilter`] only when its
//! generation changed, then matches each datagram's 5-tuple, session and user against it.
//!
//! There is one tap per process (a static, like the global `tracing` subscriber): the workers
//! reach it without a handle, so no constructor changes shape for it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::SystemTime;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use uturn_proto::FiveTuple;

/// Events the tap's queue holds; past it copies are dropped and counted.
pub const TAP_QUEUE: usize = 8192;

/// True while at least one trace is active (read once per datagram by every worker).
static ACTIVE: AtomicBool = AtomicBool::new(false);
static TAP: OnceLock<Tap> = OnceLock::new();

/// True while a trace is active: the one branch a worker takes per datagram.
#[inline(always)]
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Which side of the relay a message was seen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Received from the client (request, indication, ChannelData).
    FromClient,
    /// Sent to the client (response, Data indication, ChannelData).
    ToClient,
    /// A peer's datagram the relay dropped (no copy of it: `bytes` is empty).
    FromPeer,
}

/// Who handled the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The worker answered or relayed it.
    Worker,
    /// The control plane answered it (the worker sent the answer it built).
    ControlPlane,
}

/// Why the worker dropped a client's or a peer's datagram (the counter it incremented).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No permission for the peer's IP (RFC 8656 §9; counter `no_permission`).
    NoPermission,
    /// ChannelData on a channel with no live binding (RFC 8656 §12; `unbound_channel`).
    UnboundChannel,
    /// No live allocation on the 5-tuple (`no_allocation`).
    NoAllocation,
    /// Over the allocation's `max-bandwidth` (`bandwidth_drops`).
    Bandwidth,
    /// Any other drop (malformed, a Send indication without its attributes, ...).
    Other,
}

/// One copied message.
#[derive(Debug, Clone)]
pub struct TapEvent {
    /// When the worker saw it.
    pub at: SystemTime,
    /// The worker's index.
    pub worker: usize,
    /// The client's 5-tuple.
    pub five_tuple: FiveTuple,
    /// Session id of the 5-tuple's allocation (0: none yet).
    pub session: u64,
    /// The allocation's user as authenticated (REST usernames keep their expiry prefix).
    pub user: Option<Arc<str>>,
    /// The allocation's relayed transport address.
    pub relayed: Option<SocketAddr>,
    /// Which way it went.
    pub direction: Direction,
    /// Who handled it.
    pub origin: Origin,
    /// The peer of relayed data (XOR-PEER-ADDRESS or the channel's peer).
    pub peer: Option<SocketAddr>,
    /// Set when the worker dropped it.
    pub dropped: Option<DropReason>,
    /// A request or response on a 5-tuple with no allocation, copied only because a user trace
    /// is active (the tracer keeps it until it knows whose it is).
    pub pending: bool,
    /// Length of the whole message, bytes.
    pub len: usize,
    /// The message: STUN messages whole, relayed data cut after its headers plus
    /// [`TapFilter::snaplen`] bytes of payload.
    pub bytes: Vec<u8>,
}

/// What the active traces match; the union of every trace's filter.
#[derive(Debug, Clone, Default)]
pub struct TapFilter {
    /// Users (a REST username `EXPIRY:NAME` matches `NAME` too).
    pub users: Vec<String>,
    /// Session ids.
    pub sessions: Vec<u64>,
    /// Client IPs, with a port or any port.
    pub clients: Vec<(IpAddr, Option<u16>)>,
    /// Bytes of relayed payload to copy after the headers (the largest any trace asked for).
    pub snaplen: usize,
}

impl TapFilter {
    /// True when the client's 5-tuple or its allocation matches.
    pub fn matches(&self, ft: &FiveTuple, session: u64, user: Option<&str>) -> bool {
        self.clients.iter().any(|(ip, port)| *ip == ft.client.ip() && port.is_none_or(|p| p == ft.client.port()))
            || (session != 0 && self.sessions.contains(&session))
            || user.is_some_and(|u| self.users.iter().any(|n| user_matches(u, n)))
    }

    /// True when some trace matches by user (so unattributed exchanges are copied).
    pub fn by_user(&self) -> bool {
        !self.users.is_empty()
    }
}

/// True when the authenticated `user` is `name`, or a REST username `EXPIRY:name`.
pub fn user_matches(user: &str, name: &str) -> bool {
    user == name || user.split_once(':').is_some_and(|(exp, n)| n == name && exp.bytes().all(|b| b.is_ascii_digit()))
}

/// The process's tap: the filter the workers read and the queue they copy into.
#[derive(Debug)]
pub struct Tap {
    tx: Sender<TapEvent>,
    rx: Receiver<TapEvent>,
    filter: RwLock<Arc<TapFilter>>,
    generation: AtomicU64,
    dropped: AtomicU64,
}

impl Tap {
    /// The process's tap (made on first use).
    pub fn get() -> &'static Tap {
        TAP.get_or_init(|| {
            let (tx, rx) = crossbeam_channel::bounded(TAP_QUEUE);
            Tap {
                tx,
                rx,
                filter: RwLock::new(Arc::new(TapFilter::default())),
                generation: AtomicU64::new(1),
                dropped: AtomicU64::new(0),
            }
        })
    }

    /// Installs `filter` (the union of the active traces; `None` when none is active): the
    /// workers see it before their next datagram.
    pub fn set_filter(&self, filter: Option<TapFilter>) {
        let on = filter.is_some();
        if let Ok(mut f) = self.filter.write() {
            *f = Arc::new(filter.unwrap_or_default());
        }
        self.generation.fetch_add(1, Ordering::Release);
        ACTIVE.store(on, Ordering::Release);
    }

    /// The queue the tracer drains.
    pub fn receiver(&self) -> &Receiver<TapEvent> {
        &self.rx
    }

    /// Copies dropped because the queue was full (since start).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queues `ev` without blocking; counts it when the queue is full.
    pub(crate) fn send(&self, ev: TapEvent) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(ev) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A worker's view of the tap: the filter it last read and that filter's generation.
#[derive(Debug, Default)]
pub(crate) struct WorkerTap {
    generation: u64,
    filter: Arc<TapFilter>,
}

impl WorkerTap {
    /// The current filter (re-read only when its generation changed).
    pub(crate) fn filter_arc(&mut self) -> Arc<TapFilter> {
        let tap = Tap::get();
        let g = tap.generation.load(Ordering::Acquire);
        if g != self.generation {
            if let Ok(f) = tap.filter.read() {
                self.filter = f.clone();
            }
            self.generation = g;
        }
        self.filter.clone()
    }
}

/// The part of `message` the tap copies: a STUN message whole unless it is a Send or Data
/// indication, whose DATA value is cut to `snaplen` bytes; ChannelData cut after its 4-byte
/// header plus `snaplen` bytes.
pub(crate) fn snap(message: &[u8], snaplen: usize) -> &[u8] {
    match message.first() {
        Some(b) if b & 0xC0 == 0x40 => &message[..message.len().min(4 + snaplen)],
        Some(_) if message.len() >= 20 => {
            let typ = u16::from_be_bytes([message[0], message[1]]);
            // Send (0x0016) or Data (0x0017) indication: cut inside DATA.
            if typ != 0x0016 && typ != 0x0017 {
                return message;
            }
            let mut at = 20;
            while at + 4 <= message.len() {
                let t = u16::from_be_bytes([message[at], message[at + 1]]);
                let l = u16::from_be_bytes([message[at + 2], message[at + 3]]) as usize;
                if t == 0x0013 {
                    return &message[..message.len().min(at + 4 + snaplen)];
                }
                at += 4 + l.div_ceil(4) * 4;
            }
            message
        }
        _ => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_usernames_match_their_user() {
        assert!(user_matches("alice", "alice"));
        assert!(user_matches("1700000000:alice", "alice"));
        assert!(!user_matches("x:alice", "alice"));
        assert!(!user_matches("alice2", "alice"));
        assert!(!user_matches("1700000000:bob", "alice"));
    }

    #[test]
    fn snap_cuts_relayed_payloads_only() {
        let cd = [0x40, 0x00, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(snap(&cd, 0), &cd[..4]);
        assert_eq!(snap(&cd, 2), &cd[..6]);
        assert_eq!(snap(&cd, 100), &cd[..]);
        let mut send = vec![0x00, 0x16, 0, 20, 0x21, 0x12, 0xA4, 0x42];
        send.extend([0u8; 12]);
        send.extend([0x00, 0x12, 0x00, 0x08, 0, 1, 0, 0, 0, 0, 0, 0]); // XOR-PEER-ADDRESS
        send.extend([0x00, 0x13, 0x00, 0x04, 9, 9, 9, 9]); // DATA
        assert_eq!(snap(&send, 0).len(), 20 + 12 + 4);
        let binding = [0u8; 20];
        assert_eq!(snap(&binding, 0).len(), 20);
    }
}
