//! `/metrics` (Prometheus text) and `/readyz` from outside.

use crate::util::{Receiver, TestGateway, start_binary_logging};

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_every_stage() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "s"
[[destinations]]
name = "ok"
url = "{receiver}/ok"
[[destinations]]
name = "bad"
url = "{receiver}/status/400"
[[routes]]
source = "s"
plugins = [{ name = "event-filter", config = { allow = "usage" } }]
destinations = ["ok", "bad"]
"#;
    let gw = TestGateway::start(config, &rx, &["event-filter"]).await;
    let (status, ready) = gw.get("/readyz").await;
    assert_eq!((status, ready["ready"].as_bool()), (200, Some(true)));

    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(gw.accept("s", r#"{"type":"usage"}"#).await);
    }
    ids.push(gw.accept("s", r#"{"type":"sms"}"#).await);
    // Not JSON: the plugin fails, the route dead-letters the event.
    ids.push(gw.accept("s", "not json").await);
    assert_eq!(gw.post("nope", "{}").await.0, 404);
    let dup = || async {
        let resp = gw
            .client
            .post(format!("{}/v1/ingest/s", gw.url))
            .header("idempotency-key", "k")
            .body(r#"{"type":"sms"}"#)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap();
        (status, body["id"].as_str().unwrap().to_string())
    };
    let (first, again) = (dup().await, dup().await);
    assert_eq!((first.0, again.0, &again.1), (202, 200, &first.1));
    ids.push(first.1);
    for id in &ids {
        gw.settled(id).await;
    }

    let resp = gw
        .client
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = resp.text().await.unwrap();
    let get =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no `{series}` in\n{text}"));

    assert_eq!(
        get(r#"switchyard_events_received_total{source="s",result="accepted"}"#),
        6.0
    );
    assert_eq!(
        get(r#"switchyard_events_received_total{source="s",result="duplicate"}"#),
        1.0
    );
    // The six accepted took some time each, all of it well under a second here.
    assert_eq!(get(r#"switchyard_ingest_seconds_count{source="s"}"#), 6.0);
    let accepting = get(r#"switchyard_ingest_seconds_sum{source="s"}"#);
    assert!(accepting > 0.0 && accepting < 6.0, "{accepting}");
    // A timestamp gauge is a recent Unix time, and the object's view shows it in ms.
    let shown_recent = async |series: &str, path: &str, field: &str| {
        let last = get(series);
        let now = switchyard::delivery::now_ms() as f64 / 1000.0;
        assert!((now - 120.0..=now + 1.0).contains(&last), "{last} vs {now}");
        let (_, view) = gw.get(path).await;
        assert_eq!(view[field], (last * 1000.0).round() as u64, "{view}");
    };
    // When the source last had an event accepted, to alert on a quiet sender.
    shown_recent(
        r#"switchyard_source_last_accepted_timestamp_seconds{source="s"}"#,
        "/v1/sources/s",
        "last_accepted_at",
    )
    .await;
    assert_eq!(
        get(
            r#"switchyard_events_received_total{source="unknown",result="rejected_unknown_source"}"#
        ),
        1.0
    );
    let version = text
        .lines()
        .find_map(|l| l.split("version=\"").nth(1))
        .map(|v| v[..12].to_string())
        .unwrap();
    let calls = |outcome: &str| {
        get(&format!(
            r#"switchyard_plugin_call_seconds_count{{plugin="event-filter",version="{version}",outcome="{outcome}"}}"#
        ))
    };
    assert_eq!(calls("continue"), 3.0);
    assert_eq!(calls("drop"), 2.0);
    assert_eq!(calls("error"), 1.0);
    let routes = |result: &str| {
        get(&format!(
            r#"switchyard_route_outcomes_total{{route="s",result="{result}"}}"#
        ))
    };
    assert_eq!(
        (routes("delivering"), routes("dropped"), routes("failed")),
        (3.0, 2.0, 1.0)
    );
    assert_eq!(
        get(r#"switchyard_deliveries_total{destination="ok",outcome="delivered"}"#),
        3.0
    );
    assert_eq!(
        get(r#"switchyard_deliveries_total{destination="bad",outcome="failed"}"#),
        3.0
    );
    assert_eq!(
        get(r#"switchyard_delivery_attempts_total{destination="bad",outcome="failure"}"#),
        3.0
    );
    // Receipt to a successful answer: three deliveries to `ok`, each well under a minute.
    assert_eq!(
        get(r#"switchyard_delivery_latency_seconds_count{destination="ok"}"#),
        3.0
    );
    let latency = get(r#"switchyard_delivery_latency_seconds_sum{destination="ok"}"#);
    assert!(latency > 0.0 && latency < 60.0, "{latency}");
    assert!(
        sample(
            &text,
            r#"switchyard_delivery_latency_seconds_count{destination="bad"}"#
        )
        .is_none(),
        "failed deliveries have no latency"
    );
    // When a destination last got an event: in /metrics (to alert on a receiver that stops
    // getting anything) and with the destination in the API; none for one never delivered.
    shown_recent(
        r#"switchyard_destination_last_delivered_timestamp_seconds{destination="ok"}"#,
        "/v1/destinations/ok",
        "last_delivered_at",
    )
    .await;
    let (_, bad) = gw.get("/v1/destinations/bad").await;
    assert!(bad.get("last_delivered_at").is_none(), "{bad}");
    assert!(
        !text.contains(r#"last_delivered_timestamp_seconds{destination="bad"}"#),
        "{text}"
    );
    assert_eq!(get("switchyard_queue_depth"), 0.0);
    assert_eq!(get("switchyard_pending_deliveries"), 0.0);
    assert_eq!(get("switchyard_oldest_pending_delivery_age_seconds"), 0.0);
    assert_eq!(
        get(r#"switchyard_destination_state{destination="ok",state="ACTIVE"}"#),
        1.0
    );
    assert_eq!(
        get(r#"switchyard_destination_state{destination="ok",state="FAILED"}"#),
        0.0
    );
    assert_eq!(get(r#"switchyard_reloads_total{result="ok"}"#), 1.0);
    gw.shutdown().await.unwrap();
}

/// Each stage logs inside a span named after it that carries the event's id, so an
/// operator can follow one event through `--log-format json` (the real binary).
#[tokio::test(flavor = "multi_thread")]
async fn every_stage_logs_in_a_span_carrying_the_event_id() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&["event-filter"]);
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
data_dir = "./data"
[delivery]
allowed_networks = ["127.0.0.0/8"]
[[sources]]
name = "s"
[[destinations]]
name = "ok"
url = "{}/ok"
[[routes]]
source = "s"
plugins = [{{ name = "event-filter", config = {{ allow = "usage" }} }}]
destinations = ["ok"]
"#,
            rx.url
        ),
    )
    .unwrap();
    let (_child, url, log) = start_binary_logging(&config, "info,switchyard=debug").await;
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/ingest/s"))
        .body(r#"{"type":"usage"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    rx.wait_for(1).await;

    // The message each stage logs at debug, and the span it must be logged in.
    let stages = [
        ("Event accepted.", "ingest"),
        ("Event processed.", "pipeline"),
        ("Delivered.", "delivery"),
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for (message, span) in stages {
        let line = loop {
            let found = log
                .lock()
                .unwrap()
                .iter()
                .find(|l| l["fields"]["message"] == message)
                .cloned();
            match found {
                Some(line) => break line,
                None if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                None => panic!("no `{message}` line in {:#?}", log.lock().unwrap()),
            }
        };
        assert_eq!(line["span"]["name"], span, "{line}");
        assert_eq!(line["span"]["event_id"], id.as_str(), "{line}");
    }
}

/// GETs `path` accepting gzip: the status, the `content-encoding`, and the body decoded.
async fn get_gzip(gw: &TestGateway, path: &str) -> (u16, Option<String>, String) {
    use std::io::Read;
    let resp = gw
        .client
        .get(format!("{}{path}", gw.url))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let coding = (resp.headers().get("content-encoding")).map(|v| v.to_str().unwrap().to_string());
    let bytes = resp.bytes().await.unwrap();
    let mut text = String::new();
    match coding.as_deref() {
        Some("gzip") => {
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_string(&mut text)
                .unwrap();
        }
        _ => text = String::from_utf8(bytes.to_vec()).unwrap(),
    }
    (status, coding, text)
}

#[tokio::test(flavor = "multi_thread")]
async fn large_answers_are_gzipped_for_clients_that_accept_it() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(
        "[[sources]]\nname = \"a\"\n[[destinations]]\nname = \"d\"\nurl = \"{receiver}/d\"\n[[routes]]\nsource = \"a\"\ndestinations = [\"d\"]\n",
        &rx,
        &[],
    )
    .await;
    let id = gw.accept("a", r#"{"type":"usage"}"#).await;
    gw.settled(&id).await;

    let (status, coding, metrics) = get_gzip(&gw, "/metrics").await;
    assert_eq!((status, coding.as_deref()), (200, Some("gzip")));
    assert!(
        metrics.contains(r#"switchyard_events_received_total{source="a",result="accepted"} 1"#),
        "{metrics}"
    );
    let (status, coding, doc) = get_gzip(&gw, "/v1/openapi.json").await;
    assert_eq!((status, coding.as_deref()), (200, Some("gzip")));
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert!(doc["paths"]["/v1/ingest/{source}"].is_object());
    // Small answers go as they are; so does everything for a client that does not ask.
    let (status, coding, _) = get_gzip(&gw, "/healthz").await;
    assert_eq!((status, coding), (200, None));
    let resp = gw
        .client
        .post(format!("{}/v1/ingest/a", gw.url))
        .header("accept-encoding", "gzip")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(resp.headers().get("content-encoding"), None);
    let plain = gw.metrics().await;
    assert!(plain.starts_with("# HELP"), "{plain}");
    gw.shutdown().await.unwrap();
}

/// The example alerting rules (`examples/deploy/alerts.yml`) are YAML of Prometheus'
/// shape, and every metric their expressions name is one a gateway exports — so a renamed
/// metric cannot leave an alert that never fires.
#[tokio::test(flavor = "multi_thread")]
async fn the_example_alerts_name_metrics_the_gateway_exports() {
    let file = xtask::workspace_root().join("examples/deploy/alerts.yml");
    let out = std::process::Command::new(crate::tools::python_env().join("bin/python"))
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules = rules["groups"][0]["rules"].as_array().unwrap();
    assert!(rules.len() >= 5, "{rules:?}");

    // A gateway that has done a little of everything, so that each family has a series
    // (an empty one is not shown): a plugin call, a route outcome, a delivery, a
    // certificate watched (the harness's `[delivery]` table is open: the first line lands
    // in it).
    let rx = Receiver::start().await;
    let ca = xtask::workspace_root().join("tests/fixtures/tls/ca.pem");
    let config = format!(
        r#"ca_certificates = ["{}"]
[[sources]]
name = "s"
[[destinations]]
name = "d"
url = "{{receiver}}/in"
[[routes]]
source = "s"
plugins = [{{ name = "event-filter", config = {{ allow = "usage" }} }}]
destinations = ["d"]
"#,
        ca.display()
    );
    let gw = TestGateway::start(&config, &rx, &["event-filter"]).await;
    let id = gw.accept("s", r#"{"type":"usage"}"#).await;
    // (Settled in the store: the attempt's metrics were counted before it was recorded.)
    gw.settled(&id).await;
    let text = gw.metrics().await;
    // Every family with a series is declared (`# TYPE name kind`).
    let families: Vec<&str> = (text.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let exported = |name: &str| {
        ["_total", "_bucket", "_count", "_sum", ""]
            .iter()
            .any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|f| families.contains(&f))
            })
    };
    for rule in rules {
        let (alert, expr) = (&rule["alert"], rule["expr"].as_str().unwrap());
        assert!(
            alert.is_string() && rule["annotations"]["summary"].is_string(),
            "{rule}"
        );
        let names: Vec<&str> = (expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
            .filter(|w| w.starts_with("switchyard_"))
            .collect();
        assert!(!names.is_empty(), "{alert}: {expr}");
        for name in names {
            assert!(exported(name), "{alert}: `{name}` is not exported:\n{text}");
        }
    }
    gw.shutdown().await.unwrap();
}
