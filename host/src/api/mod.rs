//! The HTTP edge: the axum router, the one JSON error type, and the operator endpoints
//! (events, deliveries, plugins, reload). Ingest has its own module; sources, destinations
//! and routes are in [`objects`].
//!
//! The management API is a public contract: every handler carries a `#[utoipa::path]`
//! annotation and is registered through [`utoipa_axum::routes!`], so the OpenAPI document
//! served at `/v1/openapi.json` is generated from the same code that serves the routes.

pub mod counts;
mod dry_run;
pub use dry_run::DryRun;
pub(crate) use dry_run::ingest_uri;
pub mod objects;
pub mod stats;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::delivery::{Dispatcher, RestartError, TestOutcome};
use crate::ingest;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::reload::Reloader;
use crate::store::{
    DeliveryRecord, DeliveryStatus, DestinationHealth, EventFilter, EventRecord, EventStatus,
    EventSummary, FieldMatch, RouteResultKind, StateEntry, Store, StoreError,
};

/// What every handler can reach.
pub struct AppState {
    pub pipeline: Arc<Pipeline>,
    pub store: Arc<dyn Store>,
    pub dispatcher: Arc<Dispatcher>,
    pub reloader: Arc<Reloader>,
    pub metrics: Arc<Metrics>,
    /// The per-minute counts of minutes that are over, for `GET /v1/stats`.
    pub minutes: Arc<stats::MinuteCache>,
    /// The deliveries waiting and failed per destination, for the destination views.
    pub counts: Arc<counts::CountsCache>,
}

/// The OpenAPI document's frame; the paths come from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Switchyard",
        description = "Webhook router with WebAssembly plugins: ingest and management API. \
            Everything under /v1 except ingest requires `Authorization: Bearer <token>`.",
    ),
    security(("bearer" = [])),
    modifiers(&BearerAuth),
    tags(
        (name = "ingest", description = "Where senders post events"),
        (name = "events", description = "Stored events and their history"),
        (name = "sources", description = "Names senders post to"),
        (name = "destinations", description = "Where deliveries go"),
        (name = "routes", description = "Plugin chains from a source to destinations"),
        (name = "deliveries", description = "The delivery log"),
        (name = "plugins", description = "Loaded plugins and reloads"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The OpenAPI 3 document of the HTTP API, as served at `/v1/openapi.json`.
pub fn openapi() -> serde_json::Value {
    finish_doc(api_router().split_for_parts().1)
}

/// The generated document with one correction: a view (`SourceView`, …) is its config
/// object plus read-only fields, but the config object's schema forbids other properties
/// (it is also the request body, where unknown fields are rejected). Wherever a schema
/// combines such an object with more fields (`allOf`), the object's properties are inlined
/// without that restriction.
fn finish_doc(doc: utoipa::openapi::OpenApi) -> serde_json::Value {
    let mut doc = serde_json::to_value(doc).expect("the OpenAPI document serializes");
    let schemas = doc["components"]["schemas"].clone();
    open_all_of(&mut doc, &schemas);
    document_the_token(&mut doc);
    doc
}

/// Every operation behind [`require_token`] (the same rule: `/v1/` but ingest) answers 401
/// without a valid token, each that is not a read 403 to a read token, and each 400 to a
/// NUL in its URL (`has_nul`); said once here rather than on each handler.
fn document_the_token(doc: &mut serde_json::Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        if !guarded(path) {
            continue;
        }
        for (method, operation) in item.as_object_mut().into_iter().flatten() {
            operation["responses"]["401"] = json!({
                "description": "Missing or invalid bearer token",
                "content": { "application/json": {
                    "schema": { "$ref": "#/components/schemas/ErrorBody" }
                } }
            });
            if operation["responses"].get("400").is_none() {
                operation["responses"]["400"] = json!({
                    "description": "A NUL (`%00`) in the URL's path or query",
                    "content": { "application/json": {
                        "schema": { "$ref": "#/components/schemas/ErrorBody" }
                    } }
                });
            }
            // What changes anything is refused to a read token.
            if !matches!(method.as_str(), "get" | "head") {
                operation["responses"]["403"] = json!({
                    "description": "A read token (`api.read_tokens`) may only read",
                    "content": { "application/json": {
                        "schema": { "$ref": "#/components/schemas/ErrorBody" }
                    } }
                });
            }
        }
    }
}

/// Whether a path needs the bearer token.
fn guarded(path: &str) -> bool {
    path.starts_with("/v1/") && !path.starts_with("/v1/ingest/")
}

fn open_all_of(value: &mut serde_json::Value, schemas: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(parts)) = map.get_mut("allOf")
                && parts.len() > 1
            {
                for part in parts.iter_mut() {
                    let target = part
                        .get("$ref")
                        .and_then(Value::as_str)
                        .and_then(|r| r.strip_prefix("#/components/schemas/"))
                        .and_then(|r| schemas.get(r));
                    if let Some(Value::Object(target)) = target {
                        let mut inline = target.clone();
                        inline.remove("additionalProperties");
                        *part = Value::Object(inline);
                    }
                }
            }
            for v in map.values_mut() {
                open_all_of(v, schemas);
            }
        }
        Value::Array(items) => {
            for v in items {
                open_all_of(v, schemas);
            }
        }
        _ => {}
    }
}

/// Every documented route; the bearer-token gate is added by [`router`].
fn api_router() -> OpenApiRouter<Arc<AppState>> {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    OpenApiRouter::with_openapi(doc)
        .routes(routes!(ingest::ingest, ingest::ingest_check))
        .routes(routes!(list_events))
        .routes(routes!(get_event, erase_event))
        .routes(routes!(replay_event))
        .routes(routes!(dry_run::dry_run_event))
        .routes(routes!(replay_events))
        .routes(routes!(erase_events))
        .routes(routes!(objects::list_sources, objects::create_source))
        .routes(routes!(
            objects::get_source,
            objects::patch_source,
            objects::delete_source
        ))
        .routes(routes!(dry_run::dry_run))
        .routes(routes!(
            objects::list_destinations,
            objects::create_destination
        ))
        .routes(routes!(
            objects::get_destination,
            objects::patch_destination,
            objects::delete_destination
        ))
        .routes(routes!(restart_destination))
        .routes(routes!(pause_destination))
        .routes(routes!(test_destination))
        .routes(routes!(recover_destination))
        .routes(routes!(objects::list_routes, objects::create_route))
        .routes(routes!(
            objects::get_route,
            objects::patch_route,
            objects::delete_route
        ))
        .routes(routes!(list_deliveries))
        .routes(routes!(retry_delivery))
        .routes(routes!(stats::stats))
        .routes(routes!(list_plugins))
        .routes(routes!(list_plugin_state, delete_plugin_state))
        .routes(routes!(list_tables))
        .routes(routes!(reload))
}

/// Builds the gateway's router.
pub fn router(state: AppState) -> Router {
    // One `Arc` for the whole state: axum clones the state for each request (and the token
    // gate again), which is one count to change rather than one per field.
    let state = Arc::new(state);
    let (documented, doc) = api_router().split_for_parts();
    let doc = Arc::new(finish_doc(doc));
    let management = Router::new()
        .route(
            "/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .merge(documented);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::ui::routes())
        .merge(management)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(see_through))
        .layer(compression())
        .with_state(state)
}

/// A request that may change something (any method but `GET`, `HEAD` and `OPTIONS`) runs to
/// its end even if its client goes away — a sender's timeout while the disk stalls, a
/// closed tab: cut off between a commit and what follows it in memory, an event would be
/// stored but not queued (ingest, a replay), unprocessed until the next start, or a change
/// stored but not applied. Its handler is a task of its own, which the connection only
/// waits for; what it did is counted and logged as if the client had stayed. (A panic in
/// it is a `500`, not a dropped connection.) Reads are cut off as before.
async fn see_through(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return next.run(request).await;
    }
    let handler = tokio::spawn(tracing::Instrument::in_current_span(next.run(request)));
    match handler.await {
        Ok(response) => response,
        Err(e) => {
            ApiError::Internal(anyhow::anyhow!("the request's handler failed: {e}")).into_response()
        }
    }
}

/// Gzip for answers of 1 KiB or more to clients that accept it — `/metrics` of many
/// destinations is megabytes of text, and the dashboard polls event lists — at the fastest
/// level: a few bytes saved are not worth the CPU. Ingest's answers are smaller.
fn compression() -> tower_http::compression::CompressionLayer<
    tower_http::compression::predicate::And<
        tower_http::compression::DefaultPredicate,
        tower_http::compression::predicate::SizeAbove,
    >,
> {
    use tower_http::compression::predicate::{Predicate, SizeAbove};
    use tower_http::compression::{CompressionLayer, CompressionLevel, DefaultPredicate};
    CompressionLayer::new()
        .quality(CompressionLevel::Fastest)
        .compress_when(DefaultPredicate::new().and(SizeAbove::new(1024)))
}

/// The management API's gate: `Authorization: Bearer <token>` with a configured token,
/// compared in constant time, for every path under `/v1/` but ingest; a read token
/// (`api.read_tokens`) only for `GET` and `HEAD`.
async fn require_token(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !guarded(request.uri().path()) {
        return next.run(request).await;
    }
    let config = state.reloader.config();
    let api = &config.api;
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let among = |tokens: &[String]| {
        given.is_some_and(|g| {
            tokens
                .iter()
                .any(|t| bool::from(t.as_bytes().ct_eq(g.as_bytes())))
        })
    };
    let writes = among(&api.tokens);
    if writes || among(&api.read_tokens) {
        if !writes && !matches!(*request.method(), Method::GET | Method::HEAD) {
            return ApiError::Forbidden(
                "this token may only read: changes need one of [api] tokens".into(),
            )
            .into_response();
        }
        if has_nul(request.uri()) {
            return ApiError::BadRequest(
                "NUL characters (`%00`) are not allowed in the URL".into(),
            )
            .into_response();
        }
        return next.run(request).await;
    }
    let message = if api.tokens.is_empty() && api.read_tokens.is_empty() {
        "the management API is disabled: configure [api] tokens"
    } else {
        "missing or invalid bearer token"
    };
    let mut response = ApiError::Unauthorized(message.into()).into_response();
    response.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Whether a request's path or query holds a NUL once percent-decoded (a raw one never
/// gets past the HTTP parser). No name, id or stored text can hold one, and PostgreSQL's
/// text cannot take one as a parameter: refused with `400` before it reaches the store.
fn has_nul(uri: &axum::http::Uri) -> bool {
    uri.path().contains("%00") || uri.query().is_some_and(|q| q.contains("%00"))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the store answers (plugins are loaded before the gateway listens), has not
/// stopped storing the events waiting for it, and has not just refused one. The question
/// asked is the smallest the store has (one row per destination): a probe must stay fast
/// however many deliveries wait.
async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some((events, unanswered)) = state.store.storing()
        && unanswered >= STORE_STALLED_AFTER
    {
        return Err(ApiError::Unavailable(format!(
            "not ready: the store has stored none of the {events} events waiting for it for {} s",
            unanswered.as_secs()
        )));
    }
    if let Some((ago, cause)) = state.store.refused() {
        return Err(ApiError::Unavailable(format!(
            "not ready: the store refused the latest event {} s ago ({cause}); ready again once it stores one, or {} s after it refused",
            ago.as_secs(),
            crate::store::REFUSAL_REMEMBERED.as_secs()
        )));
    }
    // (A hung database would hold the probe as long as the prober waits.)
    match tokio::time::timeout(STORE_BUDGET, state.store.destination_states()).await {
        Ok(Ok(_)) => Ok(Json(json!({ "ready": true }))),
        Ok(Err(e)) => Err(ApiError::Unavailable(format!("not ready: {e}"))),
        Err(_) => Err(ApiError::Unavailable(format!(
            "not ready: the store did not answer within {} s",
            STORE_BUDGET.as_secs()
        ))),
    }
}

/// A store that has stored none of the events waiting for it for this long has stopped
/// answering (a stalled disk, a hung database): `/readyz` says not ready, so that a load
/// balancer sends senders to another instance. (A commit takes milliseconds.)
const STORE_STALLED_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// How long `/readyz` waits for the store, and a scrape of `/metrics` for the store's
/// backlog counts.
const STORE_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

/// Prometheus text format. Gauges are read from the store and the dispatcher here.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    m.queue_depth.set(state.store.queue_depth() as i64);
    let unanswered = state
        .store
        .storing()
        .map_or(0, |(_, waited)| waited.as_secs());
    m.store_unanswered_seconds.set(unanswered as i64);
    // A store that does not answer (a hung database) leaves these as they were, and the
    // scrape goes on: `switchyard_store_unanswered_seconds` tells of it.
    if let Ok(Ok((pending, oldest))) =
        tokio::time::timeout(STORE_BUDGET, state.store.backlog()).await
    {
        m.pending_deliveries.set(pending as i64);
        let now = state.dispatcher.now_ms();
        m.oldest_pending_seconds
            .set(oldest.map_or(0, |at| now.saturating_sub(at) / 1000) as i64);
    }
    let config = state.reloader.config();
    let states = config.destinations.iter().map(|d| {
        let current = match state.dispatcher.state(&d.name).state {
            DestinationHealth::Active => "ACTIVE",
            DestinationHealth::Failed => "FAILED",
            DestinationHealth::Disabled => "DISABLED",
        };
        (d.name.clone(), current)
    });
    m.set_destination_states(states);
    let routing = state.pipeline.routing();
    m.forget_removed_sources(|s| routing.has_source(s));
    m.forget_removed_routes(&config);
    let plugins = state.pipeline.plugins().snapshot();
    m.forget_removed_plugins(|p| plugins.contains_key(p));
    m.set_certificate_expiries(config.certificates(&state.dispatcher.certificates()));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventQuery {
    /// Only events of this source.
    source: Option<String>,
    /// Only `queued` or `processed` events.
    status: Option<EventStatus>,
    /// Only events whose body's top-level `type` (or `event_type`) is this, or matches it
    /// with `*` standing for any characters (`attachment.*`).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    event_type: Option<String>,
    /// Received at or after (ms since the Unix epoch).
    since: Option<u64>,
    /// Received before (ms since the Unix epoch).
    until: Option<u64>,
    /// Only events with a route of this result in their latest run: `failed` lists the
    /// dead-lettered ones.
    route_result: Option<RouteResultKind>,
    /// With `equals`: only events whose body (a JSON object) has this field — object keys
    /// separated by dots, e.g. `iccid` or `data.iccid` — equal to `equals`: a string by its
    /// text, a number by value (`1.5` = `1.50`), `true`/`false`/`null` by name. Each body
    /// is read unless the field is listed in `store.indexed_fields`.
    field: Option<String>,
    /// With `field`: the text the field must equal (a string's value, a number as written).
    equals: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Items per page: 1 to 500, 50 by default.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
}

/// Events, newest first, with their delivery counts; filter by source, status, type and
/// time. To find one event by id, `GET /v1/events/{id}`.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(EventQuery),
    responses(
        (status = 200, description = "A page of events", body = Page<EventSummary>),
        (status = 400, description = "A malformed parameter, named", body = ErrorBody),
        (status = 422, description = "Stopped after 5 s: the filters match little of a large store; narrow them with since and until", body = ErrorBody),
    ))]
async fn list_events(
    State(state): State<Arc<AppState>>,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page<EventSummary>>, ApiError> {
    let Query(q) = query?;
    let (items, next_cursor) = event_page(&state, q).await?;
    Ok(Json(Page { items, next_cursor }))
}

/// The page of events a query asks for, and the cursor of the next.
async fn event_page(
    state: &AppState,
    q: EventQuery,
) -> Result<(Vec<EventSummary>, Option<String>), ApiError> {
    let limit = page_limit(q.limit)?;
    let after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(
            c.split_once('_')
                .and_then(|(at, id)| Some((at.parse::<u64>().ok()?, id.to_string())))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("`cursor`: `{c}` is not a cursor from this API"))
                })?,
        ),
    };
    let field = match (q.field, q.equals) {
        (None, None) => None,
        (Some(field), Some(equals)) => Some(
            FieldMatch::parse(&field, equals)
                .map_err(|e| ApiError::BadRequest(format!("`field`: {e}")))?,
        ),
        (Some(_), None) => return Err(ApiError::BadRequest("`field` needs `equals`".into())),
        (None, Some(_)) => return Err(ApiError::BadRequest("`equals` needs `field`".into())),
    };
    let filter = EventFilter {
        source: q.source,
        status: q.status,
        event_type: q.event_type,
        since: q.since,
        until: q.until,
        route_result: q.route_result,
        field,
    };
    let mut items = state.store.list_events(filter, after, limit + 1).await?;
    let next_cursor = (items.len() > limit).then(|| {
        let last = &items[limit - 1];
        format!("{}_{}", last.received_at, last.id)
    });
    items.truncate(limit);
    Ok((items, next_cursor))
}

/// How many replays of a bulk replay are in flight at once.
const REPLAY_CONCURRENCY: usize = 64;

/// The events a bulk replay queued again.
#[derive(Serialize, ToSchema)]
struct Replayed {
    /// Their ids, in the list's order (newest first).
    replayed: Vec<String>,
    /// Replays the next page of the same query when passed as `cursor`; `null` on the last.
    next_cursor: Option<String>,
}

/// Replays, page by page, the events `GET /v1/events` lists for the same query — after
/// fixing a plugin, `?route_result=failed` runs the events it dead-lettered through the
/// current plugins again. Each call replays one page (`limit`, at most 500) and answers
/// with the cursor of the next.
#[utoipa::path(post, path = "/v1/events/replay", tag = "events",
    params(EventQuery),
    responses(
        (status = 202, description = "Queued again", body = Replayed),
        (status = 400, description = "A malformed parameter, named", body = ErrorBody),
        (status = 422, description = "Listing the page stopped after 5 s: narrow the filters with since and until", body = ErrorBody),
        (status = 503, description = "The queue has no room for the page: try again later", body = ErrorBody),
    ))]
async fn replay_events(
    State(state): State<Arc<AppState>>,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(StatusCode, Json<Replayed>), ApiError> {
    let Query(q) = query?;
    let (items, next_cursor) = event_page(&state, q).await?;
    // The page as a whole, or none of it: in number and in bytes.
    let bytes = items.iter().map(|e| e.queued_bytes as usize).sum();
    if let Err(full) = state.store.queue_fits(items.len(), bytes) {
        return Err(ApiError::Unavailable(format!(
            "the queue has no room for these {} events ({bytes} bytes): {full}",
            items.len()
        )));
    }
    // Many at once, so that the store commits them in groups (one at a time, each waits
    // for a sync of its own).
    let replays: Vec<(String, Result<bool, StoreError>)> = futures_util::stream::iter(items)
        .map(|e| {
            let store = state.store.clone();
            async move {
                let done = store.replay(&e.id).await;
                (e.id, done)
            }
        })
        .buffered(REPLAY_CONCURRENCY)
        .collect()
        .await;
    let mut replayed = Vec::with_capacity(replays.len());
    for (id, done) in replays {
        // Gone meanwhile (purged): nothing to replay. An error answers the call; what was
        // replayed before it no longer matches `route_result=failed` until it fails again.
        if done? {
            replayed.push(id);
        }
    }
    tracing::info!(events = replayed.len(), "Events replayed in bulk.");
    Ok((
        StatusCode::ACCEPTED,
        Json(Replayed {
            replayed,
            next_cursor,
        }),
    ))
}

/// The events a bulk erasure erased, and those it left for now.
#[derive(Serialize, ToSchema)]
struct ErasedPage {
    /// The ids of the events erased, with their deliveries and attempts.
    erased: Vec<String>,
    /// Events of the page still being processed, or with a delivery on its way: left as
    /// they are; the same call again once they settle erases them.
    busy: Vec<String>,
    /// Erases the next page of the same query when passed as `cursor`; `null` on the last.
    next_cursor: Option<String>,
}

/// Erases for good, page by page, the events `GET /v1/events` lists for the same query —
/// a person's or a device's data on request: `?field=iccid&equals=8945…` (with the field
/// in `store.indexed_fields`, only that SIM's events are read). Each event goes with its
/// route outcomes, deliveries (pending ones are not sent) and attempts. One page per call
/// (`limit`, at most 500), answered with the cursor of the next; an event still being
/// processed or delivered is left and named in `busy`. A query must narrow the list (a
/// source, a type, a field, a time or a route result): this is not how to empty a store.
#[utoipa::path(post, path = "/v1/events/erase", tag = "events",
    params(EventQuery),
    responses(
        (status = 200, description = "The page erased", body = ErasedPage),
        (status = 400, description = "A malformed parameter, named, or no filter at all", body = ErrorBody),
        (status = 422, description = "Listing the page stopped after 5 s: narrow the filters with since and until", body = ErrorBody),
    ))]
async fn erase_events(
    State(state): State<Arc<AppState>>,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ErasedPage>, ApiError> {
    let Query(q) = query?;
    let narrowed = q.source.is_some()
        || q.event_type.is_some()
        || q.field.is_some()
        || q.since.is_some()
        || q.until.is_some()
        || q.route_result.is_some();
    if !narrowed {
        return Err(ApiError::BadRequest(
            "name the events to erase: `source`, `type`, `field` and `equals`, `since`, \
             `until` or `route_result` (retention purges the rest)"
                .into(),
        ));
    }
    let (items, next_cursor) = event_page(&state, q).await?;
    let ids = items.into_iter().map(|e| e.id).collect();
    let erased = state
        .store
        .erase_events(ids, state.dispatcher.now_ms())
        .await?;
    tracing::info!(
        events = erased.erased.len(),
        busy = erased.busy.len(),
        "Events erased in bulk."
    );
    Ok(Json(ErasedPage {
        erased: erased.erased,
        busy: erased.busy,
        next_cursor,
    }))
}

/// Erases one event for good, with its route outcomes, deliveries (pending ones are not
/// sent) and attempts.
#[utoipa::path(delete, path = "/v1/events/{id}", tag = "events",
    params(("id" = String, Path, description = "The event id from ingest")),
    responses(
        (status = 204, description = "Erased"),
        (status = 404, description = "No such event", body = ErrorBody),
        (status = 409, description = "Still being processed, or a delivery is on its way: try again in a moment", body = ErrorBody),
    ))]
async fn erase_event(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let erased = (state.store)
        .erase_events(vec![id.clone()], state.dispatcher.now_ms())
        .await?;
    if !erased.busy.is_empty() {
        return Err(ApiError::Conflict(format!(
            "event `{id}` is being processed or delivered: try again in a moment"
        )));
    }
    if erased.erased.is_empty() {
        return Err(ApiError::NotFound(format!("no event `{id}`")));
    }
    tracing::info!(event_id = id, "Event erased.");
    Ok(StatusCode::NO_CONTENT)
}

/// An event with its route outcomes, deliveries and attempts. The request's credential
/// headers (`authorization`, `cookie`, names with `api-key`, `token`, `secret`,
/// `password`) are shown redacted.
#[utoipa::path(get, path = "/v1/events/{id}", tag = "events",
    params(("id" = String, Path, description = "The event id from ingest")),
    responses(
        (status = 200, description = "The event", body = EventRecord),
        (status = 404, description = "No such event", body = ErrorBody),
    ))]
async fn get_event(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<EventRecord>, ApiError> {
    let mut record = state
        .store
        .get_event(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no event with id `{id}`")))?;
    // The sender's credentials are kept (plugins see them, a replay has them) but not
    // shown: `****` and at most the last four characters, as for the API's own secrets.
    for (name, value) in record.event.headers.iter_mut() {
        if credential_header(name) {
            *value = crate::managed::redact(value);
        }
    }
    Ok(Json(record))
}

/// Request headers that carry a sender's credentials.
pub(crate) fn credential_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "authorization" | "proxy-authorization" | "cookie"
    ) || ["api-key", "apikey", "token", "secret", "password"]
        .iter()
        .any(|s| name.contains(s))
}

/// Runs a stored event through the current plugins again; its new deliveries get new ids.
#[utoipa::path(post, path = "/v1/events/{id}/replay", tag = "events",
    params(("id" = String, Path, description = "The event id from ingest")),
    responses(
        (status = 202, description = "Queued again", body = EventId),
        (status = 404, description = "No such event", body = ErrorBody),
        (status = 503, description = "The queue is full or the gateway is stopping", body = ErrorBody),
    ))]
async fn replay_event(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<EventId>), ApiError> {
    if state.store.replay(&id).await? {
        Ok((StatusCode::ACCEPTED, Json(EventId { id })))
    } else {
        Err(ApiError::NotFound(format!("no event with id `{id}`")))
    }
}

/// The answer to a restart or a pause: the destination's state now.
#[derive(Serialize, ToSchema)]
struct Restarted {
    name: String,
    state: DestinationHealth,
}

/// Sends a test message; if it succeeds, the destination is ACTIVE again and its queued
/// deliveries are sent.
#[utoipa::path(post, path = "/v1/destinations/{name}/restart", tag = "destinations",
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "ACTIVE again", body = Restarted),
        (status = 404, description = "No such destination", body = ErrorBody),
        (status = 409, description = "The test message failed; the state is unchanged", body = ErrorBody),
    ))]
async fn restart_destination(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Restarted>, ApiError> {
    let s = state.dispatcher.restart(&name).await?;
    Ok(Json(Restarted {
        name: s.name,
        state: s.state,
    }))
}

/// Pauses a destination (a receiver's maintenance window): DISABLED, its deliveries held —
/// events are still taken in and routed — until `restart` (a test message, then ACTIVE and
/// what waited sent). No retry is spent meanwhile, and the other destinations go on.
#[utoipa::path(post, path = "/v1/destinations/{name}/pause", tag = "destinations",
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "DISABLED, its deliveries held until a restart", body = Restarted),
        (status = 404, description = "No such destination", body = ErrorBody),
    ))]
async fn pause_destination(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Restarted>, ApiError> {
    let s = state.dispatcher.pause(&name).await?;
    Ok(Json(Restarted {
        name: s.name,
        state: s.state,
    }))
}

/// Sends a test message (placeholders resolve to `none`) and reports how the destination
/// answered (`ok` is false when it did not answer 2xx); its state does not change.
#[utoipa::path(post, path = "/v1/destinations/{name}/test", tag = "destinations",
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "The destination's answer", body = TestOutcome),
        (status = 404, description = "No such destination", body = ErrorBody),
    ))]
async fn test_destination(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<TestOutcome>, ApiError> {
    Ok(Json(state.dispatcher.send_test(&name).await?))
}

/// Which failed deliveries a recovery sends again.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RecoverRequest {
    /// Deliveries planned at or after this (ms since the Unix epoch).
    since: u64,
    /// Deliveries planned before this (ms since the Unix epoch); now if absent.
    until: Option<u64>,
}

/// The answer to a recovery.
#[derive(Serialize, ToSchema)]
struct Recovered {
    destination: String,
    /// How many failed deliveries were made due again (or held, if the destination is
    /// not ACTIVE: its restart sends them).
    retried: usize,
}

/// How many failed deliveries one store write of a recovery looks at: a long recovery does
/// not keep the store's writer from ingest.
const RECOVER_BATCH: usize = 500;

/// Sends every failed delivery to this destination planned in a time window again, as a
/// retry by hand does one — after an outage that outlasted the retry schedule, say.
/// Attempts so far are kept; a rate limit paces them.
#[utoipa::path(post, path = "/v1/destinations/{name}/recover", tag = "destinations",
    params(("name" = String, Path)),
    request_body = RecoverRequest,
    responses(
        (status = 202, description = "Due again", body = Recovered),
        (status = 400, description = "A malformed body, the field named", body = ErrorBody),
        (status = 413, description = "The body is over `server.max_body_bytes`", body = ErrorBody),
        (status = 404, description = "No such destination", body = ErrorBody),
    ))]
async fn recover_destination(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: objects::RequestBody,
) -> Result<(StatusCode, Json<Recovered>), ApiError> {
    let req: RecoverRequest = objects::parse_json(&body.0)?;
    objects::find::<crate::config::DestinationConfig>(&state, &name)?;
    let now = state.dispatcher.now_ms();
    let until = req.until.unwrap_or(now.saturating_add(1));
    if req.since >= until {
        return Err(ApiError::BadRequest(format!(
            "`since` ({}) must be before `until` ({until})",
            req.since
        )));
    }
    let (mut retried, mut after) = (0, 0);
    loop {
        let (n, next) = state
            .store
            .recover_deliveries(&name, req.since, until, after, now, RECOVER_BATCH)
            .await?;
        retried += n;
        if n > 0 {
            state.dispatcher.wake();
        }
        match next {
            Some(next) => after = next,
            None => break,
        }
    }
    tracing::info!(destination = %name, retried, since = req.since, until, "Failed deliveries recovered by hand.");
    Ok((
        StatusCode::ACCEPTED,
        Json(Recovered {
            destination: name,
            retried,
        }),
    ))
}

impl From<RestartError> for ApiError {
    fn from(e: RestartError) -> Self {
        match e {
            RestartError::NotFound(n) => ApiError::NotFound(format!("no destination named `{n}`")),
            RestartError::TestFailed(e) => ApiError::Conflict(format!(
                "the test message failed, the destination stays as it was: {e}"
            )),
            RestartError::Store(e) => e.into(),
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeliveryQuery {
    /// Only deliveries with this status.
    status: Option<DeliveryStatus>,
    /// Only deliveries to this destination (with `status` `pending`, `failed` or
    /// `skipped`: `?destination=erp&status=failed`).
    destination: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Items per page: 1 to 500, 50 by default.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
}

/// Deliveries, oldest first, `limit` (default 50, at most 500) a page; `next_cursor` fetches
/// the next page.
#[utoipa::path(get, path = "/v1/deliveries", tag = "deliveries",
    params(DeliveryQuery),
    responses(
        (status = 200, description = "A page of deliveries", body = Page<DeliveryRecord>),
        (status = 400, description = "A malformed parameter, named", body = ErrorBody),
    ))]
async fn list_deliveries(
    State(state): State<Arc<AppState>>,
    query: Result<Query<DeliveryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page<DeliveryRecord>>, ApiError> {
    let Query(q) = query?;
    let after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(c.parse::<i64>().map_err(|_| {
            ApiError::BadRequest(format!("`cursor`: `{c}` is not a cursor from this API"))
        })?),
    };
    let limit = page_limit(q.limit)?;
    if q.destination.is_some() && matches!(q.status, None | Some(DeliveryStatus::Delivered)) {
        return Err(ApiError::BadRequest(
            "`destination`: give it with `status` pending, failed or skipped".into(),
        ));
    }
    let page = state
        .store
        .list_deliveries(q.status, q.destination.as_deref(), after, limit + 1)
        .await?;
    let more = page.len() > limit;
    let next_cursor = if more {
        page.get(limit - 1).map(|(seq, _)| seq.to_string())
    } else {
        None
    };
    let items = page.into_iter().take(limit).map(|(_, d)| d).collect();
    Ok(Json(Page { items, next_cursor }))
}

/// Sends a pending or failed delivery again now (its destination must be ACTIVE; a FAILED
/// destination's deliveries wait for its restart). Attempts so far are kept.
#[utoipa::path(post, path = "/v1/deliveries/{id}/retry", tag = "deliveries",
    params(("id" = String, Path, description = "The delivery id (its `webhook-id`)")),
    responses(
        (status = 202, description = "Due now", body = EventId),
        (status = 404, description = "No pending or failed delivery with this id", body = ErrorBody),
    ))]
async fn retry_delivery(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<EventId>), ApiError> {
    if state
        .store
        .retry_delivery(&id, state.dispatcher.now_ms())
        .await?
    {
        tracing::info!(delivery_id = %id, "Delivery retried by hand.");
        state.dispatcher.wake();
        Ok((StatusCode::ACCEPTED, Json(EventId { id })))
    } else {
        Err(ApiError::NotFound(format!(
            "no pending or failed delivery with id `{id}`"
        )))
    }
}

/// A page of a list endpoint; `next_cursor` fetches the next (`null` on the last).
#[derive(Serialize, ToSchema)]
pub struct Page<T> {
    items: Vec<T>,
    next_cursor: Option<String>,
}

/// A page size from `limit`: 50 by default, 1 to 500.
fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(50),
        Some(n @ 1..=500) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "`limit`: {n} is not between 1 and 500"
        ))),
    }
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PluginStateQuery {
    /// Only keys that start with this.
    prefix: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Items per page: 1 to 500, 50 by default.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
}

/// The values a plugin keeps between events (the WIT `state` interface), by key (compared
/// bytewise), `limit` (default 50, at most 500) a page; expired ones are left out. A
/// plugin's values outlast its removal until they expire, so any name is answered.
#[utoipa::path(get, path = "/v1/plugins/{name}/state", tag = "plugins",
    params(("name" = String, Path, description = "The plugin's name"), PluginStateQuery),
    responses(
        (status = 200, description = "A page of values", body = Page<StateEntry>),
        (status = 400, description = "A malformed parameter, named", body = ErrorBody),
    ))]
async fn list_plugin_state(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    query: Result<Query<PluginStateQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page<StateEntry>>, ApiError> {
    let Query(q) = query?;
    let limit = page_limit(q.limit)?;
    let (prefix, after) = (q.prefix.unwrap_or_default(), q.cursor.unwrap_or_default());
    let now = state.dispatcher.now_ms();
    let mut items = (state.store)
        .state_list(&name, &prefix, &after, limit + 1, now)
        .await?;
    let next_cursor = (items.len() > limit).then(|| items[limit - 1].key.clone());
    items.truncate(limit);
    Ok(Json(Page { items, next_cursor }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PluginStateKeys {
    /// The key whose value goes.
    key: Option<String>,
    /// Instead of `key`: every key that starts with this (all of the plugin's for an empty
    /// one).
    prefix: Option<String>,
}

/// How many values `DELETE /v1/plugins/{name}/state?prefix=` removed.
#[derive(Serialize, ToSchema)]
struct RemovedValues {
    removed: usize,
}

/// How many values one transaction of a removal by prefix deletes.
const REMOVE_BATCH: usize = 500;

/// Removes values a plugin keeps (it finds nothing under their keys from then on): one by
/// `key` — what `change-filter` remembers of a SIM, say — answered `204`, or every one
/// whose key starts with `prefix` (all of them for `prefix=`: the plugin starts afresh),
/// a batch per transaction, answered with how many.
#[utoipa::path(delete, path = "/v1/plugins/{name}/state", tag = "plugins",
    params(("name" = String, Path, description = "The plugin's name"), PluginStateKeys),
    responses(
        (status = 200, description = "Removed by prefix: how many", body = RemovedValues),
        (status = 204, description = "The key's value removed"),
        (status = 400, description = "Neither `key` nor `prefix`, or both", body = ErrorBody),
        (status = 404, description = "The plugin keeps no value under that key", body = ErrorBody),
    ))]
async fn delete_plugin_state(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    query: Result<Query<PluginStateKeys>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let Query(q) = query?;
    match (q.key, q.prefix) {
        (Some(key), None) => {
            let now = state.dispatcher.now_ms();
            if state.store.state_get(&name, &key, now).await?.is_none() {
                return Err(ApiError::NotFound(format!(
                    "plugin `{name}` keeps no value under `{key}`"
                )));
            }
            state.store.state_put(&name, &key, None, 0).await?;
            tracing::info!(plugin = %name, key = %key, "Plugin value removed by hand.");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (None, Some(prefix)) => {
            let mut removed = 0;
            loop {
                let n = (state.store)
                    .state_remove_prefix(&name, &prefix, REMOVE_BATCH)
                    .await?;
                removed += n;
                if n < REMOVE_BATCH {
                    break;
                }
            }
            tracing::info!(plugin = %name, prefix = %prefix, removed, "Plugin values removed by hand.");
            Ok(Json(RemovedValues { removed }).into_response())
        }
        _ => Err(ApiError::BadRequest(
            "name what to remove: `key` (one value) or `prefix` (every key that starts with it; \
             empty for all)"
                .into(),
        )),
    }
}

/// Every plugin the last reload saw: the serving version, its status (ok, error with the
/// last error, missing), health, instance mode, and the routes that use it.
#[utoipa::path(get, path = "/v1/plugins", tag = "plugins",
    responses(
        (status = 200, description = "`{\"items\": [...]}`, one item per plugin", body = Object),
    ))]
async fn list_plugins(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let routing = state.pipeline.routing();
    let serving = state.pipeline.plugins().snapshot();
    let items: Vec<serde_json::Value> = state
        .pipeline
        .plugins()
        .statuses()
        .into_iter()
        .map(|(name, status)| {
            let mut item = json!({
                "name": name,
                "status": status.status,
                "routes": routing.routes_using(&name),
            });
            if let serde_json::Value::Object(s) = json!(status) {
                item.as_object_mut().unwrap().extend(s);
            }
            if let Some(p) = serving.get(&name) {
                let (calls, mean_call_us) = p.call_stats();
                item.as_object_mut().unwrap().extend(
                    json!({
                        "calls": calls,
                        "mean_call_us": mean_call_us,
                        "sha256": p.sha256(),
                        "from_cache": p.from_cache(),
                        "stateful": p.stateful(),
                        "sends_http": p.sends_http(),
                        "checks_config": p.checks_config(),
                        "degraded": p.degraded(),
                        "consecutive_failures": p.consecutive_failures(),
                        "default_instance": p.default_mode(),
                        "warm_instances": p.warm_instances(),
                    })
                    .as_object()
                    .unwrap()
                    .clone(),
                );
            }
            item
        })
        .collect();
    Json(json!({ "items": items }))
}

/// The lookup tables in force (`[tables]`), which plugins read with `host.lookup`: each
/// one's name, file and number of rows, as the last config load read them.
#[utoipa::path(get, path = "/v1/tables", tag = "plugins",
    responses(
        (status = 200, description = "`{\"items\": [{\"name\", \"file\", \"rows\"}]}`, by name", body = Object),
    ))]
async fn list_tables(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let config = state.reloader.config();
    let items: Vec<serde_json::Value> = (config.tables.listing().into_iter())
        .map(|(name, file, rows)| json!({ "name": name, "file": file.display().to_string(), "rows": rows }))
        .collect();
    Json(json!({ "items": items }))
}

/// Reloads the config file and the plugin directory now. `422` when the config was
/// rejected (the previous one keeps serving).
#[utoipa::path(post, path = "/v1/reload", tag = "plugins",
    responses(
        (status = 200, description = "Reloaded", body = Object),
        (status = 422, description = "The config was rejected; the previous one keeps serving", body = Object),
    ))]
async fn reload(
    State(state): State<Arc<AppState>>,
) -> (StatusCode, Json<crate::reload::ReloadReport>) {
    let report = state.reloader.reload("POST /v1/reload").await;
    let status = if report.config == "rejected" {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (status, Json(report))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

/// A known path with another method: `405`, the methods it takes in `Allow` (set by the
/// router), and a JSON body like every other error.
async fn method_not_allowed(method: Method) -> Response {
    let message = format!("this endpoint does not take {method}; see the Allow header");
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ErrorBody { error: message }),
    )
        .into_response()
}

/// Every error's body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the field or header where there is one.
    pub error: String,
}

/// `{"id": ...}`: the event's id.
#[derive(Serialize, ToSchema)]
pub struct EventId {
    pub id: String,
}

/// An error answered as `{"error": "..."}` with a fitting status. The message is short and
/// stable; details go to the log.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// Refused by a source's `allow_client_names` (`403`, counted apart from addresses).
    #[error("{0}")]
    CertificateDenied(String),
    /// A sender's URL check without the source's verify token (`challenge.token`): `403`,
    /// counted apart from addresses.
    #[error("{0}")]
    TokenDenied(String),
    #[error("{0}")]
    Conflict(String),
    /// Over a source's `rate_limit`: `429`, `Retry-After` in whole seconds.
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    /// A listing stopped at its time budget (`store::LIST_BUDGET`).
    #[error("{0}")]
    TooBroad(String),
    /// An ingest body in a `Content-Encoding` the gateway does not decode (`415`).
    #[error("{0}")]
    UnsupportedEncoding(String),
    /// An ingest body that is not JSON, to a source that `require_json` (`400`, counted
    /// apart from other bad requests).
    #[error("{0}")]
    InvalidJson(String),
    /// A method the endpoint takes only for some requests (`405`, what it takes in `Allow`).
    #[error("{message}")]
    MethodNotAllowed {
        message: String,
        allow: &'static str,
    },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::BadRequest(query_error(&e.body_text()))
    }
}

/// A query string's rejection in the API's words: `` `limit`: invalid digit found in
/// string `` rather than axum's `Failed to deserialize query string: limit: …`.
fn query_error(text: &str) -> String {
    let Some(rest) = text.strip_prefix("Failed to deserialize query string: ") else {
        return text.to_string();
    };
    match rest.split_once(": ") {
        Some((name, why)) if !name.is_empty() && !name.contains(' ') => {
            format!("invalid query string: `{name}`: {why}")
        }
        _ => format!("invalid query string: {rest}"),
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::QueueFull(_) | StoreError::QueueBytesFull(_) | StoreError::Closed => {
                ApiError::Unavailable(e.to_string())
            }
            StoreError::TooSlow(_) => ApiError::TooBroad(e.to_string()),
            StoreError::Db(_) => ApiError::Internal(e.into()),
        }
    }
}

impl ApiError {
    /// The status it is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) | ApiError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::CertificateDenied(_) | ApiError::TokenDenied(_) => {
                StatusCode::FORBIDDEN
            }
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TooBroad(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = %format!("{e:#}"), "Request failed.");
        }
        // When to try again: a rate limit knows; a full queue or a store that cannot
        // write is worth another try in a second (the sender's own backoff takes over).
        let retry_after = match &self {
            ApiError::RateLimited { retry_after_s, .. } => Some(*retry_after_s),
            ApiError::Unavailable(_) => Some(1),
            _ => None,
        };
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if let Some(s) = retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        if let ApiError::MethodNotAllowed { allow, .. } = &self {
            (response.headers_mut()).insert(
                axum::http::header::ALLOW,
                axum::http::HeaderValue::from_static(allow),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::Service;

    async fn buggy() -> StatusCode {
        panic!("a handler's bug")
    }

    /// A request that may change something runs on a task of its own: a panic in its
    /// handler is a `500` with a JSON error, not a dropped connection.
    #[tokio::test]
    async fn a_panicking_change_is_a_500() {
        let mut app = axum::Router::new()
            .route("/change", axum::routing::post(buggy))
            .layer(axum::middleware::from_fn(super::see_through))
            .into_service::<Body>();
        let request = Request::post("/change").body(Body::empty()).unwrap();
        let response = app.call(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"].is_string(), "{body}");
    }
}
