//! Writing qcow2 images in place ([`WriteLayer`]): the open checks, the
//! writer's state, the lock-free in-place path and the flush. First writes
//! are in `first_write` (one cluster) and `batch` (whole clusters),
//! zeroing in `zero`.
//!
//! **Locking.** One mutex (`Writer::state`, holding the [`Alloc`] refcount
//! state) serialises every change of metadata: allocation, refcounts, L1
//! and L2 entries. It is never held across guest data I/O:
//! - A write into clusters that already belong to the active image alone
//!   (L2 entry flagged COPIED, every touched subcluster allocated) takes
//!   only a shared `gate` and goes straight to the host file,
//!   host-contiguous clusters in one `pwrite`.
//! - Any other write (a first write, copy-on-write from the layers below,
//!   a compressed or snapshot-shared cluster, unallocated subclusters, a
//!   data file's cluster not yet in its entry) decides under the mutex
//!   where its bytes go (allocating when needed), marks its guest clusters
//!   in flight ([`crate::engine::inflight`]), writes data and fill without
//!   the mutex, and publishes the entries under it again. Every metadata
//!   change of a cluster first waits until the cluster is not in flight,
//!   so a slow fill blocks only writers of the same cluster — for every
//!   variant: standard and extended L2 entries, data in the image or in
//!   an external data file.
//! - A dropped reference is only noted; the flush that lowers the
//!   refcounts first calls [`Qcow2::quiesce`] (the gate taken
//!   exclusively, so any read or lock-free write that looked up the old
//!   entry has finished), then punches the clusters that lose their last
//!   reference, both without the mutex; only the refcount updates take it.
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

use parking_lot::{Mutex, MutexGuard};

use crate::engine::inflight::InFlight;
use crate::engine::overlap::MetadataMap;
use crate::engine::reclaim::ReadGate;
use crate::engine::units::{GuestCluster, GuestOffset, HostCluster, HostOffset};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{Below, WriteLayer};
use crate::host::HostFile;

use super::alloc::Alloc;
use super::header::{Header, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::tables::{compressed_descriptor, L2_COMPRESSED, L2_COPIED, L2_ZERO, OFFSET_MASK};
use super::Qcow2;

/// All 32 subclusters.
pub(super) const ALL_UNITS: u64 = 0xffff_ffff;

/// The write side of an open image.
pub(super) struct Writer {
    pub(super) state: Mutex<Alloc>,
    /// Pinned by readers and lock-free in-place writes; see [`ReadGate`].
    pub(super) gate: ReadGate,
    /// Guest clusters being written outside the mutex.
    pub(super) inflight: InFlight,
    pub(super) has_backing: bool,
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
            inflight: InFlight::new(),
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
        self.state
            .lock()
            .get(&q.file, HostOffset(host).cluster(q.geo.cluster_bits))
    }
}

/// Subcluster bits `[a, b)` of a bitmap.
pub(super) fn units(a: u64, b: u64) -> u64 {
    (ALL_UNITS >> (32 - (b - a))) << a
}

impl Qcow2 {
    pub(super) fn w(&self) -> &Writer {
        self.writer
            .as_ref()
            .expect("write calls only reach writable layers")
    }

    /// Checks a data write of `len` bytes at host `host` (guest `guest`)
    /// into the image file against its metadata map (a data file holds
    /// no metadata).
    pub(super) fn guard(&self, host: HostOffset, len: u64, guest: GuestOffset) -> Result<()> {
        match &self.writer {
            Some(w) if self.data_file.is_none() => w.map.guard(host, len, guest),
            _ => Ok(()),
        }
    }

    /// Before an entry stops pointing at its data cluster (which may then
    /// be freed): that cluster must not be metadata.
    pub(super) fn guard_old_data(&self, e: u64, pos: u64) -> Result<()> {
        let host = e & OFFSET_MASK;
        if e & L2_COMPRESSED != 0 || host == 0 {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        self.guard(HostOffset(host), cs, GuestOffset(pos - pos % cs))
    }

    /// The file guest data lives in.
    pub(super) fn data_target(&self) -> &HostFile {
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
    pub(super) fn write_cluster(&self, data: &[u8], pos: u64, below: &dyn Below) -> Result<()> {
        // Inside one cluster the lock-free path writes all of it or nothing.
        if self.write_in_place_run(data, pos)? > 0 {
            return Ok(());
        }
        self.write_partial(data, pos, below)
    }

    /// Whether a write into the cluster with entry `e` needs a new host
    /// cluster (no data file): it is compressed, unallocated, or shared
    /// with a snapshot.
    pub(super) fn needs_new_cluster(&self, st: &mut Alloc, e: u64) -> Result<bool> {
        let host = e & OFFSET_MASK;
        Ok(e & L2_COMPRESSED != 0
            || host == 0
            || st.get(&self.file, HostOffset(host).cluster(self.geo.cluster_bits))? != 1)
    }

    /// Takes the allocation mutex once none of the guest clusters
    /// `first..first + count` is in flight.
    pub(super) fn lock_clusters(&self, first: u64, count: u64) -> MutexGuard<'_, Alloc> {
        let w = self.w();
        w.inflight.lock_idle(&w.state, GuestCluster(first), count)
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
            self.guard(HostOffset(s), n as u64, GuestOffset(pos))?;
            self.data_target().write_all_at(&data[..n], s)?;
        }
        Ok(n)
    }
    /// Drops the references entry `e` held (after it was replaced by an
    /// ordered write): the refcounts are lowered after the next flush.
    pub(super) fn release(&self, st: &mut Alloc, e: u64) -> Result<()> {
        let cb = self.geo.cluster_bits;
        if e & L2_COMPRESSED != 0 {
            let (off, len) = compressed_descriptor(e, cb)?;
            for c in ((off & !511) >> cb)..=((off + len - 1) >> cb) {
                st.decref_later(HostCluster(c));
            }
            self.caches.blocks.remove((self.cache_id, off));
        } else if e & OFFSET_MASK != 0 && self.data_file.is_none() {
            st.decref_later(HostOffset(e & OFFSET_MASK).cluster(cb));
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
            self.file.punch_hole(c.offset(cb).get(), 1 << cb)?;
        }
        let mut st = self.w().state.lock();
        for c in frees {
            let punched = last.binary_search(&c).is_ok();
            st.decref(&self.file, &self.caches, self.cache_id, c, punched)?;
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
