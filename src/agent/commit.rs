//! The runtime path of a group: policy, the in-memory state, one batched round trip to HAProxy,
//! one fsync, the answers. (A group the store does not take: `refused.rs`.)

use super::refused::{in_place, judged_behind, Lost, Outcome};
use super::*;

/// The ports whose changes wait for a reload: those of a queued reload set, and those of this
/// group's changes that add or remove a frontend. A later change of such a port joins the
/// reload set behind them instead of going to HAProxy at once: `DELETE /v1/frontends/P` then a
/// `PUT` of a server on P must leave P with that server, not apply the PUT first (200) and let
/// the queued delete remove it. The reload set applies its changes in order.
pub(super) struct ReloadPorts(BTreeSet<u16>);

impl ReloadPorts {
    pub(super) fn of_queue(queue: &std::collections::VecDeque<Vec<(Change, Requester)>>) -> Self {
        ReloadPorts(
            queue
                .iter()
                .flatten()
                .map(|(c, _)| c.frontend_port())
                .collect(),
        )
    }

    /// The ports, for a whole re-read from etcd: a frontend only a queued set would create is
    /// one the re-read may have to remove.
    pub(super) fn ports(&self) -> &BTreeSet<u16> {
        &self.0
    }

    /// Whether the next change of the group, on `port`, goes to the reload set; `needs_reload`:
    /// it adds or removes a frontend itself.
    pub(super) fn takes(&mut self, port: u16, needs_reload: bool) -> bool {
        if needs_reload {
            self.0.insert(port);
        }
        self.0.contains(&port)
    }
}

impl Owner {
    /// Applies a group of changes of one origin (requests, the agent's own, or etcd's). A
    /// group whose commit lost to another agent's is applied again on top of what that agent
    /// stored, which HAProxy gets first; each change gives up after [`MAX_CONFLICTS`] losses,
    /// so this ends. (A refusal held behind a change that lost is judged again without a loss
    /// of its own: k copies of one request may take up to k × `MAX_CONFLICTS` passes under
    /// constant contention, each bounded.)
    pub(super) async fn apply_changes(&mut self, group: Vec<(Change, Requester)>) {
        let mut group = group;
        while let Some(lost) = self.apply_once(group).await {
            let current = self.remote_group(lost.current);
            // Changes from etcd are not stored, so they cannot lose: this returns `None`.
            let _ = Box::pin(self.apply_once(current)).await;
            group = lost.again;
        }
    }

    /// One pass of [`Self::apply_changes`]: `Some` when the commit lost to another agent's.
    async fn apply_once(&mut self, group: Vec<(Change, Requester)>) -> Option<Lost> {
        if group.is_empty() {
            return None;
        }
        if self.store.is_none() {
            // It could not be reopened after a failure: try again, so a disk that recovered
            // (space freed, remounted) does not need a restart of the agent.
            self.reopen_store();
        }
        let mut accepted = Vec::new();
        let mut held = Vec::new();
        let mut reloads = Vec::new();
        let mut reload_ports = ReloadPorts::of_queue(&self.reload_sets);
        for (seq, (change, reply)) in group.into_iter().enumerate() {
            let allowed = if reply.origin == Origin::Client {
                self.check_policy(&change, reply.scope.as_deref())
            } else {
                Ok(())
            };
            if let Err(d) = allowed {
                held.push(Held {
                    seq,
                    change,
                    reply,
                    error: d.into(),
                });
                continue;
            }
            // Every PUT that passes policy is a heartbeat, also one that changes nothing.
            if let (
                Change::PutServer {
                    frontend_port,
                    node,
                    ..
                },
                Origin::Client,
            ) = (&change, reply.origin)
            {
                self.renewed(*frontend_port, node);
            }
            if reload_ports.takes(change.frontend_port(), self.needs_reload(&change)) {
                reloads.push((change, reply));
                continue;
            }
            match self.state.apply_with_transition(&change) {
                Ok((effect, undo, transition)) => {
                    let settings_commands = match (&undo, effect) {
                        (
                            Undo::Settings {
                                port,
                                previous: Some(old),
                                ..
                            },
                            Effect::Runtime,
                        ) => self
                            .state
                            .frontends
                            .get(port)
                            .map(|fe| reconcile::settings_commands(*port, fe, old))
                            .unwrap_or_default(),
                        _ => Vec::new(),
                    };
                    accepted.push(Accepted {
                        seq,
                        change,
                        effect,
                        undo,
                        transition,
                        reply,
                        settings_commands,
                    })
                }
                Err(c) => held.push(Held {
                    seq,
                    change,
                    reply,
                    error: c.into(),
                }),
            }
        }
        // A refusal judged on the group's earlier change of its frontend (a resent DELETE
        // behind its first copy: "no such server"; a cap that change filled) stands only if
        // that change does; the others are answered now.
        let earlier: Vec<(usize, u16)> = accepted
            .iter()
            .filter(|a| a.effect != Effect::Unchanged)
            .map(|a| (a.seq, a.change.frontend_port()))
            .collect();
        let (behind, alone) = judged_behind(held, &earlier);
        for h in alone {
            let _ = h.reply.send(Err(h.error));
        }
        let outcome = self.commit_runtime(accepted).await;
        self.queue_reloads(reloads);
        match outcome {
            Outcome::Done => {
                for h in behind {
                    let _ = h.reply.send(Err(h.error));
                }
                None
            }
            Outcome::Refused(e) => {
                for h in behind {
                    let _ = h.reply.send(Err(e.clone()));
                }
                None
            }
            // Judged again on top of what won, in their places.
            Outcome::Lost { current, again } => Some(Lost {
                current,
                again: in_place(again, behind),
            }),
        }
    }

    /// Changes that make the state what etcd holds (`current`), from the etcd's side of a lost
    /// commit or from the watch; their answers are looked at later ([`Self::remote_outcomes`]).
    pub(super) fn remote_group(
        &mut self,
        current: Vec<RemoteFrontend>,
    ) -> Vec<(Change, Requester)> {
        current
            .into_iter()
            .map(|r| {
                let (reply, answer) = Requester::remote();
                self.remote_answers.push((r.port, answer));
                (
                    Change::ReplaceFrontend {
                        frontend_port: r.port,
                        spec: r.spec.map(Arc::new),
                        revision: r.revision,
                    },
                    reply,
                )
            })
            .collect()
    }

    /// Sends the group's commands to HAProxy in one batch and stores the group, then answers.
    ///
    /// With the journal HAProxy goes first, so traffic moves without waiting for the disk: the
    /// fsync is most of a change's time, and several times the round trip when the CPUs are
    /// busy. The answer still waits for both, so a 200 means applied and stored. If the store
    /// fails, the group is undone in memory, the store reopened, and HAProxy put back to what
    /// the store holds before the error is answered. (That is the state before the group,
    /// unless the record reached the journal although its fsync failed: then the change stays,
    /// unconfirmed, as it would after a crash. An agent killed between the two steps leaves the
    /// same kind of unanswered change, which its first reconcile settles.)
    ///
    /// With etcd the commit goes first: it may lose to another agent's, and HAProxy must not
    /// run a change that lost. A lost group is undone in memory and returned, to be applied
    /// again on top of what won ([`Self::apply_changes`]).
    pub(super) async fn commit_runtime(&mut self, accepted: Vec<Accepted>) -> Outcome {
        if accepted.is_empty() {
            return Outcome::Done;
        }
        let stored = accepted
            .iter()
            .any(|a| a.effect != Effect::Unchanged && a.reply.origin != Origin::Remote);
        if self.store.is_none() && stored {
            // Still closed after the retry in `apply_once`: refuse before HAProxy sees it. (A
            // group that changes nothing, such as heartbeats, has nothing to store and goes on.)
            self.undo_group(&accepted);
            let refused = ApplyError::Store(self.closed_store_reason());
            for a in accepted {
                let _ = a.reply.send(Err(refused.clone()));
            }
            return Outcome::Refused(refused);
        }
        let changed: Vec<Change> = accepted
            .iter()
            .filter(|a| a.effect != Effect::Unchanged && a.reply.origin != Origin::Remote)
            .map(|a| a.change.clone())
            .collect();
        let commits_first = self.store.as_ref().is_some_and(StateStore::commits_first);
        if commits_first && !changed.is_empty() {
            // etcd known to be away: refused at once, not after the commit's deadline, which
            // would hold every other request (and the watch, and the timer) for as long.
            let etcd = self.store.as_ref().and_then(StateStore::etcd_status);
            if let Some(why) = self.store_down(etcd.as_ref()) {
                self.undo_group(&accepted);
                return self
                    .not_stored(accepted, CommitError::Unavailable(why))
                    .await;
            }
            if let Err(e) = self.store_commit(&changed).await {
                self.undo_group(&accepted);
                return self.not_stored(accepted, e).await;
            }
        }
        // Commands from what HAProxy had (the previous spec, in the undo record) to the new
        // spec: no `show servers state` round trip on the request path. Drift that makes these
        // wrong is found and repaired by the timer. Each change's commands are a range of the
        // batch, so HAProxy's answer to each is told to the request that caused it.
        let mut commands = Vec::new();
        let mut ranges = Vec::with_capacity(accepted.len());
        for a in &accepted {
            let start = commands.len();
            if a.effect != Effect::Unchanged {
                match &a.undo {
                    Undo::Server { previous, .. } => {
                        self.change_commands(&a.change, previous.as_ref(), &mut commands)
                    }
                    Undo::Replace { port, previous, .. } => {
                        self.replace_commands(*port, previous.as_deref(), &mut commands)
                    }
                    // A settings change the runtime API can make (a reload-worthy one never
                    // comes this way).
                    _ => commands.extend(a.settings_commands.iter().cloned()),
                }
            }
            ranges.push(start..commands.len());
        }
        let replies = self.send_batch(&commands).await;
        if !commits_first {
            if let Err(e) = self.store_commit(&changed).await {
                self.undo_group(&accepted);
                return self.not_stored(accepted, e).await;
            }
        }
        self.metrics.servers.set(self.state.server_count() as i64);
        self.publish_desired();
        let generation = self.state.generation;
        let mut answers = Vec::with_capacity(accepted.len());
        for (a, range) in accepted.into_iter().zip(ranges) {
            let (applied, refused) = match &replies {
                _ if a.effect == Effect::Unchanged => (Applied::Unchanged, None),
                None => (Applied::Pending, None),
                Some(replies) => match self.refusal(&a.change, &a.undo, &replies[range]) {
                    None => (Applied::Runtime, None),
                    Some(why) => (Applied::Pending, Some(why)),
                },
            };
            answers.push((a.reply, applied, refused, a.transition));
        }
        // Before the answers: a client that reads /healthz right after its answer sees its
        // change (a drain started or ended).
        self.publish();
        for (reply, applied, refused, transition) in answers {
            let _ = reply.send(Ok(ApplyOk {
                applied,
                generation,
                refused,
                transition,
                reload_for: None,
            }));
        }
        Outcome::Done
    }

    /// The runtime commands of one change, from what HAProxy has (`previous`) to what it asks.
    fn change_commands(
        &mut self,
        change: &Change,
        previous: Option<&crate::model::ServerSpec>,
        out: &mut Vec<Command>,
    ) {
        match change {
            Change::PutServer {
                frontend_port,
                node,
                spec,
                ..
            } => {
                let server = server_ref(*frontend_port, node);
                // A deleted server still draining is in HAProxy (in maintenance): it comes back
                // as it is, moved and made ready, without waiting for its connections.
                let draining = previous
                    .is_none()
                    .then(|| self.draining.take_back(&server))
                    .flatten();
                let settings = self
                    .state
                    .frontends
                    .get(frontend_port)
                    .map(|fe| fe.settings.clone())
                    .unwrap_or_default();
                out.extend(reconcile::commands_for(
                    &server,
                    previous.or(draining.as_ref()),
                    spec,
                    &settings,
                ));
                // One taken back from draining missed live check-port changes while it was
                // not the frontend's (a reload would have dropped it, so nothing else can
                // have changed).
                if let (Some(_), Some(p)) = (&draining, settings.check.port) {
                    if let Ok(c) = Command::set_check_port(server.clone(), p) {
                        out.push(c);
                    }
                }
            }
            Change::DeleteServer {
                frontend_port,
                node,
            } => {
                // In place, not after the group: a DELETE then PUT of the same node in one
                // group must run del before add.
                let server = server_ref(*frontend_port, node);
                out.push(Command::SetServerState(
                    server.clone(),
                    ServerAdminState::Maint,
                ));
                out.push(Command::DelServer(server));
            }
            Change::DeleteFrontend { .. }
            | Change::PutFrontend { .. }
            | Change::ReplaceFrontend { .. } => {}
        }
    }

    /// The runtime commands that take HAProxy's frontend `port` from `previous` to the state's:
    /// the servers it lost deleted, its new and changed ones put, then the live settings. (A
    /// replacement that adds or removes the frontend, or changes what only the config file
    /// says, is a reload and never comes here.)
    fn replace_commands(
        &mut self,
        port: u16,
        previous: Option<&crate::model::FrontendSpec>,
        out: &mut Vec<Command>,
    ) {
        let (Some(old), Some(new)) = (previous, self.state.frontends.get(&port).cloned()) else {
            return;
        };
        for (node, spec) in &old.servers {
            if !new.servers.contains_key(node) {
                let delete = Change::DeleteServer {
                    frontend_port: port,
                    node: node.clone(),
                };
                self.change_commands(&delete, Some(spec), out);
            }
        }
        for (node, spec) in &new.servers {
            let before = old.servers.get(node);
            if before != Some(spec) {
                let put = Change::PutServer {
                    frontend_port: port,
                    node: node.clone(),
                    mode: new.mode,
                    spec: spec.clone(),
                    frontend: None,
                };
                self.change_commands(&put, before, out);
            }
        }
        out.extend(reconcile::settings_commands(port, &new, &old.settings));
    }

    /// What HAProxy refused of one change's commands, as the request will be told; `None` when
    /// it took them all. A `del server` refused only for the server's connections is no
    /// refusal: the server drains, and is deleted once idle.
    fn refusal(
        &mut self,
        change: &Change,
        undo: &Undo,
        replies: &[crate::runtime::Reply],
    ) -> Option<String> {
        let mut refused = Vec::new();
        for r in replies {
            if r.outcome.is_success() {
                continue;
            }
            let deleted = deleted_by(change, undo, &r.command);
            if let (Some((frontend_port, node, previous)), true) =
                (&deleted, r.outcome.is_server_in_use())
            {
                let server = server_ref(*frontend_port, node);
                // Wanted again by a later change of the group: not draining.
                let wanted = self
                    .state
                    .frontends
                    .get(frontend_port)
                    .is_some_and(|fe| fe.servers.contains_key(node));
                if !wanted {
                    tracing::info!(server = %server, "server still has connections: draining it, deleted once idle");
                    // What HAProxy holds: the spec before the delete, in maintenance now.
                    let spec = previous.as_ref().map(|p| crate::model::ServerSpec {
                        state: crate::model::ServerState::Maint,
                        ..p.clone()
                    });
                    self.draining.start(server, spec, Instant::now());
                }
                continue;
            }
            // A server to delete that HAProxy does not have: nothing is left to do.
            if deleted.is_some() && r.outcome.kind == crate::runtime::OutcomeKind::NotFound {
                continue;
            }
            refused.push(format!("`{}`: {}", r.command, r.outcome.text.trim_end()));
        }
        (!refused.is_empty()).then(|| refused.join("; "))
    }

    /// Stores `changes` (applied to the state already). With etcd, the frontends they touch
    /// are then at the revisions etcd answered.
    pub(super) async fn store_commit(&mut self, changes: &[Change]) -> Result<(), CommitError> {
        if changes.is_empty() {
            return Ok(());
        }
        let Some(store) = self.store.as_mut() else {
            return Err(CommitError::Failed("the store is closed".into()));
        };
        let committed = store.commit(&self.state, changes).await?;
        self.store_unavailable = None;
        if let Some(committed) = committed {
            for (port, revision) in committed.frontends {
                if self.state.frontends.contains_key(&port) {
                    self.state.revisions.set_present(port, revision);
                } else {
                    self.state.revisions.set_absent(port, revision);
                }
            }
            self.etcd_revision = self.etcd_revision.max(committed.revision);
        }
        Ok(())
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

/// The server a change's command (its text, as HAProxy was sent it) deletes: its frontend port,
/// node and spec before (from the undo record). A delete's commands are all about its server; a
/// replacement's `del server` names one of the servers its frontend lost.
fn deleted_by(
    change: &Change,
    undo: &Undo,
    command: &str,
) -> Option<(
    u16,
    crate::model::NodeName,
    Option<crate::model::ServerSpec>,
)> {
    match (change, undo) {
        (
            Change::DeleteServer {
                frontend_port,
                node,
            },
            Undo::Server { previous, .. },
        ) => Some((*frontend_port, node.clone(), previous.clone())),
        (
            Change::ReplaceFrontend { frontend_port, .. },
            Undo::Replace {
                previous: Some(fe), ..
            },
        ) => {
            let server = command.strip_prefix("del server ")?;
            fe.servers
                .iter()
                .find(|(node, _)| server_ref(*frontend_port, node).to_string() == server)
                .map(|(node, spec)| (*frontend_port, node.clone(), Some(spec.clone())))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order: a frontend's delete, then a PUT of a server on the same port, in one
    /// group. Both go to the reload set (which applies them in order); another port's runtime
    /// change does not wait.
    #[test]
    fn a_port_with_a_reload_change_keeps_its_later_changes_in_order() {
        let mut ports = ReloadPorts(BTreeSet::new());
        assert!(
            !ports.takes(9000, false),
            "a runtime change before any reload"
        );
        assert!(ports.takes(443, true), "DELETE /v1/frontends/443");
        assert!(
            ports.takes(443, false),
            "PUT a server on 443 after its delete"
        );
        assert!(!ports.takes(9000, false), "another port's runtime change");
        assert!(ports.takes(443, false), "DELETE a server on 443");
    }

    /// What the reload set does with such a set: applied in order, the frontend is recreated
    /// with the PUT's server and mode, as if the two had been applied one after the other.
    #[test]
    fn a_delete_then_a_put_of_one_port_end_as_applied_in_order() {
        use crate::model::{Mode, NodeName, ServerSpec, ServerState};
        let spec = |ip: &str| ServerSpec {
            node_ip: ip.parse().unwrap(),
            node_port: 30443,
            state: ServerState::Ready,
            service: None,
            weight: None,
            lease: false,
        };
        let put = |node: &str, mode, ip| Change::PutServer {
            frontend_port: 443,
            node: NodeName::new(node).unwrap(),
            mode,
            spec: spec(ip),
            frontend: None,
        };
        let mut state = DesiredState::default();
        state.apply(&put("edge-9", Mode::Tcp, "10.0.0.9")).unwrap();
        for c in [
            Change::DeleteFrontend { frontend_port: 443 },
            put("node-a", Mode::Http, "10.0.0.1"),
        ] {
            state.apply_with_transition(&c).unwrap();
        }
        let fe = &state.frontends[&443];
        assert_eq!(fe.mode, Mode::Http);
        assert_eq!(
            fe.servers.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
            ["node-a"]
        );
    }
}
