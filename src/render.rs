//! Renders the config file lbagent owns: the frontends and backends of the desired state, which
//! HAProxy loads as a second `-f` after the operator's main config.
//!
//! The file matters at two moments only: when a frontend port appears or goes away (HAProxy can
//! add servers at runtime but not listeners, so the agent rewrites this file and reloads), and
//! when HAProxy (re)starts. Between those, servers change through the runtime API, so this text
//! must describe the whole desired state, not just the frontends, or a reload would lose the
//! servers added live.
//!
//! Output is deterministic (the state's maps are `BTreeMap`s, so ports and nodes come sorted):
//! the same state always renders the same bytes, which keeps rewrites and diffs quiet.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use crate::model::{backend_name, frontend_name, DesiredState, FrontendSpec, ServerState};

/// How the managed file is rendered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderOptions {
    /// The addresses every frontend binds, each on its own `bind` line (`0.0.0.0` by default:
    /// all IPv4 addresses). Never empty.
    pub frontend_binds: Vec<IpAddr>,
}

impl RenderOptions {
    /// Whether IPv6 binds are `v6only`: when IPv4 addresses are bound beside them, so both
    /// families work on one port. An IPv6 address alone (`::`) stays dual-stack, taking IPv4
    /// too, as it did before lists.
    pub fn v6only(&self) -> bool {
        self.frontend_binds.iter().any(IpAddr::is_ipv4)
    }
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            frontend_binds: vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
        }
    }
}

/// `--frontend-bind` (and `frontend_bind` in the settings file): the addresses every frontend
/// binds, as [`parse_frontend_binds`] reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendBinds(pub Vec<IpAddr>);

impl std::str::FromStr for FrontendBinds {
    type Err = String;
    fn from_str(text: &str) -> Result<FrontendBinds, String> {
        parse_frontend_binds(text).map(FrontendBinds)
    }
}

impl<'de> serde::Deserialize<'de> for FrontendBinds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses `--frontend-bind`: a comma-separated list of IPv4 and IPv6 addresses, IPv6 with or
/// without brackets (`127.0.0.1,::1`, `0.0.0.0,[::]`). No host names (HAProxy would resolve
/// them once, at start) and no address twice.
pub fn parse_frontend_binds(text: &str) -> Result<Vec<IpAddr>, String> {
    let mut out: Vec<IpAddr> = Vec::new();
    for item in text.split(',').map(str::trim) {
        let bare = item
            .strip_prefix('[')
            .and_then(|i| i.strip_suffix(']'))
            .unwrap_or(item);
        let ip: IpAddr = bare.parse().map_err(|_| {
            format!("{item:?} is not an IPv4 or IPv6 address (give addresses separated by commas, such as 0.0.0.0,::)")
        })?;
        if item.starts_with('[') && ip.is_ipv4() {
            return Err(format!("{item:?}: brackets are for IPv6 addresses"));
        }
        if out.contains(&ip) {
            return Err(format!("{ip} is given twice"));
        }
        out.push(ip);
    }
    Ok(out)
}

/// Whether a server in `state` is written `disabled`: maintenance, and drain too (see
/// `render_frontend`). What a new worker's state file must say for it to start the server in
/// `state` depends on this (`haproxy::server_state`).
pub fn starts_disabled(state: ServerState) -> bool {
    state != ServerState::Ready
}

/// `ip:port`, with an IPv6 address in brackets as HAProxy's address parser wants it.
fn addr(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// The managed config for `state`: a header naming the generation, then one frontend and one
/// backend per port, in ascending port order. An empty state renders the header alone, which
/// HAProxy accepts as a config file.
pub fn render_managed(state: &DesiredState, opts: &RenderOptions) -> String {
    let mut out = format!(
        "# Managed by lbagent: do not edit; generation {}\n",
        state.generation
    );
    for (&port, fe) in &state.frontends {
        render_frontend(&mut out, port, fe, opts);
    }
    out
}

fn render_frontend(out: &mut String, port: u16, fe: &FrontendSpec, opts: &RenderOptions) {
    let mode = fe.mode.as_str();
    let frontend = frontend_name(port);
    let backend = backend_name(port);
    let settings = &fe.settings;
    // `write!` into a String cannot fail.
    let _ = write!(out, "\nfrontend {frontend}\n    mode {mode}\n");
    let v6only = opts.v6only();
    for ip in &opts.frontend_binds {
        // `v6only` beside IPv4 binds: an IPv6 wildcard would otherwise take the IPv4 port too,
        // and the IPv4 bind beside it fail.
        let v6only = if ip.is_ipv6() && v6only {
            " v6only"
        } else {
            ""
        };
        let _ = writeln!(out, "    bind {}{v6only}", addr(*ip, port));
    }
    if let Some(n) = settings.maxconn {
        let _ = writeln!(out, "    maxconn {n}");
    }
    if let Some(t) = settings.timeouts.client {
        let _ = writeln!(out, "    timeout client {t}");
    }
    let _ = writeln!(out, "    default_backend {backend}");
    // roundrobin is a dynamic algorithm: HAProxy refuses `add server` on a backend with a
    // static one (static-rr, a hash without `hash-type consistent`). `option redispatch`: a
    // connection attempt to a node's old address, in flight when the address changed, is
    // retried elsewhere instead of failing.
    let _ = write!(
        out,
        "\nbackend {backend}\n    mode {mode}\n    balance roundrobin\n    retries 3\n    option redispatch 1\n"
    );
    for (name, value) in [
        ("server", settings.timeouts.server),
        ("connect", settings.timeouts.connect),
        ("tunnel", settings.timeouts.tunnel),
    ] {
        if let Some(t) = value {
            let _ = writeln!(out, "    timeout {name} {t}");
        }
    }
    // The check's kind is the backend's: servers added at runtime check the same way. 2xx and
    // 3xx are up (HAProxy's default for `option httpchk`).
    if let Some(path) = &settings.check.http_path {
        let _ = writeln!(out, "    option httpchk GET {}", path.as_str());
    }
    let check = &settings.check;
    let mut server_options = String::from(" check");
    if let Some(p) = check.port {
        let _ = write!(server_options, " port {p}");
    }
    if let Some(i) = check.interval {
        let _ = write!(server_options, " inter {i}");
    }
    if let Some(r) = check.rise {
        let _ = write!(server_options, " rise {r}");
    }
    if let Some(f) = check.fall {
        let _ = write!(server_options, " fall {f}");
    }
    if let Some(k) = settings.proxy().server_keyword() {
        let _ = write!(server_options, " {k}");
    }
    for (node, spec) in &fe.servers {
        let _ = write!(
            out,
            "    server {node} {}{server_options}",
            addr(spec.node_ip, spec.node_port)
        );
        if let Some(w) = spec.weight {
            let _ = write!(out, " weight {w}");
        }
        match spec.state {
            ServerState::Ready => {}
            ServerState::Maint => out.push_str(" disabled"),
            // HAProxy 2.6 has no config keyword for drain. Starting the server in maintenance
            // keeps new traffic off it until drain is set: on a reload by the state file the
            // agent saved, which says drain, else by the agent through the runtime API after
            // the (re)start; a fresh process has no connections to drain anyway.
            ServerState::Drain => out.push_str(" disabled # drain: restored at runtime"),
        }
        out.push('\n');
    }
}

/// Whether two managed files differ in what only a reload can make HAProxy take: the
/// frontends and backends with their binds, timeouts and check kind, and the options every
/// server of a backend carries (PROXY version, check port and timing). Left out: the header, a
/// frontend's `maxconn` and each server's own name, address, weight and state, which the runtime
/// API sets (the reconciler repairs them); and a backend without servers on either side says
/// nothing of its servers' options (a file written before its servers were added).
pub fn same_listeners(a: &str, b: &str) -> bool {
    let (lines_a, options_a) = listeners_of(a);
    let (lines_b, options_b) = listeners_of(b);
    lines_a == lines_b
        && options_a
            .iter()
            .all(|(backend, opts)| options_b.get(backend).is_none_or(|other| other == opts))
}

/// A managed file's lines other than servers and runtime-set ones, and each backend's distinct
/// server options (what follows the address, without `weight N`, `disabled` and the comment).
fn listeners_of(
    text: &str,
) -> (
    Vec<&str>,
    std::collections::BTreeMap<&str, std::collections::BTreeSet<String>>,
) {
    let mut lines = Vec::new();
    let mut options: std::collections::BTreeMap<&str, std::collections::BTreeSet<String>> =
        Default::default();
    let mut backend = "";
    for line in text.lines() {
        if line.starts_with("# Managed by lbagent") || line.starts_with("    maxconn ") {
            continue;
        }
        if let Some(name) = line.strip_prefix("backend ") {
            backend = name.trim();
        }
        let Some(server) = line.strip_prefix("    server ") else {
            lines.push(line);
            continue;
        };
        let words = server.split('#').next().unwrap_or_default();
        let mut words = words.split_whitespace().skip(2);
        let mut kept = Vec::new();
        while let Some(w) = words.next() {
            match w {
                "weight" => {
                    words.next();
                }
                "disabled" => {}
                other => kept.push(other),
            }
        }
        options.entry(backend).or_default().insert(kept.join(" "));
    }
    (lines, options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mode, NodeName, ServerSpec};
    use std::collections::BTreeMap;

    fn server(ip: &str, port: u16, state: ServerState, weight: Option<u16>) -> ServerSpec {
        ServerSpec {
            node_ip: ip.parse().unwrap(),
            node_port: port,
            state,
            service: Some("traefik".into()),
            weight,
            lease: true,
        }
    }

    fn frontend(mode: Mode, servers: &[(&str, ServerSpec)]) -> std::sync::Arc<FrontendSpec> {
        std::sync::Arc::new(FrontendSpec {
            mode,
            settings: Default::default(),
            servers: servers
                .iter()
                .map(|(n, s)| (NodeName::new(n).unwrap(), s.clone()))
                .collect(),
        })
    }

    #[test]
    fn empty_state_is_just_the_header() {
        let st = DesiredState::default();
        assert_eq!(
            render_managed(&st, &RenderOptions::default()),
            "# Managed by lbagent: do not edit; generation 0\n"
        );
    }

    #[test]
    fn frontends_sorted_with_weights_states_and_ipv6() {
        let mut frontends = BTreeMap::new();
        // Inserted out of order: the output is still by ascending port.
        frontends.insert(
            8883,
            frontend(
                Mode::Tcp,
                &[(
                    "node-b",
                    server("2001:db8::1", 31883, ServerState::Ready, None),
                )],
            ),
        );
        frontends.insert(
            443,
            frontend(
                Mode::Http,
                &[
                    (
                        "node-c",
                        server("203.0.113.9", 30443, ServerState::Drain, None),
                    ),
                    (
                        "node-a",
                        server("203.0.113.7", 30443, ServerState::Ready, Some(5)),
                    ),
                    (
                        "node-b",
                        server("203.0.113.8", 30443, ServerState::Maint, Some(0)),
                    ),
                ],
            ),
        );
        let st = DesiredState {
            generation: 42,
            frontends,
            ..Default::default()
        };
        let expected = "\
# Managed by lbagent: do not edit; generation 42

frontend fe_443
    mode http
    bind 0.0.0.0:443
    default_backend be_443

backend be_443
    mode http
    balance roundrobin
    retries 3
    option redispatch 1
    server node-a 203.0.113.7:30443 check weight 5
    server node-b 203.0.113.8:30443 check weight 0 disabled
    server node-c 203.0.113.9:30443 check disabled # drain: restored at runtime

frontend fe_8883
    mode tcp
    bind 0.0.0.0:8883
    default_backend be_8883

backend be_8883
    mode tcp
    balance roundrobin
    retries 3
    option redispatch 1
    server node-b [2001:db8::1]:31883 check
";
        let text = render_managed(&st, &RenderOptions::default());
        assert_eq!(text, expected);
        // `starts_disabled` says which states are written `disabled`.
        for (node, state) in [
            ("node-a", ServerState::Ready),
            ("node-b", ServerState::Maint),
            ("node-c", ServerState::Drain),
        ] {
            let line = text
                .lines()
                .find(|l| l.contains(&format!("server {node} ")))
                .unwrap();
            assert_eq!(line.contains(" disabled"), starts_disabled(state), "{line}");
        }
        // Deterministic: rendering again gives the same bytes.
        assert_eq!(render_managed(&st, &RenderOptions::default()), text);
    }

    #[test]
    fn ipv6_bind_and_empty_backend() {
        let mut st = DesiredState {
            generation: 1,
            ..DesiredState::default()
        };
        st.frontends.insert(80, FrontendSpec::default().into());
        let opts = RenderOptions {
            frontend_binds: vec!["::".parse().unwrap()],
        };
        assert_eq!(
            render_managed(&st, &opts),
            "\
# Managed by lbagent: do not edit; generation 1

frontend fe_80
    mode tcp
    bind [::]:80
    default_backend be_80

backend be_80
    mode tcp
    balance roundrobin
    retries 3
    option redispatch 1
"
        );
        let opts = RenderOptions {
            frontend_binds: parse_frontend_binds("127.0.0.1,[::1]").unwrap(),
        };
        assert!(render_managed(&st, &opts)
            .contains("    bind 127.0.0.1:80\n    bind [::1]:80 v6only\n    default_backend"));
    }

    #[test]
    fn listeners_leave_out_what_the_runtime_api_sets() {
        let mut st = DesiredState {
            generation: 3,
            ..DesiredState::default()
        };
        st.frontends.insert(
            443,
            frontend(
                Mode::Tcp,
                &[("a", server("10.0.0.1", 30443, ServerState::Ready, None))],
            ),
        );
        let one = render_managed(&st, &RenderOptions::default());
        // Other servers, weights, states, generation and maxconn: the same listeners.
        let mut moved = st.clone();
        moved.generation = 9;
        let mut fe = (*frontend(
            Mode::Tcp,
            &[("b", server("10.0.0.2", 30444, ServerState::Maint, Some(7)))],
        ))
        .clone();
        fe.settings.maxconn = Some(50);
        moved.frontends.insert(443, fe.into());
        let other = render_managed(&moved, &RenderOptions::default());
        assert_ne!(one, other);
        assert!(same_listeners(&one, &other));
        // A backend without servers in one file says nothing of the servers' options.
        let mut empty = st.clone();
        empty.frontends.insert(443, frontend(Mode::Tcp, &[]));
        assert!(same_listeners(
            &one,
            &render_managed(&empty, &RenderOptions::default())
        ));
        // Binds, and every setting a reload carries, differ.
        let binds = RenderOptions {
            frontend_binds: parse_frontend_binds("0.0.0.0,::").unwrap(),
        };
        assert!(!same_listeners(&one, &render_managed(&st, &binds)));
        for json in [
            r#"{"proxy_protocol":"v1"}"#,
            r#"{"check":{"rise":5}}"#,
            r#"{"check":{"port":32000}}"#,
            r#"{"check":{"http_path":"/"}}"#,
            r#"{"timeouts":{"tunnel":"1h"}}"#,
        ] {
            let mut changed = st.clone();
            let mut fe = (*changed.frontends[&443]).clone();
            fe.settings = serde_json::from_str(json).unwrap();
            changed.frontends.insert(443, fe.into());
            let text = render_managed(&changed, &RenderOptions::default());
            assert!(!same_listeners(&one, &text), "{json}");
            assert!(!same_listeners(&text, &one), "{json}");
        }
        assert!(same_listeners("", ""));
    }

    #[test]
    fn bind_lists() {
        let ips = |t: &str| {
            parse_frontend_binds(t).map(|v| v.iter().map(|i| i.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(ips("0.0.0.0").unwrap(), ["0.0.0.0"]);
        assert_eq!(ips("127.0.0.1,::1").unwrap(), ["127.0.0.1", "::1"]);
        assert_eq!(ips("0.0.0.0, [::]").unwrap(), ["0.0.0.0", "::"]);
        for bad in [
            "",
            "0.0.0.0,",
            "localhost",
            "[127.0.0.1]",
            "::1,::1",
            "1.2.3.4;x",
            "[::1",
        ] {
            assert!(parse_frontend_binds(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn settings_render_on_the_frontend_the_backend_and_every_server() {
        let settings: crate::model::FrontendSettings = serde_json::from_str(
            r#"{"proxy_protocol":"v2","check":{"port":32123,"http_path":"/healthz","interval":"500ms","rise":1,"fall":5},"timeouts":{"client":"1m","server":"2m","tunnel":"1h","connect":"5s"},"maxconn":1000}"#,
        )
        .unwrap();
        let mut fe = (*frontend(
            Mode::Tcp,
            &[(
                "node-a",
                server("203.0.113.7", 30443, ServerState::Ready, Some(5)),
            )],
        ))
        .clone();
        fe.settings = settings;
        let mut st = DesiredState::default();
        st.frontends.insert(8883, fe.into());
        assert_eq!(
            render_managed(&st, &RenderOptions::default()),
            "\
# Managed by lbagent: do not edit; generation 0

frontend fe_8883
    mode tcp
    bind 0.0.0.0:8883
    maxconn 1000
    timeout client 1m
    default_backend be_8883

backend be_8883
    mode tcp
    balance roundrobin
    retries 3
    option redispatch 1
    timeout server 2m
    timeout connect 5s
    timeout tunnel 1h
    option httpchk GET /healthz
    server node-a 203.0.113.7:30443 check port 32123 inter 500ms rise 1 fall 5 send-proxy-v2 weight 5
"
        );
    }
}
