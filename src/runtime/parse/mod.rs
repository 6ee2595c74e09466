//! nom parsers for the runtime API's answers. No I/O here: each parser takes a complete answer
//! (as [`crate::runtime::Connection`] frames it) and returns typed data or a [`ParseError`]
//! naming the line it could not read. None of them panics on any input.
//!
//! Tabular answers (`show stat`, `show servers state`) are read through their `# ` header line,
//! never by position, because columns differ between HAProxy versions.

mod backend;
mod frame;
mod info;
mod proc;
mod servers_state;
mod stat;
mod status;

pub use backend::parse_show_backend;
pub use frame::{parse_frame, parse_frame_from, resume_point, Frame};
pub use info::{parse_show_info, version_branch, Info};
pub use proc::{parse_show_proc, ProcEntry, ProcList};
pub use servers_state::{parse_servers_state, AdminFlags, OperState, ServerState};
pub use stat::{parse_show_stat, ProxyKind, StatRow};
pub use status::{parse_status, Status, StatusCause, StatusState};

use std::fmt;

/// Why an answer could not be read: what was expected, and on which line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number in the answer, 0 when the answer as a whole is wrong.
    pub line: usize,
    pub detail: String,
}

impl ParseError {
    pub(crate) fn new(line: usize, detail: impl Into<String>) -> ParseError {
        ParseError {
            line,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.detail)
        } else {
            write!(f, "line {}: {}", self.line, self.detail)
        }
    }
}

impl std::error::Error for ParseError {}

/// The lines of an answer, without the trailing empty line(s) that end every answer.
pub(crate) fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let trimmed = text.trim_end_matches(['\n', '\r']);
    trimmed
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(move |_| !trimmed.is_empty())
}

/// `-` and the empty string mean "no value" in HAProxy's tables.
pub(crate) fn opt_str(v: &str) -> Option<String> {
    if v.is_empty() || v == "-" {
        None
    } else {
        Some(v.to_string())
    }
}

/// A number, or `None` when empty, `-`, or not a number of this type.
pub(crate) fn opt_num<T: std::str::FromStr>(v: &str) -> Option<T> {
    if v.is_empty() || v == "-" {
        None
    } else {
        v.parse().ok()
    }
}
