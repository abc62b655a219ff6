//! Remote images: objects in S3-compatible storage (`s3://bucket/key`),
//! Google Cloud Storage (`gs://bucket/key`), Azure Blob Storage
//! (`az://container/blob`) and files on HTTP(S) servers (`http://host/path`,
//! `https://host/path`), read through the `object_store` crate behind
//! [`crate::host::HostFile`].
//!
//! A remote file is opened with one ranged GET of its first chunk (size and
//! ETag from the headers, the chunk into the cache: the image's header and
//! often its tables; a HEAD if that fails, e.g. for an empty object, or
//! when the on-disk cache probably has the chunk)
//! and then answers positional reads from the chunk cache of [`chunks`],
//! which turns misses into ranged GETs conditioned on that ETag, and keeps
//! chunks in memory and optionally on local disk ([`disk`]). `object_store` is
//! async: this module owns one small tokio runtime ([`RUNTIME_THREADS`]
//! threads) and the FUSE workers block on it.
//!
//! URLs stand in for paths everywhere else (a `PathBuf` holding the URL):
//! `Path::parent` and `Path::join` on `s3://b/dir/top.qcow2` give
//! `s3://b/dir` and `s3://b/dir/base.raw`, which is how names inside images
//! resolve relative to the object (see [`crate::policy`]). URLs with
//! credentials (`user:pass@`) or a query string are refused, so that no
//! secret ever appears in a path, a log line, an error or `vdiskfs list`.

pub mod ahead;
mod aws;
pub mod chunks;
pub mod disk;
mod store;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result};

pub use aws::{configure_s3, S3Settings};
pub use chunks::Stats;

/// Threads of the runtime that drives the HTTP requests: they only wait on
/// sockets, the FUSE workers do the copying.
pub const RUNTIME_THREADS: usize = 2;

/// Tuning of remote reads, set once per process by the command line.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Bytes per cached chunk (one ranged GET at least).
    pub chunk: u64,
    /// Bytes the in-memory chunk cache may hold.
    pub cache_bytes: usize,
    /// Largest read-ahead window of a sequential stream, in bytes (0: no prefetch).
    pub readahead: u64,
    /// Ranged GETs in flight at once over all files (demand and prefetch).
    pub max_inflight: usize,
    /// Timeout of one HTTP request (connect included).
    pub request_timeout: Duration,
    /// Timeout of establishing a connection.
    pub connect_timeout: Duration,
    /// Retries of a failed request (with exponential backoff) before EIO.
    pub max_retries: usize,
    /// Total time spent retrying one request before EIO.
    pub retry_timeout: Duration,
}

/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK: u64 = 4 << 20;

/// Default read-ahead window: 64 MiB.
pub const DEFAULT_READAHEAD: u64 = 64 << 20;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            chunk: DEFAULT_CHUNK,
            cache_bytes: 128 << 20,
            readahead: DEFAULT_READAHEAD,
            max_inflight: 8,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_retries: 3,
            retry_timeout: Duration::from_secs(60),
        }
    }
}

static SETTINGS: Mutex<Option<Settings>> = Mutex::new(None);

/// Sets the tuning for remote files opened from now on (the chunk cache is
/// sized by the first open).
pub fn configure(s: Settings) {
    *SETTINGS.lock() = Some(s);
}

/// The tuning in force.
pub fn settings() -> Settings {
    let s = *SETTINGS.lock();
    s.unwrap_or_default()
}

/// The runtime that drives every remote request of the process.
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("vdiskfs-remote")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("cannot start the network runtime: {e}"),
        )
    })
}

/// True when `path` is a URL this module opens (`s3://`, `gs://`, `az://`,
/// `http://`, `https://`).
pub fn is_url(path: &Path) -> bool {
    path.to_str().is_some_and(is_url_str)
}

/// [`is_url`] on a string.
pub fn is_url_str(s: &str) -> bool {
    ["s3://", "gs://", "az://", "http://", "https://"]
        .iter()
        .any(|p| s.len() > p.len() && s[..p.len()].eq_ignore_ascii_case(p))
}

/// A remote object opened for reading: its URL, size and version.
pub struct RemoteFile {
    url: String,
    obj: store::Object,
    len: u64,
    e_tag: Option<String>,
    /// Unique per open file: the chunk cache's key.
    id: u64,
    stream: chunks::Stream,
}

impl std::fmt::Debug for RemoteFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteFile")
            .field("url", &self.url)
            .field("len", &self.len)
            .field("e_tag", &self.e_tag)
            // The store client (credentials) and the stream state stay out.
            .finish_non_exhaustive()
    }
}

impl RemoteFile {
    /// Opens the object at `url`: a ranged GET of its first chunk (size,
    /// ETag and the chunk), or a HEAD if that fails or when there is an
    /// on-disk cache. An open already started by [`ahead::open_ahead`]
    /// (a backing file named by a layer still loading its tables) is
    /// taken over instead.
    pub fn open(url: &str) -> Result<Arc<RemoteFile>> {
        let rt = runtime()?;
        if let Some(file) = ahead::take(rt, url) {
            return Ok(file);
        }
        let obj = store::Object::parse(url)?;
        rt.block_on(Self::open_obj(url.to_string(), obj))
    }

    /// [`RemoteFile::open`] of the parsed `obj`, on the runtime.
    async fn open_obj(url: String, obj: store::Object) -> Result<Arc<RemoteFile>> {
        let chunk = settings().chunk.max(4096);
        // With an on-disk cache, the first chunk is likely there: a HEAD
        // (no body) and the chunk from disk beat 4 MiB over the network.
        let first = match disk_cache() {
            Some(_) => None,
            None => obj.get_head(chunk).await.ok(),
        };
        let (meta, head) = match first {
            Some((meta, data)) => (meta, Some(data)),
            None => {
                let meta = obj
                    .head()
                    .await
                    .map_err(|e| store::describe(&e, "cannot open").with_path(&url))?;
                (meta, None)
            }
        };
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let file = Arc::new(RemoteFile {
            url,
            obj,
            len: meta.size,
            e_tag: meta.e_tag,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            stream: chunks::Stream::default(),
        });
        if let Some(data) = head {
            chunks::seed(&file, chunk, data);
        }
        Ok(file)
    }

    /// Starts fetching the chunks of the `(offset, length)` ranges that
    /// are neither cached nor in flight, without waiting (see
    /// [`crate::host::HostFile::prefetch`]).
    pub fn prefetch(&self, ranges: &[(u64, u64)]) {
        if let Err(e) = chunks::prefetch(self, ranges) {
            log::debug!("{}: no prefetch: {e}", self.url);
        }
    }

    /// The URL the file was opened under.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object's size at open.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty object.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The object's ETag at open, if the server gave one.
    pub fn e_tag(&self) -> Option<&str> {
        self.e_tag.as_deref()
    }

    /// Reads up to `buf.len()` bytes at `offset`, stopping only at the end
    /// of the object; a failed request (after retries) or a replaced
    /// object is an [`ErrorKind::Io`] error naming the URL.
    pub fn read_at_most(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        chunks::read(self, buf, offset).map_err(|e| e.with_path(&self.url))
    }
}

static DISK: Mutex<Option<Arc<disk::DiskCache>>> = Mutex::new(None);

/// Keeps chunks of remote files opened from now on in the directory `dir`
/// too, bounded to `cap` bytes (see [`disk`]).
pub fn set_disk_cache(dir: &Path, cap: u64) -> Result<()> {
    *DISK.lock() = Some(Arc::new(disk::DiskCache::open(dir, cap)?));
    Ok(())
}

/// The on-disk chunk cache, if one is set.
fn disk_cache() -> Option<Arc<disk::DiskCache>> {
    DISK.lock().clone()
}

/// Bytes fetched from servers and bytes handed to readers by this process.
pub fn stats() -> Stats {
    chunks::stats()
}
