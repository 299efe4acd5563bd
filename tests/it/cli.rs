//! The `switchyard` binary from outside: `plugin check`, `plugin run` and `serve` errors.

use std::process::Command;

use serde_json::{Value, json};

use crate::util::{GUESTS, guest, switchyard_bin};

pub(crate) fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(switchyard_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("switchyard runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`run`] from an async test: on a blocking thread, the runtime free to serve the gateway
/// the binary talks to.
async fn run_in_background(args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || run(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .expect("the binary's run ends")
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn plugin_check_accepts_every_example_plugin() {
    for name in xtask::PLUGINS {
        let (ok, out, err) = run(&["plugin", "check", path(&guest(name))]);
        assert!(ok, "{name}: {out}{err}");
        assert!(
            out.contains("fits switchyard:plugin@0.1.4, and checks the configurations"),
            "{out}"
        );
    }
}

/// A plugin built against the first contract (0.1.0) fits this gateway's 0.1.4, whose
/// additions it does not use, and runs: the host answers its `config` import.
#[test]
fn a_plugin_of_the_first_contract_still_fits_and_runs() {
    let plugin = guest("contract-0-1-0");
    let (ok, out, err) = run(&["plugin", "check", "--json", path(&plugin)]);
    assert!(ok, "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(
        report["exports"]
            .to_string()
            .contains("switchyard:plugin/handler@0.1.0"),
        "{report}"
    );
    assert_eq!(report["checks_config"], false, "{report}");
    let event = xtask::workspace_root().join("examples/events/onomondo-usage.json");
    let args = [
        "plugin",
        "run",
        path(&plugin),
        "--event",
        path(&event),
        "--config",
        "k=v",
    ];
    let (ok, out, err) = run(&args);
    assert!(ok, "{out}{err}");
    let verdict: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        verdict["metadata"],
        serde_json::json!([["contract", "0.1.0"], ["k", "v"]])
    );
}

#[test]
fn plugin_check_names_the_mismatch_of_another_version() {
    let (ok, out, _) = run(&["plugin", "check", "--json", path(&guest("wrong-world"))]);
    assert!(!ok, "a plugin built against 0.2.0 must not pass");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], false);
    let problems = report["problems"].to_string();
    assert!(
        problems.contains("exports `switchyard:plugin/handler@0.2.0`"),
        "{problems}"
    );
    assert!(
        problems.contains("switchyard:plugin/handler@0.1.4"),
        "{problems}"
    );
    assert!(
        problems.contains("imports `switchyard:plugin/types@0.2.0`"),
        "{problems}"
    );
}

#[test]
fn plugin_check_names_a_missing_export_and_a_non_component() {
    let dir = tempfile::tempdir().unwrap();
    // A valid component that exports nothing and imports something we do not provide.
    let empty = dir.path().join("empty.wasm");
    std::fs::write(&empty, wasm_component_with_unknown_import()).unwrap();
    let (ok, out, _) = run(&["plugin", "check", path(&empty)]);
    assert!(!ok);
    assert!(
        out.contains("does not export `switchyard:plugin/handler@0.1.4`"),
        "{out}"
    );
    assert!(
        out.contains("imports `acme:clock/now@1.0.0`, which this gateway does not provide"),
        "{out}"
    );

    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"hello").unwrap();
    let (ok, out, _) = run(&["plugin", "check", path(&garbage)]);
    assert!(!ok);
    assert!(out.contains("not a valid WebAssembly component"), "{out}");
}

#[test]
fn plugin_run_prints_the_verdict_as_json() {
    let root = xtask::workspace_root();
    let event = root.join("examples/events/onomondo-location.json");
    let (ok, out, err) = run(&[
        "plugin",
        "run",
        path(&guest("tag-router")),
        "--event",
        path(&event),
        "--config",
        "label.valid-example=fleet,archive",
    ]);
    assert!(ok, "{out}{err}");
    let verdict: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(verdict["verdict"], "route");
    assert_eq!(verdict["deliveries"][0]["destination"], "fleet");
    assert_eq!(verdict["deliveries"][1]["destination"], "archive");

    let (ok, out, _) = run(&[
        "plugin",
        "run",
        path(&guest("event-filter")),
        "--event",
        path(&event),
    ]);
    assert!(!ok, "a missing config is refused");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert!(
        (answer["error"].as_str().unwrap())
            .starts_with("the plugin refuses this configuration: `allow` must list"),
        "{answer}"
    );
}

/// `event-filter` keeps an event whose type is allowed (names or `*` patterns) and whose
/// body passes every `/pointer` condition — one of, none of, compared, present, absent —
/// and drops the rest naming the first reason; a condition it cannot read is an
/// `invalid-config` error naming it.
/// `plugin run --state FILE`: the values the plugin keeps between events, as it finds them
/// (none without it); a file of another shape is named with what it takes.
#[test]
fn plugin_run_starts_from_the_state_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let event = xtask::workspace_root().join("examples/events/onomondo-location.json");
    let plugin = guest("change-filter");
    let state = dir.path().join("state.json");
    let run_with = |extra: &[&str]| {
        let args = [
            "plugin",
            "run",
            path(&plugin),
            "--event",
            path(&event),
            "--config",
            "key=/iccid",
            "--config",
            "fields=/network/mcc",
        ];
        run(&[&args[..], extra].concat())
    };
    let (ok, out, err) = run_with(&[]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["verdict"],
        "continue"
    );
    std::fs::write(&state, r#"{"/iccid=8945738730000000012": "[\"238\"]"}"#).unwrap();
    let (ok, out, err) = run_with(&["--state", path(&state)]);
    assert!(ok, "{out}{err}");
    let verdict: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(verdict["verdict"], "drop", "{verdict}");
    std::fs::write(&state, "[1]").unwrap();
    let (ok, _, err) = run_with(&["--state", path(&state)]);
    assert!(!ok);
    assert!(
        err.contains("not an object of keys and their text values"),
        "{err}"
    );
}

/// `plugin run --allow-http ORIGIN`: the plugin's requests reach what is allowed (here a
/// service on loopback, so `--allow-network` too); without them, nothing is sent and the
/// plugin's error says what to allow.
#[tokio::test(flavor = "multi_thread")]
async fn plugin_run_sends_requests_only_where_allowed() {
    let crm = crate::util::serve(
        axum::Router::new().fallback(|| async { r#"{"customer":{"id":"acme"}}"# }),
    )
    .await;
    let event = std::env::temp_dir().join(format!("sim-{}.json", std::process::id()));
    std::fs::write(&event, r#"{"iccid":"8945738730000000012"}"#).unwrap();
    let plugin = guest("enrich");
    let args = |extra: &[&str]| -> Vec<String> {
        let url = format!("url={crm}/sims/{{/iccid}}");
        let base = ["plugin", "run", path(&plugin), "--event", path(&event)];
        let config = [
            "--config",
            &url,
            "--config",
            "metadata.customer=/customer/id",
        ];
        [&base[..], &config[..], extra]
            .concat()
            .iter()
            .map(|a| a.to_string())
            .collect()
    };
    let run_owned = |args: Vec<String>| async move {
        run_in_background(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
    };
    let (ok, out, err) = run_owned(args(&[])).await;
    assert!(!ok, "{out}{err}");
    let error = serde_json::from_str::<Value>(&out).unwrap()["error"].to_string();
    assert!(
        error.contains(&format!("add `{crm}` to its `allow_http`")),
        "{error}"
    );

    let allowed = ["--allow-http", &crm, "--allow-network", "127.0.0.0/8"];
    let (ok, out, err) = run_owned(args(&allowed)).await;
    assert!(ok, "{out}{err}");
    let verdict: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        verdict["metadata"],
        serde_json::json!([["customer", "acme"]]),
        "{verdict}"
    );
    assert_eq!(
        verdict["body"]["enrichment"]["customer"]["id"], "acme",
        "{verdict}"
    );

    // Allowed, but the address guard refuses loopback unless told.
    let (ok, out, _) = run_owned(args(&allowed[..2])).await;
    assert!(!ok);
    assert!(out.contains("refused by the SSRF guard"), "{out}");
    let (ok, _, err) = run_owned(args(&["--allow-http", "ftp://crm"])).await;
    assert!(!ok);
    assert!(
        err.contains("--allow-http: `ftp://crm` is not an origin"),
        "{err}"
    );
    std::fs::remove_file(&event).unwrap();
}

#[test]
fn event_filter_keeps_what_passes_its_conditions() {
    let dir = tempfile::tempdir().unwrap();
    let event = dir.path().join("event.json");
    let body = serde_json::json!({ "type": "network-registration", "bytes": 1234,
        "sim": { "label": "fleet", "roaming": false, "mcc": "238" }, "gone": null });
    std::fs::write(&event, body.to_string()).unwrap();
    let plugin = guest("event-filter");
    let filter = |pairs: &[&str]| {
        let mut args = vec!["plugin", "run", path(&plugin), "--event", path(&event)];
        for pair in pairs {
            args.extend(["--config", pair]);
        }
        let (ok, out, err) = run(&args);
        (
            ok,
            serde_json::from_str::<Value>(&out).unwrap_or_else(|_| panic!("{out}{err}")),
        )
    };
    for kept in [
        &["allow=usage,network-*"][..],
        &["/sim/label=trucks,fleet", "/bytes=>=1234", "/bytes=<2000"],
        &["/sim/roaming=false", "/sim/mcc=238", "/sim/label=fl*"],
        &[
            "/sim/label=!trucks",
            "/nope=!x",
            "/sim=?",
            "/gone=!?",
            "/nope=!?",
        ],
        &["allow=*", "/bytes=>1000"],
    ] {
        let (ok, verdict) = filter(kept);
        assert!(ok, "{kept:?}: {verdict}");
        assert_eq!(verdict["verdict"], "continue", "{kept:?}: {verdict}");
        assert_eq!(
            verdict["metadata"],
            serde_json::json!([["event_type", "network-registration"]]),
            "{kept:?}"
        );
    }
    for (dropped, why) in [
        (
            &["allow=usage,location"][..],
            "event type `network-registration` is not allowed",
        ),
        (
            &["allow=network-*", "/sim/label=trucks"],
            "`/sim/label` is `fleet`, not one of trucks",
        ),
        (
            &["/sim/label=!fleet"],
            "`/sim/label` is `fleet`, one of fleet",
        ),
        (&["/bytes=>1234"], "`/bytes` is 1234, not >1234"),
        (
            &["/sim/label=>1"],
            "`/sim/label` is not a number to compare (>1)",
        ),
        (&["/nope=?"], "`/nope` is missing"),
        (&["/gone=?"], "`/gone` is missing"),
        (&["/sim=!?"], "`/sim` is set"),
        (&["/nope=a"], "`/nope` is missing, not one of a"),
    ] {
        let (ok, verdict) = filter(dropped);
        assert!(ok, "{dropped:?}: {verdict}");
        assert_eq!(verdict["verdict"], "drop", "{dropped:?}: {verdict}");
        assert_eq!(verdict["reason"], why, "{dropped:?}: {verdict}");
    }
    for (pairs, says) in [
        (
            &["field=type"][..],
            "`allow` must list at least one event type",
        ),
        (
            &["/bytes=>=lots"],
            "`>=lots`: `lots` after `>=` is not a number",
        ),
        (&["/bytes=!"], "`!` names no value"),
    ] {
        refused_config(&pairs, filter(pairs), says);
    }
}

/// A plugin's answer to a config it cannot read (`pairs`): not ok, refused by the
/// plugin's check before the event, saying `says`.
fn refused_config(pairs: &dyn std::fmt::Debug, (ok, answer): (bool, Value), says: &str) {
    assert!(!ok, "{pairs:?}: {answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.starts_with("the plugin refuses this configuration: ") && error.contains(says),
        "{pairs:?}: {error}"
    );
}

/// `reshape` builds a new body by configuration alone: fields renamed, nested, kept in
/// their JSON types, texts (with values in them) and metadata added, a missing one left
/// out, a base object kept and added to; a pair it cannot read is an `invalid-config` error naming it.
#[test]
fn reshape_builds_a_new_body_by_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let event = dir.path().join("event.json");
    let body = serde_json::json!({ "type": "usage", "iccid": "8945", "bytes": 1234, "ok": true,
        "data": { "cell": { "id": 7 }, "a": 1 } });
    std::fs::write(&event, body.to_string()).unwrap();
    let plugin = guest("reshape");
    let reshape = |pairs: &[&str]| {
        let mut args = vec!["plugin", "run", path(&plugin), "--event", path(&event)];
        for pair in pairs {
            args.extend(["--config", pair]);
        }
        args.extend(["--metadata", "iccid=8945-from-metadata"]);
        let (ok, out, err) = run(&args);
        (
            ok,
            serde_json::from_str::<Value>(&out).unwrap_or_else(|_| panic!("{out}{err}")),
        )
    };
    let (ok, verdict) = reshape(&[
        "device.iccid=/iccid",
        "usage.bytes=/bytes",
        "usage.ok=/ok",
        "cell=/data/cell",
        "kind==usage",
        "version=#2",
        r#"tags=#["sim",true]"#,
        "sim=@iccid",
        "gone=/nope",
        "unset=@imsi",
    ]);
    assert!(ok, "{verdict}");
    assert_eq!(verdict["verdict"], "continue", "{verdict}");
    assert_eq!(
        verdict["body"],
        serde_json::json!({
            "device": { "iccid": "8945" },
            "usage": { "bytes": 1234, "ok": true },
            "cell": { "id": 7 },
            "kind": "usage",
            "version": 2,
            "tags": ["sim", true],
            "sim": "8945-from-metadata"
        })
    );
    let (ok, verdict) = reshape(&["*=/data", "a==one", "type=/type"]);
    assert!(ok, "{verdict}");
    assert_eq!(
        verdict["body"],
        serde_json::json!({ "cell": { "id": 7 }, "a": "one", "type": "usage" })
    );
    // Texts with the body's values and metadata in them; other braces kept.
    let (ok, verdict) = reshape(&[
        "text==SIM {/iccid} used {/bytes} bytes (ok: {/ok}, cell {/data/cell}, {/nope}{@iccid})",
        "kept=={not a placeholder} {/unclosed",
    ]);
    assert!(ok, "{verdict}");
    assert_eq!(
        verdict["body"],
        serde_json::json!({
            "text": r#"SIM 8945 used 1234 bytes (ok: true, cell {"id":7}, 8945-from-metadata)"#,
            "kept": "{not a placeholder} {/unclosed"
        })
    );
    // Arrays: elements by index, objects inside them, the ones before unset as null.
    let (ok, verdict) = reshape(&[
        "blocks[0].text==SIM {/iccid}",
        "blocks[0].type==section",
        "blocks[1].fields[0]=/bytes",
        "grid[1][0]=/ok",
        "sparse[2]==c",
    ]);
    assert!(ok, "{verdict}");
    assert_eq!(
        verdict["body"],
        serde_json::json!({
            "blocks": [{ "text": "SIM 8945", "type": "section" }, { "fields": [1234] }],
            "grid": [null, [true]],
            "sparse": [null, null, "c"]
        })
    );
    let (_, verdict) = reshape(&["*=/", "data.b==2"]);
    assert_eq!(
        verdict["body"]["data"],
        serde_json::json!({ "cell": { "id": 7 }, "a": 1, "b": "2" })
    );
    for (pairs, says) in [
        (
            &["x=iccid"][..],
            "`x` = `iccid`: a source is /a/json/pointer, =text, #json or @metadata",
        ),
        (&["x=#{"][..], "`x` = `#{`: not JSON after `#`"),
        (&["x..y=/iccid"][..], "names joined by dots"),
        (&["x[a]=/iccid"][..], "such as [0]"),
        (&["x[0=/iccid"][..], "such as [0]"),
        (&["[0]=/iccid"][..], "such as [0]"),
        (&["x[0]y=/iccid"][..], "such as [0]"),
        (&["x[5000]=/iccid"][..], "at most 1000"),
    ] {
        refused_config(&pairs, reshape(pairs), says);
    }
    // What depends on the body's values is found at the event: an `invalid-config` error.
    for (pairs, says) in [
        (&["x=/iccid", "x[0]=/bytes"][..], "`x` is already set"),
        (&["x[0]=/iccid", "x.y=/bytes"][..], "`x` is already set"),
        (&["x=/iccid", "x.y=/bytes"][..], "`x` is already set"),
        (&["*=/type"][..], "is not an object"),
    ] {
        let (ok, answer) = reshape(pairs);
        assert!(!ok, "{pairs:?}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(
            error.contains("plugin error: invalid config: ") && error.contains(says),
            "{pairs:?}: {error}"
        );
    }
}

/// `validate` stops the events whose body does not match a JSON Schema, naming where and
/// why — an error (the route's `on_error`), or a drop — from a schema in its config or
/// one per event type from a lookup table; a schema that is not one is an
/// `invalid-config` error.
#[test]
fn validate_checks_bodies_against_a_json_schema() {
    let dir = tempfile::tempdir().unwrap();
    let event = dir.path().join("event.json");
    let schema = serde_json::json!({
        "type": "object",
        "required": ["iccid", "type"],
        "properties": {
            "iccid": { "type": "string", "pattern": "^89[0-9]{17,18}$" },
            "bytes": { "type": "integer", "minimum": 0 }
        }
    });
    let schemas = dir.path().join("schemas.json");
    std::fs::write(&schemas, serde_json::json!({ "usage": schema }).to_string()).unwrap();
    let plugin = guest("validate");
    let check = |body: Value, pairs: &[&str]| {
        std::fs::write(&event, body.to_string()).unwrap();
        let mut args = vec!["plugin", "run", path(&plugin), "--event", path(&event)];
        args.extend(["--table", &*format!("schemas={}", schemas.display()).leak()]);
        for pair in pairs {
            args.extend(["--config", pair]);
        }
        let (ok, out, err) = run(&args);
        (
            ok,
            serde_json::from_str::<Value>(&out).unwrap_or_else(|_| panic!("{out}{err}")),
        )
    };
    let inline = format!("schema={schema}");
    let good =
        serde_json::json!({ "type": "usage", "iccid": "8945738730000000012", "bytes": 1200 });
    let bad = serde_json::json!({ "type": "usage", "iccid": 8945, "bytes": -1 });

    let (ok, verdict) = check(good.clone(), &[&inline]);
    assert!(ok, "{verdict}");
    assert_eq!(verdict["verdict"], "continue", "{verdict}");
    assert!(
        verdict.get("body").is_none_or(Value::is_null),
        "passed on as it came: {verdict}"
    );

    let (ok, verdict) = check(bad.clone(), &[&inline]);
    assert!(!ok, "{verdict}");
    let error = verdict["error"].as_str().unwrap();
    assert!(
        error.contains("invalid event") && error.contains("the body does not match the schema: "),
        "{error}"
    );
    assert!(
        error.contains(r#"/iccid: 8945 is not of type "string""#),
        "{error}"
    );
    assert!(
        error.contains("/bytes: -1 is less than the minimum of 0"),
        "{error}"
    );

    let (ok, verdict) = check(bad.clone(), &[&inline, "on_invalid=drop"]);
    assert!(ok, "{verdict}");
    assert_eq!(verdict["verdict"], "drop", "{verdict}");
    assert!(
        verdict["reason"].as_str().unwrap().contains("/iccid"),
        "{verdict}"
    );

    // One schema per event type, from a lookup table; a type it does not know passes,
    // unless `unknown` says otherwise.
    let by_type = ["table=schemas", "key=/type"];
    let (_, verdict) = check(bad.clone(), &by_type);
    let error = verdict["error"].as_str().unwrap();
    assert!(
        error.contains("does not match the schema `usage`: "),
        "{error}"
    );
    let (ok, verdict) = check(good.clone(), &by_type);
    assert!(ok && verdict["verdict"] == "continue", "{verdict}");
    let location = serde_json::json!({ "type": "location", "iccid": 1 });
    let (ok, verdict) = check(location.clone(), &by_type);
    assert!(ok && verdict["verdict"] == "continue", "{verdict}");
    let (_, verdict) = check(location, &["table=schemas", "key=/type", "unknown=drop"]);
    assert_eq!(verdict["verdict"], "drop", "{verdict}");
    assert!(
        verdict["reason"]
            .as_str()
            .unwrap()
            .contains("table `schemas` has no schema `location`"),
        "{verdict}"
    );

    for (pairs, says) in [
        (vec![], "give `schema`"),
        (vec![r#"schema={"type": 12}"#], "is not a JSON Schema"),
        (vec!["schema={"], "is not JSON"),
        (
            vec![&*inline, "on_invalid=ignore"],
            "`on_invalid` must be error or drop",
        ),
        (vec!["table=schemas"], "`table` needs `key`"),
    ] {
        refused_config(&pairs, check(good.clone(), &pairs), says);
    }
}

/// `examples/schemas/onomondo.json`, a schema per Onomondo event type for `validate`: every
/// example event passes, and one whose usage is not a number, or that lacks its ICCID, is
/// stopped naming the field.
#[test]
fn onomondo_schemas_accept_every_example_and_name_what_is_wrong() {
    let root = xtask::workspace_root();
    let plugin = guest("validate");
    let table = format!(
        "schemas={}",
        root.join("examples/schemas/onomondo.json").display()
    );
    let check = |event: &std::path::Path| {
        let args = [
            "plugin",
            "run",
            path(&plugin),
            "--event",
            path(event),
            "--table",
            &table,
            "--config",
            "table=schemas",
            "--config",
            "key=/type",
            "--config",
            "unknown=error",
        ];
        let (ok, out, err) = run(&args);
        (
            ok,
            serde_json::from_str::<Value>(&out).unwrap_or_else(|_| panic!("{out}{err}")),
        )
    };
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("examples/events")).unwrap() {
        let file = entry.unwrap().path();
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        if !(name.starts_with("onomondo-") && name.ends_with(".json")) {
            continue;
        }
        let (ok, verdict) = check(&file);
        assert!(ok && verdict["verdict"] == "continue", "{name}: {verdict}");
        checked += 1;
    }
    assert!(checked >= 10, "{checked} examples");

    let dir = tempfile::tempdir().unwrap();
    let changed = dir.path().join("event.json");
    let mut usage: Value = serde_json::from_slice(
        &std::fs::read(root.join("examples/events/onomondo-usage.json")).unwrap(),
    )
    .unwrap();
    usage["bytes"] = "9484".into();
    usage.as_object_mut().unwrap().remove("iccid");
    std::fs::write(&changed, usage.to_string()).unwrap();
    let (ok, answer) = check(&changed);
    assert!(!ok, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("the schema `usage`"), "{error}");
    assert!(
        error.contains(r#"/bytes: "9484" is not of type "integer""#),
        "{error}"
    );
    assert!(
        error.contains(r#""iccid" is a required property"#),
        "{error}"
    );
}

#[test]
fn serve_names_a_bad_config_key_and_a_broken_plugin_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        "[[destinations]]\nname = \"d\"\nurl = \"not a url\"\n",
    )
    .unwrap();
    let (ok, _, err) = run(&["serve", "--config", path(&config)]);
    assert!(!ok);
    assert!(err.contains("destinations[0].url"), "{err}");

    std::fs::create_dir_all(dir.path().join("plugins.d")).unwrap();
    std::fs::write(
        dir.path().join("plugins.d/half.wasm"),
        &std::fs::read(guest("tag-router")).unwrap()[..1000],
    )
    .unwrap();
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\n[[sources]]\nname = \"s\"\n[[routes]]\nsource = \"s\"\nplugins = [{ name = \"half\" }]\n",
    )
    .unwrap();
    let (ok, _, err) = run(&["serve", "--config", path(&config)]);
    assert!(!ok);
    assert!(err.contains("half.wasm"), "{err}");
}

/// `serve --check` loads what a start would and says whether it would start, without
/// opening the store: a broken plugin no route uses is named but does not stop it; one a
/// route uses, or a missing one, does.
#[test]
fn serve_check_says_whether_the_gateway_would_start() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(guest("tag-router"), plugins.join("tag-router.wasm")).unwrap();
    std::fs::write(
        plugins.join("half.wasm"),
        &std::fs::read(guest("tag-router")).unwrap()[..1000],
    )
    .unwrap();
    let config = dir.path().join("switchyard.toml");
    let data = dir.path().join("data");
    let write = |plugin: &str| {
        std::fs::write(
            &config,
            format!(
                "[server]\ndata_dir = \"{}\"\n[[sources]]\nname = \"s\"\n\
                 [[routes]]\nsource = \"s\"\nplugins = [{{ name = \"{plugin}\" }}]\n",
                path(&data)
            ),
        )
        .unwrap()
    };

    write("tag-router");
    let (ok, out, err) = run(&["serve", "--check", "--config", path(&config)]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("plugin tag-router: ok ("), "{out}");
    assert!(out.contains("plugin half: does not load: "), "{out}");
    assert!(
        out.contains("would start: 1 sources, 0 destinations, 1 routes"),
        "{out}"
    );
    assert!(!data.exists(), "the check opened the store");

    write("half");
    let (ok, out, _) = run(&["serve", "--check", "--config", path(&config)]);
    assert!(!ok);
    assert!(out.contains("would not start"), "{out}");
    assert!(
        out.contains("plugin `half` is used by a route but failed to load: ")
            && out.contains("half.wasm"),
        "{out}"
    );

    write("nope");
    let (ok, out, _) = run(&["serve", "--check", "--config", path(&config)]);
    assert!(!ok);
    assert!(out.contains("there is no nope.wasm in"), "{out}");
    assert!(!data.exists(), "the check opened the store");
}

/// A route's configuration of a plugin that the plugin itself refuses (its WIT
/// `config-check`, 0.1.4) stops `serve --check`, `switchyard dry-run` and a start, each
/// naming the route's entry and the plugin's words; a plugin built before 0.1.4, which
/// has no check, is not held up.
#[tokio::test(flavor = "multi_thread")]
async fn plugins_refuse_configurations_they_cannot_work_with_before_any_event() {
    let plugins = ["reshape", "validate", "tag-router", "contract-0-1-0"];
    let dir = crate::util::TestGateway::dir_with_plugins(&plugins);
    let config = dir.path().join("switchyard.toml");
    let data = dir.path().join("data");
    let write = |reshape: &str, schema: &str, rule: &str| {
        let text = format!(
            "[server]\ndata_dir = \"{}\"\n[plugins]\ndir = \"{}\"\n[[sources]]\nname = \"s\"\n\
             [[routes]]\nsource = \"s\"\nplugins = [{{ name = \"reshape\", config = {{ {reshape} }} }}]\n\
             [[routes]]\nsource = \"s\"\nplugins = [{{ name = \"validate\", config = {{ schema = '{schema}' }} }}]\n\
             [[routes]]\nsource = \"s\"\nplugins = [{{ name = \"contract-0-1-0\", config = {{ anything = \"goes\" }} }}, \
             {{ name = \"tag-router\", config = {{ {rule} = \"a\" }} }}]\n",
            path(&data),
            path(&dir.path().join("plugins.d")),
        );
        std::fs::write(&config, text).unwrap();
    };
    let check = || run(&["serve", "--check", "--config", path(&config)]);

    write(r#""a..b" = "/x""#, r#"{"type": "object"#, r#""colour.red""#);
    let (ok, out, err) = check();
    assert!(!ok, "{out}{err}");
    for refusal in [
        "`routes[0].plugins[0].config`: plugin `reshape` refuses this configuration: `a..b`: an output is names joined by dots",
        "`routes[1].plugins[0].config`: plugin `validate` refuses this configuration: the schema is not JSON",
        "`routes[2].plugins[1].config`: plugin `tag-router` refuses this configuration: unknown rule `colour.red`",
    ] {
        assert!(out.contains(refusal), "{refusal}\n{out}{err}");
    }
    assert_eq!(
        out.matches("refuses this configuration").count(),
        3,
        "{out}"
    );
    // A dry run loads the routes as a start would, and refuses as it would.
    let event = xtask::workspace_root().join("examples/events/onomondo-usage.json");
    let (ok, out, err) = run(&[
        "dry-run",
        "--config",
        path(&config),
        "--source",
        "s",
        "--event",
        path(&event),
    ]);
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("plugin `reshape` refuses this configuration"),
        "{err}"
    );
    // A start: refused, naming them.
    let loaded = switchyard::config::Config::load(&config, &|_| None).unwrap();
    let started = switchyard::Gateway::new(loaded).await;
    let error = format!("{:#}", started.err().expect("the start is refused"));
    assert!(
        error.contains("`routes[1].plugins[0].config`: plugin `validate` refuses"),
        "{error}"
    );

    // Each mended: it would start.
    write(
        r#""a.b" = "/x", "c[0]" = "=SIM {/iccid}""#,
        r#"{"type": "object"}"#,
        r#""label.fleet""#,
    );
    let (ok, out, err) = check();
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("would start: 1 sources, 0 destinations, 3 routes"),
        "{out}"
    );
}

/// A copy of the quickstart's config in a directory of its own, with its plugins built
/// into `plugins.d`: the directory and the config file.
fn quickstart_copy() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchyard.toml");
    let quickstart = xtask::workspace_root().join("examples/quickstart/switchyard.toml");
    std::fs::copy(quickstart, &config).unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir_all(&plugins).unwrap();
    for name in crate::util::QUICKSTART_PLUGINS {
        std::fs::copy(guest(name), plugins.join(format!("{name}.wasm"))).unwrap();
    }
    let tables = dir.path().join("tables");
    std::fs::create_dir_all(&tables).unwrap();
    let sims = xtask::workspace_root().join("examples/quickstart/tables/sims.csv");
    std::fs::copy(sims, tables.join("sims.csv")).unwrap();
    (dir, config)
}

/// `switchyard dry-run` of a payload that is a sender's URL check (the source's
/// `challenge`) shows what ingest answers, and no route runs; one that is not JSON to a
/// source that `require_json` fails with what ingest would answer — as the API's dry run
/// does.
#[test]
fn dry_run_answers_as_ingest_would_before_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        r#"
[[sources]]
name = "slack"
challenge = { type = "url_verification", field = "challenge" }
require_json = true
[[destinations]]
name = "d"
url = "https://example.com/in"
[[routes]]
source = "slack"
destinations = ["d"]
"#,
    )
    .unwrap();
    let event = dir.path().join("check.json");
    let try_dry_run = |body: &str| {
        std::fs::write(&event, body).unwrap();
        let args = ["dry-run", "--config", path(&config), "--source", "slack"];
        run(&[&args[..], &["--event", path(&event)]].concat())
    };
    let dry_run = |body: &str| {
        let (ok, out, err) = try_dry_run(body);
        assert!(ok, "{out}{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let (ok, out, err) = try_dry_run(r#"{"type": "url_verification", "challenge"}"#);
    assert!(!ok, "{out}");
    assert!(
        err.contains("the body is not valid JSON: expected `:` at line 1 column 41")
            && err.contains("source `slack` takes JSON bodies only"),
        "{err}"
    );
    let answer = dry_run(r#"{"type":"url_verification","challenge":"c-1","token":"t"}"#);
    assert_eq!(
        answer["challenge"],
        serde_json::json!({ "challenge": "c-1" })
    );
    assert_eq!(answer["deliveries"], serde_json::json!([]), "{answer}");
    let answer = dry_run(r#"{"type":"event_callback"}"#);
    assert!(answer.get("challenge").is_none(), "{answer}");
    assert_eq!(answer["deliveries"][0]["destination"], "d", "{answer}");
}

/// `switchyard dry-run` runs a payload through the config file's routes with no gateway,
/// printing the dry run's answer; with `--expect` it is a golden test: the quickstart's
/// expected file holds, a changed one fails naming each difference. Headers and query
/// make the event's; an unknown source or a route's missing plugin is an error; nothing is
/// stored.
#[test]
fn dry_run_shows_what_the_routes_would_send_and_checks_an_expected_answer() {
    let root = xtask::workspace_root();
    let (dir, config) = quickstart_copy();
    let plugins = dir.path().join("plugins.d");
    let event = root.join("examples/events/onomondo-location.json");
    // What the quickstart's golden case expects of this event.
    let case = root.join("examples/quickstart/cases/onomondo-location.json");
    let case: Value = serde_json::from_str(&std::fs::read_to_string(case).unwrap()).unwrap();
    let expected = dir.path().join("expected.json");
    std::fs::write(&expected, case["expect"].to_string()).unwrap();
    let dry_run = |extra: &[&str]| {
        let mut args = vec![
            "dry-run",
            "--config",
            path(&config),
            "--source",
            "onomondo",
            "--event",
            path(&event),
        ];
        args.extend_from_slice(extra);
        run(&args)
    };

    let (ok, out, err) = dry_run(&["--expect", path(&expected)]);
    assert!(ok, "{out}{err}");
    assert!(err.contains("ok: the answer holds"), "{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["deliveries"][0]["destination"], "fleet");
    assert_eq!(
        answer["deliveries"][0]["headers"][0],
        serde_json::json!(["x-api-key", "****"]),
        "a secret-named header's value is redacted"
    );
    assert_eq!(
        answer["event"]["headers"],
        serde_json::json!([["content-type", "application/json"]])
    );

    // A route changed under its golden file: each difference is named.
    let changed = dir.path().join("changed.json");
    let mut golden: Value =
        serde_json::from_str(&std::fs::read_to_string(&expected).unwrap()).unwrap();
    golden["deliveries"][0]["url"] = "https://fleet.example.com/hook".into();
    golden["deliveries"].as_array_mut().unwrap().pop();
    std::fs::write(&changed, golden.to_string()).unwrap();
    let (ok, _, err) = dry_run(&["--expect", path(&changed)]);
    assert!(!ok, "{err}");
    assert!(err.contains("does not hold"), "{err}");
    assert!(err.contains("deliveries: 3 items, expected 2"), "{err}");
    assert!(
        err.contains(
            r#"deliveries[0].url: "http://127.0.0.1:9000/fleet?iccid=8945738730000000012&ip=100.70.24.198", expected "https://fleet.example.com/hook""#
        ),
        "{err}"
    );

    let (ok, out, err) = dry_run(&["--header", "x-trace: abc", "--query", "a=1"]);
    assert!(ok, "{out}{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["event"]["query"], "a=1");
    assert_eq!(
        answer["event"]["headers"],
        serde_json::json!([["x-trace", "abc"], ["content-type", "application/json"]])
    );

    // The payload from standard input.
    let mut child = Command::new(switchyard_bin())
        .args(["dry-run", "--config", path(&config), "--source", "onomondo"])
        .args(["--event", "-", "--expect", path(&expected)])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let payload = std::fs::read(&event).unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &payload).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("ok: the answer holds"),
        "{err}"
    );

    let (ok, _, err) = run(&[
        "dry-run",
        "--config",
        path(&config),
        "--source",
        "nope",
        "--event",
        path(&event),
    ]);
    assert!(!ok);
    assert!(err.contains("no source named `nope`"), "{err}");
    std::fs::remove_file(plugins.join("tag-router.wasm")).unwrap();
    let (ok, _, err) = dry_run(&[]);
    assert!(!ok);
    assert!(
        err.contains("plugin `tag-router` is used by a route but there is no tag-router.wasm"),
        "{err}"
    );
    assert!(!dir.path().join("data").exists(), "nothing is stored");
}

/// `switchyard dry-run --cases DIR` runs every golden case of a directory with the plugins
/// loaded once: the quickstart's cases pass; a case whose route changed, one that cannot
/// be run and one of an unknown source fail, each named with why, and the run exits 1.
#[test]
fn dry_run_cases_check_a_directory_of_golden_cases() {
    let root = xtask::workspace_root();
    let (dir, config) = quickstart_copy();
    let cases = root.join("examples/quickstart/cases");
    let (ok, out, err) = run(&[
        "dry-run",
        "--config",
        path(&config),
        "--cases",
        path(&cases),
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.ends_with("4 cases: 4 passed, 0 failed\n"), "{out}");
    // A case's `state`: the values the plugins find (change-filter knows the SIM's network).
    let known = "onomondo-location-on-a-known-network-is-not-roaming.json";
    assert!(
        out.contains(&format!("ok    {}", cases.join(known).display())),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "ok    {}",
            cases.join("onomondo-location.json").display()
        )),
        "{out}"
    );

    // A copy, its event files beside it, with three cases that fail.
    let mine = dir.path().join("cases");
    std::fs::create_dir_all(&mine).unwrap();
    let events = dir.path().join("events");
    std::fs::create_dir_all(&events).unwrap();
    std::fs::copy(
        root.join("examples/events/onomondo-location.json"),
        events.join("onomondo-location.json"),
    )
    .unwrap();
    let location = std::fs::read_to_string(cases.join("onomondo-location.json")).unwrap();
    let mut moved: Value = serde_json::from_str(&location).unwrap();
    moved["event_file"] = "../events/onomondo-location.json".into();
    std::fs::write(mine.join("a-location.json"), moved.to_string()).unwrap();
    moved["expect"]["deliveries"][1]["url"] = "https://archive.example.com/onomondo".into();
    std::fs::write(mine.join("b-moved.json"), moved.to_string()).unwrap();
    std::fs::write(
        mine.join("c-broken.json"),
        r#"{"source": "onomondo", "expect": {}}"#,
    )
    .unwrap();
    let nowhere = serde_json::json!({ "source": "nope", "event": {}, "expect": {}, "headers": { "x-a": "b" } });
    std::fs::write(mine.join("d-nowhere.json"), nowhere.to_string()).unwrap();
    // The known-network case without its state: the roaming route passes the event.
    let known = std::fs::read_to_string(cases.join(known)).unwrap();
    let mut forgotten: Value = serde_json::from_str(&known).unwrap();
    forgotten["event_file"] = "../events/onomondo-location.json".into();
    forgotten.as_object_mut().unwrap().remove("state");
    std::fs::write(mine.join("e-forgotten.json"), forgotten.to_string()).unwrap();
    std::fs::write(mine.join("notes.txt"), "not a case").unwrap();
    let (ok, out, err) = run(&["dry-run", "--config", path(&config), "--cases", path(&mine)]);
    assert!(!ok, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let name = |file: &str| mine.join(file).display().to_string();
    assert_eq!(
        lines,
        [
            format!("ok    {}", name("a-location.json")),
            format!("FAIL  {}", name("b-moved.json")),
            r#"  - deliveries[1].url: "http://127.0.0.1:9000/archive/onomondo", expected "https://archive.example.com/onomondo""#.to_string(),
            format!("FAIL  {}", name("c-broken.json")),
            "  - a case has one of `event` and `event_file`".to_string(),
            format!("FAIL  {}", name("d-nowhere.json")),
            "  - no source named `nope` in the config".to_string(),
            format!("FAIL  {}", name("e-forgotten.json")),
            r#"  - routes[1].result.result: "delivering", expected "dropped""#.to_string(),
            r#"  - routes[1].result.plugin: missing, expected "change-filter""#.to_string(),
            r#"  - routes[1].result.reason: missing, expected "/iccid 8945738730000000012: /network/mcc,/network/mnc unchanged ([\"238\",\"01\"])""#.to_string(),
            "5 cases: 1 passed, 4 failed".to_string(),
        ]
    );
    // Cases are all or nothing: no --source beside them; an empty directory is an error.
    let (ok, _, err) = run(&[
        "dry-run",
        "--config",
        path(&config),
        "--cases",
        path(&mine),
        "--source",
        "onomondo",
    ]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, _, err) = run(&[
        "dry-run",
        "--config",
        path(&config),
        "--cases",
        path(&empty),
    ]);
    assert!(!ok && err.contains("no case files (*.json) in"), "{err}");
}

/// `backup` names what it cannot copy: a data dir with no store yet, or a PostgreSQL store
/// (which has its own tools). (Copying a running store: `crash.rs`.)
/// A golden case (or `dry-run --http`) answers its plugins' HTTP requests itself: nothing
/// is sent, a `POST` (a GraphQL query) included, which a dry run otherwise refuses; the
/// answer lists each request as asked (secrets redacted, the body built) and what came of
/// it; a request with no answer, or one answered with an error, fails the plugin saying so.
/// `plugin run --http` takes the same file.
#[test]
fn dry_run_cases_answer_plugins_requests_without_sending_them() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(guest("enrich"), plugins.join("enrich.wasm")).unwrap();
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        r#"
[plugins]
dir = "./plugins.d"
[[sources]]
name = "sims"
[[destinations]]
name = "by-customer"
url = "http://127.0.0.1:9000/:customer:"
[[destinations]]
name = "graph"
url = "http://127.0.0.1:9000/graph"
[[routes]]
name = "crm"
source = "sims"
plugins = [{ name = "enrich", allow_http = ["https://crm.example.com"], config = { url = "https://crm.example.com/sims/{/iccid}", "header.authorization" = "Bearer crm-token-0123456789", "metadata.customer" = "/customer/id", into = "" } }]
destinations = ["by-customer"]
[[routes]]
name = "graphql"
source = "sims"
plugins = [{ name = "enrich", allow_http = ["https://graph.example.com"], config = { url = "https://graph.example.com/query", body = '{"query": "query($id: ID!) { sim(iccid: $id) { plan } }", "variables": {"id": {/iccid}}}', into = "/graph" } }]
destinations = ["graph"]
"#,
    )
    .unwrap();
    let iccid = "8945738730000000012";
    let crm = format!("https://crm.example.com/sims/{iccid}");
    let answers = json!([
        { "url": crm, "body": { "customer": { "id": "acme" } } },
        { "method": "POST", "url": "https://graph.example.com/query", "body": { "data": { "sim": { "plan": "iot-1" } } } },
    ]);
    let query = "query($id: ID!) { sim(iccid: $id) { plan } }";
    let answered = json!({
        "source": "sims",
        "event": { "iccid": iccid },
        "http": answers,
        "expect": {
            "deliveries": [
                { "url": "http://127.0.0.1:9000/acme", "body": { "iccid": iccid } },
                { "body": { "iccid": iccid, "graph": { "data": { "sim": { "plan": "iot-1" } } } } },
            ],
            "requests": [
                { "plugin": "enrich", "method": "GET", "url": crm,
                  "headers": [["authorization", "****6789"]], "status": 200 },
                { "plugin": "enrich", "method": "POST", "url": "https://graph.example.com/query",
                  "headers": [["content-type", "application/json"]],
                  "body": { "query": query, "variables": { "id": iccid } }, "status": 200 },
            ],
        },
    });
    let cases = dir.path().join("cases");
    std::fs::create_dir_all(&cases).unwrap();
    std::fs::write(cases.join("a-answered.json"), answered.to_string()).unwrap();
    // Without the GraphQL answer, or with the CRM down, the case fails: a route errs.
    let mut unanswered = answered.clone();
    unanswered["http"] = json!([answers[0]]);
    std::fs::write(cases.join("b-unanswered.json"), unanswered.to_string()).unwrap();
    let mut down = answered.clone();
    down["http"] = json!([{ "url": crm, "error": "connection refused" }, answers[1]]);
    std::fs::write(cases.join("c-down.json"), down.to_string()).unwrap();
    let (ok, out, err) = run(&[
        "dry-run",
        "--config",
        path(&config),
        "--cases",
        path(&cases),
    ]);
    assert!(!ok, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let name = |file: &str| cases.join(file).display().to_string();
    assert_eq!(
        lines[0],
        format!("ok    {}", name("a-answered.json")),
        "{out}"
    );
    assert_eq!(
        lines[1],
        format!("FAIL  {}", name("b-unanswered.json")),
        "{out}"
    );
    assert!(lines[2].starts_with("  - deliveries: "), "{out}");
    assert!(
        out.contains(&format!("FAIL  {}", name("c-down.json"))),
        "{out}"
    );
    assert!(out.ends_with("3 cases: 1 passed, 2 failed\n"), "{out}");

    // One run with --http: the answer lists the requests and what came of each.
    let event = dir.path().join("sim.json");
    std::fs::write(&event, json!({ "iccid": iccid }).to_string()).unwrap();
    let http = dir.path().join("answers.json");
    let dry_run_with = |answers: &str| {
        std::fs::write(&http, answers).unwrap();
        run(&[
            "dry-run",
            "--config",
            path(&config),
            "--source",
            "sims",
            "--event",
            path(&event),
            "--http",
            path(&http),
        ])
    };
    let dry_run = |answers: &Value| {
        let (ok, out, err) = dry_run_with(&answers.to_string());
        assert!(ok, "{out}{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let answer = dry_run(&answers);
    assert_eq!(
        answer["requests"], answered["expect"]["requests"],
        "{answer}"
    );
    let answer = dry_run(&unanswered["http"]);
    let error = answer["routes"][1]["result"]["error"].as_str().unwrap();
    let said = "no answer for `POST https://graph.example.com/query` among the run's (`http`)";
    assert!(error.contains(said), "{answer}");
    assert!(
        answer["requests"][1]["error"]
            .as_str()
            .unwrap()
            .contains(said),
        "{answer}"
    );
    let answer = dry_run(&down["http"]);
    let error = answer["routes"][0]["result"]["error"].as_str().unwrap();
    assert!(error.contains("connection refused"), "{answer}");
    assert_eq!(
        answer["requests"][0]["error"], "connection refused",
        "{answer}"
    );
    // A bad answers file is refused, naming the answer and why.
    let (ok, _, err) = dry_run_with(r#"[{"url": "/sims"}]"#);
    assert!(!ok);
    assert!(
        err.contains("answer [0]: `/sims` is not an absolute URL"),
        "{err}"
    );

    // `plugin run --http`: the same answers, the grant still --allow-http's.
    std::fs::write(&http, answers.to_string()).unwrap();
    let url = "url=https://crm.example.com/sims/{/iccid}";
    let wasm = plugins.join("enrich.wasm");
    let plugin_run = |extra: &[&str]| {
        let base = ["plugin", "run", path(&wasm), "--event", path(&event)];
        let args = [&base[..], &["--config", url, "--http", path(&http)], extra].concat();
        run(&args)
    };
    let (ok, out, err) = plugin_run(&["--allow-http", "https://crm.example.com"]);
    assert!(ok, "{out}{err}");
    let verdict: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        verdict["body"]["enrichment"]["customer"]["id"], "acme",
        "{verdict}"
    );
    let (ok, out, _) = plugin_run(&[]);
    assert!(
        !ok && out.contains("add `https://crm.example.com` to its `allow_http`"),
        "{out}"
    );
}

#[test]
fn backup_names_what_it_cannot_copy() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchyard.toml");
    std::fs::write(&config, "[server]\ndata_dir = \"./nothing-yet\"\n").unwrap();
    let out = dir.path().join("copy.db");
    let (ok, _, err) = run(&["backup", "--config", path(&config), path(&out)]);
    assert!(!ok);
    assert!(
        err.contains("no store at") && err.contains("nothing-yet"),
        "{err}"
    );
    assert!(!out.exists());
    let pg = Command::new(switchyard_bin())
        .args(["backup", "--config", path(&config), path(&out)])
        .env("SWITCHYARD_STORE_URL", "postgres://localhost/switchyard")
        .output()
        .unwrap();
    assert!(!pg.status.success());
    assert!(
        String::from_utf8_lossy(&pg.stderr).contains("pg_dump"),
        "{pg:?}"
    );
}

#[test]
fn every_guest_fixture_is_used_by_a_test() {
    // The list of guests lives in util.rs; every test module but this one is searched.
    let tests = [
        include_str!("spine.rs"),
        include_str!("durable.rs"),
        include_str!("sandbox.rs"),
        include_str!("reload.rs"),
        include_str!("crash.rs"),
        include_str!("state.rs"),
        include_str!("outbound.rs"),
    ]
    .concat();
    let this = include_str!("cli.rs");
    let this = &this[..this
        .find("fn every_guest_fixture_is_used_by_a_test")
        .unwrap()];
    for name in GUESTS {
        let quoted = format!("\"{name}\"");
        assert!(
            tests.contains(&quoted) || this.contains(&quoted),
            "guest `{name}` is built but no test uses it"
        );
    }
}

/// A minimal component (binary format) with one import, `acme:clock/now@1.0.0` (an empty
/// instance), and no exports.
fn wasm_component_with_unknown_import() -> Vec<u8> {
    let name = b"acme:clock/now@1.0.0";
    let mut out = vec![0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
    // Type section (id 7): one instance type with no declarations.
    out.extend([0x07, 0x03, 0x01, 0x42, 0x00]);
    // Import section (id 10): one import, kebab name, instance of type 0.
    let mut body = vec![0x01, 0x00, name.len() as u8];
    body.extend_from_slice(name);
    body.extend([0x05, 0x00]);
    out.push(0x0a);
    out.push(body.len() as u8);
    out.extend(body);
    out
}

/// Scaffolds a project with `switchyard plugin new`, then runs its own build and test
/// commands (which end in `switchyard plugin run … --expect expected-verdict.json`) with
/// this build's binary and the pinned tools on `PATH`; the component built (`built`, in
/// the project) checks the configurations routes give it, and refuses any.
fn scaffold_builds_and_passes_its_test(lang: &str, built: &str, steps: &[&[&str]]) {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join(format!("hello-{lang}"));
    let (ok, out, err) = run(&[
        "plugin",
        "new",
        &format!("hello-{lang}"),
        "--lang",
        lang,
        "--dir",
        path(&project),
    ]);
    assert!(ok, "{out}{err}");
    for f in [
        "wit/plugin.wit",
        "sample-event.json",
        "expected-verdict.json",
        "README.md",
    ] {
        assert!(project.join(f).is_file(), "{f} was not written");
    }
    let root = xtask::workspace_root();
    let path_var = format!(
        "{}:{}:{}",
        switchyard_bin().parent().unwrap().display(),
        crate::tools::python_env().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for step in steps {
        let out = Command::new(step[0])
            .args(&step[1..])
            .current_dir(&project)
            .env("PATH", &path_var)
            // One target dir for scaffolded Rust projects, so reruns are quick.
            .env("CARGO_TARGET_DIR", root.join("target/scaffolded"))
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTFLAGS")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{lang}: {step:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let root_built = root.join("target/scaffolded");
    let component = match built.strip_prefix("$CARGO_TARGET_DIR/") {
        Some(rest) => root_built.join(rest),
        None => project.join(built),
    };
    let (ok, out, err) = run(&["plugin", "check", path(&component)]);
    assert!(
        ok && out.contains("and checks the configurations"),
        "{lang}: {out}{err}"
    );
    let event = project.join("sample-event.json");
    let args = ["plugin", "run", path(&component), "--event", path(&event)];
    let (ok, out, _) = run(&[&args[..], &["--config", "colour=red"]].concat());
    assert!(!ok, "{lang}: {out}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        answer["error"],
        format!(
            "the plugin refuses this configuration: hello-{lang} takes no configuration (`colour` given)"
        ),
        "{lang}"
    );
    // The test really compares: a wrong expectation fails it.
    std::fs::write(
        project.join("expected-verdict.json"),
        r#"{"verdict":"drop","reason":"x"}"#,
    )
    .unwrap();
    let last = steps.last().unwrap();
    let out = Command::new(last[0])
        .args(&last[1..])
        .current_dir(&project)
        .env("PATH", &path_var)
        .env("CARGO_TARGET_DIR", root.join("target/scaffolded"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{lang}: a wrong expectation passed");
}

#[test]
fn plugin_new_rust_builds_and_passes_its_test() {
    scaffold_builds_and_passes_its_test(
        "rust",
        "$CARGO_TARGET_DIR/wasm32-wasip2/release/hello_rust.wasm",
        &[&["./test.sh"]],
    );
}

#[test]
fn plugin_new_js_builds_and_passes_its_test() {
    scaffold_builds_and_passes_its_test(
        "js",
        "dist/hello-js.wasm",
        &[
            &[
                "npm",
                "install",
                "--no-audit",
                "--no-fund",
                "--prefer-offline",
            ],
            &["npm", "run", "build"],
            &["npm", "test"],
        ],
    );
}

#[test]
fn plugin_new_python_builds_and_passes_its_test() {
    scaffold_builds_and_passes_its_test("python", "hello-python.wasm", &[&["./test.sh"]]);
}

#[test]
fn plugin_new_refuses_a_bad_name_and_a_full_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(&[
        "plugin",
        "new",
        "Bad Name",
        "--lang",
        "rust",
        "--dir",
        path(dir.path()),
    ]);
    assert!(!ok && err.contains("plugin name"), "{err}");
    std::fs::write(dir.path().join("x"), "").unwrap();
    let (ok, _, err) = run(&[
        "plugin",
        "new",
        "fine",
        "--lang",
        "js",
        "--dir",
        path(dir.path()),
    ]);
    assert!(!ok && err.contains("not empty"), "{err}");
}

/// The production example (`examples/deploy`) is a config that starts: `serve --check` on
/// it, run with the unit's own `ExecStart` command line, once its secrets are set; and a
/// secret left unset stops it, naming the key.
#[test]
fn the_deploy_example_would_start_with_its_secrets_set() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = root.join("examples/deploy");
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path();
    std::fs::copy(example.join("switchyard.toml"), etc.join("switchyard.toml")).unwrap();
    std::fs::create_dir_all(etc.join("tls")).unwrap();
    std::fs::create_dir_all(etc.join("plugins.d")).unwrap();
    let fixtures = root.join("tests/fixtures/tls");
    std::fs::copy(fixtures.join("server.pem"), etc.join("tls/fullchain.pem")).unwrap();
    std::fs::copy(fixtures.join("server.key"), etc.join("tls/privkey.pem")).unwrap();
    for plugin in ["metadata-inject", "iot-normalize"] {
        std::fs::copy(guest(plugin), etc.join(format!("plugins.d/{plugin}.wasm"))).unwrap();
    }

    let unit = std::fs::read_to_string(example.join("switchyard.service")).unwrap();
    let exec_start = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart");
    let mut args: Vec<String> = exec_start
        .split_whitespace()
        .skip(1)
        .map(String::from)
        .collect();
    let serve = args.iter().position(|a| a == "serve").unwrap();
    args.insert(serve + 1, "--check".into());
    for a in &mut args {
        if a == "/etc/switchyard/switchyard.toml" {
            *a = path(&etc.join("switchyard.toml")).into();
        }
    }
    let data = etc.join("state");
    let secrets = [
        ("SWITCHYARD_API_TOKEN", "a-long-production-token"),
        ("BONDIO_WEBHOOK_SECRET", "bondio-shared-secret"),
        ("ONOMONDO_URL_TOKEN", "0123456789abcdef0123456789abcdef"),
        ("BACKEND_URL", "https://backend.example.com/hooks"),
        (
            "BACKEND_SIGNING_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ),
        ("PAGER_URL", "https://pager.example.com/switchyard"),
        (
            "SWITCHYARD_ENCRYPTION_KEY",
            "c2VhbGVkLWF0LXJlc3QtMDEyMzQ1Njc4OWFiY2RlZg==",
        ),
    ];
    let check = |unset: Option<&str>| {
        let mut command = Command::new(switchyard_bin());
        command
            .args(&args)
            .env("RUST_LOG", "warn")
            .env("SWITCHYARD_DATA_DIR", &data);
        for (k, v) in secrets {
            command.env_remove(k);
            if Some(k) != unset {
                command.env(k, v);
            }
        }
        let out = command.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };

    let (ok, out) = check(None);
    assert!(ok, "{out}");
    assert!(
        out.contains("would start: 3 sources, 2 destinations, 3 routes"),
        "{out}"
    );
    assert!(!data.exists(), "the check opened the store");
    let (ok, out) = check(Some("BACKEND_SIGNING_SECRET"));
    assert!(!ok, "{out}");
    assert!(out.contains("BACKEND_SIGNING_SECRET"), "{out}");
}

/// `switchyard send` posts as each source's sender would — signed, or with its secret
/// header or query parameter — and the gateway takes it; with a secret the gateway does
/// not hold, it is refused and `send` exits 1 with the answer.
#[tokio::test(flavor = "multi_thread")]
async fn send_posts_as_the_sources_sender_would() {
    use crate::util::{Receiver, TestGateway};
    let rx = Receiver::start().await;
    let config = |secret: &str| {
        format!(
            r#"
[[sources]]
name = "stripe"
verify = {{ scheme = "hmac-sha256", header = "stripe-signature", secret = "{secret}", signature_key = "v1", timestamp_key = "t", signed = "{{timestamp}}.{{body}}" }}
[[sources]]
name = "sw"
verify = {{ scheme = "standard-webhooks", secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"] }}
[[sources]]
name = "1nce"
verify = {{ scheme = "header", header = "x-api-key", secrets = ["k-0123456789abcdef"] }}
[[sources]]
name = "onomondo"
verify = {{ scheme = "query", param = "token", secrets = ["q-0123456789abcdef/+&"] }}
[[sources]]
name = "twilio"
verify = {{ scheme = "twilio", url = "https://hooks.example.com/v1/ingest/twilio", secrets = ["tw-token"] }}
[[destinations]]
name = "d"
url = "{{receiver}}/in"
[[routes]]
source = "stripe"
destinations = ["d"]
[[routes]]
source = "sw"
destinations = ["d"]
[[routes]]
source = "1nce"
destinations = ["d"]
[[routes]]
source = "onomondo"
destinations = ["d"]
[[routes]]
source = "twilio"
destinations = ["d"]
"#
        )
    };
    let gw = TestGateway::start(&config("whsec_stripe"), &rx, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace("{receiver}", &rx.url)).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (good, wrong) = (
        file("good.toml", config("whsec_stripe")),
        file("wrong.toml", config("whsec_other")),
    );
    let event = xtask::workspace_root().join("examples/events/onomondo-usage.json");
    let event = event.to_str().unwrap().to_string();
    let send = |config: &str, source: &str| {
        let args = [
            "send", "--config", config, "--url", &gw.url, "--source", source, "--event", &event,
        ];
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        async move { run_in_background(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    for source in ["stripe", "sw", "1nce", "onomondo", "twilio"] {
        let (ok, stdout, stderr) = send(&good, source).await;
        assert!(ok, "{source}: {stderr}");
        assert!(stderr.contains("202"), "{source}: {stderr}");
        let answer: Value = serde_json::from_str(&stdout).unwrap();
        assert!(answer["id"].is_string(), "{source}: {stdout}");
    }
    // Twilio signs the URL with its query: one of the request's own too.
    let (ok, _, stderr) = run_in_background(&[
        "send",
        "--config",
        &good,
        "--url",
        &gw.url,
        "--source",
        "twilio",
        "--event",
        &event,
        "--query",
        "fleet=trucks",
    ])
    .await;
    assert!(ok && stderr.contains("202"), "{stderr}");
    let (ok, stdout, stderr) = send(&wrong, "stripe").await;
    assert!(!ok);
    assert!(stderr.contains("401"), "{stderr}");
    assert!(stdout.contains("the signature does not match"), "{stdout}");
    let (ok, _, stderr) = send(&good, "nope").await;
    assert!(!ok && stderr.contains("no source named `nope`"), "{stderr}");

    let got = rx.wait_for(5).await;
    let sent = std::fs::read(&event).unwrap();
    assert!(
        got.iter().all(|r| r.body == sent),
        "the payload as it is in the file"
    );
    gw.shutdown().await.unwrap();
}

/// `switchyard send --url-check` makes a source's URL check as its sender would — a `GET`
/// with a fresh challenge and the verify token, or a signed body holding one — and exits
/// 0 only if the gateway echoes it as the sender expects.
#[tokio::test(flavor = "multi_thread")]
async fn send_makes_the_url_check_of_a_sources_sender() {
    use crate::util::{Receiver, TestGateway};
    let rx = Receiver::start().await;
    let config = |token: &str| {
        format!(
            r#"
[[sources]]
name = "meta"
verify = {{ scheme = "hmac-sha256", header = "x-hub-signature-256", prefix = "sha256=", secret = "app-secret" }}
challenge = {{ query = "hub.challenge", token_query = "hub.verify_token", token = "{token}" }}
[[sources]]
name = "slack"
verify = {{ scheme = "hmac-sha256", header = "x-slack-signature", prefix = "v0=", secret = "slack-key", timestamp_header = "x-slack-request-timestamp", signed = "v0:{{timestamp}}:{{body}}" }}
challenge = {{ type = "url_verification", field = "challenge" }}
[[sources]]
name = "dropbox"
challenge = {{ query = "challenge" }}
[[sources]]
name = "plain"
"#
        )
    };
    let gw = TestGateway::start(&config("meaty-token"), &rx, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (good, wrong) = (
        file("good.toml", config("meaty-token")),
        file("wrong.toml", config("guessed")),
    );
    let check = |config: &str, source: &str| {
        let args = [
            "send",
            "--config",
            config,
            "--url",
            &gw.url,
            "--source",
            source,
            "--url-check",
        ];
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        async move { run_in_background(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    for source in ["meta", "slack", "dropbox"] {
        let (ok, out, err) = check(&good, source).await;
        assert!(ok, "{source}: {out}{err}");
        assert!(
            err.contains("ok: the gateway answers source"),
            "{source}: {err}"
        );
        assert!(out.contains("check-"), "{source}: {out}");
    }
    // A verify token the gateway does not have: 403, exit 1.
    let (ok, _, err) = check(&wrong, "meta").await;
    assert!(!ok && err.contains("403"), "{err}");
    // A source with no URL check says so.
    let (ok, _, err) = check(&good, "plain").await;
    assert!(!ok && err.contains("answers no URL check"), "{err}");
    // Nothing was stored: the checks reach no destination, and none is an event.
    let metrics = gw.metrics().await;
    for source in ["meta", "slack", "dropbox"] {
        let line = format!(
            r#"switchyard_events_received_total{{source="{source}",result="challenge"}} 1"#
        );
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
    gw.shutdown().await.unwrap();
}
