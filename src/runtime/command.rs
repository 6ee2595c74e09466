//! Typed runtime commands and how each is written on the wire.
//!
//! A [`Command`] can only be built from checked values ([`Name`], [`ServerRef`], [`IpAddr`],
//! bounded numbers), so its wire form never carries `;`, a newline or a stray argument.

use std::fmt;
use std::net::IpAddr;

use super::error::Result;
use super::validate::{self, Name, ServerRef};

/// The state `set server B/S state` puts a server in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServerAdminState {
    /// Takes traffic.
    Ready,
    /// Keeps its connections and persistent sessions, takes no new ones.
    Drain,
    /// Takes nothing; health checks stop.
    Maint,
}

impl ServerAdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerAdminState::Ready => "ready",
            ServerAdminState::Drain => "drain",
            ServerAdminState::Maint => "maint",
        }
    }
}

impl std::str::FromStr for ServerAdminState {
    type Err = super::error::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ready" => Ok(ServerAdminState::Ready),
            "drain" => Ok(ServerAdminState::Drain),
            "maint" => Ok(ServerAdminState::Maint),
            _ => Err(super::error::Error::InvalidArgument {
                field: "state",
                value: s.to_string(),
                reason: "must be ready, drain or maint",
            }),
        }
    }
}

/// The PROXY protocol header a server is sent (`send-proxy`, `send-proxy-v2`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SendProxy {
    #[default]
    Off,
    V1,
    V2,
}

/// Options of `add server` beyond the address. A dynamic server inherits nothing from
/// `default-server`, so every one it needs is here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddServerOptions {
    /// Health-check the server (`check`); it then needs `enable health` after the add.
    pub check: bool,
    /// Where the checks go (`port`); `None`: the traffic port.
    pub check_port: Option<u16>,
    /// Between checks (`inter`), in milliseconds, 1 to 86,400,000.
    pub check_interval_ms: Option<u32>,
    /// Checks in a row to go up (`rise`) or down (`fall`), 1 to 100.
    pub rise: Option<u8>,
    pub fall: Option<u8>,
    pub send_proxy: SendProxy,
    /// Send the PROXY header on the health checks too (`check-send-proxy`). A server from the
    /// config file with `send-proxy` does so by itself while its checks go to the traffic port;
    /// one added at runtime only when told (2.6 to 3.2 alike).
    pub check_send_proxy: bool,
    /// Initial weight, 0–256.
    pub weight: Option<u16>,
    /// Start administratively disabled (every dynamic server already starts in maintenance;
    /// this keeps it there across `enable`-style operations).
    pub disabled: bool,
    /// Mark as a backup server.
    pub backup: bool,
}

/// One command of the runtime API (stats socket) or of the master CLI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    ShowInfo,
    ShowStat,
    /// `show stat -1 1 -1`: the frontends' rows only.
    ShowStatFrontends,
    ShowServersState(Option<Name>),
    ShowBackend,
    AddServer {
        server: ServerRef,
        addr: IpAddr,
        port: u16,
        options: AddServerOptions,
    },
    DelServer(ServerRef),
    /// `shutdown sessions server B/S`: closes the server's connections (a drain that timed out).
    ShutdownSessions(ServerRef),
    SetServerAddr {
        server: ServerRef,
        addr: IpAddr,
        port: Option<u16>,
    },
    SetServerState(ServerRef, ServerAdminState),
    SetServerWeight(ServerRef, u16),
    /// `set server B/S check-port N`: where the server's checks go from now on.
    SetServerCheckPort(ServerRef, u16),
    EnableHealth(ServerRef),
    DisableHealth(ServerRef),
    EnableFrontend(Name),
    DisableFrontend(Name),
    SetMaxconnFrontend(Name, u32),
    /// Master CLI: the process list.
    ShowProc,
    /// Master CLI: re-execute the master and start new workers.
    Reload,
}

impl Command {
    /// `add server B/S ADDR:PORT [options]`, with the weight checked.
    pub fn add_server(
        server: ServerRef,
        addr: IpAddr,
        port: u16,
        options: AddServerOptions,
    ) -> Result<Command> {
        if let Some(w) = options.weight {
            validate::weight(u32::from(w))?;
        }
        validate::port("port", port)?;
        if let Some(p) = options.check_port {
            validate::port("check port", p)?;
        }
        if let Some(ms) = options.check_interval_ms {
            validate::in_range(
                "inter",
                u64::from(ms),
                (1, 86_400_000),
                "must be from 1 ms to 24 h",
            )?;
        }
        for (field, value) in [("rise", options.rise), ("fall", options.fall)] {
            if let Some(v) = value {
                validate::in_range(field, u64::from(v), (1, 100), "must be from 1 to 100")?;
            }
        }
        Ok(Command::AddServer {
            server,
            addr,
            port,
            options,
        })
    }

    /// `set server B/S check-port N`, with N checked.
    pub fn set_check_port(server: ServerRef, port: u16) -> Result<Command> {
        Ok(Command::SetServerCheckPort(
            server,
            validate::port("check port", port)?,
        ))
    }

    /// `set server B/S weight N`, with N checked.
    pub fn set_weight(server: ServerRef, weight: u32) -> Result<Command> {
        Ok(Command::SetServerWeight(server, validate::weight(weight)?))
    }

    /// Whether the command only reads. Read-only commands may be retried after a broken
    /// connection; a write is retried only if it surely never reached HAProxy.
    pub fn is_read_only(&self) -> bool {
        self.answer_header().is_some()
    }

    /// The first bytes of every successful answer to a read-only command: its header. An answer
    /// is told from an error by this shape, never by the names in it ([`Outcome::of_query`]).
    /// `None` for commands that print nothing or a message.
    ///
    /// [`Outcome::of_query`]: super::Outcome::of_query
    pub fn answer_header(&self) -> Option<&'static str> {
        match self {
            Command::ShowInfo => Some("Name: "),
            Command::ShowStat | Command::ShowStatFrontends => Some("# pxname,"),
            Command::ShowServersState(_) => Some("1\n# be_id "),
            Command::ShowBackend => Some("# name\n"),
            Command::ShowProc => Some("#<PID>"),
            _ => None,
        }
    }

    /// Whether the command is for the master CLI rather than a worker's stats socket.
    pub fn is_master(&self) -> bool {
        matches!(self, Command::ShowProc | Command::Reload)
    }
}

/// Writes `ADDR:PORT` for `add server`; IPv6 goes in brackets so the port cannot be mistaken
/// for the address's last group.
fn write_addr_port(f: &mut fmt::Formatter<'_>, addr: &IpAddr, port: u16) -> fmt::Result {
    match addr {
        IpAddr::V4(a) => write!(f, "{a}:{port}"),
        IpAddr::V6(a) => write!(f, "[{a}]:{port}"),
    }
}

/// The wire form, without the terminating newline.
impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::ShowInfo => f.write_str("show info"),
            Command::ShowStat => f.write_str("show stat"),
            Command::ShowStatFrontends => f.write_str("show stat -1 1 -1"),
            Command::ShowServersState(None) => f.write_str("show servers state"),
            Command::ShowServersState(Some(b)) => write!(f, "show servers state {b}"),
            Command::ShowBackend => f.write_str("show backend"),
            Command::AddServer {
                server,
                addr,
                port,
                options,
            } => {
                write!(f, "add server {server} ")?;
                write_addr_port(f, addr, *port)?;
                if options.check {
                    f.write_str(" check")?;
                }
                if let Some(p) = options.check_port {
                    write!(f, " port {p}")?;
                }
                if let Some(ms) = options.check_interval_ms {
                    write!(f, " inter {ms}ms")?;
                }
                if let Some(r) = options.rise {
                    write!(f, " rise {r}")?;
                }
                if let Some(r) = options.fall {
                    write!(f, " fall {r}")?;
                }
                match options.send_proxy {
                    SendProxy::Off => {}
                    SendProxy::V1 => f.write_str(" send-proxy")?,
                    SendProxy::V2 => f.write_str(" send-proxy-v2")?,
                }
                if options.check_send_proxy {
                    f.write_str(" check-send-proxy")?;
                }
                if let Some(w) = options.weight {
                    write!(f, " weight {w}")?;
                }
                if options.backup {
                    f.write_str(" backup")?;
                }
                if options.disabled {
                    f.write_str(" disabled")?;
                }
                Ok(())
            }
            Command::DelServer(s) => write!(f, "del server {s}"),
            Command::ShutdownSessions(s) => write!(f, "shutdown sessions server {s}"),
            Command::SetServerAddr { server, addr, port } => {
                write!(f, "set server {server} addr {addr}")?;
                if let Some(p) = port {
                    write!(f, " port {p}")?;
                }
                Ok(())
            }
            Command::SetServerState(s, st) => write!(f, "set server {s} state {}", st.as_str()),
            Command::SetServerWeight(s, w) => write!(f, "set server {s} weight {w}"),
            Command::SetServerCheckPort(s, p) => write!(f, "set server {s} check-port {p}"),
            Command::EnableHealth(s) => write!(f, "enable health {s}"),
            Command::DisableHealth(s) => write!(f, "disable health {s}"),
            Command::EnableFrontend(n) => write!(f, "enable frontend {n}"),
            Command::DisableFrontend(n) => write!(f, "disable frontend {n}"),
            Command::SetMaxconnFrontend(n, v) => write!(f, "set maxconn frontend {n} {v}"),
            Command::ShowProc => f.write_str("show proc"),
            Command::Reload => f.write_str("reload"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srv() -> ServerRef {
        ServerRef::new("be_443", "node-a").unwrap()
    }

    #[test]
    fn wire_forms() {
        let add = Command::add_server(
            srv(),
            "203.0.113.7".parse().unwrap(),
            30443,
            AddServerOptions {
                check: true,
                weight: Some(100),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            add.to_string(),
            "add server be_443/node-a 203.0.113.7:30443 check weight 100"
        );
        let add6 = Command::add_server(
            srv(),
            "2001:db8::1".parse().unwrap(),
            80,
            AddServerOptions::default(),
        )
        .unwrap();
        assert_eq!(
            add6.to_string(),
            "add server be_443/node-a [2001:db8::1]:80"
        );
        let set = Command::SetServerAddr {
            server: srv(),
            addr: "10.0.0.1".parse().unwrap(),
            port: Some(30001),
        };
        assert_eq!(
            set.to_string(),
            "set server be_443/node-a addr 10.0.0.1 port 30001"
        );
        assert_eq!(
            Command::SetServerState(srv(), ServerAdminState::Drain).to_string(),
            "set server be_443/node-a state drain"
        );
        assert!(Command::set_weight(srv(), 257).is_err());
        let full = Command::add_server(
            srv(),
            "10.0.0.1".parse().unwrap(),
            30443,
            AddServerOptions {
                check: true,
                check_port: Some(32123),
                check_interval_ms: Some(500),
                rise: Some(1),
                fall: Some(5),
                send_proxy: SendProxy::V2,
                check_send_proxy: true,
                weight: Some(3),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            full.to_string(),
            "add server be_443/node-a 10.0.0.1:30443 check port 32123 inter 500ms rise 1 fall 5 send-proxy-v2 check-send-proxy weight 3"
        );
        for bad in [
            AddServerOptions {
                check_port: Some(0),
                ..Default::default()
            },
            AddServerOptions {
                rise: Some(0),
                ..Default::default()
            },
            AddServerOptions {
                fall: Some(101),
                ..Default::default()
            },
            AddServerOptions {
                check_interval_ms: Some(0),
                ..Default::default()
            },
        ] {
            assert!(
                Command::add_server(srv(), "10.0.0.1".parse().unwrap(), 1, bad.clone()).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(
            Command::set_check_port(srv(), 32123).unwrap().to_string(),
            "set server be_443/node-a check-port 32123"
        );
        assert!(Command::set_check_port(srv(), 0).is_err());
        assert_eq!(
            Command::ShowServersState(Some(Name::new("b", "be_1").unwrap())).to_string(),
            "show servers state be_1"
        );
    }

    #[test]
    fn read_only_and_master() {
        assert!(Command::ShowStat.is_read_only());
        assert!(!Command::DelServer(srv()).is_read_only());
        assert!(Command::Reload.is_master());
        assert!(!Command::ShowInfo.is_master());
    }
}
