//! The queue messages between the control plane and a worker.

use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::Thread;
use std::time::Instant;

use crossbeam_channel::Sender;

use uturn_proto::relay::{Command, Ended, Install, SessionInfo};
use uturn_proto::wire::TransactionId;
use uturn_proto::FiveTuple;

/// What the control plane pushes into a worker.
#[derive(Debug)]
pub enum ToWorker {
    /// Install an allocation whose relayed transport address is the first socket (already
    /// bound, non-blocking); a dual allocation's second relayed address is the second.
    Install(Install, UdpSocket, Option<UdpSocket>),
    /// Install a TCP allocation (RFC 6062 §5.1): no relay socket here, the control plane's TCP
    /// relay holds its listener, and the worker ends it with the client's connection.
    InstallTcp(Install),
    /// Any other command (Refresh, CreatePermission, ChannelBind, or a reply to send).
    Command(Command),
    /// RFC 6062 §5.4: the ConnectionBind received on `five_tuple` (a client connection of this
    /// worker) succeeded: queue `response`, then relay bytes as they are between that
    /// connection (now a client data connection) and `peer` (the peer data connection, connected
    /// and non-blocking), in both directions, until either closes.
    BindData {
        /// The client data connection's 5-tuple.
        five_tuple: FiveTuple,
        /// The peer data connection.
        peer: TcpStream,
        /// Its CONNECTION-ID, reported back in [`FromWorker::DataClosed`].
        connection_id: u32,
        /// The signed ConnectionBind success response.
        response: Vec<u8>,
        /// The `max-connections` slot the peer connection holds (given back if this message is
        /// dropped).
        slot: crate::stream::ConnectionSlot,
    },
    /// RFC 6062 §5.4: the ConnectionBind received on `five_tuple` failed: queue `response` (an
    /// error) and go on reading STUN messages on that connection.
    BindFailed {
        /// The connection's 5-tuple.
        five_tuple: FiveTuple,
        /// The error response.
        response: Vec<u8>,
    },
    /// Close the client data connection `five_tuple` and its peer data connection (their TCP
    /// allocation ended, RFC 6062 §5.5).
    CloseData {
        /// The client data connection's 5-tuple.
        five_tuple: FiveTuple,
    },
    /// Send this worker's index and its live sessions to the sender (the admin API).
    Sessions(Sender<(usize, Vec<SessionInfo>)>),
}

/// A worker's end of its own queue to the control plane: an unbounded crossbeam sender plus the
/// control thread, which sleeps in `std::thread::park_timeout` (a futex) and is unparked after
/// each event. A channel's blocking receive would spin and `sched_yield` before sleeping, which
/// on a core shared with a worker burns the time the worker needs.
#[derive(Debug, Clone)]
pub struct EventSender {
    tx: Sender<FromWorker>,
    control: Thread,
    /// Requests admitted on their source's budget (`verified: false`) queued and not yet taken.
    unverified: Arc<AtomicUsize>,
}

/// The control plane's handle on one worker's count of queued unverified requests: it calls
/// [`taken`](Self::taken) for each [`FromWorker::Request`] with `verified: false` it receives.
#[derive(Debug, Clone)]
pub struct UnverifiedGauge(Arc<AtomicUsize>);

impl UnverifiedGauge {
    /// One unverified request has left the queue.
    pub fn taken(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EventSender {
    /// Events go into `tx`; `control` is the thread that drains its receiver and parks when
    /// it is empty.
    pub fn new(tx: Sender<FromWorker>, control: Thread) -> Self {
        EventSender { tx, control, unverified: Arc::new(AtomicUsize::new(0)) }
    }

    /// The gauge the control plane decrements as it takes this queue's unverified requests.
    pub fn unverified_gauge(&self) -> UnverifiedGauge {
        UnverifiedGauge(self.unverified.clone())
    }

    /// Unverified requests queued and not yet taken (an upper bound while the control plane
    /// is taking one).
    pub(crate) fn unverified(&self) -> usize {
        self.unverified.load(Ordering::Relaxed)
    }

    /// Queues `ev` and unparks the control thread (an atomic swap when it is awake, one futex
    /// wake when it is parked). Errors only when the control plane is gone.
    pub(crate) fn send(&self, ev: FromWorker) -> Result<(), FromWorker> {
        let unverified = matches!(ev, FromWorker::Request { verified: false, .. });
        if unverified {
            self.unverified.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = self.tx.send(ev) {
            if unverified {
                self.unverified.fetch_sub(1, Ordering::Relaxed);
            }
            return Err(e.0);
        }
        self.control.unpark();
        Ok(())
    }

    /// Events queued and not yet taken by the control plane.
    pub(crate) fn len(&self) -> usize {
        self.tx.len()
    }
}

/// What a worker reports to the control plane.
#[derive(Debug)]
pub enum FromWorker {
    /// A request that needs authentication (Allocate, Refresh, CreatePermission, ChannelBind):
    /// the whole datagram as received from `five_tuple` on worker `worker`.
    Request {
        /// Index of the worker that received it (and owns the 5-tuple).
        worker: usize,
        /// The client's 5-tuple.
        five_tuple: FiveTuple,
        /// The STUN message bytes.
        bytes: Vec<u8>,
        /// True when the worker verified its MESSAGE-INTEGRITY with the allocation's key; false
        /// when it was admitted on its source's budget (the control plane then calls
        /// [`UnverifiedGauge::taken`]).
        verified: bool,
        /// When the worker received it (the start of the Allocate latency the metrics show).
        received: Instant,
    },
    /// The allocation of `five_tuple` made by Allocate `tid` no longer exists (expired, deleted,
    /// or its Install was refused): release its quota. A newer allocation on the same 5-tuple
    /// (another `tid`) is not affected.
    Released {
        /// The client's 5-tuple.
        five_tuple: FiveTuple,
        /// Transaction ID of the Allocate that made the allocation.
        tid: TransactionId,
        /// The allocation's end with its totals (usage records, the status page's session
        /// timeline); `None` when it was never installed (its Install was refused).
        ended: Option<Box<Ended>>,
    },
    /// The data connection pair of CONNECTION-ID `connection_id` (RFC 6062) closed, or its
    /// [`ToWorker::BindData`] found the client data connection gone.
    DataClosed {
        /// The CONNECTION-ID.
        connection_id: u32,
    },
}
