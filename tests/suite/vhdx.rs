//! VHDX: byte-exact reads against `qemu-img convert` over generated
//! matrices, a qcow2 overlay over a VHDX, log replay (entries crafted
//! here, with an oracle built by hand and qemu's own replay as a second
//! one), differencing disks built by hand (qemu cannot create them), the
//! real Windows image of MANIFEST-next.tsv, hostile images, one FUSE mount
//! and the refusal of `--rw`.
//!
//! Offsets of VHDX structures are found by parsing the image here (not
//! assumed), so the crafted cases follow whatever layout qemu chose.

use crate::common;
use common::qemu_img_line;
use common::s;
use common::{open_err, patched};

use std::path::{Path, PathBuf};

use common::fuse::Mounted;
use common::{
    assert_matches_qemu, assert_same, open_chain, qemu_img, qemu_io, qemu_raw, read_all, scratch,
    sha256_hex,
};
use vdiskfs::cache::Caches;
use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::ErrorKind;

const MIB: u64 = 1 << 20;

fn le32(b: &[u8], at: u64) -> u32 {
    u32::from_le_bytes(b[at as usize..at as usize + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: u64) -> u64 {
    u64::from_le_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

fn put32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes the CRC-32C of the structure of `len` bytes at `at` (checksum at +4).
fn fix_crc(b: &mut [u8], at: u64, len: usize) {
    put32(b, at + 4, 0);
    let c = crc32c::crc32c(&b[at as usize..at as usize + len]);
    put32(b, at + 4, c);
}

/// Offset of the current header (valid, higher sequence number).
fn current_header(b: &[u8]) -> u64 {
    let seq = |at: u64| le64(b, at + 8);
    if seq(128 << 10) > seq(64 << 10) {
        128 << 10
    } else {
        64 << 10
    }
}

/// (offset, length) of the region with this first GUID byte group, from region table 1.
fn region(b: &[u8], first: u32) -> (u64, u64) {
    let t = 192 << 10;
    let n = le32(b, t + 8) as u64;
    (0..n)
        .map(|i| t + 16 + 32 * i)
        .find(|&e| le32(b, e) == first)
        .map(|e| (le64(b, e + 16), u64::from(le32(b, e + 24))))
        .expect("region present")
}

fn bat_offset(b: &[u8]) -> u64 {
    region(b, 0x2dc2_7766).0
}

fn metadata_offset(b: &[u8]) -> u64 {
    region(b, 0x8b7c_a206).0
}

/// File offset of the metadata item whose GUID starts with `first`.
fn metadata_item(b: &[u8], first: u32) -> u64 {
    let m = metadata_offset(b);
    let n = u64::from(u16::from_le_bytes([b[m as usize + 10], b[m as usize + 11]]));
    (0..n)
        .map(|i| m + 32 + 32 * i)
        .find(|&e| le32(b, e) == first)
        .map(|e| m + u64::from(le32(b, e + 16)))
        .expect("metadata item present")
}

/// An error that names the file and fits on one line.
fn assert_one_line(e: &vdiskfs::Error, p: &Path, what: &str) {
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "multi-line error: {msg}");
    assert!(
        msg.contains(p.file_name().unwrap().to_str().unwrap()),
        "error does not name the file: {msg}"
    );
    assert!(msg.contains(what), "error {msg:?} does not say {what:?}");
}

/// A VHDX made by qemu-img create with `opts`, written to by qemu-io.
fn created(dir: &Path, name: &str, size: &str, opts: &str, writes: &[&str]) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-f", "vhdx", "-o", opts, s(&p), size]);
    if !writes.is_empty() {
        qemu_io("vhdx", &p, writes);
    }
    p
}

/// Random qemu-io writes, zero writes and discards over a `size`-byte disk.
fn random_writes(size: u64, seed: u64, n: usize) -> Vec<String> {
    let mut rng = common::rng::Rng::new(seed);
    (0..n)
        .map(|i| {
            let len = (1 + rng.below(300)) * 512 * if i % 5 == 0 { 16 } else { 1 };
            let len = len.min(size);
            let off = rng.below((size - len) / 512 + 1) * 512;
            match i % 7 {
                5 => format!("write -z {off} {len}"),
                6 => format!("discard {off} {len}"),
                _ => format!("write -P {} {off} {len}", 1 + rng.below(250)),
            }
        })
        .collect()
}

#[test]
fn generated_matrix_matches_qemu() {
    let dir = scratch();
    let mut n = 0;
    for bs in ["1M", "8M", "32M", "256M"] {
        for (sub, log) in [("dynamic", "1M"), ("dynamic", "4M"), ("fixed", "1M")] {
            let name = format!("m-{bs}-{sub}-{log}.vhdx");
            let opts = format!("block_size={bs},subformat={sub},log_size={log}");
            let size = 40 * MIB + 3 * 512;
            let cmds = random_writes(size, n, 60);
            let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
            let p = created(dir.path(), &name, &size.to_string(), &opts, &cmds);
            assert_matches_qemu(&p);
            n += 1;
        }
    }
    // block_state_zero=off: unwritten blocks are NOT_PRESENT rather than ZERO.
    let p = created(
        dir.path(),
        "nozero.vhdx",
        "20M",
        "block_state_zero=off,block_size=1M",
        &["write -P 9 1M 3M", "write -z 2M 512k"],
    );
    assert_matches_qemu(&p);
}

/// Disks past 4 GiB: the BAT interleaves a sector-bitmap entry after
/// every chunk ratio of payload entries (4096 at 1 MiB blocks, 128 at
/// 32 MiB), so payload indexes shift there. Compared in windows around
/// the written places, the chunk boundaries and random spots (the disks
/// are sparse; reading 6 GiB three times would only cost time).
#[test]
fn disks_past_the_first_chunk_match_qemu() {
    let dir = scratch();
    let g4 = 4u64 << 30;
    for bs in ["1M", "32M"] {
        let name = format!("big-{bs}.vhdx");
        let w = [
            format!("write -P 0x21 {} 3M", g4 - MIB),
            format!("write -P 0x22 {} 1M", g4 + 33 * MIB),
            format!("write -P 0x23 {} 64k", 6 * (1u64 << 30) - 65536),
            "write -P 0x24 0 1M".to_string(),
        ];
        let w: Vec<&str> = w.iter().map(String::as_str).collect();
        let p = created(dir.path(), &name, "6G", &format!("block_size={bs}"), &w);
        let raw = dir.path().join(format!("{name}.raw"));
        qemu_img(&["convert", "-O", "raw", s(&p), s(&raw)]);
        let oracle = std::fs::File::open(&raw).unwrap();
        let c = open_chain(&p).unwrap();
        assert_eq!(c.size(), 6 << 30);
        let mut rng = common::rng::Rng::new(42);
        let mut spots = vec![0, g4 - 2 * MIB, g4 + 32 * MIB, (6 << 30) - 2 * MIB];
        spots.extend((0..20).map(|_| rng.below((6 << 30) - 2 * MIB)));
        for at in spots {
            let len = (4 * MIB).min(c.size() - at) as usize;
            let mut want = vec![0u8; len];
            std::os::unix::fs::FileExt::read_exact_at(&oracle, &mut want, at).unwrap();
            let mut got = vec![0u8; len];
            c.read_at(&mut got, at).unwrap();
            assert!(got == want, "{name}: window at {at:#x} differs from qemu");
        }
        assert_eq!(
            vdiskfs::info::gather(&c).unwrap().allocated_bytes,
            if bs == "1M" { 6 * MIB } else { 5 * 32 * MIB },
            "{name}"
        );
    }
}

/// qemu neither makes nor reads 4096-byte logical sectors (it refuses them
/// as unsupported), so the oracle is qemu's read of the 512-byte image the
/// 4096-byte one is patched from: below the first chunk the BAT layout is
/// the same and a plain disk's bytes do not depend on the sector size.
#[test]
fn four_kib_sectors_match_qemu() {
    let dir = scratch();
    let cmds = random_writes(48 * MIB, 99, 40);
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let base = created(dir.path(), "s512.vhdx", "48M", "block_size=2M", &cmds);
    let p = patched(&base, dir.path(), "s4k.vhdx", |b| {
        let l = metadata_item(b, 0x8141_bf1d);
        put32(b, l, 4096);
        let ph = metadata_item(b, 0xcda3_48c7);
        put32(b, ph, 4096);
    });
    let expected = qemu_raw(&base, None);
    let c = open_chain(&p).unwrap();
    for piece in [1 << 20, 4096 + 512] {
        assert_same(&read_all(&c, piece).unwrap(), &expected, &p, piece);
    }
    let d = &vdiskfs::info::gather(&c).unwrap().chain[0].layer.details;
    assert_eq!(d["logical_sector_size"], 4096);
    assert_eq!(d["chunk_ratio"], 16384);
}

#[test]
fn converted_patterned_raw_matches_qemu() {
    let dir = scratch();
    let raw = dir.path().join("pat.raw");
    let mut data = common::rng::Rng::new(7).bytes((24 * MIB) as usize);
    data[(5 * MIB) as usize..(9 * MIB) as usize].fill(0);
    data[(12 * MIB) as usize..(13 * MIB) as usize].fill(0x5a);
    std::fs::write(&raw, &data).unwrap();
    for (i, bs) in ["1M", "2M", "16M"].iter().enumerate() {
        let p = dir.path().join(format!("conv{i}.vhdx"));
        let o = format!("block_size={bs}");
        qemu_img(&["convert", "-O", "vhdx", "-o", &o, s(&raw), s(&p)]);
        let c = open_chain(&p).unwrap();
        assert_same(&read_all(&c, 1 << 20).unwrap(), &data, &p, 1 << 20);
        assert_matches_qemu(&p);
    }
}

#[test]
fn qcow2_overlay_over_vhdx_matches_qemu() {
    let dir = scratch();
    let base = created(
        dir.path(),
        "base.vhdx",
        "16M",
        "block_size=1M",
        &["write -P 0x11 0 6M", "write -P 0x22 10M 2M"],
    );
    let top = dir.path().join("top.qcow2");
    qemu_img_line(&format!("create -f qcow2 -b base.vhdx -F vhdx {}", s(&top)));
    qemu_io("qcow2", &top, &["write -P 0x33 1M 64k", "write -z 10M 4k"]);
    assert_matches_qemu(&top);
    let c = open_chain(&top).unwrap();
    assert_eq!(c.layers().len(), 2);
    // Probed too, without -F.
    let top2 = dir.path().join("top2.qcow2");
    qemu_img_line(&format!(
        "create -f qcow2 -b {} -F vhdx {}",
        s(&base),
        s(&top2)
    ));
    assert_matches_qemu(&top2);
}

/// The VHDX rows of MANIFEST-next.tsv (real images), through the library
/// and through FUSE.
#[test]
fn manifest_next_vhdx_rows_read_exactly() {
    let mut seen = 0;
    for row in common::manifest::rows(common::manifest::MANIFEST_NEXT) {
        if row.format != "vhdx" {
            continue;
        }
        let file = row.file.as_str();
        let path = row.path();
        let want = row.want.sha().unwrap_or_else(|| panic!("{file}: no hash"));
        let c = open_chain(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(Some(c.size()), row.virtual_size, "{file}");
        let got = sha256_hex(&read_all(&c, 1 << 20).unwrap());
        assert_eq!(got, want, "{file}");
        let info = vdiskfs::info::gather(&c).unwrap();
        assert_eq!(
            info.chain[0].layer.subformat.as_deref(),
            Some(row.subformat.as_str()),
            "{file}"
        );
        // And through FUSE.
        let m = Mounted::new(&[&path], &[]);
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let exposed = m.file(&format!("{stem}.raw"));
        assert_eq!(common::sha256_file(&exposed), want, "{file} through FUSE");
        m.unmount();
        seen += 1;
    }
    assert!(seen >= 1, "no vhdx row in MANIFEST-next.tsv");
}

#[test]
fn detection_info_and_fuse_mount() {
    let dir = scratch();
    let p = created(
        dir.path(),
        "disk.vhdx",
        "12M",
        "block_size=1M",
        &["write -P 0x44 512 3M", "write -P 0x45 9M 1M"],
    );
    let (j, _) = common::fuse::info_json(&p);
    assert_eq!(j["format"], "vhdx");
    assert_eq!(j["chain"][0]["subformat"], "dynamic");
    let d = &j["chain"][0]["details"];
    assert_eq!(d["logical_sector_size"], 512);
    assert_eq!(d["block_size"], MIB);
    assert!(d["creator"].as_str().unwrap().contains("QEMU"), "{d}");

    let expected = qemu_raw(&p, None);
    let m = Mounted::new(&[&p], &[]);
    let got = std::fs::read(m.file("disk.raw")).unwrap();
    assert_same(&got, &expected, &p, 0);
    m.unmount();

    // Writing in place: tests/vhdx_write.rs.
}

#[path = "vhdx/crafted.rs"]
mod crafted;

#[path = "vhdx/hostile.rs"]
mod hostile;
