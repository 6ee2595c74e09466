//! Managed mode's `--tls-self-signed`: a certificate made on first start in
//! `STATE_DIR/tls/` (`cert.pem`, and `key.pem` mode 0600) and reused on later starts, so the
//! sidecars' `--ca-file` stays valid. The certificate is its own CA: `cert.pem` is the file
//! to give `lbctl --ca-file`. A new one is made only when a wanted name is missing from it or
//! it expires within 30 days.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use x509_parser::extensions::GeneralName;

use super::ServerFiles;

/// Years a made certificate is valid.
const VALID_YEARS: i32 = 10;

/// A certificate expiring sooner than this is replaced at start.
const RENEW_BEFORE_SECS: i64 = 30 * 86_400;

/// What [`ensure`] did.
pub struct SelfSigned {
    pub files: ServerFiles,
    /// True when the certificate was made now (first start, or new names).
    pub made: bool,
}

/// The names a self-signed certificate covers: loopback in every spelling, the listen
/// address when it is a specific one, and `extra` (`--tls-self-signed-names`).
pub fn wanted_names(listen: SocketAddr, extra: &[String]) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .map(String::from)
        .collect();
    if !listen.ip().is_unspecified() {
        names.insert(listen.ip().to_string());
    }
    names.extend(
        extra
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty()),
    );
    names
}

/// Reuses the certificate in `dir` if it covers `names` and is not about to expire, else
/// makes one.
pub fn ensure(dir: &Path, names: &BTreeSet<String>) -> Result<SelfSigned, String> {
    let files = ServerFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        client_ca: None,
    };
    if files.cert.exists() && files.key.exists() {
        match covers(&files.cert, names) {
            Ok(true) => return Ok(SelfSigned { files, made: false }),
            Ok(false) => {
                tracing::info!("the self-signed certificate lacks a wanted name or expires soon; making a new one")
            }
            Err(e) => return Err(e),
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    make(&files, names)?;
    Ok(SelfSigned { files, made: true })
}

/// Whether the certificate names everything in `names` and lives 30 more days.
fn covers(cert: &Path, names: &BTreeSet<String>) -> Result<bool, String> {
    let certs = super::read_certs(cert, "--tls-self-signed: the certificate")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(certs[0].as_ref())
        .map_err(|e| format!("{}: not an X.509 certificate: {e}", cert.display()))?;
    let mut has = BTreeSet::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => {
                    has.insert(d.to_string());
                }
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    has.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    let now = crate::clock::unix_seconds() as i64;
    Ok(names.is_subset(&has) && parsed.validity().not_after.timestamp() > now + RENEW_BEFORE_SECS)
}

fn make(files: &ServerFiles, names: &BTreeSet<String>) -> Result<(), String> {
    let fail = |e: rcgen::Error| format!("--tls-self-signed: cannot make a certificate: {e}");
    let mut params =
        rcgen::CertificateParams::new(names.iter().cloned().collect::<Vec<_>>()).map_err(fail)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lbagent self-signed");
    let year = 1970 + (crate::clock::unix_seconds() / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    // The key first: a cert.pem without its key is never left behind.
    write_atomically(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&files.cert, cert.pem().as_bytes(), 0o644)
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let io = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn made_once_reused_after_and_made_again_for_a_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "10.0.0.5:9900".parse().unwrap();
        let names = wanted_names(listen, &[]);
        assert_eq!(
            names.iter().map(String::as_str).collect::<Vec<_>>(),
            ["10.0.0.5", "127.0.0.1", "::1", "localhost"]
        );
        let first = ensure(dir.path(), &names).unwrap();
        assert!(first.made);
        let mode = std::fs::metadata(&first.files.key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let pem = std::fs::read(&first.files.cert).unwrap();

        let again = ensure(dir.path(), &names).unwrap();
        assert!(!again.made);
        assert_eq!(std::fs::read(&again.files.cert).unwrap(), pem);

        let more = wanted_names(listen, &["lb.example.com".into()]);
        let renewed = ensure(dir.path(), &more).unwrap();
        assert!(renewed.made);
        assert!(covers(&renewed.files.cert, &more).unwrap());
        // Any address: no specific address is added.
        assert_eq!(wanted_names("0.0.0.0:9900".parse().unwrap(), &[]).len(), 3);
    }
}
