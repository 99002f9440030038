//! Why a bundle was refused.

use provd_domain::ManifestError;

use crate::time::utc;
use crate::{FORMAT_VERSION, MAX_SIGNATURES};

/// Why a bundle could not be built, signed, verified or audited. Every
/// message names the part of the bundle at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// a bundle, section or input is over its limit
    #[error("{what} is {size} bytes; at most {limit} are accepted")]
    TooLarge { what: &'static str, size: u64, limit: u64 },
    /// the file does not start with the magic bytes
    #[error("not a provd bundle: the file does not start with PROVDBND")]
    BadMagic,
    /// the container is of a format version this build does not read
    #[error(
        "bundle format version {0} is not supported; this build reads version {FORMAT_VERSION}"
    )]
    UnsupportedVersion(u16),
    /// the file ends inside a section
    #[error("bundle is truncated in its {section}: {need} bytes needed, {have} left")]
    Truncated { section: &'static str, need: u64, have: u64 },
    /// bytes follow the last section
    #[error("bundle has {0} bytes after its last section")]
    TrailingBytes(u64),
    /// the header is not valid JSON of the expected shape
    #[error("bundle header: {0}")]
    Header(String),
    /// a JSON section is valid but not in canonical form
    #[error(
        "bundle {0} is not canonical JSON (sorted keys, no whitespace, integers only, \
         no duplicate keys)"
    )]
    NotCanonical(&'static str),
    /// a header field holds a value this build does not accept
    #[error("bundle header `{field}` is {found:?}; expected {expected}")]
    Field { field: &'static str, found: String, expected: String },
    /// the signature list is malformed
    #[error("bundle signatures: {0}")]
    Signatures(String),
    /// more signatures than [`MAX_SIGNATURES`]
    #[error("bundle has {0} signatures; at most {MAX_SIGNATURES} are accepted")]
    TooManySignatures(usize),
    /// two signatures name the same key
    #[error("bundle has two signatures by key {0}")]
    DuplicateSignature(String),
    /// a signature claims a trusted key and does not verify with it
    #[error("signature {index} by key {key_id}: does not verify")]
    BadSignature { index: usize, key_id: String },
    /// no signature is by a trusted key
    #[error("{}", no_trusted(.present, .trusted))]
    NoTrustedSignature { present: Vec<String>, trusted: Vec<String> },
    /// the component's digest differs from the signed one
    #[error("component digest {actual} does not match the header's {header}")]
    DigestMismatch { actual: String, header: String },
    /// the component's size differs from the signed one
    #[error("component is {actual} bytes; the header says {header}")]
    SizeMismatch { actual: u64, header: u64 },
    /// the manifest inside the bundle is invalid
    #[error("manifest in the bundle: {0}")]
    Manifest(#[from] ManifestError),
    /// a header field disagrees with the manifest it was derived from
    #[error("header `{field}` is {header}, but the manifest's is {manifest}")]
    ManifestMismatch { field: &'static str, header: String, manifest: String },
    /// the bundle's validity period is over
    #[error("bundle expired at {} (now {})", utc(*.expires), utc(*.now))]
    Expired { expires: u64, now: u64 },
    /// the bundle says it was created later than the clock allows
    #[error("bundle was created at {}, in the future (now {})", utc(*.created), utc(*.now))]
    CreatedInFuture { created: u64, now: u64 },
    /// the validity period ends before it starts
    #[error("bundle expires at {} before it was created at {}", utc(*.expires), utc(*.created))]
    BadValidity { created: u64, expires: u64 },
    /// the component is not a WebAssembly component
    #[error("component: {0}")]
    Component(String),
}

fn no_trusted(present: &[String], trusted: &[String]) -> String {
    if present.is_empty() {
        return "bundle is not signed".into();
    }
    if trusted.is_empty() {
        return format!(
            "no trusted key to check the bundle's signatures by {}",
            present.join(", ")
        );
    }
    format!(
        "no signature by a trusted key: signed by {}; trusted keys are {}",
        present.join(", "),
        trusted.join(", ")
    )
}
