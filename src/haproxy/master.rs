//! Reloads: through the master CLI (`reload`, confirmed through `show proc`, as each version
//! needs) or an operator's command, and waiting for a frontend to open afterwards.
//!
//! # The master's `reload`, by version
//!
//! **2.6** answers nothing: the master re-executes itself at once, closing every CLI
//! connection. For a moment its socket refuses connections, and a connection opened just
//! before the re-exec may never be answered. Whether the reload worked shows only in
//! `show proc` afterwards:
//!
//! - success: the master's reload count went up, a worker pid that was not there before is
//!   listed under `# workers` (the old one moves to `# old workers` until its connections end),
//!   and `[failed: N]` is back to 0 (it counts failures since the last success);
//! - failure (say, a port already in use): the reload count and `[failed: N]` both went up, and
//!   the same worker is still listed under `# workers`, serving the previous config. HAProxy
//!   writes why (`[ALERT] ... cannot bind socket ...`) on its stderr only.
//!
//! **2.7+** answer `Success=1|0`, `--` and the new worker's startup log, once that worker is
//! up or has failed, then close. The call waits for that report for the whole deadline (a big
//! config loads slowly), `Success=0` is a failure with HAProxy's text, and no report at all
//! means the reload was not taken: a worker that is still starting is already listed in
//! `show proc`, so it must never confirm a reload by itself.
//!
//! **3.1+** (the reworked master-worker start; seen on 3.2) refuse a `reload` while an earlier
//! reload's worker is still starting (`Another reload is still in progress.`, the connection
//! left open at the prompt): sent again once that worker is up. A failed reload leaves the
//! serving worker under `# old workers`, with `# workers` empty until a reload works, and
//! `[failed: N]` cannot be trusted to count up.

use std::io;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::process::Command;

use super::{HaproxyError, Result, ServerStateFile};
use crate::model::DesiredState;
use crate::runtime::parse::{ProcList, ProxyKind, StatusState};
use crate::runtime::{self, ClientOptions, Endpoint, RuntimeClient};

/// Deadline of one `show proc` while polling around a reload: short, because a connection the
/// old master accepted just before re-executing is never answered, and a fresh one will be.
pub(super) const POLL_CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// Pause between polls. Polls are bounded by the caller's deadline, not by a count.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The longest a 2.6 `reload` call is given: the master closes the connection at once. 2.7+
/// answer only once the new worker is up (or has failed), which takes as long as the config
/// takes to load, so there the call gets the caller's whole deadline.
const RELOAD_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a reload count that went up without a new worker and without a failure count may
/// stay so before it counts as a failure (no 2.6 reload looks like this; it guards later
/// versions and races with someone else's reload).
const NO_WORKER_GRACE: Duration = Duration::from_secs(1);

/// Most bytes of HAProxy's log quoted in an error.
const LOG_EXCERPT: usize = 4096;

/// How HAProxy is told to reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reloader {
    /// The master CLI (`haproxy -W -S <socket>`): `reload`, confirmed through `show proc`.
    Master(Endpoint),
    /// A shell command, e.g. `systemctl reload haproxy`; its exit status is the only
    /// confirmation.
    Command(String),
}

/// What a reload through the master changed. Empty for [`Reloader::Command`], which cannot see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Workers that appeared with the reload: they serve the new config.
    pub new_worker_pids: Vec<u32>,
    /// Workers before the reload: they finish their connections and exit.
    pub old_worker_pids: Vec<u32>,
}

impl Reloader {
    /// Reloads HAProxy and confirms it within `deadline`. See [`Self::reload_with_log`] to get
    /// HAProxy's own reason into a failure.
    pub async fn reload(&self, deadline: Duration) -> Result<ReloadReport> {
        self.reload_with_log(deadline, None).await
    }

    /// Like [`Self::reload`]; `log` is the file HAProxy's stderr goes to, when the caller
    /// captures it. HAProxy 2.6 explains a failed reload only there, so a failure quotes the
    /// `[ALERT]` lines written to it since the reload began.
    pub async fn reload_with_log(
        &self,
        deadline: Duration,
        log: Option<&Path>,
    ) -> Result<ReloadReport> {
        match self {
            Reloader::Master(endpoint) => reload_master(endpoint, deadline, log).await,
            Reloader::Command(cmd) => {
                run_reload_command(cmd, deadline).await?;
                Ok(ReloadReport::default())
            }
        }
    }

    /// [`Self::reload_with_log`], every reload's way: with a `state_file`, the servers' state
    /// is handed over to the new worker, saved from the serving one first (adjusted to
    /// `desired`, the state the config being loaded was rendered from) and cleared once the
    /// master has dealt with the reload. A failure to save is logged and reloads all the same.
    ///
    /// A [`Reloader::Command`] gives no sign of when HAProxy reads the file (`systemctl
    /// reload` returns once the signal is sent), so after one the file stays until the agent
    /// sees the new worker (its next look at HAProxy clears it), or the agent's next start.
    pub async fn reload_handing_over(
        &self,
        deadline: Duration,
        log: Option<&Path>,
        state_file: Option<&ServerStateFile>,
        desired: &DesiredState,
    ) -> Result<ReloadReport> {
        if let Some(f) = state_file {
            f.save(desired).await;
        }
        let reloaded = self.reload_with_log(deadline, log).await;
        if let (Some(f), Reloader::Master(_)) = (state_file, self) {
            f.clear().await;
        }
        reloaded
    }
}

async fn run_reload_command(cmd: &str, deadline: Duration) -> Result<()> {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd).stdin(Stdio::null()).kill_on_drop(true);
    let out = match tokio::time::timeout(deadline, c.output()).await {
        Ok(r) => r.map_err(|source| HaproxyError::Spawn {
            command: format!("sh -c {cmd:?}"),
            source,
        })?,
        Err(_) => {
            return Err(HaproxyError::Timeout {
                what: format!("reload command `{cmd}`"),
                after: deadline,
                last: None,
            })
        }
    };
    if out.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    Err(HaproxyError::CommandFailed {
        command: cmd.to_string(),
        status: out.status.to_string(),
        stderr,
    })
}

/// One `show proc` on a fresh connection with a short deadline.
pub(super) async fn show_proc_once(
    endpoint: &Endpoint,
    timeout: Duration,
) -> runtime::Result<ProcList> {
    let mut c = RuntimeClient::new(
        endpoint.clone(),
        ClientOptions {
            timeout,
            ..ClientOptions::default()
        },
    );
    c.show_proc().await
}

/// Time left until `end`, at most `cap`, at least 1 ms (a zero timeout fails at once).
pub(super) fn left(end: Instant, cap: Duration) -> Duration {
    end.saturating_duration_since(Instant::now())
        .min(cap)
        .max(Duration::from_millis(1))
}

/// `show proc` until it answers or `end` passes.
async fn show_proc_until(endpoint: &Endpoint, end: Instant, what: &str) -> Result<ProcList> {
    let started = Instant::now();
    loop {
        let last = match show_proc_once(endpoint, left(end, POLL_CALL_TIMEOUT)).await {
            Ok(p) => return Ok(p),
            // Permission does not get better by waiting.
            Err(e @ runtime::Error::PermissionDenied { .. }) => {
                return Err(HaproxyError::Runtime {
                    what: what.to_string(),
                    source: e,
                })
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= end {
            return Err(HaproxyError::Timeout {
                what: what.to_string(),
                after: started.elapsed(),
                last: Some(last),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

pub(super) async fn file_len(path: &Path) -> u64 {
    tokio::fs::metadata(path)
        .await
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The `[ALERT]` lines HAProxy wrote to `log` after byte `from` (all new lines if there is no
/// alert), at most [`LOG_EXCERPT`] bytes; `None` when nothing new is readable.
pub(super) async fn log_since(log: &Path, from: u64) -> Option<String> {
    let mut f = tokio::fs::File::open(log).await.ok()?;
    let len = f.metadata().await.ok()?.len();
    // A log rotated or truncated since: read it from the start.
    let from = if from > len { 0 } else { from };
    // Only the last part matters and the log may be big: bound what is read.
    let start = from.max(len.saturating_sub(16 * LOG_EXCERPT as u64));
    f.seek(io::SeekFrom::Start(start)).await.ok()?;
    let mut buf = Vec::new();
    f.take(len - start).read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let alerts: Vec<&str> = text.lines().filter(|l| l.contains("[ALERT]")).collect();
    let chosen = if alerts.is_empty() {
        text.trim().to_string()
    } else {
        alerts.join("\n")
    };
    if chosen.is_empty() {
        return None;
    }
    Some(tail(&chosen, LOG_EXCERPT))
}

/// The last `max` bytes of `s`, cut on a character boundary.
pub(super) fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

fn pids(list: &[runtime::parse::ProcEntry]) -> Vec<u32> {
    list.iter().map(|e| e.pid).collect()
}

async fn reload_master(
    endpoint: &Endpoint,
    deadline: Duration,
    log: Option<&Path>,
) -> Result<ReloadReport> {
    let end = Instant::now() + deadline;
    let log_from = match log {
        Some(p) => file_len(p).await,
        None => 0,
    };
    let before = loop {
        let before = show_proc_until(endpoint, end, "`show proc` before reload").await?;
        let reports = master_reports_reload(&before);
        if send_reload(endpoint, end, reports).await? == Sent::Yes {
            break before;
        }
        // Someone else's reload is still starting its worker (3.1+), or took the master first.
        // Wait for it, then take `before` again, so its worker is not taken for ours.
        if Instant::now() >= end {
            return Err(HaproxyError::Timeout {
                what: format!("reload through {endpoint}: another reload was in progress"),
                after: deadline,
                last: Some("Another reload is still in progress.".into()),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    // The workers serving now. From 3.1 a failed reload leaves the one that kept serving under
    // `# old workers` with `# workers` empty, until the next reload that works.
    let old_worker_pids = if before.workers.is_empty() {
        pids(&before.old_workers)
    } else {
        pids(&before.workers)
    };
    let reloads_before = before.master.as_ref().and_then(|m| m.reloads);
    let failed_before = before
        .master
        .as_ref()
        .and_then(|m| m.failed_reloads)
        .unwrap_or(0);

    let failure = |message: String| async move {
        let why = match log {
            Some(p) => match log_since(p, log_from).await {
                Some(text) => format!("HAProxy's log:\n{text}"),
                None => format!("nothing new in HAProxy's log {}", p.display()),
            },
            None => "see HAProxy's log for the reason".to_string(),
        };
        HaproxyError::ReloadFailed {
            message: format!("{message}; {why}"),
        }
    };

    let mut no_worker_since: Option<Instant> = None;
    loop {
        let last = match show_proc_once(endpoint, left(end, POLL_CALL_TIMEOUT)).await {
            Ok(now) => {
                let reloads = now.master.as_ref().and_then(|m| m.reloads);
                let failed = now
                    .master
                    .as_ref()
                    .and_then(|m| m.failed_reloads)
                    .unwrap_or(0);
                let reloaded = match (reloads_before, reloads) {
                    (Some(b), Some(n)) => n > b,
                    // A version without a reload count: a new worker is the only sign.
                    _ => false,
                };
                let new_worker_pids: Vec<u32> = pids(&now.workers)
                    .into_iter()
                    .filter(|p| !old_worker_pids.contains(p))
                    .collect();
                let counts = format!(
                    "master reloads {} -> {}, failed reloads {failed_before} -> {failed}, workers {:?} -> {:?}",
                    opt(reloads_before),
                    opt(reloads),
                    old_worker_pids,
                    pids(&now.workers),
                );
                if !new_worker_pids.is_empty() && (reloaded || reloads_before.is_none()) {
                    return Ok(ReloadReport {
                        new_worker_pids,
                        old_worker_pids,
                    });
                }
                // HAProxy 2.6 on a failed reload: both counts up, the same worker serving.
                if failed > failed_before || (reloaded && failed > 0) {
                    return Err(failure(format!(
                        "HAProxy did not load the new config and keeps serving the previous one ({counts})"
                    ))
                    .await);
                }
                if reloaded {
                    let since = *no_worker_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= NO_WORKER_GRACE {
                        let message = match failure(format!(
                            "the master reloaded but started no new worker ({counts})"
                        ))
                        .await
                        {
                            HaproxyError::ReloadFailed { message } => message,
                            other => other.to_string(),
                        };
                        return Err(HaproxyError::ReloadUnconfirmed { message });
                    }
                }
                counts
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= end {
            return Err(HaproxyError::Timeout {
                what: format!("reload through {endpoint}: waiting for a new worker"),
                after: deadline,
                last: Some(last),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn opt(n: Option<u32>) -> String {
    n.map_or_else(|| "?".to_string(), |n| n.to_string())
}

/// Whether the master took `reload`.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// Sent (and, 2.7+, answered `Success=1`, or the connection closed as 2.6 re-executes).
    Yes,
    /// Not done: an earlier reload's worker is still starting (3.1+), or a 2.7+ master closed
    /// the connection without its report (it re-executed for someone else's reload first).
    Busy,
}

/// Whether the master answers `reload` with a `Success=` report (2.7+), from the version
/// `show proc` lists for it. Unknown: assume 2.6, which answers nothing.
fn master_reports_reload(proc: &ProcList) -> bool {
    let version = proc.master.as_ref().and_then(|m| m.version.as_deref());
    version
        .and_then(runtime::parse::version_branch)
        .is_some_and(|b| b >= (2, 7))
}

/// Sends `reload` once. Retried only on errors that mean it was not sent (no connection, no
/// prompt yet, e.g. the master is still re-executing from an earlier reload); once it may have
/// been sent, the outcome is for `show proc` to tell, never for a second `reload`.
///
/// `reports`: the master is 2.7+ and answers with a `Success=` report once the new worker is up
/// or has failed. Then the call waits for it until `end`, and no report is never taken for a
/// reload: a worker still starting is already listed in `show proc`, so confirming from there
/// could call a reload that then fails a success.
async fn send_reload(endpoint: &Endpoint, end: Instant, reports: bool) -> Result<Sent> {
    let started = Instant::now();
    loop {
        let cap = if reports {
            end.saturating_duration_since(Instant::now())
        } else {
            RELOAD_CALL_TIMEOUT
        };
        let mut c = RuntimeClient::new(
            endpoint.clone(),
            ClientOptions {
                timeout: left(end, cap),
                ..ClientOptions::default()
            },
        );
        // Connect first so a failure to connect is known not to have sent anything.
        let err = match c.connect().await {
            Ok(()) => match c.reload().await {
                // 2.7+ closing without a report did not take this `reload`.
                Ok(report) if reports && report.trim().is_empty() => return Ok(Sent::Busy),
                Ok(_) => return Ok(Sent::Yes),
                Err(e @ runtime::Error::Timeout { .. }) if reports => {
                    return Err(HaproxyError::Runtime {
                        what: "`reload`: no `Success=` report from the master".into(),
                        source: e,
                    })
                }
                Err(runtime::Error::ReloadInProgress { .. }) => return Ok(Sent::Busy),
                // `Success=0` (2.7+): the master says the reload failed, with its log.
                Err(runtime::Error::Command { outcome, .. }) => {
                    return Err(HaproxyError::ReloadFailed {
                        message: outcome.text.trim().to_string(),
                    })
                }
                Err(e @ runtime::Error::InvalidArgument { .. }) => {
                    return Err(HaproxyError::Runtime {
                        what: "`reload`".into(),
                        source: e,
                    })
                }
                // 2.7+: the connection broke before the report; nothing says it was taken.
                Err(_) if reports => return Ok(Sent::Busy),
                // Sent; the connection closing or going quiet is how 2.6 re-executes.
                Err(_) => return Ok(Sent::Yes),
            },
            Err(e) => e,
        };
        if matches!(err, runtime::Error::PermissionDenied { .. }) || Instant::now() >= end {
            return Err(HaproxyError::Runtime {
                what: format!(
                    "sending `reload` to {endpoint} (tried for {:?})",
                    started.elapsed()
                ),
                source: err,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `show stat` until `frontend` is listed with status OPEN, e.g. after a reload: the new
/// worker's listeners are bound by then, so connections to the port are accepted.
///
/// Transport errors are retried (the worker behind the socket changes on a reload).
///
/// A connection opened before a reload stays with the old worker: HAProxy 2.6 keeps that
/// worker's CLI sessions open while it finishes its connections (`Stopping: 1` in `show info`,
/// its frontends `STOP`), and the client only reconnects after sitting idle. So when the
/// frontend is not open and the socket's process says it is stopping, the client disconnects
/// and the next poll reaches the current worker.
///
/// Each call runs with the client's own timeout, so the last one may end up to that long after
/// `deadline`; cutting a call short from outside would leave the client's connection holding
/// half an answer.
pub async fn wait_frontend_open(
    client: &mut RuntimeClient,
    frontend: &str,
    deadline: Duration,
) -> Result<()> {
    let end = Instant::now() + deadline;
    loop {
        let last = match client.show_stat().await {
            Ok(rows) => {
                let row = rows
                    .iter()
                    .find(|r| r.kind == ProxyKind::Frontend && r.proxy == frontend);
                match row.and_then(|r| r.status.as_ref()) {
                    Some(s) if s.state == StatusState::Open => return Ok(()),
                    Some(s) => format!("status {}", s.text),
                    None if row.is_some() => "listed without a status".into(),
                    None => "not listed in `show stat`".into(),
                }
            }
            Err(e) => e.to_string(),
        };
        let stopping = matches!(
            client.show_info().await,
            Ok(info) if info.get("Stopping") == Some("1")
        );
        if stopping {
            client.disconnect();
        }
        if Instant::now() >= end {
            return Err(HaproxyError::Timeout {
                what: format!("frontend {frontend} to open"),
                after: deadline,
                last: Some(last),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_report_is_expected_from_2_7() {
        let of =
            |text: &str| master_reports_reload(&runtime::parse::parse_show_proc(text).unwrap());
        for (fixture, reports) in [
            (
                include_str!("../../proto-fixtures/2.6.12-1+deb12u4/show-proc.txt"),
                false,
            ),
            (
                include_str!("../../proto-fixtures/2.8.0/show-proc.txt"),
                true,
            ),
            (
                include_str!("../../proto-fixtures/3.0.11-1+deb13u4/show-proc.txt"),
                true,
            ),
            (
                include_str!("../../proto-fixtures/3.2.26-1/show-proc.txt"),
                true,
            ),
        ] {
            assert_eq!(of(fixture), reports, "{fixture}");
        }
        assert!(!master_reports_reload(&ProcList::default()));
    }

    #[test]
    fn tail_cuts_on_char_boundary() {
        assert_eq!(tail("abc", 5), "abc");
        assert_eq!(tail("aébc", 3), "…bc");
    }

    #[tokio::test]
    async fn reload_command_reports_stderr() {
        let r = Reloader::Command("echo nope >&2; exit 3".into());
        let e = r.reload(Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(&e, HaproxyError::CommandFailed { stderr, .. } if stderr == "nope"),
            "{e}"
        );
        let ok = Reloader::Command("true".into());
        assert_eq!(
            ok.reload(Duration::from_secs(5)).await.unwrap(),
            ReloadReport::default()
        );
    }
}
