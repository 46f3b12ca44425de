//! uturn's bundled benchmark tools: a TURN traffic generator (`uturn-load`), a UDP echo peer
//! (`uturn-peer`), a bare recvmmsg/sendmmsg forwarder that marks the floor of what a
//! kernel-socket relay costs (`udp-forwarder`), and a chart drawer (`uturn-plot`).
//!
//! All traffic goes to addresses given on the command line; the scripts use 127.0.0.1, or
//! network namespaces they create themselves (scripts/bench-xdp.sh).

pub mod client;
pub mod mmsg;
pub mod netns;
pub mod payload;
pub mod pipeline;
pub mod procstat;
pub mod stats;
pub mod streamload;
