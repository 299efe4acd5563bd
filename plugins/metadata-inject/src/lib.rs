//! `metadata-inject`: extracts `iccid`, `imsi` and `ip` from the payload into metadata, so
//! destinations can use `:iccid:`, `:imsi:` and `:ip:` placeholders.
//!
//! Looks at the top level and at a nested `data` object (Bondio, CloudEvents). Recognised
//! fields: `iccid`, `esimIccid`, `esim`, `subject` for `iccid`; `imsi` for `imsi`; `ip`,
//! `ipv4`, `ip_address` for `ip`. Any further config pair `NAME = /json/pointer` adds
//! metadata `NAME` from that place of the body.
//!
//! Try it: `switchyard plugin run metadata-inject.wasm --event examples/events/onomondo-usage.json`

use serde_json::Value;
use switchyard_plugin::*;

struct MetadataInject;

const FIELDS: &[(&str, &[&str])] = &[
    ("iccid", &["iccid", "esimIccid", "esim", "subject"]),
    ("imsi", &["imsi"]),
    ("ip", &["ip", "ipv4", "ip_address"]),
];

impl Plugin for MetadataInject {
    fn handle(event: Event) -> Result<Verdict, PluginError> {
        let body = json_body(&event)?;
        let mut metadata = Vec::new();
        for (name, candidates) in FIELDS {
            if let Some(value) = find(&body, candidates) {
                metadata.push((name.to_string(), value));
            }
        }
        for (name, pointer) in config_all() {
            if !pointer.starts_with('/') {
                return Err(PluginError::InvalidConfig(format!(
                    "`{name}` must be a JSON pointer such as /data/tenant"
                )));
            }
            if let Some(value) = body.pointer(&pointer).and_then(scalar_text) {
                metadata.push((name, value));
            }
        }
        Ok(Verdict::Continue(Update {
            metadata,
            ..Update::default()
        }))
    }
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
