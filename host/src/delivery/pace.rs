//! A destination's rate limit (`rate_limit`, deliveries per second): when each delivery
//! may be sent.
//!
//! The limit is kept with the generic cell rate algorithm (GCRA, "virtual scheduling"): a
//! destination may take a burst of up to one second's worth of deliveries at once, then one
//! every `1 / rate_limit` seconds. A delivery over the limit is given the next free slot,
//! which is kept for it: the dispatcher puts it off in the store until then, and when it is
//! claimed again it is sent without being counted a second time. Slots are this gateway's
//! own; several instances on one store each keep their own.

use std::collections::HashMap;

/// Slots given more than this long ago are forgotten (their delivery was sent elsewhere,
/// retried by hand or removed).
const FORGET_AFTER_MS: u64 = 3_600_000;

/// One step of the GCRA at `rate` per second, asked at `now` (ms) with the theoretical
/// arrival time `tat` (ms, fractional: a rate need not divide a second evenly): when the
/// next one may go (at or before `now`: at once), and the arrival time that follows if it
/// takes that slot. A burst of up to one second's worth, then one every `1 / rate` s. Also
/// the ingest's per-source limit (`edge::IngestLimits`).
pub fn gcra(tat: f64, now: u64, rate: f64) -> (f64, f64) {
    let interval = 1000.0 / rate;
    let tolerance = (rate.floor().max(1.0) - 1.0) * interval;
    let tat = tat.max(now as f64);
    (tat - tolerance, tat + interval)
}

/// The slots of one destination.
#[derive(Debug, Default)]
pub struct Pacer {
    /// The theoretical arrival time of the next delivery, in ms (fractional: a rate need not
    /// divide a second evenly).
    tat: f64,
    /// Deliveries put off, by id, with their slot.
    reserved: HashMap<String, u64>,
    /// `reserved`'s length after the last time stale slots were forgotten.
    kept: usize,
}

impl Pacer {
    /// When delivery `id` may be sent, asked at `now` under `rate` deliveries per second:
    /// `now` (send it), or a later slot that is kept for it. A delivery that was given a
    /// slot is sent when it comes back, even early (a retry by hand).
    pub fn slot(&mut self, id: &str, now: u64, rate: f64) -> u64 {
        if self.reserved.remove(id).is_some() {
            return now;
        }
        let (allowed, next) = gcra(self.tat, now, rate);
        self.tat = next;
        if allowed <= now as f64 {
            return now;
        }
        let slot = allowed.ceil() as u64;
        self.reserved.insert(id.to_string(), slot);
        if self.reserved.len() > (2 * self.kept).max(1024) {
            self.reserved
                .retain(|_, s| s.saturating_add(FORGET_AFTER_MS) > now);
            self.kept = self.reserved.len();
        }
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(p: &mut Pacer, n: usize, now: u64, rate: f64) -> Vec<u64> {
        (0..n)
            .map(|i| p.slot(&format!("d{now}-{i}"), now, rate))
            .collect()
    }

    #[test]
    fn a_second_of_burst_then_one_per_interval() {
        let mut p = Pacer::default();
        let s = slots(&mut p, 8, 1_000, 5.0);
        assert_eq!(&s[..5], &[1_000; 5]);
        assert_eq!(&s[5..], &[1_200, 1_400, 1_600]);
    }

    #[test]
    fn a_rate_below_one_per_second_has_no_burst() {
        let mut p = Pacer::default();
        assert_eq!(slots(&mut p, 3, 10_000, 0.5), [10_000, 12_000, 14_000]);
    }

    #[test]
    fn a_kept_slot_is_not_counted_again_and_idle_time_refills_the_burst() {
        let mut p = Pacer::default();
        let s = slots(&mut p, 3, 0, 1.0);
        assert_eq!(s, [0, 1_000, 2_000]);
        // The second comes back at its slot: sent, and the third keeps its own slot.
        assert_eq!(p.slot("d0-1", 1_000, 1.0), 1_000);
        assert_eq!(p.slot("new", 1_000, 1.0), 3_000);
        // Long after, the limit starts afresh.
        assert_eq!(p.slot("later", 60_000, 1.0), 60_000);
    }

    #[test]
    fn stale_slots_are_forgotten() {
        let mut p = Pacer::default();
        slots(&mut p, 1_100, 0, 1.0);
        assert_eq!(p.reserved.len(), 1_099);
        // Hours later the old slots have passed (their deliveries went elsewhere).
        p.tat = 0.0;
        let now = 1_100_000 + 2 * FORGET_AFTER_MS;
        slots(&mut p, 3_000, now, 1.0);
        assert!(p.reserved.keys().all(|k| k.starts_with(&format!("d{now}"))));
    }
}
