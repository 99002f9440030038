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
}

impl Tools {
    pub fn find(&self, tool: Tool) -> Result<PathBuf, PartitionError> {
        self.dirs
            .iter()
            .map(|d| d.join(tool.name))
            .find(|p| p.is_file())
            .ok_or(PartitionError::MissingTool { tool: tool.name, package: tool.package })
    }

    /// Runs `tool` with `args`, stdin closed, stdout discarded.
    pub fn run<I, S>(&self, tool: Tool, args: I) -> Result<(), PartitionError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let path = self.find(tool)?;
        let out = Command::new(&path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_clear()
            .env("LC_ALL", "C")
            .output()
            .map_err(|e| PartitionError::Io {
                what: format!("running {}", path.display()),
                source: e,
            })?;
        if out.status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&out.stderr);
        let start = text.len().saturating_sub(STDERR_KEEP);
        let tail = text.get(start..).unwrap_or_default().trim().to_string();
        Err(PartitionError::ToolFailed {
            tool: tool.name,
            status: out.status.to_string(),
            stderr: tail,
        })
    }
}
