//! VM specs: what a user asks for, in TOML or JSON, and the checks that every
//! spec passes before anything is rendered from it.
//!
//! Parsing and validation are separate steps so that one pass reports every
//! problem in a spec ([`VmSpec::validate`]) rather than the first; structural
//! problems (bad syntax, an unknown field, a wrong type) stop parsing and are
//! reported with the field path serde was at. [`parse_spec`] does both.
//!
//! Field paths in errors use the names a spec is written with (kebab-case,
//! `nics[1].mac`, `cloud-init.users[0].ssh-authorized-keys[2]`), so a user
//! can find the line the error is about.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

mod checks;

pub(crate) use checks::is_forbidden_char;
pub use checks::{check_dns_label, check_ssh_key, format_mac, generated_mac, parse_mac};

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Largest spec text accepted, in bytes; a spec is a small document, and a
/// bound keeps a hostile one from costing the parser much.
pub const MAX_SPEC_BYTES: usize = 256 * 1024;
/// Most vCPUs a spec may ask for.
pub const MAX_VCPUS: u32 = 256;
/// Least memory a spec may ask for, in MiB: below this no distribution's
/// kernel and initramfs boot.
pub const MIN_MEMORY_MIB: u64 = 128;
/// Most memory a spec may ask for, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1_048_576;
/// Longest image reference, in bytes.
pub const MAX_IMAGE_REF_BYTES: usize = 2048;
/// Most data disks per VM; with the root, shared and seed disks this stays
/// well inside the virtio slots every hypervisor offers.
pub const MAX_DATA_DISKS: usize = 16;
/// Largest data disk, in GiB (64 TiB).
pub const MAX_DISK_GIB: u64 = 65_536;
/// Longest data disk name, in bytes: the guest sees the disk's serial
/// `data-<name>`, and a virtio-blk serial holds 20 bytes.
pub const MAX_DISK_NAME_BYTES: usize = 15;
/// Disk names provd gives its own disks; a data disk may not take them.
pub const RESERVED_DISK_NAMES: [&str; 3] = ["root", "shared", "seed"];
/// Most NICs per VM.
pub const MAX_NICS: usize = 8;
/// Most DNS servers per NIC (glibc's resolver reads three; netplan takes more).
pub const MAX_DNS_SERVERS: usize = 4;
/// Most cloud-init users.
pub const MAX_USERS: usize = 32;
/// Most SSH keys per user.
pub const MAX_SSH_KEYS_PER_USER: usize = 16;
/// Longest SSH public key line, in bytes (a 16384-bit RSA key is about 2.8 KiB).
pub const MAX_SSH_KEY_BYTES: usize = 16 * 1024;
/// Largest cloud-init user-data, in bytes. The NoCloud seed is read into guest
/// memory at boot and the manager supplies it, so a node bounds what a manager
/// can make every guest read.
pub const MAX_USER_DATA_BYTES: usize = 65_536;
/// Largest raw cloud-init network-config, in bytes (same reason as user-data).
pub const MAX_NETWORK_CONFIG_BYTES: usize = 65_536;
/// Longest kernel command line, in bytes: the x86 boot protocol limit that
/// Firecracker also enforces.
pub const MAX_CMDLINE_BYTES: usize = 2048;
/// Longest relative boot path (kernel, initrd), in bytes.
pub const MAX_BOOT_PATH_BYTES: usize = 1024;
/// Longest login shell path, in bytes.
pub const MAX_SHELL_BYTES: usize = 256;
/// Most labels per VM.
pub const MAX_LABELS: usize = 64;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 63;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;

/// SSH public key types accepted in `ssh-authorized-keys`.
pub const SSH_KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// One problem in a spec: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Path of the field, as written in the spec (`nics[1].mac`); `spec`
    /// for the document as a whole.
    pub field: String,
    /// What is wrong, lowercase.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a spec was refused: every problem found, each naming its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// At least one problem.
    pub problems: Vec<FieldError>,
}

impl SpecError {
    fn one(field: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError { problems: vec![FieldError { field: field.into(), message: message.into() }] }
    }

    /// Whether some problem is about `field` (exactly, or a field inside it).
    pub fn mentions(&self, field: &str) -> bool {
        self.problems.iter().any(|p| {
            p.field == field
                || p.field
                    .strip_prefix(field)
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.problems.len() > 1 {
            write!(f, "{} problems in the spec: ", self.problems.len())?;
        }
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

/// A VM as a user asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VmSpec {
    /// A DNS label: 1 to 63 of `[a-z0-9-]`, starting with a letter, not
    /// ending with `-`; it names the domain and the generated MACs.
    pub name: String,
    /// The tenant the VM belongs to, a DNS label; absent means
    /// [`provd_domain::trust::DEFAULT_TENANT`]. Its guest may stack and
    /// attach only the public catalogue's layers and its tenant's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Which hypervisor runs the VM.
    pub hypervisor: Hypervisor,
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpus: u32,
    /// CPU topology; sockets × cores × threads must equal `vcpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
    /// Memory in MiB, [`MIN_MEMORY_MIB`] to [`MAX_MEMORY_MIB`].
    pub memory_mib: u64,
    /// Image reference; that it exists is checked where images are known.
    pub image: String,
    /// Extra data disks, at most [`MAX_DATA_DISKS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DataDisk>,
    /// Network interfaces, at most [`MAX_NICS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// cloud-init NoCloud settings; without them no seed is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// How the VM boots. Optional: a spec without `[boot]` boots its disk
    /// through BIOS firmware, which is what an image built for a cloud does.
    #[serde(default)]
    pub boot: Boot,
    /// Free-form labels, carried into the hypervisor's metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// How its shared partitions reach the guest: `pmem` (persistent
    /// memory mapped with DAX) or `block` (read-only disks). Absent: what
    /// the node's `[policy] shared-attach` says, where the hypervisor and
    /// the partition allow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_attach: Option<provd_domain::attach::SharedAttach>,
}

/// The hypervisors provd renders configurations for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hypervisor {
    /// libvirt with QEMU/KVM: a domain XML.
    Libvirt,
    /// Cloud Hypervisor: a `vm.create` request body.
    CloudHypervisor,
    /// Firecracker: a `--config-file` document.
    Firecracker,
}

impl Hypervisor {
    /// The name a spec uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Hypervisor::Libvirt => "libvirt",
            Hypervisor::CloudHypervisor => "cloud-hypervisor",
            Hypervisor::Firecracker => "firecracker",
        }
    }
}

impl fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// CPU topology presented to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Topology {
    /// Sockets, at least 1.
    pub sockets: u32,
    /// Cores per socket, at least 1.
    pub cores: u32,
    /// Threads per core, at least 1.
    pub threads: u32,
}

/// An extra data disk, created empty by provd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DataDisk {
    /// 1 to [`MAX_DISK_NAME_BYTES`] of `[a-z0-9-]`, unique, not one of
    /// [`RESERVED_DISK_NAMES`].
    pub name: String,
    /// Size in GiB, 1 to [`MAX_DISK_GIB`].
    pub size_gib: u64,
    /// Image format; raw unless asked otherwise.
    #[serde(default)]
    pub format: DiskFormat,
}

/// Format of a disk image file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFormat {
    /// A plain image.
    #[default]
    Raw,
    /// QEMU copy-on-write v2.
    Qcow2,
}

impl DiskFormat {
    /// The name libvirt and qemu-img use.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Nic {
    /// `xx:xx:xx:xx:xx:xx`, either case, unicast; generated when absent
    /// (see [`generated_mac`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Host bridge to attach to; exactly one of `bridge` and `tap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Existing host tap device to use; exactly one of `bridge` and `tap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Static IPv4 address; excludes `dhcp4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<IpConfig<Ipv4Addr>>,
    /// Static IPv6 address; excludes `dhcp6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<IpConfig<Ipv6Addr>>,
    /// Configure IPv4 by DHCP.
    #[serde(default)]
    pub dhcp4: bool,
    /// Configure IPv6 by DHCPv6.
    #[serde(default)]
    pub dhcp6: bool,
    /// DNS servers, at most [`MAX_DNS_SERVERS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
}

/// A static address and an optional gateway of one address family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[serde(bound(serialize = "A: IpFamily", deserialize = "A: IpFamily + Deserialize<'de>"))]
pub struct IpConfig<A> {
    /// Address and prefix length, written `192.0.2.10/24` or `2001:db8::10/64`.
    pub address: Cidr<A>,
    /// Default gateway; must be inside the address's subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<A>,
}

/// An address with a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr<A> {
    /// The address.
    pub address: A,
    /// The prefix length, at most [`IpFamily::MAX_PREFIX`].
    pub prefix: u8,
}

/// IPv4 or IPv6: what [`Cidr`] needs of an address type.
pub trait IpFamily: Copy + Eq + FromStr + fmt::Display + Serialize {
    /// Longest prefix length.
    const MAX_PREFIX: u8;
    /// An example for error messages.
    const EXAMPLE: &'static str;
    /// "IPv4" or "IPv6".
    const NAME: &'static str;
    /// Whether `self` and `other` agree in the first `prefix` bits.
    fn same_subnet(self, other: Self, prefix: u8) -> bool;
}

impl IpFamily for Ipv4Addr {
    const MAX_PREFIX: u8 = 32;
    const EXAMPLE: &'static str = "192.0.2.10/24";
    const NAME: &'static str = "IPv4";
    fn same_subnet(self, other: Self, prefix: u8) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        u32::from(self) & mask == u32::from(other) & mask
    }
}

impl IpFamily for Ipv6Addr {
    const MAX_PREFIX: u8 = 128;
    const EXAMPLE: &'static str = "2001:db8::10/64";
    const NAME: &'static str = "IPv6";
    fn same_subnet(self, other: Self, prefix: u8) -> bool {
        let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
        u128::from(self) & mask == u128::from(other) & mask
    }
}

impl<A: IpFamily> fmt::Display for Cidr<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl<A: IpFamily> FromStr for Cidr<A> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let expected = || {
            format!(
                "expected an {} address with a prefix length, like {}, got {s:?}",
                A::NAME,
                A::EXAMPLE
            )
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(expected)?;
        let address = addr.parse::<A>().map_err(|_| expected())?;
        // u8::from_str accepts a leading '+'; a prefix is digits only.
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(expected());
        }
        let prefix =
            prefix.parse::<u8>().ok().filter(|p| *p <= A::MAX_PREFIX).ok_or_else(|| {
                format!("prefix length in {s:?} is not between 0 and {}", A::MAX_PREFIX)
            })?;
        Ok(Cidr { address, prefix })
    }
}

impl<A: IpFamily> Serialize for Cidr<A> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de, A: IpFamily> Deserialize<'de> for Cidr<A> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<A>(PhantomData<A>);
        impl<A: IpFamily> serde::de::Visitor<'_> for Visitor<A> {
            type Value = Cidr<A>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an {} address with a prefix length, like {}", A::NAME, A::EXAMPLE)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Cidr<A>, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor(PhantomData))
    }
}

/// cloud-init NoCloud settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CloudInit {
    /// RFC 1123 host name; the VM name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Users to create, at most [`MAX_USERS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    /// Raw user-data, at most [`MAX_USER_DATA_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Raw network-config replacing the one generated from `nics`, at most
    /// [`MAX_NETWORK_CONFIG_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
}

/// A user cloud-init creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct User {
    /// POSIX portable user name: `[a-z_][a-z0-9_-]{0,31}`.
    pub name: String,
    /// OpenSSH public key lines: `<type> <base64> [comment]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// Passwordless sudo.
    #[serde(default)]
    pub sudo: bool,
    /// Login shell: an absolute path without whitespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
}

/// How a VM boots.
///
/// Written as a `[boot]` table with either `kernel` (plus optional `initrd`
/// and `cmdline`) or `firmware`; serde goes through [`BootFields`] so that
/// the table form stays flat and mixing the two is a clear error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BootFields", into = "BootFields")]
pub enum Boot {
    /// Direct kernel boot. Paths are relative to the node's `boot/` folder
    /// in its data directory: a spec never names a host path.
    Kernel {
        /// Kernel image, relative.
        kernel: String,
        /// Initramfs, relative.
        initrd: Option<String>,
        /// Kernel command line, at most [`MAX_CMDLINE_BYTES`].
        cmdline: Option<String>,
    },
    /// Boot the root disk through firmware.
    Firmware {
        /// Which firmware.
        firmware: Firmware,
    },
}

impl Default for Boot {
    fn default() -> Self {
        Boot::Firmware { firmware: Firmware::Bios }
    }
}

/// Firmware kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS under QEMU).
    Bios,
    /// UEFI (OVMF under QEMU).
    Uefi,
}

/// The `[boot]` table as written; converted to [`Boot`] on parsing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BootFields {
    /// See [`Boot::Kernel`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// See [`Boot::Kernel`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// See [`Boot::Kernel`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// See [`Boot::Firmware`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
}

impl TryFrom<BootFields> for Boot {
    type Error = String;
    fn try_from(b: BootFields) -> Result<Boot, String> {
        match (b.kernel, b.firmware) {
            (Some(_), Some(_)) => Err("set either kernel or firmware, not both".into()),
            (Some(kernel), None) => {
                Ok(Boot::Kernel { kernel, initrd: b.initrd, cmdline: b.cmdline })
            }
            (None, Some(firmware)) => {
                if b.initrd.is_some() || b.cmdline.is_some() {
                    Err("initrd and cmdline apply to kernel boot only; firmware boot reads them from the disk".into())
                } else {
                    Ok(Boot::Firmware { firmware })
                }
            }
            (None, None) => {
                Err("set kernel (direct kernel boot) or firmware (bios or uefi)".into())
            }
        }
    }
}

impl From<Boot> for BootFields {
    fn from(b: Boot) -> BootFields {
        match b {
            Boot::Kernel { kernel, initrd, cmdline } => {
                BootFields { kernel: Some(kernel), initrd, cmdline, firmware: None }
            }
            Boot::Firmware { firmware } => {
                BootFields { firmware: Some(firmware), ..BootFields::default() }
            }
        }
    }
}

/// What of the node's `allow` lists `spec` goes beyond: each NIC's bridge or
/// tap, the kernel and initramfs, the command line; one line per field,
/// empty when the node allows it all.
pub fn beyond_node(spec: &VmSpec, allow: &provd_domain::VmAllow) -> Vec<String> {
    let named =
        |list: &[String], text: &str| list.iter().any(|p| provd_domain::wildcard_match(p, text));
    let mut out = Vec::new();
    for (i, nic) in spec.nics.iter().enumerate() {
        if let Some(b) = &nic.bridge
            && !named(&allow.bridges, b)
        {
            out.push(format!("nics[{i}].bridge: {b:?} is not among the bridges this node lets VMs join (policy.vm-bridges)"));
        }
        if let Some(t) = &nic.tap
            && !named(&allow.taps, t)
        {
            out.push(format!(
                "nics[{i}].tap: {t:?} is not among the taps this node lets VMs use (policy.vm-taps)"
            ));
        }
    }
    if let Boot::Kernel { kernel, initrd, cmdline } = &spec.boot {
        let file = |f: &str| allow.boot_files.iter().any(|p| provd_domain::glob_match(p, f));
        for (field, path) in [("boot.kernel", Some(kernel)), ("boot.initrd", initrd.as_ref())] {
            if let Some(path) = path
                && !file(path)
            {
                out.push(format!("{field}: {path:?} is not among the boot files this node lets VMs use (policy.vm-boot-files)"));
            }
        }
        if let Some(c) = cmdline
            && !named(&allow.cmdlines, c)
        {
            out.push(format!("boot.cmdline: {c:?} matches none of this node's policy.vm-cmdlines"));
        }
    }
    out
}

/// The top-level fields, by the names a spec's JSON gives them, in which
/// `a` and `b` differ: what the host compares a plugin's spec with the
/// manager's by.
pub fn differing_fields(a: &VmSpec, b: &VmSpec) -> Vec<String> {
    let fields = |s: &VmSpec| match serde_json::to_value(s) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let (a, b) = (fields(a), fields(b));
    let mut differ: Vec<String> =
        a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
    differ.sort();
    differ.dedup();
    differ
}

/// Parses a spec in JSON when its first non-whitespace character is `{`, in
/// TOML otherwise, then validates it.
pub fn parse_spec(text: &str) -> Result<VmSpec, SpecError> {
    let spec = if text.trim_start().starts_with('{') {
        VmSpec::from_json(text)?
    } else {
        VmSpec::from_toml(text)?
    };
    spec.validate()?;
    Ok(spec)
}

fn check_size(text: &str) -> Result<(), SpecError> {
    if text.len() > MAX_SPEC_BYTES {
        return Err(SpecError::one(
            "spec",
            format!("is {} bytes; the limit is {MAX_SPEC_BYTES}", text.len()),
        ));
    }
    Ok(())
}

/// The field path serde was at, in spec notation. serde_path_to_error
/// already ends the path with an unknown field's name; a missing field is
/// reported at its parent, so its name is appended to point at it.
fn parse_error_field(path: &serde_path_to_error::Path, message: &str) -> String {
    let mut field = path.to_string();
    if field == "." {
        field = String::new();
    }
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some((name, _)) = rest.split_once('`')
    {
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(name);
    }
    if field.is_empty() { "spec".to_string() } else { field }
}

/// A parser's message in this crate's style: one line, no trailing period.
fn tidy(message: &str) -> String {
    let one_line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.trim_end_matches('.').to_string()
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests;
