//! Write Switchyard plugins in Rust.
//!
//! The bindings are generated from the repository's `wit/` (the `checked-plugin` world of
//! `switchyard:plugin@0.1.4`), so the SDK and the gateway share one contract. A plugin
//! implements [`Plugin`] and registers itself with [`export_plugin!`]:
//!
//! ```ignore
//! use switchyard_plugin::*;
//!
//! struct Hello;
//! impl Plugin for Hello {
//!     fn handle(event: Event) -> Result<Verdict, PluginError> {
//!         let body = json_body(&event)?;
//!         log(LogLevel::Info, &format!("got {}", body["type"]));
//!         Ok(Verdict::Continue(Update::default()))
//!     }
//! }
//! export_plugin!(Hello);
//! ```
//!
//! A plugin that reads a configuration also implements [`Plugin::check_config`], so that a
//! route's configuration the plugin cannot work with is refused when it comes into force
//! (`serve --check`, a start, a reload, the management API) rather than at its first event.
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` file in
//! `target/wasm32-wasip2/release/` is the plugin.

wit_bindgen::generate!({
    path: "../../wit",
    world: "checked-plugin",
    pub_export_macro: true,
    export_macro_name: "__export_world",
    default_bindings_module: "switchyard_plugin",
});

/// What a plugin implements: [`Plugin::handle`], called for each event, and
/// [`Plugin::check_config`], called when a route's configuration of the plugin comes into
/// force. Registered with [`export_plugin!`].
pub trait Plugin {
    /// Decides what happens to one event (the WIT `handler.handle`).
    fn handle(event: Event) -> Result<Verdict, PluginError>;

    /// Whether the configuration [`config`] and [`config_all`] give now is one
    /// [`Plugin::handle`] can work with: an error says what is wrong, naming the key (the
    /// WIT `config-check.check`, since 0.1.4). `state` and `http` do nothing here. By
    /// default every configuration is accepted, and `handle`'s `invalid-config` errors
    /// show a wrong one at its first event.
    fn check_config() -> Result<(), String> {
        Ok(())
    }
}

/// Registers a type implementing [`Plugin`] as the component's `handler` and
/// `config-check` exports.
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty) => {
        const _: () = {
            struct SwitchyardPlugin;
            impl $crate::__exports::Handler for SwitchyardPlugin {
                fn handle(event: $crate::Event) -> Result<$crate::Verdict, $crate::PluginError> {
                    <$ty as $crate::Plugin>::handle(event)
                }
            }
            impl $crate::__exports::ConfigCheck for SwitchyardPlugin {
                fn check() -> Result<(), String> {
                    <$ty as $crate::Plugin>::check_config()
                }
            }
    $crate::__export_world!(SwitchyardPlugin with_types_in $crate);
        };
    };
}

#[doc(hidden)]
pub mod __exports {
    pub use crate::exports::switchyard::plugin::config_check::Guest as ConfigCheck;
    pub use crate::exports::switchyard::plugin::handler::Guest as Handler;
}
pub use switchyard::plugin::host::{LogLevel, log};
/// Requests to the HTTP services the route allows the plugin (`http::send`, or
/// [`http_get`]): the route lists their origins in the plugin's `allow_http`. Needs a
/// gateway of `switchyard:plugin@0.1.3` or later.
pub use switchyard::plugin::http;
/// What the plugin keeps from one event to the next (`state::get`, `state::set`,
/// `state::swap`, `state::remove`): text by key, in the gateway's store, each value expiring. Needs a
/// gateway of `switchyard:plugin@0.1.2`.
pub use switchyard::plugin::state;
pub use switchyard::plugin::types::{Delivery, Event, PluginError, Update, Verdict};

use serde_json::Value;

// The type is generated, so the derive cannot be added where it is defined.
#[allow(clippy::derivable_impls)]
impl Default for Update {
    fn default() -> Self {
        Update {
            body: None,
            content_type: None,
            headers: None,
            metadata: Vec::new(),
        }
    }
}

impl Delivery {
    /// A delivery of the event as it is to the named destination.
    pub fn to(destination: impl Into<String>) -> Self {
        Delivery {
            destination: destination.into(),
            body: None,
            content_type: None,
            headers: Vec::new(),
            metadata: Vec::new(),
        }
    }
}

/// The event's body parsed as JSON; a body that is not JSON is an `invalid-event` error.
pub fn json_body(event: &Event) -> Result<Value, PluginError> {
    serde_json::from_slice(&event.body)
        .map_err(|e| PluginError::InvalidEvent(format!("body is not valid JSON: {e}")))
}

/// A continue verdict that replaces the body with `value` as JSON.
pub fn continue_with_json(value: &Value, metadata: Vec<(String, String)>) -> Verdict {
    Verdict::Continue(Update {
        body: Some(serde_json::to_vec(value).unwrap_or_default()),
        content_type: Some("application/json".into()),
        headers: None,
        metadata,
    })
}

/// A value of the plugin's configuration.
pub fn config(key: &str) -> Option<String> {
    switchyard::plugin::host::config_get(key)
}

/// All of the plugin's configuration, in order.
pub fn config_all() -> Vec<(String, String)> {
    switchyard::plugin::host::config()
}

/// The row of `key` in the gateway's lookup table `table` (`[tables]` in its config), as
/// JSON: an object of the columns for a CSV table, the key's value for a JSON one. `None`
/// when there is no such row or table. Needs a gateway of `switchyard:plugin@0.1.1`.
pub fn lookup(table: &str, key: &str) -> Option<serde_json::Value> {
    let row = switchyard::plugin::host::lookup(table, key)?;
    serde_json::from_str(&row).ok()
}

/// A comma-separated configuration value as a list of trimmed, non-empty items.
pub fn config_list(key: &str) -> Vec<String> {
    config(key)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// The last value of a header (names compare case-insensitively).
pub fn header<'a>(event: &'a Event, name: &str) -> Option<&'a str> {
    event
        .headers
        .iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The last value of a metadata key set by an earlier plugin.
pub fn metadata<'a>(event: &'a Event, key: &str) -> Option<&'a str> {
    event
        .metadata
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `GET url` with `headers`, to an origin the route allows the plugin: the response,
/// whatever its status, or why there is none (not allowed, no answer in time, too large).
pub fn http_get(url: &str, headers: &[(&str, &str)]) -> Result<http::Response, String> {
    http::send(&http::Request {
        method: "GET".into(),
        url: url.into(),
        headers: (headers.iter())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: None,
    })
}

/// A JSON value as text if it is a string or a number.
pub fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
