//! HAProxy's files and process: the managed config file (validated before it replaces the old
//! one, written atomically, kept for rollback), reloads confirmed through the master CLI, and
//! optionally the HAProxy process itself.
//!
//! The agent changes HAProxy live through the runtime API ([`crate::runtime`]); this module is
//! for the rarer moments that need more: a new or removed frontend port (HAProxy cannot add a
//! listener at runtime, so the managed file is rewritten and HAProxy reloaded), and starting or
//! restarting HAProxy when the agent runs it itself ([`ManagedHaproxy`]).
//!
//! A change goes: [`ConfigFiles::install`] (validate with `haproxy -c`, then rename into place;
//! keep the previous text), [`Reloader::reload_handing_over`] (save the servers' state for the
//! new worker, reload, confirm a new worker took over), and on a failed reload
//! [`ConfigFiles::restore`] with the previous text, so the file on disk again matches the
//! worker that is still serving.
//!
//! # Layout
//!
//! - `binds`: which TCP ports HAProxy's own config and command line listen on (pure parsing),
//!   so the agent can refuse a port it does not own.
//! - `files`: the config files, `haproxy -c` and the atomic install with rollback.
//! - `master`: reloads through the master CLI or a command, confirmed per version, and
//!   waiting for a frontend to open.
//! - `server_state`: the servers' state handed from the old worker to the new across a reload.
//! - `process`: the HAProxy that managed mode runs itself, and its main config.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::runtime;

pub mod binds;
mod files;
mod master;
mod process;
mod server_state;

pub(crate) use files::write_atomic;
pub use files::ConfigFiles;
pub use master::{wait_frontend_open, ReloadReport, Reloader};
pub use process::{MainOptions, ManagedHaproxy, DEFAULT_HARD_STOP_AFTER};
pub use server_state::ServerStateFile;

/// The haproxy binary when none is named: `haproxy` on `PATH`, else Debian's `/usr/sbin/haproxy`
/// (root's `PATH` has `/usr/sbin`, a user's often does not).
pub fn default_binary() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"))
}

/// Everything that can go wrong with HAProxy's files and process, saying which file or command
/// and keeping HAProxy's own words.
#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    /// Reading, writing, renaming or syncing a file failed.
    #[error("cannot {action} {}: {source}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A program could not be started at all.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },

    /// `haproxy -c` refused the config; `message` is HAProxy's text.
    #[error("HAProxy refuses the config {files}:\n{message}")]
    InvalidConfig { files: String, message: String },

    /// A command ran and failed; `stderr` is what it printed.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },

    /// Something did not finish within its deadline.
    #[error("{what}: no result within {after:?}{}", detail_suffix(last))]
    Timeout {
        what: String,
        after: Duration,
        /// The last thing seen before giving up (an error, a status), when there was one.
        last: Option<String>,
    },

    /// The runtime API failed in a way retrying does not fix.
    #[error("{what}: {source}")]
    Runtime {
        what: String,
        #[source]
        source: runtime::Error,
    },

    /// HAProxy tried to load the new config and gave up; the previous worker still serves.
    #[error("HAProxy reload failed: {message}")]
    ReloadFailed { message: String },

    /// The master counted a reload but no new worker showed up: whether HAProxy runs the new
    /// config or the old one is not known.
    #[error("HAProxy reload not confirmed: {message}")]
    ReloadUnconfirmed { message: String },

    /// The HAProxy process ended while it was expected to run.
    #[error("HAProxy exited ({status}) {when}; its log:\n{log}")]
    Exited {
        status: String,
        when: &'static str,
        log: String,
    },

    /// A path that cannot be written into HAProxy's config or command line as it is.
    #[error("unusable path {}: {reason}", path.display())]
    BadPath { path: PathBuf, reason: &'static str },
}

fn detail_suffix(last: &Option<String>) -> String {
    match last {
        Some(l) => format!(" (last: {l})"),
        None => String::new(),
    }
}

pub(crate) type Result<T, E = HaproxyError> = std::result::Result<T, E>;

pub(crate) fn file_error(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> HaproxyError {
    let path = path.to_path_buf();
    move |source| HaproxyError::File {
        action,
        path,
        source,
    }
}
