//! `change-filter`: passes an event on only when what it says of a thing (a SIM, a device)
//! changed since the last event about that thing, and drops the repeats — the values it
//! compares kept between events in the gateway's store (WIT `state`, 0.1.2).
//!
//! Config:
//! - `key`: a JSON pointer to what identifies the thing in the body (`/iccid`).
//! - `fields`: comma-separated JSON pointers to the values watched (`/network/mcc,/network/mnc`).
//! - `ttl`: how many seconds a thing's last values are remembered (default: as long as the
//!   gateway keeps values, `plugins.state_ttl`); an event after that passes as a change.
//!
//! The first event about a thing passes (nothing to compare with); an event without the key
//! passes untouched. One that passes carries metadata `previous`: the watched values it
//! changed from, as a JSON array (empty for the first). Several routes using this plugin
//! share what it remembers: give each a different `key` pointer, or a `scope`, a prefix
//! kept apart (`scope = "roaming"`).
//!
//! ```toml
//! plugins = [{ name = "change-filter", config = { key = "/iccid", fields = "/network/mcc,/network/mnc" } }]
//! ```
//!
//! Events are delivered at least once: an event processed again (a replay) finds its own
//! values remembered and is dropped as unchanged. Events of one thing handled at once are
//! told apart by `state::swap`: only one of two identical ones passes.

use serde_json::Value;
use switchyard_plugin::*;

struct ChangeFilter;

/// How many times a value changed by another event meanwhile is read again.
const SWAPS: usize = 10;

impl Plugin for ChangeFilter {
    fn handle(event: Event) -> Result<Verdict, PluginError> {
        let key = config("key").ok_or_else(|| {
            PluginError::InvalidConfig("`key` must name a JSON pointer, e.g. /iccid".into())
        })?;
        let fields = config_list("fields");
        if fields.is_empty() {
            return Err(PluginError::InvalidConfig(
                "`fields` must list at least one JSON pointer, e.g. /network/mcc".into(),
            ));
        }
        if let Some(bad) = std::iter::once(&key)
            .chain(&fields)
            .find(|p| !p.starts_with('/'))
        {
            return Err(PluginError::InvalidConfig(format!(
                "`{bad}` is not a JSON pointer (it starts with /)"
            )));
        }
        let ttl = match config("ttl") {
            None => None,
            Some(t) => Some(t.trim().parse::<u32>().map_err(|_| {
                PluginError::InvalidConfig(format!("`ttl` must be a number of seconds, not `{t}`"))
            })?),
        };
        let body = json_body(&event)?;
        let Some(id) = body.pointer(&key).and_then(scalar_text) else {
            return Ok(Verdict::Continue(Update::default()));
        };
        let now: Vec<Value> = (fields.iter())
            .map(|p| body.pointer(p).cloned().unwrap_or(Value::Null))
            .collect();
        let now = Value::Array(now).to_string();
        let scope = config("scope").unwrap_or_default();
        let remembered = format!("{scope}{key}={id}");
        // What was read is replaced only if it is still there (`swap`): of two events of
        // one SIM handled at once, one passes and the other, reading again, is a repeat.
        for _ in 0..SWAPS {
            let before = state::get(&remembered);
            if before.as_deref() == Some(now.as_str()) {
                return Ok(Verdict::Drop(format!(
                    "{key} {id}: {} unchanged ({now})",
                    fields.join(",")
                )));
            }
            if state::swap(&remembered, before.as_deref(), &now, ttl).map_err(PluginError::Other)? {
                return Ok(Verdict::Continue(Update {
                    metadata: vec![("previous".into(), before.unwrap_or_else(|| "[]".into()))],
                    ..Update::default()
                }));
            }
        }
        Err(PluginError::Other(format!(
            "{key} {id}: its values changed under every one of {SWAPS} tries"
        )))
    }
}

export_plugin!(ChangeFilter);
