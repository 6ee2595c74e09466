//! Several agents sharing their state through etcd (issue #12), all real: a three-member etcd
//! cluster on loopback (Debian's `etcd`), two managed agents each with its own HAProxy on its
//! own loopback address (A on 127.0.0.11, B on 127.0.0.12), echo backends as nodes.
//!
//! - a change through either agent reaches both HAProxies (a new frontend by each VM's own
//!   reload, a move live, a removal), and both show the store, the revision and the agents;
//! - concurrent changes of one frontend through both agents lose none of them, and leave both
//!   HAProxies identical;
//! - an agent killed while changes go through the other, and etcd compacted meanwhile, catches
//!   up when it starts again; one whose etcd member was down past a compaction re-reads;
//! - one member down changes nothing; two down: changes get 503 `store_unavailable` naming
//!   etcd within 10 s, `/healthz` is 503 naming etcd, `lbctl health --serving` stays 0, and
//!   HAProxy keeps routing; with quorum back, changes flow again;
//! - a registration expires once over all agents, renewals through the other agent count;
//! - an agent started while etcd has no quorum serves the last state it applied;
//! - `--seed-from-local` moves one VM's journal into an empty prefix;
//! - a second agent under a name another holds is refused; etcd over TLS with a client
//!   certificate, and with a user and password, works, and a certificate of another CA stops an
//!   agent with nothing to start from.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::agent::{
    accepts_at, body, eventually, frontend_in, lbctl, lbctl_health, wait_reaches_at, Agent, Echo,
    Options,
};
use common::etcd::EtcdCluster;
use common::free_port;
use serde_json::{json, Value};

const A_BIND: &str = "127.0.0.11";
const B_BIND: &str = "127.0.0.12";

/// A managed agent on `etcd` (comma-separated URLs), named `name`, its frontends on `bind`.
fn agent_on(etcd: &str, name: &str, bind: &str, extra: &[&str]) -> Agent {
    let mut args: Vec<String> = ["--etcd", etcd, "--agent-name", name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Agent::managed_with(Options {
        frontend_bind: bind.into(),
        extra: args,
        ..Default::default()
    })
}

/// Three members, agent A, then agent B with A's key (as agents behind one floating IP share
/// theirs).
fn pair(extra: &[&str]) -> (EtcdCluster, Agent, Agent) {
    let etcd = EtcdCluster::start(3);
    let a = agent_on(&etcd.urls(), "lb-a", A_BIND, extra);
    let mut b = agent_on(&etcd.urls(), "lb-b", B_BIND, extra);
    b.share_key_of(&a);
    (etcd, a, b)
}

fn at(bind: &str, port: u16) -> SocketAddr {
    SocketAddr::new(bind.parse().unwrap(), port)
}

/// Polls until a connection to `bind:port` gets `reply`.
fn reaches(bind: &str, port: u16, reply: &str, within: Duration) {
    wait_reaches_at(at(bind, port), reply, within)
}

/// Polls until nothing accepts on `bind:port` any more.
fn closes(bind: &str, port: u16) {
    eventually(
        Duration::from_secs(10),
        &format!("{bind}:{port} to close"),
        || match accepts_at(at(bind, port)) {
            true => Err("still accepts".to_string()),
            false => Ok(()),
        },
    );
}

/// A server of a backend in HAProxy: (server, (addr, port, weight, state)).
type HaproxyServer = (String, (String, u16, u32, &'static str));

/// The servers of backend `be_<port>` in an agent's HAProxy.
fn haproxy_servers(agent: &Agent, port: u16) -> Vec<HaproxyServer> {
    let backend = format!("be_{port}");
    agent
        .summary()
        .into_iter()
        .filter(|((b, _), _)| *b == backend)
        .map(|((_, s), v)| (s, v))
        .collect()
}

/// Polls until both agents want the same servers: an agent publishes its state once its reload
/// is confirmed, which may be after its old HAProxy worker closed a removed port.
fn same_desired(a: &Agent, b: &Agent) {
    eventually(
        Duration::from_secs(10),
        "both agents to want the same",
        || {
            let (da, db) = (a.desired().1, b.desired().1);
            match da == db {
                true => Ok(()),
                false => Err(format!("A wants {da:?}\nB wants {db:?}")),
            }
        },
    );
}

fn reloads(agent: &Agent) -> f64 {
    agent.metric("lbagent_haproxy_reloads_total")
}

#[test]
fn a_change_through_either_agent_reaches_both_haproxies() {
    let (_etcd, a, b) = pair(&[]);
    let (one, two) = Echo::pair("127.0.0.41", "one", "127.0.0.42", "two");
    let fe = free_port();

    // A new frontend through A: each VM reloads its own HAProxy.
    a.put_ok(fe, "n1", &body(&one.ip(), one.port(), json!({})), "reload");
    reaches(A_BIND, fe, "one", Duration::from_secs(1));
    reaches(B_BIND, fe, "one", Duration::from_secs(10));

    // A move through B: live on both, no reload on A.
    let a_reloads = reloads(&a);
    b.put_ok(fe, "n1", &body(&two.ip(), two.port(), json!({})), "runtime");
    reaches(B_BIND, fe, "two", Duration::from_secs(1));
    reaches(A_BIND, fe, "two", Duration::from_secs(10));
    assert_eq!(reloads(&a), a_reloads, "a move reaches A live");
    assert_eq!(haproxy_servers(&a, fe), haproxy_servers(&b, fe));

    // Both show the shared store and the agents.
    for agent in [&a, &b] {
        // The agents are listed by a probe every 2 s: B may not be in A's list yet.
        let state = eventually(Duration::from_secs(10), "both agents listed", || {
            let state = agent.state();
            let names: Vec<String> = state["store"]["agents"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x["name"].as_str())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            match names == ["lb-a", "lb-b"] {
                true => Ok(state),
                false => Err(format!("oldest first: {state}")),
            }
        });
        let store = &state["store"];
        assert_eq!(store["kind"], "etcd", "{state}");
        assert!(store["revision"].as_i64().unwrap() > 0, "{state}");
        assert_eq!(store["agents"][0]["expiring"], true, "{state}");
        assert_eq!(store["agents"][1]["expiring"], false, "{state}");
        assert!(frontend_in(&state, fe).is_some(), "{state}");
    }
    let out = lbctl()
        .args(["state", "--agent", &format!("http://{}", b.addr)])
        .arg("--key-file")
        .arg(&b.keys_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("store: etcd at revision ")
            && text.contains("agents: lb-a (expires leases), lb-b (this one)"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A removal through B: gone from both.
    let r = b.signed("DELETE", &format!("/v1/frontends/{fe}"), "");
    assert_eq!(r.status, 200, "{r:?}");
    for bind in [A_BIND, B_BIND] {
        closes(bind, fe);
    }
    // Published once the reload is confirmed, which may be after the old worker closed it.
    eventually(
        Duration::from_secs(10),
        "A's state to lose it",
        || match frontend_in(&a.state(), fe) {
            None => Ok(()),
            Some(f) => Err(f.to_string()),
        },
    );
}

#[test]
fn concurrent_changes_through_both_agents_lose_nothing() {
    let (_etcd, a, b) = pair(&[]);
    let echo = Echo::start("127.0.0.43", "x");
    let fe = free_port();
    a.put_ok(
        fe,
        "seed",
        &body(&echo.ip(), echo.port(), json!({})),
        "reload",
    );
    eventually(Duration::from_secs(10), "B to have the frontend", || {
        frontend_in(&b.state(), fe)
            .map(|_| ())
            .ok_or_else(|| "not yet".to_string())
    });
    const ROUNDS: u16 = 25;
    std::thread::scope(|s| {
        for (agent, side) in [(&a, "a"), (&b, "b")] {
            let echo = &echo;
            s.spawn(move || {
                for i in 0..ROUNDS {
                    // Its own server (an update lost to the other side would drop it) and the
                    // one both fight over.
                    let own = body(&echo.ip(), echo.port(), json!({"weight": i}));
                    let r = agent.put(fe, &format!("{side}-{i}"), &own);
                    assert_eq!(r.status, 200, "{side}-{i}: {r:?}");
                    let shared = body(&echo.ip(), echo.port(), json!({"weight": i + 100}));
                    let r = agent.put(fe, "shared", &shared);
                    assert_eq!(r.status, 200, "shared via {side}: {r:?}");
                }
            });
        }
    });
    let wanted = 2 + 2 * ROUNDS as usize;
    eventually(
        Duration::from_secs(10),
        "both agents and both HAProxies to agree",
        || {
            let (da, db) = (a.desired().1, b.desired().1);
            let (ha, hb) = (haproxy_servers(&a, fe), haproxy_servers(&b, fe));
            if da.len() != wanted {
                return Err(format!("A wants {} servers, not {wanted}", da.len()));
            }
            if da != db {
                return Err(format!("A wants {da:?}\nB wants {db:?}"));
            }
            if ha != hb || ha.len() != wanted {
                return Err(format!("HAProxy A {ha:?}\nHAProxy B {hb:?}"));
            }
            Ok(())
        },
    );
}

#[test]
fn an_agent_killed_catches_up_even_past_a_compaction() {
    let (etcd, a, mut b) = pair(&[]);
    let (one, two) = Echo::pair("127.0.0.44", "one", "127.0.0.45", "two");
    let (kept, gone, new) = (free_port(), free_port(), free_port());
    a.put_ok(
        kept,
        "n1",
        &body(&one.ip(), one.port(), json!({})),
        "reload",
    );
    a.put_ok(
        gone,
        "n1",
        &body(&one.ip(), one.port(), json!({})),
        "reload",
    );
    reaches(B_BIND, kept, "one", Duration::from_secs(10));
    reaches(B_BIND, gone, "one", Duration::from_secs(10));

    b.kill9();
    a.put_ok(
        kept,
        "n1",
        &body(&two.ip(), two.port(), json!({})),
        "runtime",
    );
    a.put_ok(new, "n1", &body(&two.ip(), two.port(), json!({})), "reload");
    let r = a.signed("DELETE", &format!("/v1/frontends/{gone}"), "");
    assert_eq!(r.status, 200, "{r:?}");
    etcd.compact();

    b.start();
    reaches(B_BIND, kept, "two", Duration::from_secs(10));
    reaches(B_BIND, new, "two", Duration::from_secs(10));
    closes(B_BIND, gone);
    same_desired(&a, &b);
}

#[test]
fn a_watch_behind_a_compaction_reads_everything_again() {
    let mut etcd = EtcdCluster::start(3);
    let a = agent_on(&etcd.urls(), "lb-a", A_BIND, &[]);
    // B talks to the third member only: stopping it cuts B's watch while A goes on.
    let mut b = agent_on(&etcd.url(2), "lb-b", B_BIND, &[]);
    b.share_key_of(&a);
    let (one, two) = Echo::pair("127.0.0.46", "one", "127.0.0.47", "two");
    let (fe, gone) = (free_port(), free_port());
    a.put_ok(fe, "n1", &body(&one.ip(), one.port(), json!({})), "reload");
    a.put_ok(
        gone,
        "n1",
        &body(&one.ip(), one.port(), json!({})),
        "reload",
    );
    reaches(B_BIND, fe, "one", Duration::from_secs(10));
    reaches(B_BIND, gone, "one", Duration::from_secs(10));

    etcd.stop(2);
    a.put_ok(fe, "n1", &body(&two.ip(), two.port(), json!({})), "runtime");
    a.put_ok(fe, "n2", &body(&two.ip(), two.port(), json!({})), "runtime");
    // A removal only a whole re-read can tell (its delete event is compacted away).
    let r = a.signed("DELETE", &format!("/v1/frontends/{gone}"), "");
    assert_eq!(r.status, 200, "{r:?}");
    etcd.compact();
    // While its member is away, B says so and keeps serving what it had.
    b.healthz_until(Duration::from_secs(15), 503, "etcd");
    reaches(B_BIND, fe, "one", Duration::from_secs(1));

    etcd.resume(2);
    reaches(B_BIND, fe, "two", Duration::from_secs(20));
    closes(B_BIND, gone);
    eventually(
        Duration::from_secs(10),
        "B to have both servers",
        || match haproxy_servers(&b, fe).len() {
            2 => Ok(()),
            n => Err(format!("{n} servers")),
        },
    );
    same_desired(&a, &b);
    assert!(
        b.log().contains("compacted"),
        "B re-read after the compaction:\n{}",
        b.log()
    );
}

fn health_exit(agent: &Agent, extra: &[&str]) -> Option<i32> {
    lbctl_health(&format!("http://{}", agent.addr), extra)
        .status
        .code()
}

#[test]
fn etcd_trouble_is_never_traffic_trouble() {
    let (mut etcd, a, b) = pair(&[]);
    let (one, two) = Echo::pair("127.0.0.48", "one", "127.0.0.49", "two");
    let fe = free_port();
    a.put_ok(fe, "n1", &body(&one.ip(), one.port(), json!({})), "reload");
    reaches(B_BIND, fe, "one", Duration::from_secs(10));

    // One member down: everything works.
    etcd.stop(2);
    b.put_ok(fe, "n1", &body(&two.ip(), two.port(), json!({})), "runtime");
    reaches(A_BIND, fe, "two", Duration::from_secs(10));

    // Two down: no quorum. Changes are refused in time, naming etcd; traffic goes on.
    etcd.stop(1);
    let started = Instant::now();
    let r = a.put(fe, "n1", &body(&one.ip(), one.port(), json!({})));
    let took = started.elapsed();
    r.assert_error(503, "store_unavailable", "a change without quorum");
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("etcd"), "names etcd: {message}");
    assert!(took < Duration::from_secs(10), "refused after {took:?}");
    for agent in [&a, &b] {
        agent.healthz_until(Duration::from_secs(15), 503, "etcd");
        assert_eq!(health_exit(agent, &["--serving", "--quiet"]), Some(0));
        assert_eq!(health_exit(agent, &["--quiet"]), Some(1));
    }
    reaches(A_BIND, fe, "two", Duration::from_secs(1));
    reaches(B_BIND, fe, "two", Duration::from_secs(1));

    // Quorum back: changes flow again, to both.
    etcd.resume(1);
    etcd.resume(2);
    etcd.wait_writable();
    eventually(Duration::from_secs(20), "a change to go through", || {
        let r = a.put(fe, "n1", &body(&one.ip(), one.port(), json!({})));
        match r.status {
            200 => Ok(()),
            _ => Err(format!("{r:?}")),
        }
    });
    reaches(B_BIND, fe, "one", Duration::from_secs(10));
    for agent in [&a, &b] {
        agent.healthz_until(Duration::from_secs(15), 200, "");
    }
}

#[test]
fn a_registration_expires_once_over_all_agents() {
    let (_etcd, a, b) = pair(&["--lease", "6s"]);
    let echo = Echo::start("127.0.0.50", "x");
    let fe = free_port();
    let put = |agent: &Agent, node: &str| {
        let r = agent.put(fe, node, &body(&echo.ip(), echo.port(), json!({})));
        assert_eq!(r.status, 200, "{node}: {r:?}");
    };
    put(&a, "via-a");
    put(&b, "via-b");
    put(&b, "silent");
    let expired = || {
        a.metric("lbagent_lease_expirations_total") + b.metric("lbagent_lease_expirations_total")
    };
    // Renew two of three (one through each agent) past the silent one's expiry, and a whole
    // lease more: A expires for both, and must know of B's renewals.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut gone_at = None;
    while gone_at.is_none_or(|t: Instant| t.elapsed() < Duration::from_secs(8)) {
        assert!(Instant::now() < deadline, "silent never expired");
        put(&a, "via-a");
        put(&b, "via-b");
        let nodes: Vec<String> = a.desired().1.keys().map(|(_, n)| n.clone()).collect();
        if gone_at.is_none() && !nodes.contains(&"silent".to_string()) {
            gone_at = Some(Instant::now());
        }
        if gone_at.is_some() {
            assert_eq!(nodes, ["via-a", "via-b"], "only the silent one expires");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(expired(), 1.0, "one expiry over both agents");
    assert_eq!(b.metric("lbagent_lease_expirations_total"), 0.0);
    eventually(
        Duration::from_secs(10),
        "B's HAProxy to lose it",
        || match haproxy_servers(&b, fe).len() {
            2 => Ok(()),
            n => Err(format!("{n} servers")),
        },
    );
}

#[test]
fn seed_from_local_moves_one_vm_into_etcd() {
    let etcd = EtcdCluster::start(3);
    // One VM on its journal, with a frontend.
    let mut a = Agent::managed_with(Options {
        frontend_bind: A_BIND.into(),
        ..Default::default()
    });
    let echo = Echo::start("127.0.0.51", "seeded");
    let fe = free_port();
    a.put_ok(
        fe,
        "n1",
        &body(&echo.ip(), echo.port(), json!({})),
        "reload",
    );
    a.stop();
    a.set_extra(
        [
            "--etcd",
            &etcd.urls(),
            "--agent-name",
            "lb-a",
            "--seed-from-local",
        ]
        .map(String::from)
        .to_vec(),
    );
    a.start();
    let reloads_at_start = reloads(&a);
    let key = format!("/lbagent/frontends/{fe}");
    let value: Value = serde_json::from_str(&etcd.get(&key).expect("seeded key")).unwrap();
    assert_eq!(value["servers"]["n1"]["node_port"], echo.port(), "{value}");
    reaches(A_BIND, fe, "seeded", Duration::from_secs(1));
    assert_eq!(reloads_at_start, 0.0, "seeding reloads nothing");

    // The second VM gets it from etcd.
    let mut b = agent_on(&etcd.urls(), "lb-b", B_BIND, &[]);
    b.share_key_of(&a);
    reaches(B_BIND, fe, "seeded", Duration::from_secs(10));

    // Seeding again (the flag left in place) over a prefix that has frontends does nothing.
    a.restart();
    assert!(a.log().contains("already holds frontends"), "{}", a.log());
    same_desired(&a, &b);
}

#[test]
fn an_agent_started_without_quorum_serves_its_last_state() {
    let (mut etcd, a, mut b) = pair(&[]);
    let (one, two) = Echo::pair("127.0.0.52", "one", "127.0.0.53", "two");
    let fe = free_port();
    a.put_ok(fe, "n1", &body(&one.ip(), one.port(), json!({})), "reload");
    reaches(B_BIND, fe, "one", Duration::from_secs(10));

    // B stops (its HAProxy with it), quorum goes, B starts again: from its local copy.
    b.stop();
    etcd.stop(1);
    etcd.stop(2);
    b.start_answering();
    reaches(B_BIND, fe, "one", Duration::from_secs(10));
    assert_eq!(health_exit(&b, &["--serving", "--quiet"]), Some(0));
    let h = b.get("/healthz");
    assert!(h.status == 503 && h.body.contains("etcd"), "{h:?}");

    // Quorum back: B reads etcd and follows it again.
    etcd.resume(1);
    etcd.resume(2);
    etcd.wait_writable();
    eventually(Duration::from_secs(20), "a change to go through A", || {
        let r = a.put(fe, "n1", &body(&two.ip(), two.port(), json!({})));
        match r.status {
            200 => Ok(()),
            _ => Err(format!("{r:?}")),
        }
    });
    reaches(B_BIND, fe, "two", Duration::from_secs(10));
    b.healthz_until(Duration::from_secs(15), 200, "");
}

#[test]
fn two_agents_under_one_name_are_told_apart() {
    let etcd = EtcdCluster::start(3);
    let mut a = agent_on(&etcd.urls(), "lb-x", A_BIND, &[]);
    let mut b = Agent::managed_with_answering(Options {
        frontend_bind: B_BIND.into(),
        extra: ["--etcd", &etcd.urls(), "--agent-name", "lb-x"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    });
    b.healthz_until(
        Duration::from_secs(10),
        503,
        "another agent is registered as `lb-x`",
    );
    // A restarted at once (kill -9: its key still lives) takes its name back: it keeps its
    // instance id in its state directory.
    a.kill9();
    a.start();
    eventually(
        Duration::from_secs(5),
        "A to expire registrations again",
        || {
            let state = a.state();
            match state["store"]["expiring"] == true {
                true => Ok(()),
                false => Err(state.to_string()),
            }
        },
    );
    let h = b.get("/healthz");
    assert_eq!(h.status, 503, "{h:?}");
    // B probes etcd too (it reads the agents), but never expires under A's name.
    let state = b.state();
    assert_eq!(state["store"]["agents"][0]["name"], "lb-x", "{state}");
    assert_ne!(state["store"]["expiring"], true, "{state}");
    b.stop();
}

/// Runs `lbagent` with `args` until it exits (an agent that must refuse to start), 30 s at most.
fn refused_start(args: &[String]) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lbagent"))
        .args(args)
        .env(
            "PATH",
            format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            assert!(!status.success(), "started");
            return String::from_utf8_lossy(&out.stderr).into_owned();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lbagent did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn etcd_over_tls_with_a_client_certificate_and_with_a_password() {
    use common::ca::{write_mode, Ca};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test etcd CA");
    let file = |name: &str, text: &str, mode| {
        let path = dir.path().join(name);
        write_mode(&path, text, mode);
        path
    };
    let server = ca.leaf(&["127.0.0.1", "localhost"], false);
    let client = ca.leaf(&["lbagent"], false);
    let tls = common::etcd::EtcdTls {
        ca: file("ca.pem", &ca.pem(), 0o644),
        server_cert: file("server.pem", &server.cert, 0o644),
        server_key: file("server-key.pem", &server.key, 0o600),
        client_cert: file("client.pem", &client.cert, 0o644),
        client_key: file("client-key.pem", &client.key, 0o600),
    };
    let mut etcd = EtcdCluster::start_with(1, Some(tls.clone()));
    let path = |p: &std::path::Path| p.display().to_string();
    let tls_flags = vec![
        "--etcd-ca-file".to_string(),
        path(&tls.ca),
        "--etcd-cert".into(),
        path(&tls.client_cert),
        "--etcd-key".into(),
        path(&tls.client_key),
    ];
    let flags: Vec<&str> = tls_flags.iter().map(String::as_str).collect();
    let echo = Echo::start("127.0.0.54", "tls");
    let fe = free_port();
    {
        let a = agent_on(&etcd.url(0), "lb-a", A_BIND, &flags);
        a.put_ok(
            fe,
            "n1",
            &body(&echo.ip(), echo.port(), json!({})),
            "reload",
        );
        let value = etcd
            .get(&format!("/lbagent/frontends/{fe}"))
            .expect("stored");
        assert!(value.contains(&echo.port().to_string()), "{value}");
    }

    // Another CA's certificate: etcd refuses it, and an agent with nothing to start from
    // says so and stops.
    let other = Ca::new("another CA");
    let stranger = other.leaf(&["lbagent"], false);
    let (cert, key) = (
        file("stranger.pem", &stranger.cert, 0o644),
        file("stranger-key.pem", &stranger.key, 0o600),
    );
    let fresh = tempfile::tempdir().unwrap();
    let err = refused_start(&[
        "--state-dir".into(),
        path(fresh.path()),
        "--listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--etcd".into(),
        etcd.url(0),
        "--etcd-ca-file".into(),
        path(&tls.ca),
        "--etcd-cert".into(),
        path(&cert),
        "--etcd-key".into(),
        path(&key),
    ]);
    assert!(err.contains("etcd"), "{err}");

    // etcd's own authentication: a user and a password from a 0600 file.
    etcd.ctl(&["user", "add", "root", "--new-user-password=s3cret"])
        .unwrap();
    etcd.ctl(&["auth", "enable"]).unwrap();
    etcd.ctl_user = Some("root:s3cret".into());
    let password = file("password", "s3cret\n", 0o600);
    let mut with_password = tls_flags.clone();
    with_password.extend([
        "--etcd-user".to_string(),
        "root".into(),
        "--etcd-password-file".into(),
        path(&password),
    ]);
    let flags: Vec<&str> = with_password.iter().map(String::as_str).collect();
    let b = agent_on(&etcd.url(0), "lb-b", B_BIND, &flags);
    reaches(B_BIND, fe, "tls", Duration::from_secs(10));
    let r = b.signed("DELETE", &format!("/v1/frontends/{fe}"), "");
    assert_eq!(r.status, 200, "a change stored with the password: {r:?}");
    assert_eq!(etcd.get(&format!("/lbagent/frontends/{fe}")), None);
    let open_password = file("open-password", "s3cret\n", 0o644);
    let err = refused_start(&[
        "--state-dir".into(),
        path(fresh.path()),
        "--etcd".into(),
        etcd.url(0),
        "--etcd-user".into(),
        "root".into(),
        "--etcd-password-file".into(),
        path(&open_password),
    ]);
    assert!(
        err.contains("--etcd-password-file") && err.contains("chmod 600"),
        "{err}"
    );
    etcd.stop(0);
}

#[test]
fn an_agent_whose_haproxy_cannot_take_a_change_says_so_and_retries() {
    let (_etcd, a, b) = pair(&[]);
    let echo = Echo::start("127.0.0.55", "late");
    let fe = free_port();
    // Something else listens on B's address and this port: B cannot bind the new frontend.
    let squatter = std::net::TcpListener::bind(at(B_BIND, fe)).unwrap();
    a.put_ok(
        fe,
        "n1",
        &body(&echo.ip(), echo.port(), json!({})),
        "reload",
    );
    reaches(A_BIND, fe, "late", Duration::from_secs(1));
    b.healthz_until(
        Duration::from_secs(15),
        503,
        &format!("frontend {fe} from etcd"),
    );
    // A goes on meanwhile.
    let other = free_port();
    a.put_ok(
        other,
        "n1",
        &body(&echo.ip(), echo.port(), json!({})),
        "reload",
    );
    reaches(B_BIND, other, "late", Duration::from_secs(10));
    // The port freed, B's next try takes it.
    drop(squatter);
    reaches(B_BIND, fe, "late", Duration::from_secs(30));
    b.healthz_until(Duration::from_secs(15), 200, "");
    same_desired(&a, &b);
}
