#![allow(clippy::expect_used, clippy::panic)] // a build script reports failure by panicking
//! Builds every guest the tests and benchmarks run — the example plugins and
//! the hostile fixtures — in one cargo invocation, and exposes their paths as
//! constants. Guest builds share `<target>/guest`, so after the first build
//! this is a quick no-op.

use std::path::{Path, PathBuf};

/// (package, directory relative to the workspace root)
const GUESTS: &[(&str, &str)] = &[
    ("hello", "examples/hello"),
    ("hostile", "tests/guests/hostile"),
    ("hashbench", "tests/guests/hashbench"),
    ("imager", "tests/guests/imager"),
    ("abuser", "tests/guests/abuser"),
    ("shared-partition", "plugins/shared-partition"),
    ("cloud-init", "plugins/cloud-init"),
];

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let root = manifest_dir.parent().expect("tests/ sits in the workspace root").to_path_buf();
    for dir in ["sdk", "wit", "examples/hello", "plugins", "tests/guests"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("Cargo.toml").display());
    println!("cargo:rerun-if-changed={}", root.join("Cargo.lock").display());
    println!("cargo:rerun-if-env-changed=PROVD_GUEST_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=PROVD_GUEST_TARGET_DIR");

    let target_dir = guest_target_dir(&root);
    let toolchain = provd_guest_build::Toolchain::detect().unwrap_or_else(|e| panic!("{e}"));
    let request = provd_guest_build::BuildRequest {
        manifest_path: root.join("Cargo.toml"),
        packages: GUESTS.iter().map(|(p, _)| p.to_string()).collect(),
        target_dir,
    };
    let built = provd_guest_build::build(&request, toolchain).unwrap_or_else(|e| panic!("{e}"));

    let mut code = String::new();
    code.push_str(&format!(
        "/// The toolchain that built the fixtures.\npub const TOOLCHAIN: &str = {:?};\n",
        toolchain.describe()
    ));
    for b in &built {
        let dir = GUESTS
            .iter()
            .find(|(p, _)| *p == b.package)
            .map(|(_, d)| root.join(d))
            .expect("built what was asked");
        let konst = b.package.to_uppercase().replace('-', "_");
        code.push_str(&format!(
            "/// Component and crate directory of `{}`.\npub const {konst}: Fixture = Fixture {{ component: {:?}, dir: {:?} }};\n",
            b.package,
            b.component.display().to_string(),
            dir.display().to_string()
        ));
    }
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("fixtures.rs");
    std::fs::write(out, code).expect("write fixtures.rs");
}

/// `$PROVD_GUEST_TARGET_DIR`, else `$CARGO_TARGET_DIR/guest`, else
/// `<workspace>/target/guest`.
fn guest_target_dir(root: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("PROVD_GUEST_TARGET_DIR") {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() { dir.join("guest") } else { root.join(dir).join("guest") };
    }
    root.join("target").join("guest")
}
