//! VHD (qemu's `vpc`): byte-exact reads against `qemu-img convert -O raw`
//! on generated fixed and dynamic disks, chains with qcow2, hand-built
//! differencing disks (qemu cannot create them), the MANIFEST-next rows,
//! hostile images, a FUSE mount, and the `--rw` refusal.

mod common;

use std::path::{Path, PathBuf};

use common::fuse::{vdiskfs, Mounted};
use common::rng::Rng;
use common::{qemu_img, qemu_io, qemu_raw, read_all, scratch, sha256_chain, testdata};
use vdiskfs::cache::Caches;
use vdiskfs::chain::{Chain, ChainOptions, Status};
use vdiskfs::format::vhd::footer::checksum;
use vdiskfs::format::Format;
use vdiskfs::ErrorKind;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn open_with(p: &Path, opts: ChainOptions) -> vdiskfs::Result<Chain> {
    Chain::open(p, &opts, &Caches::new(64 << 20))
}

fn open(p: &Path) -> vdiskfs::Result<Chain> {
    open_with(p, ChainOptions::default())
}

fn open_err(p: &Path) -> vdiskfs::Error {
    match open(p) {
        Ok(_) => panic!("{} opened, expected an error", p.display()),
        Err(e) => e,
    }
}

/// Reads the disk whole, in odd pieces, and at random spots, comparing
/// with `expected`.
fn assert_reads(chain: &Chain, expected: &[u8], what: &str) {
    assert_eq!(
        chain.size() as usize,
        expected.len(),
        "virtual size of {what}"
    );
    for piece in [1 << 20, 4096 + 512, 65536 * 3 + 7] {
        let got = read_all(chain, piece).unwrap_or_else(|e| panic!("{what}: {e}"));
        if got != expected {
            let first = got.iter().zip(expected).position(|(a, b)| a != b).unwrap();
            panic!("{what}: differs from the oracle at {first:#x} (read size {piece})");
        }
    }
    let mut rng = Rng::new(expected.len() as u64);
    for _ in 0..300 {
        let len = (1 + rng.below(9000) as usize).min(expected.len());
        let off = rng.below((expected.len() - len) as u64 + 1) as usize;
        let mut got = vec![0u8; len];
        chain.read_at(&mut got, off as u64).unwrap();
        assert!(
            got == expected[off..off + len],
            "{what}: read {len} at {off:#x}"
        );
    }
}

/// Byte-exact against `qemu-img convert -f vpc -O raw` (qemu probes a
/// fixed VHD as raw, so the format is given to it; we detect it).
fn assert_matches_qemu_vpc(p: &Path) {
    let expected = qemu_raw(p, Some("vpc"));
    let chain = open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    assert_eq!(chain.layers()[0].format(), Format::Vhd);
    assert_reads(&chain, &expected, s(p));
}

/// qemu-io writes at seeded random offsets (some crossing 2 MiB blocks).
fn random_writes(p: &Path, size: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut cmds = Vec::new();
    for i in 0..12 {
        let len = 512 * (1 + rng.below(600));
        let off = 512 * rng.below((size - len) / 512);
        cmds.push(format!("write -P {} {off} {len}", 1 + i * 17));
    }
    if size > (2 << 20) + 4096 {
        cmds.push(format!("write -P 0xee {} 4096", (2 << 20) - 2048));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("vpc", p, &refs);
}

#[test]
fn generated_fixed_and_dynamic_match_qemu() {
    let d = scratch();
    // Odd sizes: qemu rounds them to a CHS geometry, and the footer of a
    // 'qemu' image sizes it by that geometry.
    for (i, size) in ["1M", "5000k", "33M", "100M", "129M"].iter().enumerate() {
        for sub in ["fixed", "dynamic"] {
            let p = d.path().join(format!("{sub}-{size}.vhd"));
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                &format!("subformat={sub}"),
                s(&p),
                size,
            ]);
            let vsize = open(&p).unwrap().size();
            random_writes(&p, vsize, i as u64 + 7);
            assert_matches_qemu_vpc(&p);
        }
    }
}

/// Patterned bytes: data, zero runs and repeated bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let chunk = (512 * (1 + rng.below(3000)) as usize).min(len - out.len());
        match rng.below(3) {
            0 => out.extend(std::iter::repeat_n(0u8, chunk)),
            1 => out.extend(std::iter::repeat_n(rng.next() as u8, chunk)),
            _ => out.extend(rng.bytes(chunk)),
        }
    }
    out
}

#[test]
fn converted_from_raw_match_qemu() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    std::fs::write(&raw, pattern(9 << 20, 3)).unwrap();
    for sub in ["dynamic", "fixed"] {
        let p = d.path().join(format!("conv-{sub}.vhd"));
        let o = format!("subformat={sub}");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            &o,
            s(&raw),
            s(&p),
        ]);
        assert_matches_qemu_vpc(&p);
    }
}

#[test]
fn qcow2_overlay_over_vhd() {
    let d = scratch();
    let base = d.path().join("base.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&base), "20M"]);
    qemu_io(
        "vpc",
        &base,
        &["write -P 0x31 0 5M", "write -P 0x32 12M 3M"],
    );
    let fixed = d.path().join("fixed.vhd");
    qemu_img(&[
        "convert",
        "-f",
        "vpc",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
        s(&base),
        s(&fixed),
    ]);
    for (b, fmt) in [(&base, Some("vpc")), (&fixed, Some("vpc"))] {
        let top = d.path().join("top.qcow2");
        let _ = std::fs::remove_file(&top);
        let mut args = vec!["create", "-q", "-f", "qcow2", "-b", s(b)];
        if let Some(f) = fmt {
            args.extend(["-F", f]);
        }
        args.extend([s(&top), "20M"]);
        qemu_img(&args);
        qemu_io(
            "qcow2",
            &top,
            &["write -P 0x41 4M 2M", "write -P 0x42 13M 64k"],
        );
        let expected = qemu_raw(&top, Some("qcow2"));
        let chain = open(&top).unwrap();
        assert_eq!(chain.layers().len(), 2);
        assert_eq!(chain.layers()[1].format(), Format::Vhd);
        assert_reads(&chain, &expected, "qcow2 over vhd");
    }
}

// ---- Hand-built differencing disks ----------------------------------------
//
// qemu cannot create differencing VHDs (and reads them as if they had no
// parent), so these tests write the bytes themselves, following the VHD
// specification: footer copy at 0, dynamic header at 512, parent locator
// blobs, the BAT, blocks (sector bitmap, then data), footer at the end.
// The oracle is built alongside: the parent's bytes (from qemu-img
// convert), overwritten by every child sector whose bitmap bit is set.

const BLOCK: usize = 64 << 10;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Sets the checksum of the footer or dynamic header at `at` (`len` bytes,
/// checksum field at `field`).
fn seal(b: &mut [u8], at: usize, len: usize, field: usize) {
    let c = checksum(&b[at..at + len], field);
    put32(b, at + field, c);
}

/// The footer (512 bytes, at its end) of a VHD file.
fn footer_of(p: &Path) -> Vec<u8> {
    let b = std::fs::read(p).unwrap();
    b[b.len() - 512..].to_vec()
}

struct Diff {
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    size: u64,
    locators: Vec<(&'static [u8; 4], Vec<u8>)>,
    parent_name: String,
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Writes a differencing VHD at `p` whose blocks hold random data with
/// random bitmaps, and applies it to `oracle` (the parent's content).
fn build_diff(p: &Path, diff: &Diff, oracle: &mut [u8], seed: u64) {
    let mut rng = Rng::new(seed);
    let blocks = (diff.size as usize).div_ceil(BLOCK);
    let bitmap_len = 512; // 128 sectors: 16 bytes, padded to a sector.
    let mut img = vec![0u8; 512 + 1024];
    // Locator blobs, one sector each.
    let mut locs = Vec::new();
    for (code, blob) in &diff.locators {
        let at = img.len();
        img.extend_from_slice(blob);
        img.resize(at + blob.len().next_multiple_of(512), 0);
        locs.push((*code, blob.len(), at));
    }
    let bat_at = img.len();
    let bat_len = (blocks * 4).next_multiple_of(512);
    img.resize(bat_at + bat_len, 0xff);
    for b in 0..blocks {
        // About two thirds of the blocks are allocated.
        if rng.below(3) == 0 {
            continue;
        }
        let start = img.len();
        put32(&mut img, bat_at + 4 * b, (start / 512) as u32);
        let mut bitmap = vec![0u8; bitmap_len];
        let mode = rng.below(4);
        for sector in 0..BLOCK / 512 {
            let set = match mode {
                0 => true,
                1 => sector % 7 < 3,
                _ => rng.below(2) == 0,
            };
            if set {
                bitmap[sector / 8] |= 0x80 >> (sector % 8);
            }
        }
        img.extend_from_slice(&bitmap);
        let data = rng.bytes(BLOCK);
        img.extend_from_slice(&data);
        for sector in 0..BLOCK / 512 {
            let guest = b * BLOCK + sector * 512;
            if bitmap[sector / 8] & (0x80 >> (sector % 8)) != 0 && guest < oracle.len() {
                oracle[guest..guest + 512].copy_from_slice(&data[sector * 512..][..512]);
            }
        }
    }
    // Footer: a Hyper-V style one (creator 'win ', sized by current_size).
    let mut f = vec![0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    put32(&mut f, 8, 2);
    put32(&mut f, 12, 0x0001_0000);
    put64(&mut f, 16, 512);
    f[28..32].copy_from_slice(b"win ");
    put32(&mut f, 32, 0x000a_0000);
    f[36..40].copy_from_slice(b"Wi2k");
    put64(&mut f, 40, diff.size);
    put64(&mut f, 48, diff.size);
    f[56..60].copy_from_slice(&[0x01, 0x00, 0x10, 0x3f]);
    put32(&mut f, 60, 4);
    f[68..84].copy_from_slice(&diff.uuid);
    seal(&mut f, 0, 512, 64);
    img[0..512].copy_from_slice(&f);
    // Dynamic header.
    let h = &mut img[512..1536];
    h[0..8].copy_from_slice(b"cxsparse");
    put64(h, 8, u64::MAX);
    put64(h, 16, bat_at as u64);
    put32(h, 24, 0x0001_0000);
    put32(h, 28, blocks as u32);
    put32(h, 32, BLOCK as u32);
    h[40..56].copy_from_slice(&diff.parent_uuid);
    let name: Vec<u8> = diff
        .parent_name
        .encode_utf16()
        .flat_map(|u| u.to_be_bytes())
        .collect();
    h[64..64 + name.len()].copy_from_slice(&name);
    for (i, (code, len, at)) in locs.iter().enumerate() {
        let e = 576 + 24 * i;
        h[e..e + 4].copy_from_slice(*code);
        put32(h, e + 4, 512);
        put32(h, e + 8, *len as u32);
        put64(h, e + 16, *at as u64);
    }
    seal(&mut img, 512, 1024, 36);
    img.extend_from_slice(&f);
    std::fs::write(p, img).unwrap();
}

/// The unique id in a VHD footer.
fn uuid_of(footer: &[u8]) -> [u8; 16] {
    footer[68..84].try_into().unwrap()
}

/// A dynamic VHD parent made by qemu, with data everywhere, and its bytes.
fn parent(dir: &Path, name: &str, size: &str) -> (PathBuf, Vec<u8>) {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "vpc", s(&p), size]);
    let vsize = open(&p).unwrap().size();
    random_writes(&p, vsize, 99);
    let raw = qemu_raw(&p, Some("vpc"));
    (p, raw)
}

fn w2ru(name: &str) -> (&'static [u8; 4], Vec<u8>) {
    (b"W2ru", utf16le(name))
}

#[test]
fn differencing_chains_read_child_over_parent() {
    let d = scratch();
    let (base, mut oracle) = parent(d.path(), "base.vhd", "3M");
    let size = oracle.len() as u64;
    let base_id = uuid_of(&footer_of(&base));
    let mid = d.path().join("mid.vhd");
    let mid_diff = Diff {
        uuid: [0x11; 16],
        parent_uuid: base_id,
        size,
        locators: vec![
            (b"W2ku", utf16le("C:\\VMs\\elsewhere\\base.vhd")),
            w2ru(".\\base.vhd"),
        ],
        parent_name: "C:\\VMs\\elsewhere\\base.vhd".into(),
    };
    build_diff(&mid, &mid_diff, &mut oracle, 5);
    let chain = open(&mid).unwrap();
    assert_eq!(chain.layers().len(), 2);
    assert_reads(&chain, &oracle, "differencing over dynamic");
    // A second level, found through a MacX URL and then by parent name.
    std::fs::create_dir(d.path().join("sub")).unwrap();
    let top = d.path().join("sub/top.vhd");
    let top_diff = Diff {
        uuid: [0x22; 16],
        parent_uuid: [0x11; 16],
        size,
        locators: vec![(b"MacX", b"file://../mid.vhd".to_vec())],
        parent_name: "D:\\x\\mid.vhd".into(),
    };
    build_diff(&top, &top_diff, &mut oracle, 6);
    let chain = open(&top).unwrap();
    assert_eq!(chain.layers().len(), 3);
    assert_reads(&chain, &oracle, "three-level differencing chain");
    // Over a fixed parent, found by its absolute W2ku name's file name.
    let fixed = d.path().join("fixed.vhd");
    qemu_img(&[
        "convert",
        "-f",
        "vpc",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
        s(&base),
        s(&fixed),
    ]);
    let mut oracle = qemu_raw(&fixed, Some("vpc"));
    let child = d.path().join("child-of-fixed.vhd");
    let diff = Diff {
        uuid: [0x33; 16],
        parent_uuid: uuid_of(&footer_of(&fixed)),
        size: oracle.len() as u64,
        locators: vec![(b"W2ku", utf16le("C:\\VMs\\fixed.vhd"))],
        parent_name: String::new(),
    };
    build_diff(&child, &diff, &mut oracle, 8);
    let chain = open(&child).unwrap();
    assert_reads(&chain, &oracle, "differencing over fixed");
    let info = chain.layers()[0].info();
    assert_eq!(info.subformat.as_deref(), Some("differencing"));
    assert_eq!(
        info.details["parent_uuid"],
        uuid_text(&uuid_of(&footer_of(&fixed)))
    );
    // --single-link: the child alone, its unallocated sectors read zeros.
    let alone = open_with(
        &child,
        ChainOptions {
            single_link: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(alone.layers().len(), 1);
}

fn uuid_text(id: &[u8; 16]) -> String {
    vdiskfs::format::vhd::footer::uuid_string(id)
}

#[test]
fn parent_uuid_mismatch_and_missing_parent_are_refused() {
    let d = scratch();
    let (_base, mut oracle) = parent(d.path(), "base.vhd", "2M");
    let size = oracle.len() as u64;
    let child = d.path().join("child.vhd");
    let diff = Diff {
        uuid: [0x44; 16],
        parent_uuid: [0x99; 16],
        size,
        locators: vec![w2ru(".\\base.vhd")],
        parent_name: "base.vhd".into(),
    };
    build_diff(&child, &diff, &mut oracle, 9);
    let e = open_err(&child);
    assert_eq!(e.kind(), ErrorKind::CidMismatch, "{e}");
    assert!(e.to_string().contains("child.vhd") && e.to_string().contains("--ignore-cid"));
    // --ignore-cid accepts it, and the chain reads child over parent.
    let chain = open_with(
        &child,
        ChainOptions {
            ignore_cid: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_reads(&chain, &oracle, "--ignore-cid chain");

    let orphan = d.path().join("orphan.vhd");
    let diff = Diff {
        locators: vec![w2ru(".\\gone.vhd")],
        parent_name: "C:\\gone.vhd".into(),
        ..diff
    };
    build_diff(&orphan, &diff, &mut oracle.clone(), 10);
    let e = open_err(&orphan);
    assert!(e.to_string().contains("gone.vhd"), "{e}");
    assert!(e.to_string().contains("orphan.vhd"), "{e}");
    // The CLI says it on one line and fails.
    let out = vdiskfs(&["info", s(&orphan)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A fixed VHD with `data`, creator 'win ' (sized by current_size), and
/// the unique id `uuid`.
fn fixed_vhd(p: &Path, data: &[u8], uuid: [u8; 16]) {
    let mut f = vec![0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    put32(&mut f, 12, 0x0001_0000);
    put64(&mut f, 16, u64::MAX);
    f[28..32].copy_from_slice(b"win ");
    put64(&mut f, 40, data.len() as u64);
    put64(&mut f, 48, data.len() as u64);
    put32(&mut f, 60, 2);
    f[68..84].copy_from_slice(&uuid);
    seal(&mut f, 0, 512, 64);
    let mut img = data.to_vec();
    img.extend_from_slice(&f);
    std::fs::write(p, img).unwrap();
}

/// The real differencing disk Windows diskpart wrote (MANIFEST-next row
/// `fat-differential.vhd`) over a stand-in for its absent parent: a fixed
/// VHD named as its W2ru locator says, with the parent UUID its header
/// records, holding a pattern. Every sector whose bitmap bit is set (most
/// significant bit first) reads the child's sector, every other one the
/// parent's; every sector where Windows wrote non-zero data has its bit
/// set, which pins the bit order. (libvhdi 20210425 and 20260901 read a
/// few more sectors of this block from the child: after a set bit, the
/// rest of its bitmap byte. Those sectors hold zeros in the child and
/// their bits are clear, so we read the parent there, as the bitmap says.)
#[test]
fn real_windows_differencing_disk_over_a_stand_in_parent() {
    let d = scratch();
    let src = testdata()
        .join("images/next/vhd-dfvfs-diskpart-differencing-parent-missing/fat-differential.vhd");
    let child = d.path().join("fat-differential.vhd");
    std::fs::copy(&src, &child).unwrap();
    let bytes = std::fs::read(&child).unwrap();
    let parent_uuid: [u8; 16] = bytes[512 + 40..512 + 56].try_into().unwrap();
    let size = 4 << 20;
    let parent_data = pattern(size, 77);
    fixed_vhd(&d.path().join("fat-parent.vhd"), &parent_data, parent_uuid);
    let chain = open(&child).unwrap();
    assert_eq!(chain.layers().len(), 2);
    let info = chain.layers()[0].info();
    assert_eq!(info.details["parent_chosen"], "fat-parent.vhd");
    assert_eq!(
        info.details["parent_uuid"],
        "5fa21a55-f394-aa4d-9958-1951a67d5540"
    );
    let bat_at = u64::from_be_bytes(bytes[512 + 16..512 + 24].try_into().unwrap()) as usize;
    let mut oracle = parent_data.clone();
    let block = 2 << 20;
    let mut child_sectors = 0;
    for b in 0..2 {
        let e = u32::from_be_bytes(
            bytes[bat_at + 4 * b..bat_at + 4 * b + 4]
                .try_into()
                .unwrap(),
        );
        if e == u32::MAX {
            continue;
        }
        let start = e as usize * 512;
        let bitmap = &bytes[start..start + 512];
        let data = &bytes[start + 512..start + 512 + block];
        for sector in 0..block / 512 {
            let here = &data[sector * 512..(sector + 1) * 512];
            let set = bitmap[sector / 8] & (0x80 >> (sector % 8)) != 0;
            assert!(set || here.iter().all(|&x| x == 0), "sector {sector}");
            if set {
                let g = b * block + sector * 512;
                oracle[g..g + 512].copy_from_slice(here);
                child_sectors += 1;
            }
        }
    }
    assert_eq!(child_sectors, 18);
    assert_reads(
        &chain,
        &oracle,
        "fat-differential.vhd over a stand-in parent",
    );
}

// ---- MANIFEST-next rows ---------------------------------------------------

/// Every `vpc` row of ../shared/testdata/MANIFEST-next.tsv: virtual size,
/// content hash (or refusal where the row says so). The two empty 127 GiB
/// disks are not hashed here: no block is allocated (status is one hole),
/// and spot reads are zero; their full hash is the long run in docs/vhd.md.
#[test]
fn manifest_next_vpc_rows() {
    let root = testdata();
    let text = std::fs::read_to_string(root.join("MANIFEST-next.tsv")).unwrap();
    let mut rows = 0;
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 10 || cols[4] != "vpc" {
            continue;
        }
        rows += 1;
        let path = root.join("images").join(cols[0]);
        let vsize: u64 = cols[6].parse().unwrap();
        let hash = cols[9];
        let detected = vdiskfs::format::detect(&vdiskfs::host::HostFile::open(&path).unwrap());
        assert_eq!(detected.unwrap(), Format::Vhd, "{}", cols[0]);
        let opened = open_with(
            &path,
            ChainOptions {
                format: Some(Format::Vhd),
                ..Default::default()
            },
        );
        if hash == "-" {
            let e = opened.err().unwrap_or_else(|| panic!("{} opened", cols[0]));
            assert!(
                e.to_string().contains(cols[0].rsplit('/').next().unwrap()),
                "{e}"
            );
            continue;
        }
        let chain = match (opened, hash.strip_prefix('~')) {
            (Ok(c), _) => c,
            (Err(e), Some(_)) => {
                assert!(e.to_string().contains("checksum"), "{}: {e}", cols[0]);
                continue;
            }
            (Err(e), None) => panic!("{}: {e}", cols[0]),
        };
        assert_eq!(chain.size(), vsize, "{}", cols[0]);
        if vsize > 1 << 30 {
            assert_eq!(
                chain.status(0, vsize).unwrap(),
                (Status::Hole, vsize),
                "{}",
                cols[0]
            );
            let mut rng = Rng::new(vsize);
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..64 {
                let off = rng.below(vsize - buf.len() as u64);
                chain.read_at(&mut buf, off).unwrap();
                assert!(buf.iter().all(|&b| b == 0), "{} at {off:#x}", cols[0]);
            }
            let last = vsize - buf.len() as u64;
            chain.read_at(&mut buf, last).unwrap();
            assert!(buf.iter().all(|&b| b == 0));
        } else {
            let want = hash.trim_start_matches('~');
            assert_eq!(sha256_chain(&chain).unwrap(), want, "{}", cols[0]);
        }
    }
    assert!(rows >= 6, "only {rows} vpc rows in MANIFEST-next.tsv");
}

// ---- Hostile images -------------------------------------------------------

/// A copy of `src` with `f` applied to its bytes.
fn patched(src: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read(src).unwrap();
    f(&mut b);
    let p = src.with_file_name(name);
    std::fs::write(&p, b).unwrap();
    p
}

/// Asserts `vdiskfs info` fails on one line naming the file, quickly and
/// within 512 MiB of address space.
fn assert_cli_refuses(p: &Path, needle: &str) {
    let out = std::process::Command::new("timeout")
        .args(["20", "prlimit", "--as=536870912", "--"])
        .arg(common::fuse::bin())
        .arg("info")
        .arg(p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}: {err}", p.display());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let name = p.file_name().unwrap().to_str().unwrap();
    assert!(err.contains(name) && err.contains(needle), "{err}");
}

#[test]
fn hostile_images() {
    let d = scratch();
    let dynamic = d.path().join("dyn.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&dynamic), "10M"]);
    qemu_io("vpc", &dynamic, &["write -P 0x61 0 6M"]);
    let fixed = d.path().join("fixed.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        s(&fixed),
        "4M",
    ]);
    let bytes = std::fs::read(&dynamic).unwrap();
    let bat_at = u64::from_be_bytes(bytes[512 + 16..512 + 24].try_into().unwrap()) as usize;

    // Checksums: footer copy, fixed footer, dynamic header.
    let p = patched(&dynamic, "badsum.vhd", |b| b[40] ^= 1);
    assert_cli_refuses(&p, "checksum");
    let p = patched(&fixed, "badsum-fixed.vhd", |b| {
        let n = b.len();
        b[n - 512 + 40] ^= 1
    });
    assert_cli_refuses(&p, "checksum");
    let p = patched(&dynamic, "badsum-dyn.vhd", |b| b[512 + 30] ^= 1);
    assert_cli_refuses(&p, "checksum");

    // Dynamic-header fields, resealed so only the field is wrong.
    let dyn_patch = |name: &str, f: &dyn Fn(&mut [u8])| {
        patched(&dynamic, name, |b| {
            f(&mut b[512..1536]);
            seal(b, 512, 1024, 36);
        })
    };
    let p = dyn_patch("bat-past-eof.vhd", &|h| put64(h, 16, 1 << 40));
    assert_cli_refuses(&p, "past the end");
    let p = dyn_patch("block-zero.vhd", &|h| put32(h, 32, 0));
    assert_cli_refuses(&p, "block size");
    let p = dyn_patch("block-odd.vhd", &|h| put32(h, 32, 3 << 20));
    assert_cli_refuses(&p, "block size");
    let p = dyn_patch("too-few-entries.vhd", &|h| put32(h, 28, 2));
    assert_cli_refuses(&p, "BAT");
    // A huge max_table_entries: only the entries the disk needs are read.
    let p = dyn_patch("huge-entries.vhd", &|h| put32(h, 28, u32::MAX));
    let chain = open(&p).unwrap();
    assert_eq!(
        read_all(&chain, 1 << 20).unwrap(),
        qemu_raw(&dynamic, Some("vpc"))
    );
    // An absurd (2 GiB) block size: one entry, its block past the end of
    // the file fails that read only, nothing is allocated for it.
    let p = dyn_patch("block-2g.vhd", &|h| put32(h, 32, 1 << 31));
    if let Ok(chain) = open(&p) {
        let mut buf = vec![0u8; 4096];
        let _ = chain.read_at(&mut buf, 0);
    }
    // A 2040 GiB disk with 512-byte blocks needs a 16 GiB BAT: refused
    // before any allocation.
    let p = patched(&dynamic, "huge-bat.vhd", |b| {
        put64(b, 48, 0xff00_0000 * 512);
        b[28..32].copy_from_slice(b"win ");
        seal(b, 0, 512, 64);
        put32(&mut b[512..1536], 32, 512);
        put32(&mut b[512..1536], 28, u32::MAX);
        seal(b, 512, 1024, 36);
    });
    assert_cli_refuses(&p, "BAT");
    // Bigger than the format allows.
    let p = patched(&dynamic, "too-big.vhd", |b| {
        put64(b, 48, 1 << 50);
        b[28..32].copy_from_slice(b"win ");
        seal(b, 0, 512, 64);
    });
    assert_cli_refuses(&p, "2040 GiB");
    // A fixed disk whose footer claims more than the file holds.
    let p = patched(&fixed, "fixed-short.vhd", |b| {
        let n = b.len();
        let f = &mut b[n - 512..];
        f[28..32].copy_from_slice(b"win ");
        put64(f, 48, 1 << 30);
        seal(f, 0, 512, 64);
    });
    assert_cli_refuses(&p, "fixed VHD");
    // A dynamic footer at the end only (no copy at 0) is not served as raw.
    let p = patched(&dynamic, "no-head-copy.vhd", |b| b[0..512].fill(0));
    let e = open_with(
        &p,
        ChainOptions {
            format: Some(Format::Vhd),
            ..Default::default()
        },
    );
    assert!(e.is_err());

    // A BAT entry past the end of the file: EIO on that block only.
    let p = patched(&dynamic, "entry-past-eof.vhd", |b| {
        put32(b, bat_at + 4, 0x7fff_0000);
    });
    let chain = open(&p).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = chain.read_at(&mut buf, (2 << 20) + 4096).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(e.to_string().contains("BAT entry 1"), "{e}");
    chain.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0x61));
    chain.read_at(&mut buf, 4 << 20).unwrap();
    assert!(buf.iter().all(|&x| x == 0x61));
    let out = vdiskfs(&["info", s(&p)]);
    assert!(
        out.status.success(),
        "info of a damaged BAT entry still reports"
    );
}

// ---- Through FUSE, and the --rw refusal -----------------------------------

#[test]
fn fuse_mount_reads_vhd_and_refuses_rw() {
    let d = scratch();
    let p = d.path().join("disk.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&p), "17M"]);
    qemu_io("vpc", &p, &["write -P 0x5a 1M 3M", "write -P 0x11 9M 4k"]);
    let expected = qemu_raw(&p, Some("vpc"));
    let m = Mounted::new(&[&p], &[]);
    let got = std::fs::read(m.file("disk.raw")).unwrap();
    assert!(got == expected, "FUSE read differs from qemu-img convert");
    m.unmount();
    match Mounted::try_new(&[&p], &["--rw"]) {
        Ok(_) => panic!("--rw on a VHD was accepted"),
        Err(msg) => {
            assert!(
                msg.contains("--overlay") && msg.contains("disk.vhd"),
                "{msg}"
            );
            assert_eq!(msg.trim().lines().count(), 1, "{msg}");
        }
    }
    // --overlay over a VHD takes the writes; the VHD is unchanged.
    let before = std::fs::read(&p).unwrap();
    let ov = d.path().join("ov.qcow2");
    let m = Mounted::new(&[&p], &["--overlay", s(&ov)]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.file("disk.raw"))
            .unwrap();
        f.write_all_at(b"hello", 3 << 20).unwrap();
        f.sync_all().unwrap();
        let mut back = [0u8; 6];
        f.read_exact_at(&mut back, 3 << 20).unwrap();
        assert_eq!(&back, b"hello\x5a");
    }
    m.unmount();
    assert!(
        std::fs::read(&p).unwrap() == before,
        "the VHD changed under --overlay"
    );
    let mut expected = expected;
    expected[3 << 20..(3 << 20) + 5].copy_from_slice(b"hello");
    assert!(qemu_raw(&ov, Some("qcow2")) == expected, "overlay content");
}

/// A small in-process fuzzer: headers, BATs, locators and bitmaps of real
/// and hand-built VHDs mutated at random (checksums resealed half the
/// time, so mutations get past them), opened and read through the fuzz
/// entry points. None may panic or take long.
#[test]
fn mutated_images_never_panic() {
    use vdiskfs::fuzzing::{open_and_read, open_layer};
    let d = scratch();
    let dynamic = d.path().join("dyn.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&dynamic), "3M"]);
    qemu_io(
        "vpc",
        &dynamic,
        &["write -P 0x61 0 40k", "write -P 0x62 2M 4k"],
    );
    let fixed = d.path().join("fixed.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        s(&fixed),
        "256k",
    ]);
    let mut oracle = vec![0u8; 1 << 20];
    let child = d.path().join("child.vhd");
    let diff = Diff {
        uuid: [0x55; 16],
        parent_uuid: [0x66; 16],
        size: 1 << 20,
        locators: vec![w2ru(".\\p.vhd"), (b"MacX", b"file:///p.vhd".to_vec())],
        parent_name: "p.vhd".into(),
    };
    build_diff(&child, &diff, &mut oracle, 1);
    let mut rng = Rng::new(0x5eed);
    let started = std::time::Instant::now();
    for img in [&dynamic, &fixed, &child] {
        let orig = std::fs::read(img).unwrap();
        let n = orig.len();
        for _ in 0..400 {
            let mut b = orig.clone();
            for _ in 0..1 + rng.below(4) {
                // Mostly the metadata: the first 4 KiB and the footer.
                let at = match rng.below(3) {
                    0 => rng.below(1536) as usize,
                    1 => n - 512 + rng.below(512) as usize,
                    _ => rng.below(n as u64) as usize,
                };
                b[at] = match rng.below(3) {
                    0 => 0xff,
                    1 => 0,
                    _ => rng.next() as u8,
                };
            }
            if rng.below(2) == 0 {
                seal(&mut b, 0, 512, 64);
                seal(&mut b, n - 512, 512, 64);
                seal(&mut b, 512, 1024, 36);
            }
            open_layer(&b, Format::Vhd);
            open_and_read(&b, Some(Format::Vhd), &[]);
            open_and_read(&b, None, &b[..64]);
        }
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
}
