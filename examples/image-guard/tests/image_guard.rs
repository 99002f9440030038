// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The plugin author's test: build this crate, run it in provd's engine on a
//! node with an image store, and check what it allows and refuses.

use provd_testkit::Harness;
use provd_testkit::provd_engine::{InvokeError, PluginError};

fn image(root: &std::path::Path, key: bool) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "vm\n").unwrap();
    if key {
        std::fs::create_dir_all(root.join("root/.ssh")).unwrap();
        std::fs::write(root.join("root/.ssh/id_rsa"), "-----BEGIN OPENSSH PRIVATE KEY-----\n")
            .unwrap();
    }
}

#[tokio::test]
async fn refuses_only_the_vms_whose_images_carry_a_forbidden_file() {
    let images = tempfile::tempdir().unwrap();
    image(&images.path().join("clean"), false);
    image(&images.path().join("leaky"), true);
    let sources = format!("dir:{}/*", images.path().display());
    let harness = Harness::with_images(&[&sources]).unwrap();
    let plugin = harness.load_crate(env!("CARGO_MANIFEST_DIR")).await.unwrap();
    let vm = |name: &str, dir: &str| serde_json::json!({"name": name, "image": format!("dir:{}/{dir}", images.path().display())});
    let input = |vms: Vec<serde_json::Value>| {
        serde_json::json!({"vms": vms, "forbidden": ["root/.ssh/id_rsa", "etc/shadow-"]})
            .to_string()
    };

    let run = harness.run(&plugin, &input(vec![vm("a", "clean"), vm("b", "clean")])).await;
    let outcome = run.result.unwrap();
    assert_eq!(outcome.report.summary, "2 VM(s) checked, no forbidden file");

    let run = harness.run(&plugin, &input(vec![vm("a", "clean"), vm("b", "leaky")])).await;
    match run.result {
        Err(InvokeError::Plugin(PluginError::Denied(m))) => {
            assert_eq!(m, "forbidden files in images: b: root/.ssh/id_rsa")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn images_outside_the_nodes_sources_are_denied() {
    let images = tempfile::tempdir().unwrap();
    image(&images.path().join("clean"), false);
    let harness = Harness::with_images(&["dir:/nowhere/*"]).unwrap();
    let plugin = harness.load_crate(env!("CARGO_MANIFEST_DIR")).await.unwrap();
    let input = serde_json::json!({
        "vms": [{"name": "a", "image": format!("dir:{}/clean", images.path().display())}],
        "forbidden": ["x"],
    });
    let run = harness.run(&plugin, &input.to_string()).await;
    assert!(
        matches!(run.result, Err(InvokeError::Plugin(PluginError::Denied(_)))),
        "{:?}",
        run.result
    );
}
