//! In-place writes into dynamic and fixed VHDX images.
//!
//! Opening writable first replays a non-empty log in place (see
//! [`super::journal`]). The first write then writes a new header (new
//! FileWriteGuid and DataWriteGuid, as MS-VHDX requires before the file and
//! its data change) before any byte of data.
//!
//! Writes into fully present blocks go straight to the host file. A write
//! into any other block (not present, zero, unmapped, undefined: all read
//! as zeros in a disk without parent) allocates a whole payload block at
//! the end of the file, 1 MiB aligned, through the shared append allocator
//! ([`crate::engine::append`], the block is the unit marked pending);
//! [`crate::engine::cow::write_new_run`] writes the MiBs of the block the
//! write touches, zero-filled around it, and the block's last sector makes
//! the file cover the whole block (the rest of it is a hole: zeros). A
//! block in the zero state that keeps a file offset (qemu's fixed disks
//! are made of those) is written at its place instead, zero-filled whole,
//! as qemu does. Then
//! the BAT entry becomes FULLY_PRESENT in memory and its 4 KiB BAT page is
//! marked dirty; dirty pages reach the file only through the log, in
//! batches ([`super::journal::Headers::commit`]): on every flush, and when
//! a batch fills.
//!
//! Zeroing does what qemu's VHDX driver does, minus the allocation: qemu
//! has no zeroing operation for VHDX and writes zeros; we write zeros into
//! fully present blocks and leave the others alone, since they already read
//! as zeros.
//!
//! Differencing disks are refused (`--overlay FILE` or `--snapshot`): a
//! partial write there needs sector bitmap blocks, not written yet.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::bat::{State, PAGE};
use super::header::{Header, Regions, MIB};
use super::journal::{max_pages, new_guid, Headers};
use super::Vhdx;
use crate::engine::append::{round_up, Appender};
use crate::engine::cow::{write_new_run, NewRun};
use crate::engine::overlap::{MetadataMap, Structure};
use crate::engine::units::{GuestOffset, HostOffset};
use crate::error::{Error, Result};
use crate::format::{Below, Layer, WriteLayer};

/// Dirty BAT pages that make a batch commit before a flush asks for it.
const BATCH_PAGES: u64 = 64;

/// The write state of a writable VHDX.
pub struct Writer {
    /// The allocation frontier and the blocks being allocated.
    alloc: Appender,
    /// Metadata ranges no data write may touch.
    map: MetadataMap,
    /// The header pair and the log.
    headers: Headers,
    /// Set once the first write updated the header.
    started: AtomicBool,
    start_lock: Mutex<()>,
    /// Blocks this writer allocated past the old end of the file: the only
    /// ones there a write may go to (a damaged entry pointing past the
    /// old end could otherwise name another block's new space).
    owned: Mutex<HashSet<u64>>,
    /// BAT pages changed in memory and not yet committed (page indexes).
    dirty: Mutex<BTreeSet<u64>>,
    /// Serialises commits, so that pages reach the file in order.
    commit: Mutex<()>,
    /// File offset of the BAT.
    bat_offset: u64,
    /// Pages per log entry.
    batch: u64,
}

impl Writer {
    /// The write state of an image whose log is empty.
    pub fn new(v: &Vhdx, headers: Headers, header: &Header, regions: &Regions) -> Result<Writer> {
        let file = &v.src.file;
        if !file.is_regular_file()? {
            return Err(Error::unsupported(
                "VHDX images on devices cannot be written in place (new blocks are appended \
                 at the end of the file); use --overlay FILE or --snapshot",
            ));
        }
        // The log is written at every commit: it must lie in the file,
        // aligned, clear of the headers and of both regions.
        let log_len = u64::from(header.log_length);
        let log_end = header
            .log_offset
            .checked_add(log_len)
            .filter(|&e| e <= file.len())
            .unwrap_or(0);
        let clear = [&regions.bat, &regions.metadata]
            .iter()
            .all(|r| log_end <= r.offset || r.offset + r.length <= header.log_offset);
        if log_end == 0 || header.log_offset < MIB || header.log_offset % MIB != 0 || !clear {
            return Err(Error::corrupt(format!(
                "VHDX log at {:#x} of {log_len} bytes cannot be written (outside the file, \
                 misaligned or overlapping a region)",
                header.log_offset
            )));
        }
        let map = MetadataMap::new(file.path());
        map.add(0, MIB, Structure::Header);
        map.add(
            header.log_offset,
            u64::from(header.log_length),
            Structure::VhdxLog,
        );
        map.add(regions.bat.offset, regions.bat.length, Structure::VhdxBat);
        map.add(
            regions.metadata.offset,
            regions.metadata.length,
            Structure::VhdxMetadata,
        );
        let mut end = file.len().max(log_end);
        for r in [&regions.bat, &regions.metadata] {
            end = end.max(r.offset + r.length);
        }
        // Blocks the BAT places past the end are damaged (their reads
        // fail); they do not push the frontier.
        for host in v.bat.stored().into_iter().filter(|&h| h < file.len()) {
            end = end.max(host.saturating_add(v.bat.block_size));
        }
        let frontier = round_up(end, MIB)
            .ok_or_else(|| Error::corrupt("the image file is too large to grow"))?;
        let batch = max_pages(u64::from(header.log_length)).min(BATCH_PAGES);
        if batch == 0 {
            return Err(Error::corrupt(format!(
                "VHDX log of {} bytes is too small to write through",
                header.log_length
            )));
        }
        Ok(Writer {
            alloc: Appender::new(frontier, i64::MAX as u64),
            map,
            headers,
            started: AtomicBool::new(false),
            start_lock: Mutex::new(()),
            owned: Mutex::new(HashSet::new()),
            dirty: Mutex::new(BTreeSet::new()),
            commit: Mutex::new(()),
            bat_offset: regions.bat.offset,
            batch,
        })
    }
}

impl Vhdx {
    fn writer(&self) -> Result<&Writer> {
        self.writer
            .as_ref()
            .ok_or_else(|| Error::unsupported("VHDX layer opened read-only"))
    }

    /// Before the first write: a header with new write GUIDs.
    fn start(&self) -> Result<()> {
        let w = self.writer()?;
        if w.started.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = w.start_lock.lock();
        if w.started.load(Ordering::Acquire) {
            return Ok(());
        }
        let (fw, dw) = (new_guid(), new_guid());
        let h = w.headers.update(&self.src.file, |h| {
            h[16..32].copy_from_slice(&fw.0);
            h[32..48].copy_from_slice(&dw.0);
        })?;
        *self.header.write() = h;
        w.started.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes the start of `buf` at guest `pos` (inside one block); returns
    /// the bytes written (0: the block's state changed, try again).
    fn write_some(&self, buf: &[u8], pos: u64) -> Result<usize> {
        let w = self.writer()?;
        let bs = self.bat.block_size;
        let block = pos / bs;
        let in_block = pos % bs;
        let n = buf.len().min((bs - in_block) as usize);
        match self.bat.payload(block, self.end())? {
            State::Full(host) => {
                if host >= w.alloc.first_own().get() && !w.owned.lock().contains(&block) {
                    return Err(Error::corrupt(format!(
                        "VHDX BAT entry of block {block} points at {host:#x}, past the end of the file"
                    )));
                }
                w.map
                    .guard(HostOffset(host + in_block), n as u64, GuestOffset(pos))?;
                self.src.file.write_all_at(&buf[..n], host + in_block)?;
                Ok(n)
            }
            State::Partial(_) => Err(Error::unsupported(
                "VHDX partially present blocks cannot be written in place",
            )),
            _ => self.allocate_and_write(&buf[..n], pos),
        }
    }

    /// Allocates the block holding `pos`, writes `buf` (inside it) there
    /// and publishes the BAT entry (see the module documentation).
    fn allocate_and_write(&self, buf: &[u8], pos: u64) -> Result<usize> {
        let w = self.writer()?;
        let bs = self.bat.block_size;
        let block = pos / bs;
        let host = {
            let mut st = w.alloc.lock();
            if st.is_pending(block) {
                w.alloc.wait(&mut st);
                return Ok(0);
            }
            if matches!(self.bat.payload(block, self.end())?, State::Full(_)) {
                return Ok(0);
            }
            // A zero block that keeps its place (fixed disks) is written
            // there, as qemu does; anything else is appended.
            let keep = self.bat.zero_block_offset(block).filter(|&h| {
                h.checked_add(bs)
                    .is_some_and(|e| e <= w.alloc.first_own().get())
                    && w.map.guard(HostOffset(h), bs, GuestOffset(pos)).is_ok()
            });
            let host = match keep {
                Some(h) => h,
                None => st
                    .reserve(bs, MIB)
                    .ok_or_else(|| Error::corrupt("the image file cannot grow any further"))?
                    .get(),
            };
            self.end
                .fetch_max(host + bs, std::sync::atomic::Ordering::AcqRel);
            (
                host,
                keep.is_some(),
                w.alloc.claim(&mut st, block..block + 1),
            )
        };
        let (host, kept, claim) = (host.0, host.1, host.2);
        // The MiBs of the block the write touches, zero-filled around it;
        // the last sector of the block makes the file cover all of it.
        let block_start = block * bs;
        let first = (pos - block_start) / MIB * MIB;
        let last = (pos - block_start + buf.len() as u64).div_ceil(MIB) * MIB;
        let run = NewRun {
            guest: GuestOffset(block_start + first),
            host: HostOffset(host + first),
            count: (last - first) / MIB,
            unit: MIB,
        };
        w.map.guard(HostOffset(host), bs, GuestOffset(pos))?;
        if kept {
            // Its old bytes are undefined: zeros everywhere the run does
            // not write.
            let zeros = vec![0u8; MIB as usize];
            for at in (0..first).chain(last..bs).step_by(MIB as usize) {
                self.src.file.write_all_at(&zeros, host + at)?;
            }
        } else if last < bs {
            self.src.file.write_all_at(&[0u8; 512], host + bs - 512)?;
        }
        let n = write_new_run(
            &self.src.file,
            &w.map,
            run,
            self.virtual_size(),
            buf,
            GuestOffset(pos),
            false,
            &mut |_, _, _| Ok(()),
        )?;
        {
            let _st = w.alloc.lock();
            let page = self.bat.set_full(block, host)?;
            if !kept {
                w.owned.lock().insert(block);
            }
            w.dirty.lock().insert(page);
        }
        drop(claim);
        if w.dirty.lock().len() as u64 >= w.batch {
            self.commit()?;
        }
        Ok(n)
    }

    /// Writes every dirty BAT page through the log, in batches.
    fn commit(&self) -> Result<()> {
        let w = self.writer()?;
        let _c = w.commit.lock();
        loop {
            let pages: Vec<(u64, Vec<u8>)> = {
                let _st = w.alloc.lock();
                let mut dirty = w.dirty.lock();
                let take: Vec<u64> = dirty.iter().take(w.batch as usize).copied().collect();
                for p in &take {
                    dirty.remove(p);
                }
                take.into_iter()
                    .map(|p| (w.bat_offset + p * PAGE, self.bat.page(p)))
                    .collect()
            };
            if pages.is_empty() {
                return Ok(());
            }
            let done = w.headers.commit(&self.src.file, &pages);
            match done {
                Ok(()) => *self.header.write() = w.headers.current()?,
                Err(e) => {
                    // Keep the pages for the next try.
                    let mut dirty = w.dirty.lock();
                    for (off, _) in &pages {
                        dirty.insert((off - w.bat_offset) / PAGE);
                    }
                    return Err(e);
                }
            }
        }
    }

    fn write_zeroes_inner(&self, offset: u64, len: u64) -> Result<()> {
        let bs = self.bat.block_size;
        let zeros = vec![0u8; MIB as usize];
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block_end = (pos / bs + 1) * bs;
            let piece_end = end.min(block_end);
            if let State::Full(_) = self.bat.payload(pos / bs, self.end())? {
                let n = (piece_end - pos).min(MIB) as usize;
                let done = self.write_some(&zeros[..n], pos)?;
                pos += done as u64;
                continue;
            }
            // Not stored: already reads as zeros.
            pos = piece_end;
        }
        Ok(())
    }
}

impl WriteLayer for Vhdx {
    fn write_at(&self, buf: &[u8], offset: u64, _below: &dyn Below) -> Result<()> {
        let w = self.writer()?;
        w.map.refuse_if_tripped()?;
        self.start().map_err(|e| e.with_path(self.path()))?;
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            done += self
                .write_some(&buf[done..], pos)
                .map_err(|e| e.at_guest(pos).with_path(self.path()))?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _below: &dyn Below) -> Result<()> {
        let w = self.writer()?;
        w.map.refuse_if_tripped()?;
        self.start().map_err(|e| e.with_path(self.path()))?;
        self.write_zeroes_inner(offset, len)
            .map_err(|e| e.at_guest(offset).with_path(self.path()))
    }

    fn flush(&self) -> Result<()> {
        self.commit().map_err(|e| e.with_path(self.path()))?;
        self.src.file.sync_data()
    }

    fn metadata_maps(&self) -> Vec<&MetadataMap> {
        self.writer
            .as_ref()
            .map(|w| vec![&w.map])
            .unwrap_or_default()
    }
}

impl Drop for Vhdx {
    /// Closing commits the dirty BAT pages, as a flush does.
    fn drop(&mut self) {
        if self.writer.is_some() {
            if let Err(e) = WriteLayer::flush(self) {
                log::error!("{}: final flush failed: {e}", self.path().display());
            }
        }
    }
}
