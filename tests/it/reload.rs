//! Hot reload: plugins and config change on disk while events flow; nothing is lost, each
//! event is processed by one version, and what fails to load leaves the old one serving.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::Digest;
use tokio::sync::Mutex;

use crate::util::{Receiver, TestGateway, copy_dir, guest};

const MARKED: &str = r#"
[[sources]]
name = "s"
[[destinations]]
name = "sink"
url = "{receiver}/sink?v=:version:"
[[routes]]
source = "s"
plugins = [{ name = "marker" }]
destinations = ["sink"]
"#;

fn sha256_of(path: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// Replaces a file's text as editors and Kubernetes do: written beside it under a dot
/// name, then renamed over it (never seen half-written).
fn replace_file(path: &Path, text: &str) {
    let name = path.file_name().unwrap().to_str().unwrap();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Installs `from` as plugin `name` the recommended way: write aside, then rename.
fn install(dir: &Path, name: &str, from: &Path) {
    let tmp = dir.join(format!("plugins.d/.{name}.wasm.tmp"));
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(format!("plugins.d/{name}.wasm"))).unwrap();
}

async fn plugin(gw: &TestGateway, name: &str) -> Value {
    let (_, body) = gw.get("/v1/plugins").await;
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until the plugin's entry in `/v1/plugins` satisfies `check`.
async fn wait_plugin(gw: &TestGateway, name: &str, check: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..400 {
        let p = plugin(gw, name).await;
        if check(&p) {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "plugin {name} never reached the expected state: {}",
        plugin(gw, name).await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_swap_under_load_delivers_every_event_once_on_one_version() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&["marker"]);
    let gw = Arc::new(
        TestGateway::start_from_file(dir, MARKED, &rx)
            .await
            .unwrap(),
    );
    let v2_sha = sha256_of(&guest("marker-v2"));

    // At least 2,000 events, and the stream goes on until 200 were sent after the swap was
    // reported, however long the reload takes (bounded at 20,000 events).
    let (total, after_wanted, cap) = (2000, 200, 20_000);
    let sent = Arc::new(AtomicUsize::new(0));
    let sent_after = Arc::new(AtomicUsize::new(0));
    let swapped = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
    let mut senders = Vec::new();
    for _ in 0..4 {
        let (gw, sent, sent_after, swapped, accepted) = (
            gw.clone(),
            sent.clone(),
            sent_after.clone(),
            swapped.clone(),
            accepted.clone(),
        );
        senders.push(tokio::spawn(async move {
            loop {
                let n = sent.fetch_add(1, Ordering::SeqCst);
                if (n >= total && sent_after.load(Ordering::SeqCst) >= after_wanted) || n >= cap {
                    break;
                }
                let after_swap = swapped.load(Ordering::SeqCst);
                let (status, body) = gw.post("s", r#"{"type":"usage"}"#).await;
                assert_eq!(status, 202, "no request fails during a reload: {body}");
                accepted
                    .lock()
                    .await
                    .push((body["id"].as_str().unwrap().to_string(), after_swap));
                if after_swap {
                    sent_after.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    while sent.load(Ordering::SeqCst) < 600 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    install(gw.dir(), "marker", &guest("marker-v2"));
    wait_plugin(&gw, "marker", |p| p["sha256"] == v2_sha.as_str()).await;
    swapped.store(true, Ordering::SeqCst);
    for s in senders {
        s.await.unwrap();
    }

    let accepted = accepted.lock().await.clone();
    let total = accepted.len();
    assert!(total >= 2000, "{total} events");
    let got = rx.wait_for(total).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got_all = rx.requests();
    assert_eq!(got_all.len(), total, "exactly one delivery per event");
    let mut version_of = std::collections::HashMap::new();
    for r in &got {
        let id = r.header("switchyard-event-id").unwrap().to_string();
        let version = r.uri.split("v=").nth(1).unwrap().to_string();
        assert!(version == "v1" || version == "v2", "{}", r.uri);
        assert!(
            version_of.insert(id, version).is_none(),
            "an event was delivered twice"
        );
    }
    let mut after = 0;
    for (id, after_swap) in &accepted {
        let version = version_of
            .get(id)
            .unwrap_or_else(|| panic!("event {id} was not delivered"));
        if *after_swap {
            after += 1;
            assert_eq!(
                version, "v2",
                "an event sent after the swap was reported ran on v1"
            );
        }
    }
    assert!(after >= after_wanted, "the stream went on after the swap");
    assert!(
        version_of.values().any(|v| v == "v1"),
        "the stream started on v1"
    );
    let gw = Arc::try_unwrap(gw).ok().unwrap();
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_file_leaves_the_old_version_serving() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&["marker"]);
    let gw = TestGateway::start_from_file(dir, MARKED, &rx)
        .await
        .unwrap();
    let v1 = plugin(&gw, "marker").await["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let full = std::fs::read(guest("marker-v2")).unwrap();
    let plugin_file = gw.dir().join("plugins.d/marker.wasm");

    for (what, bytes) in [
        ("truncated", full[..full.len() / 2].to_vec()),
        ("garbage", b"not wasm at all".to_vec()),
    ] {
        std::fs::write(&plugin_file, &bytes).unwrap();
        let p = wait_plugin(&gw, "marker", |p| p["status"] == "error").await;
        assert_eq!(p["sha256"], v1.as_str(), "{what}: v1 keeps serving");
        assert!(
            p["last_error"].as_str().unwrap().contains("marker.wasm"),
            "{what}: {p}"
        );
        let id = gw.accept("s", "{}").await;
        let e = gw.settled(&id).await;
        assert!(
            e["deliveries"][0]["url"]
                .as_str()
                .unwrap()
                .ends_with("v=v1"),
            "{what}"
        );
        assert_eq!(e["routes"][0]["steps"][0]["sha256"], v1.as_str());
        // Back to a good file before the next case.
        install(gw.dir(), "marker", &guest("marker"));
        wait_plugin(&gw, "marker", |p| p["status"] == "ok").await;
    }
    gw.shutdown().await.unwrap();
}

/// A new version of a plugin that refuses a configuration a route gives it (its WIT
/// `config-check`) is not put in force: the version serving goes on, and the plugin's
/// status says which configuration the new one refused and why; the config stays applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_version_that_refuses_a_routes_configuration_leaves_the_old_one_serving() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&[]);
    install(dir.path(), "x", &guest("contract-0-1-0"));
    let config = r#"
[[sources]]
name = "s"
[[destinations]]
name = "sink"
url = "{receiver}/sink?c=:contract:"
[[routes]]
source = "s"
plugins = [{ name = "x", config = { anything = "goes" } }]
destinations = ["sink"]
"#;
    let gw = TestGateway::start_from_file(dir, config, &rx)
        .await
        .unwrap();
    let old = plugin(&gw, "x").await["sha256"]
        .as_str()
        .unwrap()
        .to_string();

    assert_eq!(
        plugin(&gw, "x").await["checks_config"],
        false,
        "a 0.1.0 plugin"
    );
    // event-filter, as `x`: it checks its configuration, and wants `allow` or a condition.
    install(gw.dir(), "x", &guest("event-filter"));
    let p = wait_plugin(&gw, "x", |p| p["status"] == "error").await;
    assert_eq!(p["sha256"], old.as_str(), "the old version serves: {p}");
    assert_eq!(p["checks_config"], false, "the serving version's: {p}");
    assert_eq!(
        p["failed_sha256"],
        sha256_of(&gw.dir().join("plugins.d/x.wasm")).as_str(),
        "{p}"
    );
    let error = p["last_error"].as_str().unwrap();
    assert!(
        error.starts_with("refuses `routes[0].plugins[0].config`: plugin `x` refuses this configuration: `allow` must list"),
        "{p}"
    );
    let id = gw.accept("s", "{}").await;
    let e = gw.settled(&id).await;
    let url = e["deliveries"][0]["url"].as_str().unwrap();
    assert!(url.ends_with("c=0.1.0"), "served by the old version: {e}");
    let (status, report) = gw.send("POST", "/v1/reload", None).await;
    assert_eq!(
        (status, report["config"].as_str()),
        (200, Some("applied")),
        "{report}"
    );
    assert_eq!(report["plugins"]["x"]["status"], "error", "{report}");
    gw.shutdown().await.unwrap();
}

/// A route made through the management API whose plugin has gone, or whose new version
/// refuses the route's configuration, does not stop a start — it is mended through the
/// API, which needs the gateway up: the reload report lists it (`route_errors`), its events
/// fail at that plugin (kept, to replay), the other routes serve, file reloads and API
/// changes go on. A route of the config file with the same plugin missing still stops it.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_route_made_through_the_api_does_not_stop_a_start() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&[]);
    install(dir.path(), "x", &guest("contract-0-1-0"));
    install(dir.path(), "gone", &guest("contract-0-1-0"));
    let config = r#"
[[sources]]
name = "s"
[[destinations]]
name = "sink"
url = "{receiver}/sink"
[[routes]]
name = "file"
source = "s"
destinations = ["sink"]
"#;
    let gw = TestGateway::start_from_file(dir, config, &rx)
        .await
        .unwrap();
    let route = |name: &str, plugin: &str| {
        json!({ "name": name, "source": "s", "destinations": ["sink"],
                "plugins": [{ "name": plugin, "config": { "anything": "goes" } }] })
    };
    gw.create("/v1/routes", route("api-x", "x")).await;
    gw.create("/v1/routes", route("api-gone", "gone")).await;
    let dir = gw.stop().await;
    // event-filter as `x`: it wants `allow` or a condition; and `gone` is gone.
    install(dir.path(), "x", &guest("event-filter"));
    std::fs::remove_file(dir.path().join("plugins.d/gone.wasm")).unwrap();

    let gw = TestGateway::start_from_file(dir, config, &rx)
        .await
        .expect("a broken route made through the API does not stop the start");
    // The start found it: the route says so where the API (and the dashboard) shows it.
    let (_, shown) = gw.get("/v1/routes/api-x").await;
    let said = shown["error"].as_str().unwrap_or_default();
    assert!(
        said.contains("plugin `x` refuses this configuration"),
        "{shown}"
    );
    assert!(
        gw.metrics()
            .await
            .contains("\nswitchyard_broken_routes 2\n"),
        "counted for alerts"
    );
    let (status, report) = gw.send("POST", "/v1/reload", None).await;
    assert_eq!(
        (status, report["config"].as_str()),
        (200, Some("applied")),
        "{report}"
    );
    let errors: Vec<&str> = (report["route_errors"].as_array().unwrap().iter())
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 2, "{report}");
    let error = |route: &str| {
        (errors.iter())
            .find(|e| e.starts_with(&format!("route `{route}` (made through the API), ")))
            .unwrap_or_else(|| panic!("{route}: {report}"))
    };
    assert!(
        error("api-x").contains("`routes[2].plugins[0].config`: plugin `x` refuses this configuration: `allow` must list")
            && error("api-x").contains("`PATCH /v1/routes/api-x`"),
        "{report}"
    );
    assert!(
        error("api-gone").contains("`routes[1].plugins[0].name`: no plugin `gone` is loaded"),
        "{report}"
    );
    // As the reload's report says it.
    let (_, shown) = gw.get("/v1/routes/api-x").await;
    assert_eq!(shown["error"].as_str(), Some(*error("api-x")), "{shown}");
    let (_, shown) = gw.get("/v1/routes/file").await;
    assert!(shown.get("error").is_none(), "{shown}");
    // The file's route delivers; the two fail at their plugins, kept to replay.
    let id = gw.accept("s", r#"{"type":"usage"}"#).await;
    let e = gw.settled(&id).await;
    let result = |name: &str| {
        (e["routes"].as_array().unwrap().iter())
            .find(|r| r["name"] == name)
            .map(|r| r["result"].clone())
            .unwrap()
    };
    assert_eq!(result("file")["result"], "delivering", "{e}");
    assert_eq!(e["deliveries"][0]["status"], "delivered", "{e}");
    assert_eq!(result("api-x")["result"], "failed", "{e}");
    assert!(
        result("api-x")["error"]
            .to_string()
            .contains("`allow` must list"),
        "{e}"
    );
    assert_eq!(result("api-gone")["result"], "failed", "{e}");
    assert!(
        result("api-gone")["error"]
            .to_string()
            .contains("plugin `gone` is not loaded"),
        "{e}"
    );
    // Mended through the API, one by one; changes to other objects go on meanwhile.
    gw.create(
        "/v1/destinations",
        json!({ "name": "other", "url": format!("{}/other", rx.url) }),
    )
    .await;
    let (status, body) = gw
        .send(
            "PATCH",
            "/v1/routes/api-x",
            Some(json!({ "plugins": [{ "name": "x", "config": { "allow": "usage" } }] })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.get("error").is_none(),
        "checked as it was changed: {body}"
    );
    let (_, shown) = gw.get("/v1/routes/api-gone").await;
    assert!(shown["error"].is_string(), "{shown}");
    let (_, report) = gw.send("POST", "/v1/reload", None).await;
    assert_eq!(
        report["route_errors"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    let (status, body) = gw.send("DELETE", "/v1/routes/api-gone", None).await;
    assert_eq!(status, 204, "{body}");
    let (_, report) = gw.send("POST", "/v1/reload", None).await;
    assert!(report.get("route_errors").is_none(), "{report}");
    assert!(
        gw.metrics()
            .await
            .contains("\nswitchyard_broken_routes 0\n")
    );
    let id = gw.accept("s", r#"{"type":"usage"}"#).await;
    let e = gw.settled(&id).await;
    let delivered: Vec<&Value> = (e["deliveries"].as_array().unwrap().iter())
        .map(|d| &d["status"])
        .collect();
    assert_eq!(delivered, [&json!("delivered"), &json!("delivered")], "{e}");
    let dir = gw.stop().await;

    // A route of the config file whose plugin is missing stops the start, as ever.
    let broken = config.replace(
        "destinations = [\"sink\"]\n",
        "destinations = [\"sink\"]\nplugins = [{ name = \"gone\" }]\n",
    );
    assert_ne!(broken, config);
    let Err(e) = TestGateway::start_from_file(dir, &broken, &rx).await else {
        panic!("started with a file route's plugin missing");
    };
    assert!(
        e.to_string()
            .contains("plugin `gone` is used by a route but there is no gone.wasm"),
        "{e}"
    );
}

/// A warm instance serves one route entry's configuration: when the route changes or goes,
/// its instances go at once — not when (if ever) the plugin is next called.
#[tokio::test(flavor = "multi_thread")]
async fn warm_instances_go_with_the_route_entry_they_served() {
    let rx = Receiver::start().await;
    let config =
        "[[sources]]\nname = \"in\"\n[[destinations]]\nname = \"out\"\nurl = \"{receiver}/out\"\n";
    let gw = TestGateway::start(config, &rx, &["reshape"]).await;
    let entry =
        |kind: &str| json!([{ "name": "reshape", "instance": "warm", "config": { "kind": kind } }]);
    gw.create(
        "/v1/routes",
        json!({ "name": "warm", "source": "in", "destinations": ["out"], "plugins": entry("=one") }),
    )
    .await;
    let warm = async || plugin(&gw, "reshape").await["warm_instances"].clone();
    let send = async || {
        let id = gw.accept("in", r#"{"iccid":"1"}"#.to_string()).await;
        gw.settled(&id).await;
    };
    send().await;
    assert_eq!(warm().await, 1);
    // Changed: the old entry's instance goes; the new entry's comes with its first event.
    let patch = json!({ "plugins": entry("=two") });
    let (status, body) = gw.send("PATCH", "/v1/routes/warm", Some(patch)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(warm().await, 0);
    send().await;
    assert_eq!(warm().await, 1);
    let kinds: Vec<Value> = (rx.wait_for(2).await.iter())
        .map(|r| r.json()["kind"].clone())
        .collect();
    assert_eq!(kinds, [json!("one"), json!("two")]);
    // Deleted: its instance goes too.
    let (status, body) = gw.send("DELETE", "/v1/routes/warm", None).await;
    assert!(status == 204 || status == 200, "{status} {body}");
    assert_eq!(warm().await, 0);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_plugin_keeps_serving_and_is_reported_missing() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&["marker", "event-filter"]);
    let gw = TestGateway::start_from_file(dir, MARKED, &rx)
        .await
        .unwrap();
    std::fs::remove_file(gw.dir().join("plugins.d/marker.wasm")).unwrap();
    std::fs::remove_file(gw.dir().join("plugins.d/event-filter.wasm")).unwrap();
    let p = wait_plugin(&gw, "marker", |p| p["status"] == "missing").await;
    assert!(
        p["sha256"].is_string(),
        "the last good version is still serving: {p}"
    );
    // A plugin no route uses simply goes.
    assert!(plugin(&gw, "event-filter").await.is_null());
    let id = gw.accept("s", "{}").await;
    assert!(
        gw.settled(&id).await["deliveries"][0]["url"]
            .as_str()
            .unwrap()
            .ends_with("v=v1")
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn config_changes_apply_atomically_and_invalid_ones_are_rejected() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&["marker"]);
    let gw = TestGateway::start_from_file(dir, MARKED, &rx)
        .await
        .unwrap();
    let config_file = gw.dir().join("switchyard.toml");
    let original = std::fs::read_to_string(&config_file).unwrap();

    // An invalid change: rejected with the key named, and the old config keeps routing.
    std::fs::write(
        &config_file,
        original.replace("url = \"", "url = \"not a url "),
    )
    .unwrap();
    let (status, report) = gw.post_api("/v1/reload").await;
    assert_eq!(status, 422, "{report}");
    assert!(
        report["config_error"]
            .as_str()
            .unwrap()
            .contains("destinations[0].url"),
        "{report}"
    );
    let id = gw.accept("s", "{}").await;
    assert_eq!(
        gw.settled(&id).await["deliveries"][0]["status"],
        "delivered"
    );

    // A route using a plugin that is not there is rejected too.
    std::fs::write(
        &config_file,
        original.replace("name = \"marker\"", "name = \"nowhere\""),
    )
    .unwrap();
    let (status, report) = gw.post_api("/v1/reload").await;
    assert_eq!(status, 422, "{report}");
    assert!(
        report["config_error"]
            .as_str()
            .unwrap()
            .contains("routes[0].plugins[0].name"),
        "{report}"
    );

    // A new plugin file and a config that uses it: the new source routes through it.
    install(gw.dir(), "event-filter", &guest("event-filter"));
    let added = format!(
        "{original}\n[[sources]]\nname = \"new\"\n[[routes]]\nsource = \"new\"\nplugins = [{{ name = \"event-filter\", config = {{ allow = \"usage\" }} }}]\ndestinations = [\"sink\"]\n"
    );
    replace_file(&config_file, &added);
    wait_plugin(&gw, "event-filter", |p| {
        p["routes"] == serde_json::json!(["new"])
    })
    .await;
    let dropped = gw.accept("new", r#"{"type":"sms"}"#).await;
    let e = gw.settled(&dropped).await;
    assert_eq!(e["routes"][0]["result"]["result"], "dropped", "{e}");
    let kept = gw.accept("new", r#"{"type":"usage"}"#).await;
    assert_eq!(
        gw.settled(&kept).await["deliveries"][0]["status"],
        "delivered"
    );
    gw.shutdown().await.unwrap();
}

/// A secret the config reads from a file (`${file:PATH}`, as Kubernetes and systemd
/// credentials hand them over) is read again at each reload: a rotated file takes effect
/// without a restart, and a file gone is a rejected reload that keeps the old config.
#[tokio::test(flavor = "multi_thread")]
async fn a_secret_read_from_a_file_is_rotated_by_a_reload() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&[]);
    let secret = dir.path().join("secrets/api-key");
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    std::fs::write(&secret, "k-one-0123456789\n").unwrap();
    let config = r#"
[[sources]]
name = "s"
verify = { scheme = "header", header = "x-api-key", secrets = ["${file:secrets/api-key}"] }
[[destinations]]
name = "sink"
url = "{receiver}/sink"
[[routes]]
source = "s"
destinations = ["sink"]
"#;
    let gw = TestGateway::start_from_file(dir, config, &rx)
        .await
        .unwrap();
    let post = |key: &'static str| {
        let request = (gw.client)
            .post(format!("{}/v1/ingest/s", gw.url))
            .header("x-api-key", key)
            .body("{}");
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(post("k-one-0123456789").await, 202);
    std::fs::write(&secret, "k-two-0123456789\n").unwrap();
    gw.reload_applied().await;
    assert_eq!(post("k-one-0123456789").await, 401);
    assert_eq!(post("k-two-0123456789").await, 202);
    std::fs::remove_file(&secret).unwrap();
    let (status, report) = gw.post_api("/v1/reload").await;
    let error = report["config_error"].as_str().unwrap_or_default();
    assert_eq!(status, 422, "{report}");
    assert!(
        error.contains("sources[0].verify.secrets[0]") && error.contains("secrets/api-key"),
        "{report}"
    );
    assert_eq!(post("k-two-0123456789").await, 202, "the old config serves");
    rx.wait_for(2).await;
    gw.shutdown().await.unwrap();
}

/// A lookup table (`[tables]`) read by a plugin through `host.lookup` (`metadata-inject`'s
/// `sims[iccid]/customer`) fills a destination's placeholder; a changed table takes effect
/// at the next reload — a change to its file is one — and one that does not load is a
/// rejected reload that keeps the old table. A plugin built against the first contract (0.1.0) runs in the same chain.
#[tokio::test(flavor = "multi_thread")]
async fn a_lookup_table_feeds_plugins_and_follows_reloads() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&["metadata-inject", "contract-0-1-0"]);
    let table = dir.path().join("sims.csv");
    std::fs::write(&table, "iccid,customer\n8945000000000000001,acme\n").unwrap();
    let config = r#"
[tables]
sims = "sims.csv"
[[sources]]
name = "s"
[[destinations]]
name = "sink"
url = "{receiver}/sink/:customer:"
headers = { "x-contract" = ":contract:" }
[[routes]]
source = "s"
plugins = [
    { name = "contract-0-1-0" },
    { name = "metadata-inject", config = { customer = "sims[iccid]/customer" } },
]
destinations = ["sink"]
"#;
    let gw = TestGateway::start_from_file(dir, config, &rx)
        .await
        .unwrap();
    let (_, tables) = gw.get("/v1/tables").await;
    assert_eq!(tables["items"][0]["name"], "sims", "{tables}");
    assert_eq!(tables["items"][0]["rows"], 1, "{tables}");
    assert!(
        tables["items"][0]["file"]
            .as_str()
            .unwrap()
            .ends_with("sims.csv"),
        "{tables}"
    );
    let body = r#"{"type":"usage","iccid":"8945000000000000001"}"#;
    gw.accept("s", body).await;
    let got = rx.wait_for(1).await;
    assert_eq!(got[0].uri, "/sink/acme");
    assert_eq!(got[0].header("x-contract"), Some("0.1.0"));

    std::fs::write(&table, "iccid,customer\n8945000000000000001,globex\n").unwrap();
    gw.reload_applied().await;
    gw.accept("s", body).await;
    assert_eq!(rx.wait_for(2).await[1].uri, "/sink/globex");

    // A change to the table's file alone is noticed, as one to the config file is.
    gw.noticed(|| replace_file(&table, "iccid,customer\n8945000000000000001,initech\n"))
        .await;
    gw.accept("s", body).await;
    assert_eq!(rx.wait_for(3).await[2].uri, "/sink/initech");

    std::fs::write(&table, "iccid,customer\n1,a\n1,b\n").unwrap();
    let (status, report) = gw.post_api("/v1/reload").await;
    let error = report["config_error"].as_str().unwrap_or_default();
    assert_eq!(status, 422, "{report}");
    assert!(
        error.contains("tables.sims") && error.contains("twice"),
        "{report}"
    );
    gw.accept("s", body).await;
    assert_eq!(
        rx.wait_for(4).await[3].uri,
        "/sink/initech",
        "the old table serves"
    );
    gw.shutdown().await.unwrap();
}

/// The watcher follows the config: a secret file in a directory of its own is watched, so
/// its rotation applies with no SIGHUP; a table a reload adds, in a directory not watched
/// before, is watched from that reload on.
#[tokio::test(flavor = "multi_thread")]
async fn files_the_config_names_are_watched_as_the_config_changes() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&["metadata-inject"]);
    for sub in ["secrets", "tables"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    let secret = dir.path().join("secrets/api-key");
    std::fs::write(&secret, "k-one-0123456789\n").unwrap();
    let table = dir.path().join("tables/sims.csv");
    std::fs::write(&table, "iccid,customer\n89450001,acme\n").unwrap();
    let config = r#"
[[sources]]
name = "s"
verify = { scheme = "header", header = "x-api-key", secrets = ["${file:secrets/api-key}"] }
[[destinations]]
name = "sink"
url = "{receiver}/sink/:customer:"
[[routes]]
source = "s"
plugins = [{ name = "metadata-inject", config = { customer = "sims[iccid]/customer" } }]
destinations = ["sink"]
"#;
    let gw = TestGateway::start_from_file(dir, &config.replace("sims[", "none["), &rx)
        .await
        .unwrap();
    let post = |key: &'static str| {
        let request = (gw.client)
            .post(format!("{}/v1/ingest/s", gw.url))
            .header("x-api-key", key)
            .body(r#"{"iccid":"89450001"}"#);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(post("k-one-0123456789").await, 202);
    assert_eq!(rx.wait_for(1).await[0].uri, "/sink/:customer:");

    // Kubernetes rotates a secret by swapping the file in.
    gw.noticed(|| replace_file(&secret, "k-two-0123456789\n"))
        .await;
    assert_eq!(post("k-one-0123456789").await, 401);
    assert_eq!(post("k-two-0123456789").await, 202);
    assert_eq!(rx.wait_for(2).await.len(), 2);

    // The config now names a table in `tables/`: the config file's change is noticed, and
    // from then on so is the table's.
    let config_file = gw.dir().join("switchyard.toml");
    let text = std::fs::read_to_string(&config_file).unwrap();
    let with_table = format!(
        "[tables]\nsims = \"tables/sims.csv\"\n{}",
        text.replace("none[", "sims[")
    );
    gw.noticed(|| std::fs::write(&config_file, with_table).unwrap())
        .await;
    assert_eq!(post("k-two-0123456789").await, 202);
    assert_eq!(rx.wait_for(3).await[2].uri, "/sink/acme");
    gw.noticed(|| replace_file(&table, "iccid,customer\n89450001,globex\n"))
        .await;
    assert_eq!(post("k-two-0123456789").await, 202);
    assert_eq!(rx.wait_for(4).await[3].uri, "/sink/globex");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_compiled_cache_skips_compilation_on_restart() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&["marker"]);
    let gw = TestGateway::start_from_file(dir, MARKED, &rx)
        .await
        .unwrap();
    assert_eq!(plugin(&gw, "marker").await["from_cache"], false);
    let dir = tempfile::tempdir().unwrap();
    // Same plugin and data dir, new process state: the compiled code comes from the cache.
    let data = gw.dir().join("data");
    let plugins = gw.dir().join("plugins.d");
    copy_dir(
        &data.join("plugin-cache"),
        &dir.path().join("data/plugin-cache"),
    );
    copy_dir(&plugins, &dir.path().join("plugins.d"));
    gw.shutdown().await.unwrap();
    let gw = TestGateway::start_from_file(dir, MARKED, &rx)
        .await
        .unwrap();
    assert_eq!(plugin(&gw, "marker").await["from_cache"], true);
    let id = gw.accept("s", "{}").await;
    assert_eq!(
        gw.settled(&id).await["deliveries"][0]["status"],
        "delivered"
    );
    gw.shutdown().await.unwrap();
}

/// The compiled-plugin cache keeps only the versions in force: a new version's compiled
/// code replaces the old one's, and an older engine's entries and a crash's temp files go.
#[tokio::test(flavor = "multi_thread")]
async fn the_compiled_cache_keeps_only_the_versions_in_force() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&["marker"]);
    let gw = TestGateway::start_from_file(dir, MARKED, &rx)
        .await
        .unwrap();
    let cache = gw.dir().join("data/plugin-cache");
    let entries = || {
        let mut names: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let v1 = entries();
    assert_eq!(v1.len(), 1, "{v1:?}");
    assert!(v1[0].starts_with(&sha256_of(&guest("marker"))), "{v1:?}");
    let old_engine = cache.join(format!("{}-0123456789abcdef.cwasm", "0".repeat(64)));
    std::fs::write(&old_engine, b"compiled by another engine").unwrap();
    let leftover = cache.join("abc-def.tmp4242");
    std::fs::write(&leftover, b"half written").unwrap();
    let status = std::process::Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(&leftover)
        .status()
        .unwrap();
    assert!(status.success());
    let young = cache.join("abc-def.tmp4343");
    std::fs::write(&young, b"being written").unwrap();

    install(gw.dir(), "marker", &guest("marker-v2"));
    let v2_sha = sha256_of(&guest("marker-v2"));
    wait_plugin(&gw, "marker", |p| p["sha256"] == v2_sha.as_str()).await;
    let now = entries();
    assert_eq!(now.len(), 2, "{now:?}");
    // (Either may sort first: the other's name begins with a SHA-256.)
    assert!(
        now.iter().any(|e| e == "abc-def.tmp4343"),
        "a young temp file may be a write in progress: {now:?}"
    );
    assert!(now.iter().any(|e| e.starts_with(&v2_sha)), "{now:?}");
    gw.shutdown().await.unwrap();
}

/// `/metrics` keeps no series for what is gone: a retired plugin version's call
/// histograms, a deleted destination's state (which, left FAILED, would keep an alert
/// firing) and counters, a deleted source's (its last-accepted time would fire a quiet
/// sender's alert) and a deleted route's; nor are a deleted source's refusals shown when a
/// source of that name is made again.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_forget_retired_plugin_versions_and_deleted_objects() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&["marker"]);
    let gw = TestGateway::start_from_file(dir, MARKED, &rx)
        .await
        .unwrap();
    let version = |path: &Path| format!(r#"plugin="marker",version="{}""#, &sha256_of(path)[..12]);
    let (v1, v2) = (version(&guest("marker")), version(&guest("marker-v2")));
    gw.create(
        "/v1/destinations",
        serde_json::json!({ "name": "extra", "url": format!("{}/extra", rx.url) }),
    )
    .await;
    gw.create("/v1/sources", serde_json::json!({ "name": "other" }))
        .await;
    gw.create(
        "/v1/routes",
        serde_json::json!({ "name": "to-extra", "source": "other", "destinations": ["extra"] }),
    )
    .await;
    let id = gw.accept("s", "{}").await;
    gw.settled(&id).await;
    let id = gw.accept("other", "{}").await;
    gw.settled(&id).await;
    let refused = (gw.client.post(format!("{}/v1/ingest/other", gw.url)))
        .header("content-encoding", "br")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 415);
    let (_, other) = gw.get("/v1/sources/other").await;
    assert_eq!(other["refused"]["total"], 1, "{other}");
    let text = gw.metrics().await;
    assert!(text.contains(&v1), "{text}");
    for series in [
        r#"destination="extra",state="ACTIVE""#,
        r#"switchyard_deliveries_total{destination="extra",outcome="delivered"}"#,
        r#"switchyard_delivery_attempts_total{destination="extra",outcome="success"}"#,
        r#"switchyard_events_received_total{source="other",result="accepted"}"#,
        r#"switchyard_events_received_total{source="other",result="rejected_unsupported_encoding"}"#,
        r#"switchyard_source_last_accepted_timestamp_seconds{source="other"}"#,
        r#"switchyard_ingest_seconds_count{source="other"}"#,
        r#"switchyard_route_outcomes_total{route="to-extra",result="delivering"}"#,
    ] {
        assert!(text.contains(series), "{series} in {text}");
    }

    install(gw.dir(), "marker", &guest("marker-v2"));
    let v2_sha = sha256_of(&guest("marker-v2"));
    wait_plugin(&gw, "marker", |p| p["sha256"] == v2_sha.as_str()).await;
    let id = gw.accept("s", "{}").await;
    gw.settled(&id).await;
    let (status, _) = gw.send("DELETE", "/v1/routes/to-extra", None).await;
    assert_eq!(status, 204);
    let (status, _) = gw.send("DELETE", "/v1/destinations/extra", None).await;
    assert_eq!(status, 204);
    let (status, _) = gw.send("DELETE", "/v1/sources/other", None).await;
    assert_eq!(status, 204);
    let text = gw.metrics().await;
    assert!(text.contains(&v2), "{text}");
    assert!(!text.contains(r#"source="other""#), "{text}");
    assert!(!text.contains(r#"route="to-extra""#), "{text}");
    for series in [
        r#"switchyard_events_received_total{source="s",result="accepted"}"#,
        r#"switchyard_source_last_accepted_timestamp_seconds{source="s"}"#,
    ] {
        assert!(text.contains(series), "{series} in {text}");
    }
    gw.create("/v1/sources", serde_json::json!({ "name": "other" }))
        .await;
    let (_, other) = gw.get("/v1/sources/other").await;
    assert_eq!(
        other["refused"],
        serde_json::json!({ "total": 0, "recent": [] }),
        "the deleted source's refusals are not the new one's: {other}"
    );
    assert!(
        !text.contains(&v1),
        "the retired version's series are gone: {text}"
    );
    assert!(!text.contains(r#"destination="extra""#), "{text}");
    assert!(
        text.contains(r#"destination="sink",state="ACTIVE""#),
        "{text}"
    );
    gw.shutdown().await.unwrap();
}

/// `store.indexed_fields` follows the config file: a reload that lists a body field builds
/// its index in the store (over the events already there), one that drops it drops the
/// index, and the event list by that field answers the same throughout.
#[tokio::test(flavor = "multi_thread")]
async fn body_field_indexes_follow_the_config() {
    const CONFIG: &str = r#"
[[sources]]
name = "s"
[[destinations]]
name = "sink"
url = "{receiver}/sink"
[[routes]]
source = "s"
destinations = ["sink"]
"#;
    let rx = Receiver::start().await;
    let gw = TestGateway::start_from_file(tempfile::tempdir().unwrap(), CONFIG, &rx)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for iccid in ["8945", "8946", "8945"] {
        ids.push(
            gw.accept("s", format!(r#"{{"sim":{{"iccid":"{iccid}"}}}}"#))
                .await,
        );
    }
    let config_file = gw.dir().join("switchyard.toml");
    let original = std::fs::read_to_string(&config_file).unwrap();
    let db = rusqlite::Connection::open(gw.dir().join("data/switchyard.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    let indexes = || -> Vec<String> {
        let mut stmt = db
            .prepare("SELECT sql FROM sqlite_master WHERE name LIKE 'events_field_%'")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let listed = || async {
        let (status, page) = gw.get("/v1/events?field=sim.iccid&equals=8945").await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap().iter();
        items
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let newest_first = [ids[2].clone(), ids[0].clone()];
    assert!(indexes().is_empty());
    assert_eq!(listed().await, newest_first);

    let indexed = original.replace(
        "[[sources]]",
        "[store]\nindexed_fields = [\"sim.iccid\"]\n[[sources]]",
    );
    std::fs::write(&config_file, indexed).unwrap();
    // While another connection holds the database's write lock, the index cannot be
    // built: the config is in force, the report says why, and the next reload builds it.
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (status, report) = gw.post_api("/v1/reload").await;
    assert_eq!(status, 200, "{report}");
    assert!(report["index_error"].is_string(), "{report}");
    db.execute_batch("ROLLBACK").unwrap();
    let (status, report) = gw.post_api("/v1/reload").await;
    assert_eq!(status, 200, "{report}");
    assert!(report["index_error"].is_null(), "{report}");
    let made = indexes();
    assert_eq!(made.len(), 1, "{made:?}");
    assert!(made[0].contains(r#"'$."sim"."iccid"'"#), "{made:?}");
    assert_eq!(listed().await, newest_first);

    std::fs::write(&config_file, &original).unwrap();
    let (status, report) = gw.post_api("/v1/reload").await;
    assert_eq!(status, 200, "{report}");
    assert!(indexes().is_empty());
    assert_eq!(listed().await, newest_first);
    gw.shutdown().await.unwrap();
}

/// Building a body field's index reads every event stored — minutes on a large
/// PostgreSQL store — and the management API does not wait for it: while a reload's build
/// waits (here for a lock another connection holds on `events`), a destination is made,
/// and the reload answers once its index is built.
#[tokio::test(flavor = "multi_thread")]
async fn an_index_build_holds_up_no_api_change() {
    let Some(server) = xtask::pg::PgServer::start() else {
        return;
    };
    let db = server.database("index_build");
    let config = format!(
        r#"
[store]
url = "{db}"
[[sources]]
name = "s"
[[destinations]]
name = "sink"
url = "{{receiver}}/sink"
[[routes]]
source = "s"
destinations = ["sink"]
"#
    );
    let rx = Receiver::start().await;
    let gw = Arc::new(
        TestGateway::start_from_file(tempfile::tempdir().unwrap(), &config, &rx)
            .await
            .unwrap(),
    );
    gw.accept("s", r#"{"sim":{"iccid":"8945"}}"#).await;
    let config_file = gw.dir().join("switchyard.toml");
    let original = std::fs::read_to_string(&config_file).unwrap();
    std::fs::write(
        &config_file,
        original.replace("[store]\n", "[store]\nindexed_fields = [\"sim.iccid\"]\n"),
    )
    .unwrap();
    let (mut holder, connection) = tokio_postgres::connect(&db, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let lock = holder.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE events IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let reload = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.post_api("/v1/reload").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!reload.is_finished(), "the build waits for the lock");
    let made = tokio::time::timeout(
        Duration::from_secs(5),
        gw.send(
            "POST",
            "/v1/destinations",
            Some(serde_json::json!({ "name": "more", "url": format!("{}/more", rx.url) })),
        ),
    )
    .await
    .expect("an API change while an index is built");
    assert_eq!(made.0, 201, "{}", made.1);
    assert!(!reload.is_finished());
    lock.rollback().await.unwrap();
    let (status, report) = reload.await.unwrap();
    assert_eq!(status, 200, "{report}");
    assert!(report["index_error"].is_null(), "{report}");
    let indexes = holder
        .query(
            "SELECT indexname FROM pg_indexes WHERE indexname LIKE 'events_field_%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(indexes.len(), 1);
    let (status, _) = gw.get("/v1/destinations/more").await;
    assert_eq!(status, 200);
    Arc::into_inner(gw).unwrap().shutdown().await.unwrap();
}
