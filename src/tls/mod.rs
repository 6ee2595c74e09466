//! TLS for the agent's API, both ends, on rustls with the `ring` provider: the PEM files, the
//! protocol versions (1.2 and 1.3 only), the server's reloadable certificate ([`server`]) and
//! the directory watch that reloads it ([`watch`]), managed mode's self-signed certificate
//! ([`self_signed`]) and `lbctl`'s client configuration ([`client`]).

pub mod client;
pub mod self_signed;
pub mod server;
pub mod watch;

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

pub use server::{ServerFiles, ServerTls};

/// TLS 1.2 and 1.3: nothing older is offered or accepted.
pub const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The one application protocol the API speaks.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A certificate file larger than this is not one (a long chain is a few dozen KiB).
const MAX_CERT_FILE: u64 = 1024 * 1024;

/// A private key file larger than this is not one.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// The crypto provider of both ends, chosen here so the process never depends on a default
/// being installed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file (a leaf and its chain, or a CA bundle); `what` names
/// the flag in errors. A file with no certificate in it is an error.
pub fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_bounded(path, MAX_CERT_FILE).map_err(|e| format!("{what} {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no certificate in it (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1), refusing a file group or others may
/// read, as the keys file is refused.
pub fn read_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    let text = crate::secret_file::read(path, MAX_KEY_FILE).map_err(|e| format!("{what} {e}"))?;
    PrivateKeyDer::from_pem_slice(text.as_bytes())
        .map_err(|e| format!("{what} {}: no PEM private key in it: {e}", path.display()))
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    crate::secret_file::read_regular(path, max).map_err(|e| e.to_string())
}

/// The SHA-256 fingerprint of a DER certificate, as `openssl x509 -fingerprint -sha256`
/// prints it (`AB:CD:...`).
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = Sha256::digest(cert.as_ref());
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The leaf's notAfter, in Unix seconds.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<i64, String> {
    validity(cert).map(|(_, not_after)| not_after)
}

/// The certificate's notBefore and notAfter, in Unix seconds.
pub fn validity(cert: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let v = parsed.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}
