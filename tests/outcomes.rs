//! Per-request outcomes, black box against a real HAProxy: in a group of changes, a request
//! whose runtime command HAProxy refused is told so (202 pending with HAProxy's words, retried
//! by the timer), and the other requests are not affected.

mod common;

use std::time::Duration;

use common::agent::{body, Agent, Echo, Options};
use common::free_port;
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(15);

/// An operator deletes node-a behind the agent's back (through the stats socket); the next
/// address change for node-a is refused by HAProxy (`No such server.`) and answered 202 with
/// that refusal, while node-b's change, sent at the same time, is applied (200). The timer then
/// adds node-a at its new address.
#[test]
fn a_refused_command_is_told_to_its_own_request_only() {
    // A long reconcile interval, so the timer does not repair node-a before the PUTs.
    let agent = Agent::managed_with(Options {
        extra: vec!["--reconcile-interval".into(), "5".into()],
        ..Options::default()
    });
    let fe = free_port();
    let be = format!("be_{fe}");
    let a = Echo::start("127.0.0.2", "A");
    let b = Echo::start("127.0.0.3", "B");
    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    agent.put_ok(fe, "node-b", &body(&b.ip(), b.port(), json!({})), "runtime");
    agent.wait_in_sync(SETTLE);
    agent.admin_cmd(&format!("set server {be}/node-a state maint"));
    let deleted = agent.admin_cmd(&format!("del server {be}/node-a"));
    assert!(deleted.contains("Server deleted"), "{deleted}");

    let a2 = Echo::start("127.0.0.4", "A2");
    let b2 = Echo::start("127.0.0.5", "B2");
    let (ra, rb) = std::thread::scope(|s| {
        let ra = s.spawn(|| agent.put(fe, "node-a", &body(&a2.ip(), a2.port(), json!({}))));
        let rb = s.spawn(|| agent.put(fe, "node-b", &body(&b2.ip(), b2.port(), json!({}))));
        (ra.join().unwrap(), rb.join().unwrap())
    });
    assert_eq!(ra.status, 202, "{ra:?}");
    let va = ra.json();
    assert_eq!(va["applied"], "pending", "{va}");
    let why = va["haproxy_refused"].as_str().unwrap_or_default();
    assert!(
        why.contains(&format!("set server {be}/node-a addr")) && why.contains("No such server"),
        "{va}"
    );
    assert_eq!(rb.status, 200, "{rb:?}");
    assert_eq!(rb.json()["applied"], "runtime", "{rb:?}");
    assert!(rb.json()["haproxy_refused"].is_null());
    // Stored, and the timer adds node-a where it was asked to be.
    agent.wait_in_sync(SETTLE);
    let obs = agent.observed();
    assert_eq!(obs[&(be.clone(), "node-a".into())].addr, a2.ip());
    assert_eq!(obs[&(be, "node-b".into())].addr, b2.ip());
}
