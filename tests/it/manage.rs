//! The management API's objects: sources, destinations and routes created, listed, read,
//! patched and deleted over HTTP, persisted across a restart, with field-naming errors;
//! and the whole API fuzzed from its own OpenAPI document by schemathesis.

use serde_json::{Value, json};

use crate::util::{API_TOKEN, Receiver, TestGateway, compress, now_ms};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A file with one source, destination and route; the API adds more.
const FILE: &str = r#"
[[sources]]
name = "onomondo"
[[destinations]]
name = "fleet"
url = "{receiver}/fleet"
[[routes]]
source = "onomondo"
destinations = ["fleet"]
"#;

/// A secret in a URL's query — a receiver's `?token=` — is shown as `****` wherever the
/// API shows the URL (the destination, each delivery of an event), sent in full, and kept
/// when a change echoes the URL as shown. (A plugin's config: `tests/it/outbound.rs`.)
#[tokio::test(flavor = "multi_thread")]
async fn secrets_in_urls_are_shown_redacted_and_sent_in_full() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(FILE, &rx, &["tag-router"]).await;
    let url = format!("{}/hook?region=eu&token=t-0123456789abcdef", rx.url);
    let d = gw
        .create("/v1/destinations", json!({ "name": "hook", "url": url }))
        .await;
    let shown = format!("{}/hook?region=eu&token=****", rx.url);
    assert_eq!(d["url"], shown.as_str(), "{d}");
    gw.create(
        "/v1/routes",
        json!({ "name": "hooked", "source": "onomondo", "destinations": ["hook"] }),
    )
    .await;
    // Echoed back as shown (a dashboard's edit of another field): the secret is kept.
    let (status, d) = gw
        .send(
            "PATCH",
            "/v1/destinations/hook",
            Some(json!({ "url": shown })),
        )
        .await;
    assert_eq!(status, 200, "{d}");
    let id = gw.accept("onomondo", r#"{"type":"usage"}"#).await;
    let e = gw.settled(&id).await;
    let hooked = (e["deliveries"].as_array().unwrap().iter())
        .find(|d| d["destination"] == "hook")
        .unwrap();
    assert_eq!(hooked["status"], "delivered", "{e}");
    assert_eq!(hooked["url"], shown.as_str(), "{e}");
    assert!(!e.to_string().contains("0123456789abcdef"), "{e}");
    let got = rx.wait_for(2).await;
    assert!(
        got.iter()
            .any(|r| r.uri == "/hook?region=eu&token=t-0123456789abcdef"),
        "sent in full: {:?}",
        got.iter().map(|r| &r.uri).collect::<Vec<_>>()
    );
    let (_, deliveries) = gw.get("/v1/deliveries?destination=hook").await;
    assert!(
        !deliveries.to_string().contains("0123456789abcdef"),
        "{deliveries}"
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn objects_round_trip_and_survive_a_restart() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(FILE, &rx, &["tag-router"]).await;

    // Create a destination with a secret header and a signing secret: both are shown
    // redacted, never in full.
    let d = gw
        .create(
            "/v1/destinations",
            json!({
                "name": "archive",
                "url": format!("{}/archive/:source:", rx.url),
                "headers": { "x-api-key": "k-0123456789abcdef", "x-region": "eu" },
                "signing": { "secret": SECRET },
                "retry": { "retry_schedule": ["0s", "10ms"] },
            }),
        )
        .await;
    assert_eq!(d["origin"], "api");
    assert_eq!(d["state"], "ACTIVE");
    assert_eq!(d["headers"]["x-api-key"], "****cdef");
    assert_eq!(d["headers"]["x-region"], "eu");
    assert_eq!(d["signing"]["secret"], "****LaSw");
    assert!(!d.to_string().contains("0123456789"), "{d}");
    assert_eq!(d["retry"]["retry_schedule"], json!(["0s", "10ms"]));

    let (status, s) = gw
        .send("POST", "/v1/sources", Some(json!({ "name": "bondio" })))
        .await;
    assert_eq!((status, s["origin"].as_str()), (201, Some("api")), "{s}");
    let r = gw
        .create(
            "/v1/routes",
            json!({
                "name": "bondio-archive",
                "source": "bondio",
                "plugins": [{ "name": "tag-router", "config": { "default": "archive" } }],
            }),
        )
        .await;
    assert_eq!(r["plugins"][0]["config"]["default"], "archive");

    // The new route works at once, and deliveries carry the real secret header.
    gw.accept("bondio", r#"{"n":1}"#).await;
    let got = rx.wait_for(1).await;
    assert_eq!(got[0].uri, "/archive/bondio");
    assert_eq!(got[0].header("x-api-key"), Some("k-0123456789abcdef"));
    assert!(got[0].header("webhook-signature").is_some());

    // Lists: file and api objects together, in name order, a page at a time.
    gw.send("POST", "/v1/sources", Some(json!({ "name": "mm" })))
        .await;
    let (status, page) = gw.get("/v1/sources?limit=2").await;
    assert_eq!(status, 200);
    let names = |p: &Value| -> Vec<String> {
        p["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&page), ["bondio", "mm"]);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, page) = gw
        .get(&format!("/v1/sources?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(names(&page), ["onomondo"]);
    assert_eq!(page["items"][0]["origin"], "file");
    assert!(page["next_cursor"].is_null());
    let (_, routes) = gw.get("/v1/routes").await;
    assert_eq!(names(&routes), ["bondio-archive", "onomondo"]);

    // PATCH: a merge patch; echoing the redacted secret keeps the real one, `null` removes.
    let (status, d) = gw
        .send(
            "PATCH",
            "/v1/destinations/archive",
            Some(json!({
                "url": format!("{}/archive2", rx.url),
                "headers": { "x-api-key": "****cdef", "x-region": null },
            })),
        )
        .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["url"], format!("{}/archive2", rx.url));
    assert!(d["headers"].get("x-region").is_none(), "{d}");
    gw.accept("bondio", r#"{"n":2}"#).await;
    let got = rx.wait_for(2).await;
    assert_eq!(got[1].uri, "/archive2");
    assert_eq!(got[1].header("x-api-key"), Some("k-0123456789abcdef"));

    // File objects are read-only here; used objects cannot be deleted; names are taken.
    let (status, e) = gw
        .send(
            "PATCH",
            "/v1/destinations/fleet",
            Some(json!({ "url": "http://127.0.0.1:1/" })),
        )
        .await;
    assert_eq!(status, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("config file"), "{e}");
    let (status, e) = gw.send("DELETE", "/v1/routes/onomondo", None).await;
    assert_eq!(status, 409, "{e}");
    let (status, e) = gw.send("DELETE", "/v1/sources/bondio", None).await;
    assert_eq!(status, 409, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("route `bondio-archive`"),
        "{e}"
    );
    let (status, e) = gw
        .send(
            "POST",
            "/v1/destinations",
            Some(json!({ "name": "fleet", "url": "http://127.0.0.1:1/" })),
        )
        .await;
    assert_eq!(status, 409, "{e}");
    let (status, e) = gw
        .send(
            "PATCH",
            "/v1/sources/bondio",
            Some(json!({ "name": "renamed" })),
        )
        .await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(gw.send("DELETE", "/v1/sources/nope", None).await.0, 404);
    assert_eq!(gw.get("/v1/routes/nope").await.0, 404);

    // A restart on the same data: the api objects are back and still route.
    let dir = gw.stop().await;
    let gw = TestGateway::start_in(dir, FILE, &rx).await.unwrap();
    let (status, r) = gw.get("/v1/routes/bondio-archive").await;
    assert_eq!((status, r["origin"].as_str()), (200, Some("api")), "{r}");
    let (_, d) = gw.get("/v1/destinations/archive").await;
    assert_eq!(d["headers"]["x-api-key"], "****cdef");
    gw.accept("bondio", r#"{"n":3}"#).await;
    let got = rx.wait_for(3).await;
    assert_eq!(got[2].uri, "/archive2");
    assert_eq!(got[2].header("x-api-key"), Some("k-0123456789abcdef"));

    // A plugin config value whose key names a secret is shown redacted too (a rule of
    // tag-router's for a label no event has).
    let (status, r) = gw
        .send(
            "PATCH",
            "/v1/routes/bondio-archive",
            Some(json!({ "plugins": [{ "name": "tag-router", "config": {
                "default": "archive", "label.x-api-token": "t-0123456789abcdef" } }] })),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["plugins"][0]["config"]["label.x-api-token"], "****cdef");
    assert!(!r.to_string().contains("0123456789"), "{r}");
    // Sent back as shown, the real value is kept (a stored `****cdef` would show as `****`).
    let shown = r["plugins"].clone();
    let (status, r) = gw
        .send(
            "PATCH",
            "/v1/routes/bondio-archive",
            Some(json!({ "plugins": shown })),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let (_, r) = gw.get("/v1/routes/bondio-archive").await;
    assert_eq!(
        r["plugins"][0]["config"]["label.x-api-token"], "****cdef",
        "{r}"
    );

    // Delete in dependency order.
    assert_eq!(
        gw.send("DELETE", "/v1/routes/bondio-archive", None).await.0,
        204
    );
    assert_eq!(gw.send("DELETE", "/v1/sources/bondio", None).await.0, 204);
    assert_eq!(
        gw.send("DELETE", "/v1/destinations/archive", None).await.0,
        204
    );
    assert_eq!(gw.get("/v1/destinations/archive").await.0, 404);
    assert_eq!(gw.post("bondio", "{}").await.0, 404);
    let dir = gw.stop().await;
    let gw = TestGateway::start_in(dir, FILE, &rx).await.unwrap();
    assert_eq!(gw.get("/v1/routes/bondio-archive").await.0, 404);
    gw.shutdown().await.unwrap();
}

/// With `store.encryption_key`, objects made through the API are stored sealed — the
/// secrets they hold are not in the database as text — and open at the next start; a key
/// that does not open them stops the start, naming the object; a rotated key (the old one
/// in `previous_encryption_keys`) opens them and seals them again with the new one, and
/// objects stored as text before a key was set are sealed by the first start with one.
#[tokio::test(flavor = "multi_thread")]
async fn api_objects_are_sealed_at_rest_with_the_configured_key() {
    const ONE: &str = "one-0123456789abcdef0123456789abcdef";
    const TWO: &str = "two-0123456789abcdef0123456789abcdef";
    let with_keys = |current: Option<&str>, previous: &[&str]| {
        let current = current.map_or(String::new(), |k| format!("encryption_key = \"{k}\"\n"));
        format!("{FILE}[store]\n{current}previous_encryption_keys = {previous:?}\n")
    };
    let rows = |gw: &TestGateway| {
        let db = rusqlite::Connection::open(gw.dir().join("data/switchyard.db")).unwrap();
        let mut rows = db
            .prepare("SELECT name, body FROM managed_objects ORDER BY name")
            .unwrap();
        rows.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    };
    let rx = Receiver::start().await;
    // Made before any key: stored as text.
    let gw = TestGateway::start(&with_keys(None, &[]), &rx, &[]).await;
    let signed = json!({ "name": "signed", "url": format!("{}/signed", rx.url),
        "signing": { "secret": SECRET } });
    assert_eq!(
        gw.send("POST", "/v1/destinations", Some(signed)).await.0,
        201
    );
    assert!(rows(&gw)[0].1.contains(SECRET), "text without a key");

    // The first start with a key seals it; what is made after is sealed too.
    let dir = gw.stop().await;
    let gw = TestGateway::start_in(dir, &with_keys(Some(ONE), &[]), &rx)
        .await
        .unwrap();
    let header = json!({ "name": "keyed", "url": format!("{}/keyed", rx.url),
        "headers": { "x-api-key": "k-0123456789abcdef" } });
    assert_eq!(
        gw.send("POST", "/v1/destinations", Some(header)).await.0,
        201
    );
    let sealed = rows(&gw);
    assert_eq!(sealed.len(), 2);
    for (name, body) in &sealed {
        assert!(body.starts_with("sealed:v1:"), "{name}: {body}");
        assert!(
            !body.contains(SECRET) && !body.contains("k-0123456789abcdef"),
            "{name}"
        );
    }
    let (_, d) = gw.get("/v1/destinations/signed").await;
    assert_eq!(d["name"], "signed", "{d}");

    // A key that does not open them stops the start, naming the object (on a copy of the
    // data: a failed start takes its directory with it).
    let dir = gw.stop().await;
    let copy = TestGateway::dir_with_plugins(&[]);
    std::fs::create_dir(copy.path().join("data")).unwrap();
    let db = rusqlite::Connection::open(dir.path().join("data/switchyard.db")).unwrap();
    let into = copy.path().join("data/switchyard.db");
    db.execute("VACUUM INTO ?1", [into.to_str().unwrap()])
        .unwrap();
    drop(db);
    let started = TestGateway::start_in(copy, &with_keys(Some(TWO), &[]), &rx).await;
    let error = format!("{:#}", started.err().expect("the start stops"));
    assert!(
        error.contains("does not open") && error.contains("destination `"),
        "{error}"
    );

    // Rotated: the old key opens them and they are sealed again with the new one, which
    // then opens them on its own; the signing secret still signs.
    let gw = TestGateway::start_in(dir, &with_keys(Some(TWO), &[ONE]), &rx)
        .await
        .unwrap();
    let dir = gw.stop().await;
    let gw = TestGateway::start_in(dir, &with_keys(Some(TWO), &[]), &rx)
        .await
        .unwrap();
    let (status, test) = gw.post_api("/v1/destinations/signed/test").await;
    assert_eq!((status, test["ok"].as_bool()), (200, Some(true)), "{test}");
    let got = rx.requests();
    let signature = got.last().unwrap().header("webhook-signature");
    assert!(
        signature.is_some_and(|s| s.starts_with("v1,")),
        "{signature:?}"
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_400_naming_the_field() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start(FILE, &rx, &[]).await;
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "POST",
            "/v1/destinations",
            json!({ "name": "x", "url": "http://a/", "colour": "red" }),
            "colour",
        ),
        (
            "POST",
            "/v1/destinations",
            json!({ "name": "x", "url": "ftp://a/" }),
            "`url`",
        ),
        ("POST", "/v1/destinations", json!({ "name": "x" }), "url"),
        (
            "POST",
            "/v1/destinations",
            json!({ "name": "x", "url": "http://a/", "signing": { "secret": "nope" } }),
            "`signing.secret`",
        ),
        (
            "POST",
            "/v1/destinations",
            json!({ "name": "x", "url": "http://a/", "signing": {
                "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "previous_secrets": ["nope"] } }),
            "`signing.previous_secrets[0]`",
        ),
        (
            "POST",
            "/v1/destinations",
            json!({ "name": "x", "url": "http://a/", "signing": {
                "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "previous_secrets": vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"; 5] } }),
            "`signing.previous_secrets`",
        ),
        (
            "POST",
            "/v1/destinations",
            json!({ "name": "x", "url": "http://a/", "retry": { "jitter": 2 } }),
            "`retry.jitter`",
        ),
        (
            "POST",
            "/v1/destinations",
            json!({ "name": "x", "url": "http://a/", "retry": { "retry_schedule": ["soon"] } }),
            "retry.retry_schedule",
        ),
        (
            "POST",
            "/v1/destinations",
            json!({ "name": "x y", "url": "http://a/" }),
            "`name`",
        ),
        ("POST", "/v1/sources", json!({ "name": 5 }), "`name`"),
        (
            "POST",
            "/v1/sources",
            json!({ "name": "s", "verify": { "scheme": "rot13" } }),
            "verify",
        ),
        (
            "POST",
            "/v1/sources",
            json!({ "name": "s", "allow_ips": ["not-a-cidr"] }),
            "allow_ips",
        ),
        (
            "POST",
            "/v1/routes",
            json!({ "source": "onomondo" }),
            "`name`",
        ),
        (
            "POST",
            "/v1/routes",
            json!({ "name": "r", "source": "nope" }),
            "`source`",
        ),
        (
            "POST",
            "/v1/routes",
            json!({ "name": "r", "source": "onomondo", "destinations": ["nope"] }),
            "`destinations[0]`",
        ),
        (
            "POST",
            "/v1/routes",
            json!({ "name": "r", "source": "onomondo", "plugins": [{ "name": "nope" }] }),
            "`plugins[0].name`",
        ),
        (
            "POST",
            "/v1/routes",
            json!({ "name": "r", "source": "onomondo", "on_error": "explode" }),
            "on_error",
        ),
    ];
    for (method, path, body, field) in cases {
        let (status, e) = gw.send(method, path, Some(body.clone())).await;
        assert_eq!(status, 400, "{method} {path} {body}: {e}");
        let message = e["error"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{body}: `{message}` does not name {field}"
        );
    }
    // Not JSON at all, trailing garbage, and a patch that is not an object.
    let raw = |body: &'static str| {
        gw.client
            .post(format!("{}/v1/sources", gw.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for body in ["not json", r#"{"name":"a"} x"#, r#"{"name":"#] {
        let resp = raw(body).await.unwrap();
        assert_eq!(resp.status(), 400);
        let e: Value = resp.json().await.unwrap();
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .starts_with("invalid JSON body: "),
            "{body}: {e}"
        );
    }
    gw.send("POST", "/v1/sources", Some(json!({ "name": "s" })))
        .await;
    let (status, e) = gw.send("PATCH", "/v1/sources/s", Some(json!([1]))).await;
    assert_eq!(status, 400, "{e}");
    let (status, e) = gw
        .send(
            "PATCH",
            "/v1/sources/s",
            Some(json!({ "verify": { "scheme": "none", "x": 1 } })),
        )
        .await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("verify"), "{e}");
    // Query parameters.
    for q in [
        "limit=0",
        "limit=501",
        "limit=many",
        "limit=-1",
        "colour=red",
    ] {
        let (status, e) = gw.get(&format!("/v1/destinations?{q}")).await;
        assert_eq!(status, 400, "{q}: {e}");
        let name = q.split('=').next().unwrap();
        let message = e["error"].as_str().unwrap();
        assert!(message.contains(&format!("`{name}`")), "{q}: {message}");
        assert!(!message.contains("Failed to deserialize"), "{q}: {message}");
    }
    // Nothing invalid was created.
    let (_, all) = gw.get("/v1/destinations").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 1, "{all}");
    gw.shutdown().await.unwrap();
}

/// The OpenAPI document is served (behind the token) and schemathesis, driven by it,
/// finds no server error and no answer outside the documented statuses and schemas.
#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_or_schema_violation() {
    let rx = Receiver::start().await;
    let config = format!(
        "{FILE}\n[[sources]]\nname = \"signed\"\nverify = {{ scheme = \"standard-webhooks\", secrets = [\"{SECRET}\"] }}\n"
    );
    let gw = TestGateway::start(&config, &rx, &["tag-router", "event-filter"]).await;
    let anonymous = reqwest::get(format!("{}/v1/openapi.json", gw.url))
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let (status, doc) = gw.get("/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/sources",
        "/v1/destinations/{name}",
        "/v1/routes/{name}",
        "/v1/ingest/{source}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} is not documented");
    }

    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("openapi.json");
    std::fs::write(&schema, doc.to_string()).unwrap();
    let st = crate::tools::python_env().join("bin/st");
    let mut cmd = tokio::process::Command::new(st);
    cmd.current_dir(dir.path())
        .arg("run")
        .arg(&schema)
        .args(["--url", &gw.url])
        .args(["-H", &format!("Authorization: Bearer {API_TOKEN}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", "25", "--seed", "20261124", "--max-time", "90"])
        // One worker: with two, schemathesis's threads parse Python source at once (for
        // hypothesis's lambda descriptions), and CPython 3.11 can fail that with "AST
        // constructor recursion depth mismatch" — a runtime error of the tool, not a
        // finding (seen once in CI on POST /v1/events/replay).
        .args(["--workers", "1", "--no-color", "--request-timeout", "15"])
        .kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(240), cmd.output())
        .await
        .expect("schemathesis stops within its time budget")
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It really tested: every documented operation, with generated cases.
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert!(
        report.contains(&format!("Tested: {operations}")),
        "not all {operations} operations were tested:\n{report}"
    );
    assert!(report.contains("generated"), "{report}");
    // And the gateway is still healthy after it.
    assert_eq!(gw.get("/healthz").await.0, 200);
    gw.shutdown().await.unwrap();
}

/// A destination removed while one of its deliveries waits for a retry: the retry is not
/// sent (the URL may no longer be trusted with the event); the delivery fails, saying why.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_destination_gets_nothing_more() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start("[[sources]]\nname = \"s\"\n", &rx, &[]).await;
    gw.create(
        "/v1/destinations",
        json!({
            "name": "old",
            "url": format!("{}/old", rx.url),
            "retry": { "retry_schedule": ["0s", "1s", "1s"], "jitter": 0.0 },
        }),
    )
    .await;
    let route = json!({ "name": "to-old", "source": "s", "destinations": ["old"] });
    gw.create("/v1/routes", route).await;
    rx.fail_with(Some(500));
    let id = gw.accept("s", "{}").await;
    rx.wait_for(1).await;
    assert_eq!(gw.send("DELETE", "/v1/routes/to-old", None).await.0, 204);
    assert_eq!(gw.send("DELETE", "/v1/destinations/old", None).await.0, 204);
    rx.fail_with(None);
    let event = gw.settled(&id).await;
    let delivery = &event["deliveries"][0];
    assert_eq!(delivery["status"], "failed", "{event}");
    let attempts = delivery["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{delivery}");
    assert_eq!(attempts[0]["status_code"], 500);
    assert!(
        attempts[1]["error"]
            .as_str()
            .unwrap()
            .contains("destination `old` is no longer configured"),
        "{delivery}"
    );
    assert_eq!(rx.requests().len(), 1, "nothing more was sent");
    gw.shutdown().await.unwrap();
}

/// A destination removed while FAILED: the deliveries it held (waiting for a restart that
/// can no longer be asked for) fail as no longer configured, instead of staying pending for
/// good; none is sent.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_failed_destination_fails_what_it_held() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start("[[sources]]\nname = \"s\"\n", &rx, &[]).await;
    gw.create(
        "/v1/destinations",
        json!({
            "name": "old",
            "url": format!("{}/old", rx.url),
            "retry": { "retry_schedule": ["0s", "1h"], "jitter": 0.0, "failure_threshold": 1 },
        }),
    )
    .await;
    let route = json!({ "name": "to-old", "source": "s", "destinations": ["old"] });
    gw.create("/v1/routes", route).await;
    rx.fail_with(Some(500));
    let first = gw.accept("s", "{}").await;
    rx.wait_for(1).await;
    // One failure is the threshold: the first attempt leaves it FAILED.
    gw.wait_event(&first, |e| {
        e["deliveries"][0]["attempts"].as_array().unwrap().len() == 1
    })
    .await;
    for _ in 0..200 {
        if gw.get("/v1/destinations/old").await.1["state"] == "FAILED" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(gw.get("/v1/destinations/old").await.1["state"], "FAILED");
    let second = gw.accept("s", "{}").await;
    let held = gw
        .wait_event(&second, |e| e["deliveries"][0]["status"] == "pending")
        .await;
    assert!(
        held["deliveries"][0].get("next_attempt_at").is_none(),
        "held while FAILED: {held}"
    );

    assert_eq!(gw.send("DELETE", "/v1/routes/to-old", None).await.0, 204);
    assert_eq!(gw.send("DELETE", "/v1/destinations/old", None).await.0, 204);
    rx.fail_with(None);
    for id in [&first, &second] {
        gw.failed_with(id, "destination `old` is no longer configured")
            .await;
    }
    assert_eq!(rx.requests().len(), 1, "nothing more was sent");
    gw.shutdown().await.unwrap();
}

/// A recovery after an outage that outlasted the retry schedule: every failed delivery to
/// the destination planned in the window is sent again, once; other destinations' are not.
#[tokio::test(flavor = "multi_thread")]
async fn recover_sends_a_destinations_failed_deliveries_again() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start("[[sources]]\nname = \"s\"\n", &rx, &[]).await;
    for name in ["fleet", "audit"] {
        gw.create(
            "/v1/destinations",
            json!({
                "name": name,
                "url": format!("{}/{name}", rx.url),
                "retry": { "retry_schedule": ["0s"], "jitter": 0.0, "failure_threshold": 100 },
            }),
        )
        .await;
    }
    let route = json!({ "name": "both", "source": "s", "destinations": ["fleet", "audit"] });
    gw.create("/v1/routes", route).await;
    rx.fail_with(Some(503));
    let before = now_ms();
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(gw.accept("s", json!({ "n": n }).to_string()).await);
    }
    for id in &ids {
        let e = gw.settled(id).await;
        assert!(
            e["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["status"] == "failed"),
            "{e}"
        );
    }
    assert_eq!(rx.requests().len(), 6);

    // Bad requests are named, and change nothing.
    let recover = "/v1/destinations/fleet/recover";
    let (status, body) = gw.send("POST", recover, Some(json!({ "from": 0 }))).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = gw
        .send("POST", recover, Some(json!({ "since": 10, "until": 5 })))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("`since`"),
        "{body}"
    );
    let (status, _) = gw
        .send(
            "POST",
            "/v1/destinations/nope/recover",
            Some(json!({ "since": 0 })),
        )
        .await;
    assert_eq!(status, 404);
    // A window before the events finds nothing.
    let (status, body) = gw
        .send(
            "POST",
            recover,
            Some(json!({ "since": 0, "until": before - 1 })),
        )
        .await;
    assert_eq!((status, body["retried"].as_u64()), (202, Some(0)), "{body}");

    rx.fail_with(None);
    let (status, body) = gw
        .send("POST", recover, Some(json!({ "since": before })))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["retried"], 3, "{body}");
    let got = rx.wait_for(9).await;
    let mut resent: Vec<u64> = got[6..]
        .iter()
        .inspect(|r| assert_eq!(r.uri, "/fleet"))
        .map(|r| r.json()["n"].as_u64().unwrap())
        .collect();
    resent.sort();
    assert_eq!(resent, [0, 1, 2], "each event's body, once");
    for id in &ids {
        let e = gw.settled(id).await;
        for d in e["deliveries"].as_array().unwrap() {
            let expected = if d["destination"] == "fleet" {
                "delivered"
            } else {
                "failed"
            };
            assert_eq!(d["status"], expected, "{e}");
        }
    }
    // Nothing failed is left to recover.
    let (_, body) = gw
        .send("POST", recover, Some(json!({ "since": before })))
        .await;
    assert_eq!(body["retried"], 0, "{body}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(rx.requests().len(), 9, "nothing more was sent");
    gw.shutdown().await.unwrap();
}

/// After a plugin is fixed, the events it dead-lettered are replayed in bulk, a page per
/// call, with the event list's own filters; each goes through the current route once.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_replayed_in_bulk_once_the_route_is_fixed() {
    let rx = Receiver::start().await;
    let config =
        "[[sources]]\nname = \"s\"\n[[destinations]]\nname = \"d\"\nurl = \"{receiver}/d\"\n";
    let gw = TestGateway::start(config, &rx, &["event-filter"]).await;
    let route = json!({
        "name": "filtered", "source": "s", "destinations": ["d"],
        "plugins": [{ "name": "event-filter", "config": { "allow": "usage" } }],
    });
    gw.create("/v1/routes", route).await;
    // Bodies the plugin cannot parse: dead-lettered.
    let mut bad = Vec::new();
    for n in 0..3 {
        bad.push(gw.accept("s", format!("not json {n}")).await);
    }
    let good = gw.accept("s", r#"{"type":"usage"}"#).await;
    for id in bad.iter().chain([&good]) {
        gw.settled(id).await;
    }
    rx.wait_for(1).await;
    let (_, page) = gw.get("/v1/events?route_result=failed").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 3, "{page}");

    // The fix: the route passes bodies through as they are.
    let (status, body) = gw
        .send(
            "PATCH",
            "/v1/routes/filtered",
            Some(json!({ "plugins": [] })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = gw
        .send("POST", "/v1/events/replay?route_result=lost", None)
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, first) = gw
        .send(
            "POST",
            "/v1/events/replay?route_result=failed&limit=2",
            None,
        )
        .await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["replayed"].as_array().unwrap().len(), 2, "{first}");
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let (status, rest) = gw
        .send(
            "POST",
            &format!("/v1/events/replay?route_result=failed&limit=2&cursor={cursor}"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{rest}");
    assert_eq!(rest["next_cursor"], Value::Null, "{rest}");
    let mut replayed: Vec<String> = first["replayed"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["replayed"].as_array().unwrap())
        .map(|id| id.as_str().unwrap().to_string())
        .collect();
    replayed.sort();
    let mut expected = bad.clone();
    expected.sort();
    assert_eq!(
        replayed, expected,
        "each dead letter once, the good event not"
    );

    let got = rx.wait_for(4).await;
    let mut bodies: Vec<String> = got[1..]
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["not json 0", "not json 1", "not json 2"]);
    for id in &bad {
        let e = gw.settled(id).await;
        assert_eq!(e["deliveries"][0]["status"], "delivered", "{e}");
    }
    let (_, page) = gw.get("/v1/events?route_result=failed").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 0, "{page}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(rx.requests().len(), 4, "nothing sent twice");
    gw.shutdown().await.unwrap();
}

/// An event a route dead-lettered (its plugin failed) has no deliveries to show for it;
/// the list says how many routes failed and `route_result=failed` finds it.
#[tokio::test(flavor = "multi_thread")]
async fn dead_lettered_events_are_listed() {
    let rx = Receiver::start().await;
    let config = r#"
[[sources]]
name = "s"
[[destinations]]
name = "d"
url = "{receiver}/d"
[[routes]]
name = "filtered"
source = "s"
plugins = [{ name = "event-filter", config = { allow = "usage" } }]
destinations = ["d"]
[[routes]]
name = "raw"
source = "s"
destinations = ["d"]
"#;
    let gw = TestGateway::start(config, &rx, &["event-filter"]).await;
    let good = gw.accept("s", r#"{"type":"usage"}"#).await;
    let bad = gw.accept("s", "not json").await;
    gw.settled(&good).await;
    let event = gw.settled(&bad).await;
    let result = |name: &str| {
        event["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["result"]["result"].clone())
    };
    assert_eq!(
        (result("filtered"), result("raw")),
        (Some(json!("failed")), Some(json!("delivering"))),
        "{event}"
    );

    let (status, page) = gw.get("/v1/events?route_result=failed").await;
    assert_eq!(status, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{page}");
    assert_eq!(
        (
            &items[0]["id"],
            &items[0]["failed_routes"],
            &items[0]["delivered"]
        ),
        (&json!(bad), &json!(1), &json!(1))
    );
    let (_, page) = gw.get("/v1/events?route_result=delivering").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
    let (_, all) = gw.get("/v1/events").await;
    let good_summary = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == good)
        .unwrap()
        .clone();
    assert_eq!(good_summary["failed_routes"], 0);
    assert_eq!(gw.get("/v1/events?route_result=lost").await.0, 400);
    gw.shutdown().await.unwrap();
}

/// The operator's views: the event list with filters and pagination (its body field
/// indexed), a retry by hand of a failed delivery, and per-minute stats.
#[tokio::test(flavor = "multi_thread")]
async fn event_list_retry_and_stats() {
    let rx = Receiver::start().await;
    let config = r#"
[store]
indexed_fields = ["sim.iccid"]
[[sources]]
name = "a"
[[sources]]
name = "b"
[[destinations]]
name = "d"
url = "{receiver}/d"
[[routes]]
source = "a"
destinations = ["d"]
[[routes]]
source = "b"
destinations = ["d"]
"#;
    let gw = TestGateway::start(config, &rx, &[]).await;
    let mut ids = Vec::new();
    for (n, (source, kind)) in [
        ("a", "usage"),
        ("a", "location"),
        ("a", "usage"),
        ("b", "usage"),
        ("b", "sms"),
    ]
    .into_iter()
    .enumerate()
    {
        let sim = json!({ "iccid": format!("894573873000000001{}", n % 2) });
        let body = json!({ "type": kind, "sim": sim });
        let id = gw.accept(source, body.to_string()).await;
        gw.settled(&id).await;
        ids.push(id);
    }
    let list = |q: &'static str| {
        let path = format!("/v1/events{q}");
        let gw = &gw;
        async move { gw.get(&path).await }
    };
    let ids_of = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, all) = list("").await;
    assert_eq!(status, 200, "{all}");
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(ids_of(&all), newest_first);
    assert_eq!(all["items"][0]["event_type"], "sms");
    assert_eq!(all["items"][0]["delivered"], 1);
    assert_eq!(all["items"][0]["status"], "processed");
    assert_eq!(ids_of(&list("?source=a").await.1).len(), 3);
    assert_eq!(ids_of(&list("?type=usage").await.1).len(), 3);
    assert_eq!(
        ids_of(&list("?source=a&type=usage").await.1),
        [ids[2].clone(), ids[0].clone()]
    );
    assert_eq!(ids_of(&list("?status=queued").await.1).len(), 0);
    // A field of the body: every event of one SIM, with the other filters too.
    assert_eq!(
        ids_of(&list("?field=sim.iccid&equals=8945738730000000011").await.1),
        [ids[3].clone(), ids[1].clone()]
    );
    assert_eq!(
        ids_of(
            &list("?source=a&field=sim.iccid&equals=8945738730000000010")
                .await
                .1
        ),
        [ids[2].clone(), ids[0].clone()]
    );
    let (status, error) = list("?field=sim..iccid&equals=1").await;
    assert_eq!(status, 400);
    assert!(
        error["error"].as_str().unwrap().starts_with("`field`:"),
        "{error}"
    );
    let (status, error) = list("?field=sim.iccid").await;
    assert_eq!(
        (status, error["error"].as_str()),
        (400, Some("`field` needs `equals`"))
    );
    let (_, page) = list("?source=b&limit=1").await;
    assert_eq!(ids_of(&page), [ids[4].clone()]);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, page) = gw
        .get(&format!("/v1/events?source=b&limit=1&cursor={cursor}"))
        .await;
    assert_eq!(ids_of(&page), [ids[3].clone()]);
    assert!(page["next_cursor"].is_null());
    let future = crate::util::now_ms() + 3_600_000;
    assert_eq!(
        ids_of(&gw.get(&format!("/v1/events?since={future}")).await.1).len(),
        0
    );
    for bad in [
        "?status=lost",
        "?cursor=zzz",
        "?limit=0",
        "?since=yesterday",
        "?colour=red",
    ] {
        assert_eq!(gw.get(&format!("/v1/events{bad}")).await.0, 400, "{bad}");
    }

    // A delivery that failed every attempt, retried by hand once the receiver is back.
    rx.fail_with(Some(500));
    let id = gw.accept("a", r#"{"type":"usage"}"#).await;
    let event = gw.settled(&id).await;
    let delivery = &event["deliveries"][0];
    assert_eq!(delivery["status"], "failed", "{event}");
    let attempts = delivery["attempts"].as_array().unwrap().len();
    rx.fail_with(None);
    let (status, body) = gw
        .send(
            "POST",
            &format!("/v1/deliveries/{}/retry", delivery["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let mut delivered = Value::Null;
    for _ in 0..200 {
        let e = gw.event(&id).await;
        if e["deliveries"][0]["status"] == "delivered" {
            delivered = e;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let d = &delivered["deliveries"][0];
    assert_eq!(d["status"], "delivered", "the retry did not deliver");
    assert_eq!(d["attempts"].as_array().unwrap().len(), attempts + 1);
    let (status, _) = gw
        .send(
            "POST",
            &format!("/v1/deliveries/{}/retry", d["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 404, "a delivered delivery is not retried");
    assert_eq!(
        gw.send("POST", "/v1/deliveries/nope/retry", None).await.0,
        404
    );

    // Per-minute stats over the last five minutes, zeros included.
    let (status, stats) = gw.get("/v1/stats?minutes=5").await;
    assert_eq!(status, 200, "{stats}");
    let minutes = stats["minutes"].as_array().unwrap();
    assert_eq!(minutes.len(), 5);
    let sum = |k: &str| minutes.iter().map(|m| m[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("received"), 6);
    assert_eq!(sum("delivered"), 6);
    assert_eq!(sum("failed"), attempts as u64);
    assert_eq!(gw.get("/v1/stats?minutes=0").await.0, 400);
    gw.shutdown().await.unwrap();
}

/// A management body over `server.max_body_bytes` gets `413` naming the limit, and a reload
/// that lowers the limit applies to the next request.
#[tokio::test(flavor = "multi_thread")]
async fn management_bodies_are_bounded_by_the_current_body_limit() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start_from_file(TestGateway::dir_with_plugins(&[]), FILE, &rx)
        .await
        .unwrap();
    // Valid JSON of about 8 KiB: the padding is a header's value.
    let padded = |name: &str| {
        json!({ "name": name, "url": format!("{}/x", rx.url),
                "headers": { "x-padding": "p".repeat(8 << 10) } })
    };
    let (status, e) = gw
        .send("POST", "/v1/destinations", Some(padded("before")))
        .await;
    assert_eq!(status, 201, "{e}");

    let config_file = gw.dir().join("switchyard.toml");
    let text = std::fs::read_to_string(&config_file).unwrap();
    std::fs::write(
        &config_file,
        text.replacen("[server]\n", "[server]\nmax_body_bytes = 4096\n", 1),
    )
    .unwrap();
    let (status, report) = gw.post_api("/v1/reload").await;
    assert_eq!(status, 200, "{report}");

    let (status, e) = gw
        .send("POST", "/v1/destinations", Some(padded("after")))
        .await;
    assert_eq!(status, 413, "{e}");
    assert_eq!(e["error"], "body is larger than the limit of 4096 bytes");
    let (status, e) = gw
        .send("PATCH", "/v1/destinations/before", Some(padded("before")))
        .await;
    assert_eq!(status, 413, "{e}");
    // Below the limit all is as before, and nothing was created by the refused request.
    let (status, e) = gw
        .send("POST", "/v1/sources", Some(json!({ "name": "small" })))
        .await;
    assert_eq!(status, 201, "{e}");
    let (status, _) = gw.get("/v1/destinations/after").await;
    assert_eq!(status, 404);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_shows_what_the_routes_would_send_and_stores_nothing() {
    let rx = Receiver::start().await;
    let config = format!(
        r#"
[[sources]]
name = "dev"
verify = {{ scheme = "hmac-sha256", secret = "never-checked-here", header = "x-signature" }}
[[sources]]
name = "quiet"
[[destinations]]
name = "sink"
url = "{{receiver}}/d/:source:?iccid=:iccid:&label=:label:"
headers = {{ "authorization" = "Bearer sink-token-0123456789", "x-ip" = ":ip:" }}
signing = {{ secret = "{SECRET}" }}
[[destinations]]
name = "usage-only"
url = "{{receiver}}/u"
event_types = ["usage"]
[[routes]]
source = "dev"
plugins = [{{ name = "metadata-inject", config = {{ label = "/device/label" }} }}]
destinations = ["sink", "usage-only"]
"#
    );
    let gw = TestGateway::start(&config, &rx, &["metadata-inject"]).await;
    let payload = json!({
        "type": "location",
        "iccid": "8945738730000000012",
        "ipv4": "10.1.2.3",
        "device": { "label": "a b" }
    });
    let dry_run = |path: &str, body: Vec<u8>, encoding: Option<&str>| {
        let mut req = gw
            .client
            .post(format!("{}/v1/sources/{path}", gw.url))
            .header("content-type", "application/json")
            .header("x-sender", "abc")
            .body(body);
        if let Some(coding) = encoding {
            req = req.header("content-encoding", coding);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };

    let (status, run) = dry_run("dev/dry-run?k=v", payload.to_string().into_bytes(), None).await;
    assert_eq!(status, 200, "{run}");
    // The event as ingest would have made it, without the API's own credentials.
    assert_eq!(run["event"]["source"], "dev");
    assert_eq!(run["event"]["path"], "/v1/ingest/dev");
    assert_eq!(run["event"]["query"], "k=v");
    assert_eq!(run["event"]["body"], payload);
    assert_eq!(run["event"]["body_encoding"], "json");
    let event_headers = run["event"]["headers"].as_array().unwrap();
    assert!(event_headers.contains(&json!(["x-sender", "abc"])), "{run}");
    assert!(
        !event_headers.iter().any(|h| h[0] == "authorization"),
        "{run}"
    );
    // The route: the plugin's verdict, then both destinations, one skipped by type.
    let route = &run["routes"][0];
    assert_eq!(route["steps"][0]["plugin"], "metadata-inject", "{run}");
    assert_eq!(route["steps"][0]["outcome"], "verdict", "{run}");
    assert_eq!(
        route["result"],
        json!({ "result": "delivering", "deliveries": 2 }),
        "{run}"
    );
    let deliveries = run["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 2, "{run}");
    let sink = &deliveries[0];
    assert_eq!(sink["destination"], "sink");
    assert_eq!(sink["status"], "pending");
    assert_eq!(
        sink["url"],
        format!("{}/d/dev?iccid=8945738730000000012&label=a%20b", rx.url)
    );
    assert_eq!(sink["body"], payload);
    assert_eq!(sink["body_encoding"], "json");
    let headers = sink["headers"].as_array().unwrap();
    for h in [
        json!(["x-ip", "10.1.2.3"]),
        json!(["x-sender", "abc"]),
        json!(["authorization", "****6789"]),
        json!(["webhook-id", sink["id"]]),
    ] {
        assert!(headers.contains(&h), "{h} in {headers:?}");
    }
    assert!(
        !headers.iter().any(|h| h[0] == "webhook-signature"),
        "signed at each attempt, not here: {headers:?}"
    );
    assert_eq!(deliveries[1]["destination"], "usage-only");
    assert_eq!(deliveries[1]["status"], "skipped");

    // A compressed payload is decoded as ingest would; a source without routes plans
    // nothing; an unknown source is a 404.
    let gzipped = compress("gzip", payload.to_string().as_bytes());
    let (status, run) = dry_run("dev/dry-run", gzipped, Some("gzip")).await;
    assert_eq!(
        (status, &run["deliveries"][0]["body"]),
        (200, &payload),
        "{run}"
    );
    let (status, run) = dry_run("quiet/dry-run", b"{}".to_vec(), None).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(
        (run["routes"].clone(), run["deliveries"].clone()),
        (json!([]), json!([]))
    );
    // `body_encoding` tells what the body shows as: text and JSON that look alike, and
    // bytes that look like a JSON object, apart.
    for (body, shown, encoding) in [
        (&b"plain"[..], json!("plain"), "text"),
        (&br#""plain""#[..], json!("plain"), "json"),
        (&[0x00, 0xff][..], json!({ "base64": "AP8=" }), "base64"),
        (
            &br#"{"base64":"AP8="}"#[..],
            json!({ "base64": "AP8=" }),
            "json",
        ),
    ] {
        let (status, run) = dry_run("quiet/dry-run", body.to_vec(), None).await;
        assert_eq!(status, 200, "{run}");
        let event = &run["event"];
        assert_eq!(
            (&event["body"], event["body_encoding"].as_str()),
            (&shown, Some(encoding))
        );
    }
    let (status, run) = dry_run("nowhere/dry-run", b"{}".to_vec(), None).await;
    assert_eq!(status, 404, "{run}");

    // A plugin failing in dry runs, `degraded_after` times and more, is not degraded.
    for _ in 0..6 {
        let (status, run) = dry_run("dev/dry-run", b"not json".to_vec(), None).await;
        assert_eq!(status, 200, "{run}");
        assert_eq!(run["routes"][0]["result"]["result"], "failed", "{run}");
    }

    // Nothing stored, sent or counted.
    let (_, plugins) = gw.get("/v1/plugins").await;
    let plugin = &plugins["items"][0];
    assert_eq!(plugin["name"], "metadata-inject", "{plugins}");
    assert_eq!(
        (plugin["calls"].clone(), plugin["degraded"].clone()),
        (json!(0), json!(false)),
        "{plugins}"
    );
    let (status, list) = gw.get("/v1/events").await;
    assert_eq!((status, list["items"].clone()), (200, json!([])));
    let metrics = gw.metrics().await;
    assert!(!metrics.contains("metadata-inject"), "{metrics}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(rx.requests().is_empty());

    // A stored event, as a replay would run it: its own headers and query, its next run's
    // delivery ids; the event itself unchanged.
    let resp = gw
        .client
        .post(format!("{}/v1/ingest/dev?k=v", gw.url))
        .header("content-type", "application/json")
        .header("x-sender", "abc")
        .header("x-api-key", "sender-key-0123456789")
        .header(
            "x-signature",
            hmac_hex(b"never-checked-here", payload.to_string().as_bytes()),
        )
        .body(payload.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let stored = gw.settled(&id).await;
    let (status, run) = gw.post_api(&format!("/v1/events/{id}/dry-run")).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(
        (run["event"]["id"].as_str(), run["event"]["run"].clone()),
        (Some(id.as_str()), json!(1))
    );
    assert_eq!(run["event"]["query"], "k=v");
    let event_headers = run["event"]["headers"].as_array().unwrap();
    assert!(
        event_headers.contains(&json!(["x-api-key", "****6789"])),
        "{run}"
    );
    let sink = &run["deliveries"][0];
    assert!(
        sink["headers"]
            .as_array()
            .unwrap()
            .contains(&json!(["x-sender", "abc"])),
        "{run}"
    );
    assert_eq!(sink["url"], stored["deliveries"][0]["url"]);
    assert_ne!(
        sink["id"], stored["deliveries"][0]["id"],
        "the next run's delivery"
    );
    let (_, replayed) = gw.post_api(&format!("/v1/events/{id}/replay")).await;
    assert_eq!(replayed["id"], id.as_str());
    let after = gw
        .wait_event(&id, |e| e["deliveries"].as_array().unwrap().len() == 4)
        .await;
    let next: Vec<&Value> = (after["deliveries"].as_array().unwrap().iter())
        .filter(|d| d["run"] == 1)
        .map(|d| &d["id"])
        .collect();
    assert!(next.contains(&&sink["id"]), "a replay's ids: {after}");
    let (status, _) = gw.post_api("/v1/events/no-such-event/dry-run").await;
    assert_eq!(status, 404);
    gw.shutdown().await.unwrap();
}

fn hmac_hex(key: &[u8], data: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}
