// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! `provctl` as a manager: deploy, provision, status, vms, audit, bundles,
//! rollback, images and gc against real daemons over mutual TLS, on two nodes at once,
//! with the documented exit codes.

use std::path::Path;
use std::process::{Command, Output};

use provd_tests::HELLO;
use provd_tests::daemon::{DEFAULT_EXTRA, TestNode};
use serde_json::Value;

mod common;
use common::provd_binary;

const HELLO_MANIFEST: &str = "name = \"hello\"\nversion = \"VERSION\"\n[capabilities.log]\n\
     [capabilities.progress]\n[capabilities.hashing]\n[limits]\nmemory-mib = 16\n";

fn provctl(node: &TestNode, inventory: Option<&Path>, args: &[&str]) -> Output {
    let (ca, cert, key) = node.tls();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_provctl"));
    cmd.args(args).env("PROVCTL_CA", ca).env("PROVCTL_CERT", cert).env("PROVCTL_KEY", key);
    match inventory {
        Some(inv) => cmd.arg("--inventory").arg(inv),
        None => cmd.args(["--node", &node.url]),
    };
    cmd.output().unwrap()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn a_manager_deploys_provisions_and_follows_on_two_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let provd = provd_binary();
    let a = TestNode::start(&provd, &dir.path().join("a"), DEFAULT_EXTRA).unwrap();
    // b has its own CA, node certificate and signing key.
    let b = TestNode::start(&provd, &dir.path().join("b"), DEFAULT_EXTRA).unwrap();
    let inventory = dir.path().join("nodes.toml");
    let (ca, cert, key) = a.tls();
    std::fs::write(
        &inventory,
        format!("ca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n[[nodes]]\nurl = \"{}\"\n", a.url),
    )
    .unwrap();

    let bundle = dir.path().join("hello.provd");
    std::fs::write(&bundle, a.bundle(&HELLO_MANIFEST.replace("VERSION", "1.0.0"), &HELLO.wasm()))
        .unwrap();
    let out = provctl(&a, Some(&inventory), &["deploy", bundle.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json_of(&out)["nodes"][0]["result"]["bundle"]["new"], true);

    let params = r#"{"name": "fleet", "items": ["x", "y"]}"#;
    let out = provctl(
        &a,
        None,
        &[
            "provision",
            "--plugin",
            "hello",
            "--params",
            params,
            "--idempotency-key",
            "p-1",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let op = &json_of(&out)["nodes"][0]["result"];
    assert_eq!(op["state"], "succeeded");
    assert_eq!(op["report"]["summary"], "hello, fleet: hashed 2 items");
    let id = op["id"].as_str().unwrap().to_string();

    let out = provctl(&a, None, &["status", &id]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("succeeded") && text.contains("hello@1.0.0"), "{text}");

    let out = provctl(&a, None, &["audit", "--operation", &id, "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let rows = json_of(&out)["nodes"][0]["result"]["audit"].as_array().unwrap().clone();
    assert!(rows.iter().any(|r| r["function"] == "blake3" && r["count"] == 2), "{rows:?}");

    // A plugin failure exits 1.
    let out = provctl(&a, None, &["provision", "--plugin", "hello", "--params", r#"{"name": ""}"#]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("plugin-invalid-input"));

    // VM spec files as arguments reach the plugin under `vms` (hello has
    // no such input, and says so).
    let web = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/vms/web.toml");
    let out = provctl(&a, None, &["provision", "--plugin", "hello", web, "--params", params]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unknown field `vms`"));

    // A refusal exits 4 and names the node's code; b has no hello.
    let garbage = dir.path().join("garbage.provd");
    std::fs::write(&garbage, b"garbage").unwrap();
    let out = provctl(&a, None, &["deploy", garbage.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid-bundle"));

    // Both nodes at once: a has the bundle already, b takes it.
    let both = ["deploy", bundle.to_str().unwrap(), "--node", &b.url, "--json"];
    let out = provctl(&a, Some(&inventory), &both);
    // b's certificate is signed by another CA than a's: the manager cannot
    // verify b, so b is unreachable (exit 3) while a answers.
    let v = json_of(&out);
    assert_eq!(out.status.code(), Some(3), "{v:#}");
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    let on = |url: &str| nodes.iter().find(|n| n["node"] == url).unwrap().clone();
    assert_eq!(on(&a.url)["result"]["bundle"]["new"], false);
    assert_eq!(on(&b.url)["error"]["code"], "unreachable");

    // b with its own credentials works.
    let out = provctl(&b, None, &["deploy", bundle.to_str().unwrap()]);
    // Signed by a's key, which b does not trust.
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("untrusted-signer"));

    let out = provctl(&a, None, &["vms"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no VMs");
    let out = provctl(&a, None, &["bundles"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello 1.0.0"));
    let out = provctl(&a, None, &["rollback", "hello"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-previous-version"));
    let out = provctl(&a, None, &["health"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok"));
    // The images' lifecycle from the manager's side.
    let out = provctl(&a, None, &["images"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no images");
    let out = provctl(&a, None, &["gc", "--max-age-secs", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("removed 0 images, 0 objects, 0 bytes; 0 in use kept"), "{text}");
    let out = provctl(&a, None, &["images", "--delete", "dir:/nowhere"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-found"));
}
