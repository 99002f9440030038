//! `provd:plugin/images`.
//!
//! A plugin names images by reference. A reference is fetched only if it
//! matches one of the plugin's granted patterns and one of the node's, and
//! that is decided from the reference text alone, before any file or
//! network access. Entries and files are readable only for images the
//! plugin fetched in the same request.

use std::sync::Arc;

use provd_bindings::images::{self as wit, Entry as WitEntry, EntryKind as WitKind, Image};
use provd_bindings::types::Error as WitError;
use provd_domain::glob_match;
use provd_domain::image::{Entry, EntryKind};
use provd_images::{ImportError, NoProgress, Reference};
use provd_store::ImageRecord;

use provd_engine::CallContext;

use crate::Scope;

/// Entries returned by one `entries` call.
pub(crate) const MAX_PAGE: u32 = 1000;
/// Images one request may fetch.
pub(crate) const MAX_FETCHED: usize = 256;
/// Longest reference or path a plugin may pass.
const MAX_NAME_LEN: usize = 4096;

/// `images`' view of a call: the call's context, the node's scope and the
/// images this request fetched.
pub(crate) struct ImagesView<'a> {
    pub ctx: &'a mut CallContext,
    pub scope: &'a Scope,
    pub fetched: &'a mut std::collections::HashMap<String, ImageRecord>,
    pub holds: &'a mut Vec<provd_store::ImageHold>,
}

pub(crate) struct ImagesData;

impl wasmtime::component::HasData for ImagesData {
    type Data<'a> = ImagesView<'a>;
}

/// Parses a reference a plugin passed; plugins must say `dir:`, `tar:`
/// or give a URL, so that deciding never needs to look at the
/// filesystem or the network.
pub(crate) fn plugin_reference(text: &str) -> Result<Reference, WitError> {
    if text.len() > MAX_NAME_LEN {
        return Err(WitError::InvalidInput(format!("reference is {} bytes long", text.len())));
    }
    if !provd_domain::PATTERN_SCHEMES.iter().any(|scheme| text.starts_with(scheme)) {
        return Err(WitError::InvalidInput(format!(
            "reference {text:?}: write dir:/path, tar:/path, an http(s) URL with its digest \
             or an oci:// reference"
        )));
    }
    Reference::parse(text).map_err(|e| WitError::InvalidInput(e.to_string()))
}

impl ImagesView<'_> {
    /// In an operation that names VMs, what a plugin fetches can reach
    /// those VMs (through a plan, or a file it adds): only the images their
    /// manager's specs name and the public catalogue's may be fetched.
    fn operation_may_fetch(&self, canonical: &str) -> Result<(), WitError> {
        let Some(vms) = self.scope.operation_vms.as_ref().filter(|v| !v.is_empty()) else {
            return Ok(());
        };
        if provd_domain::trust::is_public_image(&self.scope.node.public_images, canonical)
            || vms.iter().any(|vm| self.scope.spec_image(vm).as_deref() == Some(canonical))
        {
            return Ok(());
        }
        Err(WitError::Denied(format!(
            "{canonical} is neither an image this operation's VM specs name nor one of the \
             node's public catalogue: an operation's VMs get only their own images' files"
        )))
    }

    /// A fetched image whose entries and files the plugin may read: when
    /// the operation's VMs belong to more than one tenant, only a public
    /// one, since what it reads of one tenant's image it could otherwise
    /// write into another's VM.
    fn readable_image(&self, text: &str) -> Result<ImageRecord, WitError> {
        let record = crate::fetched_image(self.fetched, text)?;
        let mut tenants = self.scope.operation_specs.values().map(|s| s.tenant());
        let first = tenants.next();
        let several = tenants.any(|t| Some(t) != first);
        if !several
            || provd_domain::trust::is_public_image(
                &self.scope.node.public_images,
                &record.reference,
            )
        {
            return Ok(record);
        }
        Err(WitError::Denied(format!(
            "{}: this operation's VMs belong to several tenants, so a plugin reads only images \
             of the node's public catalogue",
            record.reference
        )))
    }
}

/// The file at `path` of `image`, refusing anything but a file.
pub(crate) fn file_entry(
    scope: &Scope,
    image: &ImageRecord,
    path: &str,
) -> Result<Entry, WitError> {
    let store = scope.images()?.store().clone();
    let entry = store
        .entry(image, path)
        .map_err(|e| WitError::Failed(e.to_string()))?
        .ok_or_else(|| WitError::NotFound(format!("{}: no entry {path:?}", image.reference)))?;
    if !matches!(entry.kind, EntryKind::File | EntryKind::Hardlink) {
        return Err(WitError::InvalidInput(format!(
            "{}: {path} is a {}, not a file",
            image.reference,
            entry.kind.as_str()
        )));
    }
    Ok(entry)
}

fn image_of(r: &ImageRecord) -> Image {
    Image {
        reference: r.reference.clone(),
        digest: r.digest.clone(),
        entries: r.entries,
        files: r.files,
        bytes: r.bytes,
    }
}

/// Refuses a page larger than [`MAX_PAGE`] entries: pages are how large
/// listings reach a plugin without being copied in whole.
pub(crate) fn check_page(limit: u32) -> Result<(), WitError> {
    if limit > MAX_PAGE {
        return Err(WitError::InvalidInput(format!(
            "limit {limit}: at most {MAX_PAGE} entries per page"
        )));
    }
    Ok(())
}

pub(crate) fn entry_of(e: Entry) -> WitEntry {
    WitEntry {
        path: e.path,
        kind: match e.kind {
            EntryKind::File => WitKind::File,
            EntryKind::Dir => WitKind::Dir,
            EntryKind::Symlink => WitKind::Symlink,
            EntryKind::Hardlink => WitKind::Hardlink,
            EntryKind::CharDevice => WitKind::CharDevice,
            EntryKind::BlockDevice => WitKind::BlockDevice,
            EntryKind::Fifo => WitKind::Fifo,
        },
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: e.mtime,
        size: e.size,
        hash: e.hash.map(|h| h.to_hex()),
        link_target: e.link_target,
    }
}

fn import_error(e: &ImportError) -> WitError {
    match e {
        ImportError::Reference(r) => WitError::InvalidInput(r.to_string()),
        ImportError::Source { .. } => WitError::NotFound(e.to_string()),
        ImportError::Limit { .. } => WitError::QuotaExceeded(e.to_string()),
        _ => WitError::Failed(e.to_string()),
    }
}

impl ImagesView<'_> {
    async fn fetch_call(&mut self, reference: String) -> wasmtime::Result<Result<Image, WitError>> {
        let parsed = match plugin_reference(&reference) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let canonical = parsed.to_string();
        let plugin_ok = self
            .ctx
            .grants
            .images
            .as_ref()
            .is_some_and(|g| g.sources.iter().any(|p| glob_match(p, &canonical)));
        let node_ok = self.scope.node.image_sources.iter().any(|p| glob_match(p, &canonical));
        if !plugin_ok || !node_ok {
            let whose = if plugin_ok { "the node's" } else { "this plugin's" };
            tracing::info!(plugin = %self.ctx.plugin, reference = %canonical, "image fetch denied");
            return Ok(Err(WitError::Denied(format!(
                "{canonical} is not among {whose} allowed image sources"
            ))));
        }
        if let Err(e) = self.operation_may_fetch(&canonical) {
            return Ok(Err(e));
        }
        if let Some(record) = self.fetched.get(&canonical) {
            return Ok(Ok(image_of(record)));
        }
        if self.fetched.len() >= MAX_FETCHED {
            return Ok(Err(WitError::QuotaExceeded(format!(
                "at most {MAX_FETCHED} images per request"
            ))));
        }
        let service = match self.scope.images() {
            Ok(s) => s.clone(),
            Err(e) => return Ok(Err(e)),
        };
        tracing::info!(plugin = %self.ctx.plugin, reference = %canonical, "image fetch allowed");
        // Held before the import: a collection running meanwhile either
        // removed the image already, and it is imported again, or keeps it.
        // On a blocking thread: a collection removing an image holds the
        // holds' lock through its database work.
        let hold = {
            let store = service.store().clone();
            let reference = canonical.clone();
            provd_engine::spawn_blocking(move || store.hold_image(&reference)).await?
        };
        match service.import(&canonical, Arc::new(NoProgress)).await {
            Ok(record) => {
                self.holds.push(hold);
                let store = service.store().clone();
                let reference = canonical.clone();
                let touched =
                    provd_engine::spawn_blocking(move || store.touch_image(&reference)).await?;
                if let Err(e) = touched {
                    tracing::warn!(reference = %canonical, error = %e, "recording an image's use");
                }
                let image = image_of(&record);
                self.fetched.insert(canonical, record);
                Ok(Ok(image))
            }
            Err(e) => Ok(Err(import_error(&e))),
        }
    }

    async fn entries_call(
        &mut self,
        reference: String,
        offset: u64,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<WitEntry>, WitError>> {
        if let Err(e) = check_page(limit) {
            return Ok(Err(e));
        }
        let record = match self.readable_image(&reference) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let service = match self.scope.images() {
            Ok(s) => s.clone(),
            Err(e) => return Ok(Err(e)),
        };
        let store = service.store().clone();
        let page =
            provd_engine::spawn_blocking(move || store.entries(&record, offset, u64::from(limit)))
                .await?;
        Ok(page
            .map(|entries| entries.into_iter().map(entry_of).collect())
            .map_err(|e| WitError::Failed(e.to_string())))
    }

    async fn read_file_call(
        &mut self,
        reference: String,
        path: String,
    ) -> wasmtime::Result<Result<Vec<u8>, WitError>> {
        let record = match self.readable_image(&reference) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let entry = match file_entry(self.scope, &record, &path) {
            Ok(e) => e,
            Err(e) => return Ok(Err(e)),
        };
        let max = self.ctx.grants.images.as_ref().map(|g| g.max_read_bytes).unwrap_or(0);
        if entry.size > max {
            return Ok(Err(WitError::QuotaExceeded(format!(
                "{}: {path} is {} bytes; this plugin reads at most {max}",
                record.reference, entry.size
            ))));
        }
        let Some(hash) = entry.hash else {
            return Ok(Err(WitError::Failed(format!("{path} has no content"))));
        };
        let service = match self.scope.images() {
            Ok(s) => s.clone(),
            Err(e) => return Ok(Err(e)),
        };
        let store = service.store().clone();
        let read = provd_engine::spawn_blocking(move || store.read_object(&hash, max)).await?;
        Ok(read.map_err(|e| WitError::Failed(e.to_string())))
    }
}

impl wit::Host for ImagesView<'_> {
    async fn fetch(&mut self, reference: String) -> wasmtime::Result<Result<Image, WitError>> {
        self.ctx.step()?;
        let args = reference.clone();
        let result = self.fetch_call(reference).await?;
        let bytes = result.as_ref().map(|i| i.bytes).unwrap_or(0);
        self.ctx.audit_bytes("images", "fetch", args, &result, bytes);
        Ok(result)
    }

    async fn entries(
        &mut self,
        reference: String,
        offset: u64,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<WitEntry>, WitError>> {
        self.ctx.step()?;
        let args = format!("{reference} offset={offset} limit={limit}");
        let result = self.entries_call(reference, offset, limit).await?;
        self.ctx.audit("images", "entries", args, &result);
        Ok(result)
    }

    async fn read_file(
        &mut self,
        reference: String,
        path: String,
    ) -> wasmtime::Result<Result<Vec<u8>, WitError>> {
        self.ctx.step()?;
        let args = format!("{reference} {path}");
        let result = self.read_file_call(reference, path).await?;
        self.ctx.audit("images", "read-file", args, &result);
        Ok(result)
    }
}
