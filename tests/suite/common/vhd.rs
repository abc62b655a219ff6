//! VHD test helpers: opening and comparing, qemu-io writes, and a
//! builder of differencing VHDs (qemu cannot create them) with its oracle.

use std::path::{Path, PathBuf};

use super::rng::Rng;
use super::{qemu_img, qemu_io, qemu_raw, read_all};
use vdiskfs::cache::Caches;
use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::format::vhd::footer::checksum;
use vdiskfs::format::Format;

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

pub fn open_with(p: &Path, opts: ChainOptions) -> vdiskfs::Result<Chain> {
    Chain::open(p, &opts, &Caches::new(64 << 20))
}

pub fn open(p: &Path) -> vdiskfs::Result<Chain> {
    open_with(p, ChainOptions::default())
}

pub fn open_err(p: &Path) -> vdiskfs::Error {
    match open(p) {
        Ok(_) => panic!("{} opened, expected an error", p.display()),
        Err(e) => e,
    }
}

/// Reads the disk whole, in odd pieces, and at random spots, comparing
/// with `expected`.
pub fn assert_reads(chain: &Chain, expected: &[u8], what: &str) {
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
pub fn assert_matches_qemu_vpc(p: &Path) {
    let expected = qemu_raw(p, Some("vpc"));
    let chain = open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    assert_eq!(chain.layers()[0].format(), Format::Vhd);
    assert_reads(&chain, &expected, s(p));
}

/// qemu-io writes at seeded random offsets (some crossing 2 MiB blocks).
pub fn random_writes(p: &Path, size: u64, seed: u64) {
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

/// Patterned bytes: data, zero runs and repeated bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
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

// ---- Hand-built differencing disks ----------------------------------------
//
// qemu cannot create differencing VHDs (and reads them as if they had no
// parent), so these tests write the bytes themselves, following the VHD
// specification: footer copy at 0, dynamic header at 512, parent locator
// blobs, the BAT, blocks (sector bitmap, then data), footer at the end.
// The oracle is built alongside: the parent's bytes (from qemu-img
// convert), overwritten by every child sector whose bitmap bit is set.

pub const BLOCK: usize = 64 << 10;

pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Sets the checksum of the footer or dynamic header at `at` (`len` bytes,
/// checksum field at `field`).
pub fn seal(b: &mut [u8], at: usize, len: usize, field: usize) {
    let c = checksum(&b[at..at + len], field);
    put32(b, at + field, c);
}

/// The footer (512 bytes, at its end) of a VHD file.
pub fn footer_of(p: &Path) -> Vec<u8> {
    let b = std::fs::read(p).unwrap();
    b[b.len() - 512..].to_vec()
}

pub struct Diff {
    pub uuid: [u8; 16],
    pub parent_uuid: [u8; 16],
    pub size: u64,
    pub locators: Vec<(&'static [u8; 4], Vec<u8>)>,
    pub parent_name: String,
}

pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Writes a differencing VHD at `p` whose blocks hold random data with
/// random bitmaps, and applies it to `oracle` (the parent's content).
pub fn build_diff(p: &Path, diff: &Diff, oracle: &mut [u8], seed: u64) {
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
pub fn uuid_of(footer: &[u8]) -> [u8; 16] {
    footer[68..84].try_into().unwrap()
}

/// A dynamic VHD parent made by qemu, with data everywhere, and its bytes.
pub fn parent(dir: &Path, name: &str, size: &str) -> (PathBuf, Vec<u8>) {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "vpc", s(&p), size]);
    let vsize = open(&p).unwrap().size();
    random_writes(&p, vsize, 99);
    let raw = qemu_raw(&p, Some("vpc"));
    (p, raw)
}

pub fn w2ru(name: &str) -> (&'static [u8; 4], Vec<u8>) {
    (b"W2ru", utf16le(name))
}

pub fn uuid_text(id: &[u8; 16]) -> String {
    vdiskfs::format::vhd::footer::uuid_string(id)
}

/// A fixed VHD with `data`, creator 'win ' (sized by current_size), and
/// the unique id `uuid`.
pub fn fixed_vhd(p: &Path, data: &[u8], uuid: [u8; 16]) {
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

/// A copy of `src` with `f` applied to its bytes.
pub fn patched(src: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read(src).unwrap();
    f(&mut b);
    let p = src.with_file_name(name);
    std::fs::write(&p, b).unwrap();
    p
}
