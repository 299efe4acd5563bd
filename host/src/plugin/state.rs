//! What plugins keep from one event to the next (the WIT `state` interface, 0.1.2): text
//! values by plugin and key, in the gateway's store for the gateway's own calls, apart for a
//! dry run (it reads the store's and keeps its writes to itself), in memory for runs with no
//! store (`switchyard plugin run`, an offline `switchyard dry-run`).
//!
//! The limits a plugin's use meets are checked here, the same whatever holds the values:
//! a key of 1 to [`MAX_KEY_BYTES`] bytes, a value of at most
//! `plugins.state_max_value_bytes`, kept at most `plugins.state_ttl`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::delivery::{Clock, SystemClock};
use crate::store::{Store, StoreError};

/// The longest key a plugin may use, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// How long values are kept and how large they may be (`[plugins]`'s `state_ttl` and
/// `state_max_value_bytes`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StateLimits {
    /// How long a value is kept when its plugin names no time, and the longest it may name.
    pub ttl: Duration,
    /// The largest value, in bytes.
    pub max_value_bytes: usize,
}

impl Default for StateLimits {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30 * 24 * 3600),
            max_value_bytes: 64 << 10,
        }
    }
}

impl From<&crate::config::PluginsConfig> for StateLimits {
    fn from(p: &crate::config::PluginsConfig) -> Self {
        Self {
            ttl: p.state_ttl,
            max_value_bytes: p.state_max_value_bytes,
        }
    }
}

/// Values to start a run with no store from: by plugin, by key (as JSON, an object of
/// objects of strings).
pub type Seed = std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>;

/// Values by plugin and key, each with when it expires (ms); a dry run's overlay holds
/// `None` for a key it deleted.
type Values<V> = Arc<Mutex<HashMap<(String, String), V>>>;

#[derive(Clone)]
enum Backend {
    Store(Arc<dyn Store>),
    Memory(Values<(String, u64)>),
    /// A dry run's: the store's values, under the run's own writes.
    Overlay(Arc<dyn Store>, Values<Option<(String, u64)>>),
}

/// Where plugin calls keep their state, and the limits they meet. Cheap to clone: one per
/// call.
#[derive(Clone)]
pub struct PluginStates {
    backend: Backend,
    clock: Arc<dyn Clock>,
    limits: StateLimits,
    /// Where the gateway's own calls count their uses (`None`: dry runs, runs with no
    /// store).
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Default for PluginStates {
    /// Values in memory, for as long as this (and its clones) lives.
    fn default() -> Self {
        Self::memory()
    }
}

impl PluginStates {
    /// The gateway's: values in `store`, their time from `clock`.
    pub fn store(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self {
            backend: Backend::Store(store),
            clock,
            limits: StateLimits::default(),
            metrics: None,
        }
    }

    /// The same values, each use counted in `metrics` (`plugin_state_operations`).
    pub fn counted(self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..self
        }
    }

    /// Values in memory only (a run with no store).
    pub fn memory() -> Self {
        Self {
            backend: Backend::Memory(Values::default()),
            clock: Arc::new(SystemClock),
            limits: StateLimits::default(),
            metrics: None,
        }
    }

    /// Values in memory only, starting with these: each plugin's keys and their values
    /// (`switchyard dry-run --state`, a golden case's `state`, `plugin run --state`),
    /// kept as long as values are kept by default.
    pub fn memory_with(values: &Seed) -> Self {
        let states = Self::memory();
        let expires =
            (states.clock.now_ms()).saturating_add(StateLimits::default().ttl.as_millis() as u64);
        if let Backend::Memory(map) = &states.backend {
            let mut map = lock(map);
            for (plugin, keys) in values {
                for (key, value) in keys {
                    map.insert((plugin.clone(), key.clone()), (value.clone(), expires));
                }
            }
        }
        states
    }

    /// The same values under other limits (the config in force).
    pub fn with_limits(&self, limits: StateLimits) -> Self {
        Self {
            limits,
            ..self.clone()
        }
    }

    /// For a dry run: reads these values, keeps its writes apart (never in the store).
    pub fn dry_run(&self) -> Self {
        let backend = match &self.backend {
            Backend::Store(store) | Backend::Overlay(store, _) => {
                Backend::Overlay(store.clone(), Values::default())
            }
            Backend::Memory(_) => Backend::Memory(Values::default()),
        };
        Self {
            backend,
            metrics: None,
            ..self.clone()
        }
    }

    fn count(&self, plugin: &str, operation: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.plugin_state(plugin, operation);
        }
    }

    /// `plugin`'s value under `key`, unless it expired.
    pub async fn get(&self, plugin: &str, key: &str) -> Result<Option<String>, StoreError> {
        self.count(plugin, "get");
        let now = self.clock.now_ms();
        let entry = (plugin.to_string(), key.to_string());
        match &self.backend {
            Backend::Store(store) => store.state_get(plugin, key, now).await,
            Backend::Memory(values) => Ok(lock(values)
                .get(&entry)
                .filter(|(_, expires)| *expires > now)
                .map(|(v, _)| v.clone())),
            Backend::Overlay(store, writes) => {
                let written = lock(writes).get(&entry).cloned();
                match written {
                    Some(v) => Ok(v.filter(|(_, e)| *e > now).map(|(v, _)| v)),
                    None => store.state_get(plugin, key, now).await,
                }
            }
        }
    }

    /// Sets `plugin`'s `key` to `value` for `ttl_seconds` (at most, and by default, the
    /// limits' `ttl`). The inner error is the plugin's (a key or value over the limits,
    /// nothing stored); the outer, the store's.
    pub async fn set(
        &self,
        plugin: &str,
        key: &str,
        value: String,
        ttl_seconds: Option<u32>,
    ) -> Result<Result<(), String>, StoreError> {
        let expires = match self.checked(key, &value, ttl_seconds) {
            Ok(expires) => expires,
            Err(e) => {
                self.count(plugin, "refused");
                return Ok(Err(e));
            }
        };
        self.count(plugin, "set");
        self.put(plugin, key, Some((value, expires))).await?;
        Ok(Ok(()))
    }

    /// When a value set now for `ttl_seconds` expires, if the key and value are within the
    /// limits.
    fn checked(&self, key: &str, value: &str, ttl_seconds: Option<u32>) -> Result<u64, String> {
        self.check_key(key)?;
        if value.len() > self.limits.max_value_bytes {
            return Err(format!(
                "value of {} bytes is larger than plugins.state_max_value_bytes ({})",
                value.len(),
                self.limits.max_value_bytes
            ));
        }
        let ttl = ttl_seconds
            .map_or(self.limits.ttl, |s| Duration::from_secs(s.into()))
            .min(self.limits.ttl);
        Ok((self.clock.now_ms()).saturating_add(ttl.as_millis() as u64))
    }

    /// Sets `plugin`'s `key` to `value` as [`PluginStates::set`] does, only if it holds
    /// `expected` now (`None`: nothing); whether it did. The inner error is the plugin's.
    pub async fn swap(
        &self,
        plugin: &str,
        key: &str,
        expected: Option<String>,
        value: String,
        ttl_seconds: Option<u32>,
    ) -> Result<Result<bool, String>, StoreError> {
        let expires = match self.checked(key, &value, ttl_seconds) {
            Ok(expires) => expires,
            Err(e) => {
                self.count(plugin, "refused");
                return Ok(Err(e));
            }
        };
        let now = self.clock.now_ms();
        let entry = (plugin.to_string(), key.to_string());
        let swapped = match &self.backend {
            Backend::Store(store) => {
                (store.state_swap(plugin, key, expected, value, expires, now)).await?
            }
            Backend::Memory(values) => {
                let mut values = lock(values);
                let held = values.get(&entry).filter(|(_, e)| *e > now).map(|(v, _)| v);
                let swap = held == expected.as_ref();
                if swap {
                    values.insert(entry, (value, expires));
                }
                swap
            }
            Backend::Overlay(_, writes) => {
                // (A dry run is one event: nothing else writes to its overlay meanwhile.)
                let held = self.get(plugin, key).await?;
                let swap = held == expected;
                if swap {
                    lock(writes).insert(entry, Some((value, expires)));
                }
                swap
            }
        };
        self.count(plugin, if swapped { "swap" } else { "swap_lost" });
        Ok(Ok(swapped))
    }

    /// Removes `plugin`'s `key`, if it has one.
    pub async fn remove(&self, plugin: &str, key: &str) -> Result<(), StoreError> {
        self.count(plugin, "remove");
        if self.check_key(key).is_err() {
            // No such key can have been set.
            return Ok(());
        }
        self.put(plugin, key, None).await
    }

    async fn put(
        &self,
        plugin: &str,
        key: &str,
        value: Option<(String, u64)>,
    ) -> Result<(), StoreError> {
        let entry = (plugin.to_string(), key.to_string());
        match &self.backend {
            Backend::Store(store) => {
                let (value, expires) = value.map_or((None, 0), |(v, e)| (Some(v), e));
                store.state_put(plugin, key, value, expires).await
            }
            Backend::Memory(values) => {
                let mut values = lock(values);
                match value {
                    Some(v) => values.insert(entry, v),
                    None => values.remove(&entry),
                };
                Ok(())
            }
            Backend::Overlay(_, writes) => {
                lock(writes).insert(entry, value);
                Ok(())
            }
        }
    }

    fn check_key(&self, key: &str) -> Result<(), String> {
        if key.is_empty() {
            return Err("the key is empty".into());
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "key of {} bytes is longer than {MAX_KEY_BYTES}",
                key.len()
            ));
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock moved by hand.
    struct At(std::sync::atomic::AtomicU64);

    impl Clock for At {
        fn now_ms(&self) -> u64 {
            self.0.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    fn at(ms: u64) -> Arc<At> {
        Arc::new(At(ms.into()))
    }

    fn in_memory(clock: Arc<At>, limits: StateLimits) -> PluginStates {
        PluginStates {
            clock,
            ..PluginStates::memory().with_limits(limits)
        }
    }

    #[tokio::test]
    async fn values_are_each_plugins_own_and_expire() {
        let clock = at(1_000);
        let limits = StateLimits {
            ttl: Duration::from_secs(60),
            max_value_bytes: 8,
        };
        let s = in_memory(clock.clone(), limits);
        assert_eq!(s.set("a", "k", "1".into(), None).await.unwrap(), Ok(()));
        assert_eq!(
            s.set("a", "short", "2".into(), Some(5)).await.unwrap(),
            Ok(())
        );
        // Longer than the limit: kept only as long as the limit.
        assert_eq!(
            s.set("a", "long", "3".into(), Some(3600)).await.unwrap(),
            Ok(())
        );
        assert_eq!(s.get("a", "k").await.unwrap().as_deref(), Some("1"));
        assert_eq!(s.get("b", "k").await.unwrap(), None, "another plugin's key");
        clock
            .0
            .store(1_000 + 5_000, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(s.get("a", "short").await.unwrap(), None, "expired at 5 s");
        assert_eq!(s.get("a", "long").await.unwrap().as_deref(), Some("3"));
        clock
            .0
            .store(1_000 + 60_000, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(s.get("a", "long").await.unwrap(), None, "held to the ttl");
        assert_eq!(s.get("a", "k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn limits_refuse_and_store_nothing() {
        let limits = StateLimits {
            ttl: Duration::from_secs(60),
            max_value_bytes: 4,
        };
        let s = in_memory(at(0), limits);
        let e = s.set("a", "k", "12345".into(), None).await.unwrap();
        assert!(
            e.unwrap_err()
                .contains("larger than plugins.state_max_value_bytes (4)")
        );
        assert!(s.set("a", "", "1".into(), None).await.unwrap().is_err());
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(s.set("a", &long, "1".into(), None).await.unwrap().is_err());
        assert_eq!(s.get("a", "k").await.unwrap(), None);
        s.remove("a", &long).await.unwrap();
    }

    #[tokio::test]
    async fn a_swap_writes_only_over_what_it_expects() {
        let clock = at(0);
        let s = in_memory(clock.clone(), StateLimits::default());
        let swap = |expected: Option<&str>, value: &str, ttl: Option<u32>| {
            let (s, expected, value) = (s.clone(), expected.map(str::to_string), value.to_string());
            async move {
                s.swap("a", "k", expected, value, ttl)
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        assert!(swap(None, "1", Some(10)).await, "nothing held");
        assert!(!swap(None, "2", None).await, "1 is held");
        assert!(!swap(Some("0"), "2", None).await);
        assert!(swap(Some("1"), "2", Some(10)).await);
        assert_eq!(s.get("a", "k").await.unwrap().as_deref(), Some("2"));
        clock.0.store(10_000, std::sync::atomic::Ordering::Relaxed);
        assert!(!swap(Some("2"), "3", None).await, "2 expired");
        assert!(swap(None, "3", None).await, "an expired value is nothing");
        let big = "x".repeat(StateLimits::default().max_value_bytes + 1);
        assert!(s.swap("a", "k", None, big, None).await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_dry_run_reads_but_keeps_its_writes() {
        let s = PluginStates::memory();
        s.set("a", "k", "kept".into(), None).await.unwrap().unwrap();
        let dry = s.dry_run();
        // (In memory a dry run starts empty; over a store it reads the store: see the
        // store's tests.)
        dry.set("a", "k", "dry".into(), None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(dry.get("a", "k").await.unwrap().as_deref(), Some("dry"));
        assert_eq!(s.get("a", "k").await.unwrap().as_deref(), Some("kept"));
    }
}
