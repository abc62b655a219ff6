//! qcow driver (placeholder until the driver lands).

use std::sync::Arc;

use super::{Layer, OpenCtx};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// Opens a qcow image.
pub fn open(file: Arc<HostFile>, _ctx: &OpenCtx<'_>) -> Result<Arc<dyn Layer>> {
    Err(Error::unsupported("qcow is not implemented yet").with_path(file.path()))
}
