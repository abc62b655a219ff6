//! The mounted tree, free of FUSE: a directory of exposed [`Disk`]s (or one
//! disk that is the mount root itself), their inode numbers, attributes and
//! directory entries, and each request of the protocol as a plain method
//! taking inode numbers and returning [`FsError`]. The fuser adapter
//! (`fs/mod.rs`) and the io_uring transport (`fs/uring/`) are thin layers
//! over it, so a request means the same whichever way it arrived.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use log::{error, info};

use super::disk::{Disk, Seek, Xattr};
use super::errno::FsError;
use crate::chain::Chain;

/// How long the kernel may cache entries and attributes of a read-only
/// mount: nothing about its files ever changes.
pub const TTL: Duration = Duration::from_secs(3600);

/// The same for a writable mount: `st_blocks` changes as the disks are
/// written and discarded, and the kernel asks again only once this ran out.
pub const WRITABLE_TTL: Duration = Duration::from_secs(1);

/// Inode of the mount root.
pub const ROOT: u64 = 1;

/// Ownership and permissions of the exposed files.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    /// Owner of the files.
    pub uid: u32,
    /// Group of the files.
    pub gid: u32,
    /// Permission bits of the files (the directory gets x where r is set).
    pub mode: u16,
}

/// Attributes of an inode, as both transports encode them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Inode number.
    pub ino: u64,
    /// The mount directory (else a disk file).
    pub dir: bool,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// Permission bits.
    pub perm: u16,
    /// Links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Preferred I/O size.
    pub blksize: u32,
    /// Every time stamp (the mount's start).
    pub time: SystemTime,
}

/// The mounted tree.
pub struct Tree {
    disks: Vec<Disk>,
    /// One disk mounted over a regular file: the root inode is the disk.
    single_file: bool,
    access: Access,
    mounted_at: SystemTime,
    ttl: Duration,
}

impl Tree {
    /// A tree exposing `disks`. With `single_file`, exactly one disk is the
    /// mount root itself.
    pub fn new(mut disks: Vec<Disk>, single_file: bool, access: Access) -> Tree {
        Disk::link_peers(&mut disks);
        let ttl = if disks.iter().any(Disk::is_writable) {
            WRITABLE_TTL
        } else {
            TTL
        };
        Tree {
            ttl,
            disks,
            single_file,
            access,
            mounted_at: SystemTime::now(),
        }
    }

    /// The exposed disks.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// The disk behind inode `ino`, if it is one.
    pub fn disk(&self, ino: u64) -> Option<&Disk> {
        if self.single_file {
            return (ino == ROOT).then(|| &self.disks[0]);
        }
        let idx = ino.checked_sub(ROOT + 1)?;
        self.disks.get(usize::try_from(idx).ok()?)
    }

    /// The disk behind `ino`, or why a disk operation does not apply.
    fn file(&self, ino: u64) -> Result<&Disk, FsError> {
        self.disk(ino).ok_or(if ino == ROOT {
            FsError::IsDir
        } else {
            FsError::NotFound
        })
    }

    fn disk_ino(idx: usize) -> u64 {
        ROOT + 1 + idx as u64
    }

    /// After `[offset, offset + len)` of `chain` was written around this
    /// tree (over NBD from the same daemon): marks the range in the
    /// allocation count of every file showing it (the whole disk and its
    /// partitions), and returns each such file's inode with the range in
    /// file positions, whose pages the kernel may still cache.
    pub fn changed_around(
        &self,
        chain: &Arc<Chain>,
        offset: u64,
        len: u64,
    ) -> Vec<(u64, u64, u64)> {
        let end = offset.saturating_add(len);
        let mut files = Vec::new();
        for (idx, d) in self.disks.iter().enumerate() {
            let (s, e) = (offset.max(d.base()), end.min(d.base() + d.size()));
            if !Arc::ptr_eq(&d.chain, chain) || s >= e {
                continue;
            }
            d.mark(s - d.base(), e - s);
            let ino = if self.single_file {
                ROOT
            } else {
                Self::disk_ino(idx)
            };
            files.push((ino, s - d.base(), e - s));
        }
        files
    }

    fn file_stat(&self, ino: u64, disk: &Disk) -> Stat {
        Stat {
            ino,
            dir: false,
            size: disk.size(),
            blocks: disk.blocks(),
            perm: self.access.mode,
            nlink: 1,
            uid: self.access.uid,
            gid: self.access.gid,
            blksize: 64 * 1024,
            time: self.mounted_at,
        }
    }

    fn dir_stat(&self) -> Stat {
        let m = self.access.mode;
        // Directory: readable where the files are, searchable by the same.
        let perm = (m | ((m & 0o444) >> 2)) & 0o555;
        Stat {
            ino: ROOT,
            dir: true,
            size: 0,
            blocks: 0,
            perm,
            nlink: 2,
            uid: self.access.uid,
            gid: self.access.gid,
            blksize: 4096,
            time: self.mounted_at,
        }
    }

    /// How long the kernel may cache what LOOKUP and GETATTR answered.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether any disk accepts writes (the writeback cache is then asked for).
    pub fn any_writable(&self) -> bool {
        self.disks.iter().any(Disk::is_writable)
    }

    /// LOOKUP of `name` in the mount directory.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Stat, FsError> {
        if parent != ROOT || self.single_file {
            return Err(FsError::NotFound);
        }
        let idx = self
            .disks
            .iter()
            .position(|d| d.name == name)
            .ok_or(FsError::NotFound)?;
        let ino = Self::disk_ino(idx);
        Ok(self.file_stat(ino, &self.disks[idx]))
    }

    /// GETATTR.
    pub fn getattr(&self, ino: u64) -> Result<Stat, FsError> {
        if ino == ROOT && !self.single_file {
            return Ok(self.dir_stat());
        }
        let disk = self.disk(ino).ok_or(FsError::NotFound)?;
        Ok(self.file_stat(ino, disk))
    }

    /// SETATTR: only a size change could matter, and a disk's size is fixed
    /// (truncate is refused, where qemu's export would resize the image).
    /// Mode, owner and times are set at mount time; accepted and ignored.
    pub fn setattr(&self, ino: u64, size: Option<u64>) -> Result<Stat, FsError> {
        let stat = self.getattr(ino)?;
        match size {
            Some(s) if s != stat.size => Err(FsError::NotPermitted),
            _ => Ok(stat),
        }
    }

    /// The checks of OPEN: the disk, and write access to it.
    pub fn open(&self, ino: u64, write: bool) -> Result<&Disk, FsError> {
        let disk = self.file(ino)?;
        if write && !disk.is_writable() {
            return Err(FsError::ReadOnly);
        }
        Ok(disk)
    }

    /// READ of up to `buf.len()` bytes at `offset`.
    pub fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize, FsError> {
        self.file(ino)?.read(offset, buf)
    }

    /// WRITE of `data` at `offset` (`from_cache`: a writeback-cache flush).
    pub fn write(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        from_cache: bool,
    ) -> Result<u32, FsError> {
        self.file(ino)?.write(offset, data, from_cache)
    }

    /// FSYNC: everything written so far reaches stable storage.
    pub fn fsync(&self, ino: u64) -> Result<(), FsError> {
        self.disk(ino).map_or(Ok(()), Disk::flush)
    }

    /// FALLOCATE with Linux `mode` bits.
    pub fn fallocate(&self, ino: u64, offset: u64, length: u64, mode: i32) -> Result<(), FsError> {
        self.file(ino)?.fallocate(offset, length, mode)
    }

    /// LSEEK with `SEEK_DATA` or `SEEK_HOLE` (the kernel answers the others).
    pub fn lseek(&self, ino: u64, offset: i64, whence: i32) -> Result<i64, FsError> {
        let disk = self.file(ino)?;
        let offset = u64::try_from(offset).map_err(|_| FsError::Invalid)?;
        let to = match whence {
            libc::SEEK_DATA => Seek::Data,
            libc::SEEK_HOLE => Seek::Hole,
            _ => return Err(FsError::Invalid),
        };
        let pos = disk.seek(offset, to)?;
        i64::try_from(pos).map_err(|_| FsError::Invalid)
    }

    /// GETXATTR of `name`, for a buffer of `size` bytes.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<Xattr<'_>, FsError> {
        self.disk(ino).ok_or(FsError::NoAttr)?.getxattr(name, size)
    }

    /// LISTXATTR, for a buffer of `size` bytes (the directory has none).
    pub fn listxattr(&self, ino: u64, size: u32) -> Result<Xattr<'_>, FsError> {
        let list = self.disk(ino).map(Disk::xattr_names).unwrap_or_default();
        Xattr::fit(list.into(), size)
    }

    /// STATFS: (blocks, files), in 4 KiB blocks, nothing free.
    pub fn statfs(&self) -> (u64, u64) {
        let total: u64 = self.disks.iter().map(|d| d.size().div_ceil(4096)).sum();
        (total, self.disks.len() as u64 + 1)
    }

    /// The entries of the mount directory: (inode, is a directory, name).
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, bool, &OsStr)>, FsError> {
        if ino != ROOT || self.single_file {
            return Err(FsError::NotDir);
        }
        let mut entries = vec![
            (ROOT, true, OsStr::new(".")),
            (ROOT, true, OsStr::new("..")),
        ];
        for (idx, d) in self.disks.iter().enumerate() {
            entries.push((Self::disk_ino(idx), false, d.name.as_os_str()));
        }
        Ok(entries)
    }

    /// Final flush of every disk, when the mount ends.
    pub fn destroy(&self) {
        for d in &self.disks {
            match d.chain.flush() {
                Ok(()) => info!("flushed {:?}", d.name),
                Err(e) => error!("final flush of {:?} failed: {e}", d.name),
            }
        }
    }
}
