//! The raw driver: guest offset X lives at host offset X.

use std::path::Path;
use std::sync::Arc;

use super::{BackingSpec, Below, Format, Layer, LayerInfo, Mapping, OpenCtx, WriteLayer};
use crate::error::Result;
use crate::host::HostFile;

/// A raw image: the file is the disk.
pub struct Raw {
    file: Arc<HostFile>,
    cache_id: u64,
}

impl Raw {
    /// Opens `file` as a raw layer; its size is the virtual size.
    pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Raw> {
        Ok(Raw {
            file,
            cache_id: ctx.caches.new_layer_id(),
        })
    }
}

impl Layer for Raw {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.file.len()
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        Ok((
            Mapping::Data {
                file: self.file.clone(),
                offset,
            },
            max_len,
        ))
    }

    fn backing(&self) -> Option<BackingSpec> {
        None
    }

    fn info(&self) -> LayerInfo {
        LayerInfo::new(Format::Raw, self.file.len())
    }

    fn host_files(&self) -> Vec<Arc<HostFile>> {
        vec![self.file.clone()]
    }

    fn cache_id(&self) -> u64 {
        self.cache_id
    }

    fn passthrough_file(&self) -> Option<Arc<HostFile>> {
        Some(self.file.clone())
    }

    fn as_write(&self) -> Option<&dyn WriteLayer> {
        self.file.writable().then_some(self as &dyn WriteLayer)
    }
}

impl WriteLayer for Raw {
    fn write_at(&self, buf: &[u8], offset: u64, _below: &dyn Below) -> Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _below: &dyn Below) -> Result<()> {
        self.file.punch_hole(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data()
    }
}
