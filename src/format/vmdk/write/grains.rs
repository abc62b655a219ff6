//! Writes into hosted sparse (`KDMV`, uncompressed) extents, as qemu's
//! driver does them: VMDK has no refcounts, so new grains and grain tables
//! are appended at the end of the extent file (grains aligned to the grain
//! size) and space is never reused; a crash or a failed write leaves at most
//! leaked space. Grain data and new (zeroed) grain tables are written at
//! once; grain-table and grain-directory entries (redundant copy, then
//! primary) are ordered writes ([`crate::engine::order`], stage Map),
//! written after a barrier: on disk, even after a power cut, an entry never
//! exists without the grain or table it points at.
//!
//! Writes into allocated grains go straight to the host file, without a lock.
//! Everything else takes the extent's allocation lock: it reserves host space
//! for a run of grains and marks them *pending*, then, without the lock, fills
//! them (zeros for a zeroed grain, the layers below where the write does not
//! cover a grain) and writes them; then, under the lock again, writes the table
//! entries and republishes the table in the metadata cache (see
//! [`GrainTables::load_gt`] for why readers never re-cache a stale table). Any
//! other allocation or zeroing touching a pending grain waits for it, so two
//! first writes into one grain both land.
//!
//! Zeroing: with the zeroed-grain flag (`zeroed_grain=on`), whole grains get
//! entry 1 (reads as zeros; the old grain's space is leaked, as qemu does);
//! without it, allocated grains are punched in place and unallocated grains
//! over a parent get new grains of zeros. Unallocated grains without a parent
//! already read as zeros. Partial grains go through writes.

use std::sync::atomic::{AtomicBool, Ordering};

use super::{refuse, REFUSE_HINT};
use crate::endian::{le32_bytes, put_le32};
use crate::engine::append::{round_up, AppendState, Appender};
use crate::engine::cow::{fill_from_below, write_new_run, NewRun};
use crate::engine::order::Stage;
use crate::engine::overlap::{MetadataMap, Structure};
use crate::engine::units::{GuestOffset, HostOffset};
use crate::error::{Error, ErrorKind, Result};
use crate::format::vmdk::extent::{
    Extent, Grain, GrainTables, GteCodec, SparseInfo, GD_BAD, GD_NONE, GD_ZERO,
};
use crate::format::vmdk::Vmdk;
use crate::format::Below;

/// Largest run of grains allocated (and written) at once.
const MAX_RUN_BYTES: u64 = 1 << 20;

/// Largest host byte offset a 32-bit sector number can point at.
const MAX_SECTOR_BYTES: u64 = (u32::MAX as u64) * 512;

/// The write state of one sparse extent.
pub(super) struct SparseWriter {
    /// The allocation frontier and the grains being allocated
    /// (extent-relative grain numbers).
    alloc: Appender,
    /// Byte offsets of the primary and redundant (0: none) directories.
    gd_at: u64,
    rgd_at: u64,
    zeroed_grain: bool,
    pub(super) dirty: AtomicBool,
    /// Metadata ranges of the extent file no grain write may touch: the
    /// header, the embedded descriptor, both directories, every table.
    pub(super) map: MetadataMap,
}

/// What one allocation run reserved.
struct Run {
    gt: u64,
    gdi: u64,
    /// Index of the first entry in its table.
    idx: u64,
    /// Extent-relative offset of the first grain.
    rel: u64,
    old: Vec<Grain>,
    host: u64,
}

impl SparseWriter {
    pub(super) fn new(t: &GrainTables, info: &SparseInfo) -> Result<SparseWriter> {
        let file = &t.file;
        if !file.is_regular_file()? {
            return Err(refuse(
                "sparse VMDK extents on devices (new grains are appended at the end of the file)",
            ));
        }
        let zeroed_grain = matches!(
            t.codec,
            GteCodec::Kdmv {
                zeroed_grain: true,
                ..
            }
        );
        let (gd_at, rgd_at) = info.gd_at;
        let rgd_at = if t.rgd.is_some() { rgd_at } else { 0 };
        // New space starts past the end of the file and past any table the
        // end of the file cuts short, rounded up to a grain.
        let gt_bytes = t.gt_bytes();
        let mut end = file.len();
        let dirs = t.gd.iter().chain(t.rgd.iter().flatten());
        for e in dirs {
            let o = e.load(Ordering::Relaxed);
            if !matches!(o, GD_NONE | GD_ZERO | GD_BAD) && o < file.len() {
                end = end.max(o.saturating_add(gt_bytes));
            }
        }
        let frontier = round_up(end, t.grain_size)
            .ok_or_else(|| Error::corrupt("the extent file is too large to grow"))?;
        let map = MetadataMap::new(file.path());
        map.add(0, 512, Structure::Header);
        let (d_at, d_len) = info.descriptor_at;
        map.add(d_at, d_len, Structure::Descriptor);
        let gd_bytes = t.gd.len() as u64 * 4;
        map.add(gd_at, gd_bytes, Structure::GrainDirectory);
        if rgd_at != 0 {
            map.add(rgd_at, gd_bytes, Structure::RedundantGrainDirectory);
        }
        for e in t.gd.iter().chain(t.rgd.iter().flatten()) {
            let o = e.load(Ordering::Relaxed);
            if !matches!(o, GD_NONE | GD_ZERO | GD_BAD) {
                map.add(o, gt_bytes, Structure::GrainTable);
            }
        }
        Ok(SparseWriter {
            map,
            alloc: Appender::new(frontier, MAX_SECTOR_BYTES),
            gd_at,
            rgd_at,
            zeroed_grain,
            dirty: AtomicBool::new(false),
        })
    }

    /// Checks that an existing grain may be written in place: it must not
    /// straddle the start of the space this writer allocates from.
    fn check_data(&self, host: u64, gs: u64, t: &GrainTables) -> Result<()> {
        // As on reads: a grain past the end of the file is corrupt (writing
        // there would grow the file to wherever the entry says).
        let end = t.end.load(Ordering::Acquire);
        if host >= end {
            return Err(Error::corrupt(format!(
                "grain table entry points at host offset {host:#x}, past the end of the file \
                 ({end} bytes)"
            )));
        }
        let first_own = self.alloc.first_own().get();
        if host < first_own && host + gs > first_own {
            return Err(Error::corrupt(format!(
                "grain table entry points at host offset {host:#x}, a grain overlapping the end \
                 of the file"
            )));
        }
        Ok(())
    }

    /// Reserves `len` bytes at the frontier, aligned to `align`.
    fn reserve(&self, t: &GrainTables, st: &mut AppendState, len: u64, align: u64) -> Result<u64> {
        let host = st
            .reserve(len, align)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unsupported,
                    "the extent file cannot grow any further (2 TiB limit of sparse extents)",
                )
            })?
            .get();
        t.end.fetch_max(host + len, Ordering::AcqRel);
        Ok(host)
    }

    /// The grain table for directory index `gdi`, allocating one (written
    /// filled, redundant copy first, then the directory entries) when the
    /// directory has none. Under the lock.
    fn ensure_gt(&self, v: &Vmdk, t: &GrainTables, st: &mut AppendState, gdi: u64) -> Result<u64> {
        let cur = t.gd_entry(gdi);
        match cur {
            GD_BAD => {
                return Err(Error::corrupt(format!(
                    "grain directory entry {gdi} is invalid"
                )))
            }
            GD_NONE | GD_ZERO => {}
            loc if t.gt_in_file(loc, gdi) => return Ok(loc),
            loc => {
                return Err(Error::corrupt(format!(
                    "grain table {gdi} at offset {loc:#x} lies past the end of the file"
                )))
            }
        }
        if gdi as usize >= t.gd.len() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "write beyond the grain directory the extent header describes",
            ));
        }
        // A zeroed directory entry: the table's grains all read as zeros.
        let fill: u32 = u32::from(cur == GD_ZERO);
        let table: Vec<u8> = (0..t.gt_entries).flat_map(|_| le32_bytes(fill)).collect();
        let space = round_up(table.len() as u64, 512).expect("tables are small");
        let redundant = self.rgd_at != 0 && t.rgd_entry(gdi).is_some();
        self.dirty.store(true, Ordering::Release);
        let rhost = if redundant {
            let h = self.reserve(t, st, space, 512)?;
            self.map.add(h, space, Structure::GrainTable);
            t.file.write_all_at(&table, h)?;
            Some(h)
        } else {
            None
        };
        let host = self.reserve(t, st, space, 512)?;
        self.map.add(host, space, Structure::GrainTable);
        t.file.write_all_at(&table, host)?;
        let entry_at = gdi * 4;
        if let Some(rh) = rhost {
            t.file.write_ordered_at(
                &le32_bytes((rh / 512) as u32),
                self.rgd_at + entry_at,
                Stage::Map,
            )?;
            if let Some(r) = &t.rgd {
                r[gdi as usize].store(rh, Ordering::Release);
            }
        }
        t.file.write_ordered_at(
            &le32_bytes((host / 512) as u32),
            self.gd_at + entry_at,
            Stage::Map,
        )?;
        t.publish_gt(&v.caches, host, Some(table.into()));
        t.gd[gdi as usize].store(host, Ordering::Release);
        Ok(host)
    }

    /// Writes entries `idx..idx + raw.len()` of table `gdi` (at `gt`):
    /// redundant copy first, then the primary, then the cache. Under the lock.
    fn set_entries(
        &self,
        v: &Vmdk,
        t: &GrainTables,
        gdi: u64,
        gt: u64,
        idx: u64,
        raw: &[u32],
    ) -> Result<()> {
        let table = t.load_gt(&v.caches, gt)?;
        let mut new = table.to_vec();
        for (k, r) in raw.iter().enumerate() {
            let at = (idx as usize + k) * 4;
            put_le32(&mut new, at, *r);
        }
        if new[..] == table[..] {
            return Ok(());
        }
        let span = idx as usize * 4..(idx as usize + raw.len()) * 4;
        self.dirty.store(true, Ordering::Release);
        if self.rgd_at != 0 {
            if let Some(rgt) = t.rgd_entry(gdi) {
                if !matches!(rgt, GD_NONE | GD_ZERO | GD_BAD) && t.gt_in_file(rgt, gdi) {
                    t.file.write_ordered_at(
                        &new[span.clone()],
                        rgt + span.start as u64,
                        Stage::Map,
                    )?;
                }
            }
        }
        match t
            .file
            .write_ordered_at(&new[span.clone()], gt + span.start as u64, Stage::Map)
        {
            Ok(()) => {
                t.publish_gt(&v.caches, gt, Some(new.into()));
                Ok(())
            }
            Err(e) => {
                t.publish_gt(&v.caches, gt, None);
                Err(e)
            }
        }
    }
}

/// The table location for `gdi` if it exists and is usable.
fn existing_gt(t: &GrainTables, gdi: u64) -> Result<Option<u64>> {
    match t.gd_entry(gdi) {
        GD_NONE | GD_ZERO => Ok(None),
        GD_BAD => Err(Error::corrupt(format!(
            "grain directory entry {gdi} is invalid"
        ))),
        loc if t.gt_in_file(loc, gdi) => Ok(Some(loc)),
        loc => Err(Error::corrupt(format!(
            "grain table {gdi} at offset {loc:#x} lies past the end of the file"
        ))),
    }
}

/// What the table says about the grain holding extent-relative `rel`
/// (`GD_ZERO` tables read as zero grains).
fn grain_at(v: &Vmdk, t: &GrainTables, rel: u64) -> Result<Grain> {
    let cover = t.gt_cover();
    let gdi = rel / cover;
    if t.gd_entry(gdi) == GD_ZERO {
        return Ok(Grain::Zero);
    }
    match existing_gt(t, gdi)? {
        None => Ok(Grain::Unallocated),
        Some(loc) => {
            let gt = t.load_gt(&v.caches, loc)?;
            Ok(t.entry(&gt, (rel % cover) / t.grain_size))
        }
    }
}

fn bad_grain(g: Grain) -> Error {
    match g {
        Grain::Compressed(_) => Error::unsupported(format!(
            "compressed grains cannot be written in place; {REFUSE_HINT}"
        )),
        Grain::Bad(raw) => Error::corrupt(format!("grain table entry {raw:#x} is invalid")),
        g => Error::internal(format!("grain {g:?} reached the allocation path")),
    }
}

impl Vmdk {
    /// Writes the start of `buf` at extent-relative `rel` of sparse extent
    /// `e`; returns the bytes written (0: the state changed, try again).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sparse_write(
        &self,
        e: &Extent,
        t: &GrainTables,
        w: &SparseWriter,
        buf: &[u8],
        rel: u64,
        below: &dyn Below,
        zeros: bool,
    ) -> Result<usize> {
        w.map.refuse_if_tripped()?;
        if rel >= t.capacity {
            return Err(Error::unsupported(
                "write beyond the capacity the sparse extent's header describes",
            ));
        }
        let buf = &buf[..(buf.len() as u64).min(t.capacity - rel) as usize];
        let gs = t.grain_size;
        let cover = t.gt_cover();
        let gdi = rel / cover;
        if let Some(loc) = existing_gt(t, gdi)? {
            let gt = t.load_gt(&self.caches, loc)?;
            let idx = (rel % cover) / gs;
            match t.entry(&gt, idx) {
                Grain::Data(host) => {
                    w.check_data(host, gs, t)?;
                    // Extend over following grains stored right after it.
                    let in_g = rel % gs;
                    let mut n = (gs - in_g).min(buf.len() as u64);
                    let mut k = 1;
                    while n < buf.len() as u64
                        && idx + k < t.gt_entries
                        && t.entry(&gt, idx + k) == Grain::Data(host + k * gs)
                        && w.check_data(host + k * gs, gs, t).is_ok()
                    {
                        n = (n + gs).min(buf.len() as u64);
                        k += 1;
                    }
                    w.map
                        .guard(HostOffset(host + in_g), n, GuestOffset(e.start + rel))?;
                    let n = n as usize;
                    w.dirty.store(true, Ordering::Release);
                    t.file.write_all_at(&buf[..n], host + in_g)?;
                    return Ok(n);
                }
                Grain::Unallocated | Grain::Zero => {}
                g => return Err(bad_grain(g)),
            }
        }
        self.allocate_and_write(e, t, w, buf, rel, below, zeros)
    }

    /// The allocation path: see the module documentation.
    #[allow(clippy::too_many_arguments)]
    fn allocate_and_write(
        &self,
        e: &Extent,
        t: &GrainTables,
        w: &SparseWriter,
        buf: &[u8],
        rel: u64,
        below: &dyn Below,
        zeros: bool,
    ) -> Result<usize> {
        let gs = t.grain_size;
        let cover = t.gt_cover();
        let gdi = rel / cover;
        let first_g = rel / gs;
        let grain_rel = first_g * gs;
        let buf_end = rel + buf.len() as u64;
        let run = {
            let mut st = w.alloc.lock();
            if st.is_pending(first_g) {
                w.alloc.wait(&mut st);
                return Ok(0);
            }
            let loc = w.ensure_gt(self, t, &mut st, gdi)?;
            let gt = t.load_gt(&self.caches, loc)?;
            let idx = (rel % cover) / gs;
            let first = t.entry(&gt, idx);
            match first {
                Grain::Data(_) => return Ok(0),
                Grain::Unallocated | Grain::Zero => {}
                g => return Err(bad_grain(g)),
            }
            let mut old = vec![first];
            let max = (MAX_RUN_BYTES / gs).max(1);
            while (old.len() as u64) < max
                && idx + (old.len() as u64) < t.gt_entries
                && grain_rel + (old.len() as u64) * gs < buf_end
            {
                let g = t.entry(&gt, idx + old.len() as u64);
                if !matches!(g, Grain::Unallocated | Grain::Zero)
                    || st.is_pending(first_g + old.len() as u64)
                {
                    break;
                }
                old.push(g);
            }
            let host = w.reserve(t, &mut st, old.len() as u64 * gs, gs)?;
            let claim = w.alloc.claim(&mut st, first_g..first_g + old.len() as u64);
            let run = Run {
                gt: loc,
                gdi,
                idx,
                rel: grain_rel,
                old,
                host,
            };
            (run, claim)
        };
        let (run, _claim) = run;
        self.fill_and_publish(e, t, w, &run, buf, rel, below, zeros)
    }

    /// Fills and writes the grains of a reserved run, then points their
    /// table entries at them. Returns the bytes of `buf` written.
    #[allow(clippy::too_many_arguments)]
    fn fill_and_publish(
        &self,
        e: &Extent,
        t: &GrainTables,
        w: &SparseWriter,
        run: &Run,
        buf: &[u8],
        rel: u64,
        below: &dyn Below,
        zeros: bool,
    ) -> Result<usize> {
        let gs = t.grain_size;
        let count = run.old.len() as u64;
        let cap = t.capacity;
        // In guest offsets (the extent starts at `e.start`), as the layers
        // below and the overlap log see them.
        let new_run = NewRun {
            guest: GuestOffset(e.start + run.rel),
            host: HostOffset(run.host),
            count,
            unit: gs,
        };
        w.dirty.store(true, Ordering::Release);
        let end = e.start + cap;
        let n = write_new_run(
            &t.file,
            &w.map,
            new_run,
            end,
            buf,
            GuestOffset(e.start + rel),
            zeros,
            &mut |k, c, out| match run.old[k] {
                Grain::Zero => Ok(()),
                _ => fill_from_below(below, c, out, end),
            },
        )?;
        let raw: Vec<u32> = (0..count)
            .map(|k| ((run.host + k * gs) / 512) as u32)
            .collect();
        let _st = w.alloc.lock();
        w.set_entries(self, t, run.gdi, run.gt, run.idx, &raw)?;
        Ok(n)
    }

    /// Marks the whole grains `[rel, end)` (inside one grain table) as
    /// zeroed grains (entry 1). Returns the bytes handled.
    fn zero_grains(&self, t: &GrainTables, w: &SparseWriter, rel: u64, end: u64) -> Result<u64> {
        let gs = t.grain_size;
        let cover = t.gt_cover();
        let gdi = rel / cover;
        let end = end.min((gdi + 1) * cover);
        let has_parent = self.has_parent();
        let mut st = w.alloc.lock();
        let first_g = rel / gs;
        let count = (end - rel).div_ceil(gs);
        w.alloc.wait_for(&mut st, first_g..first_g + count);
        let cur = t.gd_entry(gdi);
        if cur == GD_ZERO || (cur == GD_NONE && !has_parent) {
            return Ok(end - rel);
        }
        let loc = w.ensure_gt(self, t, &mut st, gdi)?;
        let gt = t.load_gt(&self.caches, loc)?;
        let idx = (rel % cover) / gs;
        let mut raw = Vec::with_capacity(count as usize);
        for k in 0..count {
            let r = match t.entry(&gt, idx + k) {
                Grain::Unallocated if !has_parent => 0,
                Grain::Bad(x) => {
                    return Err(Error::corrupt(format!(
                        "grain table entry {x:#x} is invalid"
                    )))
                }
                _ => 1,
            };
            raw.push(r);
        }
        w.set_entries(self, t, gdi, loc, idx, &raw)?;
        Ok(end - rel)
    }

    /// `write_zeroes` inside sparse extent `e`, extent-relative.
    pub(super) fn sparse_zeroes(
        &self,
        e: &Extent,
        t: &GrainTables,
        w: &SparseWriter,
        rel: u64,
        end: u64,
        below: &dyn Below,
    ) -> Result<()> {
        w.map.refuse_if_tripped()?;
        let gs = t.grain_size;
        let has_parent = self.has_parent();
        let zeros = vec![0u8; MAX_RUN_BYTES.max(gs) as usize];
        let cap = t.capacity;
        let mut pos = rel;
        // Past the tables everything reads as unallocated: zeros without
        // a parent.
        if end > cap && has_parent {
            return Err(Error::unsupported(
                "zeroing beyond the capacity the sparse extent's header describes",
            ));
        }
        let end = end.min(cap);
        let cover = t.gt_cover();
        while pos < end {
            let gde = t.gd_entry(pos / cover);
            if gde == GD_ZERO || (gde == GD_NONE && !has_parent) {
                // The whole table reads as zeros already.
                pos = end.min((pos / cover + 1) * cover);
                continue;
            }
            let c = pos - pos % gs;
            let whole = pos == c && end >= (c + gs).min(cap);
            let grain = grain_at(self, t, pos)?;
            if matches!(grain, Grain::Zero) || (grain == Grain::Unallocated && !has_parent) {
                pos = (c + gs).min(end);
                continue;
            }
            if !whole {
                let piece_end = end.min(c + gs);
                let n = (piece_end - pos) as usize;
                let mut done = 0;
                while done < n {
                    done += self.sparse_write(
                        e,
                        t,
                        w,
                        &zeros[..n - done],
                        pos + done as u64,
                        below,
                        true,
                    )?;
                }
                pos = piece_end;
                continue;
            }
            // Whole grains: up to the last grain boundary (or the end of
            // the extent's tables) inside the range.
            let whole_end = if end >= cap { end } else { end - end % gs };
            if w.zeroed_grain {
                pos += self.zero_grains(t, w, pos, whole_end)?;
                continue;
            }
            if let Grain::Data(h) = grain {
                w.check_data(h, gs, t)?;
                w.map.guard(HostOffset(h), gs, GuestOffset(e.start + pos))?;
                w.dirty.store(true, Ordering::Release);
                t.file.punch_hole(h, gs)?;
                pos += gs;
                continue;
            }
            let n = (whole_end - pos).min(zeros.len() as u64) as usize;
            pos += self.sparse_write(e, t, w, &zeros[..n], pos, below, true)? as u64;
        }
        Ok(())
    }
}
