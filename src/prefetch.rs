//! Sequential prefetch: spotting sequential read streams on a disk and
//! fetching what their next requests will need before they ask.
//!
//! Each exposed disk keeps a small table of [`Streams`]. A read that
//! continues one of them (at or near where it ended) lengthens it; once a
//! stream has read [`TRIGGER`] bytes in a row, it is kept [`WINDOW`] bytes
//! ahead of the reader: [`submit`] hands the range to a pool of threads,
//! which maps it through the chain's layers and
//! - asks the host kernel to read the host ranges behind it
//!   (`posix_fadvise(WILLNEED)`, coalesced into large ranges): the image
//!   file's plain clusters and grains, and the compressed bytes, reach the
//!   host page cache in large reads the disk serves back to back, instead
//!   of one round trip per FUSE request;
//! - decodes the compressed blocks (qcow2 `-c` clusters, streamOptimized
//!   grains) of read-only layers into the shared block cache, where the
//!   reader finds them ([`crate::chain::Chain::read_at`] takes a whole
//!   block out of the cache, so a stream does not leave copies behind).
//!
//! Memory: decoded blocks live in the block cache and count against its
//! byte bound; blocks being decoded are bounded by [`decode_budget`]; the
//! queue of the pool is bounded, and a full queue drops prefetches (they
//! are hints). The pool's threads are started once per process, on first
//! use, never per request.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::cache::{Caches, Key};
use crate::chain::Chain;
use crate::format::{CompressedBlock, Layer, Mapping};
use crate::host::HostFile;

/// Sequential bytes a stream must have read before prefetch starts: two
/// full requests, so a few neighbouring random reads never trigger it.
pub const TRIGGER: u64 = 2 << 20;

/// How far ahead of a sequential reader the prefetch runs.
pub const WINDOW: u64 = 16 << 20;

/// A new prefetch is sent once the reader has used this much of the last.
const STEP: u64 = WINDOW / 4;

/// How far from a stream's end a read may land and still continue it: the
/// kernel's readahead requests arrive out of order from several workers.
const SLACK: u64 = 8 << 20;

/// Streams tracked per disk.
const STREAMS: usize = 4;

/// Host ranges closer than this are advised as one range.
const MERGE_GAP: u64 = 256 << 10;

/// Jobs the pool queues before new prefetches are dropped.
const QUEUE: usize = 512;

#[derive(Clone, Copy, Default)]
struct Stream {
    /// End of the furthest read of the stream.
    end: u64,
    /// Sequential bytes read so far.
    run: u64,
    /// Prefetch has been asked for up to here.
    ahead: u64,
    /// Logical time of the last read, for replacement.
    used: u64,
}

/// The sequential streams of one disk.
#[derive(Default)]
pub struct Streams {
    inner: parking_lot::Mutex<([Stream; STREAMS], u64)>,
}

impl Streams {
    /// Records a read of `len` bytes at `offset` of a disk of `size` bytes;
    /// returns the range `(offset, len)` to prefetch now, if any.
    pub fn observe(&self, offset: u64, len: u64, size: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len).min(size);
        let mut g = self.inner.lock();
        let (streams, clock) = &mut *g;
        *clock += 1;
        let now = *clock;
        let hit = streams
            .iter()
            .position(|s| s.used != 0 && offset <= s.end + SLACK && end + SLACK >= s.end);
        let s = match hit {
            Some(i) => &mut streams[i],
            None => {
                let i = (0..STREAMS)
                    .min_by_key(|&i| streams[i].used)
                    .unwrap_or_default();
                streams[i] = Stream {
                    end,
                    run: 0,
                    ahead: 0,
                    used: now,
                };
                return None;
            }
        };
        s.used = now;
        s.run = s.run.saturating_add(len);
        s.end = s.end.max(end);
        if s.run < TRIGGER || s.end >= size {
            return None;
        }
        // Keep WINDOW bytes ahead, sent in steps of STEP.
        let from = s.ahead.max(s.end);
        let to = s.end.saturating_add(WINDOW).min(size);
        if to <= from || (s.ahead > s.end && to - from < STEP) {
            return None;
        }
        s.ahead = to;
        Some((from, to - from))
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The prefetch threads and their bounded queue.
struct Pool {
    tx: SyncSender<Job>,
}

fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<Pool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vdiskfs-ahead-{i}"))
                .spawn(move || work(&rx));
            if let Err(e) = spawned {
                log::warn!("cannot start a prefetch thread ({e}); sequential prefetch is off");
                return None;
            }
        }
        Some(Pool { tx })
    })
    .as_ref()
}

fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

/// Queues `job`; false when the queue is full or there is no pool.
fn spawn(job: Job) -> bool {
    pool().is_some_and(|p| p.tx.try_send(job).is_ok())
}

/// Prefetches guest range `(offset, len)` of `chain` in the background.
pub fn submit(chain: Arc<Chain>, offset: u64, len: u64) {
    spawn(Box::new(move || run(&chain, offset, len)));
}

/// What one prefetch fetches: host ranges to advise, blocks to decode.
#[derive(Default)]
struct Plan {
    host: Vec<(Arc<HostFile>, u64, u64)>,
    blocks: Vec<(Arc<dyn Layer>, CompressedBlock)>,
}

impl Plan {
    fn add_host(&mut self, file: &Arc<HostFile>, offset: u64, len: u64) {
        if let Some((f, at, n)) = self.host.last_mut() {
            let end = *at + *n;
            if Arc::ptr_eq(f, file) && offset >= *at && offset <= end + MERGE_GAP {
                *n = (offset + len).max(end) - *at;
                return;
            }
        }
        self.host.push((file.clone(), offset, len));
    }
}

fn run(chain: &Chain, offset: u64, len: u64) {
    let mut plan = Plan::default();
    if let Err(e) = plan_layer(chain, 0, offset, len, &mut plan) {
        // The read that needs the range reports the damage.
        log::debug!("prefetch at {offset:#x}: {e}");
    }
    for (file, at, n) in &plan.host {
        file.will_need(*at, *n);
    }
    let caches = chain.caches();
    for (layer, block) in plan.blocks {
        decode_ahead(caches, layer, block);
    }
}

/// Maps `(offset, len)` through layer `idx` and below into `plan`.
fn plan_layer(
    chain: &Chain,
    idx: usize,
    offset: u64,
    len: u64,
    plan: &mut Plan,
) -> crate::Result<()> {
    let Some(layer) = chain.layers().get(idx) else {
        return Ok(());
    };
    let size = layer.virtual_size();
    let end = offset.saturating_add(len).min(size);
    // The file compressed bytes live in, when the layer has only one
    // (multi-extent VMDKs do not say which extent a block is in).
    let mut packed: Option<Option<Arc<HostFile>>> = None;
    let mut pos = offset;
    while pos < end {
        let (mapping, n) = layer.map(pos, end - pos)?;
        let n = n.clamp(1, end - pos);
        match mapping {
            Mapping::Data { file, offset } => plan.add_host(&file, offset, n),
            Mapping::Zero => {}
            Mapping::Backing => plan_layer(chain, idx + 1, pos, n, plan)?,
            Mapping::Compressed(block) => {
                let file = packed.get_or_insert_with(|| match layer.host_files().as_slice() {
                    [only] => Some(only.clone()),
                    _ => None,
                });
                if let Some(f) = file {
                    plan.add_host(f, block.host_offset, block.host_len);
                }
                // A writable layer's blocks may be rewritten meanwhile:
                // only read-only layers' blocks are decoded ahead.
                if layer.as_write().is_none() {
                    plan.blocks.push((layer.clone(), block));
                }
            }
        }
        pos += n;
    }
    Ok(())
}

/// Blocks being decoded ahead (by cache key), and their total size.
struct InFlight {
    keys: Mutex<HashSet<Key>>,
    done: Condvar,
    bytes: AtomicUsize,
}

fn in_flight() -> &'static InFlight {
    static F: OnceLock<InFlight> = OnceLock::new();
    F.get_or_init(|| InFlight {
        keys: Mutex::new(HashSet::new()),
        done: Condvar::new(),
        bytes: AtomicUsize::new(0),
    })
}

/// Bytes of blocks being decoded ahead at once, at most: a sixteenth of
/// the block cache (whose shards would not keep more of one stream), and
/// at most a window.
fn decode_budget(caches: &Caches) -> usize {
    (caches.blocks.capacity() / 16).min(WINDOW as usize)
}

/// Queues the decoding of `block` into the block cache, unless it is
/// cached, already being decoded, or the budget is spent.
fn decode_ahead(caches: &Arc<Caches>, layer: Arc<dyn Layer>, block: CompressedBlock) {
    let key = (layer.cache_id(), block.key);
    let Ok(len) = usize::try_from(block.len) else {
        return;
    };
    if block.len == 0 || block.len > crate::chain::MAX_BLOCK || caches.blocks.contains(key) {
        return;
    }
    let f = in_flight();
    if f.bytes.load(Ordering::Relaxed) + len > decode_budget(caches) {
        return;
    }
    {
        let Ok(mut keys) = f.keys.lock() else { return };
        if !keys.insert(key) {
            return;
        }
    }
    f.bytes.fetch_add(len, Ordering::Relaxed);
    let caches = caches.clone();
    let job: Job = Box::new(move || {
        let mut d = vec![0u8; len];
        match layer.decompress(&block, &mut d) {
            Ok(()) => caches.blocks.insert(key, d.into()),
            Err(e) => log::debug!("prefetch of block at {:#x}: {e}", block.host_offset),
        }
        finish(key, len);
    });
    if !spawn(job) {
        finish(key, len);
    }
}

fn finish(key: Key, len: usize) {
    let f = in_flight();
    if let Ok(mut keys) = f.keys.lock() {
        keys.remove(&key);
    }
    f.bytes.fetch_sub(len, Ordering::Relaxed);
    f.done.notify_all();
}

/// Waits (briefly) while block `key` is being decoded ahead, so a reader
/// takes the decoded block from the cache instead of decoding it twice.
pub fn wait_for(key: Key) {
    let f = in_flight();
    if f.bytes.load(Ordering::Relaxed) == 0 {
        return;
    }
    let Ok(mut keys) = f.keys.lock() else { return };
    let deadline = std::time::Instant::now() + Duration::from_millis(200);
    while keys.contains(&key) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        keys = match f.done.wait_timeout(keys, left) {
            Ok((k, _)) => k,
            Err(_) => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_sequential_stream_is_prefetched_a_window_ahead_in_steps() {
        let s = Streams::default();
        let size = 1 << 30;
        assert_eq!(s.observe(0, MIB, size), None);
        assert_eq!(s.observe(MIB, MIB, size), None);
        // Two MiB read in a row: the window ahead of the reader.
        assert_eq!(s.observe(2 * MIB, MIB, size), Some((3 * MIB, WINDOW)));
        // Nothing more until the reader has used a step of it.
        assert_eq!(s.observe(3 * MIB, MIB, size), None);
        let mut at = 4 * MIB;
        let mut next = None;
        while next.is_none() {
            next = s.observe(at, MIB, size);
            at += MIB;
        }
        let (from, len) = next.unwrap();
        assert_eq!(from, 3 * MIB + WINDOW);
        assert!(len >= STEP);
        assert_eq!(from + len, at + WINDOW);
    }

    #[test]
    fn out_of_order_requests_continue_the_stream() {
        let s = Streams::default();
        let size = 1 << 30;
        for off in [0, 2, 1, 4, 3, 5] {
            s.observe(off * MIB, MIB, size);
        }
        let g = s.inner.lock();
        // The first read opens the stream; the five after it continue it.
        assert!(g.0.iter().any(|st| st.run == 5 * MIB && st.end == 6 * MIB));
    }

    #[test]
    fn random_reads_never_trigger() {
        let s = Streams::default();
        let size = 64 << 30;
        let mut x = 12345u64;
        for _ in 0..10_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let off = (x >> 20) % (size - 4096);
            assert_eq!(s.observe(off & !4095, 4096, size), None);
        }
    }

    #[test]
    fn prefetch_stops_at_the_end_of_the_disk() {
        let s = Streams::default();
        let size = 8 * MIB;
        s.observe(0, MIB, size);
        s.observe(MIB, MIB, size);
        assert_eq!(s.observe(2 * MIB, MIB, size), Some((3 * MIB, 5 * MIB)));
        for i in 3..8 {
            assert_eq!(s.observe(i * MIB, MIB, size), None);
        }
    }

    #[test]
    fn interleaved_streams_are_told_apart() {
        let s = Streams::default();
        let size = 1 << 30;
        let far = 512 * MIB;
        let mut got = 0;
        for i in 0..4 {
            got += s.observe(i * MIB, MIB, size).is_some() as u32;
            got += s.observe(far + i * MIB, MIB, size).is_some() as u32;
        }
        assert_eq!(got, 2, "each stream triggers its own prefetch");
    }
}
