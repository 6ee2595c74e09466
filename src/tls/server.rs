//! The API's server side: the certificate, key and optional client CA, loaded into a rustls
//! configuration that is swapped whole on a reload, so a connection is served by one
//! certificate from its handshake to its end and new connections get the new one. A reload
//! that fails keeps the current configuration serving and says so in the log and the metrics.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::{fingerprint, provider, read_certs, read_key, validity, ALPN_HTTP1, VERSIONS};
use crate::metrics::TlsMetrics;

/// How long a client may take to finish its handshake, waiting for its turn included; a slow
/// or silent one is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most handshakes in progress at once. rustls holds up to ~80 KiB for a client's unfinished
/// handshake messages, so this bounds what strangers can make it hold (~10 MiB) before any
/// request is read; the others wait in their socket's buffer, in the kernel.
pub const MAX_HANDSHAKES: usize = 128;

/// Most handshakes one address (as the connection caps count addresses) may have in progress
/// or waiting: one address cannot take every turn. More are closed at once.
pub const MAX_HANDSHAKES_PER_PEER: usize = 8;

/// Where the server's TLS material lives (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
#[derive(Clone, Debug)]
pub struct ServerFiles {
    /// The leaf certificate, then its chain, PEM.
    pub cert: PathBuf,
    /// The leaf's private key, PEM, mode 0600.
    pub key: PathBuf,
    /// When given, clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

impl ServerFiles {
    /// Every file, for the watch.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }
}

/// One loaded set of files.
struct Loaded {
    config: Arc<ServerConfig>,
    /// Of every DER the configuration was built from: a reload of the same files changes
    /// nothing and logs nothing.
    digest: [u8; 32],
    not_before: i64,
    not_after: i64,
    fingerprint: String,
}

impl Loaded {
    /// Whether clients would accept the leaf now, as far as its dates go.
    fn is_current(&self, now: i64) -> bool {
        (self.not_before..=self.not_after).contains(&now)
    }
}

/// The API's TLS configuration, reloadable.
pub struct ServerTls {
    files: ServerFiles,
    current: RwLock<Loaded>,
    metrics: TlsMetrics,
    handshakes: tokio::sync::Semaphore,
    /// Handshakes in progress or waiting, by address.
    handshaking: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One address's place among the handshakes, given back on drop.
struct PeerHandshake<'a> {
    tls: &'a ServerTls,
    peer: std::net::IpAddr,
}

impl Drop for PeerHandshake<'_> {
    fn drop(&mut self) {
        let mut by_peer = self
            .tls
            .handshaking
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                by_peer.remove(&self.peer);
            }
        }
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl ServerTls {
    /// Loads the files; an error here stops the start (nothing is serving yet to fall back on).
    pub fn load(files: ServerFiles, metrics: TlsMetrics) -> Result<ServerTls, String> {
        let loaded = build(&files)?;
        warn_if_not_current(&files, loaded.not_after);
        metrics.cert_expiry.set(loaded.not_after);
        metrics.reload_ok.set(1);
        Ok(ServerTls {
            files,
            current: RwLock::new(loaded),
            metrics,
            handshakes: tokio::sync::Semaphore::new(MAX_HANDSHAKES),
            handshaking: Default::default(),
        })
    }

    pub fn files(&self) -> &ServerFiles {
        &self.files
    }

    /// The SHA-256 fingerprint of the leaf certificate serving now.
    pub fn fingerprint(&self) -> String {
        self.read().fingerprint.clone()
    }

    /// Re-reads the files; `cause` says why in the log. On an error the current certificate
    /// keeps serving. Returns whether the configuration changed.
    pub fn reload(&self, cause: &str) -> bool {
        match build(&self.files) {
            Ok(new) => {
                let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
                if current.digest == new.digest {
                    self.metrics.reload_ok.set(1);
                    tracing::debug!(cause, "TLS files re-read; unchanged");
                    return false;
                }
                // Clients refuse a certificate out of its dates as a configuration error and
                // stop: a renewal gone wrong must not replace one they still accept.
                let now = crate::clock::unix_seconds() as i64;
                if !new.is_current(now) && current.is_current(now) {
                    drop(current);
                    self.metrics.reload_failures.inc();
                    self.metrics.reload_ok.set(0);
                    tracing::error!(
                        cause,
                        not_before = new.not_before,
                        not_after = new.not_after,
                        "TLS certificate not reloaded: the new one is expired or not valid yet; the current one keeps serving"
                    );
                    return false;
                }
                warn_if_not_current(&self.files, new.not_after);
                tracing::info!(
                    cause,
                    fingerprint = %new.fingerprint,
                    not_after = new.not_after,
                    "TLS certificate reloaded; new connections get it"
                );
                self.metrics.cert_expiry.set(new.not_after);
                self.metrics.reload_ok.set(1);
                *current = new;
                true
            }
            Err(e) => {
                self.metrics.reload_failures.inc();
                self.metrics.reload_ok.set(0);
                tracing::error!(
                    cause,
                    error = %e,
                    "TLS certificate not reloaded; the current one keeps serving"
                );
                false
            }
        }
    }

    /// The TLS handshake on a connection accepted from `peer` (an address as the connection
    /// caps count them), one of at most [`MAX_HANDSHAKES`] at once and
    /// [`MAX_HANDSHAKES_PER_PEER`] per address, within [`HANDSHAKE_TIMEOUT`].
    pub async fn accept(
        &self,
        stream: TcpStream,
        peer: std::net::IpAddr,
    ) -> io::Result<TlsStream<TcpStream>> {
        let _place = {
            let mut by_peer = self.handshaking.lock().unwrap_or_else(|e| e.into_inner());
            let n = by_peer.entry(peer).or_insert(0);
            if *n >= MAX_HANDSHAKES_PER_PEER {
                return Err(io::Error::other(format!(
                    "{MAX_HANDSHAKES_PER_PEER} handshakes from this address already"
                )));
            }
            *n += 1;
            PeerHandshake { tls: self, peer }
        };
        let handshake = async {
            let _turn = self.handshakes.acquire().await.map_err(io::Error::other)?;
            let acceptor = TlsAcceptor::from(self.read().config.clone());
            acceptor.accept(stream).await
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn build(files: &ServerFiles) -> Result<Loaded, String> {
    let certs = read_certs(&files.cert, "--tls-cert")?;
    let key = read_key(&files.key, "--tls-key")?;
    let leaf = &certs[0];
    let (not_before, not_after) =
        validity(leaf).map_err(|e| format!("--tls-cert {}: {e}", files.cert.display()))?;
    let fingerprint = fingerprint(leaf);
    let mut digest = Sha256::new();
    for c in &certs {
        digest.update(c.as_ref());
    }
    digest.update(key.secret_der());

    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs(path, "--tls-client-ca")? {
                digest.update(ca.as_ref());
                roots
                    .add(ca)
                    .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(_) => {
                "the key is not the certificate's (it does not match the leaf's public key)"
                    .to_string()
            }
            other => other.to_string(),
        };
        format!(
            "--tls-cert {} with --tls-key {}: {why}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        digest: digest.finalize().into(),
        not_before,
        not_after,
        fingerprint,
    })
}

/// An expired certificate still serves (clients will refuse it, and say why), but the log
/// says so first.
fn warn_if_not_current(files: &ServerFiles, not_after: i64) {
    let now = crate::clock::unix_seconds() as i64;
    if not_after < now {
        tracing::warn!(
            cert = %files.cert.display(),
            not_after,
            "the TLS certificate has expired; clients will refuse it"
        );
    }
}
