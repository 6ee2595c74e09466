//! Cheap observation, black box against a real HAProxy: a reload or restart of HAProxy by
//! someone else is noticed on the next look (`show info`, every reconcile interval) and repaired at once, without waiting for
//! the full comparison of the drift-check interval.

mod common;

use std::time::Duration;

use common::agent::{body, eventually, Agent, Echo, Options};
use common::free_port;
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(15);

/// An operator reloads HAProxy from a file that lacks node-b (as an older copy of the agent's
/// file would); with the full comparison an hour away, the agent still notices the new worker
/// on its next look and adds node-b back through the runtime API.
#[test]
fn someone_elses_reload_is_repaired_without_waiting_for_the_drift_check() {
    let agent = Agent::attached_with(
        "",
        Options {
            extra: vec!["--drift-check-interval".into(), "1h".into()],
            ..Options::default()
        },
    );
    let fe = free_port();
    let a = Echo::start("127.0.0.2", "A");
    let b = Echo::start("127.0.0.3", "B");
    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    let v = agent.put_ok(fe, "node-b", &body(&b.ip(), b.port(), json!({})), "runtime");
    let text = agent.managed_text_at(v["generation"].as_u64().unwrap());
    let without_b: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("server node-b "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without_b, text, "the file had node-b:\n{text}");
    std::fs::write(&agent.managed_cfg, without_b).unwrap();
    let noticed = |a: &Agent| a.log().matches("HAProxy restarted or reloaded").count();
    let before = noticed(&agent);
    // An operator's reload through the master CLI: the sockets stay up, so the agent only
    // learns of it from `show info` (a new worker's pid).
    let old = agent.show_proc();
    agent.master_cmd("reload");
    eventually(SETTLE, "the new worker", || {
        // The master re-executes itself: its CLI may be away for a moment.
        let Some(now) = agent.try_show_proc() else {
            return Err("the master CLI does not answer".into());
        };
        let pids = |l: &lbagent::runtime::parse::ProcList| -> Vec<u32> {
            l.workers.iter().map(|w| w.pid).collect()
        };
        (pids(&now) != pids(&old))
            .then_some(())
            .ok_or(format!("{now:?}"))
    });
    agent.wait_in_sync(SETTLE);
    assert!(
        noticed(&agent) > before,
        "the new worker was not what the agent noticed:\n{}",
        agent.log()
    );
}
