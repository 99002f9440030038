//! Node policy and the grant a manifest receives under it.

use std::fmt;
use std::time::Duration;

use crate::capability::{
    Capability, HYPERVISORS, HashingGrant, ImagesGrant, LogGrant, PartitionsGrant, VmGrant,
};
use crate::manifest::Manifest;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// The ceilings a node puts on every plugin, and the defaults a plugin gets
/// when its manifest is silent.
///
/// Every number here bounds something a plugin controls; the defaults are
/// chosen so that a node of modest size can run many plugins at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePolicy {
    /// Largest instance-wide memory total any plugin may ask for.
    pub max_memory_bytes: u64,
    /// Memory total a plugin gets when its manifest does not ask.
    pub default_memory_bytes: u64,
    /// Longest deadline any plugin may ask for.
    pub max_timeout: Duration,
    /// Deadline a plugin gets when its manifest does not ask.
    pub default_timeout: Duration,
    /// WebAssembly stack every plugin runs with. Wasmtime sets the stack per
    /// engine, not per store, so it is a node setting; plugins declaring a
    /// larger need are refused.
    pub wasm_stack_bytes: u64,
    /// Core instances per store. A Rust component with the WASI adapter uses
    /// a handful; a bound stops a component from instantiating without end.
    pub max_instances: u32,
    /// Tables per store.
    pub max_tables: u32,
    /// Elements of any one table.
    pub max_table_elements: u64,
    /// Linear memories per store.
    pub max_memories: u32,
    /// Largest component accepted for compilation. Compilation time and
    /// memory grow with size and are not bounded by wasmtime itself.
    pub max_component_bytes: u64,
    /// Longest a compilation may take.
    pub compile_timeout: Duration,
    /// Bytes a guest may pass to the host in one host call (wasmtime's
    /// hostcall fuel). Stops a guest from making the host allocate without
    /// bound (GHSA-852m-cvvp-9p4w).
    pub max_hostcall_bytes: u64,
    /// Live resource handles per store.
    pub max_handles: u32,
    /// Largest log budget a plugin may ask for, and the default.
    pub max_log_bytes: u64,
    pub default_log_bytes: u64,
    /// Largest hashing input a plugin may ask for, and the default.
    pub max_hash_input_bytes: u64,
    pub default_hash_input_bytes: u64,
    /// Plugin invocations running at once on this node.
    pub max_concurrent_invocations: u32,
    /// Image reference patterns any plugin may fetch from; a plugin's own
    /// patterns narrow this further. Empty: no plugin fetches images.
    pub image_sources: Vec<String>,
    /// Image reference patterns of the provider's public catalogue
    /// (`[sharing] public-images`): their layers may be shared by VMs of
    /// every tenant. Any other image belongs to the tenant of the VM that
    /// names it (see [`crate::trust`]). Empty: no image is public.
    pub public_images: Vec<String>,
    /// Largest `read-file` any plugin may ask for, and the default.
    pub max_image_read_bytes: u64,
    pub default_image_read_bytes: u64,
    /// Largest partition quota (bytes guests see, per request) any plugin
    /// may ask for, and the default.
    pub max_partition_bytes: u64,
    pub default_partition_bytes: u64,
    /// Largest VM any plugin may configure.
    pub max_vm_vcpus: u32,
    pub max_vm_memory_mib: u64,
    /// Hypervisors this node runs; plugins may configure VMs for these only.
    pub hypervisors: Vec<String>,
    /// What the node has for VMs, and how far it may be over-committed.
    pub capacity: NodeCapacity,
    /// The host networks and boot files VMs may use, whoever asks.
    pub vm_allow: VmAllow,
    /// How the node's QEMU runs the libvirt domains provd renders.
    pub machine: Machine,
    /// Whom the hypervisor runs VMs as, when not as provd's own user: their
    /// files are then handed to it through a folder of its own.
    pub hypervisor_access: Option<HypervisorAccess>,
    /// How shared partitions reach guests (`[policy] shared-attach`,
    /// `[sharing] share-public-memory`).
    pub sharing: crate::attach::SharingPolicy,
}

/// A hypervisor that runs VMs as a user of its own (libvirt's QEMU as
/// `libvirt-qemu`): each VM's files are linked into `<dir>/<vm>/`, a
/// folder that user's group may only traverse, owned so that the group
/// reads what the VM reads and writes only the VM's own disks. The data
/// directory stays the node's alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HypervisorAccess {
    pub uid: u32,
    pub gid: u32,
    /// On the data directory's filesystem (the files are hard links).
    pub dir: std::path::PathBuf,
}

/// libvirt's domain type: how QEMU runs a guest's CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainType {
    /// Hardware virtualisation through `/dev/kvm`.
    #[default]
    Kvm,
    /// Emulation (TCG): slower, and runs where KVM cannot.
    Qemu,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

/// The CPU a guest is given (libvirt's `<cpu mode>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuMode {
    /// The host's own CPU, every feature of it: KVM only.
    HostPassthrough,
    /// A named model close to the host's, so a guest can migrate between
    /// hosts of one model: KVM only.
    HostModel,
    /// Every feature the hypervisor can give: under emulation, QEMU's `max`
    /// model, which has the x86-64-v2 features current distributions need
    /// and QEMU's default `qemu64` lacks.
    Maximum,
}

impl CpuMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CpuMode::HostPassthrough => "host-passthrough",
            CpuMode::HostModel => "host-model",
            CpuMode::Maximum => "maximum",
        }
    }
}

/// How the node's QEMU runs VMs: the domain type and CPU mode of every
/// libvirt domain provd renders (`[hypervisor]` of `provd.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    pub domain_type: DomainType,
    pub cpu_mode: CpuMode,
}

impl Machine {
    /// `domain_type` with `cpu_mode`, or the mode that runs under it when
    /// none is given: the host's CPU under KVM, the most QEMU can emulate
    /// otherwise. A host CPU mode under emulation is refused: libvirt
    /// would refuse to start every domain.
    pub fn new(domain_type: DomainType, cpu_mode: Option<CpuMode>) -> Result<Machine, String> {
        let cpu_mode = cpu_mode.unwrap_or(match domain_type {
            DomainType::Kvm => CpuMode::HostPassthrough,
            DomainType::Qemu => CpuMode::Maximum,
        });
        if domain_type == DomainType::Qemu && cpu_mode != CpuMode::Maximum {
            return Err(format!(
                "cpu-mode {:?} needs domain-type \"kvm\"; under \"qemu\" use \"maximum\"",
                cpu_mode.as_str()
            ));
        }
        Ok(Machine { domain_type, cpu_mode })
    }
}

impl Default for Machine {
    /// KVM with the host's CPU, as a node with hardware virtualisation
    /// runs its VMs.
    fn default() -> Self {
        Machine { domain_type: DomainType::Kvm, cpu_mode: CpuMode::HostPassthrough }
    }
}

/// What of the host a VM spec may name, as patterns: `*` matches any run
/// of characters (bridge and tap names, command lines), and boot paths
/// (relative to the node's `boot/` folder) match by component as image
/// patterns do. Empty, the default: a VM joins no host network and boots
/// no kernel of the node's; firmware boot from its own disk needs nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmAllow {
    /// Host bridges a NIC may join.
    pub bridges: Vec<String>,
    /// Existing host tap devices a NIC may use.
    pub taps: Vec<String>,
    /// Kernels and initramfs images under `boot/` a VM may boot.
    pub boot_files: Vec<String>,
    /// Kernel command lines a VM may pass.
    pub cmdlines: Vec<String>,
}

/// A node's resources for VMs. Reservations of all VMs together stay
/// within `amount × overcommit-percent / 100` of each. In a configuration
/// file (`[capacity]` of `provd.toml`) every key is optional and unknown
/// keys are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeCapacity {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    pub cpu_overcommit_percent: u32,
    pub memory_overcommit_percent: u32,
    pub disk_overcommit_percent: u32,
}

impl Default for NodeCapacity {
    /// Nothing: a node must say what it offers before any VM fits.
    fn default() -> Self {
        NodeCapacity {
            vcpus: 0,
            memory_mib: 0,
            disk_bytes: 0,
            cpu_overcommit_percent: 100,
            memory_overcommit_percent: 100,
            disk_overcommit_percent: 100,
        }
    }
}

impl NodeCapacity {
    /// The totals reservations may reach: (vCPUs, MiB, bytes).
    pub fn effective(&self) -> (u64, u64, u64) {
        let scale = |v: u64, pct: u32| {
            u64::try_from(u128::from(v) * u128::from(pct) / 100).unwrap_or(u64::MAX)
        };
        (
            scale(self.vcpus, self.cpu_overcommit_percent),
            scale(self.memory_mib, self.memory_overcommit_percent),
            scale(self.disk_bytes, self.disk_overcommit_percent),
        )
    }
}

impl Default for NodePolicy {
    fn default() -> Self {
        NodePolicy {
            max_memory_bytes: 1024 * MIB,
            default_memory_bytes: 64 * MIB,
            max_timeout: Duration::from_secs(600),
            default_timeout: Duration::from_secs(30),
            wasm_stack_bytes: 512 * KIB,
            max_instances: 64,
            max_tables: 16,
            max_table_elements: 100_000,
            max_memories: 8,
            max_component_bytes: 64 * MIB,
            compile_timeout: Duration::from_secs(120),
            max_hostcall_bytes: 128 * MIB,
            max_handles: 1_000,
            max_log_bytes: 16 * MIB,
            default_log_bytes: MIB,
            max_hash_input_bytes: 128 * MIB,
            default_hash_input_bytes: 16 * MIB,
            max_concurrent_invocations: 64,
            image_sources: Vec::new(),
            public_images: Vec::new(),
            max_image_read_bytes: 64 * MIB,
            default_image_read_bytes: MIB,
            max_partition_bytes: 1024 * 1024 * MIB,
            default_partition_bytes: 64 * 1024 * MIB,
            max_vm_vcpus: 64,
            max_vm_memory_mib: 256 * 1024,
            hypervisors: HYPERVISORS.iter().map(|h| h.to_string()).collect(),
            capacity: NodeCapacity::default(),
            vm_allow: VmAllow::default(),
            machine: Machine::default(),
            hypervisor_access: None,
            sharing: crate::attach::SharingPolicy::default(),
        }
    }
}

/// The exact limits one plugin runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub timeout: Duration,
    pub instances: u32,
    pub tables: u32,
    pub table_elements: u64,
    pub memories: u32,
}

/// The capabilities one plugin was granted, with their parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapabilityGrants {
    pub log: Option<LogGrant>,
    pub progress: bool,
    pub hashing: Option<HashingGrant>,
    pub images: Option<ImagesGrant>,
    pub dedup: bool,
    pub partitions: Option<PartitionsGrant>,
    pub vm: Option<VmGrant>,
}

impl CapabilityGrants {
    /// Whether `capability` is granted.
    pub fn allows(&self, capability: Capability) -> bool {
        match capability {
            Capability::Log => self.log.is_some(),
            Capability::Progress => self.progress,
            Capability::Hashing => self.hashing.is_some(),
            Capability::Images => self.images.is_some(),
            Capability::Dedup => self.dedup,
            Capability::Partitions => self.partitions.is_some(),
            Capability::Vm => self.vm.is_some(),
        }
    }
}

/// A manifest checked against a node policy: what one plugin may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub capabilities: CapabilityGrants,
    pub limits: Limits,
}

/// One request of a manifest that exceeds the node's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyViolation {
    /// The manifest field, e.g. `limits.memory-mib`.
    pub field: &'static str,
    pub requested: u64,
    pub allowed: u64,
    /// A value the node does not offer at all (a name, not a number).
    pub refused: Option<String>,
}

impl fmt::Display for PolicyViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.refused {
            Some(value) => {
                write!(f, "{} includes {value:?}, which this node does not offer", self.field)
            }
            None => {
                write!(f, "{} = {} exceeds the node's {}", self.field, self.requested, self.allowed)
            }
        }
    }
}

/// Every request of a manifest that exceeds the node's policy, so that the
/// author can fix them all at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin {plugin} asks for more than this node allows: {}", list(.violations))]
pub struct PolicyViolations {
    pub plugin: String,
    pub violations: Vec<PolicyViolation>,
}

fn list(violations: &[PolicyViolation]) -> String {
    violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

impl Manifest {
    /// Checks this manifest against `policy` and returns what the plugin may
    /// do. Any request beyond a ceiling refuses the whole grant: a plugin
    /// never runs with less than it declared it needs.
    pub fn grant(&self, policy: &NodePolicy) -> Result<Grant, PolicyViolations> {
        let mut violations = Vec::new();
        let mut hypervisor_refused: Vec<String> = Vec::new();
        let mut check =
            |field: &'static str, requested: Option<u64>, allowed: u64, default: u64| {
                let value = requested.unwrap_or(default);
                if value > allowed {
                    violations.push(PolicyViolation {
                        field,
                        requested: value,
                        allowed,
                        refused: None,
                    });
                }
                value.min(allowed)
            };
        let l = &self.limits;
        let p = policy;
        let memory_mib = check(
            "limits.memory-mib",
            l.memory_mib,
            p.max_memory_bytes / MIB,
            p.default_memory_bytes / MIB,
        );
        let max_timeout_ms = u64::try_from(p.max_timeout.as_millis()).unwrap_or(u64::MAX);
        let default_timeout_ms = u64::try_from(p.default_timeout.as_millis()).unwrap_or(u64::MAX);
        let timeout_ms =
            check("limits.timeout-ms", l.timeout_ms, max_timeout_ms, default_timeout_ms);
        let stack_kib = p.wasm_stack_bytes / KIB;
        check("limits.stack-kib", l.stack_kib, stack_kib, stack_kib);
        let instances = check(
            "limits.instances",
            l.instances.map(u64::from),
            u64::from(p.max_instances),
            u64::from(p.max_instances),
        );
        let tables = check(
            "limits.tables",
            l.tables.map(u64::from),
            u64::from(p.max_tables),
            u64::from(p.max_tables),
        );
        let table_elements = check(
            "limits.table-elements",
            l.table_elements,
            p.max_table_elements,
            p.max_table_elements,
        );
        let memories = check(
            "limits.memories",
            l.memories.map(u64::from),
            u64::from(p.max_memories),
            u64::from(p.max_memories),
        );

        let c = &self.capabilities;
        let log = c.log.as_ref().map(|r| LogGrant {
            max_bytes: check(
                "capabilities.log.max-bytes",
                r.max_bytes,
                p.max_log_bytes,
                p.default_log_bytes,
            ),
        });
        let hashing = c.hashing.as_ref().map(|r| HashingGrant {
            max_input_bytes: check(
                "capabilities.hashing.max-input-bytes",
                r.max_input_bytes,
                p.max_hash_input_bytes,
                p.default_hash_input_bytes,
            ),
        });

        let images = c.images.as_ref().map(|r| ImagesGrant {
            sources: r.sources.clone(),
            max_read_bytes: check(
                "capabilities.images.max-read-bytes",
                r.max_read_bytes,
                p.max_image_read_bytes,
                p.default_image_read_bytes,
            ),
        });

        let partitions = c.partitions.as_ref().map(|r| PartitionsGrant {
            max_bytes: check(
                "capabilities.partitions.max-bytes",
                r.max_bytes,
                p.max_partition_bytes,
                p.default_partition_bytes,
            ),
        });

        let mut vm = None;
        if let Some(r) = &c.vm {
            let max_vcpus = check(
                "capabilities.vm.max-vcpus",
                r.max_vcpus.map(u64::from),
                u64::from(p.max_vm_vcpus),
                u64::from(p.max_vm_vcpus),
            );
            let max_memory_mib = check(
                "capabilities.vm.max-memory-mib",
                r.max_memory_mib,
                p.max_vm_memory_mib,
                p.max_vm_memory_mib,
            );
            let hypervisors = r.hypervisors.clone().unwrap_or_else(|| p.hypervisors.clone());
            for h in &hypervisors {
                if !p.hypervisors.contains(h) {
                    hypervisor_refused.push(h.clone());
                }
            }
            vm = Some(VmGrant {
                max_vcpus: u32::try_from(max_vcpus).unwrap_or(u32::MAX),
                max_memory_mib,
                hypervisors,
                may_set: r.may_set.clone(),
            });
        }

        violations.extend(hypervisor_refused.into_iter().map(|h| PolicyViolation {
            field: "capabilities.vm.hypervisors",
            requested: 0,
            allowed: 0,
            refused: Some(h),
        }));
        if !violations.is_empty() {
            return Err(PolicyViolations { plugin: self.name.clone(), violations });
        }
        // The values below were all checked against u32 ceilings above.
        let narrow = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        Ok(Grant {
            capabilities: CapabilityGrants {
                log,
                progress: c.progress.is_some(),
                hashing,
                images,
                dedup: c.dedup.is_some(),
                partitions,
                vm,
            },
            limits: Limits {
                memory_bytes: memory_mib * MIB,
                timeout: Duration::from_millis(timeout_ms),
                instances: narrow(instances),
                tables: narrow(tables),
                table_elements,
                memories: narrow(memories),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(extra: &str) -> Manifest {
        Manifest::from_toml(&format!("name = \"p\"\nversion = \"1.0.0\"\n{extra}")).unwrap()
    }

    #[test]
    fn silent_manifest_gets_defaults_and_no_capabilities() {
        let policy = NodePolicy::default();
        let grant = manifest("").grant(&policy).unwrap();
        assert_eq!(grant.limits.memory_bytes, policy.default_memory_bytes);
        assert_eq!(grant.limits.timeout, policy.default_timeout);
        assert_eq!(grant.capabilities, CapabilityGrants::default());
        for c in Capability::ALL {
            assert!(!grant.capabilities.allows(c));
        }
    }

    #[test]
    fn every_excess_is_listed() {
        let m = manifest(
            "[capabilities.log]\nmax-bytes = 999999999999\n\
             [limits]\nmemory-mib = 100000\ntimeout-ms = 5\nstack-kib = 99999\n",
        );
        let err = m.grant(&NodePolicy::default()).unwrap_err();
        let fields: Vec<_> = err.violations.iter().map(|v| v.field).collect();
        assert_eq!(fields, ["limits.memory-mib", "limits.stack-kib", "capabilities.log.max-bytes"]);
        let text = err.to_string();
        assert!(text.contains("limits.memory-mib = 100000 exceeds the node's 1024"), "{text}");
    }

    #[test]
    fn requested_capabilities_are_granted_with_parameters() {
        let m =
            manifest("[capabilities.hashing]\nmax-input-bytes = 1000\n[capabilities.progress]\n");
        let grant = m.grant(&NodePolicy::default()).unwrap();
        assert_eq!(grant.capabilities.hashing, Some(HashingGrant { max_input_bytes: 1000 }));
        assert!(grant.capabilities.progress);
        assert!(grant.capabilities.log.is_none());
    }
}
