//! What the CLI tests that start real daemons share.

use std::path::{Path, PathBuf};

/// `provd`, built beside `provctl` by `cargo test --workspace`.
pub fn provd_binary() -> PathBuf {
    let provctl = Path::new(env!("CARGO_BIN_EXE_provctl"));
    let provd = provctl.with_file_name("provd");
    assert!(
        provd.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or build provd-daemon first)",
        provd.display()
    );
    provd
}
