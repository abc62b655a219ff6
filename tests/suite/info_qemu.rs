//! `vdiskfs info --output=json [--backing-chain]` against `qemu-img info
//! --output=json [--backing-chain]` on the same images, key by key: a
//! script written for qemu-img's JSON reads ours.
//!
//! Keys qemu prints that we intentionally do not produce, and why:
//! - `encrypted`: qemu prints it only for encrypted images, which vdiskfs
//!   refuses to open (it does not decrypt).
//! - `backing-image`: part of qemu's schema, but `qemu-img info` never
//!   fills it (it lists the chain with `--backing-chain`); neither do we.
//!
//! Where qemu itself is wrong, the test passes qemu what it needs:
//! - a fixed VHD has its footer only at the end, and qemu-img probes it as
//!   `raw` (reporting the footer as guest data); we detect it as `vpc`, so
//!   qemu is given `-f vpc` for it.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::fuse::bin;
use common::{qemu_img, require_tool, scratch, testdata};
use serde_json::Value;

/// Runs a command in `dir`, panicking with its output when it fails.
fn run_in(dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Compares `ours` with `qemu` key by key (both ways), collecting every
/// difference as `path: ours vs qemu`.
fn diff(path: &str, ours: &Value, qemu: &Value, out: &mut Vec<String>) {
    match (ours, qemu) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, qv) in b {
                match a.get(k) {
                    Some(av) => diff(&format!("{path}.{k}"), av, qv, out),
                    None => out.push(format!("{path}.{k}: missing (qemu: {qv})")),
                }
            }
            for k in a.keys().filter(|k| !b.contains_key(*k)) {
                out.push(format!("{path}.{k}: not printed by qemu"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (av, bv)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), av, bv, out);
            }
        }
        _ if ours == qemu => {}
        _ => out.push(format!("{path}: ours {ours} vs qemu {qemu}")),
    }
}

/// Compares both forms (single object and `--backing-chain` list) for
/// `image` (relative to `dir`); `qemu_fmt` is passed to qemu-img as `-f`.
fn compare(dir: &Path, image: &str, qemu_fmt: Option<&str>, problems: &mut Vec<String>) {
    for chain in [false, true] {
        let mut qargs = vec!["info", "--output=json"];
        let mut oargs = vec!["info", "--output=json"];
        if chain {
            qargs.push("--backing-chain");
            oargs.push("--backing-chain");
        }
        if let Some(f) = qemu_fmt {
            qargs.extend(["-f", f]);
        }
        qargs.push(image);
        oargs.push(image);
        let qemu: Value = serde_json::from_str(&run_in(dir, "qemu-img", &qargs)).unwrap();
        let ours: Value = serde_json::from_str(&run_in(dir, bin(), &oargs))
            .unwrap_or_else(|e| panic!("{image}: our output is not JSON: {e}"));
        let mut d = Vec::new();
        diff("", &ours, &qemu, &mut d);
        let form = if chain { " --backing-chain" } else { "" };
        problems.extend(d.into_iter().map(|p| format!("{image}{form}: {p}")));
    }
}

#[test]
fn info_json_matches_qemu_img_key_by_key() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    let tmp = scratch();
    let d = tmp.path();
    let create = |args: &[&str]| {
        let mut a = vec!["create", "-q"];
        a.extend_from_slice(args);
        run_in(d, "qemu-img", &a);
    };
    let write = |fmt: &str, img: &str, cmd: &str| {
        run_in(d, "qemu-io", &["-f", fmt, "-c", cmd, img]);
    };
    // qcow2 over qcow2 over raw, each with data.
    create(&["-f", "raw", "base.raw", "64M"]);
    run_in(
        d,
        "sh",
        &[
            "-c",
            "printf 'base' | dd of=base.raw bs=1 seek=1048576 conv=notrunc status=none",
        ],
    );
    create(&["-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2"]);
    write("qcow2", "mid.qcow2", "write -P 2 2M 128k");
    create(&["-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"]);
    write("qcow2", "top.qcow2", "write -P 3 0 64k");
    write("qcow2", "top.qcow2", "write -z 4M 64k");
    // qcow2 v2, and v3 with lazy refcounts, zstd, extended L2.
    create(&["-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "8M"]);
    create(&[
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,compression_type=zstd,extended_l2=on,cluster_size=128k",
        "feat.qcow2",
        "8M",
    ]);
    // A qcow2 with a backing file named without its format.
    let noformat: Vec<&str> = "-f qcow2 -b base.raw -F raw noformat.qcow2"
        .split_whitespace()
        .collect();
    create(&noformat);
    // VMDK: sparse, stream, flat, split, and a sparse child of a sparse parent.
    for sub in [
        "monolithicSparse",
        "streamOptimized",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
    ] {
        create(&[
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            &format!("{sub}.vmdk"),
            "16M",
        ]);
    }
    write("vmdk", "monolithicSparse.vmdk", "write -P 5 0 1M");
    create(&[
        "-f",
        "vmdk",
        "-b",
        "monolithicSparse.vmdk",
        "-F",
        "vmdk",
        "child.vmdk",
    ]);
    write("vmdk", "child.vmdk", "write -P 6 512k 64k");
    // raw, VHD dynamic and fixed, VHDX, VDI, qcow, parallels.
    create(&["-f", "raw", "sparse.raw", "16M"]);
    write("raw", "sparse.raw", "write -P 7 1M 64k");
    create(&["-f", "vpc", "dynamic.vhd", "16M"]);
    write("vpc", "dynamic.vhd", "write -P 8 0 64k");
    create(&["-f", "vpc", "-o", "subformat=fixed", "fixed.vhd", "16M"]);
    create(&["-f", "vhdx", "img.vhdx", "16M"]);
    write("vhdx", "img.vhdx", "write -P 9 0 64k");
    create(&["-f", "vdi", "img.vdi", "16M"]);
    create(&["-f", "qcow", "img.qcow", "16M"]);
    create(&["-f", "parallels", "img.parallels", "16M"]);

    let mut problems = Vec::new();
    for img in [
        "top.qcow2",
        "v2.qcow2",
        "feat.qcow2",
        "noformat.qcow2",
        "monolithicSparse.vmdk",
        "streamOptimized.vmdk",
        "monolithicFlat.vmdk",
        "twoGbMaxExtentSparse.vmdk",
        "child.vmdk",
        "sparse.raw",
        "dynamic.vhd",
        "img.vhdx",
        "img.vdi",
        "img.qcow",
        "img.parallels",
    ] {
        compare(d, img, None, &mut problems);
    }
    compare(d, "fixed.vhd", Some("vpc"), &mut problems);

    // Real images: internal snapshots, persistent bitmaps, a v2 image, a
    // chain made elsewhere, VMware's own sparse and vmfs.
    let images = testdata().join("images");
    for img in [
        "qcow2-dissect-snapshots.qcow2",
        "qcow2-virtnbdbackup-bitmaps.qcow2",
        "qcow2-dfvfs-v2-compressed-ext2.qcow2",
        "qcow2-dissect-backing-chain/backing-chain-1.qcow2",
        "vmdk-vmdkrs-monolithicSparse.vmdk",
        "vmdk-vmdkrs-vmfs/vmfs_thick.vmdk",
        "vmdk-vmdkrs-streamOptimizedWithMarkers.vmdk",
    ] {
        compare(&images, img, None, &mut problems);
    }
    assert!(
        problems.is_empty(),
        "differences from qemu-img:\n{}",
        problems.join("\n")
    );
    let _ = qemu_img;
}

/// qemu-img's text for `args`, without its `Child node` blocks (the host
/// files, which ours lists only with --verbose).
fn qemu_text(dir: &Path, args: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut child = false;
    for line in run_in(dir, "qemu-img", args).lines() {
        if line.starts_with("Child node") {
            child = true;
        } else if !line.starts_with(' ') {
            child = false;
        }
        if !child {
            out.push(line.to_string());
        }
    }
    out
}

/// Every line of `want` appears in `got`, in the same order.
fn assert_in_order(got: &str, want: &[String], what: &str) {
    let mut lines = got.lines();
    for w in want {
        assert!(
            lines.any(|g| g == w),
            "{what}: line {w:?} of qemu-img info is missing or out of order in ours:\n{got}"
        );
    }
}

#[test]
fn info_text_reads_like_qemu_img() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = scratch();
    let d = tmp.path();
    run_in(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "64M"],
    );
    run_in(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 1M 64k", "base.raw"],
    );
    let q2: Vec<&str> = "create -q -f qcow2 -b base.raw -F raw top.qcow2"
        .split_whitespace()
        .collect();
    run_in(d, "qemu-img", &q2);
    // The whole chain, laid out as qemu-img --backing-chain lays it out.
    let ours = run_in(d, bin(), &["info", "top.qcow2"]);
    let want = qemu_text(d, &["info", "--backing-chain", "top.qcow2"]);
    assert_in_order(&ours, &want, "top.qcow2");
    assert!(
        !ours.contains("l1_table_offset"),
        "raw fields by default:\n{ours}"
    );
    let verbose = run_in(d, bin(), &["info", "--verbose", "top.qcow2"]);
    assert!(verbose.contains("Header fields:") && verbose.contains("l1_table_offset"));
    // A sparse raw image counts what the host stores (as qemu-img map sees
    // it through SEEK_DATA), not its full size.
    let map: Value = serde_json::from_str(&run_in(
        d,
        "qemu-img",
        &["map", "--output=json", "base.raw"],
    ))
    .unwrap();
    let stored: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!((65536..1 << 20).contains(&stored), "{map}");
    let json: Value =
        serde_json::from_str(&run_in(d, bin(), &["info", "--json", "base.raw"])).unwrap();
    assert_eq!(json["allocated_bytes"], stored);
    assert!(
        ours.contains(&format!("({stored} bytes of guest data")),
        "{ours}"
    );

    // Snapshots (table as qemu-img 10 prints it) and bitmaps.
    let images = testdata().join("images");
    for img in [
        "qcow2-dissect-snapshots.qcow2",
        "qcow2-virtnbdbackup-bitmaps.qcow2",
        "vmdk-vmdkrs-twoGbMaxExtentSparse/twoGbMaxExtentSparse.vmdk",
    ] {
        let ours = run_in(&images, bin(), &["info", img]);
        assert_in_order(&ours, &qemu_text(&images, &["info", img]), img);
    }

    // A table of 65,536 (blank) snapshots is summarized, not printed whole.
    let img = "hostile-cdi-qcow2-65536-snapshots-at-offset0.qcow2";
    let ours = run_in(&images, bin(), &["info", img]);
    assert!(ours.lines().count() < 60, "{ours}");
    assert!(
        ours.contains("more snapshots (--verbose lists them all)"),
        "{ours}"
    );
    let all = run_in(&images, bin(), &["info", "-v", img]);
    assert!(all.lines().count() > 1000);
}
