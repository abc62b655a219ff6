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
use common::model::{self, Target, Via};
use common::{assert_model, open_rw, s};

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::fuse::Mounted;
use common::rng::Rng;
use common::vhd::{build_diff, footer_of, parent, uuid_of, w2ru, Diff};
use common::{open_chain, qemu_img, qemu_io, qemu_raw, read_all, scratch};

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

/// The model harness (random writes, zeroings, flushes and reads against
/// an in-memory model, shrunk on failure) on images `build` makes; `fmt`
/// `None` where qemu cannot read them; `after` checks each closed image.
fn random_ops(
    build: &dyn Fn(&Path) -> PathBuf,
    fmt: Option<&str>,
    unit: u64,
    after: Option<&dyn Fn(&Path)>,
    via: Via,
) {
    let target = Target {
        fmt,
        unit,
        table: unit,
        build,
        after,
    };
    model::run(&target, via);
}

/// Keeps a copy of `file` beside it (`NAME.orig`), for [`unchanged`].
fn keep_copy(file: &Path) {
    std::fs::copy(file, file.with_extension("orig")).unwrap();
}

/// Asserts that `file` still equals the copy [`keep_copy`] kept.
fn unchanged(file: &Path) {
    let now = std::fs::read(file).unwrap();
    let kept = std::fs::read(file.with_extension("orig")).unwrap();
    assert!(now == kept, "{} changed", file.display());
}

#[test]
fn vhd_fixed_random_writes() {
    let build = |d: &Path| create(d, "f.vhd", "vpc", "subformat=fixed", "6M");
    // The footer at the end stays intact.
    let footer = |img: &Path| assert_eq!(&footer_of(img)[..8], b"conectix");
    random_ops(&build, Some("vpc"), 4096, Some(&footer), Via::Library);
}

#[test]
fn vhd_dynamic_random_writes() {
    let build = |d: &Path| create(d, "d.vhd", "vpc", "subformat=dynamic", "9M");
    let footer_copies = |img: &Path| {
        let b = std::fs::read(img).unwrap();
        assert_eq!(
            &b[b.len() - 512..],
            &b[..512],
            "footer at the end = copy at 0"
        );
    };
    random_ops(
        &build,
        Some("vpc"),
        2 << 20,
        Some(&footer_copies),
        Via::Library,
    );
}

#[test]
fn vhd_dynamic_footer_lost_at_the_end_is_restored_by_a_writable_open() {
    let d = scratch();
    let img = create(d.path(), "d.vhd", "vpc", "subformat=dynamic", "9M");
    let len_before = std::fs::metadata(&img).unwrap().len();
    let mut model = qemu_raw(&img, Some("vpc"));
    let data = Rng::new(2).bytes(3 << 20);
    let chain = open_rw(&img);
    chain.write_at(&data, 5 << 20).unwrap();
    chain.flush().unwrap();
    drop(chain);
    model[5 << 20..8 << 20].copy_from_slice(&data);
    check_all(&img, Some("vpc"), &model, d.path());
    let b = std::fs::read(&img).unwrap();
    assert!(b.len() as u64 > len_before, "no block was allocated");
    // qemu writes more into what we wrote.
    qemu_io("vpc", &img, &["write -P 0x5a 3M 70k"]);
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
    let build = |d: &Path| {
        let (base, mut oracle) = parent(d, "base.vhd", "5M");
        keep_copy(&base);
        let child = d.join("child.vhd");
        let diff = Diff {
            uuid: [0x33; 16],
            parent_uuid: uuid_of(&footer_of(&base)),
            size: oracle.len() as u64,
            locators: vec![w2ru(".\\base.vhd")],
            parent_name: "base.vhd".into(),
        };
        build_diff(&child, &diff, &mut oracle, 8);
        child
    };
    let parent_alone = |child: &Path| unchanged(&child.with_file_name("base.vhd"));
    random_ops(&build, None, 2 << 20, Some(&parent_alone), Via::Library);
}

#[test]
fn vdi_static_random_writes() {
    let build = |d: &Path| create(d, "s.vdi", "vdi", "static=on", "6M");
    random_ops(&build, Some("vdi"), 1 << 20, None, Via::Library);
}

#[test]
fn vdi_dynamic_random_writes() {
    let build = |d: &Path| create(d, "d.vdi", "vdi", "preallocation=off", "9M");
    random_ops(&build, Some("vdi"), 1 << 20, None, Via::Library);
}

#[test]
fn vdi_dynamic_qemu_writes_after_ours() {
    let d = scratch();
    let img = create(d.path(), "d.vdi", "vdi", "preallocation=off", "9M");
    let mut model = qemu_raw(&img, Some("vdi"));
    let data = Rng::new(5).bytes(2 << 20);
    let chain = open_rw(&img);
    chain.write_at(&data, (6 << 20) + 12345).unwrap();
    chain.flush().unwrap();
    drop(chain);
    model[(6 << 20) + 12345..(8 << 20) + 12345].copy_from_slice(&data);
    check_all(&img, Some("vdi"), &model, d.path());
    qemu_io("vdi", &img, &["write -P 0x5a 7M 70k"]);
    model[7 << 20..(7 << 20) + 70 * 1024].fill(0x5a);
    check_all(&img, Some("vdi"), &model, d.path());
}

/// Disjoint segments of random lengths written by 8 threads
/// (`model::concurrent_disjoint_writes`): they share blocks (first writes
/// race) but never bytes.
fn concurrent_writers(img: &Path, fmt: Option<&str>, model: Vec<u8>, dir: &Path, seed: u64) {
    let mut model = model;
    model::concurrent_disjoint_writes(img, &mut model, seed);
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

#[test]
fn writes_through_a_rw_mount() {
    let vhd = |d: &Path| create(d, "m.vhd", "vpc", "subformat=dynamic", "6M");
    random_ops(&vhd, Some("vpc"), 2 << 20, None, Via::Fuse);
    let fixed = |d: &Path| create(d, "mf.vhd", "vpc", "subformat=fixed", "5M");
    random_ops(&fixed, Some("vpc"), 4096, None, Via::Fuse);
    let vdi = |d: &Path| create(d, "m.vdi", "vdi", "preallocation=off", "6M");
    random_ops(&vdi, Some("vdi"), 1 << 20, None, Via::Fuse);
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
    let build = |d: &Path| {
        let parent = create(d, "parent.vdi", "vdi", "preallocation=off", "7M");
        qemu_io("vdi", &parent, &["write -P 0x31 0 7M"]);
        let child = create(d, "child.vdi", "vdi", "preallocation=off", "7M");
        // Make the child a differencing image of the parent (type 4, the
        // parent's UUIDs), as tests/suite/vdi.rs does.
        let pb = std::fs::read(&parent).unwrap();
        let mut cb = std::fs::read(&child).unwrap();
        cb[0x4c..0x50].copy_from_slice(&4u32.to_le_bytes());
        cb[0x1a8..0x1b8].copy_from_slice(&pb[0x188..0x198]);
        cb[0x1b8..0x1c8].copy_from_slice(&pb[0x198..0x1a8]);
        std::fs::write(&child, cb).unwrap();
        keep_copy(&parent);
        let chain = open_chain(&child).unwrap();
        assert_eq!(chain.layers().len(), 2);
        // The parent shows through where the child has no block.
        assert_eq!(read_all(&chain, 1 << 20).unwrap()[3 << 20], 0x31);
        child
    };
    let parent_alone = |child: &Path| unchanged(&child.with_file_name("parent.vdi"));
    random_ops(&build, None, 1 << 20, Some(&parent_alone), Via::Library);
}
