//! VHDX in-place writes: pseudo-random writes, zeroings and flushes
//! mirrored into an in-memory model, on dynamic disks of 1, 8 and 32 MiB
//! blocks and on a fixed disk, each checked with `qemu-img check`,
//! `qemu-img convert` (and so `compare`) and a fresh open; a crafted image
//! with a live log replayed in place by a writable open; writes through a
//! real FUSE mount (`--rw`, `--overlay`, `--snapshot`). The refusal of
//! differencing disks is tested in tests/vhdx/crafted.rs (qemu cannot
//! make them).

use crate::common;
use common::model::{self, Target, Via};
use common::{assert_model, open_rw, s};

use std::path::{Path, PathBuf};

use common::fuse::Mounted;
use common::rng::Rng;
use common::{open_chain, qemu_img, qemu_io, qemu_raw, read_all, scratch};
use vdiskfs::format::vhdx::header::{Header, HEADER_OFFSETS};
use vdiskfs::format::vhdx::journal::{build_entry, new_guid, Headers};
use vdiskfs::host::{HostFile, HostOpen};

const MIB: u64 = 1 << 20;

fn create(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "vhdx", "-o", opts, s(&p), size]);
    p
}

/// qemu-img check, qemu-img convert against the model, a fresh open.
fn check_all(img: &Path, model: &[u8]) {
    model::check_closed(img, Some("vhdx"), model).unwrap();
}

/// The model harness (random writes, zeroings, flushes, reads and
/// reopenings against an in-memory model, shrunk on failure) on images
/// `build` makes, through `via`; `after` checks each closed image.
fn random_ops(
    build: &dyn Fn(&Path) -> PathBuf,
    block: u64,
    after: Option<&dyn Fn(&Path)>,
    via: Via,
) {
    let target = Target {
        fmt: Some("vhdx"),
        unit: block,
        table: block,
        build,
        after,
    };
    model::run(&target, via);
}

/// Random operations on a 100 MiB dynamic disk with some prior data
/// (sessions over earlier sessions' blocks come from the reopen operation).
fn random_writes(opts: &str, block: u64) {
    let build = |d: &Path| {
        let img = create(d, "d.vhdx", "100M", opts);
        qemu_io(
            "vhdx",
            &img,
            &[
                "write -P 0x11 0 100k",
                "write -P 0x22 33m 3m",
                "write -P 0x33 99m 1m",
            ],
        );
        img
    };
    random_ops(&build, block, None, Via::Library);
}

#[test]
fn dynamic_1m_blocks_random_writes_match_the_model() {
    random_writes("block_size=1M", MIB);
}

#[test]
fn dynamic_8m_blocks_random_writes_match_the_model() {
    random_writes("block_size=8M", 8 * MIB);
}

#[test]
fn dynamic_32m_blocks_random_writes_match_the_model() {
    random_writes("block_size=32M", 32 * MIB);
}

/// Random writes into a fixed 40 MiB disk made with `opts`; `grows`:
/// whether the file may grow.
fn fixed_writes(opts: &str, grows: bool) {
    let build = |d: &Path| {
        let img = create(d, "f.vhdx", "40M", opts);
        let len = std::fs::metadata(&img).unwrap().len();
        std::fs::write(d.join("created-length"), len.to_string()).unwrap();
        img
    };
    let same_length = |img: &Path| {
        let created = std::fs::read_to_string(img.with_file_name("created-length")).unwrap();
        let now = std::fs::metadata(img).unwrap().len();
        assert_eq!(now.to_string(), created, "the fixed disk's file grew");
    };
    let after: Option<&dyn Fn(&Path)> = if grows { None } else { Some(&same_length) };
    random_ops(&build, 8 * MIB, after, Via::Library);
}

#[test]
fn fixed_random_writes_match_the_model_in_place() {
    // Blocks FULLY_PRESENT at their place: written there, the file never grows.
    fixed_writes("subformat=fixed,block_size=8M,block_state_zero=off", false);
}

#[test]
fn fixed_with_zero_blocks_random_writes_match_the_model() {
    // qemu's default fixed disk has every block ZERO without a file
    // offset: written blocks are appended, as qemu does.
    fixed_writes("subformat=fixed,block_size=8M", true);
}

#[test]
fn zero_blocks_keeping_their_place_are_written_there() {
    // MS-VHDX lets a ZERO block keep its file offset (space reserved):
    // turn a fixed disk's FULLY_PRESENT blocks into such, with garbage
    // in their space, which must not show through.
    use std::os::unix::fs::FileExt;
    let d = scratch();
    let img = create(
        d.path(),
        "z.vhdx",
        "24M",
        "subformat=fixed,block_size=8M,block_state_zero=off",
    );
    qemu_io("vhdx", &img, &["write -P 0xee 0 24M"]);
    let bat = bat_offset(&img);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    for b in 0..3u64 {
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, bat + 8 * b).unwrap();
        let v = (u64::from_le_bytes(e) & !7) | 2;
        f.write_all_at(&v.to_le_bytes(), bat + 8 * b).unwrap();
    }
    drop(f);
    let len = std::fs::metadata(&img).unwrap().len();
    let mut model = vec![0u8; 24 << 20];
    {
        let chain = open_rw(&img);
        for (off, n) in [(4096u64, 100usize), (9 << 20, 3 << 20), ((24 << 20) - 1, 1)] {
            let data = vec![0x5au8; n];
            chain.write_at(&data, off).unwrap();
            model[off as usize..off as usize + n].copy_from_slice(&data);
        }
    }
    check_all(&img, &model);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), len);
}

#[test]
fn first_write_changes_the_write_guids() {
    let d = scratch();
    let img = create(d.path(), "g.vhdx", "8M", "block_size=1M");
    let file = HostFile::open(&img).unwrap();
    let before = Header::read_current(&file).unwrap();
    drop(file);
    {
        // Opening alone writes nothing.
        let _chain = open_rw(&img);
    }
    let file = HostFile::open(&img).unwrap();
    assert_eq!(
        Header::read_current(&file).unwrap().sequence,
        before.sequence
    );
    drop(file);
    open_rw(&img).write_at(b"x", 0).unwrap();
    let file = HostFile::open(&img).unwrap();
    let after = Header::read_current(&file).unwrap();
    assert!(after.sequence > before.sequence);
    assert_ne!(after.file_write_guid, before.file_write_guid);
    assert_ne!(after.data_write_guid, before.data_write_guid);
    assert!(after.log_guid.is_zero(), "a closed image has an empty log");
}

/// The file offset of the BAT, from `info`.
fn bat_offset(img: &Path) -> u64 {
    let chain = open_chain(img).unwrap();
    let info = chain.layers()[0].info();
    info.details["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["guid"] == "2dc27766-f623-4200-9d64-115e9bfd4a08")
        .unwrap()["offset"]
        .as_u64()
        .unwrap()
}

/// Hides the BAT page of block 0 from the file and puts it in a live log
/// entry, as a cut between the log flush and the in-place write leaves it.
fn leave_a_live_log(img: &Path) {
    let how = HostOpen {
        writable: true,
        ..HostOpen::default()
    };
    let file = HostFile::open_with(img, how).unwrap();
    let header = Header::read_current(&file).unwrap();
    let bat = bat_offset(img);
    let mut page = vec![0u8; 4096];
    file.read_exact_at(&mut page, bat).unwrap();
    assert_ne!(page[..8], [0; 8], "block 0 is stored");
    let guid = new_guid();
    let entry = build_entry(guid, 7, file.len(), &[(bat, page)]);
    file.write_all_at(&entry, header.log_offset).unwrap();
    file.write_all_at(&[0u8; 4096], bat).unwrap();
    let headers = Headers::read(&file, &header).unwrap();
    headers
        .update(&file, |h| h[48..64].copy_from_slice(&guid.0))
        .unwrap();
    file.sync_data().unwrap();
    assert!(HEADER_OFFSETS.len() == 2);
}

#[test]
fn a_live_log_is_replayed_in_place_by_a_writable_open() {
    let d = scratch();
    let img = create(d.path(), "l.vhdx", "16M", "block_size=1M");
    qemu_io("vhdx", &img, &["write -P 0x5a 0 1m", "write -P 0x6b 5m 4k"]);
    let model = qemu_raw(&img, Some("vhdx"));
    leave_a_live_log(&img);
    // qemu will not open it read-only: the log is live.
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "vhdx", s(&img)])
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-img check accepted a live log");
    // Read-only, we replay in memory and leave the file alone.
    let before = std::fs::read(&img).unwrap();
    assert_model(
        &read_all(&open_chain(&img).unwrap(), MIB as usize).unwrap(),
        &model,
        "ro",
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only open wrote"
    );
    // Writable, the log is applied and emptied.
    drop(open_rw(&img));
    let file = HostFile::open(&img).unwrap();
    assert!(Header::read_current(&file).unwrap().log_guid.is_zero());
    check_all(&img, &model);
}

/// Writes a pattern through a FUSE mount with `opts`, fsyncs, unmounts;
/// returns the expected guest content.
fn write_through_mount(img: &Path, opts: &[&str]) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut model = qemu_raw(img, Some("vhdx"));
    let m = Mounted::new(&[img], opts);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.file(&format!(
            "{}.raw",
            img.file_stem().unwrap().to_str().unwrap()
        )))
        .unwrap();
    let mut rng = Rng::new(9);
    for _ in 0..60 {
        let len = 1 + rng.below(200_000) as usize;
        let off = rng.below(model.len() as u64 - len as u64) as usize;
        let data = rng.bytes(len);
        f.write_all_at(&data, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    let mut back = vec![0u8; model.len()];
    f.read_exact_at(&mut back, 0).unwrap();
    assert_model(&back, &model, "read back through the mount");
    drop(f);
    m.unmount();
    model
}

#[test]
fn rw_mount_writes_in_place() {
    let build = |d: &Path| create(d, "m.vhdx", "24M", "block_size=8M");
    random_ops(&build, 8 * MIB, None, Via::Fuse);
}

#[test]
fn overlay_and_snapshot_over_vhdx_leave_it_alone() {
    let d = scratch();
    let img = create(d.path(), "o.vhdx", "24M", "block_size=1M");
    qemu_io("vhdx", &img, &["write -P 0x42 0 3m"]);
    let before = std::fs::read(&img).unwrap();
    let over = d.path().join("over.qcow2");
    let model = write_through_mount(&img, &["--overlay", s(&over)]);
    assert!(std::fs::read(&img).unwrap() == before, "the base changed");
    qemu_img(&["check", "-f", "qcow2", s(&over)]);
    assert_model(&qemu_raw(&over, Some("qcow2")), &model, "overlay");
    write_through_mount(&img, &["--snapshot"]);
    assert!(std::fs::read(&img).unwrap() == before, "the base changed");
}

#[test]
fn fuzz_write_path_runs_on_real_images() {
    // The write_paths fuzz target's checks (no panic, bounded growth, no
    // written data over metadata) on qemu's images and random scripts.
    let d = scratch();
    for (i, opts) in ["block_size=1M", "block_size=8M,subformat=fixed"]
        .iter()
        .enumerate()
    {
        let img = create(d.path(), &format!("z{i}.vhdx"), "9M", opts);
        qemu_io("vhdx", &img, &["write -P 9 0 1536k", "write -z 2M 512k"]);
        let data = std::fs::read(&img).unwrap();
        for seed in 0..8 {
            let script = Rng::new(seed).bytes(512);
            vdiskfs::fuzzing::open_and_write(&data, vdiskfs::format::Format::Vhdx, &script);
        }
    }
}
