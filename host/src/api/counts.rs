//! The pending and failed deliveries per destination that the destination views show.
//! Counting them costs in proportion to what waits — ~190 ms for 380,000 pending
//! deliveries on SQLite here, during an outage, which is when the dashboard is open and
//! polling — so a count that took long is reused for a while, and callers that arrive
//! while one is being made wait for it instead of making their own.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{DeliveryCounts, StoreError};

/// A count that took less than this is not reused: small stores answer exactly (also on a
/// loaded machine, where a small count may take tens of ms). ~100,000 waiting take longer.
const REUSE_FROM: Duration = Duration::from_millis(50);
/// A count is reused for this many times as long as it took, which bounds the share of a
/// core spent counting, however many dashboards poll, to about 1 / (1 + REUSE_FACTOR).
const REUSE_FACTOR: u32 = 10;

#[derive(Default)]
pub struct CountsCache {
    last: Mutex<Option<Counted>>,
    /// Held while a count is being made.
    counting: tokio::sync::Mutex<()>,
}

struct Counted {
    started: Instant,
    took: Duration,
    counts: Arc<Vec<DeliveryCounts>>,
}

impl CountsCache {
    /// The counts, from `count` or from a recent enough earlier call.
    pub async fn get<F, Fut>(&self, count: F) -> Result<Arc<Vec<DeliveryCounts>>, StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<DeliveryCounts>, StoreError>>,
    {
        let asked = Instant::now();
        if let Some(counts) = self.usable(asked) {
            return Ok(counts);
        }
        let _turn = self.counting.lock().await;
        // Made while this caller waited for its turn: as fresh as one of its own.
        if let Some(counts) = self.usable(asked) {
            return Ok(counts);
        }
        let started = Instant::now();
        let counts = Arc::new(count().await?);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Counted {
            started,
            took: started.elapsed(),
            counts: counts.clone(),
        });
        Ok(counts)
    }

    fn usable(&self, asked: Instant) -> Option<Arc<Vec<DeliveryCounts>>> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let c = last.as_ref()?;
        let reuse_for = if c.took < REUSE_FROM {
            Duration::ZERO
        } else {
            c.took * REUSE_FACTOR
        };
        let fresh = c.started >= asked || asked <= c.started + c.took + reuse_for;
        fresh.then(|| c.counts.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counts(pending: u64) -> Vec<DeliveryCounts> {
        vec![DeliveryCounts {
            destination: "d".into(),
            pending,
            failed: 0,
        }]
    }

    #[tokio::test]
    async fn a_quick_count_is_made_anew_each_time() {
        let cache = CountsCache::default();
        for n in 0..3 {
            let got = cache.get(|| async move { Ok(counts(n)) }).await.unwrap();
            assert_eq!(got[0].pending, n);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_count_is_reused_and_shared() {
        let cache = Arc::new(CountsCache::default());
        let made = Arc::new(AtomicUsize::new(0));
        let slow = |n: u64| {
            let made = made.clone();
            move || async move {
                made.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(counts(n))
            }
        };
        // Three callers at once: one count, shared.
        let (a, b, c) = tokio::join!(cache.get(slow(1)), cache.get(slow(2)), cache.get(slow(3)));
        assert_eq!(made.load(Ordering::SeqCst), 1);
        for got in [a, b, c] {
            assert_eq!(got.unwrap()[0].pending, 1);
        }
        // Reused for ten times as long as it took...
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(cache.get(slow(4)).await.unwrap()[0].pending, 1);
        // ...and made anew after that.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(cache.get(slow(5)).await.unwrap()[0].pending, 5);
        assert_eq!(made.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_count_is_not_kept() {
        let cache = CountsCache::default();
        let failed = cache
            .get(|| async { Err(StoreError::Db("down".into())) })
            .await;
        assert!(failed.is_err());
        let got = cache.get(|| async { Ok(counts(7)) }).await.unwrap();
        assert_eq!(got[0].pending, 7);
    }
}
