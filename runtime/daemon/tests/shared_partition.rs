// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The product end to end: the shared-partition bundle signed and deployed
//! to a real daemon over mutual TLS, three VMs provisioned from images in a
//! real OCI registry on 127.0.0.1, every VM's partitions verified against
//! its image, every domain XML validated by `virt-xml-validate`, the report
//! checked, and the node back to empty after every VM is deleted.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::finished;
use provd_client::{Client, TlsFiles};
use provd_tests::daemon::{DEFAULT_EXTRA, TestNode};
use provd_tests::oci::{content, oci_layout, push, start_registry, tar_layer};
use provd_tests::{CLOUD_INIT, SHARED_PARTITION};
use serde_json::{Value, json};

const PROVD: &str = env!("CARGO_BIN_EXE_provd");

/// A tar layer of regular files, mode 0644, with their directories.
fn layer(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    tar_layer(&files.iter().map(|(p, c)| (*p, c.clone(), 0o644)).collect::<Vec<_>>())
}

fn spec(name: &str, image: &str) -> Value {
    json!({"name": name, "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512, "image": image,
           "boot": {"firmware": "uefi"}, "nics": [{"bridge": "br0", "dhcp4": true}],
           "cloud-init": {"hostname": format!("{name}.example")}})
}

/// A node started in `dir` with `extra` configuration, the shared-partition
/// plugin deployed on it, and a manager's client.
async fn shared_partition_node(dir: &Path, extra: &str) -> (TestNode, Client) {
    let node = TestNode::start(Path::new(PROVD), &dir.join("node"), extra).unwrap();
    let (ca, cert, key) = node.tls();
    let c = Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) }).unwrap();
    let manifest = std::fs::read_to_string(SHARED_PARTITION.dir().join("plugin.toml")).unwrap();
    c.deploy(node.bundle(&manifest, &SHARED_PARTITION.wasm())).await.unwrap();
    (node, c)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_vms_from_an_oci_registry_share_one_partition_and_leave_nothing_when_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let registry = start_registry();
    // A base every image has, a library web and api share, and each one's own.
    let base: Vec<(&str, Vec<u8>)> = vec![
        ("usr/lib/libc.so.6", content(1, 900_000)),
        ("usr/bin/sh", content(2, 120_000)),
        ("etc/os-release", b"ID=demo\n".to_vec()),
    ];
    let images = [
        (
            "web",
            vec![
                ("usr/lib/libapp.so", content(3, 400_000)),
                ("srv/web/index.html", content(4, 5_000)),
            ],
        ),
        (
            "api",
            vec![
                ("usr/lib/libapp.so", content(3, 400_000)),
                ("srv/api/api.bin", content(5, 250_000)),
            ],
        ),
        ("db", vec![("var/lib/db/engine", content(6, 700_000))]),
    ];
    let mut references = Vec::new();
    for (name, own) in &images {
        let layout = dir.path().join(format!("layout-{name}"));
        let own: Vec<(&str, Vec<u8>)> = own.iter().map(|(p, c)| (*p, c.clone())).collect();
        oci_layout(&layout, &[layer(&base), layer(&own)], "v1");
        push(&layout, "v1", &registry, &format!("demo/{name}"));
        references.push(format!("oci+http://127.0.0.1:{}/demo/{name}:v1", registry.port));
    }

    let extra = format!(
        "[policy]\nimage-sources = [\"oci+http://127.0.0.1:{}/demo/**\"]\n{DEFAULT_EXTRA}",
        registry.port
    );
    let mut node = TestNode::start(Path::new(PROVD), &dir.path().join("node"), &extra).unwrap();
    let (ca, cert, key) = node.tls();
    let c = Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) }).unwrap();
    let manifest = std::fs::read_to_string(SHARED_PARTITION.dir().join("plugin.toml")).unwrap();
    let deployed = c.deploy(node.bundle(&manifest, &SHARED_PARTITION.wasm())).await.unwrap();
    assert_eq!(deployed.status, 201);

    let names = ["web-1", "api-1", "db-1"];
    let vms: Vec<Value> = names.iter().zip(&references).map(|(n, r)| spec(n, r)).collect();
    let request = json!({"plugin": "shared-partition", "vms": vms, "idempotency-key": "e2e-1",
                         "params": {"min-layer-bytes": 0, "shared-format": "erofs",
                                    "private-format": "ext4"}});
    let started = c.provision(&request).await.unwrap();
    let id = started.body["operation"]["id"].as_str().unwrap().to_string();
    let mut phases = Vec::new();
    let done = c
        .wait(&id, |op| {
            if let Some(p) = op.phase.as_deref()
                && phases.last().map(String::as_str) != Some(p)
            {
                phases.push(p.to_string());
            }
        })
        .await
        .unwrap();
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
    // The retry of the same request is the same operation.
    let again = c.provision(&request).await.unwrap();
    assert_eq!((again.status, again.body["operation"]["id"].as_str()), (200, Some(id.as_str())));

    // The report: the base in one layer of all three, the library in one
    // of web and api; each VM keeps only its own files.
    let report = &done.report_field("output");
    let layers = report["layers"].as_array().unwrap();
    let layer_of = |vms: &[&str]| {
        layers
            .iter()
            .find(|l| {
                let mut got: Vec<&str> =
                    l["vms"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
                got.sort_unstable();
                let mut want = vms.to_vec();
                want.sort_unstable();
                got == want
            })
            .unwrap_or_else(|| panic!("no layer of {vms:?} in {layers:?}"))
    };
    let all = layer_of(&["api-1", "db-1", "web-1"]);
    assert_eq!(all["bytes"], 900_000 + 120_000 + 8);
    assert_eq!(layer_of(&["api-1", "web-1"])["bytes"], 400_000);
    let totals = &report["totals"];
    let naive = 3 * (900_000 + 120_000 + 8) + 2 * 400_000 + 5_000 + 250_000 + 700_000;
    let stored = (900_000 + 120_000 + 8) + 400_000 + 5_000 + 250_000 + 700_000;
    assert_eq!(totals["naive_bytes"], naive);
    assert_eq!(totals["stored_bytes"], stored);
    assert_eq!(totals["saving_bytes"], naive - stored);
    let per_vm = report["vms"].as_array().unwrap();
    assert_eq!(per_vm.len(), 3);
    let web = per_vm.iter().find(|v| v["name"] == "web-1").unwrap();
    // Its own file is in a layer of its own, for the next VM of its image.
    assert_eq!(web["private_bytes"], 0);
    assert_eq!(web["new_shared_bytes"], 900_000 + 120_000 + 8 + 400_000 + 5_000);
    assert_eq!(web["node_layer_bytes"], 0);
    assert_eq!(web["layers"].as_array().unwrap().len(), 3);
    assert!(
        web["disks"].as_array().unwrap().iter().any(|d| d.as_str().unwrap().starts_with("shared")),
        "{web}"
    );
    let fields = &done.report_field("fields");
    assert_eq!(fields["vms"], "3");
    // The long polls see a sample of the phases (a quick phase can pass
    // between two of them): what they saw comes in the plugin's order, and
    // the operation ends in its last phase.
    let order = [
        "started",
        "fetch-images",
        "plan",
        "shared-partition",
        "private-partitions",
        "configure-vms",
    ];
    let ranks: Vec<usize> = phases
        .iter()
        .map(|p| order.iter().position(|o| o == p).unwrap_or_else(|| panic!("phase {p}")))
        .collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{phases:?}");
    assert_eq!(done.phase.as_deref().unwrap_or_default(), "configure-vms", "{done:?}");

    // web-2 alone, the image of web-1: every byte from the layers already
    // on the node, no shared partition built, nothing stored again.
    let alone = json!({"plugin": "shared-partition", "vms": [spec("web-2", &references[0])],
                       "params": {"min-layer-bytes": 0}});
    let started = c.provision(&alone).await.unwrap();
    let alone_id = started.body["operation"]["id"].as_str().unwrap().to_string();
    let alone_done = c.wait(&alone_id, |_| {}).await.unwrap();
    assert_eq!(alone_done.state.as_str(), "succeeded", "{alone_done:#?}");
    let web_bytes: u64 = 900_000 + 120_000 + 8 + 400_000 + 5_000;
    let out = &alone_done.report_field("output");
    assert_eq!(out["shared_partitions"], json!([]));
    assert_eq!(out["totals"]["naive_bytes"], web_bytes);
    assert_eq!(out["totals"]["stored_bytes"], 0);
    assert_eq!(out["totals"]["node_layer_bytes"], web_bytes);
    assert_eq!(out["totals"]["saving_bytes"], web_bytes);
    let web2 = &out["vms"][0];
    assert_eq!(
        (&web2["node_layer_bytes"], &web2["new_shared_bytes"], &web2["private_bytes"]),
        (&json!(web_bytes), &json!(0), &json!(0))
    );
    assert_eq!(web2["whiteouts"], 0);
    assert_eq!(web2["layers"].as_array().unwrap().len(), 3);
    assert!(out["layers"].as_array().unwrap().iter().all(|l| l["on_node"] == true), "{out:#}");
    let summary = alone_done.report_field("summary").as_str().unwrap();
    assert!(
        summary.starts_with(&format!("1 VMs provisioned: 0 of {web_bytes} bytes stored")),
        "{summary}"
    );
    // Its shared disk is web-1's shared partition.
    let shared_of = |vm: &str| {
        let xml =
            std::fs::read_to_string(node.data.join("vms").join(vm).join("domain.xml")).unwrap();
        xml.lines()
            .filter(|l| l.contains("shared.erofs"))
            .map(|l| l.trim().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(shared_of("web-2"), shared_of("web-1"));
    assert_eq!(shared_of("web-2").len(), 1);
    let alone_audit =
        c.get(&format!("/v1/audit?operation={alone_id}&kind=host-call")).await.unwrap().body;
    assert!(
        !alone_audit["audit"].as_array().unwrap().iter().any(|r| r["function"] == "create-shared"),
        "{alone_audit}"
    );
    let names = ["web-1", "api-1", "db-1", "web-2"];

    // Every domain XML is valid libvirt.
    for name in names {
        let xml = node.data.join("vms").join(name).join("domain.xml");
        let check = std::process::Command::new("virt-xml-validate")
            .arg(&xml)
            .arg("domain")
            .output()
            .unwrap();
        assert!(check.status.success(), "{name}: {}", String::from_utf8_lossy(&check.stderr));
    }
    // The audit trail has each decision.
    let audit =
        c.get(&format!("/v1/audit?operation={}&kind=host-call", done.id)).await.unwrap().body;
    let count =
        |f: &str| audit["audit"].as_array().unwrap().iter().filter(|r| r["function"] == f).count();
    assert_eq!((count("fetch"), count("plan"), count("create-shared")), (3, 1, 1));
    assert_eq!((count("create-privates"), count("configure-all")), (1, 1));

    // The cloud-init plugin customises web-1: a new hostname and a user,
    // written as a new seed in place of the attached one.
    let manifest = std::fs::read_to_string(CLOUD_INIT.dir().join("plugin.toml")).unwrap();
    c.deploy(node.bundle(&manifest, &CLOUD_INIT.wasm())).await.unwrap();
    let seed = node.data.join("vms/web-1/seed.iso");
    let (_, before) = provd_tests::seed::read_seed_iso(&seed).unwrap();
    let mut web_spec = spec("web-1", &references[0]);
    web_spec["cloud-init"] = json!({"hostname": "www.example.net", "users": [{"name": "ops",
        "ssh-authorized-keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJDiwd0q0EtpBdN27xv1S9+KrgNRz6jxD4skH2FHqmCr ops@example.com"]}]});
    let custom =
        c.provision(&json!({"plugin": "cloud-init", "vms": [web_spec.clone()]})).await.unwrap();
    let custom_id = custom.body["operation"]["id"].as_str().unwrap().to_string();
    let done_custom = c.wait(&custom_id, |_| {}).await.unwrap();
    assert_eq!(done_custom.state.as_str(), "succeeded", "{done_custom:#?}");
    let (label, after) = provd_tests::seed::read_seed_iso(&seed).unwrap();
    assert_eq!(label, "cidata");
    let file = |files: &[(String, Vec<u8>)], name: &str| {
        files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| String::from_utf8_lossy(c).into_owned())
            .unwrap()
    };
    assert!(file(&after, "meta-data").contains("www.example.net"), "{after:?}");
    assert!(file(&after, "user-data").contains("ops@example.com"), "{after:?}");
    assert_ne!(file(&before, "meta-data"), file(&after, "meta-data"));
    let id_now = done_custom.report_field("output")[0]["instance_id"].as_str().unwrap();
    assert!(file(&after, "meta-data").contains(id_now));
    // Its journal is settled with the operation's end.
    let undo = node.data.join("vms/web-1/customize.undo.json");
    assert!(!undo.exists());
    // Anything beyond cloud-init and addresses is refused, naming the field;
    // web-1, customised first in that operation, gets its seed back.
    let mut again = web_spec.clone();
    again["cloud-init"]["hostname"] = json!("other.example.net");
    let mut bigger = spec("api-1", &references[1]);
    bigger["vcpus"] = json!(4);
    let refused =
        c.provision(&json!({"plugin": "cloud-init", "vms": [again, bigger]})).await.unwrap();
    let refused_id = refused.body["operation"]["id"].as_str().unwrap().to_string();
    let refused = c.wait(&refused_id, |_| {}).await.unwrap();
    assert_eq!(refused.error_code().unwrap_or_default(), "plugin-denied", "{refused:#?}");
    assert!(refused.error_message().unwrap_or_default().contains("vcpus"), "{refused:#?}");
    assert_eq!(provd_tests::seed::read_seed_iso(&seed).unwrap().1, after);
    assert!(!undo.exists());
    let web = c.get("/v1/vms/web-1").await.unwrap().body;
    assert_eq!(web["vm"]["spec"]["cloud-init"]["hostname"], "www.example.net", "{web}");

    // Each VM's private partition on its layers is exactly its image,
    // read with provd's own readers while the node is stopped.
    assert!(node.terminate().unwrap().success());
    {
        let store = Arc::new(provd_store::Store::open(&node.data).unwrap());
        for name in names {
            let v = provd_partitions::verify_vm(&store, name, &Default::default()).unwrap();
            assert!(v.mismatches.is_empty(), "{name}: {:?}", v.mismatches);
            assert!(v.entries > 0);
        }
    }
    node.restart().unwrap();
    let c = Client::new(&node.url, &{
        let (ca, cert, key) = node.tls();
        TlsFiles { ca, cert: Some(cert), key: Some(key) }
    })
    .unwrap();

    // Deleting every VM gives everything back.
    for name in names {
        c.delete(&format!("/v1/vms/{name}")).await.unwrap();
    }
    let state = c.get("/v1/vms").await.unwrap().body;
    assert_eq!(state["vms"], json!([]));
    assert_eq!(state["reserved"], json!({"vcpus": 0, "memory-mib": 0, "disk-bytes": 0}));
    assert_eq!(std::fs::read_dir(node.data.join("partitions")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(node.data.join("vms")).unwrap().count(), 0);
    node.terminate();
    let store = provd_store::Store::open(&node.data).unwrap();
    assert!(store.partitions().unwrap().is_empty());
    assert!(store.missing_objects().unwrap().is_empty());
    // Nothing unreferenced: the images stay (the node's image cache), and a
    // collection finds nothing to free.
    assert_eq!(store.images().unwrap().len(), 3);
    assert_eq!(store.gc().unwrap(), provd_store::Freed::default());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_that_does_not_fit_fails_the_request_and_nothing_of_it_stays() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    for (name, own) in [("web", 3u8), ("api", 4), ("db", 5)] {
        let root = images.join(name);
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::write(root.join("usr/lib/libc.so.6"), content(1, 300_000)).unwrap();
        std::fs::write(root.join("usr/lib/own.bin"), content(own, 100_000)).unwrap();
    }
    // Room for two VMs of one vCPU, not three.
    let extra = format!(
        "[policy]\nimage-sources = [\"dir:{}/**\"]\n[capacity]\nvcpus = 2\nmemory-mib = 8192\n\
         disk-bytes = 107374182400\n",
        images.display()
    );
    let (node, c) = shared_partition_node(dir.path(), &extra).await;
    let vms: Vec<Value> = ["web", "api", "db"]
        .iter()
        .map(|n| spec(&format!("{n}-1"), &format!("dir:{}", images.join(n).display())))
        .collect();
    let request =
        json!({"plugin": "shared-partition", "vms": vms, "params": {"min-layer-bytes": 0}});
    let done = finished(&c, &request).await;
    assert_eq!(done.state.as_str(), "failed", "{done:#?}");
    assert_eq!(done.error_code().unwrap_or_default(), "plugin-quota-exceeded", "{done:#?}");
    assert!(done.error_message().unwrap_or_default().contains("vcpus"), "{done:#?}");
    // Every partition and VM the request built is gone, reservations too.
    let state = c.get("/v1/vms").await.unwrap().body;
    assert_eq!(state["vms"], json!([]));
    assert_eq!(state["reserved"], json!({"vcpus": 0, "memory-mib": 0, "disk-bytes": 0}));
    assert_eq!(std::fs::read_dir(node.data.join("partitions")).unwrap().count(), 0);
    let vm_dirs = std::fs::read_dir(node.data.join("vms")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(vm_dirs, 0);
    let audit =
        c.get(&format!("/v1/audit?operation={}&outcome=denied", done.id)).await.unwrap().body;
    assert_eq!(audit["audit"][0]["function"], "configure-all", "{audit}");
}

/// How shared partitions reach guests: persistent memory where asked (by
/// default for kernel-booted VMs: the boot test's), a disk where the
/// request asks (the plugin's `shared-attach`, which its grant may set),
/// the format cannot be mapped (lz4) or a firmware-booted VM asks nothing,
/// and nowhere persistent memory on a node whose policy is disks.
#[tokio::test(flavor = "multi_thread")]
async fn shared_partitions_are_persistent_memory_unless_the_request_format_or_node_says_disk() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    for (name, own) in [("web", 3u8), ("api", 4)] {
        let root = images.join(name);
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::write(root.join("usr/lib/libc.so.6"), content(1, 300_000)).unwrap();
        std::fs::write(root.join("usr/lib/own.bin"), content(own, 100_000)).unwrap();
    }
    let sources = format!("[policy]\nimage-sources = [\"dir:{}/**\"]\n", images.display());
    let (node, c) = shared_partition_node(dir.path(), &format!("{sources}{DEFAULT_EXTRA}")).await;
    let image = |n: &str| format!("dir:{}", images.join(n).display());
    let provision = |vms: Vec<Value>, params: Value| {
        let c = &c;
        async move {
            finished(c, &json!({"plugin": "shared-partition", "vms": vms, "params": params})).await
        }
    };
    let attach_of = |done: &provd_wire::Operation| -> Vec<String> {
        let vms = done.report_field("output")["vms"].as_array().unwrap().clone();
        vms.iter()
            .flat_map(|v| v["shared_attach"].as_array().unwrap().clone())
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    // These VMs boot through firmware, whose own initramfs may lack the
    // drivers: persistent memory where the request asks for it.
    let done = provision(
        vec![spec("web-1", &image("web"))],
        json!({"min-layer-bytes": 0, "shared-attach": "pmem"}),
    )
    .await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
    assert!(attach_of(&done).iter().all(|a| a == "pmem"), "{:?}", attach_of(&done));
    assert!(done.report_field("fields")["shared-attach"].as_str().unwrap().starts_with("pmem="));
    let xml = std::fs::read_to_string(node.data.join("vms/web-1/domain.xml")).unwrap();
    assert!(xml.contains("virtio-pmem-pci") && !xml.contains("shared.erofs\"/>"), "{xml}");
    // The partition is laid out for it: a multiple of 2 MiB.
    let shared: Vec<u64> = std::fs::read_dir(node.data.join("partitions"))
        .unwrap()
        .filter_map(|e| std::fs::metadata(e.unwrap().path().join("shared.erofs")).ok())
        .map(|m| m.len())
        .collect();
    assert!(!shared.is_empty() && shared.iter().all(|n| n % (2 << 20) == 0), "{shared:?}");

    // The request asks for disks: the plugin sets it on each spec.
    let done = provision(
        vec![spec("web-2", &image("web"))],
        json!({"min-layer-bytes": 0, "shared-attach": "block"}),
    )
    .await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
    assert!(attach_of(&done).iter().all(|a| a == "block"), "{:?}", attach_of(&done));
    // A spec naming one and the request another: refused, naming the field.
    let mut asked = spec("web-3", &image("web"));
    asked["shared-attach"] = json!("pmem");
    let done = provision(vec![asked], json!({"shared-attach": "block"})).await;
    assert_eq!(done.state.as_str(), "failed", "{done:#?}");
    assert!(done.error_message().unwrap_or_default().contains("shared-attach"), "{done:#?}");
    // lz4 is not mapped with DAX: a disk, and the report says so.
    let done = provision(
        vec![spec("api-1", &image("api"))],
        json!({"min-layer-bytes": 0, "shared-format": "erofs-lz4", "node-layers": false,
               "shared-attach": "pmem"}),
    )
    .await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
    assert_eq!(attach_of(&done), ["block"], "{done:#?}");
    // Asked nothing, a firmware-booted VM gets disks.
    let done = provision(vec![spec("web-4", &image("web"))], json!({"min-layer-bytes": 0})).await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
    assert!(attach_of(&done).iter().all(|a| a == "block"), "{:?}", attach_of(&done));
    drop(node);

    // A node whose policy is disks refuses a spec asking for pmem.
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{sources}shared-attach = \"block\"\n{DEFAULT_EXTRA}");
    let (node, c) = shared_partition_node(dir.path(), &extra).await;
    let mut asked = spec("web-1", &image("web"));
    asked["shared-attach"] = json!("pmem");
    let request = json!({"plugin": "shared-partition", "vms": [asked], "params": {}});
    let done = finished(&c, &request).await;
    assert_eq!(done.state.as_str(), "failed", "{done:#?}");
    assert!(done.error_message().unwrap_or_default().contains("shared-attach"), "{done:#?}");
    let request = json!({"plugin": "shared-partition", "vms": [spec("web-2", &image("web"))]});
    let done = finished(&c, &request).await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
    assert!(attach_of(&done).iter().all(|a| a == "block"), "{:?}", attach_of(&done));
    // Nor does it pay for the DAX layout: its 400 kB of files are not
    // padded to 2 MiB.
    let sizes: Vec<u64> = std::fs::read_dir(node.data.join("partitions"))
        .unwrap()
        .filter_map(|e| std::fs::metadata(e.unwrap().path().join("shared.erofs")).ok())
        .map(|m| m.len())
        .collect();
    assert!(!sizes.is_empty() && sizes.iter().all(|n| *n < 2 << 20), "{sizes:?}");
    drop(node);

    // The catalogue as a virtio-fs directory would be read through the
    // host's page cache by every tenant: refused unless the node allows it.
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "{sources}[sharing]\npublic-images = [\"dir:{}/web\"]\n{DEFAULT_EXTRA}",
        images.display()
    );
    let (_node, c) = shared_partition_node(dir.path(), &extra).await;
    let request = json!({"plugin": "shared-partition", "vms": [spec("web-1", &image("web"))],
                         "params": {"min-layer-bytes": 0, "shared-format": "dir"}});
    let done = finished(&c, &request).await;
    assert_eq!(done.state.as_str(), "failed", "{done:#?}");
    assert!(done.error_message().unwrap_or_default().contains("share-public-memory"), "{done:#?}");
}

/// Hosting customers order VMs one at a time: each request shares what the
/// node holds, VMs come and go, a repack packs what is in use, and every
/// VM stays exactly its image.
#[tokio::test(flavor = "multi_thread")]
async fn vms_ordered_one_at_a_time_share_the_node_and_a_repack_keeps_every_vm_exact() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let base = [("usr/lib/libc.so.6", content(1, 300_000)), ("usr/bin/sh", content(2, 50_000))];
    let own = [("web", 3u8, 40_000usize), ("api", 4, 60_000), ("db", 5, 80_000)];
    for (name, seed, len) in own {
        let root = images.join(name);
        for (path, data) in base.iter().chain([&(
            if name == "db" { "var/lib/db/engine" } else { "srv/app/app.bin" },
            content(seed, len),
        )]) {
            let file = root.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, data).unwrap();
        }
    }
    // VMs' files handed to a hypervisor user of their own (any such user
    // will do: nothing boots here), so that the repack's new links are seen.
    let handed = dir.path().join("handed");
    let extra = format!(
        "[policy]\nimage-sources = [\"dir:{}/**\"]\n[hypervisor]\nuser = \"nobody\"\n\
         group = \"nogroup\"\nvm-dir = \"{}\"\n{DEFAULT_EXTRA}",
        images.display(),
        handed.display()
    );
    let (mut node, c) = shared_partition_node(dir.path(), &extra).await;
    let image = |name: &str| format!("dir:{}", images.join(name).display());
    let base_bytes: u64 = 350_000;
    // (VM, image, bytes it stores anew)
    let order = [
        ("web-1", "web", base_bytes + 40_000),
        ("api-1", "api", 60_000),
        ("db-1", "db", 80_000),
        ("web-2", "web", 0),
        ("api-2", "api", 0),
        ("db-2", "db", 0),
    ];
    for (vm, img, stored) in order {
        let request = json!({"plugin": "shared-partition", "vms": [spec(vm, &image(img))],
                             "params": {"min-layer-bytes": 0}});
        let done = finished(&c, &request).await;
        assert_eq!(done.state.as_str(), "succeeded", "{vm}: {done:#?}");
        let totals = &done.report_field("output")["totals"];
        assert_eq!(totals["stored_bytes"], stored, "{vm}: {totals}");
        let own = if img == "db" {
            80_000
        } else if img == "api" {
            60_000
        } else {
            40_000
        };
        assert_eq!(totals["naive_bytes"], base_bytes + own, "{vm}");
        assert_eq!(totals["node_layer_bytes"], base_bytes + own - stored, "{vm}");
    }
    // Three shared partitions (one per image's first VM); api's and db's
    // first VMs hide web's own file under web's layer.
    let partitions = |data: &Path| std::fs::read_dir(data.join("partitions")).unwrap().count();
    assert_eq!(partitions(&node.data), 3 + 6);
    let metrics = c.get_text("/metrics").await.unwrap();
    assert!(metrics.contains("provd_layer_bytes{vms=\"2+\"}"), "{metrics}");

    // VMs go; then the stopped rest is repacked onto one partition.
    for vm in ["web-1", "api-1", "db-1"] {
        c.delete(&format!("/v1/vms/{vm}")).await.unwrap();
    }
    // provd cannot tell whether a VM runs: the caller names them or says
    // all are stopped.
    let e = c.post_json("/v1/repack", &json!({})).await.unwrap_err();
    assert!(e.to_string().contains("name the stopped VMs"), "{e}");
    let repacked = c.post_json("/v1/repack", &json!({"all": true})).await.unwrap();
    assert_eq!(repacked.status, 200, "{:#}", repacked.body);
    let r = &repacked.body["repack"];
    assert_eq!(r["moved"], json!(["api-2", "db-2", "web-2"]), "{r:#}");
    assert_eq!(r["skipped"], json!([]));
    assert_eq!(r["freed"].as_array().unwrap().len(), 3, "{r:#}");
    let new_partition = r["partition"]["id"].as_str().unwrap().to_string();
    assert_eq!(partitions(&node.data), 1 + 3);
    // The deleted VMs' folders went with them.
    for vm in ["web-1", "api-1", "db-1"] {
        assert!(!handed.join(vm).exists(), "{vm}'s folder stays");
    }
    for vm in ["web-2", "api-2", "db-2"] {
        let xml = node.data.join("vms").join(vm).join("domain.xml");
        let text = std::fs::read_to_string(&xml).unwrap();
        assert!(text.contains(&new_partition), "{vm} attaches the new partition");
        // Its folder links the new partition and its rewritten root, and
        // nothing it no longer uses.
        let mut linked: Vec<String> = std::fs::read_dir(handed.join(vm))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        linked.sort();
        assert_eq!(
            linked,
            [format!("{new_partition}.erofs"), "root.ext4".into(), "seed.iso".into()]
        );
        let check = std::process::Command::new("virt-xml-validate")
            .arg(&xml)
            .arg("domain")
            .output()
            .unwrap();
        assert!(check.status.success(), "{vm}: {}", String::from_utf8_lossy(&check.stderr));
    }
    let audit = c.get("/v1/audit?kind=operation&plugin=provd").await.unwrap().body;
    assert!(
        audit["audit"].as_array().unwrap().iter().any(|a| a["function"] == "repack"),
        "{audit}"
    );
    // A VM arriving after the repack stores nothing either.
    let request = json!({"plugin": "shared-partition", "vms": [spec("web-3", &image("web"))],
                         "params": {"min-layer-bytes": 0}});
    let done = finished(&c, &request).await;
    assert_eq!(done.report_field("output")["totals"]["stored_bytes"], 0, "{done:#?}");

    assert!(node.terminate().unwrap().success());
    let store = provd_store::Store::open(&node.data).unwrap();
    for vm in ["web-2", "api-2", "db-2", "web-3"] {
        let v = provd_partitions::verify_vm(&store, vm, &Default::default()).unwrap();
        assert!(v.mismatches.is_empty(), "{vm}: {:?}", v.mismatches);
        assert_eq!(v.shared, std::slice::from_ref(&new_partition), "{vm}");
    }
    assert_eq!(store.layer_usage().unwrap().unused_bytes, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_of_an_image_the_node_holds_reuses_its_plan_until_a_layer_could_change_it() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let base = [("usr/lib/libc.so.6", content(1, 300_000)), ("usr/bin/sh", content(2, 50_000))];
    for (name, path, seed, len) in
        [("x", "srv/app/app.bin", 3u8, 40_000usize), ("w", "srv/app/w.bin", 6, 30_000)]
    {
        for (p, data) in base.iter().chain([&(path, content(seed, len))]) {
            let file = images.join(name).join(p);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, data).unwrap();
        }
    }
    let extra =
        format!("[policy]\nimage-sources = [\"dir:{}/**\"]\n{DEFAULT_EXTRA}", images.display());
    let (mut node, c) = shared_partition_node(dir.path(), &extra).await;
    let image = |name: &str| format!("dir:{}", images.join(name).display());
    let x_bytes: u64 = 390_000;
    // One request of `vms`; its stored bytes and how its plan came to be,
    // from the audit trail.
    let provision = async |vms: &[(&str, &str)], unique: bool| -> (u64, String) {
        let specs: Vec<Value> = vms.iter().map(|(vm, img)| spec(vm, &image(img))).collect();
        let request = json!({"plugin": "shared-partition", "vms": specs,
                             "params": {"min-layer-bytes": 0, "layer-unique-files": unique}});
        let done = finished(&c, &request).await;
        assert_eq!(done.state.as_str(), "succeeded", "{vms:?}: {done:#?}");
        let stored = done.report_field("output")["totals"]["stored_bytes"].as_u64().unwrap();
        let audit =
            c.get(&format!("/v1/audit?operation={}&kind=host-call", done.id)).await.unwrap().body;
        let plan = audit["audit"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["function"] == "plan")
            .unwrap_or_else(|| panic!("no plan call audited: {audit}"));
        let how = plan["args"].as_str().unwrap().split(' ').next().unwrap().to_string();
        (stored, how)
    };

    // x-1 alone, its files kept private: a plan that builds no layer.
    assert_eq!(provision(&[("x-1", "x")], false).await, (x_bytes, "plan=made".into()));
    // Two VMs of x in one request: a layer of x's files, shared by both.
    assert_eq!(
        provision(&[("y-1", "x"), ("y-2", "x")], false).await,
        (x_bytes, "plan=made".into())
    );
    // x-1's plan would store x again, but the layer added since gives x
    // all its files: the plan is made again and stacks it.
    assert_eq!(provision(&[("x-2", "x")], false).await, (0, "plan=made".into()));
    // Nothing changed since: x-2's plan serves x-3.
    assert_eq!(provision(&[("x-3", "x")], false).await, (0, "plan=reused".into()));
    // w's own file goes to a new layer, which x cannot stack: x-4 still
    // reuses the plan.
    assert_eq!(provision(&[("w-1", "w")], true).await, (30_000, "plan=made".into()));
    assert_eq!(provision(&[("x-4", "x")], false).await, (0, "plan=reused".into()));
    // Another policy is another plan.
    assert_eq!(provision(&[("x-5", "x")], true).await, (0, "plan=made".into()));
    // w-1 gone, and its layer with it: a layer x does not stack.
    c.delete("/v1/vms/w-1").await.unwrap();
    assert_eq!(provision(&[("x-6", "x")], false).await, (0, "plan=reused".into()));
    // A layer a kept plan stacks going (a repack) is
    // `vms_ordered_one_at_a_time_share_the_node_and_a_repack_keeps_every_vm_exact`.

    assert!(node.terminate().unwrap().success());
    let store = provd_store::Store::open(&node.data).unwrap();
    for vm in ["x-1", "y-1", "y-2", "x-2", "x-3", "x-4", "x-5", "x-6"] {
        let v = provd_partitions::verify_vm(&store, vm, &Default::default()).unwrap();
        assert!(v.is_exact(), "{vm}: {:?}", v.mismatches);
    }
}
