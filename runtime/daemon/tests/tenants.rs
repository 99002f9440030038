// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Trust domains over a real daemon, real TLS and a real OCI registry: a VM
//! of the provider's public catalogue first, then two tenants' custom images
//! (the catalogue image plus each tenant's secret bytes and a setuid
//! binary), one request at a time. Each tenant's VM shares the catalogue's
//! layers; no file any VM's `domain.xml` attaches holds the other tenant's
//! secret; `GET /v1/layers` shows every layer's domain.

use std::path::Path;

use provd_client::{Client, TlsFiles};
use provd_tests::daemon::{DEFAULT_EXTRA, TestNode};
use provd_tests::oci::{content, oci_layout, push, start_registry, tar_layer as layer};
use provd_tests::{SHARED_PARTITION, pseudo_random};
use serde_json::{Value, json};

const PROVD: &str = env!("CARGO_BIN_EXE_provd");

fn spec(name: &str, tenant: Option<&str>, image: &str) -> Value {
    let mut s = json!({"name": name, "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512,
                       "image": image, "boot": {"firmware": "uefi"}});
    if let Some(t) = tenant {
        s["tenant"] = json!(t);
        // A firmware-booted guest gets persistent memory where it asks.
        s["shared-attach"] = json!("pmem");
    }
    s
}

/// The node's files a domain XML attaches (the firmware is the host's):
/// disks, and persistent memory, which QEMU's arguments name.
fn attached(domain_xml: &Path, data: &Path) -> Vec<String> {
    let xml = std::fs::read_to_string(domain_xml).unwrap();
    let disks = xml.split("file=\"").skip(1).filter_map(|s| s.split('"').next());
    let pmem =
        xml.split("&quot;mem-path&quot;:&quot;").skip(1).filter_map(|s| s.split("&quot;").next());
    disks
        .chain(pmem)
        .filter(|f| Path::new(f).starts_with(data) && Path::new(f).is_file())
        .map(str::to_string)
        .collect()
}

fn holds(file: &str, needle: &[u8]) -> bool {
    let bytes = std::fs::read(file).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle)
}

async fn provision(c: &Client, vms: Vec<Value>) -> provd_wire::Operation {
    let request = json!({"plugin": "shared-partition", "vms": vms,
                         "params": {"min-layer-bytes": 0, "shared-format": "erofs"}});
    let started = c.provision(&request).await.unwrap();
    let id = started.body["operation"]["id"].as_str().unwrap().to_string();
    c.wait(&id, |_| {}).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_share_the_public_catalogue_and_never_each_others_files() {
    let dir = tempfile::tempdir().unwrap();
    let registry = start_registry();
    let base: Vec<(&str, Vec<u8>, u32)> = vec![
        ("usr/lib/libc.so.6", content(1, 3_000_000), 0o644),
        ("usr/bin/sh", content(2, 600_000), 0o755),
        ("srv/web/index.html", content(4, 400_000), 0o644),
        ("etc/os-release", b"ID=demo\n".to_vec(), 0o644),
    ];
    let port = registry.port;
    let push_image = |repo: &str, layers: &[Vec<u8>]| {
        let layout = dir.path().join(format!("layout-{}", repo.replace('/', "-")));
        oci_layout(&layout, layers, "v1");
        push(&layout, "v1", &registry, repo);
        format!("oci+http://127.0.0.1:{port}/{repo}:v1")
    };
    let web = push_image("catalogue/web", &[layer(&base)]);
    // Bytes nobody else has: a pseudo-random stream per tenant.
    let secrets: Vec<(&str, Vec<u8>)> =
        [("a", 1), ("b", 2)].iter().map(|&(t, n)| (t, pseudo_random(300_000, n))).collect();
    let mut custom = Vec::new();
    for (n, (t, bytes)) in (1u64..).zip(&secrets) {
        let own = vec![
            ("home/app/credentials", bytes.clone(), 0o600),
            // A setuid-root binary, the tenant's own business in its own VM.
            ("usr/local/bin/escalate", pseudo_random(20_000, n << 32), 0o4755),
        ];
        custom.push(push_image(&format!("customers/{t}/app"), &[layer(&base), layer(&own)]));
    }

    let extra = format!(
        "[policy]\nimage-sources = [\"oci+http://127.0.0.1:{port}/**\"]\n\
         [sharing]\npublic-images = [\"oci+http://127.0.0.1:{port}/catalogue/**\"]\n{DEFAULT_EXTRA}"
    );
    let node = TestNode::start(Path::new(PROVD), &dir.path().join("node"), &extra).unwrap();
    let (ca, cert, key) = node.tls();
    let c = Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) }).unwrap();
    let manifest = std::fs::read_to_string(SHARED_PARTITION.dir().join("plugin.toml")).unwrap();
    assert_eq!(
        c.deploy(node.bundle(&manifest, &SHARED_PARTITION.wasm())).await.unwrap().status,
        201
    );

    // The catalogue's web image, for the default tenant: public layers.
    let done = provision(&c, vec![spec("web-1", None, &web)]).await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");

    // Each tenant's custom image, alone: the catalogue's files come from the
    // public layers, only the tenant's own go anywhere new.
    let base_bytes: u64 = 3_000_000 + 600_000 + 400_000 + 8;
    for ((t, _), image) in secrets.iter().zip(&custom) {
        let done = provision(&c, vec![spec(&format!("{t}-1"), Some(t), image)]).await;
        assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
        let totals = &done.report_field("output")["totals"];
        let naive = totals["naive_bytes"].as_u64().unwrap();
        assert_eq!(naive, base_bytes + 300_000 + 20_000);
        assert_eq!(totals["node_layer_bytes"], base_bytes, "{totals}");
        // The report names each layer's domain: the catalogue's it stacks,
        // its tenant's it builds.
        let mut domains: Vec<String> = done.report_field("output")["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["domain"].as_str().unwrap().to_string())
            .collect();
        domains.sort();
        domains.dedup();
        assert_eq!(domains, ["public".to_string(), format!("tenant:{t}")], "{done:#?}");
        // Its own tenant's partition is persistent memory; the catalogue's,
        // which other tenants' guests read too, a disk read past the host's
        // page cache.
        let vm = &done.report_field("output")["vms"][0];
        let mut how: Vec<&str> =
            vm["shared_attach"].as_array().unwrap().iter().map(|h| h.as_str().unwrap()).collect();
        how.sort();
        assert_eq!(how, ["block-direct", "pmem"], "{vm:#}");
        let xml = std::fs::read_to_string(
            node.data.join("vms").join(format!("{t}-1")).join("domain.xml"),
        )
        .unwrap();
        assert_eq!(xml.matches("cache=\"none\"").count(), 1, "{xml}");
        assert_eq!(xml.matches("virtio-pmem-pci").count(), 1, "{xml}");
        let saving = totals["saving_bytes"].as_u64().unwrap() as f64 / naive as f64;
        assert!(saving >= 0.8, "tenant {t} saves {:.1} %", saving * 100.0);
        eprintln!("tenant {t}: {:.1} % saved", saving * 100.0);
    }

    // No file a VM attaches holds the other tenant's secret; its own VM's
    // files do (so the search can find it).
    let needle = |t: &str| secrets.iter().find(|(s, _)| *s == t).unwrap().1[..4096].to_vec();
    for (vm, own, other) in [("a-1", "a", "b"), ("b-1", "b", "a"), ("web-1", "", "a")] {
        let files = attached(&node.data.join("vms").join(vm).join("domain.xml"), &node.data);
        assert!(files.len() >= 2, "{vm}: {files:?}");
        let hits: Vec<&String> = files.iter().filter(|f| holds(f, &needle(other))).collect();
        assert!(hits.is_empty(), "{vm} attaches {hits:?}, which hold tenant {other}'s secret");
        if !own.is_empty() {
            assert!(files.iter().any(|f| holds(f, &needle(own))), "{vm}: its own secret is gone");
        }
        if vm == "web-1" {
            assert!(!files.iter().any(|f| holds(f, &needle("b"))), "web-1 attaches b's secret");
        }
    }

    // The manager sees every layer, with its domain.
    let layers = c.get("/v1/layers").await.unwrap().body;
    let domains: std::collections::BTreeSet<&str> = layers["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["domain"].as_str().unwrap())
        .collect();
    assert!(domains.contains("public"), "{layers:#}");
    for d in &domains {
        assert!(["public", "tenant:a", "tenant:b"].contains(d), "{layers:#}");
    }

    // Two tenants in one request: planned apart, each on its own layers.
    let done =
        provision(&c, vec![spec("a-2", Some("a"), &custom[0]), spec("b-2", Some("b"), &custom[1])])
            .await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
    for (vm, other) in [("a-2", "b"), ("b-2", "a")] {
        let files = attached(&node.data.join("vms").join(vm).join("domain.xml"), &node.data);
        assert!(!files.iter().any(|f| holds(f, &needle(other))), "{vm} reaches {other}'s secret");
    }

    // A repack of every VM never mixes domains: the first VM's domain
    // (tenant a's) is repacked, the others are left where they are, saying
    // why, and still no VM reaches the other tenant's secret.
    let repacked = c.post_json("/v1/repack", &json!({"all": true})).await.unwrap();
    assert_eq!(repacked.status, 200, "{:#}", repacked.body);
    let r = &repacked.body["repack"];
    assert_eq!(r["moved"], json!(["a-1", "a-2"]), "{r:#}");
    assert_eq!(r["partition"]["domain"], "tenant:a", "{r:#}");
    let skipped = r["skipped"].to_string();
    for vm in ["b-1", "b-2", "web-1"] {
        assert!(skipped.contains(vm), "{vm} is not skipped: {r:#}");
    }
    assert!(skipped.contains("never mixes trust domains"), "{r:#}");
    for (vm, other) in [("a-1", "b"), ("a-2", "b"), ("b-1", "a"), ("b-2", "a"), ("web-1", "a")] {
        let files = attached(&node.data.join("vms").join(vm).join("domain.xml"), &node.data);
        assert!(!files.iter().any(|f| holds(f, &needle(other))), "{vm} reaches {other}'s secret");
    }
    let new_partition = r["partition"]["id"].as_str().unwrap();
    let a1 = std::fs::read_to_string(node.data.join("vms/a-1/domain.xml")).unwrap();
    assert!(a1.contains(new_partition), "a-1 attaches the repacked partition");

    // A tenant the spec names that is no DNS label is refused up front.
    let bad = json!({"plugin": "shared-partition", "vms": [spec("c-1", Some("C/../a"), &web)]});
    match c.provision(&bad).await {
        Err(provd_client::ClientError::Api { status, message, .. }) => {
            assert_eq!(status, 400, "{message}");
            assert!(message.contains("tenant"), "{message}");
        }
        other => panic!("a tenant that is no DNS label was accepted: {other:?}"),
    }
}
