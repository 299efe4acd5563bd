//! The plugin stage's engine room: the only module that touches wasmtime.
//!
//! State is split by how long it lives: [`PluginRuntime`] (the `Engine` and `Linker`) lives
//! for the process; a [`LoadedPlugin`] (a compiled `Component` and its `InstancePre`) lives
//! for one version of one plugin file; a `Store` lives for one call on one event.

mod bindings;
mod check;
mod convert;
mod host_impl;
mod registry;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store, StoreLimitsBuilder};

pub use bindings::{HANDLER_EXPORT, HOST_IMPORT, WIT_PACKAGE};
pub use check::{CheckReport, check_component};
pub use convert::{PluginDelivery, PluginUpdate, PluginVerdict};
pub use registry::{PluginRegistry, RegistryError};

use bindings::{Plugin, PluginPre};
use host_impl::PluginState;

use crate::event::Event;

/// How often the epoch ticks; plugin deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Limits applied to one call of a plugin.
#[derive(Clone, Copy, Debug)]
pub struct CallLimits {
    /// Wall-clock budget of one call, enforced by epoch interruption.
    pub deadline: Duration,
    /// The most linear memory one instance may grow to, in bytes.
    pub max_memory: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(100),
            max_memory: 64 << 20,
        }
    }
}

/// Why a call of a plugin produced no verdict.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The plugin returned an error on purpose.
    #[error("plugin error: {0}")]
    Plugin(String),
    /// The plugin ran past its deadline and was interrupted.
    #[error("plugin exceeded its deadline of {0:?}")]
    Deadline(Duration),
    /// The plugin trapped (panic, `unreachable`, out of memory, stack overflow, ...).
    #[error("plugin trapped: {0}")]
    Trap(String),
}

/// The process-wide wasmtime state: one `Engine` and one `Linker` with WASI (granting
/// nothing) and the `host` interface.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<PluginState>,
}

impl PluginRuntime {
    /// Builds the engine and starts the epoch ticker that enforces deadlines.
    pub fn new() -> anyhow::Result<Arc<Self>> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.max_wasm_stack(1 << 20);
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;

        // The ticker holds only a weak reference so it ends with the engine.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("switchyard-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;

        Ok(Arc::new(Self { engine, linker }))
    }

    /// Compiles a plugin from a file and checks it against the `plugin` world.
    pub fn load_file(&self, name: &str, path: &Path) -> anyhow::Result<LoadedPlugin> {
        let bytes = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        self.load_bytes(name, &bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
    }

    /// Compiles a plugin from component bytes and checks it against the `plugin` world.
    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> anyhow::Result<LoadedPlugin> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let component = Component::from_binary(&self.engine, bytes)
            .map_err(|e| anyhow::anyhow!("not a valid WebAssembly component: {e:#}"))?;
        let pre = self.link(&component)?;
        Ok(LoadedPlugin {
            name: name.into(),
            sha256,
            pre,
        })
    }

    /// Links a component against the world, explaining a mismatch in plain words.
    fn link(&self, component: &Component) -> anyhow::Result<PluginPre<PluginState>> {
        let linked = self
            .linker
            .instantiate_pre(component)
            .and_then(PluginPre::new);
        linked.map_err(|e| {
            let report = check::diagnose(&self.engine, component);
            if report.problems.is_empty() {
                anyhow::anyhow!("does not fit the {WIT_PACKAGE} world: {e:#}")
            } else {
                anyhow::anyhow!("{}", report.problems.join("; "))
            }
        })
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// One compiled version of one plugin, ready to instantiate.
pub struct LoadedPlugin {
    name: Arc<str>,
    sha256: String,
    pre: PluginPre<PluginState>,
}

impl LoadedPlugin {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SHA-256 of the component file, hex: the plugin's version.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Runs the plugin on one event in a fresh instance. Blocking: call it off the async
    /// runtime (e.g. in `spawn_blocking`).
    pub fn call(
        &self,
        event: &Event,
        config: Arc<[(String, String)]>,
        limits: CallLimits,
    ) -> Result<PluginVerdict, CallError> {
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.max_memory)
            .instances(4)
            .tables(20)
            .memories(4)
            .trap_on_grow_failure(true)
            .build();
        let state = PluginState::new(
            self.name.clone(),
            event.id.to_string(),
            config,
            store_limits,
        );
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        let ticks = (limits.deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();

        let wit_event = convert::to_wit_event(event);
        let result = self.pre.instantiate(&mut store).and_then(|plugin| {
            plugin
                .switchyard_plugin_handler()
                .call_handle(&mut store, &wit_event)
        });
        store.data().flush_output();
        match result {
            Ok(Ok(verdict)) => Ok(convert::from_wit_verdict(verdict)),
            Ok(Err(error)) => Err(CallError::Plugin(convert::plugin_error_message(&error))),
            Err(error) => match error.downcast_ref::<wasmtime::Trap>() {
                Some(wasmtime::Trap::Interrupt) => Err(CallError::Deadline(limits.deadline)),
                _ => Err(CallError::Trap(format!("{error:#}"))),
            },
        }
    }
}
