//! `lbctl show`: what HAProxy is doing, from `show stat` and `show servers state`, as a table
//! or as JSON; and `lbctl state`'s rendering of the agent's view.
//!
//! The view is built once from the typed rows ([`Overview::from_stat`], then
//! [`Overview::add_servers_state`]) and then rendered; the renderers do no I/O, so they are
//! tested on fixtures directly.
//!
//! HAProxy's runtime API does not tell whether servers are sent the PROXY protocol, nor a
//! check's path, so `show` says of a backend's health check only what HAProxy reports: its
//! layer (from the servers' `check_status`: `L7…` is an HTTP check, `L4OK` a TCP connect) and
//! its port (`srv_check_port`). `lbctl state` shows the agent's whole settings.

use std::fmt::Write as _;

use serde::Serialize;

use crate::model::settings::{DEFAULT_FALL, DEFAULT_INTERVAL, DEFAULT_RISE};
use crate::runtime::parse::{Info, ProxyKind, ServerState, StatRow};

/// A frontend line of the view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendView {
    pub name: String,
    pub status: String,
    pub sessions_current: Option<u64>,
    pub sessions_total: Option<u64>,
    pub mode: Option<String>,
}

/// A server line of the view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerView {
    pub name: String,
    /// The address without the port (no brackets around IPv6).
    pub addr: Option<String>,
    pub port: Option<u16>,
    /// UP, DOWN, MAINT, DRAIN or NOLB (a server with no check that is up is UP).
    pub status: String,
    /// HAProxy's own status text (`UP 1/3`, `MAINT (via b/s)`, `no check`).
    pub status_detail: String,
    pub check_status: Option<String>,
    /// Where health checks go when not to `port` (`srv_check_port` of `show servers state`).
    pub check_port: Option<u16>,
    /// The effective weight, as `show stat` reports it.
    pub weight: Option<u32>,
    pub sessions_current: Option<u64>,
    pub sessions_total: Option<u64>,
    pub last_change_s: Option<u64>,
    pub backup: bool,
}

/// A backend and its servers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub name: String,
    /// Named `be_<port>`: the agent's (it names every backend it creates so).
    pub lbagent: bool,
    pub status: String,
    pub algo: Option<String>,
    pub sessions_current: Option<u64>,
    /// The servers' health check as HAProxy reports it: `http` (a check answered at layer 7),
    /// `tcp` (a connect that passed and went no further), or `None` when no check says.
    pub check_kind: Option<&'static str>,
    /// The port every checked server is checked on, when all share one other than their own.
    pub check_port: Option<u16>,
    pub servers: Vec<ServerView>,
}

/// Everything `lbctl show` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Overview {
    pub frontends: Vec<FrontendView>,
    pub backends: Vec<BackendView>,
}

/// Splits `ip:port`, `[ipv6]:port` or a bare address.
pub fn split_addr(addr: &str) -> (String, Option<u16>) {
    if let Some(rest) = addr.strip_prefix('[') {
        if let Some((ip, tail)) = rest.split_once(']') {
            return (
                ip.to_string(),
                tail.strip_prefix(':').and_then(|p| p.parse().ok()),
            );
        }
    }
    match addr.rsplit_once(':') {
        // One colon: IPv4 or a name with a port. More: a bare IPv6 address with a port last.
        Some((ip, port)) if port.chars().all(|c| c.is_ascii_digit()) && !port.is_empty() => {
            match port.parse() {
                Ok(p) => (ip.to_string(), Some(p)),
                Err(_) => (addr.to_string(), None),
            }
        }
        _ => (addr.to_string(), None),
    }
}

fn status_of(row: &StatRow) -> (String, String) {
    match &row.status {
        Some(s) => (s.summary().to_string(), s.text.clone()),
        None => (String::new(), String::new()),
    }
}

impl Overview {
    /// Groups `show stat` rows: frontends, then each backend with its servers, in HAProxy's
    /// order. `backend` keeps only that backend (and no frontends).
    pub fn from_stat(rows: &[StatRow], backend: Option<&str>) -> Overview {
        let mut view = Overview::default();
        let mut index = std::collections::HashMap::<String, usize>::new();
        let mut backend_of = |view: &mut Overview, name: &str| -> usize {
            if let Some(&i) = index.get(name) {
                return i;
            }
            view.backends.push(BackendView {
                name: name.to_string(),
                lbagent: is_agent_backend(name),
                status: String::new(),
                algo: None,
                sessions_current: None,
                check_kind: None,
                check_port: None,
                servers: Vec::new(),
            });
            let i = view.backends.len() - 1;
            index.insert(name.to_string(), i);
            i
        };
        for row in rows {
            if backend.is_some_and(|b| b != row.proxy) {
                continue;
            }
            match row.kind {
                ProxyKind::Frontend if backend.is_none() => {
                    view.frontends.push(FrontendView {
                        name: row.proxy.clone(),
                        status: status_of(row).0,
                        sessions_current: row.sessions_current,
                        sessions_total: row.sessions_total,
                        mode: row.mode.clone(),
                    });
                }
                ProxyKind::Frontend | ProxyKind::Listener => {}
                ProxyKind::Backend => {
                    let i = backend_of(&mut view, &row.proxy);
                    let b = &mut view.backends[i];
                    b.status = status_of(row).0;
                    b.algo = row.algo.clone();
                    b.sessions_current = row.sessions_current;
                }
                ProxyKind::Server => {
                    let (addr, port) = match &row.addr {
                        Some(a) => {
                            let (ip, port) = split_addr(a);
                            (Some(ip), port)
                        }
                        None => (None, None),
                    };
                    let (status, status_detail) = status_of(row);
                    let i = backend_of(&mut view, &row.proxy);
                    view.backends[i].servers.push(ServerView {
                        name: row.name.clone(),
                        addr,
                        port,
                        status,
                        status_detail,
                        check_status: row.check_status.clone(),
                        check_port: None,
                        weight: row.weight,
                        sessions_current: row.sessions_current,
                        sessions_total: row.sessions_total,
                        last_change_s: row.last_change_s,
                        backup: row.backup.unwrap_or(0) > 0,
                    });
                }
            }
        }
        for b in &mut view.backends {
            b.check_kind = check_kind(&b.servers);
        }
        view
    }

    /// Adds each server's check port from `show servers state` (0 there: the traffic port).
    pub fn add_servers_state(&mut self, states: &[ServerState]) {
        let ports: std::collections::HashMap<(&str, &str), u16> = states
            .iter()
            .filter_map(|s| {
                let p = s.check_port.filter(|&p| p != 0)?;
                Some(((s.backend.as_str(), s.server.as_str()), p))
            })
            .collect();
        for b in &mut self.backends {
            for s in &mut b.servers {
                s.check_port = ports.get(&(b.name.as_str(), s.name.as_str())).copied();
            }
            let mut shared = b.servers.iter().map(|s| s.check_port);
            b.check_port = match shared.next() {
                Some(Some(first)) if shared.all(|p| p == Some(first)) => Some(first),
                _ => None,
            };
        }
    }
}

/// A backend's check kind from its servers' last check results: a result at layer 7 means an
/// HTTP check (or, outside the agent's backends, a `tcp-check` with `expect` rules); `L4OK`
/// means the check stopped at the connect, a TCP check. A failed connect (`L4CON`, `L4TOUT`)
/// says nothing of what would have followed.
fn check_kind(servers: &[ServerView]) -> Option<&'static str> {
    let results = || {
        servers
            .iter()
            .filter_map(|s| s.check_status.as_deref())
            .map(|c| c.trim_start_matches(['*', ' ']))
    };
    if results().any(|c| c.starts_with("L7")) {
        Some("http")
    } else if results().any(|c| c == "L4OK") {
        Some("tcp")
    } else {
        None
    }
}

/// A backend's check as the table's header says it: `http check on :32123`, `tcp check`.
fn check_summary(b: &BackendView) -> Option<String> {
    let port = b.check_port.map(|p| format!(" on :{p}"));
    match (b.check_kind, port) {
        (None, None) => None,
        (kind, port) => Some(format!(
            "{}check{}",
            kind.map(|k| format!("{k} ")).unwrap_or_default(),
            port.unwrap_or_default()
        )),
    }
}

/// Whether a backend name is one the agent creates: `be_<port>`.
pub fn is_agent_backend(name: &str) -> bool {
    name.strip_prefix("be_")
        .and_then(|p| p.parse::<u16>().ok())
        .is_some_and(|p| p > 0 && name.len() == 3 + p.to_string().len())
}

/// Seconds as `45s`, `12m`, `3h`, `2d`.
pub fn human_duration(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// ANSI colours, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Colour {
    Never,
    Ansi,
}

impl Colour {
    /// Colour only on a terminal, and never when `NO_COLOR` is set.
    pub fn detect(is_terminal: bool) -> Colour {
        if is_terminal && std::env::var_os("NO_COLOR").is_none() {
            Colour::Ansi
        } else {
            Colour::Never
        }
    }

    fn paint(self, status: &str, width: usize) -> String {
        let padded = format!("{status:<width$}");
        if self == Colour::Never {
            return padded;
        }
        let code = match status {
            "UP" | "OPEN" => "32",
            "DOWN" | "STOP" | "PAUSED" => "31",
            "MAINT" => "35",
            "DRAIN" | "NOLB" | "FULL" => "33",
            _ => return padded,
        };
        format!("\x1b[{code}m{padded}\x1b[0m")
    }

    fn bold(self, text: &str) -> String {
        match self {
            Colour::Never => text.to_string(),
            Colour::Ansi => format!("\x1b[1m{text}\x1b[0m"),
        }
    }
}

fn num(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// Cuts `s` to `max` characters, marking the cut.
fn fit(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// The table view: frontends, then each backend with its servers. Lines stay within 80
/// columns for names up to 16 characters and IPv4 addresses.
pub fn render_table(view: &Overview, colour: Colour) -> String {
    let mut out = String::new();
    if !view.frontends.is_empty() {
        let _ = writeln!(out, "{}", colour.bold("FRONTENDS"));
        let _ = writeln!(
            out,
            "  {:<24} {:<6} {:<7} {:>8} {:>10}",
            "NAME", "MODE", "STATUS", "CUR", "TOTAL"
        );
        for f in &view.frontends {
            let _ = writeln!(
                out,
                "  {:<24} {:<6} {} {:>8} {:>10}",
                fit(&f.name, 24),
                f.mode.as_deref().unwrap_or("-"),
                colour.paint(&f.status, 7),
                num(f.sessions_current),
                num(f.sessions_total),
            );
        }
        out.push('\n');
    }
    for b in &view.backends {
        let _ = writeln!(
            out,
            "{} {} ({}, {} server{}{}){}",
            colour.bold(&format!("BACKEND {}", b.name)),
            colour.paint(&b.status, 0),
            b.algo.as_deref().unwrap_or("-"),
            b.servers.len(),
            if b.servers.len() == 1 { "" } else { "s" },
            check_summary(b)
                .map(|c| format!(", {c}"))
                .unwrap_or_default(),
            if b.lbagent { " [lbagent]" } else { "" },
        );
        if b.servers.is_empty() {
            out.push('\n');
            continue;
        }
        let _ = writeln!(
            out,
            "  {:<16} {:<21} {:<6} {:<7} {:>3} {:>5} {:>7} {:>6}",
            "SERVER", "ADDRESS", "STATUS", "CHECK", "WT", "CUR", "TOTAL", "CHANGE"
        );
        for s in &b.servers {
            let addr = match (&s.addr, s.port) {
                (Some(a), Some(p)) if a.contains(':') => format!("[{a}]:{p}"),
                (Some(a), Some(p)) => format!("{a}:{p}"),
                (Some(a), None) => a.clone(),
                (None, _) => "-".to_string(),
            };
            let mut name = fit(&s.name, 16);
            if s.backup {
                name = fit(&format!("{}*", s.name), 16);
            }
            let _ = writeln!(
                out,
                "  {:<16} {:<21} {} {:<7} {:>3} {:>5} {:>7} {:>6}",
                name,
                addr,
                colour.paint(&s.status, 6),
                fit(s.check_status.as_deref().unwrap_or("-"), 7),
                s.weight.map_or_else(|| "-".into(), |w| w.to_string()),
                num(s.sessions_current),
                num(s.sessions_total),
                s.last_change_s.map_or_else(|| "-".into(), human_duration),
            );
        }
        out.push('\n');
    }
    if view
        .backends
        .iter()
        .any(|b| b.servers.iter().any(|s| s.backup))
    {
        out.push_str("* backup server\n");
    }
    out
}

/// The store line of `lbctl state`: `store: journal`, or etcd's revision and the agents seen
/// (`store: etcd at revision 42, unavailable (...); agents: lb-a (this one, expires leases), lb-b`).
fn store_line(store: &serde_json::Value) -> Option<String> {
    let kind = store["kind"].as_str()?;
    let mut line = format!("store: {kind}");
    if let Some(rev) = store["revision"].as_i64() {
        let _ = write!(line, " at revision {rev}");
    }
    if let Some(e) = store["error"].as_str() {
        let _ = write!(line, ", unavailable ({e})");
    }
    let me = store["agent"].as_str();
    let agents: Vec<String> = store["agents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|agent| {
                    let name = agent["name"].as_str()?;
                    let mut notes = Vec::new();
                    if Some(name) == me {
                        notes.push("this one");
                    }
                    if agent["expiring"].as_bool() == Some(true) {
                        notes.push("expires leases");
                    }
                    Some(match notes.is_empty() {
                        true => name.to_string(),
                        false => format!("{name} ({})", notes.join(", ")),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if !agents.is_empty() {
        let _ = write!(line, "; agents: {}", agents.join(", "));
    }
    Some(line)
}

/// `lbctl state`: the agent's desired state beside what HAProxy reports.
pub fn render_state(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "generation {}, HAProxy {}",
        v["generation"],
        v["haproxy"].as_str().unwrap_or("?")
    );
    if let Some(line) = store_line(&v["store"]) {
        let _ = writeln!(out, "{line}");
    }
    let empty = Vec::new();
    for fe in v["frontends"].as_array().unwrap_or(&empty) {
        let _ = writeln!(
            out,
            "\nFRONTEND {} ({}, {}) {}",
            fe["frontend_port"],
            fe["mode"].as_str().unwrap_or("?"),
            fe["backend"].as_str().unwrap_or("?"),
            fe["haproxy_status"].as_str().unwrap_or("not in HAProxy")
        );
        if let Some(line) = settings_line(&fe["settings"]) {
            let _ = writeln!(out, "  {line}");
        }
        let _ = writeln!(
            out,
            "  {:<16} {:<22} {:<6} {:>3} {:<10} {:<6} {:<7}",
            "NODE", "WANTED", "STATE", "WT", "SERVICE", "STATUS", "CHECK"
        );
        for s in fe["servers"].as_array().unwrap_or(&empty) {
            let ip = s["node_ip"].as_str().unwrap_or("?");
            let wanted = if ip.contains(':') {
                format!("[{ip}]:{}", s["node_port"])
            } else {
                format!("{ip}:{}", s["node_port"])
            };
            let observed = &s["haproxy"];
            let _ = writeln!(
                out,
                "  {:<16} {:<22} {:<6} {:>3} {:<10} {:<6} {:<7}",
                fit(s["node"].as_str().unwrap_or("?"), 16),
                wanted,
                s["state"].as_str().unwrap_or("?"),
                s["weight"]
                    .as_u64()
                    .map_or_else(|| "-".into(), |w| w.to_string()),
                fit(s["service"].as_str().unwrap_or("-"), 10),
                observed["status"].as_str().unwrap_or("ABSENT"),
                fit(observed["check_status"].as_str().unwrap_or("-"), 7),
            );
        }
    }
    out
}

/// A frontend's settings as `GET /v1/frontends` shows them, on one line: `proxy v2, check http
/// /healthz on :32123, timeouts tunnel 1h, maxconn 1000`. A check's timing and the timeouts
/// and maxconn appear only when set (HAProxy's defaults otherwise). `None` for an agent that
/// shows no settings.
pub fn settings_line(s: &serde_json::Value) -> Option<String> {
    if !s.is_object() {
        return None;
    }
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(t) => t.clone(),
        other => other.to_string(),
    };
    let mut parts = vec![format!(
        "proxy {}",
        s["proxy_protocol"].as_str().unwrap_or("?")
    )];
    let c = &s["check"];
    let mut check = format!("check {}", c["kind"].as_str().unwrap_or("?"));
    if let Some(path) = c["http_path"].as_str() {
        let _ = write!(check, " {path}");
    }
    if let Some(port) = c["port"].as_u64() {
        let _ = write!(check, " on :{port}");
    }
    for (name, default) in [
        ("interval", DEFAULT_INTERVAL.to_string()),
        ("rise", DEFAULT_RISE.to_string()),
        ("fall", DEFAULT_FALL.to_string()),
    ] {
        let v = &c[name];
        if !v.is_null() && text(v) != default {
            let label = if name == "interval" { "every" } else { name };
            let _ = write!(check, " {label} {}", text(v));
        }
    }
    parts.push(check);
    let timeouts: Vec<String> = ["client", "server", "tunnel", "connect"]
        .iter()
        .filter(|t| !s["timeouts"][**t].is_null())
        .map(|t| format!("{t} {}", text(&s["timeouts"][*t])))
        .collect();
    if !timeouts.is_empty() {
        parts.push(format!("timeouts {}", timeouts.join(" ")));
    }
    if !s["maxconn"].is_null() {
        parts.push(format!("maxconn {}", text(&s["maxconn"])));
    }
    Some(parts.join(", "))
}

/// `lbctl show info`: the process at a glance.
pub fn render_info(info: &Info) -> String {
    let mut out = String::new();
    let get = |k: &str| info.get(k).unwrap_or("-").to_string();
    let rows = [
        ("Version", get("Version")),
        ("Pid", get("Pid")),
        (
            "Uptime",
            info.uptime_s()
                .map_or_else(|| get("Uptime"), human_duration),
        ),
        (
            "Connections",
            format!(
                "{} current, {} total, max {}",
                get("CurrConns"),
                get("CumConns"),
                get("Maxconn")
            ),
        ),
        (
            "Rates",
            format!(
                "{} conn/s, {} sess/s, {} req/s",
                get("ConnRate"),
                get("SessRate"),
                get("HttpRate")
            ),
        ),
        ("Threads", get("Nbthread")),
        (
            "Jobs",
            format!("{} ({} listeners)", get("Jobs"), get("Listeners")),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<12} {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::parse::parse_show_stat;

    const STAT: &str = "# pxname,svname,scur,stot,status,weight,act,bck,lastchg,type,check_status,addr,mode,algo\n\
fe_443,FRONTEND,3,10,OPEN,,,,,0,,,tcp,\n\
be_443,node-a,1,5,UP,100,1,0,62,2,L4OK,203.0.113.7:30443,tcp,\n\
be_443,node-b,0,0,no check,1,1,0,3700,2,,[2001:db8::1]:30443,tcp,\n\
be_443,spare,0,0,MAINT (via be_443/node-a),1,0,1,5,2,,10.0.0.9:30443,tcp,\n\
be_443,BACKEND,1,5,UP,101,2,1,62,1,,,tcp,roundrobin\n\
be_80,BACKEND,0,0,DOWN,0,0,0,9,1,,,http,leastconn\n";

    #[test]
    fn groups_rows() {
        let rows = parse_show_stat(STAT).unwrap();
        let v = Overview::from_stat(&rows, None);
        assert_eq!(v.frontends.len(), 1);
        assert_eq!(v.frontends[0].status, "OPEN");
        assert_eq!(v.backends.len(), 2);
        let be = &v.backends[0];
        assert_eq!(be.algo.as_deref(), Some("roundrobin"));
        let names: Vec<_> = be.servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["node-a", "node-b", "spare"]);
        assert_eq!(be.servers[0].addr.as_deref(), Some("203.0.113.7"));
        assert_eq!(be.servers[0].port, Some(30443));
        assert_eq!(be.servers[1].status, "UP");
        assert_eq!(be.servers[1].addr.as_deref(), Some("2001:db8::1"));
        assert_eq!(be.servers[2].status, "MAINT");
        assert!(be.servers[2].backup);
        let only = Overview::from_stat(&rows, Some("be_80"));
        assert!(only.frontends.is_empty());
        assert_eq!(only.backends.len(), 1);
        assert_eq!(only.backends[0].status, "DOWN");
    }

    #[test]
    fn table_fits_80_columns_and_has_no_colour_when_off() {
        let rows = parse_show_stat(STAT).unwrap();
        let t = render_table(&Overview::from_stat(&rows, None), Colour::Never);
        assert!(!t.contains('\x1b'));
        for line in t.lines() {
            assert!(line.chars().count() <= 80, "{} chars: {line}", line.len());
        }
        assert!(t.contains("203.0.113.7:30443"));
        assert!(t.contains("[2001:db8::1]:30443"));
        assert!(t.contains("1h01m"));
        let coloured = render_table(&Overview::from_stat(&rows, None), Colour::Ansi);
        assert!(coloured.contains("\x1b[32mUP"));
    }

    const SERVERS_STATE: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n\
3 be_443 1 node-a 203.0.113.7 2 0 100 100 62 15 3 4 6 0 0 0 - 30443 - 0 32123 - - 0\n\
3 be_443 2 node-b 2001:db8::1 2 0 1 1 3700 0 0 0 0 0 0 0 - 30443 - 0 32123 - - 0\n\
3 be_443 3 spare 10.0.0.9 2 1 1 1 5 0 0 0 0 0 0 0 - 30443 - 0 32123 - - 0\n\
4 be_80 1 web 10.0.0.8 2 0 1 1 5 6 3 4 6 0 0 0 - 30080 - 0 0 - - 0\n\n";

    #[test]
    fn check_kind_and_port_from_what_haproxy_reports() {
        let rows = parse_show_stat(STAT).unwrap();
        let mut v = Overview::from_stat(&rows, None);
        // node-a's last check passed at L4 and went no further: a TCP check.
        assert_eq!(v.backends[0].check_kind, Some("tcp"));
        assert_eq!(v.backends[1].check_kind, None, "be_80 has no servers");
        v.add_servers_state(&crate::runtime::parse::parse_servers_state(SERVERS_STATE).unwrap());
        let be = &v.backends[0];
        assert!(be.servers.iter().all(|s| s.check_port == Some(32123)));
        assert_eq!(be.check_port, Some(32123));
        let t = render_table(&v, Colour::Never);
        assert!(
            t.contains("BACKEND be_443 UP (roundrobin, 3 servers, tcp check on :32123) [lbagent]"),
            "{t}"
        );
        assert!(
            t.contains("BACKEND be_80 DOWN (leastconn, 0 servers) [lbagent]\n"),
            "{t}"
        );
        for line in t.lines() {
            assert!(line.chars().count() <= 80, "{line}");
        }
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["backends"][0]["servers"][0]["check_port"], 32123);
        assert_eq!(json["backends"][0]["check_kind"], "tcp");

        let server = |check_status: &str, check_port| ServerView {
            check_status: Some(check_status.to_string()),
            check_port,
            ..be.servers[0].clone()
        };
        let backend = |servers: Vec<ServerView>| {
            let mut b = BackendView {
                servers,
                ..be.clone()
            };
            b.check_kind = check_kind(&b.servers);
            let ports: Vec<_> = b.servers.iter().map(|s| s.check_port).collect();
            b.check_port = ports[0].filter(|_| ports.iter().all(|p| *p == ports[0]));
            check_summary(&b)
        };
        assert_eq!(
            backend(vec![
                server("* L7OK", Some(32123)),
                server("L4CON", Some(32123))
            ])
            .as_deref(),
            Some("http check on :32123")
        );
        assert_eq!(
            backend(vec![server("L7STS", None), server("L4OK", None)]).as_deref(),
            Some("http check")
        );
        // A failed connect does not tell the kind; the port is still known.
        assert_eq!(
            backend(vec![server("L4TOUT", Some(9000))]).as_deref(),
            Some("check on :9000")
        );
        assert_eq!(backend(vec![server("L4CON", None)]), None);
        // Servers checked on different ports: none is the backend's.
        assert_eq!(
            backend(vec![server("L4OK", Some(1)), server("L4OK", Some(2))]).as_deref(),
            Some("tcp check")
        );
    }

    fn state_with(settings: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "generation": 3,
            "haproxy": "up",
            "frontends": [{
                "frontend_port": 443, "frontend": "fe_443", "backend": "be_443", "mode": "tcp",
                "settings": settings,
                "haproxy_status": "OPEN",
                "servers": [{"node": "node-a", "node_ip": "203.0.113.7", "node_port": 30443,
                    "state": "ready", "service": "traefik",
                    "haproxy": {"status": "UP", "check_status": "L7OK", "addr": "203.0.113.7:30443"}}]
            }]
        })
    }

    #[test]
    fn state_shows_each_frontends_settings() {
        use crate::model::settings::{RawSettings, SettingsView};
        // The very view the agent serves, from settings as a request gives them.
        let view = |json: &str| {
            let s = serde_json::from_str::<RawSettings>(json)
                .unwrap()
                .validate("")
                .unwrap()
                .normalized();
            serde_json::to_value(SettingsView::from(&s)).unwrap()
        };
        let t = render_state(&state_with(view(
            r#"{"proxy_protocol":"v2","check":{"port":32123,"http_path":"/healthz"}}"#,
        )));
        assert!(
            t.contains("FRONTEND 443 (tcp, be_443) OPEN\n  proxy v2, check http /healthz on :32123\n  NODE"),
            "{t}"
        );
        assert_eq!(
            settings_line(&view("{}")).as_deref(),
            Some("proxy none, check tcp")
        );
        assert_eq!(
            settings_line(&view(
                r#"{"proxy_protocol":"v1","check":{"interval":"500ms","rise":2,"fall":5},"timeouts":{"client":"1m","tunnel":"1h"},"maxconn":1000}"#
            ))
            .as_deref(),
            Some("proxy v1, check tcp every 500ms fall 5, timeouts client 1m tunnel 1h, maxconn 1000")
        );
        // An agent from before settings: no line, the rest as before.
        let t = render_state(&state_with(serde_json::Value::Null));
        assert!(t.contains("OPEN\n  NODE"), "{t}");
        for line in t.lines() {
            assert!(line.chars().count() <= 80, "{line}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(split_addr("1.2.3.4:80"), ("1.2.3.4".into(), Some(80)));
        assert_eq!(split_addr("[::1]:80"), ("::1".into(), Some(80)));
        assert_eq!(split_addr("1.2.3.4"), ("1.2.3.4".into(), None));
        assert_eq!(split_addr("unix@/x"), ("unix@/x".into(), None));
        assert_eq!(split_addr("1.2.3.4:99999"), ("1.2.3.4:99999".into(), None));
    }

    #[test]
    fn agent_backends_by_name() {
        assert!(is_agent_backend("be_443"));
        assert!(!is_agent_backend("be_0443"));
        assert!(!is_agent_backend("be_0"));
        assert!(!is_agent_backend("be_70000"));
        assert!(!is_agent_backend("be_app"));
        let rows = parse_show_stat(STAT).unwrap();
        let v = Overview::from_stat(&rows, None);
        assert!(v.backends[0].lbagent);
        let t = render_table(&v, Colour::Never);
        assert!(
            t.contains("BACKEND be_443 UP (roundrobin, 3 servers, tcp check) [lbagent]"),
            "{t}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(62), "1m02s");
        assert_eq!(human_duration(3700), "1h01m");
        assert_eq!(human_duration(90000), "1d01h");
    }
}
