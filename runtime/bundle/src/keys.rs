//! Ed25519 keys and their files.
//!
//! * secret key `NAME.key`: PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), as
//!   OpenSSL writes Ed25519 keys, created with mode 0600 and never
//!   overwritten; a key file readable by group or others is refused, as ssh
//!   refuses one.
//! * public key `NAME.pub`: one line `provd-ed25519 <base64 of 32 bytes>
//!   <comment>`, the shape of an OpenSSH public key line, so it can be pasted
//!   into configuration and reviewed by eye.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};

/// The first word of a public key line.
pub const PUBLIC_KEY_TAG: &str = "provd-ed25519";
/// Largest key file read: a PEM Ed25519 key is 119 bytes and a public key
/// line is short, so anything larger is not a key file.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Why a key could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// the operating system's random source failed
    #[error("cannot generate a key: the system random source failed: {0}")]
    Random(String),
    /// a key file could not be read or written
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// the file to write already exists
    #[error("{} already exists; refusing to overwrite a key", .0.display())]
    Exists(PathBuf),
    /// a secret key file is readable by other users
    #[error(
        "{} is readable by group or others (mode {mode:o}); make it private with chmod 600",
        .path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// the file does not hold a key of the expected form
    #[error("{}: {problem}", .path.display())]
    Malformed { path: PathBuf, problem: String },
    /// a public key line is malformed
    #[error("public key: {0}")]
    Line(String),
    /// a public key comment holds a line break or control character
    #[error("a public key comment must be one line without control characters")]
    Comment,
}

/// An Ed25519 secret key. Its `Debug` shows only the key id.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

/// An Ed25519 public key, as pinned by nodes and reviewers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl SigningKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<SigningKey, KeyError> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut_slice()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    /// The key with this 32-byte secret seed.
    pub fn from_bytes(seed: &[u8; 32]) -> SigningKey {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The id signatures carry: see [`PublicKey::key_id`].
    pub fn key_id(&self) -> String {
        self.public_key().key_id()
    }

    /// The Ed25519 signature of `message`.
    pub(crate) fn sign_bytes(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.0.sign(message).to_bytes()
    }

    /// The key as PKCS#8 PEM.
    pub fn to_pem(&self) -> Result<zeroize::Zeroizing<String>, KeyError> {
        self.0.to_pkcs8_pem(LineEnding::LF).map_err(|e| KeyError::Malformed {
            path: PathBuf::new(),
            problem: format!("cannot encode the key as PKCS#8: {e}"),
        })
    }

    /// Reads a key from PKCS#8 PEM text.
    pub fn from_pem(pem: &str) -> Result<SigningKey, KeyError> {
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem).map(SigningKey).map_err(|e| {
            KeyError::Malformed {
                path: PathBuf::new(),
                problem: format!("not a PKCS#8 PEM Ed25519 private key: {e}"),
            }
        })
    }

    /// Writes the key to `path` as PKCS#8 PEM, mode 0600. Refuses to replace
    /// an existing file: a lost secret key cannot be recovered.
    pub fn write_file(&self, path: &Path) -> Result<(), KeyError> {
        let pem = self.to_pem()?;
        write_new(path, pem.as_bytes(), 0o600)
    }

    /// Reads a key written by [`SigningKey::write_file`] (or OpenSSL's
    /// `genpkey -algorithm ed25519`).
    pub fn read_file(path: &Path) -> Result<SigningKey, KeyError> {
        let io = |source| KeyError::Io { path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: path.to_path_buf(), mode });
        }
        let text = zeroize::Zeroizing::new(read_small(path)?);
        SigningKey::from_pem(&text).map_err(|e| match e {
            KeyError::Malformed { problem, .. } => {
                KeyError::Malformed { path: path.to_path_buf(), problem }
            }
            other => other,
        })
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.key_id())
    }
}

impl PublicKey {
    /// The key from its 32 bytes. Refuses weak (small-order) points, for
    /// which signatures prove nothing.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<PublicKey, KeyError> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map_err(|_| KeyError::Line("32 bytes that are not an Ed25519 point".into()))?;
        if key.is_weak() {
            return Err(KeyError::Line("a weak (small-order) Ed25519 key".into()));
        }
        Ok(PublicKey(key))
    }

    /// The 32 bytes of the key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The first 16 hex digits of BLAKE3 of the 32-byte key: short enough to
    /// read aloud, long enough that two keys of one deployment never share
    /// one. It selects the key to try; it is never trusted by itself.
    pub fn key_id(&self) -> String {
        let hex = blake3::hash(self.0.as_bytes()).to_hex();
        hex.as_str().get(..16).unwrap_or_default().to_string()
    }

    /// Whether `signature` is this key's Ed25519 signature of `message`,
    /// checked strictly (no malleable or small-order forms).
    pub(crate) fn verifies(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.0.verify_strict(message, &signature).is_ok()
    }

    /// The public key line: `provd-ed25519 <base64> <comment>`, no newline.
    pub fn to_line(&self, comment: &str) -> Result<String, KeyError> {
        if comment.chars().any(char::is_control) {
            return Err(KeyError::Comment);
        }
        let b64 = STANDARD.encode(self.0.as_bytes());
        Ok(if comment.is_empty() {
            format!("{PUBLIC_KEY_TAG} {b64}")
        } else {
            format!("{PUBLIC_KEY_TAG} {b64} {comment}")
        })
    }

    /// Parses a public key line; the comment is ignored.
    pub fn from_line(line: &str) -> Result<PublicKey, KeyError> {
        let line = line.trim_end_matches(['\n', '\r']);
        let mut words = line.splitn(3, ' ');
        if words.next() != Some(PUBLIC_KEY_TAG) {
            return Err(KeyError::Line(format!("does not start with {PUBLIC_KEY_TAG:?}")));
        }
        let b64 = words.next().unwrap_or_default();
        let bytes = STANDARD
            .decode(b64)
            .map_err(|e| KeyError::Line(format!("the key is not base64: {e}")))?;
        let bytes = <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
            KeyError::Line(format!("the key is {} bytes; Ed25519 keys are 32", bytes.len()))
        })?;
        PublicKey::from_bytes(&bytes)
    }

    /// Writes the public key line (with a newline) to `path`, mode 0644.
    /// Refuses to replace an existing file.
    pub fn write_file(&self, path: &Path, comment: &str) -> Result<(), KeyError> {
        let line = self.to_line(comment)? + "\n";
        write_new(path, line.as_bytes(), 0o644)
    }

    /// Reads a public key file: one key line, optionally after `#` comment
    /// lines and blank lines.
    pub fn read_file(path: &Path) -> Result<PublicKey, KeyError> {
        let text = read_small(path)?;
        let mut lines =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        let malformed = |problem: String| KeyError::Malformed { path: path.to_path_buf(), problem };
        let line = lines.next().ok_or_else(|| malformed("holds no public key line".into()))?;
        if lines.next().is_some() {
            return Err(malformed("holds more than one public key line".into()));
        }
        PublicKey::from_line(line).map_err(|e| malformed(e.to_string()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

/// Writes `NAME.key` and `NAME.pub` for `key` in `dir`, refusing if either
/// exists (checked for both before either is written). Returns their paths.
pub fn write_key_pair(
    dir: &Path,
    name: &str,
    key: &SigningKey,
    comment: &str,
) -> Result<(PathBuf, PathBuf), KeyError> {
    let secret = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    for path in [&secret, &public] {
        if path.symlink_metadata().is_ok() {
            return Err(KeyError::Exists(path.clone()));
        }
    }
    // Validated before the secret file exists, so a bad comment leaves
    // nothing behind.
    key.public_key().to_line(comment)?;
    key.write_file(&secret)?;
    if let Err(e) = key.public_key().write_file(&public, comment) {
        // A secret key without its public half is of no use and confusing.
        let _ = std::fs::remove_file(&secret);
        return Err(e);
    }
    Ok((secret, public))
}

/// Creates `path` (never replacing anything, never following a symlink at
/// the final name) with `mode` from the start, writes `bytes` and syncs.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(
            |source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::Exists(path.to_path_buf())
                } else {
                    KeyError::Io { path: path.to_path_buf(), source }
                }
            },
        )?;
    let io = |source| KeyError::Io { path: path.to_path_buf(), source };
    // The umask may have cleared bits of `mode` but never adds any; set it
    // exactly so a public key is readable whatever the umask.
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

fn read_small(path: &Path) -> Result<String, KeyError> {
    use std::io::Read;
    let io = |source| KeyError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES + 1).read_to_string(&mut text).map_err(io)?;
    if text.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(KeyError::Malformed {
            path: path.to_path_buf(),
            problem: format!("larger than {MAX_KEY_FILE_BYTES} bytes; not a key file"),
        });
    }
    Ok(text)
}
