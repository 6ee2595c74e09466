//! Which TCP ports HAProxy's own configuration listens on, read from the text of its files
//! (pure: no I/O; the caller reads the files and HAProxy's command line).
//!
//! A new frontend of the agent's on a port another section binds would share it: HAProxy binds
//! with `SO_REUSEPORT`, so the kernel splits the connections between the two listeners. The
//! agent refuses such a port ([`crate::agent`]); this module says who owns it.
//!
//! What counts as listening on a TCP port:
//! - `bind` lines of `frontend`, `listen`, `peers` and `log-forward` sections, every address of
//!   a comma-separated list, port ranges included;
//! - `peer` lines of `peers` sections, every one of them: which peer is the local one depends
//!   on `-L`, `localpeer` or the host name, so all are taken as possibly listening;
//! - `stats socket` lines of the `global` section with an IP address;
//! - the master CLI's `-S` address on HAProxy's command line ([`cmdline`]).
//!
//! UNIX sockets (`/path`, `unix@`, `abns@`, `abnsz@`, `uxst@`, `uxdg@`), UDP and QUIC
//! listeners (`udp@`, `quic4@`...), `sockpair@` and `rhttp@` are not TCP ports and are left
//! out.
//!
//! Environment variables are expanded as HAProxy does, in the environment the `setenv`,
//! `presetenv`, `unsetenv` and `resetenv` lines of `global` sections make ([`Env`], carried
//! across files in load order).
//!
//! Conservative where the text does not decide: every branch of a `.if` block counts (an
//! environment change inside one makes its variables uncertain), a `disabled` section counts,
//! a host name counts as every address (HAProxy resolves it at start), and a host with an
//! environment variable the caller could not resolve for sure ([`Lookup::Guess`],
//! [`Lookup::Unknown`]) counts as every address. A listener whose port cannot be told (an
//! uncertain variable in the port, a default `${PORT-443}` whose variable may be set, `fd@`,
//! an unknown prefix, no port) is in [`Scan::unknown`]: the caller refuses every new port
//! while there is one, since any port may be it.

pub mod cmdline;
mod env;
mod words;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use env::Env;
pub use words::Lookup;

/// Where a listener's address is, as far as the text tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// `*`, no address, `0.0.0.0`: every IPv4 address.
    AnyV4,
    /// `::`: every IPv6 address, and every IPv4 one too unless `v6only` (Linux's default
    /// `net.ipv6.bindv6only = 0` makes it dual-stack).
    AnyV6 {
        v6only: bool,
    },
    Ip(IpAddr),
    /// A host name, resolved by HAProxy at start: taken as any address.
    Name(String),
    /// An environment variable the agent could not resolve: taken as any address.
    Unknown,
}

impl Host {
    /// Whether a listener here and the agent's frontends on `bind` (rendered `bind
    /// <bind>:<port>`, dual-stack when it is `::`) get the same connections.
    pub fn overlaps(&self, bind: IpAddr) -> bool {
        let bind = canonical(bind);
        let dual = bind == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        match self {
            Host::Name(_) | Host::Unknown => true,
            Host::AnyV4 => bind.is_ipv4() || dual,
            Host::AnyV6 { v6only } => bind.is_ipv6() || !v6only,
            Host::Ip(ip) => {
                let ip = canonical(*ip);
                ip == bind || dual || (bind.is_unspecified() && ip.is_ipv4() == bind.is_ipv4())
            }
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// A TCP listener of HAProxy's configuration, and where it is declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    /// Who declares it, in words: `frontend operator_web`, `peer hap1 of peers mesh`.
    pub owner: String,
    pub file: PathBuf,
    /// 1-based; 0 for the command line.
    pub line: usize,
    pub host: Host,
    pub first_port: u16,
    pub last_port: u16,
}

impl Listener {
    /// Whether this listener takes connections the agent's frontend on `bind:port` would.
    pub fn overlaps(&self, bind: IpAddr, port: u16) -> bool {
        (self.first_port..=self.last_port).contains(&port) && self.host.overlaps(bind)
    }
}

impl fmt::Display for Listener {
    /// `frontend operator_web in /etc/haproxy/haproxy.cfg line 23`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{} ({})", self.owner, self.file.display())
        } else {
            write!(
                f,
                "{} in {} line {}",
                self.owner,
                self.file.display(),
                self.line
            )
        }
    }
}

/// What a scan found: the listeners, and those whose port it could not tell (each naming file
/// and line, and why).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    pub listeners: Vec<Listener>,
    pub unknown: Vec<String>,
}

/// The section keywords of HAProxy 2.6 to 3.2. A keyword missing here would leave its lines in
/// the section before it: a `bind` there would be counted for the wrong owner, never missed.
const SECTIONS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "peers",
    "resolvers",
    "userlist",
    "program",
    "http-errors",
    "ring",
    "cache",
    "mailers",
    "log-forward",
    "crt-store",
    "traces",
    "acme",
    "fcgi-app",
];

/// The preprocessor's directives: not statements of any section.
const DIRECTIVES: &[&str] = &[
    ".if", ".elif", ".else", ".endif", ".diag", ".notice", ".warning", ".alert",
];

/// Reads the TCP listeners of one config file's `text`; `file` names it in what is found.
/// `env` resolves environment variables (HAProxy's environment, or as good a guess as the
/// caller has), and takes this file's environment changes for the next files; the
/// pseudo-variables `.FILE`, `.LINE` and `.SECTION` are resolved here.
pub fn scan(text: &str, file: &Path, env: &mut Env<'_>) -> Scan {
    let mut out = Scan::default();
    // The current section: its keyword and name.
    let mut section: Option<(String, String)> = None;
    // How many `.if` blocks the line is in.
    let mut conditions = 0usize;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let section_name = section
            .as_ref()
            .map(|(kind, name)| {
                if name.is_empty() {
                    kind.clone()
                } else {
                    name.clone()
                }
            })
            .unwrap_or_default();
        let lookup = |name: &str| match name {
            ".FILE" => Lookup::Value(file.display().to_string()),
            ".LINE" => Lookup::Value(line.to_string()),
            ".SECTION" => Lookup::Value(section_name.clone()),
            _ => env.get(name),
        };
        let words = words::split(raw, &lookup);
        let Some(first) = words.first() else {
            continue;
        };
        let keyword = first.text.as_str();
        if DIRECTIVES.contains(&keyword) {
            match keyword {
                ".if" => conditions += 1,
                ".endif" => conditions = conditions.saturating_sub(1),
                _ => {}
            }
            continue;
        }
        if SECTIONS.contains(&keyword) {
            let name = words.get(1).map(|w| w.text.clone()).unwrap_or_default();
            section = Some((keyword.to_string(), name));
            continue;
        }
        let Some((kind, name)) = &section else {
            continue;
        };
        if kind == "global" {
            env.apply(keyword, &words, conditions > 0);
        }
        let found = match (kind.as_str(), keyword) {
            ("frontend" | "listen" | "log-forward", "bind") => {
                words.get(1).map(|w| (format!("{kind} {name}"), w))
            }
            ("peers", "bind") => words.get(1).map(|w| (format!("peers {name}"), w)),
            ("peers", "peer") => words
                .get(2)
                .map(|w| (format!("peer {} of peers {name}", words[1].text), w)),
            ("global", "stats") if words.get(1).is_some_and(|w| w.text == "socket") => words
                .get(2)
                .map(|w| ("the stats socket of the global section".to_string(), w)),
            _ => None,
        };
        let Some((owner, addresses)) = found else {
            continue;
        };
        let v6only = words[2..].iter().any(|w| w.text == "v6only");
        let at = |what: String| format!("{} line {line}: {what}", file.display());
        let mut start = 0;
        for address in addresses.text.split(',') {
            let end = start + address.len();
            // The uncertain parts of the word, as ranges of this address.
            let uncertain: Vec<Range<usize>> = addresses
                .uncertain
                .iter()
                .filter(|r| r.start <= end && r.end >= start)
                .map(|r| r.start.max(start) - start..r.end.min(end) - start)
                .collect();
            start = end + 1;
            match parse_address(address, &uncertain, v6only) {
                Address::Tcp {
                    host,
                    first_port,
                    last_port,
                } => out.listeners.push(Listener {
                    owner: owner.clone(),
                    file: file.to_path_buf(),
                    line,
                    host,
                    first_port,
                    last_port,
                }),
                Address::NotTcp => {}
                Address::Unknown(why) => {
                    out.unknown
                        .push(at(format!("{owner} listens on {address:?}: {why}")));
                }
            }
        }
    }
    out
}

/// What one address of a `bind` (or `stats socket`, `peer`, `-S`) is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Tcp {
        host: Host,
        first_port: u16,
        last_port: u16,
    },
    /// A UNIX socket, or UDP: no TCP port.
    NotTcp,
    /// Its port cannot be told; why.
    Unknown(String),
}

/// Families an address prefix forces.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Any,
    V4,
    V6,
}

/// Reads one address as HAProxy's `str2sa_range` would for a listener: an optional family
/// prefix (`ipv4@`, `ipv6@`...), then `[host]:port` or `host:port` where the port is the text
/// after the last colon and may be a range `8000-8010`. `uncertain`: the byte ranges of
/// `text` where an environment variable was not resolved for sure: in the host, the host is
/// not known; in the prefix or the port, the port is not.
pub fn parse_address(text: &str, uncertain: &[Range<usize>], v6only: bool) -> Address {
    // Whether the part `at` of `text` holds an uncertain variable (one expanded to nothing
    // counts where it stands, also at the part's ends).
    let in_part = |at: Range<usize>| {
        uncertain.iter().any(|r| {
            if r.is_empty() {
                at.start <= r.start && r.start <= at.end
            } else {
                r.start < at.end && at.start < r.end
            }
        })
    };
    let env_port = "its port is in an environment variable the agent cannot resolve for sure \
                    (HAProxy's environment cannot be read; a default, or the agent's own value, \
                    may not be what HAProxy has)";
    if text.starts_with('/') && !in_part(0..1) {
        return Address::NotTcp;
    }
    if let Some(at) = text.find('@') {
        if in_part(0..at + 1) {
            return Address::Unknown(format!(
                "its address family ({:?}) is in {}",
                &text[..at + 1],
                "an environment variable the agent cannot resolve"
            ));
        }
    }
    let (family, rest) = match text.split_once('@') {
        Some((prefix, rest)) => match prefix {
            "ipv4" | "tcp4" | "mptcp4" => (Family::V4, rest),
            "ipv6" | "tcp6" | "mptcp6" => (Family::V6, rest),
            "tcp" | "mptcp" => (Family::Any, rest),
            "unix" | "abns" | "abnsz" | "uxst" | "uxdg" | "sockpair" | "udp" | "udp4" | "udp6"
            | "quic" | "quic4" | "quic6" | "rhttp" => return Address::NotTcp,
            "fd" => {
                return Address::Unknown(
                    "an inherited socket (fd@): its port cannot be told from the text".into(),
                )
            }
            other => return Address::Unknown(format!("unknown address prefix {other:?}")),
        },
        None => (Family::Any, text),
    };
    let offset = text.len() - rest.len();
    let (host, port) = match rest.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once("]:") {
            Some((host, port)) => (host, port),
            None if in_part(offset..text.len()) => return Address::Unknown(env_port.into()),
            None => return Address::Unknown("no port after the bracketed address".into()),
        },
        None => match rest.rsplit_once(':') {
            Some(split) => split,
            None if in_part(offset..text.len()) => return Address::Unknown(env_port.into()),
            None => return Address::Unknown("no port".into()),
        },
    };
    let port_at = text.len() - port.len();
    if in_part(port_at..text.len()) {
        return Address::Unknown(env_port.into());
    }
    let Some((first_port, last_port)) = port_range(port) else {
        return Address::Unknown(format!("{port:?} is not a port or a port range"));
    };
    let host_at = port_at - 1 - host.len() - usize::from(rest.starts_with('['));
    let host = if in_part(host_at..host_at + host.len()) {
        Host::Unknown
    } else {
        match (host, family) {
            ("" | "*", Family::V6) => Host::AnyV6 { v6only },
            ("" | "*", _) => Host::AnyV4,
            (h, _) => match h.parse::<IpAddr>() {
                Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)) => Host::AnyV4,
                Ok(IpAddr::V6(Ipv6Addr::UNSPECIFIED)) => Host::AnyV6 { v6only },
                Ok(ip) => Host::Ip(ip),
                Err(_) => Host::Name(h.to_string()),
            },
        }
    };
    Address::Tcp {
        host,
        first_port,
        last_port,
    }
}

/// `443` or `8000-8010`, within 1–65535.
fn port_range(text: &str) -> Option<(u16, u16)> {
    let one = |t: &str| -> Option<u16> {
        let p: u16 = t.parse().ok()?;
        (p != 0 && t.bytes().all(|b| b.is_ascii_digit())).then_some(p)
    };
    match text.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (one(a)?, one(b)?);
            (a <= b).then_some((a, b))
        }
        None => one(text).map(|p| (p, p)),
    }
}
