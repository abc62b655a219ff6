//! Host files: the image files, extent files and data files a layer reads.
//!
//! A [`HostFile`] is an open file plus its path, with positional I/O only
//! (`*_at`), so any number of threads can read one file at once without a
//! lock. Errors name the file and the offset.
//!
//! Every host write and fdatasync of the write path goes through here:
//! each file carries the [`Queue`] of its ordered metadata writes (see
//! [`crate::engine::order`]; reads are overlaid with it) and, for tests,
//! an optional [`Recorder`].

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::engine::order::{Queue, Stage};
use crate::engine::record::{Event, Recorder};
use crate::error::{Error, ErrorKind, Result};

thread_local! {
    /// Set while [`without_blocking_reads`] runs on this thread.
    static NO_READS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with host reads refused on this thread: every read of a
/// [`HostFile`] fails at once with `EAGAIN` instead of waiting for a disk
/// or a server. For threads that must never block on image I/O (the
/// io_uring queue threads): a mapping that needs a table not yet cached
/// fails, and the caller hands the whole request to a thread that may
/// block.
pub fn without_blocking_reads<R>(f: impl FnOnce() -> R) -> R {
    /// Restores the flag, also when `f` unwinds.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_READS.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(NO_READS.with(|c| c.replace(true)));
    f()
}

/// An open host file with positional I/O.
#[derive(Debug)]
pub struct HostFile {
    file: File,
    path: PathBuf,
    len: u64,
    writable: bool,
    direct: bool,
    /// Taken by writes of [`LARGE_WRITE`] bytes or more; see
    /// [`HostFile::write_all_at`].
    large_writes: parking_lot::Mutex<()>,
    /// Ordered metadata writes not yet in the file.
    queue: Queue,
    /// Where host I/O is logged, when a test asked for it.
    recorder: OnceLock<Arc<Recorder>>,
    /// Files synced before this one's queued metadata is written (a qcow2
    /// data file: the guest data its L2 entries point at).
    flush_first: OnceLock<Arc<HostFile>>,
    /// Set for an object read over the network (`s3://`, `http(s)://`):
    /// reads go there, and `file` is an empty placeholder.
    remote: Option<Arc<crate::remote::RemoteFile>>,
}

/// Writes at least this long go to one host file one at a time.
const LARGE_WRITE: usize = 128 << 10;

/// Alignment of O_DIRECT reads (buffer address, file offset and length):
/// 4096 covers every common logical block size.
const DIRECT_ALIGN: usize = 4096;

/// Largest bounce buffer of one O_DIRECT read.
const DIRECT_CHUNK: usize = 1 << 20;

/// How a host file is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostOpen {
    /// Open for writing too.
    pub writable: bool,
    /// Allow block/character devices and FIFOs (off by default: see docs/security.md).
    pub allow_devices: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
}

impl HostFile {
    /// Opens `path` read-only; only regular files are accepted.
    pub fn open(path: &Path) -> Result<Arc<HostFile>> {
        Self::open_with(path, HostOpen::default())
    }

    /// Opens `path` as `how` says.
    pub fn open_with(path: &Path, how: HostOpen) -> Result<Arc<HostFile>> {
        if crate::remote::is_url(path) {
            return Self::open_remote(path, how);
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(how.writable);
        let mut flags = libc::O_CLOEXEC | libc::O_NOCTTY;
        if how.direct {
            flags |= libc::O_DIRECT;
        }
        if !how.allow_devices {
            // Never block on a FIFO before we had a chance to refuse it.
            flags |= libc::O_NONBLOCK;
        }
        opts.custom_flags(flags);
        let file = opts.open(path).map_err(|e| {
            if how.direct && e.raw_os_error() == Some(libc::EINVAL) {
                Error::io(
                    "cannot open with O_DIRECT (unsupported by this filesystem?)",
                    e,
                )
                .with_path(path)
            } else {
                Error::io("cannot open", e).with_path(path)
            }
        })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot stat", e).with_path(path))?;
        let ft = meta.file_type();
        let len = if ft.is_file() {
            meta.len()
        } else if ft.is_block_device() && how.allow_devices {
            block_device_size(&file).map_err(|e| Error::io("cannot size block device", e))?
        } else if ft.is_dir() {
            return Err(Error::invalid("is a directory, not an image").with_path(path));
        } else {
            return Err(Error::new(
                ErrorKind::Policy,
                "not a regular file (devices and FIFOs need --allow-devices)",
            )
            .with_path(path));
        };
        Ok(watched(HostFile {
            file,
            path: path.to_path_buf(),
            len,
            writable: how.writable,
            direct: how.direct,
            large_writes: parking_lot::Mutex::new(()),
            queue: Queue::default(),
            recorder: OnceLock::new(),
            flush_first: OnceLock::new(),
            remote: None,
        }))
    }

    /// Opens the object at the URL `path`, read-only (see [`crate::remote`]).
    fn open_remote(path: &Path, how: HostOpen) -> Result<Arc<HostFile>> {
        if how.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "remote images are read-only; send writes to a local --overlay FILE or --snapshot",
            )
            .with_path(path));
        }
        let url = path.to_str().unwrap_or_default();
        let remote = crate::remote::RemoteFile::open(url)?;
        let placeholder = tempfile::tempfile()
            .map_err(|e| Error::io("cannot create a placeholder file", e).with_path(path))?;
        Ok(Arc::new(HostFile {
            file: placeholder,
            path: path.to_path_buf(),
            len: remote.len(),
            writable: false,
            direct: false,
            large_writes: parking_lot::Mutex::new(()),
            remote: Some(remote),
            queue: Queue::default(),
            recorder: OnceLock::new(),
            flush_first: OnceLock::new(),
        }))
    }

    /// Wraps an already open regular file (an anonymous temporary file,
    /// say) under a display `path`.
    pub fn from_file(file: File, path: PathBuf, writable: bool) -> Result<Arc<HostFile>> {
        let len = file
            .metadata()
            .map_err(|e| Error::io("cannot stat", e).with_path(&path))?
            .len();
        Ok(watched(HostFile {
            file,
            path,
            len,
            writable,
            direct: false,
            large_writes: parking_lot::Mutex::new(()),
            queue: Queue::default(),
            recorder: OnceLock::new(),
            flush_first: OnceLock::new(),
            remote: None,
        }))
    }

    /// An anonymous in-memory file (memfd) holding `bytes`, shown as
    /// `name`: for fuzzing and tests that open byte blobs as images.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Arc<HostFile>> {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(c"vdiskfs-blob", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| Error::io("memfd_create", e.into()))?;
        let file = File::from(fd);
        file.write_all_at(bytes, 0)
            .map_err(|e| Error::io("cannot fill memfd", e))?;
        Self::from_file(file, PathBuf::from(name), false)
    }

    /// [`HostFile::from_bytes`], open for writing (the memfd grows as
    /// the image is written).
    pub fn from_bytes_rw(name: &str, bytes: &[u8]) -> Result<Arc<HostFile>> {
        let ro = Self::from_bytes(name, bytes)?;
        let file = ro
            .file
            .try_clone()
            .map_err(|e| Error::io("cannot duplicate memfd", e))?;
        Self::from_file(file, PathBuf::from(name), true)
    }

    /// The path the file was opened under.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length when it was opened. It is not updated as writes
    /// grow the file: writers track their own end (e.g. an allocator's
    /// frontier).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the file is a regular file now (not a device): drivers that
    /// append new space at the end refuse devices, whose end is fixed.
    pub fn is_regular_file(&self) -> Result<bool> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io("cannot stat", e).with_path(&self.path))?;
        Ok(meta.file_type().is_file())
    }

    /// Whether the file was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The remote object behind this file, if it is one: then [`HostFile::file`]
    /// is an empty placeholder, good for no lock, stat or passthrough.
    pub fn remote(&self) -> Option<&Arc<crate::remote::RemoteFile>> {
        self.remote.as_ref()
    }

    /// The underlying file, for metadata queries and passthrough (an
    /// empty placeholder for a remote file: check [`HostFile::remote`]).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Hints that the `(offset, length)` ranges will be read soon: the
    /// tables a driver found in a header, before it reads the first of
    /// them. A remote file starts fetching the chunks it lacks in the
    /// background (all ranges at once, bounded), so a layer's tables cost
    /// one round trip instead of one each; a local file asks the kernel to
    /// read ahead (posix_fadvise WILLNEED). Never fails and never blocks:
    /// the later reads report any error. Drivers know nothing of networks.
    pub fn prefetch(&self, ranges: &[(u64, u64)]) {
        let ranges: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|&&(off, len)| len > 0 && off < self.len)
            .map(|&(off, len)| (off, len.min(self.len - off)))
            .collect();
        if let Some(r) = &self.remote {
            r.prefetch(&ranges);
            return;
        }
        if self.direct {
            return;
        }
        for (off, len) in ranges {
            let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
                continue;
            };
            // Advice only: a failure changes nothing.
            let _ = nix::fcntl::posix_fadvise(
                &self.file,
                o,
                l,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
    }

    /// The descriptor to read with asynchronously (io_uring), when a plain
    /// pread of it gives the file's bytes: a local file, without O_DIRECT's
    /// alignment rules, opened read-only (so no queued metadata write can
    /// lie over what the file holds).
    pub fn plain_read_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        (self.remote.is_none() && !self.direct && !self.writable).then(|| self.file.as_raw_fd())
    }

    /// Reads exactly `buf.len()` bytes at `offset`; reading past the end of
    /// the file is a [`ErrorKind::Corrupt`] error naming the range.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_at_most(buf, offset)?;
        if n < buf.len() {
            return Err(Error::corrupt(format!(
                "read of {} bytes ends past end of file ({} bytes)",
                buf.len(),
                self.len
            ))
            .at_host(offset)
            .with_path(&self.path));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`, filling whatever lies past the
    /// end of the file with zeros (images whose last cluster is cut short).
    pub fn read_zero_fill_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_at_most(buf, offset)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Reads up to `buf.len()` bytes, stopping only at end of file.
    /// Returns the number of bytes read.
    pub fn read_at_most(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let n = self.read_from_file(buf, offset)?;
        // Queued metadata lies inside the file: it extends a short read.
        if !self.queue.is_empty() {
            self.queue.overlay(buf, offset);
        }
        Ok(n)
    }

    /// [`HostFile::read_at_most`] without the queued writes.
    fn read_from_file(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if NO_READS.with(std::cell::Cell::get) {
            let would_block = std::io::Error::from(std::io::ErrorKind::WouldBlock);
            return Err(
                Error::io("read refused on a thread that must not block", would_block)
                    .at_host(offset)
                    .with_path(&self.path),
            );
        }
        if let Some(r) = &self.remote {
            return r.read_at_most(buf, offset);
        }
        if self.direct {
            return self.read_direct(buf, offset);
        }
        let mut done = 0;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| Error::corrupt("offset overflows").at_host(offset))?;
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io("read failed", e)
                        .at_host(pos)
                        .with_path(&self.path));
                }
            }
        }
        Ok(done)
    }

    /// [`HostFile::read_at_most`] for a file opened with O_DIRECT, which
    /// needs the buffer address, the file offset and the length aligned:
    /// reads whole aligned blocks into an aligned bounce buffer (at most
    /// [`DIRECT_CHUNK`] at a time) and copies the wanted bytes out. A short
    /// read means end of file.
    fn read_direct(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        const A: u64 = DIRECT_ALIGN as u64;
        let want_all = buf.len().min(DIRECT_CHUNK) + 2 * DIRECT_ALIGN;
        let mut storage = vec![0u8; want_all + DIRECT_ALIGN];
        let shift = storage.as_ptr().align_offset(DIRECT_ALIGN);
        let bounce = &mut storage[shift..shift + want_all];
        let mut done = 0;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| Error::corrupt("offset overflows").at_host(offset))?;
            let start = pos - pos % A;
            let skip = (pos - start) as usize;
            let span = (skip + buf.len() - done).min(DIRECT_CHUNK + DIRECT_ALIGN);
            let span = span.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
            let got = loop {
                match self.file.read_at(&mut bounce[..span], start) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err(Error::io("read failed (O_DIRECT)", e)
                            .at_host(start)
                            .with_path(&self.path))
                    }
                }
            };
            if got <= skip {
                break;
            }
            let n = (got - skip).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&bounce[skip..skip + n]);
            done += n;
        }
        Ok(done)
    }

    /// Writes all of `buf` at `offset` at once (an *immediate* write: see
    /// [`crate::engine::order`]).
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.queue.patch(Some(buf), offset, buf.len() as u64);
        self.write_through(buf, offset)
    }

    /// Queues an ordered metadata write of `buf` at `offset` in `stage`
    /// (see [`crate::engine::order`]): reads of this file see it at once;
    /// [`HostFile::flush_ordered`] writes it after everything it depends on
    /// is durable.
    pub fn write_ordered_at(&self, buf: &[u8], offset: u64, stage: Stage) -> Result<()> {
        self.check_writable()?;
        loop {
            let read = |b: &mut [u8], at: u64| self.read_from_file(b, at).map(|n| b[n..].fill(0));
            if self.queue.queue(buf, offset, stage, read)? {
                return Ok(());
            }
            // A sector shared with another stage: write out what is queued.
            self.flush_ordered()?;
        }
    }

    /// Writes the queued metadata in dependency order with barriers (see
    /// [`crate::engine::order::Queue::flush`]), after making the file set
    /// by [`HostFile::flush_first`] durable. Afterwards everything written
    /// to both before the call is durable.
    pub fn flush_ordered(&self) -> Result<()> {
        if let Some(f) = self.flush_first.get() {
            f.sync_data()?;
        }
        self.queue
            .flush(|| self.sync_data(), |b, at| self.write_through(b, at))
    }

    /// Makes every flush of this file's queued metadata sync `first`
    /// before (the data file guest data of this image lives in); once.
    pub fn flush_first(&self, first: Arc<HostFile>) {
        let _ = self.flush_first.set(first);
    }

    /// True when the queued metadata should be flushed (large or old).
    pub fn flush_due(&self) -> bool {
        self.queue.due()
    }

    /// Flushes the queued metadata when it is large or old (bounding what
    /// a power cut can lose and what the queue holds); the drivers that
    /// need nothing else done around a flush call this after each write.
    pub fn flush_ordered_if_due(&self) -> Result<()> {
        if self.flush_due() {
            self.flush_ordered()?;
        }
        Ok(())
    }

    /// Logs this file's host I/O to `r` from now on (once per file).
    pub fn set_recorder(&self, r: Arc<Recorder>) {
        let _ = self.recorder.set(r);
    }

    fn record(&self, e: impl FnOnce() -> Event) {
        if let Some(r) = self.recorder.get() {
            r.record(e());
        }
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(
                Error::new(ErrorKind::ReadOnly, "file is open read-only").with_path(&self.path)
            );
        }
        Ok(())
    }

    /// Writes `buf` at `offset`, bypassing the queue.
    ///
    /// Large writes to one file are queued here: Linux filesystems (ext4,
    /// xfs, btrfs) hold the inode lock exclusively across a buffered write,
    /// so they run one at a time anyway, and with 32 workers the waiters
    /// spun on that lock (`rwsem_spin_on_owner` in `perf`) instead of
    /// leaving the CPU to the one copying. Measured with 32 workers,
    /// sequential 1 MiB writes: +8 % in place and into an overlay
    /// (docs/performance.md). Small writes, where the lock is held briefly,
    /// are not queued.
    fn write_through(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let _one_at_a_time = (buf.len() >= LARGE_WRITE).then(|| self.large_writes.lock());
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::io("write failed", e)
                .at_host(offset)
                .with_path(&self.path)
        })?;
        self.record(|| Event::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    /// Deallocates `len` bytes at `offset` (they read as zeros afterwards)
    /// without changing the file size; where the host filesystem cannot
    /// punch holes, writes zeros instead.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        use nix::fcntl::FallocateFlags;
        self.check_writable()?;
        self.queue.patch(None, offset, len);
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(
                Error::new(ErrorKind::OutOfRange, "hole beyond any file size").at_host(offset),
            );
        };
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let e = match nix::fcntl::fallocate(&self.file, punch, off, l) {
            Ok(()) => {
                self.record(|| Event::Punch { offset, len });
                return Ok(());
            }
            Err(e) => e,
        };
        if e != nix::errno::Errno::EOPNOTSUPP {
            return Err(Error::io("punching a hole failed", e.into())
                .at_host(offset)
                .with_path(&self.path));
        }
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_through(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Makes written data durable (fdatasync).
    pub fn sync_data(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync failed", e).with_path(&self.path))?;
        self.record(|| Event::Barrier);
        Ok(())
    }

    /// Sets the file's length.
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.check_writable()?;
        self.file
            .set_len(len)
            .map_err(|e| Error::io("cannot set the length", e).with_path(&self.path))?;
        self.record(|| Event::SetLen(len));
        Ok(())
    }

    /// Whether the host file stores data at `offset` (per SEEK_DATA and
    /// SEEK_HOLE), and for how many bytes from there, at most `len`.
    /// `None` when the host cannot tell (no lseek support, a device): the
    /// caller then treats the range as data.
    pub fn host_run(&self, offset: u64, len: u64) -> Option<(bool, u64)> {
        use nix::unistd::{lseek, Whence};
        let at = i64::try_from(offset).ok()?;
        // lseek moves the shared file position, which nothing here uses:
        // every read and write is positioned (pread/pwrite).
        let data = match lseek(&self.file, at, Whence::SeekData) {
            Ok(data) => data as u64,
            // ENXIO: no data at or after offset, a hole to the end.
            Err(e) => return (e == nix::errno::Errno::ENXIO).then_some((false, len)),
        };
        if data > offset {
            return Some((false, (data - offset).min(len)));
        }
        let hole = lseek(&self.file, at, Whence::SeekHole).ok()?;
        Some((
            true,
            (hole as u64).saturating_sub(offset).clamp(1, len.max(1)),
        ))
    }

    /// Bytes the file occupies on the host (st_blocks * 512).
    pub fn host_allocated(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }
}

impl Drop for HostFile {
    /// Queued metadata is written out in order: closing a file loses
    /// nothing that was written to it.
    fn drop(&mut self) {
        if !self.queue.is_empty() {
            if let Err(e) = self.flush_ordered() {
                log::error!("{e}");
            }
        }
    }
}

/// A new host file, watched by the background flusher when writable.
fn watched(f: HostFile) -> Arc<HostFile> {
    let f = Arc::new(f);
    if f.writable {
        crate::engine::order::watch(&f);
    }
    f
}

fn block_device_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn short_reads_are_errors_or_zero_filled() {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(b"hello").unwrap();
        let f = HostFile::open(t.path()).unwrap();
        let mut buf = [0xffu8; 8];
        assert_eq!(
            f.read_exact_at(&mut buf, 0).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        f.read_zero_fill_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello\0\0\0");
    }

    #[test]
    fn direct_reads_are_byte_exact_at_any_offset_and_length() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let p = dir.path().join("data");
        let data: Vec<u8> = (0..3 * 1024 * 1024 + 777u32)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let how = HostOpen {
            direct: true,
            ..Default::default()
        };
        let f = HostFile::open_with(&p, how).unwrap();
        for (off, len) in [
            (0usize, 1usize),
            (1, 4095),
            (4095, 2),
            (4096, 4096),
            (12345, 1 << 20),
            (777, (2 << 20) + 3),
            (data.len() - 10, 10),
            (data.len() - 10, 100),
            (data.len(), 5),
        ] {
            let mut buf = vec![0xeeu8; len];
            let n = f.read_at_most(&mut buf, off as u64).unwrap();
            let end = (off + len).min(data.len());
            assert_eq!(n, end - off, "{off}+{len}");
            assert_eq!(&buf[..n], &data[off..end], "{off}+{len}");
        }
    }

    #[test]
    fn fifos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(HostFile::open(&p).unwrap_err().kind(), ErrorKind::Policy);
    }
}
