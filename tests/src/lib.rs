//! Fixtures for provd's integration tests and benchmarks: the guest plugins
//! built by this crate's build script, as paths.

#![allow(missing_docs)]

use std::path::Path;

pub mod boot;
pub mod daemon;
pub mod oci;
pub mod pki;

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
