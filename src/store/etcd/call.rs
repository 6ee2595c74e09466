//! Calls to etcd: each with a deadline, made again on another member while the one that answered
//! cannot; connecting; reading every frontend.

use super::*;

pub(super) fn etcd_error(what: &str, e: impl std::fmt::Display) -> String {
    format!("etcd: {what}: {e}")
}

/// `call` with a deadline, its error in words naming etcd. Made again while it fails for a
/// reason another member may not have (a member down: the client's balancer keeps picking it
/// for a while; a member without a leader), until the deadline: each call here is a read, a
/// write of this agent's own keys, or a transaction guarded by revisions, which a repeat
/// cannot apply twice.
pub(super) async fn timed<T, F, Fut>(what: &str, limit: Duration, mut call: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if another_member_may_answer(&e) && left > RETRY_PAUSE => {
                tracing::debug!(error = %e, "etcd: {what}: trying again");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Ok(Err(e)) => return Err(etcd_error(what, e)),
            Err(_) => {
                return Err(etcd_error(
                    what,
                    format!("no answer within {} s (no quorum?)", limit.as_secs()),
                ))
            }
        }
    }
}

/// A transaction through [`timed`].
pub(super) async fn txn(
    client: &Client,
    what: &str,
    limit: Duration,
    txn: Txn,
) -> Result<etcd_client::TxnResponse, String> {
    timed(what, limit, || {
        let (mut client, txn) = (client.clone(), txn.clone());
        async move { client.txn(txn).await }
    })
    .await
}

/// The largest answer read from etcd: every frontend at once (gRPC's default, 4 MiB, is about
/// 35 frontends of 1,000 servers each).
pub(super) const MAX_ANSWER: usize = 256 << 20;

/// Pause between two tries of one call ([`timed`]).
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Whether `e` is about the member or the connection that answered, not the request.
fn another_member_may_answer(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        _ => false,
    }
}

/// A state read from etcd as the frontends it holds, each at its mod revision.
pub(super) fn remote_frontends(state: &DesiredState, revision: i64) -> Vec<RemoteFrontend> {
    state
        .frontends
        .iter()
        .map(|(port, fe)| RemoteFrontend {
            port: *port,
            spec: Some((**fe).clone()),
            revision: state.revisions.of(*port).unwrap_or(revision),
        })
        .collect()
}

/// One frontend's value, checked as the journal checks what it reads back.
pub(super) fn decode_frontend(value: &[u8]) -> Result<FrontendSpec, String> {
    let spec: FrontendSpec = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    Ok(spec)
}

/// The port of a `frontends/<port>` key (the prefix already taken off).
pub(super) fn port_of(rest: &str) -> Option<u16> {
    rest.parse().ok()
}

pub(super) async fn connect(options: &EtcdOptions) -> Result<Client, String> {
    let mut connect = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_timeout(COMMIT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), CALL_TIMEOUT)
        .with_keep_alive_while_idle(true)
        // A member cut off from the others refuses at once instead of serving stale reads
        // and a watch that never moves.
        .with_require_leader(true)
        // etcd forgets its login tokens when a member restarts: log in again, not 503 forever.
        .with_auto_token_refresh(true);
    if let Some((user, password)) = &options.user {
        connect = connect.with_user(user.clone(), password.clone());
    }
    if options.ca_pem.is_some() || options.identity.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &options.ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &options.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        connect = connect.with_tls(tls);
    }
    let endpoints = options.endpoints.join(",");
    match tokio::time::timeout(
        COMMIT_TIMEOUT,
        Client::connect(&options.endpoints, Some(connect)),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(etcd_error(&format!("connecting to {endpoints}"), e)),
        Err(_) => Err(etcd_error(
            &format!("connecting to {endpoints}"),
            format!("no answer within {} s", COMMIT_TIMEOUT.as_secs()),
        )),
    }
}

/// Every frontend under `prefix`, and the revision they were read at. A value lbagent cannot
/// read is left out and counted, as the watch does: one bad key must not stop every agent.
pub(super) async fn read_all(
    client: &Client,
    prefix: &str,
    metrics: &EtcdMetrics,
) -> Result<(DesiredState, i64), String> {
    let key = format!("{prefix}frontends/");
    let resp = timed("reading the frontends", COMMIT_TIMEOUT, || {
        let (client, key) = (client.clone(), key.clone());
        async move {
            client
                .kv_client()
                .max_decoding_message_size(MAX_ANSWER)
                .get(key, Some(GetOptions::new().with_prefix()))
                .await
        }
    })
    .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut state = DesiredState::default();
    for kv in resp.kvs() {
        let name = String::from_utf8_lossy(kv.key());
        let Some(port) = name.strip_prefix(key.as_str()).and_then(port_of) else {
            tracing::warn!(key = %name, "not a frontend's key; ignored");
            continue;
        };
        match decode_frontend(kv.value()) {
            Ok(spec) => {
                state.frontends.insert(port, Arc::new(spec));
                state.revisions.set_present(port, kv.mod_revision());
            }
            Err(e) => {
                metrics.errors.inc();
                tracing::error!(port, error = %e, "etcd holds a frontend lbagent cannot read; ignored");
            }
        }
    }
    state.generation = state.frontends.len() as u64;
    Ok((state, revision))
}
