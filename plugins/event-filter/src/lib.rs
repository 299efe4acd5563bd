//! `event-filter`: keeps only events of the configured types and drops the rest.
//!
//! Config: `allow` — comma-separated event types to keep (e.g. `usage,location`);
//! `field` — the top-level JSON field holding the type (default `type`, as Onomondo and
//! Bondio send it). The type is passed on as metadata `event_type`.
//!
//! Try it: `switchyard plugin run event-filter.wasm --event examples/events/onomondo-usage.json
//! --config allow=usage`

use switchyard_plugin::*;

struct EventFilter;

impl Plugin for EventFilter {
    fn handle(event: Event) -> Result<Verdict, PluginError> {
        let allow = config_list("allow");
        if allow.is_empty() {
            return Err(PluginError::InvalidConfig(
                "`allow` must list at least one event type".into(),
            ));
        }
        let field = config("field").unwrap_or_else(|| "type".into());
        let body = json_body(&event)?;
        let Some(event_type) = body.get(&field).and_then(|v| v.as_str()) else {
            return Ok(Verdict::Drop(format!(
                "event has no string field `{field}`"
            )));
        };
        if allow.iter().any(|a| a == event_type) {
            Ok(Verdict::Continue(Update {
                metadata: vec![("event_type".into(), event_type.into())],
                ..Update::default()
            }))
        } else {
            Ok(Verdict::Drop(format!(
                "event type `{event_type}` is not allowed"
            )))
        }
    }
}

export_plugin!(EventFilter);
