//! A signed HTTP(S) client for the agent's API, for `lbctl state`, `lbctl frontend` and `lbctl
//! phone-home`.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::auth::{signed_headers, DEFAULT_KEY_ID};
use crate::tls::client::ClientTlsArgs;

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

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A setting is wrong (the URL, a TLS file, a certificate that does not verify):
    /// retrying cannot help. `lbctl` exits 2 on it.
    #[error("{0}")]
    Config(String),
    /// The agent is away, slow or answered badly: worth retrying.
    #[error("{0}")]
    Transport(String),
}

/// An answer's status and what the agent said, from its JSON error (`{"error": code,
/// "message": ...}`): (`409 conflict`, `frontend 443 has ...`); another body is the message as
/// it is.
pub fn agent_said(status: u16, body: &str) -> (String, String) {
    let said = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let code = v.get("error")?.as_str()?.to_string();
            let message = v.get("message")?.as_str()?.to_string();
            Some((code, message))
        });
    match said {
        Some((code, message)) => (format!("{status} {code}"), message),
        None => (status.to_string(), body.trim().to_string()),
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A client for one agent URL, `http://` or `https://`, kept for the life of the command so
/// its keep-alive connection (and TLS session) serves every request.
pub struct AgentClient {
    base: String,
    client: Client<Connector, Full<Bytes>>,
}

impl AgentClient {
    /// Checks the URL and, for `https://`, reads the TLS files.
    pub fn new(agent: &str, tls: &ClientTlsArgs) -> Result<AgentClient, AgentError> {
        let base = agent.trim_end_matches('/').to_string();
        let uri: Uri = base
            .parse()
            .map_err(|e| AgentError::Config(format!("bad agent URL {agent:?}: {e}")))?;
        let config = match uri.scheme_str() {
            Some("https") => crate::tls::client::config(tls).map_err(AgentError::Config)?,
            Some("http") => crate::tls::client::unused(),
            _ => {
                return Err(AgentError::Config(format!(
                    "agent URL {agent:?} must start with http:// or https://"
                )))
            }
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(AgentClient {
            base,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// The agent's URL, as given (without a trailing `/`).
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Sends a signed request; returns the status and the body text.
    pub async fn signed_request(
        &self,
        key: &SigningKey,
        method: Method,
        path_with_query: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(u16, String), AgentError> {
        let agent = &self.base;
        let uri = self.uri(path_with_query)?;
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
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AgentError::Config(e.to_string()))?;
        self.exchange(req, timeout)
            .await
            .map_err(|failure| match failure {
                Unanswered::Config(why) => AgentError::Config(format!("{agent}: {why}")),
                Unanswered::Head(timeout) => AgentError::Transport(format!(
                    "the agent at {agent} did not answer within {timeout:?}"
                )),
                Unanswered::Unreachable(e) => AgentError::Transport(format!(
                    "cannot reach the agent at {agent}: {}",
                    crate::tls::client::chain(&*e)
                )),
                Unanswered::Body(timeout) => AgentError::Transport(format!(
                    "the agent at {agent} did not finish answering within {timeout:?}"
                )),
                Unanswered::Read(e) => {
                    AgentError::Transport(format!("reading the agent's answer: {e}"))
                }
            })
    }

    /// An unsigned GET (for `/healthz`) whose whole answer must come within `timeout`: the
    /// status and the body text, or why there was no answer, in a few words without the URL
    /// (`Connection refused (os error 111)`, `no answer within 2s`). A TLS certificate that
    /// does not verify is such a reason too: the caller only needs to know it got no answer.
    pub async fn get(&self, path: &str, timeout: Duration) -> Result<(u16, String), String> {
        let req = Request::get(self.uri(path).map_err(|e| e.to_string())?)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let whole = tokio::time::timeout(timeout, self.exchange(req, timeout));
        match whole.await {
            Err(_) => Err(format!("no answer within {timeout:?}")),
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(failure)) => Err(match failure {
                Unanswered::Config(why) => why,
                Unanswered::Head(t) => format!("no answer within {t:?}"),
                Unanswered::Body(t) => format!("the answer did not finish within {t:?}"),
                // The innermost cause is the one that says what happened; hyper's outer
                // layers (`client error (Connect)`) say only where.
                Unanswered::Unreachable(e) => innermost(&*e),
                Unanswered::Read(e) => format!("reading the answer: {e}"),
            }),
        }
    }

    fn uri(&self, path_with_query: &str) -> Result<Uri, AgentError> {
        let agent = &self.base;
        format!("{agent}{path_with_query}")
            .parse()
            .map_err(|e| AgentError::Config(format!("bad agent URL {agent:?}: {e}")))
    }

    /// Sends `req`: the answer's head within `head`, then its body within `body`.
    /// Sends `req` and reads the whole answer, head and body, `within` one deadline: a
    /// caller's timeout bounds the request (a sidecar's DELETE must fit the pod's grace).
    async fn exchange(
        &self,
        req: Request<Full<Bytes>>,
        within: Duration,
    ) -> Result<(u16, String), Unanswered> {
        let deadline = tokio::time::Instant::now() + within;
        let resp = tokio::time::timeout_at(deadline, self.client.request(req))
            .await
            .map_err(|_| Unanswered::Head(within))?
            .map_err(|e| match crate::tls::client::configuration_error(&e) {
                Some(why) => Unanswered::Config(why),
                None => Unanswered::Unreachable(Box::new(e)),
            })?;
        let status = resp.status().as_u16();
        let bytes = tokio::time::timeout_at(deadline, resp.into_body().collect())
            .await
            .map_err(|_| Unanswered::Body(within))?
            .map_err(|e| Unanswered::Read(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
}

/// Why an exchange got no whole answer, before a command words it.
enum Unanswered {
    /// A setting is wrong: a certificate that does not verify, an https agent asked in http.
    Config(String),
    /// No answer's head within this deadline.
    Head(Duration),
    /// The connection failed.
    Unreachable(BoxError),
    /// The body did not come within this deadline.
    Body(Duration),
    Read(String),
}

/// The last cause of `error`'s chain.
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut last = error;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// The URLs of an `--agent` flag: one, or several separated by commas (spaces around each are
/// ignored). An empty entry or one given twice is an error naming the flag's value.
pub fn agent_urls(flag: &str) -> Result<Vec<&str>, String> {
    let mut urls: Vec<&str> = Vec::new();
    for url in flag.split(',').map(str::trim) {
        if url.is_empty() {
            return Err(format!("--agent {flag:?} has an empty URL in its list"));
        }
        let same = |u: &&str| u.trim_end_matches('/') == url.trim_end_matches('/');
        if urls.iter().any(same) {
            return Err(format!("--agent {flag:?} lists {url} twice"));
        }
        urls.push(url);
    }
    Ok(urls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_described_by_the_agents_message() {
        let said = |status, body| {
            let (head, message) = agent_said(status, body);
            format!("{head}: {message}")
        };
        assert_eq!(
            said(
                409,
                r#"{"error":"conflict","message":"frontend 443 has proxy_protocol v1; this request asks for v2"}"#
            ),
            "409 conflict: frontend 443 has proxy_protocol v1; this request asks for v2"
        );
        assert_eq!(said(502, "Bad Gateway\n"), "502: Bad Gateway");
        assert_eq!(said(500, r#"{"error":1}"#), r#"500: {"error":1}"#);
    }

    #[test]
    fn agent_lists_split_on_commas_and_refuse_empty_and_repeated_urls() {
        assert_eq!(agent_urls("http://a:9900").unwrap(), ["http://a:9900"]);
        assert_eq!(
            agent_urls("http://a:9900, https://b:9900/ ,http://c").unwrap(),
            ["http://a:9900", "https://b:9900/", "http://c"]
        );
        for (flag, said) in [
            ("", "--agent \"\" has an empty URL in its list"),
            (
                "http://a,",
                "--agent \"http://a,\" has an empty URL in its list",
            ),
            ("http://a,,http://b", "has an empty URL"),
            ("http://a,http://a/", "lists http://a/ twice"),
        ] {
            let e = agent_urls(flag).unwrap_err();
            assert!(e.contains(said), "{flag:?}: {e}");
        }
    }

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
