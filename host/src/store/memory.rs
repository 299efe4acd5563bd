//! An in-memory store: events queue in a bounded FIFO and their records are kept for the
//! most recent events only. Nothing survives a restart; it serves tests and the spine until
//! a durable backend takes its place.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{DeliveryRecord, EventRecord, EventStatus, RouteOutcome, Store, StoreError};
use crate::event::Event;

/// How many event records are kept for `get_event`; the oldest go first.
const RECORDS_KEPT: usize = 100_000;

pub struct MemoryStore {
    inner: Mutex<Inner>,
    capacity: usize,
    ready: Notify,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Event>,
    records: HashMap<String, EventRecord>,
    order: VecDeque<String>,
    closed: bool,
}

impl MemoryStore {
    /// A store whose queue holds at most `capacity` unprocessed events.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity,
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert_event(&self, event: Event) -> Result<(), StoreError> {
        {
            let mut inner = self.lock();
            if inner.closed {
                return Err(StoreError::Closed);
            }
            if inner.queue.len() >= self.capacity {
                return Err(StoreError::QueueFull(inner.queue.len()));
            }
            let id = event.id.clone();
            inner.records.insert(
                id.clone(),
                EventRecord {
                    event: event.clone(),
                    status: EventStatus::Queued,
                    routes: Vec::new(),
                    deliveries: Vec::new(),
                },
            );
            inner.order.push_back(id);
            while inner.order.len() > RECORDS_KEPT {
                if let Some(old) = inner.order.pop_front() {
                    inner.records.remove(&old);
                }
            }
            inner.queue.push_back(event);
        }
        self.ready.notify_one();
        Ok(())
    }

    async fn next_event(&self) -> Option<Event> {
        loop {
            // Register interest before checking, so a notify between the check and the
            // wait is not missed.
            let notified = self.ready.notified();
            {
                let mut inner = self.lock();
                if let Some(event) = inner.queue.pop_front() {
                    if !inner.queue.is_empty() {
                        self.ready.notify_one();
                    }
                    return Some(event);
                }
                if inner.closed {
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

    async fn mark_processed(&self, event_id: &str) {
        if let Some(r) = self.lock().records.get_mut(event_id) {
            r.status = EventStatus::Processed;
        }
    }

    async fn record_route(&self, event_id: &str, outcome: RouteOutcome) {
        if let Some(r) = self.lock().records.get_mut(event_id) {
            r.routes.push(outcome);
        }
    }

    async fn record_delivery(&self, event_id: &str, delivery: DeliveryRecord) {
        if let Some(r) = self.lock().records.get_mut(event_id) {
            match r.deliveries.iter_mut().find(|d| d.id == delivery.id) {
                Some(existing) => *existing = delivery,
                None => r.deliveries.push(delivery),
            }
        }
    }

    async fn get_event(&self, id: &str) -> Option<EventRecord> {
        self.lock().records.get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Body;

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
            body: Body::default(),
            metadata: vec![],
        }
    }

    #[tokio::test]
    async fn queue_is_fifo_bounded_and_drains_after_close() {
        let store = MemoryStore::new(2);
        store.insert_event(event("a")).await.unwrap();
        store.insert_event(event("b")).await.unwrap();
        assert!(matches!(
            store.insert_event(event("c")).await,
            Err(StoreError::QueueFull(2))
        ));
        store.close();
        assert!(matches!(
            store.insert_event(event("d")).await,
            Err(StoreError::Closed)
        ));
        assert_eq!(store.next_event().await.unwrap().id, "a");
        assert_eq!(store.next_event().await.unwrap().id, "b");
        assert!(store.next_event().await.is_none());
        assert_eq!(
            store.get_event("a").await.unwrap().status,
            EventStatus::Queued
        );
        store.mark_processed("a").await;
        assert_eq!(
            store.get_event("a").await.unwrap().status,
            EventStatus::Processed
        );
    }
}
