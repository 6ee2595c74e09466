//! Checking a signed request: headers, key, timestamp window, signature, and the nonce cache
//! against replay.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hmac::Mac;
use sha2::{Digest, Sha256};

use super::keys::is_key_id;
use super::{
    body_digest, mac, string_to_sign, Keys, KeysError, DEFAULT_KEY_ID, HEADER_KEY, HEADER_NONCE,
    HEADER_SIGNATURE, HEADER_TIMESTAMP, MAX_NONCES, NONCE_MAX, NONCE_MIN, SIGNATURE_PREFIX,
};
use crate::policy::Scope;

/// The auth header values of a request, as received (`None` when absent).
#[derive(Clone, Copy, Debug, Default)]
pub struct AuthHeaders<'a> {
    /// `X-Lbagent-Key`.
    pub key_id: Option<&'a str>,
    /// `X-Lbagent-Timestamp`.
    pub timestamp: Option<&'a str>,
    /// `X-Lbagent-Nonce`.
    pub nonce: Option<&'a str>,
    /// `X-Lbagent-Signature`.
    pub signature: Option<&'a str>,
}

/// A request that passed: the key that signed it, and that key's scope as it was when the
/// request was checked (a reload after that does not change what this request may do).
#[derive(Clone, Debug)]
pub struct Authenticated {
    pub key_id: String,
    /// `None`: an unscoped key, bounded by the global policy only.
    pub scope: Option<Arc<Scope>>,
}

/// Why a request was refused; every reason is a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailureReason {
    /// A required header is absent.
    MissingHeader,
    /// A header is present but not in the expected form.
    MalformedHeader,
    /// The key id is not among the live keys.
    UnknownKey,
    /// The timestamp is further from the agent's clock than the window allows.
    StaleTimestamp,
    /// The nonce was already used with this key inside the window (or the nonce cache is full).
    ReplayedNonce,
    /// The signature does not match.
    BadSignature,
}

impl AuthFailureReason {
    /// A stable snake_case name, for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailureReason::MissingHeader => "missing_header",
            AuthFailureReason::MalformedHeader => "malformed_header",
            AuthFailureReason::UnknownKey => "unknown_key",
            AuthFailureReason::StaleTimestamp => "stale_timestamp",
            AuthFailureReason::ReplayedNonce => "replayed_nonce",
            AuthFailureReason::BadSignature => "bad_signature",
        }
    }
}

impl fmt::Display for AuthFailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused request: the reason, and a message naming the header and what was wrong. The
/// message never holds a secret, nor echoes an unvalidated header value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthFailure {
    /// The category, for metrics.
    pub reason: AuthFailureReason,
    /// A human-readable explanation, safe to return to the client and to log.
    pub message: String,
}

impl AuthFailure {
    fn new(reason: AuthFailureReason, message: impl Into<String>) -> AuthFailure {
        AuthFailure {
            reason,
            message: message.into(),
        }
    }
}

/// Remembers (key id, nonce) pairs until their timestamp + window has passed.
///
/// Entries are a 128-bit SHA-256 prefix of the pair, to keep a full cache near 80 MB; a
/// collision needs ~2^64 entries, and only holders of a key can insert entries at all.
pub(super) struct NonceCache {
    /// Entry → the last second at which it must still be remembered.
    live: HashMap<[u8; 16], u64>,
    /// The same entries ordered by that second, to prune the oldest first.
    by_expiry: BTreeSet<(u64, [u8; 16])>,
    capacity: usize,
}

impl NonceCache {
    fn new(capacity: usize) -> NonceCache {
        NonceCache {
            live: HashMap::new(),
            by_expiry: BTreeSet::new(),
            capacity,
        }
    }

    fn entry(key_id: &str, nonce: &str) -> [u8; 16] {
        let mut h = Sha256::new();
        h.update(key_id.as_bytes());
        h.update([0u8]);
        h.update(nonce.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize()[..16]);
        out
    }

    /// Forgets entries whose last second is before `now`: a request carrying their timestamp
    /// would now be refused as stale anyway.
    fn prune(&mut self, now: u64) {
        while let Some(&(expiry, entry)) = self.by_expiry.first() {
            if expiry >= now {
                break;
            }
            self.by_expiry.pop_first();
            self.live.remove(&entry);
        }
    }

    fn contains(&self, entry: &[u8; 16]) -> bool {
        self.live.contains_key(entry)
    }

    fn is_full(&self) -> bool {
        self.live.len() >= self.capacity
    }

    fn insert(&mut self, entry: [u8; 16], expiry: u64) {
        if let Some(old) = self.live.insert(entry, expiry) {
            self.by_expiry.remove(&(old, entry));
        }
        self.by_expiry.insert((expiry, entry));
    }

    pub(super) fn len(&self) -> usize {
        self.live.len()
    }
}

/// Checks signed requests against the live keys. Shared by all connections (`&self`): the
/// keys sit behind a `RwLock` so [`Verifier::replace_keys`] can swap them, and the nonce cache
/// behind a `Mutex`.
///
/// The nonce cache holds at most [`MAX_NONCES`] entries. When it is full of live nonces, new
/// requests are refused (as [`AuthFailureReason::ReplayedNonce`], with a message saying the
/// cache is full) rather than forgetting a live nonce, which would open a replay hole.
pub struct Verifier {
    keys: RwLock<Keys>,
    window: u64,
    pub(super) nonces: Mutex<NonceCache>,
    /// Requests signed before this (unix seconds) are refused: the nonce cache lives in memory,
    /// so after a restart it cannot tell a replay of an earlier request from a new one.
    not_before: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field(
                "keys",
                &*self.keys.read().unwrap_or_else(|e| e.into_inner()),
            )
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier over these keys, accepting timestamps within `window` (whole seconds) of now
    /// either way.
    pub fn new(keys: Keys, window: Duration) -> Verifier {
        Verifier::with_nonce_capacity(keys, window, MAX_NONCES)
    }

    pub(super) fn with_nonce_capacity(keys: Keys, window: Duration, capacity: usize) -> Verifier {
        Verifier {
            keys: RwLock::new(keys),
            window: window.as_secs(),
            nonces: Mutex::new(NonceCache::new(capacity)),
            not_before: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Refuses requests signed before `unix_seconds`; the daemon sets its start time, so a
    /// request captured before a restart cannot be replayed after it.
    pub fn refuse_signed_before(&self, unix_seconds: u64) {
        self.not_before
            .store(unix_seconds, std::sync::atomic::Ordering::Relaxed);
    }

    /// Swaps in a new set of keys; a key not in it is revoked from the next request on.
    pub fn replace_keys(&self, keys: Keys) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    /// Re-reads the keys file and swaps its keys in, scopes included (for SIGHUP). On error the
    /// current keys and scopes stay. Returns the new key ids.
    pub fn reload(&self, path: &Path) -> Result<Vec<String>, KeysError> {
        let keys = Keys::load(path)?;
        let ids = keys.ids().map(str::to_string).collect();
        self.replace_keys(keys);
        Ok(ids)
    }

    /// The allowed clock difference, either way.
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window)
    }

    /// Checks what can be checked from the headers alone, before the body is read: headers
    /// present and well-formed → key known → timestamp within the window → nonce unused (it is
    /// not recorded here). [`Verifier::verify`] starts with this.
    pub fn check_head<'a>(
        &self,
        headers: &AuthHeaders<'a>,
        now_unix: u64,
    ) -> Result<CheckedHead<'a>, AuthFailure> {
        use AuthFailureReason::*;

        let missing =
            |name: &str| AuthFailure::new(MissingHeader, format!("missing header {name}"));
        let timestamp_raw = headers.timestamp.ok_or_else(|| missing(HEADER_TIMESTAMP))?;
        let nonce = headers.nonce.ok_or_else(|| missing(HEADER_NONCE))?;
        let signature_raw = headers.signature.ok_or_else(|| missing(HEADER_SIGNATURE))?;

        let key_id = headers.key_id.unwrap_or(DEFAULT_KEY_ID);
        if !is_key_id(key_id) {
            return Err(AuthFailure::new(
                MalformedHeader,
                format!("header {HEADER_KEY} must be 1 to 64 characters of [A-Za-z0-9_.-]"),
            ));
        }
        let timestamp = parse_timestamp(timestamp_raw).ok_or_else(|| {
            AuthFailure::new(
                MalformedHeader,
                format!("header {HEADER_TIMESTAMP} must be unix seconds (1 to 20 decimal digits)"),
            )
        })?;
        if !is_nonce(nonce) {
            return Err(AuthFailure::new(
                MalformedHeader,
                format!(
                    "header {HEADER_NONCE} must be {NONCE_MIN} to {NONCE_MAX} characters of \
                     [A-Za-z0-9_-], got {} characters",
                    nonce.chars().count().min(1000)
                ),
            ));
        }
        let signature = parse_signature(signature_raw).ok_or_else(|| {
            AuthFailure::new(
                MalformedHeader,
                format!(
                    "header {HEADER_SIGNATURE} must be `{SIGNATURE_PREFIX}` followed by 64 \
                     lowercase hex characters"
                ),
            )
        })?;
        if self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .secret(key_id)
            .is_none()
        {
            return Err(unknown_key(key_id));
        }

        let skew = timestamp.abs_diff(now_unix);
        if skew > self.window {
            let direction = if timestamp < now_unix {
                "behind"
            } else {
                "ahead of"
            };
            return Err(AuthFailure::new(
                StaleTimestamp,
                format!(
                    "header {HEADER_TIMESTAMP}: {skew} s {direction} the agent's clock, more \
                     than the {} s allowed",
                    self.window
                ),
            ));
        }
        let not_before = self.not_before.load(std::sync::atomic::Ordering::Relaxed);
        if timestamp < not_before {
            return Err(AuthFailure::new(
                StaleTimestamp,
                format!(
                    "header {HEADER_TIMESTAMP}: signed before the agent started; sign it again"
                ),
            ));
        }
        let head = CheckedHead {
            key_id,
            timestamp_raw,
            timestamp,
            nonce,
            signature,
        };
        self.nonce_cache(now_unix).check_unused(&head)?;
        Ok(head)
    }

    /// Checks a request and returns the key it was signed with and its scope, or why it is
    /// refused.
    ///
    /// `body` is the raw request body, already capped by the caller (64 KiB); it is hashed here
    /// and must not be parsed before this returns `Ok`. `now_unix` is the agent's clock in unix
    /// seconds, passed in so tests can move it. Order: [`Verifier::check_head`] → signature
    /// (constant time) → nonce unused, which is only then recorded, so a request with a bad
    /// signature cannot burn a nonce.
    pub fn verify(
        &self,
        method: &str,
        path_with_query: &str,
        headers: &AuthHeaders,
        body: &[u8],
        now_unix: u64,
    ) -> Result<Authenticated, AuthFailure> {
        let head = self.check_head(headers, now_unix)?;
        let sts = string_to_sign(
            method,
            path_with_query,
            head.timestamp_raw,
            head.nonce,
            &body_digest(body),
        );
        let (mac, scope) = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            // The key may have been revoked by a reload since the head was checked.
            let secret = keys
                .secret(head.key_id)
                .ok_or_else(|| unknown_key(head.key_id))?;
            (mac(secret, &sts), keys.scope(head.key_id).cloned())
        };
        if mac.verify_slice(&head.signature).is_err() {
            return Err(AuthFailure::new(
                AuthFailureReason::BadSignature,
                format!("header {HEADER_SIGNATURE}: signature does not match the request"),
            ));
        }

        let mut cache = self.nonce_cache(now_unix);
        cache.check_unused(&head)?;
        cache.insert(
            NonceCache::entry(head.key_id, head.nonce),
            head.timestamp.saturating_add(self.window),
        );
        Ok(Authenticated {
            key_id: head.key_id.to_string(),
            scope,
        })
    }

    /// The nonce cache, locked, without the entries that have expired by `now_unix`.
    fn nonce_cache(&self, now_unix: u64) -> std::sync::MutexGuard<'_, NonceCache> {
        let mut cache = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        cache.prune(now_unix);
        cache
    }
}

/// The auth headers of a request, checked by [`Verifier::check_head`]: well-formed, the key
/// known, the timestamp in the window, the nonce unused when it was checked.
#[derive(Debug, Clone, Copy)]
pub struct CheckedHead<'a> {
    /// The key id (the default one when the header is absent).
    pub key_id: &'a str,
    timestamp_raw: &'a str,
    timestamp: u64,
    nonce: &'a str,
    signature: [u8; 32],
}

fn unknown_key(key_id: &str) -> AuthFailure {
    AuthFailure::new(
        AuthFailureReason::UnknownKey,
        format!("header {HEADER_KEY}: unknown key id {key_id:?}"),
    )
}

impl NonceCache {
    /// Refuses a nonce already used with its key, or any nonce while the cache is full.
    fn check_unused(&self, head: &CheckedHead) -> Result<(), AuthFailure> {
        let key_id = head.key_id;
        if self.contains(&NonceCache::entry(key_id, head.nonce)) {
            return Err(AuthFailure::new(
                AuthFailureReason::ReplayedNonce,
                format!("header {HEADER_NONCE}: nonce already used with key {key_id:?}"),
            ));
        }
        if self.is_full() {
            tracing::warn!(
                entries = self.len(),
                "auth nonce cache is full; refusing requests until nonces expire"
            );
            return Err(AuthFailure::new(
                AuthFailureReason::ReplayedNonce,
                format!(
                    "header {HEADER_NONCE}: the agent's nonce cache is full ({} live nonces); \
                     request refused rather than forgetting a live nonce, retry later",
                    self.len()
                ),
            ));
        }
        Ok(())
    }
}

fn parse_timestamp(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn is_nonce(s: &str) -> bool {
    (NONCE_MIN..=NONCE_MAX).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

fn parse_signature(s: &str) -> Option<[u8; 32]> {
    let hex_part = s.strip_prefix(SIGNATURE_PREFIX)?;
    if hex_part.len() != 64
        || !hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}
