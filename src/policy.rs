//! Policy: which frontend ports, node ports and node addresses a request may use, and how many
//! servers a frontend may hold. A request outside policy is refused (403) naming the rule.
//!
//! - here: the global policy (the `--allow-*` flags) and its port and address lists;
//! - [`scope`]: what one key may do, narrowing the global policy; [`node_glob`]: its node-name
//!   patterns.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

pub mod node_glob;
pub mod scope;

pub use node_glob::NodeGlob;
pub use scope::{check_scope, Scope};

/// A set of ports written `80,443,8000-9000`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortList {
    ranges: Vec<(u16, u16)>,
    text: String,
}

impl PortList {
    pub fn contains(&self, port: u16) -> bool {
        self.ranges.iter().any(|(a, b)| (*a..=*b).contains(&port))
    }

    /// Every port in `self` except those in `except`.
    pub fn without(&self, except: &[u16]) -> PortList {
        let mut ranges = Vec::new();
        for &(a, b) in &self.ranges {
            let mut start = a;
            let mut holes: Vec<u16> = except
                .iter()
                .copied()
                .filter(|p| (a..=b).contains(p))
                .collect();
            holes.sort_unstable();
            holes.dedup();
            for h in holes {
                if h > start {
                    ranges.push((start, h - 1));
                }
                start = h.saturating_add(1);
                if h == u16::MAX {
                    start = 0;
                    break;
                }
            }
            if start != 0 && start <= b {
                ranges.push((start, b));
            }
        }
        let text = format!(
            "{} except {}",
            self.text,
            except
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        PortList { ranges, text }
    }
}

impl FromStr for PortList {
    type Err = String;
    fn from_str(s: &str) -> Result<PortList, String> {
        let port = |t: &str| crate::runtime::validate::port("port", t).map_err(|e| e.to_string());
        let mut ranges = Vec::new();
        for item in s.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(format!("empty item in port list {s:?}"));
            }
            let (a, b) = match item.split_once('-') {
                Some((a, b)) => (port(a)?, port(b)?),
                None => {
                    let p = port(item)?;
                    (p, p)
                }
            };
            if a > b {
                return Err(format!("range {item:?} goes backwards"));
            }
            ranges.push((a, b));
        }
        Ok(PortList {
            ranges,
            text: s.to_string(),
        })
    }
}

impl fmt::Display for PortList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A set of address prefixes written `10.0.0.0/8,2001:db8::/32`; empty means any address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrList {
    nets: Vec<IpNet>,
}

impl CidrList {
    pub fn any() -> CidrList {
        CidrList::default()
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.nets.is_empty() || self.nets.iter().any(|n| n.contains(ip))
    }

    /// Whether it holds every address (written `""` or `"any"`).
    pub fn is_any(&self) -> bool {
        self.nets.is_empty()
    }
}

impl FromStr for CidrList {
    type Err = String;
    fn from_str(s: &str) -> Result<CidrList, String> {
        if s.trim().is_empty() || s.trim() == "any" {
            return Ok(CidrList::any());
        }
        let nets = s
            .split(',')
            .map(|t| {
                t.trim()
                    .parse::<IpNet>()
                    .map_err(|_| format!("{:?} is not an address prefix like 10.0.0.0/8", t.trim()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CidrList { nets })
    }
}

impl fmt::Display for CidrList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nets.is_empty() {
            return f.write_str("any");
        }
        let parts: Vec<String> = self.nets.iter().map(|n| n.to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

/// The rules every change is checked against.
#[derive(Clone, Debug)]
pub struct Policy {
    pub frontend_ports: PortList,
    pub node_ports: PortList,
    pub node_cidrs: CidrList,
    pub max_servers_per_frontend: usize,
}

/// A refused request: which rule, in words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    pub rule: &'static str,
    pub message: String,
}

impl Policy {
    /// The defaults: frontend ports 1–65535 except 22 and the agent's own, node ports
    /// 30000–32767 (Kubernetes NodePorts), any address, 1,000 servers per frontend.
    pub fn defaults(agent_port: u16) -> Policy {
        Policy {
            frontend_ports: "1-65535"
                .parse::<PortList>()
                .expect("valid")
                .without(&[22, agent_port]),
            node_ports: "30000-32767".parse().expect("valid"),
            node_cidrs: CidrList::any(),
            max_servers_per_frontend: 1000,
        }
    }

    pub fn check_frontend_port(&self, port: u16) -> Result<(), Denied> {
        if self.frontend_ports.contains(port) {
            Ok(())
        } else {
            Err(Denied {
                rule: "allow-frontend-ports",
                message: format!(
                    "frontend port {port} is not allowed (allow-frontend-ports: {})",
                    self.frontend_ports
                ),
            })
        }
    }

    /// Checks a frontend's health-check port: a port on the nodes (Kubernetes' health check
    /// node port is one of the NodePorts), so `allow-node-ports` bounds it too.
    pub fn check_check_port(&self, check_port: u16) -> Result<(), Denied> {
        if self.node_ports.contains(check_port) {
            Ok(())
        } else {
            Err(Denied {
                rule: "allow-node-ports",
                message: format!(
                    "check port {check_port} is not allowed (allow-node-ports: {})",
                    self.node_ports
                ),
            })
        }
    }

    /// Checks a server: its node port and address, and the frontend's server cap given how
    /// many servers it would then hold.
    pub fn check_server(
        &self,
        node_ip: &IpAddr,
        node_port: u16,
        servers_after: usize,
    ) -> Result<(), Denied> {
        if !self.node_ports.contains(node_port) {
            return Err(Denied {
                rule: "allow-node-ports",
                message: format!(
                    "node port {node_port} is not allowed (allow-node-ports: {})",
                    self.node_ports
                ),
            });
        }
        if !self.node_cidrs.contains(node_ip) {
            return Err(Denied {
                rule: "allow-node-cidrs",
                message: format!(
                    "node address {node_ip} is not allowed (allow-node-cidrs: {})",
                    self.node_cidrs
                ),
            });
        }
        if servers_after > self.max_servers_per_frontend {
            return Err(Denied {
                rule: "max-servers-per-frontend",
                message: format!(
                    "the frontend would hold {servers_after} servers, over the cap of {}",
                    self.max_servers_per_frontend
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists() {
        let l: PortList = "80,443,8000-9000".parse().unwrap();
        assert!(l.contains(80) && l.contains(8500) && !l.contains(81) && !l.contains(9001));
        for bad in ["", "0", "70000", "a", "9-1", "80,,443", "1-"] {
            assert!(bad.parse::<PortList>().is_err(), "{bad:?}");
        }
        let all = "1-65535"
            .parse::<PortList>()
            .unwrap()
            .without(&[22, 9900, 65535, 1]);
        assert!(
            !all.contains(22) && !all.contains(9900) && !all.contains(65535) && !all.contains(1)
        );
        assert!(all.contains(2) && all.contains(21) && all.contains(23) && all.contains(65534));
    }

    #[test]
    fn cidr_lists() {
        let l: CidrList = "10.0.0.0/8,2001:db8::/32".parse().unwrap();
        assert!(l.contains(&"10.1.2.3".parse().unwrap()));
        assert!(l.contains(&"2001:db8::1".parse().unwrap()));
        assert!(!l.contains(&"192.0.2.1".parse().unwrap()));
        assert!(CidrList::any().contains(&"192.0.2.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<CidrList>().is_err());
        assert!("nope".parse::<CidrList>().is_err());
    }

    #[test]
    fn policy_names_the_rule() {
        let p = Policy::defaults(9900);
        assert_eq!(
            p.check_frontend_port(22).unwrap_err().rule,
            "allow-frontend-ports"
        );
        assert_eq!(
            p.check_frontend_port(9900).unwrap_err().rule,
            "allow-frontend-ports"
        );
        assert!(p.check_frontend_port(443).is_ok());
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(
            p.check_server(&ip, 80, 1).unwrap_err().rule,
            "allow-node-ports"
        );
        assert!(p.check_server(&ip, 30443, 1).is_ok());
        assert!(p.check_check_port(32123).is_ok());
        let e = p.check_check_port(22).unwrap_err();
        assert_eq!(e.rule, "allow-node-ports");
        assert!(e.message.starts_with("check port 22 "), "{e:?}");
        assert_eq!(
            p.check_server(&ip, 30443, 1001).unwrap_err().rule,
            "max-servers-per-frontend"
        );
        let strict = Policy {
            node_cidrs: "10.0.0.0/8".parse().unwrap(),
            ..p
        };
        let e = strict.check_server(&ip, 30443, 1).unwrap_err();
        assert_eq!(e.rule, "allow-node-cidrs");
        assert!(e.message.contains("203.0.113.7"));
    }
}
