// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The hostile-plugin corpus: every host function a plugin can import,
//! called by a plugin granted all of them (`tests/guests/abuser`) with
//! generated hostile arguments: empty, NUL, control and bidi characters,
//! traversal and absolute paths, 64 KiB and 1 MiB strings, ids of things
//! that are not the plugin's, extreme numbers, huge and duplicated lists,
//! more live handles than allowed, byte strings past the grant and past
//! the per-call limit; deeper calls put the hostile argument behind a real
//! plan or a built partition; the WASI subset every plugin is linked with
//! (random bytes past wasmtime-wasi's limit, stdin, 64 MiB of stdout,
//! 100000 pollables, exit) and resource handles forged by number, reused
//! after drop or of another type. Each case's outcome (the host's error kind,
//! or the engine's limit) is compared with `tests/abuse.expected`, a table
//! read and checked by hand (`PROVD_BLESS=1` rewrites it; review the
//! diff). After each case the same engine serves a well-behaved call, and
//! nothing was written outside the node's data directory.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use provd_domain::{Manifest, NodePolicy};
use provd_engine::{CollectingObserver, EngineConfig, Request};
use provd_host::{Engine, Plugin};
use provd_images::{Images, ImportLimits};
use provd_store::Store;
use provd_tests::ABUSER;
use serde_json::{Value, json};

/// Hostile strings, by name.
fn strings() -> Vec<(&'static str, Value)> {
    vec![
        ("empty", json!("")),
        ("nul", json!("a\u{0}b")),
        ("controls", json!("\n\r\t\u{1b}[2J")),
        ("traversal", json!("../../../../etc/passwd")),
        ("absolute", json!("/etc/passwd")),
        ("64KiB", json!({"repeat": ["x", 65536]})),
        ("1MiB", json!({"repeat": ["x", 1 << 20]})),
        ("bidi", json!("\u{202e}gpj.exe")),
        ("emoji", json!({"repeat": ["\u{1f980}", 1000]})),
        ("percent", json!("%2e%2e%2f%2e%2e%2fetc")),
        ("windows", json!("C:\\Windows\\system32")),
        ("foreign-id", json!("p-0000000000000000")),
        ("glob", json!("*")),
    ]
}

fn cases(web: &str, elsewhere: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    // Every call but the bare fetches has the allowed image fetched first,
    // so that the hostile argument meets the checks behind the fetch.
    let mut add = |name: String, call: &str, args: Value| {
        let fetch = if call == "images.fetch" { json!([]) } else { json!([web]) };
        out.push((name, json!({"call": call, "args": args, "fetch": fetch})));
    };
    let web_pair = json!({"pairs": [["web", web]]});
    let spec = json!({"name": "web", "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512,
                      "image": web, "boot": {"firmware": "uefi"}})
    .to_string();
    for (n, s) in strings() {
        add(format!("images.fetch {n}"), "images.fetch", json!([s]));
        add(format!("images.entries {n}"), "images.entries", json!([s, 0, 10]));
        add(format!("images.read-file path {n}"), "images.read-file", json!([web, s]));
        add(format!("images.read-file image {n}"), "images.read-file", json!([s, "etc/hostname"]));
        add(format!("hashing.hash-file path {n}"), "hashing.hash-file", json!([web, s]));
        add(format!("dedup.layer-entries {n}"), "dedup.layer-entries", json!([s, 0, 10]));
        add(format!("dedup.analyse vm {n}"), "dedup.analyse", json!([{"pairs": [[s, web]]}]));
        add(
            format!("partitions.create-shared plan {n}"),
            "partitions.create-shared",
            json!([s, "erofs"]),
        );
        add(
            format!("after-plan.create-shared format {n}"),
            "after-plan.create-shared",
            json!([web_pair, s]),
        );
        add(
            format!("partitions.create-private plan {n}"),
            "partitions.create-private",
            json!([s, "web", null, "ext4", 0]),
        );
        add(
            format!("after-plan.create-private vm {n}"),
            "after-plan.create-private",
            json!([web_pair, s, "ext4", 0]),
        );
        add(
            format!("after-plan.create-private format {n}"),
            "after-plan.create-private",
            json!([web_pair, "web", s, 0]),
        );
        add(
            format!("partitions.add-file partition {n}"),
            "partitions.add-file",
            json!([s, "etc/x", "x", 0o644]),
        );
        add(
            format!("after-build.add-file path {n}"),
            "after-build.add-file",
            json!([web_pair, s, "x", 0o644]),
        );
        add(format!("vm.configure spec {n}"), "vm.configure", json!([s, "p-0000000000000000"]));
        add(
            format!("after-build.configure spec {n}"),
            "after-build.configure",
            json!([web_pair, s]),
        );
        add(format!("vm.configure private {n}"), "vm.configure", json!([spec, s]));
        add(format!("vm.customize {n}"), "vm.customize", json!([s]));
        add(format!("progress.report phase {n}"), "progress.report", json!([s, 0, null]));
        add(format!("log.write message {n}"), "log.write", json!([s, null]));
    }
    // An image outside the grant, and one the grant allows but the node
    // does not hold.
    add("images.fetch outside the grant".into(), "images.fetch", json!([elsewhere]));
    add(
        "images.read-file unfetched".into(),
        "images.read-file",
        json!([elsewhere, "etc/hostname"]),
    );
    // Extreme numbers.
    add("images.entries offset max".into(), "images.entries", json!([web, u64::MAX, 10]));
    add("images.entries limit 0".into(), "images.entries", json!([web, 0, 0]));
    add("images.entries limit max".into(), "images.entries", json!([web, 0, u32::MAX]));
    add(
        "dedup.layer-entries extremes".into(),
        "dedup.layer-entries",
        json!(["l-0", u64::MAX, u32::MAX]),
    );
    add("progress done past total".into(), "progress.report", json!(["x", u64::MAX, 0]));
    add(
        "after-plan.create-private size max".into(),
        "after-plan.create-private",
        json!([web_pair, "web", "ext4", u64::MAX]),
    );
    add(
        "after-plan.create-private size 1".into(),
        "after-plan.create-private",
        json!([web_pair, "web", "ext4", 1]),
    );
    add(
        "after-build.add-file mode max".into(),
        "after-build.add-file",
        json!([web_pair, "etc/x", "x", u32::MAX]),
    );
    add(
        "after-build.add-file setuid".into(),
        "after-build.add-file",
        json!([web_pair, "usr/bin/su", "x", 0o4755]),
    );
    add(
        "after-build.add-file 65 MiB".into(),
        "after-build.add-file",
        json!([web_pair, "big", {"bytes": 65 << 20}, 0o644]),
    );
    add(
        "after-build.add-file over /etc/hostname dir".into(),
        "after-build.add-file",
        json!([web_pair, "etc", "x", 0o644]),
    );
    add(
        "dedup.plan extreme policy".into(),
        "dedup.plan",
        json!([web_pair, {"min-layer-bytes": u64::MAX, "max-layers": u32::MAX}]),
    );
    add("dedup.plan no layers allowed".into(), "dedup.plan", json!([web_pair, {"max-layers": 0}]));
    // Lists.
    add("dedup.analyse no VMs".into(), "dedup.analyse", json!([{"pairs": []}]));
    add(
        "dedup.analyse one VM twice".into(),
        "dedup.analyse",
        json!([{"pairs": [["web", web], ["web", web]]}]),
    );
    add(
        "dedup.analyse 10000 VMs".into(),
        "dedup.analyse",
        json!([{"pairs-repeat": [["web", web], 10000]}]),
    );
    add(
        "dedup.analyse unfetched image".into(),
        "dedup.analyse",
        json!([{"pairs": [["db", elsewhere]]}]),
    );
    add(
        "partitions.create-privates 100000 VMs".into(),
        "partitions.create-privates",
        json!(["x", {"list-repeat": ["web", 100_000]}, null, "ext4", 0]),
    );
    add(
        "vm.configure-all 10000 VMs".into(),
        "vm.configure-all",
        json!([{"pairs-repeat": [[spec, "p-0"], 10000]}]),
    );
    add("vm.configure-all none".into(), "vm.configure-all", json!([{"pairs": []}]));
    add(
        "log.write 10000 fields".into(),
        "log.write",
        json!(["x", {"pairs-repeat": [["k", "v"], 10000]}]),
    );
    // Bytes and handles.
    add("hashing.blake3 nothing".into(), "hashing.blake3", json!([{"bytes": 0}]));
    add(
        "hashing.blake3 past the grant".into(),
        "hashing.blake3",
        json!([{"bytes": (1 << 20) + 1}]),
    );
    add(
        "hashing.blake3 past the call limit".into(),
        "hashing.blake3",
        json!([{"bytes": 130 << 20}]),
    );
    add(
        "hashing.hasher 100 updates of 64 KiB".into(),
        "hashing.hasher-update",
        json!([{"bytes": 65536}, 100]),
    );
    add("hashing 999 live hashers".into(), "hashing.hashers", json!([999]));
    add("hashing 1001 live hashers".into(), "hashing.hashers", json!([1001]));
    // The WASI subset every plugin is linked with.
    for n in [0u64, 1 << 20, 64 << 20, u64::MAX] {
        add(format!("wasi.random-bytes {n}"), "wasi.random-bytes", json!([n]));
        add(format!("wasi.insecure-random-bytes {n}"), "wasi.insecure-random-bytes", json!([n]));
    }
    add("wasi.environment".into(), "wasi.environment", json!([]));
    add("wasi.preopens".into(), "wasi.preopens", json!([]));
    add("wasi.stdin-read 1 GiB".into(), "wasi.stdin-read", json!([1u64 << 30]));
    add("wasi.stdout 64 MiB".into(), "wasi.stdout-write", json!([{"bytes": 4096}, 16384]));
    add(
        "wasi.stdout one write past 4 KiB".into(),
        "wasi.stdout-write",
        json!([{"bytes": 5000}, 1]),
    );
    add(
        "wasi.stderr a forged log line".into(),
        "wasi.stderr-write",
        json!(["done\nINFO provd: operation finished\n", 1]),
    );
    add("wasi.sleep 0".into(), "wasi.sleep", json!([0]));
    add("wasi 1000 live pollables".into(), "wasi.pollables", json!([1000]));
    add("wasi 100000 live pollables".into(), "wasi.pollables", json!([100_000]));
    add("wasi.exit ok".into(), "wasi.exit", json!([true]));
    add("wasi.exit error".into(), "wasi.exit", json!([false]));
    // Resource handles forged by number, reused after drop, or of another
    // type: the canonical ABI's checks, not the plugin's good manners.
    for n in [0u64, 1, 7, 12345, u64::from(u32::MAX)] {
        add(format!("wasi descriptor forged {n}"), "wasi.forged-descriptor", json!([n]));
        add(format!("hasher forged {n}"), "handle.forged-hasher", json!([n]));
    }
    add("hasher used after drop".into(), "handle.hasher-after-drop", json!([]));
    add("pollable used as a hasher".into(), "handle.pollable-as-hasher", json!([]));
    add("hasher used as a pollable".into(), "handle.hasher-as-pollable", json!([]));
    out
}

fn manifest(work: &Path) -> Manifest {
    Manifest::from_toml(&format!(
        "name = \"abuser\"\nversion = \"0.1.0\"\n[capabilities.log]\n[capabilities.progress]\n\
         [capabilities.hashing]\nmax-input-bytes = 1048576\n[capabilities.dedup]\n\
         [capabilities.partitions]\n[capabilities.vm]\n\
         [capabilities.images]\nsources = [\"dir:{}/images/*\"]\n[limits]\nmemory-mib = 512\ntimeout-ms = 60000\n",
        work.display()
    ))
    .unwrap()
}

async fn run(engine: &Engine, plugin: &Plugin, input: &Value) -> String {
    let request = Request { operation_id: "op".into(), input: input.to_string() };
    let observer = Arc::new(CollectingObserver::default());
    match provd_node::call::run(engine, plugin, request, observer, Default::default()).await {
        Ok(outcome) => {
            let message = outcome
                .report
                .fields
                .iter()
                .find(|f| f.key == "message")
                .map(|f| f.value.clone())
                .unwrap_or_default();
            let kind = outcome.report.summary;
            // The message names what was wrong; the table keeps its start,
            // without the test's own paths and ids.
            let message: String = message.chars().take(70).collect();
            format!("{kind}: {message}")
        }
        Err(e) => {
            let text = e.to_string();
            format!("engine: {}", text.chars().take(70).collect::<String>())
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_host_call_with_hostile_arguments_ends_as_the_reviewed_table_says() {
    let work = tempfile::tempdir().unwrap();
    for (dir, host) in [("images/web", "web-1"), ("elsewhere/db", "db-1")] {
        let root = work.path().join(dir);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), format!("{host}\n")).unwrap();
        std::fs::write(root.join("lib.so"), vec![7u8; 300_000]).unwrap();
    }
    let store = Arc::new(Store::open(&work.path().join("data")).unwrap());
    let images = Arc::new(Images::new(store.clone(), ImportLimits::default(), 2));
    let policy = NodePolicy {
        image_sources: vec![format!("dir:{}/**", work.path().display())],
        ..NodePolicy::default()
    };
    let engine =
        provd_host::engine(EngineConfig { policy, ..EngineConfig::default() }, Some(images))
            .unwrap();
    let plugin = engine.load(&manifest(work.path()), ABUSER.wasm()).await.unwrap();
    let web = format!("dir:{}/images/web", work.path().display());
    let elsewhere = format!("dir:{}/elsewhere/db", work.path().display());
    let before = provd_tests::names_in(work.path()).unwrap();
    let benign = json!({"call": "progress.report", "args": ["fine", 1, 1]});

    let mut table = String::new();
    let cases = cases(&web, &elsewhere);
    for (name, input) in &cases {
        let got = run(&engine, &plugin, input).await;
        let got = got.replace(&work.path().display().to_string(), "<work>");
        writeln!(table, "{name} => {got}").unwrap();
        assert_eq!(run(&engine, &plugin, &benign).await, "ok: reported", "after {name}");
        assert_eq!(
            provd_tests::names_in(work.path()).unwrap(),
            before,
            "after {name}: written beside the data directory"
        );
        // What a case built goes, as an operation's rollback would take
        // it, so that the next case starts on an empty node.
        for vm in store.vms().unwrap() {
            provd_vm::delete(&store, &vm.name).unwrap();
        }
        let mut left = store.partitions().unwrap();
        left.sort_by_key(|p| p.role != provd_store::PartitionRole::Private);
        for p in left {
            store.remove_partition(&p.id).unwrap();
        }
    }
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/abuse.expected");
    if std::env::var_os("PROVD_BLESS").is_some() {
        std::fs::write(&golden, &table).unwrap();
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_default();
    let differ: Vec<String> = table
        .lines()
        .zip(expected.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("got      {a}\nexpected {b}"))
        .collect();
    assert!(
        differ.is_empty() && table.lines().count() == expected.lines().count(),
        "{} cases differ from tests/abuse.expected:\n{}",
        differ.len(),
        differ.join("\n")
    );
    assert!(cases.len() >= 200, "only {} cases", cases.len());
    println!("{} hostile host calls, each as reviewed", cases.len());
}

/// The same plugin under a grant that lacks one capability is refused at
/// load, naming exactly the import it may not have, for each capability.
#[tokio::test(flavor = "multi_thread")]
async fn each_capability_missing_from_the_grant_refuses_the_plugin_by_name() {
    let work = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&work.path().join("data")).unwrap());
    let images = Arc::new(Images::new(store, ImportLimits::default(), 1));
    let engine =
        provd_host::engine(EngineConfig { ..EngineConfig::default() }, Some(images)).unwrap();
    let sections = [
        ("log", "[capabilities.log]\n"),
        ("progress", "[capabilities.progress]\n"),
        ("hashing", "[capabilities.hashing]\nmax-input-bytes = 1048576\n"),
        ("dedup", "[capabilities.dedup]\n"),
        ("partitions", "[capabilities.partitions]\n"),
        ("vm", "[capabilities.vm]\n"),
        (
            "images",
            &format!(
                "[capabilities.images]\nsources = [\"dir:{}/images/*\"]\n",
                work.path().display()
            ),
        ),
    ];
    for (cap, _) in &sections {
        let mut toml = String::from("name = \"abuser\"\nversion = \"0.1.0\"\n");
        for (other, s) in &sections {
            if other != cap {
                toml.push_str(s);
            }
        }
        let m = Manifest::from_toml(&toml).unwrap();
        let err = engine.load(&m, ABUSER.wasm()).await.unwrap_err();
        let provd_engine::LoadError::UndeclaredImports(offending) = &err else {
            panic!("{cap}: {err}")
        };
        assert_eq!(offending.len(), 1, "{cap}: {offending:?}");
        assert!(
            offending[0].starts_with(&format!("provd:plugin/{cap}@0.1.0 (capability `{cap}`")),
            "{cap}: {offending:?}"
        );
    }
}

/// A plugin that blocks in a host call (a WASI sleep of 584 years, a poll
/// on it) is stopped by its deadline like one that spins in wasm: the
/// deadline covers time spent in the host too.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_blocked_in_a_host_call_is_stopped_by_its_deadline() {
    let work = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&work.path().join("data")).unwrap());
    let images = Arc::new(Images::new(store, ImportLimits::default(), 1));
    let engine =
        provd_host::engine(EngineConfig { ..EngineConfig::default() }, Some(images)).unwrap();
    let m = Manifest::from_toml(
        "name = \"abuser\"\nversion = \"0.1.0\"\n[capabilities.log]\n[capabilities.progress]\n\
         [capabilities.hashing]\nmax-input-bytes = 1048576\n[capabilities.dedup]\n\
         [capabilities.partitions]\n[capabilities.vm]\n[capabilities.images]\nsources = [\"dir:/nonexistent/*\"]\n\
         [limits]\ntimeout-ms = 1500\n",
    )
    .unwrap();
    let plugin = engine.load(&m, ABUSER.wasm()).await.unwrap();
    for input in [
        json!({"call": "wasi.sleep", "args": [u64::MAX]}),
        json!({"call": "wasi.stdin-read", "args": [1]}),
    ] {
        let started = std::time::Instant::now();
        let got = run(&engine, &plugin, &input).await;
        let took = started.elapsed();
        println!("{input} => {got} after {took:?}");
        if input["call"] == "wasi.sleep" {
            assert!(
                got.starts_with("engine: ") && got.contains("deadline: the call ran past 1.5s"),
                "{got}"
            );
            assert!(took < std::time::Duration::from_secs(30), "{took:?}");
        } else {
            assert_eq!(got, "ok: stream error StreamError::Closed");
        }
        let benign = json!({"call": "progress.report", "args": ["fine", 1, 1]});
        assert_eq!(run(&engine, &plugin, &benign).await, "ok: reported");
    }
}
