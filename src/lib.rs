//! lbagent routes traffic into a self-hosted Kubernetes cluster through one HAProxy VM, changing
//! HAProxy live through its runtime API (the stats socket): servers are added, moved to a new
//! address, drained or removed without a reload and without dropping a connection.
//!
//! # Layout
//!
//! Data flows one way: request → auth → policy → desired state (the owner task) → plan →
//! HAProxy (runtime first, a reload only for a new or removed frontend) → store (fsync) →
//! answer. HAProxy goes before the disk so traffic moves without waiting for the fsync; a
//! change the store refuses is taken back out of HAProxy before the error is answered.
//!
//! - [`runtime`]: HAProxy's runtime API — the socket client ([`runtime::RuntimeClient`]), its
//!   typed commands with input validation, and the nom parsers of its answers
//!   ([`runtime::parse`]). Knows nothing of HTTP or of lbagent's state.
//! - [`api`]: the HTTP API (routes, body limits, validation, JSON answers) on hyper, and the
//!   limits on what unauthenticated clients may hold (`api::limits`);
//!   [`auth`]: HMAC request signatures, keys files, the replay window;
//!   [`legacy`]: the old webhook's endpoint, for migration; [`secret_file`]: reading the keys
//!   file and the legacy token, refused when others may read them; [`audit`]: one JSON line
//!   per change request, accepted or refused.
//! - [`policy`]: which ports and addresses a request may use: the global policy, and each
//!   key's [`policy::Scope`], checked by the API before the owner applies the global policy.
//! - [`model`]: the desired state and the one way to change it; [`store`]: where it is kept,
//!   the local journal and snapshots (one VM), or etcd, shared by the agents of several VMs,
//!   each following the others' commits through a watch.
//! - [`agent`]: the owner task — the only holder of state, store and runtime connection; group
//!   commit, reloads with rollback, the drift-repair timer.
//! - [`reconcile`]: desired vs observed → runtime commands (pure); [`render`]: the config file
//!   the agent owns; [`haproxy`]: HAProxy's files, confirmed reloads that hand the servers'
//!   state to the new worker, the managed process.
//! - [`metrics`]: Prometheus metrics; [`daemon`]: flags, settings file, start-up and signals;
//!   [`clock`]: Unix seconds for every timestamp, and the one duration parser of every flag.
//! - [`tls`]: TLS for the API on rustls — the server's reloadable certificate and its
//!   directory watch, managed mode's self-signed certificate, `lbctl`'s client side.
//! - [`lbctl`]: the CLI — `show`, `state`, `phone-home` (the sidecar), `sign`.
//! - `src/bin/`: thin mains for `lbagent` and `lbctl`.

pub mod agent;
pub mod api;
pub mod audit;
pub mod auth;
pub mod clock;
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
pub mod secret_file;
pub mod store;
pub mod tls;
