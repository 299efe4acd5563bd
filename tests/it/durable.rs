//! Durable delivery through a real gateway: idempotent ingest, the retry schedule and a
//! destination's rate limit on an injected clock, Retry-After, 410, the FAILED state and
//! restart, replay, pagination, retention.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard::delivery::{Clock, ManualClock};

use crate::util::{Receiver, TestGateway, sample_event};

fn one_destination(path: &str, extra: &str) -> String {
    format!(
        r#"
[[sources]]
name = "s"
idempotency_field = "id"
idempotency_header = "x-github-delivery"
[[destinations]]
name = "d"
url = "{{receiver}}{path}"
{extra}
[[routes]]
source = "s"
destinations = ["d"]
"#
    )
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(switchyard::delivery::now_ms()))
}

fn attempts(e: &Value) -> usize {
    e["deliveries"][0]["attempts"]
        .as_array()
        .map_or(0, Vec::len)
}

async fn destination(gw: &TestGateway, name: &str) -> Value {
    let (status, body) = gw.get("/v1/destinations").await;
    assert_eq!(status, 200);
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .cloned()
        .unwrap()
}

/// A provider with no id of its own: the fields that make its event unique together
/// (Mobile Manager sends an order once per state), given through the API as JSON pointers.
/// An event missing one of them has no key and is stored each time.
#[tokio::test(flavor = "multi_thread")]
async fn several_body_fields_together_de_duplicate() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&one_destination("/", ""), &rx, &[]).await;
    let fields = json!(["/OrderId", "/State"]);
    gw.create(
        "/v1/sources",
        json!({ "name": "mm", "idempotency_field": fields }),
    )
    .await;
    let (_, mm) = gw.get("/v1/sources/mm").await;
    assert_eq!(mm["idempotency_field"], fields, "{mm}");
    let order = |state: u8| json!({ "OrderId": "ord-1", "State": state, "Type": 5 }).to_string();
    let (s1, first) = gw.post("mm", order(1)).await;
    let (s2, again) = gw.post("mm", order(1)).await;
    let (s3, next) = gw.post("mm", order(2)).await;
    assert_eq!((s1, s2, s3), (202, 200, 202), "{first} {again} {next}");
    assert_eq!(again["id"], first["id"]);
    assert_ne!(next["id"], first["id"]);
    let alert = json!({ "AlertId": "a-1", "AlertName": "usage" }).to_string();
    let (s1, _) = gw.post("mm", alert.clone()).await;
    let (s2, _) = gw.post("mm", alert).await;
    assert_eq!((s1, s2), (202, 202), "no OrderId: no key");
    for (bad, says) in [
        (json!([]), "1 to 8 fields"),
        (json!(["/OrderId", ""]), "idempotency_field[1]"),
    ] {
        let (status, e) = gw
            .send(
                "POST",
                "/v1/sources",
                Some(json!({ "name": "x", "idempotency_field": bad })),
            )
            .await;
        assert_eq!(status, 400, "{e}");
        assert!(e["error"].as_str().unwrap().contains(says), "{e}");
    }
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_ingest_answers_with_the_original_id() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&one_destination("/", ""), &rx, &[]).await;
    let post_with = |headers: &[(&'static str, &'static str)], body: &'static str| {
        let mut req = gw.client.post(format!("{}/v1/ingest/s", gw.url)).body(body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let post = |key: Option<&'static str>, body| match key {
        Some(k) => post_with(&[("idempotency-key", k)], body),
        None => post_with(&[], body),
    };
    let (s1, first) = post(Some("k-1"), "{}").await;
    let (s2, again) = post(Some("k-1"), "{}").await;
    let (s3, other) = post(Some("k-2"), "{}").await;
    assert_eq!((s1, s2, s3), (202, 200, 202));
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["duplicate"], true);
    assert_ne!(other["id"], first["id"]);

    // The source's idempotency_field (Onomondo's `id`) de-duplicates without a header.
    let (_, a) = post(None, r#"{"id":"onomondo-1","type":"usage"}"#).await;
    let (status, b) = post(None, r#"{"id":"onomondo-1","type":"usage"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(a["id"], b["id"]);

    // The source's idempotency_header (GitHub's delivery id, repeated on its retries) comes
    // before the body field, and after an `Idempotency-Key`.
    let gh = |delivery| [("x-github-delivery", delivery)];
    let (s1, c) = post_with(&gh("72d3162e"), r#"{"id":"onomondo-1"}"#).await;
    let (s2, d) = post_with(&gh("72d3162e"), r#"{"id":"onomondo-2"}"#).await;
    assert_eq!((s1, s2), (202, 200), "{c} {d}");
    assert_eq!(c["id"], d["id"]);
    let both = [
        ("x-github-delivery", "72d3162e"),
        ("idempotency-key", "k-3"),
    ];
    let (s3, e) = post_with(&both, "{}").await;
    assert_eq!(s3, 202, "the Idempotency-Key decides: {e}");
    let (s4, _) = post_with(&gh(""), r#"{"id":"onomondo-1"}"#).await;
    assert_eq!(s4, 200, "an empty header is no key: the body field decides");

    rx.wait_for(5).await;
    gw.shutdown().await.unwrap();
    assert_eq!(rx.requests().len(), 5, "duplicates are not delivered again");
}

/// The first entry of `retry_schedule` is the wait before the first attempt: a destination
/// with `["30s", …]` gets each event 30 s after it is stored (a receiver that must not hear
/// of a SIM before the provider's own API knows it), and then retries as the rest of the
/// schedule says; another destination of the same route is sent at once.
#[tokio::test(flavor = "multi_thread")]
async fn the_schedules_first_wait_delays_the_first_attempt() {
    let rx = Receiver::start().await;
    let clock = clock();
    let config = r#"
[[sources]]
name = "s"
[[destinations]]
name = "later"
url = "{receiver}/later"
retry = { retry_schedule = ["30s", "5s"], jitter = 0.0 }
[[destinations]]
name = "now"
url = "{receiver}/now"
[[routes]]
source = "s"
destinations = ["later", "now"]
"#;
    let gw = TestGateway::start_with_clock(config, &rx, &[], clock.clone()).await;
    let t0 = clock.now_ms();
    let id = gw.accept("s", "{}").await;
    assert_eq!(rx.wait_for(1).await[0].uri, "/now");
    let e = gw.event(&id).await;
    let later = (e["deliveries"].as_array().unwrap().iter())
        .find(|d| d["destination"] == "later")
        .unwrap();
    assert_eq!(later["status"], "pending", "{e}");
    assert_eq!(later["next_attempt_at"], t0 + 30_000, "{e}");

    // Not due yet: nothing is sent however long we wait in real time.
    clock.advance(Duration::from_millis(29_000));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(rx.requests().len(), 1);

    clock.advance(Duration::from_millis(1_000));
    let got = rx.wait_for(2).await;
    assert_eq!(got[1].uri, "/later");
    let e = gw.settled(&id).await;
    let later = (e["deliveries"].as_array().unwrap().iter())
        .find(|d| d["destination"] == "later")
        .unwrap();
    assert_eq!(later["status"], "delivered", "{e}");
    assert_eq!(later["attempts"].as_array().unwrap().len(), 1, "{e}");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_follow_the_schedule_on_the_injected_clock() {
    let rx = Receiver::start().await;
    let clock = clock();
    let config = one_destination(
        "/status/503",
        r#"retry = { retry_schedule = ["0s", "5s", "5m"], jitter = 0.2, failure_threshold = 10 }"#,
    );
    let gw = TestGateway::start_with_clock(&config, &rx, &[], clock.clone()).await;
    let t0 = clock.now_ms();
    let id = gw.accept("s", "{}").await;

    let e = gw
        .wait_event(&id, |e| {
            attempts(e) == 1 && e["deliveries"][0]["next_attempt_at"].is_u64()
        })
        .await;
    let next = e["deliveries"][0]["next_attempt_at"].as_u64().unwrap();
    assert!(
        (t0 + 5_000..=t0 + 6_000).contains(&next),
        "second attempt 5 s + up to 20%: {}",
        next - t0
    );

    // Not due yet: nothing happens however long we wait in real time.
    clock.advance(Duration::from_millis(4_900));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(attempts(&gw.event(&id).await), 1);

    clock.advance(Duration::from_millis(1_200));
    let e = gw.wait_event(&id, |e| attempts(e) == 2).await;
    let at2 = e["deliveries"][0]["attempts"][1]["at"].as_u64().unwrap();
    let next = e["deliveries"][0]["next_attempt_at"].as_u64().unwrap();
    assert!(
        (at2 + 300_000..=at2 + 360_000).contains(&next),
        "third attempt 5 min + up to 20%"
    );

    clock.advance(Duration::from_secs(361));
    let e = gw
        .wait_event(&id, |e| e["deliveries"][0]["status"] == "failed")
        .await;
    assert_eq!(attempts(&e), 3, "the schedule has three attempts");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limit_spaces_deliveries_out_without_counting_attempts() {
    let rx = Receiver::start().await;
    let clock = clock();
    // Two a second: a burst of two, then one every 500 ms.
    let gw = TestGateway::start_with_clock(
        &one_destination("/in", "rate_limit = 2"),
        &rx,
        &[],
        clock.clone(),
    )
    .await;
    let t0 = clock.now_ms();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(gw.accept("s", format!(r#"{{"n":{n}}}"#)).await);
    }
    rx.wait_for(2).await;
    // The other three wait for their slots, put off in the store with no attempt made.
    let mut slots = Vec::new();
    for id in &ids {
        let e = gw
            .wait_event(id, |e| {
                attempts(e) == 1 || e["deliveries"][0]["next_attempt_at"].as_u64() > Some(t0)
            })
            .await;
        if attempts(&e) == 0 {
            slots.push(e["deliveries"][0]["next_attempt_at"].as_u64().unwrap() - t0);
        }
    }
    slots.sort();
    assert_eq!(slots, [500, 1_000, 1_500]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(rx.requests().len(), 2, "nothing is sent before its slot");

    clock.advance(Duration::from_millis(500));
    rx.wait_for(3).await;
    clock.advance(Duration::from_millis(1_000));
    let got = rx.wait_for(5).await;
    let mut sent: Vec<u64> = got
        .iter()
        .map(|r| r.json()["n"].as_u64().unwrap())
        .collect();
    sent.sort();
    assert_eq!(sent, [0, 1, 2, 3, 4], "each event once");
    for id in &ids {
        let e = gw
            .wait_event(id, |e| e["deliveries"][0]["status"] == "delivered")
            .await;
        assert_eq!(attempts(&e), 1, "putting off is not an attempt: {e}");
    }
    let metrics = gw
        .client
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"switchyard_deliveries_deferred_total{destination="d"} 3"#),
        "{metrics}"
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_is_honoured() {
    let rx = Receiver::start().await;
    let clock = clock();
    let gw = TestGateway::start_with_clock(
        &one_destination("/status/429/retry-after/120", ""),
        &rx,
        &[],
        clock.clone(),
    )
    .await;
    let id = gw.accept("s", "{}").await;
    let e = gw
        .wait_event(&id, |e| {
            attempts(e) == 1 && e["deliveries"][0]["next_attempt_at"].is_u64()
        })
        .await;
    let at = e["deliveries"][0]["attempts"][0]["at"].as_u64().unwrap();
    let next = e["deliveries"][0]["next_attempt_at"].as_u64().unwrap();
    assert_eq!(
        next,
        at + 120_000,
        "Retry-After: 120 wins over the harness's 10 ms"
    );
    assert_eq!(e["deliveries"][0]["attempts"][0]["status_code"], 429);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn gone_disables_the_destination_and_keeps_the_event() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&one_destination("/status/410", ""), &rx, &[]).await;
    let id = gw.accept("s", "{}").await;
    let e = gw.wait_event(&id, |e| attempts(e) == 1).await;
    assert_eq!(
        e["deliveries"][0]["status"], "pending",
        "held, not given up"
    );
    let d = destination(&gw, "d").await;
    assert_eq!(d["state"], "DISABLED");
    assert_eq!(d["pending"], 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rx.requests().len(),
        1,
        "a disabled destination is not called again"
    );
    gw.shutdown().await.unwrap();
}

/// A destination paused by hand (a receiver's maintenance window) is DISABLED: events are
/// taken in and their deliveries held, no attempt is made or retry spent, a state-change
/// notice goes out, and a restart sends what waited.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_destination_holds_its_deliveries_until_a_restart() {
    let rx = Receiver::start().await;
    let config = format!(
        "notify_source = \"ops\"\n{}[[sources]]\nname = \"ops\"\n[[destinations]]\nname = \"pager\"\n\
         url = \"{{receiver}}/pager\"\n[[routes]]\nsource = \"ops\"\ndestinations = [\"pager\"]\n",
        one_destination("/fleet", "")
    );
    let gw = TestGateway::start(&config, &rx, &[]).await;
    let (status, body) = gw.post_api("/v1/destinations/d/pause").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "DISABLED");
    let d = destination(&gw, "d").await;
    assert_eq!(
        d["last_error"], "paused through the API: restart it to resume",
        "{d}"
    );
    let notice = rx.wait_for(1).await;
    assert_eq!(notice[0].uri, "/pager");
    assert_eq!(notice[0].json()["type"], "destination.disabled");

    let ids = [
        gw.accept("s", json!({ "n": 1 }).to_string()).await,
        gw.accept("s", json!({ "n": 2 }).to_string()).await,
    ];
    for id in &ids {
        gw.wait_event(id, |e| {
            e["deliveries"][0]["status"] == "pending"
                && e["deliveries"][0].get("next_attempt_at").is_none()
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rx.requests().iter().all(|r| r.uri != "/fleet"),
        "nothing is sent while paused"
    );

    let (status, body) = gw.post_api("/v1/destinations/d/restart").await;
    assert_eq!((status, &body["state"]), (200, &json!("ACTIVE")), "{body}");
    for id in &ids {
        let e = gw.settled(id).await;
        assert_eq!(e["deliveries"][0]["status"], "delivered", "{e}");
        assert_eq!(e["deliveries"][0]["attempts"].as_array().unwrap().len(), 1);
    }
    let (status, _) = gw.post_api("/v1/destinations/nope/pause").await;
    assert_eq!(status, 404);
    gw.shutdown().await.unwrap();
}

/// With `restart_after`, a FAILED destination is sent a test message that long after it
/// failed and every that long while the test fails; the first that passes makes it ACTIVE,
/// sends what it held and tells the notify source — as a restart by hand would. A
/// destination paused by hand is not tested: it waits for its restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_destination_is_restarted_by_itself_when_its_test_passes() {
    let rx = Receiver::start().await;
    let pager = Receiver::start().await;
    let clock = clock();
    let config = format!(
        // (The harness's `[delivery]` table is open: the first line lands in it.)
        r#"
notify_source = "ops"
restart_after = "5m"
[[sources]]
name = "s"
[[sources]]
name = "ops"
[[destinations]]
name = "d"
url = "{{receiver}}/d"
retry = {{ retry_schedule = ["0s", "1h"], jitter = 0.0, failure_threshold = 2 }}
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
    let gw = TestGateway::start_with_clock(&config, &rx, &[], clock.clone()).await;
    let tests = || {
        (rx.requests().iter())
            .filter(|r| r.json()["type"] == "switchyard.test")
            .count()
    };
    rx.fail_with(Some(503));
    let ids = [
        gw.accept("s", json!({ "n": 1 }).to_string()).await,
        gw.accept("s", json!({ "n": 2 }).to_string()).await,
    ];
    assert_eq!(
        pager.wait_for(1).await[0].json()["type"],
        "destination.failed"
    );
    // (The restart loop looks each second: it has found it FAILED after this.)
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    clock.advance(Duration::from_secs(240));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(tests(), 0, "no test before restart_after has passed");

    let first = destination(&gw, "d").await["next_test_at"].as_u64();
    assert!(first.is_some(), "the API tells when the test comes");

    // Its test fails: it stays FAILED, and is tested again one interval later.
    clock.advance(Duration::from_secs(61));
    while tests() == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(destination(&gw, "d").await["state"], "FAILED");
    rx.fail_with(None);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(tests(), 1, "one test an interval");
    let next = destination(&gw, "d").await["next_test_at"].as_u64();
    assert_eq!(
        next.zip(first).map(|(n, f)| n - f),
        Some(301_000),
        "the next five minutes after the one made late"
    );
    clock.advance(Duration::from_secs(300));
    for id in &ids {
        let e = gw
            .wait_event(id, |e| e["deliveries"][0]["status"] == "delivered")
            .await;
        assert_eq!(attempts(&e), 2, "{e}");
    }
    assert_eq!(tests(), 2);
    let d = destination(&gw, "d").await;
    assert_eq!(d["state"], "ACTIVE");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let d = destination(&gw, "d").await;
    assert!(d.get("next_test_at").is_none(), "{d}");
    let metrics = gw.metrics().await;
    for line in [
        r#"switchyard_destination_tests_total{destination="d",outcome="failed"} 1"#,
        r#"switchyard_destination_tests_total{destination="d",outcome="passed"} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    let active = pager.wait_for(2).await[1].json();
    assert_eq!(
        (&active["type"], &active["destination"]),
        (&json!("destination.active"), &json!("d")),
        "{active}"
    );

    // Paused by hand, it is not tested however long it waits.
    let (status, body) = gw.post_api("/v1/destinations/d/pause").await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    clock.advance(Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(tests(), 2, "a paused destination waits for its restart");
    assert_eq!(destination(&gw, "d").await["state"], "DISABLED");
    gw.shutdown().await.unwrap();
}

/// A FAILED destination whose test message hangs (its receiver takes the connection and
/// never answers) holds only its own test: another's test goes out and restarts it in the
/// same second.
#[tokio::test(flavor = "multi_thread")]
async fn a_test_message_that_hangs_holds_up_no_other_destination_s_restart() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let rx = Receiver::start().await;
    let hang = Arc::new(AtomicBool::new(false));
    let app = axum::Router::new()
        .fallback(
            |axum::extract::State(hang): axum::extract::State<Arc<AtomicBool>>| async move {
                if hang.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            },
        )
        .with_state(hang.clone());
    let hanging = crate::util::serve(app).await;
    let clock = clock();
    let config = format!(
        // (The harness's `[delivery]` table is open: the first line lands in it.)
        r#"
restart_after = "5m"
[[sources]]
name = "s"
[[destinations]]
name = "hangs"
url = "{hanging}/hangs"
timeout = "10m"
retry = {{ retry_schedule = ["0s", "1h"], failure_threshold = 1 }}
[[destinations]]
name = "d"
url = "{{receiver}}/d"
retry = {{ retry_schedule = ["0s", "1h"], failure_threshold = 1 }}
[[routes]]
source = "s"
destinations = ["hangs", "d"]
"#
    );
    let gw = TestGateway::start_with_clock(&config, &rx, &[], clock.clone()).await;
    let failed = |name: &'static str| {
        let gw = &gw;
        async move {
            while destination(gw, name).await["state"] != "FAILED" {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // (The restart loop looks each second: it has found it FAILED after this.)
            tokio::time::sleep(Duration::from_millis(1_500)).await;
        }
    };
    // `hangs` fails first, `d` a minute later; then `hangs` is tested first, and its test
    // hangs.
    gw.accept("s", r#"{"n":1}"#).await;
    failed("hangs").await;
    clock.advance(Duration::from_secs(60));
    rx.fail_with(Some(503));
    gw.accept("s", r#"{"n":2}"#).await;
    failed("d").await;
    hang.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(240));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    rx.fail_with(None);
    clock.advance(Duration::from_secs(60));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while destination(&gw, "d").await["state"] != "ACTIVE" {
        assert!(
            std::time::Instant::now() < deadline,
            "d waits behind the hanging test"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(destination(&gw, "hangs").await["state"], "FAILED");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_destination_keeps_events_until_restart_delivers_them() {
    let rx = Receiver::start().await;
    let clock = clock();
    let config = one_destination(
        "/fleet",
        r#"retry = { retry_schedule = ["0s", "1m", "1m"], jitter = 0.0, failure_threshold = 3 }"#,
    );
    let gw = TestGateway::start_with_clock(&config, &rx, &[], clock.clone()).await;
    rx.fail_with(Some(503));
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(gw.accept("s", json!({ "n": i }).to_string()).await);
    }
    for id in &ids {
        gw.wait_event(id, |e| attempts(e) == 1).await;
    }
    let d = destination(&gw, "d").await;
    assert_eq!(d["state"], "FAILED", "{d}");
    assert_eq!(d["consecutive_failures"], 3);

    // Events keep arriving and are kept, not sent, while the destination is FAILED, even
    // long after their retries were due.
    for i in 3..5 {
        ids.push(gw.accept("s", json!({ "n": i }).to_string()).await);
    }
    clock.advance(Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rx.requests().len(), 3, "no attempts while FAILED");
    let d = destination(&gw, "d").await;
    assert_eq!(d["pending"], 5, "{d}");
    // Those that arrived while it was FAILED are held: no due time until the restart.
    for id in &ids[3..] {
        gw.wait_event(id, |e| {
            e["deliveries"][0]["status"] == "pending"
                && e["deliveries"][0].get("next_attempt_at").is_none()
        })
        .await;
    }

    // A restart whose test message fails leaves it FAILED.
    let (status, body) = gw.post_api("/v1/destinations/d/restart").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(destination(&gw, "d").await["state"], "FAILED");

    rx.fail_with(None);
    let (status, body) = gw.post_api("/v1/destinations/d/restart").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "ACTIVE");
    for id in &ids {
        gw.wait_event(id, |e| e["deliveries"][0]["status"] == "delivered")
            .await;
    }
    let got = rx.requests();
    let test_messages: Vec<_> = got
        .iter()
        .filter(|r| r.json()["type"] == "switchyard.test")
        .collect();
    assert_eq!(
        test_messages.len(),
        2,
        "each restart sends a test message first"
    );
    let (status, _) = gw.post_api("/v1/destinations/nope/restart").await;
    assert_eq!(status, 404);

    // A test message on its own: placeholders resolve to `none`, the state is unchanged.
    let (status, body) = gw.post_api("/v1/destinations/d/test").await;
    assert_eq!(
        (status, body["ok"].as_bool(), body["status_code"].as_u64()),
        (200, Some(true), Some(200)),
        "{body}"
    );
    let last = rx.requests().pop().unwrap();
    assert_eq!(last.json()["type"], "switchyard.test");
    rx.fail_with(Some(500));
    let (status, body) = gw.post_api("/v1/destinations/d/test").await;
    assert_eq!(
        (status, body["ok"].as_bool(), body["status_code"].as_u64()),
        (200, Some(false), Some(500)),
        "{body}"
    );
    assert_eq!(
        destination(&gw, "d").await["state"],
        "ACTIVE",
        "a test does not change the state"
    );
    assert_eq!(gw.post_api("/v1/destinations/nope/test").await.0, 404);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_runs_the_event_through_the_plugins_again() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "onomondo"
[[destinations]]
name = "sink"
url = "{receiver}/sink"
[[routes]]
source = "onomondo"
plugins = [{ name = "iot-normalize" }]
destinations = ["sink"]
"#;
    let gw = TestGateway::start(config, &rx, &["iot-normalize"]).await;
    let id = gw
        .accept("onomondo", sample_event("onomondo-usage.json"))
        .await;
    gw.settled(&id).await;
    let (status, body) = gw.post_api(&format!("/v1/events/{id}/replay")).await;
    assert_eq!(status, 202, "{body}");
    let e = gw
        .wait_event(&id, |e| {
            e["deliveries"].as_array().unwrap().len() == 2
                && e["deliveries"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|d| d["status"] == "delivered")
        })
        .await;
    assert_eq!(e["routes"].as_array().unwrap().len(), 2);
    assert_eq!(e["routes"][1]["run"], 1);
    assert_eq!(e["event"]["run"], 1);
    let got = rx.wait_for(2).await;
    assert_ne!(
        got[0].header("webhook-id"),
        got[1].header("webhook-id"),
        "a replay is a new delivery"
    );
    assert_eq!(got[0].body, got[1].body);
    let (status, _) = gw.post_api("/v1/events/nope/replay").await;
    assert_eq!(status, 404);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_deliveries_are_listed_page_by_page() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "s"
[[destinations]]
name = "bad"
url = "{receiver}/status/404"
[[destinations]]
name = "good"
url = "{receiver}/ok"
[[destinations]]
name = "refusing"
url = "{receiver}/status/400"
[[routes]]
source = "s"
destinations = ["bad", "good", "refusing"]
"#;
    let gw = TestGateway::start(config, &rx, &[]).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(gw.accept("s", "{}").await);
    }
    for id in &ids {
        gw.settled(id).await;
    }
    let mut seen = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let (status, page) = gw
            .get(&format!(
                "/v1/deliveries?status=failed&destination=bad&limit=2&cursor={cursor}"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        for d in page["items"].as_array().unwrap() {
            assert_eq!(d["status"], "failed");
            assert_eq!(d["destination"], "bad");
            assert_eq!(d["attempts"][0]["status_code"], 404);
            seen.push(d["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        5,
        "five failed deliveries to `bad`, each once: {seen:?}"
    );
    // Of every destination, or of another one.
    let (_, all) = gw.get("/v1/deliveries?status=failed&limit=500").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 10, "{all}");
    let (_, refusing) = (gw.get("/v1/deliveries?status=failed&destination=refusing")).await;
    let refusing = refusing["items"].as_array().unwrap();
    assert_eq!(refusing.len(), 5);
    assert!(
        refusing
            .iter()
            .all(|d| d["attempts"][0]["status_code"] == 400)
    );
    let (_, none) = (gw.get("/v1/deliveries?status=failed&destination=good")).await;
    assert_eq!(none["items"], json!([]));
    for without in [
        "/v1/deliveries?destination=bad",
        "/v1/deliveries?status=delivered&destination=good",
    ] {
        let (status, body) = gw.get(without).await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("`destination`"),
            "{body}"
        );
    }
    let (status, body) = gw.get("/v1/deliveries?status=bogus").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = gw.get("/v1/deliveries?cursor=xyz").await;
    assert_eq!(status, 400, "{body}");
    gw.shutdown().await.unwrap();
}

/// Delivered events go after `retention.delivered`; failed ones are kept unless
/// `retention.failed` is set, then go after that; an event with a pending delivery stays
/// whatever its age. A source with a retention of its own has its events purged by it.
#[tokio::test(flavor = "multi_thread")]
async fn retention_purges_delivered_events_and_keeps_undelivered_ones() {
    let rx = Receiver::start().await;
    let clock = clock();
    let config = r#"
[retention]
delivered = "1d"
failed = "3d"
interval = "50ms"
[[sources]]
name = "ok"
[[sources]]
name = "bad"
[[sources]]
name = "later"
[[sources]]
name = "telemetry"
retention = { delivered = "1h" }
[[destinations]]
name = "good"
url = "{receiver}/ok"
[[destinations]]
name = "broken"
url = "{receiver}/status/400"
[[destinations]]
name = "down"
url = "{receiver}/status/503"
retry = { retry_schedule = ["0s", "30d"], jitter = 0.0, failure_threshold = 100 }
[[routes]]
source = "ok"
destinations = ["good"]
[[routes]]
source = "bad"
destinations = ["broken"]
[[routes]]
source = "later"
destinations = ["down"]
[[routes]]
source = "telemetry"
destinations = ["good"]
"#;
    let gw = TestGateway::start_with_clock(config, &rx, &[], clock.clone()).await;
    let telemetry = gw.accept("telemetry", "{}").await;
    gw.settled(&telemetry).await;
    let delivered = gw.accept("ok", "{}").await;
    let failed = gw.accept("bad", "{}").await;
    let pending = gw.accept("later", "{}").await;
    gw.settled(&delivered).await;
    gw.settled(&failed).await;
    gw.wait_event(&pending, |e| attempts(e) == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        gw.get(&format!("/v1/events/{delivered}")).await.0,
        200,
        "younger than a day: kept"
    );
    let purged = |id: String| {
        let gw = &gw;
        async move {
            for _ in 0..100 {
                if gw.get(&format!("/v1/events/{id}")).await.0 == 404 {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            false
        }
    };

    // A source's own retention: its events go after an hour, the others' stay.
    clock.advance(Duration::from_secs(2 * 3600));
    assert!(
        purged(telemetry).await,
        "the source's own retention applies"
    );
    assert_eq!(gw.get(&format!("/v1/events/{delivered}")).await.0, 200);

    clock.advance(Duration::from_secs(2 * 24 * 3600));
    assert!(
        purged(delivered).await,
        "a delivered event older than the retention age is purged"
    );
    assert_eq!(
        gw.get(&format!("/v1/events/{failed}")).await.0,
        200,
        "a failed event younger than retention.failed is kept"
    );

    clock.advance(Duration::from_secs(2 * 24 * 3600));
    assert!(
        purged(failed.clone()).await,
        "a failed event older than retention.failed is purged"
    );
    assert_eq!(
        gw.get(&format!("/v1/events/{pending}")).await.0,
        200,
        "an event with a pending delivery is kept, whatever its age"
    );
    gw.shutdown().await.unwrap();
}

/// A store that cannot write (triggers in the gateway's own SQLite file stand in for a
/// full disk): ingest answers 503 and stores nothing, and `/readyz` 503 until an event is
/// stored again; an event whose outcome cannot be recorded is not left waiting for the
/// next start, but processed once the store writes again.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_cannot_write_refuses_and_then_resumes() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&one_destination("/in", ""), &rx, &[]).await;
    let db = rusqlite::Connection::open(gw.dir().join("data/switchyard.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let full = |on: &str| {
        format!(
            "CREATE TRIGGER full BEFORE {on} BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    };

    db.execute_batch(&full("INSERT ON events")).unwrap();
    let refused = (gw.client.post(format!("{}/v1/ingest/s", gw.url)))
        .body(r#"{"id":"e1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(
        refused.json::<Value>().await.unwrap(),
        json!({ "error": "the event could not be stored; try again later" })
    );
    // Not ready while it refuses: a load balancer sends senders elsewhere.
    let (status, ready) = gw.get("/readyz").await;
    assert_eq!(status, 503);
    let why = ready["error"].as_str().unwrap();
    assert!(
        why.starts_with("not ready: the store refused the latest event 0 s ago (")
            && why.contains("database or disk is full"),
        "{why}"
    );

    db.execute_batch(&format!(
        "DROP TRIGGER full; {}",
        full("UPDATE OF status ON events WHEN NEW.status = 'processed'")
    ))
    .unwrap();
    let id = gw.accept("s", r#"{"id":"e1"}"#).await;
    assert_eq!(gw.get("/readyz").await, (200, json!({ "ready": true })));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.event(&id).await["status"], "queued");
    assert!(
        rx.requests().is_empty(),
        "nothing is sent before it is recorded"
    );

    db.execute_batch("DROP TRIGGER full").unwrap();
    let event = gw.settled(&id).await;
    assert_eq!(event["deliveries"][0]["status"], "delivered", "{event}");
    assert_eq!(rx.wait_for(1).await.len(), 1);
    gw.shutdown().await.unwrap();
}

/// The config file (in `dir`, with its data dir) of a test that runs the binary: source
/// `s` routed to destination `d` at `rx`, with the API's token `test-token-1234`, and
/// `server` and `destination` lines added to those tables.
fn binary_config(
    dir: &std::path::Path,
    rx: &Receiver,
    server: &str,
    destination: &str,
) -> std::path::PathBuf {
    let config = dir.join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{data}"
{server}
[api]
tokens = ["test-token-1234"]
[delivery]
allowed_networks = ["127.0.0.0/8"]
[[sources]]
name = "s"
[[destinations]]
name = "d"
url = "{url}/d"
{destination}
[[routes]]
source = "s"
destinations = ["d"]
"#,
            data = dir.join("data").display(),
            url = rx.url
        ),
    )
    .unwrap();
    config
}

/// An `LD_PRELOAD` library that makes `fdatasync` and `fsync` fail with EIO while the file
/// named by `FAIL_SYNC_WHILE` exists (a disk failing under the gateway), and not return
/// while the one named by `STALL_SYNC_WHILE` exists (a disk that stalls: a hung network
/// volume). Built with the system's C compiler; `None` (the test skips) without one,
/// except under `CI`.
fn sync_shim(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let source = dir.join("syncshim.c");
    std::fs::write(
        &source,
        r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
static int exists(const char *var) {
    const char *trigger = getenv(var);
    return trigger && access(trigger, F_OK) == 0;
}
static int failing(void) {
    while (exists("STALL_SYNC_WHILE")) usleep(10000);
    return exists("FAIL_SYNC_WHILE");
}
int fdatasync(int fd) {
    if (failing()) { errno = EIO; return -1; }
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}
int fsync(int fd) {
    if (failing()) { errno = EIO; return -1; }
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}
"#,
    )
    .unwrap();
    let lib = dir.join("libsyncshim.so");
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&source)
        .arg("-ldl")
        .status();
    match built {
        Ok(s) if s.success() => Some(lib),
        other => {
            assert!(
                std::env::var_os("CI").is_none(),
                "cannot build the sync shim: {other:?}"
            );
            eprintln!("skipped: no C compiler to build the sync shim ({other:?})");
            None
        }
    }
}

/// A sync of the store that fails (the disk reports EIO): the event waiting for it is
/// refused, nothing is acknowledged after it, and the gateway stops within seconds, even
/// with a slow sender's request in progress, saying why — a later
/// sync that succeeds would not prove the earlier writes reached the disk (PostgreSQL stops
/// for the same reason). The next start resumes what was accepted before the failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_sync_stops_the_gateway_and_the_next_start_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let Some(shim) = sync_shim(dir.path()) else {
        return;
    };
    let trigger = dir.path().join("fail-sync-now");
    let rx = Receiver::start().await;
    let config = binary_config(
        dir.path(),
        &rx,
        "",
        r#"retry = { retry_schedule = ["0s", "1h"], jitter = 0.0, failure_threshold = 1000 }"#,
    );
    let client = reqwest::Client::new();
    let post = |url: String, n: usize| {
        let client = client.clone();
        async move {
            client
                .post(format!("{url}/v1/ingest/s"))
                .body(format!(r#"{{"n":{n}}}"#))
                .send()
                .await
        }
    };

    // Accepted while the disk works; the destination is down, so they stay pending (their
    // retry is an hour away: the test sends them again by hand after the restart).
    rx.fail_with(Some(503));
    let env = [
        ("LD_PRELOAD", shim.as_os_str()),
        ("FAIL_SYNC_WHILE", trigger.as_os_str()),
    ];
    let (mut child, url, log) = crate::util::start_binary_with_env(&config, "info", &env).await;
    let mut accepted = Vec::new();
    for n in 0..3 {
        let resp = post(url.clone(), n).await.unwrap();
        assert_eq!(resp.status(), 202);
        let body: Value = resp.json().await.unwrap();
        accepted.push(body["id"].as_str().unwrap().to_string());
    }
    rx.wait_for(3).await;

    // A sender in the middle of a slow body (it may take `body_read_timeout`, 60 s) does
    // not hold the stop up.
    let mut slow = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut slow,
        b"POST /v1/ingest/s HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"n\":",
    )
    .await
    .unwrap();

    // The disk fails: this event is not acknowledged, and the gateway stops by itself.
    std::fs::write(&trigger, "").unwrap();
    if let Ok(resp) = post(url.clone(), 3).await {
        assert_ne!(resp.status(), 202, "{:?}", resp.text().await);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the gateway stops after a failed sync")
        .unwrap();
    assert!(!status.success(), "{status}");
    assert!(
        log.lock().unwrap().iter().any(|l| l["level"] == "ERROR"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Store sync failed"))),
        "the log says why"
    );

    // The disk works again: the next start delivers what was accepted before the failure.
    std::fs::remove_file(&trigger).unwrap();
    rx.fail_with(None);
    let (_child, url, _log) = crate::util::start_binary_logging(&config, "info").await;
    let api = |method: reqwest::Method, path: String| {
        client
            .request(method, format!("{url}{path}"))
            .bearer_auth("test-token-1234")
            .send()
    };
    let event = |id: String| {
        let get = api(reqwest::Method::GET, format!("/v1/events/{id}"));
        async move { get.await.unwrap().json::<Value>().await.unwrap() }
    };
    for id in &accepted {
        let event = event(id.clone()).await;
        assert_eq!(event["deliveries"][0]["status"], "pending", "{event}");
        let delivery = event["deliveries"][0]["id"].as_str().unwrap();
        let retry = api(
            reqwest::Method::POST,
            format!("/v1/deliveries/{delivery}/retry"),
        )
        .await
        .unwrap();
        assert!(retry.status().is_success(), "{:?}", retry.text().await);
    }
    for id in &accepted {
        let mut delivered = false;
        for _ in 0..200 {
            if event(id.clone()).await["deliveries"][0]["status"] == "delivered" {
                delivered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(delivered, "event {id} was delivered after the restart");
    }
    assert_eq!(post(url, 4).await.unwrap().status(), 202);
}

/// A disk that stalls (a sync that does not return: a hung network volume) while senders
/// give up waiting. Events being stored take room in the queue as waiting ones do, so a
/// sender that goes on posting is refused (`503`) once `queue_capacity` is taken instead
/// of piling events up in memory; and an event whose sender gave up while its commit was
/// under way is queued and delivered once the disk comes back — not left stored but
/// unprocessed until the next start; so is a replay whose caller gave up.
#[tokio::test(flavor = "multi_thread")]
async fn events_whose_senders_gave_up_during_a_stalled_commit_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let Some(shim) = sync_shim(dir.path()) else {
        return;
    };
    let stall = dir.path().join("stall-sync-now");
    let rx = Receiver::start().await;
    let config = binary_config(dir.path(), &rx, "queue_capacity = 3", "");
    let env = [
        ("LD_PRELOAD", shim.as_os_str()),
        ("STALL_SYNC_WHILE", stall.as_os_str()),
    ];
    let (_child, url, _log) = crate::util::start_binary_with_env(&config, "info", &env).await;
    // A sender that waits `wait` for the answer.
    let post = |n: usize, wait: Duration| {
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{url}/v1/ingest/s"))
                .body(format!(r#"{{"n":{n}}}"#))
                .timeout(wait)
                .send()
                .await
        }
    };
    let delivered = |r: &crate::util::Received| r.json()["n"].as_u64().unwrap();
    let resp = post(0, Duration::from_secs(30)).await.unwrap();
    assert_eq!(resp.status(), 202);
    let first: Value = resp.json().await.unwrap();
    assert_eq!(delivered(&rx.wait_for(1).await[0]), 0);
    // (Its attempt's record, after the answer, is written before the disk stalls.)
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The disk stalls: three senders give up, their events stored in part or waiting to be;
    // a fourth is refused, and the gateway says it is not ready (a load balancer sends
    // senders elsewhere).
    std::fs::write(&stall, "").unwrap();
    crate::util::while_the_store_does_not_answer(&url, 1, 3).await;
    let get = |path: &str| reqwest::get(format!("{url}{path}"));

    // The disk comes back: the three are stored and delivered without a restart, and the
    // refused one is not.
    std::fs::remove_file(&stall).unwrap();
    let mut got: Vec<u64> = rx.wait_for(4).await.iter().map(delivered).collect();
    got.sort();
    assert_eq!(got, [0, 1, 2, 3]);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let resp = post(5, Duration::from_secs(30)).await.unwrap();
    assert_eq!(resp.status(), 202, "the room is free again");
    let mut got: Vec<u64> = rx.wait_for(5).await.iter().map(delivered).collect();
    got.sort();
    assert_eq!(got, [0, 1, 2, 3, 5]);
    // Stored, the three count as accepted though nobody heard so; the refused one not.
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    for line in [
        "switchyard_store_unanswered_seconds 0",
        r#"switchyard_events_received_total{source="s",result="accepted"} 5"#,
        r#"switchyard_events_received_total{source="s",result="rejected_unavailable"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }

    // A replay whose caller gives up while the disk stalls goes on too: the event is
    // processed again once the disk is back (cut off after its commit, it would wait,
    // queued in the store only, for the next start).
    std::fs::write(&stall, "").unwrap();
    let replay = reqwest::Client::new()
        .post(format!(
            "{url}/v1/events/{}/replay",
            first["id"].as_str().unwrap()
        ))
        .bearer_auth("test-token-1234")
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(replay.is_err_and(|e| e.is_timeout()));
    std::fs::remove_file(&stall).unwrap();
    assert_eq!(delivered(&rx.wait_for(6).await[5]), 0, "event 0 again");
}

/// A FAILED destination with deliveries held is removed from the config while the gateway
/// is stopped: the next start releases them, and they fail as no longer configured instead
/// of waiting for a restart that can no longer be asked for.
#[tokio::test(flavor = "multi_thread")]
async fn a_destination_removed_while_stopped_fails_what_it_held() {
    let rx = Receiver::start().await;
    let config = one_destination(
        "/d",
        r#"retry = { retry_schedule = ["0s", "1h"], jitter = 0.0, failure_threshold = 1 }"#,
    );
    let gw = TestGateway::start(&config, &rx, &[]).await;
    rx.fail_with(Some(500));
    let first = gw.accept("s", json!({ "n": 1 }).to_string()).await;
    gw.wait_event(&first, |e| attempts(e) == 1).await;
    for _ in 0..200 {
        if destination(&gw, "d").await["state"] == "FAILED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(destination(&gw, "d").await["state"], "FAILED");
    let second = gw.accept("s", json!({ "n": 2 }).to_string()).await;
    gw.wait_event(&second, |e| e["deliveries"][0]["status"] == "pending")
        .await;

    let dir = gw.stop().await;
    rx.fail_with(None);
    let gw = TestGateway::start_in(dir, "[[sources]]\nname = \"s\"\n", &rx)
        .await
        .unwrap();
    for id in [&first, &second] {
        gw.failed_with(id, "destination `d` is no longer configured")
            .await;
    }
    assert_eq!(rx.requests().len(), 1, "nothing more was sent");
    gw.shutdown().await.unwrap();
}

/// `delivery.notify_source`: each change of a destination's state arrives as an event in
/// that source, and its routes take it to an operator like any event.
/// `max_event_age`: a delivery whose event is older than that when its attempt comes (a
/// retry, here) is not sent — it fails, saying why, counted as `expired` — and the
/// destination's state is not touched; a fresh event goes as usual. (The gateway's events
/// are timed by the system's clock, its attempts here by one moved by hand.)
#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_older_than_max_event_age_expires_unsent() {
    let rx = Receiver::start().await;
    let clock = clock();
    let config = r#"
[[sources]]
name = "s"
[[destinations]]
name = "d"
url = "{receiver}/d"
retry = { retry_schedule = ["0s", "2m"], jitter = 0.0, max_event_age = "1m" }
[[routes]]
source = "s"
destinations = ["d"]
"#;
    let gw = TestGateway::start_with_clock(config, &rx, &[], clock.clone()).await;
    // A fresh event goes as usual.
    let fresh = gw.accept("s", json!({ "n": 1 }).to_string()).await;
    gw.wait_event(&fresh, |e| e["deliveries"][0]["status"] == "delivered")
        .await;
    rx.fail_with(Some(503));
    let old = gw.accept("s", json!({ "n": 2 }).to_string()).await;
    gw.wait_event(&old, |e| attempts(e) == 1).await;
    rx.fail_with(None);
    // Its retry comes two minutes on: the event is a minute too old by then.
    clock.advance(Duration::from_secs(121));
    let e = (gw.wait_event(&old, |e| e["deliveries"][0]["status"] == "failed")).await;
    assert_eq!(attempts(&e), 2, "{e}");
    let error = e["deliveries"][0]["attempts"][1]["error"].as_str().unwrap();
    // (About two minutes: the event's time is the ingest's clock, the attempt's the one
    // moved by hand.)
    assert!(
        error.starts_with("expired: the event was received 2m")
            && error.ends_with("ago, more than `max_event_age` (1m); not sent"),
        "{error}"
    );
    assert_eq!(rx.requests().len(), 2, "the retry was not sent");
    let d = destination(&gw, "d").await;
    assert_eq!(
        (&d["state"], &d["consecutive_failures"]),
        (&json!("ACTIVE"), &json!(1)),
        "{d}"
    );
    let metrics = gw.metrics().await;
    for line in [
        r#"switchyard_deliveries_total{destination="d",outcome="expired"} 1"#,
        r#"switchyard_deliveries_total{destination="d",outcome="delivered"} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    gw.shutdown().await.unwrap();
}

/// `restart_after` counts from when the destination became FAILED, as stored: a gateway
/// started again meanwhile tests it when that time comes (at once, if it is past), not a
/// whole `restart_after` after its own start. The API says since when it is FAILED.
#[tokio::test(flavor = "multi_thread")]
async fn restart_after_counts_from_the_failure_across_a_gateway_restart() {
    let rx = Receiver::start().await;
    let clock = clock();
    let config = r#"
restart_after = "5m"
[[sources]]
name = "s"
[[destinations]]
name = "d"
url = "{receiver}/d"
retry = { retry_schedule = ["0s", "1h"], jitter = 0.0, failure_threshold = 1 }
[[routes]]
source = "s"
destinations = ["d"]
"#;
    let gw = TestGateway::start_in_with_clock(
        TestGateway::dir_with_plugins(&[]),
        config,
        &rx,
        clock.clone(),
    )
    .await;
    let d = destination(&gw, "d").await;
    assert!(d.get("state_since").is_none(), "never out of ACTIVE: {d}");
    rx.fail_with(Some(503));
    let failed_at = clock.now_ms();
    let id = gw.accept("s", json!({ "n": 1 }).to_string()).await;
    let d = loop {
        let d = destination(&gw, "d").await;
        if d["state"] == "FAILED" {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(d["state_since"].as_u64(), Some(failed_at), "{d}");
    let dir = gw.stop().await;

    // Six minutes later, a gateway starts on the same store: the test is due already.
    clock.advance(Duration::from_secs(360));
    rx.fail_with(None);
    let gw = TestGateway::start_in_with_clock(dir, config, &rx, clock.clone()).await;
    // (Before a whole `restart_after` from this start, by the hand-moved clock: never.)
    let e = (gw.wait_event(&id, |e| e["deliveries"][0]["status"] == "delivered")).await;
    assert_eq!(attempts(&e), 2, "{e}");
    let d = destination(&gw, "d").await;
    assert_eq!(d["state"], "ACTIVE");
    assert_eq!(d["state_since"].as_u64(), Some(clock.now_ms()), "{d}");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn destination_state_changes_are_posted_to_the_notify_source() {
    let rx = Receiver::start().await;
    let pager = Receiver::start().await;
    let config = format!(
        // (The harness's `[delivery]` table is open: the first line lands in it.)
        r#"
notify_source = "ops"
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
event_types = ["destination.failed", "destination.active"]
[[routes]]
source = "s"
destinations = ["d"]
[[routes]]
source = "ops"
destinations = ["pager"]
"#,
        pager.url
    );
    let gw = TestGateway::start(&config, &rx, &[]).await;
    rx.fail_with(Some(503));
    gw.accept("s", json!({ "n": 1 }).to_string()).await;
    let got = pager.wait_for(1).await;
    let failed = got[0].json();
    assert_eq!(failed["type"], "destination.failed", "{failed}");
    assert_eq!(failed["destination"], "d");
    assert_eq!(failed["state"], "FAILED");
    assert_eq!(failed["consecutive_failures"], 1);
    assert!(
        failed["last_error"].as_str().unwrap().contains("503"),
        "{failed}"
    );

    rx.fail_with(None);
    let (status, body) = gw.post_api("/v1/destinations/d/restart").await;
    assert_eq!(status, 200, "{body}");
    let got = pager.wait_for(2).await;
    let active = got[1].json();
    assert_eq!(
        (&active["type"], &active["destination"], &active["state"]),
        (&json!("destination.active"), &json!("d"), &json!("ACTIVE")),
        "{active}"
    );
    // The notifications are events like any other, listed under their source.
    let (_, page) = gw.get("/v1/events?source=ops").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
    // A restart of a destination that is ACTIVE changes nothing and posts nothing.
    let (status, _) = gw.post_api("/v1/destinations/d/restart").await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pager.requests().len(), 2);
    gw.shutdown().await.unwrap();
}

/// A destination that accepts connections and never answers; counts them.
async fn hanging_destination() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counting = count.clone();
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            open.push(socket);
        }
    });
    (url, count)
}

/// Events are erased on request — one by id, or a page of a list (a SIM's by its ICCID) —
/// with their deliveries and attempts; a pending delivery of an erased event is never sent,
/// and an event with a delivery on its way is left (`409`, or `busy`) until it settles. A
/// bulk erasure must name what it erases.
#[tokio::test(flavor = "multi_thread")]
async fn events_are_erased_on_request_with_everything_made_of_them() {
    let rx = Receiver::start().await;
    let (hang, _) = hanging_destination().await;
    let config = format!(
        r#"
[[sources]]
name = "s"
[[sources]]
name = "slow"
[[destinations]]
name = "d"
url = "{{receiver}}/d"
[[destinations]]
name = "hangs"
url = "{hang}/hangs"
timeout = "8s"
[[routes]]
source = "s"
destinations = ["d"]
[[routes]]
source = "slow"
destinations = ["hangs"]
"#
    );
    let gw = TestGateway::start(&config, &rx, &[]).await;
    let erase = |path: String| {
        let request = gw.client.delete(format!("{}{path}", gw.url));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let a = [
        gw.accept("s", r#"{"iccid":"8945001","n":1}"#).await,
        gw.accept("s", r#"{"iccid":"8945001","n":2}"#).await,
    ];
    let b = gw.accept("s", r#"{"iccid":"8945002","n":3}"#).await;
    for id in a.iter().chain([&b]) {
        gw.wait_event(id, |e| e["deliveries"][0]["status"] == "delivered")
            .await;
    }
    assert_eq!(erase(format!("/v1/events/{b}")).await, 204);
    assert_eq!(gw.get(&format!("/v1/events/{b}")).await.0, 404);
    assert_eq!(erase(format!("/v1/events/{b}")).await, 404);

    let (status, answer) = gw.post_api("/v1/events/erase").await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = gw.post_api("/v1/events/erase?status=processed").await;
    assert_eq!(status, 400, "a status alone names everything: {answer}");
    let (status, answer) = gw
        .post_api("/v1/events/erase?field=iccid&equals=8945001&limit=1")
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["erased"], json!([a[1]]), "newest first: {answer}");
    let cursor = answer["next_cursor"].as_str().unwrap().to_string();
    let (_, answer) = gw
        .post_api(&format!(
            "/v1/events/erase?field=iccid&equals=8945001&limit=1&cursor={cursor}"
        ))
        .await;
    assert_eq!(answer["erased"], json!([a[0]]), "{answer}");
    let (_, left) = gw.get("/v1/events?field=iccid&equals=8945001").await;
    assert_eq!(left["items"], json!([]), "{left}");
    let (_, deliveries) = gw.get("/v1/deliveries?limit=500").await;
    assert_eq!(deliveries["items"], json!([]), "{deliveries}");

    // A held delivery (its destination paused) goes with its event, and is never sent.
    assert_eq!(gw.post_api("/v1/destinations/d/pause").await.0, 200);
    let held = gw.accept("s", r#"{"iccid":"8945003"}"#).await;
    gw.wait_event(&held, |e| e["deliveries"][0]["status"] == "pending")
        .await;
    assert_eq!(erase(format!("/v1/events/{held}")).await, 204);
    assert_eq!(gw.post_api("/v1/destinations/d/restart").await.0, 200);

    // A delivery on its way: the event is left until the attempt ends.
    let slow = gw.accept("slow", r#"{"iccid":"8945004"}"#).await;
    gw.wait_event(&slow, |e| e["status"] == "processed").await;
    assert_eq!(erase(format!("/v1/events/{slow}")).await, 409);
    let (status, answer) = gw.post_api("/v1/events/erase?source=slow").await;
    assert_eq!(
        (status, &answer["busy"], &answer["erased"]),
        (200, &json!([slow]), &json!([])),
        "{answer}"
    );
    assert_eq!(gw.get(&format!("/v1/events/{slow}")).await.0, 200);

    // Three deliveries and a test message reached the receiver, the erased held one not.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = rx.requests();
    assert_eq!(
        got.len(),
        4,
        "{:?}",
        got.iter().map(|r| &r.uri).collect::<Vec<_>>()
    );
    assert!(
        got.iter()
            .all(|r| !String::from_utf8_lossy(&r.body).contains("8945003"))
    );
    gw.shutdown().await.unwrap();
}

/// A destination that hangs takes its share of the delivery permits for a timeout, and
/// more of its deliveries queue for permits behind it. Once it is FAILED, those are held
/// with its other deliveries instead of being sent, each for a timeout more. (Before,
/// every one of them was still sent, a permit-full of timeouts at a time.)
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_destination_gets_nothing_more_from_the_deliveries_queued_for_it() {
    let rx = Receiver::start().await;
    let (hang, connections) = hanging_destination().await;
    let config = format!(
        // (The harness's `[delivery]` table is open: these lines land in it.)
        r#"
timeout = "1s"
concurrency = 4
[[sources]]
name = "s"
[[destinations]]
name = "slow"
url = "{hang}/slow"
retry = {{ failure_threshold = 2 }}
[[destinations]]
name = "fast"
url = "{{receiver}}/fast"
[[routes]]
source = "s"
destinations = ["slow", "fast"]
"#
    );
    let gw = TestGateway::start(&config, &rx, &[]).await;
    const EVENTS: usize = 30;
    for n in 0..EVENTS {
        gw.accept("s", json!({ "n": n }).to_string()).await;
    }
    rx.wait_for(EVENTS).await;
    // FAILED after its first two timeouts (1 s); what waited for it is held, not sent.
    let mut slow = destination(&gw, "slow").await;
    for _ in 0..100 {
        if slow["state"] == "FAILED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        slow = destination(&gw, "slow").await;
    }
    assert_eq!(slow["state"], "FAILED", "{slow}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        sent <= 2 * 2,
        "{sent} of {EVENTS} deliveries were sent to the hanging destination (at most two \
         of its permit-fulls may be on their way before it is FAILED)"
    );
    let slow = destination(&gw, "slow").await;
    assert_eq!(slow["pending"], EVENTS as u64, "held, not lost: {slow}");
    gw.shutdown().await.unwrap();
}

/// A destination that hangs holds at most `delivery.destination_concurrency` of the
/// delivery permits (half of them by default): the others' deliveries go on at once
/// instead of waiting for its timeouts.
#[tokio::test(flavor = "multi_thread")]
async fn a_destination_that_hangs_holds_at_most_its_share_of_the_permits() {
    let why = "the slow destination holds two of the four permits";
    others_go_on_while_destinations_hang(4, &["slow"], 2, why).await;
}

/// However many destinations hang, each holding its `destination_concurrency`, they do not
/// hold every delivery permit: a quarter of `delivery.concurrency` is kept for destinations
/// with few attempts under way, so the others' deliveries go on at once.
#[tokio::test(flavor = "multi_thread")]
async fn destinations_that_hang_leave_permits_for_the_others() {
    let why = "the hanging destinations hold the six permits for any attempt, not the two kept";
    others_go_on_while_destinations_hang(8, &["slow1", "slow2"], 6, why).await;
}

/// Routes 30 events to destinations that hang (`slow`) and to one that answers at once,
/// with `concurrency` delivery permits and a 3 s timeout: all of the latter's deliveries
/// arrive before any timeout, while the hanging ones have had `sent` attempts.
async fn others_go_on_while_destinations_hang(
    concurrency: usize,
    slow: &[&str],
    sent: usize,
    why: &str,
) {
    let rx = Receiver::start().await;
    let (hang, connections) = hanging_destination().await;
    let hanging: String = (slow.iter())
        .map(|name| format!("[[destinations]]\nname = \"{name}\"\nurl = \"{hang}/{name}\"\n"))
        .collect();
    let config = format!(
        // (The harness's `[delivery]` table is open: these lines land in it.)
        r#"
timeout = "3s"
concurrency = {concurrency}
[[sources]]
name = "s"
{hanging}
[[destinations]]
name = "fast"
url = "{{receiver}}/fast"
[[routes]]
source = "s"
destinations = {all:?}
"#,
        all = [slow, &["fast"]].concat(),
    );
    let gw = TestGateway::start(&config, &rx, &[]).await;
    const EVENTS: usize = 30;
    for n in 0..EVENTS {
        gw.accept("s", json!({ "n": n }).to_string()).await;
    }
    // All of the fast destination's deliveries, long before the first timeout (3 s).
    rx.wait_for(EVENTS).await;
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        sent,
        "{why}"
    );
    for name in slow {
        let slow = destination(&gw, name).await;
        assert_eq!(
            (
                slow["state"].as_str(),
                slow["consecutive_failures"].as_u64()
            ),
            (Some("ACTIVE"), Some(0)),
            "no timeout had to pass first: {slow}"
        );
    }
    gw.shutdown().await.unwrap();
}

/// A reload that raises `delivery.concurrency` and `destination_concurrency` lets more
/// attempts start at once, without a restart: a destination that hangs, held to 2 attempts
/// in flight, gets 6 once the reloaded config allows 6 (and no more), the ones waiting in
/// its lane and in the store alike. Alone, it gets all 8 of 8 permits only once none are
/// kept for other destinations (`reserved_concurrency = 0`; 2 by default).
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_changes_how_many_deliveries_are_in_flight() {
    let rx = Receiver::start().await;
    let (hang, connections) = hanging_destination().await;
    let config = |concurrency: usize, per_destination: usize, reserved: &str| {
        format!(
            // (The harness's `[delivery]` table is open: these lines land in it.)
            r#"
timeout = "5s"
concurrency = {concurrency}
destination_concurrency = {per_destination}
{reserved}
[[sources]]
name = "s"
[[destinations]]
name = "slow"
url = "{hang}/slow"
[[routes]]
source = "s"
destinations = ["slow"]
"#
        )
    };
    let in_flight = async |n: usize| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while connections.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} attempts in flight"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // And no more, a while later.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), n);
    };
    let dir = TestGateway::dir_with_plugins(&[]);
    let gw = TestGateway::start_from_file(dir, &config(4, 2, ""), &rx)
        .await
        .unwrap();
    for n in 0..10 {
        gw.accept("s", json!({ "n": n }).to_string()).await;
    }
    in_flight(2).await;

    let file = gw.dir().join("switchyard.toml");
    let reload = async |from: &str, to: &str| {
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replace(from, to)).unwrap();
        gw.reload_applied().await;
    };
    reload(&config(4, 2, ""), &config(16, 6, "")).await;
    in_flight(6).await;
    reload(&config(16, 6, ""), &config(8, 8, "")).await;
    in_flight(6).await;
    let all = config(8, 8, "reserved_concurrency = 0");
    reload(&config(8, 8, ""), &all).await;
    in_flight(8).await;
    gw.shutdown().await.unwrap();
}

/// A destination slower than its traffic holds a bounded lane of attempts (twice
/// `delivery.destination_concurrency`); the rest of its deliveries wait in the store, and
/// claims leave them out while its lane is full, so another destination's retry is sent
/// when due instead of after the slow one's backlog. Every delivery arrives, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_destinations_backlog_waits_in_the_store_and_other_retries_go_ahead() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let slow_arrivals = Arc::new(AtomicUsize::new(0));
    let counted = slow_arrivals.clone();
    let slow_app = axum::Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            // (300 ms: the retry below has ~4.5 s to come before the backlog is through,
            // however slow a shared machine is meanwhile.)
            tokio::time::sleep(Duration::from_millis(300)).await;
            counted.fetch_add(1, SeqCst);
            axum::http::StatusCode::NO_CONTENT
        }
    });
    // The other destination fails its first request; at its retry it notes how many of the
    // slow destination's deliveries had arrived by then.
    let (calls, seen_at_retry) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c, seen, slow_count) = (calls.clone(), seen_at_retry.clone(), slow_arrivals.clone());
    let other_app = axum::Router::new().fallback(move || {
        let (c, seen, slow_count) = (c.clone(), seen.clone(), slow_count.clone());
        async move {
            match c.fetch_add(1, SeqCst) {
                0 => axum::http::StatusCode::SERVICE_UNAVAILABLE,
                _ => {
                    seen.store(slow_count.load(SeqCst), SeqCst);
                    axum::http::StatusCode::NO_CONTENT
                }
            }
        }
    });
    let urls = [
        crate::util::serve(slow_app).await,
        crate::util::serve(other_app).await,
    ];
    let rx = Receiver::start().await;
    // One attempt at a time to the slow destination (a lane of two); leases of 2 + 1 s.
    let config = format!(
        // (The harness's `[delivery]` table is open: these lines land in it.)
        r#"
timeout = "2s"
concurrency = 2
destination_concurrency = 1
[store]
lease = "1s"
[[sources]]
name = "busy"
[[sources]]
name = "other"
[[destinations]]
name = "slow"
url = "{}/slow"
[[destinations]]
name = "flaky"
url = "{}/flaky"
[[routes]]
source = "busy"
destinations = ["slow"]
[[routes]]
source = "other"
destinations = ["flaky"]
"#,
        urls[0], urls[1]
    );
    let gw = TestGateway::start(&config, &rx, &[]).await;
    const EVENTS: usize = 30;
    let mut ids = Vec::new();
    for n in 0..EVENTS {
        ids.push(gw.accept("busy", json!({ "n": n }).to_string()).await);
    }
    // Past the leases of the first deliveries: before lanes, the slow destination's
    // deliveries were all leased at once, and those not sent by now were due again, ahead
    // of any retry due later — which then waited for nearly all of them (~9 s at 300 ms).
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let other = gw.accept("other", "{}").await;
    let e = gw.settled(&other).await;
    assert_eq!(e["deliveries"][0]["status"], "delivered", "{e}");
    assert_eq!(e["deliveries"][0]["attempts"].as_array().unwrap().len(), 2);
    let seen = seen_at_retry.load(SeqCst);
    assert!(
        seen < EVENTS - 3,
        "the retry waited for the slow destination's backlog: {seen} of {EVENTS} had arrived"
    );
    for id in &ids {
        let e = gw.settled(id).await;
        let d = &e["deliveries"][0];
        assert_eq!(d["status"], "delivered", "{e}");
        assert_eq!(d["attempts"].as_array().unwrap().len(), 1, "{e}");
    }
    assert_eq!(slow_arrivals.load(SeqCst), EVENTS, "each sent once");
    gw.shutdown().await.unwrap();
}

/// Deliveries queued behind a slow destination's permit for most of their lease are not
/// started (they might still be on their way when the lease runs out and a claim takes
/// them): they are left to that claim. Every delivery arrives, each once.
#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_that_waited_out_its_lease_is_sent_once_by_the_next_claim() {
    use axum::http::HeaderMap;
    let arrivals: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let app = axum::Router::new()
        .fallback(
            |axum::extract::State(arrivals): axum::extract::State<
                Arc<std::sync::Mutex<Vec<String>>>,
            >,
             headers: HeaderMap| async move {
                let id = headers["webhook-id"].to_str().unwrap().to_string();
                arrivals.lock().unwrap().push(id);
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                axum::http::StatusCode::NO_CONTENT
            },
        )
        .with_state(arrivals.clone());
    let slow = crate::util::serve(app).await;
    let rx = Receiver::start().await;
    // A lease of 1 s + the 2 s timeout; one delivery at a time to the destination.
    let config = format!(
        // (The harness's `[delivery]` table is open: these lines land in it.)
        r#"
timeout = "2s"
destination_concurrency = 1
[store]
lease = "1s"
[[sources]]
name = "s"
[[destinations]]
name = "slow"
url = "{slow}/slow"
[[routes]]
source = "s"
destinations = ["slow"]
"#
    );
    let gw = TestGateway::start(&config, &rx, &[]).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(gw.accept("s", json!({ "n": n }).to_string()).await);
    }
    for id in &ids {
        let e = gw.settled(id).await;
        assert_eq!(e["deliveries"][0]["status"], "delivered", "{e}");
        assert_eq!(
            e["deliveries"][0]["attempts"].as_array().unwrap().len(),
            1,
            "{e}"
        );
    }
    let mut got = arrivals.lock().unwrap().clone();
    got.sort();
    let before = got.len();
    got.dedup();
    assert_eq!((before, got.len()), (3, 3), "each sent once: {got:?}");
    gw.shutdown().await.unwrap();
}

/// A destination's own `timeout` replaces `delivery.timeout` for its attempts: a receiver
/// that answers in 1 s gets its deliveries through a destination allowed 5 s, and through
/// one on the default of 300 ms each attempt times out. The claims' leases cover the
/// longest timeout (with `store.lease = "1s"`, a lease on the default alone would be too
/// short to start any attempt to the patient destination).
#[tokio::test(flavor = "multi_thread")]
async fn a_destinations_timeout_replaces_the_default() {
    let app = axum::Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        axum::http::StatusCode::NO_CONTENT
    });
    let slow = crate::util::serve(app).await;
    let rx = Receiver::start().await;
    let config = format!(
        // (The harness's `[delivery]` table is open: these lines land in it.)
        r#"
timeout = "300ms"
[store]
lease = "1s"
[[sources]]
name = "s"
[[destinations]]
name = "patient"
url = "{slow}/patient"
timeout = "5s"
[[destinations]]
name = "hasty"
url = "{slow}/hasty"
[[routes]]
source = "s"
destinations = ["patient", "hasty"]
"#
    );
    let gw = TestGateway::start(&config, &rx, &[]).await;
    let id = gw.accept("s", "{}").await;
    let event = gw.settled(&id).await;
    let by_name = |name: &str| {
        event["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["destination"] == name)
            .cloned()
            .unwrap()
    };
    let patient = by_name("patient");
    assert_eq!(patient["status"], "delivered", "{event}");
    assert!(
        patient["attempts"][0]["duration_ms"].as_u64().unwrap() >= 900,
        "{event}"
    );
    let hasty = by_name("hasty");
    assert_eq!(hasty["status"], "failed", "{event}");
    let error = hasty["attempts"][0]["error"].as_str().unwrap();
    assert!(error.contains("timed out"), "{error}");

    // Out of bounds: refused, naming the key.
    for bad in ["0s", "16m"] {
        let (status, e) = gw
            .send(
                "POST",
                "/v1/destinations",
                Some(json!({ "name": "x", "url": format!("{slow}/x"), "timeout": bad })),
            )
            .await;
        assert_eq!(status, 400, "{bad}: {e}");
        assert!(e["error"].as_str().unwrap().contains("timeout"), "{e}");
    }
    gw.shutdown().await.unwrap();
}
