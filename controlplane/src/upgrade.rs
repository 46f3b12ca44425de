//! Hot upgrade (`kill -USR2`): the running process starts the binary at the path it was started
//! from, with the same arguments, and hands it every socket and the state of every allocation.
//!
//! Protocol over a Unix stream socket pair whose child end the new process finds in
//! `UTURN_UPGRADE_FD`:
//! 1. the new process loads its configuration and starts its credential sources, then writes
//!    `READY <pid>\n`;
//! 2. the old one freezes its workers (receives cancelled, sends finished: every datagram is
//!    either relayed or still queued in its socket), and writes the [`Handover`] as an 8-byte
//!    length and JSON, then the descriptors in its order with SCM_RIGHTS;
//! 3. the new process serves them and writes `SERVING\n`; the old one exits. Anything else
//!    (an exit, EOF, a timeout) and the old process resumes its frozen workers and logs why.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use uturn_proto::relay::AllocationSnapshot;

use crate::control::ControlSnapshot;

/// The environment variable naming the new process's end of the socket pair.
pub const ENV_FD: &str = "UTURN_UPGRADE_FD";
/// How long the old process waits for the new one to be ready, then to serve.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the old process waits for `SERVING` once it has handed everything over.
pub const SERVING_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything but the descriptors. Descriptors follow in this order: the admin listener (if
/// `admin`), the metrics listener (if `metrics`), then per worker its UDP listeners, its TCP
/// listeners and then its
/// allocations' relay sockets, in the order of `workers[i].allocations` (a dual allocation's
/// second relay socket right after its first).
#[derive(Debug, Serialize, Deserialize)]
pub struct Handover {
    /// The nonce secret, so nonces already handed out stay valid.
    pub nonce_secret: [u8; 32],
    /// Nonce lifetime, seconds.
    pub nonce_lifetime_s: u64,
    /// Milliseconds since the nonce clock's origin.
    pub nonce_origin_age_ms: u64,
    /// The control plane's owner records.
    pub control: ControlSnapshot,
    /// Per worker, in index order.
    pub workers: Vec<WorkerHandover>,
    /// An admin listener follows.
    pub admin: bool,
    /// A metrics listener follows.
    pub metrics: bool,
    /// Draining, and its ALTERNATE-SERVER.
    pub draining: Option<Option<std::net::SocketAddr>>,
    /// Usage records the old process had not written yet (Redis unreachable); the new one
    /// writes them.
    #[serde(default)]
    pub usage: Vec<crate::usage::UsageRecord>,
}

/// One worker's part of the handover.
#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerHandover {
    /// Listener sockets that follow (one per UDP listen address).
    pub listeners: usize,
    /// TCP listener sockets that follow those (one per TCP or TLS listen address; 0 from a
    /// process that did not hand them over, and the new one binds its own).
    #[serde(default)]
    pub stream_listeners: usize,
    /// Its allocations; a relay socket follows for each.
    pub allocations: Vec<AllocationSnapshot>,
}

impl Handover {
    /// Descriptors that follow the header.
    pub fn fd_count(&self) -> usize {
        self.admin as usize
            + self.metrics as usize
            + self
                .workers
                .iter()
                .map(|w| {
                    w.listeners
                        + w.stream_listeners
                        + w.allocations.iter().map(|a| 1 + a.additional.is_some() as usize).sum::<usize>()
                })
                .sum::<usize>()
    }
}

/// The old process's side: the started child and its end of the pair.
pub struct Upgrade {
    /// The new process.
    pub child: Child,
    stream: BufReader<UnixStream>,
    started: Instant,
}

impl Upgrade {
    /// Starts `exe` with `args` and the child end of a new socket pair in [`ENV_FD`].
    pub fn start(exe: &std::path::Path, args: &[std::ffi::OsString]) -> Result<Upgrade> {
        let (ours, theirs) = UnixStream::pair().context("socketpair")?;
        uturn_dataplane::inheritable(&theirs)?;
        let mut cmd = Command::new(exe);
        cmd.args(args).env(ENV_FD, theirs.as_raw_fd().to_string());
        let child = cmd.spawn().with_context(|| format!("starting {}", exe.display()))?;
        drop(theirs);
        ours.set_nonblocking(true)?;
        Ok(Upgrade { child, stream: BufReader::new(ours), started: Instant::now() })
    }

    /// Polls for `READY`: `Ok(true)` once it came, `Ok(false)` while waiting, an error when the
    /// child exited, closed the socket or took longer than [`READY_TIMEOUT`].
    pub fn poll_ready(&mut self) -> Result<bool> {
        let mut line = String::new();
        match self.stream.read_line(&mut line) {
            Ok(0) => bail!("the new process closed the upgrade socket ({})", self.exit_status()),
            Ok(_) if line.starts_with("READY") => Ok(true),
            Ok(_) => bail!("unexpected message from the new process: {line:?}"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Ok(Some(status)) = self.child.try_wait() {
                    bail!("the new process exited before it was ready ({status})");
                }
                if self.started.elapsed() > READY_TIMEOUT {
                    bail!("the new process was not ready within {READY_TIMEOUT:?}");
                }
                Ok(false)
            }
            Err(e) => Err(e).context("reading the upgrade socket"),
        }
    }

    /// Sends the handover and its descriptors, then waits for `SERVING`.
    pub fn hand_over(&mut self, h: &Handover, fds: &[RawFd]) -> Result<()> {
        let s = self.stream.get_mut();
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(SERVING_TIMEOUT))?;
        let body = serde_json::to_vec(h)?;
        s.write_all(&(body.len() as u64).to_be_bytes())?;
        s.write_all(&body)?;
        uturn_dataplane::send_fds(s, fds).context("passing the sockets")?;
        let mut line = String::new();
        match self.stream.read_line(&mut line) {
            Ok(_) if line.starts_with("SERVING") => Ok(()),
            Ok(0) => bail!("the new process closed the upgrade socket ({})", self.exit_status()),
            Ok(_) => bail!("the new process did not take over: {}", line.trim()),
            Err(e) => Err(e).context("waiting for the new process to serve"),
        }
    }

    fn exit_status(&mut self) -> String {
        std::thread::sleep(Duration::from_millis(50));
        match self.child.try_wait() {
            Ok(Some(s)) => s.to_string(),
            _ => "still running".into(),
        }
    }
}

/// The new process's side.
pub struct Successor {
    stream: UnixStream,
}

impl Successor {
    /// The socket pair end named by [`ENV_FD`], if this process was started by a hot upgrade.
    pub fn from_env() -> Result<Option<Successor>> {
        let Ok(v) = std::env::var(ENV_FD) else { return Ok(None) };
        std::env::remove_var(ENV_FD);
        let fd: RawFd = v.parse().with_context(|| format!("{ENV_FD}={v}"))?;
        let stream = uturn_dataplane::inherited_stream(fd).with_context(|| format!("{ENV_FD}={v}"))?;
        Ok(Some(Successor { stream }))
    }

    /// Says `READY` and receives the handover and its descriptors.
    pub fn receive(&mut self) -> Result<(Handover, Vec<OwnedFd>)> {
        writeln!(self.stream, "READY {}", std::process::id())?;
        self.stream.set_read_timeout(Some(READY_TIMEOUT))?;
        let mut len = [0u8; 8];
        self.stream.read_exact(&mut len).context("reading the handover length")?;
        let len = u64::from_be_bytes(len) as usize;
        if len > 1 << 32 {
            bail!("handover of {len} bytes");
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).context("reading the handover")?;
        let h: Handover = serde_json::from_slice(&body).context("parsing the handover")?;
        let fds = uturn_dataplane::recv_fds(&self.stream, h.fd_count()).context("receiving the sockets")?;
        Ok((h, fds))
    }

    /// Tells the old process to exit.
    pub fn serving(&mut self) -> Result<()> {
        writeln!(self.stream, "SERVING")?;
        Ok(())
    }

    /// Tells the old process that this one gives up (it resumes).
    pub fn failed(&mut self, why: &str) {
        let _ = writeln!(self.stream, "FAILED {why}");
    }
}
