//! Crash safety of the real binary: SIGKILL mid-stream, restart on the same data dir, and
//! every event that got a 202 reaches the receiver at least once, duplicates sharing their
//! `webhook-id`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;

use crate::util::{Receiver, TestGateway, start_binary as start};

#[tokio::test(flavor = "multi_thread")]
async fn every_accepted_event_is_delivered_across_sigkill() {
    let rx = Receiver::start().await;
    let dir = TestGateway::dir_with_plugins(&["event-filter"]);
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
data_dir = "./data"
[delivery]
retry_schedule = ["0s", "100ms", "100ms", "100ms", "100ms", "100ms"]
allowed_networks = ["127.0.0.0/8"]
[[sources]]
name = "s"
[[destinations]]
name = "sink"
url = "{}/sink"
[[routes]]
source = "s"
plugins = [{{ name = "event-filter", config = {{ allow = "usage" }} }}]
destinations = ["sink"]
"#,
            rx.url
        ),
    )
    .unwrap();

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut accepted: Vec<String> = Vec::new();
    let per_round = 300;
    for (round, kill_after) in [20usize, 150, 280].into_iter().enumerate() {
        let (mut child, url) = start(&config).await;
        let ids = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let killed = Arc::new(tokio::sync::Notify::new());
        let mut senders = Vec::new();
        for worker in 0..4 {
            let (client, url, ids, count, killed) = (
                client.clone(),
                url.clone(),
                ids.clone(),
                count.clone(),
                killed.clone(),
            );
            senders.push(tokio::spawn(async move {
                for i in (worker..per_round).step_by(4) {
                    let body = format!(r#"{{"type":"usage","round":{round},"n":{i}}}"#);
                    let resp = client
                        .post(format!("{url}/v1/ingest/s"))
                        .body(body)
                        .send()
                        .await;
                    let Ok(resp) = resp else { break };
                    if resp.status() != 202 {
                        break;
                    }
                    let v: serde_json::Value = resp.json().await.unwrap();
                    ids.lock().await.push(v["id"].as_str().unwrap().to_string());
                    if count.fetch_add(1, Ordering::SeqCst) + 1 == kill_after {
                        killed.notify_one();
                    }
                }
            }));
        }
        killed.notified().await;
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        for s in senders {
            s.await.unwrap();
        }
        let got = ids.lock().await.clone();
        assert!(
            got.len() >= kill_after,
            "round {round}: {} accepted",
            got.len()
        );
        accepted.extend(got);

        // Restart on the same data dir: what was accepted before the kill is delivered.
        let (mut child, _) = start(&config).await;
        let wanted: HashSet<&String> = accepted.iter().collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let delivered: HashSet<String> = rx
                .requests()
                .iter()
                .filter_map(|r| r.header("switchyard-event-id").map(str::to_string))
                .collect();
            let missing = wanted.iter().filter(|id| !delivered.contains(**id)).count();
            if missing == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: {missing} of {} accepted events never arrived",
                wanted.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }

    // Duplicates (sent before a kill, not yet recorded as sent) share their webhook-id.
    let mut webhook_ids: HashMap<String, HashSet<String>> = HashMap::new();
    for r in rx.requests() {
        let event = r.header("switchyard-event-id").unwrap().to_string();
        webhook_ids
            .entry(event)
            .or_default()
            .insert(r.header("webhook-id").unwrap().to_string());
    }
    for (event, ids) in &webhook_ids {
        assert_eq!(
            ids.len(),
            1,
            "event {event} was delivered under several webhook-ids: {ids:?}"
        );
    }
    assert!(accepted.len() >= 20 + 150 + 280);
}
