//! `provd.toml`: what a node serves, whom it trusts and what it allows.
//!
//! Unknown keys are refused at every level, so a misspelt limit is an error
//! rather than a silently ignored default. Relative paths are taken from the
//! directory of the configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use provd_node::policy::{
    CpuMode, DomainType, HypervisorAccess, Machine, NodeCapacity, NodePolicy,
};
use serde::Deserialize;

const MIB: u64 = 1 << 20;

/// The daemon's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// The node's data directory (store, partitions, VMs, artifact cache).
    pub data_dir: PathBuf,
    /// TCP address of the mutual-TLS API.
    pub listen: SocketAddr,
    /// A unix socket for local administration, without TLS; access is the
    /// socket's file permissions (0600, owner only).
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    pub tls: TlsConfig,
    /// Public keys (`provctl keygen` `.pub` files) whose bundle
    /// signatures this node trusts.
    pub trusted_keys: Vec<PathBuf>,
    #[serde(default)]
    pub limits: HttpLimits,
    #[serde(default)]
    pub policy: PolicyConfig,
    /// What the node can give VMs; zero (the default) means nothing fits,
    /// over-commit is a percentage (100, none, by default).
    #[serde(default)]
    pub capacity: NodeCapacity,
    /// Which manager certificates hold which role; none by default
    /// (`access.rs`).
    #[serde(default)]
    pub access: crate::access::AccessConfig,
    /// What VMs of different tenants may share.
    #[serde(default)]
    pub sharing: SharingConfig,
    /// How the node's hypervisor runs VMs.
    #[serde(default)]
    pub hypervisor: HypervisorConfig,
    /// When unused images are collected.
    #[serde(default)]
    pub images: ImagesConfig,
    /// Whether `/metrics` is served and figures kept.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// How the daemon writes its log.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[images]`: the collection of images no VM and no running operation
/// uses. Without `max-age-secs` and `max-bytes`, a collection removes only
/// object files nothing references.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ImagesConfig {
    /// Unused images not fetched for this many seconds are removed.
    pub max_age_secs: Option<u64>,
    /// Unused images are removed, least recently used first, until the
    /// store's object files take at most this many bytes.
    pub max_bytes: Option<u64>,
    /// Seconds between scheduled collections; 0 runs none (`POST /v1/gc`
    /// still does).
    pub gc_interval_secs: u64,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig { max_age_secs: None, max_bytes: None, gc_interval_secs: 3600 }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetricsConfig {
    /// Off: `/metrics` answers 404 and no figure is kept.
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogConfig {
    pub format: LogFormat,
}

/// `text` (the default: one line a reader follows) or `json` (one object
/// per line, for a log pipeline).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[hypervisor]`: how the node's QEMU runs the libvirt domains provd
/// renders.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HypervisorConfig {
    /// `"kvm"` (the default) or `"qemu"` (emulation, where KVM cannot run).
    #[serde(default)]
    pub domain_type: DomainType,
    /// `"host-passthrough"`, `"host-model"` or `"maximum"`; by default the
    /// host's CPU under KVM and the most QEMU emulates under `"qemu"`.
    #[serde(default)]
    pub cpu_mode: Option<CpuMode>,
    /// The user and group libvirt's QEMU runs VMs as (Debian's:
    /// `libvirt-qemu`); with `vm-dir`, each VM's files are handed to them
    /// there. All three or none.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub vm_dir: Option<PathBuf>,
    /// Resolved from `domain-type` and `cpu-mode` when the file is read.
    #[serde(skip)]
    pub machine: Machine,
    /// Resolved from `user`, `group` and `vm-dir` when the file is read.
    #[serde(skip)]
    pub access: Option<HypervisorAccess>,
    /// The node's libvirtd (`qemu:///system`): when set, provd defines each
    /// libvirt VM an operation configures there (the operation fails and is
    /// rolled back if it cannot), removes it with the VM, refuses to repack
    /// a running one, and reports its state.
    #[serde(default)]
    pub libvirt_uri: Option<String>,
    /// Whether VMs handed to libvirt are started at once.
    #[serde(default)]
    pub start: bool,
    /// The Firecracker release the node runs its Firecracker VMs with
    /// (`"1.14.0"`): from 1.14 on their shared partitions may be persistent
    /// memory. Unset: their shared partitions are disks.
    #[serde(default)]
    pub firecracker_version: Option<String>,
}

/// The user and group named in `[hypervisor]`, and the folder, as the
/// node's policy takes them.
fn hypervisor_access(h: &HypervisorConfig) -> Result<Option<HypervisorAccess>, String> {
    let (user, group, dir) = match (&h.user, &h.group, &h.vm_dir) {
        (None, None, None) => return Ok(None),
        (Some(u), Some(g), Some(d)) => (u, g, d),
        _ => return Err("user, group and vm-dir are set together or not at all".into()),
    };
    let uid = nix::unistd::User::from_name(user)
        .map_err(|e| format!("user {user:?}: {e}"))?
        .ok_or_else(|| format!("user {user:?}: no such user on this machine"))?
        .uid
        .as_raw();
    let gid = nix::unistd::Group::from_name(group)
        .map_err(|e| format!("group {group:?}: {e}"))?
        .ok_or_else(|| format!("group {group:?}: no such group on this machine"))?
        .gid
        .as_raw();
    if uid == 0 || gid == 0 {
        return Err("the hypervisor's user and group must not be root's: VMs' files are handed \
                    to them so that QEMU runs without root"
            .into());
    }
    Ok(Some(HypervisorAccess { uid, gid, dir: dir.clone() }))
}

/// `[sharing]`: the provider's public catalogue, whose layers VMs of every
/// tenant may stack. Images matching no pattern belong to the tenant of the
/// VM that names them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SharingConfig {
    /// Image reference patterns, in the syntax of `policy.image-sources`.
    #[serde(default)]
    pub public_images: Vec<String>,
    /// Whether the public catalogue's partitions may share host pages
    /// across tenants; off by default (see `SharingPolicy`).
    #[serde(default)]
    pub share_public_memory: bool,
}

/// The server's identity and the managers it accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsConfig {
    /// PEM certificate chain of the node.
    pub cert: PathBuf,
    /// PEM private key of the node.
    pub key: PathBuf,
    /// PEM certificate(s) of the CA that signs manager certificates: a
    /// client without a certificate from it is refused in the handshake.
    pub client_ca: PathBuf,
    /// PEM certificate revocation list(s) of that CA: a revoked manager
    /// certificate fails the handshake. Read again, with the rest of
    /// `[tls]`, when provd receives SIGHUP.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// Bounds on what a remote party can make the daemon hold or wait for.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct HttpLimits {
    /// Largest bundle upload.
    pub max_bundle_bytes: u64,
    /// Largest JSON request body.
    pub max_json_bytes: u64,
    /// Time to receive a request's headers.
    pub header_timeout_secs: u64,
    /// Time one request may take (uploads and long polls included).
    pub request_timeout_secs: u64,
    /// TCP connections served at once; more are closed when accepted.
    pub max_connections: u32,
    /// Authenticated connections from one address at once.
    pub max_connections_per_address: u32,
    /// TLS handshakes in flight at once: not yet known to be managers, a
    /// new one closes the oldest over this bound.
    pub max_handshakes: u32,
    /// TLS handshakes in flight from one address; a new one closes that
    /// address's oldest over this bound.
    pub max_handshakes_per_address: u32,
    /// Time a TLS handshake may take.
    pub handshake_timeout_secs: u64,
    /// Connections on the admin socket at once, apart from the TCP ones.
    pub max_admin_connections: u32,
    /// Longest wait a long poll may ask for.
    pub max_wait_secs: u64,
    /// Operations allowed to run at once; more wait in the `queued` phase.
    pub max_running_operations: u32,
    /// Operations allowed to wait for a slot; more are refused with `busy`.
    pub max_queued_operations: u32,
    /// Finished operations kept; older ones are forgotten.
    pub keep_operations: u64,
    /// Audit rows kept; older ones are forgotten.
    pub keep_audit_rows: u64,
    /// Seconds a graceful shutdown waits for running operations before
    /// cancelling them.
    pub shutdown_grace_secs: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_bundle_bytes: 80 * MIB,
            max_json_bytes: MIB,
            header_timeout_secs: 10,
            request_timeout_secs: 120,
            max_connections: 512,
            max_connections_per_address: 256,
            max_handshakes: 512,
            max_handshakes_per_address: 128,
            handshake_timeout_secs: 3,
            max_admin_connections: 16,
            max_wait_secs: 60,
            max_running_operations: 16,
            max_queued_operations: 256,
            keep_operations: 100_000,
            keep_audit_rows: 10_000_000,
            shutdown_grace_secs: 30,
        }
    }
}

impl HttpLimits {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

/// Ceilings a bundle may be granted; unset keys keep provd's defaults
/// (`docs/security.md` lists them).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PolicyConfig {
    /// Image references plugins may fetch (glob patterns); none by default.
    pub image_sources: Option<Vec<String>>,
    pub max_memory_mib: Option<u64>,
    pub max_timeout_secs: Option<u64>,
    pub max_component_mib: Option<u64>,
    pub max_partition_bytes: Option<u64>,
    pub max_vm_vcpus: Option<u32>,
    pub max_vm_memory_mib: Option<u64>,
    pub hypervisors: Option<Vec<String>>,
    /// Host bridges VM NICs may join (`*` wildcards); none by default.
    pub vm_bridges: Option<Vec<String>>,
    /// Existing host taps VM NICs may use; none by default.
    pub vm_taps: Option<Vec<String>>,
    /// Kernels and initramfs images under `boot/` VMs may boot (image
    /// pattern syntax, relative); none by default.
    pub vm_boot_files: Option<Vec<String>>,
    /// Kernel command lines VMs may pass (`*` wildcards); none by default.
    pub vm_cmdlines: Option<Vec<String>>,
    /// How shared partitions reach guests: `pmem` (the default: persistent
    /// memory mapped with DAX where the hypervisor and the partition allow
    /// it; a VM's spec may ask for `block`) or `block` (always disks).
    pub shared_attach: Option<provd_node::policy::SharedAttach>,
}

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

impl Config {
    /// Reads and checks `path`; relative paths inside become absolute,
    /// relative to its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        // Every path the daemon keeps is absolute: a relative `--config`
        // would otherwise leave relative paths that the VM configurations
        // (which must name absolute host paths) refuse.
        let absolute = std::path::absolute(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let base = absolute.parent().unwrap_or(Path::new("/")).to_path_buf();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut config.data_dir);
        fix(&mut config.tls.cert);
        fix(&mut config.tls.key);
        fix(&mut config.tls.client_ca);
        if let Some(crl) = config.tls.crl.as_mut() {
            fix(crl);
        }
        config.trusted_keys.iter_mut().for_each(fix);
        if let Some(s) = config.admin_socket.as_mut() {
            fix(s);
        }
        if let Some(d) = config.hypervisor.vm_dir.as_mut() {
            fix(d);
        }
        let l = &config.limits;
        for (key, value) in [
            ("limits.max-connections", u64::from(l.max_connections)),
            ("limits.max-connections-per-address", u64::from(l.max_connections_per_address)),
            ("limits.max-handshakes", u64::from(l.max_handshakes)),
            ("limits.max-handshakes-per-address", u64::from(l.max_handshakes_per_address)),
            ("limits.handshake-timeout-secs", l.handshake_timeout_secs),
            ("limits.max-admin-connections", u64::from(l.max_admin_connections)),
            ("limits.max-running-operations", u64::from(l.max_running_operations)),
            ("limits.max-json-bytes", l.max_json_bytes),
            ("limits.max-bundle-bytes", l.max_bundle_bytes),
            ("limits.header-timeout-secs", l.header_timeout_secs),
            ("limits.request-timeout-secs", l.request_timeout_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::Parse {
                    path: path.display().to_string(),
                    message: format!("{key}: must be at least 1"),
                });
            }
        }
        // A year at most: an interval is added to the clock.
        if config.images.gc_interval_secs > 366 * 86_400 {
            return Err(ConfigError::Parse {
                path: path.display().to_string(),
                message: "images.gc-interval-secs: at most 31622400 (a year); 0 runs none".into(),
            });
        }
        config
            .access
            .check()
            .map_err(|message| ConfigError::Parse { path: path.display().to_string(), message })?;
        let p = &config.policy;
        for (key, list) in [
            ("policy.vm-bridges", &p.vm_bridges),
            ("policy.vm-taps", &p.vm_taps),
            ("policy.vm-boot-files", &p.vm_boot_files),
            ("policy.vm-cmdlines", &p.vm_cmdlines),
        ] {
            let list = list.as_deref().unwrap_or_default();
            let bad = list.len() > 256
                || list.iter().any(|e| {
                    e.is_empty()
                        || e.len() > provd_node::policy::MAX_PATTERN_LEN
                        || e.chars().any(char::is_control)
                        || (key == "policy.vm-boot-files"
                            && (e.starts_with('/')
                                || e.split('/').any(|c| c.is_empty() || c == "." || c == "..")))
                });
            if bad {
                return Err(ConfigError::Parse {
                    path: path.display().to_string(),
                    message: format!(
                        "{key}: at most 256 non-empty patterns without control characters \
                         (boot files relative to boot/, without `.`, `..` or empty components)"
                    ),
                });
            }
        }
        if config.sharing.public_images.len() > 256 {
            return Err(ConfigError::Parse {
                path: path.display().to_string(),
                message: "sharing.public-images: at most 256 patterns".into(),
            });
        }
        for (key, patterns) in [
            ("policy.image-sources", config.policy.image_sources.as_deref().unwrap_or_default()),
            ("sharing.public-images", config.sharing.public_images.as_slice()),
        ] {
            for pattern in patterns {
                provd_node::policy::check_pattern(pattern, provd_node::policy::MAX_PATTERN_LEN)
                    .map_err(|why| ConfigError::Parse {
                        path: path.display().to_string(),
                        message: format!("{key}: {why}"),
                    })?;
            }
        }
        config.hypervisor.machine =
            Machine::new(config.hypervisor.domain_type, config.hypervisor.cpu_mode).map_err(
                |why| ConfigError::Parse {
                    path: path.display().to_string(),
                    message: format!("hypervisor: {why}"),
                },
            )?;
        if let Some(uri) = &config.hypervisor.libvirt_uri
            && (uri.is_empty() || uri.len() > 256 || uri.chars().any(char::is_control))
        {
            return Err(ConfigError::Parse {
                path: path.display().to_string(),
                message: "hypervisor.libvirt-uri: 1 to 256 characters, no control characters"
                    .into(),
            });
        }
        if let Some(v) = &config.hypervisor.firecracker_version
            && let Err(why) = provd_node::policy::firecracker_has_pmem(v)
        {
            return Err(ConfigError::Parse {
                path: path.display().to_string(),
                message: format!("hypervisor.firecracker-version: {why}"),
            });
        }
        if config.hypervisor.start && config.hypervisor.libvirt_uri.is_none() {
            return Err(ConfigError::Parse {
                path: path.display().to_string(),
                message: "hypervisor.start: provd starts VMs only through libvirt-uri".into(),
            });
        }
        config.hypervisor.access =
            hypervisor_access(&config.hypervisor).map_err(|why| ConfigError::Parse {
                path: path.display().to_string(),
                message: format!("hypervisor: {why}"),
            })?;
        if config.trusted_keys.is_empty() {
            return Err(ConfigError::Parse {
                path: path.display().to_string(),
                message: "trusted-keys: at least one key is needed to accept any bundle".into(),
            });
        }
        Ok(config)
    }

    /// The engine's policy: provd's defaults overlaid with this file.
    pub fn node_policy(&self) -> NodePolicy {
        let mut p = NodePolicy::default();
        let c = &self.policy;
        if let Some(v) = &c.image_sources {
            p.image_sources = v.clone();
        }
        p.public_images = self.sharing.public_images.clone();
        p.sharing = provd_node::policy::SharingPolicy {
            attach: c.shared_attach.unwrap_or_default(),
            share_public_memory: self.sharing.share_public_memory,
            firecracker_pmem: self
                .hypervisor
                .firecracker_version
                .as_deref()
                .is_some_and(|v| provd_node::policy::firecracker_has_pmem(v).unwrap_or(false)),
        };
        p.vm_allow = provd_node::policy::VmAllow {
            bridges: c.vm_bridges.clone().unwrap_or_default(),
            taps: c.vm_taps.clone().unwrap_or_default(),
            boot_files: c.vm_boot_files.clone().unwrap_or_default(),
            cmdlines: c.vm_cmdlines.clone().unwrap_or_default(),
        };
        if let Some(v) = c.max_memory_mib {
            p.max_memory_bytes = v.saturating_mul(MIB);
        }
        if let Some(v) = c.max_timeout_secs {
            p.max_timeout = Duration::from_secs(v);
        }
        if let Some(v) = c.max_component_mib {
            p.max_component_bytes = v.saturating_mul(MIB);
        }
        if let Some(v) = c.max_partition_bytes {
            p.max_partition_bytes = v;
            p.default_partition_bytes = p.default_partition_bytes.min(v);
        }
        if let Some(v) = c.max_vm_vcpus {
            p.max_vm_vcpus = v;
        }
        if let Some(v) = c.max_vm_memory_mib {
            p.max_vm_memory_mib = v;
        }
        if let Some(v) = &c.hypervisors {
            p.hypervisors = v.clone();
        }
        p.max_concurrent_invocations = self.limits.max_running_operations.max(1);
        p.capacity = self.capacity;
        p.machine = self.hypervisor.machine;
        p.hypervisor_access = self.hypervisor.access.clone();
        p
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unknown_keys_and_missing_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provd.toml");
        let base = "data-dir = \"data\"\nlisten = \"127.0.0.1:0\"\ntrusted-keys = [\"k.pub\"]\n\
                    [tls]\ncert = \"c\"\nkey = \"k\"\nclient-ca = \"ca\"\n";
        std::fs::write(&path, format!("{base}[limits]\nmax-bundle-byts = 3\n")).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("max-bundle-byts"), "{e}");
        std::fs::write(&path, base.replace("listen = \"127.0.0.1:0\"\n", "")).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("listen"), "{e}");
        std::fs::write(&path, base).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.trusted_keys, vec![dir.path().join("k.pub")]);
        assert_eq!(c.node_policy().capacity.vcpus, 0);
        assert_eq!(c.node_policy().machine, Machine::default());
    }

    #[test]
    fn the_hypervisor_section_sets_how_qemu_runs_vms_and_refuses_what_libvirt_would() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provd.toml");
        let base = "data-dir = \"data\"\nlisten = \"127.0.0.1:0\"\ntrusted-keys = [\"k.pub\"]\n\
                    [tls]\ncert = \"c\"\nkey = \"k\"\nclient-ca = \"ca\"\n";
        std::fs::write(&path, format!("{base}[hypervisor]\ndomain-type = \"qemu\"\n")).unwrap();
        let machine = Config::load(&path).unwrap().node_policy().machine;
        assert_eq!((machine.domain_type, machine.cpu_mode), (DomainType::Qemu, CpuMode::Maximum));
        std::fs::write(
            &path,
            format!(
                "{base}[hypervisor]\ndomain-type = \"qemu\"\ncpu-mode = \"host-passthrough\"\n"
            ),
        )
        .unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("hypervisor") && e.contains("host-passthrough"), "{e}");
        std::fs::write(&path, format!("{base}[hypervisor]\ndomain-type = \"xen\"\n")).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("xen"), "{e}");
        // The hypervisor's own user: named, resolved, never root.
        let hv = |body: &str| {
            std::fs::write(&path, format!("{base}[hypervisor]\n{body}")).unwrap();
            Config::load(&path)
        };
        let c = hv("user = \"nobody\"\ngroup = \"nogroup\"\nvm-dir = \"vms\"\n").unwrap();
        let access = c.node_policy().hypervisor_access.unwrap();
        assert_eq!((access.uid, access.gid), (65534, 65534));
        assert_eq!(access.dir, dir.path().join("vms"));
        for (body, says) in [
            ("user = \"nobody\"\n", "together"),
            ("user = \"no-such-user\"\ngroup = \"nogroup\"\nvm-dir = \"v\"\n", "no-such-user"),
            ("user = \"root\"\ngroup = \"nogroup\"\nvm-dir = \"v\"\n", "root"),
        ] {
            let e = hv(body).unwrap_err().to_string();
            assert!(e.contains("hypervisor") && e.contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn sharing_attaches_persistent_memory_by_default_and_the_catalogue_never_across_tenants() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provd.toml");
        let base = "data-dir = \"data\"\nlisten = \"127.0.0.1:0\"\ntrusted-keys = [\"k.pub\"]\n\
                    [tls]\ncert = \"c\"\nkey = \"k\"\nclient-ca = \"ca\"\n";
        let load = |extra: &str| {
            std::fs::write(&path, format!("{base}{extra}")).unwrap();
            Config::load(&path)
        };
        let s = load("").unwrap().node_policy().sharing;
        assert_eq!(
            (s.attach, s.share_public_memory, s.firecracker_pmem),
            (provd_node::policy::SharedAttach::Pmem, false, false)
        );
        let s = load(
            "[policy]\nshared-attach = \"block\"\n[sharing]\nshare-public-memory = true\n\
             [hypervisor]\nfirecracker-version = \"1.14.0\"\n",
        )
        .unwrap()
        .node_policy()
        .sharing;
        assert_eq!(
            (s.attach, s.share_public_memory, s.firecracker_pmem),
            (provd_node::policy::SharedAttach::Block, true, true)
        );
        let e = load("[hypervisor]\nfirecracker-version = \"latest\"\n").unwrap_err();
        assert!(e.to_string().contains("firecracker-version"), "{e}");
        let e = load("[policy]\nshared-attach = \"dax\"\n").unwrap_err();
        assert!(e.to_string().contains("dax"), "{e}");
    }
}
