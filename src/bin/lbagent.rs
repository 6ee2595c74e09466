//! `lbagent`: the daemon. The HTTP API, desired-state store and reconciler arrive with the agent
//! issue; until then this binary says so instead of pretending to run.

fn main() -> std::process::ExitCode {
    eprintln!(
        "lbagent {}: the daemon is not built yet; use `lbctl show` to read a HAProxy runtime socket",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
