//! The agent at 10,000 servers, beside baselines measured in the same run:
//!
//! - **idle CPU**: the agent's and HAProxy's CPU over a window with no requests, the agent at
//!   its defaults (a `show info` look every 2 s, the full comparison every 15 s); the baseline
//!   is the same HAProxy over windows of the same length while the agent is frozen (SIGSTOP),
//!   so nobody polls it. Polled and unpolled windows alternate, three of each, so a drift of
//!   the machine's load falls on both. The difference is what the polling costs HAProxy.
//! - **`GET /v1/frontends`** end to end (signed request, JSON of every server): read from a
//!   `show stat` older than the reconcile interval (a cold read: the request reads it) and from a
//!   shared one (warm); the baseline is the same `show stat` read and parsed straight from the
//!   socket.
//!
//! The 10,000 servers are in maintenance, so HAProxy runs no health checks: what remains of its
//! CPU is its own timers and the polling. Ten frontends of 1,000 servers.
//!
//!     cargo bench --bench idle        # about 2.5 minutes on a 2-core VM
//!
//! Under `cargo test --benches` (no `--bench` argument) it runs 200 servers and 1 s windows,
//! to check that it still works, and prints no table.

#[path = "../tests/common/mod.rs"]
mod common;
mod util;

use std::time::{Duration, Instant};

use common::agent::{Agent, Options};
use common::free_port;
use lbagent::runtime::{ClientOptions, Endpoint, RuntimeClient};

/// The kernel's unit for utime and stime in /proc/PID/stat (USER_HZ, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// CPU time (user + system) of `pids` so far, in seconds; a pid that is gone counts 0.
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // After the command name, which is in parentheses and may hold spaces.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / TICKS_PER_S
}

/// Percent of one core `pids` used over `window`.
fn cpu_percent(pids: &[u32], window: Duration) -> f64 {
    let before = cpu_seconds(pids);
    std::thread::sleep(window);
    (cpu_seconds(pids) - before) / window.as_secs_f64() * 100.0
}

fn fill(agent: &Agent, ports: &[u16], per_frontend: usize) {
    // One server per frontend first: the new frontends share a reload or two.
    std::thread::scope(|s| {
        for (f, port) in ports.iter().enumerate() {
            s.spawn(move || put(agent, *port, f, 0));
        }
    });
    let threads = 8;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for (f, port) in ports.iter().enumerate() {
                    for i in (1..per_frontend).filter(|i| i % threads == t) {
                        put(agent, *port, f, i);
                    }
                }
            });
        }
    });
}

fn put(agent: &Agent, port: u16, f: usize, i: usize) {
    let body = format!(
        r#"{{"node_ip":"127.{}.{}.{}","node_port":30001,"state":"maint"}}"#,
        1 + f,
        i / 250,
        1 + i % 250
    );
    let path = format!("/v1/frontends/{port}/servers/n{i}");
    let r = agent.signed("PUT", &path, &body);
    assert_eq!(r.status, 200, "PUT {path}: {r:?}");
}

fn get_frontends(agent: &Agent, servers: usize) -> Duration {
    let t = Instant::now();
    let r = agent.signed("GET", "/v1/frontends", "");
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    let listed: usize = v["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["servers"].as_array().unwrap().len())
        .sum();
    assert_eq!(listed, servers);
    took
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let measuring = util::measuring();
    let (frontends, per_frontend) = if measuring { (10, 1000) } else { (2, 100) };
    let window = Duration::from_secs(if measuring { 30 } else { 1 });
    let pairs = if measuring { 3 } else { 1 };
    let reconcile = Duration::from_secs(2);
    let mut agent = Agent::managed_with(Options {
        extra: [
            "--max-servers-per-frontend",
            "1000",
            // The production defaults (the harness sets short ones for tests).
            "--reconcile-interval",
            "2",
            "--drift-check-interval",
            "15s",
            // Idle: nobody renews, and nothing may expire meanwhile.
            "--lease",
            "0",
        ]
        .map(String::from)
        .to_vec(),
        ..Options::default()
    });
    let ports: Vec<u16> = (0..frontends).map(|_| free_port()).collect();
    let servers = frontends * per_frontend;
    let t = Instant::now();
    fill(&agent, &ports, per_frontend);
    let filled = t.elapsed();
    agent.wait_in_sync(Duration::from_secs(60));

    // GET /v1/frontends: cold (the cached show stat is older than the reconcile interval),
    // then warm (the next ones share it). Baseline: show stat straight from the socket.
    let rounds = if measuring { 5 } else { 1 };
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for _ in 0..rounds {
        std::thread::sleep(reconcile + Duration::from_millis(100));
        cold.push(get_frontends(&agent, servers));
        for _ in 0..4 {
            warm.push(get_frontends(&agent, servers));
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let direct: Vec<Duration> = rt.block_on(async {
        let mut c = RuntimeClient::new(
            Endpoint::Unix(agent.admin.clone()),
            ClientOptions::default(),
        );
        let mut v = Vec::new();
        for _ in 0..rounds {
            c.disconnect();
            let t = Instant::now();
            let rows = c.show_stat().await.expect("show stat");
            v.push(t.elapsed());
            assert!(rows.len() >= servers);
        }
        v
    });

    // Idle CPU with the agent polling, and of the same HAProxy while the agent is frozen.
    let haproxy = agent.haproxy_pids();
    let agent_pid = [agent.pid()];
    let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    let (mut agent_cpu, mut polled, mut unpolled) = (0.0, 0.0, 0.0);
    for _ in 0..pairs {
        let before = (cpu_seconds(&agent_pid), cpu_seconds(&haproxy));
        std::thread::sleep(window);
        agent_cpu += (cpu_seconds(&agent_pid) - before.0) / window.as_secs_f64() * 100.0;
        polled += (cpu_seconds(&haproxy) - before.1) / window.as_secs_f64() * 100.0;
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        unpolled += cpu_percent(&haproxy, window);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    }
    let n = pairs as f64;
    let (agent_cpu, polled, unpolled) = (agent_cpu / n, polled / n, unpolled / n);
    // Still working after the freezes.
    assert_eq!(agent.get("/healthz").status, 200);
    agent.stop();

    if !measuring {
        return;
    }
    let (c, w, d) = (
        median(cold.clone()),
        median(warm.clone()),
        median(direct.clone()),
    );
    let worst = |v: &[Duration]| v.iter().copied().max().unwrap_or_default();
    println!(
        "\nlbagent at {servers} servers, idle ({frontends} frontends; filled in {:.1} s; CPU: the mean of {pairs} windows of {window:?} each)",
        filled.as_secs_f64()
    );
    println!("| measure | lbagent | baseline | ratio | target |");
    println!("| --- | ---: | ---: | ---: | --- |");
    println!(
        "| GET /v1/frontends, cold: median (max) ms | {:.1} ({:.1}) | {:.1} ({:.1}) (show stat read and parsed on the socket) | {:.2}× | ≤ 50 ms |",
        ms(c),
        ms(worst(&cold)),
        ms(d),
        ms(worst(&direct)),
        ms(c) / ms(d)
    );
    println!(
        "| GET /v1/frontends, warm: median (max) ms | {:.1} ({:.1}) | {:.1} | {:.2}× | ≤ 50 ms |",
        ms(w),
        ms(worst(&warm)),
        ms(d),
        ms(w) / ms(d)
    );
    println!("| agent CPU, idle (% of a core) | {agent_cpu:.2} | | | ≤ 1 % |");
    println!(
        "| HAProxy CPU, idle (% of a core) | {polled:.2} (polled) | {unpolled:.2} (nobody polls) | +{:.2} points | ≤ +1 point |",
        polled - unpolled
    );
}
