//! `js-transform` and `py-transform`: a route's own JavaScript or Python, in its config, run
//! on each event inside the plugin sandbox — no build step. One gateway per language, one
//! route per case (each its own code, the same cases in both languages, asserted alike),
//! tried by dry runs; then an event through the store to a receiver.

use serde_json::{Value, json};

use crate::util::{Receiver, TestGateway};

/// The gateway's config: a route per case, `{plugin}` and `{reshaped}`, `{routed}`, …
/// filled with a language's plugin and code (`Lang`).
const CONFIG: &str = r#"
[tables]
sims = "tables/sims.csv"
[[destinations]]
name = "by-customer"
url = "{receiver}/customers/:customer:"
[[destinations]]
name = "alerts"
url = "{receiver}/alerts"
[[destinations]]
name = "archive"
url = "{receiver}/archive"

[[sources]]
name = "reshaped"
[[routes]]
source = "reshaped"
destinations = ["by-customer"]
plugins = [{ name = "{plugin}", config = { code = '''
{reshaped}''' } }]

[[sources]]
name = "routed"
[[routes]]
source = "routed"
destinations = ["archive"]
plugins = [{ name = "{plugin}", config = { code = '''
{routed}''' } }]

[[sources]]
name = "from-file"
[[routes]]
source = "from-file"
destinations = ["archive"]
plugins = [{ name = "{plugin}", config = { code = "${file:transforms/label.{ext}}" } }]

[[sources]]
name = "enriched"
[[routes]]
source = "enriched"
destinations = ["archive"]
plugins = [{ name = "{plugin}", allow_http = ["{crm}"], config = { code = '''
{enriched}''' } }]

[[sources]]
name = "counted"
[[routes]]
source = "counted"
destinations = ["archive"]
plugins = [{ name = "{plugin}", config = { scope = "counted:", code = '''
{counted}''' } }]

[[sources]]
name = "throws"
[[routes]]
source = "throws"
destinations = ["archive"]
plugins = [{ name = "{plugin}", config = { code = '''
{throws}''' } }]

[[sources]]
name = "broken"

[[sources]]
name = "tallied"
[[routes]]
source = "tallied"
destinations = ["archive"]
plugins = [{ name = "{plugin}", config = { code = '''
{tallied_a}''' } }]
[[routes]]
source = "tallied"
destinations = ["archive"]
plugins = [{ name = "{plugin}", config = { code = '''
{tallied_b}''' } }]

[[sources]]
name = "loops"
[[routes]]
source = "loops"
destinations = ["archive"]
plugins = [{ name = "{plugin}", config = { code = '''
{loops}''' } }]
"#;

/// A transform plugin's language: its code for each case, and what it says.
struct Lang {
    plugin: &'static str,
    ext: &'static str,
    reshaped: &'static str,
    routed: &'static str,
    /// The code of `transforms/label.{ext}`, labelling with `PREFIX`; and a broken one
    /// (line 2).
    label: &'static str,
    broken_label: &'static str,
    enriched: &'static str,
    counted: &'static str,
    throws: &'static str,
    /// Counting events in a global; `ROUTE` is the route's name.
    tallied: &'static str,
    loops: &'static str,
    /// Refused by the API: a syntax error, no `transform`, a load that never ends.
    syntax_error: &'static str,
    no_transform: &'static str,
    endless_load: &'static str,
    /// What the plugin says: a dropped event's reason, the start of the error the
    /// `throws` case raises, the refusal of code with no `transform`, and the CRM case's
    /// error.
    dropped: &'static str,
    raised: &'static str,
    must_define: &'static str,
    crm_error: &'static str,
}

const JS: Lang = Lang {
    plugin: "js-transform",
    ext: "js",
    reshaped: r#"// A SIM's usage in kB, its customer from the lookup table into metadata.
function transform(event) {
  const sim = lookup("sims", event.body.iccid);
  event.metadata.customer = sim ? sim.customer : "unknown";
  event.body = { iccid: event.body.iccid, kb: Math.round(event.body.bytes / 1000), from: event.source };
}
"#,
    routed: r#"function transform(event) {
  if (event.body.type === "sms") return null;
  // (`$$` is a `$` in the config file, whose `$${VAR}` names the environment's VAR.)
  const text = `SIM $${event.body.iccid}: $${event.body.type}`;
  return {
    body: text,
    contentType: "text/plain",
    headers: { ...event.headers, "x-kind": event.body.type },
    destinations: event.body.type === "usage-alert" ? ["alerts", "archive"] : ["archive"],
  };
}
"#,
    // (No `$$` in a file of its own: it is not the config's text.)
    label: "function transform(event) {\n  event.body.label = `PREFIX-${event.body.iccid}`;\n}\n",
    broken_label: "function transform(event) {\n  event.body.label = ;\n}\n",
    enriched: r#"// What the CRM knows of the SIM, and how many of its events came so far.
function transform(event) {
  const iccid = event.body.iccid;
  const seen = Number(state.get(iccid) ?? "0") + 1;
  state.set(iccid, String(seen), 3600);
  const crm = http("{crm}/sims/" + iccid, { headers: { authorization: "Bearer crm-token" } });
  if (crm.status !== 200) throw new Error("the CRM answered " + crm.status);
  event.body.customer = crm.json().customer;
  event.body.seen = seen;
}
"#,
    // (A count that two events handled at once cannot both take: `swap` sets only over
    // what was read.)
    counted: r#"function transform(event) {
  let was, seen;
  do {
    was = state.get(event.body.iccid);
    seen = Number(was ?? "0") + 1;
  } while (!state.swap(event.body.iccid, was, String(seen)));
  event.body.seen = seen;
}
"#,
    throws: r#"function transform(event) {
  const n = 1;
  return event.body.missing.deeper + n;
}
"#,
    tallied: r#"function transform(event) {
  globalThis.tally = (globalThis.tally ?? 0) + 1;
  event.body = { route: "ROUTE", tally: globalThis.tally };
}
"#,
    loops: "function transform(event) { while (true) {} }\n",
    syntax_error: "function transform(event) {\n  return {\n}",
    no_transform: "const transform = 1;",
    endless_load: "while (true) {}\nfunction transform(event) {}",
    dropped: "transform returned null",
    raised: "transform threw: TypeError",
    must_define: "`code` must define `function transform(event)`",
    crm_error: "transform threw: Error: the CRM answered 404 (line 7)",
};

const PY: Lang = Lang {
    plugin: "py-transform",
    ext: "py",
    reshaped: r#"# A SIM's usage in kB, its customer from the lookup table into metadata.
def transform(event):
    sim = lookup("sims", event["body"]["iccid"])
    event["metadata"]["customer"] = sim["customer"] if sim else "unknown"
    event["body"] = {"iccid": event["body"]["iccid"], "kb": round(event["body"]["bytes"] / 1000), "from": event["source"]}
"#,
    routed: r#"def transform(event):
    kind = event["body"]["type"]
    if kind == "sms":
        return DROP
    return {
        "body": f"SIM {event['body']['iccid']}: {kind}",
        "content_type": "text/plain",
        "headers": {**event["headers"], "x-kind": kind},
        "destinations": ["alerts", "archive"] if kind == "usage-alert" else ["archive"],
    }
"#,
    label: "def transform(event):\n    event[\"body\"][\"label\"] = f\"PREFIX-{event['body']['iccid']}\"\n",
    broken_label: "def transform(event):\n    event[\"body\"][\"label\"] = \n",
    enriched: r#"# What the CRM knows of the SIM, and how many of its events came so far.
def transform(event):
    iccid = event["body"]["iccid"]
    seen = int(state.get(iccid) or "0") + 1
    state.set(iccid, str(seen), 3600)
    crm = http("{crm}/sims/" + iccid, headers={"authorization": "Bearer crm-token"})
    if crm.status != 200: raise RuntimeError(f"the CRM answered {crm.status}")
    event["body"]["customer"] = crm.json()["customer"]
    event["body"]["seen"] = seen
"#,
    counted: r#"def transform(event):
    while True:
        was = state.get(event["body"]["iccid"])
        seen = int(was or "0") + 1
        if state.swap(event["body"]["iccid"], was, str(seen)):
            break
    event["body"]["seen"] = seen
"#,
    throws: r#"def transform(event):
    n = 1
    return event["body"]["missing"]["deeper"] + n
"#,
    tallied: r#"tally = 0
def transform(event):
    global tally
    tally += 1
    event["body"] = {"route": "ROUTE", "tally": tally}
"#,
    loops: "def transform(event):\n    while True:\n        pass\n",
    syntax_error: "def transform(event):\n    return {\n",
    no_transform: "transform = 1",
    endless_load: "while True:\n    pass\ndef transform(event):\n    pass\n",
    dropped: "transform returned DROP",
    raised: "transform raised: KeyError",
    must_define: "`code` must define `def transform(event)`",
    crm_error: "transform raised: RuntimeError: the CRM answered 404 (line 7)",
};

#[tokio::test(flavor = "multi_thread")]
async fn js_transform_runs_the_routes_own_code_in_the_sandbox() {
    runs_the_routes_own_code_in_the_sandbox(&JS).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn py_transform_runs_the_routes_own_code_in_the_sandbox() {
    runs_the_routes_own_code_in_the_sandbox(&PY).await;
}

async fn runs_the_routes_own_code_in_the_sandbox(lang: &Lang) {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&[lang.plugin]);
    std::fs::create_dir_all(dir.path().join("tables")).unwrap();
    std::fs::write(
        dir.path().join("tables/sims.csv"),
        "iccid,customer\n8945738730000000012,acme\n",
    )
    .unwrap();
    // Code in a file of its own, re-read at each reload as the config is.
    std::fs::create_dir_all(dir.path().join("transforms")).unwrap();
    let label = dir.path().join(format!("transforms/label.{}", lang.ext));
    let write_label = |prefix: &str| {
        std::fs::write(&label, lang.label.replace("PREFIX", prefix)).unwrap();
    };
    write_label("sim");
    let crm = crate::util::serve(axum::Router::new().route(
        "/sims/{iccid}",
        axum::routing::get(
            |axum::extract::Path(iccid): axum::extract::Path<String>,
             headers: axum::http::HeaderMap| async move {
                let known = iccid == "8945738730000000012"
                    && headers
                        .get("authorization")
                        .is_some_and(|v| v == "Bearer crm-token");
                match known {
                    true => (axum::http::StatusCode::OK, r#"{"customer":"acme"}"#),
                    false => (axum::http::StatusCode::NOT_FOUND, "{}"),
                }
            },
        ),
    ))
    .await;
    let config = (CONFIG.replace("{plugin}", lang.plugin))
        .replace("{ext}", lang.ext)
        .replace("{reshaped}", lang.reshaped)
        .replace("{routed}", lang.routed)
        .replace("{enriched}", lang.enriched)
        .replace("{counted}", lang.counted)
        .replace("{throws}", lang.throws)
        .replace("{tallied_a}", &lang.tallied.replace("ROUTE", "a"))
        .replace("{tallied_b}", &lang.tallied.replace("ROUTE", "b"))
        .replace("{loops}", lang.loops)
        .replace("{crm}", &crm);
    let gw = TestGateway::start_from_file(dir, &config, &rx)
        .await
        .unwrap();
    let dry_run = |source: &'static str, body: Value| {
        let gw = &gw;
        async move {
            let (status, answer) = gw
                .send("POST", &format!("/v1/sources/{source}/dry-run"), Some(body))
                .await;
            assert_eq!(status, 200, "{answer}");
            answer
        }
    };
    let usage = json!({ "type": "usage", "iccid": "8945738730000000012", "bytes": 9484 });

    // A new body, and metadata from a lookup table for the destination's URL.
    let answer = dry_run("reshaped", usage.clone()).await;
    let delivery = &answer["deliveries"][0];
    assert_eq!(
        delivery["body"],
        json!({ "iccid": "8945738730000000012", "kb": 9, "from": "reshaped" }),
        "{answer}"
    );
    assert!(
        (delivery["url"].as_str().unwrap()).ends_with("/customers/acme"),
        "{answer}"
    );

    // Dropped, or routed to destinations of its choosing with a text body and a header.
    let answer = dry_run("routed", json!({ "type": "sms", "iccid": "1" })).await;
    assert_eq!(
        answer["routes"][0]["result"]["result"], "dropped",
        "{answer}"
    );
    assert_eq!(
        answer["routes"][0]["result"]["reason"], lang.dropped,
        "{answer}"
    );
    let alert = json!({ "type": "usage-alert", "iccid": "8945738730000000012" });
    let answer = dry_run("routed", alert).await;
    let deliveries = answer["deliveries"].as_array().unwrap();
    let names: Vec<&str> = (deliveries.iter())
        .map(|d| d["destination"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alerts", "archive"], "{answer}");
    assert_eq!(
        deliveries[0]["body"], "SIM 8945738730000000012: usage-alert",
        "{answer}"
    );
    let headers = deliveries[0]["headers"].as_array().unwrap();
    assert!(
        headers.contains(&json!(["x-kind", "usage-alert"])),
        "{answer}"
    );
    assert!(
        headers.contains(&json!(["content-type", "text/plain"])),
        "{answer}"
    );

    let (_, plugins) = gw.get("/v1/plugins").await;
    assert_eq!(plugins["items"][0]["checks_config"], true, "{plugins}");
    // Code that does not compile, or defines no `transform`, is refused when the route is
    // made (the plugin's `config-check`), saying what and where; nothing is made.
    let broken = |code: &str| {
        json!({ "name": "broken", "source": "broken", "destinations": ["archive"],
                "plugins": [{ "name": lang.plugin, "config": { "code": code } }] })
    };
    let made = |code: &'static str| {
        let (gw, route) = (&gw, broken(code));
        async move { gw.send("POST", "/v1/routes", Some(route)).await }
    };
    let (status, answer) = made(lang.syntax_error).await;
    assert_eq!(status, 400, "{answer}");
    let refusal = answer.to_string();
    assert!(
        refusal.contains("plugins[0].config")
            && refusal.contains(&format!(
                "plugin `{}` refuses this configuration",
                lang.plugin
            ))
            && refusal.contains("`code` does not compile: SyntaxError"),
        "{answer}"
    );
    let (status, answer) = made(lang.no_transform).await;
    assert_eq!(status, 400, "{answer}");
    assert!((answer.to_string()).contains(lang.must_define), "{answer}");
    // Code whose loading never ends is stopped by the deadline, and refused as well.
    let (status, answer) = made(lang.endless_load).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        (answer.to_string()).contains("the check ran past the deadline"),
        "{answer}"
    );
    let (status, answer) = gw.send("GET", "/v1/routes/broken", None).await;
    assert_eq!(status, 404, "{answer}");

    // A throw and a loop that never ends are the plugin's errors at an event, each saying
    // what and where; the route's `on_error` (dead-letter) applies.
    let error = |answer: &Value| answer["routes"][0]["result"]["error"].to_string();
    let answer = dry_run("throws", usage.clone()).await;
    assert!(
        error(&answer).contains(lang.raised) && error(&answer).contains("(line 3)"),
        "{answer}"
    );
    let answer = dry_run("loops", usage.clone()).await;
    assert!(error(&answer).contains("exceeded its deadline"), "{answer}");
    // ... and the gateway goes on: the same instance pool serves the next event.
    let answer = dry_run("reshaped", usage.clone()).await;
    assert_eq!(answer["deliveries"][0]["body"]["kb"], 9, "{answer}");

    // The file's code, and after a change to it and a reload, the new code.
    let answer = dry_run("from-file", usage.clone()).await;
    assert_eq!(
        answer["deliveries"][0]["body"]["label"], "sim-8945738730000000012",
        "{answer}"
    );
    write_label("device");
    let (status, report) = gw.send("POST", "/v1/reload", None).await;
    assert_eq!(status, 200, "{report}");
    let answer = dry_run("from-file", usage.clone()).await;
    assert_eq!(
        answer["deliveries"][0]["body"]["label"], "device-8945738730000000012",
        "{answer}"
    );
    // A change to the file that breaks the code is refused by the reload, which keeps the
    // code in force serving.
    std::fs::write(&label, lang.broken_label).unwrap();
    let (status, report) = gw.send("POST", "/v1/reload", None).await;
    assert_eq!(status, 422, "{report}");
    assert_eq!(report["config"], "rejected", "{report}");
    let why = report["config_error"].as_str().unwrap_or_default();
    assert!(
        why.contains(".plugins[0].config")
            && why.contains("SyntaxError")
            && why.contains("(line 2)"),
        "{report}"
    );
    let answer = dry_run("from-file", usage.clone()).await;
    assert_eq!(
        answer["deliveries"][0]["body"]["label"], "device-8945738730000000012",
        "{answer}"
    );

    // Through the store to the destination, as it would be sent.
    let id = gw.accept("reshaped", usage.to_string()).await;
    gw.settled(&id).await;
    let got = rx.wait_for(1).await;
    assert!(got[0].uri.ends_with("/customers/acme"), "{}", got[0].uri);
    assert_eq!(
        got[0].json(),
        json!({ "iccid": "8945738730000000012", "kb": 9, "from": "reshaped" })
    );

    // State kept between events and a request to a service the route allows: the second
    // event of a SIM is its second; an unknown SIM is the plugin's error.
    for _ in 0..2 {
        let id = gw.accept("enriched", usage.to_string()).await;
        gw.settled(&id).await;
    }
    let got = rx.wait_for(3).await;
    let enriched: Vec<Value> = (got.iter())
        .filter(|r| r.uri.ends_with("/archive"))
        .map(|r| r.json())
        .collect();
    assert_eq!(enriched.len(), 2, "{enriched:?}");
    assert_eq!(enriched[0]["customer"], "acme");
    assert_eq!(
        (enriched[0]["seen"].clone(), enriched[1]["seen"].clone()),
        (json!(1), json!(2))
    );
    // Another route's code, its keys kept apart by its `scope`: the SIM's first event there.
    let id = gw.accept("counted", usage.to_string()).await;
    gw.settled(&id).await;
    let got = rx.wait_for(4).await;
    assert_eq!(got[3].json()["seen"], 1, "{:?}", got[3].json());
    let unknown = json!({ "iccid": "8945000000000000000" });
    let answer = dry_run("enriched", unknown).await;
    assert!(error(&answer).contains(lang.crm_error), "{answer}");

    // Warm instances serve one route each: what one route's code leaves in its globals,
    // another route's code never sees (both count events in `globalThis.tally`).
    for _ in 0..3 {
        let id = gw.accept("tallied", usage.to_string()).await;
        gw.settled(&id).await;
    }
    let got = rx.wait_for(10).await;
    let tallies = |route: &str| -> Vec<Value> {
        (got.iter().map(|r| r.json()))
            .filter(|b| b["route"] == route)
            .map(|b| b["tally"].clone())
            .collect()
    };
    assert_eq!(tallies("a"), [json!(1), json!(2), json!(3)]);
    assert_eq!(tallies("b"), [json!(1), json!(2), json!(3)]);
    gw.shutdown().await.unwrap();
}

/// `examples/transforms` (a route's JavaScript in a file of its own, a lookup table, the
/// destinations it chooses) passes its golden cases, as its README comment says to run
/// them — and so does its Python (`python.toml`, `usage.py`), with the same cases.
#[test]
fn the_transforms_example_passes_its_golden_cases() {
    examples_golden_cases_pass(&JS, "switchyard.toml");
}

#[test]
fn the_transforms_example_in_python_passes_the_same_golden_cases() {
    examples_golden_cases_pass(&PY, "python.toml");
}

fn examples_golden_cases_pass(lang: &Lang, config: &str) {
    let root = xtask::workspace_root();
    let dir = tempfile::tempdir().unwrap();
    let example = dir.path().join("transforms");
    crate::util::copy_dir(&root.join("examples/transforms"), &example);
    crate::util::copy_dir(
        &root.join("examples/transforms/cases"),
        &example.join("cases"),
    );
    crate::util::copy_dir(&root.join("examples/events"), &dir.path().join("events"));
    let plugins = example.join("plugins.d");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(
        crate::util::guest(lang.plugin),
        plugins.join(format!("{}.wasm", lang.plugin)),
    )
    .unwrap();
    let config = example.join(config);
    let cases = example.join("cases");
    let (ok, out, err) = crate::cli::run(&[
        "dry-run",
        "--config",
        config.to_str().unwrap(),
        "--cases",
        cases.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.ends_with("3 cases: 3 passed, 0 failed\n"), "{out}");
}
