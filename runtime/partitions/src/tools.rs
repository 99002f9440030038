//! The filesystem tools a build runs, through provd's one runner
//! (`provd_tools`): a fixed search path, an empty environment, a time
//! limit and the tail of stderr.

pub use provd_tools::{DEBUGFS, DEFAULT_TOOL_DIRS, MKE2FS, MKFS_EROFS, QEMU_IMG, Tools};

use provd_tools::ToolError;

use crate::PartitionError;

impl From<ToolError> for PartitionError {
    fn from(e: ToolError) -> Self {
        match e {
            ToolError::Missing { tool, package } => PartitionError::MissingTool { tool, package },
            ToolError::Failed { tool, status, stderr } => {
                PartitionError::ToolFailed { tool, status, stderr }
            }
            ToolError::Io { what, source } => PartitionError::Io { what, source },
        }
    }
}
