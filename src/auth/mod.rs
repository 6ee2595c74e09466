//! Request authentication for the agent's HTTP API: HMAC-SHA256 signed requests with a
//! timestamp window and a nonce cache against replay, and the keys file the secrets come from.
//!
//! It takes plain values (method, path, header values, body bytes, the current time), not HTTP
//! types, so it is testable alone; the HTTP layer extracts the headers and calls
//! [`Verifier::verify`], answering 401 on any [`AuthFailure`].
//!
//! # Wire format
//!
//! - `X-Lbagent-Key`: key id, optional, defaults to `default`.
//! - `X-Lbagent-Timestamp`: unix seconds, decimal.
//! - `X-Lbagent-Nonce`: 16–64 characters of `[A-Za-z0-9_-]`, unique per key inside the window.
//! - `X-Lbagent-Signature`: `sha256=<lowercase hex>` of HMAC-SHA256, keyed with the key's
//!   secret, over [`string_to_sign`]:
//!   `METHOD "\n" PATH_WITH_QUERY "\n" TIMESTAMP "\n" NONCE "\n" hex(SHA-256(body))`.
//!
//! # Keys file
//!
//! TOML, one `key_id = "secret"` per line (quote ids that contain `.`: `"ci.2" = "..."`, or
//! TOML reads them as tables), or, for a key with a scope ([`crate::policy::Scope`]), a table:
//!
//! ```toml
//! [mqtt-sidecar]
//! secret = "..."
//! frontend_ports = "1883,8883"   # required: the ports it may use (--allow-frontend-ports syntax)
//! nodes = "node-*"               # optional: node names it may register (`*`, `?`, commas)
//! node_cidrs = "10.0.0.0/8"      # optional: addresses its servers may point at
//! may_delete_frontend = false    # optional, default false: may it remove a whole frontend
//! ```
//!
//! The secret is the string's bytes as written (it is not hex-decoded), at least 16 bytes. The file must not be readable or writable by group or
//! others. Several keys may be live at once, so a key is rotated by adding the new one,
//! moving clients over and deleting the old one, then calling [`Verifier::reload`] (on SIGHUP).
//!
//! # Layout
//!
//! - [`keys`]: the keys file — loading, validating, generating.
//! - signing (here): the string to sign, the signature, a client's headers.
//! - [`verify`]: the [`Verifier`] — header checks, the replay window, the nonce cache.

mod keys;
mod verify;

pub use keys::{Keys, KeysError};
pub use verify::{
    AuthFailure, AuthFailureReason, AuthHeaders, Authenticated, CheckedHead, Verifier,
};

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Header carrying the key id; optional, [`DEFAULT_KEY_ID`] when absent.
pub const HEADER_KEY: &str = "X-Lbagent-Key";
/// Header carrying the request time in unix seconds.
pub const HEADER_TIMESTAMP: &str = "X-Lbagent-Timestamp";
/// Header carrying the per-request nonce.
pub const HEADER_NONCE: &str = "X-Lbagent-Nonce";
/// Header carrying `sha256=<lowercase hex HMAC>`.
pub const HEADER_SIGNATURE: &str = "X-Lbagent-Signature";
/// Key id used when a request has no `X-Lbagent-Key` header.
pub const DEFAULT_KEY_ID: &str = "default";
/// Default allowed clock difference between client and agent, either way.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
/// Most nonces remembered at once; when full, new requests are refused (see [`Verifier`]).
pub const MAX_NONCES: usize = 1_000_000;
/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

pub(crate) const SIGNATURE_PREFIX: &str = "sha256=";
pub(crate) const NONCE_MIN: usize = 16;
pub(crate) const NONCE_MAX: usize = 64;
pub(crate) const KEY_ID_MAX: usize = 64;
/// A keys file larger than this is refused rather than read.
pub(crate) const MAX_KEYS_FILE: u64 = 1 << 20;

pub(crate) fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(io::Error::other)?;
    Ok(buf)
}

/// Lowercase hex SHA-256 of the body (of the empty body when there is none).
pub fn body_digest(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The text that is signed: method, path with query, timestamp, nonce and body digest, joined
/// with `\n`.
pub fn string_to_sign(
    method: &str,
    path_with_query: &str,
    timestamp: &str,
    nonce: &str,
    body_sha256_hex: &str,
) -> String {
    format!("{method}\n{path_with_query}\n{timestamp}\n{nonce}\n{body_sha256_hex}")
}

pub(crate) fn mac(secret: &[u8], string_to_sign: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(string_to_sign.as_bytes());
    mac
}

/// The `X-Lbagent-Signature` value for a request: `sha256=<lowercase hex HMAC-SHA256>`.
pub fn sign(
    secret: &[u8],
    method: &str,
    path_with_query: &str,
    timestamp: u64,
    nonce: &str,
    body: &[u8],
) -> String {
    let sts = string_to_sign(
        method,
        path_with_query,
        &timestamp.to_string(),
        nonce,
        &body_digest(body),
    );
    format!(
        "{SIGNATURE_PREFIX}{}",
        hex::encode(mac(secret, &sts).finalize().into_bytes())
    )
}

/// The four auth headers for a request, with a fresh random nonce, for clients (lbctl).
pub fn signed_headers(
    key_id: &str,
    secret: &[u8],
    method: &str,
    path_with_query: &str,
    body: &[u8],
    now_unix: u64,
) -> Vec<(&'static str, String)> {
    let nonce = fresh_nonce();
    let signature = sign(secret, method, path_with_query, now_unix, &nonce, body);
    vec![
        (HEADER_KEY, key_id.to_string()),
        (HEADER_TIMESTAMP, now_unix.to_string()),
        (HEADER_NONCE, nonce),
        (HEADER_SIGNATURE, signature),
    ]
}

/// 32 hex characters. A nonce needs to be unique, not secret, so if the system's random source
/// fails it falls back to hashing the clock, the process id and a counter.
fn fresh_nonce() -> String {
    if let Ok(bytes) = random_bytes::<16>() {
        return hex::encode(bytes);
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.update(nanos.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests;
