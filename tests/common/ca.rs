//! A test certificate authority made with rcgen: leaf certificates for TLS servers and clients
//! (the agent's API, etcd), written with the modes their programs want.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A test CA.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

/// The leaf's notAfter in every certificate made here (2040-01-01T00:00:00Z).
pub const NOT_AFTER: i64 = 2_208_988_800;

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for `names`; `chain` appends the CA's certificate, as a fullchain.pem does.
    pub fn leaf(&self, names: &[&str], chain: bool) -> Leaf {
        self.leaf_valid(names, chain, (2020, 2040))
    }

    /// A leaf valid from January 1st of one year to January 1st of another.
    pub fn leaf_valid(&self, names: &[&str], chain: bool, years: (i32, i32)) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let mut pem = cert.pem();
        if chain {
            pem.push_str(&self.pem());
        }
        Leaf {
            cert: pem,
            key: key.serialize_pem(),
        }
    }
}

/// Writes `text` to `path` with `mode`.
pub fn write_mode(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
