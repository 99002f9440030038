//! Golden tests for the renderers (the spec's refusals are in `spec_refusals.rs`).
//!
//! Every example spec under `examples/vms/` is parsed, validated and
//! rendered for its hypervisor with a fixed render input; the output must
//! equal `tests/golden/<example>.<xml|json>`. `PROVD_BLESS=1` rewrites the
//! goldens instead. Domain XML is checked with libvirt's own schema
//! (`virt-xml-validate`), Cloud Hypervisor and Firecracker JSON against the
//! field lists of their sources (the binaries are not installed here).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use provd_domain::{CpuMode, DomainType, Machine};
use provd_vm::render::{
    AttachedDisk, DiskDevice, DiskFormat, DiskRole, RenderError, RenderInput, Rendered, SharedDir,
    cloud_hypervisor_json, firecracker_json, libvirt_xml, render,
};
use provd_vm::spec::{Boot, Hypervisor, VmSpec, generated_mac, parse_spec};
use serde_json::Value;

const UUID: &str = "6f1c2a9e-3b7d-4c1e-9a55-0123456789ab";
const PARTITIONS: &str = "/var/lib/provd/partitions/p-0123456789abcdef";

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/vms")
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn examples() -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("toml" | "json")))
        .map(|p| (p.file_stem().unwrap().to_str().unwrap().to_string(), p))
        .collect();
    out.sort();
    out
}

fn load(name: &str) -> VmSpec {
    let path = examples().into_iter().find(|(n, _)| n == name).unwrap().1;
    parse_spec(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The render input provd would build for `spec`, at fixed paths: the
/// private root and a disk-format shared partition of one plan, a disk per
/// data disk, a seed when cloud-init is asked for, and the boot files
/// resolved under the node's `boot/` folder.
fn fixed_input(spec: &VmSpec) -> RenderInput<'_> {
    let vm_dir = format!("/var/lib/provd/vms/{}", spec.name);
    let mut disks = vec![
        // Shared first and seed in the middle: renderers must reorder.
        AttachedDisk {
            role: DiskRole::Shared,
            name: "shared-0".into(),
            path: format!("{PARTITIONS}/shared.erofs").into(),
            format: DiskFormat::Raw,
            read_only: true,
            device: DiskDevice::Virtio,
        },
        AttachedDisk {
            role: DiskRole::Private,
            name: "root".into(),
            path: format!("{PARTITIONS}/private.ext4").into(),
            format: DiskFormat::Raw,
            read_only: false,
            device: DiskDevice::Virtio,
        },
    ];
    if spec.cloud_init.is_some() {
        disks.push(AttachedDisk {
            role: DiskRole::Seed,
            name: "seed".into(),
            path: format!("{vm_dir}/seed.iso").into(),
            format: DiskFormat::Raw,
            read_only: true,
            device: DiskDevice::Virtio,
        });
    }
    for d in spec.disks.iter().rev() {
        disks.push(AttachedDisk {
            role: DiskRole::Data,
            name: format!("data-{}", d.name),
            path: format!("{vm_dir}/data-{}.{}", d.name, d.format.as_str()).into(),
            format: d.format,
            read_only: false,
            device: DiskDevice::Virtio,
        });
    }
    let (kernel, initrd) = match &spec.boot {
        Boot::Kernel { kernel, initrd, .. } => (
            Some(PathBuf::from(format!("/var/lib/provd/boot/{kernel}"))),
            initrd.as_ref().map(|i| PathBuf::from(format!("/var/lib/provd/boot/{i}"))),
        ),
        Boot::Firmware { .. } => (None, None),
    };
    RenderInput {
        spec,
        uuid: UUID.into(),
        disks,
        shared_dirs: Vec::new(),
        kernel,
        initrd,
        firmware: None,
        serial_log: Some(format!("{vm_dir}/serial.log").into()),
        machine: Machine::default(),
        run_as: None,
    }
}

/// The same input with the shared partition as a virtio-fs directory.
fn with_shared_dir(mut input: RenderInput<'_>) -> RenderInput<'_> {
    input.disks.retain(|d| d.role != DiskRole::Shared);
    input.shared_dirs = vec![SharedDir {
        path: format!("{PARTITIONS}/shared").into(),
        tag: "provd-shared".into(),
        socket: format!("/run/provd/vms/{}/virtiofs.sock", input.spec.name).into(),
    }];
    input
}

/// Compares with the golden file, or rewrites it under `PROVD_BLESS=1`.
fn check_golden(file: &str, actual: &str) {
    let path = golden_dir().join(file);
    if std::env::var("PROVD_BLESS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("golden {} unreadable ({e}); run with PROVD_BLESS=1 to create it", path.display())
    });
    if expected == actual {
        return;
    }
    let mut report = format!(
        "rendered output differs from {} (PROVD_BLESS=1 cargo test -p provd-vm --test render \
         rewrites it; review the diff before committing):\n",
        path.display()
    );
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let mut shown = 0;
    for i in 0..e.len().max(a.len()) {
        let (el, al) = (e.get(i), a.get(i));
        if el != al {
            if let Some(l) = el {
                report.push_str(&format!("-{:>4} {l}\n", i + 1));
            }
            if let Some(l) = al {
                report.push_str(&format!("+{:>4} {l}\n", i + 1));
            }
            shown += 1;
            if shown == 20 {
                report.push_str("… (more differences)\n");
                break;
            }
        }
    }
    panic!("{report}");
}

/// `virt-xml-validate FILE domain` with Debian's libvirt-clients (setup.sh
/// installs it); a missing validator fails the test rather than skipping a
/// check the goldens depend on.
fn virt_xml_validate(xml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("domain.xml");
    std::fs::write(&file, xml).unwrap();
    let out = Command::new("virt-xml-validate")
        .arg(&file)
        .arg("domain")
        .output()
        .expect("virt-xml-validate (Debian package libvirt-clients) must be installed");
    assert!(
        out.status.success(),
        "virt-xml-validate refused the domain:\n{}{}\n{xml}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn examples_exist_for_every_hypervisor() {
    let names: Vec<String> = examples().into_iter().map(|(n, _)| n).collect();
    for want in ["api", "db", "edge", "web"] {
        assert!(names.contains(&want.to_string()), "examples/vms/{want}.* missing");
    }
    let hypervisors: BTreeSet<&str> =
        names.iter().map(|n| load(n).hypervisor.as_str()).collect::<Vec<_>>().into_iter().collect();
    assert_eq!(hypervisors.len(), 3, "{hypervisors:?}");
}

#[test]
fn examples_render_to_their_goldens() {
    for (name, _) in examples() {
        let spec = load(&name);
        let Rendered { file_name, text } = render(&fixed_input(&spec)).unwrap();
        let ext = match spec.hypervisor {
            Hypervisor::Libvirt => {
                assert_eq!(file_name, "domain.xml");
                virt_xml_validate(&text);
                "xml"
            }
            Hypervisor::CloudHypervisor => {
                assert_eq!(file_name, "vm.json");
                check_cloud_hypervisor(&serde_json::from_str(&text).unwrap());
                "json"
            }
            Hypervisor::Firecracker => {
                assert_eq!(file_name, "firecracker.json");
                check_firecracker(&serde_json::from_str(&text).unwrap());
                "json"
            }
        };
        check_golden(&format!("{name}.{ext}"), &text);
    }
}

#[test]
fn virtiofs_variants_render_and_validate() {
    let web = load("web");
    let xml = libvirt_xml(&with_shared_dir(fixed_input(&web))).unwrap();
    virt_xml_validate(&xml);
    assert!(xml.contains("<driver type=\"virtiofs\"/>"), "{xml}");
    assert!(xml.contains("<access mode=\"shared\"/>"), "{xml}");
    check_golden("web.virtiofs.xml", &xml);

    let api = load("api");
    let ch = cloud_hypervisor_json(&with_shared_dir(fixed_input(&api))).unwrap();
    check_cloud_hypervisor(&ch);
    assert_eq!(ch["memory"]["shared"], Value::Bool(true));
    assert_eq!(ch["fs"][0]["tag"], "provd-shared");
    check_golden("api.virtiofs.json", &format!("{}\n", serde_json::to_string_pretty(&ch).unwrap()));
}

#[test]
fn emulated_domains_ask_for_qemu_and_the_most_it_emulates_and_keep_it() {
    // A node without usable KVM: domain type qemu, and a CPU mode libvirt
    // can start under it (host-passthrough would refuse every domain).
    let web = load("web");
    let mut input = fixed_input(&web);
    input.machine = Machine::new(DomainType::Qemu, None).unwrap();
    let xml = libvirt_xml(&input).unwrap();
    virt_xml_validate(&xml);
    assert!(xml.contains("<domain type=\"qemu\">"), "{xml}");
    assert!(xml.contains("<cpu mode=\"maximum\" check=\"none\""), "{xml}");
    assert!(!xml.contains("host-passthrough"), "{xml}");
    // What a repack reads back to write the domain again the same way.
    assert_eq!(provd_vm::qemu::domain_machine(&xml), Some(input.machine));
    // KVM nodes: the host's CPU by default, another mode when asked.
    let kvm = libvirt_xml(&fixed_input(&web)).unwrap();
    assert!(kvm.contains("<domain type=\"kvm\">") && kvm.contains("mode=\"host-passthrough\""));
    assert_eq!(provd_vm::qemu::domain_machine(&kvm), Some(Machine::default()));
    input.machine = Machine::new(DomainType::Kvm, Some(CpuMode::HostModel)).unwrap();
    let model = libvirt_xml(&input).unwrap();
    virt_xml_validate(&model);
    assert_eq!(provd_vm::qemu::domain_machine(&model), Some(input.machine));
    // A host CPU under emulation is refused before any domain is written.
    for mode in [CpuMode::HostPassthrough, CpuMode::HostModel] {
        let e = Machine::new(DomainType::Qemu, Some(mode)).unwrap_err();
        assert!(e.contains(mode.as_str()) && e.contains("maximum"), "{e}");
    }
    // A domain provd did not write says nothing it can keep.
    assert_eq!(provd_vm::qemu::domain_machine("<domain type=\"xen\"/>"), None);
    assert_eq!(provd_vm::qemu::domain_machine("not xml <"), None);
}

#[test]
fn libvirt_disk_layout() {
    let db = load("db");
    let xml = libvirt_xml(&fixed_input(&db)).unwrap();
    // Root first and writable, then shared, then data disks in spec order,
    // then the seed, every one a virtio disk (a cloud kernel has no SATA).
    let order: Vec<usize> =
        ["private.ext4", "shared.erofs", "data-pgdata.qcow2", "data-wal.raw", "seed.iso"]
            .iter()
            .map(|f| xml.find(f).unwrap_or_else(|| panic!("{f} missing:\n{xml}")))
            .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}\n{xml}");
    assert!(xml.contains("<target dev=\"vda\" bus=\"virtio\"/>"));
    assert!(xml.contains("<target dev=\"vdd\" bus=\"virtio\"/>"));
    assert!(xml.contains("<target dev=\"vde\" bus=\"virtio\"/>"));
    assert!(!xml.contains("sata") && !xml.contains("cdrom"), "{xml}");
    assert!(xml.contains("<driver name=\"qemu\" type=\"qcow2\"/>"));
    assert!(xml.contains("<os firmware=\"efi\">"));
    let root = &xml[xml.find("private.ext4").unwrap()..xml.find("shared.erofs").unwrap()];
    assert!(!root.contains("<readonly/>"), "root must be writable");
    let shared = &xml[xml.find("shared.erofs").unwrap()..xml.find("data-pgdata").unwrap()];
    assert!(shared.contains("<readonly/>") && shared.contains("<shareable/>"));
}

#[test]
fn labels_are_escaped_and_parse_back() {
    let mut web = load("web");
    web.labels.insert("x/evil".into(), "</provd:label><injected a='1'/>&amp;]]>".into());
    web.validate().unwrap();
    let xml = libvirt_xml(&fixed_input(&web)).unwrap();
    virt_xml_validate(&xml);
    assert!(!xml.contains("<injected"), "{xml}");
    // Read it back with libxml2 (the parser libvirt itself uses): every
    // value round-trips.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("domain.xml");
    std::fs::write(&file, &xml).unwrap();
    let mut labels = BTreeMap::new();
    for k in web.labels.keys() {
        let xpath = format!(
            "string(/domain/metadata/*[local-name()='labels']/*[local-name()='label'][@key='{k}'])"
        );
        let out = Command::new("xmllint").arg("--xpath").arg(&xpath).arg(&file).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let value = String::from_utf8(out.stdout).unwrap();
        labels.insert(k.clone(), value.strip_suffix('\n').unwrap_or(&value).to_string());
    }
    assert_eq!(labels, web.labels);
}

#[test]
fn macs_are_deterministic_and_distinct() {
    // The documented formula, computed independently.
    let expected = |name: &str, i: usize| {
        let mut h = blake3::Hasher::new();
        h.update(format!("provd-mac\0{name}\0{i}").as_bytes());
        let b = h.finalize();
        let b = b.as_bytes();
        format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
    };
    let mut by_index0 = BTreeSet::new();
    let names = 3000;
    for n in 0..names {
        let name = format!("vm-{n}");
        let macs: Vec<String> = (0..8).map(|i| generated_mac(&name, i)).collect();
        for (i, m) in macs.iter().enumerate() {
            assert_eq!(m, &generated_mac(&name, i), "not deterministic");
            assert_eq!(m, &expected(&name, i));
            let parsed = provd_vm::spec::parse_mac(m).unwrap();
            assert_eq!(parsed[0] & 1, 0, "multicast {m}");
        }
        let distinct: BTreeSet<&String> = macs.iter().collect();
        assert_eq!(distinct.len(), 8, "{name}: {macs:?}");
        by_index0.insert(macs[0].clone());
    }
    // 24 random bits: among 3000 names about 0.27 collisions are expected
    // (birthday bound), so a handful means the hash input is not varying.
    assert!(by_index0.len() >= names - 3, "{} distinct of {names}", by_index0.len());

    // A spec's effective MACs: explicit ones lowercased, others generated.
    let web = load("web");
    assert_eq!(web.macs(), vec!["52:54:00:0a:10:01".to_string()]);
    let api = load("api");
    assert_eq!(api.macs(), vec![generated_mac("api-3", 0), generated_mac("api-3", 1)]);
}

// ---- schema checks for the JSON renderers --------------------------------

#[derive(Clone, Copy)]
enum Ty {
    Int,
    Bool,
    Str,
    Obj(&'static Schema),
    Arr(&'static Schema),
    Enum(&'static [&'static str]),
}

struct Schema {
    name: &'static str,
    fields: &'static [(&'static str, Ty)],
    required: &'static [&'static str],
}

fn check_against(schema: &Schema, value: &Value, path: &str) {
    let obj = value.as_object().unwrap_or_else(|| panic!("{path}: not an object"));
    for req in schema.required {
        assert!(obj.contains_key(*req), "{path}: required {}.{req} missing", schema.name);
    }
    for (k, v) in obj {
        let ty = schema
            .fields
            .iter()
            .find(|(n, _)| n == k)
            .unwrap_or_else(|| panic!("{path}.{k}: not a field of {}", schema.name))
            .1;
        let p = format!("{path}.{k}");
        match ty {
            Ty::Int => assert!(v.is_u64(), "{p}: not a non-negative integer: {v}"),
            Ty::Bool => assert!(v.is_boolean(), "{p}: not a boolean: {v}"),
            Ty::Str => assert!(v.is_string(), "{p}: not a string: {v}"),
            Ty::Enum(vals) => {
                assert!(vals.contains(&v.as_str().unwrap_or("")), "{p}: {v} not one of {vals:?}")
            }
            Ty::Obj(s) => check_against(s, v, &p),
            Ty::Arr(s) => {
                for (i, item) in
                    v.as_array().unwrap_or_else(|| panic!("{p}: not an array")).iter().enumerate()
                {
                    check_against(s, item, &format!("{p}[{i}]"));
                }
            }
        }
    }
}

// Cloud Hypervisor: components/schemas in vmm/src/api/openapi/cloud-hypervisor.yaml
// (cloud-hypervisor/cloud-hypervisor at ae44c297, v51+). Only the objects provd
// writes are spelled out; their field lists are complete.
const CH_TOPOLOGY: Schema = Schema {
    name: "CpuTopology",
    fields: &[
        ("threads_per_core", Ty::Int),
        ("cores_per_die", Ty::Int),
        ("dies_per_package", Ty::Int),
        ("packages", Ty::Int),
    ],
    required: &[],
};
const CH_CPUS: Schema = Schema {
    name: "CpusConfig",
    fields: &[
        ("boot_vcpus", Ty::Int),
        ("max_vcpus", Ty::Int),
        ("topology", Ty::Obj(&CH_TOPOLOGY)),
        ("kvm_hyperv", Ty::Bool),
        ("max_phys_bits", Ty::Int),
        ("nested", Ty::Bool),
        ("affinity", Ty::Str),
        ("features", Ty::Str),
        ("core_scheduling", Ty::Enum(&["Vm", "Vcpu", "Off"])),
    ],
    required: &["boot_vcpus", "max_vcpus"],
};
const CH_MEMORY: Schema = Schema {
    name: "MemoryConfig",
    fields: &[
        ("size", Ty::Int),
        ("hotplug_size", Ty::Int),
        ("hotplugged_size", Ty::Int),
        ("mergeable", Ty::Bool),
        ("hotplug_method", Ty::Str),
        ("shared", Ty::Bool),
        ("hugepages", Ty::Bool),
        ("hugepage_size", Ty::Int),
        ("prefault", Ty::Bool),
        ("reserve", Ty::Bool),
        ("thp", Ty::Bool),
        ("zones", Ty::Str),
    ],
    required: &["size"],
};
const CH_PAYLOAD: Schema = Schema {
    name: "PayloadConfig",
    fields: &[
        ("firmware", Ty::Str),
        ("kernel", Ty::Str),
        ("cmdline", Ty::Str),
        ("initramfs", Ty::Str),
        ("igvm", Ty::Str),
        ("host_data", Ty::Str),
    ],
    required: &[],
};
const CH_DISK: Schema = Schema {
    name: "DiskConfig",
    fields: &[
        ("path", Ty::Str),
        ("readonly", Ty::Bool),
        ("direct", Ty::Bool),
        ("iommu", Ty::Bool),
        ("num_queues", Ty::Int),
        ("queue_size", Ty::Int),
        ("vhost_user", Ty::Bool),
        ("vhost_socket", Ty::Str),
        ("rate_limiter_config", Ty::Str),
        ("pci_segment", Ty::Int),
        ("pci_device_id", Ty::Int),
        ("id", Ty::Str),
        ("serial", Ty::Str),
        ("rate_limit_group", Ty::Str),
        ("queue_affinity", Ty::Str),
        ("backing_files", Ty::Bool),
        ("sparse", Ty::Bool),
        ("image_type", Ty::Enum(&["FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"])),
        ("lock_granularity", Ty::Enum(&["ByteRange", "Full"])),
    ],
    required: &[],
};
const CH_NET: Schema = Schema {
    name: "NetConfig",
    fields: &[
        ("tap", Ty::Str),
        ("ip", Ty::Str),
        ("mask", Ty::Str),
        ("mac", Ty::Str),
        ("host_mac", Ty::Str),
        ("mtu", Ty::Int),
        ("iommu", Ty::Bool),
        ("num_queues", Ty::Int),
        ("queue_size", Ty::Int),
        ("vhost_user", Ty::Bool),
        ("vhost_socket", Ty::Str),
        ("vhost_mode", Ty::Str),
        ("id", Ty::Str),
        ("pci_segment", Ty::Int),
        ("pci_device_id", Ty::Int),
        ("rate_limiter_config", Ty::Str),
        ("offload_tso", Ty::Bool),
        ("offload_ufo", Ty::Bool),
        ("offload_csum", Ty::Bool),
    ],
    required: &[],
};
const CH_FS: Schema = Schema {
    name: "FsConfig",
    fields: &[
        ("tag", Ty::Str),
        ("socket", Ty::Str),
        ("num_queues", Ty::Int),
        ("queue_size", Ty::Int),
        ("pci_segment", Ty::Int),
        ("pci_device_id", Ty::Int),
        ("id", Ty::Str),
    ],
    required: &["num_queues", "queue_size", "socket", "tag"],
};
const CH_CONSOLE_MODES: &[&str] = &["Off", "Pty", "Tty", "File", "Socket", "Null"];
const CH_SERIAL: Schema = Schema {
    name: "SerialConfig",
    fields: &[("file", Ty::Str), ("socket", Ty::Str), ("mode", Ty::Enum(CH_CONSOLE_MODES))],
    required: &["mode"],
};
const CH_CONSOLE: Schema = Schema {
    name: "ConsoleConfig",
    fields: &[
        ("file", Ty::Str),
        ("socket", Ty::Str),
        ("mode", Ty::Enum(CH_CONSOLE_MODES)),
        ("iommu", Ty::Bool),
        ("id", Ty::Str),
        ("pci_segment", Ty::Int),
        ("pci_device_id", Ty::Int),
    ],
    required: &["mode"],
};
// VmConfig: the objects provd does not write are typed Str so that any use
// of them fails the type check and gets its own schema here first.
const CH_PMEM: Schema = Schema {
    name: "PmemConfig",
    fields: &[
        ("file", Ty::Str),
        ("size", Ty::Int),
        ("iommu", Ty::Bool),
        ("discard_writes", Ty::Bool),
        ("pci_segment", Ty::Int),
        ("id", Ty::Str),
    ],
    required: &["file"],
};
const CH_VM: Schema = Schema {
    name: "VmConfig",
    fields: &[
        ("cpus", Ty::Obj(&CH_CPUS)),
        ("memory", Ty::Obj(&CH_MEMORY)),
        ("payload", Ty::Obj(&CH_PAYLOAD)),
        ("rate_limit_groups", Ty::Str),
        ("disks", Ty::Arr(&CH_DISK)),
        ("net", Ty::Arr(&CH_NET)),
        ("rng", Ty::Str),
        ("balloon", Ty::Str),
        ("fs", Ty::Arr(&CH_FS)),
        ("generic_vhost_user", Ty::Str),
        ("pmem", Ty::Arr(&CH_PMEM)),
        ("serial", Ty::Obj(&CH_SERIAL)),
        ("console", Ty::Obj(&CH_CONSOLE)),
        ("debug_console", Ty::Str),
        ("devices", Ty::Str),
        ("user_devices", Ty::Str),
        ("vdpa", Ty::Str),
        ("vsock", Ty::Str),
        ("numa", Ty::Str),
        ("iommu", Ty::Bool),
        ("watchdog", Ty::Bool),
        ("rtc", Ty::Str),
        ("pvpanic", Ty::Bool),
        ("pci_segments", Ty::Str),
        ("platform", Ty::Str),
        ("tpm", Ty::Str),
        ("landlock_enable", Ty::Bool),
        ("landlock_rules", Ty::Str),
    ],
    required: &["payload"],
};

fn check_cloud_hypervisor(v: &Value) {
    check_against(&CH_VM, v, "vm");
    // Semantics the schema does not state: a payload is a kernel or a
    // firmware, and device ids are unique across the VM.
    let payload = v["payload"].as_object().unwrap();
    assert!(payload.contains_key("kernel") ^ payload.contains_key("firmware"), "{payload:?}");
    let mut ids = BTreeSet::new();
    for list in ["disks", "net", "fs", "pmem"] {
        for d in v[list].as_array().map(|a| a.as_slice()).unwrap_or_default() {
            assert!(ids.insert(d["id"].as_str().unwrap().to_string()), "duplicate id {d}");
        }
    }
    assert!(v["cpus"]["boot_vcpus"].as_u64() <= v["cpus"]["max_vcpus"].as_u64());
}

// Firecracker: VmmConfig in src/vmm/src/resources.rs (kebab-case keys) and
// the structs of src/vmm/src/vmm_config/{boot_source,drive,machine_config,net}.rs,
// all deny_unknown_fields (firecracker-microvm/firecracker at 81b38b9d);
// tests/framework/vm_config.json is the same shape.
const FC_BOOT: Schema = Schema {
    name: "BootSourceConfig",
    fields: &[("kernel_image_path", Ty::Str), ("initrd_path", Ty::Str), ("boot_args", Ty::Str)],
    required: &["kernel_image_path"],
};
const FC_DRIVE: Schema = Schema {
    name: "BlockDeviceConfig",
    fields: &[
        ("drive_id", Ty::Str),
        ("partuuid", Ty::Str),
        ("is_root_device", Ty::Bool),
        ("cache_type", Ty::Enum(&["Unsafe", "Writeback"])),
        ("is_read_only", Ty::Bool),
        ("path_on_host", Ty::Str),
        ("rate_limiter", Ty::Str),
        ("io_engine", Ty::Enum(&["Sync", "Async"])),
        ("socket", Ty::Str),
    ],
    required: &["drive_id", "is_root_device"],
};
const FC_MACHINE: Schema = Schema {
    name: "MachineConfig",
    fields: &[
        ("vcpu_count", Ty::Int),
        ("mem_size_mib", Ty::Int),
        ("smt", Ty::Bool),
        ("cpu_template", Ty::Str),
        ("track_dirty_pages", Ty::Bool),
        ("huge_pages", Ty::Enum(&["None", "2M"])),
        ("gdb_socket_path", Ty::Str),
    ],
    required: &["vcpu_count", "mem_size_mib"],
};
const FC_NET: Schema = Schema {
    name: "NetworkInterfaceConfig",
    fields: &[
        ("iface_id", Ty::Str),
        ("host_dev_name", Ty::Str),
        ("guest_mac", Ty::Str),
        ("mtu", Ty::Int),
        ("rx_rate_limiter", Ty::Str),
        ("tx_rate_limiter", Ty::Str),
    ],
    required: &["iface_id", "host_dev_name"],
};
const FC_PMEM: Schema = Schema {
    name: "PmemConfig",
    fields: &[
        ("id", Ty::Str),
        ("path_on_host", Ty::Str),
        ("root_device", Ty::Bool),
        ("read_only", Ty::Bool),
    ],
    required: &["id", "path_on_host"],
};
const FC_VMM: Schema = Schema {
    name: "VmmConfig",
    fields: &[
        ("balloon", Ty::Str),
        ("drives", Ty::Arr(&FC_DRIVE)),
        ("boot-source", Ty::Obj(&FC_BOOT)),
        ("cpu-config", Ty::Str),
        ("logger", Ty::Str),
        ("machine-config", Ty::Obj(&FC_MACHINE)),
        ("metrics", Ty::Str),
        ("mmds-config", Ty::Str),
        ("network-interfaces", Ty::Arr(&FC_NET)),
        ("vsock", Ty::Str),
        ("entropy", Ty::Str),
        ("pmem", Ty::Arr(&FC_PMEM)),
        ("memory-hotplug", Ty::Str),
    ],
    // `drives` has no serde default in VmmConfig, so it must be present.
    required: &["boot-source", "drives"],
};

fn check_firecracker(v: &Value) {
    check_against(&FC_VMM, v, "config");
    let m = &v["machine-config"];
    let vcpus = m["vcpu_count"].as_u64().unwrap();
    // MachineConfig: 1..=32 vcpus, and 1 or an even number with SMT.
    assert!((1..=32).contains(&vcpus));
    if m["smt"] == Value::Bool(true) {
        assert!(vcpus == 1 || vcpus.is_multiple_of(2));
    }
    let drives = v["drives"].as_array().unwrap();
    assert!(drives.iter().filter(|d| d["is_root_device"] == Value::Bool(true)).count() <= 1);
    let ids: BTreeSet<&str> = drives.iter().map(|d| d["drive_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), drives.len());
    // Guest MACs: six colon-separated hex pairs (MacAddr's parser).
    for nic in v["network-interfaces"].as_array().unwrap() {
        provd_vm::spec::parse_mac(nic["guest_mac"].as_str().unwrap()).unwrap();
    }
}

// ---- refusals ------------------------------------------------------------

#[test]
fn json_and_toml_agree() {
    let web = load("web");
    let json = serde_json::to_string(&web).unwrap();
    assert_eq!(parse_spec(&json).unwrap(), web);
    let toml_text = toml::to_string(&web).unwrap();
    assert_eq!(parse_spec(&toml_text).unwrap(), web);
    let db = load("db");
    assert_eq!(parse_spec(&serde_json::to_string(&db).unwrap()).unwrap(), db);
}

// ---- renderer refusals ---------------------------------------------------

fn render_err(spec: &VmSpec, f: impl FnOnce(&mut RenderInput)) -> RenderError {
    let mut input = fixed_input(spec);
    f(&mut input);
    match render(&input) {
        Ok(r) => panic!("rendered:\n{}", r.text),
        Err(e) => e,
    }
}

fn field_of(e: &RenderError) -> &str {
    e.field_name().unwrap_or_else(|| panic!("no field: {e}"))
}

#[test]
fn firecracker_refusals() {
    let ok = firecracker_json(&fixed_input(&load("edge"))).unwrap();
    check_firecracker(&ok);
    assert_eq!(ok["machine-config"]["smt"], Value::Bool(true));
    let mut edge = load("edge");
    edge.nics[0].tap = None;
    edge.nics[0].bridge = Some("br0".into());
    assert_eq!(field_of(&render_err(&edge, |_| {})), "nics[0].bridge");

    let edge = load("edge");
    let e = render_err(&edge, |i| {
        *i = with_shared_dir(i.clone());
    });
    assert_eq!(field_of(&e), "input.shared_dirs");
    assert!(e.to_string().contains("virtio-fs"), "{e}");

    let mut fw = load("edge");
    fw.boot = Boot::Firmware { firmware: provd_vm::spec::Firmware::Uefi };
    assert_eq!(field_of(&render_err(&fw, |_| {})), "boot.firmware");

    let mut big = load("edge");
    big.vcpus = 33;
    big.topology = None;
    let e = render_err(&big, |_| {});
    assert_eq!(field_of(&e), "vcpus");
    assert!(e.to_string().contains("32"), "{e}");

    let mut qcow = load("edge");
    qcow.disks.push(provd_vm::spec::DataDisk {
        name: "scratch".into(),
        size_gib: 1,
        format: DiskFormat::Qcow2,
    });
    assert_eq!(field_of(&render_err(&qcow, |_| {})), "disks[0].format");

    let mut topo = load("edge");
    topo.vcpus = 4;
    topo.topology = Some(provd_vm::spec::Topology { sockets: 1, cores: 1, threads: 4 });
    assert_eq!(field_of(&render_err(&topo, |_| {})), "topology.threads");
}

#[test]
fn cloud_hypervisor_refusals() {
    let mut api = load("api");
    api.nics[1].tap = None;
    api.nics[1].bridge = Some("br0".into());
    let e = render_err(&api, |_| {});
    assert_eq!(field_of(&e), "nics[1].bridge");

    let mut bios = load("api");
    bios.boot = Boot::default();
    assert_eq!(field_of(&render_err(&bios, |_| {})), "boot.firmware");

    let mut uefi = load("api");
    uefi.boot = Boot::Firmware { firmware: provd_vm::spec::Firmware::Uefi };
    assert_eq!(field_of(&render_err(&uefi, |_| {})), "input.firmware");
    let mut input = fixed_input(&uefi);
    input.firmware = Some("/var/lib/provd/boot/CLOUDHV.fd".into());
    let v = cloud_hypervisor_json(&input).unwrap();
    check_cloud_hypervisor(&v);
    assert_eq!(v["payload"]["firmware"], "/var/lib/provd/boot/CLOUDHV.fd");
}

#[test]
fn render_input_must_agree_with_spec() {
    let web = load("web");
    assert_eq!(field_of(&render_err(&web, |i| i.kernel = None)), "input.kernel");
    assert_eq!(field_of(&render_err(&web, |i| i.initrd = None)), "input.initrd");
    assert_eq!(
        field_of(&render_err(&web, |i| i.kernel = Some("relative/vmlinuz".into()))),
        "input.kernel"
    );
    assert_eq!(field_of(&render_err(&web, |i| i.uuid = "nope".into())), "input.uuid");
    assert_eq!(
        field_of(&render_err(&web, |i| i.disks.retain(|d| d.role != DiskRole::Private))),
        "input.disks"
    );
    let e = render_err(&web, |i| {
        for d in &mut i.disks {
            if d.role == DiskRole::Shared {
                d.read_only = false;
            }
        }
    });
    assert_eq!(field_of(&e), "input.disks[0].read_only");
    let db = load("db");
    assert_eq!(
        field_of(&render_err(&db, |i| i.disks.retain(|d| d.name != "data-wal"))),
        "disks[1]"
    );
    let e = render_err(&db, |i| {
        for d in &mut i.disks {
            if d.name == "data-pgdata" {
                d.format = DiskFormat::Raw;
            }
        }
    });
    assert!(field_of(&e).ends_with(".format"), "{e}");
    assert_eq!(field_of(&render_err(&db, |i| i.kernel = Some("/k".into()))), "input.kernel");
    // An invalid spec is refused by every renderer, whoever built it.
    let mut bad = load("web");
    bad.vcpus = 0;
    let e = render_err(&bad, |_| {});
    assert!(matches!(&e, RenderError::Spec(s) if s.mentions("vcpus")), "{e}");
}

/// The input with `n` disk-format shared partitions, given last first.
fn with_shared_disks(mut input: RenderInput<'_>, n: usize) -> RenderInput<'_> {
    input.disks.retain(|d| d.role != DiskRole::Shared);
    for i in (0..n).rev() {
        input.disks.push(AttachedDisk {
            role: DiskRole::Shared,
            name: format!("shared-{i}"),
            path: format!("{PARTITIONS}/shared-{i}.erofs").into(),
            format: DiskFormat::Raw,
            read_only: true,
            device: DiskDevice::Virtio,
        });
    }
    input
}

#[test]
fn several_shared_partitions_are_attached_in_order_read_only_and_bounded() {
    let web = load("web");
    let input = with_shared_disks(fixed_input(&web), 3);
    let xml = libvirt_xml(&input).unwrap();
    let at = |s: &str| xml.find(s).unwrap_or_else(|| panic!("{s} not in {xml}"));
    // Root first, then shared-0, shared-1, shared-2: the order the boot
    // files list them.
    assert!(at("private.ext4") < at("shared-0.erofs"));
    assert!(
        at("shared-0.erofs") < at("shared-1.erofs") && at("shared-1.erofs") < at("shared-2.erofs")
    );
    assert_eq!(xml.matches("<shareable/>").count(), 3);
    assert!(at("<serial>shared-2</serial>") > 0);
    let api = load("api");
    let ch = cloud_hypervisor_json(&with_shared_disks(fixed_input(&api), 2)).unwrap();
    let ids: Vec<&str> =
        ch["disks"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(&ids[..3], ["root", "shared-0", "shared-1"]);
    assert!(ch["disks"][1]["readonly"].as_bool().unwrap());
    let edge = load("edge");
    let fc = firecracker_json(&with_shared_disks(fixed_input(&edge), 2)).unwrap();
    let drives: Vec<&str> =
        fc["drives"].as_array().unwrap().iter().map(|d| d["drive_id"].as_str().unwrap()).collect();
    assert_eq!(&drives[..3], ["root", "shared-0", "shared-1"]);
    assert!(fc["drives"][2]["is_read_only"].as_bool().unwrap());
    // Past the bound: refused, naming the input.
    let e = render_err(&web, |i| *i = with_shared_disks(i.clone(), 9));
    assert_eq!(field_of(&e), "input.disks");
    assert!(e.to_string().contains("at most 8"), "{e}");
    // A shared disk not named shared-<n> is refused.
    let e = render_err(&web, |i| {
        if let Some(d) = i.disks.iter_mut().find(|d| d.role == DiskRole::Shared) {
            d.name = "shared".into();
        }
    });
    assert!(e.to_string().contains("shared-<n>"), "{e}");
}

/// `with_shared_disks`, each shared disk reaching the guest as `device`.
fn shared_as(input: RenderInput<'_>, n: usize, device: DiskDevice) -> RenderInput<'_> {
    let mut input = with_shared_disks(input, n);
    for d in input.disks.iter_mut().filter(|d| d.role == DiskRole::Shared) {
        d.device = device;
    }
    input
}

#[test]
fn shared_partitions_as_persistent_memory_are_mapped_read_only_by_every_hypervisor() {
    let pmem = DiskDevice::Pmem { bytes: 6 << 20 };
    // libvirt: QEMU's own read-only, private backend (libvirt's
    // virtio-pmem would map the file shared and writable), device memory
    // room and a NUMA cell; the domain validates and boots under plain
    // qemu with the same devices.
    let web = load("web");
    let xml = libvirt_xml(&shared_as(fixed_input(&web), 2, pmem)).unwrap();
    virt_xml_validate(&xml);
    assert!(!xml.contains("shared-0.erofs\"/>"), "a pmem partition is no disk:\n{xml}");
    assert!(!xml.contains("<memory model"), "{xml}");
    assert!(xml.contains(r#"<maxMemory slots="2" unit="MiB">"#), "{xml}");
    assert!(xml.contains("<cell id=\"0\""), "{xml}");
    // Persistent memory lies above 4 GiB: a guest of at most 2 GiB boots
    // without the 64 MiB of bounce buffers its kernel would reserve.
    assert!(xml.contains("<cmdline>console=ttyS0 quiet swiotlb=noforce</cmdline>"), "{xml}");
    let mut big = web.clone();
    big.memory_mib = 4096;
    let xml_big = libvirt_xml(&shared_as(fixed_input(&big), 1, pmem)).unwrap();
    assert!(xml_big.contains("<cmdline>console=ttyS0 quiet</cmdline>"), "{xml_big}");
    let plain = libvirt_xml(&fixed_input(&web)).unwrap();
    assert!(!plain.contains("swiotlb"), "{plain}");
    let domain = provd_vm::qemu::parse_domain(&xml).unwrap();
    assert_eq!(domain.pmem.len(), 2);
    assert_eq!(domain.pmem[1].id, "shared-1");
    assert_eq!(domain.pmem[1].bytes, 6 << 20);
    assert!(domain.disks.iter().all(|d| !d.serial.starts_with("shared-")));
    let args = provd_vm::qemu::qemu_args(&domain, provd_vm::qemu::Accel::Tcg).join(" ");
    assert!(
        args.contains(&format!("-m {}M,slots=2,maxmem={}M", web.memory_mib, web.memory_mib + 12)),
        "{args}"
    );
    let backends: Vec<Value> = args
        .split(" -object ")
        .skip(1)
        .map(|a| serde_json::from_str(a.split(" -device ").next().unwrap()).unwrap())
        .collect();
    assert_eq!(backends.len(), 2, "{args}");
    for b in &backends {
        assert_eq!((&b["readonly"], &b["share"]), (&Value::Bool(true), &Value::Bool(false)), "{b}");
    }
    // A plain boot passes on no other QEMU argument.
    let tampered = xml.replacen("&quot;readonly&quot;:true", "&quot;readonly&quot;:false", 1);
    assert_ne!(tampered, xml);
    let e = provd_vm::qemu::parse_domain(&tampered).unwrap_err();
    assert!(e.to_string().contains("read-only persistent memory"), "{e}");

    // Cloud Hypervisor: pmem with discard_writes (read-only, private).
    let api = load("api");
    let ch = cloud_hypervisor_json(&shared_as(fixed_input(&api), 1, pmem)).unwrap();
    check_cloud_hypervisor(&ch);
    assert_eq!(ch["pmem"][0]["discard_writes"], Value::Bool(true), "{ch}");
    assert_eq!(ch["pmem"][0]["size"], 6 << 20);
    assert!(ch["disks"].as_array().unwrap().iter().all(|d| d["id"] != "shared-0"));

    // Firecracker 1.14: pmem, read-only.
    let edge = load("edge");
    let fc = firecracker_json(&shared_as(fixed_input(&edge), 1, pmem)).unwrap();
    check_firecracker(&fc);
    assert_eq!(fc["pmem"][0]["read_only"], Value::Bool(true), "{fc}");
    assert_eq!(fc["pmem"][0]["root_device"], Value::Bool(false), "{fc}");

    // Read past the host's page cache: libvirt cache='none', Cloud
    // Hypervisor direct; Firecracker cannot, and says so.
    let direct = DiskDevice::VirtioDirect;
    let xml = libvirt_xml(&shared_as(fixed_input(&web), 1, direct)).unwrap();
    virt_xml_validate(&xml);
    assert_eq!(xml.matches(r#"cache="none""#).count(), 1, "{xml}");
    let domain = provd_vm::qemu::parse_domain(&xml).unwrap();
    assert!(domain.disks.iter().find(|d| d.serial == "shared-0").unwrap().direct);
    let ch = cloud_hypervisor_json(&shared_as(fixed_input(&api), 1, direct)).unwrap();
    check_cloud_hypervisor(&ch);
    assert_eq!(ch["disks"][1]["direct"], Value::Bool(true), "{ch}");
    let e = firecracker_json(&shared_as(fixed_input(&edge), 1, direct)).unwrap_err();
    assert!(field_of(&e).ends_with(".device") && e.to_string().contains("page cache"), "{e}");

    // What cannot be mapped is refused, naming the input.
    let e = render_err(&web, |i| *i = shared_as(i.clone(), 1, DiskDevice::Pmem { bytes: 3 << 20 }));
    assert!(e.to_string().contains("multiple of 2 MiB"), "{e}");
    let e = render_err(&web, |i| {
        if let Some(d) = i.disks.iter_mut().find(|d| d.role == DiskRole::Private) {
            d.device = pmem;
        }
    });
    assert!(e.to_string().contains("only a shared partition"), "{e}");
}
