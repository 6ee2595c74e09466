//! What a peer that has not authenticated may hold: connections per peer address (the oldest
//! stranger's is closed to make room), a budget shared by every request body being read before
//! its signature is checked, and a rate limit on failed authentications per peer.
//!
//! - [`connections`]: the table of open connections, per peer, with eviction.
//! - [`budget`]: the shared body budget.
//! - [`failures`]: failed authentications per peer, a token bucket each.
//! - [`first_request`]: a connection's first request, read before hyper buffers anything.

mod budget;
mod connections;
mod failures;
mod first_request;

pub use budget::{BodyBudget, BodyReservation, CONNECTION_BUFFERS};
pub use connections::{Admission, ConnectionMark, Connections, Refused};
pub use failures::FailureLimiter;
pub use first_request::{read_first_request, FirstRequest, Prefixed};

use std::net::IpAddr;

use crate::metrics::Metrics;

/// Default for `--max-connections`: sidecars hold one keep-alive connection each, so this is
/// far above normal use and far below the file limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default for `--max-connections` with TLS on: rustls keeps up to ~18 KiB more per connection,
/// so a quarter of the plain default keeps what strangers can hold near the plain figure
/// (docs/security.md, TLS).
pub const DEFAULT_MAX_CONNECTIONS_TLS: usize = 1024;
/// Default for `--max-connections-per-peer`: many sidecars may share one NAT address.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 256;
/// Default for `--body-budget`: 51 bodies of the largest size being read at once.
pub const DEFAULT_BODY_BUDGET: usize = 4 << 20;
/// A body this small is read on its connection's own allowance, outside the shared budget: a
/// real PUT is ~200 bytes, so a signed change never competes with large fake bodies. What this
/// allows at most is bounded by the connection cap.
pub const SMALL_BODY: usize = 2048;
/// Largest request head (request line and headers); a larger one is answered 431. A signed
/// request's head is ~400 bytes. With [`SMALL_BODY`] it bounds what a connection that has not
/// authenticated holds: see docs/security.md, Limits.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest head of a connection's first request, read before hyper (see
/// [`read_first_request`]); a larger one is answered 431 there. Half of [`MAX_HEAD`]: every
/// stranger's connection holds its first head, and a signed head is ~400 bytes.
pub const MAX_FIRST_HEAD: usize = 4 * 1024;
/// Default for `--auth-failure-burst`: failed authentications a peer may have in a burst before
/// it is answered 429.
pub const DEFAULT_FAILURE_BURST: u32 = 20;
/// Failed authentications per second a peer regains after its burst.
pub const FAILURES_PER_SECOND: u32 = 1;
/// Peers whose failures are remembered at once; past it the one seen longest ago is forgotten.
pub const MAX_FAILING_PEERS: usize = 10_000;

/// The limit settings, resolved from flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitSettings {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub body_budget: usize,
    pub auth_failure_burst: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            body_budget: DEFAULT_BODY_BUDGET,
            auth_failure_burst: DEFAULT_FAILURE_BURST,
        }
    }
}

/// The limits of one server, shared by its connections.
pub struct Limits {
    pub connections: std::sync::Arc<Connections>,
    pub budget: BodyBudget,
    pub failures: FailureLimiter,
}

impl Limits {
    pub fn new(settings: LimitSettings, metrics: &Metrics) -> Limits {
        Limits {
            connections: std::sync::Arc::new(Connections::new(
                settings.max_connections,
                settings.max_connections_per_peer,
                metrics,
            )),
            budget: BodyBudget::new(settings.body_budget, metrics),
            failures: FailureLimiter::new(
                settings.auth_failure_burst,
                FAILURES_PER_SECOND,
                MAX_FAILING_PEERS,
            ),
        }
    }
}

/// The address limits are kept by: an IPv4 address, or an IPv6 address's /64 (one host is
/// usually given a whole /64, so counting single IPv6 addresses would limit nothing).
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_ipv4_addresses_or_ipv6_prefixes() {
        let key = |s: &str| peer_key(s.parse().unwrap()).to_string();
        assert_eq!(key("203.0.113.7"), "203.0.113.7");
        assert_eq!(key("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::9"), key("2001:db8:1:2:ffff::1"));
        assert_ne!(key("2001:db8:1:2::9"), key("2001:db8:1:3::9"));
    }
}
