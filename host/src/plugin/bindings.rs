//! The generated bindings for the `switchyard:plugin` WIT package: the one `bindgen!` call
//! of the gateway. Everything else uses these types through `plugin::`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    // `handle` is called as an async call on a fiber, so that a long call yields to the
    // runtime at every epoch tick instead of holding a thread. The host functions the
    // plugin imports are synchronous (they never block) but for `state`'s, which wait for
    // the store without holding a thread, and trap the call when it cannot answer, and
    // `http.send`, which waits for the response (and traps a call past its request cap).
    exports: { default: async },
    imports: {
        "switchyard:plugin/state.get": async | trappable,
        "switchyard:plugin/state.set": async | trappable,
        "switchyard:plugin/state.swap": async | trappable,
        "switchyard:plugin/state.remove": async | trappable,
        "switchyard:plugin/http.send": async | trappable,
    },
});

pub use self::exports::switchyard::plugin::handler::{Event, PluginError, Verdict};
pub use self::switchyard::plugin::host::LogLevel;
pub use self::switchyard::plugin::types::{Delivery, Update};

/// The package and version of the contract this gateway implements.
pub const WIT_PACKAGE: &str = "switchyard:plugin@0.1.4";
/// The interface a plugin must export.
pub const HANDLER_EXPORT: &str = "switchyard:plugin/handler@0.1.4";
/// The interface the gateway provides to plugins.
pub const HOST_IMPORT: &str = "switchyard:plugin/host@0.1.4";
/// The interface a plugin may export for its configuration to be checked (since 0.1.4;
/// not in the `plugin` world, so looked up by name: `LoadedPlugin::check_config`).
pub const CONFIG_CHECK_EXPORT: &str = "switchyard:plugin/config-check@0.1.4";
