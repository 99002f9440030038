//! Host-side bindings of the `provd:plugin` WIT package.
//!
//! This is the only crate that runs wasmtime's `bindgen!`; host code imports
//! the generated traits and types from here so that there is exactly one Rust
//! rendering of `wit/`. Every host import is `async` (a host call may wait on
//! I/O without blocking the runtime) and `trappable` (it returns
//! `wasmtime::Result<T>`: an `Err` stops the plugin, while a WIT `error` value
//! inside `T` is data the plugin can act on).

#![allow(missing_debug_implementations)]

mod generated {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "provisioner",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "provd:plugin/hashing.hasher": crate::HasherState,
        },
        require_store_data_send: true,
    });
}

pub use generated::provd::plugin::{dedup, hashing, images, log, partitions, progress, types, vm};
pub use generated::{Provisioner, ProvisionerPre, Report, Request};

/// Host state behind a guest's `hashing.hasher` handle.
#[derive(Default)]
pub struct HasherState {
    pub hasher: blake3::Hasher,
    /// Bytes fed so far, kept for accounting.
    pub fed: u64,
}

impl std::fmt::Debug for HasherState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HasherState").field("fed", &self.fed).finish_non_exhaustive()
    }
}
