//! The gateway's own representation of an event as it moves along the data path, and the
//! `Body` wrapper that shows bytes readably in JSON views.

use base64::Engine as _;
use bytes::Bytes;
use serde::{Serialize, Serializer};

/// HTTP headers or metadata as ordered (name, value) pairs.
pub type Pairs = Vec<(String, String)>;

/// One event: the accepted request, reshaped step by step by the plugins of a route.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// The gateway's id (a UUIDv7), assigned at ingest.
    pub id: String,
    /// The source it was posted to.
    pub source: String,
    /// Acceptance time in milliseconds since the Unix epoch.
    pub received_at: u64,
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Pairs,
    pub content_type: Option<String>,
    /// Shown as `body` and, beside it, `body_encoding` (see [`Body`]).
    #[serde(flatten, serialize_with = "Body::with_encoding")]
    pub body: Body,
    /// Metadata accumulated from plugins (empty on ingest).
    pub metadata: Pairs,
    /// Which run of the event this is: 0 at first, one more per replay.
    pub run: u32,
}

/// Sets `key` in `pairs`, replacing an earlier value (the last value of a key wins).
pub fn merge_pairs(pairs: &mut Pairs, more: impl IntoIterator<Item = (String, String)>) {
    for (k, v) in more {
        pairs.retain(|(existing, _)| *existing != k);
        pairs.push((k, v));
    }
}

/// The last value of `key` in `pairs`.
pub fn lookup<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A body of bytes. In JSON views it shows as the JSON value when it is valid JSON, as a
/// string when it is UTF-8 text, and as `{"base64": "..."}` otherwise; `body_encoding`
/// (`json`, `text`, `base64`) beside it tells which, where a view has one — a JSON string,
/// or a JSON object `{"base64": …}`, shows as text or bytes would.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Body(pub Bytes);

/// How a body shows in a JSON view: which of its JSON value, text or base64 `body` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BodyEncoding {
    /// Valid JSON, shown as its value.
    Json,
    /// UTF-8 text that is not JSON, shown as a string.
    Text,
    /// Other bytes, shown as `{"base64": "..."}`.
    Base64,
}

/// A body as a JSON view shows it.
enum Shown<'a> {
    Json(serde_json::Value),
    Text(&'a str),
    Base64,
}

impl Body {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// How the body shows in a JSON view.
    pub fn encoding(&self) -> BodyEncoding {
        match self.shown() {
            Shown::Json(_) => BodyEncoding::Json,
            Shown::Text(_) => BodyEncoding::Text,
            Shown::Base64 => BodyEncoding::Base64,
        }
    }

    fn shown(&self) -> Shown<'_> {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&self.0) {
            return Shown::Json(value);
        }
        match std::str::from_utf8(&self.0) {
            Ok(text) => Shown::Text(text),
            Err(_) => Shown::Base64,
        }
    }

    /// Serializes a struct's body field as two: `body` and `body_encoding`
    /// (`#[serde(flatten, serialize_with = "Body::with_encoding")]`).
    pub fn with_encoding<S: Serializer>(body: &Body, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(2))?;
        let encoding = match body.shown() {
            Shown::Json(value) => {
                map.serialize_entry("body", &value)?;
                BodyEncoding::Json
            }
            Shown::Text(text) => {
                map.serialize_entry("body", text)?;
                BodyEncoding::Text
            }
            Shown::Base64 => {
                map.serialize_entry("body", &Base64(&body.0))?;
                BodyEncoding::Base64
            }
        };
        map.serialize_entry("body_encoding", &encoding)?;
        map.end()
    }
}

/// Bytes as `{"base64": "..."}`.
struct Base64<'a>(&'a [u8]);

impl Serialize for Base64<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.0);
        serde_json::json!({ "base64": b64 }).serialize(s)
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Self {
        Body(Bytes::from(v))
    }
}

impl Serialize for Body {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.shown() {
            Shown::Json(value) => value.serialize(s),
            Shown::Text(text) => s.serialize_str(text),
            Shown::Base64 => Base64(&self.0).serialize(s),
        }
    }
}
