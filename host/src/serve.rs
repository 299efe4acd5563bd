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
//!
//! With `server.tls`, each connection first completes a TLS handshake with the
//! certificate of the config in force when it was accepted (a reload that read a renewed
//! certificate applies to the next connection), within [`HANDSHAKE_TIMEOUT`]; with
//! `server.tls.client_ca`, the names of the client certificate it verified go with each of
//! the connection's requests, for ingest's `allow_client_names`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower::Service;

use crate::edge::ClientCertificate;
use crate::reload::Reloader;

/// How long a client has for its TLS handshake (at most `server.header_read_timeout`): a
/// connection that does not finish it is closed, and shutdown waits no longer for it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
        // Each request carries the peer's address and, over TLS, what its verified client
        // certificate says (`server.tls.client_ca`).
        let service = move |client: Option<Arc<ClientCertificate>>| {
            hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                if let Some(client) = &client {
                    request.extensions_mut().insert(client.clone());
                }
                app.clone().call(request)
            })
        };
        let config = reloader.config();
        let header_timeout = config.server.header_read_timeout;
        let tls = (config.server.tls.as_ref())
            .map(|t| tokio_rustls::TlsAcceptor::from(t.acceptor.clone()));
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Some(tls) = tls else {
                let service = service(None);
                return serve_connection(stream, service, header_timeout, watcher, peer).await;
            };
            let handshake = HANDSHAKE_TIMEOUT.min(header_timeout);
            match tokio::time::timeout(handshake, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let client = (stream.get_ref().1.peer_certificates())
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| ClientCertificate::of(leaf))
                        .map(Arc::new);
                    let service = service(client);
                    serve_connection(stream, service, header_timeout, watcher, peer).await
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed."),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out."),
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serves HTTP/1.1 on one connection (plain or after its TLS handshake) until it ends or,
/// at shutdown, its request in progress is answered.
async fn serve_connection<S, F>(
    stream: S,
    service: F,
    header_timeout: Duration,
    watcher: Watcher,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: hyper::service::HttpService<Incoming> + Send,
    F::Future: Send + 'static,
    F::ResBody: Send + 'static,
    <F::ResBody as hyper::body::Body>::Data: Send,
    <F::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    F::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(%peer, error = %e, "Connection ended with an error.");
    }
}

/// Raises this process's soft limit of open files to its hard limit (each connection is
/// one), where the platform allows; logs what it is.
pub fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "Open files limit."),
        Err(e) => tracing::warn!(error = %e, "Cannot raise the open files limit."),
    }
}
