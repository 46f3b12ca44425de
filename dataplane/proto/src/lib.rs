//! `uturn-proto`: the sans-IO core of the uturn TURN relay.
//!
//! - [`wire`]: STUN (RFC 8489) and TURN (RFC 8656) messages as zero-copy views over received bytes
//!   ([`wire::Message`], [`wire::ChannelData`]) and a writer that builds messages into a caller's
//!   buffer ([`wire::MessageWriter`]).
//! - [`relay`]: the per-worker protocol state machine ([`relay::WorkerState`]): allocations,
//!   permissions, channel bindings and their expiry. It takes the time as an argument and returns
//!   what to send; it owns no socket and reads no clock, so every path is testable with a
//!   simulated clock.
//!
//! Nothing here performs I/O; the `uturn-dataplane` crate wraps it in io_uring / epoll workers.
#![forbid(unsafe_code)]

pub mod nonce;
pub mod ratelimit;
pub mod relay;
pub mod response;
pub mod timer;
pub mod wire;

pub use relay::{FiveTuple, ListenAddr, Transport, WorkerState};
