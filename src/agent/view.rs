//! The read model of `GET /v1/frontends`: the desired state the owner last published, joined
//! with HAProxy's `show stat` read on a connection of the reader's own. A read never waits
//! behind the owner (a reload can take seconds) and never delays a change; `show stat` is
//! read at most once per reconcile interval however many ask, and not at all when nobody does.

use std::collections::HashMap;

use super::*;

/// HAProxy's last `show stat`, shared by every reader for up to `max_age`.
pub(super) struct Observer {
    max_age: Duration,
    cache: Mutex<StatCache>,
}

/// One `show stat`, or why it could not be read.
type StatRead = Result<Arc<Vec<StatRow>>, String>;

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

    /// The newest `show stat` no older than `max_age`, read now if there is none; concurrent
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
        let rows = cache
            .client
            .show_stat()
            .await
            .map(Arc::new)
            .map_err(|e| e.to_string());
        cache.client.disconnect();
        cache.last = Some((Instant::now(), rows.clone()));
        rows
    }

    /// The read model: `desired`, with what HAProxy reports of each frontend and server.
    pub(super) async fn view(&self, desired: &DesiredState) -> StateView {
        match self.stat().await {
            Ok(rows) => build(desired, &rows, true),
            Err(_) => build(desired, &[], false),
        }
    }
}

/// Joins the desired state with `show stat` rows (looked up by proxy and name: one pass over
/// the rows, not one per server).
fn build(desired: &DesiredState, rows: &[StatRow], up: bool) -> StateView {
    let by_name: HashMap<(&str, &str), &StatRow> = rows
        .iter()
        .map(|r| ((r.proxy.as_str(), r.name.as_str()), r))
        .collect();
    let frontends_up: HashMap<&str, &StatRow> = rows
        .iter()
        .filter(|r| r.kind == ProxyKind::Frontend)
        .map(|r| (r.proxy.as_str(), r))
        .collect();
    let frontends = desired
        .frontends
        .iter()
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
                servers: fe
                    .servers
                    .iter()
                    .map(|(node, spec)| ServerView {
                        node: node.to_string(),
                        node_ip: spec.node_ip.to_string(),
                        node_port: spec.node_port,
                        state: spec.state,
                        service: spec.service.clone(),
                        weight: spec.weight,
                        haproxy: by_name.get(&(be_name.as_str(), node.as_str())).map(|r| {
                            ObservedView {
                                status: r
                                    .status
                                    .as_ref()
                                    .map(|s| s.summary().to_string())
                                    .unwrap_or_default(),
                                check_status: r.check_status.clone(),
                                addr: r.addr.clone(),
                            }
                        }),
                    })
                    .collect(),
                backend: be_name,
            }
        })
        .collect();
    StateView {
        generation: desired.generation,
        haproxy: if up { "up" } else { "down" },
        frontends,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServerState;
    use crate::runtime::parse::parse_show_stat;

    #[test]
    fn joins_each_server_with_its_own_row_only() {
        let desired = crate::model::state_of(&[
            ("node-a", "10.0.0.1", 30443, ServerState::Ready, None),
            ("node-b", "10.0.0.1", 30443, ServerState::Ready, None),
        ]);
        // The operator's backend has a server called node-b too; HAProxy lacks our node-b.
        let rows = parse_show_stat(
            "# pxname,svname,status,check_status,addr,type\n\
             fe_443,FRONTEND,OPEN,,,0\n\
             be_443,node-a,UP,L4OK,10.0.0.1:30443,2\n\
             be_443,BACKEND,UP,,,1\n\
             ops,node-b,DOWN,L4CON,192.0.2.1:80,2\n",
        )
        .unwrap();
        let v = build(&desired, &rows, true);
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
        let down = build(&desired, &[], false);
        assert_eq!(down.haproxy, "down");
        assert!(down.frontends[0]
            .servers
            .iter()
            .all(|s| s.haproxy.is_none()));
    }
}
