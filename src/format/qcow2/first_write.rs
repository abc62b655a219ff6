//! qcow2 writes into one cluster that the lock-free in-place path cannot
//! take: the cluster needs a new host cluster (unallocated, compressed,
//! zero, shared with a snapshot), or some subclusters it touches are not
//! allocated yet, or it lives in an external data file and its entry does
//! not say so yet.
//!
//! Every such write has three steps, whatever the image's variant
//! (standard or extended L2 entries, data in the image or in a data
//! file):
//! 1. under the allocation mutex, once the guest cluster is not in flight
//!    ([`crate::engine::inflight`]): make sure the L2 table is writable,
//!    read the entry, decide a [`Plan`] (where the bytes go — the existing
//!    host cluster, the data file at the guest offset, or a newly
//!    allocated cluster — which units are written and the entry to
//!    publish), and mark the cluster in flight;
//! 2. without the mutex: write the data and the copy-on-write fill of the
//!    units it touches but does not cover (read from the layers below, the
//!    decompressed old cluster, a snapshot's shared cluster, or zeros);
//! 3. under the mutex again: publish the entry (an ordered write, after
//!    the data: [`crate::engine::order`]) and drop the old references,
//!    or, on failure, give a new cluster back; then the mark goes.
//!
//! While the cluster is in flight its entry cannot change (every metadata
//! change of a cluster waits for its mark), so the fill sees a stable
//! entry, and the old host cluster it may read stays referenced. A slow
//! fill (a cold read from a backing file) stalls only writers of the same
//! cluster; first writes into other clusters, and lock-free writes, go on.

use crate::engine::cow::{write_new_run, Fill, NewRun};
use crate::engine::units::{GuestCluster, GuestOffset, HostOffset};
use crate::error::{Error, Result};
use crate::format::{Below, Layer};

use super::alloc::Alloc;
use super::tables::{compressed_descriptor, L2_COMPRESSED, L2_COPIED, L2_ZERO, OFFSET_MASK};
use super::write::{units, ALL_UNITS};
use super::{CompressedBlock, Qcow2};

/// What a write into one cluster does, decided under the mutex.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// The L2 table and the entry's index in it.
    table: u64,
    index: u64,
    /// The entry and its subcluster bitmap now (stable while in flight).
    e: u64,
    bm: u64,
    /// Host offset of the cluster written: in the data target (the image,
    /// or the data file) when `fresh` is false, else a new image cluster.
    target: u64,
    /// `target` was allocated for this write.
    fresh: bool,
    /// Units (bit k: subcluster k; bit 0 alone without subclusters)
    /// written, data and fill together.
    write_units: u64,
    /// Units that held data before (same bits).
    old_alloc: u64,
    /// The entry and bitmap to publish.
    ne: u64,
    nbm: u64,
}

impl Qcow2 {
    /// Writes `data` at `pos` (inside one cluster) through a [`Plan`]; see
    /// the module documentation.
    pub(super) fn write_partial(&self, data: &[u8], pos: u64, below: &dyn Below) -> Result<()> {
        let first = GuestCluster(pos >> self.geo.cluster_bits);
        let w = self.w();
        let mut st = self.lock_clusters(first.get(), 1);
        let plan = self.plan(&mut st, pos, data.len() as u64)?;
        let mark = w.inflight.mark(&mut st, first, 1);
        drop(st);
        let filled = self.fill(&plan, data, pos, below);
        let mut st = w.state.lock();
        let r = match filled {
            Ok(()) => self.publish(&mut st, &plan),
            Err(e) => {
                if plan.fresh {
                    // Nothing points at the new cluster: give it back.
                    let c = HostOffset(plan.target).cluster(self.geo.cluster_bits);
                    let _ = st.decref(&self.file, &self.caches, self.cache_id, c, false);
                }
                Err(e)
            }
        };
        drop(st);
        drop(mark);
        r
    }

    /// Decides where a write of `len` bytes at `pos` (inside one cluster)
    /// goes; allocates the new cluster when one is needed.
    fn plan(&self, st: &mut Alloc, pos: u64, len: u64) -> Result<Plan> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let ext = geo.extended;
        let cstart = pos - pos % cs;
        let (off, end) = (pos - cstart, pos - cstart + len);
        let (table, index) = self.ensure_l2(st, pos)?;
        let (e, bm) = self.l2_entry(table, index)?;
        let compressed = e & L2_COMPRESSED != 0;
        let host = e & OFFSET_MASK;
        let df = self.data_file.is_some();
        if compressed && df {
            return Err(Error::corrupt(
                "compressed cluster in an image with an external data file",
            ));
        }
        let has_host = !compressed && (host != 0 || (df && e & L2_COPIED != 0));
        let touched = if ext {
            let u = geo.unit_size();
            units(off / u, end.div_ceil(u))
        } else {
            1
        };
        let old_alloc = match (compressed, ext) {
            (true, _) => 0,
            (false, true) => bm & ALL_UNITS,
            (false, false) => u64::from(has_host && e & L2_ZERO == 0),
        };
        let old_zero = if ext && !compressed { bm >> 32 } else { 0 };
        let in_place = !compressed && (df || !self.needs_new_cluster(st, e)?);
        let (target, fresh, write_units) = if in_place {
            // A data file's cluster lives at the guest offset until the
            // entry names another place.
            let target = if has_host { host } else { cstart };
            if target % cs != 0 {
                return Err(Error::corrupt(format!(
                    "L2 entry host offset {target:#x} is not aligned to the cluster size"
                )));
            }
            let file_end = self.file_end.load(std::sync::atomic::Ordering::Acquire);
            if !df && target >= file_end {
                return Err(Error::corrupt(format!(
                    "data cluster at {target:#x} lies past the end of the file ({file_end} bytes)"
                )));
            }
            if !df {
                // The file may end inside this cluster (its last subclusters
                // were never written: qemu and we leave the file short), and
                // this write may grow it: the reads' bound must follow, or
                // the subcluster written here reads as "past the end".
                self.file_end
                    .fetch_max(target + cs, std::sync::atomic::Ordering::AcqRel);
            }
            (target, false, touched)
        } else {
            let write_units = match (ext, compressed) {
                (false, _) => 1,
                (true, true) => ALL_UNITS,
                (true, false) => old_alloc | touched,
            };
            (self.alloc_cluster(st)?.get(), true, write_units)
        };
        let nbm = if !ext {
            0
        } else if fresh {
            write_units | ((old_zero & !write_units) << 32)
        } else {
            (old_alloc | touched) | ((old_zero & !touched) << 32)
        };
        Ok(Plan {
            table,
            index,
            e,
            bm,
            target,
            fresh,
            write_units,
            old_alloc,
            ne: target | L2_COPIED,
            nbm,
        })
    }

    /// Step 2 of a plan, without the mutex: the data and its fill.
    fn fill(&self, p: &Plan, data: &[u8], pos: u64, below: &dyn Below) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let cstart = pos - pos % cs;
        let (off, end) = (pos - cstart, pos - cstart + data.len() as u64);
        let unit = geo.unit_size();
        let all = if geo.extended { ALL_UNITS } else { 1 };
        if p.fresh && p.write_units == all {
            // The whole new cluster: engine::cow fills what `data` does
            // not cover and writes it once, after the overlap guard.
            return self.fill_new_cluster(data, pos, p.e, p.bm, p.target, below);
        }
        if p.fresh {
            // Some subclusters of a new cluster: the others stay
            // unallocated (or zero) in the bitmap and are not written.
            let dec = self.decompressed_old(p.e, cstart)?;
            let mut buf = vec![0u8; cs as usize];
            let (a, b) = (off as usize, end as usize);
            for k in (0..32).filter(|k| p.write_units >> k & 1 != 0) {
                let (ua, ub) = (k * unit, (k + 1) * unit);
                if ua < off || ub > end {
                    let out = &mut buf[ua as usize..ub as usize];
                    self.current(out, cstart + ua, p.e, p.bm, dec.as_deref(), below)?;
                }
            }
            buf[a..b].copy_from_slice(data);
            self.guard(HostOffset(p.target), cs, GuestOffset(cstart))?;
            let mut k = 0;
            while k < 32 {
                if p.write_units >> k & 1 == 0 {
                    k += 1;
                    continue;
                }
                let first = k;
                while k < 32 && p.write_units >> k & 1 != 0 {
                    k += 1;
                }
                let (a, b) = ((first * unit) as usize, (k * unit) as usize);
                self.file.write_all_at(&buf[a..b], p.target + a as u64)?;
            }
            return Ok(());
        }
        // In place: the units this write touches, completed from what they
        // read as where they were not allocated yet.
        let (u0, u1) = if geo.extended {
            (off / unit, end.div_ceil(unit))
        } else {
            (0, 1)
        };
        let target = p.target;
        let (at, len) = (u0 * unit, (u1 - u0) * unit);
        self.guard(HostOffset(target + at), len, GuestOffset(cstart + at))?;
        let f = self.data_target();
        f.write_all_at(data, target + off)?;
        let old_alloc = p.old_alloc;
        let mut fills = Vec::new();
        if old_alloc >> u0 & 1 == 0 && off > u0 * unit {
            fills.push((u0 * unit, off));
        }
        if old_alloc >> (u1 - 1) & 1 == 0 && end < u1 * unit {
            fills.push((end, u1 * unit));
        }
        for (a, b) in fills {
            let mut buf = vec![0u8; (b - a) as usize];
            self.current(&mut buf, cstart + a, p.e, p.bm, None, below)?;
            f.write_all_at(&buf, target + a)?;
        }
        Ok(())
    }

    /// Step 3 of a plan, under the mutex: the entry now names the written
    /// cluster; a replaced host cluster loses its reference.
    fn publish(&self, st: &mut Alloc, p: &Plan) -> Result<()> {
        if (p.ne, p.nbm) != (p.e, p.bm) {
            self.set_l2_entry(p.table, p.index, p.ne, p.nbm)?;
        }
        if p.fresh && (p.e & L2_COMPRESSED != 0 || p.e & OFFSET_MASK != 0) {
            self.release(st, p.e)?;
        }
        Ok(())
    }

    /// Writes the whole new host cluster `new`: `data` at its place, the
    /// rest as guest cluster `pos` reads with entry `e` (unchanged: the
    /// cluster is in flight).
    fn fill_new_cluster(
        &self,
        data: &[u8],
        pos: u64,
        e: u64,
        bm: u64,
        new: u64,
        below: &dyn Below,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let cstart = pos - pos % cs;
        let dec = self.decompressed_old(e, cstart)?;
        let run = NewRun {
            guest: GuestOffset(cstart),
            host: HostOffset(new),
            count: 1,
            unit: cs,
        };
        // engine::cow asks for the whole cluster as it reads now and lays
        // `data` over it.
        let fill = &mut |_: usize, g: GuestOffset, out: &mut [u8]| {
            self.current(out, g.get(), e, bm, dec.as_deref(), below)
        };
        let n = self.new_run_at(run, data, GuestOffset(pos), fill)?;
        debug_assert_eq!(n, data.len());
        Ok(())
    }

    /// [`write_new_run`] of `data` from the run's start.
    pub(super) fn new_run(&self, run: NewRun, data: &[u8], fill: &mut Fill<'_>) -> Result<usize> {
        self.new_run_at(run, data, run.guest, fill)
    }

    /// [`write_new_run`] into the image file (never a data file: its
    /// clusters are written in place at their guest offset).
    fn new_run_at(
        &self,
        run: NewRun,
        data: &[u8],
        pos: GuestOffset,
        fill: &mut Fill<'_>,
    ) -> Result<usize> {
        let vsize = self.header.size;
        write_new_run(
            &self.file,
            &self.w().map,
            run,
            vsize,
            data,
            pos,
            false,
            fill,
        )
    }

    /// The cluster at guest `cstart` decoded, when its entry `e` is a
    /// compressed one (the source of a copy-on-write).
    fn decompressed_old(&self, e: u64, cstart: u64) -> Result<Option<Vec<u8>>> {
        if e & L2_COMPRESSED == 0 {
            return Ok(None);
        }
        let cs = self.geo.cluster_size();
        let (h, len) = compressed_descriptor(e, self.geo.cluster_bits)?;
        let block = CompressedBlock {
            guest_start: cstart,
            len: cs,
            key: h,
            host_offset: h,
            host_len: len,
        };
        let mut d = vec![0u8; cs as usize];
        self.decompress(&block, &mut d)?;
        Ok(Some(d))
    }

    /// Fills `out` with what guest `g..` (inside one cluster) reads as now,
    /// given the cluster's entry.
    fn current(
        &self,
        out: &mut [u8],
        g: u64,
        e: u64,
        bm: u64,
        dec: Option<&[u8]>,
        below: &dyn Below,
    ) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let cstart = g - g % cs;
        if let Some(d) = dec {
            let a = (g - cstart) as usize;
            out.copy_from_slice(&d[a..a + out.len()]);
            return Ok(());
        }
        let host = e & OFFSET_MASK;
        let has_host = host != 0 || (self.data_file.is_some() && e & L2_COPIED != 0);
        let unit = geo.unit_size();
        let mut done = 0usize;
        while done < out.len() {
            let p = g + done as u64;
            let off = p - cstart;
            let n = ((unit - off % unit) as usize).min(out.len() - done);
            let piece = &mut out[done..done + n];
            let (data, zero) = if geo.extended {
                let k = off / unit;
                (bm >> k & 1 != 0, bm >> (k + 32) & 1 != 0)
            } else {
                (has_host && e & L2_ZERO == 0, e & L2_ZERO != 0)
            };
            if data {
                self.data_target().read_zero_fill_at(piece, host + off)?;
            } else if zero {
                piece.fill(0);
            } else {
                let size = self.header.size;
                let inside = size.saturating_sub(p).min(n as u64) as usize;
                below.read_below(&mut piece[..inside], p)?;
                piece[inside..].fill(0);
            }
            done += n;
        }
        Ok(())
    }
}
