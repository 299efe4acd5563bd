//! Plugins' HTTP requests (WIT `http`, 0.1.3), through a real gateway: `enrich`, built from
//! source, adds what a CRM on loopback knows of a SIM to its events — only to the origins
//! its route allows, within the call's time, a response's size bounded, dry runs sending
//! only `GET` — and a chain waiting for responses holds none of the CPU permits that
//! other events' plugins run under.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use crate::util::{Receiver, TestGateway, serve};

/// A CRM that knows the SIMs of one range, counts its requests, and keeps the `/held` ones waiting until
/// the test lets them go.
#[derive(Default)]
struct Crm {
    asked: AtomicUsize,
    authorization: std::sync::Mutex<Vec<String>>,
    release: tokio::sync::Notify,
    released: std::sync::atomic::AtomicBool,
    /// When each `/sims` request came.
    arrivals: std::sync::Mutex<Vec<std::time::Instant>>,
}

const KNOWN: &str = "8945738730000000012";

async fn start_crm() -> (String, Arc<Crm>) {
    let crm = Arc::new(Crm::default());
    let app = axum::Router::new()
        .route(
            "/sims/{iccid}",
            axum::routing::get(
                |State(crm): State<Arc<Crm>>, Path(iccid): Path<String>, headers: HeaderMap| async move {
                    crm.asked.fetch_add(1, Ordering::SeqCst);
                    crm.arrivals.lock().unwrap().push(std::time::Instant::now());
                    let auth = headers.get("authorization").map(|v| v.to_str().unwrap().to_string());
                    crm.authorization.lock().unwrap().extend(auth);
                    match iccid.starts_with("894573873") {
                        true => (StatusCode::OK, json!({ "customer": { "id": "acme", "plan": "iot-1" } }).to_string()),
                        false => (StatusCode::NOT_FOUND, "{}".to_string()),
                    }
                },
            ),
        )
        .route(
            "/held/{iccid}",
            axum::routing::get(|State(crm): State<Arc<Crm>>| async move {
                crm.asked.fetch_add(1, Ordering::SeqCst);
                if !crm.released.load(Ordering::SeqCst) {
                    crm.release.notified().await;
                }
                json!({ "customer": { "id": "late" } }).to_string()
            }),
        )
        .route(
            "/big/{iccid}",
            axum::routing::get(|| async { format!("\"{}\"", "x".repeat(2 << 20)) }),
        )
        .with_state(crm.clone());
    (serve(app).await, crm)
}

fn sim(iccid: &str) -> String {
    json!({ "type": "usage", "iccid": iccid, "bytes": 1200 }).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_enriches_events_from_the_service_its_route_allows() {
    let rx = Receiver::start().await;
    let (crm_url, crm) = start_crm().await;
    let config = format!(
        r#"
[[sources]]
name = "onomondo"
[[sources]]
name = "other"
[[destinations]]
name = "sink"
url = "{{receiver}}/sink"
headers = {{ "x-customer" = ":customer:" }}
[[routes]]
source = "onomondo"
plugins = [{{ name = "enrich", allow_http = ["{crm_url}"], config = {{ url = "{crm_url}/sims/{{/iccid}}", "header.authorization" = "Bearer crm-token", "metadata.customer" = "/customer/id", into = "/crm", cache_ttl = 60 }} }}]
destinations = ["sink"]
[[routes]]
name = "not-allowed"
source = "other"
plugins = [{{ name = "enrich", config = {{ url = "{crm_url}/sims/{{/iccid}}" }} }}]
destinations = ["sink"]
[[routes]]
name = "elsewhere"
source = "other"
plugins = [{{ name = "enrich", allow_http = ["https://crm.example.com"], config = {{ url = "{crm_url}/sims/{{/iccid}}" }} }}]
destinations = ["sink"]
[[sources]]
name = "geo"
[[routes]]
source = "geo"
plugins = [{{ name = "enrich", allow_http = ["{crm_url}"], config = {{ url = "{crm_url}/sims/{{/iccid}}?lang=en&api_key=geo-secret-123", not_found = "error" }} }}]
destinations = ["sink"]
"#
    );
    let gw = TestGateway::start(&config, &rx, &["enrich"]).await;
    // The plugins list tells which plugins may send requests (import `http`).
    let (_, plugins) = gw.get("/v1/plugins").await;
    assert_eq!(plugins["items"][0]["sends_http"], true, "{plugins}");
    assert_eq!(plugins["items"][0]["stateful"], true, "{plugins}");

    // The answer goes into the body and its customer into metadata; the second event of
    // the SIM finds the answer remembered (`cache_ttl`) and asks nothing.
    for _ in 0..2 {
        let id = gw.accept("onomondo", sim(KNOWN)).await;
        assert_eq!(
            gw.settled(&id).await["routes"][0]["result"]["result"],
            "delivering"
        );
    }
    let sent = rx.wait_for(2).await;
    for delivery in &sent {
        assert_eq!(delivery.header("x-customer"), Some("acme"));
        assert_eq!(
            delivery.json()["crm"]["customer"]["plan"],
            "iot-1",
            "{:?}",
            delivery.json()
        );
        assert_eq!(delivery.json()["bytes"], 1200);
    }
    assert_eq!(crm.asked.load(Ordering::SeqCst), 1);
    assert_eq!(*crm.authorization.lock().unwrap(), ["Bearer crm-token"]);

    // A SIM the CRM does not know goes on as it came (`not_found = "pass"`).
    let id = gw.accept("onomondo", sim("8945000000000000000")).await;
    gw.settled(&id).await;
    let sent = rx.wait_for(3).await;
    assert_eq!(
        sent[2].json(),
        serde_json::from_str::<Value>(&sim("8945000000000000000")).unwrap()
    );

    // A route that allows no origin, or another one, refuses the request; the plugin's
    // error says why, and the route's `on_error` (dead-letter) applies.
    let id = gw.accept("other", sim(KNOWN)).await;
    let e = gw.settled(&id).await;
    let errors: Vec<&str> = (e["routes"].as_array().unwrap().iter())
        .map(|r| r["result"]["error"].as_str().unwrap())
        .collect();
    assert!(
        errors[0].contains("the route allows plugin `enrich` no HTTP requests"),
        "{e}"
    );
    assert!(
        errors[0].contains(&format!("add `{crm_url}` to its `allow_http`")),
        "{e}"
    );
    assert!(
        errors[1].contains("is not among the origins the route allows"),
        "{e}"
    );
    assert_eq!(
        crm.asked.load(Ordering::SeqCst),
        2,
        "only the unknown SIM was asked since"
    );

    // A dry run sends its GET (for a SIM not asked before) and is counted nowhere.
    let (status, run) = gw
        .send(
            "POST",
            "/v1/sources/onomondo/dry-run",
            Some(json!({ "type": "usage", "iccid": "8945738730000000099" })),
        )
        .await;
    assert_eq!(status, 200, "{run}");
    let headers = run["deliveries"][0]["headers"].as_array().unwrap();
    assert!(headers.contains(&json!(["x-customer", "acme"])), "{run}");
    assert_eq!(crm.asked.load(Ordering::SeqCst), 3);
    // It shows the request its plugin sent (the credential redacted) and the answer's status.
    assert_eq!(
        run["requests"],
        json!([{
            "plugin": "enrich",
            "method": "GET",
            "url": format!("{crm_url}/sims/8945738730000000099"),
            "headers": [["authorization", "****oken"]],
            "status": 200,
        }]),
        "{run}"
    );

    // Routes made through the API grant origins the same way, checked as the file's are.
    let plugin = |origin: &str| {
        json!([{ "name": "enrich", "config": { "url": format!("{origin}/sims/{{/iccid}}") },
                 "allow_http": [origin] }])
    };
    let route =
        |origin: &str| json!({ "name": "api", "source": "other", "plugins": plugin(origin) });
    let (status, e) = gw
        .send("POST", "/v1/routes", Some(route("ftp://crm")))
        .await;
    assert_eq!(status, 400, "{e}");
    let message = e["error"].as_str().unwrap();
    assert!(message.contains("plugins[0].allow_http[0]"), "{message}");
    assert!(
        message.contains("the scheme must be http or https"),
        "{message}"
    );
    let created = gw.create("/v1/routes", route(&crm_url)).await;
    assert_eq!(created["plugins"], plugin(&crm_url), "{created}");

    let metrics = gw.metrics().await;
    for line in [
        r#"switchyard_plugin_http_requests_total{plugin="enrich",outcome="2xx"} 1"#,
        r#"switchyard_plugin_http_requests_total{plugin="enrich",outcome="4xx"} 1"#,
        r#"switchyard_plugin_http_requests_total{plugin="enrich",outcome="refused"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }

    // A key in a URL's query (a geocoder's `?api_key=`) is not in the error the plugin's
    // failure leaves with the event, nor in the dry run's list of requests.
    let body = json!({ "iccid": "8945000000000000000" });
    let (status, run) = gw.send("POST", "/v1/sources/geo/dry-run", Some(body)).await;
    assert_eq!(status, 200, "{run}");
    let error = run["routes"][0]["result"]["error"].as_str().unwrap();
    assert!(
        error.contains("?lang=en&api_key=**** answered 404"),
        "{run}"
    );
    assert!(!run.to_string().contains("geo-secret"), "{run}");
    // Nor in the route as the API shows it.
    let (_, route) = gw.get("/v1/routes/geo").await;
    let url = route["plugins"][0]["config"]["url"].as_str().unwrap();
    assert!(
        url.ends_with("/sims/{/iccid}?lang=en&api_key=****"),
        "{route}"
    );
    gw.shutdown().await.unwrap();
}

/// Chains waiting for responses give up their CPU permits, and their workers are stood in
/// for: with more of them waiting than there are permits and workers, an event of another
/// source still goes through. Then the responses
/// come, and each waiting event is enriched. A response past the call's time or its size
/// limit fails the plugin, saying why.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_responses_holds_up_no_other_event_and_is_bounded() {
    let rx = Receiver::start().await;
    let (crm_url, crm) = start_crm().await;
    let route = |source: &str, path: &str| {
        format!(
            r#"
[[sources]]
name = "{source}"
[[routes]]
source = "{source}"
plugins = [{{ name = "enrich", allow_http = ["{crm_url}"], config = {{ url = "{crm_url}/{path}/{{/iccid}}", "metadata.customer" = "/customer/id" }} }}]
destinations = ["sink"]
"#
        )
    };
    let config = format!(
        r#"
[plugins]
http_timeout = "20s"
http_max_response_bytes = 1048576
# (Past the 32 a granted origin takes by default: here the workers are what is tested.)
http_concurrency = 128
[[destinations]]
name = "sink"
url = "{{receiver}}/:source:?customer=:customer:"
[[sources]]
name = "quick"
[[routes]]
source = "quick"
destinations = ["sink"]
{}{}"#,
        route("held", "held"),
        route("big", "big"),
    );
    let gw = TestGateway::start(&config, &rx, &["enrich"]).await;

    // More chains waiting than there are CPU permits (twice the cores) and pipeline
    // workers (64): each waiting one is stood in for by another worker.
    let waiting = 70;
    let mut held = Vec::new();
    for i in 0..waiting {
        held.push(
            gw.accept("held", sim(&format!("89450000000000000{i:02}")))
                .await,
        );
    }
    while crm.asked.load(Ordering::SeqCst) < waiting {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let quick = gw.accept("quick", "{}").await;
    assert_eq!(
        gw.settled(&quick).await["deliveries"][0]["status"],
        "delivered"
    );
    assert_eq!(rx.requests().len(), 1, "the held events wait still");

    crm.released.store(true, Ordering::SeqCst);
    crm.release.notify_waiters();
    for id in &held {
        let e = gw.settled(id).await;
        assert_eq!(e["deliveries"][0]["status"], "delivered", "{e}");
    }
    let customers = rx.wait_for(waiting + 1).await;
    assert!(
        customers[1..]
            .iter()
            .all(|r| r.uri.ends_with("/held?customer=late"))
    );

    // Too large an answer.
    let id = gw.accept("big", sim(KNOWN)).await;
    let e = gw.settled(&id).await;
    let error = e["routes"][0]["result"]["error"].as_str().unwrap();
    assert!(
        error.contains("larger than 1048576 bytes (`plugins.http_max_response_bytes`)"),
        "{error}"
    );
    gw.shutdown().await.unwrap();

    // An answer later than the call's time for requests (a CRM that holds every answer).
    let (slow_url, slow) = start_crm().await;
    let rx = Receiver::start().await;
    let config = (config.replace(&crm_url, &slow_url))
        .replace(r#"http_timeout = "20s""#, r#"http_timeout = "300ms""#);
    let gw = TestGateway::start(&config, &rx, &["enrich"]).await;
    let id = gw.accept("held", sim(KNOWN)).await;
    let e = gw.settled(&id).await;
    let error = e["routes"][0]["result"]["error"].as_str().unwrap();
    assert!(
        error.contains(
            "timed out: the call's time for HTTP requests (`plugins.http_timeout`) ran out"
        ),
        "{error}"
    );
    slow.release.notify_waiters();
    gw.shutdown().await.unwrap();
}

/// At most `plugins.http_concurrency` requests are in flight to one granted origin: the
/// others wait their turn (within the call's time) instead of piling onto the service.
#[tokio::test(flavor = "multi_thread")]
async fn requests_to_one_origin_are_capped() {
    let rx = Receiver::start().await;
    let (crm_url, crm) = start_crm().await;
    let config = format!(
        r#"
[plugins]
http_timeout = "20s"
http_concurrency = 2
[[sources]]
name = "held"
[[destinations]]
name = "sink"
url = "{{receiver}}/sink"
[[routes]]
source = "held"
plugins = [{{ name = "enrich", allow_http = ["{crm_url}"], config = {{ url = "{crm_url}/held/{{/iccid}}" }} }}]
destinations = ["sink"]
"#
    );
    let gw = TestGateway::start(&config, &rx, &["enrich"]).await;
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(
            gw.accept("held", sim(&format!("894500000000000000{i}")))
                .await,
        );
    }
    while crm.asked.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // (Were the cap not kept, the other three would arrive meanwhile.)
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(crm.asked.load(Ordering::SeqCst), 2);

    crm.released.store(true, Ordering::SeqCst);
    crm.release.notify_waiters();
    for id in &held {
        assert_eq!(gw.settled(id).await["deliveries"][0]["status"], "delivered");
    }
    assert_eq!(crm.asked.load(Ordering::SeqCst), 5);
    gw.shutdown().await.unwrap();
}

/// `plugins.http_rate_limit`: requests to a granted origin go at its rate — a burst of a
/// second's worth, then one each interval, each waiting for its slot within the call's
/// time — and one whose slot would come past that time fails at once, saying why.
#[tokio::test(flavor = "multi_thread")]
async fn requests_to_an_origin_keep_its_rate_limit() {
    let rx = Receiver::start().await;
    let (crm_url, crm) = start_crm().await;
    let config = |timeout: &str, rate: f64| {
        format!(
            r#"
[plugins]
http_timeout = "{timeout}"
[plugins.http_rate_limit]
"{crm_url}" = {rate}
[[sources]]
name = "onomondo"
[[destinations]]
name = "sink"
url = "{{receiver}}/sink"
[[routes]]
source = "onomondo"
plugins = [{{ name = "enrich", allow_http = ["{crm_url}"], config = {{ url = "{crm_url}/sims/{{/iccid}}" }} }}]
destinations = ["sink"]
"#
        )
    };
    // Two a second: six requests at once take at least two seconds from first to last.
    let gw = TestGateway::start(&config("20s", 2.0), &rx, &["enrich"]).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            gw.accept("onomondo", sim(&format!("89457387300000001{i:02}")))
                .await,
        );
    }
    for id in &ids {
        assert_eq!(gw.settled(id).await["deliveries"][0]["status"], "delivered");
    }
    let arrivals = crm.arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 6);
    // (Two seconds between the first slot and the last, less any difference in the time
    // their requests took to get here; unlimited, the six take a few ms.)
    let spread = arrivals[5] - arrivals[0];
    assert!(
        spread >= std::time::Duration::from_millis(1_800),
        "six requests at 2/s in {spread:?}"
    );
    gw.shutdown().await.unwrap();

    // One a minute, and a call's requests may take a second: the first event's request
    // goes, the second's fails at once (its slot is a minute away), taking no slot.
    let rx = Receiver::start().await;
    let gw = TestGateway::start(&config("1s", 1.0 / 60.0), &rx, &["enrich"]).await;
    let first = gw.accept("onomondo", sim(KNOWN)).await;
    assert_eq!(
        gw.settled(&first).await["deliveries"][0]["status"],
        "delivered"
    );
    let second = gw.accept("onomondo", sim("8945738730000000013")).await;
    let e = gw.settled(&second).await;
    let error = e["routes"][0]["result"]["error"].as_str().unwrap();
    assert!(error.contains("rate limited"), "{e}");
    assert!(error.contains("plugins.http_rate_limit"), "{e}");
    assert_eq!(
        crm.asked.load(Ordering::SeqCst),
        7,
        "the second was not sent"
    );
    let metrics = gw.metrics().await;
    for line in [
        r#"switchyard_plugin_http_requests_total{plugin="enrich",outcome="2xx"} 1"#,
        r#"switchyard_plugin_http_requests_total{plugin="enrich",outcome="rate_limited"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    gw.shutdown().await.unwrap();
}
