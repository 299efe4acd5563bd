//! The HTTP edge: the axum router, the one JSON error type, and the operator endpoints
//! (events, destinations, deliveries). Ingest has its own module.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::delivery::{Dispatcher, RestartError};
use crate::ingest;
use crate::metrics::{Metrics, StateLabels};
use crate::pipeline::Pipeline;
use crate::reload::Reloader;
use crate::store::{
    DeliveryRecord, DeliveryStatus, DestinationHealth, EventRecord, Store, StoreError,
};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pipeline: Arc<Pipeline>,
    pub store: Arc<dyn Store>,
    pub dispatcher: Arc<Dispatcher>,
    pub reloader: Arc<Reloader>,
    pub metrics: Arc<Metrics>,
}

/// Builds the gateway's router.
pub fn router(state: AppState) -> Router {
    // axum's own limit is set above ours so that ingest can answer an oversized body with
    // our JSON error rather than axum's plain-text one.
    // The limit is read once: a reloaded max_body_bytes takes effect at the next start.
    let limit = state
        .reloader
        .config()
        .server
        .max_body_bytes
        .saturating_add(1);
    let management = Router::new()
        .route("/v1/events/{id}", get(get_event))
        .route("/v1/events/{id}/replay", post(replay_event))
        .route("/v1/destinations", get(list_destinations))
        .route("/v1/destinations/{name}/restart", post(restart_destination))
        .route("/v1/destinations/{name}/test", post(test_destination))
        .route("/v1/deliveries", get(list_deliveries))
        .route("/v1/plugins", get(list_plugins))
        .route("/v1/reload", post(reload))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/ingest/{source}", post(ingest::ingest))
        .merge(management)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The management API's gate: `Authorization: Bearer <token>` with a configured token,
/// compared in constant time.
async fn require_token(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let tokens = &state.reloader.config().api.tokens;
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| {
        tokens
            .iter()
            .any(|t| bool::from(t.as_bytes().ct_eq(g.as_bytes())))
    });
    if ok {
        return next.run(request).await;
    }
    let message = if tokens.is_empty() {
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

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the store answers (plugins are loaded before the gateway listens).
async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    match state.store.backlog().await {
        Ok(_) => Ok(Json(json!({ "ready": true }))),
        Err(e) => Err(ApiError::Unavailable(format!("not ready: {e}"))),
    }
}

/// Prometheus text format. Gauges are read from the store and the dispatcher here.
async fn metrics(State(state): State<AppState>) -> Response {
    let m = &state.metrics;
    m.queue_depth.set(state.store.queue_depth() as i64);
    if let Ok((pending, oldest)) = state.store.backlog().await {
        m.pending_deliveries.set(pending as i64);
        let now = state.dispatcher.now_ms();
        m.oldest_pending_seconds
            .set(oldest.map_or(0, |at| now.saturating_sub(at) / 1000) as i64);
    }
    for d in &state.reloader.config().destinations {
        let current = state.dispatcher.state(&d.name).state;
        for s in [
            DestinationHealth::Active,
            DestinationHealth::Failed,
            DestinationHealth::Disabled,
        ] {
            let labels = StateLabels {
                destination: d.name.clone(),
                state: format!("{s:?}").to_uppercase(),
            };
            m.destination_state
                .get_or_create(&labels)
                .set(i64::from(s == current));
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

async fn get_event(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<EventRecord>, ApiError> {
    state
        .store
        .get_event(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no event with id `{id}`")))
}

/// Runs a stored event through the current plugins again; its new deliveries get new ids.
async fn replay_event(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    if state.store.replay(&id).await? {
        Ok((StatusCode::ACCEPTED, Json(json!({ "id": id }))))
    } else {
        Err(ApiError::NotFound(format!("no event with id `{id}`")))
    }
}

/// A destination as `GET /v1/destinations` shows it.
#[derive(Serialize)]
struct DestinationView {
    name: String,
    state: DestinationHealth,
    consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    pending: u64,
    failed: u64,
}

async fn list_destinations(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let counts = state.store.delivery_counts().await?;
    let items: Vec<DestinationView> = state
        .reloader
        .config()
        .destinations
        .iter()
        .map(|d| {
            let s = state.dispatcher.state(&d.name);
            let c = counts
                .iter()
                .find(|c| c.destination == d.name)
                .cloned()
                .unwrap_or_default();
            DestinationView {
                name: d.name.clone(),
                state: s.state,
                consecutive_failures: s.consecutive_failures,
                last_error: s.last_error,
                pending: c.pending,
                failed: c.failed,
            }
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// Sends a test message; if it succeeds, the destination is ACTIVE again and its queued
/// deliveries are sent.
async fn restart_destination(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let s = state.dispatcher.restart(&name).await?;
    Ok(Json(json!({ "name": s.name, "state": s.state })))
}

/// Sends a test message (placeholders resolve to `none`) and reports the answer; the
/// destination's state does not change.
async fn test_destination(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let code = state.dispatcher.send_test(&name).await?;
    Ok(Json(json!({ "name": name, "status_code": code })))
}

impl From<RestartError> for ApiError {
    fn from(e: RestartError) -> Self {
        match e {
            RestartError::NotFound(n) => ApiError::NotFound(format!("no destination named `{n}`")),
            RestartError::TestFailed(e) => {
                ApiError::BadGateway(format!("the test message failed: {e}"))
            }
            RestartError::Store(e) => e.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveryQuery {
    status: Option<DeliveryStatus>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// Deliveries, oldest first, `limit` (default 50, at most 500) a page; `next_cursor` fetches
/// the next page.
async fn list_deliveries(
    State(state): State<AppState>,
    query: Result<Query<DeliveryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(c.parse::<i64>().map_err(|_| {
            ApiError::BadRequest(format!("`cursor`: `{c}` is not a cursor from this API"))
        })?),
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let page = state
        .store
        .list_deliveries(q.status, after, limit + 1)
        .await?;
    let more = page.len() > limit;
    let items: Vec<&DeliveryRecord> = page.iter().take(limit).map(|(_, d)| d).collect();
    let next_cursor = if more {
        page.get(limit - 1).map(|(seq, _)| seq.to_string())
    } else {
        None
    };
    Ok(Json(json!({ "items": items, "next_cursor": next_cursor })))
}

/// Every plugin the last reload saw: the serving version, its status (ok, error with the
/// last error, missing), health, instance mode, and the routes that use it.
async fn list_plugins(State(state): State<AppState>) -> Json<serde_json::Value> {
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
                item.as_object_mut().unwrap().extend(
                    json!({
                        "sha256": p.sha256(),
                        "from_cache": p.from_cache(),
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

/// Reloads the config file and the plugin directory now. `422` when the config was
/// rejected (the previous one keeps serving).
async fn reload(State(state): State<AppState>) -> (StatusCode, Json<crate::reload::ReloadReport>) {
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
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::QueueFull(_) | StoreError::Closed => ApiError::Unavailable(e.to_string()),
            StoreError::Db(_) => ApiError::Internal(e.into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "Request failed.");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}
