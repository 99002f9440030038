// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Audits of real components: imports, exports and every kind of mismatch.

mod common;

use common::{CREATED, EXPIRES, HELLO_IMPORTS, HELLO_MANIFEST, NOW, component, hello_component};
use provd_bundle::container::RawBundle;
use provd_bundle::{SignatureStatus, SigningKey, audit, audit_with, build, sign};
use serde_json::json;

fn bundle(manifest: &str, component: &[u8]) -> Vec<u8> {
    build(manifest, component, CREATED, EXPIRES).unwrap()
}

#[test]
fn a_consistent_bundle_has_no_mismatch() {
    let a = audit(&bundle(HELLO_MANIFEST, &hello_component())).unwrap();
    assert_eq!(a.mismatches, Vec::<String>::new());
    assert!(a.is_clean());
    assert_eq!((a.name.as_str(), a.version.as_str()), ("hello", "0.1.0"));
    assert!(a.digest.starts_with("blake3:"));
    let mut expected = vec!["provd:plugin/types@0.1.0".to_string()];
    expected.extend(HELLO_IMPORTS.iter().map(|s| s.to_string()));
    assert_eq!(a.imports, expected);
    assert_eq!(a.exports, ["provision (func)"]);
    assert_eq!(
        a.capabilities,
        json!({"log": {"max-bytes": 65536}, "progress": {}, "hashing": {"max-input-bytes": 1048576}})
    );
    assert_eq!(a.limits, json!({"memory-mib": 16, "timeout-ms": 2000}));
    assert_eq!(a.bundle_limits.max_signatures, 8);
    assert!(a.signatures.is_empty());
}

#[test]
fn undeclared_imports_and_unused_declarations_are_reported() {
    // Imports log and vm; declares log and hashing.
    let manifest = "name = \"p\"\nversion = \"1.0.0\"\n[capabilities.log]\n\
                    [capabilities.hashing]\nmax-input-bytes = 4096\n";
    let c = component(&["provd:plugin/log@0.1.0", "provd:plugin/vm@0.1.0"], true);
    let a = audit(&bundle(manifest, &c)).unwrap();
    assert!(a.imports.contains(&"provd:plugin/vm@0.1.0".to_string()), "{:?}", a.imports);
    assert_eq!(a.mismatches.len(), 2, "{:#?}", a.mismatches);
    assert!(
        a.mismatches[0].starts_with(
            "imports provd:plugin/vm@0.1.0 but plugin.toml does not declare the capability `vm`"
        ),
        "{}",
        a.mismatches[0]
    );
    assert!(
        a.mismatches[1].starts_with(
            "declares the capability `hashing` but never imports provd:plugin/hashing: \
             over-privilege"
        ),
        "{}",
        a.mismatches[1]
    );
    assert!(!a.is_clean());
}

#[test]
fn wasi_outside_the_linked_subset_is_reported() {
    let manifest = "name = \"p\"\nversion = \"1.0.0\"\n";
    let c = component(&["wasi:cli/stdout@0.2.0", "wasi:sockets/tcp@0.2.0"], true);
    let a = audit(&bundle(manifest, &c)).unwrap();
    assert!(a.imports.contains(&"wasi:cli/stdout@0.2.0".to_string()), "{:?}", a.imports);
    assert_eq!(a.mismatches.len(), 1, "{:#?}", a.mismatches);
    assert!(
        a.mismatches[0].starts_with(
            "imports wasi:sockets/tcp@0.2.0, which is outside the WASI subset the engine links"
        ),
        "{}",
        a.mismatches[0]
    );
}

#[test]
fn a_component_without_provision_does_not_fit_the_world() {
    let manifest = "name = \"p\"\nversion = \"1.0.0\"\n[capabilities.log]\n";
    let c = component(&["provd:plugin/log@0.1.0"], false);
    let a = audit(&bundle(manifest, &c)).unwrap();
    assert_eq!(a.exports, Vec::<String>::new());
    assert_eq!(
        a.mismatches,
        ["component does not export the function `provision`, so it does not fit the target \
          world provd:plugin/provisioner@0.1.0"]
    );
}

#[test]
fn signatures_are_listed_and_checked_with_trusted_keys() {
    let (a, b, c) = (
        SigningKey::from_bytes(&[1; 32]),
        SigningKey::from_bytes(&[2; 32]),
        SigningKey::from_bytes(&[3; 32]),
    );
    let signed = sign(&sign(&bundle(HELLO_MANIFEST, &hello_component()), &a).unwrap(), &b).unwrap();
    let plain = audit(&signed).unwrap();
    assert_eq!(plain.signers(), [a.key_id(), b.key_id()]);
    assert!(plain.signatures.iter().all(|s| s.status == SignatureStatus::Unverified));

    let checked = audit_with(&signed, &[a.public_key(), c.public_key()], NOW).unwrap();
    let statuses: Vec<_> = checked.signatures.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [SignatureStatus::Verified, SignatureStatus::Untrusted]);
    assert!(checked.is_clean() && checked.has_trusted_signature());

    // Corrupt a's signature: reported as invalid, and the audit goes on.
    let raw = RawBundle::parse(&signed).unwrap();
    let mut list: serde_json::Value = serde_json::from_slice(raw.signatures).unwrap();
    list[0]["signature"] = json!("cd".repeat(64));
    let list = serde_json::to_vec(&list).unwrap();
    let broken = RawBundle { signatures: &list, ..raw }.to_bytes().unwrap();
    let checked = audit_with(&broken, &[a.public_key(), b.public_key()], NOW).unwrap();
    let statuses: Vec<_> = checked.signatures.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [SignatureStatus::Invalid, SignatureStatus::Verified]);
    assert!(checked.has_invalid_signature() && !checked.is_clean());

    // An expired bundle is a mismatch of an audit with a clock.
    let late = audit_with(&signed, &[a.public_key()], EXPIRES + 1).unwrap();
    assert_eq!(late.mismatches.len(), 1, "{:?}", late.mismatches);
    assert!(late.mismatches[0].starts_with("bundle expired at"), "{:?}", late.mismatches);
}

#[test]
fn a_changed_component_is_a_mismatch_not_an_error() {
    let mut b = bundle(HELLO_MANIFEST, &hello_component());
    let [_, component, _] = common::sections(&b);
    b[component.end - 1] ^= 1;
    let a = audit(&b).unwrap();
    assert!(
        a.mismatches.iter().any(|m| m.contains("does not match the header's blake3:")),
        "{:?}",
        a.mismatches
    );
}

#[test]
fn the_audit_serialises_for_json_output() {
    let a = audit(&bundle(HELLO_MANIFEST, &hello_component())).unwrap();
    let v = serde_json::to_value(&a).unwrap();
    assert_eq!(v["name"], "hello");
    assert_eq!(v["bundle-limits"]["max-bundle-bytes"], 64 << 20);
    assert_eq!(v["capabilities"]["log"]["max-bytes"], 65536);
    assert!(v["mismatches"].as_array().unwrap().is_empty());
}
