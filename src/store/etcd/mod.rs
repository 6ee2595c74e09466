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
//!
//! # Layout
//!
//! - `mod.rs`: the store the owner holds (commits, seeding, a whole read) and what the
//!   background tasks publish.
//! - `call.rs`: every call's deadline and retries, connecting, reading the frontends.
//! - `watcher.rs`: the watch that brings every commit to the owner.
//! - `registrar.rs`: the agent's own keys on a lease, the renewals it publishes, the probe.
//! - `cache.rs`: the local copy of the last state applied.

mod cache;
mod call;
mod registrar;
mod watcher;

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

use super::{CommitError, Committed};
use crate::metrics::EtcdMetrics;
use crate::model::{DesiredState, FrontendSpec, NodeName};

pub use cache::{read_cache, write_cache, CACHE_FILE};
use call::{connect, decode_frontend, etcd_error, port_of, read_all, remote_frontends, timed};
use registrar::Registrar;
use watcher::Watcher;

/// How long an agent's registration (and its renewals) outlive it: the expiring role moves to
/// another agent this long after the expiring one dies.
pub const AGENT_TTL: i64 = 10;
/// Deadline of a commit: a change is refused by then when etcd has no quorum.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// What `/healthz` says of an agent started from its local copy until etcd answers.
const NOT_READ: &str = "etcd: not read yet (it did not answer at start)";
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
    /// Unix milliseconds, by the clock of the agent that heard it.
    pub at_ms: u64,
    /// How long before its write it was heard, by that same clock: the expiring agent counts
    /// it from its arrival less this, so one held back by an etcd outage does not extend the
    /// lease by the outage, and no two VMs' clocks are compared.
    #[serde(default)]
    pub age_ms: u64,
    /// When it was heard, on the monotonic clock of the agent that heard it (which measures
    /// `age_ms` by it: a wall clock stepped meanwhile does not age a renewal).
    #[serde(skip)]
    pub heard_at: Option<Instant>,
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
        let (state, start, unanswered) = match read_all(&client, &prefix, &metrics).await {
            Ok((mut state, revision)) => {
                // Generations only grow, also across restarts (the managed file says which).
                let before = cached.as_ref().map_or(0, |c| c.generation);
                state.generation = state.generation.max(before);
                (state, Some(revision), None)
            }
            Err(e) => match cached {
                Some(state) => {
                    tracing::warn!(error = %e, cache = %cache.display(), frontends = state.frontends.len(), "etcd does not answer: starting from the last state this agent applied, and following etcd once it answers");
                    // Known away from the start: changes are refused at once until a probe
                    // answers, not after a commit's timeout.
                    (state, None, Some(e))
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
            error: start.is_none().then(|| NOT_READ.to_string()),
            unanswered: unanswered.clone(),
            ..Default::default()
        });
        let status_tx = Arc::new(status_tx);
        let not_read = start.is_none().then(|| NOT_READ.to_string());
        let health = Arc::new(std::sync::Mutex::new(Health {
            watch: not_read,
            probe: unanswered,
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
            probe_now: tokio::sync::Notify::new(),
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
        let resp = call::txn(&client, "seeding the prefix", COMMIT_TIMEOUT, txn).await?;
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

    /// The status as the background tasks publish it, for readers that must not wait.
    pub fn status_watch(&self) -> watch::Receiver<EtcdStatus> {
        self.status.clone()
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
    /// `state` knows (or still absent). Returns the revision each is at now.
    pub async fn commit(
        &mut self,
        state: &DesiredState,
        ports: &BTreeSet<u16>,
    ) -> Result<Committed, CommitError> {
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
        let stored = call::txn(&self.client, "storing the change", COMMIT_TIMEOUT, txn).await;
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
            let frontends = ports.iter().map(|&port| (port, revision)).collect();
            return Ok(Committed {
                revision,
                frontends,
            });
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
        // A try made again after a lost connection (see `timed`) finds this very commit: the
        // keys hold what it wrote. That is a success, not another agent's change (and were it
        // another's that wrote the same, the keys are still as this commit wants them). Each
        // key keeps its own revision: other writes may have come between, and a later commit
        // guarded by anything newer than a key's mod revision would lose for ever.
        let ours = current
            .iter()
            .all(|c| c.spec.as_ref() == state.frontends.get(&c.port).map(|f| &**f));
        if ours && current.len() == ports.len() {
            let frontends = current.iter().map(|c| (c.port, c.revision)).collect();
            // Not the answer's revision: it may count other agents' commits the watch has not
            // brought yet, and this agent has not applied those.
            let revision = current
                .iter()
                .filter(|c| c.spec.is_some())
                .map(|c| c.revision)
                .max()
                .unwrap_or(0);
            return Ok(Committed {
                revision,
                frontends,
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
