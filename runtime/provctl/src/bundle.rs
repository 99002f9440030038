//! `provctl keygen` and `provctl bundle`: signing keys, and building,
//! signing, verifying and auditing signed plugin bundles.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use provd_bundle::{Audit, PublicKey, SignatureStatus, SigningKey, utc};

/// `provctl keygen NAME`.
#[derive(Args)]
pub struct KeygenArgs {
    /// Base name of the files: NAME.key (secret, mode 0600) and NAME.pub.
    name: String,
    /// Directory to write them in.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Comment at the end of the public key line [default: NAME].
    #[arg(long)]
    comment: Option<String>,
}

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Build an unsigned bundle from a manifest and a component (or a plugin crate).
    Build(BuildArgs),
    /// Add a signature to a bundle.
    Sign(SignArgs),
    /// Verify a bundle as a node would: trusted signature, contents, validity.
    Verify(VerifyArgs),
    /// Show what a bundle asks for and contains, and every mismatch.
    Audit(AuditArgs),
}

#[derive(Args)]
pub struct BuildArgs {
    /// A plugin crate to build first (its plugin.toml is the manifest), instead
    /// of --manifest and --component.
    #[arg(conflicts_with = "component")]
    dir: Option<PathBuf>,
    /// The plugin.toml.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// The component (.wasm).
    #[arg(long, requires = "manifest")]
    component: Option<PathBuf>,
    /// The bundle to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Days until the bundle expires.
    #[arg(long, default_value_t = 365)]
    expires_days: u64,
}

#[derive(Args)]
pub struct SignArgs {
    /// The bundle to sign.
    bundle: PathBuf,
    /// The secret key file (NAME.key).
    #[arg(long)]
    key: PathBuf,
    /// Where to write the signed bundle [default: replace BUNDLE].
    #[arg(short, long)]
    output: Option<PathBuf>,
}

#[derive(Args)]
pub struct VerifyArgs {
    bundle: PathBuf,
    /// Public key files (NAME.pub) to trust.
    #[arg(long, required = true)]
    trusted: Vec<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct AuditArgs {
    bundle: PathBuf,
    /// Public key files (NAME.pub) to check signatures with; without them
    /// signatures are listed, not checked.
    #[arg(long)]
    trusted: Vec<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// Writes a new key pair.
pub fn keygen(args: KeygenArgs) -> Result<ExitCode> {
    if args.name.is_empty() || args.name.contains('/') || args.name.starts_with('.') {
        bail!("{:?} is not a key name: use a plain file name without a slash", args.name);
    }
    let key = SigningKey::generate()?;
    let comment = args.comment.unwrap_or_else(|| args.name.clone());
    let (secret, public) = provd_bundle::write_key_pair(&args.dir, &args.name, &key, &comment)?;
    println!("secret key {} (keep it private)", secret.display());
    println!("public key {} (key id {})", public.display(), key.key_id());
    Ok(ExitCode::SUCCESS)
}

pub fn run(command: BundleCommand) -> Result<ExitCode> {
    match command {
        BundleCommand::Build(args) => build(args),
        BundleCommand::Sign(args) => sign(args),
        BundleCommand::Verify(args) => verify(args),
        BundleCommand::Audit(args) => audit(args),
    }
}

fn build(args: BuildArgs) -> Result<ExitCode> {
    let (manifest_path, component_path) = match (&args.dir, &args.manifest, &args.component) {
        (None, Some(manifest), Some(component)) => (manifest.clone(), component.clone()),
        (Some(dir), manifest, None) => {
            let component = provd_testkit::build_crate(dir)
                .with_context(|| format!("building the plugin crate {}", dir.display()))?;
            (manifest.clone().unwrap_or_else(|| dir.join("plugin.toml")), component)
        }
        _ => bail!("give a plugin crate directory, or --manifest and --component"),
    };
    let manifest = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let component = read_limited(&component_path)?;
    let created = now()?;
    let expires = args
        .expires_days
        .checked_mul(86_400)
        .and_then(|secs| created.checked_add(secs))
        .context("--expires-days is too large")?;
    let bundle = provd_bundle::build(&manifest, &component, created, expires)
        .with_context(|| format!("bundling {}", component_path.display()))?;
    write_atomic(&args.output, &bundle)?;
    let audit = provd_bundle::audit(&bundle)?;
    println!(
        "{}: {} {} ({} bytes, {}), unsigned, expires {}",
        args.output.display(),
        audit.name,
        audit.version,
        bundle.len(),
        audit.digest,
        utc(expires)
    );
    // Building does not gate on these (the node and reviewers do), but the
    // author should see them now rather than at the first refused deployment.
    for m in &audit.mismatches {
        eprintln!("warning: {m}");
    }
    Ok(ExitCode::SUCCESS)
}

fn sign(args: SignArgs) -> Result<ExitCode> {
    let key = SigningKey::read_file(&args.key)?;
    let bundle = read_limited(&args.bundle)?;
    let signed = provd_bundle::sign(&bundle, &key)
        .with_context(|| format!("signing {}", args.bundle.display()))?;
    let output = args.output.unwrap_or_else(|| args.bundle.clone());
    write_atomic(&output, &signed)?;
    println!("{}: signed by key {}", output.display(), key.key_id());
    Ok(ExitCode::SUCCESS)
}

fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let trusted = read_public_keys(&args.trusted)?;
    let bundle = read_limited(&args.bundle)?;
    match provd_bundle::verify(&bundle, &trusted, now()?) {
        Ok(v) => {
            if args.json {
                let out = serde_json::json!({
                    "valid": true, "name": v.name, "version": v.version.to_string(),
                    "digest": v.digest, "signer": v.signer, "created": v.created,
                    "expires": v.expires,
                });
                println!("{out:#}");
            } else {
                println!(
                    "{}: valid: {} {} ({}), signed by {}, expires {}",
                    args.bundle.display(),
                    v.name,
                    v.version,
                    v.digest,
                    v.signer,
                    utc(v.expires)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if args.json {
                println!("{:#}", serde_json::json!({ "valid": false, "error": e.to_string() }));
            } else {
                eprintln!("{}: refused: {e}", args.bundle.display());
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn audit(args: AuditArgs) -> Result<ExitCode> {
    let bundle = read_limited(&args.bundle)?;
    let audit = if args.trusted.is_empty() {
        provd_bundle::audit(&bundle)?
    } else {
        let trusted = read_public_keys(&args.trusted)?;
        provd_bundle::audit_with(&bundle, &trusted, now()?)?
    };
    // With trusted keys given, a bundle none of them signed would be refused
    // by a node pinning them: a failure, like an invalid signature.
    let untrusted = !args.trusted.is_empty() && !audit.has_trusted_signature();
    if args.json {
        let mut out = serde_json::to_value(&audit)?;
        if let Some(map) = out.as_object_mut() {
            map.insert("clean".into(), (audit.is_clean() && !untrusted).into());
        }
        println!("{out:#}");
    } else {
        print_audit(&args.bundle, &audit, untrusted);
    }
    Ok(if audit.is_clean() && !untrusted { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn print_audit(path: &Path, a: &Audit, untrusted: bool) {
    println!("bundle    {}", path.display());
    println!("plugin    {} {}", a.name, a.version);
    println!("digest    {} ({} bytes)", a.digest, a.component_size);
    println!("target    {}", a.target);
    println!("created   {}", utc(a.created));
    println!("expires   {}", utc(a.expires));
    if a.signatures.is_empty() {
        println!("signers   none (unsigned)");
    } else {
        println!("signers");
        for s in &a.signatures {
            let status = match s.status {
                SignatureStatus::Unverified => "present, not checked (no --trusted keys)",
                SignatureStatus::Verified => "verified with a trusted key",
                SignatureStatus::Invalid => "INVALID: claims a trusted key and does not verify",
                SignatureStatus::Untrusted => "by a key not trusted, not checked",
            };
            println!("  {}  {status}", s.key_id);
        }
    }
    println!("capabilities");
    match a.capabilities.as_object() {
        Some(caps) if !caps.is_empty() => {
            for (name, params) in caps {
                let params = match params.as_object() {
                    Some(p) if !p.is_empty() => {
                        p.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
                    }
                    _ => "(node defaults)".into(),
                };
                println!("  {name:<11} {params}");
            }
        }
        _ => println!("  none"),
    }
    println!("limits");
    match a.limits.as_object() {
        Some(limits) if !limits.is_empty() => {
            for (name, value) in limits {
                println!("  {name:<15} {value}");
            }
        }
        _ => println!("  node defaults"),
    }
    println!("imports");
    for i in &a.imports {
        println!("  {i}");
    }
    println!("exports");
    for e in &a.exports {
        println!("  {e}");
    }
    let l = &a.bundle_limits;
    println!(
        "format limits: bundle {} bytes, header {} bytes, manifest {} bytes, {} signatures",
        l.max_bundle_bytes, l.max_header_bytes, l.max_manifest_bytes, l.max_signatures
    );
    if a.mismatches.is_empty() && !untrusted {
        println!("mismatches: none");
    } else {
        println!("mismatches");
        for m in &a.mismatches {
            println!("  {m}");
        }
        if untrusted {
            println!("  no signature verifies with a --trusted key");
        }
    }
}

fn read_public_keys(paths: &[PathBuf]) -> Result<Vec<PublicKey>> {
    paths.iter().map(|p| Ok(PublicKey::read_file(p)?)).collect()
}

/// Reads a file of at most the bundle limit, so a wrong path (a disk image,
/// a device) fails at once instead of filling memory.
fn read_limited(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(provd_bundle::MAX_BUNDLE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > provd_bundle::MAX_BUNDLE_BYTES {
        bail!("{} is larger than {} bytes", path.display(), provd_bundle::MAX_BUNDLE_BYTES);
    }
    Ok(bytes)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it
/// over `path`, so a reader never sees half a bundle.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().context("the output path has no file name")?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

fn now() -> Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_secs())
}
