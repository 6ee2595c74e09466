//! What `/healthz` says: HAProxy, the sync with the desired state, the store; computed by the
//! owner and published after every turn, so a reader never waits for a reload or for etcd.

use super::*;

/// What `/healthz` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Health {
    pub haproxy: &'static str,
    pub in_sync: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub generation: u64,
    /// Deleted servers still in HAProxy, in maintenance, until their last connection ends.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<String>,
    /// Set while lease expiry is suspended: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leases_suspended: Option<String>,
    /// Ports of the agent's frontends that HAProxy's own configuration binds too (added after
    /// the agent's frontend): HAProxy splits their connections. Checked at each reload. Only
    /// the ports: `/healthz` is unauthenticated, and which file and line of the operator's
    /// bind them is for the log.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub port_conflicts: Vec<u16>,
    /// Where the desired state lives, and with etcd whether it answers.
    pub store: StoreHealth,
}

/// The store as `/healthz` and `GET /v1/frontends` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoreHealth {
    pub kind: StoreKind,
    /// etcd: the revision this agent has applied up to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// etcd: why it cannot be used now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// etcd: this agent's name, the agents registered (oldest first), and whether this one
    /// expires registrations for all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<crate::store::etcd::AgentSeen>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub expiring: bool,
}

impl Owner {
    /// Publishes the health `/healthz` answers with, when it changed, and the draining gauge
    /// beside the list it counts.
    pub(super) fn publish(&mut self) {
        self.metrics
            .servers_draining
            .set(self.draining.len() as i64);
        let now = self.health();
        self.health_tx.send_if_modified(|h| {
            let changed = *h != now;
            if changed {
                *h = now;
            }
            changed
        });
    }

    /// Why etcd cannot take changes now: it does not answer, or did not take a commit and has
    /// not answered a quorum read since. `None` with the journal.
    pub(super) fn store_down(&self, etcd: Option<&crate::store::EtcdStatus>) -> Option<String> {
        let etcd = etcd?;
        etcd.unanswered.clone().or_else(|| {
            self.store_unavailable
                .as_ref()
                .filter(|(_, at)| etcd.answered_at < Some(*at))
                .map(|(why, _)| why.clone())
        })
    }

    pub(super) fn health(&self) -> Health {
        let etcd = self.store.as_ref().and_then(StateStore::etcd_status);
        // Changes are refused meanwhile, or other agents' changes may not arrive (a watch
        // starting again): not in sync.
        let store_down = self
            .store_down(etcd.as_ref())
            .or_else(|| etcd.as_ref().and_then(|e| e.error.clone()));
        Health {
            haproxy: if self.haproxy_up { "up" } else { "down" },
            // A closed store refuses every change: not healthy, whatever HAProxy does.
            in_sync: self.haproxy_up
                && !self.out_of_sync
                && self.store_error.is_none()
                && store_down.is_none()
                && self.remote_retry.is_none()
                && self.listeners_retry.is_none(),
            drift: self.drift.clone(),
            error: self
                .store_error
                .clone()
                .or_else(|| store_down.clone())
                .or_else(|| self.remote_retry.as_ref().map(|r| r.error.clone()))
                .or_else(|| self.listeners_retry.as_ref().map(|r| r.error.clone()))
                .or_else(|| self.repair_error.clone())
                .or_else(|| self.last_error.clone()),
            generation: self.state.generation,
            draining: self.draining.names(),
            leases_suspended: self.leases_suspended.clone(),
            port_conflicts: self.port_conflicts.iter().map(|(p, _)| *p).collect(),
            store: StoreHealth {
                kind: self
                    .store
                    .as_ref()
                    .map_or(StoreKind::Journal, StateStore::kind),
                revision: etcd.as_ref().map(|_| self.etcd_revision),
                error: store_down,
                agent: etcd.as_ref().map(|e| e.name.clone()),
                expiring: etcd.as_ref().is_some_and(|e| e.expiring),
                agents: etcd.map(|e| e.agents).unwrap_or_default(),
            },
        }
    }
}
