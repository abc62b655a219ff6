//! qcow2 write tests through the library: pseudo-random writes and
//! zeroings applied both to an image and to an in-memory model, then
//! `qemu-img check`, `qemu-img convert` and a fresh vdiskfs open must agree.

use crate::common;
use common::model::{self, Target, Via};
use common::qemu_img_line;
use common::rng::Rng;
use common::try_open_rw;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{qemu_img, qemu_io, qemu_raw, read_all, s, scratch};
use vdiskfs::chain::Chain;
use vdiskfs::ErrorKind;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

fn create(dir: &Path, name: &str, opts: &str, size: &str, cmds: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, ps, size]);
    if !cmds.is_empty() {
        qemu_io("qcow2", &p, cmds);
    }
    p
}

/// `qemu-img check --output=json`: fails on any corruption, check error or leak.
fn check(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(image)
        .output()
        .expect("run qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "qemu-img check {}: {e}: {text} {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    for key in ["corruptions", "check-errors", "leaks"] {
        let n = v.get(key).and_then(|n| n.as_u64()).unwrap_or(0);
        assert_eq!(n, 0, "qemu-img check {}: {key} in {text}", image.display());
    }
}

/// Applies a reproducible mix of writes and zeroings to the image and model.
fn scribble(chain: &Chain, model: &mut [u8], seed: u64, ops: usize, cs: u64) {
    let size = model.len() as u64;
    let mut rng = Rng::new(seed);
    for i in 0..ops {
        let kind = rng.below(10);
        let len = match rng.below(4) {
            0 => 1 + rng.below(600),
            1 => 1 + rng.below(3 * cs),
            2 => cs * (1 + rng.below(4)),
            _ => 1 + rng.below(256 * K),
        }
        .min(size);
        let mut off = rng.below(size - len + 1);
        if rng.below(3) == 0 {
            off -= off % cs;
        }
        let len = len.min(size - off);
        let (a, b) = (off as usize, (off + len) as usize);
        if kind < 7 {
            let fill = (i as u8).wrapping_mul(37).wrapping_add(1);
            let data: Vec<u8> = (0..len).map(|j| fill ^ (j as u8)).collect();
            chain
                .write_at(&data, off)
                .unwrap_or_else(|e| panic!("op {i}: write {off:#x}+{len:#x}: {e}"));
            model[a..b].copy_from_slice(&data);
        } else {
            chain
                .write_zeroes(off, len)
                .unwrap_or_else(|e| panic!("op {i}: zeroes {off:#x}+{len:#x}: {e}"));
            model[a..b].fill(0);
        }
        // Reads see our writes at once.
        if i % 8 == 0 {
            let mut back = vec![0u8; len as usize];
            chain.read_at(&mut back, off).unwrap();
            assert!(back == model[a..b], "op {i}: read back differs");
        }
    }
}

/// The model harness (random writes, zeroings, flushes, reads and
/// reopenings against an in-memory model, shrunk on failure) on images
/// `build` makes, with clusters of `cs` bytes; a third of the usual cases,
/// as the callers run it on many images.
fn random_ops(build: &dyn Fn(&Path) -> PathBuf, cs: u64, after: Option<&dyn Fn(&Path)>) {
    let target = Target {
        fmt: Some("qcow2"),
        unit: cs,
        // One L2 table maps cs / 8 clusters (16 with extended L2: coarse).
        table: cs * cs / 8,
        build,
        after,
    };
    model::run_cases(&target, Via::Library, model::cases().div_ceil(3));
}

/// `qemu-img check` (no leaks either), qemu-img convert and a fresh open
/// against the model.
fn verify(image: &Path, model: &[u8]) {
    check(image);
    model::check_closed(image, Some("qcow2"), model).unwrap();
}

/// Prepares data, compressed and zero clusters at spots the writes revisit.
fn setup_cmds(cs: u64) -> Vec<String> {
    let c = cs.max(64 * K);
    vec![
        format!("write -P 0x5a 0 {}", 3 * c),
        format!("write -c -P 0x6b {} {}", 4 * c, 4 * c),
        format!("write -z {} {}", 9 * c, 2 * c),
        format!("write -P 0x7c {} {}", 3 * M + 123, 700 * K),
        format!("write -c -P 0x1d {} {}", 6 * M, 2 * c),
    ]
}

fn run_matrix_row(n: usize, opts: &str, cs: u64, backing: bool, snapshot: bool) {
    let size = if cs == 2 * M { 48 * M } else { 8 * M };
    let build = |dir: &Path| {
        let cmds = setup_cmds(cs);
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        let img = if backing {
            let base = dir.join(format!("base{n}.qcow2"));
            let bs = base.to_str().unwrap();
            qemu_img(&["create", "-q", "-f", "qcow2", bs, &size.to_string()]);
            qemu_io(
                "qcow2",
                &base,
                &["write -P 0x33 0 5M", "write -P 0x44 6M 2M"],
            );
            let p = dir.join(format!("top{n}.qcow2"));
            let o = format!("{opts},backing_file={bs},backing_fmt=qcow2");
            qemu_img_line(&format!(
                "create -q -f qcow2 -o {} {} {}",
                &o,
                p.to_str().unwrap(),
                &size.to_string()
            ));
            qemu_io("qcow2", &p, &cmds[..3]);
            p
        } else {
            create(
                dir,
                &format!("img{n}.qcow2"),
                opts,
                &size.to_string(),
                &cmds,
            )
        };
        if snapshot {
            qemu_img(&["snapshot", "-c", "snap1", img.to_str().unwrap()]);
            std::fs::write(dir.join("snap1.raw"), qemu_raw(&img, None)).unwrap();
        }
        img
    };
    // The snapshot still reads as it did: writes copied shared clusters.
    let snapshot_kept = |img: &Path| {
        let out = img.with_file_name("snap1-now.raw");
        let (i, o) = (img.to_str().unwrap(), out.to_str().unwrap());
        qemu_img(&["convert", "-l", "snapshot.name=snap1", "-O", "raw", i, o]);
        let before = std::fs::read(img.with_file_name("snap1.raw")).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == before,
            "{opts}: snapshot changed"
        );
    };
    let after: Option<&dyn Fn(&Path)> = if snapshot { Some(&snapshot_kept) } else { None };
    random_ops(&build, cs, after);
}

#[test]
fn matrix_of_formats_and_features() {
    let rows: &[(&str, u64, bool, bool)] = &[
        ("compat=0.10,cluster_size=512", 512, false, false),
        ("compat=0.10,cluster_size=64k", 64 * K, true, false),
        ("compat=0.10,cluster_size=4k", 4 * K, false, true),
        (
            "compat=1.1,cluster_size=512,refcount_bits=1",
            512,
            false,
            false,
        ),
        (
            "compat=1.1,cluster_size=4k,refcount_bits=16",
            4 * K,
            true,
            false,
        ),
        (
            "compat=1.1,cluster_size=64k,refcount_bits=64",
            64 * K,
            false,
            true,
        ),
        (
            "compat=1.1,cluster_size=2M,refcount_bits=16",
            2 * M,
            true,
            false,
        ),
        (
            "compat=1.1,cluster_size=4k,refcount_bits=1",
            4 * K,
            true,
            false,
        ),
        (
            "compat=1.1,cluster_size=64k,extended_l2=on",
            64 * K,
            false,
            false,
        ),
        (
            "compat=1.1,cluster_size=64k,extended_l2=on",
            64 * K,
            true,
            true,
        ),
        (
            "compat=1.1,cluster_size=2M,extended_l2=on,refcount_bits=64",
            2 * M,
            true,
            false,
        ),
        (
            "compat=1.1,cluster_size=512,refcount_bits=64",
            512,
            true,
            true,
        ),
        (
            "compat=1.1,cluster_size=64k,lazy_refcounts=on,compression_type=zstd",
            64 * K,
            false,
            false,
        ),
    ];
    for (n, &(opts, cs, backing, snap)) in rows.iter().enumerate() {
        run_matrix_row(n, opts, cs, backing, snap);
    }
}

#[test]
fn refcount_table_grows() {
    let dir = scratch();
    // 64-bit refcounts in 512 B clusters: one table cluster covers 2 MiB.
    let img = create(
        dir.path(),
        "grow.qcow2",
        "cluster_size=512,refcount_bits=64",
        "6M",
        &[],
    );
    let hdr = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        u64::from_be_bytes(b[48..56].try_into().unwrap())
    };
    let old_table = hdr(&img);
    let mut model = qemu_raw(&img, None);
    let chain = try_open_rw(&img).unwrap();
    let mut rng = Rng::new(7);
    let mut pos = 0u64;
    while pos < 6 * M {
        let n = (64 * K + rng.below(64 * K)).min(6 * M - pos);
        let data: Vec<u8> = (0..n).map(|i| (i * 31 + pos) as u8).collect();
        chain.write_at(&data, pos).unwrap();
        model[pos as usize..(pos + n) as usize].copy_from_slice(&data);
        pos += n;
    }
    chain.flush().unwrap();
    let info = chain.layers()[0].info();
    assert_eq!(
        info.details["refcount_table_offset"].as_u64(),
        Some(hdr(&img))
    );
    drop(chain);
    assert_ne!(hdr(&img), old_table, "the refcount table should have moved");
    verify(&img, &model);
}

/// Regression: a variable holding the file's end shadowed the write's
/// in-cluster end, so a partial in-place write into an extended-L2 cluster
/// completed the wrong range of subclusters from the backing file (fixed
/// in 8935ca1). Writes into unallocated and allocated subclusters of one
/// allocated cluster over a patterned backing file.
#[test]
fn extended_l2_partial_write_in_place_fills_only_its_own_subclusters() {
    let dir = scratch();
    let d = dir.path();
    let base = create(
        d,
        "xb.qcow2",
        "cluster_size=64k",
        "4M",
        &["write -P 0x33 0 4M"],
    );
    let o = format!(
        "compat=1.1,cluster_size=64k,extended_l2=on,backing_file={},backing_fmt=qcow2",
        s(&base)
    );
    let img = create(d, "xl2.qcow2", &o, "4M", &["write -P 0x5a 1M 4k"]);
    let mut model = qemu_raw(&img, None);
    let chain = try_open_rw(&img).unwrap();
    for (off, len) in [
        (M + 5000, 3),
        (M + 65536 - 700, 700),
        (M + 10, 1),
        (M + 9000, 9000),
    ] {
        let data = vec![0xc3u8; len];
        chain.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    chain.flush().unwrap();
    drop(chain);
    verify(&img, &model);
}

/// Found by the model harness (the extended-L2 row of
/// `matrix_of_formats_and_features`, shrunk): on an extended-L2 overlay
/// with a snapshot, zeroing the disk's last 2049 bytes leaves the file
/// ending inside its last cluster (the zeroed subcluster is never written);
/// after a reopen, writing the disk's last byte grew the file in place but
/// not the driver's bound on data offsets, so reading it back failed with
/// "data cluster at 0xc0000 lies past the end of the file".
#[test]
fn extended_l2_tail_zeroed_then_last_byte_written_after_reopen_reads_back() {
    let dir = scratch();
    let d = dir.path();
    let base = create(
        d,
        "b9.qcow2",
        "cluster_size=64k",
        "8M",
        &["write -P 0x33 0 5M", "write -P 0x44 6M 2M"],
    );
    let o = format!(
        "compat=1.1,cluster_size=64k,extended_l2=on,backing_file={},backing_fmt=qcow2",
        s(&base)
    );
    let cmds = setup_cmds(64 * K);
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let img = create(d, "top9.qcow2", &o, "8M", &cmds[..3]);
    qemu_img(&["snapshot", "-c", "snap1", s(&img)]);
    let mut model = qemu_raw(&img, None);
    let size = model.len() as u64;
    let chain = try_open_rw(&img).unwrap();
    chain.write_zeroes(size - 2049, 2049).unwrap();
    chain.flush().unwrap();
    drop(chain);
    model[(size - 2049) as usize..].fill(0);
    let chain = try_open_rw(&img).unwrap();
    chain.write_at(&[0x5c], size - 1).unwrap();
    chain.flush().unwrap();
    model[(size - 1) as usize] = 0x5c;
    let got = read_all(&chain, 1 << 20).unwrap_or_else(|e| panic!("read back: {e}"));
    common::assert_model(&got, &model, "after the last-byte write");
    drop(chain);
    verify(&img, &model);
}

#[test]
fn concurrent_writers() {
    let dir = scratch();
    for (n, opts) in ["cluster_size=4k", "cluster_size=64k,extended_l2=on"]
        .iter()
        .enumerate()
    {
        let base = dir.path().join(format!("cbase{n}.raw"));
        std::fs::write(
            &base,
            (0..8 * M).map(|i| (i / 511) as u8).collect::<Vec<u8>>(),
        )
        .unwrap();
        let img = dir.path().join(format!("conc{n}.qcow2"));
        let o = format!("{opts},backing_file={},backing_fmt=raw", base.display());
        qemu_img_line(&format!(
            "create -q -f qcow2 -o {} {} 8M",
            &o,
            img.to_str().unwrap()
        ));
        let mut model = qemu_raw(&img, None);
        let chain = Arc::new(try_open_rw(&img).unwrap());
        // Thread t owns stripes t, t+8, ... of 1000 bytes: every cluster
        // is hit by several threads at once, and the result is defined.
        // All threads also write one identical range, overlapping fully.
        const S: u64 = 1000;
        let shared: Vec<u8> = (0..300 * K).map(|i| (i * 7) as u8).collect();
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let chain = chain.clone();
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let mut k = t;
                    while (k + 1) * S <= 4 * M {
                        chain.write_at(&[t as u8 + 1; S as usize], k * S).unwrap();
                        k += 8;
                    }
                    chain.write_at(&shared, 5 * M + 17).unwrap();
                    // Whole clusters allocated in batches: a 128 KiB stripe
                    // each, then one 1 MiB range everyone overwrites.
                    let stripe = [0x80 | t as u8; 128 * K as usize];
                    chain.write_at(&stripe, 4 * M + t * 128 * K).unwrap();
                    for _ in 0..3 {
                        chain
                            .write_at(&[0x40 | t as u8; M as usize], 6 * M)
                            .unwrap();
                    }
                    if t % 2 == 0 {
                        chain.write_zeroes(7 * M, 512 * K).unwrap();
                    }
                    let mut buf = vec![0u8; 64 * K as usize];
                    chain.read_at(&mut buf, 2 * M).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for k in 0..4 * M / S {
            let a = (k * S) as usize;
            model[a..a + S as usize].fill((k % 8) as u8 + 1);
        }
        model[(5 * M + 17) as usize..(5 * M + 17) as usize + shared.len()].copy_from_slice(&shared);
        for t in 0..8 {
            let a = (4 * M + t * 128 * K) as usize;
            model[a..a + 128 * K as usize].fill(0x80 | t as u8);
        }
        // 6..7 MiB: every cluster holds one writer's bytes, never a mix.
        let mut hot = vec![0u8; M as usize];
        chain.read_at(&mut hot, 6 * M).unwrap();
        let cs = if n == 0 { 4 * K } else { 64 * K } as usize;
        for (i, c) in hot.chunks(cs).enumerate() {
            assert!(
                c.iter().all(|&b| b == c[0]) && c[0] & 0xf8 == 0x40,
                "cluster {i} of the contended range is torn: {:#x}..",
                c[0]
            );
        }
        model[(6 * M) as usize..(7 * M) as usize].copy_from_slice(&hot);
        model[(7 * M) as usize..(7 * M + 512 * K) as usize].fill(0);
        chain.flush().unwrap();
        drop(chain);
        verify(&img, &model);
    }
}

#[test]
fn zeroing_whole_clusters_returns_host_space() {
    let dir = scratch();
    for (n, opts) in [
        "compat=1.1,cluster_size=64k",
        "compat=0.10,cluster_size=64k",
        "compat=1.1,extended_l2=on",
    ]
    .iter()
    .enumerate()
    {
        let img = create(
            dir.path(),
            &format!("z{n}.qcow2"),
            opts,
            "16M",
            &["write -P 0x42 0 16M"],
        );
        let used = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).unwrap().blocks() * 512
        };
        let before = used(&img);
        let chain = try_open_rw(&img).unwrap();
        chain.write_zeroes(K, 15 * M).unwrap();
        chain.flush().unwrap();
        drop(chain);
        let after = used(&img);
        assert!(
            after + 12 * M < before,
            "{opts}: {before} -> {after} bytes allocated"
        );
        let mut model = vec![0x42u8; 16 * M as usize];
        model[K as usize..(K + 15 * M) as usize].fill(0);
        verify(&img, &model);
    }
}

#[test]
fn zeroing_hides_backing_data() {
    let dir = scratch();
    for (n, opts) in ["compat=0.10", "compat=1.1", "compat=1.1,extended_l2=on"]
        .iter()
        .enumerate()
    {
        let base = dir.path().join(format!("zb{n}.raw"));
        std::fs::write(&base, vec![0x99u8; 4 * M as usize]).unwrap();
        let img = dir.path().join(format!("zt{n}.qcow2"));
        let o = format!("{opts},backing_file={},backing_fmt=raw", base.display());
        qemu_img_line(&format!(
            "create -q -f qcow2 -o {} {} 4M",
            &o,
            img.to_str().unwrap()
        ));
        let chain = try_open_rw(&img).unwrap();
        chain.write_zeroes(100, 3 * M).unwrap();
        chain.flush().unwrap();
        drop(chain);
        let mut model = vec![0x99u8; 4 * M as usize];
        model[100..(100 + 3 * M) as usize].fill(0);
        verify(&img, &model);
    }
}

#[test]
fn external_data_files() {
    for raw in ["off", "on"] {
        let build = |d: &Path| {
            let img = d.join("df.qcow2");
            let data = d.join("df.data");
            let o = format!("data_file={},data_file_raw={raw}", data.display());
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, s(&img), "8M"]);
            qemu_io(
                "qcow2",
                &img,
                &["write -P 0x21 1M 1M", "write -z 1536k 64k"],
            );
            img
        };
        // With data_file_raw the data file is the disk (check_closed has
        // compared qemu's reading with the model).
        let data_is_the_disk = |img: &Path| {
            let disk = qemu_raw(img, None);
            let mut f = std::fs::read(img.with_file_name("df.data")).unwrap();
            f.resize(disk.len(), 0);
            assert!(f == disk, "data_file_raw: the data file is not the disk");
        };
        let after: Option<&dyn Fn(&Path)> = if raw == "on" {
            Some(&data_is_the_disk)
        } else {
            None
        };
        random_ops(&build, 64 * K, after);
    }
}

#[test]
fn created_images_are_valid() {
    use vdiskfs::format::qcow2::create::{create, CreateOptions};
    use vdiskfs::format::Format;
    use vdiskfs::host::{HostFile, HostOpen};
    let dir = scratch();
    let base = dir.path().join("cbase.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "5M"]);
    qemu_io("qcow2", &base, &["write -P 0x17 0 5M"]);
    for (n, (bits, size, backing)) in [
        (16, 5 * M, true),
        (9, 3 * M + 512, false),
        (21, 100 * M, false),
        (12, 5 * M, true),
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.path().join(format!("new{n}.qcow2"));
        std::fs::File::create(&p).unwrap();
        let how = HostOpen {
            writable: true,
            ..Default::default()
        };
        let f = HostFile::open_with(&p, how).unwrap();
        let opts = CreateOptions {
            virtual_size: size,
            cluster_bits: bits,
            backing_file: backing.then(|| "cbase.qcow2".to_string()),
            backing_format: backing.then_some(Format::Qcow2),
        };
        create(&f, &opts).unwrap();
        drop(f);
        check(&p);
        let info: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", p.to_str().unwrap()]))
                .unwrap();
        assert_eq!(info["virtual-size"].as_u64(), Some(size));
        assert_eq!(info["cluster-size"].as_u64(), Some(1 << bits));
        if backing {
            assert_eq!(info["backing-filename"].as_str(), Some("cbase.qcow2"));
            assert_eq!(info["backing-filename-format"].as_str(), Some("qcow2"));
        }
        // Random operations on copies of it (and of its backing file).
        let copy = |d: &Path| {
            std::fs::copy(&base, d.join("cbase.qcow2")).unwrap();
            std::fs::copy(&p, d.join("new.qcow2")).unwrap();
            d.join("new.qcow2")
        };
        random_ops(&copy, 1 << bits, None);
    }
}

#[test]
fn dirty_or_corrupt_images_are_not_written() {
    use std::os::unix::fs::FileExt;
    let dir = scratch();
    for bit in [1u8, 2] {
        let img = create(
            dir.path(),
            &format!("d{bit}.qcow2"),
            "compat=1.1",
            "1M",
            &["write 0 64k"],
        );
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[bit], 79).unwrap();
        drop(f);
        let Err(e) = try_open_rw(&img) else {
            panic!("a writable open of a flagged image succeeded");
        };
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("qemu-img check -r all"), "{e}");
        if bit == 1 {
            // Reading a dirty image stays possible.
            common::open_chain(&img).unwrap();
        }
    }
}

#[test]
fn unknown_autoclear_bits_are_cleared() {
    use std::os::unix::fs::FileExt;
    let dir = scratch();
    let img = create(dir.path(), "ac.qcow2", "compat=1.1", "1M", &[]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    f.write_all_at(&(1u64 << 40).to_be_bytes(), 88).unwrap();
    let chain = try_open_rw(&img).unwrap();
    chain.write_at(b"hello", 4096).unwrap();
    chain.flush().unwrap();
    drop(chain);
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 88).unwrap();
    assert_eq!(u64::from_be_bytes(b), 0);
    check(&img);
}

/// Not a test on its own: the writer process `crash_consistency` kills
/// (ignored, so it never counts as a passing test; the parent runs it
/// with `--ignored`). Writes pseudo-random data forever into
/// `VDISKFS_CRASH_IMAGE`.
#[test]
#[ignore = "child process of crash_consistency, which runs it"]
fn crash_child() {
    let image = std::env::var("VDISKFS_CRASH_IMAGE")
        .expect("crash_child is run by crash_consistency (VDISKFS_CRASH_IMAGE unset)");
    let seed: u64 = std::env::var("VDISKFS_CRASH_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let chain = try_open_rw(Path::new(&image)).unwrap();
    let mut model = vec![0u8; chain.size() as usize];
    let cs = chain.layers()[0].info().cluster_size.unwrap();
    // Signal readiness, then write until killed.
    println!("CHILD-READY");
    // Table updates stay queued in memory until a flush (engine::order):
    // flush often, so that the kill finds flushed writes on disk.
    for round in 0.. {
        scribble(&chain, &mut model, seed + round, 20, cs);
        chain.flush().unwrap();
    }
}

#[test]
fn crash_consistency() {
    let dir = scratch();
    let exe = std::env::current_exe().unwrap();
    let cases = [
        ("compat=1.1,cluster_size=512,refcount_bits=64", true),
        ("compat=1.1,cluster_size=64k,extended_l2=on", true),
        ("compat=0.10,cluster_size=4k", false),
    ];
    for (n, (opts, snapshot)) in cases.iter().enumerate() {
        for round in 0..3u64 {
            let cmds = setup_cmds(4 * K);
            let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
            let img = create(
                dir.path(),
                &format!("crash{n}-{round}.qcow2"),
                opts,
                "8M",
                &cmds,
            );
            if *snapshot {
                qemu_img(&["snapshot", "-c", "s", img.to_str().unwrap()]);
            }
            let before = qemu_raw(&img, None);
            let mut child = Command::new(&exe)
                .args([
                    "--exact",
                    "qcow2_write::crash_child",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("VDISKFS_CRASH_IMAGE", &img)
                .env("VDISKFS_CRASH_SEED", (n as u64 * 100 + round).to_string())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(150 + 120 * round));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            // Leaks are allowed after a crash; corruption is not.
            let out = Command::new("qemu-img")
                .args(["check", "--output=json"])
                .arg(&img)
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!("{opts}: {e}: {}", String::from_utf8_lossy(&out.stderr))
            });
            for key in ["corruptions", "check-errors"] {
                assert_eq!(
                    v.get(key).and_then(|n| n.as_u64()).unwrap_or(0),
                    0,
                    "{opts} round {round}: {v}"
                );
            }
            // And the image still opens and reads, with the child's writes.
            let chain = common::open_chain(&img).unwrap();
            let after = read_all(&chain, 1 << 20).unwrap();
            assert!(
                after != before,
                "{opts} round {round}: the child wrote nothing before it was killed"
            );
            let leaks = v.get("leaks").and_then(|n| n.as_u64()).unwrap_or(0);
            eprintln!("{opts} round {round}: killed after writing; {leaks} leaked clusters");
        }
    }
}
