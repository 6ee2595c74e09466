//! The one error type of the runtime layer: every failure says which socket, which command, and
//! keeps HAProxy's own words.

use std::io;
use std::time::Duration;

use super::outcome::Outcome;

/// Where the runtime API lives, as written in errors.
pub type EndpointName = String;

/// Every way talking to HAProxy's runtime API can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing exists at the socket path.
    #[error("no HAProxy socket at {endpoint}: the path does not exist (is HAProxy running, and is `stats socket` set to this path?)")]
    SocketNotFound { endpoint: EndpointName },

    /// The socket exists but this user may not open it.
    #[error("permission denied opening {endpoint}: run as a user that may open it (often root or the haproxy group)")]
    PermissionDenied { endpoint: EndpointName },

    /// Something is at the address, but it is not a HAProxy runtime API.
    #[error("{endpoint} is not a HAProxy runtime socket: {detail}")]
    NotHaproxy {
        endpoint: EndpointName,
        detail: String,
    },

    /// Connecting failed for another reason (refused, unreachable...).
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: EndpointName,
        #[source]
        source: io::Error,
    },

    /// HAProxy did not answer in time.
    #[error("{endpoint} did not answer {what} within {after:?}")]
    Timeout {
        endpoint: EndpointName,
        what: String,
        after: Duration,
    },

    /// The connection broke while a command was in flight.
    #[error("connection to {endpoint} failed during {what}: {source}")]
    Io {
        endpoint: EndpointName,
        what: String,
        #[source]
        source: io::Error,
    },

    /// HAProxy closed the connection before answering.
    #[error("{endpoint} closed the connection during {what} (received so far: {received:?})")]
    Closed {
        endpoint: EndpointName,
        what: String,
        received: String,
    },

    /// A value meant for a command was refused before anything was sent.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidArgument {
        field: &'static str,
        value: String,
        reason: &'static str,
    },

    /// HAProxy answered, and the answer says the command failed.
    #[error("HAProxy refused `{command}` ({kind}): {text}", kind = outcome.kind, text = outcome.text.trim_end())]
    Command { command: String, outcome: Outcome },

    /// The master refused `reload` because the worker of an earlier reload is still starting
    /// (3.1+: `Success=0` then `Another reload is still in progress.`). Nothing was reloaded;
    /// sending it again once that worker is up is safe.
    #[error("{endpoint} refused `reload`: another reload is still in progress")]
    ReloadInProgress { endpoint: EndpointName },

    /// HAProxy answered something the parser does not understand.
    #[error("cannot parse the answer to `{command}`: {detail} (answer starts with {excerpt:?})")]
    Parse {
        command: String,
        detail: String,
        excerpt: String,
    },
}

impl Error {
    /// Builds a [`Error::Parse`] keeping the first bytes of the raw answer.
    pub fn parse(command: &str, detail: impl Into<String>, raw: &str) -> Self {
        Error::Parse {
            command: command.to_string(),
            detail: detail.into(),
            excerpt: excerpt(raw, 200),
        }
    }
}

/// At most `max` bytes of `raw`, cut on a character boundary.
pub(crate) fn excerpt(raw: &str, max: usize) -> String {
    if raw.len() <= max {
        return raw.to_string();
    }
    let mut end = max;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &raw[..end])
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
