//! Generation-checked caching of metadata tables that a writer changes
//! (qcow2 L2 slices, qcow v1 L2 tables, VMDK grain tables), shared by every
//! writable driver.
//!
//! Tables live as raw bytes in the shared metadata LRU ([`ByteLru`]); no
//! lock is held while a table is read from disk. That leaves one race: a
//! reader misses the cache, reads the old table from disk, a writer changes
//! the table and publishes the new copy, then the reader inserts its old
//! copy over it — and every later lookup sees the stale table. The
//! [`TableCache`] closes it: a reader records the generation before its
//! disk read and inserts only if no table was published since, the check
//! and the insert happening under the same lock as the writer's publish.
//! A reader that lost the race still returns its copy (it read what was on
//! disk when it started, which is what a read racing the write may see) but
//! never caches it.
//!
//! One generation covers every table of its owner (a layer or an extent):
//! a publish of any table makes concurrent loads of every table skip the
//! insert, which costs at worst one more disk read later.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::cache::{ByteLru, Key};
use crate::error::Result;

/// The publish generation of one owner's tables.
#[derive(Default)]
pub struct TableCache {
    /// Bumped by every publish.
    generation: AtomicU64,
    /// Serialises a load's check-and-insert with publishes.
    lock: Mutex<()>,
}

impl TableCache {
    /// A cache with no publish yet.
    pub fn new() -> TableCache {
        TableCache::default()
    }

    /// The table of `len` bytes under `key`: the cached copy, or the bytes
    /// `read` fills (a zeroed buffer of `len` bytes), inserted into `lru`
    /// only if no table was published meanwhile. A cached copy of another
    /// length (a key reused for another table size) is ignored.
    pub fn load(
        &self,
        lru: &ByteLru,
        key: Key,
        len: usize,
        read: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Arc<[u8]>> {
        if let Some(t) = lru.get(key) {
            if t.len() == len {
                return Ok(t);
            }
        }
        let generation = self.generation.load(Ordering::Acquire);
        let mut buf = vec![0u8; len];
        read(&mut buf)?;
        let t: Arc<[u8]> = buf.into();
        let _guard = self.lock.lock();
        if self.generation.load(Ordering::Acquire) == generation {
            lru.insert(key, t.clone());
        }
        Ok(t)
    }

    /// Replaces the cached copy under `key` after the table changed on
    /// disk; `None` drops it (after a failed write whose outcome on disk is
    /// unknown, the next load reads the disk again).
    pub fn publish(&self, lru: &ByteLru, key: Key, table: Option<Arc<[u8]>>) {
        let _guard = self.lock.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        match table {
            Some(t) => lru.insert(key, t),
            None => lru.remove(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endian::{be64, be64_bytes, put_be64};
    use std::sync::mpsc;

    fn lru() -> Arc<ByteLru> {
        Arc::new(ByteLru::new(1 << 20))
    }

    #[test]
    fn a_miss_reads_once_then_hits() {
        let (lru, tc) = (lru(), TableCache::new());
        let mut reads = 0;
        for _ in 0..3 {
            let t = tc
                .load(&lru, (1, 64), 8, |b| {
                    reads += 1;
                    b.fill(7);
                    Ok(())
                })
                .unwrap();
            assert_eq!(&*t, &[7u8; 8]);
        }
        assert_eq!(reads, 1);
    }

    #[test]
    fn a_cached_copy_of_another_length_is_reread() {
        let (lru, tc) = (lru(), TableCache::new());
        lru.insert((1, 0), vec![1u8; 4].into());
        let t = tc
            .load(&lru, (1, 0), 8, |b| {
                b.fill(2);
                Ok(())
            })
            .unwrap();
        assert_eq!(&*t, &[2u8; 8]);
    }

    #[test]
    fn publish_replaces_and_none_drops() {
        let (lru, tc) = (lru(), TableCache::new());
        tc.load(&lru, (1, 0), 8, |b| {
            b.fill(1);
            Ok(())
        })
        .unwrap();
        tc.publish(&lru, (1, 0), Some(vec![9u8; 8].into()));
        let t = tc.load(&lru, (1, 0), 8, |_| panic!("cached")).unwrap();
        assert_eq!(&*t, &[9u8; 8]);
        tc.publish(&lru, (1, 0), None);
        let t = tc
            .load(&lru, (1, 0), 8, |b| {
                b.fill(3);
                Ok(())
            })
            .unwrap();
        assert_eq!(&*t, &[3u8; 8]);
    }

    #[test]
    fn a_failed_read_caches_nothing() {
        let (lru, tc) = (lru(), TableCache::new());
        let err = tc.load(&lru, (1, 0), 8, |_| {
            Err(crate::error::Error::corrupt("boom".to_string()))
        });
        assert!(err.is_err());
        assert!(lru.get((1, 0)).is_none());
    }

    /// The race the module exists for: a reader reads the old table from
    /// disk, a writer publishes the new one before the reader inserts; the
    /// reader's stale copy must not replace the writer's.
    #[test]
    fn a_load_that_started_before_a_publish_never_caches_its_stale_copy() {
        let (lru, tc) = (lru(), Arc::new(TableCache::new()));
        let (read_started, started) = mpsc::channel();
        let (go, may_finish) = mpsc::channel::<()>();
        let reader = {
            let (lru, tc) = (lru.clone(), tc.clone());
            std::thread::spawn(move || {
                tc.load(&lru, (1, 0), 8, |b| {
                    b.fill(0xaa); // the old table, as on disk
                    read_started.send(()).unwrap();
                    may_finish.recv().unwrap();
                    Ok(())
                })
                .unwrap()
            })
        };
        started.recv().unwrap();
        tc.publish(&lru, (1, 0), Some(vec![0xbb; 8].into()));
        go.send(()).unwrap();
        let stale = reader.join().unwrap();
        assert_eq!(&*stale, &[0xaa; 8], "the racing reader sees what it read");
        assert_eq!(&*lru.get((1, 0)).unwrap(), &[0xbb; 8]);
        // Even once the writer's copy is evicted, later loads read afresh.
        lru.remove((1, 0));
        let t = tc
            .load(&lru, (1, 0), 8, |b| {
                b.fill(0xbb);
                Ok(())
            })
            .unwrap();
        assert_eq!(&*t, &[0xbb; 8]);
    }

    /// Many readers and a writer publishing increasing versions: whenever
    /// the writer is done, the cache holds its last version or nothing.
    #[test]
    fn concurrent_loads_never_roll_back_a_publish() {
        let (lru, tc) = (lru(), Arc::new(TableCache::new()));
        let disk = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (lru, tc, disk) = (lru.clone(), tc.clone(), disk.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        tc.load(&lru, (1, 0), 8, |b| {
                            let v = disk.load(Ordering::Acquire);
                            std::thread::yield_now();
                            put_be64(b, 0, v);
                            Ok(())
                        })
                        .unwrap();
                        lru.remove((2, 0)); // unrelated traffic
                    }
                })
            })
            .collect();
        for v in 1..=500u64 {
            disk.store(v, Ordering::Release);
            tc.publish(&lru, (1, 0), Some(be64_bytes(v).to_vec().into()));
            if let Some(t) = lru.get((1, 0)) {
                let got = be64(&t, 0);
                assert!(got >= v, "cache rolled back to {got} after publish {v}");
            }
        }
        for r in readers {
            r.join().unwrap();
        }
        let t = lru.get((1, 0)).unwrap();
        assert_eq!(be64(&t, 0), 500);
    }
}
