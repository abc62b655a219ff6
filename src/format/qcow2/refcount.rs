//! Refcount lookups (not needed for reading; groundwork for writes and checks).
//!
//! The refcount table (contiguous, `refcount_table_clusters` clusters)
//! points to refcount blocks of one cluster each, holding entries of
//! `refcount_bits` = 1 << refcount_order bits (1 to 64). Both levels are
//! read cluster by cluster through the shared metadata cache; nothing is
//! loaded at open, so a damaged refcount structure never stops reads.

use crate::cache::Caches;
use crate::endian::{be64, be64_bytes};
use crate::error::{Error, Result};
use crate::host::HostFile;

use super::header::Header;
use super::tables::{HostOffset, OFFSET_MASK};

/// Largest refcount table qemu accepts (8 MiB), our cap too.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;

/// Where to find refcounts, validated from the header.
#[derive(Debug, Clone, Copy)]
pub struct RefcountLayout {
    table_offset: u64,
    table_bytes: u64,
    cluster_bits: u32,
    order: u32,
}

impl RefcountLayout {
    /// Validates the header's refcount fields.
    pub fn new(h: &Header) -> Result<RefcountLayout> {
        let cs = h.cluster_size();
        let table_bytes = u64::from(h.refcount_table_clusters) * cs;
        if table_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::corrupt(format!(
                "refcount_table_clusters {} exceeds the {} MiB refcount table limit",
                h.refcount_table_clusters,
                MAX_REFCOUNT_TABLE_BYTES >> 20
            )));
        }
        if h.refcount_table_offset % cs != 0 {
            return Err(Error::corrupt(format!(
                "refcount_table_offset {:#x} is not aligned to the cluster size",
                h.refcount_table_offset
            )));
        }
        Ok(RefcountLayout {
            table_offset: h.refcount_table_offset,
            table_bytes,
            cluster_bits: h.cluster_bits,
            order: h.refcount_order,
        })
    }

    /// Refcount entries per refcount block.
    pub fn block_entries(&self) -> u64 {
        (8u64 << self.cluster_bits) >> self.order
    }

    /// The reference count of the host cluster containing `host`.
    pub fn refcount(
        &self,
        file: &HostFile,
        caches: &Caches,
        cache_id: u64,
        host: HostOffset,
    ) -> Result<u64> {
        let cluster = host.0 >> self.cluster_bits;
        let entries = self.block_entries();
        let table_index = cluster / entries;
        let block_index = cluster % entries;
        let Some(entry_pos) = table_index.checked_mul(8).filter(|&p| p < self.table_bytes) else {
            // Beyond the table: not covered, hence free.
            return Ok(0);
        };
        let table_entry = self.read_u64(file, caches, cache_id, self.table_offset + entry_pos)?;
        let block = table_entry & OFFSET_MASK;
        if block == 0 {
            return Ok(0);
        }
        if block % (1u64 << self.cluster_bits) != 0 || block >= file.len() {
            return Err(Error::corrupt(format!(
                "refcount table entry {table_index} points to a bad refcount block offset {block:#x}"
            )));
        }
        let bits = 1u64 << self.order;
        let bit_pos = block_index * bits;
        let word_pos = (bit_pos / 64) * 8;
        let word = self.read_u64(file, caches, cache_id, block + word_pos)?;
        Ok(if bits == 64 {
            word
        } else {
            // Sub-byte widths count bit 0 as the least significant bit of
            // each byte; wider entries are big-endian. Within a big-endian
            // 64-bit word, byte k holds bits (7 - k) * 8.. of the word.
            let in_word = bit_pos % 64;
            let (byte, in_byte) = (in_word / 8, in_word % 8);
            let shift = if bits >= 8 {
                64 - in_word - bits
            } else {
                (7 - byte) * 8 + in_byte
            };
            (word >> shift) & ((1u64 << bits) - 1)
        })
    }

    /// A big-endian u64 at `at`, via the cluster containing it in the cache.
    fn read_u64(&self, file: &HostFile, caches: &Caches, cache_id: u64, at: u64) -> Result<u64> {
        let cs = 1u64 << self.cluster_bits;
        let base = at - at % cs;
        // Odd key: never collides with an L2 slice (keys are 512-aligned).
        let key = (cache_id, base | 1);
        let cluster = match caches.meta.get(key) {
            Some(c) if c.len() as u64 == cs => c,
            _ => {
                let mut buf = vec![0u8; cs as usize];
                file.read_zero_fill_at(&mut buf, base)?;
                let c: std::sync::Arc<[u8]> = buf.into();
                caches.meta.insert(key, c.clone());
                c
            }
        };
        let i = (at - base) as usize;
        Ok(be64(&cluster, i))
    }
}

/// Entry `i` of a refcount block with entries of `1 << order` bits.
pub fn rc_get(block: &[u8], i: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        block[at..at + n]
            .iter()
            .fold(0u64, |v, &b| (v << 8) | u64::from(b))
    } else {
        // Sub-byte widths: entry 0 in the least significant bits of byte 0.
        let bit = i * bits;
        (u64::from(block[(bit / 8) as usize]) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// Sets entry `i` to `v`; returns the byte range `(start, len)` that changed.
pub fn rc_set(block: &mut [u8], i: u64, order: u32, v: u64) -> (usize, usize) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        block[at..at + n].copy_from_slice(&be64_bytes(v)[8 - n..]);
        (at, n)
    } else {
        let bit = i * bits;
        let at = (bit / 8) as usize;
        let mask = (((1u64 << bits) - 1) << (bit % 8)) as u8;
        block[at] = (block[at] & !mask) | (((v << (bit % 8)) as u8) & mask);
        (at, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_for_every_width() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits;
            for i in 0..n {
                rc_set(&mut block, i, order, (i * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    rc_get(&block, i, order),
                    (i * 7 + 1) & max,
                    "order {order} entry {i}"
                );
            }
        }
        // 1-bit entries: entry 0 is the least significant bit of byte 0.
        let mut b = [0u8; 2];
        rc_set(&mut b, 0, 0, 1);
        rc_set(&mut b, 9, 0, 1);
        assert_eq!(b, [1, 2]);
    }
}
