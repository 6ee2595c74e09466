//! The wall clock as the protocol uses it: whole Unix seconds (request timestamps, the agent's
//! start time). One home, so a clock set before 1970 means the same (0) everywhere.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 if the system clock is set before it.
pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
