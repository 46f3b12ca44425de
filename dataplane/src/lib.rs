//! `uturn-dataplane`: the thread-per-core worker shell around [`uturn_proto::WorkerState`].
//!
//! Each worker is one OS thread pinned to one core. It owns:
//! - one SO_REUSEPORT UDP socket per listen address, so the kernel steers each client 5-tuple to
//!   exactly one worker;
//! - the relay sockets (relayed transport addresses) of the allocations it serves, so both
//!   directions of a session stay on its core;
//! - its [`WorkerState`](uturn_proto::WorkerState) tables, touched by no other thread;
//! - one I/O backend: io_uring ([`IoBackend::Uring`]: multishot receive into a provided-buffer
//!   ring, batched sends, no copy of payloads) or epoll ([`IoBackend::Epoll`], through mio).
//!
//! With `xdp` on, an XDP program ([`XdpFastPath`], `bpf/channel_relay.c`) relays ChannelData on
//! bound channels before the socket path; each worker keeps its own channel routes in the
//! program's maps, computed from its tables (docs/xdp.md).
//!
//! The control plane talks to a worker only through queues ([`ToWorker`] in, bounded;
//! [`FromWorker`] out, each worker through its own [`EventSender`] that unparks the control
//! thread, which takes from the workers' queues in turn) and an
//! eventfd to wake it, written only while the worker sleeps. This crate knows nothing of users, passwords or
//! configuration files.

mod bufring;
#[cfg(test)]
#[path = "../build_clang.rs"]
mod build_clang;
#[cfg(test)]
mod build_clang_tests;
mod core;
mod epoll;
#[cfg(feature = "fault-injection")]
mod fault;
mod fdpass;
mod gso;
mod hold;
mod messages;
mod metrics;
mod proxy;
mod socket;
mod stream;
mod sys;
pub mod trace;
mod uring;
mod worker;
mod xdp;

pub use fdpass::{inheritable, inherited_stream, recv_fds, send_fds, FDS_PER_MESSAGE};
pub use hold::{HoldCounters, HoldLimits};
pub use messages::{EventSender, FromWorker, ToWorker, UnverifiedGauge};
pub use metrics::{Turnaround, WorkerMetrics, WorkerSample, PUBLISH_INTERVAL, TURNAROUND_BUCKETS};
pub use proxy::{ProxyCounters, ProxyProtocol, PROXY_REFUSALS};
pub use socket::{attach_reuseport_cpu, bind_listener, bind_relay, bind_stream_listener, local_addresses};
pub use stream::tls::{TlsError, TlsServer, ALPN_STUN_TURN};
pub use stream::{ConnectionCount, ConnectionSlot, StreamCounters, StreamLimits, CLOSE_REASONS};
pub use sys::raise_fd_limit;
pub use uring::probe as probe_uring;
pub use worker::{spawn, FrozenWorker, IoBackend, Start, WorkerConfig, WorkerExit, WorkerHandle};
pub use xdp::{
    available as xdp_available, XdpError, XdpFastPath, XdpMaps, XdpMode, XdpOptions, XdpVerdicts,
    VERDICTS as XDP_VERDICTS,
};
