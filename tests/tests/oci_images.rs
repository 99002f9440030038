// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Images from a real OCI registry (Debian's `docker-registry`) started on
//! 127.0.0.1 by the test, pushed with a real client (`skopeo`): layers
//! applied in order with whiteouts and opaque directories, every blob
//! verified against its digest.

use std::path::PathBuf;
use std::sync::Arc;

use provd_domain::image::EntryKind;
use provd_images::{Images, ImportLimits, NoProgress};
use provd_store::Store;
use provd_tests::oci::{http_get_body, oci_layout, push, start_registry};

enum Item<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
}

fn layer(items: &[Item<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match item {
            Item::File(path, data) => {
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                h.set_entry_type(tar::EntryType::Regular);
                b.append_data(&mut h, path, *data).unwrap();
            }
            Item::Dir(path) => {
                h.set_mode(0o755);
                h.set_size(0);
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn node() -> (tempfile::TempDir, PathBuf, Images) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Arc::new(Store::open(&data).unwrap());
    (dir, data, Images::new(store, ImportLimits::default(), 2))
}

fn two_layers() -> Vec<Vec<u8>> {
    vec![
        layer(&[
            Item::Dir("etc"),
            Item::File("etc/keep", b"v1"),
            Item::File("etc/gone", b"bye"),
            Item::Dir("opq"),
            Item::File("opq/a", b"a"),
            Item::File("opq/b", b"b"),
            Item::Dir("tree"),
            Item::File("tree/x", b"x"),
        ]),
        layer(&[
            Item::File("etc/keep", b"v2"),
            Item::File("etc/.wh.gone", b""),
            Item::File(".wh.tree", b""),
            Item::File("opq/.wh..wh..opq", b""),
            Item::File("opq/c", b"c"),
        ]),
    ]
}

#[tokio::test]
async fn an_image_pushed_by_skopeo_is_pulled_with_its_layers_applied() {
    let registry = start_registry();
    let work = tempfile::tempdir().unwrap();
    oci_layout(&work.path().join("layout"), &two_layers(), "v1");
    push(&work.path().join("layout"), "v1", &registry, "test/app");

    let (_dir, data, images) = node();
    let reference = format!("oci+http://127.0.0.1:{}/test/app:v1", registry.port);
    let image = images.import(&reference, Arc::new(NoProgress)).await.unwrap();
    assert_eq!(image.source, "oci");
    let manifest_digest = image.source_digest.clone().unwrap();
    assert!(manifest_digest.starts_with("sha256:"));

    let entries = images.store().entries(&image, 0, 100).unwrap();
    let listed: Vec<(String, EntryKind)> =
        entries.iter().map(|e| (e.path.clone(), e.kind)).collect();
    assert_eq!(
        listed,
        vec![
            ("etc".to_string(), EntryKind::Dir),
            ("etc/keep".to_string(), EntryKind::File),
            ("opq".to_string(), EntryKind::Dir),
            ("opq/c".to_string(), EntryKind::File),
        ]
    );
    let keep = entries.iter().find(|e| e.path == "etc/keep").unwrap();
    assert_eq!(images.store().read_object(&keep.hash.unwrap(), 10).unwrap(), b"v2");
    // Content only the hidden entries had is not kept.
    assert_eq!(images.store().stats().unwrap().objects, 2);
    let on_disk: usize = std::fs::read_dir(data.join("objects"))
        .unwrap()
        .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(on_disk, 2);

    // The same image by manifest digest is the same image.
    let (_dir2, _data2, images2) = node();
    let by_digest = format!("oci+http://127.0.0.1:{}/test/app@{manifest_digest}", registry.port);
    let again = images2.import(&by_digest, Arc::new(NoProgress)).await.unwrap();
    assert_eq!(again.digest, image.digest);
}

#[tokio::test]
async fn a_blob_that_does_not_match_its_digest_is_refused() {
    let registry = start_registry();
    let work = tempfile::tempdir().unwrap();
    oci_layout(&work.path().join("layout"), &two_layers(), "v1");
    push(&work.path().join("layout"), "v1", &registry, "test/tampered");
    // skopeo compresses layers on the way, so ask the registry which blob
    // is the second layer, then change its stored bytes behind its back.
    let manifest = http_get_body(
        registry.port,
        "/v2/test/tampered/manifests/v1",
        "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
    );
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let d =
        manifest["layers"][1]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let blob = registry
        .dir
        .path()
        .join(format!("storage/docker/registry/v2/blobs/sha256/{}/{d}/data", &d[..2]));
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last / 2] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();

    let (_dir, data, images) = node();
    let reference = format!("oci+http://127.0.0.1:{}/test/tampered:v1", registry.port);
    let err = images.import(&reference, Arc::new(NoProgress)).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&format!("layer 1 (sha256:{d}): digest mismatch")), "{text}");
    let stats = images.store().stats().unwrap();
    assert_eq!((stats.images, stats.objects), (0, 0));
    assert!(images.store().staging_files().unwrap().is_empty());
    assert_eq!(std::fs::read_dir(data.join("objects")).unwrap().count(), 0);
}

#[tokio::test]
async fn missing_images_and_hostile_whiteouts_are_refused() {
    let registry = start_registry();
    let (_dir, _data, images) = node();
    let missing = format!("oci+http://127.0.0.1:{}/test/nothing:v1", registry.port);
    let err = images.import(&missing, Arc::new(NoProgress)).await.unwrap_err();
    assert!(err.to_string().contains("registry answered 404"), "{err}");

    let work = tempfile::tempdir().unwrap();
    let hostile = vec![layer(&[Item::File("a", b"1")]), layer(&[Item::File(".wh..wh.plnk", b"")])];
    oci_layout(&work.path().join("layout"), &hostile, "v1");
    push(&work.path().join("layout"), "v1", &registry, "test/hostile");
    let reference = format!("oci+http://127.0.0.1:{}/test/hostile:v1", registry.port);
    let err = images.import(&reference, Arc::new(NoProgress)).await.unwrap_err();
    assert!(
        err.to_string().contains("entry \".wh..wh.plnk\" is not a whiteout provd understands"),
        "{err}"
    );
    assert_eq!(images.store().stats().unwrap().objects, 0);
}
