//! The per-event state of a plugin's `Store` and the host side of the interfaces plugins
//! import: `host` (logging, configuration, lookups), `state` and `http`; and the capture of
//! the guest's stdout and stderr.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::LogLevel;
use super::bindings::switchyard::plugin::{host, http, state};

/// How much of a plugin's stdout and stderr is kept per call; the rest is dropped so a
/// chatty plugin cannot fill the gateway's memory or log.
const OUTPUT_CAP: usize = 16 * 1024;
/// How many `host.log` lines a plugin may write per call.
const LOG_LINES_CAP: usize = 100;
/// How many times a call may use `state` (each a round to the store); more traps it.
const STATE_OPS_CAP: usize = 100;

/// The data of one plugin `Store`: lives for one call of one plugin on one event.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limits: StoreLimits,
    plugin: Arc<str>,
    event_id: String,
    input: super::CallInput,
    log_lines: usize,
    state_ops: usize,
    http_requests: usize,
    /// When this call's time for HTTP requests ends (set by its first request).
    http_deadline: Option<std::time::Instant>,
    stdout: CapturedOutput,
    stderr: CapturedOutput,
}

impl PluginState {
    pub(super) fn new(
        plugin: Arc<str>,
        event_id: String,
        input: super::CallInput,
        limits: StoreLimits,
    ) -> Self {
        let stdout = CapturedOutput::default();
        let stderr = CapturedOutput::default();
        // Deny by default: no preopened directories, no environment, no arguments, no
        // sockets, stdin closed. Clocks and random numbers stay available.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limits,
            plugin,
            event_id,
            input,
            log_lines: 0,
            state_ops: 0,
            http_requests: 0,
            http_deadline: None,
            stdout,
            stderr,
        }
    }

    /// Prepares a reused (warm) instance's state for the next call.
    pub(super) fn begin_call(&mut self, event_id: String, input: super::CallInput) {
        self.event_id = event_id;
        self.input = input;
        self.log_lines = 0;
        self.state_ops = 0;
        self.http_requests = 0;
        self.http_deadline = None;
    }

    /// Lets go of the call's input, as a warm instance waits for its next call.
    pub(super) fn end_call(&mut self) {
        self.input = super::CallInput::default();
    }

    /// Writes what the guest printed to the gateway's log, one event per line, tagged with
    /// the plugin and the event.
    pub(super) fn flush_output(&self) {
        for (stream, out) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let (bytes, truncated) = out.take();
            for line in String::from_utf8_lossy(&bytes).lines() {
                let line = crate::managed::redact_query_secrets(line);
                tracing::info!(plugin = %self.plugin, event_id = %self.event_id, stream, "{line}");
            }
            if truncated {
                tracing::warn!(plugin = %self.plugin, event_id = %self.event_id, stream,
                    "Plugin output truncated at {OUTPUT_CAP} bytes.");
            }
        }
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl host::Host for PluginState {
    fn log(&mut self, level: LogLevel, message: String) {
        self.log_lines += 1;
        if self.log_lines > LOG_LINES_CAP {
            if self.log_lines == LOG_LINES_CAP + 1 {
                tracing::warn!(plugin = %self.plugin, event_id = %self.event_id,
                    "Plugin log lines beyond {LOG_LINES_CAP} per call are dropped.");
            }
            return;
        }
        let (plugin, event_id) = (&*self.plugin, &self.event_id);
        // (A line is cut at 4 KiB, as the texts a plugin returns are.)
        let message = super::clipped(crate::managed::redact_query_secrets(&message).into_owned());
        match level {
            LogLevel::Trace => tracing::trace!(plugin, event_id, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, event_id, "{message}"),
            LogLevel::Info => tracing::info!(plugin, event_id, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, event_id, "{message}"),
            LogLevel::Error => tracing::error!(plugin, event_id, "{message}"),
        }
    }

    fn config(&mut self) -> Vec<(String, String)> {
        self.input.config.to_vec()
    }

    fn lookup(&mut self, table: String, key: String) -> Option<String> {
        self.input.tables.lookup(&table, &key).map(str::to_string)
    }

    fn config_get(&mut self, key: String) -> Option<String> {
        (self.input.config)
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }
}

impl super::bindings::switchyard::plugin::types::Host for PluginState {}

impl PluginState {
    /// Counts one use of `state`, failing the call past the cap.
    fn state_op(&mut self) -> wasmtime::Result<()> {
        self.state_ops += 1;
        if self.state_ops > STATE_OPS_CAP {
            return Err(wasmtime::Error::msg(format!(
                "plugin used `state` more than {STATE_OPS_CAP} times in one call"
            )));
        }
        Ok(())
    }
}

/// A store that cannot answer fails the call (the route's `on_error` applies), rather than
/// answering `none` for a value that exists.
fn unavailable(e: crate::store::StoreError) -> wasmtime::Error {
    wasmtime::Error::msg(format!("plugin state unavailable: {e}"))
}

impl state::Host for PluginState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        self.state_op()?;
        let state = &self.input.state;
        state.get(&self.plugin, &key).await.map_err(unavailable)
    }

    async fn set(
        &mut self,
        key: String,
        value: String,
        ttl_seconds: Option<u32>,
    ) -> wasmtime::Result<Result<(), String>> {
        self.state_op()?;
        let state = &self.input.state;
        (state.set(&self.plugin, &key, value, ttl_seconds).await).map_err(unavailable)
    }

    async fn swap(
        &mut self,
        key: String,
        expected: Option<String>,
        value: String,
        ttl_seconds: Option<u32>,
    ) -> wasmtime::Result<Result<bool, String>> {
        self.state_op()?;
        let state = &self.input.state;
        let swapped = state.swap(&self.plugin, &key, expected, value, ttl_seconds);
        swapped.await.map_err(unavailable)
    }

    async fn remove(&mut self, key: String) -> wasmtime::Result<()> {
        self.state_op()?;
        let state = &self.input.state;
        state.remove(&self.plugin, &key).await.map_err(unavailable)
    }
}

impl http::Host for PluginState {
    async fn send(
        &mut self,
        request: http::Request,
    ) -> wasmtime::Result<Result<http::Response, String>> {
        self.http_requests += 1;
        if self.http_requests > super::outbound::REQUESTS_CAP {
            return Err(wasmtime::Error::msg(format!(
                "plugin sent more than {} HTTP requests in one call",
                super::outbound::REQUESTS_CAP
            )));
        }
        let grant = &self.input.http;
        let deadline = *(self.http_deadline)
            .get_or_insert_with(|| std::time::Instant::now() + grant.limits().timeout);
        let asked = super::outbound::Asked {
            method: request.method,
            url: request.url,
            headers: request.headers,
            body: request.body,
        };
        let sent = grant.send(&self.plugin, asked, deadline);
        Ok(sent.await.map(|r| http::Response {
            status: r.status,
            headers: r.headers,
            body: r.body,
        }))
    }
}

/// A bounded in-memory sink for a guest's stdout or stderr. Writes past the cap succeed
/// (so a guest's `println!` never fails and traps) but are dropped.
#[derive(Clone, Default)]
struct CapturedOutput(Arc<Mutex<Captured>>);

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

impl CapturedOutput {
    fn take(&self) -> (Vec<u8>, bool) {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (
            std::mem::take(&mut c.bytes),
            std::mem::take(&mut c.truncated),
        )
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let room = OUTPUT_CAP.saturating_sub(c.bytes.len());
        let keep = room.min(buf.len());
        c.bytes.extend_from_slice(&buf[..keep]);
        if keep < buf.len() {
            c.truncated = true;
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
