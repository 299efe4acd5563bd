//! The plugin stage's engine room: the only module that touches wasmtime.
//!
//! State is split by how long it lives: [`PluginRuntime`] (the `Engine` and `Linker`) lives
//! for the process; a [`LoadedPlugin`] (a compiled `Component` and its `InstancePre`) lives
//! for one version of one plugin file; a `Store` lives for one call on one event.

mod answers;
mod bindings;
mod check;
mod convert;
mod host_impl;
mod outbound;
mod registry;
mod state;

use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimitsBuilder,
};

pub use answers::Answers;
pub use bindings::{CONFIG_CHECK_EXPORT, HANDLER_EXPORT, HOST_IMPORT, WIT_PACKAGE};
pub use check::{CheckReport, check_component};
pub use convert::{PluginDelivery, PluginUpdate, PluginVerdict};
pub use outbound::{
    Exchange as HttpExchange, HttpLimits, Origin, Outbound, PluginHttp, Recording,
    Request as HttpRequest, Response as HttpResponse, SendError, Sender as HttpSender, Turn,
    Waiting,
};
pub use registry::{PluginMap, PluginRegistry, PluginStatus};
pub use state::{MAX_KEY_BYTES, PluginStates, Seed as StateSeed, StateLimits};

use bindings::{Plugin, PluginPre};
use host_impl::PluginState;

pub use crate::config::InstanceMode;
use crate::event::Event;

/// How often the epoch ticks; plugin deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Components larger than this (language runtimes: JavaScript, Python) default to warm
/// instances; smaller ones to fresh instances.
const WARM_BY_DEFAULT_ABOVE: usize = 1 << 20;

/// Warm instances kept per plugin, over every configuration, as a multiple of
/// `warm_pool_size` (the most kept for one configuration): the least recently used go first.
const WARM_CONFIGS_KEPT: usize = 4;

/// How much of a pooled memory or table slot is kept resident and reset in place after
/// use (the rest is returned to the kernel).
const KEEP_RESIDENT: usize = 1 << 20;

/// The longest a text a plugin gives is kept — a drop reason, an error, a refusal of a
/// configuration, a trap's backtrace (each stored with an event's outcome or shown by the
/// API, and logged): the rest is cut, saying how much.
const MAX_TEXT: usize = 4096;

/// `text`, cut to [`MAX_TEXT`] bytes (at a character's boundary) if longer.
fn clipped(mut text: String) -> String {
    if text.len() <= MAX_TEXT {
        return text;
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let more = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("… ({more} bytes more)"));
    text
}

/// What one call of a plugin reads besides the event: the route's configuration of the
/// plugin (`host.config`), the config's lookup tables (`host.lookup`), where the plugin's
/// values are kept (`state`), and what it may reach over HTTP (`http`).
#[derive(Clone, Default)]
pub struct CallInput {
    pub config: Arc<[(String, String)]>,
    pub tables: Arc<crate::tables::Tables>,
    pub state: PluginStates,
    pub http: PluginHttp,
}

impl CallInput {
    /// A call with this configuration, no tables and its own state in memory.
    pub fn config(config: Arc<[(String, String)]>) -> Self {
        CallInput {
            config,
            ..Self::default()
        }
    }
}

/// Limits applied to one call of a plugin.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CallLimits {
    /// Wall-clock budget of one call, enforced by epoch interruption.
    pub deadline: Duration,
    /// The most linear memory one instance may grow to, in bytes.
    pub max_memory: usize,
    /// The largest body a verdict may carry.
    pub max_output_bytes: usize,
    /// The most deliveries a `route` verdict may list.
    pub max_deliveries: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(100),
            max_memory: 64 << 20,
            max_output_bytes: 1 << 20,
            max_deliveries: 64,
        }
    }
}

/// How the runtime sizes its instance pool and warm instances.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeOptions {
    /// The largest memory any instance may have (the pool reserves this per slot).
    pub max_memory: usize,
    /// Warm instances kept per configuration of a plugin (a route's entry; four times as
    /// many per plugin).
    pub warm_pool_size: usize,
    /// A warm instance is replaced after this many calls.
    pub warm_recycle_after: u32,
    /// Consecutive failures after which a plugin is degraded.
    pub degraded_after: u32,
}

impl From<&crate::config::PluginsConfig> for RuntimeOptions {
    fn from(p: &crate::config::PluginsConfig) -> Self {
        Self {
            max_memory: p.max_memory_bytes,
            warm_pool_size: p.warm_pool_size,
            warm_recycle_after: p.warm_recycle_after,
            degraded_after: p.degraded_after,
        }
    }
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            max_memory: 64 << 20,
            warm_pool_size: 4,
            warm_recycle_after: 1000,
            degraded_after: 5,
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
    /// The verdict broke an output limit.
    #[error("plugin output over the limit: {0}")]
    Output(String),
}

/// The process-wide wasmtime state: one `Engine` (with a pooling allocator) and one
/// `Linker` with WASI (granting nothing) and the `host` interface.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<PluginState>,
    options: RuntimeOptions,
}

impl PluginRuntime {
    /// Builds the engine and starts the epoch ticker that enforces deadlines.
    pub fn new() -> anyhow::Result<Arc<Self>> {
        Self::with_options(RuntimeOptions::default())
    }

    pub fn with_options(options: RuntimeOptions) -> anyhow::Result<Arc<Self>> {
        let mut config = wasmtime::Config::new();
        // Calls run on fibers (`call_async`) and yield to the async runtime at each epoch
        // tick: a plugin that runs long (up to its deadline) shares the runtime's threads
        // with the rest of the gateway instead of needing a thread of its own.
        config.epoch_interruption(true);
        config.max_wasm_stack(1 << 20);
        // Instances come from a pool of pre-reserved slots, with copy-on-write memory images:
        // a fresh instance per event costs microseconds, not a round of mmaps.
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(1000)
            .total_core_instances(2000)
            .total_memories(1000)
            .total_tables(1000)
            .max_memory_size(options.max_memory)
            // Reset a used slot by rewriting only the pages the call dirtied (found with
            // the kernel's PAGEMAP_SCAN, Linux 6.7+) instead of `madvise`-ing the memory
            // away: no TLB-shootdown IPIs to the other cores and no page faults when the
            // next instance touches the same pages. Where the kernel lacks it, `madvise`
            // as before.
            .pagemap_scan(Enabled::Auto)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .async_stack_keep_resident(KEEP_RESIDENT);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;

        // The ticker holds only a weak reference so it ends with the engine.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;

        Ok(Arc::new(Self {
            engine,
            linker,
            options,
        }))
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
        self.load_cached(name, bytes, None)
    }

    /// As [`PluginRuntime::load_bytes`], reusing the compiled code cached in `cache_dir`
    /// (keyed by the file's SHA-256 and the engine's compatibility hash) and caching what it
    /// compiles. The cache dir must be as trusted as the gateway's own files: its contents
    /// are loaded as native code.
    pub fn load_cached(
        &self,
        name: &str,
        bytes: &[u8],
        cache_dir: Option<&Path>,
    ) -> anyhow::Result<LoadedPlugin> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let cache_file =
            cache_dir.map(|d| d.join(format!("{sha256}-{}.cwasm", self.compatibility_hash())));
        let cached = cache_file.as_deref().filter(|f| f.is_file()).and_then(|f| {
            // SAFETY: the file was written by `Component::serialize` of an engine with the
            // same compatibility hash, into the gateway's own data dir.
            match unsafe { Component::deserialize_file(&self.engine, f) } {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(plugin = name, file = %f.display(), error = %e, "Ignoring a bad compiled-plugin cache entry.");
                    None
                }
            }
        });
        let from_cache = cached.is_some();
        let component = match cached {
            Some(c) => c,
            None => {
                let c = Component::from_binary(&self.engine, bytes)
                    .map_err(|e| anyhow::anyhow!("not a valid WebAssembly component: {e:#}"))?;
                if let Some(f) = &cache_file {
                    write_cache(&c, f);
                }
                c
            }
        };
        let pre = self.link(&component)?;
        let imports = |prefix: &str| {
            (component.component_type().imports(&self.engine))
                .any(|(import, _)| import.starts_with(prefix))
        };
        let (stateful, sends_http) = (
            imports("switchyard:plugin/state@"),
            imports("switchyard:plugin/http@"),
        );
        // (Any 0.1.x: looked up by this gateway's name, which the instance matches to it.)
        let checks_config = (component.component_type().exports(&self.engine))
            .any(|(export, _)| export.starts_with("switchyard:plugin/config-check@0.1."));
        Ok(LoadedPlugin {
            stateful,
            sends_http,
            checks_config,
            name: name.into(),
            sha256,
            size: bytes.len(),
            pre,
            options: self.options,
            warm: Mutex::new(Vec::new()),
            consecutive_failures: AtomicU32::new(0),
            calls: AtomicU64::new(0),
            call_micros: AtomicU64::new(0),
            from_cache,
        })
    }

    /// Deletes from `cache_dir` the compiled code of every plugin version but `keep` (the
    /// SHA-256s of those in force) and of other engines (an older gateway's), and temp
    /// files a crash left behind. Without it the cache grew by a compiled copy of each
    /// version ever loaded — tens of MB for a JavaScript or Python plugin, each deploy.
    /// A version reloaded later is compiled again.
    pub fn prune_cache<'a>(&self, cache_dir: &Path, keep: impl IntoIterator<Item = &'a str>) {
        let suffix = format!("-{}.cwasm", self.compatibility_hash());
        let keep: std::collections::HashSet<String> = keep
            .into_iter()
            .map(|sha| format!("{sha}{suffix}"))
            .collect();
        let Ok(entries) = std::fs::read_dir(cache_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = if name.ends_with(".cwasm") {
                !keep.contains(&name)
            } else {
                // A write in progress (another process's, on a shared data dir) is young.
                name.contains(".tmp")
                    && entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_TEMP))
            };
            if !stale {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::debug!(file = %name, "Pruned from the compiled-plugin cache."),
                Err(e) => {
                    tracing::warn!(file = %name, error = %e, "Cannot prune the compiled-plugin cache.")
                }
            }
        }
    }

    /// A short hex digest of what makes compiled code loadable by this engine.
    fn compatibility_hash(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        format!("{:016x}", h.finish())
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

/// How old a temp file in the compiled-plugin cache must be to be a crash's leftover.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Writes a compiled component to the cache, atomically (temp file, then rename).
fn write_cache(component: &Component, file: &Path) {
    let result = component
        .serialize()
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            let dir = file.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            let tmp = file.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, bytes)
                .and_then(|_| std::fs::rename(&tmp, file))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = result {
        tracing::warn!(file = %file.display(), error = %e, "Cannot cache a compiled plugin.");
    }
}

/// An instance kept for reuse, with the limits it was made with and the configuration it
/// serves: a route's entry (its `config`, by identity) — what one route's code leaves in
/// the instance's memory (a JavaScript global, a cache) is never seen by another route's.
/// (A weak reference: it keeps no configuration alive, and its allocation's address is
/// not reused while it is held.)
struct WarmInstance {
    store: Store<PluginState>,
    plugin: Plugin,
    max_memory: usize,
    config: Weak<[(String, String)]>,
    calls: u32,
}

impl WarmInstance {
    fn serves(&self, config: &Arc<[(String, String)]>, max_memory: usize) -> bool {
        self.max_memory == max_memory
            && std::ptr::addr_eq(self.config.as_ptr(), Arc::as_ptr(config))
    }
}

/// One compiled version of one plugin, ready to instantiate.
pub struct LoadedPlugin {
    name: Arc<str>,
    sha256: String,
    size: usize,
    pre: PluginPre<PluginState>,
    options: RuntimeOptions,
    warm: Mutex<Vec<WarmInstance>>,
    consecutive_failures: AtomicU32,
    /// Calls of this version, and their total duration: the mean call latency.
    calls: AtomicU64,
    call_micros: AtomicU64,
    from_cache: bool,
    /// Whether it imports `state` (keeps values between events).
    stateful: bool,
    /// Whether it imports `http` (may send requests, where a route allows).
    sends_http: bool,
    /// Whether it exports `config-check` (its configurations are checked before use).
    checks_config: bool,
}

impl LoadedPlugin {
    /// Whether the plugin imports the `state` interface: it may keep values between events.
    pub fn stateful(&self) -> bool {
        self.stateful
    }

    /// Whether the plugin imports the `http` interface: it may send HTTP requests to the
    /// origins a route allows it.
    pub fn sends_http(&self) -> bool {
        self.sends_http
    }

    /// Whether the plugin exports the `config-check` interface: a route's configuration of
    /// it is checked before any event meets it ([`LoadedPlugin::check_config`]).
    pub fn checks_config(&self) -> bool {
        self.checks_config
    }

    /// Asks the plugin whether `input.config` is a configuration it can work with (WIT
    /// `config-check`, since 0.1.4), on an instance of its own under `limits`: `Ok` if it
    /// says so or does not export the check, else what is wrong — in its words, or the
    /// trap or deadline that ended the check. Not counted in the call statistics.
    pub async fn check_config(&self, input: CallInput, limits: CallLimits) -> Result<(), String> {
        if !self.checks_config {
            return Ok(());
        }
        let mut store = self.new_store("config-check".into(), input, limits.max_memory);
        set_deadline(&mut store, limits.deadline);
        let result: wasmtime::Result<Result<(), String>> = async {
            let instance = (self.pre.instance_pre())
                .instantiate_async(&mut store)
                .await?;
            let missing = || wasmtime::format_err!("no `check` in `{CONFIG_CHECK_EXPORT}`");
            let interface = (instance.get_export_index(&mut store, None, CONFIG_CHECK_EXPORT))
                .ok_or_else(missing)?;
            let check = (instance.get_export_index(&mut store, Some(&interface), "check"))
                .ok_or_else(missing)?;
            let check = instance.get_typed_func::<(), (Result<(), String>,)>(&mut store, &check)?;
            let (answer,) = check.call_async(&mut store, ()).await?;
            Ok(answer)
        }
        .await;
        store.data().flush_output();
        match result {
            Ok(answer) => {
                answer.map_err(|m| clipped(crate::managed::redact_query_secrets(&m).into_owned()))
            }
            Err(error) => Err(match error.downcast_ref::<wasmtime::Trap>() {
                Some(wasmtime::Trap::Interrupt) => {
                    format!("the check ran past the deadline of {:?}", limits.deadline)
                }
                _ => {
                    let error = format!("{error:#}");
                    clipped(format!(
                        "the check trapped: {}",
                        crate::managed::redact_query_secrets(&error)
                    ))
                }
            }),
        }
    }

    /// Whether the compiled code came from the cache (no compilation).
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SHA-256 of the component file, hex: the plugin's version.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The instance mode used when a route does not choose one.
    pub fn default_mode(&self) -> InstanceMode {
        if self.size > WARM_BY_DEFAULT_ABOVE {
            InstanceMode::Warm
        } else {
            InstanceMode::Fresh
        }
    }

    /// Failures in a row, up to now.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Calls of this version so far, and their mean duration in microseconds.
    pub fn call_stats(&self) -> (u64, u64) {
        let calls = self.calls.load(Ordering::Relaxed);
        let micros = self.call_micros.load(Ordering::Relaxed);
        (calls, micros.checked_div(calls).unwrap_or(0))
    }

    /// Whether the plugin has failed `degraded_after` times in a row.
    pub fn degraded(&self) -> bool {
        self.consecutive_failures() >= self.options.degraded_after
    }

    /// Runs the plugin on one event, counting the call in the plugin's statistics and
    /// its failures in a row (`degraded`). The guest runs on a fiber of the calling task
    /// and yields at each epoch tick, so a call never holds a runtime thread for long.
    pub async fn call(
        &self,
        event: &Event,
        input: CallInput,
        limits: CallLimits,
        mode: InstanceMode,
    ) -> Result<PluginVerdict, CallError> {
        let started = std::time::Instant::now();
        let result = self.call_uncounted(event, input, limits, mode).await;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.call_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.note_outcome(result.is_ok());
        result
    }

    /// Runs the plugin on one event as [`LoadedPlugin::call`] does, without counting the
    /// call anywhere: for dry runs, whose payloads are someone's experiments.
    pub async fn call_uncounted(
        &self,
        event: &Event,
        input: CallInput,
        limits: CallLimits,
        mode: InstanceMode,
    ) -> Result<PluginVerdict, CallError> {
        match mode {
            InstanceMode::Fresh => self.call_fresh(event, input, limits).await,
            InstanceMode::Warm => self.call_warm(event, input, limits).await,
        }
        .and_then(|v| check_output(v, &limits))
    }

    fn note_outcome(&self, ok: bool) {
        let threshold = self.options.degraded_after;
        if ok {
            if self.consecutive_failures.swap(0, Ordering::Relaxed) >= threshold {
                tracing::info!(plugin = %self.name, sha256 = %self.sha256, "Plugin recovered.");
            }
        } else if self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1 == threshold {
            tracing::warn!(plugin = %self.name, sha256 = %self.sha256, failures = threshold, "Plugin degraded.");
        }
    }

    fn new_store(&self, call: String, input: CallInput, max_memory: usize) -> Store<PluginState> {
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(max_memory)
            .instances(20)
            .tables(20)
            .memories(20)
            .trap_on_grow_failure(true)
            .build();
        let state = PluginState::new(self.name.clone(), call, input, store_limits);
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        store
    }

    async fn call_fresh(
        &self,
        event: &Event,
        input: CallInput,
        limits: CallLimits,
    ) -> Result<PluginVerdict, CallError> {
        let mut store = self.new_store(event.id.to_string(), input, limits.max_memory);
        set_deadline(&mut store, limits.deadline);
        let result = match self.pre.instantiate_async(&mut store).await {
            Ok(plugin) => invoke(&plugin, &mut store, event).await,
            Err(e) => Err(e),
        };
        store.data().flush_output();
        classify(result, limits.deadline)
    }

    async fn call_warm(
        &self,
        event: &Event,
        input: CallInput,
        limits: CallLimits,
    ) -> Result<PluginVerdict, CallError> {
        let config = input.config.clone();
        let reused = {
            let mut pool = self.warm.lock().unwrap_or_else(|e| e.into_inner());
            let at = (pool.iter()).rposition(|w| w.serves(&config, limits.max_memory));
            at.map(|i| pool.remove(i))
        };
        let mut warm = match reused {
            Some(mut w) => {
                w.store.data_mut().begin_call(event.id.to_string(), input);
                w
            }
            None => {
                let mut store = self.new_store(event.id.to_string(), input, limits.max_memory);
                set_deadline(&mut store, limits.deadline);
                let plugin = match self.pre.instantiate_async(&mut store).await {
                    Ok(p) => p,
                    Err(e) => return classify(Err(e), limits.deadline),
                };
                WarmInstance {
                    store,
                    plugin,
                    max_memory: limits.max_memory,
                    config: Arc::downgrade(&config),
                    calls: 0,
                }
            }
        };
        set_deadline(&mut warm.store, limits.deadline);
        let result = invoke(&warm.plugin, &mut warm.store, event).await;
        warm.store.data().flush_output();
        warm.calls += 1;
        // A trapped instance is never reused: its memory may be in any state.
        let trapped = result.is_err();
        if !trapped && warm.calls < self.options.warm_recycle_after {
            // (Waiting, it holds no config or tables: a reload's old ones go at once.)
            warm.store.data_mut().end_call();
            let size = self.options.warm_pool_size;
            let mut pool = self.warm.lock().unwrap_or_else(|e| e.into_inner());
            drop_stale(&mut pool);
            let same = (pool.iter())
                .filter(|w| w.serves(&config, limits.max_memory))
                .count();
            if same < size {
                // The pool is in order of use, the least recent first.
                if pool.len() >= size * WARM_CONFIGS_KEPT {
                    pool.remove(0);
                }
                pool.push(warm);
            }
        }
        classify(result, limits.deadline)
    }

    /// How many warm instances wait for reuse.
    pub fn warm_instances(&self) -> usize {
        self.warm.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Drops the warm instances of configurations no longer in force. Called when the
    /// routes in force change, so that a plugin no longer called (its route deleted or
    /// changed) does not keep them and their memory; an instance given back does it too.
    pub fn drop_stale_instances(&self) {
        drop_stale(&mut self.warm.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Drops from a warm pool the instances of configurations no longer in force (a route's
/// old entry, a reload's, a dry run's): none can be called with them again.
fn drop_stale(pool: &mut Vec<WarmInstance>) {
    pool.retain(|w| w.config.strong_count() > 0);
}

/// Arms the call's deadline: at every epoch tick the guest yields to the runtime, and the
/// tick that reaches the deadline interrupts it (a `Trap::Interrupt`).
fn set_deadline(store: &mut Store<PluginState>, deadline: Duration) {
    let mut ticks_left = (deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        ticks_left -= 1;
        if ticks_left == 0 {
            Err(wasmtime::Trap::Interrupt.into())
        } else {
            Ok(wasmtime::UpdateDeadline::Yield(1))
        }
    });
}

type RawResult = wasmtime::Result<Result<bindings::Verdict, bindings::PluginError>>;

async fn invoke(plugin: &Plugin, store: &mut Store<PluginState>, event: &Event) -> RawResult {
    let wit_event = convert::to_wit_event(event);
    plugin
        .switchyard_plugin_handler()
        .call_handle(store, &wit_event)
        .await
}

fn classify(result: RawResult, deadline: Duration) -> Result<PluginVerdict, CallError> {
    match result {
        Ok(Ok(verdict)) => Ok(convert::from_wit_verdict(verdict)),
        Ok(Err(error)) => Err(CallError::Plugin(clipped(convert::plugin_error_message(
            &error,
        )))),
        Err(error) => match error.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => Err(CallError::Deadline(deadline)),
            _ => Err(CallError::Trap(clipped(
                crate::managed::redact_query_secrets(&format!("{error:#}")).into_owned(),
            ))),
        },
    }
}

/// Enforces the output caps on a verdict: each body, and what comes besides — metadata,
/// headers, content types, destination names — at most `max_output_bytes` each; the
/// number of deliveries; a drop reason cut to [`MAX_TEXT`].
fn check_output(verdict: PluginVerdict, limits: &CallLimits) -> Result<PluginVerdict, CallError> {
    let pairs = |p: &crate::event::Pairs| p.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    let besides = match &verdict {
        PluginVerdict::Drop { .. } => 0,
        PluginVerdict::Continue(u) => {
            pairs(&u.metadata)
                + u.headers.as_ref().map_or(0, pairs)
                + u.content_type.as_ref().map_or(0, String::len)
        }
        PluginVerdict::Route { deliveries } => (deliveries.iter())
            .map(|d| {
                pairs(&d.metadata)
                    + pairs(&d.headers)
                    + d.destination.len()
                    + d.content_type.as_ref().map_or(0, String::len)
            })
            .sum(),
    };
    if besides > limits.max_output_bytes {
        return Err(CallError::Output(format!(
            "metadata, headers and names of {besides} bytes are more than {} bytes",
            limits.max_output_bytes
        )));
    }
    let verdict = match verdict {
        PluginVerdict::Drop { reason } => PluginVerdict::Drop {
            reason: clipped(reason),
        },
        verdict => verdict,
    };
    let too_big = |len: usize| {
        Err(CallError::Output(format!(
            "a body of {len} bytes is larger than {} bytes",
            limits.max_output_bytes
        )))
    };
    match &verdict {
        PluginVerdict::Continue(u) => {
            if let Some(b) = &u.body
                && b.0.len() > limits.max_output_bytes
            {
                return too_big(b.0.len());
            }
        }
        PluginVerdict::Route { deliveries } => {
            if deliveries.len() > limits.max_deliveries {
                return Err(CallError::Output(format!(
                    "{} deliveries are more than {}",
                    deliveries.len(),
                    limits.max_deliveries
                )));
            }
            for d in deliveries {
                if let Some(b) = &d.body
                    && b.0.len() > limits.max_output_bytes
                {
                    return too_big(b.0.len());
                }
            }
        }
        PluginVerdict::Drop { .. } => {}
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A text over the limit is cut at a character's boundary, saying how much is left out;
    /// one within it is kept whole.
    #[test]
    fn long_texts_are_cut_at_a_characters_boundary() {
        let text = format!("a{}", "é".repeat(3000));
        let cut = clipped(text.clone());
        // (Byte 4096 falls inside an `é`: the cut is before it.)
        assert_eq!(cut, format!("{}… (1906 bytes more)", &text[..4095]));
        let short = "é".repeat(2048);
        assert_eq!(clipped(short.clone()), short);
    }
}
