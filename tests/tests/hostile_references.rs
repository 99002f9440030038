// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Image references that try to climb out of the folder a node allows.
//!
//! A node allows `dir:<node>/images/**` and `tar:<node>/images/**`, as
//! `scripts/dev-node.sh` writes it; beside `images/` lie `pki/` with the
//! node's keys and `images-secret/`, a sibling whose name starts like the
//! root's. A plugin granted the same patterns asks for every reference of a
//! generated corpus: `..`, `.`, empty and encoded components, look-alike
//! separators, symbolic links as the image itself, as a parent on the way
//! and pointing out, a FIFO, and the same tricks in HTTP and OCI
//! references. Each is refused with the class the table names, or is one of
//! the contained controls. Then every object in the store, and every byte of
//! the partitions built from the contained images, is read back: the
//! secret's content is nowhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use provd_domain::{Manifest, NodePolicy};
use provd_engine::{CollectingObserver, EngineConfig, InvokeError, Outcome, PluginError, Request};
use provd_host::Engine;
use provd_images::{Images, ImportLimits, LocalSources};
use provd_store::Store;
use provd_tests::{IMAGER, files_under};

/// What became of a reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Refused by the reference parser (`invalid-input`).
    Malformed,
    /// Matched by no pattern (`denied`).
    Denied,
    /// Parsed and allowed, refused when opened beneath the root
    /// (`not-found`: a link on the way, not there, not the right type).
    Unopened,
    /// Imported: a control, whose contents are checked below.
    Contained,
}

const SECRET: &[u8] = b"-----BEGIN PRIVATE KEY----- node CA key 7f3a9c1e-secret-marker\n";

struct Fixture {
    _work: tempfile::TempDir,
    node: PathBuf,
    engine: Engine,
    images: Arc<Images>,
}

fn symlink(target: &str, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

fn run(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn fixture() -> Fixture {
    let work = tempfile::tempdir().unwrap();
    let node = work.path().join("node");
    let images = node.join("images");
    let pki = node.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::write(pki.join("ca.key"), SECRET).unwrap();
    run(std::process::Command::new("tar")
        .arg("-C")
        .arg(&pki)
        .args(["-cf", "keys.tar", "ca.key"])
        .current_dir(&pki));
    std::fs::create_dir_all(node.join("images-secret")).unwrap();
    std::fs::write(node.join("images-secret/ca.key"), SECRET).unwrap();

    // The controls: an image whose own symbolic links point out (kept as
    // links, never followed), and its archive.
    let web = images.join("web");
    std::fs::create_dir_all(web.join("etc")).unwrap();
    std::fs::write(web.join("etc/hostname"), "web\n").unwrap();
    symlink("../../../pki/ca.key", &web.join("etc/escape"));
    symlink("/", &web.join("root"));
    std::fs::create_dir_all(images.join("deep/a/b/etc")).unwrap();
    std::fs::write(images.join("deep/a/b/etc/motd"), "deep\n").unwrap();
    symlink("../../../../pki", &images.join("deep/a/b/keys"));
    run(std::process::Command::new("tar")
        .arg("-C")
        .arg(&web)
        .args(["-cf"])
        .arg(images.join("web.tar"))
        .arg("."));

    // The tricks that live on disk.
    symlink("../pki", &images.join("link-out"));
    symlink("web", &images.join("link-in"));
    symlink("../pki/keys.tar", &images.join("tar-out.tar"));
    symlink("web.tar", &images.join("tar-in.tar"));
    std::fs::create_dir_all(images.join("sub")).unwrap();
    symlink("..", &images.join("sub/up"));
    symlink("/", &images.join("slash"));
    run(std::process::Command::new("mkfifo").arg(images.join("fifo")));
    std::fs::write(images.join("plain-file"), "not an image\n").unwrap();
    std::fs::create_dir_all(images.join("dir.tar")).unwrap();

    let patterns = vec![
        format!("dir:{}/**", images.display()),
        format!("tar:{}/**", images.display()),
        "https://127.0.0.1:9/**".to_string(),
        "oci+http://127.0.0.1:9/**".to_string(),
    ];
    let store = Arc::new(Store::open(&work.path().join("data")).unwrap());
    let images_service = Arc::new(
        Images::new(store, ImportLimits::default(), 2)
            .with_local_sources(LocalSources::from_patterns(&patterns)),
    );
    let policy = NodePolicy {
        image_sources: patterns,
        capacity: provd_domain::NodeCapacity {
            vcpus: 8,
            memory_mib: 8192,
            disk_bytes: 20 << 30,
            ..provd_domain::NodeCapacity::default()
        },
        ..NodePolicy::default()
    };
    let engine = provd_host::engine(
        EngineConfig { policy, ..EngineConfig::default() },
        Some(images_service.clone()),
    )
    .unwrap();
    Fixture { _work: work, node, engine, images: images_service }
}

/// The corpus: each reference with what must become of it.
fn corpus(node: &Path) -> Vec<(String, Class)> {
    use Class::*;
    let img = format!("{}/images", node.display());
    let n = node.display().to_string();
    let mut cases: Vec<(String, Class)> = Vec::new();
    // Paths that climb or name one place two ways: refused by the parser
    // in either kind.
    let climbing = [
        format!("{img}/../pki"),
        format!("{img}/../pki/keys.tar"),
        format!("{img}/web/../../pki"),
        format!("{img}/web/.."),
        format!("{img}/.."),
        format!("{img}/./web"),
        format!("{img}/web/."),
        format!("{img}//web"),
        format!("{img}/web/"),
        format!("{img}/%2e%2e/pki"),
        format!("{img}/%2E%2E/pki"),
        format!("{img}/..%2fpki"),
        format!("{img}/web%2F..%2F..%2Fpki"),
        format!("{img}/%252e%252e/pki"),
        format!("{img}/web%00"),
        format!("{img}/..\\pki"),
        format!("{img}/web\u{2215}..\u{2215}..\u{2215}pki"),
        format!("{img}/web\u{ff0f}..\u{ff0f}pki"),
        format!("{img}/sub/up/../web"),
        "/".to_string(),
    ];
    for path in &climbing {
        for kind in ["dir:", "tar:"] {
            cases.push((format!("{kind}{path}"), Malformed));
        }
    }
    // Control characters and relative paths.
    for bad in [
        format!("dir:{img}/web\n"),
        format!("dir:{img}/web\0"),
        "dir:images/web".into(),
        "tar:~/web.tar".into(),
    ] {
        cases.push((bad, Malformed));
    }
    // Well-formed, but outside every pattern.
    for outside in [
        format!("dir:{n}/pki"),
        format!("tar:{n}/pki/keys.tar"),
        format!("dir:{n}/images-secret"),
        format!("tar:{n}/images-secret/ca.key"),
        format!("dir:{img}"),
        format!("dir:{n}"),
        "dir:/etc".into(),
        "tar:/etc/shadow".into(),
        "dir:/root/.ssh".into(),
    ] {
        cases.push((outside, Denied));
    }
    // Allowed by the patterns, refused beneath the root: a symbolic link
    // as the image, as a parent on the way, or pointing out; not there;
    // not what the kind says.
    for unopened in [
        format!("dir:{img}/link-out"),
        format!("tar:{img}/link-out/keys.tar"),
        format!("tar:{img}/link-out/ca.key"),
        format!("dir:{img}/link-in"),
        format!("dir:{img}/link-in/etc"),
        format!("tar:{img}/tar-out.tar"),
        format!("tar:{img}/tar-in.tar"),
        format!("dir:{img}/sub/up"),
        format!("dir:{img}/sub/up/web"),
        format!("tar:{img}/sub/up/web.tar"),
        format!("dir:{img}/slash"),
        format!("dir:{img}/slash/etc"),
        format!("tar:{img}/deep/a/b/keys/ca.key"),
        format!("dir:{img}/deep/a/b/keys"),
        format!("tar:{img}/fifo"),
        format!("dir:{img}/fifo"),
        format!("dir:{img}/plain-file"),
        format!("tar:{img}/dir.tar"),
        format!("dir:{img}/missing"),
        format!("dir:{img}/web/root"),
        format!("dir:{img}/web/etc/escape"),
        format!("tar:{img}/web/etc/escape"),
    ] {
        cases.push((unopened, Unopened));
    }
    // Remote references with the same tricks: refused before any request.
    let digest = "a".repeat(64);
    for remote in [
        format!("https://127.0.0.1:9/a/../b.tar#sha256:{digest}"),
        format!("https://127.0.0.1:9/./b.tar#sha256:{digest}"),
        format!("https://127.0.0.1:9//b.tar#sha256:{digest}"),
        format!("https://127.0.0.1:9/%2e%2e/b.tar#sha256:{digest}"),
        format!("https://127.0.0.1:9/a%2fb.tar#sha256:{digest}"),
        format!("https://127.0.0.1:9/a%5cb.tar#sha256:{digest}"),
        format!("https://127.0.0.1:9/a\\..\\b.tar#sha256:{digest}"),
        format!("https://127.0.0.1:9/a/..?x=1#sha256:{digest}"),
        "oci+http://127.0.0.1:9/../x:1".into(),
        "oci+http://127.0.0.1:9/a/..:1".into(),
        "oci+http://127.0.0.1:9/a/../../x:1".into(),
        "oci+http://127.0.0.1:9/a/./x:1".into(),
        "oci+http://127.0.0.1:9/a//x:1".into(),
        "oci+http://127.0.0.1:9/a/%2e%2e/x:1".into(),
        "oci+http://127.0.0.1:9/.hidden:1".into(),
        "oci+http://127.0.0.1:9/x-:1".into(),
        "oci+http://127.0.0.1:9/x:.tag".into(),
        "oci+http://127.0.0.1:9/x:-tag".into(),
    ] {
        cases.push((remote, Malformed));
    }
    // The controls.
    cases.push((format!("dir:{img}/web"), Contained));
    cases.push((format!("tar:{img}/web.tar"), Contained));
    cases.push((format!("dir:{img}/deep/a/b"), Contained));
    cases
}

fn class_of(result: &Result<Outcome, InvokeError>) -> Result<Class, String> {
    match result {
        Ok(_) => Ok(Class::Contained),
        Err(InvokeError::Plugin(PluginError::InvalidInput(_))) => Ok(Class::Malformed),
        Err(InvokeError::Plugin(PluginError::Denied(_))) => Ok(Class::Denied),
        Err(InvokeError::Plugin(PluginError::NotFound(_))) => Ok(Class::Unopened),
        Err(other) => Err(format!("{other:?}")),
    }
}

#[tokio::test]
async fn hostile_references_are_refused_and_nothing_outside_the_root_reaches_a_partition() {
    let f = fixture();
    let img = format!("{}/images", f.node.display());
    let manifest = Manifest::from_toml(&format!(
        "name = \"imager\"\nversion = \"0.1.0\"\n[capabilities.progress]\n[capabilities.hashing]\n\
         [capabilities.dedup]\n[capabilities.partitions]\n[capabilities.vm]\n\
         [capabilities.images]\nsources = [\"dir:{img}/**\", \"tar:{img}/**\", \
         \"https://127.0.0.1:9/**\", \"oci+http://127.0.0.1:9/**\"]\nmax-read-bytes = 1048576\n"
    ))
    .unwrap();
    let plugin = f.engine.load(&manifest, IMAGER.wasm()).await.unwrap();
    let call = |input: serde_json::Value| {
        let request = Request { operation_id: "op".into(), input: input.to_string() };
        let observer = Arc::new(CollectingObserver::default());
        provd_node::call::run(&f.engine, &plugin, request, observer, Default::default())
    };

    let cases = corpus(&f.node);
    assert!(cases.len() >= 60, "the corpus has {} references", cases.len());
    let mut wrong = Vec::new();
    let mut counts = std::collections::BTreeMap::new();
    for (reference, want) in &cases {
        let result = call(serde_json::json!({"op": "fetch", "image": reference})).await;
        match class_of(&result) {
            Ok(got) if got == *want => *counts.entry(format!("{got:?}")).or_insert(0) += 1,
            got => wrong.push(format!("{reference:?}: want {want:?}, got {got:?} ({result:?})")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} references:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    eprintln!("hostile references: {} cases, {counts:?}", cases.len());

    // The contained images keep their links as links.
    let store = f.images.store().clone();
    let web = store.image(&format!("dir:{img}/web")).unwrap().unwrap();
    let escape = store.entry(&web, "etc/escape").unwrap().unwrap();
    assert_eq!(escape.kind, provd_domain::image::EntryKind::Symlink);
    assert_eq!(escape.link_target.as_deref(), Some("../../../pki/ca.key"));

    // Partitions of every contained image, read back byte by byte.
    let input = serde_json::json!({
        "op": "partitions",
        "vms": [["a", format!("dir:{img}/web")], ["b", format!("tar:{img}/web.tar")],
                ["c", format!("dir:{img}/deep/a/b")]],
        "min_layer_bytes": 0,
        "max_layers": 8,
        "shared_format": "erofs",
        "private_format": "ext4",
    });
    call(input).await.unwrap();
    for vm in ["a", "b", "c"] {
        let report =
            provd_partitions::verify_vm(&store, vm, &provd_partitions::BuildOptions::default())
                .unwrap();
        assert!(report.is_exact(), "{vm}: {:#?}", report.mismatches);
    }
    let secret_hash = blake3::hash(SECRET);
    let mut read = 0u64;
    for path in files_under(store.path()).unwrap() {
        let bytes = std::fs::read(&path).unwrap();
        read += bytes.len() as u64;
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET),
            "{} holds the node's secret",
            path.display()
        );
        assert_ne!(blake3::hash(&bytes), secret_hash, "{}", path.display());
    }
    assert!(read > 1 << 20, "only {read} bytes read back");
    let partitions = files_under(&store.path().join("partitions")).unwrap();
    assert!(partitions.len() >= 4, "{partitions:?}");
}
