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

use crate::delivery::Deliverer;
use crate::pipeline::{Pipeline, Routing};
use crate::plugin::{CallLimits, PluginRegistry, PluginRuntime, RegistryError};
use crate::store::{MemoryStore, Store};

/// A gateway whose plugins are loaded and whose stages are built, ready to serve.
pub struct Gateway {
    config: Config,
    store: Arc<dyn Store>,
    pipeline: Arc<Pipeline>,
}

impl Gateway {
    /// Loads the plugins and builds the stages. Fails, naming the file, when a plugin that
    /// a route uses cannot be loaded.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let runtime = PluginRuntime::new().context("cannot start the WebAssembly engine")?;
        let plugins = load_plugins(&runtime, &config)?;
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(config.server.queue_capacity));
        let limits = CallLimits {
            deadline: config.plugins.deadline,
            max_memory: config.plugins.max_memory_bytes,
        };
        let deliverer =
            Deliverer::new(config.delivery.clone()).context("cannot build the HTTP client")?;
        let pipeline = Pipeline::new(
            store.clone(),
            Arc::new(plugins),
            Routing::from_config(&config),
            limits,
            deliverer,
        );
        Ok(Self {
            config,
            store,
            pipeline,
        })
    }

    /// Serves on `listener` until `shutdown` completes, then stops accepting, processes the
    /// events already accepted and waits for their deliveries.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        let pipeline = tokio::spawn(self.pipeline.clone().run(workers));
        let app = api::router(api::AppState {
            pipeline: self.pipeline.clone(),
            store: self.store.clone(),
            max_body_bytes: self.config.server.max_body_bytes,
        });
        tracing::info!(address = %listener.local_addr()?, "Switchyard is listening.");
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("HTTP server failed")?;
        tracing::info!("Shutting down: finishing accepted events and deliveries.");
        self.store.close();
        pipeline.await.context("pipeline ended abnormally")?;
        tracing::info!("Shutdown complete.");
        Ok(())
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
