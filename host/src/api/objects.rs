//! `/v1/sources`, `/v1/destinations`, `/v1/routes`: create, list (cursor pagination), get,
//! `PATCH` (JSON merge patch) and delete, like 1NCE's integration API.
//!
//! The bodies are the objects' config-file form in JSON; unknown fields are rejected and
//! errors name the field. Objects from the config file are listed with `"origin": "file"`
//! and are read-only here; see [`crate::managed`] for how the two relate. Secrets are shown
//! as `****` and their last four characters; sending such a value back in a `PATCH` keeps
//! the stored secret.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, AppState, ErrorBody, Page, page_limit};
use crate::config::{Config, DestinationConfig, RouteConfig, SourceConfig};
use crate::managed::{Change, ChangeError, Kind, Managed, Object, Origin, Redact};
use crate::store::{DeliveryCounts, DestinationHealth};

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Invalid { .. } => ApiError::BadRequest(e.to_string()),
            ChangeError::Conflict(m) => ApiError::Conflict(m),
            ChangeError::NotFound(m) => ApiError::NotFound(m),
            ChangeError::Store(e) => e.into(),
        }
    }
}

/// What the three kinds have in common.
pub(super) trait Resource:
    Serialize + DeserializeOwned + Redact + Clone + Send + 'static
{
    const KIND: Kind;
    fn name(&self) -> &str;
    fn all(c: &Config) -> &[Arc<Self>];
    fn managed(m: &Managed) -> &BTreeMap<String, Arc<Self>>;
    fn object(self) -> Object;
    /// Checks that serde cannot express.
    fn check(&self) -> Result<(), ApiError> {
        Ok(())
    }
}

impl Resource for SourceConfig {
    const KIND: Kind = Kind::Source;
    fn name(&self) -> &str {
        &self.name
    }
    fn all(c: &Config) -> &[Arc<Self>] {
        &c.sources
    }
    fn managed(m: &Managed) -> &BTreeMap<String, Arc<Self>> {
        &m.sources
    }
    fn object(self) -> Object {
        Object::Source(self)
    }
}

impl Resource for DestinationConfig {
    const KIND: Kind = Kind::Destination;
    fn name(&self) -> &str {
        &self.name
    }
    fn all(c: &Config) -> &[Arc<Self>] {
        &c.destinations
    }
    fn managed(m: &Managed) -> &BTreeMap<String, Arc<Self>> {
        &m.destinations
    }
    fn object(self) -> Object {
        Object::Destination(self)
    }
}

impl Resource for RouteConfig {
    const KIND: Kind = Kind::Route;
    fn name(&self) -> &str {
        &self.name
    }
    fn all(c: &Config) -> &[Arc<Self>] {
        &c.routes
    }
    fn managed(m: &Managed) -> &BTreeMap<String, Arc<Self>> {
        &m.routes
    }
    fn object(self) -> Object {
        Object::Route(self)
    }
    fn check(&self) -> Result<(), ApiError> {
        if self.name.is_empty() {
            return Err(ApiError::BadRequest(
                "`name`: a route made through the API needs a name".into(),
            ));
        }
        Ok(())
    }
}

/// `?cursor=&limit=` of the list endpoints.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Items per page: 1 to 500, 50 by default.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
}

/// A source as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct SourceView {
    #[serde(flatten)]
    config: SourceConfig,
    origin: Origin,
    /// The requests to it this instance refused lately (a wrong signature or secret, an
    /// address not allowed, over its rate limit, …): they store nothing, so they are seen
    /// here.
    refused: crate::ingest::SourceRefusals,
    /// When this instance last accepted an event of it (ms since the Unix epoch), since it
    /// started; absent if it has not.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_accepted_at: Option<u64>,
}

/// A route as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct RouteView {
    #[serde(flatten)]
    config: RouteConfig,
    origin: Origin,
    /// Why the route cannot work as it is: one made through the API whose plugin is
    /// missing, or refuses its configuration, since (a start or a reload found it; see
    /// `POST /v1/reload`'s `route_errors`). Its events fail at that plugin until it is
    /// changed; absent for a route that works.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A destination as the API shows it: its config, where it is defined, and its health.
#[derive(Serialize, ToSchema)]
pub struct DestinationView {
    #[serde(flatten)]
    config: DestinationConfig,
    origin: Origin,
    state: DestinationHealth,
    consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    /// When it entered its state (ms since the Unix epoch): the attempt that made it FAILED
    /// or DISABLED, the pause or restart by hand; absent for one never out of ACTIVE.
    #[serde(skip_serializing_if = "Option::is_none")]
    state_since: Option<u64>,
    /// Deliveries waiting for an attempt.
    pending: u64,
    /// Deliveries that gave up.
    failed: u64,
    /// When this instance last delivered an event there (ms since the Unix epoch), since it
    /// started; absent if it has not.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_delivered_at: Option<u64>,
    /// When a FAILED destination with `restart_after` is next sent a test message (ms since
    /// the Unix epoch) — one that passes makes it ACTIVE; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_test_at: Option<u64>,
}

fn source_view(state: &AppState, c: &SourceConfig) -> SourceView {
    SourceView {
        config: c.redacted(),
        origin: state.reloader.managed().origin(Kind::Source, &c.name),
        refused: state.metrics.refusals.of(&c.name),
        last_accepted_at: state.metrics.last_accepted_ms(&c.name),
    }
}

fn route_view(state: &AppState, c: &RouteConfig) -> RouteView {
    RouteView {
        config: c.redacted(),
        origin: state.reloader.managed().origin(Kind::Route, &c.name),
        error: state.reloader.route_error(&c.name),
    }
}

fn destination_view(
    state: &AppState,
    c: &DestinationConfig,
    counts: &[DeliveryCounts],
) -> DestinationView {
    let s = state.dispatcher.state(&c.name);
    let n = counts
        .iter()
        .find(|n| n.destination == c.name)
        .cloned()
        .unwrap_or_default();
    DestinationView {
        config: c.redacted(),
        origin: state.reloader.managed().origin(Kind::Destination, &c.name),
        state: s.state,
        consecutive_failures: s.consecutive_failures,
        last_error: s.last_error,
        state_since: (s.since > 0).then_some(s.since),
        pending: n.pending,
        failed: n.failed,
        last_delivered_at: state.metrics.last_delivered_ms(&c.name),
        next_test_at: state.dispatcher.next_test_at(&c.name),
    }
}

/// The page of `R` after the cursor, in name order.
fn page_of<R: Resource>(
    state: &AppState,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<(Vec<R>, Option<String>), ApiError> {
    let Query(q) = query?;
    let limit = page_limit(q.limit)?;
    let config = state.reloader.config();
    let mut all: Vec<&R> = R::all(&config).iter().map(|r| &**r).collect();
    all.sort_by(|a, b| a.name().cmp(b.name()));
    let after = q.cursor.unwrap_or_default();
    let rest: Vec<R> = all
        .into_iter()
        .filter(|r| after.is_empty() || r.name() > after.as_str())
        .take(limit + 1)
        .cloned()
        .collect();
    let next = (rest.len() > limit).then(|| rest[limit - 1].name().to_string());
    Ok((rest.into_iter().take(limit).collect(), next))
}

/// The object named `name`: an API object by its name, a file's by a scan of the config.
pub(super) fn find<R: Resource>(state: &AppState, name: &str) -> Result<R, ApiError> {
    if let Some(object) = R::managed(&state.reloader.managed()).get(name) {
        return Ok(R::clone(object));
    }
    R::all(&state.reloader.config())
        .iter()
        .find(|r| r.name() == name)
        .map(|r| R::clone(r))
        .ok_or_else(|| ApiError::NotFound(format!("no {} named `{name}`", R::KIND.as_str())))
}

/// Parses a JSON body, naming the field that is wrong.
pub(super) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // A body cut short or not JSON is wrong as a whole, whichever field it stopped in.
        if path == "." || inner.is_syntax() || inner.is_eof() {
            ApiError::BadRequest(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::BadRequest(format!("`{path}`: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// A management request's body, read like an ingested one: at most the current
/// `server.max_body_bytes` (`413` past it, a reload applies at once) within
/// `server.body_read_timeout` (`408`).
pub struct RequestBody(pub Bytes);

impl axum::extract::FromRequest<Arc<AppState>> for RequestBody {
    type Rejection = ApiError;

    async fn from_request(
        request: axum::extract::Request,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let config = state.reloader.config();
        let body = crate::ingest::read_body(
            request.into_body(),
            config.server.max_body_bytes,
            config.server.body_read_timeout,
        )
        .await?;
        Ok(RequestBody(body))
    }
}

async fn create<R: Resource>(state: &AppState, body: RequestBody) -> Result<(R, String), ApiError> {
    let object: R = parse_json(&body.0)?;
    object.check()?;
    let name = object.name().to_string();
    state
        .reloader
        .apply(Change::Create(object.object()))
        .await?;
    let created = find::<R>(state, &name)?;
    let plural = match R::KIND {
        Kind::Source => "sources",
        Kind::Destination => "destinations",
        Kind::Route => "routes",
    };
    Ok((created, format!("/v1/{plural}/{name}")))
}

/// RFC 7396: objects merge key by key, `null` deletes, anything else replaces.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

async fn patch<R: Resource>(
    state: &AppState,
    name: &str,
    body: RequestBody,
) -> Result<R, ApiError> {
    let patch: serde_json::Value = parse_json(&body.0)?;
    if !patch.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object (a JSON merge patch)".into(),
        ));
    }
    let managed = state.reloader.managed();
    let Some(current) = R::managed(&managed).get(name).cloned() else {
        // Either from the file (read-only: the reloader says so) or not there at all.
        find::<R>(state, name)?;
        return Err(ApiError::Conflict(format!(
            "{} `{name}` is defined in the config file and is read-only through the API; change the file and reload",
            R::KIND.as_str()
        )));
    };
    let mut value = serde_json::to_value(&*current).expect("config objects serialize");
    merge_patch(&mut value, &patch);
    if value.get("name") != Some(&serde_json::Value::String(name.into())) {
        return Err(ApiError::BadRequest(
            "`name`: cannot be changed; create a new object and delete this one".into(),
        ));
    }
    let text = serde_json::to_vec(&value).expect("JSON values serialize");
    let mut updated: R = parse_json(&text)?;
    updated.keep_secrets(&current);
    updated.check()?;
    state
        .reloader
        .apply(Change::Update(updated.object()))
        .await?;
    find::<R>(state, name)
}

async fn delete<R: Resource>(state: &AppState, name: &str) -> Result<StatusCode, ApiError> {
    state
        .reloader
        .apply(Change::Delete(R::KIND, name.to_string()))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn created<T: Serialize>(location: String, view: T) -> Response {
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    )
        .into_response()
}

// ---- sources ------------------------------------------------------------------------

/// Sources in name order.
#[utoipa::path(get, path = "/v1/sources", tag = "sources", params(PageQuery),
    responses(
        (status = 200, description = "A page of sources", body = Page<SourceView>),
        (status = 400, description = "A malformed parameter, named", body = ErrorBody),
    ))]
pub async fn list_sources(
    State(state): State<Arc<AppState>>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Page<SourceView>>, ApiError> {
    let (items, next_cursor) = page_of::<SourceConfig>(&state, query)?;
    let items = items.iter().map(|s| source_view(&state, s)).collect();
    Ok(Json(Page { items, next_cursor }))
}

/// Creates a source; senders can post to `/v1/ingest/{name}` at once.
#[utoipa::path(post, path = "/v1/sources", tag = "sources", request_body = SourceConfig,
    responses(
        (status = 201, description = "Created", body = SourceView),
        (status = 400, description = "Invalid; the message names the field", body = ErrorBody),
        (status = 413, description = "The body is over `server.max_body_bytes`", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
    ))]
pub async fn create_source(
    State(state): State<Arc<AppState>>,
    body: RequestBody,
) -> Result<Response, ApiError> {
    let (s, location) = create::<SourceConfig>(&state, body).await?;
    Ok(created(location, source_view(&state, &s)))
}

/// One source.
#[utoipa::path(get, path = "/v1/sources/{name}", tag = "sources", params(("name" = String, Path)),
    responses(
        (status = 200, description = "The source", body = SourceView),
        (status = 404, description = "No such source", body = ErrorBody),
    ))]
pub async fn get_source(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<SourceView>, ApiError> {
    Ok(Json(source_view(&state, &find(&state, &name)?)))
}

/// Changes a source made through the API with a JSON merge patch (RFC 7396) of its fields.
#[utoipa::path(patch, path = "/v1/sources/{name}", tag = "sources", params(("name" = String, Path)),
    request_body(content = Object, description = "A JSON merge patch of the source's fields"),
    responses(
        (status = 200, description = "The changed source", body = SourceView),
        (status = 400, description = "Invalid; the message names the field", body = ErrorBody),
        (status = 413, description = "The body is over `server.max_body_bytes`", body = ErrorBody),
        (status = 404, description = "No such source", body = ErrorBody),
        (status = 409, description = "Defined in the config file, or the change breaks a route", body = ErrorBody),
    ))]
pub async fn patch_source(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: RequestBody,
) -> Result<Json<SourceView>, ApiError> {
    let s = patch::<SourceConfig>(&state, &name, body).await?;
    Ok(Json(source_view(&state, &s)))
}

/// Deletes a source made through the API; no route may still use it.
#[utoipa::path(delete, path = "/v1/sources/{name}", tag = "sources", params(("name" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such source", body = ErrorBody),
        (status = 409, description = "Defined in the config file, or still used by a route", body = ErrorBody),
    ))]
pub async fn delete_source(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    delete::<SourceConfig>(&state, &name).await
}

// ---- destinations ---------------------------------------------------------------------

/// The deliveries waiting and failed per destination (see [`super::counts`]).
async fn delivery_counts(state: &AppState) -> Result<Arc<Vec<DeliveryCounts>>, ApiError> {
    let store = state.store.clone();
    Ok(state
        .counts
        .get(|| async move { store.delivery_counts().await })
        .await?)
}

/// Destinations in name order, with their health and delivery counts.
#[utoipa::path(get, path = "/v1/destinations", tag = "destinations", params(PageQuery),
    responses(
        (status = 200, description = "A page of destinations", body = Page<DestinationView>),
        (status = 400, description = "A malformed parameter, named", body = ErrorBody),
    ))]
pub async fn list_destinations(
    State(state): State<Arc<AppState>>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Page<DestinationView>>, ApiError> {
    let (items, next_cursor) = page_of::<DestinationConfig>(&state, query)?;
    let counts = delivery_counts(&state).await?;
    let items = items
        .iter()
        .map(|d| destination_view(&state, d, &counts))
        .collect();
    Ok(Json(Page { items, next_cursor }))
}

/// Creates a destination.
#[utoipa::path(post, path = "/v1/destinations", tag = "destinations", request_body = DestinationConfig,
    responses(
        (status = 201, description = "Created", body = DestinationView),
        (status = 400, description = "Invalid; the message names the field", body = ErrorBody),
        (status = 413, description = "The body is over `server.max_body_bytes`", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
    ))]
pub async fn create_destination(
    State(state): State<Arc<AppState>>,
    body: RequestBody,
) -> Result<Response, ApiError> {
    let (d, location) = create::<DestinationConfig>(&state, body).await?;
    let counts = delivery_counts(&state).await?;
    Ok(created(location, destination_view(&state, &d, &counts)))
}

/// One destination with its health.
#[utoipa::path(get, path = "/v1/destinations/{name}", tag = "destinations", params(("name" = String, Path)),
    responses(
        (status = 200, description = "The destination", body = DestinationView),
        (status = 404, description = "No such destination", body = ErrorBody),
    ))]
pub async fn get_destination(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<DestinationView>, ApiError> {
    let d = find(&state, &name)?;
    let counts = delivery_counts(&state).await?;
    Ok(Json(destination_view(&state, &d, &counts)))
}

/// Changes a destination made through the API with a JSON merge patch (RFC 7396). Planned
/// deliveries keep the URL and headers they were rendered with.
#[utoipa::path(patch, path = "/v1/destinations/{name}", tag = "destinations", params(("name" = String, Path)),
    request_body(content = Object, description = "A JSON merge patch of the destination's fields"),
    responses(
        (status = 200, description = "The changed destination", body = DestinationView),
        (status = 400, description = "Invalid; the message names the field", body = ErrorBody),
        (status = 413, description = "The body is over `server.max_body_bytes`", body = ErrorBody),
        (status = 404, description = "No such destination", body = ErrorBody),
        (status = 409, description = "Defined in the config file", body = ErrorBody),
    ))]
pub async fn patch_destination(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: RequestBody,
) -> Result<Json<DestinationView>, ApiError> {
    let d = patch::<DestinationConfig>(&state, &name, body).await?;
    let counts = delivery_counts(&state).await?;
    Ok(Json(destination_view(&state, &d, &counts)))
}

/// Deletes a destination made through the API; no route may still use it. Deliveries
/// already planned for it are still attempted.
#[utoipa::path(delete, path = "/v1/destinations/{name}", tag = "destinations", params(("name" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such destination", body = ErrorBody),
        (status = 409, description = "Defined in the config file, or still used by a route", body = ErrorBody),
    ))]
pub async fn delete_destination(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    delete::<DestinationConfig>(&state, &name).await
}

// ---- routes -----------------------------------------------------------------------------

/// Routes in name order.
#[utoipa::path(get, path = "/v1/routes", tag = "routes", params(PageQuery),
    responses(
        (status = 200, description = "A page of routes", body = Page<RouteView>),
        (status = 400, description = "A malformed parameter, named", body = ErrorBody),
    ))]
pub async fn list_routes(
    State(state): State<Arc<AppState>>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Page<RouteView>>, ApiError> {
    let (items, next_cursor) = page_of::<RouteConfig>(&state, query)?;
    let items = items.iter().map(|r| route_view(&state, r)).collect();
    Ok(Json(Page { items, next_cursor }))
}

/// Creates a route: its plugins must be loaded, its source and destinations must exist.
/// Events accepted from then on take it.
#[utoipa::path(post, path = "/v1/routes", tag = "routes", request_body = RouteConfig,
    responses(
        (status = 201, description = "Created", body = RouteView),
        (status = 400, description = "Invalid; the message names the field", body = ErrorBody),
        (status = 413, description = "The body is over `server.max_body_bytes`", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
    ))]
pub async fn create_route(
    State(state): State<Arc<AppState>>,
    body: RequestBody,
) -> Result<Response, ApiError> {
    let (r, location) = create::<RouteConfig>(&state, body).await?;
    Ok(created(location, route_view(&state, &r)))
}

/// One route.
#[utoipa::path(get, path = "/v1/routes/{name}", tag = "routes", params(("name" = String, Path)),
    responses(
        (status = 200, description = "The route", body = RouteView),
        (status = 404, description = "No such route", body = ErrorBody),
    ))]
pub async fn get_route(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<RouteView>, ApiError> {
    Ok(Json(route_view(&state, &find(&state, &name)?)))
}

/// Changes a route made through the API with a JSON merge patch (RFC 7396).
#[utoipa::path(patch, path = "/v1/routes/{name}", tag = "routes", params(("name" = String, Path)),
    request_body(content = Object, description = "A JSON merge patch of the route's fields"),
    responses(
        (status = 200, description = "The changed route", body = RouteView),
        (status = 400, description = "Invalid; the message names the field", body = ErrorBody),
        (status = 413, description = "The body is over `server.max_body_bytes`", body = ErrorBody),
        (status = 404, description = "No such route", body = ErrorBody),
        (status = 409, description = "Defined in the config file", body = ErrorBody),
    ))]
pub async fn patch_route(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: RequestBody,
) -> Result<Json<RouteView>, ApiError> {
    let r = patch::<RouteConfig>(&state, &name, body).await?;
    Ok(Json(route_view(&state, &r)))
}

/// Deletes a route made through the API.
#[utoipa::path(delete, path = "/v1/routes/{name}", tag = "routes", params(("name" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such route", body = ErrorBody),
        (status = 409, description = "Defined in the config file", body = ErrorBody),
    ))]
pub async fn delete_route(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    delete::<RouteConfig>(&state, &name).await
}
