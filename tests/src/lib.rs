//! Fixtures for provd's integration tests and benchmarks: the guest plugins
//! built by this crate's build script, as paths.

#![allow(missing_docs)]

use std::path::Path;

pub mod boot;
pub mod daemon;
pub mod oci;
pub mod pki;

/// The names directly in `dir`: what tests compare before and after a case
/// to see that nothing was written beside a node's data directory.
pub fn names_in(dir: &Path) -> std::io::Result<std::collections::BTreeSet<String>> {
    std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect()
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
