//! `enrich`: adds to an event what another service knows of it — a SIM's customer from a
//! CRM, a device's owner from an inventory — by one `GET` (or `POST`) per event to that service (WIT
//! `http`, 0.1.3), optionally remembered for a while (WIT `state`).
//!
//! Config:
//! - `url`: the service's URL, with `{/pointer}` placeholders filled from the event's JSON
//!   body (each value percent-encoded): `https://crm.example.com/sims/{/iccid}`. The route
//!   must allow the URL's origin (`allow_http`).
//! - `header.<name>`: a header to send (`header.authorization = "Bearer ${env:CRM_TOKEN}"`).
//! - `body`: makes the request a `POST` of this JSON (a GraphQL query, a search), with
//!   `{/pointer}` placeholders replaced by the event's values as JSON — a string quoted, a
//!   number as it is: `{"query": "query($id: ID!) { sim(iccid: $id) { customer } }",
//!   "variables": {"id": {/iccid}}}`; `content-type: application/json` unless a
//!   `header.content-type` says otherwise.
//! - `into`: a JSON pointer in the body where the service's JSON answer goes (default
//!   `/enrichment`; missing objects on the way are made); `""` leaves the body as it is.
//! - `metadata.<key>`: a JSON pointer into the answer whose value (a string or a number)
//!   becomes metadata `key` — for a destination's `:key:` placeholders, or a later
//!   plugin's routing (`metadata.customer = "/customer/id"`).
//! - `not_found`: what a `404` means: `pass` (the event goes on unchanged; the default),
//!   `drop`, or `error`.
//! - `cache_ttl`: seconds to remember an answer per URL (in the plugin's `state`, keyed by
//!   the URL with its secret query values as `****` — the API lists the keys — and a
//!   digest of its credentials, so that routes with different ones never share an
//!   answer), so that a SIM's hundred events ask once; unset, every event asks.
//!
//! ```toml
//! plugins = [{ name = "enrich", on_error = "skip-plugin", allow_http = ["https://crm.example.com"],
//!              config = { url = "https://crm.example.com/sims/{/iccid}", "metadata.customer" = "/customer" } }]
//! ```
//!
//! Any other status, an answer that is not JSON, or no answer at all is an error of the
//! plugin (the route's `on_error` applies: `skip-plugin` delivers the event unenriched). An
//! event without a value for a placeholder is an `invalid-event` error.

use serde_json::Value;
use switchyard_plugin::*;

struct Enrich;

/// The config's `url`, `into`, `not_found` and `cache_ttl`.
struct Settings {
    template: String,
    into: String,
    not_found: String,
    cache_ttl: Option<u32>,
}

/// The config as `handle` reads it; or what is wrong with it.
fn settings() -> Result<Settings, PluginError> {
    let invalid = |m: String| PluginError::InvalidConfig(m);
    let template = config("url").ok_or_else(|| {
        invalid("`url` must name the service, e.g. https://crm.example.com/sims/{/iccid}".into())
    })?;
    let into = config("into").unwrap_or_else(|| "/enrichment".into());
    if !into.is_empty() && !into.starts_with('/') {
        return Err(invalid(format!(
            "`into` must be a JSON pointer (it starts with /) or empty, not `{into}`"
        )));
    }
    let not_found = config("not_found").unwrap_or_else(|| "pass".into());
    if !["pass", "drop", "error"].contains(&not_found.as_str()) {
        return Err(invalid(format!(
            "`not_found` must be pass, drop or error, not `{not_found}`"
        )));
    }
    let cache_ttl = match config("cache_ttl") {
        None => None,
        Some(t) => Some((t.trim().parse::<u32>()).map_err(|_| {
            invalid(format!(
                "`cache_ttl` must be a number of seconds, not `{t}`"
            ))
        })?),
    };
    // The templates' placeholders are closed (filled from a body that has every value).
    for (what, template) in [("url", Some(template.clone())), ("body", config("body"))] {
        if let Some(t) = template {
            check_placeholders(&t, what)?;
        }
    }
    Ok(Settings {
        template,
        into,
        not_found,
        cache_ttl,
    })
}

impl Plugin for Enrich {
    fn check_config() -> Result<(), String> {
        settings().map(|_| ()).map_err(|e| match e {
            PluginError::InvalidConfig(m)
            | PluginError::InvalidEvent(m)
            | PluginError::Other(m) => m,
        })
    }

    fn handle(event: Event) -> Result<Verdict, PluginError> {
        let Settings {
            template,
            into,
            not_found,
            cache_ttl,
        } = settings()?;
        let all = config_all();
        let headers: Vec<(&str, &str)> = (all.iter())
            .filter_map(|(k, v)| Some((k.strip_prefix("header.")?, v.as_str())))
            .collect();

        let mut body = json_body(&event)?;
        let url = fill(&template, &body, "url", percent_encoded)?;
        let sent = match config("body") {
            None => None,
            Some(t) => Some(fill(&t, &body, "body", as_json)?),
        };
        let method = if sent.is_some() { "POST" } else { "GET" };
        let key = cache_key(&url, sent.as_deref(), &headers);
        let answer = match cache_ttl.and_then(|_| state::get(&key)) {
            Some(kept) => serde_json::from_str(&kept).ok(),
            None => None,
        };
        let answer = match answer {
            Some(answer) => answer,
            None => {
                let mut sent_headers: Vec<(String, String)> = (headers.iter())
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                if sent.is_some()
                    && !headers
                        .iter()
                        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    sent_headers.push(("content-type".into(), "application/json".into()));
                }
                let response = http::send(&http::Request {
                    method: method.into(),
                    url: url.clone(),
                    headers: sent_headers,
                    body: sent.map(String::into_bytes),
                })
                .map_err(|e| PluginError::Other(format!("{method} {url}: {e}")))?;
                match response.status {
                    200..=299 => {}
                    404 => {
                        let why = format!("{method} {url} answered 404");
                        return match not_found.as_str() {
                            "drop" => Ok(Verdict::Drop(why)),
                            "error" => Err(PluginError::Other(why)),
                            _ => Ok(Verdict::Continue(Update::default())),
                        };
                    }
                    status => {
                        return Err(PluginError::Other(format!(
                            "{method} {url} answered {status}"
                        )));
                    }
                }
                let answer: Value = serde_json::from_slice(&response.body).map_err(|e| {
                    PluginError::Other(format!("{method} {url} did not answer JSON: {e}"))
                })?;
                if let Some(ttl) = cache_ttl {
                    // Too large to keep: asked again next time.
                    let _ = state::set(&key, &answer.to_string(), Some(ttl));
                }
                answer
            }
        };

        let metadata = (all.iter())
            .filter_map(|(k, pointer)| {
                let key = k.strip_prefix("metadata.")?;
                Some((
                    key.to_string(),
                    answer.pointer(pointer).and_then(scalar_text)?,
                ))
            })
            .collect();
        if into.is_empty() {
            return Ok(Verdict::Continue(Update {
                metadata,
                ..Update::default()
            }));
        }
        set_pointer(&mut body, &into, answer)?;
        Ok(continue_with_json(&body, metadata))
    }
}

/// `template` (the config's `what`) with each `{/pointer}` replaced by the body's value
/// there (a string or a number), written by `put`.
fn fill(
    template: &str,
    body: &Value,
    what: &str,
    put: fn(&mut String, &Value),
) -> Result<String, PluginError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{/") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').ok_or_else(|| {
            PluginError::InvalidConfig(format!(
                "`{what}` has an unclosed placeholder: `{template}`"
            ))
        })? + start;
        let pointer = &rest[start + 1..end];
        let value = (body.pointer(pointer))
            .filter(|v| v.is_string() || v.is_number())
            .ok_or_else(|| {
                PluginError::InvalidEvent(format!("the body has no string or number at {pointer}"))
            })?;
        put(&mut out, value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether each `{/pointer}` placeholder of `template` (the config's `what`) is closed.
fn check_placeholders(template: &str, what: &str) -> Result<(), PluginError> {
    let mut rest = template;
    while let Some(start) = rest.find("{/") {
        let Some(end) = rest[start..].find('}') else {
            return Err(PluginError::InvalidConfig(format!(
                "`{what}` has an unclosed placeholder: `{template}`"
            )));
        };
        rest = &rest[start + end + 1..];
    }
    Ok(())
}

/// What an answer is remembered by: the URL (its secret query values as `****`: the API
/// lists the keys, `GET /v1/plugins/enrich/state`) and the body a POST sends, then — when
/// the request carries what that leaves out (a secret in the URL, headers) — ` #` and the
/// first 16 hex digits of the SHA-256 of the whole URL and the headers (`\nname: value`
/// each): routes that ask one URL with different credentials never share an answer, and
/// the key holds no secret.
fn cache_key(url: &str, sent: Option<&str>, headers: &[(&str, &str)]) -> String {
    use sha2::{Digest, Sha256};
    let shown = without_query_secrets(url);
    let mut key = match sent {
        None => shown.clone(),
        Some(sent) => format!("{shown} {sent}"),
    };
    if shown != url || !headers.is_empty() {
        let mut credentials = Sha256::new();
        credentials.update(url);
        for (name, value) in headers {
            credentials.update(format!("\n{name}: {value}"));
        }
        key.push_str(" #");
        for b in &credentials.finalize()[..8] {
            key.push_str(&format!("{b:02x}"));
        }
    }
    key
}

/// `url` with the values of the query parameters whose names name a secret (`api_key`,
/// `token`, … as the gateway's API redacts them) as `****`.
fn without_query_secrets(url: &str) -> String {
    const SECRET: [&str; 7] = [
        "authorization",
        "cookie",
        "key",
        "token",
        "secret",
        "password",
        "signature",
    ];
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let params: Vec<String> = (query.split('&'))
        .map(|param| match param.split_once('=') {
            Some((name, value))
                if !value.is_empty()
                    && (SECRET.iter().any(|s| name.to_ascii_lowercase().contains(s))
                        || ["code", "sig"].iter().any(|s| name.eq_ignore_ascii_case(s))) =>
            {
                format!("{name}=****")
            }
            _ => param.to_string(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

/// A value in a URL: its text, percent-encoded.
fn percent_encoded(out: &mut String, value: &Value) {
    for b in scalar_text(value).unwrap_or_default().bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
}

/// A value in a JSON body: as JSON (a string quoted and escaped).
fn as_json(out: &mut String, value: &Value) {
    out.push_str(&value.to_string());
}

/// Sets `value` at `pointer` in `body`, making the objects missing on the way.
fn set_pointer(body: &mut Value, pointer: &str, value: Value) -> Result<(), PluginError> {
    let mut at = body;
    let tokens: Vec<String> = (pointer.split('/').skip(1))
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    for (i, token) in tokens.iter().enumerate() {
        let Value::Object(map) = at else {
            return Err(PluginError::InvalidEvent(format!(
                "cannot set {pointer}: the body is not an object on the way"
            )));
        };
        if i + 1 == tokens.len() {
            map.insert(token.clone(), value);
            return Ok(());
        }
        at = map
            .entry(token.clone())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    // (Not reached: `into` is checked to be a pointer, one token or more.)
    Ok(())
}

export_plugin!(Enrich);
