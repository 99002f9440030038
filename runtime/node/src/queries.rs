//! What the node answers about itself, as the API's types: bundles,
//! operations, VMs, images, capacity, layers and their files, the audit
//! trail. Each reads the store once and may block: callers on an async
//! runtime run them on a blocking thread.

use provd_domain::NodeCapacity;
use provd_store::{AuditQuery, LayerUsage, NewAudit, OpState, OperationRecord, StoreError};
use provd_wire as wire;
use serde_json::Value;

use crate::Node;
use crate::operations::Snapshot;

/// Separates the actor from the key in a stored idempotency key; a
/// control character, which neither may contain.
const KEY_SCOPE: char = '\u{1f}';

/// The idempotency key `key` of `actor` as stored: each manager's keys are
/// its own, so another manager's same key names another operation.
pub fn scoped_key(actor: &str, key: &str) -> String {
    format!("{actor}{KEY_SCOPE}{key}")
}

/// The key as its manager sent it, without the actor's scope.
pub fn unscoped(key: &str) -> &str {
    key.split_once(KEY_SCOPE).map_or(key, |(_, k)| k)
}

pub fn wire_state(s: OpState) -> wire::OperationState {
    match s {
        OpState::Running => wire::OperationState::Running,
        OpState::Succeeded => wire::OperationState::Succeeded,
        OpState::Failed => wire::OperationState::Failed,
        OpState::Cancelled => wire::OperationState::Cancelled,
    }
}

/// A running operation's progress as its event stream carries it.
pub fn progress(s: &Snapshot) -> wire::Progress {
    wire::Progress {
        seq: s.seq,
        state: wire_state(s.state),
        phase: s.phase.clone(),
        done: s.done,
        total: s.total,
    }
}

/// An operation as the API gives it: its record, with the live progress
/// of `live` while it runs.
pub fn operation(rec: &OperationRecord, live: Option<&Snapshot>) -> wire::Operation {
    let mut op = wire::Operation {
        id: rec.id.clone(),
        idempotency_key: rec.idempotency_key.as_deref().map(|k| unscoped(k).to_string()),
        plugin: rec.plugin.clone(),
        version: rec.version.clone(),
        actor: rec.actor.clone(),
        state: wire_state(rec.state),
        phase: rec.phase.clone(),
        done: rec.done,
        total: rec.total,
        report: rec
            .report
            .as_ref()
            .map(|r| serde_json::from_str(r).unwrap_or(Value::String(r.clone()))),
        error: rec
            .error_code
            .as_ref()
            .map(|code| wire::OperationFailure { code: code.clone(), message: rec.error.clone() }),
        vms: rec.vms.clone(),
        created_at: rec.created_at,
        finished_at: rec.finished_at,
        seq: None,
    };
    if let Some(s) = live {
        op.phase = s.phase.clone();
        op.done = Some(s.done);
        op.total = s.total;
        op.seq = Some(s.seq);
    }
    op
}

fn resources(r: &provd_store::Resources) -> wire::Resources {
    wire::Resources { vcpus: r.vcpus, memory_mib: r.memory_mib, disk_bytes: r.disk_bytes }
}

fn vm(v: &provd_store::VmRecord) -> wire::Vm {
    wire::Vm {
        name: v.name.clone(),
        operation: v.operation.clone(),
        macs: v.macs.clone(),
        reserved: resources(&v.reserved),
        created_at: v.created_at,
        spec: serde_json::from_str::<Value>(&v.spec).unwrap_or(Value::String(v.spec.clone())),
        partitions: None,
        state: None,
    }
}

impl Node {
    /// `vms` with their domains' states, read over one connection, on a
    /// node that hands VMs to libvirt.
    fn with_states(&self, mut vms: Vec<wire::Vm>) -> Vec<wire::Vm> {
        let Some(libvirt) = self.libvirt() else { return vms };
        // Only libvirt VMs have a domain.
        let mut ours: Vec<&mut wire::Vm> = vms
            .iter_mut()
            .filter(|v| v.spec.get("hypervisor").and_then(Value::as_str) == Some("libvirt"))
            .collect();
        let names: Vec<&str> = ours.iter().map(|v| v.name.as_str()).collect();
        let states = libvirt.states(&names).map_err(|e| {
            tracing::warn!(error = %e, "reading the domains' states");
        });
        for (i, v) in ours.iter_mut().enumerate() {
            v.state = Some(match states.as_ref().map(|s| s.get(i).copied().flatten()) {
                Ok(Some(s)) => s.as_str().to_string(),
                Ok(None) => "undefined".to_string(),
                Err(()) => "unknown".to_string(),
            });
        }
        vms
    }

    /// The accepted bundles, by name, then acceptance time.
    pub fn bundles(&self) -> Result<wire::BundleList, StoreError> {
        let bundles = self
            .store()
            .bundles()?
            .into_iter()
            .map(|b| wire::Bundle {
                name: b.name,
                version: b.version,
                digest: b.digest,
                signer: b.signer,
                active: b.active,
                accepted_at: b.accepted_at,
                expires: b.expires,
                grant: b.grant,
                manifest: b.manifest,
            })
            .collect();
        Ok(wire::BundleList { bundles })
    }

    /// The newest operations, `state` only when given.
    pub fn operations(
        &self,
        state: Option<OpState>,
        limit: u32,
    ) -> Result<wire::OperationList, StoreError> {
        let ops = self.store().operations(state, limit)?;
        Ok(wire::OperationList { operations: ops.iter().map(|o| operation(o, None)).collect() })
    }

    /// Every VM and what they reserve together.
    pub fn vms(&self) -> Result<wire::VmList, StoreError> {
        let store = self.store();
        let vms = self.with_states(store.vms()?.iter().map(vm).collect());
        Ok(wire::VmList { vms, reserved: resources(&store.reserved()?) })
    }

    /// VM `name` with its partitions.
    pub fn vm(&self, name: &str) -> Result<Option<wire::Vm>, StoreError> {
        let store = self.store();
        let Some(rec) = store.vm(name)? else { return Ok(None) };
        let Some(mut out) = self.with_states(vec![vm(&rec)]).pop() else { return Ok(None) };
        out.partitions = Some(
            store
                .partitions_of_vm(name)?
                .into_iter()
                .map(|p| wire::VmPartition {
                    id: p.id,
                    role: p.role.to_string(),
                    format: p.format.to_string(),
                    bytes: p.bytes,
                })
                .collect(),
        );
        Ok(Some(out))
    }

    /// The images the node holds.
    pub fn images(&self) -> Result<wire::ImageList, StoreError> {
        let in_use = self.images_in_use()?;
        let images = self
            .store()
            .images()?
            .into_iter()
            .map(|i| wire::Image {
                in_use: in_use.contains(&i.reference),
                reference: i.reference,
                digest: i.digest,
                source: i.source,
                source_digest: i.source_digest,
                entries: i.entries,
                files: i.files,
                bytes: i.bytes,
                created_at: i.created_at,
                used_at: i.used_at,
            })
            .collect();
        Ok(wire::ImageList { images })
    }

    /// What the node can still give VMs: `capacity` (over-commit applied),
    /// what VMs reserve, and the data directory's free space beyond the
    /// reserve.
    pub fn capacity(&self, capacity: &NodeCapacity) -> Result<wire::Capacity, StoreError> {
        let store = self.store();
        let fs_free = store.free_bytes()?.saturating_sub(store.min_free_bytes);
        let reserved = store.reserved()?;
        let vms = store.vms()?.len() as u64;
        let total = provd_vm::capacity_of(capacity);
        let part =
            |t: u64, r: u64| wire::Headroom { total: t, reserved: r, free: t.saturating_sub(r) };
        Ok(wire::Capacity {
            vcpus: part(total.vcpus, reserved.vcpus),
            memory_mib: part(total.memory_mib, reserved.memory_mib),
            disk_bytes: wire::DiskHeadroom {
                total: total.disk_bytes,
                reserved: reserved.disk_bytes,
                free: total.disk_bytes.saturating_sub(reserved.disk_bytes).min(fs_free),
                filesystem_free: fs_free,
            },
            vms,
        })
    }

    /// A page of the layers new VMs may stack, ordered by partition and
    /// name, after `(partition, layer)` when given.
    pub fn layers(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<wire::LayerPage, StoreError> {
        let mut layers = self.store().layers(true)?;
        layers.sort_by(|a, b| (&a.partition, &a.name).cmp(&(&b.partition, &b.name)));
        let total = layers.len();
        let start = match &after {
            Some((p, l)) => layers.partition_point(|x| (&x.partition, &x.name) <= (p, l)),
            None => 0,
        };
        let page: Vec<&provd_store::LayerRecord> = layers.iter().skip(start).take(limit).collect();
        let next = if start + page.len() < total {
            page.last().map(|l| format!("{}/{}", l.partition, l.name))
        } else {
            None
        };
        let layers = page
            .iter()
            .map(|l| wire::Layer {
                partition: l.partition.clone(),
                layer: l.name.clone(),
                digest: l.digest.clone(),
                files: l.files,
                bytes: l.bytes,
                format: l.format.to_string(),
                vms: l.vms.clone(),
                domain: l.domain.clone(),
            })
            .collect();
        Ok(wire::LayerPage { layers, total: total as u64, next })
    }

    /// A page of a layer's regular files, `None` when the node does not
    /// offer that layer.
    pub fn layer_files(
        &self,
        partition: &str,
        layer: &str,
        after: u64,
        limit: u32,
    ) -> Result<Option<wire::EntryPage>, StoreError> {
        let store = self.store();
        if !store.layers(true)?.iter().any(|x| x.partition == partition && x.name == layer) {
            return Ok(None);
        }
        let (files, total) = store.layer_files_page(partition, layer, after, limit)?;
        let entries: Vec<wire::LayerFile> = files
            .iter()
            .map(|e| wire::LayerFile {
                path: e.path.clone(),
                size: e.size,
                blake3: e.hash.map(|h| h.to_hex()).unwrap_or_default(),
            })
            .collect();
        let end = after.saturating_add(entries.len() as u64);
        Ok(Some(wire::EntryPage { entries, total, next: (end < total).then_some(end) }))
    }

    /// Entries of the audit trail, oldest first.
    pub fn audit(&self, query: &AuditQuery) -> Result<wire::AuditList, StoreError> {
        let audit = self
            .store()
            .audit(query)?
            .into_iter()
            .map(|r| wire::AuditEntry {
                id: r.id,
                at: r.at,
                actor: r.actor,
                kind: r.kind,
                plugin: r.plugin,
                version: r.version,
                operation: r.operation,
                interface: r.interface,
                function: r.function,
                args: r.args,
                outcome: r.outcome,
                detail: r.detail,
                count: r.count,
            })
            .collect();
        Ok(wire::AuditList { audit })
    }
}

impl Node {
    /// Whether the node can read its records.
    pub fn healthy(&self) -> Result<(), StoreError> {
        self.store().check_readable()
    }

    /// What the store holds, by kind, for metrics.
    pub fn store_sizes(&self) -> Result<provd_store::Sizes, StoreError> {
        self.store().sizes()
    }

    /// What the layers hold and save, for metrics.
    pub fn layer_usage(&self) -> Result<LayerUsage, StoreError> {
        self.store().layer_usage()
    }

    /// Operation `id` as recorded.
    pub fn operation_record(&self, id: &str) -> Result<Option<OperationRecord>, StoreError> {
        self.store().operation(id)
    }

    /// Whether a VM called `name` is configured.
    pub fn has_vm(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.store().vm(name)?.is_some())
    }

    /// The names of every configured VM.
    pub fn vm_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.store().vms()?.into_iter().map(|v| v.name).collect())
    }

    /// Appends rows to the audit trail.
    pub fn append_audit(&self, rows: &[NewAudit]) -> Result<(), StoreError> {
        self.store().append_audit(rows)
    }

    /// What of `spec` the node's bounds on host networks and boot files do
    /// not allow; empty when it is within them.
    pub fn beyond_policy(&self, spec: &provd_vm::spec::VmSpec) -> Vec<String> {
        provd_vm::spec::beyond_node(spec, &self.engine().policy().vm_allow)
    }
}
