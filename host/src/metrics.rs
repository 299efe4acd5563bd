//! Prometheus metrics: what each stage counts, and the gauges read from the store and the
//! dispatcher when `/metrics` is scraped.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub source: String,
    /// `accepted`, `duplicate`, or `rejected_<reason>`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: String,
    /// The first 12 hex digits of the plugin's SHA-256.
    pub version: String,
    /// One of [`PLUGIN_OUTCOMES`].
    pub outcome: String,
}

/// What a plugin call can end in (the pipeline's names).
pub const PLUGIN_OUTCOMES: [&str; 7] = [
    "drop", "continue", "route", "error", "trap", "deadline", "output",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginStateLabels {
    pub plugin: String,
    /// `get`, `set`, `swap`, `swap_lost` (the key held something else), `remove`, `refused`
    /// (a key or value over the limits).
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginHttpLabels {
    pub plugin: String,
    /// The status class of the response (`2xx`, `3xx`, `4xx`, `5xx`), or `refused` (not
    /// allowed: an origin the route does not grant, a method a dry run does not send, the
    /// address guard) or `failed` (not sent or not answered in time, a body too large).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    /// `delivering`, `dropped`, `failed` (dead-lettered or dropped by `on_error`: see the
    /// plugin calls' outcomes for which).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationOnly {
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub destination: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceOnly {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// The config key that names it: `server.tls`, `delivery.client_certificate`,
    /// `delivery.ca_certificates[0]`, ...
    pub certificate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// The values of `destination_state`'s `state` label.
const DESTINATION_STATES: [&str; 3] = ["ACTIVE", "FAILED", "DISABLED"];

/// The values of `deliveries`' `outcome` label (see `Metrics::delivery`).
const DELIVERY_OUTCOMES: [&str; 3] = ["delivered", "failed", "skipped"];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric of one gateway, and the requests refused lately that the sources' views
/// show.
pub struct Metrics {
    registry: Registry,
    pub events: Family<EventLabels, Counter>,
    pub ingest_latency: HistogramFamily<SourceOnly>,
    /// Unix seconds (with milliseconds) of each source's latest accepted event.
    pub last_accepted: Family<SourceOnly, Gauge<f64, AtomicU64>>,
    pub plugin_calls: HistogramFamily<PluginLabels>,
    pub routes: Family<RouteLabels, Counter>,
    pub deliveries: Family<DestinationLabels, Counter>,
    pub delivery_latency: HistogramFamily<DestinationOnly>,
    /// Unix seconds (with milliseconds) of each destination's latest delivery.
    pub last_delivered: Family<DestinationOnly, Gauge<f64, AtomicU64>>,
    pub attempts: Family<DestinationLabels, Counter>,
    pub deferred: Family<DestinationOnly, Counter>,
    pub oauth2_tokens: Family<DestinationLabels, Counter>,
    /// Test messages (by hand, a restart's, `restart_after`'s), by destination and outcome.
    pub tests: Family<DestinationLabels, Counter>,
    /// Plugins' uses of `state`, by plugin and operation.
    pub plugin_state: Family<PluginStateLabels, Counter>,
    /// Plugins' HTTP requests (`http.send`), by plugin and outcome.
    pub plugin_http: Family<PluginHttpLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    /// Routes made through the API that cannot work as they are (`ReloadReport::route_errors`).
    pub broken_routes: Gauge,
    pub queue_depth: Gauge,
    pub store_unanswered_seconds: Gauge,
    pub pending_deliveries: Gauge,
    pub oldest_pending_seconds: Gauge,
    pub destination_state: Family<StateLabels, Gauge>,
    pub certificate_expiry: Family<CertificateLabels, Gauge>,
    /// The certificates whose expiry the last scrape set.
    certificate_names: Mutex<HashSet<String>>,
    /// The destinations whose states the last scrape set.
    state_names: Mutex<HashSet<String>>,
    /// The destinations whose series the last scrape dropped.
    dropped_names: Mutex<HashSet<String>>,
    /// The plugin versions the last reload retired (see `retire_plugin_versions`).
    retired: Mutex<Vec<(String, String)>>,
    /// The label sets `events_received` and `route_outcomes` have series for (see
    /// `forget_removed`): written when a series is made, not per event.
    event_series: Mutex<HashSet<EventLabels>>,
    route_series: Mutex<HashSet<RouteLabels>>,
    plugin_state_series: Mutex<HashSet<PluginStateLabels>>,
    plugin_http_series: Mutex<HashSet<PluginHttpLabels>>,
    /// The requests to each source refused lately.
    pub refusals: crate::ingest::Refusals,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("switchyard");
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events_received",
            "Events received, by source and result",
            events.clone(),
        );
        // 100 µs to ~6.5 s: a group commit's sync is a millisecond or two on a sound disk.
        let ingest_latency: HistogramFamily<SourceOnly> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_1, 2.0, 17)));
        registry.register(
            "ingest_seconds",
            "Time to accept an event, from its request's headers to the 202 (the body read and its commit synced), by source",
            ingest_latency.clone(),
        );
        let last_accepted = Family::<SourceOnly, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "source_last_accepted_timestamp_seconds",
            "When this instance last accepted an event of the source, as a Unix time: alert when a sender goes quiet",
            last_accepted.clone(),
        );
        let plugin_calls: HistogramFamily<PluginLabels> = Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_005, 2.0, 18))
        });
        registry.register(
            "plugin_call_seconds",
            "Duration of plugin calls, by plugin, version and outcome",
            plugin_calls.clone(),
        );
        let routes = Family::<RouteLabels, Counter>::default();
        registry.register(
            "route_outcomes",
            "Events that went through a route, by route and result",
            routes.clone(),
        );
        let deliveries = Family::<DestinationLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Deliveries that reached a final state, by destination and outcome",
            deliveries.clone(),
        );
        // 1 ms to ~70 minutes: retries wait up to hours, and those are counted too.
        let delivery_latency: HistogramFamily<DestinationOnly> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 4.0, 12)));
        registry.register(
            "delivery_latency_seconds",
            "Time from receiving an event to a destination's successful answer, by destination",
            delivery_latency.clone(),
        );
        let last_delivered = Family::<DestinationOnly, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "destination_last_delivered_timestamp_seconds",
            "When this instance last delivered an event to the destination, as a Unix time: alert when a receiver stops getting anything",
            last_delivered.clone(),
        );
        let attempts = Family::<DestinationLabels, Counter>::default();
        registry.register(
            "delivery_attempts",
            "HTTP attempts, by destination and outcome",
            attempts.clone(),
        );
        let deferred = Family::<DestinationOnly, Counter>::default();
        registry.register(
            "deliveries_deferred",
            "Deliveries put off by their destination's rate limit, by destination",
            deferred.clone(),
        );
        let oauth2_tokens = Family::<DestinationLabels, Counter>::default();
        registry.register(
            "oauth2_token_requests",
            "Requests for an OAuth 2.0 token, by destination and outcome (ok, failed)",
            oauth2_tokens.clone(),
        );
        let tests = Family::<DestinationLabels, Counter>::default();
        registry.register(
            "destination_tests",
            "Test messages sent to a destination (by hand, before a restart, or by restart_after), by outcome (passed, failed)",
            tests.clone(),
        );
        let plugin_state = Family::<PluginStateLabels, Counter>::default();
        registry.register(
            "plugin_state_operations",
            "Plugins' uses of the values they keep between events (state), by plugin and operation (get, set, swap, swap_lost, remove, refused)",
            plugin_state.clone(),
        );
        let plugin_http = Family::<PluginHttpLabels, Counter>::default();
        registry.register(
            "plugin_http_requests",
            "Plugins' HTTP requests (http.send), by plugin and outcome (2xx, 3xx, 4xx, 5xx, refused, failed)",
            plugin_http.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register("reloads", "Reloads, by result (ok, error)", reloads.clone());
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Events accepted and not yet processed",
            queue_depth.clone(),
        );
        let store_unanswered_seconds = Gauge::default();
        registry.register(
            "store_unanswered_seconds",
            "How long the store has stored none of the events waiting for it (0 when none wait): a store that stopped answering",
            store_unanswered_seconds.clone(),
        );
        let broken_routes = Gauge::default();
        registry.register(
            "broken_routes",
            "Routes made through the API that cannot work as they are (their plugin missing, or refusing their configuration since a start or reload): their events fail at that plugin until they are changed",
            broken_routes.clone(),
        );
        let pending_deliveries = Gauge::default();
        registry.register(
            "pending_deliveries",
            "Deliveries waiting for an attempt",
            pending_deliveries.clone(),
        );
        let oldest_pending_seconds = Gauge::default();
        registry.register(
            "oldest_pending_delivery_age_seconds",
            "Age of the oldest pending delivery",
            oldest_pending_seconds.clone(),
        );
        let destination_state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "destination_state",
            "1 for each destination's current state (ACTIVE, FAILED, DISABLED)",
            destination_state.clone(),
        );
        let certificate_expiry = Family::<CertificateLabels, Gauge>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When each certificate in force stops being valid (the earliest notAfter of its chain), by the config key naming it",
            certificate_expiry.clone(),
        );
        Self {
            registry,
            events,
            ingest_latency,
            last_accepted,
            plugin_calls,
            routes,
            deliveries,
            delivery_latency,
            last_delivered,
            attempts,
            deferred,
            oauth2_tokens,
            tests,
            plugin_state,
            plugin_http,
            reloads,
            broken_routes,
            queue_depth,
            store_unanswered_seconds,
            pending_deliveries,
            oldest_pending_seconds,
            destination_state,
            certificate_expiry,
            certificate_names: Mutex::default(),
            state_names: Mutex::default(),
            dropped_names: Mutex::default(),
            retired: Mutex::default(),
            event_series: Mutex::default(),
            route_series: Mutex::default(),
            plugin_state_series: Mutex::default(),
            plugin_http_series: Mutex::default(),
            refusals: Default::default(),
        }
    }
}

/// A lock whose holder cannot leave it half-written (a set of names): a panic elsewhere
/// does not stop the metrics.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts one in `family`'s series of `labels`, noting in `series` the label sets it makes
/// (looked up first, so that the set is written only then, not per count).
fn count_tracked<L>(family: &Family<L, Counter>, series: &Mutex<HashSet<L>>, labels: L)
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug,
{
    if let Some(counter) = family.get(&labels) {
        counter.inc();
        return;
    }
    family.get_or_create(&labels).inc();
    lock(series).insert(labels);
}

/// A timestamp gauge's value (Unix seconds) in milliseconds, if it has a series of `labels`.
fn ms_of<L>(family: &Family<L, Gauge<f64, AtomicU64>>, labels: &L) -> Option<u64>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug,
{
    family
        .get(labels)
        .map(|g| (g.get() * 1000.0).round() as u64)
}

impl Metrics {
    /// Records how long an accepted event took to accept.
    pub fn accepted_after(&self, source: &str, seconds: f64) {
        let source = SourceOnly {
            source: source.to_string(),
        };
        self.ingest_latency.get_or_create(&source).observe(seconds);
        let now = crate::delivery::now_ms() as f64 / 1000.0;
        self.last_accepted.get_or_create(&source).set(now);
    }

    /// When this instance last accepted an event of `source` (ms since the Unix epoch), if
    /// it has since it started.
    pub fn last_accepted_ms(&self, source: &str) -> Option<u64> {
        let only = SourceOnly {
            source: source.to_string(),
        };
        ms_of(&self.last_accepted, &only)
    }

    /// Counts an ingest request.
    pub fn event(&self, source: &str, result: &str) {
        let labels = EventLabels {
            source: source.to_string(),
            result: result.to_string(),
        };
        count_tracked(&self.events, &self.event_series, labels);
    }

    /// Drops every series of the sources `has_source` says are gone, and the refusals kept
    /// for them: a source removed would otherwise keep its
    /// `source_last_accepted_timestamp_seconds` (and an alert on a quiet sender firing) until
    /// the next start, and a source made again under that name would show the old one's
    /// refusals. Called when a config is installed and at each scrape (a request in flight
    /// at the reload may count after it: its series is made again, and dropped then). One
    /// lookup per source with series or refusals; `unknown`, the label of requests to names
    /// no source has, stays.
    pub fn forget_removed_sources(&self, has_source: impl Fn(&str) -> bool) {
        let kept = |name: &str| name == "unknown" || has_source(name);
        let mut gone = HashSet::new();
        lock(&self.event_series).retain(|labels| {
            let keep = kept(&labels.source);
            if !keep {
                self.events.remove(labels);
                gone.insert(labels.source.clone());
            }
            keep
        });
        for source in gone {
            let only = SourceOnly { source };
            self.ingest_latency.remove(&only);
            self.last_accepted.remove(&only);
        }
        self.refusals.retain(kept);
    }

    /// Counts one use of `state` by a plugin.
    pub fn plugin_state(&self, plugin: &str, operation: &str) {
        let labels = PluginStateLabels {
            plugin: plugin.to_string(),
            operation: operation.to_string(),
        };
        count_tracked(&self.plugin_state, &self.plugin_state_series, labels);
    }

    /// Counts one HTTP request of a plugin (`http.send`), by outcome.
    pub fn plugin_http(&self, plugin: &str, outcome: &str) {
        let labels = PluginHttpLabels {
            plugin: plugin.to_string(),
            outcome: outcome.to_string(),
        };
        count_tracked(&self.plugin_http, &self.plugin_http_series, labels);
    }

    /// Drops the `plugin_state_operations` and `plugin_http_requests` series of plugins
    /// `has_plugin` says are gone. At each scrape (a lookup per plugin with series).
    pub fn forget_removed_plugins(&self, has_plugin: impl Fn(&str) -> bool) {
        lock(&self.plugin_state_series).retain(|labels| {
            let keep = has_plugin(&labels.plugin);
            if !keep {
                self.plugin_state.remove(labels);
            }
            keep
        });
        lock(&self.plugin_http_series).retain(|labels| {
            let keep = has_plugin(&labels.plugin);
            if !keep {
                self.plugin_http.remove(labels);
            }
            keep
        });
    }

    /// Drops the `route_outcomes` series of routes `config` no longer has. At each scrape
    /// (what it costs, a set of the routes' names, is paid only once routes have series).
    pub fn forget_removed_routes(&self, config: &crate::config::Config) {
        let mut series = lock(&self.route_series);
        if series.is_empty() {
            return;
        }
        let routes: HashSet<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        series.retain(|labels| {
            let keep = routes.contains(labels.route.as_str());
            if !keep {
                self.routes.remove(labels);
            }
            keep
        });
    }

    /// Sets each destination's state gauges (1 for its state, 0 for the others), and drops
    /// every series of destinations no longer configured: a removed destination that was
    /// FAILED would otherwise report FAILED until the next start, and keep an alert firing;
    /// its counters would stay for good. Those dropped at the last scrape are dropped once
    /// more (an attempt in flight when it was removed may have counted since), unless the
    /// destination is back.
    pub fn set_destination_states(&self, states: impl IntoIterator<Item = (String, &'static str)>) {
        let mut names = lock(&self.state_names);
        let mut dropped = lock(&self.dropped_names);
        let before = std::mem::take(&mut *names);
        for (destination, current) in states {
            for state in DESTINATION_STATES {
                let labels = StateLabels {
                    destination: destination.clone(),
                    state: state.to_string(),
                };
                self.destination_state
                    .get_or_create(&labels)
                    .set(i64::from(state == current));
            }
            names.insert(destination);
        }
        let gone: HashSet<String> = before.difference(&names).cloned().collect();
        for destination in gone.iter().chain(dropped.difference(&names)) {
            self.drop_destination(destination);
        }
        *dropped = gone;
    }

    /// Sets the expiry of each certificate in force, by its key, and drops the series of
    /// those no longer in force (a reload removed `server.tls`).
    pub fn set_certificate_expiries<'a>(
        &self,
        certificates: impl IntoIterator<Item = (&'a str, crate::edge::Validity)>,
    ) {
        let mut names = lock(&self.certificate_names);
        let before = std::mem::take(&mut *names);
        for (key, validity) in certificates {
            let labels = CertificateLabels {
                certificate: key.to_string(),
            };
            self.certificate_expiry
                .get_or_create(&labels)
                .set(validity.not_after);
            names.insert(labels.certificate);
        }
        for gone in before.difference(&names) {
            self.certificate_expiry.remove(&CertificateLabels {
                certificate: gone.clone(),
            });
        }
    }

    /// Removes every series of one destination.
    fn drop_destination(&self, destination: &str) {
        let destination = destination.to_string();
        for state in DESTINATION_STATES {
            self.destination_state.remove(&StateLabels {
                destination: destination.clone(),
                state: state.to_string(),
            });
        }
        for outcome in DELIVERY_OUTCOMES {
            self.deliveries.remove(&DestinationLabels {
                destination: destination.clone(),
                outcome: outcome.to_string(),
            });
        }
        for outcome in ["success", "failure"] {
            self.attempts.remove(&DestinationLabels {
                destination: destination.clone(),
                outcome: outcome.to_string(),
            });
        }
        for outcome in ["ok", "failed"] {
            self.oauth2_tokens.remove(&DestinationLabels {
                destination: destination.clone(),
                outcome: outcome.to_string(),
            });
        }
        for outcome in ["passed", "failed"] {
            self.tests.remove(&DestinationLabels {
                destination: destination.clone(),
                outcome: outcome.to_string(),
            });
        }
        let only = DestinationOnly { destination };
        self.delivery_latency.remove(&only);
        self.last_delivered.remove(&only);
        self.deferred.remove(&only);
    }

    /// Drops the plugin-call series of plugin versions (name, SHA-256) that a reload
    /// retired — each deploy of a plugin would otherwise add a set of series for good —
    /// and those the previous reload retired once more (a call that was in flight at that
    /// reload may have recorded after it), unless `in_force` says one is back.
    pub fn retire_plugin_versions(
        &self,
        retired: Vec<(String, String)>,
        in_force: impl Fn(&str, &str) -> bool,
    ) {
        let mut last = lock(&self.retired);
        let again = last.iter().filter(|(p, sha)| !in_force(p, sha));
        for (plugin, sha256) in again.chain(&retired) {
            for outcome in PLUGIN_OUTCOMES {
                self.plugin_calls.remove(&PluginLabels {
                    plugin: plugin.clone(),
                    version: sha256.chars().take(12).collect(),
                    outcome: outcome.to_string(),
                });
            }
        }
        *last = retired;
    }

    /// Records one plugin call.
    pub fn plugin_call(&self, plugin: &str, sha256: &str, outcome: &str, seconds: f64) {
        self.plugin_calls
            .get_or_create(&PluginLabels {
                plugin: plugin.to_string(),
                version: sha256.chars().take(12).collect(),
                outcome: outcome.to_string(),
            })
            .observe(seconds);
    }

    /// Counts an event's result on a route, once that result is stored.
    pub fn route_outcome(&self, route: &str, result: &str) {
        let labels = RouteLabels {
            route: route.to_string(),
            result: result.to_string(),
        };
        count_tracked(&self.routes, &self.route_series, labels);
    }

    /// Counts an attempt, and the delivery when the attempt settled it.
    pub fn attempt(&self, destination: &str, success: bool, settled: Option<&str>) {
        let outcome = if success { "success" } else { "failure" };
        self.attempts
            .get_or_create(&DestinationLabels {
                destination: destination.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        if let Some(outcome) = settled {
            self.delivery(destination, outcome);
        }
    }

    /// Records a delivery that succeeded at `now_ms`, `seconds` after its event's receipt.
    pub fn delivered_after(&self, destination: &str, seconds: f64, now_ms: u64) {
        let only = DestinationOnly {
            destination: destination.to_string(),
        };
        self.delivery_latency.get_or_create(&only).observe(seconds);
        let at = now_ms as f64 / 1000.0;
        self.last_delivered.get_or_create(&only).set(at);
    }

    /// When this instance last delivered to `destination` (ms since the Unix epoch), if it
    /// has since it started.
    pub fn last_delivered_ms(&self, destination: &str) -> Option<u64> {
        let only = DestinationOnly {
            destination: destination.to_string(),
        };
        ms_of(&self.last_delivered, &only)
    }

    /// A request for an OAuth 2.0 token for `destination`, and whether it got one.
    pub fn oauth2_token(&self, destination: &str, ok: bool) {
        self.oauth2_tokens
            .get_or_create(&DestinationLabels {
                destination: destination.to_string(),
                outcome: if ok { "ok" } else { "failed" }.to_string(),
            })
            .inc();
    }

    /// A test message to `destination`, and whether it passed.
    pub fn destination_test(&self, destination: &str, passed: bool) {
        self.tests
            .get_or_create(&DestinationLabels {
                destination: destination.to_string(),
                outcome: if passed { "passed" } else { "failed" }.to_string(),
            })
            .inc();
    }

    /// A delivery put off by its destination's rate limit.
    pub fn deferred(&self, destination: &str) {
        self.deferred
            .get_or_create(&DestinationOnly {
                destination: destination.to_string(),
            })
            .inc();
    }

    /// Counts a delivery that reached a final state.
    pub fn delivery(&self, destination: &str, outcome: &str) {
        self.deliveries
            .get_or_create(&DestinationLabels {
                destination: destination.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "Cannot encode metrics.");
        }
        out
    }
}
