//! Creating new qcow2 images (overlays for `--overlay` and `--snapshot`).

use crate::error::{Error, Result};
use crate::format::Format;
use crate::host::HostFile;

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Guest size in bytes.
    pub virtual_size: u64,
    /// log2 of the cluster size (9..=21); 16 for 64 KiB.
    pub cluster_bits: u32,
    /// Backing file name to record (as it should be resolved: relative to
    /// the new image's directory, or absolute).
    pub backing_file: Option<String>,
    /// Backing format to record.
    pub backing_format: Option<Format>,
}

/// Writes a new, empty qcow2 (version 3, 16-bit refcounts) into `file`,
/// which must be empty and open for writing.
pub fn create(file: &HostFile, opts: &CreateOptions) -> Result<()> {
    let _ = opts;
    Err(Error::unsupported("creating qcow2 images is not implemented yet").with_path(file.path()))
}
