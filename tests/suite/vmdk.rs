//! VMDK read driver: qemu-img-built matrix, real images from the shared
//! testdata manifest, hand-written descriptors and hostile images.

use crate::common;
use common::damage::assert_fails_only_at;
use common::manifest;
use common::qemu_img_line;
use common::s;

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

fn check_manifest_row(row: &manifest::Row) {
    let file = row.file.as_str();
    let path = row.path();
    let Some(sha) = row.want.sha() else {
        let err = open_vmdk(&path)
            .err()
            .unwrap_or_else(|| panic!("{file}: opened"));
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{file}: multi-line error {msg}");
        eprintln!("{file}: refused as expected: {msg}");
        return;
    };
    let chain = open_chain(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(chain.layers()[0].format(), Format::Vmdk, "{file}");
    assert_eq!(Some(chain.size()), row.virtual_size, "{file}: virtual size");
    assert_eq!(stream_sha256(&chain), sha, "{file}: sha256");
}

#[test]
fn manifest_images() {
    let rows: Vec<manifest::Row> = manifest::rows(manifest::MANIFEST)
        .into_iter()
        .filter(|r| r.format == "vmdk" || (r.format == "-" && r.file.starts_with("vmdk-")))
        .collect();
    // Two 8 GiB disks dominate: check rows on parallel threads.
    std::thread::scope(|sc| {
        for row in &rows {
            sc.spawn(move || check_manifest_row(row));
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
    // The bare seSparse extent is a VMDK on its own, with the same data.
    let bare = open_chain(&td.join("vmdk-dissect-sesparse/disk-sesparse.vmdk")).unwrap();
    assert_eq!(bare.size(), c.size());
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    for off in [0u64, 3 << 20, 100 << 20] {
        c.read_at(&mut a, off).unwrap();
        bare.read_at(&mut b, off).unwrap();
        assert!(a == b, "seSparse bare/descriptor differ at {off:#x}");
    }
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
    qemu_img_line(&format!(
        "convert -O vmdk -o subformat=streamOptimized {} {}",
        s(&raw),
        s(&img)
    ));
    assert_matches_qemu(&img);
    let c = open_chain(&img).unwrap();
    let i = c.layers()[0].info();
    assert_eq!(i.subformat.as_deref(), Some("streamOptimized"));
    assert!(i.features.iter().any(|f| f == "compressed_grains"));
    // The qcow2 route, as the brief's recipe says.
    let q = dir.path().join("src.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&q)]);
    let img2 = dir.path().join("stream2.vmdk");
    qemu_img_line(&format!(
        "convert -O vmdk -o subformat=streamOptimized {} {}",
        s(&q),
        s(&img2)
    ));
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
        qemu_img_line(&format!(
            "create -q -f vmdk -o subformat={sub} {} 5G",
            s(&img)
        ));
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
    qemu_img_line(&format!(
        "create -q -f vmdk -b base.vmdk -F vmdk {}",
        s(&mid)
    ));
    qemu_io(
        "vmdk",
        &mid,
        &["write -P 0xa1 1100k 8k", "write -P 0xa2 8M 1M"],
    );
    let top = dir.path().join("top.vmdk");
    qemu_img_line(&format!(
        "create -q -f vmdk -b mid.vmdk -F vmdk {}",
        s(&top)
    ));
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
    // A name with a space: not through qemu_img_line.
    let flat = [
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
    ];
    qemu_img(&[&flat[..], &[s(&fp), "6M"]].concat());
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

// ------------------------------------------------- hand-written descriptors

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 11) as u8)
        .collect()
}

/// Writes `pattern(len, seed)` to `path` and returns it.
fn pattern_file(path: &Path, len: usize, seed: u32) -> Vec<u8> {
    let data = pattern(len, seed);
    fs::write(path, &data).unwrap();
    data
}

#[test]
fn handwritten_mixed_extents() {
    let dir = scratch();
    let d = dir.path();
    let flat = pattern_file(&d.join("flat part.bin"), 3 << 20, 1);
    let sp = d.join("sparse part.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&sp), "2M"]);
    qemu_io(
        "vmdk",
        &sp,
        &["write -P 0x66 4k 100k", "write -P 0x67 1M 1M"],
    );
    let sp_raw = common::qemu_raw(&sp, Some("vmdk"));
    let desc = "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=11112222\n\
        parentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\n\
        RW 2048 FLAT \"flat part.bin\" 2048\nRW 1024 ZERO\n\
        RDONLY 4096 SPARSE \"sparse part.vmdk\"\nRW 512 FLAT \"flat part.bin\" 0\n\n\
        #DDB\nddb.adapterType = \"lsilogic\"\nddb.geometry.biosCylinders = \"3\"\n\
        ddb.geometry.biosHeads = \"16\"\nddb.geometry.biosSectors = \"63\"\n";
    let top = d.join("mixed.vmdk");
    fs::write(&top, desc).unwrap();
    let mut want = Vec::new();
    want.extend_from_slice(&flat[1 << 20..2 << 20]);
    want.extend_from_slice(&[0u8; 512 << 10]);
    want.extend_from_slice(&sp_raw);
    want.extend_from_slice(&flat[..256 << 10]);
    let c = open_chain(&top).unwrap();
    assert_eq!(c.size(), want.len() as u64);
    for piece in [1 << 20, 4096 + 512, 777] {
        assert!(read_all(&c, piece).unwrap() == want, "piece {piece}");
    }
    let det = info_details(&c);
    assert_eq!(det["extents"].as_array().unwrap().len(), 4);
    assert_eq!(det["extents"][0]["offset"], 2048);
    assert_eq!(det["extents"][0]["file"], "flat part.bin");
    assert_eq!(det["extents"][1]["kind"], "ZERO");
    assert_eq!(det["extents"][2]["access"], "RDONLY");
    assert_eq!(det["bios_geometry"]["heads"], 16);
    assert_eq!(det["cid"], "11112222");
    let files = c.layers()[0].host_files();
    assert_eq!(files[0].path(), top.as_path());
    assert_eq!(files.len(), 3);
    // A ZERO run maps as one zero run.
    let (st, n) = c.status(1 << 20, 1 << 20).unwrap();
    assert_eq!((st, n), (vdiskfs::chain::Status::Hole, 512 << 10));
}

#[test]
fn handwritten_vmfs_flat() {
    // qemu 10 misreads short hand-written vmfs descriptors (it reports the
    // extent twice), so the expected bytes are the flat file itself; the
    // ESXi-written vmfs image of the manifest is checked against qemu.
    let dir = scratch();
    let d = dir.path();
    let data = pattern_file(&d.join("v-flat.vmdk"), 2 << 20, 9);
    let top = d.join("v.vmdk");
    fs::write(
        &top,
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"vmfsThin\"\n\nRW 4096 VMFS \"v-flat.vmdk\"\n\nddb.adapterType = \"lsilogic\"\n",
    )
    .unwrap();
    assert_eq!(
        vdiskfs::format::detect_bytes(&fs::read(&top).unwrap()),
        Format::Vmdk
    );
    let c = open_chain(&top).unwrap();
    assert!(read_all(&c, 65536 + 512).unwrap() == data);
    assert_eq!(c.layers()[0].info().subformat.as_deref(), Some("vmfsThin"));
    // One run for the whole flat extent.
    assert_eq!(c.layers()[0].map(0, 2 << 20).unwrap().1, 2 << 20);
}

#[test]
fn cid_mismatch_is_refused_unless_ignored() {
    let dir = scratch();
    let base = dir.path().join("base.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&base), "4M"]);
    qemu_io("vmdk", &base, &["write -P 0x21 0 1M"]);
    let child = dir.path().join("child.vmdk");
    qemu_img_line(&format!(
        "create -q -f vmdk -b base.vmdk -F vmdk {}",
        s(&child)
    ));
    let mut bytes = fs::read(&child).unwrap();
    // qemu writes CIDs without padding (7 digits sometimes): overwrite the
    // whole value, keeping its width, with digits that differ from it.
    let at = bytes.windows(10).position(|w| w == b"parentCID=").unwrap() + 10;
    let width = bytes[at..].iter().position(|&b| b == b'\n').unwrap();
    let fake = &b"0badc1d0"[8 - width..];
    bytes[at..at + width].copy_from_slice(fake);
    fs::write(&child, &bytes).unwrap();
    let err = open_chain(&child).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::CidMismatch, "{err}");
    let opts = ChainOptions {
        ignore_cid: true,
        ..ChainOptions::default()
    };
    let c = Chain::open(&child, &opts, &Caches::new(1 << 20)).unwrap();
    let mut b = vec![0u8; 4096];
    c.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x21));
    let want = format!(
        "{:08x}",
        u32::from_str_radix("0badc1d0", 16).unwrap() & (u32::MAX >> (4 * (8 - width as u32)))
    );
    assert_eq!(info_details(&c)["parent_cid"], want.as_str());
}

// ------------------------------------------------------------------ hostile

fn sparse_image(dir: &Path, name: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "vmdk", s(&p), size]);
    qemu_io("vmdk", &p, &["write -P 0x31 0 1M", "write -P 0x32 33M 1M"]);
    p
}

fn patched(src: &Path, dst: &Path, patches: &[(usize, &[u8])]) -> PathBuf {
    let mut b = fs::read(src).unwrap();
    for (at, bytes) in patches {
        b[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    fs::write(dst, b).unwrap();
    dst.to_path_buf()
}

/// A named list of (offset, bytes) patches.
type PatchCase<'a> = (&'a str, Vec<(usize, &'a [u8])>);

fn le32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn hostile_headers() {
    let dir = scratch();
    let d = dir.path();
    let good = sparse_image(d, "good.vmdk", "40M");
    let orig = read_all(&open_chain(&good).unwrap(), 1 << 20).unwrap();
    let cases: Vec<PatchCase> = vec![
        ("zero-grain", vec![(20, &[0u8; 8][..])]),
        ("odd-grain", vec![(20, &[3u8, 0, 0, 0, 0, 0, 0, 0][..])]),
        ("huge-grain", vec![(20, &[0u8, 0, 0, 0, 1, 0, 0, 0][..])]),
        ("zero-gtes", vec![(44, &[0u8; 4][..])]),
        ("huge-gtes", vec![(44, &[0u8, 0, 0, 1][..])]),
        (
            "gd-past-eof",
            vec![
                (48, &[0xffu8, 0xff, 0xff, 0, 0, 0, 0, 0][..]),
                (56, &[0xffu8, 0xff, 0xff, 0, 0, 0, 0, 0][..]),
            ],
        ),
        ("version-9", vec![(4, &[9u8, 0, 0, 0][..])]),
    ];
    for (name, p) in cases {
        let img = patched(&good, &d.join(format!("{name}.vmdk")), &p);
        let err = open_vmdk(&img)
            .err()
            .unwrap_or_else(|| panic!("{name} opened"));
        let want = if name == "version-9" {
            ErrorKind::Unsupported
        } else {
            ErrorKind::Corrupt
        };
        assert_eq!(err.kind(), want, "{name}: {err}");
    }
    // Primary GD out of range, redundant fine: reads work, info says so.
    let img = patched(
        &good,
        &d.join("bad-primary.vmdk"),
        &[(56, &[0xffu8, 0xff, 0xff, 0, 0, 0, 0, 0])],
    );
    let c = open_chain(&img).unwrap();
    assert!(read_all(&c, 1 << 20).unwrap() == orig);
    assert_eq!(info_details(&c)["used_redundant_gd"], true);
    // First grain table out of range in both directories: only its range fails.
    let b = fs::read(&good).unwrap();
    let rgd = le32_at(&b, 48) as usize * 512;
    let gd = le32_at(&b, 56) as usize * 512;
    let img = patched(
        &good,
        &d.join("bad-gt.vmdk"),
        &[(rgd, &[0, 0, 0xff, 0][..]), (gd, &[0, 0, 0xff, 0][..])],
    );
    assert_fails_only_at(&open_chain(&img).unwrap(), 0, &[33 << 20], 0x32);
}

#[test]
fn hostile_stream_files() {
    let dir = scratch();
    let d = dir.path();
    // Truncated GD_AT_END stream: the footer is gone.
    let src = testdata().join("images/vmdk-mdx1-ovftool463-streamOptimized.vmdk");
    let mut b = fs::read(&src).unwrap();
    b.truncate(b.len() - 1024);
    let t = d.join("truncated.vmdk");
    fs::write(&t, &b).unwrap();
    let err = open_chain(&t).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("footer"), "{err}");
    // A grain marker claiming a huge compressed size.
    let raw = d.join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "4M"]);
    qemu_io(
        "raw",
        &raw,
        &["write -P 0x41 0 64k", "write -P 0x42 1M 64k"],
    );
    let st = d.join("stream.vmdk");
    qemu_img_line(&format!(
        "convert -O vmdk -o subformat=streamOptimized {} {}",
        s(&raw),
        s(&st)
    ));
    let b = fs::read(&st).unwrap();
    let first = u64::from_le_bytes(b[64..72].try_into().unwrap()) as usize * 512;
    assert_eq!(
        u64::from_le_bytes(b[first..first + 8].try_into().unwrap()),
        0
    );
    let img = patched(
        &st,
        &d.join("huge-marker.vmdk"),
        &[(first + 8, &[0xff, 0xff, 0xff, 0x7f][..])],
    );
    assert_fails_only_at(&open_chain(&img).unwrap(), 0, &[1 << 20], 0x42);
}

#[test]
fn hostile_descriptors() {
    let dir = scratch();
    let d = dir.path();
    // Binary garbage after a plausible first line.
    let mut g = b"# Disk DescriptorFile\nversion=1\n".to_vec();
    g.extend(pattern(3000, 5));
    let p = d.join("garbage.vmdk");
    fs::write(&p, &g).unwrap();
    assert_eq!(vdiskfs::format::detect_bytes(&g), Format::Raw);
    let err = open_vmdk(&p).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(!err.to_string().contains('\n'));
    // Random data is never taken for a VMDK.
    for seed in 0..50 {
        assert_eq!(
            vdiskfs::format::detect_bytes(&pattern(4096, seed)),
            Format::Raw
        );
    }
    // Too large to be a descriptor.
    let big = d.join("big.vmdk");
    fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    assert_eq!(open_vmdk(&big).err().unwrap().kind(), ErrorKind::Corrupt);
    // Missing extent file: the error names the line and the file.
    let m = d.join("missing.vmdk");
    fs::write(
        &m,
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n\
         createType=\"twoGbMaxExtentFlat\"\nRW 8 FLAT \"there.bin\" 0\nRW 8 FLAT \"not here.bin\" 0\n",
    )
    .unwrap();
    fs::write(d.join("there.bin"), [1u8; 4096]).unwrap();
    let err = open_chain(&m).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("line 7") && msg.contains("not here.bin"),
        "{msg}"
    );
    // Raw devices are refused.
    let dev = d.join("dev.vmdk");
    fs::write(
        &dev,
        "# Disk DescriptorFile\nversion=1\ncreateType=\"fullDevice\"\nRW 8 FLAT \"/dev/sda\" 0\n",
    )
    .unwrap();
    assert_eq!(
        open_chain(&dev).err().unwrap().kind(),
        ErrorKind::Unsupported
    );
    // Extent lines that do not parse.
    for bad in [
        "RW x FLAT \"a\" 0",
        "RW 8 FLAT \"a",
        "RW 8 WEIRD \"a\"",
        "RW 8 SPARSE \"a\" 5",
    ] {
        let p = d.join("bad.vmdk");
        fs::write(
            &p,
            format!("# Disk DescriptorFile\ncreateType=\"custom\"\n{bad}\n"),
        )
        .unwrap();
        assert_eq!(
            open_chain(&p).err().unwrap().kind(),
            ErrorKind::Corrupt,
            "{bad}"
        );
    }
}

/// A hand-built ESXi vmfsSparse (COWD) delta over a vmfs flat parent.
#[test]
fn handwritten_cowd_delta() {
    let dir = scratch();
    let d = dir.path();
    fs::write(d.join("p-flat.vmdk"), vec![0x11u8; 1 << 20]).unwrap();
    fs::write(
        d.join("p.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=abcd0123\nparentCID=ffffffff\n\
         createType=\"vmfs\"\n\nRW 2048 VMFS \"p-flat.vmdk\"\n",
    )
    .unwrap();
    let cowd = common::cowd_extent(&[(0, 0xaa), (3, 0xbb)]);
    fs::write(d.join("d-delta.vmdk"), &cowd).unwrap();
    let top = d.join("d.vmdk");
    fs::write(
        &top,
        "# Disk DescriptorFile\nversion=1\nCID=00000042\nparentCID=abcd0123\n\
         createType=\"vmfsSparse\"\nparentFileNameHint=\"p.vmdk\"\n\n\
         RW 2048 VMFSSPARSE \"d-delta.vmdk\"\n",
    )
    .unwrap();
    let c = open_chain(&top).unwrap();
    assert_eq!(c.layers().len(), 2);
    let got = read_all(&c, 3000).unwrap();
    let mut want = vec![0x11u8; 1 << 20];
    want[..4096].fill(0xaa);
    want[3 * 4096..4 * 4096].fill(0xbb);
    assert!(got == want);
    let i = c.layers()[0].info();
    assert_eq!(i.details["sparse_kind"], "COWD");
    assert_eq!(i.cluster_size, Some(4096));
    // The COWD file alone is a VMDK too (no parent: unallocated reads zero).
    let alone = open_chain(&d.join("d-delta.vmdk")).unwrap();
    let mut b = vec![0u8; 8192];
    alone.read_at(&mut b, 4096).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn zeroed_grains_read_as_holes() {
    let dir = scratch();
    let img = dir.path().join("z.vmdk");
    qemu_img_line(&format!(
        "create -q -f vmdk -o zeroed_grain=on {} 4M",
        s(&img)
    ));
    qemu_io("vmdk", &img, &["write -P 0x5a 0 4M", "write -z 1M 128k"]);
    let c = open_chain(&img).unwrap();
    assert_eq!(
        c.status(1 << 20, 1 << 20).unwrap(),
        (vdiskfs::chain::Status::Hole, 128 << 10)
    );
    let (m, n) = c.layers()[0].map(0, 1 << 20).unwrap();
    assert!(matches!(m, vdiskfs::format::Mapping::Data { .. }));
    assert_eq!(n, 1 << 20, "contiguous grains map as one run");
}
