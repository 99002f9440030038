// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! A node accepts a signed bundle only when every check passes — pinned
//! signer, untampered component, capabilities within its policy, a version
//! higher than any it accepted — and then runs it; a refusal records
//! nothing.

use std::sync::Arc;

use provd_bundle::{SigningKey, build, sign};
use provd_domain::NodePolicy;
use provd_engine::{CollectingObserver, EngineConfig, Request};
use provd_node::{BundleRefused, Node};
use provd_store::Store;
use provd_tests::HELLO;

const NOW: u64 = 1_790_000_000;

fn manifest(version: &str, memory_mib: u64) -> String {
    format!(
        "name = \"hello\"\nversion = \"{version}\"\n[capabilities.log]\n[capabilities.progress]\n\
         [capabilities.hashing]\n[limits]\nmemory-mib = {memory_mib}\n"
    )
}

fn signed(key: &SigningKey, version: &str, memory_mib: u64) -> Vec<u8> {
    let unsigned =
        build(&manifest(version, memory_mib), &HELLO.wasm(), NOW - 60, NOW + 86_400).unwrap();
    sign(&unsigned, key).unwrap()
}

fn node(dir: &std::path::Path, trusted: &SigningKey) -> Node {
    let store = Arc::new(Store::open(&dir.join("data")).unwrap());
    let policy = NodePolicy { max_memory_bytes: 256 << 20, ..NodePolicy::default() };
    let engine =
        provd_host::engine(EngineConfig { policy, ..EngineConfig::default() }, None).unwrap();
    Node::new(engine, store, vec![trusted.public_key()])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_bundle_is_accepted_once_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let node = node(dir.path(), &key);
    let bundle = signed(&key, "1.0.0", 16);
    let first = node.accept_bundle(&bundle, NOW).await.unwrap();
    assert!(first.new);
    assert_eq!((first.name.as_str(), first.version.as_str()), ("hello", "1.0.0"));
    assert_eq!(first.signer, key.key_id());
    // The identical bundle again: accepted, nothing new.
    assert!(!node.accept_bundle(&bundle, NOW + 1).await.unwrap().new);
    let (version, plugin) = node.plugin("hello", NOW + 3).await.unwrap().unwrap();
    assert_eq!(version, "1.0.0");
    let request = Request { operation_id: "op-1".into(), input: "{\"name\":\"node\"}".into() };
    node.engine()
        .provision(&plugin, request, Arc::new(CollectingObserver::default()))
        .await
        .unwrap();
    // A newer version becomes active; an older one is a replay.
    node.accept_bundle(&signed(&key, "1.1.0", 16), NOW + 2).await.unwrap();
    assert_eq!(node.plugin("hello", NOW + 3).await.unwrap().unwrap().0, "1.1.0");
    let err = node.accept_bundle(&bundle, NOW + 3).await.unwrap_err();
    assert!(err.to_string().contains("older than 1.1.0"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bundles_failing_any_check_are_refused_and_nothing_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let node = node(dir.path(), &key);
    // Signed by a key the node does not trust.
    let stranger = SigningKey::generate().unwrap();
    let err = node.accept_bundle(&signed(&stranger, "1.0.0", 16), NOW).await.unwrap_err();
    assert!(matches!(err, BundleRefused::Invalid(_)), "{err}");
    // A component byte changed after signing.
    let mut tampered = signed(&key, "1.0.0", 16);
    let at = tampered.len() - 2000;
    tampered[at] ^= 1;
    let err = node.accept_bundle(&tampered, NOW).await.unwrap_err();
    assert!(err.to_string().contains("bundle refused"), "{err}");
    // More memory than the node's policy allows: the exact excess is named.
    let err = node.accept_bundle(&signed(&key, "1.0.0", 1024), NOW).await.unwrap_err();
    assert!(matches!(err, BundleRefused::Load(_)), "{err}");
    assert!(err.to_string().contains("limits.memory-mib = 1024 exceeds the node's 256"), "{err}");
    // Past its expiry.
    let err = node.accept_bundle(&signed(&key, "1.0.0", 16), NOW + 2 * 86_400).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(node.store().bundles().unwrap().is_empty());
    assert!(node.plugin("hello", NOW + 3).await.unwrap().is_none());
}
