//! `reshape`: builds a new JSON body from the event's, by configuration alone — no code to
//! write for the common case of a receiver that wants the fields under other names, nested
//! otherwise, or fewer of them.
//!
//! Each config pair is `OUTPUT = SOURCE`. `OUTPUT` is where the value goes in the new
//! body: a field name, or names joined by dots for nested objects (`device.iccid`).
//! `SOURCE` is one of:
//! - `/a/json/pointer`: the value at that place of the event's body, of any JSON type (a
//!   field the event does not have is left out of the new body);
//! - `=text`: that text, as a string (`=fleet-v2`), in which `{/pointer}` stands for the
//!   body's value there and `{@name}` for metadata — `=SIM {/iccid} used {/bytes} bytes`
//!   makes `SIM 8945… used 1200 bytes` (a string as it is, any other value as JSON, one the
//!   event does not have as nothing), for a chat message or an alert's summary;
//! - `#json`: that JSON value (`#2`, `#true`, `#["a","b"]`, `#null`);
//! - `@name`: the metadata `name` an earlier plugin set (`@iccid` after `metadata-inject`),
//!   as a string; left out when not set.
//!
//! The pair `* = /pointer` starts the new body from that object of the event's body
//! (`* = /` keeps the whole body; `* = /data` lifts `data` up) instead of an empty one; the
//! other pairs then add or replace fields. A body that is not JSON is an `invalid-event`
//! error; a config that is not as above is an `invalid-config` error naming the pair.
//!
//! ```toml
//! plugins = [{ name = "reshape", config = { "device.iccid" = "/iccid", "usage.bytes" = "/bytes", "kind" = "=usage" } }]
//! ```
//!
//! Try it: `switchyard plugin run reshape.wasm --event examples/events/onomondo-usage.json --config device.iccid=/iccid`

use serde_json::{Map, Value};
use switchyard_plugin::*;

struct Reshape;

impl Plugin for Reshape {
    fn handle(event: Event) -> Result<Verdict, PluginError> {
        let body = json_body(&event)?;
        let lookup = |name: &str| metadata(&event, name).map(str::to_string);
        let shaped = reshape(&body, &config_all(), lookup).map_err(PluginError::InvalidConfig)?;
        Ok(continue_with_json(&shaped, Vec::new()))
    }
}

/// The new body that `pairs` make of `body`, with `metadata` for `@name`; or what is wrong
/// with a pair. (Tested through the built component: `tests/it/cli.rs`.)
fn reshape(
    body: &Value,
    pairs: &[(String, String)],
    metadata: impl Fn(&str) -> Option<String>,
) -> Result<Value, String> {
    let mut out = Map::new();
    if let Some((_, pointer)) = pairs.iter().find(|(k, _)| k == "*") {
        let pointer = if pointer == "/" { "" } else { pointer.as_str() };
        if !pointer.is_empty() && !pointer.starts_with('/') {
            return Err(format!(
                "`*` must be a JSON pointer such as /data, not `{pointer}`"
            ));
        }
        match body.pointer(pointer) {
            Some(Value::Object(base)) => out = base.clone(),
            Some(_) => return Err(format!("`*`: `{pointer}` of the body is not an object")),
            None => {}
        }
    }
    for (path, source) in pairs.iter().filter(|(k, _)| k != "*") {
        let value = if source.starts_with('/') {
            body.pointer(source).cloned()
        } else if let Some(text) = source.strip_prefix('=') {
            Some(Value::String(fill(text, body, &metadata)))
        } else if let Some(json) = source.strip_prefix('#') {
            let value = serde_json::from_str(json)
                .map_err(|e| format!("`{path}` = `{source}`: not JSON after `#`: {e}"))?;
            Some(value)
        } else if let Some(name) = source.strip_prefix('@') {
            metadata(name).map(Value::String)
        } else {
            return Err(format!(
                "`{path}` = `{source}`: a source is /a/json/pointer, =text, #json or @metadata"
            ));
        };
        if let Some(value) = value {
            set(&mut out, path, value)?;
        }
    }
    Ok(Value::Object(out))
}

/// `text` with each `{/pointer}` replaced by the body's value there and each `{@name}` by
/// that metadata: a string as it is, any other value as JSON, a missing one by nothing.
/// Other braces are kept as they are.
fn fill(text: &str, body: &Value, metadata: &impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let placeholder = after
            .find('}')
            .map(|close| &after[..close])
            .filter(|inner| inner.starts_with('/') || inner.starts_with('@'));
        let Some(inner) = placeholder else {
            out.push('{');
            rest = after;
            continue;
        };
        match inner.strip_prefix('@') {
            Some(name) => out.push_str(&metadata(name).unwrap_or_default()),
            None => match body.pointer(inner) {
                Some(Value::String(s)) => out.push_str(s),
                Some(other) => out.push_str(&other.to_string()),
                None => {}
            },
        }
        rest = &after[inner.len() + 1..];
    }
    out.push_str(rest);
    out
}

/// Puts `value` at the dotted `path` of `out`, making the objects on the way.
fn set(out: &mut Map<String, Value>, path: &str, value: Value) -> Result<(), String> {
    let names: Vec<&str> = path.split('.').collect();
    if names.iter().any(|n| n.is_empty()) {
        return Err(format!("`{path}`: an output is names joined by dots"));
    }
    let (last, parents) = names.split_last().expect("split yields at least one name");
    let mut here = out;
    for name in parents {
        let next = here
            .entry(name.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        here = match next {
            Value::Object(map) => map,
            _ => {
                return Err(format!(
                    "`{path}`: `{name}` is already set to a value that is not an object"
                ));
            }
        };
    }
    here.insert(last.to_string(), value);
    Ok(())
}

export_plugin!(Reshape);
