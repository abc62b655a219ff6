//! VMDK driver (placeholder until the driver lands).

use std::sync::Arc;

use super::{Layer, OpenCtx};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// True when `head` (an image's first bytes) looks like a VMDK: a sparse
/// extent header or a text descriptor.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile")
}

/// Opens a VMDK image (descriptor or sparse extent).
pub fn open(file: Arc<HostFile>, _ctx: &OpenCtx<'_>) -> Result<Arc<dyn Layer>> {
    Err(Error::unsupported("vmdk is not implemented yet").with_path(file.path()))
}
