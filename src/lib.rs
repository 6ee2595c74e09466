//! lbagent routes traffic into a self-hosted Kubernetes cluster through one HAProxy VM, changing
//! HAProxy live through its runtime API (the stats socket): servers are added, moved to a new
//! address, drained or removed without a reload and without dropping a connection.
//!
//! # Layout
//!
//! - [`runtime`]: HAProxy's runtime API — the socket client ([`runtime::RuntimeClient`]), its
//!   typed commands with input validation, and the nom parsers of its answers
//!   ([`runtime::parse`]). Knows nothing of HTTP or of lbagent's state.
//! - [`lbctl`]: the operator's CLI — `lbctl show` reads the socket and prints what HAProxy is
//!   doing.
//! - `src/bin/`: thin mains for the `lbagent` daemon and `lbctl`.
//!
//! Data flows one way: request → auth → policy → desired state → plan → HAProxy. The layers
//! after `runtime` (the HTTP API, the desired-state store, the reconciler and the config
//! renderer) arrive with the agent itself.

pub mod agent;
pub mod api;
pub mod auth;
pub mod daemon;
pub mod haproxy;
pub mod lbctl;
pub mod legacy;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod reconcile;
pub mod render;
pub mod runtime;
pub mod store;
