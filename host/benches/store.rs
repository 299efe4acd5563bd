//! The store's share of one event's life, without HTTP or plugins: how many events per
//! second go through the write path the gateway uses for a route with one destination —
//! `insert_event` (the ingest commit), `complete_event` with one delivery leased to this
//! instance (the outcome commit), `record_attempt` delivered (the attempt commit) — with
//! many events in flight, as under load; and how many bytes the process wrote to disk per
//! event (`/proc/self/io`, WAL and checkpoints included). Then what reads of a large store
//! cost (the dashboard's per-minute counts and event list, and — after as many events again
//! whose deliveries wait, as in an outage — the backlog and counts per destination), and
//! retention's purge of the delivered events, and how long an ingest commit waits while it
//! runs. Last, what a claim costs when a destination's full lane and due backlog stop the
//! walk in due order, first with 5 other destinations, then with 1,000 more that are
//! FAILED and hold a delivery each, then with 1,000 more ACTIVE ones holding a retry an
//! hour away (and the next due time in that position).
//!
//! Run with: `cargo bench -p switchyard --bench store [-- EVENTS CONCURRENCY]` (defaults
//! 20000 and 64). SQLite in a temp dir on the local disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use switchyard::delivery::delivery_id;
use switchyard::event::{Body, Event};
use switchyard::store::{
    Attempt, AttemptNext, ClaimScope, Completion, DeliveryStatus, DestinationHealth,
    DestinationState, EventFilter, NewDelivery, PurgeBefore, RouteOutcome, RouteResult,
    SqliteStore, Store,
};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn event(n: usize) -> Event {
    let pad = "x".repeat(700);
    let body = format!(
        r#"{{"type":"usage","id":"d08592fd","time":"2020-04-23T11:39:01.000Z","sim_id":"{n:09}","iccid":"8945738730000000012","bytes":9484,"network":{{"name":"TDC A/S","country":"Denmark"}},"pad":"{pad}"}}"#
    );
    Event {
        id: uuid::Uuid::now_v7().to_string(),
        source: "bench".into(),
        received_at: now_ms(),
        method: "POST".into(),
        path: "/v1/ingest/bench".into(),
        query: String::new(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("user-agent".into(), "bench/1.0".into()),
            ("host".into(), "127.0.0.1:8080".into()),
        ],
        content_type: Some("application/json".into()),
        body: Body(body.into_bytes().into()),
        metadata: Vec::new(),
        run: 0,
    }
}

/// Bytes this process has caused to be written to storage so far.
fn written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes: ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A route's outcome with one delivery.
fn delivering() -> RouteOutcome {
    RouteOutcome {
        route: 0,
        name: "bench".into(),
        run: 0,
        steps: Vec::new(),
        result: RouteResult::Delivering { deliveries: 1 },
    }
}

/// One event through the three commits; its attempt ends as `next` says.
async fn one(store: &dyn Store, n: usize, next: AttemptNext) {
    let event = event(n);
    store.insert_event(event, None).await.expect("insert");
    let event = store.next_event().await.expect("queued");
    let now = now_ms();
    // The id the pipeline derives, so that the indexes on it see the gateway's key order.
    let id = delivery_id(&event.id, event.run, 0, 0, "sink");
    let delivery = NewDelivery {
        id: id.clone(),
        route: 0,
        destination: "sink".into(),
        url: "http://127.0.0.1:9/events".into(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("webhook-id".into(), id.clone()),
        ],
        // Passed through unchanged, as by most routes.
        body: event.body.0.clone(),
        status: DeliveryStatus::Pending,
        delay_ms: 0,
        lease_until: Some(now + 40_000),
    };
    let leased = store
        .complete_event(&event, vec![delivering()], vec![delivery], now)
        .await
        .expect("complete");
    assert_eq!(
        leased,
        Completion::Recorded {
            leased: vec![id.clone()]
        }
    );
    let attempt = Attempt {
        at: now,
        duration_ms: 1,
        status_code: Some(204),
        error: None,
        response: None,
    };
    store
        .record_attempt(&id, 0, attempt, next)
        .await
        .expect("attempt");
}

/// An event with one delivery to `destination`, pending, not leased, due `at`.
async fn waiting(store: &dyn Store, n: usize, destination: &str, at: u64) {
    store.insert_event(event(n), None).await.expect("insert");
    let event = store.next_event().await.expect("queued");
    let delivery = NewDelivery {
        id: delivery_id(&event.id, event.run, 0, 0, destination),
        route: 0,
        destination: destination.into(),
        url: "http://127.0.0.1:9/events".into(),
        headers: Vec::new(),
        body: event.body.0.clone(),
        status: DeliveryStatus::Pending,
        delay_ms: 0,
        lease_until: None,
    };
    store
        .complete_event(&event, vec![delivering()], vec![delivery], at)
        .await
        .expect("complete");
}

/// The median of 50 claims of 64 that find nothing they may take: `slow`'s lane is full
/// (no room) and its due backlog stops the walk in due order, so each goes destination
/// by destination.
async fn blocked_claim(store: &dyn Store) -> Duration {
    let scope = ClaimScope {
        room: [("slow".to_string(), 0)].into(),
        ..ClaimScope::default()
    };
    let mut took = Vec::new();
    for _ in 0..50 {
        let now = now_ms();
        let started = Instant::now();
        let claimed = store.claim_due(now, now + 40_000, 64, &scope).await;
        took.push(started.elapsed());
        assert!(claimed.expect("claim").is_empty());
    }
    took.sort();
    took[took.len() / 2]
}

/// The median of 50 `next_due_at`s in the same position as [`blocked_claim`]'s claims.
async fn blocked_next_due(store: &dyn Store) -> Duration {
    let scope = ClaimScope {
        room: [("slow".to_string(), 0)].into(),
        ..ClaimScope::default()
    };
    let mut took = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let next = store.next_due_at(now_ms(), &scope).await;
        took.push(started.elapsed());
        assert!(next.expect("next due").is_some());
    }
    took.sort();
    took[took.len() / 2]
}

async fn run(
    store: Arc<dyn Store>,
    events: usize,
    concurrency: usize,
    then: AttemptNext,
) -> (f64, u64) {
    let next = Arc::new(AtomicUsize::new(0));
    let before = written();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (store, next) = (store.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= events {
                    break;
                }
                one(store.as_ref(), n, then).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = events as f64 / started.elapsed().as_secs_f64();
    (rate, (written() - before) / events as u64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let events: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let concurrency: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);

    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path(), 1_000_000)?);
    run(store.clone(), 1_000, concurrency, AttemptNext::Delivered).await;
    let (rate, bytes) = run(store.clone(), events, concurrency, AttemptNext::Delivered).await;
    println!(
        "sqlite: {rate:.0} events/s through insert → complete (1 delivery) → attempt, \
         {concurrency} in flight, {events} events; {:.1} KiB written to disk per event",
        bytes as f64 / 1024.0
    );

    // The dashboard's chart asks for the last hour's per-minute counts every 2 s.
    let started = Instant::now();
    let minutes = store.minute_stats(now_ms() - 3_600_000).await?;
    println!(
        "sqlite: per-minute stats of the last hour ({} events in it) in {:.1} ms",
        minutes.iter().map(|m| m.received).sum::<u64>(),
        started.elapsed().as_secs_f64() * 1000.0
    );

    // The event list filtered on a type that no event has, as the dashboard asks it.
    let started = Instant::now();
    let filter = EventFilter {
        event_type: Some("no-such-type".into()),
        ..Default::default()
    };
    let found = store.list_events(filter, None, 101).await?;
    println!(
        "sqlite: the event list filtered on a type no event has: {} found in {:.1} ms",
        found.len(),
        started.elapsed().as_secs_f64() * 1000.0
    );

    // An outage: as many events again, each delivery waiting for a retry an hour away.
    // What `/metrics` and the destination views (polled by the dashboard) read of them.
    let retry = AttemptNext::RetryAt(now_ms() + 3_600_000);
    run(store.clone(), events, concurrency, retry).await;
    let started = Instant::now();
    let (pending, _) = store.backlog().await?;
    let backlog = started.elapsed();
    let started = Instant::now();
    store.delivery_counts().await?;
    println!(
        "sqlite: with {pending} deliveries pending, the backlog (/metrics) in {:.1} ms, \
         the counts per destination in {:.1} ms",
        backlog.as_secs_f64() * 1000.0,
        started.elapsed().as_secs_f64() * 1000.0
    );

    // ... and on a source that no event has (a rare one, such as the notify source's).
    let started = Instant::now();
    let filter = EventFilter {
        source: Some("ops".into()),
        ..Default::default()
    };
    let found = store.list_events(filter, None, 101).await?;
    println!(
        "sqlite: the event list filtered on a source no event has: {} found in {:.1} ms",
        found.len(),
        started.elapsed().as_secs_f64() * 1000.0
    );

    // Retention: everything above was delivered or waits; purge it while events keep arriving, and
    // see how long an ingest commit (what a sender waits for) waits meanwhile.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ingest = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut slowest, mut n) = (Duration::ZERO, 0);
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                store.insert_event(event(n), None).await.expect("insert");
                slowest = slowest.max(started.elapsed());
                n += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (slowest, n)
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    // As the gateway's retention does it: a batch per transaction, from a cursor.
    let batch: usize = std::env::var("PURGE_BATCH")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(500);
    let (before, mut purged, mut after) = (now_ms() + 1, 0, None);
    loop {
        let (n, next) = store
            .purge_events(PurgeBefore::delivered(before), after, batch)
            .await?;
        (purged, after) = (purged + n, next);
        if after.is_none() {
            break;
        }
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    let (slowest, inserted) = ingest.await?;
    println!(
        "sqlite: purged {purged} delivered events, {batch} a transaction, in {:.0} ms; \
         meanwhile {inserted} ingest commits, the slowest {:.1} ms",
        took.as_secs_f64() * 1000.0,
        slowest.as_secs_f64() * 1000.0
    );

    // A slow destination's full lane and due backlog in the way of claims; 5 other
    // destinations with a retry an hour away; then 1,000 FAILED ones holding one each.
    let (now, later) = (now_ms(), now_ms() + 3_600_000);
    for n in 0..2_000 {
        waiting(store.as_ref(), n, "slow", now).await;
    }
    for n in 0..5 {
        waiting(store.as_ref(), n, &format!("ok{n}"), later).await;
    }
    let few = blocked_claim(store.as_ref()).await;
    for n in 0..1_000 {
        let name = format!("failed{n:04}");
        waiting(store.as_ref(), n, &name, now).await;
        let state = DestinationState {
            name,
            state: DestinationHealth::Failed,
            consecutive_failures: 5,
            last_error: None,
            epoch: 0,
            since: 0,
        };
        store.record_destination_state(&state).await?;
    }
    let many = blocked_claim(store.as_ref()).await;
    println!(
        "sqlite: a claim past a full lane's due backlog (2,000), median of 50: {:.3} ms with \
         5 other destinations, {:.3} ms with 1,000 FAILED ones holding a delivery each too",
        few.as_secs_f64() * 1000.0,
        many.as_secs_f64() * 1000.0
    );
    // And 1,000 ACTIVE destinations each holding a retry an hour away (an outage of many
    // endpoints, over): nothing of theirs is due, yet each is a destination with
    // deliveries due some time.
    for n in 0..1_000 {
        waiting(store.as_ref(), n, &format!("later{n:04}"), later).await;
    }
    let active = blocked_claim(store.as_ref()).await;
    let next = blocked_next_due(store.as_ref()).await;
    println!(
        "sqlite: ... and with 1,000 ACTIVE ones holding a retry an hour away too: a claim \
         {:.3} ms, the next due time {:.3} ms (medians of 50)",
        active.as_secs_f64() * 1000.0,
        next.as_secs_f64() * 1000.0
    );
    store.close();
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
