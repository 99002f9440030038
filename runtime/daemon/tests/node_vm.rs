// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! provd where US 10,365,935 puts it: in a management VM on the node.
//! `scripts/node-vm.sh run` builds the VM's image (debootstrap, the cloud
//! kernel, provd's Debian package made from this build's binaries), boots
//! it under qemu, and as the manager on the host deploys the
//! shared-partition plugin and provisions two VMs over mutual TLS through
//! the one forwarded loopback port, then a third in the formats provd
//! builds with external tools (compressed EROFS, qcow2); provd inside, started by systemd from
//! the package's unit, writes their partitions on the host's storage
//! (virtio-fs) and defines them in the host's libvirtd through qemu's
//! forward to its unix socket. The host verifies every partition, and
//! after the VM's second boot starts one of them through provd and reads
//! its console. The test checks the package itself, what the unit
//! confines provd to inside the VM, and the owners and modes the host sees
//! on the files handed to libvirt-qemu.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use provd_tests::boot::repo;
use provd_tests::libvirt::{Libvirtd, virsh};

const PROVD: &str = env!("CARGO_BIN_EXE_provd");
/// The whole flow takes minutes under emulation (two boots of the
/// management VM, one guest boot); generous for a slow machine.
const FLOW_TIMEOUT: Duration = Duration::from_secs(40 * 60);
const VMS: [&str; 3] = ["web-1", "web-boot", "api-1"];

/// The bounding set provd.service leaves: CHOWN, DAC_OVERRIDE,
/// DAC_READ_SEARCH, FOWNER and FSETID (bits 0 to 4).
const CAP_BOUNDING: &str = "000000000000001f";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn forget_domains() {
    for vm in VMS {
        let _ = virsh(&["destroy", vm]);
        let _ = virsh(&["undefine", "--nvram", vm]);
    }
}

/// Leaves the host as it was however the test ends: the domains undefined,
/// the node's storage removed.
struct Leftovers<'a>(&'a Path);

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        forget_domains();
        let _ = Command::new("umount").arg(self.0).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(self.0);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn provd_in_the_management_vm_provisions_vms_the_host_boots() {
    let bin = Path::new(PROVD).parent().unwrap();
    assert!(
        bin.join("provctl").exists(),
        "{}: provctl is not built beside provd (cargo test --workspace builds both)",
        bin.display()
    );
    let _libvirtd = Libvirtd::ensure().unwrap();
    forget_domains();
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let image = tmp.join("node-vm/image");
    let kernel = tmp.join("boot/kernel");
    // The node's VM storage, at the same path on the host and in the VM:
    // not under /tmp or /var/tmp, which provd.service keeps private.
    let stores = Path::new("/var/lib/provd-tests");
    std::fs::create_dir_all(stores).unwrap();
    // What a failed run left.
    for e in std::fs::read_dir(stores).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with("node-vm-") {
            let _ = Command::new("umount").arg(e.path()).stderr(Stdio::null()).status();
            std::fs::remove_dir_all(e.path()).unwrap();
        }
    }
    let store = stores.join(format!("node-vm-{}", std::process::id()));
    let _leftovers = Leftovers(&store);
    let work = tempfile::tempdir().unwrap();

    let mut child = Command::new("bash")
        .arg(repo().join("scripts/node-vm.sh"))
        .arg("run")
        .arg(work.path())
        .env("BIN_DIR", bin)
        .env("IMAGE_DIR", &image)
        .env("KERNEL_DIR", &kernel)
        .env("STORE", &store)
        .env("PORT", free_port().to_string())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(work.path().join("flow.out")).unwrap())
        .stderr(std::fs::File::create(work.path().join("flow.err")).unwrap())
        // Its own process group: on a timeout the script, qemu, virtiofsd
        // and socat all get the signal, and the script's exit trap runs.
        .process_group(0)
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > FLOW_TIMEOUT {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
            std::thread::sleep(Duration::from_secs(10));
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let out = std::fs::read_to_string(work.path().join("flow.out")).unwrap();
    let err = std::fs::read_to_string(work.path().join("flow.err")).unwrap();
    let shown = format!("stdout:\n{out}\nstderr:\n{err}");
    assert!(status.is_some(), "the flow did not end in {FLOW_TIMEOUT:?}\n{shown}");
    assert!(status.unwrap().success(), "the flow failed\n{shown}");

    // The flow's own checks, as it reported them.
    for line in [
        "provd answers at https://127.0.0.1:",
        "2 VMs provisioned: ",
        // web-boot boots provd's initramfs: persistent memory; web-1
        // boots its own firmware: disks, unless its spec asks.
        "shared-attach: pmem=1 block=1",
        "verified web-1: ",
        "verified web-boot: ",
        // mkfs.erofs and qemu-img ran under the unit's confinement.
        "verified api-1: ",
        "every partition exact, every domain XML valid libvirt",
        "web-boot started: running",
        "provd-check: root overlay",
        "provd-check: attached 0 pmem0",
        "provd-check: end",
        "node-vm: done:",
    ] {
        assert!(out.contains(line), "no {line:?} in the flow's output\n{shown}");
    }
    assert_eq!(out.matches("from inside the management VM").count(), 2, "two boots\n{shown}");

    // Inside, systemd started provd from the package's unit, confined as
    // the unit says: its bounding set and no new privileges.
    let console = std::fs::read_to_string(work.path().join("node-vm-first.console")).unwrap();
    assert!(console.contains("provd-node: provd.service started"), "{console}");
    assert!(console.contains(&format!("provd-node: CapBnd:\t{CAP_BOUNDING}")), "{console}");
    assert!(console.contains("provd-node: NoNewPrivs:\t1"), "{console}");

    // The package: what it installs, the conffile, the unit.
    let deb = std::fs::read_dir(image.join("deb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap();
    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for field in ["Package: provd", "Depends: libc6", "libvirt0", "postinst"] {
        assert!(info.contains(field), "{field}: {info}");
    }
    let conffiles = run(Command::new("dpkg-deb").arg("--info").arg(&deb).arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/provd/provd.toml");
    let contents = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for entry in [
        "-rw------- root/root",
        "./etc/provd/provd.toml",
        "./lib/systemd/system/provd.service",
        "./usr/bin/provd",
        "./usr/bin/provctl",
    ] {
        assert!(contents.contains(entry), "{entry}: {contents}");
    }
    let toml_line = contents.lines().find(|l| l.ends_with("./etc/provd/provd.toml")).unwrap();
    assert!(toml_line.starts_with("-rw------- root/root"), "{toml_line}");

    // What the host sees: the data directory provd's alone, the VMs' files
    // handed to libvirt-qemu's group, read-only but for the private disk.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&store.join("data")), 0o700);
    let group = std::fs::metadata(store.join("vms/web-boot")).unwrap().gid();
    let qemu_gid = String::from_utf8(
        Command::new("getent").args(["group", "libvirt-qemu"]).output().unwrap().stdout,
    )
    .unwrap();
    assert_eq!(qemu_gid.split(':').nth(2).map(str::trim), Some(group.to_string().as_str()));
    assert_eq!(mode(&store.join("vms/web-boot")), 0o710);
    let mut shared = 0;
    for e in std::fs::read_dir(store.join("vms/web-boot")).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        assert_eq!((m.uid(), m.gid()), (0, group), "{}", e.path().display());
        let name = e.file_name().to_string_lossy().into_owned();
        let expected = if name == "root.ext4" { 0o660 } else { 0o440 };
        assert_eq!(m.mode() & 0o7777, expected, "{name}");
        // web's layer: one file on the host, linked from the data
        // directory and into the folders of web-1, web-boot and api-1,
        // which stacks it (hard links made over virtio-fs).
        if name.starts_with("p-") {
            shared += 1;
            assert_eq!(m.nlink(), 4, "{name}");
        }
    }
    assert_eq!(shared, 1, "the shared partition handed over to web-boot");
}
