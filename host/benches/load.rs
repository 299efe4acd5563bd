//! End-to-end load: how fast the gateway delivers against the physical limit of this
//! machine, measured in one run.
//!
//! 1. A minimal HTTP sink starts in this process; its direct rate (requests/s) is measured
//!    with the same client settings as below.
//! 2. The real `switchyard` binary starts (release build, SQLite store in a temp dir, one
//!    route through the Rust `event-filter` plugin delivering to the sink). Events are posted
//!    as fast as the clients go; the rate counts events *delivered* to the sink.
//! 3. At a fixed 1,000 events/s, the latency from sending an event to its arrival at the
//!    sink: p50, p99, p99.9.
//!
//! Run with: `cargo bench -p switchyard --bench load [-- EVENTS CONCURRENCY]` (defaults
//! 20000 and 64). Loopback only; bounded in count and time.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Mutex;

#[derive(Default)]
struct Sink {
    count: AtomicUsize,
    arrivals: Mutex<HashMap<String, Instant>>,
}

async fn start_sink() -> (String, Arc<Sink>) {
    let sink = Arc::new(Sink::default());
    let state = sink.clone();
    let app = axum::Router::new().fallback(move |headers: HeaderMap, _body: axum::body::Bytes| {
        let state = state.clone();
        async move {
            let now = Instant::now();
            if let Some(id) = headers
                .get("switchyard-event-id")
                .and_then(|v| v.to_str().ok())
            {
                state.arrivals.lock().await.insert(id.to_string(), now);
            }
            state.count.fetch_add(1, Ordering::Relaxed);
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, sink)
}

fn body() -> String {
    let pad = "x".repeat(700);
    format!(
        r#"{{"type":"usage","id":"d08592fd","time":"2020-04-23T11:39:01.000Z","sim_id":"000000001","iccid":"8945738730000000012","ipv4":"123.01.23.012","bytes":9484,"network":{{"name":"TDC A/S","country":"Denmark"}},"pad":"{pad}"}}"#
    )
}

/// Posts `n` events with `concurrency` clients; returns the ids the answers carried.
async fn blast(client: &reqwest::Client, url: &str, n: usize, concurrency: usize) -> usize {
    let next = Arc::new(AtomicUsize::new(0));
    let body = Arc::new(body());
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, next, body) =
            (client.clone(), url.to_string(), next.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let resp = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.as_str().to_owned())
                    .send()
                    .await;
                if let Ok(r) = resp
                    && r.status().is_success()
                {
                    let _ = r.bytes().await;
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    ok
}

async fn wait_count(sink: &Sink, n: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while sink.count.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let events: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let concurrency: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;

    // 1. The sink alone.
    let (sink_url, sink) = start_sink().await;
    blast(&client, &sink_url, 1_000, concurrency).await;
    let started = Instant::now();
    blast(&client, &sink_url, events, concurrency).await;
    let direct = events as f64 / started.elapsed().as_secs_f64();
    println!("direct sink: {direct:.0} requests/s ({events} requests, {concurrency} clients)");

    // 2. The gateway in front of it.
    let guests = xtask::workspace_root().join("target/guests/plugins");
    xtask::build_guests(&["event-filter"], &guests).map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("plugins.d"))?;
    std::fs::copy(
        guests.join("event-filter.wasm"),
        dir.path().join("plugins.d/event-filter.wasm"),
    )?;
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nqueue_capacity = 1000000\n[delivery]\nconcurrency = 256\nallowed_networks = [\"127.0.0.0/8\"]\n\
             [[sources]]\nname = \"onomondo\"\n[[destinations]]\nname = \"sink\"\nurl = \"{sink_url}/events\"\n\
             [[routes]]\nsource = \"onomondo\"\nplugins = [{{ name = \"event-filter\", config = {{ allow = \"usage\" }} }}]\n\
             destinations = [\"sink\"]\n"
        ),
    )?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn,switchyard=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut address = None;
    while let Some(line) = lines.next_line().await? {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "Switchyard is listening." {
            address = v["fields"]["address"].as_str().map(str::to_string);
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let ingest = format!(
        "http://{}/v1/ingest/onomondo",
        address.expect("gateway listens")
    );

    blast(&client, &ingest, 1_000, concurrency).await;
    wait_count(&sink, events + 2_000, Duration::from_secs(60)).await;
    let base = sink.count.load(Ordering::Relaxed);
    let started = Instant::now();
    let accepted = blast(&client, &ingest, events, concurrency).await;
    let all = wait_count(&sink, base + accepted, Duration::from_secs(120)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = sink.count.load(Ordering::Relaxed) - base;
    let rate = delivered as f64 / elapsed;
    println!(
        "gateway: {rate:.0} events/s delivered ({delivered} of {accepted} accepted{}, {concurrency} clients)",
        if all { "" } else { ", TIMED OUT" }
    );
    println!("ratio gateway/direct: {:.0}%", 100.0 * rate / direct);

    // 3. Latency at a fixed 1,000 events/s for 5 s.
    let sent: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let body = Arc::new(body());
    let mut tasks = Vec::new();
    for _ in 0..5_000 {
        ticker.tick().await;
        let (client, url, sent, body) =
            (client.clone(), ingest.clone(), sent.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            if let Ok(r) = client
                .post(&url)
                .body(body.as_str().to_owned())
                .send()
                .await
                && let Ok(v) = r.json::<serde_json::Value>().await
                && let Some(id) = v["id"].as_str()
            {
                sent.lock().await.push((id.to_string(), t));
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let sent = sent.lock().await.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut latencies = loop {
        let arrivals = sink.arrivals.lock().await;
        let latencies: Vec<Duration> = sent
            .iter()
            .filter_map(|(id, t)| arrivals.get(id).map(|a| a.duration_since(*t)))
            .collect();
        if latencies.len() == sent.len() || Instant::now() > deadline {
            break latencies;
        }
        drop(arrivals);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    latencies.sort();
    println!(
        "latency ingest→delivered at 1000 events/s ({} of {} events): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
        latencies.len(),
        sent.len(),
        pct(&latencies, 0.50),
        pct(&latencies, 0.99),
        pct(&latencies, 0.999)
    );
    child.start_kill()?;
    Ok(())
}
