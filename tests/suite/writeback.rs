//! Writable mounts use the kernel's FUSE writeback cache: buffered writes
//! wait in the kernel's page cache and reach the daemon later, in large
//! requests. What was written and then fsync'ed must be in the image even
//! when the daemon is killed (SIGKILL) right after the fsync returns, and
//! partial-page writes (which make the kernel read the page first) must
//! merge with what the image held. Checked against `qemu-img compare`.

use crate::common;
use common::qemu_img_line;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fuse::{wait_gone, Mounted};
use common::rng::Rng;
use common::{qemu_img, qemu_io, qemu_raw, scratch};

const SIZE: usize = 32 << 20;

/// A qcow2 image of [`SIZE`] bytes whose first half holds a pattern, so
/// that partial-page writes have old bytes to merge with.
fn image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"]);
    qemu_io("qcow2", &img, &["write -P 0x5a 0 16M"]);
    img
}

/// Buffered writes of every shape through `path`, applied to `model` too:
/// sequential 1 MiB writes, 4 KiB writes at random pages, and small writes
/// at odd offsets inside pages (read-modify-write in the kernel).
fn write_everything(path: &Path, model: &mut [u8], seed: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut rng = Rng::new(seed);
    let put = |f: &std::fs::File, off: usize, data: &[u8], model: &mut [u8]| {
        f.write_all_at(data, off as u64).unwrap();
        model[off..off + data.len()].copy_from_slice(data);
    };
    for i in 0..8 {
        let data = rng.bytes(1 << 20);
        put(&f, (4 << 20) + i * (1 << 20), &data, model);
    }
    for _ in 0..300 {
        let page = rng.below((SIZE / 4096) as u64) as usize;
        let data = rng.bytes(4096);
        put(&f, page * 4096, &data, model);
    }
    for _ in 0..300 {
        let len = 1 + rng.below(3000) as usize;
        let off = rng.below((SIZE - len) as u64) as usize;
        let data = rng.bytes(len);
        put(&f, off, &data, model);
    }
    // The last bytes of the disk, written through the file position.
    f.flush().unwrap();
    put(&f, SIZE - 100, &[0xee; 100], model);
    f.sync_all().unwrap();
}

/// Asserts the image reads as `model`, by `qemu-img compare` against a raw
/// file holding the model.
fn assert_image_is(img: &Path, model: &[u8], dir: &Path) {
    let want = dir.join("want.raw");
    std::fs::write(&want, model).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&want)
        .arg(img)
        .output()
        .expect("qemu-img is installed (scripts/setup.sh)");
    assert!(
        out.status.success(),
        "{} differs from what was written and fsync'ed: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let check = qemu_img_line(&format!(
        "check --output=json -f qcow2 {}",
        img.to_str().unwrap()
    ));
    let v: serde_json::Value = serde_json::from_str(&check).unwrap();
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{check}");
}

/// Writes, fsyncs, kills the daemon with SIGKILL, and compares.
fn write_fsync_kill(img: &Path, opts: &[&str], model: &mut [u8], seed: u64) {
    let m = Mounted::new(&[img], opts);
    let pid = common::fuse::daemon_pid(&m);
    write_everything(&m.file("disk.raw"), model, seed);
    // SAFETY: killing the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid as u32);
    drop(m);
}

#[test]
fn fsynced_writes_survive_sigkill_in_place() {
    let d = scratch();
    let img = image(d.path());
    let mut model = qemu_raw(&img, Some("qcow2"));
    assert_eq!(model.len(), SIZE);
    for seed in 1..=2 {
        write_fsync_kill(&img, &["--rw"], &mut model, seed);
        assert_image_is(&img, &model, d.path());
    }
    // And a fresh mount reads it back.
    let m = Mounted::new(&[&img], &[]);
    assert!(std::fs::read(m.file("disk.raw")).unwrap() == model);
    m.unmount();
}

#[test]
fn fsynced_writes_survive_sigkill_into_an_overlay() {
    let d = scratch();
    let img = image(d.path());
    let ov = d.path().join("ov.qcow2");
    let mut model = qemu_raw(&img, Some("qcow2"));
    let opts = ["--overlay", ov.to_str().unwrap()];
    for seed in 3..=4 {
        write_fsync_kill(&img, &opts, &mut model, seed);
        assert_image_is(&ov, &model, d.path());
    }
}

#[test]
fn writes_past_the_end_of_the_disk_are_refused() {
    let d = scratch();
    let img = image(d.path());
    let m = Mounted::new(&[&img], &["--rw"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.file("disk.raw"))
        .unwrap();
    // The write itself or, with the writeback cache, the fsync after it
    // fails; either way the disk keeps its size and its bytes.
    let failed = f.write_all_at(b"beyond", SIZE as u64).is_err() || f.sync_all().is_err();
    assert!(failed, "a write past the end of the disk was accepted");
    drop(f);
    m.unmount();
    let m = Mounted::new(&[&img], &[]);
    assert_eq!(
        std::fs::metadata(m.file("disk.raw")).unwrap().len(),
        SIZE as u64
    );
    m.unmount();
}
