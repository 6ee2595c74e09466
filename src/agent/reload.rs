//! The reload path: the changes of a group that add or remove a frontend, coalesced into one
//! validated, confirmed reload, with the culprits of a failed one found and refused alone; and
//! the start-time reload when the managed file's listeners are not what this agent renders.

use super::refused::{in_place, judged_behind};
use super::*;

impl Owner {
    /// At start: when the managed file's listeners are not what this agent renders for the same
    /// state (it was started with another `--frontend-bind`, a new version renders frontends
    /// differently, or it died between a settings reload and storing it), HAProxy serves the old
    /// ones, and nothing but a reload changes them: one validated, confirmed reload, rolled back
    /// on failure and then retried on the timer (see [`Self::retry_listeners`]). Servers alone
    /// differing is the first reconcile's job, with no reload.
    pub(super) async fn reload_if_listeners_changed(&mut self) {
        if self.state.frontends.is_empty() {
            return;
        }
        let text = render_managed(&self.state, &self.render);
        let on_disk = {
            let files = self.files.lock().await;
            files.files.read_managed().await.ok().flatten()
        };
        if crate::render::same_listeners(&on_disk.unwrap_or_default(), &text) {
            return;
        }
        self.client.disconnect();
        if self.client.show_info().await.is_err() {
            // HAProxy is away: it reads the file the writer leaves when it starts.
            return;
        }
        tracing::info!("the managed file's frontends differ from what this agent renders for the same state (another --frontend-bind, a new version, or a settings change not stored): reloading once");
        self.reload_listeners(REPAIR_FIRST).await;
    }

    /// Reloads with every frontend as the state renders it; on failure keeps why, and when to
    /// try again (`backoff`, doubling up to a minute), in [`Owner::listeners_retry`]: the writer
    /// puts the new file in place meanwhile, so neither the file nor a later start would tell.
    pub(super) async fn reload_listeners(&mut self, backoff: Duration) {
        self.files.lock().await.written = None;
        let ports: BTreeSet<u16> = self.state.frontends.keys().copied().collect();
        match self.reload_to_current(&ports).await {
            Ok(()) => {
                if self.listeners_retry.take().is_some() {
                    tracing::info!("HAProxy took the frontends as this agent renders them");
                }
            }
            Err(why) => {
                self.metrics.reload_failures.inc();
                tracing::error!(error = %why, retry_in_s = backoff.as_secs(), "could not reload with the frontends as this agent renders them; HAProxy keeps serving the previous ones");
                self.listeners_retry = Some(Retry {
                    error: format!(
                        "HAProxy serves frontends other than the agent renders: a reload to them failed: {why}"
                    ),
                    next: Instant::now() + backoff,
                    backoff,
                });
            }
        }
    }

    /// The timer's part: a failed start-time reload of the listeners, tried again when due.
    pub(super) async fn retry_listeners(&mut self) {
        let Some(r) = &self.listeners_retry else {
            return;
        };
        if Instant::now() < r.next {
            return;
        }
        let backoff = (r.backoff * 2).min(REPAIR_MAX);
        self.reload_listeners(backoff).await;
    }

    /// The group's changes that add or remove a frontend join the queue of reload sets, all in
    /// one set: one reload for all of them. The owner loop runs one set per turn
    /// ([`Self::next_reload_set`]) and reads its channel in between, so runtime changes to
    /// existing frontends wait for at most the one reload in flight.
    ///
    /// A new frontend on a port something on this host already listens on is refused here, at
    /// once: it would fail the whole reload (after HAProxy's own bind retries, about 2 s), or,
    /// with `SO_REUSEPORT` on both sides, share the port with it.
    ///
    /// Before that, a port HAProxy's own configuration binds, or the agent's API port, is
    /// refused for what it is ([`ApplyError::PortOwned`], see `ports.rs`): the files are read
    /// once for the group.
    pub(super) fn queue_reloads(&mut self, group: Vec<(Change, Requester)>) {
        let creates = |state: &DesiredState, change: &Change| {
            matches!(
                change,
                Change::PutServer { .. } | Change::PutFrontend { .. }
            ) && !state.frontends.contains_key(&change.frontend_port())
        };
        let new_ports: BTreeSet<u16> = group
            .iter()
            .filter(|(c, _)| creates(&self.state, c))
            .map(|(c, _)| c.frontend_port())
            .collect();
        let owned = if new_ports.is_empty() {
            Default::default()
        } else {
            self.owned_ports(&new_ports)
        };
        let mut checked = BTreeSet::new();
        let mut in_use: std::collections::BTreeMap<u16, String> = Default::default();
        let mut set = Vec::new();
        for (change, reply) in group {
            let port = change.frontend_port();
            let creates = creates(&self.state, &change);
            if let Some(why) = owned.get(&port).filter(|_| creates) {
                tracing::info!(port, reason = %why, "refusing a new frontend on a port the agent does not own");
                let _ = reply.send(Err(ApplyError::PortOwned(why.clone())));
                continue;
            }
            // A suspect port may be our own HAProxy's still (a rollback that did not finish).
            let probe = self.host_checks && creates && !self.suspect_ports.contains(&port);
            if probe && checked.insert(port) {
                let binds = &self.render.frontend_binds;
                let v6only = self.render.v6only();
                if let Some(why) = binds.iter().find_map(|b| port_in_use(*b, port, v6only)) {
                    tracing::info!(port, reason = %why, "refusing a new frontend on a port in use");
                    in_use.insert(port, why);
                }
            }
            match in_use.get(&port) {
                Some(why) if creates => {
                    let _ = reply.send(Err(ApplyError::Rejected(why.clone())));
                }
                _ => set.push((change, reply)),
            }
        }
        if !set.is_empty() {
            self.reload_sets.push_back(set);
        }
    }

    /// Runs the first queued reload set: applied together, rendered, validated, reloaded,
    /// confirmed (every new frontend open), then stored with one fsync. Any failure puts back
    /// the previous file and leaves HAProxy serving as before.
    ///
    /// A reload that fails is retried, as the next set, without the changes it blames: HAProxy's
    /// bind error names the frontend and the address, so a taken port fails only its own
    /// requests (409 with HAProxy's words) and the rest go through in one more reload. A
    /// failure that blames none of them splits the set by port. Each run either answers a
    /// change or splits a set, so a queue ends after at most twice as many reloads as changes.
    pub(super) async fn next_reload_set(&mut self) {
        let Some(set) = self.reload_sets.pop_front() else {
            return;
        };
        // Fail at once when HAProxy is gone, rather than after the reload's deadline.
        self.client.disconnect();
        if let Err(e) = self.client.show_info().await {
            self.transport_failed(&e);
            for (_, reply) in set {
                let _ = reply.send(Err(ApplyError::Unavailable(e.to_string())));
            }
            return;
        }
        self.set_up(true);
        if self.store.is_none() {
            // Refused before HAProxy sees it, as on the runtime path.
            let why = self.closed_store_reason();
            for (_, reply) in set {
                let _ = reply.send(Err(ApplyError::Store(why.clone())));
            }
            return;
        }
        // etcd known to be away: refused before HAProxy reloads, not after a reload, a commit
        // that times out and a reload back. (Changes from etcd go on: they are stored.)
        if set.iter().any(|(_, r)| r.origin != Origin::Remote) {
            let etcd = self.store.as_ref().and_then(StateStore::etcd_status);
            if let Some(why) = self.store_down(etcd.as_ref()) {
                for (_, reply) in set {
                    let _ = reply.send(Err(ApplyError::StoreUnavailable(why.clone())));
                }
                return;
            }
        }
        let mut applied: Vec<(Change, Undo, Requester)> = Vec::new();
        // (place, port) of each applied change, and of those that changed the state.
        let mut places = Vec::new();
        let mut changing = Vec::new();
        let mut transitions = Vec::new();
        let mut reasons = Vec::new();
        let mut held = Vec::new();
        for (seq, (change, reply)) in set.into_iter().enumerate() {
            // Again: changes applied earlier (in this group, or this set) may have used up
            // the cap, or conflict with this one.
            if reply.origin == Origin::Client {
                if let Err(d) = self.check_policy(&change, reply.scope.as_deref()) {
                    held.push(Held {
                        seq,
                        change,
                        reply,
                        error: d.into(),
                    });
                    continue;
                }
            }
            let reason = self.state.reload_needed_for(&change);
            match self.state.apply_with_transition(&change) {
                Ok((effect, undo, transition)) => {
                    places.push((seq, change.frontend_port()));
                    if effect != Effect::Unchanged {
                        changing.push((seq, change.frontend_port()));
                    }
                    applied.push((change, undo, reply));
                    transitions.push(transition);
                    reasons.push(reason);
                }
                Err(c) => held.push(Held {
                    seq,
                    change,
                    reply,
                    error: c.into(),
                }),
            }
        }
        // As on the runtime path: a refusal judged on an earlier change of its frontend (a
        // second `DELETE /v1/frontends/P`: "no frontend") waits for that change's fate.
        let (behind, alone) = judged_behind(held, &changing);
        for h in alone {
            let _ = h.reply.send(Err(h.error));
        }
        if applied.is_empty() {
            return;
        }
        let ports: BTreeSet<u16> = applied.iter().map(|(c, _, _)| c.frontend_port()).collect();
        let result = self.reload_to_current(&ports).await;
        if let Err(msg) = result {
            for (_, undo, _) in applied.iter().rev() {
                self.state.undo(undo.clone());
            }
            self.metrics.reload_failures.inc();
            let named = ports_named_in(&msg, &ports);
            let mut rest = Vec::new();
            for ((change, _, reply), (seq, _)) in applied.into_iter().zip(&places) {
                let blamed = named.contains(&change.frontend_port());
                if blamed || ports.len() == 1 {
                    let _ = reply.send(Err(ApplyError::Rejected(msg.clone())));
                } else {
                    rest.push((*seq, change, reply));
                }
            }
            // Judged again on the state as it is (each goes with its frontend's set).
            let rest = in_place(rest, behind);
            if rest.is_empty() {
                return;
            }
            if named.is_empty() {
                // Nothing says which: one reload per frontend from here on.
                let mut by_port: std::collections::BTreeMap<u16, Vec<(Change, Requester)>> =
                    std::collections::BTreeMap::new();
                for (change, reply) in rest {
                    by_port
                        .entry(change.frontend_port())
                        .or_default()
                        .push((change, reply));
                }
                for set in by_port.into_values().rev() {
                    self.reload_sets.push_front(set);
                }
            } else {
                self.reload_sets.push_front(rest);
            }
            return;
        }
        let changes: Vec<Change> = applied
            .iter()
            .filter(|(_, _, r)| r.origin != Origin::Remote)
            .map(|(c, _, _)| c.clone())
            .collect();
        if let Err(e) = self.store_commit(&changes).await {
            // HAProxy now runs frontends the store does not have: take them back out. The
            // file must be written again although its generation is not newer than the
            // one just installed (the undo took the generation back).
            for (_, undo, _) in applied.iter().rev() {
                self.state.undo(undo.clone());
            }
            self.reopen_store();
            self.files.lock().await.written = None;
            if let Err(msg) = self.reload_to_current(&ports).await {
                tracing::error!(error = %msg, "could not take back frontends after the store failed; the timer will");
                self.suspect_ports.extend(ports.iter().copied());
            }
            let refused = match e {
                // Lost to another agent's commit: what won first, then this set again on top
                // (each its own set, so what etcd holds is never undone with what it refused).
                CommitError::Conflict(current) => {
                    let mut again = Vec::with_capacity(applied.len());
                    for ((change, _, reply), (seq, port)) in applied.into_iter().zip(&places) {
                        if let Some(reply) = self.lost_once(reply, *port) {
                            again.push((*seq, change, reply));
                        }
                    }
                    let again = in_place(again, behind);
                    if !again.is_empty() {
                        self.reload_sets.push_front(again);
                    }
                    let current = self.remote_group(current);
                    self.reload_sets.push_front(current);
                    return;
                }
                CommitError::Unavailable(why) => {
                    self.store_unavailable = Some((why.clone(), Instant::now()));
                    ApplyError::StoreUnavailable(why)
                }
                CommitError::Failed(e) => ApplyError::Store(e),
            };
            let replies = applied.into_iter().map(|(_, _, r)| r);
            for reply in replies.chain(behind.into_iter().map(|h| h.reply)) {
                let _ = reply.send(Err(refused.clone()));
            }
            return;
        }
        for h in behind {
            let _ = h.reply.send(Err(h.error));
        }
        self.metrics.servers.set(self.state.server_count() as i64);
        self.publish_desired();
        // New workers start from the file: put runtime-only details (drain) back.
        self.reconcile().await;
        let generation = self.state.generation;
        self.publish();
        for (((_, _, reply), transition), reload_for) in
            applied.into_iter().zip(transitions).zip(reasons)
        {
            // A change that came along with another of its port (which needed the reload)
            // says so too: it reached HAProxy by this reload.
            let _ = reply.send(Ok(ApplyOk {
                applied: Applied::Reload,
                generation,
                refused: None,
                transition,
                reload_for: reload_for.or(Some("another change of this frontend")),
            }));
        }
    }

    /// Reloads HAProxy (counted), then drops our CLI connection: it belongs to the old worker.
    pub(super) async fn reload_haproxy(&mut self) -> Result<(), HaproxyError> {
        self.metrics.reloads.inc();
        let reloaded = self
            .reloader
            .reload_handing_over(
                self.reload_deadline,
                self.haproxy_log.as_deref(),
                self.server_state.as_ref(),
                &self.state,
            )
            .await;
        self.client.disconnect();
        if reloaded.is_ok() {
            // The new worker starts from the file, which holds no deleted server: what was
            // draining stays with the old worker, which ends with its last connection (or at
            // `hard-stop-after`).
            self.draining.clear();
        }
        reloaded.map(|_| ())
    }

    /// Makes HAProxy's configuration match `self.state` through a reload, confirmed by every
    /// frontend of `ports` that the state has opening (not those the reload takes out); on any
    /// failure the previous file is put back and, if HAProxy already took the new one, reloaded
    /// again, so HAProxy keeps serving as before.
    pub(super) async fn reload_to_current(&mut self, ports: &BTreeSet<u16>) -> Result<(), String> {
        let text = render_managed(&self.state, &self.render);
        let files = self.files.clone();
        let mut files = files.lock().await;
        let written_before = files.written;
        let previous = match files
            .install(&text, self.state.generation)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(previous) => previous,
            // Already there (not expected: this generation is new); what to go back to is
            // whatever the file holds.
            None => files.files.read_managed().await.ok().flatten(),
        };
        let failure = match self.reload_haproxy().await {
            // HAProxy said it did not load the new config: the old worker serves the old one,
            // and putting the file back is all that is needed. Any other failure (a timeout)
            // may still have reloaded: reload back too.
            Err(e) => {
                let took_it = !matches!(e, HaproxyError::ReloadFailed { .. });
                Some((e.to_string(), took_it))
            }
            // Confirmed by the frontends opening, those the state has (not those this reload
            // takes back out).
            Ok(_) => {
                let mut failed = None;
                for port in ports
                    .iter()
                    .filter(|p| self.state.frontends.contains_key(p))
                {
                    if let Err(e) = wait_frontend_open(
                        &mut self.client,
                        frontend_name(*port).as_str(),
                        self.reload_deadline,
                    )
                    .await
                    {
                        // The frontend not opening decides; HAProxy's command line only says
                        // why, when it can (a diagnosis, never a verdict of its own).
                        let managed = files.files.managed.clone();
                        let why = match self.haproxy_lacks_our_file(&managed).await {
                            Some(cause) => format!("{e}: {cause}"),
                            None => e.to_string(),
                        };
                        failed = Some((why, true));
                        break;
                    }
                }
                failed
            }
        };
        let Some((msg, took_new_config)) = failure else {
            return Ok(());
        };
        tracing::warn!(error = %msg, "reload failed; restoring the previous configuration");
        // The file goes back to what it held; the writer may write newer states again.
        files.written = written_before;
        if let Err(e) = files.files.restore(previous).await {
            tracing::error!(error = %e, "could not restore the previous managed configuration");
        } else if took_new_config {
            if let Err(e) = self.reload_haproxy().await {
                tracing::error!(error = %e, "could not reload the previous configuration back");
                self.suspect_ports.extend(ports.iter().copied());
            }
        }
        Err(msg)
    }
}

/// Why a new frontend cannot have `port` on `bind`: something on this host listens there
/// already. Checked by binding it (without SO_REUSEPORT, so a listener that has it, such as
/// one of HAProxy's own frontends, counts too); only "address in use" counts: an agent that
/// may not bind a low port leaves that to HAProxy, which may.
fn port_in_use(bind: std::net::IpAddr, port: u16, v6only: bool) -> Option<String> {
    let addr = std::net::SocketAddr::from((bind, port));
    match try_bind(addr, v6only) {
        Err(nix::errno::Errno::EADDRINUSE) => Some(format!(
            "cannot bind {addr}: address already in use; another program, or a frontend of \
             HAProxy's own configuration, listens on port {port} on this host"
        )),
        _ => None,
    }
}

/// Binds `addr` and lets it go, as HAProxy would bind it: `SO_REUSEADDR` (so connections
/// of an old listener in TIME_WAIT do not count), and an IPv6 address `v6only` when the managed
/// file binds it so (then an IPv4 listener on the port does not count against `[::]`).
fn try_bind(addr: std::net::SocketAddr, v6only: bool) -> nix::Result<()> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    let family = if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &v6only)?;
    }
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )
}

/// The port at the start of `s`, and what follows it.
fn leading_port(s: &str) -> Option<(u16, &str)> {
    let len = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    Some((s[..len].parse().ok()?, &s[len..]))
}

/// The frontend ports among `ports` that a reload failure blames: only HAProxy's bind error
/// lines count (`Binding [managed.cfg:11] for frontend fe_8443: protocol tcpv4: cannot bind
/// socket (Address already in use) for [127.0.0.1:8443].`), read for the frontend's name and
/// the address at the end. Warnings elsewhere in a 2.7+ report name every frontend
/// (`'option httplog' not usable with frontend 'fe_8080'`), and `[file:line]` is no address.
fn ports_named_in(message: &str, ports: &BTreeSet<u16>) -> BTreeSet<u16> {
    let mut named = BTreeSet::new();
    for line in message.lines().filter(|l| l.contains("cannot bind socket")) {
        if let Some((_, address)) = line.rsplit_once(" for [") {
            let host_port = address.split(']').next().unwrap_or_default();
            if let Some((_, port)) = host_port.rsplit_once(':') {
                if let Some((port, "")) = leading_port(port) {
                    named.insert(port);
                }
            }
        }
        if let Some((_, rest)) = line.split_once("for frontend fe_") {
            if let Some((port, after)) = leading_port(rest) {
                if after.starts_with(':') {
                    named.insert(port);
                }
            }
        }
    }
    named.retain(|p| ports.contains(p));
    named
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port whose last connection is in TIME_WAIT is free to HAProxy (which binds with
    /// SO_REUSEADDR), so the probe must not call it in use; a listening port is.
    #[test]
    fn the_probe_binds_as_haproxy_does() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ip = addr.ip();
        assert!(port_in_use(ip, addr.port(), false).is_some(), "listening");
        // A connection accepted and closed by the listener's side first: TIME_WAIT on its port.
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (served, _) = listener.accept().unwrap();
        drop(served);
        drop(listener);
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut &client, &mut buf);
        drop(client);
        assert_eq!(port_in_use(ip, addr.port(), false), None, "TIME_WAIT only");
    }

    #[test]
    fn a_reload_failure_names_its_ports() {
        let ports: BTreeSet<u16> = [80, 8080, 8443, 9000].into();
        let bind = "[ALERT]    (24824) : Binding [/x/managed.cfg:80] for frontend fe_8443: \
                    protocol tcpv4: cannot bind socket (Address already in use) for [127.0.0.1:8443].";
        assert_eq!(
            ports_named_in(bind, &ports),
            [8443].into(),
            "not the line number 80"
        );
        let v6 = "[ALERT] (1) : Binding [m.cfg:3] for frontend fe_9000: protocol tcpv6: \
                  cannot bind socket (Address already in use) for [:::9000].";
        assert_eq!(ports_named_in(v6, &ports), [9000].into());
        // A 2.7+ report with warnings naming every frontend blames only the bind error's.
        let report = format!(
            "Success=0\n--\n[WARNING] (1) : config : 'option httplog' not usable with frontend \
             'fe_8080' (needs 'mode http'). Falling back to 'option tcplog'.\n\
             [WARNING] (1) : config : log format ignored for frontend 'fe_80' since it has no log \
             address.\n{bind}\n[ALERT] (1) : [haproxy.main()] Some protocols failed to start \
             their listeners! Exiting.\n"
        );
        assert_eq!(ports_named_in(&report, &ports), [8443].into());
        // Ports not in the set, and other failures, blame nothing.
        let other =
            "Binding [m.cfg:9] for frontend fe_7000: cannot bind socket (x) for [127.0.0.1:7000].";
        assert_eq!(ports_named_in(other, &ports), BTreeSet::new());
        assert_eq!(
            ports_named_in("[ALERT] some other failure", &ports),
            BTreeSet::new()
        );
    }
}
