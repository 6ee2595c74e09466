//! The HAProxy that managed mode runs itself: started in master-worker mode in one
//! directory, watched, restarted, stopped.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::files::write_atomic;
use super::master::{left, log_since, show_proc_once, POLL_CALL_TIMEOUT, POLL_INTERVAL};
use super::{
    file_error, ConfigFiles, HaproxyError, ReloadReport, Reloader, Result, ServerStateFile,
};
use crate::runtime::{ClientOptions, Endpoint, RuntimeClient};

/// How long a started HAProxy may take until both sockets answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long HAProxy has to stop on SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an old worker may go on serving its connections after a reload when nothing else
/// is said: long enough for ordinary requests and downloads to finish, short enough that the
/// old workers a day of reloads leaves, each kept alive by a long-lived MQTT or WebSocket
/// connection, cannot pile up. Those clients reconnect, to the new worker.
pub const DEFAULT_HARD_STOP_AFTER: Duration = Duration::from_secs(30 * 60);

/// What managed mode's main config says that the operator may choose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MainOptions {
    /// `hard-stop-after`: how long an old worker may serve on after a reload.
    pub hard_stop_after: Duration,
}

impl Default for MainOptions {
    fn default() -> Self {
        MainOptions {
            hard_stop_after: DEFAULT_HARD_STOP_AFTER,
        }
    }
}

/// The first line of the main config [`ManagedHaproxy`] writes: a `haproxy.cfg` that starts
/// with it is the agent's, rewritten at every start; one that does not is the operator's own,
/// never touched. (Earlier versions wrote "# Written by lbagent when it found no config here".)
const MAIN_HEADER: &str = "# Written by lbagent";

/// The main config [`ManagedHaproxy`] writes. `@DIR@` is the directory, `@HARD_STOP_AFTER@`
/// [`MainOptions::hard_stop_after`]. `expose-fd listeners` lets a new worker take the listening
/// sockets over from the old one on a reload, so no connection is refused in between.
/// `maxconn 4096` needs about 8,200 file descriptors, which HAProxy raises its soft limit to by
/// itself; a higher value refuses to start where the hard limit is lower (HAProxy exits with
/// "Cannot raise FD limit"), so raise both together in the operator's own config.
const MAIN_CONFIG: &str =
    "# Written by lbagent at every start; lbagent's own frontends are in managed.cfg. To run
# a main config of your own, replace this file with one that does not start with this line.
global
    stats socket @DIR@/admin.sock mode 600 level admin expose-fd listeners
    stats timeout 1m
    maxconn 4096
    # An old worker still serving connections after a reload stops this long after it.
    hard-stop-after @HARD_STOP_AFTER@
    # lbagent saves the servers' state here just before each reload: the new worker starts
    # each server as the old one had it (a DOWN server stays DOWN until a check passes).
    server-state-file @DIR@/server-state
    # Nothing here uses HAProxy's HTTP client; without this, every `haproxy -c` the agent runs
    # loads the system CA bundle (about three quarters of a 40 ms check).
    httpclient.ssl.verify none

defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m
    load-server-state-from-file global
";

/// [`MAIN_CONFIG`] for `dir`.
fn main_config(dir: &Path, opts: &MainOptions) -> String {
    MAIN_CONFIG
        .replace("@DIR@", &dir.display().to_string())
        .replace("@HARD_STOP_AFTER@", &haproxy_time(opts.hard_stop_after))
}

/// A duration in HAProxy's time syntax: whole seconds as `<n>s`, anything finer as `<n>ms`.
fn haproxy_time(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// An HAProxy run by the agent itself, in master-worker mode, in one directory:
///
/// - `haproxy.cfg`: the main config, the agent's (rewritten at every start from
///   [`MainOptions`]) unless the operator put one of their own there,
/// - `managed.cfg`: the agent's file (created empty if missing),
/// - `server-state`: the servers' state, saved by the agent just before each reload and cleared
///   after it ([`Self::server_state_file`]),
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
    /// [`Self::start_with`] the default [`MainOptions`].
    pub async fn start(dir: &Path, haproxy_bin: &Path) -> Result<ManagedHaproxy> {
        Self::start_with(dir, haproxy_bin, &MainOptions::default()).await
    }

    /// Prepares `dir` (created if needed), writes the main config unless it is the operator's
    /// own, validates the config, starts
    /// `haproxy -W -S master.sock,mode,600 -f haproxy.cfg -f managed.cfg` and waits until the
    /// admin socket and the master CLI answer.
    pub async fn start_with(
        dir: &Path,
        haproxy_bin: &Path,
        opts: &MainOptions,
    ) -> Result<ManagedHaproxy> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(file_error("create directory", dir))?;
        // Absolute, because the paths end up in the config and on HAProxy's command line.
        let dir = tokio::fs::canonicalize(dir)
            .await
            .map_err(file_error("resolve", dir))?;
        check_path(&dir)?;
        let main = dir.join("haproxy.cfg");
        let ours = match tokio::fs::read_to_string(&main).await {
            Ok(text) => text.starts_with(MAIN_HEADER),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(file_error("read", &main)(e)),
        };
        if ours {
            write_atomic(&main, &main_config(&dir, opts)).await?;
        } else {
            tracing::info!(
                path = %main.display(),
                "the main config is the operator's own: hard-stop-after and the server-state-file lines are up to it"
            );
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
            // SIGUSR1: a soft stop, its connections finish on the old workers.
            signal(pid, Signal::SIGUSR1);
        }
        Ok(h)
    }

    async fn spawn(&mut self) -> Result<()> {
        // A fresh start has no old worker to take the servers' state from: what a file holds
        // (an agent stopped between saving and clearing it) is out of date.
        self.server_state_file().clear().await;
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

    /// The `server-state-file` the main config names, asked of the admin socket.
    pub fn server_state_file(&self) -> ServerStateFile {
        ServerStateFile::new(
            self.dir.join("server-state"),
            Endpoint::Unix(self.admin_socket()),
        )
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
        // Only while the child is unreaped is its pid surely still ours to signal.
        signal(self.pid, Signal::SIGTERM);
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

/// Sends `sig` to `pid`; a process already gone is fine (there is nothing left to stop).
fn signal(pid: u32, sig: Signal) {
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    if let Err(e) = nix::sys::signal::kill(Pid::from_raw(pid), sig) {
        tracing::debug!(pid, signal = %sig, error = %e, "signal not delivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_config_renders_its_settings() {
        let dir = Path::new("/var/lib/lbagent/haproxy");
        let text = main_config(dir, &MainOptions::default());
        assert!(text.starts_with(MAIN_HEADER));
        assert!(text.contains("\n    hard-stop-after 1800s\n"), "{text}");
        assert!(text.contains("\n    server-state-file /var/lib/lbagent/haproxy/server-state\n"));
        assert!(text.contains("\n    load-server-state-from-file global\n"));
        assert!(!text.contains('@'), "a placeholder left: {text}");
        let opts = MainOptions {
            hard_stop_after: Duration::from_millis(1500),
        };
        assert!(main_config(dir, &opts).contains("\n    hard-stop-after 1500ms\n"));
    }

    #[test]
    fn paths_checked() {
        assert!(check_path(Path::new("/tmp/x")).is_ok());
        assert!(check_path(Path::new("/tmp/a,b")).is_err());
        assert!(check_path(Path::new("/tmp/a b")).is_err());
        assert!(check_path(&PathBuf::from(format!("/{}", "x".repeat(100)))).is_err());
    }
}
