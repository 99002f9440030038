//! Certificates made for one test: a CA, a node certificate for 127.0.0.1
//! and manager certificates, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA and the files of certificates it issued.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate.
    pub ca_pem: PathBuf,
    /// The CA's private key.
    pub ca_key: PathBuf,
}

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn fail(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

impl Pki {
    /// A new CA named `name`, its files under `dir`.
    pub fn new(dir: &Path, name: &str) -> std::io::Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("ca", e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(|e| fail("ca key", e))?;
        // The key as a file too, for `openssl ca` (revocation lists).
        let ca_key = dir.join(format!("{name}.key"));
        std::fs::write(&ca_key, key.serialize_pem())?;
        let ca = CertifiedIssuer::self_signed(params, key).map_err(|e| fail("ca", e))?;
        let ca_pem = dir.join(format!("{name}.pem"));
        std::fs::write(&ca_pem, ca.pem())?;
        Ok(Pki { dir: dir.to_path_buf(), ca, ca_pem, ca_key })
    }

    fn issue(
        &self,
        file: &str,
        cn: &str,
        organisation: Option<&str>,
        sans: Vec<String>,
        server: bool,
    ) -> std::io::Result<Identity> {
        let mut params = CertificateParams::new(sans).map_err(|e| fail(cn, e))?;
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = organisation {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().map_err(|e| fail(cn, e))?;
        let cert = params.signed_by(&key, &self.ca).map_err(|e| fail(cn, e))?;
        let id = Identity {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&id.cert, cert.pem())?;
        std::fs::write(&id.key, key.serialize_pem())?;
        Ok(id)
    }

    /// A node certificate valid for 127.0.0.1 and localhost.
    pub fn server(&self, file: &str) -> std::io::Result<Identity> {
        self.issue(file, "provd node", None, vec!["127.0.0.1".into(), "localhost".into()], true)
    }

    /// A manager certificate with common name `cn`.
    pub fn client(&self, file: &str, cn: &str) -> std::io::Result<Identity> {
        self.issue(file, cn, None, Vec::new(), false)
    }

    /// A manager certificate with common name `cn` and organisation `o`.
    pub fn client_in(&self, file: &str, cn: &str, o: &str) -> std::io::Result<Identity> {
        self.issue(file, cn, Some(o), Vec::new(), false)
    }
}
