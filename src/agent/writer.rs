//! The background writer of the managed config file.

use super::*;

/// Rewrites the managed config file in the background whenever the state changed, coalescing
/// bursts: at most one rewrite in flight, always of the newest state. Each rewrite fsyncs the
/// file and runs `haproxy -c`, which parses the whole configuration (~10 ms of CPU, more on a
/// big one): run during a change, it takes the CPU and the disk that change needs. So the writer
/// waits until changes pause for [`WRITE_QUIET`], or until the oldest unwritten change is
/// [`WRITE_MAX_DELAY`] old when they never pause. Nothing waits on the file: the journal is the
/// source of truth, and HAProxy already runs every change.
const WRITE_QUIET: Duration = Duration::from_millis(200);
const WRITE_MAX_DELAY: Duration = Duration::from_secs(2);

pub(super) struct ConfigWriter {
    pub(super) files: Arc<Mutex<ManagedFile>>,
    pub(super) render: RenderOptions,
    /// With etcd: where the last state applied is kept too, for a start without etcd.
    pub(super) cache: Option<std::path::PathBuf>,
}

impl ConfigWriter {
    pub(super) async fn run(
        self,
        mut published: watch::Receiver<Arc<DesiredState>>,
        stop: CancellationToken,
    ) {
        let mut written = None;
        loop {
            if written != Some(published.borrow_and_update().generation) {
                // Changes are coming: let them pause first (see WRITE_QUIET).
                let latest = Instant::now() + WRITE_MAX_DELAY;
                loop {
                    let quiet = (Instant::now() + WRITE_QUIET).min(latest);
                    tokio::select! {
                        changed = published.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep_until(quiet.into()) => break,
                        _ = stop.cancelled() => return,
                    }
                }
                let state = published.borrow_and_update().clone();
                let text = render_managed(&state, &self.render);
                let mut files = self.files.lock().await;
                match files.install(&text, state.generation).await {
                    Ok(_) => {
                        written = Some(state.generation);
                        if let Some(path) = &self.cache {
                            if let Err(e) = crate::store::etcd::write_cache(path, &state).await {
                                tracing::warn!(error = %e, "could not keep a local copy of the state");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not write the managed configuration; retrying");
                        drop(files);
                        tokio::select! {
                            _ = tokio::time::sleep(WRITE_MAX_DELAY) => {}
                            _ = stop.cancelled() => return,
                        }
                        continue;
                    }
                }
                drop(files);
                continue;
            }
            tokio::select! {
                changed = published.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    }
}
