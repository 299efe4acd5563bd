//! What plugins may reach over HTTP (the WIT `http` interface, 0.1.3): the origins a route
//! grants each of its plugins (`allow_http`), the limits one call's requests meet, and the
//! sending, which goes through the deliveries' transport (`delivery::Transport`: its proxy,
//! its trusted authorities, its address guard, no redirects) so that one network policy
//! covers everything the gateway sends.
//!
//! While a plugin waits for a response its chain gives up its turn on the CPU (`Turn`):
//! a slow service holds a pipeline worker, not one of the few permits plugin code runs
//! under.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::delivery::Clock;
use crate::metrics::Metrics;
use crate::pace::Limit;
use crate::store::Store;

/// How many requests one call may send; one more traps the call.
pub const REQUESTS_CAP: usize = 20;

/// The methods a plugin may send.
const METHODS: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];
/// The methods a dry run sends (the others change something elsewhere).
const DRY_RUN_METHODS: [&str; 2] = ["GET", "HEAD"];
/// Request headers that are the transport's to set.
const TRANSPORT_HEADERS: [&str; 4] = ["host", "content-length", "transfer-encoding", "connection"];

/// How long one call's requests may take together, how large a response may be, how many
/// requests may be in flight at once to one granted origin, and how many a second may go
/// to the origins that have a rate limit (`[plugins]`'s `http_timeout`,
/// `http_max_response_bytes`, `http_concurrency` and `http_rate_limit`).
#[derive(Clone, Debug, PartialEq)]
pub struct HttpLimits {
    pub timeout: Duration,
    pub max_response_bytes: usize,
    pub concurrency: usize,
    /// Requests a second to an origin (`https://*.example.com`: to each of its subdomains
    /// with no limit of their own, together).
    pub rates: Arc<[(Origin, f64)]>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            max_response_bytes: 1 << 20,
            concurrency: 32,
            rates: Arc::new([]),
        }
    }
}

impl From<&crate::config::PluginsConfig> for HttpLimits {
    fn from(p: &crate::config::PluginsConfig) -> Self {
        Self {
            timeout: p.http_timeout,
            max_response_bytes: p.http_max_response_bytes,
            concurrency: p.http_concurrency,
            // (Validated with the config.)
            rates: (p.http_rate_limit.iter())
                .filter_map(|(o, rate)| Some((Origin::parse(o).ok()?, *rate)))
                .collect(),
        }
    }
}

impl HttpLimits {
    /// The rate limit a request to `url` is under, if any, with the origin it is kept by:
    /// its own origin's, else the one of the closest `*.` domain that has one — whichever
    /// `allow_http` entry let the request through.
    fn rate_for(&self, url: &url::Url) -> Option<(&Origin, f64)> {
        (self.rates.iter())
            .filter(|(o, _)| o.allows(url))
            .max_by_key(|(o, _)| (!o.wildcard, o.host.len()))
            .map(|(o, rate)| (o, *rate))
    }
}

/// An origin a route lets a plugin reach: `https://crm.example.com`,
/// `http://127.0.0.1:8080`, or every subdomain of one, `https://*.example.com`. The port
/// is the scheme's unless given; paths are not part of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    /// Lower-case; for `*.example.com`, `.example.com`.
    host: String,
    wildcard: bool,
    port: u16,
}

impl Origin {
    /// Reads an `allow_http` entry, saying what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "`{text}` is not an origin ({why}): write `https://host`, `http://host:port` or \
                 `https://*.domain`"
            )
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("no scheme"))?;
        if scheme != "http" && scheme != "https" {
            return Err(bad("the scheme must be http or https"));
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (wildcard, rest) = match rest.strip_prefix("*.") {
            Some(domain) => (true, domain),
            None => (false, rest),
        };
        if rest.contains(['/', '?', '#', '@', '*']) {
            return Err(bad("only a scheme, a host and a port"));
        }
        let url =
            url::Url::parse(&format!("{scheme}://{rest}/")).map_err(|e| bad(&e.to_string()))?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        if wildcard && !matches!(url.host(), Some(url::Host::Domain(_))) {
            return Err(bad("`*.` goes before a domain name"));
        }
        Ok(Self {
            scheme: scheme.to_string(),
            host: match wildcard {
                true => format!(".{host}"),
                false => host.to_string(),
            },
            wildcard,
            port: url.port_or_known_default().unwrap_or(0),
        })
    }

    /// Whether `url` is of this origin.
    pub fn allows(&self, url: &url::Url) -> bool {
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return false;
        };
        url.scheme() == self.scheme
            && port == self.port
            && match self.wildcard {
                true => host.ends_with(&self.host),
                false => host == self.host,
            }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let star = if self.wildcard { "*" } else { "" };
        write!(f, "{}://{star}{}:{}", self.scheme, self.host, self.port)
    }
}

/// A request as a plugin asks for it (WIT `http.request`), not yet checked.
#[derive(Debug)]
pub struct Asked {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

/// A request a plugin's grant allows, ready to send.
#[derive(Debug)]
pub struct Request {
    pub method: http::Method,
    pub url: url::Url,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

/// A whole response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Not sent: not allowed (the address guard, a bad header).
    #[error("{0}")]
    Refused(String),
    /// Not sent: no slot under the origin's rate limit within the call's time.
    #[error("{0}")]
    RateLimited(String),
    /// Sent, or tried, and not answered as it should be (no connection, no answer in time,
    /// a body too large).
    #[error("{0}")]
    Failed(String),
}

/// What sends plugins' requests: the deliveries' transport in force.
#[async_trait::async_trait]
pub trait Sender: Send + Sync {
    /// Sends `request` and reads its whole response, within `timeout`, failing past
    /// `max_bytes` of body.
    async fn send(
        &self,
        request: Request,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Response, SendError>;
}

/// Told when a call starts and stops waiting for a response: the pipeline stands another
/// worker in for the one that waits.
pub trait Waiting: Send + Sync {
    fn begins(&self);
    fn ends(&self);
}

/// Ends a wait when dropped (a call cancelled mid-wait included).
struct WaitGuard<'a>(&'a dyn Waiting);

impl Shared {
    /// The places for requests in flight to `origin`.
    fn places(&self, origin: &Origin, concurrency: usize) -> Arc<Semaphore> {
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let key = (origin.to_string(), concurrency);
        if !map.contains_key(&key) {
            // The cap changed (a reload): the old places go with the requests holding them.
            map.retain(|(other, _), _| *other != key.0);
        }
        (map.entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(concurrency.max(1)))))
        .clone()
    }

    /// Waits for a slot under `limited`'s rate limit of `rate` a second, taking it if it
    /// comes within `timeout`; if it does not, fails at once, taking none (see
    /// [`crate::pace`]).
    async fn wait_for_slot(
        &self,
        limited: &Origin,
        rate: f64,
        timeout: Duration,
    ) -> Result<(), SendError> {
        let Some((store, clock)) = &self.pace else {
            return Ok(());
        };
        let origin = limited.to_string();
        let now = clock.now_ms();
        let limit = Limit::Origin {
            origin: &origin,
            within: timeout.as_millis() as u64,
        };
        let slot = store.take_slot(limit, now, rate).await.map_err(|e| {
            SendError::Failed(format!("the rate limit of {limited} is unknown: {e}"))
        })?;
        let wait = Duration::from_millis(slot.saturating_sub(now));
        if wait > timeout {
            // (`1/60` shown as 0.017, not as its every digit.)
            let rate = (rate * 1000.0).round() / 1000.0;
            return Err(SendError::RateLimited(format!(
                "rate limited: {limited} takes {rate} requests a second \
                 (`plugins.http_rate_limit`), and its next free slot is {wait:?} away, past \
                 the call's time for HTTP requests"
            )));
        }
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.ends();
    }
}

#[derive(Clone)]
struct Shared {
    sender: Arc<dyn Sender>,
    metrics: Option<Arc<Metrics>>,
    dry_run: bool,
    /// Whom to tell of waits (the pipeline's workers; `None` for dry runs, whose waits hold
    /// an API request, not a worker).
    waiting: Option<Arc<dyn Waiting>>,
    /// The requests in flight to each granted origin (an `allow_http` entry, with the
    /// `http_concurrency` in force), shared by every call and dry run: one entry per origin
    /// granted since the start (a changed cap replaces its origin's entry).
    in_flight: Arc<Mutex<InFlight>>,
    /// Where the origins' rate limits are kept (`Store::take_slot`, shared by the gateways
    /// on one store) and the time they are asked at; `None`: no limits (a run with no
    /// store).
    pace: Option<(Arc<dyn Store>, Arc<dyn Clock>)>,
    /// Where each request and its outcome are written down (a dry run's); `None`: nowhere.
    recording: Option<Recording>,
}

/// One request a plugin asked for in a dry run, and what became of it (a dry run's
/// `requests`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Exchange {
    pub plugin: String,
    pub method: String,
    /// As asked; the values of query parameters that name a secret (`key`, `…token…`)
    /// redacted.
    pub url: String,
    /// As asked; values of headers that name a secret (`authorization`, `…key…`,
    /// `…token…`, …) redacted.
    pub headers: Vec<(String, String)>,
    /// The JSON value when it is JSON, else text, else `{"base64": …}`; absent with none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<crate::event::Body>,
    /// The response's status; absent when there was none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why there was no response (refused, rate limited, failed), as the plugin was told
    /// (secret query parameters redacted, as in the URL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The requests of one run, in the order they were asked for.
#[derive(Clone, Default)]
pub struct Recording(Arc<Mutex<Vec<Exchange>>>);

impl Recording {
    /// What was recorded so far.
    pub fn take(&self) -> Vec<Exchange> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn push(&self, exchange: Exchange) {
        (self.0.lock().unwrap_or_else(|e| e.into_inner())).push(exchange);
    }
}

/// Places for requests in flight by granted origin and the cap they were made with.
type InFlight = HashMap<(String, usize), Arc<Semaphore>>;

/// Where plugins' requests go out, for the gateway's calls or a dry run's. `Default`:
/// nowhere (every request fails: runs with no transport, `switchyard plugin run`).
#[derive(Clone, Default)]
pub struct Outbound(Option<Arc<Shared>>);

impl Outbound {
    /// Requests sent by `sender`, counted nowhere.
    pub fn new(sender: Arc<dyn Sender>) -> Self {
        Self(Some(Arc::new(Shared {
            sender,
            metrics: None,
            dry_run: false,
            waiting: None,
            in_flight: Default::default(),
            pace: None,
            recording: None,
        })))
    }

    /// Requests answered by `answers`, none sent (a run given answers in advance: it may
    /// ask with any method, as nothing leaves).
    pub fn answered_by(answers: super::Answers) -> Self {
        Self::new(Arc::new(answers))
    }

    /// The same, the origins' rate limits (`plugins.http_rate_limit`) kept in `store` and
    /// asked at `clock`'s time.
    pub fn paced(self, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        self.with(|s| s.pace = Some((store, clock)))
    }

    /// The same, each wait for a response told to `waiting`.
    pub fn telling(self, waiting: Arc<dyn Waiting>) -> Self {
        self.with(|s| s.waiting = Some(waiting))
    }

    /// The same, each request counted in `metrics` (`plugin_http_requests`).
    pub fn counted(self, metrics: Arc<Metrics>) -> Self {
        self.with(|s| s.metrics = Some(metrics))
    }

    /// For a dry run: sends only `GET` and `HEAD`, counts nothing, tells no one of waits.
    pub fn dry_run(&self) -> Self {
        self.with(|s| {
            s.dry_run = true;
            s.metrics = None;
            s.waiting = None;
        })
    }

    /// The same, each request and what became of it written down in the [`Recording`]
    /// returned (a fresh one, for one run).
    pub fn recorded(&self) -> (Self, Recording) {
        let recording = Recording::default();
        (
            self.with(|s| s.recording = Some(recording.clone())),
            recording,
        )
    }

    /// The same sender, the settings changed by `change`.
    fn with(&self, change: impl FnOnce(&mut Shared)) -> Self {
        Self(self.0.as_ref().map(|s| {
            let mut s = Shared::clone(s);
            change(&mut s);
            Arc::new(s)
        }))
    }

    /// What one call of a plugin may reach: the origins its route grants it.
    pub fn grant(
        &self,
        allowed: &Arc<[Origin]>,
        limits: &HttpLimits,
        turn: Option<&Arc<Turn>>,
    ) -> PluginHttp {
        PluginHttp {
            outbound: self.clone(),
            allowed: allowed.clone(),
            limits: limits.clone(),
            turn: turn.cloned(),
        }
    }
}

/// What one call of a plugin may reach over HTTP, and how.
#[derive(Clone, Default)]
pub struct PluginHttp {
    outbound: Outbound,
    allowed: Arc<[Origin]>,
    limits: HttpLimits,
    /// The chain's turn on the CPU, given up while a response is awaited.
    turn: Option<Arc<Turn>>,
}

impl PluginHttp {
    /// The limits its requests meet.
    pub fn limits(&self) -> &HttpLimits {
        &self.limits
    }

    /// Sends a plugin's request, if its route allows it, by `deadline` (the call's time
    /// for requests): the response, or why there is none. Counted by outcome.
    pub async fn send(
        &self,
        plugin: &str,
        asked: Asked,
        deadline: Instant,
    ) -> Result<Response, String> {
        let shared = self.outbound.0.as_ref();
        let Some(recording) = shared.and_then(|s| s.recording.as_ref()) else {
            let result = self.checked_send(plugin, asked, deadline).await;
            return self.counted(plugin, result);
        };
        let mut exchange = Exchange {
            plugin: plugin.to_string(),
            method: asked.method.clone(),
            url: crate::managed::redact_query_secrets(&asked.url).into_owned(),
            headers: crate::managed::redact_secret_headers(asked.headers.clone()),
            body: asked.body.clone().map(crate::event::Body::from),
            status: None,
            error: None,
        };
        let result = self.checked_send(plugin, asked, deadline).await;
        match &result {
            Ok(response) => exchange.status = Some(response.status),
            Err(e) => {
                exchange.error =
                    Some(crate::managed::redact_query_secrets(&e.to_string()).into_owned())
            }
        }
        recording.push(exchange);
        self.counted(plugin, result)
    }

    /// `result`, counted by outcome in the metrics (if any).
    fn counted(
        &self,
        plugin: &str,
        result: Result<Response, SendError>,
    ) -> Result<Response, String> {
        if let Some(metrics) = self.outbound.0.as_ref().and_then(|s| s.metrics.as_ref()) {
            let outcome = match &result {
                Ok(r) => match r.status {
                    200..=299 => "2xx",
                    300..=399 => "3xx",
                    400..=499 => "4xx",
                    _ => "5xx",
                },
                Err(SendError::Refused(_)) => "refused",
                Err(SendError::RateLimited(_)) => "rate_limited",
                Err(SendError::Failed(_)) => "failed",
            };
            metrics.plugin_http(plugin, outcome);
        }
        result.map_err(|e| e.to_string())
    }

    async fn checked_send(
        &self,
        plugin: &str,
        asked: Asked,
        deadline: Instant,
    ) -> Result<Response, SendError> {
        let Asked {
            method,
            url,
            headers,
            body,
        } = asked;
        let (method, url) = (method.as_str(), url.as_str());
        let refused = |m: String| Err(SendError::Refused(m));
        if !METHODS.contains(&method) {
            return refused(format!(
                "`{method}` is not a method a plugin may send ({})",
                METHODS.join(", ")
            ));
        }
        let url = match url::Url::parse(url) {
            Ok(u) => u,
            Err(e) => return refused(format!("`{url}` is not an absolute URL: {e}")),
        };
        let Some(granted) = self.allowed.iter().find(|o| o.allows(&url)) else {
            let origin = url.origin().ascii_serialization();
            return refused(match self.allowed.is_empty() {
                true => format!(
                    "the route allows plugin `{plugin}` no HTTP requests (add `{origin}` to its \
                     `allow_http` to allow this one)"
                ),
                false => format!(
                    "{origin} is not among the origins the route allows plugin `{plugin}` \
                     (`allow_http`)"
                ),
            });
        };
        let Some(shared) = &self.outbound.0 else {
            return refused("this run sends no HTTP requests".into());
        };
        if shared.dry_run && !DRY_RUN_METHODS.contains(&method) {
            return refused(format!(
                "a dry run does not send `{method}` requests (only GET and HEAD)"
            ));
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        if timeout.is_zero() {
            return Err(SendError::Failed(format!(
                "the call's time for HTTP requests ({:?}, `plugins.http_timeout`) is used up",
                self.limits.timeout
            )));
        }
        let rate = self.limits.rate_for(&url);
        let request = Request {
            method: method.parse().expect("one of METHODS"),
            url,
            headers: (headers.into_iter())
                .filter(|(k, _)| !TRANSPORT_HEADERS.contains(&k.to_ascii_lowercase().as_str()))
                .collect(),
            body,
        };
        let started = Instant::now();
        let places = shared.places(granted, self.limits.concurrency);
        let send = async {
            // Waiting for a place or a slot counts against the call's time, as the exchange
            // does. The place first: a slot is taken only by a request that then goes (a
            // slot taken before a wait for a place that timed out would be spent unsent,
            // pushing every later request's slot back).
            let Ok(Ok(_place)) = tokio::time::timeout(timeout, places.acquire_owned()).await else {
                return Err(SendError::Failed(format!(
                    "timed out waiting for one of the {} requests in flight to {granted} \
                     (`plugins.http_concurrency`) to end",
                    self.limits.concurrency
                )));
            };
            if let Some((limited, rate)) = rate {
                let left = timeout.saturating_sub(started.elapsed());
                shared.wait_for_slot(limited, rate, left).await?;
            }
            let left = timeout.saturating_sub(started.elapsed());
            (shared.sender)
                .send(request, left, self.limits.max_response_bytes)
                .await
        };
        let _wait = (shared.waiting.as_deref()).map(|w| {
            w.begins();
            WaitGuard(w)
        });
        match &self.turn {
            Some(turn) => turn.away(send).await,
            None => send.await,
        }
    }
}

/// A plugin chain's turn on the CPU (a permit of the pipeline's plugin semaphore), which
/// it gives up while it waits for something other than the CPU.
pub struct Turn {
    cpu: Arc<Semaphore>,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Turn {
    /// Waits for a turn on `cpu`.
    pub async fn take(cpu: &Arc<Semaphore>) -> Arc<Self> {
        let permit = cpu.clone().acquire_owned().await.ok();
        Arc::new(Self {
            cpu: cpu.clone(),
            permit: Mutex::new(permit),
        })
    }

    /// Runs `wait` without the turn, and takes a turn again afterwards.
    pub async fn away<F: Future>(&self, wait: F) -> F::Output {
        drop(self.lock().take());
        let out = wait.await;
        let permit = self.cpu.clone().acquire_owned().await.ok();
        *self.lock() = permit;
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<OwnedSemaphorePermit>> {
        self.permit.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn an_origin_allows_its_scheme_host_and_port_only() {
        let o = Origin::parse("https://CRM.example.com").unwrap();
        assert!(o.allows(&url("https://crm.example.com/sims/1?x=2")));
        assert!(o.allows(&url("https://crm.example.com:443/")));
        assert!(!o.allows(&url("http://crm.example.com/")));
        assert!(!o.allows(&url("https://crm.example.com:8443/")));
        assert!(!o.allows(&url("https://crm.example.com.evil.net/")));
        assert!(!o.allows(&url("https://api.crm.example.com/")));

        let o = Origin::parse("http://127.0.0.1:8080/").unwrap();
        assert!(o.allows(&url("http://127.0.0.1:8080/a")));
        assert!(!o.allows(&url("http://127.0.0.1:8081/a")));
        assert!(!o.allows(&url("http://localhost:8080/a")));

        let o = Origin::parse("https://*.example.com").unwrap();
        assert!(o.allows(&url("https://a.example.com/")));
        assert!(o.allows(&url("https://a.b.example.com/")));
        assert!(!o.allows(&url("https://example.com/")));
        assert!(!o.allows(&url("https://badexample.com/")));

        let o = Origin::parse("http://[::1]:9000").unwrap();
        assert!(o.allows(&url("http://[::1]:9000/x")));
    }

    /// Answers every request with its method as the body, status 200.
    struct Echo;

    #[async_trait::async_trait]
    impl Sender for Echo {
        async fn send(&self, r: Request, _: Duration, _: usize) -> Result<Response, SendError> {
            Ok(Response {
                status: 200,
                headers: r.headers,
                body: r.method.as_str().as_bytes().to_vec(),
            })
        }
    }

    #[tokio::test]
    async fn a_grant_checks_method_origin_dry_run_and_time_and_counts() {
        let metrics = Arc::new(Metrics::default());
        let outbound = Outbound::new(Arc::new(Echo)).counted(metrics.clone());
        let allowed: Arc<[Origin]> = [Origin::parse("https://crm.example.com").unwrap()].into();
        let later = Instant::now() + Duration::from_secs(5);
        let live = outbound.grant(&allowed, &HttpLimits::default(), None);
        let send = |grant: &PluginHttp, method: &str, url: &str, deadline: Instant| {
            let (grant, method, url) = (grant.clone(), method.to_string(), url.to_string());
            async move {
                let headers = vec![("Host".into(), "evil".into()), ("x-a".into(), "1".into())];
                let asked = Asked {
                    method,
                    url,
                    headers,
                    body: None,
                };
                grant.send("p", asked, deadline).await
            }
        };

        let ok = send(&live, "POST", "https://crm.example.com/x", later)
            .await
            .unwrap();
        assert_eq!((ok.status, ok.body.as_slice()), (200, b"POST".as_slice()));
        assert_eq!(
            ok.headers,
            [("x-a".to_string(), "1".to_string())],
            "host is the transport's"
        );
        let e = send(&live, "CONNECT", "https://crm.example.com/", later)
            .await
            .unwrap_err();
        assert!(e.contains("not a method a plugin may send"), "{e}");
        let e = send(&live, "GET", "https://other.example.com/", later)
            .await
            .unwrap_err();
        assert!(
            e.contains("https://other.example.com is not among the origins"),
            "{e}"
        );
        let e = send(&live, "GET", "/relative", later).await.unwrap_err();
        assert!(e.contains("not an absolute URL"), "{e}");
        let e = send(&live, "GET", "https://crm.example.com/", Instant::now())
            .await
            .unwrap_err();
        assert!(e.contains("is used up"), "{e}");

        // A dry run sends GET and HEAD only, and counts nothing.
        let dry = outbound
            .dry_run()
            .grant(&allowed, &HttpLimits::default(), None);
        assert!(
            send(&dry, "GET", "https://crm.example.com/", later)
                .await
                .is_ok()
        );
        let e = send(&dry, "DELETE", "https://crm.example.com/", later)
            .await
            .unwrap_err();
        assert!(
            e.contains("a dry run does not send `DELETE` requests"),
            "{e}"
        );

        // No grant at all: nothing is sent, and the error says what to allow.
        let none = outbound.grant(&Arc::from([]), &HttpLimits::default(), None);
        let e = send(&none, "GET", "https://crm.example.com/a", later)
            .await
            .unwrap_err();
        assert!(
            e.contains("add `https://crm.example.com` to its `allow_http`"),
            "{e}"
        );

        let count = |outcome: &str| {
            let labels = crate::metrics::PluginHttpLabels {
                plugin: "p".into(),
                outcome: outcome.into(),
            };
            metrics.plugin_http.get(&labels).map_or(0, |c| c.get())
        };
        assert_eq!((count("2xx"), count("refused"), count("failed")), (1, 4, 1));
    }

    /// Holds each request to `/slow` until told, answers the others at once.
    struct Held(tokio::sync::Notify);

    #[async_trait::async_trait]
    impl Sender for Held {
        async fn send(&self, r: Request, _: Duration, _: usize) -> Result<Response, SendError> {
            if r.url.path() == "/slow" {
                self.0.notified().await;
            }
            Ok(Response {
                status: 200,
                headers: Vec::new(),
                body: Vec::new(),
            })
        }
    }

    /// A request that waited in vain for a place under `http_concurrency` took no slot of
    /// its origin's rate limit: the next one, once the place is free, goes at once.
    #[tokio::test]
    async fn a_request_that_found_no_place_takes_no_slot() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SqliteStore::open(dir.path(), 10).unwrap());
        let sender = Arc::new(Held(tokio::sync::Notify::new()));
        let outbound =
            Outbound::new(sender.clone()).paced(store, Arc::new(crate::delivery::SystemClock));
        let origin = Origin::parse("https://crm.example.com").unwrap();
        let limits = HttpLimits {
            concurrency: 1,
            rates: Arc::new([(origin.clone(), 1.0)]),
            ..HttpLimits::default()
        };
        let grant = outbound.grant(&Arc::from([origin]), &limits, None);
        let send = |path: &str, within: u64| {
            let (grant, url) = (grant.clone(), format!("https://crm.example.com{path}"));
            let deadline = Instant::now() + Duration::from_millis(within);
            async move {
                let asked = Asked {
                    method: "GET".into(),
                    url,
                    headers: Vec::new(),
                    body: None,
                };
                grant.send("p", asked, deadline).await
            }
        };
        // One a second. The first takes the place (and the slot now) and is held.
        let slow = tokio::spawn(send("/slow", 10_000));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The second's slot would come in a second, within its 1.5 s, but no place does.
        let e = send("/b", 1_500).await.unwrap_err();
        assert!(
            e.contains("timed out waiting for one of the 1 requests"),
            "{e}"
        );
        sender.0.notify_one();
        slow.await.unwrap().unwrap();
        // A second and a half after the first: its slot is free now. (Had the second
        // request taken the slot at one second, the next would be at two, 0.45 s away,
        // past this one's 0.2 s: rate limited.)
        send("/c", 200).await.unwrap();
    }

    /// A changed `http_concurrency` replaces an origin's places instead of adding to them;
    /// requests in flight keep the places they hold.
    #[test]
    fn a_changed_cap_replaces_an_origins_places() {
        let outbound = Outbound::new(Arc::new(Held(tokio::sync::Notify::new())));
        let shared = outbound.0.as_ref().unwrap();
        let (crm, geo) = (
            Origin::parse("https://crm.example.com").unwrap(),
            Origin::parse("https://geo.example.com").unwrap(),
        );
        let held = shared.places(&crm, 2);
        shared.places(&geo, 2);
        assert!(
            Arc::ptr_eq(&held, &shared.places(&crm, 2)),
            "the same cap, the same places"
        );
        let now = shared.places(&crm, 3);
        assert_eq!(now.available_permits(), 3);
        let map = shared.in_flight.lock().unwrap();
        let mut keys: Vec<_> = map.keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                ("https://crm.example.com:443".to_string(), 3),
                ("https://geo.example.com:443".to_string(), 2)
            ]
        );
        assert_eq!(
            held.available_permits(),
            2,
            "the old places live while held"
        );
    }

    /// A chain that waits gives its permit back meanwhile, and takes one again after.
    #[tokio::test]
    async fn a_turn_is_given_up_while_waiting() {
        let cpu = Arc::new(Semaphore::new(1));
        let turn = Turn::take(&cpu).await;
        assert_eq!(cpu.available_permits(), 0);
        let seen = turn.away(async { cpu.available_permits() }).await;
        assert_eq!((seen, cpu.available_permits()), (1, 0));
        drop(turn);
        assert_eq!(cpu.available_permits(), 1);
    }

    /// A request is under its own origin's rate limit, else under the closest `*.`
    /// domain's — whichever `allow_http` entry let it through.
    #[test]
    fn a_request_is_under_its_closest_origins_rate_limit() {
        let origin = |o| Origin::parse(o).unwrap();
        let limits = HttpLimits {
            rates: Arc::from(vec![
                (origin("https://*.example.com"), 1.0),
                (origin("https://*.eu.example.com"), 2.0),
                (origin("https://crm.eu.example.com"), 3.0),
            ]),
            ..HttpLimits::default()
        };
        let rate = |u| limits.rate_for(&url(u)).map(|(o, r)| (o.to_string(), r));
        assert_eq!(
            rate("https://crm.eu.example.com/sims/1"),
            Some(("https://crm.eu.example.com:443".into(), 3.0))
        );
        assert_eq!(
            rate("https://inv.eu.example.com/x"),
            Some(("https://*.eu.example.com:443".into(), 2.0))
        );
        assert_eq!(
            rate("https://inv.example.com/x"),
            Some(("https://*.example.com:443".into(), 1.0))
        );
        assert_eq!(rate("http://crm.eu.example.com/x"), None, "another scheme");
        assert_eq!(rate("https://example.org/x"), None);
    }

    #[test]
    fn a_bad_origin_says_what_is_wrong() {
        for (text, why) in [
            ("crm.example.com", "no scheme"),
            ("ftp://crm.example.com", "http or https"),
            ("https://crm.example.com/sims", "only a scheme"),
            ("https://user@crm.example.com", "only a scheme"),
            ("https://*.10.0.0.1", "before a domain"),
            ("https://", "empty host"),
        ] {
            let e = Origin::parse(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
