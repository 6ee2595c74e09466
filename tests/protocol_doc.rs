//! docs/protocol.md's "Example with curl and openssl" is the whole protocol in a shell: this
//! runs that very block, unchanged, with bash against a real managed agent, and checks it prints
//! what the document says (`"applied":"reload"` the first time, `"applied":"unchanged"` the
//! second). And every JSON example of the document parses, its frontend settings are ones the
//! agent accepts, and the `settings` it shows in `GET /v1/frontends` are what the agent shows
//! for the `PUT /v1/frontends/{port}` example.

mod common;

use std::process::Command;

use common::agent::{Agent, Echo};

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
        .expect("read docs/protocol.md")
}

/// The ```json blocks of `text`, in order.
fn json_blocks(text: &str) -> Vec<String> {
    text.split("```json\n")
        .skip(1)
        .map(|b| b.split("\n```").next().unwrap().to_string())
        .collect()
}

/// The JSON blocks of the section under `heading` (up to the next heading).
fn section_json(doc: &str, heading: &str) -> Vec<serde_json::Value> {
    let section = doc
        .split_once(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("docs/protocol.md has no heading {heading:?}"))
        .1
        .split("\n#")
        .next()
        .unwrap();
    json_blocks(section)
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect()
}

fn settings_of(
    json: &serde_json::Value,
    prefix: &str,
) -> lbagent::model::settings::FrontendSettings {
    serde_json::from_value::<lbagent::model::settings::RawSettings>(json.clone())
        .unwrap_or_else(|e| panic!("{json}: {e}"))
        .validate(prefix)
        .unwrap_or_else(|e| panic!("{json}: {e}"))
}

#[test]
fn json_examples_parse_and_their_settings_are_the_agents() {
    let doc = doc();
    let blocks = json_blocks(&doc);
    assert!(blocks.len() >= 7, "{} JSON blocks", blocks.len());
    for b in &blocks {
        let v: serde_json::Value = serde_json::from_str(b)
            .unwrap_or_else(|e| panic!("a JSON example of docs/protocol.md: {e}\n{b}"));
        // Settings inline in a server's PUT.
        if let Some(f) = v.get("frontend").filter(|f| f.is_object()) {
            settings_of(f, "frontend.");
        }
    }
    let all = &section_json(&doc, "### Frontend settings")[0];
    let s = settings_of(all, "");
    assert!(s.proxy_protocol.is_some() && s.maxconn.is_some() && s.check.http_path.is_some());

    let mut put = section_json(
        &doc,
        "### `PUT /v1/frontends/{frontend_port}`: a frontend's settings",
    )[0]
    .clone();
    let mode = put.as_object_mut().unwrap().remove("mode");
    assert!(
        matches!(mode.as_ref().and_then(|m| m.as_str()), Some("tcp" | "http")),
        "{mode:?}"
    );
    let put = settings_of(&put, "").normalized();
    let get = &section_json(&doc, "### Settings in `GET /v1/frontends`")[0];
    assert_eq!(
        get["settings"],
        serde_json::to_value(lbagent::model::settings::SettingsView::from(&put)).unwrap(),
        "GET's settings example is not what the agent shows for the PUT example"
    );
}

/// The body of the first ```sh block after the heading `## Example with curl and openssl`.
fn example_block() -> String {
    let doc = doc();
    let section = doc
        .split_once("\n## Example with curl and openssl")
        .expect("docs/protocol.md has a section `## Example with curl and openssl`")
        .1;
    // Up to the next section, so a block elsewhere is never taken.
    let section = section.split("\n## ").next().unwrap();
    let start = section
        .find("```sh\n")
        .expect("a ```sh block in the section")
        + "```sh\n".len();
    let len = section[start..]
        .find("\n```")
        .expect("the ```sh block ends");
    section[start..start + len].to_string()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_curl_example_works_as_documented() {
    let missing: Vec<&str> = ["bash", "curl", "openssl"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        eprintln!("SKIPPED: the protocol example needs {missing:?}, not installed here");
        return;
    }
    let script = example_block();
    // The example uses frontend port 8443 and node port 30443. Own 127.0.0.2:30443 when
    // possible, so HAProxy's health checks reach our own listener.
    let _node = Echo::bind("127.0.0.2:30443", "node-a").ok();
    if std::net::TcpListener::bind("127.0.0.1:8443").is_err() {
        eprintln!("SKIPPED: 127.0.0.1:8443, the example's frontend port, is in use here");
        return;
    }
    let agent = Agent::managed();
    let run = || {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("set -euo pipefail\n{script}"))
            .env("AGENT", format!("http://{}", agent.addr))
            .env("KEYS", &agent.keys_path)
            .env("NODE_IP", "127.0.0.2")
            .output()
            .expect("run bash");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "the example failed ({}):\nstdout: {stdout}\nstderr: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
        let json: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("the example printed no JSON ({e}): {stdout:?}"));
        (stdout, json)
    };

    let (text, first) = run();
    assert!(text.contains(r#""applied":"reload""#), "{text}");
    assert_eq!(first["backend"], "be_8443");
    assert_eq!(first["server"], "node-a");
    assert_eq!(first["frontend_port"], 8443);
    assert_eq!(first["generation"], 1);
    // Exactly the line the document shows.
    assert_eq!(
        text.trim(),
        r#"{"applied":"reload","backend":"be_8443","frontend_port":8443,"generation":1,"reload_for":"a new frontend","server":"node-a"}"#
    );
    assert!(
        doc().contains(&format!("It prints `{}`", text.trim())),
        "docs/protocol.md does not quote the first answer as it is: {text}"
    );

    let (text, second) = run();
    assert!(text.contains(r#""applied":"unchanged""#), "{text}");
    assert_eq!(second["generation"], 1);

    // And it really is routed: HAProxy has the server the example asked for.
    let obs = agent.observed();
    let o = &obs[&("be_8443".to_string(), "node-a".to_string())];
    assert_eq!((o.addr.as_str(), o.port), ("127.0.0.2", 30443));
    let st = agent.state();
    let server = &st["frontends"][0]["servers"][0];
    assert_eq!(server["service"], "traefik");
}
