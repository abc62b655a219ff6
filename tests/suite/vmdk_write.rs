//! VMDK in-place writes: pseudo-random writes and zeroings mirrored into an
//! in-memory model, over monolithicSparse (with and without zeroed grains,
//! and as a delta child of a parent with data), twoGbMaxExtentSparse
//! (including a 5 GiB disk written across the 2 GiB extent boundary) and
//! flat subformats; each checked with `qemu-img check`, `qemu-img convert`
//! and a fresh open; concurrent writers into shared grains; refusals.

use crate::common;
use common::model::{self, Target, Via};
use common::{assert_model, open_rw, s};

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::rng::Rng;
use common::{caches, open_chain, qemu_img, qemu_io, read_all, scratch, testdata};
use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::ErrorKind;

const GRAIN: u64 = 65536;
/// Guest bytes one grain table covers (512 entries of 64 KiB grains).
const GT_COVER: u64 = 512 * GRAIN;

fn create(dir: &Path, name: &str, size: &str, opts: &str, backing: Option<&Path>) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-f", "vmdk", "-o", opts];
    if let Some(b) = backing {
        args.extend(["-b", s(b), "-F", "vmdk"]);
    }
    args.extend([s(&p), size]);
    qemu_img(&args);
    p
}

/// Final checks: qemu-img check, qemu-img convert, a fresh open.
fn check_all(img: &Path, model: &[u8]) {
    model::check_closed(img, Some("vmdk"), model).unwrap();
}

/// Prior data through qemu-io: a few patterns, some across tables.
fn seed_data(img: &Path) {
    qemu_io(
        "vmdk",
        img,
        &[
            "write -P 0x11 0 100k",
            "write -P 0x22 1m 64k",
            "write -P 0x33 31m 2m",
            "write -P 0x44 40000 3000",
        ],
    );
}

/// For a hosted sparse extent file: checks that the redundant grain
/// directory and tables agree entry for entry with the primary ones (the
/// writer updates both); returns the number of zeroed-grain entries (1).
fn check_redundant(extent: &Path) -> usize {
    let f = std::fs::read(extent).unwrap();
    if !f.starts_with(b"KDMV") {
        return 0;
    }
    let le32 = |at: usize| u32::from_le_bytes(f[at..at + 4].try_into().unwrap()) as usize;
    let le64 = |at: usize| u64::from_le_bytes(f[at..at + 8].try_into().unwrap()) as usize;
    let (capacity, grain, gt_entries) = (le64(12), le64(20), le32(44));
    let (rgd, gd) = (le64(48) * 512, le64(56) * 512);
    let entries = capacity.div_ceil(grain * gt_entries);
    let mut zeroed = 0;
    for i in 0..entries {
        let (p, r) = (le32(gd + 4 * i) * 512, le32(rgd + 4 * i) * 512);
        assert_eq!(p == 0, r == 0, "{}: GDE {i}", extent.display());
        if p == 0 {
            continue;
        }
        assert_ne!(p, r, "{}: GDE {i} shares its table", extent.display());
        let (pt, rt) = (&f[p..p + gt_entries * 4], &f[r..r + gt_entries * 4]);
        assert!(pt == rt, "{}: redundant GT {i} differs", extent.display());
        zeroed += pt.chunks(4).filter(|c| c == &[1, 0, 0, 0]).count();
    }
    zeroed
}

/// The model harness (random writes, zeroings, flushes and reads against
/// an in-memory model, shrunk on failure) on images `build` makes; after
/// each case the redundant grain tables must agree with the primary ones.
fn random_test(build: &dyn Fn(&Path) -> PathBuf) {
    let redundant = |img: &Path| {
        check_redundant(img);
    };
    let target = Target {
        fmt: Some("vmdk"),
        unit: GRAIN,
        table: GT_COVER,
        build,
        after: Some(&redundant),
    };
    model::run(&target, Via::Library);
}

/// Zeroes two whole grains that hold data and returns how many grains the
/// tables mark zeroed (with `zeroed_grain=on`, a zeroing is a marker, not
/// a deallocation).
fn zeroed_grains_after_zeroing(img: &Path) -> usize {
    let chain = open_rw(img);
    chain.write_zeroes(1 << 20, 2 * GRAIN).unwrap();
    chain.flush().unwrap();
    drop(chain);
    check_redundant(img)
}

fn sparse(d: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
    let img = create(d, name, size, opts, None);
    seed_data(&img);
    img
}

#[test]
fn random_writes_monolithic_sparse() {
    random_test(&|d: &Path| sparse(d, "a.vmdk", "80M", "subformat=monolithicSparse"));
}

#[test]
fn random_writes_monolithic_sparse_zeroed_grain() {
    let opts = "subformat=monolithicSparse,zeroed_grain=on";
    random_test(&|d: &Path| sparse(d, "z.vmdk", "80M", opts));
    let dir = scratch();
    let img = sparse(dir.path(), "z.vmdk", "80M", opts);
    assert!(
        zeroed_grains_after_zeroing(&img) > 0,
        "no grain was marked zeroed"
    );
}

#[test]
fn random_writes_two_gb_max_extent_sparse() {
    let opts = "subformat=twoGbMaxExtentSparse";
    let build = |d: &Path| sparse(d, "t.vmdk", "70M", opts);
    let extents = |img: &Path| {
        check_redundant(&img.with_file_name("t-s001.vmdk"));
    };
    let target = Target {
        fmt: Some("vmdk"),
        unit: GRAIN,
        table: GT_COVER,
        build: &build,
        after: Some(&extents),
    };
    model::run(&target, Via::Library);
}

#[test]
fn random_writes_monolithic_flat() {
    random_test(&|d: &Path| sparse(d, "f.vmdk", "40M", "subformat=monolithicFlat"));
}

#[test]
fn random_writes_two_gb_max_extent_flat() {
    random_test(&|d: &Path| sparse(d, "tf.vmdk", "40M", "subformat=twoGbMaxExtentFlat"));
}

/// A delta child over a parent with data: partial writes copy the parent's
/// grain, zeroing hides the parent (marking the grain zeroed exactly when
/// the child has `zeroed_grain=on`); the parent never changes.
fn delta_test(opts: &str) {
    let build = |d: &Path| {
        let parent = create(d, "p.vmdk", "70M", "subformat=monolithicSparse", None);
        qemu_io("vmdk", &parent, &["write -P 0x5a 0 70m"]);
        qemu_io("vmdk", &parent, &["write -P 0x66 33m 1m"]);
        std::fs::copy(&parent, d.join("p.orig")).unwrap();
        let child = create(d, "c.vmdk", "70M", opts, Some(&parent));
        qemu_io("vmdk", &child, &["write -P 0x77 100k 200k"]);
        child
    };
    let parent_alone = |child: &Path| {
        check_redundant(child);
        let now = std::fs::read(child.with_file_name("p.vmdk")).unwrap();
        let kept = std::fs::read(child.with_file_name("p.orig")).unwrap();
        assert!(now == kept, "the parent was changed");
    };
    let target = Target {
        fmt: Some("vmdk"),
        unit: GRAIN,
        table: GT_COVER,
        build: &build,
        after: Some(&parent_alone),
    };
    model::run(&target, Via::Library);
    let dir = scratch();
    let child = build(dir.path());
    let zeroed = zeroed_grains_after_zeroing(&child);
    assert_eq!(zeroed > 0, opts.contains("zeroed_grain=on"), "{zeroed}");
}

#[test]
fn random_writes_delta_child() {
    delta_test("subformat=monolithicSparse");
}

#[test]
fn random_writes_delta_child_zeroed_grain() {
    delta_test("subformat=monolithicSparse,zeroed_grain=on");
}

#[test]
fn zeroing_hides_the_parent() {
    for opts in [
        "subformat=monolithicSparse",
        "subformat=monolithicSparse,zeroed_grain=on",
    ] {
        let dir = scratch();
        let parent = create(
            dir.path(),
            "p.vmdk",
            "40M",
            "subformat=monolithicSparse",
            None,
        );
        qemu_io("vmdk", &parent, &["write -P 0x5a 0 40m"]);
        let child = create(dir.path(), "c.vmdk", "40M", opts, Some(&parent));
        let chain = open_rw(&child);
        chain.write_zeroes(0, 40 << 20).unwrap();
        chain.flush().unwrap();
        drop(chain);
        check_all(&child, &vec![0u8; 40 << 20]);
        let zeroed = check_redundant(&child);
        if opts.contains("zeroed_grain=on") {
            assert_eq!(zeroed, 640, "every grain marked zeroed");
        }
    }
}

/// A 5 GiB twoGbMaxExtentSparse disk (three extent files), written across
/// the 2 GiB and 4 GiB extent boundaries; checked range by range.
#[test]
fn two_gb_max_extent_sparse_across_extent_boundaries() {
    let dir = scratch();
    let img = create(
        dir.path(),
        "big.vmdk",
        "5G",
        "subformat=twoGbMaxExtentSparse",
        None,
    );
    const G: u64 = 1 << 30;
    let mut rng = Rng::new(8);
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    for b in [2 * G, 4 * G] {
        for (before, len) in [(777u64, 5000u64), (3 * GRAIN + 5, 7 * GRAIN), (1, 2)] {
            writes.push((b - before, rng.bytes(len as usize)));
        }
    }
    writes.push((5 * G - 1000, rng.bytes(1000)));
    writes.push((G + 12345, rng.bytes(300_000)));
    let chain = open_rw(&img);
    assert_eq!(chain.size(), 5 * G);
    for (off, data) in &writes {
        chain.write_at(data, *off).unwrap();
    }
    // Zero a range across the 2 GiB boundary (and some written data).
    chain.write_zeroes(2 * G - 1000, 2000).unwrap();
    chain.flush().unwrap();
    drop(chain);
    qemu_img(&["check", "-f", "vmdk", s(&img)]);
    let raw = dir.path().join("big.raw");
    qemu_img(&["convert", "-f", "vmdk", "-O", "raw", s(&img), s(&raw)]);
    let rawf = std::fs::File::open(&raw).unwrap();
    let chain = open_chain(&img).unwrap();
    // Expected content of each checked window, by replaying the writes.
    let windows: Vec<(u64, u64)> = writes
        .iter()
        .map(|(o, d)| (o.saturating_sub(GRAIN), d.len() as u64 + 2 * GRAIN))
        .collect();
    for (start, len) in windows {
        let len = len.min(5 * G - start);
        let mut expect = vec![0u8; len as usize];
        for (o, d) in &writes {
            let (a, b) = (*o.max(&start), (o + d.len() as u64).min(start + len));
            if a < b {
                expect[(a - start) as usize..(b - start) as usize]
                    .copy_from_slice(&d[(a - o) as usize..(b - o) as usize]);
            }
        }
        let (za, zb) = ((2 * G - 1000).max(start), (2 * G + 1000).min(start + len));
        if za < zb {
            expect[(za - start) as usize..(zb - start) as usize].fill(0);
        }
        let mut got = vec![0u8; len as usize];
        rawf.read_exact_at(&mut got, start).unwrap();
        assert_model(&got, &expect, &format!("qemu-img convert at {start:#x}"));
        chain.read_at(&mut got, start).unwrap();
        assert_model(&got, &expect, &format!("reopened at {start:#x}"));
    }
}

/// Eight threads write into shared grains (each its own bytes) at once.
#[test]
fn concurrent_writers_share_grains() {
    for opts in [
        "subformat=monolithicSparse",
        "subformat=twoGbMaxExtentSparse",
    ] {
        let dir = scratch();
        let img = create(dir.path(), "c.vmdk", "64M", opts, None);
        let chain = Arc::new(open_rw(&img));
        let size = chain.size();
        const THREADS: u64 = 8;
        // Each grain of the first 40 and a few across the table boundary is
        // split into 8 slices; thread t writes slice t (in 3 pieces).
        let grains: Vec<u64> = (0..40).chain(500..530).collect();
        let piece = GRAIN / THREADS;
        let mut handles = Vec::new();
        for t in 0..THREADS {
            let chain = chain.clone();
            let grains = grains.clone();
            handles.push(std::thread::spawn(move || {
                for &g in &grains {
                    let base = g * GRAIN + t * piece;
                    let data = vec![(t as u8 + 1) ^ (g as u8); piece as usize];
                    let cut = [0, 1000, 5000, piece as usize];
                    for w in cut.windows(2) {
                        chain
                            .write_at(&data[w[0]..w[1]], base + w[0] as u64)
                            .unwrap();
                    }
                }
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
        let mut model = vec![0u8; size as usize];
        for &g in &grains {
            for t in 0..THREADS {
                let base = (g * GRAIN + t * piece) as usize;
                model[base..base + piece as usize].fill((t as u8 + 1) ^ (g as u8));
            }
        }
        assert_model(&read_all(&chain, 1 << 20).unwrap(), &model, "live");
        chain.flush().unwrap();
        drop(chain);
        check_all(&img, &model);
    }
}

#[test]
fn stream_optimized_is_refused_writable() {
    let dir = scratch();
    let img = create(
        dir.path(),
        "s.vmdk",
        "10M",
        "subformat=streamOptimized",
        None,
    );
    let opts = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    let Err(err) = Chain::open(&img, &opts, &caches()) else {
        panic!("streamOptimized opened writable");
    };
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("--overlay"), "{err}");
    // Read-only still works.
    open_chain(&img).unwrap();
}

/// A grain directory with no tables (as tools other than qemu-img write):
/// new tables are allocated on first write.
#[test]
fn missing_grain_tables_are_allocated() {
    random_test(&|d: &Path| {
        let img = create(d, "g.vmdk", "80M", "subformat=monolithicSparse", None);
        // Clear every directory entry (primary and redundant): no tables.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut h = [0u8; 512];
        f.read_exact_at(&mut h, 0).unwrap();
        let le64 = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap());
        let (rgd, gd) = (le64(48), le64(56));
        let entries = (80u64 << 20).div_ceil(GT_COVER) as usize;
        for sector in [rgd, gd] {
            f.write_all_at(&vec![0u8; entries * 4], sector * 512)
                .unwrap();
        }
        drop(f);
        qemu_img(&["check", "-f", "vmdk", s(&img)]);
        img
    });
}

/// A hand-written descriptor with RW, RDONLY and ZERO extents: it opens
/// writable, the RW extent takes writes, the others refuse them (zeroing
/// the ZERO extent is a no-op), and reads still work everywhere.
#[test]
fn read_only_and_zero_extents_refuse_writes() {
    let dir = scratch();
    let d = dir.path();
    std::fs::write(d.join("a-flat.vmdk"), vec![0x11u8; 1 << 20]).unwrap();
    std::fs::write(d.join("b-flat.vmdk"), vec![0x22u8; 1 << 20]).unwrap();
    let desc = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
                createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\n\
                RW 2048 FLAT \"a-flat.vmdk\" 0\nRDONLY 2048 FLAT \"b-flat.vmdk\" 0\n\
                RW 2048 ZERO\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n";
    let img = d.join("mixed.vmdk");
    std::fs::write(&img, desc).unwrap();
    let chain = open_rw(&img);
    let mb = 1u64 << 20;
    assert_eq!(chain.size(), 3 * mb);
    chain.write_at(&[0x33; 1000], 100).unwrap();
    let err = chain.write_at(&[0x44; 1000], mb + 100).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly, "{err}");
    // A write crossing from the RW into the RDONLY extent fails too.
    let err = chain.write_at(&[0x44; 1000], mb - 500).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly, "{err}");
    let err = chain.write_at(&[0x55; 10], 2 * mb + 5).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly, "{err}");
    chain.write_zeroes(2 * mb, mb).unwrap();
    chain.flush().unwrap();
    let mut model = vec![0x11u8; mb as usize];
    model.extend(vec![0x22u8; mb as usize]);
    model.extend(vec![0u8; mb as usize]);
    model[100..1100].fill(0x33);
    // The failed crossing write may have landed its RW part.
    let got = read_all(&chain, 4096).unwrap();
    let crossing = (mb - 500) as usize..mb as usize;
    model[crossing.clone()].copy_from_slice(&got[crossing]);
    assert_model(&got, &model, "mixed extents");
    assert_eq!(
        std::fs::read(d.join("b-flat.vmdk")).unwrap(),
        vec![0x22u8; 1 << 20]
    );
}

fn assert_refused_writable(img: &Path) {
    let opts = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    let Err(err) = Chain::open(img, &opts, &caches()) else {
        panic!("{} opened writable", img.display());
    };
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("--overlay"), "{err}");
    open_chain(img).unwrap();
}

/// ESXi COWD (vmfsSparse) and seSparse extents are refused for writing.
#[test]
fn cowd_and_sesparse_are_refused_writable() {
    let dir = scratch();
    let d = dir.path();
    let cowd = common::cowd_extent(&[(0, 0xaa)]);
    let bare = d.join("d-delta.vmdk");
    std::fs::write(&bare, &cowd).unwrap();
    assert_refused_writable(&bare);
    let desc = d.join("d.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\nversion=1\nCID=00000042\nparentCID=ffffffff\n\
         createType=\"vmfsSparse\"\n\nRW 2048 VMFSSPARSE \"d-delta.vmdk\"\n",
    )
    .unwrap();
    assert_refused_writable(&desc);
    assert!(
        std::fs::read(&bare).unwrap() == cowd,
        "the COWD file changed"
    );
    // seSparse (a copy: the shared test data is read-only).
    let src = testdata().join("images/vmdk-dissect-sesparse");
    for name in ["disk.vmdk", "disk-sesparse.vmdk"] {
        std::fs::copy(src.join(name), d.join(name)).unwrap();
    }
    assert_refused_writable(&d.join("disk.vmdk"));
    assert_refused_writable(&d.join("disk-sesparse.vmdk"));
}

/// The CID as the descriptor text (standalone or embedded) says.
fn cid_of(img: &Path) -> String {
    let f = std::fs::read(img).unwrap();
    let text = String::from_utf8_lossy(&f[..f.len().min(1 << 20)]).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("CID="))
        .unwrap_or_else(|| panic!("{}: no CID line", img.display()));
    line[4..].trim().to_string()
}

/// The first write gives the image a new CID (as qemu does); later writes
/// keep it; the descriptor stays valid for qemu.
#[test]
fn first_write_changes_the_cid() {
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "monolithicSparse",
        "monolithicFlat",
    ] {
        let dir = scratch();
        let img = create(
            dir.path(),
            "c.vmdk",
            "8M",
            &format!("subformat={sub}"),
            None,
        );
        let before = cid_of(&img);
        let size_before = std::fs::metadata(&img).unwrap().len();
        let chain = open_rw(&img);
        chain.write_at(b"hello", 4096).unwrap();
        let after = cid_of(&img);
        assert_ne!(before, after, "{sub}: CID unchanged");
        assert_eq!(after.len(), before.len(), "{sub}: CID width");
        assert_eq!(
            chain.layers()[0].cid(),
            Some(u32::from_str_radix(&after, 16).unwrap())
        );
        chain.write_at(b"again", 8192).unwrap();
        chain.flush().unwrap();
        drop(chain);
        assert_eq!(cid_of(&img), after, "{sub}: CID changed twice");
        if sub != "monolithicSparse" {
            assert_eq!(std::fs::metadata(&img).unwrap().len(), size_before);
        }
        let mut model = vec![0u8; 8 << 20];
        model[4096..4101].copy_from_slice(b"hello");
        model[8192..8197].copy_from_slice(b"again");
        check_all(&img, &model);
    }
}

/// An ESXi `vmfs` (VMFS flat extent) image: written in place like a
/// flat extent; a hand-written vmfsThin one too (checked without qemu,
/// which does not open vmfsThin).
#[test]
fn random_writes_vmfs_flat() {
    random_test(&|d: &Path| {
        let src = testdata().join("images/vmdk-vmdkrs-vmfs");
        for name in ["vmfs_thick.vmdk", "vmfs_thick-flat.vmdk"] {
            std::fs::copy(src.join(name), d.join(name)).unwrap();
            let mut perm = std::fs::metadata(d.join(name)).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(d.join(name), perm).unwrap();
        }
        d.join("vmfs_thick.vmdk")
    });
    // qemu does not open vmfsThin: the library's reading is the model's
    // start, and the flat file itself must end as the disk.
    let thin = |d: &Path| {
        std::fs::write(d.join("thin-flat.vmdk"), vec![0u8; 3 << 20]).unwrap();
        std::fs::write(
            d.join("thin.vmdk"),
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
             createType=\"vmfsThin\"\n\nRW 6144 VMFS \"thin-flat.vmdk\"\n",
        )
        .unwrap();
        d.join("thin.vmdk")
    };
    let flat_is_the_disk = |img: &Path| {
        let flat = std::fs::read(img.with_file_name("thin-flat.vmdk")).unwrap();
        let chain = open_chain(img).unwrap();
        assert_model(
            &flat,
            &read_all(&chain, 70_000).unwrap(),
            "vmfsThin flat file",
        );
    };
    let target = Target {
        fmt: None,
        unit: GRAIN,
        table: GT_COVER,
        build: &thin,
        after: Some(&flat_is_the_disk),
    };
    model::run(&target, Via::Library);
}
