//! `event-filter`: keeps the events that pass its conditions and drops the rest, by
//! configuration alone.
//!
//! Config:
//! - `allow`: comma-separated event types to keep (`usage,location`); `*` in one stands for
//!   any characters (`attachment.*`, `network-*`), as in a destination's `event_types`.
//! - `field`: the top-level JSON field holding the type (default `type`, as Onomondo and
//!   Bondio send it). The type, when there is one, is passed on as metadata `event_type`.
//! - `/a/json/pointer = CONDITION`: a condition on the value at that place of the body:
//!   - `fleet,trucks`: its text (a string as it is, a number or `true`/`false` as written)
//!     is one of these (`*` patterns too);
//!   - `!fleet,trucks`: it is none of these (or there is no such value);
//!   - `>1000`, `>=1000`, `<5`, `<=5`: it is a number (or a string holding one) so compared;
//!   - `?`: there is a value (not `null`); `!?`: there is none.
//!
//! An event is kept when its type is allowed (if `allow` is set) and every condition holds;
//! otherwise it is dropped with the first reason. At least `allow` or one condition must be
//! given; a condition that cannot be read is an `invalid-config` error naming it (and is
//! refused when the route comes into force, by `config-check`).
//!
//! ```toml
//! plugins = [{ name = "event-filter", config = { allow = "usage", "/sim/label" = "fleet", "/bytes" = ">=1000" } }]
//! ```
//!
//! Try it: `switchyard plugin run event-filter.wasm --event examples/events/onomondo-usage.json
//! --config allow=usage`

use serde_json::Value;
use switchyard_plugin::*;

struct EventFilter;

/// The types allowed and the conditions, from the config; or what is wrong with it.
#[allow(clippy::type_complexity)]
fn settings() -> Result<(Vec<String>, Vec<(String, Condition)>), String> {
    let allow = config_list("allow");
    let conditions = (config_all().into_iter())
        .filter(|(key, _)| key.starts_with('/'))
        .map(|(pointer, text)| Condition::parse(&text).map(|c| (pointer, c)))
        .collect::<Result<Vec<_>, _>>()?;
    if allow.is_empty() && conditions.is_empty() {
        return Err(
            "`allow` must list at least one event type, or a `/json/pointer` key give a condition"
                .into(),
        );
    }
    Ok((allow, conditions))
}

impl Plugin for EventFilter {
    fn check_config() -> Result<(), String> {
        settings().map(|_| ())
    }

    fn handle(event: Event) -> Result<Verdict, PluginError> {
        let (allow, conditions) = settings().map_err(PluginError::InvalidConfig)?;
        let field = config("field").unwrap_or_else(|| "type".into());
        let body = json_body(&event)?;
        let event_type = body.get(&field).and_then(Value::as_str);
        if !allow.is_empty() {
            let Some(t) = event_type else {
                return Ok(Verdict::Drop(format!(
                    "event has no string field `{field}`"
                )));
            };
            if !allow.iter().any(|a| matches(a, t)) {
                return Ok(Verdict::Drop(format!("event type `{t}` is not allowed")));
            }
        }
        for (pointer, condition) in &conditions {
            let value = body.pointer(pointer).filter(|v| !v.is_null());
            if let Err(why) = condition.check(value) {
                return Ok(Verdict::Drop(format!("`{pointer}` {why}")));
            }
        }
        Ok(Verdict::Continue(Update {
            metadata: (event_type.into_iter())
                .map(|t| ("event_type".to_string(), t.to_string()))
                .collect(),
            ..Update::default()
        }))
    }
}

/// What a `/pointer` key asks of its value.
enum Condition {
    OneOf(Vec<String>),
    NoneOf(Vec<String>),
    Compare(&'static str, f64),
    Present,
    Absent,
}

impl Condition {
    fn parse(text: &str) -> Result<Condition, String> {
        let list = |s: &str| -> Vec<String> {
            (s.split(',').map(str::trim))
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        };
        let text = text.trim();
        let condition = match text {
            "?" => Condition::Present,
            "!?" => Condition::Absent,
            _ => match ["<=", ">=", "<", ">"]
                .into_iter()
                .find(|op| text.starts_with(op))
            {
                Some(op) => {
                    let n = text[op.len()..].trim();
                    Condition::Compare(
                        op,
                        n.parse()
                            .map_err(|_| format!("`{text}`: `{n}` after `{op}` is not a number"))?,
                    )
                }
                None => match text.strip_prefix('!') {
                    Some(rest) => Condition::NoneOf(list(rest)),
                    None => Condition::OneOf(list(text)),
                },
            },
        };
        match &condition {
            Condition::OneOf(l) | Condition::NoneOf(l) if l.is_empty() => Err(format!(
                "`{text}` names no value: give values (`a,b`), `!a,b`, `>N`, `<=N`, `?` or `!?`"
            )),
            _ => Ok(condition),
        }
    }

    /// Whether `value` (`None`: missing or `null`) passes; if not, why.
    fn check(&self, value: Option<&Value>) -> Result<(), String> {
        let text = value.and_then(text_of);
        match self {
            Condition::Present if value.is_none() => Err("is missing".into()),
            Condition::Absent if value.is_some() => Err("is set".into()),
            Condition::OneOf(values) => match &text {
                Some(t) if values.iter().any(|v| matches(v, t)) => Ok(()),
                Some(t) => Err(format!("is `{t}`, not one of {}", values.join(","))),
                None => Err(format!("is missing, not one of {}", values.join(","))),
            },
            Condition::NoneOf(values) => match &text {
                Some(t) if values.iter().any(|v| matches(v, t)) => {
                    Err(format!("is `{t}`, one of {}", values.join(",")))
                }
                _ => Ok(()),
            },
            Condition::Compare(op, bound) => {
                let n = value.and_then(|v| match v {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.trim().parse().ok(),
                    _ => None,
                });
                let Some(n) = n else {
                    return Err(format!("is not a number to compare ({op}{bound})"));
                };
                let holds = match *op {
                    "<" => n < *bound,
                    "<=" => n <= *bound,
                    ">" => n > *bound,
                    _ => n >= *bound,
                };
                match holds {
                    true => Ok(()),
                    false => Err(format!("is {n}, not {op}{bound}")),
                }
            }
            _ => Ok(()),
        }
    }
}

/// A scalar's text: a string as it is, a number or a boolean as JSON writes it.
fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::Bool(b) => Some(b.to_string()),
        other => scalar_text(other),
    }
}

/// Whether `text` matches `pattern`, in which `*` stands for any run of characters (the
/// same rule as the gateway's `event_types`).
fn matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == text;
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

export_plugin!(EventFilter);
