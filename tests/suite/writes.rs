//! End-to-end writes through real FUSE mounts: in place, into an overlay,
//! into a throw-away snapshot; fio verification, filesystems made through
//! the mount, discard, crash safety under SIGKILL, locks.

use crate::common;
use common::qemu_img_line;

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fuse::{wait_gone, Mounted};

/// Tests that attach loop devices and mount guest filesystems run one at a
/// time: parallel `losetup -f` and asynchronous loop detach race otherwise.
static LOOP_DEVICES: Mutex<()> = Mutex::new(());
use common::{qemu_img, qemu_raw, run, scratch};

/// Makes an empty image of `fmt` (`raw`, `qcow2`, `vmdk` = monolithicSparse).
fn make(dir: &Path, fmt: &str, size: &str) -> PathBuf {
    let ext = if fmt == "raw" { "img" } else { fmt };
    let p = dir.join(format!("disk.{ext}"));
    let mut args = vec!["create", "-f", fmt];
    if fmt == "vmdk" {
        args.extend(["-o", "subformat=monolithicSparse"]);
    }
    let ps = p.to_str().unwrap().to_string();
    args.push(&ps);
    args.push(size);
    qemu_img(&args);
    p
}

/// `qemu-img check`: no corruption (leaks allowed); returns the leak count.
fn check_clean(img: &Path, fmt: &str) -> u64 {
    if fmt == "raw" {
        return 0;
    }
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", fmt])
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| {
        panic!(
            "qemu-img check {}: {}{}",
            img.display(),
            text,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let corrupt = v["corruptions"].as_u64().unwrap_or(0);
    let errors = v["check-errors"].as_u64().unwrap_or(0);
    assert_eq!(
        corrupt + errors,
        0,
        "qemu-img check {}: {text}",
        img.display()
    );
    v["leaks"].as_u64().unwrap_or(0)
}

fn fio_verify(file: &Path) {
    common::require_tool("fio", "fio");
    run(Command::new("fio").args([
        "--name=verify",
        "--ioengine=libaio",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--bsrange=4k-64k",
        "--iodepth=8",
        "--numjobs=3",
        "--size=6M",
        "--offset_increment=8M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        // No local-verify-*.state files in the working directory.
        "--verify_state_save=0",
        "--group_reporting",
        &format!("--filename={}", file.display()),
    ]));
}

fn fio_then_check(fmt: &str) {
    let d = scratch();
    let img = make(d.path(), fmt, "32M");
    let m = Mounted::new(&[&img], &["--rw"]);
    let exposed = m.file("disk.raw");
    fio_verify(&exposed);
    let shown = std::fs::read(&exposed).unwrap();
    m.unmount();
    check_clean(&img, fmt);
    common::assert_same(&qemu_raw(&img, Some(fmt)), &shown, &img, 0);
}

#[test]
fn fio_verified_random_writes_raw() {
    fio_then_check("raw");
}

#[test]
fn fio_verified_random_writes_qcow2() {
    fio_then_check("qcow2");
}

#[test]
fn fio_verified_random_writes_sparse_vmdk() {
    fio_then_check("vmdk");
}

/// mkfs.ext4 through a loop device on the mount, files copied in, then
/// everything read back through qemu's own view of the image.
fn filesystem_through_mount(base_fmt: &str, mode: &str) {
    common::require_tool("mkfs.ext4", "e2fsprogs");
    common::require_tool("debugfs", "e2fsprogs");
    let d = scratch();
    let img = make(d.path(), base_fmt, "64M");
    let base_before = std::fs::read(&img).unwrap();
    let overlay = d.path().join("over.qcow2");
    let mut opts: Vec<String> = Vec::new();
    match mode {
        "rw" => opts.push("--rw".into()),
        "overlay" => {
            opts.push("--overlay".into());
            opts.push(overlay.display().to_string());
        }
        _ => unreachable!(),
    }
    let refs: Vec<&str> = opts.iter().map(String::as_str).collect();
    let _serial = LOOP_DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(&[&img], &refs);
    let exposed = m.file("disk.raw");
    let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&exposed));
    let dev = dev.trim().to_string();
    let fsdir = d.path().join("fs");
    std::fs::create_dir(&fsdir).unwrap();
    let result = (|| -> Result<(), String> {
        let ok = |c: &mut Command| -> Result<(), String> {
            let o = c.output().map_err(|e| e.to_string())?;
            if o.status.success() {
                Ok(())
            } else {
                Err(format!("{c:?}: {}", String::from_utf8_lossy(&o.stderr)))
            }
        };
        ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev]))?;
        ok(Command::new("mount").arg(&dev).arg(&fsdir))?;
        let payload: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(fsdir.join("big.bin"), &payload).map_err(|e| e.to_string())?;
        std::fs::write(fsdir.join("hello.txt"), b"written through vdiskfs\n")
            .map_err(|e| e.to_string())?;
        ok(Command::new("umount").arg(&fsdir))?;
        Ok(())
    })();
    let _ = Command::new("umount").arg(&fsdir).status();
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    result.unwrap();
    m.unmount();
    let (top, top_fmt) = if mode == "overlay" {
        (overlay.clone(), "qcow2")
    } else {
        (img.clone(), base_fmt)
    };
    check_clean(&top, top_fmt);
    // qemu's own view of the written disk, read with debugfs.
    let raw = d.path().join("qemu-view.raw");
    qemu_img_line(&format!(
        "convert -O raw {} {}",
        top.to_str().unwrap(),
        raw.to_str().unwrap()
    ));
    let hello = run(Command::new("debugfs")
        .args(["-R", "cat /hello.txt"])
        .arg(&raw));
    assert_eq!(hello, "written through vdiskfs\n");
    let dumped = d.path().join("big.out");
    run(Command::new("debugfs")
        .args(["-R", &format!("dump /big.bin {}", dumped.display())])
        .arg(&raw));
    let payload: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert!(
        std::fs::read(&dumped).unwrap() == payload,
        "big.bin differs"
    );
    if mode == "overlay" {
        assert!(
            std::fs::read(&img).unwrap() == base_before,
            "the base image changed"
        );
    }
}

#[test]
fn ext4_made_through_an_rw_mount_of_qcow2() {
    filesystem_through_mount("qcow2", "rw");
}

#[test]
fn ext4_made_through_an_rw_mount_of_sparse_vmdk() {
    filesystem_through_mount("vmdk", "rw");
}

#[test]
fn ext4_made_through_an_overlay_on_qcow2() {
    filesystem_through_mount("qcow2", "overlay");
}

#[test]
fn ext4_made_through_an_overlay_on_vmdk() {
    filesystem_through_mount("vmdk", "overlay");
}

#[test]
fn overlay_is_reused_and_must_match_its_base() {
    let d = scratch();
    let img = make(d.path(), "qcow2", "8M");
    common::qemu_io("qcow2", &img, &["write -P 0x41 0 1M"]);
    let before = std::fs::read(&img).unwrap();
    let ov = d.path().join("ov.qcow2");
    let ovs = ov.to_str().unwrap();
    let m = Mounted::new(&[&img], &["--overlay", ovs]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.file("disk.raw"))
        .unwrap();
    f.write_all_at(&[0x42; 4096], 4096).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.unmount();
    // The overlay records its base relatively, with its format.
    let info = qemu_img(&["info", "--output=json", ovs]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["backing-filename"], "disk.qcow2");
    assert_eq!(v["backing-filename-format"], "qcow2");
    // Reused: the earlier write is still there.
    let m = Mounted::new(&[&img], &["--overlay", ovs]);
    let mut buf = [0u8; 4096];
    std::fs::File::open(m.file("disk.raw"))
        .unwrap()
        .read_exact_at(&mut buf, 4096)
        .unwrap();
    assert_eq!(buf, [0x42; 4096]);
    m.unmount();
    assert!(std::fs::read(&img).unwrap() == before, "base changed");
    // An overlay of another image is refused.
    let other = d.path().join("other.qcow2");
    qemu_img(&["create", "-f", "qcow2", other.to_str().unwrap(), "8M"]);
    let err = Mounted::try_new(&[&other], &["--overlay", ovs])
        .err()
        .expect("refused");
    assert!(err.contains("overlay of"), "{err}");
}

#[test]
fn snapshot_writes_vanish_and_leave_images_untouched() {
    let d = scratch();
    for fmt in ["qcow2", "vmdk", "raw"] {
        let img = make(d.path(), fmt, "8M");
        let before = std::fs::read(&img).unwrap();
        let mtime = std::fs::metadata(&img).unwrap().mtime();
        let m = Mounted::new(&[&img], &["--snapshot"]);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.file("disk.raw"))
            .unwrap();
        f.write_all_at(&[0x99; 65536], 1 << 20).unwrap();
        f.sync_all().unwrap();
        let mut buf = [0u8; 65536];
        f.read_exact_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, [0x99; 65536]);
        drop(f);
        m.unmount();
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{fmt}: image changed"
        );
        assert_eq!(std::fs::metadata(&img).unwrap().mtime(), mtime);
        std::fs::remove_file(&img).unwrap();
    }
}

#[test]
fn discard_from_fstrim_shrinks_the_host_image() {
    common::require_tool("fstrim", "util-linux");
    let d = scratch();
    let img = make(d.path(), "qcow2", "128M");
    let _serial = LOOP_DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(&[&img], &["--rw"]);
    let dev = run(Command::new("losetup")
        .args(["-f", "--show"])
        .arg(m.file("disk.raw")));
    let dev = dev.trim().to_string();
    let fsdir = d.path().join("fs");
    std::fs::create_dir(&fsdir).unwrap();
    let fill_and_trim = || {
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-E", "nodiscard", &dev]));
        run(Command::new("mount").arg(&dev).arg(&fsdir));
        let junk = vec![0x5au8; 32 << 20];
        std::fs::write(fsdir.join("junk"), &junk).unwrap();
        run(&mut Command::new("sync"));
        let full = std::fs::metadata(&img).unwrap().blocks() * 512;
        std::fs::remove_file(fsdir.join("junk")).unwrap();
        // Commit the journal so the freed blocks are free for fstrim.
        run(&mut Command::new("sync"));
        run(Command::new("fstrim").arg("-v").arg(&fsdir));
        run(&mut Command::new("sync"));
        let trimmed = std::fs::metadata(&img).unwrap().blocks() * 512;
        (full, trimmed)
    };
    let outcome = fill_and_trim();
    let _ = Command::new("umount").arg(&fsdir).status();
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    m.unmount();
    let (full, trimmed) = outcome;
    assert!(
        trimmed + (24 << 20) < full,
        "host allocation {full} -> {trimmed}: fstrim did not return space"
    );
    check_clean(&img, "qcow2");
}

/// `st_blocks` (what `du` shows) follows writes and discards while mounted,
/// and a fresh mount of the result counts the same.
#[test]
fn st_blocks_follow_writes_and_discards() {
    common::require_tool("fallocate", "util-linux");
    let d = scratch();
    let img = make(d.path(), "qcow2", "16M");
    let m = Mounted::new(&[&img], &["--rw"]);
    let file = m.file("disk.raw");
    // Attributes of a writable mount are cached for a second.
    let blocks = || {
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::metadata(&file).unwrap().blocks()
    };
    assert_eq!(blocks(), 0);
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(&[1u8; 3 << 16], 0).unwrap();
    f.write_all_at(&[1u8], 8 << 20).unwrap();
    f.sync_all().unwrap();
    // Four 64 KiB clusters allocated, in 512-byte blocks.
    assert_eq!(blocks(), 4 * 128, "after writes");
    run(Command::new("fallocate")
        .args(["-p", "-o", "65536", "-l", "65536"])
        .arg(&file));
    f.sync_all().unwrap();
    assert_eq!(blocks(), 3 * 128, "after a punched cluster");
    drop(f);
    m.unmount();
    let m = Mounted::new(&[&img], &[]);
    let fresh = std::fs::metadata(m.file("disk.raw")).unwrap().blocks();
    m.unmount();
    assert_eq!(fresh, 3 * 128, "a fresh mount");
    check_clean(&img, "qcow2");
}

#[test]
fn writes_past_the_end_fail_and_truncate_is_refused() {
    let d = scratch();
    let img = make(d.path(), "qcow2", "1M");
    let m = Mounted::new(&[&img], &["--rw"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.file("disk.raw"))
        .unwrap();
    // Refused with ENOSPC: by write(2) itself, or (the kernel's writeback
    // cache took the bytes) by the fsync after it.
    let e = match f.write_at(&[1u8; 4096], 1 << 20) {
        Ok(_) => f.sync_all().unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    let e = f.set_len(1 << 19).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // A write straddling the end is cut at the end (or, through the
    // writeback cache, written up to the end and its fsync refused).
    match f.write_at(&[2u8; 8192], (1 << 20) - 4096).unwrap() {
        4096 => {}
        8192 => assert_eq!(f.sync_all().unwrap_err().raw_os_error(), Some(libc::ENOSPC)),
        n => panic!("a straddling write of 8192 bytes wrote {n}"),
    }
    drop(f);
    m.unmount();
    check_clean(&img, "qcow2");
    let raw = qemu_raw(&img, None);
    assert!(raw[(1 << 20) - 4096..].iter().all(|&b| b == 2));
}

#[test]
fn locks_keep_two_writers_apart() {
    let d = scratch();
    let img = make(d.path(), "qcow2", "4M");
    let m = Mounted::new(&[&img], &["--rw"]);
    // qemu refuses to write an image we write.
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 4k"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-io wrote a locked image");
    // A second vdiskfs writer is refused, naming the holder.
    let err = Mounted::try_new(&[&img], &["--rw"])
        .err()
        .expect("second writer refused");
    assert!(err.contains("in use") && err.contains("vdiskfs"), "{err}");
    m.unmount();
    // And we refuse an image qemu-storage-daemon writes.
    let view = d.path().join("qsd.raw");
    std::fs::write(&view, b"").unwrap();
    let mut qsd = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            img.display()
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q,file=f")
        .arg("--export")
        .arg(format!(
            "type=fuse,id=e,node-name=q,mountpoint={},writable=on",
            view.display()
        ))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let err = Mounted::try_new(&[&img], &["--rw"]).err();
    let _ = qsd.kill();
    let _ = qsd.wait();
    let _ = Command::new("umount").arg("-l").arg(&view).status();
    let err = err.expect("refused while qemu-storage-daemon writes");
    assert!(err.contains("qemu-storage"), "{err}");
    // --force-lock overrides (after qsd is gone it simply works).
    Mounted::new(&[&img], &["--rw", "--force-lock"]).unmount();
}

/// Kills the daemon with SIGKILL while a writer does write+fsync, many
/// times: the image must check clean and every acknowledged write must read back.
fn crash_test(fmt: &str, rounds: usize) {
    let d = scratch();
    let img = make(d.path(), fmt, "64M");
    let block = 65536u64;
    let mut acked: HashMap<u64, u8> = HashMap::new();
    let mut next_block = 0u64;
    let mut leaks = 0;
    for round in 0..rounds {
        let m = Mounted::new(&[&img], &["--rw"]);
        let path = m.file("disk.raw");
        let pid = common::fuse::daemon_pid(&m);
        let stop = Arc::new(AtomicBool::new(false));
        let done: Arc<Mutex<Vec<(u64, u8)>>> = Arc::new(Mutex::new(Vec::new()));
        // Why the writer ended, once it has: set before the kill, that is
        // a writer that stopped early (and the round would test nothing).
        let ended: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let start_block = next_block;
        let writer = {
            let (stop, done, ended) = (stop.clone(), done.clone(), ended.clone());
            std::thread::spawn(move || {
                let why = (|| {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|e| format!("open: {e}"))?;
                    let mut b = start_block;
                    while !stop.load(Ordering::Relaxed) && b < 1000 {
                        let pat = (b % 251 + 1) as u8;
                        // Spread blocks over the disk: 1000 slots of 64 KiB.
                        let off = (b * 7919 % 1000) * block;
                        let buf = vec![pat; block as usize / 2];
                        f.write_all_at(&buf, off + block / 4)
                            .and_then(|()| f.sync_data())
                            .map_err(|e| format!("write+fsync of block {b}: {e}"))?;
                        done.lock().unwrap().push((off, pat));
                        b += 1;
                    }
                    Ok::<String, String>(format!("stopped after block {b}"))
                })();
                *ended.lock().unwrap() = Some(why.unwrap_or_else(|e| e));
            })
        };
        // Kill at a varying point, but only once a first write+fsync was
        // acknowledged: on a loaded machine the first one can take longer
        // than any fixed delay, and a round without one tests nothing.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while done.lock().unwrap().is_empty()
            && ended.lock().unwrap().is_none()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis((round as u64 * 37) % 250));
        let early = ended.lock().unwrap().clone();
        // SAFETY: killing the daemon we started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        if let Some(why) = early {
            // Only running out of blocks (the 1000 slots) may end it early.
            assert!(
                why.starts_with("stopped after block 1000"),
                "{fmt} round {round}: the writer ended before the kill: {why}"
            );
        }
        // The writer can see the connection end before the dying daemon has
        // closed the image (and released its lock); qemu-img check must
        // come after that.
        wait_gone(pid as u32);
        drop(m); // lazy unmount of the dead mount
        let done = done.lock().unwrap().clone();
        assert!(
            !done.is_empty(),
            "{fmt} round {round}: no write+fsync was acknowledged before the kill"
        );
        next_block += done.len() as u64 + 1;
        for (off, pat) in done {
            acked.insert(off, pat);
        }
        leaks += check_clean(&img, fmt);
        if next_block >= 990 {
            break;
        }
    }
    assert!(!acked.is_empty(), "{fmt}: no acknowledged writes to verify");
    let raw = qemu_raw(&img, Some(fmt));
    for (off, pat) in &acked {
        let s = (*off + block / 4) as usize;
        assert!(
            raw[s..s + block as usize / 2].iter().all(|b| b == pat),
            "{fmt}: acknowledged write at {off:#x} lost"
        );
    }
    eprintln!(
        "{fmt}: {} acknowledged writes survived {rounds} SIGKILLs; {leaks} leaked clusters",
        acked.len()
    );
}

#[test]
fn crash_safety_qcow2() {
    crash_test("qcow2", 20);
}

#[test]
fn crash_safety_sparse_vmdk() {
    crash_test("vmdk", 20);
}

#[test]
fn crash_safety_raw() {
    crash_test("raw", 5);
}
