//! The chunk cache of remote files, with request coalescing and prefetch.
//!
//! A remote object is read in fixed-size chunks ([`super::Settings::chunk`],
//! 4 MiB by default), kept in one byte-bounded LRU shared by every remote
//! file of the process. A read takes its chunks from the cache; missing
//! chunks are claimed in an in-flight table (so two workers wanting the
//! same chunk cause one request), adjacent claimed chunks are fetched by one
//! ranged GET on the runtime, and the reader waits for them.
//!
//! Prefetch: each file remembers where its last read ended. A read that
//! starts there (within a chunk: the kernel's read-ahead reaches us out of
//! order from several workers) doubles the file's read-ahead window, up to
//! [`super::Settings::readahead`] and half the cache; any other read resets
//! it, so random reads fetch only their own chunks. The window's missing
//! chunks are claimed and fetched like demand chunks, nobody waiting on
//! them. Requests in flight are bounded by a semaphore, memory by the LRU.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use lru::LruCache;
use parking_lot::{Condvar, Mutex};

use super::disk::DiskCache;
use super::store::{describe_failure, Object};
use super::RemoteFile;
use crate::error::{Error, ErrorKind, Result};

type Key = (u64, u64);
type Outcome = std::result::Result<Arc<[u8]>, (ErrorKind, String)>;

struct Lru {
    lru: LruCache<Key, Arc<[u8]>>,
    bytes: usize,
    cap: usize,
}

/// A chunk being fetched: readers wait on `cv` until `slot` is filled.
#[derive(Default)]
struct Pending {
    slot: Mutex<Option<Outcome>>,
    cv: Condvar,
}

struct Shared {
    lru: Mutex<Lru>,
    inflight: Mutex<HashMap<Key, Arc<Pending>>>,
    permits: Arc<tokio::sync::Semaphore>,
    fetched: AtomicU64,
    from_disk: AtomicU64,
    read: AtomicU64,
    requests: AtomicU64,
}

fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        let s = super::settings();
        Shared {
            lru: Mutex::new(Lru {
                lru: LruCache::unbounded(),
                bytes: 0,
                cap: s.cache_bytes,
            }),
            inflight: Mutex::new(HashMap::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(s.max_inflight.max(1))),
            fetched: AtomicU64::new(0),
            from_disk: AtomicU64::new(0),
            read: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    })
}

/// Traffic of the remote files of this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes received from servers.
    pub fetched: u64,
    /// Bytes taken from the on-disk cache (`--remote-cache`).
    pub from_disk: u64,
    /// Bytes handed to readers.
    pub read: u64,
    /// Ranged GETs made.
    pub requests: u64,
}

/// [`Stats`] so far.
pub fn stats() -> Stats {
    let s = shared();
    Stats {
        fetched: s.fetched.load(Ordering::Relaxed),
        from_disk: s.from_disk.load(Ordering::Relaxed),
        read: s.read.load(Ordering::Relaxed),
        requests: s.requests.load(Ordering::Relaxed),
    }
}

/// Sequential-stream detection of one file.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    /// (where the last read ended, read-ahead window in chunks)
    state: Mutex<(u64, u64)>,
}

impl Stream {
    /// Records a read of `start..end` and returns the read-ahead window in chunks.
    fn note(&self, start: u64, end: u64, chunk: u64, max_chunks: u64) -> u64 {
        let mut st = self.state.lock();
        let (last_end, window) = *st;
        let sequential = last_end > 0 && start.abs_diff(last_end) <= chunk;
        let window = if sequential {
            // max_chunks may be 0 (prefetch off, or a cache under two chunks).
            (window * 2).max(1).min(max_chunks)
        } else {
            0
        };
        *st = (end.max(if sequential { last_end } else { 0 }), window);
        window
    }
}

/// Reads up to `buf.len()` bytes of `file` at `offset` through the cache.
pub(crate) fn read(file: &RemoteFile, buf: &mut [u8], offset: u64) -> Result<usize> {
    let s = super::settings();
    let chunk = s.chunk.max(4096);
    if offset >= file.len || buf.is_empty() {
        return Ok(0);
    }
    let end = offset.saturating_add(buf.len() as u64).min(file.len);
    let first = offset / chunk;
    let last = (end - 1) / chunk;
    let nchunks = file.len.div_ceil(chunk);
    let sh = shared();
    let cap_chunks = (sh.lru.lock().cap as u64 / 2 / chunk).min(s.readahead / chunk);
    let window = file.stream.note(offset, end, chunk, cap_chunks);
    // Demand chunks, then the read-ahead window: claim what nobody has.
    let mut waits = Vec::new();
    let mut claimed = Vec::new();
    for idx in first..=last {
        let key = (file.id, idx);
        if let Some(data) = sh.lru.lock().lru.get(&key).cloned() {
            waits.push((idx, Ok(data)));
            continue;
        }
        let mut inflight = sh.inflight.lock();
        let p = inflight.entry(key).or_insert_with(|| {
            claimed.push(idx);
            Arc::default()
        });
        waits.push((idx, Err(p.clone())));
    }
    let ahead_end = (last + 1 + window).min(nchunks);
    for idx in last + 1..ahead_end {
        let key = (file.id, idx);
        if sh.lru.lock().lru.contains(&key) {
            continue;
        }
        let mut inflight = sh.inflight.lock();
        if let std::collections::hash_map::Entry::Vacant(v) = inflight.entry(key) {
            v.insert(Arc::default());
            claimed.push(idx);
        }
    }
    spawn_runs(file, &claimed, chunk)?;
    let mut done = 0usize;
    for (idx, got) in waits {
        let data = match got {
            Ok(d) => d,
            Err(p) => {
                let mut slot = p.slot.lock();
                while slot.is_none() {
                    p.cv.wait(&mut slot);
                }
                match slot.as_ref() {
                    Some(Ok(d)) => d.clone(),
                    Some(Err((kind, msg))) => return Err(Error::new(*kind, msg.clone())),
                    None => unreachable!("waited until filled"),
                }
            }
        };
        let cstart = idx * chunk;
        let from = offset.max(cstart);
        let to = end.min(cstart + data.len() as u64);
        if to <= from {
            break;
        }
        let (a, b) = ((from - cstart) as usize, (to - cstart) as usize);
        let at = (from - offset) as usize;
        buf[at..at + (b - a)].copy_from_slice(&data[a..b]);
        done = at + (b - a);
    }
    sh.read.fetch_add(done as u64, Ordering::Relaxed);
    Ok(done)
}

/// Starts fetching the chunks of `file` covering the `(offset, length)`
/// ranges that are neither cached nor in flight, one ranged GET per run of
/// adjacent chunks, all at once (within the request bound); nobody waits
/// here: the reads that follow wait for their chunks like any reader. At
/// most a quarter of the in-memory cache is claimed per call, so a hint
/// can neither flush the cache nor grow memory.
pub(crate) fn prefetch(file: &RemoteFile, ranges: &[(u64, u64)]) -> Result<()> {
    let chunk = super::settings().chunk.max(4096);
    let sh = shared();
    let budget = (sh.lru.lock().cap as u64 / 4 / chunk) as usize;
    let mut claimed = Vec::new();
    'ranges: for &(off, len) in ranges {
        let end = off.saturating_add(len).min(file.len);
        if off >= end {
            continue;
        }
        for idx in off / chunk..=(end - 1) / chunk {
            if claimed.len() >= budget {
                break 'ranges;
            }
            let key = (file.id, idx);
            if sh.lru.lock().lru.contains(&key) {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(v) = sh.inflight.lock().entry(key) {
                v.insert(Arc::default());
                claimed.push(idx);
            }
        }
    }
    if claimed.is_empty() {
        return Ok(());
    }
    spawn_runs(file, &claimed, chunk)
}

/// Fetches the claimed chunks, one task per run of adjacent chunks.
fn spawn_runs(file: &RemoteFile, claimed: &[u64], chunk: u64) -> Result<()> {
    let rt = super::runtime()?;
    let mut sorted = claimed.to_vec();
    sorted.sort_unstable();
    let job = Arc::new(Job {
        obj: file.obj.clone(),
        e_tag: file.e_tag.clone(),
        id: file.id,
        len: file.len,
        chunk,
        disk: disk_of(file, chunk),
    });
    for (a, b) in runs(&sorted) {
        let job = job.clone();
        rt.spawn(async move { fetch_run(job, a, b).await });
    }
    Ok(())
}

/// The runs of adjacent indexes in `sorted`, as (first, last).
fn runs(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &i in sorted {
        match out.last_mut() {
            Some((_, b)) if *b + 1 == i => *b = i,
            _ => out.push((i, i)),
        }
    }
    out
}

/// The on-disk cache and this file's key in it, if there is one and the
/// object has an ETag (see [`super::disk`]).
fn disk_of(file: &RemoteFile, chunk: u64) -> Option<(Arc<DiskCache>, Arc<str>)> {
    let dc = super::disk_cache()?;
    let tag = file.e_tag.as_deref()?;
    Some((dc, format!("{}\n{tag}\n{chunk}", file.url).into()))
}

/// What a fetch task needs of its file.
struct Job {
    obj: Object,
    e_tag: Option<String>,
    id: u64,
    len: u64,
    chunk: u64,
    disk: Option<(Arc<DiskCache>, Arc<str>)>,
}

impl Job {
    /// The byte length of chunk `idx` (the last one may be short).
    fn chunk_len(&self, idx: u64) -> usize {
        let start = idx * self.chunk;
        (self.len.min(start + self.chunk) - start.min(self.len)) as usize
    }
}

/// Fills chunks `a..=b`: from the on-disk cache where it has them, the
/// rest by one ranged GET per run of missing chunks (then written to the
/// on-disk cache once their readers are served).
async fn fetch_run(job: Arc<Job>, a: u64, b: u64) {
    let sh = shared();
    let mut missing: Vec<u64> = (a..=b).collect();
    if let Some((dc, key)) = job.disk.clone() {
        let j = job.clone();
        let found = tokio::task::spawn_blocking(move || {
            (a..=b)
                .map(|i| (i, dc.load(&key, i, j.chunk_len(i))))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (idx, data) in found {
            if let Some(data) = data {
                sh.from_disk.fetch_add(data.len() as u64, Ordering::Relaxed);
                missing.retain(|&m| m != idx);
                let data: Arc<[u8]> = data.into();
                insert(sh, (job.id, idx), data.clone());
                finish(sh, job.id, idx, Ok(data));
            }
        }
    }
    for (a, b) in runs(&missing) {
        let got = fetch_get(sh, &job, a, b).await;
        if let (Some((dc, key)), Some(chunks)) = (job.disk.clone(), got) {
            let _ = tokio::task::spawn_blocking(move || {
                for (idx, data) in chunks {
                    dc.store(&key, idx, &data);
                }
            })
            .await;
        }
    }
}

/// One ranged GET of chunks `a..=b`; wakes their readers and returns the
/// chunks (none on failure).
async fn fetch_get(sh: &Shared, job: &Job, a: u64, b: u64) -> Option<Vec<(u64, Arc<[u8]>)>> {
    let start = a * job.chunk;
    let end = ((b + 1) * job.chunk).min(job.len);
    let outcome = {
        let _permit = sh.permits.clone().acquire_owned().await;
        sh.requests.fetch_add(1, Ordering::Relaxed);
        job.obj.get(start..end, job.e_tag.as_deref()).await
    };
    match outcome {
        Ok(bytes) => {
            sh.fetched.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let mut chunks = Vec::new();
            for idx in a..=b {
                let s = ((idx - a) * job.chunk) as usize;
                let e = (s + job.chunk as usize).min(bytes.len());
                let data: Arc<[u8]> = Arc::from(&bytes[s..e]);
                insert(sh, (job.id, idx), data.clone());
                finish(sh, job.id, idx, Ok(data.clone()));
                chunks.push((idx, data));
            }
            Some(chunks)
        }
        Err(f) => {
            let err = describe_failure(&f);
            log::warn!("{err}");
            for idx in a..=b {
                finish(
                    sh,
                    job.id,
                    idx,
                    Err((err.kind(), err.message().to_string())),
                );
            }
            None
        }
    }
}

/// Hands chunk `idx` of file `id` to whoever waits for it.
fn finish(sh: &Shared, id: u64, idx: u64, r: Outcome) {
    if let Some(p) = sh.inflight.lock().remove(&(id, idx)) {
        *p.slot.lock() = Some(r);
        p.cv.notify_all();
    }
}

/// Puts the first chunk, fetched by the GET that opened `file`, in the
/// caches (it holds the image's header, and often its tables).
pub(crate) fn seed(file: &RemoteFile, chunk: u64, data: bytes::Bytes) {
    let sh = shared();
    sh.fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
    sh.requests.fetch_add(1, Ordering::Relaxed);
    if data.len() != (file.len.min(chunk)) as usize {
        return;
    }
    let data: Arc<[u8]> = Arc::from(&data[..]);
    insert(sh, (file.id, 0), data.clone());
    if let Some((dc, key)) = disk_of(file, chunk) {
        if let Ok(rt) = super::runtime() {
            rt.spawn_blocking(move || dc.store(&key, 0, &data));
        }
    }
}

fn insert(sh: &Shared, key: Key, data: Arc<[u8]>) {
    let mut l = sh.lru.lock();
    if data.len() > l.cap {
        return;
    }
    l.bytes += data.len();
    if let Some(old) = l.lru.put(key, data) {
        l.bytes -= old.len();
    }
    while l.bytes > l.cap {
        match l.lru.pop_lru() {
            Some((_, old)) => l.bytes -= old.len(),
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_grows_on_sequential_reads_and_resets_on_random_ones() {
        let s = Stream::default();
        let c = 4 << 20;
        assert_eq!(s.note(0, c, c, 16), 0);
        assert_eq!(s.note(c, 2 * c, c, 16), 1);
        assert_eq!(s.note(2 * c, 3 * c, c, 16), 2);
        assert_eq!(s.note(3 * c, 4 * c, c, 16), 4);
        assert_eq!(s.note(100 * c, 101 * c, c, 16), 0);
        assert_eq!(s.note(101 * c, 102 * c, c, 16), 1);
        let off = Stream::default();
        assert_eq!(off.note(0, c, c, 0), 0);
        assert_eq!(off.note(c, 2 * c, c, 0), 0);
    }
}
