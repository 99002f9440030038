//! What the benchmark programs share: running a peer's tool and measuring
//! what it left on disk.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Bytes allocated on disk under `path` (`du -B1 -s`).
pub fn allocated(path: &Path) -> Result<u64> {
    let out = Command::new("du").arg("-B1").arg("-s").arg(path).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().and_then(|n| n.parse().ok()).context("du")
}

/// Runs `cmd`; its stderr is the error when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
