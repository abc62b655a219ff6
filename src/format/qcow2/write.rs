//! Writing qcow2 images in place ([`WriteLayer`]).
//!
//! **Locking.** One mutex (`Writer::state`, holding the [`Alloc`] refcount
//! state) serialises every change of metadata: allocation, refcounts, L1
//! and L2 entries. A write into clusters that already belong to the active
//! image alone (L2 entry flagged COPIED, every touched subcluster
//! allocated) takes only a shared `gate` and goes straight to the host
//! file, without the mutex, host-contiguous clusters in one `pwrite`.
//! Whole clusters that need new host clusters (first writes, overwrites of
//! compressed, zero or snapshot-shared clusters) are allocated in batches:
//! under the mutex their guest range is marked busy and host-contiguous
//! clusters are allocated (one refcount `pwrite` per run); the data is
//! written with the mutex released; under it again the L2 entries are
//! written (one `pwrite` per table slice) and the range is released.
//! Every other metadata change first waits, under the mutex, until its
//! clusters are not busy. A partial-cluster write into a cluster that
//! needs a new host cluster goes the same way (its copy-on-write fill,
//! often a cold read from the backing file, runs without the mutex). Both
//! write the new clusters through [`write_new_run`] (`engine::cow`: the
//! overlap guard, the fill of what the write does not cover, one host
//! write per run), as qcow v1 and VMDK do.
//! Subcluster images, data files and zeroing run under the mutex, data
//! I/O included, re-reading the entry there, so two first writes into one
//! cluster cannot both allocate it: the second finds it allocated and
//! writes in place. They do not fit `write_new_run`: a subcluster write
//! allocates the cluster but writes only the subclusters it touches (the
//! others stay unallocated or zero in the bitmap, no fill), and a data
//! file's clusters are not fresh space but the guest offset itself. A dropped reference is only noted; the flush that
//! lowers the refcounts first calls [`Qcow2::quiesce`] (the gate taken
//! exclusively, so any read or lock-free write that looked up the old
//! entry has finished), then punches the clusters that lose their last
//! reference, both without the mutex; only the refcount updates take it.
//!
//! **Ordering** ([`crate::engine::order`]). Data, copy-on-write fill,
//! refcount raises and new tables are written at once; L1 and L2 entries
//! are ordered writes (stage Map) and refcount-table entries and the
//! header's refcount-table pointer stage Link, applied in memory at once
//! and written by the next flush after barriers:
//! 1. a new cluster's refcount is raised (and its refcount block written
//!    and linked, or the refcount table grown) before anything points to it;
//! 2. data (including copy-on-write fill) is durable before the L2 entry
//!    that makes it visible, and a new L2 table before its L1 entry;
//! 3. a dropped reference is only noted ([`Alloc::decref_later`]);
//!    [`WriteLayer::flush`] lowers the refcount (punching the cluster's
//!    host space at 0, making it reusable) once the removal is durable.
//!
//! A crash or a power cut at any instant therefore leaves at worst leaked
//! clusters; everything written before a completed [`WriteLayer::flush`]
//! is durable (the data file first, then the image).
//!
//! **Refcounts** are always exact: the dirty bit is never set, even on
//! images with lazy refcounts enabled. Images with the dirty or corrupt
//! bit are refused for writing. Unknown autoclear bits, and the bitmaps
//! bit (persistent bitmaps are not updated by our writes), are cleared at
//! open; `data_file_raw` is kept, and honoured: data always lands at the
//! guest offset and zeroed ranges are punched out of the data file too.

use std::sync::Arc;

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::engine::cow::{write_new_run, Fill, NewRun};
use crate::engine::overlap::MetadataMap;
use crate::engine::reclaim::ReadGate;

use crate::error::{Error, ErrorKind, Result};
use crate::format::{Below, WriteLayer};
use crate::host::HostFile;

use super::alloc::Alloc;
use super::header::{Header, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::tables::{compressed_descriptor, L2_COMPRESSED, L2_COPIED, L2_ZERO, OFFSET_MASK};
use super::{CompressedBlock, Layer, Qcow2};

/// All 32 subclusters.
const ALL_UNITS: u64 = 0xffff_ffff;

/// The write side of an open image.
pub(super) struct Writer {
    state: Mutex<Alloc>,
    /// Pinned by readers and lock-free in-place writes; see [`ReadGate`].
    pub(super) gate: ReadGate,
    /// Guest cluster ranges (first, count) whose new host clusters are
    /// being filled outside the mutex; changed only under `state`.
    busy: Mutex<Vec<(u64, u64)>>,
    /// Signalled (with `state` held) when a busy range is finished.
    idle: Condvar,
    has_backing: bool,
    /// Metadata ranges no data write may touch.
    pub(super) map: Arc<MetadataMap>,
}

impl Writer {
    /// Checks that `h` may be written and prepares the refcount state.
    pub(super) fn open(
        file: &Arc<HostFile>,
        data_file: Option<&HostFile>,
        h: &Header,
        has_backing: bool,
        l1: &[u64],
    ) -> Result<Writer> {
        if h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) != 0 {
            let what = if h.incompatible & INCOMPAT_CORRUPT != 0 {
                "marked corrupt"
            } else {
                "marked dirty (not closed cleanly; refcounts may be wrong)"
            };
            return Err(Error::unsupported(format!(
                "the image is {what}; repair it with `qemu-img check -r all` before writing \
                 to it, or mount it with --overlay FILE"
            )));
        }
        if !file.writable() || data_file.is_some_and(|d| !d.writable()) {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "the image file is open read-only",
            ));
        }
        let map = Arc::new(super::guard::build(file, h, l1)?);
        let st = Alloc::open(file, h, map.clone())?;
        if h.version >= 3 && h.autoclear & !AUTOCLEAR_DATA_FILE_RAW != 0 {
            let keep = h.autoclear & AUTOCLEAR_DATA_FILE_RAW;
            file.write_all_at(&crate::endian::be64_bytes(keep), 88)?;
        }
        Ok(Writer {
            state: Mutex::new(st),
            gate: ReadGate::new(),
            busy: Mutex::new(Vec::new()),
            idle: Condvar::new(),
            has_backing,
            map,
        })
    }

    /// Refcount table offset and clusters, and autoclear bits, as on disk now.
    pub(super) fn header_now(&self, h: &Header) -> (u64, u64, u64) {
        let (off, clusters) = self.state.lock().table_location();
        (off, clusters, h.autoclear & AUTOCLEAR_DATA_FILE_RAW)
    }

    /// The exact refcount of the host cluster containing `host`.
    pub(super) fn refcount(&self, q: &Qcow2, host: u64) -> Result<u64> {
        self.state.lock().get(&q.file, host >> q.geo.cluster_bits)
    }
}

/// Subcluster bits `[a, b)` of a bitmap.
fn units(a: u64, b: u64) -> u64 {
    (ALL_UNITS >> (32 - (b - a))) << a
}

impl Qcow2 {
    fn w(&self) -> &Writer {
        self.writer
            .as_ref()
            .expect("write calls only reach writable layers")
    }

    /// Checks a data write of `len` bytes at host `host` (guest `guest`)
    /// into the image file against its metadata map (a data file holds
    /// no metadata).
    fn guard(&self, host: u64, len: u64, guest: u64) -> Result<()> {
        match &self.writer {
            Some(w) if self.data_file.is_none() => w.map.guard(host, len, guest),
            _ => Ok(()),
        }
    }

    /// Before an entry stops pointing at its data cluster (which may then
    /// be freed): that cluster must not be metadata.
    fn guard_old_data(&self, e: u64, pos: u64) -> Result<()> {
        let host = e & OFFSET_MASK;
        if e & L2_COMPRESSED != 0 || host == 0 {
            return Ok(());
        }
        self.guard(
            host,
            self.geo.cluster_size(),
            pos - pos % self.geo.cluster_size(),
        )
    }

    /// The file guest data lives in.
    fn data_target(&self) -> &HostFile {
        self.data_file.as_deref().unwrap_or(&self.file)
    }

    /// Where a write of `len` bytes at `pos` (inside one cluster) can go
    /// without touching metadata, if it can.
    fn in_place_target(&self, pos: u64, len: u64) -> Result<Option<u64>> {
        let table = self.l2_table(pos)?;
        if table == 0 {
            return Ok(None);
        }
        let geo = self.geo;
        let (e, bm) = self.l2_entry(table, (pos >> geo.cluster_bits) % geo.l2_entries)?;
        if e & L2_COPIED == 0 || e & L2_COMPRESSED != 0 {
            return Ok(None);
        }
        let host = e & OFFSET_MASK;
        let off = pos % geo.cluster_size();
        if geo.extended {
            let u = geo.unit_size();
            let need = units(off / u, (off + len).div_ceil(u));
            if bm & need != need {
                return Ok(None);
            }
        } else if e & L2_ZERO != 0 {
            return Ok(None);
        }
        if host % geo.cluster_size() != 0 || (host == 0 && self.data_file.is_none()) {
            return Ok(None);
        }
        // As the read path does: data past the end of the image is corrupt
        // (writing there would grow the file to wherever the entry says).
        let end = self.file_end.load(std::sync::atomic::Ordering::Acquire);
        if self.data_file.is_none() && host >= end {
            return Err(Error::corrupt(format!(
                "data cluster at {host:#x} lies past the end of the file ({end} bytes)"
            )));
        }
        Ok(Some(host + off))
    }

    /// Writes `data` at `pos`, all inside one cluster.
    fn write_cluster(&self, data: &[u8], pos: u64, below: &dyn Below) -> Result<()> {
        // Inside one cluster the lock-free path writes all of it or nothing.
        if self.write_in_place_run(data, pos)? > 0 {
            return Ok(());
        }
        let mut st = self.lock_clusters(pos >> self.geo.cluster_bits, 1);
        self.write_locked(&mut st, data, pos, below)
    }

    /// Whether a write into the cluster with entry `e` needs a new host
    /// cluster (no data file): it is compressed, unallocated, or shared
    /// with a snapshot.
    fn needs_new_cluster(&self, st: &mut Alloc, e: u64) -> Result<bool> {
        let host = e & OFFSET_MASK;
        Ok(e & L2_COMPRESSED != 0
            || host == 0
            || st.get(&self.file, host >> self.geo.cluster_bits)? != 1)
    }

    /// Takes the allocation mutex once no batch is filling any of the
    /// guest clusters `first..first + count`.
    fn lock_clusters(&self, first: u64, count: u64) -> MutexGuard<'_, Alloc> {
        let w = self.w();
        let mut st = w.state.lock();
        while w
            .busy
            .lock()
            .iter()
            .any(|&(a, n)| a < first + count && first < a + n)
        {
            w.idle.wait(&mut st);
        }
        st
    }

    /// Writes as much of `data` (from guest `pos`) as goes in place into
    /// host-contiguous clusters, in one `pwrite`; 0 when the first cluster
    /// cannot be written in place.
    fn write_in_place_run(&self, data: &[u8], pos: u64) -> Result<usize> {
        let cs = self.geo.cluster_size();
        let _g = self.w().gate.pin();
        let (mut start, mut n) = (None::<u64>, 0usize);
        while n < data.len() {
            let p = pos + n as u64;
            let k = ((cs - p % cs) as usize).min(data.len() - n);
            let Some(h) = self.in_place_target(p, k as u64)? else {
                break;
            };
            match start {
                None => start = Some(h),
                Some(s) if s + n as u64 == h => {}
                Some(_) => break,
            }
            n += k;
        }
        if let Some(s) = start {
            self.guard(s, n as u64, pos)?;
            self.data_target().write_all_at(&data[..n], s)?;
        }
        Ok(n)
    }

    /// Writes whole clusters (`data` is a multiple of the cluster size,
    /// `pos` aligned) that need new host clusters: allocates them as
    /// host-contiguous runs under the mutex, fills them without it, then
    /// points the L2 entries at them. Returns the bytes written (at least
    /// one cluster; a cluster found writable in place is written there).
    fn write_new_clusters(&self, data: &[u8], pos: u64, below: &dyn Below) -> Result<usize> {
        let geo = self.geo;
        let (cs, cb) = (geo.cluster_size(), geo.cluster_bits);
        let count = data.len() as u64 / cs;
        let first = pos >> cb;
        let mut st = self.lock_clusters(first, count);
        // Which leading clusters need a new host cluster, and their entries.
        let mut old = Vec::new();
        for i in 0..count {
            let (table, index) = self.ensure_l2(&mut st, pos + i * cs)?;
            let (e, _) = self.l2_entry(table, index)?;
            if !self.needs_new_cluster(&mut st, e)? {
                break;
            }
            old.push((table, index, e));
        }
        if old.is_empty() {
            self.write_locked(&mut st, &data[..cs as usize], pos, below)?;
            return Ok(cs as usize);
        }
        let count = old.len() as u64;
        let mut runs = Vec::new();
        let mut got = 0;
        while got < count {
            let (h, k) = self.alloc_clusters(&mut st, count - got)?;
            runs.push((h, k));
            got += k;
        }
        self.w().busy.lock().push((first, count));
        drop(st);

        // The data covers every new cluster: engine::cow fills nothing
        // and writes each host-contiguous run once, after the overlap guard.
        let mut filled = Ok(());
        let mut d = 0usize;
        for &(h, k) in &runs {
            let run = NewRun {
                guest: pos + d as u64,
                host: h,
                count: k,
                unit: cs,
            };
            let no_fill = &mut |_: usize, _: u64, _: &mut [u8]| -> Result<()> { Ok(()) };
            filled = self.new_run(run, &data[d..], no_fill).map(|n| d += n);
            if filled.is_err() {
                break;
            }
        }

        self.finish_batch(first, count, filled, &old, &runs)
            .map(|()| (count * cs) as usize)
    }

    /// Writes `data` at `pos` (inside one cluster, not all of it). When
    /// the cluster needs a new host cluster, the rest of it is copied from
    /// what it reads as now (the backing chain, the decompressed old
    /// cluster, a snapshot's shared cluster, zeros) with the mutex
    /// released, as for whole clusters; images with subclusters or a data
    /// file, and clusters writable in place by now, take the locked path.
    fn write_partial(&self, data: &[u8], pos: u64, below: &dyn Below) -> Result<()> {
        let geo = self.geo;
        let cb = geo.cluster_bits;
        let first = pos >> cb;
        let mut st = self.lock_clusters(first, 1);
        if geo.extended || self.data_file.is_some() {
            return self.write_locked(&mut st, data, pos, below);
        }
        let (table, index) = self.ensure_l2(&mut st, pos)?;
        let (e, bm) = self.l2_entry(table, index)?;
        if !self.needs_new_cluster(&mut st, e)? {
            return self.write_locked(&mut st, data, pos, below);
        }
        let (new, _) = self.alloc_clusters(&mut st, 1)?;
        self.w().busy.lock().push((first, 1));
        drop(st);
        let filled = self.fill_new_cluster(data, pos, e, bm, new, below);
        self.finish_batch(first, 1, filled, &[(table, index, e)], &[(new, 1)])
    }

    /// Writes the whole new host cluster `new`: `data` at its place, the
    /// rest as guest cluster `pos` reads with entry `e` (unchanged: the
    /// cluster is busy).
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
            guest: cstart,
            host: new,
            count: 1,
            unit: cs,
        };
        // engine::cow asks for the whole cluster as it reads now and lays
        // `data` over it.
        let fill = &mut |_: usize, g: u64, out: &mut [u8]| {
            self.current(out, g, e, bm, dec.as_deref(), below)
        };
        let n = self.new_run_at(run, data, pos, fill)?;
        debug_assert_eq!(n, data.len());
        Ok(())
    }

    /// [`write_new_run`] of `data` from the run's start.
    fn new_run(&self, run: NewRun, data: &[u8], fill: &mut Fill<'_>) -> Result<usize> {
        self.new_run_at(run, data, run.guest, fill)
    }

    /// [`write_new_run`] into the image file (never a data file: its
    /// clusters are written in place at their guest offset).
    fn new_run_at(&self, run: NewRun, data: &[u8], pos: u64, fill: &mut Fill<'_>) -> Result<usize> {
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

    /// Ends a batch begun by marking guest clusters `first..first + count`
    /// busy: links the new clusters if they were `filled` (else gives them
    /// back), then releases the range and wakes whoever waits for it.
    fn finish_batch(
        &self,
        first: u64,
        count: u64,
        filled: Result<()>,
        old: &[(u64, u64, u64)],
        runs: &[(u64, u64)],
    ) -> Result<()> {
        let cb = self.geo.cluster_bits;
        let mut st = self.w().state.lock();
        let r = if filled.is_err() {
            // Nothing points at the new clusters yet: give them back.
            for &(h, k) in runs {
                for c in 0..k {
                    let _ = st.decref(&self.file, &self.caches, self.cache_id, (h >> cb) + c);
                }
            }
            filled
        } else {
            // A failure here leaves at worst leaked clusters.
            self.link_new_clusters(&mut st, old, runs)
        };
        self.w()
            .busy
            .lock()
            .retain(|&(a, n)| (a, n) != (first, count));
        self.w().idle.notify_all();
        r
    }

    /// Points the entries `old` (table, index, previous entry) at the host
    /// clusters of `runs`, in order, then drops the previous references.
    fn link_new_clusters(
        &self,
        st: &mut Alloc,
        old: &[(u64, u64, u64)],
        runs: &[(u64, u64)],
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let per = self.geo.slice_entries();
        let bm = if self.geo.extended { ALL_UNITS } else { 0 };
        let hosts = runs
            .iter()
            .flat_map(|&(h, k)| (0..k).map(move |c| h + c * cs));
        let new: Vec<(u64, u64, u64)> = old
            .iter()
            .zip(hosts)
            .map(|(&(t, i, _), h)| (t, i, h))
            .collect();
        let mut a = 0;
        while a < new.len() {
            let (t, i0, _) = new[a];
            let mut b = a + 1;
            while b < new.len()
                && new[b].0 == t
                && new[b].1 == i0 + (b - a) as u64
                && new[b].1 / per == i0 / per
            {
                b += 1;
            }
            let ents: Vec<(u64, u64)> = new[a..b]
                .iter()
                .map(|&(_, _, h)| (h | L2_COPIED, bm))
                .collect();
            self.set_l2_entries(t, i0, &ents)?;
            a = b;
        }
        let dropped: Vec<u64> = old
            .iter()
            .map(|&(_, _, e)| e)
            .filter(|&e| e & L2_COMPRESSED != 0 || e & OFFSET_MASK != 0)
            .collect();
        if !dropped.is_empty() {
            for e in dropped {
                self.release(st, e)?;
            }
        }
        Ok(())
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

    /// Drops the references entry `e` held (after it was replaced by an
    /// ordered write): the refcounts are lowered after the next flush.
    fn release(&self, st: &mut Alloc, e: u64) -> Result<()> {
        let cb = self.geo.cluster_bits;
        if e & L2_COMPRESSED != 0 {
            let (off, len) = compressed_descriptor(e, cb)?;
            for c in ((off & !511) >> cb)..=((off + len - 1) >> cb) {
                st.decref_later(c);
            }
            self.caches.blocks.remove((self.cache_id, off));
        } else if e & OFFSET_MASK != 0 && self.data_file.is_none() {
            st.decref_later((e & OFFSET_MASK) >> cb);
        }
        Ok(())
    }

    /// Flushes the queued metadata when it is large or old (bounding what
    /// a power cut can lose and what the queue holds).
    fn flush_if_due(&self) -> Result<()> {
        if self.file.flush_due() {
            self.flush()?;
        }
        Ok(())
    }

    /// The slow path of a write inside one cluster, under the mutex.
    fn write_locked(&self, st: &mut Alloc, data: &[u8], pos: u64, below: &dyn Below) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let ext = geo.extended;
        let cstart = pos - pos % cs;
        let (off, end) = (pos - cstart, pos - cstart + data.len() as u64);
        let (table, index) = self.ensure_l2(st, pos)?;
        let (e, bm) = self.l2_entry(table, index)?;
        let compressed = e & L2_COMPRESSED != 0;
        let host = e & OFFSET_MASK;
        let df = self.data_file.is_some();
        let has_host = !compressed && (host != 0 || (df && e & L2_COPIED != 0));
        let in_place = !compressed && (df || !self.needs_new_cluster(st, e)?);
        let (unit, u0, u1) = if ext {
            let u = geo.unit_size();
            (u, off / u, end.div_ceil(u))
        } else {
            (cs, 0, 1)
        };
        let touched = units(u0, u1);
        let old_alloc = match (compressed, ext) {
            (true, _) => 0,
            (false, true) => bm & ALL_UNITS,
            (false, false) => u64::from(has_host && e & L2_ZERO == 0),
        };
        let old_zero = if ext && !compressed { bm >> 32 } else { 0 };

        if in_place {
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
            // The units this write and its fills touch.
            self.guard(target + u0 * unit, (u1 - u0) * unit, cstart + u0 * unit)?;
            let f = self.data_target();
            f.write_all_at(data, target + off)?;
            // Complete the units this write allocates from what they read as.
            let mut fills = Vec::new();
            if old_alloc >> u0 & 1 == 0 && off > u0 * unit {
                fills.push((u0 * unit, off));
            }
            if old_alloc >> (u1 - 1) & 1 == 0 && end < u1 * unit {
                fills.push((end, u1 * unit));
            }
            for (a, b) in fills {
                let mut buf = vec![0u8; (b - a) as usize];
                self.current(&mut buf, cstart + a, e, bm, None, below)?;
                f.write_all_at(&buf, target + a)?;
            }
            let ne = target | L2_COPIED;
            let nbm = if ext {
                (old_alloc | touched) | ((old_zero & !touched) << 32)
            } else {
                0
            };
            if (ne, nbm) != (e, bm) {
                self.set_l2_entry(table, index, ne, nbm)?;
            }
            return Ok(());
        }

        // A new cluster: copy-on-write from what the cluster reads as now.
        let dec = self.decompressed_old(e, cstart)?;
        let write_units = match (ext, compressed) {
            (false, _) => 1,
            (true, true) => ALL_UNITS,
            (true, false) => old_alloc | touched,
        };
        let mut buf = vec![0u8; cs as usize];
        let nunits = if ext { 32 } else { 1 };
        for k in (0..nunits).filter(|k| write_units >> k & 1 != 0) {
            let (a, b) = (k * unit, (k + 1) * unit);
            if a >= off && b <= end {
                continue;
            }
            self.current(
                &mut buf[a as usize..b as usize],
                cstart + a,
                e,
                bm,
                dec.as_deref(),
                below,
            )?;
        }
        buf[off as usize..end as usize].copy_from_slice(data);
        let new = self.alloc_cluster(st)?;
        self.guard(new, cs, cstart)?;
        let mut k = 0;
        while k < nunits {
            if write_units >> k & 1 == 0 {
                k += 1;
                continue;
            }
            let first = k;
            while k < nunits && write_units >> k & 1 != 0 {
                k += 1;
            }
            let (a, b) = ((first * unit) as usize, (k * unit) as usize);
            self.file.write_all_at(&buf[a..b], new + a as u64)?;
        }
        let nbm = if ext {
            write_units | ((old_zero & !write_units) << 32)
        } else {
            0
        };
        self.set_l2_entry(table, index, new | L2_COPIED, nbm)?;
        if compressed || host != 0 {
            self.release(st, e)?;
        }
        Ok(())
    }

    /// Makes the whole cluster at `pos` read as zeros.
    fn zero_cluster(&self, pos: u64, below: &dyn Below) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let df = self.data_file.is_some();
        let v2 = self.header.version < 3;
        if v2 && self.w().has_backing {
            // No zero flag in v2: zeros must be stored to hide the backing file.
            let n = cs.min(self.header.size - pos) as usize;
            return self.write_cluster(&vec![0u8; n], pos, below);
        }
        let mut st = self.lock_clusters(pos >> geo.cluster_bits, 1);
        let l1e = self.l1.read()[(pos / geo.l2_coverage()) as usize];
        if l1e & OFFSET_MASK == 0 && !self.w().has_backing {
            return Ok(());
        }
        let (table, index) = self.ensure_l2(&mut st, pos)?;
        let (e, bm) = self.l2_entry(table, index)?;
        let (ne, nbm) = match (v2, geo.extended) {
            (true, _) => (0, 0),
            (false, true) => (0, ALL_UNITS << 32),
            (false, false) => (L2_ZERO, 0),
        };
        if (e, bm) == (ne, nbm) {
            return Ok(());
        }
        self.guard_old_data(e, pos)?;
        self.set_l2_entry(table, index, ne, nbm)?;
        if let Some(d) = &self.data_file {
            // Under the mutex: a data file's cluster is reused at once, at
            // the same guest offset, by the next write into it.
            d.punch_hole(pos, cs)?;
        }
        if !df {
            self.release(&mut st, e)?;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `pos` inside one cluster of an image with
    /// subclusters: whole subclusters by their zero bits, the rest by writes.
    fn zero_subclusters(&self, pos: u64, len: u64, below: &dyn Below) -> Result<()> {
        let geo = self.geo;
        let (cs, unit) = (geo.cluster_size(), geo.unit_size());
        let (off, end) = (pos % cs, pos % cs + len);
        let (a, b) = (off.div_ceil(unit) * unit, end / unit * unit);
        let cstart = pos - off;
        let zeros = |from: u64, to: u64| -> Result<()> {
            if from < to {
                self.write_cluster(&vec![0u8; (to - from) as usize], cstart + from, below)?;
            }
            Ok(())
        };
        if a >= b {
            return zeros(off, end);
        }
        {
            let mut st = self.lock_clusters(pos >> geo.cluster_bits, 1);
            let (table, index) = self.ensure_l2(&mut st, pos)?;
            let (e, bm) = self.l2_entry(table, index)?;
            if e & L2_COMPRESSED != 0 {
                drop(st);
                return zeros(off, end);
            }
            let mask = units(a / unit, b / unit);
            let alloc = bm & ALL_UNITS & !mask;
            let zero = (bm >> 32) | mask;
            let df = self.data_file.is_some();
            let drop_host = alloc == 0 && !df && e & OFFSET_MASK != 0;
            let ne = if drop_host { 0 } else { e };
            if (ne, alloc | zero << 32) != (e, bm) {
                if drop_host {
                    self.guard_old_data(e, pos)?;
                }
                self.set_l2_entry(table, index, ne, alloc | zero << 32)?;
                if drop_host {
                    self.release(&mut st, e)?;
                }
                if let Some(d) = &self.data_file {
                    d.punch_hole(cstart + a, b - a)?;
                }
            }
        }
        zeros(off, a)?;
        zeros(b, end)
    }
}

impl WriteLayer for Qcow2 {
    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        self.w().map.refuse_if_tripped()?;
        let cs = self.geo.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = &buf[done..];
            let n = self
                .write_in_place_run(rest, pos)
                .map_err(|e| e.at_guest(pos))?;
            if n > 0 {
                done += n;
                continue;
            }
            let whole = rest.len() as u64 / cs * cs;
            let n = if pos % cs == 0 && whole > 0 && self.data_file.is_none() {
                self.write_new_clusters(&rest[..whole as usize], pos, below)
            } else {
                let n = ((cs - pos % cs) as usize).min(rest.len());
                self.write_partial(&rest[..n], pos, below).map(|()| n)
            };
            done += n.map_err(|e| e.at_guest(pos))?;
        }
        self.flush_if_due()
    }

    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        self.w().map.refuse_if_tripped()?;
        let cs = self.geo.cluster_size();
        let size = self.header.size;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let cend = (pos - pos % cs + cs).min(size);
            let n = cend.min(end) - pos;
            let r = if pos % cs == 0 && pos + n == cend {
                self.zero_cluster(pos, below)
            } else if self.geo.extended {
                self.zero_subclusters(pos, n, below)
            } else {
                self.write_cluster(&vec![0u8; n as usize], pos, below)
            };
            r.map_err(|e| e.at_guest(pos))?;
            pos += n;
        }
        self.flush_if_due()
    }

    fn metadata_maps(&self) -> Vec<&MetadataMap> {
        vec![&self.w().map]
    }

    fn flush(&self) -> Result<()> {
        // Frees noted before the flush have their reference removals in it.
        let frees = self.w().state.lock().take_deferred();
        // Guest data in a data file first (HostFile::flush_first), then the
        // image with the tables.
        self.file.flush_ordered()?;
        if frees.is_empty() {
            return Ok(());
        }
        // Every read or lock-free write that may have looked up a removed
        // reference started before now: wait for them, without the
        // allocation mutex (writers keep allocating meanwhile).
        self.quiesce();
        // Clusters losing their last reference are punched while their
        // refcount still holds them (nobody can allocate them), again
        // without the mutex; then the refcounts are lowered.
        let last = self.w().state.lock().last_references(&self.file, &frees)?;
        for &c in &last {
            let cb = self.geo.cluster_bits;
            self.file.punch_hole(c << cb, 1 << cb)?;
        }
        let mut st = self.w().state.lock();
        for c in frees {
            if last.binary_search(&c).is_ok() {
                st.decref_punched(&self.file, &self.caches, self.cache_id, c)?;
            } else {
                st.decref(&self.file, &self.caches, self.cache_id, c)?;
            }
        }
        Ok(())
    }
}

impl Qcow2 {
    /// Host clusters freed (refcount dropped to 0) since the image was opened.
    pub fn clusters_freed(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.state.lock().freed)
    }
}

impl Drop for Qcow2 {
    /// Closing writes out the queued metadata (after the data file) and
    /// applies the deferred frees, as a flush does.
    fn drop(&mut self) {
        if self.writer.is_some() {
            if let Err(e) = self.flush() {
                log::error!("{}: final flush failed: {e}", self.file.path().display());
            }
        }
    }
}
