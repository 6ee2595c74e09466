//! The runtime path of a group: policy, the in-memory state, one batched round trip to HAProxy,
//! one fsync, the answers; and taking a group back out when the store refuses it.

use super::*;

impl Owner {
    pub(super) async fn apply_group(&mut self, group: Vec<(Change, ReplyTx)>) {
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
        self.queue_reloads(reloads);
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
    pub(super) async fn commit_runtime(&mut self, accepted: Vec<Accepted>) {
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
    pub(super) fn undo_group(&mut self, accepted: &[Accepted]) {
        for a in accepted.iter().rev() {
            self.state.undo(a.undo.clone());
        }
    }

    /// After a failed commit the store refuses further ones (what reached the disk is
    /// uncertain): open it again, and take what it holds as the desired state, so the agent
    /// goes on storing and never claims more, or less, than the disk has.
    pub(super) fn reopen_store(&mut self) {
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

    pub(super) fn closed_store_reason(&self) -> String {
        match &self.store_error {
            Some(e) => format!("the store is closed ({e})"),
            None => "the store is closed".to_string(),
        }
    }

    pub(super) fn store_commit(&mut self, changes: &[Change]) -> Result<(), String> {
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
    pub(super) async fn send(
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

    pub(super) fn set_up(&mut self, up: bool) {
        self.haproxy_up = up;
        self.metrics.haproxy_up.set(i64::from(up));
        if up {
            self.last_error = None;
        }
    }

    pub(super) fn transport_failed(&mut self, e: &RuntimeError) {
        if self.haproxy_up {
            tracing::warn!(error = %e, "HAProxy is unreachable; changes are stored and applied when it returns");
        }
        self.set_up(false);
        self.out_of_sync = true;
        self.last_error = Some(e.to_string());
    }
}
