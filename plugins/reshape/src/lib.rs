//! `reshape`: builds a new JSON body from the event's, by configuration alone — no code to
//! write for the common case of a receiver that wants the fields under other names, nested
//! otherwise, or fewer of them.
//!
//! Each config pair is `OUTPUT = SOURCE`. `OUTPUT` is where the value goes in the new
//! body: a field name, or names joined by dots for nested objects (`device.iccid`), each
//! maybe followed by array indexes (`blocks[0].text`: a Slack message's blocks).
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
//! error; a config that is not as above is an `invalid-config` error naming the pair, and
//! is refused when the route comes into force (`config-check`).
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

    /// Each pair as `handle` reads it, whatever a body holds: its output path and its source.
    fn check_config() -> Result<(), String> {
        let pairs = config_all();
        for (path, _) in pairs.iter().filter(|(k, _)| k != "*") {
            steps(path)?;
        }
        reshape(&Value::Object(Map::new()), &pairs, |_| None).map(|_| ())
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

/// One step of an output path: an object's field or an array's element.
#[derive(Debug, PartialEq)]
enum Step<'a> {
    Field(&'a str),
    Element(usize),
}

/// The steps of an output path: names joined by dots, each maybe followed by array indexes
/// (`blocks[0].text`, `rows[1][0]`).
fn steps(path: &str) -> Result<Vec<Step<'_>>, String> {
    let bad = || {
        format!(
            "`{path}`: an output is names joined by dots, each maybe followed by indexes \
             such as [0]"
        )
    };
    let mut steps = Vec::new();
    for part in path.split('.') {
        let (name, mut indexes) = part.split_at(part.find('[').unwrap_or(part.len()));
        if name.is_empty() || name.contains(']') {
            return Err(bad());
        }
        steps.push(Step::Field(name));
        while !indexes.is_empty() {
            let close = indexes.find(']').ok_or_else(bad)?;
            let index: usize = indexes[1..close].parse().map_err(|_| bad())?;
            if index > MAX_INDEX {
                return Err(format!("`{path}`: an index is at most {MAX_INDEX}"));
            }
            steps.push(Step::Element(index));
            indexes = &indexes[close + 1..];
            if !indexes.is_empty() && !indexes.starts_with('[') {
                return Err(bad());
            }
        }
    }
    Ok(steps)
}

/// The largest array index an output may name (the elements before it are made `null`).
const MAX_INDEX: usize = 1000;

/// Puts `value` at `path` of `out`, making the objects and arrays on the way (an array's
/// elements before the one named are `null` until a pair sets them).
fn set(out: &mut Map<String, Value>, path: &str, value: Value) -> Result<(), String> {
    let steps = steps(path)?;
    let Step::Field(first) = steps[0] else {
        unreachable!("a path starts with a name")
    };
    let mut here = out.entry(first.to_string()).or_insert(Value::Null);
    let conflict = |at: &Step| {
        let what = match at {
            Step::Field(name) => format!("`{name}`"),
            Step::Element(i) => format!("[{i}]"),
        };
        format!(
            "`{path}`: {what} is already set to a value that is not an object or array as the path needs"
        )
    };
    // Each step's value, made an object or array for the step after it if it is unset.
    for (step, next) in steps.iter().zip(&steps[1..]) {
        if here.is_null() {
            *here = match next {
                Step::Field(_) => Value::Object(Map::new()),
                Step::Element(_) => Value::Array(Vec::new()),
            };
        }
        here = match (here, next) {
            (Value::Object(map), Step::Field(name)) => {
                map.entry(name.to_string()).or_insert(Value::Null)
            }
            (Value::Array(items), Step::Element(i)) => {
                if items.len() <= *i {
                    items.resize(i + 1, Value::Null);
                }
                &mut items[*i]
            }
            _ => return Err(conflict(step)),
        };
    }
    *here = value;
    Ok(())
}

export_plugin!(Reshape);
