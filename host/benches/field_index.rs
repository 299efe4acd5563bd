//! What `store.indexed_fields` buys and costs, on SQLite and (when PostgreSQL is installed)
//! on PostgreSQL: among EVENTS events of 1,000 SIMs, the event list by one SIM's
//! `iccid` (`?field=iccid&equals=…`, a page of 50) without an index and with one; how long
//! building the index over those events takes; and the insert rate (the ingest commit)
//! with and without an indexed field, in alternating rounds on two stores.
//!
//! Run with: `cargo bench -p switchyard --bench field_index [-- EVENTS]` (default 200000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::event::{Body, Event};
use switchyard::store::{EventFilter, FieldMatch, PgStore, SqliteStore, Store};

const SIMS: usize = 1_000;
const IN_FLIGHT: usize = 64;

fn iccid(sim: usize) -> String {
    format!("89457387300000{sim:05}")
}

/// An Onomondo-like usage event of SIM `n % SIMS`, at time `n`.
fn event(n: usize) -> Event {
    let body = format!(
        r#"{{"type":"usage","id":"d08592fd","time":"2020-04-23T11:39:01.000Z","sim_id":"{n:09}","iccid":"{}","bytes":9484,"network":{{"name":"TDC A/S","country":"Denmark"}}}}"#,
        iccid(n % SIMS)
    );
    Event {
        id: format!("{n:012}"),
        source: "bench".into(),
        received_at: 1_000_000 + n as u64,
        method: "POST".into(),
        path: "/v1/ingest/bench".into(),
        query: String::new(),
        headers: vec![("content-type".into(), "application/json".into())],
        content_type: Some("application/json".into()),
        body: Body(body.into_bytes().into()),
        metadata: Vec::new(),
        run: 0,
    }
}

/// Inserts events `from..to`, `IN_FLIGHT` at a time; events per second.
async fn insert(store: &Arc<dyn Store>, from: usize, to: usize) -> f64 {
    let started = Instant::now();
    let mut n = from;
    while n < to {
        let batch = (n..(n + IN_FLIGHT).min(to)).map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.insert_event(event(i), None).await.unwrap() })
        });
        futures_util::future::join_all(batch).await;
        n += IN_FLIGHT;
    }
    (to - from) as f64 / started.elapsed().as_secs_f64()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The median time of `runs` lists of one SIM's events (first page), in ms, and how many
/// the page held; `rare`: of a SIM no event has, which a list without the index reads
/// every event to find out.
async fn list(store: &Arc<dyn Store>, runs: usize, rare: bool) -> (f64, usize) {
    let mut times = Vec::new();
    let mut found = 0;
    for run in 0..runs {
        let sim = if rare { SIMS + run } else { run * 37 % SIMS };
        let filter = EventFilter {
            field: Some(FieldMatch::parse("iccid", iccid(sim)).unwrap()),
            ..Default::default()
        };
        let started = Instant::now();
        found = store.list_events(filter, None, 50).await.unwrap().len();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    (median(times), found)
}

async fn bench(name: &str, open: impl AsyncFn() -> Arc<dyn Store>, events: usize) {
    let store = open().await;
    let rate = insert(&store, 0, events).await;
    println!("{name}: {events} events of {SIMS} SIMs stored ({rate:.0}/s)");
    let (ms, found) = list(&store, 5, false).await;
    println!(
        "{name}: one SIM's events by iccid, not indexed: {ms:.1} ms a page ({found} found; median of 5)"
    );
    let (ms, _) = list(&store, 3, true).await;
    println!("{name}: a SIM no event has, not indexed: {ms:.0} ms (median of 3)");
    let started = Instant::now();
    store
        .index_fields(vec![vec!["iccid".into()]])
        .await
        .unwrap();
    println!(
        "{name}: the index on iccid built in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let (ms, found) = list(&store, 51, false).await;
    println!(
        "{name}: one SIM's events by iccid, indexed: {ms:.2} ms a page ({found} found; median of 51)"
    );
    let (ms, _) = list(&store, 51, true).await;
    println!("{name}: a SIM no event has, indexed: {ms:.2} ms (median of 51)");

    // The ingest commit with and without the index: two fresh stores, alternating rounds.
    let plain = open().await;
    let indexed = open().await;
    indexed
        .index_fields(vec![vec!["iccid".into()]])
        .await
        .unwrap();
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let round = 10_000;
    for r in 0..6 {
        let (from, to) = (r * round, (r + 1) * round);
        without.push(insert(&plain, from, to).await);
        with.push(insert(&indexed, from, to).await);
    }
    let (without, with) = (median(without), median(with));
    println!(
        "{name}: inserts without an indexed field {without:.0}/s, with one {with:.0}/s \
         ({:+.1}%; medians of 6 rounds of {round})",
        (with / without - 1.0) * 100.0
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let events: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let budget = Duration::from_secs(600);

    let dirs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sqlite = async || {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), 1_000_000).unwrap();
        dirs.lock().unwrap().push(dir);
        Arc::new(store.with_list_budget(budget)) as Arc<dyn Store>
    };
    bench("sqlite", sqlite, events).await;

    let Some(server) = xtask::pg::PgServer::start() else {
        println!("postgres: not installed, skipped");
        return;
    };
    let databases = std::sync::atomic::AtomicUsize::new(0);
    let postgres = async || {
        let n = databases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url = server.database(&format!("field_index_{n}"));
        let store = PgStore::open(&url, 1_000_000, Duration::from_secs(30))
            .await
            .unwrap();
        Arc::new(store.with_list_budget(budget)) as Arc<dyn Store>
    };
    bench("postgres", postgres, events).await;
}
