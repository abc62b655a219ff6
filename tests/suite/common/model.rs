//! The model-based write harness: random sequences of writes, zeroings,
//! flushes, reads and reopenings, generated (and on failure shrunk to a shortest
//! failing sequence) by proptest, applied both to an in-memory model and
//! to a freshly built image, either through the library ([`Via::Library`])
//! or through a real `--rw` FUSE mount ([`Via::Fuse`]: pwrite, fallocate
//! PUNCH_HOLE or ZERO_RANGE, fsync, pread on the exposed file). After each
//! case the image is closed, then `qemu-img check` (where qemu has one for
//! the format) must pass and `qemu-img convert -O raw` must equal the model.
//!
//! Bounded for the suite: [`cases`] cases of at most [`max_ops`] operations
//! per target, from a fixed seed ([`seed`]). The long run:
//! `VDISKFS_MODEL_SEED=random VDISKFS_MODEL_CASES=500 VDISKFS_MODEL_OPS=200
//! cargo test --release --test suite model_writes::`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

use super::fuse::Mounted;
use super::rng::Rng;
use super::{first_difference, open_chain, open_rw, qemu_img, qemu_raw, read_all, scratch};

/// One operation on the disk. Offsets and lengths are clamped to the disk
/// when applied, so that shrinking (smaller numbers, fewer operations)
/// always yields a valid sequence.
#[derive(Clone, Debug)]
pub enum Op {
    /// Writes `len` bytes made from `seed` at `off`.
    Write { off: u64, len: u64, seed: u64 },
    /// Zeroes `len` bytes at `off` (through FUSE: PUNCH_HOLE when `punch`,
    /// else ZERO_RANGE).
    Zero { off: u64, len: u64, punch: bool },
    /// Flushes (fsync through FUSE).
    Flush,
    /// Reads `len` bytes at `off` and compares them with the model.
    Read { off: u64, len: u64 },
    /// Closes the image and opens it again (through FUSE: unmount and
    /// mount again): the next operations run in a new session over what
    /// the last one left.
    Reopen,
}

/// How the operations reach the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `Chain::write_at`, `write_zeroes`, `flush`, `read_at`.
    Library,
    /// A `vdiskfs mount --rw` of the image and file I/O on the exposed file.
    Fuse,
}

/// A writable image kind the harness drives.
pub struct Target<'a> {
    /// qemu's format name (for `qemu-img -f`); `None` for images qemu
    /// cannot read (VDI differencing, hand-built VHD differencing): the
    /// model then starts from a library read and a fresh library open is
    /// the final check.
    pub fmt: Option<&'a str>,
    /// The allocation unit (cluster, grain, block): offsets favour its
    /// boundaries.
    pub unit: u64,
    /// The guest span one table covers (L2 table, grain table): offsets
    /// favour its boundaries too. `unit` where there is no such table.
    pub table: u64,
    /// Builds a fresh image (with its prior data, backing files...) in the
    /// given directory and returns its path. Called once per case, so it
    /// must build the same image every time.
    pub build: &'a dyn Fn(&Path) -> PathBuf,
    /// Extra checks on the closed image after each case.
    pub after: Option<&'a dyn Fn(&Path)>,
}

/// Cases per target: `VDISKFS_MODEL_CASES`, 6 by default (the suite's
/// budget: the whole harness stays within about two minutes on 2 cores).
pub fn cases() -> u32 {
    env_number("VDISKFS_MODEL_CASES", 6)
}

/// The generator's seed: `VDISKFS_MODEL_SEED` (a number, or `random` for
/// a fresh one each run, as long runs want); fixed by default, so that the
/// suite draws the same sequences every run and a failure reproduces.
pub fn seed() -> RngSeed {
    match std::env::var("VDISKFS_MODEL_SEED").as_deref() {
        Ok("random") => RngSeed::Random,
        Ok(v) => RngSeed::Fixed(
            v.parse()
                .unwrap_or_else(|_| panic!("VDISKFS_MODEL_SEED={v}")),
        ),
        Err(_) => RngSeed::Fixed(0x5eed_d15c),
    }
}

/// Most operations in one case: `VDISKFS_MODEL_OPS`, 40 by default.
pub fn max_ops() -> usize {
    env_number("VDISKFS_MODEL_OPS", 40)
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

/// An offset: anywhere, or a few bytes either side of a unit or table
/// boundary, or near the end of the disk.
fn offset(size: u64, unit: u64, table: u64) -> impl Strategy<Value = u64> {
    let near = move |step: u64| {
        let step = step.clamp(1, size);
        (0..=(size / step).max(1), 0..1024u64, any::<bool>()).prop_map(move |(k, d, before)| {
            let b = k * step;
            if before {
                b.saturating_sub(d)
            } else {
                b + d
            }
        })
    };
    prop_oneof![
        3 => 0..size,
        2 => near(unit),
        1 => near(table),
        1 => (0..3 * unit).prop_map(move |back| size.saturating_sub(1 + back)),
    ]
}

/// A length: small and unaligned, up to two units, or large.
fn length(unit: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 1..2 * unit,
        2 => 1..40_000u64,
        1 => 1..600_000u64,
        1 => (1..4u64).prop_map(move |n| n * unit),
    ]
}

/// One operation on a disk of `size` bytes.
pub fn op(size: u64, unit: u64, table: u64) -> impl Strategy<Value = Op> {
    let at = move || offset(size, unit, table);
    prop_oneof![
        6 => (at(), length(unit), any::<u64>())
            .prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        2 => (at(), length(unit), any::<bool>())
            .prop_map(|(off, len, punch)| Op::Zero { off, len, punch }),
        1 => Just(Op::Flush),
        1 => (at(), length(unit)).prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Reopen),
    ]
}

/// `off..off + len` cut to a disk of `size` bytes.
fn clamp(off: u64, len: u64, size: u64) -> (usize, usize) {
    let off = off.min(size);
    let end = off.saturating_add(len).min(size);
    (off as usize, end as usize)
}

/// Where the operations go.
trait Disk {
    fn write(&self, data: &[u8], off: u64) -> Result<(), String>;
    fn zero(&self, off: u64, len: u64, punch: bool) -> Result<(), String>;
    fn flush(&self) -> Result<(), String>;
    fn read(&self, buf: &mut [u8], off: u64) -> Result<(), String>;
}

impl Disk for vdiskfs::chain::Chain {
    fn write(&self, data: &[u8], off: u64) -> Result<(), String> {
        self.write_at(data, off).map_err(|e| e.to_string())
    }
    fn zero(&self, off: u64, len: u64, _punch: bool) -> Result<(), String> {
        self.write_zeroes(off, len).map_err(|e| e.to_string())
    }
    fn flush(&self) -> Result<(), String> {
        vdiskfs::chain::Chain::flush(self).map_err(|e| e.to_string())
    }
    fn read(&self, buf: &mut [u8], off: u64) -> Result<(), String> {
        self.read_at(buf, off).map_err(|e| e.to_string())
    }
}

impl Disk for std::fs::File {
    fn write(&self, data: &[u8], off: u64) -> Result<(), String> {
        self.write_all_at(data, off).map_err(|e| e.to_string())
    }
    fn zero(&self, off: u64, len: u64, punch: bool) -> Result<(), String> {
        let mode = if punch {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(self.as_raw_fd(), mode, off as i64, len as i64) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("fallocate: {}", std::io::Error::last_os_error()))
        }
    }
    fn flush(&self) -> Result<(), String> {
        self.sync_all().map_err(|e| e.to_string())
    }
    fn read(&self, buf: &mut [u8], off: u64) -> Result<(), String> {
        self.read_exact_at(buf, off).map_err(|e| e.to_string())
    }
}

/// Applies `ops` (one session: no [`Op::Reopen`] among them) to `disk`
/// and to `model`, comparing every read.
fn apply(disk: &dyn Disk, model: &mut [u8], ops: &[Op]) -> Result<(), String> {
    let size = model.len() as u64;
    for (i, op) in ops.iter().enumerate() {
        let fail = |e: String| format!("op {i} {op:?}: {e}");
        match *op {
            // Cut to nothing at the disk's end: nothing to do (a
            // zero-length fallocate is EINVAL).
            Op::Write { off, len, .. } | Op::Zero { off, len, .. } | Op::Read { off, len }
                if clamp(off, len, size).0 == clamp(off, len, size).1 => {}
            Op::Write { off, len, seed } => {
                let (a, b) = clamp(off, len, size);
                let data = Rng::new(seed).bytes(b - a);
                disk.write(&data, a as u64).map_err(fail)?;
                model[a..b].copy_from_slice(&data);
            }
            Op::Zero { off, len, punch } => {
                let (a, b) = clamp(off, len, size);
                disk.zero(a as u64, (b - a) as u64, punch).map_err(fail)?;
                model[a..b].fill(0);
            }
            Op::Flush => disk.flush().map_err(fail)?,
            Op::Reopen => return Err(fail("a reopen inside a session".into())),
            Op::Read { off, len } => {
                let (a, b) = clamp(off, len, size);
                let mut got = vec![0u8; b - a];
                disk.read(&mut got, a as u64).map_err(fail)?;
                if let Some(d) = first_difference(&got, &model[a..b]) {
                    return Err(fail(format!("read differs from the model at {:#x}", a + d)));
                }
            }
        }
    }
    disk.flush().map_err(|e| format!("final flush: {e}"))?;
    let mut all = vec![0u8; model.len()];
    disk.read(&mut all, 0)
        .map_err(|e| format!("final read: {e}"))?;
    match first_difference(&all, model) {
        Some(d) => Err(format!("the whole disk differs from the model at {d:#x}")),
        None => Ok(()),
    }
}

/// Runs one case: a fresh image, `ops` through `via`, then the checks on
/// the closed image.
fn case(target: &Target, via: Via, ops: &[Op]) -> Result<(), String> {
    let dir = scratch();
    let img = (target.build)(dir.path());
    let mut model = guest_bytes(&img, target.fmt);
    for session in ops.split(|op| matches!(op, Op::Reopen)) {
        match via {
            Via::Library => apply(&open_rw(&img), &mut model, session)?,
            Via::Fuse => {
                let m = Mounted::new(&[&img], &["--rw"]);
                // One image mounted: the mount point holds its one file.
                let exposed = std::fs::read_dir(&m.mountpoint)
                    .and_then(|mut d| d.next().unwrap_or(Err(std::io::ErrorKind::NotFound.into())))
                    .map_err(|e| format!("list the mount: {e}"))?
                    .path();
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&exposed)
                    .map_err(|e| format!("open {}: {e}", exposed.display()))?;
                apply(&f, &mut model, session)?;
                drop(f);
                m.unmount();
            }
        }
    }
    check_closed(&img, target.fmt, &model)?;
    if let Some(after) = target.after {
        after(&img);
    }
    Ok(())
}

/// The disk's bytes before the case: qemu's reading where qemu reads the
/// format, else the library's.
fn guest_bytes(img: &Path, fmt: Option<&str>) -> Vec<u8> {
    match fmt {
        Some(f) => qemu_raw(img, Some(f)),
        None => read_all(&open_chain(img).unwrap(), 1 << 20).unwrap(),
    }
}

/// `qemu-img check` where qemu has one for `fmt` (not for vpc or qcow
/// version 1), `qemu-img convert -O raw` against the model (both only
/// where qemu reads the image), and a fresh open through the library.
pub fn check_closed(img: &Path, fmt: Option<&str>, model: &[u8]) -> Result<(), String> {
    if let Some(fmt) = fmt {
        if !matches!(fmt, "vpc" | "qcow" | "raw") {
            qemu_img(&["check", "-q", "-f", fmt, img.to_str().unwrap()]);
        }
        let got = qemu_raw(img, Some(fmt));
        if got.len() != model.len() {
            let (g, m) = (got.len(), model.len());
            return Err(format!("qemu-img convert: {g} bytes, the model {m}"));
        }
        if let Some(d) = first_difference(&got, model) {
            return Err(format!("qemu-img convert differs from the model at {d:#x}"));
        }
    }
    let chain = open_chain(img).map_err(|e| format!("reopen: {e}"))?;
    let got = read_all(&chain, 4096 + 512 + 3).map_err(|e| format!("reread: {e}"))?;
    match first_difference(&got, model) {
        Some(d) => Err(format!("reopened through the library, differs at {d:#x}")),
        None => Ok(()),
    }
}

/// Runs the harness on `target` through `via`: [`cases`] random sequences
/// of up to [`max_ops`] operations; a failure is shrunk and reported with
/// the shortest sequence found.
pub fn run(target: &Target, via: Via) {
    run_cases(target, via, cases());
}

/// [`run`] with `cases` cases (for matrices of many targets).
pub fn run_cases(target: &Target, via: Via, cases: u32) {
    let probe = scratch();
    let size = guest_bytes(&(target.build)(probe.path()), target.fmt).len() as u64;
    let name = target.fmt.unwrap_or("qemu-less");
    assert!(size > 0, "the {name} target builds an empty disk");
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        rng_seed: seed(),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let ops = proptest::collection::vec(op(size, target.unit, target.table), 1..=max_ops());
    let result = runner.run(&ops, |ops| {
        case(target, via, &ops).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{name} through {via:?}: {e}");
    }
}

/// Splits the disk into disjoint segments of random lengths (some left
/// out, so copy-on-write has something to copy) and gives them to 8
/// threads round-robin, each going its own way through its segments,
/// with a reader alongside: threads share clusters, blocks and tables but
/// never bytes, so the result is deterministic. Writes into `model` what
/// the disk must now hold and checks the flushed disk against it.
pub fn concurrent_disjoint_writes(img: &Path, model: &mut [u8], seed: u64) {
    let size = model.len() as u64;
    let mut rng = Rng::new(seed);
    let threads = 8;
    let mut work: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); threads];
    let mut pos = rng.below(4096);
    let mut seg = 0usize;
    while pos < size {
        let len = (1 + rng.below(6000)).min(size - pos);
        if rng.below(5) != 0 {
            let data = rng.bytes(len as usize);
            model[pos as usize..(pos + len) as usize].copy_from_slice(&data);
            work[seg % threads].push((pos, data));
        }
        seg += 1;
        pos += len;
    }
    for (t, w) in work.iter_mut().enumerate() {
        let mut r = Rng::new(seed + t as u64);
        for i in (1..w.len()).rev() {
            w.swap(i, r.below(i as u64 + 1) as usize);
        }
    }
    let chain = open_rw(img);
    std::thread::scope(|sc| {
        for w in &work {
            let chain = &chain;
            sc.spawn(move || {
                for (off, data) in w {
                    chain.write_at(data, *off).unwrap();
                }
            });
        }
        // A reader alongside, which must never fail.
        let chain = &chain;
        sc.spawn(move || {
            let mut buf = vec![0u8; 65536];
            for i in 0..200u64 {
                let off = (i * 7919 * 4096) % (size - buf.len() as u64);
                chain.read_at(&mut buf, off).unwrap();
            }
        });
    });
    chain.flush().unwrap();
    let got = read_all(&chain, 1 << 20).unwrap();
    if let Some(d) = first_difference(&got, model) {
        panic!("after concurrent writes: differs from the model at {d:#x}");
    }
}
