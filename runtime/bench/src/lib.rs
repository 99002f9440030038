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

/// The `p` quantile (0 to 1) of sorted latencies; zero for none.
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// Milliseconds, for printing.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
