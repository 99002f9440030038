//! The filesystem tools a build runs, found on a fixed search path.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::PartitionError;

/// A tool and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

pub(crate) const MKFS_EROFS: Tool = Tool { name: "mkfs.erofs", package: "erofs-utils" };
pub(crate) const MKE2FS: Tool = Tool { name: "mke2fs", package: "e2fsprogs" };
pub(crate) const DEBUGFS: Tool = Tool { name: "debugfs", package: "e2fsprogs" };
pub(crate) const QEMU_IMG: Tool = Tool { name: "qemu-img", package: "qemu-utils" };

/// Where tools are looked for. Fixed rather than taken from `PATH`, so the
/// daemon's environment cannot substitute a tool that receives root's
/// authority over the data directory.
pub const DEFAULT_TOOL_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// Longest stderr kept in an error.
const STDERR_KEEP: usize = 2048;

#[derive(Debug, Clone)]
pub(crate) struct Tools {
    pub dirs: Vec<PathBuf>,
    /// Longest one run may take.
    pub timeout: std::time::Duration,
}

impl Tools {
    pub fn find(&self, tool: Tool) -> Result<PathBuf, PartitionError> {
        self.dirs
            .iter()
            .map(|d| d.join(tool.name))
            .find(|p| p.is_file())
            .ok_or(PartitionError::MissingTool { tool: tool.name, package: tool.package })
    }

    /// Runs `tool` with `args`, stdin closed, stdout discarded, for at most
    /// `self.timeout`; a tool still running then is killed.
    pub fn run<I, S>(&self, tool: Tool, args: I) -> Result<(), PartitionError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        use std::io::Read;
        let path = self.find(tool)?;
        let io = |e| PartitionError::Io { what: format!("running {}", path.display()), source: e };
        let mut child = Command::new(&path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_clear()
            .env("LC_ALL", "C")
            .spawn()
            .map_err(io)?;
        // Keep only the end of stderr, however much the tool writes.
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
        let deadline = std::time::Instant::now() + self.timeout;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(io)? {
                break Some(status);
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        let text = String::from_utf8_lossy(&err);
        let start = text.len().saturating_sub(STDERR_KEEP);
        let tail = text.get(start..).unwrap_or_default().trim().to_string();
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(PartitionError::ToolFailed {
                tool: tool.name,
                status: status.to_string(),
                stderr: tail,
            }),
            None => Err(PartitionError::ToolFailed {
                tool: tool.name,
                status: format!("killed after {} s", self.timeout.as_secs()),
                stderr: tail,
            }),
        }
    }
}
