//! Switchyard: a webhook router with WebAssembly plugins.
//!
//! The data path is a chain of stages, one module each:
//! [`ingest`] → [`store`] → [`pipeline`] (plugin chains, run by [`plugin`]) →
//! [`delivery`] → outcome recorded in the [`store`]. [`config`] loads and validates the
//! configuration and [`reload`] swaps it and the plugins while running; [`api`] is the HTTP
//! edge. `main.rs` only parses flags and calls in here.

pub mod api;
pub mod config;
pub mod delivery;
pub mod edge;
pub mod event;
pub mod ingest;
pub mod managed;
pub mod metrics;
pub mod pace;
pub mod pipeline;
pub mod plugin;
pub mod reload;
pub mod scaffold;
pub mod seal;
pub mod serve;
pub mod store;
pub mod tables;
pub mod ui;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

pub use config::Config;

use tokio_util::sync::CancellationToken;

use crate::delivery::{Clock, Dispatcher, SystemClock};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, Routing};
use crate::plugin::{PluginRegistry, PluginRuntime, RuntimeOptions};
use crate::reload::{Env, Reloader};
use crate::store::{PgStore, PurgeBefore, SqliteStore, Store};

/// Why a start would fail for the plugins: one line per plugin that a route of `config`
/// uses and that is not `loaded`, naming its load error from `statuses` or its missing file.
fn unloaded_plugins(
    config: &Config,
    loaded: impl Fn(&str) -> bool,
    statuses: &std::collections::BTreeMap<String, plugin::PluginStatus>,
) -> Vec<String> {
    unloaded_plugins_of(config, |_| true, loaded, statuses)
}

/// [`unloaded_plugins`], of the routes `of` takes only.
fn unloaded_plugins_of(
    config: &Config,
    of: impl Fn(&config::RouteConfig) -> bool,
    loaded: impl Fn(&str) -> bool,
    statuses: &std::collections::BTreeMap<String, plugin::PluginStatus>,
) -> Vec<String> {
    let used: std::collections::BTreeSet<&str> = (config.routes.iter())
        .filter(|r| of(r))
        .flat_map(|r| r.plugins.iter().map(|p| p.name.as_str()))
        .collect();
    used.into_iter()
        .filter(|name| !loaded(name))
        .map(
            |name| match statuses.get(name).and_then(|s| s.last_error.as_deref()) {
                Some(error) => {
                    format!("plugin `{name}` is used by a route but failed to load: {error}")
                }
                None => format!(
                    "plugin `{name}` is used by a route but there is no {name}.wasm in {}",
                    config.plugins.dir.display()
                ),
            },
        )
        .collect()
}

/// Why a start would fail for the routes' plugin configurations: one line per
/// configuration its plugin refuses (WIT `config-check`), naming its key.
async fn refusals(config: &Config, plugins: &plugin::PluginMap) -> Vec<String> {
    (reload::ConfigChecks::default()
        .refused(config, plugins, None)
        .await)
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// What `switchyard serve --check` found: the plugins a start would load, and what would
/// stop the start.
pub struct CheckReport {
    /// Each plugin file in the plugin directory: its name and SHA-256, or why it does not
    /// load (a plugin no route uses does not stop a start).
    pub plugins: Vec<(String, Result<String, String>)>,
    /// What would stop the start; empty if it would start.
    pub problems: Vec<String>,
    /// Each certificate the config puts in force, by the key naming it, and when it stops
    /// being valid (an expired one does not stop a start, but is shown).
    pub certificates: Vec<(String, edge::Validity)>,
}

/// Checks, as a start would, that `config`'s routes have their plugins: loads every plugin
/// file in its plugin directory (without the compile cache). Opens no store and binds no
/// port, so it runs beside a gateway serving, e.g. before a deploy. (Routes made through
/// the management API live in the store and are not checked.)
pub async fn check(config: &Config) -> anyhow::Result<CheckReport> {
    let (_runtime, loaded, statuses) = load_plugins(config).await?;
    let mut problems = unloaded_plugins(config, |name| loaded.contains_key(name), &statuses);
    problems.extend(refusals(config, &loaded).await);
    let plugins = statuses
        .into_iter()
        .map(|(name, status)| {
            let outcome = match loaded.get(&name) {
                Some(plugin) => Ok(plugin.sha256().to_string()),
                None => Err(status.last_error.unwrap_or_default()),
            };
            (name, outcome)
        })
        .collect();
    // (`Config::load` has read these files already: this cannot fail but for a race.)
    let delivery = delivery::tls_settings(&config.delivery)
        .map_err(|(key, message)| anyhow::anyhow!("{key}: {message}"))?;
    let certificates = (config.certificates(&delivery.validity))
        .map(|(key, v)| (key.to_string(), v))
        .collect();
    Ok(CheckReport {
        plugins,
        problems,
        certificates,
    })
}

/// Loads every plugin in `config`'s plugin directory as a start would, without the compile
/// cache, without a gateway: the plugins that loaded, what became of each file, and the
/// runtime they run on (keep it while calling them).
async fn load_plugins(
    config: &Config,
) -> anyhow::Result<(
    Arc<PluginRuntime>,
    plugin::PluginMap,
    std::collections::BTreeMap<String, plugin::PluginStatus>,
)> {
    let options = RuntimeOptions::from(&config.plugins);
    let (dir, used) = (
        config.plugins.dir.clone(),
        config
            .used_plugins()
            .into_iter()
            .map(String::from)
            .collect(),
    );
    let loaded = tokio::task::spawn_blocking(move || {
        let runtime = PluginRuntime::with_options(options)?;
        let (loaded, statuses) = reload::scan_once(&runtime, &dir, &used);
        anyhow::Ok((runtime, loaded, statuses))
    });
    loaded.await?
}

/// `switchyard dry-run`: what the routes of a config make of payloads — the answer of
/// `POST /v1/sources/{name}/dry-run`, with no gateway running: the file's sources,
/// destinations and routes (those made through the management API live in a store, and are
/// not seen) and the plugins of its plugin directory, every one a route uses loaded (else
/// an error naming them, as a start would refuse). Loaded once, for any number of
/// payloads; stores, sends and counts nothing.
pub struct DryRunner {
    /// (Kept while the plugins are called.)
    _runtime: Arc<PluginRuntime>,
    plugins: plugin::PluginMap,
    routing: pipeline::Routing,
    cpu: Arc<tokio::sync::Semaphore>,
    /// Plugins' requests (a dry run's: `GET` and `HEAD` only), as the config's
    /// `[delivery]` would send them.
    outbound: plugin::Outbound,
}

impl DryRunner {
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let (runtime, plugins, statuses) = load_plugins(&config).await?;
        let problems = unloaded_plugins(&config, |name| plugins.contains_key(name), &statuses);
        anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
        let refused = refusals(&config, &plugins).await;
        anyhow::ensure!(refused.is_empty(), "{}", refused.join("; "));
        let outbound = plugin::Outbound::new(delivery::plugin_sender(&config.delivery)?);
        Ok(Self {
            _runtime: runtime,
            plugins,
            routing: pipeline::Routing::from_config(Arc::new(config), None),
            cpu: Arc::new(tokio::sync::Semaphore::new(1)),
            outbound: outbound.dry_run(),
        })
    }

    /// A payload posted to `source` with `headers` and `query`, through the routes; the
    /// plugins find the values of `state` kept (and nothing else: with no store, each run
    /// starts from these), and their HTTP requests are answered by `answers` (none sent)
    /// or, without them, sent if `GET` or `HEAD`.
    pub async fn run(
        &self,
        source: &str,
        headers: &axum::http::HeaderMap,
        query: Option<&str>,
        body: bytes::Bytes,
        state: &plugin::StateSeed,
        answers: Option<&plugin::Answers>,
    ) -> anyhow::Result<api::DryRun> {
        let Some(config) = self.routing.source(source) else {
            anyhow::bail!("no source named `{source}` in the config");
        };
        let mut headers = headers.clone();
        let body = ingest::stored_body(config, &mut headers, body);
        let event = ingest::new_event(
            source.to_string(),
            &axum::http::Method::POST,
            &api::ingest_uri(source, query)?,
            &headers,
            |_| true,
            config.verify.as_ref(),
            body,
        );
        if let Some(answer) = api::DryRun::at_ingest(config, &event)? {
            return Ok(answer);
        }
        // Each run's values its own, in memory: with no store, none outlast the run.
        let states = plugin::PluginStates::memory_with(state);
        let (outbound, recording) = match answers {
            Some(answers) => plugin::Outbound::answered_by(answers.clone()),
            None => self.outbound.clone(),
        }
        .recorded();
        let (routes, deliveries) = pipeline::decide(
            &self.routing,
            &self.plugins,
            &self.cpu,
            pipeline::Reach {
                states: &states,
                outbound: &outbound,
            },
            &event,
            None,
        )
        .await;
        Ok(api::DryRun::new(
            event,
            routes,
            deliveries,
            recording.take(),
        ))
    }
}

/// Events the pipeline works on at once.
const PIPELINE_WORKERS: usize = 64;
/// After the store failed, how long requests in progress get before the gateway stops.
const FATAL_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// A gateway whose plugins are loaded, whose store is open and whose stages are built,
/// ready to serve.
pub struct Gateway {
    store: Arc<dyn Store>,
    pipeline: Arc<Pipeline>,
    dispatcher: Arc<Dispatcher>,
    reloader: Arc<Reloader>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl Gateway {
    /// Loads the plugins, opens the store in the data dir, and builds the stages. Fails,
    /// naming the file, when a plugin that a route uses cannot be loaded.
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        Self::with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`Gateway::new`], with the delivery stage's time taken from `clock`.
    pub async fn with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let options = RuntimeOptions::from(&config.plugins);
        let runtime = tokio::task::spawn_blocking(move || PluginRuntime::with_options(options))
            .await?
            .context("cannot start the WebAssembly engine")?;
        let (data_dir, capacity) = (config.server.data_dir.clone(), config.server.queue_capacity);
        let max_bytes = config.server.queue_max_bytes;
        let store: Arc<dyn Store> = match &config.store.url {
            Some(url) => Arc::new(
                PgStore::open(url, capacity, config.store.lease)
                    .await
                    .context("cannot open the PostgreSQL store (store.url)")?
                    .with_queue_max_bytes(max_bytes),
            ),
            None => Arc::new(
                tokio::task::spawn_blocking(move || SqliteStore::open(&data_dir, capacity))
                    .await?
                    .with_context(|| {
                        format!(
                            "cannot open the store in {}",
                            config.server.data_dir.display()
                        )
                    })?
                    .with_queue_max_bytes(max_bytes),
            ),
        };
        store::index_fields(&*store, &config.store.indexed_fields)
            .await
            .context("cannot index the body fields of store.indexed_fields")?;
        let metrics = Arc::new(Metrics::default());
        let config = Arc::new(config);
        let routing = Arc::new(Routing::from_config(config.clone(), None));
        let dispatcher = Dispatcher::new(
            store.clone(),
            &config.delivery,
            config.store.lease,
            routing.destinations().clone(),
            routing.longest_timeout(),
            clock.clone(),
            metrics.clone(),
        )
        .await
        .context("cannot start the delivery stage")?;
        let registry = Arc::new(PluginRegistry::default());
        let pipeline = Pipeline::new(
            store.clone(),
            registry.clone(),
            routing,
            dispatcher.clone(),
            metrics.clone(),
            clock.clone(),
        );
        let reloader = Reloader::new(
            runtime,
            registry.clone(),
            pipeline.clone(),
            dispatcher.clone(),
            metrics.clone(),
            store.clone(),
            config,
        );

        // Startup is a reload from empty; unlike later reloads, a plugin that a route of the
        // config file uses and that does not load, or refuses the route's configuration,
        // stops the start. (A route made through the API with such a plugin does not: it is
        // mended through the API, so the gateway starts, and says so —
        // `ReloadReport::route_errors`.)
        let report = reloader.reload("startup").await;
        if let Some(e) = &report.managed_error {
            anyhow::bail!("the objects made through the management API: {e}");
        }
        let config = reloader.config();
        let managed = reloader.managed();
        let from_file = |r: &config::RouteConfig| !managed.contains(managed::Kind::Route, &r.name);
        let loaded = registry.snapshot();
        let failures = unloaded_plugins_of(
            &config,
            from_file,
            |name| loaded.contains_key(name),
            &report.plugins,
        );
        if !failures.is_empty() {
            anyhow::bail!("{}", failures.join("; "));
        }
        let refused: Vec<String> = (reloader.refused_plugin_configs().await.iter())
            .filter(|r| from_file(&config.routes[r.route]))
            .map(ToString::to_string)
            .collect();
        anyhow::ensure!(refused.is_empty(), "{}", refused.join("; "));
        Ok(Self {
            store,
            pipeline,
            dispatcher,
            reloader,
            clock,
            metrics,
        })
    }

    /// Re-reads `path` (with `env` for `${VAR}`) on every reload and watches it.
    pub fn watch_config_file(&self, path: PathBuf, env: Env) {
        self.reloader.set_config_file(path, env);
    }

    /// The reloader, e.g. to reload on SIGHUP.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// Serves on `listener` until `shutdown` completes, then stops accepting, processes the
    /// events already accepted and sends the deliveries due by then. Retries due later stay
    /// in the store for the next start.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        // Many events in flight at once so that their commits share fsyncs; the plugin
        // calls among them are bounded by the pipeline's CPU permits.
        let pipeline = tokio::spawn(self.pipeline.clone().run(PIPELINE_WORKERS));
        let stop = CancellationToken::new();
        let dispatcher = tokio::spawn(self.dispatcher.clone().run(stop.clone()));
        let retention = tokio::spawn(retention_loop(
            self.store.clone(),
            self.clock.clone(),
            self.reloader.clone(),
            stop.clone(),
        ));
        let follower = tokio::spawn(self.reloader.clone().follow_store(stop.clone()));
        let restarts = tokio::spawn(self.dispatcher.clone().restart_failed(stop.clone()));
        let watcher = match self.reloader.clone().watch(stop.clone()) {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot watch for plugin and config changes; reload with SIGHUP or POST /v1/reload.");
                None
            }
        };
        let app = api::router(api::AppState {
            pipeline: self.pipeline.clone(),
            store: self.store.clone(),
            dispatcher: self.dispatcher.clone(),
            reloader: self.reloader.clone(),
            metrics: self.metrics.clone(),
            minutes: Default::default(),
            counts: Default::default(),
        });
        let scheme = match self.reloader.config().server.tls {
            Some(_) => "https",
            None => "http",
        };
        tracing::info!(address = %listener.local_addr()?, scheme, "Switchyard is listening.");
        // A store that can no longer be trusted to keep what it acknowledges stops the
        // gateway at once, without finishing anything: the next start resumes from what is
        // on disk (at least once).
        let failed = CancellationToken::new();
        let stop_serving = {
            let (store, failed) = (self.store.clone(), failed.clone());
            async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = store.fatal() => failed.cancel(),
                }
            }
        };
        // After a failure, requests in progress get a few seconds to be answered (503),
        // not as long as a slow sender's body may take.
        tokio::select! {
            () = serve::serve(listener, app, self.reloader.clone(), stop_serving) => {}
            () = async {
                failed.cancelled().await;
                tokio::time::sleep(FATAL_DRAIN).await;
            } => {}
        }
        if failed.is_cancelled() {
            // (Resolves at once: the store has failed.)
            let why = self.store.fatal().await;
            stop.cancel();
            self.store.close();
            anyhow::bail!(
                "stopped: the store failed ({why}); restart once the disk is fixed, and \
                 the events accepted before the failure resume from the store"
            );
        }
        tracing::info!("Shutting down: finishing accepted events and due deliveries.");
        self.store.close();
        pipeline.await.context("pipeline ended abnormally")?;
        stop.cancel();
        dispatcher.await.context("dispatcher ended abnormally")?;
        retention.await.context("retention ended abnormally")?;
        follower.await.context("store follower ended abnormally")?;
        restarts
            .await
            .context("automatic restarts ended abnormally")?;
        if let Some(w) = watcher {
            w.await.context("watcher ended abnormally")?;
        }
        tracing::info!("Shutdown complete.");
        Ok(())
    }
}

/// How many events one purge transaction looks at (and idempotency keys it deletes): each
/// is a short write (~15 ms on SQLite here) that ingest's commits queue behind, not one
/// that lasts seconds.
const PURGE_BATCH: usize = 500;

/// Deletes delivered events older than the retention age (and failed ones, if their age is
/// set), idempotency keys past the idempotency window and plugins' values past their time,
/// every `interval` (read from the config in force at each pass), a batch per transaction.
async fn retention_loop(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    reloader: Arc<Reloader>,
    stop: CancellationToken,
) {
    loop {
        let config = reloader.config();
        let now = clock.now_ms();
        let age = |d: std::time::Duration| now.saturating_sub(d.as_millis() as u64);
        let before = PurgeBefore {
            delivered: age(config.retention.delivered),
            failed: config.retention.failed.map(age),
            by_source: (config.sources.iter())
                .filter_map(|s| {
                    let r = s.retention.as_ref()?;
                    let bounds = store::SourceBounds {
                        delivered: r.delivered.map(age),
                        failed: r.failed.map(age),
                    };
                    Some((s.name.clone(), bounds))
                })
                .collect(),
        };
        let events = in_batches(&stop, "Retention purge", |after| {
            let (store, before) = (store.clone(), before.clone());
            async move { store.purge_events(before, after, PURGE_BATCH).await }
        });
        let Some(purged) = events.await else { return };
        if purged > 0 {
            tracing::info!(events = purged, "Purged events past retention.");
        }
        let keys_before = age(config.server.idempotency_window);
        let keys = in_batches(&stop, "Purging idempotency keys", |_: Option<()>| {
            let store = store.clone();
            async move {
                let n = store.purge_idempotency(keys_before, PURGE_BATCH).await?;
                Ok((n, (n == PURGE_BATCH).then_some(())))
            }
        });
        let Some(keys) = keys.await else { return };
        if keys > 0 {
            tracing::debug!(keys, "Purged idempotency keys past the window.");
        }
        let values = in_batches(&stop, "Purging expired plugin state", |_: Option<()>| {
            let store = store.clone();
            async move {
                let n = store.purge_state(now, PURGE_BATCH).await?;
                Ok((n, (n == PURGE_BATCH).then_some(())))
            }
        });
        let Some(values) = values.await else { return };
        if values > 0 {
            tracing::debug!(values, "Purged expired plugin state.");
        }
        tokio::select! {
            _ = tokio::time::sleep(config.retention.interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Calls `batch` until it says there is no more or fails (logged as `what`), each call
/// given where the last left off (`None` at first); `None` if `stop` came first. Returns
/// how much it did in all.
async fn in_batches<C, F, Fut>(stop: &CancellationToken, what: &str, mut batch: F) -> Option<usize>
where
    F: FnMut(Option<C>) -> Fut,
    Fut: Future<Output = Result<(usize, Option<C>), store::StoreError>>,
{
    let (mut done, mut at) = (0, None);
    loop {
        if stop.is_cancelled() {
            return None;
        }
        match batch(at).await {
            Ok((n, None)) => return Some(done + n),
            Ok((n, next)) => (done, at) = (done + n, next),
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed.");
                return Some(done);
            }
        }
    }
}
