//! Cluster allocation on first write: `vdiskfs::overlay::open` with
//! `--overlay` semantics over a 64 MiB qcow2 base (64 KiB clusters, every
//! cluster written, built with qemu-img at setup), each sample starting
//! from a fresh, empty overlay that vdiskfs creates itself.
//!
//! - `cow_4k`: 4 KiB writes, each into a different unallocated cluster:
//!   allocation, copy-on-write of the other 60 KiB from the base, the L2
//!   entry (the slow path, under the allocation mutex).
//! - `whole_1m`: 1 MiB writes at 1 MiB steps: 16 whole clusters per write,
//!   allocated in one batch and filled outside the mutex.
//! - `rewrite_1m`: the same 1 MiB writes once the clusters exist (the
//!   lock-free in-place path), for scale.
//!
//! The host page cache is warm; this measures vdiskfs's own work per
//! write, not the disk. Throughput is in guest bytes written.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use vdiskfs::cache::Caches;
use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::overlay::{self, WriteMode};

const SIZE: u64 = 64 << 20;
const CLUSTER: u64 = 64 << 10;

fn build_base(dir: &Path) {
    let data: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 251) as u8 | 1).collect();
    std::fs::write(dir.join("data.raw"), &data).unwrap();
    let out = Command::new("qemu-img")
        .current_dir(dir)
        .args(["convert", "-f", "raw", "-O", "qcow2", "-o"])
        .args(["cluster_size=65536", "data.raw", "base.qcow2"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img ({e}): install qemu-utils"));
    assert!(out.status.success(), "qemu-img convert failed");
}

/// A fresh empty overlay over the base, opened for writing.
fn fresh(dir: &Path, caches: &Arc<Caches>) -> Chain {
    let ov = dir.join("ov.qcow2");
    let _ = std::fs::remove_file(&ov);
    overlay::open(
        &dir.join("base.qcow2"),
        &WriteMode::Overlay(ov),
        &ChainOptions::default(),
        caches,
        true,
    )
    .unwrap()
}

fn overlay_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    build_base(dir.path());
    let caches = Caches::new(256 << 20);
    let buf4k = vec![0x5au8; 4096];
    let buf1m = vec![0xa5u8; 1 << 20];
    let clusters = SIZE / CLUSTER;
    let mut g = c.benchmark_group("overlay_alloc");

    // 256 first writes of 4 KiB, one per cluster, per sample.
    g.throughput(Throughput::Bytes(4096 * 256));
    g.bench_function("cow_4k", |b| {
        b.iter_batched(
            || fresh(dir.path(), &caches),
            |chain| {
                for k in 0..256 {
                    let cl = (k * 97) % clusters;
                    chain.write_at(&buf4k, cl * CLUSTER + 8192).unwrap();
                }
                chain
            },
            BatchSize::PerIteration,
        )
    });

    // The whole disk in 1 MiB writes (1,024 cluster allocations) per sample.
    g.throughput(Throughput::Bytes(SIZE));
    g.bench_function("whole_1m", |b| {
        b.iter_batched(
            || fresh(dir.path(), &caches),
            |chain| {
                for pos in (0..SIZE).step_by(1 << 20) {
                    chain.write_at(&buf1m, pos).unwrap();
                }
                chain
            },
            BatchSize::PerIteration,
        )
    });

    let chain = fresh(dir.path(), &caches);
    for pos in (0..SIZE).step_by(1 << 20) {
        chain.write_at(&buf1m, pos).unwrap();
    }
    g.bench_function("rewrite_1m", |b| {
        b.iter(|| {
            for pos in (0..SIZE).step_by(1 << 20) {
                chain.write_at(&buf1m, pos).unwrap();
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::profile(Duration::from_secs(3), 10);
    targets = overlay_benches
}
criterion_main!(benches);
