//! Switchyard: a webhook router with WebAssembly plugins.
//!
//! The data path is a chain of stages, one module each:
//! [`ingest`] → [`store`] → [`pipeline`] (plugin chains, run by [`plugin`]) →
//! [`delivery`] → outcome recorded in the [`store`]. [`config`] loads and validates the
//! configuration; [`api`] is the HTTP edge. `main.rs` only parses flags and calls in here.

pub mod api;
pub mod config;
pub mod delivery;
pub mod event;
pub mod ingest;
pub mod pipeline;
pub mod plugin;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

pub use config::Config;

use tokio_util::sync::CancellationToken;

use crate::delivery::{Clock, Dispatcher, SystemClock};
use crate::pipeline::{Pipeline, Routing};
use crate::plugin::{PluginRegistry, PluginRuntime, RegistryError, RuntimeOptions};
use crate::store::{SqliteStore, Store};

/// A gateway whose plugins are loaded, whose store is open and whose stages are built,
/// ready to serve.
pub struct Gateway {
    config: Config,
    store: Arc<dyn Store>,
    pipeline: Arc<Pipeline>,
    dispatcher: Arc<Dispatcher>,
    clock: Arc<dyn Clock>,
}

impl Gateway {
    /// Loads the plugins, opens the store in the data dir, and builds the stages. Fails,
    /// naming the file, when a plugin that a route uses cannot be loaded.
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        Self::with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`Gateway::new`], with the delivery stage's time taken from `clock`.
    pub async fn with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let plugin_config = config.clone();
        let plugins = tokio::task::spawn_blocking(move || -> anyhow::Result<PluginRegistry> {
            let p = &plugin_config.plugins;
            let options = RuntimeOptions {
                max_memory: p.max_memory_bytes,
                warm_pool_size: p.warm_pool_size,
                warm_recycle_after: p.warm_recycle_after,
                degraded_after: p.degraded_after,
            };
            let runtime = PluginRuntime::with_options(options)
                .context("cannot start the WebAssembly engine")?;
            load_plugins(&runtime, &plugin_config)
        })
        .await??;
        let (data_dir, capacity) = (config.server.data_dir.clone(), config.server.queue_capacity);
        let store: Arc<dyn Store> = Arc::new(
            tokio::task::spawn_blocking(move || SqliteStore::open(&data_dir, capacity))
                .await?
                .with_context(|| {
                    format!(
                        "cannot open the store in {}",
                        config.server.data_dir.display()
                    )
                })?,
        );
        let routing = Arc::new(Routing::from_config(&config));
        let dispatcher = Dispatcher::new(
            store.clone(),
            &config.delivery,
            routing.destinations().clone(),
            clock.clone(),
        )
        .await
        .context("cannot start the delivery stage")?;
        let pipeline = Pipeline::new(
            store.clone(),
            Arc::new(plugins),
            routing,
            dispatcher.clone(),
        );
        Ok(Self {
            config,
            store,
            pipeline,
            dispatcher,
            clock,
        })
    }

    /// Serves on `listener` until `shutdown` completes, then stops accepting, processes the
    /// events already accepted and sends the deliveries due by then. Retries due later stay
    /// in the store for the next start.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        let pipeline = tokio::spawn(self.pipeline.clone().run(workers));
        let stop = CancellationToken::new();
        let dispatcher = tokio::spawn(self.dispatcher.clone().run(stop.clone()));
        let retention = tokio::spawn(retention_loop(
            self.store.clone(),
            self.clock.clone(),
            self.config.retention.clone(),
            stop.clone(),
        ));
        let app = api::router(api::AppState {
            pipeline: self.pipeline.clone(),
            store: self.store.clone(),
            dispatcher: self.dispatcher.clone(),
            config: Arc::new(self.config.clone()),
        });
        tracing::info!(address = %listener.local_addr()?, "Switchyard is listening.");
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("HTTP server failed")?;
        tracing::info!("Shutting down: finishing accepted events and due deliveries.");
        self.store.close();
        pipeline.await.context("pipeline ended abnormally")?;
        stop.cancel();
        dispatcher.await.context("dispatcher ended abnormally")?;
        retention.await.context("retention ended abnormally")?;
        tracing::info!("Shutdown complete.");
        Ok(())
    }
}

/// Deletes delivered events older than the retention age, every `interval`.
async fn retention_loop(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: config::RetentionConfig,
    stop: CancellationToken,
) {
    loop {
        let before = clock
            .now_ms()
            .saturating_sub(config.delivered.as_millis() as u64);
        match store.purge_delivered(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "Purged delivered events past retention."),
            Err(e) => tracing::warn!(error = %e, "Retention purge failed."),
        }
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}

fn load_plugins(runtime: &PluginRuntime, config: &Config) -> anyhow::Result<PluginRegistry> {
    let used = config.used_plugins();
    let dir = &config.plugins.dir;
    let (registry, errors) = match PluginRegistry::load_dir(runtime, dir) {
        Ok(loaded) => loaded,
        Err(e) if used.is_empty() => {
            tracing::warn!(error = %e, "No plugins loaded.");
            (PluginRegistry::from_map(Default::default()), Vec::new())
        }
        Err(e) => return Err(e.into()),
    };
    for error in &errors {
        if let RegistryError::File { path, .. } = error {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            if used.contains(stem) {
                anyhow::bail!("plugin `{stem}` is used by a route but failed to load: {error}");
            }
        }
    }
    let mut missing: Vec<&str> = used
        .into_iter()
        .filter(|n| registry.get(n).is_none())
        .collect();
    missing.sort();
    if !missing.is_empty() {
        anyhow::bail!(
            "routes use plugins that are not in {}: {} (expected files named NAME.wasm)",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(registry)
}
