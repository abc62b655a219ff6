//! Inputs the fuzzers found (or that their seeds pin down), replayed through
//! the same entry points: none may panic, hang or allocate without bound.

use std::path::Path;

use vdiskfs::format::Format;
use vdiskfs::fuzzing::{open_and_read, open_layer};

fn inputs() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz");
    let mut v = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            continue;
        }
        v.push((name, std::fs::read(e.path()).unwrap()));
    }
    v
}

#[test]
fn every_saved_input_is_handled() {
    let inputs = inputs();
    for (name, data) in &inputs {
        eprintln!("replaying {name}");
        for f in [
            Format::Qcow2,
            Format::Qcow,
            Format::Vmdk,
            Format::Vhd,
            Format::Vdi,
            Format::Parallels,
            Format::Raw,
        ] {
            open_layer(data, f);
            open_and_read(data, Some(f), &[]);
        }
        open_and_read(data, None, data.get(..64).unwrap_or(&[]));
        // As the qcow2_tables / vmdk_read / chain_read targets split them.
        for (tail, fmt) in [
            (512, Some(Format::Qcow2)),
            (256, Some(Format::Vmdk)),
            (256, None),
        ] {
            let (image, script) = data.split_at(data.len().saturating_sub(tail));
            let started = std::time::Instant::now();
            open_and_read(image, fmt, script);
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{name}: {:?} as {fmt:?} took {:?}",
                tail,
                started.elapsed()
            );
        }
    }
}

#[test]
fn synthetic_edge_blobs_are_handled() {
    // Headers alone, with every length field at its extreme.
    let mut blobs: Vec<Vec<u8>> = vec![Vec::new(), b"QFI\xfb".to_vec(), b"KDMV".to_vec()];
    for version in [1u32, 2, 3] {
        let mut h = b"QFI\xfb".to_vec();
        h.extend_from_slice(&version.to_be_bytes());
        h.resize(512, 0xff);
        blobs.push(h);
    }
    let mut k = b"KDMV".to_vec();
    k.resize(512, 0xff);
    blobs.push(k);
    blobs.push(b"# Disk DescriptorFile\ncreateType=\"monolithicSparse\"\nRW 99999999999999999999 SPARSE \"x\"\n".to_vec());
    for b in &blobs {
        open_and_read(b, None, &[]);
        for f in [Format::Qcow2, Format::Qcow, Format::Vmdk] {
            open_layer(b, f);
        }
    }
}

#[test]
fn vdi_and_parallels_headers_at_extremes_are_handled() {
    let mut blobs = Vec::new();
    for fill in [0x00u8, 0xff] {
        let mut vdi = vec![fill; 0x1c8 + 64];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        vdi[0x44..0x48].copy_from_slice(&0x0001_0001u32.to_le_bytes());
        blobs.push(vdi);
        for magic in [b"WithoutFreeSpace", b"WithouFreSpacExt"] {
            let mut p = magic.to_vec();
            p.extend_from_slice(&2u32.to_le_bytes());
            p.resize(64 + 64, fill);
            blobs.push(p);
        }
    }
    blobs.push(
        b"<?xml version='1.0'?>\n<Parallels_disk_image><Disk_Parameters><Disk_size>99999999999999999999\
          </Disk_size></Disk_Parameters><StorageData><Storage><Start>0</Start><End>18446744073709551615</End>\
          <Image><Type>Plain</Type><File>x</File></Image></Storage></StorageData></Parallels_disk_image>"
            .to_vec(),
    );
    for b in &blobs {
        let started = std::time::Instant::now();
        open_and_read(b, None, &[]);
        open_layer(b, Format::Vdi);
        open_layer(b, Format::Parallels);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
