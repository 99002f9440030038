//! Image references: where an image comes from.
//!
//! | form | meaning |
//! | --- | --- |
//! | `dir:/srv/rootfs` | a directory tree on the node |
//! | `tar:/srv/img.tar`, `.tar.gz`, `.tar.zst` | a tar archive on the node (compression detected from content) |
//! | `/srv/rootfs`, `/srv/img.tar.zst` | the same, told apart by what the path is |
//! | `https://host/img.tar.zst#sha256:<hex>` | an archive over HTTP(S), verified against the digest (`sha256:` or `blake3:`) |
//!
//! Local paths must be absolute, so a reference means the same thing
//! whatever the caller's working directory. The canonical form (with its
//! `dir:` or `tar:` prefix) is what the store records.

use std::fmt;
use std::path::{Path, PathBuf};

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A directory tree.
    Dir(PathBuf),
    /// A tar archive, plain or compressed.
    Tar(PathBuf),
    /// A tar archive over HTTP(S), with the digest it must have.
    Http { url: String, digest: Digest },
}

/// The digest a downloaded archive must have.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    /// `sha256` or `blake3`.
    pub algorithm: &'static str,
    /// 64 lowercase hex characters.
    pub hex: String,
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

/// Why a reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("image reference {0:?} is empty")]
    Empty(String),
    #[error("image reference {0:?}: local paths must be absolute")]
    Relative(String),
    #[error("image reference {0:?}: {1} images are not supported by this provd yet")]
    Unsupported(String, &'static str),
    #[error("image reference {0:?}: no such file or directory")]
    Missing(String),
    #[error("image reference {0:?}: contains a control character")]
    Control(String),
    #[error(
        "image reference {0:?}: an HTTP(S) archive needs its digest, as #sha256:<hex> or #blake3:<hex>"
    )]
    MissingDigest(String),
    #[error("image reference {0:?}: {1}")]
    BadUrl(String, String),
}

impl Reference {
    /// Parses a reference; a bare path is looked at to tell a directory
    /// from an archive.
    pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
        let owned = || text.to_string();
        if text.is_empty() {
            return Err(ReferenceError::Empty(owned()));
        }
        if text.chars().any(char::is_control) {
            return Err(ReferenceError::Control(owned()));
        }
        if text.starts_with("oci://") {
            return Err(ReferenceError::Unsupported(owned(), "OCI registry"));
        }
        if text.starts_with("http://") || text.starts_with("https://") {
            return parse_http(text);
        }
        let (kind, path) = if let Some(p) = text.strip_prefix("dir:") {
            (Some(true), p)
        } else if let Some(p) = text.strip_prefix("tar:") {
            (Some(false), p)
        } else {
            (None, text)
        };
        let path = Path::new(path);
        if !path.is_absolute() {
            return Err(ReferenceError::Relative(owned()));
        }
        let is_dir = match kind {
            Some(is_dir) => is_dir,
            None => match std::fs::metadata(path) {
                Ok(m) => m.is_dir(),
                Err(_) => return Err(ReferenceError::Missing(owned())),
            },
        };
        let path = normalize(path);
        Ok(if is_dir { Reference::Dir(path) } else { Reference::Tar(path) })
    }

    /// `dir`, `tar` or `http`: the kind of source, as the store records it.
    pub fn source(&self) -> &'static str {
        match self {
            Reference::Dir(_) => "dir",
            Reference::Tar(_) => "tar",
            Reference::Http { .. } => "http",
        }
    }
}

fn parse_http(text: &str) -> Result<Reference, ReferenceError> {
    let owned = || text.to_string();
    let (url, fragment) =
        text.split_once('#').ok_or_else(|| ReferenceError::MissingDigest(owned()))?;
    let (algorithm, hex) =
        fragment.split_once(':').ok_or_else(|| ReferenceError::MissingDigest(owned()))?;
    let algorithm = match algorithm {
        "sha256" => "sha256",
        "blake3" => "blake3",
        _ => return Err(ReferenceError::MissingDigest(owned())),
    };
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
        return Err(ReferenceError::BadUrl(
            owned(),
            "the digest must be 64 lowercase hex characters".into(),
        ));
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|e| ReferenceError::BadUrl(owned(), e.to_string()))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(ReferenceError::BadUrl(owned(), "no host".into()));
    }
    // Credentials in a reference would end up in logs and the database.
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(ReferenceError::BadUrl(
            owned(),
            "credentials are not accepted in a reference".into(),
        ));
    }
    Ok(Reference::Http {
        url: parsed.to_string(),
        digest: Digest { algorithm, hex: hex.to_string() },
    })
}

/// Removes `.` components and trailing slashes without touching the
/// filesystem (`..` is kept: resolving it lexically could change meaning
/// across symlinks).
fn normalize(path: &Path) -> PathBuf {
    path.components().collect()
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Dir(p) => write!(f, "dir:{}", p.display()),
            Reference::Tar(p) => write!(f, "tar:{}", p.display()),
            Reference::Http { url, digest } => write!(f, "{url}#{digest}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_to_a_canonical_form() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        assert_eq!(Reference::parse(&d).unwrap().to_string(), format!("dir:{d}"));
        assert_eq!(Reference::parse(&format!("{d}/./")).unwrap().to_string(), format!("dir:{d}"));
        let tar = dir.path().join("x.tar");
        std::fs::write(&tar, b"").unwrap();
        let t = tar.display().to_string();
        assert_eq!(Reference::parse(&t).unwrap(), Reference::Tar(tar.clone()));
        assert_eq!(Reference::parse(&format!("tar:{t}")).unwrap(), Reference::Tar(tar));
    }

    #[test]
    fn bad_references_are_refused() {
        assert!(matches!(Reference::parse(""), Err(ReferenceError::Empty(_))));
        assert!(matches!(Reference::parse("images/x.tar"), Err(ReferenceError::Relative(_))));
        assert!(matches!(Reference::parse("/no/such/thing"), Err(ReferenceError::Missing(_))));
        assert!(matches!(
            Reference::parse("oci://127.0.0.1:5000/debian:12"),
            Err(ReferenceError::Unsupported(_, "OCI registry"))
        ));
        assert!(matches!(
            Reference::parse("https://h/x.tar"),
            Err(ReferenceError::MissingDigest(_))
        ));
        assert!(matches!(
            Reference::parse("https://h/x.tar#md5:abc"),
            Err(ReferenceError::MissingDigest(_))
        ));
        assert!(matches!(
            Reference::parse("https://h/x.tar#sha256:abc"),
            Err(ReferenceError::BadUrl(..))
        ));
        let d = "a".repeat(64);
        assert!(matches!(
            Reference::parse(&format!("https://u:p@h/x#sha256:{d}")),
            Err(ReferenceError::BadUrl(..))
        ));
        let r = Reference::parse(&format!("https://H/x.tar#blake3:{d}")).unwrap();
        assert_eq!(r.to_string(), format!("https://h/x.tar#blake3:{d}"));
        assert!(matches!(Reference::parse("/a\nb"), Err(ReferenceError::Control(_))));
    }
}
