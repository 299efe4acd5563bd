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
//! 20000 and 64). Loopback only; bounded in count and time. `LOAD_PLUGINS='plugins = []'`
//! (any TOML `plugins` line) swaps the route's chain, to see what the plugin costs;
//! `LOAD_EXTRA_ROUTES=N` adds N sources with a route each, never posted to (placed before
//! the measured route), to see what a large config costs.
//! `LOAD_CLIENT=wrk` posts with Debian's `wrk` (in processes of its own, one thread each)
//! instead of this process's reqwest clients: a second instrument for the same figures,
//! which also prints how long the answers took under full load (wrk's p50 and p99).
//! `LOAD_CLIENT=h2` posts over HTTP/2 with prior knowledge (to the sink and the gateway
//! alike): the clients' requests share one connection as streams, as behind a load
//! balancer that speaks HTTP/2 to its backends; deliveries stay HTTP/1.1.
//!
//! `LOAD_SINK=h2` serves the sink over HTTPS (the test PKI's certificate, `tests/fixtures/
//! tls`) offering HTTP/2 by ALPN, so that deliveries go over HTTP/2 — all of them as
//! streams of one connection, as reqwest keeps one per receiver; `LOAD_SINK=https`
//! offers HTTP/1.1 only, to compare. The direct rate is measured against the same sink.
//!
//! `cargo bench -p switchyard --bench load -- relay [EVENTS CONCURRENCY]` measures, after
//! the sink, a bare relay in place of the gateway: a process of its own (this binary run
//! again, with the gateway's runtime and HTTP libraries) that answers each POST with 202
//! and forwards its body to the sink — the two HTTP exchanges of an event and nothing else,
//! no store and no plugin. Its ratio to the direct sink is the ceiling for any gateway built
//! on axum and reqwest on this machine.
//!
//! `cargo bench -p switchyard --bench load -- postgres [EVENTS CONCURRENCY]` measures
//! scale-out instead: after the sink, one and then two instances on one PostgreSQL
//! database (a throwaway local server), the clients spread over the instances.
//! `LOAD_GZIP=1` posts every event of the throughput runs gzipped (`Content-Encoding:
//! gzip`, 911 bytes of JSON in ~190), for the gateway to decode.
//! `LOAD_PG_STATEMENTS=N` loads `pg_stat_statements` into that server and prints, after
//! the one-instance run, the N statements that took the server longest: calls and plans
//! per delivered event, and µs of execution and of planning per event (wall time inside
//! the server, waits included; parsing, commits and the server's other work are not in
//! it). `LOAD_PG_OPTIONS` adds server options (`-c name=value …`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Mutex;

#[derive(Default)]
struct Sink {
    count: AtomicUsize,
    /// Of those, the requests that came over HTTP/2.
    http2: AtomicUsize,
    /// Whether arrivals are recorded (only while latency is measured: the sink shares the
    /// cores with the gateway and should cost as little as it can meanwhile).
    timing: AtomicBool,
    arrivals: Mutex<HashMap<String, Instant>>,
}

async fn start_sink() -> (String, Arc<Sink>) {
    let sink = Arc::new(Sink::default());
    let state = sink.clone();
    let app = axum::Router::new().fallback(
        move |version: axum::http::Version, headers: HeaderMap, _body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                if version == axum::http::Version::HTTP_2 {
                    state.http2.fetch_add(1, Ordering::Relaxed);
                }
                let now = Instant::now();
                if state.timing.load(Ordering::Relaxed)
                    && let Some(id) = headers
                        .get("switchyard-event-id")
                        .and_then(|v| v.to_str().ok())
                {
                    state.arrivals.lock().await.insert(id.to_string(), now);
                }
                state.count.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let Some(alpn) = sink_alpn() else {
        tokio::spawn(async move { axum::serve(listener, app).await });
        return (format!("http://{addr}"), sink);
    };
    let acceptor = tls_acceptor(alpn);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = builder.serve_connection(io, service).await;
            });
        }
    });
    (format!("https://localhost:{}", addr.port()), sink)
}

/// `LOAD_SINK`: the protocols an HTTPS sink offers by ALPN (`h2`: HTTP/2 and HTTP/1.1;
/// `https`: HTTP/1.1 only); `None`, plain HTTP/1.1.
fn sink_alpn() -> Option<Vec<Vec<u8>>> {
    match std::env::var("LOAD_SINK").as_deref() {
        Ok("h2") => Some(vec![b"h2".to_vec(), b"http/1.1".to_vec()]),
        Ok("https") => Some(vec![b"http/1.1".to_vec()]),
        Ok(other) => panic!("LOAD_SINK={other}: h2 or https"),
        Err(_) => None,
    }
}

fn tls_fixture(name: &str) -> PathBuf {
    xtask::workspace_root()
        .join("tests/fixtures/tls")
        .join(name)
}

/// The sink's TLS: the test PKI's server certificate (for `localhost`), offering `alpn`.
fn tls_acceptor(alpn: Vec<Vec<u8>>) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(tls_fixture("server.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(tls_fixture("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = alpn;
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn body() -> String {
    let pad = "x".repeat(700);
    format!(
        r#"{{"type":"usage","id":"d08592fd","time":"2020-04-23T11:39:01.000Z","sim_id":"000000001","iccid":"8945738730000000012","ipv4":"123.01.23.012","bytes":9484,"network":{{"name":"TDC A/S","country":"Denmark"}},"pad":"{pad}"}}"#
    )
}

/// Posts `n` events with `concurrency` clients, spread over `urls` (client `i` posts to
/// `urls[i % len]`, as behind a load balancer); returns how many were accepted. With
/// `LOAD_CLIENT=wrk` the clients are Debian's `wrk` in processes of their own.
async fn blast(client: &reqwest::Client, urls: &[String], n: usize, concurrency: usize) -> usize {
    if std::env::var("LOAD_CLIENT").is_ok_and(|c| c == "wrk") {
        return wrk_blast(urls, n, concurrency).await;
    }
    let next = Arc::new(AtomicUsize::new(0));
    // `LOAD_GZIP=1`: every event posted gzipped (`Content-Encoding: gzip`), for the
    // gateway to decode; the sink takes the bytes as they come.
    let gzip = std::env::var("LOAD_GZIP").is_ok_and(|g| g == "1");
    let body = Arc::new(if gzip {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(body().as_bytes()).unwrap();
        e.finish().unwrap()
    } else {
        body().into_bytes()
    });
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let (client, url, next, body) = (
            client.clone(),
            urls[i % urls.len()].clone(),
            next.clone(),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let mut request = client.post(&url).header("content-type", "application/json");
                if gzip {
                    request = request.header("content-encoding", "gzip");
                }
                let resp = request.body(body.as_ref().clone()).send().await;
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

/// `blast` with `wrk` (one thread and `concurrency / urls` connections per URL): a load
/// generator outside this process, to check that the reqwest clients are not the limit.
/// Each wrk stops after its share of responses (its script sends it the SIGINT on which
/// wrk stops early and reports); the up to `concurrency` requests still in flight then are
/// not counted as accepted.
async fn wrk_blast(urls: &[String], n: usize, concurrency: usize) -> usize {
    let dir = tempfile::tempdir().expect("temp dir");
    let share = n / urls.len();
    let script = dir.path().join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.body = [==[{}]==]\nlocal left = {share}\n\
             local ffi = require(\"ffi\")\nffi.cdef(\"int kill(int pid, int sig); int getpid(void);\")\n\
             function response(status, headers, body)\n  left = left - 1\n  \
             if left == 0 then wrk.thread:stop(); ffi.C.kill(ffi.C.getpid(), 2) end\nend\n\
             function done(s)\n  local e = s.errors\n  \
             io.write(string.format(\"ACCEPTED %d\\n\", s.requests - e.status - e.connect - e.read - e.write - e.timeout))\nend\n",
            body()
        ),
    )
    .expect("wrk script");
    let connections = (concurrency / urls.len()).max(1).to_string();
    let mut runs = Vec::new();
    for url in urls {
        runs.push(
            tokio::process::Command::new("wrk")
                .args([
                    "-t1",
                    "--latency",
                    "-c",
                    &connections,
                    "-d300s",
                    "--timeout",
                    "10s",
                    "-s",
                ])
                .arg(&script)
                .arg(url)
                .stdout(Stdio::piped())
                // Spawned here, so that the runs for several URLs go at once.
                .spawn()
                .expect("wrk runs (apt-get install wrk)"),
        );
    }
    let mut accepted = 0;
    for run in runs {
        let out = run.wait_with_output().await.expect("wrk ends");
        let text = String::from_utf8_lossy(&out.stdout);
        accepted += text
            .lines()
            .find_map(|l| l.strip_prefix("ACCEPTED "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or_else(|| panic!("wrk printed no count: {text}"));
        // wrk's own view of the answers under full load (warm-up runs are too short).
        let quantile = |q: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(q))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        if share >= 10_000 {
            println!(
                "  (wrk: answered in p50 {}, p99 {} under full load)",
                quantile("50%"),
                quantile("99%")
            );
        }
    }
    accepted
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

/// Starts the real binary on `config`; returns it and its ingest URL for `onomondo`.
async fn start_gateway(config: &Path) -> anyhow::Result<(tokio::process::Child, String)> {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(config)
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
    Ok((child, ingest))
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// A gateway dir (the plugin, a config delivering to the sink); the config's path.
fn gateway_dir(dir: &Path, sink_url: &str, store: &str) -> anyhow::Result<PathBuf> {
    let guests = xtask::workspace_root().join("target/guests/plugins");
    xtask::build_guests(&["event-filter"], &guests).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(dir.join("plugins.d"))?;
    std::fs::copy(
        guests.join("event-filter.wasm"),
        dir.join("plugins.d/event-filter.wasm"),
    )?;
    // The route's plugins: `LOAD_PLUGINS` (a TOML `plugins = [...]` line) measures other
    // chains, e.g. `plugins = []` or the same plugin with `instance = "warm"`.
    let plugins = std::env::var("LOAD_PLUGINS").unwrap_or_else(|_| {
        r#"plugins = [{ name = "event-filter", config = { allow = "usage" } }]"#.to_string()
    });
    // `LOAD_EXTRA_ROUTES=N`: N more sources, each with a route to a destination of its own,
    // that no event is posted to — what a large config costs the events of one source.
    let extra: usize = std::env::var("LOAD_EXTRA_ROUTES").map_or(0, |n| n.parse().unwrap_or(0));
    let extra: String = (0..extra)
        .map(|i| {
            format!(
                "[[sources]]\nname = \"other-{i}\"\n[[destinations]]\nname = \"other-{i}\"\n\
                 url = \"{sink_url}/other/{i}\"\n[[routes]]\nsource = \"other-{i}\"\n\
                 destinations = [\"other-{i}\"]\n"
            )
        })
        .collect();
    // An HTTPS sink's certificate is the test PKI's: the gateway trusts its CA.
    let ca = match sink_alpn() {
        Some(_) => format!("ca_certificates = [{:?}]\n", tls_fixture("ca.pem")),
        None => String::new(),
    };
    let config = dir.join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nqueue_capacity = 1000000\n{store}\n[delivery]\nconcurrency = 256\nallowed_networks = [\"127.0.0.0/8\"]\n{ca}\
             {extra}[[sources]]\nname = \"onomondo\"\n[[destinations]]\nname = \"sink\"\nurl = \"{sink_url}/events\"\n\
             [[routes]]\nsource = \"onomondo\"\n{plugins}\ndestinations = [\"sink\"]\n"
        ),
    )?;
    Ok(config)
}

/// CPU time in seconds that process `pid` has used so far (`/proc/PID/stat`, utime +
/// stime, in Linux's fixed USER_HZ of 100 ticks a second); 0 where unreadable.
fn cpu_secs(pid: u32) -> f64 {
    stat_ticks(pid, &[11, 12])
}

/// CPU time of this process and of the children it has waited for (the `wrk` clients).
fn own_cpu_secs() -> f64 {
    // cutime and cstime follow utime and stime.
    stat_ticks(std::process::id(), &[11, 12, 13, 14])
}

/// The sum of the given tick fields of `/proc/PID/stat`, in seconds.
fn stat_ticks(pid: u32, at: &[usize]) -> f64 {
    stat_ticks_of(&format!("/proc/{pid}/stat"), at)
}

/// As [`stat_ticks`], of a `stat` file (a process's or a thread's).
fn stat_ticks_of(path: &str, at: &[usize]) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime, stime, cutime, cstime: fields 14 to 17 of the line, 11 to 14 counting the
    // state as 0.
    at.iter().map(|&i| ticks(i)).sum::<f64>() / 100.0
}

/// CPU time of every `postgres` process so far, and of those its postmaster has reaped
/// (cutime, cstime): the database server's, in seconds.
fn postgres_cpu_secs() -> f64 {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    procs
        .filter_map(|p| p.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(|pid| stat_ticks(pid, &[11, 12, 13, 14]))
        .sum()
}

/// CPU seconds of each thread of process `pid` so far, by thread id, with its name.
fn thread_cpu(pid: u32) -> HashMap<u32, (String, f64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .filter_map(|t| {
            let tid: u32 = t.ok()?.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            let secs = stat_ticks_of(&format!("/proc/{pid}/task/{tid}/stat"), &[11, 12]);
            Some((tid, (name.trim().to_string(), secs)))
        })
        .collect()
}

/// The machine's CPU time so far from `/proc/stat`, in seconds: (idle, stolen, total).
/// Stolen time is what the hypervisor gave to other guests while this one wanted to run.
fn machine_cpu() -> (f64, f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let at = |i: usize| cpu.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    // already counted in user.
    let total: f64 = cpu.iter().take(8).sum();
    ((at(3) + at(4)) / 100.0, at(7) / 100.0, total / 100.0)
}

/// Warms `what` up (the gateways, or the bare relay), then posts `events` spread over
/// `ingest` and waits until the sink has them all: events/s *delivered*. Prints where the
/// CPU went meanwhile: `what` (`pids`), this process (clients and sink), and what stayed
/// idle.
async fn delivered_rate(
    what: &str,
    client: &reqwest::Client,
    sink: &Sink,
    ingest: &[String],
    pids: &[u32],
    events: usize,
    concurrency: usize,
) -> f64 {
    let base = sink.count.load(Ordering::Relaxed);
    let warm = blast(client, ingest, 1_000, concurrency).await;
    wait_count(sink, base + warm, Duration::from_secs(60)).await;
    let base = sink.count.load(Ordering::Relaxed);
    let gateways_cpu = || pids.iter().map(|p| cpu_secs(*p)).sum::<f64>();
    let (gateways_before, own_before) = (gateways_cpu(), own_cpu_secs());
    let database_before = postgres_cpu_secs();
    let (idle_before, steal_before, total_before) = machine_cpu();
    let threads_before: Vec<_> = pids.iter().map(|p| thread_cpu(*p)).collect();
    let started = Instant::now();
    let accepted = blast(client, ingest, events, concurrency).await;
    let ingest_secs = started.elapsed().as_secs_f64();
    let all = wait_count(sink, base + accepted, Duration::from_secs(120)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = sink.count.load(Ordering::Relaxed) - base;
    let rate = delivered as f64 / elapsed;
    println!(
        "{what} x{}: {rate:.0} events/s delivered ({delivered} of {accepted} accepted{}, {concurrency} clients; accepted at {:.0}/s)",
        ingest.len(),
        if all { "" } else { ", TIMED OUT" },
        accepted as f64 / ingest_secs
    );
    let (idle, steal, total) = machine_cpu();
    let gateways_secs = gateways_cpu() - gateways_before;
    println!(
        "  CPU meanwhile: {what}{} {:.2} cores ({:.0} µs per delivered event), clients and sink {:.2} cores, machine idle {:.0}%, stolen by the hypervisor {:.0}%",
        if pids.len() > 1 { "s" } else { "" },
        gateways_secs / elapsed,
        1e6 * gateways_secs / delivered.max(1) as f64,
        (own_cpu_secs() - own_before) / elapsed,
        100.0 * (idle - idle_before) / (total - total_before).max(f64::EPSILON),
        100.0 * (steal - steal_before) / (total - total_before).max(f64::EPSILON)
    );
    let database_secs = postgres_cpu_secs() - database_before;
    if database_secs > 0.0 {
        println!(
            "  PostgreSQL meanwhile: {:.2} cores ({:.0} µs per delivered event)",
            database_secs / elapsed,
            1e6 * database_secs / delivered.max(1) as f64,
        );
    }
    // The busiest threads: one near 1.00 core would be a serial bottleneck.
    let mut threads: Vec<(String, f64)> = pids
        .iter()
        .zip(&threads_before)
        .flat_map(|(pid, before)| {
            thread_cpu(*pid).into_iter().map(|(tid, (name, secs))| {
                let earlier = before.get(&tid).map_or(0.0, |(_, s)| *s);
                (name, (secs - earlier) / elapsed)
            })
        })
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!(
        "  busiest {what} threads (cores): {}",
        threads
            .iter()
            .take(4)
            .map(|(name, cores)| format!("{name} {cores:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    rate
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    match std::env::var(RELAY_TO) {
        Ok(sink) => runtime.block_on(relay(sink)),
        Err(_) => runtime.block_on(run()),
    }
}

/// Set in the environment of this binary run as the bare relay (see `-- relay`): the
/// sink's URL.
const RELAY_TO: &str = "LOAD_RELAY_TO";

/// The bare relay: answers each POST with 202 and forwards its body to the sink with a
/// client built as the gateway's delivery client is, as the gateway does once an event is
/// stored (answer first, deliver in a task of its own). Prints its address on stdout.
async fn relay(sink: String) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?;
    let target = format!("{sink}/events");
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let (client, target) = (client.clone(), target.clone());
        async move {
            tokio::spawn(async move {
                let sent = client
                    .post(&target)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                if let Err(e) = sent {
                    eprintln!("relay: {e}");
                }
            });
            axum::http::StatusCode::ACCEPTED
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

/// Starts the bare relay in front of `sink_url`; returns it and its URL.
async fn start_relay(sink_url: &str) -> anyhow::Result<(tokio::process::Child, String)> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .env(RELAY_TO, sink_url)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let address = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the relay did not start"))?;
    Ok((child, format!("http://{address}/")))
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let postgres = args.first().is_some_and(|a| a == "postgres");
    let bare_relay = args.first().is_some_and(|a| a == "relay");
    let numbers = &args[usize::from(postgres || bare_relay)..];
    let events: usize = numbers
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let concurrency: usize = numbers.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let mut client = reqwest::Client::builder().pool_max_idle_per_host(concurrency);
    if sink_alpn().is_some() {
        let ca = std::fs::read(tls_fixture("ca.pem"))?;
        client = client.tls_certs_merge(reqwest::Certificate::from_pem_bundle(&ca)?);
    }
    let client = if std::env::var("LOAD_CLIENT").is_ok_and(|c| c == "h2") {
        client.http2_prior_knowledge().build()?
    } else {
        client.build()?
    };

    // 1. The sink alone.
    let (sink_url, sink) = start_sink().await;
    let sink_urls = [sink_url.clone()];
    blast(&client, &sink_urls, 1_000, concurrency).await;
    let started = Instant::now();
    blast(&client, &sink_urls, events, concurrency).await;
    let direct = events as f64 / started.elapsed().as_secs_f64();
    println!("direct sink: {direct:.0} requests/s ({events} requests, {concurrency} clients)");

    if postgres {
        return scale_out(&client, &sink_url, &sink, events, concurrency).await;
    }
    if bare_relay {
        let (mut child, url) = start_relay(&sink_url).await?;
        let pids: Vec<u32> = child.id().into_iter().collect();
        let rate = delivered_rate(
            "bare relay",
            &client,
            &sink,
            &[url],
            &pids,
            events,
            concurrency,
        )
        .await;
        println!("ratio bare relay/direct: {:.0}%", 100.0 * rate / direct);
        child.start_kill()?;
        return Ok(());
    }

    // 2. The gateway in front of it.
    let dir = tempfile::tempdir()?;
    let config = gateway_dir(dir.path(), &sink_url, "")?;
    let (mut child, ingest) = start_gateway(&config).await?;
    let pids: Vec<u32> = child.id().into_iter().collect();
    let rate = delivered_rate(
        "gateway",
        &client,
        &sink,
        std::slice::from_ref(&ingest),
        &pids,
        events,
        concurrency,
    )
    .await;
    println!("ratio gateway/direct: {:.0}%", 100.0 * rate / direct);
    if sink_alpn().is_some() {
        println!(
            "the sink's requests so far: {} in all, {} over HTTP/2",
            sink.count.load(Ordering::Relaxed),
            sink.http2.load(Ordering::Relaxed)
        );
    }

    // 3. Latency at a fixed 1,000 events/s for 5 s.
    sink.timing.store(true, Ordering::Relaxed);
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

/// With `Some((n, events))`, prints the `n` statements of `pg_stat_statements` that took
/// the server longest, per event; with `None`, resets its counts.
async fn statement_stats(url: &str, top: Option<(usize, usize)>) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;
    let Some((n, events)) = top else {
        client
            .execute("SELECT pg_stat_statements_reset()", &[])
            .await?;
        return Ok(());
    };
    let rows = client
        .query(
            "SELECT calls, total_exec_time, plans, total_plan_time,
                    regexp_replace(query, '\\s+', ' ', 'g')
             FROM pg_stat_statements ORDER BY total_exec_time + total_plan_time DESC LIMIT $1",
            &[&(n as i64)],
        )
        .await?;
    println!("statements that took the server longest, per delivered event ({events}):");
    for row in rows {
        let (calls, ms, plans, plan_ms): (i64, f64, i64, f64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let query: String = row.get::<_, String>(4).chars().take(90).collect();
        let per_event = |n: f64| n / events as f64;
        println!(
            "  {:>5.2} calls {:>6.1} µs, {:>5.2} plans {:>6.1} µs  {query}",
            per_event(calls as f64),
            per_event(ms * 1_000.0),
            per_event(plans as f64),
            per_event(plan_ms * 1_000.0),
        );
    }
    Ok(())
}

/// One and then two instances on one PostgreSQL database (a throwaway server, see
/// `xtask::pg`), the load spread over them: events/s delivered, and the ratio.
async fn scale_out(
    client: &reqwest::Client,
    sink_url: &str,
    sink: &Sink,
    events: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let statements: Option<usize> = std::env::var("LOAD_PG_STATEMENTS")
        .ok()
        .and_then(|n| n.parse().ok());
    let options = match statements {
        Some(_) => {
            "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all \
             -c pg_stat_statements.track_planning=on"
        }
        None => "",
    };
    let extra = std::env::var("LOAD_PG_OPTIONS").unwrap_or_default();
    let server =
        xtask::pg::PgServer::start_with(&format!("{options} {extra}")).ok_or_else(|| {
            anyhow::anyhow!("PostgreSQL is not installed (apt-get install postgresql)")
        })?;
    let mut rates = Vec::new();
    for instances in [1, 2] {
        let url = server.database(&format!("scale{instances}"));
        let store = format!("[store]\nurl = \"{url}\"");
        let mut dirs = Vec::new();
        let mut running = Vec::new();
        let mut ingest = Vec::new();
        for _ in 0..instances {
            let dir = tempfile::tempdir()?;
            let config = gateway_dir(dir.path(), sink_url, &store)?;
            let (child, url) = start_gateway(&config).await?;
            dirs.push(dir);
            running.push(child);
            ingest.push(url);
        }
        let pids: Vec<u32> = running.iter().filter_map(|c| c.id()).collect();
        if statements.is_some() {
            statement_stats(&url, None).await?;
        }
        rates.push(
            delivered_rate("gateway", client, sink, &ingest, &pids, events, concurrency).await,
        );
        if let (Some(n), 1) = (statements, instances) {
            statement_stats(&url, Some((n, events + 1_000))).await?;
        }
        for mut child in running {
            child.start_kill()?;
            child.wait().await?;
        }
    }
    println!(
        "two instances / one, on one PostgreSQL: {:.2}x",
        rates[1] / rates[0]
    );
    Ok(())
}
