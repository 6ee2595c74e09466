//! A key's scope: the frontend ports, node names and node addresses one key of the keys file
//! may change, and whether it may remove a whole frontend. Checked by the owner, against the
//! frontend as it is when the change applies (a frontend's delete removes every server on it),
//! before the global policy, which still applies: a scope only narrows what the `--allow-*`
//! flags allow, never widens it.

use std::net::IpAddr;

use super::{CidrList, Denied, NodeGlob, PortList};
use crate::model::{Change, FrontendSpec};

/// What a scoped key may do. Built from the key's table in the keys file.
#[derive(Clone, Debug)]
pub struct Scope {
    /// The key it belongs to: every refusal names it.
    pub key_id: String,
    /// The frontend ports it may create, change or read.
    pub frontend_ports: PortList,
    /// The node names it may register or remove; `None`: any.
    pub nodes: Option<NodeGlob>,
    /// The addresses its servers may point at; `None`: any the global policy allows.
    pub node_cidrs: Option<CidrList>,
    /// Whether it may remove a whole frontend (`DELETE /v1/frontends/{port}`).
    pub may_delete_frontend: bool,
}

impl Scope {
    /// Checks a change against the scope; a refusal names the key and the rule.
    ///
    /// A server is in scope when its frontend port and its node name are: deleting one needs
    /// nothing more, and a server put needs its address inside `node_cidrs` too. The addresses
    /// bound what the key can point traffic at; removing a server points nothing anywhere.
    ///
    /// `frontend`: the change's frontend as it is now. Removing it removes every server on it,
    /// so a key that may delete frontends may delete one only when every one of its servers'
    /// nodes is inside `nodes`: else a key limited to `node-*` could remove an operator's
    /// `edge-9` with the frontend.
    pub fn check(&self, change: &Change, frontend: Option<&FrontendSpec>) -> Result<(), Denied> {
        let port = change.frontend_port();
        if !self.frontend_ports.contains(port) {
            return Err(self.denied(
                "frontend_ports",
                format!(
                    "may not use frontend port {port} (its frontend_ports: {})",
                    self.frontend_ports
                ),
            ));
        }
        match change {
            Change::DeleteFrontend { .. } if !self.may_delete_frontend => Err(self.denied(
                "may_delete_frontend",
                format!(
                    "may not remove the whole frontend {port} (its may_delete_frontend is false); \
                     delete its servers one by one"
                ),
            )),
            // Only etcd's own changes replace a frontend; no key sends one, but none could
            // do more with it than remove the frontend.
            Change::DeleteFrontend { .. } | Change::ReplaceFrontend { .. } => {
                self.all_nodes_inside(frontend, &format!("remove the whole frontend {port}"))
            }
            // Settings apply to every server of the frontend: a key may change them only when
            // all those servers are its own, as for a removal.
            Change::PutFrontend { .. } => {
                self.all_nodes_inside(frontend, &format!("change the settings of frontend {port}"))
            }
            Change::DeleteServer { node, .. } => self.check_node(node.as_str()),
            Change::PutServer { node, spec, .. } => {
                self.check_node(node.as_str())?;
                self.check_address(&spec.node_ip)
            }
        }
    }

    /// Whether `GET /v1/frontends` shows this key the frontend on `port`.
    pub fn sees_frontend(&self, port: u16) -> bool {
        self.frontend_ports.contains(port)
    }

    /// Whether `GET /v1/frontends` shows this key the servers of `node` (on a frontend it
    /// sees). Not narrowed by `node_cidrs`: the key may delete such a server, so it sees it.
    pub fn sees_node(&self, node: &str) -> bool {
        self.nodes.as_ref().is_none_or(|g| g.is_match(node))
    }

    /// Every server of `frontend` (if it exists) is on a node inside `nodes`; `what` is what
    /// the key asked, for the message.
    fn all_nodes_inside(&self, frontend: Option<&FrontendSpec>, what: &str) -> Result<(), Denied> {
        let (Some(g), Some(fe)) = (&self.nodes, frontend) else {
            return Ok(());
        };
        match fe.servers.keys().find(|n| !g.is_match(n.as_str())) {
            Some(outside) => Err(self.denied(
                "nodes",
                format!(
                    "may not {what}: it holds node {:?}, outside its nodes ({g})",
                    outside.as_str()
                ),
            )),
            None => Ok(()),
        }
    }

    fn check_node(&self, node: &str) -> Result<(), Denied> {
        match &self.nodes {
            Some(g) if !g.is_match(node) => Err(self.denied(
                "nodes",
                format!("may not register or remove node {node:?} (its nodes: {g})"),
            )),
            _ => Ok(()),
        }
    }

    fn check_address(&self, ip: &IpAddr) -> Result<(), Denied> {
        match &self.node_cidrs {
            Some(c) if !c.contains(ip) => Err(self.denied(
                "node_cidrs",
                format!("may not point a server at {ip} (its node_cidrs: {c})"),
            )),
            _ => Ok(()),
        }
    }

    fn denied(&self, rule: &'static str, what: String) -> Denied {
        Denied {
            rule,
            message: format!("key {:?} {what}", self.key_id),
        }
    }
}

/// The scope check of a request against its frontend as it is now: nothing to check for an
/// unscoped key (`None`).
pub fn check_scope(
    scope: Option<&Scope>,
    change: &Change,
    frontend: Option<&FrontendSpec>,
) -> Result<(), Denied> {
    scope.map_or(Ok(()), |s| s.check(change, frontend))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mode, NodeName, ServerSpec, ServerState};

    fn scope() -> Scope {
        Scope {
            key_id: "mqtt-sidecar".into(),
            frontend_ports: "1883,8883".parse().unwrap(),
            nodes: Some("node-*".parse().unwrap()),
            node_cidrs: Some("10.0.0.0/8".parse().unwrap()),
            may_delete_frontend: false,
        }
    }

    fn put(port: u16, node: &str, ip: &str) -> Change {
        Change::PutServer {
            frontend_port: port,
            node: NodeName::new(node).unwrap(),
            mode: Mode::Tcp,
            spec: ServerSpec {
                node_ip: ip.parse().unwrap(),
                node_port: 31883,
                state: ServerState::Ready,
                service: None,
                weight: None,
                lease: true,
            },
            frontend: None,
        }
    }

    fn delete_server(port: u16, node: &str) -> Change {
        Change::DeleteServer {
            frontend_port: port,
            node: NodeName::new(node).unwrap(),
        }
    }

    fn refused(s: &Scope, change: &Change) -> Denied {
        let d = s.check(change, None).expect_err("outside the scope");
        assert!(d.message.starts_with("key \"mqtt-sidecar\" "), "{d:?}");
        assert!(d.message.contains(d.rule), "{d:?}");
        d
    }

    #[test]
    fn inside_the_scope_passes() {
        let s = scope();
        assert!(s.check(&put(1883, "node-a", "10.1.2.3"), None).is_ok());
        assert!(s.check(&put(8883, "node-b", "10.9.9.9"), None).is_ok());
        assert!(s.check(&delete_server(1883, "node-a"), None).is_ok());
        let may_delete = Scope {
            may_delete_frontend: true,
            ..scope()
        };
        assert!(may_delete
            .check(
                &Change::DeleteFrontend {
                    frontend_port: 1883
                },
                None
            )
            .is_ok());
    }

    #[test]
    fn each_rule_refuses_and_is_named() {
        let s = scope();
        let d = refused(&s, &put(443, "node-a", "10.1.2.3"));
        assert_eq!(d.rule, "frontend_ports");
        assert!(
            d.message.contains("443") && d.message.contains("1883,8883"),
            "{d:?}"
        );
        let d = refused(&s, &put(1883, "edge-1", "10.1.2.3"));
        assert_eq!(d.rule, "nodes");
        assert!(
            d.message.contains("edge-1") && d.message.contains("node-*"),
            "{d:?}"
        );
        let d = refused(&s, &put(1883, "node-a", "192.0.2.1"));
        assert_eq!(d.rule, "node_cidrs");
        assert!(d.message.contains("192.0.2.1") && d.message.contains("10.0.0.0/8"));
        let d = refused(
            &s,
            &Change::DeleteFrontend {
                frontend_port: 1883,
            },
        );
        assert_eq!(d.rule, "may_delete_frontend");
        // A server on another port or of another node may not be deleted either.
        assert_eq!(
            refused(&s, &delete_server(443, "node-a")).rule,
            "frontend_ports"
        );
        assert_eq!(refused(&s, &delete_server(1883, "edge-1")).rule, "nodes");
        // Even a key that may delete frontends may only delete its own ports'.
        let may_delete = Scope {
            may_delete_frontend: true,
            ..scope()
        };
        let d = refused(&may_delete, &Change::DeleteFrontend { frontend_port: 443 });
        assert_eq!(d.rule, "frontend_ports");
    }

    #[test]
    fn open_nodes_and_cidrs_and_what_is_visible() {
        let s = Scope {
            nodes: None,
            node_cidrs: None,
            ..scope()
        };
        assert!(s.check(&put(1883, "edge-1", "192.0.2.1"), None).is_ok());
        assert!(s.sees_node("anything"));
        let s = scope();
        assert!(s.sees_frontend(1883) && s.sees_frontend(8883) && !s.sees_frontend(443));
        assert!(s.sees_node("node-a") && !s.sees_node("edge-1"));
        assert!(check_scope(None, &put(443, "edge-1", "192.0.2.1"), None).is_ok());
        assert_eq!(
            check_scope(Some(&s), &put(443, "node-a", "10.0.0.1"), None)
                .unwrap_err()
                .rule,
            "frontend_ports"
        );
    }

    /// A key that may delete frontends, limited to `node-*`: it may remove a frontend whose
    /// servers are all its nodes', not one that also holds the operator's `edge-9`.
    #[test]
    fn deleting_a_frontend_needs_every_node_on_it_in_scope() {
        let s = Scope {
            may_delete_frontend: true,
            ..scope()
        };
        let mut fe = FrontendSpec::default();
        let add = |fe: &mut FrontendSpec, node: &str| {
            let Change::PutServer { node, spec, .. } = put(1883, node, "10.0.0.1") else {
                unreachable!()
            };
            fe.servers.insert(node, spec);
        };
        add(&mut fe, "node-a");
        add(&mut fe, "node-b");
        let delete = Change::DeleteFrontend {
            frontend_port: 1883,
        };
        assert!(s.check(&delete, Some(&fe)).is_ok());
        add(&mut fe, "edge-9");
        let d = s
            .check(&delete, Some(&fe))
            .expect_err("edge-9 is not the key's");
        assert_eq!(d.rule, "nodes");
        assert!(
            d.message.starts_with("key \"mqtt-sidecar\" ")
                && d.message.contains("\"edge-9\"")
                && d.message.contains("node-*"),
            "{d:?}"
        );
        // Settings reach every server: the same rule, without needing may_delete_frontend.
        let settings = Change::PutFrontend {
            frontend_port: 1883,
            mode: None,
            settings: Default::default(),
        };
        assert_eq!(
            scope().check(&settings, Some(&fe)).unwrap_err().rule,
            "nodes"
        );
        fe.servers.retain(|n, _| n.as_str() != "edge-9");
        assert!(scope().check(&settings, Some(&fe)).is_ok());
        assert!(scope().check(&settings, None).is_ok(), "a new frontend");
        let other_port = Change::PutFrontend {
            frontend_port: 443,
            mode: None,
            settings: Default::default(),
        };
        assert_eq!(
            scope().check(&other_port, None).unwrap_err().rule,
            "frontend_ports"
        );
    }
}
