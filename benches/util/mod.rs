//! Helpers shared by the bench binaries.

/// Whether this run measures: `cargo bench` passes `--bench`; `cargo test --benches` does not,
/// and `--test`, `--list` or `--profile-time` run no measurement either.
pub fn measuring() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench")
        && !args
            .iter()
            .any(|a| matches!(a.as_str(), "--test" | "--list") || a.starts_with("--profile-time"))
}
