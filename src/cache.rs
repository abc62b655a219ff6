//! Byte-bounded LRU caches shared by every layer of every mounted image.
//!
//! Two caches live in one [`Caches`]:
//! - `meta`: metadata tables (qcow2 L2 and refcount blocks, VMDK grain
//!   tables) as raw on-disk bytes; drivers decode entries on use.
//! - `blocks`: decompressed data blocks (qcow2 compressed clusters, VMDK
//!   stream grains), so reading one block in 4 KiB pieces decodes it once.
//!
//! Keys are `(layer id, key within layer)`; each layer takes a unique id from
//! [`Caches::new_layer_id`]. Each cache is split into shards, each an
//! `lru::LruCache` under its own `parking_lot::Mutex`, and bounded in bytes
//! (not entries), so the daemon's memory stays within the configured size
//! whatever an image says. No lock is held during I/O: callers look up, read
//! on a miss, then insert.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

/// A cache key: the layer's id and a key within the layer (usually a host offset).
pub type Key = (u64, u64);

const SHARDS: usize = 16;

struct Shard {
    lru: LruCache<Key, Arc<[u8]>>,
    bytes: usize,
    /// Counted under the shard's lock: no shared atomics on the hot path.
    hits: u64,
    misses: u64,
}

/// An LRU of byte blocks bounded by their total size.
pub struct ByteLru {
    shards: Vec<Mutex<Shard>>,
    shard_cap: usize,
}

impl ByteLru {
    /// A cache holding at most about `capacity` bytes (0 disables it).
    pub fn new(capacity: usize) -> Self {
        ByteLru {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        lru: LruCache::unbounded(),
                        bytes: 0,
                        hits: 0,
                        misses: 0,
                    })
                })
                .collect(),
            shard_cap: capacity / SHARDS,
        }
    }

    fn shard(&self, key: &Key) -> &Mutex<Shard> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// The cached block for `key`, marking it recently used.
    pub fn get(&self, key: Key) -> Option<Arc<[u8]>> {
        let mut shard = self.shard(&key).lock();
        let got = shard.lru.get(&key).cloned();
        if got.is_some() {
            shard.hits += 1;
        } else {
            shard.misses += 1;
        }
        got
    }

    /// Inserts `value` under `key`, evicting least recently used blocks to
    /// stay within the bound. Blocks larger than a shard are not cached.
    pub fn insert(&self, key: Key, value: Arc<[u8]>) {
        let size = value.len();
        if size > self.shard_cap {
            return;
        }
        let mut shard = self.shard(&key).lock();
        if let Some(old) = shard.lru.put(key, value) {
            shard.bytes -= old.len();
        }
        shard.bytes += size;
        while shard.bytes > self.shard_cap {
            match shard.lru.pop_lru() {
                Some((_, v)) => shard.bytes -= v.len(),
                None => break,
            }
        }
    }

    /// Drops the block under `key` (after it was rewritten on disk).
    pub fn remove(&self, key: Key) {
        let mut shard = self.shard(&key).lock();
        if let Some(old) = shard.lru.pop(&key) {
            shard.bytes -= old.len();
        }
    }

    /// Drops every block of one layer.
    pub fn remove_layer(&self, layer: u64) {
        for s in &self.shards {
            let mut shard = s.lock();
            let keys: Vec<Key> = shard
                .lru
                .iter()
                .filter(|(k, _)| k.0 == layer)
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                if let Some(v) = shard.lru.pop(&k) {
                    shard.bytes -= v.len();
                }
            }
        }
    }

    /// Bytes currently held.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }

    /// (hits, misses) since creation.
    pub fn stats(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(h, m), s| {
            let s = s.lock();
            (h + s.hits, m + s.misses)
        })
    }
}

/// The caches shared by all layers of a mount.
pub struct Caches {
    /// Metadata tables, raw on-disk bytes.
    pub meta: ByteLru,
    /// Decompressed data blocks.
    pub blocks: ByteLru,
    next_layer: AtomicU64,
}

/// Default total cache size: 256 MiB.
pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;

impl Caches {
    /// Caches totalling about `total` bytes: a quarter for metadata, the
    /// rest for decompressed blocks.
    pub fn new(total: usize) -> Arc<Caches> {
        let meta = total / 4;
        Arc::new(Caches {
            meta: ByteLru::new(meta),
            blocks: ByteLru::new(total - meta),
            next_layer: AtomicU64::new(1),
        })
    }

    /// A fresh id for a newly opened layer.
    pub fn new_layer_id(&self) -> u64 {
        self.next_layer.fetch_add(1, Ordering::Relaxed)
    }
}

impl Default for Caches {
    fn default() -> Self {
        let total = DEFAULT_CACHE_BYTES;
        Caches {
            meta: ByteLru::new(total / 4),
            blocks: ByteLru::new(total - total / 4),
            next_layer: AtomicU64::new(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_its_byte_bound() {
        let c = ByteLru::new(SHARDS * 1000);
        for i in 0..10_000u64 {
            c.insert((1, i), vec![0u8; 100].into());
        }
        assert!(c.bytes() <= SHARDS * 1000);
        assert!(c.get((1, 9_999)).is_some());
        assert!(c.get((1, 0)).is_none());
    }

    #[test]
    fn oversized_blocks_are_not_cached() {
        let c = ByteLru::new(SHARDS * 10);
        c.insert((1, 1), vec![0u8; 11].into());
        assert!(c.get((1, 1)).is_none());
    }

    #[test]
    fn remove_layer_drops_only_that_layer() {
        let c = ByteLru::new(1 << 20);
        c.insert((1, 1), vec![1u8; 10].into());
        c.insert((2, 1), vec![2u8; 10].into());
        c.remove_layer(1);
        assert!(c.get((1, 1)).is_none());
        assert!(c.get((2, 1)).is_some());
    }
}
