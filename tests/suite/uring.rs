//! End-to-end tests of the FUSE-over-io_uring transport (`--transport
//! uring`, docs/fuse-uring.md) through real mounts: byte-exact reads of a
//! chain, writes with fsync checked by qemu-img, fallocate, lseek, xattrs,
//! unmounting and killing the daemon with requests in flight, and the
//! fallback to /dev/fuse when the kernel's `enable_uring` is off.
//!
//! Needs root (the transport is used by root mounts) and a kernel with
//! FUSE over io_uring (6.14+); the tests turn the module parameter on and
//! fail, never skip, where that is impossible.

use crate::common;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use common::fuse::{alive, vdiskfs, wait_gone, Mounted};
use common::{qemu_img, qemu_img_line, qemu_io, qemu_raw, scratch};

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Tests that need the parameter on share this lock; the fallback test,
/// which turns it off for a moment, takes it alone.
static PARAM_LOCK: RwLock<()> = RwLock::new(());

/// Turns the module parameter on (or fails saying why it cannot).
fn enable_uring() {
    assert!(
        Path::new(PARAM).exists(),
        "{PARAM} is missing: this kernel has no FUSE over io_uring (Linux 6.14+ with \
         CONFIG_FUSE_IO_URING); this test does not skip"
    );
    std::fs::write(PARAM, "Y").unwrap_or_else(|e| {
        panic!("cannot turn on {PARAM} ({e}): run the tests as root (scripts/setup.sh does)")
    });
}

/// For a test that needs the ring: shares [`PARAM_LOCK`] and turns the
/// parameter on; the test holds the guard to its end.
fn uring_on() -> std::sync::RwLockReadGuard<'static, ()> {
    let g = PARAM_LOCK.read().unwrap_or_else(|e| e.into_inner());
    enable_uring();
    g
}

/// Options opening a file for O_DIRECT reads (and writes if `write`).
fn direct_options(write: bool) -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(write).custom_flags(libc::O_DIRECT);
    o
}

/// Opens `path` with [`direct_options`].
fn open_direct(path: impl AsRef<Path>, write: bool) -> std::fs::File {
    direct_options(write).open(path).unwrap()
}

/// One O_DIRECT read of `len` bytes at `off`: whole, and equal to `expected`.
fn assert_direct_read(
    file: &std::fs::File,
    buf: &mut AlignedBuf,
    expected: &[u8],
    off: u64,
    len: usize,
) {
    let n = file.read_at(&mut buf.as_mut()[..len], off).unwrap();
    assert_eq!(n, len);
    assert!(
        buf.as_mut()[..len] == expected[off as usize..off as usize + len],
        "O_DIRECT read of {len} at {off:#x} differs from qemu-img convert"
    );
}

/// The `list --json` entry of a mount.
fn list_entry(mp: &Path) -> serde_json::Value {
    let list = vdiskfs(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|e| e["mountpoint"].as_str() == mp.to_str())
        .expect("list shows the mount")
        .clone()
}

/// Mounts with `--transport uring` and checks that the ring runs.
fn mount_uring(images: &[&Path], opts: &[&str]) -> Mounted {
    let mut all = vec!["--transport", "uring"];
    all.extend_from_slice(opts);
    let m = Mounted::new(images, &all);
    let e = list_entry(&m.mountpoint);
    assert_eq!(e["transport"], "io_uring", "{e}");
    m
}

/// A qcow2 over a qcow2 over a raw base, data in every layer, a compressed
/// cluster and a zeroed one.
fn make_chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-f", "raw", base.to_str().unwrap(), "5M"]);
    qemu_io("raw", &base, &["write -P 0x11 0 5M"]);
    qemu_img_line(&format!(
        "create -f qcow2 -o cluster_size=4096 -b base.raw -F raw {} 8M",
        mid.to_str().unwrap()
    ));
    qemu_io("qcow2", &mid, &["write -P 0x22 1M 2M", "write -z 2M 4k"]);
    qemu_img_line(&format!(
        "create -f qcow2 -b mid.qcow2 -F qcow2 {} 12M",
        top.to_str().unwrap()
    ));
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x33 2500k 1M",
            "write -c 7M 64k",
            "write -P 0x44 11M 512k",
        ],
    );
    top
}

#[test]
fn uring_reads_of_a_chain_are_byte_exact() {
    let _g = uring_on();
    let d = scratch();
    let top = make_chain(d.path());
    let expected = qemu_raw(&top, None);
    let m = mount_uring(&[&top], &[]);
    let f = m.file("top.raw");
    // Whole file through the page cache (readahead: 1 MiB requests).
    assert!(
        std::fs::read(&f).unwrap() == expected,
        "buffered read differs"
    );
    // Direct I/O of odd sizes, every request straight to the daemon.
    let file = open_direct(&f, false);
    let mut buf = AlignedBuf::new(1 << 20);
    let mut rng = common::rng::Rng::new(7);
    for _ in 0..300 {
        let len = 512 * (1 + rng.below(2048) as usize);
        let off = 512 * rng.below((expected.len() as u64 - len as u64) / 512);
        assert_direct_read(&file, &mut buf, &expected, off, len);
    }
    // A read past the end is short.
    let n = file
        .read_at(&mut buf.as_mut()[..8192], expected.len() as u64 - 4096)
        .unwrap();
    assert_eq!(n, 4096);
    let xattr = xattr_get(&f, "user.vdiskfs.format");
    assert_eq!(xattr, b"qcow2");
    assert!(xattr_list(&f).contains("user.vdiskfs.chain"));
    drop(file);
    m.unmount();
}

/// READs of plain stored runs are read from the image files on the ring
/// itself (src/fs/uring/hostread.rs): VMDK grains under a qcow2 top, runs
/// that span both layers and the unallocated tail, at depth (many reads in
/// flight on one queue), byte-exact against qemu-img convert.
#[test]
fn uring_host_reads_of_vmdk_grains_under_qcow2_are_byte_exact_at_depth() {
    let _g = uring_on();
    let d = scratch();
    let base = d.path().join("base.vmdk");
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-f", "vmdk", base.to_str().unwrap(), "16M"]);
    qemu_io(
        "vmdk",
        &base,
        &["write -P 0x51 0 6M", "write -P 0x52 9M 100k"],
    );
    qemu_img_line(&format!(
        "create -f qcow2 -o cluster_size=16384 -b base.vmdk -F vmdk {} 16M",
        top.to_str().unwrap()
    ));
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x61 1000k 300k",
            "write -P 0x62 5M 2M",
            "write -z 3M 64k",
        ],
    );
    let expected = qemu_raw(&top, None);
    let m = mount_uring(&[&top], &[]);
    let f = m.file("top.raw");
    // Eight threads of O_DIRECT reads keep many requests in flight.
    let expected = std::sync::Arc::new(expected);
    let workers: Vec<_> = (0..8u64)
        .map(|t| {
            let (f, expected) = (f.clone(), expected.clone());
            std::thread::spawn(move || {
                let file = open_direct(&f, false);
                let mut buf = AlignedBuf::new(1 << 20);
                let mut rng = common::rng::Rng::new(100 + t);
                for _ in 0..200 {
                    let pages = if rng.below(4) == 0 { 256 } else { 4 };
                    let len = 4096 * (1 + rng.below(pages) as usize);
                    let off = 4096 * rng.below((expected.len() as u64 - len as u64) / 4096);
                    assert_direct_read(&file, &mut buf, &expected, off, len);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a reader failed");
    }
    m.unmount();
}

#[test]
fn uring_writes_reach_the_image_after_fsync_and_qemu_img_check_passes() {
    let _g = uring_on();
    let d = scratch();
    let img = d.path().join("w.qcow2");
    qemu_img(&["create", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    qemu_io("qcow2", &img, &["write -P 0x5a 0 3M"]);
    let mut expected = qemu_raw(&img, None);
    let m = mount_uring(&[&img], &["--rw"]);
    let f = open_direct(m.file("w.raw"), true);
    let mut rng = common::rng::Rng::new(11);
    let mut buf = AlignedBuf::new(256 << 10);
    for i in 0..64u64 {
        let len = 4096 * (1 + rng.below(64) as usize);
        let off = 4096 * rng.below((16 << 20) / 4096 - 64);
        buf.as_mut()[..len].fill((i + 1) as u8);
        f.write_at(&buf.as_mut()[..len], off).unwrap();
        expected[off as usize..off as usize + len].fill((i + 1) as u8);
    }
    f.sync_all().unwrap();
    // Read back through the mount.
    let mut back = AlignedBuf::new(16 << 20);
    assert_eq!(f.read_at(back.as_mut(), 0).unwrap(), 16 << 20);
    assert!(back.as_mut() == &expected[..], "read-back differs");
    drop(f);
    m.unmount();
    qemu_img(&["check", img.to_str().unwrap()]);
    assert!(
        qemu_raw(&img, None) == expected,
        "image differs after unmount"
    );
}

#[test]
fn uring_fallocate_and_lseek_answer_as_on_the_classic_path() {
    let _g = uring_on();
    let d = scratch();
    let img = d.path().join("s.qcow2");
    qemu_img_line(&format!(
        "create -f qcow2 -o cluster_size=65536 {} 8M",
        img.to_str().unwrap()
    ));
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x77 1M 128k", "write -P 0x78 5M 64k"],
    );
    let m = mount_uring(&[&img], &["--rw"]);
    let path = m.file("s.raw");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let seek = |off: i64, whence: i32| {
        // SAFETY: a valid fd; lseek has no memory effects.
        let r = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&f), off, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap())
        } else {
            Ok(r)
        }
    };
    assert_eq!(seek(0, libc::SEEK_DATA), Ok(1 << 20));
    assert_eq!(seek(1 << 20, libc::SEEK_HOLE), Ok((1 << 20) + (128 << 10)));
    assert_eq!(seek((2 << 20) as i64, libc::SEEK_DATA), Ok(5 << 20));
    assert_eq!(seek((6 << 20) as i64, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek((6 << 20) as i64, libc::SEEK_HOLE), Ok(6 << 20));
    assert_eq!(
        seek((5 << 20) as i64, libc::SEEK_HOLE),
        Ok((5 << 20) + (64 << 10))
    );
    // Punch the first data run: it reads as zeros and becomes a hole.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: a valid fd.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            1 << 20,
            128 << 10,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let mut b = vec![1u8; 128 << 10];
    f.read_exact_at(&mut b, 1 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0), "punched range not zero");
    // Growing the disk is refused, as on the classic path.
    // SAFETY: a valid fd.
    let r = unsafe { libc::fallocate(fd, 0, 0, 16 << 20) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOSPC)
    );
    f.sync_all().unwrap();
    drop(f);
    m.unmount();
    qemu_img(&["check", img.to_str().unwrap()]);
    let raw = qemu_raw(&img, None);
    assert!(raw[1 << 20..(1 << 20) + (128 << 10)]
        .iter()
        .all(|&x| x == 0));
    assert!(raw[5 << 20..(5 << 20) + (64 << 10)]
        .iter()
        .all(|&x| x == 0x78));
}

/// Readers that loop on O_DIRECT reads until told to stop, counting them.
struct Readers {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Readers {
    fn start(file: &Path, n: usize) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|i| {
                let (stop, done, file) = (stop.clone(), done.clone(), file.to_path_buf());
                std::thread::spawn(move || {
                    let Ok(f) = direct_options(false).open(&file) else {
                        return;
                    };
                    let mut buf = AlignedBuf::new(64 << 10);
                    let mut off = (i as u64) << 20;
                    while !stop.load(Ordering::Relaxed) {
                        if f.read_at(buf.as_mut(), off % (8 << 20)).is_err() {
                            return;
                        }
                        off += 64 << 10;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Readers {
            stop,
            done,
            threads,
        }
    }

    /// Waits until the readers have made progress.
    fn wait_busy(&self) {
        let t = Instant::now();
        while self.done.load(Ordering::Relaxed) < 200 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "readers make no progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the readers; panics if one hangs.
    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let t = Instant::now();
        for th in self.threads {
            while !th.is_finished() {
                assert!(t.elapsed() < Duration::from_secs(20), "a reader hangs");
                std::thread::sleep(Duration::from_millis(10));
            }
            th.join().unwrap();
        }
    }
}

fn pid_of(mp: &Path) -> u32 {
    list_entry(mp)["pid"].as_u64().unwrap() as u32
}

fn is_mounted(mp: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = mp.to_str().unwrap();
    table.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

#[test]
fn uring_unmount_with_requests_in_flight_ends_the_daemon() {
    let _g = uring_on();
    let d = scratch();
    let top = make_chain(d.path());
    let m = mount_uring(&[&top], &[]);
    let pid = pid_of(&m.mountpoint);
    let readers = Readers::start(&m.file("top.raw"), 8);
    readers.wait_busy();
    // Lazy: the readers' open files keep the mount alive until they stop,
    // and `vdiskfs unmount` waits for the daemon to end.
    let mp = m.mountpoint.clone();
    let unmount = std::thread::spawn(move || vdiskfs(&["unmount", "--lazy", mp.to_str().unwrap()]));
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(pid), "the daemon ended with files still open");
    readers.finish();
    let o = unmount.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_gone(pid);
    assert!(!is_mounted(&m.mountpoint));
    drop(m);
}

#[test]
fn uring_daemon_killed_with_requests_queued_leaves_a_clean_mount_point_after_unmount() {
    let _g = uring_on();
    let d = scratch();
    let top = make_chain(d.path());
    let m = mount_uring(&[&top], &[]);
    let pid = pid_of(&m.mountpoint);
    let readers = Readers::start(&m.file("top.raw"), 16);
    readers.wait_busy();
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    wait_gone(pid);
    // Every reader gets an error (ENOTCONN) instead of hanging.
    readers.finish();
    assert!(!alive(pid));
    let o = vdiskfs(&["unmount", m.mountpoint.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!is_mounted(&m.mountpoint));
    // The mount point is an empty directory again.
    assert_eq!(std::fs::read_dir(&m.mountpoint).unwrap().count(), 0);
    drop(m);
}

#[test]
fn uring_falls_back_to_dev_fuse_when_the_parameter_is_off() {
    let _g = PARAM_LOCK.write().unwrap_or_else(|e| e.into_inner());
    enable_uring();
    let d = scratch();
    let top = make_chain(d.path());
    let expected = qemu_raw(&top, None);
    std::fs::write(PARAM, "N").unwrap();
    let m = Mounted::try_new(&[&top], &["--transport", "uring"]);
    // Restored before any assertion can fail.
    std::fs::write(PARAM, "Y").unwrap();
    let m = m.unwrap_or_else(|e| panic!("mount with the parameter off failed: {e}"));
    assert_eq!(list_entry(&m.mountpoint)["transport"], "classic");
    assert!(std::fs::read(m.file("top.raw")).unwrap() == expected);
    m.unmount();
}

#[test]
fn transport_option_is_parsed_once_for_flag_and_o_spelling() {
    let d = scratch();
    let img = d.path().join("p.qcow2");
    qemu_img(&["create", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    let mp = d.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    for args in [vec!["--transport", "fast"], vec!["-o", "transport=fast"]] {
        let mut all = vec!["mount"];
        all.extend(args.iter());
        all.extend([img.to_str().unwrap(), mp.to_str().unwrap()]);
        let o = vdiskfs(&all);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("auto, uring or classic"), "{err}");
    }
    let o = vdiskfs(&[
        "mount",
        "--transport",
        "uring",
        "-o",
        "transport=classic",
        img.to_str().unwrap(),
        mp.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "a clash must be refused");
    assert!(!is_mounted(&mp));
}

fn xattr_get(path: &Path, name: &str) -> Vec<u8> {
    let p = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid strings and buffer.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        r >= 0,
        "getxattr {name}: {}",
        std::io::Error::last_os_error()
    );
    buf.truncate(r as usize);
    buf
}

fn xattr_list(path: &Path) -> String {
    let p = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut buf = vec![0u8; 8192];
    // SAFETY: valid string and buffer.
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "listxattr: {}", std::io::Error::last_os_error());
    String::from_utf8_lossy(&buf[..r as usize]).into_owned()
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: owned memory, used by one thread at a time.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}
