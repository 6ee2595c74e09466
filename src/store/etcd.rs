//! etcd as the store of the desired state: the agents of several VMs, each driving its own
//! HAProxy, stay identical because they all follow the same keys.
//!
//! # Keys, under the prefix (`/lbagent/` by default)
//!
//! - `frontends/<port>`: one frontend (mode, settings, servers) as the JSON of
//!   [`FrontendSpec`], as the journal's snapshot holds it. One key per frontend keeps a
//!   transaction small, and two agents' changes to different frontends independent.
//! - `agents/<name>`: each running agent, on a lease of [`AGENT_TTL`]; the oldest (lowest
//!   create revision, etcd's election recipe) is the one that expires registrations.
//! - `renewals/<name>`: the heartbeats this agent received, on the same lease, so the expiring
//!   agent knows of the renewals other agents got.
//!
//! # Consistency
//!
//! A commit is one transaction: for each frontend it touches, "the key is still at the revision
//! this agent's state has" (or still absent), then the new values; otherwise the current
//! values come back ([`CommitError::Conflict`]), and the owner applies them and computes the
//! changes again. No update is lost, and the last commit wins on every agent. The watch brings
//! every commit (this agent's own too, recognised by revision) in revision order; a watch that
//! fell behind a compaction re-reads everything.
//!
//! Every call has a deadline: without quorum, etcd answers nothing, and a change must be
//! refused in seconds ([`COMMIT_TIMEOUT`]), never left hanging.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::CommitError;
use crate::metrics::EtcdMetrics;
use crate::model::{DesiredState, FrontendSpec, NodeName};

/// How long an agent's registration (and its renewals) outlive it: the expiring role moves to
/// another agent this long after the expiring one dies.
pub const AGENT_TTL: i64 = 10;
/// Deadline of a commit: a change is refused by then when etcd has no quorum.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of every other call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How often etcd is asked whether it answers (a quorum read), and the agents listed.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Pause before a watch or a registration is tried again after an error.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How to reach etcd, and who this agent is there.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// Client URLs (`http://10.0.0.1:2379`, `https://...`).
    pub endpoints: Vec<String>,
    /// Every key lives under it; ends with `/`.
    pub prefix: String,
    /// TLS to etcd: the CA that signed its certificates (PEM), read by the caller.
    pub ca_pem: Option<Vec<u8>>,
    /// TLS client certificate and key (PEM), when etcd asks for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// etcd's own authentication: user and password.
    pub user: Option<(String, String)>,
    /// This agent's name under `agents/`.
    pub agent_name: String,
    /// What other agents are told of this one: its API's address.
    pub listen: String,
    /// Random and kept across restarts (in the state directory): tells this agent's own old
    /// registration from another agent's under the same name.
    pub instance: String,
}

/// A frontend as etcd has it at `revision`: its mod revision, or for `None` (absent) the
/// revision at which it was known absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFrontend {
    pub port: u16,
    pub spec: Option<FrontendSpec>,
    pub revision: i64,
}

/// A heartbeat an agent received, as it publishes it for the expiring agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    pub port: u16,
    pub node: NodeName,
    /// Unix milliseconds.
    pub at_ms: u64,
}

/// What the watch brings to the owner.
#[derive(Debug)]
pub enum StoreEvent {
    /// Frontends changed (another agent's commit, or this agent's own coming back).
    /// `everything`: a whole re-read (after a compaction or at a restart of the watch), so a
    /// frontend it does not list is gone.
    Frontends {
        revision: i64,
        frontends: Vec<RemoteFrontend>,
        everything: bool,
    },
    /// Another agent's heartbeats.
    Renewals {
        agent: String,
        renewals: Vec<Renewal>,
    },
}

/// An agent registered under the prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSeen {
    pub name: String,
    /// Random, kept in the agent's state directory: the same agent after a restart.
    #[serde(default)]
    pub instance: String,
    /// Its API's address, as it listens.
    pub listen: String,
    pub version: String,
    /// The one that expires registrations for all.
    #[serde(default)]
    pub expiring: bool,
}

/// etcd as this agent sees it, published by the background tasks, read without waiting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdStatus {
    /// Why etcd is not usable now (`None` while it answers quorum reads and the watch runs).
    pub error: Option<String>,
    /// Why etcd cannot take a change now: quorum reads fail (a broken watch, which starts
    /// again on another member within a second, is not one).
    pub unanswered: Option<String>,
    /// The revision the watch has delivered up to.
    pub revision: i64,
    /// The agents registered now, oldest first; this one among them once registered.
    pub agents: Vec<AgentSeen>,
    /// Whether this agent is the one that expires registrations.
    pub expiring: bool,
    pub name: String,
    /// When a quorum read last succeeded.
    pub answered_at: Option<Instant>,
    /// The lease this agent's keys are on, once registered.
    pub lease: Option<i64>,
}

/// The published status, written by several tasks, each owning its own part.
#[derive(Default)]
struct Health {
    probe: Option<String>,
    watch: Option<String>,
    register: Option<String>,
}

/// The etcd store of one agent: the client, the prefix, and the tasks it runs (the watch, the
/// agent's registration, the probe), which stop when it is dropped.
pub struct EtcdStore {
    client: Client,
    prefix: String,
    status: watch::Receiver<EtcdStatus>,
    events: Option<mpsc::Receiver<StoreEvent>>,
    renewals_tx: mpsc::Sender<Vec<Renewal>>,
    metrics: EtcdMetrics,
    lag: Arc<std::sync::Mutex<Lag>>,
    stop: CancellationToken,
    /// Where the owner keeps the last state it applied ([`write_cache`]).
    cache: std::path::PathBuf,
}

/// The watch lag's bookkeeping, shared by commits and the watch: the revision the watch has
/// delivered up to, and this agent's commits above it with when they were acknowledged.
#[derive(Default)]
struct Lag {
    delivered: i64,
    pending: std::collections::VecDeque<(i64, Instant)>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn etcd_error(what: &str, e: impl std::fmt::Display) -> String {
    format!("etcd: {what}: {e}")
}

/// `call` with a deadline, its error in words naming etcd. Made again while it fails for a
/// reason another member may not have (a member down: the client's balancer keeps picking it
/// for a while; a member without a leader), until the deadline: each call here is a read, a
/// write of this agent's own keys, or a transaction guarded by revisions, which a repeat
/// cannot apply twice.
async fn timed<T, F, Fut>(what: &str, limit: Duration, mut call: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if another_member_may_answer(&e) && left > RETRY_PAUSE => {
                tracing::debug!(error = %e, "etcd: {what}: trying again");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Ok(Err(e)) => return Err(etcd_error(what, e)),
            Err(_) => {
                return Err(etcd_error(
                    what,
                    format!("no answer within {} s (no quorum?)", limit.as_secs()),
                ))
            }
        }
    }
}

/// Pause between two tries of one call ([`timed`]).
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Whether `e` is about the member or the connection that answered, not the request.
fn another_member_may_answer(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        _ => false,
    }
}

impl EtcdStore {
    /// Connects, reads every frontend under the prefix, and starts the watch from the
    /// revision read, the agent's registration and the probe. Returns the store and the
    /// desired state etcd holds.
    pub async fn open(
        options: EtcdOptions,
        metrics: EtcdMetrics,
        cache: &Path,
    ) -> Result<(EtcdStore, DesiredState), String> {
        let client = connect(&options).await?;
        let prefix = options.prefix.clone();
        // Without etcd at start, the last state this agent applied (HAProxy serves it anyway)
        // until etcd answers: an agent restarted during an etcd outage still serves, and its
        // VM keeps the floating IP.
        let cached = read_cache(cache);
        let (state, start) = match read_all(&client, &prefix, &metrics).await {
            Ok((mut state, revision)) => {
                // Generations only grow, also across restarts (the managed file says which).
                let before = cached.as_ref().map_or(0, |c| c.generation);
                state.generation = state.generation.max(before);
                (state, Some(revision))
            }
            Err(e) => match cached {
                Some(state) => {
                    tracing::warn!(error = %e, cache = %cache.display(), frontends = state.frontends.len(), "etcd does not answer: starting from the last state this agent applied, and following etcd once it answers");
                    (state, None)
                }
                None => {
                    return Err(format!(
                        "{e}; and {} holds no state this agent applied before to start from",
                        cache.display()
                    ))
                }
            },
        };
        let revision = start.unwrap_or(0);
        metrics.revision.set(revision);
        let (status_tx, status) = watch::channel(EtcdStatus {
            revision,
            name: options.agent_name.clone(),
            error: start
                .is_none()
                .then(|| "etcd: not read yet (it did not answer at start)".to_string()),
            ..Default::default()
        });
        let status_tx = Arc::new(status_tx);
        let not_read = start
            .is_none()
            .then(|| "etcd: not read yet (it did not answer at start)".to_string());
        let health = Arc::new(std::sync::Mutex::new(Health {
            watch: not_read,
            ..Health::default()
        }));
        let (events_tx, events) = mpsc::channel(1024);
        let (renewals_tx, renewals_rx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let lag = Arc::new(std::sync::Mutex::new(Lag::default()));
        let watcher = Watcher {
            client: client.clone(),
            prefix: prefix.clone(),
            name: options.agent_name.clone(),
            events: events_tx,
            status: status_tx.clone(),
            health: health.clone(),
            metrics: metrics.clone(),
            lag: Arc::clone(&lag),
        };
        tokio::spawn(watcher.run(start.map(|r| r + 1), stop.clone()));
        let registrar = Registrar {
            client: client.clone(),
            prefix: prefix.clone(),
            me: AgentSeen {
                name: options.agent_name.clone(),
                listen: options.listen.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                instance: options.instance.clone(),
                expiring: false,
            },
            status: status_tx,
            health,
            metrics: metrics.clone(),
        };
        tokio::spawn(registrar.run(renewals_rx, stop.clone()));
        Ok((
            EtcdStore {
                client,
                prefix,
                status,
                events: Some(events),
                renewals_tx,
                metrics,
                lag,
                stop,
                cache: cache.to_path_buf(),
            },
            state,
        ))
    }

    /// `--seed-from-local`: writes `state` (the local journal's) into the prefix if it holds no
    /// frontend, in one transaction (two agents seeding at once cannot mix). The commit's
    /// revision, or `None` when the prefix was not empty.
    pub async fn seed(&mut self, state: &DesiredState) -> Result<Option<i64>, String> {
        let client = self.client.clone();
        let key = format!("{}frontends/", self.prefix);
        let mut txn = Txn::new().when(vec![Compare::create_revision(
            key.clone(),
            CompareOp::Equal,
            0,
        )
        .with_prefix()]);
        let ops: Vec<TxnOp> = state
            .frontends
            .iter()
            .map(|(port, fe)| {
                TxnOp::put(
                    self.frontend_key(*port),
                    serde_json::to_vec(&**fe).expect("a frontend serializes"),
                    None,
                )
            })
            .collect();
        txn = txn.and_then(ops);
        let resp = timed("seeding the prefix", COMMIT_TIMEOUT, || {
            let (mut client, txn) = (client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    fn frontend_key(&self, port: u16) -> String {
        format!("{}frontends/{port}", self.prefix)
    }

    /// Where the last state applied is kept, for a start without etcd.
    pub fn cache_path(&self) -> &Path {
        &self.cache
    }

    pub fn status(&self) -> EtcdStatus {
        self.status.borrow().clone()
    }

    pub fn take_events(&mut self) -> Option<mpsc::Receiver<StoreEvent>> {
        self.events.take()
    }

    /// Publishes heartbeats this agent received since it last did, for the expiring agent;
    /// written in the background, on this agent's lease. `Err` gives them back when the writer
    /// is behind (etcd slow or away): to send again with the next ones.
    pub fn publish_renewals(&self, renewals: Vec<Renewal>) -> Result<(), Vec<Renewal>> {
        self.renewals_tx.try_send(renewals).map_err(|e| match e {
            mpsc::error::TrySendError::Full(v) | mpsc::error::TrySendError::Closed(v) => v,
        })
    }

    /// Every frontend etcd holds now, as a whole re-read would deliver it.
    pub async fn read_everything(&self) -> Result<(Vec<RemoteFrontend>, i64), String> {
        let (state, revision) = read_all(&self.client, &self.prefix, &self.metrics).await?;
        Ok((remote_frontends(&state, revision), revision))
    }

    /// Writes the frontends of `ports` as `state` has them, if each is still at the revision
    /// `state` knows (or still absent). Returns the commit's revision.
    pub async fn commit(
        &mut self,
        state: &DesiredState,
        ports: &BTreeSet<u16>,
    ) -> Result<i64, CommitError> {
        let mut compares = Vec::with_capacity(ports.len());
        let mut writes = Vec::with_capacity(ports.len());
        let mut reads = Vec::with_capacity(ports.len());
        for &port in ports {
            let key = self.frontend_key(port);
            compares.push(match state.revisions.present(port) {
                Some(rev) => Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
                None => Compare::version(key.clone(), CompareOp::Equal, 0),
            });
            writes.push(match state.frontends.get(&port) {
                Some(fe) => TxnOp::put(
                    key.clone(),
                    serde_json::to_vec(&**fe).expect("a frontend serializes"),
                    None,
                ),
                None => TxnOp::delete(key.clone(), None),
            });
            reads.push(TxnOp::get(key, None));
        }
        let txn = Txn::new().when(compares).and_then(writes).or_else(reads);
        let client = self.client.clone();
        let stored = timed("storing the change", COMMIT_TIMEOUT, || {
            let (mut client, txn) = (client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await;
        let resp = match stored {
            Ok(r) => r,
            Err(e) => {
                self.metrics.errors.inc();
                return Err(CommitError::Unavailable(e));
            }
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            let mut lag = self.lag.lock().expect("lag lock");
            if lag.delivered >= revision {
                // The watch was quicker than this answer.
                self.metrics.watch_lag.observe(0.0);
            } else {
                lag.pending.push_back((revision, Instant::now()));
            }
            return Ok(revision);
        }
        let mut current = Vec::with_capacity(ports.len());
        for (op, &port) in resp.op_responses().into_iter().zip(ports) {
            let TxnOpResponse::Get(get) = op else {
                continue;
            };
            current.push(match get.kvs().first() {
                Some(kv) => match decode_frontend(kv.value()) {
                    Ok(spec) => RemoteFrontend {
                        port,
                        spec: Some(spec),
                        revision: kv.mod_revision(),
                    },
                    Err(e) => {
                        return Err(CommitError::Unavailable(format!(
                            "etcd: frontend {port} holds a value lbagent cannot read: {e}"
                        )))
                    }
                },
                None => RemoteFrontend {
                    port,
                    spec: None,
                    revision,
                },
            });
        }
        Err(CommitError::Conflict(current))
    }

    /// Takes this agent's registration away at once (the expiring role moves without waiting
    /// for the lease): its lease revoked, which deletes its keys with it; then stops the tasks.
    pub async fn close(self) {
        self.stop.cancel();
        let lease = self.status.borrow().lease;
        if let Some(lease) = lease {
            let client = self.client.clone();
            let _ = timed("leaving", CALL_TIMEOUT, || {
                let mut client = client.clone();
                async move { client.lease_revoke(lease).await }
            })
            .await;
        }
    }
}

/// A state read from etcd as the frontends it holds, each at its mod revision.
fn remote_frontends(state: &DesiredState, revision: i64) -> Vec<RemoteFrontend> {
    state
        .frontends
        .iter()
        .map(|(port, fe)| RemoteFrontend {
            port: *port,
            spec: Some((**fe).clone()),
            revision: state.revisions.of(*port).unwrap_or(revision),
        })
        .collect()
}

/// The file in the state directory where an agent on etcd keeps the last state it applied, to
/// start from when etcd does not answer at start.
pub const CACHE_FILE: &str = "etcd-cache.json";

/// Writes the last state applied (`state`) to `path`, whole and durably, as the managed file is
/// written (a temporary file, fsync'd, renamed over it).
pub async fn write_cache(path: &Path, state: &DesiredState) -> Result<(), String> {
    let text = serde_json::to_string(state).expect("a state serializes");
    crate::haproxy::write_atomic(path, &text)
        .await
        .map_err(|e| e.to_string())
}

/// The state [`write_cache`] left, if it is there and readable.
pub fn read_cache(path: &Path) -> Option<DesiredState> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(state) => Some(state),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the local copy of the last state is unreadable; not using it");
            None
        }
    }
}

/// One frontend's value, checked as the journal checks what it reads back.
fn decode_frontend(value: &[u8]) -> Result<FrontendSpec, String> {
    let spec: FrontendSpec = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    Ok(spec)
}

/// The port of a `frontends/<port>` key (the prefix already taken off).
fn port_of(rest: &str) -> Option<u16> {
    rest.parse().ok()
}

async fn connect(options: &EtcdOptions) -> Result<Client, String> {
    let mut connect = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_timeout(COMMIT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), CALL_TIMEOUT)
        .with_keep_alive_while_idle(true)
        // A member cut off from the others refuses at once instead of serving stale reads
        // and a watch that never moves.
        .with_require_leader(true);
    if let Some((user, password)) = &options.user {
        connect = connect.with_user(user.clone(), password.clone());
    }
    if options.ca_pem.is_some() || options.identity.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &options.ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &options.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        connect = connect.with_tls(tls);
    }
    let endpoints = options.endpoints.join(",");
    match tokio::time::timeout(
        COMMIT_TIMEOUT,
        Client::connect(&options.endpoints, Some(connect)),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(etcd_error(&format!("connecting to {endpoints}"), e)),
        Err(_) => Err(etcd_error(
            &format!("connecting to {endpoints}"),
            "no answer within 5 s",
        )),
    }
}

/// Every frontend under `prefix`, and the revision they were read at. A value lbagent cannot
/// read is left out and counted, as the watch does: one bad key must not stop every agent.
async fn read_all(
    client: &Client,
    prefix: &str,
    metrics: &EtcdMetrics,
) -> Result<(DesiredState, i64), String> {
    let key = format!("{prefix}frontends/");
    let resp = timed("reading the frontends", COMMIT_TIMEOUT, || {
        let (mut client, key) = (client.clone(), key.clone());
        async move { client.get(key, Some(GetOptions::new().with_prefix())).await }
    })
    .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut state = DesiredState::default();
    for kv in resp.kvs() {
        let name = String::from_utf8_lossy(kv.key());
        let Some(port) = name.strip_prefix(key.as_str()).and_then(port_of) else {
            tracing::warn!(key = %name, "not a frontend's key; ignored");
            continue;
        };
        match decode_frontend(kv.value()) {
            Ok(spec) => {
                state.frontends.insert(port, Arc::new(spec));
                state.revisions.set_present(port, kv.mod_revision());
            }
            Err(e) => {
                metrics.errors.inc();
                tracing::error!(port, error = %e, "etcd holds a frontend lbagent cannot read; ignored");
            }
        }
    }
    state.generation = state.frontends.len() as u64;
    Ok((state, revision))
}

/// The watch: brings every change under the prefix to the owner, in revision order.
struct Watcher {
    client: Client,
    prefix: String,
    name: String,
    events: mpsc::Sender<StoreEvent>,
    status: Arc<watch::Sender<EtcdStatus>>,
    health: Arc<std::sync::Mutex<Health>>,
    metrics: EtcdMetrics,
    lag: Arc<std::sync::Mutex<Lag>>,
}

impl Watcher {
    /// `next`: the revision to watch from; `None`, read everything first.
    async fn run(self, next: Option<i64>, stop: CancellationToken) {
        let mut next = next.unwrap_or(0);
        loop {
            let result = tokio::select! {
                r = async {
                    if next == 0 {
                        next = self.read_everything().await? + 1;
                    }
                    self.follow(&mut next).await
                } => r,
                _ = stop.cancelled() => return,
            };
            if let Err(why) = result {
                self.metrics.errors.inc();
                tracing::warn!(error = %why, "etcd watch interrupted; starting it again");
                self.set_error(Some(why));
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY_AFTER) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    fn set_error(&self, why: Option<String>) {
        let mut h = self.health.lock().expect("health lock");
        h.watch = why;
        publish_health(&self.status, &h);
    }

    /// Follows the prefix from `next` until the watch breaks; a compacted start re-reads
    /// everything first.
    async fn follow(&self, next: &mut i64) -> Result<(), String> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(*next)
            .with_prev_key();
        let mut stream = timed("starting the watch", CALL_TIMEOUT, || {
            let (mut client, options) = (self.client.clone(), options.clone());
            let prefix = self.prefix.clone();
            async move { client.watch(prefix, Some(options)).await }
        })
        .await?;
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err("etcd: the watch ended".into()),
                Err(e) => return Err(etcd_error("watch", e)),
            };
            if resp.compact_revision() > 0 {
                tracing::warn!(
                    from = *next,
                    compacted = resp.compact_revision(),
                    "etcd compacted the revisions this watch needed; reading everything again"
                );
                *next = self.read_everything().await? + 1;
                return Ok(());
            }
            if resp.canceled() {
                return Err(format!(
                    "etcd: the watch was cancelled: {}",
                    resp.cancel_reason()
                ));
            }
            if resp.created() {
                // Running (again): no longer an error.
                self.set_error(None);
            }
            let mut frontends = Vec::new();
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                *next = (*next).max(kv.mod_revision() + 1);
                let key = String::from_utf8_lossy(kv.key());
                let Some(rest) = key.strip_prefix(self.prefix.as_str()) else {
                    continue;
                };
                let put = event.event_type() == EventType::Put;
                if let Some(port) = rest.strip_prefix("frontends/") {
                    let Some(port) = port_of(port) else { continue };
                    let spec = if put {
                        match decode_frontend(kv.value()) {
                            Ok(s) => Some(s),
                            Err(e) => {
                                self.metrics.errors.inc();
                                tracing::error!(port, error = %e, "etcd holds a frontend lbagent cannot read; ignored");
                                continue;
                            }
                        }
                    } else {
                        None
                    };
                    frontends.push(RemoteFrontend {
                        port,
                        spec,
                        revision: kv.mod_revision(),
                    });
                } else if let Some(agent) = rest.strip_prefix("renewals/") {
                    if agent == self.name || !put {
                        continue;
                    }
                    match serde_json::from_slice::<Vec<Renewal>>(kv.value()) {
                        Ok(renewals) => {
                            self.deliver(StoreEvent::Renewals {
                                agent: agent.to_string(),
                                renewals,
                            })
                            .await?
                        }
                        Err(e) => {
                            tracing::warn!(agent, error = %e, "unreadable renewals; ignored")
                        }
                    }
                }
            }
            if resp.events().is_empty() {
                continue;
            }
            // Also with no frontend in it: the owner's applied revision moves on.
            self.deliver(StoreEvent::Frontends {
                revision: *next - 1,
                frontends,
                everything: false,
            })
            .await?;
            self.seen(*next - 1);
        }
    }

    /// Reads every frontend and delivers them as a whole (what it does not list is gone);
    /// returns the revision read at.
    async fn read_everything(&self) -> Result<i64, String> {
        let (state, revision) = read_all(&self.client, &self.prefix, &self.metrics).await?;
        self.deliver(StoreEvent::Frontends {
            revision,
            frontends: remote_frontends(&state, revision),
            everything: true,
        })
        .await?;
        self.seen(revision);
        self.set_error(None);
        Ok(revision)
    }

    /// The watch has everything up to `revision`: own commits up to it are measured.
    fn seen(&self, revision: i64) {
        self.metrics.revision.set(revision);
        self.status
            .send_modify(|s| s.revision = s.revision.max(revision));
        let mut lag = self.lag.lock().expect("lag lock");
        lag.delivered = lag.delivered.max(revision);
        while let Some(&(rev, at)) = lag.pending.front() {
            if rev > revision {
                break;
            }
            self.metrics.watch_lag.observe(at.elapsed().as_secs_f64());
            lag.pending.pop_front();
        }
    }

    async fn deliver(&self, event: StoreEvent) -> Result<(), String> {
        self.events
            .send(event)
            .await
            .map_err(|_| "the agent stopped".to_string())
    }
}

fn publish_health(status: &watch::Sender<EtcdStatus>, h: &Health) {
    let error = h
        .probe
        .clone()
        .or_else(|| h.watch.clone())
        .or_else(|| h.register.clone());
    status.send_if_modified(|s| {
        let changed = s.error != error || s.unanswered != h.probe;
        s.error = error;
        s.unanswered = h.probe.clone();
        changed
    });
}

/// The agent's own keys: `agents/<name>` and `renewals/<name>` on a lease kept alive, and a
/// quorum read every [`PROBE_EVERY`] that says whether etcd answers and lists the agents.
struct Registrar {
    client: Client,
    prefix: String,
    me: AgentSeen,
    status: Arc<watch::Sender<EtcdStatus>>,
    health: Arc<std::sync::Mutex<Health>>,
    metrics: EtcdMetrics,
}

impl Registrar {
    async fn run(self, mut renewals: mpsc::Receiver<Vec<Renewal>>, stop: CancellationToken) {
        loop {
            let result = tokio::select! {
                r = self.registered(&mut renewals) => r,
                _ = stop.cancelled() => return,
            };
            if let Err(why) = result {
                self.metrics.errors.inc();
                tracing::warn!(error = %why, "etcd: this agent's registration lapsed; registering again");
                let mut h = self.health.lock().expect("health lock");
                h.register = Some(why);
                publish_health(&self.status, &h);
                // Not registered: another agent may be the oldest now.
                self.status.send_modify(|s| {
                    s.expiring = false;
                    s.lease = None;
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY_AFTER) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    fn agent_key(&self) -> String {
        format!("{}agents/{}", self.prefix, self.me.name)
    }

    fn renewals_key(&self) -> String {
        format!("{}renewals/{}", self.prefix, self.me.name)
    }

    /// Registers on a new lease, then keeps it alive, writes renewals as they come and probes,
    /// until something fails.
    async fn registered(&self, renewals: &mut mpsc::Receiver<Vec<Renewal>>) -> Result<(), String> {
        let client = &self.client;
        let lease = timed("granting this agent's lease", CALL_TIMEOUT, || {
            let mut client = client.clone();
            async move { client.lease_grant(AGENT_TTL, None).await }
        })
        .await?
        .id();
        self.claim_name(lease).await?;
        let (mut keeper, mut answers) = timed("keeping this agent's lease", CALL_TIMEOUT, || {
            let mut client = client.clone();
            async move { client.lease_keep_alive(lease).await }
        })
        .await?;
        {
            let mut h = self.health.lock().expect("health lock");
            h.register = None;
            publish_health(&self.status, &h);
        }
        self.status.send_modify(|s| s.lease = Some(lease));
        let mut tick = tokio::time::interval(PROBE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.probe().await;
                    keeper.keep_alive().await.map_err(|e| etcd_error("keeping this agent's lease", e))?;
                    let answer = tokio::time::timeout(CALL_TIMEOUT, answers.message())
                        .await
                        .map_err(|_| etcd_error("keeping this agent's lease", "no answer"))?
                        .map_err(|e| etcd_error("keeping this agent's lease", e))?;
                    match answer {
                        Some(a) if a.ttl() > 0 => {}
                        _ => return Err("etcd: this agent's lease expired".into()),
                    }
                }
                batch = renewals.recv() => {
                    let Some(mut batch) = batch else { return Ok(()) };
                    while let Ok(more) = renewals.try_recv() {
                        batch.extend(more);
                    }
                    let value = serde_json::to_vec(&batch).expect("renewals serialize");
                    let key = self.renewals_key();
                    timed("writing this agent's renewals", CALL_TIMEOUT, || {
                        let (mut client, key, value) = (client.clone(), key.clone(), value.clone());
                        async move {
                            client
                                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                                .await
                        }
                    })
                    .await?;
                }
            }
        }
    }

    /// Puts `agents/<name>` on `lease`, unless another agent holds the name: two agents under
    /// one name would both think they expire registrations, and skip each other's renewals.
    /// The same agent restarted (its instance id is kept in its state directory) takes its key
    /// back at once.
    async fn claim_name(&self, lease: i64) -> Result<(), String> {
        let key = self.agent_key();
        let me = serde_json::to_vec(&self.me).expect("an agent serializes");
        let put = || {
            TxnOp::put(
                key.clone(),
                me.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        let txn = Txn::new()
            .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![put()])
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let client = &self.client;
        let resp = timed("registering this agent", CALL_TIMEOUT, || {
            let (mut client, txn) = (client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await?;
        if resp.succeeded() {
            return Ok(());
        }
        let holder: Option<AgentSeen> = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .and_then(|kv| serde_json::from_slice(kv.value()).ok()),
            _ => None,
        });
        match holder {
            Some(h) if h.instance != self.me.instance => Err(format!(
                "etcd: another agent is registered as `{}` (listening on {}): give each agent \
                 its own --agent-name",
                h.name, h.listen
            )),
            _ => {
                let txn = Txn::new().and_then(vec![put()]);
                timed("registering this agent", CALL_TIMEOUT, || {
                    let (mut client, txn) = (client.clone(), txn.clone());
                    async move { client.txn(txn).await }
                })
                .await
                .map(|_| ())
            }
        }
    }

    /// A quorum read of the agents' keys: whether etcd answers, who runs, who expires.
    async fn probe(&self) {
        let key = format!("{}agents/", self.prefix);
        let oldest_first = GetOptions::new().with_prefix().with_sort(
            etcd_client::SortTarget::Create,
            etcd_client::SortOrder::Ascend,
        );
        let read = timed("reading the agents", CALL_TIMEOUT, || {
            let (mut client, key, options) =
                (self.client.clone(), key.clone(), oldest_first.clone());
            async move { client.get(key, Some(options)).await }
        })
        .await;
        let mut h = self.health.lock().expect("health lock");
        match read {
            Ok(resp) => {
                h.probe = None;
                let mut agents: Vec<AgentSeen> = resp
                    .kvs()
                    .iter()
                    .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
                    .collect();
                if let Some(first) = agents.first_mut() {
                    first.expiring = true;
                }
                let expiring = agents.first().is_some_and(|a| a.name == self.me.name);
                self.status.send_modify(|s| {
                    s.agents = agents;
                    s.expiring = expiring;
                    s.answered_at = Some(Instant::now());
                });
            }
            Err(why) => {
                self.metrics.errors.inc();
                if h.probe.is_none() {
                    tracing::warn!(error = %why, "etcd does not answer");
                }
                h.probe = Some(why);
                // Without etcd nobody can tell who expires: nobody does.
                self.status.send_modify(|s| s.expiring = false);
            }
        }
        publish_health(&self.status, &h);
    }
}
