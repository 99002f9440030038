//! The initramfs provd builds for VMs booted with a kernel the node
//! provides, so that a guest boots from its provd partitions without any
//! change to its image.
//!
//! It holds a static busybox, the modules of that same kernel a guest
//! needs to reach its partitions (virtio disks, virtio persistent memory,
//! EROFS, overlayfs, virtio-fs), its seed (ISO 9660) and its network (virtio-net), with
//! every module they depend on, loaded in dependency
//! order, `/init` (`assets/provd-init`) and the boot script every private
//! partition also carries (`provd-overlay-root`). It is a gzip-compressed
//! `newc` cpio archive, as the kernel reads it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `/init` of the initramfs.
pub const INIT_SCRIPT: &str = include_str!("../assets/provd-init");

/// Modules a guest needs, by name; their dependencies come with them, and
/// those the kernel has built in are skipped. The guest's own root holds
/// no modules of the node's kernel, so what it needs after the switch is
/// loaded here too: `isofs` for cloud-init to mount its NoCloud seed and
/// `virtio_net` for its network. `virtio_pmem` finds a persistent-memory
/// region and `nd_pmem` (bound to it, not a dependency) makes it
/// `/dev/pmemN`.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_pmem",
    "nd_pmem",
    "ext4",
    "erofs",
    "overlay",
    "virtiofs",
    "isofs",
    "virtio_net",
];

/// Of [`GUEST_MODULES`], those a kernel may lack (persistent memory came
/// with Linux 5.3): left out where neither a module nor built in, and its
/// guests then reach their shared partitions only as disks.
pub const OPTIONAL_MODULES: &[&str] = &["virtio_pmem", "nd_pmem"];

/// Largest file taken into the initramfs (a module or busybox).
const MAX_FILE_BYTES: u64 = 64 << 20;

/// Why an initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// a module the guest needs is neither a module nor built in
    #[error(
        "kernel modules in {dir}: {module} is neither a module (modules.dep) nor built in (modules.builtin)"
    )]
    MissingModule { dir: String, module: String },
    /// a module file provd cannot load from busybox
    #[error("{0}")]
    Unsupported(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BootError {
    let what = what.into();
    move |source| BootError::Io { what, source }
}

/// The module name of a path in `modules.dep`: `kernel/fs/erofs/erofs.ko`
/// gives `erofs` (names use `_` where files may use `-`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The module files (relative to the modules directory) to load for
/// `wanted`, every dependency before what needs it, each once; modules
/// `builtin` lists are skipped.
pub fn module_order(
    modules_dep: &str,
    builtin: &str,
    wanted: &[&str],
    dir: &Path,
) -> Result<Vec<String>, BootError> {
    // Module name → its file; file → the files it needs.
    let mut path_of: BTreeMap<String, String> = BTreeMap::new();
    let mut by_path: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else { continue };
        path_of.insert(module_name(path), path.to_string());
        by_path.insert(path.to_string(), rest.split_whitespace().map(str::to_string).collect());
    }
    let built_in: BTreeSet<String> = builtin.lines().map(module_name).collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    // Depth first, dependencies first; modules.dep lists every indirect
    // dependency too, and has no cycles.
    fn visit(
        path: &str,
        by_path: &BTreeMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(path.to_string()) {
            return;
        }
        for d in by_path.get(path).into_iter().flatten() {
            visit(d, by_path, seen, order);
        }
        order.push(path.to_string());
    }
    for name in wanted {
        let name = name.replace('-', "_");
        match path_of.get(&name) {
            Some(path) => visit(path, &by_path, &mut seen, &mut order),
            None if built_in.contains(&name) => {}
            None => {
                return Err(BootError::MissingModule {
                    dir: dir.display().to_string(),
                    module: name,
                });
            }
        }
    }
    if let Some(compressed) = order.iter().find(|p| !p.ends_with(".ko")) {
        return Err(BootError::Unsupported(format!(
            "module {compressed} is compressed; busybox insmod loads uncompressed modules only"
        )));
    }
    Ok(order)
}

/// One member of a `newc` cpio archive.
struct Member {
    path: String,
    /// File type and permission bits, as `st_mode`.
    mode: u32,
    data: Vec<u8>,
    /// Device numbers of a character device.
    rdev: (u32, u32),
}

/// Writes the members as a `newc` cpio archive with its trailer.
fn write_cpio(out: &mut impl Write, members: &[Member]) -> std::io::Result<()> {
    let mut ino = 1u32;
    let mut write_one = |out: &mut dyn Write,
                         path: &str,
                         mode: u32,
                         data: &[u8],
                         rdev: (u32, u32)| {
        let name_len = path.len() + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{name_len:08x}{:08x}",
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: reproducible archives
            data.len(),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            0, // check
        );
        ino += 1;
        out.write_all(header.as_bytes())?;
        out.write_all(path.as_bytes())?;
        out.write_all(&[0])?;
        // Name and data each end on a 4-byte boundary.
        let pad = |n: usize| vec![0u8; (4 - n % 4) % 4];
        out.write_all(&pad(header.len() + name_len))?;
        out.write_all(data)?;
        out.write_all(&pad(data.len()))
    };
    for m in members {
        write_one(out, &m.path, m.mode, &m.data, m.rdev)?;
    }
    write_one(out, "TRAILER!!!", 0, &[], (0, 0))
}

/// What [`build_initramfs`] put in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Initramfs {
    pub path: PathBuf,
    /// Module files, in load order.
    pub modules: Vec<String>,
    /// Bytes of the compressed archive.
    pub bytes: u64,
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, BootError> {
    let meta = std::fs::metadata(path).map_err(io(format!("reading {}", path.display())))?;
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
        return Err(BootError::Unsupported(format!(
            "{} is not a regular file of at most {MAX_FILE_BYTES} bytes",
            path.display()
        )));
    }
    std::fs::read(path).map_err(io(format!("reading {}", path.display())))
}

/// Builds the initramfs for the kernel whose modules are in `modules_dir`
/// (`/lib/modules/<version>`), with the static busybox at `busybox`, into
/// `out` (written beside it and renamed, so it is whole or absent).
pub fn build_initramfs(
    modules_dir: &Path,
    busybox: &Path,
    overlay_script: &str,
    out: &Path,
) -> Result<Initramfs, BootError> {
    let read_text = |name: &str| {
        let p = modules_dir.join(name);
        std::fs::read_to_string(&p).map_err(io(format!("reading {}", p.display())))
    };
    let dep = read_text("modules.dep")?;
    let builtin = read_text("modules.builtin").unwrap_or_default();
    let known: BTreeSet<String> = dep
        .lines()
        .filter_map(|l| l.split_once(':').map(|(p, _)| module_name(p)))
        .chain(builtin.lines().map(module_name))
        .collect();
    let wanted: Vec<&str> = GUEST_MODULES
        .iter()
        .copied()
        .filter(|m| !OPTIONAL_MODULES.contains(m) || known.contains(*m))
        .collect();
    let order = module_order(&dep, &builtin, &wanted, modules_dir)?;
    let dir =
        |path: &str| Member { path: path.into(), mode: 0o040755, data: Vec::new(), rdev: (0, 0) };
    let mut members = vec![
        dir("."),
        dir("bin"),
        dir("dev"),
        dir("lib"),
        dir("lib/modules"),
        dir("proc"),
        dir("root"),
        dir("run"),
        dir("sys"),
        // The kernel opens /dev/console for init before /init runs.
        Member { path: "dev/console".into(), mode: 0o020600, data: Vec::new(), rdev: (5, 1) },
        Member { path: "dev/null".into(), mode: 0o020666, data: Vec::new(), rdev: (1, 3) },
        Member {
            path: "init".into(),
            mode: 0o100755,
            data: INIT_SCRIPT.as_bytes().to_vec(),
            rdev: (0, 0),
        },
        Member {
            path: "provd-overlay-root".into(),
            mode: 0o100755,
            data: overlay_script.as_bytes().to_vec(),
            rdev: (0, 0),
        },
        Member {
            path: "bin/busybox".into(),
            mode: 0o100755,
            data: read_bounded(busybox)?,
            rdev: (0, 0),
        },
    ];
    let mut names = Vec::new();
    for rel in &order {
        let file = rel.rsplit('/').next().unwrap_or(rel).to_string();
        members.push(Member {
            path: format!("lib/modules/{file}"),
            mode: 0o100644,
            data: read_bounded(&modules_dir.join(rel))?,
            rdev: (0, 0),
        });
        names.push(file);
    }
    let listing: String = names.iter().map(|n| format!("{n}\n")).collect();
    members.push(Member {
        path: "modules.order".into(),
        mode: 0o100644,
        data: listing.into_bytes(),
        rdev: (0, 0),
    });

    let temp = out.with_extension("new");
    let written = (|| {
        let file =
            std::fs::File::create(&temp).map_err(io(format!("creating {}", temp.display())))?;
        let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        write_cpio(&mut gz, &members).map_err(io(format!("writing {}", temp.display())))?;
        let file = gz.finish().map_err(io(format!("writing {}", temp.display())))?;
        file.sync_all().map_err(io(format!("syncing {}", temp.display())))?;
        std::fs::rename(&temp, out).map_err(io(format!("renaming to {}", out.display())))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    let bytes = std::fs::metadata(out).map_err(io(format!("reading {}", out.display())))?.len();
    Ok(Initramfs { path: out.to_path_buf(), modules: names, bytes })
}
