//! Test harness: guest plugins built from source, a recording receiver, and a gateway
//! started in-process on a loopback port.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::Value;
use switchyard::Config;
use switchyard::delivery::ManualClock;
use tokio::sync::{Notify, oneshot};

/// The plugins the quickstart's config uses.
pub const QUICKSTART_PLUGINS: &[&str] = &[
    "event-filter",
    "iot-normalize",
    "tag-router",
    "metadata-inject",
    "change-filter",
];

/// Every guest the tests use; `every_fixture_is_used` checks none is forgotten.
pub const GUESTS: &[&str] = &[
    "event-filter",
    "iot-normalize",
    "tag-router",
    "metadata-inject",
    "reshape",
    "change-filter",
    "enrich",
    "validate",
    "misbehave",
    "wrong-world",
    "contract-0-1-0",
    "marker",
    "marker-v2",
];

/// The path of a guest plugin's component, building all the Rust ones once per test
/// process, and a JavaScript or Python one (`xtask::JS_PLUGINS`, `PYTHON_PLUGINS`) on
/// first use.
pub fn guest(name: &str) -> PathBuf {
    let out = xtask::workspace_root().join("target/guests/plugins");
    if xtask::JS_PLUGINS.contains(&name) || xtask::PYTHON_PLUGINS.contains(&name) {
        static OTHERS: Mutex<Vec<(String, Result<PathBuf, String>)>> = Mutex::new(Vec::new());
        let mut built = OTHERS.lock().unwrap_or_else(|e| e.into_inner());
        if !built.iter().any(|(n, _)| n == name) {
            let result = if xtask::JS_PLUGINS.contains(&name) {
                xtask::build_js(name, &out)
            } else {
                xtask::build_python(name, &out)
            };
            built.push((name.to_string(), result));
        }
        return match &built.iter().find(|(n, _)| n == name).unwrap().1 {
            Ok(p) => p.clone(),
            Err(e) => panic!("cannot build {name}: {e}"),
        };
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(|| xtask::build_guests(GUESTS, &out).map(|_| out.clone()));
    match dir {
        Ok(dir) => dir.join(format!("{name}.wasm")),
        Err(e) => panic!("cannot build guest plugins: {e}"),
    }
}

/// The repository's `examples/events/NAME.json`.
/// Copies the files of a directory (not its subdirectories) into another, made if missing.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

pub fn sample_event(name: &str) -> Vec<u8> {
    let path = xtask::workspace_root().join("examples/events").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("receiver got JSON")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct Recorded {
    requests: Mutex<Vec<Received>>,
    arrived: Notify,
    /// When set, every request is answered with this status.
    fail_with: Mutex<Option<u16>>,
}

/// A webhook receiver on a loopback port that records every request. A path starting with
/// `/status/NNN` is answered with status NNN, and `/status/NNN/retry-after/S` adds a
/// `Retry-After: S` header; anything else gets 200 (unless `fail_with` says otherwise).
pub struct Receiver {
    pub url: String,
    recorded: Arc<Recorded>,
}

/// Serves `app` on a loopback port of its own for the rest of the test: its base URL.
pub async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

impl Receiver {
    pub async fn start() -> Self {
        let recorded = Arc::new(Recorded::default());
        let app = axum::Router::new()
            .fallback(record)
            .with_state(recorded.clone());
        Self {
            url: serve(app).await,
            recorded,
        }
    }

    /// Answers every request with `status` from now on (`None`: back to normal).
    pub fn fail_with(&self, status: Option<u16>) {
        *self.recorded.fail_with.lock().unwrap() = status;
    }

    pub fn requests(&self) -> Vec<Received> {
        self.recorded.requests.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived and returns them all.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let wait = async {
            loop {
                let notified = self.recorded.arrived.notified();
                let got = self.requests();
                if got.len() >= n {
                    return got;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "receiver got {} requests, expected {n}",
                    self.requests().len()
                )
            })
    }
}

async fn record(
    State(recorded): State<Arc<Recorded>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap) {
    // `POST /control/ok` and `/control/fail/NNN` switch `fail_with` for tests driven from
    // outside the test process (the browser test); they are not recorded.
    if let Some(command) = uri.path().strip_prefix("/control/") {
        *recorded.fail_with.lock().unwrap() =
            command.strip_prefix("fail/").and_then(|c| c.parse().ok());
        return (StatusCode::NO_CONTENT, HeaderMap::new());
    }
    let mut parts = uri.path().strip_prefix("/status/").unwrap_or("").split('/');
    let code = parts.next().and_then(|s| s.parse().ok());
    let retry_after = match (parts.next(), parts.next()) {
        (Some("retry-after"), Some(secs)) => Some(secs.to_string()),
        _ => None,
    };
    let forced = *recorded.fail_with.lock().unwrap();
    let status = forced
        .or(code)
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    let mut answer = HeaderMap::new();
    if let Some(secs) = retry_after {
        answer.insert("retry-after", secs.parse().unwrap());
    }
    recorded.requests.lock().unwrap().push(Received {
        method,
        uri: uri.to_string(),
        headers,
        body,
        at: std::time::Instant::now(),
    });
    recorded.arrived.notify_waiters();
    (status, answer)
}

/// A gateway running in-process on a loopback port with its own plugin and data dirs.
pub struct TestGateway {
    pub url: String,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl TestGateway {
    /// Starts a gateway on `config` (TOML; `{receiver}` is replaced by the receiver's
    /// URL) with the named guest plugins in its plugin dir.
    pub async fn start(config: &str, receiver: &Receiver, plugins: &[&str]) -> Self {
        Self::try_start(config, receiver, plugins)
            .await
            .expect("gateway starts")
    }

    pub async fn try_start(
        config: &str,
        receiver: &Receiver,
        plugins: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_in(Self::dir_with_plugins(plugins), config, receiver).await
    }

    /// A fresh gateway directory whose `plugins.d` holds the named guest plugins.
    pub fn dir_with_plugins(plugins: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let plugin_dir = dir.path().join("plugins.d");
        std::fs::create_dir_all(&plugin_dir).unwrap();
        for p in plugins {
            std::fs::copy(guest(p), plugin_dir.join(format!("{p}.wasm"))).unwrap();
        }
        dir
    }

    /// Starts a gateway in a prepared directory (its `plugins.d` already filled).
    pub async fn start_in(
        dir: tempfile::TempDir,
        config: &str,
        receiver: &Receiver,
    ) -> anyhow::Result<Self> {
        Self::start_raw(dir, &Self::harness_config(config, receiver), &|_| None).await
    }

    /// Starts a gateway whose config is the file `dir/switchyard.toml` (written from
    /// `config`, `{receiver}` replaced), watched and re-read on reload like `serve` does.
    pub async fn start_from_file(
        dir: tempfile::TempDir,
        config: &str,
        receiver: &Receiver,
    ) -> anyhow::Result<Self> {
        Self::start_from_raw_file(dir, &Self::harness_config(config, receiver)).await
    }

    /// As [`TestGateway::start_from_file`], on config text as it is.
    pub async fn start_from_raw_file(dir: tempfile::TempDir, text: &str) -> anyhow::Result<Self> {
        let path = dir.path().join("switchyard.toml");
        std::fs::write(&path, text)?;
        let config = Config::load(&path, &|_| None)?;
        let gateway = switchyard::Gateway::new(config).await?;
        gateway.watch_config_file(path, Arc::new(|_| None));
        Self::serve(gateway, dir).await
    }

    /// As [`TestGateway::start`], with the delivery stage's time on a hand-moved clock.
    pub async fn start_with_clock(
        config: &str,
        receiver: &Receiver,
        plugins: &[&str],
        clock: Arc<ManualClock>,
    ) -> Self {
        Self::start_in_with_clock(Self::dir_with_plugins(plugins), config, receiver, clock).await
    }

    /// As [`TestGateway::start_in`], with the delivery stage's time on a hand-moved clock.
    pub async fn start_in_with_clock(
        dir: tempfile::TempDir,
        config: &str,
        receiver: &Receiver,
        clock: Arc<ManualClock>,
    ) -> Self {
        let text = Self::harness_config(config, receiver);
        Self::start_raw_with_clock(dir, &text, &|_| None, Some(clock))
            .await
            .expect("gateway starts")
    }

    fn harness_config(config: &str, receiver: &Receiver) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[api]\ntokens = [\"{API_TOKEN}\"]\n[delivery]\nretry_schedule = [\"0s\", \"10ms\", \"10ms\"]\njitter = 0.0\nallowed_networks = [\"127.0.0.0/8\"]\n{}",
            config.replace("{receiver}", &receiver.url)
        )
    }

    /// Starts a gateway on config text as it is, with relative paths resolved in `dir`
    /// and `${VAR}` read from `env`. It listens on a loopback port of its own choosing.
    pub async fn start_raw(
        dir: tempfile::TempDir,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        Self::start_raw_with_clock(dir, text, env, None).await
    }

    async fn start_raw_with_clock(
        dir: tempfile::TempDir,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        clock: Option<Arc<ManualClock>>,
    ) -> anyhow::Result<Self> {
        let config = Config::parse(text, "test config", dir.path(), env)?;
        let gateway = match clock {
            Some(clock) => switchyard::Gateway::with_clock(config, clock).await?,
            None => switchyard::Gateway::new(config).await?,
        };
        Self::serve(gateway, dir).await
    }

    async fn serve(gateway: switchyard::Gateway, dir: tempfile::TempDir) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (tx, rx) = oneshot::channel();
        let served = tokio::spawn(gateway.serve(listener, async {
            let _ = rx.await;
        }));
        Ok(Self {
            url,
            client: api_client(),
            shutdown: Some(tx),
            served: Some(served),
            _dir: dir,
        })
    }

    /// Posts a body to a source; returns the status and the JSON answer.
    pub async fn post(&self, source: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}/v1/ingest/{source}", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("gateway answers");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("answer is JSON"))
    }

    /// GETs a path of the gateway's API; returns the status and the JSON answer.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// The gateway's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let resp = self
            .client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap();
        resp.text().await.unwrap()
    }

    /// POSTs to a path of the gateway's API (empty body); returns the status and the JSON answer.
    pub async fn post_api(&self, path: &str) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// Reloads the config (`POST /v1/reload`), which must be applied.
    pub async fn reload_applied(&self) {
        let (status, report) = self.post_api("/v1/reload").await;
        assert_eq!(
            (status, &report["config"]),
            (200, &serde_json::json!("applied")),
            "{report}"
        );
    }

    /// Makes a change on disk and waits (10 s at most) for the file watcher to notice it and
    /// apply a reload — no SIGHUP, no `POST /v1/reload`.
    pub async fn noticed(&self, change: impl FnOnce()) {
        let reloads = || async {
            let text = self.metrics().await;
            (text.lines())
                .find_map(|l| l.strip_prefix(r#"switchyard_reloads_total{result="ok"} "#))
                .map_or(0.0, |n| n.parse::<f64>().unwrap())
        };
        let before = reloads().await;
        change();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while reloads().await == before {
            assert!(
                std::time::Instant::now() < deadline,
                "the change was not noticed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Posts an event that must be accepted; returns its id.
    pub async fn accept(&self, source: &str, body: impl Into<reqwest::Body>) -> String {
        let (status, answer) = self.post(source, body).await;
        assert_eq!(status, 202, "ingest answered {answer}");
        answer["id"].as_str().expect("id in answer").to_string()
    }

    /// `GET /v1/events/{id}`.
    pub async fn event(&self, id: &str) -> Value {
        self.client
            .get(format!("{}/v1/events/{id}", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls the event until `check` holds (the dispatcher runs on its own time).
    pub async fn wait_event(&self, id: &str, check: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..200 {
            let e = self.event(id).await;
            if check(&e) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "event {id} never reached the expected state: {}",
            self.event(id).await
        );
    }

    /// Waits until the event settles; its first delivery must have failed, the last attempt
    /// saying `why`.
    pub async fn failed_with(&self, id: &str, why: &str) -> Value {
        let event = self.settled(id).await;
        let delivery = &event["deliveries"][0];
        assert_eq!(delivery["status"], "failed", "{event}");
        let last = delivery["attempts"].as_array().unwrap().last().unwrap();
        let error = last["error"].as_str().unwrap_or("");
        assert!(error.contains(why), "{delivery}");
        event
    }

    /// Waits until the event's routes are recorded and none of its deliveries is pending.
    pub async fn settled(&self, id: &str) -> Value {
        for _ in 0..400 {
            let e = self.event(id).await;
            let processed = e["status"] == "processed";
            let expected: u64 = e["routes"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|r| r["result"]["deliveries"].as_u64())
                .sum();
            let deliveries = e["deliveries"].as_array().unwrap();
            let done = deliveries.len() as u64 == expected
                && deliveries.iter().all(|d| d["status"] != "pending");
            if processed && done {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("event {id} did not settle: {}", self.event(id).await);
    }

    /// POSTs `body` to an API collection (`/v1/destinations`, ...), which must create it.
    pub async fn create(&self, path: &str, body: Value) -> Value {
        let (status, created) = self.send("POST", path, Some(body)).await;
        assert_eq!(status, 201, "{path}: {created}");
        created
    }

    /// Sends `body` as JSON with `method` to a path of the gateway's API; returns the
    /// status and the JSON answer (`null` when there is none).
    pub async fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.client.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", self.url),
        );
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("gateway answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
        };
        (status, value)
    }

    /// Stops the gateway as [`TestGateway::shutdown`] does and hands back its directory,
    /// so that another gateway can start on the same data.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.served.take().unwrap().await.unwrap().unwrap();
        self._dir
    }

    /// The gateway's directory (config, `plugins.d`, data).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Stops accepting, lets accepted events finish, and returns what `serve` returned.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.served.take().unwrap().await?
    }
}

/// The management API token of test gateways.
pub const API_TOKEN: &str = "test-token-0123";

/// A client that sends the test API token with every request.
fn api_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {API_TOKEN}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Writes `bytes` as `name` in a fresh gateway directory's `plugins.d`.
pub fn dir_with_plugin_bytes(name: &str, bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::write(plugins.join(name), bytes).unwrap();
    dir
}

/// Starts the real binary, `switchyard serve --config CONFIG`, and returns it with the address it listens on.
pub async fn start_binary(config: &Path) -> (tokio::process::Child, String) {
    let (child, url, _log) = start_binary_logging(config, "info").await;
    (child, url)
}

/// [`start_binary`] with `RUST_LOG=rust_log`; also returns the JSON log lines it has
/// written so far (collected until the child exits).
pub async fn start_binary_logging(
    config: &Path,
    rust_log: &str,
) -> (
    tokio::process::Child,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    start_binary_with_env(config, rust_log, &[]).await
}

/// [`start_binary_logging`] with more environment variables for the child.
pub async fn start_binary_with_env(
    config: &Path,
    rust_log: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> (
    tokio::process::Child,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(switchyard_bin())
        .args(["--log-format", "json", "serve", "--config"])
        .arg(config)
        .env("RUST_LOG", rust_log)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("switchyard starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let address = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                let listening = v["fields"]["message"] == "Switchyard is listening.";
                let address = (v["fields"]["address"].as_str())
                    .map(|a| format!("{}://{a}", v["fields"]["scheme"].as_str().unwrap_or("http")));
                log.lock().unwrap().push(v);
                if listening {
                    return address.unwrap();
                }
            }
        }
        panic!("switchyard exited before listening");
    })
    .await
    .expect("switchyard listens within a minute");
    // Keep draining the log so the child never blocks on a full pipe.
    let kept = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str(&line) {
                kept.lock().unwrap().push(v);
            }
        }
    });
    (child, address, log)
}

/// The `switchyard` binary built for this test run.
pub fn switchyard_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `data` compressed: `gzip`, `deflate` (zlib-wrapped) or `raw` (a bare deflate stream).
pub fn compress(coding: &str, data: &[u8]) -> Vec<u8> {
    use flate2::{Compression, write};
    use std::io::Write;
    let (mut out, level) = (Vec::new(), Compression::default());
    // Each encoder writes its end into `out` as it is dropped, at the end of its statement.
    match coding {
        "gzip" => write::GzEncoder::new(&mut out, level).write_all(data),
        "deflate" => write::ZlibEncoder::new(&mut out, level).write_all(data),
        _ => write::DeflateEncoder::new(&mut out, level).write_all(data),
    }
    .unwrap();
    out
}

/// What the gateway at `url` does while its store does not answer (a stalled disk, a hung
/// database), `room` being its `queue_capacity` and nothing else waiting: the senders of
/// events `{"n": first}` to `first + room - 1` (to source `s`) give up after a second each,
/// their events taking the queue's room; the next sender is refused at once; and once they
/// have waited 5 s, `/readyz` says why and `switchyard_store_unanswered_seconds` counts.
pub async fn while_the_store_does_not_answer(url: &str, first: u64, room: u64) {
    let client = reqwest::Client::new();
    let post = |n: u64, wait: Duration| {
        client
            .post(format!("{url}/v1/ingest/s"))
            .body(format!(r#"{{"n":{n}}}"#))
            .timeout(wait)
            .send()
    };
    let get = |path: &str| {
        client
            .get(format!("{url}{path}"))
            .timeout(Duration::from_secs(4))
            .send()
    };
    let started = std::time::Instant::now();
    for n in first..first + room {
        let gave_up = post(n, Duration::from_secs(1)).await;
        assert!(
            gave_up.as_ref().is_err_and(|e| e.is_timeout()),
            "the store does not answer: {gave_up:?}"
        );
    }
    let refused = post(first + room, Duration::from_secs(30)).await.unwrap();
    assert_eq!(refused.status(), 503, "refused at once, not held");
    let why = refused.text().await.unwrap();
    assert!(
        why.contains(&format!("{room} events waiting or being stored")),
        "{why}"
    );
    // (Not ready until then, or ready: the probe asks the store, within 2 s.)
    let says = format!("not ready: the store has stored none of the {room} events waiting for it");
    let mut why = String::new();
    while !why.contains(&says) {
        assert!(started.elapsed() < Duration::from_secs(20), "{why}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        why = get("/readyz").await.unwrap().text().await.unwrap();
    }
    let metrics = (get("/metrics").await)
        .expect("a scrape answers")
        .text()
        .await
        .unwrap();
    let unanswered: u64 = (metrics.lines())
        .find_map(|l| l.strip_prefix("switchyard_store_unanswered_seconds "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(unanswered >= 5, "{unanswered}");
}
