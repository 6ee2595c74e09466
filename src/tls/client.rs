//! `lbctl`'s side of TLS: whom to trust (`--ca-file`, else the system's roots), the optional
//! client certificate for mutual TLS, and telling a certificate that does not verify (a
//! configuration error: retrying cannot fix it) from an agent that is away.

use std::path::PathBuf;

use rustls::{AlertDescription, ClientConfig, RootCertStore};

use super::{provider, read_certs, read_key, VERSIONS};

/// The client's TLS flags.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClientTlsArgs {
    /// For an https:// agent: the CA certificate(s) to trust, PEM (managed mode's
    /// `--tls-self-signed` prints which file) [default: the system's CA certificates].
    #[arg(long, env = "LBAGENT_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// For an agent that requires client certificates (`--tls-client-ca`): this one, PEM.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The private key of `--client-cert`, PEM, mode 0600.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// The rustls configuration for these flags.
pub fn config(args: &ClientTlsArgs) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match &args.ca_file {
        Some(path) => {
            for ca in read_certs(path, "--ca-file")? {
                roots
                    .add(ca)
                    .map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
            }
        }
        None => {
            // The system's store, not a list built into the binary: it follows the OS's
            // updates and the operator's own CAs (update-ca-certificates).
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "no system CA certificates found for an https:// agent; give --ca-file FILE \
                     (or set LBAGENT_CA_FILE)"
                        .into(),
                );
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    // No ALPN here: hyper-rustls offers `http/1.1` itself (enable_http1).
    let config = match (&args.client_cert, &args.client_key) {
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert, "--client-cert")?;
            let key_der = read_key(key, "--client-key")?;
            builder.with_client_auth_cert(certs, key_der).map_err(|e| {
                format!(
                    "--client-cert {} with --client-key {}: {e}",
                    cert.display(),
                    key.display()
                )
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// When `error` (or what caused it) is a TLS failure no retry can fix, what it was: the
/// agent's certificate does not verify, the agent refused ours, or one end does not speak TLS.
pub fn configuration_error(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return describe(tls);
        }
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
        {
            return Some(
                "the agent's answer is not HTTP; if it serves TLS, use an https:// URL".into(),
            );
        }
        next = match e.downcast_ref::<std::io::Error>() {
            // An io::Error's `source` skips the error it wraps: look inside instead.
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// `error` and its causes, as one line.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

fn describe(e: &rustls::Error) -> Option<String> {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(why) => Some(format!(
            "the agent's TLS certificate does not verify ({why:?}); check --ca-file and the \
             agent URL's host name"
        )),
        E::AlertReceived(
            a @ (AlertDescription::BadCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied),
        ) => Some(format!(
            "the agent refused this client's TLS certificate ({a:?}); it requires one its \
             --tls-client-ca signed: check --client-cert and --client-key"
        )),
        E::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => Some(
            "the agent's port does not speak TLS; use an http:// URL, or turn TLS on at the agent"
                .into(),
        ),
        E::NoApplicationProtocol => {
            Some("the agent does not offer HTTP/1.1 over TLS (ALPN); is it lbagent?".into())
        }
        _ => None,
    }
}

/// A configuration to build a client with when the URL is plain http:// (it is never used).
pub fn unused() -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}
