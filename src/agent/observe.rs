//! Observation on a timer: comparing HAProxy with the desired state (repairing drift), the
//! rounds of draining servers, and lease expiry.

use super::*;

impl Owner {
    /// The timer: leases; then a full comparison when one is due (every drift-check
    /// interval), when something is known to differ, or when HAProxy restarted or was reloaded
    /// (a `show info` tells, cheaply); otherwise only the draining servers' round. At 10,000
    /// servers a full comparison reads and compares megabytes: done every tick, it was most of
    /// the agent's idle CPU.
    pub(super) async fn tick(&mut self) {
        self.expire_leases().await;
        self.retry_listeners().await;
        let full = self.out_of_sync
            || !self.suspect_ports.is_empty()
            || Instant::now() >= self.next_full
            || self.haproxy_changed().await;
        if full {
            self.reconcile().await;
        }
        // Also when the comparison stopped early (a missing frontend, HAProxy away): idle
        // draining servers are deleted and overdue ones cut whatever else is wrong.
        if self.haproxy_up {
            self.drain_round().await;
        }
    }

    /// Whether HAProxy restarted, was reloaded or cannot be reached since the last look.
    async fn haproxy_changed(&mut self) -> bool {
        if self
            .managed
            .as_mut()
            .is_some_and(|m| m.try_exited().is_some())
        {
            return true;
        }
        self.client.disconnect();
        let changed = match self.client.show_info().await {
            Ok(info) => self.identity != Some(identity_of(&info)),
            Err(_) => true,
        };
        // The connection stays for the next change: it is to the process just looked at.
        changed
    }

    /// Compares HAProxy with the desired state and repairs what differs.
    pub(super) async fn reconcile(&mut self) {
        self.next_full = Instant::now() + self.drift_check_every;
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
        let identity = identity_of(&info);
        if self.identity.is_some_and(|id| id != identity) {
            tracing::info!(
                pid = identity.0,
                "HAProxy restarted or reloaded; re-applying runtime state"
            );
            // A new process has none of the runtime state: what drained stays with the old
            // one, and a server a new file still lists is a new server (the comparison
            // below deletes it, draining it again if it already has connections).
            self.draining.clear();
            // The new worker has read the servers' state: leave the file empty, so a later
            // restart does not load it stale (after a `--reload-command`, the agent cannot
            // tell sooner when HAProxy read it).
            if let Some(f) = &self.server_state {
                f.clear().await;
            }
        }
        let reloaded = self.identity != Some(identity);
        self.identity = Some(identity);
        self.addresses_apply_later = super::batch::applies_addresses_later(&info);
        if reloaded {
            // HAProxy (re)read its files: an operator's new section may bind our ports.
            self.check_port_conflicts();
        }
        let mut observed = match self.client.show_servers_state(None).await {
            Ok(o) => o,
            Err(e) => {
                self.transport_failed(&e);
                return;
            }
        };
        // Draining servers are deleted on purpose, later: not drift, as long as they are in
        // maintenance. One HAProxy no longer has was deleted, or dropped by a reload; one
        // taken out of maintenance (by hand) is left to the comparison, which puts it back.
        if !self.draining.is_empty() {
            let mut still = std::collections::HashSet::new();
            observed.retain(
                |o| match crate::runtime::ServerRef::new(&o.backend, &o.server) {
                    Ok(s) if o.admin.in_maintenance() && self.draining.contains(&s) => {
                        still.insert(s);
                        false
                    }
                    _ => true,
                },
            );
            self.draining.retain(|s| still.contains(s));
        }
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
        if plan.missing_backends.is_empty()
            && self
                .state
                .frontends
                .values()
                .any(|fe| fe.settings.maxconn.is_some())
        {
            match self.client.show_stat_frontends().await {
                Ok(rows) => reconcile::plan_maxconn(&self.state, &rows, &mut plan),
                Err(e) => {
                    self.transport_failed(&e);
                    return;
                }
            }
        }
        for p in stale {
            plan.drift
                .push(format!("fe_{p} runs in HAProxy but is not wanted"));
            // Reuses the missing-backend path below: rewrite the file and reload.
            plan.missing_backends.push(p);
        }
        if plan.missing_backends.is_empty() {
            self.repair_backoff = Duration::ZERO;
            self.next_repair_reload = None;
            self.repair_error = None;
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
            // file, or an operator reloaded without ours): rewrite and reload, backing off when
            // that does not bring them (a HAProxy that does not load our file at all).
            self.out_of_sync = true;
            if self
                .next_repair_reload
                .is_some_and(|at| Instant::now() < at)
            {
                return;
            }
            self.repair_backoff = (self.repair_backoff * 2).clamp(REPAIR_FIRST, REPAIR_MAX);
            self.next_repair_reload = Some(Instant::now() + self.repair_backoff);
            let text = render_managed(&self.state, &self.render);
            let files = self.files.clone();
            let mut files = files.lock().await;
            // Forced: the file may be current while HAProxy runs an older one.
            files.written = None;
            match files.install(&text, self.state.generation).await {
                Ok(_) => {
                    let managed = files.files.managed.clone();
                    drop(files);
                    match self.reload_haproxy().await {
                        Err(e) => {
                            self.metrics.reload_failures.inc();
                            self.last_error = Some(e.to_string());
                        }
                        Ok(()) => {
                            if let Some(why) = self.haproxy_lacks_our_file(&managed).await {
                                tracing::error!(error = %why, next_try_s = self.repair_backoff.as_secs(), "reloaded, but HAProxy does not load the agent's file");
                                self.repair_error = Some(why);
                            }
                        }
                    }
                }
                Err(e) => self.last_error = Some(e.to_string()),
            }
            return;
        }
        let before = self.out_of_sync;
        self.out_of_sync = false;
        let mut commands = plan.commands;
        let first_deletion = commands.len();
        commands.extend(plan.deletions.iter().cloned().map(Command::DelServer));
        let replies = self.send_batch(&commands).await;
        if let Some(replies) = &replies {
            // An unwanted server with connections (deleted while the agent was down, or one a
            // rollback left) drains like a deleted one instead of counting as drift; what
            // HAProxy has of it is kept, so a PUT meanwhile brings it back at once.
            for (server, r) in plan.deletions.iter().zip(&replies[first_deletion..]) {
                if r.outcome.is_server_in_use() {
                    let spec = observed
                        .iter()
                        .find(|o| {
                            o.backend == server.backend.as_str()
                                && o.server == server.server.as_str()
                        })
                        .and_then(held_spec);
                    self.draining.start(server.clone(), spec, Instant::now());
                }
            }
        }
        if replies.is_some() {
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

    /// Deletes the draining servers that are idle now, shutting the connections of those
    /// draining longer than the drain timeout first.
    async fn drain_round(&mut self) {
        if !self.draining.is_empty() {
            let (commands, cut) = self.draining.commands(Instant::now(), self.drain_timeout);
            for server in &cut {
                tracing::warn!(server = %server, timeout_s = self.drain_timeout.as_secs_f64(), "drain timeout: shutting the server's remaining connections");
                self.metrics.drain_timeouts.inc();
            }
            if let Some(replies) = self.send_batch(&commands).await {
                for (c, r) in commands.iter().zip(&replies) {
                    let Command::DelServer(server) = c else {
                        continue;
                    };
                    if r.outcome.is_success() {
                        tracing::info!(server = %server, "drained server deleted");
                        self.draining.forget(server);
                    } else if r.outcome.kind == crate::runtime::OutcomeKind::NotFound {
                        // Gone already: a reload or an operator took it out.
                        self.draining.forget(server);
                    }
                }
            }
        }
    }

    /// Deletes the registrations whose lease ran out, the way a DELETE would (they drain),
    /// unless more than half are late at once (see `leases.rs`).
    pub(super) async fn expire_leases(&mut self) {
        if !self.leases.enabled() {
            return;
        }
        let was_suspended = self.leases.suspended();
        let verdict = self.leases.check(&self.state, Instant::now());
        // With etcd, one agent expires registrations for all (the oldest registered; see
        // `store/etcd.rs`), from every agent's heartbeats: the others keep their clocks only.
        if let Some(etcd) = self.store.as_ref().and_then(StateStore::etcd_status) {
            if !etcd.expiring {
                self.leases_suspended = None;
                self.metrics.lease_expiry_suspended.set(0);
                return;
            }
        }
        match verdict {
            leases::Verdict::Suspended { late, total } => {
                let why = format!(
                    "{late} of {total} registrations have not been renewed for most of their \
                     lease at once: lease expiry is suspended (a control-plane outage must not \
                     empty the backends) until renewals come back"
                );
                if !was_suspended {
                    tracing::warn!(late, total, "{why}");
                }
                self.leases_suspended = Some(why);
                self.metrics.lease_expiry_suspended.set(1);
            }
            leases::Verdict::Expire(overdue) => {
                if was_suspended {
                    tracing::info!("renewals are back: lease expiry resumes");
                }
                self.leases_suspended = None;
                self.metrics.lease_expiry_suspended.set(0);
                if overdue.is_empty() {
                    return;
                }
                let now = crate::clock::unix_seconds();
                let mut group = Vec::with_capacity(overdue.len());
                let mut answers = Vec::with_capacity(overdue.len());
                for o in overdue {
                    let (reply, answer) = Requester::own();
                    group.push((
                        Change::DeleteServer {
                            frontend_port: o.frontend_port,
                            node: o.node.clone(),
                        },
                        reply,
                    ));
                    answers.push((o, answer));
                }
                // A delete never waits for a reload: every answer is in when this returns.
                self.apply_changes(group).await;
                for (o, mut answer) in answers {
                    let last_seen_unix = now.saturating_sub(o.silent_for.as_secs());
                    match answer.try_recv() {
                        Ok(Ok(_)) => {
                            tracing::warn!(
                                frontend_port = o.frontend_port,
                                node = %o.node,
                                last_seen_unix,
                                silent_s = o.silent_for.as_secs(),
                                "lease expired: the node stopped renewing its registration; deleted it"
                            );
                            self.metrics.lease_expiries.inc();
                        }
                        Ok(Err(e)) => tracing::warn!(
                            frontend_port = o.frontend_port,
                            node = %o.node,
                            last_seen_unix,
                            error = %e,
                            "lease expired, but deleting the registration failed; trying again next look"
                        ),
                        Err(_) => {}
                    }
                }
            }
        }
    }

    /// Why HAProxy cannot have our frontends, when its own command line says so: the process
    /// behind the stats socket (same host) was started without `-f` and the agent's file. `None`
    /// when it has the file, or when its command line cannot be read (another namespace).
    pub(super) async fn haproxy_lacks_our_file(
        &mut self,
        managed: &std::path::Path,
    ) -> Option<String> {
        if !self.host_checks {
            return None;
        }
        self.client.disconnect();
        let pid = self.client.show_info().await.ok()?.pid()?;
        let args = super::ports::command_line(pid)?;
        // In another PID namespace the pid HAProxy reports is some other process here: say
        // nothing rather than something wrong.
        let program = std::path::Path::new(args.first()?).file_name()?;
        if !program.to_string_lossy().starts_with("haproxy") {
            return None;
        }
        let want = tokio::fs::canonicalize(managed)
            .await
            .unwrap_or_else(|_| managed.to_path_buf());
        let cwd = tokio::fs::read_link(format!("/proc/{pid}/cwd")).await.ok();
        let loads = args.iter().any(|a| {
            let p = std::path::Path::new(a);
            let p = match &cwd {
                Some(c) if p.is_relative() => c.join(p),
                _ => p.to_path_buf(),
            };
            // `-f DIR` loads every `*.cfg` file in it.
            let holds = |dir: &std::path::Path| {
                dir.is_dir()
                    && want.extension().is_some_and(|e| e == "cfg")
                    && want.parent() == Some(dir)
            };
            p == managed || p == want || p.canonicalize().is_ok_and(|c| c == want || holds(&c))
        });
        (!loads).then(|| {
            format!(
                "HAProxy (pid {pid}) does not load the agent's file: its command line has no \
                 `-f {}` ({}); add it to HAProxy's command line (see docs/operations.md), then \
                 reload HAProxy",
                managed.display(),
                args.join(" ")
            )
        })
    }
}

/// Which HAProxy process answers: its pid and start time. Another one means a restart or a
/// reload, whose new worker has none of the runtime state.
fn identity_of(info: &crate::runtime::parse::Info) -> (u64, u64) {
    (info.pid().unwrap_or(0), info.start_time().unwrap_or(0))
}

/// What HAProxy holds of a server it reports, as a spec in maintenance (how a draining server
/// is); `None` when its address is not an IP (an operator's FQDN server).
fn held_spec(o: &crate::runtime::parse::ServerState) -> Option<crate::model::ServerSpec> {
    Some(crate::model::ServerSpec {
        node_ip: o.addr.as_deref()?.parse().ok()?,
        node_port: o.port?,
        state: crate::model::ServerState::Maint,
        service: None,
        weight: o.user_weight.and_then(|w| u16::try_from(w).ok()),
        lease: true,
    })
}
