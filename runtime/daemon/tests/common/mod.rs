//! What the daemon's integration tests share: a node started with
//! certificates made here, a client of it, specs and waits.

// Each test binary uses a part of these.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use provd_client::{Client, ClientError, TlsFiles};
use provd_tests::daemon::{DEFAULT_EXTRA, TestNode};
use serde_json::{Value, json};

pub const PROVD: &str = env!("CARGO_BIN_EXE_provd");

pub const HELLO_MANIFEST: &str = "name = \"hello\"\nversion = \"VERSION\"\n[capabilities.log]\n\
     [capabilities.progress]\n[capabilities.hashing]\n[limits]\nmemory-mib = 16\n";

pub fn hello(version: &str) -> String {
    HELLO_MANIFEST.replace("VERSION", version)
}

pub fn imager(version: &str, images: &Path) -> String {
    format!(
        "name = \"imager\"\nversion = \"{version}\"\n[capabilities.log]\n[capabilities.progress]\n\
         [capabilities.hashing]\n[capabilities.dedup]\n[capabilities.vm]\n[capabilities.partitions]\n\
         [capabilities.images]\nsources = [\"dir:{}/*\"]\n[limits]\nmemory-mib = 128\ntimeout-ms = 120000\n",
        images.display()
    )
}

/// A node with images under `<dir>/images` that plugins may fetch.
pub fn node(dir: &Path, extra: &str) -> TestNode {
    let images = dir.join("images");
    for (name, host) in [("web", "web-1"), ("db", "db-1")] {
        let root = images.join(name);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), format!("{host}\n")).unwrap();
        std::fs::write(root.join("etc/os-release"), "ID=test\n").unwrap();
        std::fs::write(root.join("lib.so"), vec![7u8; 300_000]).unwrap();
    }
    let policy = format!(
        "[policy]\nimage-sources = [\"dir:{}/**\"]\nmax-memory-mib = 256\n{DEFAULT_EXTRA}{extra}",
        images.display()
    );
    TestNode::start(Path::new(PROVD), dir, &policy).unwrap()
}

pub fn client(node: &TestNode) -> Client {
    let (ca, cert, key) = node.tls();
    Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) }).unwrap()
}

pub fn spec(name: &str, image: &Path) -> Value {
    json!({"name": name, "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512,
           "image": format!("dir:{}", image.display()),
           "boot": {"firmware": "uefi"},
           "nics": [{"bridge": "br0", "dhcp4": true}]})
}

pub fn partitions_params(wait: bool) -> Value {
    json!({"op": "partitions", "min_layer_bytes": 0, "max_layers": 8,
           "shared_format": "erofs", "private_format": "ext4", "then_wait": wait})
}

pub async fn wait_until(
    client: &Client,
    id: &str,
    pred: impl Fn(&provd_wire::Operation) -> bool,
) -> provd_wire::Operation {
    let mut op = None;
    for _ in 0..600 {
        let seen = client.operation(id, Some((1, u64::MAX))).await.unwrap();
        if pred(&seen) {
            return seen;
        }
        op = Some(seen);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("operation {id} never reached the expected state; last seen: {op:?}");
}

pub fn code(e: ClientError) -> (u16, String, String) {
    match e {
        ClientError::Api { status, code, message } => (status, code, message),
        other => panic!("expected an API error, got {other}"),
    }
}

/// What the node holds: VMs, partitions on disk, reserved resources.
pub async fn node_state(client: &Client, data: &Path) -> (usize, usize, Value) {
    let vms = client.get("/v1/vms").await.unwrap().body;
    let partitions = std::fs::read_dir(data.join("partitions")).map(|d| d.count()).unwrap_or(0);
    (vms["vms"].as_array().unwrap().len(), partitions, vms["reserved"].clone())
}

/// Starts an operation of `request` and waits for its end.
pub async fn finished(c: &Client, request: &Value) -> provd_wire::Operation {
    let started = c.provision(request).await.unwrap();
    let id = started.body["operation"]["id"].as_str().unwrap().to_string();
    c.wait(&id, |_| {}).await.unwrap()
}
