//! First writes into different qcow2 clusters run in parallel: a
//! copy-on-write fill that is stuck reading the layer below for cluster A
//! must not stop a first write into cluster B — for standard L2 entries,
//! extended L2 entries (subclusters) and an external data file.
//!
//! The layer below is a gate: reads of cluster A block until the test
//! opens it. The write into B must complete within a timeout while A is
//! still blocked; a writer that holds the allocation mutex across the
//! fill fails the test (after opening the gate, so it never hangs).
//! Afterwards `qemu-img convert` must show both writes with their fills.

use crate::common;

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use common::{caches, qemu_img_line, qemu_raw, scratch};
use vdiskfs::format::qcow2::Qcow2;
use vdiskfs::format::{Below, Layer, OpenCtx};
use vdiskfs::host::{HostFile, HostOpen};
use vdiskfs::policy::OpenPolicy;

const K: u64 = 1024;
const CS: u64 = 64 * K;
const SIZE: u64 = 8 << 20;
/// Inside cluster 1 (A) and cluster 3 (B), not cluster-aligned.
const A: u64 = CS + 5 * K;
const B: u64 = 3 * CS + 9 * K;
const LEN: usize = 512;
/// How long B may take while A is stuck.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What the layer below holds: a nonzero pattern of the guest offset.
fn pattern(off: u64) -> u8 {
    ((off >> 9) as u8).wrapping_mul(37) | 0x80
}

/// A layer below whose reads inside `gated` wait until it is opened.
struct Gate {
    gated: Range<u64>,
    entered: AtomicBool,
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn new(gated: Range<u64>) -> Gate {
        Gate {
            gated,
            entered: AtomicBool::new(false),
            open: Mutex::new(false),
            opened: Condvar::new(),
        }
    }

    fn open(&self) {
        *self.open.lock() = true;
        self.opened.notify_all();
    }
}

impl Below for Gate {
    fn read_below(&self, buf: &mut [u8], offset: u64) -> vdiskfs::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < self.gated.end && self.gated.start < end {
            self.entered.store(true, Ordering::SeqCst);
            let mut open = self.open.lock();
            // Bounded, so that a broken test cannot hang the suite.
            let deadline = Instant::now() + 6 * TIMEOUT;
            while !*open && !self.opened.wait_until(&mut open, deadline).timed_out() {}
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern(offset + i as u64);
        }
        Ok(())
    }
}

fn open_rw(img: &Path) -> Arc<Qcow2> {
    let how = HostOpen {
        writable: true,
        ..Default::default()
    };
    let f = HostFile::open_with(img, how).unwrap();
    let caches = caches();
    let policy = OpenPolicy::default();
    let ctx = OpenCtx {
        caches: &caches,
        policy: &policy,
        writable: true,
    };
    Arc::new(Qcow2::open(f, &ctx).unwrap())
}

/// The disk after writing `LEN` bytes of `v` at each `(offset, v)`: the
/// units (clusters, or subclusters) they touch filled from below.
fn expected(writes: &[(u64, u8)], unit: u64) -> Vec<u8> {
    let mut disk = vec![0u8; SIZE as usize];
    for &(off, v) in writes {
        let a = off / unit * unit;
        let b = (off + LEN as u64).div_ceil(unit) * unit;
        for p in a..b {
            disk[p as usize] = pattern(p);
        }
        disk[off as usize..off as usize + LEN].fill(v);
    }
    disk
}

/// Creates the image with `opts`, then runs the two writes.
fn case(name: &str, opts: &str, unit: u64) {
    let dir = scratch();
    let img = dir.path().join(format!("{name}.qcow2"));
    let mut o = format!("cluster_size={CS}");
    if !opts.is_empty() {
        o = format!("{o},{opts}");
    }
    let o = o.replace("DIR", dir.path().to_str().unwrap());
    qemu_img_line(&format!(
        "create -q -f qcow2 -o {o} {} {SIZE}",
        img.to_str().unwrap()
    ));

    let q = open_rw(&img);
    let gate = Arc::new(Gate::new(A - A % CS..A - A % CS + CS));
    let writer_a = {
        let (q, gate) = (q.clone(), gate.clone());
        std::thread::spawn(move || {
            q.as_write()
                .unwrap()
                .write_at(&[0xaa; LEN], A, &*gate)
                .unwrap()
        })
    };
    let t0 = Instant::now();
    while !gate.entered.load(Ordering::SeqCst) {
        assert!(
            !writer_a.is_finished(),
            "{name}: the write into cluster A never read the layer below (nothing tested)"
        );
        assert!(
            t0.elapsed() < TIMEOUT,
            "{name}: cluster A's fill never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (done, finished) = mpsc::channel();
    let writer_b = {
        let (q, gate) = (q.clone(), gate.clone());
        std::thread::spawn(move || {
            let r = q.as_write().unwrap().write_at(&[0xbb; LEN], B, &*gate);
            let _ = done.send(());
            r.unwrap()
        })
    };
    let in_parallel = finished.recv_timeout(TIMEOUT).is_ok();
    let a_still_blocked = !writer_a.is_finished();
    gate.open();
    writer_b.join().unwrap();
    writer_a.join().unwrap();
    assert!(
        in_parallel,
        "{name}: the first write into cluster B waited more than {TIMEOUT:?} for cluster A's \
         copy-on-write read (first writes are serialised)"
    );
    assert!(
        a_still_blocked,
        "{name}: cluster A's write did not wait for its gate"
    );

    q.as_write().unwrap().flush().unwrap();
    drop(q);
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-q", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{name}: qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let got = qemu_raw(&img, Some("qcow2"));
    let want = expected(&[(A, 0xaa), (B, 0xbb)], unit);
    assert_eq!(got.len(), want.len(), "{name}: disk size");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{name}: byte {i:#x} is {:#x}, expected {:#x}",
            got[i], want[i]
        );
    }
}

#[test]
fn first_writes_into_other_clusters_do_not_wait_for_a_fill_standard_l2() {
    case("standard", "", CS);
}

#[test]
fn first_writes_into_other_clusters_do_not_wait_for_a_fill_extended_l2() {
    case("extended", "extended_l2=on", CS / 32);
}

#[test]
fn first_writes_into_other_clusters_do_not_wait_for_a_fill_data_file() {
    case("datafile", "data_file=DIR/datafile.data", CS);
}
