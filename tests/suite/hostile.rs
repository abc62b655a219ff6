//! Crafted and damaged images: each must be refused with the exact error
//! kind (and a one-line message naming the file), or fail with EIO only on
//! the damaged range — within seconds and a bounded amount of memory
//! (`vdiskfs info` runs under `prlimit --as` and `timeout`).

use crate::common;
use common::qemu_img_line;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{qemu_img, qemu_io, scratch};
use vdiskfs::cache::Caches;
use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::policy::OpenPolicy;
use vdiskfs::ErrorKind;

/// What a crafted image must do.
enum Expect {
    /// Opening fails with this kind.
    Refused(ErrorKind),
    /// Opens; reading `bad` fails, reading `good` works.
    EioAt { bad: u64, good: u64 },
    /// Opens and reads entirely (damage that does not matter for reading).
    Opens,
}

struct Case {
    name: &'static str,
    path: PathBuf,
    untrusted: bool,
    expect: Expect,
}

fn le64(path: &Path, offset: u64) -> u64 {
    let b = std::fs::read(path).unwrap();
    u64::from_le_bytes(b[offset as usize..offset as usize + 8].try_into().unwrap())
}

/// A 4 MiB monolithicSparse VMDK full of data.
fn base_vmdk(dir: &Path, name: &str, sub: &str) -> PathBuf {
    let p = dir.join(name);
    let o = format!("subformat={sub}");
    qemu_img(&["create", "-f", "vmdk", "-o", &o, p.to_str().unwrap(), "4M"]);
    if sub == "monolithicSparse" {
        qemu_io("vmdk", &p, &["write -P 0x5a 0 4M"]);
    }
    p
}

/// A descriptor file naming one FLAT extent `extent`.
fn descriptor(dir: &Path, name: &str, extent: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"{extent}\" 0\n\nddb.adapterType = \"ide\"\n"
        ),
    )
    .unwrap();
    p
}

fn vmdk_cases(d: &Path) -> Vec<Case> {
    let mut v = Vec::new();
    let mut add = |name: &'static str, path: PathBuf, untrusted: bool, expect: Expect| {
        v.push(Case {
            name,
            path,
            untrusted,
            expect,
        })
    };
    let p = base_vmdk(d, "grain0.vmdk", "monolithicSparse");
    patch(&p, 20, &0u64.to_le_bytes());
    add(
        "VMDK grain size 0",
        p,
        false,
        Expect::Refused(ErrorKind::Corrupt),
    );

    let p = base_vmdk(d, "gte0.vmdk", "monolithicSparse");
    patch(&p, 44, &0u32.to_le_bytes());
    add(
        "VMDK zero GTEs per GT",
        p,
        false,
        Expect::Refused(ErrorKind::Corrupt),
    );

    let p = base_vmdk(d, "gd-eof.vmdk", "monolithicSparse");
    patch(&p, 48, &(1u64 << 40).to_le_bytes());
    patch(&p, 56, &(1u64 << 40).to_le_bytes());
    add(
        "VMDK grain directories past EOF",
        p,
        false,
        Expect::Refused(ErrorKind::Corrupt),
    );

    let p = base_vmdk(d, "gt-eof.vmdk", "monolithicSparse");
    for gd_field in [48u64, 56] {
        let gd = le64(&p, gd_field) * 512;
        patch(&p, gd, &u32::MAX.to_le_bytes());
    }
    add(
        "VMDK grain table past EOF",
        p,
        false,
        Expect::EioAt { bad: 0, good: 0 },
    );

    let p = base_vmdk(d, "capacity.vmdk", "monolithicSparse");
    patch(&p, 12, &u64::MAX.to_le_bytes());
    add(
        "VMDK absurd capacity",
        p,
        false,
        Expect::Refused(ErrorKind::Corrupt),
    );

    let raw = d.join("stream-src.raw");
    std::fs::write(
        &raw,
        (0..4u32 << 20)
            .map(|i| (i / 4096) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let p = d.join("stream-cut.vmdk");
    qemu_img_line(&format!(
        "convert -f raw -O vmdk -o subformat=streamOptimized {} {}",
        raw.to_str().unwrap(),
        p.to_str().unwrap()
    ));
    let len = std::fs::metadata(&p).unwrap().len();
    // Cut in the middle: later grains, the footer and the end-of-stream
    // marker are gone. qemu-img keeps the grain directory in the header
    // area, so the image opens; the grains past the cut fail (as in qemu).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    add(
        "truncated streamOptimized (footer missing)",
        p,
        false,
        Expect::EioAt {
            bad: 3 << 20,
            good: 0,
        },
    );

    let p = descriptor(d, "missing-extent.vmdk", "nowhere-flat.vmdk");
    add(
        "VMDK extent file missing",
        p,
        false,
        Expect::Refused(ErrorKind::NotFound),
    );

    let p = descriptor(d, "dev-extent.vmdk", "/dev/zero");
    add(
        "VMDK extent is a device",
        p,
        false,
        Expect::Refused(ErrorKind::Policy),
    );

    let p = descriptor(d, "abs-extent.vmdk", "/etc/passwd");
    add(
        "VMDK absolute extent, untrusted",
        p,
        true,
        Expect::Refused(ErrorKind::Policy),
    );

    let p = descriptor(d, "dotdot-extent.vmdk", "../escape-flat.vmdk");
    add(
        "VMDK '..' extent, untrusted",
        p,
        true,
        Expect::Refused(ErrorKind::Policy),
    );

    let p = d.join("huge-descriptor.vmdk");
    let mut text = b"# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\n".to_vec();
    text.extend(std::iter::repeat_n(b'#', 3 << 20));
    std::fs::write(&p, text).unwrap();
    add(
        "3 MiB descriptor",
        p,
        false,
        Expect::Refused(ErrorKind::Corrupt),
    );

    let p = d.join("many-extents.vmdk");
    let mut text = String::from("# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\n");
    for _ in 0..100_000 {
        text.push_str("RW 1 ZERO\n");
    }
    std::fs::write(&p, text).unwrap();
    add(
        "100000 extent lines",
        p,
        false,
        Expect::Refused(ErrorKind::Corrupt),
    );
    v
}

use crate::common::damage::patch;

fn be64(path: &Path, offset: u64) -> u64 {
    let b = std::fs::read(path).unwrap();
    u64::from_be_bytes(b[offset as usize..offset as usize + 8].try_into().unwrap())
}

/// A 4 MiB qcow2 with 64 KiB clusters full of data (and one compressed cluster).
fn base_qcow2(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img_line(&format!(
        "create -f qcow2 -o cluster_size=65536 {} 4M",
        p.to_str().unwrap()
    ));
    qemu_io(
        "qcow2",
        &p,
        &["write -c -P 0x77 3M 64k", "write -P 0xaa 0 3M"],
    );
    p
}

fn with_backing(dir: &Path, name: &str, backing: &str, fmt: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img_line(&format!(
        "create -f qcow2 -u -b {} -F {} {} 1M",
        backing,
        fmt,
        p.to_str().unwrap()
    ));
    p
}

fn l2_offset(img: &Path) -> u64 {
    let l1 = be64(img, 40);
    be64(img, l1) & 0x00ff_ffff_ffff_fe00
}

fn qcow2_cases(d: &Path) -> Vec<Case> {
    let mut v = Vec::new();
    let mut add = |name: &'static str, path: PathBuf, expect: Expect| {
        v.push(Case {
            name,
            path,
            untrusted: false,
            expect,
        })
    };
    let mk = |n: &str| base_qcow2(d, n);

    let p = mk("truncated.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(50)
        .unwrap();
    add("truncated header", p, Expect::Refused(ErrorKind::Corrupt));

    let p = mk("version4.qcow2");
    patch(&p, 4, &4u32.to_be_bytes());
    add(
        "unknown version",
        p,
        Expect::Refused(ErrorKind::Unsupported),
    );

    for (name, bits) in [
        ("cbits8.qcow2", 8u32),
        ("cbits22.qcow2", 22),
        ("cbits63.qcow2", 63),
    ] {
        let p = mk(name);
        patch(&p, 20, &bits.to_be_bytes());
        add(
            "cluster_bits out of range",
            p,
            Expect::Refused(ErrorKind::Corrupt),
        );
    }

    let p = mk("huge-l1.qcow2");
    patch(&p, 36, &0x7fff_ffffu32.to_be_bytes());
    add("huge L1 size", p, Expect::Refused(ErrorKind::Corrupt));

    let p = mk("l1-past-eof.qcow2");
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    add("L1 table past EOF", p, Expect::Refused(ErrorKind::Corrupt));

    let p = mk("l1-unaligned.qcow2");
    let l1 = be64(&p, 40);
    patch(&p, 40, &(l1 + 8).to_be_bytes());
    add("L1 table unaligned", p, Expect::Refused(ErrorKind::Corrupt));

    let p = mk("size-max.qcow2");
    patch(&p, 24, &u64::MAX.to_be_bytes());
    add(
        "absurd virtual size",
        p,
        Expect::Refused(ErrorKind::Corrupt),
    );

    let p = mk("refcount-order.qcow2");
    patch(&p, 96, &7u32.to_be_bytes());
    add("refcount_order 7", p, Expect::Refused(ErrorKind::Corrupt));

    let p = mk("header-len.qcow2");
    patch(&p, 100, &0x7fff_fff0u32.to_be_bytes());
    add(
        "header length past EOF",
        p,
        Expect::Refused(ErrorKind::Corrupt),
    );

    let p = mk("ext-len.qcow2");
    // A header extension claiming 4 GiB right after the 112-byte header.
    patch(&p, 112, &[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xf0]);
    add(
        "header extension length past end",
        p,
        Expect::Refused(ErrorKind::Corrupt),
    );

    let p = with_backing(d, "backing-off.qcow2", "base.raw", "raw");
    patch(&p, 8, &(1u64 << 40).to_be_bytes());
    add(
        "backing name past EOF",
        p,
        Expect::Refused(ErrorKind::Corrupt),
    );

    let p = with_backing(d, "backing-len.qcow2", "base.raw", "raw");
    patch(&p, 16, &5000u32.to_be_bytes());
    add(
        "backing name too long",
        p,
        Expect::Refused(ErrorKind::Corrupt),
    );

    let p = mk("incompat.qcow2");
    patch(&p, 72, &(1u64 << 40).to_be_bytes());
    add(
        "unknown incompatible feature",
        p,
        Expect::Refused(ErrorKind::Unsupported),
    );

    let p = mk("crypt.qcow2");
    patch(&p, 32, &1u32.to_be_bytes());
    add("AES encryption", p, Expect::Refused(ErrorKind::Encrypted));

    let p = with_backing(d, "dev-zero.qcow2", "/dev/zero", "raw");
    add(
        "backing file is a device",
        p,
        Expect::Refused(ErrorKind::Policy),
    );

    let p = with_backing(d, "proc.qcow2", "/proc/self/environ", "raw");
    add(
        "backing file under /proc",
        p,
        Expect::Refused(ErrorKind::Policy),
    );

    let p = with_backing(d, "missing.qcow2", "not-there.raw", "raw");
    add(
        "missing backing file",
        p,
        Expect::Refused(ErrorKind::NotFound),
    );

    // A backing format qemu knows and vdiskfs refuses (QED), on a real file.
    qemu_img(&[
        "create",
        "-f",
        "qed",
        d.join("x.qed").to_str().unwrap(),
        "1M",
    ]);
    let p = with_backing(d, "qed.qcow2", "x.qed", "qed");
    add(
        "unsupported backing format",
        p,
        Expect::Refused(ErrorKind::Unsupported),
    );

    with_backing(d, "loop-b.qcow2", "loop-a.qcow2", "qcow2");
    let p = with_backing(d, "loop-a.qcow2", "loop-b.qcow2", "qcow2");
    add(
        "backing loop a->b->a",
        p,
        Expect::Refused(ErrorKind::ChainLoop),
    );

    let p = with_backing(d, "self.qcow2", "self.qcow2", "qcow2");
    add(
        "image backed by itself",
        p,
        Expect::Refused(ErrorKind::ChainLoop),
    );

    // A chain of 70 links (the default limit is 64).
    let raw = d.join("deep-0.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let mut prev = "deep-0.raw".to_string();
    let mut pf = "raw";
    for i in 1..=70 {
        let name = format!("deep-{i}.qcow2");
        with_backing(d, Box::leak(name.clone().into_boxed_str()), &prev, pf);
        prev = name;
        pf = "qcow2";
    }
    add(
        "chain of 70 links",
        d.join("deep-70.qcow2"),
        Expect::Refused(ErrorKind::ChainTooDeep),
    );

    let p = mk("l2-entry-eof.qcow2");
    let l2 = l2_offset(&p);
    patch(&p, l2 + 5 * 8, &((1u64 << 63) | (1u64 << 44)).to_be_bytes());
    add(
        "L2 entry past EOF",
        p,
        Expect::EioAt {
            bad: 5 << 16,
            good: 6 << 16,
        },
    );

    let p = mk("l2-table-eof.qcow2");
    let l1 = be64(&p, 40);
    patch(&p, l1, &((1u64 << 63) | (1u64 << 44)).to_be_bytes());
    add("L2 table past EOF", p, Expect::EioAt { bad: 0, good: 0 });

    let p = mk("compressed-eof.qcow2");
    let l2 = l2_offset(&p);
    // Cluster 48 (3 MiB) is compressed: move its data far past the end.
    let e = be64(&p, l2 + 48 * 8);
    assert!(e & (1 << 62) != 0, "cluster 48 is compressed");
    // With 64 KiB clusters the host offset is the low 54 bits: keep the
    // flags and the sector count, move the offset to 1 PiB.
    let moved = (e & !((1u64 << 54) - 1)) | (1u64 << 50);
    patch(&p, l2 + 48 * 8, &moved.to_be_bytes());
    add(
        "compressed data past EOF",
        p,
        Expect::EioAt {
            bad: 3 << 20,
            good: 0,
        },
    );

    let p = mk("compressed-garbage.qcow2");
    let l2 = l2_offset(&p);
    let e = be64(&p, l2 + 48 * 8);
    let host = e & ((1u64 << 54) - 1);
    patch(&p, host, &[0xffu8; 64]);
    add(
        "compressed data garbage",
        p,
        Expect::EioAt {
            bad: 3 << 20,
            good: 1 << 20,
        },
    );

    let p = mk("snapshots-eof.qcow2");
    patch(&p, 60, &65536u32.to_be_bytes());
    patch(&p, 64, &(1u64 << 40).to_be_bytes());
    add("snapshot table past EOF", p, Expect::Opens);

    v
}

fn open(case: &Case) -> vdiskfs::Result<Chain> {
    let opts = ChainOptions {
        policy: OpenPolicy {
            untrusted: case.untrusted,
            ..Default::default()
        },
        ..Default::default()
    };
    Chain::open(&case.path, &opts, &Caches::new(32 << 20))
}

fn run_cases(cases: Vec<Case>) {
    let mut failures = Vec::new();
    let n = cases.len();
    for case in &cases {
        let untrusted: &[&str] = if case.untrusted {
            &["--untrusted"]
        } else {
            &[]
        };
        let (code, stderr, took) = common::fuse::info_bounded(&case.path, untrusted);
        if took > Duration::from_secs(10) || code == Some(124) {
            failures.push(format!("{}: info took {took:?}", case.name));
        }
        match (&case.expect, open(case)) {
            (Expect::Refused(kind), Err(e)) => {
                if e.kind() != *kind {
                    failures.push(format!(
                        "{}: {:?} instead of {kind:?}: {e}",
                        case.name,
                        e.kind()
                    ));
                }
                if code != Some(1) || stderr.trim().lines().count() != 1 {
                    failures.push(format!(
                        "{}: info exit {code:?}, stderr {stderr:?}",
                        case.name
                    ));
                }
                let file = case.path.file_name().unwrap().to_str().unwrap();
                if !stderr.contains(file) && !stderr.contains("deep-") && !stderr.contains("loop-")
                {
                    failures.push(format!(
                        "{}: message does not name the file: {stderr}",
                        case.name
                    ));
                }
            }
            (Expect::Refused(kind), Ok(_)) => {
                failures.push(format!("{}: opened, expected {kind:?}", case.name))
            }
            (Expect::EioAt { bad, good }, Ok(chain)) => {
                let mut buf = vec![0u8; 4096];
                match chain.read_at(&mut buf, *bad) {
                    Err(e) if e.errno() == libc::EIO => {}
                    other => failures.push(format!("{}: read at {bad:#x}: {other:?}", case.name)),
                }
                if bad != good {
                    if let Err(e) = chain.read_at(&mut buf, *good) {
                        failures.push(format!(
                            "{}: intact range at {good:#x} failed: {e}",
                            case.name
                        ));
                    }
                }
                // Damage in the allocation map: info prints its report, then
                // exits 1 naming it. Damage inside the data itself (garbage
                // compressed bytes, a missing footer) is met only by reads.
                let file = case.path.file_name().unwrap().to_str().unwrap();
                let named = stderr.trim().lines().count() == 1
                    && stderr.contains("damaged")
                    && stderr.contains(file);
                if !(code == Some(0) || code == Some(1) && named) {
                    failures.push(format!("{}: info exit {code:?}: {stderr}", case.name));
                }
            }
            (Expect::Opens, Ok(chain)) => {
                if let Err(e) = common::read_all(&chain, 1 << 20) {
                    failures.push(format!("{}: read failed: {e}", case.name));
                }
            }
            (_, Err(e)) => failures.push(format!("{}: refused: {e}", case.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} hostile cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn hostile_qcow2_images() {
    let d = scratch();
    let cases = qcow2_cases(d.path());
    assert!(cases.len() >= 25);
    run_cases(cases);
}

#[test]
fn hostile_vmdk_images() {
    let d = scratch();
    let cases = vmdk_cases(d.path());
    assert!(cases.len() >= 10);
    run_cases(cases);
}

#[test]
fn untrusted_mode_confines_backing_files() {
    let d = scratch();
    let sub = d.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(d.path().join("outside.raw"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(sub.join("inside.raw"), vec![2u8; 1 << 20]).unwrap();
    let mut cases = Vec::new();
    for (name, backing, fmt, kind) in [
        ("abs.qcow2", "/etc/passwd", "raw", Some(ErrorKind::Policy)),
        (
            "dotdot.qcow2",
            "../outside.raw",
            "raw",
            Some(ErrorKind::Policy),
        ),
        ("inside.qcow2", "inside.raw", "raw", None),
    ] {
        let p = with_backing(&sub, name, backing, fmt);
        cases.push(Case {
            name: "untrusted backing",
            path: p,
            untrusted: true,
            expect: match kind {
                Some(k) => Expect::Refused(k),
                None => Expect::Opens,
            },
        });
    }
    // Untrusted mode does not probe: a backing file without a recorded format is refused.
    let p = with_backing(&sub, "noformat.qcow2", "inside.raw", "raw");
    // Turn the backing-format header extension into an unknown one.
    let bytes = std::fs::read(&p).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    patch(&p, at as u64, &[0x12, 0x34, 0x56, 0x78]);
    cases.push(Case {
        name: "untrusted unrecorded backing format",
        path: p,
        untrusted: true,
        expect: Expect::Refused(ErrorKind::Policy),
    });
    run_cases(cases);
}

#[test]
fn a_raw_image_is_never_reinterpreted_when_its_format_is_given() {
    // The classic probing hole: a guest wrote a qcow2 header (naming a host
    // file as backing) into its raw disk.
    let d = scratch();
    let evil = d.path().join("evil.qcow2");
    qemu_img_line(&format!(
        "create -f qcow2 -u -b /etc/hostname -F raw {} 1M",
        evil.to_str().unwrap()
    ));
    let mut disk = std::fs::read(&evil).unwrap();
    disk.resize(1 << 20, 0);
    let raw = d.path().join("guest.img");
    std::fs::write(&raw, &disk).unwrap();
    let opts = ChainOptions {
        format: Some(vdiskfs::format::Format::Raw),
        ..Default::default()
    };
    let chain = Chain::open(&raw, &opts, &Caches::new(1 << 20)).unwrap();
    assert_eq!(chain.layers().len(), 1);
    let got = common::read_all(&chain, 65536).unwrap();
    assert!(got == disk, "raw bytes exposed as they are");
}
