//! End-to-end: real FUSE mounts through the `vdiskfs` binary.

use crate::common;
use common::qemu_img_line;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::fuse::{vdiskfs, Mounted};
use common::{qemu_img, qemu_io, qemu_raw, scratch};

/// A qcow2 over a qcow2 over a short raw base, with data in every layer.
fn make_chain(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-f", "raw", base.to_str().unwrap(), "3M"]);
    qemu_io("raw", &base, &["write -P 0x11 0 3M"]);
    qemu_img_line(&format!(
        "create -f qcow2 -o cluster_size=4096 -b base.raw -F raw {} 6M",
        mid.to_str().unwrap()
    ));
    qemu_io("qcow2", &mid, &["write -P 0x22 1M 2M", "write -z 2M 4k"]);
    qemu_img_line(&format!(
        "create -f qcow2 -b mid.qcow2 -F qcow2 {} 8M",
        top.to_str().unwrap()
    ));
    qemu_io(
        "qcow2",
        &top,
        &["write -P 0x33 2500k 1M", "write -c 7M 64k"],
    );
    top
}

#[test]
fn directory_mount_exposes_each_image_byte_exact() {
    let d = scratch();
    let top = make_chain(d.path());
    let raw = d.path().join("plain.img");
    std::fs::write(
        &raw,
        (0..1_000_000u32)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let m = Mounted::new(&[&top, &raw], &[]);
    let mut names: Vec<String> = std::fs::read_dir(&m.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["plain.raw", "top.raw"]);
    let got = std::fs::read(m.file("top.raw")).unwrap();
    common::assert_same(&got, &qemu_raw(&top, None), &top, 0);
    assert_eq!(
        std::fs::read(m.file("plain.raw")).unwrap(),
        std::fs::read(&raw).unwrap()
    );
    m.unmount();
}

#[test]
fn regular_file_mountpoint_becomes_the_raw_view() {
    let d = scratch();
    let top = make_chain(d.path());
    let view = d.path().join("view.raw");
    std::fs::write(&view, b"").unwrap();
    let out = vdiskfs(&["mount", top.to_str().unwrap(), view.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = std::fs::read(&view);
    let un = vdiskfs(&["unmount", view.to_str().unwrap()]);
    assert!(
        un.status.success(),
        "{}",
        String::from_utf8_lossy(&un.stderr)
    );
    common::assert_same(&got.unwrap(), &qemu_raw(&top, None), &top, 0);
    assert_eq!(
        std::fs::metadata(&view).unwrap().len(),
        0,
        "the file is itself again"
    );
}

#[test]
fn concurrent_random_reads_match_the_oracle() {
    let d = scratch();
    let img = d.path().join("rand.qcow2");
    qemu_img_line(&format!(
        "create -f qcow2 -o cluster_size=65536 {} 32M",
        img.to_str().unwrap()
    ));
    // Compressed writes only go to unallocated clusters: do them first.
    let mut cmds = vec!["write -c 16M 1M".to_string()];
    for i in 0..40u64 {
        cmds.push(format!(
            "write -P {} {} {}",
            i + 1,
            (i * 797 * 1024) % (31 << 20),
            300 * 1024
        ));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow2", &img, &refs);
    let expected = std::sync::Arc::new(qemu_raw(&img, None));
    let m = Mounted::new(&[&img], &[]);
    let path = m.file("rand.raw");
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let path = path.clone();
            let expected = expected.clone();
            std::thread::spawn(move || {
                let f = std::fs::File::open(&path).unwrap();
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                for _ in 0..300 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let len = (seed % (256 * 1024)) as usize + 1;
                    let off = (seed >> 20) % (expected.len() - len) as u64;
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, off).unwrap();
                    assert!(
                        buf == expected[off as usize..off as usize + len],
                        "mismatch at {off:#x}+{len}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    m.unmount();
}

#[test]
fn loop_device_mounts_the_guest_filesystem() {
    common::require_tool("mkfs.ext4", "e2fsprogs");
    common::require_tool("losetup", "mount");
    let d = scratch();
    let raw = d.path().join("fs.raw");
    let img = d.path().join("guest.qcow2");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    // Populate through mkfs -d with a known file.
    let content = d.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("hello.txt"), b"hello from the guest\n").unwrap();
    common::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&content)
            .arg(&raw),
    );
    qemu_img_line(&format!(
        "convert -f raw -O qcow2 -c {} {}",
        raw.to_str().unwrap(),
        img.to_str().unwrap()
    ));
    let m = Mounted::new(&[&img], &[]);
    let dev = common::run(
        Command::new("losetup")
            .args(["-f", "--show", "-r"])
            .arg(m.file("guest.raw")),
    );
    let dev = dev.trim().to_string();
    let fsdir = d.path().join("guestfs");
    std::fs::create_dir(&fsdir).unwrap();
    let mounted = Command::new("mount")
        .args(["-o", "ro", &dev])
        .arg(&fsdir)
        .status()
        .unwrap();
    let text = std::fs::read_to_string(fsdir.join("hello.txt"));
    if mounted.success() {
        let _ = Command::new("umount").arg(&fsdir).status();
    }
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    assert!(mounted.success(), "mount of {dev} failed");
    assert_eq!(text.unwrap(), "hello from the guest\n");
    m.unmount();
}

#[test]
fn damaged_cluster_entry_fails_only_its_range_with_eio() {
    let d = scratch();
    let img = d.path().join("dmg.qcow2");
    qemu_img_line(&format!(
        "create -f qcow2 -o cluster_size=65536 {} 4M",
        img.to_str().unwrap()
    ));
    qemu_io("qcow2", &img, &["write -P 0xaa 0 4M"]);
    // Point the L2 entry of guest cluster 5 far past the end of the file.
    let out = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    assert!(out.contains("offset"));
    let bytes = std::fs::read(&img).unwrap();
    let l1_off = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2_off = (u64::from_be_bytes(bytes[l1_off..l1_off + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00) as usize;
    let e = l2_off + 5 * 8;
    let bad = (1u64 << 63) | (1u64 << 40);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&bad.to_be_bytes(), e as u64).unwrap();
    drop(f);
    // info prints its report, names the damage, and exits 1.
    let info = vdiskfs(&["info", img.to_str().unwrap()]);
    assert_eq!(info.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&info.stdout).contains("DAMAGED"));
    let err = String::from_utf8_lossy(&info.stderr);
    assert!(
        err.contains("damaged") && err.contains("dmg.qcow2"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let m = Mounted::new(&[&img], &[]);
    let file = std::fs::File::open(m.file("dmg.raw")).unwrap();
    let mut buf = vec![0u8; 65536];
    let err = file.read_exact_at(&mut buf, 5 * 65536).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    file.read_exact_at(&mut buf, 6 * 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 0xaa));
    file.read_exact_at(&mut buf, 4 * 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 0xaa));
    drop(file);
    m.unmount();
}

#[test]
fn writes_are_refused_on_a_read_only_mount() {
    let d = scratch();
    let raw = d.path().join("ro.img");
    std::fs::write(&raw, vec![1u8; 65536]).unwrap();
    let before = std::fs::metadata(&raw).unwrap().modified().unwrap();
    let m = Mounted::new(&[&raw], &[]);
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(m.file("ro.raw"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    m.unmount();
    assert_eq!(std::fs::read(&raw).unwrap(), vec![1u8; 65536]);
    assert_eq!(std::fs::metadata(&raw).unwrap().modified().unwrap(), before);
}

#[test]
fn bad_invocations_fail_with_one_line_naming_the_problem() {
    let d = scratch();
    let a = d.path().join("a");
    std::fs::create_dir(&a).unwrap();
    let img1 = a.join("disk.img");
    let img2 = d.path().join("disk.qcow2");
    std::fs::write(&img1, vec![0u8; 4096]).unwrap();
    qemu_img(&["create", "-f", "qcow2", img2.to_str().unwrap(), "1M"]);
    std::fs::copy(&img2, d.path().join("z.qcow2")).unwrap();
    let mp = d.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                img1.display().to_string(),
                img2.display().to_string(),
                mp.display().to_string(),
            ],
            "disk.raw",
        ),
        (
            vec![
                d.path().join("missing.qcow2").display().to_string(),
                mp.display().to_string(),
            ],
            "missing.qcow2",
        ),
        (
            vec![
                img1.display().to_string(),
                d.path().join("nodir").display().to_string(),
            ],
            "nodir",
        ),
        (
            vec![
                "--overlay".into(),
                d.path().join("o.qcow2").display().to_string(),
                img1.display().to_string(),
                d.path()
                    .join("disk.qcow2")
                    .display()
                    .to_string()
                    .replace("disk.qcow2", "z.qcow2"),
                mp.display().to_string(),
            ],
            "exactly one image",
        ),
        (
            vec![
                "--format".into(),
                "cloop".into(),
                img1.display().to_string(),
                mp.display().to_string(),
            ],
            "cloop",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["mount".to_string()];
        full.extend(args);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = vdiskfs(&refs);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{full:?} succeeded");
        assert!(err.contains(needle), "{full:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{full:?}: {err}");
    }
    assert!(
        std::fs::read_dir(&mp).unwrap().next().is_none(),
        "nothing got mounted"
    );
}

#[test]
fn sigterm_and_unmount_end_the_daemon_and_list_shows_it() {
    let d = scratch();
    let raw = d.path().join("sig.img");
    std::fs::write(&raw, vec![7u8; 8192]).unwrap();
    let m = Mounted::new(&[&raw], &[]);
    let entry = common::fuse::listed(&m);
    assert_eq!(entry["mode"], "ro");
    let pid = entry["pid"].as_u64().unwrap() as i32;
    // SAFETY: sending a signal to a pid we started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        if !mounts.contains(m.mountpoint.to_str().unwrap()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still mounted after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn mount_table_shows_image_and_type() {
    let d = scratch();
    let raw = d.path().join("tab.img");
    std::fs::write(&raw, vec![7u8; 8192]).unwrap();
    let m = Mounted::new(&[&raw], &[]);
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(m.mountpoint.to_str().unwrap()))
        .unwrap();
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields[0], raw.to_str().unwrap());
    assert_eq!(fields[2], "fuse.vdiskfs");
    assert!(fields[3].starts_with("ro"), "{line}");
    m.unmount();
}

#[test]
fn info_json_describes_the_whole_chain() {
    let d = scratch();
    let top = make_chain(d.path());
    let (v, _) = common::fuse::info_json(&top);
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual_size"], 8 << 20);
    let chain = v["chain"].as_array().unwrap();
    let formats: Vec<&str> = chain
        .iter()
        .map(|l| l["format"].as_str().unwrap())
        .collect();
    assert_eq!(formats, ["qcow2", "qcow2", "raw"]);
    let sizes: Vec<u64> = chain
        .iter()
        .map(|l| l["virtual_size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [8 << 20, 6 << 20, 3 << 20]);
    assert!(chain[2]["filename"].as_str().unwrap().ends_with("base.raw"));
    let text = vdiskfs(&["info", top.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("chain: 3 link(s)"), "{text}");
}
