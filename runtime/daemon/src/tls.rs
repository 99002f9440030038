//! The server's TLS configuration: the node's certificate, and mutual TLS
//! against the managers' CA. A client without a certificate signed by that
//! CA never reaches HTTP: the handshake fails.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

/// Every certificate in a PEM file; an empty file is an error.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let err = |message: String| TlsError::Pem { path: path.display().to_string(), message };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| TlsError::Pem { path: path.display().to_string(), message: e.to_string() })
}

/// The server configuration for `cert`/`key`, requiring a client
/// certificate issued by a CA in `client_ca`.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in certificates(client_ca)? {
        roots.add(ca).map_err(|e| TlsError::Pem {
            path: client_ca.display().to_string(),
            message: e.to_string(),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(cert)?, private_key(key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The subject of a client certificate, as the audit trail names the
/// manager: its first common name, else its serial number.
pub fn peer_name(cert: &CertificateDer<'_>) -> String {
    // Reading one attribute does not justify an X.509 parser dependency:
    // the common name is the UTF8String/PrintableString after the CN OID
    // (2.5.4.3) in the DER; the issuer's CN comes first, the subject's
    // last, so the last match is the subject.
    const CN_OID: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];
    let der = cert.as_ref();
    let mut found = None;
    let mut i = 0;
    while let Some(window) = der.get(i..i + CN_OID.len()) {
        if window == CN_OID
            && let (Some(&tag), Some(&len)) = (der.get(i + 5), der.get(i + 6))
            && matches!(tag, 0x0c | 0x13 | 0x16)
            && len < 0x80
            && let Some(value) = der.get(i + 7..i + 7 + usize::from(len))
        {
            found = Some(String::from_utf8_lossy(value).into_owned());
        }
        i += 1;
    }
    found.unwrap_or_else(|| "unnamed-client".into())
}
