//! The FUSE adapter, and only that: each fuser request is decoded, handed
//! to the FUSE-free [`Tree`] (the mount directory and its [`Disk`]s, which
//! hold every disk rule: windows, lseek, fallocate modes, `st_blocks`,
//! xattrs, read-only refusals), and its answer or [`FsError`] encoded back:
//! errors become errnos in one place, [`FsError::errno`]. What stays here
//! is what only the kernel connection has: INIT negotiation, passthrough
//! backing ids and the io_uring transport's start; `mount` holds the
//! mounting itself.
//!
//! fuser runs several worker threads (`n_threads` with `clone_fd`), and the
//! filesystem takes `&self`, so requests are served concurrently; no lock
//! is held while replying. This module (with its `mount` and `uring`
//! children) is the only one that imports `fuser`.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use log::{debug, info};

mod blocks;
mod disk;
mod errno;
mod mount;
pub mod partitions;
#[cfg(test)]
pub(crate) mod tests;
mod tree;
pub mod uring;
pub use disk::{Disk, Seek, Xattr};
pub use errno::FsError;
pub use mount::{mount, MountConfig, Session, Transport, Unmounter};
pub use tree::{Access, Stat, Tree, ROOT, TTL, WRITABLE_TTL};

impl From<FsError> for fuser::Errno {
    fn from(e: FsError) -> fuser::Errno {
        fuser::Errno::from_i32(e.errno())
    }
}

/// Background requests the kernel may have outstanding.
const MAX_BACKGROUND: u16 = 64;

thread_local! {
    /// Each worker thread's read buffer, reused across requests: no
    /// allocation and no zeroing per request (the chain fills every byte).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Largest read or write request we ask the kernel for.
pub const MAX_REQUEST: u32 = 1 << 20;

/// The mounted filesystem: the FUSE-free [`Tree`] and what belongs to the
/// kernel connection.
pub struct VdiskFs {
    /// The files and every operation on them.
    pub tree: Tree,
    /// Kernel passthrough was negotiated (and not disabled).
    passthrough: AtomicBool,
    /// Passthrough backing ids per inode, with their number of open handles:
    /// the kernel wants every passthrough open of an inode to use one id.
    backing_ids: parking_lot::Mutex<std::collections::HashMap<u64, (Arc<fuser::BackingId>, u32)>>,
    /// Which inode each passthrough handle belongs to.
    passthrough_fhs: parking_lot::Mutex<std::collections::HashMap<u64, u64>>,
    next_fh: AtomicU64,
    /// Ask for `FUSE_OVER_IO_URING` at INIT (rings are ready to register).
    uring_wanted: AtomicBool,
    /// The kernel agreed to it at INIT.
    uring_agreed: AtomicBool,
    /// The io_uring transport, while it runs.
    ring: parking_lot::Mutex<Option<uring::Ring>>,
    /// Sends the kernel cache invalidations, once mounted.
    notifier: std::sync::OnceLock<fuser::Notifier>,
}

/// The filesystem as fuser holds it: shared with the io_uring transport.
struct FuserFs(Arc<VdiskFs>);

impl std::ops::Deref for FuserFs {
    type Target = VdiskFs;
    fn deref(&self) -> &VdiskFs {
        &self.0
    }
}

/// fuser's attributes for a [`Stat`].
fn file_attr(s: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(s.ino),
        size: s.size,
        blocks: s.blocks,
        atime: s.time,
        mtime: s.time,
        ctime: s.time,
        crtime: s.time,
        kind: if s.dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: s.perm,
        nlink: s.nlink,
        uid: s.uid,
        gid: s.gid,
        rdev: 0,
        blksize: s.blksize,
        flags: 0,
    }
}

impl VdiskFs {
    /// A filesystem exposing `disks`. With `single_file`, exactly one disk is
    /// the mount root itself.
    pub fn new(disks: Vec<Disk>, single_file: bool, access: Access) -> VdiskFs {
        VdiskFs {
            tree: Tree::new(disks, single_file, access),
            passthrough: AtomicBool::new(true),
            backing_ids: parking_lot::Mutex::new(std::collections::HashMap::new()),
            passthrough_fhs: parking_lot::Mutex::new(std::collections::HashMap::new()),
            next_fh: AtomicU64::new(1),
            uring_wanted: AtomicBool::new(false),
            uring_agreed: AtomicBool::new(false),
            ring: parking_lot::Mutex::new(None),
            notifier: std::sync::OnceLock::new(),
        }
    }

    /// After `[offset, offset + len)` of `chain` was written around FUSE
    /// (over NBD, `mount --nbd`): the files showing the range recount their
    /// blocks, and the kernel drops its cached pages of the range (files
    /// are opened with `FOPEN_KEEP_CACHE`, so without this a reader of the
    /// mount would see the old bytes until the page cache let them go).
    pub fn changed_around(&self, chain: &Arc<crate::chain::Chain>, offset: u64, len: u64) {
        for (ino, off, n) in self.tree.changed_around(chain, offset, len) {
            let Some(notifier) = self.notifier.get() else {
                // Not mounted yet: the kernel caches nothing of it.
                continue;
            };
            let (off, n) = (
                off.try_into().unwrap_or(i64::MAX),
                n.try_into().unwrap_or(0),
            );
            if let Err(e) = notifier.inval_inode(INodeNo(ino), off, n) {
                // ENOENT: the kernel holds no such inode (never looked up).
                if e.raw_os_error() != Some(libc::ENOENT) {
                    log::warn!("cannot drop the kernel's cached pages of inode {ino}: {e}");
                }
            }
        }
    }

    /// Turns off FUSE passthrough (on by default where the kernel has it).
    pub fn without_passthrough(self) -> VdiskFs {
        self.passthrough.store(false, Ordering::Relaxed);
        self
    }

    /// Opens `disk` with kernel passthrough to its host file, when the whole
    /// disk is one host file byte for byte; gives `reply` back otherwise.
    fn try_passthrough(&self, ino: INodeNo, disk: &Disk, reply: ReplyOpen) -> Option<ReplyOpen> {
        if !self.passthrough.load(Ordering::Relaxed) {
            return Some(reply);
        }
        let Some(file) = disk.passthrough_file() else {
            return Some(reply);
        };
        let mut ids = self.backing_ids.lock();
        let entry = match ids.entry(ino.0) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match reply.open_backing(file.file()) {
                Ok(id) => v.insert((Arc::new(id), 0)),
                Err(e) => {
                    debug!("passthrough unavailable for {:?}: {e}", disk.name);
                    return Some(reply);
                }
            },
        };
        entry.1 += 1;
        let id = entry.0.clone();
        drop(ids);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.passthrough_fhs.lock().insert(fh, ino.0);
        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
        None
    }
}

/// Sends an xattr answer.
fn reply_xattr(x: Result<Xattr<'_>, FsError>, reply: ReplyXattr) {
    match x {
        Ok(Xattr::Size(n)) => reply.size(n),
        Ok(Xattr::Data(v)) => reply.data(&v),
        Err(e) => reply.error(e.into()),
    }
}

impl Filesystem for FuserFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_REQUEST) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(MAX_REQUEST) {
            let _ = config.set_max_readahead(nearest);
        }
        // Let the kernel keep several O_DIRECT requests of one submitter in
        // flight (fio iodepth, qemu-img, databases): without FUSE_ASYNC_DIO
        // a queue of 32 reaches us one request at a time.
        if config
            .add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO)
            .is_err()
        {
            info!(
                "the kernel offers no FUSE_ASYNC_DIO; direct I/O is served one request at a time"
            );
        }
        // Background requests (readahead, async direct I/O) the kernel may
        // queue before it throttles: the default of 12 starves our workers.
        if let Err(nearest) = config.set_max_background(MAX_BACKGROUND) {
            let _ = config.set_max_background(nearest);
        }
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        // Our files never carry setuid bits or file capabilities: taking the
        // "kill privileges on write" duty spares the kernel a
        // getxattr("security.capability") round trip before every write.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        // Writable mounts: the kernel's writeback cache gathers buffered
        // writes in its page cache and sends them as large requests, while
        // fsync still sends everything and then FSYNC (docs/writes.md).
        if self.tree.any_writable()
            && config
                .add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE)
                .is_err()
        {
            info!("the kernel offers no FUSE writeback cache; buffered writes are sent one by one");
        }
        // FUSE passthrough: the kernel reads and writes the host file of a
        // raw image itself. Needs kernel support and privileges; without
        // them every open falls back to serving I/O here.
        let wanted = self.passthrough.load(Ordering::Relaxed);
        let ok = wanted
            && config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.passthrough.store(ok, Ordering::Relaxed);
        if wanted && !ok {
            info!("the kernel offers no FUSE passthrough; serving raw images in user space");
        }
        if self.uring_wanted.load(Ordering::Relaxed) {
            let ok = config
                .add_capabilities(fuser::InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            self.uring_agreed.store(ok, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.tree.lookup(parent.0, name) {
            Ok(s) => reply.entry(&self.tree.ttl(), &file_attr(&s), fuser::Generation(0)),
            Err(e) => reply.error(e.into()),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.getattr(ino.0) {
            Ok(s) => reply.attr(&self.tree.ttl(), &file_attr(&s)),
            Err(e) => reply.error(e.into()),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let disk = match self
            .tree
            .open(ino.0, flags.acc_mode() != OpenAccMode::O_RDONLY)
        {
            Ok(d) => d,
            Err(e) => return reply.error(e.into()),
        };
        let Some(reply) = self.try_passthrough(ino, disk, reply) else {
            return;
        };
        // Every change goes through this mount (and so through the kernel's
        // page cache) or, over NBD from this daemon, drops the pages it
        // changed (`changed_around`): the kernel may keep what it read
        // across opens.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(ino) = self.passthrough_fhs.lock().remove(&fh.0) {
            let mut ids = self.backing_ids.lock();
            if let Some(entry) = ids.get_mut(&ino) {
                entry.1 -= 1;
                if entry.1 == 0 {
                    ids.remove(&ino);
                }
            }
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        READ_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            match self.tree.read(ino.0, offset, &mut buf[..size as usize]) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(e.into()),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let from_cache = write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        match self.tree.write(ino.0, offset, data, from_cache) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e.into()),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.tree.fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.tree.fallocate(ino.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.tree.setattr(ino.0, size) {
            Ok(s) => reply.attr(&self.tree.ttl(), &file_attr(&s)),
            Err(e) => reply.error(e.into()),
        }
    }

    fn destroy(&mut self) {
        // The ring's workers first: none may still be writing when the
        // disks are flushed for the last time.
        let ring = self.ring.lock().take();
        if let Some(ring) = ring {
            ring.join();
        }
        self.tree.destroy();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.tree.readdir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(e.into()),
        };
        for (i, (ino, dir, name)) in entries.iter().enumerate().skip(offset as usize) {
            let kind = if *dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(*ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, files) = self.tree.statfs();
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(self.tree.getxattr(ino.0, name, size), reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(self.tree.listxattr(ino.0, size), reply);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.tree.lseek(ino.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e.into()),
        }
    }
}
