//! The local copy of the last state an agent on etcd applied: what it starts from when etcd
//! does not answer at start.

use std::path::Path;

use crate::model::DesiredState;

/// The file in the state directory where an agent on etcd keeps the last state it applied, to
/// start from when etcd does not answer at start.
pub const CACHE_FILE: &str = "etcd-cache.json";

/// Writes the last state applied (`state`) to `path`, whole and durably, as the managed file is
/// written (a temporary file, fsync'd, renamed over it).
pub async fn write_cache(path: &Path, state: &DesiredState) -> Result<(), String> {
    let text = serde_json::to_string(state).expect("a state serializes");
    crate::haproxy::write_atomic(path, &text)
        .await
        .map_err(|e| e.to_string())
}

/// The state [`write_cache`] left, if it is there and readable.
pub fn read_cache(path: &Path) -> Option<DesiredState> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(state) => Some(state),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the local copy of the last state is unreadable; not using it");
            None
        }
    }
}
