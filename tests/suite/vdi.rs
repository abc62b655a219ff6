//! VDI (VirtualBox) images: byte-exact against `qemu-img convert -O raw`
//! on static and dynamic images with random qemu-io writes, zero-block
//! entries, differencing images found by UUID, a qcow2 overlay over a
//! VDI, `info` fields, the `--rw` refusal, a FUSE mount, and damaged
//! images (refused or EIO on the damaged block, bounded memory).

use crate::common;
use common::qemu_img_line;

use std::path::{Path, PathBuf};

use common::damage::{
    assert_fails_only_at, copy_of, mutations_never_panic, patch, Damages, Refusal,
};
use common::fuse::{assert_fuse_read_matches_qemu, info_json, Mounted};
use common::{assert_matches_qemu, qemu_img, qemu_io, qemu_raw, read_all, rng::Rng, scratch};
use vdiskfs::format::Format;
use vdiskfs::ErrorKind;

const MIB: u64 = 1 << 20;

fn read_le32(path: &Path, offset: usize) -> u32 {
    let b = std::fs::read(path).unwrap();
    u32::from_le_bytes(b[offset..offset + 4].try_into().unwrap())
}

/// A VDI of `size` bytes with `writes` random pattern writes by qemu-io.
fn vdi(dir: &Path, name: &str, size: u64, fixed: bool, writes: usize, seed: u64) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-f", "vdi"];
    if fixed {
        args.extend(["-o", "static=on"]);
    }
    let s = size.to_string();
    args.extend([p.to_str().unwrap(), s.as_str()]);
    qemu_img(&args);
    let mut rng = Rng::new(seed);
    let cmds: Vec<String> = (0..writes)
        .map(|_| {
            let len = (1 + rng.below(300)) * 512;
            let len = len.min(size);
            let off = rng.below((size - len) / 512 + 1) * 512;
            format!("write -P {} {off} {len}", 1 + rng.below(250))
        })
        .collect();
    if !cmds.is_empty() {
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io("vdi", &p, &refs);
    }
    p
}

#[test]
fn static_and_dynamic_vdi_match_qemu() {
    let d = scratch();
    for (i, (size, fixed, writes)) in [
        (5 * MIB, false, 0),
        (5 * MIB, false, 40),
        (3 * MIB, true, 0),
        (3 * MIB, true, 30),
        (7 * MIB + 512 * 3, false, 60),
        (16 * MIB, false, 200),
    ]
    .into_iter()
    .enumerate()
    {
        let p = vdi(
            d.path(),
            &format!("m{i}.vdi"),
            size,
            fixed,
            writes,
            i as u64 + 1,
        );
        assert_matches_qemu(&p);
    }
    // qemu-img convert -O vdi from a raw file with data.
    let raw = d.path().join("src.raw");
    let mut rng = Rng::new(99);
    let mut data = vec![0u8; (6 * MIB) as usize];
    for chunk in data.chunks_mut(MIB as usize).step_by(2) {
        chunk.copy_from_slice(&rng.bytes(MIB as usize));
    }
    std::fs::write(&raw, &data).unwrap();
    let conv = d.path().join("conv.vdi");
    qemu_img_line(&format!(
        "convert -O vdi {} {}",
        raw.to_str().unwrap(),
        conv.to_str().unwrap()
    ));
    assert_matches_qemu(&conv);
    let chain = common::open_chain(&conv).unwrap();
    assert_eq!(read_all(&chain, 1 << 20).unwrap(), data);
}

#[test]
fn zero_block_entries_read_as_zeros() {
    let d = scratch();
    let p = vdi(d.path(), "z.vdi", 4 * MIB, false, 0, 1);
    qemu_io("vdi", &p, &["write -P 0x33 0 4M"]);
    let map = u64::from(read_le32(&p, 0x154));
    patch(&p, map + 4, &0xffff_fffeu32.to_le_bytes());
    assert_matches_qemu(&p);
    let chain = common::open_chain(&p).unwrap();
    let mut buf = vec![1u8; MIB as usize];
    chain.read_at(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

/// Turns the qemu-made `child` into a differencing image of `parent`.
fn make_diff(child: &Path, parent: &Path) {
    let pb = std::fs::read(parent).unwrap();
    patch(child, 0x4c, &4u32.to_le_bytes());
    patch(child, 0x1a8, &pb[0x188..0x198]);
    patch(child, 0x1b8, &pb[0x198..0x1a8]);
}

#[test]
fn differencing_vdi_finds_its_parent_by_uuid() {
    let d = scratch();
    let size = 8 * MIB;
    let parent = vdi(d.path(), "parent.vdi", size, false, 0, 1);
    qemu_io("vdi", &parent, &["write -P 0xaa 0 8M"]);
    // A decoy with another UUID must not be taken.
    let decoy = vdi(d.path(), "decoy.vdi", size, false, 0, 2);
    qemu_io("vdi", &decoy, &["write -P 0xdd 0 8M"]);
    let child = vdi(d.path(), "child.vdi", size, false, 0, 3);
    qemu_io(
        "vdi",
        &child,
        &["write -P 0x11 1M 1M", "write -P 0x22 5M 512k"],
    );
    let child_raw = qemu_raw(&child, Some("vdi"));
    let parent_raw = qemu_raw(&parent, Some("vdi"));
    let map = u64::from(read_le32(&child, 0x154));
    // Block 3 reads as zeros, hiding the parent.
    patch(&child, map + 3 * 4, &0xffff_fffeu32.to_le_bytes());
    make_diff(&child, &parent);
    let mut expected = parent_raw.clone();
    expected[MIB as usize..2 * MIB as usize]
        .copy_from_slice(&child_raw[MIB as usize..2 * MIB as usize]);
    expected[5 * MIB as usize..6 * MIB as usize]
        .copy_from_slice(&child_raw[5 * MIB as usize..6 * MIB as usize]);
    expected[3 * MIB as usize..4 * MIB as usize].fill(0);
    let chain = common::open_chain(&child).unwrap();
    assert_eq!(chain.layers().len(), 2);
    assert_eq!(chain.layers()[1].path(), d.path().join("parent.vdi"));
    let got = read_all(&chain, 300_000).unwrap();
    assert!(
        got == expected,
        "differencing VDI differs from parent+child"
    );
    // info names the parent and its UUID.
    let (_, text) = info_json(&child);
    assert!(text.contains("\"parent_file\":\"parent.vdi\""), "{text}");
    assert!(text.contains("\"subformat\":\"diff\""), "{text}");
    // The parent gone: refused, naming the UUID, not read as zeros.
    std::fs::rename(&parent, d.path().join("parent.vdi.moved")).unwrap();
    let e = common::open_chain(&child).err().expect("must be refused");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("parent UUID"), "{e}");
    assert!(!e.to_string().contains('\n'));
}

#[test]
fn qcow2_overlay_over_a_vdi() {
    let d = scratch();
    let base = vdi(d.path(), "base.vdi", 6 * MIB, false, 50, 7);
    common::assert_qcow2_overlay_over(
        &base,
        "vdi",
        &["write -P 0x77 1000k 300k", "write -z 3M 1M"],
    );
}

#[test]
fn vdi_info_and_fuse_mount() {
    let d = scratch();
    let p = vdi(d.path(), "f.vdi", 5 * MIB, false, 30, 11);
    let (v, text) = info_json(&p);
    assert_eq!(v["format"], "vdi");
    assert_eq!(v["virtual_size"], 5 * MIB);
    for key in [
        "\"uuid\"",
        "\"modify_uuid\"",
        "\"block_size\":1048576",
        "\"image_type\":\"normal\"",
        "\"sector_size\":512",
    ] {
        assert!(text.contains(key), "info lacks {key}: {text}");
    }
    // In-place writes are tested in tests/vhd_vdi_write.rs.
    let name = assert_fuse_read_matches_qemu(&p);
    // --snapshot accepts writes over it and leaves it unchanged.
    let before = common::sha256_file(&p);
    let m = Mounted::new(&[&p], &["--snapshot"]);
    let f = m.file(&name);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .map(|file| {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&[0x5a; 4096], 4096).unwrap();
        })
        .unwrap();
    let back = std::fs::read(&f).unwrap();
    assert!(back[4096..8192].iter().all(|&b| b == 0x5a));
    m.unmount();
    assert_eq!(common::sha256_file(&p), before);
}

#[test]
fn damaged_vdi_is_refused_or_fails_only_the_damaged_block() {
    let d = scratch();
    let base = vdi(d.path(), "base.vdi", 4 * MIB, false, 0, 1);
    qemu_io("vdi", &base, &["write -P 0x44 0 4M"]);
    use ErrorKind::{Corrupt, Unsupported};
    let cases = Damages {
        base: &base,
        dir: d.path(),
        format: None,
    };
    cases.cut("trunc.vdi", 0x100, Corrupt, "truncated");
    #[rustfmt::skip]
    let rows: [Refusal; 5] = [
        ("v10.vdi", 0x44, &0x0001_0000u32.to_le_bytes(), Unsupported, "1.0"),
        ("bs0.vdi", 0x178, &0u32.to_le_bytes(), Corrupt, "block size"),
        ("hugecount.vdi", 0x180, &0xffff_fff0u32.to_le_bytes(), Corrupt, "block map"),
        ("hugesize.vdi", 0x170, &(1u64 << 60).to_le_bytes(), Corrupt, "too few"),
        ("type9.vdi", 0x4c, &9u32.to_le_bytes(), Corrupt, "image type"),
    ];
    cases.refused(&rows);
    // A block map entry far past the end: EIO on that block only.
    let p = copy_of(&base, d.path(), "past.vdi");
    let map = u64::from(read_le32(&p, 0x154));
    patch(&p, map + 2 * 4, &0x00ff_ffffu32.to_le_bytes());
    let chain = common::open_chain(&p).unwrap();
    assert_fails_only_at(&chain, 2 * MIB + 4096, &[MIB, 3 * MIB], 0x44);
}

#[test]
fn random_header_and_map_mutations_never_panic() {
    let d = scratch();
    let p = vdi(d.path(), "seed.vdi", 4 * MIB, false, 20, 4);
    let seed = std::fs::read(&p).unwrap();
    mutations_never_panic(&seed, 0x200 + 4 * 4, 77, Format::Vdi);
}
