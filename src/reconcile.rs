//! The reconciler's planner: desired state against what HAProxy reports (`show servers state`)
//! gives the runtime commands that make HAProxy match, or says a reload is needed. Pure: no I/O,
//! so every rule is tested on plain data.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{
    backend_name, frontend_name, server_ref, DesiredState, FrontendSettings, FrontendSpec,
    ProxyProtocol, ServerSpec, ServerState,
};
use crate::runtime::parse::ServerState as ObservedServer;
use crate::runtime::{AddServerOptions, Command, SendProxy, ServerAdminState, ServerRef};

/// What must happen for HAProxy to match the desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Runtime commands, in order (for one server: add, enable health, set state).
    pub commands: Vec<Command>,
    /// Servers to remove: each is put in maintenance by `commands`, then deleted once it has no
    /// connections ([`Self::deletions`] are sent after `commands`).
    pub deletions: Vec<ServerRef>,
    /// Desired frontend ports whose backend HAProxy does not have: the config must be
    /// reloaded.
    pub missing_backends: Vec<u16>,
    /// Human-readable lines saying what differs, for logs and `/healthz`.
    pub drift: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty() && self.deletions.is_empty() && self.missing_backends.is_empty()
    }
}

/// Which admin state a server shows, from its `srv_admin_state` flags. The renderer writes a
/// drained server as `disabled`, so after a restart it carries the config-maintenance marker
/// (CMAINT) under its drain; [`AdminFlags::in_maintenance`] does not count that marker.
///
/// [`AdminFlags::in_maintenance`]: crate::runtime::parse::AdminFlags::in_maintenance
fn observed_state(s: &ObservedServer) -> ServerState {
    if s.admin.in_maintenance() {
        ServerState::Maint
    } else if s.admin.draining() {
        ServerState::Drain
    } else {
        ServerState::Ready
    }
}

/// Adds a command built by its checked constructor. A spec the checks refuse (a weight over
/// 256 from a hand-edited store) is logged and sends nothing; the API never accepts one.
fn push_checked(out: &mut Vec<Command>, command: crate::runtime::Result<Command>) -> bool {
    match command {
        Ok(c) => {
            out.push(c);
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "not sent to HAProxy: the desired state holds a value its checks refuse");
            false
        }
    }
}

fn state_command(server: ServerRef, state: ServerState) -> Command {
    Command::SetServerState(server, state.admin())
}

/// `add server`'s options for a server of a frontend with `settings`: a dynamic server
/// inherits nothing, so the frontend's PROXY version and check go on every one. Its checks
/// carry the PROXY header exactly when the same server's would from the config file (checks
/// to the traffic port), so a server that wants the header sees it on checks whether it was
/// added live or loaded at a reload.
pub fn add_options(spec: &ServerSpec, settings: &FrontendSettings) -> AddServerOptions {
    AddServerOptions {
        check_send_proxy: settings.proxy() != ProxyProtocol::None && settings.check.port.is_none(),
        check: true,
        check_port: settings.check.port,
        check_interval_ms: settings.check.interval.map(|i| i.as_millis()),
        rise: settings.check.rise,
        fall: settings.check.fall,
        send_proxy: match settings.proxy() {
            ProxyProtocol::None => SendProxy::Off,
            ProxyProtocol::V1 => SendProxy::V1,
            ProxyProtocol::V2 => SendProxy::V2,
        },
        weight: spec.weight,
        ..AddServerOptions::default()
    }
}

/// Commands for a server HAProxy does not have yet. A dynamic server starts in maintenance
/// with its checks off, so it needs `enable health` and a state.
fn add_commands(
    server: ServerRef,
    spec: &ServerSpec,
    settings: &FrontendSettings,
    out: &mut Vec<Command>,
) {
    let options = add_options(spec, settings);
    if !push_checked(
        out,
        Command::add_server(server.clone(), spec.node_ip, spec.node_port, options),
    ) {
        return;
    }
    out.push(Command::EnableHealth(server.clone()));
    if spec.state != ServerState::Maint {
        out.push(state_command(server, spec.state));
    }
}

/// Commands that take a server HAProxy has as `previous` (or does not have: `None`) to `spec`.
/// The request path uses this instead of asking HAProxy first; drift is the timer's job.
pub fn commands_for(
    server: &ServerRef,
    previous: Option<&ServerSpec>,
    spec: &ServerSpec,
    settings: &FrontendSettings,
) -> Vec<Command> {
    let mut out = Vec::new();
    let Some(prev) = previous else {
        add_commands(server.clone(), spec, settings, &mut out);
        return out;
    };
    if prev.node_ip != spec.node_ip || prev.node_port != spec.node_port {
        out.push(Command::SetServerAddr {
            server: server.clone(),
            addr: spec.node_ip,
            port: Some(spec.node_port),
        });
    }
    if prev.weight != spec.weight {
        // Back to HAProxy's default when the weight is no longer set.
        push_checked(
            &mut out,
            Command::set_weight(server.clone(), u32::from(spec.weight.unwrap_or(1))),
        );
    }
    if prev.state != spec.state {
        out.push(state_command(server.clone(), spec.state));
    }
    out
}

/// The runtime commands that take frontend `port` (as `fe` is now) from settings `old` to its
/// own, when [`crate::model::settings::how_to_apply`] says they can change live: the
/// frontend's `maxconn`, and every server's check port.
pub fn settings_commands(port: u16, fe: &FrontendSpec, old: &FrontendSettings) -> Vec<Command> {
    let mut out = Vec::new();
    let new = &fe.settings;
    if let (Some(n), true) = (new.maxconn, new.maxconn != old.maxconn) {
        out.push(Command::SetMaxconnFrontend(frontend_name(port), n));
    }
    if let (Some(p), true) = (new.check.port, new.check.port != old.check.port) {
        for node in fe.servers.keys() {
            push_checked(&mut out, Command::set_check_port(server_ref(port, node), p));
        }
    }
    out
}

/// Adds to `plan` what the frontends' `maxconn` needs, given `show stat`'s frontend rows: a
/// frontend whose session limit (`slim`) is not its desired `maxconn` gets `set maxconn
/// frontend` (a change HAProxy refused, or one the store then refused, is repaired so).
/// Frontends without a `maxconn` of their own are left as the config made them.
pub fn plan_maxconn(
    desired: &DesiredState,
    frontends: &[crate::runtime::parse::StatRow],
    plan: &mut Plan,
) {
    for (port, fe) in &desired.frontends {
        let Some(want) = fe.settings.maxconn else {
            continue;
        };
        let name = frontend_name(*port);
        let Some(row) = frontends.iter().find(|r| {
            r.proxy == name.as_str() && r.kind == crate::runtime::parse::ProxyKind::Frontend
        }) else {
            continue;
        };
        if row.sessions_limit != Some(u64::from(want)) {
            plan.drift.push(format!(
                "{name} has maxconn {}, wanted {want}",
                row.sessions_limit
                    .map_or_else(|| "-".to_string(), |l| l.to_string())
            ));
            plan.commands.push(Command::SetMaxconnFrontend(name, want));
        }
    }
}

/// Plans the runtime commands for `ports` (all desired frontends when `None`), given the
/// servers (`show servers state`) and the backend names (`show backend`) HAProxy reports.
/// Both are needed: `show servers state` does not list a backend that has no server.
///
/// Only backends named `be_<port>` of desired frontends are looked at: servers elsewhere
/// belong to the operator. Within those backends, a server that is not desired is removed.
pub fn plan(
    desired: &DesiredState,
    observed: &[ObservedServer],
    backends: &BTreeSet<String>,
    ports: Option<&BTreeSet<u16>>,
) -> Plan {
    let mut by_backend: BTreeMap<&str, BTreeMap<&str, &ObservedServer>> = BTreeMap::new();
    for s in observed {
        by_backend
            .entry(s.backend.as_str())
            .or_default()
            .insert(s.server.as_str(), s);
    }
    let none = BTreeMap::new();
    let mut plan = Plan::default();
    for (port, fe) in &desired.frontends {
        if ports.is_some_and(|p| !p.contains(port)) {
            continue;
        }
        let backend = backend_name(*port);
        if !backends.contains(backend.as_str()) && !by_backend.contains_key(backend.as_str()) {
            plan.missing_backends.push(*port);
            plan.drift.push(format!("{backend} is missing in HAProxy"));
            continue;
        }
        let present = by_backend.get(backend.as_str()).unwrap_or(&none);
        for (node, spec) in &fe.servers {
            let server = server_ref(*port, node);
            match present.get(node.as_str()) {
                None => {
                    plan.drift.push(format!("{server} is missing"));
                    add_commands(server, spec, &fe.settings, &mut plan.commands);
                }
                Some(obs) => {
                    let addr_ok = obs.addr.as_deref().and_then(|a| a.parse::<IpAddr>().ok())
                        == Some(spec.node_ip);
                    if !addr_ok || obs.port != Some(spec.node_port) {
                        plan.drift.push(format!(
                            "{server} is at {}:{}, wanted {}:{}",
                            obs.addr.as_deref().unwrap_or("-"),
                            obs.port.map_or_else(|| "-".to_string(), |p| p.to_string()),
                            spec.node_ip,
                            spec.node_port
                        ));
                        plan.commands.push(Command::SetServerAddr {
                            server: server.clone(),
                            addr: spec.node_ip,
                            port: Some(spec.node_port),
                        });
                    }
                    if let Some(w) = spec.weight {
                        if obs.user_weight != Some(u32::from(w)) {
                            plan.drift.push(format!(
                                "{server} has weight {:?}, wanted {w}",
                                obs.user_weight
                            ));
                            push_checked(
                                &mut plan.commands,
                                Command::set_weight(server.clone(), u32::from(w)),
                            );
                        }
                    }
                    // HAProxy shows the check port (0 when checks go to the traffic port).
                    if let (Some(want), Some(seen)) = (fe.settings.check.port, obs.check_port) {
                        if seen != want {
                            plan.drift
                                .push(format!("{server} checks port {seen}, wanted {want}"));
                            push_checked(
                                &mut plan.commands,
                                Command::set_check_port(server.clone(), want),
                            );
                        }
                    }
                    let now = observed_state(obs);
                    if now != spec.state {
                        plan.drift
                            .push(format!("{server} is {now:?}, wanted {:?}", spec.state));
                        plan.commands
                            .push(state_command(server.clone(), spec.state));
                    }
                }
            }
        }
        for (name, obs) in present {
            let wanted = fe.servers.keys().any(|n| n.as_str() == *name);
            if wanted {
                continue;
            }
            let Ok(server) = ServerRef::new(backend.as_str(), name) else {
                continue;
            };
            plan.drift.push(format!("{server} is not wanted"));
            // `del server` needs the server in maintenance first.
            if !obs.admin.in_maintenance() {
                plan.commands.push(Command::SetServerState(
                    server.clone(),
                    ServerAdminState::Maint,
                ));
            }
            plan.deletions.push(server);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::parse::{AdminFlags, OperState};

    fn desired(servers: &[(&str, &str, u16, ServerState, Option<u16>)]) -> DesiredState {
        crate::model::state_of(servers)
    }

    fn observed(server: &str, addr: &str, port: u16, admin: u32, weight: u32) -> ObservedServer {
        ObservedServer {
            backend_id: Some(3),
            backend: "be_443".into(),
            server_id: Some(1),
            server: server.into(),
            addr: Some(addr.into()),
            oper_state: Some(OperState::Running),
            admin: AdminFlags(admin),
            user_weight: Some(weight),
            initial_weight: Some(1),
            last_change_s: Some(1),
            check_status: None,
            check_result: None,
            check_health: None,
            check_state: None,
            agent_state: None,
            fqdn: None,
            port: Some(port),
            use_ssl: None,
            check_port: None,
        }
    }

    fn be() -> BTreeSet<String> {
        ["be_443".to_string()].into()
    }

    fn wire(plan: &Plan) -> Vec<String> {
        plan.commands.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn commands_from_previous_spec() {
        let server = ServerRef::new("be_443", "node-a").unwrap();
        let d = desired(&[("node-a", "10.0.0.1", 30443, ServerState::Ready, None)]);
        let spec = d.frontends[&443].servers.values().next().unwrap().clone();
        let added: Vec<String> = commands_for(&server, None, &spec, &Default::default())
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(added[0], "add server be_443/node-a 10.0.0.1:30443 check");
        assert!(commands_for(&server, Some(&spec), &spec, &Default::default()).is_empty());
        let moved = ServerSpec {
            node_ip: "10.0.0.2".parse().unwrap(),
            weight: Some(9),
            state: ServerState::Drain,
            ..spec.clone()
        };
        let cmds: Vec<String> = commands_for(&server, Some(&spec), &moved, &Default::default())
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            cmds,
            [
                "set server be_443/node-a addr 10.0.0.2 port 30443",
                "set server be_443/node-a weight 9",
                "set server be_443/node-a state drain"
            ]
        );
        let unweighted: Vec<String> = commands_for(
            &server,
            Some(&moved),
            &ServerSpec {
                weight: None,
                ..moved.clone()
            },
            &Default::default(),
        )
        .iter()
        .map(|c| c.to_string())
        .collect();
        assert_eq!(unweighted, ["set server be_443/node-a weight 1"]);
    }

    #[test]
    fn a_frontends_maxconn_is_compared_with_its_session_limit() {
        let mut d = desired(&[("node-a", "10.0.0.1", 30443, ServerState::Ready, None)]);
        let csv = |slim: u32| {
            format!("# pxname,svname,qcur,qmax,scur,smax,slim,stot,type\nfe_443,FRONTEND,,,0,0,{slim},0,0\nbe_443,BACKEND,0,0,0,0,1,0,1\n")
        };
        let rows = |slim| crate::runtime::parse::parse_show_stat(&csv(slim)).unwrap();
        let mut p = Plan::default();
        plan_maxconn(&d, &rows(2000), &mut p);
        assert!(p.is_empty(), "no maxconn of its own: left alone");
        std::sync::Arc::make_mut(d.frontends.get_mut(&443).unwrap())
            .settings
            .maxconn = Some(500);
        plan_maxconn(&d, &rows(500), &mut p);
        assert!(p.is_empty(), "{p:?}");
        plan_maxconn(&d, &rows(2000), &mut p);
        assert_eq!(wire(&p), ["set maxconn frontend fe_443 500"]);
        assert_eq!(p.drift, ["fe_443 has maxconn 2000, wanted 500"]);
    }

    #[test]
    fn added_servers_check_with_the_proxy_header_as_config_servers_do() {
        let server = ServerRef::new("be_443", "node-a").unwrap();
        let d = desired(&[("node-a", "10.0.0.1", 30443, ServerState::Ready, None)]);
        let spec = d.frontends[&443].servers.values().next().unwrap().clone();
        let add = |json: &str| {
            let settings: FrontendSettings = serde_json::from_str(json).unwrap();
            commands_for(&server, None, &spec, &settings)[0].to_string()
        };
        assert_eq!(
            add(r#"{"proxy_protocol":"v2"}"#),
            "add server be_443/node-a 10.0.0.1:30443 check send-proxy-v2 check-send-proxy"
        );
        assert_eq!(
            add(r#"{"proxy_protocol":"v1"}"#),
            "add server be_443/node-a 10.0.0.1:30443 check send-proxy check-send-proxy"
        );
        // Checks elsewhere than the traffic port go without it, as HAProxy does for the file.
        assert_eq!(
            add(r#"{"proxy_protocol":"v2","check":{"port":32123}}"#),
            "add server be_443/node-a 10.0.0.1:30443 check port 32123 send-proxy-v2"
        );
        assert_eq!(add("{}"), "add server be_443/node-a 10.0.0.1:30443 check");
    }

    #[test]
    fn in_sync_plans_nothing() {
        let d = desired(&[("node-a", "10.0.0.1", 30443, ServerState::Ready, Some(5))]);
        let o = [observed("node-a", "10.0.0.1", 30443, 0, 5)];
        let p = plan(&d, &o, &be(), None);
        assert!(p.is_empty(), "{p:?}");
        assert!(p.drift.is_empty());
    }

    #[test]
    fn new_server_is_added_checked_and_made_ready() {
        let d = desired(&[
            ("node-a", "10.0.0.1", 30443, ServerState::Ready, None),
            ("node-b", "10.0.0.2", 30443, ServerState::Ready, Some(7)),
        ]);
        let o = [observed("node-a", "10.0.0.1", 30443, 0, 1)];
        assert_eq!(
            wire(&plan(&d, &o, &be(), None)),
            [
                "add server be_443/node-b 10.0.0.2:30443 check weight 7",
                "enable health be_443/node-b",
                "set server be_443/node-b state ready",
            ]
        );
    }

    #[test]
    fn moved_reweighted_and_state_changes() {
        let d = desired(&[("node-a", "10.0.0.9", 31000, ServerState::Drain, Some(3))]);
        let o = [observed("node-a", "10.0.0.1", 30443, 0, 1)];
        let p = plan(&d, &o, &be(), None);
        assert_eq!(
            wire(&p),
            [
                "set server be_443/node-a addr 10.0.0.9 port 31000",
                "set server be_443/node-a weight 3",
                "set server be_443/node-a state drain",
            ]
        );
        assert_eq!(p.drift.len(), 3);
        // Maintenance from the config (`disabled`: flags 5) is not "ready".
        let d = desired(&[("node-a", "10.0.0.1", 30443, ServerState::Ready, None)]);
        let o = [observed("node-a", "10.0.0.1", 30443, 5, 1)];
        assert_eq!(
            wire(&plan(&d, &o, &be(), None)),
            ["set server be_443/node-a state ready"]
        );
        // IPv6 compares as an address, not as text.
        let d = desired(&[("node-a", "2001:db8::1", 30443, ServerState::Ready, None)]);
        let o = [observed("node-a", "2001:0db8:0::1", 30443, 0, 1)];
        assert!(plan(&d, &o, &be(), None).is_empty());
    }

    #[test]
    fn unwanted_server_goes_to_maintenance_then_deletion() {
        let d = desired(&[("node-a", "10.0.0.1", 30443, ServerState::Ready, None)]);
        let o = [
            observed("node-a", "10.0.0.1", 30443, 0, 1),
            observed("stale", "10.0.0.5", 30443, 0, 1),
            observed("gone", "10.0.0.6", 30443, 1, 1),
        ];
        let p = plan(&d, &o, &be(), None);
        assert_eq!(wire(&p), ["set server be_443/stale state maint"]);
        let dels: Vec<_> = p.deletions.iter().map(|s| s.to_string()).collect();
        assert_eq!(dels, ["be_443/gone", "be_443/stale"]);
    }

    #[test]
    fn config_maint_marker_alone_is_not_maintenance() {
        // HAProxy 2.6: a server the file starts `disabled` (flags 5) that was set to drain
        // shows 12 (CMAINT | FDRAIN, `show stat` says DRAIN); set ready, it shows 4 (UP).
        let d = desired(&[("node-a", "10.0.0.1", 30443, ServerState::Drain, None)]);
        let o = [observed("node-a", "10.0.0.1", 30443, 12, 1)];
        assert!(plan(&d, &o, &be(), None).is_empty());
        let d = desired(&[("node-a", "10.0.0.1", 30443, ServerState::Ready, None)]);
        let o = [observed("node-a", "10.0.0.1", 30443, 4, 1)];
        assert!(plan(&d, &o, &be(), None).is_empty());
        // An unwanted one is put in maintenance before `del server`, which requires it.
        let o = [
            observed("node-a", "10.0.0.1", 30443, 4, 1),
            observed("stale", "10.0.0.5", 30443, 12, 1),
        ];
        let p = plan(&d, &o, &be(), None);
        assert_eq!(wire(&p), ["set server be_443/stale state maint"]);
        assert_eq!(p.deletions.len(), 1);
    }

    #[test]
    fn missing_backend_needs_a_reload_and_scope_limits() {
        let d = desired(&[("node-a", "10.0.0.1", 30443, ServerState::Maint, None)]);
        let p = plan(&d, &[], &BTreeSet::new(), None);
        assert_eq!(p.missing_backends, [443]);
        assert!(p.commands.is_empty());
        let only_80: BTreeSet<u16> = [80].into();
        assert!(plan(&d, &[], &BTreeSet::new(), Some(&only_80)).is_empty());
        // An empty backend (all servers deleted) is there: servers are added, no reload.
        // A server in maintenance on purpose is added without `set server state`.
        assert_eq!(
            wire(&plan(&d, &[], &be(), None)),
            [
                "add server be_443/node-a 10.0.0.1:30443 check",
                "enable health be_443/node-a"
            ]
        );
    }
}
