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
//! TOML reads them as tables). The secret is the string's bytes as written (it is
//! not hex-decoded), at least 16 bytes. The file must not be readable or writable by group or
//! others. Several keys may be live at once, so a key is rotated by adding the new one,
//! moving clients over and deleting the old one, then calling [`Verifier::reload`] (on SIGHUP).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};

use crate::secret_file::SecretFileError;
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

const SIGNATURE_PREFIX: &str = "sha256=";
const NONCE_MIN: usize = 16;
const NONCE_MAX: usize = 64;
const KEY_ID_MAX: usize = 64;
/// A keys file larger than this is refused rather than read.
const MAX_KEYS_FILE: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// The live API keys: key id → secret bytes. Its `Debug` shows the ids only.
#[derive(Clone, Default)]
pub struct Keys {
    secrets: BTreeMap<String, Vec<u8>>,
}

/// Why a set of keys or a keys file was refused. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// Creating or writing the keys file failed.
    #[error("keys file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The keys file cannot be opened or read, is not a regular file, is too large to be one,
    /// or group or others may read or write it.
    #[error("keys file {0}")]
    File(#[from] SecretFileError),
    /// The keys file is not valid TOML (the message never quotes the file's text).
    #[error("keys file {}: malformed TOML{}: {message}", path.display(),
        line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Malformed {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    /// A problem with one of the keys in a file.
    #[error("keys file {}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<KeysError>,
    },
    /// A key id does not match `[A-Za-z0-9_.-]{1,64}`.
    #[error("key id {id:?} is invalid: it must be 1 to 64 characters of [A-Za-z0-9_.-]")]
    InvalidKeyId { id: String },
    /// A key's value is not a string (often an unquoted key id with a `.`, which TOML reads as
    /// a table).
    #[error(
        "key {key_id:?}: the secret must be a TOML string (quote key ids that contain `.`: \
         \"a.b\" = \"secret\")"
    )]
    NotAString { key_id: String },
    /// A key's secret is empty.
    #[error("key {key_id:?}: the secret is empty")]
    EmptySecret { key_id: String },
    /// A key's secret is shorter than [`MIN_SECRET_LEN`].
    #[error("key {key_id:?}: the secret is {len} bytes, at least {MIN_SECRET_LEN} are required")]
    ShortSecret { key_id: String, len: usize },
    /// The same key id appears twice.
    #[error("key {key_id:?} appears more than once")]
    DuplicateKey { key_id: String },
    /// There is no key at all.
    #[error("no keys: at least one `key_id = \"secret\"` line is required")]
    NoKeys,
}

impl Keys {
    /// Reads and validates a keys file, refusing it if group or others may read or write it.
    /// Call it again to reload (see [`Verifier::reload`]).
    pub fn load(path: &Path) -> Result<Keys, KeysError> {
        let text = crate::secret_file::read(path, MAX_KEYS_FILE)?;
        Keys::parse(&text).map_err(|e| match e {
            KeysError::Malformed { line, message, .. } => KeysError::Malformed {
                path: path.to_path_buf(),
                line,
                message,
            },
            other => KeysError::InFile {
                path: path.to_path_buf(),
                source: Box::new(other),
            },
        })
    }

    /// Parses keys-file text. `Malformed` errors carry an empty path; `load` fills it in.
    fn parse(text: &str) -> Result<Keys, KeysError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            // Only the message and the line: toml's Display quotes the offending line, which
            // may hold a secret.
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            KeysError::Malformed {
                path: PathBuf::new(),
                line,
                message: e.message().to_string(),
            }
        })?;
        let mut pairs = Vec::with_capacity(table.len());
        for (key_id, value) in table {
            match value {
                toml::Value::String(secret) => pairs.push((key_id, secret.into_bytes())),
                _ => {
                    check_key_id(&key_id)?;
                    return Err(KeysError::NotAString { key_id });
                }
            }
        }
        Keys::from_pairs(pairs)
    }

    /// Builds keys from (key id, secret) pairs, validating ids and secrets as `load` does.
    pub fn from_pairs<I: IntoIterator<Item = (String, Vec<u8>)>>(
        pairs: I,
    ) -> Result<Keys, KeysError> {
        let mut secrets = BTreeMap::new();
        for (key_id, secret) in pairs {
            check_key_id(&key_id)?;
            if secret.is_empty() {
                return Err(KeysError::EmptySecret { key_id });
            }
            if secret.len() < MIN_SECRET_LEN {
                return Err(KeysError::ShortSecret {
                    key_id,
                    len: secret.len(),
                });
            }
            if secrets.contains_key(&key_id) {
                return Err(KeysError::DuplicateKey { key_id });
            }
            secrets.insert(key_id, secret);
        }
        if secrets.is_empty() {
            return Err(KeysError::NoKeys);
        }
        Ok(Keys { secrets })
    }

    /// Creates a new keys file (it must not exist) with mode 0600 holding one key with a fresh
    /// random secret (32 bytes from the system's CSPRNG, written as 64 hex characters), and returns it.
    pub fn generate_file(path: &Path, key_id: &str) -> Result<Keys, KeysError> {
        check_key_id(key_id)?;
        let io_err = |source| KeysError::Io {
            path: path.to_path_buf(),
            source,
        };
        let secret = hex::encode(random_bytes::<32>().map_err(io_err)?);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        // Key ids have no character needing an escape; only `.` needs quotes (else a table).
        let toml_key = if key_id.contains('.') {
            format!("\"{key_id}\"")
        } else {
            key_id.to_string()
        };
        let text = format!(
            "# lbagent API keys: one `key_id = \"secret\"` per line. Keep this file mode 0600.\n\
             {toml_key} = \"{secret}\"\n"
        );
        file.write_all(text.as_bytes()).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        Keys::from_pairs([(key_id.to_string(), secret.into_bytes())])
    }

    /// The key ids, in sorted order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.secrets.keys().map(String::as_str)
    }

    /// The secret of a key, for clients that sign requests (lbctl).
    pub fn secret(&self, key_id: &str) -> Option<&[u8]> {
        self.secrets.get(key_id).map(Vec::as_slice)
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    /// Whether there is no key.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("ids", &self.secrets.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn is_key_id(id: &str) -> bool {
    (1..=KEY_ID_MAX).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn check_key_id(id: &str) -> Result<(), KeysError> {
    if is_key_id(id) {
        Ok(())
    } else {
        // Cap what is echoed back: the id came from a file someone may have garbled.
        let id = id.chars().take(KEY_ID_MAX + 1).collect();
        Err(KeysError::InvalidKeyId { id })
    }
}

fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(io::Error::other)?;
    Ok(buf)
}

// ---------------------------------------------------------------------------------------------
// Signing
// ---------------------------------------------------------------------------------------------

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

fn mac(secret: &[u8], string_to_sign: &str) -> HmacSha256 {
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

// ---------------------------------------------------------------------------------------------
// Verifying
// ---------------------------------------------------------------------------------------------

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
struct NonceCache {
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

    fn len(&self) -> usize {
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
    nonces: Mutex<NonceCache>,
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

    fn with_nonce_capacity(keys: Keys, window: Duration, capacity: usize) -> Verifier {
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

    /// Re-reads the keys file and swaps its keys in (for SIGHUP). On error the current keys
    /// stay. Returns the new key ids.
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

    /// Checks a request and returns the key id it was signed with, or why it is refused.
    ///
    /// `body` is the raw request body, already capped by the caller (64 KiB); it is hashed here
    /// and must not be parsed before this returns `Ok`. `now_unix` is the agent's clock in unix
    /// seconds, passed in so tests can move it. Order: headers present and well-formed → key
    /// known → timestamp within the window → signature (constant time) → nonce unused, which is
    /// only then recorded, so a request with a bad signature cannot burn a nonce.
    pub fn verify(
        &self,
        method: &str,
        path_with_query: &str,
        headers: &AuthHeaders,
        body: &[u8],
        now_unix: u64,
    ) -> Result<String, AuthFailure> {
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

        let mac = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            let secret = keys.secret(key_id).ok_or_else(|| {
                AuthFailure::new(
                    UnknownKey,
                    format!("header {HEADER_KEY}: unknown key id {key_id:?}"),
                )
            })?;
            let sts = string_to_sign(
                method,
                path_with_query,
                timestamp_raw,
                nonce,
                &body_digest(body),
            );
            mac(secret, &sts)
        };

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

        if mac.verify_slice(&signature).is_err() {
            return Err(AuthFailure::new(
                BadSignature,
                format!("header {HEADER_SIGNATURE}: signature does not match the request"),
            ));
        }

        let entry = NonceCache::entry(key_id, nonce);
        let mut cache = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        cache.prune(now_unix);
        if cache.contains(&entry) {
            return Err(AuthFailure::new(
                ReplayedNonce,
                format!("header {HEADER_NONCE}: nonce already used with key {key_id:?}"),
            ));
        }
        if cache.is_full() {
            tracing::warn!(
                entries = cache.len(),
                "auth nonce cache is full; refusing requests until nonces expire"
            );
            return Err(AuthFailure::new(
                ReplayedNonce,
                format!(
                    "header {HEADER_NONCE}: the agent's nonce cache is full ({} live nonces); \
                     request refused rather than forgetting a live nonce, retry later",
                    cache.len()
                ),
            ));
        }
        cache.insert(entry, timestamp.saturating_add(self.window));
        Ok(key_id.to_string())
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

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const SECRET2: &[u8] = b"another-secret-of-enough-length";
    const NOW: u64 = 1_700_000_000;
    const NONCE: &str = "abcdefghijklmnop_-0123";
    const PATH: &str = "/v1/ports/443/nodes?drain=true";
    const BODY: &[u8] = br#"{"address":"10.0.0.5","port":30443}"#;

    fn keys() -> Keys {
        Keys::from_pairs([(DEFAULT_KEY_ID.to_string(), SECRET.to_vec())]).unwrap()
    }

    fn verifier() -> Verifier {
        Verifier::new(keys(), DEFAULT_WINDOW)
    }

    /// Owned header values for one request, signed with `secret`.
    struct Req {
        key: Option<String>,
        ts: Option<String>,
        nonce: Option<String>,
        sig: Option<String>,
    }

    impl Req {
        fn signed(key: Option<&str>, secret: &[u8], ts: u64, nonce: &str) -> Req {
            Req {
                key: key.map(str::to_string),
                ts: Some(ts.to_string()),
                nonce: Some(nonce.to_string()),
                sig: Some(sign(secret, "PUT", PATH, ts, nonce, BODY)),
            }
        }

        fn good() -> Req {
            Req::signed(None, SECRET, NOW, NONCE)
        }

        fn headers(&self) -> AuthHeaders<'_> {
            AuthHeaders {
                key_id: self.key.as_deref(),
                timestamp: self.ts.as_deref(),
                nonce: self.nonce.as_deref(),
                signature: self.sig.as_deref(),
            }
        }
    }

    fn check(v: &Verifier, r: &Req, now: u64) -> Result<String, AuthFailure> {
        v.verify("PUT", PATH, &r.headers(), BODY, now)
    }

    fn reason(v: &Verifier, r: &Req, now: u64) -> AuthFailureReason {
        let failure = check(v, r, now).expect_err("request should be refused");
        assert!(!failure.message.is_empty());
        assert!(
            !failure
                .message
                .contains(std::str::from_utf8(SECRET).unwrap()),
            "secret leaked: {}",
            failure.message
        );
        failure.reason
    }

    #[test]
    fn requests_signed_before_start_are_refused() {
        let v = Verifier::new(
            Keys::from_pairs([("default".to_string(), b"0123456789abcdef".to_vec())]).unwrap(),
            Duration::from_secs(300),
        );
        let body = b"{}";
        let sig = |ts: u64, nonce: &str| sign(b"0123456789abcdef", "PUT", "/p", ts, nonce, body);
        let s1 = sig(1000, "nonce-aaaaaaaaaaaa");
        let h1 = AuthHeaders {
            key_id: None,
            timestamp: Some("1000"),
            nonce: Some("nonce-aaaaaaaaaaaa"),
            signature: Some(&s1),
        };
        assert!(v.verify("PUT", "/p", &h1, body, 1001).is_ok());
        // A restart: a fresh verifier that refuses what was signed before it started.
        let v = Verifier::new(
            Keys::from_pairs([("default".to_string(), b"0123456789abcdef".to_vec())]).unwrap(),
            Duration::from_secs(300),
        );
        v.refuse_signed_before(1002);
        let e = v.verify("PUT", "/p", &h1, body, 1003).unwrap_err();
        assert_eq!(e.reason, AuthFailureReason::StaleTimestamp);
        let s2 = sig(1003, "nonce-bbbbbbbbbbbb");
        let h2 = AuthHeaders {
            key_id: None,
            timestamp: Some("1003"),
            nonce: Some("nonce-bbbbbbbbbbbb"),
            signature: Some(&s2),
        };
        assert!(v.verify("PUT", "/p", &h2, body, 1003).is_ok());
    }

    #[test]
    fn good_signature_passes() {
        assert_eq!(check(&verifier(), &Req::good(), NOW).unwrap(), "default");
    }

    #[test]
    fn explicit_key_header_passes() {
        let r = Req::signed(Some("default"), SECRET, NOW, NONCE);
        assert_eq!(check(&verifier(), &r, NOW).unwrap(), "default");
    }

    #[test]
    fn signed_headers_round_trip() {
        let v = verifier();
        let hs = signed_headers("default", SECRET, "POST", "/v1/x?a=1", b"{}", NOW);
        let get = |name| hs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
        let headers = AuthHeaders {
            key_id: get(HEADER_KEY),
            timestamp: get(HEADER_TIMESTAMP),
            nonce: get(HEADER_NONCE),
            signature: get(HEADER_SIGNATURE),
        };
        assert_eq!(hs.len(), 4);
        assert_eq!(
            v.verify("POST", "/v1/x?a=1", &headers, b"{}", NOW).unwrap(),
            "default"
        );
        // Two calls give two different nonces.
        let hs2 = signed_headers("default", SECRET, "POST", "/v1/x?a=1", b"{}", NOW);
        assert_ne!(hs[2].1, hs2[2].1);
    }

    #[test]
    fn each_missing_header_is_refused() {
        let v = verifier();
        for which in 0..3 {
            let mut r = Req::good();
            match which {
                0 => r.ts = None,
                1 => r.nonce = None,
                _ => r.sig = None,
            }
            let f = check(&v, &r, NOW).unwrap_err();
            assert_eq!(f.reason, AuthFailureReason::MissingHeader);
            let name = [HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE][which];
            assert!(f.message.contains(name), "{}", f.message);
        }
        // The key header is optional, so its absence is not an error (tested above).
    }

    #[test]
    fn malformed_headers_are_refused() {
        let v = verifier();
        let malformed = |edit: &dyn Fn(&mut Req)| {
            let mut r = Req::good();
            edit(&mut r);
            reason(&v, &r, NOW)
        };
        let m = AuthFailureReason::MalformedHeader;
        // Timestamp.
        for ts in [
            "",
            "abc",
            "17e8",
            "-1700000000",
            "+1700000000",
            " 1700000000",
            "1.5",
        ] {
            assert_eq!(malformed(&|r| r.ts = Some(ts.into())), m, "ts {ts:?}");
        }
        assert_eq!(malformed(&|r| r.ts = Some("9".repeat(21))), m);
        assert_eq!(
            malformed(&|r| r.ts = Some("99999999999999999999".into())),
            m
        ); // > u64
           // Nonce: too short, too long, bad characters.
        assert_eq!(malformed(&|r| r.nonce = Some("a".repeat(15))), m);
        assert_eq!(malformed(&|r| r.nonce = Some("a".repeat(65))), m);
        for bad in [
            "abcdefghijklmnop.",
            "abcdefghijklmnop ",
            "abcdefghijklmnop/",
            "abcdéfghijklmnop",
        ] {
            assert_eq!(malformed(&|r| r.nonce = Some(bad.into())), m, "{bad:?}");
        }
        // Signature: no prefix, uppercase hex, wrong length, not hex.
        let good_sig = Req::good().sig.unwrap();
        let hex_part = good_sig.strip_prefix("sha256=").unwrap().to_string();
        assert_eq!(malformed(&|r| r.sig = Some(hex_part.clone())), m);
        assert_eq!(malformed(&|r| r.sig = Some(format!("sha1={hex_part}"))), m);
        assert_eq!(
            malformed(&|r| r.sig = Some(format!("SHA256={hex_part}"))),
            m
        );
        assert_eq!(
            malformed(&|r| r.sig = Some(format!("sha256={}", hex_part.to_uppercase()))),
            m
        );
        assert_eq!(
            malformed(&|r| r.sig = Some(format!("sha256={}", &hex_part[..62]))),
            m
        );
        assert_eq!(
            malformed(&|r| r.sig = Some(format!("sha256={hex_part}00"))),
            m
        );
        assert_eq!(
            malformed(&|r| r.sig = Some(format!("sha256={}", "g".repeat(64)))),
            m
        );
        // Key id.
        assert_eq!(malformed(&|r| r.key = Some(String::new())), m);
        assert_eq!(malformed(&|r| r.key = Some("bad key".into())), m);
        assert_eq!(malformed(&|r| r.key = Some("k".repeat(65))), m);
        // Nonce at the bounds is fine.
        for n in ["a".repeat(16), "Z".repeat(64)] {
            assert!(check(&v, &Req::signed(None, SECRET, NOW, &n), NOW).is_ok());
        }
    }

    #[test]
    fn unknown_key_is_refused() {
        let r = Req::signed(Some("other"), SECRET, NOW, NONCE);
        let f = check(&verifier(), &r, NOW).unwrap_err();
        assert_eq!(f.reason, AuthFailureReason::UnknownKey);
        assert!(f.message.contains("other"), "{}", f.message);
    }

    #[test]
    fn timestamp_window() {
        let v = verifier();
        // The request's timestamp is 301 s before / after the agent's clock.
        let early = Req::signed(None, SECRET, NOW - 301, "nonce-early-000001");
        let late = Req::signed(None, SECRET, NOW + 301, "nonce-late-0000001");
        assert_eq!(reason(&v, &early, NOW), AuthFailureReason::StaleTimestamp);
        assert_eq!(reason(&v, &late, NOW), AuthFailureReason::StaleTimestamp);
        // Exactly 300 s either way is fine.
        let edge_early = Req::signed(None, SECRET, NOW - 300, "nonce-early-000002");
        let edge_late = Req::signed(None, SECRET, NOW + 300, "nonce-late-0000002");
        assert!(check(&v, &edge_early, NOW).is_ok());
        assert!(check(&v, &edge_late, NOW).is_ok());
        // The window is configurable.
        let narrow = Verifier::new(keys(), Duration::from_secs(10));
        let r = Req::signed(None, SECRET, NOW - 11, NONCE);
        assert_eq!(reason(&narrow, &r, NOW), AuthFailureReason::StaleTimestamp);
        assert!(check(&narrow, &Req::signed(None, SECRET, NOW - 10, NONCE), NOW).is_ok());
    }

    #[test]
    fn replay_is_refused_within_window_and_accepted_after() {
        let v = verifier();
        assert!(check(&v, &Req::good(), NOW).is_ok());
        // The same request again, and later within the window.
        assert_eq!(
            reason(&v, &Req::good(), NOW),
            AuthFailureReason::ReplayedNonce
        );
        assert_eq!(
            reason(&v, &Req::good(), NOW + 300),
            AuthFailureReason::ReplayedNonce
        );
        // The same nonce with a fresh timestamp, while the first is still remembered.
        let fresh = Req::signed(None, SECRET, NOW + 200, NONCE);
        assert_eq!(
            reason(&v, &fresh, NOW + 200),
            AuthFailureReason::ReplayedNonce
        );
        // Once NOW + window has passed, the first request is stale and its nonce forgotten.
        assert_eq!(
            reason(&v, &Req::good(), NOW + 301),
            AuthFailureReason::StaleTimestamp
        );
        let later = Req::signed(None, SECRET, NOW + 301, NONCE);
        assert!(check(&v, &later, NOW + 301).is_ok());
        assert_eq!(
            v.nonces.lock().unwrap().len(),
            1,
            "the old entry was pruned"
        );
    }

    #[test]
    fn nonces_are_per_key() {
        let two = Keys::from_pairs([
            ("default".to_string(), SECRET.to_vec()),
            ("k2".to_string(), SECRET2.to_vec()),
        ])
        .unwrap();
        let v = Verifier::new(two, DEFAULT_WINDOW);
        assert!(check(&v, &Req::good(), NOW).is_ok());
        assert!(check(&v, &Req::signed(Some("k2"), SECRET2, NOW, NONCE), NOW).is_ok());
    }

    #[test]
    fn bad_signature_does_not_burn_the_nonce() {
        let v = verifier();
        let forged = Req::signed(None, b"not-the-right-secret-at-all", NOW, NONCE);
        assert_eq!(reason(&v, &forged, NOW), AuthFailureReason::BadSignature);
        assert!(check(&v, &Req::good(), NOW).is_ok());
    }

    #[test]
    fn tampering_is_refused() {
        let v = verifier();
        let r = Req::good();
        let bad = |method: &str, path: &str, body: &[u8]| {
            v.verify(method, path, &r.headers(), body, NOW)
                .unwrap_err()
                .reason
        };
        let b = AuthFailureReason::BadSignature;
        assert_eq!(
            bad("PUT", PATH, br#"{"address":"10.0.0.6","port":30443}"#),
            b
        );
        assert_eq!(bad("PUT", PATH, b""), b);
        assert_eq!(bad("PUT", "/v1/ports/443/nodes?drain=false", BODY), b);
        assert_eq!(bad("PUT", "/v1/ports/443/nodes", BODY), b);
        assert_eq!(bad("PUT", "/v1/ports/444/nodes?drain=true", BODY), b);
        assert_eq!(bad("DELETE", PATH, BODY), b);
        // A different timestamp or nonce than the one signed.
        let mut r2 = Req::good();
        r2.ts = Some((NOW + 1).to_string());
        assert_eq!(reason(&v, &r2, NOW), b);
        let mut r3 = Req::good();
        r3.nonce = Some("zzzzzzzzzzzzzzzzzzzz".into());
        assert_eq!(reason(&v, &r3, NOW), b);
        // A signature off by one bit.
        let mut r4 = Req::good();
        let sig = r4.sig.take().unwrap();
        let last = sig.chars().last().unwrap();
        let flipped = if last == '0' { '1' } else { '0' };
        r4.sig = Some(format!("{}{flipped}", &sig[..sig.len() - 1]));
        assert_eq!(reason(&v, &r4, NOW), b);
        // None of this burned the nonce.
        assert!(check(&v, &r, NOW).is_ok());
    }

    #[test]
    fn key_rotation() {
        let both = Keys::from_pairs([
            ("old".to_string(), SECRET.to_vec()),
            ("new".to_string(), SECRET2.to_vec()),
        ])
        .unwrap();
        let v = Verifier::new(both, DEFAULT_WINDOW);
        let old = |n: &str| Req::signed(Some("old"), SECRET, NOW, n);
        let new = |n: &str| Req::signed(Some("new"), SECRET2, NOW, n);
        assert_eq!(check(&v, &old("nonce-000000000001"), NOW).unwrap(), "old");
        assert_eq!(check(&v, &new("nonce-000000000001"), NOW).unwrap(), "new");
        // Signing with the other key's secret does not pass.
        let cross = Req::signed(Some("new"), SECRET, NOW, "nonce-000000000002");
        assert_eq!(reason(&v, &cross, NOW), AuthFailureReason::BadSignature);

        v.replace_keys(Keys::from_pairs([("new".to_string(), SECRET2.to_vec())]).unwrap());
        assert_eq!(
            reason(&v, &old("nonce-000000000003"), NOW),
            AuthFailureReason::UnknownKey
        );
        assert!(check(&v, &new("nonce-000000000003"), NOW).is_ok());
    }

    #[test]
    fn full_nonce_cache_refuses_rather_than_forgets() {
        let v = Verifier::with_nonce_capacity(keys(), DEFAULT_WINDOW, 2);
        assert!(check(
            &v,
            &Req::signed(None, SECRET, NOW, "nonce-000000000001"),
            NOW
        )
        .is_ok());
        assert!(check(
            &v,
            &Req::signed(None, SECRET, NOW, "nonce-000000000002"),
            NOW
        )
        .is_ok());
        let third = Req::signed(None, SECRET, NOW, "nonce-000000000003");
        let f = check(&v, &third, NOW).unwrap_err();
        assert_eq!(f.reason, AuthFailureReason::ReplayedNonce);
        assert!(f.message.contains("full"), "{}", f.message);
        // The live nonces are still remembered.
        assert_eq!(
            reason(
                &v,
                &Req::signed(None, SECRET, NOW, "nonce-000000000001"),
                NOW
            ),
            AuthFailureReason::ReplayedNonce
        );
        // Once they expire there is room again.
        let later = Req::signed(None, SECRET, NOW + 301, "nonce-000000000003");
        assert!(check(&v, &later, NOW + 301).is_ok());
    }

    #[test]
    fn reason_names() {
        use AuthFailureReason::*;
        let all = [
            MissingHeader,
            MalformedHeader,
            UnknownKey,
            StaleTimestamp,
            ReplayedNonce,
            BadSignature,
        ];
        let names: Vec<_> = all.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "missing_header",
                "malformed_header",
                "unknown_key",
                "stale_timestamp",
                "replayed_nonce",
                "bad_signature"
            ]
        );
    }

    // --- Wire format, checked independently --------------------------------------------------

    /// HMAC-SHA256 of `data` with `key`, computed by `openssl dgst`; `None` if openssl is absent.
    fn openssl_hmac(key: &str, data: &str) -> Option<String> {
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-hmac", key])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        child.stdin.take()?.write_all(data.as_bytes()).ok()?;
        let out = child.wait_with_output().ok()?;
        if !out.status.success() {
            return None;
        }
        // "SHA2-256(stdin)= <hex>" or "(stdin)= <hex>", depending on the version.
        let text = String::from_utf8(out.stdout).ok()?;
        Some(text.trim().rsplit(' ').next()?.to_string())
    }

    #[test]
    fn wire_format_test_vector() {
        let secret = "0123456789abcdef0123456789abcdef";
        let body = br#"{"port":443}"#;
        // sha256 of the body, from `printf '%s' '{"port":443}' | sha256sum`.
        let body_hex = "eef208f1371116733e8fbb68ba3987b34f61d576dc1f4cdf94f3b190ae93b926";
        assert_eq!(
            body_digest(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let sts = string_to_sign(
            "POST",
            "/v1/ports?x=1",
            "1700000000",
            "abcdefghijklmnop",
            &body_digest(body),
        );
        assert_eq!(
            sts,
            format!("POST\n/v1/ports?x=1\n1700000000\nabcdefghijklmnop\n{body_hex}")
        );
        let ours = sign(
            secret.as_bytes(),
            "POST",
            "/v1/ports?x=1",
            1_700_000_000,
            "abcdefghijklmnop",
            body,
        );
        // Recorded once with `openssl dgst -sha256 -hmac` and with Python's hmac module.
        assert_eq!(
            ours,
            "sha256=3ee87001a7d4fb66000b1cce72e879bfaebefe203737ffb3fddc5f76529a51a2"
        );
        match openssl_hmac(secret, &sts) {
            Some(theirs) => assert_eq!(ours, format!("sha256={theirs}")),
            None => eprintln!("openssl not available; skipped the live cross-check"),
        }
    }

    // --- Keys file ---------------------------------------------------------------------------

    fn write_keys(dir: &tempfile::TempDir, text: &str, mode: u32) -> PathBuf {
        let path = dir.path().join("keys.toml");
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    const GOOD_FILE: &str = "# comment\ndefault = \"0123456789abcdef0123\"\n\
                             \"ci-2024.1\" = \"another-secret-of-enough-length\"\n";

    #[test]
    fn keys_file_0600_loads() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::load(&write_keys(&dir, GOOD_FILE, 0o600)).unwrap();
        assert_eq!(keys.ids().collect::<Vec<_>>(), ["ci-2024.1", "default"]);
        assert_eq!(keys.len(), 2);
        assert!(!keys.is_empty());
        assert_eq!(keys.secret("default"), Some(&b"0123456789abcdef0123"[..]));
        assert!(!format!("{keys:?}").contains("0123456789abcdef0123"));
        // 0400 is fine too.
        assert!(Keys::load(&write_keys(&dir, GOOD_FILE, 0o400)).is_ok());
    }

    #[test]
    fn keys_file_open_to_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o660, 0o602, 0o620, 0o644] {
            let path = write_keys(&dir, GOOD_FILE, mode);
            let err = Keys::load(&path).unwrap_err();
            assert!(
                matches!(err, KeysError::File(SecretFileError::OpenToOthers { .. })),
                "{err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("chmod 600 {}", path.display())),
                "{msg}"
            );
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
    }

    #[test]
    fn keys_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| Keys::load(&write_keys(&dir, text, 0o600)).unwrap_err();

        // Malformed TOML; the message must not quote the secret on the broken line.
        let err = load("default = \"0123456789abcdef-unterminated\n");
        assert!(
            matches!(err, KeysError::Malformed { line: Some(1), .. }),
            "{err:?}"
        );
        assert!(!err.to_string().contains("unterminated"), "{err}");
        let err = load("a = \"0123456789abcdef0123\"\nnot toml at all\n");
        assert!(
            matches!(err, KeysError::Malformed { line: Some(2), .. }),
            "{err:?}"
        );
        assert!(matches!(
            load("default = \"0123456789abcdef0\"\ndefault = \"0123456789abcdef1\"\n"),
            KeysError::Malformed { .. }
        ));

        // Short and empty secrets, never quoted.
        let err = load("default = \"short-secret\"\n");
        assert!(
            matches!(*inner(&err), KeysError::ShortSecret { len: 12, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("keys.toml"), "{err}");
        assert!(!err.to_string().contains("short-secret"), "{err}");
        assert!(matches!(
            *inner(&load("default = \"\"\n")),
            KeysError::EmptySecret { .. }
        ));

        // Bad key ids.
        let err = load("\"bad key\" = \"0123456789abcdef0123\"\n");
        assert!(
            matches!(*inner(&err), KeysError::InvalidKeyId { .. }),
            "{err:?}"
        );
        let long = format!("{} = \"0123456789abcdef0123\"\n", "k".repeat(65));
        assert!(matches!(
            *inner(&load(&long)),
            KeysError::InvalidKeyId { .. }
        ));

        // Values that are not strings, tables, nothing at all.
        assert!(matches!(
            *inner(&load("default = 1234567890123456789\n")),
            KeysError::NotAString { .. }
        ));
        assert!(matches!(
            *inner(&load("[default]\nx = \"0123456789abcdef0123\"\n")),
            KeysError::NotAString { .. }
        ));
        assert!(matches!(*inner(&load("# nothing\n")), KeysError::NoKeys));
        // An unquoted dotted id is a TOML table: the message says to quote it.
        let err = load("ci.2 = \"0123456789abcdef0123\"\n");
        assert!(
            matches!(*inner(&err), KeysError::NotAString { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("quote"), "{err}");

        // A missing file.
        let err = Keys::load(&dir.path().join("absent.toml")).unwrap_err();
        assert!(matches!(err, KeysError::File(SecretFileError::Io { .. })));
        assert!(err.to_string().contains("absent.toml"));
        // A directory.
        assert!(matches!(
            Keys::load(dir.path()).unwrap_err(),
            KeysError::File(SecretFileError::NotRegular { .. })
        ));
    }

    fn inner(err: &KeysError) -> &KeysError {
        match err {
            KeysError::InFile { source, .. } => source,
            other => panic!("expected InFile, got {other:?}"),
        }
    }

    #[test]
    fn from_pairs_validates() {
        let pair = |id: &str, s: &[u8]| (id.to_string(), s.to_vec());
        assert!(matches!(
            Keys::from_pairs([pair("a b", SECRET)]),
            Err(KeysError::InvalidKeyId { .. })
        ));
        assert!(matches!(
            Keys::from_pairs([pair("", SECRET)]),
            Err(KeysError::InvalidKeyId { .. })
        ));
        assert!(matches!(
            Keys::from_pairs([pair("a", b"")]),
            Err(KeysError::EmptySecret { .. })
        ));
        assert!(matches!(
            Keys::from_pairs([pair("a", &[b'x'; 15])]),
            Err(KeysError::ShortSecret { len: 15, .. })
        ));
        assert!(Keys::from_pairs([pair("a", &[b'x'; 16])]).is_ok());
        assert!(Keys::from_pairs([pair(&"k".repeat(64), SECRET)]).is_ok());
        assert!(matches!(
            Keys::from_pairs([pair("a", SECRET), pair("a", SECRET2)]),
            Err(KeysError::DuplicateKey { .. })
        ));
        assert!(matches!(
            Keys::from_pairs(Vec::new()),
            Err(KeysError::NoKeys)
        ));
    }

    #[test]
    fn generate_file_writes_0600_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let generated = Keys::generate_file(&path, "default").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let secret = generated.secret("default").unwrap();
        assert_eq!(secret.len(), 64);
        assert!(secret
            .iter()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let loaded = Keys::load(&path).unwrap();
        assert_eq!(loaded.secret("default"), Some(secret));
        // It refuses to overwrite an existing file, and to write a bad key id.
        assert!(matches!(
            Keys::generate_file(&path, "default"),
            Err(KeysError::Io { .. })
        ));
        assert_eq!(Keys::load(&path).unwrap().secret("default"), Some(secret));
        let other = dir.path().join("other.toml");
        assert!(matches!(
            Keys::generate_file(&other, "bad id"),
            Err(KeysError::InvalidKeyId { .. })
        ));
        assert!(!other.exists());
        // Two files get different secrets; a dotted id is quoted so it loads back.
        let second = Keys::generate_file(&other, "ci.2").unwrap();
        assert_ne!(second.secret("ci.2"), Some(secret));
        let loaded = Keys::load(&other).unwrap();
        assert_eq!(loaded.ids().collect::<Vec<_>>(), ["ci.2"]);
        assert_eq!(loaded.secret("ci.2"), second.secret("ci.2"));
    }

    #[test]
    fn reload_swaps_keys_and_keeps_them_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_keys(&dir, GOOD_FILE, 0o600);
        let v = Verifier::new(Keys::load(&path).unwrap(), DEFAULT_WINDOW);
        let s1 = b"0123456789abcdef0123";
        assert!(check(&v, &Req::signed(None, s1, NOW, "nonce-000000000001"), NOW).is_ok());

        // Rotate: drop `default`, keep `ci-2024.1`.
        write_keys(
            &dir,
            "\"ci-2024.1\" = \"another-secret-of-enough-length\"\n",
            0o600,
        );
        assert_eq!(v.reload(&path).unwrap(), ["ci-2024.1"]);
        let r = Req::signed(None, s1, NOW, "nonce-000000000002");
        assert_eq!(reason(&v, &r, NOW), AuthFailureReason::UnknownKey);

        // A broken file leaves the current keys in place.
        write_keys(&dir, GOOD_FILE, 0o644);
        assert!(matches!(
            v.reload(&path),
            Err(KeysError::File(SecretFileError::OpenToOthers { .. }))
        ));
        let r = Req::signed(Some("ci-2024.1"), SECRET2, NOW, "nonce-000000000003");
        assert!(check(&v, &r, NOW).is_ok());
    }
}
