//! Host cluster allocation for writes: the refcount table and blocks kept
//! in memory (loaded on demand), free-cluster search, refcount changes
//! and refcount-table growth.
//!
//! Everything here runs under the writer's allocation mutex. The
//! in-memory copy is the only one the write path consults, so the shared
//! metadata cache is never asked for refcounts while writing.
//!
//! Crash and power-loss safety (see [`crate::engine::order`]):
//! - [`Alloc::alloc_run`] raises the new clusters' refcounts with an
//!   immediate write; references to them are ordered writes, written only
//!   after a barrier. A cut before the reference is durable leaks the
//!   cluster.
//! - A missing refcount block is placed in the very cluster it is first
//!   needed for (it describes itself), written whole at once, and linked
//!   into the table by a [`Stage::Link`] write: durable before any
//!   [`Stage::Map`] entry that names a cluster it counts.
//! - Table growth writes the new blocks and the new table at once and
//!   switches the header's two fields in one Link write; the old table is
//!   freed only once that is durable.
//! - Dropping a reference: [`Alloc::decref_later`] only notes the cluster.
//!   The driver takes the notes before a flush and applies them
//!   ([`Alloc::decref`]: refcount lowered, host space punched, cluster
//!   reusable) after it, once the removal of the reference is durable.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cache::Caches;
use crate::endian::{be64_bytes, be64s, put_be32, put_be64};
use crate::engine::order::Stage;
use crate::engine::overlap::{MetadataMap, Structure, NO_GUEST};
use crate::engine::units::{HostCluster, HostOffset};
use crate::error::{Error, Result};
use crate::host::HostFile;

use super::header::Header;
use super::refcount::{rc_get, rc_set, MAX_REFCOUNT_TABLE_BYTES};
use super::tables::OFFSET_MASK;

/// Refcount state of an image opened for writing.
pub struct Alloc {
    cluster_bits: u32,
    order: u32,
    table_offset: u64,
    table: Vec<u64>,
    blocks: HashMap<u64, Box<[u8]>>,
    /// No cluster below this index is free.
    hint: u64,
    /// Allocation frontier: first cluster index past everything in use
    /// or in the file.
    end: u64,
    /// Clusters whose refcount reached zero (their host space was returned).
    pub freed: u64,
    /// Clusters that lost a reference not yet durably removed: their
    /// refcounts are lowered after the next flush.
    deferred: Vec<HostCluster>,
    /// The image's metadata ranges: refcount structures are added and
    /// removed here; no cluster in it is handed out or freed.
    map: Arc<MetadataMap>,
}

impl Alloc {
    /// Loads the refcount table of `file` described by `h`.
    pub fn open(file: &HostFile, h: &Header, map: Arc<MetadataMap>) -> Result<Alloc> {
        let cs = h.cluster_size();
        let bytes = u64::from(h.refcount_table_clusters) * cs;
        if bytes > MAX_REFCOUNT_TABLE_BYTES || bytes == 0 {
            return Err(Error::corrupt(format!(
                "refcount_table_clusters {} is outside 1..={} clusters",
                h.refcount_table_clusters,
                MAX_REFCOUNT_TABLE_BYTES / cs
            )));
        }
        if h.refcount_table_offset % cs != 0 || h.refcount_table_offset == 0 {
            return Err(Error::corrupt(format!(
                "refcount_table_offset {:#x} is not a non-zero multiple of the cluster size",
                h.refcount_table_offset
            )));
        }
        let mut raw = vec![0u8; bytes as usize];
        file.read_zero_fill_at(&mut raw, h.refcount_table_offset)?;
        let table: Vec<u64> = be64s(&raw).collect();
        for (i, &e) in table.iter().enumerate() {
            let b = e & OFFSET_MASK;
            if b % cs != 0 || (b != 0 && b >= file.len()) {
                return Err(Error::corrupt(format!(
                    "refcount table entry {i} points to a bad refcount block offset {b:#x}"
                )));
            }
            map.add(b, cs, Structure::RefcountBlock);
        }
        map.add(h.refcount_table_offset, bytes, Structure::RefcountTable);
        Ok(Alloc {
            cluster_bits: h.cluster_bits,
            order: h.refcount_order,
            table_offset: h.refcount_table_offset,
            table,
            blocks: HashMap::new(),
            hint: 0,
            end: file.len().div_ceil(cs),
            freed: 0,
            deferred: Vec::new(),
            map,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per block.
    fn entries(&self) -> u64 {
        (8u64 << self.cluster_bits) >> self.order
    }

    /// The refcount table's current offset and size in clusters.
    pub fn table_location(&self) -> (u64, u64) {
        (
            self.table_offset,
            (self.table.len() as u64 * 8) >> self.cluster_bits,
        )
    }

    /// Host bytes up to the allocation frontier.
    pub fn end_bytes(&self) -> u64 {
        self.end << self.cluster_bits
    }

    /// The refcount block at host offset `block`, loaded on first use.
    fn block(&mut self, file: &HostFile, block: u64) -> Result<&mut Box<[u8]>> {
        if !self.blocks.contains_key(&block) {
            let mut buf = vec![0u8; self.cs() as usize];
            file.read_zero_fill_at(&mut buf, block)?;
            self.blocks.insert(block, buf.into_boxed_slice());
        }
        Ok(self.blocks.get_mut(&block).expect("just inserted"))
    }

    /// The refcount of host cluster `cluster` (an index, not an offset).
    pub fn get(&mut self, file: &HostFile, cluster: HostCluster) -> Result<u64> {
        let cluster = cluster.get();
        let entries = self.entries();
        let ti = (cluster / entries) as usize;
        let Some(&te) = self.table.get(ti) else {
            return Ok(0);
        };
        let b = te & OFFSET_MASK;
        if b == 0 {
            return Ok(0);
        }
        let order = self.order;
        Ok(rc_get(self.block(file, b)?, cluster % entries, order))
    }

    /// Sets the refcount of a cluster whose refcount block exists.
    fn set(
        &mut self,
        file: &HostFile,
        caches: &Caches,
        cid: u64,
        cluster: u64,
        v: u64,
    ) -> Result<()> {
        let entries = self.entries();
        let ti = (cluster / entries) as usize;
        let b = self.table.get(ti).map_or(0, |e| e & OFFSET_MASK);
        if b == 0 {
            return Err(Error::corrupt(format!(
                "no refcount block covers host cluster {:#x}",
                cluster << self.cluster_bits
            )));
        }
        let order = self.order;
        let blk = self.block(file, b)?;
        let (at, len) = rc_set(blk, cluster % entries, order, v);
        let bytes = blk[at..at + len].to_vec();
        file.write_all_at(&bytes, b + at as u64)?;
        // Readers of RefcountLayout (read-only opens) use this key.
        caches.meta.remove((cid, b | 1));
        Ok(())
    }

    /// Notes that a reference to `cluster` was removed (by an ordered
    /// write): its refcount is lowered once that removal is durable.
    pub fn decref_later(&mut self, cluster: HostCluster) {
        self.deferred.push(cluster);
    }

    /// Takes the clusters noted by [`Alloc::decref_later`] so far: the
    /// caller applies [`Alloc::decref`] to each after the next flush.
    pub fn take_deferred(&mut self) -> Vec<HostCluster> {
        std::mem::take(&mut self.deferred)
    }

    /// Of `frees` (clusters, one entry per reference to drop), those whose
    /// last reference goes: they are free once the drops are applied. Each
    /// is checked against the metadata map first. Refcounts of clusters
    /// with references can only go down while the caller has them, so the
    /// answer holds until the [`Alloc::decref`] calls are made; meanwhile
    /// the caller punches their host space without the allocation mutex.
    pub fn last_references(
        &mut self,
        file: &HostFile,
        frees: &[HostCluster],
    ) -> Result<Vec<HostCluster>> {
        let mut counts = std::collections::BTreeMap::<HostCluster, u64>::new();
        for &c in frees {
            *counts.entry(c).or_default() += 1;
        }
        let mut last = Vec::new();
        for (c, n) in counts {
            if self.get(file, c)? == n {
                self.map
                    .guard(c.offset(self.cluster_bits), self.cs(), NO_GUEST)?;
                last.push(c);
            }
        }
        Ok(last)
    }

    /// Drops one reference to `cluster` now (no durable reference to it
    /// may be left: the cluster was never linked, or its removal is
    /// durable); at zero the host space is punched out (unless `punched`:
    /// the caller already did, see [`Alloc::last_references`]) and the
    /// cluster becomes free for reuse. Returns the new count.
    pub fn decref(
        &mut self,
        file: &HostFile,
        caches: &Caches,
        cid: u64,
        cluster: HostCluster,
        punched: bool,
    ) -> Result<u64> {
        let cluster = cluster.get();
        let v = self.get(file, HostCluster(cluster))?;
        if v == 0 {
            return Err(Error::corrupt(format!(
                "refcount of host cluster {:#x} is already 0 while it is still referenced",
                cluster << self.cluster_bits
            )));
        }
        if v == 1 {
            // Freeing a cluster that still holds metadata: a data entry
            // pointed into it (legitimately freed tables leave the map first).
            self.map.guard(
                HostOffset(cluster << self.cluster_bits),
                self.cs(),
                NO_GUEST,
            )?;
        }
        self.set(file, caches, cid, cluster, v - 1)?;
        if v == 1 {
            if !punched {
                file.punch_hole(cluster << self.cluster_bits, self.cs())?;
            }
            self.hint = self.hint.min(cluster);
            self.freed += 1;
        }
        Ok(v - 1)
    }

    /// The first cluster at or after the hint whose refcount is 0.
    fn find_free(&mut self, file: &HostFile) -> Result<u64> {
        let entries = self.entries();
        let order = self.order;
        let mut c = self.hint;
        loop {
            let ti = (c / entries) as usize;
            let Some(&te) = self.table.get(ti) else {
                return Ok(c);
            };
            let b = te & OFFSET_MASK;
            if b == 0 {
                return Ok(c);
            }
            let blk = self.block(file, b)?;
            let mut i = c % entries;
            while i < entries {
                if rc_get(blk, i, order) == 0 {
                    return Ok(c - c % entries + i);
                }
                i += 1;
            }
            c = (ti as u64 + 1) * entries;
        }
    }

    /// Allocates one host cluster with refcount 1 and returns its offset.
    pub fn alloc(&mut self, file: &HostFile, caches: &Caches, cid: u64) -> Result<HostOffset> {
        Ok(self.alloc_run(file, caches, cid, 1)?.0)
    }

    /// Allocates up to `want` (≥ 1) host-contiguous clusters with refcount
    /// 1, at least one: returns the first one's offset and how many. The
    /// run stays inside one refcount block, whose changed entries are
    /// written in one `pwrite`.
    pub fn alloc_run(
        &mut self,
        file: &HostFile,
        caches: &Caches,
        cid: u64,
        want: u64,
    ) -> Result<(HostOffset, u64)> {
        let entries = self.entries();
        let order = self.order;
        loop {
            let c = self.find_free(file)?;
            let ti = c / entries;
            if ti >= self.table.len() as u64 {
                self.grow(file, caches, cid, c)?;
                continue;
            }
            let b = self.table[ti as usize] & OFFSET_MASK;
            if b == 0 {
                self.new_block(file, caches, cid, c)?;
                continue;
            }
            let cs = self.cs();
            let blk = self.block(file, b)?;
            let mut k = 1;
            while k < want && (c + k) % entries != 0 && rc_get(blk, (c + k) % entries, order) == 0 {
                k += 1;
            }
            // A "free" cluster holding metadata: the refcounts are wrong.
            self.map.guard(HostOffset(c * cs), k * cs, NO_GUEST)?;
            let blk = self.block(file, b)?;
            let (mut lo, mut hi) = (usize::MAX, 0);
            for i in 0..k {
                let (at, len) = rc_set(blk, (c + i) % entries, order, 1);
                lo = lo.min(at);
                hi = hi.max(at + len);
            }
            file.write_all_at(&blk[lo..hi], b + lo as u64)?;
            // Readers of RefcountLayout (read-only opens) use this key.
            caches.meta.remove((cid, b | 1));
            self.hint = c + k;
            self.end = self.end.max(c + k);
            return Ok((HostCluster(c).offset(self.cluster_bits), k));
        }
    }

    /// Makes free cluster `c` the refcount block of its own range.
    fn new_block(&mut self, file: &HostFile, caches: &Caches, cid: u64, c: u64) -> Result<()> {
        let entries = self.entries();
        let ti = c / entries;
        let mut blk = vec![0u8; self.cs() as usize].into_boxed_slice();
        rc_set(&mut blk, c % entries, self.order, 1);
        let at = c << self.cluster_bits;
        self.map.guard(HostOffset(at), self.cs(), NO_GUEST)?;
        file.write_all_at(&blk, at)?;
        self.map.add(at, self.cs(), Structure::RefcountBlock);
        caches.meta.remove((cid, at | 1));
        self.blocks.insert(at, blk);
        file.write_ordered_at(&be64_bytes(at), self.table_offset + ti * 8, Stage::Link)?;
        let base = (self.table_offset + ti * 8) & !(self.cs() - 1);
        caches.meta.remove((cid, base | 1));
        self.table[ti as usize] = at;
        self.end = self.end.max(c + 1);
        Ok(())
    }

    /// Grows the refcount table so that cluster `c` (beyond the table's
    /// reach, like every cluster after it) gets covered.
    fn grow(&mut self, file: &HostFile, caches: &Caches, cid: u64, c: u64) -> Result<()> {
        let cs = self.cs();
        let entries = self.entries();
        let old_len = self.table.len() as u64;
        // New blocks (k of them) then the new table (n clusters), from `c` on.
        let start = c.max(old_len * entries);
        let mut k = 1u64;
        let (n, tbl_entries) = loop {
            let want = (old_len + k).max(old_len * 2);
            let n = (want * 8).div_ceil(cs);
            if (old_len + k) * entries >= start + k + n {
                break (n, n * cs / 8);
            }
            k += 1;
        };
        if n * cs > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::unsupported(format!(
                "the refcount table would exceed {} MiB: the image is too large",
                MAX_REFCOUNT_TABLE_BYTES >> 20
            )));
        }
        // 1. The new blocks, counting themselves and the new table.
        let used = start..start + k + n;
        self.map
            .guard(HostOffset(start * cs), (k + n) * cs, NO_GUEST)?;
        let mut new_table = self.table.clone();
        new_table.resize(tbl_entries as usize, 0);
        for j in 0..k {
            let ti = old_len + j;
            let mut blk = vec![0u8; cs as usize].into_boxed_slice();
            for cl in used.clone().filter(|cl| cl / entries == ti) {
                rc_set(&mut blk, cl % entries, self.order, 1);
            }
            let at = (start + j) << self.cluster_bits;
            file.write_all_at(&blk, at)?;
            self.map.add(at, cs, Structure::RefcountBlock);
            caches.meta.remove((cid, at | 1));
            self.blocks.insert(at, blk);
            new_table[ti as usize] = at;
        }
        // 2. The new table.
        let tbl_at = (start + k) << self.cluster_bits;
        let raw: Vec<u8> = new_table.iter().flat_map(|&e| be64_bytes(e)).collect();
        file.write_all_at(&raw, tbl_at)?;
        self.map.add(tbl_at, n * cs, Structure::RefcountTable);
        // 3. Switch the header (offset and cluster count in one write).
        let mut hdr = [0u8; 12];
        put_be64(&mut hdr, 0, tbl_at);
        put_be32(&mut hdr, 8, n as u32);
        file.write_ordered_at(&hdr, 48, Stage::Link)?;
        let old_at = self.table_offset;
        let old_clusters = (old_len * 8).div_ceil(cs);
        self.table = new_table;
        self.table_offset = tbl_at;
        self.end = self.end.max(start + k + n);
        self.hint = start + k + n;
        // 4. Free the old table once the switch is durable.
        self.map.remove(old_at, Structure::RefcountTable);
        for i in 0..old_clusters {
            self.decref_later(HostOffset(old_at).cluster(self.cluster_bits).add(i));
        }
        Ok(())
    }
}
