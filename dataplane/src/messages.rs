//! The queue messages between the control plane and a worker.

use std::net::UdpSocket;
use std::thread::Thread;

use crossbeam_channel::Sender;

use uturn_proto::relay::{Command, Install};
use uturn_proto::wire::TransactionId;
use uturn_proto::FiveTuple;

/// What the control plane pushes into a worker.
#[derive(Debug)]
pub enum ToWorker {
    /// Install an allocation whose relayed transport address is `socket` (already bound,
    /// non-blocking).
    Install(Install, UdpSocket),
    /// Any other command (Refresh, CreatePermission, ChannelBind, or a reply to send).
    Command(Command),
}

/// A worker's end of its own queue to the control plane: an unbounded crossbeam sender plus the
/// control thread, which sleeps in `std::thread::park_timeout` (a futex) and is unparked after
/// each event. A channel's blocking receive would spin and `sched_yield` before sleeping, which
/// on a core shared with a worker burns the time the worker needs.
#[derive(Debug, Clone)]
pub struct EventSender {
    tx: Sender<FromWorker>,
    control: Thread,
}

impl EventSender {
    /// Events go into `tx`; `control` is the thread that drains its receiver and parks when
    /// it is empty.
    pub fn new(tx: Sender<FromWorker>, control: Thread) -> Self {
        EventSender { tx, control }
    }

    /// Queues `ev` and unparks the control thread (an atomic swap when it is awake, one futex
    /// wake when it is parked). Errors only when the control plane is gone.
    pub(crate) fn send(&self, ev: FromWorker) -> Result<(), FromWorker> {
        self.tx.send(ev).map_err(|e| e.0)?;
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
    },
    /// The allocation of `five_tuple` made by Allocate `tid` no longer exists (expired, deleted,
    /// or its Install was refused): release its quota. A newer allocation on the same 5-tuple
    /// (another `tid`) is not affected.
    Released {
        /// The client's 5-tuple.
        five_tuple: FiveTuple,
        /// Transaction ID of the Allocate that made the allocation.
        tid: TransactionId,
    },
}
