//! What a `rate_limit` costs each delivery to a limited destination (or event to a limited
//! source): `Store::take_slot`, on SQLite (in memory) and on PostgreSQL (an update of one
//! row of an unlogged table that every instance shares), one call at a time (the latency an attempt waits) and with 64 in flight from two
//! stores on one database (what the shared row allows, all to one destination, as
//! `delivery.concurrency` attempts would). Medians of five rounds.
//!
//! Run with: `cargo bench -p switchyard --bench take_slot [-- CALLS]` (default 20000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use switchyard::store::{Limit, PgStore, SqliteStore, Store};

const IN_FLIGHT: usize = 64;
const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// µs per call, one at a time.
async fn one_at_a_time(store: &dyn Store, calls: usize) -> f64 {
    let start = Instant::now();
    for n in 0..calls {
        store
            .take_slot(Limit::Destination("d"), n as u64, 1e6)
            .await
            .unwrap();
    }
    start.elapsed().as_secs_f64() * 1e6 / calls as f64
}

/// Calls a second, `IN_FLIGHT` at once, spread over `stores`.
async fn many_at_once(stores: &[Arc<dyn Store>], calls: usize) -> f64 {
    let start = Instant::now();
    futures_util::stream::iter(0..calls)
        .map(|n| {
            let store = stores[n % stores.len()].clone();
            async move {
                store
                    .take_slot(Limit::Destination("d"), n as u64, 1e6)
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|_| async {})
        .await;
    calls as f64 / start.elapsed().as_secs_f64()
}

async fn bench(name: &str, stores: Vec<Arc<dyn Store>>, calls: usize) {
    let (mut latency, mut rate) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        latency.push(one_at_a_time(&*stores[0], calls / 4).await);
        rate.push(many_at_once(&stores, calls).await);
    }
    println!(
        "{name}: one at a time {:.1} µs a slot (rounds {:.1?}); {IN_FLIGHT} in flight over {} store(s) {:.0} slots/s (rounds {:.0?})",
        median(latency.clone()),
        latency,
        stores.len(),
        median(rate.clone()),
        rate
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let calls: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap();
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path(), 100).unwrap());
    bench("sqlite", vec![sqlite], calls).await;

    let Some(server) = xtask::pg::PgServer::start() else {
        println!("postgres: not installed, skipped");
        return;
    };
    let url = server.database("take_slot");
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..2 {
        let store = PgStore::open(&url, 100, Duration::from_secs(30))
            .await
            .unwrap();
        stores.push(Arc::new(store));
    }
    bench("postgres", stores, calls).await;
}
