// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! A plugin written in Python (`examples/image-guard-py`, the image-guard
//! example ported): built with componentize-py by provd's build, run through
//! the testkit as its author would, then signed, deployed to a real daemon
//! and run in an operation, under the same grants, limits and import audit
//! as a Rust plugin.

use std::path::{Path, PathBuf};

use provd_client::{Client, TlsFiles};
use provd_testkit::Harness;
use provd_testkit::provd_engine::{InvokeError, PluginError};
use provd_tests::daemon::{DEFAULT_EXTRA, TestNode};
use serde_json::{Value, json};

const PROVD: &str = env!("CARGO_BIN_EXE_provd");

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/image-guard-py")
}

fn image(root: &Path, key: bool) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "vm\n").unwrap();
    if key {
        std::fs::create_dir_all(root.join("root/.ssh")).unwrap();
        std::fs::write(root.join("root/.ssh/id_rsa"), "-----BEGIN OPENSSH PRIVATE KEY-----\n")
            .unwrap();
    }
}

fn input(images: &Path, vms: &[(&str, &str)]) -> String {
    let vms: Vec<Value> = vms
        .iter()
        .map(|(n, d)| json!({"name": n, "image": format!("dir:{}/{d}", images.display())}))
        .collect();
    json!({"vms": vms, "forbidden": ["root/.ssh/id_rsa", "etc/shadow-"]}).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_image_guard_allows_and_refuses_as_the_rust_one_does() {
    let images = tempfile::tempdir().unwrap();
    image(&images.path().join("clean"), false);
    image(&images.path().join("leaky"), true);
    let sources = format!("dir:{}/*", images.path().display());
    let harness = Harness::with_images(&[&sources]).unwrap();
    let plugin = harness.load_crate(example()).await.unwrap();
    // It imports exactly what plugin.toml declares: no WASI at all.
    let imports: Vec<&str> = plugin.imports().iter().map(String::as_str).collect();
    assert!(imports.iter().all(|i| i.starts_with("provd:plugin/")), "{imports:?}");

    let run = harness.run(&plugin, &input(images.path(), &[("a", "clean"), ("b", "clean")])).await;
    let outcome = run.result.unwrap();
    assert_eq!(outcome.report.summary, "2 VM(s) checked, no forbidden file");
    let output: Value = serde_json::from_str(&outcome.report.output).unwrap();
    assert_eq!(output[1]["vm"], "b", "{output}");
    assert!(run.observer.logs().iter().any(|l| l.message == "checked"), "no log record");

    let run = harness.run(&plugin, &input(images.path(), &[("a", "clean"), ("b", "leaky")])).await;
    match run.result {
        Err(InvokeError::Plugin(PluginError::Denied(m))) => {
            assert_eq!(m, "forbidden files in images: b: root/.ssh/id_rsa")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let run = harness.run(&plugin, r#"{"vms": [], "forbidden": []}"#).await;
    match run.result {
        Err(InvokeError::Plugin(PluginError::InvalidInput(m))) => {
            assert_eq!(m, "forbidden: list at least one path")
        }
        other => panic!("expected invalid input, got {other:?}"),
    }
    // An exception of the plugin's own is a failed request, named.
    let run = harness.run(&plugin, r#"{"vms": [{"name": "a"}], "forbidden": ["x"]}"#).await;
    match run.result {
        Err(InvokeError::Plugin(PluginError::Failed(m))) => assert_eq!(m, "KeyError: 'image'"),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_plugin_is_signed_deployed_and_run_by_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    image(&images.join("clean"), false);
    let extra =
        format!("[policy]\nimage-sources = [\"dir:{}/**\"]\n{DEFAULT_EXTRA}", images.display());
    let node = TestNode::start(Path::new(PROVD), dir.path(), &extra).unwrap();
    let (ca, cert, key) = node.tls();
    let c = Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) }).unwrap();
    let component = provd_testkit::build_crate(&example()).unwrap();
    let manifest = std::fs::read_to_string(example().join("plugin.toml")).unwrap();
    let deployed =
        c.deploy(node.bundle(&manifest, &std::fs::read(&component).unwrap())).await.unwrap();
    assert_eq!(deployed.body["bundle"]["name"], "image-guard-py", "{}", deployed.body);
    let request = json!({"plugin": "image-guard-py",
                         "params": serde_json::from_str::<Value>(&input(&images, &[("a", "clean")])).unwrap()});
    let id =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    let op = c.wait(&id, |_| {}).await.unwrap();
    assert_eq!(op.state.as_str(), "succeeded", "{op:?}");
    assert_eq!(op.report_field("summary"), "1 VM(s) checked, no forbidden file", "{op:?}");
}

/// The shared-partition flow in Python (`examples/shared-partition-py`):
/// every capability of the SDK through a real daemon, two VMs of two
/// images that share a library.
#[tokio::test(flavor = "multi_thread")]
async fn the_shared_partition_flow_in_python_provisions_two_vms() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    for (name, own) in [("web", 3u8), ("db", 4)] {
        let root = images.join(name);
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("usr/lib/libshared.so"), vec![7u8; 400_000]).unwrap();
        std::fs::write(root.join("etc/own"), vec![own; 50_000]).unwrap();
    }
    let extra =
        format!("[policy]\nimage-sources = [\"dir:{}/**\"]\n{DEFAULT_EXTRA}", images.display());
    let node = TestNode::start(Path::new(PROVD), dir.path(), &extra).unwrap();
    let (ca, cert, key) = node.tls();
    let c = Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) }).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shared-partition-py");
    let component = provd_testkit::build_crate(&example).unwrap();
    let manifest = std::fs::read_to_string(example.join("plugin.toml")).unwrap();
    c.deploy(node.bundle(&manifest, &std::fs::read(&component).unwrap())).await.unwrap();
    let spec = |name: &str, image: &str| {
        json!({"name": name, "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512,
               "image": format!("dir:{}", images.join(image).display()),
               "boot": {"firmware": "uefi"}, "nics": [{"bridge": "br0", "dhcp4": true}]})
    };
    let request = json!({"plugin": "shared-partition-py",
                         "vms": [spec("web-1", "web"), spec("db-1", "db")],
                         "params": {"min-layer-bytes": 0}});
    let id =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    let op = c.wait(&id, |_| {}).await.unwrap();
    assert_eq!(op.state.as_str(), "succeeded", "{op:?}");
    assert_eq!(op.report_field("summary"), "2 VM(s) on a new shared partition", "{op:?}");
    let stored =
        op.report_field("fields")["stored-bytes"].as_str().unwrap().parse::<u64>().unwrap();
    let naive = op.report_field("fields")["naive-bytes"].as_str().unwrap().parse::<u64>().unwrap();
    assert!(stored < naive, "{op:?}");
    for name in ["web-1", "db-1"] {
        let vm = c.get(&format!("/v1/vms/{name}")).await.unwrap().body;
        let roles: Vec<&str> = vm["vm"]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["role"].as_str().unwrap())
            .collect();
        assert!(roles.contains(&"private") && roles.contains(&"shared"), "{vm}");
        assert!(node.data.join("vms").join(name).join("domain.xml").is_file());
    }

    // This plugin plans all its VMs at once. VMs of two tenants over images
    // that are no public catalogue's would share layers across tenants:
    // the host refuses the plan, and nothing of the request is left.
    let tenant = |name: &str, image: &str, t: &str| {
        let mut s = spec(name, image);
        s["tenant"] = json!(t);
        s
    };
    let request = json!({"plugin": "shared-partition-py",
                         "vms": [tenant("x-1", "web", "x"), tenant("y-1", "db", "y")],
                         "params": {"min-layer-bytes": 0}});
    let id =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    let op = c.wait(&id, |_| {}).await.unwrap();
    assert_eq!(op.state.as_str(), "failed", "{op:?}");
    assert!(
        op.error_message().unwrap_or_default().contains("plan each tenant's VMs separately"),
        "{op:?}"
    );
    for name in ["x-1", "y-1"] {
        assert!(c.get(&format!("/v1/vms/{name}")).await.is_err(), "{name} was configured");
    }
    let audit = c.get(&format!("/v1/audit?operation={id}&kind=host-call")).await.unwrap().body;
    assert!(
        audit["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["function"] == "plan" && a["outcome"] != "ok"),
        "{audit:#}"
    );
}
