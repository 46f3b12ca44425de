//! A hashed timing wheel for expiry (allocations, permissions, channel bindings).
//!
//! Slots are one tick wide (1 second in uturn); each pass over a slot touches only the entries
//! filed there, never the whole table. An entry whose deadline is further than one revolution away
//! stays in its slot until its round comes. Refreshing an entry does not touch the wheel: the owner
//! stores the new deadline and, when the old timer fires, files it again (see `relay`).

use std::time::{Duration, Instant};

/// Number of slots; with 1 s ticks one revolution is 4096 s, longer than the 3600 s maximum
/// allocation lifetime, so most entries fire on their first visit.
const SLOTS: usize = 4096;

/// A timing wheel of `T` entries with a fixed tick.
#[derive(Debug)]
pub struct TimerWheel<T> {
    origin: Instant,
    tick: Duration,
    /// The last tick whose slot has been processed.
    current: u64,
    /// Each entry with its tick's low 32 bits (compared wrapping: 8 bytes less per entry, and
    /// an allocation with a permission and a channel has three entries).
    slots: Vec<Vec<(u32, T)>>,
    len: usize,
}

impl<T: Copy> TimerWheel<T> {
    /// A wheel whose tick 0 is `origin`; `tick` must be non-zero.
    pub fn new(origin: Instant, tick: Duration) -> Self {
        assert!(!tick.is_zero(), "timer tick must be non-zero");
        TimerWheel { origin, tick, current: 0, slots: (0..SLOTS).map(|_| Vec::new()).collect(), len: 0 }
    }

    fn tick_of(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.origin);
        (d.as_nanos() / self.tick.as_nanos()) as u64
    }

    /// Files `item` to fire at the first tick at or after `at` (never in the past).
    pub fn schedule(&mut self, at: Instant, item: T) {
        let d = at.saturating_duration_since(self.origin).as_nanos();
        let t = self.tick.as_nanos();
        let tick = (d.div_ceil(t) as u64).max(self.current + 1);
        self.slots[(tick % SLOTS as u64) as usize].push((tick as u32, item));
        self.len += 1;
    }

    /// Moves the wheel to `now`, appending every entry whose tick has passed to `fired`.
    pub fn advance(&mut self, now: Instant, fired: &mut Vec<T>) {
        let target = self.tick_of(now);
        if target <= self.current {
            return;
        }
        let steps = (target - self.current).min(SLOTS as u64);
        for step in 1..=steps {
            let slot = ((self.current + step) % SLOTS as u64) as usize;
            let entries = &mut self.slots[slot];
            let before = entries.len();
            entries.retain(|&(due, item)| {
                // Due at or before `target`, in wrapping 32-bit tick arithmetic (entries are
                // never filed 2^31 ticks ahead).
                if (target as u32).wrapping_sub(due) as i32 >= 0 {
                    fired.push(item);
                    false
                } else {
                    true
                }
            });
            self.len -= before - entries.len();
            release_excess(entries);
        }
        self.current = target;
    }

    /// When [`advance`](Self::advance) should next be called: the next tick while anything is
    /// filed, `None` when the wheel is empty.
    pub fn next_deadline(&self) -> Option<Instant> {
        (self.len > 0).then(|| self.origin + self.tick * (self.current + 1) as u32)
    }

    /// Keeps only the entries `keep` approves: the owner's way to drop entries whose target is
    /// gone (a deleted allocation leaves its timers behind). O(entries); call it rarely.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let mut len = 0;
        for slot in &mut self.slots {
            slot.retain(|(_, item)| keep(item));
            release_excess(slot);
            len += slot.len();
        }
        self.len = len;
    }

    /// Entries the slots have room for without allocating (at least [`len`](Self::len)), for
    /// tests and memory accounting: stays within a small factor of the live entries.
    pub fn capacity(&self) -> usize {
        self.slots.iter().map(Vec::capacity).sum()
    }

    /// The instant of tick 0 (never after any instant the wheel has seen).
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Number of filed entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is filed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Gives a slot's spare room back to the allocator once it has been emptied or mostly drained.
/// Without this every slot keeps the capacity of its busiest second: under allocation churn the
/// wheel grew by one slot's worth each tick for a whole revolution (4096 s), which the soak saw as
/// RSS climbing about 1.2 MB a minute. One free per drained slot per tick is the cost.
fn release_excess<E>(slot: &mut Vec<E>) {
    if slot.is_empty() {
        if slot.capacity() > 0 {
            *slot = Vec::new();
        }
    } else if slot.capacity() > 4 * slot.len() + 16 {
        slot.shrink_to(2 * slot.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, Duration::from_secs(1));
        w.schedule(t0 + Duration::from_millis(1500), 'a');
        w.schedule(t0 + Duration::from_secs(5000), 'b'); // more than one revolution away
        let mut fired = Vec::new();
        w.advance(t0 + Duration::from_secs(1), &mut fired);
        assert!(fired.is_empty());
        w.advance(t0 + Duration::from_secs(2), &mut fired);
        assert_eq!(fired, vec!['a']);
        w.advance(t0 + Duration::from_secs(4999), &mut fired);
        assert_eq!(fired, vec!['a']);
        assert_eq!(w.len(), 1);
        w.advance(t0 + Duration::from_secs(5000), &mut fired);
        assert_eq!(fired, vec!['a', 'b']);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn past_deadlines_fire_on_next_tick() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, Duration::from_secs(1));
        let mut fired = Vec::new();
        w.advance(t0 + Duration::from_secs(10), &mut fired);
        w.schedule(t0, 1u8);
        assert_eq!(w.next_deadline(), Some(t0 + Duration::from_secs(11)));
        w.advance(t0 + Duration::from_secs(11), &mut fired);
        assert_eq!(fired, vec![1]);
    }

    #[test]
    fn drained_slots_give_their_room_back() {
        // Churn as in the soak: every second 500 entries filed 600 s ahead, all fired in time.
        // Before slots released their room, capacity grew by a slot's worth every tick.
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, Duration::from_secs(1));
        let mut fired = Vec::new();
        let mut peak_after_warmup = 0;
        for s in 0..3000u64 {
            for i in 0..500 {
                w.schedule(t0 + Duration::from_secs(s + 600), i);
            }
            fired.clear();
            w.advance(t0 + Duration::from_secs(s + 1), &mut fired);
            if s == 700 {
                peak_after_warmup = w.capacity();
            }
        }
        assert!(w.len() <= 601 * 500);
        assert!(
            w.capacity() <= peak_after_warmup + 4096,
            "capacity {} grew past its steady state {peak_after_warmup}",
            w.capacity()
        );
        assert!(w.capacity() <= 3 * w.len() + 16 * 4096, "capacity {} for {} entries", w.capacity(), w.len());
    }
}
