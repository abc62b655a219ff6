//! The raw driver: guest offset X lives at host offset X.
//!
//! A raw image whose format was *probed* (no `--format raw`) is guarded as
//! qemu guards it: a write that would make the image detect as another
//! format on its next open (a qcow2 header in sector 0 naming a host file
//! as its backing file, a VHD footer in the last sector) fails with EPERM.
//! `--format raw` lifts the guard: the user said what the file is.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use super::detect::{detect_parts, HEAD_LEN, TAIL_LEN};
use super::{BackingSpec, Below, Format, Layer, LayerInfo, Mapping, OpenCtx, WriteLayer};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// A raw image: the file is the disk.
pub struct Raw {
    file: Arc<HostFile>,
    cache_id: u64,
    /// The format was probed: writes must not make it detect as another.
    /// Held while a guarded write checks and writes, so two writes to the
    /// head cannot each pass the check and together form a header.
    guard: Option<Mutex<()>>,
}

impl Raw {
    /// Opens `file` as a raw layer; its size is the virtual size.
    pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Raw> {
        Ok(Raw {
            file,
            cache_id: ctx.caches.new_layer_id(),
            guard: None,
        })
    }

    /// Opens `file` as a raw layer whose format was probed, not given:
    /// writes that would change what it detects as are refused.
    pub fn open_probed(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Raw> {
        Ok(Raw {
            guard: Some(Mutex::new(())),
            ..Raw::open(file, ctx)?
        })
    }

    /// The ranges detection reads: the head and the last sector.
    fn probed_ranges(&self) -> [(u64, u64); 2] {
        let len = self.file.len();
        let head_end = len.min(HEAD_LEN as u64);
        let tail_start = len.saturating_sub(TAIL_LEN as u64);
        [(0, head_end), (tail_start, len)]
    }

    /// Whether `len` bytes at `offset` touch what detection reads.
    fn touches_probe(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.probed_ranges()
            .iter()
            .any(|&(s, e)| offset < e && end > s)
    }

    /// Refuses the write of `data` (zeros when `None`) of `len` bytes at
    /// `offset` if the image would then detect as something other than raw.
    fn check_probe(&self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let [head, tail] = self.probed_ranges().map(|(s, e)| {
            let mut buf = vec![0u8; (e - s) as usize];
            let read = self.file.read_zero_fill_at(&mut buf, s);
            let end = offset.saturating_add(len);
            let (from, to) = (offset.max(s), end.min(e));
            if from < to {
                let dst = &mut buf[(from - s) as usize..(to - s) as usize];
                match data {
                    Some(d) => {
                        dst.copy_from_slice(&d[(from - offset) as usize..(to - offset) as usize])
                    }
                    None => dst.fill(0),
                }
            }
            read.map(|()| buf)
        });
        let (head, tail) = (head?, tail?);
        let tail = if tail.len() == TAIL_LEN {
            &tail[..]
        } else {
            &[][..]
        };
        let became = detect_parts(&head, tail);
        if became == Format::Raw {
            return Ok(());
        }
        Err(Error::io(
            format!(
                "refusing a write at {offset:#x} that would make this probed raw image detect as {became} \
                 (mount with --format raw if the disk really holds that)"
            ),
            std::io::Error::from_raw_os_error(libc::EPERM),
        ))
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
        // Kernel passthrough would let writes bypass the probe guard.
        if self.guard.is_some() && self.file.writable() {
            return None;
        }
        Some(self.file.clone())
    }

    fn as_write(&self) -> Option<&dyn WriteLayer> {
        self.file.writable().then_some(self as &dyn WriteLayer)
    }
}

impl WriteLayer for Raw {
    fn write_at(&self, buf: &[u8], offset: u64, _below: &dyn Below) -> Result<()> {
        match &self.guard {
            Some(lock) if self.touches_probe(offset, buf.len() as u64) => {
                let _held = lock.lock();
                self.check_probe(offset, buf.len() as u64, Some(buf))?;
                self.file.write_all_at(buf, offset)
            }
            _ => self.file.write_all_at(buf, offset),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, _below: &dyn Below) -> Result<()> {
        match &self.guard {
            Some(lock) if self.touches_probe(offset, len) => {
                let _held = lock.lock();
                self.check_probe(offset, len, None)?;
                self.file.punch_hole(offset, len)
            }
            _ => self.file.punch_hole(offset, len),
        }
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data()
    }
}
