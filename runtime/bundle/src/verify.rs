//! Building, signing and verifying bundles.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::container::RawBundle;
use crate::keys::{PublicKey, SigningKey};
use crate::{
    BundleError, FORMAT, MAX_BUNDLE_BYTES, MAX_CLOCK_SKEW_SECS, MAX_HEADER_BYTES,
    MAX_MANIFEST_BYTES, MAX_SIGNATURES, TARGET, canonical, wasm,
};

/// A bundle that passed [`verify`]: what a node may load.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The plugin's name (header and manifest agree).
    pub name: String,
    /// The plugin's version (header and manifest agree).
    pub version: semver::Version,
    /// The parsed and validated manifest.
    pub manifest: provd_domain::Manifest,
    /// The manifest's text, as signed.
    pub manifest_text: String,
    /// The component's bytes, matching the signed digest and size.
    pub component: Vec<u8>,
    /// `blake3:<hex>` of the component.
    pub digest: String,
    /// Key id of the first trusted key whose signature verified.
    pub signer: String,
    /// Unix seconds the bundle was built.
    pub created: u64,
    /// Unix seconds after which the bundle is refused.
    pub expires: u64,
}

/// The header as signed. Field order is irrelevant to the bytes (they are
/// written canonically); unknown fields are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct Header {
    pub format: String,
    pub name: String,
    pub version: String,
    pub manifest: String,
    pub capabilities: Value,
    pub component_digest: String,
    pub component_size: u64,
    pub target: String,
    pub created: u64,
    pub expires: u64,
}

/// One entry of the signature list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct SignatureEntry {
    pub key_id: String,
    pub signature: String,
}

impl SignatureEntry {
    /// The 64 signature bytes; the list parser has checked the hex.
    pub(crate) fn bytes(&self) -> Option<[u8; 64]> {
        let bytes = hex_decode(&self.signature)?;
        <[u8; 64]>::try_from(bytes.as_slice()).ok()
    }
}

/// Builds an unsigned bundle: validates the manifest, checks that the
/// component is a valid component (not a core module), computes its digest,
/// derives the capabilities and writes the header.
pub fn build(
    manifest_toml: &str,
    component: &[u8],
    created: u64,
    expires: u64,
) -> Result<Vec<u8>, BundleError> {
    let manifest = parse_manifest(manifest_toml)?;
    if expires < created {
        return Err(BundleError::BadValidity { created, expires });
    }
    let size = component.len() as u64;
    if size > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge { what: "component", size, limit: MAX_BUNDLE_BYTES });
    }
    wasm::validate(component).map_err(BundleError::Component)?;
    let header = json!({
        "format": FORMAT,
        "name": manifest.name,
        "version": manifest.version.to_string(),
        "manifest": manifest_toml,
        "capabilities": derive_capabilities(manifest_toml)?,
        "component-digest": digest(component),
        "component-size": size,
        "target": TARGET,
        "created": created,
        "expires": expires,
    });
    let header = canonical::to_string(&header);
    RawBundle { header: header.as_bytes(), component, signatures: b"[]" }.to_bytes()
}

/// Adds `key`'s signature to `bundle`. The bundle's contents are checked
/// first (as [`verify`] does, but without trusted keys or a clock), so a key
/// never signs a bundle a node would refuse for its contents. Signing twice
/// with the same key returns the bundle unchanged.
pub fn sign(bundle: &[u8], key: &SigningKey) -> Result<Vec<u8>, BundleError> {
    let raw = RawBundle::parse(bundle)?;
    let mut entries = parse_signatures(raw.signatures)?;
    let header = parse_header(raw.header)?;
    check_contents(&header, raw.component)?;
    let key_id = key.key_id();
    let signature = hex_encode(&key.sign_bytes(raw.header));
    if entries.iter().any(|e| e.key_id == key_id && e.signature == signature) {
        return Ok(bundle.to_vec());
    }
    // A different signature under this key's id is not this key's (Ed25519
    // is deterministic): replace it rather than carry a signature that can
    // only fail.
    entries.retain(|e| e.key_id != key_id);
    if entries.len() >= MAX_SIGNATURES {
        return Err(BundleError::TooManySignatures(entries.len() + 1));
    }
    entries.push(SignatureEntry { key_id, signature });
    let list = signatures_json(&entries);
    RawBundle { signatures: list.as_bytes(), ..raw }.to_bytes()
}

/// Verifies `bundle` against the pinned `trusted` keys at unix time `now`,
/// failing closed on every check (see the crate documentation for the
/// order).
pub fn verify(bundle: &[u8], trusted: &[PublicKey], now: u64) -> Result<Verified, BundleError> {
    let raw = RawBundle::parse(bundle)?;
    let entries = parse_signatures(raw.signatures)?;
    let signer = trusted_signer(&entries, raw.header, trusted)?;
    // Only now, with the header authenticated, is its content interpreted.
    let header = parse_header(raw.header)?;
    let manifest = check_contents(&header, raw.component)?;
    check_time(header.created, header.expires, now)?;
    Ok(Verified {
        name: header.name,
        version: manifest.version.clone(),
        manifest,
        manifest_text: header.manifest,
        component: raw.component.to_vec(),
        digest: header.component_digest,
        signer,
        created: header.created,
        expires: header.expires,
    })
}

/// The first trusted key whose signature verifies. Signatures by keys not
/// trusted are skipped; one that names a trusted key and fails is an error,
/// because a trusted party's signature that does not check is a sign of
/// tampering, never noise.
fn trusted_signer(
    entries: &[SignatureEntry],
    header: &[u8],
    trusted: &[PublicKey],
) -> Result<String, BundleError> {
    let mut signer = None;
    for (index, entry) in entries.iter().enumerate() {
        let keys: Vec<&PublicKey> = trusted.iter().filter(|k| k.key_id() == entry.key_id).collect();
        if keys.is_empty() {
            continue;
        }
        let verifies =
            entry.bytes().is_some_and(|sig| keys.iter().any(|k| k.verifies(header, &sig)));
        if !verifies {
            return Err(BundleError::BadSignature { index, key_id: entry.key_id.clone() });
        }
        signer.get_or_insert_with(|| entry.key_id.clone());
    }
    signer.ok_or_else(|| BundleError::NoTrustedSignature {
        present: entries.iter().map(|e| e.key_id.clone()).collect(),
        trusted: trusted.iter().map(PublicKey::key_id).collect(),
    })
}

/// Parses the header: size, canonical form, shape, unknown fields.
pub(crate) fn parse_header(bytes: &[u8]) -> Result<Header, BundleError> {
    let size = bytes.len() as u64;
    if size > MAX_HEADER_BYTES {
        return Err(BundleError::TooLarge { what: "header", size, limit: MAX_HEADER_BYTES });
    }
    let header: Header =
        serde_json::from_slice(bytes).map_err(|e| BundleError::Header(e.to_string()))?;
    if !canonical::is_canonical(bytes) {
        return Err(BundleError::NotCanonical("header"));
    }
    Ok(header)
}

/// Parses the signature list: canonical, at most [`MAX_SIGNATURES`], well-
/// formed ids and signatures, no key twice.
pub(crate) fn parse_signatures(bytes: &[u8]) -> Result<Vec<SignatureEntry>, BundleError> {
    // The section is at most MAX_SIGNATURES_BYTES (checked by the
    // container), which bounds this generic parse.
    let raw: Vec<Value> =
        serde_json::from_slice(bytes).map_err(|e| BundleError::Signatures(e.to_string()))?;
    if raw.len() > MAX_SIGNATURES {
        return Err(BundleError::TooManySignatures(raw.len()));
    }
    let mut entries: Vec<SignatureEntry> = Vec::with_capacity(raw.len());
    for (index, item) in raw.into_iter().enumerate() {
        let entry: SignatureEntry = serde_json::from_value(item)
            .map_err(|e| BundleError::Signatures(format!("signature {index}: {e}")))?;
        if entry.key_id.len() != 16 || !is_lower_hex(&entry.key_id) {
            return Err(BundleError::Signatures(format!(
                "signature {index}: key id {:?} is not 16 lowercase hex digits",
                entry.key_id
            )));
        }
        if entry.signature.len() != 128 || !is_lower_hex(&entry.signature) {
            return Err(BundleError::Signatures(format!(
                "signature {index} by key {}: not 128 lowercase hex digits",
                entry.key_id
            )));
        }
        if entries.iter().any(|e| e.key_id == entry.key_id) {
            return Err(BundleError::DuplicateSignature(entry.key_id));
        }
        entries.push(entry);
    }
    if !canonical::is_canonical(bytes) {
        return Err(BundleError::NotCanonical("signature list"));
    }
    Ok(entries)
}

fn signatures_json(entries: &[SignatureEntry]) -> String {
    let list: Vec<Value> =
        entries.iter().map(|e| json!({ "key-id": e.key_id, "signature": e.signature })).collect();
    canonical::to_string(&Value::Array(list))
}

/// Everything about a header and component that does not need keys or a
/// clock: format, target, component digest and size, that it is a
/// component, the manifest, and that name, version and capabilities are the
/// manifest's.
pub(crate) fn check_contents(
    header: &Header,
    component: &[u8],
) -> Result<provd_domain::Manifest, BundleError> {
    if header.format != FORMAT {
        return Err(BundleError::Field {
            field: "format",
            found: header.format.clone(),
            expected: format!("{FORMAT:?}"),
        });
    }
    if header.target != TARGET {
        return Err(BundleError::Field {
            field: "target",
            found: header.target.clone(),
            expected: format!("{TARGET:?}"),
        });
    }
    let size = component.len() as u64;
    if size != header.component_size {
        return Err(BundleError::SizeMismatch { actual: size, header: header.component_size });
    }
    let actual = digest(component);
    if actual != header.component_digest {
        return Err(BundleError::DigestMismatch {
            actual,
            header: header.component_digest.clone(),
        });
    }
    wasm::check_preamble(component).map_err(BundleError::Component)?;
    if header.expires < header.created {
        return Err(BundleError::BadValidity { created: header.created, expires: header.expires });
    }
    let manifest = parse_manifest(&header.manifest)?;
    if header.name != manifest.name {
        return Err(BundleError::ManifestMismatch {
            field: "name",
            header: format!("{:?}", header.name),
            manifest: format!("{:?}", manifest.name),
        });
    }
    let version = manifest.version.to_string();
    if header.version != version {
        return Err(BundleError::ManifestMismatch {
            field: "version",
            header: format!("{:?}", header.version),
            manifest: format!("{version:?}"),
        });
    }
    let derived = derive_capabilities(&header.manifest)?;
    if header.capabilities != derived {
        return Err(BundleError::ManifestMismatch {
            field: "capabilities",
            header: canonical::to_string(&header.capabilities),
            manifest: canonical::to_string(&derived),
        });
    }
    Ok(manifest)
}

/// Refuses an expired bundle or one created too far in the future.
pub(crate) fn check_time(created: u64, expires: u64, now: u64) -> Result<(), BundleError> {
    if now > expires {
        return Err(BundleError::Expired { expires, now });
    }
    if created > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(BundleError::CreatedInFuture { created, now });
    }
    Ok(())
}

/// Parses and validates a manifest, with the bundle's size bound first.
pub(crate) fn parse_manifest(text: &str) -> Result<provd_domain::Manifest, BundleError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(BundleError::TooLarge {
            what: "manifest",
            size: text.len() as u64,
            limit: MAX_MANIFEST_BYTES as u64,
        });
    }
    Ok(provd_domain::Manifest::from_toml(text)?)
}

/// The `[capabilities]` table of a manifest as a JSON object.
///
/// Taken from the TOML table rather than from the typed `Manifest` so that
/// every parameter is carried, including ones added to the domain crate
/// later; it is only called on text that `Manifest::from_toml` accepted,
/// which refuses unknown capabilities and parameters, so the table holds
/// exactly what the node will read.
pub(crate) fn derive_capabilities(manifest_toml: &str) -> Result<Value, BundleError> {
    table_json(manifest_toml, "capabilities")
}

/// The `[limits]` table of a manifest as a JSON object.
pub(crate) fn derive_limits(manifest_toml: &str) -> Result<Value, BundleError> {
    table_json(manifest_toml, "limits")
}

fn table_json(manifest_toml: &str, key: &str) -> Result<Value, BundleError> {
    let table: toml::Table = toml::from_str(manifest_toml).map_err(|e| {
        BundleError::Manifest(provd_domain::ManifestError::Parse(e.message().to_string()))
    })?;
    match table.get(key) {
        None => Ok(Value::Object(Map::new())),
        Some(value) => toml_to_json(value, key),
    }
}

/// TOML to JSON for the values a manifest holds. Floats and dates are
/// refused: no manifest parameter has them, and floats have no single
/// canonical spelling.
fn toml_to_json(value: &toml::Value, path: &str) -> Result<Value, BundleError> {
    let refuse = |what: &str| {
        Err(BundleError::Manifest(provd_domain::ManifestError::Parse(format!(
            "`{path}` is a {what}; bundles carry only strings, integers, booleans, arrays and \
             tables"
        ))))
    };
    Ok(match value {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Float(_) => return refuse("float"),
        toml::Value::Datetime(_) => return refuse("date"),
        toml::Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| toml_to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(table) => Value::Object(
            table
                .iter()
                .map(|(k, v)| Ok((k.clone(), toml_to_json(v, &format!("{path}.{k}"))?)))
                .collect::<Result<_, BundleError>>()?,
        ),
    })
}

/// `blake3:<hex>` of `bytes`.
pub(crate) fn digest(bytes: &[u8]) -> String {
    format!("blake3:{}", blake3::hash(bytes).to_hex())
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
        .collect()
}
