//! `lbctl frontend set|delete` against a real agent and HAProxy: a new port's settings make a
//! frontend with no servers (a reload), a maxconn change is live, the same settings again are
//! `unchanged`, settings left out go back to the default, each answered with one line; a bad
//! value is clap's error naming the flag before any request; a mode the frontend does not have
//! is the agent's 409 in one line, exit 2; an agent that is away exits 1; delete removes the
//! frontend, and deleting it again is the agent's 404, exit 2.

mod common;

use std::net::TcpListener;
use std::process::Output;
use std::time::Duration;

use common::agent::{eventually, lbctl, Agent};
use common::free_port;
use serde_json::{json, Value};

/// `lbctl frontend ARGS` against `agent_url`, signed with the agent's keys file.
fn frontend(agent: &Agent, agent_url: &str, args: &[&str]) -> Output {
    lbctl()
        .arg("frontend")
        .args(args)
        .args(["--agent", agent_url, "--key-file"])
        .arg(&agent.keys_path)
        .output()
        .expect("run lbctl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit 0 and exactly `line` on stdout, nothing on stderr.
fn assert_line(out: &Output, line: &str) {
    assert_eq!(
        (out.status.code(), text(&out.stdout), text(&out.stderr)),
        (Some(0), format!("{line}\n"), String::new())
    );
}

/// Exit `code`, nothing on stdout, and one line on stderr: returned.
fn one_error_line(out: &Output, code: i32) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

/// Frontend `port` in `GET /v1/frontends`, if the agent has it.
fn frontend_state(agent: &Agent, port: u16) -> Option<Value> {
    common::agent::frontend_in(&agent.state(), port)
}

/// `fe_<port>`'s maxconn (`slim`, the seventh column) in HAProxy's own `show stat`, read with a
/// plain CSV split.
fn haproxy_maxconn(agent: &Agent, port: u16) -> Option<String> {
    let stat = agent.admin_cmd("show stat");
    let row = format!("fe_{port},FRONTEND,");
    stat.lines()
        .find(|l| l.starts_with(&row))
        .map(|l| l.split(',').nth(6).unwrap_or_default().to_string())
}

#[test]
fn set_and_delete_a_frontend_in_one_line_each() {
    let agent = Agent::managed();
    let url = format!("http://{}", agent.addr);
    let fe = free_port();
    let check_port = free_port().to_string();
    let settings = [
        "--proxy-protocol",
        "v2",
        "--check-port",
        &check_port,
        "--check-http",
        "/healthz",
        "--timeout-tunnel",
        "1h",
    ];
    let port = fe.to_string();
    let set = |extra: &[&str]| {
        let args = [&["set", port.as_str()][..], &settings[..], extra].concat();
        frontend(&agent, &url, &args)
    };
    let generation = || agent.state()["generation"].as_u64().unwrap();

    // A new port: created with no servers, by a reload.
    let out = set(&["--maxconn", "100"]);
    let g = generation();
    assert_line(
        &out,
        &format!("frontend {fe}: applied reload (a new frontend), generation {g}"),
    );
    let state = frontend_state(&agent, fe).expect("the frontend");
    assert_eq!(state["mode"], "tcp");
    assert_eq!(state["servers"], json!([]));
    assert_eq!(
        state["settings"],
        json!({
            "proxy_protocol": "v2",
            "check": {"kind": "http", "port": check_port.parse::<u16>().unwrap(),
                      "http_path": "/healthz", "interval": "2s", "rise": 2, "fall": 3},
            "timeouts": {"tunnel": "1h"},
            "maxconn": 100,
        })
    );
    assert_eq!(haproxy_maxconn(&agent, fe).as_deref(), Some("100"));

    // maxconn alone changes live; HAProxy has it when the line is printed.
    let out = set(&["--maxconn", "250"]);
    assert_line(
        &out,
        &format!("frontend {fe}: applied runtime, generation {}", g + 1),
    );
    assert_eq!(haproxy_maxconn(&agent, fe).as_deref(), Some("250"));
    let out = set(&["--maxconn", "250"]);
    assert_line(
        &out,
        &format!("frontend {fe}: unchanged, generation {}", g + 1),
    );

    // A bad value: clap's error naming the flag, exit 2, and not a byte sent (the agent URL is
    // a listener that would queue the connection).
    let trap = TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_url = format!("http://{}", trap.local_addr().unwrap());
    let out = frontend(&agent, &trap_url, &["set", &port, "--maxconn", "0"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("invalid value '0' for '--maxconn <N>': 0 must be from 1 to 1000000"),
        "{err}"
    );
    assert_eq!(
        trap.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "lbctl connected although its arguments were refused"
    );

    // Another mode than the frontend's: the agent's 409, final.
    let out = set(&["--maxconn", "250", "--mode", "http"]);
    let err = one_error_line(&out, 2);
    assert!(
        err.starts_with(&format!(
            "lbctl: frontend {fe}: the agent refused it (409 conflict): frontend {fe} is in tcp mode"
        )),
        "{err}"
    );
    assert_eq!(generation(), g + 1, "a refused change was recorded");

    // The whole settings: what is left out goes back to the default (a reload, for the first
    // field that needed one).
    let out = frontend(&agent, &url, &["set", &port, "--maxconn", "250"]);
    assert_line(
        &out,
        &format!(
            "frontend {fe}: applied reload (proxy_protocol), generation {}",
            g + 2
        ),
    );
    let state = frontend_state(&agent, fe).unwrap();
    assert_eq!(state["settings"]["proxy_protocol"], "none");
    assert_eq!(state["settings"]["check"]["kind"], "tcp");
    assert_eq!(state["settings"]["timeouts"], json!({}));
    assert_eq!(state["settings"]["maxconn"], 250);

    // The agent away: a transport error, worth retrying (exit 1).
    let away = format!("http://127.0.0.1:{}", free_port());
    let out = frontend(&agent, &away, &["delete", &port]);
    let err = one_error_line(&out, 1);
    assert!(err.contains("cannot reach the agent at"), "{err}");

    // Delete: the frontend and HAProxy's fe_<port> go.
    let out = frontend(&agent, &url, &["delete", &port]);
    assert_line(
        &out,
        &format!(
            "frontend {fe}: applied reload (a removed frontend), generation {}",
            g + 3
        ),
    );
    assert!(frontend_state(&agent, fe).is_none());
    eventually(
        Duration::from_secs(10),
        "fe_ gone from show stat",
        || match haproxy_maxconn(&agent, fe) {
            None => Ok(()),
            Some(_) => Err(format!("fe_{fe} still in show stat")),
        },
    );
    let out = frontend(&agent, &url, &["delete", &port]);
    let err = one_error_line(&out, 2);
    assert_eq!(
        err,
        format!(
            "lbctl: frontend {fe}: the agent refused it (404 not_found): no frontend on port {fe}\n"
        )
    );
}
