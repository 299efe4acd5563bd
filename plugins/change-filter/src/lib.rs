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
//! What it remembers of a thing is its values, the id of the event that set them and the
//! values before (`["238","01"]`, a line break, the event id, a line break, `["238","02"]`;
//! a value of only the first line, as older versions kept, reads as values set by no known
//! event). So an event processed again — a replay of one whose route failed after this
//! plugin passed it, or a run cut short before its record — finds the values it set itself
//! and passes again, with the same `previous`; any other event with the same values is a
//! repeat. An event received before the one that set the values (event ids are UUIDv7, so
//! they sort by when they came) — a replay of an old event — with other values passes, as
//! it did when it came, but leaves the newer values kept: it carries metadata `newer`, the
//! values kept (not `previous`, which is not known), so the next event is compared with
//! what is newest. Events of one thing handled at once are told apart by `state::swap`: only one
//! of two identical ones passes.

use serde_json::Value;
use switchyard_plugin::*;

struct ChangeFilter;

/// How many times a value changed by another event meanwhile is read again.
const SWAPS: usize = 10;

/// The config: `key`, `fields` and `ttl`; or what is wrong with it.
fn settings() -> Result<(String, Vec<String>, Option<u32>), String> {
    let key = config("key").ok_or("`key` must name a JSON pointer, e.g. /iccid")?;
    let fields = config_list("fields");
    if fields.is_empty() {
        return Err("`fields` must list at least one JSON pointer, e.g. /network/mcc".into());
    }
    if let Some(bad) = std::iter::once(&key)
        .chain(&fields)
        .find(|p| !p.starts_with('/'))
    {
        return Err(format!("`{bad}` is not a JSON pointer (it starts with /)"));
    }
    let ttl = match config("ttl") {
        None => None,
        Some(t) => Some(
            (t.trim().parse::<u32>())
                .map_err(|_| format!("`ttl` must be a number of seconds, not `{t}`"))?,
        ),
    };
    Ok((key, fields, ttl))
}

impl Plugin for ChangeFilter {
    fn check_config() -> Result<(), String> {
        settings().map(|_| ())
    }

    fn handle(event: Event) -> Result<Verdict, PluginError> {
        let (key, fields, ttl) = settings().map_err(PluginError::InvalidConfig)?;
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
        let passes = |previous: &str| {
            Verdict::Continue(Update {
                metadata: vec![("previous".into(), previous.to_string())],
                ..Update::default()
            })
        };
        for _ in 0..SWAPS {
            let before = state::get(&remembered);
            let kept = before.as_deref().map(Kept::read);
            if let Some(kept) = &kept
                && kept.values == now
            {
                // This very event set them (a replay, a run done again): it passes again.
                if kept.event == Some(event.id.as_str()) {
                    return Ok(passes(kept.previous.unwrap_or("[]")));
                }
                return Ok(Verdict::Drop(format!(
                    "{key} {id}: {} unchanged ({now})",
                    fields.join(",")
                )));
            }
            if let Some(kept) = &kept
                && kept.event.is_some_and(|setter| event.id.as_str() < setter)
            {
                return Ok(Verdict::Continue(Update {
                    metadata: vec![("newer".into(), kept.values.to_string())],
                    ..Update::default()
                }));
            }
            let previous = kept.as_ref().map_or("[]", |k| k.values);
            let value = format!("{now}\n{}\n{previous}", event.id);
            if state::swap(&remembered, before.as_deref(), &value, ttl)
                .map_err(PluginError::Other)?
            {
                return Ok(passes(previous));
            }
        }
        Err(PluginError::Other(format!(
            "{key} {id}: its values changed under every one of {SWAPS} tries"
        )))
    }
}

/// What is remembered of a thing: `values`, the event that set them and the values before
/// (one line each; JSON text never holds a raw line break). Only `values` in a value kept by
/// an older version.
struct Kept<'a> {
    values: &'a str,
    event: Option<&'a str>,
    previous: Option<&'a str>,
}

impl<'a> Kept<'a> {
    fn read(text: &'a str) -> Self {
        let mut lines = text.splitn(3, '\n');
        Kept {
            values: lines.next().unwrap_or_default(),
            event: lines.next(),
            previous: lines.next(),
        }
    }
}

export_plugin!(ChangeFilter);
