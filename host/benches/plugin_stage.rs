//! The plugin stage per call: one 1 KiB Onomondo event through a plugin, in a fresh
//! instance and in a warm (reused) one; per language; many in flight; with `state`; with an
//! HTTP request (`http`).
//!
//! Run with: `cargo bench -p switchyard --bench plugin_stage`. The plugins are built from
//! source first (release, wasm32-wasip2).

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard::event::{Body, Event};
use switchyard::plugin::{CallInput, CallLimits, InstanceMode, PluginRuntime, PluginStates};

fn event() -> Event {
    let body =
        std::fs::read(xtask::workspace_root().join("examples/events/onomondo-usage.json")).unwrap();
    Event {
        id: "0192a0b0-0000-7000-8000-000000000000".into(),
        source: "onomondo".into(),
        received_at: 1_730_000_000_000,
        method: "POST".into(),
        path: "/v1/ingest/onomondo".into(),
        query: String::new(),
        headers: vec![("content-type".into(), "application/json".into())],
        content_type: Some("application/json".into()),
        body: Body::from(body),
        metadata: Vec::new(),
        run: 0,
    }
}

/// The same plugin, `tag-router`, in Rust, JavaScript (componentize-js) and Python
/// (componentize-py) on a 0.6 KiB Onomondo location event: the per-event cost of each
/// language, fresh and warm.
fn languages(c: &mut Criterion) {
    let out = xtask::workspace_root().join("target/guests/plugins");
    xtask::build_guests(&["tag-router"], &out).expect("Rust plugin builds");
    xtask::build_js("tag-router-js", &out).expect("JS plugin builds");
    xtask::build_python("tag-router-py", &out).expect("Python plugin builds");
    let runtime = PluginRuntime::new().unwrap();
    let rt = runtime_for_calls();
    let mut event = event();
    event.body = Body::from(
        std::fs::read(xtask::workspace_root().join("examples/events/onomondo-location.json"))
            .unwrap(),
    );
    let config: Arc<[(String, String)]> = Arc::from(vec![
        ("label.valid-example".to_string(), "fleet".to_string()),
        ("default".to_string(), "archive".to_string()),
    ]);
    let mut group = c.benchmark_group("tag-router");
    group.sample_size(20);
    for (lang, name) in [
        ("rust", "tag-router"),
        ("js", "tag-router-js"),
        ("python", "tag-router-py"),
    ] {
        let plugin = runtime
            .load_file(name, &out.join(format!("{name}.wasm")))
            .unwrap();
        for (mode_label, mode) in [("fresh", InstanceMode::Fresh), ("warm", InstanceMode::Warm)] {
            group.bench_function(format!("{lang}/{mode_label}"), |b| {
                b.iter(|| {
                    rt.block_on(plugin.call(
                        &event,
                        CallInput::config(config.clone()),
                        CallLimits::default(),
                        mode,
                    ))
                    .expect("plugin answers")
                })
            });
        }
    }
    group.finish();
}

/// Plugin calls are async (the guest runs on a fiber): each measured call runs to its end
/// on this one-thread runtime.
fn runtime_for_calls() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn plugin_stage(c: &mut Criterion) {
    let out = xtask::workspace_root().join("target/guests/plugins");
    let plugins = ["event-filter", "iot-normalize"];
    xtask::build_guests(&plugins, &out).expect("guest plugins build");
    let runtime = PluginRuntime::new().unwrap();
    let rt = runtime_for_calls();
    let event = event();
    // The same filter on a 16-byte body shows what the call costs besides parsing JSON.
    let mut tiny = event.clone();
    tiny.body = Body::from(br#"{"type":"usage"}"#.to_vec());
    let cases = [
        ("event-filter", "event-filter", &event),
        ("event-filter-16B", "event-filter", &tiny),
        ("iot-normalize", "iot-normalize", &event),
    ];
    let config: Arc<[(String, String)]> =
        Arc::from(vec![("allow".to_string(), "usage".to_string())]);
    for (label, name, event) in cases {
        let plugin = runtime
            .load_file(name, &out.join(format!("{name}.wasm")))
            .unwrap();
        for (mode_label, mode) in [("fresh", InstanceMode::Fresh), ("warm", InstanceMode::Warm)] {
            c.bench_function(&format!("{label}/{mode_label}"), |b| {
                b.iter(|| {
                    rt.block_on(plugin.call(
                        event,
                        CallInput::config(config.clone()),
                        CallLimits::default(),
                        mode,
                    ))
                    .expect("plugin answers")
                })
            });
        }
    }
}

/// The same call as the gateway makes it: many events in flight on a two-thread runtime,
/// so instances come from many pool slots at once and calls interleave on both cores. The
/// time is per call (the batch's wall time over its calls), to compare with the one-at-a-
/// time figures above.
fn in_flight(c: &mut Criterion) {
    const IN_FLIGHT: usize = 64;
    const CALLS_EACH: usize = 20;
    let out = xtask::workspace_root().join("target/guests/plugins");
    xtask::build_guests(&["event-filter"], &out).expect("guest plugins build");
    let runtime = PluginRuntime::new().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let plugin = Arc::new(
        runtime
            .load_file("event-filter", &out.join("event-filter.wasm"))
            .unwrap(),
    );
    let event = Arc::new(event());
    let config: Arc<[(String, String)]> =
        Arc::from(vec![("allow".to_string(), "usage".to_string())]);
    let mut group = c.benchmark_group("event-filter-64-in-flight");
    group.throughput(criterion::Throughput::Elements(1));
    for (mode_label, mode) in [("fresh", InstanceMode::Fresh), ("warm", InstanceMode::Warm)] {
        group.bench_function(mode_label, |b| {
            b.iter_custom(|iters| {
                let batches = iters.div_ceil((IN_FLIGHT * CALLS_EACH) as u64);
                let started = std::time::Instant::now();
                for _ in 0..batches {
                    rt.block_on(async {
                        let tasks: Vec<_> = (0..IN_FLIGHT)
                            .map(|_| {
                                let (plugin, event, config) =
                                    (plugin.clone(), event.clone(), config.clone());
                                tokio::spawn(async move {
                                    for _ in 0..CALLS_EACH {
                                        plugin
                                            .call(
                                                &event,
                                                CallInput::config(config.clone()),
                                                CallLimits::default(),
                                                mode,
                                            )
                                            .await
                                            .expect("plugin answers");
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                    });
                }
                let calls = batches * (IN_FLIGHT * CALLS_EACH) as u64;
                started.elapsed().mul_f64(iters as f64 / calls as f64)
            })
        });
    }
    group.finish();
}

/// What keeping state between events costs a call: `change-filter` (Rust, fresh instances)
/// on events whose network alternates, so that every call reads its SIM's value and writes
/// the new one — in memory, and in the embedded SQLite store (a read on a reading
/// connection, a write committed by the writer thread, not synced).
fn state(c: &mut Criterion) {
    let out = xtask::workspace_root().join("target/guests/plugins");
    xtask::build_guests(&["change-filter"], &out).expect("Rust plugin builds");
    let runtime = PluginRuntime::new().unwrap();
    let rt = runtime_for_calls();
    let plugin = runtime
        .load_file("change-filter", &out.join("change-filter.wasm"))
        .unwrap();
    let events: Vec<Event> = ["238", "240"]
        .iter()
        .map(|mcc| {
            let mut e = event();
            e.body = Body::from(format!(
                r#"{{"type":"location","iccid":"8945738730000000012","network":{{"mcc":"{mcc}","mnc":"01"}}}}"#
            ).into_bytes());
            e
        })
        .collect();
    let config: Arc<[(String, String)]> = Arc::from(vec![
        ("key".to_string(), "/iccid".to_string()),
        (
            "fields".to_string(),
            "/network/mcc,/network/mnc".to_string(),
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn switchyard::store::Store> =
        Arc::new(switchyard::store::SqliteStore::open(dir.path(), 100).unwrap());
    let mut group = c.benchmark_group("state");
    group.sample_size(20);
    for (label, states) in [
        ("memory", PluginStates::memory()),
        (
            "sqlite",
            PluginStates::store(store, Arc::new(switchyard::delivery::SystemClock)),
        ),
    ] {
        let mut n = 0usize;
        group.bench_function(format!("change-filter/{label}"), |b| {
            b.iter(|| {
                n += 1;
                let input = CallInput {
                    state: states.clone(),
                    ..CallInput::config(config.clone())
                };
                let verdict = rt
                    .block_on(plugin.call(
                        &events[n % 2],
                        input,
                        CallLimits::default(),
                        InstanceMode::Fresh,
                    ))
                    .expect("plugin answers");
                assert!(matches!(
                    verdict,
                    switchyard::plugin::PluginVerdict::Continue(_)
                ));
            })
        });
    }
    group.finish();
}

/// A plugin's HTTP request per call (`http`, 0.1.3): `enrich`, fresh, asking a minimal JSON
/// server on loopback in the same one-thread runtime through the deliveries' transport
/// (`get`: a `GET` every call, the round trip and the server's side included), and the same
/// with its answer remembered in memory (`cached`: `cache_ttl`, a `state` read per call and
/// no request).
fn http(c: &mut Criterion) {
    let out = xtask::workspace_root().join("target/guests/plugins");
    xtask::build_guests(&["enrich"], &out).expect("Rust plugin builds");
    let runtime = PluginRuntime::new().unwrap();
    let rt = runtime_for_calls();
    let plugin = runtime
        .load_file("enrich", &out.join("enrich.wasm"))
        .unwrap();
    let crm = rt.block_on(async {
        let app = axum::Router::new()
            .fallback(|| async { r#"{"customer":{"id":"acme","plan":"iot-1"}}"# });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    });
    let config = switchyard::config::Config::parse(
        "[delivery]\nallowed_networks = [\"127.0.0.0/8\"]\n",
        "bench",
        std::path::Path::new("."),
        &|_| None,
    )
    .unwrap();
    let sender = switchyard::delivery::plugin_sender(&config.delivery).unwrap();
    let outbound = switchyard::plugin::Outbound::new(sender);
    let allowed: Arc<[switchyard::plugin::Origin]> =
        [switchyard::plugin::Origin::parse(&crm).unwrap()].into();
    let mut e = event();
    e.body = Body::from(br#"{"type":"usage","iccid":"8945738730000000012","bytes":1200}"#.to_vec());
    let mut group = c.benchmark_group("http");
    group.sample_size(20);
    for (label, cache) in [("get", None), ("cached", Some("60"))] {
        let mut pairs = vec![
            ("url".to_string(), format!("{crm}/sims/{{/iccid}}")),
            ("metadata.customer".to_string(), "/customer/id".to_string()),
        ];
        pairs.extend(cache.map(|t| ("cache_ttl".to_string(), t.to_string())));
        let config: Arc<[(String, String)]> = Arc::from(pairs);
        let states = PluginStates::memory();
        group.bench_function(format!("enrich/{label}"), |b| {
            b.iter(|| {
                let input = CallInput {
                    state: states.clone(),
                    http: outbound.grant(&allowed, &Default::default(), None),
                    ..CallInput::config(config.clone())
                };
                let verdict = rt
                    .block_on(plugin.call(&e, input, CallLimits::default(), InstanceMode::Fresh))
                    .expect("plugin answers");
                let switchyard::plugin::PluginVerdict::Continue(update) = verdict else {
                    panic!("enrich continues: {verdict:?}");
                };
                assert_eq!(
                    update.metadata,
                    [("customer".to_string(), "acme".to_string())]
                );
            })
        });
    }
    group.finish();
}

/// `validate` on the Onomondo usage event against a schema of its fields: fresh (the schema
/// compiled on each call) and warm (compiled once per instance).
fn validate(c: &mut Criterion) {
    let out = xtask::workspace_root().join("target/guests/plugins");
    xtask::build_guests(&["validate"], &out).expect("guest plugins build");
    let runtime = PluginRuntime::new().unwrap();
    let rt = runtime_for_calls();
    let event = event();
    let plugin = runtime
        .load_file("validate", &out.join("validate.wasm"))
        .unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "required": ["type", "iccid", "sim_id"],
        "properties": {
            "type": { "enum": ["usage", "location"] },
            "iccid": { "type": "string", "pattern": "^89[0-9]{17,18}$" },
            "sim_id": { "type": "string" },
            "bytes": { "type": "integer", "minimum": 0 },
            "network": { "type": "object", "required": ["mcc", "mnc"] }
        }
    });
    let config: Arc<[(String, String)]> =
        Arc::from(vec![("schema".to_string(), schema.to_string())]);
    let mut group = c.benchmark_group("validate");
    fresh_and_warm(&mut group, "", &rt, &plugin, &event, &config);
    group.finish();
}

/// `plugin` called on `event` with `config`, fresh and warm (`{prefix}fresh`,
/// `{prefix}warm`), each call's verdict a `continue`.
fn fresh_and_warm(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    prefix: &str,
    rt: &tokio::runtime::Runtime,
    plugin: &switchyard::plugin::LoadedPlugin,
    event: &Event,
    config: &Arc<[(String, String)]>,
) {
    for (mode_label, mode) in [("fresh", InstanceMode::Fresh), ("warm", InstanceMode::Warm)] {
        group.bench_function(format!("{prefix}{mode_label}"), |b| {
            b.iter(|| {
                let verdict = rt
                    .block_on(plugin.call(
                        event,
                        CallInput::config(config.clone()),
                        CallLimits::default(),
                        mode,
                    ))
                    .expect("plugin answers");
                assert!(
                    matches!(verdict, switchyard::plugin::PluginVerdict::Continue(_)),
                    "{verdict:?}"
                );
            })
        });
    }
}

/// The same new body three ways: `reshape` by configuration (Rust), `js-transform` and
/// `py-transform` by a route's own JavaScript or Python, on the Onomondo usage event, fresh
/// and warm.
fn transform(c: &mut Criterion) {
    let out = xtask::workspace_root().join("target/guests/plugins");
    xtask::build_guests(&["reshape"], &out).expect("guest plugins build");
    xtask::build_js("js-transform", &out).expect("JS plugin builds");
    xtask::build_python("py-transform", &out).expect("Python plugin builds");
    let runtime = PluginRuntime::new().unwrap();
    let rt = runtime_for_calls();
    let event = event();
    let pairs = |pairs: &[(&str, &str)]| -> Arc<[(String, String)]> {
        (pairs.iter())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let code = "function transform(e) {
        e.body = { device: { iccid: e.body.iccid }, usage: { bytes: e.body.bytes },
                   network: e.body.network.mcc + '-' + e.body.network.mnc, kind: 'usage' };
    }";
    let py_code = "def transform(e):
    b = e['body']
    e['body'] = {'device': {'iccid': b['iccid']}, 'usage': {'bytes': b['bytes']},
                 'network': f\"{b['network']['mcc']}-{b['network']['mnc']}\", 'kind': 'usage'}
";
    let cases = [
        (
            "reshape",
            pairs(&[
                ("device.iccid", "/iccid"),
                ("usage.bytes", "/bytes"),
                ("network", "={/network/mcc}-{/network/mnc}"),
                ("kind", "=usage"),
            ]),
        ),
        ("js-transform", pairs(&[("code", code)])),
        ("py-transform", pairs(&[("code", py_code)])),
    ];
    let mut group = c.benchmark_group("transform");
    group.sample_size(20);
    for (name, config) in cases {
        let plugin = runtime
            .load_file(name, &out.join(format!("{name}.wasm")))
            .unwrap();
        fresh_and_warm(
            &mut group,
            &format!("{name}/"),
            &rt,
            &plugin,
            &event,
            &config,
        );
        // What checking a route's configuration costs (WIT `config-check`, at a start, a
        // reload or an API change; each configuration once): an instance of its own.
        group.bench_function(format!("{name}/config-check"), |b| {
            b.iter(|| {
                let checked = rt.block_on(
                    plugin.check_config(CallInput::config(config.clone()), CallLimits::default()),
                );
                assert_eq!(checked, Ok(()));
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    plugin_stage,
    languages,
    in_flight,
    state,
    http,
    validate,
    transform
);
criterion_main!(benches);
