//! The checks every spec passes before anything is rendered from it: each
//! field against its bounds and syntax, every problem reported at once with
//! its field path.

use super::*;

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
pub(super) struct Problems(Vec<FieldError>);

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
pub(super) fn check_ifname(name: &str) -> Result<(), String> {
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

pub(super) fn check_ip_config<A: IpFamily>(ip: &IpConfig<A>, f: &str, p: &mut Problems) {
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

pub(super) fn generated_mac_bytes(vm_name: &str, nic_index: usize) -> [u8; 6] {
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
pub(super) fn check_hostname(name: &str) -> Result<(), String> {
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

pub(super) fn validate_cloud_init(ci: &CloudInit, p: &mut Problems) {
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

pub(super) fn check_user_name(name: &str) -> Result<(), String> {
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
pub(super) fn check_boot_path(path: &str) -> Result<(), String> {
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

pub(super) fn validate_boot(boot: &Boot, p: &mut Problems) {
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

pub(super) fn validate_labels(labels: &BTreeMap<String, String>, p: &mut Problems) {
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
