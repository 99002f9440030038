//! Signed plugin bundles: one file that carries a plugin's manifest and
//! component, the capabilities it asks for, and Ed25519 signatures over all
//! of it.
//!
//! A node accepts a plugin from the control channel only as a bundle signed by
//! a key it pins, so a bundle must be checkable by itself: this crate builds,
//! signs, verifies and audits bundles with no WebAssembly runtime (it depends
//! on neither wasmtime nor `provd-engine`), so security reviewers' tooling can
//! use it as it is.
//!
//! # Format, version 1
//!
//! All integers are little-endian.
//!
//! | offset | size | content |
//! | --- | --- | --- |
//! | 0 | 8 | magic `PROVDBND` |
//! | 8 | 2 | format version, `1` (u16) |
//! | 10 | 4 + n | `header`: u32 length n ≤ [`MAX_HEADER_BYTES`], then n bytes of canonical JSON |
//! | … | 4 + m | `component`: u32 length m, then the component's bytes |
//! | … | 4 + k | `signatures`: u32 length k ≤ [`MAX_SIGNATURES_BYTES`], then k bytes of canonical JSON |
//!
//! The three sections come in this order, each exactly once, and the file ends
//! with the last one: trailing bytes are refused. The whole file is at most
//! [`MAX_BUNDLE_BYTES`]. Every length is checked against what is left of the
//! input before anything is read, and reading allocates nothing, so a lying
//! length costs nothing.
//!
//! **Canonical JSON** is JSON with object keys sorted by their bytes, no
//! whitespace, strings escaped as `serde_json` escapes them (`"`, `\` and
//! control characters only; everything else is UTF-8 as it is), and integers
//! only. A header or signature list that is not in this form is refused, so a
//! bundle has exactly one byte representation and duplicate keys cannot make
//! two parsers read two different headers.
//!
//! The **header** is the signed payload. Its keys (shown in canonical order):
//!
//! | key | value |
//! | --- | --- |
//! | `capabilities` | the `[capabilities]` table of the manifest as a JSON object: one key per requested capability, its value the object of the parameters written in `plugin.toml` (absent parameters are absent, taking the node's defaults) |
//! | `component-digest` | `"blake3:<64 lowercase hex>"` of the component section |
//! | `component-size` | length of the component section |
//! | `created` | unix seconds when the bundle was built |
//! | `expires` | unix seconds after which nodes refuse the bundle ([`DEFAULT_VALIDITY_SECS`] after `created` by default) |
//! | `format` | `"provd-bundle/1"` |
//! | `manifest` | the `plugin.toml` text, verbatim |
//! | `name` | the manifest's name |
//! | `target` | the world the component is built for, [`TARGET`] |
//! | `version` | the manifest's version (semver) |
//!
//! `capabilities`, `name` and `version` repeat what the manifest says so a
//! reviewer reads them without parsing TOML; the verifier re-derives them
//! from `manifest` and refuses a bundle where they differ.
//!
//! The **signatures** section is a JSON list of at most [`MAX_SIGNATURES`]
//! objects `{"key-id": "<16 hex>", "signature": "<128 hex>"}`: Ed25519
//! signatures over the exact header bytes. A key id is the first 16 hex
//! digits of BLAKE3 of the 32-byte public key; it only says which pinned key
//! to try, the signature is always checked with the pinned key itself.
//! Signatures are outside the signed payload, so several parties can sign the
//! same header independently.
//!
//! # Verification
//!
//! [`verify`] fails closed. It authenticates before it interprets: the
//! framing and the signature list are the only parts read before a trusted
//! signature has been checked over the header bytes as they are (never
//! re-serialised). Then the header is parsed (unknown fields refused), and
//! the format, target, component digest and size, manifest, name, version,
//! capabilities and validity period are checked. Signatures by keys that are
//! not trusted are ignored, but a signature that claims a trusted key's id
//! and does not verify is an error.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // The smallest component: its preamble and no sections. It fits no
//! # // world, which this example does not need.
//! # let component = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
//! use provd_bundle::{SigningKey, build, sign, verify};
//!
//! let manifest = "name = \"hello\"\nversion = \"0.1.0\"\n[capabilities.log]\n";
//! let key = SigningKey::generate()?;
//! let unsigned = build(manifest, &component, 1_700_000_000, 1_800_000_000)?;
//! let signed = sign(&unsigned, &key)?;
//! let verified = verify(&signed, &[key.public_key()], 1_750_000_000)?;
//! assert_eq!(verified.name, "hello");
//! assert_eq!(verified.signer, key.key_id());
//! # Ok(())
//! # }
//! ```

mod audit;
mod canonical;
pub mod container;
mod error;
mod keys;
mod time;
mod verify;
mod wasm;

pub use audit::{Audit, BundleLimits, SignatureReport, SignatureStatus, audit, audit_with};
pub use error::BundleError;
pub use keys::{KeyError, PublicKey, SigningKey, write_key_pair};
pub use time::utc;
pub use verify::{Verified, build, sign, verify};
pub use wasm::{ALWAYS_LINKED, WASI_INTERFACES};

/// The first bytes of every bundle.
pub const MAGIC: &[u8; 8] = b"PROVDBND";
/// The container format this crate writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// The header's `format` value for [`FORMAT_VERSION`].
pub const FORMAT: &str = "provd-bundle/1";
/// The world every plugin component targets (`wit/provd.wit`).
pub const TARGET: &str = "provd:plugin/provisioner@0.1.0";

/// Largest bundle accepted. Nodes receive bundles over the control channel
/// and hold one whole in memory while verifying it; components of real
/// plugins are a few MiB, so 64 MiB leaves headroom without letting one
/// request pin a large share of a node's memory.
pub const MAX_BUNDLE_BYTES: u64 = 64 << 20;
/// Largest header accepted. It holds a manifest of at most
/// [`MAX_MANIFEST_BYTES`] (JSON escaping makes it at most six times longer,
/// for control characters) and a few short fields; 1 MiB bounds the JSON
/// parse of a header.
pub const MAX_HEADER_BYTES: u64 = 1 << 20;
/// Most signatures in one bundle. A plugin is signed by its author and
/// perhaps a reviewer or two; each extra signature by a pinned key is one
/// more Ed25519 verification a node runs for an unauthenticated sender.
pub const MAX_SIGNATURES: usize = 8;
/// Largest signature section accepted: [`MAX_SIGNATURES`] entries of about
/// 180 bytes each, with room to spare, bounding the only JSON parsed before
/// any signature is checked.
pub const MAX_SIGNATURES_BYTES: u64 = 16 << 10;
/// Largest manifest accepted: the bound `provd_domain::Manifest::from_toml`
/// applies to any `plugin.toml` before parsing it (not exported there), so a
/// bundle never carries a manifest a node would refuse for its size.
pub const MAX_MANIFEST_BYTES: usize = 64 << 10;
/// Default validity of a bundle: a year, after which a node refuses it, so
/// a bundle withheld and replayed much later (a freeze attack) goes stale.
pub const DEFAULT_VALIDITY_SECS: u64 = 365 * 24 * 60 * 60;
/// How far in the future `created` may be at verification: clocks of the
/// building machine and the node drift, but a bundle dated far ahead is
/// either wrong or an attempt to outlive its expiry check.
pub const MAX_CLOCK_SKEW_SECS: u64 = 5 * 60;
