//! Hot-reload latency: the time from an atomic rename of a new plugin version into the
//! plugin directory to the first event processed by it, with and without the compiled
//! cache. The time includes the watcher's 250 ms debounce.
//!
//! Run with: `cargo bench -p switchyard --bench reload [-- RUNS]` (default 7 per mode).

use std::path::Path;
use std::time::{Duration, Instant};

use sha2::Digest;
use switchyard::Config;

async fn first_event_on(
    client: &reqwest::Client,
    base: &str,
    sha: &str,
    started: Instant,
) -> Duration {
    loop {
        let resp: serde_json::Value = client
            .post(format!("{base}/v1/ingest/s"))
            .body("{}")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = resp["id"].as_str().unwrap().to_string();
        loop {
            let e: serde_json::Value = client
                .get(format!("{base}/v1/events/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if e["status"] == "processed" {
                if e["routes"][0]["steps"][0]["sha256"] == sha {
                    return started.elapsed();
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn install(dir: &Path, bytes: &[u8]) {
    let tmp = dir.join("plugins.d/.marker.wasm.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join("plugins.d/marker.wasm")).unwrap();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(7);
    let guests = xtask::workspace_root().join("target/guests/plugins");
    xtask::build_guests(&["marker", "marker-v2"], &guests).map_err(anyhow::Error::msg)?;
    let versions = [
        std::fs::read(guests.join("marker.wasm"))?,
        std::fs::read(guests.join("marker-v2.wasm"))?,
    ];
    let shas: Vec<String> = versions
        .iter()
        .map(|v| hex::encode(sha2::Sha256::digest(v)))
        .collect();

    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("plugins.d"))?;
    install(dir.path(), &versions[0]);
    let path = dir.path().join("switchyard.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n[api]\ntokens = [\"bench-token-1\"]\n[[sources]]\nname = \"s\"\n[[routes]]\nsource = \"s\"\nplugins = [{ name = \"marker\" }]\n",
    )?;
    let config = Config::load(&path, &|_| None)?;
    let gateway = switchyard::Gateway::new(config).await?;
    gateway.watch_config_file(path, std::sync::Arc::new(|_| None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(gateway.serve(listener, async {
        let _ = stopped.await;
    }));
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(
        reqwest::header::AUTHORIZATION,
        "Bearer bench-token-1".parse()?,
    );
    let client = reqwest::Client::builder().default_headers(auth).build()?;
    let cache = dir.path().join("data/plugin-cache");

    let mut current = 0;
    for (label, keep_cache) in [("without cache", false), ("with cache", true)] {
        let mut times = Vec::new();
        for _ in 0..runs {
            let next = 1 - current;
            if !keep_cache {
                let _ = std::fs::remove_dir_all(&cache);
            }
            let started = Instant::now();
            install(dir.path(), &versions[next]);
            times.push(first_event_on(&client, &base, &shas[next], started).await);
            current = next;
        }
        times.sort();
        let ms: Vec<String> = times
            .iter()
            .map(|t| format!("{:.0}", t.as_secs_f64() * 1e3))
            .collect();
        println!(
            "reload {label}: median {:.0} ms over {runs} runs (all, ms: {})",
            times[runs / 2].as_secs_f64() * 1e3,
            ms.join(", ")
        );
    }
    let _ = stop.send(());
    server.await??;
    Ok(())
}
