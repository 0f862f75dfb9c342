//! Certificates for the TLS tests: a CA made per test and the PEM files it issues, laid out
//! as libvirt lays them out (`cacert.pem`, `{role}cert.pem`, `{role}key.pem`).

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    // Private keys must be private (the host refuses others like OpenSSH does).
    if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("key.pem")) {
        crate::set_mode(path, 0o600);
    }
}

/// A certificate authority made for the test.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate (what `cacert.pem` holds).
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// Writes `{role}cert.pem` and `{role}key.pem` (signed by this CA, subject `CN=cn`) and
    /// `trusted`'s `cacert.pem` into `dir`, libvirt's layout.
    pub fn issue(&self, dir: &Path, role: &str, cn: &str, sans: &[&str], trusted: &Ca) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap_or_else(|e| panic!("{e}"));
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = params.signed_by(&key, &self.issuer).unwrap_or_else(|e| panic!("{e}"));
        write(&dir.join(format!("{role}cert.pem")), &cert.pem());
        write(&dir.join(format!("{role}key.pem")), &key.serialize_pem());
        write(&dir.join("cacert.pem"), &trusted.pem);
    }
}
