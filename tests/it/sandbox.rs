//! The plugin sandbox: adversarial plugins cost only their own event, capabilities are
//! denied, routes choose what a failure means, warm instances are recycled and a trapped
//! instance is never reused, and a plugin that keeps failing is reported degraded.

use serde_json::{Value, json};

use crate::util::{Receiver, TestGateway};

/// A `bad` source through the misbehave fixture and a `good` one that must keep flowing.
fn config(route_extra: &str, plugin_extra: &str) -> String {
    format!(
        r#"
[plugins]
deadline = "200ms"
max_memory_bytes = 16777216
max_output_bytes = 65536
max_deliveries = 8
warm_recycle_after = 3
degraded_after = 3
[[sources]]
name = "bad"
[[sources]]
name = "good"
[[destinations]]
name = "sink"
url = "{{receiver}}/:source:?calls=:calls:&result=:result:"
[[routes]]
source = "bad"
plugins = [{{ name = "misbehave"{plugin_extra} }}]
destinations = ["sink"]
{route_extra}
[[routes]]
source = "good"
destinations = ["sink"]
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn adversarial_plugins_are_contained_with_a_clear_reason() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config("", ""), &rx, &["misbehave"]).await;
    let cases = [
        (json!({ "mode": "loop" }), "exceeded its deadline of 200ms"),
        (json!({ "mode": "alloc" }), "trapped"),
        (json!({ "mode": "recurse" }), "trapped"),
        (json!({ "mode": "panic" }), "trapped"),
        (json!({ "mode": "unreachable" }), "trapped"),
        (
            json!({ "mode": "big-body", "size": 65537 }),
            "a body of 65537 bytes is larger than 65536 bytes",
        ),
        (
            json!({ "mode": "many-deliveries", "count": 9 }),
            "9 deliveries are more than 8",
        ),
        (
            json!({ "mode": "state-flood" }),
            "plugin used `state` more than 100 times in one call",
        ),
        (
            json!({ "mode": "http-flood" }),
            "plugin sent more than 20 HTTP requests in one call",
        ),
        (
            json!({ "mode": "state-big", "size": 65537 }),
            "value of 65537 bytes is larger than plugins.state_max_value_bytes (65536)",
        ),
        (
            json!({ "mode": "much-metadata", "count": 64 }),
            "metadata, headers and names of 65718 bytes are more than 65536 bytes",
        ),
        // An error's text is cut at 4 KiB (at a character's boundary), saying how much
        // more there was.
        (
            json!({ "mode": "long-error", "size": 100000 }),
            "éé… (195904 bytes more)",
        ),
    ];
    let mut ids = Vec::new();
    let mut good = Vec::new();
    for (body, _) in &cases {
        ids.push(gw.accept("bad", body.to_string()).await);
        good.push(gw.accept("good", "{}").await);
    }
    for ((body, expected), id) in cases.iter().zip(&ids) {
        let e = gw.settled(id).await;
        let error = e["routes"][0]["result"]["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(error.contains(expected), "{body}: {error}");
        assert_eq!(e["deliveries"], json!([]), "{body}");
    }
    for id in &good {
        assert_eq!(gw.settled(id).await["deliveries"][0]["status"], "delivered");
    }
    // A drop reason is cut the same way; the event is dropped as asked.
    let long = gw
        .accept(
            "bad",
            json!({ "mode": "long-reason", "size": 10000 }).to_string(),
        )
        .await;
    let e = gw.settled(&long).await;
    let reason = e["routes"][0]["result"]["reason"].as_str().unwrap();
    assert_eq!(reason.len(), 4096 + "… (5904 bytes more)".len(), "{reason}");
    assert!(reason.ends_with("x… (5904 bytes more)"), "{reason}");
    // A body exactly at the cap is fine.
    let ok = gw
        .accept(
            "bad",
            json!({ "mode": "big-body", "size": 65536 }).to_string(),
        )
        .await;
    assert_eq!(
        gw.settled(&ok).await["deliveries"][0]["status"],
        "delivered"
    );
    gw.shutdown().await.unwrap();
}

/// Plugins spinning up to their deadline on every CPU permit at once cost their own
/// events only: the gateway goes on answering and accepting meanwhile — well before the
/// plugins' deadline ends (the bound is half of it, so a busy machine does not make the
/// test fail: what is checked is that the answer did not wait for the plugins).
#[tokio::test(flavor = "multi_thread")]
async fn plugins_running_to_their_deadline_do_not_stall_the_gateway() {
    let rx = Receiver::start().await;
    let config = config("", "").replace(r#"deadline = "200ms""#, r#"deadline = "5s""#);
    let gw = TestGateway::start(&config, &rx, &["misbehave"]).await;
    let mut spinning = Vec::new();
    for _ in 0..4 {
        spinning.push(
            gw.accept("bad", json!({ "mode": "loop" }).to_string())
                .await,
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    assert_eq!(gw.get("/healthz").await.0, 200);
    let good = gw.accept("good", "{}").await;
    let waited = started.elapsed();
    assert!(
        waited < std::time::Duration::from_millis(2_500),
        "the gateway answered after {waited:?} while plugins ran"
    );
    for id in &spinning {
        let e = gw.settled(id).await;
        let error = e["routes"][0]["result"]["error"]
            .as_str()
            .unwrap_or_default();
        assert!(error.contains("exceeded its deadline of 5s"), "{error}");
    }
    assert_eq!(
        gw.settled(&good).await["deliveries"][0]["status"],
        "delivered"
    );
    gw.shutdown().await.unwrap();
}

/// A call runs on a fiber of the calling task and yields at every epoch tick (5 ms): on a
/// one-thread runtime, another task keeps running while a plugin spins to its deadline.
/// (A guest that held the thread would let the other task run only after the call.)
#[tokio::test(flavor = "current_thread")]
async fn a_long_plugin_call_yields_to_other_tasks() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use switchyard::config::InstanceMode;
    use switchyard::plugin::{CallError, CallInput, CallLimits, PluginRuntime};

    let runtime = PluginRuntime::new().unwrap();
    let plugin = runtime
        .load_file("misbehave", &crate::util::guest("misbehave"))
        .unwrap();
    let event = misbehave_event(r#"{"mode":"loop"}"#);
    let limits = CallLimits {
        deadline: std::time::Duration::from_millis(500),
        ..CallLimits::default()
    };
    let done = Arc::new(AtomicBool::new(false));
    let turns = Arc::new(AtomicU64::new(0));
    let call = async {
        let result = plugin
            .call(&event, CallInput::default(), limits, InstanceMode::Fresh)
            .await;
        done.store(true, Ordering::SeqCst);
        result
    };
    let other = async {
        while !done.load(Ordering::SeqCst) {
            turns.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
        }
    };
    // The call is polled first: it has started before the other task's first turn.
    let (result, ()) = tokio::join!(call, other);
    assert!(matches!(result, Err(CallError::Deadline(_))), "{result:?}");
    let turns = turns.load(Ordering::SeqCst);
    assert!(
        turns >= 20,
        "the other task ran {turns} times during a 500 ms call"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn capabilities_are_denied() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config("", ""), &rx, &["misbehave"]).await;
    // A socket that is really listening, so a refusal is the sandbox's doing.
    let port: u16 = rx.url.rsplit(':').next().unwrap().parse().unwrap();
    let probes = [
        json!({ "mode": "file" }),
        json!({ "mode": "socket", "port": port }),
        json!({ "mode": "env" }),
    ];
    let mut results = Vec::new();
    for p in &probes {
        let id = gw.accept("bad", p.to_string()).await;
        gw.settled(&id).await;
        let e = gw.event(&id).await;
        let verdict = &e["routes"][0]["steps"][0]["verdict"];
        let result = verdict["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .find(|kv| kv[0] == "result")
            .map(|kv| kv[1].as_str().unwrap().to_string())
            .unwrap();
        results.push(result);
    }
    assert!(results[0].starts_with("denied"), "file: {}", results[0]);
    assert!(results[1].starts_with("denied"), "socket: {}", results[1]);
    assert_eq!(results[2], "0 variables", "env");
    assert!(
        rx.requests().iter().all(|r| r.uri.starts_with("/bad?")),
        "the plugin's socket never reached the receiver"
    );
    gw.shutdown().await.unwrap();
}

/// A route's `on_error` (or a plugin's own, which overrides it) decides what a failing
/// plugin means for the event: dropped, skipped, or dead-lettered (the default).
#[tokio::test(flavor = "multi_thread")]
async fn on_error_decides_what_a_failure_means() {
    let rx = Receiver::start().await;
    let panic = json!({ "mode": "panic" }).to_string();

    let gw = TestGateway::start(&config(r#"on_error = "drop""#, ""), &rx, &["misbehave"]).await;
    let e = gw.settled(&gw.accept("bad", panic.clone()).await).await;
    assert_eq!(e["routes"][0]["result"]["result"], "dropped", "{e}");
    assert!(
        e["routes"][0]["result"]["reason"]
            .as_str()
            .unwrap()
            .contains("trapped")
    );
    gw.shutdown().await.unwrap();

    let gw = TestGateway::start(
        &config(r#"on_error = "skip-plugin""#, ""),
        &rx,
        &["misbehave"],
    )
    .await;
    let e = gw.settled(&gw.accept("bad", panic.clone()).await).await;
    assert_eq!(e["routes"][0]["result"]["result"], "delivering", "{e}");
    assert_eq!(e["routes"][0]["steps"][0]["outcome"], "error");
    assert_eq!(e["deliveries"][0]["status"], "delivered");
    gw.shutdown().await.unwrap();

    // The default: dead-letter — kept, visible, and replayable.
    let gw = TestGateway::start(&config("", ""), &rx, &["misbehave"]).await;
    let id = gw.accept("bad", panic.clone()).await;
    let e = gw.settled(&id).await;
    assert_eq!(e["routes"][0]["result"]["result"], "failed", "{e}");
    assert_eq!(gw.post_api(&format!("/v1/events/{id}/replay")).await.0, 202);
    gw.shutdown().await.unwrap();

    // A plugin's own `on_error` overrides the route's, either way.
    let gw = TestGateway::start(
        &config("", r#", on_error = "skip-plugin""#),
        &rx,
        &["misbehave"],
    )
    .await;
    let e = gw.settled(&gw.accept("bad", panic.clone()).await).await;
    assert_eq!(e["routes"][0]["result"]["result"], "delivering", "{e}");
    gw.shutdown().await.unwrap();
    let gw = TestGateway::start(
        &config(
            r#"on_error = "skip-plugin""#,
            r#", on_error = "dead-letter""#,
        ),
        &rx,
        &["misbehave"],
    )
    .await;
    let e = gw.settled(&gw.accept("bad", panic).await).await;
    assert_eq!(e["routes"][0]["result"]["result"], "failed", "{e}");
    gw.shutdown().await.unwrap();
}

/// The `calls` count the misbehave fixture keeps in its instance, as delivered.
async fn calls_of(gw: &TestGateway, body: &str) -> Option<u64> {
    let id = gw.accept("bad", body.to_string()).await;
    let e = gw.settled(&id).await;
    let delivered = e["deliveries"].as_array().unwrap().first().cloned()?;
    let url = delivered["url"].as_str().unwrap();
    let calls = url.split("calls=").nth(1)?.split('&').next()?;
    calls.parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_instances_are_recycled_and_never_reused_after_a_trap() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config("", r#", instance = "warm""#), &rx, &["misbehave"]).await;
    let fine = r#"{"mode":"fine"}"#;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(calls_of(&gw, fine).await.unwrap());
    }
    assert_eq!(
        seen,
        [1, 2, 3, 1],
        "an instance serves 3 events, then a new one takes over"
    );

    assert_eq!(calls_of(&gw, fine).await, Some(2));
    assert_eq!(calls_of(&gw, r#"{"mode":"panic"}"#).await, None);
    assert_eq!(
        calls_of(&gw, fine).await,
        Some(1),
        "the trapped instance was thrown away"
    );

    let (_, plugins) = gw.get("/v1/plugins").await;
    assert_eq!(plugins["items"][0]["warm_instances"], 1);
    gw.shutdown().await.unwrap();

    // Fresh mode (the default for a small plugin): every event gets a new instance.
    let gw = TestGateway::start(&config("", ""), &rx, &["misbehave"]).await;
    for _ in 0..3 {
        assert_eq!(calls_of(&gw, fine).await, Some(1));
    }
    let (_, plugins) = gw.get("/v1/plugins").await;
    assert_eq!(plugins["items"][0]["default_instance"], "fresh");
    gw.shutdown().await.unwrap();
}

/// An event for the `misbehave` fixture, called on the runtime directly: its body says
/// how to misbehave.
fn misbehave_event(body: &str) -> switchyard::event::Event {
    switchyard::event::Event {
        id: "e".into(),
        source: "bad".into(),
        received_at: 0,
        method: "POST".into(),
        path: "/v1/ingest/bad".into(),
        query: String::new(),
        headers: vec![],
        content_type: Some("application/json".into()),
        body: switchyard::event::Body::from(body.as_bytes().to_vec()),
        metadata: vec![],
        run: 0,
    }
}

/// A warm instance serves one configuration (a route's plugin entry): never another's, so
/// what one route's call leaves in memory no other route's call sees. At most
/// `warm_pool_size` are kept per configuration and four times that per plugin, the least
/// recently used going first; those of a configuration no longer in force go.
#[tokio::test(flavor = "multi_thread")]
async fn warm_instances_serve_one_configuration_each() {
    use std::sync::Arc;
    use switchyard::plugin::{
        CallInput, CallLimits, InstanceMode, PluginRuntime, PluginVerdict, RuntimeOptions,
    };

    let runtime = PluginRuntime::with_options(RuntimeOptions {
        warm_pool_size: 1,
        ..RuntimeOptions::default()
    })
    .unwrap();
    let plugin = runtime
        .load_file("misbehave", &crate::util::guest("misbehave"))
        .unwrap();
    let event = misbehave_event(r#"{"mode":"fine"}"#);
    // The calls the instance that took this one had served, this one included.
    let calls = |config: &Arc<[(String, String)]>| {
        let (plugin, event, config) = (&plugin, &event, config.clone());
        async move {
            let verdict = plugin
                .call(
                    event,
                    CallInput::config(config),
                    CallLimits::default(),
                    InstanceMode::Warm,
                )
                .await
                .unwrap();
            let PluginVerdict::Continue(update) = verdict else {
                panic!("{verdict:?}")
            };
            let (_, n) = (update.metadata.iter())
                .find(|(k, _)| k == "calls")
                .unwrap();
            n.parse::<u32>().unwrap()
        }
    };
    let configs: Vec<Arc<[(String, String)]>> = (0..6)
        .map(|i| Arc::from(vec![("route".to_string(), i.to_string())]))
        .collect();
    // The same configuration, the same instance; another (even with the same text), its own.
    assert_eq!(calls(&configs[0]).await, 1);
    assert_eq!(calls(&configs[0]).await, 2);
    let same_text: Arc<[(String, String)]> = Arc::from(configs[0].to_vec());
    assert_eq!(calls(&same_text).await, 1);
    assert_eq!(calls(&configs[1]).await, 1);
    assert_eq!(calls(&configs[0]).await, 3);
    assert_eq!(calls(&configs[1]).await, 2);
    drop(same_text);
    // Four kept in all (`warm_pool_size` 1): a fifth configuration's instance puts out the
    // least recently used one's (configs[0]); one no longer in force goes at once.
    for config in &configs[2..5] {
        assert_eq!(calls(config).await, 1);
    }
    assert_eq!(plugin.warm_instances(), 4);
    assert_eq!(calls(&configs[0]).await, 1, "its instance was put out");
    assert_eq!(calls(&configs[4]).await, 2, "its instance was kept");
    drop(configs);
    assert_eq!(calls(&Arc::from(vec![])).await, 1);
    assert_eq!(plugin.warm_instances(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_failing_again_and_again_is_degraded_until_it_succeeds() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config("", ""), &rx, &["misbehave"]).await;
    let degraded = |v: &Value| v["items"][0]["degraded"].as_bool().unwrap();
    for i in 1..=3 {
        let id = gw.accept("bad", r#"{"mode":"error"}"#).await;
        gw.settled(&id).await;
        let (_, plugins) = gw.get("/v1/plugins").await;
        assert_eq!(degraded(&plugins), i == 3, "after {i} failures: {plugins}");
        assert_eq!(
            plugins["items"][0]["status"], "ok",
            "the file itself is fine"
        );
    }
    let (_, plugins) = gw.get("/v1/plugins").await;
    assert_eq!(plugins["items"][0]["routes"], json!(["bad"]));
    let id = gw.accept("bad", r#"{"mode":"fine"}"#).await;
    gw.settled(&id).await;
    let (_, plugins) = gw.get("/v1/plugins").await;
    assert!(!degraded(&plugins));
    assert_eq!(plugins["items"][0]["consecutive_failures"], 0);
    gw.shutdown().await.unwrap();
}
