//! Detection by content of every format qemu knows, the refusal by name of
//! those vdiskfs does not serve (never served as raw), `--format raw`
//! forcing raw, and the guard on probed raw images: a write that would make
//! one detect as another format is refused (EPERM), through the library and
//! through a FUSE mount; with `--format raw` it is allowed.

use crate::common;
use common::qemu_img_line;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::fuse::{vdiskfs, Mounted};
use common::{qemu_img, rng::Rng, scratch};
use vdiskfs::cache::Caches;
use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::format::{self, Format};
use vdiskfs::host::HostFile;
use vdiskfs::ErrorKind;

fn create(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut a: Vec<&str> = args.to_vec();
    a.insert(a.len() - 1, p.to_str().unwrap());
    qemu_img(&a);
    p
}

/// One image per format, made by qemu-img where it can make one.
fn images(d: &Path) -> Vec<(PathBuf, Format)> {
    let mut v = vec![
        (
            create(d, "a.qcow2", &["create", "-f", "qcow2", "1M"]),
            Format::Qcow2,
        ),
        (
            create(d, "a.qcow", &["create", "-f", "qcow", "1M"]),
            Format::Qcow,
        ),
        (
            create(d, "a.qed", &["create", "-f", "qed", "1M"]),
            Format::Qed,
        ),
        (
            create(d, "a.vmdk", &["create", "-f", "vmdk", "1M"]),
            Format::Vmdk,
        ),
        (
            create(d, "dyn.vhd", &["create", "-f", "vpc", "1M"]),
            Format::Vhd,
        ),
        (
            create(
                d,
                "fixed.vhd",
                &["create", "-f", "vpc", "-o", "subformat=fixed", "1M"],
            ),
            Format::Vhd,
        ),
        (
            create(d, "a.vhdx", &["create", "-f", "vhdx", "1M"]),
            Format::Vhdx,
        ),
        (
            create(d, "a.vdi", &["create", "-f", "vdi", "1M"]),
            Format::Vdi,
        ),
        (
            create(d, "a.hds", &["create", "-f", "parallels", "1M"]),
            Format::Parallels,
        ),
        (
            create(
                d,
                "a.luks",
                &[
                    "create",
                    "--object",
                    "secret,id=s0,data=vdiskfs",
                    "-f",
                    "luks",
                    "-o",
                    "key-secret=s0,iter-time=10",
                    "1M",
                ],
            ),
            Format::Luks,
        ),
    ];
    // qemu-img cannot create these; their headers are what qemu's probes read.
    let mut bochs = vec![0u8; 4096];
    bochs[..23].copy_from_slice(b"Bochs Virtual HD Image\0");
    bochs[32..40].copy_from_slice(b"Redolog\0");
    bochs[48..56].copy_from_slice(b"Growing\0");
    let mut cloop =
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
            .to_vec();
    cloop.resize(4096, 0);
    let mut dmg = vec![0u8; 1 << 16];
    let t = dmg.len() - 512;
    dmg[t..t + 4].copy_from_slice(b"koly");
    dmg[t + 4..t + 8].copy_from_slice(&4u32.to_be_bytes());
    dmg[t + 8..t + 12].copy_from_slice(&512u32.to_be_bytes());
    for (name, bytes, f) in [
        ("a.bochs", bochs, Format::Bochs),
        ("a.cloop", cloop, Format::Cloop),
        ("a.dmg", dmg, Format::Dmg),
    ] {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        v.push((p, f));
    }
    v
}

#[test]
fn every_format_qemu_knows_is_detected_never_raw() {
    let d = scratch();
    for (path, want) in images(d.path()) {
        let file = HostFile::open(&path).unwrap();
        assert_eq!(format::detect(&file).unwrap(), want, "{}", path.display());
        let served = matches!(
            want,
            Format::Qcow2 | Format::Qcow | Format::Vmdk | Format::Vdi | Format::Parallels
        );
        match common::open_chain(&path) {
            Ok(chain) => {
                // VHD and VHDX land on other branches: opened, they are themselves.
                assert!(
                    served || matches!(want, Format::Vhd | Format::Vhdx),
                    "{} opened",
                    path.display()
                );
                assert_eq!(chain.layers()[0].format(), want);
            }
            Err(e) => {
                assert!(!served, "{}: {e}", path.display());
                let msg = e.to_string();
                let kind = if want == Format::Luks {
                    ErrorKind::Encrypted
                } else {
                    ErrorKind::Unsupported
                };
                assert_eq!(e.kind(), kind, "{msg}");
                assert!(msg.contains(want.name()), "{msg} does not name {want}");
                assert!(!msg.contains('\n'));
                assert_eq!(e.path(), Some(path.as_path()));
                let out = vdiskfs(&["info", path.to_str().unwrap()]);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(
                    !out.status.success(),
                    "info succeeded on {}",
                    path.display()
                );
                assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
                assert!(stderr.contains(want.name()), "{stderr}");
            }
        }
        // --format raw still forces raw.
        let opts = ChainOptions {
            format: Some(Format::Raw),
            ..Default::default()
        };
        let chain = Chain::open(&path, &opts, &Caches::new(1 << 20)).unwrap();
        assert_eq!(chain.layers()[0].format(), Format::Raw);
        assert_eq!(chain.size(), std::fs::metadata(&path).unwrap().len());
    }
}

/// A raw disk full of random bytes (which detects as raw).
fn raw_disk(d: &Path, name: &str) -> PathBuf {
    let p = d.join(name);
    std::fs::write(&p, Rng::new(5).bytes(4 << 20)).unwrap();
    p
}

/// The first 512 bytes of a qcow2 image naming /etc/passwd as its backing file.
fn hostile_header(d: &Path) -> Vec<u8> {
    let p = d.join("evil.qcow2");
    qemu_img_line(&format!(
        "create -f qcow2 -u -b /etc/passwd -F raw {} 4M",
        p.to_str().unwrap()
    ));
    std::fs::read(&p).unwrap()[..512].to_vec()
}

/// The footer (last 512 bytes) of a fixed VHD.
fn vhd_footer(d: &Path) -> Vec<u8> {
    let p = create(
        d,
        "f.vhd",
        &["create", "-f", "vpc", "-o", "subformat=fixed", "1M"],
    );
    let b = std::fs::read(&p).unwrap();
    b[b.len() - 512..].to_vec()
}

fn detect_path(p: &Path) -> Format {
    format::detect(&HostFile::open(p).unwrap()).unwrap()
}

#[test]
fn probed_raw_cannot_become_another_format_through_the_library() {
    let d = scratch();
    let header = hostile_header(d.path());
    let footer = vhd_footer(d.path());
    let p = raw_disk(d.path(), "disk.raw");
    let len = std::fs::metadata(&p).unwrap().len();
    let before = std::fs::read(&p).unwrap();
    let rw = ChainOptions {
        writable: true,
        ..Default::default()
    };
    let chain = Chain::open(&p, &rw, &Caches::new(1 << 20)).unwrap();
    let e = chain
        .write_at(&header, 0)
        .expect_err("qcow2 header refused");
    assert_eq!(e.errno(), libc::EPERM, "{e}");
    assert!(
        e.to_string().contains("qcow2") && e.to_string().contains("--format raw"),
        "{e}"
    );
    let e = chain
        .write_at(&footer, len - 512)
        .expect_err("VHD footer refused");
    assert_eq!(e.errno(), libc::EPERM, "{e}");
    // Two writes that only together form the magic: the second is refused.
    chain.write_at(&header[4..512], 4).unwrap();
    let e = chain
        .write_at(&header[..4], 0)
        .expect_err("magic completing a header refused");
    assert_eq!(e.errno(), libc::EPERM, "{e}");
    // Ordinary data in sector 0 and at the end is fine; so are zeros.
    chain.write_at(&[0x11; 4096], 0).unwrap();
    chain.write_at(&[0x22; 512], len - 512).unwrap();
    chain.write_zeroes(0, 1 << 20).unwrap();
    chain.flush().unwrap();
    drop(chain);
    assert_eq!(detect_path(&p), Format::Raw);
    assert_eq!(
        std::fs::read(&p).unwrap()[1 << 20..len as usize - 512],
        before[1 << 20..len as usize - 512]
    );
    // --format raw: the user said what it is, anything goes.
    let forced = ChainOptions {
        writable: true,
        format: Some(Format::Raw),
        ..Default::default()
    };
    let chain = Chain::open(&p, &forced, &Caches::new(1 << 20)).unwrap();
    chain.write_at(&header, 0).unwrap();
    chain.flush().unwrap();
    drop(chain);
    assert_eq!(detect_path(&p), Format::Qcow2);
}

#[test]
fn probed_raw_cannot_become_another_format_through_fuse() {
    let d = scratch();
    let header = hostile_header(d.path());
    let p = raw_disk(d.path(), "disk.raw");
    let before = common::sha256_file(&p);
    let name = vdiskfs::cli::exposed_name(&p).unwrap();
    let m = Mounted::new(&[&p], &["--rw"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.file(name.to_str().unwrap()))
        .unwrap();
    let res = f.write_all_at(&header, 0).and_then(|()| f.sync_all());
    let e = res.expect_err("the write of a qcow2 header must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    drop(f);
    m.unmount();
    assert_eq!(common::sha256_file(&p), before, "the image changed");
    assert_eq!(detect_path(&p), Format::Raw);
    let m = Mounted::new(&[&p], &["--rw", "--format", "raw"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.file(name.to_str().unwrap()))
        .unwrap();
    f.write_all_at(&header, 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.unmount();
    assert_eq!(detect_path(&p), Format::Qcow2);
}
