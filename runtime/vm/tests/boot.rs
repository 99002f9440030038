// Tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The node-side initramfs: modules in dependency order, built-in ones
//! skipped, the archive read back member by member.

use std::io::Read;
use std::path::Path;

use provd_vm::boot::{BootError, build_initramfs, module_order};

const DEP: &str = "\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/nvdimm/libnvdimm.ko:
kernel/drivers/nvdimm/nd_virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/nvdimm/virtio_pmem.ko: kernel/drivers/nvdimm/nd_virtio.ko kernel/drivers/nvdimm/libnvdimm.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/nvdimm/nd_btt.ko: kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/nvdimm/nd_pmem.ko: kernel/drivers/nvdimm/nd_btt.ko kernel/drivers/nvdimm/libnvdimm.ko
kernel/lib/libcrc32c.ko:
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/fs/overlayfs/overlay.ko:
kernel/fs/fuse/fuse.ko:
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko
kernel/drivers/cdrom/cdrom.ko:
kernel/fs/isofs/isofs.ko: kernel/drivers/cdrom/cdrom.ko
kernel/drivers/net/net_failover.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";
const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\n";

fn fake_kernel(dir: &Path) {
    fake_kernel_with(dir, DEP);
}

fn fake_kernel_with(dir: &Path, dep: &str) {
    std::fs::write(dir.join("modules.dep"), dep).unwrap();
    std::fs::write(dir.join("modules.builtin"), BUILTIN).unwrap();
    for line in dep.lines() {
        let path = line.split(':').next().unwrap();
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, format!("module {path}")).unwrap();
    }
}

/// (path, mode, rdev major, rdev minor, data) of each member of a gzip
/// `newc` cpio archive, read as the kernel reads it.
fn read_back(archive: &Path) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(archive).unwrap())
        .read_to_end(&mut bytes)
        .unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    let field = |b: &[u8], i: usize| {
        u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
    };
    loop {
        let h = &bytes[at..at + 110];
        assert_eq!(&h[..6], b"070701");
        let (mode, size, rmaj, rmin, name_len) =
            (field(h, 1), field(h, 6) as usize, field(h, 9), field(h, 10), field(h, 11) as usize);
        let name =
            std::str::from_utf8(&bytes[at + 110..at + 110 + name_len - 1]).unwrap().to_string();
        at = (at + 110 + name_len).next_multiple_of(4);
        let data = bytes[at..at + size].to_vec();
        at = (at + size).next_multiple_of(4);
        if name == "TRAILER!!!" {
            assert_eq!(at, bytes.len());
            return out;
        }
        out.push((name, mode, rmaj, rmin, data));
    }
}

#[test]
fn modules_come_after_what_they_need_and_built_in_ones_are_skipped() {
    let dir = Path::new("/lib/modules/fake");
    let order =
        module_order(DEP, BUILTIN, &["virtio_pci", "virtio_blk", "ext4", "erofs", "virtiofs"], dir)
            .unwrap();
    let names: Vec<&str> =
        order.iter().map(|p| p.rsplit('/').next().unwrap().trim_end_matches(".ko")).collect();
    assert_eq!(
        names,
        [
            "virtio_ring",
            "virtio_pci_modern_dev",
            "virtio",
            "virtio_pci",
            "virtio_blk",
            "libcrc32c",
            "erofs",
            "fuse",
            "virtiofs"
        ]
    );
    let e = module_order(DEP, BUILTIN, &["nbd"], dir).unwrap_err();
    assert!(matches!(e, BootError::MissingModule { ref module, .. } if module == "nbd"), "{e}");
    let xz = "kernel/fs/overlayfs/overlay.ko.xz:\n";
    let e = module_order(xz, "", &["overlay"], dir).unwrap_err();
    assert!(e.to_string().contains("compressed"), "{e}");
}

#[test]
fn the_initramfs_holds_init_busybox_the_boot_script_and_the_modules_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let kernel = tmp.path().join("6.1.0-test");
    std::fs::create_dir_all(&kernel).unwrap();
    fake_kernel(&kernel);
    let busybox = tmp.path().join("busybox");
    std::fs::write(&busybox, b"\x7fELF busybox").unwrap();
    let out = tmp.path().join("initrd.img");
    let built = build_initramfs(&kernel, &busybox, "#!/bin/sh\n# overlay\n", &out).unwrap();
    assert_eq!(built.modules.first().map(String::as_str), Some("virtio_ring.ko"));
    assert_eq!(built.bytes, std::fs::metadata(&out).unwrap().len());
    assert!(!out.with_extension("new").exists());

    let members = read_back(&out);
    let get = |p: &str| members.iter().find(|m| m.0 == p).unwrap_or_else(|| panic!("no {p}"));
    assert_eq!(get("init").1, 0o100755);
    assert_eq!(get("init").4, provd_vm::boot::INIT_SCRIPT.as_bytes());
    assert_eq!(get("provd-overlay-root").4, b"#!/bin/sh\n# overlay\n");
    assert_eq!(get("bin/busybox").4, b"\x7fELF busybox");
    assert_eq!(
        (get("dev/console").1, get("dev/console").2, get("dev/console").3),
        (0o020600, 5, 1)
    );
    assert_eq!(get("dev").1, 0o040755);
    let order = String::from_utf8(get("modules.order").4.clone()).unwrap();
    assert_eq!(order.lines().collect::<Vec<_>>(), built.modules);
    for m in &built.modules {
        let data = &get(&format!("lib/modules/{m}")).4;
        assert!(String::from_utf8_lossy(data).ends_with(m.as_str()), "{m}");
    }
    // A module file missing from the kernel's tree: nothing is left behind.
    std::fs::remove_file(kernel.join("kernel/fs/erofs/erofs.ko")).unwrap();
    let again = tmp.path().join("again.img");
    assert!(build_initramfs(&kernel, &busybox, "", &again).is_err());
    assert!(!again.exists() && !again.with_extension("new").exists());
}

#[test]
fn a_kernel_without_persistent_memory_drivers_still_gets_an_initramfs() {
    let tmp = tempfile::tempdir().unwrap();
    let kernel = tmp.path().join("5.2.0-test");
    std::fs::create_dir_all(&kernel).unwrap();
    let dep: String =
        DEP.lines().filter(|l| !l.contains("nvdimm")).map(|l| format!("{l}\n")).collect();
    fake_kernel_with(&kernel, &dep);
    let busybox = tmp.path().join("busybox");
    std::fs::write(&busybox, b"\x7fELF busybox").unwrap();
    let out = tmp.path().join("initrd.img");
    let built = build_initramfs(&kernel, &busybox, "#!/bin/sh\n", &out).unwrap();
    assert!(built.modules.iter().any(|m| m == "virtio_blk.ko"), "{:?}", built.modules);
    assert!(!built.modules.iter().any(|m| m.contains("pmem")), "{:?}", built.modules);
    // With them, both come in.
    let full = tmp.path().join("6.1.0-test");
    std::fs::create_dir_all(&full).unwrap();
    fake_kernel(&full);
    let built = build_initramfs(&full, &busybox, "#!/bin/sh\n", &out).unwrap();
    for m in ["virtio_pmem.ko", "nd_pmem.ko", "libnvdimm.ko"] {
        assert!(built.modules.iter().any(|x| x == m), "{m}: {:?}", built.modules);
    }
}
