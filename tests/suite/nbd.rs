//! `vdiskfs serve` against real NBD clients: qemu-img, qemu-io, nbdinfo,
//! nbdcopy and nbdfuse (Debian packages qemu-utils, libnbd-bin, nbdfuse).
//! The read oracle is `qemu-img convert -O raw` of the image; maps are
//! compared with qemu-nbd serving the same chain and with `qemu-img map`.
//! (nbd-client cannot be tested: this kernel has no nbd module.)

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::manifest::Want;
use common::nbd::{nbdinfo_size, Served};
use common::{qemu_img, qemu_raw, require_tool, run};

fn need_libnbd() {
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("nbdcopy", "libnbd-bin");
}

/// A two-layer qcow2 chain with data in both layers, a zero cluster in
/// the top, compressed clusters in the base and unallocated ranges.
fn chain(dir: &Path) -> PathBuf {
    common::qcow2_pair(
        dir,
        "64M",
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 8M 512k",
            "write -c -P 0x77 16M 256k",
            "write -P 0x42 63M 1M",
        ],
        &[
            "write -P 0x11 512k 1M",
            "write -z 8M 64k",
            "write -P 0x99 40M 100k",
        ],
    )
}

/// A child process killed when the test ends, passed or failed.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbdinfo_map(uri: &str, ctx: &str) -> String {
    run(Command::new("nbdinfo").arg(format!("--map={ctx}")).arg(uri))
}

#[test]
fn qemu_img_info_convert_compare_read_the_chain_byte_exact() {
    let dir = common::scratch();
    let top = chain(dir.path());
    let s = Served::new(&[&top], &[]);
    let uri = s.uri("disk");
    let info = qemu_img(&["info", "--output=json", &uri]);
    assert!(info.contains("\"virtual-size\": 67108864"), "{info}");
    let out = dir.path().join("out.raw");
    qemu_img(&["convert", "-O", "raw", &uri, out.to_str().unwrap()]);
    let expected = qemu_raw(&top, None);
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "convert over NBD differs"
    );
    qemu_img(&["compare", "-f", "qcow2", top.to_str().unwrap(), &uri]);
    let (status, err) = s.stop();
    assert!(status.success(), "{err}");
}

#[test]
fn maps_equal_qemu_nbd_and_qemu_img_map() {
    need_libnbd();
    require_tool("qemu-nbd", "qemu-utils");
    let dir = common::scratch();
    let top = chain(dir.path());
    let s = Served::new(&[&top], &[]);
    let qsock = dir.path().join("q.sock");
    let q = Command::new("qemu-nbd")
        .args(["-t", "-A", "-r", "-f", "qcow2", "-x", "disk", "-k"])
        .arg(&qsock)
        .arg(&top)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let q = KillOnDrop(q);
    while std::os::unix::net::UnixStream::connect(&qsock).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let quri = format!("nbd+unix:///disk?socket={}", qsock.display());
    for ctx in ["base:allocation", "qemu:allocation-depth"] {
        let ours = nbdinfo_map(&s.uri("disk"), ctx);
        let theirs = nbdinfo_map(&quri, ctx);
        assert_eq!(ours, theirs, "--map={ctx}: vdiskfs vs qemu-nbd");
    }
    drop(q);
    // And against qemu-img map: every range qemu calls data is data here,
    // every other range a hole that reads as zeros.
    let map: serde_json::Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", top.to_str().unwrap()])).unwrap();
    let mut want: Vec<(u64, u64, u32)> = Vec::new();
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let flags = if e["data"].as_bool().unwrap() { 0 } else { 3 };
        match want.last_mut() {
            Some((_, l, f)) if *f == flags => *l += len,
            _ => want.push((start, len, flags)),
        }
    }
    let ours: Vec<(u64, u64, u32)> = nbdinfo_map(&s.uri("disk"), "base:allocation")
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(ours, want, "base:allocation vs qemu-img map");
}

#[test]
fn nbdcopy_every_manifest_image_byte_exact() {
    need_libnbd();
    let mut checked = 0;
    let mut failures = Vec::new();
    for row in common::manifest::rows(common::manifest::MANIFEST) {
        if !["qcow2", "vmdk", "raw", "qcow"].contains(&row.format.as_str()) {
            continue;
        }
        let file = &row.file;
        let path = row.path();
        let served = Served::try_new(&[&path], &[]);
        let s = match (served, &row.want) {
            (Err(_), Want::Refuse) => continue,
            (Err(e), Want::Either(_)) => {
                eprintln!("{file}: refused ({e})");
                continue;
            }
            (Err(e), Want::Sha(_)) => {
                failures.push(format!("{file}: not served: {e}"));
                continue;
            }
            (Ok(_), Want::Refuse) => {
                failures.push(format!("{file}: served, but the manifest says refuse"));
                continue;
            }
            (Ok(s), _) => s,
        };
        let want = row.want.sha().unwrap_or_default();
        let name = vdiskfs::nbd::export_name(&path).unwrap();
        let out = tempfile::NamedTempFile::new().unwrap();
        let conns = if checked % 2 == 0 { "1" } else { "4" };
        let o = Command::new("nbdcopy")
            .args(["--connections", conns, &s.uri(&name)])
            .arg(out.path())
            .output()
            .unwrap();
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            failures.push(format!("{file}: nbdcopy: {err}"));
            continue;
        }
        let got = common::sha256_file(out.path());
        if got != want {
            failures.push(format!("{file}: sha256 {got}, manifest {want}"));
        }
        checked += 1;
        let (status, err) = s.stop();
        if !status.success() {
            failures.push(format!("{file}: server exit {status}: {err}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 15, "only {checked} images checked");
}

#[test]
fn multi_conn_nbdcopy_reads_a_chain_exactly() {
    need_libnbd();
    let dir = common::scratch();
    let top = chain(dir.path());
    let s = Served::new(&[&top], &[]);
    let info = run(Command::new("nbdinfo").arg(s.uri("disk")));
    assert!(info.contains("can_multi_conn: true"), "{info}");
    let expected = qemu_raw(&top, None);
    for conns in ["2", "4"] {
        let out = dir.path().join(format!("copy{conns}.raw"));
        run(Command::new("nbdcopy")
            .args([
                "--connections",
                conns,
                "--requests",
                "16",
                "--request-size",
                "65536",
            ])
            .arg(s.uri("disk"))
            .arg(&out));
        assert!(
            std::fs::read(&out).unwrap() == expected,
            "nbdcopy --connections {conns}"
        );
    }
}

#[test]
fn qemu_io_random_writes_verified_then_qemu_img_check_clean() {
    let dir = common::scratch();
    let top = chain(dir.path());
    let mut model = qemu_raw(&top, None);
    let s = Served::new(&[&top], &["--rw"]);
    let uri = s.uri("disk");
    let info = run(Command::new("nbdinfo").arg(&uri));
    assert!(
        info.contains("is_read_only: false") && info.contains("can_zero: true"),
        "{info}"
    );
    let mut rng = common::rng::Rng::new(1919);
    let mut cmds = Vec::new();
    for i in 0..60 {
        let len = 1 + rng.below(200_000);
        let off = rng.below(model.len() as u64 - len);
        let pat = (i * 7 + 1) as u8;
        if i % 5 == 4 {
            cmds.push(format!("write -z {off} {len}"));
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            cmds.push(format!("write -P {pat} {off} {len}"));
            model[off as usize..(off + len) as usize].fill(pat);
        }
    }
    cmds.push("flush".into());
    let mut q = Command::new("qemu-io");
    q.args(["-f", "raw"]);
    for c in &cmds {
        q.arg("-c").arg(c);
    }
    run(q.arg(&uri));
    // Verify through qemu-io's own pattern reads at a few places, then whole.
    let mut r = Command::new("qemu-io");
    r.args(["-f", "raw", "-r"]);
    for c in cmds.iter().rev().take(6).filter(|c| c.contains("-P")) {
        r.arg("-c").arg(c.replacen("write", "read", 1));
    }
    let out = run(r.arg(&uri));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let copy = dir.path().join("nbd.raw");
    qemu_img(&["convert", "-O", "raw", &uri, copy.to_str().unwrap()]);
    assert!(
        std::fs::read(&copy).unwrap() == model,
        "reads after writes over NBD"
    );
    let (status, err) = s.stop();
    assert!(status.success(), "{err}");
    qemu_img(&["check", "-q", top.to_str().unwrap()]);
    assert!(
        qemu_raw(&top, None) == model,
        "the image after the server stopped"
    );
}

#[test]
fn snapshot_writes_vanish_and_overlay_writes_stay() {
    let dir = common::scratch();
    let top = chain(dir.path());
    let before = qemu_raw(&top, None);
    let s = Served::new(&[&top], &["--snapshot"]);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 5 0 1M"])
        .arg(s.uri("disk")));
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 5 0 1M"])
        .arg(s.uri("disk")));
    assert!(!out.contains("failed"), "{out}");
    let (status, err) = s.stop();
    assert!(status.success(), "{err}");
    assert!(
        qemu_raw(&top, None) == before,
        "--snapshot wrote into the image"
    );
    let ov = dir.path().join("ov.qcow2");
    let s = Served::new(&[&top], &["--overlay", ov.to_str().unwrap()]);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 6 4M 64k"])
        .arg(s.uri("disk")));
    let _ = s.stop();
    qemu_img(&["check", "-q", ov.to_str().unwrap()]);
    let mut want = before.clone();
    want[4 << 20..(4 << 20) + 65536].fill(6);
    assert!(qemu_raw(&ov, None) == want);
    assert!(qemu_raw(&top, None) == before);
}

#[test]
fn nbdfuse_mounts_the_export() {
    require_tool("nbdfuse", "nbdfuse");
    common::fuse::require_fuse();
    let dir = common::scratch();
    let top = chain(dir.path());
    let s = Served::new(&[&top], &[]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let f = Command::new("nbdfuse")
        .arg("-r")
        .arg(&mnt)
        .arg("--uri")
        .arg(s.uri("disk"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut f = KillOnDrop(f);
    let file = mnt.join("nbd");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nbdfuse did not mount"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let got = std::fs::read(&file);
    let c = std::ffi::CString::new(mnt.to_str().unwrap()).unwrap();
    // The kernel may still be releasing the file just read (FUSE RELEASE
    // is asynchronous): EBUSY for a moment is not a failure.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let rc = loop {
        // SAFETY: c is a valid NUL-terminated path.
        let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
        let busy = std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY);
        if rc == 0 || !busy || std::time::Instant::now() >= deadline {
            break rc;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(
        rc,
        0,
        "umount {}: {}",
        mnt.display(),
        std::io::Error::last_os_error()
    );
    let _ = f.0.wait();
    assert!(got.unwrap() == qemu_raw(&top, None), "nbdfuse view differs");
}

#[test]
fn several_exports_list_and_refusals() {
    need_libnbd();
    let dir = common::scratch();
    let top = chain(dir.path());
    let raw = dir.path().join("plain.img");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let s = Served::new(&[&top, &raw], &[]);
    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix://?socket={}", s.socket.display())));
    assert!(
        list.contains("export=\"disk\"") && list.contains("export=\"plain\""),
        "{list}"
    );
    // The default (empty) export name is the first image.
    let size = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd+unix://?socket={}", s.socket.display())));
    assert_eq!(size.trim(), "67108864");
    drop(s);
    // Two images with one stem, and a bad listen address: one-line errors.
    let other = dir.path().join("sub");
    std::fs::create_dir(&other).unwrap();
    std::fs::copy(&raw, other.join("plain.img")).unwrap();
    let e = Served::try_new(&[&raw, &other.join("plain.img")], &[])
        .err()
        .unwrap();
    assert!(e.contains("plain"), "{e}");
    let o = common::fuse::vdiskfs(&["serve", "--listen", "tcp:nohost", raw.to_str().unwrap()]);
    assert!(!o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr).lines().count(), 1);
}

#[test]
fn mount_nbd_serves_the_mounted_disks_and_list_shows_the_endpoint() {
    need_libnbd();
    let dir = common::scratch();
    let top = chain(dir.path());
    let sock = dir.path().join("m.sock");
    let listen = format!("unix:{}", sock.display());
    let m = common::fuse::Mounted::new(&[&top], &["--nbd", &listen]);
    let expected = qemu_raw(&top, None);
    assert!(std::fs::read(m.file("disk.raw")).unwrap() == expected);
    let out = dir.path().join("copy.raw");
    run(Command::new("nbdcopy")
        .arg(format!("nbd+unix:///disk?socket={}", sock.display()))
        .arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "NBD view of the mount"
    );
    let list = run(Command::new(common::fuse::bin()).arg("list"));
    assert!(
        list.contains(&format!("nbd: nbd+unix:///?socket={}", sock.display())),
        "{list}"
    );
    m.unmount();
    assert!(!sock.exists(), "the NBD socket outlived the unmount");
}

/// Writes that reach a writable mount over NBD are seen through its FUSE
/// file: the kernel's cached pages of the range are dropped (the file is
/// opened with FOPEN_KEEP_CACHE) and `st_blocks` counts the new clusters.
#[test]
fn nbd_writes_to_a_writable_mount_are_seen_through_its_file() {
    use std::os::unix::fs::MetadataExt;
    need_libnbd();
    let dir = common::scratch();
    let top = chain(dir.path());
    let overlay = dir.path().join("over.qcow2");
    let sock = dir.path().join("w.sock");
    let listen = format!("unix:{}", sock.display());
    let m = common::fuse::Mounted::new(
        &[&top],
        &["--overlay", overlay.to_str().unwrap(), "--nbd", &listen],
    );
    let file = m.file("disk.raw");
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    // Read (and so cache) the whole file, and count its blocks.
    let before = std::fs::read(&file).unwrap();
    let blocks = std::fs::metadata(&file).unwrap().blocks();
    // 1 MiB into a hole of every layer (32 MiB), 64 KiB over data (0).
    common::qemu_io(
        "raw",
        Path::new(&uri),
        &["write -P 0x5c 32M 1M", "write -P 0x3a 0 64k"],
    );
    let after = std::fs::read(&file).unwrap();
    let mut want = before.clone();
    want[32 << 20..33 << 20].fill(0x5c);
    want[..64 << 10].fill(0x3a);
    assert!(
        after == want,
        "the FUSE file does not show the NBD writes (first difference at {:?})",
        after.iter().zip(&want).position(|(a, b)| a != b)
    );
    let grown = std::fs::metadata(&file).unwrap().blocks();
    assert!(
        grown >= blocks + (1 << 20) / 512,
        "st_blocks {blocks} -> {grown} after 1 MiB written into a hole over NBD"
    );
    m.unmount();
    common::qemu_img(&["check", "-q", overlay.to_str().unwrap()]);
    assert!(common::qemu_raw(&overlay, Some("qcow2")) == want);
}

#[test]
fn serve_fork_detaches_lists_and_stops_on_sigterm() {
    need_libnbd();
    let dir = common::scratch();
    let top = chain(dir.path());
    let sock = dir.path().join("f.sock");
    let o = common::fuse::vdiskfs(&[
        "serve",
        "--fork",
        "--listen",
        &format!("unix:{}", sock.display()),
        top.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Listening as soon as --fork returns.
    let size = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd+unix:///disk?socket={}", sock.display())));
    assert_eq!(size.trim(), "67108864");
    let list = run(Command::new(common::fuse::bin()).args(["list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let me = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["nbd"].to_string().contains(sock.to_str().unwrap()))
        .unwrap_or_else(|| panic!("serve daemon not listed: {list}"));
    let pid = me["pid"].as_u64().unwrap() as u32;
    // SAFETY: kill with a pid vdiskfs reported for its own daemon.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    common::fuse::wait_gone(pid);
    assert!(!sock.exists(), "socket left behind");
    // A failure in the detached server reaches the command that started it.
    common::fuse::assert_refused_with(
        &[
            "serve",
            "--fork",
            "--listen",
            "unix:/nonexistent-dir/x.sock",
            top.to_str().unwrap(),
        ],
        "nonexistent-dir",
    );
}

#[test]
fn tcp_allow_list_admits_and_refuses_clients() {
    need_libnbd();
    let dir = common::scratch();
    let raw = dir.path().join("plain.img");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    for (allow, admitted) in [("127.0.0.0/8", true), ("10.0.0.0/8", false)] {
        let port = common::free_port();
        let mut child = KillOnDrop(
            Command::new(common::fuse::bin())
                .args(["serve", "--listen", &format!("tcp:127.0.0.1:{port}")])
                .args(["--allow", allow])
                .arg(&raw)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(child.0.try_wait().unwrap().is_none(), "serve exited");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let o = nbdinfo_size(format!("nbd://127.0.0.1:{port}/plain"));
        assert_eq!(o.status.success(), admitted, "--allow {allow}");
        if admitted {
            assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1048576");
        }
    }
}
