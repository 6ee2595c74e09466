//! The agent's owner task: the one place that holds the desired state, the store and the
//! runtime connection. Requests arrive on a channel; simultaneous ones are group-committed (one
//! fsync, one batched runtime round trip for the lot); the changes of a group that add or remove
//! a frontend share one validate → reload → confirm → store, so a cluster booting 30 services
//! costs a couple of reloads, not 30; one HAProxy refuses is rolled back, alone when HAProxy's
//! message names its port. A timer compares HAProxy with the desired state and repairs drift.
//!
//! Order for a runtime change: policy → apply to the in-memory state → batch to HAProxy → store
//! (fsync) → answer; HAProxy goes before the disk so traffic moves without waiting for the
//! fsync, and a group the store refuses is taken back out of HAProxy. The managed config file
//! is rewritten in the background (see `ConfigWriter`), off the request path: it is derived
//! from the stored state, and validating it with `haproxy -c` takes tens of milliseconds.
//!
//! # Layout
//!
//! - `mod.rs`: the messages, the handle, the owner's state and its loop, policy checks.
//! - `commit.rs`: the runtime path of a group (HAProxy and the store, in the order the store
//!   asks).
//! - `batch.rs`: runtime batches to HAProxy, sent in parts, each waited for until HAProxy shows
//!   the addresses it set (2.9+ applies `set server addr` moments after answering).
//! - `refused.rs`: a group the store did not take: lost to another agent (applied again), or
//!   refused (undone, HAProxy put back, answered).
//! - `reload.rs`: the reload path, coalesced per group, and finding a failed reload's culprit;
//!   the start-time reload when the managed file's listeners differ from what is rendered.
//! - `ports.rs`: ports the agent does not own (HAProxy's own sections and sockets, the API's),
//!   refused before a new frontend's reload, and reported when an operator binds one later.
//! - `observe.rs`: the timer: drift repair, the rounds of draining servers, lease expiry.
//! - `leases.rs`: the lease clocks; `drain.rs`: deleted servers waiting for their last
//!   connection.
//! - `health.rs`: what `/healthz` says, published after every turn of the owner.
//! - `follow.rs`: with etcd, other agents' changes from the watch, retried when HAProxy did not
//!   take one, and the heartbeats the agents exchange.
//! - `view.rs`: the read model of `GET /v1/frontends`, answered without the owner.
//! - `writer.rs`: the background writer of the managed config file.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::haproxy::{wait_frontend_open, ConfigFiles, HaproxyError, ManagedHaproxy, Reloader};
use crate::metrics::Metrics;
use crate::model::{
    backend_name, frontend_name, server_ref, Change, Conflict, DesiredState, Effect, Transition,
    Undo,
};
use crate::policy::{Denied, Policy, Scope};
use crate::reconcile::{self, Plan};
use crate::render::{render_managed, RenderOptions};
use crate::runtime::parse::{ProxyKind, StatRow};
use crate::runtime::{Command, Error as RuntimeError, RuntimeClient, ServerAdminState};
use crate::store::{CommitError, RemoteFrontend, StateStore, Store, StoreEvent, StoreKind};

mod batch;
mod commit;
mod drain;
mod follow;
mod health;
mod leases;
mod observe;
mod ports;
mod refused;
mod reload;
mod view;
mod writer;

use drain::Draining;
pub use health::{Health, StoreHealth};
use leases::Leases;
pub use ports::PortOwners;
use writer::ConfigWriter;

/// How a change reached HAProxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Applied {
    Runtime,
    Reload,
    Unchanged,
    /// Stored, but HAProxy did not answer: applied when it returns.
    Pending,
}

/// A change that was acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyOk {
    pub applied: Applied,
    pub generation: u64,
    /// [`Applied::Pending`] because HAProxy refused a command of this change: the command and
    /// HAProxy's words. The change is stored; the timer retries it.
    pub refused: Option<String>,
    /// The entry before and after, for the audit trail.
    pub transition: Transition,
    /// [`Applied::Reload`]: what needed it (`a new frontend`, `proxy_protocol`, ...).
    pub reload_for: Option<&'static str>,
}

/// Why a change was not acknowledged. Nothing of it was recorded.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// HAProxy refused the new configuration or could not bind: its own words.
    #[error("HAProxy refused the change: {0}")]
    Rejected(String),
    /// A new frontend's port is bound outside the agent's file, or is the agent's own: who
    /// owns it, in words (`port 8080 is bound by frontend web in /etc/haproxy/haproxy.cfg
    /// line 23`).
    #[error("{0}")]
    PortOwned(String),
    /// A new or removed frontend needs a reload, and HAProxy does not answer.
    #[error("HAProxy is unreachable, and a new or removed frontend needs a reload: {0}")]
    Unavailable(String),
    #[error("storing the change failed: {0}")]
    Store(String),
    /// The shared store (etcd) cannot take changes now; HAProxy keeps serving what it has.
    #[error("the store is unavailable: {0}")]
    StoreUnavailable(String),
    #[error("the agent is shutting down")]
    ShuttingDown,
}

/// A server as `GET /v1/frontends` shows it: desired, and what HAProxy reports.
#[derive(Clone, Debug, Serialize)]
pub struct ServerView {
    pub node: String,
    pub node_ip: String,
    pub node_port: u16,
    pub state: crate::model::ServerState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u16>,
    pub haproxy: Option<ObservedView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ObservedView {
    pub status: String,
    pub check_status: Option<String>,
    pub addr: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FrontendView {
    pub frontend_port: u16,
    pub frontend: String,
    pub backend: String,
    pub mode: crate::model::Mode,
    pub settings: crate::model::settings::SettingsView,
    pub haproxy_status: Option<String>,
    pub servers: Vec<ServerView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StateView {
    pub generation: u64,
    pub haproxy: &'static str,
    /// Set by the handle, from what the owner last published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreHealth>,
    pub frontends: Vec<FrontendView>,
}

/// A change for the owner, and who asked. Reads do not go through the owner.
struct Msg {
    change: Change,
    reply: Requester,
}

/// The cheap, cloneable way to talk to the owner task.
#[derive(Clone)]
pub struct AgentHandle {
    tx: mpsc::Sender<Msg>,
    health: watch::Receiver<Health>,
    /// The desired state as of the last change the owner committed.
    desired: watch::Receiver<Arc<DesiredState>>,
    observer: Arc<view::Observer>,
    /// etcd's status straight from its tasks: while the owner waits on etcd (up to a commit's
    /// deadline), `/healthz` already says that etcd does not answer.
    etcd: Option<watch::Receiver<crate::store::EtcdStatus>>,
}

impl AgentHandle {
    /// Applies `change` for a key with `scope` (`None`: unscoped). The owner checks the scope
    /// against the frontend as it is when the change applies, then the global policy.
    pub async fn apply(
        &self,
        change: Change,
        scope: Option<Arc<Scope>>,
    ) -> Result<ApplyOk, ApplyError> {
        let (answer, rx) = oneshot::channel();
        let reply = Requester {
            answer,
            scope,
            origin: Origin::Client,
            conflicts: 0,
        };
        self.tx
            .send(Msg { change, reply })
            .await
            .map_err(|_| ApplyError::ShuttingDown)?;
        rx.await.map_err(|_| ApplyError::ShuttingDown)?
    }

    /// `GET /v1/frontends`: the desired state as of the last committed change, with HAProxy's
    /// view of it no older than one reconcile interval. Never waits for the owner. `None` once
    /// the owner has stopped. With a key's `scope`, only what that key may see.
    pub async fn view(&self, scope: Option<&Scope>) -> Option<StateView> {
        if self.tx.is_closed() {
            return None;
        }
        let desired = self.desired();
        let mut view = self.observer.view(&desired, scope).await;
        view.store = Some(self.health.borrow().store.clone());
        Some(view)
    }

    /// The desired state as of the last committed change.
    fn desired(&self) -> Arc<DesiredState> {
        self.desired.borrow().clone()
    }

    /// What the owner last published: answered at once, also while a reload runs (the owner
    /// publishes after every message and every reconcile). `None` once the owner has stopped.
    pub fn health(&self) -> Option<Health> {
        if self.tx.is_closed() {
            return None;
        }
        let mut health = self.health.borrow().clone();
        if let Some(down) = self
            .etcd
            .as_ref()
            .and_then(|e| e.borrow().unanswered.clone())
        {
            health.in_sync = false;
            health.store.error.get_or_insert_with(|| down.clone());
            health.error.get_or_insert(down);
        }
        Some(health)
    }
}

/// Everything the owner needs.
pub struct AgentParts {
    pub state: DesiredState,
    pub store: StateStore,
    /// The journal's directory, to reopen it after a failure (with etcd: unused).
    pub store_dir: std::path::PathBuf,
    pub client: RuntimeClient,
    pub files: ConfigFiles,
    pub reloader: Reloader,
    pub policy: Policy,
    pub render: RenderOptions,
    /// Managed mode: the HAProxy this agent supervises.
    pub managed: Option<ManagedHaproxy>,
    /// How often HAProxy is looked at: restarts and reloads (`show info`), leases, drains.
    pub reconcile_every: Duration,
    /// How often HAProxy's servers are compared in full with the desired state.
    pub drift_check_every: Duration,
    /// Deadline for a reload to show a new worker.
    pub reload_deadline: Duration,
    /// Where HAProxy's stderr goes (managed mode): a failed reload quotes it.
    pub haproxy_log: Option<std::path::PathBuf>,
    /// Managed mode: leave HAProxy running when the agent stops.
    pub keep_haproxy: bool,
    /// HAProxy shares this host's network and process namespaces: a new frontend's port is
    /// tried with a bind of the agent's own before reloading, and HAProxy's command line is read
    /// from /proc.
    pub host_checks: bool,
    /// How long a registration lives without a renewing PUT; zero: forever.
    pub lease: Duration,
    /// How long a deleted server may keep its connections before they are shut.
    pub drain_timeout: Duration,
    /// The `server-state-file` saved before each reload, when HAProxy loads one.
    pub server_state: Option<crate::haproxy::ServerStateFile>,
    /// Listeners outside HAProxy's main file that new frontends must not share.
    pub port_owners: PortOwners,
}

/// The agent's config file, behind one lock for the owner (reloads) and the background writer,
/// with the generation of the state it holds: a writer holding an older snapshot must not
/// overwrite a newer file.
pub struct ManagedFile {
    files: ConfigFiles,
    written: Option<u64>,
}

impl ManagedFile {
    /// Installs `text` for `generation` unless the file already holds that one or a newer one.
    /// Returns the previous content when it installed.
    async fn install(
        &mut self,
        text: &str,
        generation: u64,
    ) -> Result<Option<Option<String>>, crate::haproxy::HaproxyError> {
        if self.written.is_some_and(|w| w >= generation) {
            return Ok(None);
        }
        let previous = self.files.install(text).await?;
        self.written = Some(generation);
        Ok(Some(previous))
    }
}

/// Who asked for a change: where its answer goes, and the scope of the key that asked (`None`:
/// an unscoped key, or the agent's own change), checked by the owner's policy step.
struct Requester {
    answer: oneshot::Sender<Result<ApplyOk, ApplyError>>,
    scope: Option<Arc<Scope>>,
    origin: Origin,
    /// Commits of this change lost to another agent's (etcd): each time it is computed again
    /// on the new state, up to [`MAX_CONFLICTS`].
    conflicts: u8,
}

/// Where a change comes from, which decides whether the policy checks it and whether it is
/// stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// A request: checked by the policy, stored.
    Client,
    /// The agent's own (a lease's delete): stored, but the policy may no longer allow the port,
    /// and the delete must go through anyway.
    Own,
    /// Already in etcd (another agent's commit, or what a lost transaction found): applied to
    /// HAProxy only.
    Remote,
}

/// How many times a change is computed again after losing its commit to another agent's. Two
/// agents hammering one frontend each lose about half the time; 20 losses in a row is one in
/// a million.
const MAX_CONFLICTS: u8 = 20;

impl Requester {
    /// The agent's own change (a lease's delete): no key, no scope.
    fn own() -> (Requester, oneshot::Receiver<Result<ApplyOk, ApplyError>>) {
        Requester::from(Origin::Own)
    }

    /// A change from etcd.
    fn remote() -> (Requester, oneshot::Receiver<Result<ApplyOk, ApplyError>>) {
        Requester::from(Origin::Remote)
    }

    fn from(origin: Origin) -> (Requester, oneshot::Receiver<Result<ApplyOk, ApplyError>>) {
        let (answer, rx) = oneshot::channel();
        (
            Requester {
                answer,
                scope: None,
                origin,
                conflicts: 0,
            },
            rx,
        )
    }

    /// Answers; false when the asker is gone (nothing to do then).
    fn send(self, answer: Result<ApplyOk, ApplyError>) -> bool {
        self.answer.send(answer).is_ok()
    }
}

/// A change that passed policy and applied to the in-memory state, awaiting store and HAProxy.
struct Accepted {
    /// Its place in the group.
    seq: usize,
    change: Change,
    effect: Effect,
    undo: Undo,
    transition: Transition,
    reply: Requester,
    /// A live settings change's commands, made from the frontend as it was when the change
    /// applied: a server a later change of the group adds is not there yet (its `add server`
    /// carries the new settings).
    settings_commands: Vec<Command>,
}

/// A change of a group refused by policy or by the state (a conflict, a server that is not
/// there), its answer held until the group's fate is known: the state it was judged on holds
/// the group's earlier changes, which the store may still refuse.
struct Held {
    seq: usize,
    change: Change,
    reply: Requester,
    error: ApplyError,
}

/// Most requests group-committed together.
const MAX_GROUP: usize = 256;
/// With etcd: a group's commit is one transaction, of one compare, one write and one read per
/// frontend, and etcd refuses more than 128 of each by default.
const MAX_ETCD_GROUP: usize = 100;

struct Owner {
    state: DesiredState,
    store: Option<StateStore>,
    /// etcd: other agents' changes and renewals, from the watch.
    store_events: Option<mpsc::Receiver<StoreEvent>>,
    /// etcd: the answers of changes from etcd not yet looked at, by frontend port.
    remote_answers: Vec<(u16, oneshot::Receiver<Result<ApplyOk, ApplyError>>)>,
    /// etcd: a change from etcd HAProxy did not take, and when all of etcd is compared with
    /// the state again.
    remote_retry: Option<Retry>,
    /// etcd: why a commit could not reach it, and when; until a commit or a quorum read after
    /// it succeeds.
    store_unavailable: Option<(String, Instant)>,
    /// etcd: the newest revision applied (by the watch or this agent's own commits).
    etcd_revision: i64,
    /// etcd: when this agent's heartbeats were last published.
    renewals_at: Instant,

    store_dir: std::path::PathBuf,
    client: RuntimeClient,
    files: Arc<Mutex<ManagedFile>>,
    reloader: Reloader,
    policy: Policy,
    render: RenderOptions,
    managed: Option<ManagedHaproxy>,
    reload_deadline: Duration,
    haproxy_log: Option<std::path::PathBuf>,
    keep_haproxy: bool,
    metrics: Metrics,
    /// The desired state as last committed, for readers and the config writer.
    desired_tx: watch::Sender<Arc<DesiredState>>,
    /// Changes stored but not confirmed applied (HAProxy unreachable or a command failed).
    out_of_sync: bool,
    haproxy_up: bool,
    last_error: Option<String>,
    /// Why the store is closed (a reopen after a failure did not work); None when it is open.
    store_error: Option<String>,
    drift: Vec<String>,
    /// (pid, start time) of the HAProxy worker, to notice a restart.
    identity: Option<(u64, u64)>,
    /// Whether the HAProxy looked at last applies `set server addr` after answering (2.9+, or
    /// a version it does not say): batches then wait for their addresses (see `batch.rs`).
    addresses_apply_later: bool,
    /// Frontend ports HAProxy may run although the state does not have them: a reload whose
    /// rollback did not complete, or an agent that died between reload and store. The timer
    /// reloads them away.
    suspect_ports: BTreeSet<u16>,
    /// Changes waiting for a reload, one reload per set, the next one run between messages.
    reload_sets: std::collections::VecDeque<Vec<(Change, Requester)>>,
    /// Whether HAProxy shares this host's namespaces, so its ports can be tried with a bind and
    /// its command line read from /proc ([`AgentParts::host_checks`]).
    host_checks: bool,
    /// Where `/healthz` reads from: published after every turn, never waited for.
    health_tx: watch::Sender<Health>,
    /// The timer's reloads for frontends HAProxy lacks back off (doubling, capped), so a
    /// HAProxy that never loads the agent's file is not reloaded on every tick.
    repair_backoff: Duration,
    next_repair_reload: Option<Instant>,
    /// Why the timer's repair reloads do not bring the missing frontends back, when known;
    /// kept (unlike `last_error`) until no frontend is missing.
    repair_error: Option<String>,
    leases: Leases,
    /// Why lease expiry is suspended, while it is.
    leases_suspended: Option<String>,
    draining: Draining,
    drain_timeout: Duration,
    drift_check_every: Duration,
    /// When the next full comparison is due.
    next_full: Instant,
    server_state: Option<crate::haproxy::ServerStateFile>,
    port_owners: PortOwners,
    /// HAProxy's main file and the agent's, for [`Self::owned_ports`] (without the lock the
    /// writer holds).
    config_main: std::path::PathBuf,
    config_managed: std::path::PathBuf,
    /// [`Health::port_conflicts`], each with who else binds it (for the log).
    port_conflicts: Vec<(u16, String)>,
    /// Whether the log was told that host checks are on but HAProxy's process (or its
    /// environment) cannot be read: said once, not at every scan.
    unseen_haproxy_told: std::sync::atomic::AtomicBool,
    /// Set while HAProxy serves other listeners than the agent renders (a start-time reload
    /// failed): not in sync, and retried.
    listeners_retry: Option<Retry>,
}

/// Something that failed and is tried again with backoff (a reload to the listeners the agent
/// renders; a change from etcd HAProxy did not take): why, and when next.
struct Retry {
    error: String,
    next: Instant,
    backoff: Duration,
}

impl Retry {
    /// The next try after `previous` (doubling its pause up to [`REPAIR_MAX`]), or the first
    /// (after [`REPAIR_FIRST`]).
    fn after(previous: Option<&Retry>, error: String) -> Retry {
        let backoff = previous.map_or(REPAIR_FIRST, |r| (r.backoff * 2).min(REPAIR_MAX));
        Retry {
            error,
            next: Instant::now() + backoff,
            backoff,
        }
    }
}

/// First pause after a repair reload that did not work (frontends HAProxy lacks, or listeners
/// other than the agent renders); it doubles up to [`REPAIR_MAX`] while they stay wrong: a few
/// reloads a minute at most.
const REPAIR_FIRST: Duration = Duration::from_secs(2);
const REPAIR_MAX: Duration = Duration::from_secs(60);

/// Starts the owner task and the config writer; returns the handle and the tasks' join handle.
pub fn spawn(
    parts: AgentParts,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> (AgentHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(4096);
    let (desired_tx, desired) = watch::channel(Arc::new(parts.state.clone()));
    let observer = Arc::new(view::Observer::new(
        parts.client.sibling(),
        parts.reconcile_every,
    ));
    let (config_main, config_managed) = (parts.files.main.clone(), parts.files.managed.clone());
    let files = Arc::new(Mutex::new(ManagedFile {
        files: parts.files,
        written: None,
    }));
    metrics.servers.set(parts.state.server_count() as i64);
    let leases = Leases::new(parts.lease, &parts.state, Instant::now());
    let mut store = parts.store;
    let store_events = store.take_events();
    let etcd = store.etcd_status_watch();
    let (health_tx, health) = watch::channel(Health {
        haproxy: "down",
        in_sync: false,
        drift: Vec::new(),
        error: None,
        generation: parts.state.generation,
        draining: Vec::new(),
        leases_suspended: None,
        port_conflicts: Vec::new(),
        store: StoreHealth {
            kind: store.kind(),
            revision: None,
            error: None,
            agent: None,
            agents: Vec::new(),
            expiring: false,
        },
    });
    let etcd_revision = store.etcd_status().map_or(0, |s| s.revision);
    let mut owner = Owner {
        state: parts.state,
        store_dir: parts.store_dir,
        store: Some(store),
        store_events,
        remote_answers: Vec::new(),
        remote_retry: None,
        store_unavailable: None,
        etcd_revision,
        renewals_at: Instant::now(),

        client: parts.client,
        files: files.clone(),
        reloader: parts.reloader,
        policy: parts.policy,
        render: parts.render.clone(),
        managed: parts.managed,
        reload_deadline: parts.reload_deadline,
        haproxy_log: parts.haproxy_log,
        keep_haproxy: parts.keep_haproxy,
        metrics: metrics.clone(),
        desired_tx,
        out_of_sync: true,
        haproxy_up: false,
        last_error: None,
        store_error: None,
        drift: Vec::new(),
        identity: None,
        addresses_apply_later: true,
        suspect_ports: BTreeSet::new(),
        reload_sets: Default::default(),
        host_checks: parts.host_checks,
        health_tx,
        repair_backoff: Duration::ZERO,
        next_repair_reload: None,
        repair_error: None,
        leases,
        leases_suspended: None,
        draining: Draining::default(),
        drain_timeout: parts.drain_timeout,
        drift_check_every: parts.drift_check_every,
        next_full: Instant::now(),
        server_state: parts.server_state,
        port_owners: parts.port_owners,
        config_main,
        config_managed,
        port_conflicts: Vec::new(),
        unseen_haproxy_told: Default::default(),
        listeners_retry: None,
    };
    owner.publish();
    let handle = AgentHandle {
        tx,
        health,
        desired: desired.clone(),
        observer,
        etcd,
    };
    let writer = ConfigWriter {
        files,
        render: parts.render,
        cache: owner
            .store
            .as_ref()
            .and_then(StateStore::cache_path)
            .map(std::path::Path::to_path_buf),
    };
    let every = parts.reconcile_every;
    let task = tokio::spawn(async move {
        let writer_stop = shutdown.child_token();
        let writer_task = tokio::spawn(writer.run(desired, writer_stop.clone()));
        owner.run(rx, every, shutdown).await;
        writer_stop.cancel();
        let _ = writer_task.await;
    });
    (handle, task)
}

impl Owner {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg>,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        // A frontend in the file but not in the state: the agent died after a reload and before
        // storing it, so HAProxy may be serving a change nobody was told about.
        if let Ok(Some(text)) = self.files.lock().await.files.read_managed().await {
            for port in text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("frontend fe_"))
                .filter_map(|p| p.trim().parse::<u16>().ok())
                .filter(|p| !self.state.frontends.contains_key(p))
            {
                tracing::warn!(
                    port,
                    "the managed file has a frontend the state lacks; removing it"
                );
                self.suspect_ports.insert(port);
            }
        }
        self.reload_if_listeners_changed().await;
        // First look at HAProxy right away: after a restart of the agent, or of HAProxy.
        self.reconcile().await;
        self.publish();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        let mut events = self.store_events.take();
        loop {
            let mut ran_reload = false;
            tokio::select! {
                biased;
                event = recv_event(&mut events) => match event {
                    Some(event) => self.store_event(event).await,
                    None => events = None,
                },
                msg = rx.recv() => {
                    let Some(first) = msg else { break };
                    let mut group = Vec::new();
                    group.push((first.change, first.reply));
                    let max = match &self.store {
                        // etcd takes at most 128 operations per transaction (`--max-txn-ops`):
                        // a group touches at most one frontend per change.
                        Some(StateStore::Etcd(_)) => MAX_ETCD_GROUP,
                        _ => MAX_GROUP,
                    };
                    while group.len() < max {
                        match rx.try_recv() {
                            Ok(m) => group.push((m.change, m.reply)),
                            Err(_) => break,
                        }
                    }
                    self.apply_changes(group).await;
                }
                _ = tick.tick() => {
                    self.tick().await;
                    self.follow_store().await;
                }
                _ = shutdown.cancelled() => break,
                // Nothing else to do: the next reload set.
                _ = std::future::ready(()), if !self.reload_sets.is_empty() => {
                    self.next_reload_set().await;
                    ran_reload = true;
                }
            }
            // One reload set per turn, also while messages keep coming: a runtime change that
            // arrived during a reload waits for that one reload only, and a steady stream of
            // runtime changes cannot hold queued reloads back.
            if !ran_reload && !self.reload_sets.is_empty() {
                self.publish();
                self.next_reload_set().await;
            }
            self.publish();
            self.publish_renewals();
        }
        // Finish what is queued: every request that got in is answered.
        rx.close();
        let mut group = Vec::new();
        while let Ok(m) = rx.try_recv() {
            group.push((m.change, m.reply));
        }
        self.apply_changes(group).await;
        while !self.reload_sets.is_empty() {
            self.next_reload_set().await;
        }
        if let Some(StateStore::Etcd(store)) = self.store.take() {
            if let Err(e) = crate::store::etcd::write_cache(store.cache_path(), &self.state).await {
                tracing::warn!(error = %e, "could not keep a local copy of the state at shutdown");
            }
            // Leaves at once: the expiring role moves without waiting for the lease.
            store.close().await;
        }
        // Leave the managed file matching the state, so a HAProxy restart keeps everything.
        let text = render_managed(&self.state, &self.render);
        let generation = self.state.generation;
        if let Err(e) = self.files.lock().await.install(&text, generation).await {
            tracing::error!(error = %e, "could not write the managed configuration at shutdown");
        }
        if let Some(m) = self.managed.take() {
            if self.keep_haproxy {
                tracing::info!(pid = m.pid(), "leaving the managed HAProxy running");
                m.detach();
            } else {
                tracing::info!(pid = m.pid(), "stopping the managed HAProxy");
                if let Err(e) = m.stop().await {
                    tracing::warn!(error = %e, "stopping HAProxy");
                }
            }
        }
    }

    /// Publishes the desired state for readers and the config writer: after each commit.
    /// Cheap: the frontends are shared, not copied (see [`DesiredState::frontends`]).
    fn publish_desired(&mut self) {
        self.desired_tx.send_replace(Arc::new(self.state.clone()));
    }

    /// The policy step of a change: the key's scope, against the frontend as it is now, then
    /// the global policy.
    fn check_policy(&self, change: &Change, scope: Option<&Scope>) -> Result<(), Denied> {
        let frontend = self
            .state
            .frontends
            .get(&change.frontend_port())
            .map(|f| &**f);
        crate::policy::check_scope(scope, change, frontend)?;
        self.policy.check_frontend_port(change.frontend_port())?;
        let settings = match change {
            Change::PutFrontend { settings, .. } => Some(settings),
            Change::PutServer { frontend, .. } => frontend.as_ref(),
            _ => None,
        };
        if let Some(p) = settings.and_then(|s| s.check.port) {
            self.policy.check_check_port(p)?;
        }
        if let Change::PutServer {
            frontend_port,
            node,
            spec,
            ..
        } = change
        {
            let fe = self.state.frontends.get(frontend_port);
            let count = fe.map_or(0, |f| f.servers.len())
                + usize::from(!fe.is_some_and(|f| f.servers.contains_key(node)));
            self.policy
                .check_server(&spec.node_ip, spec.node_port, count)?;
        }
        Ok(())
    }

    /// Whether a change needs a reload: it creates or removes a frontend, or changes a setting
    /// only the config file can say.
    fn needs_reload(&self, change: &Change) -> bool {
        self.state.reload_needed_for(change).is_some()
    }
}

/// The next event of the store's watch; pending forever without one (the journal's case, or
/// after the watch's channel closed).
async fn recv_event(events: &mut Option<mpsc::Receiver<StoreEvent>>) -> Option<StoreEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
