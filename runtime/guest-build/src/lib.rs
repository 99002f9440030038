//! Builds plugin crates into WebAssembly components.
//!
//! Two toolchains are supported, tried in this order:
//!
//! 1. **rustup with `wasm32-wasip2`** (`rustup target add wasm32-wasip2`):
//!    cargo produces a component directly.
//! 2. **Debian's Rust with wasi-libc** (`apt-get install rustc-web cargo-web
//!    rust-web-src lld-19 wasi-libc`): for machines where rustup cannot
//!    download targets. The crate is built for `wasm32-wasip1` with the
//!    standard library compiled from source, and the core module is turned
//!    into a component with the WASI preview1 reactor adapter.
//!
//! `PROVD_GUEST_TOOLCHAIN=rustup|debian` forces one. Builds go to a target
//! directory of the caller's choosing, so repeated builds reuse everything
//! cargo already compiled, the standard library included.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's toolchain puts its parts.
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_LINKER: &str = "wasm-ld-19";
const DEBIAN_LINKER_PATH: &str = "/usr/bin/wasm-ld-19";
const DEBIAN_WASI_LIBC: &str = "/usr/lib/wasm32-wasi";
const DEBIAN_RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library";

/// Why a plugin could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// no wasm toolchain was found
    #[error(
        "no WebAssembly toolchain found: run `rustup target add wasm32-wasip2`, or on Debian \
         `apt-get install rustc-web cargo-web rust-web-src lld-19 wasi-libc` \
         (scripts/setup-guest-toolchain.sh does this)"
    )]
    NoToolchain,
    /// PROVD_GUEST_TOOLCHAIN names a toolchain that is not installed or unknown
    #[error("PROVD_GUEST_TOOLCHAIN={0}: {1}")]
    Forced(String, &'static str),
    /// reading a file failed
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// the crate manifest could not be read
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
    /// cargo failed; its output went to stderr
    #[error("cargo failed building {what} ({status})")]
    Cargo { what: String, status: std::process::ExitStatus },
    /// turning the core module into a component failed
    #[error("encoding {path} as a component: {message}")]
    Encode { path: PathBuf, message: String },
    /// componentize-py, which builds Python plugins, is not installed
    #[error(
        "componentize-py not found: `pip install componentize-py=={}` (scripts/setup.sh puts it in \
         .cache/py), or set PROVD_COMPONENTIZE_PY",
        python::COMPONENTIZE_PY_VERSION
    )]
    NoComponentizePy,
    /// componentize-py failed; its output went to stderr
    #[error("componentize-py failed building {what} ({status})")]
    Componentize { what: String, status: std::process::ExitStatus },
}

mod python;
pub use python::{COMPONENTIZE_PY_VERSION, build_python, is_python_plugin};

/// A wasm toolchain found on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toolchain {
    /// rustup's `wasm32-wasip2` target.
    RustupWasip2,
    /// Debian's Rust, `wasm32-wasip1` with build-std, plus the adapter.
    DebianWasip1,
}

impl Toolchain {
    /// Finds a usable toolchain.
    pub fn detect() -> Result<Toolchain, BuildError> {
        match std::env::var("PROVD_GUEST_TOOLCHAIN").ok().as_deref() {
            Some("rustup") if rustup_has_wasip2() => return Ok(Toolchain::RustupWasip2),
            Some("rustup") => {
                return Err(BuildError::Forced(
                    "rustup".into(),
                    "rustup's wasm32-wasip2 target is not installed",
                ));
            }
            Some("debian") if debian_available() => return Ok(Toolchain::DebianWasip1),
            Some("debian") => {
                return Err(BuildError::Forced(
                    "debian".into(),
                    "Debian's wasm toolchain is missing",
                ));
            }
            Some(other) if !other.is_empty() => {
                return Err(BuildError::Forced(other.into(), "expected `rustup` or `debian`"));
            }
            _ => {}
        }
        if rustup_has_wasip2() {
            Ok(Toolchain::RustupWasip2)
        } else if debian_available() {
            Ok(Toolchain::DebianWasip1)
        } else {
            Err(BuildError::NoToolchain)
        }
    }

    pub fn target(self) -> &'static str {
        match self {
            Toolchain::RustupWasip2 => "wasm32-wasip2",
            Toolchain::DebianWasip1 => "wasm32-wasip1",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Toolchain::RustupWasip2 => "rustup wasm32-wasip2",
            Toolchain::DebianWasip1 => "Debian rustc, wasm32-wasip1 + build-std + reactor adapter",
        }
    }
}

fn rustup_has_wasip2() -> bool {
    Command::new("rustup").args(["target", "list", "--installed"]).output().is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == "wasm32-wasip2")
    })
}

fn debian_available() -> bool {
    [DEBIAN_CARGO, DEBIAN_RUSTC, DEBIAN_LINKER_PATH, DEBIAN_RUST_SRC]
        .iter()
        .all(|p| Path::new(p).exists())
        && Path::new(DEBIAN_WASI_LIBC).join("libc.a").exists()
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// `Cargo.toml` of the plugin crate, or of the workspace holding it.
    pub manifest_path: PathBuf,
    /// Packages to build; empty means the package of `manifest_path`.
    pub packages: Vec<String>,
    /// Cargo target directory for guest builds (kept between builds).
    pub target_dir: PathBuf,
}

/// One built component.
#[derive(Debug, Clone)]
pub struct Built {
    pub package: String,
    pub component: PathBuf,
}

/// Builds the requested packages and returns their components, written to
/// `<target_dir>/components/<package>.wasm`.
pub fn build(request: &BuildRequest, toolchain: Toolchain) -> Result<Vec<Built>, BuildError> {
    let packages = if request.packages.is_empty() {
        vec![package_name(&request.manifest_path)?]
    } else {
        request.packages.clone()
    };
    let mut cmd = match toolchain {
        Toolchain::RustupWasip2 => Command::new("cargo"),
        Toolchain::DebianWasip1 => Command::new(DEBIAN_CARGO),
    };
    scrub_cargo_env(&mut cmd);
    cmd.arg("build")
        .arg("--release")
        .arg("--target")
        .arg(toolchain.target())
        .arg("--manifest-path")
        .arg(&request.manifest_path)
        .arg("--target-dir")
        .arg(&request.target_dir);
    for p in &packages {
        cmd.arg("-p").arg(p);
    }
    // Plugins ship without debug info: it triples their size, and size is
    // what the node pays for at every compilation.
    cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "false").env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    if toolchain == Toolchain::DebianWasip1 {
        cmd.arg("-Zbuild-std=std,panic_abort")
            .env("RUSTC", DEBIAN_RUSTC)
            .env("RUSTC_BOOTSTRAP", "1")
            .env(
                "RUSTFLAGS",
                format!(
                    "-C linker={DEBIAN_LINKER} -C link-self-contained=no -L {DEBIAN_WASI_LIBC}"
                ),
            );
    }
    let status = cmd.status().map_err(|source| BuildError::Io { path: "cargo".into(), source })?;
    if !status.success() {
        return Err(BuildError::Cargo { what: packages.join(", "), status });
    }

    let out_dir = request.target_dir.join(toolchain.target()).join("release");
    let components = request.target_dir.join("components");
    std::fs::create_dir_all(&components)
        .map_err(|source| BuildError::Io { path: components.clone(), source })?;
    let mut built = Vec::new();
    for package in packages {
        let artifact = out_dir.join(format!("{}.wasm", package.replace('-', "_")));
        let bytes = std::fs::read(&artifact)
            .map_err(|source| BuildError::Io { path: artifact.clone(), source })?;
        let component = match toolchain {
            Toolchain::RustupWasip2 => bytes,
            Toolchain::DebianWasip1 => componentize(&bytes)
                .map_err(|message| BuildError::Encode { path: artifact.clone(), message })?,
        };
        let path = components.join(format!("{package}.wasm"));
        write_if_changed(&path, &component)?;
        built.push(Built { package, component: path });
    }
    Ok(built)
}

/// Encodes a core module built against `wasm32-wasip1` as a component,
/// adapting its WASI preview1 imports with the reactor adapter.
pub fn componentize(core_module: &[u8]) -> Result<Vec<u8>, String> {
    use wasi_preview1_component_adapter_provider::{
        WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
    };
    wit_component::ComponentEncoder::default()
        .module(core_module)
        .and_then(|e| {
            e.adapter(WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER)
        })
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| format!("{e:#}"))
}

/// Keeps the file's modification time when nothing changed, so that
/// whatever watches it does not rebuild for nothing; otherwise replaces it
/// atomically, because tests may be reading it while another build runs.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let io = |source| BuildError::Io { path: path.into(), source };
    let tmp = path.with_extension(format!("wasm.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn package_name(manifest_path: &Path) -> Result<String, BuildError> {
    let text = std::fs::read_to_string(manifest_path)
        .map_err(|source| BuildError::Io { path: manifest_path.into(), source })?;
    #[derive(serde::Deserialize)]
    struct CargoToml {
        package: Option<Package>,
    }
    #[derive(serde::Deserialize)]
    struct Package {
        name: String,
    }
    let parsed: CargoToml = toml::from_str(&text)
        .map_err(|e| BuildError::Manifest { path: manifest_path.into(), message: e.to_string() })?;
    parsed.package.map(|p| p.name).ok_or_else(|| BuildError::Manifest {
        path: manifest_path.into(),
        message: "no [package] section: name the packages to build".into(),
    })
}

/// A build started from a cargo build script (the test fixtures) inherits
/// the outer build's settings; none of them fit a wasm build.
fn scrub_cargo_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let inherited_from_cargo = (key.starts_with("CARGO_")
            && !matches!(
                key,
                "CARGO_HOME" | "CARGO_NET_OFFLINE" | "CARGO_REGISTRIES_CRATES_IO_PROTOCOL"
            ))
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "TARGET"
                    | "HOST"
                    | "OPT_LEVEL"
                    | "PROFILE"
                    | "DEBUG"
                    | "OUT_DIR"
                    | "NUM_JOBS"
                    | "CARGO"
                    | "CARGO_MAKEFLAGS"
                    | "MAKEFLAGS"
                    | "MFLAGS"
            );
        if inherited_from_cargo {
            cmd.env_remove(key);
        }
    }
}
