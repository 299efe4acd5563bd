//! Configuration: TOML file → `${VAR}` expansion → `SWITCHYARD_*` overrides → a validated
//! [`Config`]. Errors name the key (and the file) so users can fix them at once.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Reads an environment variable. Injected so that tests never touch the process
/// environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// A configuration problem, naming the key where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: invalid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Key {
        origin: String,
        key: String,
        message: String,
    },
}

/// The validated configuration of a gateway.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub plugins: PluginsConfig,
    pub delivery: DeliveryConfig,
    pub retention: RetentionConfig,
    pub api: ApiConfig,
    pub store: StoreConfig,
    /// The objects, each shared between the configs it is part of: a management API
    /// change makes a new config that shares all but the object changed.
    pub sources: Vec<Arc<SourceConfig>>,
    pub destinations: Vec<Arc<DestinationConfig>>,
    pub routes: Vec<Arc<RouteConfig>>,
    /// `[tables]`: the lookup tables plugins read (`host.lookup`), read from their files
    /// by this load.
    pub tables: Arc<crate::tables::Tables>,
    /// The files this load read for `${file:PATH}` references.
    pub referenced_files: Vec<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    plugins: RawPlugins,
    #[serde(default)]
    delivery: DeliveryConfig,
    #[serde(default)]
    retention: RetentionConfig,
    #[serde(default)]
    api: ApiConfig,
    #[serde(default)]
    store: StoreConfig,
    #[serde(default)]
    sources: Vec<SourceConfig>,
    #[serde(default)]
    destinations: Vec<DestinationConfig>,
    #[serde(default)]
    routes: Vec<RouteConfig>,
    /// Lookup tables by name: each one's file, `.csv` or `.json`.
    #[serde(default)]
    tables: std::collections::BTreeMap<String, PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_queue_capacity")]
    queue_capacity: usize,
    #[serde(default = "default_queue_max_bytes")]
    queue_max_bytes: usize,
    #[serde(default = "default_idempotency_window", with = "humantime_serde")]
    idempotency_window: Duration,
    #[serde(default)]
    trusted_proxies: Vec<ipnet::IpNet>,
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    header_read_timeout: Duration,
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    body_read_timeout: Duration,
    #[serde(default)]
    tls: Option<RawServerTls>,
}

/// `server.tls` as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    client_ca: Option<PathBuf>,
    #[serde(default)]
    client_crl: Option<PathBuf>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            data_dir: default_data_dir(),
            max_body_bytes: default_max_body(),
            queue_capacity: default_queue_capacity(),
            queue_max_bytes: default_queue_max_bytes(),
            idempotency_window: default_idempotency_window(),
            trusted_proxies: Vec::new(),
            tls: None,
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
        }
    }
}

fn default_idempotency_window() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Longer than the 90 s common HTTP clients (Go's, reqwest) keep an idle connection: the
/// client closes it first, rather than sending a request on a connection the gateway is
/// closing that very moment (the request fails and has to be sent again).
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(100)
}

fn default_body_read_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_data_dir() -> PathBuf {
    "./data".into()
}
fn default_max_body() -> usize {
    1 << 20
}
fn default_queue_capacity() -> usize {
    10_000
}
fn default_queue_max_bytes() -> usize {
    crate::store::QUEUE_MAX_BYTES
}

/// `[server]`.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Largest accepted ingest body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Events accepted but not yet processed; beyond it ingest answers 503.
    pub queue_capacity: usize,
    /// Bytes (bodies and headers) of the events waiting; beyond it ingest answers 503.
    pub queue_max_bytes: usize,
    /// A repeated idempotency key within this window returns the original event.
    pub idempotency_window: Duration,
    /// Proxies whose `X-Forwarded-For` is believed when checking `allow_ips`.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// How long a connection may take to send a request's headers — also how long an
    /// idle keep-alive connection stays open; past it the connection is closed.
    pub header_read_timeout: Duration,
    /// How long an ingest request may take to send its body; past it, `408`.
    pub body_read_timeout: Duration,
    /// `server.tls`: HTTPS on `listen` with this certificate, read at start and at each
    /// reload (a renewed certificate is served from the next connection on).
    pub tls: Option<ServerTls>,
}

/// `server.tls` as loaded: the files, and what was read from them.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub files: CertificateFiles,
    /// `server.tls.client_ca`: the authorities whose certificates senders may present.
    pub client_ca: Option<PathBuf>,
    pub acceptor: Arc<rustls::ServerConfig>,
    /// When the chain read stops being valid (`/metrics` shows it).
    pub validity: crate::edge::Validity,
    /// When the first of `client_ca`'s certificates stops being valid.
    pub client_ca_validity: Option<crate::edge::Validity>,
    /// `server.tls.client_crl`: the revocation lists of `client_ca`'s authorities.
    pub client_crl: Option<PathBuf>,
    /// From `thisUpdate` to `nextUpdate` of `client_crl`'s list whose next is due first.
    pub client_crl_validity: Option<crate::edge::Validity>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugins {
    #[serde(default = "default_plugin_dir")]
    dir: PathBuf,
    #[serde(default = "default_deadline", with = "humantime_serde")]
    deadline: Duration,
    #[serde(default = "default_max_memory")]
    max_memory_bytes: usize,
    #[serde(default = "default_max_output")]
    max_output_bytes: usize,
    #[serde(default = "default_max_deliveries")]
    max_deliveries: usize,
    #[serde(default = "default_warm_pool")]
    warm_pool_size: usize,
    #[serde(default = "default_warm_recycle")]
    warm_recycle_after: u32,
    #[serde(default = "default_degraded_after")]
    degraded_after: u32,
    #[serde(default = "default_state_ttl", with = "humantime_serde")]
    state_ttl: Duration,
    #[serde(default = "default_state_max_value")]
    state_max_value_bytes: usize,
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    http_timeout: Duration,
    #[serde(default = "default_http_max_response")]
    http_max_response_bytes: usize,
    #[serde(default = "default_http_concurrency")]
    http_concurrency: usize,
    #[serde(default)]
    http_rate_limit: BTreeMap<String, f64>,
}

impl Default for RawPlugins {
    fn default() -> Self {
        Self {
            dir: default_plugin_dir(),
            deadline: default_deadline(),
            max_memory_bytes: default_max_memory(),
            max_output_bytes: default_max_output(),
            max_deliveries: default_max_deliveries(),
            warm_pool_size: default_warm_pool(),
            warm_recycle_after: default_warm_recycle(),
            degraded_after: default_degraded_after(),
            state_ttl: default_state_ttl(),
            state_max_value_bytes: default_state_max_value(),
            http_timeout: default_http_timeout(),
            http_max_response_bytes: default_http_max_response(),
            http_concurrency: default_http_concurrency(),
            http_rate_limit: BTreeMap::new(),
        }
    }
}

fn default_state_ttl() -> Duration {
    crate::plugin::StateLimits::default().ttl
}
fn default_state_max_value() -> usize {
    crate::plugin::StateLimits::default().max_value_bytes
}
fn default_http_timeout() -> Duration {
    crate::plugin::HttpLimits::default().timeout
}
fn default_http_max_response() -> usize {
    crate::plugin::HttpLimits::default().max_response_bytes
}
fn default_http_concurrency() -> usize {
    crate::plugin::HttpLimits::default().concurrency
}

fn default_max_output() -> usize {
    1 << 20
}
fn default_max_deliveries() -> usize {
    64
}
fn default_warm_pool() -> usize {
    4
}
fn default_warm_recycle() -> u32 {
    1000
}
fn default_degraded_after() -> u32 {
    5
}

fn default_plugin_dir() -> PathBuf {
    "./plugins.d".into()
}
fn default_deadline() -> Duration {
    Duration::from_millis(100)
}
fn default_max_memory() -> usize {
    64 << 20
}

/// `[plugins]`.
#[derive(Clone, Debug)]
pub struct PluginsConfig {
    /// Every `*.wasm` here is a plugin, named by its file stem.
    pub dir: PathBuf,
    /// Wall-clock budget of one plugin call.
    pub deadline: Duration,
    /// Memory cap of one plugin instance.
    pub max_memory_bytes: usize,
    /// The largest body a verdict may return (continue or per delivery).
    pub max_output_bytes: usize,
    /// The most deliveries one `route` verdict may list.
    pub max_deliveries: usize,
    /// Warm instances kept per plugin.
    pub warm_pool_size: usize,
    /// A warm instance is replaced after this many events.
    pub warm_recycle_after: u32,
    /// Consecutive failures after which a plugin is reported degraded.
    pub degraded_after: u32,
    /// How long a value a plugin keeps (WIT `state`) lasts when the plugin names no time,
    /// and the longest it may name.
    pub state_ttl: Duration,
    /// The largest value a plugin may keep, in bytes.
    pub state_max_value_bytes: usize,
    /// How long one call's HTTP requests (WIT `http`) may take together.
    pub http_timeout: Duration,
    /// The largest response body a plugin's HTTP request may read, in bytes.
    pub http_max_response_bytes: usize,
    /// Plugins' HTTP requests in flight at once to one granted origin.
    pub http_concurrency: usize,
    /// Plugins' HTTP requests a second to an origin (`https://*.example.com`: to its
    /// subdomains without a limit of their own, together), between all the gateways
    /// sharing the store.
    pub http_rate_limit: BTreeMap<String, f64>,
}

/// `[delivery]`: how deliveries are sent and retried (destinations may override the
/// retry policy).
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "RawDelivery")]
pub struct DeliveryConfig {
    /// Timeout of one HTTP attempt.
    pub timeout: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Deliveries in flight at once to one destination (half of `concurrency` unless
    /// set): a destination that hangs holds at most these, and the others keep the rest.
    pub destination_concurrency: usize,
    /// Of `concurrency`, the permits kept for destinations with fewer than an eighth of
    /// these in flight (a quarter unless set; 0: none kept), so that destinations that
    /// hang, however many, leave the others permits.
    pub reserved_concurrency: usize,
    /// The default retry policy of destinations.
    pub retry: RetryPolicy,
    /// Networks deliveries may reach although the SSRF guard refuses them by default
    /// (loopback, private, link-local, shared).
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// A source that receives an event each time a destination changes state
    /// (`destination.failed`, `destination.disabled`, `destination.active`), for routes to
    /// take to an operator.
    pub notify_source: Option<String>,
    /// PEM files of certificate authorities that HTTPS destinations may be signed by,
    /// besides the system's (an internal CA).
    pub ca_certificates: Vec<PathBuf>,
    /// The certificate deliveries present to HTTPS destinations that ask for one (mutual
    /// TLS).
    pub client_certificate: Option<CertificateFiles>,
    /// An HTTP(S) proxy every delivery goes through (`http://user:pass@host:port`); the
    /// environment's `HTTP_PROXY`/`HTTPS_PROXY` are not used.
    pub proxy: Option<String>,
}

/// PEM files of a certificate (chain) and its private key: `delivery.client_certificate`,
/// `server.tls`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[delivery]` as written: every key at one level, unknown keys rejected.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
    #[serde(default)]
    destination_concurrency: Option<usize>,
    #[serde(default)]
    reserved_concurrency: Option<usize>,
    #[serde(default = "default_schedule", with = "humantime_serde_vec")]
    retry_schedule: Vec<Duration>,
    #[serde(default = "default_jitter")]
    jitter: f64,
    #[serde(default = "default_failure_threshold")]
    failure_threshold: u32,
    #[serde(default)]
    retry_client_errors: bool,
    #[serde(default, with = "humantime_serde")]
    restart_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_event_age: Option<Duration>,
    #[serde(default)]
    allowed_networks: Vec<ipnet::IpNet>,
    #[serde(default)]
    notify_source: Option<String>,
    #[serde(default)]
    ca_certificates: Vec<PathBuf>,
    #[serde(default)]
    client_certificate: Option<CertificateFiles>,
    #[serde(default)]
    proxy: Option<String>,
}

impl From<RawDelivery> for DeliveryConfig {
    fn from(r: RawDelivery) -> Self {
        Self {
            timeout: r.timeout,
            concurrency: r.concurrency,
            destination_concurrency: (r.destination_concurrency)
                .unwrap_or_else(|| default_destination_concurrency(r.concurrency)),
            reserved_concurrency: (r.reserved_concurrency)
                .unwrap_or_else(|| default_reserved_concurrency(r.concurrency)),
            retry: RetryPolicy {
                retry_schedule: r.retry_schedule,
                jitter: r.jitter,
                failure_threshold: r.failure_threshold,
                retry_client_errors: r.retry_client_errors,
                restart_after: r.restart_after.filter(|d| !d.is_zero()),
                max_event_age: r.max_event_age.filter(|d| !d.is_zero()),
            },
            allowed_networks: r.allowed_networks,
            notify_source: r.notify_source,
            ca_certificates: r.ca_certificates,
            client_certificate: r.client_certificate,
            proxy: r.proxy,
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            timeout: default_timeout(),
            concurrency: default_concurrency(),
            destination_concurrency: default_destination_concurrency(default_concurrency()),
            reserved_concurrency: default_reserved_concurrency(default_concurrency()),
            allowed_networks: Vec::new(),
            retry: RetryPolicy::default(),
            notify_source: None,
            ca_certificates: Vec::new(),
            client_certificate: None,
            proxy: None,
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_destination_concurrency(concurrency: usize) -> usize {
    (concurrency / 2).max(1)
}
fn default_reserved_concurrency(concurrency: usize) -> usize {
    concurrency / 4
}
/// The most `delivery.concurrency` may be: attempts in flight at once, each a connection.
pub const MAX_CONCURRENCY: usize = 65_536;

fn default_concurrency() -> usize {
    256
}

/// When to retry a delivery and when to give up on a destination.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// The wait before each attempt: the first entry before the first attempt (normally
    /// 0), and so on. Its length is the number of attempts of a delivery.
    pub retry_schedule: Vec<Duration>,
    /// Each wait between attempts is lengthened by a random fraction up to this, so retries
    /// spread out (the first attempt's wait is not).
    pub jitter: f64,
    /// Consecutive failed attempts after which the destination is FAILED.
    pub failure_threshold: u32,
    /// Retry 4xx answers other than 408, 410 and 429 (by default they fail the delivery).
    pub retry_client_errors: bool,
    /// A FAILED destination is sent a test message this long after it failed, and again
    /// every this long while the test fails; one that passes makes it ACTIVE, as a restart
    /// does. `None` (the default, 1NCE's way): it stays FAILED until restarted by hand.
    pub restart_after: Option<Duration>,
    /// A delivery whose event was received longer ago than this is not sent: it fails
    /// (expired) when its attempt comes — a retry, a backlog after an outage or a restart —
    /// so a receiver never gets news that is stale. `None` (the default): no limit.
    pub max_event_age: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retry_schedule: default_schedule(),
            jitter: default_jitter(),
            failure_threshold: default_failure_threshold(),
            retry_client_errors: false,
            restart_after: None,
            max_event_age: None,
        }
    }
}

fn default_schedule() -> Vec<Duration> {
    [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}
fn default_jitter() -> f64 {
    0.2
}
fn default_failure_threshold() -> u32 {
    5
}

/// Serde for a list of human-readable durations (`["0s", "5s", "5m"]`).
mod humantime_serde_vec {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(items: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            items
                .iter()
                .map(|d| humantime::format_duration(*d).to_string()),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let items = Vec::<String>::deserialize(d)?;
        items
            .iter()
            .map(|s| {
                humantime::parse_duration(s)
                    .map_err(|e| serde::de::Error::custom(format!("`{s}`: {e}")))
            })
            .collect()
    }
}

/// `[api]`: who may use the management API (everything under `/v1` but ingest).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer tokens accepted in `Authorization: Bearer <token>`. Without any, the
    /// management API answers 401 to everyone.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Bearer tokens that may only read (`GET`): for a support desk's dashboard, a
    /// monitoring script. Anything else they ask answers 403.
    #[serde(default)]
    pub read_tokens: Vec<String>,
}

/// `[store]`: where events and deliveries are kept.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://user:password@host/db` selects PostgreSQL (several gateways can share
    /// it); without it the SQLite file `switchyard.db` in the data dir is used.
    /// `SWITCHYARD_STORE_URL` overrides it.
    #[serde(default)]
    pub url: Option<String>,
    /// How long a claim lasts: on an accepted event (renewed while the gateway holds it),
    /// and on a delivery being attempted (on top of `delivery.timeout`). When a gateway
    /// dies, what it held is taken over after this long — by another instance on a shared
    /// store, or by the same one when it restarts on PostgreSQL.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// Body fields (`sim.iccid`: object keys separated by dots) the store keeps an index
    /// on, so that `GET /v1/events?field=…&equals=…` by one of them reads only the events
    /// that hold the value instead of every body. Each costs a little on every event
    /// stored; adding one reads every event stored to build its index.
    #[serde(default)]
    pub indexed_fields: Vec<String>,
    /// Seals the objects made through the management API in the store (AES-256-GCM;
    /// see `seal.rs`): a random text of at least 32 characters, best read from a file
    /// (`${file:…}`). Unset: stored as JSON text.
    #[serde(default)]
    pub encryption_key: Option<String>,
    /// Keys that sealed objects before `encryption_key`: they still open them, and each
    /// reload seals those again with `encryption_key`.
    #[serde(default)]
    pub previous_encryption_keys: Vec<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            lease: default_lease(),
            indexed_fields: Vec::new(),
            encryption_key: None,
            previous_encryption_keys: Vec::new(),
        }
    }
}

/// The most body fields `store.indexed_fields` may list: each index is written with
/// every event.
pub const MAX_INDEXED_FIELDS: usize = 16;

fn default_lease() -> Duration {
    Duration::from_secs(30)
}

/// `[retention]`: how long delivered events are kept, and failed ones if at all.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Processed events whose deliveries all succeeded are deleted after this long.
    /// Events with pending or failed deliveries are kept.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub delivered: Duration,
    /// If set, processed events with a failed delivery or a route that dead-lettered them
    /// are deleted after this long too (never while a delivery is pending). Unset: kept
    /// until an operator deals with them.
    #[serde(default, with = "humantime_serde")]
    pub failed: Option<Duration>,
    /// How often the purge runs.
    #[serde(default = "default_purge_interval", with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            delivered: default_retention(),
            failed: None,
            interval: default_purge_interval(),
        }
    }
}

fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_purge_interval() -> Duration {
    Duration::from_secs(60)
}

/// A source's `idempotency_field`: one field, or several whose values together are the key.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(untagged)]
pub enum IdempotencyField {
    One(String),
    Several(Vec<String>),
}

impl IdempotencyField {
    /// The most fields one key is made of.
    pub const MAX: usize = 8;

    /// Each field: a top-level name, or a JSON pointer (starting with `/`).
    pub fn fields(&self) -> &[String] {
        match self {
            IdempotencyField::One(f) => std::slice::from_ref(f),
            IdempotencyField::Several(fs) => fs,
        }
    }

    /// The value of `field` in `body`: a JSON pointer's, or a top-level name's.
    pub fn value<'a>(body: &'a serde_json::Value, field: &str) -> Option<&'a serde_json::Value> {
        match field.starts_with('/') {
            true => body.pointer(field),
            false => body.get(field),
        }
    }
}

/// `[[sources]]`: a name senders post to at `/v1/ingest/{name}`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// 1 to 64 letters, digits, `-`, `_` or `.`.
    pub name: String,
    /// The body's field whose value de-duplicates events (e.g. Onomondo's `id`), besides the
    /// `Idempotency-Key` header: a top-level name, or a JSON pointer (`/data/attachmentId`);
    /// or a list of them whose values together do (Mobile Manager's `["/OrderId",
    /// "/State"]`: an order's every state is an event of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_field: Option<IdempotencyField>,
    /// A request header whose value de-duplicates events: the delivery id a provider
    /// repeats when it retries (GitHub's `x-github-delivery`, Shopify's
    /// `x-shopify-webhook-id`). A `standard-webhooks` source uses `webhook-id` unless this
    /// is set. The `Idempotency-Key` header comes first, a body field last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_header: Option<String>,
    /// How requests to this source are authenticated (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<crate::edge::VerifyConfig>,
    /// Only these networks (CIDRs) may post to this source (everyone when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>, example = json!(["203.0.113.0/24"]))]
    pub allow_ips: Option<Vec<ipnet::IpNet>>,
    /// Only senders presenting a client certificate (verified against
    /// `server.tls.client_ca`) with one of these names — a DNS name of its subject
    /// alternative names, or its subject's common name — may post to this source
    /// (everyone when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = json!(["webhooks.sender.example"]))]
    pub allow_client_names: Option<Vec<String>>,
    /// The most events per second this gateway accepts for this source (a burst of up to
    /// one second's worth, then evenly spaced); beyond it `429` with `Retry-After`, so a
    /// sender in a retry storm cannot crowd the others out of the queue. 0.001 to
    /// 1,000,000; unlimited when absent. Counted per instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<f64>,
    /// A sender's check of its URL to answer instead of storing: Slack's
    /// `url_verification` (a JSON body whose top-level `type` is `type` gets
    /// `200 {"<field>": <its field>}`, once it has passed `verify`), or a challenge in the
    /// query (`query = "hub.challenge"`: a `GET` with it gets the challenge back as text,
    /// its `token_query` checked against `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<ChallengeConfig>,
    /// Refuse a body that is not JSON with `400`, saying where it stops being JSON (line
    /// and column), so that the sender sees its mistake at once; counted as
    /// `rejected_invalid_json`. Off by default: such a body is stored like any other and
    /// fails its routes in the first plugin that reads JSON (dead-lettered, replayable once
    /// a plugin can read it) — nothing a sender posts is turned away for its shape.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_json: bool,
    /// Store a form body (`application/x-www-form-urlencoded`, as Twilio posts its
    /// callbacks) as a JSON object of its fields — each value a string, a repeated field's
    /// an array of its values in order — with content type `application/json`, so that
    /// plugins, `idempotency_field`, event types and destinations read it as JSON. The
    /// signature is checked on the form as it came. Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub form_as_json: bool,
    /// How long this source's events are kept, if not as `[retention]` says: a telemetry
    /// source's a day, say, while the others' lifecycle events stay a month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<SourceRetention>,
}

/// A source's own retention: each key set replaces `[retention]`'s for its events.
#[derive(Clone, Debug, Default, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SourceRetention {
    /// Processed events all of whose deliveries succeeded are deleted after this long.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, example = "1d")]
    pub delivered: Option<Duration>,
    /// Processed events with a failed delivery or a dead-lettered route are deleted after
    /// this long too (never while a delivery is pending).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, example = "7d")]
    pub failed: Option<Duration>,
}

impl SourceConfig {
    /// Why ingest refuses `body` for its shape (`require_json` and not JSON), if it does.
    pub fn refuses_body(&self, body: &[u8]) -> Option<String> {
        if !self.require_json {
            return None;
        }
        let parsed = serde_json::from_slice::<serde::de::IgnoredAny>(body);
        parsed.err().map(|e| {
            let why = match e.classify() {
                serde_json::error::Category::Eof if body.iter().all(u8::is_ascii_whitespace) => {
                    "the body is empty".to_string()
                }
                _ => format!("the body is not valid JSON: {e}"),
            };
            format!("{why} (source `{}` takes JSON bodies only)", self.name)
        })
    }
}

/// `[[destinations]]`: where deliveries go.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// 1 to 64 letters, digits, `-`, `_` or `.`.
    pub name: String,
    /// The URL; may contain `:name:` placeholders.
    #[schema(example = "https://fleet.example/events?iccid=:iccid:")]
    pub url: String,
    /// The requests' method: `POST` (the default), `PUT` or `PATCH`. `PUT` to a URL that
    /// names the event (`…/:event_id:`) makes a repeat — a retry, a replay — overwrite
    /// what the first one made instead of adding to it.
    #[serde(default, skip_serializing_if = "DeliveryMethod::is_post")]
    pub method: DeliveryMethod,
    /// Extra headers; values may contain `:name:` placeholders.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Deliver only events of these types (all when absent); `*` in one stands for any
    /// characters (`bondio.attachment.*`, `usage*`, `*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_types: Option<Vec<String>>,
    /// This destination's retry policy, if not `[delivery]`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryOverride>,
    /// Sign deliveries with Standard Webhooks headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<SigningConfig>,
    /// The most deliveries per second this gateway sends to this destination (a burst of
    /// up to one second's worth, then evenly spaced); more wait in the store for their
    /// turn. 0.001 to 1,000,000; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 50, minimum = 0.001, maximum = 1_000_000)]
    pub rate_limit: Option<f64>,
    /// How long one attempt to this destination may take, if not `delivery.timeout`: more
    /// for a receiver known to be slow, less to give up on a hanging one sooner. Above 0,
    /// at most `MAX_DESTINATION_TIMEOUT` (15 minutes).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, example = "30s")]
    pub timeout: Option<Duration>,
    /// Authenticate each attempt with an OAuth 2.0 access token from a token endpoint
    /// (the client credentials grant), sent as `authorization: Bearer …`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Config>,
}

/// The HTTP method of a destination's requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum DeliveryMethod {
    #[default]
    Post,
    Put,
    Patch,
}

impl DeliveryMethod {
    fn is_post(&self) -> bool {
        *self == DeliveryMethod::Post
    }

    pub fn as_http(self) -> http::Method {
        match self {
            DeliveryMethod::Post => http::Method::POST,
            DeliveryMethod::Put => http::Method::PUT,
            DeliveryMethod::Patch => http::Method::PATCH,
        }
    }
}

/// OAuth 2.0 client credentials (RFC 6749 §4.4) for a destination that takes bearer
/// tokens: a token is fetched from `token_url` before the first attempt, kept until shortly
/// before it expires, and fetched again when the destination answers `401` to it.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    /// The token endpoint (https; http only to a loopback address).
    #[schema(example = "https://auth.example.com/oauth/token")]
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    /// The `scope` asked for (space-separated), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// More form fields of the token request: `audience` (Auth0), `resource`, ….
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// How the client authenticates to the token endpoint: `basic` (HTTP Basic, RFC 6749's
    /// default) or `body` (`client_id` and `client_secret` as form fields).
    #[serde(default, skip_serializing_if = "ClientAuth::is_basic")]
    pub client_auth: ClientAuth,
}

/// How a client authenticates to an OAuth 2.0 token endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `authorization: Basic …` (`client_secret_basic`).
    #[default]
    Basic,
    /// Form fields (`client_secret_post`).
    Body,
}

impl ClientAuth {
    fn is_basic(&self) -> bool {
        *self == ClientAuth::Basic
    }
}

/// The form fields a token request sets itself: `oauth2.params` may not name them.
const OAUTH2_FIELDS: &[&str] = &["grant_type", "scope", "client_id", "client_secret"];

/// The rates a `rate_limit` may have, per second: a source's events, a destination's
/// deliveries.
const RATE_LIMITS: std::ops::RangeInclusive<f64> = 0.001..=1_000_000.0;

/// The longest `timeout` a destination may have: every claim's lease covers the longest
/// one configured, and a lease is how long a crashed gateway's claimed deliveries wait
/// before another takes them.
pub const MAX_DESTINATION_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// A URL check a source's sender makes, answered by echoing its challenge (see
/// `SourceConfig::challenge`): from a JSON body's field (Slack, Twitch) or from a query
/// parameter (Meta and Strava's `hub.challenge`, Dropbox's `challenge`, Microsoft Graph's
/// `validationToken`).
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChallengeConfig {
    /// The top-level field of a JSON body holding the challenge, e.g. `challenge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Or the query parameter holding it, e.g. `hub.challenge`: a `GET` (or a `POST`) with
    /// it is answered — before the signature check, since the senders that check this way
    /// sign nothing of it — and not stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// With `field`: only a body whose top-level `type` is this, e.g. `url_verification`
    /// (any body with `field` when absent).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `json`: `{"<field or query>": <the challenge>}` (the default with `field`); `text`: the
    /// challenge alone, as `text/plain` (the default with `query`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<ChallengeAnswer>,
    /// With `query`: the query parameter carrying the sender's verify token, e.g.
    /// `hub.verify_token`: the check is answered only when it equals `token` (else `403`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_query: Option<String>,
    /// The verify token `token_query` must carry (a secret: `"${META_VERIFY_TOKEN}"`);
    /// shown redacted by the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// How a sender's URL check is answered.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChallengeAnswer {
    Json,
    Text,
}

/// The answer to a sender's URL check.
#[derive(Clone, Debug, PartialEq)]
pub enum ChallengeReply {
    /// `200` with this JSON.
    Json(serde_json::Value),
    /// `200` with this text, as `text/plain`.
    Text(String),
}

impl ChallengeReply {
    /// As a JSON value (a dry run shows it so).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ChallengeReply::Json(v) => v.clone(),
            ChallengeReply::Text(t) => serde_json::Value::String(t.clone()),
        }
    }
}

impl ChallengeConfig {
    /// The answer to a request whose body is a challenge (`field`), if it is one.
    pub fn answer(&self, body: &[u8]) -> Option<ChallengeReply> {
        let field = self.field.as_ref()?;
        let serde_json::Value::Object(body) = serde_json::from_slice(body).ok()? else {
            return None;
        };
        if let Some(kind) = &self.kind
            && body.get("type").and_then(|t| t.as_str()) != Some(kind.as_str())
        {
            return None;
        }
        let value = body.get(field)?;
        Some(match self.answer {
            Some(ChallengeAnswer::Text) => ChallengeReply::Text(match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
            _ => ChallengeReply::Json(serde_json::json!({ field.clone(): value })),
        })
    }

    /// The answer to a request whose query carries a challenge (`query`), if it does: the
    /// echo, or why it is refused (its verify token is missing or wrong).
    pub fn answer_query(&self, query: &str) -> Option<Result<ChallengeReply, String>> {
        use subtle::ConstantTimeEq as _;
        let name = self.query.as_ref()?;
        let param = |wanted: &str| {
            (url::form_urlencoded::parse(query.as_bytes()))
                .find(|(k, _)| k == wanted)
                .map(|(_, v)| v.into_owned())
        };
        let value = param(name)?;
        if let (Some(token_query), Some(token)) = (&self.token_query, &self.token) {
            let given = param(token_query).unwrap_or_default();
            if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
                return Some(Err(format!(
                    "the URL check's `{token_query}` is missing or not this source's verify token"
                )));
            }
        }
        Some(Ok(match self.answer {
            Some(ChallengeAnswer::Json) => {
                ChallengeReply::Json(serde_json::json!({ name.clone(): value }))
            }
            _ => ChallengeReply::Text(value),
        }))
    }

    /// What is wrong with it, if anything: the key and why.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        match (&self.field, &self.query) {
            (Some(f), None) if !f.is_empty() => {}
            (None, Some(q)) if !q.is_empty() => {}
            (Some(_), Some(_)) => {
                return Err((
                    "query",
                    "a challenge is in a body `field` or a `query` parameter, not both".into(),
                ));
            }
            (Some(_), None) => {
                return Err((
                    "field",
                    "must name the body's field that holds the challenge".into(),
                ));
            }
            _ => {
                return Err((
                    "field",
                    "must name the body's field that holds the challenge (or `query`, the \
                     query parameter that does)"
                        .into(),
                ));
            }
        }
        if self.kind.is_some() && self.query.is_some() {
            return Err((
                "type",
                "is the type of a body `field` challenge, not of a `query` one".into(),
            ));
        }
        match (&self.token_query, &self.token) {
            (Some(_), None) => Err((
                "token",
                "is the verify token `token_query` must carry".into(),
            )),
            (None, Some(_)) => Err((
                "token_query",
                "names the query parameter carrying `token`".into(),
            )),
            (Some(_), Some(_)) if self.query.is_none() => Err((
                "token_query",
                "checks a `query` challenge's verify token (a body challenge is signed: `verify`)"
                    .into(),
            )),
            (Some(_), Some(t)) if t.is_empty() => Err(("token", "must not be empty".into())),
            _ => Ok(()),
        }
    }
}

/// How a destination's deliveries are signed: Standard Webhooks, or an HMAC (SHA-256, SHA-1
/// or SHA-512) in a header of the receiver's choice.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// `standard-webhooks` (the default): `webhook-timestamp` and `webhook-signature`; or
    /// `hmac-sha256` (`hmac-sha1`, `hmac-sha512`): for a receiver that already checks a
    /// provider's HMAC (Bondio's, GitHub's), so the gateway can sign in its place what the
    /// plugins reshaped.
    #[serde(default)]
    pub scheme: SigningScheme,
    /// `standard-webhooks`: a `whsec_…` secret (base64 after the prefix, at least 16
    /// bytes); an HMAC scheme: the receiver's shared secret, as text.
    pub secret: String,
    /// During a rotation, the secrets receivers may still verify with: each delivery is
    /// also signed with these (one `v1,` signature per secret in `webhook-signature`, as
    /// Standard Webhooks allows; an HMAC scheme's with `signature_key` gets one pair per
    /// secret, `t=…,v1=…,v1=…`, while a plain HMAC header carries one signature and takes
    /// none). Remove them once every receiver has `secret`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_secrets: Vec<String>,
    /// HMAC schemes: the header carrying the signature, e.g. `x-hub-signature-256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// HMAC schemes: `hex` (the default) or `base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<crate::edge::Encoding>,
    /// HMAC schemes: text before the signature, e.g. `sha256=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// HMAC schemes: what is signed, `{body}` by default; with the attempt's time, e.g.
    /// `{timestamp}.{body}` (Unix seconds, sent in `timestamp_header`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<String>,
    /// HMAC schemes: the header carrying the signed timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_header: Option<String>,
    /// HMAC schemes: write `header` as `key=value` pairs (Stripe's `t=…,v1=…`): the
    /// signature's key, e.g. `v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_key: Option<String>,
    /// HMAC schemes: the timestamp's key among those pairs, e.g. `t`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_key: Option<String>,
}

/// A destination's signature scheme.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SigningScheme {
    #[default]
    StandardWebhooks,
    HmacSha256,
    /// For a receiver that checks an HMAC-SHA1 (Intercom's, Trello's).
    HmacSha1,
    /// For a receiver that checks an HMAC-SHA512.
    HmacSha512,
}

impl SigningScheme {
    /// An HMAC scheme's hash.
    pub fn hmac_hash(self) -> Option<crate::edge::HmacHash> {
        use crate::edge::HmacHash;
        match self {
            SigningScheme::StandardWebhooks => None,
            SigningScheme::HmacSha256 => Some(HmacHash::Sha256),
            SigningScheme::HmacSha1 => Some(HmacHash::Sha1),
            SigningScheme::HmacSha512 => Some(HmacHash::Sha512),
        }
    }
}

impl SigningConfig {
    /// The most `previous_secrets`.
    pub const MAX_PREVIOUS: usize = 4;

    /// How an HMAC scheme's signature goes out.
    pub fn hmac_form(&self) -> crate::edge::HmacForm<'_> {
        crate::edge::HmacForm {
            hash: (self.scheme.hmac_hash()).unwrap_or(crate::edge::HmacHash::Sha256),
            header: self.header.as_deref().unwrap_or_default(),
            encoding: self.encoding.unwrap_or_default(),
            prefix: self.prefix.as_deref().unwrap_or_default(),
            signed: self.signed.as_deref(),
            timestamp_header: self.timestamp_header.as_deref(),
            signature_key: self.signature_key.as_deref(),
            timestamp_key: self.timestamp_key.as_deref(),
        }
    }

    /// What the scheme needs and forbids: the field at fault and why. (A Standard Webhooks
    /// secret's form is checked by the caller.)
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let hmac_fields = [
            ("header", self.header.is_some()),
            ("encoding", self.encoding.is_some()),
            ("prefix", self.prefix.is_some()),
            ("signed", self.signed.is_some()),
            ("timestamp_header", self.timestamp_header.is_some()),
            ("signature_key", self.signature_key.is_some()),
            ("timestamp_key", self.timestamp_key.is_some()),
        ];
        match self.scheme {
            SigningScheme::StandardWebhooks => match hmac_fields.iter().find(|(_, given)| *given) {
                Some((field, _)) => Err((
                    field,
                    "only for an HMAC scheme (`hmac-sha256`, `hmac-sha1`, `hmac-sha512`)".into(),
                )),
                None => Ok(()),
            },
            SigningScheme::HmacSha256 | SigningScheme::HmacSha1 | SigningScheme::HmacSha512 => {
                if self.secret.is_empty() {
                    return Err(("secret", "must not be empty".into()));
                }
                if !self.previous_secrets.is_empty() && self.signature_key.is_none() {
                    return Err((
                        "previous_secrets",
                        "this header carries one signature: change the secret here and at the receiver together (with `signature_key`, each secret signs: `t=…,v1=…,v1=…`)".into(),
                    ));
                }
                if self.previous_secrets.iter().any(String::is_empty) {
                    return Err(("previous_secrets", "must not be empty".into()));
                }
                if self.header.is_none() {
                    return Err((
                        "header",
                        "the header the signature goes in is required".into(),
                    ));
                }
                self.hmac_form().check()
            }
        }
    }

    /// The secrets deliveries are signed with: `secret` first, then `previous_secrets`.
    pub fn secrets(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.secret).chain(&self.previous_secrets)
    }
}

/// Per-destination overrides of `[delivery]`'s retry policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryOverride {
    /// The wait before each attempt, e.g. `["0s", "5s", "5m"]`.
    #[serde(
        default,
        with = "humantime_serde_opt_vec",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<Vec<String>>, example = json!(["0s", "5s", "5m"]))]
    pub retry_schedule: Option<Vec<Duration>>,
    /// 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
    /// At least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_client_errors: Option<bool>,
    /// A FAILED destination is sent a test message this long after it failed, and every
    /// this long while it fails; one that passes makes it ACTIVE again. `"0s"`: never (it
    /// waits for a restart), whatever `delivery.restart_after` says.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, example = "5m")]
    pub restart_after: Option<Duration>,
    /// An event received longer ago than this is not sent here: its delivery fails
    /// (expired) when its attempt comes. `"0s"`: no limit, whatever
    /// `delivery.max_event_age` says.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, example = "1h")]
    pub max_event_age: Option<Duration>,
}

impl RetryOverride {
    /// `base` with these overrides applied.
    pub fn apply(&self, base: &RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            retry_schedule: self
                .retry_schedule
                .clone()
                .unwrap_or_else(|| base.retry_schedule.clone()),
            jitter: self.jitter.unwrap_or(base.jitter),
            failure_threshold: self.failure_threshold.unwrap_or(base.failure_threshold),
            retry_client_errors: self.retry_client_errors.unwrap_or(base.retry_client_errors),
            restart_after: match self.restart_after {
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d),
                None => base.restart_after,
            },
            max_event_age: match self.max_event_age {
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d),
                None => base.max_event_age,
            },
        }
    }
}

mod humantime_serde_opt_vec {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Duration>>, D::Error> {
        super::humantime_serde_vec::deserialize(d).map(Some)
    }

    pub fn serialize<S: Serializer>(v: &Option<Vec<Duration>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(items) => super::humantime_serde_vec::serialize(items, s),
            None => s.serialize_none(),
        }
    }
}

/// `[[routes]]`: which plugins run on a source's events and where they go by default.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Names the route in the API. Optional in the config file, where a route without one
    /// is named after its source (`onomondo`, then `onomondo-2`, …); required through the
    /// API.
    #[serde(default)]
    pub name: String,
    /// The source whose events this route takes.
    pub source: String,
    /// The plugin chain, run in order.
    #[serde(default)]
    pub plugins: Vec<PluginRef>,
    /// Where events that the chain continues go (a `route` verdict chooses its own).
    #[serde(default)]
    pub destinations: Vec<String>,
    /// What happens to an event whose plugin fails (error, trap, deadline, limit), for
    /// the plugins that do not say (a plugin's own `on_error`).
    #[serde(default)]
    pub on_error: OnError,
}

/// A route's answer to a failing plugin.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Keep the event as failed on this route: visible and replayable.
    #[default]
    DeadLetter,
    /// Drop the event on this route, recording why.
    Drop,
    /// Go on with the next plugin as if the failing one had continued unchanged.
    SkipPlugin,
}

/// One plugin of a route's chain with its configuration and limits.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PluginRef {
    /// The plugin's file stem in the plugin directory.
    pub name: String,
    /// Key/value configuration handed to the plugin, in order. Numbers and booleans are
    /// given as their text.
    #[serde(
        default,
        deserialize_with = "config_pairs",
        serialize_with = "config_pairs_out",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub config: Vec<(String, String)>,
    /// This plugin's call deadline on this route, if not `[plugins] deadline`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, example = "50ms")]
    pub deadline: Option<Duration>,
    /// This plugin's memory cap on this route, if not `[plugins] max_memory_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_bytes: Option<usize>,
    /// `fresh` (a new instance per event) or `warm` (reused instances); by default warm
    /// for large components (language runtimes), fresh otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceMode>,
    /// What a failure of this plugin means, if not the route's `on_error`: an enrichment
    /// that may be skipped (`skip-plugin`) before a router that must not fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<OnError>,
    /// The origins this plugin may send HTTP requests to on this route (WIT `http`):
    /// `https://crm.example.com`, `http://10.0.0.5:8080`, `https://*.example.com`. None
    /// unless listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(example = json!(["https://crm.example.com"]))]
    pub allow_http: Vec<String>,
}

fn config_pairs_out<S: serde::Serializer>(
    pairs: &[(String, String)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

/// How a plugin's instances live.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceMode {
    /// A new instance for every event: nothing carries over.
    Fresh,
    /// A small pool of reused instances, replaced after `warm_recycle_after` events or on
    /// any trap.
    Warm,
}

fn config_pairs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    let table = toml::Table::deserialize(d)?;
    table
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "value of `{k}` must be a string, number or boolean, not {}",
                        other.type_str()
                    )));
                }
            };
            Ok((k, text))
        })
        .collect()
}

impl Config {
    /// Loads and validates a config file; relative paths in it are relative to its folder.
    pub fn load(path: &Path, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base, env)
    }

    /// Parses and validates config text. `origin` names it in errors.
    pub fn parse(
        text: &str,
        origin: &str,
        base_dir: &Path,
        env: EnvLookup<'_>,
    ) -> Result<Config, ConfigError> {
        let key_err = |key: String, message: String| ConfigError::Key {
            origin: origin.to_string(),
            key,
            message,
        };
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e: toml::de::Error| ConfigError::Syntax {
                origin: origin.to_string(),
                message: e.to_string(),
            })?;
        let refs = Refs {
            env,
            base_dir,
            read: Default::default(),
        };
        expand_env(&mut value, &mut String::new(), &refs).map_err(|(k, m)| key_err(k, m))?;

        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            key_err(key, e.into_inner().to_string())
        })?;

        let listen_text = env("SWITCHYARD_LISTEN").unwrap_or(raw.server.listen);
        let listen = listen_text.parse().map_err(|e| {
            key_err(
                "server.listen".into(),
                format!("`{listen_text}` is not an address like 127.0.0.1:8080: {e}"),
            )
        })?;
        let data_dir = match env("SWITCHYARD_DATA_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => base_dir.join(raw.server.data_dir),
        };
        let config = Config {
            server: ServerConfig {
                listen,
                data_dir,
                max_body_bytes: raw.server.max_body_bytes,
                queue_capacity: raw.server.queue_capacity,
                queue_max_bytes: raw.server.queue_max_bytes,
                idempotency_window: raw.server.idempotency_window,
                trusted_proxies: raw.server.trusted_proxies,
                header_read_timeout: raw.server.header_read_timeout,
                body_read_timeout: raw.server.body_read_timeout,
                tls: match raw.server.tls {
                    None => None,
                    Some(raw) => {
                        let files = CertificateFiles {
                            cert: base_dir.join(&raw.cert),
                            key: base_dir.join(&raw.key),
                        };
                        let client_ca = raw.client_ca.map(|p| base_dir.join(p));
                        let client_crl = raw.client_crl.map(|p| base_dir.join(p));
                        let (clients, client_ca_validity, client_crl_validity) = match (
                            &client_ca,
                            &client_crl,
                        ) {
                            (None, None) => (None, None, None),
                            (None, Some(_)) => {
                                return Err(key_err(
                                        "server.tls.client_crl".into(),
                                        "needs server.tls.client_ca: the authorities whose revocation lists these are".into(),
                                    ));
                            }
                            (Some(ca), crl) => {
                                let clients = crate::edge::client_verifier(ca, crl.as_deref())
                                    .map_err(|(key, m)| key_err(format!("server.tls.{key}"), m))?;
                                (Some(clients.verifier), Some(clients.ca), clients.crl)
                            }
                        };
                        let (acceptor, validity) = crate::edge::server_tls(&files, clients)
                            .map_err(|m| key_err("server.tls".into(), m))?;
                        Some(ServerTls {
                            files,
                            client_ca,
                            acceptor,
                            validity,
                            client_ca_validity,
                            client_crl,
                            client_crl_validity,
                        })
                    }
                },
            },
            plugins: PluginsConfig {
                dir: base_dir.join(raw.plugins.dir),
                deadline: raw.plugins.deadline,
                max_memory_bytes: raw.plugins.max_memory_bytes,
                max_output_bytes: raw.plugins.max_output_bytes,
                max_deliveries: raw.plugins.max_deliveries,
                warm_pool_size: raw.plugins.warm_pool_size,
                warm_recycle_after: raw.plugins.warm_recycle_after,
                degraded_after: raw.plugins.degraded_after,
                state_ttl: raw.plugins.state_ttl,
                state_max_value_bytes: raw.plugins.state_max_value_bytes,
                http_timeout: raw.plugins.http_timeout,
                http_max_response_bytes: raw.plugins.http_max_response_bytes,
                http_concurrency: raw.plugins.http_concurrency,
                http_rate_limit: raw.plugins.http_rate_limit,
            },
            delivery: DeliveryConfig {
                ca_certificates: (raw.delivery.ca_certificates.iter())
                    .map(|p| base_dir.join(p))
                    .collect(),
                client_certificate: (raw.delivery.client_certificate.as_ref()).map(|c| {
                    CertificateFiles {
                        cert: base_dir.join(&c.cert),
                        key: base_dir.join(&c.key),
                    }
                }),
                ..raw.delivery
            },
            retention: raw.retention,
            api: raw.api,
            store: StoreConfig {
                url: env("SWITCHYARD_STORE_URL").or(raw.store.url),
                ..raw.store
            },
            sources: raw.sources.into_iter().map(Arc::new).collect(),
            destinations: raw.destinations.into_iter().map(Arc::new).collect(),
            routes: name_routes(raw.routes).into_iter().map(Arc::new).collect(),
            tables: Arc::default(),
            referenced_files: refs.read.into_inner(),
        };
        config.validate().map_err(|(k, m)| key_err(k, m))?;
        for name in raw.tables.keys() {
            check_name(name).map_err(|m| key_err(format!("tables.{name}"), m))?;
        }
        let tables = crate::tables::Tables::load(base_dir, &raw.tables)
            .map_err(|(name, m)| key_err(format!("tables.{name}"), m))?;
        let config = Config {
            tables: Arc::new(tables),
            ..config
        };
        // (Read here, not in `validate`, which API changes call too.)
        let delivery_tls =
            crate::delivery::tls_settings(&config.delivery).map_err(|(k, m)| key_err(k, m))?;
        // Each load warns of the certificates about to expire (`serve --check` too).
        crate::edge::warn_of_expiry(config.certificates(&delivery_tls.validity));
        Ok(config)
    }

    /// The files besides the config file itself that this config was read from, which a
    /// reload reads again: `server.tls`'s (certificate, key, `client_ca`, `client_crl`),
    /// `delivery.client_certificate`'s and `delivery.ca_certificates`, the tables', and
    /// those of `${file:PATH}` references.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(tls) = &self.server.tls {
            files.extend([tls.files.cert.clone(), tls.files.key.clone()]);
            files.extend(tls.client_ca.iter().cloned());
            files.extend(tls.client_crl.iter().cloned());
        }
        if let Some(c) = &self.delivery.client_certificate {
            files.extend([c.cert.clone(), c.key.clone()]);
        }
        files.extend(self.delivery.ca_certificates.iter().cloned());
        files.extend(self.tables.files().map(Path::to_path_buf));
        files.extend(self.referenced_files.iter().cloned());
        files
    }

    /// The certificates in force, by the key naming each, and when each stops being valid:
    /// `server.tls`'s and, as `delivery` says, those deliveries use
    /// (`Dispatcher::certificates` has the ones in force).
    pub fn certificates<'a>(
        &'a self,
        delivery: &'a [(String, crate::edge::Validity)],
    ) -> impl Iterator<Item = (&'a str, crate::edge::Validity)> {
        (self.server.tls.iter())
            .flat_map(|t| {
                std::iter::once(("server.tls", t.validity))
                    .chain((t.client_ca_validity).map(|v| ("server.tls.client_ca", v)))
                    .chain((t.client_crl_validity).map(|v| ("server.tls.client_crl", v)))
            })
            .chain(delivery.iter().map(|(k, v)| (k.as_str(), *v)))
    }

    /// Checks the whole config; the error names the key, e.g. `routes[2].source`.
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        self.validate_objects(None)
    }

    /// As [`Config::validate`], but of the objects (sources, destinations, routes) checks
    /// only `changed` on its own (a management API change: the others were checked when
    /// they came in, and the settings they are checked against are the same); names and
    /// references are checked across all.
    pub(crate) fn validate_objects(
        &self,
        changed: Option<(crate::managed::Kind, &str)>,
    ) -> Result<(), (String, String)> {
        self.validate_settings()?;
        match changed {
            None => self.validate_all_objects(),
            Some((kind, name)) => self.validate_changed_object(kind, name),
        }
    }

    /// Every object on its own, their names unique, and the routes' references.
    fn validate_all_objects(&self) -> Result<(), (String, String)> {
        let mut sources = HashSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            self.validate_source(i, s)?;
            if !sources.insert(s.name.as_str()) {
                return Err((
                    format!("sources[{i}].name"),
                    format!("`{}` is defined twice", s.name),
                ));
            }
        }
        if let Some(source) = &self.delivery.notify_source
            && !sources.contains(source.as_str())
        {
            return Err((
                "delivery.notify_source".into(),
                format!("no source named `{source}`"),
            ));
        }
        let mut destinations = HashSet::new();
        for (i, d) in self.destinations.iter().enumerate() {
            self.validate_destination(i, d)?;
            if !destinations.insert(d.name.as_str()) {
                return Err((
                    format!("destinations[{i}].name"),
                    format!("`{}` is defined twice", d.name),
                ));
            }
        }
        let mut routes = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            self.validate_route(i, r)?;
            if !routes.insert(r.name.as_str()) {
                return Err((
                    format!("routes[{i}].name"),
                    format!("`{}` is defined twice", r.name),
                ));
            }
            if !sources.contains(r.source.as_str()) {
                return Err((
                    format!("routes[{i}].source"),
                    format!("no source named `{}`", r.source),
                ));
            }
            for (j, d) in r.destinations.iter().enumerate() {
                if !destinations.contains(d.as_str()) {
                    return Err((
                        format!("routes[{i}].destinations[{j}]"),
                        format!("no destination named `{d}`"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// What `validate_all_objects` would find wrong in a config whose objects were all
    /// valid before `kind` `name` was made, changed or deleted: the object on its own, its
    /// name once, and the references to or from it — the same key and message, found by
    /// scans that hash and allocate nothing (a change among 50,000 objects would otherwise
    /// spend most of its time building sets of names).
    fn validate_changed_object(
        &self,
        kind: crate::managed::Kind,
        name: &str,
    ) -> Result<(), (String, String)> {
        use crate::managed::Kind;
        // Where the object is now (and a second of that name, which cannot be valid).
        let mut at = (crate::managed::names(self, kind).enumerate())
            .filter(|(_, n)| *n == name)
            .map(|(i, _)| i);
        let (first, second) = (at.next(), at.next());
        if let Some(i) = second {
            return Err((
                format!("{}[{i}].name", kind.plural()),
                format!("`{name}` is defined twice"),
            ));
        }
        match (kind, first) {
            (Kind::Source, Some(i)) => self.validate_source(i, &self.sources[i]),
            (Kind::Destination, Some(i)) => self.validate_destination(i, &self.destinations[i]),
            (Kind::Route, Some(i)) => {
                let r = &self.routes[i];
                self.validate_route(i, r)?;
                if !self.sources.iter().any(|s| s.name == r.source) {
                    return Err((
                        format!("routes[{i}].source"),
                        format!("no source named `{}`", r.source),
                    ));
                }
                for (j, d) in r.destinations.iter().enumerate() {
                    if !self.destinations.iter().any(|x| x.name == *d) {
                        return Err((
                            format!("routes[{i}].destinations[{j}]"),
                            format!("no destination named `{d}`"),
                        ));
                    }
                }
                Ok(())
            }
            (Kind::Source, None) => {
                if self.delivery.notify_source.as_deref() == Some(name) {
                    return Err((
                        "delivery.notify_source".into(),
                        format!("no source named `{name}`"),
                    ));
                }
                match self.routes.iter().position(|r| r.source == name) {
                    Some(i) => Err((
                        format!("routes[{i}].source"),
                        format!("no source named `{name}`"),
                    )),
                    None => Ok(()),
                }
            }
            (Kind::Destination, None) => {
                for (i, r) in self.routes.iter().enumerate() {
                    if let Some(j) = r.destinations.iter().position(|d| d == name) {
                        return Err((
                            format!("routes[{i}].destinations[{j}]"),
                            format!("no destination named `{name}`"),
                        ));
                    }
                }
                Ok(())
            }
            (Kind::Route, None) => Ok(()),
        }
    }

    /// The settings outside the objects.
    fn validate_settings(&self) -> Result<(), (String, String)> {
        if self.server.max_body_bytes == 0 {
            return Err(("server.max_body_bytes".into(), "must be above 0".into()));
        }
        if self.server.queue_max_bytes < self.server.max_body_bytes {
            return Err((
                "server.queue_max_bytes".into(),
                format!(
                    "must be at least server.max_body_bytes ({})",
                    self.server.max_body_bytes
                ),
            ));
        }
        if self.server.queue_capacity == 0 {
            return Err(("server.queue_capacity".into(), "must be above 0".into()));
        }
        for (key, timeout) in [
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.body_read_timeout", self.server.body_read_timeout),
            ("delivery.timeout", self.delivery.timeout),
        ] {
            if timeout.is_zero() {
                return Err((key.into(), "must be above 0".into()));
            }
        }
        check_retry(&self.delivery.retry).map_err(|(k, m)| (format!("delivery.{k}"), m))?;
        if let Some(proxy) = &self.delivery.proxy {
            crate::delivery::proxy_host(proxy).map_err(|m| ("delivery.proxy".into(), m))?;
        }
        for (key, tokens) in [
            ("tokens", &self.api.tokens),
            ("read_tokens", &self.api.read_tokens),
        ] {
            for (i, t) in tokens.iter().enumerate() {
                if t.len() < 8 {
                    return Err((
                        format!("api.{key}[{i}]"),
                        "a token must be at least 8 characters".into(),
                    ));
                }
            }
        }
        if let Some(url) = &self.store.url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err((
                "store.url".into(),
                "must be a postgres:// URL (leave it out for the embedded SQLite store)".into(),
            ));
        }
        if self.store.lease < Duration::from_secs(1) {
            return Err(("store.lease".into(), "must be at least 1s".into()));
        }
        if self.plugins.state_ttl < Duration::from_secs(1) {
            return Err(("plugins.state_ttl".into(), "must be at least 1s".into()));
        }
        if self.plugins.http_timeout.is_zero() {
            return Err(("plugins.http_timeout".into(), "must be more than 0s".into()));
        }
        if !(1..=4096).contains(&self.plugins.http_concurrency) {
            return Err((
                "plugins.http_concurrency".into(),
                "must be 1 to 4096".into(),
            ));
        }
        let mut limited = Vec::new();
        for (origin, rate) in &self.plugins.http_rate_limit {
            let key = format!("plugins.http_rate_limit.\"{origin}\"");
            let parsed = crate::plugin::Origin::parse(origin).map_err(|m| (key.clone(), m))?;
            if let Some((other, _)) = limited.iter().find(|(_, o)| *o == parsed) {
                return Err((key, format!("is the origin `{other}` names already")));
            }
            limited.push((origin, parsed));
            if !RATE_LIMITS.contains(rate) {
                return Err((
                    key,
                    "must be between 0.001 and 1000000 requests per second".into(),
                ));
            }
        }
        let keys = (self
            .store
            .encryption_key
            .iter()
            .map(|k| ("store.encryption_key".to_string(), k)))
        .chain(
            (self.store.previous_encryption_keys.iter().enumerate())
                .map(|(i, k)| (format!("store.previous_encryption_keys[{i}]"), k)),
        );
        for (key, text) in keys {
            if text.chars().count() < crate::seal::MIN_KEY_CHARS {
                return Err((
                    key,
                    format!(
                        "must be at least {} characters: a random key (`openssl rand -base64 32`), not a password",
                        crate::seal::MIN_KEY_CHARS
                    ),
                ));
            }
        }
        let fields = &self.store.indexed_fields;
        if fields.len() > MAX_INDEXED_FIELDS {
            return Err((
                "store.indexed_fields".into(),
                format!(
                    "at most {MAX_INDEXED_FIELDS} fields (each index is written with every event)"
                ),
            ));
        }
        for (i, field) in fields.iter().enumerate() {
            let key = format!("store.indexed_fields[{i}]");
            crate::store::FieldMatch::parse(field, String::new()).map_err(|e| (key.clone(), e))?;
            if fields[..i].contains(field) {
                return Err((key, format!("`{field}` is listed twice")));
            }
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.delivery.concurrency) {
            return Err((
                "delivery.concurrency".into(),
                format!("must be between 1 and {MAX_CONCURRENCY}"),
            ));
        }
        let d = &self.delivery;
        if d.destination_concurrency == 0 || d.destination_concurrency > d.concurrency {
            return Err((
                "delivery.destination_concurrency".into(),
                format!(
                    "must be between 1 and delivery.concurrency ({})",
                    d.concurrency
                ),
            ));
        }
        if d.reserved_concurrency >= d.concurrency {
            return Err((
                "delivery.reserved_concurrency".into(),
                format!(
                    "must be below delivery.concurrency ({}): the rest are any destination's",
                    d.concurrency
                ),
            ));
        }
        Ok(())
    }

    /// A source's own settings (`sources[i]`).
    fn validate_source(&self, i: usize, s: &SourceConfig) -> Result<(), (String, String)> {
        check_name(&s.name).map_err(|m| (format!("sources[{i}].name"), m))?;
        if let Some(r) = &s.retention {
            for (key, d) in [("delivered", r.delivered), ("failed", r.failed)] {
                if d.is_some_and(|d| d.is_zero()) {
                    return Err((
                        format!("sources[{i}].retention.{key}"),
                        "must be longer than 0s".into(),
                    ));
                }
            }
        }
        if let Some(v) = &s.verify {
            v.validate()
                .map_err(|m| (format!("sources[{i}].verify"), m))?;
        }
        if let Some(c) = &s.challenge {
            c.validate()
                .map_err(|(key, m)| (format!("sources[{i}].challenge.{key}"), m))?;
        }
        if let Some(f) = &s.idempotency_field {
            let fields = f.fields();
            if fields.is_empty() || fields.len() > IdempotencyField::MAX {
                return Err((
                    format!("sources[{i}].idempotency_field"),
                    format!("must name 1 to {} fields", IdempotencyField::MAX),
                ));
            }
            if let Some(j) = fields.iter().position(String::is_empty) {
                return Err((
                    format!("sources[{i}].idempotency_field[{j}]"),
                    "must not be empty: a top-level field's name, or a JSON pointer such as `/data/id`".into(),
                ));
            }
        }
        if let Some(h) = &s.idempotency_header
            && http::HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            return Err((
                format!("sources[{i}].idempotency_header"),
                format!("`{h}` is not a header name"),
            ));
        }
        if let Some(rate) = s.rate_limit
            && !RATE_LIMITS.contains(&rate)
        {
            return Err((
                format!("sources[{i}].rate_limit"),
                "must be between 0.001 and 1000000 events per second".into(),
            ));
        }
        if let Some(names) = &s.allow_client_names {
            let key = format!("sources[{i}].allow_client_names");
            if (self.server.tls.as_ref()).is_none_or(|t| t.client_ca.is_none()) {
                return Err((
                    key,
                    "needs server.tls.client_ca: the authority that issues the senders' certificates".into(),
                ));
            }
            if names.is_empty() {
                return Err((key, "must name at least one sender (or be left out)".into()));
            }
            if let Some(j) = names.iter().position(|n| n.trim().is_empty()) {
                return Err((format!("{key}[{j}]"), "must not be empty".into()));
            }
        }
        Ok(())
    }

    /// A destination's own settings (`destinations[i]`).
    fn validate_destination(
        &self,
        i: usize,
        d: &DestinationConfig,
    ) -> Result<(), (String, String)> {
        check_name(&d.name).map_err(|m| (format!("destinations[{i}].name"), m))?;
        let url = reqwest::Url::parse(&d.url).map_err(|e| {
            (
                format!("destinations[{i}].url"),
                format!("`{}` is not a URL: {e}", d.url),
            )
        })?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err((
                format!("destinations[{i}].url"),
                "must be an http or https URL".into(),
            ));
        }
        if let Some(s) = &d.signing {
            s.validate()
                .map_err(|(field, m)| (format!("destinations[{i}].signing.{field}"), m))?;
        }
        if let Some(s) = d
            .signing
            .as_ref()
            .filter(|s| s.scheme == SigningScheme::StandardWebhooks)
        {
            crate::edge::decode_secret(&s.secret)
                .map_err(|m| (format!("destinations[{i}].signing.secret"), m))?;
            for (j, previous) in s.previous_secrets.iter().enumerate() {
                crate::edge::decode_secret(previous).map_err(|m| {
                    (
                        format!("destinations[{i}].signing.previous_secrets[{j}]"),
                        m,
                    )
                })?;
            }
        }
        if let Some(s) = &d.signing
            && s.previous_secrets.len() > SigningConfig::MAX_PREVIOUS
        {
            return Err((
                format!("destinations[{i}].signing.previous_secrets"),
                format!(
                    "at most {} secrets (each delivery is signed with every one)",
                    SigningConfig::MAX_PREVIOUS
                ),
            ));
        }
        for (j, t) in d.event_types.iter().flatten().enumerate() {
            if t.is_empty() {
                return Err((
                    format!("destinations[{i}].event_types[{j}]"),
                    "must not be empty: an event type, or a pattern with `*` (e.g. `bondio.attachment.*`)".into(),
                ));
            }
        }
        if let Some(rate) = d.rate_limit
            && !RATE_LIMITS.contains(&rate)
        {
            return Err((
                format!("destinations[{i}].rate_limit"),
                "must be between 0.001 and 1000000 deliveries per second".into(),
            ));
        }
        if let Some(t) = d.timeout
            && (t.is_zero() || t > MAX_DESTINATION_TIMEOUT)
        {
            return Err((
                format!("destinations[{i}].timeout"),
                "must be above 0 and at most 15m".into(),
            ));
        }
        if let Some(o) = &d.retry {
            check_retry(&o.apply(&self.delivery.retry))
                .map_err(|(k, m)| (format!("destinations[{i}].retry.{k}"), m))?;
        }
        for name in d.headers.keys() {
            reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                (
                    format!("destinations[{i}].headers"),
                    format!("`{name}` is not a valid header name"),
                )
            })?;
        }
        if let Some(o) = &d.oauth2 {
            validate_oauth2(o).map_err(|(k, m)| (format!("destinations[{i}].oauth2.{k}"), m))?;
            if d.headers
                .keys()
                .any(|k| k.eq_ignore_ascii_case("authorization"))
            {
                return Err((
                    format!("destinations[{i}].headers.authorization"),
                    "cannot be set with `oauth2`, which sends the token as `authorization`".into(),
                ));
            }
        }
        Ok(())
    }

    /// A route's own settings (`routes[i]`); its source and destinations are checked
    /// against the others by `validate_objects`.
    fn validate_route(&self, i: usize, r: &RouteConfig) -> Result<(), (String, String)> {
        check_name(&r.name).map_err(|m| (format!("routes[{i}].name"), m))?;
        for (j, p) in r.plugins.iter().enumerate() {
            check_name(&p.name).map_err(|m| (format!("routes[{i}].plugins[{j}].name"), m))?;
            for (k, origin) in p.allow_http.iter().enumerate() {
                crate::plugin::Origin::parse(origin)
                    .map_err(|m| (format!("routes[{i}].plugins[{j}].allow_http[{k}]"), m))?;
            }
            if p.max_memory_bytes.unwrap_or(self.plugins.max_memory_bytes)
                > self.plugins.max_memory_bytes
            {
                return Err((
                    format!("routes[{i}].plugins[{j}].max_memory_bytes"),
                    "may not exceed [plugins] max_memory_bytes".into(),
                ));
            }
        }
        Ok(())
    }

    /// The plugin names that some route uses.
    pub fn used_plugins(&self) -> HashSet<&str> {
        self.routes
            .iter()
            .flat_map(|r| r.plugins.iter().map(|p| p.name.as_str()))
            .collect()
    }
}

/// A destination's `oauth2` (a key inside it and the message, if not).
fn validate_oauth2(o: &OAuth2Config) -> Result<(), (String, String)> {
    let url = reqwest::Url::parse(&o.token_url).map_err(|e| {
        (
            "token_url".to_string(),
            format!("`{}` is not a URL: {e}", o.token_url),
        )
    })?;
    // The client's secret goes to it in every request: not in the clear over a network.
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    if !(url.scheme() == "https" || url.scheme() == "http" && loopback) {
        return Err((
            "token_url".into(),
            "must be an https URL (http only to a loopback address): the client secret is sent to it".into(),
        ));
    }
    if o.client_id.is_empty() {
        return Err(("client_id".into(), "must not be empty".into()));
    }
    if o.client_secret.is_empty() {
        return Err(("client_secret".into(), "must not be empty".into()));
    }
    if let Some(name) = o
        .params
        .keys()
        .find(|k| OAUTH2_FIELDS.contains(&k.as_str()))
    {
        return Err((
            format!("params.{name}"),
            "is set by the token request itself (use `scope`, `client_id`, `client_secret`)".into(),
        ));
    }
    Ok(())
}

/// Names the routes that have no name after their source: `onomondo`, `onomondo-2`, …
fn name_routes(mut routes: Vec<RouteConfig>) -> Vec<RouteConfig> {
    let taken: HashSet<String> = routes.iter().map(|r| r.name.clone()).collect();
    let mut given: HashSet<String> = HashSet::new();
    for r in routes.iter_mut().filter(|r| r.name.is_empty()) {
        let name = (1..)
            .map(|n| match n {
                1 => r.source.clone(),
                n => format!("{}-{n}", r.source),
            })
            .find(|n| !taken.contains(n) && !given.contains(n))
            .expect("an unused name exists");
        given.insert(name.clone());
        r.name = name;
    }
    routes
}

fn check_retry(p: &RetryPolicy) -> Result<(), (String, String)> {
    if p.retry_schedule.is_empty() {
        return Err((
            "retry_schedule".into(),
            "must list at least one attempt".into(),
        ));
    }
    if !(0.0..=1.0).contains(&p.jitter) {
        return Err(("jitter".into(), "must be between 0 and 1".into()));
    }
    if p.failure_threshold == 0 {
        return Err(("failure_threshold".into(), "must be at least 1".into()));
    }
    if p.restart_after.is_some_and(|d| d < Duration::from_secs(1)) {
        return Err((
            "restart_after".into(),
            "must be at least 1s (or 0s: never)".into(),
        ));
    }
    if p.max_event_age.is_some_and(|d| d < Duration::from_secs(1)) {
        return Err((
            "max_event_age".into(),
            "must be at least 1s (or 0s: no limit)".into(),
        ));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` must be 1 to 64 characters of letters, digits, `-`, `_` or `.`"
        ))
    }
}

/// Where a config's references are read: `${VAR}` from `env`, `${file:PATH}` from files
/// (a relative `PATH` from `base_dir`, the config file's directory).
struct Refs<'a> {
    env: EnvLookup<'a>,
    base_dir: &'a Path,
    /// The files read so far, each once.
    read: std::cell::RefCell<Vec<PathBuf>>,
}

/// The most bytes a `${file:PATH}` reads: a secret, not a document.
const MAX_REFERENCED_FILE: u64 = 64 * 1024;

impl Refs<'_> {
    /// The text of the file a `${file:PATH}` names, without its trailing line breaks (as
    /// `echo` and most secret stores leave one).
    fn file(&self, name: &str) -> Result<String, String> {
        let path = self.base_dir.join(name);
        let mut read = self.read.borrow_mut();
        if !read.contains(&path) {
            read.push(path.clone());
        }
        drop(read);
        let bytes = read_at_most(&path, MAX_REFERENCED_FILE)
            .map_err(|why| format!("`${{file:{name}}}`: {}: {why}", path.display()))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| format!("`${{file:{name}}}`: {} is not UTF-8 text", path.display()))?;
        Ok(text.trim_end_matches(['\n', '\r']).to_string())
    }
}

/// The bytes of a file of at most `max` bytes; what is wrong (unreadable, larger).
pub(crate) fn read_at_most(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    (file.take(max + 1).read_to_end(&mut bytes)).map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("it is over {max} bytes"));
    }
    Ok(bytes)
}

/// Replaces `${VAR}`, `${VAR:-default}` and `${file:PATH}` in every string of the tree.
/// `$$` is a literal `$`.
fn expand_env(
    value: &mut toml::Value,
    path: &mut String,
    refs: &Refs<'_>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) => {
            *s = expand_str(s, refs).map_err(|m| (path.clone(), m))?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(item, path, refs)?;
                path.truncate(len);
            }
        }
        toml::Value::Table(table) => {
            for (k, item) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                expand_env(item, path, refs)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand_str(s: &str, refs: &Refs<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in `{s}`"))?;
            let expr = &after[..end];
            if let Some(file) = expr.strip_prefix("file:") {
                if file.is_empty() {
                    return Err(format!("`${{{expr}}}` names no file"));
                }
                out.push_str(&refs.file(file)?);
                rest = &after[end + 1..];
                continue;
            }
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("`${{{expr}}}` is not a valid variable reference"));
            }
            match ((refs.env)(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"
                    ));
                }
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::HmacHash;

    fn env(name: &str) -> Option<String> {
        match name {
            "FLEET_KEY" => Some("k-123".into()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", Path::new("/etc/sy"), &env)
    }

    const GOOD: &str = r#"
        [server]
        listen = "127.0.0.1:9000"
        [[sources]]
        name = "onomondo"
        [[destinations]]
        name = "fleet"
        url = "https://fleet.example/events?iccid=:iccid:"
        headers = { "x-api-key" = "${FLEET_KEY}", "x-region" = "${REGION:-eu}" }
        event_types = ["usage"]
        [[routes]]
        source = "onomondo"
        plugins = [{ name = "event-filter", config = { allow = "usage,location", n = 3 } }]
        destinations = ["fleet"]
    "#;

    #[test]
    fn expands_env_and_defaults() {
        let c = parse(GOOD).unwrap();
        let d = &c.destinations[0];
        assert_eq!(d.headers["x-api-key"], "k-123");
        assert_eq!(d.headers["x-region"], "eu");
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.plugins.dir, Path::new("/etc/sy/./plugins.d"));
        assert_eq!(
            c.routes[0].plugins[0].config,
            vec![
                ("allow".into(), "usage,location".into()),
                ("n".into(), "3".into())
            ]
        );
    }

    #[test]
    fn missing_env_names_the_key() {
        let err = parse(&GOOD.replace("${FLEET_KEY}", "${NOPE}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("destinations[0].headers.x-api-key"), "{err}");
        assert!(err.contains("NOPE"), "{err}");
    }

    #[test]
    fn a_file_reference_reads_a_secret_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        std::fs::write(dir.path().join("secrets/fleet"), "f-456\n").unwrap();
        let absolute = dir.path().join("secrets/fleet");
        let parse_in = |text: &str| Config::parse(text, "test.toml", dir.path(), &env);
        // Relative to the config file's directory, or absolute; the line break trimmed;
        // beside text and `${VAR}`s.
        let text = GOOD.replace(
            "${FLEET_KEY}",
            &format!(
                "${{file:secrets/fleet}}/${{file:{}}}/${{FLEET_KEY}}",
                absolute.display()
            ),
        );
        let c = parse_in(&text).unwrap();
        assert_eq!(c.destinations[0].headers["x-api-key"], "f-456/f-456/k-123");
        // What is wrong names the key and the file, never a secret.
        let err = |text: &str| parse_in(text).unwrap_err().to_string();
        let missing = err(&GOOD.replace("${FLEET_KEY}", "${file:secrets/nope}"));
        assert!(
            missing.contains("destinations[0].headers.x-api-key")
                && missing.contains("secrets/nope")
                && missing.contains("No such file"),
            "{missing}"
        );
        std::fs::write(dir.path().join("secrets/big"), vec![b'k'; 64 * 1024 + 1]).unwrap();
        let big = err(&GOOD.replace("${FLEET_KEY}", "${file:secrets/big}"));
        assert!(big.contains("is over 65536 bytes"), "{big}");
        std::fs::write(dir.path().join("secrets/binary"), [0xff, 0xfe]).unwrap();
        let binary = err(&GOOD.replace("${FLEET_KEY}", "${file:secrets/binary}"));
        assert!(binary.contains("is not UTF-8 text"), "{binary}");
        assert!(err(&GOOD.replace("${FLEET_KEY}", "${file:}")).contains("names no file"));
        // `$$` still escapes: a literal `${file:…}`.
        let c = parse_in(&GOOD.replace("${FLEET_KEY}", "$${file:x}")).unwrap();
        assert_eq!(c.destinations[0].headers["x-api-key"], "${file:x}");
    }

    #[test]
    fn an_event_type_may_be_a_pattern_but_not_empty() {
        let types = |v: &str| parse(&GOOD.replace(r#"event_types = ["usage"]"#, v));
        let ok = types(r#"event_types = ["usage", "bondio.attachment.*", "*"]"#).unwrap();
        assert_eq!(ok.destinations[0].event_types.as_ref().unwrap().len(), 3);
        let err = types(r#"event_types = ["usage", ""]"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("destinations[0].event_types[1]"), "{err}");
    }

    #[test]
    fn a_rate_limit_must_be_above_zero() {
        let limited = |v: &str| {
            parse(&GOOD.replace(
                "event_types",
                &format!("rate_limit = {v}\n        event_types"),
            ))
        };
        assert_eq!(
            limited("0.5").unwrap().destinations[0].rate_limit,
            Some(0.5)
        );
        for bad in ["0", "-1", "nan", "1e-9", "inf"] {
            let err = limited(bad).unwrap_err().to_string();
            assert!(err.contains("destinations[0].rate_limit"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_encryption_key_is_a_random_key_not_a_password() {
        let with =
            |store: &str| parse(&GOOD.replace("[server]", &format!("[store]\n{store}\n[server]")));
        let long = "0123456789abcdef0123456789abcdef";
        let c = with(&format!("encryption_key = \"{long}\"")).unwrap();
        assert_eq!(c.store.encryption_key.as_deref(), Some(long));
        let err = with("encryption_key = \"hunter2\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("store.encryption_key") && err.contains("32"),
            "{err}"
        );
        let err = with(&format!(
            "encryption_key = \"{long}\"\nprevious_encryption_keys = [\"{long}\", \"short\"]"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("store.previous_encryption_keys[1]"), "{err}");
    }

    #[test]
    fn a_source_may_keep_its_events_for_a_time_of_its_own() {
        let with = |retention: &str| {
            parse(&GOOD.replace(
                "name = \"onomondo\"\n        [[destinations]]",
                &format!("name = \"onomondo\"\n        retention = {{ {retention} }}\n        [[destinations]]"),
            ))
        };
        let c = with("delivered = \"1d\"").unwrap();
        let r = c.sources[0].retention.clone().unwrap();
        assert_eq!(r.delivered, Some(Duration::from_secs(86_400)));
        assert_eq!(r.failed, None);
        let err = with("failed = \"0s\"").unwrap_err().to_string();
        assert!(err.contains("sources[0].retention.failed"), "{err}");
        let err = with("kept = \"1d\"").unwrap_err().to_string();
        assert!(err.contains("sources[0].retention"), "{err}");
    }

    #[test]
    fn automatic_restarts_are_off_unless_set_and_a_destination_may_turn_it_off() {
        let with = |delivery: &str, retry: &str| {
            parse(
                &GOOD
                    .replace("[server]", &format!("[delivery]\n{delivery}\n[server]"))
                    .replace(
                        "event_types",
                        &format!("retry = {{ {retry} }}\n        event_types"),
                    ),
            )
        };
        let policy = |c: Config| {
            let d = &c.destinations[0];
            d.retry
                .as_ref()
                .map_or(c.delivery.retry.clone(), |o| o.apply(&c.delivery.retry))
        };
        assert_eq!(policy(with("", "").unwrap()).restart_after, None);
        let five = Some(Duration::from_secs(300));
        assert_eq!(
            policy(with("restart_after = \"5m\"", "").unwrap()).restart_after,
            five
        );
        assert_eq!(
            policy(with("", "restart_after = \"5m\"").unwrap()).restart_after,
            five
        );
        assert_eq!(
            policy(with("restart_after = \"5m\"", "restart_after = \"0s\"").unwrap()).restart_after,
            None,
            "0s: never"
        );
        let err = with("restart_after = \"500ms\"", "")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("delivery.restart_after") && err.contains("1s"),
            "{err}"
        );
        let err = with("", "restart_after = \"1ms\"").unwrap_err().to_string();
        assert!(err.contains("destinations[0].retry.restart_after"), "{err}");

        // `max_event_age` the same way: the delivery's, a destination's over it, 0s none.
        assert_eq!(policy(with("", "").unwrap()).max_event_age, None);
        let hour = Some(Duration::from_secs(3600));
        assert_eq!(
            policy(with("max_event_age = \"1h\"", "").unwrap()).max_event_age,
            hour
        );
        assert_eq!(
            policy(with("max_event_age = \"5m\"", "max_event_age = \"1h\"").unwrap()).max_event_age,
            hour
        );
        assert_eq!(
            policy(with("max_event_age = \"1h\"", "max_event_age = \"0s\"").unwrap()).max_event_age,
            None,
            "0s: no limit"
        );
        let err = with("", "max_event_age = \"10ms\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("destinations[0].retry.max_event_age"), "{err}");
    }

    #[test]
    fn oauth2_is_checked_where_it_would_fail_later() {
        let with = |oauth2: &str, headers: &str| {
            parse(&GOOD.replace(
                r#"headers = { "x-api-key" = "${FLEET_KEY}", "x-region" = "${REGION:-eu}" }"#,
                &format!("headers = {{ {headers} }}\n        oauth2 = {{ {oauth2} }}"),
            ))
        };
        let good = r#"token_url = "https://auth.example/token", client_id = "gw", client_secret = "${FLEET_KEY}", scope = "events:write", params = { audience = "fleet" }"#;
        let c = with(good, "").unwrap();
        let o = c.destinations[0].oauth2.as_ref().unwrap();
        assert_eq!(
            (o.client_secret.as_str(), o.client_auth),
            ("k-123", ClientAuth::Basic)
        );
        let body = with(&format!(r#"{good}, client_auth = "body""#), "").unwrap();
        assert_eq!(
            body.destinations[0].oauth2.as_ref().unwrap().client_auth,
            ClientAuth::Body
        );
        let loopback =
            r#"token_url = "http://127.0.0.1:9/token", client_id = "gw", client_secret = "s""#;
        assert!(with(loopback, "").is_ok(), "http to a loopback address");
        let other = |rest: &str| format!(r#"token_url = "https://a.example/", {rest}"#);
        for (oauth2, headers, key, says) in [
            (
                good.to_string(),
                r#"Authorization = "Bearer x""#,
                "destinations[0].headers.authorization",
                "cannot be set with `oauth2`",
            ),
            (
                r#"token_url = "http://auth.example/token", client_id = "gw", client_secret = "s""#
                    .to_string(),
                "",
                "destinations[0].oauth2.token_url",
                "must be an https URL",
            ),
            (
                r#"token_url = "auth.example", client_id = "gw", client_secret = "s""#.to_string(),
                "",
                "destinations[0].oauth2.token_url",
                "is not a URL",
            ),
            (
                other(r#"client_id = "", client_secret = "s""#),
                "",
                "destinations[0].oauth2.client_id",
                "must not be empty",
            ),
            (
                other(r#"client_id = "gw", client_secret = """#),
                "",
                "destinations[0].oauth2.client_secret",
                "must not be empty",
            ),
            (
                other(
                    r#"client_id = "gw", client_secret = "s", params = { grant_type = "password" }"#,
                ),
                "",
                "destinations[0].oauth2.params.grant_type",
                "is set by the token request",
            ),
            (
                other(r#"client_id = "gw", client_secret = "s", client_auth = "jwt""#),
                "",
                "destinations[0]",
                "client_auth",
            ),
        ] {
            let err = with(&oauth2, headers).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains(says),
                "{oauth2} {headers}: {err}"
            );
        }
    }

    #[test]
    fn unknown_field_names_the_key() {
        let err = parse(&GOOD.replace("event_types", "event_typo"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("destinations[0]"), "{err}");
        assert!(err.contains("event_typo"), "{err}");
    }

    #[test]
    fn unknown_delivery_key_is_rejected() {
        let err = parse(&format!("[delivery]\nmax_attempts = 3\n{GOOD}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("delivery") && err.contains("max_attempts"),
            "{err}"
        );
        let ok = parse(&format!("[delivery]\nretry_schedule = [\"0s\", \"1m\"]\nallowed_networks = [\"127.0.0.0/8\"]\n{GOOD}"))
            .unwrap();
        assert_eq!(ok.delivery.retry.retry_schedule.len(), 2);
        assert_eq!(ok.delivery.allowed_networks.len(), 1);
    }

    #[test]
    fn a_delivery_proxy_must_be_an_http_url_and_its_password_is_never_echoed() {
        let ok = parse(&format!(
            "[delivery]\nproxy = \"http://user:pw@proxy.internal:3128\"\n{GOOD}"
        ))
        .unwrap();
        assert_eq!(
            ok.delivery.proxy.as_deref(),
            Some("http://user:pw@proxy.internal:3128")
        );
        for (proxy, says) in [
            (
                "socks5://user:hunter2@proxy:1080",
                "`socks5` proxies are not supported",
            ),
            ("proxy.internal:3128", "proxies are not supported"),
            ("http://", "not a URL"),
            ("not a url", "not a URL"),
        ] {
            let err = parse(&format!("[delivery]\nproxy = \"{proxy}\"\n{GOOD}"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("delivery.proxy") && err.contains(says),
                "{proxy}: {err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn read_timeouts_default_and_must_be_above_zero() {
        let ok = parse(GOOD).unwrap();
        assert_eq!(ok.server.header_read_timeout, Duration::from_secs(100));
        assert_eq!(ok.server.body_read_timeout, Duration::from_secs(60));
        let ok =
            parse(&GOOD.replacen("[server]", "[server]\nbody_read_timeout = \"5s\"", 1)).unwrap();
        assert_eq!(ok.server.body_read_timeout, Duration::from_secs(5));
        let err = parse(&GOOD.replacen("[server]", "[server]\nheader_read_timeout = \"0s\"", 1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.header_read_timeout") && err.contains("must be above 0"),
            "{err}"
        );
        let err = parse(&format!("{GOOD}\n[delivery]\ntimeout = \"0s\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("delivery.timeout") && err.contains("must be above 0"),
            "{err}"
        );
    }

    #[test]
    fn the_queue_byte_budget_defaults_and_holds_one_largest_body() {
        let ok = parse(GOOD).unwrap();
        assert_eq!(ok.server.queue_max_bytes, 256 << 20);
        let small = "[server]\nmax_body_bytes = 2048\nqueue_max_bytes = 2047";
        let err = parse(&GOOD.replacen("[server]", small, 1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.queue_max_bytes")
                && err.contains("at least server.max_body_bytes"),
            "{err}"
        );
    }

    #[test]
    fn one_destination_gets_half_the_delivery_permits_unless_told() {
        let with = |delivery: &str| parse(&format!("[delivery]\n{delivery}\n{GOOD}"));
        let ok = parse(GOOD).unwrap();
        assert_eq!(ok.delivery.destination_concurrency, 128);
        assert_eq!(
            with("concurrency = 1")
                .unwrap()
                .delivery
                .destination_concurrency,
            1
        );
        let set = with("concurrency = 10\ndestination_concurrency = 10").unwrap();
        assert_eq!(set.delivery.destination_concurrency, 10);
        let err = with("concurrency = 10\ndestination_concurrency = 11")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("delivery.destination_concurrency") && err.contains("(10)"),
            "{err}"
        );
        // A quarter is kept for destinations with few in flight, unless told.
        assert_eq!(ok.delivery.reserved_concurrency, 64);
        assert_eq!(set.delivery.reserved_concurrency, 2);
        let none = with("concurrency = 10\nreserved_concurrency = 0").unwrap();
        assert_eq!(none.delivery.reserved_concurrency, 0);
        let err = with("concurrency = 10\nreserved_concurrency = 10")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("delivery.reserved_concurrency") && err.contains("(10)"),
            "{err}"
        );
        for bad in ["concurrency = 0", "concurrency = 65537"] {
            let err = with(bad).unwrap_err().to_string();
            assert!(
                err.contains("delivery.concurrency") && err.contains("between 1 and 65536"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn route_to_unknown_destination_is_rejected() {
        let err = parse(&GOOD.replace(r#"destinations = ["fleet"]"#, r#"destinations = ["nope"]"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("routes[0].destinations[0]"), "{err}");
    }

    #[test]
    fn a_destinations_signing_takes_what_its_scheme_needs() {
        let with = |signing: &str| {
            let line = format!("event_types = [\"usage\"]\n        signing = {{ {signing} }}");
            parse(&GOOD.replacen(r#"event_types = ["usage"]"#, &line, 1))
        };
        let hmac = r#"scheme = "hmac-sha256", secret = "s", header = "x-sig""#;
        let c = with(&format!(
            r#"{hmac}, signed = "{{timestamp}}.{{body}}", timestamp_header = "x-ts""#
        ))
        .unwrap();
        let s = c.destinations[0].signing.as_ref().unwrap();
        assert_eq!(s.scheme, SigningScheme::HmacSha256);
        for (scheme, hash) in [
            ("hmac-sha1", HmacHash::Sha1),
            ("hmac-sha512", HmacHash::Sha512),
        ] {
            let c = with(&hmac.replace("hmac-sha256", scheme)).unwrap();
            let s = c.destinations[0].signing.as_ref().unwrap();
            assert_eq!(s.hmac_form().hash, hash);
        }
        with(r#"secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw""#).unwrap();
        // Stripe's form carries a signature per secret: a rotation is possible.
        let pairs = r#"signature_key = "v1", timestamp_key = "t", signed = "{timestamp}.{body}""#;
        with(&format!(r#"{hmac}, {pairs}, previous_secrets = ["old"]"#)).unwrap();
        let refused: [(&str, &str, &str); 8] = [
            (
                &format!(r#"{hmac}, {pairs}, previous_secrets = [""]"#),
                "signing.previous_secrets",
                "empty",
            ),
            (
                r#"secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", header = "x-sig""#,
                "signing.header",
                "only for an HMAC scheme",
            ),
            (
                r#"scheme = "hmac-sha256", secret = "s""#,
                "signing.header",
                "required",
            ),
            (
                r#"scheme = "hmac-sha256", secret = "", header = "x-sig""#,
                "signing.secret",
                "empty",
            ),
            (
                &format!(r#"{hmac}, previous_secrets = ["old"]"#),
                "signing.previous_secrets",
                "one signature",
            ),
            (
                &format!(r#"{hmac}, signed = "{{timestamp}}.{{body}}""#),
                "signing.signed",
                "`timestamp_header`",
            ),
            (
                &format!(r#"{hmac}, timestamp_header = "x-ts""#),
                "signing.signed",
                "not signed",
            ),
            (
                r#"scheme = "hmac-sha256", secret = "s", header = "x sig""#,
                "signing.header",
                "not a header name",
            ),
        ];
        for (signing, key, says) in refused {
            let err = with(signing).unwrap_err().to_string();
            assert!(
                err.contains(&format!("destinations[0].{key}")),
                "{signing}: {err}"
            );
            assert!(err.contains(says), "{signing}: {err}");
        }
    }

    #[test]
    fn a_challenge_is_answered_only_when_the_body_is_one() {
        let challenge = |json: serde_json::Value| -> ChallengeConfig {
            let c: ChallengeConfig = serde_json::from_value(json).unwrap();
            c.validate().unwrap();
            c
        };
        let slack =
            challenge(serde_json::json!({ "field": "challenge", "type": "url_verification" }));
        let answer = |c: &ChallengeConfig, body: &str| c.answer(body.as_bytes());
        assert_eq!(
            answer(&slack, r#"{"type":"url_verification","challenge":"c-1"}"#),
            Some(ChallengeReply::Json(
                serde_json::json!({ "challenge": "c-1" })
            ))
        );
        let twitch = challenge(serde_json::json!({ "field": "challenge", "answer": "text" }));
        assert_eq!(
            answer(&twitch, r#"{"challenge":"pogchamp","subscription":{}}"#),
            Some(ChallengeReply::Text("pogchamp".into()))
        );
        assert_eq!(
            answer(&twitch, r#"{"challenge":7}"#),
            Some(ChallengeReply::Text("7".into()))
        );
        for not_one in [
            r#"{"type":"event_callback","challenge":"c-1"}"#,
            r#"{"type":"url_verification"}"#,
            r#"["url_verification"]"#,
            "type=url_verification&challenge=c-1",
        ] {
            assert_eq!(answer(&slack, not_one), None, "{not_one}");
        }
        let any = challenge(serde_json::json!({ "field": "validationToken" }));
        assert_eq!(
            answer(&any, r#"{"validationToken":7}"#),
            Some(ChallengeReply::Json(
                serde_json::json!({ "validationToken": 7 })
            ))
        );
        assert_eq!(
            any.answer_query("validationToken=x"),
            None,
            "a body challenge"
        );

        // In the query: the parameter decoded, the verify token compared.
        let meta = challenge(serde_json::json!({ "query": "hub.challenge",
            "token_query": "hub.verify_token", "token": "tok" }));
        assert_eq!(
            meta.answer_query("hub.mode=subscribe&hub.challenge=11%2022&hub.verify_token=tok"),
            Some(Ok(ChallengeReply::Text("11 22".into())))
        );
        assert!(matches!(
            meta.answer_query("hub.challenge=1&hub.verify_token=to"),
            Some(Err(_))
        ));
        assert!(matches!(meta.answer_query("hub.challenge=1"), Some(Err(_))));
        assert_eq!(meta.answer_query("hub.verify_token=tok"), None);
        assert_eq!(
            meta.answer(br#"{"hub.challenge":"1"}"#),
            None,
            "a query challenge"
        );
        let json = challenge(serde_json::json!({ "query": "challenge", "answer": "json" }));
        assert_eq!(
            json.answer_query("challenge=abc"),
            Some(Ok(ChallengeReply::Json(
                serde_json::json!({ "challenge": "abc" })
            )))
        );
        for (bad, key) in [
            (serde_json::json!({}), "field"),
            (serde_json::json!({ "field": "" }), "field"),
            (serde_json::json!({ "field": "a", "query": "b" }), "query"),
            (serde_json::json!({ "query": "b", "type": "x" }), "type"),
            (
                serde_json::json!({ "query": "b", "token_query": "t" }),
                "token",
            ),
            (
                serde_json::json!({ "query": "b", "token": "t" }),
                "token_query",
            ),
            (
                serde_json::json!({ "field": "b", "token_query": "t", "token": "x" }),
                "token_query",
            ),
            (
                serde_json::json!({ "query": "b", "token_query": "t", "token": "" }),
                "token",
            ),
        ] {
            let c: ChallengeConfig = serde_json::from_value(bad.clone()).unwrap();
            assert_eq!(c.validate().unwrap_err().0, key, "{bad}");
        }
    }

    #[test]
    fn a_source_that_requires_json_refuses_other_bodies_saying_where() {
        let source = |extra: &str| {
            toml::from_str::<SourceConfig>(&format!("name = \"onomondo\"\n{extra}")).unwrap()
        };
        let lenient = source("");
        assert!(!lenient.require_json);
        assert_eq!(lenient.refuses_body(b"{\"a\": 1,}"), None);
        let strict = source("require_json = true");
        for fine in [&b"{\"a\": 1}"[..], b"[1, 2]", b" \"text\" ", b"7"] {
            assert_eq!(strict.refuses_body(fine), None);
        }
        let why = strict.refuses_body(b"{\n\"a\": 1\n\"b\": 2}").unwrap();
        assert_eq!(
            why,
            "the body is not valid JSON: expected `,` or `}` at line 3 column 1 \
             (source `onomondo` takes JSON bodies only)"
        );
        assert!(
            strict
                .refuses_body(b"a=1&b=2")
                .unwrap()
                .contains("line 1 column 1")
        );
        let empty = strict.refuses_body(b" \n").unwrap();
        assert!(empty.starts_with("the body is empty"), "{empty}");
        // Shown as set, and only when set.
        assert_eq!(
            toml::to_string(&strict).unwrap(),
            "name = \"onomondo\"\nrequire_json = true\n"
        );
        assert_eq!(toml::to_string(&lenient).unwrap(), "name = \"onomondo\"\n");
    }

    #[test]
    fn an_idempotency_header_must_be_a_header_name() {
        let with = |h: &str| {
            let line = format!("name = \"onomondo\"\nidempotency_header = \"{h}\"");
            parse(&GOOD.replacen(r#"name = "onomondo""#, &line, 1))
        };
        let c = with("X-GitHub-Delivery").unwrap();
        assert_eq!(
            c.sources[0].idempotency_header.as_deref(),
            Some("X-GitHub-Delivery")
        );
        let err = with("x delivery").unwrap_err().to_string();
        assert!(err.contains("sources[0].idempotency_header"), "{err}");
        assert!(err.contains("not a header name"), "{err}");
    }

    #[test]
    fn the_notify_source_must_be_a_source() {
        let with = |source: &str| {
            let notify = format!("[delivery]\nnotify_source = \"{source}\"\n[[sources]]");
            parse(&GOOD.replacen("[[sources]]", &notify, 1))
        };
        let c = with("onomondo").unwrap();
        assert_eq!(c.delivery.notify_source.as_deref(), Some("onomondo"));
        let err = with("nope").unwrap_err().to_string();
        assert!(err.contains("delivery.notify_source"), "{err}");
        assert!(err.contains("no source named `nope`"), "{err}");
    }

    #[test]
    fn environment_overrides_listen_and_data_dir() {
        let env = |n: &str| match n {
            "SWITCHYARD_LISTEN" => Some("127.0.0.1:0".to_string()),
            "SWITCHYARD_DATA_DIR" => Some("/var/lib/sy".to_string()),
            "FLEET_KEY" => Some("x".to_string()),
            _ => None,
        };
        let c = Config::parse(GOOD, "t", Path::new("."), &env).unwrap();
        assert_eq!(c.server.listen.port(), 0);
        assert_eq!(c.server.data_dir, Path::new("/var/lib/sy"));
    }

    /// The limits of plugins' HTTP requests, and the origins a route grants, are checked
    /// when the config loads, each error naming its key.
    #[test]
    fn plugins_http_settings_are_checked() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            crate::plugin::HttpLimits::from(&c.plugins),
            crate::plugin::HttpLimits::default()
        );
        let limited = parse(&format!(
            "{GOOD}\n[plugins.http_rate_limit]\n\"https://crm.example.com\" = 10\n\"https://*.example.net\" = 0.5\n"
        ))
        .unwrap();
        let rates = crate::plugin::HttpLimits::from(&limited.plugins).rates;
        let origin = |o| crate::plugin::Origin::parse(o).unwrap();
        assert_eq!(
            rates[..],
            [
                (origin("https://*.example.net"), 0.5),
                (origin("https://crm.example.com:443"), 10.0)
            ]
        );
        for (extra, key, says) in [
            (
                "[plugins]\nhttp_timeout = \"0s\"\n",
                "plugins.http_timeout",
                "more than 0s",
            ),
            (
                "[plugins]\nhttp_concurrency = 0\n",
                "plugins.http_concurrency",
                "1 to 4096",
            ),
            (
                "[plugins.http_rate_limit]\n\"https://crm.example.com\" = 0\n",
                "plugins.http_rate_limit.\"https://crm.example.com\"",
                "between 0.001 and 1000000",
            ),
            (
                "[plugins.http_rate_limit]\n\"crm.example.com\" = 10\n",
                "plugins.http_rate_limit.\"crm.example.com\"",
                "no scheme",
            ),
            (
                "[plugins.http_rate_limit]\n\"https://crm.example.com\" = 10\n\"https://crm.example.com:443\" = 5\n",
                "plugins.http_rate_limit.\"https://crm.example.com:443\"",
                "`https://crm.example.com` names already",
            ),
            (
                "[[routes]]\nname = \"r2\"\nsource = \"onomondo\"\nplugins = [{ name = \"p\", allow_http = [\"https://a.example\", \"a.example\"] }]\n",
                "plugins[0].allow_http[1]",
                "no scheme",
            ),
        ] {
            let err = parse(&format!("{GOOD}\n{extra}")).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(says), "{extra}: {err}");
        }
    }

    #[test]
    fn bad_listen_names_the_key() {
        let err = parse(&GOOD.replace("127.0.0.1:9000", "nowhere"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.listen"), "{err}");
    }

    /// `store.indexed_fields` takes dotted paths as the event list's `field` does, each once
    /// and not too many; a bad entry is named by its position.
    #[test]
    fn indexed_fields_are_paths_listed_once() {
        let with = |fields: &str| parse(&format!("{GOOD}\n[store]\nindexed_fields = {fields}\n"));
        let c = with(r#"["sim.iccid", "imsi"]"#).unwrap();
        assert_eq!(c.store.indexed_fields, ["sim.iccid", "imsi"]);
        for (fields, key, says) in [
            (
                r#"["imsi", "sim..iccid"]"#,
                "store.indexed_fields[1]",
                "not a field",
            ),
            (r#"["a\"b"]"#, "store.indexed_fields[0]", "not a field"),
            (
                r#"["imsi", "iccid", "imsi"]"#,
                "store.indexed_fields[2]",
                "listed twice",
            ),
        ] {
            let err = with(fields).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(says), "{fields}: {err}");
        }
        let many: Vec<String> = (0..=MAX_INDEXED_FIELDS).map(|i| format!("f{i}")).collect();
        let err = with(&format!("{many:?}")).unwrap_err().to_string();
        assert!(err.contains("at most 16"), "{err}");
    }
}

#[cfg(test)]
mod change_tests {
    use super::*;
    use crate::managed::Kind;

    /// A valid config with a notify source, shared destinations and two routes per source.
    fn valid() -> Config {
        let text = r#"
            [delivery]
            notify_source = "alerts"
            [[sources]]
            name = "alerts"
            [[sources]]
            name = "fleet"
            [[sources]]
            name = "idle"
            [[destinations]]
            name = "pager"
            url = "https://pager.example/"
            [[destinations]]
            name = "archive"
            url = "https://archive.example/"
            [[destinations]]
            name = "spare"
            url = "https://spare.example/"
            [[routes]]
            source = "alerts"
            destinations = ["pager"]
            [[routes]]
            name = "fleet-archive"
            source = "fleet"
            destinations = ["archive", "pager"]
        "#;
        Config::parse(text, "test.toml", Path::new("."), &|_| None).unwrap()
    }

    fn parsed<T: serde::de::DeserializeOwned>(json: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(json).unwrap())
    }

    /// After any one object is made, changed or deleted, checking that object alone finds
    /// what checking everything finds: the same key and message, or nothing.
    #[test]
    fn checking_the_changed_object_finds_what_checking_all_finds() {
        let base = valid();
        assert_eq!(base.validate(), Ok(()));
        let mut cases: Vec<(Config, Kind, String)> = Vec::new();
        // Each object deleted: some are referenced, some not.
        for kind in [Kind::Source, Kind::Destination, Kind::Route] {
            let count = match kind {
                Kind::Source => base.sources.len(),
                Kind::Destination => base.destinations.len(),
                Kind::Route => base.routes.len(),
            };
            for i in 0..count {
                let mut c = base.clone();
                let name = match kind {
                    Kind::Source => c.sources.remove(i).name.clone(),
                    Kind::Destination => c.destinations.remove(i).name.clone(),
                    Kind::Route => c.routes.remove(i).name.clone(),
                };
                cases.push((c, kind, name));
            }
        }
        // Objects made or changed, valid or not.
        let sources = [
            serde_json::json!({"name": "new"}),
            serde_json::json!({"name": "idle", "rate_limit": 0.0}),
            serde_json::json!({"name": "new", "allow_client_names": ["x"]}),
            serde_json::json!({"name": "bad name!"}),
            serde_json::json!({"name": "fleet"}),
        ];
        for json in sources {
            let mut c = base.clone();
            let s: Arc<SourceConfig> = parsed(json);
            let name = s.name.clone();
            match c
                .sources
                .iter()
                .position(|x| x.name == name && name != "fleet")
            {
                Some(i) => c.sources[i] = s,
                None => c.sources.push(s),
            }
            cases.push((c, Kind::Source, name));
        }
        let destinations = [
            serde_json::json!({"name": "new", "url": "https://new.example/"}),
            serde_json::json!({"name": "spare", "url": "ftp://spare.example/"}),
            serde_json::json!({"name": "pager", "url": "not a url"}),
            serde_json::json!({"name": "new", "url": "https://x/", "timeout": "0s"}),
            serde_json::json!({"name": "archive", "url": "https://archive.example/"}),
        ];
        for (n, json) in destinations.into_iter().enumerate() {
            let mut c = base.clone();
            let d: Arc<DestinationConfig> = parsed(json);
            let name = d.name.clone();
            match c.destinations.iter().position(|x| x.name == name && n != 4) {
                Some(i) => c.destinations[i] = d,
                None => c.destinations.push(d),
            }
            cases.push((c, Kind::Destination, name));
        }
        let routes = [
            serde_json::json!({"name": "new", "source": "idle", "destinations": ["spare"]}),
            serde_json::json!({"name": "new", "source": "nowhere", "destinations": ["spare"]}),
            serde_json::json!({"name": "new", "source": "idle", "destinations": ["spare", "gone"]}),
            serde_json::json!({"name": "fleet-archive", "source": "fleet", "destinations": ["gone"]}),
            serde_json::json!({"name": "new", "source": "idle", "destinations": [],
                "plugins": [{"name": "p", "max_memory_bytes": 1099511627776u64}]}),
            serde_json::json!({"name": "alerts", "source": "idle", "destinations": []}),
        ];
        for (n, json) in routes.into_iter().enumerate() {
            let mut c = base.clone();
            let r: Arc<RouteConfig> = parsed(json);
            let name = r.name.clone();
            match c.routes.iter().position(|x| x.name == name && n != 5) {
                Some(i) => c.routes[i] = r,
                None => c.routes.push(r),
            }
            cases.push((c, Kind::Route, name));
        }
        let mut refused = 0;
        for (c, kind, name) in &cases {
            let all = c.validate();
            refused += usize::from(all.is_err());
            assert_eq!(
                c.validate_objects(Some((*kind, name))),
                all,
                "{kind:?} `{name}`"
            );
        }
        assert_eq!(refused, 17, "the refused changes among the cases");
    }
}
