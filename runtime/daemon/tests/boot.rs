// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Guests boot from what provd wrote. Two VMs of two Debian roots (this
//! machine's packages; debootstrap with cloud-init) are provisioned by the
//! real daemon with Debian's cloud kernel and provd's initramfs, their
//! seeds customised by the cloud-init plugin, then booted twice each under
//! qemu from their libvirt domain XML. Each guest's first process reports
//! on the console; the test compares that with the image: `/` is the
//! overlay, `/etc/os-release` and files from its shared layer and from its
//! own private files hash as in the image, a file written in the first
//! boot is there in the second, the shared partition is unchanged, and
//! cloud-init applied the hostname and SSH key of the seed. The shared
//! partition is persistent memory the guest mounts with DAX (it says so
//! from inside); each guest writes to that device at every boot, and the
//! host's file stays as built. A VM of another
//! tenant, whose image is web's plus a secret, is provisioned first: no
//! shared partition is mounted in either guest, and reading every one of
//! their disks raw finds none of its secret. The node hands its VMs' files
//! to Debian's libvirtd under its stock configuration, which runs QEMU as
//! `libvirt-qemu`: web-1 boots a third time, started through provd's API,
//! beside web-3, provisioned by a later operation on the first one's layers
//! and started by it; while both run, their QEMU processes map the same
//! host pages of the shared partition.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use provd_client::{Client, TlsFiles};
use provd_tests::boot::{
    Console, add_check, boot, cloud_root, demo_roots, file_digest, guest_kernel, install_boot_files,
};
use provd_tests::daemon::{DEFAULT_EXTRA, TestNode};
use provd_tests::libvirt::virsh;
use provd_tests::{CLOUD_INIT, SHARED_PARTITION};
use serde_json::{Value, json};
use sha2::Digest;

const PROVD: &str = env!("CARGO_BIN_EXE_provd");
/// Software emulation boots a Debian root in seconds; cloud-init's Python
/// takes longer. Generous, so that a slow CI machine does not fail a boot
/// that works.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJDiwd0q0EtpBdN27xv1S9+KrgNRz6jxD4skH2FHqmCr ops@example.com";

/// Regular files of a tree by path (relative, with a leading `/`): size,
/// mode, owner.
fn files(root: &Path) -> BTreeMap<String, (u64, u32, u32, u32)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let m = e.path().symlink_metadata().unwrap();
            if m.is_dir() {
                todo.push(e.path());
            } else if m.is_file() {
                let rel = e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(format!("/{rel}"), (m.len(), m.mode(), m.uid(), m.gid()));
            }
        }
    }
    out
}

fn sha256(path: &Path) -> String {
    let data = std::fs::read(path).unwrap();
    sha2::Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect()
}

/// The largest `n` of `paths` (by size) that are at least 4 KiB, readable
/// by anyone (the check runs as root, but keep to plain files), under
/// `/usr`.
fn largest(paths: Vec<(&String, u64)>, n: usize) -> Vec<String> {
    let mut v: Vec<_> =
        paths.into_iter().filter(|(p, s)| *s >= 4096 && p.starts_with("/usr/")).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v.into_iter().take(n).map(|(p, _)| p.clone()).collect()
}

fn spec(name: &str, root: &Path) -> Value {
    json!({"name": name, "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512,
           "image": format!("dir:{}", root.display()),
           "boot": {"kernel": "vmlinuz", "initrd": "provd-initrd.img",
                    "cmdline": "console=ttyS0 panic=-1 init=/usr/sbin/provd-check"},
           "cloud-init": {"hostname": format!("{name}.example")}})
}

/// Boots, and fails with the console when the check did not finish.
fn boot_checked(domain: &Path, what: &str) -> Console {
    let console = boot(domain, BOOT_TIMEOUT).unwrap();
    assert!(
        console.finished() && console.exited,
        "{what}: the guest's check did not finish in {:?} (exited: {}):\n{}",
        console.elapsed,
        console.exited,
        console.text()
    );
    console
}

#[tokio::test(flavor = "multi_thread")]
async fn two_debian_guests_boot_from_their_partitions_and_see_exactly_their_images() {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("boot");
    std::fs::create_dir_all(&cache).unwrap();
    let kernel = guest_kernel(&cache.join("kernel")).unwrap();
    let cloud_cached = cloud_root(&cache.join("cloud-root")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    demo_roots(&dir.path().join("demo")).unwrap();
    let web = dir.path().join("demo/web");
    // The check makes device nodes with mknod(1), which links libraries a
    // demo root does not carry: this machine's, where the root lacks them.
    let ldd = std::process::Command::new("ldd").arg("/usr/bin/mknod").output().unwrap();
    for lib in
        String::from_utf8_lossy(&ldd.stdout).split_whitespace().filter(|w| w.starts_with('/'))
    {
        let name = Path::new(lib).file_name().unwrap();
        let there = web.join("usr/lib/x86_64-linux-gnu").join(name);
        if !there.exists() && !web.join(&lib[1..]).exists() {
            std::fs::copy(lib, &there).unwrap();
        }
    }
    let cloud = dir.path().join("cloud");
    let copied =
        std::process::Command::new("cp").arg("-a").arg(&cloud_cached).arg(&cloud).status().unwrap();
    assert!(copied.success());

    // Files of each kind: in both roots exactly alike (the plan puts them
    // on the shared partition), and each root's own (its private
    // partition, with layer-unique-files off).
    let (web_files, cloud_files) = (files(&web), files(&cloud));
    let same: Vec<(&String, u64)> = web_files
        .iter()
        .filter(|(p, meta)| {
            cloud_files.get(*p) == Some(meta)
                && sha256(&web.join(&p[1..])) == sha256(&cloud.join(&p[1..]))
        })
        .map(|(p, m)| (p, m.0))
        .collect();
    let shared = largest(same, 4);
    assert!(!shared.is_empty(), "the two roots have no file alike under /usr");
    let own = |mine: &BTreeMap<String, (u64, u32, u32, u32)>,
               other: &BTreeMap<String, (u64, u32, u32, u32)>| {
        largest(
            mine.iter().filter(|(p, _)| !other.contains_key(*p)).map(|(p, m)| (p, m.0)).collect(),
            4,
        )
    };
    let lists = [
        ("web-1", web.clone(), [shared.clone(), own(&web_files, &cloud_files)].concat()),
        ("cloud-1", cloud.clone(), [shared.clone(), own(&cloud_files, &web_files)].concat()),
    ];
    for (_, root, list) in &lists {
        add_check(root, list).unwrap();
    }
    // Another tenant's image: web's root and that tenant's secret. Its VM
    // comes first; neither guest booted below may reach a byte of it,
    // though its layer holds every file of web's image.
    let secret = format!("provd-tenant-secret-{}", blake3::hash(b"other").to_hex());
    let rot13: String = secret
        .chars()
        .map(|c| match c {
            'a'..='z' => (((c as u8 - b'a') + 13) % 26 + b'a') as char,
            _ => c,
        })
        .collect();
    for (_, root, _) in &lists {
        std::fs::write(root.join("etc/provd-check.absent"), format!("{rot13}\n")).unwrap();
    }
    let other = dir.path().join("other");
    let copied = std::process::Command::new("cp").arg("-a").arg(&web).arg(&other).status().unwrap();
    assert!(copied.success());
    std::fs::remove_file(other.join("etc/provd-check.absent")).unwrap();
    std::fs::write(other.join("etc/credentials"), format!("{secret}\n")).unwrap();

    // libvirt's QEMU runs as libvirt-qemu, which reaches the VMs' files
    // only through the folder they are handed over in. The test's own
    // folder is opened to traversal for it; the data directory in it stays
    // the node's alone.
    let libvirtd = provd_tests::libvirt::Libvirtd::ensure().unwrap();
    // What an earlier run that failed midway may have left running.
    for name in ["web-1", "cloud-1", "other-1", "web-3"] {
        let _ = virsh(&["destroy", name]);
        let _ = virsh(&["undefine", name]);
    }
    let handed = dir.path().join("handed");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let hypervisor = format!(
        "[hypervisor]\ndomain-type = \"{}\"\nuser = \"libvirt-qemu\"\ngroup = \"libvirt-qemu\"\n\
         vm-dir = \"{}\"\nlibvirt-uri = \"qemu:///system\"\n",
        match provd_vm::qemu::Accel::detect() {
            provd_vm::qemu::Accel::Kvm => "kvm",
            provd_vm::qemu::Accel::Tcg => "qemu",
        },
        handed.display()
    );
    let extra = format!(
        "[policy]\nimage-sources = [\"dir:{}\", \"dir:{}\", \"dir:{}\"]\n{hypervisor}{DEFAULT_EXTRA}",
        web.display(),
        cloud.display(),
        other.display()
    );
    let node = TestNode::start(Path::new(PROVD), &dir.path().join("node"), &extra).unwrap();
    install_boot_files(&kernel, &node.data).unwrap();
    let (ca, cert, key) = node.tls();
    let c = Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) }).unwrap();
    for fixture in [SHARED_PARTITION, CLOUD_INIT] {
        let manifest = std::fs::read_to_string(fixture.dir().join("plugin.toml")).unwrap();
        assert_eq!(c.deploy(node.bundle(&manifest, &fixture.wasm())).await.unwrap().status, 201);
    }
    let mut other_vm = spec("other-1", &other);
    other_vm["tenant"] = json!("other");
    let request = json!({"plugin": "shared-partition", "vms": [other_vm],
                         "params": {"min-layer-bytes": 0, "shared-format": "erofs"}});
    let started = c.provision(&request).await.unwrap();
    let id = started.body["operation"]["id"].as_str().unwrap().to_string();
    let done = c.wait(&id, |_| {}).await.unwrap();
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");

    let vms: Vec<Value> = lists.iter().map(|(n, r, _)| spec(n, r)).collect();
    let request = json!({"plugin": "shared-partition", "vms": vms,
                         "params": {"min-layer-bytes": 0, "layer-unique-files": false,
                                    "shared-format": "erofs", "private-format": "ext4"}});
    let started = c.provision(&request).await.unwrap();
    let id = started.body["operation"]["id"].as_str().unwrap().to_string();
    let done = c.wait(&id, |_| {}).await.unwrap();
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
    for vm in done.report_field("output")["vms"].as_array().unwrap() {
        assert!(vm["new_shared_bytes"].as_u64().unwrap() > 0, "{vm:#}");
        assert!(vm["private_bytes"].as_u64().unwrap() > 0, "{vm:#}");
    }
    // cloud-1's seed rewritten by the cloud-init plugin: another hostname
    // and a user with a key, which the guest's cloud-init must apply.
    let mut custom = spec("cloud-1", &cloud);
    custom["cloud-init"] = json!({"hostname": "www.example.net",
                                  "users": [{"name": "ops", "ssh-authorized-keys": [KEY]}]});
    let customised = c.provision(&json!({"plugin": "cloud-init", "vms": [custom]})).await.unwrap();
    let cid = customised.body["operation"]["id"].as_str().unwrap().to_string();
    let done = c.wait(&cid, |_| {}).await.unwrap();
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");

    for (name, root, list) in &lists {
        let domain = node.data.join("vms").join(name).join("domain.xml");
        let parsed =
            provd_vm::qemu::parse_domain(&std::fs::read_to_string(&domain).unwrap()).unwrap();
        let disk = |serial: &str| -> PathBuf {
            parsed.disks.iter().find(|d| d.serial == serial).unwrap().file.clone()
        };
        // The shared partition is persistent memory, mapped with DAX.
        assert_eq!(parsed.pmem.len(), 1, "{name}: {parsed:?}");
        assert!(parsed.disks.iter().all(|d| !d.serial.starts_with("shared-")), "{parsed:?}");
        let shared_disk = parsed.pmem[0].file.clone();
        let private_disk = disk("root");
        let shared_before = file_digest(&shared_disk).unwrap();
        let private_before = file_digest(&private_disk).unwrap();
        // The guest counts its boots in /var/lib/provd-check, a folder its
        // layers give: its private partition holds no copy of it (nor of
        // /var/lib, unless the VM has files of its own there) until the
        // guest writes there, and the count must survive the reboot.
        let upper = |path: &str| {
            let out = std::process::Command::new("debugfs")
                .args(["-R", &format!("stat upper/{path}")])
                .arg(&private_disk)
                .output()
                .unwrap();
            out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("not found")
        };
        assert!(!upper("var/lib/provd-check"), "{name}: in upper/ before the first boot");

        let first = boot_checked(&domain, &format!("{name}, first boot"));
        let context = first.text();
        assert_eq!(first.facts("root"), ["overlay"], "{name}:\n{context}");
        // No shared partition stays mounted beside the overlay: the guest
        // reaches its layers only through its own image's view.
        let mounts = first.facts("mount");
        assert!(mounts.iter().any(|m| m.starts_with("/ overlay ")), "{name}:\n{context}");
        assert!(
            !mounts.iter().any(|m| m.starts_with("/run/provd/s") || m.contains("erofs")),
            "{name}: a shared partition is mounted in the guest:\n{context}"
        );
        let os_release: Vec<String> = std::fs::read_to_string(root.join("etc/os-release"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(first.facts("os-release"), os_release, "{name}:\n{context}");
        let expected: Vec<String> =
            list.iter().map(|p| format!("{} {p}", sha256(&root.join(&p[1..])))).collect();
        assert_eq!(first.facts("sha256"), expected, "{name}:\n{context}");
        assert_eq!(first.facts("boot"), ["1"], "{name}:\n{context}");
        // The shared partitions' device nodes are gone; its own root's stays.
        let disks = first.facts("disk");
        assert!(disks.iter().any(|d| d.contains(" root node=yes")), "{name}: {disks:?}\n{context}");
        assert!(
            disks.iter().filter(|d| d.contains(" pmem ")).all(|d| d.ends_with("node=no"))
                && disks.iter().any(|d| d.contains(" pmem ")),
            "{name}: {disks:?}"
        );
        assert_eq!(first.facts("attached"), ["0 pmem0 dax=on"], "{name}:\n{context}");
        assert!(
            context.contains("provd-overlay-root: shared partition 0 on pmem0: dax on"),
            "{name}: the console does not say DAX is on:\n{context}"
        );
        // The guest wrote to its persistent memory; the host's file is
        // checked unchanged below, and the next boot finds no trace of it.
        assert_eq!(first.facts("pmem-before"), ["pmem0 clean"], "{name}:\n{context}");
        assert_eq!(first.facts("pmem-write").len(), 1, "{name}:\n{context}");
        // Every disk read raw: the other tenant's secret is on none.
        let absent = first.facts("absent");
        assert!(absent.len() >= 2, "{name}: disks scanned: {absent:?}\n{context}");
        assert!(
            absent.iter().all(|a| a.ends_with(" 0")),
            "{name} reads the other tenant's secret: {absent:?}"
        );
        assert!(
            first.facts("cannot").is_empty() && first.facts("cloud-init").is_empty(),
            "{context}"
        );

        assert!(upper("var/lib/provd-check/boots"), "{name}: the boot count is not in upper/");
        let second = boot_checked(&domain, &format!("{name}, second boot"));
        assert_eq!(
            second.facts("boot"),
            ["2"],
            "{name}: the first boot's write is gone:\n{}",
            second.text()
        );
        assert_eq!(second.facts("sha256"), expected, "{name}:\n{}", second.text());
        assert_eq!(second.facts("pmem-before"), ["pmem0 clean"], "{name}:\n{}", second.text());
        // Writes land in the private partition; the shared one is as built.
        assert_eq!(file_digest(&shared_disk).unwrap(), shared_before, "{name}");
        assert_ne!(file_digest(&private_disk).unwrap(), private_before, "{name}");

        if *name == "cloud-1" {
            // cloud-init gives the kernel the first label of the seed's
            // hostname (`prefer_fqdn_over_hostname` is off by default).
            assert_eq!(first.facts("hostname"), ["www"], "{context}");
            assert_eq!(first.facts("key"), [format!("ops {KEY}")], "{context}");
        } else {
            assert!(first.facts("hostname").is_empty(), "{context}");
        }
        eprintln!(
            "{name}: first check line after {:?}, boot {:?} / {:?}",
            first.first_check_line.unwrap_or_default(),
            first.elapsed,
            second.elapsed
        );
    }

    // Handed over: every file web-1 uses is a link in its own folder,
    // root:libvirt-qemu, writable only where the VM writes; the folders
    // only traversable; the data directory closed.
    let gid = std::fs::metadata(&handed).unwrap().gid();
    assert_eq!(std::fs::metadata(&handed).unwrap().mode() & 0o777, 0o710);
    assert_eq!(std::fs::metadata(&node.data).unwrap().mode() & 0o777, 0o700);
    let folder = handed.join("web-1");
    let mut linked: Vec<(String, u32)> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            assert_eq!((m.uid(), m.gid()), (0, gid), "{}", e.path().display());
            let name = e.file_name().to_string_lossy().into_owned();
            // A shared partition's link is named by the partition.
            let name = if name.starts_with("p-") && name.ends_with(".erofs") {
                "<shared>.erofs".to_string()
            } else {
                name
            };
            (name, m.mode() & 0o777)
        })
        .collect();
    linked.sort();
    assert_eq!(
        linked,
        [
            ("<shared>.erofs".to_string(), 0o440),
            ("initrd".to_string(), 0o440),
            ("kernel".to_string(), 0o440),
            ("root.ext4".to_string(), 0o660),
            ("seed.iso".to_string(), 0o440),
        ],
        "{}",
        folder.display()
    );
    let domain = node.data.join("vms/web-1/domain.xml");
    let xml = std::fs::read_to_string(&domain).unwrap();
    assert!(xml.contains("relabel=\"no\""), "{xml}");
    assert!(!xml.contains(&node.data.join("partitions").display().to_string()), "{xml}");
    // Through provd and libvirtd, as a provider runs them, two guests at
    // once: web-1 a third time, started through the API, and web-3, a VM
    // of the web image provisioned by an operation of its own and started
    // by it, whose root stacks the layers the first operation built.
    let log = |vm: &str| node.data.join("vms").join(vm).join("serial.log");
    let _ = std::fs::remove_file(log("web-1"));
    // While both run, their QEMU processes map the shared partition's
    // file: the pages both guests read are the same host pages.
    let web1_domain = std::fs::read_to_string(node.data.join("vms/web-1/domain.xml")).unwrap();
    let shared_file = provd_vm::qemu::parse_domain(&web1_domain).unwrap().pmem[0].file.clone();
    let shared_ino = std::fs::metadata(&shared_file).unwrap().ino();
    let shared_digest = file_digest(&shared_file).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            provd_tests::libvirt::sample_shared_mappings(&["web-1", "web-3"], shared_ino, &stop)
        })
    };
    let started = std::time::Instant::now();
    let answer = c.post_json("/v1/vms/web-1/start", &json!({})).await.unwrap().body;
    assert_eq!(answer["state"], "running", "{answer:#}");
    let request = json!({"plugin": "shared-partition", "vms": [spec("web-3", &web)], "start": true,
                         "params": {"min-layer-bytes": 0, "layer-unique-files": false,
                                    "shared-format": "erofs", "private-format": "ext4"}});
    let id =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    let done = c.wait(&id, |_| {}).await.unwrap();
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
    let report = &done.report_field("output")["vms"][0];
    assert_eq!(
        report["new_shared_bytes"], 0,
        "web-3 stacks the first operation's layers: {report:#}"
    );
    let web1 = provd_tests::libvirt::console(&log("web-1"), started, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("web-1 through libvirtd: {e}"));
    let web3 = provd_tests::libvirt::console(&log("web-3"), started, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("web-3 through libvirtd: {e}"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mapped = sampler.join().unwrap();
    eprintln!(
        "shared partition mapped by the two QEMUs at once (name, Rss KiB, Pss KiB): {mapped:?}"
    );
    assert_eq!(mapped.len(), 2, "web-1 and web-3 never mapped the shared partition at once");
    for (vm, rss, pss) in &mapped {
        assert!(*rss > 0 && pss < rss, "{vm}: no page of the partition shared: {mapped:?}");
    }
    for vm in ["web-1", "web-3"] {
        let stopped = c.post_json(&format!("/v1/vms/{vm}/stop"), &json!({"force": true})).await;
        assert_eq!(stopped.unwrap().body["state"], "shut off", "{vm}");
    }
    // Both guests wrote to the start of their persistent memory while the
    // other read its files: the partition is as built.
    assert_eq!(file_digest(&shared_file).unwrap(), shared_digest);
    for (vm, console) in [("web-1", &web1), ("web-3", &web3)] {
        assert_eq!(console.facts("pmem-write").len(), 1, "{vm}:\n{}", console.text());
        assert_eq!(console.facts("attached"), ["0 pmem0 dax=on"], "{vm}:\n{}", console.text());
    }
    let (_, web_root, web_list) = &lists[0];
    let expected: Vec<String> =
        web_list.iter().map(|p| format!("{} {p}", sha256(&web_root.join(&p[1..])))).collect();
    for (vm, console, boots) in [("web-1", &web1, "3"), ("web-3", &web3, "1")] {
        let context = console.text();
        assert_eq!(console.facts("root"), ["overlay"], "{vm} through libvirt:\n{context}");
        assert_eq!(console.facts("boot"), [boots], "{vm}: the earlier boots' writes:\n{context}");
        assert_eq!(console.facts("sha256"), expected, "{vm} through libvirt:\n{context}");
        eprintln!("{vm} through libvirtd: check ended after {:?}", console.elapsed);
    }
    // Deleted, the VMs leave nothing in libvirt.
    for vm in ["web-1", "web-3", "cloud-1", "other-1"] {
        c.delete(&format!("/v1/vms/{vm}")).await.unwrap();
        assert!(!libvirtd.defined(vm), "{vm} is still defined");
    }
}
