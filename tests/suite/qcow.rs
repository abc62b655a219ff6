//! qcow version 1: byte-exact reads against `qemu-img convert`, backing
//! chains, the shared test images, and hostile images.

use crate::common;
use common::{open_err, patched};

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{
    assert_matches_qemu, open_chain, qemu_img, qemu_io, read_all, scratch, sha256_hex, testdata,
};
use vdiskfs::format::Mapping;
use vdiskfs::ErrorKind;

/// Deterministic pseudo-random bytes (xorshift), with runs of zeros and of
/// repeated bytes so compression has something to do.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let chunk = (512 + (s % 8192) as usize).min(len - out.len());
        match s % 4 {
            0 => out.extend(std::iter::repeat_n(0u8, chunk)),
            1 => out.extend(std::iter::repeat_n((s >> 8) as u8, chunk)),
            _ => {
                for i in 0..chunk {
                    out.push((s >> (i % 56)) as u8 ^ i as u8);
                }
            }
        }
    }
    out
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn create_qcow(dir: &Path, name: &str, size: &str, backing: Option<(&str, &str)>) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-f", "qcow"];
    if let Some((b, f)) = backing {
        args.extend(["-b", b, "-F", f]);
    }
    args.extend([path_str(&p), size]);
    qemu_img(&args);
    p
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Host offset of the L2 table covering guest offset 0.
fn first_l2_offset(image: &[u8]) -> u64 {
    let l1 = be64(image, 40) as usize;
    be64(image, l1)
}

/// An image with data, holes and L2-boundary-crossing writes (4 KiB
/// clusters, 2 MiB per L2 table).
fn written_image(dir: &Path) -> PathBuf {
    let img = create_qcow(dir, "w.qcow", "8389120", None); // 8 MiB + 3 sectors
    let writes = [
        "write -P 0x11 0 64k",
        "write -P 0x22 100k 3k",
        "write -P 0x33 2044k 8k", // crosses the first L2 table's end
        "write -P 0x44 3m 512",
        "write -P 0x55 65k 10k", // overlaps the first write's tail
        "write -P 0x66 7m 1m",
        // The partial last cluster (qemu 10's qcow driver fails writes to
        // its later sectors, so only its first sector is written).
        "write -P 0x77 8m 512",
    ];
    qemu_io("qcow", &img, &writes);
    img
}

#[test]
fn empty_image_reads_zeros() {
    let dir = scratch();
    let img = create_qcow(dir.path(), "e.qcow", "5M", None);
    assert_matches_qemu(&img);
    let chain = open_chain(&img).unwrap();
    let layer = &chain.layers()[0];
    // Unallocated L1 entries merge into one run.
    let (m, n) = layer.map(0, layer.virtual_size()).unwrap();
    assert!(matches!(m, Mapping::Backing));
    assert_eq!(n, 5 << 20);
    let info = layer.info();
    assert_eq!(info.cluster_size, Some(4096));
    assert_eq!(info.details["l2_bits"], 9);
    assert_eq!(info.details["encryption"], "none");
    assert_eq!(info.details["l1_size"], 3);
    assert!(info.details["backing_file"].is_null());
}

#[test]
fn written_image_matches_qemu() {
    let dir = scratch();
    let img = written_image(dir.path());
    assert_matches_qemu(&img);
    let chain = open_chain(&img).unwrap();
    assert_eq!(chain.size(), 8389120);
    let layer = &chain.layers()[0];
    // The first 64 KiB were allocated in one go: one host-contiguous run.
    let (m, n) = layer.map(0, 1 << 20).unwrap();
    assert!(matches!(m, Mapping::Data { .. }), "{m:?}");
    assert!(n >= 64 << 10, "run of {n} bytes");
    // A run never crosses an L2 table.
    let (_, n) = layer.map(2040 << 10, 16 << 10).unwrap();
    assert!(n <= 8 << 10);
    // The 7 MiB write is one long run too.
    let (m, n) = layer.map(7 << 20, 1 << 20).unwrap();
    assert!(matches!(m, Mapping::Data { .. }));
    assert_eq!(n, 1 << 20);
}

#[test]
fn converted_from_raw_matches_qemu() {
    let dir = scratch();
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, pattern(3 << 20, 7)).unwrap();
    let img = dir.path().join("c.qcow");
    qemu_img(&["convert", "-O", "qcow", path_str(&raw), path_str(&img)]);
    assert_matches_qemu(&img);
}

#[test]
fn compressed_clusters_match_qemu() {
    // `qemu-img convert -c -O qcow` fails silently in qemu 10, so the
    // clusters are written one by one with `qemu-io write -c`, which falls
    // back to a plain cluster when the data does not compress.
    let dir = scratch();
    let d = dir.path();
    let img = create_qcow(d, "z.qcow", "2M", None);
    let data = pattern(1 << 20, 11);
    let mut cmds = Vec::new();
    for (i, chunk) in data.chunks(4096).enumerate() {
        let src = d.join(format!("chunk{i}"));
        std::fs::write(&src, chunk).unwrap();
        cmds.push(format!(
            "write -c -s {} {} 4k",
            path_str(&src),
            i * 4096 + (512 << 10)
        ));
    }
    cmds.push("write -c -P 0x5a 1792k 4k".into());
    cmds.push("write -P 0x6b 20k 4k".into());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow", &img, &cmds);
    assert_matches_qemu(&img);
    let chain = open_chain(&img).unwrap();
    let layer = &chain.layers()[0];
    let (m, n) = layer.map((1792 << 10) + 100, 1 << 20).unwrap();
    match m {
        Mapping::Compressed(b) => {
            assert_eq!(b.guest_start, 1792 << 10);
            assert_eq!(b.len, 4096);
            assert!(b.host_len > 0 && b.host_len < 4096);
        }
        other => panic!("expected a compressed cluster, got {other:?}"),
    }
    assert_eq!(n, 4096 - 100);
    let compressed = (0..chain.size())
        .step_by(4096)
        .filter(|&o| matches!(layer.map(o, 4096).unwrap().0, Mapping::Compressed(_)))
        .count();
    assert!(compressed > 50, "only {compressed} compressed clusters");
    // Reading compressed clusters in small pieces gives the same bytes.
    let whole = read_all(&chain, 1 << 20).unwrap();
    let pieces = read_all(&chain, 700).unwrap();
    assert_eq!(sha256_hex(&whole), sha256_hex(&pieces));
}

#[test]
fn over_shorter_raw_base() {
    let dir = scratch();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern((1 << 20) + 512, 3)).unwrap();
    let top = create_qcow(dir.path(), "top.qcow", "3M", Some(("base.raw", "raw")));
    qemu_io(
        "qcow",
        &top,
        &[
            "write -P 0xa1 4k 8k",
            "write -P 0xa2 1020k 8k",
            "write -P 0xa3 2m 3k",
        ],
    );
    assert_matches_qemu(&top);
    let chain = open_chain(&top).unwrap();
    assert_eq!(chain.layers().len(), 2);
    let info = chain.layers()[0].info();
    assert_eq!(info.details["backing_file"], "base.raw");
    assert_eq!(info.cluster_size, Some(512));
    let all = read_all(&chain, 1 << 20).unwrap();
    assert!(all[(1 << 20) + 512 + 8192..2 << 20].iter().all(|&b| b == 0));
}

#[test]
fn over_qcow_base() {
    let dir = scratch();
    let base = create_qcow(dir.path(), "base.qcow", "4M", None);
    qemu_io(
        "qcow",
        &base,
        &[
            "write -P 0x01 0 1m",
            "write -P 0x02 3m 100k",
            "write -c -P 0x03 2m 4k",
        ],
    );
    let top = create_qcow(dir.path(), "top.qcow", "4M", Some(("base.qcow", "qcow")));
    qemu_io(
        "qcow",
        &top,
        &[
            "write -P 0x04 512k 16k",
            "write -P 0x05 3m 4k",
            "write -P 0x06 2m 512",
        ],
    );
    assert_matches_qemu(&top);
    assert_eq!(open_chain(&top).unwrap().layers().len(), 2);
}

/// Passes once the qcow2 driver lands.
#[test]
fn qcow2_over_qcow_base() {
    let dir = scratch();
    let base = create_qcow(dir.path(), "base.qcow", "2M", None);
    qemu_io(
        "qcow",
        &base,
        &["write -P 0x31 0 300k", "write -c -P 0x32 1m 4k"],
    );
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow",
        "-F",
        "qcow",
        path_str(&top),
    ]);
    qemu_io("qcow2", &top, &["write -P 0x33 100k 64k"]);
    assert_matches_qemu(&top);
}

#[test]
fn manifest_qcow_rows() {
    let mut rows = 0;
    for row in common::manifest::rows(common::manifest::MANIFEST) {
        if row.format != "qcow" {
            continue;
        }
        rows += 1;
        let img = row.path();
        let Some(expected) = row.want.sha() else {
            let started = Instant::now();
            let e = open_err(&img);
            assert!(
                started.elapsed().as_secs() < 2,
                "{}: slow refusal",
                img.display()
            );
            assert!(!e.to_string().contains('\n'), "{e}");
            continue;
        };
        let chain = open_chain(&img).unwrap_or_else(|e| panic!("{}: {e}", img.display()));
        assert_eq!(Some(chain.size()), row.virtual_size, "{}", img.display());
        let data = read_all(&chain, 1 << 20).unwrap();
        assert_eq!(sha256_hex(&data), expected, "{}", img.display());
    }
    assert!(rows >= 2, "expected qcow rows in the manifest");
}

#[test]
fn huge_size_is_refused_fast() {
    let img = testdata()
        .join("images")
        .join("hostile-cdi-qcow1-huge-size.qcow");
    let started = Instant::now();
    let e = open_err(&img);
    assert!(started.elapsed().as_millis() < 1000);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("L1"), "{e}");
}

/// A change applied to an image's bytes.
type Patch = Box<dyn FnOnce(&mut Vec<u8>)>;

#[test]
fn hostile_headers_are_refused() {
    let dir = scratch();
    let d = dir.path();
    let good = written_image(d);
    let cases: Vec<(&str, Patch, ErrorKind, &str)> = vec![
        (
            "trunc.qcow",
            Box::new(|b| b.truncate(40)),
            ErrorKind::Corrupt,
            "truncated",
        ),
        (
            "cb8.qcow",
            Box::new(|b| b[32] = 8),
            ErrorKind::Corrupt,
            "cluster_bits",
        ),
        (
            "cb17.qcow",
            Box::new(|b| b[32] = 17),
            ErrorKind::Corrupt,
            "cluster_bits",
        ),
        (
            "l2b5.qcow",
            Box::new(|b| b[33] = 5),
            ErrorKind::Corrupt,
            "l2_bits",
        ),
        (
            "l2b14.qcow",
            Box::new(|b| b[33] = 14),
            ErrorKind::Corrupt,
            "l2_bits",
        ),
        (
            "l1eof.qcow",
            Box::new(|b| {
                let off = (b.len() as u64 - 8).to_be_bytes();
                b[40..48].copy_from_slice(&off);
            }),
            ErrorKind::Corrupt,
            "L1",
        ),
        (
            "size.qcow",
            Box::new(|b| b[24..32].copy_from_slice(&u64::MAX.to_be_bytes())),
            ErrorKind::Corrupt,
            "size",
        ),
        (
            "aes.qcow",
            Box::new(|b| b[39] = 1),
            ErrorKind::Encrypted,
            "encrypt",
        ),
        (
            "crypt2.qcow",
            Box::new(|b| b[39] = 2),
            ErrorKind::Corrupt,
            "crypt_method",
        ),
        (
            "longname.qcow",
            Box::new(|b| {
                b[8..16].copy_from_slice(&48u64.to_be_bytes());
                b[16..20].copy_from_slice(&1024u32.to_be_bytes());
            }),
            ErrorKind::Corrupt,
            "backing file name",
        ),
        (
            "nameeof.qcow",
            Box::new(|b| {
                let off = (b.len() as u64 - 4).to_be_bytes();
                b[8..16].copy_from_slice(&off);
                b[16..20].copy_from_slice(&100u32.to_be_bytes());
            }),
            ErrorKind::Corrupt,
            "backing file name",
        ),
    ];
    for (name, f, kind, words) in cases {
        let p = patched(&good, d, name, f);
        let e = open_err(&p);
        assert_eq!(e.kind(), kind, "{name}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(words), "{name}: {msg}");
        assert!(!msg.contains('\n'), "{name}: {msg}");
        assert_eq!(e.path(), Some(p.as_path()), "{name}");
    }
}

#[test]
fn aes_image_from_qemu_is_refused() {
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
        path_str(&img),
        "1M",
    ]);
    let e = open_err(&img);
    assert_eq!(e.kind(), ErrorKind::Encrypted, "{e}");
}

#[test]
fn bad_l2_entries_fail_only_their_range() {
    let dir = scratch();
    let d = dir.path();
    let good = written_image(d);
    let expected = common::qemu_raw(&good, None);
    let bytes = std::fs::read(&good).unwrap();
    let l2 = first_l2_offset(&bytes) as usize;
    // Cluster 30 (guest 120 KiB) is unallocated in `good`; cluster 3 is data.
    assert_eq!(be64(&bytes, l2 + 30 * 8), 0);
    assert_ne!(be64(&bytes, l2 + 3 * 8), 0);
    let cases: Vec<(&str, usize, u64)> = vec![
        ("past-eof.qcow", 30, 1 << 40),
        ("unaligned.qcow", 3, be64(&bytes, l2 + 3 * 8) + 1),
        (
            "compressed-eof.qcow",
            30,
            (1 << 63) | (100 << 51) | (1 << 40),
        ),
    ];
    for (name, idx, entry) in cases {
        let p = patched(&good, d, name, |b| {
            b[l2 + idx * 8..l2 + idx * 8 + 8].copy_from_slice(&entry.to_be_bytes())
        });
        let chain = open_chain(&p).unwrap();
        let bad = idx as u64 * 4096;
        let mut buf = vec![0u8; 4096];
        let e = chain.read_at(&mut buf, bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
        // A read that spans the bad cluster fails too…
        let mut buf = vec![0u8; 3 * 4096];
        assert!(chain.read_at(&mut buf, bad - 4096).is_err(), "{name}");
        // …and everything else still reads like qemu.
        for (start, end) in [(0, bad as usize), (bad as usize + 4096, expected.len())] {
            let mut buf = vec![0u8; end - start];
            chain.read_at(&mut buf, start as u64).unwrap();
            assert!(buf == expected[start..end], "{name}: {start:#x}..{end:#x}");
        }
    }
}

#[test]
fn l2_table_past_eof_fails_only_its_range() {
    let dir = scratch();
    let d = dir.path();
    let good = written_image(d);
    let expected = common::qemu_raw(&good, None);
    let p = patched(&good, d, "l2eof.qcow", |b| {
        let l1 = be64(b, 40) as usize;
        b[l1..l1 + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    });
    let chain = open_chain(&p).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = chain.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("L2 table"), "{e}");
    // The second L2 table's range (from 2 MiB) is unaffected.
    let mut rest = vec![0u8; expected.len() - (2 << 20)];
    chain.read_at(&mut rest, 2 << 20).unwrap();
    assert!(rest == expected[2 << 20..]);
}

#[test]
fn corrupt_compressed_data_fails_cleanly() {
    let dir = scratch();
    let d = dir.path();
    let img = create_qcow(d, "c.qcow", "1M", None);
    qemu_io(
        "qcow",
        &img,
        &["write -c -P 0x42 0 4k", "write -P 0x43 4k 4k"],
    );
    let bytes = std::fs::read(&img).unwrap();
    let l2 = first_l2_offset(&bytes) as usize;
    let entry = be64(&bytes, l2);
    assert_ne!(entry & (1 << 63), 0, "cluster 0 should be compressed");
    let host = (entry & ((1 << 51) - 1)) as usize;
    let p = patched(&img, d, "garbage.qcow", |b| b[host..host + 16].fill(0xff));
    let chain = open_chain(&p).unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        chain.read_at(&mut buf, 0).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    chain.read_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0x43));
}

#[test]
fn unaligned_recorded_size_rounds_down_like_qemu() {
    let dir = scratch();
    let d = dir.path();
    let img = create_qcow(d, "s.qcow", "1M", None);
    qemu_io("qcow", &img, &["write -P 0x99 1020k 4k"]);
    // qemu exposes whole sectors only: 1 MiB - 100 bytes reads as 1 MiB - 512.
    let p = patched(&img, d, "odd.qcow", |b| {
        b[24..32].copy_from_slice(&((1u64 << 20) - 100).to_be_bytes())
    });
    assert_matches_qemu(&p);
    assert_eq!(open_chain(&p).unwrap().size(), (1 << 20) - 512);
}
