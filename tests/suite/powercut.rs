//! Power-cut simulation: a workload of allocating writes, overwrites,
//! discards and flushes runs on an image with every host write and barrier
//! recorded (`engine::record`); then, for many random cut points, the image
//! is rebuilt as a disk could hold it after a power cut there — the
//! original bytes, every write before the last completed barrier, and a
//! random subset of the writes after it, each possibly torn at 512-byte
//! granularity — and must pass `qemu-img check` (leaks allowed, counted)
//! with every write acknowledged by a completed flush readable, byte for
//! byte, through vdiskfs (every cut) and `qemu-img convert` (a sample).
//!
//! `POWERCUT_CUTS=N` sets the cuts per image type (default 1000; e.g.
//! 20000 for a long run). A recorder that ignores barriers shows that the
//! checker finds the corruption a write path without barriers leaves.

use crate::common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::rng::Rng;
use common::{caches, qemu_img, qemu_img_line, qemu_io, qemu_raw, read_all, require_tool, scratch};
use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::engine::record::{Event, Recorder};
use vdiskfs::host::{HostFile, HostOpen};

const K: u64 = 1024;
const M: u64 = 1024 * K;

/// One image type under test.
struct Case {
    /// Name in messages.
    name: &'static str,
    /// `qemu-img` format name of the written file.
    fmt: &'static str,
    /// Allocation unit (cluster or grain): sizes the writes.
    unit: u64,
    /// Workload operations.
    ops: usize,
}

/// A guest flush that completed: the log length when it returned, how
/// many guest operations had completed when it started (`seq`) and the
/// guest content they left.
struct Durable {
    at: usize,
    seq: usize,
    model: Arc<Vec<u8>>,
}

/// What a workload left: the log, its flush points, and for each guest
/// operation where it started in the log, its rank among completed
/// operations, and its range.
struct Run {
    events: Vec<Event>,
    flushes: Vec<Durable>,
    ops: Vec<(usize, usize, u64, u64)>,
}

impl Run {
    /// A run whose first durability point is the image as it starts,
    /// holding `model`.
    fn new(model: &[u8]) -> Run {
        Run {
            events: Vec::new(),
            flushes: vec![Durable {
                at: 0,
                seq: 0,
                model: Arc::new(model.to_vec()),
            }],
            ops: Vec::new(),
        }
    }

    /// A durability point at log position `at`: `model` is what must
    /// survive a cut after it.
    fn durable(&mut self, at: usize, model: Vec<u8>) {
        self.flushes.push(Durable {
            at,
            seq: self.ops.len(),
            model: Arc::new(model),
        });
    }
}

/// One guest operation of the single-stream workloads.
enum Op {
    Flush,
    /// Zeroes (or discards) a range: offset, length.
    Zero(u64, u64),
    /// Writes the data at the offset.
    Write(u64, Vec<u8>),
}

/// The next random operation on a disk of `size` bytes: 3 in 20 a flush,
/// 3 in 20 a discard (whole units or any range), else a write (sector
/// aligned or not) of up to three `unit`s.
fn next_op(rng: &mut Rng, case: &Case, size: u64) -> Op {
    let unit = case.unit.min(256 * K);
    match rng.below(20) {
        0..=2 => Op::Flush,
        3..=5 => {
            let (off, len) = if rng.below(2) == 0 {
                let u = case.unit;
                let off = rng.below(size / u) * u;
                (off, (u * (1 + rng.below(2))).min(size - off))
            } else {
                let off = rng.below(size);
                (off, (1 + rng.below(2 * unit)).min(size - off))
            };
            Op::Zero(off, len)
        }
        _ => {
            let off = if rng.below(2) == 0 {
                rng.below(size / 512) * 512
            } else {
                rng.below(size)
            };
            let len = (1 + rng.below(3 * unit)).min(size - off);
            Op::Write(off, rng.bytes(len as usize))
        }
    }
}

/// Opens `image` writable with its host I/O logged by `rec`.
fn open_recorded(image: &Path, rec: &Arc<Recorder>) -> Chain {
    let how = HostOpen {
        writable: true,
        ..Default::default()
    };
    let file = HostFile::open_with(image, how).unwrap();
    file.set_recorder(rec.clone());
    let opts = ChainOptions {
        writable: true,
        ..Default::default()
    };
    Chain::open_on(file, &opts, &caches()).unwrap()
}

/// Creates the image of `case` in `dir`; returns the file to write.
fn create(dir: &Path, case: &Case) -> PathBuf {
    let p = |n: &str| dir.join(n);
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    match case.name {
        "qcow2-4k" | "qcow2-64k" | "qcow2-2m" | "qcow2-64k-extl2" => {
            let img = p("img.qcow2");
            let opts = match case.name {
                "qcow2-4k" => "cluster_size=4096",
                "qcow2-64k" => "cluster_size=65536",
                "qcow2-2m" => "cluster_size=2097152",
                _ => "cluster_size=65536,extended_l2=on",
            };
            let size = if case.unit >= M { "8M" } else { "4M" };
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &s(&img), size]);
            // Existing data to overwrite, one compressed cluster.
            let comp = if case.unit >= M {
                "write -c -P 0x22 4M 2M"
            } else {
                "write -c -P 0x22 1M 64k"
            };
            qemu_io("qcow2", &img, &["write -P 0x11 0 96k", comp]);
            img
        }
        "qcow2-over-vmdk" => {
            let base = p("base.vmdk");
            qemu_img(&["create", "-q", "-f", "vmdk", &s(&base), "4M"]);
            qemu_io(
                "vmdk",
                &base,
                &["write -P 0x33 0 1M", "write -P 0x44 2M 512k"],
            );
            let top = p("top.qcow2");
            qemu_img_line(&format!(
                "create -q -f qcow2 -b base.vmdk -F vmdk {}",
                s(&top)
            ));
            top
        }
        "qcow" => {
            let img = p("img.qcow");
            qemu_img(&["create", "-q", "-f", "qcow", &s(&img), "4M"]);
            qemu_io("qcow", &img, &["write -P 0x55 0 64k"]);
            img
        }
        "vmdk-sparse" => {
            let img = p("img.vmdk");
            let o = "subformat=monolithicSparse";
            qemu_img(&["create", "-q", "-f", "vmdk", "-o", o, &s(&img), "4M"]);
            qemu_io("vmdk", &img, &["write -P 0x66 0 128k"]);
            img
        }
        "vhd-dynamic" => {
            let img = p("img.vhd");
            let o = "subformat=dynamic";
            qemu_img(&["create", "-q", "-f", "vpc", "-o", o, &s(&img), "8M"]);
            qemu_io(
                "vpc",
                &img,
                &["write -P 0x77 0 100k", "write -P 0x78 5M 1M"],
            );
            img
        }
        "vdi-dynamic" => {
            let img = p("img.vdi");
            qemu_img(&["create", "-q", "-f", "vdi", &s(&img), "8M"]);
            qemu_io(
                "vdi",
                &img,
                &["write -P 0x79 0 100k", "write -P 0x7a 5M 1M"],
            );
            img
        }
        "vhdx-1m" => {
            let img = p("img.vhdx");
            let o = "block_size=1M";
            qemu_img(&["create", "-q", "-f", "vhdx", "-o", o, &s(&img), "8M"]);
            qemu_io(
                "vhdx",
                &img,
                &["write -P 0x77 0 1M", "write -P 0x78 5M 64k"],
            );
            img
        }
        other => panic!("unknown case {other}"),
    }
}

/// Runs the workload on `image` with its host I/O logged by `rec`.
fn workload(image: &Path, case: &Case, rec: Arc<Recorder>, seed: u64) -> Run {
    let chain = open_recorded(image, &rec);
    let mut model = read_all(&chain, 1 << 20).unwrap();
    let size = model.len() as u64;
    let mut rng = Rng::new(seed);
    let mut run = Run::new(&model);
    for _ in 0..case.ops {
        let at = rec.len();
        match next_op(&mut rng, case, size) {
            Op::Flush => {
                chain.flush().unwrap();
                run.durable(rec.len(), model.clone());
            }
            Op::Zero(off, len) => {
                chain.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                run.ops.push((at, run.ops.len(), off, len));
            }
            Op::Write(off, data) => {
                chain.write_at(&data, off).unwrap();
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                run.ops.push((at, run.ops.len(), off, data.len() as u64));
            }
        }
    }
    chain.flush().unwrap();
    drop(chain);
    run.durable(rec.len(), model);
    run.events = rec.events();
    run
}

/// What the threads of [`workload_threads`] share: the guest model, the
/// completed operations and the flushes, updated under one lock so that a
/// flush's snapshot holds exactly the operations ranked before its `seq`.
struct Shared {
    model: Vec<u8>,
    ops: Vec<(usize, usize, u64, u64)>,
    flushes: Vec<Durable>,
}

/// The workload of [`workload`] run by `threads` threads at once on one
/// chain, each writing and zeroing its own unit-aligned slice of the disk
/// (so the model stays exact) and flushing now and then. A flush
/// acknowledges what completed before it started; operations still
/// running meanwhile may land or not.
fn workload_threads(image: &Path, case: &Case, rec: Arc<Recorder>, seed: u64, threads: u64) -> Run {
    let chain = open_recorded(image, &rec);
    let model = read_all(&chain, 1 << 20).unwrap();
    let size = model.len() as u64;
    let slice = size / threads / case.unit * case.unit;
    assert!(slice >= case.unit, "{}: slices too small", case.name);
    let shared = std::sync::Mutex::new(Shared {
        flushes: vec![Durable {
            at: 0,
            seq: 0,
            model: Arc::new(model.clone()),
        }],
        model,
        ops: Vec::new(),
    });
    let unit = case.unit.min(256 * K);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (chain, shared, rec) = (&chain, &shared, &rec);
            s.spawn(move || {
                let mut rng = Rng::new(seed ^ ((t + 1) * 0x9e37_79b9));
                let base = t * slice;
                for _ in 0..case.ops / threads as usize {
                    let at = rec.len();
                    match rng.below(20) {
                        0..=2 => {
                            let (seq, snap) = {
                                let sh = shared.lock().unwrap();
                                (sh.ops.len(), Arc::new(sh.model.clone()))
                            };
                            chain.flush().unwrap();
                            let mut sh = shared.lock().unwrap();
                            sh.flushes.push(Durable {
                                at: rec.len(),
                                seq,
                                model: snap,
                            });
                        }
                        k => {
                            let off = base
                                + if rng.below(2) == 0 {
                                    rng.below(slice / 512) * 512
                                } else {
                                    rng.below(slice)
                                };
                            let len = (1 + rng.below(3 * unit)).min(base + slice - off);
                            let data = if k <= 5 {
                                chain.write_zeroes(off, len).unwrap();
                                vec![0u8; len as usize]
                            } else {
                                let data = rng.bytes(len as usize);
                                chain.write_at(&data, off).unwrap();
                                data
                            };
                            let mut sh = shared.lock().unwrap();
                            sh.model[off as usize..(off + len) as usize].copy_from_slice(&data);
                            let seq = sh.ops.len();
                            sh.ops.push((at, seq, off, len));
                        }
                    }
                }
            });
        }
    });
    chain.flush().unwrap();
    drop(chain);
    let mut sh = shared.into_inner().unwrap();
    let seq = sh.ops.len();
    sh.flushes.push(Durable {
        at: rec.len(),
        seq,
        model: Arc::new(sh.model),
    });
    Run {
        events: rec.events(),
        flushes: sh.flushes,
        ops: sh.ops,
    }
}

/// Rebuilds into `out` the image a power cut just before event `cut` may
/// leave: `orig`, events up to the last barrier before `cut`, and a
/// random subset of the later ones, writes possibly torn in 512-byte
/// pieces.
fn rebuild(orig: &[u8], events: &[Event], cut: usize, rng: &mut Rng, out: &Path) {
    let last_barrier = events[..cut].iter().rposition(|e| *e == Event::Barrier);
    let durable = last_barrier.map_or(0, |b| b + 1);
    let mut img = orig.to_vec();
    let mut apply = |e: &Event, torn: bool, rng: &mut Rng| match e {
        Event::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            let mut p = *offset as usize;
            while p < end {
                let q = ((p / 512 + 1) * 512).min(end);
                if !torn || rng.below(2) == 0 {
                    img[p..q].copy_from_slice(&data[p - *offset as usize..q - *offset as usize]);
                }
                p = q;
            }
        }
        Event::Punch { offset, len } => {
            let a = (*offset as usize).min(img.len());
            let b = ((offset + len) as usize).min(img.len());
            img[a..b].fill(0);
        }
        Event::SetLen(n) => img.resize(*n as usize, 0),
        Event::Barrier => {}
    };
    for e in &events[..durable] {
        apply(e, false, rng);
    }
    for e in &events[durable..cut] {
        if rng.below(2) == 0 {
            let torn = rng.below(3) == 0;
            apply(e, torn, rng);
        }
    }
    let f = std::fs::File::create(out).unwrap();
    f.write_all_at(&img, 0).unwrap();
}

/// The verdict on one rebuilt image.
#[derive(Default, Debug)]
struct Tally {
    cuts: usize,
    corrupt: usize,
    leaks: u64,
    leaky_images: usize,
    lost: usize,
    first_failure: Option<String>,
}

impl Tally {
    fn fail(&mut self, what: String) {
        if self.first_failure.is_none() {
            self.first_failure = Some(what);
        }
    }
    fn add(&mut self, o: Tally) {
        self.cuts += o.cuts;
        self.corrupt += o.corrupt;
        self.leaks += o.leaks;
        self.leaky_images += o.leaky_images;
        self.lost += o.lost;
        if self.first_failure.is_none() {
            self.first_failure = o.first_failure;
        }
    }
}

/// `qemu-img check`: Ok(leaks) or Err(what is wrong). qcow v1 and VHD
/// (`vpc`) have no checker in qemu: reading every byte through qemu stands
/// in for it. VDI: an allocated-blocks count ahead of the block map (the
/// count is raised before the entry is written, see `format::vdi::write`)
/// is a leaked block slot, which qemu reports as its one corruption.
fn check(image: &Path, fmt: &str) -> Result<u64, String> {
    if fmt == "qcow" || fmt == "vpc" {
        let out = Command::new("qemu-img")
            .args(["convert", "-f", fmt, "-O", "raw"])
            .arg(image)
            .arg(image.with_extension("raw"))
            .output()
            .unwrap();
        let _ = std::fs::remove_file(image.with_extension("raw"));
        return match out.status.success() {
            true => Ok(0),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        };
    }
    // qemu opens a VHDX with a live log only to replay it (`check -r
    // all`): that is done on a copy (read by the qemu sample), so that
    // vdiskfs still reads the image as the cut left it.
    let image = &match fmt {
        "vhdx" => {
            let copy = qemu_view(image, fmt);
            std::fs::copy(image, &copy).unwrap();
            copy
        }
        _ => image.to_path_buf(),
    };
    let repair: &[&str] = if fmt == "vhdx" { &["-r", "all"] } else { &[] };
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", fmt])
        .args(repair)
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|_| format!("{text}{}", String::from_utf8_lossy(&out.stderr)))?;
    let n = |k: &str| v.get(k).and_then(|n| n.as_u64()).unwrap_or(0);
    if fmt == "vdi" && n("corruptions") == 1 && n("check-errors") == 0 {
        if let Some(leaked) = vdi_count_ahead(&String::from_utf8_lossy(&out.stderr)) {
            return Ok(leaked);
        }
    }
    if n("corruptions") + n("check-errors") > 0 {
        return Err(text.into_owned());
    }
    Ok(n("leaks"))
}

/// The block slots leaked when qemu's only complaint about a VDI is an
/// allocated-blocks count above the number of map entries.
fn vdi_count_ahead(stderr: &str) -> Option<u64> {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    let [line] = errors[..] else { return None };
    let rest = line.split("allocated blocks mismatch, is ").nth(1)?;
    let (is, should) = rest.split_once(", should be ")?;
    let (is, should): (u64, u64) = (is.trim().parse().ok()?, should.trim().parse().ok()?);
    (should > is).then_some(should - is)
}

/// The image qemu reads back after a cut: a copy replayed by `check -r
/// all` for VHDX (see [`check`]), the image itself otherwise.
fn qemu_view(image: &Path, fmt: &str) -> PathBuf {
    match fmt {
        "vhdx" => image.with_extension("qemu.vhdx"),
        _ => image.to_path_buf(),
    }
}

/// Compares `got` with the model of the last durable flush, outside the
/// guest ranges written since (they may hold old or new bytes).
fn lost_bytes(got: &[u8], run: &Run, cut: usize) -> Option<u64> {
    let k = run.flushes.iter().rposition(|d| d.at <= cut).unwrap_or(0);
    let d = &run.flushes[k];
    let want = &d.model[..];
    if got.len() != want.len() {
        return Some(got.len().min(want.len()) as u64);
    }
    // Operations the flush did not cover that may have written before the
    // cut may hold old or new bytes.
    let mut skip: Vec<(usize, usize)> = run
        .ops
        .iter()
        .filter(|&&(at, seq, _, _)| seq >= d.seq && at < cut)
        .map(|&(_, _, off, len)| (off as usize, (off + len) as usize))
        .collect();
    skip.sort_unstable();
    let mut pos = 0usize;
    for (a, b) in skip.into_iter().chain([(want.len(), want.len())]) {
        if a > pos && got[pos..a] != want[pos..a] {
            return (pos..a).find(|&i| got[i] != want[i]).map(|i| i as u64);
        }
        pos = pos.max(b);
    }
    None
}

/// Simulates `cuts` power cuts over `run` of `case` (image file `image`,
/// original bytes `orig`), on two threads.
fn simulate(case: &Case, image: &Path, orig: &[u8], run: &Run, cuts: usize, seed: u64) -> Tally {
    let n = run.events.len();
    let threads = 2;
    let mut total = Tally::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut tally = Tally::default();
                    let mut rng = Rng::new(seed ^ ((t as u64 + 1) * 0x1234_5678));
                    let out = image.with_file_name(format!(
                        "cut{t}.{}",
                        image.extension().unwrap().to_str().unwrap()
                    ));
                    for c in (t..cuts).step_by(threads) {
                        let cut = rng.below(n as u64 + 1) as usize;
                        rebuild(orig, &run.events, cut, &mut rng, &out);
                        tally.cuts += 1;
                        match check(&out, case.fmt) {
                            Ok(l) => {
                                tally.leaks += l;
                                tally.leaky_images += usize::from(l > 0);
                            }
                            Err(e) => {
                                tally.corrupt += 1;
                                tally.fail(format!("cut at event {cut}/{n}: qemu-img check: {e}"));
                                continue;
                            }
                        }
                        let opts = ChainOptions::default();
                        let got = Chain::open(&out, &opts, &caches())
                            .and_then(|ch| read_all(&ch, 1 << 20));
                        let got = match got {
                            Ok(g) => g,
                            Err(e) => {
                                tally.corrupt += 1;
                                tally.fail(format!("cut at event {cut}/{n}: vdiskfs read: {e}"));
                                continue;
                            }
                        };
                        if let Some(at) = lost_bytes(&got, run, cut) {
                            tally.lost += 1;
                            tally.fail(format!(
                                "cut at event {cut}/{n}: vdiskfs reads guest byte {at:#x} \
                                 unlike the last flush"
                            ));
                            continue;
                        }
                        if c % 50 == 0 {
                            let q = qemu_raw(&qemu_view(&out, case.fmt), Some(case.fmt));
                            if let Some(at) = lost_bytes(&q, run, cut) {
                                tally.lost += 1;
                                tally.fail(format!(
                                    "cut at event {cut}/{n}: qemu reads guest byte {at:#x} \
                                     unlike the last flush"
                                ));
                            }
                        }
                    }
                    tally
                })
            })
            .collect();
        for h in handles {
            total.add(h.join().unwrap());
        }
    });
    total
}

fn cuts_per_case() -> usize {
    std::env::var("POWERCUT_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Runs one case: workload, then the cuts. Returns the tally.
fn power_cuts(case: &Case, rec: Recorder, cuts: usize, seed: u64) -> Tally {
    power_cuts_with(case, rec, cuts, seed, 1)
}

/// [`power_cuts`] with the workload run by `threads` threads (1: the
/// single-threaded [`workload`]).
fn power_cuts_with(case: &Case, rec: Recorder, cuts: usize, seed: u64, threads: u64) -> Tally {
    require_tool("qemu-img", "qemu-utils");
    let dir = scratch();
    let image = create(dir.path(), case);
    let orig = std::fs::read(&image).unwrap();
    let run = if threads > 1 {
        workload_threads(&image, case, Arc::new(rec), seed, threads)
    } else {
        workload(&image, case, Arc::new(rec), seed)
    };
    let barriers = run.events.iter().filter(|e| **e == Event::Barrier).count();
    let t = simulate(case, &image, &orig, &run, cuts, seed);
    eprintln!(
        "{} ({threads} thread(s)): {} events ({barriers} barriers, {} guest flushes), {} cuts: {} corrupt, \
         {} lost acknowledged writes, {} images with leaks ({} leaked clusters)",
        case.name,
        run.events.len(),
        run.flushes.len() - 1,
        t.cuts,
        t.corrupt,
        t.lost,
        t.leaky_images,
        t.leaks
    );
    t
}

fn assert_survives(case: Case) {
    let t = power_cuts(&case, Recorder::new(), cuts_per_case(), 0x5eed);
    assert!(t.cuts >= cuts_per_case());
    assert_eq!(
        (t.corrupt, t.lost),
        (0, 0),
        "{}: {:?}",
        case.name,
        t.first_failure
    );
}

#[test]
fn qcow2_4k_survives_power_cuts() {
    assert_survives(Case {
        name: "qcow2-4k",
        fmt: "qcow2",
        unit: 4 * K,
        ops: 150,
    });
}

#[test]
fn qcow2_64k_survives_power_cuts() {
    assert_survives(Case {
        name: "qcow2-64k",
        fmt: "qcow2",
        unit: 64 * K,
        ops: 120,
    });
}

#[test]
fn qcow2_2m_survives_power_cuts() {
    assert_survives(Case {
        name: "qcow2-2m",
        fmt: "qcow2",
        unit: 2 * M,
        ops: 30,
    });
}

#[test]
fn qcow2_extended_l2_survives_power_cuts() {
    assert_survives(Case {
        name: "qcow2-64k-extl2",
        fmt: "qcow2",
        unit: 64 * K,
        ops: 120,
    });
}

#[test]
fn qcow2_overlay_on_vmdk_survives_power_cuts() {
    assert_survives(Case {
        name: "qcow2-over-vmdk",
        fmt: "qcow2",
        unit: 64 * K,
        ops: 120,
    });
}

#[test]
fn qcow_v1_survives_power_cuts() {
    assert_survives(Case {
        name: "qcow",
        fmt: "qcow",
        unit: 4 * K,
        ops: 120,
    });
}

#[test]
fn vmdk_sparse_survives_power_cuts() {
    assert_survives(Case {
        name: "vmdk-sparse",
        fmt: "vmdk",
        unit: 64 * K,
        ops: 120,
    });
}

#[test]
fn vhd_dynamic_survives_power_cuts() {
    assert_survives(Case {
        name: "vhd-dynamic",
        fmt: "vpc",
        unit: 2 * M,
        ops: 40,
    });
}

#[test]
fn vdi_dynamic_survives_power_cuts() {
    assert_survives(Case {
        name: "vdi-dynamic",
        fmt: "vdi",
        unit: M,
        ops: 60,
    });
}

#[test]
fn vhdx_dynamic_survives_power_cuts() {
    assert_survives(Case {
        name: "vhdx-1m",
        fmt: "vhdx",
        unit: M,
        ops: 60,
    });
}

/// The checker can fail: with the barriers left out of the log (as if the
/// write path issued none), cuts find corrupt images and lost writes.
#[test]
fn checker_catches_writes_without_barriers() {
    let case = Case {
        name: "qcow2-64k",
        fmt: "qcow2",
        unit: 64 * K,
        ops: 120,
    };
    let t = power_cuts(&case, Recorder::ignoring_barriers(), 300, 0x5eed);
    assert!(
        t.corrupt > 0,
        "no corrupt image found without barriers: {t:?}"
    );
    assert!(t.lost > 0, "no lost write found without barriers: {t:?}");
}

/// The checker catches a reordered write sequence: one allocating write
/// logs its data and refcount writes, a barrier, then the L2 entry; put
/// the L2 entry (and a barrier) first, cut right after it, and the image
/// names a cluster whose refcount is 0 — `qemu-img check` must say so,
/// while the same cut of the log in its real order is clean.
#[test]
fn checker_catches_a_reordered_write_sequence() {
    require_tool("qemu-img", "qemu-utils");
    let dir = scratch();
    let img = dir.path().join("img.qcow2");
    let s = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", s, "4M"]);
    qemu_io("qcow2", &img, &["write -P 0x11 0 64k"]);
    let orig = std::fs::read(&img).unwrap();
    let rec = Arc::new(Recorder::new());
    let how = HostOpen {
        writable: true,
        ..Default::default()
    };
    let file = HostFile::open_with(&img, how).unwrap();
    file.set_recorder(rec.clone());
    let opts = ChainOptions {
        writable: true,
        ..Default::default()
    };
    let chain = Chain::open_on(file, &opts, &caches()).unwrap();
    chain.write_at(&[0x77; 65536], 128 * K).unwrap();
    chain.flush().unwrap();
    drop(chain);
    let events = rec.events();
    let first = events.iter().position(|e| *e == Event::Barrier).unwrap();
    let (before, after) = events.split_at(first + 1);
    assert!(
        before
            .iter()
            .filter(|e| matches!(e, Event::Write { .. }))
            .count()
            >= 2,
        "data and refcount before the first barrier: {before:?}"
    );
    let entry_writes: Vec<Event> = after
        .iter()
        .filter(|e| matches!(e, Event::Write { .. }))
        .cloned()
        .collect();
    assert!(!entry_writes.is_empty(), "the L2 entry after it: {after:?}");
    let out = dir.path().join("cut.qcow2");
    let mut rng = Rng::new(1);
    // The real order, cut after the L2 entry's barrier: clean.
    rebuild(&orig, &events, events.len(), &mut rng, &out);
    assert!(check(&out, "qcow2").is_ok());
    // Reordered: the entry and a barrier first, then a cut.
    let mut reordered = entry_writes;
    reordered.push(Event::Barrier);
    let cut = reordered.len();
    reordered.extend(before.iter().cloned());
    rebuild(&orig, &reordered, cut, &mut rng, &out);
    let verdict = check(&out, "qcow2");
    assert!(verdict.is_err(), "the reordered image passed: {verdict:?}");
}

/// The workload of [`workload`], but every guest operation arrives as an
/// NBD request through the server's connection handler (in-process, over
/// a socket pair, one request at a time): WRITE (some with FUA), TRIM and
/// WRITE_ZEROES (some with FUA), FLUSH. A durability point is the reply to
/// a FLUSH or to a FUA request: vdiskfs makes a FUA request durable by
/// flushing, so everything acknowledged before it is covered too (more
/// than the protocol asks, which is only the FUA request itself).
fn workload_nbd(image: &Path, case: &Case, rec: Arc<Recorder>, seed: u64) -> Run {
    use std::io::{Read, Write};
    use vdiskfs::nbd::{negotiate::Negotiated, transmit, Export};
    let chain = open_recorded(image, &rec);
    let mut model = read_all(&chain, 1 << 20).unwrap();
    let size = model.len() as u64;
    let export = Export {
        name: "disk".into(),
        description: String::new(),
        chain: Arc::new(chain),
        on_write: None,
    };
    let neg = Negotiated {
        export: 0,
        structured: false,
        contexts: Vec::new(),
    };
    let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
    let handler = std::thread::spawn(move || {
        let output = server.try_clone().unwrap();
        transmit::serve(server, output, &export, &neg, &transmit::Limits::default())
    });
    let mut cookie = 0u64;
    // Sends one request and waits for its (simple) reply: it must succeed.
    let mut request = |flags: u16, kind: u16, off: u64, len: u64, data: &[u8]| {
        cookie += 1;
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&off.to_be_bytes());
        r.extend_from_slice(&(len as u32).to_be_bytes());
        r.extend_from_slice(data);
        client.write_all(&r).unwrap();
        let mut reply = [0u8; 16];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..4], 0x6744_6698u32.to_be_bytes());
        assert_eq!(reply[4..8], [0; 4], "NBD request {kind} failed");
        assert_eq!(reply[8..], cookie.to_be_bytes());
    };
    const FUA: u16 = 1;
    let (write, flush, trim, zeroes) = (1u16, 3u16, 4u16, 6u16);
    let mut rng = Rng::new(seed);
    let mut run = Run::new(&model);
    for _ in 0..case.ops {
        let at = rec.len();
        let fua = if rng.below(4) == 0 { FUA } else { 0 };
        let durable = match next_op(&mut rng, case, size) {
            Op::Flush => {
                request(0, flush, 0, 0, &[]);
                true
            }
            Op::Zero(off, len) => {
                let kind = if rng.below(2) == 0 { trim } else { zeroes };
                request(fua, kind, off, len, &[]);
                model[off as usize..(off + len) as usize].fill(0);
                run.ops.push((at, run.ops.len(), off, len));
                fua == FUA
            }
            Op::Write(off, data) => {
                let len = data.len() as u64;
                request(fua, write, off, len, &data);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                run.ops.push((at, run.ops.len(), off, len));
                fua == FUA
            }
        };
        if durable {
            run.durable(rec.len(), model.clone());
        }
    }
    // NBD_CMD_DISC: the handler answers nothing more, flushes and ends.
    let mut disc = Vec::new();
    disc.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    disc.extend_from_slice(&[0, 0, 0, 2]);
    disc.extend_from_slice(&[0; 20]);
    client.write_all(&disc).unwrap();
    handler.join().unwrap().unwrap();
    run.durable(rec.len(), model);
    run.events = rec.events();
    run
}

/// [`assert_survives`] for writes arriving over NBD.
fn assert_nbd_writes_survive(case: Case) {
    require_tool("qemu-img", "qemu-utils");
    let dir = scratch();
    let image = create(dir.path(), &case);
    let orig = std::fs::read(&image).unwrap();
    let run = workload_nbd(&image, &case, Arc::new(Recorder::new()), 0x0b0d);
    let points = run.flushes.len() - 2;
    assert!(points > 10, "too few durability points: {points}");
    let t = simulate(&case, &image, &orig, &run, cuts_per_case(), 0x0b0d);
    eprintln!(
        "{} over NBD: {} events, {points} FLUSH/FUA replies, {} cuts: {} corrupt, {} lost \
         acknowledged writes, {} images with leaks ({} leaked clusters)",
        case.name,
        run.events.len(),
        t.cuts,
        t.corrupt,
        t.lost,
        t.leaky_images,
        t.leaks
    );
    assert_eq!(
        (t.corrupt, t.lost),
        (0, 0),
        "{} over NBD: {:?}",
        case.name,
        t.first_failure
    );
}

#[test]
fn qcow2_writes_over_nbd_survive_power_cuts() {
    assert_nbd_writes_survive(Case {
        name: "qcow2-64k",
        fmt: "qcow2",
        unit: 64 * K,
        ops: 120,
    });
}

#[test]
fn vmdk_writes_over_nbd_survive_power_cuts() {
    assert_nbd_writes_survive(Case {
        name: "vmdk-sparse",
        fmt: "vmdk",
        unit: 64 * K,
        ops: 120,
    });
}

fn assert_survives_threads(case: Case) {
    let t = power_cuts_with(&case, Recorder::new(), cuts_per_case(), 0x7eed, 4);
    assert!(t.cuts >= cuts_per_case());
    assert_eq!(
        (t.corrupt, t.lost),
        (0, 0),
        "{} (4 threads): {:?}",
        case.name,
        t.first_failure
    );
}

/// Four threads writing, zeroing and flushing at once (qcow2 64 KiB
/// clusters, extended L2, qcow v1, sparse VMDK).
#[test]
fn concurrent_writers_survive_power_cuts() {
    for (name, fmt, unit) in [
        ("qcow2-64k", "qcow2", 64 * K),
        ("qcow2-64k-extl2", "qcow2", 64 * K),
        ("qcow", "qcow", 4 * K),
        ("vmdk-sparse", "vmdk", 64 * K),
    ] {
        assert_survives_threads(Case {
            name,
            fmt,
            unit,
            ops: 160,
        });
    }
}

/// The concurrent workload's checker can fail too: without barriers it
/// finds corrupt images and lost writes.
#[test]
fn checker_catches_concurrent_writes_without_barriers() {
    let case = Case {
        name: "qcow2-64k",
        fmt: "qcow2",
        unit: 64 * K,
        ops: 160,
    };
    let t = power_cuts_with(&case, Recorder::ignoring_barriers(), 300, 0x7eed, 4);
    assert!(
        t.corrupt > 0 || t.lost > 0,
        "nothing found without barriers: {t:?}"
    );
}
