//! The `switchyard` binary: parses flags, sets up logging and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

/// mimalloc instead of glibc's allocator: many small allocations per event across many
/// threads (HTTP, JSON, plugin calls) contend less; see BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand, ValueEnum};
use switchyard::config::Config;
use switchyard::event::{Body, Event};
use switchyard::plugin::{CallInput, CallLimits, InstanceMode, PluginRuntime, check_component};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Webhook router with WebAssembly plugins"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The config file.
        #[arg(long, short, default_value = "switchyard.toml")]
        config: PathBuf,
        /// Check the config file and load the plugins as a start would, then exit: 0 if
        /// the gateway would start, 1 naming what would stop it. Opens no store and binds
        /// no port.
        #[arg(long)]
        check: bool,
    },
    /// Work with plugin components.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Copy the embedded store to a new file while the gateway runs.
    ///
    /// A consistent, checked snapshot, readable by its owner alone. To restore it: stop
    /// the gateway, remove switchyard.db, switchyard.db-wal and switchyard.db-shm from the
    /// data dir, copy the backup in as switchyard.db, start.
    Backup {
        /// The gateway's config file (for its data dir and store).
        #[arg(long, short, default_value = "switchyard.toml")]
        config: PathBuf,
        /// The data dir itself, instead of a config file (which may need the secrets of
        /// the gateway's environment to load).
        #[arg(long, conflicts_with = "config")]
        data_dir: Option<PathBuf>,
        /// The file to write (it must not exist).
        output: PathBuf,
    },
    /// Post a payload to a running gateway as the source's sender would: signed, or with
    /// the secret header or query parameter, as the source's `verify` asks (with its current
    /// secret). Prints the gateway's answer; exit 1 unless it is a 2xx.
    ///
    /// To try a source's check end to end before its sender is set up, e.g.
    /// `switchyard send --source bondio --event examples/events/bondio-attachment-activated.json`;
    /// with --url-check, the URL check the sender makes before it sends anything (the
    /// source's `challenge`).
    Send {
        /// The config file (the gateway's, for the source and its secrets).
        #[arg(long, short, default_value = "switchyard.toml")]
        config: PathBuf,
        /// The source to post to.
        #[arg(long)]
        source: String,
        /// The payload (`-`: read from standard input).
        #[arg(long, required_unless_present = "url_check")]
        event: Option<PathBuf>,
        /// A request header, repeatable; `content-type: application/json` unless one is
        /// given.
        #[arg(long = "header", value_name = "NAME: VALUE", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// The request's query string (`a=1&b=2`).
        #[arg(long)]
        query: Option<String>,
        /// The gateway's base URL (by default the config's `server.listen`: loopback for an
        /// unspecified address, https with `server.tls`).
        #[arg(long)]
        url: Option<String>,
        /// Instead of an event, the URL check the source's sender makes (`challenge`): a
        /// `GET` with a fresh challenge (and the verify token) in the query, or a signed
        /// body holding one; exit 0 only if the gateway echoes it as the sender expects.
        #[arg(long, conflicts_with_all = ["event", "query"])]
        url_check: bool,
        #[command(flatten)]
        tls: SendTls,
    },
    /// Print the HTTP API's OpenAPI 3 document (as served at /v1/openapi.json).
    Openapi,
    /// Run a payload through the config's routes with no gateway, and print as JSON what
    /// each route decides and every request it would send (the answer of
    /// `POST /v1/sources/{name}/dry-run`).
    ///
    /// The file's sources, destinations and routes, and the plugins of its plugin
    /// directory (routes made through the management API live in the store and are not
    /// seen). Stores and sends nothing. With --expect, a golden test for CI: exit 1 naming
    /// what differs. With --cases DIR, every case file of a directory, the plugins loaded
    /// once.
    DryRun {
        /// The config file.
        #[arg(long, short, default_value = "switchyard.toml")]
        config: PathBuf,
        /// The source the payload is posted to.
        #[arg(long, required_unless_present = "cases")]
        source: Option<String>,
        /// The payload, as a sender would post it (e.g. examples/events/onomondo-usage.json;
        /// `-`: read from standard input).
        #[arg(long, required_unless_present = "cases")]
        event: Option<PathBuf>,
        /// A request header the event carries, repeatable; `content-type:
        /// application/json` unless one is given.
        #[arg(long = "header", value_name = "NAME: VALUE", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// The request's query string (`a=1&b=2`).
        #[arg(long)]
        query: Option<String>,
        /// A JSON file of what the answer must hold: an object matches when each of its
        /// keys does (others are ignored), an array when it is as long and each item
        /// matches, anything else when equal. Exit 1 naming each difference.
        #[arg(long)]
        expect: Option<PathBuf>,
        /// A directory of golden cases, each a `*.json` file: `{"source": …, "event": <the
        /// payload as JSON> or "event_file": <a file, relative to the case>, "headers":
        /// {…}, "query": "…", "state": {…, as --state}, "http": […, as --http], "expect":
        /// <what the answer must hold, as --expect>}`. Prints each case's result; exit 1 if
        /// any fails.
        #[arg(long, conflicts_with_all = ["source", "event", "headers", "query", "expect", "state", "http"])]
        cases: Option<PathBuf>,
        /// A JSON file of values the plugins keep between events, as they would find them:
        /// `{"change-filter": {"/iccid=8945…": "[\"238\",\"01\"]"}}` (by plugin, by key).
        /// Without it they find none: with no store, nothing outlasts a run.
        #[arg(long)]
        state: Option<PathBuf>,
        /// A JSON file of answers to the plugins' HTTP requests: `[{"method": "GET", "url":
        /// "https://crm.example.com/sims/8945…", "status": 200, "headers": {…}, "body":
        /// {…}}]` (`method` GET and `status` 200 unless given; `"error": "…"` instead of a
        /// response fails the request). With it nothing is sent, whatever the method, and a
        /// request with no answer fails; without it `GET` and `HEAD` requests go to the
        /// service and others fail.
        #[arg(long)]
        http: Option<PathBuf>,
    },
}

// One value per process, parsed once: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum PluginCommand {
    /// Check that a component fits the switchyard:plugin world; name what does not.
    Check {
        file: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run one event through a plugin and print its verdict as JSON.
    Run {
        file: PathBuf,
        /// The event body (e.g. examples/events/onomondo-usage.json).
        #[arg(long)]
        event: PathBuf,
        /// Plugin configuration, repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_pair)]
        config: Vec<(String, String)>,
        /// The source name the plugin sees.
        #[arg(long, default_value = "cli")]
        source: String,
        /// The content type the plugin sees.
        #[arg(long, default_value = "application/json")]
        content_type: String,
        /// Metadata the plugin sees, repeatable.
        #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
        /// A lookup table the plugin may read (`host.lookup`), as `[tables]` names one in a
        /// config: its name and its .csv or .json file. Repeatable.
        #[arg(long = "table", value_name = "NAME=FILE", value_parser = parse_pair)]
        tables: Vec<(String, String)>,
        /// A JSON file of values the plugin keeps between events (`state`), as it would find
        /// them: `{"/iccid=8945…": "[\"238\",\"01\"]"}` (by key). Without it, none.
        #[arg(long)]
        state: Option<PathBuf>,
        /// An origin the plugin may send HTTP requests to (`http`), as a route's
        /// `allow_http` grants one: `https://crm.example.com`. Repeatable; without it, the
        /// plugin's requests fail unsent.
        #[arg(long = "allow-http", value_name = "ORIGIN")]
        allow_http: Vec<String>,
        /// A network the address guard lets those requests reach, as
        /// `delivery.allowed_networks` does (`127.0.0.0/8` for a service on this machine).
        /// Repeatable.
        #[arg(long = "allow-network", value_name = "CIDR")]
        allow_networks: Vec<String>,
        /// A JSON file of answers to the plugin's HTTP requests, as `dry-run --http` takes
        /// (the origins still granted by --allow-http): with it nothing is sent.
        #[arg(long)]
        http: Option<PathBuf>,
        /// A JSON file with the expected output: exit 1, showing both, if it differs.
        #[arg(long)]
        expect: Option<PathBuf>,
    },
    /// Write a new plugin project (WIT, build command, sample event, test).
    New {
        name: String,
        #[arg(long, value_enum)]
        lang: switchyard::scaffold::Lang,
        /// Where to write it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// What `plugin run` lets a plugin reach over HTTP: the origins given, through a transport
/// as `[delivery]` with these `allowed_networks` builds it (nothing without an origin).
fn plugin_run_http(
    origins: &[String],
    networks: &[String],
    answers: Option<&std::path::Path>,
) -> anyhow::Result<switchyard::plugin::PluginHttp> {
    use switchyard::plugin::{HttpLimits, Origin, Outbound};
    if origins.is_empty() {
        return Ok(Default::default());
    }
    let allowed: Arc<[Origin]> = (origins.iter())
        .map(|o| Origin::parse(o).map_err(|e| anyhow::anyhow!("--allow-http: {e}")))
        .collect::<anyhow::Result<_>>()?;
    if let Some(path) = answers {
        let answers = read_json(path, "--http", "a JSON array of answers")?;
        return Ok(Outbound::answered_by(answers).grant(&allowed, &HttpLimits::default(), None));
    }
    let delivery = format!(
        "[delivery]\nallowed_networks = {}\n",
        serde_json::to_string(networks)?
    );
    let config = switchyard::config::Config::parse(
        &delivery,
        "--allow-network",
        std::path::Path::new("."),
        &|_| None,
    )?;
    let sender = switchyard::delivery::plugin_sender(&config.delivery)?;
    Ok(Outbound::new(sender).grant(&allowed, &HttpLimits::default(), None))
}

/// `serve --check`: prints what a start would load, and what would stop it.
async fn check_config(path: &std::path::Path, config: &Config) -> anyhow::Result<ExitCode> {
    let report = switchyard::check(config).await?;
    for (name, outcome) in &report.plugins {
        match outcome {
            Ok(sha256) => println!("plugin {name}: ok ({})", &sha256[..12]),
            Err(error) => println!("plugin {name}: does not load: {error}"),
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for (key, validity) in &report.certificates {
        match validity.warning(now) {
            Some(warning) => println!("certificate {key}: {warning}"),
            None => println!(
                "certificate {key}: valid until {}",
                validity.not_after_text()
            ),
        }
    }
    if report.problems.is_empty() {
        println!(
            "ok: {} would start: {} sources, {} destinations, {} routes",
            path.display(),
            config.sources.len(),
            config.destinations.len(),
            config.routes.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} would not start:", path.display());
        for problem in &report.problems {
            println!("  - {problem}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// The JSON file of an `--expect`.
/// A JSON file as `T`; the error names the option and what it takes.
fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    option: &str,
    takes: &str,
) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{option} {}: not {takes}", path.display()))
}

fn read_expected(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// How `switchyard send` meets an HTTPS gateway: the authority of its certificate, and the
/// certificate it presents to a source with `allow_client_names`.
#[derive(clap::Args)]
struct SendTls {
    /// A PEM file of the authority that issued the gateway's certificate (an internal CA),
    /// trusted besides the system's.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// A PEM certificate (chain) to present as the sender's client certificate.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The PEM private key of --client-cert.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

impl SendTls {
    /// A client that trusts `--ca-cert` and presents `--client-cert`, if given.
    fn client(&self) -> anyhow::Result<reqwest::Client> {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &self.ca_cert {
            let certs = reqwest::Certificate::from_pem_bundle(&read(path)?)
                .with_context(|| format!("{} is not PEM certificates", path.display()))?;
            anyhow::ensure!(
                !certs.is_empty(),
                "{} holds no PEM certificate",
                path.display()
            );
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            let identity = reqwest::Identity::from_pem(&pem).with_context(|| {
                format!(
                    "{} and {} are not a PEM certificate and its private key",
                    cert.display(),
                    key.display()
                )
            })?;
            builder = builder.identity(identity);
        }
        builder.build().context("cannot make the HTTP client")
    }
}

/// `switchyard send`: posts a payload to the gateway as the source's sender would.
/// What `switchyard send` sends: a payload (with a query string), or the source's URL check.
enum Sending {
    Event(PathBuf, Option<String>),
    UrlCheck,
}

async fn send(
    config: &std::path::Path,
    source: &str,
    what: Sending,
    headers: Vec<(String, String)>,
    url: Option<String>,
    tls: &SendTls,
) -> anyhow::Result<ExitCode> {
    let env = |name: &str| std::env::var(name).ok();
    let config = Config::load(config, &env)?;
    let Some(sc) = config.sources.iter().find(|s| s.name == source) else {
        anyhow::bail!("no source named `{source}` in the config");
    };
    // A URL check: a fresh challenge, where the sender puts it, and what must come back.
    let (method, body, query, expected) = match what {
        Sending::Event(event, query) => (http::Method::POST, read_payload(&event)?, query, None),
        Sending::UrlCheck => {
            let Some(check) = &sc.challenge else {
                anyhow::bail!("source `{source}` answers no URL check (it has no `challenge`)");
            };
            let challenge = format!("check-{}", uuid::Uuid::now_v7().simple());
            let (name, expected) = match (&check.query, &check.field) {
                (Some(name), _) => (name.clone(), switchyard::config::ChallengeAnswer::Text),
                (None, Some(name)) => (name.clone(), switchyard::config::ChallengeAnswer::Json),
                (None, None) => anyhow::bail!("source `{source}`'s `challenge` names nothing"),
            };
            use switchyard::config::{ChallengeAnswer, ChallengeReply};
            let expected = match check.answer.unwrap_or(expected) {
                ChallengeAnswer::Text => ChallengeReply::Text(challenge.clone()),
                ChallengeAnswer::Json => {
                    ChallengeReply::Json(serde_json::json!({ name.clone(): challenge }))
                }
            };
            match &check.query {
                Some(_) => {
                    let mut query = url::form_urlencoded::Serializer::new(String::new());
                    query.append_pair(&name, &challenge);
                    if let (Some(param), Some(token)) = (&check.token_query, &check.token) {
                        query.append_pair(param, token);
                    }
                    (
                        http::Method::GET,
                        Vec::new(),
                        Some(query.finish()),
                        Some(expected),
                    )
                }
                None => {
                    let mut body = serde_json::json!({ name: challenge });
                    if let Some(kind) = &check.kind {
                        body["type"] = kind.clone().into();
                    }
                    (
                        http::Method::POST,
                        body.to_string().into_bytes(),
                        None,
                        Some(expected),
                    )
                }
            }
        }
    };
    let now_s = switchyard::delivery::now_ms() / 1000;
    let content_type = (headers.iter())
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.as_str());
    // (A check by GET is not signed: its senders sign none.)
    let sent = match &sc.verify {
        Some(verify) if method == http::Method::POST => {
            verify.credentials(content_type, query.as_deref().unwrap_or(""), &body, now_s)
        }
        _ => Default::default(),
    };
    let base = url.unwrap_or_else(|| {
        let scheme = if config.server.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut at = config.server.listen;
        if at.ip().is_unspecified() {
            at.set_ip(match at {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("{scheme}://{at}")
    });
    let mut query = query.unwrap_or_default();
    if let Some((name, value)) = &sent.query {
        let pair = url::form_urlencoded::Serializer::new(String::new())
            .append_pair(name, value)
            .finish();
        query = [query, pair]
            .into_iter()
            .filter(|q| !q.is_empty())
            .collect::<Vec<_>>()
            .join("&");
    }
    let mut target = format!("{}/v1/ingest/{source}", base.trim_end_matches('/'));
    if !query.is_empty() {
        target = format!("{target}?{query}");
    }
    // The credentials in place of any header of the same name given.
    let mut headers = headers;
    headers.retain(|(k, _)| !sent.headers.iter().any(|(s, _)| s.eq_ignore_ascii_case(k)));
    headers.extend(sent.headers);
    let map = header_map(&headers)?;
    let answer = tls
        .client()?
        .request(method, &target)
        .headers(map)
        .body(body)
        .send()
        .await
        .with_context(|| format!("cannot post to {base}"))?;
    let status = answer.status();
    let text = answer.text().await.unwrap_or_default();
    eprintln!("{status}");
    println!("{text}");
    if let Some(expected) = expected {
        use switchyard::config::ChallengeReply;
        let echoed = status.is_success()
            && match &expected {
                ChallengeReply::Text(t) => text == *t,
                ChallengeReply::Json(v) => serde_json::from_str(&text).ok().as_ref() == Some(v),
            };
        if echoed {
            eprintln!(
                "ok: the gateway answers source `{source}`'s URL check as its sender expects"
            );
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("error: the sender expects {} back", expected.to_json());
        return Ok(ExitCode::FAILURE);
    }
    Ok(if status.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A payload from a file, or from standard input for `-`.
fn read_payload(event: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    match event.to_str() {
        Some("-") => {
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut body)
                .context("cannot read the payload from standard input")?;
            Ok(body)
        }
        _ => std::fs::read(event).with_context(|| format!("cannot read {}", event.display())),
    }
}

/// A request's headers from NAME, VALUE pairs; `content-type: application/json` unless
/// they name one.
fn header_map(headers: &[(String, String)]) -> anyhow::Result<axum::http::HeaderMap> {
    let mut map = axum::http::HeaderMap::new();
    for (name, value) in headers {
        let name = axum::http::HeaderName::try_from(name.as_str())
            .with_context(|| format!("`{name}` is not a header name"))?;
        let value = axum::http::HeaderValue::try_from(value.as_str())
            .with_context(|| format!("the value of `{name}` is not a header value"))?;
        map.append(name, value);
    }
    if !map.contains_key(axum::http::header::CONTENT_TYPE) {
        let json = axum::http::HeaderValue::from_static("application/json");
        map.insert(axum::http::header::CONTENT_TYPE, json);
    }
    Ok(map)
}

/// One golden case of `dry-run --cases` (see its help).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    source: String,
    event: Option<serde_json::Value>,
    event_file: Option<PathBuf>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    query: Option<String>,
    #[serde(default)]
    state: switchyard::plugin::StateSeed,
    http: Option<switchyard::plugin::Answers>,
    expect: serde_json::Value,
}

/// `dry-run --cases DIR`: each `*.json` case of `dir` in name order, one line each (`ok` or
/// `FAIL`, with each difference or the reason under it), then the count; exit 1 if any
/// failed.
async fn run_cases(
    runner: &switchyard::DryRunner,
    dir: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "json") && path.is_file())
        .collect();
    files.sort();
    anyhow::ensure!(
        !files.is_empty(),
        "no case files (*.json) in {}",
        dir.display()
    );
    let mut failed = 0;
    for file in &files {
        let problems = match run_case(runner, file).await {
            Ok(differences) => differences,
            Err(e) => vec![format!("{e:#}")],
        };
        if problems.is_empty() {
            println!("ok    {}", file.display());
        } else {
            failed += 1;
            println!("FAIL  {}", file.display());
            for problem in &problems {
                println!("  - {problem}");
            }
        }
    }
    println!(
        "{} cases: {} passed, {failed} failed",
        files.len(),
        files.len() - failed
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One case: how its answer differs from what it expects (nothing: it passes), or why it
/// could not be run.
async fn run_case(
    runner: &switchyard::DryRunner,
    file: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(file).context("cannot read the case")?;
    let case: Case = serde_json::from_str(&text).context("not a case")?;
    let body = match (&case.event, &case.event_file) {
        (Some(event), None) => event.to_string().into_bytes(),
        (None, Some(path)) => {
            let path = file
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(path);
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?
        }
        _ => anyhow::bail!("a case has one of `event` and `event_file`"),
    };
    let headers: Vec<(String, String)> = case.headers.into_iter().collect();
    let map = header_map(&headers)?;
    let query = case.query.as_deref();
    let (state, answers) = (&case.state, case.http.as_ref());
    let answer = (runner.run(&case.source, &map, query, body.into(), state, answers)).await?;
    let answer = serde_json::to_value(&answer)?;
    Ok(switchyard::api::DryRun::differences(&case.expect, &answer))
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once(':')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("`{s}` is not NAME: VALUE"))
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Send {
            config,
            source,
            event,
            headers,
            query,
            url,
            url_check,
            tls,
        } => {
            let what = match (url_check, event) {
                (true, _) => Sending::UrlCheck,
                (false, Some(event)) => Sending::Event(event, query),
                (false, None) => anyhow::bail!("--event is needed (or --url-check)"),
            };
            send(&config, &source, what, headers, url, &tls).await
        }
        Command::Openapi => {
            let doc = serde_json::to_string_pretty(&switchyard::api::openapi())
                .context("cannot render the OpenAPI document")?;
            println!("{doc}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup {
            config,
            data_dir,
            output,
        } => {
            let data_dir = match data_dir {
                Some(dir) => dir,
                None => {
                    let env = |name: &str| std::env::var(name).ok();
                    let config = Config::load(&config, &env)?;
                    if config.store.url.is_some() {
                        anyhow::bail!(
                            "the store is PostgreSQL (store.url): back it up with pg_dump, as any database"
                        );
                    }
                    config.server.data_dir
                }
            };
            let started = std::time::Instant::now();
            let copy = output.clone();
            let backup = tokio::task::spawn_blocking(move || {
                switchyard::store::SqliteStore::backup(&data_dir, &copy)
            })
            .await??;
            println!(
                "backed up {} events ({} deliveries pending) to {} ({:.1} MiB) in {:.1} s",
                backup.events,
                backup.pending_deliveries,
                output.display(),
                backup.bytes as f64 / (1024.0 * 1024.0),
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { config, check } => {
            let env = |name: &str| std::env::var(name).ok();
            let path = config;
            let config = Config::load(&path, &env)?;
            if check {
                return check_config(&path, &config).await;
            }
            let listen = config.server.listen;
            let gateway = switchyard::Gateway::new(config).await?;
            gateway.watch_config_file(path, Arc::new(env));
            reload_on_sighup(gateway.reloader());
            switchyard::serve::raise_open_files_limit();
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            gateway.serve(listener, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DryRun {
            config,
            source,
            event,
            headers,
            query,
            expect,
            cases,
            state,
            http,
        } => {
            let env = |name: &str| std::env::var(name).ok();
            let config = Config::load(&config, &env)?;
            let runner = switchyard::DryRunner::new(config).await?;
            if let Some(dir) = cases {
                return run_cases(&runner, &dir).await;
            }
            let (Some(source), Some(event)) = (source, event) else {
                anyhow::bail!("--source and --event are needed (or --cases)");
            };
            let body = read_payload(&event)?;
            let map = header_map(&headers)?;
            let state: switchyard::plugin::StateSeed = match &state {
                Some(path) => read_json(
                    path,
                    "--state",
                    "an object of plugins, each an object of keys and their text values",
                )?,
                None => Default::default(),
            };
            let answers: Option<switchyard::plugin::Answers> = match &http {
                Some(path) => Some(read_json(path, "--http", "a JSON array of answers")?),
                None => None,
            };
            let answer = runner
                .run(
                    &source,
                    &map,
                    query.as_deref(),
                    body.into(),
                    &state,
                    answers.as_ref(),
                )
                .await?;
            let answer = serde_json::to_value(&answer)?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            let Some(path) = expect else {
                return Ok(ExitCode::SUCCESS);
            };
            let expected = read_expected(&path)?;
            let differences = switchyard::api::DryRun::differences(&expected, &answer);
            if differences.is_empty() {
                eprintln!("ok: the answer holds {}", path.display());
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("error: the answer does not hold {}:", path.display());
                for difference in &differences {
                    eprintln!("  - {difference}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Plugin {
            command: PluginCommand::Check { file, json },
        } => {
            let runtime = PluginRuntime::new()?;
            let report = check_component(&runtime, &file);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.ok {
                println!(
                    "ok: {} fits {}{}",
                    report.file,
                    switchyard::plugin::WIT_PACKAGE,
                    match report.checks_config {
                        true => ", and checks the configurations routes give it",
                        false => "",
                    }
                );
            } else {
                println!(
                    "{} does not fit {}:",
                    report.file,
                    switchyard::plugin::WIT_PACKAGE
                );
                for problem in &report.problems {
                    println!("  - {problem}");
                }
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Plugin {
            command:
                PluginCommand::Run {
                    file,
                    event,
                    config,
                    source,
                    content_type,
                    metadata,
                    tables,
                    state,
                    allow_http,
                    allow_networks,
                    http,
                    expect,
                },
        } => {
            let http = plugin_run_http(&allow_http, &allow_networks, http.as_deref())?;
            let files = (tables.into_iter())
                .map(|(name, file)| (name, PathBuf::from(file)))
                .collect();
            let tables = switchyard::tables::Tables::load(std::path::Path::new("."), &files)
                .map_err(|(name, why)| anyhow::anyhow!("table `{name}`: {why}"))?;
            let runtime = PluginRuntime::new()?;
            let name = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("plugin")
                .to_string();
            let plugin = runtime.load_file(&name, &file)?;
            let state = match &state {
                Some(path) => {
                    let keys =
                        read_json(path, "--state", "an object of keys and their text values")?;
                    switchyard::plugin::StateSeed::from([(name.clone(), keys)])
                }
                None => Default::default(),
            };
            let body = std::fs::read(&event)
                .with_context(|| format!("cannot read {}", event.display()))?;
            let event = Event {
                id: uuid::Uuid::now_v7().to_string(),
                path: format!("/v1/ingest/{source}"),
                source,
                received_at: switchyard::delivery::now_ms(),
                method: "POST".into(),
                query: String::new(),
                headers: vec![("content-type".into(), content_type.clone())],
                content_type: Some(content_type),
                body: Body::from(body),
                metadata,
                run: 0,
            };
            let input = CallInput {
                config: Arc::from(config),
                tables: Arc::new(tables),
                state: switchyard::plugin::PluginStates::memory_with(&state),
                http,
            };
            // The configuration first, as a route's is checked when it comes into force.
            let checked = CallInput {
                config: input.config.clone(),
                tables: input.tables.clone(),
                ..CallInput::default()
            };
            let (output, ok) = match plugin.check_config(checked, CallLimits::default()).await {
                Err(why) => {
                    let error = format!("the plugin refuses this configuration: {why}");
                    (serde_json::json!({ "error": error }), false)
                }
                Ok(()) => match (plugin)
                    .call(&event, input, CallLimits::default(), InstanceMode::Fresh)
                    .await
                {
                    Ok(verdict) => (serde_json::to_value(&verdict)?, true),
                    Err(e) => (serde_json::json!({ "error": e.to_string() }), false),
                },
            };
            println!("{}", serde_json::to_string_pretty(&output)?);
            match expect {
                None => Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }),
                Some(path) => {
                    let expected = read_expected(&path)?;
                    if expected == output {
                        eprintln!("ok: the output is as expected ({})", path.display());
                        Ok(ExitCode::SUCCESS)
                    } else {
                        eprintln!(
                            "error: the output differs from {}; expected:\n{}",
                            path.display(),
                            serde_json::to_string_pretty(&expected)?
                        );
                        Ok(ExitCode::FAILURE)
                    }
                }
            }
        }
        Command::Plugin {
            command: PluginCommand::New { name, lang, dir },
        } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let written = switchyard::scaffold::new_plugin(lang, &name, &dir)?;
            for path in &written {
                println!("{}", path.display());
            }
            let (build, test) = switchyard::scaffold::commands(lang);
            eprintln!(
                "Created {} ({lang:?}). Build: (cd {} && {}); test: {test}",
                name,
                dir.display(),
                build.replace("NAME", &name)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// SIGHUP reloads, through the same path as the file watcher and `POST /v1/reload`.
fn reload_on_sighup(reloader: Arc<switchyard::reload::Reloader>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            reloader.reload("SIGHUP").await;
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("Shutdown signal received.");
}
