//! Decoding one 64 KiB cluster (`vdiskfs::compress::decompress`): raw
//! deflate (qcow2, qcow), zlib (streamOptimized VMDK) and zstd (qcow2
//! `compression_type=zstd`). The cluster holds the same kind of data as
//! benches/run.sh's images: per 4 KiB, 2 KiB of pseudo-random bytes and 2 KiB
//! of a repeating pattern (it compresses to a bit over half its size).

mod common;

use std::hint::black_box;
use std::io::Write;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vdiskfs::compress::{decompress, Method};

const CLUSTER: usize = 64 << 10;

fn cluster() -> Vec<u8> {
    let filler: Vec<u8> = b"vdiskfs-bench-"
        .iter()
        .copied()
        .cycle()
        .take(2048)
        .collect();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut out = Vec::with_capacity(CLUSTER);
    while out.len() < CLUSTER {
        for _ in 0..2048 / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.extend_from_slice(&filler);
    }
    out
}

fn compress(method: Method, data: &[u8]) -> Vec<u8> {
    use flate2::Compression;
    match method {
        Method::Deflate => {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Method::Zlib => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Method::Zstd => zstd::encode_all(data, 3).unwrap(),
    }
}

fn decompress_benches(c: &mut Criterion) {
    let data = cluster();
    let mut g = c.benchmark_group("decompress_64k");
    g.throughput(Throughput::Bytes(CLUSTER as u64));
    for (name, method) in [
        ("deflate", Method::Deflate),
        ("zlib", Method::Zlib),
        ("zstd", Method::Zstd),
    ] {
        let input = compress(method, &data);
        let mut out = vec![0u8; CLUSTER];
        decompress(method, &input, &mut out, false).unwrap();
        assert_eq!(out, data, "{name} round trip");
        g.bench_with_input(BenchmarkId::from_parameter(name), &input, |b, input| {
            b.iter(|| decompress(method, black_box(input), &mut out, false).unwrap())
        });
        // qcow2 hands the decoder a sector-rounded length: trailing garbage
        // after the stream must not cost anything.
        if method == Method::Deflate {
            let mut padded = input.clone();
            padded.resize(input.len().div_ceil(512) * 512 + 512, 0xee);
            g.bench_with_input(BenchmarkId::new(name, "padded"), &padded, |b, input| {
                b.iter(|| decompress(method, black_box(input), &mut out, false).unwrap())
            });
        }
        // The allocation Chain::read_compressed makes per miss, for scale.
        if method == Method::Deflate {
            g.bench_function(BenchmarkId::new(name, "with_alloc"), |b| {
                b.iter(|| {
                    let mut d = vec![0u8; CLUSTER];
                    decompress(method, black_box(&input), &mut d, false).unwrap();
                    let d: std::sync::Arc<[u8]> = d.into();
                    d
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::profile(Duration::from_secs(2), 30);
    targets = decompress_benches
}
criterion_main!(benches);
