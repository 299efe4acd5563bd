//! The HTTP edge: the axum router, the one JSON error type, and the small read-only
//! endpoints. Ingest has its own module.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::ingest;
use crate::pipeline::Pipeline;
use crate::store::{EventRecord, Store};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pipeline: Arc<Pipeline>,
    pub store: Arc<dyn Store>,
    pub max_body_bytes: usize,
}

/// Builds the gateway's router.
pub fn router(state: AppState) -> Router {
    // axum's own limit is set above ours so that ingest can answer an oversized body with
    // our JSON error rather than axum's plain-text one.
    let limit = state.max_body_bytes.saturating_add(1);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/ingest/{source}", post(ingest::ingest))
        .route("/v1/events/{id}", get(get_event))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn get_event(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<EventRecord>, ApiError> {
    state
        .store
        .get_event(&id)
        .await
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no event with id `{id}`")))
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
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "Request failed.");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}
