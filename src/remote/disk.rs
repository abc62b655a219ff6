//! The on-disk chunk cache of remote files (`--remote-cache DIR`): chunks
//! kept in local files so that a second mount of the same object, by this
//! daemon or another, fetches (almost) nothing.
//!
//! A chunk is identified by its object's URL, the object's ETag and the
//! chunk size (the *key*), and its index. Only objects with an ETag are
//! cached: without one, a replaced object could not be told apart. The file
//! of a chunk is `<64-bit hash of the key>-<index>.chunk` and holds a small
//! header (magic, the key itself, the data's length and CRC-32C) and the
//! data. Reads check all of it: a hash collision, a truncated or corrupted
//! file is a miss (the file is deleted and the chunk fetched again), never
//! wrong data. Files are written to a temporary name in the directory and
//! renamed into place, so concurrent daemons sharing the directory only
//! ever see whole files.
//!
//! The directory is bounded (`--remote-cache-size`): after a write that
//! brings this process's estimate of the directory's size over the bound,
//! the directory is scanned and the least recently used files (by
//! modification time, which a hit refreshes) are deleted until it fits.
//! The CRC guards against damage, not against a hostile local user: the
//! directory must be writable only by those trusted to serve the images.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use crate::endian::{le32, le32_bytes, le64, le64_bytes};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"VDKCHNK1";
/// Temporary files older than this are left-overs of a killed daemon.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// A bounded directory of chunk files.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    cap: u64,
    /// This process's estimate of the bytes in the directory.
    bytes: Mutex<u64>,
}

impl DiskCache {
    /// Opens (creating it if needed, mode 0700) the cache directory `dir`,
    /// bounded to `cap` bytes; evicts at once if it is already over.
    pub fn open(dir: &Path, cap: u64) -> Result<DiskCache> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io("cannot create the remote cache directory", e).with_path(dir))?;
        let meta = fs::metadata(dir)
            .map_err(|e| Error::io("cannot open the remote cache directory", e).with_path(dir))?;
        if !meta.is_dir() {
            return Err(Error::invalid("the remote cache is not a directory").with_path(dir));
        }
        let c = DiskCache {
            dir: dir.to_path_buf(),
            cap,
            bytes: Mutex::new(0),
        };
        c.evict(None);
        Ok(c)
    }

    /// The bound in bytes.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    fn file(&self, key: &str, idx: u64) -> PathBuf {
        let h1 = crc32c::crc32c(key.as_bytes());
        let h2 = crc32c::crc32c_append(0x5644_4b46, key.as_bytes());
        self.dir.join(format!("{h1:08x}{h2:08x}-{idx}.chunk"))
    }

    /// The chunk `idx` of the object `key` if a valid file holds exactly
    /// `len` bytes of it; a damaged file is reported, deleted and missed.
    pub fn load(&self, key: &str, idx: u64, len: usize) -> Option<Vec<u8>> {
        let path = self.file(key, idx);
        let raw = fs::read(&path).ok()?;
        match parse(&raw, key, len) {
            Ok(Some(data)) => {
                // Refresh the LRU order; failure only makes eviction less exact.
                if let Ok(f) = fs::File::options().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(data.to_vec())
            }
            // Another object (hash collision) or another chunk length: a miss.
            Ok(None) => None,
            Err(why) => {
                log::warn!(
                    "{}: damaged remote cache file ({why}); fetching the chunk again",
                    path.display()
                );
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores the chunk `idx` of the object `key` (atomically: temporary
    /// file, then rename), then evicts if the directory grew over its bound.
    pub fn store(&self, key: &str, idx: u64, data: &[u8]) {
        let total = (MAGIC.len() + 4 + key.len() + 8 + 4 + data.len()) as u64;
        if total > self.cap {
            return;
        }
        let path = self.file(key, idx);
        let written = (|| -> std::io::Result<()> {
            let mut tmp = tempfile::Builder::new()
                .prefix(".tmp-")
                .tempfile_in(&self.dir)?;
            let mut head = Vec::with_capacity(total as usize - data.len());
            head.extend_from_slice(MAGIC);
            head.extend_from_slice(&le32_bytes(key.len() as u32));
            head.extend_from_slice(key.as_bytes());
            head.extend_from_slice(&le64_bytes(data.len() as u64));
            head.extend_from_slice(&le32_bytes(crc32c::crc32c(data)));
            tmp.write_all(&head)?;
            tmp.write_all(data)?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        })();
        if let Err(e) = written {
            log::warn!("{}: cannot write the remote cache: {e}", self.dir.display());
            return;
        }
        let over = {
            let mut b = self.bytes.lock();
            *b += total;
            *b > self.cap
        };
        if over {
            self.evict(Some(&path));
        }
    }

    /// Scans the directory and deletes the least recently used chunk files
    /// until it fits its bound (and stale temporary files), sparing `keep`
    /// (the file just written: timestamps are too coarse to order it last).
    fn evict(&self, keep: Option<&Path>) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        let mut files = Vec::new();
        let mut sum = 0u64;
        for ent in rd.flatten() {
            let name = ent.file_name();
            let name = name.to_string_lossy();
            let Ok(meta) = ent.metadata() else { continue };
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if name.starts_with(".tmp-") {
                if now.duration_since(mtime).unwrap_or_default() > STALE_TEMP {
                    let _ = fs::remove_file(ent.path());
                }
                continue;
            }
            if !meta.is_file() || !name.ends_with(".chunk") {
                continue;
            }
            sum += meta.len();
            if keep == Some(ent.path().as_path()) {
                continue;
            }
            files.push((mtime, meta.len(), ent.path()));
        }
        files.sort_unstable();
        for (_, len, path) in files {
            if sum <= self.cap {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                sum -= len;
            }
        }
        *self.bytes.lock() = sum;
    }
}

/// The data of a chunk file if it is of `key` and `len` bytes (`None` for
/// another key or length), or what is wrong with it.
fn parse<'a>(
    raw: &'a [u8],
    key: &str,
    len: usize,
) -> std::result::Result<Option<&'a [u8]>, String> {
    let take = |at: usize, n: usize| -> std::result::Result<&'a [u8], String> {
        at.checked_add(n)
            .and_then(|end| raw.get(at..end))
            .ok_or_else(|| "truncated".to_string())
    };
    if take(0, MAGIC.len())? != MAGIC {
        return Err("bad magic".into());
    }
    let mut at = MAGIC.len();
    let klen = le32(take(at, 4)?, 0) as usize;
    at += 4;
    let stored_key = take(at, klen)?;
    at += klen;
    let dlen = le64(take(at, 8)?, 0);
    at += 8;
    let crc = le32(take(at, 4)?, 0);
    at += 4;
    if stored_key != key.as_bytes() || dlen != len as u64 {
        return Ok(None);
    }
    let data = take(at, len)?;
    if at + len != raw.len() {
        return Err("trailing bytes".into());
    }
    if crc32c::crc32c(data) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(Some(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_damage_is_a_miss() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(d.path(), 1 << 20).unwrap();
        let data = vec![7u8; 4096];
        c.store("k\n\"e1\"\n4096", 3, &data);
        assert_eq!(c.load("k\n\"e1\"\n4096", 3, 4096), Some(data.clone()));
        assert_eq!(c.load("k\n\"e2\"\n4096", 3, 4096), None, "another ETag");
        assert_eq!(c.load("k\n\"e1\"\n4096", 3, 100), None, "another length");
        let path = c.file("k\n\"e1\"\n4096", 3);
        let mut raw = fs::read(&path).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 1;
        fs::write(&path, &raw).unwrap();
        assert_eq!(c.load("k\n\"e1\"\n4096", 3, 4096), None);
        assert!(!path.exists(), "a damaged file is deleted");
    }

    #[test]
    fn the_directory_stays_within_its_bound() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(d.path(), 40 << 10).unwrap();
        for i in 0..20 {
            c.store("key", i, &[i as u8; 8192]);
        }
        let total: u64 = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 40 << 10, "{total}");
        assert!(c.load("key", 19, 8192).is_some(), "the newest chunk stays");
    }
}
