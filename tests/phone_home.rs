//! `lbctl phone-home` and `lbctl sign` against a real agent and HAProxy, on loopback: the
//! sidecar follows an IP change read from `--node-ip-from url:...` within a few seconds at
//! `--interval 1s`, SIGTERM removes its server and exits 0, `--once` registers and exits, bad
//! settings exit 2; the frontend settings flags create a frontend with them (checked over HTTP
//! on their own port) and a sidecar asking for other settings gets one final 409 line; `lbctl
//! sign`'s headers are accepted by the agent. With an `--agent` list the sidecar registers
//! through the next agent when the first is dead, moves to the second when the first stops,
//! and refuses a bad URL anywhere in the list at start.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::agent::{
    eventually, frontend_in, http, ip_endpoint, lbctl, phone_home, through, Agent, Echo, Sidecar,
};
use common::free_port;

fn wait_for(within: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < within {
        if ok() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {within:?} waiting for {what}");
}

#[test]
fn sidecar_follows_an_ip_change_and_leaves_on_sigterm() {
    let agent = Agent::managed();
    let (a, b) = Echo::pair("127.0.0.2", "node at .2", "127.0.0.3", "node at .3");
    let ip = Arc::new(Mutex::new("127.0.0.2".to_string()));
    let url = ip_endpoint(ip.clone());
    let fe = free_port();

    let agent_url = format!("http://{}", agent.addr);
    let mut child = phone_home(&agent_url, &agent.keys_path, fe, a.port(), &url)
        .args(["--service", "web"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let sidecar = Sidecar(child);

    wait_for(Duration::from_secs(20), "traffic to .2", || {
        through(fe).is_ok_and(|r| r.contains("node at .2"))
    });
    *ip.lock().unwrap() = "127.0.0.3".into();
    let took = wait_for(Duration::from_secs(10), "traffic to .3", || {
        through(fe).is_ok_and(|r| r.contains("node at .3"))
    });
    assert!(took < Duration::from_secs(5), "IP change took {took:?}");
    // HAProxy is changed before the store commits and the state is published, so traffic can
    // reach .3 a moment before `state` says so.
    let fe_state = eventually(Duration::from_secs(5), "the state to show .3", || {
        let f = frontend_in(&agent.state(), fe).ok_or("no frontend")?;
        match f["servers"][0]["node_ip"] == "127.0.0.3" {
            true => Ok(f),
            false => Err(f.to_string()),
        }
    });
    assert_eq!(fe_state["servers"][0]["service"], "web");

    // SIGTERM: the server goes, the sidecar exits 0.
    let mut child = sidecar;
    common::send_signal(child.0.id(), "TERM");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}");
    let mut log = String::new();
    let mut stderr = stderr;
    stderr.read_to_string(&mut log).unwrap();
    let state = agent.state();
    let servers = frontend_in(&state, fe).map(|f| f["servers"].as_array().unwrap().len());
    assert_eq!(servers, Some(0), "{state}");
    // One line per change, not per heartbeat: the first registration, the move, the removal.
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() <= 4, "{log}");
    assert!(log.contains("127.0.0.3"), "{log}");
    assert!(log.contains("removed"), "{log}");
    drop(b);
}

#[test]
fn once_registers_and_exits_and_bad_settings_exit_2() {
    let agent = Agent::managed();
    let a = Echo::start("127.0.0.2", "once");
    let fe = free_port();
    let secret_file = agent.dir.path().join("secret");
    std::fs::write(
        &secret_file,
        format!("{}\n", String::from_utf8_lossy(&agent.secret)),
    )
    .unwrap();
    let base = |node: &str| {
        let mut c = lbctl();
        c.args([
            "phone-home",
            "--once",
            "--agent",
            &format!("http://{}", agent.addr),
        ])
        .args([
            "--frontend-port",
            &fe.to_string(),
            "--node-port",
            &a.port().to_string(),
        ])
        .args(["--node", node, "--node-ip", "127.0.0.2"])
        .arg("--key-file")
        .arg(&secret_file);
        c
    };
    let out = base("node-1").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(Duration::from_secs(10), "traffic", || {
        through(fe).is_ok_and(|r| r.contains("once"))
    });

    let bad = base("bad;name").output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("';'"));
    // A label the agent would refuse, and port 0: refused at start, by the agent's own checks.
    let label = base("node-1").args(["--service", "a b"]).output().unwrap();
    assert_eq!(label.status.code(), Some(2));
    let said = String::from_utf8_lossy(&label.stderr);
    assert!(said.contains("--service \"a b\" must be"), "{said}");
    let zero = lbctl()
        .args([
            "phone-home",
            "--once",
            "--frontend-port",
            "0",
            "--node-port",
            "30000",
        ])
        .args(["--node", "n", "--node-ip", "127.0.0.2"])
        .output()
        .unwrap();
    assert_eq!(zero.status.code(), Some(2));
    let said = String::from_utf8_lossy(&zero.stderr);
    assert!(said.contains("must be a port from 1 to 65535"), "{said}");

    // Policy refusal is final: exit 2 at once.
    let refused = lbctl()
        .args([
            "phone-home",
            "--once",
            "--agent",
            &format!("http://{}", agent.addr),
        ])
        .args([
            "--frontend-port",
            "22",
            "--node-port",
            "30000",
            "--node",
            "n",
            "--node-ip",
            "127.0.0.2",
        ])
        .arg("--key-file")
        .arg(&secret_file)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("403"));

    let no_key = lbctl()
        .args([
            "phone-home",
            "--once",
            "--frontend-port",
            "80",
            "--node-port",
            "30000",
        ])
        .args(["--node", "n", "--node-ip", "127.0.0.2"])
        .output()
        .unwrap();
    assert_eq!(no_key.status.code(), Some(2));
}

#[test]
fn settings_flags_make_the_frontend_and_a_different_one_is_refused_for_good() {
    let agent = Agent::managed();
    let node = Echo::start("127.0.0.1", "behind proxy v2");
    // The health port: any HTTP request answered 200, as kube-proxy's healthCheckNodePort
    // answers `GET /healthz` on a node with a ready endpoint.
    let health = ip_endpoint(Arc::new(Mutex::new("ok".into())));
    let health_port: u16 = health
        .trim_end_matches('/')
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    let fe = free_port();
    let agent_url = format!("http://{}", agent.addr);
    let sidecar = |node_name: &str, settings: &[&str]| {
        lbctl()
            .args(["phone-home", "--once", "--agent", &agent_url])
            .args(["--frontend-port", &fe.to_string()])
            .args(["--node-port", &node.port().to_string()])
            .args(["--node", node_name, "--node-ip", "127.0.0.1"])
            .arg("--key-file")
            .arg(&agent.keys_path)
            .args(settings)
            .output()
            .unwrap()
    };
    let check_port = health_port.to_string();
    let out = sidecar(
        "node-1",
        &[
            "--proxy-protocol",
            "v2",
            "--check-port",
            &check_port,
            "--check-http",
            "/healthz",
            "--check-interval",
            "200ms",
            "--timeout-tunnel",
            "1h",
            "--maxconn",
            "100",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frontend = || frontend_in(&agent.state(), fe).expect("the frontend");
    let settings = frontend()["settings"].clone();
    assert_eq!(
        settings,
        serde_json::json!({
            "proxy_protocol": "v2",
            "check": {"kind": "http", "port": health_port, "http_path": "/healthz",
                      "interval": "200ms", "rise": 2, "fall": 3},
            "timeouts": {"tunnel": "1h"},
            "maxconn": 100,
        })
    );
    // HAProxy checks the health port over HTTP (the node port would answer no HTTP), and the
    // traffic goes to the node port.
    eventually(Duration::from_secs(10), "an HTTP check passed", || {
        let seen = frontend()["servers"][0]["haproxy"]["check_status"].clone();
        match seen.as_str() {
            Some(c) if c.contains("L7OK") => Ok(()),
            _ => Err(format!("check_status {seen}")),
        }
    });
    assert_eq!(through(fe).unwrap(), "behind proxy v2");

    // `lbctl state` says so in a line.
    let state = lbctl()
        .args(["state", "--agent", &agent_url, "--key-file"])
        .arg(&agent.keys_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&state.stdout);
    assert!(
        text.contains(&format!(
            "  proxy v2, check http /healthz on :{health_port} every 200ms, timeouts tunnel 1h, maxconn 100\n"
        )),
        "{text}"
    );

    // Another node asking for only some of the same settings joins.
    let same = sidecar("node-2", &["--proxy-protocol", "v2", "--maxconn", "100"]);
    assert!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stderr)
    );
    // One asking for another PROXY version is refused with one line, at once and for good
    // (exit 2, no retry), and nothing of it is recorded.
    let started = Instant::now();
    let other = sidecar("node-3", &["--proxy-protocol", "v1"]);
    let said = String::from_utf8_lossy(&other.stderr);
    assert_eq!(other.status.code(), Some(2), "{said}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(
        said.contains("the agent refused it (409 conflict): ")
            && said.contains(&format!(
                "frontend.proxy_protocol: frontend {fe} has v2; this request asks for v1"
            )),
        "{said}"
    );
    let nodes: Vec<String> = frontend()["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(nodes, ["node-1", "node-2"]);
}

#[test]
fn sign_prints_headers_the_agent_accepts() {
    let agent = Agent::managed();
    let body_file = agent.dir.path().join("body.json");
    let body = r#"{"node_ip":"127.0.0.2","node_port":30000,"state":"maint"}"#;
    std::fs::write(&body_file, body).unwrap();
    let fe = free_port();
    let path = format!("/v1/frontends/{fe}/servers/signed");
    let out = lbctl()
        .args(["sign", "PUT", &path, "--body"])
        .arg(&body_file)
        .arg("--key-file")
        .arg(&agent.keys_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let headers: Vec<(&str, String)> = text
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    assert_eq!(headers.len(), 4, "{text}");
    let r = http(agent.addr, "PUT", &path, &headers, body.as_bytes());
    assert_eq!(r.status, 200, "{r:?}");
    // The same headers again: a replay.
    let r = http(agent.addr, "PUT", &path, &headers, body.as_bytes());
    assert_eq!(r.status, 401, "{r:?}");
}

/// An operator changes a frontend's settings while its sidecars still run with the old flags:
/// their next heartbeat is refused (409 naming the field), and rather than exit (which would let
/// the registration expire and take the node out of service) the sidecar renews without its
/// flags, says so once, and still follows its node's IP.
#[test]
fn a_sidecar_keeps_its_node_when_the_frontends_settings_change_under_it() {
    let agent = Agent::managed();
    let (a, b) = Echo::pair("127.0.0.2", "node at .2", "127.0.0.3", "node at .3");
    let ip = Arc::new(Mutex::new("127.0.0.2".to_string()));
    let url = ip_endpoint(ip.clone());
    let fe = free_port();
    let agent_url = format!("http://{}", agent.addr);
    let log = agent.root.join("sidecar.log");
    let child = phone_home(&agent_url, &agent.keys_path, fe, a.port(), &url)
        .args(["--maxconn", "100"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut sidecar = Sidecar(child);
    wait_for(Duration::from_secs(20), "traffic to .2", || {
        through(fe).is_ok_and(|r| r.contains("node at .2"))
    });
    // The operator's change: maxconn 200 (live).
    let r = agent.signed("PUT", &format!("/v1/frontends/{fe}"), r#"{"maxconn": 200}"#);
    assert_eq!(r.status, 200, "{r:?}");
    let told = |log: &std::path::Path| std::fs::read_to_string(log).unwrap_or_default();
    wait_for(
        Duration::from_secs(10),
        "the sidecar to say it renews without its flags",
        || told(&log).contains("frontend.maxconn") && told(&log).contains("renewing without"),
    );
    // Still renewing, and still following its node: the IP change reaches HAProxy.
    *ip.lock().unwrap() = "127.0.0.3".into();
    wait_for(Duration::from_secs(10), "traffic to .3", || {
        through(fe).is_ok_and(|r| r.contains("node at .3"))
    });
    assert!(
        sidecar.0.try_wait().unwrap().is_none(),
        "the sidecar runs: {}",
        told(&log)
    );
    assert_eq!(
        told(&log).matches("renewing without").count(),
        1,
        "said once, not at every heartbeat: {}",
        told(&log)
    );
    // The frontend's own settings stand.
    let state = agent.state();
    let f = frontend_in(&state, fe).unwrap();
    assert_eq!(f["settings"]["maxconn"], 200);
    drop(b);
}

/// The servers `agent` wants for frontend `fe`: node → node IP.
fn servers_of(agent: &Agent, fe: u16) -> Vec<(String, String)> {
    agent
        .desired()
        .1
        .into_iter()
        .filter(|((port, _), _)| *port == fe)
        .map(|((_, node), s)| (node, s.ip))
        .collect()
}

/// `--agent DEAD,LIVE`: the first attempt fails on the dead one, the sidecar says it tries the
/// next and registers through it; SIGTERM's DELETE goes to the one that took the registration.
#[test]
fn a_sidecar_registers_through_the_next_agent_when_the_first_is_dead() {
    let agent = Agent::managed();
    let a = Echo::start("127.0.0.2", "node at .2");
    let ip = Arc::new(Mutex::new("127.0.0.2".to_string()));
    let url = ip_endpoint(ip);
    let fe = free_port();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let live = format!("http://{}", agent.addr);
    let log = agent.root.join("sidecar.log");
    let child = phone_home(
        &format!("{dead},{live}"),
        &agent.keys_path,
        fe,
        a.port(),
        &url,
    )
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .unwrap();
    let mut sidecar = Sidecar(child);
    let told = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(Duration::from_secs(20), "traffic to .2", || {
        through(fe).is_ok_and(|r| r.contains("node at .2"))
    });
    // Traffic moves just before the agent stores the change and answers: wait for the answer.
    eventually(Duration::from_secs(10), "the registration's answer", || {
        if told().contains(&format!("serves frontend {fe} through {live}: ")) {
            Ok(())
        } else {
            Err(told())
        }
    });
    assert_eq!(
        servers_of(&agent, fe),
        [("node-1".to_string(), "127.0.0.2".to_string())]
    );
    let text = told();
    assert!(
        text.contains(&format!("cannot reach the agent at {dead}: "))
            && text.contains(&format!("; trying {live}\n")),
        "{text}"
    );

    common::send_signal(sidecar.0.id(), "TERM");
    let status = sidecar.0.wait().unwrap();
    assert!(status.success(), "{status}: {}", told());
    assert_eq!(servers_of(&agent, fe), []);
    assert!(
        told().contains(&format!(
            "node-1 removed from frontend {fe} through {live}\n"
        )),
        "{}",
        told()
    );
}

/// Two live agents with the same key and no shared state: the sidecar keeps to the first while
/// it answers (the second hears nothing); once the first is stopped, its next renewal, with the
/// node's new IP, reaches the second, whose HAProxy routes it.
#[test]
fn a_sidecar_fails_over_to_the_second_agent_when_the_first_stops() {
    let mut first = Agent::managed();
    let mut second = Agent::managed();
    second.share_key_of(&first);
    let (a, b) = Echo::pair("127.0.0.2", "node at .2", "127.0.0.3", "node at .3");
    let ip = Arc::new(Mutex::new("127.0.0.2".to_string()));
    let url = ip_endpoint(ip.clone());
    let fe = free_port();
    let (url_a, url_b) = (
        format!("http://{}", first.addr),
        format!("http://{}", second.addr),
    );
    let log = first.root.join("sidecar.log");
    let child = phone_home(
        &format!("{url_a},{url_b}"),
        &first.keys_path,
        fe,
        a.port(),
        &url,
    )
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .unwrap();
    let mut sidecar = Sidecar(child);
    let told = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(Duration::from_secs(20), "traffic to .2", || {
        through(fe).is_ok_and(|r| r.contains("node at .2"))
    });
    // A few heartbeats later the second still has nothing: each agent knows only what was
    // sent to it.
    let renewals = first.metric("lbagent_http_requests_total{route=\"put_server\",status=\"200\"}");
    eventually(Duration::from_secs(10), "two more renewals", || {
        let now = first.metric("lbagent_http_requests_total{route=\"put_server\",status=\"200\"}");
        if now >= renewals + 2.0 {
            Ok(())
        } else {
            Err(format!("{now} renewals"))
        }
    });
    assert_eq!(servers_of(&second, fe), []);

    first.stop();
    *ip.lock().unwrap() = "127.0.0.3".into();
    eventually(
        Duration::from_secs(20),
        "the second agent to get the server",
        || match servers_of(&second, fe)[..] {
            [(ref node, ref ip)] if node == "node-1" && ip == "127.0.0.3" => Ok(()),
            ref other => Err(format!("{other:?}; sidecar said: {}", told())),
        },
    );
    wait_for(
        Duration::from_secs(10),
        "traffic to .3 through the second",
        || through(fe).is_ok_and(|r| r.contains("node at .3")),
    );
    eventually(Duration::from_secs(10), "the second's answer", || {
        if told().contains(&format!("serves frontend {fe} through {url_b}: ")) {
            Ok(())
        } else {
            Err(told())
        }
    });
    let text = told();
    assert!(text.contains(&format!("; trying {url_b}\n")), "{text}");
    assert!(sidecar.0.try_wait().unwrap().is_none(), "{text}");
    // It keeps to the agent that works: one switch, not one per heartbeat.
    assert_eq!(text.matches("; trying ").count(), 1, "{text}");
    drop(b);
}

/// Every URL of the list is checked at start: a bad second one is exit 2 naming it, before any
/// request (the first, reachable or not, is never asked).
#[test]
fn a_bad_url_anywhere_in_the_agent_list_exits_2_naming_it() {
    for (list, named) in [
        (
            "http://127.0.0.1:1,ftp://lb-b:9900",
            "\"ftp://lb-b:9900\" must start with http://",
        ),
        (
            "http://127.0.0.1:1,http://lb b",
            "bad agent URL \"http://lb b\"",
        ),
        ("http://127.0.0.1:1,,http://lb-b", "has an empty URL"),
        (
            "http://127.0.0.1:1,http://127.0.0.1:1/",
            "lists http://127.0.0.1:1/ twice",
        ),
    ] {
        let started = Instant::now();
        let out = lbctl()
            .args(["phone-home", "--agent", list])
            .args(["--frontend-port", "443", "--node-port", "30443"])
            .args(["--node", "n", "--node-ip", "127.0.0.2"])
            .env("LBAGENT_KEY", "a-secret-for-the-url-check")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{list}: {said}");
        assert!(said.contains(named), "{list}: {said}");
        assert_eq!(said.lines().count(), 1, "{said}");
        assert!(started.elapsed() < Duration::from_secs(5), "{list}");
    }
}
