//! Write provd provisioning plugins in Rust.
//!
//! A plugin is a type implementing [`Plugin`], exported with
//! [`export_plugin!`]. It is built into a WebAssembly component
//! (`provctl plugin build`) and runs inside provd's sandbox, where it reaches
//! the node only through the host interfaces its `plugin.toml` declares:
//! [`log`], [`progress`], [`hashing`], [`images`] and [`dedup`] so far.
//!
//! ```no_run
//! use provd_sdk::{Error, Plugin, Report, Request, log, progress};
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn provision(request: Request) -> Result<Report, Error> {
//!         #[derive(serde::Deserialize)]
//!         struct Input { name: String }
//!         let input: Input = request.input()?;
//!         log::info("greeting", &[("name", &input.name)]);
//!         progress::report("greet", 1, Some(1))?;
//!         Ok(Report::new(format!("hello, {}", input.name)).field("greeted", 1))
//!     }
//! }
//!
//! provd_sdk::export_plugin!(Hello);
//! ```
//!
//! Errors are values the host and the manager can match on; see [`Error`].
//! Breaking a limit (memory, time, stack, bytes per host call) is not an
//! error the plugin sees: provd stops it.

use std::fmt;

#[doc(hidden)]
pub mod wit {
    wit_bindgen::generate!({
        path: "../wit",
        world: "provisioner",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "provd_sdk::wit",
    });
}

use wit::provd::plugin::types as wit_types;

/// What a plugin does: turn one request into a report.
pub trait Plugin {
    fn provision(request: Request) -> Result<Report, Error>;
}

/// Exports a [`Plugin`] as the component's `provision` function.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            struct ProvdExport;
            impl $crate::wit::Guest for ProvdExport {
                fn provision(
                    request: $crate::wit::Request,
                ) -> ::core::result::Result<
                    $crate::wit::Report,
                    $crate::wit::provd::plugin::types::Error,
                > {
                    $crate::__provision::<$plugin>(request)
                }
            }
    $crate::wit::export!(ProvdExport with_types_in $crate::wit);
        };
    };
}

#[doc(hidden)]
pub fn __provision<P: Plugin>(request: wit::Request) -> Result<wit::Report, wit_types::Error> {
    let request = Request { operation_id: request.operation_id, input: request.input };
    match P::provision(request) {
        Ok(report) => Ok(report.into_wit()),
        Err(e) => Err(e.into()),
    }
}

/// A provisioning request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Identifier of the operation this call belongs to.
    pub operation_id: String,
    /// Plugin parameters as the manager sent them, a JSON document.
    pub input: String,
}

impl Request {
    /// Parses the input into `T`; a parse failure becomes
    /// [`Error::InvalidInput`] naming where the document is wrong.
    pub fn input<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_str(&self.input)
            .map_err(|e| Error::InvalidInput(format!("request input: {e}")))
    }
}

/// What a plugin did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// One line for people.
    pub summary: String,
    /// Key figures.
    pub fields: Vec<(String, String)>,
    /// Machine-readable detail, a JSON document.
    pub output: String,
}

impl Report {
    pub fn new(summary: impl Into<String>) -> Report {
        Report { summary: summary.into(), fields: Vec::new(), output: "null".into() }
    }

    /// Adds a key figure.
    pub fn field(mut self, key: impl Into<String>, value: impl fmt::Display) -> Report {
        self.fields.push((key.into(), value.to_string()));
        self
    }

    /// Sets the machine-readable output.
    pub fn output<T: serde::Serialize>(mut self, value: &T) -> Result<Report, Error> {
        self.output = serde_json::to_string(value)
            .map_err(|e| Error::Failed(format!("report output: {e}")))?;
        Ok(self)
    }

    fn into_wit(self) -> wit::Report {
        wit::Report {
            summary: self.summary,
            fields: self
                .fields
                .into_iter()
                .map(|(key, value)| wit_types::Field { key, value })
                .collect(),
            output: self.output,
        }
    }
}

/// An error a plugin returns or receives from a host call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The input was malformed; the text names the field.
    InvalidInput(String),
    /// The node's policy does not allow this.
    Denied(String),
    /// Something named does not exist.
    NotFound(String),
    /// A quota would be exceeded.
    QuotaExceeded(String),
    /// Anything else that failed.
    Failed(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Error::Denied(m) => write!(f, "denied: {m}"),
            Error::NotFound(m) => write!(f, "not found: {m}"),
            Error::QuotaExceeded(m) => write!(f, "quota exceeded: {m}"),
            Error::Failed(m) => write!(f, "failed: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<wit_types::Error> for Error {
    fn from(e: wit_types::Error) -> Error {
        match e {
            wit_types::Error::InvalidInput(m) => Error::InvalidInput(m),
            wit_types::Error::Denied(m) => Error::Denied(m),
            wit_types::Error::NotFound(m) => Error::NotFound(m),
            wit_types::Error::QuotaExceeded(m) => Error::QuotaExceeded(m),
            wit_types::Error::Failed(m) => Error::Failed(m),
        }
    }
}

impl From<Error> for wit_types::Error {
    fn from(e: Error) -> wit_types::Error {
        match e {
            Error::InvalidInput(m) => wit_types::Error::InvalidInput(m),
            Error::Denied(m) => wit_types::Error::Denied(m),
            Error::NotFound(m) => wit_types::Error::NotFound(m),
            Error::QuotaExceeded(m) => wit_types::Error::QuotaExceeded(m),
            Error::Failed(m) => wit_types::Error::Failed(m),
        }
    }
}

/// Structured logging (capability `log`).
///
/// Records go to the node's log for this operation. Past the plugin's log
/// budget they are dropped and counted, never failing the plugin. Whatever
/// the plugin prints to stdout or stderr lands in the same log.
///
/// ```no_run
/// provd_sdk::log::info("image fetched", &[("digest", &"blake3:ab…"), ("bytes", &1024)]);
/// ```
pub mod log {
    use super::wit::provd::plugin::log as host;
    use super::wit_types::Field;
    use std::fmt::Display;

    fn write(level: host::Level, message: &str, fields: &[(&str, &dyn Display)]) {
        let fields: Vec<Field> = fields
            .iter()
            .map(|(k, v)| Field { key: (*k).to_string(), value: v.to_string() })
            .collect();
        host::write(level, message, &fields);
    }

    pub fn trace(message: &str, fields: &[(&str, &dyn Display)]) {
        write(host::Level::Trace, message, fields)
    }
    pub fn debug(message: &str, fields: &[(&str, &dyn Display)]) {
        write(host::Level::Debug, message, fields)
    }
    pub fn info(message: &str, fields: &[(&str, &dyn Display)]) {
        write(host::Level::Info, message, fields)
    }
    pub fn warn(message: &str, fields: &[(&str, &dyn Display)]) {
        write(host::Level::Warn, message, fields)
    }
    pub fn error(message: &str, fields: &[(&str, &dyn Display)]) {
        write(host::Level::Error, message, fields)
    }
}

/// Progress of the running request (capability `progress`).
pub mod progress {
    use super::Error;
    use super::wit::provd::plugin::progress as host;

    /// Reports `done` of `total` units of `phase` (lowercase letters, digits,
    /// `-`, `_`, `.`). `total` is `None` while unknown.
    pub fn report(phase: &str, done: u64, total: Option<u64>) -> Result<(), Error> {
        host::report(phase, done, total).map_err(Error::from)
    }
}

/// BLAKE3 computed natively by the host (capability `hashing`).
///
/// ```no_run
/// let digest = provd_sdk::hashing::blake3(b"abc")?;
/// let mut h = provd_sdk::hashing::Hasher::new();
/// h.update(b"a")?;
/// h.update(b"bc")?;
/// assert_eq!(h.finish(), digest);
/// # Ok::<(), provd_sdk::Error>(())
/// ```
pub mod hashing {
    use super::Error;
    use super::wit::provd::plugin::hashing as host;

    /// The BLAKE3 digest of `data` as 64 lowercase hex characters.
    pub fn blake3(data: &[u8]) -> Result<String, Error> {
        host::blake3(data).map_err(Error::from)
    }

    /// The BLAKE3 digest of file `path` of `image` (fetched in this request
    /// with [`crate::images::fetch`]), computed by the host without copying
    /// the file into the plugin.
    pub fn hash_file(image: &str, path: &str) -> Result<String, Error> {
        host::hash_file(image, path).map_err(Error::from)
    }

    /// Incremental BLAKE3, for input that arrives in pieces.
    #[derive(Debug)]
    pub struct Hasher(host::Hasher);

    impl Hasher {
        #[allow(clippy::new_without_default)]
        pub fn new() -> Hasher {
            Hasher(host::Hasher::new())
        }
        pub fn update(&mut self, data: &[u8]) -> Result<(), Error> {
            self.0.update(data).map_err(Error::from)
        }
        /// The digest of everything fed so far.
        pub fn finish(&self) -> String {
            self.0.finish()
        }
    }
}

/// Software images in the node's store (capability `images`).
///
/// ```no_run
/// use provd_sdk::images;
/// let image = images::fetch("dir:/srv/images/web")?;
/// for entry in images::entries(&image.reference, 0, 100)? {
///     if entry.path == "etc/hostname" {
///         let bytes = images::read_file(&image.reference, &entry.path)?;
///     }
/// }
/// # Ok::<(), provd_sdk::Error>(())
/// ```
pub mod images {
    use super::Error;
    use super::wit::provd::plugin::images as host;

    pub use host::EntryKind;

    /// An image in the node's store.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Image {
        /// The canonical reference, to pass to the other calls.
        pub reference: String,
        /// BLAKE3 over the image's entry listing.
        pub digest: String,
        pub entries: u64,
        pub files: u64,
        pub bytes: u64,
    }

    /// One entry of an image.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Entry {
        pub path: String,
        pub kind: EntryKind,
        pub mode: u32,
        pub uid: u64,
        pub gid: u64,
        pub mtime: i64,
        pub size: u64,
        /// BLAKE3 of the content, for files and hard links.
        pub hash: Option<String>,
        pub link_target: Option<String>,
    }

    /// Fetches the image `reference` (`dir:/...` or `tar:/...`) into the
    /// store, if the plugin's grant and the node allow that source.
    pub fn fetch(reference: &str) -> Result<Image, Error> {
        let i = host::fetch(reference)?;
        Ok(Image {
            reference: i.reference,
            digest: i.digest,
            entries: i.entries,
            files: i.files,
            bytes: i.bytes,
        })
    }

    impl From<host::Entry> for Entry {
        fn from(e: host::Entry) -> Entry {
            Entry {
                path: e.path,
                kind: e.kind,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                mtime: e.mtime,
                size: e.size,
                hash: e.hash,
                link_target: e.link_target,
            }
        }
    }

    /// A page of a fetched image's entries, ordered by path (at most 1000).
    pub fn entries(reference: &str, offset: u64, limit: u32) -> Result<Vec<Entry>, Error> {
        Ok(host::entries(reference, offset, limit)?.into_iter().map(Entry::from).collect())
    }

    /// The content of a file of a fetched image, within the plugin's
    /// `max-read-bytes`.
    pub fn read_file(reference: &str, path: &str) -> Result<Vec<u8>, Error> {
        host::read_file(reference, path).map_err(Error::from)
    }
}

/// Which files the VMs share, computed by the host (capability `dedup`).
///
/// ```no_run
/// use provd_sdk::{dedup, images};
/// let a = images::fetch("dir:/srv/images/web")?;
/// let b = images::fetch("dir:/srv/images/api")?;
/// let vms = [("web-1", a.reference.as_str()), ("api-1", b.reference.as_str())];
/// let policy = dedup::Policy {
///     min_layer_bytes: 1 << 20,
///     max_layers_per_vm: 4,
///     share_across_paths: false,
///     node_layers: true,         // stack what the node already holds
///     layer_unique_files: true,  // keep each image's own files for its next VM
/// };
/// let plan = dedup::plan(&vms, policy)?;
/// for layer in &plan.layers {
///     let first_page = dedup::layer_entries(&layer.id, 0, 1000)?;
/// }
/// # Ok::<(), provd_sdk::Error>(())
/// ```
pub mod dedup {
    use super::Error;
    use super::images::Entry;
    use super::wit::provd::plugin::dedup as host;

    pub use host::{Layer, Policy, Summary, VmFigures};

    fn vms(pairs: &[(&str, &str)]) -> Vec<host::VmImage> {
        pairs
            .iter()
            .map(|(vm, image)| host::VmImage { vm: (*vm).to_string(), image: (*image).to_string() })
            .collect()
    }

    /// The sharing analysis of (VM, image reference) pairs; every image must
    /// have been fetched in this request.
    pub fn analyse(pairs: &[(&str, &str)]) -> Result<Summary, Error> {
        host::analyse(&vms(pairs)).map_err(Error::from)
    }

    /// Chooses layers under `policy`; the layers' entries stay with the host
    /// and are read a page at a time with [`layer_entries`]. The VMs of one
    /// plan are of one tenant, unless all run images of the node's public
    /// catalogue: the host refuses a plan that would share one tenant's
    /// files with another's VMs.
    pub fn plan(pairs: &[(&str, &str)], policy: Policy) -> Result<Summary, Error> {
        host::plan(&vms(pairs), policy).map_err(Error::from)
    }

    /// A page of a planned layer's entries (at most 1000).
    pub fn layer_entries(layer: &str, offset: u64, limit: u32) -> Result<Vec<Entry>, Error> {
        Ok(host::layer_entries(layer, offset, limit)?.into_iter().map(Entry::from).collect())
    }
}

/// Shared and private partitions built from a plan of this request.
///
/// ```no_run
/// use provd_sdk::{dedup, partitions};
/// # let pairs = [("web", "dir:/srv/images/web"), ("db", "dir:/srv/images/db")];
/// let policy = dedup::Policy {
///     min_layer_bytes: 1 << 20,
///     max_layers_per_vm: 8,
///     share_across_paths: false,
///     node_layers: false,
///     layer_unique_files: false,
/// };
/// let plan = dedup::plan(&pairs, policy)?;
/// let shared = partitions::create_shared(&plan.plan, "erofs-lz4")?;
/// for (vm, _) in pairs {
///     let private = partitions::create_private(&plan.plan, vm, Some(&shared.id), "ext4", 0)?;
///     partitions::add_file(&private.id, "etc/hostname", format!("{vm}\n").as_bytes(), 0o644)?;
/// }
/// # Ok::<(), provd_sdk::Error>(())
/// ```
pub mod partitions {
    use super::Error;
    use super::wit::provd::plugin::partitions as host;

    pub use host::Partition;

    /// Builds the shared partition of `plan` (`Summary::plan`) in `format`:
    /// `erofs`, `erofs-lz4`, `erofs-lz4hc`, `ext4` or `dir`.
    pub fn create_shared(plan: &str, format: &str) -> Result<Partition, Error> {
        host::create_shared(plan, format).map_err(Error::from)
    }

    /// Builds `vm`'s private partition (`ext4` or `qcow2`), stacking its
    /// layers from `shared`; `size_bytes` 0 takes the default size.
    pub fn create_private(
        plan: &str,
        vm: &str,
        shared: Option<&str>,
        format: &str,
        size_bytes: u64,
    ) -> Result<Partition, Error> {
        host::create_private(plan, vm, shared, format, size_bytes).map_err(Error::from)
    }

    /// [`create_private`] for each of `vms`, built side by side on the
    /// node's cores; the partitions come back in the order of `vms`.
    pub fn create_privates(
        plan: &str,
        vms: &[&str],
        shared: Option<&str>,
        format: &str,
        size_bytes: u64,
    ) -> Result<Vec<Partition>, Error> {
        let vms: Vec<String> = vms.iter().map(|v| (*v).to_string()).collect();
        host::create_privates(plan, &vms, shared, format, size_bytes).map_err(Error::from)
    }

    /// Writes a small file into a raw ext4 private partition of this request.
    pub fn add_file(partition: &str, path: &str, content: &[u8], mode: u32) -> Result<(), Error> {
        host::add_file(partition, path, content, mode).map_err(Error::from)
    }
}

/// VMs configured on the node from specs (TOML or JSON, see
/// `examples/vms/`), on partitions this request built.
///
/// ```no_run
/// use provd_sdk::vm;
/// # let private_id = "p-0123456789abcdef";
/// let spec = r#"
/// name = "web-1"
/// hypervisor = "libvirt"
/// vcpus = 2
/// memory-mib = 2048
/// image = "dir:/srv/images/web"
/// [boot]
/// firmware = "uefi"
/// "#;
/// let configured = vm::configure(spec, private_id)?;
/// # Ok::<(), provd_sdk::Error>(())
/// ```
pub mod vm {
    use super::Error;
    use super::wit::provd::plugin::vm as host;

    pub use host::Configured;

    /// Configures a VM from `spec` with `private` (a private partition of
    /// this request built for it) as its root disk.
    pub fn configure(spec: &str, private: &str) -> Result<Configured, Error> {
        host::configure(spec, private).map_err(Error::from)
    }

    /// [`configure`] for each `(spec, private)` pair, side by side on the
    /// node's cores; the results come back in the order of `vms`.
    pub fn configure_all(vms: &[(&str, &str)]) -> Result<Vec<Configured>, Error> {
        let vms: Vec<(String, String)> =
            vms.iter().map(|(s, p)| ((*s).to_string(), (*p).to_string())).collect();
        host::configure_all(&vms).map_err(Error::from)
    }

    /// Rewrites the cloud-init seed of a VM this operation names (or this
    /// request configured) from `spec`: its spec with another `cloud-init`
    /// section or other NIC addresses. Returns the seed's new instance id.
    pub fn customize(spec: &str) -> Result<String, Error> {
        host::customize(spec).map_err(Error::from)
    }
}
