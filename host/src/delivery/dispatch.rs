//! The [`Dispatcher`]: claims due deliveries from the store, sends them, records each
//! attempt with what follows from it, and keeps every destination's state (ACTIVE,
//! FAILED, DISABLED). Time comes from a [`Clock`] so tests can move it by hand.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::placeholder::{self, Target};
use super::policy::{AttemptResult, decide, parse_retry_after};
use super::{Destination, Destinations, USER_AGENT};
use crate::config::DeliveryConfig;
use crate::edge::SsrfGuard;
use crate::metrics::Metrics;
use crate::pace::Limit;
use crate::plugin::{HttpRequest, HttpResponse, HttpSender, SendError};
use crate::store::{
    Attempt, AttemptNext, ClaimScope, DestinationHealth, DestinationState, DueDelivery,
    Idempotency, Inserted, Known, Store, StoreError,
};

/// How much of a response body is kept with an attempt.
const RESPONSE_EXCERPT: usize = 1024;

/// A response excerpt as the text an attempt records: invalid UTF-8, and NUL (which
/// PostgreSQL's text cannot hold: the attempt's record would fail, and the delivery be
/// sent again at every lease), become U+FFFD.
fn response_text(excerpt: &[u8]) -> String {
    String::from_utf8_lossy(excerpt).replace('\0', "\u{FFFD}")
}

/// At shutdown, retries due within this long are still sent.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often `restart_failed` looks for FAILED destinations due a test message.
const RESTART_TICK: Duration = Duration::from_secs(1);
/// How long the dispatcher sleeps at most before looking for due deliveries again.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// On a shared store, how long a delivery to a destination this instance does not know
/// waits, once due, for an instance that knows it (during a rolling deploy the instances'
/// config files differ) before this one takes it and fails it as no longer configured.
const ORPHANED_AFTER: Duration = Duration::from_secs(600);
/// Within how long a second instance's post of the same destination state change is a
/// duplicate (instances read each other's states every few seconds).
const NOTIFY_WINDOW: Duration = Duration::from_secs(3600);
/// The most attempts kept in memory whose record failed (`Dispatcher::unrecorded`).
const UNRECORDED_MAX: usize = 10_000;
/// How long such an attempt is kept at most, when room is needed.
const UNRECORDED_KEPT: Duration = Duration::from_secs(3600);

/// An attempt made whose record failed, kept until its delivery is claimed again.
struct Unrecorded {
    /// The delivery's attempts before this one: the claim that finds it must agree.
    attempts: u32,
    /// When it was kept: one never claimed here again (another instance took it) is
    /// dropped after `UNRECORDED_KEPT`, to make room.
    kept: std::time::Instant,
    attempt: Attempt,
    next: AttemptNext,
}

/// The time, in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        super::now_ms()
    }
}

/// A clock that moves only when told to, for tests.
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        Self(AtomicU64::new(start_ms))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Why a restart did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("no destination named `{0}`")]
    NotFound(String),
    #[error("the test message failed: {0}")]
    TestFailed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a destination answered a test message.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct TestOutcome {
    /// True when it answered 2xx.
    pub ok: bool,
    /// Its HTTP status code, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// Why the message failed (connection error, status, SSRF refusal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Sends due deliveries and keeps destination state.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    /// How deliveries go out: swapped by a reload that changes it (`set_transport`).
    transport: ArcSwap<Transport>,
    /// `store.lease`: a claimed delivery is leased for the longest timeout an attempt may
    /// have (`delivery.timeout` or a destination's) + this.
    store_lease: Duration,
    /// The longest of the destinations' own `timeout`s, in ms (0: none has one).
    longest_timeout: AtomicU64,
    /// The destinations' names, for the claims on a shared store (`claim_scope`).
    known: ArcSwap<Known>,
    destinations: ArcSwap<Destinations>,
    states: Mutex<HashMap<String, DestinationState>>,
    clock: Arc<dyn Clock>,
    wake: Notify,
    /// `delivery.concurrency`: a permit per attempt in flight, in two parts. `permits`
    /// are for any attempt; `reserve` (`delivery.reserved_concurrency`, a quarter by
    /// default) only for attempts to a destination with fewer than `light` (an eighth of
    /// the reserve) attempts in flight. So
    /// however many destinations hang or answer slowly, each holding its
    /// `destination_concurrency`, the others' deliveries still find permits instead of
    /// waiting for those attempts to end.
    /// A reload resizes both (`set_concurrency`).
    permits: Pool,
    reserve: Pool,
    /// Each destination's lane: its `delivery.destination_concurrency` permits, taken
    /// before one of `permits` (deliveries waiting behind a destination that hangs hold
    /// none of those), and how many attempts it holds.
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    destination_concurrency: AtomicUsize,
    /// Claimed deliveries whose attempts have their destination's permit but not one of
    /// `permits` yet: the next claim takes only as many as are left beyond them. (Those
    /// waiting in a lane are bounded by the lane; the pipeline's are not counted: it has
    /// its own bound.)
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    /// See [`ORPHANED_AFTER`]; zero on a store only this gateway uses.
    orphaned_after: Duration,
    /// Destination states that attempts changed, in the order decided, for `write_states`.
    state_changes: mpsc::UnboundedSender<DestinationState>,
    /// `write_states`, and how to tell it to finish.
    state_writer: Mutex<Option<(tokio::task::JoinHandle<()>, CancellationToken)>>,
    /// The last claim may have left due deliveries behind (no permits, or a full batch):
    /// a finished attempt wakes the loop.
    starved: AtomicBool,
    attempts: TaskTracker,
    metrics: Arc<Metrics>,
    /// `delivery.notify_source` of the config in force.
    notify_source: ArcSwap<Option<String>>,
    /// Attempts made whose record failed even when tried again (`record_again`: a store
    /// that could not write for longer — a database away, a full disk), by delivery id.
    /// When the lease runs out and the delivery is claimed again here, the attempt is
    /// recorded then instead of the request being sent again. At most `UNRECORDED_MAX`;
    /// beyond them, and on another instance, the delivery is sent again (at least once).
    unrecorded: Mutex<HashMap<String, Unrecorded>>,
    /// When the next test message of each FAILED destination with `restart_after` is due
    /// from this instance (ms), by name: kept by `restart_failed`.
    next_tests: Mutex<HashMap<String, u64>>,
}

/// How deliveries go out, from `[delivery]`: the HTTP client (its timeout, the SSRF guard
/// as its resolver, the trusted CAs, the client certificate, the proxy) and the guard.
struct Transport {
    client: reqwest::Client,
    guard: SsrfGuard,
    /// `delivery.timeout`, for destinations without a `timeout` of their own.
    timeout: Duration,
    /// When the certificates `client` was built with stop being valid.
    certificates: Vec<(String, crate::edge::Validity)>,
    settings: TransportSettings,
}

/// What a `Transport` is built from: a reload whose settings are equal builds nothing.
#[derive(PartialEq)]
struct TransportSettings {
    timeout: Duration,
    allowed_networks: Vec<ipnet::IpNet>,
    proxy: Option<String>,
    /// The certificate files' names and contents (`DeliveryTls::fingerprint`): a renewal
    /// in place changes it.
    tls: [u8; 32],
}

impl TransportSettings {
    fn read(config: &DeliveryConfig) -> anyhow::Result<Self> {
        let tls = super::tls_settings(config)
            .map_err(|(key, message)| anyhow::anyhow!("{key}: {message}"))?;
        Ok(Self::of(config, tls.fingerprint))
    }

    fn of(config: &DeliveryConfig, tls: [u8; 32]) -> Self {
        Self {
            timeout: config.timeout,
            allowed_networks: config.allowed_networks.clone(),
            proxy: config.proxy.clone(),
            tls,
        }
    }
}

impl Transport {
    fn build(config: &DeliveryConfig) -> anyhow::Result<Self> {
        let mut guard = SsrfGuard::new(config.allowed_networks.clone());
        let super::DeliveryTls {
            roots,
            identity,
            validity: certificates,
            fingerprint,
        } = super::tls_settings(config)
            .map_err(|(key, message)| anyhow::anyhow!("{key}: {message}"))?;
        // Proxies only as configured: one taken from the environment would move the SSRF
        // guard's check from the destination to the proxy.
        let mut client = reqwest::Client::builder().no_proxy();
        if let Some(proxy) = &config.proxy {
            let host = super::proxy_host(proxy)
                .map_err(|message| anyhow::anyhow!("delivery.proxy: {message}"))?;
            guard = guard.behind_proxy(host);
            client = client.proxy(reqwest::Proxy::all(proxy)?);
        }
        let mut client = client
            .dns_resolver(Arc::new(guard.clone()))
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .tls_certs_merge(roots);
        if let Some(identity) = identity {
            client = client.identity(identity);
        }
        Ok(Self {
            client: client.build()?,
            guard,
            timeout: config.timeout,
            certificates,
            settings: TransportSettings::of(config, fingerprint),
        })
    }
}

/// Plugins' requests (WIT `http`) go out as deliveries do: the same client (proxy,
/// trusted authorities, no redirects) and the same address guard.
#[async_trait::async_trait]
impl HttpSender for Transport {
    async fn send(
        &self,
        request: HttpRequest,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<HttpResponse, SendError> {
        (self.guard.check_destination(&request.url).await).map_err(SendError::Refused)?;
        let mut headers = HeaderMap::new();
        for (k, v) in &request.headers {
            let header = (HeaderName::from_bytes(k.as_bytes()).ok())
                .zip(HeaderValue::from_str(v).ok())
                // (The value is not repeated: it may be a credential.)
                .ok_or_else(|| SendError::Refused(format!("header `{k}` is not valid")))?;
            headers.append(header.0, header.1);
        }
        let mut builder = (self.client.request(request.method, request.url)).headers(headers);
        if let Some(body) = request.body {
            builder = builder.body(body);
        }
        let exchange = async {
            let mut resp = builder
                .send()
                .await
                .map_err(|e| SendError::Failed(describe(&e)))?;
            let status = resp.status().as_u16();
            let headers = (resp.headers().iter())
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let mut body = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| SendError::Failed(describe(&e)))?
            {
                if body.len() + chunk.len() > max_bytes {
                    return Err(SendError::Failed(format!(
                        "the response's body is larger than {max_bytes} bytes \
                         (`plugins.http_max_response_bytes`)"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(HttpResponse {
                status,
                headers,
                body,
            })
        };
        // The call's time for requests bounds the exchange, body included (the client's own
        // timeout, `delivery.timeout`, still applies when it is the shorter).
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Failed(
                "timed out: the call's time for HTTP requests (`plugins.http_timeout`) ran out"
                    .into(),
            )),
        }
    }
}

/// A sender of plugins' requests through a transport built from `config`, for runs with no
/// dispatcher (`switchyard dry-run`).
pub fn plugin_sender(config: &DeliveryConfig) -> anyhow::Result<Arc<dyn HttpSender>> {
    Ok(Arc::new(Transport::build(config)?))
}

/// Plugins' requests go out through the transport in force.
#[async_trait::async_trait]
impl HttpSender for Dispatcher {
    async fn send(
        &self,
        request: HttpRequest,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<HttpResponse, SendError> {
        let transport = self.transport.load_full();
        transport.send(request, timeout, max_bytes).await
    }
}

impl Dispatcher {
    /// A dispatcher for these destinations, with their states as stored. A delivery it
    /// claims is leased for the longest timeout an attempt may have + `lease`.
    pub async fn new(
        store: Arc<dyn Store>,
        config: &DeliveryConfig,
        lease: Duration,
        destinations: Arc<Destinations>,
        longest_timeout_ms: u64,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let transport = Transport::build(config)?;
        let longest_timeout = AtomicU64::new(longest_timeout_ms);
        let states = store
            .destination_states()
            .await?
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let (state_changes, changes) = mpsc::unbounded_channel();
        let writer_stop = CancellationToken::new();
        let writer = tokio::spawn(write_states(store.clone(), changes, writer_stop.clone()));
        let orphaned_after = if store.shared() {
            ORPHANED_AFTER
        } else {
            Duration::ZERO
        };
        Ok(Arc::new(Self {
            store,
            transport: ArcSwap::from_pointee(transport),
            store_lease: lease,
            longest_timeout,
            known: ArcSwap::from_pointee(Known::new(destinations.keys().cloned())),
            destinations: ArcSwap::new(destinations),
            states: Mutex::new(states),
            clock,
            wake: Notify::new(),
            permits: Pool::new(config.concurrency - config.reserved_concurrency),
            reserve: Pool::new(config.reserved_concurrency),
            lanes: Mutex::default(),
            destination_concurrency: AtomicUsize::new(config.destination_concurrency),
            waiting: Arc::default(),
            orphaned_after,
            starved: AtomicBool::new(false),
            state_changes,
            state_writer: Mutex::new(Some((writer, writer_stop))),
            attempts: TaskTracker::new(),
            metrics,
            notify_source: ArcSwap::from_pointee(config.notify_source.clone()),
            unrecorded: Mutex::default(),
            next_tests: Mutex::default(),
        }))
    }

    /// The certificates deliveries use now (`delivery.ca_certificates`,
    /// `delivery.client_certificate`) by key, and when each stops being valid.
    pub fn certificates(&self) -> Vec<(String, crate::edge::Validity)> {
        self.transport.load().certificates.clone()
    }

    /// Builds the transport a reloaded `[delivery]` describes and swaps it in, unless it
    /// is the one in force (same settings, same certificate files' contents); attempts
    /// under way finish on the one they started with. What cannot be built (a file gone
    /// since the config was validated) is logged and the transport in force stays.
    pub fn set_transport(&self, config: &DeliveryConfig) {
        let settings = match TransportSettings::read(config) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "Cannot read the delivery settings; deliveries go on as before.");
                return;
            }
        };
        if settings == self.transport.load().settings {
            return;
        }
        match Transport::build(config) {
            Ok(t) => {
                self.transport.store(Arc::new(t));
                tracing::info!(
                    "Deliveries use the reloaded delivery settings (timeout, allowed networks, certificates, proxy)."
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot apply the reloaded delivery settings; deliveries go on as before.")
            }
        }
    }

    /// Applies a reloaded `delivery.concurrency`, `reserved_concurrency` and
    /// `destination_concurrency`.
    /// More permits are usable at once; fewer take effect as attempts under way end (no
    /// new attempt starts while more are in flight than the new size allows), and none
    /// is cut short.
    pub fn set_concurrency(&self, config: &DeliveryConfig) {
        let (concurrency, reserved, per_destination) = (
            config.concurrency,
            config.reserved_concurrency,
            config.destination_concurrency,
        );
        let (before, before_reserved, before_per_destination) = (
            self.permits.size() + self.reserve.size(),
            self.reserve.size(),
            self.destination_concurrency.load(Ordering::SeqCst),
        );
        if (before, before_reserved, before_per_destination)
            == (concurrency, reserved, per_destination)
        {
            return;
        }
        self.permits.resize(concurrency - reserved);
        self.reserve.resize(reserved);
        self.destination_concurrency
            .store(per_destination, Ordering::SeqCst);
        for lane in (self.lanes.lock().unwrap_or_else(|e| e.into_inner())).values() {
            lane.permits.resize(per_destination);
        }
        tracing::info!(
            concurrency,
            reserved_concurrency = reserved,
            destination_concurrency = per_destination,
            before,
            before_reserved,
            before_per_destination,
            "Deliveries use the reloaded concurrency."
        );
        self.wake();
    }

    /// The delivery stage's time.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Swaps in the destinations (and the longest of their own timeouts, in ms: see
    /// `Routing::longest_timeout`) and the notify source of a reloaded config, then
    /// releases what destinations that are no longer configured hold. The same table as
    /// before (a change to a source or route) changes nothing.
    pub async fn set_destinations(
        &self,
        destinations: Arc<Destinations>,
        longest_timeout_ms: u64,
        notify_source: Option<String>,
    ) {
        self.notify_source.store(Arc::new(notify_source));
        if !Arc::ptr_eq(&self.destinations.load(), &destinations) {
            // (An attempt still holding a removed destination's permits keeps them.)
            (self.lanes.lock().unwrap_or_else(|e| e.into_inner()))
                .retain(|name, _| destinations.contains_key(name));
            // Raised before the new destinations are in force: no claim is leased for less
            // than an attempt to one of them may take.
            self.longest_timeout
                .store(longest_timeout_ms, Ordering::SeqCst);
            if !self.orphaned_after.is_zero() {
                self.known
                    .store(Arc::new(Known::new(destinations.keys().cloned())));
            }
        }
        let before = self.destinations.swap(destinations);
        self.release_removed(&before).await;
    }

    /// Posts a destination's new state as an event into `delivery.notify_source`, if set:
    /// routes from that source take it on like any event (to a chat hook or a pager,
    /// through plugins, with retries). Only the instance that decided the change posts it;
    /// on a shared store two instances may decide the same change before either has read
    /// the other's, so the event carries an idempotency key — the destination, its epoch
    /// and the new state, which happen once per epoch (a restart begins a new one) — and
    /// the second is answered as a duplicate instead of paging twice.
    fn notify(&self, state: &DestinationState) {
        let Some(source) = self.notify_source.load().as_ref().clone() else {
            return;
        };
        let kind = match state.state {
            DestinationHealth::Active => "destination.active",
            DestinationHealth::Failed => "destination.failed",
            DestinationHealth::Disabled => "destination.disabled",
        };
        let body = serde_json::json!({
            "type": kind,
            "destination": state.name,
            "state": state.state,
            "consecutive_failures": state.consecutive_failures,
            "last_error": state.last_error,
            "at": self.clock.now_ms(),
        });
        let event = crate::event::Event {
            id: uuid::Uuid::now_v7().to_string(),
            path: format!("/v1/ingest/{source}"),
            source,
            received_at: super::now_ms(),
            method: "POST".into(),
            query: String::new(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("user-agent".into(), USER_AGENT.into()),
            ],
            content_type: Some("application/json".into()),
            body: crate::event::Body(body.to_string().into()),
            metadata: Vec::new(),
            run: 0,
        };
        let idempotency = Idempotency {
            key: format!("{kind}:{}:{}", state.name, state.epoch),
            window_ms: NOTIFY_WINDOW.as_millis() as u64,
        };
        let (store, id) = (self.store.clone(), event.id.clone());
        tokio::spawn(async move {
            match store.insert_event(event, Some(idempotency)).await {
                Ok(Inserted::New) => {
                    tracing::info!(event_id = %id, kind, "Destination state posted.")
                }
                Ok(Inserted::Duplicate(original)) => {
                    tracing::info!(event_id = %original, kind, "Destination state already posted by another instance.")
                }
                Err(e) => {
                    tracing::error!(kind, error = %e, "Cannot post a destination's state change.")
                }
            }
        });
    }

    /// A FAILED or DISABLED destination holds its deliveries until it is restarted, which
    /// cannot be asked for once it is gone from the config: its state is set ACTIVE again
    /// (the store releases its deliveries), and they are claimed and fail, visibly, as no
    /// longer configured (a retry by hand sends them if it comes back). Which destinations:
    /// on a store only this gateway uses, every one not configured (also those removed while
    /// it was stopped: startup is a reload); on a shared store, only those this reload
    /// removed — another instance may still have the others (a rolling deploy that adds a
    /// destination must not see it restarted by each older instance that starts).
    async fn release_removed(&self, before: &Destinations) {
        let configured = self.destinations.load();
        let shared = !self.orphaned_after.is_zero();
        let removed: Vec<String> = self
            .lock_states()
            .values()
            .filter(|s| s.state != DestinationHealth::Active)
            .filter(|s| !configured.contains_key(&s.name))
            .filter(|s| !shared || before.contains_key(&s.name))
            .map(|s| s.name.clone())
            .collect();
        for name in removed {
            let mut state = active(&name);
            match self
                .store
                .set_destination_state(&state, self.clock.now_ms())
                .await
            {
                Ok(epoch) => {
                    state.epoch = epoch;
                    self.lock_states().insert(name.clone(), state);
                    tracing::warn!(destination = %name,
                        "A FAILED or DISABLED destination is no longer configured: its held deliveries are released, to fail as no longer configured.");
                    self.wake();
                }
                Err(e) => {
                    tracing::error!(destination = %name, error = %e, "Cannot release the deliveries of a removed destination.")
                }
            }
        }
    }

    /// Until when a delivery claimed now is leased: long enough for an attempt to any
    /// destination to end, and `store.lease` more.
    pub fn lease_until(&self, now: u64) -> u64 {
        let timeout = (self.transport.load().timeout.as_millis() as u64)
            .max(self.longest_timeout.load(Ordering::SeqCst));
        now + timeout + self.store_lease.as_millis() as u64
    }

    /// Whether deliveries to `destination` may be sent now (it is ACTIVE).
    pub fn is_active(&self, destination: &str) -> bool {
        self.lock_states()
            .get(destination)
            .is_none_or(|s| s.state == DestinationHealth::Active)
    }

    /// A place in `destination`'s lane for a delivery the pipeline is about to store, if
    /// the lane has room: then the pipeline leases the delivery and sends it with
    /// [`Dispatcher::send_now`]; otherwise the delivery is stored due, for a claim once
    /// the lane has room (so a destination slower than its traffic holds a bounded number
    /// of attempts in memory, and the rest wait in the store).
    pub fn reserve(&self, destination: &str) -> Option<Held> {
        let lane = self.lane(destination);
        let held = Held::enter(&lane);
        (lane.held.load(Ordering::SeqCst) <= self.lane_room()).then_some(held)
    }

    /// Sends deliveries that the caller already holds a lease and a place in their lane on
    /// (the pipeline, for the deliveries it just planned), within the dispatcher's
    /// concurrency.
    pub fn send_now(self: &Arc<Self>, due: Vec<(DueDelivery, Held)>) {
        for (d, held) in due {
            self.spawn_attempt(d, held, None);
        }
    }

    /// How many attempts a lane holds at most before its destination is left out of claims
    /// and the pipeline's sends: as many as may be in flight, and as many again waiting
    /// (each starts within one attempt's timeout, so well within its lease).
    fn lane_room(&self) -> usize {
        2 * self.destination_concurrency.load(Ordering::SeqCst)
    }

    /// Spawns an attempt, which waits for a permit of its destination and then for one of
    /// the dispatcher's (counted in `waiting` meanwhile, if given).
    fn spawn_attempt(self: &Arc<Self>, d: DueDelivery, held: Held, waiting: Option<Waiting>) {
        let this = self.clone();
        self.attempts.spawn(async move {
            let lane = held.lane().clone();
            let for_destination = match lane.permits.get().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    // Waiting in its lane, it leaves the dispatcher's permits to others.
                    let waited = waiting.is_some();
                    drop(waiting);
                    let Ok(permit) = lane.permits.get().acquire_owned().await else {
                        return;
                    };
                    let _waiting = waited.then(|| Waiting::new(&this.waiting));
                    return this.start(d, held, permit, _waiting).await;
                }
            };
            this.start(d, held, for_destination, waiting).await
        });
    }

    /// With its destination's permit: waits for one of the dispatcher's and makes the
    /// attempt; then, if that leaves its lane no longer full, wakes the claim loop for the
    /// deliveries left in the store.
    async fn start(
        self: &Arc<Self>,
        d: DueDelivery,
        held: Held,
        for_destination: OwnedSemaphorePermit,
        waiting: Option<Waiting>,
    ) {
        let Some(permit) = self.dispatcher_permit(held.lane()).await else {
            return;
        };
        drop(waiting);
        let permits = Permits {
            _any: permit,
            _destination: for_destination,
            _sending: Sending::start(held.lane()),
        };
        self.attempt(d, permits).await;
        // The place that leaves the lane half full wakes the loop to claim the next half
        // of a backlog in the store: a claim per `destination_concurrency` deliveries, and
        // all of them waiting no longer than one attempt's time.
        if held.leave() == self.destination_concurrency.load(Ordering::SeqCst) + 1 {
            self.wake();
        }
    }

    /// One of the dispatcher's permits for an attempt to `lane`'s destination: from the
    /// reserve too while the destination has fewer than `light` attempts in flight (looked
    /// at again each time one of them ends).
    async fn dispatcher_permit(&self, lane: &Lane) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.permits.get().try_acquire_owned() {
            return Some(p);
        }
        loop {
            let ended = lane.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let any = self.permits.get().acquire_owned();
            if lane.sending.load(Ordering::SeqCst) < light(self.reserve.size()) {
                return tokio::select! {
                    biased;
                    p = any => p.ok(),
                    p = self.reserve.get().acquire_owned() => p.ok(),
                };
            }
            tokio::select! {
                biased;
                p = any => return p.ok(),
                _ = ended => {}
            }
        }
    }

    /// The dispatcher's permits free now, reserved ones included.
    fn free_permits(&self) -> usize {
        self.permits.get().available_permits() + self.reserve.get().available_permits()
    }

    fn lane(&self, destination: &str) -> Arc<Lane> {
        let mut lanes = (self.lanes.lock()).unwrap_or_else(|e| e.into_inner());
        if let Some(lane) = lanes.get(destination) {
            return lane.clone();
        }
        let lane = Arc::new(Lane {
            permits: Pool::new(self.destination_concurrency.load(Ordering::SeqCst)),
            held: AtomicUsize::new(0),
            sending: AtomicUsize::new(0),
            ended: Notify::new(),
        });
        lanes.insert(destination.to_string(), lane.clone());
        lane
    }

    /// How many more attempts each lane in use can hold.
    fn lanes_room(&self) -> HashMap<String, usize> {
        let room = self.lane_room();
        (self.lanes.lock().unwrap_or_else(|e| e.into_inner()))
            .iter()
            .map(|(name, lane)| {
                let held = lane.held.load(Ordering::SeqCst);
                (name.clone(), room.saturating_sub(held))
            })
            .collect()
    }

    /// Reads the destination states back from the store: on a shared store, other
    /// instances change them too. A stored state replaces this instance's when it is of a
    /// newer epoch (a restart, here or elsewhere) or when another instance found the
    /// destination FAILED or DISABLED; otherwise this instance keeps its own count of
    /// consecutive failures (its writes may not have been stored yet when this was read).
    pub async fn refresh_states(&self) -> Result<(), StoreError> {
        let stored = self.store.destination_states().await?;
        let mut states = self.lock_states();
        for s in stored {
            let newer = states.get(&s.name).is_none_or(|mine| {
                s.epoch > mine.epoch
                    || (s.epoch == mine.epoch
                        && mine.state == DestinationHealth::Active
                        && s.state != DestinationHealth::Active)
            });
            if newer {
                states.insert(s.name.clone(), s);
            }
        }
        Ok(())
    }

    /// Which deliveries this dispatcher claims: all, on a store only it uses; on a shared
    /// one, those to its destinations, and those to others once orphaned; of each
    /// destination, as many as its lane has room for.
    fn claim_scope(&self) -> ClaimScope {
        let room = self.lanes_room();
        if self.orphaned_after.is_zero() {
            return ClaimScope {
                room,
                ..ClaimScope::any()
            };
        }
        ClaimScope {
            known: Some(Known::clone(&self.known.load())),
            orphaned_after_ms: self.orphaned_after.as_millis() as u64,
            room,
        }
    }

    /// Tells the dispatcher to look for due deliveries now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The state of a destination (ACTIVE if nothing was ever recorded).
    pub fn state(&self, name: &str) -> DestinationState {
        self.lock_states()
            .get(name)
            .cloned()
            .unwrap_or_else(|| active(name))
    }

    fn lock_states(&self) -> std::sync::MutexGuard<'_, HashMap<String, DestinationState>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends due deliveries until `stop` is cancelled; then, for a short grace period
    /// (`SHUTDOWN_GRACE`), sends what is due and retries that fall due, waits for the
    /// attempts under way, and returns. Later retries, and a backlog the grace period did
    /// not reach, stay in the store.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut drain_until: Option<u64> = None;
        loop {
            let free = (self.free_permits()).saturating_sub(self.waiting.load(Ordering::SeqCst));
            let mut more = false;
            // Out of permits: more may be due, and a finished attempt wakes the loop.
            self.starved.store(free == 0, Ordering::Relaxed);
            if stop.is_cancelled() && drain_until.is_none() {
                drain_until = Some(self.clock.now_ms() + SHUTDOWN_GRACE.as_millis() as u64);
            }
            // Stopping, nothing is claimed after the grace period (a slow destination's
            // backlog stays in the store for the next start).
            let draining = drain_until.is_none_or(|until| self.clock.now_ms() <= until);
            if free > 0 && draining {
                let now = self.clock.now_ms();
                let lease_until = self.lease_until(now);
                // Each destination takes at most its lane's room (see `claim_scope`); one
                // whose lane this instance has not used yet, at most a lane's room too.
                let limit = free.min(256).min(self.lane_room());
                let scope = self.claim_scope();
                match self.store.claim_due(now, lease_until, limit, &scope).await {
                    Ok(due) => {
                        // It took all it could: more may be due.
                        more = due.len() == limit;
                        for d in due {
                            let held = Held::enter(&self.lane(&d.destination));
                            self.spawn_attempt(d, held, Some(Waiting::new(&self.waiting)));
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "Cannot claim due deliveries."),
                }
            }
            if more {
                continue;
            }
            if stop.is_cancelled() {
                if !self.attempts.is_empty() {
                    self.attempts.close();
                    self.attempts.wait().await;
                    self.attempts.reopen();
                    continue;
                }
                // Retries that fall due within the grace period are still sent, so that a
                // transient failure just before shutdown does not wait for the next start.
                let now = self.clock.now_ms();
                let until = *drain_until.get_or_insert(now + SHUTDOWN_GRACE.as_millis() as u64);
                match self.store.next_due_at(now, &self.claim_scope()).await {
                    Ok(Some(at)) if at <= until && now <= until => {
                        let wait = Duration::from_millis(at.saturating_sub(now)).min(IDLE_POLL);
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    _ => break,
                }
            }
            let wait = if free == 0 {
                // Out of permits: an attempt that ends wakes the loop.
                IDLE_POLL
            } else {
                match (self.store)
                    .next_due_at(self.clock.now_ms(), &self.claim_scope())
                    .await
                {
                    Ok(Some(at)) => {
                        Duration::from_millis(at.saturating_sub(self.clock.now_ms())).min(IDLE_POLL)
                    }
                    _ => IDLE_POLL,
                }
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => {}
            }
        }
        // Every attempt has ended: store the last state changes.
        let writer = self
            .state_writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((handle, stop)) = writer {
            stop.cancel();
            let _ = handle.await;
        }
    }

    #[tracing::instrument(name = "delivery", skip_all, fields(event_id = %d.event_id,
        delivery_id = %d.id, destination = %d.destination, attempt = d.attempts + 1))]
    async fn attempt(&self, d: DueDelivery, permits: Permits) {
        if let Some(made) = self.take_unrecorded(&d) {
            return self.record_unrecorded(&d, made).await;
        }
        let at = self.clock.now_ms();
        let destination = self.destinations.load().get(&d.destination).cloned();
        let timeout = (destination.as_ref().and_then(|dest| dest.timeout))
            .unwrap_or_else(|| self.transport.load().timeout);
        if at + timeout.as_millis() as u64 > d.lease_until {
            // It waited for a permit for most of its lease (behind a destination that is
            // slow to answer): sent now, it might still be on its way when another claim
            // takes it. Left to that claim instead, once the lease runs out.
            tracing::warn!(event_id = %d.event_id, delivery_id = %d.id,
                destination = %d.destination, "Delivery left to a later claim: its lease ran down while it waited.");
            return;
        }
        // An event older than the destination's `max_event_age` is not sent: not now, nor
        // held for later.
        let expired = (destination.as_ref())
            .and_then(|dest| dest.retry.max_event_age)
            .filter(|age| at.saturating_sub(d.received_at) > ms(*age));
        if expired.is_none() && destination.is_some() && !self.is_active(&d.destination) {
            // Its destination failed (or was disabled) since this delivery was planned or
            // claimed — e.g. while it waited for a permit behind others to a destination
            // that hangs: it is held with the destination's other deliveries, not sent.
            return self.put_back(&d, at).await;
        }
        if let Some(rate) = destination.as_ref().and_then(|dest| dest.rate_limit)
            && !d.paced
            && expired.is_none()
        {
            let limit = Limit::Destination(&d.destination);
            match self.store.take_slot(limit, at, rate).await {
                Ok(slot) if slot > at => return self.defer(&d, slot).await,
                Ok(_) => {}
                // Not sent unpaced: the lease runs out and it is claimed, and paced, again.
                Err(e) => {
                    tracing::error!(delivery_id = %d.id, error = %e,
                        "Cannot take a slot under the destination's rate limit.");
                    return;
                }
            }
        }
        let (attempt, next) = match (destination, expired) {
            (Some(_), Some(age)) => self.expired(&d, at, age),
            (Some(dest), None) => self.send_to(&dest, &d, at).await,
            (None, _) => self.not_sent(&d, at),
        };
        let recorded = (self.store)
            .record_attempt(&d.id, d.attempts, attempt.clone(), next)
            .await;
        if let Err(e) = recorded {
            drop(permits);
            self.record_again(&d, attempt, next, e).await;
        }
        // A permit is free again: that matters only if the last claim left due deliveries
        // behind for want of permits. A retry is a new due time to wait for.
        if self.starved.load(Ordering::Relaxed) || matches!(next, AttemptNext::RetryAt(_)) {
            self.wake();
        }
    }

    /// After an attempt whose record failed (the database did not answer): tries again a
    /// few times, 1 s, 2 s and 4 s later, so that a short outage does not have the
    /// delivery sent again when its lease runs out. An earlier try that was recorded after
    /// all (only its answer lost) is not counted twice (`Store::record_attempt`). If every
    /// try fails, the attempt is kept (`unrecorded`) and recorded when the lease has run
    /// out and the delivery is claimed again here, instead of being sent again; never lost.
    async fn record_again(
        &self,
        d: &DueDelivery,
        attempt: Attempt,
        next: AttemptNext,
        mut error: StoreError,
    ) {
        for wait in [1, 2, 4].map(Duration::from_secs) {
            tracing::warn!(delivery_id = %d.id, error = %error, retry_in = ?wait,
                "Cannot record a delivery attempt; trying again.");
            tokio::time::sleep(wait).await;
            match (self.store)
                .record_attempt(&d.id, d.attempts, attempt.clone(), next)
                .await
            {
                Ok(_) => return,
                Err(e) => error = e,
            }
        }
        let mut unrecorded = self.unrecorded.lock().unwrap_or_else(|e| e.into_inner());
        if unrecorded.len() >= UNRECORDED_MAX {
            unrecorded.retain(|_, made| made.kept.elapsed() < UNRECORDED_KEPT);
        }
        if unrecorded.len() < UNRECORDED_MAX {
            let made = Unrecorded {
                attempts: d.attempts,
                kept: std::time::Instant::now(),
                attempt,
                next,
            };
            unrecorded.insert(d.id.clone(), made);
            tracing::error!(delivery_id = %d.id, error = %error,
                "Cannot record a delivery attempt; it is recorded, not sent again, when the delivery is claimed again.");
        } else {
            tracing::error!(delivery_id = %d.id, error = %error,
                "Cannot record a delivery attempt; it will be sent again when its lease runs out.");
        }
    }

    /// The attempt made for this claim of `d` whose record failed, if any (a later attempt
    /// recorded meanwhile by another instance makes it stale: dropped).
    fn take_unrecorded(&self, d: &DueDelivery) -> Option<Unrecorded> {
        let mut unrecorded = self.unrecorded.lock().unwrap_or_else(|e| e.into_inner());
        let made = unrecorded.remove(&d.id)?;
        (made.attempts == d.attempts).then_some(made)
    }

    /// Records an attempt made before its record failed (see `unrecorded`), now that its
    /// delivery is claimed again; kept for the next claim if the store still fails.
    async fn record_unrecorded(&self, d: &DueDelivery, made: Unrecorded) {
        let recorded = (self.store)
            .record_attempt(&d.id, d.attempts, made.attempt.clone(), made.next)
            .await;
        match recorded {
            Ok(_) => {
                tracing::info!(delivery_id = %d.id,
                    "An attempt made while the store could not write is recorded; not sent again.");
                // As after an attempt: a permit is free again, a retry is a due time.
                if self.starved.load(Ordering::Relaxed)
                    || matches!(made.next, AttemptNext::RetryAt(_))
                {
                    self.wake();
                }
            }
            Err(e) => {
                tracing::warn!(delivery_id = %d.id, error = %e,
                    "Cannot record a delivery attempt yet; trying again at the next claim.");
                let mut unrecorded = self.unrecorded.lock().unwrap_or_else(|e| e.into_inner());
                unrecorded.insert(d.id.clone(), made);
            }
        }
    }

    /// Gives a claimed delivery back unsent: held while its destination is not ACTIVE in
    /// the store (a restart sends it), else due again now (once the destination's new
    /// state is stored, a moment later, it is held).
    async fn put_back(&self, d: &DueDelivery, now: u64) {
        match self.store.retry_delivery(&d.id, now).await {
            Ok(_) => tracing::debug!(event_id = %d.event_id, delivery_id = %d.id,
                destination = %d.destination, "Delivery held: its destination is not ACTIVE."),
            // The lease runs out; the claim skips it while the destination is not ACTIVE.
            Err(e) => {
                tracing::error!(delivery_id = %d.id, error = %e, "Cannot hold a delivery.")
            }
        }
    }

    /// Puts a delivery over its destination's rate limit off until its slot, in the store:
    /// it is claimed again then (and sent at once, its slot being kept).
    async fn defer(&self, d: &DueDelivery, slot: u64) {
        self.metrics.deferred(&d.destination);
        match self.store.defer_delivery(&d.id, slot).await {
            Ok(_) => tracing::debug!(event_id = %d.event_id, delivery_id = %d.id,
                destination = %d.destination, until = slot, "Delivery put off by the rate limit."),
            // The lease runs out and the delivery is claimed, and paced, again.
            Err(e) => {
                tracing::error!(delivery_id = %d.id, error = %e, "Cannot put a delivery off.")
            }
        }
        // The loop may be asleep until a later due time than this slot.
        self.wake();
    }

    /// A delivery whose destination was removed since it was planned (from the file or
    /// through the API): its URL may no longer be trusted with the event, so nothing is
    /// sent. It fails, visibly, and can be retried by hand once the destination is back.
    fn not_sent(&self, d: &DueDelivery, at: u64) -> (Attempt, AttemptNext) {
        tracing::warn!(event_id = %d.event_id, delivery_id = %d.id, destination = %d.destination,
            "Delivery failed: its destination is no longer configured.");
        self.metrics.delivery(&d.destination, "failed");
        unsent(
            at,
            format!(
                "destination `{}` is no longer configured; not sent",
                d.destination
            ),
        )
    }

    /// A delivery whose event is older than its destination's `max_event_age` (`age`):
    /// nothing is sent, and it fails — visibly, counted as `expired`, the destination's
    /// state untouched (the receiver did nothing wrong).
    fn expired(&self, d: &DueDelivery, at: u64, age: Duration) -> (Attempt, AttemptNext) {
        tracing::info!(event_id = %d.event_id, delivery_id = %d.id, destination = %d.destination,
            "Delivery expired: its event is older than the destination's max_event_age.");
        self.metrics.delivery(&d.destination, "expired");
        let ago = Duration::from_secs(at.saturating_sub(d.received_at) / 1000);
        unsent(
            at,
            format!(
                "expired: the event was received {} ago, more than `max_event_age` ({}); not sent",
                humantime::format_duration(ago),
                humantime::format_duration(age)
            ),
        )
    }

    /// Sends one attempt and decides what follows it, updating the destination's state
    /// and the metrics.
    async fn send_to(
        &self,
        dest: &Destination,
        d: &DueDelivery,
        at: u64,
    ) -> (Attempt, AttemptNext) {
        let headers = signed_headers(dest, d, at);
        let (status, retry_after, response, error, duration_ms) =
            self.send_as(dest, &d.url, headers, d.body.clone()).await;
        let result = AttemptResult::from_status(status, retry_after);
        let next = {
            let mut states = self.lock_states();
            let before = states
                .get(&d.destination)
                .cloned()
                .unwrap_or_else(|| active(&d.destination));
            let was = before.state;
            let before_copy = before.clone();
            let (next, after) = decide(
                &dest.retry,
                result,
                d.attempts + 1,
                at,
                rand::random(),
                before,
                error.clone(),
            );
            if after.state != was {
                tracing::warn!(destination = %d.destination, state = ?after.state,
                    consecutive_failures = after.consecutive_failures, "Destination state changed.");
                self.notify(&after);
            }
            if after != before_copy {
                // Sent under the lock, so the writer stores changes in the order they
                // were decided (two attempts' commits could land the other way round).
                let _ = self.state_changes.send(after.clone());
            }
            states.insert(d.destination.clone(), after);
            next
        };
        match next {
            // Not `info`: the delivery log and the metrics count successes; a line each
            // at thousands a second costs CPU and buries what needs a look.
            AttemptNext::Delivered => tracing::debug!(event_id = %d.event_id, delivery_id = %d.id,
                destination = %d.destination, status, "Delivered."),
            _ => {
                tracing::warn!(event_id = %d.event_id, delivery_id = %d.id, destination = %d.destination,
                status, error = error.as_deref().unwrap_or(""), next = ?next, "Delivery attempt failed.")
            }
        }
        let settled = match next {
            AttemptNext::Delivered => Some("delivered"),
            AttemptNext::Failed => Some("failed"),
            _ => None,
        };
        self.metrics
            .attempt(&d.destination, result == AttemptResult::Success, settled);
        // (0: the event is gone, which retention does not do while a delivery is pending.)
        if next == AttemptNext::Delivered && d.received_at > 0 {
            let now = self.clock.now_ms();
            let seconds = now.saturating_sub(d.received_at) as f64 / 1000.0;
            (self.metrics).delivered_after(&d.destination, seconds, now);
        }
        let attempt = Attempt {
            at,
            duration_ms,
            status_code: status,
            error,
            response,
        };
        (attempt, next)
    }

    /// Sends one attempt to `dest` (see [`Dispatcher::send`]) with its method, and an OAuth
    /// 2.0 token when it has `oauth2`. A `401` to a token kept from before is tried once
    /// more with a new token (it may have been revoked, or expired early). The whole
    /// attempt — waiting for a token (another attempt's fetch, or its own), the request,
    /// and after such a `401` one more of each — takes at most the destination's timeout,
    /// which every claim's lease covers.
    async fn send_as(
        &self,
        dest: &Destination,
        url: &str,
        mut headers: Vec<(String, String)>,
        body: bytes::Bytes,
    ) -> Answer {
        let method = dest.config.method.as_http();
        let Some(oauth) = &dest.oauth2 else {
            return self.send(method, url, &headers, body, dest.timeout).await;
        };
        let started = Instant::now();
        let deadline = started + dest.timeout.unwrap_or(self.transport.load().timeout);
        let mut again = true;
        loop {
            let left = || deadline.saturating_duration_since(Instant::now());
            let fetch = async |config: &_| self.fetch_token(&dest.name, config, left()).await;
            let token = oauth.token(left(), fetch).await;
            let (token, fresh) = match token {
                Ok(token) => token,
                Err(why) => {
                    tracing::warn!(destination = %dest.name, error = %why, "No OAuth 2.0 token.");
                    let error = format!("no OAuth 2.0 token: {why}");
                    return (None, None, None, Some(error), ms(started.elapsed()));
                }
            };
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
            headers.push(("authorization".into(), format!("Bearer {token}")));
            let mut answer =
                (self.send(method.clone(), url, &headers, body.clone(), Some(left()))).await;
            answer.4 = ms(started.elapsed());
            if answer.0 == Some(401) {
                oauth.rejected(&token).await;
                if !fresh && std::mem::take(&mut again) && !left().is_zero() {
                    continue;
                }
            }
            return answer;
        }
    }

    /// A token for `destination` from `config`'s endpoint, through the deliveries' client
    /// and address check; counted (`switchyard_oauth2_token_requests_total`).
    async fn fetch_token(
        &self,
        destination: &str,
        config: &crate::config::OAuth2Config,
        timeout: Duration,
    ) -> Result<super::oauth2::Fetched, String> {
        let transport = self.transport.load_full();
        let fetched = async {
            let url = reqwest::Url::parse(&config.token_url)
                .map_err(|e| format!("`{}` is not a URL: {e}", config.token_url))?;
            (transport.guard.check_destination(&url).await)
                .map_err(|refused| format!("the token endpoint: {refused}"))?;
            super::oauth2::request(&transport.client, url, config, timeout).await
        }
        .await;
        self.metrics.oauth2_token(destination, fetched.is_ok());
        fetched
    }

    /// Sends one request, within `timeout` if given (else `delivery.timeout`).
    async fn send(
        &self,
        method: http::Method,
        url: &str,
        headers: &[(String, String)],
        body: bytes::Bytes,
        timeout: Option<Duration>,
    ) -> Answer {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                map.append(k, v);
            }
        }
        let started = Instant::now();
        let transport = self.transport.load_full();
        // Parsed once, for the guard and the request.
        let request = match reqwest::Url::parse(url) {
            Ok(parsed) => {
                if let Err(refused) = transport.guard.check_destination(&parsed).await {
                    return (None, None, None, Some(refused), 0);
                }
                transport.client.request(method, parsed)
            }
            // The request itself reports the bad URL.
            Err(_) => transport.client.request(method, url),
        };
        let request = match timeout {
            Some(t) => request.timeout(t),
            None => request,
        };
        let result = request.headers(map).body(body).send().await;
        let outcome = match result {
            Ok(mut resp) => {
                let code = resp.status();
                let retry_after = parse_retry_after(
                    resp.headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()),
                    self.clock.now_ms(),
                );
                let mut excerpt = Vec::new();
                while excerpt.len() < RESPONSE_EXCERPT {
                    match resp.chunk().await {
                        Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
                excerpt.truncate(RESPONSE_EXCERPT);
                let response = (!excerpt.is_empty()).then(|| response_text(&excerpt));
                let error = (!code.is_success()).then(|| format!("destination answered {code}"));
                (Some(code.as_u16()), retry_after, response, error)
            }
            Err(e) => (None, None, None, Some(describe(&e))),
        };
        (
            outcome.0,
            outcome.1,
            outcome.2,
            outcome.3,
            started.elapsed().as_millis() as u64,
        )
    }

    /// Sends a test message to a destination (placeholders resolve to `none`, signed like a
    /// delivery when the destination signs) and reports how it answered.
    pub async fn send_test(&self, name: &str) -> Result<TestOutcome, RestartError> {
        let dest = self
            .destinations
            .load()
            .get(name)
            .cloned()
            .ok_or_else(|| RestartError::NotFound(name.to_string()))?;
        let url = placeholder::render(&dest.url, Target::Url, |_| None);
        let mut headers: Vec<(String, String)> = dest
            .headers
            .iter()
            .map(|(k, t)| {
                (
                    k.to_string(),
                    placeholder::render(t, Target::Header, |_| None),
                )
            })
            .collect();
        let id = format!("test_{}", uuid::Uuid::now_v7());
        headers.push(("content-type".into(), "application/json".into()));
        headers.push(("webhook-id".into(), id.clone()));
        let body = serde_json::json!({
            "type": "switchyard.test",
            "id": id,
            "destination": name,
            "time_ms": self.clock.now_ms(),
        });
        let body: bytes::Bytes = body.to_string().into();
        sign_into(
            &mut headers,
            dest.signature(&id, self.clock.now_ms(), &body),
        );
        let (status_code, _, _, error, _) = self.send_as(&dest, &url, headers, body).await;
        let error = match (status_code, error) {
            (None, None) => Some("no answer".into()),
            (_, e) => e,
        };
        self.metrics.destination_test(name, error.is_none());
        Ok(TestOutcome {
            ok: error.is_none(),
            status_code,
            error,
        })
    }

    /// Pauses a destination by hand (a receiver's maintenance window): DISABLED, as a `410`
    /// makes it, so its deliveries are held — events are still taken in, routed and kept —
    /// and no retry is spent on it, until a restart. Attempts already on their way finish;
    /// those not yet sent are held.
    pub async fn pause(&self, name: &str) -> Result<DestinationState, RestartError> {
        if !self.destinations.load().contains_key(name) {
            return Err(RestartError::NotFound(name.to_string()));
        }
        let state = self
            .set_by_hand(DestinationState {
                state: DestinationHealth::Disabled,
                last_error: Some(PAUSED.into()),
                ..active(name)
            })
            .await?;
        tracing::info!(destination = name, "Destination paused.");
        Ok(state)
    }

    /// Restarts a FAILED or DISABLED destination: sends it a test message first, and if that
    /// succeeds marks it ACTIVE and makes its queued deliveries due now.
    pub async fn restart(&self, name: &str) -> Result<DestinationState, RestartError> {
        if let Some(e) = self.send_test(name).await?.error {
            return Err(RestartError::TestFailed(e));
        }
        // Every pending delivery is due now, paced afresh (the store started its limit over).
        let state = self.set_by_hand(active(name)).await?;
        tracing::info!(destination = name, "Destination restarted.");
        self.wake();
        Ok(state)
    }

    /// Restarts FAILED destinations by themselves where their retry policy has
    /// `restart_after`, until `stop`: each is sent a test message that long after it
    /// became FAILED (`DestinationState::since`), and again every that long while the test
    /// fails; the first that passes makes it ACTIVE and its held deliveries due, as
    /// `restart` does. Gateways
    /// sharing a store test each destination once an interval between them (a
    /// [`Limit::Restart`] slot). A destination paused, restarted or removed meanwhile is
    /// left as it is.
    pub async fn restart_failed(self: Arc<Self>, stop: CancellationToken) {
        // The tests on their way, each a task of its own (a receiver that hangs holds its
        // test for the attempt timeout, not the others'), by destination; dropped (cut
        // short) at `stop`.
        let mut testing = tokio::task::JoinSet::new();
        let mut names: HashMap<tokio::task::Id, String> = HashMap::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RESTART_TICK) => {}
                _ = stop.cancelled() => return,
            }
            while let Some(done) = testing.try_join_next_with_id() {
                names.remove(&done.map_or_else(|e| e.id(), |(id, ())| id));
            }
            let now = self.clock.now_ms();
            let destinations = self.destinations.load_full();
            let failed: Vec<(String, i64, u64, Duration)> = (self.lock_states().values())
                .filter(|s| s.state == DestinationHealth::Failed)
                .filter_map(|s| {
                    let after = destinations.get(&s.name)?.retry.restart_after?;
                    Some((s.name.clone(), s.epoch, s.since, after))
                })
                .collect();
            let mut next = self.lock_next_tests().clone();
            next.retain(|name, _| failed.iter().any(|(n, ..)| n == name));
            for (name, epoch, since, after) in failed {
                // The first test comes that long after it became FAILED (as stored: a
                // gateway started meanwhile does not start the wait over), or now if
                // that is past.
                let at = *next
                    .entry(name.clone())
                    .or_insert((since + ms(after)).max(now));
                if now < at || names.values().any(|n| *n == name) {
                    continue;
                }
                let rate = 1000.0 / ms(after) as f64;
                match self.store.take_slot(Limit::Restart(&name), now, rate).await {
                    Ok(slot) if slot == now => {
                        next.insert(name.clone(), now + ms(after));
                        let this = self.clone();
                        let task = testing.spawn({
                            let name = name.clone();
                            async move { this.try_restart(&name, epoch, after).await }
                        });
                        names.insert(task.id(), name);
                    }
                    // Another instance's turn: the next is then.
                    Ok(slot) => {
                        next.insert(name, slot);
                    }
                    Err(e) => tracing::warn!(destination = name, error = %e,
                        "Cannot take a FAILED destination's turn for a test message; trying at the next."),
                }
            }
            *self.lock_next_tests() = next;
        }
    }

    /// When this instance next sends each FAILED destination with `restart_after` a test
    /// message (ms), by name ([`Dispatcher::restart_failed`]).
    pub fn next_test_at(&self, destination: &str) -> Option<u64> {
        self.lock_next_tests().get(destination).copied()
    }

    fn lock_next_tests(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.next_tests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One test message of a FAILED destination (of state `epoch`): ACTIVE again if it
    /// passes and the destination is still FAILED in that epoch.
    async fn try_restart(&self, name: &str, epoch: i64, after: Duration) {
        let error = match self.send_test(name).await {
            Ok(outcome) => outcome.error,
            Err(e) => Some(e.to_string()),
        };
        if let Some(error) = error {
            tracing::info!(destination = name, error, next_in = %humantime::format_duration(after),
                "A FAILED destination's test message failed: it stays FAILED.");
            return;
        }
        // Paused, restarted or failed anew elsewhere while the test went: leave it.
        if let Err(e) = self.refresh_states().await {
            tracing::warn!(destination = name, error = %e,
                "Cannot read the destination states after a test message; trying at the next.");
            return;
        }
        let now = self.state(name);
        if now.state != DestinationHealth::Failed || now.epoch != epoch {
            return;
        }
        match self.set_by_hand(active(name)).await {
            Ok(_) => {
                tracing::info!(
                    destination = name,
                    "A FAILED destination passed its test message: ACTIVE again, its held deliveries are due."
                );
                self.wake();
            }
            Err(e) => tracing::warn!(destination = name, error = %e,
                "Cannot store a restarted destination's state; trying at the next test."),
        }
    }

    /// Stores a state set by hand (a restart, a pause) in a new epoch, so that no state
    /// decided before it overwrites it; takes it here at once, and posts it to
    /// `notify_source` if it changed (a destination with no state yet is ACTIVE).
    async fn set_by_hand(
        &self,
        mut state: DestinationState,
    ) -> Result<DestinationState, RestartError> {
        state.since = self.clock.now_ms();
        state.epoch = self
            .store
            .set_destination_state(&state, state.since)
            .await?;
        let was = self.lock_states().insert(state.name.clone(), state.clone());
        if was.map_or(DestinationHealth::Active, |w| w.state) != state.state {
            self.notify(&state);
        }
        Ok(state)
    }
}

/// The `last_error` of a destination paused by hand.
const PAUSED: &str = "paused through the API: restart it to resume";

/// How a destination answered one request: status, Retry-After, response excerpt, error,
/// duration in ms.
type Answer = (
    Option<u16>,
    Option<Duration>,
    Option<String>,
    Option<String>,
    u64,
);

/// An attempt that sent nothing, failing its delivery for `error`.
fn unsent(at: u64, error: String) -> (Attempt, AttemptNext) {
    let attempt = Attempt {
        at,
        duration_ms: 0,
        status_code: None,
        error: Some(error),
        response: None,
    };
    (attempt, AttemptNext::Failed)
}

/// A duration in whole milliseconds.
fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The stored headers, plus a fresh timestamp and signature when the destination signs
/// (each attempt is signed anew; the `webhook-id` stays), in place of any of the same names.
fn signed_headers(dest: &Destination, d: &DueDelivery, now_ms: u64) -> Vec<(String, String)> {
    let mut headers = d.headers.clone();
    sign_into(&mut headers, dest.signature(&d.id, now_ms, &d.body));
    headers
}

/// Adds a signature's headers in place of any of the same names.
fn sign_into(headers: &mut Vec<(String, String)>, signature: Vec<(String, String)>) {
    if !signature.is_empty() {
        let signs = |k: &String| signature.iter().any(|(s, _)| s.eq_ignore_ascii_case(k));
        headers.retain(|(k, _)| !signs(k));
        headers.extend(signature);
    }
}

/// Below how many attempts in flight a destination may take the reserve's permits
/// (`delivery.reserved_concurrency`): an eighth of the reserve.
fn light(reserved: usize) -> usize {
    (reserved / 8).max(1)
}

/// A semaphore of a size a reload may change. Growing adds permits at once; shrinking
/// forgets the free ones and, for the rest, queues a task that takes the excess as
/// attempts give their permits back and forgets them (the semaphore is fair, so no new
/// attempt gets one before it is done). Sizes applied in any order add up to the last one.
struct Pool {
    semaphore: Arc<Semaphore>,
    size: AtomicUsize,
}

impl Pool {
    fn new(size: usize) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(size)),
            size: AtomicUsize::new(size),
        }
    }

    fn get(&self) -> Arc<Semaphore> {
        self.semaphore.clone()
    }

    fn size(&self) -> usize {
        self.size.load(Ordering::SeqCst)
    }

    fn resize(&self, to: usize) {
        let from = self.size.swap(to, Ordering::SeqCst);
        if to > from {
            self.semaphore.add_permits(to - from);
            return;
        }
        let excess = from - to;
        let owed = excess - self.semaphore.forget_permits(excess);
        if owed > 0 {
            let semaphore = self.semaphore.clone();
            tokio::spawn(async move {
                // `u32`: semaphores here hold far fewer (`delivery.concurrency` is a count
                // of attempts in flight).
                if let Ok(taken) = semaphore.acquire_many_owned(owed as u32).await {
                    taken.forget();
                }
            });
        }
    }
}

/// The two permits an attempt holds: one of the dispatcher's, one of its destination's;
/// and its place among its destination's attempts in flight.
struct Permits {
    _any: OwnedSemaphorePermit,
    _destination: OwnedSemaphorePermit,
    _sending: Sending,
}

/// An attempt in flight, counted in its lane until dropped.
struct Sending(Arc<Lane>);

impl Sending {
    fn start(lane: &Arc<Lane>) -> Self {
        lane.sending.fetch_add(1, Ordering::SeqCst);
        Self(lane.clone())
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.sending.fetch_sub(1, Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

/// A destination's lane: see `Dispatcher::lanes`.
struct Lane {
    permits: Pool,
    /// Attempts spawned (or reserved by the pipeline) and not yet ended.
    held: AtomicUsize,
    /// Attempts in flight (with both permits), and a signal each time one ends.
    sending: AtomicUsize,
    ended: Notify,
}

/// A place in a lane, given back when dropped.
pub struct Held(Option<Arc<Lane>>);

impl Held {
    fn enter(lane: &Arc<Lane>) -> Self {
        lane.held.fetch_add(1, Ordering::SeqCst);
        Self(Some(lane.clone()))
    }

    fn lane(&self) -> &Arc<Lane> {
        self.0
            .as_ref()
            .expect("a place is in its lane until it leaves")
    }

    /// Gives the place back; returns how many the lane held with it.
    fn leave(mut self) -> usize {
        (self.0.take()).map_or(0, |lane| lane.held.fetch_sub(1, Ordering::SeqCst))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(lane) = self.0.take() {
            lane.held.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Counts an attempt in `Dispatcher::waiting` for as long as it lives.
struct Waiting(Arc<std::sync::atomic::AtomicUsize>);

impl Waiting {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Stores the destination states that attempts changed, one at a time in the order they
/// were decided (of a burst, only each destination's last), until `stop`; then what is left.
async fn write_states(
    store: Arc<dyn Store>,
    mut changes: mpsc::UnboundedReceiver<DestinationState>,
    stop: CancellationToken,
) {
    loop {
        let mut burst = Vec::new();
        let stopping = tokio::select! {
            got = changes.recv_many(&mut burst, 256) => got == 0,
            _ = stop.cancelled() => true,
        };
        while let Ok(s) = changes.try_recv() {
            burst.push(s);
        }
        let mut latest: Vec<DestinationState> = Vec::new();
        for s in burst {
            latest.retain(|l| l.name != s.name);
            latest.push(s);
        }
        for s in latest {
            if let Err(e) = store.record_destination_state(&s).await {
                tracing::error!(destination = %s.name, error = %e, "Cannot record a destination's state.");
            }
        }
        if stopping {
            return;
        }
    }
}

fn active(name: &str) -> DestinationState {
    DestinationState {
        name: name.to_string(),
        state: DestinationHealth::Active,
        consecutive_failures: 0,
        last_error: None,
        epoch: 0,
        since: 0,
    }
}

pub(super) fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        format!("could not connect: {}", root_cause(e))
    } else {
        format!("request failed: {}", root_cause(e))
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lets the task a shrink queued take what it is owed.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_pool_grows_at_once_and_shrinks_as_permits_come_back() {
        let pool = Pool::new(4);
        let mut held: Vec<_> = (0..3)
            .map(|_| pool.get().try_acquire_owned().unwrap())
            .collect();

        // To 2 with 3 in use: the free one goes at once; one more is owed.
        pool.resize(2);
        settle().await;
        assert_eq!(pool.get().available_permits(), 0);
        held.pop();
        settle().await;
        assert_eq!(
            pool.get().available_permits(),
            0,
            "the first one back pays the debt"
        );
        held.pop();
        settle().await;
        assert_eq!(
            pool.get().available_permits(),
            1,
            "then 1 in use and 1 free: 2"
        );

        // Growing while in use, and shrinking again below what is free.
        pool.resize(5);
        assert_eq!(pool.get().available_permits(), 4);
        pool.resize(1);
        settle().await;
        assert_eq!(pool.get().available_permits(), 0);
        held.pop();
        settle().await;
        assert_eq!((pool.get().available_permits(), pool.size()), (1, 1));
    }

    #[tokio::test]
    async fn sizes_applied_before_the_debt_is_paid_add_up_to_the_last() {
        let pool = Pool::new(4);
        let held: Vec<_> = (0..4)
            .map(|_| pool.get().try_acquire_owned().unwrap())
            .collect();
        pool.resize(1); // 3 owed
        settle().await;
        pool.resize(3); // 2 added, taken by the debt
        settle().await;
        assert_eq!(pool.get().available_permits(), 0);
        drop(held);
        settle().await;
        assert_eq!((pool.get().available_permits(), pool.size()), (3, 3));
    }
}
