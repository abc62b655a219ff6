//! qcow version 1 in-place writes: pseudo-random writes and zeroings
//! mirrored into an in-memory model, checked through the library, against
//! `qemu-img convert` and with `qemu-img compare`; concurrent writers into
//! shared clusters; writes through a real `--rw` FUSE mount.

use crate::common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::rng::Rng;
use common::{caches, open_chain, qemu_img, qemu_io, qemu_raw, read_all, scratch};
use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::format::Mapping;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

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

fn open_rw(img: &Path) -> Chain {
    let opts = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    Chain::open(img, &opts, &caches()).unwrap_or_else(|e| panic!("open {}: {e}", img.display()))
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

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn assert_model(got: &[u8], model: &[u8], what: &str) {
    assert_eq!(got.len(), model.len(), "{what}: size");
    if let Some(i) = first_difference(got, model) {
        panic!("{what}: differs from the model at offset {i:#x}");
    }
}

/// Writes the model to a raw file and runs `qemu-img compare` against it.
fn qemu_compare(img: &Path, model: &[u8], dir: &Path) {
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    qemu_img(&["compare", "-f", "qcow", "-F", "raw", s(img), s(&raw)]);
}

/// Final checks: the library, qemu-img convert, a fresh open, qemu-img compare.
fn check_all(img: &Path, model: &[u8], dir: &Path) {
    assert_model(&qemu_raw(img, Some("qcow")), model, "qemu-img convert");
    let chain = open_chain(img).unwrap();
    assert_model(&read_all(&chain, 1 << 20).unwrap(), model, "reopened");
    assert_model(
        &read_all(&chain, 4096 + 512 + 3).unwrap(),
        model,
        "reopened, odd pieces",
    );
    drop(chain);
    qemu_compare(img, model, dir);
}

/// A random range: mostly small and unaligned, sometimes large, often
/// near an L2 table boundary (2 MiB for the images qemu creates).
fn random_range(rng: &mut Rng, size: u64, cs: u64) -> (u64, u64) {
    let len = match rng.below(10) {
        0..=4 => 1 + rng.below(2 * cs),
        5..=7 => 1 + rng.below(40_000),
        _ => 1 + rng.below(600_000),
    }
    .min(size);
    let off = match rng.below(5) {
        // Near the end of the disk (a last cluster cut short by it).
        4 => size - 1 - rng.below(3 * cs),
        0 => {
            // Around an L2 boundary.
            let b = (1 + rng.below(size >> 21)) << 21;
            b.saturating_sub(rng.below(3 * cs))
        }
        1 => rng.below(size / cs) * cs,
        _ => rng.below(size),
    };
    let off = off.min(size - len);
    (off, len)
}

/// Random writes and zeroings through the library, mirrored into a model.
fn random_ops(img: &Path, dir: &Path, seed: u64, ops: usize) {
    let mut model = qemu_raw(img, Some("qcow"));
    let cs = cluster_size(img);
    let mut rng = Rng::new(seed);
    {
        let chain = open_rw(img);
        assert!(chain.is_writable());
        let size = chain.size();
        assert_eq!(size as usize, model.len());
        for i in 0..ops {
            let (off, len) = random_range(&mut rng, size, cs);
            let (o, l) = (off as usize, len as usize);
            if rng.below(4) == 0 {
                chain.write_zeroes(off, len).unwrap();
                model[o..o + l].fill(0);
            } else {
                let data = rng.bytes(l);
                chain.write_at(&data, off).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
            // Read back around the range, and now and then everything.
            let lo = off.saturating_sub(cs);
            let hi = (off + len + cs).min(size);
            let mut back = vec![0u8; (hi - lo) as usize];
            chain.read_at(&mut back, lo).unwrap();
            assert_model(
                &back,
                &model[lo as usize..hi as usize],
                &format!("op {i} read-back"),
            );
            if i % 50 == 49 {
                chain.flush().unwrap();
                assert_model(&read_all(&chain, 65536 + 7).unwrap(), &model, "whole disk");
            }
        }
        chain.flush().unwrap();
        assert_model(&read_all(&chain, 1 << 20).unwrap(), &model, "before close");
    }
    check_all(img, &model, dir);
}

#[test]
fn random_writes_without_backing() {
    let dir = scratch();
    let d = dir.path();
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
    random_ops(&img, d, 1, 400);
}

#[test]
fn random_writes_with_a_partial_last_cluster() {
    let dir = scratch();
    let d = dir.path();
    let img = create_qcow(d, "odd.qcow", "8389120", None); // 8 MiB + 3 sectors
    qemu_io(
        "qcow",
        &img,
        &["write -P 0x12 8m 512", "write -P 0x13 2m 8k"],
    );
    random_ops(&img, d, 4, 300);
    let base = d.join("odd-base.raw");
    std::fs::write(&base, Rng::new(8).bytes(8389120)).unwrap();
    let top = create_qcow(d, "odd-top.qcow", "8389120", Some(("odd-base.raw", "raw")));
    random_ops(&top, d, 5, 300);
}

#[test]
fn random_writes_over_shorter_raw_backing() {
    let dir = scratch();
    let d = dir.path();
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
    random_ops(&img, d, 2, 400);
}

#[test]
fn random_writes_over_shorter_qcow_backing() {
    let dir = scratch();
    let d = dir.path();
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
    random_ops(&img, d, 3, 400);
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

/// Splits the disk into disjoint segments of random lengths and gives
/// them to 8 threads round-robin: threads share clusters (and L2 tables)
/// but never bytes, so the result is deterministic.
fn concurrent_writers(img: &Path, dir: &Path, seed: u64) {
    let mut model = qemu_raw(img, Some("qcow"));
    let size = model.len() as u64;
    let mut rng = Rng::new(seed);
    let threads = 8;
    let mut work: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); threads];
    let mut pos = rng.below(4096);
    let mut seg = 0usize;
    while pos < size {
        let len = (1 + rng.below(6000)).min(size - pos);
        // Leave some gaps so copy-on-write has something to copy.
        if rng.below(5) != 0 {
            let data = rng.bytes(len as usize);
            model[pos as usize..(pos + len) as usize].copy_from_slice(&data);
            work[seg % threads].push((pos, data));
        }
        seg += 1;
        pos += len;
    }
    for (t, w) in work.iter_mut().enumerate() {
        // Each thread goes its own way through the disk.
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
        // A reader alongside, which must never fail.
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
    let dir = scratch();
    let d = dir.path();
    let base = d.join("base.raw");
    std::fs::write(&base, Rng::new(5).bytes((3 << 20) + 512)).unwrap();
    let img = create_qcow(d, "disk.qcow", "6M", Some(("base.raw", "raw")));
    let cs = cluster_size(&img);
    add_compressed(&img, d, &[10 * cs, (4 << 20) + 3 * cs], 6);
    let mut model = qemu_raw(&img, Some("qcow"));
    let size = model.len() as u64;
    let m = common::fuse::Mounted::new(&[&img], &["--rw"]);
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.file("disk.raw"))
            .unwrap();
        let mut rng = Rng::new(6);
        for _ in 0..200 {
            let (off, len) = random_range(&mut rng, size, cs);
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
    check_all(&img, &model, d);
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
    qemu_img(&[
        "create",
        "-f",
        "qcow",
        "--object",
        "secret,id=sec0,data=password",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        s(&img),
        "1M",
    ]);
    let opts = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    let e = Chain::open(&img, &opts, &caches()).err().expect("refused");
    assert_eq!(e.kind(), vdiskfs::ErrorKind::Encrypted, "{e}");
}
