//! The watch: every commit under the prefix, in revision order, for the owner; a whole re-read
//! when it starts without a revision or fell behind a compaction.

use super::*;

/// The watch: brings every change under the prefix to the owner, in revision order.
pub(super) struct Watcher {
    pub(super) client: Client,
    pub(super) prefix: String,
    pub(super) name: String,
    pub(super) events: mpsc::Sender<StoreEvent>,
    pub(super) status: Arc<watch::Sender<EtcdStatus>>,
    pub(super) health: Arc<std::sync::Mutex<Health>>,
    pub(super) metrics: EtcdMetrics,
    pub(super) lag: Arc<std::sync::Mutex<Lag>>,
}

impl Watcher {
    /// `next`: the revision to watch from; `None`, read everything first.
    pub(super) async fn run(self, next: Option<i64>, stop: CancellationToken) {
        let mut next = next.unwrap_or(0);
        loop {
            let result = tokio::select! {
                r = async {
                    if next == 0 {
                        next = self.read_everything().await? + 1;
                    }
                    self.follow(&mut next).await
                } => r,
                _ = stop.cancelled() => return,
            };
            if let Err(why) = result {
                self.metrics.errors.inc();
                tracing::warn!(error = %why, "etcd watch interrupted; starting it again");
                self.set_error(Some(why));
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY_AFTER) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    fn set_error(&self, why: Option<String>) {
        let mut h = self.health.lock().expect("health lock");
        h.watch = why;
        publish_health(&self.status, &h);
    }

    /// Follows the prefix from `next` until the watch breaks; a compacted start re-reads
    /// everything first.
    async fn follow(&self, next: &mut i64) -> Result<(), String> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(*next)
            .with_prev_key();
        let mut stream = timed("starting the watch", CALL_TIMEOUT, || {
            let (client, options) = (self.client.clone(), options.clone());
            let prefix = self.prefix.clone();
            async move {
                client
                    .watch_client()
                    .max_decoding_message_size(call::MAX_ANSWER)
                    .watch(prefix, Some(options))
                    .await
            }
        })
        .await?;
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err("etcd: the watch ended".into()),
                Err(e) => return Err(etcd_error("watch", e)),
            };
            if resp.compact_revision() > 0 {
                tracing::warn!(
                    from = *next,
                    compacted = resp.compact_revision(),
                    "etcd compacted the revisions this watch needed; reading everything again"
                );
                *next = self.read_everything().await? + 1;
                return Ok(());
            }
            if resp.canceled() {
                return Err(format!(
                    "etcd: the watch was cancelled: {}",
                    resp.cancel_reason()
                ));
            }
            if resp.created() {
                // Running (again): no longer an error.
                self.set_error(None);
            }
            let mut frontends = Vec::new();
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                *next = (*next).max(kv.mod_revision() + 1);
                let key = String::from_utf8_lossy(kv.key());
                let Some(rest) = key.strip_prefix(self.prefix.as_str()) else {
                    continue;
                };
                let put = event.event_type() == EventType::Put;
                if let Some(port) = rest.strip_prefix("frontends/") {
                    let Some(port) = port_of(port) else { continue };
                    let spec = if put {
                        match decode_frontend(kv.value()) {
                            Ok(s) => Some(s),
                            Err(e) => {
                                self.metrics.errors.inc();
                                tracing::error!(port, error = %e, "etcd holds a frontend lbagent cannot read; ignored");
                                continue;
                            }
                        }
                    } else {
                        None
                    };
                    frontends.push(RemoteFrontend {
                        port,
                        spec,
                        revision: kv.mod_revision(),
                    });
                } else if let Some(agent) = rest.strip_prefix("renewals/") {
                    if agent == self.name || !put {
                        continue;
                    }
                    match serde_json::from_slice::<Vec<Renewal>>(kv.value()) {
                        Ok(renewals) => {
                            self.deliver(StoreEvent::Renewals {
                                agent: agent.to_string(),
                                renewals,
                            })
                            .await?
                        }
                        Err(e) => {
                            tracing::warn!(agent, error = %e, "unreadable renewals; ignored")
                        }
                    }
                }
            }
            if resp.events().is_empty() {
                continue;
            }
            // Also with no frontend in it: the owner's applied revision moves on.
            self.deliver(StoreEvent::Frontends {
                revision: *next - 1,
                frontends,
                everything: false,
            })
            .await?;
            self.seen(*next - 1);
        }
    }

    /// Reads every frontend and delivers them as a whole (what it does not list is gone);
    /// returns the revision read at.
    async fn read_everything(&self) -> Result<i64, String> {
        let (state, revision) = read_all(&self.client, &self.prefix, &self.metrics).await?;
        self.deliver(StoreEvent::Frontends {
            revision,
            frontends: remote_frontends(&state, revision),
            everything: true,
        })
        .await?;
        self.seen(revision);
        self.set_error(None);
        Ok(revision)
    }

    /// The watch has everything up to `revision`: own commits up to it are measured.
    fn seen(&self, revision: i64) {
        self.metrics.revision.set(revision);
        self.status
            .send_modify(|s| s.revision = s.revision.max(revision));
        let mut lag = self.lag.lock().expect("lag lock");
        lag.delivered = lag.delivered.max(revision);
        while let Some(&(rev, at)) = lag.pending.front() {
            if rev > revision {
                break;
            }
            self.metrics.watch_lag.observe(at.elapsed().as_secs_f64());
            lag.pending.pop_front();
        }
    }

    async fn deliver(&self, event: StoreEvent) -> Result<(), String> {
        self.events
            .send(event)
            .await
            .map_err(|_| "the agent stopped".to_string())
    }
}
