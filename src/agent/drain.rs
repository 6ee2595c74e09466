//! Deletes that drain. A deleted server leaves the desired state at once, but HAProxy refuses
//! `del server` while it still carries connections (an MQTT client may stay for hours): such a
//! server stays in HAProxy in maintenance (no new connections), is deleted once idle, and past
//! the drain timeout its remaining connections are shut. Meanwhile it is not drift.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::model::ServerSpec;
use crate::runtime::{Command, ServerRef};

struct DrainingServer {
    since: Instant,
    /// What HAProxy holds, in maintenance: a PUT for the node before deletion starts from it.
    spec: Option<ServerSpec>,
    /// `shutdown sessions server` was sent.
    cut: bool,
}

/// The servers waiting for their last connection, by name.
#[derive(Default)]
pub(super) struct Draining {
    servers: HashMap<ServerRef, DrainingServer>,
}

impl Draining {
    /// Records a server whose `del server` was refused for its connections. `spec` is what
    /// HAProxy has (put in maintenance), when known.
    pub fn start(&mut self, server: ServerRef, spec: Option<ServerSpec>, now: Instant) {
        self.servers.entry(server).or_insert(DrainingServer {
            since: now,
            spec,
            cut: false,
        });
    }

    /// Takes a server out of draining because it is wanted again; returns what HAProxy has
    /// (`None` when it is not draining, or what it has is unknown).
    pub fn take_back(&mut self, server: &ServerRef) -> Option<ServerSpec> {
        self.servers.remove(server).and_then(|d| d.spec)
    }

    pub fn contains(&self, server: &ServerRef) -> bool {
        self.servers.contains_key(server)
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// A server that is gone from HAProxy: deleted, or dropped by a reload (the new worker
    /// starts from the file, which does not hold it).
    pub fn forget(&mut self, server: &ServerRef) {
        self.servers.remove(server);
    }

    /// Keeps only the servers `present` says HAProxy still has.
    pub fn retain(&mut self, present: impl Fn(&ServerRef) -> bool) {
        self.servers.retain(|s, _| present(s));
    }

    pub fn clear(&mut self) {
        self.servers.clear();
    }

    /// Names, sorted, for `/healthz`.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.servers.keys().map(|s| s.to_string()).collect();
        names.sort();
        names
    }

    /// This round's commands: `del server` for each (HAProxy deletes it once it is idle);
    /// first, once, `shutdown sessions server` for those draining longer than `timeout`.
    /// The cut ones are returned by name, for the log.
    pub fn commands(&mut self, now: Instant, timeout: Duration) -> (Vec<Command>, Vec<ServerRef>) {
        let mut commands = Vec::with_capacity(self.servers.len());
        let mut cut = Vec::new();
        for (server, d) in &mut self.servers {
            if !d.cut && now.saturating_duration_since(d.since) >= timeout {
                d.cut = true;
                commands.push(Command::ShutdownSessions(server.clone()));
                cut.push(server.clone());
            }
            commands.push(Command::DelServer(server.clone()));
        }
        (commands, cut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(c: &[Command]) -> Vec<String> {
        let mut v: Vec<String> = c.iter().map(|c| c.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn deletes_each_round_and_cuts_once_past_the_timeout() {
        let mut d = Draining::default();
        let t0 = Instant::now();
        let a = ServerRef::new("be_443", "node-a").unwrap();
        d.start(a.clone(), None, t0);
        // A second refusal does not restart the clock.
        d.start(a.clone(), None, t0 + Duration::from_secs(5));
        let timeout = Duration::from_secs(10);
        let (c, cut) = d.commands(t0 + Duration::from_secs(9), timeout);
        assert_eq!(wire(&c), ["del server be_443/node-a"]);
        assert!(cut.is_empty());
        let (c, cut) = d.commands(t0 + Duration::from_secs(10), timeout);
        assert_eq!(
            wire(&c),
            [
                "del server be_443/node-a",
                "shutdown sessions server be_443/node-a"
            ]
        );
        assert_eq!(cut, std::slice::from_ref(&a));
        let (c, _) = d.commands(t0 + Duration::from_secs(11), timeout);
        assert_eq!(wire(&c), ["del server be_443/node-a"]);
        assert_eq!(d.names(), ["be_443/node-a"]);
        d.forget(&a);
        assert!(d.is_empty());
    }
}
