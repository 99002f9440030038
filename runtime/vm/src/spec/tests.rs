#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
use super::checks::check_boot_path;
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
        shared-attach = "block"
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
