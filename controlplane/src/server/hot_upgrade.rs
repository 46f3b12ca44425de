//! The old process's side of a hot upgrade (SIGUSR2; protocol in [`crate::upgrade`]): start
//! the new binary, and once it is ready freeze the workers, hand their sockets and tables over,
//! and exit; or resume the frozen workers when anything fails.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::Instant;

use tracing::{error, info, warn};
use uturn_dataplane::{FrozenWorker, Start};

use super::Server;

/// How long the frozen handover waits for the usage writer to hand over its unwritten records
/// (what it has not handed over by then, it writes before this process exits).
const USAGE_TAKE_LIMIT: std::time::Duration = std::time::Duration::from_millis(500);
use crate::notify;
use crate::upgrade::{Handover, Upgrade, WorkerHandover};

impl Server<'_> {
    /// Starts the new process; it reports `READY` once it has loaded its configuration, and
    /// [`poll_upgrade`](Self::poll_upgrade) then hands over.
    pub(super) fn start_upgrade(&mut self, exe: &Path, args: &[std::ffi::OsString]) {
        if self.upgrade.is_some() {
            warn!("SIGUSR2: a hot upgrade is already under way");
            return;
        }
        match Upgrade::start(exe, args) {
            Ok(u) => {
                info!(binary = %exe.display(), pid = u.child.id(), "hot upgrade: new process started");
                self.upgrade = Some(u);
            }
            Err(e) => error!("hot upgrade failed: {e:#}; this process keeps serving"),
        }
    }

    /// Once the new process is ready: freezes the workers, hands everything over and returns
    /// true when the new process serves; on any failure resumes the workers and returns false.
    pub(super) fn poll_upgrade(&mut self) -> bool {
        let Some(u) = self.upgrade.as_mut() else { return false };
        match u.poll_ready() {
            Ok(false) => return false,
            Ok(true) => {}
            Err(e) => {
                error!("hot upgrade failed: {e:#}; this process keeps serving");
                self.upgrade = None;
                return false;
            }
        }
        let mut u = self.upgrade.take().expect("checked above");
        let began = Instant::now();
        // Every worker freezes at once; each finishes its sends and queued commands first.
        for w in &self.workers {
            w.freeze();
        }
        let mut frozen = Vec::with_capacity(self.workers.len());
        let mut lost = false;
        for w in std::mem::take(&mut self.workers) {
            match w.join().and_then(|e| e.frozen) {
                Some(f) => frozen.push(f),
                None => lost = true,
            }
        }
        if lost {
            error!("hot upgrade failed: a worker did not freeze; stopping");
            let _ = u.child.kill();
            let _ = u.child.wait();
            self.resume(frozen);
            return false;
        }
        // Ends the workers reported while they froze release their quotas first.
        let _ = self.take_events();
        // Usage records not written yet go with the handover (the new process writes them).
        let usage = self.usage.as_ref().map(|u| u.take_pending(USAGE_TAKE_LIMIT)).unwrap_or_default();
        let now = Instant::now();
        let mut fds: Vec<RawFd> = Vec::new();
        let admin = self.admin.as_ref().map(|(_, l)| fds.push(l.as_raw_fd())).is_some();
        let metrics = self.metrics.as_ref().map(|(_, l)| fds.push(l.as_raw_fd())).is_some();
        let mut workers = Vec::with_capacity(frozen.len());
        for f in &frozen {
            let listeners: Vec<RawFd> = f.listeners().map(|s| s.as_raw_fd()).collect();
            let stream_listeners: Vec<RawFd> = f.stream_listeners().map(|s| s.as_raw_fd()).collect();
            let exported = f.export(now);
            fds.extend(&listeners);
            fds.extend(&stream_listeners);
            // Each relay socket, a dual allocation's second one right after it.
            for (_, s, a) in &exported {
                fds.push(s.as_raw_fd());
                fds.extend(a.map(|a| a.as_raw_fd()));
            }
            workers.push(WorkerHandover {
                listeners: listeners.len(),
                stream_listeners: stream_listeners.len(),
                allocations: exported.into_iter().map(|(snap, _, _)| snap).collect(),
            });
        }
        let allocations: usize = workers.iter().map(|w| w.allocations.len()).sum();
        let handover = Handover {
            nonce_secret: self.challenger.key().secret(),
            nonce_lifetime_s: self.config.nonce_lifetime.as_secs().max(1),
            nonce_origin_age_ms: now.saturating_duration_since(self.challenger.origin()).as_millis() as u64,
            control: self.control.export(now),
            workers,
            admin,
            metrics,
            draining: self.control.draining(),
            usage,
        };
        // The new process attaches its own XDP program (an interface holds one attachment);
        // until its workers install their routes, ChannelData takes the socket path.
        if let Some(x) = self.xdp.as_mut() {
            x.detach();
        }
        match u.hand_over(&handover, &fds) {
            Ok(()) => {
                info!(
                    pid = u.child.id(),
                    allocations,
                    handover_ms = began.elapsed().as_secs_f64() * 1e3,
                    "hot upgrade: the new process serves; this one exits"
                );
                notify::main_pid(u.child.id());
                true
            }
            Err(e) => {
                error!("hot upgrade failed: {e:#}; this process keeps serving");
                let _ = u.child.kill();
                let _ = u.child.wait();
                if let Some(usage) = &self.usage {
                    usage.restore(handover.usage);
                }
                self.resume(frozen);
                false
            }
        }
    }

    /// Restarts the workers on their frozen sockets and tables.
    fn resume(&mut self, frozen: Vec<FrozenWorker>) {
        if let Some(x) = self.xdp.as_mut() {
            if let Err(e) = x.attach() {
                error!("hot upgrade: could not attach XDP again: {e}; ChannelData takes the socket path");
            }
        }
        for (i, f) in frozen.into_iter().enumerate() {
            let cfg = self.worker_cfgs[i].clone();
            match uturn_dataplane::spawn(cfg, self.senders[i].clone(), Start::Resume(Box::new(f))) {
                Ok(h) => self.workers.push(h),
                Err(e) => error!(worker = i, "could not resume the worker: {e}"),
            }
        }
        info!(workers = self.workers.len(), "workers resumed");
    }
}
