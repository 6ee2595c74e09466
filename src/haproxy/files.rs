//! The config files HAProxy loads: the operator's main file and the agent's managed file,
//! validated with `haproxy -c` before the managed one is swapped in atomically, the previous
//! text kept for a rollback; and [`write_atomic`], the one way every file HAProxy reads is
//! written.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{file_error, HaproxyError, Result};

/// How long `haproxy -c` may take. Checking a config resolves nothing over the network (server
/// addresses are literals), so seconds are plenty; the limit only stops a hung check from
/// blocking the agent.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(30);

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
        write_atomic(&self.managed, previous.as_deref().unwrap_or("")).await
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
        tmp_next_to(&self.managed)
    }

    async fn write_tmp(&self, text: &str) -> Result<PathBuf> {
        let tmp = self.tmp_path();
        write_synced(&tmp, text).await?;
        Ok(tmp)
    }

    async fn commit(&self, tmp: &Path) -> Result<()> {
        rename_synced(tmp, &self.managed).await
    }
}

/// `<path>.tmp`: next to `path`, so the rename into place cannot cross file systems.
fn tmp_next_to(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "file".into());
    name.push(".tmp");
    path.with_file_name(name)
}

/// The directory `path` is in (`.` for a bare file name).
fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates (or truncates) `path` with `text` and syncs it.
async fn write_synced(path: &Path, text: &str) -> Result<()> {
    let mut f = tokio::fs::File::create(path)
        .await
        .map_err(file_error("create", path))?;
    f.write_all(text.as_bytes())
        .await
        .map_err(file_error("write", path))?;
    // Synced before the rename: otherwise a crash can leave the new name on empty data.
    f.sync_all().await.map_err(file_error("sync", path))?;
    Ok(())
}

/// Renames `tmp` over `dest` and syncs the directory, so the rename survives a crash; `tmp` is
/// removed when the rename fails.
async fn rename_synced(tmp: &Path, dest: &Path) -> Result<()> {
    if let Err(e) = tokio::fs::rename(tmp, dest).await {
        let _ = tokio::fs::remove_file(tmp).await;
        return Err(file_error("rename into place", dest)(e));
    }
    let dir = dir_of(dest);
    let d = tokio::fs::File::open(&dir)
        .await
        .map_err(file_error("open directory", &dir))?;
    d.sync_all()
        .await
        .map_err(file_error("sync directory", &dir))?;
    Ok(())
}

/// Replaces `path` with `text` atomically: readers see the old text or the new one, never a
/// part. Through `<path>.tmp`, so calls for one path must not overlap.
pub(crate) async fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = tmp_next_to(path);
    write_synced(&tmp, text).await?;
    rename_synced(&tmp, path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_next_to_managed() {
        let f = ConfigFiles {
            haproxy_bin: "haproxy".into(),
            main: "/etc/haproxy/haproxy.cfg".into(),
            managed: "/etc/haproxy/lbagent.cfg".into(),
        };
        assert_eq!(f.tmp_path(), PathBuf::from("/etc/haproxy/lbagent.cfg.tmp"));
        assert_eq!(dir_of(&f.managed), PathBuf::from("/etc/haproxy"));
        let rel = ConfigFiles {
            managed: "lbagent.cfg".into(),
            ..f
        };
        assert_eq!(dir_of(&rel.managed), PathBuf::from("."));
    }
}
