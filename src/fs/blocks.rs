//! The allocated-block count of one exposed file (`st_blocks`, what `du`
//! shows), kept up to date incrementally.
//!
//! The file is cut into chunks (1 MiB or more, at most [`MAX_CHUNKS`] of
//! them) and the allocated bytes of each chunk are remembered. A write or
//! a discard only marks the chunks it touched; the next `getattr` asks the
//! chain for the allocation of those chunks alone and adjusts the total.
//! The first `getattr` counts every chunk once (all start marked), so a
//! mount that is never stat'ed never scans, and one that is written never
//! rescans the whole disk.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::chain::{Chain, Status};

/// Most chunks a file is cut into: bounds the memory (8 bytes of count and
/// one flag per chunk) whatever the disk's size.
pub const MAX_CHUNKS: u64 = 1 << 16;

/// Smallest chunk: a write makes at most this much be recounted.
const MIN_CHUNK: u64 = 1 << 20;

/// Allocated bytes of a range `[base, base + len)` of a chain, kept per chunk.
pub struct Blocks {
    chunk: u64,
    /// Chunks touched since they were last counted.
    dirty: Vec<AtomicBool>,
    /// Some chunk is marked: saves walking `dirty` on every `getattr`.
    any_dirty: AtomicBool,
    /// Allocated bytes per chunk, as last counted, and their total; the
    /// lock also keeps two recounts from applying results out of order.
    counted: Mutex<(Vec<u64>, u64)>,
    /// The total as last counted, for readers that find nothing marked.
    total: AtomicU64,
}

impl Blocks {
    /// A counter for a file of `len` bytes, with every chunk still to count.
    pub fn new(len: u64) -> Blocks {
        let chunk = len
            .div_ceil(MAX_CHUNKS)
            .max(MIN_CHUNK)
            .checked_next_power_of_two()
            .unwrap_or(1 << 63);
        let n = len.div_ceil(chunk) as usize;
        Blocks {
            chunk,
            dirty: (0..n).map(|_| AtomicBool::new(true)).collect(),
            any_dirty: AtomicBool::new(true),
            counted: Mutex::new((vec![0; n], 0)),
            total: AtomicU64::new(0),
        }
    }

    /// Marks `[offset, offset + len)` (file positions) as changed. Called
    /// after the write or discard completed, so a recount that follows sees it.
    pub fn touched(&self, offset: u64, len: u64) {
        if len == 0 || self.dirty.is_empty() {
            return;
        }
        let first = offset / self.chunk;
        let last = (offset.saturating_add(len - 1) / self.chunk).min(self.dirty.len() as u64 - 1);
        for c in first..=last {
            self.dirty[c as usize].store(true, Ordering::Release);
        }
        self.any_dirty.store(true, Ordering::Release);
    }

    /// Allocated bytes of the file: the chunks marked since the last call
    /// are recounted from `chain` (the file starts at `base` in it).
    pub fn allocated(&self, chain: &Chain, base: u64, len: u64) -> u64 {
        if !self.any_dirty.load(Ordering::Acquire) {
            return self.total.load(Ordering::Acquire);
        }
        let mut counted = self.counted.lock();
        // Cleared before the chunks are read: a write that completes from
        // here on marks its chunk again, and the next call recounts it.
        if self.any_dirty.swap(false, Ordering::AcqRel) {
            let (per_chunk, total) = &mut *counted;
            for (c, flag) in self.dirty.iter().enumerate() {
                if !flag.swap(false, Ordering::AcqRel) {
                    continue;
                }
                let start = c as u64 * self.chunk;
                let end = (start + self.chunk).min(len);
                let now = data_bytes(chain, base + start, base + end);
                *total = *total - per_chunk[c] + now;
                per_chunk[c] = now;
            }
            self.total.store(*total, Ordering::Release);
        }
        counted.1
    }
}

/// Bytes of `[start, end)` of `chain` that some layer stores. A range whose
/// allocation cannot be read counts as data: `du` must not under-report.
pub fn data_bytes(chain: &Chain, start: u64, end: u64) -> u64 {
    let mut pos = start;
    let mut data = 0;
    while pos < end {
        match chain.status(pos, end - pos) {
            Ok((status, n)) => {
                let n = n.clamp(1, end - pos);
                if status == Status::Data {
                    data += n;
                }
                pos += n;
            }
            Err(_) => return data + (end - pos),
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_bounded_and_cover_the_file() {
        for len in [0, 1, 512, MIN_CHUNK, MIN_CHUNK + 1, 1 << 40, u64::MAX] {
            let b = Blocks::new(len);
            assert!(b.dirty.len() as u64 <= MAX_CHUNKS, "{len}");
            assert!(b.chunk >= MIN_CHUNK && b.chunk.is_power_of_two());
            assert!(
                b.dirty.len() as u128 * u128::from(b.chunk) >= u128::from(len),
                "{len}"
            );
        }
    }

    #[test]
    fn touching_marks_only_the_chunks_in_range() {
        let b = Blocks::new(8 * MIN_CHUNK);
        for f in &b.dirty {
            f.store(false, Ordering::Relaxed);
        }
        b.touched(MIN_CHUNK - 1, 2);
        b.touched(8 * MIN_CHUNK - 1, u64::MAX);
        let marked: Vec<usize> = (0..8)
            .filter(|&c| b.dirty[c].load(Ordering::Relaxed))
            .collect();
        assert_eq!(marked, [0, 1, 7]);
    }
}
