//! Python plugins: a directory with `plugin.toml` beside `app.py` (or a
//! `pyproject.toml`) is built with componentize-py into a component that
//! targets a world importing exactly the capabilities `plugin.toml`
//! declares, with the Python SDK (`sdk/python/provd`) on its path.
//!
//! WASI is stubbed (`--stub-wasi`): CPython's WASI build would import
//! `wasi:sockets`, which no provd plugin is linked with, and a plugin reaches
//! the node only through provd's interfaces anyway. So a Python plugin
//! imports nothing but the provd capabilities it declares.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{BuildError, write_if_changed};

/// The contract, and the SDK, as this build of provd knows them.
const PROVD_WIT: &str = include_str!("../../../wit/provd.wit");
const SDK_FILES: &[(&str, &str)] = &[
    ("__init__.py", include_str!("../../../sdk/python/provd/__init__.py")),
    ("errors.py", include_str!("../../../sdk/python/provd/errors.py")),
    ("log.py", include_str!("../../../sdk/python/provd/log.py")),
    ("progress.py", include_str!("../../../sdk/python/provd/progress.py")),
    ("hashing.py", include_str!("../../../sdk/python/provd/hashing.py")),
    ("images.py", include_str!("../../../sdk/python/provd/images.py")),
    ("dedup.py", include_str!("../../../sdk/python/provd/dedup.py")),
    ("partitions.py", include_str!("../../../sdk/python/provd/partitions.py")),
    ("vm.py", include_str!("../../../sdk/python/provd/vm.py")),
];

/// The capability interfaces, in the order the WIT declares them.
const CAPABILITIES: &[&str] =
    &["log", "progress", "hashing", "images", "dedup", "partitions", "vm"];

/// The componentize-py release this build is tested with.
pub const COMPONENTIZE_PY_VERSION: &str = "0.25.1";

/// Whether `dir` holds a Python plugin.
pub fn is_python_plugin(dir: &Path) -> bool {
    dir.join("plugin.toml").is_file()
        && (dir.join("app.py").is_file() || dir.join("pyproject.toml").is_file())
        && !dir.join("Cargo.toml").is_file()
}

/// componentize-py: `$PROVD_COMPONENTIZE_PY`, else on `PATH`, else where
/// `scripts/setup.sh` installs it in this repository (`.cache/py`).
fn componentize_py() -> Result<PathBuf, BuildError> {
    if let Some(p) = std::env::var_os("PROVD_COMPONENTIZE_PY").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/py/bin/componentize-py");
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("componentize-py"))
        .chain(std::iter::once(repo))
        .find(|p| p.is_file())
        .ok_or(BuildError::NoComponentizePy)
}

/// The capability sections `plugin.toml` declares.
fn declared(manifest: &Path) -> Result<Vec<&'static str>, BuildError> {
    let text = std::fs::read_to_string(manifest)
        .map_err(|source| BuildError::Io { path: manifest.into(), source })?;
    let value: toml::Table = toml::from_str(&text)
        .map_err(|e| BuildError::Manifest { path: manifest.into(), message: e.to_string() })?;
    let caps = value.get("capabilities").and_then(toml::Value::as_table);
    let mut out = Vec::new();
    for (name, _) in caps.into_iter().flatten() {
        match CAPABILITIES.iter().find(|c| **c == name.as_str()) {
            Some(c) => out.push(*c),
            None => {
                return Err(BuildError::Manifest {
                    path: manifest.into(),
                    message: format!("unknown capability {name:?}"),
                });
            }
        }
    }
    out.sort_by_key(|c| CAPABILITIES.iter().position(|x| x == c));
    // dedup's entries are of the images interface's type: a world with
    // dedup imports images too, which the node would refuse undeclared.
    if out.contains(&"dedup") && !out.contains(&"images") {
        return Err(BuildError::Manifest {
            path: manifest.into(),
            message: "capability `dedup` uses the images interface's types: declare \
                      [capabilities.images] as well"
                .into(),
        });
    }
    Ok(out)
}

/// The world a plugin declaring `caps` targets: provd's `provisioner`
/// world cut to those imports.
fn world(caps: &[&str]) -> String {
    let imports: String = caps.iter().map(|c| format!("    import {c};\n")).collect();
    format!(
        "\nworld python-plugin {{\n    use types.{{error, field}};\n    \
         record request {{ operation-id: string, input: string }}\n    \
         record report {{ summary: string, fields: list<field>, output: string }}\n\
         {imports}    export provision: func(request: request) -> result<report, error>;\n}}\n"
    )
}

/// Builds the Python plugin in `dir` into `<out_dir>/components/<name>.wasm`
/// (`name`: the directory's name), working in `<out_dir>/python/<name>`.
pub fn build_python(dir: &Path, out_dir: &Path) -> Result<PathBuf, BuildError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BuildError::Io { path, source }
    };
    let name = dir
        .canonicalize()
        .map_err(io(dir))?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    if !dir.join("app.py").is_file() {
        return Err(BuildError::Manifest {
            path: dir.join("pyproject.toml"),
            message:
                "a Python plugin's module is app.py (binding `WitWorld = provd.export(...)`), \
                      and there is none beside plugin.toml"
                    .into(),
        });
    }
    let caps = declared(&dir.join("plugin.toml"))?;
    let work = out_dir.join("python").join(&name);
    let wit = work.join("wit");
    let sdk = work.join("sdk").join("provd");
    std::fs::create_dir_all(&wit).map_err(io(&wit))?;
    std::fs::create_dir_all(&sdk).map_err(io(&sdk))?;
    write_if_changed(&wit.join("provd.wit"), format!("{PROVD_WIT}{}", world(&caps)).as_bytes())?;
    for (file, text) in SDK_FILES {
        write_if_changed(&sdk.join(file), text.as_bytes())?;
    }
    let components = out_dir.join("components");
    std::fs::create_dir_all(&components).map_err(io(&components))?;
    let out = components.join(format!("{name}.wasm"));
    // Written under a name of its own and renamed into place: two builds of
    // one plugin at once (tests run in parallel) must never let a reader
    // see half a component.
    static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = components.join(format!(".{name}.wasm.{}.{n}", std::process::id()));
    let tool = componentize_py()?;
    let status = Command::new(&tool)
        .arg("--quiet")
        .arg("-d")
        .arg(&wit)
        .args(["-w", "python-plugin", "componentize", "--stub-wasi"])
        .arg("-p")
        .arg(dir)
        .arg("-p")
        .arg(work.join("sdk"))
        .arg("app")
        .arg("-o")
        .arg(&partial)
        .status()
        .map_err(io(&tool))?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(BuildError::Componentize { what: dir.display().to_string(), status });
    }
    std::fs::rename(&partial, &out).map_err(io(&out))?;
    Ok(out)
}
