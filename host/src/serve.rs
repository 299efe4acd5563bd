//! Serving HTTP/1.1: the accept loop in front of the router.
//!
//! Each connection gets a deadline for a request's headers (`server.header_read_timeout`),
//! which also closes a keep-alive connection left idle that long: a client that opens
//! connections and sends nothing, or trickles its headers (slowloris), cannot hold the
//! gateway's connections and file descriptors for as long as it likes. Bodies have a
//! deadline of their own where they are read (ingest, `server.body_read_timeout`).
//! axum's `serve` sets no timer on hyper's connections, so hyper's header timeout cannot be
//! turned on through it; this loop is the same as axum's otherwise (accept errors such as
//! running out of file descriptors are retried by axum's `Listener`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::Service;

use crate::reload::Reloader;

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and waits
/// for the connections' requests in progress to be answered.
pub async fn serve(
    mut listener: TcpListener,
    app: Router,
    reloader: Arc<Reloader>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = Listener::accept(&mut listener) => accepted,
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            app.clone().call(request)
        });
        let header_timeout = reloader.config().server.header_read_timeout;
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "Connection ended with an error.");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Raises this process's soft limit of open files to its hard limit (each connection is
/// one), where the platform allows; logs what it is.
pub fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "Open files limit."),
        Err(e) => tracing::warn!(error = %e, "Cannot raise the open files limit."),
    }
}
