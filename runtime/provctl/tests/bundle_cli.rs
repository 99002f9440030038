// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! `provctl keygen` and `provctl bundle`, run as a user would run them, on
//! the hello fixture component.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use provd_tests::HELLO;

fn provctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_provctl")).current_dir(dir).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn failed(out: &Output) -> (String, String) {
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    (String::from_utf8(out.stdout.clone()).unwrap(), String::from_utf8(out.stderr.clone()).unwrap())
}

/// A directory with keys `alice` and `bob`, and `hello.bundle` built from
/// the hello fixture with `manifest`, signed by alice.
fn setup(manifest: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&provctl(d, &["keygen", "alice"]));
    ok(&provctl(d, &["keygen", "bob", "--dir", d.to_str().unwrap()]));
    std::fs::write(d.join("plugin.toml"), manifest).unwrap();
    let component = HELLO.component.to_string();
    let out = ok(&provctl(
        d,
        &[
            "bundle",
            "build",
            "--manifest",
            "plugin.toml",
            "--component",
            &component,
            "-o",
            "hello.bundle",
            "--expires-days",
            "30",
        ],
    ));
    assert!(out.contains("hello 0.1.0"), "{out}");
    ok(&provctl(d, &["bundle", "sign", "hello.bundle", "--key", "alice.key"]));
    dir
}

fn hello_manifest() -> String {
    std::fs::read_to_string(HELLO.dir().join("plugin.toml")).unwrap()
}

#[test]
fn keygen_writes_a_private_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // keygen creates no directories.
    failed(&provctl(d, &["keygen", "k", "--dir", "missing"]));
    std::fs::create_dir(d.join("keys")).unwrap();
    ok(&provctl(d, &["keygen", "k", "--dir", "keys"]));
    let key = d.join("keys/k.key");
    let public = d.join("keys/k.pub");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&public).unwrap().starts_with("provd-ed25519 "));
    let before = std::fs::read(&key).unwrap();
    let (_, err) = failed(&provctl(d, &["keygen", "k", "--dir", "keys"]));
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
}

#[test]
fn build_sign_audit_verify() {
    let dir = setup(&hello_manifest());
    let d = dir.path();
    // Signing is idempotent.
    let signed = std::fs::read(d.join("hello.bundle")).unwrap();
    ok(&provctl(d, &["bundle", "sign", "hello.bundle", "--key", "alice.key", "-o", "again"]));
    assert_eq!(std::fs::read(d.join("again")).unwrap(), signed);

    let out = ok(&provctl(d, &["bundle", "audit", "hello.bundle"]));
    for expected in [
        "plugin    hello 0.1.0",
        "present, not checked",
        "hashing     max-input-bytes=1048576",
        "provd:plugin/log@0.1.0",
        "provision (func)",
        "mismatches: none",
    ] {
        assert!(out.contains(expected), "{expected:?} missing in\n{out}");
    }
    let out = ok(&provctl(d, &["bundle", "audit", "hello.bundle", "--trusted", "alice.pub"]));
    assert!(out.contains("verified with a trusted key"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&ok(&provctl(
        d,
        &["bundle", "audit", "hello.bundle", "--trusted", "alice.pub", "--json"],
    )))
    .unwrap();
    assert_eq!(json["clean"], true);
    assert_eq!(json["signatures"][0]["status"], "verified");
    assert_eq!(json["capabilities"]["log"]["max-bytes"], 65536);

    let out = ok(&provctl(d, &["bundle", "verify", "hello.bundle", "--trusted", "alice.pub"]));
    assert!(out.contains("valid: hello 0.1.0"), "{out}");
    let (_, err) =
        failed(&provctl(d, &["bundle", "verify", "hello.bundle", "--trusted", "bob.pub"]));
    assert!(err.contains("no signature by a trusted key"), "{err}");
    // Audited against a key that did not sign it: a failure.
    let (out, _) =
        failed(&provctl(d, &["bundle", "audit", "hello.bundle", "--trusted", "bob.pub"]));
    assert!(out.contains("no signature verifies with a --trusted key"), "{out}");
}

#[test]
fn a_tampered_bundle_fails_verify_and_audit() {
    let dir = setup(&hello_manifest());
    let d = dir.path();
    let mut bytes = std::fs::read(d.join("hello.bundle")).unwrap();
    // Raise a parameter inside the signed header, keeping its length.
    let at = bytes.windows(7).position(|w| w == b"1048576").unwrap();
    bytes[at..at + 7].copy_from_slice(b"9999999");
    std::fs::write(d.join("tampered.bundle"), &bytes).unwrap();
    let (_, err) =
        failed(&provctl(d, &["bundle", "verify", "tampered.bundle", "--trusted", "alice.pub"]));
    assert!(err.contains("does not verify"), "{err}");
    let (out, _) =
        failed(&provctl(d, &["bundle", "audit", "tampered.bundle", "--trusted", "alice.pub"]));
    assert!(out.contains("INVALID"), "{out}");
}

#[test]
fn audit_fails_on_capability_mismatches() {
    // Hello imports hashing; this manifest does not declare it, and declares
    // vm, which hello never imports.
    let manifest = hello_manifest()
        .replace("[capabilities.hashing]\nmax-input-bytes = 1048576\n", "[capabilities.vm]\n");
    assert!(manifest.contains("[capabilities.vm]"), "{manifest}");
    let dir = setup(&manifest);
    let d = dir.path();
    let (out, _) = failed(&provctl(d, &["bundle", "audit", "hello.bundle"]));
    assert!(
        out.contains("imports provd:plugin/hashing@0.1.0 but plugin.toml does not declare"),
        "{out}"
    );
    assert!(out.contains("declares the capability `vm` but never imports"), "{out}");
}
