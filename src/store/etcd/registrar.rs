//! The agent's own keys (`agents/<name>`, `renewals/<name>`) on a lease kept alive, and the
//! probe: a quorum read every few seconds that says whether etcd answers and who runs.

use super::*;

/// The agent's own keys: `agents/<name>` and `renewals/<name>` on a lease kept alive, and a
/// quorum read every [`PROBE_EVERY`] that says whether etcd answers and lists the agents.
pub(super) struct Registrar {
    pub(super) client: Client,
    pub(super) prefix: String,
    pub(super) me: AgentSeen,
    pub(super) status: Arc<watch::Sender<EtcdStatus>>,
    pub(super) health: Arc<std::sync::Mutex<Health>>,
    pub(super) metrics: EtcdMetrics,
    /// Asks for a probe before the next tick (once registered: whether this agent expires).
    /// One probe at a time, so their answers are published in order.
    pub(super) probe_now: tokio::sync::Notify,
}

impl Registrar {
    /// Probes and keeps the registration, until `stop`.
    pub(super) async fn run(self, renewals: mpsc::Receiver<Vec<Renewal>>, stop: CancellationToken) {
        tokio::select! {
            _ = self.probing() => {}
            _ = self.registering(renewals) => {}
            _ = stop.cancelled() => {}
        }
    }

    /// The probe, whether this agent is registered or not: an agent refused its name, or
    /// registering again, still learns when etcd answers (and so stops refusing changes).
    async fn probing(&self) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        // A slow probe is not made up for by probes back to back.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.probe_now.notified() => {}
            }
            self.probe().await;
        }
    }

    async fn registering(&self, mut renewals: mpsc::Receiver<Vec<Renewal>>) {
        // Renewals whose write failed: sent with the next ones once registered again.
        let mut unsent: Vec<Renewal> = Vec::new();
        loop {
            let result = self.registered(&mut renewals, &mut unsent).await;
            if let Err(why) = result {
                self.metrics.errors.inc();
                tracing::warn!(error = %why, "etcd: this agent's registration lapsed; registering again");
                let mut h = self.health.lock().expect("health lock");
                h.register = Some(why);
                publish_health(&self.status, &h);
                // Not registered: another agent may be the oldest now.
                self.status.send_modify(|s| {
                    s.expiring = false;
                    s.lease = None;
                });
            }
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }

    fn agent_key(&self) -> String {
        format!("{}agents/{}", self.prefix, self.me.name)
    }

    fn renewals_key(&self) -> String {
        format!("{}renewals/{}", self.prefix, self.me.name)
    }

    /// Registers on a new lease, then keeps it alive and writes renewals as they come, until
    /// something fails.
    async fn registered(
        &self,
        renewals: &mut mpsc::Receiver<Vec<Renewal>>,
        unsent: &mut Vec<Renewal>,
    ) -> Result<(), String> {
        let client = &self.client;
        let lease = timed("granting this agent's lease", CALL_TIMEOUT, || {
            let mut client = client.clone();
            async move { client.lease_grant(AGENT_TTL, None).await }
        })
        .await?
        .id();
        self.claim_name(lease).await?;
        let (mut keeper, mut answers) = timed("keeping this agent's lease", CALL_TIMEOUT, || {
            let mut client = client.clone();
            async move { client.lease_keep_alive(lease).await }
        })
        .await?;
        {
            let mut h = self.health.lock().expect("health lock");
            h.register = None;
            publish_health(&self.status, &h);
        }
        self.status.send_modify(|s| s.lease = Some(lease));
        // Whether this agent expires now, without waiting for the next tick.
        self.probe_now.notify_one();
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    keeper.keep_alive().await.map_err(|e| etcd_error("keeping this agent's lease", e))?;
                    let answer = tokio::time::timeout(CALL_TIMEOUT, answers.message())
                        .await
                        .map_err(|_| etcd_error("keeping this agent's lease", "no answer"))?
                        .map_err(|e| etcd_error("keeping this agent's lease", e))?;
                    match answer {
                        Some(a) if a.ttl() > 0 => {}
                        _ => return Err("etcd: this agent's lease expired".into()),
                    }
                }
                batch = renewals.recv() => {
                    let Some(batch) = batch else { return Ok(()) };
                    unsent.extend(batch);
                    while let Ok(more) = renewals.try_recv() {
                        unsent.extend(more);
                    }
                    // One entry per registration, its newest: a failing etcd does not make it
                    // grow with every tick.
                    unsent.sort_by(|a, b| (a.port, &a.node, b.heard_at).cmp(&(b.port, &b.node, a.heard_at)));
                    unsent.dedup_by(|later, first| later.port == first.port && later.node == first.node);
                    let now_ms = crate::clock::unix_millis();
                    for r in unsent.iter_mut() {
                        r.age_ms = match r.heard_at {
                            Some(t) => t.elapsed().as_millis() as u64,
                            None => now_ms.saturating_sub(r.at_ms),
                        };
                    }
                    let value = serde_json::to_vec(&*unsent).expect("renewals serialize");
                    let key = self.renewals_key();
                    timed("writing this agent's renewals", CALL_TIMEOUT, || {
                        let (mut client, key, value) = (client.clone(), key.clone(), value.clone());
                        async move {
                            client
                                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                                .await
                        }
                    })
                    .await?;
                    unsent.clear();
                }
            }
        }
    }

    /// Puts `agents/<name>` on `lease`, unless another agent holds the name: two agents under
    /// one name would both think they expire registrations, and skip each other's renewals.
    /// The same agent restarted (its instance id is kept in its state directory) takes its key
    /// back at once.
    async fn claim_name(&self, lease: i64) -> Result<(), String> {
        let key = self.agent_key();
        let me = serde_json::to_vec(&self.me).expect("an agent serializes");
        let put = || {
            TxnOp::put(
                key.clone(),
                me.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        let txn = Txn::new()
            .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![put()])
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let client = &self.client;
        let resp = call::txn(client, "registering this agent", CALL_TIMEOUT, txn).await?;
        if resp.succeeded() {
            return Ok(());
        }
        let holder: Option<AgentSeen> = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .and_then(|kv| serde_json::from_slice(kv.value()).ok()),
            _ => None,
        });
        match holder {
            Some(h) if h.instance != self.me.instance => Err(format!(
                "etcd: another agent is registered as `{}` (listening on {}): give each agent \
                 its own --agent-name",
                h.name, h.listen
            )),
            _ => {
                let txn = Txn::new().and_then(vec![put()]);
                call::txn(client, "registering this agent", CALL_TIMEOUT, txn)
                    .await
                    .map(|_| ())
            }
        }
    }

    /// A quorum read of the agents' keys: whether etcd answers, who runs, who expires.
    async fn probe(&self) {
        let key = format!("{}agents/", self.prefix);
        let oldest_first = GetOptions::new().with_prefix().with_sort(
            etcd_client::SortTarget::Create,
            etcd_client::SortOrder::Ascend,
        );
        let read = timed("reading the agents", CALL_TIMEOUT, || {
            let (mut client, key, options) =
                (self.client.clone(), key.clone(), oldest_first.clone());
            async move { client.get(key, Some(options)).await }
        })
        .await;
        let mut h = self.health.lock().expect("health lock");
        match read {
            Ok(resp) => {
                h.probe = None;
                let mut agents: Vec<AgentSeen> = resp
                    .kvs()
                    .iter()
                    .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
                    .collect();
                if let Some(first) = agents.first_mut() {
                    first.expiring = true;
                }
                // This very agent (a second one refused its name reads the same name), and
                // registered now.
                let first_is_me = agents
                    .first()
                    .is_some_and(|a| a.name == self.me.name && a.instance == self.me.instance);
                self.status.send_modify(|s| {
                    s.agents = agents;
                    s.expiring = first_is_me && s.lease.is_some();
                    // With the time it answered, in one publication: a refusal is never
                    // stamped between the two.
                    s.unanswered = None;
                    s.answered_at = Some(Instant::now());
                });
            }
            Err(why) => {
                self.metrics.errors.inc();
                if h.probe.is_none() {
                    tracing::warn!(error = %why, "etcd does not answer");
                }
                h.probe = Some(why);
                // Without etcd nobody can tell who expires: nobody does.
                self.status.send_modify(|s| s.expiring = false);
            }
        }
        publish_health(&self.status, &h);
    }
}
