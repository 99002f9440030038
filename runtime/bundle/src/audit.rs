//! Audits: what a bundle asks for, what its component really imports, and
//! where the two disagree.
//!
//! An audit is a report for a reviewer, not a gate: inconsistencies a
//! verifier would refuse (a digest or capability mismatch, an invalid
//! signature) are listed, and the audit goes on, so one run shows every
//! problem. Only a bundle that cannot be read at all is an error.

use std::collections::BTreeSet;

use provd_domain::Capability;
use serde::Serialize;
use serde_json::Value;
use wasmparser::ComponentExternalKind;

use crate::container::RawBundle;
use crate::keys::PublicKey;
use crate::verify::{
    check_time, derive_capabilities, derive_limits, digest, parse_header, parse_manifest,
    parse_signatures,
};
use crate::wasm::{self, ALWAYS_LINKED, WASI_INTERFACES, WASI_VERSION_PREFIX};
use crate::{
    BundleError, FORMAT, MAX_BUNDLE_BYTES, MAX_HEADER_BYTES, MAX_MANIFEST_BYTES, MAX_SIGNATURES,
    TARGET, canonical,
};

/// What an audit found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Audit {
    /// The header's plugin name.
    pub name: String,
    /// The header's plugin version.
    pub version: String,
    /// The header's component digest, `blake3:<hex>`.
    pub digest: String,
    /// The component's size in bytes.
    pub component_size: u64,
    /// The header's target world.
    pub target: String,
    /// Unix seconds the bundle was built.
    pub created: u64,
    /// Unix seconds after which nodes refuse the bundle.
    pub expires: u64,
    /// Every signature, with what is known about it.
    pub signatures: Vec<SignatureReport>,
    /// The declared capabilities with their parameters (the header's).
    pub capabilities: Value,
    /// The limits the manifest requests (absent ones take the node's
    /// defaults).
    pub limits: Value,
    /// The bundle format's own limits, for the record.
    pub bundle_limits: BundleLimits,
    /// The component's top-level imports.
    pub imports: Vec<String>,
    /// The component's top-level exports, as `name (kind)`.
    pub exports: Vec<String>,
    /// Every disagreement found; empty for a consistent bundle.
    pub mismatches: Vec<String>,
}

/// The bundle format's limits.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BundleLimits {
    pub max_bundle_bytes: u64,
    pub max_header_bytes: u64,
    pub max_manifest_bytes: u64,
    pub max_signatures: usize,
}

/// One signature of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SignatureReport {
    /// Position in the signature list.
    pub index: usize,
    /// The key id the signature claims.
    pub key_id: String,
    /// Whether it was checked and how it fared.
    pub status: SignatureStatus,
}

/// What is known about one signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureStatus {
    /// Not checked: the audit had no trusted keys.
    Unverified,
    /// By a trusted key, and it verifies.
    Verified,
    /// Claims a trusted key and does not verify: tampering.
    Invalid,
    /// By a key not among the trusted ones, so not checked.
    Untrusted,
}

impl Audit {
    /// Key ids of all signatures, in order.
    pub fn signers(&self) -> Vec<&str> {
        self.signatures.iter().map(|s| s.key_id.as_str()).collect()
    }

    /// Whether some signature claims a trusted key and does not verify.
    pub fn has_invalid_signature(&self) -> bool {
        self.signatures.iter().any(|s| s.status == SignatureStatus::Invalid)
    }

    /// Whether some signature verified with a trusted key.
    pub fn has_trusted_signature(&self) -> bool {
        self.signatures.iter().any(|s| s.status == SignatureStatus::Verified)
    }

    /// No mismatch and no invalid signature.
    pub fn is_clean(&self) -> bool {
        self.mismatches.is_empty() && !self.has_invalid_signature()
    }
}

/// Audits a bundle without keys: signatures are listed, not checked.
pub fn audit(bundle: &[u8]) -> Result<Audit, BundleError> {
    audit_inner(bundle, None)
}

/// Audits a bundle, also checking each signature against `trusted` and the
/// validity period against `now` (an expired bundle is a mismatch).
pub fn audit_with(bundle: &[u8], trusted: &[PublicKey], now: u64) -> Result<Audit, BundleError> {
    audit_inner(bundle, Some((trusted, now)))
}

fn audit_inner(bundle: &[u8], check: Option<(&[PublicKey], u64)>) -> Result<Audit, BundleError> {
    let raw = RawBundle::parse(bundle)?;
    let entries = parse_signatures(raw.signatures)?;
    let header = parse_header(raw.header)?;
    let mut mismatches = Vec::new();

    let signatures = entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            let status = match check {
                None => SignatureStatus::Unverified,
                Some((trusted, _)) => {
                    let keys: Vec<&PublicKey> =
                        trusted.iter().filter(|k| k.key_id() == entry.key_id).collect();
                    if keys.is_empty() {
                        SignatureStatus::Untrusted
                    } else if entry
                        .bytes()
                        .is_some_and(|sig| keys.iter().any(|k| k.verifies(raw.header, &sig)))
                    {
                        SignatureStatus::Verified
                    } else {
                        SignatureStatus::Invalid
                    }
                }
            };
            SignatureReport { index, key_id: entry.key_id.clone(), status }
        })
        .collect();

    if header.format != FORMAT {
        mismatches.push(format!("header format is {:?}; expected {FORMAT:?}", header.format));
    }
    if header.target != TARGET {
        mismatches.push(format!("header target is {:?}; expected {TARGET:?}", header.target));
    }
    let size = raw.component.len() as u64;
    if size != header.component_size {
        mismatches
            .push(format!("component is {size} bytes; the header says {}", header.component_size));
    }
    let actual = digest(raw.component);
    if actual != header.component_digest {
        mismatches.push(format!(
            "component digest {actual} does not match the header's {}",
            header.component_digest
        ));
    }
    if header.expires < header.created {
        mismatches.push(
            BundleError::BadValidity { created: header.created, expires: header.expires }
                .to_string(),
        );
    }
    if let Some((_, now)) = check
        && let Err(e) = check_time(header.created, header.expires, now)
    {
        mismatches.push(e.to_string());
    }

    let manifest = parse_manifest(&header.manifest)?;
    if manifest.name != header.name {
        mismatches.push(format!(
            "header name {:?} is not the manifest's {:?}",
            header.name, manifest.name
        ));
    }
    if manifest.version.to_string() != header.version {
        mismatches.push(format!(
            "header version {:?} is not the manifest's {:?}",
            header.version,
            manifest.version.to_string()
        ));
    }
    let derived = derive_capabilities(&header.manifest)?;
    if derived != header.capabilities {
        mismatches.push(format!(
            "header capabilities {} are not the manifest's {}",
            canonical::to_string(&header.capabilities),
            canonical::to_string(&derived)
        ));
    }
    let limits = derive_limits(&header.manifest)?;

    let mut imports = Vec::new();
    let mut exports = Vec::new();
    match wasm::validate(raw.component).and_then(|()| wasm::interface(raw.component)) {
        Ok(interface) => {
            mismatches.extend(import_mismatches(&interface.imports, &manifest.requested()));
            let provision = interface
                .exports
                .iter()
                .any(|(name, kind)| name == "provision" && *kind == ComponentExternalKind::Func);
            if !provision {
                mismatches.push(format!(
                    "component does not export the function `provision`, so it does not fit \
                     the target world {TARGET}"
                ));
            }
            imports = interface.imports;
            exports = interface
                .exports
                .into_iter()
                .map(|(name, kind)| format!("{name} ({})", wasm::kind_name(kind)))
                .collect();
        }
        Err(e) => mismatches.push(format!("component: {e}")),
    }

    Ok(Audit {
        name: header.name,
        version: header.version,
        digest: header.component_digest,
        component_size: header.component_size,
        target: header.target,
        created: header.created,
        expires: header.expires,
        signatures,
        capabilities: header.capabilities,
        limits,
        bundle_limits: BundleLimits {
            max_bundle_bytes: MAX_BUNDLE_BYTES,
            max_header_bytes: MAX_HEADER_BYTES,
            max_manifest_bytes: MAX_MANIFEST_BYTES as u64,
            max_signatures: MAX_SIGNATURES,
        },
        imports,
        exports,
        mismatches,
    })
}

/// Compares imports with the declared capabilities by the rules of the
/// engine's `check_imports` (`runtime/engine/src/lib.rs`): WASI only from
/// the linked subset at 0.2.x, provd's type-only interfaces, and provd
/// capabilities only when declared. Also reports declared capabilities never
/// imported, which the engine allows but a reviewer should not.
fn import_mismatches(imports: &[String], declared: &[Capability]) -> Vec<String> {
    let provd_version = provd_version_prefix();
    let mut out = Vec::new();
    let mut used = BTreeSet::new();
    for name in imports {
        let (unversioned, version) = match name.split_once('@') {
            Some((u, v)) => (u, Some(v)),
            None => (name.as_str(), None),
        };
        if WASI_INTERFACES.contains(&unversioned) {
            if !version.is_some_and(|v| v.starts_with(WASI_VERSION_PREFIX)) {
                out.push(format!(
                    "imports {name}: the engine links {unversioned} only at version \
                     {WASI_VERSION_PREFIX}x, so the node would refuse it"
                ));
            }
            continue;
        }
        let provd = unversioned.starts_with(PROVD_PREFIX);
        if provd && !version.is_some_and(|v| v.starts_with(&provd_version)) {
            out.push(format!(
                "imports {name}: the target {TARGET} serves provd interfaces at version \
                 {provd_version}x only"
            ));
        }
        if ALWAYS_LINKED.contains(&unversioned) {
            continue;
        }
        match Capability::from_import(name) {
            Some(c) => {
                used.insert(c);
                if !declared.contains(&c) {
                    out.push(format!(
                        "imports {name} but plugin.toml does not declare the capability \
                         `{c}`: the node would refuse the plugin"
                    ));
                }
            }
            None if provd => out.push(format!(
                "imports {name}, which provd does not provide: the node would refuse the plugin"
            )),
            None => out.push(format!(
                "imports {name}, which is outside the WASI subset the engine links (see \
                 WASI_INTERFACES): the node would refuse the plugin"
            )),
        }
    }
    for c in declared {
        if !used.contains(c) {
            out.push(format!(
                "declares the capability `{c}` but never imports {PROVD_PREFIX}{c}: \
                 over-privilege, remove it from plugin.toml"
            ));
        }
    }
    out
}

/// Interfaces of provd's WIT package start with this (the domain crate's
/// `WIT_PACKAGE`, which it does not export, and a slash).
const PROVD_PREFIX: &str = "provd:plugin/";

/// `0.1.` for the target `provd:plugin/provisioner@0.1.0`: provd serves its
/// interfaces at the target's version, and for a 0.x package the minor
/// version is the compatibility boundary.
fn provd_version_prefix() -> String {
    let version = TARGET.rsplit_once('@').map_or("", |(_, v)| v);
    match version.rsplit_once('.') {
        Some((major_minor, _)) => format!("{major_minor}."),
        None => version.to_string(),
    }
}
