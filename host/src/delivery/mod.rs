//! The delivery stage: turns a planned delivery into an HTTP request (placeholders,
//! headers) and sends it, retrying with backoff, recording every attempt.

pub mod placeholder;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::{DeliveryConfig, DestinationConfig};
use crate::event::{Body, Event, Pairs, lookup};
use crate::store::{Attempt, DeliveryRecord, DeliveryStatus, Store};
use placeholder::Target;

/// Inbound headers that are never forwarded: hop-by-hop and framing headers, the sender's
/// credentials and addressing, and headers the gateway sets itself.
const NOT_FORWARDED: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "accept-encoding",
    "authorization",
    "cookie",
    "forwarded",
    "x-real-ip",
    "user-agent",
    "webhook-id",
    "switchyard-event-id",
];

/// Headers that only the HTTP client may set, even when a plugin asks for them.
const FRAMING: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
];

const USER_AGENT: &str = concat!("switchyard/", env!("CARGO_PKG_VERSION"));

/// A configured destination, ready to render.
#[derive(Debug)]
pub struct Destination {
    pub name: String,
    url: String,
    headers: Vec<(HeaderName, String)>,
    event_types: Option<HashSet<String>>,
}

impl Destination {
    /// Builds a destination from validated config.
    pub fn from_config(c: &DestinationConfig) -> Self {
        Self {
            name: c.name.clone(),
            url: c.url.clone(),
            headers: c
                .headers
                .iter()
                .filter_map(|(k, v)| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, v.clone())))
                .collect(),
            event_types: c.event_types.as_ref().map(|t| t.iter().cloned().collect()),
        }
    }

    /// Whether this destination takes events of this type.
    pub fn accepts(&self, event_type: Option<&str>) -> bool {
        match (&self.event_types, event_type) {
            (None, _) => true,
            (Some(types), Some(t)) => types.contains(t),
            (Some(_), None) => false,
        }
    }
}

/// A delivery decided by a route, before placeholders are filled.
#[derive(Debug)]
pub struct PlannedDelivery {
    pub id: String,
    pub route: usize,
    pub destination: Arc<Destination>,
    pub body: Body,
    pub content_type: Option<String>,
    /// The event's headers (filtered before sending, see `NOT_FORWARDED`).
    pub headers: Pairs,
    /// Headers a plugin set for this delivery; they win over the destination's.
    pub extra_headers: Pairs,
    /// The event's metadata with the delivery's own on top.
    pub metadata: Pairs,
}

/// The values placeholders resolve to for one event, besides metadata.
pub struct PlaceholderValues {
    event_id: String,
    source: String,
    /// Top-level scalar fields of the event as received.
    fields: HashMap<String, String>,
}

impl PlaceholderValues {
    /// Collects the values of an event as received (before any plugin reshaped it).
    pub fn of(received: &Event) -> Self {
        let fields = received
            .json_object()
            .map(|obj| {
                obj.into_iter()
                    .filter_map(|(k, v)| match v {
                        serde_json::Value::String(s) => Some((k, s)),
                        serde_json::Value::Number(n) => Some((k, n.to_string())),
                        serde_json::Value::Bool(b) => Some((k, b.to_string())),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            event_id: received.id.clone(),
            source: received.source.clone(),
            fields,
        }
    }

    /// The gateway's id of the event.
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// The event type: metadata `event_type`, else the top-level `type` field.
    pub fn event_type<'a>(&'a self, metadata: &'a [(String, String)]) -> Option<&'a str> {
        lookup(metadata, "event_type").or_else(|| self.fields.get("type").map(String::as_str))
    }

    fn get<'a>(&'a self, metadata: &'a [(String, String)], name: &str) -> Option<&'a str> {
        match name {
            "event_id" => Some(&self.event_id),
            "source" => Some(&self.source),
            "event_type" => self.event_type(metadata),
            _ => lookup(metadata, name).or_else(|| self.fields.get(name).map(String::as_str)),
        }
    }
}

/// The stable id of a delivery, derived from what identifies it, so that running the same
/// event again yields the same ids and receivers can de-duplicate on `webhook-id`.
pub fn delivery_id(event_id: &str, route: usize, index: usize, destination: &str) -> String {
    let digest = Sha256::digest(format!("{event_id}\n{route}\n{index}\n{destination}"));
    format!("dlv_{}", &hex::encode(digest)[..26])
}

/// Sends deliveries over HTTP.
pub struct Deliverer {
    client: reqwest::Client,
    config: DeliveryConfig,
    in_flight: Arc<Semaphore>,
}

impl Deliverer {
    pub fn new(config: DeliveryConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .build()?;
        let in_flight = Arc::new(Semaphore::new(config.concurrency));
        Ok(Self {
            client,
            config,
            in_flight,
        })
    }

    /// Sends one delivery, retrying transient failures, and records each attempt.
    pub async fn deliver(
        &self,
        store: &dyn Store,
        planned: PlannedDelivery,
        values: &PlaceholderValues,
    ) {
        let dest = &planned.destination;
        let url = placeholder::render(&dest.url, Target::Url, |n| values.get(&planned.metadata, n));
        let mut record = DeliveryRecord {
            id: planned.id.clone(),
            route: planned.route,
            destination: dest.name.clone(),
            url: url.clone(),
            status: DeliveryStatus::Pending,
            attempts: Vec::new(),
        };
        let event_id = values.event_id.as_str();
        let headers = self.headers(&planned, values);
        let _permit = self.in_flight.acquire().await;

        for attempt in 1..=self.config.max_attempts {
            let at = now_ms();
            let started = Instant::now();
            let result = self
                .client
                .post(&url)
                .headers(headers.clone())
                .body(planned.body.0.clone())
                .send()
                .await;
            let duration_ms = started.elapsed().as_millis() as u64;
            let (status_code, error, retry) = match result {
                Ok(resp) => {
                    let code = resp.status();
                    // Drain the body so the connection can be reused.
                    let _ = resp.bytes().await;
                    let retry = code.is_server_error() || code.as_u16() == 429;
                    let error =
                        (!code.is_success()).then(|| format!("destination answered {code}"));
                    (Some(code.as_u16()), error, retry)
                }
                Err(e) => (None, Some(describe(&e)), true),
            };
            let ok = error.is_none();
            record.attempts.push(Attempt {
                at,
                duration_ms,
                status_code,
                error: error.clone(),
            });
            if ok {
                record.status = DeliveryStatus::Delivered;
                tracing::info!(event_id, delivery_id = %record.id, destination = %dest.name, attempt,
                    status = status_code, "Delivered.");
                break;
            }
            let last = attempt == self.config.max_attempts;
            tracing::warn!(event_id, delivery_id = %record.id, destination = %dest.name, attempt,
                status = status_code, error = error.as_deref().unwrap_or(""), will_retry = retry && !last,
                "Delivery attempt failed.");
            if !retry || last {
                record.status = DeliveryStatus::Failed;
                break;
            }
            store.record_delivery(event_id, record.clone()).await;
            tokio::time::sleep(self.backoff(attempt)).await;
        }
        store.record_delivery(event_id, record).await;
    }

    /// The wait after failed attempt `n` (1-based): `backoff`, doubled each time.
    fn backoff(&self, attempt: u32) -> Duration {
        self.config
            .backoff
            .saturating_mul(1 << (attempt - 1).min(16))
    }

    /// Headers of a delivery: forwarded event headers, the destination's (with
    /// placeholders), the delivery's own, and the gateway's.
    fn headers(&self, planned: &PlannedDelivery, values: &PlaceholderValues) -> HeaderMap {
        let mut map = HeaderMap::new();
        let mut set = |name: &str, value: &str| {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                map.insert(n, v);
            }
        };
        for (name, value) in &planned.headers {
            let lower = name.to_ascii_lowercase();
            if !NOT_FORWARDED.contains(&lower.as_str())
                && !lower.starts_with("x-forwarded-")
                && !lower.starts_with("proxy-")
            {
                set(&lower, value);
            }
        }
        for (name, template) in &planned.destination.headers {
            let value = placeholder::render(template, Target::Header, |n| {
                values.get(&planned.metadata, n)
            });
            set(name.as_str(), &value);
        }
        for (name, value) in &planned.extra_headers {
            let lower = name.to_ascii_lowercase();
            if !FRAMING.contains(&lower.as_str()) {
                set(&lower, value);
            }
        }
        if let Some(ct) = &planned.content_type {
            set("content-type", ct);
        }
        set("webhook-id", &planned.id);
        set("switchyard-event-id", &values.event_id);
        map
    }
}

fn describe(e: &reqwest::Error) -> String {
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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
