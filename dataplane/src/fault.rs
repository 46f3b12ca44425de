//! Fault injection for the end-to-end tests, compiled only with the `fault-injection` cargo
//! feature (the `uturn-tests` crate enables it; `cargo build --release` leaves it out, so a
//! production binary holds neither the hook nor its environment variable's name).
//! `UTURN_FAULT_INJECTION` holds a comma-separated list of faults:
//! - `worker-panic`: a worker panics on a datagram carrying [`MARKER`], to exercise what a
//!   worker failure does to the process;
//! - `register-files-fail`: every io_uring registered-file update for a relay socket fails, to
//!   exercise the plain-fd fallback.

use std::net::SocketAddr;

/// The datagram content that makes a worker panic when fault injection is on.
pub(crate) const MARKER: &[u8] = b"uturn-fault-injection:worker-panic";

fn asked_for(fault: &str) -> bool {
    std::env::var("UTURN_FAULT_INJECTION").is_ok_and(|v| v.split(',').any(|f| f.trim() == fault))
}

/// True when the environment asks for worker panics.
pub(crate) fn enabled() -> bool {
    asked_for("worker-panic")
}

/// True when the environment asks relay-socket file registrations to fail.
pub(crate) fn fails_file_registration() -> bool {
    asked_for("register-files-fail")
}

/// Panics when `on` and `datagram` carries [`MARKER`].
#[inline]
pub(crate) fn check(on: bool, worker: usize, from: SocketAddr, datagram: &[u8]) {
    if on && datagram.windows(MARKER.len()).any(|w| w == MARKER) {
        panic!("fault injection: worker {worker} told to panic by {from}");
    }
}
