//! Cold start, beside a baseline measured in the same run: 30 and then 100 sidecars register as
//! many new frontend ports at once (a cluster that boots), each a signed `PUT` that needs a
//! reload. The agent coalesces them: the changes that wait while a reload runs share the next
//! one (`src/agent/reload.rs`).
//!
//! The baseline is the design before coalescing, one reload per new frontend: the same agent
//! build, on a fresh state and a fresh HAProxy like the measured case, sent the same `PUT`s
//! strictly one after another, so each is its own validated, confirmed reload. Its answer times
//! are counted from the start of the series, as a burst served one reload at a time would see
//! them (the k-th answer waits for k reloads).
//!
//! For both it reports the total time until the last answer, the reloads (the agent's
//! `lbagent_haproxy_reloads_total` and the HAProxy master's own reload counter from
//! `show proc`, before and after: they must agree), and p50/p99 of the answer times from the
//! start. Every answer must be 200 `"applied":"reload"`, and afterwards HAProxy must list every
//! new frontend. Each case runs on its own managed agent (the integration tests' harness,
//! `tests/common/agent.rs`, with `LBAGENT_TEST_HAPROXY` honoured), so reloads of a growing
//! configuration cost the same in both.
//!
//!     cargo bench --bench cold_start           # about a minute on a 2-core VM (HAProxy 2.6)
//!
//! Under `cargo test --benches` (no `--bench` argument) it runs 4 frontends once, to check that
//! it still works, and prints no table.

#[path = "../tests/common/mod.rs"]
mod common;
mod util;

use std::collections::BTreeSet;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::agent::Agent;
use common::free_port;

/// The server every new frontend gets: in maintenance, so HAProxy runs no health checks.
const BODY: &str = r#"{"node_ip":"127.0.0.2","node_port":30001,"state":"maint"}"#;

/// What one case measured.
struct Run {
    total: Duration,
    /// `lbagent_haproxy_reloads_total`, after minus before.
    reloads: u32,
    /// Each answer's time from the start of the case, sorted.
    answers: Vec<Duration>,
}

impl Run {
    fn p(&self, q: f64) -> Duration {
        self.answers[((self.answers.len() as f64 - 1.0) * q).round() as usize]
    }
}

/// `n` distinct loopback ports nothing listens on, none of them the agent's.
fn new_ports(n: usize, agent: &Agent) -> Vec<u16> {
    let mut ports = BTreeSet::new();
    for _ in 0..n * 20 {
        if ports.len() == n {
            break;
        }
        let p = free_port();
        if p != agent.addr.port() {
            ports.insert(p);
        }
    }
    assert_eq!(ports.len(), n, "could not find {n} free ports");
    ports.into_iter().collect()
}

fn put(agent: &Agent, port: u16) {
    let path = format!("/v1/frontends/{port}/servers/node-a");
    let r = agent.signed("PUT", &path, BODY);
    assert_eq!(r.status, 200, "PUT {path}: {r:?}\n{}", agent.log());
    assert_eq!(r.json()["applied"], "reload", "PUT {path}: {r:?}");
}

fn master_reloads(agent: &Agent) -> u32 {
    agent
        .show_proc()
        .master
        .and_then(|m| m.reloads)
        .expect("the master's show proc has a reload counter")
}

/// Runs `send` on a fresh agent and checks what it did.
fn case(n: usize, send: impl FnOnce(&Agent, &[u16]) -> (Duration, Vec<Duration>)) -> Run {
    let agent = Agent::managed();
    let ports = new_ports(n, &agent);
    let metric_before = agent.metric("lbagent_haproxy_reloads_total");
    let master_before = master_reloads(&agent);
    let (total, mut answers) = send(&agent, &ports);
    let reloads = agent.metric("lbagent_haproxy_reloads_total") - metric_before;
    let master = master_reloads(&agent) - master_before;
    assert_eq!(
        reloads,
        f64::from(master),
        "the agent's metric and HAProxy's master disagree on the reloads"
    );
    let stat = agent.admin_cmd("show stat");
    for p in &ports {
        assert!(
            stat.contains(&format!("\nfe_{p},FRONTEND,")),
            "HAProxy has no fe_{p}"
        );
    }
    answers.sort();
    Run {
        total,
        reloads: master,
        answers,
    }
}

/// Every `PUT` at once, released together by a barrier.
fn at_once(agent: &Agent, ports: &[u16]) -> (Duration, Vec<Duration>) {
    let go = Barrier::new(ports.len() + 1);
    let start = std::sync::OnceLock::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = ports
            .iter()
            .map(|&port| {
                let (go, start) = (&go, &start);
                s.spawn(move || {
                    go.wait();
                    put(agent, port);
                    Instant::now().duration_since(*start.get().expect("start set before the go"))
                })
            })
            .collect();
        start.set(Instant::now()).expect("set once");
        go.wait();
        let answers: Vec<Duration> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let total = answers.iter().copied().max().unwrap_or_default();
        (total, answers)
    })
}

/// The baseline: one `PUT` after another, each its own reload.
fn one_at_a_time(agent: &Agent, ports: &[u16]) -> (Duration, Vec<Duration>) {
    let start = Instant::now();
    let answers: Vec<Duration> = ports
        .iter()
        .map(|&port| {
            put(agent, port);
            start.elapsed()
        })
        .collect();
    (start.elapsed(), answers)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// `median (min–max)` of `values`, with `digits` decimals.
fn spread(values: &[f64], digits: usize, unit: &str) -> String {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    if v.len() == 1 {
        return format!("{median:.digits$}{unit}");
    }
    format!(
        "{median:.digits$}{unit} ({:.digits$}–{:.digits$})",
        v[0],
        v[v.len() - 1]
    )
}

fn main() {
    let measuring = util::measuring();
    let (sizes, rounds): (&[usize], usize) = if measuring {
        (&[30, 100], 3)
    } else {
        (&[4], 1)
    };
    let load_before = loadavg();
    let started = Instant::now();
    // (n, lbagent's runs, the baseline's runs); the two alternate, so a change of load on a
    // shared machine falls on both.
    let mut rows: Vec<(usize, Vec<Run>, Vec<Run>)> =
        sizes.iter().map(|&n| (n, Vec::new(), Vec::new())).collect();
    for _ in 0..rounds {
        for (n, coalesced, baseline) in rows.iter_mut() {
            coalesced.push(case(*n, at_once));
            let b = case(*n, one_at_a_time);
            assert_eq!(
                b.reloads as usize, *n,
                "the baseline must reload once per frontend"
            );
            baseline.push(b);
        }
    }
    if !measuring {
        return;
    }
    println!(
        "\nCold start: N new frontends at once vs one at a time, {rounds} rounds: median (min–max)"
    );
    println!(
        "HAProxy {}; load average {load_before} before, {} after; {:.0} s",
        common::haproxy_branch(),
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "| N | measure | lbagent, all at once | baseline, one at a time | baseline ÷ lbagent |"
    );
    println!("| ---: | --- | ---: | ---: | ---: |");
    type Measure = fn(&Run) -> f64;
    let measures: [(&str, Measure); 4] = [
        ("total (ms)", |r| ms(r.total)),
        ("reloads", |r| f64::from(r.reloads)),
        ("p50 answer from the start (ms)", |r| ms(r.p(0.50))),
        ("p99 answer from the start (ms)", |r| ms(r.p(0.99))),
    ];
    for (n, c, b) in &rows {
        for (name, of) in measures {
            let cv: Vec<f64> = c.iter().map(of).collect();
            let bv: Vec<f64> = b.iter().map(of).collect();
            // Each round's baseline over the same round's lbagent.
            let ratio: Vec<f64> = bv.iter().zip(&cv).map(|(b, c)| b / c.max(1e-9)).collect();
            println!(
                "| {n} | {name} | {} | {} | {} |",
                spread(&cv, 0, ""),
                spread(&bv, 0, ""),
                spread(&ratio, 1, "×")
            );
        }
    }
    // What one reload costs alone, for reading the table: the baseline's gaps between answers.
    for (n, _, b) in &rows {
        let mut gaps: Vec<f64> = b
            .iter()
            .flat_map(|r| {
                std::iter::once(r.answers[0])
                    .chain(r.answers.windows(2).map(|w| w[1] - w[0]))
                    .map(ms)
                    .collect::<Vec<_>>()
            })
            .collect();
        gaps.sort_by(f64::total_cmp);
        println!(
            "baseline, N = {n}: one PUT and its own reload took p50 {:.0} ms, max {:.0} ms",
            gaps[gaps.len() / 2],
            gaps[gaps.len() - 1]
        );
    }
}
