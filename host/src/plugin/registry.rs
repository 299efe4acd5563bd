//! The set of loaded plugins, by name: every `*.wasm` file of the plugin directory, named
//! by its file stem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{LoadedPlugin, PluginRuntime};

/// A problem found while loading the plugin directory.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read plugin directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// The plugins currently serving. Readers take a snapshot; a reload swaps the whole map.
pub struct PluginRegistry {
    plugins: ArcSwap<HashMap<String, Arc<LoadedPlugin>>>,
}

impl PluginRegistry {
    /// Loads every `*.wasm` file of `dir`. Files that fail to load are returned as errors
    /// beside the registry of those that loaded.
    pub fn load_dir(
        runtime: &PluginRuntime,
        dir: &Path,
    ) -> Result<(Self, Vec<RegistryError>), RegistryError> {
        let entries = std::fs::read_dir(dir).map_err(|source| RegistryError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wasm") && p.is_file())
            .collect();
        paths.sort();

        let mut plugins = HashMap::new();
        let mut errors = Vec::new();
        for path in paths {
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let started = std::time::Instant::now();
            match runtime.load_file(name, &path) {
                Ok(plugin) => {
                    tracing::info!(
                        plugin = name,
                        sha256 = plugin.sha256(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "Plugin loaded."
                    );
                    plugins.insert(name.to_string(), Arc::new(plugin));
                }
                Err(e) => {
                    tracing::error!(plugin = name, path = %path.display(), error = %format!("{e:#}"),
                        "Plugin failed to load.");
                    errors.push(RegistryError::File {
                        path: path.clone(),
                        message: format!("{e:#}"),
                    });
                }
            }
        }
        Ok((Self::from_map(plugins), errors))
    }

    pub fn from_map(plugins: HashMap<String, Arc<LoadedPlugin>>) -> Self {
        Self {
            plugins: ArcSwap::from_pointee(plugins),
        }
    }

    /// The plugin of that name, if loaded.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.plugins.load().get(name).cloned()
    }

    /// The loaded plugins, sorted by name.
    pub fn all(&self) -> Vec<Arc<LoadedPlugin>> {
        let mut all: Vec<Arc<LoadedPlugin>> = self.plugins.load().values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// The names of the loaded plugins, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.plugins.load().keys().cloned().collect();
        names.sort();
        names
    }
}
