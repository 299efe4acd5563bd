//! `GET /v1/stats`: events received and attempts per minute, for the dashboard's chart,
//! which asks for the last hour every 2 s while it is open. Counting an hour of events and
//! attempts each time costs in proportion to the traffic (~60–90 ms per 100,000 events on
//! SQLite here), so the counts of minutes that are over are kept in a [`MinuteCache`] and
//! the store is asked only for the minutes since.

use std::sync::Arc;

use std::collections::BTreeMap;
use std::sync::Mutex;

use axum::Json;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, AppState, ErrorBody};
use crate::store::{MinuteStats, Store, StoreError};

const MINUTE: u64 = 60_000;
/// The longest window asked for, in minutes; the cache keeps no more.
const MAX_MINUTES: u64 = 1440;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct StatsQuery {
    /// How many minutes back, up to now: 1 to 1440, 60 by default.
    #[param(minimum = 1, maximum = 1440)]
    minutes: Option<u64>,
}

/// Per-minute counts, oldest first.
#[derive(Serialize, ToSchema)]
pub(super) struct Stats {
    /// One entry per minute of the window, zeros included.
    minutes: Vec<MinuteStats>,
}

/// Events received, attempts delivered and attempts failed per minute over the last
/// `minutes` minutes (for charts).
#[utoipa::path(get, path = "/v1/stats", tag = "events",
    params(StatsQuery),
    responses(
        (status = 200, description = "Per-minute counts", body = Stats),
        (status = 400, description = "A malformed parameter, named", body = ErrorBody),
    ))]
pub(super) async fn stats(
    State(state): State<Arc<AppState>>,
    query: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Stats>, ApiError> {
    let Query(q) = query?;
    let minutes = match q.minutes {
        None => 60,
        Some(n @ 1..=MAX_MINUTES) => n,
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "`minutes`: {n} is not between 1 and {MAX_MINUTES}"
            )));
        }
    };
    let now = state.dispatcher.now_ms();
    let since = now / MINUTE * MINUTE - (minutes - 1) * MINUTE;
    let found = state.minutes.get(state.store.as_ref(), since, now).await?;
    let minutes = (0..minutes)
        .map(|i| {
            let minute = since + i * MINUTE;
            found.get(&minute).cloned().unwrap_or(MinuteStats {
                minute,
                received: 0,
                delivered: 0,
                failed: 0,
            })
        })
        .collect();
    Ok(Json(Stats { minutes }))
}

/// The counts of minutes that are over. A minute is over two minutes after it began:
/// by then the events received in it are committed and its attempts recorded (an attempt
/// is stamped when it starts and stored when it ends, within the delivery timeout's
/// order of magnitude). The current and the previous minute are always counted afresh.
/// Counts do not shrink when retention purges the events they counted.
#[derive(Default)]
pub struct MinuteCache(Mutex<Cached>);

#[derive(Default)]
struct Cached {
    /// Every minute in `[from, through)` is over and counted; those absent had nothing.
    from: u64,
    through: u64,
    minutes: BTreeMap<u64, MinuteStats>,
}

impl MinuteCache {
    /// The counts of the minutes from `since` (a minute's start) to `now`, by minute (those
    /// with nothing absent).
    pub async fn get(
        &self,
        store: &dyn Store,
        since: u64,
        now: u64,
    ) -> Result<BTreeMap<u64, MinuteStats>, StoreError> {
        // Minutes before this one are over.
        let over_before = (now / MINUTE).saturating_sub(1) * MINUTE;
        let (afresh, ask_from, mut counts) = {
            let cached = self.lock();
            if cached.from < cached.through && (cached.from..=cached.through).contains(&since) {
                let known = cached.minutes.range(since..cached.through);
                let known = known.map(|(m, s)| (*m, s.clone())).collect();
                (false, cached.through, known)
            } else {
                (true, since, BTreeMap::new())
            }
        };
        let fresh = store.minute_stats(ask_from).await?;
        let mut cached = self.lock();
        if afresh {
            // Counted afresh from `since`: what is over replaces the cache.
            cached.from = since;
            cached.through = since;
            cached.minutes.clear();
        }
        // (Unless another call moved the cache on meanwhile.)
        if cached.through == ask_from {
            for m in fresh.iter().filter(|m| m.minute < over_before) {
                cached.minutes.insert(m.minute, m.clone());
            }
            cached.through = over_before.max(cached.from);
        }
        // Keep no more than the longest window.
        let oldest = (now / MINUTE).saturating_sub(MAX_MINUTES) * MINUTE;
        if cached.from < oldest {
            cached.minutes = cached.minutes.split_off(&oldest);
            cached.from = oldest;
        }
        counts.extend(fresh.into_iter().map(|m| (m.minute, m)));
        Ok(counts)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::event::{Body, Event};
    use crate::store::SqliteStore;

    fn event(n: u64, at: u64) -> Event {
        Event {
            id: format!("e{n}"),
            source: "s".into(),
            received_at: at,
            method: "POST".into(),
            path: "/v1/ingest/s".into(),
            query: String::new(),
            headers: vec![],
            content_type: None,
            body: Body(Bytes::from_static(b"{}")),
            metadata: vec![],
            run: 0,
        }
    }

    /// Minutes that are over are counted once and then come from the cache; the current
    /// and the previous minute are counted at every call; a window reaching further back
    /// than the cache counts afresh.
    #[tokio::test]
    async fn minutes_that_are_over_are_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path(), 100).unwrap());
        let t0 = 1_000 * MINUTE;
        let received = |counts: &BTreeMap<u64, MinuteStats>, m: u64| {
            counts.get(&(t0 + m * MINUTE)).map_or(0, |s| s.received)
        };
        let mut n = 0;
        let mut add = |minute: u64| {
            n += 1;
            let (store, e) = (store.clone(), event(n, t0 + minute * MINUTE + 5));
            async move { store.insert_event(e, None).await.unwrap() }
        };
        add(0).await;
        add(2).await;
        add(4).await;
        let cache = MinuteCache::default();
        let now = t0 + 4 * MINUTE + 30_000;
        let counts = cache.get(store.as_ref(), t0, now).await.unwrap();
        assert_eq!(
            (0..5).map(|m| received(&counts, m)).collect::<Vec<_>>(),
            [1, 0, 1, 0, 1]
        );

        // Late arrivals: in a minute that is over (not seen: it was counted), and in the
        // previous and the current minute (seen).
        add(1).await;
        add(3).await;
        add(4).await;
        let counts = cache.get(store.as_ref(), t0, now).await.unwrap();
        assert_eq!(
            (0..5).map(|m| received(&counts, m)).collect::<Vec<_>>(),
            [1, 0, 1, 1, 2]
        );

        // Time moves on: minute 3 is over now, counted with its late arrival.
        let later = t0 + 6 * MINUTE;
        add(6).await;
        let counts = cache.get(store.as_ref(), t0, later).await.unwrap();
        assert_eq!(
            (0..7).map(|m| received(&counts, m)).collect::<Vec<_>>(),
            [1, 0, 1, 1, 2, 0, 1]
        );
        // A window from before the cache's first minute counts everything afresh.
        add(0).await;
        let counts = cache.get(store.as_ref(), t0 - MINUTE, later).await.unwrap();
        assert_eq!(
            (0..7).map(|m| received(&counts, m)).collect::<Vec<_>>(),
            [2, 1, 1, 1, 2, 0, 1]
        );
    }
}
