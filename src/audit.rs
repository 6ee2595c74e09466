//! The audit trail: one JSON line per change request, accepted or refused, written by one
//! thread that owns the file (`--audit-log`), or to the normal log when there is no file.
//!
//! A line holds `time` (RFC 3339), `key_id` (as presented: `default` when the header is
//! absent, `legacy-token` on the old webhook's endpoint), `peer`, `method`, `path`, `status`,
//! `outcome` (`accepted` or `refused`), `reason` for a refusal (the message answered) and, for
//! an accepted change, `before` and `after`: the entry it named, `null` where absent.
//!
//! Lines go through a bounded channel: when the disk stalls, requests wait for it rather than
//! lose their lines. SIGHUP reopens the file (logrotate moves it away first).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::model::Transition;

/// Lines waiting for the writer before requests wait for it.
const QUEUE: usize = 4096;

/// Longest key id, method, path or reason written as presented; longer ones are cut (and
/// marked `…`), since they come from strangers too.
const MAX_PRESENTED: usize = 256;

/// One change request and what became of it.
#[derive(Debug, Serialize)]
pub struct AuditRecord {
    pub time: String,
    pub key_id: String,
    pub peer: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Present, with both fields, for an accepted change only.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub transition: Option<Transition>,
}

impl AuditRecord {
    /// A record stamped now; `reason` and `transition` as the answer had them. A 2xx answer is
    /// `accepted`, anything else `refused`.
    pub fn new(
        key_id: &str,
        peer: std::net::SocketAddr,
        method: &str,
        path: &str,
        status: u16,
        reason: Option<String>,
        transition: Option<Transition>,
    ) -> AuditRecord {
        let accepted = (200..300).contains(&status);
        AuditRecord {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            key_id: presented(key_id),
            peer: peer.to_string(),
            method: presented(method),
            path: presented(path),
            status,
            outcome: if accepted { "accepted" } else { "refused" },
            reason: if accepted {
                None
            } else {
                reason.as_deref().map(presented)
            },
            transition: if accepted {
                Some(transition.unwrap_or_default())
            } else {
                None
            },
        }
    }
}

/// A value from the request, cut to [`MAX_PRESENTED`] characters. (JSON escapes the rest.)
fn presented(s: &str) -> String {
    if s.chars().count() <= MAX_PRESENTED {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(MAX_PRESENTED).collect();
    cut.push('…');
    cut
}

enum Msg {
    Line(String),
    Reopen,
}

/// Where audit records go; cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    sink: Sink,
}

#[derive(Clone, Debug)]
enum Sink {
    /// The normal log (journald under systemd), target `lbagent::audit`.
    Log,
    File(mpsc::Sender<Msg>),
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Line(_) => "Line",
            Msg::Reopen => "Reopen",
        })
    }
}

/// Why the audit file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--audit-log {}: {source}", path.display())]
pub struct AuditError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl AuditLog {
    /// Records go to the normal log.
    pub fn to_log() -> AuditLog {
        AuditLog { sink: Sink::Log }
    }

    /// Opens `path` for append (created `0600`; an existing file is made `0600`) and starts the
    /// thread that writes to it. The thread ends when the last handle is dropped; join it to
    /// know every line was written.
    pub fn open(
        path: &Path,
        metrics: Metrics,
    ) -> Result<(AuditLog, std::thread::JoinHandle<()>), AuditError> {
        let file = open_append(path).map_err(|source| AuditError {
            path: path.to_path_buf(),
            source,
        })?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let path = path.to_path_buf();
        let writer = std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || write_lines(file, &path, rx, metrics))
            .map_err(|source| AuditError {
                path: PathBuf::new(),
                source,
            })?;
        Ok((
            AuditLog {
                sink: Sink::File(tx),
            },
            writer,
        ))
    }

    /// Writes one record (waits only when the writer is [`QUEUE`] lines behind).
    pub async fn record(&self, record: &AuditRecord) {
        let line = serde_json::to_string(record).unwrap_or_default();
        match &self.sink {
            Sink::Log => tracing::info!(target: "lbagent::audit", "{line}"),
            Sink::File(tx) => {
                if tx.send(Msg::Line(line)).await.is_err() {
                    tracing::error!("the audit log writer has stopped; a record was lost");
                }
            }
        }
    }

    /// Writes one record unless the writer is [`QUEUE`] lines behind; `false` when it was left
    /// out (for strangers' records, which must not hold anything up).
    pub fn try_record(&self, record: &AuditRecord) -> bool {
        let line = serde_json::to_string(record).unwrap_or_default();
        match &self.sink {
            Sink::Log => {
                tracing::info!(target: "lbagent::audit", "{line}");
                true
            }
            // Only while the queue is at most half full: the other half is key holders'.
            Sink::File(tx) => tx.capacity() > QUEUE / 2 && tx.try_send(Msg::Line(line)).is_ok(),
        }
    }

    /// Reopens the file, after the lines already recorded (for SIGHUP: logrotate). Returns at
    /// once: the signal loop must not wait behind a full queue.
    pub fn reopen(&self) {
        if let Sink::File(tx) = &self.sink {
            if let Err(mpsc::error::TrySendError::Full(msg)) = tx.try_send(Msg::Reopen) {
                // Behind a full queue: queued by a task of its own.
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(msg).await;
                });
            }
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    // Non-blocking, so a FIFO at the path is refused below instead of waiting for a reader.
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        tracing::warn!(path = %path.display(), "the audit log was open to group or others; it is 0600 now");
    }
    Ok(file)
}

/// The writer thread: the only owner of the file.
fn write_lines(mut file: File, path: &Path, mut rx: mpsc::Receiver<Msg>, metrics: Metrics) {
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Line(mut line) => {
                line.push('\n');
                // One write per line with O_APPEND: lines from a restarted agent never mix.
                if let Err(e) = file.write_all(line.as_bytes()) {
                    metrics.audit_write_failures.inc();
                    tracing::error!(path = %path.display(), error = %e, "cannot write the audit log; the record follows");
                    tracing::info!(target: "lbagent::audit", "{}", line.trim_end());
                }
            }
            Msg::Reopen => match open_append(path) {
                Ok(f) => {
                    file = f;
                    tracing::info!(path = %path.display(), "audit log reopened");
                }
                Err(e) => {
                    metrics.audit_write_failures.inc();
                    tracing::error!(path = %path.display(), error = %e, "cannot reopen the audit log; writing on to the old file");
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Entry, ServerSpec, ServerState};

    fn spec() -> ServerSpec {
        ServerSpec {
            node_ip: "203.0.113.7".parse().unwrap(),
            node_port: 30443,
            state: ServerState::Ready,
            service: None,
            weight: None,
            lease: true,
        }
    }

    fn peer() -> std::net::SocketAddr {
        "192.0.2.9:50123".parse().unwrap()
    }

    #[test]
    fn accepted_records_carry_before_and_after_refused_ones_the_reason() {
        let t = Transition {
            before: None,
            after: Some(Entry::Server(spec())),
        };
        let r = AuditRecord::new(
            "mqtt",
            peer(),
            "PUT",
            "/v1/frontends/8883/servers/n1",
            200,
            None,
            Some(t),
        );
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["outcome"], "accepted");
        assert_eq!(v["before"], serde_json::Value::Null);
        assert!(v.as_object().unwrap().contains_key("before"));
        assert_eq!(v["after"]["node_ip"], "203.0.113.7");
        assert_eq!(v["peer"], "192.0.2.9:50123");
        assert!(v.get("reason").is_none());
        humantime::parse_rfc3339(v["time"].as_str().unwrap()).unwrap();

        let r = AuditRecord::new(
            "nope",
            peer(),
            "DELETE",
            "/v1/frontends/443",
            401,
            Some("header X-Lbagent-Key: unknown key id \"nope\"".into()),
            None,
        );
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(
            (v["outcome"].as_str(), v["status"].as_u64()),
            (Some("refused"), Some(401))
        );
        assert!(v["reason"].as_str().unwrap().contains("unknown key"));
        assert!(v.get("before").is_none() && v.get("after").is_none());
    }

    #[test]
    fn a_fifo_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Would block in open(2) without O_NONBLOCK: the test would hang, not fail.
        let e = AuditLog::open(&path, Metrics::new()).unwrap_err();
        assert!(e.to_string().contains("audit.log"), "{e}");
    }

    #[test]
    fn a_strangers_long_reason_is_cut() {
        let r = AuditRecord::new(
            "k",
            peer(),
            "PUT",
            "/x",
            405,
            Some("m".repeat(100_000)),
            None,
        );
        assert_eq!(r.reason.unwrap().chars().count(), MAX_PRESENTED + 1);
    }

    #[test]
    fn presented_values_are_cut() {
        let long = "k".repeat(10_000);
        let cut = presented(&long);
        assert_eq!(cut.chars().count(), MAX_PRESENTED + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(presented("ci.2"), "ci.2");
    }

    #[tokio::test]
    async fn the_file_is_0600_appended_and_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "earlier\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (log, writer) = AuditLog::open(&path, Metrics::new()).unwrap();
        let rec = |status| AuditRecord::new("a", peer(), "PUT", "/x", status, None, None);
        log.record(&rec(200)).await;
        // logrotate: move the file away, then SIGHUP.
        let rotated = dir.path().join("audit.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.record(&rec(201)).await;
        log.reopen();
        log.record(&rec(403)).await;
        drop(log);
        writer.join().unwrap();
        let old = std::fs::read_to_string(&rotated).unwrap();
        let lines: Vec<&str> = old.lines().collect();
        assert_eq!(lines.len(), 3, "{old}");
        assert_eq!(lines[0], "earlier");
        assert!(lines[1].contains("\"status\":200") && lines[2].contains("\"status\":201"));
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(new.lines().count(), 1);
        assert!(new.contains("\"status\":403"));
        let mode = std::fs::metadata(&rotated).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_directory_is_refused_with_the_flag_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = AuditLog::open(dir.path(), Metrics::new()).unwrap_err();
        assert!(e.to_string().starts_with("--audit-log "), "{e}");
    }
}
