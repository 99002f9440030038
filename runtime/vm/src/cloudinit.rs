//! cloud-init NoCloud seeds: the `meta-data`, `user-data` and
//! `network-config` files a guest's cloud-init reads from a small ISO9660
//! image labelled `cidata`, and the image itself, written by provd's own
//! ISO9660 writer (`iso9660.rs`).
//!
//! # Instance id
//!
//! cloud-init runs its per-instance modules (users, SSH keys, host key
//! generation, `runcmd`, ...) again whenever the `instance-id` in
//! `meta-data` changes. provd derives that id from the seed's content:
//! `provd-` followed by the first 16 hex digits of a BLAKE3 hash over the VM
//! name, the hostname, and the `user-data` and `network-config` exactly as
//! rendered (the users are part of the rendered `user-data`). So:
//!
//! - rendering the same input again yields the same id, and a restarted or
//!   re-provisioned VM with an unchanged seed keeps its state;
//! - changing the user-data, the users, the hostname or the network gives a
//!   new id, and cloud-init applies the change on the next boot, predictably,
//!   instead of silently ignoring it as "already done for this instance".
//!
//! The price is that a change of the rendering itself (a provd release that
//! emits different YAML for the same input) is a new instance too, with the
//! guest's SSH host keys regenerated: the rendering here is kept stable on
//! purpose.
//!
//! # User-data
//!
//! The users given in the spec become a `#cloud-config` written by provd.
//! When the spec also carries its own user-data, both go into a MIME
//! `multipart/mixed` document, provd's part first: cloud-init merges
//! cloud-config parts in order, so on a key both set, the user's wins.
//! User-data must start with one of cloud-init's content markers
//! (`#cloud-config`, `#!`, `#cloud-boothook`, `#include`,
//! `## template: jinja`, ...): cloud-init silently ignores anything else, so
//! provd refuses it instead. A user-data that is already a MIME document is
//! passed through when it is alone, and refused next to users.
//!
//! # YAML
//!
//! Every string provd writes into YAML is a double-quoted scalar with
//! escapes, never a plain one, so no key comment, shell or hostname can turn
//! into YAML syntax (`: `, `#`, a leading `-`, `yes` read as a boolean by
//! cloud-init's YAML 1.1 parser, ...).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// Largest total size of the seed's files. Real seeds are a few kilobytes;
/// cloud-init reads every file whole into memory at boot, and each VM keeps
/// its own image on the node, so a spec must not be able to grow either
/// without bound. 1 MiB is far above any legitimate cloud-config and still
/// small next to a VM's disk.
pub const MAX_SEED_BYTES: usize = 1 << 20;

/// The volume label cloud-init's NoCloud data source looks for.
pub const VOLUME_ID: &str = "cidata";

/// A user created in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedUser {
    pub name: String,
    pub ssh_authorized_keys: Vec<String>,
    /// Passwordless sudo for everything.
    pub sudo: bool,
    pub shell: Option<String>,
}

/// A guest network interface, matched by MAC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedNic {
    /// Normalised: lowercase, colon-separated (`52:54:00:12:34:56`).
    pub mac: String,
    /// Address with prefix length (`192.0.2.10/24`) and optional gateway.
    pub ipv4: Option<(String, Option<String>)>,
    /// Address with prefix length (`2001:db8::10/64`) and optional gateway.
    pub ipv6: Option<(String, Option<String>)>,
    pub dhcp4: bool,
    pub dhcp6: bool,
    pub dns: Vec<String>,
}

/// What a seed is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedInput {
    /// The VM's name.
    pub vm: String,
    pub hostname: String,
    pub users: Vec<SeedUser>,
    /// The spec's own user-data, if any.
    pub user_data: Option<String>,
    /// A raw network-config that replaces the generated one.
    pub network_config: Option<String>,
    pub nics: Vec<SeedNic>,
}

/// The rendered files of a NoCloud seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub meta_data: String,
    pub user_data: String,
    /// Absent when there is neither an override nor a NIC.
    pub network_config: Option<String>,
    pub instance_id: String,
}

impl Seed {
    /// The files of the image, by name, in the order they are written.
    pub fn files(&self) -> Vec<(&'static str, &str)> {
        let mut files = vec![("meta-data", self.meta_data.as_str())];
        files.push(("user-data", self.user_data.as_str()));
        if let Some(net) = &self.network_config {
            files.push(("network-config", net.as_str()));
        }
        files
    }

    fn total_bytes(&self) -> usize {
        self.files().iter().map(|(_, c)| c.len()).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("seed files total {bytes} bytes, more than the {limit} allowed")]
    TooLarge { bytes: usize, limit: usize },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SeedError {
    SeedError::Invalid { field: field.into(), reason: reason.into() }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SeedError {
    let what = what.into();
    move |source| SeedError::Io { what, source }
}

// ---------------------------------------------------------------------------
// Rendering

/// Renders the seed's files and derives its instance id.
pub fn seed_files(input: &SeedInput) -> Result<Seed, SeedError> {
    check_text("name", &input.vm)?;
    check_text("hostname", &input.hostname)?;
    check_users(&input.users)?;

    let user_data = render_user_data(input)?;
    let network_config = match (&input.network_config, input.nics.is_empty()) {
        (Some(raw), _) => Some(raw.clone()),
        (None, false) => Some(render_network_config(&input.nics)?),
        (None, true) => None,
    };
    let instance_id =
        instance_id(&input.vm, &input.hostname, &user_data, network_config.as_deref());
    let meta_data = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_quote(&instance_id),
        yaml_quote(&input.hostname)
    );
    let seed = Seed { meta_data, user_data, network_config, instance_id };
    check_size(&seed)?;
    Ok(seed)
}

fn check_size(seed: &Seed) -> Result<(), SeedError> {
    let bytes = seed.total_bytes();
    if bytes > MAX_SEED_BYTES {
        return Err(SeedError::TooLarge { bytes, limit: MAX_SEED_BYTES });
    }
    Ok(())
}

/// A value that ends up in a file on the guest or on a command line there:
/// never empty, and free of control characters, which would split an
/// `authorized_keys` line or a `passwd` entry in two.
fn check_text(field: &str, value: &str) -> Result<(), SeedError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

fn check_users(users: &[SeedUser]) -> Result<(), SeedError> {
    let mut names = BTreeSet::new();
    for (i, user) in users.iter().enumerate() {
        let field = format!("cloud-init.users[{i}]");
        check_text(&format!("{field}.name"), &user.name)?;
        if !names.insert(user.name.as_str()) {
            return Err(invalid(format!("{field}.name"), format!("duplicate user {}", user.name)));
        }
        for (j, key) in user.ssh_authorized_keys.iter().enumerate() {
            check_text(&format!("{field}.ssh_authorized_keys[{j}]"), key)?;
        }
        if let Some(shell) = &user.shell {
            check_text(&format!("{field}.shell"), shell)?;
        }
    }
    Ok(())
}

fn instance_id(vm: &str, hostname: &str, user_data: &str, network_config: Option<&str>) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"provd cloud-init instance-id v1\0");
    // Each field is length-prefixed so that moving bytes from one field to
    // the next cannot produce the same hash input.
    let mut field = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(vm.as_bytes());
    field(hostname.as_bytes());
    field(user_data.as_bytes());
    match network_config {
        Some(net) => {
            field(b"1");
            field(net.as_bytes());
        }
        None => field(b"0"),
    }
    let hex = h.finalize().to_hex();
    format!("provd-{}", hex.get(..16).unwrap_or_default())
}

/// Quotes `s` as a YAML double-quoted scalar. Besides `"` and `\`, every
/// character that PyYAML (cloud-init's parser) does not accept literally in
/// a stream, or that YAML treats as a line break (NEL, LS, PS), is escaped;
/// so is the BOM, which a reader may drop.
fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_yaml_escape(c) => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn needs_yaml_escape(c: char) -> bool {
    let u = u32::from(c);
    u < 0x20
        || (0x7F..=0x9F).contains(&u)
        || u == 0x2028
        || u == 0x2029
        || u == 0xFEFF
        || u == 0xFFFE
        || u == 0xFFFF
}

/// provd's own `#cloud-config`: the hostname and the spec's users.
fn render_cloud_config(input: &SeedInput) -> String {
    let mut out = String::from("#cloud-config\n");
    out.push_str(&format!("hostname: {}\n", yaml_quote(&input.hostname)));
    out.push_str("preserve_hostname: false\n");
    // Without a `users` key cloud-init creates the distribution's default
    // user; with one, exactly the listed users (no `default` entry: the spec
    // says who may log in).
    if !input.users.is_empty() {
        out.push_str("users:\n");
    }
    for user in &input.users {
        out.push_str(&format!("  - name: {}\n", yaml_quote(&user.name)));
        // Key-only logins: no password is set, and none may be set later by
        // a stray `passwd` module default.
        out.push_str("    lock_passwd: true\n");
        if user.sudo {
            out.push_str(&format!("    sudo: {}\n", yaml_quote("ALL=(ALL) NOPASSWD:ALL")));
        }
        if let Some(shell) = &user.shell {
            out.push_str(&format!("    shell: {}\n", yaml_quote(shell)));
        }
        if !user.ssh_authorized_keys.is_empty() {
            out.push_str("    ssh_authorized_keys:\n");
            for key in &user.ssh_authorized_keys {
                out.push_str(&format!("      - {}\n", yaml_quote(key)));
            }
        }
    }
    out
}

/// How cloud-init would treat a user-data document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UserDataKind {
    /// One part of this MIME type.
    Part(&'static str),
    /// Already a MIME document.
    Mime,
}

/// cloud-init's start-of-content markers and the MIME type each stands for
/// (its `INCLUSION_TYPES_MAP`). Longer markers come first, because
/// `#cloud-config` is a prefix of `#cloud-config-archive` and `#include` of
/// `#include-once`.
const USER_DATA_TYPES: &[(&str, &str)] = &[
    ("#cloud-config-archive", "text/cloud-config-archive"),
    ("#cloud-config-jsonp", "text/cloud-config-jsonp"),
    ("#cloud-config", "text/cloud-config"),
    ("#cloud-boothook", "text/cloud-boothook"),
    ("#include-once", "text/x-include-once-url"),
    ("#include", "text/x-include-url"),
    ("#part-handler", "text/part-handler"),
    ("## template: jinja", "text/jinja2"),
    ("#!", "text/x-shellscript"),
];

/// Classifies user-data the way cloud-init does: markers are matched on the
/// text with leading whitespace removed, ignoring ASCII case, and a document
/// with a `MIME-Version:` header in its first 4 KiB is MIME.
fn user_data_kind(data: &str) -> Option<UserDataKind> {
    let head = data.trim_start();
    for (marker, mime) in USER_DATA_TYPES {
        if head.get(..marker.len()).is_some_and(|h| h.eq_ignore_ascii_case(marker)) {
            return Some(UserDataKind::Part(mime));
        }
    }
    let start = data.as_bytes().get(..4096).unwrap_or(data.as_bytes());
    if start.to_ascii_lowercase().windows(13).any(|w| w == b"mime-version:") {
        return Some(UserDataKind::Mime);
    }
    None
}

fn render_user_data(input: &SeedInput) -> Result<String, SeedError> {
    const FIELD: &str = "cloud-init.user-data";
    let Some(data) = &input.user_data else {
        return Ok(render_cloud_config(input));
    };
    let kind = user_data_kind(data).ok_or_else(|| {
        invalid(
            FIELD,
            "must start with a cloud-init content marker such as #cloud-config, #! or \
             #cloud-boothook; cloud-init ignores anything else",
        )
    })?;
    if input.users.is_empty() {
        return Ok(data.clone());
    }
    let UserDataKind::Part(mime) = kind else {
        return Err(invalid(
            FIELD,
            "is a MIME document and cannot be combined with cloud-init.users; \
             add the users to it or leave them out of the spec",
        ));
    };
    let ours = render_cloud_config(input);
    multipart(&[
        MimePart { content_type: "text/cloud-config", filename: "provd.cfg", body: &ours },
        MimePart { content_type: mime, filename: "user-data", body: data },
    ])
}

struct MimePart<'a> {
    content_type: &'static str,
    filename: &'static str,
    body: &'a str,
}

/// A `multipart/mixed` document as cloud-init's `make-mime` writes one. The
/// boundary comes from the parts' content, so the same parts always give
/// the same bytes (and instance id).
fn multipart(parts: &[MimePart<'_>]) -> Result<String, SeedError> {
    let mut h = blake3::Hasher::new();
    for part in parts {
        h.update(&(part.body.len() as u64).to_le_bytes());
        h.update(part.body.as_bytes());
    }
    let hex = h.finalize().to_hex();
    let boundary = format!("==provd-{}==", hex.get(..32).unwrap_or_default());
    // A body holding its own hash cannot be made on purpose, but the check
    // costs nothing and keeps the document well-formed whatever happens.
    if parts.iter().any(|p| p.body.contains(&boundary)) {
        return Err(invalid("cloud-init.user-data", "contains the multipart boundary"));
    }
    let mut out =
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n");
    for part in parts {
        out.push_str(&format!("--{boundary}\n"));
        out.push_str(&format!("Content-Type: {}; charset=\"utf-8\"\n", part.content_type));
        out.push_str("MIME-Version: 1.0\n");
        // Plain 7-bit text stays readable in the seed. Anything else is
        // base64: Python's email parser turns a non-ASCII `8bit` payload into
        // `\uXXXX` escapes when cloud-init decodes it.
        let seven_bit = part.body.is_ascii()
            && part.body.lines().all(|l| l.len() <= 998)
            && !part.body.contains('\r');
        if seven_bit {
            out.push_str("Content-Transfer-Encoding: 7bit\n");
        } else {
            out.push_str("Content-Transfer-Encoding: base64\n");
        }
        out.push_str(&format!(
            "Content-Disposition: attachment; filename=\"{}\"\n\n",
            part.filename
        ));
        if seven_bit {
            out.push_str(part.body);
        } else {
            out.push_str(&base64_lines(part.body.as_bytes()));
        }
        // The line break before a boundary belongs to the boundary, so the
        // part's body is decoded back exactly, final newline included.
        out.push('\n');
    }
    out.push_str(&format!("--{boundary}--\n"));
    Ok(out)
}

/// Base64 in lines of 76 characters (RFC 2045), without a final newline.
fn base64_lines(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextet = |n: u32, shift: u32| {
        ALPHABET.get(((n >> shift) & 63) as usize).copied().map(char::from).unwrap_or('=')
    };
    let mut out = String::with_capacity(data.len() / 3 * 4 + data.len() / 57 + 4);
    for (i, chunk) in data.chunks(3).enumerate() {
        if i > 0 && i % 19 == 0 {
            out.push('\n');
        }
        let byte = |k: usize| u32::from(chunk.get(k).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        out.push(sextet(n, 18));
        out.push(sextet(n, 12));
        out.push(if chunk.len() > 1 { sextet(n, 6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(n, 0) } else { '=' });
    }
    out
}

fn check_mac(field: &str, mac: &str) -> Result<(), SeedError> {
    let ok = mac.len() == 17
        && mac.split(':').count() == 6
        && mac.split(':').all(|p| {
            p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(field, "must be a lowercase MAC address like 52:54:00:12:34:56"))
    }
}

/// Checks an `address/prefix` and its gateway for one address family.
fn check_static(field: &str, addr: &str, gateway: Option<&str>, v6: bool) -> Result<(), SeedError> {
    let family = if v6 { "IPv6" } else { "IPv4" };
    let max_prefix = if v6 { 128 } else { 32 };
    let parsed = addr.split_once('/').and_then(|(ip, prefix)| {
        let ip_ok =
            if v6 { ip.parse::<Ipv6Addr>().is_ok() } else { ip.parse::<Ipv4Addr>().is_ok() };
        let prefix_ok =
            !prefix.starts_with('+') && prefix.parse::<u8>().is_ok_and(|p| p <= max_prefix);
        (ip_ok && prefix_ok).then_some(())
    });
    if parsed.is_none() {
        return Err(invalid(
            field,
            format!(
                "{addr:?} is not an {family} address with a prefix length (like {})",
                if v6 { "2001:db8::10/64" } else { "192.0.2.10/24" }
            ),
        ));
    }
    if let Some(gw) = gateway {
        let ok = if v6 { gw.parse::<Ipv6Addr>().is_ok() } else { gw.parse::<Ipv4Addr>().is_ok() };
        if !ok {
            return Err(invalid(
                format!("{field}.gateway"),
                format!("{gw:?} is not an {family} address"),
            ));
        }
    }
    Ok(())
}

fn check_nics(nics: &[SeedNic]) -> Result<(), SeedError> {
    let mut macs = BTreeSet::new();
    for (i, nic) in nics.iter().enumerate() {
        let field = format!("nics[{i}]");
        check_mac(&format!("{field}.mac"), &nic.mac)?;
        if !macs.insert(nic.mac.as_str()) {
            return Err(invalid(
                format!("{field}.mac"),
                format!("duplicate MAC address {}", nic.mac),
            ));
        }
        if let Some((addr, gw)) = &nic.ipv4 {
            check_static(&format!("{field}.ipv4"), addr, gw.as_deref(), false)?;
        }
        if let Some((addr, gw)) = &nic.ipv6 {
            check_static(&format!("{field}.ipv6"), addr, gw.as_deref(), true)?;
        }
        for (j, dns) in nic.dns.iter().enumerate() {
            if dns.parse::<IpAddr>().is_err() {
                return Err(invalid(
                    format!("{field}.dns[{j}]"),
                    format!("{dns:?} is not an IP address"),
                ));
            }
        }
    }
    Ok(())
}

/// Netplan-style network config version 2, one `ethernets` entry per NIC.
fn render_network_config(nics: &[SeedNic]) -> Result<String, SeedError> {
    check_nics(nics)?;
    let mut out = String::from("version: 2\nethernets:\n");
    for (i, nic) in nics.iter().enumerate() {
        // Each NIC is matched by MAC and named `ethN` after its position in
        // the spec, both as the entry's id and by `set-name`. The guest then
        // sees the same names whatever its distribution's naming scheme or
        // PCI layout, and older cloud-init renderers, which take the entry id
        // as the interface name when there is no `set-name`, agree.
        let name = format!("eth{i}");
        out.push_str(&format!("  {name}:\n"));
        out.push_str("    match:\n");
        out.push_str(&format!("      macaddress: {}\n", yaml_quote(&nic.mac)));
        out.push_str(&format!("    set-name: {}\n", yaml_quote(&name)));
        out.push_str(&format!("    dhcp4: {}\n", nic.dhcp4));
        out.push_str(&format!("    dhcp6: {}\n", nic.dhcp6));
        let statics: Vec<&(String, Option<String>)> =
            nic.ipv4.iter().chain(nic.ipv6.iter()).collect();
        if !statics.is_empty() {
            out.push_str("    addresses:\n");
            for (addr, _) in &statics {
                out.push_str(&format!("      - {}\n", yaml_quote(addr)));
            }
        }
        // Default routes are spelled as prefixes, not `to: default`: netplan
        // 0.99 (Ubuntu 20.04) rejects `default`, while every netplan and
        // cloud-init renderer understands the prefixes.
        let routes: Vec<(&str, &str)> = [
            ("0.0.0.0/0", nic.ipv4.as_ref().and_then(|(_, gw)| gw.as_deref())),
            ("::/0", nic.ipv6.as_ref().and_then(|(_, gw)| gw.as_deref())),
        ]
        .into_iter()
        .filter_map(|(to, via)| via.map(|via| (to, via)))
        .collect();
        if !routes.is_empty() {
            out.push_str("    routes:\n");
            for (to, via) in routes {
                out.push_str(&format!("      - to: {}\n", yaml_quote(to)));
                out.push_str(&format!("        via: {}\n", yaml_quote(via)));
            }
        }
        if !nic.dns.is_empty() {
            out.push_str("    nameservers:\n      addresses:\n");
            for dns in &nic.dns {
                out.push_str(&format!("        - {}\n", yaml_quote(dns)));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Images

/// Writes a NoCloud seed ISO9660 image (volume label `cidata`, files
/// `meta-data`, `user-data` and `network-config` when present, Joliet and
/// Rock Ridge, written by provd itself: `iso9660.rs`) at `out`, and returns
/// its size in bytes.
///
/// The image is built in a temporary file next to `out` and renamed over it,
/// so on failure nothing is left at `out` (a file already there stays as it
/// was).
pub fn write_seed_iso(seed: &Seed, out: &Path) -> Result<u64, SeedError> {
    write_seed_iso_with(seed, out, true)
}

/// [`write_seed_iso`], syncing the image before the rename only if
/// `durable`: a caller that syncs the whole filesystem afterwards (an
/// operation, at its end) need not sync each file.
pub fn write_seed_iso_with(seed: &Seed, out: &Path, durable: bool) -> Result<u64, SeedError> {
    check_size(seed)?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if out.file_name().is_none() {
        return Err(invalid("out", format!("{} does not name a file", out.display())));
    }
    let files: Vec<(&str, &[u8])> =
        seed.files().into_iter().map(|(name, content)| (name, content.as_bytes())).collect();
    let bytes =
        crate::iso9660::image(VOLUME_ID, &files).map_err(|e| invalid("seed", e.to_string()))?;
    let mut image = tempfile::Builder::new()
        .prefix(".provd-seed-")
        .suffix(".iso.tmp")
        .tempfile_in(parent)
        .map_err(io(format!("creating a temporary image in {}", parent.display())))?;
    image.write_all(&bytes).map_err(io(format!("writing {}", image.path().display())))?;
    if durable {
        image.as_file().sync_all().map_err(io(format!("syncing {}", image.path().display())))?;
    }
    image.persist(out).map_err(|e| SeedError::Io {
        what: format!("renaming the image to {}", out.display()),
        source: e.error,
    })?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests;
