//! The agent's Prometheus metrics: one registry, handles cloned to where things happen.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Every metric the agent exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub requests: Family<RouteLabels, Counter>,
    pub auth_failures: Family<ReasonLabels, Counter>,
    /// Seconds from a change's arrival at the owner to its answer.
    pub apply_seconds: Histogram,
    pub reloads: Counter,
    pub reload_failures: Counter,
    pub drift_repairs: Counter,
    pub haproxy_up: Gauge,
    pub servers: Gauge,
    /// Requests whose head has been read and whose answer is not sent yet.
    pub requests_in_flight: Gauge,
    /// Registrations deleted because their lease ran out.
    pub lease_expiries: Counter,
    /// 1 while more than half of the registrations are late (silent for 2/3 of the lease)
    /// and none is expired.
    pub lease_expiry_suspended: Gauge,
    /// Deleted servers still in HAProxy until their last connection ends.
    pub servers_draining: Gauge,
    /// Draining servers whose connections were shut at the drain timeout.
    pub drain_timeouts: Counter,
    /// Open API connections.
    pub connections_open: Gauge,
    /// Connections that never authenticated, closed to make room for a newer one at a cap.
    pub connections_evicted: Counter,
    /// New connections closed at once: every connection at the cap had authenticated.
    pub connections_refused: Counter,
    /// Requests answered 429 because their peer failed to authenticate too often.
    pub rate_limited: Counter,
    /// The shared budget for request bodies read before their signature is checked, and what
    /// of it is in use.
    pub body_budget_bytes: Gauge,
    pub body_budget_in_use: Gauge,
    /// Audit records that could not be written to `--audit-log` (they went to the log).
    pub audit_write_failures: Counter,
    /// Strangers' audit records left out: their address was rate-limited, or the writer was
    /// behind.
    pub audit_suppressed: Counter,
    /// The API's certificate; exported only when TLS is on ([`Metrics::with_tls`]).
    pub tls: TlsMetrics,
    /// The shared store's; always exported (zero without `--etcd`).
    pub etcd: EtcdMetrics,
}

/// etcd's metrics, shared with the store's background tasks.
#[derive(Clone, Debug)]
pub struct EtcdMetrics {
    /// Calls to etcd that failed or timed out, and watches that broke.
    pub errors: Counter,
    /// Seconds from this agent's commit being acknowledged to its watch delivering it.
    pub watch_lag: Histogram,
    /// The revision the watch has delivered up to.
    pub revision: Gauge,
}

impl Default for EtcdMetrics {
    fn default() -> Self {
        EtcdMetrics {
            errors: Counter::default(),
            // 1 ms to ~16 s.
            watch_lag: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            revision: Gauge::default(),
        }
    }
}

/// The API certificate's metrics.
#[derive(Clone, Debug, Default)]
pub struct TlsMetrics {
    /// notAfter of the leaf certificate serving now, Unix seconds.
    pub cert_expiry: Gauge,
    /// Reloads that failed (the previous certificate kept serving).
    pub reload_failures: Counter,
    /// 1 when the last reading of the files succeeded, 0 when it failed.
    pub reload_ok: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// The metrics of an agent without TLS.
    pub fn new() -> Metrics {
        Metrics::build(false)
    }

    /// The metrics of an agent serving its API over TLS: also the certificate's.
    pub fn with_tls() -> Metrics {
        Metrics::build(true)
    }

    fn build(tls_on: bool) -> Metrics {
        let mut registry = Registry::with_prefix("lbagent");
        let requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Rejected signatures by reason",
            auth_failures.clone(),
        );
        // 50 µs to ~1.6 s.
        let apply_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        registry.register(
            "apply_seconds",
            "Time to store and apply a change, in seconds",
            apply_seconds.clone(),
        );
        let reloads = Counter::default();
        registry.register(
            "haproxy_reloads",
            "HAProxy reloads started",
            reloads.clone(),
        );
        let reload_failures = Counter::default();
        registry.register(
            "haproxy_reload_failures",
            "HAProxy reloads that failed and were rolled back",
            reload_failures.clone(),
        );
        let drift_repairs = Counter::default();
        registry.register(
            "drift_repairs",
            "Times HAProxy differed from the desired state and was repaired",
            drift_repairs.clone(),
        );
        let haproxy_up = Gauge::default();
        registry.register(
            "haproxy_up",
            "1 when HAProxy's runtime socket answers",
            haproxy_up.clone(),
        );
        let servers = Gauge::default();
        registry.register("servers", "Servers in the desired state", servers.clone());
        let requests_in_flight = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "HTTP requests being handled (head read, answer not sent yet)",
            requests_in_flight.clone(),
        );
        let lease_expiries = Counter::default();
        registry.register(
            "lease_expiries",
            "Registrations deleted because their sidecar stopped renewing them",
            lease_expiries.clone(),
        );
        let lease_expiry_suspended = Gauge::default();
        registry.register(
            "lease_expiry_suspended",
            "1 while more than half of all registrations are late at once (silent for 2/3 of the lease), so none expires",
            lease_expiry_suspended.clone(),
        );
        let servers_draining = Gauge::default();
        registry.register(
            "servers_draining",
            "Deleted servers kept in HAProxy, in maintenance, until their last connection ends",
            servers_draining.clone(),
        );
        let drain_timeouts = Counter::default();
        registry.register(
            "drain_timeouts",
            "Draining servers whose remaining connections were shut at the drain timeout",
            drain_timeouts.clone(),
        );
        let audit_write_failures = Counter::default();
        registry.register(
            "audit_write_failures",
            "Audit records that could not be written to --audit-log (written to the log instead)",
            audit_write_failures.clone(),
        );
        let audit_suppressed = Counter::default();
        registry.register(
            "audit_suppressed",
            "Audit records of unauthenticated requests left out: their address was rate-limited, or the writer was behind",
            audit_suppressed.clone(),
        );
        // The name issue #12 gives the same count.
        registry.register(
            "lease_expirations",
            "Registrations deleted because their sidecar stopped renewing them (the same count as lbagent_lease_expiries_total)",
            lease_expiries.clone(),
        );
        let etcd = EtcdMetrics::default();
        registry.register(
            "etcd_errors",
            "Calls to etcd that failed or timed out, and watches that broke",
            etcd.errors.clone(),
        );
        registry.register(
            "etcd_watch_lag_seconds",
            "Seconds from this agent's own commit to its etcd watch delivering it",
            etcd.watch_lag.clone(),
        );
        registry.register(
            "etcd_revision",
            "The etcd revision this agent's watch has delivered up to",
            etcd.revision.clone(),
        );
        let tls = TlsMetrics::default();
        if tls_on {
            registry.register(
                "tls_cert_expiry_timestamp_seconds",
                "When the API's TLS certificate (the leaf) expires, Unix seconds",
                tls.cert_expiry.clone(),
            );
            registry.register(
                "tls_cert_reload_failures",
                "Readings of the TLS files that failed; the previous certificate kept serving",
                tls.reload_failures.clone(),
            );
            registry.register(
                "tls_cert_reload_ok",
                "1 when the last reading of the TLS files succeeded, 0 when it failed",
                tls.reload_ok.clone(),
            );
        }
        let connections_open = Gauge::default();
        registry.register(
            "http_connections",
            "Open connections to the API",
            connections_open.clone(),
        );
        let connections_evicted = Counter::default();
        registry.register(
            "http_connections_evicted",
            "Connections that never authenticated, closed to make room for a newer one at the per-peer or server cap",
            connections_evicted.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "http_connections_refused",
            "New connections closed at once because every connection at the cap had authenticated",
            connections_refused.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "http_rate_limited",
            "Requests answered 429 because their peer failed to authenticate too often",
            rate_limited.clone(),
        );
        let body_budget_bytes = Gauge::default();
        registry.register(
            "http_body_budget_bytes",
            "The budget shared by request bodies being read before their signature is checked",
            body_budget_bytes.clone(),
        );
        let body_budget_in_use = Gauge::default();
        registry.register(
            "http_body_budget_in_use_bytes",
            "Bytes of the body budget reserved by bodies being read or checked",
            body_budget_in_use.clone(),
        );
        Metrics {
            etcd,
            audit_write_failures,
            audit_suppressed,
            tls,
            connections_open,
            connections_evicted,
            connections_refused,
            rate_limited,
            body_budget_bytes,
            body_budget_in_use,
            lease_expiries,
            lease_expiry_suspended,
            servers_draining,
            drain_timeouts,
            registry: Arc::new(registry),
            requests,
            auth_failures,
            apply_seconds,
            reloads,
            reload_failures,
            drift_repairs,
            haproxy_up,
            requests_in_flight,
            servers,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RouteLabels {
                route: "put_server",
                status: 200,
            })
            .inc();
        m.auth_failures
            .get_or_create(&ReasonLabels {
                reason: "bad_signature",
            })
            .inc_by(2);
        m.apply_seconds.observe(0.0004);
        m.haproxy_up.set(1);
        let text = m.render();
        assert!(
            text.contains("lbagent_http_requests_total{route=\"put_server\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lbagent_auth_failures_total{reason=\"bad_signature\"} 2"),
            "{text}"
        );
        assert!(text.contains("lbagent_apply_seconds_count 1"), "{text}");
        assert!(text.contains("lbagent_haproxy_up 1"), "{text}");
        assert!(text.contains("lbagent_haproxy_reloads_total 0"), "{text}");
        assert!(!text.contains("tls_cert"), "{text}");
        let tls = Metrics::with_tls();
        tls.tls.cert_expiry.set(1_900_000_000);
        let text = tls.render();
        for line in [
            "lbagent_tls_cert_expiry_timestamp_seconds 1900000000",
            "lbagent_tls_cert_reload_failures_total 0",
            "lbagent_tls_cert_reload_ok 0",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }
}
