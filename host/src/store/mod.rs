//! The store stage: where an accepted event is kept and queued for the pipeline, where the
//! pipeline records what it decided, and where deliveries wait for their next attempt.
//!
//! One small trait, [`Store`]; [`SqliteStore`] is the embedded backend (a file in the data
//! dir, or in memory for unit tests). The trait is shaped for a shared database too:
//! deliveries are claimed with a lease rather than held in memory.

mod postgres;
mod sqlite;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use utoipa::ToSchema;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::event::{Event, Pairs};
pub use crate::pace::Limit;
use crate::plugin::PluginVerdict;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `server.queue_capacity` events are waiting, or being stored.
    #[error("the queue is full ({0} events waiting or being stored); try again later")]
    QueueFull(usize),
    /// The events waiting, or being stored, take up `server.queue_max_bytes`.
    #[error("the queue is full ({0} bytes of events waiting or being stored); try again later")]
    QueueBytesFull(usize),
    #[error("the gateway is shutting down")]
    Closed,
    #[error("database error: {0}")]
    Db(String),
    /// A listing ran past its time budget and was stopped.
    #[error(
        "the query was stopped after {0:?}: its filters match little of a large store; narrow it with `since` and `until`"
    )]
    TooSlow(std::time::Duration),
}

/// How long an event listing may run: one whose filters match little of a large store
/// (a rare type must be read out of each body) is stopped rather than keep a reading
/// connection busy for minutes.
pub const LIST_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

/// What ingest asked the store to do with an idempotency key.
#[derive(Clone, Debug)]
pub struct Idempotency {
    pub key: String,
    /// A repeat of the key within this many milliseconds is a duplicate.
    pub window_ms: u64,
}

/// The answer to an insert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// A new event, committed and queued.
    New,
    /// The idempotency key was seen within the window: this is the original event's id.
    Duplicate(String),
}

/// Where events live and queue and where deliveries wait.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Commits the event and queues it for the pipeline. When this returns `Ok`, the event
    /// survives a crash and the sender may be told it is accepted. Until then the event
    /// counts against the queue's room (`QueueFull`, `QueueBytesFull`), so that a store that
    /// stops answering cannot fill the memory with events waiting for it. The caller must
    /// see the call through (requests that change something run as tasks of their own,
    /// `api::see_through`): an event committed by a call given up half-way would not be
    /// queued until the next start (or, on a shared store, until its claim runs out).
    async fn insert_event(
        &self,
        event: Event,
        idempotency: Option<Idempotency>,
    ) -> Result<Inserted, StoreError>;

    /// The next queued event, waiting for one. `None` once the store is closed and the
    /// queue is empty.
    async fn next_event(&self) -> Option<Event>;

    /// Stops accepting events; queued ones are still handed out.
    fn close(&self);

    /// Records what the routes decided for an event (run `event.run`) and the deliveries
    /// they planned (due at `now`), and marks it processed: all at once. Returns the ids of
    /// the deliveries inserted with a lease (`NewDelivery::lease_until`): the caller sends
    /// those itself. A run that is no longer queued (completed already — on a shared
    /// store, by an instance that took longer than its lease and was taken over — or
    /// superseded by a replay) records nothing and is answered `Completion::Stale`: what
    /// the first completion stored stands, even if this one planned other deliveries
    /// (another config, another plugin version). A delivery that already existed is left
    /// as it is and not returned. Either way the pipeline is done with this
    /// run of the event: if the commit failed, the event stays queued in the store and is
    /// handed out again after a growing pause (`EventQueue::retry_later`; on a shared
    /// store, with its claim renewed).
    async fn complete_event(
        &self,
        event: &Event,
        outcomes: Vec<RouteOutcome>,
        deliveries: Vec<NewDelivery>,
        now: u64,
    ) -> Result<Completion, StoreError>;

    /// Queues a stored event again for the current plugins; its deliveries get new ids.
    /// `false` if there is no such event.
    async fn replay(&self, event_id: &str) -> Result<bool, StoreError>;

    /// Claims up to `limit` pending deliveries that are due at `now`, whose destination
    /// is active and within `scope`, leasing them until `lease_until`.
    async fn claim_due(
        &self,
        now: u64,
        lease_until: u64,
        limit: usize,
        scope: &ClaimScope,
    ) -> Result<Vec<DueDelivery>, StoreError>;

    /// When the earliest pending delivery of an active destination that is not leased at
    /// `now` can be claimed within `scope`, if any. (A lease that runs out is found by the
    /// next claim: the dispatcher claims at least twice a second.)
    async fn next_due_at(&self, now: u64, scope: &ClaimScope) -> Result<Option<u64>, StoreError>;

    /// Puts off a pending delivery whose lease the caller holds until `until`, its slot
    /// under its destination's rate limit, releasing the lease, without recording an
    /// attempt. It is marked paced ([`DueDelivery::paced`]) until its next attempt is
    /// recorded or a restart of its destination. `false` if there is no such pending
    /// delivery.
    async fn defer_delivery(&self, delivery_id: &str, until: u64) -> Result<bool, StoreError>;

    /// A slot under a rate limit of `rate` a second, asked at `now` (ms), by the GCRA of
    /// [`crate::pace`]: `now`, taken (send the delivery, admit the event); or the later
    /// time of the next free slot — taken if it is within the limit's horizon
    /// ([`Limit::horizon`]): for a destination's delivery, which is put off until then, and
    /// for a plugin's request that may wait that long; not for a source's event, which is
    /// refused. The limits are the store's,
    /// so that gateways sharing a store share them; setting a destination ACTIVE
    /// ([`Store::set_destination_state`]) starts its limit afresh.
    async fn take_slot(&self, limit: Limit<'_>, now: u64, rate: f64) -> Result<u64, StoreError>;

    /// Records one attempt of a delivery and what follows from it, at once — the attempt
    /// after `attempts_before` (the count it was claimed with). `false`, with nothing
    /// written, if the delivery does not have that count (this attempt was recorded
    /// already, by a try whose answer was lost; or the delivery is gone), so that a
    /// failed record can be tried again without counting an attempt twice.
    async fn record_attempt(
        &self,
        delivery_id: &str,
        attempts_before: u32,
        attempt: Attempt,
        next: AttemptNext,
    ) -> Result<bool, StoreError>;

    /// Records the state a destination's attempts led to, unless the stored state is of a
    /// newer epoch than `state.epoch`: a state decided before a restart (here or, on a
    /// shared store, on another instance) does not overwrite the restart.
    async fn record_destination_state(&self, state: &DestinationState) -> Result<(), StoreError>;

    /// The stored state of every destination that has one.
    async fn destination_states(&self) -> Result<Vec<DestinationState>, StoreError>;

    /// Sets a destination's state (a restart) and begins a new epoch of it, returned.
    /// Setting it active makes its pending deliveries due at `now`, to be paced afresh: its
    /// rate limit starts over and none keeps a slot.
    async fn set_destination_state(
        &self,
        state: &DestinationState,
        now: u64,
    ) -> Result<i64, StoreError>;

    /// Pending and failed delivery counts per destination.
    async fn delivery_counts(&self) -> Result<Vec<DeliveryCounts>, StoreError>;

    /// The sources, destinations and routes made through the management API.
    async fn managed_objects(&self) -> Result<Vec<ManagedObject>, StoreError>;

    /// Creates or replaces a managed object.
    async fn put_managed(&self, object: ManagedObject, now: u64) -> Result<(), StoreError>;

    /// Deletes a managed object (nothing happens if there is none).
    async fn delete_managed(&self, kind: &str, name: &str) -> Result<(), StoreError>;

    /// An event with everything recorded about it.
    async fn get_event(&self, id: &str) -> Result<Option<EventRecord>, StoreError>;

    /// Deliveries in the order they were created, optionally of one status (and, for a
    /// status other than delivered, of one destination), after a cursor.
    async fn list_deliveries(
        &self,
        status: Option<DeliveryStatus>,
        destination: Option<&str>,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, DeliveryRecord)>, StoreError>;

    /// Events, newest first, matching `filter`, after the cursor `(received_at, id)`.
    async fn list_events(
        &self,
        filter: EventFilter,
        after: Option<(u64, String)>,
        limit: usize,
    ) -> Result<Vec<EventSummary>, StoreError>;

    /// Keeps an index on each of these body fields (`store.indexed_fields`, paths as in
    /// [`FieldMatch::path`]) and drops the ones of fields no longer listed, so that a list
    /// filtered by an indexed field reads only the events that hold its value, newest
    /// first, instead of every body. Returns the fields it had to index (the others were
    /// indexed already) and how many indexes it dropped.
    async fn index_fields(&self, fields: Vec<Vec<String>>) -> Result<FieldIndexes, StoreError>;

    /// Makes a pending or failed delivery due at `now` (a retry by hand), or held if its
    /// destination is not ACTIVE (a restart sends it). `false` if there is no such delivery
    /// or it was delivered or skipped.
    async fn retry_delivery(&self, id: &str, now: u64) -> Result<bool, StoreError>;

    /// Looks at up to `limit` failed deliveries that come after `after` in the store's
    /// order, oldest first, and makes those to `destination` planned in `[since, until)`
    /// (ms) due at `now`, as [`Store::retry_delivery`] does one (held if the destination is
    /// not ACTIVE). Returns how many it changed, and where the next call goes on (`None`:
    /// there is nothing more to look at). A recovery walks the failed deliveries once, even
    /// if some fail again meanwhile, in writes bounded by what they look at (the failed
    /// deliveries of other destinations and other times included).
    async fn recover_deliveries(
        &self,
        destination: &str,
        since: u64,
        until: u64,
        after: i64,
        now: u64,
        limit: usize,
    ) -> Result<(usize, Option<i64>), StoreError>;

    /// Per minute from `since` (ms, rounded down to a minute) on: events received, attempts
    /// that delivered, attempts that failed.
    async fn minute_stats(&self, since: u64) -> Result<Vec<MinuteStats>, StoreError>;

    /// Events accepted and not yet processed, held by this gateway.
    fn queue_depth(&self) -> usize;

    /// Events being stored by ingest (see [`Store::insert_event`]), if any, and for how
    /// long the store has stored none of them: since the last one was stored or since they
    /// began to wait. A long time is a store that stopped answering (`/readyz`).
    fn storing(&self) -> Option<(usize, Duration)>;

    /// How long ago the store refused the latest event ingest gave it — failed to store it
    /// (a full disk, a database gone read-only), not a full queue — and why; `None` once it
    /// has stored one since, or [`REFUSAL_REMEMBERED`] after. A store that refuses is not
    /// ready (`/readyz`).
    fn refused(&self) -> Option<(Duration, String)>;

    /// Whether `events` replays taking up `bytes` (`EventSummary::queued_bytes`) fit into
    /// the queue now: `QueueFull`, `QueueBytesFull` or `Closed` if not. Each replay checks
    /// again for itself; this lets a bulk replay refuse a page as a whole.
    fn queue_fits(&self, events: usize, bytes: usize) -> Result<(), StoreError>;

    /// Whether several gateways may share this store (each with its own config file).
    fn shared(&self) -> bool {
        false
    }

    /// Resolves, with the reason, once the store has failed in a way that makes going on
    /// unsafe; the gateway stops then. SQLite: a sync of its write-ahead log failed, so
    /// writes since the last good sync may not be on disk, and a later sync that succeeds
    /// would not prove otherwise (the kernel may have dropped the pages it could not write),
    /// so nothing can be acknowledged as durable any more. Never resolves otherwise.
    async fn fatal(&self) -> String {
        std::future::pending().await
    }

    /// For a store that several gateways share: a number that changes whenever a managed
    /// object changes, so that each gateway notices the others' changes. `None` for a store
    /// only this gateway uses.
    async fn managed_version(&self) -> Result<Option<i64>, StoreError> {
        Ok(None)
    }

    /// On a shared store, what changed among the managed objects after version `since`:
    /// the objects made or changed (as they are now) and the names deleted, and the
    /// version that brings the reader to. A store only this gateway uses (no
    /// `managed_version`) keeps no such log: nobody else changes them, so nothing did.
    async fn managed_changes(&self, since: i64) -> Result<ManagedChanges, StoreError> {
        Ok(ManagedChanges {
            version: since,
            ..ManagedChanges::default()
        })
    }

    /// How many deliveries are pending, and when the oldest of them was created.
    async fn backlog(&self) -> Result<(u64, Option<u64>), StoreError>;

    /// Deletes up to `limit` idempotency keys recorded before `before` (past the idempotency
    /// window, where ingest no longer looks), the oldest first; returns how many.
    async fn purge_idempotency(&self, before: u64, limit: usize) -> Result<usize, StoreError>;

    /// The value `plugin` keeps under `key` (the WIT `state` interface), unless it expired
    /// by `now`.
    async fn state_get(
        &self,
        plugin: &str,
        key: &str,
        now: u64,
    ) -> Result<Option<String>, StoreError>;

    /// Sets `plugin`'s `key` to `value` until `expires_at`, or deletes it (`None`). A set is
    /// answered once committed; the event's own record, which follows the plugin's call,
    /// is synced after it, so a recorded event never has its plugins' writes missing.
    async fn state_put(
        &self,
        plugin: &str,
        key: &str,
        value: Option<String>,
        expires_at: u64,
    ) -> Result<(), StoreError>;

    /// Sets `plugin`'s `key` to `value` until `expires_at` only if, at `now`, it holds
    /// `expected` (`None`: nothing, or a value expired), in one step; whether it did.
    async fn state_swap(
        &self,
        plugin: &str,
        key: &str,
        expected: Option<String>,
        value: String,
        expires_at: u64,
        now: u64,
    ) -> Result<bool, StoreError>;

    /// Up to `limit` of `plugin`'s values not expired by `now` whose key starts with
    /// `prefix`, by key (bytewise), after the key `after`.
    async fn state_list(
        &self,
        plugin: &str,
        prefix: &str,
        after: &str,
        limit: usize,
        now: u64,
    ) -> Result<Vec<StateEntry>, StoreError>;

    /// Deletes up to `limit` of `plugin`'s values whose key starts with `prefix` (all of
    /// them for an empty one), by key; returns how many.
    async fn state_remove_prefix(
        &self,
        plugin: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<usize, StoreError>;

    /// Deletes up to `limit` plugin values expired by `now`; returns how many.
    async fn purge_state(&self, now: u64, limit: usize) -> Result<usize, StoreError>;

    /// Erases these events for good, in one transaction, each with its route outcomes, its
    /// deliveries (pending ones too: they are not sent) and their attempts — a person's
    /// data on request, a device's history. An event still being processed (queued) or with
    /// a delivery on its way (leased at `now`) is left as it is and named in
    /// [`Erased::busy`], to be erased once it settles; an id with no event is in neither
    /// list. (Its idempotency key stays until the window ends: it holds no payload, and a
    /// sender's retry of the erased event is answered as a duplicate, not stored again.)
    async fn erase_events(&self, ids: Vec<String>, now: u64) -> Result<Erased, StoreError>;

    /// Looks at up to `limit` events received before `before`'s bounds, the oldest first
    /// after `after`, and deletes in one transaction the processed ones that retention lets
    /// go: those received before `before.delivered` that have no pending delivery, no
    /// failed delivery made by their latest run, and no route that failed in their latest
    /// run (a replay supersedes the failures of earlier runs); and, if `before.failed` is
    /// set, those received before it that have no pending delivery, whatever became of the
    /// rest. Returns how many it deleted, and where the next call goes on (`None`: there is
    /// nothing more to look at). A purge is a series of short writes, each bounded by what
    /// it looks at — kept events included, however many are kept — so that ingest's
    /// commits are not kept waiting behind one long one.
    async fn purge_events(
        &self,
        before: PurgeBefore,
        after: Option<PurgeCursor>,
        limit: usize,
    ) -> Result<(usize, Option<PurgeCursor>), StoreError>;
}

/// One value a plugin keeps (`Store::state_list`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct StateEntry {
    pub key: String,
    pub value: String,
    /// When it expires, in ms since the Unix epoch.
    pub expires_at: u64,
}

/// A time in ms as the stores keep it (a signed 64-bit integer), the far future capped.
pub(crate) fn sql_ms(ms: u64) -> i64 {
    ms.min(i64::MAX as u64) as i64
}

/// The least key greater than every key that starts with `prefix` (bytewise, as the
/// stores compare keys: SQLite's `BINARY`, PostgreSQL's `"C"` collation), or `None` when
/// no such bound is needed (an empty prefix).
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    (!prefix.is_empty()).then(|| format!("{prefix}{}", char::MAX))
}

/// An `event_type` filter as SQLite's `GLOB` takes it: `*` as it is, the other characters
/// `GLOB` gives a meaning to (`?`, `[`) bracketed, so that only `*` is a wildcard.
pub(crate) fn type_glob(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        match c {
            '?' => out.push_str("[?]"),
            '[' => out.push_str("[[]"),
            c => out.push(c),
        }
    }
    out
}

/// An `event_type` filter as `LIKE` takes it (PostgreSQL, whose `LIKE` escapes with `\`):
/// `*` as `%`, and `%`, `_` and `\` escaped, so that only `*` is a wildcard.
pub(crate) fn type_like(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        match c {
            '*' => out.push('%'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// Which events `list_events` returns; every field narrows.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub source: Option<String>,
    pub status: Option<EventStatus>,
    /// The body's top-level `type` field (or `event_type`): a name, or a pattern in which
    /// `*` stands for any characters (`attachment.*`), as a destination's `event_types`.
    pub event_type: Option<String>,
    /// Received at or after (ms since the epoch).
    pub since: Option<u64>,
    /// Received before (ms since the epoch).
    pub until: Option<u64>,
    /// Some route had this result in the event's latest run.
    pub route_result: Option<RouteResultKind>,
    /// A field of the body equal to a value (`field=iccid&equals=8945…`).
    pub field: Option<FieldMatch>,
}

/// A field of an event's body (a JSON object) and the text it must equal. A string
/// equals its value; a number, `equals` read as a JSON number of the same value (`1.5`
/// matches `1.50` and `15e-1`); `true`, `false` and `null` their names; an object or an
/// array nothing. Every body is read, as for the type, unless the field is indexed
/// (`Store::index_fields`): on a large store, narrow the list by source and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldMatch {
    /// The object keys leading to it: `["data", "iccid"]` for `data.iccid`.
    pub path: Vec<String>,
    pub equals: String,
}

impl FieldMatch {
    /// From `field` — object keys separated by dots, none empty and none holding `"` or
    /// `\` — and `equals`; the error says what is wrong with `field`.
    pub fn parse(field: &str, equals: String) -> Result<Self, String> {
        let path: Vec<String> = field.split('.').map(String::from).collect();
        if let Some(bad) = (path.iter()).find(|k| k.is_empty() || k.contains(['"', '\\'])) {
            return Err(format!(
                "`{field}` is not a field: keys separated by dots, none empty or holding `\"` or `\\` (`{bad}`)"
            ));
        }
        Ok(Self { path, equals })
    }

    /// `equals` as a JSON number, if it is one: what a number field is compared with.
    pub fn number(&self) -> Option<serde_json::Number> {
        serde_json::from_str::<serde_json::Number>(&self.equals).ok()
    }
}

/// What [`Store::index_fields`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FieldIndexes {
    /// The fields it indexed (their events were read to build it).
    pub created: Vec<String>,
    /// The indexes of fields no longer listed.
    pub dropped: usize,
}

/// Brings the store's body field indexes in line with `store.indexed_fields` (at start, and
/// at a reload whose list is not the one last applied), logging what it built and how long
/// that took.
pub async fn index_fields(store: &dyn Store, fields: &[String]) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let paths = fields
        .iter()
        .map(|f| f.split('.').map(String::from).collect());
    let changed = store.index_fields(paths.collect()).await?;
    if !changed.created.is_empty() || changed.dropped > 0 {
        tracing::info!(
            created = ?changed.created,
            dropped = changed.dropped,
            took_ms = started.elapsed().as_millis() as u64,
            "Body field indexes changed (store.indexed_fields)."
        );
    }
    Ok(())
}

/// The name of the index on a body field: `events_field_` and a hash of its key, the
/// expression the store indexes (which holds the path), so that it fits any name length
/// and a key defined otherwise by a later version is a new index, the old one dropped.
pub fn field_index_name(key: &str) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(key.as_bytes());
    format!("{FIELD_INDEX_PREFIX}{}", &hex::encode(hash)[..16])
}

/// What names the store's body field indexes (and only them).
pub const FIELD_INDEX_PREFIX: &str = "events_field_";

/// The newest `limit` of lists each newest first (a list by an indexed field is one walk
/// of the index per value the field may be stored as, see the stores' `list_events`).
fn newest_of(runs: Vec<Vec<EventSummary>>, limit: usize) -> Vec<EventSummary> {
    let mut all: Vec<EventSummary> = runs.into_iter().flatten().collect();
    all.sort_by(|a, b| (b.received_at, &b.id).cmp(&(a.received_at, &a.id)));
    all.dedup_by(|a, b| a.id == b.id);
    all.truncate(limit);
    all
}

/// A route's result without its details: what the event list filters on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RouteResultKind {
    Delivering,
    Dropped,
    /// Dead-lettered: a plugin failed and the route's `on_error` is `dead-letter`.
    Failed,
}

impl RouteResultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteResultKind::Delivering => "delivering",
            RouteResultKind::Dropped => "dropped",
            RouteResultKind::Failed => "failed",
        }
    }
}

/// An event as the event list shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EventSummary {
    pub id: String,
    pub source: String,
    /// Milliseconds since the Unix epoch.
    pub received_at: u64,
    pub status: EventStatus,
    /// The body's top-level `type` (or `event_type`) when it is JSON and has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// How many of its deliveries are pending, delivered, failed.
    pub pending: u64,
    pub delivered: u64,
    pub failed: u64,
    /// How many of its routes failed (dead-lettered it) in its latest run: it is kept
    /// until replayed.
    pub failed_routes: u64,
    /// What it takes up queued again: its body and headers, in bytes.
    #[serde(skip)]
    pub queued_bytes: u64,
}

/// One minute of traffic.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct MinuteStats {
    /// The minute's start, ms since the Unix epoch.
    pub minute: u64,
    pub received: u64,
    /// Attempts that delivered (2xx).
    pub delivered: u64,
    /// Attempts that did not.
    pub failed: u64,
}

/// How long [`Store::refused`] tells of a refusal unless an event is stored meanwhile:
/// `/readyz` says not ready as long, so that a load balancer sends senders to another
/// instance; when none comes to this one any more, it is offered them again after this
/// long, to find out whether its store writes again.
pub const REFUSAL_REMEMBERED: Duration = Duration::from_secs(30);

/// The first pause before an event whose outcome could not be recorded is processed
/// again, and the longest (see `EventQueue::retry_later`).
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The room an event being stored takes in the queue (see [`EventQueue::accepting`]),
/// until [`Storing::settle`] gives the store's answer (or it is dropped: given up).
#[must_use]
struct Storing<'a> {
    queue: &'a EventQueue,
    bytes: usize,
}

impl Storing<'_> {
    /// The store's answer to the event: a new one is queued, in the room it took; a
    /// refusal (`StoreError::Db`) is remembered, and a stored event forgets the last one
    /// ([`Store::refused`]). One lock of the queue.
    fn settle(self, inserted: &Result<Inserted, StoreError>, event: Event) {
        let events = self.queue;
        let mut queue = events.lock();
        self.release(&mut queue);
        // (Released here: the drop must not release it again.)
        std::mem::forget(self);
        match inserted {
            Ok(new) => {
                queue.refused = None;
                if *new == Inserted::New {
                    queue.push(event);
                    drop(queue);
                    events.ready.notify_one();
                }
            }
            Err(StoreError::Db(cause)) => {
                queue.refused = Some((tokio::time::Instant::now(), cause.clone()));
            }
            Err(_) => {}
        }
    }

    fn release(&self, queue: &mut QueueState) {
        queue.storing -= 1;
        queue.storing_bytes -= self.bytes;
        queue.storing_progress = Some(std::time::Instant::now());
    }
}

impl Drop for Storing<'_> {
    fn drop(&mut self) {
        self.release(&mut self.queue.lock());
    }
}

/// The events accepted and not yet processed, in memory, in order: both backends hand
/// them to the pipeline from here. It also knows which events this gateway holds (queued
/// here or being processed), so that a shared store can keep its claims on them alive.
struct EventQueue {
    inner: std::sync::Mutex<QueueState>,
    ready: tokio::sync::Notify,
    capacity: usize,
    /// The most bytes of events waiting (`with_queue_max_bytes` of each store).
    max_bytes: std::sync::atomic::AtomicUsize,
}

/// How many bytes of events may wait in memory unless `server.queue_max_bytes` says.
pub const QUEUE_MAX_BYTES: usize = 256 << 20;

/// What an event takes up in the queue: its body and headers.
fn queued_size(event: &Event) -> usize {
    event.body.as_bytes().len()
        + event
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

#[derive(Default)]
struct QueueState {
    events: std::collections::VecDeque<Event>,
    /// What the events waiting take up (`queued_size`).
    bytes: usize,
    /// Event id → how many times it is held (queued or in the pipeline): a replay can
    /// queue an event again while its previous run is still being processed.
    held: std::collections::HashMap<String, usize>,
    /// Event id → how many times in a row its outcome could not be recorded.
    failures: std::collections::HashMap<String, u32>,
    /// Events accepted (`EventQueue::accepting`) and being stored, not queued yet, and what
    /// they take up: they count against the queue's room as the events waiting do.
    storing: usize,
    storing_bytes: usize,
    /// When the last event being stored was stored (or given up), or the first of those
    /// being stored now began to wait: see [`Store::storing`].
    storing_progress: Option<std::time::Instant>,
    /// When the store last refused an event ingest gave it, and why (see
    /// [`Store::refused`]).
    refused: Option<(tokio::time::Instant, String)>,
    closed: bool,
}

impl QueueState {
    /// Queues an event and counts the hold on it.
    fn enqueue(&mut self, event: Event) {
        *self.held.entry(event.id.clone()).or_default() += 1;
        self.bytes += queued_size(&event);
        self.events.push_back(event);
    }

    /// See [`EventQueue::push`].
    fn push(&mut self, event: Event) {
        if event.run > 0 {
            let before = self.events.len();
            let mut dropped = 0;
            self.events.retain(|e| {
                let superseded = e.id == event.id && e.run < event.run;
                if superseded {
                    dropped += queued_size(e);
                }
                !superseded
            });
            self.bytes -= dropped;
            for _ in self.events.len()..before {
                self.release(&event.id);
            }
        }
        self.enqueue(event);
    }

    /// The room taken: events waiting and being stored, and their bytes.
    fn taken(&self) -> (usize, usize) {
        (
            self.events.len() + self.storing,
            self.bytes + self.storing_bytes,
        )
    }

    fn release(&mut self, id: &str) {
        if let Some(n) = self.held.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(id);
            }
        }
    }
}

impl EventQueue {
    fn new(events: Vec<Event>, capacity: usize) -> Self {
        if !events.is_empty() {
            tracing::info!(
                events = events.len(),
                "Resuming events accepted before the last stop."
            );
        }
        let queue = Self {
            inner: std::sync::Mutex::new(QueueState::default()),
            ready: tokio::sync::Notify::new(),
            capacity,
            max_bytes: QUEUE_MAX_BYTES.into(),
        };
        for e in events {
            queue.push(e);
        }
        queue
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `event` may be accepted: not closed, not full — of events, nor of bytes
    /// (large bodies arriving faster than the plugins take them would otherwise fill the
    /// memory: 10,000 waiting events of 1 MiB are 10 GiB). Events being stored count as
    /// waiting ones: a store that stops answering (a stalled disk, a hung database) holds
    /// them, and senders that go on posting meanwhile are refused once the room is taken
    /// instead of piling up in memory. The room is taken until the store answers
    /// ([`Storing::settle`]: a new event is queued in it) or the wait is given up (the
    /// `Storing` dropped: not stored).
    fn accepting(&self, event: &Event) -> Result<Storing<'_>, StoreError> {
        let mut queue = self.lock();
        if queue.closed {
            return Err(StoreError::Closed);
        }
        let (events, bytes) = queue.taken();
        if events >= self.capacity {
            return Err(StoreError::QueueFull(events));
        }
        let max = self.max_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let size = queued_size(event);
        // (One event always fits into an empty queue, however large.)
        if bytes > 0 && bytes + size > max {
            return Err(StoreError::QueueBytesFull(bytes));
        }
        if queue.storing == 0 {
            queue.storing_progress = Some(std::time::Instant::now());
        }
        queue.storing += 1;
        queue.storing_bytes += size;
        Ok(Storing {
            queue: self,
            bytes: size,
        })
    }

    /// Whether `events` more events taking up `bytes` may be queued again (replays): not
    /// closed, and room for them in number and in bytes — as for an accepted event, a
    /// replay into an empty queue always fits.
    fn fits(&self, events: usize, bytes: usize) -> Result<(), StoreError> {
        let queue = self.lock();
        if queue.closed {
            return Err(StoreError::Closed);
        }
        let (taken, taken_bytes) = queue.taken();
        if taken + events > self.capacity {
            return Err(StoreError::QueueFull(taken));
        }
        let max = self.max_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if taken_bytes > 0 && taken_bytes + bytes > max {
            return Err(StoreError::QueueBytesFull(taken_bytes));
        }
        Ok(())
    }

    /// Queues an event. A replay (run above 0) supersedes earlier runs of it still waiting
    /// here: they are not handed out.
    fn push(&self, event: Event) {
        self.lock().push(event);
        self.ready.notify_one();
    }

    /// Queues events taken over from elsewhere (another instance's expired claims), except
    /// those this gateway already holds.
    fn adopt(&self, events: Vec<Event>) {
        let mut queue = self.lock();
        for event in events {
            if !queue.held.contains_key(&event.id) {
                queue.enqueue(event);
            }
        }
        drop(queue);
        self.ready.notify_one();
    }

    /// The pipeline is finished with one run of this event, its outcome recorded.
    fn done(&self, id: &str) {
        let mut queue = self.lock();
        queue.release(id);
        // (Empty but after a failed commit: no hashing on the hot path.)
        if !queue.failures.is_empty() {
            queue.failures.remove(id);
        }
    }

    /// The pipeline is finished with one run of this event, but its outcome could not be
    /// recorded: how many times in a row that has now happened.
    fn failed(&self, id: &str) -> u32 {
        let mut queue = self.lock();
        queue.release(id);
        let failures = queue.failures.entry(id.to_string()).or_default();
        *failures += 1;
        *failures
    }

    /// Queues again an event whose outcome could not be recorded, unless the queue has
    /// closed meanwhile (the next start resumes it) or the event is no longer waiting
    /// (`still_queued` false: replayed or processed since).
    /// (A hold on the event here now is a replay's: the failed run released its own.)
    fn retry(&self, event: Event, still_queued: bool) {
        let mut queue = self.lock();
        if !still_queued || queue.closed || queue.held.contains_key(&event.id) {
            queue.failures.remove(&event.id);
            return;
        }
        queue.enqueue(event);
        drop(queue);
        self.ready.notify_one();
    }

    /// After an outcome that could not be recorded (see [`EventQueue::failed`]): queues the
    /// event again after a pause that doubles with each failure in a row (1 s, 2 s, … up
    /// to `max`), if `still_queued(id, run)` finds the store still has that run of it
    /// waiting. Until the store can say, nothing happens to the event: `still_queued` is
    /// asked again, the pause doubling, for as long as the queue is open (a shared store's
    /// outcome may have been recorded although its answer was lost, and what
    /// `still_queued` does about it must happen before the event is processed again).
    fn retry_later<F, Fut>(self: &Arc<Self>, event: Event, max: Duration, still_queued: F)
    where
        F: Fn(String, i64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<bool, StoreError>> + Send,
    {
        let failures = self.failed(&event.id);
        let mut delay = RETRY_FIRST
            .saturating_mul(1 << (failures - 1).min(6))
            .min(max);
        // (The pipeline's span carries the event id.)
        tracing::warn!(retry_in = ?delay, failures,
            "The store did not confirm the event's outcome; it is looked at again later.");
        let queue = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(delay).await;
                if queue.lock().closed {
                    // (Still queued in the store: the next start resumes it.)
                    return;
                }
                match still_queued(event.id.clone(), event.run as i64).await {
                    Ok(queued) => return queue.retry(event, queued),
                    Err(e) => {
                        delay = delay.saturating_mul(2).min(max);
                        tracing::warn!(event_id = %event.id, error = %e, retry_in = ?delay,
                            "Cannot tell whether the event's outcome was recorded; asking again later.");
                    }
                }
            }
        });
    }

    /// The ids of the events this gateway holds.
    fn held(&self) -> Vec<String> {
        self.lock().held.keys().cloned().collect()
    }

    /// How many more events fit: 0 once closed or full of bytes.
    fn room(&self) -> usize {
        let queue = self.lock();
        let max_bytes = self.max_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if queue.closed || queue.bytes >= max_bytes {
            0
        } else {
            self.capacity.saturating_sub(queue.events.len())
        }
    }

    async fn next(&self) -> Option<Event> {
        loop {
            // Register interest before checking, so a notify in between is not missed.
            let notified = self.ready.notified();
            {
                let mut queue = self.lock();
                if let Some(event) = queue.events.pop_front() {
                    queue.bytes -= queued_size(&event);
                    if !queue.events.is_empty() {
                        self.ready.notify_one();
                    }
                    return Some(event);
                }
                if queue.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_waiters();
    }

    /// Closed, and nothing held any more.
    fn finished(&self) -> bool {
        let queue = self.lock();
        queue.closed && queue.held.is_empty()
    }

    fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// See [`Store::storing`].
    fn storing(&self) -> Option<(usize, Duration)> {
        let queue = self.lock();
        let since = queue.storing_progress?;
        (queue.storing > 0).then(|| (queue.storing, since.elapsed()))
    }

    /// See [`Store::refused`].
    fn refused(&self) -> Option<(Duration, String)> {
        let queue = self.lock();
        let (at, cause) = queue.refused.as_ref()?;
        let ago = at.elapsed();
        (ago < REFUSAL_REMEMBERED).then(|| (ago, cause.clone()))
    }
}

/// The stats entry of minute `m`, made empty if there is none yet.
fn minute(minutes: &mut std::collections::BTreeMap<i64, MinuteStats>, m: i64) -> &mut MinuteStats {
    minutes.entry(m).or_insert(MinuteStats {
        minute: m as u64,
        received: 0,
        delivered: 0,
        failed: 0,
    })
}

/// A source, destination or route made through the management API, as stored: its JSON
/// is the same as the object's config-file form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedObject {
    /// `source`, `destination` or `route`.
    pub kind: String,
    pub name: String,
    pub body: String,
}

/// What changed among the managed objects after a version (`Store::managed_changes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ManagedChanges {
    /// The version these changes bring the reader to.
    pub version: i64,
    /// Made or changed, as they are now.
    pub changed: Vec<ManagedObject>,
    /// Deleted: kind and name.
    pub deleted: Vec<(String, String)>,
}

/// An event and its history, as `GET /v1/events/{id}` shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EventRecord {
    /// The event as accepted: id, source, received_at, method, path, query, headers,
    /// content_type, body (its JSON value, or text, or `{"base64": …}` when not UTF-8),
    /// body_encoding (`json`, `text`, `base64`: which of those), metadata, run.
    #[schema(value_type = Object)]
    pub event: Event,
    pub status: EventStatus,
    /// Each route's outcome, of every run (a replay is a new run): the plugin steps with
    /// each verdict, version (sha256) and duration, and the result.
    #[schema(value_type = Vec<Object>)]
    pub routes: Vec<serde_json::Value>,
    pub deliveries: Vec<DeliveryRecord>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    /// Accepted, waiting for the pipeline.
    Queued,
    /// The plugin chains have run; deliveries are recorded separately.
    Processed,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Queued => "queued",
            EventStatus::Processed => "processed",
        }
    }
}

/// What one route's plugin chain did with an event.
#[derive(Clone, Debug, Serialize)]
pub struct RouteOutcome {
    /// The route's index in the configuration.
    pub route: usize,
    /// The route's name (`[[routes]] name`, or its source's name for unnamed file routes).
    pub name: String,
    /// Which run of the event (0 first, +1 per replay).
    pub run: u32,
    pub steps: Vec<PluginStep>,
    pub result: RouteResult,
}

/// One plugin call of a chain.
#[derive(Clone, Debug, Serialize)]
pub struct PluginStep {
    pub plugin: String,
    /// The SHA-256 of the plugin version that ran.
    pub sha256: String,
    pub duration_us: u64,
    #[serde(flatten)]
    pub result: StepResult,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum StepResult {
    Verdict { verdict: PluginVerdict },
    Error { error: String },
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RouteResult {
    /// A plugin dropped the event.
    Dropped { plugin: String, reason: String },
    /// Deliveries were planned (see the event's deliveries).
    Delivering { deliveries: usize },
    /// A plugin failed (error, trap, deadline) or its verdict was unusable; the event is
    /// not delivered by this route.
    Failed { error: String },
}

impl RouteResult {
    pub fn kind(&self) -> RouteResultKind {
        match self {
            RouteResult::Dropped { .. } => RouteResultKind::Dropped,
            RouteResult::Delivering { .. } => RouteResultKind::Delivering,
            RouteResult::Failed { .. } => RouteResultKind::Failed,
        }
    }

    /// The name the API gives this result (its `result` field).
    pub fn as_str(&self) -> &'static str {
        self.kind().as_str()
    }
}

/// A delivery planned by the pipeline, its request fully rendered.
#[derive(Clone, Debug)]
pub struct NewDelivery {
    pub id: String,
    pub route: usize,
    pub destination: String,
    pub url: String,
    pub headers: Pairs,
    pub body: bytes::Bytes,
    /// `Pending` or `Skipped`.
    pub status: DeliveryStatus,
    /// A pending delivery's first attempt is due this long after it is stored (the first
    /// wait of its destination's `retry_schedule`, normally 0).
    pub delay_ms: u64,
    /// Claimed as it is inserted, until then: the pipeline hands it to the dispatcher at
    /// once instead of waiting for a claim. If the gateway dies first, the lease runs out
    /// and the delivery is claimed like any other.
    pub lease_until: Option<u64>,
}

/// How many of an event's route outcomes failed (dead-lettered it): stored on the event.
pub fn failed_routes(outcomes: &[RouteOutcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| o.result.kind() == RouteResultKind::Failed)
        .count()
}

/// Where a purge goes on from: the `(received_at, id)` of the last event it deleted.
pub type PurgeCursor = (u64, String);

/// What `Store::complete_event` did with a run of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// The run was queued: its outcomes and deliveries are stored, and these deliveries
    /// were inserted with a lease (the caller sends them).
    Recorded { leased: Vec<String> },
    /// The run was no longer queued (completed already, or superseded by a replay):
    /// nothing was recorded.
    Stale,
}

/// What retention deletes (`Store::purge_events`): events received before these times
/// (ms), delivered ones and, if set, failed ones — or before a source's own.
#[derive(Clone, Debug, Default)]
pub struct PurgeBefore {
    pub delivered: u64,
    pub failed: Option<u64>,
    /// Sources whose events have bounds of their own, each replacing the one above it
    /// names (`[[sources]] retention`).
    pub by_source: Vec<(String, SourceBounds)>,
}

/// A source's own retention bounds (ms), each in place of [`PurgeBefore`]'s.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SourceBounds {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<u64>,
}

impl PurgeBefore {
    /// Delivered events only.
    pub fn delivered(before: u64) -> Self {
        Self {
            delivered: before,
            ..Self::default()
        }
    }

    /// The bounds as SQL parameters: the walk's end (the latest bound of any), the
    /// delivered bound, the failed one (0 when unset: no event was received before it).
    fn bounds(&self) -> [i64; 3] {
        let failed = self.failed.unwrap_or(0);
        let end = (self.by_source.iter())
            .flat_map(|(_, b)| [b.delivered, b.failed])
            .flatten()
            .fold(self.delivered.max(failed), u64::max);
        [end, self.delivered, failed].map(|t| t.min(i64::MAX as u64) as i64)
    }

    /// The sources' own bounds as a JSON object by source name (`{"telemetry":
    /// {"delivered": ms}}`), for the stores' statements.
    fn sources_json(&self) -> String {
        let map: std::collections::BTreeMap<&str, SourceBounds> = (self.by_source.iter())
            .map(|(name, b)| (name.as_str(), *b))
            .collect();
        serde_json::to_string(&map).expect("bounds serialize")
    }
}

/// Whether a delivery's body is its event's body unchanged. The stores then keep no copy of
/// it (an empty body and `body_from_event` in the row) and read the event's body when the
/// delivery is claimed: most routes pass the body through, and it is most of the bytes
/// written per event.
pub fn body_from_event(event: &Event, delivery: &NewDelivery) -> bool {
    !delivery.body.is_empty() && delivery.body == event.body.0
}

/// How many due deliveries a claim of `limit` looks at in due order before it goes
/// destination by destination instead (see `ClaimScope::take_walked`).
pub fn claim_walk(limit: usize) -> usize {
    4 * limit
}

/// How many pending deliveries `Store::next_due_at` looks at in due order before it goes
/// destination by destination instead.
pub const NEXT_DUE_WALK: usize = 256;

/// Which pending deliveries a dispatcher may claim, by destination, and how many of each.
/// On a shared store another instance may know a destination this one does not (its
/// config file is newer or older, as in a rolling deploy): deliveries to destinations
/// outside `known` are left to the instances that know them, and taken here (to be failed
/// as no longer configured) only once they have been due for `orphaned_after_ms` with no
/// one taking them.
///
/// The stores walk the due deliveries in due order and take those in scope, each
/// destination up to its `room`; when the deliveries they may not take stand in the way in
/// numbers (a destination with a long backlog and no room), they go destination by
/// destination instead (each one's first due, by an index on (destination, due time), at
/// most its room; then the earliest of them all), skipping that backlog with one probe.
#[derive(Clone, Debug, Default)]
pub struct ClaimScope {
    /// The destinations this instance sends to; `None`: every destination.
    pub known: Option<Known>,
    /// How long a delivery to a destination outside `known` waits for another instance.
    pub orphaned_after_ms: u64,
    /// Destinations that may take fewer deliveries than the claim's limit: how many more
    /// attempts their lanes here can hold (0: none, left out of the claim and of the next
    /// due time).
    pub room: HashMap<String, usize>,
}

/// The names of the destinations an instance sends to, sorted once when its destinations
/// change and shared by every claim: a claim neither copies them nor scans them per row.
#[derive(Clone, Debug, Default)]
pub struct Known(Arc<Vec<String>>);

impl Known {
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort_unstable();
        names.dedup();
        Self(Arc::new(names))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.binary_search_by(|k| k.as_str().cmp(name)).is_ok()
    }

    /// The names, sorted (a query parameter on PostgreSQL).
    pub fn names(&self) -> &Vec<String> {
        &self.0
    }
}

impl ClaimScope {
    /// Every destination, at once, as many as the claim takes.
    pub fn any() -> Self {
        Self::default()
    }

    /// How many of `destination`'s deliveries a claim of `limit` may take.
    pub fn room_for(&self, destination: &str, limit: usize) -> usize {
        self.room
            .get(destination)
            .map_or(limit, |r| (*r).min(limit))
    }

    /// How long after its due time a delivery to `destination` is claimable here: at once,
    /// or, for a destination this instance does not know, once orphaned.
    pub fn wait_for(&self, destination: &str) -> u64 {
        match &self.known {
            Some(known) if !known.contains(destination) => self.orphaned_after_ms,
            _ => 0,
        }
    }

    /// The deliveries (their `seq`s) a claim of `limit` at `now` takes from the due ones
    /// walked in due order — `(seq, destination, due time)`, at most `claim_walk(limit)`
    /// of them. `None` when the walk was cut short before the claim was full: deliveries
    /// it may not take (their destination has no room, or they are not orphaned yet) stood
    /// in the way in greater numbers — a slow destination's backlog — and the claim must go
    /// destination by destination instead.
    pub fn take_walked(
        &self,
        walked: impl IntoIterator<Item = (i64, String, u64)>,
        now: u64,
        limit: usize,
    ) -> Option<Vec<i64>> {
        let (mut n, mut due) = (0, Vec::new());
        let mut taken = HashMap::<String, usize>::new();
        for (seq, name, at) in walked {
            n += 1;
            let (room, wait) = (self.room_for(&name, limit), self.wait_for(&name));
            let k = taken.entry(name).or_default();
            if *k < room && at + wait <= now {
                *k += 1;
                due.push(seq);
                if due.len() == limit {
                    return Some(due);
                }
            }
        }
        (n < claim_walk(limit)).then_some(due)
    }

    /// `Store::next_due_at` from the pending deliveries walked in due order —
    /// `(destination, due time)`, at most `NEXT_DUE_WALK` of them: the first to a
    /// destination with room that this instance knows, or, if earlier, one to a
    /// destination it does not know, once orphaned. `None` when the walk was cut short
    /// before the answer was sure.
    pub fn next_walked(
        &self,
        walked: impl IntoIterator<Item = (String, u64)>,
    ) -> Option<Option<u64>> {
        let (mut n, mut next) = (0, None::<u64>);
        for (name, at) in walked {
            n += 1;
            if self.room_for(&name, 1) == 0 {
                continue;
            }
            let wait = self.wait_for(&name);
            let at = at + wait;
            next = Some(next.map_or(at, |x| x.min(at)));
            if wait == 0 {
                // No later row is due before this one.
                return Some(next);
            }
        }
        (n < NEXT_DUE_WALK).then_some(next)
    }

    /// `room` as two arrays (names, and how many each), for SQL.
    pub fn room_arrays(&self) -> (Vec<String>, Vec<i64>) {
        self.room
            .iter()
            .map(|(k, v)| (k.clone(), *v as i64))
            .unzip()
    }
}

/// A delivery claimed for an attempt.
#[derive(Clone, Debug)]
pub struct DueDelivery {
    pub id: String,
    pub event_id: String,
    pub destination: String,
    pub url: String,
    pub headers: Pairs,
    pub body: bytes::Bytes,
    /// Attempts already made.
    pub attempts: u32,
    /// When its event was received (ms since the epoch): what delivery latency counts from.
    pub received_at: u64,
    /// Until when the caller holds it (ms since the epoch): an attempt that could not end
    /// before then is not started, but left to whoever claims it next.
    pub lease_until: u64,
    /// Put off by its destination's rate limit and now at its slot: sent without taking
    /// another ([`Store::defer_delivery`]).
    pub paced: bool,
}

/// What follows an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptNext {
    Delivered,
    /// Try again at this time (ms since the epoch).
    RetryAt(u64),
    /// Give up: the delivery failed.
    Failed,
    /// Keep pending but wait for the destination to be restarted.
    Hold,
}

/// One delivery of an event to a destination.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DeliveryRecord {
    /// Stable across retries: sent as the `webhook-id` header.
    pub id: String,
    pub event_id: String,
    pub route: usize,
    /// The run of the event (0, then one more per replay) whose plugins made it.
    pub run: u32,
    pub destination: String,
    /// The URL after placeholders (as the API shows a URL: a secret query parameter's
    /// value as `****`).
    #[serde(serialize_with = "crate::managed::serialize_redacted_url")]
    pub url: String,
    pub status: DeliveryStatus,
    /// When the next attempt is due, for pending deliveries; absent while the delivery is
    /// held (its destination is FAILED or DISABLED: a restart makes it due).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<u64>,
    pub attempts: Vec<Attempt>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
    /// Not sent: the destination does not take this event type.
    Skipped,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Skipped => "skipped",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "delivered" => DeliveryStatus::Delivered,
            "failed" => DeliveryStatus::Failed,
            "skipped" => DeliveryStatus::Skipped,
            _ => DeliveryStatus::Pending,
        }
    }
}

/// One HTTP attempt of a delivery.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Attempt {
    /// Start, in milliseconds since the Unix epoch.
    pub at: u64,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The first KiB of the response body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

/// A destination's health, after 1NCE: active, failed after too many consecutive failed
/// attempts (restart to resume), or disabled by a 410 Gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DestinationHealth {
    Active,
    Failed,
    Disabled,
}

impl DestinationHealth {
    fn as_str(self) -> &'static str {
        match self {
            DestinationHealth::Active => "active",
            DestinationHealth::Failed => "failed",
            DestinationHealth::Disabled => "disabled",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "failed" => DestinationHealth::Failed,
            "disabled" => DestinationHealth::Disabled,
            _ => DestinationHealth::Active,
        }
    }
}

/// The stored state of one destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestinationState {
    pub name: String,
    pub state: DestinationHealth,
    pub consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// How many times the state was set by hand (restarts): states decided in an older
    /// epoch do not overwrite it.
    #[serde(skip)]
    pub epoch: i64,
    /// When it entered this state (ms since the Unix epoch): the attempt that made it FAILED
    /// or DISABLED, a pause or restart by hand; 0 for a destination never out of ACTIVE (or
    /// a state stored before this was kept).
    #[serde(skip)]
    pub since: u64,
}

/// What [`Store::erase_events`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Erased {
    /// The events erased.
    pub erased: Vec<String>,
    /// The events left as they are for now: being processed, or with a delivery on its way.
    pub busy: Vec<String>,
}

/// How many deliveries of a destination wait or failed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeliveryCounts {
    pub destination: String,
    pub pending: u64,
    pub failed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> Event {
        Event {
            id: id.into(),
            source: "s".into(),
            received_at: 0,
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![],
            content_type: None,
            body: crate::event::Body::from(b"{}".to_vec()),
            metadata: vec![],
            run: 0,
        }
    }

    /// A refusal is told of for `REFUSAL_REMEMBERED` unless an event is stored meanwhile;
    /// the room the events took is given back either way, in one settling.
    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_told_of_until_an_event_is_stored_or_for_a_while() {
        let queue = EventQueue::new(vec![], 10);
        let refused = Err(StoreError::Db("disk full".into()));
        queue
            .accepting(&event("a"))
            .unwrap()
            .settle(&refused, event("a"));
        assert_eq!(queue.refused(), Some((Duration::ZERO, "disk full".into())));
        tokio::time::advance(REFUSAL_REMEMBERED - Duration::from_secs(1)).await;
        assert_eq!(queue.refused().unwrap().0, Duration::from_secs(29));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(queue.refused(), None, "offered senders again");

        queue
            .accepting(&event("b"))
            .unwrap()
            .settle(&refused, event("b"));
        let (room, _) = queue.lock().taken();
        assert_eq!(room, 0, "the refused ones took no room");
        // A full queue, or a store closing, is not the store refusing.
        let full = Err(StoreError::QueueFull(10));
        queue
            .accepting(&event("c"))
            .unwrap()
            .settle(&full, event("c"));
        assert!(queue.refused().is_some());
        let stored = Ok(Inserted::New);
        queue
            .accepting(&event("d"))
            .unwrap()
            .settle(&stored, event("d"));
        assert_eq!(queue.refused(), None);
        assert_eq!(queue.lock().taken(), (1, queued_size(&event("d"))));
        assert_eq!(queue.next().await.unwrap().id, "d");
    }

    #[test]
    fn route_result_names_are_the_api_names() {
        for result in [
            RouteResult::Dropped {
                plugin: "p".into(),
                reason: "r".into(),
            },
            RouteResult::Delivering { deliveries: 1 },
            RouteResult::Failed { error: "e".into() },
        ] {
            let json = serde_json::to_value(&result).unwrap();
            assert_eq!(json["result"], result.as_str());
        }
    }
}
