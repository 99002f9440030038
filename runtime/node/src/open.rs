//! Opening the node: the order in which a start settles what a stop left
//! behind before anything new runs.
//!
//! 1. The data directory must be the node's alone (`check_private`); a
//!    missing one is created 0700 by `Store::open`.
//! 2. Repack moves a stop interrupted are settled from what each private
//!    partition carries (`repack::recover`).
//! 3. Operations a stop left `running` are rolled back
//!    (`Operations::recover`).
//! 4. Customisations whose operation did not succeed are undone from their
//!    journal; the others are kept.
//! 5. The engine starts, with local images confined to the roots the
//!    policy's patterns name, and the operations are ready to take work.

use std::path::PathBuf;
use std::sync::Arc;

use provd_bundle::{KeyError, PublicKey};
use provd_domain::NodePolicy;
use provd_engine::{EngineConfig, LoadError};
use provd_store::{Store, StoreError};

use crate::Node;
use crate::operations::{Meter, Operations};
use crate::repack::RepackError;

/// Image imports run at once per node.
const PARALLEL_IMPORTS: usize = 2;

/// What a node is opened with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub policy: NodePolicy,
    /// Files of the public keys whose signed bundles the node accepts.
    pub trusted_keys: Vec<PathBuf>,
    /// Operations running at once; more wait for a slot.
    pub max_running_operations: u32,
    /// Operations waiting for a slot; more are refused.
    pub max_queued_operations: u32,
    /// Finished operations and audit rows kept.
    pub keep_operations: u64,
    pub keep_audit_rows: u64,
    /// The node's libvirtd, to hand the VMs operations configure to, and
    /// whether they are started there at once.
    pub libvirt: Option<provd_libvirt::Libvirt>,
    pub start_vms: bool,
}

/// Why the node could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// the folder VMs' files are handed to the hypervisor in is unusable
    #[error("[hypervisor] vm-dir: {0}")]
    Hypervisor(String),
    /// the libvirtd provd hands its VMs to does not answer
    #[error(
        "[hypervisor] libvirt-uri: {0}; provd defines, stops and undefines its VMs there, \
         and rolls back interrupted operations' domains at start: start libvirtd first"
    )]
    Libvirt(provd_libvirt::LibvirtError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("settling interrupted repack moves: {0}")]
    Repack(#[from] RepackError),
    #[error("undoing interrupted customisations: {0}")]
    Customization(#[from] provd_vm::VmError),
    #[error("trusted key {path}: {source}")]
    Key { path: PathBuf, source: KeyError },
    #[error("starting the engine: {0}")]
    Engine(#[from] LoadError),
    #[error("a start-up step panicked: {0}")]
    Panicked(#[from] tokio::task::JoinError),
}

/// A node ready to serve: its executor, its store and its operations.
#[derive(Clone)]
pub struct Opened {
    pub node: Arc<Node>,
    pub store: Arc<Store>,
    pub ops: Arc<Operations>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened").finish_non_exhaustive()
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static, E: From<tokio::task::JoinError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    provd_engine::spawn_blocking(f).await?
}

impl Node {
    /// Opens the node at `config.data_dir`, settling what a stop left
    /// behind (see the module's documentation), with `meter` counting its
    /// operations.
    pub async fn open(config: NodeConfig, meter: Arc<dyn Meter>) -> Result<Opened, OpenError> {
        let data = config.data_dir.clone();
        // Refused before anything is opened: a directory other users can
        // read is not the node's alone.
        provd_store::check_private(&data, config.policy.hypervisor_access.as_ref().map(|a| a.gid))?;
        let store = Arc::new({
            let data = data.clone();
            blocking(move || Store::open(&data).map_err(OpenError::from)).await?
        });
        if let Some(access) = &config.policy.hypervisor_access {
            provd_vm::prepare_handover(access, &data).map_err(OpenError::Hypervisor)?;
        }
        // Before anything is rolled back: an interrupted operation may have
        // defined or started domains, which must not outlive its disks.
        if let Some(libvirt) = config.libvirt.clone() {
            blocking(move || libvirt.reachable().map_err(OpenError::Libvirt)).await?;
        }
        let settled = {
            let store = store.clone();
            blocking(move || crate::repack::recover(&store).map_err(OpenError::from)).await?
        };
        if settled > 0 {
            tracing::warn!(moves = settled, "settled repack moves interrupted by a stop");
        }
        let recovered = {
            let store = store.clone();
            let libvirt = config.libvirt.clone();
            blocking(move || Operations::recover(&store, libvirt.as_ref()).map_err(OpenError::from))
                .await?
        };
        if recovered > 0 {
            tracing::warn!(operations = recovered, "rolled back operations interrupted by a stop");
        }
        let undone = {
            let store = store.clone();
            blocking(move || {
                provd_vm::recover_customizations(&store, |op| {
                    let rec = store.operation(op).map_err(provd_vm::VmError::from)?;
                    Ok(rec.is_some_and(|r| r.state == provd_store::OpState::Succeeded))
                })
                .map_err(OpenError::from)
            })
            .await?
        };
        if !undone.is_empty() {
            tracing::warn!(vms = ?undone, "undid customisations of operations interrupted by a stop");
        }
        let mut trusted = Vec::new();
        for path in &config.trusted_keys {
            trusted.push(
                PublicKey::read_file(path)
                    .map_err(|source| OpenError::Key { path: path.clone(), source })?,
            );
        }
        // Local images only beneath the roots the policy's patterns name,
        // never through a symbolic link past them.
        let local = provd_images::LocalSources::from_patterns(&config.policy.image_sources);
        let images = Arc::new(
            provd_images::Images::new(
                store.clone(),
                provd_images::ImportLimits::default(),
                PARALLEL_IMPORTS,
            )
            .with_local_sources(local),
        );
        let engine = provd_host::engine(
            EngineConfig {
                policy: config.policy,
                cache_dir: Some(data.join("cache")),
                ..EngineConfig::default()
            },
            Some(images),
        )?;
        let mut node = Node::new(engine, store.clone(), trusted);
        if let Some(libvirt) = config.libvirt.clone() {
            node = node.with_libvirt(libvirt, config.start_vms);
        }
        let node = Arc::new(node);
        let ops = Operations::new(
            node.clone(),
            store.clone(),
            meter,
            config.max_running_operations,
            config.max_queued_operations,
            (config.keep_operations, config.keep_audit_rows),
        );
        Ok(Opened { node, store, ops })
    }
}
