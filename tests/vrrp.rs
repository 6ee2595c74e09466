//! A floating IP with keepalived (deploy/keepalived/), end to end: two load-balancer hosts and
//! a client in network namespaces on one /24, each LB a real lbagent with its own HAProxy and a
//! real keepalived running the deploy example's config; HAProxy dying on the master moves the
//! floating IP to the other LB and the client's new connections go on working.
//!
//! Needs root and keepalived (CI has both): without them it fails, saying so.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::agent::{body, eventually, through_addr, Agent, Echo, Options};
use common::netns::{command_in, in_netns, require, Daemon, Lan};
use serde_json::json;

const KEEPALIVED: &str = "/usr/sbin/keepalived";

/// The LAN: LB A, LB B, the client (which also runs the echo backend) and the floating IP.
const NET: &str = "10.99.0";
const LB_A: &str = "10.99.0.11";
const LB_B: &str = "10.99.0.12";
const CLIENT: &str = "10.99.0.20";
const FLOATING: &str = "10.99.0.100";

/// The frontend port both agents are given.
const FRONTEND: u16 = 8080;

/// What the first election may take: each check must pass twice (rise 2, interval 2) before an
/// instance leaves FAULT, then a BACKUP waits three adverts before it takes over; a loaded
/// 2-vCPU machine gets room on top.
const ELECTION: Duration = Duration::from_secs(30);

/// What the failover may take: two failed checks (fall 2, interval 2) and the peer taking over
/// at once (the master in FAULT says priority 0), with room.
const FAILOVER: Duration = Duration::from_secs(15);

/// An echo backend inside a namespace; stopped from inside it (its wake-up connection must
/// reach it), also when the test panics.
struct NsEcho {
    ns: String,
    echo: Option<Echo>,
}

impl Drop for NsEcho {
    fn drop(&mut self) {
        if let Some(e) = self.echo.take() {
            in_netns(&self.ns, move || drop(e));
        }
    }
}

/// The deploy example's config for one LB, with this test's addresses, binaries and agent URL
/// in place of the example's: every example value must be there to be replaced, so the example
/// cannot drift from what is tested.
fn keepalived_config(file: &str, agent: SocketAddr) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("deploy/keepalived").join(file);
    let mut text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let notify = root.join("deploy/keepalived/notify-floating-ip.sh");
    let agent_url = format!("http://{agent}");
    for (example, ours) in [
        ("192.0.2.100/24", format!("{FLOATING}/24")),
        ("192.0.2.11", LB_A.to_string()),
        ("192.0.2.12", LB_B.to_string()),
        (
            "/usr/local/bin/lbctl",
            env!("CARGO_BIN_EXE_lbctl").to_string(),
        ),
        ("http://127.0.0.1:9900", agent_url),
        (
            "/etc/keepalived/notify-floating-ip.sh",
            notify.display().to_string(),
        ),
    ] {
        assert!(
            text.contains(example),
            "{} no longer has {example:?}: update this test with it",
            path.display()
        );
        text = text.replace(example, &ours);
    }
    for line in text.lines() {
        let setting = line.split('#').next().unwrap_or_default();
        assert!(
            !setting.contains("192.0.2."),
            "{}: an example address this test does not replace: {line:?}",
            path.display()
        );
    }
    text
}

/// keepalived inside `ns` with `config`, its pid files beside it.
fn keepalived(ns: &str, dir: &Path, label: &str, config: &str) -> Daemon {
    let conf = dir.join(format!("{label}.conf"));
    std::fs::write(&conf, config).unwrap();
    let mut cmd = command_in(ns, KEEPALIVED);
    // In the foreground, VRRP only, logging to the console (the log file); its own pid files,
    // so it runs beside any keepalived of the machine's.
    cmd.args([
        "--dont-fork",
        "--log-console",
        "--log-detail",
        "--no-syslog",
    ])
    .arg("--vrrp")
    .arg("--use-file")
    .arg(&conf)
    .arg(format!(
        "--pid={}",
        dir.join(format!("{label}.pid")).display()
    ))
    .arg(format!(
        "--vrrp_pid={}",
        dir.join(format!("{label}-vrrp.pid")).display()
    ));
    Daemon::spawn(
        label,
        cmd,
        dir.join(format!("{label}.log")),
        &conf.display().to_string(),
    )
}

/// Whether `ns` holds the floating IP.
fn holds(ns: &str) -> bool {
    Lan::addrs(ns).contains(&format!("{FLOATING}/24"))
}

/// The one line the echo answers through `addr`, asked from the client's namespace.
fn from_client(client: &str, addr: SocketAddr) -> Result<String, String> {
    in_netns(client, || through_addr(addr))
}

#[test]
fn the_floating_ip_moves_when_the_masters_haproxy_dies() {
    require(&[("keepalived", Path::new(KEEPALIVED))]);
    let started = Instant::now();

    // Dropped in reverse: keepalived, the agents, the echo, then the namespaces.
    let prefix = format!("vr{}", std::process::id());
    let mut lan = Lan::new(&prefix);
    let (ns_a, ns_b, ns_c) = (
        format!("{prefix}a"),
        format!("{prefix}b"),
        format!("{prefix}c"),
    );
    lan.host(&ns_a, &format!("{LB_A}/24"));
    lan.host(&ns_b, &format!("{LB_B}/24"));
    lan.host(&ns_c, &format!("{CLIENT}/24"));
    assert!(FLOATING.starts_with(NET) && !holds(&ns_a) && !holds(&ns_b));

    let echo = in_netns(&ns_c, || Echo::bind(&format!("{CLIENT}:0"), "echo"))
        .unwrap_or_else(|e| panic!("echo on {CLIENT}: {e}"));
    let echo_port = echo.port();
    let _echo = NsEcho {
        ns: ns_c.clone(),
        echo: Some(echo),
    };

    // Each LB's agent is told the same registration: until agents share state, that is what
    // an HA pair needs (docs/operations.md).
    let agent = |ns: &str| {
        Agent::managed_with(Options {
            netns: Some(ns.to_string()),
            frontend_bind: "0.0.0.0".into(),
            ..Options::default()
        })
    };
    let mut agents = [agent(&ns_a), agent(&ns_b)];
    for (a, ip) in agents.iter().zip([LB_A, LB_B]) {
        a.put_ok(
            FRONTEND,
            "echo-1",
            &body(CLIENT, echo_port, json!({})),
            "reload",
        );
        let direct = SocketAddr::new(ip.parse().unwrap(), FRONTEND);
        eventually(
            Duration::from_secs(10),
            &format!("the echo through {direct}"),
            || from_client(&ns_c, direct).and_then(|l| (l == "echo").then_some(()).ok_or(l)),
        );
    }

    // The configs, pid files and logs; the scripts they run stay where they are (the built
    // lbctl, the example's notify hook) for enable_script_security to judge.
    let dir = tempfile::tempdir().unwrap();
    let dir_path: PathBuf = dir.path().canonicalize().unwrap();
    let ka_started = Instant::now();
    let mut ka = [
        keepalived(
            &ns_a,
            &dir_path,
            "keepalived-a",
            &keepalived_config("keepalived-a.conf", agents[0].addr),
        ),
        keepalived(
            &ns_b,
            &dir_path,
            "keepalived-b",
            &keepalived_config("keepalived-b.conf", agents[1].addr),
        ),
    ];

    // The floating IP lands on one LB, and only one.
    let ns = [ns_a.as_str(), ns_b.as_str()];
    let master = eventually(ELECTION, "the floating IP on one LB", || {
        ka.iter_mut().for_each(Daemon::assert_running);
        match (holds(ns[0]), holds(ns[1])) {
            (true, false) => Ok(0),
            (false, true) => Ok(1),
            (a, b) => Err(format!("A holds it: {a}, B holds it: {b}")),
        }
    });
    let backup = 1 - master;
    let elected = ka_started.elapsed();
    for k in &ka {
        let log = k.log_text();
        let lower = log.to_lowercase();
        assert!(
            !lower.contains("disabling") && !lower.contains("unsafe"),
            "{} refused a script of the example:\n{log}",
            k.label
        );
    }
    let floating = SocketAddr::new(FLOATING.parse().unwrap(), FRONTEND);
    eventually(
        Duration::from_secs(10),
        "the echo through the floating IP",
        || from_client(&ns_c, floating).and_then(|l| (l == "echo").then_some(()).ok_or(l)),
    );

    // HAProxy dies on the master, and its agent with it so that nothing starts HAProxy again
    // (a managed agent restarts it within a second, before keepalived would notice).
    let dead = &mut agents[master];
    let haproxy = dead.haproxy_pids();
    assert!(!haproxy.is_empty(), "no HAProxy of the master to kill");
    dead.kill9();
    for pid in &haproxy {
        common::send_signal(*pid, "KILL");
    }
    eventually(
        Duration::from_secs(5),
        "the master's HAProxy gone",
        || match dead.haproxy_pids() {
            left if left.is_empty() => Ok(()),
            left => Err(format!("{left:?}")),
        },
    );
    let killed = Instant::now();

    eventually(FAILOVER, "the floating IP on the other LB", || {
        ka.iter_mut().for_each(Daemon::assert_running);
        match (holds(ns[master]), holds(ns[backup])) {
            (false, true) => Ok(()),
            (m, b) => Err(format!("old master holds it: {m}, the other: {b}")),
        }
    });
    let moved = killed.elapsed();
    // Only the other LB's HAProxy is left to answer.
    eventually(
        Duration::from_secs(10),
        "the echo through the floating IP after the failover",
        || from_client(&ns_c, floating).and_then(|l| (l == "echo").then_some(()).ok_or(l)),
    );
    let serving = killed.elapsed();
    for _ in 0..5 {
        assert_eq!(from_client(&ns_c, floating).as_deref(), Ok("echo"));
    }
    eprintln!(
        "vrrp: first master {} {elected:?} after keepalived started; floating IP on {} {moved:?} after the kill, \
         serving after {serving:?}; {:?} in all",
        ["A", "B"][master],
        ["A", "B"][backup],
        started.elapsed()
    );
}
