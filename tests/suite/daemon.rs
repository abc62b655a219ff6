//! End-to-end tests of the everyday features, through the built binary and
//! the real system tools: mount(8) and fstab through the helper, the
//! daemon's life (signals, umount, SIGKILL), logging, `list`, partitions as
//! files, sparseness against `qemu-img map`, xattrs, loop devices with
//! direct I/O, `--single-link`, `--unbuffered`, and access for other users.
//!
//! These tests run as root (they mount, use loop devices, and install the
//! mount helper into /sbin — util-linux looks for helpers only in /sbin,
//! /sbin/fs.d and /sbin/fs, a compiled-in list; anything already there is
//! restored afterwards). None of them skips: a missing tool fails the test
//! saying what to install.

use crate::common;
use common::qemu_img_line;
use common::s;

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::fuse::{alive, bin, vdiskfs, Mounted};
use common::{qemu_img, qemu_io, qemu_raw, require_tool, run, scratch};

/// `umount MP` as a user types it, retried while the mount is busy. Seen
/// once in CI right after reading the exposed file; the likely holder is a
/// process another test forked at that moment, which keeps a copy of our
/// just-closed descriptor until it execs (parallel tests, not the daemon).
fn umount(mp: &Path) {
    for _ in 0..50 {
        let o = Command::new("umount").arg(mp).output().unwrap();
        if o.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("busy"), "umount {}: {err}", mp.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("umount {}: still busy after 5 s", mp.display());
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests mount, use loop devices and install the mount helper: run them as root"
    );
}

fn out_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// True while `mp` is a mount point in this namespace.
fn is_mounted(mp: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(s(mp)))
}

fn state_file(pid: u32) -> PathBuf {
    PathBuf::from(format!("/run/vdiskfs/{pid}.json"))
}

/// The `list --json` entry of the mount at `mp`.
fn list_entry(mp: &Path) -> Option<serde_json::Value> {
    let out = vdiskfs(&["list", "--json"]);
    assert!(out.status.success(), "{}", out_text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|e| e["mountpoint"].as_str() == Some(s(mp)))
        .cloned()
}

fn daemon_pid(mp: &Path) -> u32 {
    let e = list_entry(mp).unwrap_or_else(|| panic!("list does not show {}", mp.display()));
    e["pid"].as_u64().expect("pid") as u32
}

/// Waits until the daemon `pid` is gone, its mount gone and its state file removed.
fn assert_daemon_ends(pid: u32, mp: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) || is_mounted(mp) {
        assert!(
            Instant::now() < deadline,
            "{what}: daemon {pid} alive={} mounted={} after 20 s",
            alive(pid),
            is_mounted(mp)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !state_file(pid).exists(),
        "{what}: state file of {pid} left behind"
    );
}

/// A qcow2 image with a recognisable pattern.
fn small_qcow2(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    qemu_img(&["create", "-f", "qcow2", s(&img), "8M"]);
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x5a 0 1M", "write -P 0xa5 5M 512k"],
    );
    img
}

/// A mount directory reachable by every user (tempdirs are 0700).
fn open_dir(d: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = d.join(name);
    std::fs::create_dir_all(&p).unwrap();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Restores files (helpers in /sbin, /etc/fstab) to what they were, on drop.
struct Restore(Vec<(PathBuf, Option<Vec<u8>>, bool)>);

impl Restore {
    fn new(paths: &[&str]) -> Restore {
        Restore(
            paths
                .iter()
                .map(|p| {
                    let p = PathBuf::from(p);
                    // A symlink (an earlier install's mount.fuse.vdiskfs) is
                    // removed at the end; a regular file is restored.
                    let link =
                        std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink());
                    let body = if link { None } else { std::fs::read(&p).ok() };
                    (p, body, link)
                })
                .collect(),
        )
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        for (p, body, _) in &self.0 {
            match body {
                Some(b) => {
                    let _ = std::fs::write(p, b);
                }
                None => {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
}

/// An exclusive lock across processes (flock on a file in /run/lock), held
/// while /sbin and /etc/fstab are changed.
struct SystemLock(#[allow(dead_code)] std::fs::File);

impl SystemLock {
    fn take() -> SystemLock {
        use std::os::fd::AsRawFd;
        let dir = if Path::new("/run/lock").is_dir() {
            "/run/lock"
        } else {
            "/tmp"
        };
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(format!("{dir}/vdiskfs-mount-helper-test.lock"))
            .unwrap();
        // SAFETY: f is an open file for the duration of the call.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        SystemLock(f)
    }
}

fn findmnt(mp: &Path) -> (String, String, String) {
    let out = run(Command::new("findmnt").args([
        "-n",
        "-o",
        "SOURCE,FSTYPE,OPTIONS",
        "--mountpoint",
        s(mp),
    ]));
    let f: Vec<String> = out.split_whitespace().map(str::to_string).collect();
    assert_eq!(f.len(), 3, "findmnt: {out}");
    (f[0].clone(), f[1].clone(), f[2].clone())
}

/// Reads `file` as user and group 65534 (nobody); the exit status of cat.
fn read_as_nobody(file: &Path) -> Output {
    require_tool("setpriv", "util-linux");
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn mount8_helper_fstab_and_umount() {
    require_root();
    require_tool("findmnt", "util-linux");
    let d = scratch();
    let img = small_qcow2(d.path(), "m8.qcow2");
    let expected = qemu_raw(&img, None);
    let mp = open_dir(d.path(), "mp");
    // Install the helper where mount(8) looks, pointing at the binary under
    // test (installed into a temp bindir); restore /sbin and /etc/fstab after.
    // Other checkouts may run this test at the same time: one at a time.
    let _lock = SystemLock::take();
    let _restore = Restore::new(&[
        "/sbin/mount.vdiskfs",
        "/sbin/mount.fuse.vdiskfs",
        "/etc/fstab",
    ]);
    let bindir = d.path().join("bin");
    let install = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helper/install.sh");
    run(Command::new(&install).args([
        "--bin",
        bin(),
        "--bindir",
        s(&bindir),
        "--sbindir",
        "/sbin",
        "--datadir",
        s(&d.path().join("share")),
    ]));
    assert!(bindir.join("vdiskfs").exists());
    // The man pages and completions, generated from the command line's
    // definitions: one page per command, each naming its options.
    let man1 = d.path().join("share/man/man1");
    for cmd in ["mount", "unmount", "info", "list", "map", "serve"] {
        let page = std::fs::read_to_string(man1.join(format!("vdiskfs-{cmd}.1")))
            .unwrap_or_else(|e| panic!("man page of {cmd}: {e}"));
        assert!(page.contains(&format!("vdiskfs\\-{cmd}")), "{cmd}: {page}");
    }
    let mount_page = std::fs::read_to_string(man1.join("vdiskfs-mount.1")).unwrap();
    for opt in ["overlay", "snapshot", "transport", "remote\\-cache"] {
        assert!(mount_page.contains(opt), "mount page lacks --{opt}");
    }
    let top = std::fs::read_to_string(man1.join("vdiskfs.1")).unwrap();
    assert!(top.contains("vdiskfs\\-mount(1)"), "{top}");
    for f in [
        "bash-completion/completions/vdiskfs",
        "zsh/site-functions/_vdiskfs",
        "fish/vendor_completions.d/vdiskfs.fish",
    ] {
        // fish spells long options `-l overlay`, the others `--overlay`.
        let text = std::fs::read_to_string(d.path().join("share").join(f)).unwrap();
        assert!(
            text.contains("--overlay") || text.contains("-l overlay"),
            "{f} lacks --overlay"
        );
    }
    let mount = |args: &[&str]| Command::new("mount").args(args).output().unwrap();

    // mount -t vdiskfs -o ro
    let o = mount(&["-t", "vdiskfs", "-o", "ro", s(&img), s(&mp)]);
    assert!(o.status.success(), "{}", out_text(&o));
    let (src, fstype, opts) = findmnt(&mp);
    assert_eq!((src.as_str(), fstype.as_str()), (s(&img), "fuse.vdiskfs"));
    assert!(opts.starts_with("ro,"), "{opts}");
    assert_eq!(std::fs::read(mp.join("m8.raw")).unwrap(), expected);
    let entry = list_entry(&mp).expect("list shows the mount");
    assert_eq!(entry["mode"], "ro");
    let pid = entry["pid"].as_u64().unwrap() as u32;
    // umount(8) ends the daemon.
    umount(&mp);
    assert_daemon_ends(pid, &mp, "umount after mount -t vdiskfs");

    // Options: vdiskfs ones, mount(8)-only ones (dropped), as fuse.vdiskfs too.
    for fstype in ["vdiskfs", "fuse.vdiskfs"] {
        let o = mount(&[
            "-t",
            fstype,
            "-o",
            "ro,allow_other,mode=0444,uid=65534,gid=65534,cache_size=8M,noauto,nofail,_netdev,x-test=1,noatime",
            s(&img),
            s(&mp),
        ]);
        assert!(o.status.success(), "{fstype}: {}", out_text(&o));
        let (src, ty, opts) = findmnt(&mp);
        assert_eq!((src.as_str(), ty.as_str()), (s(&img), "fuse.vdiskfs"));
        assert!(opts.contains("allow_other"), "{opts}");
        let meta = std::fs::metadata(mp.join("m8.raw")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (65534, 65534, 0o444)
        );
        let o = read_as_nobody(&mp.join("m8.raw"));
        assert!(o.status.success(), "nobody cannot read: {}", out_text(&o));
        assert_eq!(o.stdout, expected);
        let pid = daemon_pid(&mp);
        umount(&mp);
        assert_daemon_ends(pid, &mp, fstype);
    }

    // Unknown options are refused by name, nothing gets mounted; mount(8)'s
    // exit codes: 1 for bad usage, 32 for a mount failure.
    let o = mount(&["-t", "vdiskfs", "-o", "ro,frobnicate", s(&img), s(&mp)]);
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    let missing = d.path().join("missing.qcow2");
    let o = mount(&["-t", "vdiskfs", "-o", "ro", s(&missing), s(&mp)]);
    assert_eq!(o.status.code(), Some(32), "{}", out_text(&o));
    assert!(out_text(&o).contains("missing.qcow2"), "{}", out_text(&o));
    let o = mount(&["-t", "vdiskfs", "-o", "ro,frobnicate", s(&img), s(&mp)]);
    assert!(
        out_text(&o).contains("unknown mount option \"frobnicate\""),
        "{}",
        out_text(&o)
    );
    assert!(!is_mounted(&mp));

    // mount(8) passes `rw` when `ro` is absent: that alone never writes the
    // image; the mount is read-only with a notice naming the way to ask.
    let rw_img = d.path().join("rw.img");
    std::fs::write(&rw_img, vec![3u8; 1 << 20]).unwrap();
    let o = mount(&["-t", "vdiskfs", s(&rw_img), s(&mp)]);
    assert!(o.status.success(), "{}", out_text(&o));
    assert!(out_text(&o).contains("inplace"), "{}", out_text(&o));
    let (_, _, opts) = findmnt(&mp);
    assert!(opts.starts_with("ro,"), "{opts}");
    let entry = list_entry(&mp).unwrap();
    assert_eq!(entry["mode"], "ro");
    let pid = entry["pid"].as_u64().unwrap() as u32;
    umount(&mp);
    assert_daemon_ends(pid, &mp, "umount of the plain rw mount");
    // Writing in place is an explicit choice: -o inplace.
    let o = mount(&["-t", "vdiskfs", "-o", "inplace", s(&rw_img), s(&mp)]);
    assert!(o.status.success(), "{}", out_text(&o));
    let (_, _, opts) = findmnt(&mp);
    assert!(opts.starts_with("rw,"), "{opts}");
    let entry = list_entry(&mp).unwrap();
    assert_eq!(entry["mode"], "rw");
    let pid = entry["pid"].as_u64().unwrap() as u32;
    umount(&mp);
    assert_daemon_ends(pid, &mp, "umount of the inplace mount");

    // fstab: `IMG MP vdiskfs ro,noauto 0 0`, then `mount MP` / `umount MP`.
    let mut fstab = std::fs::read_to_string("/etc/fstab").unwrap_or_default();
    if !fstab.is_empty() && !fstab.ends_with('\n') {
        fstab.push('\n');
    }
    fstab.push_str(&format!(
        "{} {} vdiskfs ro,noauto,cache_size=16M 0 0\n",
        s(&img),
        s(&mp)
    ));
    // And a line without `ro`: mounted read-only, the golden image untouched.
    let mp2 = open_dir(d.path(), "mp2");
    fstab.push_str(&format!("{} {} vdiskfs noauto 0 0\n", s(&rw_img), s(&mp2)));
    std::fs::write("/etc/fstab", fstab).unwrap();
    let o = mount(&[s(&mp)]);
    assert!(o.status.success(), "mount MP from fstab: {}", out_text(&o));
    let (src, ty, opts) = findmnt(&mp);
    assert_eq!((src.as_str(), ty.as_str()), (s(&img), "fuse.vdiskfs"));
    assert!(opts.starts_with("ro,"), "{opts}");
    assert_eq!(std::fs::read(mp.join("m8.raw")).unwrap(), expected);
    let pid = daemon_pid(&mp);
    umount(&mp);
    assert_daemon_ends(pid, &mp, "umount of the fstab mount");
    let o = mount(&[s(&mp2)]);
    assert!(o.status.success(), "mount MP2 from fstab: {}", out_text(&o));
    let (_, _, opts) = findmnt(&mp2);
    assert!(opts.starts_with("ro,"), "fstab line without ro: {opts}");
    assert_eq!(list_entry(&mp2).unwrap()["mode"], "ro");
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(mp2.join("rw.raw"));
    assert!(w.is_err(), "the fstab line without ro opened for writing");
    let pid = daemon_pid(&mp2);
    umount(&mp2);
    assert_daemon_ends(pid, &mp2, "umount of the fstab mount without ro");
    assert_eq!(std::fs::read(&rw_img).unwrap(), vec![3u8; 1 << 20]);
}

#[test]
fn vdiskfs_mount_takes_o_options() {
    let d = scratch();
    let img = small_qcow2(d.path(), "o.qcow2");
    let m = Mounted::new(
        &[&img],
        &["-o", "ro,mode=0440,gid=65534,single_link,noauto"],
    );
    let meta = std::fs::metadata(m.file("o.raw")).unwrap();
    assert_eq!((meta.gid(), meta.mode() & 0o7777), (65534, 0o440));
    m.unmount();
    // Given both ways: must agree.
    let mp = d.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let o = vdiskfs(&[
        "mount",
        "--mode",
        "0444",
        "-o",
        "mode=0400",
        s(&img),
        s(&mp),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", out_text(&o));
    assert!(out_text(&o).contains("--mode"), "{}", out_text(&o));
    assert_eq!(out_text(&o).trim().lines().count(), 1);
    assert!(!is_mounted(&mp));
}

#[test]
fn sigterm_sigint_umount_and_unmount_end_the_daemon_cleanly() {
    let d = scratch();
    let img = small_qcow2(d.path(), "sig.qcow2");
    for how in ["SIGTERM", "SIGINT", "umount", "vdiskfs unmount"] {
        let m = Mounted::new(&[&img], &[]);
        let mp = m.mountpoint.clone();
        let pid = daemon_pid(&mp);
        assert!(alive(pid) && state_file(pid).exists(), "{how}");
        match how {
            "SIGTERM" | "SIGINT" => {
                let sig = if how == "SIGTERM" {
                    libc::SIGTERM
                } else {
                    libc::SIGINT
                };
                // SAFETY: signalling the daemon we started.
                assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
            }
            "umount" => {
                umount(&mp);
            }
            _ => {
                let o = vdiskfs(&["unmount", s(&mp)]);
                assert!(o.status.success(), "{}", out_text(&o));
                // `vdiskfs unmount` waits for the daemon.
                assert!(
                    !alive(pid),
                    "daemon still running after vdiskfs unmount returned"
                );
            }
        }
        assert_daemon_ends(pid, &mp, how);
        drop(m);
    }
}

#[test]
fn sigkill_leaves_a_dead_mount_that_unmount_clears() {
    let d = scratch();
    let img = small_qcow2(d.path(), "kill.qcow2");
    let m = Mounted::new(&[&img], &[]);
    let mp = m.mountpoint.clone();
    let pid = daemon_pid(&mp);
    // SAFETY: killing the daemon we started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        assert!(Instant::now() < deadline, "SIGKILL did not end {pid}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(is_mounted(&mp), "the dead mount stays");
    let err = std::fs::metadata(mp.join("kill.raw")).unwrap_err();
    // The kernel answers ENOTCONN, or ECONNABORTED while it is still
    // tearing the connection down; on io_uring also ECANCELED (a request
    // handed to a ring entry of the dead task; docs/fuse-uring.md).
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED)
        ),
        "{err}"
    );
    // list still shows it (no daemon behind it).
    let e = list_entry(&mp).expect("list shows the dead mount");
    assert!(e["pid"].is_null(), "{e}");
    let o = vdiskfs(&["unmount", s(&mp)]);
    assert!(o.status.success(), "{}", out_text(&o));
    assert!(!is_mounted(&mp));
    // The killed daemon could not remove its state file; list drops it.
    let _ = vdiskfs(&["list"]);
    assert!(!state_file(pid).exists());
    drop(m);
}

#[test]
fn log_file_gets_the_detached_daemons_lines_and_verbosity_applies() {
    let d = scratch();
    let img = small_qcow2(d.path(), "log.qcow2");
    let verbose = d.path().join("verbose.log");
    let quiet = d.path().join("quiet.log");
    let opt = d.path().join("opt.log");
    let m = Mounted::new(&[&img], &["-v", "--log-file", s(&verbose)]);
    m.unmount();
    let text = std::fs::read_to_string(&verbose).unwrap();
    assert!(text.contains("mounted on"), "{text}");
    assert!(text.contains("unmounted"), "{text}");
    let m = Mounted::new(&[&img], &["-q", "--log-file", s(&quiet)]);
    let mp = m.mountpoint.clone();
    m.unmount();
    let text = std::fs::read_to_string(&quiet).unwrap_or_default();
    assert!(!text.contains("mounted on"), "-q still logs info: {text}");
    let m = Mounted::new(
        &[&img],
        &["-o", &format!("log_file={},log_level=debug", s(&opt))],
    );
    m.unmount();
    let text = std::fs::read_to_string(&opt).unwrap();
    assert!(text.contains("mounted on"), "{text}");
    assert!(!mp.exists() || !is_mounted(&mp));
}

#[test]
fn list_shows_mountpoint_images_mode_and_pid() {
    let d = scratch();
    let a = small_qcow2(d.path(), "la.qcow2");
    let b = small_qcow2(d.path(), "lb.qcow2");
    let m = Mounted::new(&[&a, &b], &[]);
    let mp = m.mountpoint.clone();
    let e = list_entry(&mp).expect("listed");
    let images: Vec<&str> = e["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(images, [s(&a), s(&b)]);
    assert_eq!(e["mode"], "ro");
    let pid = e["pid"].as_u64().unwrap() as u32;
    assert!(alive(pid));
    let text = String::from_utf8(vdiskfs(&["list"]).stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(s(&m.mountpoint)))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains(" ro ") && line.contains(&pid.to_string()),
        "{line}"
    );
    assert!(line.contains(s(&a)) && line.contains(s(&b)), "{line}");
    m.unmount();
    assert!(list_entry(&mp).is_none());
}

/// Builds a 400 MiB raw disk with `table` (an sfdisk script), puts ext4
/// into partition `ext4_part` and xfs into partition `xfs_part`, each
/// holding `hello.txt`, and returns its path and the (number, offset, size)
/// of every partition as sfdisk reports them.
fn partitioned_disk(
    dir: &Path,
    name: &str,
    table: &str,
    fs: &[(u32, &str)],
) -> (PathBuf, Vec<(u32, u64, u64)>) {
    require_tool("sfdisk", "fdisk");
    require_tool("mkfs.xfs", "xfsprogs");
    require_tool("mkfs.ext4", "e2fsprogs");
    let raw = dir.join(name);
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(400 << 20)
        .unwrap();
    let mut c = Command::new("sfdisk");
    c.args(["--no-reread", "--no-tell-kernel", "-q", s(&raw)]);
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(table.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "sfdisk: {}", out_text(&o));
    let json = run(Command::new("sfdisk").args(["--json", s(&raw)]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let ss = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    let mut parts = Vec::new();
    for p in v["partitiontable"]["partitions"].as_array().unwrap() {
        let node = p["node"].as_str().unwrap();
        let n: u32 = node
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap();
        parts.push((
            n,
            p["start"].as_u64().unwrap() * ss,
            p["size"].as_u64().unwrap() * ss,
        ));
    }
    for (n, kind) in fs {
        let &(_, off, size) = parts.iter().find(|p| p.0 == *n).unwrap();
        let dev = run(Command::new("losetup").args([
            "-f",
            "--show",
            "-o",
            &off.to_string(),
            "--sizelimit",
            &size.to_string(),
            s(&raw),
        ]));
        let dev = dev.trim().to_string();
        let mk = match *kind {
            "xfs" => Command::new("mkfs.xfs")
                .args(["-q", "-f", &dev])
                .output()
                .unwrap(),
            _ => Command::new("mkfs.ext4")
                .args(["-q", "-F", &dev])
                .output()
                .unwrap(),
        };
        let mnt = dir.join(format!("fill{n}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let mounted = mk.status.success()
            && Command::new("mount")
                .arg(&dev)
                .arg(&mnt)
                .status()
                .unwrap()
                .success();
        if mounted {
            std::fs::write(mnt.join("hello.txt"), format!("{kind} partition {n}\n")).unwrap();
            let _ = Command::new("umount").arg(&mnt).status();
        }
        let _ = Command::new("losetup").args(["-d", &dev]).status();
        assert!(mounted, "mkfs/mount of {kind} on {dev}: {}", out_text(&mk));
    }
    (raw, parts)
}

/// Loop-mounts `file` read-only and reads hello.txt.
fn read_hello_via_loop(file: &Path, dir: &Path) -> String {
    let mnt = dir.join(format!(
        "lm-{}",
        file.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&mnt).unwrap();
    let o = Command::new("mount")
        .args(["-o", "loop,ro"])
        .arg(file)
        .arg(&mnt)
        .output()
        .unwrap();
    let text = std::fs::read_to_string(mnt.join("hello.txt"));
    if o.status.success() {
        run(Command::new("umount").arg(&mnt));
    }
    assert!(
        o.status.success(),
        "mount -o loop,ro {}: {}",
        file.display(),
        out_text(&o)
    );
    text.unwrap()
}

fn check_partitions(
    dir: &Path,
    raw: &Path,
    parts: &[(u32, u64, u64)],
    fs: &[(u32, &str)],
    scheme: &str,
) {
    require_tool("getfattr", "attr");
    let img = raw.with_extension("qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(raw), s(&img)]);
    let m = Mounted::new(&[&img], &["-o", "ro,partitions"]);
    let stem = img.file_stem().unwrap().to_str().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&m.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = parts
        .iter()
        .map(|p| format!("{stem}-p{}.raw", p.0))
        .collect();
    want.push(format!("{stem}.raw"));
    want.sort();
    assert_eq!(names, want);
    let whole = std::fs::read(raw).unwrap();
    for &(n, off, size) in parts {
        let f = m.file(&format!("{stem}-p{n}.raw"));
        assert_eq!(std::fs::metadata(&f).unwrap().len(), size, "p{n}");
        // The window is byte-exact (check its head and tail).
        let got = std::fs::read(&f).unwrap();
        assert!(
            got == whole[off as usize..(off + size) as usize],
            "p{n} content"
        );
        let x = run(Command::new("getfattr")
            .args(["-d", "-m", "-", "--absolute-names"])
            .arg(&f));
        assert!(
            x.contains(&format!("user.vdiskfs.partition.offset=\"{off}\"")),
            "{x}"
        );
        assert!(
            x.contains(&format!("user.vdiskfs.partition.scheme=\"{scheme}\"")),
            "{x}"
        );
    }
    for (n, kind) in fs {
        let text = read_hello_via_loop(&m.file(&format!("{stem}-p{n}.raw")), dir);
        assert_eq!(text, format!("{kind} partition {n}\n"));
    }
    m.unmount();
}

#[test]
fn partitions_of_mbr_and_gpt_disks_loop_mount() {
    require_root();
    let d = scratch();
    // MBR: p1 ext4, p2 xfs, p3 extended holding logical p5 (ext4) and p6.
    let mbr = "label: dos\n\
               start=2048, size=65536, type=83\n\
               start=67584, size=655360, type=83\n\
               start=722944, type=5\n\
               start=724992, size=32768, type=83\n\
               size=16384, type=7\n";
    let fs = [(1, "ext4"), (2, "xfs"), (5, "ext4")];
    let (raw, parts) = partitioned_disk(d.path(), "mbrdisk.img", mbr, &fs);
    // sfdisk also lists the extended container (3); vdiskfs does not expose it.
    let parts: Vec<_> = parts.into_iter().filter(|p| p.0 != 3).collect();
    assert_eq!(parts.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2, 5, 6]);
    check_partitions(d.path(), &raw, &parts, &fs, "mbr");
    // GPT: p1 ext4, p2 xfs.
    let gpt = "label: gpt\n\
               start=2048, size=65536, name=one\n\
               start=67584, size=655360, name=two\n";
    let fs = [(1, "ext4"), (2, "xfs")];
    let (raw, parts) = partitioned_disk(d.path(), "gptdisk.img", gpt, &fs);
    check_partitions(d.path(), &raw, &parts, &fs, "gpt");
}

#[test]
fn sparseness_matches_qemu_img_map() {
    require_tool("du", "coreutils");
    let d = scratch();
    let base = d.path().join("sb.qcow2");
    let top = d.path().join("st.qcow2");
    qemu_img_line(&format!(
        "create -f qcow2 -o cluster_size=65536 {} 64M",
        s(&base)
    ));
    qemu_io(
        "qcow2",
        &base,
        &[
            "write -P 0x11 0 3M",
            "write -P 0x12 20M 64k",
            "write -c 40M 128k",
        ],
    );
    qemu_img_line(&format!(
        "create -f qcow2 -o cluster_size=65536 -b sb.qcow2 -F qcow2 {} 64M",
        s(&top)
    ));
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x21 2M 2M",
            "write -z 1M 64k",
            "write -P 0x22 63M 1M",
            "write -P 0x23 30M 100k",
        ],
    );
    let want = common::qemu_data_extents(&top, None);
    assert!(want.len() >= 4, "{want:?}");
    let m = Mounted::new(&[&top], &[]);
    let f = m.file("st.raw");
    assert_eq!(
        common::seek_data_extents(&f),
        want,
        "SEEK_DATA/SEEK_HOLE vs qemu-img map"
    );
    let data: u64 = want.iter().map(|(a, b)| b - a).sum();
    let meta = std::fs::metadata(&f).unwrap();
    assert_eq!(
        meta.blocks() * 512,
        data,
        "st_blocks counts the data extents"
    );
    let du = run(Command::new("du").args(["-B1"]).arg(&f));
    assert_eq!(
        du.split_whitespace()
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap(),
        data,
        "du"
    );
    // cp --sparse=always leaves holes.
    let copy = d.path().join("copy.raw");
    run(Command::new("cp").arg("--sparse=always").arg(&f).arg(&copy));
    let copied = std::fs::metadata(&copy).unwrap().blocks() * 512;
    assert!(
        copied <= data + (1 << 20) && copied < meta.len() / 4,
        "copy uses {copied} of {data}"
    );
    assert_eq!(std::fs::read(&copy).unwrap(), qemu_raw(&top, None));
    m.unmount();
}

#[test]
fn xattrs_describe_the_disk() {
    require_tool("getfattr", "attr");
    let d = scratch();
    let base = d.path().join("xb.qcow2");
    let top = d.path().join("xt.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "16M"]);
    qemu_img_line(&format!(
        "create -f qcow2 -b xb.qcow2 -F qcow2 {} 16M",
        s(&top)
    ));
    let m = Mounted::new(&[&top], &[]);
    let x = run(Command::new("getfattr")
        .args(["-d", "-m", "-", "--absolute-names"])
        .arg(m.file("xt.raw")));
    assert!(x.contains("user.vdiskfs.format=\"qcow2\""), "{x}");
    assert!(
        x.contains(&format!("user.vdiskfs.virtual_size=\"{}\"", 16 << 20)),
        "{x}"
    );
    assert!(
        x.contains(&format!(
            "user.vdiskfs.chain=\"qcow2:{}\\012qcow2:{}\"",
            s(&top),
            s(&base)
        )),
        "{x}"
    );
    assert!(x.contains("user.vdiskfs.backing_file=\"xb.qcow2\""), "{x}");
    assert!(x.contains("user.vdiskfs.refcount_bits=\"16\""), "{x}");
    let one = run(Command::new("getfattr")
        .args(["--only-values", "-n", "user.vdiskfs.format"])
        .arg(m.file("xt.raw")));
    assert_eq!(one, "qcow2");
    m.unmount();
    // VMDK: adapter type, geometry, CID and every ddb.* key of the descriptor.
    let vmdk = d.path().join("xv.vmdk");
    qemu_img_line(&format!(
        "create -f vmdk -o adapter_type=lsilogic,subformat=monolithicSparse {} 64M",
        s(&vmdk)
    ));
    let desc = std::fs::read(&vmdk).unwrap();
    let desc = String::from_utf8_lossy(&desc[512..1536]).to_string();
    let cid = desc
        .lines()
        .find_map(|l| l.strip_prefix("CID="))
        .expect("CID in descriptor")
        .to_string();
    let cid = format!("{:08x}", u32::from_str_radix(&cid, 16).unwrap());
    let m = Mounted::new(&[&vmdk], &[]);
    let x = run(Command::new("getfattr")
        .args(["-d", "-m", "-", "--absolute-names"])
        .arg(m.file("xv.raw")));
    for want in [
        "user.vdiskfs.format=\"vmdk\"".to_string(),
        "user.vdiskfs.adapter_type=\"lsilogic\"".to_string(),
        "user.vdiskfs.ddb.adapterType=\"lsilogic\"".to_string(),
        "user.vdiskfs.geometry.heads=\"255\"".to_string(),
        "user.vdiskfs.ddb.geometry.sectors=\"63\"".to_string(),
        "user.vdiskfs.ddb.virtualHWVersion=\"4\"".to_string(),
        "user.vdiskfs.create_type=\"monolithicSparse\"".to_string(),
        format!("user.vdiskfs.cid=\"{cid}\""),
    ] {
        assert!(x.contains(&want), "{want} missing in {x}");
    }
    m.unmount();
}

#[test]
fn loop_device_with_direct_io_reads_correctly() {
    require_root();
    require_tool("losetup", "mount");
    let d = scratch();
    let img = d.path().join("dio.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "16M"]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0x42 0 5M",
            "write -c 8M 1M",
            "write -P 0x43 15M 1M",
        ],
    );
    let expected = qemu_raw(&img, None);
    let m = Mounted::new(&[&img], &[]);
    let file = m.file("dio.raw");
    // O_DIRECT opens of the exposed file work, and aligned reads are exact.
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&file)
            .expect("O_DIRECT open of the exposed file");
        let mut storage = vec![0u8; (1 << 20) + 4096];
        let shift = storage.as_ptr().align_offset(4096);
        let buf = &mut storage[shift..shift + (1 << 20)];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(buf, 7 << 20).unwrap();
        assert!(buf[..] == expected[7 << 20..8 << 20]);
    }
    let dev = run(Command::new("losetup")
        .args(["--direct-io=on", "-r", "-f", "--show"])
        .arg(&file));
    let dev = dev.trim().to_string();
    let dio = Command::new("losetup")
        .args(["-n", "-O", "DIO", &dev])
        .output()
        .unwrap();
    let got = std::fs::read(&dev);
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    assert_eq!(
        String::from_utf8_lossy(&dio.stdout).trim(),
        "1",
        "loop device is not using direct I/O"
    );
    assert!(got.unwrap() == expected, "loop device content differs");
    m.unmount();
}

#[test]
fn single_link_and_unbuffered() {
    let d = scratch();
    let base = d.path().join("ub.raw");
    let top = d.path().join("ut.qcow2");
    std::fs::write(&base, vec![0x11u8; 4 << 20]).unwrap();
    qemu_img_line(&format!("create -f qcow2 -b ub.raw -F raw {} 4M", s(&top)));
    qemu_io(
        "qcow2",
        &top,
        &["write -P 0x22 1M 64k", "write -P 0x23 3000k 5k"],
    );
    // --single-link: only the top layer; unallocated reads as zeros.
    let m = Mounted::new(&[&top], &["--single-link"]);
    let got = std::fs::read(m.file("ut.raw")).unwrap();
    m.unmount();
    let mut want = vec![0u8; 4 << 20];
    let full = qemu_raw(&top, None);
    for (off, len) in [(1 << 20, 64 << 10), (2944 << 10, 64 << 10)] {
        // qemu allocates whole clusters (64 KiB), copying the backing data in.
        want[off..off + len].copy_from_slice(&full[off..off + len]);
    }
    assert!(got == want, "single-link view differs");
    // --unbuffered: byte-exact, image files held with O_DIRECT.
    for opts in [&["--unbuffered"][..], &["-o", "ro,unbuffered"][..]] {
        let m = Mounted::new(&[&top], opts);
        let pid = daemon_pid(&m.mountpoint);
        let mut direct = 0;
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
            let fd = fd.unwrap();
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            if target == top || target == base {
                let info = std::fs::read_to_string(format!(
                    "/proc/{pid}/fdinfo/{}",
                    fd.file_name().to_string_lossy()
                ))
                .unwrap();
                let flags = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .unwrap()
                    .trim();
                let flags = u32::from_str_radix(flags, 8).unwrap();
                assert_ne!(
                    flags & libc::O_DIRECT as u32,
                    0,
                    "{} opened without O_DIRECT",
                    target.display()
                );
                direct += 1;
            }
        }
        assert_eq!(direct, 2, "both layers open with O_DIRECT");
        let got = std::fs::read(m.file("ut.raw")).unwrap();
        assert!(got == full, "--unbuffered read differs");
        // Odd offsets and lengths too.
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(m.file("ut.raw")).unwrap();
        let mut buf = vec![0u8; 70_001];
        f.read_exact_at(&mut buf, 1_000_003).unwrap();
        assert!(buf[..] == full[1_000_003..1_070_004]);
        drop(f);
        m.unmount();
    }
}

#[test]
fn other_users_need_allow_other() {
    require_root();
    let d = scratch();
    let img = small_qcow2(d.path(), "ao.qcow2");
    let expected = qemu_raw(&img, None);
    for (opts, readable) in [
        (vec![], false),
        (vec!["--mode", "0444"], false),
        (vec!["--allow-other"], false),
        (vec!["--allow-other", "--mode", "0444"], true),
        (vec!["--allow-other", "--uid", "65534"], true),
    ] {
        let mp = open_dir(d.path(), "aomp");
        let mut args = vec!["mount"];
        args.extend_from_slice(&opts);
        args.extend([s(&img), s(&mp)]);
        let o = vdiskfs(&args);
        assert!(o.status.success(), "{}", out_text(&o));
        let r = read_as_nobody(&mp.join("ao.raw"));
        let _ = vdiskfs(&["unmount", s(&mp)]);
        assert_eq!(
            r.status.success(),
            readable,
            "{opts:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        if readable {
            assert!(r.stdout == expected);
        } else {
            assert!(
                String::from_utf8_lossy(&r.stderr).contains("denied"),
                "{opts:?}: {}",
                out_text(&r)
            );
        }
    }
}
