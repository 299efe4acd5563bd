//! The plugin-chain stage: takes queued events from the store, runs each route of the
//! event's source through its chain of plugins, and hands the resulting deliveries to the
//! delivery stage.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use tracing::Instrument;

use crate::config::{Config, DestinationConfig, InstanceMode, OnError, RouteConfig, SourceConfig};
use crate::delivery::{
    Destination, Destinations, Dispatcher, PlaceholderValues, PlannedDelivery, delivery_id, render,
};
use crate::event::{Body, Event, Pairs, merge_pairs};
use crate::metrics::Metrics;
use crate::plugin::{
    CallError, CallInput, CallLimits, HttpExchange, HttpLimits, Origin, Outbound, PluginMap,
    PluginRegistry, PluginStates, PluginVerdict, StateLimits, Turn,
};
use crate::store::{
    Completion, DeliveryStatus, DueDelivery, NewDelivery, PluginStep, RouteOutcome, RouteResult,
    StepResult, Store,
};

/// Sources, destinations and routes as the pipeline uses them; swapped whole on reload.
/// Each part is shared with the routing before it while what it is built from stays the
/// same: a management API change rebuilds the part of the one object it changed.
pub struct Routing {
    /// The config it was built from (the next routing compares its objects with these).
    config: Arc<Config>,
    sources: imbl::HashMap<String, Arc<SourceConfig>>,
    destinations: Arc<Destinations>,
    /// The longest of the destinations' own `timeout`s, in ms (0: none has one).
    longest_timeout: u64,
    /// In config order: a route's index here is its index in the config (in delivery ids
    /// and outcomes).
    routes: Arc<Vec<Arc<Route>>>,
    /// Each source's routes (indexes into `routes`), in config order: an event looks at
    /// its own source's routes only, however many others there are.
    routes_by_source: Arc<HashMap<String, Vec<usize>>>,
    /// The settings every destination and route was built with: while they stay the same,
    /// the next routing reuses what it can of this one.
    defaults: Defaults,
    /// What plugins' HTTP requests meet (`[plugins]`'s `http_*`).
    http: HttpLimits,
}

/// What a destination or route is built from besides its own config.
#[derive(PartialEq)]
struct Defaults {
    retry: crate::config::RetryPolicy,
    plugin_limits: CallLimits,
}

struct Route {
    name: String,
    source: String,
    plugins: Vec<RoutePlugin>,
    /// Whether a plugin of the chain may send HTTP requests (its chain then gives up its
    /// turn on the CPU while it waits for them).
    sends_http: bool,
    destinations: Vec<Arc<Destination>>,
    /// What it was built from (see `Routing::from_config`).
    config: Arc<RouteConfig>,
}

struct RoutePlugin {
    name: String,
    config: Arc<[(String, String)]>,
    limits: CallLimits,
    /// `None`: the plugin's default mode.
    mode: Option<InstanceMode>,
    /// Its own, or else the route's.
    on_error: OnError,
    /// The origins it may send HTTP requests to.
    allow_http: Arc<[Origin]>,
}

impl Routing {
    /// Builds the routing table from a validated config. With `previous` (the routing in
    /// force), what is built from the same objects and defaults is taken over rather than
    /// rebuilt: the sources, destinations or routes whose lists are the same objects are
    /// shared as they are; in a list that changed, the destinations and routes whose
    /// config is the same object are kept. So a management API change among 50,000
    /// objects rebuilds one table and one object, not all of them.
    pub fn from_config(config: Arc<Config>, previous: Option<&Routing>) -> Self {
        let defaults = Defaults {
            retry: config.delivery.retry.clone(),
            plugin_limits: plugin_limits(&config.plugins),
        };
        let previous = previous.filter(|r| r.defaults == defaults);
        let sources = sources_from(&config, previous);
        let (destinations, longest_timeout, replaced) =
            destinations_from(&config, previous, &defaults.retry);
        let same_routes = previous.filter(|r| same(&config.routes, &r.config.routes));
        let routes = match same_routes {
            Some(r) if replaced.is_empty() => r.routes.clone(),
            _ => Arc::new(routes_reusing(
                &config.routes,
                previous.map_or(&[][..], |r| r.routes.as_slice()),
                &replaced,
                &destinations,
                defaults.plugin_limits,
            )),
        };
        // Which routes a source has changes only with the list of routes.
        let routes_by_source = match same_routes {
            Some(r) => r.routes_by_source.clone(),
            None => {
                let mut by_source: HashMap<String, Vec<usize>> = HashMap::new();
                for (i, r) in routes.iter().enumerate() {
                    by_source.entry(r.source.clone()).or_default().push(i);
                }
                Arc::new(by_source)
            }
        };
        Self {
            sources,
            destinations,
            longest_timeout,
            routes,
            routes_by_source,
            defaults,
            http: HttpLimits::from(&config.plugins),
            config,
        }
    }

    /// Whether events may be posted to this source.
    pub fn has_source(&self, name: &str) -> bool {
        self.sources.contains_key(name)
    }

    /// A source's config (its edge checks, its idempotency field), if it is configured.
    pub fn source(&self, name: &str) -> Option<&Arc<SourceConfig>> {
        self.sources.get(name)
    }

    /// The indexes of a source's routes in `routes`, in config order.
    fn routes_of(&self, source: &str) -> &[usize] {
        self.routes_by_source.get(source).map_or(&[], Vec::as_slice)
    }

    /// The destinations by name.
    pub fn destinations(&self) -> &Arc<Destinations> {
        &self.destinations
    }

    /// The longest of the destinations' own `timeout`s, in ms (0: none has one): claims
    /// are leased for at least that long.
    pub fn longest_timeout(&self) -> u64 {
        self.longest_timeout
    }

    /// The names of the routes whose chain includes the plugin.
    pub fn routes_using(&self, plugin: &str) -> Vec<&str> {
        self.routes
            .iter()
            .filter(|r| r.plugins.iter().any(|p| p.name == plugin))
            .map(|r| r.name.as_str())
            .collect()
    }
}

/// The sources' table: the previous one patched where the list differs in a few places,
/// else built anew.
fn sources_from(
    config: &Config,
    previous: Option<&Routing>,
) -> imbl::HashMap<String, Arc<SourceConfig>> {
    match previous
        .and_then(|r| differences(&r.config.sources, &config.sources, |s| &s.name).map(|d| (r, d)))
    {
        Some((r, (removed, added))) => {
            let mut sources = r.sources.clone();
            for name in removed {
                sources.remove(name);
            }
            for s in added {
                sources.insert(s.name.clone(), s.clone());
            }
            sources
        }
        None => (config.sources.iter())
            .map(|s| (s.name.clone(), s.clone()))
            .collect(),
    }
}

/// The destinations' table and the longest of their own timeouts (ms), and the names of
/// the destinations that replace one of the same name (routes to them are rebuilt too):
/// the previous table patched where the list differs in a few places, else built anew,
/// keeping each destination whose config is the same object.
fn destinations_from<'a>(
    config: &'a Config,
    previous: Option<&'a Routing>,
    retry: &crate::config::RetryPolicy,
) -> (Arc<Destinations>, u64, HashSet<&'a str>) {
    let mut replaced: HashSet<&str> = HashSet::new();
    let timeout_ms = |d: &Destination| d.timeout.map_or(0, |t| t.as_millis() as u64);
    let mut longest_timeout = None;
    // (A new version of a destination keeps the OAuth 2.0 token of the one it replaces,
    // if its `oauth2` is the same.)
    let build = |d: &Arc<DestinationConfig>, before: Option<&Arc<Destination>>| {
        Arc::new(Destination::from_config(d, retry).keeping_token_of(before))
    };
    let destinations = match previous.and_then(|r| {
        differences(&r.config.destinations, &config.destinations, |d| &d.name).map(|d| (r, d))
    }) {
        Some((r, (removed, added))) if removed.is_empty() && added.is_empty() => {
            longest_timeout = Some(r.longest_timeout);
            r.destinations.clone()
        }
        Some((r, (removed, added))) => {
            let mut destinations = Destinations::clone(&r.destinations);
            // The longest timeout holds unless the one that had it is gone.
            let mut longest = Some(r.longest_timeout);
            for name in removed {
                if let Some(gone) = destinations.remove(name)
                    && r.longest_timeout > 0
                    && timeout_ms(&gone) == r.longest_timeout
                {
                    longest = None;
                }
            }
            for d in added {
                if r.destinations.contains_key(&d.name) {
                    replaced.insert(&d.name);
                }
                let built = build(d, r.destinations.get(&d.name));
                longest = longest.map(|l| l.max(timeout_ms(&built)));
                destinations.insert(d.name.clone(), built);
            }
            longest_timeout = longest;
            Arc::new(destinations)
        }
        None => Arc::new(
            (config.destinations.iter())
                .map(|d| {
                    let before = previous.and_then(|r| r.destinations.get(&d.name));
                    let kept = before.filter(|b| Arc::ptr_eq(&b.config, d)).cloned();
                    if before.is_some() && kept.is_none() {
                        replaced.insert(&d.name);
                    }
                    (d.name.clone(), kept.unwrap_or_else(|| build(d, before)))
                })
                .collect::<Destinations>(),
        ),
    };
    let longest_timeout = longest_timeout.unwrap_or_else(|| {
        (destinations.values())
            .map(|d| timeout_ms(d))
            .max()
            .unwrap_or(0)
    });
    (destinations, longest_timeout, replaced)
}

/// The most objects a list may differ by for a table to be patched rather than built anew.
const MAX_PATCH: usize = 64;

/// How a list of objects differs from the one before, found by walking both side by side
/// (comparing allocations, not contents): the names of the objects gone (deleted, or
/// replaced) and the objects that are new (made, or a new version). Where more than one
/// object is missing in a row the walk takes the rest as new (still right, only more to
/// build). `None` once more than `MAX_PATCH` differ: building anew is the better way then.
fn differences<'a, T>(
    old: &'a [Arc<T>],
    new: &'a [Arc<T>],
    name: fn(&T) -> &String,
) -> Option<(Vec<&'a str>, Vec<&'a Arc<T>>)> {
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    let mut j = 0;
    for object in new {
        if old.get(j).is_some_and(|o| Arc::ptr_eq(o, object)) {
            j += 1;
        } else if old.get(j + 1).is_some_and(|o| Arc::ptr_eq(o, object)) {
            removed.push(name(&old[j]).as_str());
            j += 2;
        } else {
            added.push(object);
            if old.get(j).is_some_and(|o| name(o) == name(object)) {
                removed.push(name(&old[j]).as_str());
                j += 1;
            }
            if removed.len() + added.len() > MAX_PATCH {
                return None;
            }
        }
    }
    if removed.len() + added.len() + (old.len() - j) > MAX_PATCH {
        return None;
    }
    removed.extend(old[j..].iter().map(|o| name(o).as_str()));
    Some((removed, added))
}

/// Whether two lists hold the same objects (not equal ones: the same allocations).
fn same<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// The routes of `configs`, taking over from `built` (the previous routes, in their order)
/// each whose config is the same object and none of whose destinations was `replaced`.
/// The two lists are walked side by side: after a management API change (one route made,
/// changed or deleted) each unchanged route is found at most one place ahead.
fn routes_reusing(
    configs: &[Arc<RouteConfig>],
    built: &[Arc<Route>],
    replaced: &HashSet<&str>,
    destinations: &Destinations,
    limits: CallLimits,
) -> Vec<Arc<Route>> {
    let mut next = 0;
    (configs.iter())
        .map(|r| {
            let found =
                (next..built.len().min(next + 2)).find(|&j| Arc::ptr_eq(&built[j].config, r));
            if let Some(j) = found {
                next = j + 1;
            } else if built.get(next).is_some_and(|b| b.name == r.name) {
                next += 1;
            }
            match found.map(|j| &built[j]) {
                Some(route)
                    if !(route.destinations.iter()).any(|d| replaced.contains(d.name.as_str())) =>
                {
                    Arc::clone(route)
                }
                _ => Arc::new(Route::build(r, destinations, limits)),
            }
        })
        .collect()
}

/// The limits of a plugin's calls where a route sets none (`[plugins]`).
pub(crate) fn plugin_limits(p: &crate::config::PluginsConfig) -> CallLimits {
    CallLimits {
        deadline: p.deadline,
        max_memory: p.max_memory_bytes,
        max_output_bytes: p.max_output_bytes,
        max_deliveries: p.max_deliveries,
    }
}

/// The limits of a route's plugin entry: its own `deadline` and `max_memory_bytes`, else
/// `defaults`.
pub(crate) fn entry_limits(p: &crate::config::PluginRef, defaults: CallLimits) -> CallLimits {
    CallLimits {
        deadline: p.deadline.unwrap_or(defaults.deadline),
        max_memory: p.max_memory_bytes.unwrap_or(defaults.max_memory),
        ..defaults
    }
}

impl Route {
    fn build(r: &Arc<RouteConfig>, destinations: &Destinations, defaults: CallLimits) -> Self {
        Self {
            name: r.name.clone(),
            source: r.source.clone(),
            plugins: (r.plugins.iter())
                .map(|p| RoutePlugin {
                    name: p.name.clone(),
                    config: p.config.clone().into(),
                    limits: entry_limits(p, defaults),
                    mode: p.instance,
                    on_error: p.on_error.unwrap_or(r.on_error),
                    // (Validated with the config.)
                    allow_http: (p.allow_http.iter())
                        .filter_map(|o| Origin::parse(o).ok())
                        .collect(),
                })
                .collect(),
            sends_http: r.plugins.iter().any(|p| !p.allow_http.is_empty()),
            destinations: (r.destinations.iter())
                .map(|d| destinations[d].clone())
                .collect(),
            config: r.clone(),
        }
    }
}

/// The running pipeline: store → plugin chains → deliveries (stored, then sent by the
/// dispatcher).
pub struct Pipeline {
    store: Arc<dyn Store>,
    plugins: Arc<PluginRegistry>,
    routing: ArcSwap<Routing>,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    /// Plugin chains running at once: as many as the machine has cores, twice over.
    cpu: Arc<tokio::sync::Semaphore>,
    /// Where plugins keep their values (in the store).
    states: PluginStates,
    /// How plugins' HTTP requests go out (the dispatcher's transport).
    outbound: Outbound,
    workers: Workers,
}

/// The most workers that stand in for workers waiting on plugins' HTTP responses.
const MAX_STAND_INS: usize = 960;

/// The pipeline's workers: `base` of them take events at all times. One whose plugin waits
/// for an HTTP response is stood in for by another (at most `MAX_STAND_INS` more), which
/// leaves after an event once the waiting one is back — so a slow service holds up the
/// events that ask it, not every source's.
#[derive(Default)]
struct Workers {
    base: AtomicUsize,
    /// Workers not waiting on a response.
    working: AtomicUsize,
    /// Workers in all.
    all: AtomicUsize,
    tracker: tokio_util::task::TaskTracker,
}

impl Workers {
    /// Whether this worker is one too many now (a waiting one is back), and leaves.
    fn leave_if_extra(&self) -> bool {
        let base = self.base.load(Ordering::Relaxed);
        let mut working = self.working.load(Ordering::Relaxed);
        while working > base {
            let fewer = working - 1;
            match (self.working).compare_exchange(
                working,
                fewer,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.all.fetch_sub(1, Ordering::AcqRel);
                    return true;
                }
                Err(now) => working = now,
            }
        }
        false
    }
}

/// Stands workers in for waiting ones (the pipeline's `Waiting`).
struct StandIns(Weak<Pipeline>);

impl crate::plugin::Waiting for StandIns {
    fn begins(&self) {
        let Some(pipeline) = self.0.upgrade() else {
            return;
        };
        let w = &pipeline.workers;
        // (A worker that begins to wait was working: at least one is.)
        let working = w.working.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        let base = w.base.load(Ordering::Relaxed);
        if working < base && w.all.load(Ordering::Relaxed) < base + MAX_STAND_INS {
            w.all.fetch_add(1, Ordering::AcqRel);
            w.working.fetch_add(1, Ordering::AcqRel);
            pipeline.spawn_worker();
        }
    }

    fn ends(&self) {
        if let Some(pipeline) = self.0.upgrade() {
            pipeline.workers.working.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// What the plugin calls of one event reach besides the event: where their values are
/// kept and how their HTTP requests go out, under the config's limits.
pub struct Reach<'a> {
    pub states: &'a PluginStates,
    pub outbound: &'a Outbound,
}

/// What the routes of the event's source in `routing` make of it, with `plugins`: each
/// route's outcome (its plugin steps and result) and the deliveries the routes plan,
/// rendered. Stores and sends nothing. A chain runs holding a permit of `cpu` (plugin
/// chains running at once). `live`: the metrics to count in, or `None` for a dry run (the
/// API's, or `switchyard dry-run` with no gateway at all), whose plugin calls are counted
/// nowhere (neither in the metrics nor in the plugins' call statistics and failures in a
/// row) and whose failures are not logged as the gateway's (its answer has them). The
/// plugins keep their values and send their requests as `reach` says, under the limits of
/// the routing's config.
pub async fn decide(
    routing: &Routing,
    plugins: &PluginMap,
    cpu: &Arc<tokio::sync::Semaphore>,
    reach: Reach<'_>,
    event: &Event,
    live: Option<&Metrics>,
) -> (Vec<RouteOutcome>, Vec<NewDelivery>) {
    let calls = Calls {
        states: reach
            .states
            .with_limits(StateLimits::from(&routing.config.plugins)),
        outbound: reach.outbound,
        http: &routing.http,
    };
    let values = PlaceholderValues::of(event);
    let mut outcomes = Vec::new();
    let mut deliveries = Vec::new();
    for &route_index in routing.routes_of(&event.source) {
        // A chain whose plugins may wait for HTTP responses gives up its turn meanwhile.
        let (permit, turn) = match routing.routes[route_index].sends_http {
            false => (Some(cpu.acquire().await), None),
            true => (None, Some(Turn::take(cpu).await)),
        };
        // A panic in a chain fails this route, not the pipeline worker.
        let chain = AssertUnwindSafe(run_chain(
            routing,
            route_index,
            plugins,
            &calls,
            turn.as_ref(),
            event,
            live,
        ))
        .catch_unwind()
        .await;
        drop((permit, turn));
        let (steps, end) = match chain {
            Ok(result) => result,
            Err(panic) => (
                Vec::new(),
                ChainEnd::Failed(format!("plugin chain panicked: {}", panic_message(&*panic))),
            ),
        };
        let route = route_index;
        let result = match end {
            ChainEnd::Dropped { plugin, reason } => {
                if live.is_some() {
                    tracing::info!(route, plugin, reason, "Event dropped.");
                }
                RouteResult::Dropped { plugin, reason }
            }
            ChainEnd::Failed(error) => {
                if live.is_some() {
                    tracing::warn!(route, error, "Route failed for this event.");
                }
                RouteResult::Failed { error }
            }
            ChainEnd::Deliver(planned) => {
                let n = planned.len();
                deliveries.extend(planned.iter().map(|p| render(p, &values)));
                RouteResult::Delivering { deliveries: n }
            }
        };
        outcomes.push(RouteOutcome {
            route,
            name: routing.routes[route_index].name.clone(),
            run: event.run,
            steps,
            result,
        });
    }
    (outcomes, deliveries)
}

impl Pipeline {
    pub fn new(
        store: Arc<dyn Store>,
        plugins: Arc<PluginRegistry>,
        routing: Arc<Routing>,
        dispatcher: Arc<Dispatcher>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn crate::delivery::Clock>,
    ) -> Arc<Self> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new_cyclic(|me| Self {
            states: PluginStates::store(store.clone(), clock.clone()).counted(metrics.clone()),
            outbound: (Outbound::new(dispatcher.clone()).counted(metrics.clone()))
                .telling(Arc::new(StandIns(me.clone())))
                .paced(store.clone(), clock.clone()),
            workers: Workers::default(),
            store,
            metrics,
            cpu: Arc::new(tokio::sync::Semaphore::new(cores * 2)),
            plugins,
            routing: ArcSwap::new(routing),
            dispatcher,
        })
    }

    /// The loaded plugins.
    pub fn plugins(&self) -> &PluginRegistry {
        &self.plugins
    }

    /// Swaps in a new routing table; events already in progress finish on the old one.
    pub fn set_routing(&self, routing: Arc<Routing>) {
        self.routing.store(routing);
    }

    /// The routing table now in force.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// Processes events with `workers` workers (and stand-ins for those waiting on plugins'
    /// HTTP responses) until the store is closed and drained.
    pub async fn run(self: Arc<Self>, workers: usize) {
        let (w, n) = (&self.workers, workers.max(1));
        w.base.store(n, Ordering::Relaxed);
        w.all.fetch_add(n, Ordering::AcqRel);
        w.working.fetch_add(n, Ordering::AcqRel);
        for _ in 0..n {
            self.spawn_worker();
        }
        w.tracker.close();
        w.tracker.wait().await;
    }

    /// Starts a worker: it takes events until the store is drained, or until it is one too
    /// many (`Workers::leave_if_extra`).
    fn spawn_worker(self: &Arc<Self>) {
        let this = self.clone();
        self.workers.tracker.spawn(async move {
            let work = async {
                while let Some(event) = this.store.next_event().await {
                    let span = tracing::info_span!("pipeline", event_id = %event.id, source = %event.source);
                    this.process(event).instrument(span).await;
                    if this.workers.leave_if_extra() {
                        return;
                    }
                }
            };
            if let Err(panic) = AssertUnwindSafe(work).catch_unwind().await {
                let error = panic_message(&*panic);
                tracing::error!(error, "Pipeline worker ended abnormally.");
            }
        });
    }

    /// Runs every route of the event's source, then stores the outcomes and the deliveries
    /// they decided in one commit and wakes the dispatcher.
    async fn process(&self, event: Event) {
        let reach = Reach {
            states: &self.states,
            outbound: &self.outbound,
        };
        let (outcomes, deliveries) = self.decide(reach, &event, Some(&self.metrics)).await;
        self.record(event, outcomes, deliveries).await;
    }

    /// What the routes of the event's source would make of it, as `process` would run it,
    /// for a dry run (`POST /v1/sources/{name}/dry-run`): stores, counts and sends nothing
    /// (but its plugins' `GET` and `HEAD` requests), its plugins' state values seen and not
    /// kept; with the requests its plugins asked for, in order.
    pub async fn dry_run(
        &self,
        event: &Event,
    ) -> (Vec<RouteOutcome>, Vec<NewDelivery>, Vec<HttpExchange>) {
        let states = self.states.dry_run();
        let (outbound, recording) = self.outbound.dry_run().recorded();
        let reach = Reach {
            states: &states,
            outbound: &outbound,
        };
        let (outcomes, deliveries) = self.decide(reach, event, None).await;
        (outcomes, deliveries, recording.take())
    }

    /// What the routes of the event's source make of it, with the routes and plugins in
    /// force (see [`decide`]). `live`: the metrics to count in, or `None` for a dry run.
    async fn decide(
        &self,
        reach: Reach<'_>,
        event: &Event,
        live: Option<&Metrics>,
    ) -> (Vec<RouteOutcome>, Vec<NewDelivery>) {
        // One snapshot of routes and plugins per event: each event is processed by exactly
        // one version of each plugin, whatever reloads happen meanwhile.
        let (routing, plugins) = (self.routing(), self.plugins.snapshot());
        decide(&routing, &plugins, &self.cpu, reach, event, live).await
    }

    /// Stores the event's outcomes and deliveries in one commit and sends the deliveries
    /// it may send from here at once.
    async fn record(
        &self,
        event: Event,
        outcomes: Vec<RouteOutcome>,
        mut deliveries: Vec<NewDelivery>,
    ) {
        let pending = deliveries
            .iter()
            .filter(|d| d.status == DeliveryStatus::Pending)
            .count();
        let skipped: Vec<String> = deliveries
            .iter()
            .filter(|d| d.status == DeliveryStatus::Skipped)
            .map(|d| d.destination.clone())
            .collect();
        let now = self.dispatcher.now_ms();
        // Deliveries to ACTIVE destinations with room in their lane are claimed as they
        // are stored and sent from here, without a round through the store's claim query.
        let lease_until = self.dispatcher.lease_until(now);
        let (mut held, mut lanes_full) = (Vec::new(), 0);
        for d in deliveries.iter_mut() {
            // (A delivery whose first attempt waits, `retry_schedule`'s first entry, is
            // the dispatcher's to claim when due.)
            if d.status == DeliveryStatus::Pending
                && d.delay_ms == 0
                && self.dispatcher.is_active(&d.destination)
            {
                match self.dispatcher.reserve(&d.destination) {
                    Some(place) => {
                        d.lease_until = Some(lease_until);
                        held.push(place);
                    }
                    None => lanes_full += 1,
                }
            }
        }
        let results: Vec<(String, &'static str)> = outcomes
            .iter()
            .map(|o| (o.name.clone(), o.result.as_str()))
            .collect();
        let mut due: Vec<(DueDelivery, crate::delivery::Held)> = deliveries
            .iter()
            .filter_map(|d| Some((d, d.lease_until?)))
            .zip(held)
            .map(|((d, lease_until), held)| {
                let due = DueDelivery {
                    id: d.id.clone(),
                    event_id: event.id.clone(),
                    destination: d.destination.clone(),
                    url: d.url.clone(),
                    headers: d.headers.clone(),
                    body: d.body.clone(),
                    attempts: 0,
                    received_at: event.received_at,
                    lease_until,
                    paced: false,
                };
                (due, held)
            })
            .collect();
        match self
            .store
            .complete_event(&event, outcomes, deliveries, now)
            .await
        {
            Ok(Completion::Stale) => {
                // Another completion of this run (an instance that took it over) was
                // stored first; what it recorded, sent and counted stands.
                tracing::debug!("Event processed already; nothing recorded.");
            }
            Ok(Completion::Recorded { leased }) => {
                for (route, result) in &results {
                    self.metrics.route_outcome(route, result);
                }
                for destination in &skipped {
                    self.metrics.delivery(destination, "skipped");
                }
                tracing::debug!(
                    deliveries = pending,
                    skipped = skipped.len(),
                    "Event processed."
                );
                due.retain(|(d, _)| leased.contains(&d.id));
                // Pending deliveries not sent from here (their destination is not ACTIVE
                // here, or they existed already) are the dispatcher's to claim; those
                // whose lane is full are claimed when it frees a place, which wakes it.
                let left = pending.saturating_sub(due.len() + lanes_full);
                self.dispatcher.send_now(due);
                if left > 0 {
                    self.dispatcher.wake()
                }
            }
            // The event stays queued in the store, which hands it out again later.
            Err(e) => tracing::error!(error = %e, "Cannot record the event's outcome."),
        }
    }
}

/// What a panic said, as far as it is text.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// How a route's chain ended.
enum ChainEnd {
    Dropped { plugin: String, reason: String },
    Deliver(Vec<PlannedDelivery>),
    Failed(String),
}

/// What one event's plugin calls are given besides the event (see [`Reach`]).
struct Calls<'a> {
    states: PluginStates,
    outbound: &'a Outbound,
    http: &'a HttpLimits,
}

/// Runs one route's plugins in order on an event (holding `turn` when a plugin may wait
/// for HTTP responses).
async fn run_chain(
    routing: &Routing,
    index: usize,
    plugins: &PluginMap,
    calls: &Calls<'_>,
    turn: Option<&Arc<Turn>>,
    received: &Event,
    live: Option<&Metrics>,
) -> (Vec<PluginStep>, ChainEnd) {
    let route = &routing.routes[index];
    let mut event = received.clone();
    let mut steps = Vec::with_capacity(route.plugins.len());
    for rp in &route.plugins {
        let Some(plugin) = plugins.get(&rp.name).cloned() else {
            return (
                steps,
                ChainEnd::Failed(format!("plugin `{}` is not loaded", rp.name)),
            );
        };
        let started = Instant::now();
        let mode = rp.mode.unwrap_or_else(|| plugin.default_mode());
        let input = CallInput {
            config: rp.config.clone(),
            tables: routing.config.tables.clone(),
            state: calls.states.clone(),
            http: (calls.outbound).grant(&rp.allow_http, calls.http, turn),
        };
        let result = match live {
            Some(_) => plugin.call(&event, input, rp.limits, mode).await,
            None => (plugin.call_uncounted(&event, input, rp.limits, mode)).await,
        };
        let outcome = match &result {
            Ok(PluginVerdict::Drop { .. }) => "drop",
            Ok(PluginVerdict::Continue(_)) => "continue",
            Ok(PluginVerdict::Route { .. }) => "route",
            Err(CallError::Plugin(_)) => "error",
            Err(CallError::Trap(_)) => "trap",
            Err(CallError::Deadline(_)) => "deadline",
            Err(CallError::Output(_)) => "output",
        };
        if let Some(metrics) = live {
            metrics.plugin_call(
                &rp.name,
                plugin.sha256(),
                outcome,
                started.elapsed().as_secs_f64(),
            );
        }
        let mut step = PluginStep {
            plugin: rp.name.clone(),
            sha256: plugin.sha256().to_string(),
            duration_us: started.elapsed().as_micros() as u64,
            result: StepResult::Error {
                error: String::new(),
            },
        };
        let verdict = match result {
            Ok(v) => v,
            Err(e) => {
                let error = format!("plugin `{}` failed: {e}", rp.name);
                if live.is_some() {
                    tracing::warn!(plugin = %rp.name, sha256 = plugin.sha256(), error = %e,
                        on_error = ?rp.on_error, "Plugin failed.");
                }
                step.result = StepResult::Error {
                    error: e.to_string(),
                };
                steps.push(step);
                match rp.on_error {
                    OnError::DeadLetter => return (steps, ChainEnd::Failed(error)),
                    OnError::Drop => {
                        let plugin = rp.name.clone();
                        return (
                            steps,
                            ChainEnd::Dropped {
                                plugin,
                                reason: error,
                            },
                        );
                    }
                    OnError::SkipPlugin => continue,
                }
            }
        };
        step.result = StepResult::Verdict {
            verdict: verdict.clone(),
        };
        steps.push(step);
        match verdict {
            PluginVerdict::Drop { reason } => {
                return (
                    steps,
                    ChainEnd::Dropped {
                        plugin: rp.name.clone(),
                        reason,
                    },
                );
            }
            PluginVerdict::Continue(update) => {
                if let Some(body) = update.body {
                    event.body = body;
                }
                if update.content_type.is_some() {
                    event.content_type = update.content_type;
                }
                if let Some(headers) = update.headers {
                    event.headers = headers;
                }
                merge_pairs(&mut event.metadata, update.metadata);
            }
            PluginVerdict::Route { deliveries } => {
                let mut planned = Vec::with_capacity(deliveries.len());
                for (i, d) in deliveries.into_iter().enumerate() {
                    let Some(dest) = routing.destinations.get(&d.destination) else {
                        return (
                            steps,
                            ChainEnd::Failed(format!(
                                "plugin `{}` routed to unknown destination `{}`",
                                rp.name, d.destination
                            )),
                        );
                    };
                    let mut metadata = event.metadata.clone();
                    merge_pairs(&mut metadata, d.metadata);
                    planned.push(plan(
                        &event,
                        index,
                        i,
                        dest.clone(),
                        d.body,
                        d.content_type,
                        d.headers,
                        metadata,
                    ));
                }
                return (steps, ChainEnd::Deliver(planned));
            }
        }
    }
    let planned = route
        .destinations
        .iter()
        .enumerate()
        .map(|(i, dest)| {
            plan(
                &event,
                index,
                i,
                dest.clone(),
                None,
                None,
                Vec::new(),
                event.metadata.clone(),
            )
        })
        .collect();
    (steps, ChainEnd::Deliver(planned))
}

#[allow(clippy::too_many_arguments)]
fn plan(
    event: &Event,
    route: usize,
    index: usize,
    destination: Arc<Destination>,
    body: Option<Body>,
    content_type: Option<String>,
    extra_headers: Pairs,
    metadata: Pairs,
) -> PlannedDelivery {
    PlannedDelivery {
        id: delivery_id(&event.id, event.run, route, index, &destination.name),
        route,
        body: body.unwrap_or_else(|| event.body.clone()),
        content_type: content_type.or_else(|| event.content_type.clone()),
        headers: event.headers.clone(),
        extra_headers,
        metadata,
        destination,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::managed::{Change, Kind, Managed, Object};

    fn file() -> Config {
        let text = r#"
            [[sources]]
            name = "fleet"
            [[sources]]
            name = "alerts"
            [[destinations]]
            name = "archive"
            url = "https://archive.example/"
            timeout = "30s"
            [[destinations]]
            name = "pager"
            url = "https://pager.example/"
            timeout = "5s"
            [[routes]]
            source = "fleet"
            destinations = ["archive", "pager"]
            [[routes]]
            source = "alerts"
            destinations = ["pager"]
        "#;
        Config::parse(text, "test.toml", std::path::Path::new("."), &|_| None).unwrap()
    }

    fn object(kind: Kind, json: serde_json::Value) -> Object {
        match kind {
            Kind::Source => Object::Source(serde_json::from_value(json).unwrap()),
            Kind::Destination => Object::Destination(serde_json::from_value(json).unwrap()),
            Kind::Route => Object::Route(serde_json::from_value(json).unwrap()),
        }
    }

    /// What a routing built from nothing would be, checked against the one built from
    /// the routing before: each table holds exactly the config's objects, routes in the
    /// config's order point at the destinations in force, and the longest timeout is right.
    fn assert_built_from(r: &Routing, c: &Config) {
        assert_eq!(r.sources.len(), c.sources.len());
        for s in &c.sources {
            assert!(Arc::ptr_eq(&r.sources[&s.name], s), "source {}", s.name);
        }
        assert_eq!(r.destinations.len(), c.destinations.len());
        for d in &c.destinations {
            assert!(
                Arc::ptr_eq(&r.destinations[&d.name].config, d),
                "{}",
                d.name
            );
        }
        assert_eq!(r.routes.len(), c.routes.len());
        for (route, config) in r.routes.iter().zip(&c.routes) {
            assert!(Arc::ptr_eq(&route.config, config), "route {}", config.name);
            assert_eq!(route.destinations.len(), config.destinations.len());
            for (d, name) in route.destinations.iter().zip(&config.destinations) {
                assert!(
                    Arc::ptr_eq(d, &r.destinations[name]),
                    "{} → {name}",
                    config.name
                );
            }
        }
        let fresh = Routing::from_config(Arc::new(c.clone()), None);
        assert_eq!(r.routes_by_source, fresh.routes_by_source);
        assert_eq!(r.longest_timeout, fresh.longest_timeout);
    }

    /// A management API change builds the routing from the one before: right after every
    /// kind of change, and sharing what the change did not touch.
    #[test]
    fn a_change_rebuilds_only_what_it_touched() {
        let file = file();
        let mut managed = Managed::default();
        let mut config = Arc::new(file.clone());
        let mut routing = Routing::from_config(config.clone(), None);
        assert_built_from(&routing, &config);
        assert_eq!(routing.longest_timeout, 30_000);
        let changes = [
            Change::Create(object(
                Kind::Destination,
                serde_json::json!(
                {"name": "slow", "url": "https://slow.example/", "timeout": "60s"}),
            )),
            Change::Create(object(Kind::Source, serde_json::json!({"name": "api"}))),
            Change::Create(object(
                Kind::Route,
                serde_json::json!(
                {"name": "api-slow", "source": "api", "destinations": ["slow", "pager"]}),
            )),
            // A new version of a destination a route uses: the route is rebuilt to it.
            Change::Update(object(
                Kind::Destination,
                serde_json::json!(
                {"name": "slow", "url": "https://slow.example/v2", "timeout": "10s"}),
            )),
            Change::Create(object(
                Kind::Route,
                serde_json::json!(
                {"name": "api-archive", "source": "api", "destinations": ["archive"]}),
            )),
            Change::Delete(Kind::Route, "api-slow".into()),
            Change::Delete(Kind::Destination, "slow".into()),
            Change::Update(object(
                Kind::Source,
                serde_json::json!(
                {"name": "api", "rate_limit": 10.0}),
            )),
        ];
        for change in &changes {
            let before = routing;
            let (next, c) = managed.apply(&file, change).unwrap();
            (managed, config) = (next, Arc::new(c));
            routing = Routing::from_config(config.clone(), Some(&before));
            assert_built_from(&routing, &config);
            let (kind, name) = (change.kind(), change.name());
            // What the change did not touch is shared, not rebuilt.
            if kind != Kind::Destination {
                assert!(
                    Arc::ptr_eq(&routing.destinations, &before.destinations),
                    "{name}"
                );
            }
            if kind != Kind::Route {
                assert!(Arc::ptr_eq(
                    &routing.routes_by_source,
                    &before.routes_by_source
                ));
            }
            if kind == Kind::Source {
                assert!(Arc::ptr_eq(&routing.routes, &before.routes), "{name}");
            }
            for route in routing.routes.iter() {
                let kept = before.routes.iter().find(|b| b.name == route.name);
                let touched = route.name == name
                    || (kind == Kind::Destination
                        && route.destinations.iter().any(|d| d.name == name));
                assert_eq!(
                    kept.is_some_and(|b| Arc::ptr_eq(b, route)),
                    kept.is_some() && !touched,
                    "route {} after {kind:?} {name}",
                    route.name
                );
            }
        }
        // 30s (archive's) → 60s (slow made) → 30s (slow's new version has 10s) → 30s.
        assert_eq!(routing.longest_timeout, 30_000);
    }

    /// The longest timeout follows the destinations: a longer one raises it; when the one
    /// that had it goes, it falls to the next.
    #[test]
    fn the_longest_timeout_follows_the_destinations() {
        let file = file();
        let managed = Managed::default();
        let routing = Routing::from_config(Arc::new(file.clone()), None);
        let slow = Change::Create(object(
            Kind::Destination,
            serde_json::json!(
            {"name": "slow", "url": "https://slow.example/", "timeout": "2m"}),
        ));
        let (managed, c) = managed.apply(&file, &slow).unwrap();
        let routing = Routing::from_config(Arc::new(c), Some(&routing));
        assert_eq!(routing.longest_timeout, 120_000);
        let (_, c) = managed
            .apply(&file, &Change::Delete(Kind::Destination, "slow".into()))
            .unwrap();
        let routing = Routing::from_config(Arc::new(c), Some(&routing));
        assert_eq!(routing.longest_timeout, 30_000);
    }
}
