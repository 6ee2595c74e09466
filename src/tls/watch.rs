//! Reloads the API's certificate when its files change. The directories are watched, not the
//! files: certbot renews by pointing the `live/` symlinks at new files, and Kubernetes by
//! renaming its `..data` symlink to a new directory, so the files named on the command line
//! are never written themselves. Any change in a watched directory re-reads the files after a
//! short quiet period (an update touches several files); reading the same content again
//! changes nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ServerTls;

/// How long the directories must stay quiet before the files are read.
const QUIET: Duration = Duration::from_millis(200);

/// Longest wait after a first change, even if changes keep coming.
const MOST_DELAY: Duration = Duration::from_secs(2);

/// The directories to watch for `paths`: each file's own directory and, when it is a symlink,
/// the directory of the file it points to now (certbot's `archive/`).
fn directories(paths: &[PathBuf]) -> BTreeSet<PathBuf> {
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut dirs = BTreeSet::new();
    for p in paths {
        dirs.insert(parent(p));
        if let Ok(real) = std::fs::canonicalize(p) {
            dirs.insert(parent(&real));
        }
    }
    dirs
}

/// Our own reads open the files: opening and reading are not changes.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Starts watching `tls`'s directories; the task reloads on changes until `shutdown`.
pub fn spawn(
    tls: Arc<ServerTls>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, String> {
    // One pending wake-up is enough: the reload reads whatever is there by then.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(e) if !is_change(&e.kind) => {}
            Ok(_) => {
                let _ = tx.try_send(());
            }
            Err(e) => tracing::warn!(error = %e, "watching the TLS files"),
        })
        .map_err(|e| format!("cannot watch the TLS files: {e}"))?;
    for dir in directories(&tls.files().paths()) {
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| format!("cannot watch {} for TLS file changes: {e}", dir.display()))?;
    }
    Ok(tokio::spawn(async move {
        // Dropping the watcher ends the watch.
        let _watcher = watcher;
        loop {
            tokio::select! {
                woken = rx.recv() => if woken.is_none() { return },
                _ = shutdown.cancelled() => return,
            }
            let deadline = tokio::time::Instant::now() + MOST_DELAY;
            while tokio::time::Instant::now() < deadline {
                match tokio::time::timeout(QUIET, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
            let tls = tls.clone();
            let _ = tokio::task::spawn_blocking(move || tls.reload("the files changed")).await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_the_directory_of_each_file_and_of_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("archive")).unwrap();
        std::fs::create_dir_all(root.join("live")).unwrap();
        std::fs::write(root.join("archive/cert1.pem"), "x").unwrap();
        std::os::unix::fs::symlink("../archive/cert1.pem", root.join("live/cert.pem")).unwrap();
        let dirs = directories(&[root.join("live/cert.pem"), PathBuf::from("key.pem")]);
        let want: BTreeSet<PathBuf> = [root.join("live"), root.join("archive"), ".".into()]
            .into_iter()
            .collect();
        assert_eq!(dirs, want);
    }

    #[test]
    fn opening_a_file_is_no_change_and_writing_one_is() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            notify::event::AccessMode::Read
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Create(
            notify::event::CreateKind::File
        )));
    }
}
