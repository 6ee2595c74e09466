//! The `lbagent` daemon, black box: the real binary driving a real HAProxy, in managed mode
//! (the agent runs HAProxy) and attached mode (the test runs HAProxy). Every check reads
//! HAProxy's own sockets, not the agent's view of them.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::agent::{
    accepts, body, eventually, http, http_head_only, now_unix, through, wait_reaches, write_keys,
    Agent, Echo, Options,
};
use common::free_port;
use serde_json::{json, Value};

const SETTLE: Duration = Duration::from_secs(15);

/// The frontend's entry in `GET /v1/frontends`.
fn frontend(state: &Value, port: u16) -> Option<Value> {
    common::agent::frontend_in(state, port)
}

fn server(state: &Value, port: u16, node: &str) -> Option<Value> {
    frontend(state, port)?["servers"]
        .as_array()?
        .iter()
        .find(|s| s["node"] == node)
        .cloned()
}

// ---------------------------------------------------------------------------------------------
// 1. Lifecycle, managed mode
// ---------------------------------------------------------------------------------------------

#[test]
fn lifecycle_managed() {
    let agent = Agent::managed();
    let a = Echo::start("127.0.0.2", "A");
    let b = Echo::start("127.0.0.2", "B");
    let c = Echo::start("127.0.0.3", "C");
    let fe = free_port();
    let be = format!("be_{fe}");

    // A new frontend: a reload; traffic reaches the node.
    let r1 = agent.put_ok(
        fe,
        "node-a",
        &body(&a.ip(), a.port(), json!({"service": "traefik"})),
        "reload",
    );
    wait_reaches(fe, "A", SETTLE);

    // A second node: runtime. The same again: unchanged, same generation.
    let r2 = agent.put_ok(fe, "node-b", &body(&b.ip(), b.port(), json!({})), "runtime");
    assert!(r2["generation"].as_u64() > r1["generation"].as_u64());
    let r3 = agent.put_ok(
        fe,
        "node-b",
        &body(&b.ip(), b.port(), json!({})),
        "unchanged",
    );
    assert_eq!(r3["generation"], r2["generation"]);
    let obs = agent.observed();
    assert!(obs.contains_key(&(be.clone(), "node-b".into())), "{obs:?}");

    // A new address: runtime, and HAProxy has it.
    agent.put_ok(fe, "node-b", &body(&c.ip(), c.port(), json!({})), "runtime");
    let o = &agent.observed()[&(be.clone(), "node-b".to_string())];
    assert_eq!((o.addr.as_str(), o.port), ("127.0.0.3", c.port()));

    // States and weight, as HAProxy's admin flags and user weight show them.
    for (state, flag_set, flag_clear) in [
        ("drain", 0x08, 0x01),
        ("maint", 0x01, 0x08),
        ("ready", 0, 0x09),
    ] {
        agent.put_ok(
            fe,
            "node-b",
            &body(&c.ip(), c.port(), json!({"state": state})),
            "runtime",
        );
        let o = &agent.observed()[&(be.clone(), "node-b".to_string())];
        assert_eq!(o.admin & flag_set, flag_set, "{state}: {o:?}");
        assert_eq!(o.admin & flag_clear, 0, "{state}: {o:?}");
        assert_eq!(o.state(), state);
    }
    agent.put_ok(
        fe,
        "node-b",
        &body(&c.ip(), c.port(), json!({"weight": 7})),
        "runtime",
    );
    assert_eq!(
        agent.observed()[&(be.clone(), "node-b".to_string())].weight,
        7
    );

    // Both nodes serve: round robin reaches A and C.
    wait_reaches(fe, "C", SETTLE);
    wait_reaches(fe, "A", SETTLE);

    // GET lists both, with what HAProxy reports.
    let st = eventually(SETTLE, "both servers UP in GET", || {
        let st = agent.state();
        for node in ["node-a", "node-b"] {
            let s = server(&st, fe, node).ok_or(format!("{node} missing: {st}"))?;
            if s["haproxy"]["status"] != "UP" {
                return Err(format!("{node}: {s}"));
            }
        }
        Ok(st)
    });
    let f = frontend(&st, fe).unwrap();
    assert_eq!(f["frontend"], format!("fe_{fe}"));
    assert_eq!(f["backend"], be);
    assert_eq!(f["mode"], "tcp");
    assert_eq!(f["haproxy_status"], "OPEN", "{f}");
    let sb = server(&st, fe, "node-b").unwrap();
    assert_eq!(sb["node_ip"], "127.0.0.3");
    assert_eq!(sb["node_port"], c.port());
    assert_eq!(sb["weight"], 7);
    // HAProxy's `show stat` address: ip:port.
    assert_eq!(sb["haproxy"]["addr"], format!("127.0.0.3:{}", c.port()));
    assert_eq!(server(&st, fe, "node-a").unwrap()["service"], "traefik");

    // DELETE a server: gone from HAProxy and from GET; traffic only reaches A.
    let r = agent.signed("DELETE", &format!("/v1/frontends/{fe}/servers/node-b"), "");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["applied"], "runtime");
    eventually(SETTLE, "node-b deleted in HAProxy", || {
        let obs = agent.observed();
        if obs.contains_key(&(be.clone(), "node-b".into())) {
            Err(format!("{obs:?}"))
        } else {
            Ok(())
        }
    });
    assert!(server(&agent.state(), fe, "node-b").is_none());
    for _ in 0..4 {
        assert_eq!(through(fe).unwrap(), "A");
    }
    // Deleting it again: 404.
    let r = agent.signed("DELETE", &format!("/v1/frontends/{fe}/servers/node-b"), "");
    r.assert_error(404, "not_found", "second delete");

    // DELETE the frontend: a reload, and the port closes.
    let reloads = agent.metric("lbagent_haproxy_reloads_total");
    let r = agent.signed("DELETE", &format!("/v1/frontends/{fe}"), "");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["applied"], "reload");
    assert!(frontend(&agent.state(), fe).is_none());
    eventually(SETTLE, "the frontend port to close", || {
        if accepts(fe) {
            Err("still accepts".into())
        } else {
            Ok(())
        }
    });
    assert!(!agent.observed().keys().any(|(b, _)| b == &be));

    // Metrics count what happened.
    let m = agent.metrics();
    assert!(
        m.get("lbagent_haproxy_reloads_total")
            .copied()
            .unwrap_or(0.0)
            >= reloads + 1.0,
        "{m:?}"
    );
    let puts = m
        .get(r#"lbagent_http_requests_total{route="put_server",status="200"}"#)
        .copied()
        .unwrap_or(0.0);
    assert!(puts >= 8.0, "{m:?}");
    assert_eq!(m.get("lbagent_haproxy_up").copied(), Some(1.0), "{m:?}");
    assert_eq!(m.get("lbagent_servers").copied(), Some(0.0), "{m:?}");

    // Several signed requests on one keep-alive connection.
    let mut conn = common::agent::KeepAlive::connect(agent.addr).unwrap();
    for _ in 0..3 {
        let h = agent.auth_headers("GET", "/v1/frontends", b"");
        let r = conn.request("GET", "/v1/frontends", &h, b"").unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["frontends"], json!([]));
    }

    // Healthy and in sync.
    eventually(SETTLE, "/healthz 200", || {
        let r = agent.get("/healthz");
        let v = r.json();
        if r.status == 200 && v["haproxy"] == "up" && v["in_sync"] == true {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 2. Attached mode
// ---------------------------------------------------------------------------------------------

#[test]
fn attached_mode_reloads_through_the_master_and_keeps_the_file() {
    let agent = Agent::attached();
    let a = Echo::start("127.0.0.2", "A");
    let b = Echo::start("127.0.0.3", "B");
    let fe = free_port();
    let be = format!("be_{fe}");
    let reloads_before = agent.show_proc().master.unwrap().reloads.unwrap();

    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    // The reload went through our HAProxy's master.
    let proc = agent.show_proc();
    assert!(proc.master.unwrap().reloads.unwrap() > reloads_before);
    wait_reaches(fe, "A", SETTLE);

    // Runtime changes: a second node, then node-a moved and drained.
    let reloads = agent.show_proc().master.unwrap().reloads.unwrap();
    agent.put_ok(
        fe,
        "node-b",
        &body(&b.ip(), b.port(), json!({"weight": 3})),
        "runtime",
    );
    agent.put_ok(
        fe,
        "node-a",
        &body(&b.ip(), b.port(), json!({"state": "drain"})),
        "runtime",
    );
    let obs = agent.observed();
    let oa = &obs[&(be.clone(), "node-a".to_string())];
    assert_eq!(
        (oa.addr.as_str(), oa.port, oa.state()),
        ("127.0.0.3", b.port(), "drain")
    );
    assert_eq!(obs[&(be.clone(), "node-b".to_string())].weight, 3);
    assert_eq!(
        agent.show_proc().master.unwrap().reloads.unwrap(),
        reloads,
        "no reload"
    );
    wait_reaches(fe, "B", SETTLE);

    // The file HAProxy loads holds both servers as they are now: a restart keeps them.
    let text = eventually(SETTLE, "managed.cfg to hold both servers", || {
        let t = std::fs::read_to_string(&agent.managed_cfg).unwrap_or_default();
        let want_a = format!("server node-a 127.0.0.3:{} check", b.port());
        let want_b = format!("server node-b 127.0.0.3:{} check weight 3", b.port());
        if t.contains(&format!("frontend fe_{fe}")) && t.contains(&want_a) && t.contains(&want_b) {
            Ok(t)
        } else {
            Err(t)
        }
    });
    assert!(text.contains(&format!("bind 127.0.0.1:{fe}")), "{text}");
    let check = std::process::Command::new(common::haproxy_bin())
        .arg("-c")
        .arg("-f")
        .arg(agent.managed_cfg.parent().unwrap().join("main.cfg"))
        .arg("-f")
        .arg(&agent.managed_cfg)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Removing the frontend reloads again and closes the port.
    let r = agent.signed("DELETE", &format!("/v1/frontends/{fe}"), "");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["applied"], "reload");
    eventually(SETTLE, "the port to close", || {
        if accepts(fe) {
            Err("still accepts".to_string())
        } else {
            Ok(())
        }
    });
    eventually(SETTLE, "managed.cfg without the frontend", || {
        let t = std::fs::read_to_string(&agent.managed_cfg).unwrap_or_default();
        if t.contains(&format!("fe_{fe}")) {
            Err(t)
        } else {
            Ok(())
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 3. IP flips under load
// ---------------------------------------------------------------------------------------------

/// A client making sequential short connections through a frontend until stopped, counting
/// the ones that failed and remembering the last reply.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    last: Arc<Mutex<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let last = Arc::new(Mutex::new(String::new()));
        let thread = {
            let (stop, ok, failures, last) =
                (stop.clone(), ok.clone(), failures.clone(), last.clone());
            std::thread::spawn(move || {
                // Bounded: at most ~5 minutes of connections at the pace below.
                for _ in 0..300_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match through(port) {
                        Ok(line) if line == "P" || line == "Q" => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            *last.lock().unwrap() = line;
                        }
                        Ok(line) => failures
                            .lock()
                            .unwrap()
                            .push(format!("unexpected {line:?}")),
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                    // Pacing (not synchronisation): keeps TIME_WAIT sockets few.
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        Load {
            stop,
            ok,
            failures,
            last,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failures.lock().unwrap().clone(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves of one server sent at once share groups, so batches: from HAProxy 2.9 on, `set server
/// addr` applies moments after it answers, and a move back, compared with the address still in
/// place, answers `nothing changed` while the queued move wins. However the requests are
/// grouped, HAProxy must be where the state says once the last answer is in.
#[test]
fn simultaneous_moves_of_one_server_end_where_the_state_says() {
    let agent = Agent::managed();
    let p = Echo::start("127.0.0.2", "P");
    let q = Echo::start("127.0.0.3", "Q");
    let fe = free_port();
    agent.put_ok(fe, "node", &body(&p.ip(), p.port(), json!({})), "reload");
    let key = (format!("be_{fe}"), "node".to_string());
    for round in 0..8 {
        let answers = at_once(16, |i| {
            let to = if (i + round) % 2 == 0 { &q } else { &p };
            agent.put(fe, "node", &body(&to.ip(), to.port(), json!({})))
        });
        for r in &answers {
            assert_eq!(r.status, 200, "{r:?}");
            let applied = r.json()["applied"].as_str().unwrap_or_default().to_string();
            assert!(
                ["runtime", "unchanged"].contains(&applied.as_str()),
                "{r:?}"
            );
        }
        let d = agent.desired();
        let want = &d.1[&(fe, "node".to_string())];
        let o = &agent.observed()[&key];
        assert_eq!(
            (o.addr.as_str(), o.port),
            (want.ip.as_str(), want.port),
            "round {round}: HAProxy is not where the state says"
        );
    }
}

#[test]
fn ip_flips_under_load_drop_nothing_and_never_reload() {
    let agent = Agent::managed();
    let p = Echo::start("127.0.0.2", "P");
    let q = Echo::start("127.0.0.3", "Q");
    let fe = free_port();
    agent.put_ok(fe, "node", &body(&p.ip(), p.port(), json!({})), "reload");
    wait_reaches(fe, "P", SETTLE);
    // Settle on the worker started by that reload before counting.
    eventually(SETTLE, "no old workers", || {
        let p = agent.show_proc();
        if p.old_workers.is_empty() {
            Ok(())
        } else {
            Err(format!("{p:?}"))
        }
    });
    let proc_before = agent.show_proc();
    let reloads_before = agent.metric("lbagent_haproxy_reloads_total");

    let load = Load::start(fe);
    for i in 0..20 {
        let (target, reply) = if i % 2 == 0 { (&q, "Q") } else { (&p, "P") };
        agent.put_ok(
            fe,
            "node",
            &body(&target.ip(), target.port(), json!({})),
            "runtime",
        );
        // The flip is live: the client's connections now reach the new backend.
        let seen = load.ok.load(Ordering::SeqCst);
        eventually(SETTLE, "the client to reach the new address", || {
            let last = load.last.lock().unwrap().clone();
            if last == reply && load.ok.load(Ordering::SeqCst) > seen + 2 {
                Ok(())
            } else {
                Err(format!("last reply {last:?}"))
            }
        });
    }
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed connections of {}: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(ok >= 60, "only {ok} connections");

    let proc_after = agent.show_proc();
    let (mb, ma) = (
        proc_before.master.clone().unwrap(),
        proc_after.master.clone().unwrap(),
    );
    assert_eq!(ma.pid, mb.pid);
    assert_eq!(ma.reloads, mb.reloads, "HAProxy reloaded");
    let pids =
        |p: &lbagent::runtime::parse::ProcList| p.workers.iter().map(|w| w.pid).collect::<Vec<_>>();
    assert_eq!(pids(&proc_after), pids(&proc_before), "the worker changed");
    assert_eq!(
        agent.metric("lbagent_haproxy_reloads_total"),
        reloads_before
    );
    let o = &agent.observed()[&(format!("be_{fe}"), "node".to_string())];
    assert_eq!((o.addr.as_str(), o.port), ("127.0.0.2", p.port()));
}

// ---------------------------------------------------------------------------------------------
// 4. A reload that fails on a taken port
// ---------------------------------------------------------------------------------------------

#[test]
fn reload_failure_on_a_taken_port_changes_nothing() {
    let agent = Agent::managed();
    let a = Echo::start("127.0.0.2", "A");
    let good = free_port();
    agent.put_ok(
        good,
        "node-a",
        &body(&a.ip(), a.port(), json!({})),
        "reload",
    );
    wait_reaches(good, "A", SETTLE);

    // Someone else holds the port (a plain std listener: no SO_REUSEPORT).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let x = taken.local_addr().unwrap().port();
    eventually(SETTLE, "managed.cfg written", || {
        let t = std::fs::read_to_string(&agent.managed_cfg).unwrap_or_default();
        if t.contains(&format!("fe_{good}")) {
            Ok(())
        } else {
            Err(t)
        }
    });
    let before = agent.fingerprint();
    let reloads_before = agent.show_proc().master.unwrap().reloads;
    let metric_before = agent.metric("lbagent_haproxy_reloads_total");

    let r = agent.put(x, "node-a", &body(&a.ip(), a.port(), json!({})));
    r.assert_error(409, "haproxy_rejected", "taken port");
    let msg = r.json()["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("bind") && msg.contains(&format!("127.0.0.1:{x}")),
        "the message should name the bind: {msg}"
    );
    // Found before any reload (a failed one costs HAProxy's bind retries, about 2 s).
    assert_eq!(agent.show_proc().master.unwrap().reloads, reloads_before);
    assert_eq!(agent.metric("lbagent_haproxy_reloads_total"), metric_before);

    // Nothing recorded, nothing changed in HAProxy, the file is back.
    assert!(frontend(&agent.state(), x).is_none());
    let after = agent.fingerprint();
    assert_eq!(after.0, before.0, "desired state changed");
    assert_eq!(after.1, before.1, "HAProxy's servers changed");
    assert_eq!(after.2, before.2, "managed.cfg changed");
    assert!(!after.2.contains(&format!("fe_{x}")));

    // The existing frontend still serves, and the port is still the other listener's.
    for _ in 0..5 {
        assert_eq!(through(good).unwrap(), "A");
    }
    taken.set_nonblocking(true).unwrap();
    let c = std::net::TcpStream::connect(("127.0.0.1", x)).unwrap();
    let accepted = eventually(SETTLE, "our listener to get the connection", || {
        taken.accept().map_err(|e| e.to_string())
    });
    assert_eq!(accepted.1, c.local_addr().unwrap());
    drop(taken);

    // A later PUT on another free port works, and so does a runtime change.
    let other = free_port();
    agent.put_ok(
        other,
        "node-a",
        &body(&a.ip(), a.port(), json!({})),
        "reload",
    );
    wait_reaches(other, "A", SETTLE);
    agent.put_ok(
        good,
        "node-b",
        &body(&a.ip(), a.port(), json!({})),
        "runtime",
    );
    agent.healthz_until(SETTLE, 200, "");
}

// ---------------------------------------------------------------------------------------------
// 5. The agent killed with SIGKILL in the middle of a burst
// ---------------------------------------------------------------------------------------------

/// An acknowledged PUT: frontend port, node, node ip, node port.
type Acked = (u16, String, String, u16);

#[test]
fn agent_kill9_mid_burst_keeps_every_acknowledged_change() {
    let mut agent = Agent::managed();
    let echoes: Vec<Echo> = (0..8)
        .map(|t| Echo::start(&format!("127.0.0.{}", 2 + t % 3), &format!("T{t}")))
        .collect();
    let fes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    for fe in &fes {
        agent.put_ok(
            *fe,
            "seed",
            &body(&echoes[0].ip(), echoes[0].port(), json!({})),
            "reload",
        );
    }
    let old_master = agent.show_proc().master.unwrap().pid;

    // (frontend, node, ip, port) of every 200.
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::new(Mutex::new(Vec::new()));
    let addr = agent.addr;
    let (key, secret) = (agent.key_id.clone(), agent.secret.clone());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let acked = acked.clone();
            let fes = fes.clone();
            let (ip, port) = (echoes[t].ip(), echoes[t].port());
            let (key, secret) = (key.clone(), secret.clone());
            std::thread::spawn(move || {
                for i in 0..400 {
                    let fe = fes[(t + i) % fes.len()];
                    let node = format!("t{t}-n{i}");
                    // Even nodes get a second PUT with another weight: updates, not only adds.
                    let weight = if i % 2 == 0 { 2 } else { 1 };
                    let path = format!("/v1/frontends/{fe}/servers/{node}");
                    let b = json!({"node_ip": ip, "node_port": port, "weight": weight}).to_string();
                    let h = lbagent::auth::signed_headers(
                        &key,
                        &secret,
                        "PUT",
                        &path,
                        b.as_bytes(),
                        now_unix(),
                    );
                    match common::agent::try_http(addr, "PUT", &path, &h, b.as_bytes()) {
                        Ok(r) if r.status == 200 => {
                            assert_eq!(r.json()["applied"], "runtime", "{r:?}");
                            acked.lock().unwrap().push((fe, node, ip.clone(), port));
                        }
                        Ok(r) => panic!("unexpected answer {r:?}"),
                        // The agent is gone: stop.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();

    eventually(
        Duration::from_secs(30),
        "a good part of the burst acknowledged",
        || {
            let n = acked.lock().unwrap().len();
            if n >= 150 {
                Ok(())
            } else {
                Err(format!("{n} acknowledged"))
            }
        },
    );
    agent.kill9();
    for t in threads {
        t.join().expect("a client thread panicked");
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() < 8 * 400, "the kill came after the burst ended");

    agent.start();
    // Every acknowledged change is in the desired state...
    let desired = agent.desired();
    for (fe, node, ip, port) in &acked {
        let d = desired
            .1
            .get(&(*fe, node.clone()))
            .unwrap_or_else(|| panic!("{fe}/{node} acknowledged but lost"));
        assert_eq!((&d.ip, d.port), (ip, *port), "{fe}/{node}");
    }
    // ...and in HAProxy, exactly as desired.
    agent.wait_in_sync(SETTLE);
    let obs = agent.observed();
    for (fe, node, ip, port) in &acked {
        let o = &obs[&(format!("be_{fe}"), node.clone())];
        assert_eq!((&o.addr, o.port), (ip, *port), "{fe}/{node}");
    }
    // One HAProxy serves: the one the killed agent ran does not linger beside the new one.
    let new_master = agent.show_proc().master.unwrap().pid;
    eventually(SETTLE, "the previous HAProxy master to go", || {
        let pids = agent.haproxy_pids();
        if pids.contains(&old_master) {
            Err(format!(
                "old master {old_master} still runs; new {new_master}; all {pids:?}"
            ))
        } else {
            Ok(())
        }
    });
    for fe in &fes {
        wait_reaches(*fe, "T0", SETTLE);
    }
}

// ---------------------------------------------------------------------------------------------
// 6. HAProxy killed with SIGKILL (managed mode)
// ---------------------------------------------------------------------------------------------

#[test]
fn haproxy_kill9_is_restarted_with_every_route() {
    let agent = Agent::managed();
    let a = Echo::start("127.0.0.2", "A");
    let b = Echo::start("127.0.0.3", "B");
    let fe1 = free_port();
    let fe2 = free_port();
    agent.put_ok(
        fe1,
        "ready-w5",
        &body(&a.ip(), a.port(), json!({"weight": 5})),
        "reload",
    );
    agent.put_ok(
        fe1,
        "drained",
        &body(&b.ip(), b.port(), json!({"state": "drain", "weight": 9})),
        "runtime",
    );
    agent.put_ok(
        fe1,
        "down",
        &body(&b.ip(), b.port(), json!({"state": "maint"})),
        "runtime",
    );
    agent.put_ok(
        fe2,
        "b",
        &body(&b.ip(), b.port(), json!({"weight": 0})),
        "reload",
    );
    agent.put_ok(
        fe2,
        "a",
        &body(&a.ip(), a.port(), json!({"weight": 256})),
        "runtime",
    );
    // Moved after creation: the address only ever reached HAProxy at runtime.
    agent.put_ok(
        fe1,
        "ready-w5",
        &body(&b.ip(), b.port(), json!({"weight": 5})),
        "runtime",
    );
    agent.wait_in_sync(SETTLE);
    wait_reaches(fe1, "B", SETTLE);
    let want = agent.summary();
    let desired = agent.desired();
    let requests = agent.metric(r#"lbagent_http_requests_total{route="put_server",status="200"}"#);

    let master = agent.show_proc().master.unwrap().pid;
    common::send_signal(master, "KILL");

    // The agent notices and starts a new HAProxy, without any request.
    let new_master = eventually(SETTLE, "a new HAProxy master", || {
        match agent.try_show_proc() {
            Some(p) => match p.master {
                Some(m) if m.pid != master && !p.workers.is_empty() => Ok(m.pid),
                other => Err(format!("{other:?}")),
            },
            None => Err("master CLI does not answer".into()),
        }
    });
    assert_ne!(new_master, master);
    agent.wait_in_sync(SETTLE);
    assert_eq!(
        agent.summary(),
        want,
        "HAProxy after the restart differs from before"
    );
    let got = agent.observed();
    assert_eq!(agent.desired(), desired);
    // Drain, maint and weights as HAProxy reports them.
    let be1 = format!("be_{fe1}");
    assert_eq!(got[&(be1.clone(), "drained".into())].state(), "drain");
    assert_eq!(got[&(be1.clone(), "drained".into())].weight, 9);
    assert_eq!(got[&(be1.clone(), "down".into())].state(), "maint");
    assert_eq!(got[&(be1.clone(), "ready-w5".into())].weight, 5);
    assert_eq!(got[&(format!("be_{fe2}"), "a".into())].weight, 256);
    assert_eq!(got[&(format!("be_{fe2}"), "b".into())].weight, 0);
    // Traffic flows again on both frontends (fe2: only `a` has weight).
    wait_reaches(fe1, "B", SETTLE);
    wait_reaches(fe2, "A", SETTLE);
    assert_eq!(
        agent.metric(r#"lbagent_http_requests_total{route="put_server",status="200"}"#),
        requests,
        "no API call was made"
    );
    agent.healthz_until(SETTLE, 200, "");
    // The killed master is gone; only the new one and its worker remain.
    eventually(SETTLE, "the old HAProxy processes to go", || {
        let pids = agent.haproxy_pids();
        let p = agent.show_proc();
        let ours: Vec<u32> = std::iter::once(new_master)
            .chain(p.workers.iter().map(|w| w.pid))
            .collect();
        if pids.iter().all(|x| ours.contains(x)) {
            Ok(())
        } else {
            Err(format!("{pids:?} vs {ours:?}"))
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 7. Drift: HAProxy changed behind the agent's back
// ---------------------------------------------------------------------------------------------

#[test]
fn drift_is_repaired() {
    let agent = Agent::managed();
    let a = Echo::start("127.0.0.2", "A");
    let b = Echo::start("127.0.0.3", "B");
    let x = Echo::start("127.0.0.4", "X");
    let fe = free_port();
    let be = format!("be_{fe}");
    agent.put_ok(fe, "moved", &body(&a.ip(), a.port(), json!({})), "reload");
    agent.put_ok(
        fe,
        "stopped",
        &body(&a.ip(), a.port(), json!({"weight": 4})),
        "runtime",
    );
    agent.put_ok(
        fe,
        "deleted",
        &body(&b.ip(), b.port(), json!({"state": "drain"})),
        "runtime",
    );
    agent.wait_in_sync(SETTLE);
    let want = agent.summary();
    let repairs = agent.metric("lbagent_drift_repairs_total");

    // Behind the agent's back, in one connection's worth of commands each.
    for cmd in [
        format!("set server {be}/moved addr 127.0.0.4 port {}", x.port()),
        format!("set server {be}/stopped state maint"),
        format!("set server {be}/stopped weight 1"),
        format!("set server {be}/deleted state maint"),
        format!("del server {be}/deleted"),
        format!("add server {be}/stranger 127.0.0.4:{}", x.port()),
        format!("set server {be}/stranger state ready"),
    ] {
        let out = agent.admin_cmd(&cmd);
        assert!(
            !out.to_lowercase().contains("error")
                && !out.contains("No such")
                && !out.contains("not found"),
            "{cmd}: {out}"
        );
    }
    let t0 = Instant::now();
    // While it lasts, /healthz may say so (the agent may also be quicker than this look).
    let mut saw_drift = false;
    eventually(SETTLE, "the drift to be repaired", || {
        if !saw_drift {
            let r = agent.get("/healthz");
            if r.status == 503 && r.json()["drift"].as_array().is_some_and(|d| !d.is_empty()) {
                saw_drift = true;
            }
        }
        let obs = agent.summary();
        if obs == want {
            Ok(())
        } else {
            Err(format!("{obs:?}"))
        }
    });
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "repairs took {took:?}");
    eprintln!("drift repaired in {took:?}; /healthz showed it: {saw_drift}");
    assert!(agent.metric("lbagent_drift_repairs_total") > repairs);
    assert!(!agent
        .observed()
        .contains_key(&(be.clone(), "stranger".into())));
    // No traffic to the stranger or the wrong address any more.
    for _ in 0..6 {
        let line = through(fe).unwrap();
        assert!(line == "A" || line == "B", "{line}");
    }
    eventually(SETTLE, "/healthz 200 again", || {
        let r = agent.get("/healthz");
        if r.status == 200 && r.json()["in_sync"] == true {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 8. Authentication
// ---------------------------------------------------------------------------------------------

/// A unique, valid nonce.
fn nonce() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "test-nonce-{:012}-{}",
        N.fetch_add(1, Ordering::SeqCst),
        std::process::id()
    )
}

/// The four auth headers, every part chosen by the caller.
fn headers(
    key: &str,
    secret: &[u8],
    method: &str,
    path: &str,
    ts: u64,
    nonce: &str,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    vec![
        ("X-Lbagent-Key", key.to_string()),
        ("X-Lbagent-Timestamp", ts.to_string()),
        ("X-Lbagent-Nonce", nonce.to_string()),
        (
            "X-Lbagent-Signature",
            lbagent::auth::sign(secret, method, path, ts, nonce, body),
        ),
    ]
}

fn without(mut h: Vec<(&'static str, String)>, name: &str) -> Vec<(&'static str, String)> {
    h.retain(|(k, _)| *k != name);
    h
}

fn with(
    mut h: Vec<(&'static str, String)>,
    name: &'static str,
    value: &str,
) -> Vec<(&'static str, String)> {
    h.retain(|(k, _)| *k != name);
    h.push((name, value.to_string()));
    h
}

/// Sends the request and asserts a 401 that changed nothing.
fn refused(agent: &Agent, method: &str, path: &str, h: &[(&str, String)], body: &[u8], what: &str) {
    let before = agent.fingerprint();
    let r = http(agent.addr, method, path, h, body);
    r.assert_error(401, "unauthorized", what);
    assert_eq!(agent.fingerprint(), before, "{what}: something changed");
}

#[test]
fn authentication_refuses_and_rotates_keys() {
    // Its many refusals come from one address: past the default burst they would be 429s.
    let agent = Agent::managed_with(Options {
        extra: vec!["--auth-failure-burst".into(), "1000".into()],
        ..Options::default()
    });
    let a = Echo::start("127.0.0.2", "A");
    let fe = free_port();
    agent.put_ok(fe, "seed", &body(&a.ip(), a.port(), json!({})), "reload");
    let secret = agent.secret.clone();
    let path = format!("/v1/frontends/{fe}/servers/n-auth");
    let b = body(&a.ip(), a.port(), json!({"weight": 3})).to_string();
    let b = b.as_bytes();
    let good = |ts: u64| headers("default", &secret, "PUT", &path, ts, &nonce(), b);

    for name in [
        "X-Lbagent-Timestamp",
        "X-Lbagent-Nonce",
        "X-Lbagent-Signature",
    ] {
        refused(
            &agent,
            "PUT",
            &path,
            &without(good(now_unix()), name),
            b,
            &format!("missing {name}"),
        );
    }
    // The key id is optional (default `default`): without it the request is fine...
    // (checked at the end, so this section changes nothing).
    refused(
        &agent,
        "PUT",
        &path,
        &with(good(now_unix()), "X-Lbagent-Timestamp", "12x4"),
        b,
        "malformed timestamp",
    );
    refused(
        &agent,
        "PUT",
        &path,
        &with(good(now_unix()), "X-Lbagent-Timestamp", "-5"),
        b,
        "negative timestamp",
    );
    for (n, what) in [
        ("abcdefghijklmno", "nonce of 15 characters"),
        ("abcdefgh!jklmnopqrs", "nonce with '!'"),
        ("abcdefgh.jklmnopqrs", "nonce with '.'"),
        (&"n".repeat(65)[..], "nonce of 65 characters"),
    ] {
        let ts = now_unix();
        let h = headers("default", &secret, "PUT", &path, ts, n, b);
        refused(&agent, "PUT", &path, &h, b, what);
    }
    let h = good(now_unix());
    let sig = h
        .iter()
        .find(|(k, _)| *k == "X-Lbagent-Signature")
        .unwrap()
        .1
        .clone();
    refused(
        &agent,
        "PUT",
        &path,
        &with(
            h.clone(),
            "X-Lbagent-Signature",
            sig.trim_start_matches("sha256="),
        ),
        b,
        "signature without sha256=",
    );
    refused(
        &agent,
        "PUT",
        &path,
        &with(
            h.clone(),
            "X-Lbagent-Signature",
            &sig.to_uppercase().replace("SHA256=", "sha256="),
        ),
        b,
        "uppercase hex",
    );
    // Signed with the right secret, under an id the agent does not know.
    let ts = now_unix();
    let n = nonce();
    refused(
        &agent,
        "PUT",
        &path,
        &headers("nobody", &secret, "PUT", &path, ts, &n, b),
        b,
        "unknown key id",
    );
    refused(
        &agent,
        "PUT",
        &path,
        &headers(
            "default",
            &secret,
            "PUT",
            &path,
            now_unix() - 301,
            &nonce(),
            b,
        ),
        b,
        "timestamp 301 s old",
    );
    // 301 s ahead of the test's clock is 300 s ahead of the agent's if a second ticks in
    // between: only count a try where the second did not change.
    let mut checked = false;
    for _ in 0..5 {
        let t = now_unix();
        let before = agent.fingerprint();
        let r = http(
            agent.addr,
            "GET",
            "/v1/frontends",
            &headers(
                "default",
                &secret,
                "GET",
                "/v1/frontends",
                t + 301,
                &nonce(),
                b"",
            ),
            b"",
        );
        if now_unix() != t {
            continue;
        }
        r.assert_error(401, "unauthorized", "timestamp 301 s ahead");
        assert_eq!(agent.fingerprint(), before);
        checked = true;
        break;
    }
    assert!(checked, "every try straddled a second");
    refused(
        &agent,
        "PUT",
        &path,
        &headers(
            "default",
            b"not-the-secret-0123456789",
            "PUT",
            &path,
            now_unix(),
            &nonce(),
            b,
        ),
        b,
        "wrong secret",
    );
    let tampered = body(&a.ip(), a.port(), json!({"weight": 4})).to_string();
    refused(
        &agent,
        "PUT",
        &path,
        &good(now_unix()),
        tampered.as_bytes(),
        "body tampered after signing",
    );
    refused(
        &agent,
        "PUT",
        &format!("{path}x"),
        &good(now_unix()),
        b,
        "path tampered",
    );
    refused(
        &agent,
        "PUT",
        &format!("{path}?x=1"),
        &good(now_unix()),
        b,
        "query added",
    );
    let gh = headers(
        "default",
        &secret,
        "GET",
        "/v1/frontends?a=1",
        now_unix(),
        &nonce(),
        b"",
    );
    refused(
        &agent,
        "GET",
        "/v1/frontends?a=2",
        &gh,
        b"",
        "query tampered",
    );
    refused(
        &agent,
        "DELETE",
        &path,
        &good(now_unix()),
        b,
        "method tampered",
    );

    // A bad signature does not use up its nonce; a good request does.
    let n = nonce();
    let ts = now_unix();
    refused(
        &agent,
        "PUT",
        &path,
        &headers(
            "default",
            b"not-the-secret-0123456789",
            "PUT",
            &path,
            ts,
            &n,
            b,
        ),
        b,
        "bad signature",
    );
    let h = headers("default", &secret, "PUT", &path, ts, &n, b);
    let r = http(agent.addr, "PUT", &path, &h, b);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["applied"], "runtime");
    agent.wait_in_sync(SETTLE);
    refused(&agent, "PUT", &path, &h, b, "replayed nonce");
    // Replayed with another body and a fresh signature: still the same nonce.
    let other = body(&a.ip(), a.port(), json!({"weight": 9})).to_string();
    let h2 = headers("default", &secret, "PUT", &path, ts, &n, other.as_bytes());
    refused(
        &agent,
        "PUT",
        &path,
        &h2,
        other.as_bytes(),
        "nonce reused for another request",
    );
    // Without X-Lbagent-Key the default key is meant.
    let r = http(
        agent.addr,
        "GET",
        "/v1/frontends",
        &without(
            headers(
                "default",
                &secret,
                "GET",
                "/v1/frontends",
                now_unix(),
                &nonce(),
                b"",
            ),
            "X-Lbagent-Key",
        ),
        b"",
    );
    assert_eq!(r.status, 200, "{r:?}");

    // Key rotation: add a second key, HUP, both work.
    let old = String::from_utf8(secret.clone()).unwrap();
    let new = "second-key-secret-abcdefghijklmnop";
    write_keys(&agent.keys_path, &[("default", &old), ("second", new)]);
    agent.signal("HUP");
    let get_with = |key: &str, s: &[u8]| {
        http(
            agent.addr,
            "GET",
            "/v1/frontends",
            &headers(key, s, "GET", "/v1/frontends", now_unix(), &nonce(), b""),
            b"",
        )
    };
    eventually(SETTLE, "the second key to be accepted", || {
        let r = get_with("second", new.as_bytes());
        if r.status == 200 {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_eq!(get_with("default", old.as_bytes()).status, 200);
    let r = http(
        agent.addr,
        "PUT",
        &format!("/v1/frontends/{fe}/servers/n-second"),
        &headers(
            "second",
            new.as_bytes(),
            "PUT",
            &format!("/v1/frontends/{fe}/servers/n-second"),
            now_unix(),
            &nonce(),
            b,
        ),
        b,
    );
    assert_eq!(r.status, 200, "{r:?}");
    // Remove the first, HUP: it is refused, the second still works.
    write_keys(&agent.keys_path, &[("second", new)]);
    agent.signal("HUP");
    eventually(SETTLE, "the first key to be refused", || {
        let r = get_with("default", old.as_bytes());
        if r.status == 401 {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    get_with("default", old.as_bytes()).assert_error(401, "unauthorized", "removed key");
    assert_eq!(get_with("second", new.as_bytes()).status, 200);
    // A keys file others may read is refused on HUP; the current keys stay.
    write_keys(&agent.keys_path, &[("default", &old)]);
    std::fs::set_permissions(
        &agent.keys_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    agent.signal("HUP");
    eventually(SETTLE, "the agent to log the refused file", || {
        if agent.log().contains("key file not re-read") {
            Ok(())
        } else {
            Err("no log line yet".into())
        }
    });
    assert_eq!(get_with("second", new.as_bytes()).status, 200);
    get_with("default", old.as_bytes()).assert_error(401, "unauthorized", "0644 file not loaded");
    let m = agent.metrics();
    assert!(
        m.keys()
            .any(|k| k.starts_with("lbagent_auth_failures_total")),
        "{m:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Bad input
// ---------------------------------------------------------------------------------------------

/// Sends a signed request and asserts a JSON error that changed nothing.
fn rejected(
    agent: &Agent,
    method: &str,
    path: &str,
    body: &str,
    status: u16,
    code: &str,
    needle: &str,
) {
    let before = agent.fingerprint();
    let r = agent.signed(method, path, body);
    let what = format!("{method} {path} {}", &body[..body.len().min(80)]);
    r.assert_error(status, code, &what);
    let msg = r.json()["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains(needle),
        "{what}: message {msg:?} should mention {needle:?}"
    );
    assert_eq!(agent.fingerprint(), before, "{what}: something changed");
}

#[test]
fn bad_input_is_refused_cleanly() {
    let a = Echo::start("127.0.0.2", "A");
    // Node ports restricted to the echo's port.
    let agent = Agent::managed_with(Options {
        allow_node_ports: a.port().to_string(),
        ..Options::default()
    });
    let fe = free_port();
    agent.put_ok(fe, "seed", &body(&a.ip(), a.port(), json!({})), "reload");
    agent.wait_in_sync(SETTLE);
    eventually(SETTLE, "managed.cfg written", || {
        let t = std::fs::read_to_string(&agent.managed_cfg).unwrap_or_default();
        if t.contains("server seed") {
            Ok(())
        } else {
            Err(t)
        }
    });
    let ok = body(&a.ip(), a.port(), json!({})).to_string();
    let srv = |node: &str| format!("/v1/frontends/{fe}/servers/{node}");

    // Over 64 KiB: refused from the Content-Length alone, before authentication.
    let before = agent.fingerprint();
    let r = http_head_only(agent.addr, "PUT", &srv("big"), &[], 64 * 1024 + 1);
    r.assert_error(413, "payload_too_large", "65537-byte body");
    // Exactly 64 KiB is read (and then refused as bad JSON, not as too large).
    let mut big = ok.clone();
    big.push_str(&" ".repeat(64 * 1024 - big.len() - 1));
    big.push('x');
    assert_eq!(big.len(), 64 * 1024);
    rejected(&agent, "PUT", &srv("big"), &big, 400, "bad_request", "JSON");
    assert_eq!(agent.fingerprint(), before);

    let bodies: &[(&str, &str)] = &[
        ("{", "JSON"),
        ("", "JSON"),
        (
            r#"{"node_ip":"127.0.0.2","node_port":1,"extra":true}"#,
            "extra",
        ),
        (r#"{"node_port":1}"#, "node_ip"),
        (r#"{"node_ip":"300.1.2.3","node_port":1}"#, "node_ip"),
        (r#"{"node_ip":"example.com","node_port":1}"#, "node_ip"),
        (r#"{"node_ip":"127.0.0.2 ","node_port":1}"#, "node_ip"),
        (r#"{"node_ip":"0.0.0.0","node_port":1}"#, "node_ip"),
        (r#"{"node_ip":"127.0.0.2","node_port":0}"#, "node_port"),
        (r#"{"node_ip":"127.0.0.2","node_port":70000}"#, "node_port"),
        (r#"{"node_ip":"127.0.0.2","node_port":"80"}"#, "JSON"),
        (
            r#"{"node_ip":"127.0.0.2","node_port":1,"weight":257}"#,
            "weight",
        ),
        (
            r#"{"node_ip":"127.0.0.2","node_port":1,"weight":-1}"#,
            "weight",
        ),
        (
            r#"{"node_ip":"127.0.0.2","node_port":1,"mode":"udp"}"#,
            "udp",
        ),
        (
            r#"{"node_ip":"127.0.0.2","node_port":1,"state":"up"}"#,
            "up",
        ),
        (
            r#"{"node_ip":"127.0.0.2","node_port":1,"service":"a;b"}"#,
            "service",
        ),
    ];
    for (b, needle) in bodies {
        rejected(&agent, "PUT", &srv("n1"), b, 400, "bad_request", needle);
    }
    // Ports in the path.
    for p in ["0", "70000", "abc", "-1", "443x", ""] {
        let path = format!("/v1/frontends/{p}/servers/n1");
        rejected(
            &agent,
            "PUT",
            &path,
            &ok,
            400,
            "bad_request",
            "frontend_port",
        );
        rejected(
            &agent,
            "DELETE",
            &format!("/v1/frontends/{p}"),
            "",
            400,
            "bad_request",
            "frontend_port",
        );
    }
    // Policy: port 22 is never a frontend; node ports are restricted here.
    rejected(
        &agent,
        "PUT",
        "/v1/frontends/22/servers/n1",
        &ok,
        403,
        "forbidden",
        "allow-frontend-ports",
    );
    let api_port = agent.addr.port();
    rejected(
        &agent,
        "PUT",
        &format!("/v1/frontends/{api_port}/servers/n1"),
        &ok,
        403,
        "forbidden",
        "allow-frontend-ports",
    );
    let outside = if a.port() == 65535 {
        a.port() - 1
    } else {
        a.port() + 1
    };
    rejected(
        &agent,
        "PUT",
        &srv("n1"),
        &body(&a.ip(), outside, json!({})).to_string(),
        403,
        "forbidden",
        "allow-node-ports",
    );
    // Node names.
    let long = "a".repeat(64);
    for node in [
        "a;b",
        "a%0Ab",
        "a%20b",
        "a\\b",
        "a%5Cb",
        "a:b",
        "%C3%A9",
        "\u{e9}t\u{e9}",
        &long[..],
        "-a",
        ".a",
        "_a",
        "a%2Fb",
        "a..b;show%20info",
    ] {
        rejected(&agent, "PUT", &srv(node), &ok, 400, "bad_request", "node");
        rejected(&agent, "DELETE", &srv(node), "", 400, "bad_request", "node");
    }
    // A `/` in a name is another path segment: no such route, 404.
    rejected(&agent, "PUT", &srv("a/b"), &ok, 404, "not_found", "route");
    // 63 characters, starting with a digit, with '.', '_' and '-': fine.
    let name63 = format!("9{}", "a._-".repeat(16))[..63].to_string();
    agent.put_ok(fe, &name63, &body(&a.ip(), a.port(), json!({})), "runtime");
    let r = agent.signed("DELETE", &srv(&name63), "");
    assert_eq!(r.status, 200, "{r:?}");
    agent.wait_in_sync(SETTLE);

    // A mode other than the frontend's.
    rejected(
        &agent,
        "PUT",
        &srv("n1"),
        &body(&a.ip(), a.port(), json!({"mode": "http"})).to_string(),
        409,
        "conflict",
        "mode",
    );
    rejected(
        &agent,
        "PUT",
        &srv("seed"),
        &body(&a.ip(), a.port(), json!({"mode": "http"})).to_string(),
        409,
        "conflict",
        "mode",
    );
    // Unknown frontends and servers.
    let nowhere = free_port();
    rejected(
        &agent,
        "DELETE",
        &format!("/v1/frontends/{nowhere}"),
        "",
        404,
        "not_found",
        &nowhere.to_string(),
    );
    rejected(
        &agent,
        "DELETE",
        &format!("/v1/frontends/{nowhere}/servers/seed"),
        "",
        404,
        "not_found",
        &nowhere.to_string(),
    );
    rejected(
        &agent,
        "DELETE",
        &srv("nobody"),
        "",
        404,
        "not_found",
        "nobody",
    );
    rejected(
        &agent,
        "GET",
        "/v1/nothing",
        "",
        404,
        "not_found",
        "/v1/nothing",
    );

    // Wrong methods: 405 with Allow, before authentication.
    for (method, path, allow) in [
        ("POST", srv("n1"), "PUT, DELETE"),
        ("GET", srv("n1"), "PUT, DELETE"),
        ("GET", format!("/v1/frontends/{fe}"), "PUT, DELETE"),
        ("POST", format!("/v1/frontends/{fe}"), "PUT, DELETE"),
        ("DELETE", "/v1/frontends".to_string(), "GET"),
        ("POST", "/healthz".to_string(), "GET"),
    ] {
        let before = agent.fingerprint();
        let r = http(agent.addr, method, &path, &[], b"");
        r.assert_error(405, "method_not_allowed", &format!("{method} {path}"));
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        assert_eq!(agent.fingerprint(), before);
    }
    // Still healthy, still serving.
    assert_eq!(through(fe).unwrap(), "A");
    assert_eq!(agent.get("/healthz").status, 200);
}

// ---------------------------------------------------------------------------------------------
// 2b. Attached mode with HAProxy down: changes are stored (202) and applied when it is back
// ---------------------------------------------------------------------------------------------

#[test]
fn attached_haproxy_down_changes_are_pending_then_applied() {
    let mut agent = Agent::attached();
    let a = Echo::start("127.0.0.2", "A");
    let b = Echo::start("127.0.0.3", "B");
    let fe = free_port();
    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    wait_reaches(fe, "A", SETTLE);
    // Wait for the file to hold the frontend: HAProxy will start from it.
    let g = agent.desired().0;
    agent.managed_text_at(g);

    agent.stop_attached_haproxy();
    // A runtime change while HAProxy is away: stored, 202 pending.
    let r = agent.put(fe, "node-b", &body(&b.ip(), b.port(), json!({"weight": 2})));
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.json()["applied"], "pending");
    // A new frontend needs a reload, which cannot happen: refused at once (503), nothing
    // recorded.
    let fe2 = free_port();
    let t0 = Instant::now();
    let r = agent.put(fe2, "node-a", &body(&a.ip(), a.port(), json!({})));
    r.assert_error(503, "haproxy_unavailable", "new frontend with HAProxy down");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "refused only after {:?}",
        t0.elapsed()
    );
    assert!(frontend(&agent.state(), fe2).is_none());
    eventually(SETTLE, "/healthz 503 with HAProxy down", || {
        let r = agent.get("/healthz");
        let v = r.json();
        if r.status == 503 && v["haproxy"] == "down" {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });

    // HAProxy back (from the file, which the agent kept current): the pending change lands.
    agent.start_attached_haproxy();
    agent.wait_in_sync(SETTLE);
    let o = &agent.observed()[&(format!("be_{fe}"), "node-b".to_string())];
    assert_eq!(
        (o.addr.as_str(), o.port, o.weight),
        ("127.0.0.3", b.port(), 2)
    );
    wait_reaches(fe, "B", SETTLE);
    agent.healthz_until(SETTLE, 200, "");
}

/// A request captured before a restart cannot be replayed after it: the nonce cache lives in
/// memory, so the agent refuses anything signed before it started.
#[test]
fn replay_after_a_restart_is_refused() {
    let mut agent = Agent::managed();
    let a = Echo::start("127.0.0.2", "a");
    let fe = free_port();
    let path = format!("/v1/frontends/{fe}/servers/node-a");
    let body = body(&a.ip(), a.port(), json!({}));
    let body = body.to_string();
    let h = agent.auth_headers("PUT", &path, body.as_bytes());
    let signed_at = common::agent::now_unix();
    let r = http(agent.addr, "PUT", &path, &h, body.as_bytes());
    assert_eq!(r.status, 200, "{r:?}");
    // Restart in a later second than the signature's.
    common::wait_until(Duration::from_secs(3), "the clock to tick", || {
        common::agent::now_unix() > signed_at
    });
    agent.restart();
    let r = http(agent.addr, "PUT", &path, &h, body.as_bytes());
    r.assert_error(401, "unauthorized", "replay after restart");
    assert!(r.body.contains("before the agent started"), "{r:?}");
}

/// SIGTERM while a request is half sent: the request is still answered, and applied.
#[test]
fn sigterm_finishes_a_request_in_flight() {
    use std::io::{Read, Write};
    let agent = Agent::managed();
    let a = Echo::start("127.0.0.2", "a");
    let fe = free_port();
    // A frontend first, so the request in flight is a plain runtime change.
    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    let path = format!("/v1/frontends/{fe}/servers/node-b");
    let payload = body(&a.ip(), a.port(), json!({})).to_string();
    let mut head = format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        payload.len()
    );
    for (k, v) in agent.auth_headers("PUT", &path, payload.as_bytes()) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut s = std::net::TcpStream::connect(agent.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&payload.as_bytes()[..5]).unwrap();
    // Once the server has the request's head (it counts it in flight, beside the `/metrics`
    // request that asks), stop the agent.
    eventually(SETTLE, "the PUT to be in flight", || {
        let n = agent.metric("lbagent_http_requests_in_flight");
        if n >= 2.0 {
            Ok(())
        } else {
            Err(format!("{n} in flight"))
        }
    });
    agent.signal("TERM");
    // Shutdown has begun once the listener is gone.
    common::wait_until(Duration::from_secs(5), "the listener to close", || {
        std::net::TcpStream::connect(agent.addr).is_err()
    });
    s.write_all(&payload.as_bytes()[5..]).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

// ---------------------------------------------------------------------------------------------
// 13. The store refuses a change
// ---------------------------------------------------------------------------------------------

/// Takes the immutable flag off again however the test ends, so the temp dir can go.
struct Immutable(std::path::PathBuf);

impl Immutable {
    /// `chattr +i`: ext4 then refuses writes even through an open descriptor (EPERM), the
    /// nearest thing to a failing disk a test can cause on demand. None where it cannot be
    /// set (not root, or a file system without the flag).
    fn set(path: &std::path::Path) -> Option<Immutable> {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Immutable(path.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// `n` requests sent at once (request `i` is `request(i)`), their answers in that order.
fn at_once<T: Send>(n: usize, request: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let barrier = std::sync::Barrier::new(n);
    std::thread::scope(|s| {
        let sent: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, request) = (&barrier, &request);
                s.spawn(move || {
                    barrier.wait();
                    request(i)
                })
            })
            .collect();
        sent.into_iter().map(|c| c.join().unwrap()).collect()
    })
}

/// `n` copies of one request sent at once (a client resending), their answers.
fn copies_at_once<T: Send>(n: usize, request: impl Fn() -> T + Sync) -> Vec<T> {
    at_once(n, |_| request())
}

#[test]
fn a_change_the_store_refuses_is_taken_back_out_of_haproxy() {
    let mut agent = Agent::managed();
    let a = Echo::start("127.0.0.2", "A");
    let b = Echo::start("127.0.0.3", "B");
    let fe = free_port();
    agent.put_ok(fe, "n1", &body(&a.ip(), a.port(), json!({})), "reload");
    wait_reaches(fe, "A", SETTLE);

    let journal = agent.state_dir.join(lbagent::store::JOURNAL_FILE);
    let Some(guard) = Immutable::set(&journal) else {
        eprintln!("SKIPPED: cannot set the immutable flag on {journal:?} (needs root and ext4)");
        return;
    };
    // HAProxy takes the change before the fsync; the fsync fails; the agent must answer the
    // failure and put HAProxy back to what is stored.
    let r = agent.put(fe, "n1", &body(&b.ip(), b.port(), json!({})));
    r.assert_error(500, "store_failed", "PUT while the journal is immutable");
    let msg = r.json()["message"].as_str().unwrap_or_default().to_string();
    assert!(
        msg.contains("journal.log"),
        "the error names the file: {msg}"
    );
    // Already back when the refusal is answered, not at the next tick of the timer.
    let o = &agent.observed()[&(format!("be_{fe}"), "n1".to_string())];
    assert_eq!((o.addr.as_str(), o.port), (a.ip().as_str(), a.port()));
    for _ in 0..4 {
        assert_eq!(through(fe).unwrap(), "A");
    }
    let d = agent.desired();
    assert_eq!(d.1[&(fe, "n1".to_string())].ip, a.ip(), "{d:?}");
    // While the disk refuses, so does the agent; nothing changes.
    let r = agent.put(fe, "n2", &body(&b.ip(), b.port(), json!({})));
    r.assert_error(
        500,
        "store_failed",
        "PUT while the store cannot be reopened",
    );
    assert!(!agent
        .observed()
        .contains_key(&(format!("be_{fe}"), "n2".to_string())));
    // Copies of one DELETE at once (a client resending): those grouped behind the first were
    // judged on a state without n1, but the first is refused, so they are too; none says
    // "not found" of a server that stays.
    let answers = copies_at_once(16, || {
        agent.signed("DELETE", &format!("/v1/frontends/{fe}/servers/n1"), "")
    });
    for r in &answers {
        r.assert_error(
            500,
            "store_failed",
            "a DELETE copy while the store is closed",
        );
    }
    assert!(agent.desired().1.contains_key(&(fe, "n1".to_string())));
    // A heartbeat that changes nothing has nothing to store: still answered.
    agent.put_ok(fe, "n1", &body(&a.ip(), a.port(), json!({})), "unchanged");
    // A new frontend is refused before any reload: nothing listens on its port.
    let reloads = agent.show_proc().master.and_then(|m| m.reloads);
    let fe2 = free_port();
    let r = agent.put(fe2, "n1", &body(&a.ip(), a.port(), json!({})));
    r.assert_error(
        500,
        "store_failed",
        "a new frontend while the store is closed",
    );
    assert!(!accepts(fe2), "fe_{fe2} listens although refused");
    assert_eq!(
        agent.show_proc().master.and_then(|m| m.reloads),
        reloads,
        "HAProxy was reloaded for a change the closed store refused"
    );
    // And the agent says so.
    let h = agent.get("/healthz");
    assert_eq!(h.status, 503, "{h:?}");
    assert!(
        h.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("store")),
        "{h:?}"
    );

    // The disk recovers: no restart needed, the next change is stored and applied.
    drop(guard);
    agent.put_ok(fe, "n1", &body(&b.ip(), b.port(), json!({})), "runtime");
    wait_reaches(fe, "B", SETTLE);

    // A new frontend whose fsync fails after HAProxy reloaded with it: taken back out by a
    // second reload before the 500 is answered.
    let guard = Immutable::set(&journal).expect("set the flag a second time");
    let fe3 = free_port();
    let r = agent.put(fe3, "n1", &body(&a.ip(), a.port(), json!({})));
    r.assert_error(500, "store_failed", "a new frontend the journal refuses");
    assert!(!accepts(fe3), "fe_{fe3} still listens after the refusal");
    drop(guard);
    wait_reaches(fe, "B", SETTLE);

    // Copies of one frontend's DELETE at once, the journal open but failing: whichever reload
    // set each lands in, none is told "no frontend" (a copy behind the first in its set was
    // judged on a state without it, but the first is refused, so it is too); the frontend
    // stays. (Here the first usually runs alone and the others find the store closed.)
    agent.put_ok(fe, "n1", &body(&b.ip(), b.port(), json!({})), "unchanged");
    let guard = Immutable::set(&journal).expect("set the flag a third time");
    let answers = copies_at_once(16, || {
        agent.signed("DELETE", &format!("/v1/frontends/{fe}"), "")
    });
    for r in &answers {
        r.assert_error(
            500,
            "store_failed",
            "a frontend DELETE copy the journal refuses",
        );
    }
    drop(guard);
    wait_reaches(fe, "B", SETTLE);

    agent.restart();
    let d = agent.desired();
    assert_eq!(d.1[&(fe, "n1".to_string())].ip, b.ip(), "{d:?}");
    assert!(!d.1.contains_key(&(fe, "n2".to_string())), "{d:?}");
    assert!(!d.1.contains_key(&(fe2, "n1".to_string())), "{d:?}");
    assert!(!d.1.contains_key(&(fe3, "n1".to_string())), "{d:?}");
    agent.wait_in_sync(SETTLE);
    wait_reaches(fe, "B", SETTLE);
}

// ---------------------------------------------------------------------------------------------
// 14. The operator's proxies may have any name HAProxy allows
// ---------------------------------------------------------------------------------------------

/// Frontends, backends and servers in the operator's main file named like the first words of
/// HAProxy's error sentences (`invalid ...`, `Unknown command`, `usage:`, `Require ...`,
/// `No such ...`, `Permission denied`): `show` answers listing them are data, so a new
/// frontend (a reload), a runtime change and the reconcile all work, and the operator's proxies
/// are left as they were.
#[test]
fn operator_proxy_names_are_never_taken_for_errors() {
    let names = [
        "invalid_host",
        "Unknown",
        "usage",
        "Require",
        "No",
        "Permission",
    ];
    let mut proxies = String::new();
    for name in names {
        proxies.push_str(&format!(
            "frontend {name}\n    bind 127.0.0.1:{}\n    default_backend {name}_be\n\n\
             backend {name}_be\n    server {name} 127.0.0.1:{}\n\n\
             backend {name}\n    server {name} 127.0.0.1:{}\n\n",
            free_port(),
            free_port(),
            free_port()
        ));
    }
    let agent = Agent::attached_with(&proxies, Options::default());
    let operators = |agent: &Agent| {
        let mut rows: Vec<_> = agent
            .servers_state()
            .into_iter()
            .filter(|s| !s.backend.starts_with("be_"))
            .map(|s| (s.backend, s.server, s.addr, s.port, s.admin.0))
            .collect();
        rows.sort();
        rows
    };
    let before = operators(&agent);
    assert_eq!(before.len(), 2 * names.len(), "{before:?}");

    let a = Echo::start("127.0.0.2", "A");
    let b = Echo::start("127.0.0.3", "B");
    let fe = free_port();
    let started = Instant::now();
    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a new frontend took {:?}",
        started.elapsed()
    );
    agent.put_ok(fe, "node-b", &body(&b.ip(), b.port(), json!({})), "runtime");
    agent.wait_in_sync(SETTLE);
    wait_reaches(fe, "A", SETTLE);
    wait_reaches(fe, "B", SETTLE);
    let state = agent.state();
    assert_eq!(
        server(&state, fe, "node-b").unwrap()["haproxy"]["addr"],
        format!("{}:{}", b.ip(), b.port())
    );
    assert_eq!(operators(&agent), before, "the operator's servers changed");
    let health = agent.get("/healthz");
    assert_eq!(health.status, 200, "{health:?}");
}

// ---------------------------------------------------------------------------------------------
// 15. Cold start: many new frontends at once share reloads
// ---------------------------------------------------------------------------------------------

/// 30 sidecars register 30 new ports at once (a cluster boot), one of them a port someone else
/// holds, and two of them twice: the changes waiting when a reload starts join it, so a few
/// reloads serve all of them; the taken port fails alone with HAProxy's words, and every other
/// frontend serves.
#[test]
fn new_frontends_at_once_share_reloads_and_a_taken_port_fails_alone() {
    let agent = Agent::managed();
    let a = Echo::start("127.0.0.2", "A");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let x = taken.local_addr().unwrap().port();
    let mut ports: Vec<u16> = (0..29).map(|_| free_port()).collect();
    ports.push(x);
    let reloads_before = agent.show_proc().master.unwrap().reloads.unwrap();
    let metric_before = agent.metric("lbagent_haproxy_reloads_total");

    let started = Instant::now();
    // Each port once from node-a, the first two also from node-b: 32 requests at once.
    let requests: Vec<(u16, &str)> = ports
        .iter()
        .map(|&p| (p, "node-a"))
        .chain(ports[..2].iter().map(|&p| (p, "node-b")))
        .collect();
    let answers: Vec<(u16, &str, common::agent::Response)> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|&(port, node)| {
                let agent = &agent;
                let a = &a;
                s.spawn(move || {
                    (
                        port,
                        node,
                        agent.put(port, node, &body(&a.ip(), a.port(), json!({}))),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = started.elapsed();

    for (port, node, r) in &answers {
        if *port == x {
            r.assert_error(409, "haproxy_rejected", "the taken port");
            let message = r.json()["message"].as_str().unwrap().to_string();
            assert!(message.contains(&format!("127.0.0.1:{x}")), "{message}");
            assert!(message.contains("in use"), "{message}");
        } else {
            assert_eq!(r.status, 200, "PUT {port}/{node}: {r:?}");
            let v = r.json();
            assert!(
                v["applied"] == "reload" || v["applied"] == "runtime",
                "PUT {port}/{node}: {v}"
            );
        }
    }
    let reloads = agent.show_proc().master.unwrap().reloads.unwrap() - reloads_before;
    let counted = agent.metric("lbagent_haproxy_reloads_total") - metric_before;
    assert_eq!(
        counted,
        f64::from(reloads),
        "the metric counts HAProxy's reloads"
    );
    // The taken port is found before any reload; the rest share the reloads: the first
    // request's, and one for everything that arrived while it ran (a third if requests
    // straggle in behind that).
    assert!(
        reloads <= 3,
        "{reloads} reloads for 32 requests in {took:?}"
    );
    eprintln!("32 requests: {reloads} reloads, {took:?}");
    for &port in &ports[..29] {
        wait_reaches(port, "A", SETTLE);
    }
    let state = agent.state();
    assert!(frontend(&state, x).is_none(), "the taken port was stored");
    assert_eq!(
        server(&state, ports[0], "node-b").unwrap()["node_port"],
        a.port()
    );
    agent.wait_in_sync(SETTLE);
}

/// The same with the agent's own port check off (`--no-host-checks`, for a HAProxy in another
/// network namespace): the group's reload fails on the taken port, HAProxy's bind error names
/// it, and only its request is refused; the others go through in one more reload.
#[test]
fn a_failed_group_reload_refuses_only_the_port_haproxy_names() {
    let agent = Agent::managed_with(Options {
        extra: vec!["--no-host-checks".into()],
        ..Options::default()
    });
    let a = Echo::start("127.0.0.2", "A");
    let existing = free_port();
    agent.put_ok(
        existing,
        "node-a",
        &body(&a.ip(), a.port(), json!({})),
        "reload",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let x = taken.local_addr().unwrap().port();
    let mut ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    ports.push(x);
    let failures_before = agent.metric("lbagent_haproxy_reload_failures_total");
    let reloads_before = agent.show_proc().master.unwrap().reloads.unwrap();

    let answers: Vec<(u16, common::agent::Response)> = std::thread::scope(|s| {
        let handles: Vec<_> = ports
            .iter()
            .map(|&port| {
                let (agent, a) = (&agent, &a);
                s.spawn(move || {
                    (
                        port,
                        agent.put(port, "node-a", &body(&a.ip(), a.port(), json!({}))),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (port, r) in &answers {
        if *port == x {
            r.assert_error(409, "haproxy_rejected", "the taken port");
            let message = r.json()["message"].as_str().unwrap().to_string();
            assert!(
                message.contains("cannot bind socket")
                    && message.contains(&format!("127.0.0.1:{x}")),
                "HAProxy's own bind error: {message}"
            );
        } else {
            assert_eq!(r.status, 200, "PUT {port}: {r:?}");
            assert_eq!(r.json()["applied"], "reload", "PUT {port}: {r:?}");
        }
    }
    assert_eq!(
        agent.metric("lbagent_haproxy_reload_failures_total"),
        failures_before + 1.0,
        "one failed reload, not one per port"
    );
    let reloads = agent.show_proc().master.unwrap().reloads.unwrap() - reloads_before;
    assert!(reloads <= 4, "{reloads} reloads for 6 ports");
    for &port in &ports[..5] {
        wait_reaches(port, "A", SETTLE);
    }
    wait_reaches(existing, "A", SETTLE);
    assert!(
        frontend(&agent.state(), x).is_none(),
        "the taken port was stored"
    );
    eventually(SETTLE, "the managed file without the taken port", || {
        let t = std::fs::read_to_string(&agent.managed_cfg).unwrap_or_default();
        if t.contains(&format!("fe_{}", ports[4])) && !t.contains(&format!("fe_{x}")) {
            Ok(())
        } else {
            Err(t)
        }
    });
    // The port is still the other listener's.
    taken.set_nonblocking(true).unwrap();
    let c = std::net::TcpStream::connect(("127.0.0.1", x)).unwrap();
    let accepted = eventually(SETTLE, "our listener to get the connection", || {
        taken.accept().map_err(|e| e.to_string())
    });
    assert_eq!(accepted.1, c.local_addr().unwrap());
    agent.wait_in_sync(SETTLE);
}

// ---------------------------------------------------------------------------------------------
// 16. /healthz and the read model never wait behind a reload
// ---------------------------------------------------------------------------------------------

/// A reload that takes 3 s (an operator's `--reload-command` that sleeps, then fails): while it
/// runs, `/healthz` and `GET /v1/frontends` are answered from what the owner last published.
#[test]
fn healthz_answers_during_a_slow_reload() {
    let agent = Agent::attached_with(
        "",
        Options {
            extra: vec!["--reload-command".into(), "sleep 3; exit 1".into()],
            ..Options::default()
        },
    );
    let a = Echo::start("127.0.0.2", "A");
    let fe = free_port();
    std::thread::scope(|s| {
        let put = s.spawn(|| agent.put(fe, "node-a", &body(&a.ip(), a.port(), json!({}))));
        // Polled until the PUT is answered (bounded by the reload's own deadline). Waiting
        // behind the reload, there would be one or two answers; each is within milliseconds.
        let mut answered = 0;
        let mut slowest = Duration::ZERO;
        while !put.is_finished() {
            let t = Instant::now();
            let r = agent.get("/healthz");
            slowest = slowest.max(t.elapsed());
            assert!(r.status == 200 || r.status == 503, "{r:?}");
            // The read model does not wait behind the reload either.
            let t = Instant::now();
            let v = agent.signed("GET", "/v1/frontends", "");
            slowest = slowest.max(t.elapsed());
            assert_eq!(v.status, 200, "{v:?}");
            answered += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = put.join().unwrap();
        r.assert_error(409, "haproxy_rejected", "the failing reload command");
        assert!(
            answered >= 10,
            "only {answered} /healthz answers during a 3 s reload"
        );
        eprintln!("{answered} /healthz and /v1/frontends answers during the reload, the slowest {slowest:?}");
    });
}

// ---------------------------------------------------------------------------------------------
// 17. A HAProxy that does not load the agent's file
// ---------------------------------------------------------------------------------------------

/// HAProxy restarted without `-f` and the agent's file (a drop-in gone missing): the agent's
/// reloads cannot bring its frontends back, so it says why (`/healthz`, and a new frontend's
/// 409), and reloads with a growing pause instead of on every tick.
#[test]
fn haproxy_without_the_agents_file_is_named_and_not_reloaded_in_a_loop() {
    let mut agent = Agent::attached();
    let a = Echo::start("127.0.0.2", "A");
    let fe = free_port();
    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    agent.wait_in_sync(SETTLE);

    agent.stop_attached_haproxy();
    agent.start_attached_haproxy_loading(false);
    let managed = agent.managed_cfg.display().to_string();
    let health = eventually(SETTLE, "/healthz to name the missing file", || {
        let r = agent.get("/healthz");
        match r.json()["error"].as_str() {
            Some(e) if e.contains("does not load the agent's file") && e.contains(&managed) => {
                Ok(r)
            }
            _ => Err(format!("{r:?}")),
        }
    });
    assert_eq!(health.status, 503, "{health:?}");

    // With a reconcile every 0.5 s, 8 s would be 16 reloads; the pause doubles from 2 s.
    let before = agent.metric("lbagent_haproxy_reloads_total");
    // An observation window, not a wait for something: count what happens in it.
    std::thread::sleep(Duration::from_secs(8));
    let reloads = agent.metric("lbagent_haproxy_reloads_total") - before;
    assert!(reloads <= 3.0, "{reloads} reloads in 8 s");

    // A new frontend cannot open: refused once its reload's deadline passes, with the cause.
    let other = free_port();
    let r = agent.put(other, "node-a", &body(&a.ip(), a.port(), json!({})));
    r.assert_error(409, "haproxy_rejected", "HAProxy without the agent's file");
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("does not load the agent's file"),
        "{message}"
    );

    // Fixed: HAProxy started with the file again has the frontends, and all is well.
    agent.stop_attached_haproxy();
    agent.start_attached_haproxy_loading(true);
    agent.wait_in_sync(SETTLE);
    wait_reaches(fe, "A", SETTLE);
}
