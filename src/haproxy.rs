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
//! keep the previous text), [`Reloader::reload`] (confirm a new worker took over), and on a
//! failed reload [`ConfigFiles::restore`] with the previous text, so the file on disk again
//! matches the worker that is still serving.
//!
//! # HAProxy 2.6's master `reload`
//!
//! The master answers nothing: it re-executes itself at once, closing every CLI connection. For
//! a moment its socket refuses connections, and a connection opened just before the re-exec may
//! never be answered. Whether the reload worked shows only in `show proc` afterwards:
//!
//! - success: the master's reload count went up, a worker pid that was not there before is
//!   listed under `# workers` (the old one moves to `# old workers` until its connections end),
//!   and `[failed: N]` is back to 0 (it counts failures since the last success);
//! - failure (say, a port already in use): the reload count and `[failed: N]` both went up, and
//!   the same worker is still listed under `# workers`, serving the previous config. HAProxy
//!   writes why (`[ALERT] ... cannot bind socket ...`) on its stderr only.
//!
//! Later versions print `Success=1|0` on the `reload` connection;
//! [`RuntimeClient::reload`] turns `Success=0` into an error, and the polling here still
//! confirms the rest. From 3.1 (reworked master-worker start, seen on 3.2) the master moves the
//! serving worker to `# old workers` before the new one has loaded; when the new one fails, the
//! old one resumes serving but stays listed there, and `# workers` is empty until a reload
//! works. `[failed: N]` is not a count to compare across reloads there, so a failure is
//! confirmed by `Success=0`, or by the count going up with no new worker.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::runtime::parse::{ProcList, ProxyKind, StatusState};
use crate::runtime::{self, ClientOptions, Endpoint, RuntimeClient};

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

/// How long `haproxy -c` may take. Checking a config resolves nothing over the network (server
/// addresses are literals), so seconds are plenty; the limit only stops a hung check from
/// blocking the agent.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline of one `show proc` while polling around a reload: short, because a connection the
/// old master accepted just before re-executing is never answered, and a fresh one will be.
const POLL_CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// Pause between polls. Polls are bounded by the caller's deadline, not by a count.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

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

type Result<T, E = HaproxyError> = std::result::Result<T, E>;

fn file_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HaproxyError {
    let path = path.to_path_buf();
    move |source| HaproxyError::File {
        action,
        path,
        source,
    }
}

/// The config files HAProxy loads: the operator's `main` file and the agent's `managed` file,
/// in that order (`-f main -f managed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigFiles {
    pub haproxy_bin: PathBuf,
    pub main: PathBuf,
    pub managed: PathBuf,
}

impl ConfigFiles {
    /// Checks `main` followed by `managed_candidate` with `haproxy -c`. HAProxy's messages
    /// name the candidate's path and line.
    ///
    /// Not `-q`: HAProxy 2.6 with `-q` prints nothing at all on a refused config, not even its
    /// alerts, and the alerts are the useful part of the error.
    pub async fn validate(&self, managed_candidate: &Path) -> Result<()> {
        let mut cmd = Command::new(&self.haproxy_bin);
        cmd.arg("-c")
            .arg("-f")
            .arg(&self.main)
            .arg("-f")
            .arg(managed_candidate)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let command = format!(
            "{} -c -f {} -f {}",
            self.haproxy_bin.display(),
            self.main.display(),
            managed_candidate.display()
        );
        let out = match tokio::time::timeout(VALIDATE_TIMEOUT, cmd.output()).await {
            Ok(r) => r.map_err(|source| HaproxyError::Spawn {
                command: command.clone(),
                source,
            })?,
            Err(_) => {
                return Err(HaproxyError::Timeout {
                    what: format!("`{command}`"),
                    after: VALIDATE_TIMEOUT,
                    last: None,
                })
            }
        };
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        // The ALERT and WARNING lines say what is wrong; the NOTICE lines (version, path to the
        // executable) do not. Everything when there is no such line, so nothing is lost.
        let mut message: String = stderr
            .lines()
            .filter(|l| l.contains("[ALERT]") || l.contains("[WARNING]"))
            .collect::<Vec<_>>()
            .join("\n");
        if message.is_empty() {
            message = format!("{}{}", stderr.trim(), stdout.trim());
        }
        if message.is_empty() {
            message = format!("exit {} and no message", out.status);
        }
        Err(HaproxyError::InvalidConfig {
            files: format!("{} + {}", self.main.display(), managed_candidate.display()),
            message,
        })
    }

    /// Replaces the managed file with `text` once HAProxy accepts it, and returns the previous
    /// content (`None` when there was no file) for [`Self::restore`].
    ///
    /// The text goes to `<managed>.tmp` in the same directory (so the rename cannot cross file
    /// systems), is synced, validated, renamed over the managed file, and the directory is
    /// synced so the rename survives a crash. A refused text leaves the managed file untouched
    /// and the temporary file removed. Calls must not overlap: they share the temporary name.
    pub async fn install(&self, text: &str) -> Result<Option<String>> {
        let previous = self.read_managed().await?;
        let tmp = self.write_tmp(text).await?;
        if let Err(e) = self.validate(&tmp).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        self.commit(&tmp).await?;
        Ok(previous)
    }

    /// Puts back what [`Self::install`] returned, atomically in the same way. `None` writes an
    /// empty file: HAProxy fails to start without a file named by `-f`. Not validated: it is
    /// the text HAProxy last accepted, and a rollback must not be refused.
    pub async fn restore(&self, previous: Option<String>) -> Result<()> {
        let tmp = self.write_tmp(previous.as_deref().unwrap_or("")).await?;
        self.commit(&tmp).await
    }

    /// The managed file's current text, `None` when it does not exist.
    pub async fn read_managed(&self) -> Result<Option<String>> {
        match tokio::fs::read_to_string(&self.managed).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(file_error("read", &self.managed)(e)),
        }
    }

    fn tmp_path(&self) -> PathBuf {
        let mut name = self
            .managed
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "managed".into());
        name.push(".tmp");
        self.managed.with_file_name(name)
    }

    fn dir(&self) -> PathBuf {
        match self.managed.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    async fn write_tmp(&self, text: &str) -> Result<PathBuf> {
        let tmp = self.tmp_path();
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(file_error("create", &tmp))?;
        f.write_all(text.as_bytes())
            .await
            .map_err(file_error("write", &tmp))?;
        // Synced before the rename: otherwise a crash can leave the new name on empty data.
        f.sync_all().await.map_err(file_error("sync", &tmp))?;
        Ok(tmp)
    }

    async fn commit(&self, tmp: &Path) -> Result<()> {
        if let Err(e) = tokio::fs::rename(tmp, &self.managed).await {
            let _ = tokio::fs::remove_file(tmp).await;
            return Err(file_error("rename into place", &self.managed)(e));
        }
        let dir = self.dir();
        let d = tokio::fs::File::open(&dir)
            .await
            .map_err(file_error("open directory", &dir))?;
        d.sync_all()
            .await
            .map_err(file_error("sync directory", &dir))?;
        Ok(())
    }
}

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
async fn show_proc_once(endpoint: &Endpoint, timeout: Duration) -> runtime::Result<ProcList> {
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
fn left(end: Instant, cap: Duration) -> Duration {
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

async fn file_len(path: &Path) -> u64 {
    tokio::fs::metadata(path)
        .await
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The `[ALERT]` lines HAProxy wrote to `log` after byte `from` (all new lines if there is no
/// alert), at most [`LOG_EXCERPT`] bytes; `None` when nothing new is readable.
async fn log_since(log: &Path, from: u64) -> Option<String> {
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
fn tail(s: &str, max: usize) -> String {
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
                        return Err(failure(format!(
                            "the master reloaded but started no new worker ({counts})"
                        ))
                        .await);
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
    let branch = version.and_then(|v| {
        let mut parts = v.split(['.', '-']);
        Some((
            parts.next()?.parse::<u32>().ok()?,
            parts.next()?.parse::<u32>().ok()?,
        ))
    });
    branch.is_some_and(|b| b >= (2, 7))
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

/// How long a started HAProxy may take until both sockets answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long HAProxy has to stop on SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The main config [`ManagedHaproxy`] writes when the directory has none. `@DIR@` is the
/// directory. `expose-fd listeners` lets a new worker take the listening sockets over from the
/// old one on a reload, so no connection is refused in between. `maxconn 4096` needs about
/// 8,200 file descriptors, which HAProxy raises its soft limit to by itself; a higher value
/// refuses to start where the hard limit is lower (HAProxy exits with "Cannot raise FD limit"),
/// so raise both together in the operator's own config.
const MAIN_CONFIG: &str =
    "# Written by lbagent when it found no config here; lbagent's own frontends are in managed.cfg.
global
    stats socket @DIR@/admin.sock mode 600 level admin expose-fd listeners
    stats timeout 1m
    maxconn 4096
    # Nothing here uses HAProxy's HTTP client; without this, every `haproxy -c` the agent runs
    # loads the system CA bundle (about three quarters of a 40 ms check).
    httpclient.ssl.verify none

defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m
";

/// An HAProxy run by the agent itself, in master-worker mode, in one directory:
///
/// - `haproxy.cfg`: the main config (written with defaults if missing, never overwritten),
/// - `managed.cfg`: the agent's file (created empty if missing),
/// - `admin.sock`: the worker's admin stats socket (when the default main config is used),
/// - `master.sock`: the master CLI,
/// - `haproxy.log`: HAProxy's stdout and stderr, appended (2.6 reports failed reloads only
///   there).
///
/// The process is killed (SIGKILL; the workers follow their master) when this handle drops
/// while it runs; [`Self::stop`] stops it gently.
#[derive(Debug)]
pub struct ManagedHaproxy {
    dir: PathBuf,
    haproxy_bin: PathBuf,
    child: Option<Child>,
    pid: u32,
    exited: Option<ExitStatus>,
}

impl ManagedHaproxy {
    /// Prepares `dir` (created if needed), validates the config, starts
    /// `haproxy -W -S master.sock,mode,600 -f haproxy.cfg -f managed.cfg` and waits until the
    /// admin socket and the master CLI answer.
    pub async fn start(dir: &Path, haproxy_bin: &Path) -> Result<ManagedHaproxy> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(file_error("create directory", dir))?;
        // Absolute, because the paths end up in the config and on HAProxy's command line.
        let dir = tokio::fs::canonicalize(dir)
            .await
            .map_err(file_error("resolve", dir))?;
        check_path(&dir)?;
        let main = dir.join("haproxy.cfg");
        if !tokio::fs::try_exists(&main)
            .await
            .map_err(file_error("look for", &main))?
        {
            let text = MAIN_CONFIG.replace("@DIR@", &dir.display().to_string());
            tokio::fs::write(&main, text)
                .await
                .map_err(file_error("write", &main))?;
        }
        let managed = dir.join("managed.cfg");
        if !tokio::fs::try_exists(&managed)
            .await
            .map_err(file_error("look for", &managed))?
        {
            tokio::fs::write(&managed, "")
                .await
                .map_err(file_error("write", &managed))?;
        }
        let mut h = ManagedHaproxy {
            dir,
            haproxy_bin: haproxy_bin.to_path_buf(),
            child: None,
            pid: 0,
            exited: None,
        };
        // Fix: an HAProxy left running here by a previous agent (killed with SIGKILL, or
        // stopped with --keep-haproxy) used to stay alive beside the new one: both listened on
        // the frontend ports (HAProxy binds with SO_REUSEPORT), the old one with a config
        // nobody updated any more. Take its sockets' names away first, so that the new
        // HAProxy's readiness check and the agent can only reach the new one; once the new one
        // serves, soft-stop the old one (SIGUSR1: it stops listening and exits when its
        // connections end), so no connection is refused in between.
        let leftover =
            match show_proc_once(&Endpoint::Unix(h.master_socket()), POLL_CALL_TIMEOUT).await {
                Ok(p) => p.master.map(|m| m.pid),
                Err(_) => None,
            };
        if let Some(pid) = leftover {
            tracing::warn!(
                pid,
                "an HAProxy from an earlier run still runs in {}; replacing it",
                h.dir.display()
            );
            for sock in [h.master_socket(), h.admin_socket()] {
                let _ = tokio::fs::remove_file(&sock).await;
            }
        }
        h.spawn().await?;
        if let Some(pid) = leftover {
            let _ = Command::new("kill")
                .arg("-USR1")
                .arg(pid.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
        Ok(h)
    }

    async fn spawn(&mut self) -> Result<()> {
        let files = self.config_files();
        files.validate(&files.managed).await?;
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(file_error("open", &log_path))?;
        let log2 = log.try_clone().map_err(file_error("open", &log_path))?;
        let master_arg = format!("{},mode,600", self.master_socket().display());
        let mut cmd = Command::new(&self.haproxy_bin);
        cmd.arg("-W")
            .arg("-S")
            .arg(&master_arg)
            .arg("-f")
            .arg(&files.main)
            .arg("-f")
            .arg(&files.managed)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd.spawn().map_err(|source| HaproxyError::Spawn {
            command: format!(
                "{} -W -S {master_arg} -f {} -f {}",
                self.haproxy_bin.display(),
                files.main.display(),
                files.managed.display()
            ),
            source,
        })?;
        self.pid = child.id().unwrap_or(0);
        self.child = Some(child);
        self.exited = None;
        self.wait_ready().await
    }

    /// Polls both sockets until they answer; fails early when HAProxy exits.
    async fn wait_ready(&mut self) -> Result<()> {
        let end = Instant::now() + START_TIMEOUT;
        let admin = Endpoint::Unix(self.admin_socket());
        let master = Endpoint::Unix(self.master_socket());
        loop {
            if let Some(status) = self.try_exited() {
                return Err(HaproxyError::Exited {
                    status: status.to_string(),
                    when: "while starting",
                    log: self.log_tail().await,
                });
            }
            let mut a = RuntimeClient::new(
                admin.clone(),
                ClientOptions {
                    timeout: left(end, POLL_CALL_TIMEOUT),
                    ..ClientOptions::default()
                },
            );
            let last = match a.show_info().await {
                Ok(_) => match show_proc_once(&master, left(end, POLL_CALL_TIMEOUT)).await {
                    Ok(p) if !p.workers.is_empty() => return Ok(()),
                    Ok(_) => "the master lists no worker yet".to_string(),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= end {
                return Err(HaproxyError::Timeout {
                    what: format!(
                        "HAProxy's sockets to answer (log: {})",
                        self.log_path().display()
                    ),
                    after: START_TIMEOUT,
                    last: Some(last),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The worker's admin stats socket, as the default main config declares it.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// The master CLI.
    pub fn master_socket(&self) -> PathBuf {
        self.dir.join("master.sock")
    }

    /// Where HAProxy's stdout and stderr go.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("haproxy.log")
    }

    /// The last part of HAProxy's log, for error messages.
    pub async fn log_tail(&self) -> String {
        log_since(&self.log_path(), 0).await.unwrap_or_default()
    }

    pub fn config_files(&self) -> ConfigFiles {
        ConfigFiles {
            haproxy_bin: self.haproxy_bin.clone(),
            main: self.dir.join("haproxy.cfg"),
            managed: self.dir.join("managed.cfg"),
        }
    }

    pub fn reloader(&self) -> Reloader {
        Reloader::Master(Endpoint::Unix(self.master_socket()))
    }

    /// Reloads through the master CLI, quoting HAProxy's log on failure.
    pub async fn reload(&self, deadline: Duration) -> Result<ReloadReport> {
        self.reloader()
            .reload_with_log(deadline, Some(&self.log_path()))
            .await
    }

    /// The master's pid (the pid of the last start, also after it exited).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `Some` once the master has exited (the workers go with it), so the agent can notice and
    /// [`Self::restart`].
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.exited = Some(status);
                }
            }
        }
        self.exited
    }

    /// SIGTERM (the master stops its workers and exits), SIGKILL if it has not exited within
    /// [`STOP_TIMEOUT`].
    async fn terminate(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(self.exited);
        };
        if let Ok(Some(status)) = child.try_wait() {
            self.exited = Some(status);
            return Ok(self.exited);
        }
        // Only while the child is unreaped is its pid surely still ours to signal. `kill(1)`
        // keeps this free of `unsafe` and libc.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        let status = match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(r) => r.map_err(|source| HaproxyError::Spawn {
                command: format!("wait for haproxy pid {}", self.pid),
                source,
            })?,
            Err(_) => {
                let _ = child.start_kill();
                match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
                    Ok(Ok(s)) => s,
                    _ => {
                        return Err(HaproxyError::Timeout {
                            what: format!("haproxy pid {} to exit after SIGKILL", self.pid),
                            after: 2 * STOP_TIMEOUT,
                            last: None,
                        })
                    }
                }
            }
        };
        self.exited = Some(status);
        Ok(self.exited)
    }

    /// Stops HAProxy: SIGTERM, then SIGKILL after 5 s. Returns how the master exited.
    pub async fn stop(mut self) -> Result<Option<ExitStatus>> {
        let r = self.terminate().await;
        self.child = None;
        r
    }

    /// Stops HAProxy if it still runs and starts it again with the files in the directory
    /// (validated first; a refused config leaves it stopped and says why).
    pub async fn restart(&mut self) -> Result<()> {
        self.terminate().await?;
        self.child = None;
        self.spawn().await
    }
}

impl ManagedHaproxy {
    /// Lets HAProxy run on after this handle is gone (`--keep-haproxy`): it keeps serving every
    /// route, and the next agent start attaches to the same sockets by restarting it.
    pub fn detach(mut self) {
        self.child = None;
    }
}

impl Drop for ManagedHaproxy {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                // No waiting in drop: SIGKILL the master; its workers notice the closed master
                // pipe and exit by themselves, and tokio reaps the child in the background.
                let _ = child.start_kill();
            }
        }
    }
}

/// Refuses directory paths that would break the config or the `-S path,mode,600` argument.
fn check_path(dir: &Path) -> Result<()> {
    let s = dir.to_str().ok_or_else(|| HaproxyError::BadPath {
        path: dir.to_path_buf(),
        reason: "not UTF-8",
    })?;
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | '#' | '"' | '\'' | '\\'))
    {
        return Err(HaproxyError::BadPath {
            path: dir.to_path_buf(),
            reason: "contains whitespace, a comma, '#', a quote or a backslash",
        });
    }
    // sun_path holds 108 bytes with the terminating NUL.
    if s.len() + "/master.sock".len() > 107 {
        return Err(HaproxyError::BadPath {
            path: dir.to_path_buf(),
            reason: "too long for a unix socket path",
        });
    }
    Ok(())
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
                include_str!("../proto-fixtures/2.6.12-1+deb12u4/show-proc.txt"),
                false,
            ),
            (include_str!("../proto-fixtures/2.8.0/show-proc.txt"), true),
            (
                include_str!("../proto-fixtures/3.0.11-1+deb13u4/show-proc.txt"),
                true,
            ),
            (
                include_str!("../proto-fixtures/3.2.26-1/show-proc.txt"),
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

    #[test]
    fn paths_checked() {
        assert!(check_path(Path::new("/tmp/x")).is_ok());
        assert!(check_path(Path::new("/tmp/a,b")).is_err());
        assert!(check_path(Path::new("/tmp/a b")).is_err());
        assert!(check_path(&PathBuf::from(format!("/{}", "x".repeat(100)))).is_err());
    }

    #[test]
    fn tmp_next_to_managed() {
        let f = ConfigFiles {
            haproxy_bin: "haproxy".into(),
            main: "/etc/haproxy/haproxy.cfg".into(),
            managed: "/etc/haproxy/lbagent.cfg".into(),
        };
        assert_eq!(f.tmp_path(), PathBuf::from("/etc/haproxy/lbagent.cfg.tmp"));
        assert_eq!(f.dir(), PathBuf::from("/etc/haproxy"));
        let rel = ConfigFiles {
            managed: "lbagent.cfg".into(),
            ..f
        };
        assert_eq!(rel.dir(), PathBuf::from("."));
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
