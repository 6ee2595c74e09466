//! The servers' state handed from the serving worker to the next across a reload: just before
//! the reload, `show servers state` goes to the file HAProxy's `server-state-file` names, and a
//! new worker whose backends have `load-server-state-from-file global` starts each server in
//! the health state the old one had (DOWN stays DOWN, with its last check's result and age),
//! instead of UP until its first check says otherwise.
//!
//! HAProxy matches a row by backend and server name only (not by id: the ids of servers added
//! at runtime differ from those the rewritten file gives them), and applies it on top of the
//! config. The row's address is not applied to a server with a literal address, but its port
//! is, over the config's, and its admin state is weighed against the config's `disabled`. So
//! the rows of the agent's own backends are adjusted to the desired state first
//! ([`for_new_worker`]): a server whose address or port differs from the desired one gets no
//! row (a new address starts fresh, its old health says nothing), and every row carries the
//! admin flags that make the new worker start the server as desired. Other backends' rows (an
//! operator's, in attached mode) go as HAProxy wrote them.
//!
//! The file is a hand-over for one reload, not a record: once the master has dealt with the
//! reload it is cleared to a state file without servers ([`ServerStateFile::clear`]), so a
//! later restart, or a reload by someone else, never starts from a state that has gone stale.
//! Cleared rather than removed: HAProxy 2.6 warns at every start about a missing or empty file
//! (3.0 on only notes it), and a `zero-warning` config would then refuse to start; a file that
//! holds only the format version is loaded without a word. Saving never holds a reload up: a
//! failure is logged and the new worker starts as it would without the file.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::files::write_atomic;
use super::{HaproxyError, Result};
use crate::model::{backend_name, DesiredState, FrontendSpec, ServerState};
use crate::render::starts_disabled;
use crate::runtime::parse::AdminFlags;
use crate::runtime::{self, ClientOptions, Command, Endpoint, RuntimeClient};

/// A state file without servers: the format version alone.
const NO_SERVERS: &str = "1\n";

/// Deadline of the `show servers state` call: a worker that does not answer this fast is not
/// worth holding the reload for.
const SAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The `server-state-file` the agent writes before each reload, and the admin socket of the
/// worker it asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerStateFile {
    path: PathBuf,
    admin: Endpoint,
}

impl ServerStateFile {
    pub fn new(path: PathBuf, admin: Endpoint) -> ServerStateFile {
        ServerStateFile { path, admin }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the serving worker's state, adjusted to `desired`, to the file. Never fails: a
    /// failure is logged and leaves the file without servers, so the new worker starts as it
    /// would without one.
    pub async fn save(&self, desired: &DesiredState) {
        match self.try_save(desired).await {
            Ok(rows) => tracing::info!(
                path = %self.path.display(),
                rows,
                "saved the servers' state for the new worker"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not save the servers' state; the new worker starts without it");
                self.clear().await;
            }
        }
    }

    async fn try_save(&self, desired: &DesiredState) -> Result<usize> {
        let mut client = RuntimeClient::new(
            self.admin.clone(),
            ClientOptions {
                timeout: SAVE_TIMEOUT,
                ..ClientOptions::default()
            },
        );
        let command = Command::ShowServersState(None);
        let failed = |source| HaproxyError::Runtime {
            what: format!("saving the servers' state to {}", self.path.display()),
            source,
        };
        let reply = client.execute(&command).await.map_err(failed)?;
        let saved = reply.outcome.text.clone();
        reply.into_result().map_err(failed)?;
        let (text, rows) = for_new_worker(&saved, desired)
            .map_err(|e| failed(runtime::Error::parse(&command.to_string(), e, &saved)))?;
        write_atomic(&self.path, &text).await?;
        Ok(rows)
    }

    /// Leaves the file holding no server (once a reload is over, and at a start): HAProxy
    /// loads nothing from it, and says nothing. A failure is logged.
    pub async fn clear(&self) {
        if let Err(e) = write_atomic(&self.path, NO_SERVERS).await {
            tracing::warn!(error = %e, "could not clear the servers' state; a later start may load an old one");
        }
    }
}

/// The admin flags a state-file row must carry for a server rendered for `state` to start in
/// `state`, by HAProxy's rules (`srv_state_srv_update`): when the row's CMAINT differs from
/// the config's `disabled`, the config wins; when they agree, the row's FMAINT decides
/// maintenance, and its FDRAIN then sets drain on a server that is not in maintenance.
fn admin_flags_for(state: ServerState) -> u32 {
    let configured = if starts_disabled(state) {
        AdminFlags::CMAINT
    } else {
        0
    };
    configured
        | match state {
            ServerState::Ready => 0,
            ServerState::Drain => AdminFlags::FDRAIN,
            ServerState::Maint => AdminFlags::FMAINT,
        }
}

/// `saved`, a `show servers state` answer, as the state file for a new worker of the config
/// rendered from `desired`, and how many server rows it holds. See the module doc for what
/// changes in the agent's backends. Fails on an answer in an unknown format: better no file
/// than one HAProxy reads differently.
pub fn for_new_worker(
    saved: &str,
    desired: &DesiredState,
) -> std::result::Result<(String, usize), String> {
    let mut lines = saved.lines().filter(|l| !l.trim().is_empty());
    let version = lines.next().unwrap_or_default().trim();
    if version != "1" {
        return Err(format!(
            "expected the state format version `1` on the first line, got {version:?}"
        ));
    }
    let mut out = String::from("1\n");
    let Some(head) = lines.next() else {
        // No backend has a server.
        return Ok((out, 0));
    };
    let names: Vec<&str> = match head.strip_prefix('#') {
        Some(h) => h.split_whitespace().collect(),
        None => return Err(format!("expected a `# be_id ...` header, got {head:?}")),
    };
    let col = |name: &str| {
        names
            .iter()
            .position(|c| *c == name)
            .ok_or_else(|| format!("the header lacks {name}"))
    };
    let (be, srv, addr, admin, port, check_port) = (
        col("be_name")?,
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_admin_state")?,
        col("srv_port")?,
        col("srv_check_port")?,
    );
    out.push_str(head.trim_end());
    out.push('\n');
    let ours: BTreeMap<String, &FrontendSpec> = desired
        .frontends
        .iter()
        .map(|(&p, fe)| (backend_name(p).as_str().to_string(), &**fe))
        .collect();
    let mut rows = 0;
    for line in lines {
        let mut fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < names.len() {
            return Err(format!(
                "a row has {} fields, the header names {}: {line:?}",
                fields.len(),
                names.len()
            ));
        }
        let flags;
        let wanted_check_port;
        if let Some(fe) = ours.get(fields[be]) {
            let spec = fe.servers.iter().find(|(n, _)| n.as_str() == fields[srv]);
            let Some((_, spec)) = spec else {
                continue;
            };
            let same_addr = fields[addr].parse::<IpAddr>().ok() == Some(spec.node_ip);
            let same_port = fields[port].parse::<u16>().ok() == Some(spec.node_port);
            if !(same_addr && same_port) {
                continue;
            }
            flags = admin_flags_for(spec.state).to_string();
            fields[admin] = &flags;
            // A row's check port wins over the config's, even over a `port` written there;
            // 0 leaves the config's. The new config says the frontend's check port now.
            wanted_check_port = fe.settings.check.port.unwrap_or(0).to_string();
            fields[check_port] = &wanted_check_port;
        }
        out.push_str(&fields.join(" "));
        out.push('\n');
        rows += 1;
    }
    Ok((out, rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mode, NodeName, ServerSpec};

    const HEADER: &str = "# be_id be_name srv_id srv_name srv_addr srv_op_state \
        srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status \
        srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id \
        srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr \
        srv_agent_addr srv_agent_port";

    fn row(be: &str, id: u32, name: &str, addr: &str, op: u8, admin: u32, port: u16) -> String {
        format!("3 {be} {id} {name} {addr} {op} {admin} 1 1 42 8 2 0 6 0 0 0 - {port} - 0 0 - - 0")
    }

    fn desired(servers: &[(&str, &str, u16, ServerState)]) -> DesiredState {
        let mut st = DesiredState::default();
        let fe = std::sync::Arc::make_mut(
            st.frontends.entry(443).or_insert(
                FrontendSpec {
                    mode: Mode::Tcp,
                    settings: Default::default(),
                    servers: Default::default(),
                }
                .into(),
            ),
        );
        for (node, ip, port, state) in servers {
            fe.servers.insert(
                NodeName::new(node).unwrap(),
                ServerSpec {
                    node_ip: ip.parse().unwrap(),
                    node_port: *port,
                    state: *state,
                    service: None,
                    weight: None,
                    lease: true,
                },
            );
        }
        st
    }

    #[test]
    fn the_agents_rows_follow_the_desired_state() {
        let saved = [
            "1".to_string(),
            HEADER.to_string(),
            // DOWN, ready: kept, health and all.
            row("be_443", 1, "node-a", "10.0.0.1", 0, 0, 30443),
            // Set to drain at runtime on a server the file started `disabled` (12), or added
            // at runtime and drained (8): both must carry CMAINT | FDRAIN.
            row("be_443", 2, "node-b", "10.0.0.2", 2, 8, 30443),
            // Maintenance.
            row("be_443", 3, "node-c", "10.0.0.3", 2, 5, 30443),
            // Loaded `disabled`, set ready since (CMAINT alone): ready now.
            row("be_443", 4, "node-d", "10.0.0.4", 2, 4, 30443),
            // Moved to another address, another port: no row, a fresh start.
            row("be_443", 5, "node-e", "10.0.0.5", 0, 0, 30443),
            row("be_443", 6, "node-f", "10.0.0.6", 0, 0, 30443),
            // Gone from the desired state, and a backend the agent no longer has: no row / as is.
            row("be_443", 7, "node-g", "10.0.0.7", 0, 0, 30443),
            // An operator's backend: as HAProxy wrote it, flags and all.
            row("app", 1, "web1", "192.0.2.1", 0, 1, 80),
            row("be_8080", 1, "old", "192.0.2.2", 0, 1, 80),
        ]
        .join("\n")
            + "\n\n";
        let st = desired(&[
            ("node-a", "10.0.0.1", 30443, ServerState::Ready),
            ("node-b", "10.0.0.2", 30443, ServerState::Drain),
            ("node-c", "10.0.0.3", 30443, ServerState::Maint),
            ("node-d", "10.0.0.4", 30443, ServerState::Ready),
            ("node-e", "10.0.0.50", 30443, ServerState::Ready),
            ("node-f", "10.0.0.6", 31443, ServerState::Ready),
        ]);
        let (text, rows) = for_new_worker(&saved, &st).unwrap();
        let expected = [
            "1".to_string(),
            HEADER.to_string(),
            row("be_443", 1, "node-a", "10.0.0.1", 0, 0, 30443),
            row("be_443", 2, "node-b", "10.0.0.2", 2, 12, 30443),
            row("be_443", 3, "node-c", "10.0.0.3", 2, 5, 30443),
            row("be_443", 4, "node-d", "10.0.0.4", 2, 0, 30443),
            row("app", 1, "web1", "192.0.2.1", 0, 1, 80),
            row("be_8080", 1, "old", "192.0.2.2", 0, 1, 80),
        ]
        .join("\n")
            + "\n";
        assert_eq!(text, expected);
        assert_eq!(rows, 6);
    }

    /// HAProxy applies a row's check port over the config's own `port`: the row must say the
    /// frontend's check port as the new config does (0: the config's, the traffic port).
    #[test]
    fn rows_carry_the_frontends_check_port() {
        let saved = format!(
            "1\n{HEADER}\n{}\n",
            row("be_443", 1, "node-a", "10.0.0.1", 2, 0, 30443)
                .replace(" 0 0 - - 0", " 0 32123 - - 0")
        );
        assert!(saved.contains(" 32123 "), "{saved}");
        let mut st = desired(&[("node-a", "10.0.0.1", 30443, ServerState::Ready)]);
        let (text, _) = for_new_worker(&saved, &st).unwrap();
        assert_eq!(
            text.lines().nth(2),
            Some(row("be_443", 1, "node-a", "10.0.0.1", 2, 0, 30443).as_str())
        );
        std::sync::Arc::make_mut(st.frontends.get_mut(&443).unwrap())
            .settings
            .check
            .port = Some(32124);
        let (text, _) = for_new_worker(&saved, &st).unwrap();
        assert!(
            text.lines().nth(2).unwrap().ends_with(" 0 32124 - - 0"),
            "{text}"
        );
    }

    #[test]
    fn ipv6_addresses_compare_as_addresses() {
        let saved = format!(
            "1\n{HEADER}\n{}\n",
            row("be_443", 1, "node-a", "2001:db8:0::1", 0, 0, 30443)
        );
        let st = desired(&[("node-a", "2001:db8::1", 30443, ServerState::Ready)]);
        assert_eq!(for_new_worker(&saved, &st).unwrap().1, 1);
    }

    #[test]
    fn every_versions_answer_is_understood() {
        for fixture in [
            include_str!("../../proto-fixtures/2.6.12-1+deb12u4/show-servers-state.txt"),
            include_str!("../../proto-fixtures/2.8.0/show-servers-state.txt"),
            include_str!("../../proto-fixtures/3.0.11-1+deb13u4/show-servers-state.txt"),
            include_str!("../../proto-fixtures/3.2.26-1/show-servers-state.txt"),
        ] {
            let want = runtime::parse::parse_servers_state(fixture).unwrap().len();
            let (text, rows) = for_new_worker(fixture, &DesiredState::default()).unwrap();
            assert_eq!(rows, want, "{fixture}");
            // No backend of the agent's: the rows go through as they were.
            assert_eq!(
                runtime::parse::parse_servers_state(&text).unwrap().len(),
                want
            );
        }
    }

    #[test]
    fn an_unknown_format_saves_nothing() {
        let st = DesiredState::default();
        assert!(for_new_worker("", &st).unwrap_err().contains("version"));
        assert!(for_new_worker("2\n# be_name\n", &st)
            .unwrap_err()
            .contains("version `1`"));
        assert!(for_new_worker("1\nbe_id be_name\n", &st)
            .unwrap_err()
            .contains("header"));
        assert!(for_new_worker("1\n# be_id be_name srv_name\n", &st)
            .unwrap_err()
            .contains("lacks srv_addr"));
        let short = format!("1\n{HEADER}\n3 be_443 1 node-a\n");
        assert!(for_new_worker(&short, &st).unwrap_err().contains("fields"));
        assert_eq!(
            for_new_worker("1\n", &st).unwrap(),
            ("1\n".to_string(), 0),
            "no server at all"
        );
    }
}
