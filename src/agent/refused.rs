//! A group the store did not take: lost to another agent's commit (applied again on top of
//! what won), or refused (taken back out of the state and of HAProxy, and answered so).

use super::*;

/// A commit lost to another agent's: what etcd holds for its frontends, and the changes to
/// apply again on top.
pub(super) struct Lost {
    pub(super) current: Vec<RemoteFrontend>,
    pub(super) again: Vec<(Change, Requester)>,
}

/// What became of a group's runtime part.
pub(super) enum Outcome {
    /// Stored (or nothing to store) and answered.
    Done,
    /// Lost to another agent's commit: what etcd holds, and the changes to apply again on top
    /// with their places in the group.
    Lost {
        current: Vec<RemoteFrontend>,
        again: Vec<(usize, Change, Requester)>,
    },
    /// The store did not take it: its changes were answered with this.
    Refused(ApplyError),
}

/// Splits a group's held refusals: those judged on a state holding an earlier change of
/// their frontend (`earlier`: the (place, port) of the changes that changed the state), whose
/// refusal stands only if that change does, and the others.
pub(super) fn judged_behind(held: Vec<Held>, earlier: &[(usize, u16)]) -> (Vec<Held>, Vec<Held>) {
    held.into_iter().partition(|h| {
        let port = h.change.frontend_port();
        earlier.iter().any(|&(seq, p)| seq < h.seq && p == port)
    })
}

/// Changes to apply again (`again`, with their places in the group) and the held refusals
/// behind them, in the group's order: each is judged again where it was.
pub(super) fn in_place(
    mut again: Vec<(usize, Change, Requester)>,
    behind: Vec<Held>,
) -> Vec<(Change, Requester)> {
    again.extend(behind.into_iter().map(|h| (h.seq, h.change, h.reply)));
    again.sort_by_key(|(seq, _, _)| *seq);
    again.into_iter().map(|(_, c, r)| (c, r)).collect()
}

impl Owner {
    /// A group the store did not take (undone in memory already): a lost commit comes back to
    /// be applied again; otherwise every change is refused, after HAProxy is put back to what
    /// the journal holds.
    pub(super) async fn not_stored(&mut self, accepted: Vec<Accepted>, e: CommitError) -> Outcome {
        match e {
            CommitError::Conflict(current) => {
                let mut again = Vec::with_capacity(accepted.len());
                for a in accepted {
                    if let Some(reply) = self.lost_once(a.reply, a.change.frontend_port()) {
                        again.push((a.seq, a.change, reply));
                    }
                }
                Outcome::Lost { current, again }
            }
            CommitError::Unavailable(why) => {
                self.store_unavailable = Some((why.clone(), Instant::now()));
                let refused = ApplyError::StoreUnavailable(why);
                let generation = self.state.generation;
                let answers = still_unchanged(accepted.iter().map(|a| (&a.change, a.effect)));
                for (a, unchanged) in accepted.into_iter().zip(answers) {
                    let answer = match unchanged {
                        true => Ok(ApplyOk {
                            applied: Applied::Unchanged,
                            generation,
                            refused: None,
                            transition: a.transition,
                            reload_for: None,
                        }),
                        false => Err(refused.clone()),
                    };
                    let _ = a.reply.send(answer);
                }
                Outcome::Refused(refused)
            }
            CommitError::Failed(e) => {
                self.reopen_store();
                // Before answering, so a refused client never finds its change still serving.
                tracing::warn!(error = %e, "not stored: putting HAProxy back to the stored state");
                self.out_of_sync = true;
                self.reconcile().await;
                let refused = ApplyError::Store(e);
                for a in accepted {
                    let _ = a.reply.send(Err(refused.clone()));
                }
                Outcome::Refused(refused)
            }
        }
    }

    /// Counts a lost commit against a change: the requester back, to try again, or `None`
    /// once it lost too often (then it is answered).
    pub(super) fn lost_once(&mut self, mut reply: Requester, port: u16) -> Option<Requester> {
        if reply.origin == Origin::Own {
            // A lease's delete: the frontend changed meanwhile (the node may just have
            // registered again); the next look at the clocks decides again.
            let _ = reply.send(Err(ApplyError::StoreUnavailable(format!(
                "etcd: frontend {port} changed under the agent's own change"
            ))));
            return None;
        }
        reply.conflicts += 1;
        if reply.conflicts >= MAX_CONFLICTS {
            let _ = reply.send(Err(ApplyError::StoreUnavailable(format!(
                "etcd: frontend {port} kept changing under this change (its commit lost to \
                 other agents' {MAX_CONFLICTS} times in a row); try again"
            ))));
            return None;
        }
        Some(reply)
    }

    /// Takes a group back out of the in-memory state, last change first.
    pub(super) fn undo_group(&mut self, accepted: &[Accepted]) {
        for a in accepted.iter().rev() {
            self.state.undo(a.undo.clone());
        }
    }

    /// After a failed commit the journal refuses further ones (what reached the disk is
    /// uncertain): open it again, and take what it holds as the desired state, so the agent
    /// goes on storing and never claims more, or less, than the disk has. (etcd needs none of
    /// this: a failed transaction wrote nothing, or the watch brings what it wrote.)
    pub(super) fn reopen_store(&mut self) {
        if matches!(self.store, Some(StateStore::Etcd(_))) {
            return;
        }
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
                    self.publish_desired();
                }
                self.store = Some(StateStore::Journal(store));
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
}

/// Which changes of a group the store refused still answer 200 `unchanged`: a heartbeat that
/// changes nothing has nothing to store, unless it was "nothing" only after a refused change
/// of the same server (or of its whole frontend) earlier in the group, such as a resent PUT
/// behind its first copy.
fn still_unchanged<'a>(group: impl Iterator<Item = (&'a Change, Effect)>) -> Vec<bool> {
    let mut refused: Vec<&Change> = Vec::new();
    group
        .map(|(change, effect)| {
            let unchanged =
                effect == Effect::Unchanged && !refused.iter().any(|r| r.overlaps(change));
            if !unchanged {
                refused.push(change);
            }
            unchanged
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group etcd did not take: a no-op heartbeat keeps its 200 unless a refused change of
    /// its server or its whole frontend came before it.
    #[test]
    fn a_refused_group_keeps_only_the_heartbeats_no_refused_change_came_before() {
        use crate::model::NodeName;
        let server = |port, node: &str| Change::DeleteServer {
            frontend_port: port,
            node: NodeName::new(node).unwrap(),
        };
        let settings = Change::DeleteFrontend { frontend_port: 80 };
        let (u, r) = (Effect::Unchanged, Effect::Runtime);
        let group = [
            (server(443, "a"), u),  // before any refused change: 200
            (server(443, "b"), r),  // refused
            (server(443, "b"), u),  // its resent copy: refused with it
            (server(443, "c"), u),  // another server of that frontend: 200
            (server(8443, "b"), u), // another frontend: 200
            (settings, Effect::Reload),
            (server(80, "a"), u), // after its frontend's refused change: refused
        ];
        let answers = still_unchanged(group.iter().map(|(c, e)| (c, *e)));
        assert_eq!(answers, [true, false, false, true, true, false, false]);
    }
}
