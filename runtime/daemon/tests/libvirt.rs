// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! provd hands its VMs to the node's libvirtd (Debian's, stock
//! configuration), through libvirt's API: an operation defines them, a VM
//! reports its domain's state, starts and stops through the API, a repack
//! refuses a running one, a domain
//! libvirt refuses fails the operation and rolls it back without touching
//! a domain that is not provd's, and deleting a running VM stops and
//! undefines it. An operation interrupted by a crash takes its domain with
//! it at the next start, which waits for libvirt to answer.

use std::path::Path;

use provd_client::{Client, TlsFiles};
use provd_tests::daemon::{DEFAULT_EXTRA, TestNode};
use provd_tests::libvirt::{Libvirtd, virsh};
use provd_tests::oci::content;
use provd_tests::{IMAGER, SHARED_PARTITION};
use serde_json::{Value, json};

mod common;

use common::finished;

const PROVD: &str = env!("CARGO_BIN_EXE_provd");

/// A VM whose BIOS finds nothing to boot and waits: it runs until stopped.
fn spec(name: &str, image: &str) -> Value {
    json!({"name": name, "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 128, "image": image,
           "boot": {"firmware": "bios"}})
}

/// Runs the operation `request` asks for to its end.
fn domstate(name: &str) -> Option<String> {
    virsh(&["domstate", name]).ok().map(|s| s.trim().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn operations_hand_vms_to_libvirt_and_take_back_only_their_own() {
    let _libvirtd = Libvirtd::ensure().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // libvirt-qemu reaches the VMs' files through the handed-over folder;
    // the test's folder is opened to traversal for it.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let image = dir.path().join("images/web");
    for (path, data) in
        [("usr/lib/libc.so.6", content(1, 200_000)), ("etc/hostname", b"w\n".into())]
    {
        let file = image.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, data).unwrap();
    }
    // A domain of a name provd is asked for, but not provd's: another UUID.
    let clash = dir.path().join("clash.xml");
    std::fs::write(
        &clash,
        "<domain type=\"qemu\"><name>clash-1</name>\
         <uuid>00000000-0000-4000-8000-000000000001</uuid><memory unit=\"MiB\">64</memory>\
         <os><type arch=\"x86_64\" machine=\"q35\">hvm</type></os></domain>",
    )
    .unwrap();
    // What an earlier run that failed midway may have left.
    for name in ["web-1", "web-2", "clash-1"] {
        let _ = virsh(&["destroy", name]);
        let _ = virsh(&["undefine", name]);
    }
    virsh(&["define", &clash.display().to_string()]).unwrap();

    let extra = format!(
        "[policy]\nimage-sources = [\"dir:{}/**\"]\n[hypervisor]\nlibvirt-uri = \"qemu:///system\"\n\
         domain-type = \"qemu\"\nuser = \"libvirt-qemu\"\ngroup = \"libvirt-qemu\"\n\
         vm-dir = \"{}\"\n{DEFAULT_EXTRA}",
        dir.path().join("images").display(),
        dir.path().join("handed").display()
    );
    let node = TestNode::start(Path::new(PROVD), &dir.path().join("node"), &extra).unwrap();
    let (ca, cert, key) = node.tls();
    let c = Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) }).unwrap();
    let manifest = std::fs::read_to_string(SHARED_PARTITION.dir().join("plugin.toml")).unwrap();
    c.deploy(node.bundle(&manifest, &SHARED_PARTITION.wasm())).await.unwrap();
    let web = format!("dir:{}", image.display());
    let provision = |vm: &str| {
        json!({"plugin": "shared-partition", "vms": [spec(vm, &web)],
               "params": {"min-layer-bytes": 0}})
    };

    // Provisioned: defined in libvirt, stopped, and so reported.
    let done = finished(&c, &provision("web-1")).await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
    assert_eq!(domstate("web-1").as_deref(), Some("shut off"));
    let vm = c.get("/v1/vms/web-1").await.unwrap().body;
    assert_eq!(vm["vm"]["state"], "shut off", "{vm:#}");

    // Started through the API (an operator's right), it runs and is
    // reported so; starting it again changes nothing.
    let started = c.post_json("/v1/vms/web-1/start", &json!({})).await.unwrap().body;
    assert_eq!(
        (started["state"].as_str(), started["changed"].as_bool()),
        (Some("running"), Some(true)),
        "{started:#}"
    );
    assert_eq!(domstate("web-1").as_deref(), Some("running"));
    let again = c.post_json("/v1/vms/web-1/start", &json!({})).await.unwrap().body;
    assert_eq!(again["changed"], false, "{again:#}");
    let missing = c.post_json("/v1/vms/nope-1/start", &json!({})).await.unwrap_err();
    assert_eq!(missing.code(), Some("not-found"), "{missing}");
    let bad = c.post_json("/v1/vms/web-1/stop", &json!({"timeout-seconds": 0})).await.unwrap_err();
    assert_eq!(bad.code(), Some("invalid-request"), "{bad}");

    // Asked to shut down, a guest that does not answer ACPI (the BIOS
    // waiting for a disk) runs on: the stop says so, and runs no longer.
    let asked =
        c.post_json("/v1/vms/web-1/stop", &json!({"timeout-seconds": 2})).await.unwrap_err();
    assert_eq!(asked.code(), Some("vm-running"), "{asked}");
    assert!(asked.to_string().contains("within 2 s"), "{asked}");
    assert_eq!(domstate("web-1").as_deref(), Some("running"));
    let stopped = c.post_json("/v1/vms/web-1/stop", &json!({"force": true})).await.unwrap().body;
    assert_eq!(
        (stopped["state"].as_str(), stopped["changed"].as_bool()),
        (Some("shut off"), Some(true)),
        "{stopped:#}"
    );
    assert_eq!(domstate("web-1").as_deref(), Some("shut off"));
    let audit = c.get("/v1/audit?plugin=provd").await.unwrap().body;
    let functions: Vec<&str> =
        audit["audit"].as_array().unwrap().iter().filter_map(|r| r["function"].as_str()).collect();
    assert!(functions.contains(&"start-vm") && functions.contains(&"stop-vm"), "{audit:#}");

    // Running, it is reported so, and a repack will not move it.
    virsh(&["start", "web-1"]).unwrap();
    let vms = c.get("/v1/vms").await.unwrap().body;
    assert_eq!(vms["vms"][0]["state"], "running", "{vms:#}");
    let refused = c.post_json("/v1/repack", &json!({"vms": ["web-1"]})).await.unwrap_err();
    assert_eq!(refused.to_string().split_whitespace().next(), Some("409"), "{refused}");
    let ops = c.get("/v1/operations").await.unwrap().body;
    let repack = ops["operations"].as_array().unwrap().iter().find(|o| o["plugin"] == "provd");
    let error = &repack.unwrap_or_else(|| panic!("no repack operation: {ops:#}"))["error"];
    assert_eq!(error["code"], "vm-running", "{ops:#}");
    // (The stop refused above failed with that code too: the message is
    // the repack's.)
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("web-1") && message.contains("a repack moves only"), "{ops:#}");
    assert_eq!(domstate("web-1").as_deref(), Some("running"));

    // A domain libvirt refuses (the name is another domain's) fails the
    // operation, which leaves nothing, and the other domain stays.
    let done = finished(&c, &provision("clash-1")).await;
    assert_eq!(done.state.as_str(), "failed", "{done:#?}");
    let message = format!("{done:?}");
    assert!(message.contains("clash-1") && message.contains("libvirt"), "{message}");
    let gone = c.get("/v1/vms/clash-1").await.unwrap_err();
    assert_eq!(gone.code(), Some("not-found"), "{gone}");
    assert!(!node.data.join("vms/clash-1").exists());
    assert!(!dir.path().join("handed/clash-1").exists());
    let uuid = virsh(&["domuuid", "clash-1"]).unwrap();
    assert_eq!(uuid.trim(), "00000000-0000-4000-8000-000000000001");
    // Nor does a start or a stop through provd touch a domain not provd's.
    // (clash-1 is no VM of the node: the answer is that.)
    let other = c.post_json("/v1/vms/clash-1/start", &json!({})).await.unwrap_err();
    assert_eq!(other.code(), Some("not-found"), "{other}");
    assert_eq!(domstate("clash-1").as_deref(), Some("shut off"));

    // A request may ask for its VMs to be started at once.
    let mut started = provision("web-2");
    started["start"] = json!(true);
    let done = finished(&c, &started).await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
    assert_eq!(domstate("web-2").as_deref(), Some("running"));

    // A VM whose domain someone undefined behind provd's back is not
    // started from nothing: the answer names the missing domain.
    virsh(&["destroy", "web-1"]).unwrap();
    virsh(&["undefine", "web-1"]).unwrap();
    let gone = c.post_json("/v1/vms/web-1/start", &json!({})).await.unwrap_err();
    assert_eq!(gone.code(), Some("vm-not-defined"), "{gone}");
    assert!(gone.to_string().contains("no domain of that name"), "{gone}");
    assert_eq!(domstate("web-1"), None);

    // Deleting a VM stops and undefines its domain (web-2 runs).
    for vm in ["web-1", "web-2"] {
        c.delete(&format!("/v1/vms/{vm}")).await.unwrap();
        assert_eq!(domstate(vm), None, "{vm} is still defined");
    }
    assert!(!dir.path().join("handed/web-1").exists());
    virsh(&["undefine", "clash-1"]).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_operations_domain_goes_with_it_at_restart_and_only_with_libvirt_reachable()
{
    let _libvirtd = Libvirtd::ensure().unwrap();
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let _ = virsh(&["destroy", "crash-1"]);
    let _ = virsh(&["undefine", "crash-1"]);
    let handed = dir.path().join("handed");
    let extra = format!(
        "[hypervisor]\nlibvirt-uri = \"qemu:///system\"\ndomain-type = \"qemu\"\n\
         user = \"libvirt-qemu\"\ngroup = \"libvirt-qemu\"\nvm-dir = \"{}\"\n",
        handed.display()
    );
    let mut node = common::node(dir.path(), &extra);
    let c = common::client(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&common::imager("1.0.0", &images), &IMAGER.wasm())).await.unwrap();
    let request = json!({"plugin": "imager", "vms": [common::spec("crash-1", &images.join("web"))],
                         "params": common::partitions_params(true)});
    let id =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    common::wait_until(&c, &id, |op| op.phase.as_deref() == Some("waiting")).await;

    // Killed just after its domain was defined: the operation had not
    // ended, so the domain is as much its work as the disks.
    node.kill();
    let xml = node.data.join("vms/crash-1/domain.xml");
    virsh(&["define", &xml.display().to_string()]).unwrap();
    let uuid = virsh(&["domuuid", "crash-1"]).unwrap();
    assert_eq!(uuid.trim(), provd_vm::domain_uuid("crash-1"));

    // With libvirt out of reach, provd does not start: rolling back the
    // disks would leave the domain behind, naming files that are gone.
    let config = std::fs::read_to_string(&node.config).unwrap();
    let unreachable = config.replace(
        "libvirt-uri = \"qemu:///system\"",
        "libvirt-uri = \"qemu+unix:///system?socket=/nonexistent/libvirt-sock\"",
    );
    assert_ne!(unreachable, config);
    std::fs::write(&node.config, unreachable).unwrap();
    let e = node.restart().unwrap_err().to_string();
    assert!(e.contains("[hypervisor] libvirt-uri") && e.contains("start libvirtd first"), "{e}");
    assert_eq!(domstate("crash-1").as_deref(), Some("shut off"));
    assert!(node.data.join("vms/crash-1").exists() && handed.join("crash-1").exists());

    // Reachable again: the operation is rolled back, its domain with it.
    std::fs::write(&node.config, config).unwrap();
    node.restart().unwrap();
    let c = common::client(&node);
    let op = c.operation(&id, None).await.unwrap();
    assert_eq!(op.error_code().unwrap_or_default(), "interrupted", "{op:?}");
    assert_eq!(domstate("crash-1"), None, "the interrupted operation's domain is still defined");
    assert!(!node.data.join("vms/crash-1").exists() && !handed.join("crash-1").exists());
}
