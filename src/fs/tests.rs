//! The FUSE-free tree and disks, driven without a mount: lseek over holes
//! and data, fallocate modes, sizes and `st_blocks` (against a fresh open's
//! figure), xattrs, windows and read-only refusals.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Access, Disk, FsError, Seek, Tree, Xattr, ROOT};
use crate::cache::Caches;
use crate::chain::{Chain, ChainOptions};
use crate::format::qcow2::create::{create, CreateOptions};
use crate::host::{HostFile, HostOpen};

pub(crate) const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 * 1024;
const SIZE: u64 = 8 * MIB;

/// A new, empty 8 MiB qcow2 (64 KiB clusters) in `dir`.
pub(crate) fn new_image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.qcow2");
    std::fs::File::create(&path).unwrap();
    let how = HostOpen {
        writable: true,
        ..Default::default()
    };
    let file = HostFile::open_with(&path, how).unwrap();
    let opts = CreateOptions {
        virtual_size: SIZE,
        cluster_bits: 16,
        backing_file: None,
        backing_format: None,
    };
    create(&file, &opts).unwrap();
    path
}

pub(crate) fn open(path: &Path, writable: bool) -> Arc<Chain> {
    let opts = ChainOptions {
        writable,
        ..Default::default()
    };
    Arc::new(Chain::open(path, &opts, &Caches::new(4 * MIB as usize)).unwrap())
}

pub(crate) fn disk(chain: &Arc<Chain>) -> Disk {
    let xattrs = vec![("user.vdiskfs.format".to_string(), b"qcow2".to_vec())];
    Disk::new(OsString::from("disk.raw"), chain.clone(), xattrs)
}

fn errno<T>(r: Result<T, FsError>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.errno(),
    }
}

#[test]
fn lseek_finds_data_and_holes() {
    let dir = tempfile::tempdir().unwrap();
    let chain = open(&new_image(dir.path()), true);
    let d = disk(&chain);
    assert_eq!(errno(d.seek(0, Seek::Data)), libc::ENXIO, "empty disk");
    assert_eq!(d.seek(0, Seek::Hole).unwrap(), 0);
    d.write(MIB + 100, &[7; 10], false).unwrap();
    assert_eq!(d.seek(0, Seek::Data).unwrap(), MIB);
    assert_eq!(d.seek(MIB + 5, Seek::Data).unwrap(), MIB + 5);
    assert_eq!(d.seek(MIB, Seek::Hole).unwrap(), MIB + CLUSTER);
    assert_eq!(errno(d.seek(MIB + CLUSTER, Seek::Data)), libc::ENXIO);
    assert_eq!(d.seek(SIZE - 1, Seek::Hole).unwrap(), SIZE - 1);
    assert_eq!(errno(d.seek(SIZE, Seek::Hole)), libc::ENXIO, "at the end");
    // Through the tree: whence parsed, negative offsets refused.
    let tree = Tree::new(vec![d], true, access());
    assert_eq!(tree.lseek(ROOT, 0, libc::SEEK_DATA).unwrap(), MIB as i64);
    assert_eq!(errno(tree.lseek(ROOT, -1, libc::SEEK_DATA)), libc::EINVAL);
    assert_eq!(errno(tree.lseek(ROOT, 0, libc::SEEK_END)), libc::EINVAL);
}

#[test]
fn fallocate_modes() {
    let dir = tempfile::tempdir().unwrap();
    let chain = open(&new_image(dir.path()), true);
    let d = disk(&chain);
    d.write(0, &vec![0xaa; 3 * CLUSTER as usize], false)
        .unwrap();
    // Preallocation: nothing to do, nothing changes.
    d.fallocate(0, SIZE, 0).unwrap();
    assert_eq!(d.blocks(), 3 * CLUSTER / 512);
    // Punching the middle cluster: zeros, and a hole.
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    d.fallocate(CLUSTER, CLUSTER, punch).unwrap();
    let mut buf = vec![1; 3 * CLUSTER as usize];
    d.read(0, &mut buf).unwrap();
    assert!(buf[..CLUSTER as usize].iter().all(|&b| b == 0xaa));
    assert!(buf[CLUSTER as usize..2 * CLUSTER as usize]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(d.seek(0, Seek::Hole).unwrap(), CLUSTER);
    // Zeroing a range.
    d.fallocate(2 * CLUSTER, CLUSTER, libc::FALLOC_FL_ZERO_RANGE)
        .unwrap();
    d.read(2 * CLUSTER, &mut buf[..CLUSTER as usize]).unwrap();
    assert!(buf[..CLUSTER as usize].iter().all(|&b| b == 0));
    assert_eq!(d.blocks(), CLUSTER / 512);
    // The size is fixed: growing is refused, KEEP_SIZE clips.
    assert_eq!(errno(d.fallocate(SIZE - 1, 2, 0)), libc::ENOSPC);
    d.fallocate(0, SIZE + CLUSTER, punch).unwrap();
    assert_eq!(d.blocks(), 0);
    assert_eq!(errno(d.fallocate(u64::MAX, 2, punch)), libc::EINVAL);
    let collapse = libc::FALLOC_FL_COLLAPSE_RANGE;
    assert_eq!(errno(d.fallocate(0, CLUSTER, collapse)), libc::EOPNOTSUPP);
}

/// `st_blocks` follows writes and discards without a rescan, and agrees
/// with the figure a fresh open of the image counts from scratch.
#[test]
fn blocks_follow_writes_and_discards() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let chain = open(&path, true);
    let d = disk(&chain);
    assert_eq!(d.blocks(), 0);
    d.write(0, &vec![1; CLUSTER as usize], false).unwrap();
    assert_eq!(d.blocks(), CLUSTER / 512);
    // One byte allocates a whole cluster, in another chunk.
    d.write(5 * MIB + 3, &[1], false).unwrap();
    d.write(7 * MIB, &[1; 4096], false).unwrap();
    assert_eq!(d.blocks(), 3 * CLUSTER / 512);
    // A write across two clusters of an allocated and a new one.
    d.write(CLUSTER - 1, &[2; 2], false).unwrap();
    assert_eq!(d.blocks(), 4 * CLUSTER / 512);
    d.fallocate(
        0,
        2 * CLUSTER,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    assert_eq!(d.blocks(), 2 * CLUSTER / 512);
    d.flush().unwrap();
    let fresh = disk(&open(&path, false));
    assert_eq!(fresh.blocks(), d.blocks());
    // A partition window counts its own range only.
    let w = disk(&chain).with_window(4 * MIB, 2 * MIB);
    assert_eq!(w.blocks(), CLUSTER / 512);
    w.write(0, &[3; 512], false).unwrap();
    assert_eq!(w.blocks(), 2 * CLUSTER / 512);
}

#[test]
fn windows_clip_reads_and_refuse_writes_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let chain = open(&new_image(dir.path()), true);
    let w = disk(&chain).with_window(MIB, MIB);
    assert_eq!(w.size(), MIB);
    assert_eq!(w.write(MIB - 2, &[9; 4], false).unwrap(), 2, "short count");
    assert_eq!(errno(w.write(MIB - 2, &[9; 4], true)), libc::ENOSPC);
    assert_eq!(errno(w.write(MIB, &[9], false)), libc::ENOSPC);
    let mut buf = [0; 8];
    assert_eq!(w.read(MIB - 4, &mut buf).unwrap(), 4);
    assert_eq!(&buf[..4], &[0, 0, 9, 9]);
    assert_eq!(w.read(MIB, &mut buf).unwrap(), 0);
    // The window's bytes are the chain's, shifted.
    chain.read_at(&mut buf[..2], 2 * MIB - 2).unwrap();
    assert_eq!(&buf[..2], &[9, 9]);
    assert_eq!(w.seek(0, Seek::Data).unwrap(), MIB - CLUSTER);
}

#[test]
fn writes_around_the_tree_mark_every_file_showing_them() {
    let dir = tempfile::tempdir().unwrap();
    let chain = open(&new_image(dir.path()), true);
    let mut disks = vec![disk(&chain), disk(&chain).with_window(MIB, 2 * MIB)];
    disks[1].name = OsString::from("disk-p1.raw");
    let tree = Tree::new(disks, false, access());
    assert_eq!(tree.getattr(2).unwrap().blocks, 0);
    // As NBD writes: straight into the chain, then reported.
    chain.write_at(&[1; 4096], 2 * MIB + 8192).unwrap();
    chain.write_at(&[1; 4096], 5 * MIB).unwrap();
    assert_eq!(
        tree.changed_around(&chain, 2 * MIB + 8192, 4096),
        vec![(2, 2 * MIB + 8192, 4096), (3, MIB + 8192, 4096)]
    );
    assert_eq!(
        tree.changed_around(&chain, 5 * MIB, 4096),
        vec![(2, 5 * MIB, 4096)]
    );
    assert_eq!(tree.getattr(2).unwrap().blocks, 2 * CLUSTER / 512);
    assert_eq!(tree.getattr(3).unwrap().blocks, CLUSTER / 512);
    // Another chain's range names no file.
    let dir2 = tempfile::tempdir().unwrap();
    let other = open(&new_image(dir2.path()), false);
    assert!(tree.changed_around(&other, 0, 4096).is_empty());
}

fn access() -> Access {
    Access {
        uid: 1000,
        gid: 100,
        mode: 0o640,
    }
}

#[test]
fn getattr_sizes_entries_and_xattrs() {
    let dir = tempfile::tempdir().unwrap();
    let chain = open(&new_image(dir.path()), true);
    let disks = vec![disk(&chain), disk(&chain).with_window(MIB, 2 * MIB)];
    let mut disks = disks;
    disks[1].name = OsString::from("disk-p1.raw");
    let tree = Tree::new(disks, false, access());
    let root = tree.getattr(ROOT).unwrap();
    assert!(root.dir);
    assert_eq!(root.perm, 0o550);
    let a = tree.lookup(ROOT, OsStr::new("disk.raw")).unwrap();
    assert_eq!(
        (a.ino, a.size, a.blocks, a.perm, a.uid),
        (2, SIZE, 0, 0o640, 1000)
    );
    let p = tree.lookup(ROOT, OsStr::new("disk-p1.raw")).unwrap();
    assert_eq!((p.ino, p.size), (3, 2 * MIB));
    tree.write(3, 0, &[1; 512], false).unwrap();
    assert_eq!(tree.getattr(2).unwrap().blocks, CLUSTER / 512);
    assert_eq!(tree.getattr(3).unwrap().blocks, CLUSTER / 512);
    assert_eq!(errno(tree.lookup(ROOT, OsStr::new("x"))), libc::ENOENT);
    assert_eq!(errno(tree.getattr(9)), libc::ENOENT);
    assert_eq!(errno(tree.read(ROOT, 0, &mut [0; 4])), libc::EISDIR);
    assert_eq!(errno(tree.readdir(2)), libc::ENOTDIR);
    let names: Vec<_> = tree
        .readdir(ROOT)
        .unwrap()
        .into_iter()
        .map(|e| e.2)
        .collect();
    assert_eq!(names, [".", "..", "disk.raw", "disk-p1.raw"]);
    assert_eq!(tree.statfs(), ((SIZE + 2 * MIB) / 4096, 3));
    // A size change is refused; the same size is accepted.
    assert_eq!(errno(tree.setattr(2, Some(SIZE + 1))), libc::EPERM);
    assert_eq!(tree.setattr(2, Some(SIZE)).unwrap().size, SIZE);
    // Extended attributes: size only, value, too small a buffer, missing.
    let name = OsStr::new("user.vdiskfs.format");
    assert!(matches!(tree.getxattr(2, name, 0), Ok(Xattr::Size(5))));
    assert!(matches!(tree.getxattr(2, name, 5), Ok(Xattr::Data(v)) if *v == *b"qcow2"));
    assert_eq!(errno(tree.getxattr(2, name, 4)), libc::ERANGE);
    assert_eq!(
        errno(tree.getxattr(2, OsStr::new("user.x"), 9)),
        libc::ENODATA
    );
    assert_eq!(errno(tree.getxattr(ROOT, name, 9)), libc::ENODATA);
    let list = b"user.vdiskfs.format\0";
    assert!(matches!(tree.listxattr(2, 0), Ok(Xattr::Size(n)) if n as usize == list.len()));
    assert!(matches!(tree.listxattr(2, 64), Ok(Xattr::Data(v)) if *v == *list));
    assert!(matches!(tree.listxattr(ROOT, 0), Ok(Xattr::Size(0))));
}

#[test]
fn read_only_disks_refuse_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let tree = Tree::new(vec![disk(&open(&path, false))], true, access());
    assert!(!tree.any_writable());
    assert_eq!(errno(tree.open(ROOT, true)), libc::EROFS);
    assert!(tree.open(ROOT, false).is_ok());
    assert_eq!(errno(tree.write(ROOT, 0, &[1], false)), libc::EROFS);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(errno(tree.fallocate(ROOT, 0, 512, punch)), libc::EROFS);
    assert!(tree.fsync(ROOT).is_ok());
    let a = tree.getattr(ROOT).unwrap();
    assert!(!a.dir && a.size == SIZE);
}
