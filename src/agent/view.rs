//! The read model of `GET /v1/frontends`: the desired state the owner last published, joined
//! with what HAProxy reports, read on a connection of the reader's own: `show servers state`
//! for the servers and the frontends' `show stat` rows (the whole `show stat` is about four
//! times the bytes and HAProxy's time at 10,000 servers, for the same status and check). A read
//! never waits behind the owner (a reload can take seconds) and never delays a change; HAProxy
//! is asked at most once per reconcile interval however many read, and not at all when nobody
//! does.

use std::collections::HashMap;

use super::*;
use crate::runtime::parse::ServerState as ObservedServer;

/// What HAProxy last reported, shared by every reader for up to `max_age`.
pub(super) struct Observer {
    max_age: Duration,
    cache: Mutex<StatCache>,
}

/// HAProxy's servers and frontends.
struct Observed {
    servers: Vec<ObservedServer>,
    frontends: Vec<StatRow>,
}

/// What HAProxy reported, or why it could not be read.
type StatRead = Result<Arc<Observed>, String>;

struct StatCache {
    client: RuntimeClient,
    /// When it was read, and what.
    last: Option<(Instant, StatRead)>,
}

impl Observer {
    pub(super) fn new(client: RuntimeClient, max_age: Duration) -> Observer {
        Observer {
            max_age,
            cache: Mutex::new(StatCache { client, last: None }),
        }
    }

    /// The newest report no older than `max_age`, read now if there is none; concurrent
    /// readers share one read.
    async fn stat(&self) -> StatRead {
        let mut cache = self.cache.lock().await;
        if let Some((at, rows)) = &cache.last {
            if at.elapsed() < self.max_age {
                return rows.clone();
            }
        }
        // A fresh connection each time: after a reload, an old one talks to the old worker.
        cache.client.disconnect();
        let rows = match cache.client.show_servers_state(None).await {
            Ok(servers) => cache
                .client
                .show_stat_frontends()
                .await
                .map(|frontends| Arc::new(Observed { servers, frontends })),
            Err(e) => Err(e),
        }
        .map_err(|e| e.to_string());
        cache.client.disconnect();
        cache.last = Some((Instant::now(), rows.clone()));
        rows
    }

    /// The read model: `desired`, with what HAProxy reports of each frontend and server; with
    /// a key's `scope`, only the frontends and servers that key may see.
    pub(super) async fn view(&self, desired: &DesiredState, scope: Option<&Scope>) -> StateView {
        match self.stat().await {
            Ok(o) => build(desired, &o.servers, &o.frontends, true, scope),
            Err(_) => build(desired, &[], &[], false, scope),
        }
    }
}

/// A server as HAProxy reports it, in `show stat`'s words.
fn observed_view(s: &ObservedServer) -> ObservedView {
    ObservedView {
        status: s.status_summary().to_string(),
        check_status: s.check_status_name(),
        addr: s.addr.as_ref().map(|a| match (a.contains(':'), s.port) {
            (false, Some(p)) => format!("{a}:{p}"),
            (true, Some(p)) => format!("[{a}]:{p}"),
            (_, None) => a.clone(),
        }),
    }
}

/// Joins the desired state with HAProxy's rows (looked up by name: one pass over the rows, not
/// one per server). A scope leaves out what its key may not see before anything is built, so
/// an unscoped read pays one test per frontend and per server, and a scoped one builds less.
fn build(
    desired: &DesiredState,
    servers: &[ObservedServer],
    frontends: &[StatRow],
    up: bool,
    scope: Option<&Scope>,
) -> StateView {
    let by_name: HashMap<(&str, &str), &ObservedServer> = servers
        .iter()
        .map(|s| ((s.backend.as_str(), s.server.as_str()), s))
        .collect();
    let frontends_up: HashMap<&str, &StatRow> = frontends
        .iter()
        .filter(|r| r.kind == ProxyKind::Frontend)
        .map(|r| (r.proxy.as_str(), r))
        .collect();
    let frontends = desired
        .frontends
        .iter()
        .filter(|(port, _)| scope.is_none_or(|s| s.sees_frontend(**port)))
        .map(|(port, fe)| {
            let fe_name = frontend_name(*port).to_string();
            let be_name = backend_name(*port).to_string();
            FrontendView {
                frontend_port: *port,
                haproxy_status: frontends_up
                    .get(fe_name.as_str())
                    .and_then(|r| r.status.as_ref().map(|s| s.summary().to_string())),
                frontend: fe_name,
                mode: fe.mode,
                settings: (&fe.settings).into(),
                servers: fe
                    .servers
                    .iter()
                    .filter(|(node, _)| scope.is_none_or(|s| s.sees_node(node.as_str())))
                    .map(|(node, spec)| ServerView {
                        node: node.to_string(),
                        node_ip: spec.node_ip.to_string(),
                        node_port: spec.node_port,
                        state: spec.state,
                        service: spec.service.clone(),
                        weight: spec.weight,
                        haproxy: by_name
                            .get(&(be_name.as_str(), node.as_str()))
                            .map(|s| observed_view(s)),
                    })
                    .collect(),
                backend: be_name,
            }
        })
        .collect();
    StateView {
        generation: desired.generation,
        haproxy: if up { "up" } else { "down" },
        store: None,
        frontends,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServerState;
    use crate::runtime::parse::{parse_servers_state, parse_show_stat};

    #[test]
    fn joins_each_server_with_its_own_row_only() {
        let desired = crate::model::state_of(&[
            ("node-a", "10.0.0.1", 30443, ServerState::Ready, None),
            ("node-b", "10.0.0.1", 30443, ServerState::Ready, None),
        ]);
        // The operator's backend has a server called node-b too; HAProxy lacks our node-b.
        let frontends = parse_show_stat(
            "# pxname,svname,status,check_status,addr,type\n\
             fe_443,FRONTEND,OPEN,,,0\n",
        )
        .unwrap();
        let servers = parse_servers_state(
            "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n\
             3 be_443 1 node-a 10.0.0.1 2 0 1 1 5 6 3 4 6 0 0 0 - 30443 - 0 0 - - 0\n\
             4 ops 1 node-b 192.0.2.1 0 0 1 1 5 8 2 0 6 0 0 0 - 80 - 0 0 - - 0\n",
        )
        .unwrap();
        let v = build(&desired, &servers, &frontends, true, None);
        assert_eq!(v.haproxy, "up");
        let fe = &v.frontends[0];
        assert_eq!(fe.haproxy_status.as_deref(), Some("OPEN"));
        let a = fe.servers[0].haproxy.as_ref().unwrap();
        assert_eq!(
            (
                a.status.as_str(),
                a.check_status.as_deref(),
                a.addr.as_deref()
            ),
            ("UP", Some("L4OK"), Some("10.0.0.1:30443"))
        );
        assert!(fe.servers[1].haproxy.is_none(), "{:?}", fe.servers[1]);
        let down = build(&desired, &[], &[], false, None);
        assert_eq!(down.haproxy, "down");
        assert!(down.frontends[0]
            .servers
            .iter()
            .all(|s| s.haproxy.is_none()));
    }

    #[test]
    fn a_scope_shows_its_ports_and_nodes_only() {
        let mut desired = crate::model::state_of(&[
            ("node-a", "10.0.0.1", 30443, ServerState::Ready, None),
            ("edge-1", "192.0.2.1", 30443, ServerState::Ready, None),
        ]);
        let fe = desired.frontends[&443].clone();
        desired.frontends.insert(1883, fe);
        let scope = crate::policy::Scope {
            key_id: "mqtt-sidecar".into(),
            frontend_ports: "1883".parse().unwrap(),
            nodes: Some("node-*".parse().unwrap()),
            // Not a filter of reads: the key may delete node-a wherever it points.
            node_cidrs: Some("198.51.100.0/24".parse().unwrap()),
            may_delete_frontend: false,
        };
        let all = build(&desired, &[], &[], true, None);
        assert_eq!(all.frontends.len(), 2);
        let v = build(&desired, &[], &[], true, Some(&scope));
        let ports: Vec<u16> = v.frontends.iter().map(|f| f.frontend_port).collect();
        assert_eq!(ports, [1883]);
        let nodes: Vec<&str> = v.frontends[0]
            .servers
            .iter()
            .map(|s| s.node.as_str())
            .collect();
        assert_eq!(nodes, ["node-a"]);
        assert_eq!(v.generation, all.generation);
    }
}
