//! The FUSE operations as plain functions of [`VdiskFs`], free of any
//! transport: both the classic `/dev/fuse` loop (fuser, in `fs/mod.rs`)
//! and the io_uring transport (`fs/uring/`) call these, so a request
//! means the same thing whichever way it arrived. Errors are errnos.

use std::ffi::OsStr;

use fuser::{Errno, FileAttr, INodeNo};
use log::{debug, error};

use super::{Disk, VdiskFs, ROOT};
use crate::chain::Status;

/// The answer to a getxattr or listxattr.
pub enum Xattr<'a> {
    /// The caller asked for the size only (`size == 0`).
    Size(u32),
    /// The value (or the NUL-separated list of names).
    Data(std::borrow::Cow<'a, [u8]>),
}

fn errno(e: &crate::error::Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl VdiskFs {
    /// LOOKUP of `name` in the mount directory.
    pub(super) fn op_lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        if parent != ROOT || self.single_file {
            return Err(Errno::ENOENT);
        }
        let idx = self
            .disks
            .iter()
            .position(|d| d.name == name)
            .ok_or(Errno::ENOENT)?;
        let ino = self.disk_ino(idx);
        Ok(self.file_attr(ino, &self.disks[idx]))
    }

    /// GETATTR.
    pub(super) fn op_getattr(&self, ino: u64) -> Result<FileAttr, Errno> {
        self.attr(INodeNo(ino)).ok_or(Errno::ENOENT)
    }

    /// SETATTR: only a size change could matter, and a disk's size is fixed
    /// (truncate is refused, where qemu's export would resize the image).
    /// Mode, owner and times are set at mount time; accepted and ignored.
    pub(super) fn op_setattr(&self, ino: u64, size: Option<u64>) -> Result<FileAttr, Errno> {
        let attr = self.attr(INodeNo(ino)).ok_or(Errno::ENOENT)?;
        match size {
            Some(s) if s != attr.size => Err(Errno::EPERM),
            _ => Ok(attr),
        }
    }

    /// The checks of OPEN: the disk, and write access to it.
    pub(super) fn op_open(&self, ino: u64, write: bool) -> Result<&Disk, Errno> {
        let disk = self.disk(INodeNo(ino)).ok_or(Errno::EISDIR)?;
        if write && !disk.chain.is_writable() {
            return Err(Errno::EROFS);
        }
        Ok(disk)
    }

    /// READ of up to `buf.len()` bytes at `offset` into `buf`; the number of
    /// bytes read (short only at the end of the disk).
    pub(super) fn op_read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        let disk = self.disk(INodeNo(ino)).ok_or(Errno::EISDIR)?;
        let end = disk.size();
        if offset >= end {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(end - offset) as usize;
        let buf = &mut buf[..len];
        match disk.chain.read_at(buf, disk.base() + offset) {
            Ok(()) => Ok(len),
            Err(e) => {
                error!("read of {len} bytes at {offset:#x} of {:?}: {e}", disk.name);
                Err(errno(&e))
            }
        }
    }

    /// What a READ of `ino` goes to: the disk's chain, the offset of the
    /// exposed file in it, and the file's size (for transports that read
    /// the host files themselves, `fs/uring/hostread.rs`).
    pub(super) fn op_read_target(
        &self,
        ino: u64,
    ) -> Result<(&crate::chain::Chain, u64, u64), Errno> {
        let disk = self.disk(INodeNo(ino)).ok_or(Errno::EISDIR)?;
        Ok((&disk.chain, disk.base(), disk.size()))
    }

    /// WRITE of `data` at `offset`; the number of bytes written.
    pub(super) fn op_write(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        from_cache: bool,
    ) -> Result<u32, Errno> {
        let disk = self.disk(INodeNo(ino)).ok_or(Errno::EISDIR)?;
        let size = disk.size();
        if offset >= size {
            // The disk has a fixed size, like a block device.
            return Err(Errno::ENOSPC);
        }
        let len = (data.len() as u64).min(size - offset) as usize;
        // From the writeback cache (`from_cache`), a short count would be
        // dropped in silence (the writer was told long ago that all of it
        // was written): the part inside the disk is written and the rest
        // is refused, which the writer's fsync reports.
        let cut = len < data.len() && from_cache;
        match disk.chain.write_at(&data[..len], disk.base() + offset) {
            Ok(()) => {
                disk.invalidate_blocks();
                if cut {
                    Err(Errno::ENOSPC)
                } else {
                    Ok(len as u32)
                }
            }
            Err(e) => {
                error!(
                    "write of {len} bytes at {offset:#x} of {:?}: {e}",
                    disk.name
                );
                Err(errno(&e))
            }
        }
    }

    /// FSYNC: everything written so far reaches stable storage.
    pub(super) fn op_fsync(&self, ino: u64) -> Result<(), Errno> {
        let Some(disk) = self.disk(INodeNo(ino)) else {
            return Ok(());
        };
        disk.chain.flush().map_err(|e| {
            error!("fsync of {:?}: {e}", disk.name);
            errno(&e)
        })
    }

    /// FALLOCATE: preallocation is a no-op, punching or zeroing a range
    /// writes zeroes; the size never changes.
    pub(super) fn op_fallocate(
        &self,
        ino: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        let disk = self.disk(INodeNo(ino)).ok_or(Errno::EISDIR)?;
        if !disk.chain.is_writable() {
            return Err(Errno::EROFS);
        }
        let size = disk.size();
        let end = offset.checked_add(length).ok_or(Errno::EINVAL)?;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let op = mode & !libc::FALLOC_FL_KEEP_SIZE;
        if end > size && !keep {
            // The size of a disk never changes.
            return Err(Errno::ENOSPC);
        }
        let end = end.min(size);
        debug!(
            "fallocate({mode:#x}) {length} bytes at {offset:#x} of {:?}",
            disk.name
        );
        let result = match op {
            // Preallocation: every byte of the disk already exists.
            0 => Ok(()),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE if offset < end => {
                disk.chain.write_zeroes(disk.base() + offset, end - offset)
            }
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE => Ok(()),
            _ => return Err(Errno::EOPNOTSUPP),
        };
        match result {
            Ok(()) => {
                disk.invalidate_blocks();
                Ok(())
            }
            Err(e) => {
                error!(
                    "fallocate({mode:#x}) of {length} bytes at {offset:#x} of {:?}: {e}",
                    disk.name
                );
                Err(errno(&e))
            }
        }
    }

    /// LSEEK with SEEK_DATA or SEEK_HOLE; the position found.
    pub(super) fn op_lseek(&self, ino: u64, offset: i64, whence: i32) -> Result<i64, Errno> {
        let disk = self.disk(INodeNo(ino)).ok_or(Errno::EISDIR)?;
        // Positions in the chain; replies are relative to the exposed file.
        let base = disk.base();
        let size = base + disk.size();
        let start = u64::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(base))
            .ok_or(Errno::EINVAL)?;
        if start >= size {
            return Err(Errno::ENXIO);
        }
        let want = match whence {
            libc::SEEK_DATA => Status::Data,
            libc::SEEK_HOLE => Status::Hole,
            _ => return Err(Errno::EINVAL),
        };
        let mut pos = start;
        while pos < size {
            match disk.chain.status(pos, size - pos) {
                Ok((s, _)) if s == want => return Ok((pos - base) as i64),
                Ok((_, n)) => pos += n.max(1),
                Err(e) => {
                    debug!("lseek status at {pos:#x}: {e}");
                    // Unknown allocation is data.
                    return Ok(match want {
                        Status::Data => (pos - base) as i64,
                        Status::Hole => (size - base) as i64,
                    });
                }
            }
        }
        match want {
            Status::Data => Err(Errno::ENXIO),
            // The end of the file is an implicit hole.
            Status::Hole => Ok((size - base) as i64),
        }
    }

    /// GETXATTR of `name`, for a buffer of `size` bytes.
    pub(super) fn op_getxattr(
        &self,
        ino: u64,
        name: &OsStr,
        size: u32,
    ) -> Result<Xattr<'_>, Errno> {
        let disk = self.disk(INodeNo(ino)).ok_or(Errno::NO_XATTR)?;
        match disk.xattrs.iter().find(|(k, _)| OsStr::new(k) == name) {
            Some((_, v)) if size == 0 => Ok(Xattr::Size(v.len() as u32)),
            Some((_, v)) if v.len() <= size as usize => Ok(Xattr::Data(v.as_slice().into())),
            Some(_) => Err(Errno::ERANGE),
            None => Err(Errno::NO_XATTR),
        }
    }

    /// LISTXATTR, for a buffer of `size` bytes.
    pub(super) fn op_listxattr(&self, ino: u64, size: u32) -> Result<Xattr<'_>, Errno> {
        let mut list = Vec::new();
        if let Some(disk) = self.disk(INodeNo(ino)) {
            for (k, _) in &disk.xattrs {
                list.extend_from_slice(k.as_bytes());
                list.push(0);
            }
        }
        if size == 0 {
            Ok(Xattr::Size(list.len() as u32))
        } else if list.len() <= size as usize {
            Ok(Xattr::Data(list.into()))
        } else {
            Err(Errno::ERANGE)
        }
    }

    /// STATFS: (blocks, files), in 4 KiB blocks, nothing free.
    pub(super) fn op_statfs(&self) -> (u64, u64) {
        let total: u64 = self.disks.iter().map(|d| d.size().div_ceil(4096)).sum();
        (total, self.disks.len() as u64 + 1)
    }

    /// The entries of the mount directory: (inode, is a directory, name).
    pub(super) fn op_readdir(&self, ino: u64) -> Result<Vec<(u64, bool, &OsStr)>, Errno> {
        if ino != ROOT || self.single_file {
            return Err(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (ROOT, true, OsStr::new(".")),
            (ROOT, true, OsStr::new("..")),
        ];
        for (idx, d) in self.disks.iter().enumerate() {
            entries.push((self.disk_ino(idx).0, false, d.name.as_os_str()));
        }
        Ok(entries)
    }

    /// Final flush of every disk, when the mount ends.
    pub(super) fn op_destroy(&self) {
        for d in &self.disks {
            match d.chain.flush() {
                Ok(()) => log::info!("flushed {:?}", d.name),
                Err(e) => error!("final flush of {:?} failed: {e}", d.name),
            }
        }
    }
}
