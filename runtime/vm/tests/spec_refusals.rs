#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The spec's refusals: every bound, name rule and field of a VM spec
//! refused with the path of the field at fault, every problem of a spec
//! reported at once.

use provd_vm::spec::*;

const BASE: &str = r#"
name = "t"
hypervisor = "libvirt"
vcpus = 2
memory-mib = 1024
image = "example/image:1"
"#;

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJDiwd0q0EtpBdN27xv1S9+KrgNRz6jxD4skH2FHqmCr a@b";

fn spec_err(text: &str) -> SpecError {
    match parse_spec(text) {
        Ok(s) => panic!("accepted:\n{text}\n{s:?}"),
        Err(e) => e,
    }
}

/// Asserts the spec is refused and the error names `field`, both in its
/// structured form and in its message.
fn refused(text: &str, field: &str) -> SpecError {
    let e = spec_err(text);
    assert!(e.mentions(field), "error does not name {field}: {e}");
    assert!(e.to_string().contains(field), "message does not name {field}: {e}");
    let msg = e.to_string();
    assert!(!msg.ends_with('.'), "message ends with a period: {msg}");
    e
}

fn with(extra: &str) -> String {
    format!("{BASE}{extra}")
}

fn replace(from: &str, to: &str) -> String {
    assert!(BASE.contains(from));
    BASE.replace(from, to)
}

#[test]
fn base_spec_is_valid() {
    let s = parse_spec(BASE).unwrap();
    assert_eq!(s.boot, Boot::default());
    assert_eq!(s.hostname(), "t");
}

#[test]
fn vcpus_and_memory_bounds() {
    refused(&replace("vcpus = 2", "vcpus = 0"), "vcpus");
    refused(&replace("vcpus = 2", "vcpus = 257"), "vcpus");
    refused(&replace("vcpus = 2", "vcpus = 4294967295"), "vcpus");
    // Larger than u32: a type error at parse time, still naming the field.
    refused(&replace("vcpus = 2", "vcpus = 99999999999"), "vcpus");
    refused(&replace("vcpus = 2", "vcpus = -1"), "vcpus");
    refused(&replace("memory-mib = 1024", "memory-mib = 0"), "memory-mib");
    refused(&replace("memory-mib = 1024", "memory-mib = 127"), "memory-mib");
    refused(&replace("memory-mib = 1024", "memory-mib = 1048577"), "memory-mib");
    parse_spec(&replace("memory-mib = 1024", "memory-mib = 1048576")).unwrap();
    parse_spec(&replace("vcpus = 2", "vcpus = 256")).unwrap();
}

#[test]
fn every_problem_is_reported() {
    let text = replace("vcpus = 2", "vcpus = 0").replace("memory-mib = 1024", "memory-mib = 1");
    let e = spec_err(&format!("{text}[labels]\n\"Bad Key\" = \"v\"\n"));
    assert!(e.mentions("vcpus") && e.mentions("memory-mib") && e.mentions("labels"), "{e}");
    assert_eq!(e.problems.len(), 3, "{e}");
    assert!(e.to_string().starts_with("3 problems in the spec: "), "{e}");
}

#[test]
fn name_rules() {
    for bad in ["", "1abc", "Web", "web-", "a_b", &"a".repeat(64)] {
        refused(&replace("name = \"t\"", &format!("name = {bad:?}")), "name");
    }
    parse_spec(&replace("name = \"t\"", &format!("name = {:?}", "a".repeat(63)))).unwrap();
}

#[test]
fn duplicate_and_multicast_macs() {
    let dup = with(
        "[[nics]]\nbridge = \"br0\"\nmac = \"52:54:00:aa:bb:cc\"\n\
         [[nics]]\nbridge = \"br0\"\nmac = \"52:54:00:AA:BB:CC\"\n",
    );
    let e = refused(&dup, "nics[1].mac");
    assert!(e.to_string().contains("nics[0]"), "{e}");
    let explicit_equals_generated = with(&format!(
        "[[nics]]\nbridge = \"br0\"\n[[nics]]\nbridge = \"br0\"\nmac = \"{}\"\n",
        generated_mac("t", 0)
    ));
    refused(&explicit_equals_generated, "nics[1].mac");
    let e =
        refused(&with("[[nics]]\nbridge = \"br0\"\nmac = \"01:00:5e:00:00:01\"\n"), "nics[0].mac");
    assert!(e.to_string().contains("multicast"), "{e}");
    refused(&with("[[nics]]\nbridge = \"br0\"\nmac = \"52:54:00:00:00\"\n"), "nics[0].mac");
    refused(&with("[[nics]]\nbridge = \"br0\"\nmac = \"52:54:00:00:00:zz\"\n"), "nics[0].mac");
}

#[test]
fn nic_rules() {
    refused(&with("[[nics]]\nbridge = \"br0\"\ntap = \"tap0\"\n"), "nics[0]");
    refused(&with("[[nics]]\ndhcp4 = true\n"), "nics[0]");
    refused(&with("[[nics]]\nbridge = \"a-very-long-bridge-name\"\n"), "nics[0].bridge");
    refused(&with("[[nics]]\ntap = \"..\"\n"), "nics[0].tap");
    refused(&with("[[nics]]\ntap = \"tap 0\"\n"), "nics[0].tap");
    refused(
        &with(
            "[[nics]]\nbridge = \"br0\"\ndhcp4 = true\n[nics.ipv4]\naddress = \"192.0.2.10/24\"\n",
        ),
        "nics[0].ipv4",
    );
    refused(
        &with(
            "[[nics]]\nbridge = \"br0\"\n[nics.ipv4]\naddress = \"192.0.2.10/24\"\ngateway = \"192.0.3.1\"\n",
        ),
        "nics[0].ipv4.gateway",
    );
    refused(
        &with(
            "[[nics]]\nbridge = \"br0\"\n[nics.ipv6]\naddress = \"2001:db8::10/64\"\ngateway = \"2001:db9::1\"\n",
        ),
        "nics[0].ipv6.gateway",
    );
    refused(
        &with("[[nics]]\nbridge = \"br0\"\n[nics.ipv4]\naddress = \"192.0.2.10/33\"\n"),
        "nics[0].ipv4.address",
    );
    refused(
        &with("[[nics]]\nbridge = \"br0\"\n[nics.ipv4]\naddress = \"2001:db8::1/64\"\n"),
        "nics[0].ipv4.address",
    );
    refused(&with("[[nics]]\nbridge = \"br0\"\ndns = [\"not-an-ip\"]\n"), "nics[0].dns[0]");
    refused(
        &with(
            "[[nics]]\nbridge = \"br0\"\ndns = [\"1.1.1.1\", \"1.0.0.1\", \"8.8.8.8\", \"8.8.4.4\", \"9.9.9.9\"]\n",
        ),
        "nics[0].dns",
    );
    let nine: String = (0..9).map(|i| format!("[[nics]]\ntap = \"tap{i}\"\n")).collect();
    refused(&with(&nine), "nics");
}

#[test]
fn hostname_rules() {
    for bad in ["-web", "web-", "web..example", "we_b", &format!("{}.com", "a".repeat(64))] {
        refused(&with(&format!("[cloud-init]\nhostname = {bad:?}\n")), "cloud-init.hostname");
    }
    let long = vec!["a".repeat(63); 4].join(".");
    assert!(long.len() > 253);
    refused(&with(&format!("[cloud-init]\nhostname = {long:?}\n")), "cloud-init.hostname");
    let s = parse_spec(&with("[cloud-init]\nhostname = \"Web-01.Example.com\"\n")).unwrap();
    assert_eq!(s.hostname(), "Web-01.Example.com");
}

fn user_with_key(key: &str) -> String {
    with(&format!("[[cloud-init.users]]\nname = \"ops\"\nssh-authorized-keys = [{key:?}]\n"))
}

#[test]
fn ssh_key_rules() {
    let field = "cloud-init.users[0].ssh-authorized-keys[0]";
    parse_spec(&user_with_key(ED25519)).unwrap();
    // Bad base64: a stray character, and a dropped padding character.
    refused(&user_with_key(&ED25519.replace("AAAAC3", "AAAA*3")), field);
    let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBCOKN/S/tVxmgLH7rTTK2PCNJddNzkiSxQLNzU12OPGuf/PtwpTAkdSf+iECU4yuYbl0MNt4IARWF9rODmAk86A=";
    parse_spec(&user_with_key(ecdsa)).unwrap();
    refused(&user_with_key(ecdsa.trim_end_matches('=')), field);
    // Unknown type.
    let e = refused(&user_with_key(&ED25519.replace("ssh-ed25519", "ssh-dss")), field);
    assert!(e.to_string().contains("ssh-dss"), "{e}");
    // Known type, but the blob holds another type.
    let e = refused(&user_with_key(&ED25519.replace("ssh-ed25519", "ssh-rsa")), field);
    assert!(e.to_string().contains("ssh-ed25519"), "{e}");
    // Options, no key data, a truncated blob, an injected second line.
    refused(&user_with_key(&format!("command=\"/bin/sh\" {ED25519}")), field);
    refused(&user_with_key("ssh-ed25519"), field);
    refused(&user_with_key("ssh-ed25519 AAAA"), field);
    refused(&user_with_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"), field);
    refused(&user_with_key(&format!("{ED25519}\nssh-rsa AAAA evil")), field);
    refused(&user_with_key(&format!("{ED25519} {}", "c".repeat(16 * 1024))), field);
}

#[test]
fn user_rules() {
    refused(&with("[[cloud-init.users]]\nname = \"Root\"\n"), "cloud-init.users[0].name");
    refused(&with("[[cloud-init.users]]\nname = \"9lives\"\n"), "cloud-init.users[0].name");
    refused(
        &with("[[cloud-init.users]]\nname = \"a\"\n[[cloud-init.users]]\nname = \"a\"\n"),
        "cloud-init.users[1].name",
    );
    refused(
        &with("[[cloud-init.users]]\nname = \"a\"\nshell = \"bash\"\n"),
        "cloud-init.users[0].shell",
    );
    refused(
        &with("[[cloud-init.users]]\nname = \"a\"\nshell = \"/bin/ba sh\"\n"),
        "cloud-init.users[0].shell",
    );
}

#[test]
fn unknown_fields_are_refused() {
    let e = refused(&with("colour = \"red\"\n"), "colour");
    assert!(e.to_string().starts_with("colour: unknown field"), "{e}");
    let e = refused(&with("[[nics]]\nbridge = \"br0\"\ncolour = \"red\"\n"), "nics[0].colour");
    assert_eq!(e.problems[0].field, "nics[0].colour");
    refused(&with("[[nics]]\nbridge = \"br0\"\ncolour = \"red\"\n"), "nics[0].colour");
    refused(
        &with(
            "[[nics]]\nbridge = \"br0\"\n[nics.ipv4]\naddress = \"192.0.2.1/24\"\nmask = \"x\"\n",
        ),
        "nics[0].ipv4.mask",
    );
    refused(&with("[cloud-init]\nvendor-data = \"x\"\n"), "cloud-init.vendor-data");
    refused(
        &with("[[cloud-init.users]]\nname = \"a\"\npassword = \"x\"\n"),
        "cloud-init.users[0].password",
    );
    refused(&with("[topology]\nsockets = 1\ncores = 2\nthreads = 1\ndies = 1\n"), "topology.dies");
    refused(&with("[[disks]]\nname = \"d\"\nsize-gib = 1\ncache = \"none\"\n"), "disks[0].cache");
    refused(&with("[boot]\nkernel = \"k\"\nappend = \"x\"\n"), "boot.append");
    // snake_case spellings are unknown too: one spelling per field.
    refused(&replace("memory-mib", "memory_mib"), "memory_mib");
    // JSON: same rules, same paths.
    let json = r#"{"name":"t","hypervisor":"libvirt","vcpus":1,"memory-mib":512,"image":"i",
        "nics":[{"tap":"tap0","speed":10}]}"#;
    refused(json, "nics[0].speed");
    refused(r#"{"name":"t","extra":1}"#, "extra");
}

#[test]
fn boot_rules() {
    refused(&with("[boot]\nkernel = \"../../etc/shadow\"\n"), "boot.kernel");
    refused(&with("[boot]\nkernel = \"debian/../../x\"\n"), "boot.kernel");
    refused(&with("[boot]\nkernel = \"/boot/vmlinuz\"\n"), "boot.kernel");
    refused(&with("[boot]\nkernel = \"k\"\ninitrd = \"a/../../i\"\n"), "boot.initrd");
    refused(
        &with(&format!("[boot]\nkernel = \"k\"\ncmdline = {:?}\n", "x".repeat(2049))),
        "boot.cmdline",
    );
    refused(&with("[boot]\nkernel = \"k\"\ncmdline = \"a\\nb\"\n"), "boot.cmdline");
    refused(&with("[boot]\nkernel = \"k\"\nfirmware = \"uefi\"\n"), "boot");
    refused(&with("[boot]\nfirmware = \"uefi\"\ncmdline = \"x\"\n"), "boot");
    refused(&with("[boot]\n"), "boot");
    refused(&with("[boot]\nfirmware = \"coreboot\"\n"), "boot");
    let s = parse_spec(&with("[boot]\nkernel = \"a/vmlinuz\"\n")).unwrap();
    assert_eq!(s.boot, Boot::Kernel { kernel: "a/vmlinuz".into(), initrd: None, cmdline: None });
}

#[test]
fn cloud_init_size_caps() {
    let big = "#".repeat(MAX_USER_DATA_BYTES + 1);
    refused(&with(&format!("[cloud-init]\nuser-data = \"{big}\"\n")), "cloud-init.user-data");
    let ok = "#".repeat(MAX_USER_DATA_BYTES);
    parse_spec(&with(&format!("[cloud-init]\nuser-data = \"{ok}\"\n"))).unwrap();
    refused(
        &with(&format!("[cloud-init]\nnetwork-config = \"{big}\"\n")),
        "cloud-init.network-config",
    );
}

#[test]
fn oversized_spec_is_refused() {
    let text = format!("{BASE}# {}\n", "x".repeat(MAX_SPEC_BYTES));
    refused(&text, "spec");
    let json = format!("{{\"name\": \"{}\"}}", "x".repeat(MAX_SPEC_BYTES));
    refused(&json, "spec");
}

#[test]
fn syntax_errors_name_the_document() {
    let e = refused("name = ", "spec");
    assert!(e.to_string().contains("toml"), "{e}");
    let e = refused("{\"name\": ", "spec");
    assert!(e.to_string().contains("json"), "{e}");
    refused(
        &format!(
            "{}\n{{}}",
            r#"{"name":"t","hypervisor":"libvirt","vcpus":1,"memory-mib":512,"image":"i"}"#
        ),
        "spec",
    );
    refused(&replace("hypervisor = \"libvirt\"", "hypervisor = \"xen\""), "hypervisor");
    let e = refused(&replace("name = \"t\"\n", ""), "name");
    assert!(e.to_string().contains("missing field"), "{e}");
    refused(
        &with("[[nics]]\nbridge = \"br0\"\n[nics.ipv4]\ngateway = \"192.0.2.1\"\n"),
        "nics[0].ipv4.address",
    );
}

#[test]
fn topology_must_match_vcpus() {
    let e = refused(&with("[topology]\nsockets = 2\ncores = 2\nthreads = 2\n"), "topology");
    assert!(e.to_string().contains("vcpus"), "{e}");
    refused(&with("[topology]\nsockets = 0\ncores = 2\nthreads = 1\n"), "topology.sockets");
    parse_spec(&with("[topology]\nsockets = 1\ncores = 1\nthreads = 2\n")).unwrap();
    // Overflow of the product in u32 must not wrap to a match.
    refused(&with("[topology]\nsockets = 65536\ncores = 65536\nthreads = 1\n"), "topology");
    refused(
        &with("[topology]\nsockets = 4294967295\ncores = 4294967295\nthreads = 4294967295\n"),
        "topology",
    );
}

#[test]
fn data_disk_rules() {
    refused(&with("[[disks]]\nname = \"root\"\nsize-gib = 1\n"), "disks[0].name");
    refused(&with("[[disks]]\nname = \"Data\"\nsize-gib = 1\n"), "disks[0].name");
    refused(
        &with("[[disks]]\nname = \"d\"\nsize-gib = 1\n[[disks]]\nname = \"d\"\nsize-gib = 2\n"),
        "disks[1].name",
    );
    refused(&with("[[disks]]\nname = \"d\"\nsize-gib = 0\n"), "disks[0].size-gib");
    refused(&with("[[disks]]\nname = \"d\"\nsize-gib = 65537\n"), "disks[0].size-gib");
    refused(&with("[[disks]]\nname = \"d\"\nsize-gib = 1\nformat = \"vmdk\"\n"), "disks[0].format");
    let seventeen: String =
        (0..17).map(|i| format!("[[disks]]\nname = \"d{i}\"\nsize-gib = 1\n")).collect();
    refused(&with(&seventeen), "disks");
}

#[test]
fn label_rules() {
    refused(&with("[labels]\n\"Upper\" = \"v\"\n"), "labels");
    refused(&with("[labels]\n\"a b\" = \"v\"\n"), "labels");
    refused(&with(&format!("[labels]\n{} = \"v\"\n", "k".repeat(64))), "labels");
    refused(&with(&format!("[labels]\nk = {:?}\n", "v".repeat(257))), "labels.k");
    refused(&with("[labels]\nk = \"a\\u0007b\"\n"), "labels.k");
    refused(&with("[labels]\nk = \"a\\uFFFEb\"\n"), "labels.k");
    let many: String = (0..65).map(|i| format!("k{i} = \"v\"\n")).collect();
    refused(&with(&format!("[labels]\n{many}")), "labels");
    parse_spec(&with("[labels]\n\"a.b/c_d-e\" = \"<&>'\\\"\"\n")).unwrap();
}

#[test]
fn image_rules() {
    refused(&replace("image = \"example/image:1\"", "image = \"\""), "image");
    refused(
        &replace("image = \"example/image:1\"", &format!("image = {:?}", "i".repeat(2049))),
        "image",
    );
}
