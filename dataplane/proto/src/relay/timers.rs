//! The worker's expiry timers: one [`TimerWheel`] per kind of [`Timer`], so each entry is only as
//! large as its kind needs (12 bytes for an allocation, 16 for a channel binding, 32 for a
//! permission, rather than 32 for each; an allocation with a permission and a channel has one of
//! each).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::timer::TimerWheel;
use crate::wire::ChannelNumber;

use super::{AllocationId, Timer};

/// Allocation, permission and channel-binding timers of one worker, behind one interface.
#[derive(Debug)]
pub(super) struct Timers {
    allocations: TimerWheel<AllocationId>,
    permissions: TimerWheel<(AllocationId, IpAddr)>,
    channels: TimerWheel<(AllocationId, ChannelNumber)>,
    /// What each wheel fired in the last [`advance`](Timers::advance), kept for its capacity.
    scratch: (Vec<AllocationId>, Vec<(AllocationId, IpAddr)>, Vec<(AllocationId, ChannelNumber)>),
}

impl Timers {
    /// Wheels whose tick 0 is `origin`, with ticks `tick` wide.
    pub(super) fn new(origin: Instant, tick: Duration) -> Self {
        Timers {
            allocations: TimerWheel::new(origin, tick),
            permissions: TimerWheel::new(origin, tick),
            channels: TimerWheel::new(origin, tick),
            scratch: (Vec::new(), Vec::new(), Vec::new()),
        }
    }

    /// Files `t` to fire at the first tick at or after `at`.
    pub(super) fn schedule(&mut self, at: Instant, t: Timer) {
        match t {
            Timer::Allocation(id) => self.allocations.schedule(at, id),
            Timer::Permission(id, ip) => self.permissions.schedule(at, (id, ip)),
            Timer::Channel(id, ch) => self.channels.schedule(at, (id, ch)),
        }
    }

    /// Moves the wheels to `now`, appending what fired to `fired` (allocations first).
    pub(super) fn advance(&mut self, now: Instant, fired: &mut Vec<Timer>) {
        let (ids, perms, chans) = &mut self.scratch;
        self.allocations.advance(now, ids);
        fired.extend(ids.drain(..).map(Timer::Allocation));
        self.permissions.advance(now, perms);
        fired.extend(perms.drain(..).map(|(id, ip)| Timer::Permission(id, ip)));
        self.channels.advance(now, chans);
        fired.extend(chans.drain(..).map(|(id, ch)| Timer::Channel(id, ch)));
    }

    /// When [`advance`](Self::advance) should next be called (`None`: nothing filed).
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        [self.allocations.next_deadline(), self.permissions.next_deadline(), self.channels.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Keeps only the entries `keep` approves (see [`TimerWheel::retain`]).
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&Timer) -> bool) {
        self.allocations.retain(|&id| keep(&Timer::Allocation(id)));
        self.permissions.retain(|&(id, ip)| keep(&Timer::Permission(id, ip)));
        self.channels.retain(|&(id, ch)| keep(&Timer::Channel(id, ch)));
    }

    /// Entries filed, of every kind.
    pub(super) fn len(&self) -> usize {
        self.allocations.len() + self.permissions.len() + self.channels.len()
    }

    /// The instant of tick 0.
    pub(super) fn origin(&self) -> Instant {
        self.allocations.origin()
    }
}
