//! The accept loop: connection limits, the TLS handshake when TLS is on, HTTP/1 on each
//! connection, graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Api;

/// Most connections served at once; more wait in the kernel's accept queue. Sidecars hold one
/// keep-alive connection each, so this is far above normal use and far below the file limit.
pub const MAX_CONNECTIONS: usize = 4096;

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
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Wait for a free slot before accepting, so a flood cannot use up file descriptors
        // the agent needs for HAProxy's socket, its store and its config files.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
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
        stream.set_nodelay(true).ok();
        let api = api.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let served = match api.tls.clone() {
                None => serve_connection(stream, peer, api, watcher).await,
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => serve_connection(stream, peer, api, watcher).await,
                    // Plain HTTP, an old TLS version, no client certificate: closed without
                    // an HTTP answer.
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                },
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still open after {grace:?}; closing them");
    }
}

/// HTTP/1 on one connection, plain or TLS, until it ends or the shutdown closes it.
async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    api: Arc<Api>,
    watcher: Watcher,
) -> hyper::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let api = api.clone();
        async move {
            let _in_flight = InFlight::new(&api.metrics.requests_in_flight);
            Ok::<_, Infallible>(api.handle(req, peer).await)
        }
    });
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service);
    watcher.watch(conn).await
}
