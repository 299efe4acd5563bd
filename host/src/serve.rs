//! Serving HTTP/1.1 and HTTP/2: the accept loop in front of the router.
//!
//! Each connection speaks HTTP/2 if the client asks for it — by ALPN over TLS, or by
//! opening with HTTP/2's connection preface on plain TCP ("prior knowledge", as load
//! balancers and proxies do toward their backends) — and HTTP/1.1 otherwise (hyper-util's
//! `auto` builder). An HTTP/1.1 `Upgrade: h2c` is not taken up: the request is answered in
//! HTTP/1.1.
//!
//! A client that says nothing for `server.header_read_timeout` while none of its requests is
//! being answered is disconnected, whichever protocol it speaks ([`Quiet`]): a client that
//! opens connections and sends nothing cannot hold the gateway's connections and file
//! descriptors for as long as it likes, and a keep-alive connection left idle that long is
//! closed. Over HTTP/1.1, a request's headers must also all arrive within that time (hyper's
//! header timeout, against trickled headers: slowloris); over HTTP/2, hyper bounds each
//! connection's streams and header lists and resets abusive ones. Bodies have a deadline of
//! their own where they are read (ingest, `server.body_read_timeout`). axum's `serve` sets no
//! timer on hyper's connections, so hyper's header timeout cannot be turned on through it;
//! this loop is the same as axum's otherwise (accept errors such as running out of file
//! descriptors are retried by axum's `Listener`).
//!
//! With `server.tls`, each connection first completes a TLS handshake with the
//! certificate of the config in force when it was accepted (a reload that read a renewed
//! certificate applies to the next connection), within [`HANDSHAKE_TIMEOUT`]; with
//! `server.tls.client_ca`, the names of the client certificate it verified go with each of
//! the connection's requests, for ingest's `allow_client_names`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
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
        let requests = Arc::new(Requests::new());
        let answering = requests.clone();
        // Each request carries the peer's address and, over TLS, what its verified client
        // certificate says (`server.tls.client_ca`), and counts as in flight until its
        // answer is written in full.
        let service = move |client: Option<Arc<ClientCertificate>>| {
            hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                if let Some(client) = &client {
                    request.extensions_mut().insert(client.clone());
                }
                let answering = Answering::start(answering.clone());
                let response = app.clone().call(request);
                async move { Ok::<_, Infallible>(answering.until_written(response.await?)) }
            })
        };
        let config = reloader.config();
        let header_timeout = config.server.header_read_timeout;
        let tls = (config.server.tls.as_ref())
            .map(|t| tokio_rustls::TlsAcceptor::from(t.acceptor.clone()));
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Some(tls) = tls else {
                let stream = Quiet::new(stream, header_timeout, requests);
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
                    let stream = Quiet::new(stream, header_timeout, requests);
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

/// Serves HTTP/1.1 or HTTP/2 on one connection (plain or after its TLS handshake) until it
/// ends or, at shutdown, its requests in progress are answered.
async fn serve_connection<S, F, B>(
    stream: S,
    service: F,
    header_timeout: Duration,
    watcher: Watcher,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>> + Send,
    F::Future: Send + 'static,
    F::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    (builder.http1())
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(%peer, error = %e, "Connection ended with an error.");
    }
}

/// The requests of one connection being answered, and when the last one was.
struct Requests {
    accepted: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `accepted` to when the last request was answered.
    answered: AtomicU64,
}

impl Requests {
    fn new() -> Self {
        Requests {
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            answered: AtomicU64::new(0),
        }
    }

    fn last_answered(&self) -> Instant {
        self.accepted + Duration::from_millis(self.answered.load(Ordering::Relaxed))
    }
}

/// One request being answered: in flight from [`Answering::start`] until dropped.
struct Answering(Arc<Requests>);

impl Answering {
    fn start(requests: Arc<Requests>) -> Self {
        requests.in_flight.fetch_add(1, Ordering::Relaxed);
        Answering(requests)
    }

    /// The response, still in flight until its body is written in full (or dropped): a
    /// large answer to a slow reader is not cut off for the client's silence.
    fn until_written(
        self,
        response: http::Response<axum::body::Body>,
    ) -> http::Response<impl hyper::body::Body<Data = bytes::Bytes, Error = axum::Error>> {
        response.map(|body| {
            body.map_frame(move |frame| {
                let _answering = &self;
                frame
            })
        })
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        let since = self.0.accepted.elapsed().as_millis();
        (self.0.answered).store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's stream whose reads fail (and so end the connection) once the client has
/// sent nothing for `limit` while none of its requests was being answered. The deadline is
/// moved only when its timer fires, so a read costs a clock reading, not a timer.
struct Quiet<S> {
    inner: S,
    limit: Duration,
    requests: Arc<Requests>,
    last_read: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<S> Quiet<S> {
    fn new(inner: S, limit: Duration, requests: Arc<Requests>) -> Self {
        let now = Instant::now();
        Quiet {
            inner,
            limit,
            requests,
            last_read: now,
            timer: Box::pin(tokio::time::sleep_until(now + limit)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Quiet<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let filled = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) if buf.filled().len() > filled => {
                this.last_read = Instant::now();
                return Poll::Ready(Ok(()));
            }
            ready => return ready,
        }
        // Nothing to read: wait for the deadline, and at it, see whether the client was
        // really quiet that long.
        while this.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let quiet_since = this.last_read.max(this.requests.last_answered());
            if this.requests.in_flight.load(Ordering::Relaxed) > 0 {
                this.timer.as_mut().reset(now + this.limit);
            } else if quiet_since + this.limit <= now {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client sent nothing for {:?}", this.limit),
                )));
            } else {
                this.timer.as_mut().reset(quiet_since + this.limit);
            }
        }
        Poll::Pending
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Quiet<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMIT: Duration = Duration::from_secs(10);

    /// Reads from `quiet` until it fails: how long after `from` it did, and its error kind.
    async fn read_until_cut_off<S: AsyncRead + Unpin>(
        quiet: &mut Quiet<S>,
        from: Instant,
    ) -> (Duration, io::ErrorKind) {
        let mut buf = [0u8; 16];
        loop {
            match quiet.read(&mut buf).await {
                Ok(n) => assert!(n > 0, "the client's side closed"),
                Err(e) => return (from.elapsed(), e.kind()),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_in_flight_until_its_body_is_written() {
        let requests = Arc::new(Requests::new());
        let answer = http::Response::new(axum::body::Body::from("the answer"));
        let response = Answering::start(requests.clone()).until_written(answer);
        tokio::time::sleep(LIMIT).await; // a slow reader
        assert_eq!(requests.in_flight.load(Ordering::Relaxed), 1);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "the answer");
        assert_eq!(requests.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(requests.last_answered(), requests.accepted + LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_quiet_for_the_limit_is_cut_off_unless_it_is_being_answered() {
        // Silent from the start: cut off at the limit.
        let (_client, server) = tokio::io::duplex(64);
        let start = Instant::now();
        let mut quiet = Quiet::new(server, LIMIT, Arc::new(Requests::new()));
        let (after, kind) = read_until_cut_off(&mut quiet, start).await;
        assert_eq!((after, kind), (LIMIT, io::ErrorKind::TimedOut));

        // Each byte read moves the deadline: cut off a limit after the last one.
        let (mut client, server) = tokio::io::duplex(64);
        let mut quiet = Quiet::new(server, LIMIT, Arc::new(Requests::new()));
        let talk = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(LIMIT / 2).await;
                client.write_all(b"x").await.unwrap();
            }
            client
        });
        let start = Instant::now();
        let (after, kind) = read_until_cut_off(&mut quiet, start).await;
        assert_eq!(
            (after, kind),
            (LIMIT / 2 * 3 + LIMIT, io::ErrorKind::TimedOut)
        );
        drop(talk.await.unwrap());

        // A request being answered for three limits keeps the connection; the limit counts
        // from its answer.
        let (_client, server) = tokio::io::duplex(64);
        let requests = Arc::new(Requests::new());
        let mut quiet = Quiet::new(server, LIMIT, requests.clone());
        let answering = Answering::start(requests.clone());
        let answer = tokio::spawn(async move {
            tokio::time::sleep(LIMIT * 3).await;
            drop(answering);
        });
        let start = Instant::now();
        let (after, kind) = read_until_cut_off(&mut quiet, start).await;
        assert_eq!((after, kind), (LIMIT * 4, io::ErrorKind::TimedOut));
        answer.await.unwrap();
        assert_eq!(requests.in_flight.load(Ordering::Relaxed), 0);
    }
}
