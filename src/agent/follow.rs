//! Following the shared store (etcd): other agents' commits, brought by the watch, applied to
//! this agent's HAProxy through the same runtime and reload paths as requests; a change
//! HAProxy did not take, tried again by comparing all of etcd with the state (with backoff);
//! heartbeats exchanged so that the one expiring agent knows of every renewal.

use super::*;

/// How often this agent's heartbeats are published at most.
const RENEWALS_EVERY: Duration = Duration::from_secs(1);

impl Owner {
    /// A batch from the watch: the frontends it brings become changes from etcd, in one group
    /// (so new frontends share one reload); another agent's heartbeats move the lease clocks.
    pub(super) async fn store_event(&mut self, event: StoreEvent) {
        match event {
            StoreEvent::Frontends {
                revision,
                mut frontends,
                everything,
            } => {
                if everything {
                    // A re-read: what it does not list is gone, also a frontend only a queued
                    // reload set would create.
                    let listed: BTreeSet<u16> = frontends.iter().map(|f| f.port).collect();
                    let queued = super::commit::ReloadPorts::of_queue(&self.reload_sets);
                    let known: BTreeSet<u16> = self
                        .state
                        .frontends
                        .keys()
                        .chain(queued.ports())
                        .copied()
                        .collect();
                    for port in &known {
                        if !listed.contains(port) {
                            frontends.push(RemoteFrontend {
                                port: *port,
                                spec: None,
                                revision,
                            });
                        }
                    }
                }
                if !frontends.is_empty() {
                    let group = self.remote_group(frontends);
                    self.apply_changes(group).await;
                }
                self.etcd_revision = self.etcd_revision.max(revision);
            }
            StoreEvent::Renewals { agent, renewals } => {
                tracing::trace!(agent, count = renewals.len(), "renewals from another agent");
                self.leases.merge(&renewals, Instant::now());
            }
        }
    }

    /// A heartbeat this agent received.
    pub(super) fn renewed(&mut self, port: u16, node: &crate::model::NodeName) {
        self.leases
            .heard(port, node, Instant::now(), crate::clock::unix_millis());
    }

    /// The timer's part: what became of changes from etcd (one HAProxy did not take is tried
    /// again later, by comparing all of etcd with the state), and this agent's heartbeats
    /// published.
    pub(super) async fn follow_store(&mut self) {
        let Some(StateStore::Etcd(_)) = &self.store else {
            return;
        };
        self.remote_outcomes();
        if let Some(r) = &self.remote_retry {
            if Instant::now() >= r.next {
                self.compare_with_etcd().await;
            }
        }
    }

    /// Looks at the answers of changes from etcd that are in.
    pub(super) fn remote_outcomes(&mut self) {
        let mut failed = None;
        self.remote_answers
            .retain_mut(|(port, answer)| match answer.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => true,
                Ok(Err(e)) => {
                    failed = Some(format!(
                        "a change of frontend {port} from etcd could not be applied: {e}"
                    ));
                    false
                }
                _ => false,
            });
        if let Some(error) = failed {
            tracing::error!(error = %error, "HAProxy did not take a change another agent stored; trying again with backoff");
            self.remote_retry = Some(Retry::after(self.remote_retry.as_ref(), error));
        }
    }

    /// Reads all of etcd and applies what differs from the state. Clears the retry when
    /// nothing differs any more; otherwise the outcome of what it applied decides. (A value
    /// HAProxy refused left the state at its older revision, so etcd's newer one applies.)
    async fn compare_with_etcd(&mut self) {
        let Some(StateStore::Etcd(store)) = &self.store else {
            return;
        };
        if let Some(r) = &mut self.remote_retry {
            r.next = Instant::now() + r.backoff;
        }
        let (frontends, revision) = match store.read_everything().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read etcd to compare it with the state");
                return;
            }
        };
        let in_etcd: BTreeSet<u16> = frontends.iter().map(|f| f.port).collect();
        let mut changes: Vec<RemoteFrontend> = frontends
            .into_iter()
            .filter(|f| self.state.frontends.get(&f.port).map(|a| &**a) != f.spec.as_ref())
            .collect();
        for port in self.state.frontends.keys() {
            if !in_etcd.contains(port) {
                changes.push(RemoteFrontend {
                    port: *port,
                    spec: None,
                    revision,
                });
            }
        }
        if changes.is_empty() {
            if self.remote_retry.take().is_some() {
                tracing::info!("HAProxy has every change etcd holds again");
            }
            return;
        }
        let group = self.remote_group(changes);
        self.apply_changes(group).await;
    }

    /// Publishes the heartbeats this agent received since it last did, for the expiring agent:
    /// after any turn of the owner once [`RENEWALS_EVERY`] has passed (not on the timer, which
    /// a steady stream of requests keeps from firing), so a renewal reaches the expiring agent
    /// within about a second, well before a third of any lease.
    pub(super) fn publish_renewals(&mut self) {
        let Some(StateStore::Etcd(store)) = &self.store else {
            return;
        };
        if self.renewals_at.elapsed() < RENEWALS_EVERY {
            return;
        }
        self.renewals_at = Instant::now();
        let heard = self.leases.take_heard();
        if heard.is_empty() {
            return;
        }
        if let Err(back) = store.publish_renewals(heard) {
            self.leases.give_back(back);
        }
    }
}
