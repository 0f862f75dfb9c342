//! Mutual TLS for the TCP transport: the three PEM files each side uses (its certificate, its
//! private key, the CA that signs the other side), checked before use so that a bad file is
//! refused with its path and the reason, and the client certificate's subject, which the
//! daemon turns into the caller's identity.

use std::path::{Path, PathBuf};

use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The files one side of a TLS connection uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate (PEM; a chain may follow the leaf).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificate(s) the other side's certificate must chain to (PEM).
    pub ca: PathBuf,
}

/// Why TLS cannot be set up from the files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    /// A file was read but is not what it must be (no PEM block, unparsable, expired…).
    #[error("the {what} {} is unusable: {reason}", path.display())]
    Invalid { what: &'static str, path: PathBuf, reason: String },
    /// rustls refused the combination (e.g. the key does not belong to the certificate).
    #[error("TLS refused the certificate {} with the key {}: {reason}", cert.display(), key.display())]
    Config { cert: PathBuf, key: PathBuf, reason: String },
}

/// The files, read and checked.
#[derive(Clone)]
pub struct TlsMaterial {
    files: TlsFiles,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    // The key's bytes never go into a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial").field("files", &self.files).finish_non_exhaustive()
    }
}

/// Each PEM file is bounded: certificates and keys are a few KiB.
const MAX_PEM_FILE: u64 = 1 << 20;

impl TlsFiles {
    /// The three files in `dir` under libvirt's names for a `role` (`server` or `client`):
    /// `{role}cert.pem`, `{role}key.pem`, `cacert.pem`.
    pub fn in_dir(dir: &Path, role: &str) -> TlsFiles {
        TlsFiles {
            cert: dir.join(format!("{role}cert.pem")),
            key: dir.join(format!("{role}key.pem")),
            ca: dir.join("cacert.pem"),
        }
    }

    /// Reads and checks the three files: each certificate parses as X.509 and is valid now,
    /// the key file holds a private key.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        let cert_pem = read(&self.cert, "certificate")?;
        check_certificates(&self.cert, "certificate", &cert_pem)?;
        refuse_exposed_key(&self.key)?;
        let key_pem = read(&self.key, "private key")?;
        if let Err(e) = PrivateKeyDer::from_pem_slice(&key_pem) {
            return Err(TlsError::Invalid {
                what: "private key",
                path: self.key.clone(),
                reason: format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) in it ({e:?})"),
            });
        }
        let ca_pem = read(&self.ca, "CA certificate")?;
        check_certificates(&self.ca, "CA certificate", &ca_pem)?;
        Ok(TlsMaterial { files: self.clone(), cert_pem, key_pem, ca_pem })
    }
}

/// A private key others can read or change is refused, as OpenSSH refuses one: whoever can
/// read it can be this side, whoever can write it can choose who this side is.
fn refuse_exposed_key(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        what: "private key",
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::Invalid {
            what: "private key",
            path: path.to_path_buf(),
            reason: format!(
                "group or others can access it (mode {mode:04o}); make it private: chmod 600 {}",
                path.display()
            ),
        });
    }
    Ok(())
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let error = |source| TlsError::Read { what, path: path.to_path_buf(), source };
    let mut bytes = Vec::new();
    std::fs::File::open(path).and_then(|f| f.take(MAX_PEM_FILE + 1).read_to_end(&mut bytes)).map_err(error)?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(TlsError::Invalid {
            what,
            path: path.to_path_buf(),
            reason: format!("it is larger than {MAX_PEM_FILE} bytes"),
        });
    }
    Ok(bytes)
}

/// Every certificate in `pem` parses and is valid now; there is at least one.
fn check_certificates(path: &Path, what: &'static str, pem: &[u8]) -> Result<(), TlsError> {
    let invalid = |reason: String| TlsError::Invalid { what, path: path.to_path_buf(), reason };
    let mut count = 0;
    for (index, der) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let der = der.map_err(|e| invalid(format!("PEM block {} is malformed ({e:?})", index + 1)))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| invalid(format!("certificate {} is not X.509: {e}", index + 1)))?;
        let validity = cert.validity();
        if !validity.is_valid() {
            let now = x509_parser::time::ASN1Time::now();
            let when = if now < validity.not_before {
                format!("it is not valid before {}", validity.not_before)
            } else {
                format!("it expired on {}", validity.not_after)
            };
            return Err(invalid(format!("certificate {} ({}): {when}", index + 1, cert.subject())));
        }
        count += 1;
    }
    if count == 0 {
        return Err(invalid("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into()));
    }
    Ok(())
}

impl TlsMaterial {
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The server's configuration: client certificates are required and must chain to the CA,
    /// so an unknown or missing certificate ends the handshake.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(false)
            // A peer that never finishes its handshake holds a task, not the listener.
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// The client's configuration for a daemon named `server_name` (its certificate must
    /// name it: a DNS name or an IP address in its subject alternative names).
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(server_name)
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// How long either side waits for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The subject's common name (CN), when it has exactly one readable CN.
    pub common_name: Option<String>,
    /// The whole subject, RFC 4514 style (`CN=alice,O=ops`), for messages and audit.
    pub subject: String,
}

impl ClientCertificate {
    /// Reads the subject of a DER certificate (the leaf a TLS handshake verified).
    pub fn from_der(der: &[u8]) -> Option<ClientCertificate> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject();
        let mut names = subject.iter_common_name();
        let common_name = match (names.next(), names.next()) {
            (Some(cn), None) => cn.as_str().ok().map(str::to_owned),
            _ => None,
        };
        Some(ClientCertificate { common_name, subject: subject.to_string() })
    }
}
