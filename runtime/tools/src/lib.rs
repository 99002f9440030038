//! The one way provd runs an external program (`mkfs.erofs`, `mke2fs`,
//! `debugfs`, `qemu-img`).
//!
//! These programs run with root's authority over the data directory, so:
//! - a program is found only in a fixed list of directories, never through
//!   `PATH`, so the daemon's environment cannot substitute one;
//! - it runs with an empty environment (`LC_ALL=C` alone, for stable
//!   messages), stdin closed and stdout discarded;
//! - it is killed when it runs past its time limit;
//! - however much it writes to stderr, only the tail is kept for the error.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A program and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

pub const MKFS_EROFS: Tool = Tool { name: "mkfs.erofs", package: "erofs-utils" };
pub const MKE2FS: Tool = Tool { name: "mke2fs", package: "e2fsprogs" };
pub const DEBUGFS: Tool = Tool { name: "debugfs", package: "e2fsprogs" };
pub const QEMU_IMG: Tool = Tool { name: "qemu-img", package: "qemu-utils" };

/// Where programs are looked for by default.
pub const DEFAULT_TOOL_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// Longest stderr kept in an error.
const STDERR_KEEP: usize = 2048;

/// Why a program could not be run or failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{tool} not found: install the Debian package {package}")]
    Missing { tool: &'static str, package: &'static str },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed { tool: &'static str, status: String, stderr: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// Where programs are found and how long one run may take.
#[derive(Debug, Clone)]
pub struct Tools {
    pub dirs: Vec<PathBuf>,
    pub timeout: Duration,
}

impl Default for Tools {
    /// The default directories and 30 minutes a run.
    fn default() -> Self {
        Tools {
            dirs: DEFAULT_TOOL_DIRS.iter().map(PathBuf::from).collect(),
            timeout: Duration::from_secs(30 * 60),
        }
    }
}

impl Tools {
    /// The path `tool` runs from.
    pub fn find(&self, tool: Tool) -> Result<PathBuf, ToolError> {
        self.dirs
            .iter()
            .map(|d| d.join(tool.name))
            .find(|p| p.is_file())
            .ok_or(ToolError::Missing { tool: tool.name, package: tool.package })
    }

    /// Runs `tool` with `args` for at most `self.timeout`; a program still
    /// running then is killed.
    pub fn run<I, S>(&self, tool: Tool, args: I) -> Result<(), ToolError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        use std::io::Read;
        let path = self.find(tool)?;
        let io = |e| ToolError::Io { what: format!("running {}", path.display()), source: e };
        let mut child = Command::new(&path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_clear()
            .env("LC_ALL", "C")
            .spawn()
            .map_err(io)?;
        // Keep only the end of stderr, however much the program writes.
        let stderr = child.stderr.take().map(|mut err| {
            std::thread::spawn(move || {
                let mut kept: Vec<u8> = Vec::new();
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    kept.extend_from_slice(buf.get(..n).unwrap_or_default());
                    if kept.len() > 2 * STDERR_KEEP {
                        kept.drain(..kept.len() - STDERR_KEEP);
                    }
                }
                kept
            })
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(io)? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        let text = String::from_utf8_lossy(&err);
        let start = text.ceil_char_boundary(text.len().saturating_sub(STDERR_KEEP));
        let tail = text.get(start..).unwrap_or_default().trim().to_string();
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => {
                Err(ToolError::Failed { tool: tool.name, status: status.to_string(), stderr: tail })
            }
            None => Err(ToolError::Failed {
                tool: tool.name,
                status: format!("killed after {} s", self.timeout.as_secs()),
                stderr: tail,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &std::path::Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn tools(dir: &std::path::Path, timeout: Duration) -> Tools {
        Tools { dirs: vec![dir.to_path_buf()], timeout }
    }

    const PROBE: Tool = Tool { name: "probe", package: "probe-package" };

    #[test]
    fn a_program_outside_the_directories_is_missing_and_names_its_package() {
        let dir = tempfile::tempdir().unwrap();
        let e = tools(dir.path(), Duration::from_secs(5)).run(PROBE, ["x"]).unwrap_err();
        assert!(matches!(e, ToolError::Missing { tool: "probe", package: "probe-package" }));
        assert!(e.to_string().contains("install the Debian package probe-package"), "{e}");
    }

    #[test]
    fn the_environment_is_empty_and_stderr_keeps_only_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        // Fails with its environment on stderr after 100 KiB of noise.
        script(
            dir.path(),
            "probe",
            "/usr/bin/head -c 102400 /dev/zero | /usr/bin/tr '\\0' x >&2; echo >&2; /usr/bin/env >&2; exit 3",
        );
        // cargo runs tests with CARGO_* set: none of them may reach it.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let e = tools(dir.path(), Duration::from_secs(30)).run(PROBE, ["x"]).unwrap_err();
        let ToolError::Failed { status, stderr, .. } = e else { panic!("{e:?}") };
        assert!(status.contains('3'), "{status}");
        assert!(stderr.len() <= STDERR_KEEP, "{}", stderr.len());
        assert!(stderr.contains("LC_ALL=C"), "{stderr}");
        assert!(!stderr.contains("CARGO_"), "{stderr}");
    }

    #[test]
    fn a_program_past_its_time_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "probe", "exec sleep 30");
        let e = tools(dir.path(), Duration::from_millis(200)).run(PROBE, ["x"]).unwrap_err();
        assert!(e.to_string().contains("killed after"), "{e}");
    }
}
