//! `provctl image`: the image store of a data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use provd_images::{Images, ImportLimits, Progress, Reference};
use provd_store::{ImageRecord, Store};
use serde_json::json;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Import images: a directory, or a tar archive (plain, gzip or zstd).
    Import {
        /// `dir:/path`, `tar:/path.tar.zst`, or an absolute path.
        #[arg(required = true)]
        references: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the images in the store.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show one image, and its entries on request.
    Inspect {
        reference: String,
        /// List entries too.
        #[arg(long)]
        entries: bool,
        /// First entry to list (entries are ordered by path).
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Entries to list.
        #[arg(long, default_value_t = 1000)]
        limit: u64,
        #[arg(long)]
        json: bool,
    },
    /// Remove images, freeing the objects no other image uses.
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete unreferenced objects and staging leftovers; report missing objects.
    Gc {
        #[arg(long)]
        json: bool,
    },
}

/// Import parallelism of the CLI: different images at once.
const PARALLEL_IMPORTS: usize = 4;

pub async fn run(command: ImageCommand, data_dir: &Path) -> Result<std::process::ExitCode> {
    let store = Arc::new(
        Store::open(data_dir)
            .with_context(|| format!("opening the store in {}", data_dir.display()))?,
    );
    match command {
        ImageCommand::Import { references, json } => import(store, &references, json).await,
        ImageCommand::Ls { json } => {
            let images = store.images()?;
            if json {
                println!("{:#}", json!(images.iter().map(image_json).collect::<Vec<_>>()));
            } else {
                println!(
                    "{:<60} {:>9} {:>9} {:>14}  DIGEST",
                    "REFERENCE", "ENTRIES", "FILES", "BYTES"
                );
                for i in &images {
                    let digest = i.digest.get(..19).unwrap_or(&i.digest);
                    println!(
                        "{:<60} {:>9} {:>9} {:>14}  {digest}",
                        i.reference, i.entries, i.files, i.bytes
                    );
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        ImageCommand::Inspect { reference, entries, offset, limit, json } => {
            let image = find(&store, &reference)?;
            let listed = if entries { store.entries(&image, offset, limit)? } else { Vec::new() };
            if json {
                let mut v = image_json(&image);
                if entries && let Some(obj) = v.as_object_mut() {
                    obj.insert(
                        "entries".into(),
                        json!(listed.iter().map(entry_json).collect::<Vec<_>>()),
                    );
                }
                println!("{v:#}");
            } else {
                println!("reference: {}", image.reference);
                println!("digest:    {}", image.digest);
                println!("source:    {}", image.source);
                println!(
                    "entries:   {} ({} files, {} bytes)",
                    image.entries, image.files, image.bytes
                );
                for e in &listed {
                    let hash = e.hash.map(|h| h.to_hex()).unwrap_or_default();
                    let hash = hash.get(..12).unwrap_or("");
                    let link =
                        e.link_target.as_deref().map(|t| format!(" -> {t}")).unwrap_or_default();
                    println!(
                        "{:<12} {:04o} {:>5}:{:<5} {:>10} {:<12} {}{link}",
                        e.kind.as_str(),
                        e.mode,
                        e.uid,
                        e.gid,
                        e.size,
                        hash,
                        e.path
                    );
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        ImageCommand::Rm { references, json } => {
            let mut out = Vec::new();
            for reference in &references {
                let image = find(&store, reference)?;
                let freed = store.remove_image(&image.reference)?;
                if !json {
                    println!(
                        "removed {}: freed {} objects, {} bytes",
                        image.reference, freed.objects, freed.bytes
                    );
                }
                out.push(json!({ "reference": image.reference, "freed_objects": freed.objects, "freed_bytes": freed.bytes }));
            }
            if json {
                println!("{:#}", json!(out));
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        ImageCommand::Gc { json } => {
            let freed = store.gc()?;
            let missing = store.missing_objects()?;
            if json {
                let missing: Vec<String> = missing.iter().map(ToString::to_string).collect();
                println!(
                    "{:#}",
                    json!({
                        "freed_objects": freed.objects, "freed_bytes": freed.bytes,
                        "staging_removed": freed.staging, "missing_objects": missing,
                    })
                );
            } else {
                println!(
                    "freed {} objects, {} bytes; removed {} staging files",
                    freed.objects, freed.bytes, freed.staging
                );
                for m in &missing {
                    println!("missing object: {m}");
                }
            }
            if missing.is_empty() {
                Ok(std::process::ExitCode::SUCCESS)
            } else {
                Ok(std::process::ExitCode::FAILURE)
            }
        }
    }
}

/// Finds an image by its canonical reference or by the path it came from.
pub fn find(store: &Store, reference: &str) -> Result<ImageRecord> {
    let mut candidates = vec![reference.to_string()];
    if let Ok(parsed) = Reference::parse(reference) {
        candidates.insert(0, parsed.to_string());
    }
    candidates.push(format!("dir:{reference}"));
    candidates.push(format!("tar:{reference}"));
    for c in candidates {
        if let Some(image) = store.image(&c)? {
            return Ok(image);
        }
    }
    bail!("no image {reference} in the store")
}

/// A progress bar on a terminal, nothing otherwise.
struct Bar(
    Option<indicatif::ProgressBar>,
    std::sync::atomic::AtomicU64,
    std::sync::atomic::AtomicU64,
);

impl Progress for Bar {
    fn entry(&self, _archive_bytes: u64, content_bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let files = self.1.fetch_add(1, Relaxed) + 1;
        let bytes = self.2.fetch_add(content_bytes, Relaxed) + content_bytes;
        if let Some(bar) = &self.0
            && files % 256 == 1
        {
            bar.set_message(format!("{files} entries, {}", indicatif::HumanBytes(bytes)));
        }
    }
}

async fn import(
    store: Arc<Store>,
    references: &[String],
    json: bool,
) -> Result<std::process::ExitCode> {
    use std::io::IsTerminal;
    let images = Arc::new(Images::new(store.clone(), ImportLimits::default(), PARALLEL_IMPORTS));
    let multi = (!json && std::io::stderr().is_terminal()).then(indicatif::MultiProgress::new);
    let mut tasks = Vec::new();
    for reference in references {
        let bar = multi.as_ref().map(|m| {
            let bar = m.add(indicatif::ProgressBar::new_spinner());
            bar.set_prefix(reference.clone());
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {prefix} {msg} [{elapsed}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        let progress = Arc::new(Bar(bar.clone(), Default::default(), Default::default()));
        let images = images.clone();
        let reference = reference.clone();
        tasks.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = images.import(&reference, progress).await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            (reference, result, started.elapsed())
        }));
    }
    let mut failed = false;
    let mut out = Vec::new();
    for task in tasks {
        let (reference, result, elapsed) = task.await.context("import task")?;
        match result {
            Ok(image) => {
                if !json {
                    println!(
                        "imported {} in {:.2}s: {} entries, {} files, {} bytes, {}",
                        image.reference,
                        elapsed.as_secs_f64(),
                        image.entries,
                        image.files,
                        image.bytes,
                        image.digest
                    );
                }
                let mut v = image_json(&image);
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("seconds".into(), json!(elapsed.as_secs_f64()));
                }
                out.push(v);
            }
            Err(e) => {
                failed = true;
                if !json {
                    eprintln!("error: {reference}: {e}");
                }
                out.push(json!({ "reference": reference, "error": e.to_string() }));
            }
        }
    }
    if json {
        println!("{:#}", json!(out));
    }
    let stats = store.stats()?;
    if !json {
        println!(
            "store: {} images, {} objects, {} bytes",
            stats.images, stats.objects, stats.object_bytes
        );
    }
    Ok(if failed { std::process::ExitCode::FAILURE } else { std::process::ExitCode::SUCCESS })
}

fn image_json(i: &ImageRecord) -> serde_json::Value {
    json!({
        "reference": i.reference, "digest": i.digest, "source": i.source,
        "source_digest": i.source_digest, "entries": i.entries, "files": i.files,
        "bytes": i.bytes, "created_at": i.created_at,
    })
}

fn entry_json(e: &provd_domain::image::Entry) -> serde_json::Value {
    json!({
        "path": e.path, "kind": e.kind.as_str(), "mode": format!("{:04o}", e.mode),
        "uid": e.uid, "gid": e.gid, "mtime": e.mtime, "size": e.size,
        "hash": e.hash.map(|h| h.to_string()), "link_target": e.link_target,
        "device": e.device.map(|(a, b)| json!([a, b])),
    })
}

/// `--data-dir`, else `$PROVD_DATA_DIR`, else `/var/lib/provd`.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("PROVD_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/provd"))
}
