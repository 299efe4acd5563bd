//! Hot reload: the one path by which plugins and config change while the gateway runs.
//!
//! Startup is a reload from empty; the file watcher (debounced), SIGHUP and
//! `POST /v1/reload` all call [`Reloader::reload`]. A reload compiles off the request path,
//! checks every component against the world, and swaps plugins, routes and destinations
//! at once. What fails keeps the previous version serving: a file that does not load, a
//! config that does not validate, a plugin a route uses that vanished from disk.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RouteConfig};
use crate::delivery::{Dispatcher, now_ms};
use crate::managed::{Change, ChangeError, Managed};
use crate::metrics::{Metrics, ResultLabels};
use crate::pipeline::{Pipeline, Routing};
use crate::plugin::{PluginMap, PluginRegistry, PluginRuntime, PluginStatus};
use crate::seal::{Found, Sealer};
use crate::store::{ManagedObject, Store};

/// How long the watcher waits for a burst of file events to end before reloading: editors
/// and `cp` write files in pieces.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// How often a gateway on a shared store looks for other instances' changes.
const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Reads an environment variable for `${VAR}` in a reloaded config.
pub type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What a reload did.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadReport {
    pub reason: String,
    /// `unchanged` (no config file to read), `applied`, or `rejected` (see `config_error`;
    /// the previous config keeps serving).
    pub config: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    /// Why the store's body field indexes could not be brought in line with
    /// `store.indexed_fields` (the config is in force; the next reload tries again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_error: Option<String>,
    /// Why the managed objects could not be read from the store, or opened (sealed with a
    /// key the config no longer names: the config is then rejected); the ones in memory
    /// keep serving. A start stops on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_error: Option<String>,
    /// What is wrong with routes made through the management API: a plugin one uses that
    /// is not loaded, or that refuses the configuration the route gives it (a new version
    /// put in since the route was made, with none before it to keep serving). Logged and
    /// listed here, never a reason to reject the config or stop a start — such a route is
    /// mended through the API, which needs the gateway up — and its events fail at that
    /// plugin (kept as its `on_error` says, to replay) until it is.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub route_errors: Vec<String>,
    pub plugins: BTreeMap<String, PluginStatus>,
}

/// Owns the live config and performs reloads, one at a time.
pub struct Reloader {
    runtime: Arc<PluginRuntime>,
    registry: Arc<PluginRegistry>,
    pipeline: Arc<Pipeline>,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    /// The config in force: the file's objects and the managed ones.
    config: ArcSwap<Config>,
    /// The last config file that loaded (or the config the gateway started with).
    file: ArcSwap<Config>,
    /// The objects made through the management API.
    managed: ArcSwap<Managed>,
    source: Mutex<Option<(PathBuf, Env)>>,
    busy: tokio::sync::Mutex<()>,
    /// The body fields the store's indexes were last brought in line with
    /// (`store.indexed_fields`; a reload whose indexing failed tries again at the next),
    /// locked while they are built — apart from `busy`: a build reads every event stored
    /// (minutes, on a large PostgreSQL store), and API changes and reloads go on meanwhile.
    indexed: tokio::sync::Mutex<Vec<String>>,
    /// What routes' plugins said of their configurations.
    checks: ConfigChecks,
    /// Why routes made through the API cannot work as they are, by route name, as the last
    /// reload found (`ReloadReport::route_errors`); a route changed or deleted since is
    /// not in it.
    route_errors: ArcSwap<HashMap<String, String>>,
    /// Told each time a config is put in force, so the file watcher follows its files.
    installed: tokio::sync::Notify,
}

impl Reloader {
    pub fn new(
        runtime: Arc<PluginRuntime>,
        registry: Arc<PluginRegistry>,
        pipeline: Arc<Pipeline>,
        dispatcher: Arc<Dispatcher>,
        metrics: Arc<Metrics>,
        store: Arc<dyn Store>,
        config: Arc<Config>,
    ) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            registry,
            pipeline,
            dispatcher,
            metrics,
            store,
            managed: ArcSwap::from_pointee(Managed::default()),
            source: Mutex::new(None),
            busy: tokio::sync::Mutex::new(()),
            indexed: tokio::sync::Mutex::new(config.store.indexed_fields.clone()),
            checks: ConfigChecks::default(),
            route_errors: ArcSwap::default(),
            installed: tokio::sync::Notify::new(),
            config: ArcSwap::new(config.clone()),
            file: ArcSwap::new(config),
        })
    }

    /// Each plugin configuration of the config in force that its plugin refuses (WIT
    /// `config-check`). A start stops on any; what passes is not checked again by later
    /// reloads.
    pub async fn refused_plugin_configs(&self) -> Vec<Refusal> {
        let config = self.config();
        (self.checks)
            .refused(&config, &self.registry.snapshot(), None)
            .await
    }

    /// The configurations `config`'s routes give their plugins (`plugins`, as a scan left
    /// them) that the plugins refuse — but for those refused by a new version of a plugin,
    /// whose serving version goes on instead (as when a new version does not load), its
    /// status saying why: the plugin is changed back, not the config.
    async fn keep_accepting(
        &self,
        config: &Config,
        plugins: &mut PluginMap,
        statuses: &mut BTreeMap<String, PluginStatus>,
    ) -> Vec<Refusal> {
        let (serving, before) = (self.registry.snapshot(), self.registry.statuses());
        let new = |plugins: &PluginMap, name: &str| {
            let (now, was) = (plugins.get(name)?, serving.get(name)?);
            (now.sha256() != was.sha256()).then(|| now.sha256().to_string())
        };
        let refused = self.checks.refused(config, plugins, None).await;
        let mut kept = HashSet::new();
        for refusal in &refused {
            if kept.contains(&refusal.plugin) {
                continue;
            }
            let Some(sha256) = new(plugins, &refusal.plugin) else {
                continue;
            };
            tracing::error!(plugin = %refusal.plugin, sha256, error = %refusal,
                "A new version of a plugin refuses a configuration a route gives it; the version serving goes on.");
            let name = refusal.plugin.clone();
            keep_or_fail(
                plugins,
                statuses,
                &serving,
                &name,
                format!("refuses `{}`: {}", refusal.key, refusal.message),
                Some(sha256),
                before.get(&name).and_then(|s| s.loaded_at),
            );
            kept.insert(name);
        }
        if kept.is_empty() {
            return refused;
        }
        // What the versions put back say of the config (e.g. of a config changed with them).
        self.checks.refused(config, plugins, None).await
    }

    /// Re-reads this file (with this environment) on every reload.
    pub fn set_config_file(&self, path: PathBuf, env: Env) {
        *self.source.lock().unwrap_or_else(|e| e.into_inner()) = Some((path, env));
    }

    fn config_file(&self) -> Option<(PathBuf, Env)> {
        self.source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The config now in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The objects made through the management API.
    pub fn managed(&self) -> Arc<Managed> {
        self.managed.load_full()
    }

    /// Why a route made through the API cannot work as it is (its plugin missing, or
    /// refusing its configuration): its events fail at that plugin until it is changed.
    pub fn route_error(&self, route: &str) -> Option<String> {
        self.route_errors.load().get(route).cloned()
    }

    /// The routes changed (or deleted) were checked as they came into force: what was
    /// said of them before no longer stands.
    fn forget_route_errors<'a>(&self, routes: impl IntoIterator<Item = &'a str>) {
        let mut errors = HashMap::clone(&self.route_errors.load());
        let before = errors.len();
        for route in routes {
            errors.remove(route);
        }
        if errors.len() != before {
            self.metrics.broken_routes.set(errors.len() as i64);
            self.route_errors.store(Arc::new(errors));
        }
    }

    /// Applies a change made through the management API: checked against the whole
    /// config (and the loaded plugins), persisted, then swapped in like a reload.
    pub async fn apply(&self, change: Change) -> Result<Arc<Config>, ChangeError> {
        let _one_at_a_time = self.busy.lock().await;
        let file = self.file.load_full();
        let (managed, config) = self.managed.load().apply(&file, &change)?;
        let plugins = self.registry.snapshot();
        // (Only the route changed: another made through the API may be broken already —
        // see `ReloadReport::route_errors` — and is mended on its own.)
        let changed = |r: &RouteConfig| {
            matches!(&change, Change::Create(o) | Change::Update(o)
                if o.kind() == crate::managed::Kind::Route && o.name() == r.name)
        };
        if let Some((_, key, message)) = missing_plugins(&config, &plugins, changed).next() {
            return Err(managed.blame(&file, &change, &key, message));
        }
        if let Change::Create(o) | Change::Update(o) = &change
            && o.kind() == crate::managed::Kind::Route
            && let Some(refusal) = (self.checks.refused(&config, &plugins, Some(o.name())))
                .await
                .into_iter()
                .next()
        {
            return Err(managed.blame(&file, &change, &refusal.key, refusal.message));
        }
        match change.stored() {
            Ok(object) => {
                let sealed = Sealer::new(&file.store).seal(object);
                self.store.put_managed(sealed, now_ms()).await?
            }
            Err((kind, name)) => self.store.delete_managed(kind.as_str(), &name).await?,
        }
        tracing::info!(
            kind = change.kind().as_str(),
            name = change.name(),
            change = match change {
                Change::Create(_) => "created",
                Change::Update(_) => "updated",
                Change::Delete(..) => "deleted",
            },
            "Managed object changed."
        );
        let config = Arc::new(config);
        self.managed.store(Arc::new(managed));
        if change.kind() == crate::managed::Kind::Route {
            self.forget_route_errors([change.name()]);
        }
        self.install(config.clone()).await;
        Ok(config)
    }

    /// Makes `config` the one in force: the delivery transport and concurrency (if they
    /// changed), routing, destinations and the config itself.
    async fn install(&self, config: Arc<Config>) {
        self.dispatcher.set_transport(&config.delivery);
        self.dispatcher.set_concurrency(&config.delivery);
        let routing = Arc::new(Routing::from_config(
            config.clone(),
            Some(&self.pipeline.routing()),
        ));
        self.dispatcher
            .set_destinations(
                routing.destinations().clone(),
                routing.longest_timeout(),
                config.delivery.notify_source.clone(),
            )
            .await;
        self.metrics
            .forget_removed_sources(|s| routing.has_source(s));
        self.pipeline.set_routing(routing);
        self.config.store(config);
        // Warm instances of the entries just put out of force go now (those an event in
        // flight still holds, when it gives them back).
        for plugin in self.registry.snapshot().values() {
            plugin.drop_stale_instances();
        }
        self.installed.notify_one();
    }

    /// Reloads the config file (if any), the managed objects and the plugin directory, and
    /// swaps in what loaded.
    pub async fn reload(&self, reason: &str) -> ReloadReport {
        let one_at_a_time = self.busy.lock().await;
        let old = self.config();
        let (mut file, mut config_error, mut outcome) = (self.file.load_full(), None, "unchanged");
        if let Some((path, env)) = self.config_file() {
            match Config::load(&path, &*env) {
                Ok(c) => {
                    file = Arc::new(c);
                    outcome = "applied";
                }
                Err(e) => {
                    config_error = Some(e.to_string());
                    outcome = "rejected";
                }
            }
        }
        let mut stale = Vec::new();
        let (managed, managed_error) = match self.read_managed(&file).await {
            Ok((objects, found_stale)) => {
                stale = found_stale;
                (Arc::new(Managed::from_stored(&objects)), None)
            }
            Err((sealed, e)) => {
                tracing::error!(error = %e, "Cannot read the managed objects; keeping the ones in memory.");
                if sealed {
                    config_error = Some(e.clone());
                    outcome = "rejected";
                }
                (self.managed.load_full(), Some(e))
            }
        };
        let mut config = old.clone();
        if outcome != "rejected" {
            match managed.merged_with(&file, None) {
                Ok(c) => config = Arc::new(c),
                Err((key, message)) => {
                    config_error = Some(format!("key `{key}`: {message}"));
                    outcome = "rejected";
                }
            }
        }
        let start_only = [
            ("server.listen", config.server.listen != old.server.listen),
            (
                "server.data_dir",
                config.server.data_dir != old.server.data_dir,
            ),
            (
                "server.queue_capacity",
                config.server.queue_capacity != old.server.queue_capacity,
            ),
            (
                "server.queue_max_bytes",
                config.server.queue_max_bytes != old.server.queue_max_bytes,
            ),
            ("store.url", config.store.url != old.store.url),
            ("store.lease", config.store.lease != old.store.lease),
        ];
        for (key, _) in start_only.iter().filter(|(_, changed)| *changed) {
            tracing::warn!(key, "Changed, but takes effect at the next start only.");
        }

        // Keep what either config's routes use: a rejected config falls back to the old one.
        let used: HashSet<String> = old
            .used_plugins()
            .into_iter()
            .chain(config.used_plugins())
            .map(String::from)
            .collect();
        let (runtime, current, previous) = (
            self.runtime.clone(),
            self.registry.snapshot(),
            self.registry.statuses(),
        );
        let current_versions: Vec<(String, String)> = current
            .iter()
            .map(|(name, p)| (name.clone(), p.sha256().to_string()))
            .collect();
        let dir = config.plugins.dir.clone();
        let cache = config.server.data_dir.join("plugin-cache");
        let scanned = {
            let cache = cache.clone();
            tokio::task::spawn_blocking(move || {
                scan(&runtime, &dir, &current, &previous, &used, Some(&cache))
            })
            .await
        };
        let (mut plugins, mut statuses) = match scanned {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "Plugin scan failed; nothing changed.");
                return ReloadReport {
                    reason: reason.into(),
                    config: "rejected",
                    config_error: Some(format!("plugin scan failed: {e}")),
                    index_error: None,
                    managed_error: None,
                    route_errors: Vec::new(),
                    plugins: self.registry.statuses(),
                };
            }
        };

        // What a new file's routes need must be there (an unchanged file's were checked
        // when it came); what the API's routes lack is said (`route_errors`, at a start
        // too) and fails their events.
        let from_api = |r: &RouteConfig| managed.contains(crate::managed::Kind::Route, &r.name);
        let mut route_errors = Vec::new();
        if outcome != "rejected" {
            for (route, key, message) in missing_plugins(&config, &plugins, |_| true) {
                if !from_api(route) {
                    if outcome == "applied" {
                        config_error = Some(format!("key `{key}`: {message}"));
                        outcome = "rejected";
                        break;
                    }
                    continue;
                }
                route_errors.push((route.name.clone(), api_route_error(route, &key, &message)));
            }
        }
        // Routes' plugin configurations, as their plugins (new versions included) see them.
        if outcome != "rejected" {
            for refusal in self
                .keep_accepting(&config, &mut plugins, &mut statuses)
                .await
            {
                let route = &config.routes[refusal.route];
                if !from_api(route) {
                    if outcome == "applied" {
                        config_error = Some(format!("key `{}`: {}", refusal.key, refusal.message));
                        outcome = "rejected";
                        break;
                    }
                    continue;
                }
                route_errors.push((
                    route.name.clone(),
                    api_route_error(route, &refusal.key, &refusal.message),
                ));
            }
        }
        if outcome == "rejected" {
            route_errors.clear();
        } else {
            // (A route's first error is the one shown on it.)
            let mut by_route = HashMap::new();
            for (route, error) in route_errors.iter().rev() {
                by_route.insert(route.clone(), error.clone());
            }
            self.metrics.broken_routes.set(by_route.len() as i64);
            self.route_errors.store(Arc::new(by_route));
        }
        for (_, error) in &route_errors {
            tracing::error!(
                reason,
                error,
                "A route made through the API cannot work as it is; its events fail at the plugin until it is changed."
            );
        }
        if outcome == "rejected" {
            tracing::error!(
                reason,
                error = config_error.as_deref().unwrap_or(""),
                "Config change rejected; the previous config keeps serving."
            );
            config = old;
            // (The config in force again: a new plugin version that refuses it is put back.)
            self.keep_accepting(&config, &mut plugins, &mut statuses)
                .await;
        }
        // What serves after this reload is what the scan kept or loaded, and was not put back.
        let (runtime, keep) = (
            self.runtime.clone(),
            (plugins.values())
                .map(|p| p.sha256().to_string())
                .collect::<Vec<_>>(),
        );
        let pruned = tokio::task::spawn_blocking(move || {
            runtime.prune_cache(&cache, keep.iter().map(String::as_str))
        });
        if let Err(e) = pruned.await {
            tracing::warn!(error = %e, "Cannot prune the compiled-plugin cache.");
        }

        if outcome != "rejected" {
            // Sealed with this config's key only once it is the one in force.
            self.reseal(stale, &file).await;
            self.file.store(file);
            self.managed.store(managed);
        }
        let retired = current_versions
            .into_iter()
            .filter(|(name, sha256)| plugins.get(name).is_none_or(|p| p.sha256() != sha256))
            .collect();
        self.metrics
            .retire_plugin_versions(retired, |name, sha256| {
                plugins.get(name).is_some_and(|p| p.sha256() == sha256)
            });
        self.registry.swap(plugins, statuses.clone());
        self.install(config).await;
        drop(one_at_a_time);
        // After the config is in force, and without holding up the others: building an
        // index reads every event stored. The fields are the config's in force when the
        // build may start, so that of two reloads the later's list is the one built.
        let mut indexed = self.indexed.lock().await;
        let fields = self.config().store.indexed_fields.clone();
        let index_error = match *indexed != fields {
            true => crate::store::index_fields(&*self.store, &fields)
                .await
                .err(),
            false => None,
        };
        match &index_error {
            None => *indexed = fields,
            Some(e) => tracing::error!(error = %e,
                "Cannot change the body field indexes (store.indexed_fields); the next reload tries again."),
        }
        drop(indexed);
        tracing::info!(
            reason,
            config = outcome,
            plugins = statuses.len(),
            tables = ?self.config().tables.sizes(),
            "Reloaded."
        );
        let failed = outcome == "rejected"
            || index_error.is_some()
            || statuses.values().any(|s| s.status == "error");
        self.metrics
            .reloads
            .get_or_create(&ResultLabels {
                result: if failed { "error" } else { "ok" }.into(),
            })
            .inc();
        ReloadReport {
            reason: reason.into(),
            config: outcome,
            config_error,
            index_error: index_error.map(|e| e.to_string()),
            managed_error,
            route_errors: route_errors.into_iter().map(|(_, e)| e).collect(),
            plugins: statuses,
        }
    }

    /// Watches the plugin directory, the config file and the other files the config was
    /// read from ([`Config::files`]: certificates, tables, `${file:PATH}` secrets), and
    /// reloads after each burst of changes, until `stop`. What is watched follows the
    /// config in force: after each change of it, the directories of the files it names now
    /// are watched, and those it no longer names are not.
    pub fn watch(
        self: Arc<Self>,
        stop: CancellationToken,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let names = Arc::new(Mutex::new(HashSet::<std::ffi::OsString>::new()));
        let relevant = {
            let names = names.clone();
            move |path: &Path| {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                (path.extension().is_some_and(|e| e == "wasm") && !name.starts_with('.'))
                    || path.file_name().is_some_and(|n| {
                        (names.lock().unwrap_or_else(|e| e.into_inner())).contains(n)
                    })
            }
        };
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event
                && event.paths.iter().any(|p| relevant(p))
            {
                let _ = tx.send(());
            }
        })?;
        let mut watches = Watches {
            watcher,
            dirs: HashSet::new(),
            names,
        };
        let config_file = self.config_file().map(|(p, _)| p);
        watches.follow(config_file.as_deref(), &self.config())?;
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = rx.recv() => if got.is_none() { return },
                    _ = self.installed.notified() => {
                        // (A plugin directory a reload named that cannot be watched.)
                        if let Err(e) = watches.follow(config_file.as_deref(), &self.config()) {
                            tracing::warn!(error = %e,
                                "Cannot watch the plugin directory; after changing a plugin, reload with SIGHUP or POST /v1/reload.");
                        }
                        continue;
                    }
                    _ = stop.cancelled() => return,
                }
                // Wait for the burst to end.
                loop {
                    match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                self.reload("file change").await;
            }
        }))
    }

    /// The managed objects in the store, opened with the keys `file` names, and those of
    /// them found as text or sealed with a previous key (to be sealed again with the
    /// current one: `reseal`). An error says whether it was a seal that did not open
    /// (`true`) or the store.
    async fn read_managed(
        &self,
        file: &Config,
    ) -> Result<(Vec<ManagedObject>, Vec<ManagedObject>), (bool, String)> {
        let stored = (self.store.managed_objects().await).map_err(|e| (false, e.to_string()))?;
        let sealer = Sealer::new(&file.store);
        let (mut objects, mut stale) = (Vec::with_capacity(stored.len()), Vec::new());
        for object in stored {
            let (object, found) = sealer.open(object).map_err(|e| (true, e))?;
            if found == Found::Stale {
                stale.push(object.clone());
            }
            objects.push(object);
        }
        Ok((objects, stale))
    }

    /// Stores these objects sealed with the key of `file` (the config in force) — or as
    /// text, when it names only previous keys (encryption turned off). One that fails is
    /// left as it was, and tried again at the next reload.
    async fn reseal(&self, stale: Vec<ManagedObject>, file: &Config) {
        let sealer = Sealer::new(&file.store);
        let mut sealed = 0;
        for object in stale {
            let (kind, name) = (object.kind.clone(), object.name.clone());
            match self.store.put_managed(sealer.seal(object), now_ms()).await {
                Ok(()) => sealed += 1,
                Err(e) => tracing::warn!(kind, name, error = %e,
                    "Cannot seal a managed object with store.encryption_key; the next reload tries again."),
            }
        }
        match (sealed, sealer.seals()) {
            (0, _) => {}
            (n, true) => {
                tracing::info!(
                    objects = n,
                    "Managed objects sealed with store.encryption_key."
                )
            }
            (n, false) => tracing::info!(
                objects = n,
                "Managed objects stored as text again: store.encryption_key is not set."
            ),
        }
    }

    /// On a store that several gateways share, follows what the other instances change:
    /// takes in the managed objects that changed when their version moves (an object was
    /// made, changed or deleted through another instance's API) and reads the destination
    /// states back, every `SYNC_INTERVAL`, until `stop`. Returns at once on a store only
    /// this gateway uses.
    pub async fn follow_store(self: Arc<Self>, stop: CancellationToken) {
        let Ok(Some(mut seen)) = self.store.managed_version().await else {
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SYNC_INTERVAL) => {}
                _ = stop.cancelled() => return,
            }
            match self.store.managed_version().await {
                Ok(Some(version)) if version != seen => {
                    if let Some(now) = self.follow_managed(seen).await {
                        seen = now;
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "Cannot read the managed objects' version."),
            }
            if let Err(e) = self.dispatcher.refresh_states().await {
                tracing::warn!(error = %e, "Cannot read the destination states.");
            }
        }
    }

    /// Takes in what changed among the managed objects after version `since`, read from
    /// the store's log of changes, as an API change here would: only the objects changed
    /// are parsed, checked (one on its own, several with all the rest) and rebuilt — an
    /// instance's own changes among them compare equal and cost nothing more. What cannot
    /// be taken in that way — a stored object that does not parse, a change that does not
    /// validate or uses a plugin this instance lacks — goes through a full reload, which
    /// reports and logs it. The version now seen; `None` if the store could not be read
    /// (the next turn tries again).
    async fn follow_managed(&self, since: i64) -> Option<i64> {
        let version = {
            let _one_at_a_time = self.busy.lock().await;
            let mut changes = match self.store.managed_changes(since).await {
                Ok(changes) => changes,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot read the managed objects' changes.");
                    return None;
                }
            };
            let sealer = Sealer::new(&self.file.load().store);
            let opened: Result<Vec<ManagedObject>, String> = (changes.changed.drain(..))
                .map(|o| sealer.open(o).map(|(o, _)| o))
                .collect();
            let following = match opened {
                Ok(opened) => {
                    changes.changed = opened;
                    self.managed.load().following_changes(&changes)
                }
                // (The full reload below reports it.)
                Err(e) => Err(e),
            };
            match following {
                Ok(None) => return Some(changes.version),
                Ok(Some((managed, changed))) => {
                    let file = self.file.load_full();
                    let one = match changed.as_slice() {
                        [(kind, name)] => Some((*kind, name.as_str())),
                        _ => None,
                    };
                    // (A changed route whose plugin is not here goes through the full reload,
                    // which says so; another route's, found before, does not hold this up.)
                    let changed_route = |r: &RouteConfig| {
                        (changed.iter()).any(|(kind, name)| {
                            *kind == crate::managed::Kind::Route && *name == r.name
                        })
                    };
                    if let Ok(config) = managed.merged_with(&file, one)
                        && (missing_plugins(&config, &self.registry.snapshot(), changed_route))
                            .next()
                            .is_none()
                    {
                        tracing::info!(
                            changed = changed.len(),
                            "Took in the managed objects another instance changed."
                        );
                        self.managed.store(Arc::new(managed));
                        self.forget_route_errors(
                            (changed.iter())
                                .filter(|(kind, _)| *kind == crate::managed::Kind::Route)
                                .map(|(_, name)| name.as_str()),
                        );
                        self.install(Arc::new(config)).await;
                        return Some(changes.version);
                    }
                }
                Err(object) => {
                    tracing::debug!(%object, "A changed managed object does not parse or open.");
                }
            }
            changes.version
        };
        // (A full reload reads every object, so whatever changed since is in it too.)
        self.reload("managed objects changed").await;
        Some(version)
    }
}

/// The directories the watcher watches and the file names in them that reload.
struct Watches {
    watcher: notify::RecommendedWatcher,
    dirs: HashSet<PathBuf>,
    /// The names of the config file and of the files it names; `..data` too when it names
    /// any (a Kubernetes volume swaps its `..data` symlink rather than the files).
    names: Arc<Mutex<HashSet<std::ffi::OsString>>>,
}

impl Watches {
    /// Watches the plugin directory and the directories of the config file and of the files
    /// the config names — an editor, certbot (a symlink in `live/` replaced) and a
    /// Kubernetes secret volume all replace files rather than write them in place — and no
    /// others. Fails if the config file's or the plugins' directory cannot be watched
    /// (having done the rest); another's is a convenience, and SIGHUP still reloads it.
    fn follow(&mut self, config_file: Option<&Path>, config: &Config) -> anyhow::Result<()> {
        let files = config.files();
        let dir_of = |file: &Path| match file.parent() {
            Some(p) if p.as_os_str().is_empty() => Some(PathBuf::from(".")),
            p => p.map(Path::to_path_buf),
        };
        let mut names: HashSet<std::ffi::OsString> = (config_file.iter().copied())
            .chain(files.iter().map(PathBuf::as_path))
            .filter_map(|f| f.file_name().map(Into::into))
            .collect();
        if !files.is_empty() {
            names.insert("..data".into());
        }
        *self.names.lock().unwrap_or_else(|e| e.into_inner()) = names;
        let plugin_dir = &config.plugins.dir;
        let wanted: Vec<(PathBuf, bool)> = (config_file.and_then(dir_of).map(|d| (d, true)))
            .into_iter()
            .chain(plugin_dir.is_dir().then(|| (plugin_dir.clone(), true)))
            .chain(files.iter().filter_map(|f| dir_of(f)).map(|d| (d, false)))
            .collect();
        let mut failed = None;
        for (dir, needed) in &wanted {
            if self.dirs.contains(dir) {
                continue;
            }
            match self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.dirs.insert(dir.clone());
                }
                Err(e) if *needed => failed = failed.or(Some(e)),
                Err(e) => tracing::warn!(error = %e, dir = %dir.display(),
                    "Cannot watch the directory of a file the config names; after changing it, reload with SIGHUP or POST /v1/reload."),
            }
        }
        let gone: Vec<PathBuf> = (self.dirs.iter())
            .filter(|d| !wanted.iter().any(|(w, _)| w == *d))
            .cloned()
            .collect();
        for dir in gone {
            let _ = self.watcher.unwatch(&dir);
            self.dirs.remove(&dir);
        }
        failed.map_or(Ok(()), |e| Err(e.into()))
    }
}

/// The plugins that the routes `of` takes use and that are not loaded: each one's route,
/// key and message.
fn missing_plugins<'a>(
    config: &'a Config,
    plugins: &'a PluginMap,
    of: impl Fn(&RouteConfig) -> bool + 'a,
) -> impl Iterator<Item = (&'a RouteConfig, String, String)> + 'a {
    let routes = (config.routes.iter().enumerate()).filter(move |(_, r)| of(r));
    routes.flat_map(move |(i, r)| {
        (r.plugins.iter().enumerate())
            .filter(|(_, p)| !plugins.contains_key(&p.name))
            .map(move |(j, p)| {
                let message = format!(
                    "no plugin `{}` is loaded from {} (expected {}.wasm)",
                    p.name,
                    config.plugins.dir.display(),
                    p.name
                );
                (&**r, format!("routes[{i}].plugins[{j}].name"), message)
            })
    })
}

/// A route made through the API that cannot work as it is (`ReloadReport::route_errors`).
fn api_route_error(route: &RouteConfig, key: &str, message: &str) -> String {
    format!(
        "route `{}` (made through the API), `{key}`: {message}; its events fail at this plugin \
         until the route is changed (`PATCH /v1/routes/{}`) or the plugin is",
        route.name, route.name
    )
}

/// A route's configuration of a plugin that the plugin refused (WIT `config-check`).
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// The route's index in the config's `routes`.
    pub route: usize,
    /// Where the configuration is: `routes[i].plugins[j].config`.
    pub key: String,
    /// The plugin that refused it.
    pub plugin: String,
    /// What the plugin said is wrong, prefixed with its name.
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.key, self.message)
    }
}

/// The plugin configurations of routes that their plugins accepted (WIT `config-check`),
/// by plugin version, configuration and limits: each is checked once, not at every reload
/// or API change.
#[derive(Default)]
pub(crate) struct ConfigChecks {
    passed: Mutex<HashSet<u64>>,
}

impl ConfigChecks {
    /// Each plugin configuration of `config`'s routes (only the route named `only`, if
    /// given) that its plugin refuses. Plugins not in `plugins` are passed over
    /// (`missing_plugins` names them), as are those that do not export `config-check`.
    pub(crate) async fn refused(
        &self,
        config: &Config,
        plugins: &PluginMap,
        only: Option<&str>,
    ) -> Vec<Refusal> {
        use std::hash::{Hash, Hasher};
        let defaults = crate::pipeline::plugin_limits(&config.plugins);
        let mut refused = Vec::new();
        let routes = (config.routes.iter().enumerate())
            .filter(|(_, r)| only.is_none_or(|name| r.name == name));
        for (i, r) in routes {
            for (j, p) in r.plugins.iter().enumerate() {
                let Some(plugin) = plugins.get(&p.name).filter(|p| p.checks_config()) else {
                    continue;
                };
                let limits = crate::pipeline::entry_limits(p, defaults);
                let mut h = std::hash::DefaultHasher::new();
                (
                    plugin.sha256(),
                    &p.config,
                    limits.deadline,
                    limits.max_memory,
                )
                    .hash(&mut h);
                let key = h.finish();
                if self
                    .passed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&key)
                {
                    continue;
                }
                let input = crate::plugin::CallInput {
                    tables: config.tables.clone(),
                    ..crate::plugin::CallInput::config(p.config.clone().into())
                };
                match plugin.check_config(input, limits).await {
                    Ok(()) => {
                        let mut passed = self.passed.lock().unwrap_or_else(|e| e.into_inner());
                        // (Bounded: what was passed long ago is checked again, that is all.)
                        if passed.len() >= 4 * config.routes.len() + 1024 {
                            passed.clear();
                        }
                        passed.insert(key);
                    }
                    Err(message) => refused.push(Refusal {
                        route: i,
                        key: format!("routes[{i}].plugins[{j}].config"),
                        plugin: p.name.clone(),
                        message: format!(
                            "plugin `{}` refuses this configuration: {message}",
                            p.name
                        ),
                    }),
                }
            }
        }
        refused
    }
}

/// Loads every plugin in `dir` as a start would, without the compile cache (see
/// `crate::check`).
pub(crate) fn scan_once(
    runtime: &PluginRuntime,
    dir: &Path,
    used: &HashSet<String>,
) -> (PluginMap, BTreeMap<String, PluginStatus>) {
    scan(
        runtime,
        dir,
        &PluginMap::new(),
        &BTreeMap::new(),
        used,
        None,
    )
}

/// Loads what changed in `dir` against the plugins serving now.
fn scan(
    runtime: &PluginRuntime,
    dir: &Path,
    current: &PluginMap,
    previous: &BTreeMap<String, PluginStatus>,
    used: &HashSet<String>,
    cache: Option<&Path>,
) -> (PluginMap, BTreeMap<String, PluginStatus>) {
    let mut plugins = PluginMap::new();
    let mut statuses = BTreeMap::new();
    let files: Vec<(String, PathBuf)> = match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut files: Vec<(String, PathBuf)> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "wasm") && p.is_file())
                .filter_map(|p| {
                    let name = p.file_stem()?.to_str()?.to_string();
                    (!name.starts_with('.')).then_some((name, p))
                })
                .collect();
            files.sort();
            files
        }
        Err(e) => {
            if !used.is_empty() {
                tracing::error!(dir = %dir.display(), error = %e, "Cannot read the plugin directory.");
            }
            Vec::new()
        }
    };
    let loaded_at = |name: &str| previous.get(name).and_then(|s| s.loaded_at);

    for (name, path) in &files {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                keep_or_fail(
                    &mut plugins,
                    &mut statuses,
                    current,
                    name,
                    format!("cannot read {}: {e}", path.display()),
                    None,
                    loaded_at(name),
                );
                continue;
            }
        };
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        if let Some(serving) = current.get(name)
            && serving.sha256() == sha256
        {
            plugins.insert(name.clone(), serving.clone());
            statuses.insert(name.clone(), ok(loaded_at(name)));
            continue;
        }
        let started = std::time::Instant::now();
        match runtime.load_cached(name, &bytes, cache) {
            Ok(plugin) => {
                tracing::info!(plugin = %name, sha256 = plugin.sha256(), from_cache = plugin.from_cache(),
                    elapsed_ms = started.elapsed().as_millis() as u64, "Plugin loaded.");
                plugins.insert(name.clone(), Arc::new(plugin));
                statuses.insert(name.clone(), ok(Some(now_ms())));
            }
            Err(e) => {
                let message = format!("{}: {e:#}", path.display());
                tracing::error!(plugin = %name, error = %message, "Plugin failed to load; the previous version, if any, keeps serving.");
                keep_or_fail(
                    &mut plugins,
                    &mut statuses,
                    current,
                    name,
                    message,
                    Some(sha256),
                    loaded_at(name),
                );
            }
        }
    }
    for (name, serving) in current {
        if plugins.contains_key(name) || files.iter().any(|(n, _)| n == name) {
            continue;
        }
        if used.contains(name) {
            tracing::warn!(plugin = %name, "A plugin that a route uses is gone from disk; its last good version keeps serving.");
            plugins.insert(name.clone(), serving.clone());
            statuses.insert(
                name.clone(),
                PluginStatus {
                    status: "missing",
                    last_error: Some(format!("{name}.wasm is no longer in {}", dir.display())),
                    loaded_at: loaded_at(name),
                    failed_sha256: None,
                },
            );
        } else {
            tracing::info!(plugin = %name, "Plugin removed.");
        }
    }
    (plugins, statuses)
}

fn ok(loaded_at: Option<u64>) -> PluginStatus {
    PluginStatus {
        status: "ok",
        last_error: None,
        loaded_at,
        failed_sha256: None,
    }
}

#[allow(clippy::too_many_arguments)]
fn keep_or_fail(
    plugins: &mut PluginMap,
    statuses: &mut BTreeMap<String, PluginStatus>,
    current: &PluginMap,
    name: &str,
    error: String,
    failed_sha256: Option<String>,
    loaded_at: Option<u64>,
) {
    let serving = current.get(name);
    if let Some(p) = serving {
        plugins.insert(name.to_string(), p.clone());
    }
    statuses.insert(
        name.to_string(),
        PluginStatus {
            status: "error",
            last_error: Some(error),
            loaded_at: serving.and(loaded_at),
            failed_sha256,
        },
    );
}
