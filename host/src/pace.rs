//! Rate limits — a destination's (`rate_limit`, deliveries per second) and a source's on
//! ingest (events per second) — by the generic cell rate algorithm (GCRA, "virtual
//! scheduling"): a burst of up to one second's worth at once, then one every `1 / rate`
//! seconds.
//!
//! A delivery over its destination's limit is given the next free slot, kept for it: the
//! dispatcher puts it off in the store until then, marked as paced, and when it is claimed
//! again it is sent without taking another. An event over its source's limit is refused
//! (`429`) and takes no slot, so a sender that keeps trying is let in as soon as one frees.
//! A plugin's HTTP request over its origin's limit (`plugins.http_rate_limit`) waits for the
//! next free slot if its call has the time left, kept for it; if not it fails and takes no
//! slot — so a service flooded with more requests than its limit still gets its rate of
//! them, not a queue of slots that every later call gives up on.
//!
//! The limits are the store's (`Store::take_slot`), so that gateways sharing a store share
//! them: PostgreSQL keeps each limit's theoretical arrival time in a table every instance
//! updates (its statement `TAKE_SLOT` is [`gcra`] in SQL), SQLite — one gateway's store —
//! in memory, in [`Slots`].

use std::collections::HashMap;

/// Whose rate limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit<'a> {
    /// A destination's: its deliveries wait for their slots.
    Destination(&'a str),
    /// A source's on ingest: its events are refused when over it.
    Source(&'a str),
    /// A FAILED destination's automatic restarts (`restart_after`): one per interval, between
    /// all the gateways sharing the store.
    Restart(&'a str),
    /// Plugins' HTTP requests to an origin with a limit (`plugins.http_rate_limit`: the
    /// request's own, or its closest `*.` domain's), asked by a call that may wait
    /// `within` ms for its slot.
    Origin { origin: &'a str, within: u64 },
}

impl Limit<'_> {
    /// How far ahead of now, in ms, a slot is still taken (kept for whoever waits for it):
    /// any time for a delivery, which is put off until then; none for an event, which is
    /// refused; a plugin call's time left for its request.
    pub fn horizon(&self) -> u64 {
        match self {
            Limit::Destination(_) => u64::MAX,
            Limit::Source(_) | Limit::Restart(_) => 0,
            Limit::Origin { within, .. } => *within,
        }
    }

    /// How the store names the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Limit::Destination(_) => "destination",
            Limit::Source(_) => "source",
            Limit::Restart(_) => "restart",
            Limit::Origin { .. } => "origin",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Limit::Destination(name) | Limit::Source(name) | Limit::Restart(name) => name,
            Limit::Origin { origin, .. } => origin,
        }
    }
}

/// One step of the GCRA at `rate` per second, asked at `now` (ms) with the theoretical
/// arrival time `tat` (ms, fractional: a rate need not divide a second evenly): when the
/// next one may go (at or before `now`: at once), and the arrival time that follows if it
/// takes that slot.
pub fn gcra(tat: f64, now: u64, rate: f64) -> (f64, f64) {
    let tat = tat.max(now as f64);
    (tat - tolerance(rate), tat + interval(rate))
}

/// The time between two slots at `rate` per second, in ms.
pub fn interval(rate: f64) -> f64 {
    1000.0 / rate
}

/// How far ahead of its theoretical arrival time a slot may be taken: the burst.
pub fn tolerance(rate: f64) -> f64 {
    (rate.floor().max(1.0) - 1.0) * interval(rate)
}

/// What a slot may be early by, in ms: sums of fractional intervals are off by a
/// rounding error, which must not push a slot a whole millisecond later.
pub const ROUNDING: f64 = 1e-6;

/// The slot, in whole ms, that the GCRA allows at `allowed` (its first value) when asked
/// at `now`: `now` (go at once) or a later time.
pub fn slot(allowed: f64, now: u64) -> u64 {
    let allowed = allowed - ROUNDING;
    if allowed <= now as f64 {
        now
    } else {
        allowed.ceil() as u64
    }
}

/// The theoretical arrival times of one gateway's limits, in ms.
#[derive(Debug, Default)]
pub struct Slots {
    tat: HashMap<(&'static str, String), f64>,
}

impl Slots {
    /// `Store::take_slot` in memory: the slot of `limit` asked at `now` under `rate` a
    /// second — `now`, taken; or a later time, taken only within the limit's horizon.
    pub fn take(&mut self, limit: Limit, now: u64, rate: f64) -> u64 {
        let key = (limit.kind(), limit.name().to_string());
        let tat = self.tat.get(&key).copied().unwrap_or(0.0);
        let (allowed, next) = gcra(tat, now, rate);
        let slot = slot(allowed, now);
        if slot <= now.saturating_add(limit.horizon()) {
            self.tat.insert(key, next);
        }
        slot
    }

    /// Starts a limit afresh (a destination's restart: its deliveries are paced anew).
    pub fn forget(&mut self, limit: Limit) {
        self.tat.remove(&(limit.kind(), limit.name().to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Limit = Limit::Destination("d");

    fn slots(s: &mut Slots, n: usize, now: u64, rate: f64) -> Vec<u64> {
        (0..n).map(|_| s.take(D, now, rate)).collect()
    }

    #[test]
    fn a_second_of_burst_then_one_per_interval() {
        let mut s = Slots::default();
        let got = slots(&mut s, 8, 1_000, 5.0);
        assert_eq!(&got[..5], &[1_000; 5]);
        assert_eq!(&got[5..], &[1_200, 1_400, 1_600]);
        // Another destination, or a source of the same name, has a limit of its own.
        assert_eq!(s.take(Limit::Destination("other"), 1_000, 5.0), 1_000);
        assert_eq!(s.take(Limit::Source("d"), 1_000, 5.0), 1_000);
    }

    #[test]
    fn a_rate_below_one_per_second_has_no_burst() {
        let mut s = Slots::default();
        assert_eq!(slots(&mut s, 3, 10_000, 0.5), [10_000, 12_000, 14_000]);
    }

    #[test]
    fn a_rate_that_does_not_divide_a_second_keeps_its_fractions() {
        let mut s = Slots::default();
        // Three a second: a burst of three, then 333.3 ms apart (ceiled to whole ms).
        assert_eq!(
            slots(&mut s, 6, 0, 3.0),
            [0, 0, 0, 334, 667, 1_000],
            "no drift from rounding each slot"
        );
    }

    #[test]
    fn idle_time_refills_the_burst_and_forgetting_starts_afresh() {
        let mut s = Slots::default();
        assert_eq!(slots(&mut s, 3, 0, 1.0), [0, 1_000, 2_000]);
        assert_eq!(s.take(D, 1_000, 1.0), 3_000);
        // Long after, the limit starts afresh.
        assert_eq!(s.take(D, 60_000, 1.0), 60_000);
        assert_eq!(s.take(D, 60_000, 1.0), 61_000);
        s.forget(D);
        assert_eq!(s.take(D, 60_000, 1.0), 60_000);
    }

    #[test]
    fn a_request_takes_a_slot_within_its_time_left_only() {
        let mut s = Slots::default();
        let asked = |within| Limit::Origin {
            origin: "https://crm.example.com:443",
            within,
        };
        // 2 a second: a burst of 2, then one each 500 ms.
        assert_eq!(s.take(asked(0), 1_000, 2.0), 1_000);
        assert_eq!(s.take(asked(0), 1_000, 2.0), 1_000);
        // The next slot is at 1,500: taken by a call with 600 ms left, not by one with 400.
        assert_eq!(s.take(asked(400), 1_000, 2.0), 1_500);
        assert_eq!(s.take(asked(600), 1_000, 2.0), 1_500, "kept for it");
        assert_eq!(
            s.take(asked(600), 1_000, 2.0),
            2_000,
            "not taken: past its time"
        );
        assert_eq!(s.take(asked(1_000), 1_000, 2.0), 2_000, "still free, taken");
        // However many give up, the limit lets its rate through: 2 a second.
        for _ in 0..100 {
            assert_eq!(s.take(asked(100), 1_000, 2.0), 2_500);
        }
        assert_eq!(s.take(asked(100), 2_500, 2.0), 2_500);
    }

    #[test]
    fn a_source_refused_takes_no_slot() {
        let mut s = Slots::default();
        let source = Limit::Source("s");
        // 4 a second: a burst of 4 at once, then one each 250 ms.
        for _ in 0..4 {
            assert_eq!(s.take(source, 10_000, 4.0), 10_000);
        }
        assert_eq!(s.take(source, 10_000, 4.0), 10_250);
        // A refused request takes no slot: the next is still at 10,250, not 10,500.
        assert_eq!(s.take(source, 10_100, 4.0), 10_250);
        assert_eq!(s.take(source, 10_250, 4.0), 10_250, "admitted");
        assert_eq!(s.take(source, 10_250, 4.0), 10_500);
        // A slow rate waits its whole interval.
        let other = Limit::Source("other");
        assert_eq!(s.take(other, 10_250, 0.5), 10_250);
        assert_eq!(s.take(other, 10_250, 0.5), 12_250);
        // Idle for a while, the burst is back (and no more than it).
        for _ in 0..4 {
            assert_eq!(s.take(source, 60_000, 4.0), 60_000);
        }
        assert!(s.take(source, 60_000, 4.0) > 60_000);
    }
}
