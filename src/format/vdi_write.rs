//! In-place writes into VDI images: static, dynamic and differencing.
//!
//! Allocated blocks (every block of a static image) are written in place.
//! A first write into a block that is not allocated takes a new block at
//! the end of the data area ([`crate::engine::append`]; block numbers are
//! consecutive, as VirtualBox and qemu allocate them), fills and writes it
//! whole ([`crate::engine::cow::write_new_run`]: zeros, or the parent's
//! data in a differencing image), and then makes it reachable with two
//! ordered writes: the header's allocated-blocks count in stage Link, the
//! block map entry in stage Map. So after a power cut a map entry never
//! points at unwritten data or past the count; the count may be ahead of
//! the entries (a block slot leaked), which `qemu-img check` reports as an
//! "allocated blocks mismatch" although every block reads right (see
//! docs/writes.md).
//!
//! Zeroing: whole blocks that are not allocated get the "zero" entry in a
//! differencing image (a dynamic or static image already reads zeros
//! there); allocated blocks are zeroed in place and never freed, as qemu
//! never frees them; partial blocks go through writes.

use std::sync::atomic::Ordering;

use super::{Vdi, BLOCK_FREE, BLOCK_ZERO};
use crate::endian::le32_bytes;
use crate::engine::append::{AppendState, Appender};
use crate::engine::cow::NewRun;
use crate::engine::order::Stage;
use crate::engine::overlap::{MetadataMap, Structure};
use crate::engine::units::{GuestOffset, HostOffset};
use crate::error::{Error, Result};
use crate::format::{Below, Layer, WriteLayer};

/// Offset of the header's allocated-blocks count.
const BLOCKS_ALLOCATED_AT: u64 = 0x184;

/// Largest zero buffer written at once.
const ZERO_CHUNK: u64 = 1 << 20;

/// The write state of a writable VDI.
pub struct Writer {
    /// Metadata no data write may touch: the header, the block map.
    map: MetadataMap,
    /// The allocation frontier (a block boundary of the data area) and the
    /// guest blocks being allocated.
    alloc: Appender,
    /// The allocated-blocks count as last written (under the lock).
    allocated: std::sync::atomic::AtomicU32,
}

impl Writer {
    /// The write state for `v`.
    pub fn new(v: &Vdi) -> Result<Writer> {
        let h = &v.header;
        let map = MetadataMap::new(v.file.path());
        map.add(0, super::HEADER_LEN as u64, Structure::Header);
        map.add(h.blocks_offset, u64::from(h.blocks) * 4, Structure::Bat);
        let stride = v.stride();
        // New blocks go after every block in use and past the end of the
        // file, whichever is last.
        let mut next = u64::from(h.blocks_allocated);
        for e in v.map.iter().map(|e| e.load(Ordering::Relaxed)) {
            if e < BLOCK_ZERO {
                next = next.max(u64::from(e) + 1);
            }
        }
        let len = v.file.len();
        if len > h.data_offset {
            next = next.max((len - h.data_offset).div_ceil(stride));
        }
        let base = h.data_offset;
        let frontier = next
            .checked_mul(stride)
            .and_then(|b| b.checked_add(base))
            .ok_or_else(|| Error::corrupt("the VDI file is too large to grow"))?;
        let limit = u64::from(BLOCK_ZERO)
            .checked_mul(stride)
            .and_then(|b| b.checked_add(base))
            .unwrap_or(u64::MAX);
        Ok(Writer {
            map,
            alloc: Appender::new(frontier, limit),
            allocated: h.blocks_allocated.into(),
        })
    }
}

impl Vdi {
    fn writer(&self) -> &Writer {
        self.writer
            .as_ref()
            .expect("write called on a VDI opened read-only")
    }

    /// Bytes per block in the data area (extra bytes, then the data).
    fn stride(&self) -> u64 {
        u64::from(self.header.block_size) + u64::from(self.header.block_extra)
    }

    fn entry(&self, idx: u64) -> u32 {
        self.map[idx as usize].load(Ordering::Acquire)
    }

    /// Writes the start of `buf` at guest `pos`; returns the bytes written
    /// (0: the state changed, try again).
    fn write_some(&self, buf: &[u8], pos: u64, below: &dyn Below, zeros: bool) -> Result<usize> {
        let bs = u64::from(self.header.block_size);
        let idx = pos / bs;
        let in_block = pos % bs;
        let n = (bs - in_block).min(buf.len() as u64);
        let entry = self.entry(idx);
        if entry >= BLOCK_ZERO {
            return self.allocate(buf, pos, below, zeros);
        }
        let w = self.writer();
        let start = self.header.data_offset + u64::from(entry) * self.stride();
        let first_own = w.alloc.first_own().get();
        if start < first_own && start + self.stride() > first_own {
            return Err(Error::corrupt(format!(
                "VDI block {idx} points at data block {entry}, which runs past the end of the file"
            )));
        }
        let host = start + u64::from(self.header.block_extra) + in_block;
        w.map.guard(HostOffset(host), n, GuestOffset(pos))?;
        self.file.write_all_at(&buf[..n as usize], host)?;
        Ok(n as usize)
    }

    /// Reserves one block at the frontier. Under the lock.
    fn reserve(&self, st: &mut AppendState) -> Result<u64> {
        let host = st
            .reserve(self.stride(), 1)
            .ok_or_else(|| Error::corrupt("the VDI file cannot grow any further"))?
            .get();
        self.end.fetch_max(host + self.stride(), Ordering::AcqRel);
        Ok(host)
    }

    /// The allocation path: see the module documentation.
    fn allocate(&self, buf: &[u8], pos: u64, below: &dyn Below, zeros: bool) -> Result<usize> {
        let w = self.writer();
        let bs = u64::from(self.header.block_size);
        let idx = pos / bs;
        let (host, old, _claim) = {
            let mut st = w.alloc.lock();
            if st.is_pending(idx) {
                w.alloc.wait(&mut st);
                return Ok(0);
            }
            let old = self.entry(idx);
            if old < BLOCK_ZERO {
                return Ok(0);
            }
            let host = self.reserve(&mut st)?;
            (host, old, w.alloc.claim(&mut st, idx..idx + 1))
        };
        let vsize = self.virtual_size();
        let from_below = old == BLOCK_FREE && self.parent.is_some();
        let run = NewRun {
            guest: GuestOffset(idx * bs),
            host: HostOffset(host + u64::from(self.header.block_extra)),
            count: 1,
            unit: bs,
        };
        let n = run.write_over(
            &self.file,
            &w.map,
            vsize,
            buf,
            GuestOffset(pos),
            zeros,
            from_below.then_some(below),
        )?;
        let _st = w.alloc.lock();
        let number = ((host - self.header.data_offset) / self.stride()) as u32;
        let count = w.allocated.load(Ordering::Acquire).saturating_add(1);
        self.file
            .write_ordered_at(&le32_bytes(count), BLOCKS_ALLOCATED_AT, Stage::Link)?;
        w.allocated.store(count, Ordering::Release);
        self.file.write_ordered_at(
            &le32_bytes(number),
            self.header.blocks_offset + idx * 4,
            Stage::Map,
        )?;
        self.map[idx as usize].store(number, Ordering::Release);
        Ok(n)
    }

    /// Gives whole block `idx` the zero entry (differencing images).
    fn mark_zero(&self, idx: u64) -> Result<()> {
        let w = self.writer();
        let mut st = w.alloc.lock();
        w.alloc.wait_for(&mut st, idx..idx + 1);
        if self.entry(idx) != BLOCK_FREE {
            return Ok(());
        }
        self.file.write_ordered_at(
            &le32_bytes(BLOCK_ZERO),
            self.header.blocks_offset + idx * 4,
            Stage::Map,
        )?;
        self.map[idx as usize].store(BLOCK_ZERO, Ordering::Release);
        Ok(())
    }

    fn write_inner(&self, buf: &[u8], offset: u64, below: &dyn Below, zeros: bool) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            done += self
                .write_some(&buf[done..], pos, below, zeros)
                .map_err(|e| e.at_guest(pos))?;
        }
        Ok(())
    }

    fn zero_inner(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        let bs = u64::from(self.header.block_size);
        let vsize = self.virtual_size();
        let end = offset + len;
        let zeros = vec![0u8; ZERO_CHUNK.min(bs) as usize];
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let block_end = ((idx + 1) * bs).min(end);
            let entry = self.entry(idx);
            let whole = pos == idx * bs && block_end >= ((idx + 1) * bs).min(vsize);
            if entry == BLOCK_ZERO || (entry == BLOCK_FREE && self.parent.is_none()) {
                pos = block_end;
                continue;
            }
            if entry == BLOCK_FREE && whole {
                self.mark_zero(idx)?;
                pos = block_end;
                continue;
            }
            let n = (block_end - pos).min(zeros.len() as u64) as usize;
            self.write_inner(&zeros[..n], pos, below, true)?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl WriteLayer for Vdi {
    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        self.writer().map.refuse_if_tripped()?;
        self.write_inner(buf, offset, below, false)
            .map_err(|e| e.with_path(self.file.path()))?;
        self.file.flush_ordered_if_due()
    }

    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        self.writer().map.refuse_if_tripped()?;
        self.zero_inner(offset, len, below)
            .map_err(|e| e.at_guest(offset).with_path(self.file.path()))?;
        self.file.flush_ordered_if_due()
    }

    fn flush(&self) -> Result<()> {
        self.file.flush_ordered()
    }

    fn metadata_maps(&self) -> Vec<&MetadataMap> {
        vec![&self.writer().map]
    }
}
