// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The dependency rules of ARCHITECTURE.md, checked against `cargo metadata`
//! and the sources, so that they stay true.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

struct Workspace {
    root: PathBuf,
    /// package id → (name, manifest directory)
    packages: HashMap<String, (String, PathBuf)>,
    /// package id → ids of its normal and build dependencies
    deps: HashMap<String, Vec<String>>,
    members: Vec<String>,
}

fn workspace() -> Workspace {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut packages = HashMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let dir = Path::new(p["manifest_path"].as_str().unwrap()).parent().unwrap().to_path_buf();
        packages.insert(
            p["id"].as_str().unwrap().to_string(),
            (p["name"].as_str().unwrap().to_string(), dir),
        );
    }
    let mut deps = HashMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let id = node["id"].as_str().unwrap().to_string();
        let normal: Vec<String> = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].as_str() != Some("dev"))
            })
            .map(|d| d["pkg"].as_str().unwrap().to_string())
            .collect();
        deps.insert(id, normal);
    }
    let members = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    Workspace { root, packages, deps, members }
}

impl Workspace {
    fn id(&self, name: &str) -> String {
        self.members
            .iter()
            .find(|id| self.packages[*id].0 == name)
            .cloned()
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    /// Names of everything `id` depends on, transitively, dev-dependencies
    /// excluded (they never reach the built artifact).
    fn closure(&self, id: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![id.to_string()];
        while let Some(next) = stack.pop() {
            for dep in self.deps.get(&next).into_iter().flatten() {
                if seen.insert(dep.clone()) {
                    stack.push(dep.clone());
                }
            }
        }
        seen
    }

    fn is_under(&self, id: &str, dir: &str) -> bool {
        self.packages[id].1.starts_with(self.root.join(dir))
    }
}

#[test]
fn the_domain_crate_does_no_io() {
    let ws = workspace();
    let closure: BTreeSet<String> =
        ws.closure(&ws.id("provd-domain")).iter().map(|id| ws.packages[id].0.clone()).collect();
    for forbidden in
        ["wasmtime", "wasmtime-wasi", "tokio", "hyper", "rusqlite", "cap-std", "provd-engine"]
    {
        assert!(!closure.contains(forbidden), "provd-domain depends on {forbidden}");
    }
}

#[test]
fn the_sharing_analysis_is_pure_computation() {
    let ws = workspace();
    let closure: BTreeSet<String> =
        ws.closure(&ws.id("provd-dedup")).iter().map(|id| ws.packages[id].0.clone()).collect();
    for forbidden in ["wasmtime", "tokio", "rusqlite", "cap-std", "provd-store", "provd-images"] {
        assert!(!closure.contains(forbidden), "provd-dedup depends on {forbidden}");
    }
}

#[test]
fn the_filesystem_formats_know_nothing_of_images_plans_or_the_store() {
    let ws = workspace();
    let closure: BTreeSet<String> =
        ws.closure(&ws.id("provd-formats")).iter().map(|id| ws.packages[id].0.clone()).collect();
    for forbidden in ["provd-store", "provd-images", "provd-dedup", "rusqlite", "tokio"] {
        assert!(!closure.contains(forbidden), "provd-formats depends on {forbidden}");
    }
}

#[test]
fn vms_and_partitions_stand_side_by_side() {
    // What a VM attaches passes between them as plain data
    // (`provd_domain::attach`); the node's workflows (repack) use both.
    let ws = workspace();
    let names = |c: &str| -> BTreeSet<String> {
        ws.closure(&ws.id(c)).iter().map(|id| ws.packages[id].0.clone()).collect()
    };
    let vm = names("provd-vm");
    for forbidden in ["provd-partitions", "provd-dedup", "provd-formats", "provd-images"] {
        assert!(!vm.contains(forbidden), "provd-vm depends on {forbidden}");
    }
    assert!(
        !names("provd-partitions").contains("provd-vm"),
        "provd-partitions depends on provd-vm"
    );
}

#[test]
fn the_daemon_is_a_transport_over_the_node() {
    // HTTP, TLS and metrics over provd-node: the node's workflows, its
    // start-up, its records and its queries live there, so among provd's
    // crates the daemon reaches only the node and the wire types.
    let ws = workspace();
    let direct: BTreeSet<String> = ws.deps[&ws.id("provd-daemon")]
        .iter()
        .map(|id| ws.packages[id].0.clone())
        .filter(|n| n.starts_with("provd-"))
        .collect();
    let expected: BTreeSet<String> =
        ["provd-node", "provd-wire"].into_iter().map(String::from).collect();
    assert_eq!(direct, expected, "provd-daemon's provd dependencies");
    // Nor does it hold the store: every read and write goes through `Node`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    for file in rust_files(&root.join("runtime/daemon/src")) {
        let text = std::fs::read_to_string(&file).unwrap();
        for reach in [".store()", "Arc<Store>", "provd_store"] {
            assert!(!text.contains(reach), "{} has `{reach}`", file.display());
        }
    }
}

#[test]
fn managers_read_the_api_through_its_types() {
    // provctl and the client decode answers into provd-wire's types; a
    // field read by JSON pointer would bypass them.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let mut offenders = Vec::new();
    for dir in ["runtime/provctl/src", "runtime/client/src"] {
        for file in rust_files(&root.join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap();
            if text.contains(".pointer(") {
                offenders.push(file.display().to_string());
            }
        }
    }
    assert!(offenders.is_empty(), "JSON pointers into API answers: {offenders:?}");
    // The wire crate depends on no other provd crate: both sides share it.
    let ws = workspace();
    let wire = ws.closure(&ws.id("provd-wire"));
    assert!(!wire.iter().any(|id| ws.packages[id].0.starts_with("provd-")), "{wire:?}");
}

#[test]
fn the_engine_core_knows_nothing_of_the_node() {
    // The engine runs plugins and serves `log` and `progress`; what touches
    // the node (images, dedup, partitions, VMs, hashing of image files) is
    // provd-host's, linked through `HostInterfaces`, as wasmtime-wasi is
    // apart from wasmtime.
    let ws = workspace();
    let engine: BTreeSet<String> =
        ws.closure(&ws.id("provd-engine")).iter().map(|id| ws.packages[id].0.clone()).collect();
    for forbidden in [
        "provd-store",
        "provd-images",
        "provd-dedup",
        "provd-partitions",
        "provd-vm",
        "provd-formats",
        "provd-tools",
        "provd-scan",
        "provd-placement",
        "provd-host",
        "provd-node",
        "provd-libvirt",
        "rusqlite",
    ] {
        assert!(!engine.contains(forbidden), "provd-engine depends on {forbidden}");
    }
    // The one rollback is the node's: neither the engine nor the host
    // interfaces undo what a call built once it has ended (a change that
    // finds its call already ended removes its own result, nothing more).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    for dir in ["runtime/engine/src", "runtime/host/src"] {
        for file in rust_files(&root.join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap();
            for call in ["fn roll_back", ".close()", "remove_partition(id)"] {
                assert!(!text.contains(call), "{} has `{call}`", file.display());
            }
        }
    }
}

#[test]
fn node_side_crates_do_not_depend_on_the_engine() {
    let ws = workspace();
    for krate in [
        "provd-store",
        "provd-images",
        "provd-formats",
        "provd-partitions",
        "provd-vm",
        "provd-bundle",
        "provd-tools",
        "provd-wire",
        "provd-libvirt",
    ] {
        let closure: BTreeSet<String> =
            ws.closure(&ws.id(krate)).iter().map(|id| ws.packages[id].0.clone()).collect();
        for forbidden in ["wasmtime", "provd-engine", "provd-bindings"] {
            assert!(!closure.contains(forbidden), "{krate} depends on {forbidden}");
        }
    }
}

#[test]
fn guest_crates_do_not_depend_on_the_runtime() {
    let ws = workspace();
    let guests: Vec<&String> = ws
        .members
        .iter()
        .filter(|id| {
            ["sdk", "plugins", "examples", "tests/guests"].iter().any(|d| ws.is_under(id, d))
        })
        .collect();
    assert!(guests.len() >= 4, "found guest crates {guests:?}");
    for guest in guests {
        for dep in ws.closure(guest) {
            let name = &ws.packages[&dep].0;
            assert!(
                !ws.is_under(&dep, "runtime") && !name.starts_with("wasmtime") && name != "tokio",
                "guest crate {} depends on {name}",
                ws.packages[guest].0
            );
        }
    }
}

#[test]
fn runtime_crates_do_not_depend_on_guest_crates() {
    let ws = workspace();
    for member in ws.members.iter().filter(|id| ws.is_under(id, "runtime")) {
        for dep in ws.closure(member) {
            assert!(
                !ws.is_under(&dep, "sdk")
                    && !ws.is_under(&dep, "plugins")
                    && !ws.is_under(&dep, "examples"),
                "{} depends on guest crate {}",
                ws.packages[member].0,
                ws.packages[&dep].0
            );
        }
    }
}

#[test]
fn only_the_bindings_crate_runs_host_bindgen() {
    let ws = workspace();
    let mut offenders = Vec::new();
    for member in ws.members.iter().filter(|id| ws.is_under(id, "runtime")) {
        let (name, dir) = &ws.packages[member];
        if name == "provd-bindings" {
            continue;
        }
        for file in rust_files(&dir.join("src")) {
            let text = std::fs::read_to_string(&file).unwrap();
            if text.contains("component::bindgen!") || text.contains("bindgen!({") {
                offenders.push(file.display().to_string());
            }
        }
    }
    assert!(offenders.is_empty(), "bindgen! outside provd-bindings: {offenders:?}");
}

#[test]
fn every_member_uses_the_workspace_lints() {
    let ws = workspace();
    for member in &ws.members {
        let (name, dir) = &ws.packages[member];
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains("[lints]\nworkspace = true"),
            "{name} does not use the workspace lints"
        );
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}
