//! Day two, black box against a real HAProxy: registrations are leases renewed by each PUT (and
//! none expires when most go silent at once), and a deleted server drains (kept in maintenance
//! until its last connection ends, cut at `--drain-timeout`) without making `/healthz` fail.

mod common;

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::agent::{body, eventually, wait_reaches, Agent, Echo, Options};
use common::free_port;
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(15);

fn registered(agent: &Agent, port: u16) -> Vec<String> {
    agent
        .desired()
        .1
        .keys()
        .filter(|(p, _)| *p == port)
        .map(|(_, n)| n.clone())
        .collect()
}

/// The registrations a heartbeat thread renews: node name and its backend.
type Beating = Arc<Mutex<Vec<(String, Echo)>>>;

/// Renews the registrations in the returned list every 200 ms on another thread of `scope`,
/// until the returned flag is set.
fn heartbeats<'s, 'a: 's>(
    scope: &'s std::thread::Scope<'s, 'a>,
    agent: &'a Agent,
    fe: u16,
) -> (Beating, Arc<AtomicBool>) {
    let nodes: Beating = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (n, s) = (nodes.clone(), stop.clone());
    scope.spawn(move || {
        // Bounded: the test ends well within this.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
            for (node, echo) in n.lock().unwrap().iter() {
                let r = agent.put(fe, node, &body(&echo.ip(), echo.port(), json!({})));
                assert!(r.status == 200, "heartbeat of {node}: {r:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    (nodes, stop)
}

/// With `--lease 3s`: a silent registration expires (deleted from the state and from HAProxy)
/// while renewed ones, and one registered with `"lease": false`, stay; when more than half go silent at once none expires and
/// `lbagent_lease_expiry_suspended` is 1, until enough renewals come back.
#[test]
fn silent_registrations_expire_unless_most_go_silent_at_once() {
    let agent = Agent::managed_with(Options {
        extra: vec!["--lease".into(), "3s".into()],
        ..Options::default()
    });
    let fe = free_port();
    let echoes: Vec<Echo> = (0..4)
        .map(|i| Echo::start(&format!("127.0.0.{}", i + 2), &format!("E{i}")))
        .collect();
    for (i, e) in echoes.iter().enumerate() {
        agent.put_ok(
            fe,
            &format!("node-{i}"),
            &body(&e.ip(), e.port(), json!({})),
            if i == 0 { "reload" } else { "runtime" },
        );
    }
    let mut echoes = echoes.into_iter();
    let e0 = echoes.next().unwrap();
    // Registered for good (`lbctl phone-home --once`): silent throughout, it never expires and
    // does not count for the outage guard.
    let forever = Echo::start("127.0.0.9", "F");
    agent.put_ok(
        fe,
        "node-4",
        &body(&forever.ip(), forever.port(), json!({"lease": false})),
        "runtime",
    );
    std::thread::scope(|s| {
        let (beating, stop) = heartbeats(s, &agent, fe);
        // node-1..3 renew; node-0 stays silent and expires: 1 of 4 overdue.
        for (i, e) in echoes.by_ref().enumerate() {
            beating.lock().unwrap().push((format!("node-{}", i + 1), e));
        }
        let started = Instant::now();
        eventually(SETTLE, "node-0's lease to expire", || {
            let nodes = registered(&agent, fe);
            if nodes.contains(&"node-0".to_string()) {
                Err(format!("{nodes:?}"))
            } else {
                Ok(())
            }
        });
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2),
            "node-0 expired {waited:?} after the heartbeats began, within its 3 s lease"
        );
        assert_eq!(
            registered(&agent, fe),
            ["node-1", "node-2", "node-3", "node-4"],
            "renewed registrations stay"
        );
        eventually(SETTLE, "node-0 to leave HAProxy", || {
            let obs = agent.observed();
            match obs.contains_key(&(format!("be_{fe}"), "node-0".into())) {
                true => Err(format!("{obs:?}")),
                false => Ok(()),
            }
        });
        assert_eq!(agent.metric("lbagent_lease_expiries_total"), 1.0);
        assert!(agent.log().contains("lease expired"), "{}", agent.log());
        drop(e0);

        // All three go silent at once: a control-plane outage. None expires.
        let mut silent: Vec<(String, Echo)> = std::mem::take(&mut *beating.lock().unwrap());
        eventually(SETTLE, "lease expiry to be suspended", || {
            match agent.metric("lbagent_lease_expiry_suspended") {
                1.0 => Ok(()),
                v => Err(format!("lbagent_lease_expiry_suspended {v}")),
            }
        });
        // The check that suspended expiry saw all three overdue and expired none.
        assert_eq!(
            registered(&agent, fe),
            ["node-1", "node-2", "node-3", "node-4"]
        );
        assert_eq!(agent.metric("lbagent_lease_expiries_total"), 1.0);
        let h = agent.get("/healthz");
        assert_eq!(
            h.status, 200,
            "a control-plane outage is no data-plane fault: {h:?}"
        );
        let why = h.json()["leases_suspended"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(why.contains("3 of 3"), "{h:?}");
        // One comes back: two of three still overdue, still suspended.
        beating.lock().unwrap().push(silent.remove(0));
        eventually(SETTLE, "node-1 renewed, expiry still suspended", || {
            let h = agent.get("/healthz").json();
            let why = h["leases_suspended"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            why.contains("2 of 3").then_some(()).ok_or(format!("{h}"))
        });
        assert_eq!(
            registered(&agent, fe),
            ["node-1", "node-2", "node-3", "node-4"]
        );
        // Two come back: one of three overdue, expiry resumes and node-3 expires.
        beating.lock().unwrap().push(silent.remove(0));
        eventually(SETTLE, "node-3 to expire once renewals are back", || {
            let nodes = registered(&agent, fe);
            if nodes == ["node-1", "node-2", "node-4"] {
                Ok(())
            } else {
                Err(format!("{nodes:?}"))
            }
        });
        assert_eq!(agent.metric("lbagent_lease_expiry_suspended"), 0.0);
        assert_eq!(agent.metric("lbagent_lease_expiries_total"), 2.0);
        assert!(agent.get("/healthz").json()["leases_suspended"].is_null());
        stop.store(true, Ordering::SeqCst);
    });
}

/// A backend that accepts connections and holds them open until told to close them.
struct Holder {
    addr: std::net::SocketAddr,
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Holder {
    fn start(ip: &str) -> Holder {
        let listener = TcpListener::bind(format!("{ip}:0")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (held.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((c, _)) => h.lock().unwrap().push(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Holder { addr, held, stop }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `scur` of `backend/server` in `show stat`: its current sessions.
fn sessions(agent: &Agent, backend: &str, server: &str) -> Option<u64> {
    let text = agent.admin_cmd("show stat");
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(',').collect();
        (f.len() > 4 && f[0] == backend && f[1] == server).then(|| f[4].parse().ok())?
    })
}

/// A client connection through `fe` that HAProxy has passed to `server`.
fn hold_through(agent: &Agent, fe: u16, backend: &str, server: &str) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", fe)).unwrap();
    eventually(
        SETTLE,
        "the held connection to reach the server",
        || match sessions(agent, backend, server) {
            Some(n) if n >= 1 => Ok(()),
            other => Err(format!("scur {other:?}")),
        },
    );
    c
}

fn draining(agent: &Agent) -> Vec<String> {
    let h = agent.get("/healthz");
    assert_eq!(h.status, 200, "a draining server is no failure: {h:?}");
    h.json()["draining"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn in_haproxy(agent: &Agent, backend: &str, server: &str) -> Option<&'static str> {
    agent
        .observed()
        .get(&(backend.to_string(), server.to_string()))
        .map(|o| o.state())
}

/// DELETE of a server with a live connection answers at once; the server stays in HAProxy in
/// maintenance, listed under `draining` with `/healthz` 200 (not drift), and is deleted when
/// the connection ends; with a connection that stays, `--drain-timeout` cuts it and the server
/// goes. A PUT while it drains brings the same server back, moved and ready, at once.
#[test]
fn deletes_drain_until_the_last_connection_or_the_timeout() {
    let agent = Agent::managed_with(Options {
        extra: vec!["--drain-timeout".into(), "4s".into()],
        ..Options::default()
    });
    let fe = free_port();
    let be = format!("be_{fe}");
    let holder = Holder::start("127.0.0.2");
    let put_holder = |applied: &str| {
        agent.put_ok(
            fe,
            "node-a",
            &body(&holder.addr.ip().to_string(), holder.addr.port(), json!({})),
            applied,
        )
    };
    let delete = || {
        let r = agent.signed("DELETE", &format!("/v1/frontends/{fe}/servers/node-a"), "");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["applied"], "runtime", "{r:?}");
    };
    put_holder("reload");
    agent.wait_in_sync(SETTLE);

    // 1. The connection ends on its own: the server is deleted then.
    let client = hold_through(&agent, fe, &be, "node-a");
    delete();
    assert!(!agent.desired().1.contains_key(&(fe, "node-a".into())));
    assert_eq!(in_haproxy(&agent, &be, "node-a"), Some("maint"));
    eventually(SETTLE, "node-a listed as draining", || {
        let d = draining(&agent);
        (d == [format!("{be}/node-a")])
            .then_some(())
            .ok_or(format!("{d:?}"))
    });
    // Several reconcile rounds (0.5 s each) while it drains: still there, still healthy.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(draining(&agent), [format!("{be}/node-a")]);
        assert_eq!(in_haproxy(&agent, &be, "node-a"), Some("maint"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(agent.metric("lbagent_servers_draining"), 1.0);
    assert!(agent.get("/healthz").json()["drift"].is_null());
    client.shutdown(Shutdown::Both).unwrap();
    drop(client);
    holder.held.lock().unwrap().clear();
    eventually(SETTLE, "node-a deleted once idle", || {
        match in_haproxy(&agent, &be, "node-a") {
            None => Ok(()),
            Some(s) => Err(s.to_string()),
        }
    });
    assert!(draining(&agent).is_empty());
    assert_eq!(agent.metric("lbagent_drain_timeouts_total"), 0.0);

    // 2. The connection stays: cut at the drain timeout, then deleted.
    put_holder("runtime");
    agent.wait_in_sync(SETTLE);
    let mut client = hold_through(&agent, fe, &be, "node-a");
    let deleted = Instant::now();
    delete();
    eventually(
        SETTLE,
        "node-a deleted after the drain timeout",
        || match in_haproxy(&agent, &be, "node-a") {
            None => Ok(()),
            Some(s) => Err(s.to_string()),
        },
    );
    assert!(
        deleted.elapsed() >= Duration::from_secs(3),
        "deleted {:?} after the DELETE, before the 4 s drain timeout",
        deleted.elapsed()
    );
    assert_eq!(agent.metric("lbagent_drain_timeouts_total"), 1.0);
    // HAProxy shut the client's side too.
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("the cut connection still delivered {n} bytes"),
    }
    holder.held.lock().unwrap().clear();

    // 3. A PUT while it drains brings the same server back, moved and ready, at once.
    put_holder("runtime");
    agent.wait_in_sync(SETTLE);
    let _client = hold_through(&agent, fe, &be, "node-a");
    delete();
    eventually(SETTLE, "node-a draining", || {
        (!draining(&agent).is_empty())
            .then_some(())
            .ok_or_else(String::new)
    });
    let echo = Echo::start("127.0.0.3", "E");
    agent.put_ok(
        fe,
        "node-a",
        &body(&echo.ip(), echo.port(), json!({})),
        "runtime",
    );
    assert_eq!(in_haproxy(&agent, &be, "node-a"), Some("ready"));
    assert!(draining(&agent).is_empty());
    wait_reaches(fe, "E", SETTLE);
    agent.wait_in_sync(SETTLE);
    assert_eq!(agent.metric("lbagent_servers_draining"), 0.0);
}
