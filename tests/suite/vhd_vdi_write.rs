//! In-place writes into VHD (fixed, dynamic, differencing) and VDI
//! (static, dynamic): pseudo-random writes, zeroings and flushes mirrored
//! into a model, checked through the library, `qemu-img convert`,
//! `qemu-img compare` and (VDI) `qemu-img check`; concurrent first writes
//! into shared blocks; writes through a real `--rw` FUSE mount;
//! `--overlay` and `--snapshot` over VHD, VDI and Parallels, and the
//! in-place refusal of Parallels. qemu has no checker for `vpc`
//! (`qemu-img check` says the format does not support checks), so VHD
//! images are checked by reading them back through qemu and a fresh open.

use crate::common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::fuse::Mounted;
use common::rng::Rng;
use common::vhd::{build_diff, footer_of, parent, uuid_of, w2ru, Diff};
use common::{caches, open_chain, qemu_img, qemu_io, qemu_raw, read_all, scratch};
use vdiskfs::chain::{Chain, ChainOptions};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Creates a `fmt` image (qemu's name) of `size` with some data in it.
fn create(dir: &Path, name: &str, fmt: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", fmt, "-o", opts, s(&p), size]);
    qemu_io(
        fmt,
        &p,
        &["write -P 0x11 0 100k", "write -P 0x22 2040k 20k"],
    );
    p
}

fn open_rw(img: &Path) -> Chain {
    let opts = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    Chain::open(img, &opts, &caches()).unwrap_or_else(|e| panic!("open {}: {e}", img.display()))
}

fn assert_model(got: &[u8], model: &[u8], what: &str) {
    assert_eq!(got.len(), model.len(), "{what}: size");
    if let Some(i) = got.iter().zip(model).position(|(x, y)| x != y) {
        panic!("{what}: differs from the model at offset {i:#x}");
    }
}

/// Final checks: a fresh open, and (`fmt` set: qemu reads the image)
/// qemu-img convert, compare and, where qemu has one, check.
fn check_all(img: &Path, fmt: Option<&str>, model: &[u8], dir: &Path) {
    let chain = open_chain(img).unwrap();
    assert_model(&read_all(&chain, 1 << 20).unwrap(), model, "reopened");
    assert_model(
        &read_all(&chain, 4096 + 512 + 3).unwrap(),
        model,
        "odd pieces",
    );
    drop(chain);
    let Some(fmt) = fmt else { return };
    assert_model(&qemu_raw(img, Some(fmt)), model, "qemu-img convert");
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    qemu_img(&["compare", "-f", fmt, "-F", "raw", s(img), s(&raw)]);
    if fmt == "vdi" {
        qemu_img(&["check", "-f", fmt, s(img)]);
    }
}

/// A random range: mostly small and unaligned, sometimes large, often
/// near a block boundary or the end of the disk.
fn random_range(rng: &mut Rng, size: u64, unit: u64) -> (u64, u64) {
    let len = match rng.below(10) {
        0..=4 => 1 + rng.below(2 * unit),
        5..=7 => 1 + rng.below(40_000),
        _ => 1 + rng.below(600_000),
    }
    .min(size);
    let off = match rng.below(5) {
        4 => size - 1 - rng.below(3 * unit.min(size / 4)),
        0 => rng.below(size / unit + 1) * unit,
        _ => rng.below(size),
    };
    (off.min(size - len), len)
}

/// Random writes, zeroings and flushes through the library; returns the
/// model.
fn random_ops(img: &Path, mut model: Vec<u8>, seed: u64, ops: usize, unit: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let chain = open_rw(img);
    assert!(chain.is_writable());
    let size = chain.size();
    assert_eq!(size as usize, model.len());
    for i in 0..ops {
        let (off, len) = random_range(&mut rng, size, unit);
        let (o, l) = (off as usize, len as usize);
        if rng.below(4) == 0 {
            chain.write_zeroes(off, len).unwrap();
            model[o..o + l].fill(0);
        } else {
            let data = rng.bytes(l);
            chain.write_at(&data, off).unwrap();
            model[o..o + l].copy_from_slice(&data);
        }
        let lo = off.saturating_sub(4096);
        let hi = (off + len + 4096).min(size);
        let mut back = vec![0u8; (hi - lo) as usize];
        chain.read_at(&mut back, lo).unwrap();
        assert_model(&back, &model[lo as usize..hi as usize], &format!("op {i}"));
        if i % 40 == 39 {
            chain.flush().unwrap();
            assert_model(&read_all(&chain, 65536 + 7).unwrap(), &model, "whole disk");
        }
    }
    chain.flush().unwrap();
    model
}

#[test]
fn vhd_fixed_random_writes() {
    let d = scratch();
    let img = create(d.path(), "f.vhd", "vpc", "subformat=fixed", "6M");
    let model = random_ops(&img, qemu_raw(&img, Some("vpc")), 1, 200, 4096);
    check_all(&img, Some("vpc"), &model, d.path());
    // The footer at the end is intact.
    let footer = footer_of(&img);
    assert_eq!(&footer[..8], b"conectix");
}

#[test]
fn vhd_dynamic_random_writes() {
    let d = scratch();
    let img = create(d.path(), "d.vhd", "vpc", "subformat=dynamic", "9M");
    let len_before = std::fs::metadata(&img).unwrap().len();
    let model = random_ops(&img, qemu_raw(&img, Some("vpc")), 2, 300, 2 << 20);
    check_all(&img, Some("vpc"), &model, d.path());
    let b = std::fs::read(&img).unwrap();
    assert!(b.len() as u64 > len_before, "no block was allocated");
    assert_eq!(
        &b[b.len() - 512..],
        &b[..512],
        "footer at the end = copy at 0"
    );
    // qemu writes more into what we wrote.
    qemu_io("vpc", &img, &["write -P 0x5a 3M 70k"]);
    let mut model = model;
    model[3 << 20..(3 << 20) + 70 * 1024].fill(0x5a);
    check_all(&img, Some("vpc"), &model, d.path());
    // A file whose end lost its footer (as a power cut can leave it)
    // opens by the copy at 0; a writable open puts the footer back.
    let mut b = std::fs::read(&img).unwrap();
    let n = b.len();
    b[n - 512..].fill(0xab);
    std::fs::write(&img, &b).unwrap();
    check_all(&img, Some("vpc"), &model, d.path());
    let chain = open_rw(&img);
    chain.flush().unwrap();
    drop(chain);
    let b = std::fs::read(&img).unwrap();
    assert_eq!(b.len(), n + 512);
    assert_eq!(&b[b.len() - 512..], &b[..512], "footer restored at the end");
    check_all(&img, Some("vpc"), &model, d.path());
}

#[test]
fn vhd_differencing_random_writes_leave_the_parent_alone() {
    let d = scratch();
    let (base, mut oracle) = parent(d.path(), "base.vhd", "5M");
    let base_before = std::fs::read(&base).unwrap();
    let child = d.path().join("child.vhd");
    let diff = Diff {
        uuid: [0x33; 16],
        parent_uuid: uuid_of(&footer_of(&base)),
        size: oracle.len() as u64,
        locators: vec![w2ru(".\\base.vhd")],
        parent_name: "base.vhd".into(),
    };
    build_diff(&child, &diff, &mut oracle, 8);
    let model = random_ops(&child, oracle, 3, 250, 2 << 20);
    check_all(&child, None, &model, d.path());
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the parent changed"
    );
}

#[test]
fn vdi_static_random_writes() {
    let d = scratch();
    let img = create(d.path(), "s.vdi", "vdi", "static=on", "6M");
    let model = random_ops(&img, qemu_raw(&img, Some("vdi")), 4, 200, 1 << 20);
    check_all(&img, Some("vdi"), &model, d.path());
}

#[test]
fn vdi_dynamic_random_writes() {
    let d = scratch();
    let img = create(d.path(), "d.vdi", "vdi", "preallocation=off", "9M");
    let model = random_ops(&img, qemu_raw(&img, Some("vdi")), 5, 300, 1 << 20);
    check_all(&img, Some("vdi"), &model, d.path());
    qemu_io("vdi", &img, &["write -P 0x5a 7M 70k"]);
    let mut model = model;
    model[7 << 20..(7 << 20) + 70 * 1024].fill(0x5a);
    check_all(&img, Some("vdi"), &model, d.path());
}

/// Disjoint segments of random lengths written by 8 threads: they share
/// blocks (first writes race) but never bytes.
fn concurrent_writers(img: &Path, fmt: Option<&str>, model: Vec<u8>, dir: &Path, seed: u64) {
    let mut model = model;
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
    let chain = Arc::new(open_rw(img));
    std::thread::scope(|sc| {
        for w in &work {
            let chain = chain.clone();
            sc.spawn(move || {
                for (off, data) in w {
                    chain.write_at(data, *off).unwrap();
                }
            });
        }
        let chain = chain.clone();
        sc.spawn(move || {
            let mut buf = vec![0u8; 65536];
            for i in 0..200u64 {
                let off = (i * 7919 * 4096) % (size - buf.len() as u64);
                chain.read_at(&mut buf, off).unwrap();
            }
        });
    });
    chain.flush().unwrap();
    assert_model(
        &read_all(&chain, 1 << 20).unwrap(),
        &model,
        "after concurrent writes",
    );
    drop(chain);
    check_all(img, fmt, &model, dir);
}

#[test]
fn concurrent_first_writes_into_shared_blocks() {
    let d = scratch();
    let vhd = create(d.path(), "c.vhd", "vpc", "subformat=dynamic", "7M");
    concurrent_writers(&vhd, Some("vpc"), qemu_raw(&vhd, Some("vpc")), d.path(), 10);
    let vdi = create(d.path(), "c.vdi", "vdi", "preallocation=off", "7M");
    concurrent_writers(&vdi, Some("vdi"), qemu_raw(&vdi, Some("vdi")), d.path(), 11);
    let (base, mut oracle) = parent(d.path(), "pb.vhd", "5M");
    let child = d.path().join("pc.vhd");
    let diff = Diff {
        uuid: [0x44; 16],
        parent_uuid: uuid_of(&footer_of(&base)),
        size: oracle.len() as u64,
        locators: vec![w2ru(".\\pb.vhd")],
        parent_name: "pb.vhd".into(),
    };
    build_diff(&child, &diff, &mut oracle, 12);
    concurrent_writers(&child, None, oracle, d.path(), 13);
}

/// Random writes and hole punches through a `--rw` mount.
fn through_mount(img: &Path, fmt: &str, dir: &Path, seed: u64) {
    let mut model = qemu_raw(img, Some(fmt));
    let size = model.len() as u64;
    let m = Mounted::new(&[img], &["--rw"]);
    let name = vdiskfs::cli::exposed_name(img).unwrap();
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.file(name.to_str().unwrap()))
            .unwrap();
        let mut rng = Rng::new(seed);
        for _ in 0..150 {
            let (off, len) = random_range(&mut rng, size, 1 << 20);
            let (o, l) = (off as usize, len as usize);
            if rng.below(5) == 0 {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                // SAFETY: fallocate on a file we opened.
                let rc = unsafe {
                    libc::fallocate(
                        std::os::fd::AsRawFd::as_raw_fd(&f),
                        mode,
                        off as i64,
                        len as i64,
                    )
                };
                assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
                model[o..o + l].fill(0);
            } else {
                let data = rng.bytes(l);
                f.write_all_at(&data, off).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
        }
        f.sync_all().unwrap();
        let mut back = vec![0u8; size as usize];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_model(&back, &model, "read back through the mount");
    }
    m.unmount();
    check_all(img, Some(fmt), &model, dir);
}

#[test]
fn writes_through_a_rw_mount() {
    let d = scratch();
    let vhd = create(d.path(), "m.vhd", "vpc", "subformat=dynamic", "6M");
    through_mount(&vhd, "vpc", d.path(), 20);
    let fixed = create(d.path(), "mf.vhd", "vpc", "subformat=fixed", "5M");
    through_mount(&fixed, "vpc", d.path(), 21);
    let vdi = create(d.path(), "m.vdi", "vdi", "preallocation=off", "6M");
    through_mount(&vdi, "vdi", d.path(), 22);
}

#[test]
fn overlay_and_snapshot_over_vhd_vdi_and_parallels() {
    let d = scratch();
    let images = [
        create(d.path(), "o.vhd", "vpc", "subformat=dynamic", "4M"),
        create(d.path(), "o.vdi", "vdi", "preallocation=off", "4M"),
        create(d.path(), "o.hds", "parallels", "cluster_size=1M", "4M"),
    ];
    for img in &images {
        let before = std::fs::read(img).unwrap();
        let want = qemu_raw(img, None);
        let name = vdiskfs::cli::exposed_name(img).unwrap();
        let name = name.to_str().unwrap();
        for mode in ["overlay", "snapshot"] {
            let ov = d
                .path()
                .join(format!("ov-{}.qcow2", img.display().to_string().len()));
            let _ = std::fs::remove_file(&ov);
            let opts: Vec<&str> = if mode == "overlay" {
                vec!["--overlay", s(&ov)]
            } else {
                vec!["--snapshot"]
            };
            let m = Mounted::new(&[img], &opts);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(m.file(name))
                .unwrap();
            let mut model = want.clone();
            f.write_all_at(&[0x77; 10000], 123_456).unwrap();
            model[123_456..133_456].fill(0x77);
            f.sync_all().unwrap();
            let mut back = vec![0u8; model.len()];
            f.read_exact_at(&mut back, 0).unwrap();
            assert_model(&back, &model, &format!("{mode} over {}", img.display()));
            drop(f);
            m.unmount();
            if mode == "overlay" {
                assert_model(&qemu_raw(&ov, Some("qcow2")), &model, "overlay by qemu");
            }
            assert!(
                std::fs::read(img).unwrap() == before,
                "{} changed",
                img.display()
            );
        }
    }
    // Parallels is not written in place: refused with the hint.
    let err = Mounted::try_new(&[&images[2]], &["--rw"])
        .err()
        .expect("--rw on Parallels must be refused");
    assert!(err.contains("--overlay FILE or --snapshot"), "{err}");
}

#[test]
fn vdi_differencing_random_writes_leave_the_parent_alone() {
    let d = scratch();
    let parent = create(d.path(), "parent.vdi", "vdi", "preallocation=off", "7M");
    qemu_io("vdi", &parent, &["write -P 0x31 0 7M"]);
    let child = create(d.path(), "child.vdi", "vdi", "preallocation=off", "7M");
    // Make the child a differencing image of the parent (type 4, the
    // parent's UUIDs), as tests/vdi.rs does.
    let pb = std::fs::read(&parent).unwrap();
    let mut cb = std::fs::read(&child).unwrap();
    cb[0x4c..0x50].copy_from_slice(&4u32.to_le_bytes());
    cb[0x1a8..0x1b8].copy_from_slice(&pb[0x188..0x198]);
    cb[0x1b8..0x1c8].copy_from_slice(&pb[0x198..0x1a8]);
    std::fs::write(&child, cb).unwrap();
    let chain = open_chain(&child).unwrap();
    assert_eq!(chain.layers().len(), 2);
    let before = read_all(&chain, 1 << 20).unwrap();
    drop(chain);
    // The parent shows through where the child has no block.
    assert_eq!(before[3 << 20], 0x31);
    let model = random_ops(&child, before, 6, 250, 1 << 20);
    check_all(&child, None, &model, d.path());
    assert!(std::fs::read(&parent).unwrap() == pb, "the parent changed");
}
