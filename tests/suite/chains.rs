//! Backing chains mixing formats, compared byte for byte with qemu through
//! the library and through a real FUSE mount: qcow2 over a VMDK delta chain,
//! VMDK over VMDK, qcow over qcow2 and VMDK, qcow2 over qcow, and overlays
//! and snapshots over every base format.

use crate::common;

use std::path::{Path, PathBuf};

use common::fuse::Mounted;
use common::{assert_matches_qemu, qemu_img, qemu_io, qemu_raw, scratch};

/// Creates `name` of `fmt` (size `size`) over `backing` of `bfmt`, and
/// writes a pattern at `at`.
fn layer(
    dir: &Path,
    name: &str,
    fmt: &str,
    backing: Option<(&str, &str)>,
    size: &str,
    at: &str,
    pat: u8,
) -> PathBuf {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    let mut args = vec!["create", "-f", fmt];
    if let Some((b, bf)) = backing {
        args.extend(["-b", b, "-F", bf]);
    }
    if fmt == "vmdk" {
        args.extend(["-o", "subformat=monolithicSparse"]);
    }
    args.push(ps);
    args.push(size);
    qemu_img(&args);
    qemu_io(fmt, &p, &[&format!("write -P {pat} {at} 512k")]);
    p
}

fn check(top: &Path) {
    assert_matches_qemu(top);
    let m = Mounted::new(&[top], &[]);
    let name = vdiskfs::cli::exposed_name(top).unwrap();
    let got = std::fs::read(m.file(name.to_str().unwrap())).unwrap();
    common::assert_same(&got, &qemu_raw(top, None), top, 0);
    m.unmount();
}

#[test]
fn qcow2_over_vmdk_delta_over_vmdk() {
    // qemu gives VMDK children VMDK parents only; the qcow2 on top may name any format.
    let d = scratch();
    layer(d.path(), "p.vmdk", "vmdk", None, "4M", "1M", 0x22);
    layer(
        d.path(),
        "v.vmdk",
        "vmdk",
        Some(("p.vmdk", "vmdk")),
        "4M",
        "2M",
        0x33,
    );
    let top = layer(
        d.path(),
        "t.qcow2",
        "qcow2",
        Some(("v.vmdk", "vmdk")),
        "6M",
        "3M",
        0x44,
    );
    check(&top);
}

#[test]
fn vmdk_delta_over_vmdk_made_by_qemu_img() {
    let d = scratch();
    layer(d.path(), "parent.vmdk", "vmdk", None, "4M", "0", 0x55);
    let child = layer(
        d.path(),
        "child.vmdk",
        "vmdk",
        Some(("parent.vmdk", "vmdk")),
        "4M",
        "1M",
        0x66,
    );
    check(&child);
}

#[test]
fn qcow_over_qcow2_and_over_vmdk() {
    let d = scratch();
    layer(d.path(), "q2.qcow2", "qcow2", None, "2M", "0", 0x77);
    let top = layer(
        d.path(),
        "a.qcow",
        "qcow",
        Some(("q2.qcow2", "qcow2")),
        "2M",
        "1M",
        0x78,
    );
    check(&top);
    layer(d.path(), "v.vmdk", "vmdk", None, "2M", "0", 0x79);
    let top = layer(
        d.path(),
        "b.qcow",
        "qcow",
        Some(("v.vmdk", "vmdk")),
        "2M",
        "1M",
        0x7a,
    );
    check(&top);
}

#[test]
fn qcow2_and_vmdk_over_qcow() {
    let d = scratch();
    layer(d.path(), "old.qcow", "qcow", None, "2M", "0", 0x21);
    let top = layer(
        d.path(),
        "new.qcow2",
        "qcow2",
        Some(("old.qcow", "qcow")),
        "3M",
        "1M",
        0x31,
    );
    check(&top);
}

#[test]
fn overlay_and_snapshot_over_every_base_format() {
    use std::os::unix::fs::FileExt;
    let d = scratch();
    let bases = [
        layer(d.path(), "b1.qcow", "qcow", None, "2M", "0", 0x41),
        layer(d.path(), "b2.qcow2", "qcow2", None, "2M", "0", 0x42),
        layer(d.path(), "b3.vmdk", "vmdk", None, "2M", "0", 0x43),
    ];
    for base in &bases {
        let before = std::fs::read(base).unwrap();
        for mode in ["--overlay", "--snapshot"] {
            let ov = d.path().join(format!(
                "ov-{}.qcow2",
                base.file_name().unwrap().to_string_lossy()
            ));
            let ovs = ov.to_str().unwrap().to_string();
            let opts: Vec<&str> = if mode == "--overlay" {
                vec![mode, &ovs]
            } else {
                vec![mode]
            };
            let m = Mounted::new(&[base], &opts);
            let name = vdiskfs::cli::exposed_name(base).unwrap();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(m.file(name.to_str().unwrap()))
                .unwrap();
            f.write_all_at(&[0xee; 3000], 700_000).unwrap();
            f.sync_all().unwrap();
            let mut buf = vec![0u8; 4096];
            f.read_exact_at(&mut buf, 699_000).unwrap();
            assert!(buf[..1000]
                .iter()
                .all(|&b| b == 0x41 || b == 0x42 || b == 0x43 || b == 0));
            assert!(buf[1000..4000].iter().all(|&b| b == 0xee));
            drop(f);
            m.unmount();
            if mode == "--overlay" {
                let raw = qemu_raw(&ov, None);
                assert!(raw[700_000..703_000].iter().all(|&b| b == 0xee));
            }
        }
        assert!(
            std::fs::read(base).unwrap() == before,
            "{} changed",
            base.display()
        );
    }
}
