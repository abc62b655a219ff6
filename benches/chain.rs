//! The mapping and read path through `vdiskfs::chain::Chain`, on images built
//! with qemu-img at setup (64 MiB, 64 KiB clusters, every cluster written):
//!
//! - `qcow2`, `qcow` (version 1): plain images;
//! - `qcow2-comp`: `qemu-img convert -c` (every cluster compressed);
//! - `chain3`: a 3-deep qcow2 chain whose two overlays each hold every
//!   fourth 2 MiB stripe.
//!
//! For each: `status` of a 64 KiB range and `read_at` of 4 KiB at
//! pseudo-random offsets with warm caches (`hit`: tables and decoded blocks
//! cached), and with caches of size 0 (`miss`: every lookup reads its table,
//! every compressed read decodes its cluster); and `read_at` of 1 MiB
//! sequentially (the largest FUSE request). The host page cache is warm in
//! every case: this measures vdiskfs's own CPU cost, not the disk.

mod common;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vdiskfs::cache::Caches;
use vdiskfs::chain::{Chain, ChainOptions};

const SIZE: u64 = 64 << 20;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} ({e}): install qemu-utils"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img(dir: &Path, args: &[&str]) {
    run(Command::new("qemu-img").current_dir(dir).args(args));
}

/// Builds the images in `dir`; returns (name, top image) pairs.
fn build(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    // Same data shape as benches/run.sh: half pseudo-random, half pattern.
    let mut data = Vec::with_capacity(SIZE as usize);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while data.len() < SIZE as usize {
        for _ in 0..256 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.extend(b"vdiskfs-bench-".iter().copied().cycle().take(2048));
    }
    std::fs::write(dir.join("data.raw"), &data).unwrap();
    let c = "cluster_size=65536";
    for line in [
        "convert -f raw -O qcow2 -o cluster_size=65536 data.raw disk.qcow2",
        "convert -f raw -O qcow data.raw disk.qcow",
        "convert -c -f raw -O qcow2 -o cluster_size=65536 data.raw comp.qcow2",
        "convert -f raw -O qcow2 -o cluster_size=65536 data.raw base.qcow2",
    ] {
        let args: Vec<&str> = line.split_whitespace().collect();
        qemu_img(dir, &args);
    }
    for (img, backing, first) in [
        ("mid.qcow2", "base.qcow2", 2),
        ("top.qcow2", "mid.qcow2", 4),
    ] {
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "-o", c, "-b", backing, "-F", "qcow2", img,
            ],
        );
        let cmds: String = (0..SIZE >> 23)
            .map(|i| format!("write -P {} {}M 2M\n", i % 250 + 1, i * 8 + first))
            .collect();
        let mut child = Command::new("qemu-io")
            .current_dir(dir)
            .args(["-f", "qcow2", img])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("cannot run qemu-io: install qemu-utils");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(cmds.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "qemu-io on {img} failed");
    }
    vec![
        ("qcow2", dir.join("disk.qcow2")),
        ("qcow", dir.join("disk.qcow")),
        ("qcow2-comp", dir.join("comp.qcow2")),
        ("chain3", dir.join("top.qcow2")),
    ]
}

/// Pseudo-random 4 KiB-aligned offsets (fixed sequence).
fn offsets(n: usize, align: u64, len: u64) -> Vec<u64> {
    let mut x: u64 = 88172645463325252;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % ((SIZE - len) / align)) * align
        })
        .collect()
}

fn chain_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let images = build(dir.path());
    let offs = offsets(4096, 4096, 4096);
    let mut buf4k = vec![0u8; 4096];
    let mut buf1m = vec![0u8; 1 << 20];
    for (name, path) in &images {
        let mut g = c.benchmark_group(format!("chain/{name}"));
        for (mode, cache) in [("hit", 256usize << 20), ("miss", 0)] {
            let caches = Caches::new(cache);
            let chain = Arc::new(Chain::open(path, &ChainOptions::default(), &caches).unwrap());
            // Warm the host page cache, and with `hit` every table and block.
            let mut pos = 0;
            while pos < SIZE {
                chain.read_at(&mut buf1m, pos).unwrap();
                pos += 1 << 20;
            }
            g.throughput(Throughput::Elements(1));
            let mut i = 0;
            g.bench_function(BenchmarkId::new("status_64k", mode), |b| {
                b.iter(|| {
                    i = (i + 1) % offs.len();
                    black_box(chain.status(offs[i], 64 << 10).unwrap())
                })
            });
            g.throughput(Throughput::Bytes(4096));
            g.bench_function(BenchmarkId::new("read_4k", mode), |b| {
                b.iter(|| {
                    i = (i + 1) % offs.len();
                    chain.read_at(&mut buf4k, offs[i]).unwrap();
                })
            });
            g.throughput(Throughput::Bytes(1 << 20));
            let mut pos = 0u64;
            g.bench_function(BenchmarkId::new("read_1m_seq", mode), |b| {
                b.iter(|| {
                    chain.read_at(&mut buf1m, pos).unwrap();
                    pos = (pos + (1 << 20)) % SIZE;
                })
            });
        }
        g.finish();
    }
    // Baseline for read_1m_seq: the same read straight from the raw file.
    let raw = std::fs::File::open(dir.path().join("data.raw")).unwrap();
    let mut g = c.benchmark_group("chain/raw-file");
    g.throughput(Throughput::Bytes(1 << 20));
    let mut pos = 0u64;
    g.bench_function("pread_1m_seq", |b| {
        b.iter(|| {
            use std::os::unix::fs::FileExt;
            raw.read_exact_at(&mut buf1m, pos).unwrap();
            pos = (pos + (1 << 20)) % SIZE;
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::profile(Duration::from_secs(2), 20);
    targets = chain_benches
}
criterion_main!(benches);
