//! `iot-normalize`: reshapes Onomondo, Bondio, Mobile Manager and 1NCE payloads into one
//! CloudEvents 1.0 JSON envelope:
//!
//! ```json
//! {"specversion": "1.0", "id": "...", "source": "onomondo", "type": "onomondo.usage",
//!  "time": "2020-04-23T11:39:01.000Z", "subject": "<ICCID>", "datacontenttype":
//!  "application/json", "data": { ...the original payload... }}
//! ```
//!
//! Mobile Manager order `State`/`Type` numbers are decoded to names (`StateName`,
//! `TypeName` beside the numbers), Bondio unix timestamps become RFC 3339. The provider is
//! recognised from the payload's shape, or set with config `provider = onomondo | bondio |
//! mobilemanager | 1nce`. Metadata `event_type` (the provider's own type) and `iccid` are
//! passed on.
//!
//! Try it: `switchyard plugin run iot-normalize.wasm --event examples/events/bondio-attachment-activated.json`

use serde_json::{Map, Value, json};
use switchyard_plugin::*;

struct IotNormalize;

const ORDER_TYPES: &[&str] = &[
    "Activate",
    "Cease",
    "Bar",
    "BoltOn",
    "TariffChange",
    "SimSwap",
    "UnBar",
    "ConditionalBar",
    "CPE",
    "PoolRegrade",
    "PoolActivation",
    "PoolCease",
    "APNActivation",
    "APNChangeRequest",
    "FullBar",
];
const ORDER_STATES: &[&str] = &[
    "Open",
    "Complete",
    "Failed",
    "Stalled",
    "Cancelled",
    "Pending",
];

/// The providers `provider` may name.
const PROVIDERS: &[&str] = &["onomondo", "bondio", "mobilemanager", "1nce"];

impl Plugin for IotNormalize {
    fn check_config() -> Result<(), String> {
        match config("provider") {
            Some(p) if !PROVIDERS.contains(&p.as_str()) => Err(format!(
                "unknown provider `{p}` (one of {})",
                PROVIDERS.join(", ")
            )),
            _ => Ok(()),
        }
    }

    fn handle(event: Event) -> Result<Verdict, PluginError> {
        let body = json_body(&event)?;
        let Value::Object(obj) = &body else {
            return Err(PluginError::InvalidEvent(
                "body is not a JSON object".into(),
            ));
        };
        let provider = match config("provider") {
            Some(p) => p,
            None => detect(obj)
                .ok_or_else(|| {
                    PluginError::InvalidEvent(
                        "unrecognised payload: not Onomondo, Bondio, Mobile Manager or 1NCE \
                         (set config `provider` to choose)"
                            .into(),
                    )
                })?
                .to_string(),
        };
        let received = rfc3339_from_millis(event.received_at);
        let n = match provider.as_str() {
            "onomondo" => onomondo(obj, &received)?,
            "bondio" => bondio(obj, &received)?,
            "mobilemanager" => mobile_manager(obj, &received)?,
            "1nce" => one_nce(obj, &received)?,
            other => {
                return Err(PluginError::InvalidConfig(format!(
                    "unknown provider `{other}`"
                )));
            }
        };
        let id = n.id.unwrap_or_else(|| event.id.clone());
        let mut envelope = json!({
            "specversion": "1.0",
            "id": id,
            "source": provider,
            "type": format!("{provider}.{}", n.event_type),
            "time": n.time,
            "datacontenttype": "application/json",
            "data": n.data,
        });
        let mut metadata = vec![("event_type".to_string(), n.event_type.clone())];
        if let Some(subject) = n.subject {
            envelope["subject"] = Value::String(subject.clone());
            metadata.push(("iccid".into(), subject));
        }
        Ok(continue_with_json(&envelope, metadata))
    }
}

/// What a provider's payload says, before it goes into the envelope.
struct Normalized {
    id: Option<String>,
    event_type: String,
    time: String,
    subject: Option<String>,
    data: Value,
}

fn detect(obj: &Map<String, Value>) -> Option<&'static str> {
    if obj.contains_key("OrderId") || obj.contains_key("AlertId") {
        Some("mobilemanager")
    } else if obj.get("timestamp").is_some_and(Value::is_i64) && obj.get("type").is_some() {
        Some("bondio")
    } else if obj.contains_key("sim_id") && obj.get("type").is_some() {
        Some("onomondo")
    } else if obj.contains_key("imsi")
        || obj
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.contains('_'))
    {
        Some("1nce")
    } else {
        None
    }
}

fn text(obj: &Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key).and_then(scalar_text)
}

fn required(obj: &Map<String, Value>, key: &str, provider: &str) -> Result<String, PluginError> {
    text(obj, key).ok_or_else(|| {
        PluginError::InvalidEvent(format!("{provider} payload has no `{key}` field"))
    })
}

fn onomondo(obj: &Map<String, Value>, received: &str) -> Result<Normalized, PluginError> {
    Ok(Normalized {
        id: text(obj, "id"),
        event_type: required(obj, "type", "Onomondo")?,
        time: text(obj, "time").unwrap_or_else(|| received.to_string()),
        subject: text(obj, "iccid"),
        data: Value::Object(obj.clone()),
    })
}

fn bondio(obj: &Map<String, Value>, received: &str) -> Result<Normalized, PluginError> {
    let time = match obj.get("timestamp").and_then(Value::as_i64) {
        Some(secs) => rfc3339_from_millis((secs.max(0) as u64).saturating_mul(1000)),
        None => received.to_string(),
    };
    let data = obj.get("data");
    let subject = data
        .and_then(|d| d.get("esim"))
        .and_then(scalar_text)
        .or_else(|| text(obj, "esimIccid"));
    // The envelope carries type and time; the payload's own `data` (V2 events) or the
    // rest of the payload (V1 events) becomes the envelope's data.
    let data = match data {
        Some(d @ Value::Object(_)) => d.clone(),
        _ => {
            let mut rest = obj.clone();
            rest.remove("type");
            rest.remove("timestamp");
            Value::Object(rest)
        }
    };
    Ok(Normalized {
        id: None,
        event_type: required(obj, "type", "Bondio")?,
        time,
        subject,
        data,
    })
}

fn mobile_manager(obj: &Map<String, Value>, received: &str) -> Result<Normalized, PluginError> {
    let mut data = obj.clone();
    if obj.contains_key("OrderId") {
        for (field, names) in [("State", ORDER_STATES), ("Type", ORDER_TYPES)] {
            let number = obj.get(field).and_then(Value::as_u64).ok_or_else(|| {
                PluginError::InvalidEvent(format!("Mobile Manager order has no numeric `{field}`"))
            })?;
            let name = names
                .get(number as usize)
                .map_or_else(|| format!("Unknown({number})"), |n| n.to_string());
            data.insert(format!("{field}Name"), Value::String(name));
        }
        Ok(Normalized {
            id: text(obj, "OrderId"),
            event_type: "order".into(),
            time: received.to_string(),
            subject: text(obj, "SimId"),
            data: Value::Object(data),
        })
    } else {
        Ok(Normalized {
            id: None,
            event_type: "alert".into(),
            time: received.to_string(),
            subject: text(obj, "EntityId"),
            data: Value::Object(data),
        })
    }
}

fn one_nce(obj: &Map<String, Value>, received: &str) -> Result<Normalized, PluginError> {
    Ok(Normalized {
        id: text(obj, "id"),
        event_type: text(obj, "type").unwrap_or_else(|| "event".into()),
        time: text(obj, "timestamp").unwrap_or_else(|| received.to_string()),
        subject: text(obj, "iccid"),
        data: Value::Object(obj.clone()),
    })
}

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
fn rfc3339_from_millis(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

export_plugin!(IotNormalize);
