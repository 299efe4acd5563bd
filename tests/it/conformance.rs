//! One conformance suite for plugins in three languages: `tag-router` in Rust,
//! `tag-router-js` (componentize-js) and `tag-router-py` (componentize-py), each built from
//! source, run side by side on the same events through a real gateway. Every event must
//! get the same verdict from all three.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::util::{Receiver, TestGateway, sample_event};

const LANGUAGES: &[(&str, &str)] = &[
    ("rust", "tag-router"),
    ("js", "tag-router-js"),
    ("python", "tag-router-py"),
];

/// Three configs: with a default, without one (unmatched events drop), and rules on
/// metadata. (Bad rules: `refuse_alike`.)
const CONFIGS: &[(&str, &str)] = &[
    (
        "routed",
        r#"{ "label.valid-example" = "fleet,archive", "tag.gold" = "fleet", "iccid.8988" = "sims", default = "archive" }"#,
    ),
    (
        "strict",
        r#"{ "tag.gold" = "fleet", "iccid.8944" = "sims" }"#,
    ),
    // After `metadata-inject` (see `config`): rules on the metadata it set, the last value
    // of a key winning; a value may hold dots.
    (
        "by-metadata",
        r#"{ "meta.iccid.8945738730000000012" = "fleet", "meta.ip.10.1.2.3" = "sims", default = "archive" }"#,
    ),
];

fn config() -> String {
    let mut c = String::new();
    for d in ["fleet", "archive", "sims"] {
        c += &format!("[[destinations]]\nname = \"{d}\"\nurl = \"{{receiver}}/{d}\"\n");
    }
    for (source, rules) in CONFIGS {
        c += &format!("[[sources]]\nname = \"{source}\"\n");
        // (`iccid` set twice when the body has `sim.iccid` too: the last one counts.)
        let first = match *source {
            "by-metadata" => r#"{ name = "metadata-inject", config = { iccid = "/sim/iccid" } }, "#,
            _ => "",
        };
        for (lang, plugin) in LANGUAGES {
            c += &format!(
                "[[routes]]\nname = \"{source}-{lang}\"\nsource = \"{source}\"\non_error = \"drop\"\n\
                 plugins = [{first}{{ name = \"{plugin}\", instance = \"warm\", config = {rules} }}]\n"
            );
        }
    }
    c
}

/// The inputs: every provider sample, and cases that reach each branch of the rules.
fn events() -> Vec<(String, Vec<u8>)> {
    let dir = xtask::workspace_root().join("examples/events");
    let mut events: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.clone(), sample_event(&name))
        })
        .collect();
    events.sort();
    events.push((
        "invalid/onomondo-usage-as-printed.json".into(),
        sample_event("invalid/onomondo-usage-as-printed.json"),
    ));
    let cases = [
        ("tags list", json!({ "tags": ["silver", "gold"] })),
        ("tag field", json!({ "tag": "gold" })),
        ("numeric iccid", json!({ "iccid": 89882390000012345u64 })),
        ("esimIccid", json!({ "esimIccid": "8944500000000000001" })),
        ("nested esim", json!({ "data": { "esim": "8944" } })),
        (
            "cloudevents",
            json!({ "specversion": "1.0", "data": { "sim_label": "valid-example", "tags": ["gold"] } }),
        ),
        (
            "cloudevents without data",
            json!({ "specversion": "1.0", "tag": "gold" }),
        ),
        (
            "cloudevents null data",
            json!({ "specversion": "1.0", "data": null, "tag": "gold" }),
        ),
        ("array body", json!([1, 2, 3])),
        ("string body", json!("gold")),
        ("nothing matches", json!({ "sim_label": "other" })),
        (
            "metadata set twice",
            json!({ "iccid": "1", "sim": { "iccid": "8945738730000000012" } }),
        ),
        ("an address", json!({ "ip": "10.1.2.3" })),
    ];
    events.extend(
        cases
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.to_string().into_bytes())),
    );
    events.push(("not JSON".into(), b"{ nope".to_vec()));
    events
}

/// What a route's plugin decided: its verdict, or for an error only the error's kind
/// (messages are each language's own).
fn decision(step: &Value) -> Value {
    match step["outcome"].as_str() {
        Some("verdict") => step["verdict"].clone(),
        _ => {
            let error = step["error"].as_str().unwrap_or_default();
            let kind = ["invalid event", "invalid config"]
                .into_iter()
                .find(|k| error.contains(k))
                .unwrap_or("other");
            json!({ "error": kind })
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_js_and_python_plugins_give_the_same_verdicts() {
    let plugins: Vec<&str> = LANGUAGES.iter().map(|(_, p)| *p).collect();
    let rx = Receiver::start().await;
    let loaded = [&plugins[..], &["metadata-inject"]].concat();
    let gw = TestGateway::start(&config(), &rx, &loaded).await;
    let (_, listed) = gw.get("/v1/plugins").await;
    for p in &plugins {
        let item = listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == *p)
            .unwrap_or_else(|| panic!("{p} is not loaded: {listed}"));
        assert_eq!(item["status"], "ok", "{item}");
    }

    let mut seen: Vec<(String, Value)> = Vec::new();
    for (source, _) in CONFIGS {
        for (name, body) in events() {
            let id = gw.accept(source, body).await;
            let event = gw.settled(&id).await;
            let routes = event["routes"].as_array().unwrap();
            assert_eq!(routes.len(), LANGUAGES.len(), "{event}");
            // (The router's step: the last of a route's chain.)
            let decisions: Vec<Value> = (routes.iter())
                .map(|r| decision(r["steps"].as_array().unwrap().last().unwrap()))
                .collect();
            for (i, (lang, _)) in LANGUAGES.iter().enumerate().skip(1) {
                assert_eq!(
                    decisions[i], decisions[0],
                    "{source} / {name}: {lang} disagrees with rust"
                );
            }
            seen.push((format!("{source} / {name}"), decisions[0].clone()));
        }
    }

    // The suite reaches every kind of outcome, and a few are pinned by hand.
    let verdict = |case: &str| -> Value {
        seen.iter()
            .find(|(n, _)| n == case)
            .unwrap_or_else(|| panic!("no case {case}"))
            .1
            .clone()
    };
    let destinations = |v: &Value| -> Vec<String> {
        v["deliveries"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|x| x["destination"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        destinations(&verdict("routed / cloudevents")),
        ["fleet", "archive"]
    );
    assert_eq!(destinations(&verdict("routed / numeric iccid")), ["sims"]);
    assert_eq!(
        destinations(&verdict("routed / nothing matches")),
        ["archive"]
    );
    assert_eq!(destinations(&verdict("strict / esimIccid")), ["sims"]);
    assert_eq!(
        destinations(&verdict("by-metadata / metadata set twice")),
        ["fleet"]
    );
    assert_eq!(destinations(&verdict("by-metadata / an address")), ["sims"]);
    assert_eq!(
        destinations(&verdict("by-metadata / onomondo-location.json")),
        ["fleet"]
    );
    assert_eq!(
        destinations(&verdict("by-metadata / nothing matches")),
        ["archive"]
    );
    assert_eq!(verdict("strict / nothing matches")["verdict"], "drop");
    assert_eq!(
        verdict("routed / not JSON"),
        json!({ "error": "invalid event" })
    );
    // A rule none of them knows, or a metadata rule without a value, is refused by each
    // when the route is made, in the same words.
    for (rules, says) in [
        (
            json!({ "colour.red": "fleet" }),
            "unknown rule `colour.red`",
        ),
        (
            json!({ "meta.iccid": "fleet" }),
            "`meta.iccid`: a metadata rule is meta.NAME.VALUE",
        ),
    ] {
        let refusal = refuse_alike(&gw, LANGUAGES, "routed", rules).await;
        assert!(refusal.starts_with(says), "{refusal}");
    }
    gw.shutdown().await.unwrap();
}

/// `change-filter` in the three languages, each remembering in the store through `state`
/// (each plugin its own keys), on one sequence of events: the same verdict at each step.
#[tokio::test(flavor = "multi_thread")]
async fn change_filter_remembers_alike_in_rust_js_and_python() {
    const CHANGE_FILTERS: &[(&str, &str)] = &[
        ("rust", "change-filter"),
        ("js", "change-filter-js"),
        ("python", "change-filter-py"),
    ];
    let mut config = "[[destinations]]\nname = \"sink\"\nurl = \"{receiver}/sink\"\n".to_string();
    let sources = [
        (
            "roaming",
            r#"{ key = "/iccid", fields = "/network/mcc, /network/mnc", ttl = "3600" }"#,
        ),
        (
            "scoped",
            r#"{ key = "/sim/0/id", fields = "/a~1b", scope = "s:" }"#,
        ),
    ];
    for (source, plugin_config) in sources {
        config += &format!("[[sources]]\nname = \"{source}\"\n");
        for (lang, plugin) in CHANGE_FILTERS {
            config += &format!(
                "[[routes]]\nname = \"{source}-{lang}\"\nsource = \"{source}\"\non_error = \"drop\"\n\
                 destinations = [\"sink\"]\n\
                 plugins = [{{ name = \"{plugin}\", config = {plugin_config} }}]\n"
            );
        }
    }
    let plugins: Vec<&str> = CHANGE_FILTERS.iter().map(|(_, p)| *p).collect();
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config, &rx, &plugins).await;

    let network =
        |iccid: Value, mcc: &str| json!({ "iccid": iccid, "network": { "mcc": mcc, "mnc": "01" } });
    let events: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "roaming",
            "first",
            network(json!("a"), "238").to_string().into_bytes(),
        ),
        (
            "roaming",
            "repeat",
            network(json!("a"), "238").to_string().into_bytes(),
        ),
        (
            "roaming",
            "other SIM",
            network(json!("b"), "238").to_string().into_bytes(),
        ),
        (
            "roaming",
            "changed",
            network(json!("a"), "240").to_string().into_bytes(),
        ),
        (
            "roaming",
            "numeric key",
            network(json!(42), "238").to_string().into_bytes(),
        ),
        (
            "roaming",
            "numeric key again",
            network(json!(42), "238").to_string().into_bytes(),
        ),
        (
            "roaming",
            "no key",
            json!({ "network": { "mcc": "238" } })
                .to_string()
                .into_bytes(),
        ),
        (
            "roaming",
            "no fields",
            json!({ "iccid": "c" }).to_string().into_bytes(),
        ),
        (
            "roaming",
            "no fields again",
            json!({ "iccid": "c", "network": {} })
                .to_string()
                .into_bytes(),
        ),
        (
            "roaming",
            "text",
            network(json!("d"), "Zürich \"1\"").to_string().into_bytes(),
        ),
        (
            "roaming",
            "text again",
            network(json!("d"), "Zürich \"1\"").to_string().into_bytes(),
        ),
        ("roaming", "not JSON", b"{ nope".to_vec()),
        (
            "scoped",
            "array and escaped",
            json!({ "sim": [{ "id": "x" }], "a/b": [1, true] })
                .to_string()
                .into_bytes(),
        ),
        (
            "scoped",
            "array and escaped again",
            json!({ "sim": [{ "id": "x" }], "a/b": [1, true] })
                .to_string()
                .into_bytes(),
        ),
    ];
    let seen = agree(&gw, CHANGE_FILTERS, events).await;
    let decided = |case: &str| seen.iter().find(|(n, _)| *n == case).unwrap().1.clone();
    let previous = |case: &str| decided(case)["metadata"].clone();
    assert_eq!(previous("first"), json!([["previous", "[]"]]));
    assert_eq!(
        decided("repeat")["reason"],
        r#"/iccid a: /network/mcc,/network/mnc unchanged (["238","01"])"#
    );
    assert_eq!(previous("other SIM"), json!([["previous", "[]"]]));
    assert_eq!(
        previous("changed"),
        json!([["previous", r#"["238","01"]"#]])
    );
    assert_eq!(decided("numeric key again")["verdict"], "drop");
    assert_eq!(previous("no key"), json!([]));
    assert_eq!(
        decided("no fields again")["reason"],
        "/iccid c: /network/mcc,/network/mnc unchanged ([null,null])"
    );
    assert_eq!(decided("text again")["verdict"], "drop");
    assert_eq!(decided("not JSON"), json!({ "error": "invalid event" }));
    assert_eq!(
        decided("array and escaped again")["reason"],
        "/sim/0/id x: /a~1b unchanged ([[1,true]])"
    );
    for (plugin_config, says) in [
        (
            json!({ "key": "/iccid" }),
            "`fields` must list at least one JSON pointer",
        ),
        (
            json!({ "key": "/iccid", "fields": "/x", "ttl": "soon" }),
            "`ttl` must be a number of seconds, not `soon`",
        ),
        (
            json!({ "key": "iccid", "fields": "/x" }),
            "`iccid` is not a JSON pointer",
        ),
    ] {
        let refusal = refuse_alike(&gw, CHANGE_FILTERS, "roaming", plugin_config).await;
        assert!(refusal.starts_with(says), "{refusal}");
    }
    // Each plugin keeps its own values, under the same keys, alike: the values, the event
    // that set them, the values before.
    let mut kept = Vec::new();
    for (_, plugin) in CHANGE_FILTERS {
        let (_, page) = gw
            .get(&format!("/v1/plugins/{plugin}/state?prefix=s%3A"))
            .await;
        assert_eq!(page["items"][0]["key"], "s:/sim/0/id=x", "{plugin}: {page}");
        let value = page["items"][0]["value"].as_str().unwrap().to_string();
        let lines: Vec<&str> = value.split('\n').collect();
        assert_eq!(
            (lines.len(), lines[0], lines[2]),
            (3, "[[1,true]]", "[]"),
            "{plugin}: {page}"
        );
        kept.push(value);
    }
    assert!(kept.iter().all(|v| *v == kept[0]), "{kept:?}");

    // A replay of an event that passed passes again, with the same `previous` — the values
    // it finds are its own — while a new event with those values is a repeat.
    // (Posts SIM `a` on network `mcc`: the event, settled.)
    let post = |mcc: &'static str| {
        let gw = &gw;
        async move {
            let id = gw
                .accept("roaming", network(json!("a"), mcc).to_string())
                .await;
            gw.settled(&id).await
        }
    };
    let dropped_by_all = |event: &Value| {
        for route in event["routes"].as_array().unwrap() {
            assert_eq!(route["result"]["result"], "dropped", "{event}");
        }
    };
    let first = post("250").await;
    let replayed = replay(&gw, first["event"]["id"].as_str().unwrap()).await;
    for run in [&first, &replayed] {
        for step in latest_steps(run) {
            assert_eq!(step["verdict"], "continue", "{run}");
            assert_eq!(
                step["metadata"],
                json!([["previous", r#"["240","01"]"#]]),
                "{run}"
            );
        }
    }
    dropped_by_all(&post("250").await);

    // A replay of an event older than the one that set the values kept passes, as it did,
    // saying what is `newer`, and leaves the newer values kept: the next event with them
    // is still a repeat.
    let older = post("260").await;
    post("270").await;
    let replayed = replay(&gw, older["event"]["id"].as_str().unwrap()).await;
    for step in latest_steps(&replayed) {
        assert_eq!(step["verdict"], "continue", "{replayed}");
        assert_eq!(
            step["metadata"],
            json!([["newer", r#"["270","01"]"#]]),
            "{replayed}"
        );
    }
    dropped_by_all(&post("270").await);
}

/// Replays event `id` (its first replay: run 1) and waits until its three routes have run.
async fn replay(gw: &TestGateway, id: &str) -> Value {
    let (status, _) = gw
        .send("POST", &format!("/v1/events/{id}/replay"), None)
        .await;
    assert_eq!(status, 202);
    let mut replayed = Value::Null;
    for _ in 0..400 {
        replayed = gw.event(id).await;
        let runs = replayed["routes"].as_array().unwrap();
        if replayed["status"] == "processed" && runs.iter().filter(|r| r["run"] == 1).count() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    replayed
}

/// The decision of the last step of each route in an event's latest run (three routes).
fn latest_steps(run: &Value) -> Vec<Value> {
    let latest: Vec<&Value> = (run["routes"].as_array().unwrap().iter())
        .filter(|r| r["run"] == run["event"]["run"])
        .collect();
    assert_eq!(latest.len(), 3, "{run}");
    (latest.iter())
        .map(|route| decision(route["steps"].as_array().unwrap().last().unwrap()))
        .collect()
}

/// Makes, through the management API, a route on `source` per language (`languages`)
/// with this configuration of its plugin: each must refuse it when the route is made (its
/// WIT `config-check`), in the same words — which are returned. Nothing is made.
async fn refuse_alike(
    gw: &TestGateway,
    languages: &[(&str, &str)],
    source: &str,
    plugin_config: Value,
) -> String {
    let mut said: Vec<String> = Vec::new();
    for (lang, plugin) in languages {
        let route = json!({ "name": format!("refused-{lang}"), "source": source,
                            "plugins": [{ "name": plugin, "config": plugin_config }] });
        let (status, answer) = gw.send("POST", "/v1/routes", Some(route)).await;
        assert_eq!(status, 400, "{plugin_config} in {lang}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        let (_, words) = (error.split_once(&format!("`{plugin}` refuses this configuration: ")))
            .unwrap_or_else(|| panic!("{plugin_config} in {lang}: {answer}"));
        assert!(error.starts_with("`plugins[0].config`: "), "{answer}");
        said.push(words.to_string());
    }
    for (i, (lang, _)) in languages.iter().enumerate().skip(1) {
        assert_eq!(
            said[i], said[0],
            "{plugin_config}: {lang} says otherwise than {}",
            languages[0].0
        );
    }
    said.swap_remove(0)
}

/// Posts each `(source, case, body)` to a gateway whose every source has one route per
/// language (in `languages`' order): each case's decision, which every language must share.
async fn agree<'a>(
    gw: &TestGateway,
    languages: &[(&str, &str)],
    events: Vec<(&str, &'a str, Vec<u8>)>,
) -> Vec<(&'a str, Value)> {
    let mut seen = Vec::new();
    for (source, name, body) in events {
        let id = gw.accept(source, body).await;
        let event = gw.settled(&id).await;
        let routes = event["routes"].as_array().unwrap();
        assert_eq!(routes.len(), languages.len(), "{event}");
        let decisions: Vec<Value> = (routes.iter())
            .map(|r| decision(r["steps"].as_array().unwrap().last().unwrap()))
            .collect();
        for (i, (lang, _)) in languages.iter().enumerate().skip(1) {
            assert_eq!(
                decisions[i], decisions[0],
                "{name}: {lang} disagrees with {}",
                languages[0].0
            );
        }
        seen.push((name, decisions[0].clone()));
    }
    seen
}

/// `enrich` in the three languages, each asking a CRM on loopback through `http` (and
/// remembering answers through `state`), on one sequence of events and configs: the same
/// verdict at each step — the URL each built (percent-encoding included) is in the answer.
#[tokio::test(flavor = "multi_thread")]
async fn enrich_asks_alike_in_rust_js_and_python() {
    const ENRICHERS: &[(&str, &str)] = &[
        ("rust", "enrich"),
        ("js", "enrich-js"),
        ("python", "enrich-py"),
    ];
    let asked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let crm = {
        let asked = asked.clone();
        crate::util::serve(axum::Router::new().fallback(
            move |method: axum::http::Method, uri: axum::http::Uri, headers: axum::http::HeaderMap, sent: String| {
            let asked = asked.clone();
            async move {
                let path = uri.path().to_string();
                if method == axum::http::Method::POST && path == "/graphql" {
                    // A GraphQL-like service: the SIM is in the posted variables.
                    asked.lock().unwrap().push(format!("POST {sent}"));
                    let posted: Value = serde_json::from_str(&sent).unwrap_or(Value::Null);
                    let content_type = headers.get("content-type").map(|v| v.to_str().unwrap().to_string());
                    return match posted["variables"]["id"].as_str() {
                        Some(id) if id.starts_with("8945") => (
                            axum::http::StatusCode::OK,
                            json!({ "customer": { "id": "acme" }, "asked": posted, "content_type": content_type }).to_string(),
                        ),
                        _ => (axum::http::StatusCode::NOT_FOUND, "{}".to_string()),
                    };
                }
                asked.lock().unwrap().push(path.clone());
                let mut parts = path.split('/').skip(1);
                match (parts.next(), parts.next()) {
                    (Some("sims"), Some(id)) if id.starts_with("8945") => (
                        axum::http::StatusCode::OK,
                        json!({ "customer": { "id": "acme", "plan": "iot-1" }, "n": 7, "asked": path }).to_string(),
                    ),
                    (Some("status"), Some(code)) => (code.parse().unwrap(), "{}".to_string()),
                    (Some("text"), _) => (axum::http::StatusCode::OK, "not json".to_string()),
                    _ => (axum::http::StatusCode::NOT_FOUND, "{}".to_string()),
                }
            }
        }))
        .await
    };
    let query = r#"{"query": "query($id: ID!) { sim(iccid: $id) { customer } }", "variables": {"id": {/iccid}, "bytes": {/bytes}}}"#;
    let sims = format!("{crm}/sims/{{/iccid}}");
    let sources = [
        (
            "enrich",
            format!(
                r#"{{ url = "{sims}", "metadata.customer" = "/customer/id", "metadata.n" = "/n", "metadata.none" = "/nothing", into = "/crm/data" }}"#
            ),
        ),
        (
            "cached",
            format!(
                r#"{{ url = "{sims}?region=eu&api_key=crm-secret-0123&code=crm-secret-fn", cache_ttl = "60" }}"#
            ),
        ),
        // The same URL with another key, and with a header's credentials: answers of its own.
        (
            "other-key",
            format!(
                r#"{{ url = "{sims}?region=eu&api_key=crm-other-4567&code=crm-secret-fn", cache_ttl = "60" }}"#
            ),
        ),
        (
            "bearer-a",
            format!(
                r#"{{ url = "{sims}", "header.authorization" = "Bearer crm-a", cache_ttl = "60" }}"#
            ),
        ),
        (
            "bearer-b",
            format!(
                r#"{{ url = "{sims}", "header.authorization" = "Bearer crm-b", cache_ttl = "60" }}"#
            ),
        ),
        (
            "nowhere",
            format!(r#"{{ url = "{sims}", into = "", "metadata.plan" = "/customer/plan" }}"#),
        ),
        (
            "drop-404",
            format!(r#"{{ url = "{sims}", not_found = "drop" }}"#),
        ),
        (
            "error-404",
            format!(r#"{{ url = "{sims}", not_found = "error" }}"#),
        ),
        ("status", format!(r#"{{ url = "{crm}/status/{{/code}}" }}"#)),
        (
            "not-json",
            format!(r#"{{ url = "{crm}/text/{{/iccid}}" }}"#),
        ),
        (
            "graphql",
            format!(
                r#"{{ url = "{crm}/graphql", body = '{query}', "metadata.customer" = "/customer/id", into = "/crm", cache_ttl = "60" }}"#
            ),
        ),
    ];
    let mut config = "[[destinations]]\nname = \"sink\"\nurl = \"{receiver}/sink\"\n".to_string();
    for (source, plugin_config) in &sources {
        config += &format!("[[sources]]\nname = \"{source}\"\n");
        for (lang, plugin) in ENRICHERS {
            config += &format!(
                "[[routes]]\nname = \"{source}-{lang}\"\nsource = \"{source}\"\non_error = \"drop\"\n\
                 destinations = [\"sink\"]\n\
                 plugins = [{{ name = \"{plugin}\", allow_http = [\"{crm}\"], config = {plugin_config} }}]\n"
            );
        }
    }
    let plugins: Vec<&str> = ENRICHERS.iter().map(|(_, p)| *p).collect();
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config, &rx, &plugins).await;

    let sim = |iccid: Value| {
        json!({ "iccid": iccid, "bytes": 1200 })
            .to_string()
            .into_bytes()
    };
    let known = || sim(json!("8945738730000000012"));
    let events: Vec<(&str, &str, Vec<u8>)> = vec![
        ("enrich", "known", known()),
        ("enrich", "unknown", sim(json!("1234"))),
        ("enrich", "numeric", sim(json!(8945001))),
        ("enrich", "to encode", sim(json!("8945 a/b?é~"))),
        ("enrich", "no iccid", b"{}".to_vec()),
        (
            "enrich",
            "not an object on the way",
            json!({ "iccid": "8945", "crm": 5 })
                .to_string()
                .into_bytes(),
        ),
        ("enrich", "not JSON", b"{ nope".to_vec()),
        ("cached", "first", known()),
        ("cached", "again", known()),
        ("other-key", "another key", known()),
        ("bearer-a", "a bearer", known()),
        ("bearer-b", "another bearer", known()),
        ("bearer-a", "a bearer again", known()),
        ("nowhere", "metadata only", known()),
        ("drop-404", "dropped", sim(json!("1234"))),
        ("error-404", "error", sim(json!("1234"))),
        (
            "status",
            "500",
            json!({ "code": "500" }).to_string().into_bytes(),
        ),
        (
            "status",
            "302",
            json!({ "code": "302" }).to_string().into_bytes(),
        ),
        ("not-json", "not a JSON answer", known()),
        ("graphql", "posted", known()),
        ("graphql", "posted again", known()),
        ("graphql", "posted unknown", sim(json!("1234"))),
        ("graphql", "posted to escape", sim(json!("8945 \"a\" \\ é"))),
        ("graphql", "posted no iccid", b"{}".to_vec()),
    ];
    let seen = agree(&gw, ENRICHERS, events).await;
    let decided = |case: &str| seen.iter().find(|(n, _)| *n == case).unwrap().1.clone();

    let known = decided("known");
    assert_eq!(
        known["body"]["crm"]["data"]["customer"]["plan"], "iot-1",
        "{known}"
    );
    assert_eq!(known["body"]["bytes"], 1200, "{known}");
    assert_eq!(
        known["metadata"],
        json!([["customer", "acme"], ["n", "7"]]),
        "{known}"
    );
    assert_eq!(decided("unknown")["verdict"], "continue");
    assert!(
        decided("unknown").get("body").is_none(),
        "{}",
        decided("unknown")
    );
    assert_eq!(
        decided("numeric")["body"]["crm"]["data"]["asked"],
        "/sims/8945001"
    );
    assert_eq!(
        decided("to encode")["body"]["crm"]["data"]["asked"],
        "/sims/8945%20a%2Fb%3F%C3%A9~"
    );
    assert_eq!(decided("no iccid"), json!({ "error": "invalid event" }));
    assert_eq!(
        decided("not an object on the way"),
        json!({ "error": "invalid event" })
    );
    assert_eq!(decided("not JSON"), json!({ "error": "invalid event" }));
    assert_eq!(decided("again"), decided("first"));
    assert_eq!(decided("another key"), decided("first"));
    assert_eq!(decided("another bearer"), decided("a bearer"));
    assert_eq!(decided("a bearer again"), decided("a bearer"));
    assert_eq!(
        decided("metadata only")["metadata"],
        json!([["plan", "iot-1"]])
    );
    assert!(decided("metadata only").get("body").is_none());
    assert_eq!(
        decided("dropped")["reason"],
        format!("GET {crm}/sims/1234 answered 404")
    );
    for case in ["error", "500", "302", "not a JSON answer"] {
        assert_eq!(decided(case), json!({ "error": "other" }), "{case}");
    }
    // A POST of the config's JSON, the event's values in it as JSON.
    let posted = decided("posted");
    assert_eq!(
        posted["metadata"],
        json!([["customer", "acme"]]),
        "{posted}"
    );
    assert_eq!(
        posted["body"]["crm"]["asked"],
        json!({ "query": "query($id: ID!) { sim(iccid: $id) { customer } }",
                "variables": { "id": "8945738730000000012", "bytes": 1200 } }),
        "{posted}"
    );
    assert_eq!(posted["body"]["crm"]["content_type"], "application/json");
    assert_eq!(
        decided("posted again"),
        posted,
        "remembered by URL and body"
    );
    assert_eq!(decided("posted unknown")["verdict"], "continue");
    assert_eq!(
        decided("posted to escape")["body"]["crm"]["asked"]["variables"]["id"],
        "8945 \"a\" \\ é"
    );
    assert_eq!(
        decided("posted no iccid"),
        json!({ "error": "invalid event" })
    );
    for (plugin_config, says) in [
        (
            json!({ "url": format!("{crm}/graphql"), "body": r#"{"id": {/iccid"# }),
            "`body` has an unclosed placeholder",
        ),
        (json!({}), "`url` must name the service"),
        (
            json!({ "url": sims, "into": "crm" }),
            "`into` must be a JSON pointer (it starts with /) or empty, not `crm`",
        ),
        (
            json!({ "url": sims, "cache_ttl": "soon" }),
            "`cache_ttl` must be a number of seconds, not `soon`",
        ),
        (
            json!({ "url": sims, "not_found": "maybe" }),
            "`not_found` must be pass, drop or error, not `maybe`",
        ),
    ] {
        let refusal = refuse_alike(&gw, ENRICHERS, "enrich", plugin_config).await;
        assert!(refusal.starts_with(says), "{refusal}");
    }
    // Each remembered the answer by its URL, the secrets in it left out (the API lists
    // keys), and a digest of the request's credentials: the first 16 hex digits of the
    // SHA-256 of the whole URL and its headers (`\nname: value`) — the same keys in each.
    let digest = |credentials: String| {
        use sha2::Digest;
        let d = sha2::Sha256::digest(credentials.as_bytes());
        (d[..8].iter())
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let known_url = format!("{crm}/sims/8945738730000000012");
    let secret_url = format!("{known_url}?region=eu&api_key=crm-secret-0123&code=crm-secret-fn");
    let remembered = [
        format!(
            "{known_url}?region=eu&api_key=****&code=**** #{}",
            digest(secret_url)
        ),
        format!(
            "{known_url} #{}",
            digest(format!("{known_url}\nauthorization: Bearer crm-a"))
        ),
    ];
    let mut all_keys = Vec::new();
    for (_, plugin) in ENRICHERS {
        let (_, kept) = gw.get(&format!("/v1/plugins/{plugin}/state")).await;
        let mut keys: Vec<String> = (kept["items"].as_array().unwrap().iter())
            .map(|i| i["key"].as_str().unwrap().to_string())
            .collect();
        for key in &remembered {
            assert!(keys.contains(key), "{plugin}: {keys:?}");
        }
        assert!(!kept.to_string().contains("crm-secret"), "{plugin}: {kept}");
        assert!(!kept.to_string().contains("crm-other"), "{plugin}: {kept}");
        assert!(!kept.to_string().contains("Bearer"), "{plugin}: {kept}");
        keys.sort();
        all_keys.push(keys);
    }
    assert!(all_keys.iter().all(|k| *k == all_keys[0]), "{all_keys:?}");
    // Each language asked for the known SIM once per config that reached the CRM with it
    // (`enrich`, `cached` — its second event remembered it —, `other-key`, `bearer-a` —
    // remembered for its second event —, `bearer-b` and `nowhere`): the same URL with
    // other credentials is never answered from another's.
    let asked = asked.lock().unwrap();
    let known_asked = (asked.iter())
        .filter(|p| *p == "/sims/8945738730000000012")
        .count();
    assert_eq!(known_asked, 3 * 6, "{asked:?}");
    let known_posted = (asked.iter())
        .filter(|p| p.starts_with("POST ") && p.contains("\"8945738730000000012\""))
        .count();
    assert_eq!(
        known_posted, 3,
        "once per language, then remembered: {asked:?}"
    );
}
