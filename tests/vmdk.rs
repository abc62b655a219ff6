//! VMDK read driver: qemu-img-built matrix, real images from the shared
//! testdata manifest, hand-written descriptors and hostile images.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{
    assert_matches_qemu, open_chain, qemu_img, qemu_io, read_all, scratch, sha256_hex, testdata,
};
use sha2::{Digest, Sha256};
use vdiskfs::cache::Caches;
use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::format::Format;
use vdiskfs::ErrorKind;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Opens with the format forced to VMDK.
fn open_vmdk(p: &Path) -> vdiskfs::Result<Chain> {
    let opts = ChainOptions {
        format: Some(Format::Vmdk),
        ..ChainOptions::default()
    };
    Chain::open(p, &opts, &Caches::new(64 << 20))
}

/// sha256 of the whole disk, read in 4 MiB pieces and streamed to
/// `openssl dgst` (the debug-built sha2 crate, and coreutils without SHA
/// extensions, are too slow for 8 GiB disks).
fn stream_sha256(chain: &Chain) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    common::require_tool("openssl", "openssl");
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let size = chain.size();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (buf.len() as u64).min(size - pos) as usize;
        chain.read_at(&mut buf[..n], pos).unwrap();
        stdin.write_all(&buf[..n]).unwrap();
        pos += n as u64;
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// sha256 of a small buffer with the sha2 crate.
fn small_sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, sha256_hex(data));
    hex
}

fn info_details(chain: &Chain) -> serde_json::Map<String, serde_json::Value> {
    chain.layers()[0].info().details
}

// ---------------------------------------------------------------- manifest

fn check_manifest_row(td: &Path, cols: &[&str]) {
    let (file, vsize, sha) = (cols[0], cols[6], cols[9]);
    let path = td.join("images").join(file);
    if sha == "-" {
        let err = open_vmdk(&path)
            .err()
            .unwrap_or_else(|| panic!("{file}: opened"));
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{file}: multi-line error {msg}");
        eprintln!("{file}: refused as expected: {msg}");
        return;
    }
    let chain = open_chain(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(chain.layers()[0].format(), Format::Vmdk, "{file}");
    assert_eq!(chain.size().to_string(), vsize, "{file}: virtual size");
    assert_eq!(stream_sha256(&chain), sha, "{file}: sha256");
}

#[test]
fn manifest_images() {
    let td = testdata();
    let manifest = fs::read_to_string(td.join("MANIFEST.tsv")).unwrap();
    let rows: Vec<Vec<&str>> = manifest
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .filter(|c| c.len() >= 10)
        .filter(|c| c[4] == "vmdk" || (c[4] == "-" && c[0].starts_with("vmdk-")))
        .collect();
    // Two 8 GiB disks dominate: check rows on parallel threads.
    std::thread::scope(|sc| {
        for cols in &rows {
            let td = &td;
            sc.spawn(move || check_manifest_row(td, cols));
        }
    });
    let rows = rows.len();
    assert!(rows >= 13, "only {rows} VMDK rows in the manifest");
}

#[test]
fn manifest_info_fields() {
    let td = testdata().join("images");
    let c = open_chain(&td.join("vmdk-vmdkrs-vmfs/vmfs_thick.vmdk")).unwrap();
    let d = info_details(&c);
    assert_eq!(d["create_type"], "vmfs");
    assert_eq!(d["cid"], "0172e8a4");
    assert_eq!(d["adapter_type"], "lsilogic");
    assert_eq!(d["geometry"]["heads"], 64);
    assert_eq!(d["virtual_hw_version"], 14);
    assert_eq!(d["extents"][0]["kind"], "VMFS");
    let c = open_chain(&td.join("vmdk-dissect-sesparse/disk.vmdk")).unwrap();
    assert_eq!(c.layers()[0].info().subformat.as_deref(), Some("seSparse"));
    assert_eq!(info_details(&c)["grain_size"], 4096);
    let c = open_chain(&td.join("vmdk-cot-ovftool-streamOptimized-progressmarkers.vmdk")).unwrap();
    let i = c.layers()[0].info();
    assert_eq!(i.cluster_size, Some(65536));
    assert_eq!(i.details["version"], 3);
    assert!(i.features.iter().any(|f| f == "gd_at_end"));
}

// ---------------------------------------------------------- qemu-img matrix

/// Writes a scattered pattern through qemu-io (grain-aligned and not).
fn scatter_writes(img: &Path, size_mib: u64) {
    let last = size_mib * 1024 - 100;
    let cmds = [
        "write -P 0x5a 0 4k".to_string(),
        "write -P 0x11 61k 10k".to_string(),
        "write -P 0x22 1M 300k".to_string(),
        "write -P 0x33 3000k 2M".to_string(),
        format!("write -P 0x44 {}k 64k", size_mib * 512 + 7),
        format!("write -P 0x55 {last}k 100k"),
    ];
    let refs: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
    qemu_io("vmdk", img, &refs);
}

#[test]
fn qemu_subformat_matrix() {
    let dir = scratch();
    let mut cases: Vec<(String, Vec<String>)> = Vec::new();
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ] {
        cases.push((sub.into(), vec![format!("subformat={sub}")]));
    }
    cases.push(("compat6".into(), vec!["compat6=on".into()]));
    for a in ["ide", "buslogic", "lsilogic", "legacyESX"] {
        cases.push((format!("adapter-{a}"), vec![format!("adapter_type={a}")]));
    }
    cases.push(("zeroed".into(), vec!["zeroed_grain=on".into()]));
    cases.push((
        "zeroed-split".into(),
        vec![
            "zeroed_grain=on".into(),
            "subformat=twoGbMaxExtentSparse".into(),
        ],
    ));
    for (name, opts) in cases {
        let img = dir.path().join(format!("{name} disk.vmdk"));
        let o = opts.join(",");
        qemu_img(&["create", "-q", "-f", "vmdk", "-o", &o, s(&img), "9M"]);
        scatter_writes(&img, 9);
        if name.starts_with("zeroed") {
            qemu_io("vmdk", &img, &["write -z 1M 128k", "write -z 5M 64k"]);
        }
        assert_matches_qemu(&img);
        let c = open_chain(&img).unwrap();
        let d = info_details(&c);
        assert_eq!(d["capacity_bytes"], 9 << 20, "{name}");
        if let Some(a) = name.strip_prefix("adapter-") {
            assert_eq!(d["adapter_type"], a);
        }
    }
}

#[test]
fn qemu_stream_optimized() {
    let dir = scratch();
    let raw = dir.path().join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "13M"]);
    // Random-ish data compresses badly, patterns compress well: both.
    let noise: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut disk = fs::read(&raw).unwrap();
    disk[2 << 20..3 << 20].copy_from_slice(&noise);
    disk[(13 << 20) - 700..].fill(0x77);
    fs::write(&raw, &disk).unwrap();
    qemu_io(
        "raw",
        &raw,
        &["write -P 0x5a 64k 64k", "write -P 0x12 5M 1000k"],
    );
    let img = dir.path().join("stream.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&raw),
        s(&img),
    ]);
    assert_matches_qemu(&img);
    let c = open_chain(&img).unwrap();
    let i = c.layers()[0].info();
    assert_eq!(i.subformat.as_deref(), Some("streamOptimized"));
    assert!(i.features.iter().any(|f| f == "compressed_grains"));
    // The qcow2 route, as the brief's recipe says.
    let q = dir.path().join("src.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&q)]);
    let img2 = dir.path().join("stream2.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&q),
        s(&img2),
    ]);
    let got = read_all(&open_chain(&img2).unwrap(), 1 << 20).unwrap();
    assert_eq!(small_sha256(&got), small_sha256(&fs::read(&raw).unwrap()));
}

/// 5 GiB split images, sparse on the host; compares windows around the
/// 2 GiB extent boundaries against qemu-img's raw conversion.
#[test]
fn qemu_large_split_images() {
    let dir = scratch();
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let img = dir.path().join(format!("{sub}.vmdk"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            s(&img),
            "5G",
        ]);
        qemu_io(
            "vmdk",
            &img,
            &[
                "write -P 0x5a 2047M 2M",
                "write -P 0x6b 4095M 1536k",
                "write -P 0x7c 5119M 1M",
                "write -P 0x01 100M 4k",
            ],
        );
        let raw = dir.path().join(format!("{sub}.raw"));
        qemu_img(&["convert", "-O", "raw", s(&img), s(&raw)]);
        let oracle = fs::File::open(&raw).unwrap();
        let c = open_chain(&img).unwrap();
        assert_eq!(c.size(), 5 << 30);
        assert_eq!(info_details(&c)["extents"].as_array().unwrap().len(), 3);
        let mib = 1u64 << 20;
        for start in [
            0,
            100 * mib,
            2046 * mib,
            2047 * mib + 4093,
            4094 * mib,
            4095 * mib,
            5118 * mib,
        ] {
            let len = (3 * mib).min(c.size() - start) as usize;
            let mut got = vec![0u8; len];
            c.read_at(&mut got, start).unwrap();
            let mut want = vec![0u8; len];
            std::os::unix::fs::FileExt::read_exact_at(&oracle, &mut want, start).unwrap();
            assert!(got == want, "{sub}: window at {start:#x} differs");
        }
    }
}

#[test]
fn qemu_delta_chains() {
    let dir = scratch();
    let base = dir.path().join("base.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&base), "12M"]);
    scatter_writes(&base, 12);
    let mid = dir.path().join("mid.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        s(&mid),
    ]);
    qemu_io(
        "vmdk",
        &mid,
        &["write -P 0xa1 1100k 8k", "write -P 0xa2 8M 1M"],
    );
    let top = dir.path().join("top.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "mid.vmdk",
        "-F",
        "vmdk",
        s(&top),
    ]);
    qemu_io(
        "vmdk",
        &top,
        &["write -P 0xb1 0 2k", "write -P 0xb2 8200k 64k"],
    );
    assert_matches_qemu(&top);
    let c = open_chain(&top).unwrap();
    assert_eq!(c.layers().len(), 3);
    let spec = c.layers()[0].backing().unwrap();
    assert_eq!(spec.name, "mid.vmdk");
    assert_eq!(spec.parent_cid, c.layers()[1].cid());
    assert!(c.layers()[2].backing().is_none());
    // A split-sparse child of a flat parent.
    let fp = dir.path().join("flat parent.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&fp),
        "6M",
    ]);
    qemu_io("vmdk", &fp, &["write -P 0x3c 0 6M"]);
    let ch = dir.path().join("child.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        "-b",
        "flat parent.vmdk",
        "-F",
        "vmdk",
        s(&ch),
    ]);
    qemu_io("vmdk", &ch, &["write -P 0x4d 1M 65k"]);
    assert_matches_qemu(&ch);
}
