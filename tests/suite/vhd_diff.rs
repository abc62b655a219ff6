//! Differencing VHDs: chains built byte by byte (qemu cannot create
//! them) against a hand-built oracle, parent locators of each kind, the
//! parent UUID check, a missing parent, and the real Windows diskpart
//! differencing disk of MANIFEST-next over a stand-in parent.

use crate::common;
use common::qemu_img_line;

use common::fuse::vdiskfs;
use common::vhd::*;
use common::{qemu_raw, read_all, scratch, testdata};
use vdiskfs::chain::ChainOptions;
use vdiskfs::ErrorKind;

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
    // An absolute MacX URL (percent-encoded) that does not exist here:
    // the parent is found by its file name beside the child.
    let mac = d.path().join("mac child.vhd");
    let mut mac_oracle = read_all(&open(&mid).unwrap(), 1 << 20).unwrap();
    let mac_diff = Diff {
        uuid: [0x23; 16],
        parent_uuid: [0x11; 16],
        size,
        locators: vec![(
            b"MacX",
            b"file://localhost/Volumes/VMs%20old/mid.vhd".to_vec(),
        )],
        parent_name: String::new(),
    };
    build_diff(&mac, &mac_diff, &mut mac_oracle, 7);
    let chain = open(&mac).unwrap();
    assert_eq!(chain.layers()[1].path(), mid.as_path());
    assert_reads(
        &chain,
        &mac_oracle,
        "parent found through an absolute MacX URL",
    );
    // Over a fixed parent, found by its absolute W2ku name's file name.
    let fixed = d.path().join("fixed.vhd");
    qemu_img_line(&format!(
        "convert -f vpc -O vpc -o subformat=fixed {} {}",
        s(&base),
        s(&fixed)
    ));
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
fn sector_bitmaps_are_read_msb_first_as_windows_writes_them() {
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
