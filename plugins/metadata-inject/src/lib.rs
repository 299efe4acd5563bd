//! `metadata-inject`: extracts `iccid`, `imsi` and `ip` from the payload into metadata, so
//! destinations can use `:iccid:`, `:imsi:` and `:ip:` placeholders.
//!
//! Looks at the top level and at a nested `data` object (Bondio, CloudEvents). Recognised
//! fields: `iccid`, `esimIccid`, `esim`, `subject` for `iccid`; `imsi` for `imsi`; `ip`,
//! `ipv4`, `ip_address` for `ip`. Any further config pair `NAME = /json/pointer` adds
//! metadata `NAME` from that place of the body; `NAME = TABLE[KEY]/json/pointer` adds it
//! from the gateway's lookup table `TABLE` (`[tables]` in its config): the row whose key is
//! the metadata `KEY` found so far, at that place of the row (`sims[iccid]/customer`: the
//! customer of the event's SIM). Pairs apply in order, so one may key on another's result;
//! a value not found adds nothing.
//!
//! Try it: `switchyard plugin run metadata-inject.wasm --event examples/events/onomondo-usage.json`
//! (with `--table sims=sims.csv --config customer=sims[iccid]/customer` for a table).

use serde_json::Value;
use switchyard_plugin::*;

struct MetadataInject;

const FIELDS: &[(&str, &[&str])] = &[
    ("iccid", &["iccid", "esimIccid", "esim", "subject"]),
    ("imsi", &["imsi"]),
    ("ip", &["ip", "ipv4", "ip_address"]),
];

impl Plugin for MetadataInject {
    fn check_config() -> Result<(), String> {
        match config_all()
            .iter()
            .find(|(_, source)| parse(source).is_none())
        {
            Some((name, _)) => Err(match bad(name) {
                PluginError::InvalidConfig(m)
                | PluginError::InvalidEvent(m)
                | PluginError::Other(m) => m,
            }),
            None => Ok(()),
        }
    }

    fn handle(event: Event) -> Result<Verdict, PluginError> {
        let body = json_body(&event)?;
        let mut metadata = Vec::new();
        for (name, candidates) in FIELDS {
            if let Some(value) = find(&body, candidates) {
                metadata.push((name.to_string(), value));
            }
        }
        for (name, source) in config_all() {
            let value = match parse(&source).ok_or_else(|| bad(&name))? {
                Source::Pointer(pointer) => body.pointer(pointer).and_then(scalar_text),
                Source::Row {
                    table,
                    key,
                    pointer,
                } => {
                    let key = (metadata.iter().rev())
                        .find(|(n, _)| n == key)
                        .map(|(_, v)| v);
                    let row = key.and_then(|key| lookup(table, key));
                    row.and_then(|row| row.pointer(pointer).and_then(scalar_text))
                }
            };
            if let Some(value) = value {
                metadata.push((name, value));
            }
        }
        Ok(Verdict::Continue(Update {
            metadata,
            ..Update::default()
        }))
    }
}

/// Where a metadata value comes from.
enum Source<'a> {
    /// `/a/pointer` of the body.
    Pointer(&'a str),
    /// `table[key]/pointer`: the row of `table` whose key is the metadata `key` found so
    /// far, at `pointer` (the whole row if empty).
    Row {
        table: &'a str,
        key: &'a str,
        pointer: &'a str,
    },
}

/// A config value as a source; `None` if it is neither form.
fn parse(source: &str) -> Option<Source<'_>> {
    match source.split_once('[') {
        None if source.starts_with('/') => Some(Source::Pointer(source)),
        Some((table, rest)) if !table.is_empty() => {
            let (key, pointer) = rest.split_once(']')?;
            (pointer.is_empty() || pointer.starts_with('/')).then_some(Source::Row {
                table,
                key,
                pointer,
            })
        }
        _ => None,
    }
}

fn bad(name: &str) -> PluginError {
    PluginError::InvalidConfig(format!(
        "`{name}` must be a JSON pointer such as /data/tenant, or a table's row such as sims[iccid]/customer"
    ))
}

fn find(body: &Value, candidates: &[&str]) -> Option<String> {
    let nested = body.get("data");
    for scope in [Some(body), nested].into_iter().flatten() {
        for field in candidates {
            if let Some(v) = scope.get(field).and_then(scalar_text) {
                return Some(v);
            }
        }
    }
    None
}

export_plugin!(MetadataInject);
