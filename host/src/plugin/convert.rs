//! Conversion between the gateway's types and the generated WIT types, so that only
//! `plugin/` knows the generated bindings.

use serde::Serialize;

use super::bindings::{Delivery, Event as WitEvent, PluginError, Update, Verdict};
use crate::event::{Body, Event, Pairs};
use crate::managed::redact_query_secrets;

/// A plugin's verdict, owned by the gateway.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum PluginVerdict {
    Drop { reason: String },
    Continue(PluginUpdate),
    Route { deliveries: Vec<PluginDelivery> },
}

/// The changes of a `continue` verdict.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PluginUpdate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Body>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Pairs>,
    pub metadata: Pairs,
}

/// One delivery of a `route` verdict.
#[derive(Clone, Debug, Serialize)]
pub struct PluginDelivery {
    pub destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Body>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    pub headers: Pairs,
    pub metadata: Pairs,
}

pub(super) fn to_wit_event(e: &Event) -> WitEvent {
    WitEvent {
        id: e.id.clone(),
        source: e.source.clone(),
        received_at: e.received_at,
        method: e.method.clone(),
        path: e.path.clone(),
        query: e.query.clone(),
        headers: e.headers.clone(),
        content_type: e.content_type.clone(),
        body: e.body.as_bytes().to_vec(),
        metadata: e.metadata.clone(),
    }
}

pub(super) fn from_wit_verdict(v: Verdict) -> PluginVerdict {
    match v {
        // (A reason, as an error, is stored and logged: a URL's key in it is not.)
        Verdict::Drop(reason) => PluginVerdict::Drop {
            reason: redact_query_secrets(&reason).into_owned(),
        },
        Verdict::Continue(Update {
            body,
            content_type,
            headers,
            metadata,
        }) => PluginVerdict::Continue(PluginUpdate {
            body: body.map(Body::from),
            content_type,
            headers,
            metadata,
        }),
        Verdict::Route(deliveries) => PluginVerdict::Route {
            deliveries: deliveries
                .into_iter()
                .map(|d: Delivery| PluginDelivery {
                    destination: d.destination,
                    body: d.body.map(Body::from),
                    content_type: d.content_type,
                    headers: d.headers,
                    metadata: d.metadata,
                })
                .collect(),
        },
    }
}

pub(super) fn plugin_error_message(e: &PluginError) -> String {
    let message = match e {
        PluginError::InvalidEvent(m) => format!("invalid event: {m}"),
        PluginError::InvalidConfig(m) => format!("invalid config: {m}"),
        PluginError::Other(m) => m.clone(),
    };
    redact_query_secrets(&message).into_owned()
}
