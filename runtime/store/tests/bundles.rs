// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Accepting bundles: only forward, identical re-uploads are idempotent,
//! expiry is judged by a clock that never runs backwards.

use provd_store::{AcceptError, Acceptance, NewBundle, Store};

fn bundle(version: &str, digest: &str, expires: u64) -> NewBundle {
    NewBundle {
        name: "shared-partition".into(),
        version: version.into(),
        digest: digest.into(),
        signer: "1a2b3c4d5e6f7a8b".into(),
        manifest: "name = \"shared-partition\"".into(),
        grant: "{}".into(),
        component: vec![0, 97, 115, 109],
        created: 1_000,
        expires,
    }
}

#[test]
fn bundles_are_accepted_only_forward_and_identical_reuploads_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.accept_bundle(&bundle("1.2.0", "blake3:aa", 10_000), 2_000).unwrap(),
        Acceptance::Accepted
    );
    assert_eq!(
        store.accept_bundle(&bundle("1.2.0", "blake3:aa", 10_000), 2_001).unwrap(),
        Acceptance::AlreadyAccepted
    );
    let err = store.accept_bundle(&bundle("1.2.0", "blake3:bb", 10_000), 2_002).unwrap_err();
    assert!(matches!(err, AcceptError::Conflict { .. }), "{err}");
    let err = store.accept_bundle(&bundle("1.1.9", "blake3:cc", 10_000), 2_003).unwrap_err();
    assert_eq!(
        err.to_string(),
        "shared-partition 1.1.9 is older than 1.2.0, the highest version this node has accepted"
    );
    assert_eq!(
        store.accept_bundle(&bundle("1.10.0", "blake3:dd", 10_000), 2_004).unwrap(),
        Acceptance::Accepted
    );
    let all = store.bundles().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        all.iter().filter(|b| b.active).map(|b| b.version.as_str()).collect::<Vec<_>>(),
        ["1.10.0"]
    );
    assert_eq!(store.bundle_component("shared-partition", "1.2.0").unwrap().unwrap(), b"\0asm");
    let err = store.accept_bundle(&bundle("not-semver", "blake3:ee", 10_000), 2_005).unwrap_err();
    assert!(matches!(err, AcceptError::BadVersion(_)), "{err}");
}

#[test]
fn expiry_is_judged_by_a_clock_that_never_runs_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.observe_clock(5_000).unwrap(), 5_000);
    // The system clock set back to before the expiry does not help.
    let err = store.accept_bundle(&bundle("1.0.0", "blake3:aa", 4_000), 3_000).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the bundle expired at 4000 (unix seconds); the node's clock reads 5000"
    );
    assert_eq!(store.observe_clock(100).unwrap(), 5_000);
    assert!(store.bundles().unwrap().is_empty());
    drop(store);
    // Kept across restarts.
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.observe_clock(0).unwrap(), 5_000);
}
