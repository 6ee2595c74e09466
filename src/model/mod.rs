//! The desired state: which frontend ports exist and which nodes serve each, as the phone-home
//! sidecars asked. It is plain data with one way to change it ([`DesiredState::apply`]), so the
//! store can replay changes and the reconciler can compare it with what HAProxy reports.
//!
//! HAProxy names follow from it: frontend `fe_<port>`, backend `be_<port>`, server = the node.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::runtime::{Name, ServerAdminState, ServerRef};

pub mod settings;

pub use settings::{FrontendSettings, ProxyProtocol, SettingsChange};

/// A node name as the API accepts it: 1–63 characters of `[A-Za-z0-9._-]`, starting with a
/// letter or a digit. A subset of HAProxy's server-name rule, so it is always a valid [`Name`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

/// Why a value was refused, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidValue {
    pub field: &'static str,
    pub message: String,
}

impl InvalidValue {
    pub fn new(field: &'static str, message: impl Into<String>) -> InvalidValue {
        InvalidValue {
            field,
            message: message.into(),
        }
    }
}

impl NodeName {
    pub fn new(value: &str) -> Result<NodeName, InvalidValue> {
        let bad = |m: String| Err(InvalidValue::new("node", m));
        if value.is_empty() || value.len() > 63 {
            return bad(format!(
                "node name must be 1 to 63 characters, got {}",
                value.chars().count()
            ));
        }
        if let Some(c) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return bad(format!(
                "node name {value:?} contains {c:?}; allowed are letters, digits, '.', '_' and '-'"
            ));
        }
        if !value.as_bytes()[0].is_ascii_alphanumeric() {
            return bad(format!(
                "node name {value:?} must start with a letter or a digit"
            ));
        }
        Ok(NodeName(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeName {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        NodeName::new(&s)
    }
}

impl From<NodeName> for String {
    fn from(n: NodeName) -> String {
        n.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a service label (`traefik`, `mqtt`: shown by `lbctl`, never sent to HAProxy) as every
/// endpoint accepts it: 1–63 characters of `[A-Za-z0-9._-]`. `field` is the name the caller's
/// input gives it (`service`, the legacy body's `name`), and the message names it.
pub fn check_service_label(field: &'static str, value: &str) -> Result<(), InvalidValue> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidValue::new(
            field,
            format!(
                "{field} {value:?} must be 1 to 63 characters of letters, digits, '.', '_' and '-'"
            ),
        ))
    }
}

/// The proxy mode of a frontend and its backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Tcp,
    Http,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tcp => "tcp",
            Mode::Http => "http",
        }
    }
}

/// The administrative state a sidecar asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    #[default]
    Ready,
    Drain,
    Maint,
}

impl ServerState {
    pub fn admin(self) -> ServerAdminState {
        match self {
            ServerState::Ready => ServerAdminState::Ready,
            ServerState::Drain => ServerAdminState::Drain,
            ServerState::Maint => ServerAdminState::Maint,
        }
    }
}

/// One node serving a frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSpec {
    pub node_ip: IpAddr,
    pub node_port: u16,
    pub state: ServerState,
    /// A label for people (`traefik`, `mqtt`), shown by `lbctl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// 0–256; `None` leaves HAProxy's default (1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u16>,
    /// Whether the registration lives only as long as PUTs renew it (`--lease`). False for a
    /// sidecar that registers once (`lbctl phone-home --once`) and for the old webhook's
    /// sidecars, which never repeat: those stay until deleted.
    #[serde(default = "leased", skip_serializing_if = "is_leased")]
    pub lease: bool,
}

fn leased() -> bool {
    true
}

fn is_leased(lease: &bool) -> bool {
    *lease
}

/// A frontend port, its settings and the nodes behind it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendSpec {
    pub mode: Mode,
    /// Normalized ([`FrontendSettings::normalized`]); absent in states stored before settings.
    #[serde(default, skip_serializing_if = "FrontendSettings::is_default")]
    pub settings: FrontendSettings,
    pub servers: BTreeMap<NodeName, ServerSpec>,
}

/// Everything the agent has acknowledged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Counts applied changes; every acknowledged change gets a new one.
    pub generation: u64,
    /// Shared with the snapshot the agent publishes for readers (`GET /v1/frontends`, the
    /// config writer): publishing copies only this map, and the first change to a frontend
    /// after a publish copies that one frontend, not the whole state.
    pub frontends: BTreeMap<u16, Arc<FrontendSpec>>,
    /// With etcd as the store: the revision each frontend's value is at (and when each removed
    /// frontend was known gone), which guards a commit and tells a late watch event from a new
    /// one. Empty with the journal; never stored.
    #[serde(skip)]
    pub revisions: Revisions,
}

/// The etcd revisions a state is at, frontend by frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revisions {
    /// Frontends the state has: their value's mod revision.
    present: BTreeMap<u16, i64>,
    /// Frontends the state lacks: the revision at which they were known absent.
    absent: BTreeMap<u16, i64>,
}

impl Revisions {
    /// The mod revision of a frontend the state has, when known (`None`: absent, or created
    /// here and not stored yet).
    pub fn present(&self, port: u16) -> Option<i64> {
        self.present.get(&port).copied()
    }

    /// The newest revision known for `port`, present or absent.
    pub fn of(&self, port: u16) -> Option<i64> {
        self.present
            .get(&port)
            .or_else(|| self.absent.get(&port))
            .copied()
    }

    pub fn set_present(&mut self, port: u16, revision: i64) {
        self.absent.remove(&port);
        self.present.insert(port, revision);
    }

    pub fn set_absent(&mut self, port: u16, revision: i64) {
        self.present.remove(&port);
        self.absent.insert(port, revision);
    }

    /// Both records of `port`, to put back by [`Self::restore`].
    fn record(&self, port: u16) -> (Option<i64>, Option<i64>) {
        (
            self.present.get(&port).copied(),
            self.absent.get(&port).copied(),
        )
    }

    fn restore(&mut self, port: u16, (present, absent): (Option<i64>, Option<i64>)) {
        match present {
            Some(r) => self.present.insert(port, r),
            None => self.present.remove(&port),
        };
        match absent {
            Some(r) => self.absent.insert(port, r),
            None => self.absent.remove(&port),
        };
    }
}

/// One change a request asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    PutServer {
        frontend_port: u16,
        node: NodeName,
        mode: Mode,
        spec: ServerSpec,
        /// Settings given inline (`"frontend": {...}`): those of a frontend this creates, and
        /// for an existing one, values that must match its own ([`Conflict::Setting`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        frontend: Option<FrontendSettings>,
    },
    /// `PUT /v1/frontends/{port}`: creates the frontend with no servers, or changes its
    /// settings (all of them: what is not given is the default). `mode: None` keeps an existing
    /// frontend's mode and makes a new one tcp.
    PutFrontend {
        frontend_port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<Mode>,
        settings: FrontendSettings,
    },
    DeleteServer {
        frontend_port: u16,
        node: NodeName,
    },
    DeleteFrontend {
        frontend_port: u16,
    },
    /// A frontend as etcd has it at `revision` (another agent's commit, or a re-read): the
    /// whole frontend, or `None` for none. Applied only when newer than what the state has;
    /// never sent by a client, never stored.
    ReplaceFrontend {
        frontend_port: u16,
        spec: Option<Arc<FrontendSpec>>,
        revision: i64,
    },
}

impl Change {
    pub fn frontend_port(&self) -> u16 {
        match self {
            Change::PutServer { frontend_port, .. }
            | Change::PutFrontend { frontend_port, .. }
            | Change::DeleteServer { frontend_port, .. }
            | Change::DeleteFrontend { frontend_port }
            | Change::ReplaceFrontend { frontend_port, .. } => *frontend_port,
        }
    }

    /// The server the change is about, `None` for one about the whole frontend.
    pub fn node(&self) -> Option<&NodeName> {
        match self {
            Change::PutServer { node, .. } | Change::DeleteServer { node, .. } => Some(node),
            Change::PutFrontend { .. }
            | Change::DeleteFrontend { .. }
            | Change::ReplaceFrontend { .. } => None,
        }
    }

    /// Whether the two may touch the same thing: one frontend, and the same server or either
    /// about the whole frontend.
    pub fn overlaps(&self, other: &Change) -> bool {
        self.frontend_port() == other.frontend_port()
            && match (self.node(), other.node()) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// What applying a change did, which decides how HAProxy learns of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Already so: nothing to do.
    Unchanged,
    /// A change to servers of an existing frontend, or to settings the runtime API can set:
    /// runtime commands suffice.
    Runtime,
    /// A frontend appeared or went away, or a setting only the config file can say changed:
    /// the config must be rewritten and HAProxy reloaded.
    Reload,
}

/// Why a change cannot apply to the current state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("frontend {port} is in {existing} mode; this request asks for {requested} mode (a frontend's mode changes only by removing the frontend and making it again)")]
    Mode {
        port: u16,
        existing: &'static str,
        requested: &'static str,
    },
    /// Settings given inline with a server (`frontend.*`) differ from the frontend's.
    #[error("{field}: frontend {port} has {existing}; this request asks for {requested} (PUT /v1/frontends/{port} changes a frontend's settings)")]
    Setting {
        port: u16,
        /// By its path in the request: `frontend.check.port`.
        field: String,
        existing: String,
        requested: String,
    },
    #[error("no frontend on port {0}")]
    NoFrontend(u16),
    #[error("no server {node} on frontend {port}")]
    NoServer { port: u16, node: String },
}

/// A desired entry as the audit trail shows it: a server's spec, or a whole frontend (what a
/// frontend's removal takes away).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Entry {
    Server(ServerSpec),
    Frontend(Arc<FrontendSpec>),
    Settings(SettingsEntry),
}

/// A frontend's mode and settings, what `PUT /v1/frontends/{port}` changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SettingsEntry {
    pub mode: Mode,
    pub settings: FrontendSettings,
}

/// What one accepted change did to the entry it names; `None` where the entry is absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub before: Option<Entry>,
    pub after: Option<Entry>,
}

/// How to take back one applied change (when storing or applying it fails).
#[derive(Clone, Debug)]
pub enum Undo {
    /// Put the server's previous spec back (`None`: remove it), and remove the frontend if the
    /// change created it.
    Server {
        generation: u64,
        port: u16,
        node: NodeName,
        previous: Option<ServerSpec>,
        created_frontend: bool,
    },
    /// Put a frontend's previous settings back (`None`: remove it, the change created it).
    Settings {
        generation: u64,
        port: u16,
        previous: Option<FrontendSettings>,
    },
    /// Put a removed frontend back.
    Frontend {
        generation: u64,
        port: u16,
        previous: Arc<FrontendSpec>,
    },
    /// Put a replaced frontend (or its absence) back, with its revisions.
    Replace {
        generation: u64,
        port: u16,
        previous: Option<Arc<FrontendSpec>>,
        revisions: (Option<i64>, Option<i64>),
    },
}

impl DesiredState {
    /// Applies `change` and returns, with its effect, how to take it back.
    pub fn apply_with_undo(&mut self, change: &Change) -> Result<(Effect, Undo), Conflict> {
        let generation = self.generation;
        let port = change.frontend_port();
        let frontend = self.frontends.get(&port);
        let undo = match change {
            Change::PutServer { node, .. } | Change::DeleteServer { node, .. } => Undo::Server {
                generation,
                port,
                node: node.clone(),
                previous: frontend.and_then(|f| f.servers.get(node).cloned()),
                created_frontend: frontend.is_none(),
            },
            Change::PutFrontend { .. } => Undo::Settings {
                generation,
                port,
                previous: frontend.map(|f| f.settings.clone()),
            },
            Change::DeleteFrontend { .. } => Undo::Frontend {
                generation,
                port,
                previous: frontend.cloned().unwrap_or_default(),
            },
            Change::ReplaceFrontend { .. } => Undo::Replace {
                generation,
                port,
                previous: frontend.cloned(),
                revisions: self.revisions.record(port),
            },
        };
        let effect = self.apply(change)?;
        Ok((effect, undo))
    }

    /// The entry `change` names as it is now: its server's spec (a frontend's removal leaves
    /// nothing).
    pub fn entry_of(&self, change: &Change) -> Option<Entry> {
        match change {
            Change::PutServer { node, .. } | Change::DeleteServer { node, .. } => self
                .frontends
                .get(&change.frontend_port())
                .and_then(|f| f.servers.get(node))
                .cloned()
                .map(Entry::Server),
            Change::PutFrontend { frontend_port, .. } => {
                self.frontends.get(frontend_port).map(|f| {
                    Entry::Settings(SettingsEntry {
                        mode: f.mode,
                        settings: f.settings.clone(),
                    })
                })
            }
            Change::DeleteFrontend { frontend_port }
            | Change::ReplaceFrontend { frontend_port, .. } => self
                .frontends
                .get(frontend_port)
                .cloned()
                .map(Entry::Frontend),
        }
    }

    /// [`Self::apply_with_undo`], also saying what the change did to its entry.
    pub fn apply_with_transition(
        &mut self,
        change: &Change,
    ) -> Result<(Effect, Undo, Transition), Conflict> {
        let before = self.entry_of(change);
        let (effect, undo) = self.apply_with_undo(change)?;
        let after = self.entry_of(change);
        Ok((effect, undo, Transition { before, after }))
    }

    /// Takes back a change applied by [`Self::apply_with_undo`]; several are undone in
    /// reverse order.
    pub fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::Server {
                generation,
                port,
                node,
                previous,
                created_frontend,
            } => {
                self.generation = generation;
                if created_frontend {
                    self.frontends.remove(&port);
                    return;
                }
                let fe = Arc::make_mut(self.frontends.entry(port).or_default());
                match previous {
                    Some(spec) => {
                        fe.servers.insert(node, spec);
                    }
                    None => {
                        fe.servers.remove(&node);
                    }
                }
            }
            Undo::Settings {
                generation,
                port,
                previous,
            } => {
                self.generation = generation;
                match previous {
                    None => {
                        self.frontends.remove(&port);
                    }
                    Some(settings) => {
                        if let Some(fe) = self.frontends.get_mut(&port) {
                            Arc::make_mut(fe).settings = settings;
                        }
                    }
                }
            }
            Undo::Frontend {
                generation,
                port,
                previous,
            } => {
                self.generation = generation;
                self.frontends.insert(port, previous);
            }
            Undo::Replace {
                generation,
                port,
                previous,
                revisions,
            } => {
                self.generation = generation;
                match previous {
                    Some(fe) => self.frontends.insert(port, fe),
                    None => self.frontends.remove(&port),
                };
                self.revisions.restore(port, revisions);
            }
        }
    }

    /// How `change` would reach HAProxy if applied now, without applying it: whether it needs
    /// a reload (a new frontend, a removed one, a setting only the config can say) and, for a
    /// settings change, the field that needs it.
    pub fn reload_needed_for(&self, change: &Change) -> Option<&'static str> {
        let current = self.frontends.get(&change.frontend_port());
        match change {
            Change::PutServer { .. } => current.is_none().then_some("a new frontend"),
            Change::PutFrontend { settings, .. } => match current {
                None => Some("a new frontend"),
                Some(fe) => {
                    match settings::how_to_apply(&fe.settings, &settings.clone().normalized()) {
                        SettingsChange::Reload(field) => Some(field),
                        _ => None,
                    }
                }
            },
            Change::DeleteServer { .. } => None,
            Change::DeleteFrontend { .. } => Some("a removed frontend"),
            Change::ReplaceFrontend { spec, revision, .. } => {
                if self.revisions.of(change.frontend_port()) >= Some(*revision) {
                    return None;
                }
                match (current, spec) {
                    (None, None) => None,
                    (None, Some(_)) => Some("a new frontend"),
                    (Some(_), None) => Some("a removed frontend"),
                    (Some(old), Some(new)) if old.mode != new.mode => Some("mode"),
                    (Some(old), Some(new)) => {
                        match settings::how_to_apply(&old.settings, &new.settings) {
                            SettingsChange::Reload(field) => Some(field),
                            _ => None,
                        }
                    }
                }
            }
        }
    }

    /// Applies `change`, bumping the generation unless nothing changed.
    pub fn apply(&mut self, change: &Change) -> Result<Effect, Conflict> {
        let effect = match change {
            Change::PutServer {
                frontend_port,
                node,
                mode,
                spec,
                frontend,
            } => match self.frontends.get_mut(frontend_port) {
                Some(fe) => {
                    if fe.mode != *mode {
                        return Err(Conflict::Mode {
                            port: *frontend_port,
                            existing: fe.mode.as_str(),
                            requested: mode.as_str(),
                        });
                    }
                    if let Some(d) = frontend
                        .as_ref()
                        .and_then(|given| given.first_difference(&fe.settings))
                    {
                        return Err(Conflict::Setting {
                            port: *frontend_port,
                            field: format!("frontend.{}", d.field),
                            existing: d.existing,
                            requested: d.requested,
                        });
                    }
                    if fe.servers.get(node) == Some(spec) {
                        return Ok(Effect::Unchanged);
                    }
                    let fe = Arc::make_mut(fe);
                    fe.servers.insert(node.clone(), spec.clone());
                    Effect::Runtime
                }
                None => {
                    let mut fe = FrontendSpec {
                        mode: *mode,
                        settings: frontend.clone().unwrap_or_default().normalized(),
                        servers: BTreeMap::new(),
                    };
                    fe.servers.insert(node.clone(), spec.clone());
                    self.frontends.insert(*frontend_port, Arc::new(fe));
                    Effect::Reload
                }
            },
            Change::PutFrontend {
                frontend_port,
                mode,
                settings,
            } => {
                let settings = settings.clone().normalized();
                match self.frontends.get_mut(frontend_port) {
                    Some(fe) => {
                        if let Some(m) = mode.filter(|m| *m != fe.mode) {
                            return Err(Conflict::Mode {
                                port: *frontend_port,
                                existing: fe.mode.as_str(),
                                requested: m.as_str(),
                            });
                        }
                        let effect = match settings::how_to_apply(&fe.settings, &settings) {
                            SettingsChange::Unchanged => return Ok(Effect::Unchanged),
                            SettingsChange::Runtime => Effect::Runtime,
                            SettingsChange::Reload(_) => Effect::Reload,
                        };
                        Arc::make_mut(fe).settings = settings;
                        effect
                    }
                    None => {
                        let fe = FrontendSpec {
                            mode: mode.unwrap_or_default(),
                            settings,
                            servers: BTreeMap::new(),
                        };
                        self.frontends.insert(*frontend_port, Arc::new(fe));
                        Effect::Reload
                    }
                }
            }
            Change::DeleteServer {
                frontend_port,
                node,
            } => {
                let fe = self
                    .frontends
                    .get_mut(frontend_port)
                    .ok_or(Conflict::NoFrontend(*frontend_port))?;
                if !fe.servers.contains_key(node) {
                    return Err(Conflict::NoServer {
                        port: *frontend_port,
                        node: node.to_string(),
                    });
                }
                Arc::make_mut(fe).servers.remove(node);
                Effect::Runtime
            }
            Change::DeleteFrontend { frontend_port } => {
                if self.frontends.remove(frontend_port).is_none() {
                    return Err(Conflict::NoFrontend(*frontend_port));
                }
                Effect::Reload
            }
            Change::ReplaceFrontend {
                frontend_port,
                spec,
                revision,
            } => {
                let port = *frontend_port;
                if self.revisions.of(port) >= Some(*revision) {
                    // Late: the state knows a newer value already.
                    return Ok(Effect::Unchanged);
                }
                let reload = self.reload_needed_for(change).is_some();
                let current = self.frontends.get(&port);
                let same = match (current, spec) {
                    (Some(a), Some(b)) => **a == **b,
                    (None, None) => true,
                    _ => false,
                };
                match spec {
                    Some(fe) => {
                        self.frontends.insert(port, fe.clone());
                        self.revisions.set_present(port, *revision);
                    }
                    None => {
                        self.frontends.remove(&port);
                        self.revisions.set_absent(port, *revision);
                    }
                }
                if same {
                    // This agent's own commit coming back, or a value it already has.
                    return Ok(Effect::Unchanged);
                }
                if reload {
                    Effect::Reload
                } else {
                    Effect::Runtime
                }
            }
        };
        if effect != Effect::Unchanged {
            self.generation += 1;
        }
        Ok(effect)
    }

    /// Number of servers over all frontends.
    pub fn server_count(&self) -> usize {
        self.frontends.values().map(|f| f.servers.len()).sum()
    }
}

/// For unit tests: a state with `servers` (node, ip, port, state, weight) on tcp frontend 443.
#[cfg(test)]
pub(crate) fn state_of(servers: &[(&str, &str, u16, ServerState, Option<u16>)]) -> DesiredState {
    let mut st = DesiredState::default();
    for (node, ip, port, state, weight) in servers {
        st.apply(&Change::PutServer {
            frontend_port: 443,
            node: NodeName::new(node).unwrap(),
            mode: Mode::Tcp,
            spec: ServerSpec {
                node_ip: ip.parse().unwrap(),
                node_port: *port,
                state: *state,
                service: None,
                weight: *weight,
                lease: true,
            },
            frontend: None,
        })
        .unwrap();
    }
    st
}

/// `fe_<port>`
pub fn frontend_name(port: u16) -> Name {
    Name::new("frontend name", &format!("fe_{port}")).expect("fe_<digits> is a valid name")
}

/// `be_<port>`
pub fn backend_name(port: u16) -> Name {
    Name::new("backend name", &format!("be_{port}")).expect("be_<digits> is a valid name")
}

/// `be_<port>/<node>`
pub fn server_ref(port: u16, node: &NodeName) -> ServerRef {
    ServerRef {
        backend: backend_name(port),
        server: Name::new("server name", node.as_str()).expect("a NodeName is a valid Name"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ip: &str, port: u16) -> ServerSpec {
        ServerSpec {
            node_ip: ip.parse().unwrap(),
            node_port: port,
            state: ServerState::Ready,
            service: None,
            weight: None,
            lease: true,
        }
    }

    fn put(port: u16, node: &str, mode: Mode, s: ServerSpec) -> Change {
        Change::PutServer {
            frontend_port: port,
            node: NodeName::new(node).unwrap(),
            mode,
            spec: s,
            frontend: None,
        }
    }

    #[test]
    fn service_labels() {
        for ok in ["traefik", "a", "mqtt-1.b_c", &"x".repeat(63), "-x"] {
            assert!(check_service_label("service", ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a;b", "a\nb", "é", "a/b", &"x".repeat(64)] {
            let e = check_service_label("name", bad).unwrap_err();
            assert_eq!(e.field, "name");
            assert!(
                e.message.starts_with(&format!("name {bad:?} must be")),
                "{e}"
            );
        }
    }

    #[test]
    fn node_names() {
        for ok in ["node-a", "a", "1.b_c", &"x".repeat(63)] {
            assert!(NodeName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ";x",
            "a;b",
            "a\nb",
            "a b",
            "a/b",
            "a\\b",
            "a:b",
            "é",
            "-a",
            ".a",
            "_a",
            &"x".repeat(64),
        ] {
            let e = NodeName::new(bad).unwrap_err();
            assert_eq!(e.field, "node", "{bad:?}");
        }
    }

    #[test]
    fn apply_tracks_effects_and_generation() {
        let mut st = DesiredState::default();
        let a = put(443, "node-a", Mode::Tcp, spec("203.0.113.7", 30443));
        assert_eq!(st.apply(&a).unwrap(), Effect::Reload);
        assert_eq!(st.generation, 1);
        assert_eq!(st.apply(&a).unwrap(), Effect::Unchanged);
        assert_eq!(st.generation, 1);
        let moved = put(443, "node-a", Mode::Tcp, spec("203.0.113.8", 30443));
        assert_eq!(st.apply(&moved).unwrap(), Effect::Runtime);
        let b = put(443, "node-b", Mode::Tcp, spec("203.0.113.9", 30443));
        assert_eq!(st.apply(&b).unwrap(), Effect::Runtime);
        assert_eq!(st.server_count(), 2);
        let http = put(443, "node-c", Mode::Http, spec("203.0.113.9", 30443));
        assert!(matches!(st.apply(&http), Err(Conflict::Mode { .. })));
        let del = Change::DeleteServer {
            frontend_port: 443,
            node: NodeName::new("node-b").unwrap(),
        };
        assert_eq!(st.apply(&del).unwrap(), Effect::Runtime);
        assert!(matches!(st.apply(&del), Err(Conflict::NoServer { .. })));
        assert_eq!(
            st.apply(&Change::DeleteFrontend { frontend_port: 443 })
                .unwrap(),
            Effect::Reload
        );
        assert_eq!(st.generation, 5);
        assert!(st.frontends.is_empty());
    }

    #[test]
    fn undo_restores_exactly() {
        let mut st = DesiredState::default();
        st.apply(&put(443, "a", Mode::Tcp, spec("10.0.0.1", 30001)))
            .unwrap();
        st.apply(&put(443, "b", Mode::Tcp, spec("10.0.0.2", 30002)))
            .unwrap();
        let before = st.clone();
        let changes = [
            put(443, "a", Mode::Tcp, spec("10.0.0.9", 30009)),
            put(443, "c", Mode::Tcp, spec("10.0.0.3", 30003)),
            Change::DeleteServer {
                frontend_port: 443,
                node: NodeName::new("b").unwrap(),
            },
            put(80, "x", Mode::Http, spec("10.0.0.4", 30004)),
            Change::DeleteFrontend { frontend_port: 443 },
        ];
        let mut undos = Vec::new();
        for c in &changes {
            undos.push(st.apply_with_undo(c).unwrap().1);
        }
        assert_ne!(st, before);
        for u in undos.into_iter().rev() {
            st.undo(u);
        }
        assert_eq!(st, before);
    }

    #[test]
    fn changes_round_trip_through_json() {
        let c = put(8883, "node-a", Mode::Tcp, spec("2001:db8::1", 31883));
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Change>(&text).unwrap(), c);
        let bad = text.replace("node-a", "bad;name");
        assert!(serde_json::from_str::<Change>(&bad).is_err());
    }

    #[test]
    fn haproxy_names() {
        assert_eq!(frontend_name(443).as_str(), "fe_443");
        assert_eq!(
            server_ref(443, &NodeName::new("n1").unwrap()).to_string(),
            "be_443/n1"
        );
    }
}
