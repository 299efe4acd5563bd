//! The store stage: where an accepted event is kept, queued for the pipeline, and where
//! the pipeline records what happened to it. A small trait with an in-memory backend; the
//! durable backends implement the same trait.

mod memory;

use async_trait::async_trait;
use serde::Serialize;

pub use memory::MemoryStore;

use crate::event::Event;
use crate::plugin::PluginVerdict;

/// A store failure that the client of ingest must hear about.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the queue is full ({0} events waiting); try again later")]
    QueueFull(usize),
    #[error("the gateway is shutting down")]
    Closed,
}

/// Where events live and queue. Every method is cheap enough to call on the request path.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Keeps the event and queues it for the pipeline. When this returns `Ok`, the event is
    /// accepted and the sender may be told so.
    async fn insert_event(&self, event: Event) -> Result<(), StoreError>;

    /// The next queued event, waiting for one. `None` once the store is closed and the
    /// queue is empty.
    async fn next_event(&self) -> Option<Event>;

    /// Stops accepting events; queued ones are still handed out.
    fn close(&self);

    /// Marks an event as processed: every route's chain has run and its outcome is recorded.
    async fn mark_processed(&self, event_id: &str);

    /// Records the outcome of one route for an event.
    async fn record_route(&self, event_id: &str, outcome: RouteOutcome);

    /// Records a delivery, replacing an earlier record with the same id.
    async fn record_delivery(&self, event_id: &str, delivery: DeliveryRecord);

    /// An event with everything recorded about it.
    async fn get_event(&self, id: &str) -> Option<EventRecord>;
}

/// An event and its history, as `GET /v1/events/{id}` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EventRecord {
    pub event: Event,
    pub status: EventStatus,
    pub routes: Vec<RouteOutcome>,
    pub deliveries: Vec<DeliveryRecord>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    /// Accepted, waiting for the pipeline.
    Queued,
    /// The plugin chains have run; deliveries are recorded separately.
    Processed,
}

/// What one route's plugin chain did with an event.
#[derive(Clone, Debug, Serialize)]
pub struct RouteOutcome {
    /// The route's index in the configuration.
    pub route: usize,
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

/// One delivery of an event to a destination.
#[derive(Clone, Debug, Serialize)]
pub struct DeliveryRecord {
    /// Stable across retries: sent as the `webhook-id` header.
    pub id: String,
    pub route: usize,
    pub destination: String,
    /// The URL after placeholders.
    pub url: String,
    pub status: DeliveryStatus,
    pub attempts: Vec<Attempt>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
    /// Not sent: the destination does not take this event type.
    Skipped,
}

/// One HTTP attempt of a delivery.
#[derive(Clone, Debug, Serialize)]
pub struct Attempt {
    /// Start, in milliseconds since the Unix epoch.
    pub at: u64,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
