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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::haproxy::{wait_frontend_open, ConfigFiles, HaproxyError, ManagedHaproxy, Reloader};
use crate::metrics::Metrics;
use crate::model::{
    backend_name, frontend_name, server_ref, Change, Conflict, DesiredState, Effect, Undo,
};
use crate::policy::{Denied, Policy};
use crate::reconcile::{self, Plan};
use crate::render::{render_managed, RenderOptions};
use crate::runtime::parse::{ProxyKind, StatRow};
use crate::runtime::{
    Command, Error as RuntimeError, OutcomeKind, RuntimeClient, ServerAdminState,
};
use crate::store::Store;

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
    /// A new or removed frontend needs a reload, and HAProxy does not answer.
    #[error("HAProxy is unreachable, and a new or removed frontend needs a reload: {0}")]
    Unavailable(String),
    #[error("storing the change failed: {0}")]
    Store(String),
    #[error("the agent is shutting down")]
    ShuttingDown,
}

/// What `/healthz` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Health {
    pub haproxy: &'static str,
    pub in_sync: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub generation: u64,
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
    pub haproxy_status: Option<String>,
    pub servers: Vec<ServerView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StateView {
    pub generation: u64,
    pub haproxy: &'static str,
    pub frontends: Vec<FrontendView>,
}

enum Msg {
    Apply {
        change: Change,
        reply: ReplyTx,
    },
    View {
        reply: oneshot::Sender<StateView>,
    },
    Health {
        reply: oneshot::Sender<Health>,
    },
    Snapshot {
        reply: oneshot::Sender<DesiredState>,
    },
}

/// The cheap, cloneable way to talk to the owner task.
#[derive(Clone)]
pub struct AgentHandle {
    tx: mpsc::Sender<Msg>,
}

impl AgentHandle {
    pub async fn apply(&self, change: Change) -> Result<ApplyOk, ApplyError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Apply { change, reply })
            .await
            .map_err(|_| ApplyError::ShuttingDown)?;
        rx.await.map_err(|_| ApplyError::ShuttingDown)?
    }

    pub async fn view(&self) -> Option<StateView> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::View { reply }).await.ok()?;
        rx.await.ok()
    }

    pub async fn health(&self) -> Option<Health> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Health { reply }).await.ok()?;
        rx.await.ok()
    }

    async fn snapshot(&self) -> Option<DesiredState> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Snapshot { reply }).await.ok()?;
        rx.await.ok()
    }
}

/// Everything the owner needs.
pub struct AgentParts {
    pub state: DesiredState,
    pub store: Store,
    pub client: RuntimeClient,
    pub files: ConfigFiles,
    pub reloader: Reloader,
    pub policy: Policy,
    pub render: RenderOptions,
    /// Managed mode: the HAProxy this agent supervises.
    pub managed: Option<ManagedHaproxy>,
    /// How often HAProxy is compared with the desired state.
    pub reconcile_every: Duration,
    /// Deadline for a reload to show a new worker.
    pub reload_deadline: Duration,
    /// Where HAProxy's stderr goes (managed mode): a failed reload quotes it.
    pub haproxy_log: Option<std::path::PathBuf>,
    /// Managed mode: leave HAProxy running when the agent stops.
    pub keep_haproxy: bool,
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

/// Where a change's answer goes.
type ReplyTx = oneshot::Sender<Result<ApplyOk, ApplyError>>;

/// A change that passed policy and applied to the in-memory state, awaiting store and HAProxy.
struct Accepted {
    change: Change,
    effect: Effect,
    undo: Undo,
    reply: ReplyTx,
}

/// Most requests group-committed together.
const MAX_GROUP: usize = 256;

struct Owner {
    state: DesiredState,
    store: Option<Store>,
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
    /// The generation the config writer should catch up with.
    dirty: watch::Sender<u64>,
    /// Changes stored but not confirmed applied (HAProxy unreachable or a command failed).
    out_of_sync: bool,
    haproxy_up: bool,
    last_error: Option<String>,
    /// Why the store is closed (a reopen after a failure did not work); None when it is open.
    store_error: Option<String>,
    drift: Vec<String>,
    /// (pid, start time) of the HAProxy worker, to notice a restart.
    identity: Option<(u64, u64)>,
    /// Frontend ports HAProxy may run although the state does not have them: a reload whose
    /// rollback did not complete, or an agent that died between reload and store. The timer
    /// reloads them away.
    suspect_ports: BTreeSet<u16>,
}

/// Starts the owner task and the config writer; returns the handle and the tasks' join handle.
pub fn spawn(
    parts: AgentParts,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> (AgentHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(4096);
    let (dirty, dirty_rx) = watch::channel(parts.state.generation);
    let files = Arc::new(Mutex::new(ManagedFile {
        files: parts.files,
        written: None,
    }));
    metrics.servers.set(parts.state.server_count() as i64);
    let owner = Owner {
        state: parts.state,
        store_dir: parts.store.dir().to_path_buf(),
        store: Some(parts.store),
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
        dirty,
        out_of_sync: true,
        haproxy_up: false,
        last_error: None,
        store_error: None,
        drift: Vec::new(),
        identity: None,
        suspect_ports: BTreeSet::new(),
    };
    let handle = AgentHandle { tx };
    let writer = ConfigWriter {
        handle: handle.clone(),
        files,
        render: parts.render,
    };
    let every = parts.reconcile_every;
    let task = tokio::spawn(async move {
        let writer_stop = shutdown.child_token();
        let writer_task = tokio::spawn(writer.run(dirty_rx, writer_stop.clone()));
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
        // First look at HAProxy right away: after a restart of the agent, or of HAProxy.
        self.reconcile().await;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            tokio::select! {
                biased;
                msg = rx.recv() => {
                    let Some(first) = msg else { break };
                    let mut group = Vec::new();
                    self.take(first, &mut group).await;
                    while group.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(m) => self.take(m, &mut group).await,
                            Err(_) => break,
                        }
                    }
                    self.apply_group(group).await;
                }
                _ = tick.tick() => self.reconcile().await,
                _ = shutdown.cancelled() => break,
            }
        }
        // Finish what is queued: every request that got in is answered.
        rx.close();
        let mut group = Vec::new();
        while let Ok(m) = rx.try_recv() {
            self.take(m, &mut group).await;
        }
        self.apply_group(group).await;
        drop(self.store.take());
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

    /// Answers reads at once; collects changes for the group.
    async fn take(&mut self, msg: Msg, group: &mut Vec<(Change, ReplyTx)>) {
        match msg {
            Msg::Apply { change, reply } => group.push((change, reply)),
            Msg::View { reply } => {
                let v = self.view().await;
                let _ = reply.send(v);
            }
            Msg::Health { reply } => {
                let _ = reply.send(self.health());
            }
            Msg::Snapshot { reply } => {
                let _ = reply.send(self.state.clone());
            }
        }
    }

    fn health(&self) -> Health {
        Health {
            haproxy: if self.haproxy_up { "up" } else { "down" },
            // A closed store refuses every change: not healthy, whatever HAProxy does.
            in_sync: self.haproxy_up && !self.out_of_sync && self.store_error.is_none(),
            drift: self.drift.clone(),
            error: self.store_error.clone().or_else(|| self.last_error.clone()),
            generation: self.state.generation,
        }
    }

    fn check_policy(&self, change: &Change) -> Result<(), Denied> {
        self.policy.check_frontend_port(change.frontend_port())?;
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

    /// Whether a change creates or removes a frontend.
    fn needs_reload(&self, change: &Change) -> bool {
        match change {
            Change::PutServer { frontend_port, .. } => {
                !self.state.frontends.contains_key(frontend_port)
            }
            Change::DeleteFrontend { .. } => true,
            Change::DeleteServer { .. } => false,
        }
    }

    async fn apply_group(&mut self, group: Vec<(Change, ReplyTx)>) {
        if group.is_empty() {
            return;
        }
        if self.store.is_none() {
            // It could not be reopened after a failure: try again, so a disk that recovered
            // (space freed, remounted) does not need a restart of the agent.
            self.reopen_store();
        }
        let mut accepted = Vec::new();
        let mut reloads = Vec::new();
        for (change, reply) in group {
            if let Err(d) = self.check_policy(&change) {
                let _ = reply.send(Err(d.into()));
                continue;
            }
            if self.needs_reload(&change) {
                reloads.push((change, reply));
                continue;
            }
            match self.state.apply_with_undo(&change) {
                Ok((effect, undo)) => accepted.push(Accepted {
                    change,
                    effect,
                    undo,
                    reply,
                }),
                Err(c) => {
                    let _ = reply.send(Err(c.into()));
                }
            }
        }
        self.commit_runtime(accepted).await;
        self.commit_reloads(reloads).await;
    }

    /// Sends the group's commands to HAProxy in one batch, then stores the group with one
    /// fsync, then answers. HAProxy goes first so traffic moves without waiting for the disk:
    /// the fsync is most of a change's time, and several times the round trip when the CPUs are
    /// busy. The answer still waits for both, so a 200 means applied and stored. If the store
    /// fails, the group is undone in memory, the store reopened, and HAProxy put back to what
    /// the store holds before the error is answered. (That is the state before the group,
    /// unless the record reached the journal although its fsync failed: then the change stays,
    /// unconfirmed, as it would after a crash. An agent killed between the two steps leaves the
    /// same kind of unanswered change, which its first reconcile settles.)
    async fn commit_runtime(&mut self, accepted: Vec<Accepted>) {
        if accepted.is_empty() {
            return;
        }
        if self.store.is_none() && accepted.iter().any(|a| a.effect != Effect::Unchanged) {
            // Still closed after the retry in `apply_group`: refuse before HAProxy sees it. (A
            // group that changes nothing, such as heartbeats, has nothing to store and goes on.)
            self.undo_group(&accepted);
            let why = self.closed_store_reason();
            for a in accepted {
                let _ = a.reply.send(Err(ApplyError::Store(why.clone())));
            }
            return;
        }
        // Commands from what HAProxy had (the previous spec, in the undo record) to the new
        // spec: no `show servers state` round trip on the request path. Drift that makes these
        // wrong is found and repaired by the timer.
        let mut commands = Vec::new();
        for a in &accepted {
            if a.effect == Effect::Unchanged {
                continue;
            }
            let Undo::Server { previous, .. } = &a.undo else {
                continue;
            };
            match &a.change {
                Change::PutServer {
                    frontend_port,
                    node,
                    spec,
                    ..
                } => {
                    let server = server_ref(*frontend_port, node);
                    commands.extend(reconcile::commands_for(&server, previous.as_ref(), spec));
                }
                Change::DeleteServer {
                    frontend_port,
                    node,
                } => {
                    // In place, not after the group: a DELETE then PUT of the same node in one
                    // group must run del before add.
                    let server = server_ref(*frontend_port, node);
                    commands.push(Command::SetServerState(
                        server.clone(),
                        ServerAdminState::Maint,
                    ));
                    commands.push(Command::DelServer(server));
                }
                Change::DeleteFrontend { .. } => {}
            }
        }
        let applied = self.send(commands, Vec::new()).await;
        let changed: Vec<Change> = accepted
            .iter()
            .filter(|a| a.effect != Effect::Unchanged)
            .map(|a| a.change.clone())
            .collect();
        if let Err(e) = self.store_commit(&changed) {
            self.undo_group(&accepted);
            self.reopen_store();
            // Before answering, so a refused client never finds its change still serving.
            tracing::warn!(error = %e, "not stored: putting HAProxy back to the stored state");
            self.out_of_sync = true;
            self.reconcile().await;
            for a in accepted {
                let _ = a.reply.send(Err(ApplyError::Store(e.clone())));
            }
            return;
        }
        self.metrics.servers.set(self.state.server_count() as i64);
        self.dirty.send_replace(self.state.generation);
        let generation = self.state.generation;
        for a in accepted {
            let applied = if a.effect == Effect::Unchanged {
                Applied::Unchanged
            } else {
                applied
            };
            let _ = a.reply.send(Ok(ApplyOk {
                applied,
                generation,
            }));
        }
    }

    /// Takes a group back out of the in-memory state, last change first.
    fn undo_group(&mut self, accepted: &[Accepted]) {
        for a in accepted.iter().rev() {
            self.state.undo(a.undo.clone());
        }
    }

    /// After a failed commit the store refuses further ones (what reached the disk is
    /// uncertain): open it again, and take what it holds as the desired state, so the agent
    /// goes on storing and never claims more, or less, than the disk has.
    fn reopen_store(&mut self) {
        // The old one goes first: it holds the directory's lock.
        drop(self.store.take());
        let dir = self.store_dir.clone();
        match tokio::task::block_in_place(|| Store::open(&dir)) {
            Ok((store, state)) => {
                if state != self.state {
                    tracing::warn!(
                        generation = state.generation,
                        "the store holds a different state than memory after a failed commit; using the store's"
                    );
                    self.state = state;
                    self.out_of_sync = true;
                    self.dirty.send_replace(self.state.generation);
                }
                self.store = Some(store);
                self.store_error = None;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reopen the store; changes are refused until it can be (tried again on each change)");
                self.store_error = Some(format!("store: {e}"));
            }
        }
    }

    fn closed_store_reason(&self) -> String {
        match &self.store_error {
            Some(e) => format!("the store is closed ({e})"),
            None => "the store is closed".to_string(),
        }
    }

    fn store_commit(&mut self, changes: &[Change]) -> Result<(), String> {
        if changes.is_empty() {
            return Ok(());
        }
        let Some(store) = self.store.as_mut() else {
            return Err("the store is closed".into());
        };
        // fsync blocks: tell the runtime so other tasks (the HTTP server) keep running.
        let state = &self.state;
        tokio::task::block_in_place(|| store.commit(state, changes)).map_err(|e| e.to_string())
    }

    /// Sends commands (then deletions of servers with no connections left). Returns Runtime
    /// when HAProxy took them all, Pending when it could not be reached; a refused command
    /// marks the state out of sync for the timer to repair.
    async fn send(
        &mut self,
        commands: Vec<Command>,
        deletions: Vec<crate::runtime::ServerRef>,
    ) -> Applied {
        if commands.is_empty() && deletions.is_empty() {
            return Applied::Runtime;
        }
        let mut all = commands;
        all.extend(deletions.iter().cloned().map(Command::DelServer));
        match self.client.batch(&all).await {
            Ok(replies) => {
                self.set_up(true);
                let mut ok = true;
                for r in &replies {
                    if r.outcome.is_success() {
                        continue;
                    }
                    // A server that still has connections is deleted later by the timer.
                    if r.command.starts_with("del server") && r.outcome.kind == OutcomeKind::Refused
                    {
                        tracing::info!(command = %r.command, "server still in use; deleting it once idle");
                    } else {
                        tracing::warn!(command = %r.command, outcome = %r.outcome.kind, text = %r.outcome.text.trim_end(), "HAProxy refused a command");
                    }
                    ok = false;
                }
                if !ok {
                    self.out_of_sync = true;
                }
                Applied::Runtime
            }
            Err(e) => {
                self.transport_failed(&e);
                Applied::Pending
            }
        }
    }

    fn set_up(&mut self, up: bool) {
        self.haproxy_up = up;
        self.metrics.haproxy_up.set(i64::from(up));
        if up {
            self.last_error = None;
        }
    }

    fn transport_failed(&mut self, e: &RuntimeError) {
        if self.haproxy_up {
            tracing::warn!(error = %e, "HAProxy is unreachable; changes are stored and applied when it returns");
        }
        self.set_up(false);
        self.out_of_sync = true;
        self.last_error = Some(e.to_string());
    }

    /// The group's changes that add or remove a frontend, all in one reload: applied together,
    /// rendered, validated, reloaded, confirmed (every new frontend open), then stored with one
    /// fsync. Any failure puts back the previous file and leaves HAProxy serving as before.
    ///
    /// A reload that fails is retried without the changes it names: HAProxy's bind error gives
    /// the address (`[127.0.0.1:8443]`) and its log the frontend (`fe_8443`), so a taken port
    /// fails only its own requests (409 with HAProxy's words) and the rest go through in one
    /// more reload. A failure that names none of them is tried again one change at a time.
    async fn commit_reloads(&mut self, group: Vec<(Change, ReplyTx)>) {
        if group.is_empty() {
            return;
        }
        // Fail at once when HAProxy is gone, rather than after the reload's deadline.
        self.client.disconnect();
        if let Err(e) = self.client.show_info().await {
            self.transport_failed(&e);
            for (_, reply) in group {
                let _ = reply.send(Err(ApplyError::Unavailable(e.to_string())));
            }
            return;
        }
        self.set_up(true);
        if self.store.is_none() {
            // Refused before HAProxy sees it, as on the runtime path.
            let why = self.closed_store_reason();
            for (_, reply) in group {
                let _ = reply.send(Err(ApplyError::Store(why.clone())));
            }
            return;
        }
        // A new frontend on a port something already listens on would fail the whole reload
        // (after HAProxy's own bind retries, about 2 s), or, with SO_REUSEPORT on both sides,
        // share the port with it: refuse those first, without a reload.
        let mut checked = BTreeSet::new();
        let mut in_use: std::collections::BTreeMap<u16, String> = Default::default();
        let mut free = Vec::new();
        for (change, reply) in group {
            let port = change.frontend_port();
            let creates = matches!(change, Change::PutServer { .. })
                && !self.state.frontends.contains_key(&port);
            if creates && checked.insert(port) {
                if let Some(why) = port_in_use(self.render.frontend_bind, port) {
                    tracing::info!(port, reason = %why, "refusing a new frontend on a port in use");
                    in_use.insert(port, why);
                }
            }
            match in_use.get(&port) {
                Some(why) if creates => {
                    let _ = reply.send(Err(ApplyError::Rejected(why.clone())));
                }
                _ => free.push((change, reply)),
            }
        }
        // Each pass either answers at least one change or splits a set into single changes,
        // so this ends after at most twice as many reloads as there are changes.
        let mut sets: std::collections::VecDeque<Vec<(Change, ReplyTx)>> = [free].into();
        while let Some(set) = sets.pop_front() {
            let mut applied: Vec<(Change, Undo, ReplyTx)> = Vec::new();
            for (change, reply) in set {
                // Again: changes applied earlier (in this group, or this set) may have used up
                // the cap, or conflict with this one.
                if let Err(d) = self.check_policy(&change) {
                    let _ = reply.send(Err(d.into()));
                    continue;
                }
                match self.state.apply_with_undo(&change) {
                    Ok((_, undo)) => applied.push((change, undo, reply)),
                    Err(c) => {
                        let _ = reply.send(Err(c.into()));
                    }
                }
            }
            if applied.is_empty() {
                continue;
            }
            let ports: BTreeSet<u16> = applied.iter().map(|(c, _, _)| c.frontend_port()).collect();
            let result = self.reload_to_current(&ports).await;
            if let Err(msg) = result {
                for (_, undo, _) in applied.iter().rev() {
                    self.state.undo(undo.clone());
                }
                self.metrics.reload_failures.inc();
                let named = ports_named_in(&msg, &ports);
                let mut rest = Vec::new();
                for (change, _, reply) in applied {
                    let blamed = named.contains(&change.frontend_port());
                    if blamed || ports.len() == 1 {
                        let _ = reply.send(Err(ApplyError::Rejected(msg.clone())));
                    } else {
                        rest.push((change, reply));
                    }
                }
                if rest.is_empty() {
                    continue;
                }
                if named.is_empty() {
                    // Nothing says which: one reload per frontend from here on.
                    let mut by_port: std::collections::BTreeMap<u16, Vec<(Change, ReplyTx)>> =
                        std::collections::BTreeMap::new();
                    for (change, reply) in rest {
                        by_port
                            .entry(change.frontend_port())
                            .or_default()
                            .push((change, reply));
                    }
                    sets.extend(by_port.into_values());
                } else {
                    sets.push_front(rest);
                }
                continue;
            }
            let changes: Vec<Change> = applied.iter().map(|(c, _, _)| c.clone()).collect();
            if let Err(e) = self.store_commit(&changes) {
                // HAProxy now runs frontends the store does not have: take them back out. The
                // file must be written again although its generation is not newer than the
                // one just installed (the undo took the generation back).
                for (_, undo, _) in applied.iter().rev() {
                    self.state.undo(undo.clone());
                }
                self.reopen_store();
                self.files.lock().await.written = None;
                if let Err(msg) = self.reload_to_current(&ports).await {
                    tracing::error!(error = %msg, "could not take back frontends after the store failed; the timer will");
                    self.suspect_ports.extend(ports.iter().copied());
                }
                for (_, _, reply) in applied {
                    let _ = reply.send(Err(ApplyError::Store(e.clone())));
                }
                continue;
            }
            self.metrics.servers.set(self.state.server_count() as i64);
            self.dirty.send_replace(self.state.generation);
            // New workers start from the file: put runtime-only details (drain) back.
            self.reconcile().await;
            let generation = self.state.generation;
            for (_, _, reply) in applied {
                let _ = reply.send(Ok(ApplyOk {
                    applied: Applied::Reload,
                    generation,
                }));
            }
        }
    }

    /// Reloads HAProxy (counted), then drops our CLI connection: it belongs to the old worker.
    async fn reload_haproxy(&mut self) -> Result<(), HaproxyError> {
        self.metrics.reloads.inc();
        let reloaded = self
            .reloader
            .reload_with_log(self.reload_deadline, self.haproxy_log.as_deref())
            .await;
        self.client.disconnect();
        reloaded.map(|_| ())
    }

    /// Makes HAProxy's configuration match `self.state` through a reload, confirmed by every
    /// frontend of `ports` that the state has opening (not those the reload takes out); on any
    /// failure the previous file is put back and, if HAProxy already took the new one, reloaded
    /// again, so HAProxy keeps serving as before.
    async fn reload_to_current(&mut self, ports: &BTreeSet<u16>) -> Result<(), String> {
        let text = render_managed(&self.state, &self.render);
        let files = self.files.clone();
        let mut files = files.lock().await;
        let written_before = files.written;
        let previous = match files
            .install(&text, self.state.generation)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(previous) => previous,
            // Already there (not expected: this generation is new); what to go back to is
            // whatever the file holds.
            None => files.files.read_managed().await.ok().flatten(),
        };
        let failure = match self.reload_haproxy().await {
            // HAProxy said it did not load the new config: the old worker serves the old one,
            // and putting the file back is all that is needed. Any other failure (a timeout)
            // may still have reloaded: reload back too.
            Err(e) => {
                let took_it = !matches!(e, HaproxyError::ReloadFailed { .. });
                Some((e.to_string(), took_it))
            }
            // Confirmed by the frontends opening, those the state has (not those this reload
            // takes back out).
            Ok(_) => {
                let mut failed = None;
                for port in ports
                    .iter()
                    .filter(|p| self.state.frontends.contains_key(p))
                {
                    if let Err(e) = wait_frontend_open(
                        &mut self.client,
                        frontend_name(*port).as_str(),
                        self.reload_deadline,
                    )
                    .await
                    {
                        failed = Some((e.to_string(), true));
                        break;
                    }
                }
                failed
            }
        };
        let Some((msg, took_new_config)) = failure else {
            return Ok(());
        };
        tracing::warn!(error = %msg, "reload failed; restoring the previous configuration");
        // The file goes back to what it held; the writer may write newer states again.
        files.written = written_before;
        if let Err(e) = files.files.restore(previous).await {
            tracing::error!(error = %e, "could not restore the previous managed configuration");
        } else if took_new_config {
            if let Err(e) = self.reload_haproxy().await {
                tracing::error!(error = %e, "could not reload the previous configuration back");
                self.suspect_ports.extend(ports.iter().copied());
            }
        }
        Err(msg)
    }

    /// Compares HAProxy with the desired state and repairs what differs.
    async fn reconcile(&mut self) {
        if let Some(m) = self.managed.as_mut() {
            if let Some(status) = m.try_exited() {
                tracing::warn!(%status, "the managed HAProxy exited; restarting it");
                if let Err(e) = m.restart().await {
                    self.last_error = Some(e.to_string());
                    self.set_up(false);
                    return;
                }
            }
        }
        let started = Instant::now();
        // A fresh connection each time: after a reload by someone else (systemctl reload), the
        // old one would still talk to the old worker.
        self.client.disconnect();
        let info = match self.client.show_info().await {
            Ok(i) => i,
            Err(e) => {
                self.transport_failed(&e);
                return;
            }
        };
        self.set_up(true);
        let identity = (info.pid().unwrap_or(0), info.start_time().unwrap_or(0));
        if self.identity.is_some_and(|id| id != identity) {
            tracing::info!(
                pid = identity.0,
                "HAProxy restarted or reloaded; re-applying runtime state"
            );
        }
        self.identity = Some(identity);
        let observed = match self.client.show_servers_state(None).await {
            Ok(o) => o,
            Err(e) => {
                self.transport_failed(&e);
                return;
            }
        };
        let backends: BTreeSet<String> = match self.client.show_backends().await {
            Ok(b) => b.into_iter().collect(),
            Err(e) => {
                self.transport_failed(&e);
                return;
            }
        };
        self.suspect_ports
            .retain(|p| backends.contains(backend_name(*p).as_str()));
        let stale: Vec<u16> = self
            .suspect_ports
            .iter()
            .copied()
            .filter(|p| !self.state.frontends.contains_key(p))
            .collect();
        let mut plan: Plan = reconcile::plan(&self.state, &observed, &backends, None);
        for p in stale {
            plan.drift
                .push(format!("fe_{p} runs in HAProxy but is not wanted"));
            // Reuses the missing-backend path below: rewrite the file and reload.
            plan.missing_backends.push(p);
        }
        if plan.is_empty() {
            self.out_of_sync = false;
            self.drift.clear();
            return;
        }
        for line in &plan.drift {
            tracing::info!(drift = %line, "repairing");
        }
        self.drift = plan.drift.clone();
        if !plan.missing_backends.is_empty() {
            // The running config lacks frontends the state has (HAProxy restarted from an old
            // file, or an operator reloaded without ours): rewrite and reload.
            let text = render_managed(&self.state, &self.render);
            let files = self.files.clone();
            let mut files = files.lock().await;
            // Forced: the file may be current while HAProxy runs an older one.
            files.written = None;
            match files.install(&text, self.state.generation).await {
                Ok(_) => {
                    if let Err(e) = self.reload_haproxy().await {
                        self.metrics.reload_failures.inc();
                        self.last_error = Some(e.to_string());
                    }
                }
                Err(e) => self.last_error = Some(e.to_string()),
            }
            self.out_of_sync = true;
            return;
        }
        let before = self.out_of_sync;
        self.out_of_sync = false;
        let applied = self.send(plan.commands, plan.deletions).await;
        if applied == Applied::Runtime {
            self.metrics.drift_repairs.inc();
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                was_known = before,
                "drift repaired"
            );
        }
        // Check again next tick before calling it in sync.
        self.out_of_sync = true;
    }

    async fn view(&mut self) -> StateView {
        let rows: Vec<StatRow> = match self.client.show_stat().await {
            Ok(r) => {
                self.set_up(true);
                r
            }
            Err(e) => {
                self.transport_failed(&e);
                Vec::new()
            }
        };
        let find =
            |proxy: &str, name: &str| rows.iter().find(|r| r.proxy == proxy && r.name == name);
        let frontends = self
            .state
            .frontends
            .iter()
            .map(|(port, fe)| {
                let fe_name = frontend_name(*port).to_string();
                let be_name = backend_name(*port).to_string();
                FrontendView {
                    frontend_port: *port,
                    haproxy_status: rows
                        .iter()
                        .find(|r| r.proxy == fe_name && r.kind == ProxyKind::Frontend)
                        .and_then(|r| r.status.as_ref().map(|s| s.summary().to_string())),
                    frontend: fe_name,
                    mode: fe.mode,
                    servers: fe
                        .servers
                        .iter()
                        .map(|(node, spec)| ServerView {
                            node: node.to_string(),
                            node_ip: spec.node_ip.to_string(),
                            node_port: spec.node_port,
                            state: spec.state,
                            service: spec.service.clone(),
                            weight: spec.weight,
                            haproxy: find(&be_name, node.as_str()).map(|r| ObservedView {
                                status: r
                                    .status
                                    .as_ref()
                                    .map(|s| s.summary().to_string())
                                    .unwrap_or_default(),
                                check_status: r.check_status.clone(),
                                addr: r.addr.clone(),
                            }),
                        })
                        .collect(),
                    backend: be_name,
                }
            })
            .collect();
        StateView {
            generation: self.state.generation,
            haproxy: if self.haproxy_up { "up" } else { "down" },
            frontends,
        }
    }
}

/// Rewrites the managed config file in the background whenever the state changed, coalescing
/// bursts: at most one rewrite in flight, always of the newest state. Each rewrite fsyncs the
/// file and runs `haproxy -c`, which parses the whole configuration (~10 ms of CPU, more on a
/// big one): run during a change, it takes the CPU and the disk that change needs. So the writer
/// waits until changes pause for [`WRITE_QUIET`], or until the oldest unwritten change is
/// [`WRITE_MAX_DELAY`] old when they never pause. Nothing waits on the file: the journal is the
/// source of truth, and HAProxy already runs every change.
const WRITE_QUIET: Duration = Duration::from_millis(200);
const WRITE_MAX_DELAY: Duration = Duration::from_secs(2);

struct ConfigWriter {
    handle: AgentHandle,
    files: Arc<Mutex<ManagedFile>>,
    render: RenderOptions,
}

impl ConfigWriter {
    async fn run(self, mut dirty: watch::Receiver<u64>, stop: CancellationToken) {
        let mut written = None;
        loop {
            if written != Some(*dirty.borrow_and_update()) {
                // Changes are coming: let them pause first (see WRITE_QUIET).
                let latest = Instant::now() + WRITE_MAX_DELAY;
                loop {
                    let quiet = (Instant::now() + WRITE_QUIET).min(latest);
                    tokio::select! {
                        changed = dirty.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep_until(quiet.into()) => break,
                        _ = stop.cancelled() => return,
                    }
                }
                let Some(state) = self.handle.snapshot().await else {
                    return;
                };
                let text = render_managed(&state, &self.render);
                let mut files = self.files.lock().await;
                match files.install(&text, state.generation).await {
                    Ok(_) => written = Some(state.generation),
                    Err(e) => {
                        tracing::error!(error = %e, "could not write the managed configuration; retrying");
                        drop(files);
                        tokio::select! {
                            _ = tokio::time::sleep(WRITE_MAX_DELAY) => {}
                            _ = stop.cancelled() => return,
                        }
                        continue;
                    }
                }
                drop(files);
                continue;
            }
            tokio::select! {
                changed = dirty.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Why a new frontend cannot have `port` on `bind`: something on this host listens there
/// already. Checked by binding it (without SO_REUSEPORT, so a listener that has it, such as
/// one of HAProxy's own frontends, counts too); only "address in use" counts: an agent that
/// may not bind a low port leaves that to HAProxy, which may.
fn port_in_use(bind: std::net::IpAddr, port: u16) -> Option<String> {
    match std::net::TcpListener::bind((bind, port)) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Some(format!(
            "cannot bind {}: address already in use; another program, or a frontend of \
             HAProxy's own configuration, listens on port {port} on this host ({e})",
            std::net::SocketAddr::from((bind, port))
        )),
        _ => None,
    }
}

/// The frontend ports among `ports` that a reload failure names: HAProxy's bind errors give the
/// address (`... for [127.0.0.1:8443]`, `[:::8443]`) and its messages the frontend
/// (`for frontend fe_8443`).
fn ports_named_in(message: &str, ports: &BTreeSet<u16>) -> BTreeSet<u16> {
    // A run of digits at the start of `s`: its value and length.
    let digits = |s: &str| -> Option<(u16, usize)> {
        let len = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        Some((s[..len].parse().ok()?, len))
    };
    let mut named = BTreeSet::new();
    for (i, _) in message.match_indices(':') {
        let after = &message[i + 1..];
        if let Some((port, len)) = digits(after) {
            if after[len..].starts_with(']') {
                named.insert(port);
            }
        }
    }
    for (i, _) in message.match_indices("fe_") {
        let starts_word = i == 0 || !message.as_bytes()[i - 1].is_ascii_alphanumeric();
        if let Some((port, _)) = digits(&message[i + 3..]).filter(|_| starts_word) {
            named.insert(port);
        }
    }
    named.retain(|p| ports.contains(p));
    named
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_failure_names_its_ports() {
        let ports: BTreeSet<u16> = [8080, 8443, 9000].into();
        let bind = "[ALERT]    (24824) : Binding [managed.cfg:11] for frontend fe_8443: protocol \
                    tcpv4: cannot bind socket (Address already in use) for [127.0.0.1:8443].";
        assert_eq!(ports_named_in(bind, &ports), [8443].into());
        let v6 = "cannot bind socket (Address already in use) for [:::9000].";
        assert_eq!(ports_named_in(v6, &ports), [9000].into());
        // Ports not in the set, and look-alikes, are not blamed.
        let other = "for [127.0.0.1:7000] in frontend afe_8080, pid 8080";
        assert_eq!(ports_named_in(other, &ports), BTreeSet::new());
        assert_eq!(
            ports_named_in("[ALERT] some other failure", &ports),
            BTreeSet::new()
        );
    }
}
