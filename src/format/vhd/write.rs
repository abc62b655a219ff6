//! In-place writes into VHD images: fixed, dynamic and differencing disks.
//!
//! - Fixed: guest data lies flat from offset 0 and is written in place;
//!   the footer at the end is metadata in the overlap map, so no data
//!   write can reach it.
//! - Dynamic: a new block (sector bitmap, then the data) is taken at the
//!   allocation frontier ([`crate::engine::append`]), which is where the
//!   footer at the end of the file lies: the footer is rewritten right
//!   after the new block (under the allocation lock, so the footer write
//!   of one allocation is always issued before the next allocation
//!   overwrites it), then the block data is written by
//!   [`crate::engine::cow::write_new_run`] with its bitmap all ones (as
//!   qemu does: the whole block is this file's), and only then is the BAT
//!   entry written, as an ordered write in stage Map, after a barrier. A
//!   power cut never leaves a BAT entry pointing at unwritten data. The
//!   footer at the end may be missing after a cut (the new block's data can
//!   reach the disk before the rewritten footer): a dynamic disk is opened
//!   by its footer *copy at offset 0*, which is never written, by qemu's
//!   `vpc` driver as by ours, so the image still opens; the footer at the
//!   end is back after the next flush, or at the next writable open.
//! - Differencing: the parent stays read-only. The copy-on-write unit is
//!   the block: a new block is filled from the layers below where the
//!   write does not cover it and gets a bitmap of all ones; the first
//!   write into an allocated block whose bitmap still has clear bits
//!   copies the parent's sectors for every clear bit into the block, then
//!   sets the whole bitmap (ordered, stage Map), under the block's pending
//!   claim. Sector granularity would save space but would need a bitmap
//!   update for nearly every write.
//!
//! Zeroing does what qemu does: blocks are never freed; allocated blocks
//! (and any block of a differencing disk) get zeros written, unallocated
//! blocks of a dynamic disk already read as zeros and are left alone.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::footer::{DiskType, FOOTER_COOKIE, FOOTER_LEN};
use super::{Dynamic, Vhd, UNALLOCATED};
use crate::endian::be32_bytes;
use crate::engine::append::{round_up, AppendState, Appender};
use crate::engine::cow::{fill_from_below, NewRun};
use crate::engine::order::Stage;
use crate::engine::overlap::{MetadataMap, Structure};
use crate::engine::units::{GuestOffset, HostOffset};
use crate::error::{Error, Result};
use crate::format::{Below, Layer, WriteLayer};

/// Largest host offset a 32-bit BAT sector number can address (the
/// all-ones entry means "not allocated").
const MAX_HOST: u64 = (u32::MAX as u64 - 1) * 512;

/// Largest zero buffer written at once.
const ZERO_CHUNK: u64 = 1 << 20;

/// The write state of a writable VHD.
pub struct Writer {
    /// Metadata no data write may touch: footers, dynamic header, BAT,
    /// parent locators, sector bitmaps.
    map: MetadataMap,
    /// Dynamic and differencing disks: the allocation frontier (where the
    /// footer at the end lies) and the blocks being allocated or promoted.
    alloc: Option<Appender>,
    /// The footer, as written at the end after each allocation.
    footer: [u8; FOOTER_LEN],
}

impl Writer {
    /// The write state for `v`; refuses what cannot be written in place.
    pub fn new(v: &Vhd) -> Result<Writer> {
        let file = &v.file;
        let len = file.len();
        let map = MetadataMap::new(file.path());
        let mut footer = [0u8; FOOTER_LEN];
        let Some(d) = &v.dynamic else {
            if v.footer_at_head {
                return Err(Error::unsupported(
                    "a fixed VHD with a footer copy at offset 0 cannot be written in place; \
                     use --overlay FILE or --snapshot",
                ));
            }
            map.add(
                len - FOOTER_LEN as u64,
                FOOTER_LEN as u64,
                Structure::Footer,
            );
            return Ok(Writer {
                map,
                alloc: None,
                footer,
            });
        };
        file.read_exact_at(&mut footer, 0)?;
        map.add(0, FOOTER_LEN as u64, Structure::Footer);
        map.add(
            v.footer.data_offset,
            super::footer::DYN_HEADER_LEN as u64,
            Structure::Header,
        );
        let h = &d.header;
        let bat_bytes = round_up(u64::from(h.max_table_entries) * 4, 512).unwrap_or(u64::MAX);
        map.add(h.table_offset, bat_bytes, Structure::Bat);
        let mut end = round_up(h.table_offset.saturating_add(bat_bytes), 512).unwrap_or(u64::MAX);
        for l in &h.locators {
            map.add(l.data_offset, u64::from(l.data_len), Structure::Header);
            end = end.max(l.data_offset.saturating_add(u64::from(l.data_len)));
        }
        let block_bytes = d.bitmap_len + d.block_size;
        for e in d.bat.iter().map(|e| e.load(Ordering::Relaxed)) {
            if e != UNALLOCATED {
                let start = u64::from(e) * 512;
                map.add(start, d.bitmap_len, Structure::SectorBitmap);
                end = end.max(start + block_bytes);
            }
        }
        // The footer at the end is overwritten by the first new block; a
        // file without one there grows past its (sector-rounded) end.
        let mut tail = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut tail, len - FOOTER_LEN as u64)?;
        let frontier = if &tail[..8] == FOOTER_COOKIE {
            len - FOOTER_LEN as u64
        } else {
            round_up(len, 512).unwrap_or(u64::MAX)
        };
        let frontier = round_up(frontier.max(end), 512)
            .ok_or_else(|| Error::corrupt("the VHD file is too large to grow"))?;
        map.add(frontier, FOOTER_LEN as u64, Structure::Footer);
        if &tail[..8] != FOOTER_COOKIE {
            // A power cut after an allocation can leave the file without
            // the footer at its end (see the module documentation): a
            // writable open puts it back, past everything in use.
            file.write_all_at(&footer, frontier)?;
            v.end
                .fetch_max(frontier + FOOTER_LEN as u64, Ordering::AcqRel);
        }
        Ok(Writer {
            map,
            alloc: Some(Appender::new(frontier, MAX_HOST)),
            footer,
        })
    }
}

/// What one allocation reserved.
struct NewBlock {
    idx: usize,
    /// Host offset of the block's bitmap.
    host: u64,
}

impl Vhd {
    fn writer(&self) -> &Writer {
        self.writer
            .as_ref()
            .expect("write called on a VHD opened read-only")
    }

    fn differencing(&self) -> bool {
        self.footer.disk_type == DiskType::Differencing
    }

    /// Writes the start of `buf` at guest `pos` into a dynamic disk;
    /// returns the bytes written (0: the state changed, try again).
    fn write_some(
        &self,
        d: &Dynamic,
        buf: &[u8],
        pos: u64,
        below: &dyn Below,
        zeros: bool,
    ) -> Result<usize> {
        let w = self.writer();
        let idx = (pos / d.block_size) as usize;
        let in_block = pos % d.block_size;
        let n = (d.block_size - in_block).min(buf.len() as u64);
        let entry = Self::entry(d, idx);
        if entry == UNALLOCATED {
            return self.allocate(d, buf, pos, below, zeros);
        }
        let start = self.block_start(d, idx, entry)?;
        let alloc = w.alloc.as_ref().expect("dynamic disks have an allocator");
        let first_own = alloc.first_own().get();
        if start < first_own && start + d.bitmap_len + d.block_size > first_own {
            return Err(Error::corrupt(format!(
                "BAT entry {idx} points at a block (host offset {start:#x}) that runs past \
                 the end of the file"
            )));
        }
        if self.differencing() {
            let bitmap = self.bitmap(d, idx, start)?;
            let (first, last) = (in_block / 512, (in_block + n).div_ceil(512));
            let set = (first..last).all(|s| bitmap[(s / 8) as usize] & (0x80 >> (s % 8)) != 0);
            if !set {
                return self.promote(d, idx, start, below);
            }
        }
        let host = start + d.bitmap_len + in_block;
        w.map.guard(HostOffset(host), n, GuestOffset(pos))?;
        self.file.write_all_at(&buf[..n as usize], host)?;
        Ok(n as usize)
    }

    /// Reserves a new block at the frontier and rewrites the footer after
    /// it. Under the lock.
    fn reserve(&self, d: &Dynamic, st: &mut AppendState) -> Result<u64> {
        let w = self.writer();
        let old = self.end.load(Ordering::Acquire);
        let host = st
            .reserve(d.bitmap_len + d.block_size, 512)
            .ok_or_else(|| Error::corrupt("the VHD file cannot grow any further"))?
            .get();
        let footer_at = host + d.bitmap_len + d.block_size;
        w.map.remove(host, Structure::Footer);
        w.map.add(footer_at, FOOTER_LEN as u64, Structure::Footer);
        self.file.write_all_at(&w.footer, footer_at)?;
        self.end
            .store(old.max(footer_at + FOOTER_LEN as u64), Ordering::Release);
        Ok(host)
    }

    /// The allocation path: see the module documentation.
    fn allocate(
        &self,
        d: &Dynamic,
        buf: &[u8],
        pos: u64,
        below: &dyn Below,
        zeros: bool,
    ) -> Result<usize> {
        let w = self.writer();
        let alloc = w.alloc.as_ref().expect("dynamic disks have an allocator");
        let idx = (pos / d.block_size) as usize;
        let (nb, _claim) = {
            let mut st = alloc.lock();
            if st.is_pending(idx as u64) {
                alloc.wait(&mut st);
                return Ok(0);
            }
            if Self::entry(d, idx) != UNALLOCATED {
                return Ok(0);
            }
            let host = self.reserve(d, &mut st)?;
            w.map.add(host, d.bitmap_len, Structure::SectorBitmap);
            let claim = alloc.claim(&mut st, idx as u64..idx as u64 + 1);
            (NewBlock { idx, host }, claim)
        };
        let vsize = self.virtual_size();
        let run = NewRun {
            guest: GuestOffset(idx as u64 * d.block_size),
            host: HostOffset(nb.host + d.bitmap_len),
            count: 1,
            unit: d.block_size,
        };
        let n = run.write_over(
            &self.file,
            &w.map,
            vsize,
            buf,
            GuestOffset(pos),
            zeros,
            self.differencing().then_some(below),
        )?;
        let ones: Arc<[u8]> = vec![0xffu8; d.bitmap_len as usize].into();
        self.file.write_all_at(&ones, nb.host)?;
        let _st = alloc.lock();
        let sector = (nb.host / 512) as u32;
        self.file.write_ordered_at(
            &be32_bytes(sector),
            d.header.table_offset + nb.idx as u64 * 4,
            Stage::Map,
        )?;
        self.caches
            .meta
            .insert((self.cache_id, nb.idx as u64), ones);
        d.bat[nb.idx].store(sector, Ordering::Release);
        Ok(n)
    }

    /// Copies the parent's sectors into every sector of allocated block
    /// `idx` (at host `start`) whose bitmap bit is clear, then sets the
    /// whole bitmap. Returns 0: the caller writes again.
    fn promote(&self, d: &Dynamic, idx: usize, start: u64, below: &dyn Below) -> Result<usize> {
        let w = self.writer();
        let alloc = w.alloc.as_ref().expect("dynamic disks have an allocator");
        let _claim = {
            let mut st = alloc.lock();
            if st.is_pending(idx as u64) {
                alloc.wait(&mut st);
                return Ok(0);
            }
            alloc.claim(&mut st, idx as u64..idx as u64 + 1)
        };
        // Promotions hold the claim: nobody else changes this bitmap now.
        self.caches.meta.remove((self.cache_id, idx as u64));
        let bitmap = self.bitmap(d, idx, start)?;
        let vsize = self.virtual_size();
        let guest0 = idx as u64 * d.block_size;
        let sectors = d.block_size / 512;
        let bit = |s: u64| bitmap[(s / 8) as usize] & (0x80 >> (s % 8)) != 0;
        let mut s = 0;
        while s < sectors {
            if bit(s) {
                s += 1;
                continue;
            }
            let mut e = s + 1;
            while e < sectors && !bit(e) && (e - s) * 512 < ZERO_CHUNK {
                e += 1;
            }
            let guest = guest0 + s * 512;
            if guest < vsize {
                let mut data = vec![0u8; ((e - s) * 512) as usize];
                fill_from_below(below, GuestOffset(guest), &mut data, vsize)?;
                let host = start + d.bitmap_len + s * 512;
                w.map
                    .guard(HostOffset(host), data.len() as u64, GuestOffset(guest))?;
                self.file.write_all_at(&data, host)?;
            }
            s = e;
        }
        let ones: Arc<[u8]> = vec![0xffu8; d.bitmap_len as usize].into();
        let _st = alloc.lock();
        self.file.write_ordered_at(&ones, start, Stage::Map)?;
        self.caches.meta.insert((self.cache_id, idx as u64), ones);
        Ok(0)
    }

    fn write_dynamic(
        &self,
        d: &Dynamic,
        buf: &[u8],
        offset: u64,
        below: &dyn Below,
        zeros: bool,
    ) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            done += self
                .write_some(d, &buf[done..], pos, below, zeros)
                .map_err(|e| e.at_guest(pos))?;
        }
        Ok(())
    }

    fn write_fixed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writer()
            .map
            .guard(HostOffset(offset), buf.len() as u64, GuestOffset(offset))?;
        self.file.write_all_at(buf, offset)
    }

    fn zero_dynamic(&self, d: &Dynamic, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        let end = offset + len;
        let zeros = vec![0u8; ZERO_CHUNK.min(d.block_size) as usize];
        let mut pos = offset;
        while pos < end {
            let idx = (pos / d.block_size) as usize;
            let block_end = ((idx as u64 + 1) * d.block_size).min(end);
            if !self.differencing() && Self::entry(d, idx) == UNALLOCATED {
                pos = block_end;
                continue;
            }
            let n = (block_end - pos).min(zeros.len() as u64) as usize;
            self.write_dynamic(d, &zeros[..n], pos, below, true)?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl WriteLayer for Vhd {
    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        self.writer().map.refuse_if_tripped()?;
        match &self.dynamic {
            None => self.write_fixed(buf, offset),
            Some(d) => self.write_dynamic(d, buf, offset, below, false),
        }
        .map_err(|e| e.with_path(self.file.path()))?;
        self.file.flush_ordered_if_due()
    }

    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        self.writer().map.refuse_if_tripped()?;
        match &self.dynamic {
            None => {
                let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
                let mut pos = offset;
                while pos < offset + len {
                    let n = (offset + len - pos).min(zeros.len() as u64) as usize;
                    self.write_fixed(&zeros[..n], pos)?;
                    pos += n as u64;
                }
                Ok(())
            }
            Some(d) => self.zero_dynamic(d, offset, len, below),
        }
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
