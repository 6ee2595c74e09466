//! Leases: a registration lives as long as its sidecar renews it, every PUT being a heartbeat.
//! One not renewed within the lease is deleted as a DELETE would delete it (so it drains).
//! When more than half of all registrations are late at once, that looks like the control
//! plane failing (the API unreachable, a cluster-wide network fault), not like nodes leaving:
//! none expires until renewals come back, so a control-plane outage never empties the backends.
//!
//! "Late" is silent for over [`LATE`] of the lease, not overdue: sidecars renew at spread-out
//! moments (a 30 s interval, jittered), so in an outage they become overdue a few per tick, and
//! a guard that waited for more than half to be overdue at once would expire nearly all of
//! them first. With the lease at three sidecar intervals, every sidecar of a failed control
//! plane is late before the first one is overdue. When renewals come back, the ones still
//! silent get one more whole lease: their sidecars may be seconds from renewing.
//!
//! The clocks live in memory only: an agent restart starts every lease afresh, so nothing
//! expires merely because the agent was down, and a heartbeat costs no write to the store.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::model::{DesiredState, NodeName};
use crate::store::etcd::Renewal;

/// The lease clocks of every registration in the desired state.
pub(super) struct Leases {
    /// `None`: leases are off (`--lease 0`).
    lease: Option<Duration>,
    /// By frontend port, then node: a look-up needs no owned key, so a check of 10,000
    /// registrations allocates nothing.
    renewed: HashMap<u16, HashMap<NodeName, Instant>>,
    /// The heartbeats this agent received itself, when (Unix milliseconds, and the monotonic
    /// clock that ages them): what it tells the other agents (with etcd), so the one that
    /// expires knows of them.
    heard: HashMap<u16, HashMap<NodeName, (u64, Instant)>>,
    suspended: bool,
}

/// A registration whose lease ran out.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Overdue {
    pub frontend_port: u16,
    pub node: NodeName,
    /// How long ago it was last renewed.
    pub silent_for: Duration,
}

/// The part of the lease after which a registration counts as late, for the outage guard.
const LATE: (u32, u32) = (2, 3);

/// What a look at the clocks found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// These expire now (maybe none).
    Expire(Vec<Overdue>),
    /// More than half are late at once: none expires.
    Suspended { late: usize, total: usize },
}

impl Leases {
    /// Starts the clock of every registration in `state` at `now`.
    /// `lease` zero: leases are off.
    pub fn new(lease: Duration, state: &DesiredState, now: Instant) -> Leases {
        let lease = Some(lease).filter(|l| !l.is_zero());
        let mut renewed: HashMap<u16, HashMap<NodeName, Instant>> = HashMap::new();
        if lease.is_some() {
            for (port, fe) in &state.frontends {
                let clocks = renewed.entry(*port).or_default();
                for node in fe.servers.keys() {
                    clocks.insert(node.clone(), now);
                }
            }
        }
        Leases {
            lease,
            renewed,
            heard: HashMap::new(),
            suspended: false,
        }
    }

    pub fn enabled(&self) -> bool {
        self.lease.is_some()
    }

    /// A heartbeat this agent received (`now_ms`: the same moment as Unix milliseconds).
    pub fn heard(&mut self, frontend_port: u16, node: &NodeName, now: Instant, now_ms: u64) {
        if self.lease.is_some() {
            self.heard
                .entry(frontend_port)
                .or_default()
                .insert(node.clone(), (now_ms, now));
        }
        self.renew(frontend_port, node, now);
    }

    /// Heartbeats another agent received, each counted as renewed when its news arrives
    /// (`now`) less the age its writer gave it: the time it spent in etcd's hands is counted
    /// as renewed, so never earlier than it was, whatever the two VMs' clocks say. A clock
    /// never moves back.
    pub fn merge(&mut self, renewals: &[Renewal], now: Instant) {
        if self.lease.is_none() {
            return;
        }
        for r in renewals {
            let at = now
                .checked_sub(Duration::from_millis(r.age_ms))
                .unwrap_or(now);
            let clocks = self.renewed.entry(r.port).or_default();
            match clocks.get_mut(&r.node) {
                Some(t) => *t = (*t).max(at),
                // One this agent has no clock for yet (its registration may not have arrived):
                // a new lease from now, as for a registration, never one already overdue.
                None => {
                    clocks.insert(r.node.clone(), now);
                }
            }
        }
    }

    /// The heartbeats this agent received since the last call, taken out: what it publishes
    /// for the expiring agent. (`give_back` returns them when they could not be sent.)
    pub fn take_heard(&mut self) -> Vec<Renewal> {
        let mut out: Vec<Renewal> = std::mem::take(&mut self.heard)
            .into_iter()
            .flat_map(|(port, nodes)| {
                nodes.into_iter().map(move |(node, (at_ms, at))| Renewal {
                    port,
                    node,
                    at_ms,
                    age_ms: 0,
                    heard_at: Some(at),
                })
            })
            .collect();
        out.sort_by(|a, b| (a.port, &a.node).cmp(&(b.port, &b.node)));
        out
    }

    /// Heartbeats [`Self::take_heard`] gave that could not be sent, to go with the next ones.
    pub fn give_back(&mut self, renewals: Vec<Renewal>) {
        for r in renewals {
            let Some(heard_at) = r.heard_at else { continue };
            let newest = self.heard.entry(r.port).or_default().entry(r.node);
            let at = newest.or_insert((r.at_ms, heard_at));
            if heard_at > at.1 {
                *at = (r.at_ms, heard_at);
            }
        }
    }

    pub fn renew(&mut self, frontend_port: u16, node: &NodeName, now: Instant) {
        if self.lease.is_some() {
            let clocks = self.renewed.entry(frontend_port).or_default();
            match clocks.get_mut(node) {
                Some(at) => *at = now,
                None => {
                    clocks.insert(node.clone(), now);
                }
            }
        }
    }

    /// Whether expiry is suspended, as of the last [`Leases::check`].
    pub fn suspended(&self) -> bool {
        self.suspended
    }

    /// Which registrations of `state` are overdue at `now`, unless more than half of them are
    /// late.
    /// Forgets the clocks of registrations `state` no longer has, and starts one at `now` for a
    /// registration it has not seen (one that came back through a rollback or the store).
    pub fn check(&mut self, state: &DesiredState, now: Instant) -> Verdict {
        let Some(lease) = self.lease else {
            return Verdict::Expire(Vec::new());
        };
        self.renewed
            .retain(|port, clocks| match state.frontends.get(port) {
                Some(fe) => {
                    clocks.retain(|node, _| fe.servers.contains_key(node));
                    true
                }
                None => false,
            });
        let late_after = lease * LATE.0 / LATE.1;
        let mut total = 0;
        let mut late = 0;
        let mut overdue = Vec::new();
        for (port, fe) in &state.frontends {
            let clocks = self.renewed.entry(*port).or_default();
            for (node, spec) in &fe.servers {
                // Registered for good (`"lease": false`): neither expires nor counts.
                if !spec.lease {
                    continue;
                }
                total += 1;
                let renewed = match clocks.get(node) {
                    Some(at) => *at,
                    None => *clocks.entry(node.clone()).or_insert(now),
                };
                let silent_for = now.saturating_duration_since(renewed);
                late += usize::from(silent_for > late_after);
                if silent_for > lease {
                    overdue.push(Overdue {
                        frontend_port: *port,
                        node: node.clone(),
                        silent_for,
                    });
                }
            }
        }
        let was_suspended = self.suspended;
        self.suspended = late * 2 > total;
        if self.suspended {
            return Verdict::Suspended { late, total };
        }
        if was_suspended && !overdue.is_empty() {
            // Back from an outage: the still silent get one more lease before they expire.
            for o in &overdue {
                if let Some(at) = self
                    .renewed
                    .get_mut(&o.frontend_port)
                    .and_then(|c| c.get_mut(&o.node))
                {
                    *at = now;
                }
            }
            overdue.clear();
        }
        Verdict::Expire(overdue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServerState;

    fn state(nodes: &[&str]) -> DesiredState {
        let servers: Vec<_> = nodes
            .iter()
            .map(|n| (*n, "10.0.0.1", 30443, ServerState::Ready, None))
            .collect();
        crate::model::state_of(&servers)
    }

    fn nodes(v: &Verdict) -> Vec<&str> {
        match v {
            Verdict::Expire(list) => list.iter().map(|o| o.node.as_str()).collect(),
            Verdict::Suspended { .. } => panic!("suspended: {v:?}"),
        }
    }

    #[test]
    fn a_silent_registration_expires_and_a_renewed_one_stays() {
        let st = state(&["a", "b", "c"]);
        let t0 = Instant::now();
        let mut leases = Leases::new(Duration::from_secs(10), &st, t0);
        assert!(nodes(&leases.check(&st, t0 + Duration::from_secs(6))).is_empty());
        leases.renew(
            443,
            &NodeName::new("b").unwrap(),
            t0 + Duration::from_secs(8),
        );
        leases.renew(
            443,
            &NodeName::new("c").unwrap(),
            t0 + Duration::from_secs(8),
        );
        let v = leases.check(&st, t0 + Duration::from_secs(11));
        assert_eq!(nodes(&v), ["a"]);
        let Verdict::Expire(list) = v else {
            unreachable!()
        };
        assert_eq!(list[0].silent_for, Duration::from_secs(11));
        assert!(!leases.suspended());
    }

    #[test]
    fn another_agents_renewal_counts_from_its_arrival_less_its_age() {
        let st = state(&["a", "b"]);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut leases = Leases::new(s(10), &st, t0);
        let renewal = |node: &str, age: u64| Renewal {
            port: 443,
            node: NodeName::new(node).unwrap(),
            at_ms: 0,
            age_ms: age * 1000,
            heard_at: None,
        };
        // Both arrive at 8 s: a was heard just now, b 7 s before (held back by an outage).
        leases.merge(&[renewal("a", 0), renewal("b", 7)], t0 + s(8));
        // At 12 s b (renewed at 1 s) is overdue, a (at 8 s) is not.
        assert_eq!(nodes(&leases.check(&st, t0 + s(12))), ["b"]);
    }

    #[test]
    fn more_than_half_late_at_once_expires_none_until_renewals_return() {
        let st = state(&["a", "b", "c", "d"]);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut leases = Leases::new(s(30), &st, t0);
        // An outage: renewals stop at spread-out moments (a, b, c at 0, 5, 10 s), d goes on.
        let renew =
            |l: &mut Leases, n: &str, at: u64| l.renew(443, &NodeName::new(n).unwrap(), t0 + s(at));
        renew(&mut leases, "b", 5);
        renew(&mut leases, "c", 10);
        renew(&mut leases, "d", 25);
        // At 21 s only a is late (over 20 s): nothing is overdue, nothing suspended.
        assert!(nodes(&leases.check(&st, t0 + s(21))).is_empty());
        assert!(!leases.suspended());
        // At 31 s a is overdue, but a, b and c are late: 3 of 4, suspended before a expires.
        renew(&mut leases, "d", 30);
        assert_eq!(
            leases.check(&st, t0 + s(31)),
            Verdict::Suspended { late: 3, total: 4 }
        );
        assert!(leases.suspended());
        // Long after, c comes back: 2 of 4 late is not more than half. The silent a and b get
        // a new lease instead of expiring at once...
        renew(&mut leases, "c", 100);
        renew(&mut leases, "d", 100);
        assert!(nodes(&leases.check(&st, t0 + s(100))).is_empty());
        assert!(!leases.suspended());
        // ...and expire when it runs out, c and d renewing.
        renew(&mut leases, "c", 125);
        renew(&mut leases, "d", 125);
        assert_eq!(nodes(&leases.check(&st, t0 + s(131))), ["a", "b"]);
    }

    #[test]
    fn off_forgotten_and_new_registrations() {
        let st = state(&["a", "b"]);
        let t0 = Instant::now();
        let mut off = Leases::new(Duration::ZERO, &st, t0);
        assert!(!off.enabled());
        assert!(nodes(&off.check(&st, t0 + Duration::from_secs(1000))).is_empty());
        let mut leases = Leases::new(Duration::from_secs(10), &state(&["a"]), t0);
        // "b" is first seen at the check: its clock starts there, it is not overdue.
        assert!(nodes(&leases.check(&st, t0 + Duration::from_secs(5))).is_empty());
        leases.renew(
            443,
            &NodeName::new("b").unwrap(),
            t0 + Duration::from_secs(30),
        );
        assert_eq!(
            nodes(&leases.check(&st, t0 + Duration::from_secs(30))),
            ["a"]
        );
        // A registration deleted meanwhile is forgotten.
        leases.check(&state(&["b"]), t0 + Duration::from_secs(31));
        assert_eq!(leases.renewed.values().map(HashMap::len).sum::<usize>(), 1);
    }
}
