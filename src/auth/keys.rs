//! The keys file: key id → secret, loaded, validated and generated.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{random_bytes, KEY_ID_MAX, MAX_KEYS_FILE, MIN_SECRET_LEN};
use crate::secret_file::SecretFileError;

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

pub(super) fn is_key_id(id: &str) -> bool {
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
