//! `--load-snapshot` / `-l` (qemu-nbd's spelling): an internal qcow2
//! snapshot exposed read-only, through the library, a real FUSE mount,
//! `vdiskfs serve`, `info` and `map`.
//!
//! Images are built with qemu-io writes between `qemu-img snapshot -c`
//! (compressed and zeroed clusters, an extended-L2 image, a snapshot taken
//! before a resize either way). Two oracles, byte-exact:
//! - `qemu-img convert -l SPEC -O raw`, which keeps the image's *current*
//!   size (qemu-nbd -l does too): compared over the common length, and
//!   what qemu adds past the snapshot's size must be zeros;
//! - `qemu-img snapshot -a` on a copy, then `convert`: the snapshot at its
//!   own size, which is what we expose.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fuse::{vdiskfs, Mounted};
use common::nbd::Served;
use common::{caches, qemu_img, qemu_img_line, qemu_io, read_all, require_tool, run, scratch};
use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::format::qcow2::snapshot::SnapshotSel;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Opens `image` through the library with snapshot `spec` loaded.
fn open_snap(image: &Path, spec: &str) -> vdiskfs::Result<Chain> {
    let opts = ChainOptions {
        load_snapshot: Some(SnapshotSel::parse(spec).unwrap()),
        ..Default::default()
    };
    Chain::open(image, &opts, &caches())
}

/// `qemu-img convert -l SPEC -O raw IMAGE`.
fn qemu_convert_l(image: &Path, spec: &str) -> Vec<u8> {
    let dir = scratch();
    let out = dir.path().join("l.raw");
    qemu_img(&["convert", "-l", spec, "-O", "raw", s(image), s(&out)]);
    std::fs::read(out).unwrap()
}

/// The snapshot `name` (an ID or name, IDs first) restored on a copy
/// (`qemu-img snapshot -a`), as raw.
fn qemu_restored(image: &Path, name: &str) -> Vec<u8> {
    let dir = scratch();
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(image, &copy).unwrap();
    qemu_img(&["snapshot", "-a", name, s(&copy)]);
    common::qemu_raw(&copy, Some("qcow2"))
}

/// Asserts that `got` (snapshot `spec`, which `qemu-img snapshot -a name`
/// restores) equals both oracles.
fn assert_snapshot(image: &Path, spec: &str, name: &str, got: &[u8], how: &str) {
    let exact = qemu_restored(image, name);
    common::assert_same(got, &exact, image, 0);
    let l = qemu_convert_l(image, spec);
    let n = got.len().min(l.len());
    assert!(
        got[..n] == l[..n],
        "{how}: snapshot {spec:?} of {} differs from qemu-img convert -l",
        image.display()
    );
    assert!(
        l[n..].iter().all(|&b| b == 0),
        "qemu-img convert -l pads a grown image with zeros"
    );
}

/// Creates the main test image: snapshots ID 1 "first", 2 "second",
/// 3 "big" (after growing to 6M), 4 "1" (a name that is another's ID),
/// then the image shrunk to 3M with more active writes.
fn build_main(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0x11 0 192k",
            "write -c -P 0x22 1M 64k",
            "write -P 0x33 3M 100k",
        ],
    );
    qemu_img(&["snapshot", "-c", "first", s(&img)]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0x44 64k 64k",
            "write -z 1M 64k",
            "write -P 0x55 2M 4k",
            "discard 3M 64k",
        ],
    );
    qemu_img(&["snapshot", "-c", "second", s(&img)]);
    qemu_img(&["resize", "-q", s(&img), "6M"]);
    qemu_io("qcow2", &img, &["write -P 0x66 5M 64k"]);
    qemu_img(&["snapshot", "-c", "big", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 0x77 0 8k"]);
    qemu_img(&["snapshot", "-c", "1", s(&img)]);
    qemu_img(&["resize", "-q", "--shrink", s(&img), "3M"]);
    qemu_io("qcow2", &img, &["write -P 0x88 0 1M"]);
    img
}

#[test]
fn snapshots_read_byte_exact_through_the_library() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = scratch();
    let img = build_main(tmp.path());
    for (spec, name, size) in [
        ("first", "first", 4u64 << 20),
        ("2", "second", 4 << 20),
        ("snapshot.name=big", "big", 6 << 20),
        ("snapshot.id=3,snapshot.name=big", "big", 6 << 20),
        // A plain "1" is ID 1 (qemu tries IDs first), not the snapshot named "1".
        ("1", "first", 4 << 20),
        // `qemu-img snapshot -a 1` would restore ID 1 too: restore it by ID.
        ("snapshot.name=1", "4", 6 << 20),
    ] {
        let chain = open_snap(&img, spec).unwrap_or_else(|e| panic!("-l {spec}: {e}"));
        assert_eq!(chain.size(), size, "-l {spec}: the snapshot's own size");
        assert!(!chain.is_writable());
        for piece in [1 << 20, 4096 + 512] {
            let got = read_all(&chain, piece).unwrap();
            assert_snapshot(&img, spec, name, &got, "library");
        }
    }
    // The active state is untouched by all this.
    common::assert_matches_qemu(&img);
}

#[test]
fn extended_l2_snapshots_read_byte_exact() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = scratch();
    let img = tmp.path().join("ext.qcow2");
    qemu_img_line(&format!(
        "create -q -f qcow2 -o extended_l2=on,cluster_size=64k {} 2M",
        s(&img)
    ));
    // 2 KiB subclusters: partial clusters, some units zeroed.
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0xa1 4k 6k", "write -P 0xa2 130k 2k"],
    );
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0xb1 6k 4k",
            "write -z 130k 2k",
            "write -P 0xb2 1M 3k",
        ],
    );
    qemu_img(&["snapshot", "-c", "s2", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 0xc1 0 64k"]);
    for (spec, name) in [("s1", "s1"), ("snapshot.id=2", "s2")] {
        let chain = open_snap(&img, spec).unwrap();
        let got = read_all(&chain, 3000).unwrap();
        assert_snapshot(&img, spec, name, &got, "library, extended L2");
    }
}

#[test]
fn a_mount_and_an_nbd_export_show_the_snapshot() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = scratch();
    let img = build_main(tmp.path());
    let m = Mounted::new(&[&img], &["-l", "second"]);
    let got = std::fs::read(m.file("disk.raw")).unwrap();
    assert_snapshot(&img, "second", "second", &got, "FUSE mount");
    m.unmount();
    // Growing snapshot through the mount(8) spelling.
    let m = Mounted::new(&[&img], &["-o", "load_snapshot=big"]);
    let got = std::fs::read(m.file("disk.raw")).unwrap();
    assert_eq!(got.len(), 6 << 20);
    assert_snapshot(&img, "big", "big", &got, "FUSE mount, -o load_snapshot=");
    m.unmount();

    let srv = Served::new(&[&img], &["--load-snapshot", "snapshot.id=1"]);
    let out = tmp.path().join("nbd.raw");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &srv.uri("disk"),
        s(&out),
    ]));
    let got = std::fs::read(&out).unwrap();
    assert_snapshot(&img, "1", "first", &got, "NBD export");
    let _ = srv.stop();
}

#[test]
fn info_and_map_describe_the_loaded_snapshot() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = scratch();
    let img = build_main(tmp.path());
    let out = vdiskfs(&["info", "-l", "big", s(&img)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("virtual size: 6 MiB (6291456 bytes)"),
        "{text}"
    );
    assert!(
        text.contains("loaded snapshot: ID 3, name \"big\""),
        "{text}"
    );
    let out = vdiskfs(&["map", "--output=json", "-l", "first", s(&img)]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v.as_array().unwrap();
    let end = runs
        .iter()
        .map(|r| r["start"].as_u64().unwrap() + r["length"].as_u64().unwrap())
        .max();
    assert_eq!(end, Some(4 << 20), "map covers the snapshot's size");
    // The snapshot's data run at 0 (192k of 0x11), not the active state's 1M.
    assert_eq!(runs[0]["start"], 0);
    assert_eq!(runs[0]["length"], 192 << 10);
    assert_eq!(runs[0]["data"], true);
}

#[test]
fn bad_selections_and_write_modes_are_refused() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = scratch();
    let img = build_main(tmp.path());
    let err = |args: &[&str]| {
        let out = vdiskfs(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
        e
    };
    let e = err(&["info", "-l", "nope", s(&img)]);
    assert!(
        e.contains("no snapshot with ID or name \"nope\"")
            && e.contains("1 \"first\", 2 \"second\", 3 \"big\", 4 \"1\""),
        "{e}"
    );
    assert!(e.contains("disk.qcow2"), "names the file: {e}");
    let e = err(&["map", "-l", "snapshot.id=1,snapshot.name=big", s(&img)]);
    assert!(
        e.contains("no snapshot with ID \"1\" and name \"big\""),
        "{e}"
    );
    let e = err(&["info", "-l", "snapshot.size=1", s(&img)]);
    assert!(e.contains("unknown key \"snapshot.size\""), "{e}");

    // Writing modes: clap for the flags, the plan for -o inplace.
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    for extra in [
        &["--rw"][..],
        &["--snapshot"][..],
        &["--overlay", "/tmp/never-created.qcow2"][..],
    ] {
        let mut args = vec!["mount", "-l", "first"];
        args.extend_from_slice(extra);
        args.extend([s(&img), s(&mp)]);
        let e = err(&args);
        assert!(e.contains("cannot be used with"), "{extra:?}: {e}");
    }
    let e = err(&["mount", "-o", "inplace", "-l", "first", s(&img), s(&mp)]);
    assert!(
        e.contains("--load-snapshot exposes a snapshot read-only"),
        "{e}"
    );
    let e = err(&["serve", "--rw", "-l", "first", s(&img)]);
    assert!(e.contains("cannot be used with"), "{e}");

    // Not qcow2: refused by name.
    let raw = tmp.path().join("plain.img");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let e = err(&["info", "-l", "first", s(&raw)]);
    assert!(e.contains("needs a qcow2 image; this one is raw"), "{e}");
    let vmdk = tmp.path().join("d.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&vmdk), "1M"]);
    let e = err(&["map", "-l", "first", s(&vmdk)]);
    assert!(e.contains("this one is vmdk"), "{e}");
}

#[test]
fn a_damaged_snapshot_entry_is_a_clear_error() {
    require_tool("qemu-img", "qemu-utils");
    let tmp = scratch();
    let img = build_main(tmp.path());
    let pristine = std::fs::read(&img).unwrap();
    let at = u64::from_be_bytes(pristine[64..72].try_into().unwrap()) as usize;
    // A hostile virtual size in the first entry's extra data (after the
    // 40 fixed bytes and the 8-byte VM state size) is refused, not exposed.
    let mut bytes = pristine.clone();
    bytes[at + 48..at + 56].copy_from_slice(&(1u64 << 62).to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let e = open_snap(&img, "first")
        .err()
        .expect("must fail")
        .to_string();
    assert!(e.contains("L1 limit") && e.contains("\"first\""), "{e}");
    let mut bytes = pristine;
    // The first entry's l1_table_offset: cluster aligned, far past the end.
    bytes[at..at + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let e = open_snap(&img, "first")
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        e.contains("L1 table of snapshot 1 \"first\"") && e.contains("past the end of the file"),
        "{e}"
    );
    assert!(e.contains("disk.qcow2"), "{e}");
    // The active state and the other snapshots still open.
    assert!(open_snap(&img, "second").is_ok());
    assert!(common::open_chain(&img).is_ok());
}
