//! The seed-compatible endpoint, for migrating from the old webhook: `POST /hooks/update-haproxy`
//! with the `X-Funkypenguin-Token` header and the old sidecars' JSON, mapped onto the same model
//! with the same validation and policy. Off unless `--legacy-token-file` is given. It is a plain
//! shared token with no replay protection: a migration path only (docs/security.md).

use std::net::IpAddr;

use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::model::{
    check_service_label, Change, FrontendSettings, Mode, NodeName, ProxyProtocol, ServerSpec,
    ServerState,
};

/// The header the old sidecars send.
pub const TOKEN_HEADER: &str = "X-Funkypenguin-Token";

/// Compares a presented token with the configured one in constant time.
pub fn token_matches(expected: &[u8], presented: Option<&str>) -> bool {
    match presented {
        // Length is not secret; contents are compared without an early exit.
        Some(p) => p.len() == expected.len() && bool::from(p.as_bytes().ct_eq(expected)),
        None => false,
    }
}

/// The server name for a destination address: `ip-203-0-113-7`, `ip6-2001-db8--1`. The old
/// design keyed servers by address, so one address is one server.
pub fn node_for(ip: &IpAddr) -> NodeName {
    let name = match ip {
        IpAddr::V4(v4) => format!("ip-{}", v4.to_string().replace('.', "-")),
        IpAddr::V6(v6) => format!("ip6-{}", v6.to_string().replace(':', "-")),
    };
    NodeName::new(&name).expect("digits, hex, '-' and a letter prefix, at most 43 characters")
}

/// A port given as a JSON number or a string ("443"), through the one port check.
fn port_field(body: &Value, field: &'static str) -> Result<u16, String> {
    let v = body
        .get(field)
        .ok_or_else(|| format!("missing field `{field}`"))?;
    let checked = match v {
        Value::String(s) => crate::runtime::validate::port(field, s),
        other => crate::runtime::validate::port(field, other),
    };
    checked.map_err(|e| e.to_string())
}

fn string_field<'a>(body: &'a Value, field: &'static str) -> Result<&'a str, String> {
    match body.get(field) {
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(other) => Err(format!("{field} {other} must be a string")),
        None => Err(format!("missing field `{field}`")),
    }
}

/// `send-proxy` as the old script rendered it: `true` or `"true"` sent the PROXY v1 header; an
/// absent, `false` or empty value none.
fn send_proxy_field(body: &Value) -> Result<ProxyProtocol, String> {
    match body.get("send-proxy") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(ProxyProtocol::None),
        Some(Value::Bool(true)) => Ok(ProxyProtocol::V1),
        Some(Value::String(s)) if s.is_empty() || s == "false" => Ok(ProxyProtocol::None),
        Some(Value::String(s)) if s == "true" => Ok(ProxyProtocol::V1),
        Some(other) => Err(format!(
            "send-proxy {other} must be true or false (as a JSON boolean or a string)"
        )),
    }
}

/// Reads an old sidecar's request body into a change. `send-proxy` becomes the frontend's PROXY
/// version, given inline: a frontend made another way with another version refuses it (409).
/// Other fields the old script ignored are tolerated.
pub fn parse(body: &[u8]) -> Result<Change, String> {
    let body: Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    if !body.is_object() {
        return Err("the body must be a JSON object".into());
    }
    let frontend_port = port_field(&body, "frontend-port")?;
    let node_port = port_field(&body, "backend-port")?;
    let ip_text = string_field(&body, "dst-ip")?;
    let node_ip: IpAddr = ip_text
        .trim()
        .parse()
        .map_err(|_| format!("dst-ip {ip_text:?} is not an IPv4 or IPv6 address"))?;
    if node_ip.is_unspecified() || node_ip.is_multicast() {
        return Err(format!("dst-ip {node_ip} cannot be a server address"));
    }
    let name = string_field(&body, "name")?;
    check_service_label("name", name).map_err(|e| e.message)?;
    let node = node_for(&node_ip);
    match string_field(&body, "action")? {
        "add" => Ok(Change::PutServer {
            frontend_port,
            node,
            frontend: Some(FrontendSettings {
                proxy_protocol: Some(send_proxy_field(&body)?),
                ..FrontendSettings::default()
            }),
            mode: Mode::Tcp,
            spec: ServerSpec {
                node_ip,
                node_port,
                state: ServerState::Ready,
                service: Some(name.to_string()),
                weight: None,
                lease: false,
            },
        }),
        "delete" => Ok(Change::DeleteServer {
            frontend_port,
            node,
        }),
        other => Err(format!("action {other:?} must be \"add\" or \"delete\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_sidecar_json_with_strings() {
        let c = parse(br#"{"name":"traefik","frontend-port":"443","backend-port":"30443","dst-ip":"203.0.113.7","action":"add","send-proxy":"false"}"#).unwrap();
        let Change::PutServer {
            frontend_port,
            node,
            spec,
            mode,
            frontend,
        } = c
        else {
            panic!()
        };
        assert_eq!((frontend_port, mode), (443, Mode::Tcp));
        assert_eq!(frontend.unwrap().proxy_protocol, Some(ProxyProtocol::None));
        assert_eq!(node.as_str(), "ip-203-0-113-7");
        assert_eq!(spec.node_port, 30443);
        assert_eq!(spec.service.as_deref(), Some("traefik"));
        let d = parse(br#"{"name":"x","frontend-port":443,"backend-port":30443,"dst-ip":"2001:db8::1","action":"delete"}"#).unwrap();
        assert!(
            matches!(d, Change::DeleteServer { ref node, .. } if node.as_str() == "ip6-2001-db8--1")
        );
    }

    #[test]
    fn send_proxy_as_the_old_script_rendered_it() {
        let proxy = |extra: &str| {
            let body = format!(
                r#"{{"name":"mail","frontend-port":25,"backend-port":30025,"dst-ip":"10.0.0.1","action":"add"{extra}}}"#
            );
            match parse(body.as_bytes()) {
                Ok(Change::PutServer { frontend, .. }) => Ok(frontend.unwrap().proxy()),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e),
            }
        };
        for (extra, want) in [
            ("", ProxyProtocol::None),
            (r#","send-proxy":false"#, ProxyProtocol::None),
            (r#","send-proxy":"false""#, ProxyProtocol::None),
            (r#","send-proxy":"""#, ProxyProtocol::None),
            (r#","send-proxy":null"#, ProxyProtocol::None),
            (r#","send-proxy":true"#, ProxyProtocol::V1),
            (r#","send-proxy":"true""#, ProxyProtocol::V1),
        ] {
            assert_eq!(proxy(extra), Ok(want), "{extra}");
        }
        for bad in [r#","send-proxy":"yes""#, r#","send-proxy":1"#] {
            assert!(proxy(bad).unwrap_err().contains("send-proxy"), "{bad}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let cases: &[(&[u8], &str)] = &[
            (b"[]", "object"),
            (b"{", "invalid JSON"),
            (br#"{"name":"a","backend-port":1,"dst-ip":"1.2.3.4","action":"add"}"#, "frontend-port"),
            (br#"{"name":"a","frontend-port":"x","backend-port":1,"dst-ip":"1.2.3.4","action":"add"}"#, "frontend-port"),
            (br#"{"name":"a","frontend-port":1,"backend-port":70000,"dst-ip":"1.2.3.4","action":"add"}"#, "backend-port"),
            (br#"{"name":"a","frontend-port":1,"backend-port":1,"dst-ip":"1.2.3.4;x","action":"add"}"#, "dst-ip"),
            (br#"{"name":"a b","frontend-port":1,"backend-port":1,"dst-ip":"1.2.3.4","action":"add"}"#, "name"),
            (br#"{"name":"a","frontend-port":1,"backend-port":1,"dst-ip":"1.2.3.4","action":"nuke"}"#, "action"),
        ];
        for (body, needle) in cases {
            let e = parse(body).unwrap_err();
            assert!(e.contains(needle), "{}: {e}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn tokens() {
        assert!(token_matches(b"s3cret", Some("s3cret")));
        assert!(!token_matches(b"s3cret", Some("s3cres")));
        assert!(!token_matches(b"s3cret", Some("s3cret2")));
        assert!(!token_matches(b"s3cret", None));
    }
}
