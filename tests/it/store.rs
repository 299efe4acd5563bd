//! One conformance suite for the `Store` trait, run against both backends: SQLite (always)
//! and PostgreSQL (a real server started for the test, see `pg.rs`; skipped with a
//! message when PostgreSQL is not installed, never under `CI`).

use std::sync::Arc;

use bytes::Bytes;
use switchyard::event::{Body, Event};
use switchyard::store::{
    Attempt, AttemptNext, ClaimScope, Completion, DeliveryStatus, DestinationHealth,
    DestinationState, EventFilter, EventStatus, FieldIndexes, FieldMatch, Idempotency, Inserted,
    Known, Limit, ManagedObject, NewDelivery, PgStore, PurgeBefore, RouteOutcome, RouteResult,
    RouteResultKind, SourceBounds, SqliteStore, Store,
};

use switchyard::plugin::PluginStates;
use xtask::pg::PgServer;

fn event(id: &str, source: &str, at: u64, body: &str) -> Event {
    Event {
        id: id.into(),
        source: source.into(),
        received_at: at,
        method: "POST".into(),
        path: format!("/v1/ingest/{source}"),
        query: String::new(),
        headers: vec![("content-type".into(), "application/json".into())],
        content_type: Some("application/json".into()),
        body: Body(Bytes::from(body.to_string())),
        metadata: vec![],
        run: 0,
    }
}

fn delivery(id: &str, destination: &str, lease_until: Option<u64>) -> NewDelivery {
    NewDelivery {
        id: id.into(),
        route: 0,
        destination: destination.into(),
        url: format!("http://127.0.0.1:1/{destination}"),
        headers: vec![("webhook-id".into(), id.into())],
        body: Bytes::from_static(b"{\"n\":1}"),
        status: DeliveryStatus::Pending,
        delay_ms: 0,
        lease_until,
    }
}

fn outcome(deliveries: usize) -> RouteOutcome {
    RouteOutcome {
        route: 0,
        name: "r".into(),
        run: 0,
        steps: vec![],
        result: RouteResult::Delivering { deliveries },
    }
}

fn attempt(at: u64, code: u16) -> Attempt {
    Attempt {
        at,
        duration_ms: 3,
        status_code: Some(code),
        error: None,
        response: Some("ok".into()),
    }
}

/// Retention's purge, a batch of one event at a time: the cursor must carry it past the
/// events it keeps.
async fn purge(store: &dyn Store, before: u64) -> usize {
    let (mut purged, mut after) = (0, None);
    loop {
        let (n, next) = store
            .purge_events(PurgeBefore::delivered(before), after, 1)
            .await
            .unwrap();
        purged += n;
        match next {
            Some(next) => after = Some(next),
            None => return purged,
        }
    }
}

fn active(name: &str) -> DestinationState {
    DestinationState {
        name: name.into(),
        state: DestinationHealth::Active,
        consecutive_failures: 0,
        last_error: None,
        epoch: 0,
        since: 0,
    }
}

/// Opens the store under test again on the same data (a restart).
type Reopen = Box<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn Store>> + Send>>
        + Send
        + Sync,
>;

/// The suite: everything the gateway relies on from a store.
async fn conformance(open: Reopen) {
    let store = open().await;

    // Ingest: committed, queued, handed out in order; idempotency within the window.
    let idem = |key: &str| {
        Some(Idempotency {
            key: key.into(),
            window_ms: 1_000,
        })
    };
    let e1 = event("e1", "onomondo", 10_000, r#"{"type":"usage"}"#);
    assert_eq!(
        store.insert_event(e1.clone(), idem("k1")).await.unwrap(),
        Inserted::New
    );
    let dup = event("e1b", "onomondo", 10_500, r#"{"type":"usage"}"#);
    assert_eq!(
        store.insert_event(dup, idem("k1")).await.unwrap(),
        Inserted::Duplicate("e1".into())
    );
    let late = event(
        "e1c",
        "onomondo",
        12_000,
        r#"{"type":"usage","sim":{"iccid":"8945","slot":2,"ratio":1.50,"roaming":true,"apn":null,"tags":["a"],"big":89457387300000000123}}"#,
    );
    assert_eq!(
        store.insert_event(late, idem("k1")).await.unwrap(),
        Inserted::New
    );
    store
        .insert_event(event("e2", "bondio", 13_000, "not json"), None)
        .await
        .unwrap();
    assert_eq!(store.queue_depth(), 3);
    assert_eq!(store.next_event().await.unwrap().id, "e1");

    // An unprocessed event survives a restart and is queued again.
    drop(store);
    let store = open().await;
    let mut resumed = Vec::new();
    while store.queue_depth() > 0 {
        resumed.push(store.next_event().await.unwrap().id);
    }
    assert_eq!(resumed, ["e1", "e1c", "e2"]);

    // Completion: outcomes, deliveries (one leased at insert), processed; a second
    // completion of the run (an instance taken over while it was slow) stores nothing,
    // though it planned another delivery (its config differs, as in a rolling deploy).
    let completion = store
        .complete_event(
            &e1,
            vec![outcome(2)],
            vec![
                delivery("d1", "fleet", Some(60_000)),
                delivery("d2", "archive", None),
            ],
            20_000,
        )
        .await
        .unwrap();
    assert_eq!(
        completion,
        Completion::Recorded {
            leased: vec!["d1".into()]
        }
    );
    let other_route = RouteOutcome {
        route: 1,
        name: "other".into(),
        ..outcome(1)
    };
    let again = store
        .complete_event(
            &e1,
            vec![outcome(2), other_route],
            vec![
                delivery("d1", "fleet", Some(60_000)),
                delivery("d1-elsewhere", "fleet", Some(60_000)),
            ],
            20_000,
        )
        .await
        .unwrap();
    assert_eq!(again, Completion::Stale);
    let record = store.get_event("e1").await.unwrap().unwrap();
    assert_eq!(record.status, EventStatus::Processed);
    assert_eq!(record.routes.len(), 1);
    assert_eq!(record.routes[0]["name"], "r");
    let mut ids: Vec<&str> = record.deliveries.iter().map(|d| d.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["d1", "d2"]);
    assert!(store.get_event("nope").await.unwrap().is_none());

    // A dispatcher whose config lacks a destination (another instance's has it, as during
    // a rolling deploy) leaves its deliveries to the others until they have been due for
    // `orphaned_after_ms`.
    let elsewhere = ClaimScope {
        known: Some(Known::new(["fleet".to_string()])),
        orphaned_after_ms: 5_000,
        ..ClaimScope::any()
    };
    let here = ClaimScope {
        known: Some(Known::new(["archive".to_string()])),
        orphaned_after_ms: 5_000,
        ..ClaimScope::any()
    };
    assert!(
        store
            .claim_due(20_000, 30_000, 10, &elsewhere)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.next_due_at(20_000, &elsewhere).await.unwrap(),
        Some(25_000)
    );
    assert_eq!(
        store.next_due_at(20_000, &here).await.unwrap(),
        Some(20_000)
    );

    // A destination whose lane is full is left out of claims and of the next due time.
    let archive_busy = ClaimScope {
        room: [("archive".to_string(), 0)].into(),
        ..ClaimScope::any()
    };
    assert!(
        store
            .claim_due(20_000, 30_000, 10, &archive_busy)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.next_due_at(20_000, &archive_busy).await.unwrap(),
        None
    );

    // Claims: the leased delivery is not claimable; the other is, once; after its lease
    // runs out, again (here by the dispatcher that does not know its destination: it has
    // been due long enough to count as orphaned).
    let due = store
        .claim_due(20_000, 30_000, 10, &ClaimScope::any())
        .await
        .unwrap();
    assert_eq!(
        due.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["d2"]
    );
    assert_eq!(due[0].body.as_ref(), b"{\"n\":1}");
    assert_eq!(due[0].headers[0].1, "d2");
    assert_eq!(
        due[0].received_at, 10_000,
        "the event's, for delivery latency"
    );
    assert!(
        store
            .claim_due(21_000, 31_000, 10, &ClaimScope::any())
            .await
            .unwrap()
            .is_empty()
    );
    let retaken = store
        .claim_due(30_001, 40_000, 10, &elsewhere)
        .await
        .unwrap();
    assert_eq!(retaken.len(), 1, "an expired lease is claimed again");
    assert_eq!(
        store.next_due_at(30_001, &ClaimScope::any()).await.unwrap(),
        None,
        "deliveries leased now are in flight (a lease that runs out is found by a claim)"
    );

    // Attempts: a retry, then delivered; the destination state is stored with it.
    let mut archive = active("archive");
    archive.consecutive_failures = 1;
    archive.last_error = Some("503".into());
    store
        .record_attempt("d2", 0, attempt(30_002, 503), AttemptNext::RetryAt(35_000))
        .await
        .unwrap();
    store.record_destination_state(&archive).await.unwrap();
    assert!(
        store
            .claim_due(34_999, 50_000, 10, &ClaimScope::any())
            .await
            .unwrap()
            .is_empty()
    );
    let due = store
        .claim_due(35_000, 50_000, 10, &ClaimScope::any())
        .await
        .unwrap();
    assert_eq!((due.len(), due[0].attempts), (1, 1));
    store
        .record_attempt("d2", 1, attempt(35_001, 200), AttemptNext::Delivered)
        .await
        .unwrap();
    store
        .record_destination_state(&active("archive"))
        .await
        .unwrap();
    let d2 = store.get_event("e1").await.unwrap().unwrap().deliveries;
    let d2 = d2.iter().find(|d| d.id == "d2").unwrap();
    assert_eq!(d2.status, DeliveryStatus::Delivered);
    assert_eq!(d2.attempts.len(), 2);
    assert_eq!(d2.attempts[0].status_code, Some(503));
    // Recording the same attempt again (a try whose answer was lost, then retried) writes
    // nothing: the delivery no longer has the count it was claimed with.
    assert!(
        !store
            .record_attempt("d2", 1, attempt(35_001, 200), AttemptNext::Delivered)
            .await
            .unwrap()
    );
    assert!(
        !store
            .record_attempt("nope", 0, attempt(35_001, 200), AttemptNext::Delivered)
            .await
            .unwrap()
    );
    let again = store.get_event("e1").await.unwrap().unwrap().deliveries;
    assert_eq!(
        again.iter().find(|d| d.id == "d2").unwrap().attempts.len(),
        2
    );

    // A FAILED destination's deliveries wait; setting it ACTIVE makes them due now.
    store
        .record_attempt("d1", 0, attempt(36_000, 500), AttemptNext::Hold)
        .await
        .unwrap();
    store
        .record_destination_state(&DestinationState {
            name: "fleet".into(),
            state: DestinationHealth::Failed,
            consecutive_failures: 5,
            last_error: Some("500".into()),
            epoch: 0,
            since: 36_000,
        })
        .await
        .unwrap();
    assert!(
        store
            .claim_due(99_000, 100_000, 10, &ClaimScope::any())
            .await
            .unwrap()
            .is_empty()
    );
    let states = store.destination_states().await.unwrap();
    let fleet = states.iter().find(|s| s.name == "fleet").unwrap();
    assert_eq!(
        (fleet.state, fleet.since),
        (DestinationHealth::Failed, 36_000),
        "FAILED since the attempt that made it so"
    );
    let counts = store.delivery_counts().await.unwrap();
    assert_eq!(
        counts
            .iter()
            .find(|c| c.destination == "fleet")
            .unwrap()
            .pending,
        1
    );
    let restarted = DestinationState {
        since: 99_000,
        ..active("fleet")
    };
    let epoch = store
        .set_destination_state(&restarted, 99_000)
        .await
        .unwrap();
    assert_eq!(epoch, 1, "a restart begins a new epoch");
    assert_eq!(
        store
            .claim_due(99_000, 100_000, 10, &ClaimScope::any())
            .await
            .unwrap()
            .len(),
        1
    );
    // A state decided before the restart (an attempt in flight, or another instance that
    // has not seen the restart yet) does not overwrite it; the attempt is still recorded.
    let stale = DestinationState {
        name: "fleet".into(),
        state: DestinationHealth::Failed,
        consecutive_failures: 6,
        last_error: Some("500".into()),
        epoch: 0,
        since: 0,
    };
    store
        .record_attempt("d1", 1, attempt(99_001, 500), AttemptNext::Failed)
        .await
        .unwrap();
    store.record_destination_state(&stale).await.unwrap();
    let fleet = |states: Vec<DestinationState>| states.into_iter().find(|s| s.name == "fleet");
    let now = fleet(store.destination_states().await.unwrap()).unwrap();
    assert_eq!(
        (now.state, now.consecutive_failures, now.epoch, now.since),
        (DestinationHealth::Active, 0, 1, 99_000)
    );
    let current = DestinationState {
        epoch: 1,
        consecutive_failures: 1,
        ..active("fleet")
    };
    store
        .record_attempt("d1", 2, attempt(99_002, 500), AttemptNext::Failed)
        .await
        .unwrap();
    store.record_destination_state(&current).await.unwrap();
    let now = fleet(store.destination_states().await.unwrap()).unwrap();
    assert_eq!(
        now.consecutive_failures, 1,
        "a state of the current epoch is written"
    );

    // Lists: deliveries by status with a cursor; events with filters; retry by hand.
    let failed = store
        .list_deliveries(Some(DeliveryStatus::Failed), None, None, 10)
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].1.id, "d1");
    let all = store.list_deliveries(None, None, None, 1).await.unwrap();
    let next = store
        .list_deliveries(None, None, Some(all[0].0), 10)
        .await
        .unwrap();
    assert_eq!(all.len() + next.len(), 2);
    let events = store
        .list_events(EventFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(
        events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e2", "e1c", "e1"]
    );
    let e1_summary = events.iter().find(|e| e.id == "e1").unwrap();
    assert_eq!((e1_summary.delivered, e1_summary.failed), (1, 1));
    assert_eq!(e1_summary.event_type.as_deref(), Some("usage"));
    assert_eq!(events[0].event_type, None, "a non-JSON body has no type");
    let usage = EventFilter {
        event_type: Some("usage".into()),
        source: Some("onomondo".into()),
        ..Default::default()
    };
    assert_eq!(
        store.list_events(usage.clone(), None, 1).await.unwrap()[0].id,
        "e1c"
    );
    let after = store
        .list_events(usage, Some((12_000, "e1c".into())), 10)
        .await
        .unwrap();
    assert_eq!(
        after.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e1"]
    );
    // A type pattern: `*` stands for any characters, nothing else is a wildcard, and case
    // counts (SQLite's GLOB and PostgreSQL's LIKE alike).
    for (pattern, listed) in [
        ("us*", &["e1c", "e1"][..]),
        ("*ag*", &["e1c", "e1"]),
        ("*", &["e1c", "e1"]),
        ("usage*", &["e1c", "e1"]),
        ("Usage", &[]),
        ("u?age", &[]),
        ("us_ge", &[]),
        ("usa%", &[]),
        ("[u]sage", &[]),
        ("usage\\", &[]),
    ] {
        let filter = EventFilter {
            event_type: Some(pattern.into()),
            ..Default::default()
        };
        let page = store.list_events(filter, None, 10).await.unwrap();
        let ids: Vec<&str> = page.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, listed, "{pattern}");
    }
    // A field of the body, compared by its JSON type: a string by its text, a number by
    // its value, `true`/`false`/`null` by name, an array never; a body without it, or not
    // JSON ("e2"), is not listed.
    let by_field = |field: &str, equals: &str| {
        let filter = EventFilter {
            field: Some(FieldMatch::parse(field, equals.into()).unwrap()),
            ..Default::default()
        };
        let store = store.clone();
        async move {
            let page = store.list_events(filter, None, 10).await.unwrap();
            page.into_iter().map(|e| e.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(by_field("sim.iccid", "8945").await, ["e1c"]);
    assert_eq!(by_field("sim.slot", "2").await, ["e1c"]);
    for ratio in ["1.5", "1.50", "15e-1"] {
        assert_eq!(by_field("sim.ratio", ratio).await, ["e1c"], "{ratio}");
    }
    assert!(by_field("sim.ratio", "1.6").await.is_empty());
    assert_eq!(by_field("sim.slot", "2.0").await, ["e1c"]);
    assert_eq!(by_field("sim.big", "89457387300000000123").await, ["e1c"]);
    assert!(by_field("sim.iccid", "8945.0").await.is_empty(), "text");
    assert_eq!(by_field("sim.roaming", "true").await, ["e1c"]);
    assert!(by_field("sim.roaming", "1").await.is_empty());
    assert_eq!(by_field("sim.apn", "null").await, ["e1c"]);
    assert!(by_field("sim.tags", r#"["a"]"#).await.is_empty());
    assert_eq!(by_field("type", "usage").await, ["e1c", "e1"]);
    assert!(by_field("sim.iccid", "894").await.is_empty());
    assert!(
        by_field("iccid", "8945").await.is_empty(),
        "only at its path"
    );
    assert!(store.retry_delivery("d1", 100_000).await.unwrap());
    assert!(
        !store.retry_delivery("d2", 100_000).await.unwrap(),
        "delivered"
    );
    let claimed = store
        .claim_due(100_000, 110_000, 10, &ClaimScope::any())
        .await
        .unwrap();
    assert_eq!(claimed[0].id, "d1");

    // Put off by a rate limit: its lease is released, it is due at its slot, and no
    // attempt is counted.
    assert!(store.defer_delivery("d1", 105_000).await.unwrap());
    let any = ClaimScope::any();
    assert!(
        store
            .claim_due(104_999, 110_000, 10, &any)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.next_due_at(100_001, &any).await.unwrap(),
        Some(105_000)
    );
    let again = store.claim_due(105_000, 110_000, 10, &any).await.unwrap();
    assert_eq!(again[0].id, "d1");
    assert_eq!(again[0].attempts, claimed[0].attempts);
    assert!(
        !store.defer_delivery("d2", 1).await.unwrap(),
        "a delivered delivery is not put off"
    );
    let stats = store.minute_stats(0).await.unwrap();
    assert_eq!(stats.iter().map(|m| m.received).sum::<u64>(), 3);
    assert_eq!(stats.iter().map(|m| m.delivered).sum::<u64>(), 1);

    // Replay: the event is queued again as a new run.
    assert!(store.replay("e1").await.unwrap());
    let replayed = store.next_event().await.unwrap();
    assert_eq!((replayed.id.as_str(), replayed.run), ("e1", 1));
    assert!(!store.replay("nope").await.unwrap());

    // Managed objects.
    let object = |name: &str, body: &str| ManagedObject {
        kind: "destination".into(),
        name: name.into(),
        body: body.into(),
    };
    store.put_managed(object("a", "{}"), 1).await.unwrap();
    store
        .put_managed(object("a", r#"{"v":2}"#), 2)
        .await
        .unwrap();
    store.put_managed(object("b", "{}"), 2).await.unwrap();
    store.delete_managed("destination", "b").await.unwrap();
    assert_eq!(
        store.managed_objects().await.unwrap(),
        [object("a", r#"{"v":2}"#)]
    );

    // Retention: processed events whose deliveries all went out are purged; others stay.
    let e3 = event("e3", "bondio", 14_000, "{}");
    store.insert_event(e3.clone(), None).await.unwrap();
    store
        .complete_event(&e3, vec![outcome(0)], vec![], 14_001)
        .await
        .unwrap();
    assert_eq!(purge(store.as_ref(), 15_000).await, 1);
    assert!(store.get_event("e3").await.unwrap().is_none());
    assert!(
        store.get_event("e1").await.unwrap().is_some(),
        "e1 has a pending delivery"
    );
    let (pending, oldest) = store.backlog().await.unwrap();
    assert_eq!((pending, oldest), (1, Some(20_000)));

    // A dead-lettered event (a route failed, so no deliveries) is listed as such, found by
    // `route_result`, and kept by retention until a replay's run no longer fails.
    let e4 = event("e4", "bondio", 14_500, "{}");
    store.insert_event(e4.clone(), None).await.unwrap();
    let failed = |run| RouteOutcome {
        run,
        result: RouteResult::Failed {
            error: "plugin `p` failed".into(),
        },
        ..outcome(0)
    };
    store
        .complete_event(
            &e4,
            vec![
                failed(0),
                RouteOutcome {
                    route: 1,
                    ..outcome(0)
                },
            ],
            vec![],
            14_501,
        )
        .await
        .unwrap();
    let dead_letters = EventFilter {
        route_result: Some(RouteResultKind::Failed),
        ..Default::default()
    };
    let listed = store
        .list_events(dead_letters.clone(), None, 10)
        .await
        .unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|e| (e.id.as_str(), e.failed_routes))
            .collect::<Vec<_>>(),
        [("e4", 1)]
    );
    let delivering = EventFilter {
        route_result: Some(RouteResultKind::Delivering),
        until: Some(14_600),
        since: Some(14_000),
        ..Default::default()
    };
    assert_eq!(
        store.list_events(delivering, None, 10).await.unwrap().len(),
        1,
        "e4's other route"
    );
    assert_eq!(purge(store.as_ref(), 15_000).await, 0);
    assert!(
        store.get_event("e4").await.unwrap().is_some(),
        "dead-lettered"
    );
    assert!(store.replay("e4").await.unwrap());
    // (e3 and e4's first run were completed without being taken from the queue.)
    let mut queued = Vec::new();
    while store.queue_depth() > 0 {
        queued.push(store.next_event().await.unwrap());
    }
    let e4 = queued.pop().unwrap();
    assert_eq!((e4.id.as_str(), e4.run), ("e4", 1));
    store
        .complete_event(
            &e4,
            vec![RouteOutcome {
                run: 1,
                ..outcome(0)
            }],
            vec![],
            14_502,
        )
        .await
        .unwrap();
    assert!(
        store
            .list_events(dead_letters, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(purge(store.as_ref(), 15_000).await, 1);
    assert!(store.get_event("e4").await.unwrap().is_none());

    // A delivery that failed is superseded by a replay whose run delivers: each delivery
    // records its run, and retention then lets the event go.
    let e5 = event("e5", "bondio", 14_600, "{}");
    store.insert_event(e5.clone(), None).await.unwrap();
    store
        .complete_event(
            &e5,
            vec![outcome(1)],
            vec![delivery("d7", "fleet", Some(1))],
            14_601,
        )
        .await
        .unwrap();
    store
        .record_attempt("d7", 0, attempt(14_602, 400), AttemptNext::Failed)
        .await
        .unwrap();
    assert_eq!(purge(store.as_ref(), 15_000).await, 0, "e5 failed");
    assert!(store.replay("e5").await.unwrap());
    while store.queue_depth() > 0 {
        queued.push(store.next_event().await.unwrap());
    }
    let e5 = queued.pop().unwrap();
    assert_eq!((e5.id.as_str(), e5.run), ("e5", 1));
    let rerun = RouteOutcome {
        run: 1,
        ..outcome(1)
    };
    store
        .complete_event(
            &e5,
            vec![rerun],
            vec![delivery("d8", "fleet", Some(1))],
            14_603,
        )
        .await
        .unwrap();
    assert_eq!(purge(store.as_ref(), 15_000).await, 0, "d8 pending");
    store
        .record_attempt("d8", 0, attempt(14_604, 200), AttemptNext::Delivered)
        .await
        .unwrap();
    let record = store.get_event("e5").await.unwrap().unwrap();
    assert_eq!(
        record
            .deliveries
            .iter()
            .map(|d| (d.id.as_str(), d.run, d.status))
            .collect::<Vec<_>>(),
        [
            ("d7", 0, DeliveryStatus::Failed),
            ("d8", 1, DeliveryStatus::Delivered)
        ]
    );
    assert_eq!(purge(store.as_ref(), 15_000).await, 1);
    assert!(store.get_event("e5").await.unwrap().is_none());

    // A delivery whose body is its event's is claimed with that body (the store keeps one
    // copy); one with a body of its own, even an empty one, with its own.
    let e2 = event("e2", "bondio", 13_000, "not json");
    let same = NewDelivery {
        body: e2.body.0.clone(),
        ..delivery("d5", "archive", None)
    };
    let empty = NewDelivery {
        body: Bytes::new(),
        ..delivery("d6", "archive", None)
    };
    // And one whose first attempt waits (its schedule's first entry) is due only then.
    let delayed = NewDelivery {
        delay_ms: 5_000,
        ..delivery("d5-later", "archive", None)
    };
    store
        .complete_event(&e2, vec![outcome(3)], vec![same, empty, delayed], 200_000)
        .await
        .unwrap();
    let mut due = store
        .claim_due(200_000, 210_000, 10, &ClaimScope::any())
        .await
        .unwrap();
    assert!(due.iter().all(|d| d.id != "d5-later"), "not due yet");
    let later = store
        .claim_due(205_000, 210_000, 10, &ClaimScope::any())
        .await
        .unwrap();
    assert_eq!(
        later.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["d5-later"]
    );
    due.retain(|d| d.id == "d5" || d.id == "d6");
    due.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        due.iter()
            .map(|d| (d.id.as_str(), d.body.as_ref()))
            .collect::<Vec<_>>(),
        [("d5", &b"not json"[..]), ("d6", &b""[..])]
    );

    // Reads are snapshots: an event or a delivery listing read while attempts are being
    // recorded shows each delivery with its attempts and the state they left it in, never
    // the attempt without the state (the retry-schedule test once saw exactly that).
    const ATTEMPTS: u64 = 150;
    let retry_at = |n: usize| AttemptNext::RetryAt(300_000 + n as u64);
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for n in 1..=ATTEMPTS as usize {
                store
                    .record_attempt(
                        "d6",
                        n as u32 - 1,
                        attempt(210_000 + n as u64, 503),
                        retry_at(n),
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let consistent = |d: &switchyard::store::DeliveryRecord| {
        let n = d.attempts.len();
        assert!(
            n == 0 || d.next_attempt_at == Some(300_000 + n as u64),
            "{n} attempts with next_attempt_at {:?}",
            d.next_attempt_at
        );
        n
    };
    let mut seen = 0;
    while seen < ATTEMPTS as usize {
        let record = store.get_event("e2").await.unwrap().unwrap();
        seen = consistent(record.deliveries.iter().find(|d| d.id == "d6").unwrap());
        for (_, d) in store
            .list_deliveries(Some(DeliveryStatus::Pending), None, None, 100)
            .await
            .unwrap()
        {
            if d.id == "d6" {
                consistent(&d);
            }
        }
    }
    writer.await.unwrap();

    // A destination that is not ACTIVE holds its deliveries, those pending when it failed
    // and those planned after: no due time, so neither claims nor `next_due_at` walk past
    // them (a long outage leaves many); a restart makes them all due.
    let e6 = event("e6", "bondio", 400_000, "{}");
    store.insert_event(e6.clone(), None).await.unwrap();
    store
        .complete_event(
            &e6,
            vec![outcome(1)],
            vec![delivery("h1", "down", None)],
            400_000,
        )
        .await
        .unwrap();
    let down = DestinationState {
        name: "down".into(),
        state: DestinationHealth::Failed,
        consecutive_failures: 5,
        last_error: Some("500".into()),
        epoch: 0,
        since: 0,
    };
    store.record_destination_state(&down).await.unwrap();
    let e7 = event("e7", "bondio", 400_100, "{}");
    store.insert_event(e7.clone(), None).await.unwrap();
    store
        .complete_event(
            &e7,
            vec![outcome(1)],
            vec![delivery("h2", "down", None)],
            400_100,
        )
        .await
        .unwrap();
    for e in ["e6", "e7"] {
        let record = store.get_event(e).await.unwrap().unwrap();
        assert_eq!(record.deliveries[0].status, DeliveryStatus::Pending);
        assert_eq!(record.deliveries[0].next_attempt_at, None, "{e} is held");
    }
    let due_after = |at: u64| {
        let store = store.clone();
        async move {
            let ids: Vec<String> = store
                .claim_due(at, at + 10_000, 100, &ClaimScope::any())
                .await
                .unwrap()
                .into_iter()
                .map(|d| d.id)
                .filter(|id| id.starts_with('h'))
                .collect();
            ids
        }
    };
    assert!(due_after(500_000).await.is_empty());
    assert!(store.retry_delivery("h1", 500_000).await.unwrap());
    let record = store.get_event("e6").await.unwrap().unwrap();
    assert_eq!(
        record.deliveries[0].next_attempt_at, None,
        "retried by hand while the destination is down: still held"
    );
    let next = store
        .next_due_at(500_000, &ClaimScope::any())
        .await
        .unwrap();
    assert!(next.is_none_or(|at| at >= 510_000), "{next:?}");
    store
        .set_destination_state(&active("down"), 600_000)
        .await
        .unwrap();
    let mut released = due_after(600_000).await;
    released.sort();
    assert_eq!(released, ["h1", "h2"]);

    // A recovery after an outage: the failed deliveries to one destination planned in a
    // window are due again, in order, a batch at a time, each walked once; the others stay
    // failed; while the destination is down they are held instead.
    for (i, dest, at) in [
        (1, "sink", 700_000),
        (2, "other", 700_100),
        (3, "sink", 700_200),
        (4, "sink", 700_300),
        (5, "sink", 800_000),
    ] {
        let e = event(&format!("re{i}"), "s", at, "{}");
        store.insert_event(e.clone(), None).await.unwrap();
        let id = format!("rd{i}");
        let planned = vec![delivery(&id, dest, Some(at + 1))];
        store
            .complete_event(&e, vec![outcome(1)], planned, at)
            .await
            .unwrap();
        store
            .record_attempt(&id, 0, attempt(at + 1, 500), AttemptNext::Failed)
            .await
            .unwrap();
    }
    let status = |id: &'static str| {
        let store = store.clone();
        async move {
            let e = store
                .get_event(&id.replace("rd", "re"))
                .await
                .unwrap()
                .unwrap();
            (e.deliveries[0].status, e.deliveries[0].next_attempt_at)
        }
    };
    // Batches of two looked at: the walk passes the failed deliveries of the suite so far
    // until the batch with rd1 (rd2, beside it, is another destination's).
    let (mut n, mut after) = (0, 0);
    while n == 0 {
        let (changed, next) = store
            .recover_deliveries("sink", 700_000, 800_000, after, 900_000, 2)
            .await
            .unwrap();
        (n, after) = (changed, next.expect("more failed deliveries to look at"));
    }
    assert_eq!(n, 1, "rd1");
    assert_eq!(
        status("rd1").await,
        (DeliveryStatus::Pending, Some(900_000))
    );
    for later in ["rd3", "rd4"] {
        assert_eq!(
            status(later).await.0,
            DeliveryStatus::Failed,
            "{later}: not yet"
        );
    }
    // rd1 fails again meanwhile: the walk goes on after it, and does not take it twice.
    let claimed = store
        .claim_due(900_000, 910_000, 10, &ClaimScope::any())
        .await
        .unwrap();
    assert!(claimed.iter().any(|d| d.id == "rd1"), "{claimed:?}");
    store
        .record_attempt("rd1", 1, attempt(900_001, 500), AttemptNext::Failed)
        .await
        .unwrap();
    let sink_down = DestinationState {
        name: "sink".into(),
        ..down.clone()
    };
    store.record_destination_state(&sink_down).await.unwrap();
    let mut n = 0;
    loop {
        let (changed, next) = store
            .recover_deliveries("sink", 700_000, 800_000, after, 900_002, 2)
            .await
            .unwrap();
        n += changed;
        match next {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(n, 2, "rd3 and rd4");
    for held in ["rd3", "rd4"] {
        assert_eq!(
            status(held).await,
            (DeliveryStatus::Pending, None),
            "{held} is held: the destination is down"
        );
    }
    assert_eq!(status("rd1").await.0, DeliveryStatus::Failed, "walked once");
    assert_eq!(
        status("rd2").await.0,
        DeliveryStatus::Failed,
        "another destination"
    );
    assert_eq!(
        status("rd5").await.0,
        DeliveryStatus::Failed,
        "outside the window"
    );

    // With an age for failed events, retention takes them too — never one with a pending
    // delivery, nor one younger than that age.
    let failed_too = PurgeBefore {
        delivered: 0,
        failed: Some(750_000),
        ..PurgeBefore::default()
    };
    let (mut after, mut total) = (None, 0);
    loop {
        let (n, next) = (store.purge_events(failed_too.clone(), after, 2))
            .await
            .unwrap();
        total += n;
        if next.is_none() {
            break;
        }
        after = next;
    }
    assert!(total >= 2, "{total}");
    // re3 and re4 were made due again above (re3 is still leased): pending.
    for (id, kept) in [
        ("re1", false),
        ("re2", false),
        ("re3", true),
        ("re4", true),
        ("re5", true),
    ] {
        let found = store.get_event(id).await.unwrap().is_some();
        assert_eq!(found, kept, "{id}");
    }

    // Idempotency keys past the window are purged, oldest first, a batch at a time; a
    // purged key is new again, a kept one still answers with its event.
    let keyed = |id: &str, at: u64, key: &str| {
        let store = store.clone();
        let (e, key) = (event(id, "onomondo", at, "{}"), key.to_string());
        async move {
            let idem = Idempotency {
                key,
                window_ms: 100_000,
            };
            store.insert_event(e, Some(idem)).await.unwrap()
        }
    };
    assert_eq!(keyed("k8a", 950_000, "k8").await, Inserted::New);
    assert_eq!(keyed("k9a", 960_000, "k9").await, Inserted::New);
    // k1 (from the start) and k8, one a call.
    for left in [1, 1, 0] {
        assert_eq!(store.purge_idempotency(955_000, 1).await.unwrap(), left);
    }
    assert_eq!(keyed("k8b", 970_000, "k8").await, Inserted::New);
    assert_eq!(
        keyed("k9b", 970_000, "k9").await,
        Inserted::Duplicate("k9a".into())
    );

    store.close();
    assert!(matches!(
        store.insert_event(event("late", "s", 1, "{}"), None).await,
        Err(switchyard::store::StoreError::Closed)
    ));
}

/// An event listing whose filter matches nothing of a large store (the type is read from
/// each body) is stopped at the store's listing budget, and the store serves on.
async fn listing_stops_at_its_budget(
    store: Arc<dyn Store>,
    events: usize,
    budget: std::time::Duration,
) {
    let inserts = (0..events).map(|n| {
        let store = store.clone();
        tokio::spawn(async move {
            let body = format!(r#"{{"type":"usage","n":{n}}}"#);
            let e = event(&format!("e{n:06}"), "s", 1_000 + n as u64, &body);
            store.insert_event(e, None).await.unwrap()
        })
    });
    for insert in futures_util::future::join_all(inserts).await {
        assert_eq!(insert.unwrap(), Inserted::New);
    }
    let rare = EventFilter {
        event_type: Some("no-such-type".into()),
        ..EventFilter::default()
    };
    let stopped = store.list_events(rare, None, 50).await;
    assert!(
        matches!(stopped, Err(switchyard::store::StoreError::TooSlow(d)) if d == budget),
        "{:?}",
        stopped.map(|page| page.len())
    );
    assert!(store.get_event("e000007").await.unwrap().is_some());
}

/// A list by a body field gives the same events whether the field is indexed
/// (`store.indexed_fields`) or not: its string and the number, `true`, `false` or `null` it
/// may also be, newest first across them, page by page, with the other filters; indexes
/// are made once and dropped when their field is no longer listed.
async fn listing_by_an_indexed_field(store: Arc<dyn Store>) {
    let bodies = [
        ("i1", "a", r#"{"sim":{"iccid":"8945"},"slot":2}"#),
        ("i2", "b", r#"{"sim":{"iccid":8945},"slot":"2"}"#),
        (
            "i3",
            "a",
            r#"{"sim":{"iccid":"8945"},"slot":2.0,"on":true}"#,
        ),
        ("i4", "a", "not JSON"),
        (
            "i5",
            "a",
            r#"{"sim":{"iccid":"89450"},"on":false,"apn":null,"slot":1}"#,
        ),
        ("i6", "b", r#"[{"sim":{"iccid":"8945"}}]"#),
        ("i7", "b", r#"{"sim":"8945","on":1,"apn":"null"}"#),
    ];
    for (n, (id, source, body)) in bodies.iter().enumerate() {
        let e = event(id, source, 1_000 * (n as u64 + 1), body);
        assert_eq!(store.insert_event(e, None).await.unwrap(), Inserted::New);
    }
    // Every kind of value a field `v` may hold, against every kind of `equals`: what each
    // list finds indexed must be what it finds reading every body.
    let values = [
        r#""1""#,
        r#""1.0""#,
        r#""true""#,
        r#""null""#,
        r#""""#,
        r#""x""#,
        r#""٣""#,
        "1",
        "1.0",
        "100",
        "1e2",
        "-0",
        "0",
        "1.5",
        "-1.5",
        "9223372036854775807",
        "9223372036854775808",
        "89457387300000000123",
        "true",
        "false",
        "null",
        "[1]",
        r#"{"a":1}"#,
    ];
    for (n, value) in values.iter().enumerate() {
        let body = format!(r#"{{"v":{value}}}"#);
        let e = event(&format!("v{n:02}"), "c", 20_000 + n as u64, &body);
        assert_eq!(store.insert_event(e, None).await.unwrap(), Inserted::New);
    }
    let equals = [
        "1",
        "1.0",
        "1e0",
        "01",
        "100",
        "1e2",
        "0",
        "-0",
        "1.5",
        "15e-1",
        "-1.5",
        "true",
        "false",
        "null",
        "",
        "x",
        "٣",
        "9223372036854775807",
        "9223372036854775808",
        "89457387300000000123",
        "[1]",
        r#"{"a":1}"#,
        " 1",
    ];
    let mut unindexed = Vec::new();
    let list = |field: &str, equals: &str, source: Option<&str>, limit: usize| {
        let filter = EventFilter {
            source: source.map(String::from),
            field: Some(FieldMatch::parse(field, equals.into()).unwrap()),
            ..Default::default()
        };
        let store = store.clone();
        async move {
            // Page by page, each page's last event the next page's cursor.
            let (mut ids, mut after) = (Vec::new(), None);
            loop {
                let page = store
                    .list_events(filter.clone(), after, limit)
                    .await
                    .unwrap();
                assert!(page.len() <= limit);
                let Some(last) = page.last() else {
                    return ids;
                };
                after = Some((last.received_at, last.id.clone()));
                ids.extend(page.into_iter().map(|e| e.id));
            }
        }
    };
    let fields = |fields: &[&str]| {
        (fields.iter())
            .map(|f| f.split('.').map(String::from).collect())
            .collect::<Vec<Vec<String>>>()
    };
    for indexed in [false, true] {
        if indexed {
            let changed = store
                .index_fields(fields(&["sim.iccid", "slot", "on", "apn", "v"]))
                .await
                .unwrap();
            assert_eq!(changed.created, ["sim.iccid", "slot", "on", "apn", "v"]);
        }
        for (i, e) in equals.iter().enumerate() {
            let found = list("v", e, None, 3).await;
            if indexed {
                assert_eq!(found, unindexed[i], "v = {e:?}");
            } else {
                unindexed.push(found);
            }
        }
        for limit in [1, 2, 10] {
            let all = |field, equals| list(field, equals, None, limit);
            assert_eq!(
                all("sim.iccid", "8945").await,
                ["i3", "i2", "i1"],
                "{indexed}"
            );
            assert_eq!(all("slot", "2").await, ["i3", "i2", "i1"], "{indexed}");
            assert_eq!(all("slot", "2.00").await, ["i3", "i1"], "{indexed}");
            assert_eq!(all("on", "true").await, ["i3"], "{indexed}");
            assert_eq!(all("on", "false").await, ["i5"], "{indexed}");
            assert_eq!(all("on", "1").await, ["i7"], "{indexed}");
            assert_eq!(all("apn", "null").await, ["i7", "i5"], "{indexed}");
            assert!(all("sim.iccid", "894").await.is_empty(), "{indexed}");
            let in_a = list("sim.iccid", "8945", Some("a"), limit).await;
            assert_eq!(in_a, ["i3", "i1"], "{indexed}");
        }
    }
    // Not vacuous: numbers match by value, strings by text.
    let found = |e: &str| &unindexed[equals.iter().position(|x| *x == e).unwrap()];
    assert_eq!(found("1e0"), &["v08", "v07"]);
    assert_eq!(found("1"), &["v08", "v07", "v00"]);
    assert_eq!(found("-0"), &["v12", "v11"]);
    assert_eq!(found("null"), &["v20", "v03"]);
    let again = store
        .index_fields(fields(&["sim.iccid", "slot", "on", "apn", "v"]))
        .await
        .unwrap();
    assert_eq!(again, FieldIndexes::default(), "made once");
    let fewer = store.index_fields(fields(&["slot"])).await.unwrap();
    assert_eq!((fewer.created.len(), fewer.dropped), (0, 4));
    assert_eq!(list("sim.iccid", "8945", None, 2).await, ["i3", "i2", "i1"]);
    assert_eq!(list("slot", "2", None, 2).await, ["i3", "i2", "i1"]);
    let none = store.index_fields(vec![]).await.unwrap();
    assert_eq!((none.created.len(), none.dropped), (0, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_lists_by_an_indexed_field() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), 100).unwrap();
    listing_by_an_indexed_field(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_lists_by_an_indexed_field() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("indexed");
    let store = PgStore::open(&url, 100, LEASE).await.unwrap();
    listing_by_an_indexed_field(Arc::new(store)).await;

    // Instances that start together with a new field build its index once, and each
    // uses it.
    let url = server.database("indexed_together");
    let mut stores = Vec::new();
    for n in 0..3 {
        stores.push(PgStore::open(&url, 100, LEASE).await.unwrap());
        let body = format!(r#"{{"iccid":"89{n}"}}"#);
        let e = event(&format!("t{n}"), "s", 1_000 + n as u64, &body);
        stores[n].insert_event(e, None).await.unwrap();
    }
    let iccid = vec![vec!["iccid".to_string()]];
    let built =
        futures_util::future::join_all(stores.iter().map(|s| s.index_fields(iccid.clone())))
            .await
            .into_iter()
            .map(|changed| changed.unwrap().created.len())
            .sum::<usize>();
    assert_eq!(built, 1);
    for store in &stores {
        let filter = EventFilter {
            field: Some(FieldMatch::parse("iccid", "891".into()).unwrap()),
            ..Default::default()
        };
        let found = store.list_events(filter, None, 10).await.unwrap();
        assert_eq!(
            found.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["t1"]
        );
    }
}

/// The events waiting in memory are bounded in bytes as well as in number: past
/// `max_bytes` an insert is refused (the sender gets 503) until the pipeline takes some;
/// one event always fits into an empty queue.
async fn queue_is_bounded_in_bytes(store: Arc<dyn Store>) {
    let body = |n: usize| format!(r#"{{"pad":"{}","n":{n}}}"#, "x".repeat(1000));
    for n in 0..3 {
        let e = event(&format!("b{n}"), "s", 1_000 + n as u64, &body(n));
        assert_eq!(store.insert_event(e, None).await.unwrap(), Inserted::New);
    }
    let refused = store
        .insert_event(event("b3", "s", 1_003, &body(3)), None)
        .await;
    assert!(
        matches!(refused, Err(switchyard::store::StoreError::QueueBytesFull(n)) if n > 3_000),
        "{refused:?}"
    );
    assert!(
        store.get_event("b3").await.unwrap().is_none(),
        "nothing stored"
    );
    // A replay is refused the same way, with nothing changed: the event keeps its run.
    let replay = store.replay("b0").await;
    assert!(
        matches!(replay, Err(switchyard::store::StoreError::QueueBytesFull(n)) if n > 3_000),
        "{replay:?}"
    );
    assert_eq!(store.get_event("b0").await.unwrap().unwrap().event.run, 0);
    assert!(
        !store.replay("nope").await.unwrap(),
        "unknown: not found, not full"
    );
    // What a bulk replay asks first, with the sizes the list gives.
    let page = store
        .list_events(EventFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(page.len(), 3);
    assert!(
        page.iter()
            .all(|e| (1_000..1_200).contains(&e.queued_bytes)),
        "{page:?}"
    );
    assert!(store.queue_fits(1, 300).is_ok());
    assert!(matches!(
        store.queue_fits(1, page[0].queued_bytes as usize),
        Err(switchyard::store::StoreError::QueueBytesFull(_))
    ));
    assert!(matches!(
        store.queue_fits(98, 0),
        Err(switchyard::store::StoreError::QueueFull(3))
    ));
    assert_eq!(store.next_event().await.unwrap().id, "b0");
    let e = event("b3", "s", 1_003, &body(3));
    assert_eq!(store.insert_event(e, None).await.unwrap(), Inserted::New);
    for id in ["b1", "b2", "b3"] {
        assert_eq!(store.next_event().await.unwrap().id, id);
    }
    let huge = event("big", "s", 2_000, &"7".repeat(10_000));
    assert_eq!(
        store.insert_event(huge, None).await.unwrap(),
        Inserted::New,
        "an empty queue takes one event of any size"
    );
    assert_eq!(store.next_event().await.unwrap().id, "big");
    // Once the queue has room, the replay refused above goes through.
    assert!(store.replay("b0").await.unwrap());
    let again = store.next_event().await.unwrap();
    assert_eq!((again.id.as_str(), again.run), ("b0", 1));
}

/// A store that refuses an event (a trigger stands in for a full disk) remembers why, for
/// `/readyz`, until it stores one again; a full queue is not the store refusing.
async fn refusals_are_remembered_until_an_event_is_stored(
    store: Arc<dyn Store>,
    full: impl AsyncFn(bool),
) {
    assert!(store.refused().is_none());
    full(true).await;
    let refused = store
        .insert_event(event("r1", "s", 1_000, "{}"), None)
        .await;
    assert!(
        matches!(&refused, Err(switchyard::store::StoreError::Db(e)) if e.contains("no space left")),
        "{refused:?}"
    );
    let (ago, cause) = store.refused().expect("remembered");
    assert!(ago < std::time::Duration::from_secs(5), "{ago:?}");
    assert!(cause.contains("no space left"), "{cause}");
    let idempotent = Some(Idempotency {
        key: "k1".into(),
        window_ms: 60_000,
    });
    let refused = (store.insert_event(event("r2", "s", 1_001, "{}"), idempotent.clone())).await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(store.refused().is_some());
    assert_eq!(store.queue_depth(), 0, "nothing queued");

    full(false).await;
    assert_eq!(
        store
            .insert_event(event("r3", "s", 1_002, "{}"), None)
            .await
            .unwrap(),
        Inserted::New
    );
    assert!(store.refused().is_none(), "forgotten once one is stored");
    assert_eq!(store.next_event().await.unwrap().id, "r3");
    // A duplicate is the store answering too.
    full(true).await;
    assert!(
        store
            .insert_event(event("r4", "s", 1_003, "{}"), None)
            .await
            .is_err()
    );
    full(false).await;
    let e = event("r5", "s", 1_004, "{}");
    assert_eq!(
        store.insert_event(e, idempotent.clone()).await.unwrap(),
        Inserted::New
    );
    full(true).await;
    assert!(
        store
            .insert_event(event("r6", "s", 1_005, "{}"), None)
            .await
            .is_err()
    );
    let e = event("r7", "s", 1_006, "{}");
    assert_eq!(
        store.insert_event(e, idempotent).await.unwrap(),
        Inserted::Duplicate("r5".into())
    );
    assert!(store.refused().is_none(), "answered");
}

/// Claims go destination by destination: each takes at most its room, the earliest due of
/// all are kept up to the limit, and a destination with no room is left out — however many
/// of its deliveries are due before the others'.
async fn claims_take_each_destination_up_to_its_room(store: Arc<dyn Store>) {
    // 40 deliveries to "slow", due first; then a, b, a, b, ... (ids by due time).
    let mut n = 0u64;
    let mut add = |store: Arc<dyn Store>, destination: &'static str| {
        n += 1;
        let at = 10_000 + n;
        async move {
            let e = event(&format!("e{at}"), "s", at, "{}");
            store.insert_event(e.clone(), None).await.unwrap();
            let id = format!("{destination}{at}");
            (store.complete_event(
                &e,
                vec![outcome(1)],
                vec![delivery(&id, destination, None)],
                at,
            ))
            .await
            .unwrap();
        }
    };
    for _ in 0..40 {
        add(store.clone(), "slow").await;
    }
    for _ in 0..3 {
        add(store.clone(), "a").await;
        add(store.clone(), "b").await;
    }
    let ids = |due: &[switchyard::store::DueDelivery]| {
        let mut ids: Vec<String> = due.iter().map(|d| d.id.clone()).collect();
        ids.sort();
        ids
    };
    let room = |pairs: &[(&str, usize)]| ClaimScope {
        room: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        ..ClaimScope::any()
    };

    // "slow" has no room: its 40 are skipped, not walked past; "a" may take one.
    let scope = room(&[("slow", 0), ("a", 1)]);
    assert_eq!(
        store.next_due_at(20_000, &scope).await.unwrap(),
        Some(10_041)
    );
    let due = store.claim_due(20_000, 30_000, 3, &scope).await.unwrap();
    assert_eq!(ids(&due), ["a10041", "b10042", "b10044"]);
    // The limit keeps the earliest due of every destination's.
    let due = (store.claim_due(20_000, 30_000, 2, &room(&[("slow", 0)])))
        .await
        .unwrap();
    assert_eq!(ids(&due), ["a10043", "a10045"]);
    // Nothing left but "slow"'s and one of "b"'s, which has no room now.
    let scope = room(&[("slow", 0), ("b", 0)]);
    assert!(
        store
            .claim_due(20_000, 30_000, 10, &scope)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.next_due_at(20_000, &scope).await.unwrap(), None);
    // Given room, "slow" goes first: it was due first.
    let due = (store.claim_due(20_000, 30_000, 3, &ClaimScope::any()))
        .await
        .unwrap();
    assert_eq!(ids(&due), ["slow10001", "slow10002", "slow10003"]);
    let due = (store.claim_due(20_000, 30_000, 100, &room(&[("slow", 5)])))
        .await
        .unwrap();
    assert_eq!(due.len(), 6, "five of slow's and b's last: {:?}", ids(&due));
    assert!(due.iter().any(|d| d.id == "b10046"));
}

/// A source's own retention (`[[sources]] retention`) replaces `[retention]`'s for its
/// events only, shorter or longer.
async fn sources_keep_their_events_as_long_as_they_say(store: Arc<dyn Store>) {
    for (id, source, at) in [
        ("t1", "telemetry", 1_000),
        ("t2", "telemetry", 5_000),
        ("l1", "lifecycle", 1_000),
    ] {
        let e = event(id, source, at, "{}");
        store.insert_event(e.clone(), None).await.unwrap();
        (store.complete_event(&e, vec![outcome(0)], vec![], at))
            .await
            .unwrap();
    }
    let purge_all = |before: PurgeBefore| {
        let store = store.clone();
        async move {
            let mut after = None;
            loop {
                let (_, next) = (store.purge_events(before.clone(), after, 1))
                    .await
                    .unwrap();
                match next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
    };
    let kept = |ids: &'static [&'static str]| {
        let store = store.clone();
        async move {
            let mut kept = Vec::new();
            for id in ids {
                if store.get_event(id).await.unwrap().is_some() {
                    kept.push(*id);
                }
            }
            kept
        }
    };
    let telemetry = |delivered: u64| {
        let bounds = SourceBounds {
            delivered: Some(delivered),
            failed: None,
        };
        vec![("telemetry".to_string(), bounds)]
    };
    // Shorter: telemetry's events before 2,000 go; the others' only before 500.
    purge_all(PurgeBefore {
        by_source: telemetry(2_000),
        ..PurgeBefore::delivered(500)
    })
    .await;
    assert_eq!(kept(&["t1", "t2", "l1"]).await, ["t2", "l1"]);
    // Longer: the others' events before 10,000 go, telemetry's still only before 2,000.
    purge_all(PurgeBefore {
        by_source: telemetry(2_000),
        ..PurgeBefore::delivered(10_000)
    })
    .await;
    assert_eq!(kept(&["t2", "l1"]).await, ["t2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_sources_keep_their_events_as_long_as_they_say() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), 100).unwrap();
    sources_keep_their_events_as_long_as_they_say(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_sources_keep_their_events_as_long_as_they_say() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("retention");
    let store = PgStore::open(&url, 100, LEASE).await.unwrap();
    sources_keep_their_events_as_long_as_they_say(Arc::new(store)).await;
}

/// `erase_events` takes each event with its deliveries, unless it is busy — queued, or
/// with a delivery leased now — and a delivery it took is never claimed.
async fn events_are_erased_unless_busy(store: Arc<dyn Store>) {
    let done = |id: &'static str, at: u64, d: Option<NewDelivery>| {
        let store = store.clone();
        async move {
            let e = event(id, "s", at, "{}");
            store.insert_event(e.clone(), None).await.unwrap();
            let n = usize::from(d.is_some());
            (store.complete_event(&e, vec![outcome(n)], d.into_iter().collect(), at))
                .await
                .unwrap();
        }
    };
    done("e1", 10_001, Some(delivery("d1", "x", None))).await;
    done("e2", 10_002, Some(delivery("d2", "x", Some(30_000)))).await;
    done("e4", 10_004, None).await;
    store
        .insert_event(event("e3", "s", 10_003, "{}"), None)
        .await
        .unwrap();
    let ids = |ids: &[&str]| ids.iter().map(|i| i.to_string()).collect::<Vec<_>>();
    let mut erased = (store.erase_events(ids(&["e1", "e2", "e3", "e4", "nope"]), 20_000))
        .await
        .unwrap();
    erased.erased.sort();
    erased.busy.sort();
    assert_eq!(erased.erased, ids(&["e1", "e4"]));
    assert_eq!(erased.busy, ids(&["e2", "e3"]), "leased, queued");
    assert!(store.get_event("e1").await.unwrap().is_none());
    assert!(store.get_event("e2").await.unwrap().is_some());
    let due = (store.claim_due(20_000, 40_000, 10, &ClaimScope::any()))
        .await
        .unwrap();
    assert!(due.is_empty(), "d1 went with e1, d2 is leased");
    // Once the lease has run out, the event goes too.
    let erased = store.erase_events(ids(&["e2"]), 30_001).await.unwrap();
    assert_eq!(erased.erased, ids(&["e2"]));
    assert!(store.get_event("e2").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_erases_events_unless_busy() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), 100).unwrap();
    events_are_erased_unless_busy(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_erases_events_unless_busy() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("erase");
    let store = PgStore::open(&url, 100, LEASE).await.unwrap();
    events_are_erased_unless_busy(Arc::new(store)).await;
}

/// Plugins' values (WIT `state`): each plugin's own, replaced, deleted, gone once expired
/// (and purged), listed by a key's prefix bytewise; a dry run's writes stay its own.
async fn plugin_values_are_kept_by_plugin_and_key(store: Arc<dyn Store>) {
    let put = |plugin: &'static str, key: &'static str, value: &'static str, until: u64| {
        let store = store.clone();
        async move {
            (store.state_put(plugin, key, Some(value.into()), until))
                .await
                .unwrap()
        }
    };
    put("a", "k", "1", 2_000).await;
    put("b", "k", "other", 5_000).await;
    put("a", "soon", "2", 1_000).await;
    let get = |plugin: &'static str, key: &'static str, now: u64| {
        let store = store.clone();
        async move { store.state_get(plugin, key, now).await.unwrap() }
    };
    assert_eq!(get("a", "k", 500).await.as_deref(), Some("1"));
    assert_eq!(get("b", "k", 500).await.as_deref(), Some("other"));
    assert_eq!(get("c", "k", 500).await, None);
    assert_eq!(get("a", "soon", 999).await.as_deref(), Some("2"));
    assert_eq!(get("a", "soon", 1_000).await, None, "expired at its time");
    put("a", "k", "replaced", 3_000).await;
    assert_eq!(get("a", "k", 2_500).await.as_deref(), Some("replaced"));
    store.state_put("a", "k", None, 0).await.unwrap();
    assert_eq!(get("a", "k", 500).await, None, "deleted");
    assert_eq!(get("b", "k", 500).await.as_deref(), Some("other"));

    // Listed by prefix, bytewise, from a key on; expired values left out.
    for key in ["user:1", "user:2", "user:é", "user", "usez", "user:3"] {
        put("a", key, key, 10_000).await;
    }
    put("a", "user:old", "x", 1_500).await;
    let list = |prefix: &'static str, after: &'static str, limit: usize| {
        let store = store.clone();
        async move {
            let entries = store
                .state_list("a", prefix, after, limit, 2_000)
                .await
                .unwrap();
            entries.into_iter().map(|e| e.key).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list("user:", "", 10).await,
        ["user:1", "user:2", "user:3", "user:é"]
    );
    assert_eq!(list("user:", "user:1", 2).await, ["user:2", "user:3"]);
    assert_eq!(list("", "user:é", 10).await, ["usez"]);
    let entry = store.state_list("a", "user:1", "", 1, 2_000).await.unwrap();
    assert_eq!(
        (entry[0].value.as_str(), entry[0].expires_at),
        ("user:1", 10_000)
    );

    // The purge takes what expired, a batch at a time.
    assert_eq!(store.purge_state(2_000, 1).await.unwrap(), 1);
    assert_eq!(
        store.purge_state(2_000, 10).await.unwrap(),
        1,
        "soon and user:old"
    );
    assert_eq!(store.purge_state(2_000, 10).await.unwrap(), 0);
    assert_eq!(store.purge_state(5_000, 10).await.unwrap(), 1, "b's");
    assert_eq!(get("a", "user:1", 5_000).await.as_deref(), Some("user:1"));

    // A swap writes only over what it expects (nothing: no value, or an expired one).
    let swap =
        |key: &'static str, expected: Option<&'static str>, value: &'static str, now: u64| {
            let store = store.clone();
            async move {
                (store.state_swap(
                    "a",
                    key,
                    expected.map(String::from),
                    value.into(),
                    9_000,
                    now,
                ))
                .await
                .unwrap()
            }
        };
    assert!(swap("s", None, "1", 5_000).await);
    assert!(!swap("s", None, "2", 5_000).await, "1 is held");
    assert!(!swap("s", Some("0"), "2", 5_000).await);
    assert!(swap("s", Some("1"), "2", 5_000).await);
    assert_eq!(get("a", "s", 5_000).await.as_deref(), Some("2"));
    assert!(!swap("s", Some("2"), "3", 9_000).await, "2 expired at 9 s");
    assert!(
        swap("s", None, "3", 9_000).await,
        "an expired value is nothing"
    );
    // Of many swaps from the same value at once, one wins.
    let racers: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let value = format!("racer {i}");
                (store.state_swap("a", "race", None, value, 60_000, 5_000))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut won = 0;
    for r in racers {
        won += usize::from(r.await.unwrap());
    }
    assert_eq!(won, 1, "exactly one swap from nothing wins");

    // A dry run reads the store and keeps its writes to itself.
    let clock = Arc::new(switchyard::delivery::ManualClock::new(5_000));
    let live = PluginStates::store(store.clone(), clock);
    let dry = live.dry_run();
    assert_eq!(
        dry.get("a", "user:1").await.unwrap().as_deref(),
        Some("user:1")
    );
    dry.set("a", "user:1", "dry".into(), None)
        .await
        .unwrap()
        .unwrap();
    dry.remove("a", "user:2").await.unwrap();
    assert_eq!(
        dry.get("a", "user:1").await.unwrap().as_deref(),
        Some("dry")
    );
    assert_eq!(dry.get("a", "user:2").await.unwrap(), None);
    assert_eq!(get("a", "user:1", 5_000).await.as_deref(), Some("user:1"));
    assert_eq!(get("a", "user:2", 5_000).await.as_deref(), Some("user:2"));
    live.set("a", "new", "v".into(), Some(60))
        .await
        .unwrap()
        .unwrap();
    let entry = store.state_list("a", "new", "", 1, 5_000).await.unwrap();
    assert_eq!(entry[0].expires_at, 65_000, "60 s from the clock's 5 s");

    // Removed by prefix, a batch at a time, one plugin's only.
    put("b", "user:1", "b's", 90_000).await;
    assert_eq!(store.state_remove_prefix("a", "user:", 2).await.unwrap(), 2);
    assert_eq!(
        store.state_remove_prefix("a", "user:", 10).await.unwrap(),
        2,
        "user:3, user:é"
    );
    assert_eq!(list("user", "", 10).await, ["user"]);
    let left = store.state_list("a", "", "", 100, 0).await.unwrap().len();
    assert_eq!(store.state_remove_prefix("a", "", 100).await.unwrap(), left);
    assert!(
        store
            .state_list("a", "", "", 100, 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(get("b", "user:1", 5_000).await.as_deref(), Some("b's"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_keeps_plugin_values() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), 100).unwrap();
    plugin_values_are_kept_by_plugin_and_key(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_keeps_plugin_values() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("plugin_state");
    let store = PgStore::open(&url, 100, LEASE).await.unwrap();
    plugin_values_are_kept_by_plugin_and_key(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_claims_take_each_destination_up_to_its_room() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), 100).unwrap();
    claims_take_each_destination_up_to_its_room(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_claims_take_each_destination_up_to_its_room() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("room");
    let store = PgStore::open(&url, 100, LEASE).await.unwrap();
    claims_take_each_destination_up_to_its_room(Arc::new(store)).await;
}

/// Destinations' rate limits are the store's: `a` and `b` are two gateways on it (the same
/// one for SQLite, whose store is one gateway's). Slots are taken once whoever asks; a
/// delivery put off comes back marked paced, by any claim, until its attempt is recorded;
/// a restart starts the limit afresh and unmarks what it releases.
async fn rate_limits_are_the_stores(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    const D: Limit = Limit::Destination("d");
    // Five a second: a burst of five, then one every 200 ms — between both.
    let mut slots = Vec::new();
    for n in 0..8 {
        let store = if n % 2 == 0 { &a } else { &b };
        slots.push(store.take_slot(D, 1_000, 5.0).await.unwrap());
    }
    assert_eq!(
        slots,
        [1_000, 1_000, 1_000, 1_000, 1_000, 1_200, 1_400, 1_600]
    );
    assert_eq!(
        b.take_slot(Limit::Destination("other"), 1_000, 5.0)
            .await
            .unwrap(),
        1_000
    );
    // A source's limit is its own, and a refused event takes no slot: two a second, so
    // the third and fourth are refused until 1,500, and the one at 1,500 is let in.
    let source = Limit::Source("d");
    let mut answers = Vec::new();
    for (n, now) in [1_000, 1_000, 1_000, 1_100, 1_500, 1_500]
        .into_iter()
        .enumerate()
    {
        let store = if n % 2 == 0 { &a } else { &b };
        answers.push(store.take_slot(source, now, 2.0).await.unwrap());
    }
    assert_eq!(answers, [1_000, 1_000, 1_500, 1_500, 1_500, 2_000]);
    // A plugin's request to an origin takes a later slot only within its call's time left:
    // two a second, so the third waits for 1,500 if it may wait 500 ms; one that may wait
    // 400 takes nothing, and the slot at 2,000 is still free for the next.
    let origin = |within| Limit::Origin {
        origin: "https://crm.example.com:443",
        within,
    };
    let mut answers = Vec::new();
    for (n, within) in [0, 0, 500, 400, 1_000].into_iter().enumerate() {
        let store = if n % 2 == 0 { &a } else { &b };
        answers.push(store.take_slot(origin(within), 1_000, 2.0).await.unwrap());
    }
    assert_eq!(answers, [1_000, 1_000, 1_500, 2_000, 2_000]);
    assert_eq!(b.take_slot(origin(0), 1_000, 2.0).await.unwrap(), 2_500);
    // Idle time refills the burst.
    assert_eq!(a.take_slot(D, 60_000, 5.0).await.unwrap(), 60_000);

    let e = event("paced-event", "s", 900, "{}");
    a.insert_event(e.clone(), None).await.unwrap();
    let id = "paced-delivery";
    (a.complete_event(&e, vec![outcome(1)], vec![delivery(id, "d", None)], 1_000))
        .await
        .unwrap();
    let claim = |store: Arc<dyn Store>, now: u64| async move {
        let due = (store.claim_due(now, now + 10_000, 10, &ClaimScope::any()))
            .await
            .unwrap();
        assert_eq!(due.len(), 1, "claimed at {now}");
        due.into_iter().next().unwrap()
    };
    assert!(!claim(a.clone(), 1_000).await.paced, "a new delivery");
    assert!(a.defer_delivery(id, 1_600).await.unwrap());
    assert!(
        (b.claim_due(1_599, 20_000, 10, &ClaimScope::any()))
            .await
            .unwrap()
            .is_empty(),
        "nothing before its slot"
    );
    let due = claim(b.clone(), 1_600).await;
    assert!(
        due.paced,
        "at its slot, by another claim: sent without another slot"
    );
    let failed = Attempt {
        status_code: Some(500),
        ..attempt(1_600, 500)
    };
    (b.record_attempt(id, 0, failed, AttemptNext::RetryAt(5_000)))
        .await
        .unwrap();
    let due = claim(a.clone(), 5_000).await;
    assert!(!due.paced, "a retry takes a slot of its own");

    // Put off again, then the destination restarted: due now, paced afresh.
    assert!(a.defer_delivery(id, 90_000).await.unwrap());
    b.set_destination_state(&active("d"), 61_000).await.unwrap();
    let due = claim(a.clone(), 61_000).await;
    assert!(!due.paced, "released by the restart: {}", due.id);
    assert_eq!(
        a.take_slot(D, 61_000, 5.0).await.unwrap(),
        61_000,
        "the restart started the limit afresh"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_rate_limits_are_the_stores() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path(), 100).unwrap());
    rate_limits_are_the_stores(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_rate_limits_are_the_stores() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("pace");
    let a = PgStore::open(&url, 100, LEASE).await.unwrap();
    let b = PgStore::open(&url, 100, LEASE).await.unwrap();
    rate_limits_are_the_stores(Arc::new(a), Arc::new(b)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_queue_is_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), 100)
        .unwrap()
        .with_queue_max_bytes(3_500);
    queue_is_bounded_in_bytes(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_queue_is_bounded_in_bytes() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("bytes");
    let store = PgStore::open(&url, 100, LEASE)
        .await
        .unwrap()
        .with_queue_max_bytes(3_500);
    queue_is_bounded_in_bytes(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_refusals_are_remembered_until_an_event_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), 100).unwrap();
    let db = rusqlite::Connection::open(dir.path().join("switchyard.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    let full = async |on: bool| {
        db.execute_batch(match on {
            true => "CREATE TRIGGER full BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'no space left on device'); END",
            false => "DROP TRIGGER full",
        })
        .unwrap();
    };
    refusals_are_remembered_until_an_event_is_stored(Arc::new(store), full).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_refusals_are_remembered_until_an_event_is_stored() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("refusals");
    let store = PgStore::open(&url, 100, LEASE).await.unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'could not extend file: no space left on device'; END $$",
        )
        .await
        .unwrap();
    let full = async |on: bool| {
        client
            .batch_execute(match on {
                true => {
                    "CREATE TRIGGER disk_full BEFORE INSERT ON events EXECUTE FUNCTION disk_full()"
                }
                false => "DROP TRIGGER disk_full ON events",
            })
            .await
            .unwrap();
    };
    refusals_are_remembered_until_an_event_is_stored(Arc::new(store), full).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_listing_stops_at_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let budget = std::time::Duration::from_millis(5);
    let store = SqliteStore::open(dir.path(), 100_000)
        .unwrap()
        .with_list_budget(budget);
    // The listing takes 20–40 ms here unoptimized.
    listing_stops_at_its_budget(Arc::new(store), 50_000, budget).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_listing_stops_at_its_budget() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("budget");
    let budget = std::time::Duration::from_millis(5);
    let store = PgStore::open(&url, 100_000, LEASE)
        .await
        .unwrap()
        .with_list_budget(budget);
    // Fewer than on SQLite, which are enough: the listing takes over 40 ms here, and the
    // server's own timer starts with the statement.
    listing_stops_at_its_budget(Arc::new(store), 20_000, budget).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_store_conforms() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    conformance(Box::new(move || {
        let dir = dir.clone();
        Box::pin(
            async move { Arc::new(SqliteStore::open(dir.path(), 100).unwrap()) as Arc<dyn Store> },
        )
    }))
    .await;
}

/// Claims on events in the PostgreSQL suite: short, so a restart does not wait long.
const LEASE: std::time::Duration = std::time::Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread")]
async fn postgres_store_conforms() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("conformance");
    conformance(Box::new(move || {
        let url = url.clone();
        Box::pin(async move {
            // A restart on PostgreSQL takes over the queued events once their claims ran
            // out (nothing renews them after the first store is dropped).
            tokio::time::sleep(LEASE * 2).await;
            Arc::new(PgStore::open(&url, 100, LEASE).await.unwrap()) as Arc<dyn Store>
        })
    }))
    .await;
    // Instances that start together migrate once.
    let url = server.database("together");
    let opens = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { PgStore::open(&url, 10, LEASE).await.map(|_| ()) })
    });
    for o in opens {
        o.await.unwrap().unwrap();
    }
}

/// Two instances on one database: an event is held by the instance that accepted it for as
/// long as that instance lives (its claim is renewed), and taken over by the other once it
/// is gone; a managed object changed through one moves the version both see.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_instances_share_the_queue() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("shared");
    let a = PgStore::open(&url, 100, LEASE).await.unwrap();
    let b = PgStore::open(&url, 100, LEASE).await.unwrap();
    let now = crate::util::now_ms();
    a.insert_event(event("x", "s", now, "{}"), None)
        .await
        .unwrap();
    tokio::time::sleep(LEASE * 4).await;
    assert_eq!(
        (a.queue_depth(), b.queue_depth()),
        (1, 0),
        "a live instance keeps its claim"
    );
    drop(a);
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while b.queue_depth() == 0 {
            tokio::time::sleep(LEASE / 4).await;
        }
    })
    .await
    .expect("the other instance takes the event over");
    assert_eq!(b.next_event().await.unwrap().id, "x");

    let before = b.managed_version().await.unwrap().expect("a shared store");
    let object = ManagedObject {
        kind: "source".into(),
        name: "n".into(),
        body: r#"{"name":"n"}"#.into(),
    };
    b.put_managed(object, now).await.unwrap();
    let after_put = b.managed_version().await.unwrap().unwrap();
    b.delete_managed("source", "n").await.unwrap();
    let after_delete = b.managed_version().await.unwrap().unwrap();
    assert!(before < after_put && after_put < after_delete);
}

/// What an instance reads of the managed objects others changed on a shared store: only
/// what changed after the version it saw — objects as they are now, deleted names —
/// whoever changed them, a hand edit in the database included.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_instances_read_only_the_managed_changes() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("changes");
    let (a, b) = (
        PgStore::open(&url, 10, LEASE).await.unwrap(),
        PgStore::open(&url, 10, LEASE).await.unwrap(),
    );
    let source = |name: &str, body: &str| ManagedObject {
        kind: "source".into(),
        name: name.into(),
        body: body.into(),
    };
    let now = crate::util::now_ms();
    a.put_managed(source("m", r#"{"name":"m"}"#), now)
        .await
        .unwrap();
    a.put_managed(source("old", r#"{"name":"old"}"#), now)
        .await
        .unwrap();
    let seen = a.managed_version().await.unwrap().unwrap();

    b.put_managed(source("k", r#"{"name":"k"}"#), now)
        .await
        .unwrap();
    b.put_managed(source("m", r#"{"name":"m","x":1}"#), now)
        .await
        .unwrap();
    b.delete_managed("source", "k").await.unwrap();
    b.delete_managed("source", "old").await.unwrap();
    let changes = a.managed_changes(seen).await.unwrap();
    assert_eq!(changes.changed, [source("m", r#"{"name":"m","x":1}"#)]);
    let mut deleted = changes.deleted.clone();
    deleted.sort();
    assert_eq!(
        deleted,
        [
            ("source".into(), "k".into()),
            ("source".into(), "old".into())
        ]
    );
    assert_eq!(changes.version, a.managed_version().await.unwrap().unwrap());
    let none = a.managed_changes(changes.version).await.unwrap();
    assert_eq!((none.changed.len(), none.deleted.len()), (0, 0));
    assert_eq!(none.version, changes.version);

    // A hand edit moves the version and is in the log; a deleted name made again is no
    // longer deleted.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(r#"UPDATE managed_objects SET body = '{"name":"m","x":2}' WHERE name = 'm'"#)
        .await
        .unwrap();
    b.put_managed(source("k", r#"{"name":"k"}"#), now)
        .await
        .unwrap();
    let later = a.managed_changes(changes.version).await.unwrap();
    let mut changed = later.changed.clone();
    changed.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(
        changed,
        [
            source("k", r#"{"name":"k"}"#),
            source("m", r#"{"name":"m","x":2}"#)
        ]
    );
    assert!(later.deleted.is_empty());
    assert!(later.version > changes.version);
}

/// The whole gateway on PostgreSQL: an event through a plugin to a receiver, an API-made
/// destination, and both still there after a restart on the same database.
#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_runs_on_postgres() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("gateway");
    let rx = crate::util::Receiver::start().await;
    let config = format!(
        r#"
[store]
url = "{url}"
[[sources]]
name = "onomondo"
[[destinations]]
name = "fleet"
url = "{{receiver}}/fleet"
[[routes]]
source = "onomondo"
plugins = [{{ name = "event-filter", config = {{ allow = "usage" }} }}]
destinations = ["fleet"]
"#
    );
    let gw = crate::util::TestGateway::start(&config, &rx, &["event-filter"]).await;
    let id = gw.accept("onomondo", r#"{"type":"usage","n":1}"#).await;
    let event = gw.settled(&id).await;
    assert_eq!(event["deliveries"][0]["status"], "delivered", "{event}");
    assert_eq!(rx.wait_for(1).await[0].uri, "/fleet");
    let (status, _) = gw
        .send(
            "POST",
            "/v1/destinations",
            Some(serde_json::json!({ "name": "archive", "url": format!("{}/archive", rx.url) })),
        )
        .await;
    assert_eq!(status, 201);
    let dir = gw.stop().await;
    let gw = crate::util::TestGateway::start_in(dir, &config, &rx)
        .await
        .unwrap();
    assert_eq!(gw.event(&id).await["deliveries"][0]["status"], "delivered");
    assert_eq!(gw.get("/v1/destinations/archive").await.0, 200);
    gw.shutdown().await.unwrap();
}

/// A receiver that answers with bytes PostgreSQL's text cannot hold (NUL) still has its
/// delivery recorded: the attempt's response excerpt keeps the rest. (Before, the record
/// failed, so the delivery stayed leased and was sent again at every lease, for good.)
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_with_nul_bytes_is_recorded_on_postgres() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("nul");
    let arrivals = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = arrivals.clone();
    let binary = axum::Router::new().fallback(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { (axum::http::StatusCode::OK, b"ok\0\x01binary".to_vec()) }
    });
    let receiver = crate::util::serve(binary).await;
    let rx = crate::util::Receiver::start().await;
    let config = format!(
        r#"
[store]
url = "{url}"
[[sources]]
name = "onomondo"
[[destinations]]
name = "binary"
url = "{receiver}/binary"
[[routes]]
source = "onomondo"
destinations = ["binary"]
"#
    );
    let gw = crate::util::TestGateway::start(&config, &rx, &[]).await;
    let id = gw.accept("onomondo", r#"{"type":"usage"}"#).await;
    let event = gw.settled(&id).await;
    let delivery = &event["deliveries"][0];
    assert_eq!(delivery["status"], "delivered", "{event}");
    assert_eq!(
        delivery["attempts"][0]["response"], "ok\u{FFFD}\u{1}binary",
        "{event}"
    );
    assert_eq!(arrivals.load(std::sync::atomic::Ordering::SeqCst), 1);
    gw.shutdown().await.unwrap();
}

/// A source's `idempotency_field` whose value PostgreSQL could not keep as a key — a NUL
/// in it, or longer than a B-tree entry may be — still de-duplicates, on both stores,
/// and the event is accepted (before, PostgreSQL refused it with a 503 at every try).
#[tokio::test(flavor = "multi_thread")]
async fn any_idempotency_field_value_de_duplicates() {
    let server = PgServer::start();
    let stores = [
        None,
        server
            .as_ref()
            .map(|s| format!("[store]\nurl = \"{}\"\n", s.database("keys"))),
    ];
    for store in stores.into_iter().flatten().chain([String::new()]) {
        let rx = crate::util::Receiver::start().await;
        let config = format!(
            "{store}[[sources]]\nname = \"s\"\nidempotency_field = \"id\"\n[[destinations]]\n\
             name = \"d\"\nurl = \"{{receiver}}/d\"\n[[routes]]\nsource = \"s\"\ndestinations = [\"d\"]\n"
        );
        let gw = crate::util::TestGateway::start(&config, &rx, &[]).await;
        let long = "x".repeat(10_000);
        for id in ["a\u{0}b", long.as_str()] {
            let body = serde_json::json!({ "id": id }).to_string();
            let (first, accepted) = gw.post("s", body.clone()).await;
            assert_eq!(first, 202, "{store}: {accepted}");
            let (again, repeat) = gw.post("s", body).await;
            assert_eq!(again, 200, "{store}: {repeat}");
            assert_eq!(repeat["id"], accepted["id"]);
        }
        // Another value is another event, even where only what a key keeps would differ.
        let other = serde_json::json!({ "id": format!("{long}y") }).to_string();
        assert_eq!(gw.post("s", other).await.0, 202, "{store}");
        rx.wait_for(3).await;
        gw.shutdown().await.unwrap();
    }
}

/// A NUL in a management request's path or query (`%00`) is refused with `400` on both
/// stores: no name, id or stored text holds one, and PostgreSQL's text cannot take one
/// (it answered `500`).
#[tokio::test(flavor = "multi_thread")]
async fn a_nul_in_a_management_url_is_a_bad_request() {
    let server = PgServer::start();
    let pg = server
        .as_ref()
        .map(|s| format!("[store]\nurl = \"{}\"\n", s.database("nul_url")));
    for store in pg.into_iter().chain([String::new()]) {
        let rx = crate::util::Receiver::start().await;
        let config = format!("{store}[[sources]]\nname = \"s\"\n");
        let gw = crate::util::TestGateway::start(&config, &rx, &[]).await;
        for path in [
            "/v1/events?source=a%00b",
            "/v1/events/a%00b",
            "/v1/deliveries?destination=%00",
        ] {
            let (status, body) = gw.get(path).await;
            assert_eq!(status, 400, "{store}{path}: {body}");
            assert!(body["error"].as_str().unwrap().contains("NUL"), "{body}");
        }
        // Encoded once more, it is a plain `%00` and no NUL.
        assert_eq!(gw.get("/v1/events?source=a%2500b").await.0, 200);
        gw.shutdown().await.unwrap();
    }
}

/// On PostgreSQL, an event whose indexed body field is longer than an index entry may be
/// is stored all the same, and found by that value; and an event the database refuses
/// fails only itself, not the ingest batch it was committed with. (Before: the insert
/// failed, `503` at every try, and took down every event of its batch.)
#[tokio::test(flavor = "multi_thread")]
async fn postgres_stores_an_indexed_field_of_any_length() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("long_field");
    let store = PgStore::open(&url, 1_000, LEASE).await.unwrap();
    store
        .index_fields(vec![vec!["v".to_string()]])
        .await
        .unwrap();
    // 20,000 letters that do not compress.
    let mut x: u64 = 88_172_645_463_325_252;
    let long: String = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    let body = |v: &str| serde_json::json!({ "v": v }).to_string();
    let mut events = vec![event("long", "s", 1_000, &body(&long))];
    events.extend(
        (0..40).map(|n| event(&format!("e{n:02}"), "s", 2_000 + n, &body(&format!("v{n}")))),
    );
    let inserted =
        futures_util::future::join_all((events.into_iter()).map(|e| store.insert_event(e, None)))
            .await;
    for result in inserted {
        assert_eq!(result.unwrap(), Inserted::New);
    }
    let by = |equals: &str| EventFilter {
        field: Some(FieldMatch {
            path: vec!["v".into()],
            equals: equals.into(),
        }),
        ..EventFilter::default()
    };
    let found = store.list_events(by(&long), None, 10).await.unwrap();
    assert_eq!(
        found.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["long"]
    );
    let found = store.list_events(by("v7"), None, 10).await.unwrap();
    assert_eq!(
        found.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e07"]
    );

    // An event the database refuses (here: an id it has already) among others, sent
    // last so that it shares their batch.
    let mut events: Vec<_> = (0..40)
        .map(|n| event(&format!("f{n:02}"), "s", 4_000 + n, "{}"))
        .collect();
    events.push(event("e07", "s", 3_000, "{}"));
    let mut inserted =
        futures_util::future::join_all((events.into_iter()).map(|e| store.insert_event(e, None)))
            .await;
    let refused = inserted.pop().unwrap();
    for result in inserted {
        assert_eq!(result.unwrap(), Inserted::New);
    }
    assert!(refused.is_err(), "{refused:?}");
}
