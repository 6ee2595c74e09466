//! The keys file: key id → secret (and, for a key written as a table, its scope), loaded,
//! validated and generated.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{random_bytes, KEY_ID_MAX, MAX_KEYS_FILE, MIN_SECRET_LEN};
use crate::policy::{CidrList, Scope};
use crate::secret_file::SecretFileError;

/// The live API keys: key id → secret bytes, and the scopes of the keys written as tables. Its
/// `Debug` shows the ids only.
#[derive(Clone, Default)]
pub struct Keys {
    secrets: BTreeMap<String, Vec<u8>>,
    /// Only the scoped keys; a key absent here may do whatever the global policy allows.
    scopes: BTreeMap<String, Arc<Scope>>,
}

/// The fields of a key table, as the file spells them.
const TABLE_FIELDS: &str = "secret, frontend_ports, nodes, node_cidrs, may_delete_frontend";

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
    /// A key's value is neither a string (an unscoped key) nor a table (a scoped key).
    #[error(
        "key {key_id:?}: must be a TOML string (`{key_id} = \"secret\"`) or a table of a scoped \
         key (`[{key_id}]` with secret = ..., frontend_ports = ...)"
    )]
    NotAString { key_id: String },
    /// A key table has a field lbagent does not know (often an unquoted key id with a `.`,
    /// which TOML reads as a table inside a table).
    #[error(
        "key {key_id:?}: unknown field {field:?} (a key table has {TABLE_FIELDS}; quote key ids \
         that contain `.`: \"a.b\" = \"secret\")"
    )]
    UnknownField { key_id: String, field: String },
    /// A field of a key table has the wrong TOML type (the value is never quoted).
    #[error("key {key_id:?}: field {field} must be {expected}")]
    FieldType {
        key_id: String,
        field: &'static str,
        expected: &'static str,
    },
    /// A field of a key table does not parse.
    #[error("key {key_id:?}: field {field}: {message}")]
    InvalidField {
        key_id: String,
        field: &'static str,
        message: String,
    },
    /// A key table lacks a field it must have.
    #[error("key {key_id:?}: a key table needs the field {field}{hint}")]
    MissingField {
        key_id: String,
        field: &'static str,
        hint: &'static str,
    },
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
        let mut scopes = BTreeMap::new();
        for (key_id, value) in table {
            match value {
                toml::Value::String(secret) => pairs.push((key_id, secret.into_bytes())),
                toml::Value::Table(fields) => {
                    check_key_id(&key_id)?;
                    let (secret, scope) = parse_key_table(&key_id, fields)?;
                    scopes.insert(key_id.clone(), Arc::new(scope));
                    pairs.push((key_id, secret));
                }
                _ => {
                    check_key_id(&key_id)?;
                    return Err(KeysError::NotAString { key_id });
                }
            }
        }
        Ok(Keys {
            scopes,
            ..Keys::from_pairs(pairs)?
        })
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
        Ok(Keys {
            secrets,
            scopes: BTreeMap::new(),
        })
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

    /// The scope of a key written as a table; `None` for an unscoped key (or an unknown one).
    pub fn scope(&self, key_id: &str) -> Option<&Arc<Scope>> {
        self.scopes.get(key_id)
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
            .field("scoped", &self.scopes.keys().collect::<Vec<_>>())
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

/// A scoped key's table: its secret, and its scope. Every error names the key and the field.
fn parse_key_table(key_id: &str, fields: toml::Table) -> Result<(Vec<u8>, Scope), KeysError> {
    let mut secret = None;
    let mut frontend_ports = None;
    let mut nodes = None;
    let mut node_cidrs = None;
    let mut may_delete_frontend = false;
    for (field, value) in fields {
        match field.as_str() {
            "secret" => secret = Some(string_field(key_id, "secret", value)?.into_bytes()),
            "frontend_ports" => {
                frontend_ports = Some(parsed_field(key_id, "frontend_ports", value)?)
            }
            "nodes" => nodes = Some(parsed_field(key_id, "nodes", value)?),
            "node_cidrs" => {
                let cidrs: CidrList = parsed_field(key_id, "node_cidrs", value)?;
                // `""` and `"any"` mean any address to the global flag; in a scope, where
                // leaving the field out says that, they are a mistake (a list lost its text).
                if cidrs.is_any() {
                    return Err(KeysError::InvalidField {
                        key_id: key_id.to_string(),
                        field: "node_cidrs",
                        message: "is empty or \"any\": leave node_cidrs out for any address the \
                                  global policy allows, or list address prefixes like 10.0.0.0/8"
                            .into(),
                    });
                }
                node_cidrs = Some(cidrs)
            }
            "may_delete_frontend" => match value {
                toml::Value::Boolean(b) => may_delete_frontend = b,
                _ => {
                    return Err(KeysError::FieldType {
                        key_id: key_id.to_string(),
                        field: "may_delete_frontend",
                        expected: "true or false",
                    })
                }
            },
            _ => {
                return Err(KeysError::UnknownField {
                    key_id: key_id.to_string(),
                    field: field.chars().take(KEY_ID_MAX + 1).collect(),
                })
            }
        }
    }
    let missing = |field, hint| KeysError::MissingField {
        key_id: key_id.to_string(),
        field,
        hint,
    };
    let secret = secret.ok_or_else(|| missing("secret", ""))?;
    // Required: a table is how a key is scoped, and the ports are the heart of a scope. Any
    // port is still one line away, and the global policy bounds it.
    let frontend_ports = frontend_ports.ok_or_else(|| {
        missing(
            "frontend_ports",
            " (\"1-65535\" for any port the global policy allows)",
        )
    })?;
    let scope = Scope {
        key_id: key_id.to_string(),
        frontend_ports,
        nodes,
        node_cidrs,
        may_delete_frontend,
    };
    Ok((secret, scope))
}

fn string_field(
    key_id: &str,
    field: &'static str,
    value: toml::Value,
) -> Result<String, KeysError> {
    match value {
        toml::Value::String(s) => Ok(s),
        _ => Err(KeysError::FieldType {
            key_id: key_id.to_string(),
            field,
            expected: "a TOML string",
        }),
    }
}

/// A string field parsed by its type's `FromStr` (`PortList`, `NodeGlob`, `CidrList`): the one
/// syntax of each, shared with the flags.
fn parsed_field<T: std::str::FromStr<Err = String>>(
    key_id: &str,
    field: &'static str,
    value: toml::Value,
) -> Result<T, KeysError> {
    string_field(key_id, field, value)?
        .parse()
        .map_err(|message| KeysError::InvalidField {
            key_id: key_id.to_string(),
            field,
            message,
        })
}
