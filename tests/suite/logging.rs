//! libvirt-style `--log-level` outputs and `--log-filters` on a real mount:
//! each output keeps its own minimum level, records keep theirs, filters
//! pick modules, and a log file that cannot be opened fails the mount.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fuse::{bin, require_fuse, vdiskfs};
use common::{qemu_img, scratch};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Mounts `image` in the foreground with `opts` (and --partitions, whose
/// missing partition table gives one deterministic warning), reads the disk,
/// unmounts; returns the daemon's stderr.
fn foreground_mount(image: &Path, mp: &Path, opts: &[&str]) -> String {
    require_fuse();
    let mut child = Command::new(bin())
        .args(["mount", "-f", "--partitions"])
        .args(opts)
        .args([s(image), s(mp)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run vdiskfs");
    let file = mp.join("disk.raw");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !file.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the mount exited early"
        );
        assert!(
            Instant::now() < deadline,
            "the mount did not go live in 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(&file).unwrap().len(), 1 << 20);
    let out = vdiskfs(&["unmount", s(mp)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn each_output_keeps_its_own_level() {
    let tmp = scratch();
    let img = tmp.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let log = tmp.path().join("x.log");
    let spec = format!("1:file:{} 3:stderr", s(&log));
    let stderr = foreground_mount(&img, &mp, &["--log-level", &spec]);
    let file = std::fs::read_to_string(&log).unwrap();
    // The file has everything from debug up, each line with its own level.
    assert!(file.contains("] DEBUG "), "{file}");
    assert!(
        file.contains("] INFO vdiskfs::cli::mount: mounted on"),
        "{file}"
    );
    assert!(file.contains("] WARN vdiskfs::fs::partitions:"), "{file}");
    // stderr only warnings and errors.
    assert!(
        stderr.contains("WARN vdiskfs::fs::partitions:") && stderr.contains("no MBR or GPT"),
        "{stderr}"
    );
    for line in stderr.lines() {
        assert!(
            line.contains("] WARN ") || line.contains("] ERROR "),
            "a line below warning on stderr: {line}"
        );
    }

    // Filters: fuser's debug lines dropped, ours kept (the -o spelling).
    std::fs::remove_file(&log).unwrap();
    let opt = format!("log_level=1:file:{},log_filters=4:fuser 1:*", s(&log));
    foreground_mount(&img, &mp, &["-o", &opt]);
    let file = std::fs::read_to_string(&log).unwrap();
    assert!(!file.contains("fuser::"), "{file}");
    assert!(
        file.contains("] INFO vdiskfs::cli::mount: mounted on"),
        "{file}"
    );
}

#[test]
fn a_log_output_that_cannot_be_opened_fails_the_mount() {
    let tmp = scratch();
    let img = tmp.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let bad = tmp.path().join("no/such/dir/x.log");
    for fg in [false, true] {
        let spec = format!("1:file:{} 3:stderr", s(&bad));
        let mut args = vec!["mount", "--log-level", &spec, s(&img), s(&mp)];
        if fg {
            args.insert(1, "-f");
        }
        let out = vdiskfs(&args);
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(
            e.contains("x.log") && e.contains("cannot open the log file"),
            "{e}"
        );
    }
    let out = vdiskfs(&["mount", "--log-level", "1:journald", s(&img), s(&mp)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("journald output is not supported"));
    let out = vdiskfs(&[
        "mount",
        "--log-level",
        "1:stderr",
        "--log-file",
        "/tmp/x.log",
        s(&img),
        s(&mp),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("give the file as LEVEL:file:/PATH"));
}
