//! `vdiskfs map [--output=json|human]` against `qemu-img map` on the same
//! images: chains (qcow2 over qcow2 over raw, VMDK over VMDK), zero
//! clusters, unallocated runs, compressed clusters, flat extents. The JSON
//! form is compared byte for byte, the human form too where qemu-img
//! prints one (it refuses images with compressed clusters).

use crate::common;

use std::path::Path;
use std::process::Command;

use common::fuse::bin;
use common::{require_tool, scratch};

/// Runs a command in `dir`, returning its output and whether it succeeded.
fn run_in(dir: &Path, prog: &str, args: &[&str]) -> (String, bool) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    (
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        out.status.success(),
    )
}

/// Runs a command in `dir`, panicking when it fails.
fn ok(dir: &Path, prog: &str, args: &[&str]) -> String {
    let (out, success) = run_in(dir, prog, args);
    assert!(success, "{prog} {args:?} failed: {out}");
    out
}

#[test]
fn map_matches_qemu_img_map() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    let tmp = scratch();
    let d = tmp.path();
    let img = |args: &[&str]| {
        let mut a = vec!["create", "-q"];
        a.extend_from_slice(args);
        ok(d, "qemu-img", &a);
    };
    let io = |fmt: &str, image: &str, cmds: &[&str]| {
        let mut a = vec!["-f", fmt];
        for c in cmds {
            a.extend(["-c", c]);
        }
        a.push(image);
        ok(d, "qemu-io", &a);
    };
    // qcow2 over qcow2 over a sparse raw file, with data at every depth,
    // zero clusters hiding data below, and unallocated runs.
    img(&["-f", "raw", "base.raw", "64M"]);
    io(
        "raw",
        "base.raw",
        &["write -P 1 8M 64k", "write -P 1 2M 64k"],
    );
    img(&["-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2"]);
    io(
        "qcow2",
        "mid.qcow2",
        &["write -P 2 2M 128k", "write -z 3M 64k", "write -P 2 9M 64k"],
    );
    img(&["-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"]);
    io(
        "qcow2",
        "top.qcow2",
        &["write -P 3 0 64k", "write -z 2M 64k", "write -P 3 9M 4k"],
    );
    // A standalone qcow2 (unallocated runs are not present) and a
    // compressed copy of the chain.
    img(&["-f", "qcow2", "alone.qcow2", "8M"]);
    io(
        "qcow2",
        "alone.qcow2",
        &["write -P 4 1M 64k", "write -z 2M 64k"],
    );
    ok(
        d,
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "top.qcow2", "comp.qcow2"],
    );
    // VMDK: a sparse child over a sparse parent, a stream image, a flat one.
    img(&["-f", "vmdk", "vbase.vmdk", "16M"]);
    io(
        "vmdk",
        "vbase.vmdk",
        &["write -P 5 0 64k", "write -P 5 1M 64k"],
    );
    img(&[
        "-f",
        "vmdk",
        "-b",
        "vbase.vmdk",
        "-F",
        "vmdk",
        "vchild.vmdk",
    ]);
    io(
        "vmdk",
        "vchild.vmdk",
        &["write -P 6 1M 32k", "write -P 6 5M 64k"],
    );
    ok(
        d,
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "top.qcow2",
            "stream.vmdk",
        ],
    );
    img(&[
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        "flat.vmdk",
        "16M",
    ]);
    io("vmdk", "flat.vmdk", &["write -P 7 1M 64k"]);

    let mut problems = Vec::new();
    for image in [
        "top.qcow2",
        "mid.qcow2",
        "base.raw",
        "alone.qcow2",
        "comp.qcow2",
        "vchild.vmdk",
        "vbase.vmdk",
        "stream.vmdk",
        "flat.vmdk",
    ] {
        let qemu = ok(d, "qemu-img", &["map", "--output=json", image]);
        let ours = ok(d, bin(), &["map", "--output=json", image]);
        if ours != qemu {
            problems.push(format!("{image} (json):\nours:\n{ours}qemu:\n{qemu}"));
        }
        let (qemu, qemu_ok) = run_in(d, "qemu-img", &["map", image]);
        let ours = ok(d, bin(), &["map", image]);
        if qemu_ok && ours != qemu {
            problems.push(format!("{image} (human):\nours:\n{ours}qemu:\n{qemu}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
