//! Ordering of metadata writes so that a power cut at any instant leaves a
//! consistent image.
//!
//! The host page cache writes pages back in any order, so two writes
//! issued one after the other may reach the disk the other way round; only
//! a barrier (fdatasync) orders them. A barrier per dependent write would
//! cost several fdatasyncs per allocating write, so, as qemu's qcow2
//! metadata cache does, the drivers split their writes in two kinds:
//!
//! - *Immediate* writes (plain [`HostFile::write_all_at`](crate::host::HostFile::write_all_at)): guest data,
//!   copy-on-write fill, refcount raises, whole new tables and refcount
//!   blocks. Nothing durable points at what they write yet (or, for a
//!   refcount raise, the worst a lone raise can do is leak a cluster), so
//!   they may reach the disk in any order.
//! - *Ordered* writes ([`HostFile::write_ordered_at`](crate::host::HostFile::write_ordered_at)): the updates that
//!   make something reachable — table entries and pointers to new tables
//!   or blocks. They are applied to a per-file [`Queue`] of 512-byte
//!   sectors at once (every read of the file sees them at once: reads are
//!   overlaid with the queue), and written to the file by [`Queue::flush`]
//!   in [`Stage`] order with a barrier before each stage:
//!
//! ```text
//! take the queued sectors        (everything queued so far)
//! barrier                        immediate writes before them are durable
//! write the Link sectors, barrier   new refcount blocks / tables linked
//! write the Map sectors, barrier    entries pointing at data and tables
//! ```
//!
//! So whatever a queued update points at is durable before the update can
//! be, and a Map entry never reaches the disk before the Link update it
//! depends on. Lowering a refcount needs the reverse (the reference gone
//! for good first); drivers do it after a flush returns (see
//! `qcow2::alloc::Alloc::decref_later`). A burst of allocations costs one
//! flush, i.e. at most three fdatasyncs, whatever its size; a guest fsync
//! is a flush. The queue is bounded by [`Queue::due`]: drivers flush it
//! when it holds [`FLUSH_BYTES`] or its oldest update is [`FLUSH_AGE`]
//! old, checked after each write and, for idle files, by a background
//! thread ([`watch`]).
//!
//! Details that keep the queue honest: an immediate write or punched hole
//! over a queued sector updates the queued copy too (a flush never brings
//! back older bytes); a sector is queued in one stage only — a write for
//! another stage first flushes the queue (no driver mixes stages in one
//! sector, so this does not happen in practice); a flush writes copies
//! taken before its first barrier, and a sector changed meanwhile stays
//! queued for the next flush. Holes punched on discard (qcow v1, VMDK
//! grains; a qcow2 data file) are immediate: before the flush a cut may
//! show the discarded range as zeros, which is its new content.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::error::Result;
use crate::host::HostFile;

/// The dependency stage of an ordered write: every stage is durable
/// before the next one is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Links a new refcount block or table into the structure that
    /// finds it (refcount table entry, header pointer): what later table
    /// entries' refcounts live in.
    Link,
    /// Mapping entries (L1/L2, grain directory/table): point at data and
    /// tables written immediately, and at clusters counted by Link.
    Map,
}

/// Sector size of the queue: the unit a disk writes atomically.
pub const SECTOR: u64 = 512;

/// Queued bytes past which drivers flush the queue.
pub const FLUSH_BYTES: usize = 4 << 20;

/// Age of the oldest queued update past which drivers flush the queue:
/// the kernel's own periodic writeback interval (5 s), so a power cut
/// loses no more unflushed writes than the page cache would. Shorter
/// ages cost throughput: every flush begins with an fdatasync that writes
/// back all dirty guest data.
pub const FLUSH_AGE: Duration = Duration::from_secs(5);

/// One queued sector: its whole content, stage and change number.
#[derive(Debug)]
struct Sector {
    stage: Stage,
    seq: u64,
    data: Box<[u8]>,
}

#[derive(Debug, Default)]
struct Inner {
    sectors: BTreeMap<u64, Sector>,
    seq: u64,
}

impl Inner {
    fn bump(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

/// The ordered writes of one host file not yet written to it.
#[derive(Debug, Default)]
pub struct Queue {
    /// True while any sector is queued: the read path checks only this.
    nonempty: AtomicBool,
    /// Sectors queued, and when the oldest was queued (nanoseconds since
    /// [`epoch`]): what [`Queue::due`] reads, without a lock.
    sectors: AtomicUsize,
    since: AtomicU64,
    inner: RwLock<Inner>,
    /// One flush at a time.
    flushing: Mutex<()>,
}

/// What one flush writes: per stage, sector index, change number, content.
type Batch = Vec<(u64, u64, Box<[u8]>)>;

impl Queue {
    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        !self.nonempty.load(Ordering::Acquire)
    }

    /// True when the queue should be flushed: it holds [`FLUSH_BYTES`] or
    /// its oldest update is [`FLUSH_AGE`] old.
    /// False while a flush runs (it may well cover the caller's updates;
    /// writers do not queue up behind it).
    pub fn due(&self) -> bool {
        if self.is_empty() || self.flushing.is_locked() {
            return false;
        }
        let age = now().saturating_sub(self.since.load(Ordering::Relaxed));
        self.sectors.load(Ordering::Relaxed) * SECTOR as usize >= FLUSH_BYTES
            || age >= FLUSH_AGE.as_nanos() as u64
    }

    /// Copies the queued bytes inside `offset..offset + buf.len()` over
    /// `buf` (just read from the file).
    pub fn overlay(&self, buf: &mut [u8], offset: u64) {
        if self.is_empty() || buf.is_empty() {
            return;
        }
        let end = offset.saturating_add(buf.len() as u64);
        let inner = self.inner.read();
        for (&s, sec) in inner.sectors.range(offset / SECTOR..end.div_ceil(SECTOR)) {
            let so = s * SECTOR;
            let (a, b) = (so.max(offset), (so + SECTOR).min(end));
            buf[(a - offset) as usize..(b - offset) as usize]
                .copy_from_slice(&sec.data[(a - so) as usize..(b - so) as usize]);
        }
    }

    /// Queues `buf` at `offset` in `stage`. A sector not queued yet is
    /// first filled by `read` (the file's bytes there). Returns false,
    /// queueing nothing, when a touched sector is queued in another stage:
    /// the caller flushes and retries.
    pub fn queue(
        &self,
        buf: &[u8],
        offset: u64,
        stage: Stage,
        mut read: impl FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<bool> {
        if buf.is_empty() {
            return Ok(true);
        }
        let end = offset.saturating_add(buf.len() as u64);
        let (first, last) = (offset / SECTOR, end.div_ceil(SECTOR));
        let mut inner = self.inner.write();
        if inner
            .sectors
            .range(first..last)
            .any(|(_, s)| s.stage != stage)
        {
            return Ok(false);
        }
        // Read every missing sector first: a failed read queues nothing.
        let mut fresh = Vec::new();
        for s in (first..last).filter(|s| !inner.sectors.contains_key(s)) {
            let mut data = vec![0u8; SECTOR as usize].into_boxed_slice();
            read(&mut data, s * SECTOR)?;
            fresh.push((s, data));
        }
        let seq = inner.bump();
        for (s, data) in fresh {
            inner.sectors.insert(s, Sector { stage, seq, data });
        }
        for (&s, sec) in inner.sectors.range_mut(first..last) {
            let so = s * SECTOR;
            let (a, b) = (so.max(offset), (so + SECTOR).min(end));
            sec.data[(a - so) as usize..(b - so) as usize]
                .copy_from_slice(&buf[(a - offset) as usize..(b - offset) as usize]);
            sec.seq = seq;
        }
        self.sectors.store(inner.sectors.len(), Ordering::Relaxed);
        if !self.nonempty.load(Ordering::Relaxed) {
            self.since.store(now(), Ordering::Relaxed);
        }
        self.nonempty.store(true, Ordering::Release);
        Ok(true)
    }

    /// Applies an immediate write of `buf` at `offset` (`None`: zeros, for
    /// a punched hole) to the queued sectors it overlaps, so that a later
    /// flush does not bring back older bytes.
    pub fn patch(&self, buf: Option<&[u8]>, offset: u64, len: u64) {
        if self.is_empty() || len == 0 {
            return;
        }
        let end = offset.saturating_add(len);
        let mut inner = self.inner.write();
        let seq = inner.bump();
        for (&s, sec) in inner
            .sectors
            .range_mut(offset / SECTOR..end.div_ceil(SECTOR))
        {
            let so = s * SECTOR;
            let (a, b) = (so.max(offset), (so + SECTOR).min(end));
            let dst = &mut sec.data[(a - so) as usize..(b - so) as usize];
            match buf {
                Some(buf) => {
                    dst.copy_from_slice(&buf[(a - offset) as usize..(b - offset) as usize])
                }
                None => dst.fill(0),
            }
            sec.seq = seq;
        }
    }

    /// Writes every queued sector to the file, stage by stage, each stage
    /// after a barrier, and ends with a barrier: afterwards everything
    /// written (immediately or queued) before the call is durable.
    /// `sync` is the barrier, `write` a raw write to the file.
    pub fn flush(
        &self,
        sync: impl Fn() -> Result<()>,
        write: impl Fn(&[u8], u64) -> Result<()>,
    ) -> Result<()> {
        let _one = self.flushing.lock();
        let batches = self.take();
        // Whatever the queued updates point at was written before they
        // were queued: make it durable before any of them is written.
        sync()?;
        for batch in batches.iter().filter(|b| !b.is_empty()) {
            write_runs(batch, &write)?;
            sync()?;
        }
        self.retire(&batches);
        Ok(())
    }

    /// Copies of the queued sectors, per stage in stage order.
    fn take(&self) -> [Batch; 2] {
        let mut out: [Batch; 2] = [Vec::new(), Vec::new()];
        if self.is_empty() {
            return out;
        }
        let inner = self.inner.read();
        for (&s, sec) in &inner.sectors {
            out[sec.stage as usize].push((s, sec.seq, sec.data.clone()));
        }
        out
    }

    /// Forgets the sectors of `batches` (now in the file) unless they
    /// changed since they were taken.
    fn retire(&self, batches: &[Batch; 2]) {
        let mut inner = self.inner.write();
        for &(s, seq, _) in batches.iter().flatten() {
            if inner.sectors.get(&s).is_some_and(|sec| sec.seq == seq) {
                inner.sectors.remove(&s);
            }
        }
        self.sectors.store(inner.sectors.len(), Ordering::Relaxed);
        if inner.sectors.is_empty() {
            self.nonempty.store(false, Ordering::Release);
        } else {
            // What stays was changed during the flush: young.
            self.since.store(now(), Ordering::Relaxed);
        }
    }
}

/// Writable host files, for the background flusher.
static WATCHED: Mutex<Vec<Weak<HostFile>>> = Mutex::new(Vec::new());

/// How often the background flusher looks for due queues.
const FLUSHER_TICK: Duration = Duration::from_secs(1);

/// Has the background flusher flush `file`'s queue once it is due (so
/// that updates queued before the guest goes idle reach the disk without
/// another write); started with the first watched file.
pub fn watch(file: &Arc<HostFile>) {
    static STARTED: OnceLock<()> = OnceLock::new();
    {
        let mut w = WATCHED.lock();
        w.retain(|f| f.strong_count() > 0);
        w.push(Arc::downgrade(file));
    }
    STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("vdiskfs-flusher".into())
            .spawn(|| loop {
                std::thread::sleep(FLUSHER_TICK);
                let files: Vec<Arc<HostFile>> =
                    WATCHED.lock().iter().filter_map(Weak::upgrade).collect();
                for f in files.iter().filter(|f| f.flush_due()) {
                    if let Err(e) = f.flush_ordered() {
                        log::error!("background flush: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the background flusher: {e}");
        }
    });
}

/// The instant ages are measured from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`].
fn now() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// Writes the sectors of `batch` (sorted by index), adjacent ones in one
/// write.
fn write_runs(batch: &Batch, write: &impl Fn(&[u8], u64) -> Result<()>) -> Result<()> {
    let mut i = 0;
    while i < batch.len() {
        let start = batch[i].0;
        let mut buf = Vec::new();
        while i < batch.len() && batch[i].0 == start + (buf.len() as u64 / SECTOR) {
            buf.extend_from_slice(&batch[i].2);
            i += 1;
        }
        write(&buf, start * SECTOR)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn queued_bytes_are_read_back_and_flushed_by_stage() {
        let q = Queue::default();
        let disk = RefCell::new(vec![7u8; 4096]);
        let read = |b: &mut [u8], at: u64| {
            b.copy_from_slice(&disk.borrow()[at as usize..at as usize + b.len()]);
            Ok(())
        };
        assert!(q.queue(&[1, 2, 3], 1000, Stage::Map, read).unwrap());
        assert!(q.queue(&[9; 8], 2048, Stage::Link, read).unwrap());
        // Another stage in a queued sector: refused, nothing changed.
        assert!(!q.queue(&[5], 1001, Stage::Link, read).unwrap());
        let mut buf = vec![0u8; 8];
        buf.copy_from_slice(&disk.borrow()[998..1006]);
        q.overlay(&mut buf, 998);
        assert_eq!(buf, [7, 7, 1, 2, 3, 7, 7, 7]);
        let log = RefCell::new(Vec::new());
        q.flush(
            || {
                log.borrow_mut().push("sync".to_string());
                Ok(())
            },
            |b, at| {
                log.borrow_mut().push(format!("write {at} {}", b.len()));
                disk.borrow_mut()[at as usize..at as usize + b.len()].copy_from_slice(b);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            *log.borrow(),
            ["sync", "write 2048 512", "sync", "write 512 512", "sync"]
        );
        assert!(q.is_empty());
        assert_eq!(&disk.borrow()[998..1006], &[7, 7, 1, 2, 3, 7, 7, 7]);
        assert_eq!(disk.borrow()[1006], 7);
    }
}
