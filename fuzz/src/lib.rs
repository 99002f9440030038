//! provd's fuzz targets: each takes the bytes a hostile party controls and
//! runs the parser that reads them, as provd runs it. A panic, an abort, a
//! hang or unbounded memory is a finding; an error is the expected answer.
//! Where a parse succeeds, the target checks what callers rely on (a
//! canonical form parses back to itself, imported paths are normalised).
//!
//! The regression test of the project (`tests/tests/fuzz_regressions.rs`)
//! includes this file and runs every input under `fuzz/seeds/` and
//! `fuzz/regressions/` through the same functions, so a crash fixed once
//! stays fixed without a fuzzer.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The key bundles in the seed corpus are signed with (`scripts/fuzz.sh`
/// writes it as a PKCS#8 key file for `provctl bundle sign`), so that
/// verification's success paths are reached too.
pub const BUNDLE_KEY_SEED: [u8; 32] = [7; 32];
/// The time bundles are checked at: now, so that the seed bundles (made
/// by `scripts/fuzz.sh` just before) are inside their validity window.
fn now() -> u64 {
    static NOW: OnceLock<u64> = OnceLock::new();
    *NOW.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// `plugin.toml` manifests.
pub fn manifest(data: &[u8]) {
    if let Some(t) = text(data) {
        let _ = provd_domain::Manifest::from_toml(t);
    }
}

/// Bundle containers, headers, signatures and the component inside:
/// verification against a pinned key, and the keyless audit.
pub fn bundle(data: &[u8]) {
    let key = provd_bundle::SigningKey::from_bytes(&BUNDLE_KEY_SEED).public_key();
    let _ = provd_bundle::verify(data, &[key], now());
    let _ = provd_bundle::audit(data);
}

/// VM specs, TOML or JSON. A spec that parses serialises to JSON that
/// parses to the same spec.
pub fn vm_spec(data: &[u8]) {
    let Some(t) = text(data) else { return };
    let Ok(spec) = provd_vm::spec::parse_spec(t) else { return };
    let Ok(json) = serde_json::to_string(&spec) else {
        panic!("a parsed spec does not serialise: {spec:?}");
    };
    match provd_vm::spec::parse_spec(&json) {
        Ok(again) => assert_eq!(again, spec, "{json}"),
        Err(e) => panic!("a parsed spec's JSON does not parse: {e}\n{json}"),
    }
}

/// Image references. The canonical form parses to the same reference.
pub fn reference(data: &[u8]) {
    let Some(t) = text(data) else { return };
    let Ok(r) = provd_images::Reference::parse(t) else { return };
    let canonical = r.to_string();
    match provd_images::Reference::parse(&canonical) {
        Ok(again) => assert_eq!(again, r, "{canonical}"),
        Err(e) => panic!("canonical reference {canonical:?} does not parse: {e}"),
    }
}

/// OCI manifests and indexes as a registry sends them.
pub fn oci_manifest(data: &[u8]) {
    let _ = provd_images::oci::parse_manifest("fuzz", data);
}

/// `POST /v1/operations` bodies.
pub fn api_operation(data: &[u8]) {
    let _ = provd_daemon::api::parse_operation_body(data, None, "fuzz");
}

/// libvirt domain XML read by `provctl boot run`.
pub fn domain_xml(data: &[u8]) {
    let Some(t) = text(data) else { return };
    if let Ok(d) = provd_vm::qemu::parse_domain(t) {
        let _ = provd_vm::qemu::qemu_args(&d, provd_vm::qemu::Accel::Tcg);
    }
}

/// A scratch directory for targets that read files, made once per process.
fn scratch() -> Option<&'static std::path::Path> {
    static DIR: OnceLock<Option<tempfile::TempDir>> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        tempfile::Builder::new().prefix("provd-fuzz-").tempdir_in(base).ok()
    })
    .as_ref()
    .map(tempfile::TempDir::path)
}

fn write_input(name: &str, data: &[u8]) -> Option<PathBuf> {
    let path = scratch()?.join(name);
    let mut f = std::fs::File::create(&path).ok()?;
    f.write_all(data).ok()?;
    Some(path)
}

/// Reads every regular file of an image the way `verify` does, into a sink.
fn drain(entries: &[provd_partitions::reader::FsEntry], mut read: impl FnMut(u64) -> bool) {
    for e in entries {
        if e.kind == provd_domain::image::EntryKind::File && !read(e.ino) {
            break;
        }
    }
}

/// ext4 images as a guest may have left them (provd reads private
/// partitions back).
pub fn ext4(data: &[u8]) {
    let Some(path) = write_input("ext4.img", data) else { return };
    let Ok(img) = provd_partitions::ext4::Ext4Image::open(&path) else { return };
    let _ = img.root();
    if let Ok(entries) = img.entries(false) {
        drain(&entries, |ino| img.read_file(ino, &mut std::io::sink()).is_ok());
    }
}

/// EROFS images (shared partitions are read back for verification and
/// repacks).
pub fn erofs(data: &[u8]) {
    let Some(path) = write_input("erofs.img", data) else { return };
    let Ok(img) = provd_partitions::erofs::ErofsImage::open(&path) else { return };
    let _ = img.root();
    if let Ok(entries) = img.entries() {
        drain(&entries, |ino| img.read_file(ino, &mut std::io::sink()).is_ok());
    }
}

struct Importer {
    runtime: tokio::runtime::Runtime,
    images: provd_images::Images,
    done: AtomicU64,
}

fn importer() -> Option<&'static Importer> {
    static IMPORTER: OnceLock<Option<Importer>> = OnceLock::new();
    IMPORTER
        .get_or_init(|| {
            let store = provd_store::Store::open(&scratch()?.join("store")).ok()?;
            // Small limits: a fuzzer finds the same bugs in small inputs,
            // and every cap is reached sooner.
            let limits = provd_images::ImportLimits {
                max_entries: 10_000,
                max_file_bytes: 1 << 20,
                max_content_bytes: 16 << 20,
                max_archive_bytes: 16 << 20,
                max_unpacked_bytes: 64 << 20,
                ..provd_images::ImportLimits::default()
            };
            Some(Importer {
                runtime: tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?,
                images: provd_images::Images::new(Arc::new(store), limits, 1),
                done: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// tar archives, plain, gzip or zstd, imported into a real store. Every
/// entry of an imported image has a normalised path and a link target
/// that stays inside the image.
pub fn archive(data: &[u8]) {
    let Some(imp) = importer() else { return };
    let n = imp.done.fetch_add(1, Ordering::Relaxed);
    let Some(path) = write_input(&format!("in-{n}.tar"), data) else { return };
    let reference = format!("tar:{}", path.display());
    let progress: Arc<dyn provd_images::Progress> = Arc::new(provd_images::NoProgress);
    let imported = imp.runtime.block_on(imp.images.import(&reference, progress));
    let store = imp.images.store();
    if let Ok(record) = imported {
        if let Ok(entries) = store.entries(&record, 0, u64::MAX) {
            for e in entries {
                let normal = provd_domain::image::normalize_path(&e.path);
                assert_eq!(normal.ok().flatten().as_deref(), Some(e.path.as_str()), "{e:?}");
                if e.kind == provd_domain::image::EntryKind::Symlink
                    && let Some(t) = &e.link_target
                {
                    assert!(provd_domain::image::check_link_target(t).is_ok(), "{e:?}");
                }
            }
        }
        let _ = store.remove_image(&record.reference);
    }
    let _ = std::fs::remove_file(&path);
    if n % 256 == 255 {
        let _ = store.gc();
    }
}
