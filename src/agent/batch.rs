//! Runtime batches to HAProxy, and the wait for the addresses they set.
//!
//! From HAProxy 2.9 on, `set server addr` answers before it applies: the change is queued for a
//! task that applies it moments later, and meanwhile `show servers state` still shows the old
//! address, and a second `set server addr` is compared with the old address (going back to it
//! answers `nothing changed`, and the queued change then wins). So a batch is sent in parts in
//! which no server's address is set twice, and after each part the agent waits until HAProxy
//! shows the addresses it took; then whatever comes next (the next part, the answer, a
//! comparison that puts back a change the store refused) sees what HAProxy really has. That is
//! one more round trip for each part that moves a server, more when the first look comes too
//! early. Before 2.9 (by `show info`'s version) an address applies at once and is not waited
//! for.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::ops::Range;

use super::*;
use crate::runtime::parse::ServerState as ObservedServer;
use crate::runtime::{Name, Reply, ServerRef};

/// How long HAProxy gets to apply the addresses of one batch (all its parts) before the agent
/// goes on without them and compares again on the next tick.
const SETTLE_DEADLINE: Duration = Duration::from_secs(1);
/// Looks again at once this many times: HAProxy's task usually runs within microseconds, and
/// the shortest timer pause (1 ms, often 2) would be most of a change's time.
const SETTLE_QUICK_LOOKS: u32 = 3;
/// The longest pause between two later looks; the first is 1 ms.
const SETTLE_POLL_MAX: Duration = Duration::from_millis(50);

/// Whether a HAProxy applies `set server addr` after answering: from 2.9 on (HAProxy's
/// `server_atomic_sync` task), and when `show info` does not tell its version.
pub(super) fn applies_addresses_later(info: &crate::runtime::parse::Info) -> bool {
    info.version()
        .and_then(crate::runtime::parse::version_branch)
        .is_none_or(|branch| branch >= (2, 9))
}

/// Where a batch is cut: before each command that sets the address of a server whose address
/// an earlier command of the same part set.
pub(super) fn address_parts(commands: &[Command]) -> Vec<Range<usize>> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut moved: HashSet<&ServerRef> = HashSet::new();
    for (i, c) in commands.iter().enumerate() {
        if let Command::SetServerAddr { server, .. } = c {
            if !moved.insert(server) {
                parts.push(start..i);
                start = i;
                moved.clear();
                moved.insert(server);
            }
        }
    }
    if start < commands.len() {
        parts.push(start..commands.len());
    }
    parts
}

/// The address (and port, when sent) each server of a part should show once HAProxy applied
/// it: the servers whose `set server addr` HAProxy took, unless a later command of the part
/// deleted the server or added it again (`add server` applies at once).
fn addresses_taken(
    commands: &[Command],
    replies: &[Reply],
) -> HashMap<ServerRef, (IpAddr, Option<u16>)> {
    let mut wanted = HashMap::new();
    for (c, r) in commands.iter().zip(replies) {
        if !r.outcome.is_success() {
            continue;
        }
        match c {
            Command::SetServerAddr { server, addr, port } => {
                wanted.insert(server.clone(), (*addr, *port));
            }
            Command::DelServer(server) | Command::AddServer { server, .. } => {
                wanted.remove(server);
            }
            _ => {}
        }
    }
    wanted
}

/// Whether HAProxy's rows show `want` for `server`; a server it no longer lists has nothing to
/// wait for.
fn shows(
    rows: &HashMap<(&str, &str), &ObservedServer>,
    server: &ServerRef,
    want: (IpAddr, Option<u16>),
) -> bool {
    let Some(row) = rows.get(&(server.backend.as_str(), server.server.as_str())) else {
        return true;
    };
    let addr = row.addr.as_deref().and_then(|a| a.parse::<IpAddr>().ok());
    addr == Some(want.0) && want.1.is_none_or(|p| row.port == Some(p))
}

/// Whether an error of the runtime client means HAProxy could not be reached (rather than an
/// answer it gave, or one the agent could not read).
fn unreachable(e: &crate::runtime::Error) -> bool {
    use crate::runtime::Error;
    !matches!(
        e,
        Error::Command { .. } | Error::Parse { .. } | Error::InvalidArgument { .. }
    )
}

/// How a wait for a part's addresses ended.
enum Settled {
    /// HAProxy shows them (or there was nothing to wait for).
    Shown,
    /// Not within the deadline, or HAProxy's answer did not tell: the state is marked out of
    /// sync, for the next tick to compare.
    GaveUp,
    /// HAProxy could not be reached.
    Lost(crate::runtime::Error),
}

impl Owner {
    /// Sends a batch and returns HAProxy's answer to each command, or `None` when it could not
    /// be reached. A refused command is logged and marks the state out of sync, for the timer
    /// to repair; a `del server` refused for the server's connections is neither (the caller
    /// starts its drain). Where HAProxy applies addresses late, returns once it shows those it
    /// took, or [`SETTLE_DEADLINE`] after the first part (see the module).
    pub(super) async fn send_batch(&mut self, commands: &[Command]) -> Option<Vec<Reply>> {
        let mut replies = Vec::with_capacity(commands.len());
        let deadline = Instant::now() + SETTLE_DEADLINE;
        let mut waiting = self.addresses_apply_later;
        for part in address_parts(commands) {
            let part = &commands[part];
            let answers = match self.client.batch(part).await {
                Ok(answers) => answers,
                Err(e) => {
                    self.transport_failed(&e);
                    return None;
                }
            };
            self.set_up(true);
            for r in &answers {
                if r.outcome.is_success() || r.outcome.is_server_in_use() {
                    continue;
                }
                tracing::warn!(command = %r.command, outcome = %r.outcome.kind, text = %r.outcome.text.trim_end(), "HAProxy refused a command");
                self.out_of_sync = true;
            }
            if waiting {
                match self.settle_addresses(part, &answers, deadline).await {
                    Settled::Shown => {}
                    // The parts after go unconfirmed; the tick compares.
                    Settled::GaveUp => waiting = false,
                    // As a batch broken off midway: the caller takes none of it as applied.
                    Settled::Lost(e) => {
                        self.transport_failed(&e);
                        return None;
                    }
                }
            }
            replies.extend(answers);
        }
        Some(replies)
    }

    /// Waits, until `deadline`, for HAProxy to show the addresses a part of a batch set.
    async fn settle_addresses(
        &mut self,
        commands: &[Command],
        replies: &[Reply],
        deadline: Instant,
    ) -> Settled {
        let mut wanted = addresses_taken(commands, replies);
        let mut pause = Duration::from_millis(1);
        let mut looks = 0;
        while !wanted.is_empty() {
            let backends: HashSet<&Name> = wanted.keys().map(|s| &s.backend).collect();
            let backends: Vec<Name> = backends.into_iter().cloned().collect();
            match self.client.show_servers_states(&backends).await {
                Ok(rows) => {
                    let rows: HashMap<(&str, &str), &ObservedServer> = rows
                        .iter()
                        .map(|r| ((r.backend.as_str(), r.server.as_str()), r))
                        .collect();
                    wanted.retain(|server, want| !shows(&rows, server, *want));
                }
                Err(e) if unreachable(&e) => return Settled::Lost(e),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot tell whether HAProxy applied the addresses of a batch; comparing again on the next tick");
                    self.out_of_sync = true;
                    return Settled::GaveUp;
                }
            }
            if wanted.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let servers: Vec<String> = wanted.keys().map(|s| s.to_string()).collect();
                tracing::warn!(?servers, after_ms = SETTLE_DEADLINE.as_millis() as u64, "HAProxy took new addresses but does not show them yet; comparing again on the next tick");
                self.out_of_sync = true;
                return Settled::GaveUp;
            }
            looks += 1;
            if looks > SETTLE_QUICK_LOOKS {
                tokio::time::sleep(pause.min(deadline - now)).await;
                pause = (pause * 2).min(SETTLE_POLL_MAX);
            }
        }
        Settled::Shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{Outcome, OutcomeKind};

    fn server(b: &str, s: &str) -> ServerRef {
        ServerRef::new(b, s).unwrap()
    }

    fn set_addr(b: &str, s: &str, ip: &str) -> Command {
        Command::SetServerAddr {
            server: server(b, s),
            addr: ip.parse().unwrap(),
            port: Some(80),
        }
    }

    fn reply(kind: OutcomeKind) -> Reply {
        Reply {
            command: String::new(),
            outcome: Outcome {
                kind,
                text: String::new(),
            },
        }
    }

    #[test]
    fn a_batch_is_cut_before_a_second_address_of_one_server() {
        let ready =
            Command::SetServerState(server("be_1", "a"), crate::runtime::ServerAdminState::Ready);
        let commands = vec![
            set_addr("be_1", "a", "10.0.0.1"),
            set_addr("be_1", "b", "10.0.0.2"),
            ready,
            set_addr("be_1", "a", "10.0.0.3"),
            set_addr("be_2", "a", "10.0.0.4"),
            set_addr("be_1", "a", "10.0.0.1"),
        ];
        assert_eq!(address_parts(&commands), vec![0..3, 3..5, 5..6]);
        assert_eq!(address_parts(&commands[..3]), vec![0..3]);
        assert!(address_parts(&[]).is_empty());
    }

    #[test]
    fn addresses_are_waited_for_from_2_9_and_when_the_version_is_unknown() {
        let info = |version: &str| {
            crate::runtime::parse::parse_show_info(&format!("Name: HAProxy\nVersion: {version}\n"))
                .unwrap()
        };
        assert!(!applies_addresses_later(&info("2.6.12-1+deb12u3")));
        assert!(!applies_addresses_later(&info("2.8.5")));
        assert!(applies_addresses_later(&info("2.9.1")));
        assert!(applies_addresses_later(&info("3.0.11-1+deb13u4")));
        assert!(applies_addresses_later(&info("3.2.26-1")));
        assert!(applies_addresses_later(&info("unknown")));
    }

    #[test]
    fn only_addresses_haproxy_took_and_kept_are_waited_for() {
        let commands = vec![
            set_addr("be_1", "a", "10.0.0.1"),
            set_addr("be_1", "b", "10.0.0.2"),
            set_addr("be_1", "c", "10.0.0.3"),
            Command::DelServer(server("be_1", "c")),
            set_addr("be_1", "d", "10.0.0.4"),
            // Refused (connections): the server stays, with its queued address.
            Command::DelServer(server("be_1", "d")),
        ];
        let replies = vec![
            reply(OutcomeKind::Success),
            reply(OutcomeKind::NotFound),
            reply(OutcomeKind::Success),
            reply(OutcomeKind::Success),
            reply(OutcomeKind::Success),
            reply(OutcomeKind::Refused),
        ];
        let wanted = addresses_taken(&commands, &replies);
        assert_eq!(wanted.len(), 2, "{wanted:?}");
        assert_eq!(
            wanted[&server("be_1", "a")],
            ("10.0.0.1".parse().unwrap(), Some(80))
        );
        assert!(wanted.contains_key(&server("be_1", "d")), "{wanted:?}");
    }
}
