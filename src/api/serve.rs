//! The accept loop: each new connection is admitted against the connection caps (see
//! [`super::limits`]), then served HTTP/1 with bounded heads and timeouts, over any transport
//! ([`serve_connection`]), until it ends, is evicted, or the server shuts down.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::limits::{
    peer_key, read_first_request, Admission, FirstRequest, Prefixed, MAX_FIRST_HEAD, MAX_HEAD,
};
use super::Api;

/// How long a request head may take to arrive, counted from the connection's start or from
/// the end of its previous request: it also closes idle keep-alive connections.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Counts a request in `lbagent_http_requests_in_flight` for as long as it lives, also when
/// its connection goes away before the answer.
struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> InFlight {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves the API on `listener` until `shutdown`; then stops accepting, lets in-flight
/// requests finish (up to `grace`) and returns.
pub async fn serve(
    listener: TcpListener,
    api: Arc<Api>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let connections = TaskTracker::new();
    // After the grace period, what is still open is dropped: a peer that stops reading its
    // answer must not keep the agent from exiting.
    let hard_stop = CancellationToken::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: give it a moment instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Admitted before anything is read, so the caps also bound the file descriptors
        // strangers hold, which the agent needs for HAProxy's sockets and its files.
        let admission = match api.limits.connections.admit(peer_key(peer.ip())) {
            Ok(a) => a,
            Err(why) => {
                tracing::debug!(%peer, ?why, "connection refused: every connection at the cap has authenticated");
                continue;
            }
        };
        stream.set_nodelay(true).ok();
        let connection = serve_stream(stream, peer, api.clone(), admission, shutdown.clone());
        let hard_stop = hard_stop.clone();
        connections.spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = hard_stop.cancelled() => {}
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still open after {grace:?}; closing them");
        hard_stop.cancel();
        connections.wait().await;
    }
}

/// One admitted TCP connection: the TLS handshake first when TLS is on (a failed one, such as
/// plain HTTP or an old TLS version, is closed without an HTTP answer), then HTTP/1.
async fn serve_stream(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    api: Arc<Api>,
    admission: Admission,
    shutdown: CancellationToken,
) {
    match api.tls.clone() {
        None => serve_connection(stream, peer, api, admission, shutdown).await,
        // Boxed: a handshake's state is large, and a connection's task is as large as its
        // largest state; plain connections must not carry it (4,096 of them, in a flood).
        Some(tls) => Box::pin(serve_tls(tls, stream, peer, api, admission, shutdown)).await,
    }
}

async fn serve_tls(
    tls: Arc<crate::tls::ServerTls>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    api: Arc<Api>,
    admission: Admission,
    shutdown: CancellationToken,
) {
    let handshake = tokio::select! {
        h = tls.accept(stream, peer_key(peer.ip())) => h,
        _ = admission.evicted() => return,
        _ = shutdown.cancelled() => return,
    };
    match handshake {
        Ok(stream) => serve_connection(stream, peer, api, admission, shutdown).await,
        Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
    }
}

/// Answers a first request whose head is over [`MAX_FIRST_HEAD`] with 431, written within a
/// second (the peer may not be reading), and closes.
async fn refuse_large_head<I: AsyncWrite + Unpin>(mut io: I, peer: SocketAddr) {
    use tokio::io::AsyncWriteExt;
    let body = format!(
        "{{\"error\":\"header_too_large\",\"message\":\"the first request's head is over \
         {MAX_FIRST_HEAD} bytes\"}}\n"
    );
    let answer = format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let written = tokio::time::timeout(Duration::from_secs(1), async {
        io.write_all(answer.as_bytes()).await?;
        io.shutdown().await
    })
    .await;
    tracing::debug!(%peer, ?written, "first request head too large: 431");
}

/// Serves HTTP/1 on one admitted connection from `peer`, over any transport `io` (TCP, or TLS
/// over it), until it ends, is evicted to make room for a newer one, or the server shuts down.
/// The first request is read before hyper takes the connection (see
/// [`super::limits::read_first_request`]); a connection that has not authenticated is closed
/// after each answer, so a stranger holds hyper's buffers only while it is being answered.
/// Once `shutdown` is cancelled the request in progress is answered, and the connection closed.
pub async fn serve_connection<I>(
    mut io: I,
    peer: SocketAddr,
    api: Arc<Api>,
    admission: Admission,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let first = tokio::select! {
        first = read_first_request(&mut io, Instant::now() + HEADER_TIMEOUT, &shutdown, || {
            InFlight::new(&api.metrics.requests_in_flight)
        }) => first,
        _ = admission.evicted() => return,
    };
    let first = match first {
        FirstRequest::Ready(first) => first,
        FirstRequest::TooLarge => return refuse_large_head(io, peer).await,
        FirstRequest::Gone => return,
    };
    let io = Prefixed::new(first, io);
    let mark = admission.mark();
    let closing = shutdown.clone();
    let service = service_fn(move |mut req| {
        req.extensions_mut().insert(mark.clone());
        // Spawned here, when hyper hands the request over, not when it first polls the answer:
        // a change handed to the owner is applied even if the client goes away, and its audit
        // record must be written all the same; hyper drops the answer's future when the client
        // closes, possibly before polling it.
        let handled = tokio::spawn({
            let api = api.clone();
            async move {
                let _in_flight = InFlight::new(&api.metrics.requests_in_flight);
                api.handle(req, peer).await
            }
        });
        let mark = mark.clone();
        let closing = closing.clone();
        async move {
            let mut reply = match handled.await {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::error!(%peer, error = %e, "a request's handler failed");
                    super::internal_error()
                }
            };
            if !mark.is_authenticated() || closing.is_cancelled() {
                reply
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(reply)
        }
    });
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEAD)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        // hyper closes a connection told to shut down before it has read a request, so one
        // whose first request arrived after the shutdown began is answered (with
        // `Connection: close`, above) rather than told.
        _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                ended = conn.as_mut() => ended,
                _ = admission.evicted() => Ok(()),
            }
        }
        _ = admission.evicted() => {
            tracing::debug!(%peer, "connection closed to make room: it never authenticated");
            Ok(())
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
