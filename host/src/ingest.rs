//! The ingest stage: `POST /v1/ingest/{source}` turns a request into an [`Event`], hands it
//! to the store, and answers `202 {"id": ...}` once the store has accepted it.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::json;

use crate::api::{ApiError, AppState};
use crate::delivery::now_ms;
use crate::event::{Body, Event};
use crate::store::StoreError;

pub async fn ingest(
    State(state): State<AppState>,
    Path(source): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    if !state.pipeline.routing().has_source(&source) {
        return Err(ApiError::NotFound(format!("no source named `{source}`")));
    }
    let body = match body {
        Ok(b) if b.len() <= state.max_body_bytes => b,
        Ok(_) => return Err(ApiError::PayloadTooLarge(state.max_body_bytes)),
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::PayloadTooLarge(state.max_body_bytes));
        }
        Err(r) => {
            return Err(ApiError::BadRequest(format!(
                "cannot read the body: {}",
                r.body_text()
            )));
        }
    };
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let event = Event {
        id: uuid::Uuid::now_v7().to_string(),
        source,
        received_at: now_ms(),
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        content_type,
        body: Body(body),
        metadata: Vec::new(),
    };
    let id = event.id.clone();
    let source = event.source.clone();
    state.store.insert_event(event).await.map_err(|e| match e {
        StoreError::QueueFull(_) | StoreError::Closed => ApiError::Unavailable(e.to_string()),
    })?;
    tracing::debug!(event_id = %id, source, "Event accepted.");
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id }))))
}
