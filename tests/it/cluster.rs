//! Scale-out: three real `switchyard` binaries on one PostgreSQL database, events sent
//! through all three, one SIGKILLed mid-stream. Every accepted event reaches the receiver
//! at least once, and no delivery is ever attempted by two instances at once (the receiver
//! holds each request a moment and watches for a second request with the same
//! `webhook-id` while the first is still open).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use crate::util::{Receiver, TestGateway, start_binary};
use xtask::pg::PgServer;

const EVENTS: usize = 10_000;
const KILL_AFTER: usize = 3_000;
const SENDERS: usize = 16;

#[derive(Default)]
struct Seen {
    /// webhook-id → requests with it open right now.
    open: Mutex<HashMap<String, usize>>,
    /// Requests that arrived while another with the same webhook-id was open.
    overlaps: AtomicUsize,
    /// event id → webhook-ids it arrived under, and how many times.
    arrivals: Mutex<HashMap<String, (HashSet<String>, usize)>>,
}

async fn receive(State(seen): State<Arc<Seen>>, headers: HeaderMap) -> StatusCode {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (webhook_id, event_id) = (header("webhook-id"), header("switchyard-event-id"));
    let _open = Open::new(seen.clone(), webhook_id.clone());
    // Long enough for a concurrent second attempt of the same delivery to overlap.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let mut arrivals = seen.arrivals.lock().unwrap();
    let entry = arrivals.entry(event_id).or_default();
    entry.0.insert(webhook_id);
    entry.1 += 1;
    StatusCode::OK
}

/// A request open at the receiver, until it is answered or its connection is gone (the
/// SIGKILLed instance's requests end with their connections: the handler is dropped).
struct Open {
    seen: Arc<Seen>,
    webhook_id: String,
}

impl Open {
    fn new(seen: Arc<Seen>, webhook_id: String) -> Self {
        let mut open = seen.open.lock().unwrap();
        let n = open.entry(webhook_id.clone()).or_default();
        *n += 1;
        if *n > 1 {
            seen.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        drop(open);
        Self { seen, webhook_id }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let mut open = self.seen.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.webhook_id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.webhook_id);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_instances_share_one_database_and_survive_a_sigkill() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let db = server.database("cluster");
    let seen = Arc::new(Seen::default());
    let app = axum::Router::new()
        .fallback(receive)
        .with_state(seen.clone());
    let sink = crate::util::serve(app).await;

    // Each instance has its own dir (config, plugins, data) and the one database.
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| TestGateway::dir_with_plugins(&["event-filter"]))
        .collect();
    let mut instances = Vec::new();
    for dir in &dirs {
        let config = dir.path().join("switchyard.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
listen = "127.0.0.1:0"
data_dir = "./data"
[store]
url = "{db}"
lease = "2s"
[delivery]
timeout = "2s"
retry_schedule = ["0s", "200ms", "200ms", "200ms", "200ms"]
allowed_networks = ["127.0.0.0/8"]
[[sources]]
name = "s"
[[destinations]]
name = "sink"
url = "{sink}/sink"
[[routes]]
source = "s"
plugins = [{{ name = "event-filter", config = {{ allow = "usage" }} }}]
destinations = ["sink"]
"#
            ),
        )
        .unwrap();
        instances.push(start_binary(&config).await);
    }
    let urls: Vec<String> = instances.iter().map(|(_, u)| u.clone()).collect();

    // Senders go round the instances, as a load balancer would; a refused or failed
    // request is sent again to the next instance. Only a 202 counts as accepted.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let killed = Arc::new(tokio::sync::Notify::new());
    let mut senders = Vec::new();
    for worker in 0..SENDERS {
        let (client, urls, accepted, killed) = (
            client.clone(),
            urls.clone(),
            accepted.clone(),
            killed.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut turn = worker;
            for n in (worker..EVENTS).step_by(SENDERS) {
                let body = format!(r#"{{"type":"usage","n":{n}}}"#);
                let mut tries = 0;
                loop {
                    tries += 1;
                    assert!(tries < 30, "event {n} was never accepted");
                    turn += 1;
                    let url = &urls[turn % urls.len()];
                    let Ok(resp) = client
                        .post(format!("{url}/v1/ingest/s"))
                        .body(body.clone())
                        .send()
                        .await
                    else {
                        continue;
                    };
                    if resp.status() != 202 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    let Ok(v) = resp.json::<serde_json::Value>().await else {
                        continue;
                    };
                    let mut accepted = accepted.lock().unwrap();
                    accepted.push(v["id"].as_str().unwrap().to_string());
                    if accepted.len() == KILL_AFTER {
                        killed.notify_one();
                    }
                    break;
                }
            }
        }));
    }
    killed.notified().await;
    let (mut victim, _) = instances.remove(1);
    victim.start_kill().unwrap();
    victim.wait().await.unwrap();
    let (client_db, conn) = tokio_postgres::connect(&db, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let count = |sql: &'static str| {
        let c = &client_db;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    eprintln!(
        "at the kill: {} events queued, {} deliveries pending",
        count("SELECT COUNT(*) FROM events WHERE status = 'queued'").await,
        count("SELECT COUNT(*) FROM deliveries WHERE status = 'pending'").await
    );
    for s in senders {
        s.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), EVENTS, "every event was accepted somewhere");

    // Everything accepted arrives, including what the dead instance held (taken over
    // once its claims ran out).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let missing = {
            let arrivals = seen.arrivals.lock().unwrap();
            accepted
                .iter()
                .filter(|id| !arrivals.contains_key(*id))
                .count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of {EVENTS} accepted events never arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let repeated = {
        let arrivals = seen.arrivals.lock().unwrap();
        for (event, (webhook_ids, _)) in arrivals.iter() {
            assert_eq!(
                webhook_ids.len(),
                1,
                "event {event} arrived under several webhook-ids: {webhook_ids:?}"
            );
        }
        arrivals.values().filter(|(_, n)| *n > 1).count()
    };
    eprintln!(
        "{EVENTS} events delivered, {repeated} of them more than once (sent by the killed \
         instance, not recorded as sent)"
    );
    assert_eq!(
        seen.overlaps.load(Ordering::SeqCst),
        0,
        "a delivery was attempted by two instances at once"
    );
    // At most what the killed instance had in flight: its dispatcher's concurrency (256).
    assert!(
        repeated <= 256,
        "{repeated} events arrived twice: more than the killed instance can have had in flight"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM events WHERE status = 'queued'").await,
        0,
        "no event is left queued"
    );
}

/// Waits up to 10 s for `check` to hold of `GET path` on `gw`.
async fn eventually(gw: &TestGateway, path: &str, what: &str, check: impl Fn(u16, &Value) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = gw.get(path).await;
        if check(status, &body) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: GET {path} is still {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two gateways on one database: objects made, changed and deleted through one instance's
/// API serve on the other (stored sealed: `store.encryption_key`), and a destination that
/// fails on one instance is FAILED on the other, and restarted through either.
#[tokio::test(flavor = "multi_thread")]
async fn api_changes_and_destination_states_reach_every_instance() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let db = server.database("follow");
    let rx = Receiver::start().await;
    let config = format!(
        r#"
[store]
url = "{db}"
encryption_key = "0123456789abcdef0123456789abcdef"
[[sources]]
name = "s"
[[destinations]]
name = "fleet"
url = "{{receiver}}/fleet"
retry = {{ retry_schedule = ["0s", "1m"], jitter = 0.0, failure_threshold = 2 }}
[[routes]]
source = "s"
destinations = ["fleet"]
"#
    );
    let a = TestGateway::start(&config, &rx, &[]).await;
    let b = TestGateway::start(&config, &rx, &[]).await;
    let reloads = |metrics: String| -> Vec<String> {
        (metrics.lines())
            .filter(|l| l.starts_with("switchyard_reloads_total"))
            .map(String::from)
            .collect()
    };
    let b_reloads = reloads(b.metrics().await);

    let (status, body) = a
        .send(
            "POST",
            "/v1/destinations",
            Some(json!({ "name": "archive", "url": format!("{}/archive", rx.url) })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = a
        .send(
            "POST",
            "/v1/routes",
            Some(json!({ "name": "to-archive", "source": "s", "destinations": ["archive"] })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    eventually(&b, "/v1/routes/to-archive", "a route made on A", |s, _| {
        s == 200
    })
    .await;
    b.accept("s", r#"{"n":1}"#).await;
    let got = rx.wait_for(2).await;
    let mut paths: Vec<&str> = got.iter().map(|r| r.uri.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["/archive", "/fleet"], "B routes by A's route");

    // Changed through A: B delivers to the new URL.
    let (status, body) = a
        .send(
            "PATCH",
            "/v1/destinations/archive",
            Some(json!({ "url": format!("{}/archive-2", rx.url) })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually(&b, "/v1/destinations/archive", "A's change on B", |_, d| {
        d["url"].as_str().is_some_and(|u| u.ends_with("/archive-2"))
    })
    .await;
    b.accept("s", r#"{"n":1.5}"#).await;
    let got = rx.wait_for(4).await;
    assert!(
        got.iter().any(|r| r.uri == "/archive-2"),
        "B delivers to A's new URL"
    );

    // Failures seen by A make the destination FAILED on B too.
    rx.fail_with(Some(503));
    for n in 2..4 {
        a.accept("s", json!({ "n": n }).to_string()).await;
    }
    eventually(&a, "/v1/destinations/fleet", "fleet fails on A", |_, d| {
        d["state"] == "FAILED"
    })
    .await;
    eventually(&b, "/v1/destinations/fleet", "A's FAILED on B", |_, d| {
        d["state"] == "FAILED"
    })
    .await;

    // Restarted through B: ACTIVE on A, and what waited is delivered.
    rx.fail_with(None);
    let (status, body) = b.post_api("/v1/destinations/fleet/restart").await;
    assert_eq!(status, 200, "{body}");
    eventually(&a, "/v1/destinations/fleet", "B's restart on A", |_, d| {
        d["state"] == "ACTIVE"
    })
    .await;
    eventually(&a, "/v1/destinations/fleet", "the held events", |_, d| {
        d["pending"] == 0
    })
    .await;

    // Paused through A: DISABLED on B, which holds what it takes in; restarted through B.
    let (status, body) = a.post_api("/v1/destinations/fleet/pause").await;
    assert_eq!(status, 200, "{body}");
    eventually(&b, "/v1/destinations/fleet", "A's pause on B", |_, d| {
        d["state"] == "DISABLED"
    })
    .await;
    let before = rx.requests().len();
    let held = b.accept("s", json!({ "n": 4 }).to_string()).await;
    b.wait_event(&held, |e| {
        (e["deliveries"].as_array().unwrap().iter()).any(|d| {
            d["destination"] == "fleet"
                && d["status"] == "pending"
                && d.get("next_attempt_at").is_none()
        })
    })
    .await;
    let (status, body) = b.post_api("/v1/destinations/fleet/restart").await;
    assert_eq!(status, 200, "{body}");
    eventually(
        &a,
        "/v1/destinations/fleet",
        "the paused one's events",
        |_, d| d["state"] == "ACTIVE" && d["pending"] == 0,
    )
    .await;
    assert!(rx.requests().len() > before);

    // Deleted through B: gone on A.
    let (status, _) = b.send("DELETE", "/v1/routes/to-archive", None).await;
    assert_eq!(status, 204);
    eventually(&a, "/v1/routes/to-archive", "B's delete on A", |s, _| {
        s == 404
    })
    .await;
    // B took A's changes in as they came, without reloading everything.
    assert_eq!(reloads(b.metrics().await), b_reloads);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Instances whose config files differ, as during a rolling deploy: A has a destination
/// that B's file does not. B leaves the retries of A's deliveries to it to A (it would
/// otherwise take some and fail them as "no longer configured").
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_leaves_deliveries_to_destinations_it_lacks_to_the_others() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let db = server.database("rolling");
    let rx = Receiver::start().await;
    let a = TestGateway::start(
        &format!(
            r#"
[store]
url = "{db}"
[[sources]]
name = "s"
[[destinations]]
name = "new"
url = "{{receiver}}/new"
retry = {{ retry_schedule = ["0s", "2s", "2s"], jitter = 0.0, failure_threshold = 50 }}
[[routes]]
source = "s"
destinations = ["new"]
"#
        ),
        &rx,
        &[],
    )
    .await;
    let b = TestGateway::start(
        &format!("[store]\nurl = \"{db}\"\n[[sources]]\nname = \"s\"\n"),
        &rx,
        &[],
    )
    .await;

    // Every first attempt fails, so every delivery has a retry that either could claim:
    // due 2 s later, by when both dispatchers have seen it and wake for it.
    rx.fail_with(Some(500));
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(a.accept("s", json!({ "n": n }).to_string()).await);
    }
    rx.wait_for(8).await;
    rx.fail_with(None);
    for id in &ids {
        let event = a.settled(id).await;
        let delivery = &event["deliveries"][0];
        assert_eq!(delivery["status"], "delivered", "{event}");
        let attempts = delivery["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "one failure, one success: {delivery}");
        assert_eq!(attempts[1]["status_code"], 200, "{delivery}");
    }
    assert_eq!(rx.requests().len(), 16);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Rate limits hold for the instances together, not for each. A destination's: events
/// sent through two instances reach it at the rate it allows, and a delivery one instance
/// put off is sent at its slot by whichever claims it, without being put off again. A
/// source's: a sender spread over both is let in at its rate, not twice it.
#[tokio::test(flavor = "multi_thread")]
async fn instances_share_rate_limits() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let db = server.database("shared_pace");
    let rx = Receiver::start().await;
    // Five a second: a burst of five, then one every 200 ms.
    let config = format!(
        r#"
[store]
url = "{db}"
[[sources]]
name = "s"
[[destinations]]
name = "d"
url = "{{receiver}}/d"
rate_limit = 5
[[routes]]
source = "s"
destinations = ["d"]
[[sources]]
name = "limited"
rate_limit = 0.2
"#
    );
    let a = TestGateway::start(&config, &rx, &[]).await;
    let b = TestGateway::start(&config, &rx, &[]).await;

    // One event every 5 s, no burst: of six sent within a moment, through both, one is let
    // in (each instance on its own limit would let in two).
    let mut statuses = Vec::new();
    for n in 0..6 {
        let gw = if n % 2 == 0 { &a } else { &b };
        statuses.push(gw.post("limited", json!({ "n": n }).to_string()).await.0);
    }
    assert_eq!(statuses, [202, 429, 429, 429, 429, 429]);

    const EVENTS: usize = 20;
    for n in 0..EVENTS {
        let gw = if n % 2 == 0 { &a } else { &b };
        gw.accept("s", json!({ "n": n }).to_string()).await;
    }
    let got = rx.wait_for(EVENTS).await;
    let mut seen: Vec<u64> = got
        .iter()
        .map(|r| r.json()["n"].as_u64().unwrap())
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        (0..EVENTS as u64).collect::<Vec<_>>(),
        "each event once"
    );
    // 5 at once, then 15 one every 200 ms: at least 3 s. (Each instance on its own limit
    // would send its 10 in 1 s.) Arrivals come at or after their slots, never before.
    let first = got.iter().map(|r| r.at).min().unwrap();
    let last = got.iter().map(|r| r.at).max().unwrap();
    assert!(
        last - first >= Duration::from_millis(2_800),
        "{EVENTS} deliveries in {:?}",
        last - first
    );
    let deferred = |metrics: String| -> u64 {
        (metrics.lines())
            .find_map(|l| {
                l.strip_prefix(r#"switchyard_deliveries_deferred_total{destination="d"} "#)
            })
            .map_or(0, |n| n.parse().unwrap())
    };
    assert_eq!(
        deferred(a.metrics().await) + deferred(b.metrics().await),
        (EVENTS - 5) as u64,
        "each delivery past the burst is put off once, whichever instance claims it at its slot"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// `delivery.notify_source` on a shared store: two instances that each see a destination
/// fail, before either has read the other's state, post one `destination.failed` between
/// them (an operator is paged once per change, not once per instance). With
/// `restart_after`, they send it one test message an interval between them, and the one
/// that passes makes it ACTIVE on both, paged once.
#[tokio::test(flavor = "multi_thread")]
async fn a_destination_failing_on_two_instances_is_posted_once() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let db = server.database("notify");
    let rx = Receiver::start().await;
    let pager = Receiver::start().await;
    let config = format!(
        // (The harness's `[delivery]` table is open: the first line lands in it.)
        r#"
notify_source = "ops"
restart_after = "3s"
[store]
url = "{db}"
[[sources]]
name = "s"
[[sources]]
name = "ops"
[[destinations]]
name = "d"
url = "{{receiver}}/d"
retry = {{ retry_schedule = ["0s", "1h"], jitter = 0.0, failure_threshold = 1 }}
[[destinations]]
name = "pager"
url = "{}/pager"
[[routes]]
source = "s"
destinations = ["d"]
[[routes]]
source = "ops"
destinations = ["pager"]
"#,
        pager.url
    );
    let a = TestGateway::start(&config, &rx, &[]).await;
    let b = TestGateway::start(&config, &rx, &[]).await;
    rx.fail_with(Some(503));
    // At once, so that each instance makes its own first attempt and decides FAILED.
    tokio::join!(a.accept("s", r#"{"n":1}"#), b.accept("s", r#"{"n":2}"#));
    rx.wait_for(2).await;
    for gw in [&a, &b] {
        eventually(gw, "/v1/destinations/d", "d is FAILED", |_, d| {
            d["state"] == "FAILED"
        })
        .await;
    }
    let got = pager.wait_for(1).await;
    assert_eq!(got[0].json()["type"], "destination.failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pager.requests().len(), 1, "paged once");
    let (_, page) = a.get("/v1/events?source=ops").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");

    // Test messages: one each 3 s between the two (each instance alone would send its
    // own, a tick of 1 s apart at most).
    let tests = || {
        (rx.requests().into_iter())
            .filter(|r| r.json()["type"] == "switchyard.test")
            .map(|r| r.at)
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tests().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "{:?}", tests());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at = tests();
    for pair in at.windows(2) {
        let apart = pair[1] - pair[0];
        assert!(
            apart > Duration::from_secs(2),
            "tests {apart:?} apart: {at:?}"
        );
    }
    rx.fail_with(None);
    for gw in [&a, &b] {
        eventually(gw, "/v1/destinations/d", "d is ACTIVE again", |_, d| {
            d["state"] == "ACTIVE"
        })
        .await;
    }
    let got = pager.wait_for(2).await;
    assert_eq!(got[1].json()["type"], "destination.active");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pager.requests().len(), 2, "paged once each change");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// The database crashes and comes back while events arrive: ingest answers 503 while it
/// cannot store (the sender tries again, as senders do), and every event it accepted is
/// delivered once the database is back — nothing accepted is lost, the gateway keeps
/// running. (An outcome whose commit happened but whose answer was lost: see
/// `an_outcome_whose_answer_was_lost_is_delivered_without_waiting_for_its_lease`.)
#[tokio::test(flavor = "multi_thread")]
async fn a_database_crash_loses_no_accepted_event() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let db = server.database("crash");
    let rx = Receiver::start().await;
    let config = format!(
        // (The harness's `[delivery]` table is open: the first line lands in it.)
        r#"
timeout = "2s"
[store]
url = "{db}"
lease = "3s"
[[sources]]
name = "s"
[[destinations]]
name = "d"
url = "{{receiver}}/d"
retry = {{ retry_schedule = ["0s", "1s", "1s", "1s", "1s", "1s"], jitter = 0.0, failure_threshold = 100 }}
[[routes]]
source = "s"
destinations = ["d"]
"#
    );
    let gw = TestGateway::start(&config, &rx, &[]).await;
    let server = Arc::new(server);
    let mut accepted = Vec::new();
    let (mut refused, mut slowest) = (0, Duration::ZERO);
    let mut crash: Option<tokio::task::JoinHandle<()>> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    // Until 300 are accepted and the restart is over: events keep coming through all of it.
    while accepted.len() < 300 || !crash.as_ref().is_some_and(|c| c.is_finished()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} accepted",
            accepted.len()
        );
        // Mid-stream: the crash and the restart happen while events keep coming.
        if accepted.len() == 100 && crash.is_none() {
            let server = server.clone();
            crash = Some(tokio::task::spawn_blocking(move || {
                server.crash_and_restart()
            }));
        }
        let posted = tokio::time::Instant::now();
        let (status, answer) = gw.post("s", json!({ "n": n }).to_string()).await;
        slowest = slowest.max(posted.elapsed());
        match status {
            202 => {
                accepted.push(answer["id"].as_str().unwrap().to_string());
                n += 1;
            }
            503 => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("ingest answered {other}: {answer}"),
        }
    }
    let arrived = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let ids: HashSet<String> = rx
                .requests()
                .iter()
                .filter_map(|r| r.header("switchyard-event-id").map(str::to_string))
                .collect();
            if accepted.iter().all(|id| ids.contains(id)) {
                return ids.len();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    crash.unwrap().await.unwrap();
    // A post in flight when the server went down is refused, or — its insert having
    // committed with only the answer lost — accepted once the gateway has found it
    // stored, which takes as long as the server is down.
    assert!(
        refused > 0 || slowest > Duration::from_millis(300),
        "no post was refused or held up: the database was never down while events came"
    );
    assert!(
        arrived.is_ok(),
        "accepted events were lost ({refused} refused while the database was down)"
    );
    eprintln!(
        "{refused} posts refused while the database was down, the slowest answered in {slowest:?}"
    );
    gw.shutdown().await.unwrap();
}

/// A TCP proxy in front of the database that fails the network the hard way: while it
/// holds, the server's answer to each statement executed is not passed on (from its
/// `BindComplete` on: preparing a statement still works, executing one runs and commits
/// it); a cut then closes every connection open. What was committed meanwhile never got
/// its answer — the ambiguous commit of a network failure.
struct CutProxy {
    port: u16,
    hold: Arc<std::sync::atomic::AtomicBool>,
    /// Only the answer to a `COMMIT` is held (statements in a transaction go through).
    hold_commits: Arc<std::sync::atomic::AtomicBool>,
    /// Statements are not passed on to the server at all (nothing reaches it).
    blackhole: Arc<std::sync::atomic::AtomicBool>,
    /// New connections are closed at once (the server is down; see `down_for`).
    down: Arc<std::sync::atomic::AtomicBool>,
    cuts: Arc<Mutex<tokio_util::sync::CancellationToken>>,
}

impl CutProxy {
    /// A proxy to the database at `url`, and the URL that goes through it.
    async fn in_front_of(url: &str) -> (Self, String) {
        let port = server_port(url);
        let proxy = Self::start(port).await;
        let through = url.replacen(&format!(":{port}/"), &format!(":{}/", proxy.port), 1);
        (proxy, through)
    }

    async fn start(target_port: u16) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hold_commits = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let blackhole = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cuts = Arc::new(Mutex::new(tokio_util::sync::CancellationToken::new()));
        let refusing = down.clone();
        let (holding, current, dropping) = (hold.clone(), cuts.clone(), blackhole.clone());
        let holding_commits = hold_commits.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refusing.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                else {
                    continue;
                };
                let cut = current.lock().unwrap().clone();
                let (hold, blackhole) = (holding.clone(), dropping.clone());
                let hold_commits = holding_commits.clone();
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = client_read.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            if blackhole.load(Ordering::SeqCst) {
                                std::future::pending::<()>().await;
                            }
                            server_write.write_all(&buf[..n]).await?;
                        }
                    };
                    // Whole messages only (a type byte, then a length that counts itself).
                    let down = async {
                        let (mut buf, mut pending) = (vec![0u8; 64 * 1024], Vec::new());
                        loop {
                            let n = server_read.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            pending.extend_from_slice(&buf[..n]);
                            let (mut whole, mut held) = (0, false);
                            while pending.len() - whole >= 5 {
                                let at = &pending[whole..];
                                let len = u32::from_be_bytes(at[1..5].try_into().unwrap());
                                if at.len() < 1 + len as usize {
                                    break;
                                }
                                if at[0] == b'2' && hold.load(Ordering::SeqCst) {
                                    held = true;
                                    break;
                                }
                                // CommandComplete, tagged COMMIT.
                                if at[0] == b'C'
                                    && at[5..].starts_with(b"COMMIT\0")
                                    && hold_commits.load(Ordering::SeqCst)
                                {
                                    held = true;
                                    break;
                                }
                                whole += 1 + len as usize;
                            }
                            client_write.write_all(&pending[..whole]).await?;
                            pending.drain(..whole);
                            if held {
                                // Nothing more on this connection until it is cut.
                                std::future::pending::<()>().await;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        () = cut.cancelled() => {}
                    }
                });
            }
        });
        Self {
            port,
            hold,
            hold_commits,
            blackhole,
            down,
            cuts,
        }
    }

    /// The server goes away for `down`, as a restart or a failover would: every connection
    /// is closed and new ones are closed at once until it is back.
    fn down_for(self: &Arc<Self>, down: Duration) {
        self.down.store(true, Ordering::SeqCst);
        self.cut();
        let proxy = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(down).await;
            proxy.down.store(false, Ordering::SeqCst);
        });
    }

    /// As `hold_then_cut`, holding only the answers to `COMMIT`s.
    async fn hold_commits_then_cut(&self, held: Duration) {
        self.hold_commits.store(true, Ordering::SeqCst);
        tokio::time::sleep(held).await;
        self.cut();
    }

    /// Holds the answers to statements executed for `held`; then closes every connection.
    async fn hold_then_cut(&self, held: Duration) {
        self.hold.store(true, Ordering::SeqCst);
        tokio::time::sleep(held).await;
        self.cut();
    }

    /// Closes every connection open; new ones work normally again.
    fn cut(&self) {
        let old = std::mem::take(&mut *self.cuts.lock().unwrap());
        old.cancel();
        self.hold.store(false, Ordering::SeqCst);
        self.hold_commits.store(false, Ordering::SeqCst);
        self.blackhole.store(false, Ordering::SeqCst);
    }
}

/// An event's outcome commits but its answer is lost with the connection (the network to
/// PostgreSQL fails at that moment): the deliveries it leased to the pipeline, which will
/// not send them, are released once the database answers again, instead of waiting for
/// the lease to run out (two minutes here, longer than the test waits). Delivered once.
#[tokio::test(flavor = "multi_thread")]
async fn an_outcome_whose_answer_was_lost_is_delivered_without_waiting_for_its_lease() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let db = server.database("lost_answer");
    let (proxy, db) = CutProxy::in_front_of(&db).await;
    let rx = Receiver::start().await;
    let config = format!(
        // (The harness's `[delivery]` table is open: the first line lands in it.)
        r#"
timeout = "2s"
[store]
url = "{db}"
lease = "120s"
[plugins]
deadline = "5s"
[[sources]]
name = "s"
[[destinations]]
name = "d"
url = "{{receiver}}/d"
[[routes]]
source = "s"
plugins = [{{ name = "misbehave" }}]
destinations = ["d"]
"#
    );
    let gw = TestGateway::start(&config, &rx, &["misbehave"]).await;
    // Warm up (connections open, statements prepared), then an event whose plugin takes
    // 400 ms: its outcome is written while the proxy holds the answers.
    let warm = gw.accept("s", r#"{"n":0}"#).await;
    gw.settled(&warm).await;
    let id = gw.accept("s", r#"{"mode":"slow","ms":400}"#).await;
    proxy.hold_then_cut(Duration::from_millis(1_200)).await;

    let arrived = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let n = (rx.requests().iter())
                .filter(|r| r.header("switchyard-event-id") == Some(id.as_str()))
                .count();
            if n > 0 {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        arrived.is_ok(),
        "the delivery waited for its lease (120 s) after its outcome's answer was lost"
    );
    let e = gw.settled(&id).await;
    assert_eq!(e["deliveries"][0]["status"], "delivered", "{e}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let copies = (rx.requests().iter())
        .filter(|r| r.header("switchyard-event-id") == Some(id.as_str()))
        .count();
    assert_eq!(copies, 1, "delivered once");
    gw.shutdown().await.unwrap();
}

/// An event's insert commits but its answer is lost with the connection: the gateway finds
/// it stored and answers `202` (not `503`, which would have the sender post a second copy),
/// and delivers it at once instead of after its lease (two minutes here, longer than the
/// test waits). The same for an event with an idempotency key (its own transaction).
#[tokio::test(flavor = "multi_thread")]
async fn an_event_whose_commit_answer_was_lost_is_accepted_and_delivered() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let db = server.database("lost_ingest_answer");
    let (proxy, db) = CutProxy::in_front_of(&db).await;
    let rx = Receiver::start().await;
    let config = format!(
        r#"
[store]
url = "{db}"
lease = "120s"
[[sources]]
name = "s"
[[sources]]
name = "keyed"
idempotency_field = "key"
[[destinations]]
name = "d"
url = "{{receiver}}/d"
[[routes]]
source = "s"
destinations = ["d"]
[[routes]]
source = "keyed"
destinations = ["d"]
"#
    );
    let gw = Arc::new(TestGateway::start(&config, &rx, &[]).await);
    // Warm up: connections open, statements prepared.
    for source in ["s", "keyed"] {
        let warm = gw
            .accept(source, json!({ "key": "warm" }).to_string())
            .await;
        gw.settled(&warm).await;
    }
    for (source, body) in [("s", json!({ "n": 1 })), ("keyed", json!({ "key": "k1" }))] {
        let post = {
            let gw = gw.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                gw.post(source, body.to_string()).await
            })
        };
        // The group-committed insert is one statement; a keyed event's, a transaction.
        match source {
            "s" => proxy.hold_then_cut(Duration::from_millis(1_200)).await,
            _ => {
                proxy
                    .hold_commits_then_cut(Duration::from_millis(1_200))
                    .await
            }
        }
        let (status, answer) = post.await.unwrap();
        assert_eq!(status, 202, "{source}: {answer}");
        let id = answer["id"].as_str().unwrap().to_string();
        let arrived = tokio::time::timeout(Duration::from_secs(30), async {
            while !(rx.requests().iter())
                .any(|r| r.header("switchyard-event-id") == Some(id.as_str()))
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            arrived.is_ok(),
            "{source}: the event waited for its lease (120 s)"
        );
    }
    let copies = (rx.requests().iter()).filter(|r| r.uri == "/d").count();
    assert_eq!(
        copies, 4,
        "each event delivered once, the two warm-ups included"
    );
    Arc::into_inner(gw).unwrap().shutdown().await.unwrap();
}

/// A gateway on a fresh database behind a [`CutProxy`] (lease 3 s, attempts time out
/// after 2 s), routing source `s` to one destination that, at its first request, does
/// `first` to the proxy and answers 204; and how many requests that destination got.
struct CutAtFirstDelivery {
    gw: TestGateway,
    arrived: Arc<AtomicUsize>,
    _server: PgServer,
}

impl CutAtFirstDelivery {
    async fn start(name: &str, first: fn(&Arc<CutProxy>)) -> Option<Self> {
        let server = PgServer::start()?;
        let db = server.database(name);
        let (proxy, db) = CutProxy::in_front_of(&db).await;
        let proxy = Arc::new(proxy);
        let arrived = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new()
            .fallback(
                move |State((proxy, arrived)): State<(Arc<CutProxy>, Arc<AtomicUsize>)>| async move {
                    if arrived.fetch_add(1, Ordering::SeqCst) == 0 {
                        first(&proxy);
                    }
                    StatusCode::NO_CONTENT
                },
            )
            .with_state((proxy, arrived.clone()));
        let url = crate::util::serve(app).await;
        let rx = Receiver::start().await;
        let config = format!(
            // (The harness's `[delivery]` table is open: the first line lands in it.)
            r#"
timeout = "2s"
[store]
url = "{db}"
lease = "3s"
[[sources]]
name = "s"
[[destinations]]
name = "d"
url = "{url}/d"
[[routes]]
source = "s"
destinations = ["d"]
"#
        );
        let gw = TestGateway::start(&config, &rx, &[]).await;
        Some(Self {
            gw,
            arrived,
            _server: server,
        })
    }
}

/// The database stops answering just as a delivery succeeds, so its attempt cannot be
/// recorded (nothing reaches the server), and comes back a moment later: the record is
/// tried again, and the delivery is not sent a second time when its lease runs out.
#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_recorded_late_is_not_sent_again() {
    // Unreachable for 300 ms.
    let blackhole = |proxy: &Arc<CutProxy>| {
        proxy.blackhole.store(true, Ordering::SeqCst);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            proxy.cut();
        });
    };
    let Some(CutAtFirstDelivery {
        gw,
        arrived,
        _server,
    }) = CutAtFirstDelivery::start("late_record", blackhole).await
    else {
        return;
    };
    let id = gw.accept("s", "{}").await;
    // (While the database is unreachable, the API answers errors: polled through.)
    gw.wait_event(&id, |e| e["deliveries"][0]["status"] == "delivered")
        .await;
    // Past the lease (3 s + the 2 s timeout): a delivery left leased would be sent again.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(arrived.load(Ordering::SeqCst), 1, "sent once");
    let e = gw.event(&id).await;
    assert_eq!(
        e["deliveries"][0]["attempts"].as_array().unwrap().len(),
        1,
        "{e}"
    );
    gw.shutdown().await.unwrap();
}

/// The database goes away just as a delivery succeeds, for longer than the record of its
/// attempt is retried (1 + 2 + 4 s) and than its lease (3 s + the 2 s timeout): once the
/// database is back and the delivery is claimed again, the attempt made before is
/// recorded instead of the request being sent a second time.
#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_unrecorded_through_a_long_outage_is_recorded_at_the_next_claim_not_sent_again()
{
    let down = |proxy: &Arc<CutProxy>| proxy.down_for(Duration::from_secs(9));
    let Some(CutAtFirstDelivery {
        gw,
        arrived,
        _server,
    }) = CutAtFirstDelivery::start("long_outage", down).await
    else {
        return;
    };
    let id = gw.accept("s", "{}").await;
    // The database is down for 9 s from the first request; the API answers errors.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let e = gw
        .wait_event(&id, |e| e["deliveries"][0]["status"] == "delivered")
        .await;
    assert_eq!(arrived.load(Ordering::SeqCst), 1, "sent once: {e}");
    assert_eq!(
        e["deliveries"][0]["attempts"].as_array().unwrap().len(),
        1,
        "{e}"
    );
    // A while after: nothing sent again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(arrived.load(Ordering::SeqCst), 1, "sent once");
    gw.shutdown().await.unwrap();
}

/// A database server that hangs (every process stopped: connections stay open and its
/// kernel acknowledges, but nothing answers) while senders give up, as the embedded
/// store's stalled disk in `durable::events_whose_senders_gave_up_during_a_stalled_commit_are_delivered`:
/// the events waiting take the queue's room (a third sender is refused at once), `/readyz`
/// says not ready within its 2 s budget, and why after 5 s, and `/metrics` still answers,
/// telling how long; once the server
/// resumes, the events whose senders gave up are delivered at once — not when their claim
/// runs out (two minutes here, longer than the test waits).
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_database_is_reported_and_what_senders_gave_up_on_is_delivered_when_it_resumes() {
    let Some(server) = PgServer::start() else {
        return;
    };
    // (A connection opened while it hangs waits for it longer than the default 10 s.)
    let db = server.database("hung") + "?connect_timeout=30";
    let rx = Receiver::start().await;
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
queue_capacity = 2
[store]
url = "{db}"
lease = "120s"
[delivery]
allowed_networks = ["127.0.0.0/8"]
[[sources]]
name = "s"
[[destinations]]
name = "d"
url = "{}/d"
[[routes]]
source = "s"
destinations = ["d"]
"#,
        rx.url
    );
    let gw = TestGateway::start_raw(TestGateway::dir_with_plugins(&[]), &config, &|_| None)
        .await
        .unwrap();
    let post = |n: usize, wait: Duration| {
        let url = gw.url.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{url}/v1/ingest/s"))
                .body(json!({ "n": n }).to_string())
                .timeout(wait)
                .send()
                .await
        }
    };
    let get = |path: &str| {
        reqwest::Client::new()
            .get(format!("{}{path}", gw.url))
            .timeout(Duration::from_secs(4))
            .send()
    };
    let n = |r: &crate::util::Received| r.json()["n"].as_u64().unwrap();
    // Warm: connections open, statements prepared.
    for i in 0..4 {
        assert_eq!(
            post(i, Duration::from_secs(30)).await.unwrap().status(),
            202
        );
    }
    rx.wait_for(4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    server.pause();
    // Not ready at once: the probe does not wait for a server that does not answer.
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 503);
    let why = ready.text().await.unwrap();
    assert!(why.contains("the store did not answer within 2 s"), "{why}");
    crate::util::while_the_store_does_not_answer(&gw.url, 10, 2).await;

    server.resume();
    let mut got: Vec<u64> = rx.wait_for(6).await.iter().map(n).collect();
    got.sort();
    assert_eq!(got, [0, 1, 2, 3, 10, 11]);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    gw.shutdown().await.unwrap();
}

fn server_port(url: &str) -> u16 {
    url.rsplit_once(':')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// What plugins keep between events is the database's: two instances running
/// `change-filter` on one database see each other's values, and of identical events sent
/// through both at once exactly one passes (`swap`, decided by PostgreSQL's row lock).
#[tokio::test(flavor = "multi_thread")]
async fn instances_share_what_plugins_keep() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let db = server.database("shared_state");
    let rx = Receiver::start().await;
    let config = format!(
        r#"
[store]
url = "{db}"
[[sources]]
name = "s"
[[destinations]]
name = "d"
url = "{{receiver}}/d"
[[routes]]
source = "s"
plugins = [{{ name = "change-filter", config = {{ key = "/iccid", fields = "/mcc" }} }}]
destinations = ["d"]
"#
    );
    let a = TestGateway::start(&config, &rx, &["change-filter"]).await;
    let b = TestGateway::start(&config, &rx, &["change-filter"]).await;
    let event = |mcc: &str| json!({ "iccid": "8945", "mcc": mcc }).to_string();
    let (through_a, through_b) = tokio::join!(
        futures_util::future::join_all((0..12).map(|_| a.accept("s", event("238")))),
        futures_util::future::join_all((0..12).map(|_| b.accept("s", event("238")))),
    );
    let mut passed = 0;
    for (gw, ids) in [(&a, through_a), (&b, through_b)] {
        for id in ids {
            let e = gw.settled(&id).await;
            passed += usize::from(e["routes"][0]["result"]["result"] == "delivering");
        }
    }
    assert_eq!(
        passed, 1,
        "one of 24 identical events through two instances"
    );
    // A change through one instance is known to the other.
    let changed = b.accept("s", event("240")).await;
    assert_eq!(
        b.settled(&changed).await["routes"][0]["result"]["result"],
        "delivering"
    );
    let again = a.accept("s", event("240")).await;
    assert_eq!(
        a.settled(&again).await["routes"][0]["result"]["result"],
        "dropped"
    );
    assert_eq!(rx.wait_for(2).await.len(), 2);
}
