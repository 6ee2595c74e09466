//! A signed change's latency while strangers flood the agent (#10 point 4: answered in
//! ≤ 100 ms), against the same request without a flood, measured in the same run, and the
//! agent's peak RSS (VmHWM) under each flood (≤ 64 MiB). The change is a sidecar's renewal
//! (`PUT` of the same server), on a fresh connection from 127.0.0.1 each time, as `lbctl
//! phone-home` sends it. Each row runs on a fresh agent, so its peak RSS is its flood's. The floods are those of `tests/limits.rs`: 4,000 connections (16
//! loopback addresses × 250, or all from 127.0.0.1) holding unfinished 60 KB bodies, small
//! bodies, or heads, and 1,000 holding unfinished 360 KB headers.
//!
//!     cargo bench --bench flood        # about a minute
//!
//! Under `cargo test --benches` (no `--bench` argument) it runs floods of 200 connections and
//! 5 requests each, to check that it still works, and prints no table.

#[path = "../tests/common/mod.rs"]
mod common;
mod util;

use std::net::IpAddr;
use std::time::Duration;

use common::agent::Agent;
use common::flood::{
    agent_with_a_frontend, loopback_sources, proc_status_kib, signed_change, Flood, Hold,
};

/// The target for a signed change under a flood.
const TARGET: Duration = Duration::from_millis(100);

fn renew(agent: &Agent, port: u16) -> Duration {
    let (r, took) =
        signed_change(agent, IpAddr::from([127, 0, 0, 1]), port).expect("the change is answered");
    assert_eq!(r.status, 200, "{r:?}");
    took
}

/// Latencies of `n` renewals, sorted.
fn renewals(agent: &Agent, port: u16, n: usize) -> Vec<Duration> {
    let mut v: Vec<Duration> = (0..n).map(|_| renew(agent, port)).collect();
    v.sort();
    v
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let measuring = util::measuring();
    let (per_source, requests) = if measuring { (250, 50) } else { (13, 5) };
    let (agent, port) = agent_with_a_frontend();
    let many = loopback_sources(2, 16);
    let same = [IpAddr::from([127, 0, 0, 1])];
    let floods: Vec<(&str, &[IpAddr], usize, Hold)> = vec![
        (
            "unfinished 60 KB bodies, 16 addresses",
            &many,
            per_source,
            Hold::Body {
                content_length: 60_000,
                sent: 59_000,
                auth: true,
            },
        ),
        (
            "unfinished 2 KB bodies, 16 addresses",
            &many,
            per_source,
            Hold::Body {
                content_length: 2000,
                sent: 1500,
                auth: true,
            },
        ),
        (
            "unfinished 3 KB heads, 16 addresses",
            &many,
            per_source,
            Hold::Headers { bytes: 3000 },
        ),
        (
            "unfinished 3 KB heads, from the client's address",
            &same,
            per_source * 16,
            Hold::Headers { bytes: 3000 },
        ),
        (
            "unfinished 360 KB headers, 4 addresses",
            &many[..4],
            per_source,
            Hold::Headers { bytes: 360_000 },
        ),
    ];

    // Warm: the agent's first requests build its caches.
    renewals(&agent, port, 5);
    let baseline = renewals(&agent, port, requests);
    let base_peak = proc_status_kib(agent.pid(), "VmHWM");
    drop(agent);
    let mut rows = Vec::new();
    for (what, sources, per, hold) in floods {
        // A fresh agent each: memory once taken stays with the process (the allocator keeps
        // it), so a flood's peak is only its own on an agent that has seen no other.
        let (agent, port) = agent_with_a_frontend();
        renewals(&agent, port, 5);
        let flood = Flood::open(agent.addr, sources, per, hold, Duration::from_secs(20));
        let under = renewals(&agent, port, requests);
        let peak = proc_status_kib(agent.pid(), "VmHWM");
        rows.push((what, flood.connected, under, peak));
        drop(flood);
    }
    if !measuring {
        return;
    }
    let base_p50 = percentile(&baseline, 0.5);
    println!("signed change (PUT renewal, fresh connection), {requests} requests per row");
    println!(
        "{:<50} {:>6} {:>8} {:>8} {:>8} {:>7} {:>9} {:>7}",
        "flood", "conns", "p50 ms", "p99 ms", "max ms", "×p50", "peak MiB", "≤100ms"
    );
    println!(
        "{:<50} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>9.1} {:>7}",
        "none (baseline)",
        0,
        ms(base_p50),
        ms(percentile(&baseline, 0.99)),
        ms(*baseline.last().unwrap()),
        "1.00",
        base_peak as f64 / 1024.0,
        ""
    );
    for (what, conns, under, peak) in rows {
        let max = *under.last().unwrap();
        println!(
            "{:<50} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>7.2} {:>9.1} {:>7}",
            what,
            conns,
            ms(percentile(&under, 0.5)),
            ms(percentile(&under, 0.99)),
            ms(max),
            percentile(&under, 0.5).as_secs_f64() / base_p50.as_secs_f64(),
            peak as f64 / 1024.0,
            if max <= TARGET { "yes" } else { "NO" }
        );
    }
}
