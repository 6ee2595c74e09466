//! The audit trail, black box: every change request, accepted or refused, is one JSON line in
//! `--audit-log` with its key id as presented, its peer, its status and, when accepted, the
//! entry before and after; the file is 0600 and reopened on SIGHUP.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::agent::{body, http, Agent, Echo, Options};
use common::{free_port, wait_until};
use serde_json::{json, Value};

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits until the file holds `n` records (the writer is a thread of its own).
fn wait_records(path: &Path, n: usize) -> Vec<Value> {
    wait_until(Duration::from_secs(10), "audit records", || {
        lines(path).len() >= n
    });
    lines(path)
}

/// A managed agent writing its audit trail to a file in a temp dir of its own, with `extra`
/// flags; the temp dir lives as long as the first value.
fn auditing_agent(extra: &[&str]) -> (tempfile::TempDir, std::path::PathBuf, Agent) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let mut flags = vec!["--audit-log".to_string(), log.display().to_string()];
    flags.extend(extra.iter().map(|f| f.to_string()));
    let agent = Agent::managed_with(Options {
        extra: flags,
        ..Options::default()
    });
    (dir, log, agent)
}

#[test]
fn every_change_request_is_one_line_with_its_key_and_what_it_did() {
    let (dir, log, agent) = auditing_agent(&[]);
    let fe = free_port();
    let a = Echo::start("127.0.0.2", "A");
    let path = format!("/v1/frontends/{fe}/servers/node-a");

    // Accepted: a new frontend (reload), a move (runtime), the same again (unchanged).
    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    agent.put_ok(
        fe,
        "node-a",
        &body(&a.ip(), a.port(), json!({"weight": 7})),
        "runtime",
    );
    // Refused: a stranger's key id (401, recorded as presented), a bad body (400), and a GET,
    // which is no change and not recorded.
    let mut h = agent.auth_headers("PUT", &path, b"{}");
    for (name, value) in h.iter_mut() {
        if *name == lbagent::auth::HEADER_KEY {
            *value = "intruder".into();
        }
    }
    let r = http(agent.addr, "PUT", &path, &h, b"{}");
    assert_eq!(r.status, 401, "{r:?}");
    let r = agent.signed("PUT", &path, r#"{"node_ip":"nope","node_port":1}"#);
    assert_eq!(r.status, 400, "{r:?}");
    agent.state();
    // Accepted removals: the server, then its (empty) frontend.
    let r = agent.signed("DELETE", &path, "");
    assert_eq!(r.status, 200, "{r:?}");
    let r = agent.signed("DELETE", &format!("/v1/frontends/{fe}"), "");
    assert_eq!(r.status, 200, "{r:?}");

    let recs = wait_records(&log, 6);
    assert_eq!(recs.len(), 6, "{recs:#?}");
    for r in &recs {
        for field in [
            "time", "key_id", "peer", "method", "path", "status", "outcome",
        ] {
            assert!(r.get(field).is_some(), "{field} missing: {r}");
        }
        assert!(r["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{r}");
        humantime::parse_rfc3339(r["time"].as_str().unwrap()).unwrap();
    }
    let (created, moved, stranger, bad, deleted, removed) =
        (&recs[0], &recs[1], &recs[2], &recs[3], &recs[4], &recs[5]);
    assert_eq!(created["key_id"], "default");
    assert_eq!(
        (created["method"].as_str(), created["path"].as_str()),
        (Some("PUT"), Some(path.as_str()))
    );
    assert_eq!(
        (created["status"].as_u64(), created["outcome"].as_str()),
        (Some(200), Some("accepted"))
    );
    assert_eq!(created["before"], Value::Null);
    assert_eq!(created["after"]["node_port"], a.port());
    assert_eq!(moved["before"]["node_port"], a.port());
    assert!(moved["before"].get("weight").is_none(), "{moved}");
    assert_eq!(moved["after"]["weight"], 7);

    assert_eq!(stranger["key_id"], "intruder");
    assert_eq!(
        (stranger["status"].as_u64(), stranger["outcome"].as_str()),
        (Some(401), Some("refused"))
    );
    assert!(
        stranger["reason"]
            .as_str()
            .unwrap()
            .contains("unknown key id"),
        "{stranger}"
    );
    assert!(stranger.get("before").is_none(), "{stranger}");
    assert_eq!(bad["status"], 400);
    assert!(bad["reason"].as_str().unwrap().contains("node_ip"), "{bad}");

    assert_eq!(deleted["method"], "DELETE");
    assert_eq!(deleted["before"]["weight"], 7);
    assert_eq!(deleted["after"], Value::Null);
    assert_eq!(removed["path"], format!("/v1/frontends/{fe}"));
    assert_eq!(removed["before"]["servers"], json!({}));
    assert_eq!(removed["after"], Value::Null);

    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // logrotate: move the file, SIGHUP; the next record goes to a new file.
    let rotated = dir.path().join("audit.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    agent.signal("HUP");
    wait_until(Duration::from_secs(10), "the audit log reopened", || {
        log.exists()
    });
    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    let recs = wait_records(&log, 1);
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["outcome"], "accepted");
    assert_eq!(lines(&rotated).len(), 6);
}

/// A change whose client goes away right after sending it is applied (the owner has it), so
/// it must be in the audit trail all the same.
#[test]
fn a_change_whose_client_hangs_up_at_once_is_recorded() {
    use std::io::Write;
    let (_dir, log, agent) = auditing_agent(&[]);
    let fe = free_port();
    let a = Echo::start("127.0.0.2", "A");
    // The frontend first (a reload, answered), then moves whose clients do not wait.
    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    let hang_ups = 10;
    for i in 0..hang_ups {
        let path = format!("/v1/frontends/{fe}/servers/node-{i}");
        let b = body(&a.ip(), a.port(), json!({})).to_string();
        let mut req = format!(
            "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n",
            b.len()
        );
        for (k, v) in agent.auth_headers("PUT", &path, b.as_bytes()) {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(&b);
        let mut c = std::net::TcpStream::connect(agent.addr).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        drop(c);
    }
    // Every server that was added has its line.
    wait_until(
        Duration::from_secs(15),
        "the hung-up changes applied",
        || agent.desired().1.len() == hang_ups + 1,
    );
    let recs = wait_records(&log, hang_ups + 1);
    let added: usize = recs
        .iter()
        .filter(|r| r["outcome"] == "accepted" && r["before"].is_null())
        .count();
    assert_eq!(added, hang_ups + 1, "{recs:#?}");
}

/// Strangers' refusals are recorded up to their address's failure burst, then left out and
/// counted: they cannot fill the disk. A key holder's changes are still recorded.
#[test]
fn a_strangers_flood_is_bounded_in_the_trail() {
    let (_dir, log, agent) = auditing_agent(&["--auth-failure-burst", "5"]);
    let fe = free_port();
    for _ in 0..50 {
        // An unsigned PUT (401) and a method the route does not have (405), from 127.0.0.1.
        let r = http(
            agent.addr,
            "PUT",
            &format!("/v1/frontends/{fe}/servers/x"),
            &[],
            b"",
        );
        assert!(matches!(r.status, 401 | 429), "{r:?}");
        let r = http(agent.addr, "POST", &format!("/v1/frontends/{fe}"), &[], b"");
        assert!(matches!(r.status, 405), "{r:?}");
    }
    let a = Echo::start("127.0.0.2", "A");
    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    wait_until(Duration::from_secs(10), "the key holder's record", || {
        lines(&log).iter().any(|r| r["outcome"] == "accepted")
    });
    let recs = lines(&log);
    // The burst of 5, plus at most one a second refilled while the loop ran.
    assert!(
        recs.len() <= 5 + 10 + 1,
        "{} records: {recs:#?}",
        recs.len()
    );
    assert!(agent.metric("lbagent_audit_suppressed_total") >= 80.0);
}

#[test]
fn without_a_file_the_records_go_to_the_log() {
    let agent = Agent::managed();
    let fe = free_port();
    let a = Echo::start("127.0.0.2", "A");
    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    wait_until(Duration::from_secs(10), "an audit line in the log", || {
        agent.log().lines().any(|l| {
            l.contains("\"outcome\":\"accepted\"")
                && l.contains(&format!("/v1/frontends/{fe}/servers/node-a"))
        })
    });
}

#[test]
fn an_audit_log_that_cannot_be_opened_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lbagent"))
        .args(["--state-dir"])
        .arg(dir.path().join("state"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--audit-log")
        .arg(dir.path().join("no/such/dir/audit.log"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--audit-log") && err.contains("no/such/dir"),
        "{err}"
    );
}
