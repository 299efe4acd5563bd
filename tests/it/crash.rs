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

/// `switchyard backup` copies the embedded store while the gateway runs and delivers; a
/// gateway started on that copy elsewhere has every event and sends the deliveries that
/// were still pending — to a destination that was failing when the copy was made. The
/// copy, like the data dir the gateway made, is its owner's alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_taken_while_running_restores_every_event_and_pending_delivery() {
    let (rx, later) = (Receiver::start().await, Receiver::start().await);
    later.fail_with(Some(503));
    let config = || {
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
data_dir = "./data"
[store]
lease = "1s"
[api]
tokens = ["backup-test"]
[delivery]
timeout = "2s"
failure_threshold = 1000
retry_schedule = ["0s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]
allowed_networks = ["127.0.0.0/8"]
[[sources]]
name = "s"
[[destinations]]
name = "up"
url = "{}/up"
[[destinations]]
name = "later"
url = "{}/later"
[[routes]]
source = "s"
destinations = ["up", "later"]
"#,
            rx.url, later.url
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("switchyard.toml");
    std::fs::write(&file, config()).unwrap();
    let (mut child, url) = start(&file).await;
    let client = reqwest::Client::new();
    let mut ids = HashSet::new();
    for n in 0..50 {
        let resp = (client.post(format!("{url}/v1/ingest/s")))
            .body(format!(r#"{{"n":{n}}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let v: serde_json::Value = resp.json().await.unwrap();
        ids.insert(v["id"].as_str().unwrap().to_string());
    }
    // Every event delivered to `up` and recorded so (and retrying `later`).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let page: serde_json::Value = (client.get(format!("{url}/v1/events?limit=100")))
            .bearer_auth("backup-test")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let items = page["items"].as_array().unwrap();
        if items.len() == 50 && items.iter().all(|e| e["delivered"] == 1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let backup = dir.path().join("backup.db");
    let run_backup = || {
        std::process::Command::new(crate::util::switchyard_bin())
            .args(["backup", "--config"])
            .arg(&file)
            .arg(&backup)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = run_backup();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("backed up 50 events (50 deliveries pending) to "),
        "{stdout}"
    );
    assert!(!dir.path().join("backup.db.partial").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "payloads and secrets: its owner's alone"
    );
    let data = std::fs::metadata(dir.path().join("data")).unwrap();
    assert_eq!(
        data.permissions().mode() & 0o777,
        0o700,
        "so is the data dir it made"
    );
    // Never over an existing file (here named by its data dir rather than its config).
    let again = std::process::Command::new(crate::util::switchyard_bin())
        .args(["backup", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg(&backup)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists: choose a new file"),
        "{again:?}"
    );
    child.kill().await.unwrap();

    // Restored elsewhere, with `later` answering now: its 50 deliveries go out, `up` gets
    // nothing again.
    let before = later.requests().len();
    later.fail_with(None);
    let restored = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(restored.path().join("data")).unwrap();
    std::fs::copy(&backup, restored.path().join("data/switchyard.db")).unwrap();
    let file = restored.path().join("switchyard.toml");
    std::fs::write(&file, config()).unwrap();
    let (_child, _url) = start(&file).await;
    let got = later.wait_for(before + 50).await;
    let sent: HashSet<String> = (got[before..].iter())
        .map(|r| r.header("switchyard-event-id").unwrap().to_string())
        .collect();
    assert_eq!(sent, ids);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(later.requests().len(), before + 50, "each once");
    assert_eq!(rx.requests().len(), 50, "nothing again to `up`");
}
