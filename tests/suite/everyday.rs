//! Everyday use at the edges, through real mounts of the built binary:
//! stacked and non-empty mount points, qemu-compatible locks on read-only
//! layers and overlay bases, dead mounts, and how errors reach the caller.

use crate::common;
use common::qemu_img_line;
use common::s;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fuse::{require_fuse, vdiskfs, wait_gone};
use common::{qemu_img, require_tool, scratch};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A small qcow2 image.
fn qcow2(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "16M"]);
    p
}

/// An empty directory `name` in `dir`.
fn mountpoint(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir(&p).unwrap();
    p
}

/// `vdiskfs mount ARGS`, asserting success.
fn mount_ok(args: &[&str]) {
    require_fuse();
    let mut a = vec!["mount"];
    a.extend_from_slice(args);
    let o = vdiskfs(&a);
    assert!(o.status.success(), "mount {args:?}: {}", text(&o));
}

/// `vdiskfs mount ARGS`, asserting a one-line failure; returns the line.
fn mount_fails(args: &[&str]) -> String {
    require_fuse();
    let mut a = vec!["mount"];
    a.extend_from_slice(args);
    let o = vdiskfs(&a);
    let t = text(&o);
    assert!(!o.status.success(), "mount {args:?} succeeded: {t}");
    assert_eq!(t.trim_end().lines().count(), 1, "not one line: {t}");
    t
}

/// Unmounts (lazily, so a failed test does not leave a busy mount) on drop.
struct Unmount(Vec<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for m in &self.0 {
            let _ = vdiskfs(&["unmount", "--lazy", s(m)]);
        }
    }
}

/// The `list --json` rows of the mount at `mp`.
fn list_rows(mp: &Path) -> Vec<serde_json::Value> {
    let o = vdiskfs(&["list", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["mountpoint"].as_str() == Some(s(mp)))
        .cloned()
        .collect()
}

#[test]
fn stacked_mounts_and_non_empty_directories_are_refused() {
    let d = scratch();
    let a = qcow2(d.path(), "a.qcow2");
    let b = qcow2(d.path(), "b.qcow2");
    let mp = mountpoint(d.path(), "m");
    let _u = Unmount(vec![mp.clone()]);
    mount_ok(&[s(&a), s(&mp)]);
    let e = mount_fails(&[s(&b), s(&mp)]);
    assert!(e.contains("already a mount point"), "{e}");
    assert!(
        e.contains("fuse.vdiskfs") && e.contains("--nonempty"),
        "{e}"
    );
    assert_eq!(list_rows(&mp).len(), 1, "a second mount was stacked");
    // Any filesystem, not only ours.
    let t = mountpoint(d.path(), "tmpfs");
    let _ut = Unmount(vec![t.clone()]);
    let o = Command::new("mount")
        .args(["-t", "tmpfs", "none", s(&t)])
        .output()
        .unwrap();
    assert!(o.status.success(), "mount tmpfs: {}", text(&o));
    let e = mount_fails(&[s(&b), s(&t)]);
    assert!(e.contains("already a mount point (tmpfs"), "{e}");
    Command::new("umount").arg(&t).status().unwrap();

    // A non-empty directory is refused naming what is there ...
    let full = mountpoint(d.path(), "full");
    std::fs::write(full.join("keep.txt"), b"mine").unwrap();
    let e = mount_fails(&[s(&b), s(&full)]);
    assert!(e.contains("not empty") && e.contains("keep.txt"), "{e}");
    // ... unless asked, in either spelling.
    let _uf = Unmount(vec![full.clone()]);
    mount_ok(&["-o", "nonempty", s(&b), s(&full)]);
    assert!(full.join("b.raw").exists());
    assert!(!full.join("keep.txt").exists());
    let o = vdiskfs(&["unmount", s(&full)]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(full.join("keep.txt")).unwrap(), b"mine");
    mount_ok(&["--nonempty", s(&b), s(&full)]);
}

#[test]
fn a_dead_mount_is_named_with_the_way_out() {
    let d = scratch();
    let a = qcow2(d.path(), "a.qcow2");
    let mp = mountpoint(d.path(), "m");
    let _u = Unmount(vec![mp.clone()]);
    mount_ok(&[s(&a), s(&mp)]);
    let pid = list_rows(&mp)[0]["pid"].as_u64().unwrap() as u32;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_gone(pid);
    let e = mount_fails(&[s(&a), s(&mp)]);
    assert!(e.contains("dead vdiskfs mount"), "{e}");
    assert!(e.contains(&format!("vdiskfs unmount {}", s(&mp))), "{e}");
    let o = vdiskfs(&["unmount", s(&mp)]);
    assert!(o.status.success(), "{}", text(&o));
    mount_ok(&[s(&a), s(&mp)]);
}

/// Runs qemu-io writing 4 KiB into `img`; returns its output on failure.
fn qemu_io_write(img: &Path) -> Result<(), String> {
    require_tool("qemu-io", "qemu-utils");
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 4k", s(img)])
        .output()
        .unwrap();
    if o.status.success() {
        Ok(())
    } else {
        Err(text(&o))
    }
}

#[test]
fn readers_and_writers_of_one_image_exclude_each_other_like_qemu() {
    let d = scratch();
    let img = qcow2(d.path(), "img.qcow2");
    let (m1, m2) = (mountpoint(d.path(), "m1"), mountpoint(d.path(), "m2"));
    let _u = Unmount(vec![m1.clone(), m2.clone()]);

    // Read-only mounts share the image with each other and with qemu readers ...
    mount_ok(&[s(&img), s(&m1)]);
    mount_ok(&["-r", s(&img), s(&m2)]);
    qemu_img(&["info", s(&img)]);
    // ... but a writer is refused, ours naming the holder, qemu's in its words.
    let m3 = mountpoint(d.path(), "m3");
    let e = mount_fails(&["--rw", s(&img), s(&m3)]);
    assert!(
        e.contains("image is in use") && e.contains("vdiskfs"),
        "{e}"
    );
    let e = qemu_io_write(&img).unwrap_err();
    assert!(e.contains("\"write\" lock"), "{e}");
    for m in [&m1, &m2] {
        assert!(vdiskfs(&["unmount", s(m)]).status.success());
    }

    // A read-only mount of an image being written is refused (as
    // `qemu-nbd -r` refuses it), and --force-lock reads anyway, warning.
    mount_ok(&["--rw", s(&img), s(&m1)]);
    let e = mount_fails(&[s(&img), s(&m2)]);
    assert!(e.contains("another process is writing it"), "{e}");
    let o = vdiskfs(&["mount", "--force-lock", s(&img), s(&m2)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("the view may go stale"), "{}", text(&o));
    for m in [&m1, &m2] {
        assert!(vdiskfs(&["unmount", s(m)]).status.success());
    }
}

#[test]
fn bases_of_overlays_snapshots_and_backing_files_are_locked_against_writers() {
    let d = scratch();
    let base = qcow2(d.path(), "base.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img_line(&format!(
        "create -q -f qcow2 -b {} -F qcow2 {}",
        s(&base),
        s(&top)
    ));
    let ov = d.path().join("ov.qcow2");
    let m = mountpoint(d.path(), "m");
    let _u = Unmount(vec![m.clone()]);
    let cases: [(&str, Vec<&str>, &Path); 3] = [
        ("overlay", vec!["--overlay", s(&ov), s(&base)], &base),
        ("snapshot", vec!["--snapshot", s(&base)], &base),
        ("backing file of --rw", vec!["--rw", s(&top)], &base),
    ];
    for (what, args, locked) in cases {
        let mut a = args.clone();
        a.push(s(&m));
        mount_ok(&a);
        let e = qemu_io_write(locked).expect_err(what);
        assert!(e.contains("\"write\" lock"), "{what}: {e}");
        assert!(vdiskfs(&["unmount", s(&m)]).status.success());
        qemu_io_write(locked).unwrap_or_else(|e| panic!("{what}: lock left behind: {e}"));
    }
    // And a base a writer holds is not mounted under an overlay.
    let mut writer = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-k"])
        .arg(d.path().join("nbd.sock"))
        .arg(&base)
        .spawn()
        .expect("qemu-nbd (apt-get install qemu-utils)");
    // Its listening socket can appear before it has opened the image: wait
    // for its write lock (byte 101) in /proc/locks.
    use std::os::unix::fs::MetadataExt;
    let ino = format!(":{} ", std::fs::metadata(&base).unwrap().ino());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.contains(&ino) && l.ends_with(" 100 101"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd took no write lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let e = mount_fails(&["--snapshot", s(&base), s(&m)]);
    assert!(
        e.contains("another process is writing it") && e.contains("qemu-nbd"),
        "{e}"
    );
    writer.kill().unwrap();
    writer.wait().unwrap();
}

fn daemon_pid(mp: &Path) -> u32 {
    let rows = list_rows(mp);
    assert_eq!(rows.len(), 1, "list rows for {}: {rows:?}", mp.display());
    rows[0]["pid"].as_u64().expect("pid") as u32
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; pid is our daemon.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

#[test]
fn unmount_reports_what_it_waits_for_and_fails_when_the_daemon_does_not_finish() {
    let d = scratch();
    let a = qcow2(d.path(), "a.qcow2");
    let mp = mountpoint(d.path(), "m");
    let _u = Unmount(vec![mp.clone()]);
    mount_ok(&[s(&a), s(&mp)]);
    let pid = daemon_pid(&mp);
    signal(pid, libc::SIGSTOP);
    let o = vdiskfs(&["unmount", "--timeout", "3", s(&mp)]);
    signal(pid, libc::SIGCONT);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!(
            "waiting for daemon {pid}, which is stopped, to flush"
        )),
        "{t}"
    );
    assert!(
        t.contains("has not finished flushing") && t.contains("SIGCONT"),
        "{t}"
    );
    // Continued, it flushes and exits: a later unmount has nothing to do.
    wait_gone(pid);
    assert!(list_rows(&mp).is_empty());
    // A daemon that runs normally is waited for silently, exit 0.
    mount_ok(&[s(&a), s(&mp)]);
    let o = vdiskfs(&["unmount", s(&mp)]);
    assert!(o.status.success() && o.stderr.is_empty(), "{}", text(&o));
}

#[test]
fn sighup_reopens_the_log_file_and_sigusr_leave_the_mount_alone() {
    let d = scratch();
    let a = qcow2(d.path(), "a.qcow2");
    let mp = mountpoint(d.path(), "m");
    let log = d.path().join("d.log");
    let _u = Unmount(vec![mp.clone()]);
    mount_ok(&["-v", "--log-file", s(&log), s(&a), s(&mp)]);
    let pid = daemon_pid(&mp);
    // logrotate: move the file away, then HUP.
    let rotated = d.path().join("d.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    signal(pid, libc::SIGHUP);
    for sig in [libc::SIGUSR1, libc::SIGUSR2] {
        signal(pid, sig);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        if t.contains("reopened the log file") && t.matches("ignored").count() == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "new log: {t:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("mounted on"));
    assert!(common::fuse::alive(pid), "a signal ended the daemon");
    assert_eq!(
        std::fs::read(mp.join("a.raw")).unwrap().len(),
        16 << 20,
        "the mount does not serve after the signals"
    );
    let o = vdiskfs(&["unmount", s(&mp)]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_log_file_that_cannot_be_opened_fails_the_mount() {
    let d = scratch();
    let a = qcow2(d.path(), "a.qcow2");
    let mp = mountpoint(d.path(), "m");
    let _u = Unmount(vec![mp.clone()]);
    let bad = d.path().join("no-such-dir/d.log");
    let e = mount_fails(&["--log-file", s(&bad), s(&a), s(&mp)]);
    assert!(
        e.contains("cannot open the log file") && e.contains("no-such-dir"),
        "{e}"
    );
    assert!(list_rows(&mp).is_empty());
}

/// Runs `vdiskfs ARGS` expecting a usage error: exit 2, one line; returns it.
fn usage_error(args: &[&str]) -> String {
    let o = vdiskfs(args);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {t}");
    assert_eq!(
        t.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {t}"
    );
    t
}

#[test]
fn command_line_errors_keep_their_reason_and_both_spellings_agree() {
    let d = scratch();
    let img = qcow2(d.path(), "a.qcow2");
    let mp = mountpoint(d.path(), "m");
    let m = |extra: &[&str]| {
        let mut a = vec!["mount"];
        a.extend_from_slice(extra);
        a.push(s(&img));
        a.push(s(&mp));
        usage_error(&a)
    };
    assert!(usage_error(&["unmount"]).contains("<MOUNTPOINT>"));
    assert!(usage_error(&["info"]).contains("<IMAGE>"));
    let e = usage_error(&["mount", s(&img)]);
    assert!(
        e.contains("IMAGE... MOUNTPOINT") && !e.contains("MOUNTPOINT> <"),
        "{e}"
    );
    // One parser per option: the flag and its -o spelling say the same.
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        ("--uid=no-such-user-vdiskfs", "uid=no-such-user-vdiskfs", "no such user"),
        ("--log-level=chatty", "log_level=chatty", "unknown log level \"chatty\""),
        ("--threads=0", "threads=0", "at least 1"),
        ("--threads=100000", "threads=100000", "at most 256"),
        ("--cache-size=0", "cache_size=0", "at least 1M"),
        ("--cache-size=10000T", "cache_size=10000T", "machine's memory"),
        ("--cache-size=1.5X", "cache_size=1.5X", "1.5X"),
    ];
    for (flag, opt, needle) in cases {
        let a = m(&[flag]);
        let b = m(&["-o", opt]);
        assert!(a.contains(needle) && b.contains(needle), "{a}\n{b}");
        assert!(!a.contains("invalid digit"), "{a}");
    }
    // Names work for --uid as for -o uid=; 1.5G is a size.
    let _u = Unmount(vec![mp.clone()]);
    mount_ok(&[
        "--uid",
        "nobody",
        "--gid",
        "root",
        "--cache-size",
        "1.5G",
        s(&img),
        s(&mp),
    ]);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(mp.join("a.raw")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 0));
    assert!(vdiskfs(&["unmount", s(&mp)]).status.success());
    // -v/-q are mount's log levels; info does not advertise them (its own
    // --verbose adds raw header fields to the report).
    let help = text(&vdiskfs(&["info", "--help"]));
    assert!(
        !help.contains("--quiet") && !help.contains("log output") && help.contains("--max-depth"),
        "{help}"
    );
    assert!(help.contains("raw header fields"), "{help}");
    assert!(help.contains("--allow-devices"), "{help}");
}

#[test]
fn the_daemon_takes_arguments_after_dashdash_and_leaves_the_working_directory() {
    let d = scratch();
    let work = d.path().join("work");
    std::fs::create_dir(&work).unwrap();
    qcow2(&work, "a.qcow2");
    mountpoint(&work, "m");
    let mp = work.join("m");
    let _u = Unmount(vec![mp.clone()]);
    require_fuse();
    let o = Command::new(common::fuse::bin())
        .args(["mount", "--log-file", "d.log", "--", "a.qcow2", "m"])
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(o.status.success(), "mount -- a.qcow2 m: {}", text(&o));
    let pid = daemon_pid(&mp);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        Path::new("/"),
        "the daemon pins the caller's directory"
    );
    // The relative log file still names the caller's directory.
    std::fs::remove_file(work.join("d.log")).unwrap();
    signal(pid, libc::SIGHUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !work.join("d.log").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reopen d.log"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!Path::new("/d.log").exists());
    let o = vdiskfs(&["unmount", s(&mp)]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn info_takes_max_depth() {
    let d = scratch();
    let base = qcow2(d.path(), "base.qcow2");
    let mid = d.path().join("mid.qcow2");
    let top = d.path().join("top.qcow2");
    for (b, t) in [(&base, &mid), (&mid, &top)] {
        qemu_img_line(&format!("create -q -f qcow2 -b {} -F qcow2 {}", s(b), s(t)));
    }
    let o = vdiskfs(&["info", "--max-depth", "1", s(&top)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("deeper than 1"), "{}", text(&o));
    let o = vdiskfs(&["info", "--max-depth", "3", "--allow-devices", s(&top)]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn raw_and_flat_vmdk_report_the_host_files_holes() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let d = scratch();
    let raw = d.path().join("sparse.img");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(&[7u8; 1 << 20], 0).unwrap();
    f.write_all_at(&[8u8; 256 << 10], 5 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let flat = d.path().join("flat.vmdk");
    qemu_img_line(&format!(
        "create -q -f vmdk -o subformat=monolithicFlat {} 8M",
        s(&flat)
    ));
    require_tool("qemu-io", "qemu-utils");
    let o = Command::new("qemu-io")
        .args(["-f", "vmdk", "-c", "write -P 9 2M 512k", s(&flat)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // qemu-img map asks the host for raw files; for flat VMDK extents it
    // reports everything as data, so there the extent file's own holes
    // (also zeros when read) are the reference.
    let extent = d.path().join("flat-flat.vmdk");
    for (img, fmt, name) in [(&raw, "raw", "sparse.raw"), (&flat, "vmdk", "flat.raw")] {
        let want = if fmt == "raw" {
            common::qemu_data_extents(img, Some(fmt))
        } else {
            common::seek_data_extents(&extent)
        };
        assert!(!want.is_empty(), "{fmt}: no data per qemu-img map");
        let data: u64 = want.iter().map(|(a, b)| b - a).sum();
        assert!(data < 4 << 20, "{fmt}: {data} bytes of data, not sparse");
        for extra in [&[][..], &["--no-passthrough"][..]] {
            let mp = d.path().join(format!("m-{fmt}-{}", extra.len()));
            std::fs::create_dir(&mp).unwrap();
            let _u = Unmount(vec![mp.clone()]);
            let mut a: Vec<&str> = extra.to_vec();
            a.extend([s(img), s(&mp)]);
            mount_ok(&a);
            let file = mp.join(name);
            assert_eq!(
                common::seek_data_extents(&file),
                want,
                "{fmt} {extra:?}: SEEK_DATA/HOLE"
            );
            let meta = std::fs::metadata(&file).unwrap();
            assert_eq!(meta.blocks() * 512, data, "{fmt} {extra:?}: st_blocks");
            let o = vdiskfs(&["unmount", s(&mp)]);
            assert!(o.status.success(), "{}", text(&o));
        }
    }
}

#[test]
fn pid_file_and_version() {
    let d = scratch();
    let a = qcow2(d.path(), "a.qcow2");
    let mp = mountpoint(d.path(), "m");
    let pid_file = d.path().join("vdiskfs.pid");
    let _u = Unmount(vec![mp.clone()]);
    mount_ok(&["-o", &format!("pid_file={}", s(&pid_file)), s(&a), s(&mp)]);
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("the pid file exists once mount returns")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, daemon_pid(&mp));
    assert!(vdiskfs(&["unmount", s(&mp)]).status.success());
    assert!(!pid_file.exists(), "the pid file outlives the daemon");

    let o = vdiskfs(&["--version"]);
    let v = text(&o);
    assert!(o.status.success(), "{v}");
    assert!(
        v.starts_with(&format!("vdiskfs {}", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    // Built from a git checkout here: the commit is named.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git (apt-get install git)");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert!(!head.is_empty());
    assert!(v.contains("(git "), "{v}");
}

/// Removes the test's /dev/log socket on drop.
struct DevLog;

impl Drop for DevLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file("/dev/log");
    }
}

#[test]
fn syslog_records_keep_their_level_whatever_the_text() {
    // A syslog of our own on /dev/log (this machine has none; never
    // replace a real one).
    assert!(
        !Path::new("/dev/log").exists(),
        "/dev/log exists: this test needs a machine without a syslog daemon on it"
    );
    let sock = std::os::unix::net::UnixDatagram::bind("/dev/log").unwrap();
    let _cleanup = DevLog;
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let d = scratch();
    // A name that a level guessed from the text would file as an error.
    let img = qcow2(d.path(), "ERROR_x.qcow2");
    let mp = mountpoint(d.path(), "m");
    let _u = Unmount(vec![mp.clone()]);
    mount_ok(&["-v", s(&img), s(&mp)]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut buf = vec![0u8; 8192];
    let line = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no 'mounted on' line in syslog"
        );
        let Ok(n) = sock.recv(&mut buf) else { continue };
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        if m.contains("mounted on") && m.contains(s(&mp)) {
            break m;
        }
    };
    // daemon facility (3) * 8 + info (6) = 30.
    assert!(line.starts_with("<30>"), "{line}");
    assert!(line.contains("vdiskfs["), "{line}");
    // No second timestamp of our own after syslog's: the message starts
    // with the level. (Not a search for "[20": the pid can start so.)
    let msg = line.split_once("]: ").map_or("", |(_, m)| m);
    assert!(msg.starts_with("INFO "), "{line}");
    let o = vdiskfs(&["unmount", s(&mp)]);
    assert!(o.status.success(), "{}", text(&o));
}
