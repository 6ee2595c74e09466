//! Several agents on etcd (issue #12), each beside a baseline measured in the same run: the time
//! from a `PUT` on agent A to the change in HAProxy B (a server move, live; a new frontend, by
//! B's own reload) against the same change reaching HAProxy A; and durable changes per second
//! with 32 clients on an agent storing in etcd against one on the local journal. Prints one
//! table.
//!
//! `cargo bench --bench ha` (the figures are in docs/performance.md). A three-member etcd
//! cluster on loopback (Debian's `etcd`), two managed agents, echo backends.

#[path = "../tests/common/mod.rs"]
mod common;
mod util;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::agent::{body, Agent, Echo, Options};
use common::answers;
use common::etcd::EtcdCluster;
use common::free_port;
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn agent(extra: &[String], bind: &str) -> Agent {
    Agent::managed_with(Options {
        frontend_bind: bind.into(),
        extra: extra.to_vec(),
        ..Default::default()
    })
}

/// Polls `agent`'s HAProxy (1 ms apart, 10 s at most) until backend `be_<port>`'s server `n1`
/// has address `ip`; the time it took from `since`.
fn until_addr(agent: &Agent, port: u16, ip: &str, since: Instant) -> Duration {
    let needle = format!(" n1 {ip} ");
    let deadline = since + Duration::from_secs(10);
    loop {
        if let Some(text) = answers(&agent.admin, &format!("show servers state be_{port}\n")) {
            if text.contains(&needle) {
                return since.elapsed();
            }
        }
        assert!(Instant::now() < deadline, "{ip} never reached be_{port}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls until something accepts on `addr`; the time it took from `since`.
fn until_open(addr: SocketAddr, since: Instant) -> Duration {
    let deadline = since + Duration::from_secs(20);
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return since.elapsed();
        }
        assert!(Instant::now() < deadline, "{addr} never opened");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Durable changes per second with `clients` threads, each moving its own node, for `window`.
fn throughput(agent: &Agent, fe: u16, clients: usize, window: Duration) -> f64 {
    let done = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            let done = &done;
            s.spawn(move || {
                let mut i = 0u32;
                while started.elapsed() < window {
                    let b = body(
                        &format!("127.0.0.{}", 2 + i % 2),
                        30001,
                        json!({"state": "maint"}),
                    );
                    let r = agent.put(fe, &format!("t{c}"), &b);
                    assert_eq!(r.status, 200, "{r:?}");
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            });
        }
    });
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    // `cargo test --benches` runs benches with `--bench` absent: keep that quick.
    let quick = !util::measuring();
    let moves = if quick { 10 } else { 100 };
    let news = if quick { 2 } else { 10 };
    let window = Duration::from_millis(if quick { 300 } else { 3000 });

    let etcd = EtcdCluster::start(3);
    let on_etcd = |name: &str| {
        vec![
            "--etcd".to_string(),
            etcd.urls(),
            "--agent-name".into(),
            name.into(),
        ]
    };
    let a = agent(&on_etcd("lb-a"), "127.0.0.11");
    let mut b = agent(&on_etcd("lb-b"), "127.0.0.12");
    b.share_key_of(&a);
    let (one, two) = Echo::pair("127.0.0.61", "one", "127.0.0.62", "two");

    // A server moved between two addresses through A: when HAProxy A, then HAProxy B has it.
    let fe = free_port();
    let r = a.put(fe, "n1", &body(&one.ip(), one.port(), json!({})));
    assert_eq!(r.status, 200, "{r:?}");
    until_open(SocketAddr::from(([127, 0, 0, 12], fe)), Instant::now());
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for i in 0..moves {
        let to = if i % 2 == 0 { &two } else { &one };
        let t = Instant::now();
        let r = a.put(fe, "n1", &body(&to.ip(), to.port(), json!({})));
        assert_eq!(r.status, 200, "{r:?}");
        local.push(until_addr(&a, fe, &to.ip(), t));
        remote.push(until_addr(&b, fe, &to.ip(), t));
    }
    local.sort();
    remote.sort();

    // New frontends through A: when A answered (its reload done), when B accepts on its own.
    let (mut new_local, mut new_remote) = (Vec::new(), Vec::new());
    for _ in 0..news {
        let port = free_port();
        let t = Instant::now();
        let r = a.put(port, "n1", &body(&one.ip(), one.port(), json!({})));
        assert_eq!(r.status, 200, "{r:?}");
        new_local.push(t.elapsed());
        new_remote.push(until_open(SocketAddr::from(([127, 0, 0, 12], port)), t));
    }
    new_local.sort();
    new_remote.sort();

    // Durable changes/s at 32 clients: etcd (A) against the local journal, same machine, run.
    let journal = agent(&[], "127.0.0.13");
    let (fe_etcd, fe_journal) = (free_port(), free_port());
    for (agent, port) in [(&a, fe_etcd), (&journal, fe_journal)] {
        let r = agent.put(
            port,
            "seed",
            &body("127.0.0.2", 30001, json!({"state": "maint"})),
        );
        assert_eq!(r.status, 200, "{r:?}");
    }
    let journal_rate = throughput(&journal, fe_journal, 32, window);
    let etcd_rate = throughput(&a, fe_etcd, 32, window);
    let journal_rate_after = throughput(&journal, fe_journal, 32, window);

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "\nlbagent on etcd: 3 members, 2 agents ({moves} moves, {news} new frontends; throughput over {window:?})"
    );
    println!("| measure | through etcd | baseline | ratio | target |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
        let (r, l) = (ms(percentile(&remote, p)), ms(percentile(&local, p)));
        println!(
            "| {name} PUT on A → server moved in HAProxy B (ms) | {r:.1} | {l:.1} (in HAProxy A) | {:.1}× | {} |",
            r / l,
            if p > 0.9 { "≤ 1,000 ms" } else { "" }
        );
    }
    for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
        let (r, l) = (
            ms(percentile(&new_remote, p)),
            ms(percentile(&new_local, p)),
        );
        println!(
            "| {name} PUT of a new frontend on A → HAProxy B accepts (ms) | {r:.0} | {l:.0} (A answered, its reload done) | {:.1}× | {} |",
            r / l,
            if p > 0.9 { "≤ 5,000 ms" } else { "" }
        );
    }
    println!(
        "| durable changes/s, 32 clients | {etcd_rate:.0} | {journal_rate:.0} then {journal_rate_after:.0} (local journal) | {:.2}× | |",
        etcd_rate / ((journal_rate + journal_rate_after) / 2.0)
    );
}
