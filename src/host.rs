//! Host files: the image files, extent files and data files a layer reads.
//!
//! A [`HostFile`] is an open file plus its path, with positional I/O only
//! (`*_at`), so any number of threads can read one file at once without a
//! lock. Errors name the file and the offset.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};

/// An open host file with positional I/O.
#[derive(Debug)]
pub struct HostFile {
    file: File,
    path: PathBuf,
    len: u64,
    writable: bool,
}

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
        let file = opts
            .open(path)
            .map_err(|e| Error::io("cannot open", e).with_path(path))?;
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
        Ok(Arc::new(HostFile {
            file,
            path: path.to_path_buf(),
            len,
            writable: how.writable,
        }))
    }

    /// Wraps an already open regular file (an anonymous temporary file,
    /// say) under a display `path`.
    pub fn from_file(file: File, path: PathBuf, writable: bool) -> Result<Arc<HostFile>> {
        let len = file
            .metadata()
            .map_err(|e| Error::io("cannot stat", e).with_path(&path))?
            .len();
        Ok(Arc::new(HostFile {
            file,
            path,
            len,
            writable,
        }))
    }

    /// The path the file was opened under.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length when it was opened (or as last grown by us).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the file was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The underlying file, for metadata queries and passthrough.
    pub fn file(&self) -> &File {
        &self.file
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
            .at(offset)
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
        let mut done = 0;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| Error::corrupt("offset overflows").at(offset))?;
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::io("read failed", e).at(pos).with_path(&self.path));
                }
            }
        }
        Ok(done)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(
                Error::new(ErrorKind::ReadOnly, "file is open read-only").with_path(&self.path)
            );
        }
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::io("write failed", e)
                .at(offset)
                .with_path(&self.path)
        })
    }

    /// Deallocates `len` bytes at `offset` (they read as zeros afterwards)
    /// without changing the file size; where the host filesystem cannot
    /// punch holes, writes zeros instead.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        if !self.writable {
            return Err(
                Error::new(ErrorKind::ReadOnly, "file is open read-only").with_path(&self.path)
            );
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(Error::new(ErrorKind::OutOfRange, "hole beyond any file size").at(offset));
        };
        // SAFETY: a plain fallocate on our own open descriptor.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(Error::io("punching a hole failed", e)
                .at(offset)
                .with_path(&self.path));
        }
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Makes written data durable (fdatasync).
    pub fn sync_data(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync failed", e).with_path(&self.path))
    }

    /// Bytes the file occupies on the host (st_blocks * 512).
    pub fn host_allocated(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }
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
    fn fifos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(HostFile::open(&p).unwrap_err().kind(), ErrorKind::Policy);
    }
}
