//! VHD (qemu's `vpc`): byte-exact reads against `qemu-img convert -O raw`
//! on generated fixed and dynamic disks, chains with qcow2, the
//! MANIFEST-next rows, hostile images, a mutation fuzzer, a FUSE mount and
//! the `--rw` refusal. Differencing disks are in `vhd_diff.rs`.

use crate::common;
use common::manifest;
use common::qemu_img_line;

use std::path::Path;

use common::fuse::{vdiskfs, Mounted};
use common::rng::Rng;
use common::vhd::*;
use common::{qemu_img, qemu_io, qemu_raw, read_all, scratch, sha256_chain};
use vdiskfs::chain::{ChainOptions, Status};
use vdiskfs::format::Format;
#[test]
fn generated_fixed_and_dynamic_match_qemu() {
    let d = scratch();
    // Odd sizes: qemu rounds them to a CHS geometry, and the footer of a
    // 'qemu' image sizes it by that geometry.
    for (i, size) in ["1M", "5000k", "33M", "100M", "129M"].iter().enumerate() {
        for sub in ["fixed", "dynamic"] {
            let p = d.path().join(format!("{sub}-{size}.vhd"));
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                &format!("subformat={sub}"),
                s(&p),
                size,
            ]);
            let vsize = open(&p).unwrap().size();
            random_writes(&p, vsize, i as u64 + 7);
            assert_matches_qemu_vpc(&p);
        }
    }
}

#[test]
fn converted_from_raw_match_qemu() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    std::fs::write(&raw, pattern(9 << 20, 3)).unwrap();
    for sub in ["dynamic", "fixed"] {
        let p = d.path().join(format!("conv-{sub}.vhd"));
        let o = format!("subformat={sub}");
        qemu_img_line(&format!(
            "convert -f raw -O vpc -o {} {} {}",
            &o,
            s(&raw),
            s(&p)
        ));
        assert_matches_qemu_vpc(&p);
    }
}

#[test]
fn qcow2_overlay_over_vhd() {
    let d = scratch();
    let base = d.path().join("base.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&base), "20M"]);
    qemu_io(
        "vpc",
        &base,
        &["write -P 0x31 0 5M", "write -P 0x32 12M 3M"],
    );
    let fixed = d.path().join("fixed.vhd");
    qemu_img_line(&format!(
        "convert -f vpc -O vpc -o subformat=fixed {} {}",
        s(&base),
        s(&fixed)
    ));
    for (b, fmt) in [(&base, Some("vpc")), (&fixed, Some("vpc"))] {
        let top = d.path().join("top.qcow2");
        let _ = std::fs::remove_file(&top);
        let mut args = vec!["create", "-q", "-f", "qcow2", "-b", s(b)];
        if let Some(f) = fmt {
            args.extend(["-F", f]);
        }
        args.extend([s(&top), "20M"]);
        qemu_img(&args);
        qemu_io(
            "qcow2",
            &top,
            &["write -P 0x41 4M 2M", "write -P 0x42 13M 64k"],
        );
        let expected = qemu_raw(&top, Some("qcow2"));
        let chain = open(&top).unwrap();
        assert_eq!(chain.layers().len(), 2);
        assert_eq!(chain.layers()[1].format(), Format::Vhd);
        assert_reads(&chain, &expected, "qcow2 over vhd");
    }
}

// ---- MANIFEST-next rows ---------------------------------------------------

/// Every `vpc` row of ../shared/testdata/MANIFEST-next.tsv: virtual size,
/// content hash (or refusal where the row says so). The two empty 127 GiB
/// disks are not hashed here: no block is allocated (status is one hole),
/// and spot reads are zero; their full hash is the long run in docs/vhd.md.
#[test]
fn manifest_next_vpc_rows() {
    let mut rows = 0;
    for row in manifest::rows(manifest::MANIFEST_NEXT) {
        if row.format != "vpc" {
            continue;
        }
        rows += 1;
        let file = row.file.as_str();
        let path = row.path();
        let vsize = row.virtual_size.unwrap();
        let detected = vdiskfs::format::detect(&vdiskfs::host::HostFile::open(&path).unwrap());
        assert_eq!(detected.unwrap(), Format::Vhd, "{file}");
        let opened = open_with(
            &path,
            ChainOptions {
                format: Some(Format::Vhd),
                ..Default::default()
            },
        );
        let Some(want) = row.want.sha() else {
            let e = opened.err().unwrap_or_else(|| panic!("{file} opened"));
            assert!(
                e.to_string().contains(file.rsplit('/').next().unwrap()),
                "{e}"
            );
            continue;
        };
        let chain = match (opened, &row.want) {
            (Ok(c), _) => c,
            (Err(e), manifest::Want::Either(_)) => {
                assert!(e.to_string().contains("checksum"), "{file}: {e}");
                continue;
            }
            (Err(e), _) => panic!("{file}: {e}"),
        };
        assert_eq!(chain.size(), vsize, "{file}");
        if vsize > 1 << 30 {
            assert_eq!(
                chain.status(0, vsize).unwrap(),
                (Status::Hole, vsize),
                "{file}"
            );
            let mut rng = Rng::new(vsize);
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..64 {
                let off = rng.below(vsize - buf.len() as u64);
                chain.read_at(&mut buf, off).unwrap();
                assert!(buf.iter().all(|&b| b == 0), "{file} at {off:#x}");
            }
            let last = vsize - buf.len() as u64;
            chain.read_at(&mut buf, last).unwrap();
            assert!(buf.iter().all(|&b| b == 0));
        } else {
            assert_eq!(sha256_chain(&chain).unwrap(), want, "{file}");
        }
    }
    assert!(rows >= 6, "only {rows} vpc rows in MANIFEST-next.tsv");
}

// ---- Hostile images -------------------------------------------------------

/// Asserts `vdiskfs info` fails on one line naming the file, quickly and
/// within 512 MiB of address space.
fn assert_cli_refuses(p: &Path, needle: &str) {
    let (code, err, _) = common::fuse::info_bounded(p, &[]);
    assert_eq!(code, Some(1), "{}: {err}", p.display());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let name = p.file_name().unwrap().to_str().unwrap();
    assert!(err.contains(name) && err.contains(needle), "{err}");
}

#[test]
fn hostile_images() {
    let d = scratch();
    let dynamic = d.path().join("dyn.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&dynamic), "10M"]);
    qemu_io("vpc", &dynamic, &["write -P 0x61 0 6M"]);
    let fixed = d.path().join("fixed.vhd");
    qemu_img_line(&format!(
        "create -q -f vpc -o subformat=fixed {} 4M",
        s(&fixed)
    ));
    let bytes = std::fs::read(&dynamic).unwrap();
    let bat_at = u64::from_be_bytes(bytes[512 + 16..512 + 24].try_into().unwrap()) as usize;

    // Checksums: footer copy, fixed footer, dynamic header.
    let p = patched(&dynamic, "badsum.vhd", |b| b[40] ^= 1);
    assert_cli_refuses(&p, "checksum");
    let p = patched(&fixed, "badsum-fixed.vhd", |b| {
        let n = b.len();
        b[n - 512 + 40] ^= 1
    });
    assert_cli_refuses(&p, "checksum");
    let p = patched(&dynamic, "badsum-dyn.vhd", |b| b[512 + 30] ^= 1);
    assert_cli_refuses(&p, "checksum");

    // Dynamic-header fields, resealed so only the field is wrong.
    let dyn_patch = |name: &str, f: &dyn Fn(&mut [u8])| {
        patched(&dynamic, name, |b| {
            f(&mut b[512..1536]);
            seal(b, 512, 1024, 36);
        })
    };
    let p = dyn_patch("bat-past-eof.vhd", &|h| put64(h, 16, 1 << 40));
    assert_cli_refuses(&p, "past the end");
    let p = dyn_patch("block-zero.vhd", &|h| put32(h, 32, 0));
    assert_cli_refuses(&p, "block size");
    let p = dyn_patch("block-odd.vhd", &|h| put32(h, 32, 3 << 20));
    assert_cli_refuses(&p, "block size");
    let p = dyn_patch("too-few-entries.vhd", &|h| put32(h, 28, 2));
    assert_cli_refuses(&p, "BAT");
    // A huge max_table_entries: only the entries the disk needs are read.
    let p = dyn_patch("huge-entries.vhd", &|h| put32(h, 28, u32::MAX));
    let chain = open(&p).unwrap();
    assert_eq!(
        read_all(&chain, 1 << 20).unwrap(),
        qemu_raw(&dynamic, Some("vpc"))
    );
    // An absurd (2 GiB) block size: one entry, its block past the end of
    // the file fails that read only, nothing is allocated for it.
    let p = dyn_patch("block-2g.vhd", &|h| put32(h, 32, 1 << 31));
    if let Ok(chain) = open(&p) {
        let mut buf = vec![0u8; 4096];
        let _ = chain.read_at(&mut buf, 0);
    }
    // A 2040 GiB disk with 512-byte blocks needs a 16 GiB BAT: refused
    // before any allocation.
    let p = patched(&dynamic, "huge-bat.vhd", |b| {
        put64(b, 48, 0xff00_0000 * 512);
        b[28..32].copy_from_slice(b"win ");
        seal(b, 0, 512, 64);
        put32(&mut b[512..1536], 32, 512);
        put32(&mut b[512..1536], 28, u32::MAX);
        seal(b, 512, 1024, 36);
    });
    assert_cli_refuses(&p, "BAT");
    // Bigger than the format allows.
    let p = patched(&dynamic, "too-big.vhd", |b| {
        put64(b, 48, 1 << 50);
        b[28..32].copy_from_slice(b"win ");
        seal(b, 0, 512, 64);
    });
    assert_cli_refuses(&p, "2040 GiB");
    // A fixed disk whose footer claims more than the file holds.
    let p = patched(&fixed, "fixed-short.vhd", |b| {
        let n = b.len();
        let f = &mut b[n - 512..];
        f[28..32].copy_from_slice(b"win ");
        put64(f, 48, 1 << 30);
        seal(f, 0, 512, 64);
    });
    assert_cli_refuses(&p, "fixed VHD");
    // A dynamic footer at the end only (no copy at 0) is not served as raw.
    let p = patched(&dynamic, "no-head-copy.vhd", |b| b[0..512].fill(0));
    let e = open_with(
        &p,
        ChainOptions {
            format: Some(Format::Vhd),
            ..Default::default()
        },
    );
    assert!(e.is_err());

    // A BAT entry past the end of the file: EIO on that block only.
    let p = patched(&dynamic, "entry-past-eof.vhd", |b| {
        put32(b, bat_at + 4, 0x7fff_0000);
    });
    let chain = open(&p).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = chain.read_at(&mut buf, (2 << 20) + 4096).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(e.to_string().contains("BAT entry 1"), "{e}");
    chain.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0x61));
    chain.read_at(&mut buf, 4 << 20).unwrap();
    assert!(buf.iter().all(|&x| x == 0x61));
    // info still prints its report, then exits 1 naming the damage.
    let out = vdiskfs(&["info", s(&p)]);
    assert!(
        !out.stdout.is_empty() && out.status.code() == Some(1),
        "info of a damaged BAT entry: {out:?}"
    );
}

// ---- Through FUSE, and the --rw refusal -----------------------------------

#[test]
fn fuse_mount_reads_vhd_and_takes_overlay_writes() {
    let d = scratch();
    let p = d.path().join("disk.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&p), "17M"]);
    qemu_io("vpc", &p, &["write -P 0x5a 1M 3M", "write -P 0x11 9M 4k"]);
    let expected = qemu_raw(&p, Some("vpc"));
    let m = Mounted::new(&[&p], &[]);
    let got = std::fs::read(m.file("disk.raw")).unwrap();
    assert!(got == expected, "FUSE read differs from qemu-img convert");
    m.unmount();
    // In-place writes are tested in tests/vhd_vdi_write.rs.
    // --overlay over a VHD takes the writes; the VHD is unchanged.
    let before = std::fs::read(&p).unwrap();
    let ov = d.path().join("ov.qcow2");
    let m = Mounted::new(&[&p], &["--overlay", s(&ov)]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.file("disk.raw"))
            .unwrap();
        f.write_all_at(b"hello", 3 << 20).unwrap();
        f.sync_all().unwrap();
        let mut back = [0u8; 6];
        f.read_exact_at(&mut back, 3 << 20).unwrap();
        assert_eq!(&back, b"hello\x5a");
    }
    m.unmount();
    assert!(
        std::fs::read(&p).unwrap() == before,
        "the VHD changed under --overlay"
    );
    let mut expected = expected;
    expected[3 << 20..(3 << 20) + 5].copy_from_slice(b"hello");
    assert!(qemu_raw(&ov, Some("qcow2")) == expected, "overlay content");
}

/// A small in-process fuzzer: headers, BATs, locators and bitmaps of real
/// and hand-built VHDs mutated at random (checksums resealed half the
/// time, so mutations get past them), opened and read through the fuzz
/// entry points. None may panic or take long.
#[test]
fn mutated_images_never_panic() {
    use vdiskfs::fuzzing::{open_and_read, open_layer};
    let d = scratch();
    let dynamic = d.path().join("dyn.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&dynamic), "3M"]);
    qemu_io(
        "vpc",
        &dynamic,
        &["write -P 0x61 0 40k", "write -P 0x62 2M 4k"],
    );
    let fixed = d.path().join("fixed.vhd");
    qemu_img_line(&format!(
        "create -q -f vpc -o subformat=fixed {} 256k",
        s(&fixed)
    ));
    let mut oracle = vec![0u8; 1 << 20];
    let child = d.path().join("child.vhd");
    let diff = Diff {
        uuid: [0x55; 16],
        parent_uuid: [0x66; 16],
        size: 1 << 20,
        locators: vec![w2ru(".\\p.vhd"), (b"MacX", b"file:///p.vhd".to_vec())],
        parent_name: "p.vhd".into(),
    };
    build_diff(&child, &diff, &mut oracle, 1);
    let mut rng = Rng::new(0x5eed);
    let started = std::time::Instant::now();
    for img in [&dynamic, &fixed, &child] {
        let orig = std::fs::read(img).unwrap();
        let n = orig.len();
        for _ in 0..400 {
            let mut b = orig.clone();
            for _ in 0..=rng.below(4) {
                // Mostly the metadata: the first 4 KiB and the footer.
                let at = match rng.below(3) {
                    0 => rng.below(1536) as usize,
                    1 => n - 512 + rng.below(512) as usize,
                    _ => rng.below(n as u64) as usize,
                };
                b[at] = match rng.below(3) {
                    0 => 0xff,
                    1 => 0,
                    _ => rng.next() as u8,
                };
            }
            if rng.below(2) == 0 {
                seal(&mut b, 0, 512, 64);
                seal(&mut b, n - 512, 512, 64);
                seal(&mut b, 512, 1024, 36);
            }
            open_layer(&b, Format::Vhd);
            open_and_read(&b, Some(Format::Vhd), &[]);
            open_and_read(&b, None, &b[..64]);
        }
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
}

/// `vdiskfs info --json` names the format as qemu does and shows the
/// VixDiskLib-style facts of the footer and dynamic header.
#[test]
fn info_json_describes_a_vhd() {
    let d = scratch();
    let p = d.path().join("i.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&p), "10M"]);
    qemu_io("vpc", &p, &["write -P 1 0 3M"]);
    let (v, _) = common::fuse::info_json(&p);
    assert_eq!(v["format"], "vpc");
    assert_eq!(v["allocated_bytes"], 4 << 20);
    let link = &v["chain"][0];
    assert_eq!(link["subformat"], "dynamic");
    let dt = &link["details"];
    assert_eq!(dt["creator_app"], "qemu");
    assert_eq!(dt["block_size"], 2 << 20);
    assert_eq!(dt["size_from"], "chs");
    assert!(dt["geometry"]["cylinders"].as_u64().unwrap() > 0);
    assert!(dt["uuid"].as_str().unwrap().len() == 36);
}
