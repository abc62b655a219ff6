//! L1 and L2 table updates for the write path.
//!
//! Tables are written through: an entry change is one `pwrite` of the
//! entry's bytes, then the cached slice holding it is replaced (never
//! patched in place, readers may hold it). New L2 tables are written whole
//! before the L1 entry naming them. Callers hold the allocation mutex.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::endian::{be64, be64_bytes, put_be64};
use crate::engine::order::Stage;
use crate::engine::overlap::Structure;
use crate::error::{Error, Result};

use crate::engine::units::{HostCluster, HostOffset};

use super::alloc::Alloc;
use super::tables::{entry_at, L2_COMPRESSED, L2_COPIED, OFFSET_MASK};
use super::Qcow2;

impl Qcow2 {
    /// Replaces the cached bytes at table offset `off` after a disk write.
    pub(super) fn cache_put(&self, off: u64, bytes: Arc<[u8]>) {
        self.published
            .publish(&self.caches.meta, (self.cache_id, off), Some(bytes));
    }

    fn slice_bytes(&self) -> u64 {
        self.geo.slice_entries() * self.geo.entry_bytes
    }

    /// Entry `index` (and its subcluster bitmap) of the L2 table at `table`.
    pub(super) fn l2_entry(&self, table: u64, index: u64) -> Result<(u64, u64)> {
        let per = self.geo.slice_entries();
        let s = self.l2_slice(table, index / per)?;
        Ok(entry_at(&s, (index % per) as usize, &self.geo))
    }

    /// Writes entry `index` of the L2 table at `table`: disk, then cache.
    pub(super) fn set_l2_entry(&self, table: u64, index: u64, e: u64, bm: u64) -> Result<()> {
        self.set_l2_entries(table, index, &[(e, bm)])
    }

    /// Writes consecutive entries from `index` on (entry, subcluster
    /// bitmap), all inside one cached slice, in one `pwrite`.
    pub(super) fn set_l2_entries(&self, table: u64, index: u64, ents: &[(u64, u64)]) -> Result<()> {
        let per = self.geo.slice_entries();
        let first = index % per;
        if first + ents.len() as u64 > per {
            return Err(Error::corrupt(format!(
                "internal: {} L2 entries from index {index} cross a table slice",
                ents.len()
            )));
        }
        let slice_off = table + (index / per) * self.slice_bytes();
        let mut v = self.l2_slice(table, index / per)?.to_vec();
        let eb = self.geo.entry_bytes as usize;
        let at0 = first as usize * eb;
        for (i, &(e, bm)) in ents.iter().enumerate() {
            let at = at0 + i * eb;
            put_be64(&mut v, at, e);
            if self.geo.extended {
                put_be64(&mut v, at + 8, bm);
            }
        }
        // Ordered: the entries point at data and clusters written and
        // counted before (engine::order).
        self.file.write_ordered_at(
            &v[at0..at0 + ents.len() * eb],
            slice_off + at0 as u64,
            Stage::Map,
        )?;
        self.cache_put(slice_off, v.into());
        Ok(())
    }

    /// Writes a whole L2 table at `table` and caches its slices.
    fn write_l2_table(&self, table: u64, content: &[u8]) -> Result<()> {
        self.file.write_all_at(content, table)?;
        let sb = self.slice_bytes() as usize;
        for (i, chunk) in content.chunks(sb).enumerate() {
            self.cache_put(table + (i * sb) as u64, chunk.into());
        }
        Ok(())
    }

    /// Writes L1 entry `idx` (ordered: after the table it points at), then
    /// the in-memory table.
    fn set_l1_entry(&self, idx: usize, e: u64) -> Result<()> {
        let at = self.header.l1_table_offset + idx as u64 * 8;
        self.file.write_ordered_at(&be64_bytes(e), at, Stage::Map)?;
        self.l1.write()[idx] = e;
        Ok(())
    }

    /// Allocates one host cluster in the image file (refcount 1 on disk).
    pub(super) fn alloc_cluster(&self, st: &mut Alloc) -> Result<HostOffset> {
        let at = st.alloc(&self.file, &self.caches, self.cache_id)?;
        self.file_end.fetch_max(st.end_bytes(), Ordering::AcqRel);
        Ok(at)
    }

    /// Allocates up to `want` host-contiguous clusters (at least one):
    /// the first one's offset and how many.
    pub(super) fn alloc_clusters(&self, st: &mut Alloc, want: u64) -> Result<(HostOffset, u64)> {
        let run = st.alloc_run(&self.file, &self.caches, self.cache_id, want)?;
        self.file_end.fetch_max(st.end_bytes(), Ordering::AcqRel);
        Ok(run)
    }

    /// Waits until no read and no lock-free in-place write that may have
    /// seen a reference dropped before this call is still running. Called
    /// by the flush that frees the clusters of removed references, before
    /// any of them may become free, without the allocation mutex.
    pub(super) fn quiesce(&self) {
        if let Some(w) = &self.writer {
            w.gate.wait_for_readers();
        }
    }

    /// The L2 table covering guest `pos`, ready for entry updates (refcount
    /// 1, L1 entry flagged COPIED): allocated when missing, copied when
    /// shared with a snapshot. Returns the table offset and entry index.
    pub(super) fn ensure_l2(&self, st: &mut Alloc, pos: u64) -> Result<(u64, u64)> {
        let geo = self.geo;
        let l1i = (pos / geo.l2_coverage()) as usize;
        let index = (pos >> geo.cluster_bits) % geo.l2_entries;
        let l1e = self.l1.read().get(l1i).copied().ok_or_else(|| {
            Error::corrupt(format!("guest offset {pos:#x} lies beyond the L1 table"))
        })?;
        let cs = geo.cluster_size();
        let table = l1e & OFFSET_MASK;
        let map = &self
            .writer
            .as_ref()
            .expect("writes reach writable layers")
            .map;
        if table == 0 {
            let new = self.alloc_cluster(st)?.get();
            map.add(new, cs, Structure::L2Table);
            self.write_l2_table(new, &vec![0u8; cs as usize])?;
            self.set_l1_entry(l1i, new | L2_COPIED)?;
            return Ok((new, index));
        }
        // Validates alignment and bounds.
        self.l2_table(pos)?;
        if l1e & L2_COPIED != 0 {
            return Ok((table, index));
        }
        if st.get(&self.file, HostCluster(table >> geo.cluster_bits))? == 1 {
            self.set_l1_entry(l1i, table | L2_COPIED)?;
            return Ok((table, index));
        }
        // Shared with a snapshot: copy the table. The data clusters it
        // names stay shared (their refcounts already count both trees), so
        // no entry of the copy may claim refcount 1.
        let mut content = vec![0u8; cs as usize];
        self.file.read_zero_fill_at(&mut content, table)?;
        if self.data_file.is_none() {
            for e in content.chunks_exact_mut(geo.entry_bytes as usize) {
                let v = be64(e, 0);
                if v & L2_COMPRESSED == 0 {
                    put_be64(e, 0, v & !L2_COPIED);
                }
            }
        }
        let new = self.alloc_cluster(st)?.get();
        map.add(new, cs, Structure::L2Table);
        self.write_l2_table(new, &content)?;
        self.set_l1_entry(l1i, new | L2_COPIED)?;
        // The old table stays recorded as a snapshot's L2 table, if it is one.
        map.remove(table, Structure::L2Table);
        st.decref_later(HostOffset(table).cluster(geo.cluster_bits));
        Ok((new, index))
    }
}
