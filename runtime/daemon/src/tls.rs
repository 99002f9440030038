//! The server's TLS configuration: the node's certificate, and mutual TLS
//! against the managers' CA. A client without a certificate signed by that
//! CA never reaches HTTP: the handshake fails.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::access::Subject;
use crate::config::TlsConfig;

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

/// Every CRL in a PEM file; an empty file is an error (a revocation list
/// that silently lists nothing would let every revoked manager back in).
pub fn crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let pem = read(path)?;
    let err = |message: String| TlsError::Pem { path: path.display().to_string(), message };
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if crls.is_empty() {
        return Err(err("no X509 CRL block".into()));
    }
    Ok(crls)
}

/// The server configuration of `tls`: the node's certificate and key, and a
/// client certificate issued by a CA in `client-ca` and, when `crl` is set,
/// not revoked by it. Read again on SIGHUP.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in certificates(&tls.client_ca)? {
        roots.add(ca).map_err(|e| TlsError::Pem {
            path: tls.client_ca.display().to_string(),
            message: e.to_string(),
        })?;
    }
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if let Some(path) = &tls.crl {
        // Only the manager's own certificate is looked up: the CA is the
        // root, which no CRL of its own lists. A manager certificate from a
        // CA without a CRL here fails (unknown status is refused), so every
        // CA in client-ca needs its list once any is given.
        verifier = verifier.with_crls(crls(path)?).only_check_end_entity_revocation();
    }
    let verifier = verifier.build().map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(&tls.cert)?, private_key(&tls.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The subject of a client certificate: the one common name of its subject,
/// as the audit trail names the manager, and its organisations, as roles
/// read groups. A subject with several common names (which one a CA checked
/// is not known), a name provd uses for itself (`local`, `provd`), or
/// control characters (which would forge lines in a listing) is refused.
pub fn peer_subject(cert: &CertificateDer<'_>) -> Result<Subject, String> {
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    const O_OID: &[u8] = &[0x55, 0x04, 0x0a];
    let names =
        subject_attributes(cert.as_ref(), CN_OID).ok_or("the certificate cannot be read")?;
    let [name] = names.as_slice() else {
        return Err(format!("the subject has {} common names; one is needed", names.len()));
    };
    if matches!(name.as_str(), "local" | "provd" | "unnamed-client") {
        return Err(format!("the common name {name:?} is reserved"));
    }
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err("the common name is empty or has control characters".into());
    }
    // An unreadable or control-character organisation is no group at all.
    let groups = subject_attributes(cert.as_ref(), O_OID)
        .unwrap_or_default()
        .into_iter()
        .filter(|g| !g.is_empty() && !g.chars().any(char::is_control))
        .collect();
    Ok(Subject { name: name.clone(), groups })
}

/// One DER element: (tag, content, rest).
fn tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = rest.get(..n)?;
        let len = bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest.get(n..)?)
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

/// The values of one attribute of the subject, read from the certificate's
/// DER structure (Certificate → TBSCertificate → subject → RDNs), so that no
/// other name in the certificate (the issuer's, one inside an extension) can
/// stand in for it. Reading two attributes does not justify an X.509 parser
/// dependency.
fn subject_attributes(der: &[u8], wanted: &[u8]) -> Option<Vec<String>> {
    const SEQUENCE: u8 = 0x30;
    let (tag, cert, _) = tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut fields = tbs;
    // [0] version is optional; then serial, signature, issuer, validity.
    let (tag, _, rest) = tlv(fields)?;
    fields = if tag == 0xa0 { tlv(rest)?.2 } else { rest };
    for _ in 0..3 {
        fields = tlv(fields)?.2;
    }
    let (tag, mut rdns, _) = tlv(fields)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut found = Vec::new();
    while !rdns.is_empty() {
        let (_, set, rest) = tlv(rdns)?;
        rdns = rest;
        let mut attrs = set;
        while !attrs.is_empty() {
            let (_, attr, rest) = tlv(attrs)?;
            attrs = rest;
            let (_, oid, value) = tlv(attr)?;
            let (vtag, value, _) = tlv(value)?;
            if oid == wanted {
                // UTF8String, PrintableString, IA5String; another string
                // type still counts as a value, unreadable.
                let text = match vtag {
                    0x0c | 0x13 | 0x16 => String::from_utf8_lossy(value).into_owned(),
                    _ => "\u{0}".into(),
                };
                found.push(text);
            }
        }
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_actor_is_the_subject_common_name_even_when_long() {
        use rcgen::{CertificateParams, DnType, KeyPair};
        for cn in ["manager-1", &"m".repeat(300)] {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.distinguished_name.push(DnType::OrganizationName, "sre");
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            assert_eq!(peer_subject(cert.der()).unwrap().name, cn);
            assert_eq!(peer_subject(cert.der()).unwrap().groups, ["sre"]);
        }
        assert!(peer_subject(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
        let named = |cns: &[&str]| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            for cn in cns {
                params.distinguished_name.push(DnType::CommonName, *cn);
            }
            params.self_signed(&KeyPair::generate().unwrap()).unwrap()
        };
        // rcgen keeps one value per attribute type: a reserved name and a
        // control character are refused.
        assert!(peer_subject(named(&["local"]).der()).is_err());
        assert!(peer_subject(named(&["a\nb"]).der()).is_err());
    }
}
