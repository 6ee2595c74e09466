//! Health across reloads, black box: the real agent and a real HAProxy. A reload for another
//! frontend must leave every server of the existing ones as it was: a server whose checks fail
//! is DOWN in the new worker from its first moment (not UP until a check runs), a drained one
//! is DRAIN (not in maintenance until the agent repairs it), and both keep the age of their
//! state, which a worker that started them afresh could not report.

mod common;

use std::time::{Duration, Instant};

use common::agent::{body, eventually, Agent, Echo, Options};
use common::free_port;
use lbagent::runtime::parse::{OperState, ServerState};
use serde_json::json;

/// Long enough for the old worker's first checks (every 2 s by default) to find the closed
/// port, and for the states to be old enough to tell apart from fresh ones.
const SETTLE: Duration = Duration::from_secs(20);

/// Seconds a state must have lasted before the reload: more than the rounding of
/// `srv_time_since_last_change` (whole seconds) can explain away.
const AGE: u64 = 4;

fn row<'a>(rows: &'a [ServerState], backend: &str, server: &str) -> Option<&'a ServerState> {
    rows.iter()
        .find(|r| r.backend == backend && r.server == server)
}

/// The pid of the worker behind the admin socket.
fn worker_pid(agent: &Agent) -> String {
    let info = agent.admin_cmd("show info");
    info.lines()
        .find_map(|l| l.strip_prefix("Pid: "))
        .unwrap_or_else(|| panic!("no Pid in show info: {info}"))
        .trim()
        .to_string()
}

/// `show stat`'s status column for `backend/server`.
fn stat_status(agent: &Agent, backend: &str, server: &str) -> String {
    let stat = agent.admin_cmd("show stat");
    let prefix = format!("{backend},{server},");
    let line = stat
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("{backend}/{server} not in show stat:\n{stat}"));
    line.split(',').nth(17).unwrap_or_default().to_string()
}

/// Waits until `backend/server` satisfies `what` and its state is at least [`AGE`] old.
fn wait_settled(agent: &Agent, backend: &str, server: &str, what: fn(&ServerState) -> bool) {
    eventually(SETTLE, &format!("{backend}/{server} to settle"), || {
        let rows = agent.servers_state();
        match row(&rows, backend, server) {
            Some(r) if what(r) && r.last_change_s.unwrap_or(0) >= AGE => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

fn is_down(r: &ServerState) -> bool {
    r.oper_state == Some(OperState::Stopped)
}

fn is_drain(r: &ServerState) -> bool {
    r.admin.draining() && !r.admin.in_maintenance()
}

/// Sets up the servers the reload must not disturb (in `be_<fe>`: `node-down` on a closed port,
/// `node-drain` drained, both added at runtime after `node-z` created the frontend, so the
/// rewritten file gives them other ids than they had), reloads through a new frontend, and
/// checks the new worker at once.
fn check_health_survives_a_reload(agent: &Agent, up: &Echo) {
    let fe = free_port();
    let closed = free_port();
    let be = format!("be_{fe}");
    agent.put_ok(
        fe,
        "node-z",
        &body(&up.ip(), up.port(), json!({})),
        "reload",
    );
    agent.put_ok(
        fe,
        "node-down",
        &body("127.0.0.1", closed, json!({})),
        "runtime",
    );
    agent.put_ok(
        fe,
        "node-drain",
        &body(&up.ip(), up.port(), json!({"state": "drain"})),
        "runtime",
    );
    wait_settled(agent, &be, "node-down", is_down);
    wait_settled(agent, &be, "node-drain", is_drain);
    let old_worker = worker_pid(agent);
    let repairs = agent.metric("lbagent_drift_repairs_total");

    let reloaded_at = Instant::now();
    let other = free_port();
    agent.put_ok(
        other,
        "node-x",
        &body(&up.ip(), up.port(), json!({})),
        "reload",
    );
    let rows = agent.servers_state();
    let since_reload = reloaded_at.elapsed().as_secs();
    assert_ne!(
        worker_pid(agent),
        old_worker,
        "the reload made a new worker"
    );
    // A worker that started a server afresh cannot report its state older than itself.
    let older_than_the_worker = |r: &ServerState| r.last_change_s.unwrap_or(0) > since_reload + 1;

    let down = row(&rows, &be, "node-down").expect("node-down in the new worker");
    assert!(
        is_down(down) && older_than_the_worker(down),
        "node-down must start DOWN with its old state: {down:?}\n{}",
        agent.log()
    );
    assert_eq!(stat_status(agent, &be, "node-down"), "DOWN");
    let drain = row(&rows, &be, "node-drain").expect("node-drain in the new worker");
    assert!(
        is_drain(drain) && older_than_the_worker(drain),
        "node-drain must start DRAIN with its old state: {drain:?}\n{}",
        agent.log()
    );
    assert!(stat_status(agent, &be, "node-drain").starts_with("DRAIN"));
    // The new worker started as desired: nothing for the agent to put back.
    assert_eq!(agent.metric("lbagent_drift_repairs_total"), repairs);
    agent.wait_in_sync(SETTLE);
}

#[test]
fn managed_health_and_drain_survive_a_reload() {
    let agent = Agent::managed();
    let up = Echo::start("127.0.0.2", "UP");
    check_health_survives_a_reload(&agent, &up);
    // A hand-over for one reload: nothing is left for a later start to load.
    let file = agent.state_dir.join("haproxy/server-state");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "1\n", "cleared");
    // The rendered main file holds the setting, and HAProxy runs it.
    let main = std::fs::read_to_string(agent.state_dir.join("haproxy/haproxy.cfg")).unwrap();
    assert!(main.contains("\n    hard-stop-after 1800s\n"), "{main}");
    // The file was there from the first start on: HAProxy 2.6 warns about a missing one.
    let log = agent.haproxy_log_text();
    assert!(!log.contains("server state file"), "{log}");
}

#[test]
fn attached_health_survives_a_reload_with_server_state_file() {
    // The lines docs/operations.md tells the operator to add, after the harness's own sections
    // (a second `defaults` replaces the first for every proxy after it, so it says it all).
    let side = tempfile::tempdir().unwrap();
    let file = side.path().join("server-state");
    let up = Echo::start("127.0.0.3", "UP");
    let operator = format!(
        "global
    server-state-file {file}

defaults
    mode tcp
    timeout connect 1s
    timeout client 10s
    timeout server 10s
    load-server-state-from-file global

backend app
    server web1 {ip}:{port} check
",
        file = file.display(),
        ip = up.ip(),
        port = up.port(),
    );
    let agent = Agent::attached_with(
        &operator,
        Options {
            extra: vec!["--server-state-file".into(), file.display().to_string()],
            ..Options::default()
        },
    );
    // The operator's own server, put in maintenance by hand: its row goes over as HAProxy
    // wrote it, so it stays so.
    agent.admin_cmd("set server app/web1 state maint");
    check_health_survives_a_reload(&agent, &up);
    let rows = agent.servers_state();
    let web1 = row(&rows, "app", "web1").expect("app/web1");
    assert!(web1.admin.in_maintenance(), "{web1:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "1\n", "cleared");
}

#[test]
fn settings_of_the_other_mode_are_refused() {
    let refused = |args: &[&str], what: &str| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lbagent"))
            .args(["--state-dir", &dir.path().display().to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(what), "{args:?}: {stderr}");
        // Refused before anything started: no HAProxy directory.
        assert!(!dir.path().join("haproxy").exists(), "{args:?}");
    };
    refused(
        &["--server-state-file", "/tmp/x"],
        "--server-state-file /tmp/x is for attached mode",
    );
    refused(
        &["--hard-stop-after", "soon"],
        "'--hard-stop-after <DURATION>': \"soon\" is not a duration",
    );
    refused(
        &["--hard-stop-after", "0s"],
        "--hard-stop-after 0s is out of range: it must be from 1s to 24days",
    );
    refused(
        &["--hard-stop-after", "30d"],
        "--hard-stop-after 30days is out of range",
    );
    let attached = [
        "--socket",
        "/nonexistent/admin.sock",
        "--keys-file",
        "/nonexistent/keys.toml",
    ];
    refused(
        &[&attached[..], &["--hard-stop-after", "30m"]].concat(),
        "--hard-stop-after is for managed mode",
    );
    refused(
        &[&attached[..], &["--server-state-file", "state"]].concat(),
        "--server-state-file state: must be an absolute path",
    );
}

/// A reload's state file carries each server's check port, and HAProxy applies a row's check
/// port over the config's own `port`: the agent writes the frontend's check port into its rows,
/// so a settings change that moves the checks (here back to the traffic port, a reload) holds in
/// the new worker instead of the old worker's port coming back from the file.
#[test]
fn a_reload_hands_over_the_check_port_the_settings_say() {
    let agent = Agent::managed();
    let up = Echo::start("127.0.0.2", "UP");
    let fe = free_port();
    let closed = free_port();
    let be = format!("be_{fe}");
    let settings = |check: serde_json::Value| {
        let r = agent.signed(
            "PUT",
            &format!("/v1/frontends/{fe}"),
            &json!({ "check": check }).to_string(),
        );
        assert_eq!(r.status, 200, "{r:?}");
        r.json()
    };
    settings(json!({"port": closed, "interval": "100ms", "rise": 1, "fall": 1}));
    agent.put_ok(
        fe,
        "node-a",
        &body(&up.ip(), up.port(), json!({})),
        "runtime",
    );
    let check_port =
        |agent: &Agent| row(&agent.servers_state(), &be, "node-a").and_then(|r| r.check_port);
    eventually(
        Duration::from_secs(10),
        "DOWN on the closed check port",
        || match row(&agent.servers_state(), &be, "node-a") {
            Some(r) if is_down(r) && r.check_port == Some(closed) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let pid = worker_pid(&agent);
    let v = settings(json!({"interval": "100ms", "rise": 1, "fall": 1}));
    assert_eq!(
        (v["applied"].as_str(), v["reload_for"].as_str()),
        (Some("reload"), Some("check.port")),
        "{v}"
    );
    assert_ne!(worker_pid(&agent), pid, "a new worker");
    // 0: no port of its own, the checks go to the traffic port, where the echo answers.
    assert_eq!(check_port(&agent), Some(0));
    eventually(
        Duration::from_secs(10),
        "UP on the traffic port",
        || match row(&agent.servers_state(), &be, "node-a") {
            Some(r) if r.oper_state == Some(OperState::Running) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // And a move between two ports is live: no new worker.
    let pid = worker_pid(&agent);
    let other = free_port();
    settings(json!({"port": up.port(), "interval": "100ms", "rise": 1, "fall": 1}));
    let pid_after_set = worker_pid(&agent);
    let v = settings(json!({"port": other, "interval": "100ms", "rise": 1, "fall": 1}));
    assert_eq!(v["applied"], "runtime", "{v}");
    assert_eq!(worker_pid(&agent), pid_after_set);
    assert_ne!(
        pid_after_set, pid,
        "from the traffic port to a port was a reload"
    );
    assert_eq!(check_port(&agent), Some(other));
}
