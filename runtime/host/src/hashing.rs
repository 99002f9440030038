//! `provd:plugin/hashing`: BLAKE3 computed natively.

use provd_bindings::HasherState;
use provd_bindings::hashing::{self as wit, Digest};
use provd_bindings::types::Error as WitError;
use wasmtime::component::Resource;

use crate::error::Limit;
use crate::host::HostState;

impl HostState {
    /// Refuses an input larger than the grant allows. Passing it is a limit
    /// breach, so it stops the plugin rather than returning an error value.
    fn check_hash_input(&mut self, len: usize) -> wasmtime::Result<()> {
        let allowed = self.grants.hashing.map(|h| h.max_input_bytes).unwrap_or(0);
        let requested = len as u64;
        if requested > allowed {
            return Err(self.breach(Limit::Capability {
                name: "hashing.max-input-bytes",
                requested,
                allowed,
            }));
        }
        Ok(())
    }
}

impl wit::Host for HostState {
    async fn blake3(&mut self, data: Vec<u8>) -> wasmtime::Result<Result<Digest, WitError>> {
        self.step()?;
        self.check_hash_input(data.len())?;
        let result = Ok(blake3::hash(&data).to_hex().to_string());
        self.audit("hashing", "blake3", format!("bytes={}", data.len()), &result);
        Ok(result)
    }

    async fn hash_file(
        &mut self,
        image: String,
        path: String,
    ) -> wasmtime::Result<Result<Digest, WitError>> {
        self.step()?;
        let args = format!("{image} {path}");
        let result = self.hash_image_file(&image, &path).await;
        self.audit("hashing", "hash-file", args, &result);
        Ok(result)
    }
}

impl wit::HostHasher for HostState {
    async fn new(&mut self) -> wasmtime::Result<Resource<HasherState>> {
        match self.table.push(HasherState::default()) {
            Ok(handle) => Ok(handle),
            Err(wasmtime::component::ResourceTableError::Full) => {
                let max = self.table.max_capacity();
                Err(self.breach(Limit::Count { what: format!("more than {max} live handles") }))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn update(
        &mut self,
        this: Resource<HasherState>,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), WitError>> {
        self.check_hash_input(data.len())?;
        let state = self.table.get_mut(&this)?;
        state.hasher.update(&data);
        state.fed += data.len() as u64;
        Ok(Ok(()))
    }

    async fn finish(&mut self, this: Resource<HasherState>) -> wasmtime::Result<Digest> {
        Ok(self.table.get(&this)?.hasher.finalize().to_hex().to_string())
    }

    async fn drop(&mut self, this: Resource<HasherState>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}
