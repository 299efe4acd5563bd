//! `tag-router`: chooses destinations by SIM label or tag, or by ICCID prefix.
//!
//! Config (keys are rules, values comma-separated destination names):
//! - `label.<label>` — events whose `sim_label` is `<label>`;
//! - `tag.<tag>` — events whose `tags` list (or `tag` field) holds `<tag>`;
//! - `iccid.<prefix>` — events whose ICCID starts with `<prefix>`;
//! - `meta.<name>.<value>` — events whose metadata `<name>`, as an earlier plugin set it
//!   (the last value), is `<value>` (`meta.customer.acme`, after `metadata-inject` read a
//!   lookup table);
//! - `default` — when no rule matches (without it, such events are dropped).
//!
//! Every matching rule adds its destinations (each at most once). The payload may be a
//! provider's own or a CloudEvents envelope (then its `data` is looked at); the ICCID comes
//! from metadata `iccid` or the payload.
//!
//! Try it: `switchyard plugin run tag-router.wasm --event examples/events/onomondo-location.json
//! --config label.valid-example=fleet --config default=archive`

use serde_json::Value;
use switchyard_plugin::*;

struct TagRouter;

/// What is wrong with a config key, if it is not a rule.
fn bad_rule(key: &str) -> Option<String> {
    if let Some(rule) = key.strip_prefix("meta.") {
        return match rule.split_once('.') {
            Some((name, _)) if !name.is_empty() => None,
            _ => Some(format!("`{key}`: a metadata rule is meta.NAME.VALUE")),
        };
    }
    let known = ["label.", "tag.", "iccid."]
        .iter()
        .any(|p| key.starts_with(p))
        || key == "default";
    (!known).then(|| {
        format!(
            "unknown rule `{key}` (use label.X, tag.X, iccid.PREFIX, meta.NAME.VALUE or default)"
        )
    })
}

impl Plugin for TagRouter {
    fn check_config() -> Result<(), String> {
        config_all()
            .iter()
            .find_map(|(key, _)| bad_rule(key))
            .map_or(Ok(()), Err)
    }

    fn handle(event: Event) -> Result<Verdict, PluginError> {
        let body = json_body(&event)?;
        let payload = if body.get("specversion").is_some() {
            body.get("data").unwrap_or(&body)
        } else {
            &body
        };
        let label = payload.get("sim_label").and_then(Value::as_str);
        let tags: Vec<&str> = match (payload.get("tags"), payload.get("tag")) {
            (Some(Value::Array(items)), _) => items.iter().filter_map(Value::as_str).collect(),
            (_, Some(Value::String(tag))) => vec![tag.as_str()],
            _ => Vec::new(),
        };
        let iccid = metadata(&event, "iccid")
            .map(str::to_string)
            .or_else(|| {
                ["iccid", "esimIccid", "esim"]
                    .iter()
                    .find_map(|k| payload.get(k).and_then(scalar_text))
            })
            .or_else(|| {
                payload
                    .get("data")
                    .and_then(|d| d.get("esim"))
                    .and_then(scalar_text)
            });

        let mut chosen: Vec<String> = Vec::new();
        let mut default = None;
        for (key, destinations) in config_all() {
            if let Some(why) = bad_rule(&key) {
                return Err(PluginError::InvalidConfig(why));
            }
            let matched = if let Some(l) = key.strip_prefix("label.") {
                label == Some(l)
            } else if let Some(t) = key.strip_prefix("tag.") {
                tags.contains(&t)
            } else if let Some(prefix) = key.strip_prefix("iccid.") {
                iccid.as_deref().is_some_and(|i| i.starts_with(prefix))
            } else if let Some(rule) = key.strip_prefix("meta.") {
                (rule.split_once('.'))
                    .is_some_and(|(name, value)| metadata(&event, name) == Some(value))
            } else {
                // (`default`: the only other key `bad_rule` lets through.)
                default = Some(destinations.clone());
                false
            };
            if matched {
                add(&mut chosen, &destinations);
            }
        }
        if chosen.is_empty() {
            match default {
                Some(d) => add(&mut chosen, &d),
                None => return Ok(Verdict::Drop("no routing rule matched".into())),
            }
        }
        Ok(Verdict::Route(
            chosen.into_iter().map(Delivery::to).collect(),
        ))
    }
}

fn add(chosen: &mut Vec<String>, list: &str) {
    for d in list.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !chosen.iter().any(|c| c == d) {
            chosen.push(d.to_string());
        }
    }
}

export_plugin!(TagRouter);
