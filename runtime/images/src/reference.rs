//! Image references: where an image comes from.
//!
//! | form | meaning |
//! | --- | --- |
//! | `dir:/srv/rootfs` | a directory tree on the node |
//! | `tar:/srv/img.tar`, `.tar.gz`, `.tar.zst` | a tar archive on the node (compression detected from content) |
//! | `/srv/rootfs`, `/srv/img.tar.zst` | the same, told apart by what the path is |
//! | `https://host/img.tar.zst#sha256:<hex>` | an archive over HTTP(S), verified against the digest (`sha256:` or `blake3:`) |
//! | `oci://registry[:port]/repo:tag`, `oci://…/repo@sha256:<hex>` | an image in an OCI distribution registry over HTTPS (`oci+http://` for plain HTTP) |
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
    /// An image in an OCI distribution registry.
    Oci(OciRef),
}

/// Where an image lives in a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OciRef {
    /// Plain HTTP instead of HTTPS (`oci+http://`), for registries on a
    /// trusted local network.
    pub plain_http: bool,
    /// `host[:port]`.
    pub registry: String,
    /// `name/space/repo`.
    pub repository: String,
    /// A tag, or a manifest digest `sha256:<hex>`.
    pub tag_or_digest: String,
}

impl OciRef {
    pub fn is_digest(&self) -> bool {
        self.tag_or_digest.starts_with("sha256:")
    }
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
    /// A path that could climb, or name one place two ways: `.`, `..`,
    /// an empty component, an encoded or look-alike separator.
    #[error("image reference {0:?}: {1}")]
    BadPath(String, String),
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
        if let Some(rest) = text.strip_prefix("oci://") {
            return parse_oci(text, rest, false);
        }
        if let Some(rest) = text.strip_prefix("oci+http://") {
            return parse_oci(text, rest, true);
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
        check_local_path(text, path)?;
        let path = Path::new(path);
        let is_dir = match kind {
            Some(is_dir) => is_dir,
            None => match std::fs::symlink_metadata(path) {
                Ok(m) => m.is_dir(),
                Err(_) => return Err(ReferenceError::Missing(owned())),
            },
        };
        let path = path.to_path_buf();
        Ok(if is_dir { Reference::Dir(path) } else { Reference::Tar(path) })
    }

    /// `dir`, `tar` or `http`: the kind of source, as the store records it.
    pub fn source(&self) -> &'static str {
        match self {
            Reference::Dir(_) => "dir",
            Reference::Tar(_) => "tar",
            Reference::Http { .. } => "http",
            Reference::Oci(_) => "oci",
        }
    }
}

fn parse_oci(text: &str, rest: &str, plain_http: bool) -> Result<Reference, ReferenceError> {
    let bad = |why: &str| ReferenceError::BadUrl(text.to_string(), why.to_string());
    check_url_path(text, rest)?;
    let (registry, path) = rest.split_once('/').ok_or_else(|| bad("no repository"))?;
    if registry.is_empty()
        || !registry.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
    {
        return Err(bad("bad registry host"));
    }
    let (repository, tag_or_digest) = if let Some((repo, digest)) = path.split_once('@') {
        let hex = digest.strip_prefix("sha256:").ok_or_else(|| bad("digests are sha256:<hex>"))?;
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
            return Err(bad("the digest must be 64 lowercase hex characters"));
        }
        (repo, digest.to_string())
    } else {
        // The tag follows the last ':' of the last path component.
        let (repo, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, tag),
            _ => (path, "latest"),
        };
        // `[\w][\w.-]{0,127}`, as the distribution spec has it.
        let tag_ok = tag.len() <= 128
            && tag.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && tag.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !tag_ok {
            return Err(bad("bad tag"));
        }
        (repo, tag.to_string())
    };
    // Repository names per the distribution spec: components of [a-z0-9]
    // joined by `.`, `_`, `__` or runs of `-`, so no component is `.`, `..`
    // or starts or ends with a separator.
    let repo_ok = !repository.is_empty()
        && repository.len() <= 255
        && repository.split('/').all(repository_component);
    if !repo_ok {
        return Err(bad("bad repository name"));
    }
    Ok(Reference::Oci(OciRef {
        plain_http,
        registry: registry.to_string(),
        repository: repository.to_string(),
        tag_or_digest,
    }))
}

/// One component of a repository name:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn repository_component(c: &str) -> bool {
    let alnum = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit();
    if !c.chars().next().is_some_and(alnum) || !c.chars().last().is_some_and(alnum) {
        return false;
    }
    let mut run = String::new();
    for ch in c.chars() {
        if alnum(ch) {
            let ok = run.is_empty()
                || run == "."
                || run == "_"
                || run == "__"
                || run.bytes().all(|x| x == b'-');
            if !ok {
                return false;
            }
            run.clear();
        } else if "._-".contains(ch) {
            run.push(ch);
        } else {
            return false;
        }
    }
    true
}

fn parse_http(text: &str) -> Result<Reference, ReferenceError> {
    let owned = || text.to_string();
    let rest = text.split_once("://").map(|(_, r)| r).unwrap_or_default();
    check_url_path(text, rest)?;
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

/// Characters that are, or stand in for, a path separator or a dot in some
/// decoder: a reference carrying one is refused rather than interpreted.
const LOOKALIKES: [char; 6] = ['\\', '\u{2215}', '\u{2044}', '\u{ff0f}', '\u{ff3c}', '\u{29f8}'];

/// Percent-encodings of `/`, `\`, `.` and NUL: a later decoder (an HTTP
/// server, a registry) would see a separator or a climb the checks here did
/// not.
fn encoded_separator(text: &str) -> Option<&'static str> {
    let lower = text.to_ascii_lowercase();
    ["%2f", "%5c", "%2e", "%00", "%25"].into_iter().find(|e| lower.contains(e))
}

/// A local path is absolute and made of plain components: no `.`, `..`,
/// empty component (`//`, a trailing `/`), encoded or look-alike separator.
fn check_local_path(text: &str, path: &str) -> Result<(), ReferenceError> {
    let bad = |why: String| Err(ReferenceError::BadPath(text.to_string(), why));
    if !path.starts_with('/') {
        return Err(ReferenceError::Relative(text.to_string()));
    }
    if path == "/" {
        return bad("the root directory is not an image".into());
    }
    if let Some(c) = path.chars().find(|c| LOOKALIKES.contains(c)) {
        return bad(format!("{c:?} is not accepted in a path"));
    }
    if let Some(e) = encoded_separator(path) {
        return bad(format!("percent-encoded {e:?} is not accepted in a path"));
    }
    plain_components(text, path, "empty path component (`//` or a trailing `/`)", "a path")
}

/// Every `/`-separated component of `path` after the first (the empty one
/// before a leading `/`, or a URL's host) is neither empty nor `.` or `..`.
fn plain_components(
    text: &str,
    path: &str,
    empty: &str,
    within: &str,
) -> Result<(), ReferenceError> {
    for component in path.split('/').skip(1) {
        let why = match component {
            "" => empty.to_string(),
            "." | ".." => format!("{component:?} is not accepted in {within}"),
            _ => continue,
        };
        return Err(ReferenceError::BadPath(text.to_string(), why));
    }
    Ok(())
}

/// The path of a URL as written (before a parser resolves `..` or decodes
/// anything): its components must be plain too.
fn check_url_path(text: &str, scheme_rest: &str) -> Result<(), ReferenceError> {
    let bad = |why: String| Err(ReferenceError::BadPath(text.to_string(), why));
    if let Some(c) = scheme_rest.chars().find(|c| LOOKALIKES.contains(c)) {
        return bad(format!("{c:?} is not accepted in a reference"));
    }
    let before_fragment = scheme_rest.split('#').next().unwrap_or_default();
    if let Some(e) = encoded_separator(before_fragment) {
        return bad(format!("percent-encoded {e:?} is not accepted in a reference"));
    }
    let path = before_fragment.split('?').next().unwrap_or_default();
    // The first component is the host; a trailing slash (which a URL
    // parser adds to an empty path) is not an empty component.
    let path = path.strip_suffix('/').unwrap_or(path);
    plain_components(text, path, "empty path component", "a reference")
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Dir(p) => write!(f, "dir:{}", p.display()),
            Reference::Tar(p) => write!(f, "tar:{}", p.display()),
            Reference::Http { url, digest } => write!(f, "{url}#{digest}"),
            Reference::Oci(o) => {
                let scheme = if o.plain_http { "oci+http" } else { "oci" };
                let sep = if o.is_digest() { '@' } else { ':' };
                write!(f, "{scheme}://{}/{}{sep}{}", o.registry, o.repository, o.tag_or_digest)
            }
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
        for climbing in
            [format!("{d}/./"), format!("{d}/../x"), format!("dir:{d}//x"), format!("{d}/")]
        {
            assert!(
                matches!(Reference::parse(&climbing), Err(ReferenceError::BadPath(..))),
                "{climbing}"
            );
        }
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
        let oci = Reference::parse("oci://127.0.0.1:5000/library/debian:12").unwrap();
        assert_eq!(oci.to_string(), "oci://127.0.0.1:5000/library/debian:12");
        let latest = Reference::parse("oci+http://reg/debian").unwrap();
        assert_eq!(latest.to_string(), "oci+http://reg/debian:latest");
        let d = format!("oci://reg/x@sha256:{}", "b".repeat(64));
        assert_eq!(Reference::parse(&d).unwrap().to_string(), d);
        for bad in
            ["oci://reg", "oci://reg/UPPER:1", "oci://reg/x:t@g", "oci://reg/x@md5:1", "oci:///x:1"]
        {
            assert!(matches!(Reference::parse(bad), Err(ReferenceError::BadUrl(..))), "{bad}");
        }
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
        // The canonical form of an empty path parses again.
        let r = Reference::parse(&format!("https://h#sha256:{d}")).unwrap();
        assert_eq!(Reference::parse(&r.to_string()).unwrap(), r);
        assert!(matches!(Reference::parse("/a\nb"), Err(ReferenceError::Control(_))));
    }
}
