//! The dashboard, end to end in headless Chromium (Debian's `chromium`, driven by
//! playwright-core from `tests/ui`): see `tests/ui/dashboard.mjs` for the steps.
//! Screenshots of every page are written to `target/ui-artifacts/`.
//!
//! Without Chromium the test says so and passes, unless `CI` is set (`.ci/run` installs
//! Chromium and always runs it).

use std::path::PathBuf;
use std::process::Command;

use crate::util::{API_TOKEN, Receiver, TestGateway};

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("SWITCHYARD_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    path.exists().then_some(path)
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_in_a_real_browser() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "Chromium is missing: .ci/run installs Debian's chromium package"
        );
        eprintln!(
            "SKIPPED dashboard_in_a_real_browser: no /usr/bin/chromium (apt-get install chromium, \
             or set SWITCHYARD_CHROMIUM)"
        );
        return;
    };
    let root = xtask::workspace_root();
    let ui = root.join("tests/ui");
    if !ui.join("node_modules/playwright-core").exists() {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&ui)
            .output()
            .expect("npm runs");
        assert!(
            out.status.success(),
            "npm ci failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let fleet = Receiver::start().await;
    let flaky = Receiver::start().await;
    flaky.fail_with(Some(503));
    // A lookup table, shown on the plugins page.
    let tables = tempfile::tempdir().unwrap();
    let sims = tables.path().join("sims.csv");
    std::fs::write(&sims, "iccid,customer\n8945738730000000012,acme\n").unwrap();
    // A CRM that the dry run's `enrich` asks (shown as the requests its plugins asked for).
    let crm = crate::util::serve(
        axum::Router::new().fallback(|| async { r#"{"customer":{"id":"acme"}}"# }),
    )
    .await;
    let config = format!(
        r#"
[tables]
sims = "{}"
[[sources]]
name = "onomondo"
retention = {{ delivered = "30d" }}
[[sources]]
name = "flaky-source"
[[sources]]
name = "secured"
verify = {{ scheme = "header", header = "x-api-key", secrets = ["k-0123456789abcdef"] }}
[[destinations]]
name = "fleet"
url = "{{receiver}}/fleet"
[[destinations]]
name = "flaky"
url = "{}/flaky"
retry = {{ retry_schedule = ["0s"], failure_threshold = 2, restart_after = "1h" }}
[[routes]]
source = "onomondo"
plugins = [{{ name = "event-filter", config = {{ allow = "usage" }}, on_error = "dead-letter" }}]
destinations = ["fleet"]
[[routes]]
source = "flaky-source"
destinations = ["flaky"]
[[routes]]
source = "secured"
destinations = ["fleet"]
[[sources]]
name = "roaming"
[[routes]]
source = "roaming"
plugins = [{{ name = "change-filter", config = {{ key = "/iccid", fields = "/network/mcc" }} }}]
destinations = ["fleet"]
[[sources]]
name = "legacy"
[[sources]]
name = "crm-lookup"
[[routes]]
source = "crm-lookup"
plugins = [{{ name = "enrich", allow_http = ["{crm}"], config = {{ url = "{crm}/sims/{{/iccid}}" }} }}]
destinations = ["fleet"]
"#,
        sims.display(),
        flaky.url
    );
    // (`enrich` is listed with what it may do: keep state, send HTTP; `js-transform` runs
    // a route made in the dashboard.)
    let plugins = ["event-filter", "change-filter", "enrich", "js-transform"];
    // A route made through the API whose plugin, upgraded while the gateway was down,
    // refuses its configuration (event-filter in place of a 0.1.0 plugin that took any):
    // the start goes on, and the routes page says why the route cannot work.
    let dir = TestGateway::dir_with_plugins(&plugins);
    let legacy = dir.path().join("plugins.d/legacy.wasm");
    std::fs::copy(crate::util::guest("contract-0-1-0"), &legacy).unwrap();
    let gw = TestGateway::start_in(dir, &config, &fleet).await.unwrap();
    gw.create(
        "/v1/routes",
        serde_json::json!({ "name": "legacy-api", "source": "legacy", "destinations": ["fleet"],
                            "plugins": [{ "name": "legacy", "config": { "anything": "goes" } }] }),
    )
    .await;
    let dir = gw.stop().await;
    std::fs::copy(crate::util::guest("event-filter"), &legacy).unwrap();
    let gw = TestGateway::start_in(dir, &config, &fleet).await.unwrap();
    // Values change-filter keeps, shown (and forgotten) on the plugins page.
    for iccid in ["8945738730000000012", "8945738730000000099"] {
        let body = format!(r#"{{"iccid":"{iccid}","network":{{"mcc":"238"}}}}"#);
        let roamed = gw.accept("roaming", body).await;
        gw.settled(&roamed).await;
    }
    // The flaky destination fails twice: the first delivery has failed (no retries), the
    // second turns the destination FAILED and is kept; the next event is held.
    gw.accept("flaky-source", r#"{"type":"alert","n":0}"#).await;
    flaky.wait_for(1).await;
    gw.accept("flaky-source", r#"{"type":"alert","n":1}"#).await;
    flaky.wait_for(2).await;
    for _ in 0..200 {
        if gw.get("/v1/destinations/flaky").await.1["state"] == "FAILED" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let held = gw.accept("flaky-source", r#"{"type":"alert","n":2}"#).await;

    let artifacts = root.join("target/ui-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(ui.join("dashboard.mjs"))
        .arg(&gw.url)
        .arg(API_TOKEN)
        .arg(format!("{}/control", flaky.url))
        .arg(&artifacts)
        .arg(&held)
        .arg(&crm)
        .env("SWITCHYARD_CHROMIUM", &chromium)
        .current_dir(&ui)
        .kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(180), cmd.output())
        .await
        .expect("the browser test ends within 3 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
    // All three events reached the flaky destination: the kept and the held one at the
    // restart, the failed one when resent.
    let (_, delivered) = gw.get("/v1/deliveries?status=delivered&limit=500").await;
    let to_flaky = delivered["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["destination"] == "flaky")
        .count();
    assert_eq!(to_flaky, 3, "{delivered}");
    for name in [
        "signin",
        "events",
        "event",
        "destinations",
        "plugins",
        "events-phone",
    ] {
        assert!(
            artifacts.join(format!("{name}.png")).is_file(),
            "no screenshot of {name}"
        );
    }
    gw.shutdown().await.unwrap();
}
