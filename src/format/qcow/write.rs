//! In-place writes into qcow version 1 images.
//!
//! qcow v1 has no refcounts and no zero flag. Like qemu, new clusters and
//! new L2 tables are appended at the end of the file, rounded up to the
//! cluster size; space is never reused, so a crash or a failed write
//! leaves at most leaked space. Data and new (zeroed) L2 tables are
//! written at once; L2 and L1 entries are ordered writes
//! ([`crate::engine::order`], stage Map), written after a barrier, so on
//! disk, even after a power cut, an entry never exists without what it
//! points at. [`WriteLayer::flush`] makes everything durable.
//!
//! Zeroing: without a backing file, whole clusters are unlinked (entry 0),
//! and the host space is punched only for clusters this writer allocated
//! (qcow v1 has no refcounts to prove an older cluster is not shared);
//! with one, allocated clusters are zeroed in place and others get new,
//! never-written (so zero) clusters. Partial clusters go through writes.
//!
//! Writes into clusters that are already allocated uncompressed go
//! straight to the host file, without a lock. Everything else takes the
//! allocation lock to decide: it reserves host space for a run of
//! clusters and marks their guest clusters *pending*, then, without the
//! lock, fills the clusters (copy-on-write from the compressed data or the
//! layers below where the write does not cover a cluster) and writes them;
//! then, under the lock again, it writes the L2 entries and republishes
//! the table in the metadata cache. Any other allocation or deallocation
//! touching a pending cluster waits for it, so two first writes into one
//! cluster both land. Compressed clusters that are written become normal
//! clusters; their compressed bytes are leaked, as qemu does.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::header::Header;
use super::table::{raw_entry, Entry, Tables};
use super::Qcow;
use crate::endian::{be64_bytes, put_be64};
use crate::engine::append::{round_up, AppendState, Appender};
use crate::engine::cow::{fill_from_below, write_new_run, NewRun};
use crate::engine::order::Stage;
use crate::engine::overlap::{MetadataMap, Structure};
use crate::engine::units::{GuestOffset, HostOffset};
use crate::error::{Error, Result};
use crate::format::{Below, CompressedBlock, Layer, WriteLayer};
use crate::host::HostFile;

/// Largest run of clusters allocated (and written) at once.
const MAX_RUN_BYTES: u64 = 1 << 20;

/// The allocation state of a writable image.
pub struct Writer {
    /// The allocation frontier and the guest clusters being allocated.
    alloc: Appender,
    /// Metadata ranges no data write may touch: the header and backing
    /// name, the L1 table, every L2 table.
    map: MetadataMap,
}

/// What one allocation run reserved.
struct Run {
    l2_offset: u64,
    /// Index of the first entry in its L2 table.
    idx: usize,
    /// Guest offset of the first cluster.
    guest: u64,
    /// Old entries of the run's clusters.
    old: Vec<Entry>,
    /// Host offset of the run's first new cluster.
    host: u64,
}

impl Writer {
    /// The write state for `file`; refuses what cannot be written in place.
    pub fn new(file: &HostFile, header: &Header, tables: &Tables) -> Result<Writer> {
        if !file.is_regular_file()? {
            return Err(Error::unsupported(
                "qcow images on devices cannot be written in place (new clusters are appended \
                 at the end of the file); use --overlay FILE or --snapshot",
            ));
        }
        let cluster = header.cluster_size();
        // New space starts at the end of the file, rounded up to a
        // cluster, and past any L2 table the end of the file cuts short
        // (its missing entries may be written).
        let l2_bytes = tables.geometry().l2_bytes();
        let mut end = file.len();
        for l2 in tables.l1_entries() {
            if l2 != 0 && l2 < file.len() {
                end = end.max(l2 + l2_bytes);
            }
        }
        let frontier = round_up(end, cluster)
            .ok_or_else(|| Error::corrupt("the image file is too large to grow"))?;
        let map = MetadataMap::new(file.path());
        map.add(0, super::header::HEADER_LEN as u64, Structure::Header);
        map.add(
            header.backing_file_offset,
            u64::from(header.backing_file_size),
            Structure::Header,
        );
        map.add(
            header.l1_table_offset,
            tables.l1_len() as u64 * 8,
            Structure::L1Table,
        );
        for l2 in tables.l1_entries().filter(|&o| o != 0) {
            map.add(l2, l2_bytes, Structure::L2Table);
        }
        Ok(Writer {
            map,
            alloc: Appender::new(frontier, i64::MAX as u64),
        })
    }
}

impl Qcow {
    fn writer(&self) -> &Writer {
        self.writer
            .as_ref()
            .expect("write called on a qcow layer opened read-only")
    }

    fn cluster_size(&self) -> u64 {
        self.tables.geometry().cluster_size()
    }

    /// Reserves `len` bytes at the allocation frontier.
    fn reserve(&self, st: &mut AppendState, len: u64) -> Result<u64> {
        let host = st
            .reserve(len, self.cluster_size())
            .ok_or_else(|| Error::corrupt("the image file cannot grow any further"))?
            .get();
        self.end.fetch_max(host + len, Ordering::AcqRel);
        Ok(host)
    }

    /// The L2 table offset for guest `pos`, allocating a zeroed table
    /// (table written, then the L1 entry) when there is none. Under the lock.
    fn ensure_l2(&self, st: &mut AppendState, pos: u64) -> Result<u64> {
        let g = self.tables.geometry();
        let current = self
            .tables
            .l1_entry(pos)
            .ok_or_else(|| Error::corrupt("guest offset beyond the L1 table"))?;
        if current != 0 {
            return Ok(current);
        }
        let bytes = g.l2_bytes();
        let space = round_up(bytes, g.cluster_size()).expect("L2 tables are small");
        let host = self.reserve(st, space)?;
        self.writer().map.add(host, bytes, Structure::L2Table);
        let zeros: Arc<[u8]> = vec![0u8; bytes as usize].into();
        self.file.write_all_at(&zeros, host)?;
        let idx = g.l1_index(pos);
        self.file.write_ordered_at(
            &be64_bytes(host),
            self.header.l1_table_offset + idx * 8,
            Stage::Map,
        )?;
        self.tables.set_l1_entry(idx as usize, host);
        self.tables.publish_l2(host, Some(zeros));
        Ok(host)
    }

    /// The L2 table covering `pos`: `None` when the L1 entry is empty.
    fn l2_for(&self, pos: u64) -> Result<Option<(u64, Arc<[u8]>)>> {
        let l2 = self
            .tables
            .l1_entry(pos)
            .ok_or_else(|| Error::corrupt("guest offset beyond the L1 table"))?;
        if l2 == 0 {
            return Ok(None);
        }
        let t = self.tables.l2_table(&self.file, l2, self.end())?;
        Ok(Some((l2, t)))
    }

    /// Checks that a data cluster may be written in place.
    fn check_writable_data(&self, host: u64) -> Result<()> {
        self.check_data(host)?;
        let first_own = self.writer().alloc.first_own().get();
        let cs = self.cluster_size();
        if host < first_own && host + cs > first_own {
            return Err(Error::corrupt(format!(
                "L2 entry points at host offset {host:#x}, a cluster overlapping the end of the file"
            )));
        }
        Ok(())
    }

    /// Writes the start of `buf` at guest `pos`; returns the bytes written
    /// (0: the state changed, try again).
    fn write_some(&self, buf: &[u8], pos: u64, below: &dyn Below, zeros: bool) -> Result<usize> {
        let g = self.tables.geometry();
        let cs = g.cluster_size();
        if let Some((_, table)) = self.l2_for(pos)? {
            let idx = g.l2_index(pos);
            if let Entry::Data(host) = g.decode(raw_entry(&table, idx)) {
                self.check_writable_data(host)?;
                // Extend over following clusters stored right after it.
                let in_c = g.in_cluster(pos);
                let mut n = (cs - in_c).min(buf.len() as u64);
                let mut k = 1;
                while n < buf.len() as u64 && idx + k < g.l2_entries() as usize {
                    let next = host + k as u64 * cs;
                    if g.decode(raw_entry(&table, idx + k)) != Entry::Data(next)
                        || self.check_writable_data(next).is_err()
                    {
                        break;
                    }
                    n = (n + cs).min(buf.len() as u64);
                    k += 1;
                }
                self.writer()
                    .map
                    .guard(HostOffset(host + in_c), n, GuestOffset(pos))?;
                let n = n as usize;
                self.file.write_all_at(&buf[..n], host + in_c)?;
                return Ok(n);
            }
        }
        self.allocate_and_write(buf, pos, below, zeros)
    }

    /// The allocation path: see the module documentation.
    fn allocate_and_write(
        &self,
        buf: &[u8],
        pos: u64,
        below: &dyn Below,
        zeros: bool,
    ) -> Result<usize> {
        let w = self.writer();
        let g = self.tables.geometry();
        let cs = g.cluster_size();
        let cluster_start = pos - g.in_cluster(pos);
        let buf_end = pos + buf.len() as u64;
        let run = {
            let mut st = w.alloc.lock();
            if st.is_pending(pos >> g.cluster_bits) {
                w.alloc.wait(&mut st);
                return Ok(0);
            }
            let l2_offset = self.ensure_l2(&mut st, pos)?;
            let table = self.tables.l2_table(&self.file, l2_offset, self.end())?;
            let idx = g.l2_index(pos);
            let first = g.decode(raw_entry(&table, idx));
            if matches!(first, Entry::Data(_)) {
                return Ok(0);
            }
            let mut old = vec![first];
            let max = (MAX_RUN_BYTES / cs).max(1) as usize;
            while old.len() < max
                && idx + old.len() < g.l2_entries() as usize
                && cluster_start + (old.len() as u64) * cs < buf_end
            {
                let e = g.decode(raw_entry(&table, idx + old.len()));
                let c = (cluster_start >> g.cluster_bits) + old.len() as u64;
                if matches!(e, Entry::Data(_)) || st.is_pending(c) {
                    break;
                }
                old.push(e);
            }
            let host = self.reserve(&mut st, old.len() as u64 * cs)?;
            let first_c = cluster_start >> g.cluster_bits;
            let claim = w.alloc.claim(&mut st, first_c..first_c + old.len() as u64);
            let run = Run {
                l2_offset,
                idx,
                guest: cluster_start,
                old,
                host,
            };
            (run, claim)
        };
        let (run, _claim) = run;
        self.fill_and_publish(&run, buf, pos, below, zeros)
    }

    /// Fills and writes the clusters of a reserved run, then points their
    /// L2 entries at them. Returns the bytes of `buf` written.
    fn fill_and_publish(
        &self,
        run: &Run,
        buf: &[u8],
        pos: u64,
        below: &dyn Below,
        zeros: bool,
    ) -> Result<usize> {
        let g = self.tables.geometry();
        let cs = g.cluster_size();
        let count = run.old.len() as u64;
        let vsize = self.virtual_size();
        let new_run = NewRun {
            guest: GuestOffset(run.guest),
            host: HostOffset(run.host),
            count,
            unit: cs,
        };
        let n = write_new_run(
            &self.file,
            &self.writer().map,
            new_run,
            vsize,
            buf,
            GuestOffset(pos),
            zeros,
            &mut |k, c, out| match run.old[k] {
                Entry::Compressed { offset, size } => {
                    self.cluster_from_compressed(c.get(), offset, size, out)
                }
                _ => fill_from_below(below, c, out, vsize),
            },
        )?;
        // Point the entries at the written clusters (under the lock: all
        // table changes are serialised).
        let _st = self.writer().alloc.lock();
        let table = self
            .tables
            .l2_table(&self.file, run.l2_offset, self.end())?;
        let mut t = table.to_vec();
        for k in 0..count as usize {
            let at = (run.idx + k) * 8;
            put_be64(&mut t, at, run.host + k as u64 * cs);
        }
        let span = run.idx * 8..(run.idx + count as usize) * 8;
        let written = self.file.write_ordered_at(
            &t[span.clone()],
            run.l2_offset + span.start as u64,
            Stage::Map,
        );
        match written {
            Ok(()) => self.tables.publish_l2(run.l2_offset, Some(t.into())),
            Err(e) => {
                self.tables.publish_l2(run.l2_offset, None);
                return Err(e);
            }
        }
        Ok(n)
    }

    /// Decompresses the compressed cluster at guest `guest` into `out`.
    fn cluster_from_compressed(
        &self,
        guest: u64,
        offset: u64,
        size: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let key = (self.cache_id, offset);
        if let Some(d) = self.tables.caches().blocks.get(key) {
            if d.len() == out.len() {
                out.copy_from_slice(&d);
                return Ok(());
            }
        }
        let block = CompressedBlock {
            guest_start: guest,
            len: self.cluster_size(),
            key: offset,
            host_offset: offset,
            host_len: size,
        };
        self.decompress(&block, out)
    }

    /// Makes whole clusters `[pos, end)` (inside one L2 table) read as
    /// zeros in an image without a backing file: their entries become 0,
    /// and host space this writer allocated is punched.
    fn deallocate(&self, pos: u64, end: u64) -> Result<u64> {
        let w = self.writer();
        let g = self.tables.geometry();
        let cs = g.cluster_size();
        let table_end = (g.l1_index(pos) + 1) << (g.cluster_bits + g.l2_bits);
        let end = end.min(table_end);
        let mut st = w.alloc.lock();
        let Some(l2_offset) = self.tables.l1_entry(pos).filter(|&o| o != 0) else {
            return Ok(end - pos);
        };
        let count = (end - pos).div_ceil(cs);
        let first_c = pos >> g.cluster_bits;
        w.alloc.wait_for(&mut st, first_c..first_c + count);
        let table = self.tables.l2_table(&self.file, l2_offset, self.end())?;
        let idx = g.l2_index(pos);
        let mut t = table.to_vec();
        let mut punch = Vec::new();
        for k in 0..count as usize {
            let raw = raw_entry(&table, idx + k);
            if let Entry::Data(h) = g.decode(raw) {
                if h >= w.alloc.first_own().get() {
                    w.map
                        .guard(HostOffset(h), cs, GuestOffset(pos + k as u64 * cs))?;
                    punch.push(h);
                }
            }
            t[(idx + k) * 8..(idx + k + 1) * 8].fill(0);
        }
        if t[..] != table[..] {
            let span = idx * 8..(idx + count as usize) * 8;
            let written = self.file.write_ordered_at(
                &t[span.clone()],
                l2_offset + span.start as u64,
                Stage::Map,
            );
            match written {
                Ok(()) => self.tables.publish_l2(l2_offset, Some(t.into())),
                Err(e) => {
                    self.tables.publish_l2(l2_offset, None);
                    return Err(e);
                }
            }
        }
        drop(st);
        punch_runs(&self.file, &mut punch, cs)?;
        Ok(end - pos)
    }

    fn write_zeroes_inner(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        let g = self.tables.geometry();
        let cs = g.cluster_size();
        let vsize = self.virtual_size();
        let end = offset + len;
        let no_backing = self.backing.is_none();
        let zeros = vec![0u8; MAX_RUN_BYTES.max(cs) as usize];
        let mut pos = offset;
        while pos < end {
            let c = pos - g.in_cluster(pos);
            let whole = pos == c && end >= (c + cs).min(vsize);
            if !whole {
                let piece_end = end.min(c + cs);
                if no_backing {
                    let unallocated = match self.l2_for(pos)? {
                        None => true,
                        Some((_, t)) => {
                            g.decode(raw_entry(&t, g.l2_index(pos))) == Entry::Unallocated
                        }
                    };
                    if unallocated {
                        pos = piece_end;
                        continue;
                    }
                }
                let n = (piece_end - pos) as usize;
                let mut done = 0;
                while done < n {
                    done += self.write_some(&zeros[..n - done], pos + done as u64, below, true)?;
                }
                pos = piece_end;
                continue;
            }
            // A run of whole clusters: up to the last cluster boundary
            // (or the end of the disk) inside the range.
            let whole_end = if end >= vsize {
                end
            } else {
                end - g.in_cluster(end)
            };
            if no_backing {
                pos += self.deallocate(pos, whole_end)?;
                continue;
            }
            let n = (whole_end - pos).min(zeros.len() as u64) as usize;
            // Allocated clusters are zeroed in place (a hole punched
            // there reads as zeros); the rest get new zeroed clusters.
            if let Some((_, table)) = self.l2_for(pos)? {
                if let Entry::Data(h) = g.decode(raw_entry(&table, g.l2_index(pos))) {
                    self.check_writable_data(h)?;
                    self.writer()
                        .map
                        .guard(HostOffset(h), cs, GuestOffset(pos))?;
                    self.file.punch_hole(h, cs)?;
                    pos += cs;
                    continue;
                }
            }
            let done = self.write_some(&zeros[..n], pos, below, true)?;
            pos += done as u64;
        }
        Ok(())
    }
}

/// Punches the host clusters at `hosts` (merging adjacent ones).
fn punch_runs(file: &HostFile, hosts: &mut [u64], cs: u64) -> Result<()> {
    hosts.sort_unstable();
    let mut i = 0;
    while i < hosts.len() {
        let start = hosts[i];
        let mut len = cs;
        while i + 1 < hosts.len() && hosts[i + 1] == start + len {
            len += cs;
            i += 1;
        }
        file.punch_hole(start, len)?;
        i += 1;
    }
    Ok(())
}

impl WriteLayer for Qcow {
    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        self.writer().map.refuse_if_tripped()?;
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            done += self
                .write_some(&buf[done..], pos, below, false)
                .map_err(|e| e.at_guest(pos))?;
        }
        self.file.flush_ordered_if_due()
    }

    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        self.writer().map.refuse_if_tripped()?;
        self.write_zeroes_inner(offset, len, below)
            .map_err(|e| e.at_guest(offset))?;
        self.file.flush_ordered_if_due()
    }

    fn flush(&self) -> Result<()> {
        self.file.flush_ordered()
    }

    fn metadata_maps(&self) -> Vec<&MetadataMap> {
        vec![&self.writer().map]
    }
}

impl Qcow {}
