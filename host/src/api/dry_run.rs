//! Dry runs: `POST /v1/sources/{name}/dry-run` takes a payload, `POST
//! /v1/events/{id}/dry-run` a stored event, through the source's routes as they are in
//! force — the same plugins, versions, destinations and placeholders as an event posted to
//! ingest or replayed — answered with what would happen, without storing or sending
//! anything. For trying a plugin or a route change on a real payload before a sender's
//! event meets it, or before replaying dead letters.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, AppState, ErrorBody};
use crate::config::SourceConfig;
use crate::event::{Body, BodyEncoding, Event, Pairs};
use crate::ingest;
use crate::plugin::HttpExchange;
use crate::store::{DeliveryStatus, NewDelivery, RouteOutcome};

/// What the source's routes make of a payload.
#[derive(Serialize, ToSchema)]
pub struct DryRun {
    /// The event as the plugins got it: id, source, received_at, method, path, query,
    /// headers, content_type, body, metadata, run. Not stored: its id is nobody's.
    #[schema(value_type = Object)]
    event: Event,
    /// Each route's outcome, as `GET /v1/events/{id}` shows them: the plugin steps with
    /// each verdict, version (sha256) and duration, and the result.
    #[schema(value_type = Vec<Object>)]
    routes: Vec<RouteOutcome>,
    /// The deliveries the routes plan, as they would be sent (a signed destination's
    /// `webhook-timestamp` and `webhook-signature` are added at each attempt, so they are
    /// not here).
    deliveries: Vec<PlannedRequest>,
    /// The HTTP requests the plugins asked for (WIT `http`), in order: plugin, method, URL,
    /// headers (secrets redacted), body, and the response's `status` or the `error` the
    /// plugin was told. A dry run sends `GET` and `HEAD` requests (answered by the service)
    /// and no others; `switchyard dry-run` may answer them all from a file instead.
    #[schema(value_type = Vec<Object>)]
    requests: Vec<HttpExchange>,
    /// When the payload is a sender's URL check (the source's `challenge`): what ingest
    /// would answer with (`200`), storing nothing — the routes do not run, so `routes` and
    /// `deliveries` are empty. Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    challenge: Option<serde_json::Value>,
}

/// One delivery a dry run plans, rendered.
#[derive(Serialize, ToSchema)]
pub(super) struct PlannedRequest {
    /// The delivery's `webhook-id`, as it would be for an event with this id.
    id: String,
    /// The index of the route that planned it.
    route: usize,
    destination: String,
    /// The URL after placeholders (a secret query parameter's value as `****`).
    #[serde(serialize_with = "crate::managed::serialize_redacted_url")]
    url: String,
    /// `pending` (it would be sent) or `skipped` (the destination's `event_types` do not
    /// take this event's type).
    status: DeliveryStatus,
    /// The request's headers in order; values of headers that name a secret
    /// (`authorization`, `…key…`, `…token…`, …) redacted.
    #[schema(value_type = Vec<Vec<String>>)]
    headers: Pairs,
    /// The request's body: the JSON value when it is JSON, else text, else
    /// `{"base64": "..."}`.
    #[schema(value_type = serde_json::Value)]
    body: Body,
    /// Which of those the body is.
    body_encoding: BodyEncoding,
}

impl From<NewDelivery> for PlannedRequest {
    fn from(d: NewDelivery) -> Self {
        let headers = crate::managed::redact_secret_headers(d.headers);
        let body = Body(d.body);
        PlannedRequest {
            id: d.id,
            route: d.route,
            destination: d.destination,
            url: d.url,
            status: d.status,
            headers,
            body_encoding: body.encoding(),
            body,
        }
    }
}

/// Request headers that belong to the API call, not to the event: its credentials, and
/// what a browser adds (as do `sec-…` names: the dashboard runs dry runs from a page).
const API_CALL_HEADERS: &[&str] = &[
    "authorization",
    "cookie",
    "origin",
    "referer",
    "accept-language",
];

/// Runs a payload through the source's routes and answers with each route's outcome and
/// the deliveries they would send; stores, sends and counts nothing. The request body is
/// the payload as a sender would post it (decoded first if it comes with
/// `Content-Encoding`); its headers, but the call's own (`authorization`, `cookie`, and
/// what browsers add: `origin`, `referer`, `accept-language`, `sec-…`), and its query
/// string are the event's. The source's signature check, allowlists, rate limit and
/// idempotency do not apply; a payload that is a sender's URL check (`challenge`) is
/// answered as ingest would answer it, and no route runs; one that is not JSON to a
/// source that `require_json` is refused as ingest would refuse it.
#[utoipa::path(post, path = "/v1/sources/{name}/dry-run", tag = "sources",
    params(("name" = String, Path, description = "A source")),
    request_body(content = Object, description = "A payload as a sender would post it (any bytes)", content_type = "application/json"),
    responses(
        (status = 200, description = "What the source's routes would do", body = DryRun),
        (status = 400, description = "A body that cannot be read or decoded, or one that is not JSON to a source that `require_json` (as ingest would refuse it)", body = ErrorBody),
        (status = 403, description = "A URL check in the query (`challenge.query`) without the source's verify token (as ingest would refuse it)", body = ErrorBody),
        (status = 404, description = "No such source", body = ErrorBody),
        (status = 408, description = "The body did not arrive within `body_read_timeout`", body = ErrorBody),
        (status = 413, description = "The body, or its decoded form, is over `max_body_bytes`", body = ErrorBody),
        (status = 415, description = "A `Content-Encoding` other than gzip, x-gzip, deflate or identity", body = ErrorBody),
    ))]
pub(super) async fn dry_run(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: axum::extract::Request,
) -> Result<Json<DryRun>, ApiError> {
    let Some(source) = state.pipeline.routing().source(&name).cloned() else {
        return Err(ApiError::NotFound(format!("no source named `{name}`")));
    };
    let (mut request, body) = request.into_parts();
    let config = state.reloader.config();
    let max = config.server.max_body_bytes;
    let wire = ingest::read_body(body, max, config.server.body_read_timeout).await?;
    let decoded = ingest::decode(&request.headers, &wire, max).await?;
    let keep = |name: &http::HeaderName| {
        !(API_CALL_HEADERS.contains(&name.as_str())
            || name.as_str().starts_with("sec-")
            || (decoded.is_some() && name == http::header::CONTENT_ENCODING))
    };
    // The event as ingest would have made it from a post to the source.
    let uri = ingest_uri(&name, request.uri.query())?;
    let body = ingest::stored_body(
        &source,
        &mut request.headers,
        decoded.clone().unwrap_or(wire),
    );
    let event = ingest::new_event(
        name,
        &http::Method::POST,
        &uri,
        &request.headers,
        keep,
        source.verify.as_ref(),
        body,
    );
    if let Some(answer) = DryRun::at_ingest(&source, &event)? {
        return Ok(Json(answer));
    }
    Ok(Json(run(&state, event).await))
}

/// Runs a stored event through its source's routes as a replay would, as its next run
/// (so the deliveries' ids are those a replay would give them), and answers as the
/// payload's dry run does; the event and its deliveries are not changed, nothing is sent
/// or counted. Its credential headers are shown redacted, as `GET /v1/events/{id}` shows
/// them.
#[utoipa::path(post, path = "/v1/events/{id}/dry-run", tag = "events",
    params(("id" = String, Path, description = "The event id from ingest")),
    responses(
        (status = 200, description = "What a replay would do", body = DryRun),
        (status = 404, description = "No such event", body = ErrorBody),
    ))]
pub(super) async fn dry_run_event(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<DryRun>, ApiError> {
    let record = (state.store.get_event(&id).await?)
        .ok_or_else(|| ApiError::NotFound(format!("no event with id `{id}`")))?;
    let mut event = record.event;
    event.run += 1;
    let mut answer = run(&state, event).await;
    for (name, value) in answer.event.headers.iter_mut() {
        if super::credential_header(name) {
            *value = crate::managed::redact(value);
        }
    }
    Ok(Json(answer))
}

/// The URI of a post to `source`'s ingest with `query`.
pub(crate) fn ingest_uri(source: &str, query: Option<&str>) -> Result<http::Uri, ApiError> {
    match query {
        Some(q) => format!("/v1/ingest/{source}?{q}"),
        None => format!("/v1/ingest/{source}"),
    }
    .parse()
    .map_err(|_| ApiError::BadRequest("the source's name or the query is not part of a URL".into()))
}

/// The event through `Pipeline::decide`, counted nowhere.
async fn run(state: &AppState, event: Event) -> DryRun {
    let span = tracing::info_span!("dry_run", event_id = %event.id, source = %event.source);
    let (routes, deliveries, requests) =
        tracing::Instrument::instrument(state.pipeline.dry_run(&event), span).await;
    DryRun::new(event, routes, deliveries, requests)
}

impl DryRun {
    /// Where `answer` (a dry run's, as JSON) does not hold `expected` (`switchyard dry-run
    /// --expect`): an object holds another when it has each of its keys with a value that
    /// holds that key's (other keys are ignored), an array when it is as long and each
    /// item holds the expected one at its place, anything else when equal. Each difference
    /// names its place (`deliveries[0].body.type`).
    pub fn differences(expected: &serde_json::Value, answer: &serde_json::Value) -> Vec<String> {
        use serde_json::Value;
        fn walk(at: &str, expected: &Value, answer: &Value, found: &mut Vec<String>) {
            let place = |at: &str| {
                if at.is_empty() {
                    "the answer".to_string()
                } else {
                    at.to_string()
                }
            };
            match (expected, answer) {
                (Value::Object(expected), Value::Object(answer)) => {
                    for (key, value) in expected {
                        let at = match at {
                            "" => key.clone(),
                            _ => format!("{at}.{key}"),
                        };
                        match answer.get(key) {
                            Some(got) => walk(&at, value, got, found),
                            None => found.push(format!("{at}: missing, expected {value}")),
                        }
                    }
                }
                (Value::Array(expected), Value::Array(answer)) => {
                    if expected.len() != answer.len() {
                        found.push(format!(
                            "{}: {} items, expected {}",
                            place(at),
                            answer.len(),
                            expected.len()
                        ));
                    }
                    for (i, (e, a)) in expected.iter().zip(answer).enumerate() {
                        walk(&format!("{at}[{i}]"), e, a, found);
                    }
                }
                (expected, answer) if expected != answer => {
                    found.push(format!("{}: {answer}, expected {expected}", place(at)));
                }
                _ => {}
            }
        }
        let mut found = Vec::new();
        walk("", expected, answer, &mut found);
        found
    }

    pub(crate) fn new(
        event: Event,
        routes: Vec<RouteOutcome>,
        deliveries: Vec<NewDelivery>,
        requests: Vec<HttpExchange>,
    ) -> Self {
        DryRun {
            event,
            routes,
            deliveries: deliveries.into_iter().map(PlannedRequest::from).collect(),
            requests,
            challenge: None,
        }
    }

    /// What ingest makes of a payload before any route runs: refused for its shape (the
    /// source's `require_json`: the error ingest would answer), answered as a sender's URL
    /// check (the source's `challenge`: its dry run, no route run), or `None`: on to the
    /// routes.
    pub(crate) fn at_ingest(
        source: &SourceConfig,
        event: &Event,
    ) -> Result<Option<Self>, ApiError> {
        let challenge = source.challenge.as_ref();
        // (As ingest: a URL check in the query first, its verify token checked.)
        let echo = match challenge.and_then(|c| c.answer_query(&event.query)) {
            Some(Err(why)) => return Err(ApiError::TokenDenied(why)),
            Some(Ok(echo)) => Some(echo),
            None => None,
        };
        if echo.is_none()
            && let Some(why) = source.refuses_body(&event.body.0)
        {
            return Err(ApiError::InvalidJson(why));
        }
        let echo = echo.or_else(|| challenge.and_then(|c| c.answer(&event.body.0)));
        let Some(echo) = echo else {
            return Ok(None);
        };
        Ok(Some(DryRun {
            challenge: Some(echo.to_json()),
            ..DryRun::new(event.clone(), Vec::new(), Vec::new(), Vec::new())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::DryRun;
    use serde_json::json;

    #[test]
    fn an_expected_answer_is_held_by_its_keys_and_every_item() {
        let answer = json!({
            "event": {"id": "e1", "source": "s"},
            "deliveries": [
                {"destination": "a", "body": {"type": "usage", "id": "x", "n": 1}},
                {"destination": "b", "body": "text"}
            ]
        });
        let holds = json!({"deliveries": [{"destination": "a", "body": {"type": "usage"}}, {}]});
        assert_eq!(DryRun::differences(&holds, &answer), Vec::<String>::new());
        let differs = json!({
            "event": {"source": "t", "run": 0},
            "deliveries": [{"body": {"type": "location", "n": "1"}}]
        });
        assert_eq!(
            DryRun::differences(&differs, &answer),
            [
                r#"event.source: "s", expected "t""#,
                "event.run: missing, expected 0",
                "deliveries: 2 items, expected 1",
                r#"deliveries[0].body.type: "usage", expected "location""#,
                r#"deliveries[0].body.n: 1, expected "1""#,
            ]
        );
        assert_eq!(
            DryRun::differences(&json!([1]), &json!({"a": 1})),
            [r#"the answer: {"a":1}, expected [1]"#]
        );
    }
}
