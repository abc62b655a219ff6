//! Metadata overlap protection: crafted images whose tables point guest
//! data at their own metadata. The write must fail with EIO before a byte
//! is written, every metadata byte must stay as it was, and a qcow2 v3
//! image must be flagged corrupt the way qemu flags it (`qemu-img info`
//! and `qemu-img check` say so); it then opens for reading only.

use crate::common;
use common::qemu_img_line;
use common::try_open_rw;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fuse::Mounted;
use common::{qemu_img, qemu_io, scratch};
use vdiskfs::ErrorKind;

fn be64(f: &std::fs::File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

fn le32(f: &std::fs::File, at: u64) -> u32 {
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, at).unwrap();
    u32::from_le_bytes(b)
}

fn rw(p: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap()
}

/// A v3 qcow2 (64 KiB clusters) with guest cluster 0 allocated.
fn qcow2(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img_line(&format!(
        "create -q -f qcow2 -o compat=1.1 {} 4M",
        p.to_str().unwrap()
    ));
    qemu_io("qcow2", &p, &["write -P 0x11 0 64k"]);
    p
}

/// Where the structure named `target` lies in a fresh `qcow2()` image.
fn qcow2_target(f: &std::fs::File, target: &str) -> u64 {
    let l1 = be64(f, 40);
    match target {
        "refcount table" => be64(f, 48),
        "active L1 table" => l1,
        "active L2 table" => be64(f, l1) & 0x00ff_ffff_ffff_fe00,
        other => panic!("{other}"),
    }
}

/// Points the L2 entry of guest cluster 0 at `host` (flagged COPIED).
fn point_l2_entry(f: &std::fs::File, host: u64) {
    let l2 = be64(f, be64(f, 40)) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&(host | 1 << 63).to_be_bytes(), l2).unwrap();
}

/// Panics naming the first differing byte of two equal-length ranges.
fn same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        let n = a.iter().zip(b).filter(|(x, y)| x != y).count();
        panic!("{what}: {n} bytes differ, the first at {i:#x}");
    }
}

/// Asserts the image bytes are `before` except the incompatible-features
/// field (bytes 72..80), which must now carry the corrupt bit.
fn assert_only_corrupt_bit_changed(img: &Path, before: &[u8]) {
    let after = std::fs::read(img).unwrap();
    assert_eq!(after.len(), before.len(), "the image grew");
    same(&after[..72], &before[..72], "header");
    same(
        &after[80..],
        &before[80..],
        "image bytes past the feature field",
    );
    let inc = u64::from_be_bytes(after[72..80].try_into().unwrap());
    assert_eq!(inc & 2, 2, "corrupt bit not set");
}

/// `qemu-img info` says corrupt, `qemu-img check` refuses or reports it,
/// a writable open is refused with a one-line message, reading works.
fn assert_flagged_corrupt(img: &Path) {
    let info = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        v["format-specific"]["data"]["corrupt"],
        serde_json::Value::Bool(true),
        "{info}"
    );
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "qemu-img check passed a corrupt image"
    );
    let msg = match try_open_rw(img) {
        Ok(_) => panic!("a writable open of an image marked corrupt succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("marked corrupt") && !msg.contains('\n'),
        "{msg}"
    );
    common::open_chain(img).expect("reading a corrupt-flagged image");
}

#[test]
fn qcow2_l2_entry_pointing_at_metadata_fails_with_eio_and_flags_corrupt() {
    let d = scratch();
    for (n, target) in ["refcount table", "active L1 table", "active L2 table"]
        .into_iter()
        .enumerate()
    {
        let img = qcow2(d.path(), &format!("t{n}.qcow2"));
        let f = rw(&img);
        let host = qcow2_target(&f, target);
        point_l2_entry(&f, host);
        let before = std::fs::read(&img).unwrap();
        let chain = try_open_rw(&img).unwrap();
        let e = chain.write_at(&[0xee; 4096], 0).unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{target}: {e}");
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains(target), "{target}: {e}");
        // Any later write is refused as well; nothing more is written.
        assert!(chain.write_at(&[1; 512], 1 << 20).is_err());
        assert!(chain.write_zeroes(0, 65536).is_err());
        drop(chain);
        assert_only_corrupt_bit_changed(&img, &before);
        assert_flagged_corrupt(&img);
    }
}

/// The header case: the refcount of cluster 0 (the header) is cleared, so
/// the allocator would hand the header out as free space.
#[test]
fn qcow2_header_handed_out_as_free_space_is_refused() {
    let d = scratch();
    let img = qcow2(d.path(), "h.qcow2");
    let f = rw(&img);
    let rt = be64(&f, 48);
    let block = be64(&f, rt);
    f.write_all_at(&[0, 0], block).unwrap(); // 16-bit refcount of cluster 0
    let before = std::fs::read(&img).unwrap();
    let chain = try_open_rw(&img).unwrap();
    let e = chain.write_at(&[0xee; 4096], 2 << 20).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(e.to_string().contains("header"), "{e}");
    drop(chain);
    assert_only_corrupt_bit_changed(&img, &before);
    assert_flagged_corrupt(&img);
}

#[test]
fn qcow2_overlap_through_an_rw_mount_is_eio() {
    let d = scratch();
    let img = qcow2(d.path(), "m.qcow2");
    let f = rw(&img);
    point_l2_entry(&f, qcow2_target(&f, "refcount table"));
    let before = std::fs::read(&img).unwrap();
    let m = Mounted::new(&[&img], &["--rw"]);
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(m.file("m.raw"))
        .unwrap();
    let r = disk
        .write_all_at(&[0xee; 4096], 0)
        .and_then(|()| disk.sync_data());
    let e = r.expect_err("a write over the refcount table succeeded");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    drop(disk);
    m.unmount();
    assert_only_corrupt_bit_changed(&img, &before);
    assert_flagged_corrupt(&img);
}

#[test]
fn qcow_v1_l2_entry_pointing_at_its_own_l2_table_fails_with_eio() {
    let d = scratch();
    let img = d.path().join("v1.qcow");
    qemu_img(&["create", "-q", "-f", "qcow", img.to_str().unwrap(), "4M"]);
    qemu_io("qcow", &img, &["write -P 0x11 0 4k"]);
    let f = rw(&img);
    let l1 = be64(&f, 40);
    let l2 = be64(&f, l1);
    // The entry points at its own table (L1 sits unaligned at 0x30).
    f.write_all_at(&l2.to_be_bytes(), l2).unwrap();
    let before = std::fs::read(&img).unwrap();
    let chain = try_open_rw(&img).unwrap();
    let e = chain.write_at(&[0xee; 4096], 0).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(e.to_string().contains("L2 table"), "{e}");
    assert!(chain.write_zeroes(0, 1 << 20).is_err());
    drop(chain);
    same(&std::fs::read(&img).unwrap(), &before, "the image");
}

#[test]
fn vmdk_grain_table_entry_pointing_at_the_grain_directory_fails_with_eio() {
    let d = scratch();
    let img = d.path().join("s.vmdk");
    qemu_img_line(&format!(
        "create -q -f vmdk -o subformat=monolithicSparse {} 8M",
        img.to_str().unwrap()
    ));
    qemu_io("vmdk", &img, &["write -P 0x11 0 64k"]);
    let f = rw(&img);
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 56).unwrap();
    let gd_sector = u64::from_le_bytes(b);
    let gt_sector = le32(&f, gd_sector * 512);
    f.write_all_at(
        &(gd_sector as u32).to_le_bytes(),
        u64::from(gt_sector) * 512,
    )
    .unwrap();
    let before = std::fs::read(&img).unwrap();
    let chain = try_open_rw(&img).unwrap();
    let e = chain.write_at(&[0xee; 4096], 0).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(e.to_string().contains("grain directory"), "{e}");
    drop(chain);
    // The descriptor's CID may have been renewed before the write; the
    // header, directories and tables are as they were.
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after.len(), before.len());
    same(&after[..512], &before[..512], "header");
    let from = (gd_sector * 512) as usize;
    same(
        &after[from..],
        &before[from..],
        "directories, tables, grains",
    );
}

/// Sets the COPIED flag of the L1 entry of guest cluster 0, so that the
/// writer takes its L2 table as its own (after a snapshot it is shared).
fn claim_l1_entry(f: &std::fs::File) {
    let l1 = be64(f, 40);
    f.write_all_at(&(be64(f, l1) | 1 << 63).to_be_bytes(), l1)
        .unwrap();
}

/// The offset of the bitmap directory named in the header extensions.
fn bitmap_directory(f: &std::fs::File) -> u64 {
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, 100).unwrap();
    let mut at = u64::from(u32::from_be_bytes(b));
    loop {
        f.read_exact_at(&mut b, at).unwrap();
        let kind = u32::from_be_bytes(b);
        f.read_exact_at(&mut b, at + 4).unwrap();
        let len = u64::from(u32::from_be_bytes(b));
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return be64(f, at + 8 + 16);
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// A write landing on a snapshot's L1 table, on the bitmap directory or on
/// a bitmap's table fails like one landing on the active tables; only the
/// feature fields of the header change (the corrupt bit, and the bitmaps
/// autoclear bit the writable open clears).
#[test]
fn qcow2_entries_pointing_at_snapshot_and_bitmap_metadata_fail_with_eio() {
    let d = scratch();
    for target in ["snapshot L1 table", "bitmap directory", "bitmap table"] {
        let img = qcow2(d.path(), &format!("{}.qcow2", target.replace(' ', "_")));
        let s = img.to_str().unwrap();
        if target == "snapshot L1 table" {
            qemu_img(&["snapshot", "-c", "s1", s]);
        } else {
            qemu_img(&["bitmap", "--add", s, "b0"]);
        }
        let f = rw(&img);
        let host = match target {
            "snapshot L1 table" => be64(&f, be64(&f, 64)),
            "bitmap directory" => bitmap_directory(&f),
            _ => be64(&f, bitmap_directory(&f)),
        };
        assert!(host != 0 && host % 65536 == 0, "{target} at {host:#x}");
        claim_l1_entry(&f);
        point_l2_entry(&f, host);
        let before = std::fs::read(&img).unwrap();
        let chain = try_open_rw(&img).unwrap();
        let e = chain.write_at(&[0xee; 4096], 0).unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{target}: {e}");
        assert!(e.to_string().contains(target), "{target}: {e}");
        drop(chain);
        let after = std::fs::read(&img).unwrap();
        assert_eq!(after.len(), before.len(), "{target}: the image grew");
        same(&after[..72], &before[..72], "header");
        same(&after[80..88], &before[80..88], "header");
        same(&after[96..], &before[96..], "image past the header fields");
        assert_eq!(after[79] & 2, 2, "{target}: corrupt bit not set");
        assert_flagged_corrupt(&img);
    }
}
