//! qcow version 1 tables: the L1 table (held in memory) and L2 tables
//! (read on demand through the shared metadata cache), and the decoding of
//! their entries.
//!
//! A guest offset splits into `L1 index | L2 index | offset in cluster`,
//! with `l2_bits` and `cluster_bits` bits for the last two. L1 entries are
//! host offsets of L2 tables (0: none). L2 entries are 64-bit big-endian:
//!
//! - 0: the cluster is not allocated in this image;
//! - bit 63 clear: host offset of the cluster's data;
//! - bit 63 set: a compressed cluster. The low `63 - cluster_bits` bits are
//!   the host offset of the compressed bytes and the `cluster_bits` bits
//!   above them (62 down to `63 - cluster_bits`) their exact length.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::header::Header;
use crate::cache::Caches;
use crate::endian::{be64s, get_be64};
use crate::engine::table_cache::TableCache;
use crate::error::{Error, Result};
use crate::host::HostFile;

/// Bit 63 of an L2 entry: the cluster is compressed.
pub const COMPRESSED_FLAG: u64 = 1 << 63;

/// Where one guest cluster lives, decoded from an L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Not allocated in this image.
    Unallocated,
    /// Stored uncompressed at this host offset.
    Data(u64),
    /// Stored deflate-compressed: `size` bytes at host offset `offset`.
    Compressed {
        /// Host offset of the compressed bytes.
        offset: u64,
        /// Length of the compressed bytes.
        size: u64,
    },
}

/// The cluster geometry of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// log2 of the number of entries per L2 table.
    pub l2_bits: u32,
}

impl Geometry {
    /// The geometry a validated header describes.
    pub fn of(header: &Header) -> Geometry {
        Geometry {
            cluster_bits: u32::from(header.cluster_bits),
            l2_bits: u32::from(header.l2_bits),
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Bytes of one L2 table.
    pub fn l2_bytes(&self) -> u64 {
        self.l2_entries() * 8
    }

    /// Guest bytes one L2 table covers.
    pub fn l2_span(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits)
    }

    /// Index into the L1 table for a guest offset.
    pub fn l1_index(&self, guest: u64) -> u64 {
        guest >> (self.cluster_bits + self.l2_bits)
    }

    /// Index into its L2 table for a guest offset.
    pub fn l2_index(&self, guest: u64) -> usize {
        ((guest >> self.cluster_bits) & (self.l2_entries() - 1)) as usize
    }

    /// Offset of a guest byte within its cluster.
    pub fn in_cluster(&self, guest: u64) -> u64 {
        guest & (self.cluster_size() - 1)
    }

    /// Decodes a raw L2 entry.
    pub fn decode(&self, raw: u64) -> Entry {
        if raw == 0 {
            Entry::Unallocated
        } else if raw & COMPRESSED_FLAG != 0 {
            let shift = 63 - self.cluster_bits;
            Entry::Compressed {
                offset: raw & ((1 << shift) - 1),
                size: (raw >> shift) & (self.cluster_size() - 1),
            }
        } else {
            Entry::Data(raw)
        }
    }
}

/// The L1 table and access to L2 tables.
///
/// When the image is written, L1 entries go from 0 to an L2 table offset
/// (never back), and L2 tables change on disk. The metadata cache must
/// never keep a stale copy: loads and republication go through one
/// [`TableCache`] (see [`crate::engine::table_cache`]).
pub struct Tables {
    geometry: Geometry,
    l1: Vec<AtomicU64>,
    cache_id: u64,
    caches: Arc<Caches>,
    published: TableCache,
}

impl Tables {
    /// Loads the L1 table the (validated) header describes: its extent was
    /// checked against the file length and a hard size cap.
    pub fn load(
        file: &HostFile,
        header: &Header,
        caches: Arc<Caches>,
        cache_id: u64,
    ) -> Result<Tables> {
        let entries = header.l1_entries()?;
        let mut raw = vec![0u8; (entries * 8) as usize];
        file.read_exact_at(&mut raw, header.l1_table_offset)?;
        let l1 = be64s(&raw).map(AtomicU64::new).collect();
        Ok(Tables {
            geometry: Geometry::of(header),
            l1,
            cache_id,
            caches,
            published: TableCache::new(),
        })
    }

    /// The shared caches the tables live in.
    pub fn caches(&self) -> &Arc<Caches> {
        &self.caches
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Number of L1 entries.
    pub fn l1_len(&self) -> usize {
        self.l1.len()
    }

    /// The L1 entry (L2 table host offset, 0 for none) covering guest
    /// offset `guest`; `None` past the table.
    pub fn l1_entry(&self, guest: u64) -> Option<u64> {
        let idx = usize::try_from(self.geometry.l1_index(guest)).ok()?;
        self.l1.get(idx).map(|e| e.load(Ordering::Acquire))
    }

    /// Every L1 entry (L2 table offsets, 0 for none), as loaded now.
    pub fn l1_entries(&self) -> impl Iterator<Item = u64> + '_ {
        self.l1.iter().map(|e| e.load(Ordering::Acquire))
    }

    /// Records in memory a new L1 entry, after it was written to disk
    /// (and after the L2 table it points at).
    pub fn set_l1_entry(&self, idx: usize, l2_offset: u64) {
        self.l1[idx].store(l2_offset, Ordering::Release);
    }

    /// The raw bytes of the L2 table at host offset `l2_offset`, from the
    /// metadata cache or the file. A table starting at or past `file_len`
    /// (the end of the file as the driver knows it) is corrupt; one cut
    /// short by the end of the file reads the missing entries as 0
    /// (unallocated), as qemu does.
    pub fn l2_table(&self, file: &HostFile, l2_offset: u64, file_len: u64) -> Result<Arc<[u8]>> {
        let key = (self.cache_id, l2_offset);
        let len = self.geometry.l2_bytes();
        if l2_offset >= file_len || l2_offset.checked_add(len).is_none() {
            return Err(Error::corrupt(format!(
                "L2 table offset {l2_offset:#x} lies past the end of the file ({file_len} bytes)"
            )));
        }
        self.published
            .load(&self.caches.meta, key, len as usize, |raw| {
                file.read_zero_fill_at(raw, l2_offset)
            })
    }

    /// Replaces the cached copy of the L2 table at `l2_offset` after the
    /// table was changed on disk (`None`: drop the cached copy, as after
    /// a failed write whose outcome on disk is unknown).
    pub fn publish_l2(&self, l2_offset: u64, table: Option<Arc<[u8]>>) {
        self.published
            .publish(&self.caches.meta, (self.cache_id, l2_offset), table);
    }
}

/// Raw entry `idx` of an L2 table (0 past its end, which cannot happen
/// for an index from [`Geometry::l2_index`]).
pub fn raw_entry(table: &[u8], idx: usize) -> u64 {
    let start = idx * 8;
    get_be64(table, start).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endian::put_be64;

    #[test]
    fn decodes_entries() {
        let g = Geometry {
            cluster_bits: 12,
            l2_bits: 9,
        };
        assert_eq!(g.decode(0), Entry::Unallocated);
        assert_eq!(g.decode(0x3000), Entry::Data(0x3000));
        // 12 cluster bits: size lives in bits 62..=51, offset in bits 50..=0.
        let raw = COMPRESSED_FLAG | (0x123 << 51) | 0x1_2345;
        assert_eq!(
            g.decode(raw),
            Entry::Compressed {
                offset: 0x1_2345,
                size: 0x123
            }
        );
        assert_eq!(g.l1_index(3 << 21), 3);
        assert_eq!(g.l2_index((3 << 21) + 5 * 4096 + 7), 5);
        assert_eq!(g.in_cluster((3 << 21) + 5 * 4096 + 7), 7);
    }

    #[test]
    fn reads_entries_big_endian() {
        let mut t = vec![0u8; 16];
        put_be64(&mut t, 8, 0x1122_3344_5566_7788);
        assert_eq!(raw_entry(&t, 1), 0x1122_3344_5566_7788);
        assert_eq!(raw_entry(&t, 2), 0);
    }
}
