//! Scoped keys against a real agent and HAProxy: a key written as a table in the keys file may
//! change only its frontend ports, node names and node addresses, may not remove a whole
//! frontend unless allowed, sees only its part of the state (the API and `lbctl state`), stays
//! inside the global policy, and SIGHUP brings a new scope.

mod common;

use std::process::Command;
use std::time::Duration;

use common::agent::{
    body, eventually, through, wait_reaches, write_keys_text, Agent, Echo, Options,
};
use common::free_port;
use serde_json::{json, Value};

const DEFAULT_SECRET: &str = "attached-test-secret-0123456789abcdef";
const MQTT: &str = "mqtt-sidecar";
const MQTT_SECRET: &str = "mqtt-sidecar-secret-0123456789abcdef";

/// The harness's unscoped `default` key and a scoped `mqtt-sidecar` with `scope` lines.
fn keys_text(scope: &str) -> String {
    format!("default = \"{DEFAULT_SECRET}\"\n\n[{MQTT}]\nsecret = \"{MQTT_SECRET}\"\n{scope}")
}

fn put_as(a: &Agent, port: u16, node: &str, b: &Value) -> common::agent::Response {
    a.signed_as(
        MQTT,
        MQTT_SECRET,
        "PUT",
        &format!("/v1/frontends/{port}/servers/{node}"),
        &b.to_string(),
    )
}

/// Asserts a 403 naming the key and `rule`.
fn assert_refused(r: &common::agent::Response, rule: &str, what: &str) {
    r.assert_error(403, "forbidden", what);
    let m = r.json()["message"].as_str().unwrap().to_string();
    assert!(
        m.contains(&format!("{MQTT:?}")) && m.contains(rule),
        "{what}: the message should name the key and {rule}: {m}"
    );
}

/// `GET /v1/frontends` as the scoped key: port → node names.
fn seen_by_scoped(a: &Agent) -> Vec<(u64, Vec<String>)> {
    let r = a.signed_as(MQTT, MQTT_SECRET, "GET", "/v1/frontends", "");
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let nodes = f["servers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["node"].as_str().unwrap().to_string())
                .collect();
            (f["frontend_port"].as_u64().unwrap(), nodes)
        })
        .collect()
}

/// Sends SIGHUP and waits until the agent has logged one more key-file re-read.
fn sighup(a: &Agent) {
    let before = a.log().matches("key file re-read").count();
    a.signal("HUP");
    eventually(Duration::from_secs(10), "the key file re-read", || {
        let log = a.log();
        match log.matches("key file re-read").count() > before {
            true => Ok(()),
            false if log.contains("key file not re-read") => Err(format!("refused:\n{log}")),
            false => Err("not yet".into()),
        }
    });
}

#[test]
fn a_scoped_key_is_held_to_its_scope_and_sighup_changes_it() {
    // Node ports below 1024 are outside the global policy: a scope cannot let them in.
    let a = Agent::attached_with(
        "",
        Options {
            allow_node_ports: "1024-65535".into(),
            ..Options::default()
        },
    );
    let (mine, other) = (free_port(), free_port());
    let node_a = Echo::start("127.0.0.2", "node-a");
    let edge = Echo::start("127.0.0.3", "edge-1");

    // The operator's unscoped key sets up a frontend the scoped key must not touch.
    a.put_ok(
        other,
        "edge-1",
        &body(&edge.ip(), edge.port(), json!({})),
        "reload",
    );
    wait_reaches(other, "edge-1", Duration::from_secs(10));

    // 22 is inside the scope but outside the global policy (the default refuses it).
    write_keys_text(
        &a.keys_path,
        &keys_text(&format!(
            "frontend_ports = \"22,{mine}\"\nnodes = \"node-*\"\nnode_cidrs = \"127.0.0.2/32\"\n"
        )),
    );
    sighup(&a);

    // Inside its scope: a new frontend, then a second server, then a move.
    let inside = put_as(
        &a,
        mine,
        "node-a",
        &body(&node_a.ip(), node_a.port(), json!({})),
    );
    assert_eq!(inside.status, 200, "{inside:?}\n{}", a.log());
    assert_eq!(inside.json()["applied"], "reload");
    wait_reaches(mine, "node-a", Duration::from_secs(10));
    // The operator adds a server of another node to the scoped key's port.
    a.put_ok(
        mine,
        "edge-9",
        &body(&edge.ip(), edge.port(), json!({"state": "maint"})),
        "runtime",
    );

    // Outside: each rule refuses and is named, and nothing changes.
    let generation = a.state()["generation"].clone();
    let cases = [
        (
            put_as(
                &a,
                other,
                "node-a",
                &body(&node_a.ip(), node_a.port(), json!({})),
            ),
            "frontend_ports",
            "a port outside frontend_ports",
        ),
        (
            put_as(
                &a,
                mine,
                "edge-1",
                &body(&node_a.ip(), node_a.port(), json!({})),
            ),
            "nodes",
            "a node outside nodes",
        ),
        (
            put_as(
                &a,
                mine,
                "node-b",
                &body(&edge.ip(), edge.port(), json!({})),
            ),
            "node_cidrs",
            "an address outside node_cidrs",
        ),
        (
            a.signed_as(
                MQTT,
                MQTT_SECRET,
                "DELETE",
                &format!("/v1/frontends/{mine}"),
                "",
            ),
            "may_delete_frontend",
            "removing a whole frontend",
        ),
        (
            a.signed_as(
                MQTT,
                MQTT_SECRET,
                "DELETE",
                &format!("/v1/frontends/{other}/servers/edge-1"),
                "",
            ),
            "frontend_ports",
            "deleting a server on another port",
        ),
        (
            a.signed_as(
                MQTT,
                MQTT_SECRET,
                "DELETE",
                &format!("/v1/frontends/{mine}/servers/edge-9"),
                "",
            ),
            "nodes",
            "deleting a server of another node",
        ),
    ];
    for (r, rule, what) in &cases {
        assert_refused(r, rule, what);
    }
    assert_eq!(
        a.state()["generation"],
        generation,
        "a refusal changed the state"
    );
    assert_eq!(through(other).unwrap(), "edge-1");
    assert_eq!(through(mine).unwrap(), "node-a");

    // The global policy still holds inside the scope, naming the global rule.
    let r = put_as(
        &a,
        22,
        "node-a",
        &body(&node_a.ip(), node_a.port(), json!({})),
    );
    r.assert_error(403, "forbidden", "port 22");
    assert!(r.body.contains("allow-frontend-ports"), "{r:?}");
    let r = put_as(&a, mine, "node-a", &body(&node_a.ip(), 80, json!({})));
    r.assert_error(403, "forbidden", "node port 80");
    assert!(r.body.contains("allow-node-ports"), "{r:?}");

    // It sees its port and its nodes only; the unscoped key sees everything.
    assert_eq!(
        seen_by_scoped(&a),
        [(u64::from(mine), vec!["node-a".to_string()])]
    );
    assert_eq!(a.state()["frontends"].as_array().unwrap().len(), 2);
    // lbctl state reads the key from the keys file's table form.
    let out = Command::new(env!("CARGO_BIN_EXE_lbctl"))
        .args(["state", "--agent", &format!("http://{}", a.addr)])
        .arg("--key-file")
        .arg(&a.keys_path)
        .args(["--key-id", MQTT])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lbctl state: {out:?}");
    assert!(stdout.contains(&format!("FRONTEND {mine} ")), "{stdout}");
    assert!(!stdout.contains(&format!("FRONTEND {other} ")), "{stdout}");
    assert!(!stdout.contains("edge-"), "{stdout}");
    assert!(stdout.contains("node-a"), "{stdout}");

    // Inside its scope it may delete its own server.
    let r = a.signed_as(
        MQTT,
        MQTT_SECRET,
        "DELETE",
        &format!("/v1/frontends/{mine}/servers/node-a"),
        "",
    );
    assert_eq!(r.status, 200, "{r:?}");

    // SIGHUP after an edit: the other port and edge nodes come in, frontend removal too, and
    // the first port goes out.
    write_keys_text(
        &a.keys_path,
        &keys_text(&format!(
            "frontend_ports = \"{other}\"\nnodes = \"node-*,edge-?\"\nmay_delete_frontend = true\n"
        )),
    );
    sighup(&a);
    let r = put_as(
        &a,
        other,
        "edge-2",
        &body(&edge.ip(), edge.port(), json!({})),
    );
    assert_eq!(r.status, 200, "after SIGHUP, inside the new scope: {r:?}");
    let r = put_as(
        &a,
        mine,
        "node-a",
        &body(&node_a.ip(), node_a.port(), json!({})),
    );
    assert_refused(&r, "frontend_ports", "the port the new scope left out");
    assert_eq!(
        seen_by_scoped(&a),
        [(
            u64::from(other),
            vec!["edge-1".to_string(), "edge-2".to_string()]
        )]
    );
    // The operator's own server on that frontend, outside the key's nodes: removing the
    // frontend would remove it, so the key may not, until the operator takes it off.
    let ops = Echo::start("127.0.0.9", "OPS");
    a.put_ok(
        other,
        "ops-9",
        &body(&ops.ip(), ops.port(), json!({})),
        "runtime",
    );
    let delete_frontend = || {
        a.signed_as(
            MQTT,
            MQTT_SECRET,
            "DELETE",
            &format!("/v1/frontends/{other}"),
            "",
        )
    };
    let r = delete_frontend();
    assert_refused(
        &r,
        "nodes",
        "a frontend holding a node outside the key's nodes",
    );
    assert!(
        r.json()["message"].as_str().unwrap().contains("\"ops-9\""),
        "{r:?}"
    );
    let r = a.signed(
        "DELETE",
        &format!("/v1/frontends/{other}/servers/ops-9"),
        "",
    );
    assert_eq!(r.status, 200, "{r:?}");
    let r = delete_frontend();
    assert_eq!(r.status, 200, "may_delete_frontend = true: {r:?}");
    eventually(
        Duration::from_secs(10),
        "the frontend to close",
        || match common::agent::accepts(other) {
            false => Ok(()),
            true => Err("still accepting".into()),
        },
    );

    // A keys file that does not parse keeps the scope in force.
    write_keys_text(
        &a.keys_path,
        &keys_text(&format!("frontend_ports = \"{mine}\"\ncolour = \"blue\"\n")),
    );
    a.signal("HUP");
    eventually(Duration::from_secs(10), "the refused re-read", || {
        let log = a.log();
        match log.contains("key file not re-read") {
            true => Ok(log),
            false => Err("not yet".into()),
        }
    })
    .contains("colour")
    .then_some(())
    .expect("the log names the unknown field");
    let r = put_as(
        &a,
        mine,
        "node-a",
        &body(&node_a.ip(), node_a.port(), json!({})),
    );
    assert_refused(&r, "frontend_ports", "the old scope still in force");
}
