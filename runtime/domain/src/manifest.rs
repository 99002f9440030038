//! `plugin.toml`: what a plugin says about itself and asks for.

use serde::Deserialize;

use crate::capability::Capability;

/// Longest plugin name accepted. Names become file names and database keys,
/// so they are short and drawn from a small alphabet.
pub const MAX_NAME_LEN: usize = 63;
/// Longest description accepted, so a manifest cannot smuggle a large payload
/// into logs and listings.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Largest `plugin.toml` accepted before parsing.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// A plugin's manifest, as written in `plugin.toml`.
///
/// ```toml
/// name = "hello"
/// version = "0.1.0"
/// description = "logs, reports progress and hashes its input"
///
/// [capabilities.log]
/// max-bytes = 65536
/// [capabilities.progress]
/// [capabilities.hashing]
/// max-input-bytes = 1048576
///
/// [limits]
/// memory-mib = 64
/// timeout-ms = 5000
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Manifest {
    /// Lowercase letters, digits and dashes, starting with a letter.
    pub name: String,
    /// Semantic version of this plugin build.
    pub version: semver::Version,
    /// One paragraph for people.
    #[serde(default)]
    pub description: String,
    /// Host interfaces requested; anything not listed is not linked.
    #[serde(default)]
    pub capabilities: CapabilityRequests,
    /// Resource limits requested; absent ones take the node's defaults.
    #[serde(default)]
    pub limits: LimitRequests,
}

/// The capabilities section of a manifest. A present table requests the
/// capability; its fields are the capability's parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CapabilityRequests {
    pub log: Option<LogRequest>,
    pub progress: Option<ProgressRequest>,
    pub hashing: Option<HashingRequest>,
    pub images: Option<ImagesRequest>,
    pub dedup: Option<DedupRequest>,
    pub partitions: Option<PartitionsRequest>,
    pub vm: Option<VmRequest>,
}

/// Parameters of the `vm` capability.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VmRequest {
    /// Most vCPUs of one VM.
    pub max_vcpus: Option<u32>,
    /// Most memory of one VM.
    pub max_memory_mib: Option<u64>,
    /// Hypervisors the plugin configures VMs for (default: every one the
    /// node allows).
    pub hypervisors: Option<Vec<String>>,
    /// Top-level fields of a VM spec the plugin may set differently from
    /// the spec the manager sent (default: none; see
    /// [`crate::VM_SPEC_FIELDS`]).
    #[serde(default)]
    pub may_set: Vec<String>,
}

/// Parameters of the `partitions` capability.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PartitionsRequest {
    /// Bytes (sizes guests see) the partitions of one request may total.
    pub max_bytes: Option<u64>,
}

/// Parameters of the `dedup` capability (none yet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DedupRequest {}

/// Parameters of the `images` capability.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ImagesRequest {
    /// Reference patterns the plugin may fetch, e.g. `dir:/srv/images/*`.
    pub sources: Vec<String>,
    /// Largest file `read-file` returns.
    pub max_read_bytes: Option<u64>,
}

/// Patterns one plugin may list, and the longest one.
pub const MAX_SOURCE_PATTERNS: usize = 64;
pub const MAX_PATTERN_LEN: usize = 1024;

/// Parameters of the `log` capability.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogRequest {
    /// Log bytes kept per invocation.
    pub max_bytes: Option<u64>,
}

/// Parameters of the `progress` capability (none yet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProgressRequest {}

/// Parameters of the `hashing` capability.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HashingRequest {
    /// Largest input of one call.
    pub max_input_bytes: Option<u64>,
}

/// The limits section of a manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitRequests {
    /// Total linear memory of the whole instance, all memories together.
    pub memory_mib: Option<u64>,
    /// Wall-clock deadline of one `provision` call.
    pub timeout_ms: Option<u64>,
    /// WebAssembly stack the plugin needs. The node runs every plugin with
    /// its own configured stack; a plugin needing more is refused.
    pub stack_kib: Option<u64>,
    /// Core instances in the plugin's store.
    pub instances: Option<u32>,
    /// Tables in the plugin's store.
    pub tables: Option<u32>,
    /// Elements of any one table.
    pub table_elements: Option<u64>,
    /// Linear memories in the plugin's store.
    pub memories: Option<u32>,
}

/// Why a manifest was refused. Every variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// plugin.toml is not valid: a syntax error, an unknown field or a wrong type
    #[error("plugin.toml: {0}")]
    Parse(String),
    /// plugin.toml is larger than [`MAX_MANIFEST_BYTES`]
    #[error("plugin.toml is {0} bytes; at most {MAX_MANIFEST_BYTES} are accepted")]
    TooLarge(usize),
    /// a field holds a value outside its range
    #[error("plugin.toml: `{field}` {problem}")]
    Field { field: &'static str, problem: String },
}

impl Manifest {
    /// Parses and validates a `plugin.toml`.
    pub fn from_toml(text: &str) -> Result<Manifest, ManifestError> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(text.len()));
        }
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| ManifestError::Parse(one_line(&e.to_string())))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks what serde cannot: name syntax, lengths, and that every limit
    /// present is at least 1.
    pub fn validate(&self) -> Result<(), ManifestError> {
        validate_name(&self.name)?;
        if self.description.len() > MAX_DESCRIPTION_LEN {
            return Err(field(
                "description",
                format!("is {} bytes; at most {MAX_DESCRIPTION_LEN}", self.description.len()),
            ));
        }
        let l = &self.limits;
        let positive: [(&'static str, Option<u64>); 7] = [
            ("limits.memory-mib", l.memory_mib),
            ("limits.timeout-ms", l.timeout_ms),
            ("limits.stack-kib", l.stack_kib),
            ("limits.instances", l.instances.map(u64::from)),
            ("limits.tables", l.tables.map(u64::from)),
            ("limits.table-elements", l.table_elements),
            ("limits.memories", l.memories.map(u64::from)),
        ];
        for (name, value) in positive {
            if value == Some(0) {
                return Err(field(name, "must be at least 1".into()));
            }
        }
        let c = &self.capabilities;
        if let Some(LogRequest { max_bytes: Some(0) }) = c.log {
            return Err(field("capabilities.log.max-bytes", "must be at least 1".into()));
        }
        if let Some(HashingRequest { max_input_bytes: Some(0) }) = c.hashing {
            return Err(field("capabilities.hashing.max-input-bytes", "must be at least 1".into()));
        }
        if let Some(vm) = &c.vm {
            for f in &vm.may_set {
                if !crate::VM_SPEC_FIELDS.contains(&f.as_str()) {
                    return Err(field(
                        "capabilities.vm.may-set",
                        format!(
                            "{f:?} is not a field a plugin may set; one of {}",
                            crate::VM_SPEC_FIELDS.join(", ")
                        ),
                    ));
                }
            }
        }
        if let Some(images) = &c.images {
            if images.max_read_bytes == Some(0) {
                return Err(field(
                    "capabilities.images.max-read-bytes",
                    "must be at least 1".into(),
                ));
            }
            if images.sources.is_empty() || images.sources.len() > MAX_SOURCE_PATTERNS {
                return Err(field(
                    "capabilities.images.sources",
                    format!("must list 1 to {MAX_SOURCE_PATTERNS} reference patterns"),
                ));
            }
            for pattern in &images.sources {
                crate::check_pattern(pattern, MAX_PATTERN_LEN)
                    .map_err(|why| field("capabilities.images.sources", why))?;
            }
        }
        Ok(())
    }

    /// The capabilities this manifest requests.
    pub fn requested(&self) -> Vec<Capability> {
        let c = &self.capabilities;
        let mut out = Vec::new();
        if c.log.is_some() {
            out.push(Capability::Log);
        }
        if c.progress.is_some() {
            out.push(Capability::Progress);
        }
        if c.hashing.is_some() {
            out.push(Capability::Hashing);
        }
        if c.images.is_some() {
            out.push(Capability::Images);
        }
        if c.dedup.is_some() {
            out.push(Capability::Dedup);
        }
        if c.partitions.is_some() {
            out.push(Capability::Partitions);
        }
        if c.vm.is_some() {
            out.push(Capability::Vm);
        }
        out
    }
}

fn validate_name(name: &str) -> Result<(), ManifestError> {
    let mut chars = name.chars();
    let starts_with_letter = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !starts_with_letter || !rest_ok || name.len() > MAX_NAME_LEN || name.ends_with('-') {
        return Err(field(
            "name",
            format!(
                "{name:?} is not a plugin name: use 1 to {MAX_NAME_LEN} lowercase letters, \
                 digits and inner dashes, starting with a letter"
            ),
        ));
    }
    Ok(())
}

fn field(field: &'static str, problem: String) -> ManifestError {
    ManifestError::Field { field, problem }
}

/// toml's messages span several lines with a source excerpt; an error chain
/// reads better with one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::from_toml(text)
    }

    #[test]
    fn minimal_manifest_parses() {
        let m = parse("name = \"a\"\nversion = \"1.2.3\"\n").unwrap();
        assert_eq!(m.name, "a");
        assert!(m.requested().is_empty());
    }

    #[test]
    fn unknown_top_level_field_is_named() {
        let err = parse("name = \"a\"\nversion = \"1.0.0\"\nflavour = 1\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `flavour`"), "{err}");
    }

    #[test]
    fn unknown_capability_is_named() {
        let err = parse("name = \"a\"\nversion = \"1.0.0\"\n[capabilities.network]\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `network`"), "{err}");
    }

    #[test]
    fn unknown_limit_is_named() {
        let err = parse("name = \"a\"\nversion = \"1.0.0\"\n[limits]\ncpu = 3\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `cpu`"), "{err}");
    }

    #[test]
    fn zero_limit_is_refused_by_field() {
        let err =
            parse("name = \"a\"\nversion = \"1.0.0\"\n[limits]\nmemory-mib = 0\n").unwrap_err();
        assert_eq!(
            err,
            ManifestError::Field {
                field: "limits.memory-mib",
                problem: "must be at least 1".into()
            }
        );
    }

    #[test]
    fn negative_limit_is_a_type_error() {
        let err =
            parse("name = \"a\"\nversion = \"1.0.0\"\n[limits]\ntimeout-ms = -5\n").unwrap_err();
        assert!(err.to_string().contains("timeout-ms"), "{err}");
    }

    #[test]
    fn bad_names_are_refused() {
        for name in ["", "A", "1a", "a_b", "a-", "a/b", "../x", &"a".repeat(64)] {
            let text = format!("name = {name:?}\nversion = \"1.0.0\"\n");
            let err = parse(&text).unwrap_err();
            assert!(matches!(err, ManifestError::Field { field: "name", .. }), "{name}: {err}");
        }
    }

    #[test]
    fn bad_version_is_refused() {
        let err = parse("name = \"a\"\nversion = \"one\"\n").unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
    }

    #[test]
    fn oversized_manifest_is_refused_before_parsing() {
        let text =
            format!("name = \"a\"\nversion = \"1.0.0\"\n#{}\n", "x".repeat(MAX_MANIFEST_BYTES));
        assert!(matches!(parse(&text), Err(ManifestError::TooLarge(_))));
    }
}
