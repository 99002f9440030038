//! Fixtures for provd's integration tests and benchmarks: the guest plugins
//! built by this crate's build script, as paths.

#![allow(missing_docs)]

use std::path::Path;

pub mod boot;
pub mod daemon;
pub mod libvirt;
pub mod oci;
pub mod pki;
pub mod seed;
pub mod smaps;

/// The names directly in `dir`: what tests compare before and after a case
/// to see that nothing was written beside a node's data directory.
pub fn names_in(dir: &Path) -> std::io::Result<std::collections::BTreeSet<String>> {
    std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect()
}

/// Every regular file beneath `dir`, symbolic links not followed: what
/// tests read back to show a secret reached none of a node's files.
pub fn files_under(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    Ok(out)
}

/// Raises this process's open-file limit to its hard limit (daemons it
/// starts inherit it) and returns the limit now in force: floods of
/// connections need more than the usual 1024.
pub fn raise_open_files() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let raised = Rlimit { current: now.maximum, maximum: now.maximum };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => now.maximum.unwrap_or(u64::MAX),
        Err(_) => now.current.unwrap_or(u64::MAX),
    }
}

/// `len` bytes that differ with `seed` (a 64-bit LCG's high bits): file
/// content that is distinct per seed, the same on every run, and does not
/// compress.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// `files` files `usr/lib/f<i>.so` of `size` bytes under `root`, file `i`
/// of content `pseudo_random(size, seed << 32 | i)`.
pub fn library_tree(root: &Path, files: usize, size: usize, seed: u8) -> std::io::Result<()> {
    std::fs::create_dir_all(root.join("usr/lib"))?;
    for i in 0..files {
        let data = pseudo_random(size, u64::from(seed) << 32 | i as u64);
        std::fs::write(root.join(format!("usr/lib/f{i}.so")), data)?;
    }
    Ok(())
}

/// A built guest plugin.
#[derive(Debug, Clone, Copy)]
pub struct Fixture {
    /// The component file.
    pub component: &'static str,
    /// The crate directory (holding `plugin.toml` for plugins that have one).
    pub dir: &'static str,
}

impl Fixture {
    pub fn component(&self) -> &'static Path {
        Path::new(self.component)
    }

    pub fn dir(&self) -> &'static Path {
        Path::new(self.dir)
    }

    pub fn wasm(&self) -> Vec<u8> {
        std::fs::read(self.component).unwrap_or_else(|e| {
            // A missing fixture means the build script did not run; say so.
            eprintln!("fixture {}: {e}", self.component);
            Vec::new()
        })
    }
}

include!(concat!(env!("OUT_DIR"), "/fixtures.rs"));
