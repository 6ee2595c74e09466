//! The seed-compatible endpoint against a real agent and HAProxy: the old sidecar's exact JSON
//! (string values, extra fields, the token header) registers a frontend and removes it again; a
//! wrong or missing token is refused; the endpoint is off unless configured.

mod common;

use std::time::Duration;

use common::agent::{legacy_agent, legacy_hook, through, Agent, Echo, LEGACY_TOKEN};

#[test]
fn old_sidecar_registers_and_deletes() {
    let (agent, _dir) = legacy_agent();
    let node = Echo::start("127.0.0.2", "legacy node");
    let fe = common::free_port();
    // Exactly what the old sidecars send: every value a string, plus fields we ignore.
    let add = format!(
        r#"{{"name":"traefik","frontend-port":"{fe}","backend-port":"{}","dst-ip":"127.0.0.2","action":"add","send-proxy":"false"}}"#,
        node.port()
    );
    let before = agent.state();

    let r = legacy_hook(&agent, Some("wrong-token-000000000"), &add);
    r.assert_error(401, "unauthorized", "wrong token");
    let r = legacy_hook(&agent, None, &add);
    r.assert_error(401, "unauthorized", "missing token");
    assert_eq!(agent.state()["generation"], before["generation"]);

    let r = legacy_hook(&agent, Some(LEGACY_TOKEN), &add);
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["applied"], "reload");
    assert_eq!(v["server"], "ip-127-0-0-2");
    common::agent::wait_reaches(fe, "legacy node", Duration::from_secs(10));
    let state = agent.state();
    let server = &state["frontends"][0]["servers"][0];
    assert_eq!(server["service"], "traefik");
    assert_eq!(server["node_port"], node.port());

    // Same validation and policy as the v1 API.
    let bad = add.replace("127.0.0.2", "127.0.0.2;show info");
    legacy_hook(&agent, Some(LEGACY_TOKEN), &bad).assert_error(400, "bad_request", "bad dst-ip");
    let port22 = add.replace(&format!("\"{fe}\""), "\"22\"");
    legacy_hook(&agent, Some(LEGACY_TOKEN), &port22).assert_error(403, "forbidden", "port 22");

    let delete = add.replace("\"add\"", "\"delete\"");
    let r = legacy_hook(&agent, Some(LEGACY_TOKEN), &delete);
    assert_eq!(r.status, 200, "{r:?}");
    let state = agent.state();
    assert_eq!(
        state["frontends"][0]["servers"].as_array().unwrap().len(),
        0
    );
    common::wait_until(
        Duration::from_secs(10),
        "the server to leave HAProxy",
        || through(fe).is_err(),
    );
}

#[test]
fn off_by_default() {
    let agent = Agent::managed();
    let r = legacy_hook(&agent, Some(LEGACY_TOKEN), "{}");
    r.assert_error(404, "not_found", "legacy endpoint off");
}
