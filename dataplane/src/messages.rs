//! The queue messages between the control plane and a worker.

use std::net::UdpSocket;

use uturn_proto::relay::{Command, Install};
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
    /// The allocation of `five_tuple` no longer exists (expired, deleted, or its Install was
    /// refused): release its quota.
    Released {
        /// The client's 5-tuple.
        five_tuple: FiveTuple,
    },
}
