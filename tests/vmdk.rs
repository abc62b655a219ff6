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

/// sha256 of the whole disk, read in 4 MiB pieces.
fn stream_sha256(chain: &Chain) -> String {
    let size = chain.size();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (buf.len() as u64).min(size - pos) as usize;
        chain.read_at(&mut buf[..n], pos).unwrap();
        h.update(&buf[..n]);
        pos += n as u64;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn info_details(chain: &Chain) -> serde_json::Map<String, serde_json::Value> {
    chain.layers()[0].info().details
}

// ---------------------------------------------------------------- manifest

#[test]
fn manifest_images() {
    let td = testdata();
    let manifest = fs::read_to_string(td.join("MANIFEST.tsv")).unwrap();
    let mut rows = 0;
    for line in manifest.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 10 {
            continue;
        }
        let (file, format, vsize, sha) = (cols[0], cols[4], cols[6], cols[9]);
        if format != "vmdk" && !(format == "-" && file.starts_with("vmdk-")) {
            continue;
        }
        rows += 1;
        let path = td.join("images").join(file);
        if sha == "-" {
            let err = open_vmdk(&path)
                .err()
                .unwrap_or_else(|| panic!("{file}: opened"));
            let msg = err.to_string();
            assert!(!msg.contains('\n'), "{file}: multi-line error {msg}");
            eprintln!("{file}: refused as expected: {msg}");
            continue;
        }
        let chain = open_chain(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(chain.layers()[0].format(), Format::Vmdk, "{file}");
        assert_eq!(chain.size().to_string(), vsize, "{file}: virtual size");
        assert_eq!(stream_sha256(&chain), sha, "{file}: sha256");
    }
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
