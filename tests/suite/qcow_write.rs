//! qcow version 1 in-place writes: pseudo-random writes and zeroings
//! mirrored into an in-memory model, checked through the library, against
//! `qemu-img convert` and with `qemu-img compare`; concurrent writers into
//! shared clusters; writes through a real `--rw` FUSE mount.

use crate::common;
use common::model::{self, Target, Via};
use common::qemu_img_line;
use common::{assert_model, open_rw, s};

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::rng::Rng;
use common::{caches, open_chain, qemu_img, qemu_io, qemu_raw, read_all, scratch};
use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::format::Mapping;

fn create_qcow(dir: &Path, name: &str, size: &str, backing: Option<(&str, &str)>) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-f", "qcow"];
    if let Some((b, f)) = backing {
        args.extend(["-b", b, "-F", f]);
    }
    args.extend([s(&p), size]);
    qemu_img(&args);
    p
}

fn cluster_size(img: &Path) -> u64 {
    let head = std::fs::read(img).unwrap();
    1 << head[32]
}

/// Writes compressible data as compressed clusters, one exact cluster per
/// `qemu-io write -c`, at the given cluster-aligned guest offsets.
fn add_compressed(img: &Path, dir: &Path, offsets: &[u64], seed: u64) {
    let cs = cluster_size(img);
    let mut rng = Rng::new(seed);
    let mut cmds = Vec::new();
    for (i, off) in offsets.iter().enumerate() {
        let mut data = vec![0u8; cs as usize];
        for (j, b) in data.iter_mut().enumerate() {
            *b = ((j / 64) as u8).wrapping_add(rng.below(4) as u8) ^ (i as u8);
        }
        let src = dir.join(format!("chunk-{seed}-{i}"));
        std::fs::write(&src, &data).unwrap();
        cmds.push(format!("write -c -s {} {off} {cs}", s(&src)));
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow", img, &cmds);
}

fn count_compressed(img: &Path) -> usize {
    let chain = open_chain(img).unwrap();
    let layer = &chain.layers()[0];
    let cs = cluster_size(img);
    (0..chain.size())
        .step_by(cs as usize)
        .filter(|&o| matches!(layer.map(o, 1).unwrap().0, Mapping::Compressed(_)))
        .count()
}

/// Writes the model to a raw file and runs `qemu-img compare` against it.
fn qemu_compare(img: &Path, model: &[u8], dir: &Path) {
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    qemu_img(&["compare", "-f", "qcow", "-F", "raw", s(img), s(&raw)]);
}

/// Final checks: qemu-img convert, a fresh open, qemu-img compare.
fn check_all(img: &Path, model: &[u8], dir: &Path) {
    model::check_closed(img, Some("qcow"), model).unwrap();
    qemu_compare(img, model, dir);
}

/// The model harness (random writes, zeroings, flushes and reads against
/// an in-memory model, shrunk on failure) on images `build` makes.
fn random_ops(build: &dyn Fn(&Path) -> PathBuf) {
    random_ops_via(build, Via::Library);
}

/// [`random_ops`] through `via`.
fn random_ops_via(build: &dyn Fn(&Path) -> PathBuf, via: Via) {
    let target = Target {
        fmt: Some("qcow"),
        unit: 4096,
        table: 2 << 20,
        build,
        after: None,
    };
    model::run(&target, via);
}

#[test]
fn random_writes_without_backing() {
    random_ops(&|d: &Path| {
        let img = create_qcow(d, "plain.qcow", "6M", None);
        qemu_io(
            "qcow",
            &img,
            &["write -P 0x11 0 100k", "write -P 0x22 2040k 20k"],
        );
        add_compressed(
            &img,
            d,
            &[1 << 20, (1 << 20) + 4096, 3 << 20, (4 << 20) + 8192],
            1,
        );
        assert_eq!(count_compressed(&img), 4);
        img
    });
}

#[test]
fn random_writes_with_a_partial_last_cluster() {
    // 8 MiB + 3 sectors: the last cluster is cut short by the disk's end.
    random_ops(&|d: &Path| {
        let img = create_qcow(d, "odd.qcow", "8389120", None);
        qemu_io(
            "qcow",
            &img,
            &["write -P 0x12 8m 512", "write -P 0x13 2m 8k"],
        );
        img
    });
    random_ops(&|d: &Path| {
        let base = d.join("odd-base.raw");
        std::fs::write(&base, Rng::new(8).bytes(8389120)).unwrap();
        create_qcow(d, "odd-top.qcow", "8389120", Some(("odd-base.raw", "raw")))
    });
}

#[test]
fn random_writes_over_shorter_raw_backing() {
    random_ops(&|d: &Path| {
        let base = d.join("base.raw");
        std::fs::write(&base, Rng::new(99).bytes((2 << 20) + 1536)).unwrap();
        let img = create_qcow(d, "top.qcow", "5M", Some(("base.raw", "raw")));
        qemu_io(
            "qcow",
            &img,
            &["write -P 0x33 1m 64k", "write -P 0x44 4m 3k"],
        );
        let cs = cluster_size(&img);
        add_compressed(&img, d, &[0, 7 * cs, (2 << 20) - cs, 3 << 20], 2);
        assert_eq!(count_compressed(&img), 4);
        img
    });
}

#[test]
fn random_writes_over_shorter_qcow_backing() {
    random_ops(&|d: &Path| {
        let base = create_qcow(d, "base.qcow", "3M", None);
        qemu_io(
            "qcow",
            &base,
            &["write -P 0x55 0 1m", "write -P 0x66 2m 700k"],
        );
        add_compressed(&base, d, &[1 << 20, (1 << 20) + 4096], 3);
        let img = create_qcow(d, "top.qcow", "7M", Some(("base.qcow", "qcow")));
        qemu_io("qcow", &img, &["write -P 0x77 512k 5k"]);
        let cs = cluster_size(&img);
        add_compressed(&img, d, &[(1 << 20) + 8 * cs, 5 << 20], 4);
        assert_eq!(count_compressed(&img), 2);
        img
    });
}

#[test]
fn zeroing_hides_backing_and_frees_own_clusters() {
    let dir = scratch();
    let d = dir.path();
    // Without a backing file, whole clusters are deallocated.
    let img = create_qcow(d, "z.qcow", "4M", None);
    qemu_io("qcow", &img, &["write -P 0x11 0 1m"]);
    let chain = open_rw(&img);
    chain.write_at(&vec![0x22; 1 << 20], 2 << 20).unwrap();
    chain.flush().unwrap();
    let host_blocks = || std::fs::metadata(&img).unwrap().blocks();
    let before = host_blocks();
    chain.write_zeroes(1000, (3 << 20) - 1000 - 1234).unwrap();
    chain.flush().unwrap();
    // The clusters this writer allocated were punched; qemu's own (the
    // first MiB) are only unlinked: qcow v1 has no refcounts to prove
    // that nothing else points at them.
    let after = host_blocks();
    assert!(
        after + 1800 <= before,
        "host blocks {before} -> {after}: own clusters were not punched"
    );
    let layer = &chain.layers()[0];
    assert!(matches!(layer.map(8192, 1).unwrap().0, Mapping::Backing));
    assert!(matches!(layer.map(2 << 20, 1).unwrap().0, Mapping::Backing));
    let mut model = vec![0u8; 4 << 20];
    model[..1000].fill(0x11);
    model[(3 << 20) - 1234..3 << 20].fill(0x22);
    assert_model(&read_all(&chain, 1 << 20).unwrap(), &model, "after zeroing");
    drop(chain);
    check_all(&img, &model, d);

    // With a backing file, zeroed ranges must hide it.
    let base = d.join("b.raw");
    std::fs::write(&base, vec![0x99u8; 3 << 20]).unwrap();
    let top = create_qcow(d, "t.qcow", "4M", Some(("b.raw", "raw")));
    qemu_io("qcow", &top, &["write -P 0x12 0 64k"]);
    let chain = open_rw(&top);
    chain.write_zeroes(100, (2 << 20) + 333).unwrap();
    chain.flush().unwrap();
    let mut model = vec![0u8; 4 << 20];
    model[..100].fill(0x12);
    model[(2 << 20) + 433..3 << 20].fill(0x99);
    assert_model(
        &read_all(&chain, 1 << 20).unwrap(),
        &model,
        "zeroing over backing",
    );
    drop(chain);
    check_all(&top, &model, d);
}

/// Concurrent disjoint writers (`model::concurrent_disjoint_writes`),
/// then the final checks.
fn concurrent_writers(img: &Path, dir: &Path, seed: u64) {
    let mut model = qemu_raw(img, Some("qcow"));
    model::concurrent_disjoint_writes(img, &mut model, seed);
    check_all(img, &model, dir);
}

#[test]
fn concurrent_writers_share_clusters() {
    let dir = scratch();
    let d = dir.path();
    let img = create_qcow(d, "c.qcow", "5M", None);
    add_compressed(&img, d, &[4096, 3 << 20], 5);
    concurrent_writers(&img, d, 10);
}

#[test]
fn concurrent_writers_over_backing() {
    let dir = scratch();
    let d = dir.path();
    let base = d.join("base.raw");
    std::fs::write(&base, Rng::new(77).bytes(3 << 20)).unwrap();
    let img = create_qcow(d, "cb.qcow", "5M", Some(("base.raw", "raw")));
    concurrent_writers(&img, d, 11);
}

#[test]
fn writes_through_a_rw_mount() {
    random_ops_via(
        &|d: &Path| {
            let base = d.join("base.raw");
            std::fs::write(&base, Rng::new(5).bytes((3 << 20) + 512)).unwrap();
            let img = create_qcow(d, "disk.qcow", "6M", Some(("base.raw", "raw")));
            let cs = cluster_size(&img);
            add_compressed(&img, d, &[10 * cs, (4 << 20) + 3 * cs], 6);
            img
        },
        Via::Fuse,
    );
}

#[test]
fn partial_writes_into_compressed_clusters_keep_the_rest() {
    let dir = scratch();
    let d = dir.path();
    for backing in [false, true] {
        let img = if backing {
            let base = d.join("cbase.raw");
            std::fs::write(&base, vec![0xeeu8; 1 << 20]).unwrap();
            create_qcow(d, "cb.qcow", "2M", Some(("cbase.raw", "raw")))
        } else {
            create_qcow(d, "c.qcow", "2M", None)
        };
        let cs = cluster_size(&img);
        let offsets: Vec<u64> = (0..8).map(|i| (64 + 2 * i) * cs).collect();
        add_compressed(&img, d, &offsets, 7 + backing as u64);
        // Two adjacent compressed clusters, for a write straddling both.
        add_compressed(&img, d, &[200 * cs, 201 * cs], 9);
        assert_eq!(count_compressed(&img), 10);
        let mut model = qemu_raw(&img, Some("qcow"));
        let chain = open_rw(&img);
        let mut put = |chain: &Chain, off: u64, data: &[u8]| {
            chain.write_at(data, off).unwrap();
            model[off as usize..off as usize + data.len()].copy_from_slice(data);
        };
        put(&chain, offsets[0] + 100, &[1; 10]);
        put(&chain, offsets[1], &[2; 7]);
        put(&chain, offsets[2] + cs - 3, &[3; 3]);
        put(&chain, offsets[3] + cs - 5, &[4; 20]); // into the unallocated next cluster
        put(&chain, offsets[4] - 9, &[5; 20]); // from the unallocated previous one
        put(&chain, 201 * cs - 17, &[6; 40]); // straddles two compressed clusters
        chain.write_zeroes(offsets[5] + 64, 128).unwrap();
        model[(offsets[5] + 64) as usize..(offsets[5] + 192) as usize].fill(0);
        chain.write_zeroes(offsets[6], cs).unwrap();
        model[offsets[6] as usize..(offsets[6] + cs) as usize].fill(0);
        let layer = &chain.layers()[0];
        for o in [offsets[0], offsets[3], 200 * cs, 201 * cs, offsets[5]] {
            assert!(
                matches!(layer.map(o, 1).unwrap().0, Mapping::Data { .. }),
                "cluster at {o:#x} should now be a normal cluster"
            );
        }
        assert_model(
            &read_all(&chain, 1 << 20).unwrap(),
            &model,
            "after partial writes",
        );
        chain.flush().unwrap();
        drop(chain);
        assert_eq!(
            count_compressed(&img),
            1,
            "the untouched compressed cluster stays"
        );
        check_all(&img, &model, d);
    }
}

#[test]
fn encrypted_images_are_not_opened_writable() {
    let dir = scratch();
    let img = dir.path().join("aes.qcow");
    qemu_img_line(&format!("create -f qcow --object secret,id=sec0,data=password -o encrypt.format=aes,encrypt.key-secret=sec0 {} 1M", s(&img)));
    let opts = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    let e = Chain::open(&img, &opts, &caches()).err().expect("refused");
    assert_eq!(e.kind(), vdiskfs::ErrorKind::Encrypted, "{e}");
}
