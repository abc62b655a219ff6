//! Block cache (`vdiskfs::cache::ByteLru`) under contention: hits, inserts
//! that evict, and a 90/10 mix, from 1, 2 and 4 threads at once.
//!
//! Each sample starts its threads once and times them between two barriers,
//! so thread start-up is not measured; the reported time is per operation
//! of one thread (lower is better; it rises with contention).

mod common;

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vdiskfs::cache::ByteLru;

const BLOCK: usize = 64 << 10;
const KEYS: u64 = 1024;

/// Runs `op(thread, i)` `iters` times in each of `threads` threads and
/// returns the slowest thread's time.
fn contended(threads: usize, iters: u64, op: impl Fn(usize, u64) + Sync) -> Duration {
    let start = Barrier::new(threads);
    let op = &op;
    let start = &start;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    start.wait();
                    let t0 = Instant::now();
                    for i in 0..iters {
                        op(t, i);
                    }
                    t0.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}

/// A cheap, well-spread key sequence per thread (no RNG in the timed loop).
fn key(t: usize, i: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (t as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)) % KEYS
}

fn cache_benches(c: &mut Criterion) {
    let value: Arc<[u8]> = vec![0xa5u8; BLOCK].into();
    let mut g = c.benchmark_group("cache");
    g.throughput(Throughput::Elements(1));
    for threads in [1usize, 2, 4] {
        // Every key present: pure hits (lock, LRU touch, Arc clone, counters).
        let full = ByteLru::new(2 * KEYS as usize * BLOCK);
        for k in 0..KEYS {
            full.insert((1, k), value.clone());
        }
        g.bench_with_input(BenchmarkId::new("get_hit", threads), &threads, |b, &n| {
            b.iter_custom(|iters| {
                contended(n, iters, |t, i| {
                    black_box(full.get((1, key(t, i))));
                })
            })
        });

        // A cache holding 1/8 of the keys: every insert evicts.
        let small = ByteLru::new(KEYS as usize / 8 * BLOCK);
        g.bench_with_input(
            BenchmarkId::new("insert_evict", threads),
            &threads,
            |b, &n| {
                b.iter_custom(|iters| {
                    contended(n, iters, |t, i| {
                        small.insert((1, key(t, i)), value.clone());
                    })
                })
            },
        );

        // Nine gets for one insert, half the keys cached.
        let half = ByteLru::new(KEYS as usize / 2 * BLOCK);
        for k in 0..KEYS / 2 {
            half.insert((1, k), value.clone());
        }
        g.bench_with_input(
            BenchmarkId::new("mixed_90get_10insert", threads),
            &threads,
            |b, &n| {
                b.iter_custom(|iters| {
                    contended(n, iters, |t, i| {
                        let k = (1, key(t, i));
                        if i % 10 == 9 {
                            half.insert(k, value.clone());
                        } else {
                            black_box(half.get(k));
                        }
                    })
                })
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::profile(Duration::from_secs(2), 20);
    targets = cache_benches
}
criterion_main!(benches);
