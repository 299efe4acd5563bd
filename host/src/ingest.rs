//! The ingest stage: `POST /v1/ingest/{source}` turns a request into an [`Event`], hands it
//! to the store, and answers `202 {"id": ...}` once the store has accepted it. (`GET` is
//! taken only as a sender's URL check, `challenge.query`.)

use axum::Json;
use axum::body::{Body as HttpBody, Bytes};
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;
use tracing::Instrument;

use crate::api::{ApiError, AppState};
use crate::config::{ChallengeReply, SourceConfig};
use crate::delivery::now_ms;
use crate::edge;
use crate::edge::VerifyConfig;
use crate::event::{Body, Event};
use crate::store::{Idempotency, Inserted, Limit, StoreError};

/// Accepts an event: `202` once it is committed to the store (it will not be lost). The
/// body is any bytes (JSON is parsed by plugins, not here). Counted in
/// `switchyard_events_received_total`.
#[utoipa::path(post, path = "/v1/ingest/{source}", tag = "ingest", security(()),
    params(
        ("source" = String, Path, description = "A configured source"),
        ("Idempotency-Key" = Option<String>, Header, description = "A repeat within the idempotency window answers 200 with the original id"),
    ),
    request_body(content = Object, description = "The sender's payload, stored as sent (decoded first if sent with `Content-Encoding: gzip` or `deflate`)", content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted and committed", body = crate::api::EventId),
        (status = 200, description = "A duplicate: the original event's id; or the answer to the sender's URL check (the source's `challenge`), not stored", body = Object),
        (status = 400, description = "A malformed `Idempotency-Key`, a body that cannot be read or decoded, or one that is not JSON to a source that `require_json`", body = crate::api::ErrorBody),
        (status = 401, description = "The signature check failed", body = crate::api::ErrorBody),
        (status = 403, description = "The sender's address, or its client certificate (or its lack of one), is not allowed", body = crate::api::ErrorBody),
        (status = 404, description = "No such source", body = crate::api::ErrorBody),
        (status = 408, description = "The body did not arrive within `body_read_timeout`", body = crate::api::ErrorBody),
        (status = 413, description = "The body, or its decoded form, is over `max_body_bytes`", body = crate::api::ErrorBody),
        (status = 415, description = "A `Content-Encoding` other than gzip, x-gzip, deflate or identity", body = crate::api::ErrorBody),
        (status = 429, description = "Over the source's `rate_limit`: try again after `Retry-After` seconds", body = crate::api::ErrorBody),
        (status = 503, description = "The queue is full, the store cannot write (e.g. a full disk) or the gateway is stopping: try again later (`Retry-After: 1`)", body = crate::api::ErrorBody),
    ))]
pub async fn ingest(
    State(state): State<Arc<AppState>>,
    Path(source): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let known = state.pipeline.routing().has_source(&source);
    // Unknown source names come from the client: one label for all, not one per name.
    let label = if known {
        source.clone()
    } else {
        "unknown".to_string()
    };
    let started = std::time::Instant::now();
    let (request, body) = request.into_parts();
    let result = accept(&state, source, request, body).await;
    let outcome = match &result {
        Ok(Answer::Duplicate(_)) => "duplicate",
        Ok(Answer::Challenge(_)) => "challenge",
        Ok(Answer::Accepted(_)) => {
            (state.metrics).accepted_after(&label, started.elapsed().as_secs_f64());
            "accepted"
        }
        Err(ApiError::NotFound(_)) => "rejected_unknown_source",
        Err(ApiError::PayloadTooLarge(_)) => "rejected_too_large",
        Err(ApiError::RequestTimeout(_)) => "rejected_timeout",
        Err(ApiError::BadRequest(_)) => "rejected_bad_request",
        Err(ApiError::InvalidJson(_)) => "rejected_invalid_json",
        Err(ApiError::Unavailable(_)) => "rejected_unavailable",
        Err(ApiError::Unauthorized(_)) => "rejected_signature",
        Err(ApiError::Forbidden(_)) => "rejected_address",
        Err(ApiError::CertificateDenied(_)) => "rejected_client_certificate",
        Err(ApiError::TokenDenied(_)) => "rejected_verify_token",
        Err(ApiError::RateLimited { .. }) => "rejected_rate_limited",
        Err(ApiError::UnsupportedEncoding(_)) => "rejected_unsupported_encoding",
        Err(ApiError::MethodNotAllowed { .. }) => "rejected_method",
        Err(_) => "rejected_error",
    };
    state.metrics.event(&label, outcome);
    if let (true, Err(e)) = (known, &result) {
        (state.metrics.refusals).record(&label, outcome, e);
    }
    result.map(|answer| match answer {
        Answer::Accepted(id) => (StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response(),
        Answer::Duplicate(original) => (
            StatusCode::OK,
            Json(json!({ "id": original, "duplicate": true })),
        )
            .into_response(),
        Answer::Challenge(ChallengeReply::Json(echo)) => {
            (StatusCode::OK, Json(echo)).into_response()
        }
        // (Text the sender chose, echoed: never to be read as anything but text.)
        Answer::Challenge(ChallengeReply::Text(echo)) => (
            StatusCode::OK,
            [
                (http::header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            echo,
        )
            .into_response(),
    })
}

/// Answers a sender's URL check by `GET` (Meta's and Strava's `hub.challenge`, Dropbox's
/// `challenge`): the source's `challenge.query` parameter echoed as text, once the sender's
/// address and client certificate pass the source's allowlists and its verify token
/// (`challenge.token_query`) equals `challenge.token`. Stores nothing; counted in
/// `switchyard_events_received_total` (`challenge`). Any other `GET` is `405`: events
/// come by `POST`.
#[utoipa::path(get, path = "/v1/ingest/{source}", tag = "ingest", security(()),
    params(("source" = String, Path, description = "A configured source")),
    responses(
        (status = 200, description = "The challenge of the query, echoed (`text/plain`, or JSON with `challenge.answer = \"json\"`)", body = String, content_type = "text/plain"),
        (status = 403, description = "The sender's address, or its client certificate, is not allowed; or the verify token is missing or wrong", body = crate::api::ErrorBody),
        (status = 404, description = "No such source", body = crate::api::ErrorBody),
        (status = 405, description = "Not a URL check this source answers: events come by `POST`", body = crate::api::ErrorBody),
    ))]
pub async fn ingest_check(
    state: State<Arc<AppState>>,
    source: Path<String>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    ingest(state, source, request).await
}

/// What ingest answers a request it takes.
enum Answer {
    /// Stored: the new event's id.
    Accepted(String),
    /// Seen before: the original event's id.
    Duplicate(String),
    /// A sender's URL check (`challenge`), answered and not stored.
    Challenge(ChallengeReply),
}

/// The requests to each source refused lately, by this instance since it started: shown
/// with the source (`GET /v1/sources`, the dashboard's routes page), so that a sender's
/// wrong secret or address is seen where its events would have been — a refused request
/// stores nothing. Kept for the sources in the config at the time (none for unknown names),
/// forgotten when a source is removed (`Metrics::forget_removed_sources`).
#[derive(Default)]
pub struct Refusals(std::sync::Mutex<std::collections::HashMap<String, SourceRefusals>>);

/// A source's refused requests.
#[derive(Clone, Debug, Default, serde::Serialize, utoipa::ToSchema)]
pub struct SourceRefusals {
    /// Requests refused since this instance started.
    pub total: u64,
    /// The latest, newest first (at most [`Refusals::KEPT`]).
    pub recent: Vec<Refusal>,
}

/// One refused request.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Refusal {
    /// When (milliseconds since the Unix epoch).
    pub at: u64,
    /// The status it was answered with.
    pub status: u16,
    /// Why, as `switchyard_events_received_total` counts it (`rejected_signature`, …).
    pub reason: String,
    /// What the sender was told.
    pub error: String,
}

impl Refusals {
    /// The refusals kept per source.
    pub const KEPT: usize = 10;

    fn record(&self, source: &str, reason: &str, error: &ApiError) {
        let refusal = Refusal {
            at: now_ms(),
            status: error.status().as_u16(),
            reason: reason.to_string(),
            error: error.to_string(),
        };
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let this = all.entry(source.to_string()).or_default();
        this.total += 1;
        this.recent.insert(0, refusal);
        this.recent.truncate(Self::KEPT);
    }

    /// Forgets the refusals of the sources `in_force` says are gone.
    pub fn retain(&self, in_force: impl Fn(&str) -> bool) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|source, _| in_force(source));
    }

    /// A source's refusals (none yet: zero and an empty list).
    pub fn of(&self, source: &str) -> SourceRefusals {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.get(source).cloned().unwrap_or_default()
    }
}

/// Checks and stores one request to `source`: its peer's address and client certificate
/// come with it from the accept loop (`serve.rs`).
async fn accept(
    state: &AppState,
    source: String,
    request: http::request::Parts,
    body: HttpBody,
) -> Result<Answer, ApiError> {
    let http::request::Parts {
        method,
        uri,
        mut headers,
        extensions,
        ..
    } = request;
    let Some(ConnectInfo(peer)) = extensions.get::<ConnectInfo<SocketAddr>>().copied() else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "the request came without its peer's address"
        )));
    };
    let client = extensions.get::<Arc<edge::ClientCertificate>>();
    let Some(sc) = state.pipeline.routing().source(&source).cloned() else {
        return Err(ApiError::NotFound(format!("no source named `{source}`")));
    };
    let config = state.reloader.config();
    let body = read_body(
        body,
        config.server.max_body_bytes,
        config.server.body_read_timeout,
    )
    .await?;
    // The edge: who may post here, and is it really them. Nothing is stored otherwise.
    let ip = edge::client_ip(peer.ip(), &headers, &config.server.trusted_proxies);
    edge::allowed(ip, sc.allow_ips.as_deref()).map_err(|e| {
        tracing::warn!(source, %ip, "Ingest refused: address not allowed.");
        ApiError::Forbidden(e.to_string())
    })?;
    edge::allowed_client(client.map(|c| c.as_ref()), sc.allow_client_names.as_deref()).map_err(
        |e| {
            tracing::warn!(source, %ip, reason = %e, "Ingest refused: client certificate not allowed.");
            ApiError::CertificateDenied(e.to_string())
        },
    )?;
    // A compressed body is decoded here, so that the signature check, the plugins, the
    // store and the deliveries all see the payload itself.
    let wire = body;
    let decoded = decode(&headers, &wire, config.server.max_body_bytes)
        .await
        .inspect_err(
            |e| tracing::warn!(source, %ip, reason = %e, "Ingest refused: cannot decode the body."),
        )?;
    let body = decoded.clone().unwrap_or_else(|| wire.clone());
    // A URL check in the query is answered before the signature check: its senders sign
    // nothing of it (a verify token, if the source has one, is its check).
    let query_check = (sc.challenge.as_ref()).and_then(|c| c.answer_query(uri.query()?));
    match query_check {
        Some(Ok(echo)) => {
            tracing::info!(
                source,
                "Ingest answered the sender's URL check (challenge)."
            );
            return Ok(Answer::Challenge(echo));
        }
        Some(Err(why)) => {
            tracing::warn!(source, %ip, reason = %why, "Ingest refused: a URL check's verify token.");
            return Err(ApiError::TokenDenied(why));
        }
        // (`GET`, or the `HEAD` the router takes with it: never an event.)
        None if method != http::Method::POST => {
            // (`Allow`: what this source takes — a GET only if it answers URL checks so.)
            return Err(match sc.challenge.as_ref().and_then(|c| c.query.as_ref()) {
                Some(q) => ApiError::MethodNotAllowed {
                    message: format!(
                        "events come by POST; a GET is answered only as a URL check, with `{q}` in its query"
                    ),
                    allow: "GET, POST",
                },
                None => ApiError::MethodNotAllowed {
                    message: "this source takes events by POST, and answers no URL check by GET \
                              (`challenge.query`)"
                        .into(),
                    allow: "POST",
                },
            });
        }
        None => {}
    }
    if let Some(verify) = &sc.verify {
        let now_s = now_ms() / 1000;
        // Senders sign the payload; one that signs the compressed bytes is let in too.
        let query = uri.query().unwrap_or("");
        let checked = verify
            .verify(&headers, query, &body, now_s)
            .or_else(|e| match decoded {
                Some(_) => verify.verify(&headers, query, &wire, now_s).map_err(|_| e),
                None => Err(e),
            });
        checked.map_err(|e| {
            tracing::warn!(source, %ip, reason = %e, "Ingest refused: signature check failed.");
            ApiError::Unauthorized(e.to_string())
        })?;
    }
    let body = stored_body(&sc, &mut headers, body);
    if let Some(why) = sc.refuses_body(&body) {
        tracing::warn!(source, %ip, reason = %why, "Ingest refused: the body is not JSON.");
        return Err(ApiError::InvalidJson(why));
    }
    // Only events that passed the checks count against the source's rate: others' bad
    // requests cannot use up a sender's share. The limit is the store's: instances on one
    // database share it.
    if let Some(rate) = sc.rate_limit {
        let now = now_ms();
        let slot = (state.store)
            .take_slot(Limit::Source(&source), now, rate)
            .await
            .map_err(|e| {
                tracing::error!(source, error = %e, "Cannot check the source's rate limit.");
                ApiError::Unavailable("the event could not be stored; try again later".into())
            })?;
        if slot > now {
            tracing::warn!(
                source,
                rate,
                "Ingest refused: over the source's rate limit."
            );
            return Err(ApiError::RateLimited {
                message: format!(
                    "source `{source}` is over its rate limit of {rate} events per second"
                ),
                retry_after_s: (slot - now).div_ceil(1000).max(1),
            });
        }
    }
    // A sender checking its URL (it passed the checks above) is answered, not stored.
    if let Some(echo) = sc.challenge.as_ref().and_then(|c| c.answer(&body)) {
        tracing::info!(
            source,
            "Ingest answered the sender's URL check (challenge)."
        );
        return Ok(Answer::Challenge(echo));
    }
    // The stored body is the decoded one.
    let keep =
        |name: &http::HeaderName| decoded.is_none() || name != http::header::CONTENT_ENCODING;
    let event = new_event(
        source,
        &method,
        &uri,
        &headers,
        keep,
        sc.verify.as_ref(),
        body,
    );
    let idempotency = idempotency_key(&sc, &event, &headers)?.map(|key| Idempotency {
        key,
        window_ms: config.server.idempotency_window.as_millis() as u64,
    });
    let id = event.id.clone();
    // The stage's span: what is logged from here on carries the event's id.
    let span = tracing::info_span!("ingest", event_id = %id, source = %event.source);
    async move {
        // (A sender that gives up waiting does not cut this short: see `api::see_through`.)
        let inserted = state.store.insert_event(event, idempotency).await;
        // Not stored (e.g. the disk is full): the sender should try again later, and learns
        // nothing of the store's insides; the log has the cause.
        let inserted = inserted.map_err(|e| match e {
            StoreError::Db(cause) => {
                tracing::error!(error = %cause, "Cannot store the event.");
                ApiError::Unavailable("the event could not be stored; try again later".into())
            }
            e => e.into(),
        })?;
        match inserted {
            Inserted::New => {
                tracing::debug!("Event accepted.");
                Ok(Answer::Accepted(id))
            }
            Inserted::Duplicate(original) => {
                tracing::info!(event_id = %original, "Duplicate event answered with the original id.");
                Ok(Answer::Duplicate(original))
            }
        }
    }
    .instrument(span)
    .await
}

/// The body as `source` stores it (once it passed `verify`, which checks it as it came): a
/// form as a JSON object of its fields with `form_as_json` — each value a string, a
/// repeated field's an array of its values in order — and `headers`' content type made
/// `application/json` to match; any other body as it is.
pub(crate) fn stored_body(source: &SourceConfig, headers: &mut HeaderMap, body: Bytes) -> Bytes {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if !source.form_as_json || !crate::edge::is_form(content_type) {
        return body;
    }
    use serde_json::map::Entry;
    let mut fields = serde_json::Map::new();
    for (name, value) in url::form_urlencoded::parse(&body) {
        let value = serde_json::Value::String(value.into_owned());
        match fields.entry(name.into_owned()) {
            Entry::Vacant(field) => {
                field.insert(value);
            }
            Entry::Occupied(mut field) => match field.get_mut() {
                serde_json::Value::Array(values) => values.push(value),
                first => *first = serde_json::Value::Array(vec![first.take(), value]),
            },
        }
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Bytes::from(serde_json::Value::Object(fields).to_string())
}

/// A new event (a fresh UUIDv7 id, received now) from a request to `source`, with the
/// headers `keep` keeps — and never the credential a source's `verify` checked as it came
/// (a `header` scheme's header, a `query` scheme's parameter): plugins, the event view and
/// destinations have no use for it. A `content-length` tells the stored body's length (a
/// decoded or `form_as_json` body's is not the request's).
pub(crate) fn new_event(
    source: String,
    method: &http::Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    keep: impl Fn(&http::HeaderName) -> bool,
    verify: Option<&VerifyConfig>,
    body: Bytes,
) -> Event {
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Event {
        id: uuid::Uuid::now_v7().to_string(),
        source,
        received_at: now_ms(),
        method: method.to_string(),
        path: uri.path().to_string(),
        query: VerifyConfig::kept_query(verify, uri.query().unwrap_or("")),
        headers: headers
            .iter()
            .filter(|(k, _)| keep(k) && VerifyConfig::keeps(verify, k))
            .map(|(k, v)| {
                let value = match k == http::header::CONTENT_LENGTH {
                    true => body.len().to_string(),
                    false => String::from_utf8_lossy(v.as_bytes()).into_owned(),
                };
                (k.as_str().to_string(), value)
            })
            .collect(),
        content_type,
        body: Body(body),
        metadata: Vec::new(),
        run: 0,
    }
}

/// Reads a whole body of at most `max` bytes within `deadline` (from the end of the
/// headers): a sender that trickles its body, or stops half-way, gets `408` instead of
/// holding the connection and its buffer for as long as it likes.
pub(crate) async fn read_body(
    body: HttpBody,
    max: usize,
    deadline: Duration,
) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, max)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let e = e.into_inner();
            if e.is::<http_body_util::LengthLimitError>() {
                Err(ApiError::PayloadTooLarge(max))
            } else {
                Err(ApiError::BadRequest(format!("cannot read the body: {e}")))
            }
        }
        Err(_) => Err(ApiError::RequestTimeout(deadline)),
    }
}

/// The `Content-Encoding`s an ingest body may come in (besides `identity`).
const ENCODINGS: &str = "gzip, x-gzip, deflate";
/// The most content codings one body may list.
const MAX_CODINGS: usize = 2;

/// Decodes a body sent with `Content-Encoding: gzip` or `deflate` (two in a row are
/// undone last first); `None` when it came as is. The decoded body is held to `max` bytes
/// like a plain one (`413`: a small compressed body cannot expand without bound); one
/// that does not decode is a `400`, an encoding the gateway does not know a `415`.
pub(crate) async fn decode(
    headers: &HeaderMap,
    wire: &Bytes,
    max: usize,
) -> Result<Option<Bytes>, ApiError> {
    let mut codings = Vec::new();
    for value in headers.get_all(axum::http::header::CONTENT_ENCODING) {
        let value = value
            .to_str()
            .map_err(|_| ApiError::BadRequest("a malformed `Content-Encoding` header".into()))?;
        for coding in value.split(',').map(|c| c.trim().to_ascii_lowercase()) {
            match coding.as_str() {
                "" | "identity" => {}
                "gzip" | "x-gzip" | "deflate" => codings.push(coding),
                other => {
                    return Err(ApiError::UnsupportedEncoding(format!(
                        "`Content-Encoding: {other}` is not supported; send the body as is or in {ENCODINGS}"
                    )));
                }
            }
        }
    }
    if codings.is_empty() {
        return Ok(None);
    }
    // Each coding may inflate up to `max` bytes: a long chain of them would be a lot of
    // work for one small body, and no sender needs more than two.
    if codings.len() > MAX_CODINGS {
        return Err(ApiError::BadRequest(format!(
            "`Content-Encoding` lists {} codings; at most {MAX_CODINGS} are decoded",
            codings.len()
        )));
    }
    let undo = move |wire: Bytes| {
        let mut body = wire;
        for coding in codings.iter().rev() {
            body = inflate(coding, &body, max)?;
        }
        Ok(Some(body))
    };
    // Inflating a large body takes milliseconds of CPU: off the async workers. A small
    // one (most webhooks) takes microseconds, less than the hand-off to another thread.
    if wire.len() <= INFLATE_INLINE {
        return undo(wire.clone());
    }
    let wire = wire.clone();
    (tokio::task::spawn_blocking(move || undo(wire)).await)
        .map_err(|e| ApiError::Internal(e.into()))?
}

/// Compressed bodies up to this size are inflated on the async worker that read them.
const INFLATE_INLINE: usize = 16 * 1024;

/// Undoes one content coding, reading at most `max` bytes of its output.
fn inflate(coding: &str, input: &[u8], max: usize) -> Result<Bytes, ApiError> {
    use flate2::read::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
    use std::io::Read;
    fn read_all(decoder: impl Read, max: usize) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        decoder.take(max as u64 + 1).read_to_end(&mut out)?;
        Ok(out)
    }
    let out = match coding {
        "deflate" => {
            // `deflate` is meant to be zlib-wrapped (RFC 9110); some senders send the raw
            // stream, which is what it then is.
            read_all(ZlibDecoder::new(input), max)
                .or_else(|_| read_all(DeflateDecoder::new(input), max))
        }
        _ => read_all(MultiGzDecoder::new(input), max),
    }
    .map_err(|e| ApiError::BadRequest(format!("cannot decode the body as {coding}: {e}")))?;
    if out.len() > max {
        return Err(ApiError::PayloadTooLarge(max));
    }
    Ok(Bytes::from(out))
}

/// The event's idempotency key: the `Idempotency-Key` header, or else the source's
/// provider header (`idempotency_header`, `webhook-id` for a Standard Webhooks source), or
/// else its JSON field (`idempotency_field`).
fn idempotency_key(
    source: &crate::config::SourceConfig,
    event: &Event,
    headers: &HeaderMap,
) -> Result<Option<String>, ApiError> {
    if let Some(v) = headers.get("idempotency-key") {
        let key = v
            .to_str()
            .map_err(|_| ApiError::BadRequest("`Idempotency-Key` must be visible ASCII".into()))?;
        if key.is_empty() || key.len() > 255 {
            return Err(ApiError::BadRequest(
                "`Idempotency-Key` must be 1 to 255 characters".into(),
            ));
        }
        return Ok(Some(key.to_string()));
    }
    let standard = matches!(
        source.verify,
        Some(crate::edge::VerifyConfig::StandardWebhooks { .. })
    );
    let header = (source.idempotency_header.as_deref()).or(standard.then_some("webhook-id"));
    if let Some(value) = header
        .and_then(|h| headers.get(h))
        .filter(|v| !v.is_empty())
    {
        return Ok(Some(provider_key(value.as_bytes())));
    }
    Ok((source.idempotency_field.as_ref()).and_then(|f| field_key(f, &event.body.0)))
}

/// The key the body's `idempotency_field` values make: one field's string or number as it
/// is (see `provider_key`), several fields' as a JSON array of their texts (`["ord-1","2"]`,
/// then as one value); none if a field is missing or not a string, number or boolean.
fn field_key(field: &crate::config::IdempotencyField, body: &[u8]) -> Option<String> {
    use crate::config::IdempotencyField;
    use serde_json::Value;
    let body: Value = serde_json::from_slice(body).ok()?;
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(number_text(n)),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let fields = field.fields();
    if let [one] = fields {
        return match IdempotencyField::value(&body, one)? {
            Value::String(s) => Some(provider_key(s.as_bytes())),
            other => text(other),
        };
    }
    let parts = (fields.iter())
        .map(|f| IdempotencyField::value(&body, f).and_then(text))
        .collect::<Option<Vec<String>>>()?;
    Some(provider_key(
        serde_json::to_string(&parts).unwrap_or_default().as_bytes(),
    ))
}

/// A number as its key's text, by value: `2`, `2.0` and `2e0` alike (`2`); others as their
/// shortest form (`1.5`).
fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        // (Whole numbers up to 2^53 are exact as f64, and print without a fraction.)
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 => {
            format!("{}", f as i64)
        }
        _ => n.to_string(),
    }
}

/// A body field's or a provider header's value as an idempotency key: itself where an
/// `Idempotency-Key` could be it (at most 255 bytes of text, no control characters), else
/// `sha256:` and its digest — the same value still gives the same key, and one every store
/// can keep (PostgreSQL's text holds no NUL, nor its B-tree an entry much over 2 KB). The
/// event is never refused for it: the sender did not choose the value as a key, its
/// provider did.
fn provider_key(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) if text.len() <= 255 && !text.chars().any(char::is_control) => text.into(),
        _ => {
            use sha2::Digest;
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(value)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_fields_make_keys_of_one_value_or_several() {
        use crate::config::IdempotencyField::{One, Several};
        let order = br#"{"OrderId":"ord-1","State":2,"Done":false,"data":{"id":"d-7","n":null}}"#;
        let key = |f| field_key(&f, order);
        assert_eq!(key(One("OrderId".into())).as_deref(), Some("ord-1"));
        assert_eq!(key(One("/data/id".into())).as_deref(), Some("d-7"));
        assert_eq!(key(One("State".into())).as_deref(), Some("2"));
        let both = Several(vec!["/OrderId".into(), "State".into()]);
        assert_eq!(key(both).as_deref(), Some(r#"["ord-1","2"]"#));
        let three = Several(vec!["/OrderId".into(), "/State".into(), "/Done".into()]);
        assert_eq!(key(three).as_deref(), Some(r#"["ord-1","2","false"]"#));
        // A part missing, null or not a scalar: no key (the event is stored as any other).
        for missing in ["/nope", "/data/n", "/data"] {
            let f = Several(vec!["/OrderId".into(), missing.into()]);
            assert_eq!(key(f), None, "{missing}");
        }
        assert_eq!(key(One("data".into())), None);
        // Numbers by value: a sender writing 2 once and 2.0 the next time sends one order.
        for same in [br#"{"n":2}"#.as_slice(), br#"{"n":2.0}"#, br#"{"n":2e0}"#] {
            assert_eq!(field_key(&One("n".into()), same).as_deref(), Some("2"));
        }
        let parts = Several(vec!["id".into(), "n".into()]);
        assert_eq!(
            field_key(&parts, br#"{"id":"a","n":1.50}"#).as_deref(),
            Some(r#"["a","1.5"]"#)
        );
        assert_eq!(field_key(&One("id".into()), b"not json"), None);
        // A long value is keyed by its digest, one value or several alike.
        let long = format!(r#"{{"id":"{}","n":1}}"#, "x".repeat(300));
        let by_digest = |f| field_key(&f, long.as_bytes()).unwrap();
        assert!(by_digest(One("id".into())).starts_with("sha256:"));
        assert!(by_digest(Several(vec!["id".into(), "n".into()])).starts_with("sha256:"));
    }

    #[test]
    fn a_source_keeps_its_latest_refusals_newest_first() {
        let refusals = Refusals::default();
        for n in 0..Refusals::KEPT + 2 {
            let e = ApiError::Unauthorized(format!("refusal {n}"));
            refusals.record("s", "rejected_signature", &e);
        }
        let s = refusals.of("s");
        assert_eq!(s.total, Refusals::KEPT as u64 + 2);
        assert_eq!(s.recent.len(), Refusals::KEPT);
        assert_eq!(s.recent[0].error, format!("refusal {}", Refusals::KEPT + 1));
        assert_eq!(s.recent[0].status, 401);
        assert_eq!(refusals.of("other").total, 0);
    }
}
