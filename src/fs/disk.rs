//! One exposed raw file, free of FUSE: its size and allocated blocks, and
//! the byte-level operations on it (read, write, fallocate, SEEK_DATA and
//! SEEK_HOLE, flush, extended attributes), each turned into calls on its
//! [`Chain`] through an optional window (a partition). The FUSE adapter
//! and the io_uring transport both call these; tests call them directly.

use std::borrow::Cow;
use std::ffi::{OsStr, OsString};
use std::sync::Arc;

use log::{debug, error};

use super::blocks::Blocks;
use super::errno::FsError;
use crate::chain::{Chain, Status};
use crate::host::HostFile;

/// Where lseek looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seek {
    /// The next position holding data (`SEEK_DATA`).
    Data,
    /// The next position in a hole (`SEEK_HOLE`); the end is one.
    Hole,
}

/// The answer to a getxattr or listxattr.
pub enum Xattr<'a> {
    /// The caller asked for the size only (`size == 0`).
    Size(u32),
    /// The value (or the NUL-separated list of names).
    Data(Cow<'a, [u8]>),
}

impl Xattr<'_> {
    /// The answer for a caller's buffer of `size` bytes (0: the size only).
    pub fn fit(value: Cow<'_, [u8]>, size: u32) -> Result<Xattr<'_>, FsError> {
        if size == 0 {
            Ok(Xattr::Size(value.len() as u32))
        } else if value.len() <= size as usize {
            Ok(Xattr::Data(value))
        } else {
            Err(FsError::Range)
        }
    }
}

/// One exposed raw file.
pub struct Disk {
    /// File name inside the mount directory (`disk.raw`).
    pub name: OsString,
    /// The chain behind it.
    pub chain: Arc<Chain>,
    /// Extended attributes (`user.vdiskfs.*`) describing the disk.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// A window (offset, length) onto the chain: a partition of the disk.
    window: Option<(u64, u64)>,
    blocks: Arc<Blocks>,
    /// The counters of the other files on the same chain (the whole disk
    /// and its partitions), with their windows: a write through one file
    /// changes what the others hold.
    peers: Vec<(u64, u64, Arc<Blocks>)>,
}

impl Disk {
    /// A disk exposed under `name`.
    pub fn new(name: OsString, chain: Arc<Chain>, xattrs: Vec<(String, Vec<u8>)>) -> Disk {
        let blocks = Arc::new(Blocks::new(chain.size()));
        Disk {
            name,
            chain,
            xattrs,
            window: None,
            blocks,
            peers: Vec::new(),
        }
    }

    /// Exposes only `length` bytes of the chain starting at `offset` (a
    /// partition); the range must lie inside the chain.
    pub fn with_window(mut self, offset: u64, length: u64) -> Disk {
        debug_assert!(offset
            .checked_add(length)
            .is_some_and(|e| e <= self.chain.size()));
        self.window = Some((offset, length));
        self.blocks = Arc::new(Blocks::new(length));
        self
    }

    /// Lets every disk of `disks` that shares its chain with others mark
    /// their allocation counts as changed when it writes.
    pub fn link_peers(disks: &mut [Disk]) {
        for i in 0..disks.len() {
            let peers = disks
                .iter()
                .enumerate()
                .filter(|(j, d)| *j != i && Arc::ptr_eq(&d.chain, &disks[i].chain))
                .map(|(_, d)| (d.base(), d.size(), d.blocks.clone()))
                .collect();
            disks[i].peers = peers;
        }
    }

    /// Marks `[offset, offset + len)` of this file as changed in its own
    /// allocation count only (a write made around the files, see
    /// [`super::Tree::changed_around`], marks each file itself).
    pub(super) fn mark(&self, offset: u64, len: u64) {
        self.blocks.touched(offset, len);
    }

    /// Marks `[offset, offset + len)` of this file as changed, in its own
    /// allocation count and in those of the files it overlaps.
    fn touched(&self, offset: u64, len: u64) {
        self.blocks.touched(offset, len);
        let start = self.base() + offset;
        let end = start + len;
        for (base, size, blocks) in &self.peers {
            let (s, e) = (start.max(*base), end.min(base + size));
            if s < e {
                blocks.touched(s - base, e - s);
            }
        }
    }

    /// Where the exposed file starts in the chain.
    pub fn base(&self) -> u64 {
        self.window.map_or(0, |w| w.0)
    }

    /// Size of the exposed file.
    pub fn size(&self) -> u64 {
        self.window.map_or_else(|| self.chain.size(), |w| w.1)
    }

    /// Whether writes are accepted.
    pub fn is_writable(&self) -> bool {
        self.chain.is_writable()
    }

    /// Allocated guest data in 512-byte blocks (`st_blocks`, what `du`
    /// shows): only the ranges changed since the last call are recounted.
    pub fn blocks(&self) -> u64 {
        self.blocks
            .allocated(&self.chain, self.base(), self.size())
            .div_ceil(512)
    }

    /// The host file the whole disk is byte for byte (a raw image, not a
    /// partition window), which the kernel may then read and write itself.
    pub fn passthrough_file(&self) -> Option<Arc<HostFile>> {
        if self.window.is_some() {
            return None;
        }
        self.chain.passthrough_file()
    }

    /// Reads up to `buf.len()` bytes at `offset`; the number read (short
    /// only at the end of the disk).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize, FsError> {
        let end = self.size();
        if offset >= end {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(end - offset) as usize;
        self.chain
            .read_at(&mut buf[..len], self.base() + offset)
            .map_err(|e| {
                error!("read of {len} bytes at {offset:#x} of {:?}: {e}", self.name);
                FsError::Image(e)
            })?;
        Ok(len)
    }

    /// Writes `data` at `offset`; the number of bytes written. What lies
    /// past the end is cut off (a short count), or refused with `NoSpace`
    /// when `all_or_error` (a writeback-cache flush, whose writer was told
    /// long ago that all of it was written and would never see a short
    /// count): the part inside the disk is written either way.
    pub fn write(&self, offset: u64, data: &[u8], all_or_error: bool) -> Result<u32, FsError> {
        if !self.is_writable() {
            return Err(FsError::ReadOnly);
        }
        let size = self.size();
        if offset >= size {
            return Err(FsError::NoSpace);
        }
        let len = (data.len() as u64).min(size - offset) as usize;
        self.chain
            .write_at(&data[..len], self.base() + offset)
            .map_err(|e| {
                error!(
                    "write of {len} bytes at {offset:#x} of {:?}: {e}",
                    self.name
                );
                FsError::Image(e)
            })?;
        self.touched(offset, len as u64);
        if len < data.len() && all_or_error {
            return Err(FsError::NoSpace);
        }
        Ok(len as u32)
    }

    /// fallocate(2) with Linux `mode` bits: preallocation is a no-op (every
    /// byte of a disk exists), punching a hole or zeroing a range makes it
    /// read as zeros; the size never changes (`KEEP_SIZE` clips to it).
    pub fn fallocate(&self, offset: u64, length: u64, mode: i32) -> Result<(), FsError> {
        if !self.is_writable() {
            return Err(FsError::ReadOnly);
        }
        let size = self.size();
        let end = offset.checked_add(length).ok_or(FsError::Invalid)?;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        if end > size && !keep {
            return Err(FsError::NoSpace);
        }
        let end = end.min(size);
        debug!(
            "fallocate({mode:#x}) {length} bytes at {offset:#x} of {:?}",
            self.name
        );
        match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => Ok(()),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE if offset < end => {
                self.chain
                    .write_zeroes(self.base() + offset, end - offset)
                    .map_err(|e| {
                        error!(
                            "fallocate({mode:#x}) of {length} bytes at {offset:#x} of {:?}: {e}",
                            self.name
                        );
                        FsError::Image(e)
                    })?;
                self.touched(offset, end - offset);
                Ok(())
            }
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE => Ok(()),
            _ => Err(FsError::Unsupported),
        }
    }

    /// The first position at or after `offset` holding data (or in a hole).
    /// Ranges whose allocation cannot be read count as data.
    pub fn seek(&self, offset: u64, to: Seek) -> Result<u64, FsError> {
        let (base, size) = (self.base(), self.size());
        if offset >= size {
            return Err(FsError::NoData);
        }
        let want = match to {
            Seek::Data => Status::Data,
            Seek::Hole => Status::Hole,
        };
        let mut pos = offset;
        while pos < size {
            match self.chain.status(base + pos, size - pos) {
                Ok((s, _)) if s == want => return Ok(pos),
                Ok((_, n)) => pos += n.clamp(1, size - pos),
                Err(e) => {
                    debug!("lseek status at {pos:#x} of {:?}: {e}", self.name);
                    return Ok(match to {
                        Seek::Data => pos,
                        Seek::Hole => size,
                    });
                }
            }
        }
        match to {
            Seek::Data => Err(FsError::NoData),
            // The end of the file is an implicit hole.
            Seek::Hole => Ok(size),
        }
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), FsError> {
        self.chain.flush().map_err(|e| {
            error!("flush of {:?}: {e}", self.name);
            FsError::Image(e)
        })
    }

    /// The extended attribute `name`, for a buffer of `size` bytes.
    pub fn getxattr(&self, name: &OsStr, size: u32) -> Result<Xattr<'_>, FsError> {
        let (_, v) = self
            .xattrs
            .iter()
            .find(|(k, _)| OsStr::new(k) == name)
            .ok_or(FsError::NoAttr)?;
        Xattr::fit(v.as_slice().into(), size)
    }

    /// The NUL-separated names of the extended attributes.
    pub fn xattr_names(&self) -> Vec<u8> {
        let mut list = Vec::new();
        for (k, _) in &self.xattrs {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        list
    }
}
