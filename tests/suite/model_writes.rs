//! The model-based write harness (`common::model`) on every writable
//! format: qcow2 (plain with compressed and zero clusters, extended L2,
//! over a compressed base), qcow version 1, VMDK monolithicSparse, dynamic
//! VHD, VHDX and VDI, each through the library and through a real `--rw`
//! FUSE mount. A failing case is shrunk by proptest and reported as the
//! shortest failing operation sequence.

use std::path::{Path, PathBuf};

use crate::common;
use common::model::{run, Target, Via};
use common::{qemu_img, qemu_io, s};

const K: u64 = 1024;

/// `qemu-img create -f FMT -o OPTS` of `size`, then `cmds` through qemu-io.
fn make(dir: &Path, name: &str, fmt: &str, opts: &str, size: &str, cmds: &[&str]) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", fmt, "-o", opts, s(&p), size]);
    if !cmds.is_empty() {
        qemu_io(fmt, &p, cmds);
    }
    p
}

/// Data, compressed and zeroed clusters where the random writes land.
const QCOW2_PRIOR: &[&str] = &[
    "write -P 0x5a 0 192k",
    "write -c -P 0x6b 256k 256k",
    "write -z 576k 128k",
    "write -P 0x7c 3200k 700k",
    "write -c -P 0x1d 6m 128k",
];

fn qcow2(d: &Path) -> PathBuf {
    make(d, "d.qcow2", "qcow2", "cluster_size=64k", "8M", QCOW2_PRIOR)
}

fn qcow2_extended_l2(d: &Path) -> PathBuf {
    let opts = "cluster_size=64k,extended_l2=on";
    make(d, "x.qcow2", "qcow2", opts, "8M", QCOW2_PRIOR)
}

/// A qcow2 overlay (4 KiB clusters) over a base made of compressed
/// clusters: partial writes copy from compressed data.
fn qcow2_over_compressed_base(d: &Path) -> PathBuf {
    let plain = make(
        d,
        "plain.qcow2",
        "qcow2",
        "cluster_size=64k",
        "8M",
        QCOW2_PRIOR,
    );
    let base = d.join("base.qcow2");
    qemu_img(&["convert", "-q", "-c", "-O", "qcow2", s(&plain), s(&base)]);
    let opts = format!(
        "cluster_size=4k,backing_file={},backing_fmt=qcow2",
        s(&base)
    );
    make(
        d,
        "top.qcow2",
        "qcow2",
        &opts,
        "8M",
        &["write -P 0x42 1m 8k"],
    )
}

fn qcow(d: &Path) -> PathBuf {
    let cmds = ["write -P 0x11 0 100k", "write -P 0x22 2040k 20k"];
    let p = d.join("d.qcow");
    qemu_img(&["create", "-q", "-f", "qcow", s(&p), "6M"]);
    qemu_io("qcow", &p, &cmds);
    p
}

fn vmdk_sparse(d: &Path) -> PathBuf {
    let cmds = ["write -P 0x11 0 100k", "write -P 0x22 1m 64k"];
    make(
        d,
        "d.vmdk",
        "vmdk",
        "subformat=monolithicSparse",
        "40M",
        &cmds,
    )
}

fn vhd_dynamic(d: &Path) -> PathBuf {
    let cmds = ["write -P 0x11 0 100k", "write -P 0x22 2040k 20k"];
    make(d, "d.vhd", "vpc", "subformat=dynamic", "6M", &cmds)
}

fn vhdx(d: &Path) -> PathBuf {
    let cmds = ["write -P 0x11 0 100k", "write -P 0x22 3m 1m"];
    make(d, "d.vhdx", "vhdx", "block_size=1M", "8M", &cmds)
}

fn vdi(d: &Path) -> PathBuf {
    let cmds = ["write -P 0x11 0 100k", "write -P 0x22 2040k 20k"];
    make(d, "d.vdi", "vdi", "preallocation=off", "6M", &cmds)
}

/// The harness's target for a format.
fn target<'a>(
    fmt: &'a str,
    (unit, table): (u64, u64),
    build: &'a dyn Fn(&Path) -> PathBuf,
) -> Target<'a> {
    Target {
        fmt: Some(fmt),
        unit,
        table,
        build,
        after: None,
    }
}

/// Two tests per target: through the library and through FUSE.
macro_rules! model_tests {
    ($($lib:ident, $fuse:ident: $fmt:literal, $unit:expr, $build:ident;)*) => {
        $(
            #[test]
            fn $lib() {
                run(&target($fmt, $unit, &$build), Via::Library);
            }

            #[test]
            fn $fuse() {
                run(&target($fmt, $unit, &$build), Via::Fuse);
            }
        )*
    };
}

// (unit, table): the allocation unit and the guest span of one table
// (qcow2 4 KiB clusters: 2 MiB per L2 table; qcow: 2 MiB; VMDK: 512 grains).
model_tests! {
    qcow2_library, qcow2_fuse: "qcow2", (64 * K, 64 * K), qcow2;
    qcow2_extended_l2_library, qcow2_extended_l2_fuse:
        "qcow2", (64 * K, 64 * K), qcow2_extended_l2;
    qcow2_over_compressed_base_library, qcow2_over_compressed_base_fuse:
        "qcow2", (4 * K, 2048 * K), qcow2_over_compressed_base;
    qcow_library, qcow_fuse: "qcow", (4 * K, 2048 * K), qcow;
    vmdk_sparse_library, vmdk_sparse_fuse: "vmdk", (64 * K, 32768 * K), vmdk_sparse;
    vhd_dynamic_library, vhd_dynamic_fuse: "vpc", (2048 * K, 2048 * K), vhd_dynamic;
    vhdx_library, vhdx_fuse: "vhdx", (1024 * K, 1024 * K), vhdx;
    vdi_library, vdi_fuse: "vdi", (1024 * K, 1024 * K), vdi;
}
