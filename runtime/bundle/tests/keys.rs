// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Key files: modes, formats, refusal to overwrite.

use std::os::unix::fs::PermissionsExt;

use provd_bundle::{KeyError, PublicKey, SigningKey, write_key_pair};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_key_pair_is_written_private_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let (secret, public) = write_key_pair(dir.path(), "release", &key, "release key").unwrap();
    assert_eq!(secret, dir.path().join("release.key"));
    assert_eq!(public, dir.path().join("release.pub"));
    assert_eq!(mode(&secret), 0o600);
    assert_eq!(mode(&public), 0o644);
    let pem = std::fs::read_to_string(&secret).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    let line = std::fs::read_to_string(&public).unwrap();
    assert!(line.starts_with("provd-ed25519 ") && line.ends_with(" release key\n"), "{line}");
    let read = SigningKey::read_file(&secret).unwrap();
    assert_eq!(read.key_id(), key.key_id());
    assert_eq!(PublicKey::read_file(&public).unwrap(), key.public_key());
    // Debug shows the key id, never the secret.
    assert_eq!(format!("{read:?}"), format!("SigningKey({})", key.key_id()));
}

#[test]
fn existing_files_are_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let first = SigningKey::generate().unwrap();
    write_key_pair(dir.path(), "k", &first, "").unwrap();
    let before = std::fs::read(dir.path().join("k.key")).unwrap();
    let err = write_key_pair(dir.path(), "k", &SigningKey::generate().unwrap(), "").unwrap_err();
    assert!(matches!(err, KeyError::Exists(_)), "{err}");
    assert_eq!(std::fs::read(dir.path().join("k.key")).unwrap(), before);
    // Only the public half present: still refused, and no secret written.
    std::fs::write(dir.path().join("only.pub"), "x").unwrap();
    let err = write_key_pair(dir.path(), "only", &first, "").unwrap_err();
    assert!(matches!(err, KeyError::Exists(_)), "{err}");
    assert!(!dir.path().join("only.key").exists());
    // A dangling symlink at the name is not followed.
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join("l.key")).unwrap();
    assert!(matches!(first.write_file(&dir.path().join("l.key")), Err(KeyError::Exists(_))));
    assert!(!dir.path().join("elsewhere").exists());
}

#[test]
fn a_secret_key_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, _) =
        write_key_pair(dir.path(), "k", &SigningKey::generate().unwrap(), "").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = SigningKey::read_file(&secret).unwrap_err();
    assert!(matches!(err, KeyError::Permissions { mode: 0o640, .. }), "{err}");
}

#[test]
fn malformed_key_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad_pub = dir.path().join("bad.pub");
    for text in [
        "",
        "ssh-ed25519 AAAA x\n",
        "provd-ed25519 not-base64!\n",
        "provd-ed25519 AAAA\n",
        // The identity point: small order, signatures by it prove nothing.
        "provd-ed25519 AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= weak\n",
    ] {
        std::fs::write(&bad_pub, text).unwrap();
        assert!(PublicKey::read_file(&bad_pub).is_err(), "{text:?} accepted");
    }
    let bad_key = dir.path().join("bad.key");
    std::fs::write(&bad_key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        .unwrap();
    std::fs::set_permissions(&bad_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(SigningKey::read_file(&bad_key), Err(KeyError::Malformed { .. })));
    let key = SigningKey::generate().unwrap();
    assert!(matches!(key.public_key().to_line("two\nlines"), Err(KeyError::Comment)));
}
