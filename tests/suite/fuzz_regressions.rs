//! Inputs the fuzzers found (or that their seeds pin down), replayed through
//! the same entry points: none may panic, hang or allocate without bound.

use crate::common;

use std::path::Path;

use vdiskfs::format::Format;
use vdiskfs::fuzzing::{open_and_read, open_and_write, open_layer};

fn inputs() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz");
    let mut v = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if Path::new(&name)
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("md"))
        {
            continue;
        }
        v.push((name, std::fs::read(e.path()).unwrap()));
    }
    v
}

/// The formats a saved input is opened and read as.
const READ_FORMATS: [Format; 7] = [
    Format::Qcow2,
    Format::Qcow,
    Format::Vmdk,
    Format::Vhd,
    Format::Vdi,
    Format::Parallels,
    Format::Raw,
];

/// The formats the write_paths target picks from (first byte).
const WRITE_FORMATS: [Format; 6] = [
    Format::Qcow2,
    Format::Qcow,
    Format::Vmdk,
    Format::Vhd,
    Format::Vdi,
    Format::Vhdx,
];

#[test]
fn every_saved_input_is_handled() {
    let inputs = inputs();
    for (name, data) in &inputs {
        eprintln!("replaying {name}");
        for f in READ_FORMATS {
            open_layer(data, f);
            open_and_read(data, Some(f), &[]);
        }
        open_and_read(data, None, data.get(..64).unwrap_or(&[]));
        // As the write_paths target splits them (first byte: the format).
        for f in WRITE_FORMATS {
            let (image, script) = data.split_at(data.len().saturating_sub(512));
            open_and_write(image, f, script);
        }
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

/// Without libFuzzer: the write_paths entry point over a few thousand
/// mutated small images (qemu-img made: qcow2 with 512 B, 4 KiB and
/// subcluster clusters, v2, qcow v1, sparse VMDK, dynamic and fixed VHD,
/// dynamic and static VDI), each with a random
/// script of writes, zeroings, flushes and reads. Mutations hit the first
/// 64 KiB, where the headers and tables of these images live.
#[test]
fn write_paths_survive_mutated_images() {
    let runs: usize = std::env::var("VDISKFS_WRITE_FUZZ_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let d = common::scratch();
    let mk = |name: &str, fmt: &'static str, opts: &str, size: &str, io: &str| {
        let p = d.path().join(name);
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let ps = p.to_str().unwrap().to_string();
        args.extend([ps.as_str(), size]);
        common::qemu_img(&args);
        common::qemu_io(fmt, &p, &[io]);
        (std::fs::read(&p).unwrap(), fmt)
    };
    let seeds = [
        mk(
            "a.qcow2",
            "qcow2",
            "cluster_size=512",
            "256k",
            "write -P 1 0 40k",
        ),
        mk(
            "b.qcow2",
            "qcow2",
            "cluster_size=4096",
            "1M",
            "write -c -P 2 0 4k",
        ),
        mk(
            "c.qcow2",
            "qcow2",
            "cluster_size=16384,extended_l2=on",
            "1M",
            "write -P 5 1k 3k",
        ),
        mk(
            "d.qcow2",
            "qcow2",
            "compat=0.10,cluster_size=4096",
            "1M",
            "write -P 6 0 8k",
        ),
        mk("e.qcow", "qcow", "", "256k", "write -P 7 0 8k"),
        mk(
            "f.vmdk",
            "vmdk",
            "subformat=monolithicSparse",
            "1M",
            "write -P 8 0 64k",
        ),
        mk(
            "g.vhd",
            "vpc",
            "subformat=dynamic",
            "1M",
            "write -P 9 0 40k",
        ),
        mk(
            "h.vhd",
            "vpc",
            "subformat=fixed",
            "256k",
            "write -P 10 0 8k",
        ),
        mk("i.vdi", "vdi", "", "1M", "write -P 11 0 40k"),
        mk("j.vdi", "vdi", "static=on", "1M", "write -P 12 0 8k"),
        mk(
            "k.vhdx",
            "vhdx",
            "block_size=1M",
            "4M",
            "write -P 13 0 1536k",
        ),
    ];
    let mut r = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        r
    };
    let started = std::time::Instant::now();
    for i in 0..runs {
        let (seed, fmt) = &seeds[i % seeds.len()];
        let mut image = seed.clone();
        // VHDX keeps its headers, regions and BAT in the first 3 MiB.
        let reach = image
            .len()
            .min(if *fmt == "vhdx" { 3 << 20 } else { 65536 });
        for _ in 0..(next() % 8) {
            let at = (next() as usize) % reach;
            image[at] = match next() % 3 {
                0 => next() as u8,
                1 => image[at] ^ (1 << (next() % 8)),
                _ => 0,
            };
        }
        let script: Vec<u8> = (0..64 * 8).map(|_| next() as u8).collect();
        let format = Format::from_name(fmt).unwrap();
        open_and_write(&image, format, &script);
    }
    eprintln!("{runs} mutated images written in {:?}", started.elapsed());
}
