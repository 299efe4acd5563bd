//! A destination's rate limit (`rate_limit`, deliveries per second): when each delivery
//! may be sent.
//!
//! The limit is kept with the generic cell rate algorithm (GCRA, "virtual scheduling"): a
//! destination may take a burst of up to one second's worth of deliveries at once, then one
//! every `1 / rate_limit` seconds. A delivery over the limit is given the next free slot:
//! the dispatcher puts it off in the store until then, marked as paced, and when it is
//! claimed again it is sent without being counted a second time.
//!
//! A destination's theoretical arrival time is the store's (`Store::take_slot`), so that
//! instances sharing a store share the limit: PostgreSQL keeps it in a table every instance
//! updates, SQLite (one gateway's store) in memory, in [`Slots`].

use std::collections::HashMap;

/// One step of the GCRA at `rate` per second, asked at `now` (ms) with the theoretical
/// arrival time `tat` (ms, fractional: a rate need not divide a second evenly): when the
/// next one may go (at or before `now`: at once), and the arrival time that follows if it
/// takes that slot. A burst of up to one second's worth, then one every `1 / rate` s. Also
/// the ingest's per-source limit (`edge::IngestLimits`).
pub fn gcra(tat: f64, now: u64, rate: f64) -> (f64, f64) {
    let next = tat.max(now as f64) + interval(rate);
    (allowed(next, rate), next)
}

/// The time between two deliveries at `rate` per second, in ms.
pub fn interval(rate: f64) -> f64 {
    1000.0 / rate
}

/// When the delivery whose step moved the theoretical arrival time to `next` may go: its
/// arrival time less the burst's allowance.
fn allowed(next: f64, rate: f64) -> f64 {
    let interval = interval(rate);
    let tolerance = (rate.floor().max(1.0) - 1.0) * interval;
    next - interval - tolerance
}

/// The slot, in whole ms, of the delivery whose step at `now` moved the theoretical
/// arrival time to `next`: `now` (send it) or a later time to put it off until.
pub fn slot(next: f64, now: u64, rate: f64) -> u64 {
    // Less a nanosecond: sums of fractional intervals are off by a rounding error, which
    // must not push a slot a whole millisecond later.
    let allowed = allowed(next, rate) - 1e-6;
    if allowed <= now as f64 {
        now
    } else {
        allowed.ceil() as u64
    }
}

/// The theoretical arrival times of the destinations of one gateway's store, in ms.
#[derive(Debug, Default)]
pub struct Slots {
    tat: HashMap<String, f64>,
}

impl Slots {
    /// The slot of a delivery to `destination` asked at `now` under `rate` a second,
    /// taken: `now` or a later time.
    pub fn take(&mut self, destination: &str, now: u64, rate: f64) -> u64 {
        let tat = self.tat.get(destination).copied().unwrap_or(0.0);
        let (_, next) = gcra(tat, now, rate);
        self.tat.insert(destination.to_string(), next);
        slot(next, now, rate)
    }

    /// Starts `destination`'s limit afresh (a restart: its deliveries are paced anew).
    pub fn forget(&mut self, destination: &str) {
        self.tat.remove(destination);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(s: &mut Slots, n: usize, now: u64, rate: f64) -> Vec<u64> {
        (0..n).map(|_| s.take("d", now, rate)).collect()
    }

    #[test]
    fn a_second_of_burst_then_one_per_interval() {
        let mut s = Slots::default();
        let got = slots(&mut s, 8, 1_000, 5.0);
        assert_eq!(&got[..5], &[1_000; 5]);
        assert_eq!(&got[5..], &[1_200, 1_400, 1_600]);
        // Another destination has a limit of its own.
        assert_eq!(s.take("other", 1_000, 5.0), 1_000);
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
        assert_eq!(s.take("d", 1_000, 1.0), 3_000);
        // Long after, the limit starts afresh.
        assert_eq!(s.take("d", 60_000, 1.0), 60_000);
        assert_eq!(s.take("d", 60_000, 1.0), 61_000);
        s.forget("d");
        assert_eq!(s.take("d", 60_000, 1.0), 60_000);
    }
}
