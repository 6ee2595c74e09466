//! What a request passes before its content is looked at: its body's announced length, the
//! answer to a failed authentication (401, or 429 for a peer past its burst), and the body read
//! under the shared budget.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::StatusCode;

use super::{bad_request, error, limits, Api, Reply, BODY_TIMEOUT, MAX_BODY};
use crate::metrics::ReasonLabels;

fn too_large(message: &str) -> Reply {
    error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
}

/// Why a body's length is refused from the head.
pub(super) enum LengthRefused {
    TooLarge(u64),
    Chunked,
}

impl From<LengthRefused> for Reply {
    fn from(r: LengthRefused) -> Reply {
        match r {
            LengthRefused::TooLarge(len) => too_large(&format!(
                "body of {len} bytes is over the {MAX_BODY}-byte limit"
            )),
            LengthRefused::Chunked => error(
                StatusCode::LENGTH_REQUIRED,
                "length_required",
                "send the body with a Content-Length header (chunked bodies are not accepted)",
            ),
        }
    }
}

/// The body's announced length: a Content-Length (none for no body) of at most [`MAX_BODY`].
/// A chunked body is refused, so every body's length is known before it is read (lbctl, the
/// old sidecars' curl and the examples all send Content-Length).
pub(super) fn body_length(body: &Incoming) -> Result<usize, LengthRefused> {
    match hyper::body::Body::size_hint(body).exact() {
        Some(len) if len > MAX_BODY as u64 => Err(LengthRefused::TooLarge(len)),
        Some(len) => Ok(len as usize),
        None => Err(LengthRefused::Chunked),
    }
}

impl Api {
    /// Counts a failed authentication of `peer` and answers it: 401, or 429 once the peer has
    /// used its burst of failures.
    pub(super) fn auth_failed(
        &self,
        peer: IpAddr,
        reason: &'static str,
        message: String,
        path_with_query: &str,
    ) -> Reply {
        self.metrics
            .auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
        match self.limits.failures.failed(peer, Instant::now()) {
            Some(retry) => {
                tracing::debug!(reason, %peer, path = %path_with_query, "request refused, peer rate-limited: {message}");
                self.rate_limited(peer, retry)
            }
            None => {
                tracing::info!(reason, %peer, path = %path_with_query, "request refused: {message}");
                error(StatusCode::UNAUTHORIZED, "unauthorized", message)
            }
        }
    }

    pub(super) fn rate_limited(&self, peer: IpAddr, retry: Duration) -> Reply {
        self.metrics.rate_limited.inc();
        let secs = retry.as_secs().max(1);
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "too many failed authentications from {peer}; retry after {secs} s \
                 (a correctly signed request of at most {} bytes is still served)",
                limits::SMALL_BODY
            ),
        );
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
        r
    }

    /// Reads a body of `len` bytes (announced, at most [`MAX_BODY`]) if the budget has room for
    /// it, by `deadline`. The reservation is held for as long as the body is.
    pub(super) async fn read_body(
        &self,
        body: Incoming,
        len: usize,
        deadline: Instant,
    ) -> Result<(Bytes, limits::BodyReservation), Reply> {
        let Some(reservation) = self.limits.budget.reserve(len) else {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!(
                    "no room now to read a body of {len} bytes: too many large bodies are being \
                     read; bodies of at most {} bytes are always read",
                    limits::SMALL_BODY
                ),
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return Err(r);
        };
        // A deadline on the body too: the header timeout does not cover it, and an unsigned
        // client trickling bytes would otherwise hold the connection forever.
        let collected =
            tokio::time::timeout_at(deadline.into(), Limited::new(body, MAX_BODY).collect()).await;
        let Ok(collected) = collected else {
            return Err(error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the body did not arrive within {BODY_TIMEOUT:?}"),
            ));
        };
        match collected {
            Ok(b) => {
                let bytes = b.to_bytes();
                // A connection dropped mid-body ends the body cleanly: short is not complete.
                if bytes.len() != len {
                    return Err(bad_request(format!(
                        "the body ended after {} of its {len} bytes",
                        bytes.len()
                    )));
                }
                Ok((bytes, reservation))
            }
            Err(e) => {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    return Err(too_large(&format!(
                        "body is over the {MAX_BODY}-byte limit"
                    )));
                }
                Err(bad_request(format!("could not read the body: {e}")))
            }
        }
    }
}
