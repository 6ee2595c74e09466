//! The HTTP API: routes, body limits, authentication, input validation and the JSON answers.
//! A request flows one way: the head checked (length, auth headers, key, timestamp, nonce) →
//! the body read (≤ 64 KiB, under the shared budget when over 2 KiB) → verify the signature →
//! parse and validate → the owner task (policy, state, store, HAProxy) → answer. What may be
//! held before a request is authenticated is bounded in [`limits`]; the checks before the
//! content are in `intake`, the accept loop in `serve`. Nothing here holds state but the verifier's nonce cache and those limits.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::agent::{AgentHandle, Applied, ApplyError};
use crate::audit::{AuditLog, AuditRecord};
use crate::auth::{AuthHeaders, Authenticated, Verifier};
use crate::metrics::{Metrics, RouteLabels};
use crate::model::settings::{RawCheck, RawSettings, RawTimeouts};
use crate::model::{
    backend_name, check_service_label, Change, Conflict, Mode, NodeName, ServerSpec, ServerState,
    Transition,
};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// How long a request body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the HTTP server needs.
pub struct Api {
    pub agent: AgentHandle,
    pub verifier: Verifier,
    pub metrics: Metrics,
    /// `/metrics` can be turned off.
    pub metrics_enabled: bool,
    /// The old webhook's token: enables `POST /hooks/update-haproxy` (migration only).
    pub legacy_token: Option<Vec<u8>>,
    /// Where every change request is recorded.
    pub audit: AuditLog,
    /// When set, every connection is TLS: the handshake comes before any HTTP.
    pub tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
    /// What strangers may hold: connections, body bytes, failed authentications.
    pub limits: Limits,
}

mod intake;
pub mod limits;
mod serve;

use limits::{ConnectionMark, Limits};
pub use serve::serve;

type Reply = Response<Full<Bytes>>;

fn json_reply(status: StatusCode, body: serde_json::Value) -> Reply {
    serialized_reply(status, &body)
}

/// A JSON answer written straight from `body`: no `Value` tree in between, which at 10,000
/// servers is most of the time of `GET /v1/frontends`.
fn serialized_reply(status: StatusCode, body: &impl serde::Serialize) -> Reply {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// What a refusal answered, kept on the reply for the audit trail.
#[derive(Clone)]
struct Refusal(String);

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Reply {
    let message = message.into();
    let mut r = json_reply(status, json!({"error": code, "message": &message}));
    r.extensions_mut().insert(Refusal(message));
    r
}

/// The routes, parsed from the path.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Healthz,
    Metrics,
    Frontends,
    Frontend(&'a str),
    Server(&'a str, &'a str),
    LegacyHook,
    NotFound,
}

impl Route<'_> {
    fn parse(path: &str) -> Route<'_> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["healthz"] => Route::Healthz,
            ["metrics"] => Route::Metrics,
            ["v1", "frontends"] => Route::Frontends,
            ["v1", "frontends", port] => Route::Frontend(port),
            ["v1", "frontends", port, "servers", node] => Route::Server(port, node),
            ["hooks", "update-haproxy"] => Route::LegacyHook,
            _ => Route::NotFound,
        }
    }

    fn label(&self, method: &Method) -> &'static str {
        match (self, method) {
            (Route::Healthz, _) => "healthz",
            (Route::Metrics, _) => "metrics",
            (Route::Frontends, _) => "get_frontends",
            (Route::Frontend(_), &Method::PUT) => "put_frontend",
            (Route::Frontend(_), _) => "delete_frontend",
            (Route::Server(..), &Method::PUT) => "put_server",
            (Route::Server(..), _) => "delete_server",
            (Route::LegacyHook, _) => "legacy_hook",
            (Route::NotFound, _) => "not_found",
        }
    }

    fn allowed(&self) -> &'static str {
        match self {
            Route::Healthz | Route::Metrics | Route::Frontends => "GET",
            Route::Frontend(_) => "PUT, DELETE",
            Route::Server(..) => "PUT, DELETE",
            Route::LegacyHook => "POST",
            Route::NotFound => "",
        }
    }
}

/// The body of `PUT /v1/frontends/{port}/servers/{node}`. Numbers are read wide so an
/// out-of-range value gets a message naming the field rather than a type error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutServerBody {
    node_ip: String,
    node_port: i64,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    state: Option<ServerState>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    weight: Option<i64>,
    /// `false`: this registration is not renewed, and never expires by lease.
    #[serde(default)]
    lease: Option<bool>,
    /// The frontend's settings, inline: those of a frontend this creates; for an existing one,
    /// each given value must be the frontend's (else 409 naming the field).
    #[serde(default)]
    frontend: Option<RawSettings>,
}

/// The body of `PUT /v1/frontends/{port}`: the frontend's whole settings (what is left out is
/// the default), and its mode (left out: an existing frontend's, tcp for a new one).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutFrontendBody {
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    proxy_protocol: Option<String>,
    #[serde(default)]
    check: Option<RawCheck>,
    #[serde(default)]
    timeouts: Option<RawTimeouts>,
    #[serde(default)]
    maxconn: Option<i64>,
}

/// Reads a JSON body into `T`; a wrong type or an unknown field is named by its path
/// (`frontend.check.port: invalid type ...`).
fn json_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, BadRequest> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| BadRequest(format!("invalid JSON body: {e}")))?;
    de.end()
        .map_err(|e| BadRequest(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// The answer when a request's handler failed (a bug): nothing of it is known to be applied.
fn internal_error() -> Reply {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the request's handler failed; see the agent's log",
    )
}

fn bad_request(message: impl Into<String>) -> Reply {
    error(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// A 400 answer's message; turned into a response where it is returned.
#[derive(Debug)]
struct BadRequest(String);

impl From<BadRequest> for Reply {
    fn from(b: BadRequest) -> Reply {
        bad_request(b.0)
    }
}

/// A port from the request: the one port check, as a 400 naming the field.
fn checked_port(field: &'static str, value: impl std::fmt::Display) -> Result<u16, BadRequest> {
    crate::runtime::validate::port(field, value).map_err(|e| BadRequest(e.to_string()))
}

fn parse_put(body: &[u8], frontend_port: u16, node: NodeName) -> Result<Change, BadRequest> {
    let b: PutServerBody = json_body(body)?;
    let node_ip: IpAddr = b.node_ip.parse().map_err(|_| {
        BadRequest(format!(
            "node_ip {:?} is not an IPv4 or IPv6 address",
            b.node_ip
        ))
    })?;
    if node_ip.is_unspecified() || node_ip.is_multicast() {
        return Err(BadRequest(format!(
            "node_ip {node_ip} cannot be a server address"
        )));
    }
    let node_port = checked_port("node_port", b.node_port)?;
    let weight = match b.weight {
        None => None,
        Some(w) if (0..=256).contains(&w) => Some(w as u16),
        Some(w) => return Err(BadRequest(format!("weight {w} must be from 0 to 256"))),
    };
    if let Some(s) = &b.service {
        check_service_label("service", s).map_err(|e| BadRequest(e.message))?;
    }
    let frontend = b
        .frontend
        .map(|raw| raw.validate("frontend."))
        .transpose()
        .map_err(|e| BadRequest(e.to_string()))?;
    Ok(Change::PutServer {
        frontend_port,
        node,
        frontend,
        mode: b.mode.unwrap_or_default(),
        spec: ServerSpec {
            node_ip,
            node_port,
            state: b.state.unwrap_or_default(),
            service: b.service,
            weight,
            lease: b.lease.unwrap_or(true),
        },
    })
}

fn parse_put_frontend(body: &[u8], frontend_port: u16) -> Result<Change, BadRequest> {
    let b: PutFrontendBody = json_body(body)?;
    let settings = RawSettings {
        proxy_protocol: b.proxy_protocol,
        check: b.check,
        timeouts: b.timeouts,
        maxconn: b.maxconn,
    }
    .validate("")
    .map_err(|e| BadRequest(e.to_string()))?;
    Ok(Change::PutFrontend {
        frontend_port,
        mode: b.mode,
        settings,
    })
}

fn apply_error(e: ApplyError) -> Reply {
    match &e {
        ApplyError::Denied(d) => error(StatusCode::FORBIDDEN, "forbidden", d.message.clone()),
        ApplyError::Conflict(Conflict::Mode { .. } | Conflict::Setting { .. }) => {
            error(StatusCode::CONFLICT, "conflict", e.to_string())
        }
        ApplyError::Conflict(_) => error(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        ApplyError::Rejected(_) => error(StatusCode::CONFLICT, "haproxy_rejected", e.to_string()),
        ApplyError::PortOwned(_) => error(StatusCode::CONFLICT, "port_owned", e.to_string()),
        ApplyError::Unavailable(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "haproxy_unavailable",
            e.to_string(),
        ),
        ApplyError::Store(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_failed",
            e.to_string(),
        ),
        ApplyError::StoreUnavailable(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        ),
        ApplyError::ShuttingDown => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            e.to_string(),
        ),
    }
}

/// Whether a request asks for a change: those are audited, whatever becomes of them.
fn is_change_request(route: &Route<'_>, method: &Method) -> bool {
    matches!(
        route,
        Route::Frontend(_) | Route::Server(..) | Route::LegacyHook
    ) && method != Method::GET
        && method != Method::HEAD
}

impl Api {
    /// Answers one request from `peer`.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Reply {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let path_with_query = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| path.clone());
        let route = Route::parse(&path);
        let label = route.label(&method);
        let presented_key = match route {
            Route::LegacyHook => "legacy-token".to_string(),
            _ => req
                .headers()
                .get(crate::auth::HEADER_KEY)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_else(|| crate::auth::DEFAULT_KEY_ID.to_string()),
        };
        let mark = req.extensions().get::<ConnectionMark>().cloned();
        let reply = self
            .route(req, peer, &method, &route, &path_with_query)
            .await;
        if is_change_request(&route, &method) {
            self.audit_request(
                &reply,
                mark,
                &presented_key,
                peer,
                &method,
                &path_with_query,
            )
            .await;
        }
        self.metrics
            .requests
            .get_or_create(&RouteLabels {
                route: label,
                status: reply.status().as_u16(),
            })
            .inc();
        reply
    }

    /// Records a change request in the audit trail. A key holder's records are never lost
    /// (they wait for the writer); a stranger's are bounded, so strangers cannot fill the disk
    /// or hold up key holders: each refusal counts against its address like a failed
    /// authentication, none is written once the address is rate-limited (429) or while the
    /// writer is behind, and those left out are counted.
    async fn audit_request(
        &self,
        reply: &Reply,
        mark: Option<ConnectionMark>,
        key_id: &str,
        peer: SocketAddr,
        method: &Method,
        path_with_query: &str,
    ) {
        let status = reply.status();
        let authenticated = mark.is_some_and(|m| m.is_authenticated());
        let stranger_over_limit = !authenticated
            && (status == StatusCode::TOO_MANY_REQUESTS
                // A 401 was counted where it was answered.
                || (status != StatusCode::UNAUTHORIZED
                    && self
                        .limits
                        .failures
                        .failed(limits::peer_key(peer.ip()), Instant::now())
                        .is_some()));
        if stranger_over_limit {
            self.metrics.audit_suppressed.inc();
            return;
        }
        let record = AuditRecord::new(
            key_id,
            peer,
            method.as_str(),
            path_with_query,
            status.as_u16(),
            reply.extensions().get::<Refusal>().map(|r| r.0.clone()),
            reply.extensions().get::<Transition>().cloned(),
        );
        if authenticated {
            self.audit.record(&record).await;
        } else if !self.audit.try_record(&record) {
            self.metrics.audit_suppressed.inc();
        }
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        method: &Method,
        route: &Route<'_>,
        path_with_query: &str,
    ) -> Reply {
        let allowed = match (route, method) {
            (Route::NotFound, _) => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no route {}", req.uri().path()),
                )
            }
            (Route::Healthz | Route::Metrics | Route::Frontends, &Method::GET) => true,
            (Route::Frontend(_), &Method::PUT | &Method::DELETE) => true,
            (Route::Server(..), &Method::PUT | &Method::DELETE) => true,
            (Route::LegacyHook, _) if self.legacy_token.is_none() => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "the legacy endpoint is off (--legacy-token-file enables it)",
                )
            }
            (Route::LegacyHook, &Method::POST) => true,
            _ => false,
        };
        if !allowed {
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                // The method as sent is not echoed back: it can be any length.
                format!("this method is not allowed here; use {}", route.allowed()),
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(route.allowed()));
            return r;
        }
        match route {
            Route::Healthz => return self.healthz().await,
            Route::Metrics if self.metrics_enabled => {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                return r;
            }
            Route::Metrics => {
                return error(StatusCode::NOT_FOUND, "not_found", "metrics are turned off")
            }
            _ => {}
        }

        // Everything under /v1, and the legacy hook: what the head alone can refuse is refused
        // before a byte of the body is read; the body is then read under the shared budget,
        // and only then is the signature checked and the content parsed.
        let started = Instant::now();
        let deadline = started + BODY_TIMEOUT;
        let peer_key = limits::peer_key(peer.ip());
        let (parts, body) = req.into_parts();
        let len = match intake::body_length(&body) {
            Ok(len) => len,
            Err(r) => return r.into(),
        };
        let mark = parts.extensions.get::<ConnectionMark>();
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        if let (Route::LegacyHook, Some(token)) = (route, &self.legacy_token) {
            if !crate::legacy::token_matches(token, header(crate::legacy::TOKEN_HEADER)) {
                let message = format!("header {} is missing or wrong", crate::legacy::TOKEN_HEADER);
                return self.auth_failed(peer_key, "legacy_token", message, path_with_query);
            }
            if let Some(m) = mark {
                m.authenticated();
            }
            let (body, _reservation) = match self.read_body(body, len, deadline).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            return match crate::legacy::parse(&body) {
                Ok(change) => {
                    let node = match &change {
                        Change::PutServer { node, .. } | Change::DeleteServer { node, .. } => {
                            Some(node.clone())
                        }
                        Change::DeleteFrontend { .. }
                        | Change::PutFrontend { .. }
                        | Change::ReplaceFrontend { .. } => None,
                    };
                    let legacy = Authenticated {
                        key_id: "legacy-token".into(),
                        scope: None,
                    };
                    self.change(change, node, &legacy).await
                }
                Err(m) => bad_request(m),
            };
        }
        let headers = AuthHeaders {
            key_id: header(crate::auth::HEADER_KEY),
            timestamp: header(crate::auth::HEADER_TIMESTAMP),
            nonce: header(crate::auth::HEADER_NONCE),
            signature: header(crate::auth::HEADER_SIGNATURE),
        };
        if let Err(f) = self
            .verifier
            .check_head(&headers, crate::clock::unix_seconds())
        {
            return self.auth_failed(peer_key, f.reason.as_str(), f.message, path_with_query);
        }
        // A peer that failed too often gets its small requests read and checked still (a
        // sidecar behind the same NAT address keeps working), but no large body.
        if let Some(retry) = self.limits.failures.limited(peer_key, started) {
            if len > limits::SMALL_BODY {
                return self.rate_limited(peer_key, retry);
            }
        }
        let (body, _reservation) = match self.read_body(body, len, deadline).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let auth = match self.verifier.verify(
            method.as_str(),
            path_with_query,
            &headers,
            &body,
            crate::clock::unix_seconds(),
        ) {
            Ok(a) => a,
            Err(f) => {
                return self.auth_failed(peer_key, f.reason.as_str(), f.message, path_with_query)
            }
        };
        if let Some(m) = mark {
            m.authenticated();
        }

        match route {
            Route::Frontends => match self.agent.view(auth.scope.as_deref()).await {
                Some(v) => serialized_reply(StatusCode::OK, &v),
                None => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the agent is shutting down",
                ),
            },
            Route::Frontend(port) => {
                let port = match checked_port("frontend_port", port) {
                    Ok(p) => p,
                    Err(r) => return r.into(),
                };
                let change = if method == Method::PUT {
                    match parse_put_frontend(&body, port) {
                        Ok(c) => c,
                        Err(r) => return r.into(),
                    }
                } else {
                    Change::DeleteFrontend {
                        frontend_port: port,
                    }
                };
                self.change(change, None, &auth).await
            }
            Route::Server(port, node) => {
                let port = match checked_port("frontend_port", port) {
                    Ok(p) => p,
                    Err(r) => return r.into(),
                };
                let node = match NodeName::new(node) {
                    Ok(n) => n,
                    Err(e) => return bad_request(e.message),
                };
                let change = if method == Method::PUT {
                    match parse_put(&body, port, node.clone()) {
                        Ok(c) => c,
                        Err(r) => return r.into(),
                    }
                } else {
                    Change::DeleteServer {
                        frontend_port: port,
                        node: node.clone(),
                    }
                };
                self.change(change, Some(node), &auth).await
            }
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        }
    }

    /// Hands a change to the owner with the key's scope (the owner checks it, then the global
    /// policy) and answers. (The audit trail is written by [`Self::handle`], for refusals before this too.)
    async fn change(&self, change: Change, node: Option<NodeName>, auth: &Authenticated) -> Reply {
        let key_id = auth.key_id.as_str();
        let port = change.frontend_port();
        let started = Instant::now();
        let result = self.agent.apply(change, auth.scope.clone()).await;
        // The change itself, before and after, is in the audit trail (written by `handle`).
        match &result {
            Ok(ok) if ok.applied != Applied::Unchanged => {
                tracing::debug!(key = key_id, port, applied = ?ok.applied, generation = ok.generation, "change accepted")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(key = key_id, port, error = %e, "change refused"),
        }
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(ok) => {
                let status = if ok.applied == Applied::Pending {
                    StatusCode::ACCEPTED
                } else {
                    StatusCode::OK
                };
                let mut body = json!({
                    "frontend_port": port,
                    "backend": backend_name(port).as_str(),
                    "applied": ok.applied,
                    "generation": ok.generation,
                });
                if let Some(n) = node {
                    body["server"] = json!(n.as_str());
                }
                // Stored, but HAProxy refused it: its words; the agent retries on its timer.
                if let Some(why) = &ok.refused {
                    body["haproxy_refused"] = json!(why);
                }
                if let Some(why) = ok.reload_for {
                    body["reload_for"] = json!(why);
                }
                let mut r = json_reply(status, body);
                r.extensions_mut().insert(ok.transition);
                r
            }
            Err(e) => apply_error(e),
        }
    }

    async fn healthz(&self) -> Reply {
        match self.agent.health() {
            Some(h) => {
                let status = if h.haproxy == "up" && h.in_sync {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_reply(status, serde_json::to_value(h).unwrap_or_default())
            }
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the agent is shutting down",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/healthz"), Route::Healthz);
        assert_eq!(Route::parse("/v1/frontends"), Route::Frontends);
        assert_eq!(Route::parse("/v1/frontends/443"), Route::Frontend("443"));
        assert_eq!(
            Route::parse("/v1/frontends/443/servers/node-a"),
            Route::Server("443", "node-a")
        );
        assert_eq!(
            Route::parse("/v1/frontends/443/servers/a/b"),
            Route::NotFound
        );
        assert_eq!(Route::parse("/"), Route::NotFound);
    }

    fn node() -> NodeName {
        NodeName::new("node-a").unwrap()
    }

    #[test]
    fn put_body_validation_names_the_field() {
        let ok = parse_put(br#"{"node_ip":"203.0.113.7","node_port":30443,"mode":"http","state":"drain","service":"traefik","weight":100}"#, 443, node()).unwrap();
        let Change::PutServer { mode, spec, .. } = ok else {
            panic!()
        };
        assert_eq!(mode, Mode::Http);
        assert_eq!(spec.state, ServerState::Drain);
        assert_eq!(spec.weight, Some(100));
        let defaults =
            parse_put(br#"{"node_ip":"2001:db8::1","node_port":1}"#, 443, node()).unwrap();
        let Change::PutServer { mode, spec, .. } = defaults else {
            panic!()
        };
        assert_eq!(
            (mode, spec.state, spec.weight),
            (Mode::Tcp, ServerState::Ready, None)
        );

        let cases: &[(&[u8], &str)] = &[
            (b"{", "invalid JSON"),
            (
                br#"{"node_ip":"1.2.3.4","node_port":1,"extra":1}"#,
                "unknown field `extra`",
            ),
            (
                br#"{"node_ip":"1.2.3.4;show info","node_port":1}"#,
                "node_ip",
            ),
            (br#"{"node_ip":"0.0.0.0","node_port":1}"#, "node_ip"),
            (br#"{"node_ip":"1.2.3.4","node_port":0}"#, "node_port"),
            (br#"{"node_ip":"1.2.3.4","node_port":65536}"#, "node_port"),
            (
                br#"{"node_ip":"1.2.3.4","node_port":1,"weight":257}"#,
                "weight",
            ),
            (
                br#"{"node_ip":"1.2.3.4","node_port":1,"weight":-1}"#,
                "weight",
            ),
            (
                br#"{"node_ip":"1.2.3.4","node_port":1,"mode":"udp"}"#,
                "udp",
            ),
            (br#"{"node_ip":"1.2.3.4","node_port":1,"state":"up"}"#, "up"),
            (
                br#"{"node_ip":"1.2.3.4","node_port":1,"service":"a b"}"#,
                "service",
            ),
            (br#"{"node_port":1}"#, "node_ip"),
        ];
        for (body, needle) in cases {
            let r = parse_put(body, 443, node()).unwrap_err();
            assert!(
                r.0.contains(needle),
                "{}: {}",
                String::from_utf8_lossy(body),
                r.0
            );
        }
    }

    #[test]
    fn ports_in_paths() {
        assert_eq!(checked_port("frontend_port", "443").unwrap(), 443);
        for bad in ["0", "65536", "-1", "x", ""] {
            let e = checked_port("frontend_port", bad).unwrap_err();
            assert!(
                e.0.contains("frontend_port") && e.0.contains(bad),
                "{bad}: {}",
                e.0
            );
        }
    }
}
