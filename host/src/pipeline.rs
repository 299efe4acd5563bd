//! The plugin-chain stage: takes queued events from the store, runs each route of the
//! event's source through its chain of plugins, and hands the resulting deliveries to the
//! delivery stage.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use tracing::Instrument;

use crate::config::{Config, InstanceMode, OnError, SourceConfig};
use crate::delivery::{
    Destination, Dispatcher, PlaceholderValues, PlannedDelivery, delivery_id, render,
};
use crate::event::{Body, Event, Pairs, merge_pairs};
use crate::metrics::Metrics;
use crate::plugin::{CallError, CallLimits, PluginMap, PluginRegistry, PluginVerdict};
use crate::store::{
    DeliveryStatus, DueDelivery, PluginStep, RouteOutcome, RouteResult, StepResult, Store,
};

/// Sources, destinations and routes as the pipeline uses them; swapped whole on reload.
pub struct Routing {
    sources: HashMap<String, Arc<SourceConfig>>,
    destinations: HashMap<String, Arc<Destination>>,
    routes: Vec<Route>,
    /// Each source's routes (indexes into `routes`), in config order: an event looks at
    /// its own source's routes only, however many others there are.
    routes_by_source: HashMap<String, Vec<usize>>,
}

struct Route {
    index: usize,
    name: String,
    source: String,
    plugins: Vec<RoutePlugin>,
    destinations: Vec<Arc<Destination>>,
    on_error: OnError,
}

struct RoutePlugin {
    name: String,
    config: Arc<[(String, String)]>,
    limits: CallLimits,
    /// `None`: the plugin's default mode.
    mode: Option<InstanceMode>,
}

impl Routing {
    /// Builds the routing table from a validated config.
    pub fn from_config(config: &Config) -> Self {
        let destinations: HashMap<String, Arc<Destination>> = config
            .destinations
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    Arc::new(Destination::from_config(d, &config.delivery.retry)),
                )
            })
            .collect();
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(index, r)| Route {
                index,
                name: r.name.clone(),
                source: r.source.clone(),
                plugins: r
                    .plugins
                    .iter()
                    .map(|p| RoutePlugin {
                        name: p.name.clone(),
                        config: p.config.clone().into(),
                        limits: CallLimits {
                            deadline: p.deadline.unwrap_or(config.plugins.deadline),
                            max_memory: p
                                .max_memory_bytes
                                .unwrap_or(config.plugins.max_memory_bytes),
                            max_output_bytes: config.plugins.max_output_bytes,
                            max_deliveries: config.plugins.max_deliveries,
                        },
                        mode: p.instance,
                    })
                    .collect(),
                on_error: r.on_error,
                destinations: r
                    .destinations
                    .iter()
                    .map(|d| destinations[d].clone())
                    .collect(),
            })
            .collect::<Vec<Route>>();
        let mut routes_by_source: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            routes_by_source
                .entry(r.source.clone())
                .or_default()
                .push(i);
        }
        Self {
            sources: (config.sources.iter())
                .map(|s| (s.name.clone(), Arc::new(s.clone())))
                .collect(),
            destinations,
            routes,
            routes_by_source,
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
    pub fn destinations(&self) -> &HashMap<String, Arc<Destination>> {
        &self.destinations
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
}

impl Pipeline {
    pub fn new(
        store: Arc<dyn Store>,
        plugins: Arc<PluginRegistry>,
        routing: Arc<Routing>,
        dispatcher: Arc<Dispatcher>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(Self {
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

    /// Processes events until the store is closed and drained.
    pub async fn run(self: Arc<Self>, workers: usize) {
        let mut handles = Vec::new();
        for _ in 0..workers.max(1) {
            let this = self.clone();
            handles.push(tokio::spawn(async move {
                while let Some(event) = this.store.next_event().await {
                    let span = tracing::info_span!("pipeline", event_id = %event.id, source = %event.source);
                    this.process(event).instrument(span).await;
                }
            }));
        }
        for h in handles {
            if let Err(e) = h.await {
                tracing::error!(error = %e, "Pipeline worker ended abnormally.");
            }
        }
    }

    /// Runs every route of the event's source, then stores the outcomes and the deliveries
    /// they decided in one commit and wakes the dispatcher.
    async fn process(&self, event: Event) {
        // One snapshot of routes and plugins per event: each event is processed by exactly
        // one version of each plugin, whatever reloads happen meanwhile.
        let routing = self.routing();
        let plugin_versions = self.plugins.snapshot();
        let event = Arc::new(event);
        let values = PlaceholderValues::of(&event);
        let mut outcomes = Vec::new();
        let mut deliveries = Vec::new();
        for &route_index in routing.routes_of(&event.source) {
            let permit = self.cpu.acquire().await;
            // A panic in a chain fails this route, not the pipeline worker.
            let route = &routing.routes[route_index];
            let chain = AssertUnwindSafe(run_chain(
                &routing,
                route,
                &plugin_versions,
                &event,
                &self.metrics,
            ))
            .catch_unwind()
            .await;
            drop(permit);
            let (steps, end) = match chain {
                Ok(result) => result,
                Err(panic) => (
                    Vec::new(),
                    ChainEnd::Failed(format!("plugin chain panicked: {}", panic_message(&*panic))),
                ),
            };
            let route = routing.routes[route_index].index;
            let result = match end {
                ChainEnd::Dropped { plugin, reason } => {
                    tracing::info!(route, plugin, reason, "Event dropped.");
                    RouteResult::Dropped { plugin, reason }
                }
                ChainEnd::Failed(error) => {
                    tracing::warn!(route, error, "Route failed for this event.");
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
            if d.status == DeliveryStatus::Pending && self.dispatcher.is_active(&d.destination) {
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
                };
                (due, held)
            })
            .collect();
        match self
            .store
            .complete_event(&event, outcomes, deliveries, now)
            .await
        {
            Ok(leased) => {
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

/// Runs one route's plugins in order on an event.
async fn run_chain(
    routing: &Routing,
    route: &Route,
    plugins: &PluginMap,
    received: &Event,
    metrics: &Metrics,
) -> (Vec<PluginStep>, ChainEnd) {
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
        let result = plugin
            .call(&event, rp.config.clone(), rp.limits, mode)
            .await;
        let outcome = match &result {
            Ok(PluginVerdict::Drop { .. }) => "drop",
            Ok(PluginVerdict::Continue(_)) => "continue",
            Ok(PluginVerdict::Route { .. }) => "route",
            Err(CallError::Plugin(_)) => "error",
            Err(CallError::Trap(_)) => "trap",
            Err(CallError::Deadline(_)) => "deadline",
            Err(CallError::Output(_)) => "output",
        };
        metrics.plugin_call(
            &rp.name,
            plugin.sha256(),
            outcome,
            started.elapsed().as_secs_f64(),
        );
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
                tracing::warn!(plugin = %rp.name, sha256 = plugin.sha256(), error = %e,
                    on_error = ?route.on_error, "Plugin failed.");
                step.result = StepResult::Error {
                    error: e.to_string(),
                };
                steps.push(step);
                match route.on_error {
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
                        route.index,
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
                route.index,
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
