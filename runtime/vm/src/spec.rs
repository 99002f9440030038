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

impl VmSpec {
    /// Parses a TOML spec. Does not validate: see [`VmSpec::validate`] and
    /// [`parse_spec`].
    pub fn from_toml(text: &str) -> Result<VmSpec, SpecError> {
        check_size(text)?;
        let de = toml::de::Deserializer::parse(text).map_err(|e| {
            let mut msg = tidy(e.message());
            if let Some(span) = e.span() {
                let (line, col) = line_col(text, span.start);
                msg.push_str(&format!(" (line {line}, column {col})"));
            }
            SpecError::one("spec", format!("is not valid toml: {msg}"))
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = parse_error_field(e.path(), e.inner().message());
            let inner = e.inner();
            let mut msg = tidy(inner.message());
            if let Some(span) = inner.span() {
                let (line, col) = line_col(text, span.start);
                msg.push_str(&format!(" (line {line}, column {col})"));
            }
            SpecError::one(field, msg)
        })
    }

    /// Parses a JSON spec. Does not validate: see [`VmSpec::validate`] and
    /// [`parse_spec`].
    pub fn from_json(text: &str) -> Result<VmSpec, SpecError> {
        check_size(text)?;
        let mut de = serde_json::Deserializer::from_str(text);
        let spec: VmSpec = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let inner = e.inner();
            let msg = tidy(&inner.to_string());
            if inner.is_syntax() || inner.is_eof() {
                return SpecError::one("spec", format!("is not valid json: {msg}"));
            }
            SpecError::one(parse_error_field(e.path(), &msg), msg)
        })?;
        de.end().map_err(|e| {
            SpecError::one("spec", format!("is not valid json: {}", tidy(&e.to_string())))
        })?;
        Ok(spec)
    }

    /// Checks everything that can be checked without the node: every
    /// problem found, not just the first.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut p = Problems::default();
        if let Err(m) = check_dns_label(&self.name) {
            p.push("name", m);
        }
        if let Some(t) = &self.tenant
            && !provd_domain::trust::valid_tenant(t)
        {
            p.push("tenant", format!("{t:?} is not a DNS label (1 to 63 of a-z, 0-9 and -)"));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            p.push("vcpus", format!("{} is not between 1 and {MAX_VCPUS}", self.vcpus));
        }
        if let Some(t) = &self.topology {
            let mut all_positive = true;
            for (f, v) in [("sockets", t.sockets), ("cores", t.cores), ("threads", t.threads)] {
                if v == 0 {
                    p.push(format!("topology.{f}"), "must be at least 1");
                    all_positive = false;
                }
            }
            // u128: three u32 factors cannot overflow it.
            let product = u128::from(t.sockets) * u128::from(t.cores) * u128::from(t.threads);
            if all_positive && product != u128::from(self.vcpus) {
                p.push(
                    "topology",
                    format!(
                        "sockets × cores × threads is {} × {} × {} = {product}, not vcpus ({})",
                        t.sockets, t.cores, t.threads, self.vcpus
                    ),
                );
            }
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            p.push(
                "memory-mib",
                format!("{} is not between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}", self.memory_mib),
            );
        }
        if self.image.is_empty() {
            p.push("image", "must not be empty");
        } else if self.image.len() > MAX_IMAGE_REF_BYTES {
            p.push(
                "image",
                format!("is {} bytes; the limit is {MAX_IMAGE_REF_BYTES}", self.image.len()),
            );
        } else if self.image.chars().any(|c| c.is_whitespace() || c.is_control()) {
            p.push("image", "must not contain whitespace or control characters");
        }
        self.validate_disks(&mut p);
        self.validate_nics(&mut p);
        if let Some(ci) = &self.cloud_init {
            validate_cloud_init(ci, &mut p);
        }
        validate_boot(&self.boot, &mut p);
        validate_labels(&self.labels, &mut p);
        p.into_result()
    }

    fn validate_disks(&self, p: &mut Problems) {
        if self.disks.len() > MAX_DATA_DISKS {
            p.push("disks", format!("{} disks; at most {MAX_DATA_DISKS}", self.disks.len()));
        }
        let mut seen = BTreeSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            let f = format!("disks[{i}]");
            if d.name.is_empty() || d.name.len() > MAX_DISK_NAME_BYTES {
                p.push(format!("{f}.name"), format!("must be 1 to {MAX_DISK_NAME_BYTES} bytes"));
            } else if !d
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                p.push(format!("{f}.name"), format!("{:?} may only contain [a-z0-9-]", d.name));
            } else if RESERVED_DISK_NAMES.contains(&d.name.as_str()) {
                p.push(
                    format!("{f}.name"),
                    format!("{:?} is reserved for provd's own disks", d.name),
                );
            } else if !seen.insert(d.name.as_str()) {
                p.push(format!("{f}.name"), format!("{:?} is used by an earlier disk", d.name));
            }
            if d.size_gib == 0 || d.size_gib > MAX_DISK_GIB {
                p.push(
                    format!("{f}.size-gib"),
                    format!("{} is not between 1 and {MAX_DISK_GIB}", d.size_gib),
                );
            }
        }
    }

    fn validate_nics(&self, p: &mut Problems) {
        if self.nics.len() > MAX_NICS {
            p.push("nics", format!("{} nics; at most {MAX_NICS}", self.nics.len()));
        }
        let mut macs: BTreeMap<[u8; 6], usize> = BTreeMap::new();
        for (i, nic) in self.nics.iter().enumerate() {
            let f = format!("nics[{i}]");
            let mac = match &nic.mac {
                Some(m) => match parse_mac(m) {
                    Ok(mac) => Some(mac),
                    Err(e) => {
                        p.push(format!("{f}.mac"), e);
                        None
                    }
                },
                None => Some(generated_mac_bytes(&self.name, i)),
            };
            if let Some(mac) = mac {
                if let Some(first) = macs.get(&mac) {
                    let how = if nic.mac.is_some() { "" } else { "generated " };
                    p.push(
                        format!("{f}.mac"),
                        format!("{how}{} is already the mac of nics[{first}]", format_mac(mac)),
                    );
                } else {
                    macs.insert(mac, i);
                }
            }
            match (&nic.bridge, &nic.tap) {
                (Some(_), Some(_)) => p.push(&f, "set either bridge or tap, not both"),
                (None, None) => p.push(&f, "set bridge or tap"),
                _ => {}
            }
            for (key, value) in [("bridge", &nic.bridge), ("tap", &nic.tap)] {
                if let Some(v) = value
                    && let Err(m) = check_ifname(v)
                {
                    p.push(format!("{f}.{key}"), m);
                }
            }
            if let Some(ip) = &nic.ipv4 {
                check_ip_config(ip, &format!("{f}.ipv4"), p);
                if nic.dhcp4 {
                    p.push(
                        format!("{f}.ipv4"),
                        "a static ipv4 address and dhcp4 exclude each other",
                    );
                }
            }
            if let Some(ip) = &nic.ipv6 {
                check_ip_config(ip, &format!("{f}.ipv6"), p);
                if nic.dhcp6 {
                    p.push(
                        format!("{f}.ipv6"),
                        "a static ipv6 address and dhcp6 exclude each other",
                    );
                }
            }
            if nic.dns.len() > MAX_DNS_SERVERS {
                p.push(
                    format!("{f}.dns"),
                    format!("{} servers; at most {MAX_DNS_SERVERS}", nic.dns.len()),
                );
            }
        }
    }

    /// The effective MAC of every NIC, in order: the spec's own, normalised
    /// to lowercase, or the generated one. Meant for a validated spec; an
    /// unparseable MAC is returned lowercased as written.
    pub fn macs(&self) -> Vec<String> {
        self.nics
            .iter()
            .enumerate()
            .map(|(i, nic)| match &nic.mac {
                Some(m) => parse_mac(m).map(format_mac).unwrap_or_else(|_| m.to_ascii_lowercase()),
                None => generated_mac(&self.name, i),
            })
            .collect()
    }

    /// The VM's tenant: its spec's, or the default tenant.
    pub fn tenant(&self) -> &str {
        self.tenant.as_deref().unwrap_or(provd_domain::trust::DEFAULT_TENANT)
    }

    /// The guest host name: cloud-init's, or the VM name.
    pub fn hostname(&self) -> &str {
        self.cloud_init.as_ref().and_then(|c| c.hostname.as_deref()).unwrap_or(&self.name)
    }
}

#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), message: message.into() });
    }
    fn into_result(self) -> Result<(), SpecError> {
        if self.0.is_empty() { Ok(()) } else { Err(SpecError { problems: self.0 }) }
    }
}

/// A character XML 1.0 cannot carry or a terminal would act on: controls
/// (C0, DEL, C1) and the non-characters U+FFFE and U+FFFF. Strings that end
/// up in configurations, logs and XML are kept free of them.
pub(crate) fn is_forbidden_char(c: char) -> bool {
    c.is_control() || c == '\u{FFFE}' || c == '\u{FFFF}'
}

/// Checks a VM name: a DNS label of `a-z 0-9 -`, starting with a letter.
pub fn check_dns_label(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("must be 1 to 63 bytes, is {}", name.len()));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(format!("{name:?} may only contain [a-z0-9-]"));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!("{name:?} must start with a letter"));
    }
    if name.ends_with('-') {
        return Err(format!("{name:?} must not end with '-'"));
    }
    Ok(())
}

/// Linux interface name rules (`dev_valid_name`), narrowed to the
/// characters that are safe in every configuration format.
fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("interface names are 1 to 15 bytes, {name:?} is {}", name.len()));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not an interface name"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err(format!("{name:?} may only contain [A-Za-z0-9_.-]"));
    }
    Ok(())
}

fn check_ip_config<A: IpFamily>(ip: &IpConfig<A>, f: &str, p: &mut Problems) {
    if let Some(gw) = ip.gateway {
        if gw == ip.address.address {
            p.push(format!("{f}.gateway"), format!("{gw} is the interface's own address"));
        } else if !gw.same_subnet(ip.address.address, ip.address.prefix) {
            p.push(format!("{f}.gateway"), format!("{gw} is outside {}", ip.address));
        }
    }
}

/// Parses `xx:xx:xx:xx:xx:xx` (either case) into a unicast, non-zero MAC.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not a mac address of the form 52:54:00:12:34:56");
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if out[0] & 1 == 1 {
        return Err(format!("{s} is a multicast address; a nic needs a unicast one"));
    }
    if out == [0; 6] {
        return Err("00:00:00:00:00:00 is not a usable address".into());
    }
    Ok(out)
}

/// `xx:xx:xx:xx:xx:xx`, lowercase.
pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

fn generated_mac_bytes(vm_name: &str, nic_index: usize) -> [u8; 6] {
    let mut h = blake3::Hasher::new();
    h.update(b"provd-mac\0");
    h.update(vm_name.as_bytes());
    h.update(b"\0");
    h.update(nic_index.to_string().as_bytes());
    let [a, b, c, ..] = *h.finalize().as_bytes();
    // 52:54:00 is the prefix QEMU/KVM guests conventionally use; it is
    // locally administered and unicast, so it collides with no vendor's.
    [0x52, 0x54, 0x00, a, b, c]
}

/// The MAC a NIC without one gets: `52:54:00` followed by the first three
/// bytes of BLAKE3(`"provd-mac\0" + vm_name + "\0" + nic_index` in decimal).
/// Deterministic, so a VM keeps its MACs (and its DHCP leases) when it is
/// rendered again.
pub fn generated_mac(vm_name: &str, nic_index: usize) -> String {
    format_mac(generated_mac_bytes(vm_name, nic_index))
}

/// RFC 1123 host name: dot-separated labels of 1 to 63 `[A-Za-z0-9-]`, not
/// starting or ending with `-`, 253 bytes in all.
fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!("host names are 1 to 253 bytes, {name:?} is {}", name.len()));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{name:?} has a label that is not 1 to 63 bytes"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!("{name:?} may only contain [A-Za-z0-9-] and dots"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{name:?} has a label starting or ending with '-'"));
        }
    }
    Ok(())
}

fn validate_cloud_init(ci: &CloudInit, p: &mut Problems) {
    if let Some(h) = &ci.hostname
        && let Err(m) = check_hostname(h)
    {
        p.push("cloud-init.hostname", m);
    }
    if ci.users.len() > MAX_USERS {
        p.push("cloud-init.users", format!("{} users; at most {MAX_USERS}", ci.users.len()));
    }
    let mut names = BTreeSet::new();
    for (i, u) in ci.users.iter().enumerate() {
        let f = format!("cloud-init.users[{i}]");
        if let Err(m) = check_user_name(&u.name) {
            p.push(format!("{f}.name"), m);
        } else if !names.insert(u.name.as_str()) {
            p.push(format!("{f}.name"), format!("{:?} is listed twice", u.name));
        }
        if u.ssh_authorized_keys.len() > MAX_SSH_KEYS_PER_USER {
            p.push(
                format!("{f}.ssh-authorized-keys"),
                format!("{} keys; at most {MAX_SSH_KEYS_PER_USER}", u.ssh_authorized_keys.len()),
            );
        }
        for (k, key) in u.ssh_authorized_keys.iter().enumerate() {
            if let Err(m) = check_ssh_key(key) {
                p.push(format!("{f}.ssh-authorized-keys[{k}]"), m);
            }
        }
        if let Some(shell) = &u.shell {
            if !shell.starts_with('/') {
                p.push(format!("{f}.shell"), format!("{shell:?} is not an absolute path"));
            } else if shell.len() > MAX_SHELL_BYTES {
                p.push(format!("{f}.shell"), format!("is longer than {MAX_SHELL_BYTES} bytes"));
            } else if shell.chars().any(|c| c.is_whitespace() || is_forbidden_char(c)) {
                p.push(format!("{f}.shell"), "must not contain whitespace or control characters");
            }
        }
    }
    if let Some(ud) = &ci.user_data
        && ud.len() > MAX_USER_DATA_BYTES
    {
        p.push(
            "cloud-init.user-data",
            format!("is {} bytes; the limit is {MAX_USER_DATA_BYTES}", ud.len()),
        );
    }
    if let Some(nc) = &ci.network_config
        && nc.len() > MAX_NETWORK_CONFIG_BYTES
    {
        p.push(
            "cloud-init.network-config",
            format!("is {} bytes; the limit is {MAX_NETWORK_CONFIG_BYTES}", nc.len()),
        );
    }
}

fn check_user_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    let rest_ok =
        bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !first_ok || !rest_ok || name.len() > 32 {
        return Err(format!("{name:?} is not a user name: [a-z_][a-z0-9_-]{{0,31}}"));
    }
    Ok(())
}

/// Checks one OpenSSH public key line, `<type> <base64> [comment]`: a known
/// type, strict base64, and a blob that starts with the same type string
/// (length-prefixed), which is how a key pasted under the wrong type, or a
/// truncated one, is caught before it locks a user out.
pub fn check_ssh_key(line: &str) -> Result<(), String> {
    if line.len() > MAX_SSH_KEY_BYTES {
        return Err(format!("is {} bytes; the limit is {MAX_SSH_KEY_BYTES}", line.len()));
    }
    // A newline would add a second line to authorized_keys, one the
    // checks below never saw.
    if line.chars().any(is_forbidden_char) {
        return Err("must be one line without control characters".into());
    }
    let mut parts = line.split_ascii_whitespace();
    let Some(kind) = parts.next() else {
        return Err("is empty".into());
    };
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!(
            "key type {kind:?} is not one of {} (options before the type are not supported)",
            SSH_KEY_TYPES.join(", ")
        ));
    }
    let Some(b64) = parts.next() else {
        return Err(format!("{kind} key has no base64 key data"));
    };
    // STANDARD requires canonical padding and zero trailing bits: one key,
    // one spelling.
    let blob = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| {
        let why = match e {
            base64::DecodeError::InvalidByte(at, byte) => {
                format!("character {:?} at offset {at}", char::from(byte))
            }
            base64::DecodeError::InvalidLength(len) => format!("length {len}"),
            base64::DecodeError::InvalidLastSymbol(at, _) => {
                format!("non-canonical last character at offset {at}")
            }
            base64::DecodeError::InvalidPadding => "missing or extra padding".to_string(),
        };
        format!("key data is not valid base64: {why}")
    })?;
    let inner = blob
        .get(..4)
        .and_then(|len| <[u8; 4]>::try_from(len).ok())
        .map(u32::from_be_bytes)
        .and_then(|len| usize::try_from(len).ok())
        .and_then(|len| blob.get(4..4usize.saturating_add(len)));
    let Some(inner) = inner else {
        return Err("key data is too short to hold a key type".into());
    };
    if inner != kind.as_bytes() {
        return Err(format!(
            "key data is a {:?} key, not {kind}",
            String::from_utf8_lossy(inner).chars().take(64).collect::<String>()
        ));
    }
    if blob.len() <= 4 + inner.len() {
        return Err(format!("key data holds the {kind} type and no key"));
    }
    Ok(())
}

/// A relative path under the node's `boot/` folder: normalised (no empty,
/// `.` or `..` components), no leading `/`.
fn check_boot_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("must not be empty".into());
    }
    if path.len() > MAX_BOOT_PATH_BYTES {
        return Err(format!("is longer than {MAX_BOOT_PATH_BYTES} bytes"));
    }
    if path.starts_with('/') {
        return Err(format!(
            "{path:?} is absolute; boot paths are relative to the node's boot/ folder"
        ));
    }
    if path.chars().any(is_forbidden_char) || path.contains('\\') {
        return Err("must not contain control characters or backslashes".into());
    }
    for component in path.split('/') {
        match component {
            ".." => return Err(format!("{path:?} has a '..' component")),
            "." | "" => return Err(format!("{path:?} is not normalised (empty or '.' component)")),
            _ => {}
        }
    }
    Ok(())
}

fn validate_boot(boot: &Boot, p: &mut Problems) {
    if let Boot::Kernel { kernel, initrd, cmdline } = boot {
        if let Err(m) = check_boot_path(kernel) {
            p.push("boot.kernel", m);
        }
        if let Some(initrd) = initrd
            && let Err(m) = check_boot_path(initrd)
        {
            p.push("boot.initrd", m);
        }
        if let Some(c) = cmdline {
            if c.len() > MAX_CMDLINE_BYTES {
                p.push(
                    "boot.cmdline",
                    format!("is {} bytes; the limit is {MAX_CMDLINE_BYTES}", c.len()),
                );
            } else if c.chars().any(is_forbidden_char) {
                p.push("boot.cmdline", "must not contain control characters");
            }
        }
    }
}

fn validate_labels(labels: &BTreeMap<String, String>, p: &mut Problems) {
    if labels.len() > MAX_LABELS {
        p.push("labels", format!("{} labels; at most {MAX_LABELS}", labels.len()));
    }
    for (k, v) in labels {
        let f = format!("labels.{k}");
        if k.is_empty() || k.len() > MAX_LABEL_KEY_BYTES {
            p.push(&f, format!("keys are 1 to {MAX_LABEL_KEY_BYTES} bytes"));
        } else if !k.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'/' | b'-')
        }) {
            // Debug formatting: the key may hold the very characters that
            // make it invalid, and the message must stay one readable line.
            p.push(format!("labels.{k:?}"), "keys may only contain [a-z0-9._/-]");
            continue;
        }
        if v.len() > MAX_LABEL_VALUE_BYTES {
            p.push(&f, format!("value is {} bytes; the limit is {MAX_LABEL_VALUE_BYTES}", v.len()));
        } else if v.chars().any(is_forbidden_char) {
            p.push(&f, "value must not contain control characters");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn cidr_parses_and_bounds_prefix() {
        let c: Cidr<Ipv4Addr> = "192.0.2.10/24".parse().unwrap();
        assert_eq!(c.prefix, 24);
        assert!("192.0.2.10/33".parse::<Cidr<Ipv4Addr>>().is_err());
        assert!("192.0.2.10/+3".parse::<Cidr<Ipv4Addr>>().is_err());
        assert!("192.0.2.10".parse::<Cidr<Ipv4Addr>>().is_err());
        assert!("2001:db8::1/129".parse::<Cidr<Ipv6Addr>>().is_err());
        assert!("2001:db8::1/0".parse::<Cidr<Ipv6Addr>>().is_ok());
    }

    #[test]
    fn subnets() {
        let a: Ipv4Addr = "192.0.2.10".parse().unwrap();
        assert!(a.same_subnet("192.0.2.1".parse().unwrap(), 24));
        assert!(!a.same_subnet("192.0.3.1".parse().unwrap(), 24));
        assert!(a.same_subnet("10.0.0.1".parse().unwrap(), 0));
        let b: Ipv6Addr = "2001:db8::10".parse().unwrap();
        assert!(b.same_subnet("2001:db8::1".parse().unwrap(), 64));
        assert!(!b.same_subnet("2001:db9::1".parse().unwrap(), 64));
        assert!(!b.same_subnet("2001:db8::11".parse().unwrap(), 128));
    }

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("52:54:00:AB:cd:0F").unwrap(), [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert!(parse_mac("01:00:5e:00:00:01").unwrap_err().contains("multicast"));
        assert!(parse_mac("52:54:00:ab:cd").is_err());
        assert!(parse_mac("52:54:00:ab:cd:ef:01").is_err());
        assert!(parse_mac("52-54-00-ab-cd-ef").is_err());
        assert!(parse_mac("52:54:00:ab:cd:+f").is_err());
    }

    #[test]
    fn boot_paths() {
        assert!(check_boot_path("vmlinuz-6.1").is_ok());
        assert!(check_boot_path("debian/vmlinuz").is_ok());
        for bad in ["", "/boot/vmlinuz", "../x", "a/../b", "a//b", "./a", "a/", "a\\b"] {
            assert!(check_boot_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_fields_a_grant_may_name_are_the_specs_own() {
        // Every field set, so each appears in the JSON form.
        let text = r#"
            name = "web-1"
            hypervisor = "libvirt"
            vcpus = 2
            memory-mib = 1024
            image = "dir:/srv/images/web"
            topology = { sockets = 1, cores = 2, threads = 1 }
            labels = { team = "x" }
            [boot]
            kernel = "vmlinuz"
            [[disks]]
            name = "data"
            size-gib = 1
            [[nics]]
            bridge = "br0"
            dhcp4 = true
            [cloud-init]
            hostname = "web-1.example"
        "#;
        let spec = parse_spec(text).unwrap();
        let serde_json::Value::Object(json) = serde_json::to_value(&spec).unwrap() else {
            panic!("a spec is an object")
        };
        let mut keys: Vec<&str> =
            json.keys().map(String::as_str).filter(|k| !["name", "tenant"].contains(k)).collect();
        keys.sort_unstable();
        let mut allowed = provd_domain::VM_SPEC_FIELDS.to_vec();
        allowed.sort_unstable();
        assert_eq!(keys, allowed);
    }
}
