//! The set of plugins serving, by name, and what the last reload found for each file.
//! Readers take a snapshot; a reload swaps the whole map at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;

use super::LoadedPlugin;

/// The plugins serving, by name.
pub type PluginMap = HashMap<String, Arc<LoadedPlugin>>;

/// What the last reload found for one plugin name.
#[derive(Clone, Debug, Serialize)]
pub struct PluginStatus {
    /// `ok`: the file on disk is the version serving. `error`: the file on disk failed to
    /// load (`last_error`), an earlier version serves if there was one. `missing`: the file
    /// is gone but a route uses the plugin, so the last good version keeps serving.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the serving version was loaded (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<u64>,
    /// The SHA-256 of the file that failed, when it is not the serving one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_sha256: Option<String>,
}

#[derive(Default)]
pub struct PluginRegistry {
    plugins: ArcSwap<PluginMap>,
    status: Mutex<BTreeMap<String, PluginStatus>>,
}

impl PluginRegistry {
    /// The plugins serving now. An event keeps the snapshot it started with.
    pub fn snapshot(&self) -> Arc<PluginMap> {
        self.plugins.load_full()
    }

    /// The plugin of that name, if serving.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.plugins.load().get(name).cloned()
    }

    /// Swaps in a new set of plugins and their statuses.
    pub fn swap(&self, plugins: PluginMap, status: BTreeMap<String, PluginStatus>) {
        self.plugins.store(Arc::new(plugins));
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    /// The statuses of the last reload, by name.
    pub fn statuses(&self) -> BTreeMap<String, PluginStatus> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
