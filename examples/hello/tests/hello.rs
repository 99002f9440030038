// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The plugin author's test: build this crate into a component, run it in
//! provd's engine with its own plugin.toml, and check what it did.

use provd_testkit::Harness;

#[tokio::test]
async fn greets_and_hashes_every_item() {
    let harness = Harness::new().unwrap();
    let plugin = harness.load_crate(env!("CARGO_MANIFEST_DIR")).await.unwrap();
    let run = harness.run(&plugin, r#"{"name":"test","items":["a","b"]}"#).await;
    let outcome = run.result.unwrap();
    assert_eq!(outcome.report.summary, "hello, test: hashed 2 items");
    assert!(outcome.report.output.contains(&blake3_hex(b"a")));
    assert!(run.observer.logs().iter().any(|r| r.message == "hello"));
    assert_eq!(run.observer.progress_events().last().map(|p| p.done), Some(2));
}

#[tokio::test]
async fn refuses_input_it_does_not_understand() {
    let harness = Harness::new().unwrap();
    let plugin = harness.load_crate(env!("CARGO_MANIFEST_DIR")).await.unwrap();
    let run = harness.run(&plugin, r#"{"items":[]}"#).await;
    let err = run.result.unwrap_err().to_string();
    assert!(err.contains("missing field `name`"), "{err}");
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}
