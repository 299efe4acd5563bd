//! Durable ingest under load: how many 1 KiB JSON events per second the gateway commits
//! (each answered 202 only after its commit), and the latency of one ingest request.
//!
//! Run with: `cargo bench -p switchyard --bench ingest [-- EVENTS CONCURRENCY]`
//! (defaults 20000 events, 64 concurrent clients). The gateway and the client share this
//! machine's cores, and the data dir is a fresh temp dir on the local disk. The source has
//! a route with no plugins and no destinations, so the pipeline also records each event
//! as processed: two commits per event, batched.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::Config;

fn body() -> String {
    // About 1 KiB of Onomondo-like JSON.
    let pad = "x".repeat(700);
    format!(
        r#"{{"type":"usage","id":"d08592fd-823e-3d4d-af99-1509a7220fb4","time":"2020-04-23T11:39:01.000Z","sim_id":"000000001","iccid":"8945738730000000012","ipv4":"123.01.23.012","bytes":9484,"network":{{"name":"TDC A/S","country":"Denmark","mcc":"238","mnc":"01"}},"pad":"{pad}"}}"#
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn run(url: &str, events: usize, concurrency: usize) -> (f64, Vec<Duration>) {
    let client = reqwest::Client::new();
    let body = Arc::new(body());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, body, next, url) =
            (client.clone(), body.clone(), next.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < events {
                let t = Instant::now();
                let resp = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.as_str().to_owned())
                    .send()
                    .await
                    .expect("gateway answers");
                assert_eq!(resp.status(), 202);
                let _ = resp.bytes().await;
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::with_capacity(events);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    (events as f64 / elapsed, all)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let events: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let concurrency: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);

    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("plugins.d"))?;
    let text = r#"
[server]
listen = "127.0.0.1:0"
queue_capacity = 1000000
[[sources]]
name = "bench"
[[routes]]
source = "bench"
"#;
    let config = Config::parse(text, "bench", dir.path(), &|_| None)?;
    let gateway = switchyard::Gateway::new(config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/ingest/bench", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(gateway.serve(listener, async {
        let _ = stopped.await;
    }));

    // Warm up connections and the store.
    run(&url, 500, concurrency).await;
    let (rate, lat) = run(&url, events, concurrency).await;
    println!(
        "durable ingest, {events} events of ~1 KiB, {concurrency} concurrent clients: {rate:.0} events/s; \
         latency p50 {:.2} ms, p99 {:.2} ms",
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3
    );
    let (rate1, lat1) = run(&url, 2_000, 1).await;
    println!(
        "durable ingest, one client at a time: {rate1:.0} events/s; latency p50 {:.2} ms, p99 {:.2} ms",
        percentile(&lat1, 0.50).as_secs_f64() * 1e3,
        percentile(&lat1, 0.99).as_secs_f64() * 1e3
    );
    let _ = stop.send(());
    server.await??;
    Ok(())
}
