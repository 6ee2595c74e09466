//! `lbctl health` against a real agent and HAProxy: exit 0 and `healthy: generation N` while
//! both are fine, 1 once the agent's `/healthz` says HAProxy is down (attached mode, the
//! harness stops HAProxy) and 0 again when it is back, 3 within `--timeout` when nothing
//! answers (a closed port, a listener that never answers); `--quiet` prints nothing, and a list
//! of URLs is refused with exit 2.

mod common;

use std::net::TcpListener;
use std::process::Output;
use std::time::{Duration, Instant};

use common::agent::{eventually, lbctl_health, Agent};
use common::free_port;

fn health(url: &str, extra: &[&str]) -> Output {
    lbctl_health(url, extra)
}

fn said(out: &Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn health_follows_the_agents_haproxy() {
    let mut agent = Agent::attached();
    let url = format!("http://{}", agent.addr);
    let generation = agent.get("/healthz").json()["generation"].as_u64().unwrap();

    let out = health(&url, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("healthy: generation {generation}\n")
    );
    let quiet = health(&url, &["--quiet"]);
    assert_eq!(quiet.status.code(), Some(0), "{}", said(&quiet));
    assert!(
        quiet.stdout.is_empty() && quiet.stderr.is_empty(),
        "{}",
        said(&quiet)
    );

    agent.stop_attached_haproxy();
    let out = eventually(Duration::from_secs(20), "lbctl health to exit 1", || {
        let out = health(&url, &[]);
        match out.status.code() {
            Some(1) => Ok(out),
            _ => Err(said(&out)),
        }
    });
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.starts_with("unhealthy: haproxy down"),
        "{}",
        said(&out)
    );
    assert_eq!(line.lines().count(), 1, "{}", said(&out));
    // The agent's own verdict agrees.
    let r = agent.get("/healthz");
    assert_eq!(
        (r.status, r.json()["haproxy"].as_str()),
        (503, Some("down"))
    );
    let quiet = health(&url, &["-q"]);
    assert_eq!(quiet.status.code(), Some(1), "{}", said(&quiet));
    assert!(
        quiet.stdout.is_empty() && quiet.stderr.is_empty(),
        "{}",
        said(&quiet)
    );

    agent.start_attached_haproxy();
    eventually(
        Duration::from_secs(20),
        "lbctl health to exit 0 again",
        || {
            let out = health(&url, &[]);
            match out.status.code() {
                Some(0) => Ok(()),
                _ => Err(said(&out)),
            }
        },
    );
}

#[test]
fn no_answer_exits_3_within_the_timeout() {
    // Nothing listens: refused at once.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let out = health(&closed, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", said(&out));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.starts_with(&format!("no answer from {closed}: "))
            && line.to_lowercase().contains("connection refused"),
        "{}",
        said(&out)
    );
    let quiet = health(&closed, &["--quiet"]);
    assert_eq!(quiet.status.code(), Some(3), "{}", said(&quiet));
    assert!(
        quiet.stdout.is_empty() && quiet.stderr.is_empty(),
        "{}",
        said(&quiet)
    );

    // A listener that never answers (the kernel accepts, nobody reads): the deadline.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let started = Instant::now();
    let out = health(&url, &["--timeout", "300ms"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(3), "{}", said(&out));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("no answer from {url}: no answer within 300ms\n")
    );
    drop(silent);

    // The local agent only: a list is a usage error, said even with --quiet.
    let list = health(&format!("{closed},{url}"), &["--quiet"]);
    assert_eq!(list.status.code(), Some(2), "{}", said(&list));
    assert!(
        String::from_utf8_lossy(&list.stderr).contains("is a list"),
        "{}",
        said(&list)
    );
}
