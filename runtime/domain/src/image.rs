//! Image entries: what a software image is made of, and the rules a path
//! in an image must follow.
//!
//! An image is a list of entries, each a path with a type, ownership,
//! permissions and, for regular files, the BLAKE3 digest of the content.
//! Nothing here is ever created on the node's filesystem: devices, FIFOs,
//! symlinks and setuid bits are recorded as metadata only, and file contents
//! live in the content-addressed store under their digest.

use std::fmt;

/// Longest path accepted, in bytes (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest path component, in bytes (Linux's NAME_MAX).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Deepest nesting accepted.
pub const MAX_DEPTH: usize = 128;
/// Longest symlink target accepted.
pub const MAX_LINK_TARGET_BYTES: usize = 4096;

/// The type of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A second name for an earlier regular file of the same image.
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Hardlink => "hardlink",
            EntryKind::CharDevice => "char-device",
            EntryKind::BlockDevice => "block-device",
            EntryKind::Fifo => "fifo",
        }
    }

    pub fn parse(s: &str) -> Option<EntryKind> {
        [
            EntryKind::File,
            EntryKind::Dir,
            EntryKind::Symlink,
            EntryKind::Hardlink,
            EntryKind::CharDevice,
            EntryKind::BlockDevice,
            EntryKind::Fifo,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn to_hex(&self) -> String {
        use std::fmt::Write as _;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    pub fn from_hex(hex: &str) -> Option<Hash> {
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = hex.get(i * 2..i * 2 + 2)?;
            *byte = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(Hash(out))
    }
}

impl serde::Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let text = String::deserialize(d)?;
        Hash::from_hex(&text).ok_or_else(|| {
            serde::de::Error::custom("expected 64 hex characters of a BLAKE3 digest")
        })
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.to_hex())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.to_hex())
    }
}

/// One entry of an image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Normalised relative path: no leading `/` or `./`, `/`-separated.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (metadata only).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Content bytes of a regular file (or of the file a hard link names).
    pub size: u64,
    /// Content digest of a regular file or hard link.
    pub hash: Option<Hash>,
    /// Target of a symlink (as written), or path of a hard link's file.
    pub link_target: Option<String>,
    /// Major and minor numbers of a device.
    pub device: Option<(u32, u32)>,
}

impl Entry {
    /// A directory that only the entries below it imply: root-owned 0755,
    /// time 0 (what an import records for a parent an archive leaves out,
    /// and what an overlay layer shows for the directories its files sit
    /// in).
    pub fn implied_dir(path: impl Into<String>) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            hash: None,
            link_target: None,
            device: None,
        }
    }
}

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("is empty")]
    Empty,
    #[error("is absolute")]
    Absolute,
    #[error("has a `..` component")]
    ParentComponent,
    #[error("contains a control character (NUL, newline, ...)")]
    ControlCharacter,
    #[error("is {0} bytes long; at most {MAX_PATH_BYTES}")]
    TooLong(usize),
    #[error("has a component of {0} bytes; at most {MAX_COMPONENT_BYTES}")]
    ComponentTooLong(usize),
    #[error("is nested {0} deep; at most {MAX_DEPTH}")]
    TooDeep(usize),
    #[error("is not valid UTF-8")]
    NotUtf8,
}

/// Normalises an archive path: strips a leading `./`, collapses `.` and
/// empty components, drops a trailing `/`. Returns `Ok(None)` for the root
/// itself (`.` or `./`). Absolute paths and `..` are refused, not repaired:
/// an archive that carries them is not trusted to mean anything else.
pub fn normalize_path(raw: &str) -> Result<Option<String>, PathError> {
    check_text(raw, MAX_PATH_BYTES)?;
    if raw.starts_with('/') {
        return Err(PathError::Absolute);
    }
    let mut parts = Vec::new();
    for component in raw.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err(PathError::ParentComponent),
            c if c.len() > MAX_COMPONENT_BYTES => return Err(PathError::ComponentTooLong(c.len())),
            c => parts.push(c),
        }
    }
    if parts.len() > MAX_DEPTH {
        return Err(PathError::TooDeep(parts.len()));
    }
    if parts.is_empty() { Ok(None) } else { Ok(Some(parts.join("/"))) }
}

/// The parent of a normalised path, or `None` at the top.
pub fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(p, _)| p)
}

/// Checks a symlink target: any relative or absolute text is fine (it is
/// never followed by provd), within length and without control characters.
pub fn check_link_target(target: &str) -> Result<(), PathError> {
    check_text(target, MAX_LINK_TARGET_BYTES)
}

/// Non-empty, at most `max` bytes, no control characters: what every name
/// or target taken from an image must be.
fn check_text(text: &str, max: usize) -> Result<(), PathError> {
    if text.is_empty() {
        return Err(PathError::Empty);
    }
    if text.len() > max {
        return Err(PathError::TooLong(text.len()));
    }
    if text.chars().any(char::is_control) {
        return Err(PathError::ControlCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised() {
        assert_eq!(normalize_path("./etc/passwd").unwrap().as_deref(), Some("etc/passwd"));
        assert_eq!(normalize_path("etc//./apt/").unwrap().as_deref(), Some("etc/apt"));
        assert_eq!(normalize_path("./").unwrap(), None);
        assert_eq!(normalize_path(".").unwrap(), None);
    }

    #[test]
    fn hostile_paths_are_refused() {
        assert_eq!(normalize_path("/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(normalize_path("a/../../etc"), Err(PathError::ParentComponent));
        assert_eq!(normalize_path(".."), Err(PathError::ParentComponent));
        assert_eq!(normalize_path("a\0b"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("a\nb"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path(""), Err(PathError::Empty));
        assert_eq!(normalize_path(&"x".repeat(256)), Err(PathError::ComponentTooLong(256)));
        assert_eq!(normalize_path(&"a/".repeat(129)), Err(PathError::TooDeep(129)));
        assert!(matches!(normalize_path(&"ab/".repeat(2000)), Err(PathError::TooLong(_))));
    }

    #[test]
    fn hashes_round_trip_through_hex() {
        let h = Hash([0xab; 32]);
        assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
        assert_eq!(h.to_string(), format!("blake3:{}", "ab".repeat(32)));
    }
}
