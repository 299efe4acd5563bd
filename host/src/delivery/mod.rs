//! The delivery stage: renders a planned delivery into a stored request (placeholders,
//! headers), and the [`Dispatcher`] that sends due deliveries, decides on retries
//! ([`policy`]), keeps each destination's rate limit ([`pace`]) and state.

mod dispatch;
pub mod oauth2;
pub mod placeholder;
pub mod policy;

pub use dispatch::{
    Clock, Dispatcher, Held, ManualClock, RestartError, SystemClock, TestOutcome, plugin_sender,
};

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use reqwest::header::{HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use crate::config::{DeliveryConfig, DestinationConfig, RetryPolicy};
use crate::event::{Body, Event, Pairs, lookup};
use crate::store::{DeliveryStatus, NewDelivery};
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

pub(crate) const USER_AGENT: &str = concat!("switchyard/", env!("CARGO_PKG_VERSION"));

/// A configured destination, ready to render.
#[derive(Debug)]
pub struct Destination {
    pub name: String,
    url: String,
    headers: Vec<(HeaderName, String)>,
    event_types: Option<TypeFilter>,
    pub retry: RetryPolicy,
    /// How each attempt is signed (`signing`), if it is.
    signer: Option<Signer>,
    /// The most deliveries per second (see [`pace`]).
    pub rate_limit: Option<f64>,
    /// How long one attempt may take, if not `delivery.timeout`.
    pub timeout: Option<std::time::Duration>,
    /// Its OAuth 2.0 client and token, if it takes bearer tokens (`oauth2`).
    pub oauth2: Option<Arc<oauth2::OAuth2>>,
    /// What it was built from (a reload keeps a destination whose config is the same).
    pub config: std::sync::Arc<crate::config::DestinationConfig>,
}

/// The destinations in force, by name: a persistent map, so a routing that changes one of
/// 50,000 shares the rest with the one before (see `pipeline::Routing::from_config`).
pub type Destinations = imbl::HashMap<String, Arc<Destination>>;

/// What HTTPS deliveries trust besides the system's certificate authorities, and the
/// certificate they present when a destination asks for one, read from
/// `delivery.ca_certificates` and `delivery.client_certificate`.
pub struct DeliveryTls {
    pub roots: Vec<reqwest::Certificate>,
    pub identity: Option<reqwest::Identity>,
    /// When each file's certificates stop being valid, by the key that names it
    /// (`delivery.ca_certificates[0]`, `delivery.client_certificate`).
    pub validity: Vec<(String, crate::edge::Validity)>,
    /// A SHA-256 of the files' names and contents: it changes when one is renewed.
    pub fingerprint: [u8; 32],
}

/// Reads `DeliveryTls` from the files the config names. An error names the key.
pub fn tls_settings(config: &DeliveryConfig) -> Result<DeliveryTls, (String, String)> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use sha2::Digest as _;
    let fingerprint = std::cell::RefCell::new(sha2::Sha256::new());
    let read = |key: &str, path: &std::path::Path| {
        let bytes = std::fs::read(path).map_err(|e| {
            (
                key.to_string(),
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let mut f = fingerprint.borrow_mut();
        f.update(path.as_os_str().as_encoded_bytes());
        f.update((bytes.len() as u64).to_le_bytes());
        f.update(&bytes);
        Ok::<_, (String, String)>(bytes)
    };
    // The validity of a PEM file's certificates (read again here: reqwest's certificates
    // do not show theirs).
    let validity = |key: &str, path: &std::path::Path, pem: &[u8]| {
        let fail = |e: String| (key.to_string(), format!("{}: {e}", path.display()));
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(e.to_string()))?;
        match crate::edge::Validity::of_chain(&certs).map_err(fail)? {
            Some(v) => Ok((key.to_string(), v)),
            None => Err((
                key.to_string(),
                format!("{} holds no PEM certificate", path.display()),
            )),
        }
    };
    let mut tls = DeliveryTls {
        roots: Vec::new(),
        identity: None,
        validity: Vec::new(),
        fingerprint: [0; 32],
    };
    for (i, path) in config.ca_certificates.iter().enumerate() {
        let key = format!("delivery.ca_certificates[{i}]");
        let pem = read(&key, path)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| (key.clone(), format!("{}: {e}", path.display())))?;
        tls.validity.push(validity(&key, path, &pem)?);
        tls.roots.extend(certs);
    }
    if let Some(c) = &config.client_certificate {
        let key = "delivery.client_certificate";
        let mut pem = read("delivery.client_certificate.cert", &c.cert)?;
        tls.validity.push(validity(key, &c.cert, &pem)?);
        pem.push(b'\n');
        pem.extend(read("delivery.client_certificate.key", &c.key)?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            (
                key.to_string(),
                format!(
                    "{} and {} are not a PEM certificate and its private key: {e}",
                    c.cert.display(),
                    c.key.display()
                ),
            )
        })?;
        tls.identity = Some(identity);
    }
    tls.fingerprint = fingerprint.into_inner().finalize().into();
    Ok(tls)
}

/// The host of `delivery.proxy` — an `http://` or `https://` URL with a host, optionally
/// with credentials (`http://user:pass@proxy:3128`) — or why it is not one. (The error
/// never repeats the URL, which may carry a password.)
pub fn proxy_host(proxy: &str) -> Result<String, String> {
    let url = url::Url::parse(proxy).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "`{}` proxies are not supported: use http:// or https://",
            url.scheme()
        ));
    }
    let host = match url.host() {
        Some(url::Host::Domain(name)) => name.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err("the proxy URL has no host".into()),
    };
    reqwest::Proxy::all(proxy).map_err(|e| e.to_string())?;
    Ok(host)
}

/// How a destination signs each attempt, made from its validated `signing`.
#[derive(Debug)]
enum Signer {
    /// The current key and those of a rotation (`previous_secrets`).
    StandardWebhooks(Vec<Vec<u8>>),
    /// An HMAC-SHA256 in the form `signing` gives (kept as configured: validated, header
    /// names matched without regard to case).
    Hmac(Arc<crate::config::SigningConfig>),
}

impl Signer {
    fn from_config(c: &crate::config::SigningConfig) -> Self {
        use crate::config::SigningScheme;
        match c.scheme {
            SigningScheme::StandardWebhooks => Signer::StandardWebhooks(
                (c.secrets())
                    .filter_map(|secret| crate::edge::decode_secret(secret).ok())
                    .collect(),
            ),
            SigningScheme::HmacSha256 | SigningScheme::HmacSha1 | SigningScheme::HmacSha512 => {
                Signer::Hmac(Arc::new(c.clone()))
            }
        }
    }
}

impl Destination {
    /// The headers that sign one attempt, or none when the destination does not sign:
    /// Standard Webhooks' `webhook-timestamp` and `webhook-signature` (one `v1,` signature
    /// per key, space-separated); or the `hmac-sha256` scheme's header (and its timestamp's;
    /// one signature per key in a `signature_key` form).
    pub(crate) fn signature(&self, id: &str, now_ms: u64, body: &[u8]) -> Vec<(String, String)> {
        let ts = || (now_ms / 1000).to_string();
        match &self.signer {
            None => Vec::new(),
            Some(Signer::StandardWebhooks(keys)) => {
                let signatures: Vec<String> = (keys.iter())
                    .map(|key| crate::edge::sign(key, id, now_ms / 1000, body))
                    .collect();
                vec![
                    ("webhook-timestamp".into(), ts()),
                    ("webhook-signature".into(), signatures.join(" ")),
                ]
            }
            Some(Signer::Hmac(c)) => {
                let keys: Vec<&[u8]> = c.secrets().map(|s| s.as_bytes()).collect();
                (c.hmac_form()).headers(&keys, now_ms / 1000, body)
            }
        }
    }

    /// Builds a destination from validated config.
    pub fn from_config(c: &std::sync::Arc<DestinationConfig>, defaults: &RetryPolicy) -> Self {
        Self {
            name: c.name.clone(),
            url: c.url.clone(),
            retry: c
                .retry
                .as_ref()
                .map_or_else(|| defaults.clone(), |o| o.apply(defaults)),
            signer: c.signing.as_ref().map(Signer::from_config),
            headers: c
                .headers
                .iter()
                .filter_map(|(k, v)| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, v.clone())))
                .collect(),
            event_types: c.event_types.as_deref().map(TypeFilter::new),
            rate_limit: c.rate_limit,
            timeout: c.timeout,
            oauth2: c.oauth2.clone().map(|o| Arc::new(oauth2::OAuth2::new(o))),
            config: c.clone(),
        }
    }

    /// This destination, with the OAuth 2.0 client (and so the token) of the one it
    /// replaces if their `oauth2` settings are the same: a reload does not cost a token.
    pub fn keeping_token_of(mut self, before: Option<&Arc<Destination>>) -> Self {
        if let (Some(mine), Some(theirs)) = (&self.oauth2, before.and_then(|b| b.oauth2.as_ref()))
            && mine.config() == theirs.config()
        {
            self.oauth2 = Some(theirs.clone());
        }
        self
    }

    /// Whether this destination takes events of the type `event_type` yields (asked only
    /// when the destination filters on types).
    pub fn accepts<'a>(&self, event_type: impl FnOnce() -> Option<&'a str>) -> bool {
        match &self.event_types {
            None => true,
            Some(types) => event_type().is_some_and(|t| types.takes(t)),
        }
    }
}

/// A destination's `event_types`: names taken as they are, and patterns in which `*`
/// stands for any run of characters (none included) — `bondio.attachment.*`, `usage*`,
/// `*.threshold_breached`, or `*` for any event that has a type.
#[derive(Debug)]
struct TypeFilter {
    names: HashSet<String>,
    /// Each pattern split at its `*`s.
    patterns: Vec<Vec<String>>,
}

impl TypeFilter {
    fn new(types: &[String]) -> Self {
        let (patterns, names): (Vec<&String>, Vec<&String>) =
            types.iter().partition(|t| t.contains('*'));
        TypeFilter {
            names: names.into_iter().cloned().collect(),
            patterns: (patterns.into_iter())
                .map(|p| p.split('*').map(str::to_string).collect())
                .collect(),
        }
    }

    fn takes(&self, event_type: &str) -> bool {
        self.names.contains(event_type) || self.patterns.iter().any(|p| glob(p, event_type))
    }
}

/// Whether `text` is `parts` joined by runs of any characters: it starts with the first,
/// ends with the last, and holds the others in order between them, none overlapping.
fn glob(parts: &[String], text: &str) -> bool {
    let [first, middle @ .., last] = parts else {
        return parts.first().is_some_and(|p| p == text);
    };
    let Some(mut rest) = text.strip_prefix(first.as_str()) else {
        return false;
    };
    for part in middle {
        match rest.find(part.as_str()) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last.as_str())
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
    /// The event's body as received.
    body: Body,
    /// Its top-level scalar fields, parsed on first use: most destinations have no
    /// placeholder and no event-type filter, and their events need no parse here.
    fields: OnceLock<HashMap<String, String>>,
}

impl PlaceholderValues {
    /// The values of an event as received (before any plugin reshaped it).
    pub fn of(received: &Event) -> Self {
        Self {
            event_id: received.id.clone(),
            source: received.source.clone(),
            body: received.body.clone(),
            fields: OnceLock::new(),
        }
    }

    fn fields(&self) -> &HashMap<String, String> {
        self.fields.get_or_init(|| {
            let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice(&self.body.0) else {
                return HashMap::new();
            };
            obj.into_iter()
                .filter_map(|(k, v)| match v {
                    serde_json::Value::String(s) => Some((k, s)),
                    serde_json::Value::Number(n) => Some((k, n.to_string())),
                    serde_json::Value::Bool(b) => Some((k, b.to_string())),
                    _ => None,
                })
                .collect()
        })
    }

    /// The gateway's id of the event.
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// The event type: metadata `event_type`, else the top-level `type` field.
    pub fn event_type<'a>(&'a self, metadata: &'a [(String, String)]) -> Option<&'a str> {
        lookup(metadata, "event_type").or_else(|| self.fields().get("type").map(String::as_str))
    }

    fn get<'a>(&'a self, metadata: &'a [(String, String)], name: &str) -> Option<&'a str> {
        match name {
            "event_id" => Some(&self.event_id),
            "source" => Some(&self.source),
            "event_type" => self.event_type(metadata),
            _ => lookup(metadata, name).or_else(|| self.fields().get(name).map(String::as_str)),
        }
    }
}

/// The stable id of a delivery, derived from what identifies it, so that processing the
/// same event again after a crash yields the same ids and receivers can de-duplicate on
/// `webhook-id`. A replay is a new `run` and gets new ids.
///
/// The id begins with the event's time (the 48-bit millisecond timestamp of its UUIDv7, as
/// 12 hex digits) and ends with 80 bits of a hash of the rest: ids sort by time, so the
/// store's indexes on them grow at one end as a log does, instead of taking each new id at
/// a random place (which dirtied a different index page per delivery in every commit).
pub fn delivery_id(
    event_id: &str,
    run: u32,
    route: usize,
    index: usize,
    destination: &str,
) -> String {
    let digest = hex::encode(Sha256::digest(format!(
        "{event_id}\n{run}\n{route}\n{index}\n{destination}"
    )));
    let time = match uuid::Uuid::parse_str(event_id) {
        Ok(uuid) => uuid.simple().to_string()[..12].to_string(),
        // Only ids made outside the gateway (tests) are not UUIDs.
        Err(_) => digest[20..32].to_string(),
    };
    format!("dlv_{time}{}", &digest[..20])
}

/// Renders a planned delivery: the URL and headers with placeholders filled, the
/// gateway's headers added. The result is stored and sent as it is, retry after retry.
pub fn render(planned: &PlannedDelivery, values: &PlaceholderValues) -> NewDelivery {
    let dest = &planned.destination;
    let accepted = dest.accepts(|| values.event_type(&planned.metadata));
    let url = placeholder::render(&dest.url, Target::Url, |n| values.get(&planned.metadata, n));
    let first_wait = dest
        .retry
        .retry_schedule
        .first()
        .copied()
        .unwrap_or_default();
    NewDelivery {
        lease_until: None,
        delay_ms: first_wait.as_millis() as u64,
        id: planned.id.clone(),
        route: planned.route,
        destination: dest.name.clone(),
        url,
        headers: headers(planned, values),
        body: planned.body.0.clone(),
        status: if accepted {
            DeliveryStatus::Pending
        } else {
            DeliveryStatus::Skipped
        },
    }
}

/// Headers of a delivery: forwarded event headers, the destination's (with placeholders),
/// the delivery's own, and the gateway's.
fn headers(planned: &PlannedDelivery, values: &PlaceholderValues) -> Pairs {
    let mut out: Pairs = Vec::new();
    let mut set = |name: &str, value: String| {
        let lower = name.to_ascii_lowercase();
        let valid = HeaderName::from_bytes(lower.as_bytes()).is_ok()
            && HeaderValue::from_str(&value).is_ok();
        if valid {
            out.retain(|(k, _)| *k != lower);
            out.push((lower, value));
        }
    };
    for (name, value) in &planned.headers {
        let lower = name.to_ascii_lowercase();
        if !NOT_FORWARDED.contains(&lower.as_str())
            && !lower.starts_with("x-forwarded-")
            && !lower.starts_with("proxy-")
        {
            set(&lower, value.clone());
        }
    }
    for (name, template) in &planned.destination.headers {
        set(
            name.as_str(),
            placeholder::render(template, Target::Header, |n| {
                values.get(&planned.metadata, n)
            }),
        );
    }
    for (name, value) in &planned.extra_headers {
        if !FRAMING.contains(&name.to_ascii_lowercase().as_str()) {
            set(name, value.clone());
        }
    }
    if let Some(ct) = &planned.content_type {
        set("content-type", ct.clone());
    }
    set("webhook-id", planned.id.clone());
    set("switchyard-event-id", values.event_id.clone());
    out
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{TypeFilter, delivery_id};

    #[test]
    fn event_types_take_names_and_patterns() {
        let types: Vec<String> = [
            "usage",
            "bondio.attachment.*",
            "*.threshold_breached",
            "sms*in*",
        ]
        .map(String::from)
        .to_vec();
        let filter = TypeFilter::new(&types);
        for taken in [
            "usage",
            "bondio.attachment.activated",
            "bondio.attachment.",
            "bondio.subscription.threshold_breached",
            "sms-incoming",
            "smsin",
        ] {
            assert!(filter.takes(taken), "{taken}");
        }
        for left in [
            "usage-alert",
            "Usage",
            "bondio.attachment",
            "bondio.esim.location_changed",
            "threshold_breached",
            "sms-out",
            "",
        ] {
            assert!(!filter.takes(left), "{left}");
        }
        let any = TypeFilter::new(&["*".to_string()]);
        assert!(any.takes("location") && any.takes(""));
        // Parts do not overlap: `a*a` needs two `a`s.
        let twice = TypeFilter::new(&["a*a".to_string()]);
        assert!(!twice.takes("a") && twice.takes("aa") && twice.takes("aba"));
    }

    #[test]
    fn delivery_ids_are_stable_distinct_and_sort_by_event_time() {
        let earlier = "019abf00-0000-7000-8000-000000000001";
        let later = "019abf00-0001-7000-8000-000000000000";
        let id = delivery_id(earlier, 0, 1, 0, "crm");
        assert_eq!(
            id,
            delivery_id(earlier, 0, 1, 0, "crm"),
            "derived, not drawn"
        );
        assert!(id.starts_with("dlv_019abf000000"), "{id}");
        assert_eq!(id.len(), 4 + 12 + 20);
        let others = [
            delivery_id(earlier, 1, 1, 0, "crm"),
            delivery_id(earlier, 0, 2, 0, "crm"),
            delivery_id(earlier, 0, 1, 1, "crm"),
            delivery_id(earlier, 0, 1, 0, "erp"),
        ];
        for other in &others {
            assert_ne!(&id, other);
        }
        // A later event's deliveries sort after an earlier one's, whatever their hashes.
        for (route, dest) in [(0, "a"), (1, "b"), (7, "zz")] {
            assert!(delivery_id(later, 0, route, 0, dest) > id);
        }
        assert!(delivery_id("not-a-uuid", 0, 0, 0, "crm").starts_with("dlv_"));
    }
}
