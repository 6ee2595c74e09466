//! Helpers shared by the bench binaries.

// Each bench uses its own subset.
#![allow(dead_code)]

use std::path::Path;
use std::time::SystemTime;

/// Whether this run measures: `cargo bench` passes `--bench`; `cargo test --benches` does not,
/// and `--test`, `--list` or `--profile-time` run no measurement either.
pub fn measuring() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench")
        && !args
            .iter()
            .any(|a| matches!(a.as_str(), "--test" | "--list") || a.starts_with("--profile-time"))
}

/// Criterion's mean estimate for a benchmark, in nanoseconds, from the results it saved during
/// this run (`None` for a benchmark skipped by a filter, or in `--test` mode).
pub fn mean_ns(group: &str, id: &str, since: SystemTime) -> Option<f64> {
    let dir = std::env::var_os("CRITERION_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
            target.join("criterion")
        });
    let path = dir.join(group).join(id).join("new/estimates.json");
    if std::fs::metadata(&path).ok()?.modified().ok()? < since {
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}
