//! `uturn-controlplane`: configuration, credentials and nonces, Allocate authentication and
//! allocation policy for the uturn TURN relay. It pushes allocations, permissions and channel
//! bindings into the data-plane workers over queues and never touches a packet on the fast path.

pub mod admin;
pub mod admin_api;
pub mod check;
pub mod check_config;
pub mod config;
pub mod control;
pub mod credentials;
pub mod discovery;
pub mod fleet;
pub mod http_endpoint;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod ports;
pub mod secrets;
pub mod server;
pub mod store;
pub mod tcp_relay;
pub mod trace;
pub mod trace_cli;
pub mod upgrade;
pub mod status;
pub mod timeline;
pub mod usage;
