//! The spine end to end: ingest → plugin chain → deliveries, through a real gateway and a
//! real receiver.

use serde_json::{Value, json};

use crate::util::{Receiver, TestGateway, dir_with_plugin_bytes, sample_event};

const ONOMONDO_FILTER: &str = r#"
[[sources]]
name = "onomondo"
[[destinations]]
name = "sink"
url = "{receiver}/sink"
[[routes]]
source = "onomondo"
plugins = [{ name = "event-filter", config = { allow = "usage" } }]
destinations = ["sink"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn filter_drops_unwanted_types_and_passes_the_rest() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(ONOMONDO_FILTER, &rx, &["event-filter"]).await;

    let dropped = gw
        .accept("onomondo", sample_event("onomondo-location.json"))
        .await;
    let kept = gw
        .accept("onomondo", sample_event("onomondo-usage.json"))
        .await;

    let e = gw.settled(&dropped).await;
    assert_eq!(e["routes"][0]["result"]["result"], "dropped");
    assert_eq!(
        e["routes"][0]["result"]["reason"],
        "event type `location` is not allowed"
    );
    assert_eq!(e["deliveries"], json!([]));

    let e = gw.settled(&kept).await;
    assert_eq!(e["deliveries"][0]["status"], "delivered");
    let got = rx.wait_for(1).await;
    gw.shutdown().await.unwrap();
    assert_eq!(rx.requests().len(), 1, "only the usage event is delivered");
    assert_eq!(got[0].json()["type"], "usage");
    assert_eq!(got[0].uri, "/sink");
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].header("content-type"), Some("application/json"));
    assert!(got[0].header("webhook-id").unwrap().starts_with("dlv_"));
    assert_eq!(got[0].header("switchyard-event-id"), Some(kept.as_str()));
}

const NORMALIZE: &str = r#"
[[sources]]
name = "iot"
[[destinations]]
name = "sink"
url = "{receiver}/ce"
[[routes]]
source = "iot"
plugins = [{ name = "iot-normalize" }]
destinations = ["sink"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn normalize_reshapes_every_provider_into_cloudevents() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(NORMALIZE, &rx, &["iot-normalize"]).await;
    let samples = [
        "onomondo-usage.json",
        "bondio-attachment-activated.json",
        "mobilemanager-order.json",
        "1nce-telemetry.json",
    ];
    for s in samples {
        gw.accept("iot", sample_event(s)).await;
    }
    let got = rx.wait_for(samples.len()).await;
    gw.shutdown().await.unwrap();
    let by_type = |t: &str| -> Value {
        got.iter()
            .map(|r| r.json())
            .find(|j| j["type"] == t)
            .unwrap_or_else(|| panic!("no event of type {t}"))
    };

    let onomondo = by_type("onomondo.usage");
    assert_eq!(onomondo["specversion"], "1.0");
    assert_eq!(onomondo["id"], "d08592fd-823e-3d4d-af99-1509a7220fb4");
    assert_eq!(onomondo["subject"], "8945738730000000012");
    assert_eq!(onomondo["time"], "2020-04-23T11:39:01.000Z");
    assert_eq!(onomondo["data"]["bytes"], 9484);

    let bondio = by_type("bondio.attachment.activated");
    assert_eq!(
        bondio["time"], "2024-11-01T15:23:26.000Z",
        "unix time to RFC 3339"
    );
    assert_eq!(bondio["subject"], "89928374298342734");
    assert_eq!(bondio["data"]["attachmentId"], "pattch_3rnplcna");

    let order = by_type("mobilemanager.order");
    assert_eq!(order["data"]["StateName"], "Complete");
    assert_eq!(order["data"]["TypeName"], "SimSwap");
    assert_eq!(order["data"]["State"], 1);

    let telemetry = by_type("1nce.TELEMETRY_DATA");
    assert_eq!(telemetry["subject"], "8988280666000000001");
}

#[tokio::test(flavor = "multi_thread")]
async fn tag_router_fans_out_to_two_destinations() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "onomondo"
[[destinations]]
name = "fleet"
url = "{receiver}/fleet"
[[destinations]]
name = "archive"
url = "{receiver}/archive"
[[routes]]
source = "onomondo"
plugins = [{ name = "tag-router", config = { "label.valid-example" = "fleet,archive", "label.other" = "archive" } }]
"#;
    let gw = TestGateway::start(config, &rx, &["tag-router"]).await;
    let id = gw
        .accept("onomondo", sample_event("onomondo-location.json"))
        .await;
    let unmatched = gw
        .accept("onomondo", r#"{"type":"sms","sim_label":"nobody"}"#)
        .await;

    let got = rx.wait_for(2).await;
    let e = gw.settled(&id).await;
    let u = gw.settled(&unmatched).await;
    gw.shutdown().await.unwrap();

    let mut paths: Vec<&str> = got.iter().map(|r| r.uri.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["/archive", "/fleet"]);
    assert_eq!(got[0].body, got[1].body, "both get the same payload");
    assert_ne!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    assert_eq!(e["deliveries"].as_array().unwrap().len(), 2);
    assert_eq!(
        u["routes"][0]["result"]["reason"],
        "no routing rule matched"
    );
    assert_eq!(rx.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn placeholders_fill_url_and_headers() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "dev"
[[destinations]]
name = "sink"
url = "{receiver}/d/:source:?iccid=:iccid:&imsi=:imsi:&label=:label:&keep=:unknown:&type=:event_type:"
headers = { "x-ip" = ":ip:", "x-imsi" = ":imsi:", "x-tracking" = ":tracking_id:", "x-note" = ":note:" }
[[routes]]
source = "dev"
plugins = [{ name = "metadata-inject", config = { label = "/device/label", note = "/note" } }]
destinations = ["sink"]
"#;
    let gw = TestGateway::start(config, &rx, &["metadata-inject"]).await;
    let body = json!({
        "type": "usage",
        "iccid": "8945738730000000012",
        "ipv4": "123.01.23.012",
        "device": { "label": "a b&c=d/é" },
        "note": "line1\r\nx-injected: yes"
    });
    let id = gw.accept("dev", body.to_string()).await;
    let got = rx.wait_for(1).await;
    gw.shutdown().await.unwrap();

    assert_eq!(
        got[0].uri,
        "/d/dev?iccid=8945738730000000012&imsi=none&label=a%20b%26c%3Dd%2F%C3%A9&keep=:unknown:&type=usage"
    );
    assert_eq!(got[0].header("x-ip"), Some("123.01.23.012"));
    assert_eq!(
        got[0].header("x-imsi"),
        Some("none"),
        "known and missing: none"
    );
    assert_eq!(
        got[0].header("x-tracking"),
        Some(":tracking_id:"),
        "unknown: unchanged"
    );
    assert_eq!(
        got[0].header("x-note"),
        Some(":note:"),
        "a value with CR/LF is never a header"
    );
    assert!(got[0].header("x-injected").is_none());
    assert_eq!(got[0].header("switchyard-event-id"), Some(id.as_str()));
}

/// A destination's `method` (here `PUT` to a URL that names the event, as an upsert
/// wants) applies to every attempt and a replay, and to a destination made through the
/// API and its test message; a method with no body to carry is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_destination_may_take_put_or_patch() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "dev"
[[destinations]]
name = "docs"
url = "{receiver}/docs/:event_id:"
method = "PUT"
[[routes]]
source = "dev"
destinations = ["docs"]
"#;
    let gw = TestGateway::start(config, &rx, &[]).await;
    let id = gw.accept("dev", r#"{"type":"usage"}"#).await;
    gw.settled(&id).await;
    assert_eq!(gw.post_api(&format!("/v1/events/{id}/replay")).await.0, 202);
    let got = rx.wait_for(2).await;
    for r in &got {
        assert_eq!(
            (r.method.as_str(), r.uri.as_str()),
            ("PUT", &*format!("/docs/{id}"))
        );
        assert_eq!(r.body, r#"{"type":"usage"}"#.as_bytes());
    }
    let made = json!({ "name": "notes", "url": format!("{}/notes", rx.url), "method": "PATCH" });
    let shown = gw.create("/v1/destinations", made).await;
    assert_eq!(shown["method"], "PATCH", "{shown}");
    let (status, tested) = gw.post_api("/v1/destinations/notes/test").await;
    assert_eq!((status, &tested["ok"]), (200, &json!(true)), "{tested}");
    let got = rx.wait_for(3).await;
    assert_eq!(
        (got[2].method.as_str(), got[2].uri.as_str()),
        ("PATCH", "/notes")
    );
    let delete = json!({ "name": "gone", "url": format!("{}/x", rx.url), "method": "DELETE" });
    let (status, refused) = gw.send("POST", "/v1/destinations", Some(delete)).await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("method"),
        "{refused}"
    );
    gw.shutdown().await.unwrap();
}

const MISBEHAVE: &str = r#"
[plugins]
deadline = "200ms"
max_memory_bytes = 16777216
[[sources]]
name = "bad"
[[sources]]
name = "good"
[[destinations]]
name = "sink"
url = "{receiver}/:source:"
[[routes]]
source = "bad"
plugins = [{ name = "misbehave" }]
destinations = ["sink"]
[[routes]]
source = "good"
plugins = [{ name = "event-filter", config = { allow = "usage" } }]
destinations = ["sink"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_trapping_plugin_fails_only_its_event() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(MISBEHAVE, &rx, &["misbehave", "event-filter"]).await;

    let cases = [
        ("panic", "trapped"),
        ("unreachable", "trapped"),
        ("loop", "deadline"),
        ("alloc", "trapped"),
        ("error", "asked to fail"),
    ];
    let mut failing = Vec::new();
    for (mode, _) in cases {
        failing.push(gw.accept("bad", json!({ "mode": mode }).to_string()).await);
        // Events of another route keep flowing while the plugin misbehaves.
        gw.accept("good", r#"{"type":"usage"}"#).await;
    }
    let fine = gw.accept("bad", r#"{"mode":"fine"}"#).await;

    for ((mode, expected), id) in cases.iter().zip(&failing) {
        let e = gw.settled(id).await;
        let route = &e["routes"][0];
        assert_eq!(route["result"]["result"], "failed", "{mode}: {e}");
        let error = route["result"]["error"].as_str().unwrap();
        assert!(
            error.contains("misbehave") && error.contains(expected),
            "{mode}: {error}"
        );
        assert_eq!(route["steps"][0]["outcome"], "error");
        assert_eq!(e["deliveries"], json!([]));
    }
    let e = gw.settled(&fine).await;
    assert_eq!(e["deliveries"][0]["status"], "delivered");
    let got = rx.wait_for(cases.len() + 1).await;
    assert_eq!(got.iter().filter(|r| r.uri == "/good").count(), cases.len());
    assert_eq!(got.iter().filter(|r| r.uri == "/bad").count(), 1);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_is_a_recorded_plugin_error() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(ONOMONDO_FILTER, &rx, &["event-filter"]).await;
    let as_printed = std::fs::read(
        xtask::workspace_root().join("examples/events/invalid/onomondo-usage-as-printed.json"),
    )
    .unwrap();
    let id = gw.accept("onomondo", as_printed).await;
    let e = gw.settled(&id).await;
    let step = &e["routes"][0]["steps"][0];
    assert_eq!(step["plugin"], "event-filter");
    assert_eq!(step["outcome"], "error");
    let error = step["error"].as_str().unwrap();
    assert!(
        error.contains("invalid event: body is not valid JSON"),
        "{error}"
    );
    // The gateway keeps serving.
    let ok = gw
        .accept("onomondo", sample_event("onomondo-usage.json"))
        .await;
    assert_eq!(
        gw.settled(&ok).await["deliveries"][0]["status"],
        "delivered"
    );
    gw.shutdown().await.unwrap();
}

/// A source that `require_json` answers a malformed body with `400` saying where it stops
/// being JSON — the sender sees its mistake — and stores nothing of it; the refusal is
/// counted and shown with the source, and the API's dry run refuses it alike.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_that_requires_json_refuses_a_malformed_body_saying_where() {
    let rx = Receiver::start().await;
    let config = ONOMONDO_FILTER.replace(
        "name = \"onomondo\"\n",
        "name = \"onomondo\"\nrequire_json = true\n",
    );
    let gw = TestGateway::start(&config, &rx, &["event-filter"]).await;
    let as_printed = std::fs::read(
        xtask::workspace_root().join("examples/events/invalid/onomondo-usage-as-printed.json"),
    )
    .unwrap();
    let told = "the body is not valid JSON: expected `,` or `}` at line 10 column 1 \
                (source `onomondo` takes JSON bodies only)";
    let (status, answer) = gw.post("onomondo", as_printed.clone()).await;
    assert_eq!((status, answer["error"].as_str()), (400, Some(told)));
    let (status, answer) = gw.post("onomondo", "").await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("the body is empty"),
        "{answer}"
    );
    // The dry run of it is refused as ingest refuses it.
    let resp = (gw.client)
        .post(format!("{}/v1/sources/onomondo/dry-run", gw.url))
        .body(as_printed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], told);
    // A well-formed one goes through.
    let ok = gw
        .accept("onomondo", sample_event("onomondo-usage.json"))
        .await;
    assert_eq!(
        gw.settled(&ok).await["deliveries"][0]["status"],
        "delivered"
    );
    let (_, events) = gw.get("/v1/events?source=onomondo").await;
    assert_eq!(events["items"].as_array().unwrap().len(), 1, "{events}");
    let metrics = gw.metrics().await;
    let line =
        r#"switchyard_events_received_total{source="onomondo",result="rejected_invalid_json"} 2"#;
    assert!(metrics.contains(line), "{metrics}");
    let (_, source) = gw.get("/v1/sources/onomondo").await;
    assert_eq!(source["require_json"], true, "{source}");
    let newest = &source["refused"]["recent"][1];
    assert_eq!(
        (&newest["status"], &newest["reason"], &newest["error"]),
        (&json!(400), &json!("rejected_invalid_json"), &json!(told)),
        "{source}"
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ingest_errors_are_json() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(ONOMONDO_FILTER, &rx, &["event-filter"]).await;

    let (status, body) = gw.post("nowhere", "{}").await;
    assert_eq!(status, 404);
    assert_eq!(body, json!({ "error": "no source named `nowhere`" }));

    let big = vec![b'x'; (1 << 20) + 1];
    let (status, body) = gw.post("onomondo", big).await;
    assert_eq!(status, 413);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("limit of 1048576 bytes")
    );

    let resp = gw
        .client
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = gw
        .client
        .get(format!("{}/v1/events/nope", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("nope"));

    // A known path with a method it does not take: 405, the methods in `Allow`, JSON.
    for (method, path, allow) in [
        ("GET", "/v1/ingest/onomondo", "POST"),
        ("PUT", "/v1/destinations", "GET,HEAD,POST"),
    ] {
        let resp = gw
            .client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", gw.url),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        let allowed = resp.headers()["allow"].to_str().unwrap().replace(' ', "");
        let mut allowed: Vec<&str> = allowed.split(',').collect();
        allowed.sort();
        assert_eq!(allowed.join(","), allow, "{method} {path}");
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains(method), "{body}");
    }
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_plugin_file_is_reported_at_startup_by_name() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "s"
[[destinations]]
name = "sink"
url = "{receiver}/"
[[routes]]
source = "s"
plugins = [{ name = "broken" }]
destinations = ["sink"]
"#;
    let dir = dir_with_plugin_bytes("broken.wasm", b"\0asm garbage, not a component");
    let err = match TestGateway::start_in(dir, config, &rx).await {
        Ok(_) => panic!("a gateway with a broken plugin must not start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("broken.wasm"), "{err}");
    assert!(err.contains("not a valid WebAssembly component"), "{err}");

    // A missing plugin is named too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins.d")).unwrap();
    let err = match TestGateway::start_in(dir, config, &rx).await {
        Ok(_) => panic!("a gateway with a missing plugin must not start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("broken"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_transient_failures_and_records_attempts() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "s"
[[destinations]]
name = "down"
url = "{receiver}/status/503"
[[destinations]]
name = "gone"
url = "{receiver}/status/404"
[[routes]]
source = "s"
destinations = ["down", "gone"]
"#;
    let gw = TestGateway::start(config, &rx, &[]).await;
    let id = gw.accept("s", "{}").await;
    let e = gw.settled(&id).await;
    gw.shutdown().await.unwrap();
    let deliveries = e["deliveries"].as_array().unwrap();
    let down = deliveries
        .iter()
        .find(|d| d["destination"] == "down")
        .unwrap();
    let gone = deliveries
        .iter()
        .find(|d| d["destination"] == "gone")
        .unwrap();
    assert_eq!(down["status"], "failed");
    assert_eq!(
        down["attempts"].as_array().unwrap().len(),
        3,
        "5xx is retried: {down}"
    );
    assert_eq!(down["attempts"][2]["status_code"], 503);
    assert_eq!(gone["status"], "failed");
    assert_eq!(
        gone["attempts"].as_array().unwrap().len(),
        1,
        "404 is not retried: {gone}"
    );
    // Every retry carries the same webhook-id.
    let ids: Vec<_> = rx
        .requests()
        .iter()
        .filter(|r| r.uri == "/status/503")
        .map(|r| r.header("webhook-id").unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.iter().all(|i| *i == ids[0]));
}

/// A destination's `event_types` take names as they are and patterns with `*`; an event
/// of another type is `skipped` for it.
#[tokio::test(flavor = "multi_thread")]
async fn destination_event_types_select_what_is_delivered() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "onomondo"
[[sources]]
name = "bondio"
[[destinations]]
name = "usage-only"
url = "{receiver}/usage-only"
event_types = ["usage"]
[[destinations]]
name = "network"
url = "{receiver}/network"
event_types = ["network-*", "location"]
[[destinations]]
name = "attachments"
url = "{receiver}/attachments"
event_types = ["attachment.*"]
[[destinations]]
name = "all"
url = "{receiver}/all"
[[routes]]
source = "onomondo"
destinations = ["usage-only", "network", "all"]
[[routes]]
source = "bondio"
destinations = ["attachments"]
"#;
    let gw = TestGateway::start(config, &rx, &[]).await;
    let mut ids = Vec::new();
    for (source, file) in [
        ("onomondo", "onomondo-sms.json"),
        ("onomondo", "onomondo-usage.json"),
        ("onomondo", "onomondo-network-registration.json"),
        ("bondio", "bondio-attachment-activated.json"),
        ("bondio", "bondio-subscription-threshold-breached.json"),
    ] {
        ids.push((file, gw.accept(source, sample_event(file)).await));
    }
    let mut skipped = Vec::new();
    for (file, id) in &ids {
        let e = gw.settled(id).await;
        for d in e["deliveries"].as_array().unwrap() {
            if d["status"] == "skipped" {
                skipped.push(format!("{file} {}", d["destination"].as_str().unwrap()));
            }
        }
    }
    gw.shutdown().await.unwrap();
    assert_eq!(
        skipped,
        [
            "onomondo-sms.json usage-only",
            "onomondo-sms.json network",
            "onomondo-usage.json network",
            "onomondo-network-registration.json usage-only",
            "bondio-subscription-threshold-breached.json attachments",
        ]
    );
    let mut uris: Vec<String> = rx.requests().into_iter().map(|r| r.uri).collect();
    uris.sort();
    assert_eq!(
        uris,
        [
            "/all",
            "/all",
            "/all",
            "/attachments",
            "/network",
            "/usage-only"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_accepted_events() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "s"
[[destinations]]
name = "sink"
url = "{receiver}/"
[[routes]]
source = "s"
plugins = [{ name = "event-filter", config = { allow = "usage" } }]
destinations = ["sink"]
"#;
    let gw = TestGateway::start(config, &rx, &["event-filter"]).await;
    let n = 200;
    for i in 0..n {
        gw.accept("s", json!({ "type": "usage", "n": i }).to_string())
            .await;
    }
    gw.shutdown().await.unwrap();
    let got = rx.requests();
    assert_eq!(
        got.len(),
        n,
        "every accepted event is delivered before shutdown completes"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn quickstart_config_accepts_every_sample_event() {
    let rx = Receiver::start().await;
    let root = xtask::workspace_root();
    let text = std::fs::read_to_string(root.join("examples/quickstart/switchyard.toml")).unwrap();
    let (fleet, archive) = (format!("{}/fleet", rx.url), format!("{}/archive", rx.url));
    let roaming = format!("{}/roaming", rx.url);
    let env = |name: &str| match name {
        "FLEET_URL" => Some(fleet.clone()),
        "ARCHIVE_URL" => Some(archive.clone()),
        "ROAMING_URL" => Some(roaming.clone()),
        "SWITCHYARD_API_TOKEN" => Some(crate::util::API_TOKEN.to_string()),
        _ => None,
    };
    let dir = TestGateway::dir_with_plugins(crate::util::QUICKSTART_PLUGINS);
    std::fs::create_dir(dir.path().join("tables")).unwrap();
    let sims = root.join("examples/quickstart/tables/sims.csv");
    std::fs::copy(sims, dir.path().join("tables/sims.csv")).unwrap();
    let gw = TestGateway::start_raw(dir, &text, &env).await.unwrap();

    let mut ids = Vec::new();
    for entry in std::fs::read_dir(root.join("examples/events")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let source = name.split('-').next().unwrap().to_string();
            let (status, answer) = gw.post(&source, std::fs::read(&path).unwrap()).await;
            assert_eq!(status, 202, "{name}: {answer}");
            ids.push((name, answer["id"].as_str().unwrap().to_string()));
        }
    }
    assert!(
        ids.len() >= 16,
        "every Onomondo type, Bondio, Mobile Manager and 1NCE"
    );
    for (name, id) in &ids {
        let e = gw.settled(id).await;
        for route in e["routes"].as_array().unwrap() {
            assert_ne!(route["result"]["result"], "failed", "{name}: {e}");
        }
        assert!(
            e["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["status"] == "delivered"),
            "{name} reached a destination: {e}"
        );
    }
    let fleet = rx
        .requests()
        .into_iter()
        .find(|r| r.uri.starts_with("/fleet") && r.json()["source"] == "1nce")
        .unwrap();
    assert_eq!(fleet.uri, "/fleet?iccid=8988280666000000001&ip=10.100.0.17");
    assert_eq!(fleet.header("x-device-imsi"), Some("901405100000001"));
    assert_eq!(fleet.header("x-api-key"), Some("demo-key"));
    // The SIM's customer, from the quickstart's lookup table.
    assert_eq!(fleet.header("x-customer"), Some("globex"));
    // The roaming feed: the SIM's location and registration events (the same network,
    // processed at once) pass once, the network seen for the first time.
    let roaming: Vec<_> = (rx.requests().into_iter())
        .filter(|r| r.uri == "/roaming")
        .collect();
    assert_eq!(
        roaming.len(),
        1,
        "one of the SIM's two events on one network"
    );
    assert_eq!(roaming[0].header("x-previous-network"), Some("[]"));
    gw.shutdown().await.unwrap();
}
