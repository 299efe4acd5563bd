//! `validate`: checks each event's JSON body against a JSON Schema (drafts 4 to 2020-12) and
//! stops the ones that do not match, saying where and why — before a receiver chokes on a
//! payload a provider changed, or a plugin further down reads a field that is not there.
//!
//! Config:
//! - `schema`: the schema, as JSON text (a TOML literal string keeps it readable:
//!   `schema = '{"type": "object", "required": ["iccid"]}'`); or
//! - `table` and `key`: the schema is the row of the gateway's lookup table `table` (a JSON
//!   table of schemas by name, `[tables]` in its config, re-read at each reload) whose key
//!   is the body's value at the JSON pointer `key` — one schema per event type with
//!   `key = "/type"`. `unknown` says what happens to an event the table has no schema for:
//!   `pass` (the default), `drop` or `error`.
//! - `on_invalid`: `error` (the default: the route's `on_error` applies — dead-lettered, by
//!   default, so the event is kept and can be replayed once the schema or the sender is
//!   fixed) or `drop` (the event goes nowhere, the reason recorded).
//!
//! A body that is not JSON is an `invalid-event` error; a schema that is not one, an
//! `invalid-config` error. The errors name the first five places that do not match
//! (`/data/bytes: "12" is not of type "integer"`) and how many more there are.
//!
//! Try it: `switchyard plugin run validate.wasm --event examples/events/onomondo-usage.json
//! --config 'schema={"type":"object","required":["iccid","imei"]}'`

use std::cell::RefCell;
use std::rc::Rc;

use serde_json::Value;
use switchyard_plugin::*;

struct Validate;

/// The most mismatches an error names.
const SHOWN: usize = 5;
/// The longest a mismatch's description is kept (a value in it may be large).
const DESCRIPTION_MAX: usize = 200;

thread_local! {
    /// The last schemas compiled, by their text: a warm instance compiles each once.
    static COMPILED: RefCell<Vec<(String, Rc<jsonschema::Validator>)>> = const { RefCell::new(Vec::new()) };
}

/// Where the schema comes from.
enum Schemas {
    /// `schema`: one, as text.
    One(String),
    /// `table` and `key`: the table's row named by the body's value at `pointer`; with
    /// `unknown` (pass, drop or error) for a body without one.
    Table {
        table: String,
        pointer: String,
        unknown: String,
    },
}

/// The config as `handle` reads it: where the schema comes from and `on_invalid`; or what
/// is wrong with it.
fn settings() -> Result<(Schemas, String), PluginError> {
    let invalid = |m: String| Err(PluginError::InvalidConfig(m));
    let schemas = match (config("schema"), config("table")) {
        (Some(text), None) => Schemas::One(text),
        (None, Some(table)) => {
            let Some(pointer) = config("key") else {
                return invalid(
                    "`table` needs `key`: the JSON pointer of the body field naming the schema (/type)".into(),
                );
            };
            if !pointer.starts_with('/') {
                return invalid(format!(
                    "`key` must be a JSON pointer such as /type, not `{pointer}`"
                ));
            }
            let unknown = config("unknown").unwrap_or_else(|| "pass".into());
            if !["pass", "drop", "error"].contains(&unknown.as_str()) {
                return invalid(format!(
                    "`unknown` must be pass, drop or error, not `{unknown}`"
                ));
            }
            Schemas::Table {
                table,
                pointer,
                unknown,
            }
        }
        (Some(_), Some(_)) => return invalid("give `schema` or `table`, not both".into()),
        (None, None) => {
            return invalid(
                "give `schema` (a JSON Schema as text) or `table` and `key` (a lookup table of schemas)".into(),
            );
        }
    };
    let on_invalid = config("on_invalid").unwrap_or_else(|| "error".into());
    if on_invalid != "error" && on_invalid != "drop" {
        return invalid(format!(
            "`on_invalid` must be error or drop, not `{on_invalid}`"
        ));
    }
    Ok((schemas, on_invalid))
}

impl Plugin for Validate {
    /// The config as `handle` reads it, and `schema` compiled (a table's schemas are
    /// compiled at the first event naming each).
    fn check_config() -> Result<(), String> {
        let text = |e: PluginError| match e {
            PluginError::InvalidConfig(m)
            | PluginError::InvalidEvent(m)
            | PluginError::Other(m) => m,
        };
        match settings().map_err(text)? {
            (Schemas::One(schema), _) => compiled(&schema, None).map(|_| ()).map_err(text),
            (Schemas::Table { .. }, _) => Ok(()),
        }
    }

    fn handle(event: Event) -> Result<Verdict, PluginError> {
        let body = json_body(&event)?;
        let (schemas, on_invalid) = settings()?;
        let (schema, named) = match schemas {
            Schemas::One(text) => (text, None),
            Schemas::Table {
                table,
                pointer,
                unknown,
            } => {
                let name = match body.pointer(&pointer) {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.to_string()),
                    _ => None,
                };
                match name.as_deref().and_then(|n| lookup(&table, n)) {
                    Some(schema) => (schema.to_string(), name),
                    None => {
                        let what = match &name {
                            Some(n) => format!("table `{table}` has no schema `{n}`"),
                            None => format!("the body has no string or number at {pointer}"),
                        };
                        return match unknown.as_str() {
                            "drop" => Ok(Verdict::Drop(format!("no schema: {what}"))),
                            "error" => Err(PluginError::InvalidEvent(format!("no schema: {what}"))),
                            _ => Ok(Verdict::Continue(Update::default())),
                        };
                    }
                }
            }
        };
        let validator = compiled(&schema, named.as_deref())?;
        let mismatches: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| {
                let mut text = format!("{}: {e}", path_of(&e.instance_path().to_string()));
                if text.len() > DESCRIPTION_MAX {
                    let mut end = DESCRIPTION_MAX;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.truncate(end);
                    text.push('…');
                }
                text
            })
            .collect();
        if mismatches.is_empty() {
            return Ok(Verdict::Continue(Update::default()));
        }
        let which = named.map_or(String::new(), |n| format!(" `{n}`"));
        let mut reason = format!(
            "the body does not match the schema{which}: {}",
            mismatches[..mismatches.len().min(SHOWN)].join("; ")
        );
        if mismatches.len() > SHOWN {
            reason.push_str(&format!(" (and {} more)", mismatches.len() - SHOWN));
        }
        match on_invalid.as_str() {
            "drop" => Ok(Verdict::Drop(reason)),
            _ => Err(PluginError::InvalidEvent(reason)),
        }
    }
}

/// The body's root as `/`, any other place as its JSON pointer.
fn path_of(pointer: &str) -> &str {
    if pointer.is_empty() { "/" } else { pointer }
}

/// The validator of `schema` (its text), compiled once per instance.
fn compiled(schema: &str, named: Option<&str>) -> Result<Rc<jsonschema::Validator>, PluginError> {
    if let Some(found) = COMPILED.with_borrow(|c| {
        c.iter()
            .find(|(text, _)| text == schema)
            .map(|(_, v)| v.clone())
    }) {
        return Ok(found);
    }
    let which = named.map_or(String::new(), |n| format!(" `{n}`"));
    let value: Value = serde_json::from_str(schema)
        .map_err(|e| PluginError::InvalidConfig(format!("the schema{which} is not JSON: {e}")))?;
    let validator = jsonschema::validator_for(&value).map_err(|e| {
        PluginError::InvalidConfig(format!("the schema{which} is not a JSON Schema: {e}"))
    })?;
    let validator = Rc::new(validator);
    COMPILED.with_borrow_mut(|c| {
        // A handful of schemas (one per event type) stay; a table of many does not grow
        // the instance's memory without end.
        if c.len() >= 32 {
            c.remove(0);
        }
        c.push((schema.to_string(), validator.clone()));
    });
    Ok(validator)
}

export_plugin!(Validate);
