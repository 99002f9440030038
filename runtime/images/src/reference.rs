//! Image references: where an image comes from.
//!
//! | form | meaning |
//! | --- | --- |
//! | `dir:/srv/rootfs` | a directory tree on the node |
//! | `tar:/srv/img.tar`, `.tar.gz`, `.tar.zst` | a tar archive on the node (compression detected from content) |
//! | `/srv/rootfs`, `/srv/img.tar.zst` | the same, told apart by what the path is |
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
        for (scheme, what) in
            [("http://", "HTTP"), ("https://", "HTTPS"), ("oci://", "OCI registry")]
        {
            if text.starts_with(scheme) {
                return Err(ReferenceError::Unsupported(owned(), what));
            }
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

    /// `dir` or `tar`: the kind of source, as the store records it.
    pub fn source(&self) -> &'static str {
        match self {
            Reference::Dir(_) => "dir",
            Reference::Tar(_) => "tar",
        }
    }
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
        assert!(matches!(Reference::parse("/a\nb"), Err(ReferenceError::Control(_))));
    }
}
