//! qcow2 driver tests: images built at test time with qemu-img/qemu-io and
//! compared byte for byte with `qemu-img convert -O raw`, hostile images
//! made by patching bytes, and the qcow2 rows of the shared testdata manifest.

use crate::common;
use common::manifest::Want;
use common::open_err;
use common::qemu_img_line;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{assert_matches_qemu, open_chain, qemu_img, qemu_io, scratch};
use vdiskfs::format::Mapping;
use vdiskfs::ErrorKind;

/// Creates a qcow2 image with `opts` and applies qemu-io commands.
fn build(dir: &Path, name: &str, opts: &str, size: &str, cmds: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    if opts.is_empty() {
        qemu_img(&["create", "-q", "-f", "qcow2", ps, size]);
    } else {
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, ps, size]);
    }
    if !cmds.is_empty() {
        qemu_io("qcow2", &p, cmds);
    }
    p
}

use crate::common::damage::patch;

fn read_be64(path: &Path, at: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

/// Writes that exercise unaligned ranges, L2 table boundaries, zeroes and discards.
const WRITES: &[&str] = &[
    "write -P 0xab 1M 64k",
    "write -P 0x11 12345 70000",
    "write -P 0x22 2095000 8000",
    "write -P 0x33 32700 200",
    "write -P 0x44 5M 1M",
    "discard 5M 256k",
    "write -z 5632k 64k",
    "write -P 0x55 7M 100k",
    "write -z 7M 10k",
];

#[test]
fn matrix_versions_cluster_sizes_refcount_widths() {
    let dir = scratch();
    let mut n = 0;
    for cs in ["512", "4k", "64k", "2M"] {
        let size = if cs == "2M" { "32M" } else { "8M" };
        let mut variants = vec!["compat=0.10".to_string()];
        for rb in [1, 16, 64] {
            variants.push(format!("compat=1.1,refcount_bits={rb}"));
        }
        for v in variants {
            n += 1;
            let opts = format!("{v},cluster_size={cs}");
            let img = build(dir.path(), &format!("m{n}.qcow2"), &opts, size, WRITES);
            assert_matches_qemu(&img);
        }
    }
}

#[test]
fn long_runs_are_merged() {
    let dir = scratch();
    let img = build(
        dir.path(),
        "runs.qcow2",
        "cluster_size=4k",
        "8M",
        &["write -P 1 0 1M", "write -z 2M 1M"],
    );
    let chain = open_chain(&img).unwrap();
    let layer = &chain.layers()[0];
    let (m, n) = layer.map(0, 8 << 20).unwrap();
    assert!(matches!(m, Mapping::Data { .. }));
    assert_eq!(n, 1 << 20, "contiguous data is one run");
    let (m, n) = layer.map(1 << 20, 7 << 20).unwrap();
    assert!(matches!(m, Mapping::Backing));
    assert_eq!(n, 1 << 20);
    let (m, n) = layer.map((2 << 20) + 7, 7 << 20).unwrap();
    assert!(matches!(m, Mapping::Zero));
    assert_eq!(n, (1 << 20) - 7);
    // An unallocated L1 entry covers its whole L2 range (2 MiB here).
    let (m, n) = layer.map(4 << 20, 4 << 20).unwrap();
    assert!(matches!(m, Mapping::Backing));
    assert_eq!(n, 2 << 20);
}

/// A raw file with varied content.
fn raw_pattern(path: &Path, len: usize) {
    let data: Vec<u8> = (0..len)
        .map(|i| {
            if (i / 65536) % 3 == 2 {
                0
            } else {
                ((i * 7 + i / 4096) % 251) as u8
            }
        })
        .collect();
    std::fs::write(path, data).unwrap();
}

#[test]
fn compressed_zlib_and_zstd() {
    let dir = scratch();
    let raw = dir.path().join("src.raw");
    raw_pattern(&raw, (6 << 20) + 4096);
    let mut n = 0;
    for ct in ["zlib", "zstd"] {
        for cs in ["512", "4k", "64k", "2M"] {
            n += 1;
            let img = dir.path().join(format!("c{n}.qcow2"));
            let opts = format!("compression_type={ct},cluster_size={cs}");
            qemu_img_line(&format!(
                "convert -q -c -f raw -O qcow2 -o {} {} {}",
                &opts,
                raw.to_str().unwrap(),
                img.to_str().unwrap()
            ));
            // Mix compressed clusters with later plain writes.
            qemu_io("qcow2", &img, &["write -P 0x77 100k 3k", "write -z 3M 64k"]);
            assert_matches_qemu(&img);
            let chain = open_chain(&img).unwrap();
            let feats = chain.layers()[0].info().features;
            assert_eq!(
                feats.contains(&"compression_type=zstd".to_string()),
                ct == "zstd"
            );
        }
    }
    // v2 compressed, and qemu-io's own compressed writes.
    let img = build(
        dir.path(),
        "v2c.qcow2",
        "compat=0.10",
        "4M",
        &[
            "write -c -P 0x5a 0 64k",
            "write -c -P 0x5b 1M 64k",
            "write -P 1 64k 4k",
        ],
    );
    assert_matches_qemu(&img);
}

#[test]
fn extended_l2_subclusters_over_a_backing_file() {
    let dir = scratch();
    for cs in ["64k", "2M"] {
        let base = build(
            dir.path(),
            &format!("xb{cs}.qcow2"),
            &format!("cluster_size={cs}"),
            "8M",
            &["write -P 0xbb 0 8M"],
        );
        let top = dir.path().join(format!("xt{cs}.qcow2"));
        qemu_img_line(&format!(
            "create -q -f qcow2 -b {} -F qcow2 -o extended_l2=on,cluster_size={cs} {} 8M",
            base.to_str().unwrap(),
            top.to_str().unwrap()
        ));
        qemu_io(
            "qcow2",
            &top,
            &[
                "write -P 1 2k 2k",
                "write -P 2 6k 4k",
                "write -z 16k 2k",
                "write -P 3 1M 70k",
                "write -z 3M 100k",
                "discard 1M 2k",
                "write -P 4 4095k 3k",
            ],
        );
        assert_matches_qemu(&top);
        let chain = open_chain(&top).unwrap();
        assert!(chain.layers()[0]
            .info()
            .features
            .contains(&"extended_l2".to_string()));
    }
}

#[test]
fn external_data_file_with_and_without_raw() {
    let dir = scratch();
    for raw in [false, true] {
        // Absolute name: qemu resolves a relative data file name against its
        // working directory, vdiskfs against the image's directory.
        let data = dir.path().join(format!("d{raw}.raw"));
        let opts = format!(
            "data_file={},data_file_raw={}",
            data.display(),
            if raw { "on" } else { "off" }
        );
        let img = build(dir.path(), &format!("e{raw}.qcow2"), &opts, "4M", &[]);
        qemu_io(
            "qcow2",
            &img,
            &[
                "write -P 0x61 0 100k",
                "write -P 0x62 2M 1M",
                "write -z 2560k 64k",
                "discard 64k 64k",
            ],
        );
        assert_matches_qemu(&img);
        let chain = open_chain(&img).unwrap();
        let layer = &chain.layers()[0];
        assert_eq!(layer.host_files().len(), 2);
        assert_eq!(layer.host_files()[0].path(), img.as_path());
        let feats = layer.info().features;
        assert!(feats.contains(&"data_file".to_string()));
        assert_eq!(feats.contains(&"data_file_raw".to_string()), raw);
        // The data file missing: open fails naming it.
        std::fs::remove_file(dir.path().join(format!("d{raw}.raw"))).unwrap();
        let e = open_err(&img);
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains(&format!("d{raw}.raw")), "{e}");
    }
}

#[test]
fn internal_snapshots_then_more_writes() {
    let dir = scratch();
    let img = build(
        dir.path(),
        "s.qcow2",
        "cluster_size=4k",
        "4M",
        &["write -P 1 0 1M"],
    );
    qemu_img(&["snapshot", "-q", "-c", "first", img.to_str().unwrap()]);
    qemu_io("qcow2", &img, &["write -P 2 512k 1M", "discard 0 64k"]);
    qemu_img(&["snapshot", "-q", "-c", "second", img.to_str().unwrap()]);
    qemu_io("qcow2", &img, &["write -P 3 3M 4k", "write -z 600k 8k"]);
    assert_matches_qemu(&img);
    let chain = open_chain(&img).unwrap();
    let info = chain.layers()[0].info();
    let names: Vec<&str> = info.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(info.snapshots[0].virtual_size, 4 << 20);
}

#[test]
fn three_deep_chain_with_short_raw_base() {
    let dir = scratch();
    let d = dir.path();
    let base = d.join("base.raw");
    raw_pattern(&base, (3 << 20) + 1000);
    let mid = d.join("mid.qcow2");
    qemu_img_line(&format!(
        "create -q -f qcow2 -b base.raw -F raw -o cluster_size=4k {} 6M",
        mid.to_str().unwrap()
    ));
    qemu_io(
        "qcow2",
        &mid,
        &[
            "write -P 0x21 1M 100k",
            "write -z 2M 64k",
            "write -P 0x22 4M 8k",
        ],
    );
    for recorded in [true, false] {
        let top = d.join(format!("top{recorded}.qcow2"));
        qemu_img_line(&format!(
            "create -q -f qcow2 -b mid.qcow2 -F qcow2 -o cluster_size=64k,compat=0.10 {} 8M",
            top.to_str().unwrap()
        ));
        qemu_io(
            "qcow2",
            &top,
            &["write -P 0x31 1050k 64k", "write -P 0x32 7M 10k"],
        );
        if !recorded {
            // Turn the backing format extension into an unknown one.
            let off = find(&top, &0xe279_2acau32.to_be_bytes());
            patch(&top, off, &0x1234_5678u32.to_be_bytes());
            let chain = open_chain(&top).unwrap();
            assert_eq!(chain.layers()[0].backing().unwrap().format, None);
        }
        assert_matches_qemu(&top);
        let chain = open_chain(&top).unwrap();
        assert_eq!(chain.layers().len(), 3);
    }
}

/// Offset of the first occurrence of `needle` in the file's first 64 KiB.
fn find(path: &Path, needle: &[u8]) -> u64 {
    let data = std::fs::read(path).unwrap();
    let hay = &data[..data.len().min(65536)];
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern present") as u64
}

#[test]
fn unknown_backing_format_is_unsupported() {
    let dir = scratch();
    let base = build(dir.path(), "b.qcow2", "", "1M", &[]);
    let top = dir.path().join("t.qcow2");
    qemu_img_line(&format!(
        "create -q -f qcow2 -b {} -F qcow2 {} 1M",
        base.to_str().unwrap(),
        top.to_str().unwrap()
    ));
    let off = find(&top, &0xe279_2acau32.to_be_bytes());
    patch(&top, off + 8, b"xyz\0\0");
    patch(&top, off + 4, &3u32.to_be_bytes());
    let e = open_err(&top);
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("unsupported format 'xyz'"), "{e}");
}

/// Runs `open` with a read-only open context (default policy, fresh caches).
fn read_only<R>(open: impl FnOnce(&vdiskfs::format::OpenCtx) -> R) -> R {
    let caches = common::caches();
    let policy = vdiskfs::policy::OpenPolicy::default();
    open(&vdiskfs::format::OpenCtx {
        caches: &caches,
        policy: &policy,
        writable: false,
    })
}

fn small_image(dir: &Path, name: &str) -> PathBuf {
    build(
        dir,
        name,
        "cluster_size=64k",
        "4M",
        &["write -P 0x99 0 64k", "write -P 0x98 1M 64k"],
    )
}

#[test]
fn hostile_headers_fail_with_the_right_kind() {
    let dir = scratch();
    let d = dir.path();
    // One row a damage: kept on one line each, as a table.
    #[rustfmt::skip]
    let cases: Vec<(&str, u64, Vec<u8>, ErrorKind)> = vec![
        ("cb8", 20, 8u32.to_be_bytes().to_vec(), ErrorKind::Corrupt),
        ("cb22", 20, 22u32.to_be_bytes().to_vec(), ErrorKind::Corrupt),
        ("l1huge", 36, 0xffff_fff0u32.to_be_bytes().to_vec(), ErrorKind::Corrupt),
        ("l1eof", 40, (1u64 << 40).to_be_bytes().to_vec(), ErrorKind::Corrupt),
        ("l1small", 36, 0u32.to_be_bytes().to_vec(), ErrorKind::Corrupt),
        ("hugesize", 24, (1u64 << 62).to_be_bytes().to_vec(), ErrorKind::Corrupt),
        ("incompat", 72, (1u64 << 10).to_be_bytes().to_vec(), ErrorKind::Unsupported),
        ("aes", 32, 1u32.to_be_bytes().to_vec(), ErrorKind::Encrypted),
        ("luks", 32, 2u32.to_be_bytes().to_vec(), ErrorKind::Encrypted),
        ("version4", 4, 4u32.to_be_bytes().to_vec(), ErrorKind::Unsupported),
        ("refcount7", 96, 7u32.to_be_bytes().to_vec(), ErrorKind::Corrupt),
        ("hdrlen", 100, 64u32.to_be_bytes().to_vec(), ErrorKind::Corrupt),
    ];
    for (name, at, bytes, kind) in cases {
        let img = small_image(d, &format!("{name}.qcow2"));
        patch(&img, at, &bytes);
        let t = std::time::Instant::now();
        let e = open_err(&img);
        assert_eq!(e.kind(), kind, "{name}: {e}");
        assert!(t.elapsed().as_secs() < 2, "{name} took too long");
        assert!(!e.to_string().contains('\n'), "{name}: one-line error");
    }
    // Truncated headers.
    let img = small_image(d, "trunc.qcow2");
    let data = std::fs::read(&img).unwrap();
    for len in [0usize, 50, 100, 512] {
        let p = d.join(format!("trunc{len}.qcow2"));
        std::fs::write(&p, &data[..len]).unwrap();
        let f = vdiskfs::host::HostFile::open(&p).unwrap();
        let Err(e) = read_only(|ctx| vdiskfs::format::qcow2::open(f, ctx)) else {
            panic!("truncated to {len} bytes opened");
        };
        assert_eq!(e.kind(), ErrorKind::Corrupt, "truncated to {len}: {e}");
    }
}

#[test]
fn bad_l2_entries_fail_only_their_range() {
    let dir = scratch();
    let img = small_image(dir.path(), "badl2.qcow2");
    let l1 = read_be64(&img, 40);
    let l2 = read_be64(&img, l1) & 0x00ff_ffff_ffff_fe00;
    let len = std::fs::metadata(&img).unwrap().len();
    // Cluster 0 past end of file; cluster 2 unaligned; cluster 3 both.
    patch(
        &img,
        l2,
        &((1u64 << 63) | (len + (1 << 20)))
            .next_multiple_of(65536)
            .to_be_bytes(),
    );
    patch(&img, l2 + 16, &((1u64 << 63) | 0x10200).to_be_bytes());
    let chain = open_chain(&img).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = chain.read_at(&mut buf, 100).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let e = chain.read_at(&mut buf, 2 * 65536 + 5).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    chain.read_at(&mut buf, 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    chain.read_at(&mut buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0x98));
    // A run that starts intact stops before the damaged entry.
    let (_, n) = chain.layers()[0].map(65536, 3 << 20).unwrap();
    assert_eq!(n, 65536);

    // An L1 entry pointing past the end of the file: only its L2 range fails.
    let img = build(
        dir.path(),
        "badl1.qcow2",
        "cluster_size=4k",
        "8M",
        &["write -P 1 0 4k", "write -P 2 3M 4k"],
    );
    let l1 = read_be64(&img, 40);
    patch(&img, l1, &((1u64 << 63) | (1u64 << 40)).to_be_bytes());
    let chain = open_chain(&img).unwrap();
    assert_eq!(
        chain.read_at(&mut buf, 0).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    chain.read_at(&mut buf, 3 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 2));
}

#[test]
fn info_reports_version_features_and_details() {
    let dir = scratch();
    let img = build(
        dir.path(),
        "i.qcow2",
        "compat=1.1,lazy_refcounts=on,refcount_bits=1",
        "1M",
        &[],
    );
    let chain = open_chain(&img).unwrap();
    let info = chain.layers()[0].info();
    assert_eq!(info.subformat.as_deref(), Some("v3"));
    assert_eq!(info.cluster_size, Some(65536));
    assert!(info.features.contains(&"lazy_refcounts".to_string()));
    assert_eq!(info.details["refcount_bits"], 1);
    let img = build(dir.path(), "v2.qcow2", "compat=0.10", "1M", &[]);
    let chain = open_chain(&img).unwrap();
    let info = chain.layers()[0].info();
    assert_eq!(info.subformat.as_deref(), Some("v2"));
    assert_eq!(info.details["header_length"], 72);
}

/// sha256 of the whole disk, streamed through `sha256sum`.
fn disk_sha256(chain: &vdiskfs::chain::Chain) -> vdiskfs::Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils) is needed");
    let mut stdin = child.stdin.take().unwrap();
    let size = chain.size();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0u64;
    let mut result = Ok(());
    while pos < size {
        let n = (buf.len() as u64).min(size - pos) as usize;
        if let Err(e) = chain.read_at(&mut buf[..n], pos) {
            result = Err(e);
            break;
        }
        stdin.write_all(&buf[..n]).unwrap();
        pos += n as u64;
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    result?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

#[test]
fn shared_testdata_manifest_qcow2_rows() {
    let mut seen = std::collections::HashSet::new();
    let mut checked = 0;
    for row in common::manifest::rows(common::manifest::MANIFEST) {
        if row.format != "qcow2" || !seen.insert(row.file.clone()) {
            continue;
        }
        let file = &row.file;
        let opened = open_chain(&row.path());
        checked += 1;
        let (either, want) = match &row.want {
            Want::Refuse => {
                match opened {
                    Ok(_) => panic!("{file} must be refused but opened"),
                    Err(e) => {
                        eprintln!("{file}: refused: {e}");
                        assert!(!e.to_string().contains('\n'), "{file}: {e}");
                    }
                }
                continue;
            }
            Want::Either(w) => (true, w),
            Want::Sha(w) => (false, w),
        };
        let chain = match opened {
            Ok(c) => c,
            Err(e) if either => {
                eprintln!("{file}: refused (allowed): {e}");
                continue;
            }
            Err(e) => panic!("{file}: {e}"),
        };
        assert_eq!(Some(chain.size()), row.virtual_size, "{file}: virtual size");
        let info = chain.layers()[0].info();
        eprintln!(
            "{file}: {} {:?}, {} snapshots",
            info.subformat.unwrap_or_default(),
            info.features,
            info.snapshots.len()
        );
        let got = disk_sha256(&chain).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(&got, want, "{file}: sha256 of the disk");
    }
    assert!(checked >= 12, "only {checked} qcow2 rows found");
}

#[test]
fn refcounts_of_every_width() {
    let dir = scratch();
    for order in 0..=6u32 {
        let bits = 1u32 << order;
        let img = build(
            dir.path(),
            &format!("r{bits}.qcow2"),
            &format!("refcount_bits={bits},cluster_size=4k"),
            "4M",
            &["write -P 1 0 64k", "write -P 2 2M 4k"],
        );
        if bits > 1 {
            qemu_img(&["snapshot", "-q", "-c", "s", img.to_str().unwrap()]);
        }
        let f = vdiskfs::host::HostFile::open(&img).unwrap();
        let q = read_only(|ctx| vdiskfs::format::qcow2::Qcow2::open(f, ctx)).unwrap();
        use vdiskfs::format::Layer;
        assert_eq!(q.refcount(0).unwrap(), 1, "header cluster, {bits} bits");
        let shared = if bits > 1 { 2 } else { 1 };
        for guest in [0u64, 60 << 10, 2 << 20] {
            let Mapping::Data { offset, .. } = q.map(guest, 4096).unwrap().0 else {
                panic!("guest {guest:#x} is not data");
            };
            assert_eq!(
                q.refcount(offset).unwrap(),
                shared,
                "{bits} bits at {offset:#x}"
            );
        }
        assert_eq!(q.refcount(1 << 40).unwrap(), 0);
    }
}
