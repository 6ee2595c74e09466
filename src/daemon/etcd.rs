//! Start-up with etcd: `--etcd` and its companions checked, this agent's instance id, and the
//! store opened (the journal without `--etcd`; seeded from it with `--seed-from-local`).

use std::net::SocketAddr;

use super::{BoxError, Settings};
use crate::metrics::Metrics;
use crate::model::DesiredState;
use crate::store::{EtcdOptions, EtcdStore, StateStore, Store};

/// The etcd options of `--etcd` and its companions, checked; `None` without `--etcd`.
pub(super) fn etcd_options(
    settings: &Settings,
    listen: SocketAddr,
    state_dir: &std::path::Path,
) -> Result<Option<EtcdOptions>, BoxError> {
    let Some(urls) = &settings.etcd else {
        let stray = [
            ("--etcd-prefix", settings.etcd_prefix.is_some()),
            ("--etcd-ca-file", settings.etcd_ca_file.is_some()),
            ("--etcd-cert", settings.etcd_cert.is_some()),
            ("--etcd-key", settings.etcd_key.is_some()),
            ("--etcd-user", settings.etcd_user.is_some()),
            (
                "--etcd-password-file",
                settings.etcd_password_file.is_some(),
            ),
            ("--seed-from-local", settings.seed_from_local),
        ];
        if let Some((flag, _)) = stray.iter().find(|(_, given)| *given) {
            return Err(format!("{flag} needs --etcd").into());
        }
        return Ok(None);
    };
    let endpoints: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect();
    if endpoints.is_empty() {
        return Err("--etcd: no URL given".into());
    }
    for url in &endpoints {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("--etcd: `{url}` is not an http:// or https:// URL").into());
        }
    }
    let prefix = settings
        .etcd_prefix
        .clone()
        .unwrap_or_else(|| "/lbagent/".into());
    if prefix.is_empty() || prefix.contains(['\n', ';']) {
        return Err(format!("--etcd-prefix: `{prefix}` is not a usable prefix").into());
    }
    let prefix = if prefix.ends_with('/') {
        prefix
    } else {
        format!("{prefix}/")
    };
    const MAX_PEM: u64 = 1 << 20;
    let ca_pem = match &settings.etcd_ca_file {
        Some(p) => Some(
            crate::secret_file::read_regular(p, MAX_PEM)
                .map_err(|e| format!("--etcd-ca-file {e}"))?,
        ),
        None => None,
    };
    let identity = match (&settings.etcd_cert, &settings.etcd_key) {
        (Some(c), Some(k)) => Some((
            crate::secret_file::read_regular(c, MAX_PEM).map_err(|e| format!("--etcd-cert {e}"))?,
            crate::secret_file::read(k, MAX_PEM)
                .map_err(|e| format!("--etcd-key {e}"))?
                .into_bytes(),
        )),
        (None, None) => None,
        _ => return Err("--etcd-cert and --etcd-key go together".into()),
    };
    let user = match (&settings.etcd_user, &settings.etcd_password_file) {
        (Some(u), Some(p)) => {
            let password = crate::secret_file::read(p, 4096)
                .map_err(|e| format!("--etcd-password-file {e}"))?;
            Some((
                u.clone(),
                password.trim_end_matches(['\r', '\n']).to_string(),
            ))
        }
        (None, None) => None,
        _ => return Err("--etcd-user and --etcd-password-file go together".into()),
    };
    let agent_name = match &settings.agent_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "lbagent".into()),
    };
    crate::model::NodeName::new(&agent_name)
        .map_err(|e| format!("--agent-name `{agent_name}`: {}", e.message))?;
    Ok(Some(EtcdOptions {
        endpoints,
        prefix,
        ca_pem,
        identity,
        user,
        agent_name,
        listen: listen.to_string(),
        instance: agent_instance(state_dir)?,
    }))
}

/// This agent's instance id among those sharing etcd: made once, kept in the state directory,
/// so a restarted agent is known for itself and another under the same name is not.
fn agent_instance(state_dir: &std::path::Path) -> Result<String, BoxError> {
    let path = state_dir.join("agent-instance");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display()).into()),
    }
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| format!("no random bytes for the instance id: {e}"))?;
    let id = hex::encode(bytes);
    std::fs::write(&path, format!("{id}\n")).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(id)
}

/// Opens the store: the journal in `state_dir`, or etcd (seeded from the journal when asked
/// and the prefix is empty).
pub(super) async fn open_store(
    state_dir: &std::path::Path,
    etcd: Option<EtcdOptions>,
    seed_from_local: bool,
    metrics: &Metrics,
) -> Result<(StateStore, DesiredState), BoxError> {
    let Some(options) = etcd else {
        let (store, state) = Store::open(state_dir)?;
        return Ok((StateStore::Journal(store), state));
    };
    let prefix = options.prefix.clone();
    let cache = state_dir.join(crate::store::etcd::CACHE_FILE);
    let (mut store, state) = EtcdStore::open(options.clone(), metrics.etcd.clone(), &cache).await?;
    if !seed_from_local {
        return Ok((StateStore::Etcd(Box::new(store)), state));
    }
    if let Some(why) = store.status().error {
        // Started from its local copy: it ran on etcd before, there is nothing to move.
        tracing::info!(error = %why, "--seed-from-local: etcd did not answer at start; not seeding");
        return Ok((StateStore::Etcd(Box::new(store)), state));
    }
    if !state.frontends.is_empty() {
        tracing::info!(
            prefix,
            frontends = state.frontends.len(),
            "--seed-from-local: etcd already holds frontends; not seeding"
        );
        return Ok((StateStore::Etcd(Box::new(store)), state));
    }
    // The journal is read and let go: its lock is not held while etcd is the store.
    let local = Store::open(state_dir)?.1;
    if local.frontends.is_empty() {
        tracing::info!("--seed-from-local: the local journal holds no frontend; nothing to seed");
        return Ok((StateStore::Etcd(Box::new(store)), state));
    }
    match store.seed(&local).await {
        Ok(Some(revision)) => {
            tracing::info!(
                prefix,
                revision,
                frontends = local.frontends.len(),
                servers = local.server_count(),
                "seeded etcd from the local journal"
            );
            // Opened again, to start from what etcd holds now with its revisions (the first
            // watch would bring the seeded frontends as changes: a reload for nothing).
            store.close().await;
            let (store, state) = EtcdStore::open(options, metrics.etcd.clone(), &cache).await?;
            return Ok((StateStore::Etcd(Box::new(store)), state));
        }
        Ok(None) => tracing::info!(prefix, "--seed-from-local: another agent seeded etcd first"),
        // Starting on an empty etcd would take every frontend out of this VM's HAProxy.
        Err(e) => {
            let hint = if local.frontends.len() >= 128 {
                format!(
                    " (the journal holds {} frontends, one write each in one transaction: etcd \
                     refuses more than --max-txn-ops, 128 by default; raise it on the members \
                     for the move)",
                    local.frontends.len()
                )
            } else {
                String::new()
            };
            return Err(format!(
                "--seed-from-local: could not seed etcd: {e}{hint}; not started, the journal is \
                 as it was"
            )
            .into());
        }
    }
    Ok((StateStore::Etcd(Box::new(store)), state))
}
