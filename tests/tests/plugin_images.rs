// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The `images` capability: a plugin fetches images only from sources both
//! its grant and the node allow, reads only what it fetched, within its
//! read limit, and can hash a file by handle without copying it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use provd_domain::{Manifest, NodePolicy};
use provd_engine::{
    CollectingObserver, EngineConfig, InvokeError, LoadError, Outcome, PluginError, Request,
};
use provd_host::{Engine, Plugin};
use provd_images::{Images, ImportLimits};
use provd_store::Store;
use provd_tests::IMAGER;

struct Node {
    work: tempfile::TempDir,
    engine: Engine,
    images: Arc<Images>,
}

fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "web-1\n").unwrap();
    std::fs::write(
        root.join("big.bin"),
        (0..2_000_000u32).map(|i| (i % 241) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
}

fn node() -> Node {
    let work = tempfile::tempdir().unwrap();
    tree(&work.path().join("images/web"));
    tree(&work.path().join("elsewhere/db"));
    let store = Arc::new(Store::open(&work.path().join("data")).unwrap());
    let images = Arc::new(Images::new(store, ImportLimits::default(), 2));
    let policy = NodePolicy {
        // The node allows everything under the work directory...
        image_sources: vec![format!("dir:{}/**", work.path().display())],
        vm_allow: provd_domain::VmAllow {
            bridges: vec!["br0".into(), "mgmt0".into()],
            ..Default::default()
        },
        // Room for 8 vCPUs (16 with 2× over-commit), 8 GiB and 20 GiB of disk.
        capacity: provd_domain::NodeCapacity {
            vcpus: 8,
            memory_mib: 8192,
            disk_bytes: 20 << 30,
            cpu_overcommit_percent: 200,
            ..provd_domain::NodeCapacity::default()
        },
        ..NodePolicy::default()
    };
    let engine = provd_host::engine(
        EngineConfig { policy, ..EngineConfig::default() },
        Some(images.clone()),
    )
    .unwrap();
    Node { work, engine, images }
}

impl Node {
    fn path(&self, rel: &str) -> PathBuf {
        self.work.path().join(rel)
    }

    /// Adds a second image, the web tree with another hostname, and returns
    /// the references of both.
    fn two_images(&self) -> (String, String) {
        tree(&self.path("images/web2"));
        std::fs::write(self.path("images/web2/etc/hostname"), "web-2\n").unwrap();
        (
            format!("dir:{}", self.path("images/web").display()),
            format!("dir:{}", self.path("images/web2").display()),
        )
    }

    /// ...and the plugin asks only for `images/*`.
    async fn plugin(&self, max_read: u64) -> Plugin {
        self.imager(
            "[capabilities.vm]\n[capabilities.partitions]\n",
            &format!("max-read-bytes = {max_read}\n"),
        )
        .await
    }

    /// The imager with hashing, dedup and images of `images/*`, plus the
    /// manifest sections in `extra` and the images parameters in
    /// `images_extra`.
    async fn imager(&self, extra: &str, images_extra: &str) -> Plugin {
        let manifest = Manifest::from_toml(&format!(
            "name = \"imager\"\nversion = \"0.1.0\"\n[capabilities.progress]\n{extra}[capabilities.hashing]\n[capabilities.dedup]\n\
             [capabilities.images]\nsources = [\"dir:{}/images/*\"]\n{images_extra}",
            self.work.path().display()
        ))
        .unwrap();
        self.engine.load(&manifest, IMAGER.wasm()).await.unwrap()
    }

    async fn call(
        &self,
        plugin: &Plugin,
        input: serde_json::Value,
    ) -> Result<Outcome, InvokeError> {
        let request = Request { operation_id: "op".into(), input: input.to_string() };
        let observer = Arc::new(CollectingObserver::default());
        provd_node::call::run(&self.engine, plugin, request, observer, Default::default()).await
    }
}

fn field(outcome: &Outcome, key: &str) -> String {
    outcome.report.fields.iter().find(|f| f.key == key).map(|f| f.value.clone()).unwrap_or_default()
}

#[tokio::test]
async fn a_plugin_fetches_lists_reads_and_hashes_an_allowed_image() {
    let node = node();
    let plugin = node.plugin(4 << 20).await;
    let web = format!("dir:{}", node.path("images/web").display());

    let fetched =
        node.call(&plugin, serde_json::json!({"op": "fetch", "image": web})).await.unwrap();
    assert_eq!(field(&fetched, "files"), "2");
    assert_eq!(field(&fetched, "entries"), "3");

    let listed = node
        .call(&plugin, serde_json::json!({"op": "list", "image": web, "limit": 2}))
        .await
        .unwrap();
    let output: serde_json::Value = serde_json::from_str(&listed.report.output).unwrap();
    assert_eq!(output.as_array().unwrap().len(), 2);
    assert_eq!(output[0]["path"], "big.bin");
    assert_eq!(output[1]["path"], "etc");

    let read = node
        .call(&plugin, serde_json::json!({"op": "read", "image": web, "path": "etc/hostname"}))
        .await
        .unwrap();
    assert_eq!(field(&read, "size"), "6");
    assert_eq!(field(&read, "blake3"), blake3::hash(b"web-1\n").to_hex().as_str());

    let big = std::fs::read(node.path("images/web/big.bin")).unwrap();
    let expected = blake3::hash(&big).to_hex().to_string();
    for op in ["hash-guest", "hash-host"] {
        let out = node
            .call(&plugin, serde_json::json!({"op": op, "image": web, "path": "big.bin"}))
            .await
            .unwrap();
        assert_eq!(field(&out, "digest"), expected, "{op}");
    }
    // One import, however many requests fetched the image.
    assert_eq!(node.images.source_reads(), 1);
}

#[tokio::test]
async fn sources_outside_the_plugins_or_the_nodes_patterns_are_denied_before_any_access() {
    let node = node();
    let plugin = node.plugin(1 << 20).await;
    // Allowed by the node, not by the plugin.
    let db = format!("dir:{}", node.path("elsewhere/db").display());
    // Allowed by neither.
    let etc = "dir:/etc".to_string();
    for (reference, whose) in [(&db, "this plugin's"), (&etc, "this plugin's")] {
        let err = node
            .call(&plugin, serde_json::json!({"op": "fetch", "image": reference}))
            .await
            .unwrap_err();
        match err {
            InvokeError::Plugin(PluginError::Denied(m)) => {
                assert_eq!(m, format!("{reference} is not among {whose} allowed image sources"))
            }
            other => panic!("{other:?}"),
        }
    }
    // Nothing was read or stored.
    assert_eq!(node.images.source_reads(), 0);
    assert_eq!(node.images.store().stats().unwrap().images, 0);

    // A plugin pattern wider than the node's is narrowed by the node.
    let wide = Manifest::from_toml(
        "name = \"imager\"\nversion = \"0.1.0\"\n[capabilities.progress]\n[capabilities.hashing]\n[capabilities.dedup]\n[capabilities.vm]\n[capabilities.partitions]\n\
         [capabilities.images]\nsources = [\"dir:/**\"]\n",
    )
    .unwrap();
    let wide = node.engine.load(&wide, IMAGER.wasm()).await.unwrap();
    let err = node.call(&wide, serde_json::json!({"op": "fetch", "image": etc})).await.unwrap_err();
    assert!(err.to_string().contains("not among the node's allowed image sources"), "{err}");
    assert_eq!(node.images.source_reads(), 0);
}

#[tokio::test]
async fn references_must_name_their_kind_and_reads_need_a_fetch_and_a_budget() {
    let node = node();
    let plugin = node.plugin(1000).await;
    let bare = node.path("images/web").display().to_string();
    let err =
        node.call(&plugin, serde_json::json!({"op": "fetch", "image": bare})).await.unwrap_err();
    assert!(
        matches!(err, InvokeError::Plugin(PluginError::InvalidInput(ref m)) if m.contains("write dir:/path, tar:/path, an http(s) URL with its digest")),
        "{err}"
    );

    let web = format!("dir:{}", node.path("images/web").display());
    let err = node
        .call(
            &plugin,
            serde_json::json!({"op": "read-unfetched", "image": web, "path": "etc/hostname"}),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, InvokeError::Plugin(PluginError::NotFound(ref m)) if m.contains("was not fetched in this request")),
        "{err}"
    );

    let err = node
        .call(&plugin, serde_json::json!({"op": "read", "image": web, "path": "big.bin"}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, InvokeError::Plugin(PluginError::QuotaExceeded(ref m)) if m.contains("big.bin is 2000000 bytes; this plugin reads at most 1000")),
        "{err}"
    );

    let err = node
        .call(&plugin, serde_json::json!({"op": "read", "image": web, "path": "etc"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("etc is a dir, not a file"), "{err}");
    let err = node
        .call(&plugin, serde_json::json!({"op": "list", "image": web, "limit": 5000}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("at most 1000 entries per page"), "{err}");
}

#[tokio::test]
async fn a_node_without_an_image_store_refuses_plugins_that_need_one() {
    let engine = provd_host::engine(EngineConfig::default(), None).unwrap();
    let manifest = Manifest::from_toml(
        "name = \"imager\"\nversion = \"0.1.0\"\n[capabilities.progress]\n[capabilities.hashing]\n[capabilities.dedup]\n[capabilities.vm]\n[capabilities.partitions]\n[capabilities.images]\nsources = [\"dir:/srv/*\"]\n",
    )
    .unwrap();
    let err = engine.load(&manifest, IMAGER.wasm()).await.unwrap_err();
    assert!(matches!(err, LoadError::Unavailable("images")), "{err}");
}

#[test]
fn image_source_patterns_are_validated() {
    for (sources, expected) in [
        ("[]", "must list 1 to 64 reference patterns"),
        ("[\"/srv/*\"]", "is not a reference pattern"),
        ("[\"ftp://x/*\"]", "is not a reference pattern"),
    ] {
        let err = Manifest::from_toml(&format!(
            "name = \"a\"\nversion = \"1.0.0\"\n[capabilities.images]\nsources = {sources}\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains(expected), "{sources}: {err}");
    }
}

#[tokio::test]
async fn a_plugin_plans_layers_for_fetched_images_through_the_host() {
    let node = node();
    let (web, web2) = node.two_images();
    let plugin = node.plugin(1 << 20).await;
    let input = serde_json::json!({
        "op": "plan",
        "vms": [["a", web], ["b", web2], ["c", web]],
        "min_layer_bytes": 0,
        "max_layers": 8,
    });
    let out = node.call(&plugin, input).await.unwrap();
    let layers: serde_json::Value = serde_json::from_str(&out.report.output).unwrap();
    // big.bin is shared by all three VMs; etc/hostname "web-1" by a and c.
    assert_eq!(layers[0]["vms"], serde_json::json!(["a", "b", "c"]));
    assert_eq!(layers[0]["paths"], serde_json::json!(["big.bin"]));
    assert_eq!(layers[0]["bytes"], 2_000_000);
    assert_eq!(layers[1]["vms"], serde_json::json!(["a", "c"]));
    assert_eq!(layers[1]["paths"], serde_json::json!(["etc/hostname"]));
    assert_eq!(field(&out, "naive_bytes"), (3 * 2_000_006).to_string());
    assert_eq!(field(&out, "stored_bytes"), (2_000_000 + 6 + 6).to_string());

    // An image not fetched in the request cannot be analysed.
    let unfetched =
        serde_json::json!({"op": "plan", "vms": [], "min_layer_bytes": 0, "max_layers": 1});
    assert!(node.call(&plugin, unfetched).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_builds_partitions_that_give_back_each_image_and_touches_only_its_own() {
    let node = node();
    let (web, web2) = node.two_images();
    let plugin = node.plugin(1 << 20).await;
    let input = serde_json::json!({
        "op": "partitions",
        "vms": [["a", web], ["b", web2]],
        "min_layer_bytes": 0,
        "max_layers": 8,
        "shared_format": "erofs",
        "private_format": "ext4",
    });
    let out = node.call(&plugin, input.clone()).await.unwrap();
    let built: serde_json::Value = serde_json::from_str(&out.report.output).unwrap();
    assert_eq!(built.as_array().unwrap().len(), 2);
    let store = node.images.store();
    let shared = store.partition(&field(&out, "shared")).unwrap().unwrap();
    assert_eq!(
        (shared.role.as_str(), shared.vms.clone()),
        ("shared", vec!["a".into(), "b".into()])
    );
    assert_eq!(shared.operation.as_deref(), Some("op"));
    // Each VM's partitions equal its image, plus the hostname the plugin wrote.
    for vm in ["a", "b"] {
        let report =
            provd_partitions::verify_vm(store, vm, &provd_partitions::BuildOptions::default())
                .unwrap();
        assert!(report.is_exact(), "{vm}: {:#?}", report.mismatches);
    }
    let private_a = built[0]["id"].as_str().unwrap().to_string();
    let manifest: serde_json::Value =
        serde_json::from_str(&store.partition(&private_a).unwrap().unwrap().manifest).unwrap();
    assert_eq!(manifest["added"][0]["path"], "etc/hostname");

    // Another request cannot reach them.
    let err = node
        .call(&plugin, serde_json::json!({"op": "add-file", "partition": private_a}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("was not created by this request"), "{err}");

    // A quota too small for the partitions: refused, nothing built.
    let before = store.partitions().unwrap().len();
    let small = node
        .imager("[capabilities.vm]\n[capabilities.partitions]\nmax-bytes = 1000000\n", "")
        .await;
    let mut input = input;
    input["vms"] = serde_json::json!([["c", web], ["d", web2]]);
    let err = node.call(&small, input.clone()).await.unwrap_err();
    assert!(err.to_string().contains("quota leaves 1000000"), "{err}");
    assert_eq!(store.partitions().unwrap().len(), before);
    // A request that fails after building some partitions keeps none: the
    // shared partition is built, the private one asks for an unknown format.
    input["private_format"] = serde_json::json!("vfat");
    let err = node.call(&plugin, input).await.unwrap_err();
    assert!(err.to_string().contains("unknown private partition format \"vfat\""), "{err}");
    assert_eq!(store.partitions().unwrap().len(), before);
}

fn spec(name: &str, vcpus: u32, memory_mib: u64) -> String {
    format!(
        "name = \"{name}\"\nhypervisor = \"libvirt\"\nvcpus = {vcpus}\nmemory-mib = {memory_mib}\n\
         image = \"dir:/srv/{name}\"\n[boot]\nfirmware = \"uefi\"\n\
         [[nics]]\nbridge = \"br0\"\ndhcp4 = true\n\
         [cloud-init]\nhostname = \"{name}.example\"\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_configures_vms_on_its_partitions_within_grant_and_capacity() {
    let node = node();
    let (web, web2) = node.two_images();
    let plugin = node.plugin(1 << 20).await;
    let input = serde_json::json!({
        "op": "partitions",
        "vms": [["a", web], ["b", web2]],
        "min_layer_bytes": 0,
        "max_layers": 8,
        "shared_format": "erofs",
        "private_format": "ext4",
        "specs": {"a": spec("a", 4, 2048), "b": spec("b", 2, 1024)},
    });
    let out = node.call(&plugin, input.clone()).await.unwrap();
    let built: serde_json::Value = serde_json::from_str(&out.report.output).unwrap();
    let store = node.images.store();
    for (i, vm) in ["a", "b"].iter().enumerate() {
        assert_eq!(built[i]["config_file"], "domain.xml");
        assert_eq!(
            built[i]["disks"],
            serde_json::json!(["root:root", "shared:shared-0:block", "seed:seed"])
        );
        let dir = node.path("data/vms").join(vm);
        let xml = dir.join("domain.xml");
        assert_eq!(std::fs::read_to_string(&xml).unwrap(), built[i]["config"].as_str().unwrap());
        let check = std::process::Command::new("virt-xml-validate")
            .arg(&xml)
            .arg("domain")
            .output()
            .unwrap();
        assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
        let (label, files) = provd_tests::seed::read_seed_iso(&dir.join("seed.iso")).unwrap();
        assert_eq!(label, "cidata");
        let meta = files.iter().find(|(n, _)| n == "meta-data").unwrap();
        assert!(String::from_utf8_lossy(&meta.1).contains(&format!("{vm}.example")));
    }
    let reserved = store.reserved().unwrap();
    assert_eq!((reserved.vcpus, reserved.memory_mib), (6, 3072));

    // Over the node: 6 + 12 vCPUs > 16. Nothing is reserved, and the failed
    // request's partitions are removed with it.
    let partitions_before = store.partitions().unwrap().len();
    let mut big = input.clone();
    big["vms"] = serde_json::json!([["c", web], ["d", web2]]);
    big["specs"] = serde_json::json!({"c": spec("c", 12, 1024)});
    let err = node.call(&plugin, big).await.unwrap_err();
    assert!(err.to_string().contains("vcpus: needs 12, 10 free"), "{err}");
    assert_eq!(store.reserved().unwrap(), reserved);
    assert_eq!(store.partitions().unwrap().len(), partitions_before);
    assert!(store.vm("c").unwrap().is_none());
    assert!(!node.path("data/vms/c").exists());

    // Over the plugin's grant: refused before anything is reserved.
    let narrow = node.imager("[capabilities.vm]\nmax-vcpus = 2\nhypervisors = [\"firecracker\"]\n[capabilities.partitions]\n", "").await;
    let mut denied = input.clone();
    denied["vms"] = serde_json::json!([["e", web], ["f", web2]]);
    denied["specs"] = serde_json::json!({"e": spec("e", 1, 512)});
    let err = node.call(&narrow, denied).await.unwrap_err();
    assert!(err.to_string().contains("libvirt is not among the plugin's hypervisors"), "{err}");
    assert_eq!(store.reserved().unwrap(), reserved);

    // Deleting a VM gives back exactly its reservations and its private
    // partition; the shared one stays while b uses it.
    assert!(provd_vm::delete(store, "a").unwrap());
    let left = store.reserved().unwrap();
    assert_eq!((left.vcpus, left.memory_mib), (2, 1024));
    assert!(!node.path("data/vms/a").exists());
    assert!(store.partitions_of_vm("a").unwrap().is_empty());
    assert!(provd_vm::delete(store, "b").unwrap());
    assert_eq!(store.reserved().unwrap(), provd_store::Resources::default());
    assert!(store.partitions().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_stopped_at_its_deadline_keeps_nothing_it_built() {
    let node = node();
    let (web, web2) = node.two_images();
    let plugin = node
        .imager("[limits]\ntimeout-ms = 1500\n[capabilities.vm]\n[capabilities.partitions]\n", "")
        .await;
    let input = serde_json::json!({
        "op": "partitions",
        "vms": [["a", web], ["b", web2]],
        "min_layer_bytes": 0,
        "max_layers": 8,
        "shared_format": "erofs",
        "private_format": "ext4",
        "specs": {"a": spec("a", 2, 1024)},
        "then_spin": true,
    });
    let err = node.call(&plugin, input).await.unwrap_err();
    assert!(matches!(err, InvokeError::Limit(_)), "{err}");
    let store = node.images.store();
    assert_eq!(store.partitions().unwrap(), vec![]);
    assert!(store.vms().unwrap().is_empty());
    assert_eq!(store.reserved().unwrap(), provd_store::Resources::default());
    assert!(!node.path("data/vms/a").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_analysis_over_the_entry_bound_is_refused_before_anything_is_loaded() {
    let node = node();
    // 125 500 entries; 64 VMs of this image make 8 032 000, just over the
    // 8 000 000 entries one call may analyse.
    let big = node.path("images/big");
    for d in 0..500 {
        let dir = big.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..250 {
            std::fs::File::create(dir.join(format!("f{f:03}"))).unwrap();
        }
    }
    let plugin = node.plugin(1 << 20).await;
    let image = format!("dir:{}", big.display());
    let vms: Vec<(String, String)> = (0..64).map(|i| (format!("vm-{i}"), image.clone())).collect();
    let input =
        serde_json::json!({"op": "plan", "vms": vms, "min_layer_bytes": 0, "max_layers": 8});
    let started = std::time::Instant::now();
    let err = node.call(&plugin, input).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("8032000 entries over these VMs; one call analyses at most 8000000"),
        "{err}"
    );
    eprintln!("refused after {:?} (import included)", started.elapsed());
}

/// `spec(name, 2, 1024)` of image `image`.
fn spec_of(name: &str, image: &str) -> String {
    spec(name, 2, 1024).replace(&format!("dir:/srv/{name}"), image)
}

/// The manager's spec of `name`, as the daemon hands it to the engine: of
/// the image the input plans it with, as the manager's spec names the
/// image the VM is built from.
fn asked(name: &str, input: &serde_json::Value) -> (String, provd_vm::spec::VmSpec) {
    let image = input["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|pair| pair[0] == name)
        .and_then(|pair| pair[1].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| format!("dir:/srv/{name}"));
    (name.to_string(), provd_vm::spec::parse_spec(&spec_of(name, &image)).unwrap())
}

/// A call as the daemon makes it: the operation names `vms` and hands the
/// manager's spec of each.
async fn call_as_operation(
    engine: &Engine,
    plugin: Plugin,
    input: serde_json::Value,
    vms: &[&str],
) -> Result<Outcome, InvokeError> {
    let vms: Vec<String> = vms.iter().map(|v| v.to_string()).collect();
    let options = provd_node::call::CallOptions {
        specs: vms.iter().map(|v| asked(v, &input)).collect(),
        vms: Some(vms),
        ..provd_node::call::CallOptions::default()
    };
    let request = Request { operation_id: "op".into(), input: input.to_string() };
    provd_node::call::run(
        engine,
        &plugin,
        request,
        Arc::new(CollectingObserver::default()),
        options,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_configures_only_the_operations_vms_with_the_managers_spec() {
    let node = node();
    let (web, web2) = node.two_images();
    let call = |plugin: Plugin, input: serde_json::Value, vms: &'static [&'static str]| {
        call_as_operation(&node.engine, plugin, input, vms)
    };
    let plugin = node.plugin(1 << 20).await;
    let store = node.images.store().clone();
    let partitions = |vms: serde_json::Value, specs: serde_json::Value| {
        serde_json::json!({"op": "partitions", "vms": vms, "min_layer_bytes": 0, "max_layers": 8,
                           "shared_format": "erofs", "private_format": "ext4", "specs": specs})
    };

    // A network the manager did not ask for: refused, naming the field.
    let other_bridge = spec_of("a", &web).replace("br0", "mgmt0");
    let err = call(
        plugin.clone(),
        partitions(serde_json::json!([["a", web]]), serde_json::json!({"a": other_bridge})),
        &["a"],
    )
    .await
    .unwrap_err();
    match err {
        InvokeError::Plugin(PluginError::Denied(m)) => {
            assert!(m.contains("differs from the one its operation was given in nics"), "{m}");
            assert!(m.contains("may set none"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert!(store.vms().unwrap().is_empty());
    assert!(store.partitions().unwrap().is_empty());
    // A bridge the node does not list is refused whoever asks.
    let unlisted = spec_of("a", &web).replace("br0", "storage9");
    let err = call(
        plugin.clone(),
        partitions(serde_json::json!([["a", web]]), serde_json::json!({"a": unlisted})),
        &["a"],
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("\"storage9\" is not among the bridges this node lets VMs join"),
        "{err}"
    );

    // A VM outside the operation: no plan, no partition.
    let err = call(
        plugin.clone(),
        partitions(serde_json::json!([["a", web], ["b", web]]), serde_json::json!({})),
        &["a"],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, InvokeError::Plugin(PluginError::Denied(ref m)) if m.contains("\"b\" is not among the VMs this operation names")),
        "{err}"
    );

    // Both named, only one configured: the other's private partition is
    // freed when the operation ends; the configured VM keeps its own.
    let out = call(
        plugin.clone(),
        partitions(
            serde_json::json!([["a", web], ["b", web2]]),
            serde_json::json!({"a": spec_of("a", &web)}),
        ),
        &["a", "b"],
    )
    .await
    .unwrap();
    let built: serde_json::Value = serde_json::from_str(&out.report.output).unwrap();
    assert_eq!(built.as_array().unwrap().len(), 2);
    let privates: Vec<Vec<String>> = store
        .partitions()
        .unwrap()
        .into_iter()
        .filter(|p| p.role == provd_store::PartitionRole::Private)
        .map(|p| p.vms)
        .collect();
    assert_eq!(privates, vec![vec!["a".to_string()]]);
    assert_eq!(store.vms().unwrap().len(), 1);

    // A grant that lets the plugin set labels and cloud-init sets those,
    // and still not the network.
    let grant =
        "[capabilities.vm]\nmay-set = [\"labels\", \"cloud-init\"]\n[capabilities.partitions]\n";
    let lenient = node.imager(grant, "max-read-bytes = 1048576\n").await;
    let relabelled =
        spec_of("b", &web2).replace("b.example", "b.other") + "[labels]\nteam = \"x\"\n";
    call(
        lenient.clone(),
        partitions(serde_json::json!([["b", web2]]), serde_json::json!({"b": relabelled})),
        &["b"],
    )
    .await
    .unwrap();
    let moved = spec_of("c", &web2).replace("br0", "mgmt0");
    let err = call(
        lenient,
        partitions(serde_json::json!([["c", web2]]), serde_json::json!({"c": moved})),
        &["c"],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("in nics; this plugin may set labels, cloud-init"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_customisation_interrupted_by_a_stop_is_undone_from_its_journal() {
    let node = node();
    let (web, _) = node.two_images();
    let plugin = node.plugin(1 << 20).await;
    let input = serde_json::json!({
        "op": "partitions", "vms": [["a", web]], "min_layer_bytes": 0, "max_layers": 8,
        "shared_format": "erofs", "private_format": "ext4", "specs": {"a": spec("a", 2, 1024)},
    });
    node.call(&plugin, input).await.unwrap();
    let store = node.images.store();
    let seed = node.path("data/vms/a/seed.iso");
    let undo = node.path("data/vms/a/customize.undo.json");
    let (seed_before, spec_before) =
        (std::fs::read(&seed).unwrap(), store.vm("a").unwrap().unwrap().spec);
    let grant = provd_domain::VmGrant {
        max_vcpus: 64,
        max_memory_mib: 1 << 20,
        hypervisors: vec!["libvirt".into()],
        may_set: Vec::new(),
    };
    let changed = spec("a", 2, 1024).replace("a.example", "a.changed");

    // Customised by an operation, journalled, then the node stops before
    // the operation's end is on record: the next start undoes it.
    provd_vm::customize(store, &changed, &grant, Some("op-crashed")).unwrap();
    assert_ne!(std::fs::read(&seed).unwrap(), seed_before);
    assert!(undo.exists());
    let undone = provd_vm::recover_customizations(store, |_| Ok(false)).unwrap();
    assert_eq!(undone, ["a"]);
    assert_eq!(std::fs::read(&seed).unwrap(), seed_before);
    assert_eq!(store.vm("a").unwrap().unwrap().spec, spec_before);
    assert!(!undo.exists());

    // Twice in one operation: the journal keeps the state before the first.
    provd_vm::customize(store, &changed, &grant, Some("op-twice")).unwrap();
    let third = spec("a", 2, 1024).replace("a.example", "a.third");
    provd_vm::customize(store, &third, &grant, Some("op-twice")).unwrap();
    provd_vm::recover_customizations(store, |_| Ok(false)).unwrap();
    assert_eq!(std::fs::read(&seed).unwrap(), seed_before);

    // The daemon closes the journal with the operation's end: another
    // operation's end leaves it, a failed end puts the seed back.
    provd_vm::customize(store, &changed, &grant, Some("op-failed")).unwrap();
    assert!(!provd_vm::end_customization(store, "a", "op-other", false).unwrap());
    assert!(undo.exists());
    assert!(provd_vm::end_customization(store, "a", "op-failed", false).unwrap());
    assert_eq!(std::fs::read(&seed).unwrap(), seed_before);
    assert!(!undo.exists());

    // An operation recorded as succeeded keeps its seed; its journal goes.
    provd_vm::customize(store, &changed, &grant, Some("op-done")).unwrap();
    let kept = std::fs::read(&seed).unwrap();
    assert!(provd_vm::recover_customizations(store, |op| Ok(op == "op-done")).unwrap().is_empty());
    assert_eq!(std::fs::read(&seed).unwrap(), kept);
    assert!(!undo.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operations_vm_gets_only_the_files_of_its_own_image() {
    let node = node();
    let (web, web2) = node.two_images();
    let plugin = node.plugin(1 << 20).await;
    // An operation naming VMs with their manager's specs: (name, image,
    // tenant).
    let run = |input: serde_json::Value, vms: &[(&str, &str, Option<&str>)]| {
        let specs = vms
            .iter()
            .map(|(n, i, t)| {
                let mut s = provd_vm::spec::parse_spec(&spec_of(n, i)).unwrap();
                s.tenant = t.map(str::to_string);
                (n.to_string(), s)
            })
            .collect();
        let options = provd_node::call::CallOptions {
            specs,
            vms: Some(vms.iter().map(|(n, _, _)| n.to_string()).collect()),
            ..provd_node::call::CallOptions::default()
        };
        let request = Request { operation_id: "op".into(), input: input.to_string() };
        provd_node::call::run(
            &node.engine,
            &plugin,
            request,
            Arc::new(CollectingObserver::default()),
            options,
        )
    };

    // An image no spec of the operation names is not fetched: whatever it
    // holds could end up in the operation's VMs.
    let err = run(serde_json::json!({"op": "fetch", "image": web2}), &[("a", &web, None)])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("is neither an image this operation's VM specs name"),
        "{err}"
    );
    // Another VM's image for this one: not planned.
    let plan = serde_json::json!({"op": "plan", "vms": [["a", web2]], "min_layer_bytes": 0,
                                  "max_layers": 8});
    let err = run(plan, &[("a", &web, None), ("b", &web2, None)]).await.unwrap_err();
    assert!(err.to_string().contains("VM \"a\" runs"), "{err}");
    assert!(node.images.store().partitions().unwrap().is_empty());
    // VMs of several tenants: a plugin reads files only of public images,
    // or it could carry one tenant's file into another's VM.
    let read = serde_json::json!({"op": "read", "image": web, "path": "etc/hostname"});
    let err =
        run(read.clone(), &[("a", &web, Some("x")), ("b", &web2, Some("y"))]).await.unwrap_err();
    assert!(err.to_string().contains("belong to several tenants"), "{err}");
    // One tenant: its own image is read.
    run(read, &[("a", &web, Some("x")), ("b", &web2, Some("x"))]).await.unwrap();
}
