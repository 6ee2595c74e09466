//! A signed HTTP client for the agent's API, for `lbctl state` (and the sidecar commands).

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::auth::{signed_headers, DEFAULT_KEY_ID};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A key to sign with: its id and secret.
pub struct SigningKey {
    pub id: String,
    pub secret: Vec<u8>,
}

impl SigningKey {
    /// Reads `path`: either the agent's TOML keys file (`key_id = "secret"` lines or a scoped
    /// key's `[key_id]` table with its `secret`; `key_id` picks one, default `default`) or a
    /// file holding the secret alone (a trailing newline is ignored).
    pub fn from_file(path: &Path, key_id: Option<&str>) -> Result<SigningKey, BoxError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
        let id = key_id.unwrap_or(DEFAULT_KEY_ID).to_string();
        if let Ok(table) = text.parse::<toml::Table>() {
            if !table.is_empty() {
                let secret = table
                    .get(&id)
                    .and_then(|v| v.as_str().or_else(|| v.get("secret")?.as_str()))
                    .ok_or_else(|| format!("key file {} has no key {id:?}", path.display()))?;
                return Ok(SigningKey {
                    id,
                    secret: secret.as_bytes().to_vec(),
                });
            }
        }
        let secret = text.trim_end_matches(['\n', '\r']);
        if secret.is_empty() {
            return Err(format!("key file {} is empty", path.display()).into());
        }
        Ok(SigningKey {
            id,
            secret: secret.as_bytes().to_vec(),
        })
    }
}

/// Sends a signed request; returns the status and the body text.
pub async fn signed_request(
    agent: &str,
    key: &SigningKey,
    method: Method,
    path_with_query: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(u16, String), BoxError> {
    let base = agent.trim_end_matches('/');
    let uri: Uri = format!("{base}{path_with_query}")
        .parse()
        .map_err(|e| format!("bad agent URL {agent:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("agent URL {agent:?} must start with http://").into());
    }
    let now = crate::clock::unix_seconds();
    let mut req = Request::builder().method(method.clone()).uri(uri);
    for (name, value) in signed_headers(
        &key.id,
        &key.secret,
        method.as_str(),
        path_with_query,
        &body,
        now,
    ) {
        req = req.header(name, value);
    }
    if !body.is_empty() {
        req = req.header("Content-Type", "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body)))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| format!("the agent at {agent} did not answer within {timeout:?}"))?
        .map_err(|e| format!("cannot reach the agent at {agent}: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = tokio::time::timeout(timeout, resp.into_body().collect())
        .await
        .map_err(|_| format!("the agent at {agent} did not finish answering within {timeout:?}"))??
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_lines_tables_and_bare_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(
            &path,
            "default = \"plain-secret-0123456789\"\n\n[mqtt-sidecar]\n\
             secret = \"table-secret-0123456789\"\nfrontend_ports = \"1883\"\n",
        )
        .unwrap();
        let k = SigningKey::from_file(&path, None).unwrap();
        assert_eq!(
            (k.id.as_str(), &k.secret[..]),
            ("default", &b"plain-secret-0123456789"[..])
        );
        let k = SigningKey::from_file(&path, Some("mqtt-sidecar")).unwrap();
        assert_eq!(k.secret, b"table-secret-0123456789");
        let e = SigningKey::from_file(&path, Some("web")).err().unwrap();
        assert!(e.to_string().contains("no key \"web\""), "{e}");

        std::fs::write(&path, "bare-secret-0123456789\n").unwrap();
        let k = SigningKey::from_file(&path, Some("web")).unwrap();
        assert_eq!(
            (k.id.as_str(), &k.secret[..]),
            ("web", &b"bare-secret-0123456789"[..])
        );
    }
}
