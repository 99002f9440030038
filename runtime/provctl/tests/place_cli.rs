// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! `provctl place` and `provctl provision --place` against
//! three real daemons on 127.0.0.1 (and a fourth address where nothing
//! listens): each VM goes to the node whose layers already hold its image,
//! a VM sharing nothing goes to the node with the most free vCPUs, the
//! silent node is reported and skipped, a VM too large for every node is
//! refused before anything is provisioned, and `--place` provisions each
//! VM where `place` chose, one operation per node.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use provd_client::{Client, TlsFiles};
use provd_tests::SHARED_PARTITION;
use provd_tests::daemon::TestNode;
use serde_json::{Value, json};

mod common;
use common::provd_binary;

fn image(root: &Path, files: &[(&str, u64, usize)]) {
    for (path, seed, len) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, provd_tests::pseudo_random(*len, *seed)).unwrap();
    }
}

fn spec(dir: &Path, name: &str, image: &Path, vcpus: u64) -> PathBuf {
    let file = dir.join(format!("{name}.json"));
    let kind = if image.extension().is_some_and(|e| e == "tar") { "tar" } else { "dir" };
    let spec = json!({"name": name, "hypervisor": "libvirt", "vcpus": vcpus, "memory-mib": 512,
                      "image": format!("{kind}:{}", image.display()), "boot": {"firmware": "uefi"},
                      "nics": [{"bridge": "br0", "dhcp4": true}]});
    std::fs::write(&file, spec.to_string()).unwrap();
    file
}

fn provctl(inventory: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_provctl"))
        .args(args)
        .arg("--inventory")
        .arg(inventory)
        .output()
        .unwrap()
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

/// Rewrites `node`'s configuration to accept managers of every CA in
/// `fleet_ca`, and restarts it.
fn accept_fleet(node: &mut TestNode, fleet_ca: &Path) {
    let text = std::fs::read_to_string(&node.config).unwrap();
    let line = text.lines().find(|l| l.starts_with("client-ca = ")).unwrap().to_string();
    let text = text.replace(&line, &format!("client-ca = {fleet_ca:?}"));
    std::fs::write(&node.config, text).unwrap();
    node.terminate();
    node.restart().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_manager_places_each_vm_where_it_shares_most_and_provisions_it_there() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    // web and db share a large library; other shares nothing.
    let lib = ("usr/lib/libbig.so", 1u64, 600_000usize);
    image(&images.join("web"), &[lib, ("srv/web/index.html", 2, 20_000), ("etc/web", 3, 100)]);
    image(&images.join("db"), &[lib, ("var/lib/db/data", 4, 80_000), ("etc/db", 5, 100)]);
    image(&images.join("other"), &[("opt/other/bin", 6, 300_000)]);
    // other comes as a tarball: the manager fetches it into a scratch store.
    let tarball = images.join("other.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(images.join("other"))
        .arg("-cf")
        .arg(&tarball)
        .arg("opt")
        .status()
        .unwrap();
    assert!(status.success());

    let extra = |vcpus: u64| {
        format!(
            "[policy]\nimage-sources = [\"dir:{0}/**\", \"tar:{0}/**\"]\n[capacity]\n\
             vcpus = {vcpus}\nmemory-mib = 32768\ndisk-bytes = 107374182400\n",
            images.display()
        )
    };
    let provd = provd_binary();
    let mut nodes: Vec<TestNode> = [("a", 16), ("b", 16), ("c", 8)]
        .iter()
        .map(|(n, v)| TestNode::start(&provd, &dir.path().join(n), &extra(*v)).unwrap())
        .collect();
    // One manager identity for the fleet: every node accepts every node's
    // CA's managers, and the manager trusts every node's CA.
    let fleet_ca = dir.path().join("fleet-ca.pem");
    let pems: Vec<String> =
        nodes.iter().map(|n| std::fs::read_to_string(n.tls().0).unwrap()).collect();
    std::fs::write(&fleet_ca, pems.concat()).unwrap();
    for n in &mut nodes {
        accept_fleet(n, &fleet_ca);
    }
    let (_, cert, key) = nodes[0].tls();
    let tls = TlsFiles { ca: fleet_ca.clone(), cert: Some(cert.clone()), key: Some(key.clone()) };
    let manifest = std::fs::read_to_string(SHARED_PARTITION.dir().join("plugin.toml")).unwrap();
    for n in &nodes {
        let c = Client::new(&n.url, &tls).unwrap();
        c.deploy(n.bundle(&manifest, &SHARED_PARTITION.wasm())).await.unwrap();
    }
    // b already runs a VM of web.
    let b = Client::new(&nodes[1].url, &tls).unwrap();
    let first = json!({"plugin": "shared-partition", "params": {"min-layer-bytes": 0},
                       "vms": [serde_json::from_str::<Value>(&std::fs::read_to_string(
                           spec(dir.path(), "web-1", &images.join("web"), 1)).unwrap()).unwrap()]});
    let id =
        b.provision(&first).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    assert_eq!(b.wait(&id, |_| {}).await.unwrap().state.as_str(), "succeeded");

    let capacity = b.get("/v1/capacity").await.unwrap().body;
    assert_eq!(capacity["vcpus"], json!({"total": 16, "reserved": 1, "free": 15}), "{capacity}");
    assert_eq!(capacity["vms"], 1);
    let layers = b.get("/v1/layers?limit=1").await.unwrap().body;
    assert!(layers["total"].as_u64().unwrap() >= 1, "{layers}");
    let l = &layers["layers"][0];
    assert_eq!(l["vms"], json!(["web-1"]), "{layers}");
    let entries = b
        .get(&format!(
            "/v1/layers/{}/{}/entries?limit=2",
            l["partition"].as_str().unwrap(),
            l["layer"].as_str().unwrap()
        ))
        .await
        .unwrap()
        .body;
    assert_eq!(
        entries["entries"].as_array().unwrap().len() as u64,
        entries["total"].as_u64().unwrap().min(2)
    );
    let err = b.get("/v1/layers/p-0000000000000000/layer-0/entries").await.unwrap_err();
    assert_eq!(err.code(), Some("not-found"), "{err}");

    let inventory = dir.path().join("nodes.toml");
    let mut inv = format!("ca = {fleet_ca:?}\ncert = {cert:?}\nkey = {key:?}\n");
    for n in &nodes {
        inv.push_str(&format!("[[nodes]]\nurl = \"{}\"\n", n.url));
    }
    // Nothing listens there.
    inv.push_str("[[nodes]]\nurl = \"https://127.0.0.1:9\"\n");
    std::fs::write(&inventory, inv).unwrap();

    let specs = [
        spec(dir.path(), "web-2", &images.join("web"), 1),
        spec(dir.path(), "db-1", &images.join("db"), 1),
        spec(dir.path(), "other-1", &tarball, 1),
    ];
    let spec_args: Vec<&str> = specs.iter().map(|p| p.to_str().unwrap()).collect();
    let mut args = vec!["place", "--json", "--explain", "--node-timeout", "10"];
    args.extend(&spec_args);
    let out = provctl(&inventory, &args);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let placed = json_of(&out);
    let at: Vec<(&str, &str, u64)> = placed["placements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["vm"].as_str().unwrap(),
                p["node"].as_str().unwrap(),
                p["new-bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    let (a_url, b_url) = (nodes[0].url.as_str(), nodes[1].url.as_str());
    // web-2: b holds all of web. db-1: b holds the library it shares with
    // web. other-1: nothing shared anywhere, so the most free vCPUs (a).
    assert_eq!(at[0], ("web-2", b_url, 0), "{placed:#}");
    assert_eq!((at[1].0, at[1].1, at[1].2), ("db-1", b_url, 80_100), "{placed:#}");
    assert_eq!((at[2].0, at[2].1, at[2].2), ("other-1", a_url, 300_000), "{placed:#}");
    let scores = &placed["placements"][1]["scores"];
    assert_eq!(scores.as_array().unwrap().len(), 3, "{scores}");
    assert_eq!(scores[0]["new-bytes"], 680_100, "{scores}");
    assert_eq!(placed["skipped"][0]["node"], "https://127.0.0.1:9", "{placed:#}");

    // Human output names the node and the bytes; --explain every node.
    let mut args = vec!["place", "--explain"];
    args.extend(&spec_args);
    let out = provctl(&inventory, &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "web-2 (dir:{}) -> {b_url}, adds 0.0 MiB",
            images.join("web").display()
        )),
        "{text}"
    );
    assert!(text.contains("skipped https://127.0.0.1:9"), "{text}");

    // Too large for every node: refused, nothing provisioned.
    let huge = spec(dir.path(), "huge-1", &images.join("web"), 64);
    let out = provctl(
        &inventory,
        &["provision", "--place", "--plugin", "shared-partition", huge.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node fits huge-1"));
    let out = provctl(&inventory, &["place", huge.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stdout).contains("huge-1"));

    // Provision where place chose: one operation per node.
    let mut args = vec![
        "provision",
        "--place",
        "--plugin",
        "shared-partition",
        "--params",
        r#"{"min-layer-bytes": 0}"#,
        "--idempotency-key",
        "order-17",
        "--json",
    ];
    args.extend(&spec_args);
    let out = provctl(&inventory, &args);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let done = json_of(&out);
    assert_eq!(done["nodes"].as_array().unwrap().len(), 2, "{done:#}");
    let a = Client::new(a_url, &tls).unwrap();
    let c = Client::new(&nodes[2].url, &tls).unwrap();
    assert_eq!(vms_of(&a).await, vec!["other-1"]);
    assert_eq!(vms_of(&b).await, vec!["db-1", "web-1", "web-2"]);
    assert!(vms_of(&c).await.is_empty());
    // The same request again reaches the same operations (keys per node).
    let out = provctl(&inventory, &args);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(vms_of(&b).await, vec!["db-1", "web-1", "web-2"]);
}

async fn vms_of(c: &Client) -> Vec<String> {
    let v = c.get("/v1/vms").await.unwrap().body;
    let mut names: Vec<String> = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}
