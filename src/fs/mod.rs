//! The FUSE layer, and only that: a directory of exposed raw files (or one
//! file mounted over a regular file), their attributes, reads, writes,
//! fsync, fallocate, lseek and xattrs; `mount` holds the mounting itself.
//!
//! Each FUSE request is translated into calls on a [`Chain`] and the
//! result or its errno is sent back. fuser runs several worker threads
//! (`n_threads` with `clone_fd`), and the filesystem takes `&self`, so
//! requests are served concurrently; no lock is held while replying.
//! This module (with its `mount` child) is the only one that imports `fuser`.

use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use log::{debug, info};

use crate::chain::{Chain, Status};

mod mount;
mod ops;
pub mod partitions;
pub mod uring;
pub use mount::{mount, MountConfig, Session, Transport, Unmounter};
use ops::Xattr;

/// How long the kernel may cache attributes and entries: the set of files
/// and their sizes never change while mounted.
pub(crate) const TTL: Duration = Duration::from_secs(3600);

/// Background requests the kernel may have outstanding.
const MAX_BACKGROUND: u16 = 64;

thread_local! {
    /// Each worker thread's read buffer, reused across requests: no
    /// allocation and no zeroing per request (the chain fills every byte).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Largest read or write request we ask the kernel for.
pub const MAX_REQUEST: u32 = 1 << 20;

const ROOT: u64 = 1;

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
    blocks: AtomicU64,
    blocks_valid: AtomicBool,
}

impl Disk {
    /// A disk exposed under `name`.
    pub fn new(name: OsString, chain: Arc<Chain>, xattrs: Vec<(String, Vec<u8>)>) -> Disk {
        Disk {
            name,
            chain,
            xattrs,
            window: None,
            blocks: AtomicU64::new(0),
            blocks_valid: AtomicBool::new(false),
        }
    }

    /// Exposes only `length` bytes of the chain starting at `offset` (a
    /// partition); the range must lie inside the chain.
    pub fn with_window(mut self, offset: u64, length: u64) -> Disk {
        debug_assert!(offset
            .checked_add(length)
            .is_some_and(|e| e <= self.chain.size()));
        self.window = Some((offset, length));
        self
    }

    /// Where the exposed file starts in the chain.
    fn base(&self) -> u64 {
        self.window.map_or(0, |w| w.0)
    }

    /// Size of the exposed file.
    pub fn size(&self) -> u64 {
        self.window.map_or_else(|| self.chain.size(), |w| w.1)
    }

    /// Forgets the cached allocation count after the disk changed.
    fn invalidate_blocks(&self) {
        self.blocks_valid.store(false, Ordering::Relaxed);
    }

    /// Allocated guest data in 512-byte blocks (for `st_blocks` and `du`).
    fn blocks(&self) -> u64 {
        if self.blocks_valid.load(Ordering::Relaxed) {
            return self.blocks.load(Ordering::Relaxed);
        }
        let n = {
            let size = self.base() + self.size();
            let mut pos = self.base();
            let mut data = 0;
            while pos < size {
                match self.chain.status(pos, size - pos) {
                    Ok((status, n)) => {
                        if status == Status::Data {
                            data += n;
                        }
                        pos += n.max(1);
                    }
                    // Unknown allocation counts as data: du must not under-report.
                    Err(_) => {
                        data = self.size();
                        break;
                    }
                }
            }
            data.div_ceil(512)
        };
        self.blocks.store(n, Ordering::Relaxed);
        self.blocks_valid.store(true, Ordering::Relaxed);
        n
    }
}

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

/// The mounted filesystem.
pub struct VdiskFs {
    disks: Vec<Disk>,
    /// One disk mounted over a regular file: the root inode is the disk.
    single_file: bool,
    access: Access,
    mounted_at: SystemTime,
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
}

/// The filesystem as fuser holds it: shared with the io_uring transport.
struct FuserFs(Arc<VdiskFs>);

impl std::ops::Deref for FuserFs {
    type Target = VdiskFs;
    fn deref(&self) -> &VdiskFs {
        &self.0
    }
}

impl VdiskFs {
    /// A filesystem exposing `disks`. With `single_file`, exactly one disk is
    /// the mount root itself.
    pub fn new(disks: Vec<Disk>, single_file: bool, access: Access) -> VdiskFs {
        VdiskFs {
            disks,
            single_file,
            access,
            mounted_at: SystemTime::now(),
            passthrough: AtomicBool::new(true),
            backing_ids: parking_lot::Mutex::new(std::collections::HashMap::new()),
            passthrough_fhs: parking_lot::Mutex::new(std::collections::HashMap::new()),
            next_fh: AtomicU64::new(1),
            uring_wanted: AtomicBool::new(false),
            uring_agreed: AtomicBool::new(false),
            ring: parking_lot::Mutex::new(None),
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
        // A partition window is not the host file byte for byte.
        if !self.passthrough.load(Ordering::Relaxed) || disk.window.is_some() {
            return Some(reply);
        }
        let Some(file) = disk.chain.passthrough_file() else {
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

    fn disk(&self, ino: INodeNo) -> Option<&Disk> {
        if self.single_file {
            return (ino.0 == ROOT).then(|| &self.disks[0]);
        }
        let idx = ino.0.checked_sub(ROOT + 1)?;
        self.disks.get(usize::try_from(idx).ok()?)
    }

    fn disk_ino(&self, idx: usize) -> INodeNo {
        INodeNo(ROOT + 1 + idx as u64)
    }

    fn file_attr(&self, ino: INodeNo, disk: &Disk) -> FileAttr {
        FileAttr {
            ino,
            size: disk.size(),
            blocks: disk.blocks(),
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind: FileType::RegularFile,
            perm: self.access.mode,
            nlink: 1,
            uid: self.access.uid,
            gid: self.access.gid,
            rdev: 0,
            blksize: 64 * 1024,
            flags: 0,
        }
    }

    fn dir_attr(&self) -> FileAttr {
        let m = self.access.mode;
        // Directory: readable where the files are, searchable by the same.
        let perm = m | ((m & 0o444) >> 2);
        FileAttr {
            ino: INodeNo(ROOT),
            size: 0,
            blocks: 0,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind: FileType::Directory,
            perm: perm & 0o555,
            nlink: 2,
            uid: self.access.uid,
            gid: self.access.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        if ino.0 == ROOT && !self.single_file {
            return Some(self.dir_attr());
        }
        self.disk(ino).map(|d| self.file_attr(ino, d))
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
        if self.disks.iter().any(|d| d.chain.is_writable())
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
        match self.op_lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.op_getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let disk = match self.op_open(ino.0, flags.acc_mode() != OpenAccMode::O_RDONLY) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let Some(reply) = self.try_passthrough(ino, disk, reply) else {
            return;
        };
        // Every change goes through this mount (and so through the kernel's
        // page cache), so the kernel may keep what it read across opens.
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
            match self.op_read(ino.0, offset, &mut buf[..size as usize]) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(e),
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
        match self.op_write(ino.0, offset, data, from_cache) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
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
        match self.op_fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
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
        match self.op_fallocate(ino.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
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
        match self.op_setattr(ino.0, size) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn destroy(&mut self) {
        // The ring's workers first: none may still be writing when the
        // disks are flushed for the last time.
        let ring = self.ring.lock().take();
        if let Some(ring) = ring {
            ring.join();
        }
        self.op_destroy();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.op_readdir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
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
        let (blocks, files) = self.op_statfs();
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.op_getxattr(ino.0, name, size) {
            Ok(Xattr::Size(n)) => reply.size(n),
            Ok(Xattr::Data(v)) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.op_listxattr(ino.0, size) {
            Ok(Xattr::Size(n)) => reply.size(n),
            Ok(Xattr::Data(v)) => reply.data(&v),
            Err(e) => reply.error(e),
        }
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
        match self.op_lseek(ino.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }
}
