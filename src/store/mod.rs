//! The store of the desired state, behind one interface: the local journal on one VM
//! ([`journal`], the embedded default), or etcd shared by the agents of several VMs ([`etcd`]).
//!
//! The owner task holds a [`StateStore`] and does not care which it has, except for one
//! property the store states itself ([`StateStore::commits_first`]): the journal is written
//! after HAProxy has a change (traffic moves without waiting for the fsync), etcd before
//! (a transaction may lose to another agent's, and HAProxy must not run the loser). A new
//! frontend is the exception: HAProxy must take it before it is stored, so it is reloaded
//! first, and reloaded back out if its commit loses or fails.
//!
//! # Layout
//!
//! - `journal.rs`: the snapshot and append-only journal in the state directory.
//! - `etcd/`: one key per frontend under a prefix, transactions guarded by each key's
//!   revision (`mod.rs`), the calls and their deadlines (`call.rs`), the watch that brings other
//!   agents' changes (`watcher.rs`), the agents' own registrations (`registrar.rs`), the local
//!   copy of the last state applied (`cache.rs`).

use std::collections::BTreeSet;

use crate::model::{Change, DesiredState};

pub mod etcd;
pub mod journal;

pub use etcd::{EtcdOptions, EtcdStatus, EtcdStore, RemoteFrontend, StoreEvent};
pub use journal::{Store, StoreError, StoreOptions, JOURNAL_FILE, LOCK_FILE, SNAPSHOT_FILE};

/// Which store an agent has, as `GET /v1/frontends` and `lbctl state` show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Journal,
    Etcd,
}

/// What an etcd commit left in etcd: the revision of each frontend it touched. One
/// transaction's writes share its revision; a commit that found its values already there (a
/// try made again after a lost answer) reads each key's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The store's revision this agent has applied with the commit (the revision of the
    /// transaction, or the newest of its keys when it found its values already there).
    pub revision: i64,
    /// (frontend port, the revision its key is at: its mod revision, or the answer's revision
    /// for a key that is absent).
    pub frontends: Vec<(u16, i64)>,
}

/// Why a commit was not made.
#[derive(Debug)]
pub enum CommitError {
    /// Another agent changed a frontend of this commit since the state was read: its current
    /// value is here, to apply before the changes are computed again.
    Conflict(Vec<RemoteFrontend>),
    /// The store cannot be reached (etcd without quorum, unreachable, timed out); nothing
    /// was written, or what was is delivered by the watch like another agent's change.
    Unavailable(String),
    /// The journal failed: reopen it (see [`StoreError::Poisoned`]).
    Failed(String),
}

/// The desired state's store, local or shared.
pub enum StateStore {
    Journal(Store),
    /// Boxed: etcd's client is kilobytes, the journal's handle a few words.
    Etcd(Box<EtcdStore>),
}

impl StateStore {
    pub fn kind(&self) -> StoreKind {
        match self {
            StateStore::Journal(_) => StoreKind::Journal,
            StateStore::Etcd(_) => StoreKind::Etcd,
        }
    }

    /// Whether a change is stored before HAProxy gets it (see the module doc).
    pub fn commits_first(&self) -> bool {
        matches!(self, StateStore::Etcd(_))
    }

    /// Stores `changes`, applied to `state` already. On success, the etcd revisions the
    /// frontends they touch are at now (`None` for the journal).
    pub async fn commit(
        &mut self,
        state: &DesiredState,
        changes: &[Change],
    ) -> Result<Option<Committed>, CommitError> {
        if changes.is_empty() {
            return Ok(None);
        }
        match self {
            // fsync blocks: tell the runtime so other tasks (the HTTP server) keep running.
            StateStore::Journal(store) => {
                tokio::task::block_in_place(|| store.commit(state, changes))
                    .map(|()| None)
                    .map_err(|e| CommitError::Failed(e.to_string()))
            }
            StateStore::Etcd(store) => {
                let ports: BTreeSet<u16> = changes.iter().map(Change::frontend_port).collect();
                store.commit(state, &ports).await.map(Some)
            }
        }
    }

    /// etcd: the file where the owner keeps the last state it applied.
    pub fn cache_path(&self) -> Option<&std::path::Path> {
        match self {
            StateStore::Journal(_) => None,
            StateStore::Etcd(store) => Some(store.cache_path()),
        }
    }

    /// etcd's state of health, revision and agents; `None` for the journal.
    pub fn etcd_status(&self) -> Option<EtcdStatus> {
        match self {
            StateStore::Journal(_) => None,
            StateStore::Etcd(store) => Some(store.status()),
        }
    }

    /// etcd's status as its tasks publish it; `None` for the journal.
    pub fn etcd_status_watch(&self) -> Option<tokio::sync::watch::Receiver<EtcdStatus>> {
        match self {
            StateStore::Journal(_) => None,
            StateStore::Etcd(store) => Some(store.status_watch()),
        }
    }

    /// Changes made by other agents, for the owner to apply; taken once (`None` after, and
    /// for the journal).
    pub fn take_events(&mut self) -> Option<tokio::sync::mpsc::Receiver<StoreEvent>> {
        match self {
            StateStore::Journal(_) => None,
            StateStore::Etcd(store) => store.take_events(),
        }
    }
}
