//! What a command's answer means. HAProxy answers in free text, so the meaning is read from the
//! text — by phrases taken from HAProxy's own source and proven on recorded answers in
//! `proto-fixtures/` — and the text itself is always kept.

use std::fmt;

use serde::Serialize;

/// The class of a command's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeKind {
    /// Done (an empty answer, or a confirmation such as `New server registered.`).
    Success,
    /// The backend, frontend or server does not exist.
    NotFound,
    /// The object to create is already there.
    AlreadyExists,
    /// An argument was refused (`Invalid addr ...`, a weight out of range...).
    InvalidArgument,
    /// HAProxy understood, but the object's state forbids it (deleting a server that is not in
    /// maintenance or still has connections, enabling a check that is not configured, a static
    /// balancing algorithm refusing a weight or a dynamic server).
    Refused,
    /// The socket's level (`user`, `operator`) does not allow the command.
    PermissionDenied,
    /// HAProxy does not know the command (older version, or a typo).
    UnknownCommand,
    /// Any other answer: kept verbatim, treated as a failure.
    Other,
}

impl OutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Success => "success",
            OutcomeKind::NotFound => "not-found",
            OutcomeKind::AlreadyExists => "already-exists",
            OutcomeKind::InvalidArgument => "invalid-argument",
            OutcomeKind::Refused => "refused",
            OutcomeKind::PermissionDenied => "permission-denied",
            OutcomeKind::UnknownCommand => "unknown-command",
            OutcomeKind::Other => "other",
        }
    }
}

impl fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command's answer: its class and HAProxy's exact words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub kind: OutcomeKind,
    pub text: String,
}

impl Outcome {
    /// Classifies the answer to a command that prints nothing or a message on success.
    pub fn of_action(text: &str) -> Outcome {
        Outcome {
            kind: classify_action(text),
            text: text.to_string(),
        }
    }

    /// Classifies the answer to a command that prints data on success (`show ...`) by its
    /// shape: an answer that starts with `header`, the first bytes every successful answer to
    /// that command has (see [`super::Command::answer_header`]), is data, whatever names its
    /// rows hold — an operator's backend called `invalid_host` or `Unknown` is a row, not an
    /// error. Anything else is an error: classified by HAProxy's known sentence on its first
    /// line, or [`OutcomeKind::Other`].
    pub fn of_query(header: &str, text: &str) -> Outcome {
        let kind = if text.starts_with(header) {
            OutcomeKind::Success
        } else {
            let first = text.lines().map(str::trim_start).find(|l| !l.is_empty());
            first.and_then(classify_error).unwrap_or(OutcomeKind::Other)
        };
        Outcome {
            kind,
            text: text.to_string(),
        }
    }

    pub fn is_success(&self) -> bool {
        self.kind == OutcomeKind::Success
    }

    /// Whether `del server` was refused only because the server still carries traffic: its
    /// connections or queued streams. Such a server is drained, and deleted once idle.
    pub fn is_server_in_use(&self) -> bool {
        self.kind == OutcomeKind::Refused
            && IN_USE_SENTENCES
                .iter()
                .any(|s| self.text.trim_start().starts_with(s))
    }
}

/// `del server`'s whole sentences for a server that still carries traffic (2.6 to 3.2).
const IN_USE_SENTENCES: &[&str] = &[
    "Server still has connections attached to it, cannot remove it.",
    "Server still has queued streams attached to it, cannot remove it.",
];

/// Phrases HAProxy prints when an action worked. Matched at the start of the answer.
const SUCCESS_PREFIXES: &[&str] = &[
    "New server registered.",
    "Server deleted.",
    "IP changed from",
    "no need to change the addr",
    "port changed from",
    // 3.0+ for an unchanged address and port.
    "nothing changed",
    // `enable|disable frontend` on a frontend already in that state: the wanted state holds.
    "All sockets are already",
];

/// Error phrases by class, first match wins. Each is matched at the start of a line of the answer
/// (`contains` would let a server name that happens to hold a phrase change the meaning).
const ERROR_PHRASES: &[(&str, OutcomeKind)] = &[
    ("Permission denied", OutcomeKind::PermissionDenied),
    ("Unknown command", OutcomeKind::UnknownCommand),
    ("No such server", OutcomeKind::NotFound),
    ("No such backend", OutcomeKind::NotFound),
    ("No such frontend", OutcomeKind::NotFound),
    ("No such proxy", OutcomeKind::NotFound),
    ("No such table", OutcomeKind::NotFound),
    ("Can't find backend", OutcomeKind::NotFound),
    ("Can't find frontend", OutcomeKind::NotFound),
    ("Can't find server", OutcomeKind::NotFound),
    ("Can't find the backend", OutcomeKind::NotFound),
    ("Unknown frontend", OutcomeKind::NotFound),
    ("Unknown backend", OutcomeKind::NotFound),
    ("Already exists", OutcomeKind::AlreadyExists),
    (
        "Only servers in maintenance mode can be deleted",
        OutcomeKind::Refused,
    ),
    ("Server still has connections", OutcomeKind::Refused),
    ("Server still has queued streams", OutcomeKind::Refused),
    ("This server cannot be removed", OutcomeKind::Refused),
    ("agent checks are not enabled", OutcomeKind::Refused),
    ("cannot change health", OutcomeKind::Refused),
    ("Cannot remove", OutcomeKind::Refused),
    ("Health check was not configured", OutcomeKind::Refused),
    ("Agent was not configured", OutcomeKind::Refused),
    ("Backend must use a dynamic", OutcomeKind::Refused),
    (
        "Backend is using a static LB algorithm",
        OutcomeKind::Refused,
    ),
    ("Frontend is already", OutcomeKind::Refused),
    ("Frontend was already", OutcomeKind::Refused),
    ("Frontend was previously shut down", OutcomeKind::Refused),
    ("Failed to", OutcomeKind::Refused),
    ("Invalid", OutcomeKind::InvalidArgument),
    ("invalid", OutcomeKind::InvalidArgument),
    ("Require", OutcomeKind::InvalidArgument),
    ("Absolute weight", OutcomeKind::InvalidArgument),
    ("Relative weight", OutcomeKind::InvalidArgument),
    ("Integer value", OutcomeKind::InvalidArgument),
    ("Value out of range", OutcomeKind::InvalidArgument),
    ("'set server <srv>", OutcomeKind::InvalidArgument),
    ("set server <b>/<s>", OutcomeKind::InvalidArgument),
    ("usage:", OutcomeKind::InvalidArgument),
    ("Empty weight string", OutcomeKind::InvalidArgument),
    ("'set maxconn frontend'", OutcomeKind::InvalidArgument),
    ("'add server'", OutcomeKind::InvalidArgument),
    ("'server'", OutcomeKind::InvalidArgument),
    ("unknown keyword", OutcomeKind::InvalidArgument),
    ("could not", OutcomeKind::InvalidArgument),
];

fn classify_error(text: &str) -> Option<OutcomeKind> {
    for line in text.lines().map(str::trim_start).filter(|l| !l.is_empty()) {
        for (phrase, kind) in ERROR_PHRASES {
            if line.starts_with(phrase) {
                return Some(*kind);
            }
        }
    }
    None
}

/// Failures `set server addr` reports in the middle of an otherwise successful-looking
/// sentence (`no need to change the addr, problem converting port 'abc' to an int`). Each holds
/// a space, which no validated name can, so a name cannot forge one.
const EMBEDDED_ERRORS: &[&str] = &[
    "problem converting",
    "Invalid addr",
    "invalid addr",
    "can't ",
    "Can't ",
];

fn classify_action(text: &str) -> OutcomeKind {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return OutcomeKind::Success;
    }
    if let Some(kind) = classify_error(trimmed) {
        return kind;
    }
    if EMBEDDED_ERRORS.iter().any(|e| trimmed.contains(e)) {
        return OutcomeKind::InvalidArgument;
    }
    if SUCCESS_PREFIXES.iter().any(|p| trimmed.starts_with(p)) {
        return OutcomeKind::Success;
    }
    OutcomeKind::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_in_use_is_told_by_the_whole_sentence() {
        let busy =
            Outcome::of_action("Server still has connections attached to it, cannot remove it.\n");
        assert!(busy.is_server_in_use());
        assert!(Outcome::of_action(
            "Server still has queued streams attached to it, cannot remove it.\n"
        )
        .is_server_in_use());
        let not_maint = Outcome::of_action("Only servers in maintenance mode can be deleted.\n");
        assert_eq!(not_maint.kind, OutcomeKind::Refused);
        assert!(!not_maint.is_server_in_use());
        assert!(!Outcome::of_action("Server deleted.\n").is_server_in_use());
    }

    #[test]
    fn classifies_known_texts() {
        let cases = [
            ("\n", OutcomeKind::Success),
            ("New server registered.\n", OutcomeKind::Success),
            ("IP changed from '127.0.0.1' to '1.2.3.4', port changed from '1' to '2' by 'stats socket command'\n", OutcomeKind::Success),
            ("no need to change the addr, no need to change the port by 'stats socket command'\n", OutcomeKind::Success),
            ("No such server.\n", OutcomeKind::NotFound),
            ("Already exists a server with the same name in backend.\n", OutcomeKind::AlreadyExists),
            ("Only servers in maintenance mode can be deleted.", OutcomeKind::Refused),
            ("Invalid addr 'bad' by 'stats socket command'\n", OutcomeKind::InvalidArgument),
            ("Absolute weight can only be between 0 and 256 inclusive.\n", OutcomeKind::InvalidArgument),
            ("Permission denied\n", OutcomeKind::PermissionDenied),
            ("Unknown command, but maybe one of the following ones is a better match:\n  add acl\n", OutcomeKind::UnknownCommand),
            ("no need to change the addr, problem converting port 'abc' to an int by 'stats socket command'\n", OutcomeKind::InvalidArgument),
            ("Something new.\n", OutcomeKind::Other),
        ];
        for (text, kind) in cases {
            let o = Outcome::of_action(text);
            assert_eq!(o.kind, kind, "{text:?}");
            assert_eq!(o.text, text);
        }
    }

    #[test]
    fn queries_are_told_by_their_shape() {
        let backends = "# name\n";
        assert!(Outcome::of_query(backends, "# name\nbe_1\n").is_success());
        // Names that start like HAProxy's error sentences are rows of a data answer.
        for name in [
            "invalid_host",
            "Unknown",
            "usage",
            "Require",
            "No",
            "Permission",
        ] {
            let text = format!("# name\n{name}\nbe_1\n\n");
            assert!(Outcome::of_query(backends, &text).is_success(), "{name}");
        }
        assert_eq!(
            Outcome::of_query("1\n# be_id", "Can't find backend.\n").kind,
            OutcomeKind::NotFound
        );
        assert_eq!(
            Outcome::of_query(backends, "Permission denied\n").kind,
            OutcomeKind::PermissionDenied
        );
        // Neither the shape nor a known error: a failure, text kept.
        let odd = Outcome::of_query(backends, "something else\n");
        assert_eq!(odd.kind, OutcomeKind::Other);
        assert_eq!(odd.text, "something else\n");
    }
}
