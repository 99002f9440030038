//! `provd:plugin/hashing`: BLAKE3 computed natively.

use provd_bindings::HasherState;
use provd_bindings::hashing::{self as wit, Digest};
use provd_bindings::types::Error as WitError;
use wasmtime::component::Resource;

use std::io::Read;

use provd_engine::{CallContext, Limit};
use provd_store::ImageRecord;
use wasmtime::component::ResourceTable;

use crate::Scope;

/// `hashing`'s view of a call: the call's context, its handle table (for
/// hashers), the node's scope and the images this request fetched (for
/// `hash-file`).
pub(crate) struct HashingView<'a> {
    pub ctx: &'a mut CallContext,
    pub table: &'a mut ResourceTable,
    pub scope: &'a Scope,
    pub fetched: &'a std::collections::HashMap<String, ImageRecord>,
}

pub(crate) struct HashingData;

impl wasmtime::component::HasData for HashingData {
    type Data<'a> = HashingView<'a>;
}

impl HashingView<'_> {
    /// Refuses an input larger than the grant allows. Passing it is a limit
    /// breach, so it stops the plugin rather than returning an error value.
    fn check_hash_input(&mut self, len: usize) -> wasmtime::Result<()> {
        let allowed = self.ctx.grants.hashing.map(|h| h.max_input_bytes).unwrap_or(0);
        let requested = len as u64;
        if requested > allowed {
            return Err(self.ctx.breach(Limit::Capability {
                name: "hashing.max-input-bytes",
                requested,
                allowed,
            }));
        }
        Ok(())
    }
}

impl HashingView<'_> {
    /// BLAKE3 of a file of a fetched image, computed natively.
    async fn hash_image_file(&mut self, image: &str, path: &str) -> Result<String, WitError> {
        let record = crate::fetched_image(self.fetched, image)?;
        let entry = crate::images::file_entry(self.scope, &record, path)?;
        let hash = entry.hash.ok_or_else(|| WitError::Failed(format!("{path} has no content")))?;
        let store = self.scope.images()?.store().clone();
        // Off the async threads: a large file takes milliseconds to hash.
        provd_engine::spawn_blocking(move || {
            let mut file = store.open_object(&hash).map_err(|e| WitError::Failed(e.to_string()))?;
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = file.read(&mut buf).map_err(|e| WitError::Failed(e.to_string()))?;
                if n == 0 {
                    break;
                }
                hasher.update(buf.get(..n).unwrap_or_default());
            }
            Ok(hasher.finalize().to_hex().to_string())
        })
        .await
        .map_err(|e| WitError::Failed(format!("hashing task: {e}")))?
    }
}

impl wit::Host for HashingView<'_> {
    async fn blake3(&mut self, data: Vec<u8>) -> wasmtime::Result<Result<Digest, WitError>> {
        self.ctx.step()?;
        self.check_hash_input(data.len())?;
        let result = Ok(blake3::hash(&data).to_hex().to_string());
        self.ctx.audit("hashing", "blake3", format!("bytes={}", data.len()), &result);
        Ok(result)
    }

    async fn hash_file(
        &mut self,
        image: String,
        path: String,
    ) -> wasmtime::Result<Result<Digest, WitError>> {
        self.ctx.step()?;
        let args = format!("{image} {path}");
        let result = self.hash_image_file(&image, &path).await;
        self.ctx.audit("hashing", "hash-file", args, &result);
        Ok(result)
    }
}

impl wit::HostHasher for HashingView<'_> {
    async fn new(&mut self) -> wasmtime::Result<Resource<HasherState>> {
        match self.table.push(HasherState::default()) {
            Ok(handle) => Ok(handle),
            Err(wasmtime::component::ResourceTableError::Full) => {
                let max = self.table.max_capacity();
                Err(self.ctx.breach(Limit::Count { what: format!("more than {max} live handles") }))
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
