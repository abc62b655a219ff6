//! Parallels images: byte-exact against `qemu-img convert -O raw` on images
//! qemu-img makes (several cluster sizes, random qemu-io writes), the old
//! `WithoutFreeSpace` header (BAT in sectors), a qcow2 overlay over a
//! Parallels image, `info`, the `--rw` refusal, a FUSE mount, the
//! DiskDescriptor.xml refusal, and damaged images.

use crate::common;
use common::qemu_img_line;

use std::path::{Path, PathBuf};

use common::damage::{assert_fails_only_at, mutations_never_panic, patch, Damages, Refusal};
use common::fuse::{assert_fuse_read_matches_qemu, info_json, Mounted};
use common::{assert_matches_qemu, qemu_io, qemu_raw, read_all, rng::Rng, scratch};
use vdiskfs::format::Format;
use vdiskfs::ErrorKind;

const MIB: u64 = 1 << 20;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// A Parallels image of `size` bytes, `cluster` bytes per cluster, with
/// `writes` random pattern writes by qemu-io.
fn hds(dir: &Path, name: &str, size: u64, cluster: &str, writes: usize, seed: u64) -> PathBuf {
    let p = dir.join(name);
    let o = format!("cluster_size={cluster}");
    let s = size.to_string();
    qemu_img_line(&format!(
        "create -f parallels -o {} {} {}",
        &o,
        p.to_str().unwrap(),
        &s
    ));
    let mut rng = Rng::new(seed);
    let cmds: Vec<String> = (0..writes)
        .map(|_| {
            let len = ((1 + rng.below(300)) * 512).min(size);
            let off = rng.below((size - len) / 512 + 1) * 512;
            format!("write -P {} {off} {len}", 1 + rng.below(250))
        })
        .collect();
    if !cmds.is_empty() {
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io("parallels", &p, &refs);
    }
    p
}

/// Rewrites a qemu-made `WithouFreSpacExt` image into the old
/// `WithoutFreeSpace` header: BAT entries from clusters to sectors.
fn to_old_magic(p: &Path) {
    let b = std::fs::read(p).unwrap();
    let tracks = le32(&b, 28);
    let entries = le32(&b, 32) as usize;
    patch(p, 0, b"WithoutFreeSpace");
    for i in 0..entries {
        let e = le32(&b, 64 + 4 * i);
        patch(p, 64 + 4 * i as u64, &(e * tracks).to_le_bytes());
    }
}

#[test]
fn parallels_images_match_qemu() {
    let d = scratch();
    for (i, (size, cluster, writes)) in [
        (3 * MIB, "1M", 0),
        (3 * MIB, "1M", 40),
        (5 * MIB + 4096, "64k", 80),
        (4 * MIB, "4k", 60),
        (9 * MIB, "256k", 120),
        (2 * MIB, "2M", 10),
    ]
    .into_iter()
    .enumerate()
    {
        let p = hds(
            d.path(),
            &format!("m{i}.hds"),
            size,
            cluster,
            writes,
            i as u64 + 5,
        );
        assert_matches_qemu(&p);
        let ext = common::open_chain(&p).unwrap().layers()[0].info();
        assert_eq!(ext.subformat.as_deref(), Some("WithouFreSpacExt"));
        // The same image with the old header reads the same bytes.
        let expected = qemu_raw(&p, None);
        to_old_magic(&p);
        let chain = common::open_chain(&p).unwrap();
        assert_eq!(
            chain.layers()[0].info().subformat.as_deref(),
            Some("WithoutFreeSpace")
        );
        assert!(
            read_all(&chain, 100_000).unwrap() == expected,
            "old magic {i}"
        );
        assert_matches_qemu(&p);
    }
}

#[test]
fn qcow2_overlay_over_parallels() {
    let d = scratch();
    let base = hds(d.path(), "base.hds", 6 * MIB, "64k", 60, 3);
    common::assert_qcow2_overlay_over(
        &base,
        "parallels",
        &["write -P 0x66 100k 700k", "write -z 2M 1M"],
    );
}

#[test]
fn parallels_info_rw_refusal_and_fuse_mount() {
    let d = scratch();
    let p = hds(d.path(), "f.hds", 4 * MIB, "64k", 40, 9);
    // Marked in use (not closed cleanly): still read, reported as dirty.
    patch(&p, 44, &0x746f_6e59u32.to_le_bytes());
    let (v, text) = info_json(&p);
    assert_eq!(v["format"], "parallels");
    assert_eq!(v["virtual_size"], 4 * MIB);
    for key in ["\"dirty\"", "\"cluster_sectors\":128", "\"bat_entries\":64"] {
        assert!(text.contains(key), "info lacks {key}: {text}");
    }
    let err = Mounted::try_new(&[&p], &["--rw"])
        .err()
        .expect("--rw must be refused");
    assert!(err.contains("--overlay"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_fuse_read_matches_qemu(&p);
}

/// One storage of a descriptor: start and end sector, type, file.
type StorageRow<'a> = (u64, u64, &'a str, &'a str);

/// A DiskDescriptor.xml over `storages` (start, end in sectors, type, file).
fn descriptor(dir: &Path, sectors: u64, storages: &[StorageRow], snapshots: &str) -> PathBuf {
    let mut xml = format!(
        "<?xml version='1.0' encoding='UTF-8'?>\n<Parallels_disk_image Version=\"1.0\">\n  \
         <Disk_Parameters>\n    <Disk_size>{sectors}</Disk_size>\n    <Cylinders>16</Cylinders>\n    \
         <Heads>16</Heads>\n    <Sectors>63</Sectors>\n  </Disk_Parameters>\n  <StorageData>\n"
    );
    for (i, (start, end, kind, file)) in storages.iter().enumerate() {
        xml += &format!(
            "    <Storage>\n      <Start>{start}</Start>\n      <End>{end}</End>\n      <Blocksize>2048</Blocksize>\n      \
             <Image>\n        <GUID>{{5fbaabe3-6958-40ff-92a7-860e329aab4{i}}}</GUID>\n        <Type>{kind}</Type>\n        \
             <File>{file}</File>\n      </Image>\n    </Storage>\n"
        );
    }
    xml += "  </StorageData>\n";
    xml += snapshots;
    xml += "</Parallels_disk_image>\n";
    let p = dir.join("DiskDescriptor.xml");
    std::fs::write(&p, xml).unwrap();
    p
}

#[test]
fn split_bundle_reads_every_storage() {
    let d = scratch();
    let a = hds(d.path(), "harddisk.hdd.0.hds", 2 * MIB, "1M", 30, 21);
    let b = d.path().join("harddisk.hdd.1.raw");
    std::fs::write(&b, Rng::new(3).bytes(MIB as usize)).unwrap();
    let c = hds(d.path(), "harddisk.hdd.2.hds", 3 * MIB, "64k", 30, 22);
    let mut expected = qemu_raw(&a, None);
    expected.extend(std::fs::read(&b).unwrap());
    expected.extend(qemu_raw(&c, None));
    let shot = "  <Snapshots>\n    <Shot>\n      <GUID>{5fbaabe3-6958-40ff-92a7-860e329aab40}</GUID>\n      \
                <ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>\n    </Shot>\n  </Snapshots>\n";
    let xml = descriptor(
        d.path(),
        12288,
        &[
            (0, 4096, "Compressed", "harddisk.hdd.0.hds"),
            (4096, 6144, "Plain", "harddisk.hdd.1.raw"),
            (6144, 12288, "Compressed", "harddisk.hdd.2.hds"),
        ],
        shot,
    );
    let chain = common::open_chain(&xml).unwrap();
    assert_eq!(chain.size(), 6 * MIB);
    for piece in [MIB as usize, 100_000, 4096 + 512] {
        assert!(
            read_all(&chain, piece).unwrap() == expected,
            "bundle read in {piece}"
        );
    }
    let info = chain.layers()[0].info();
    assert_eq!(info.subformat.as_deref(), Some("DiskDescriptor.xml"));
    let m = Mounted::new(&[&xml], &[]);
    let name = vdiskfs::cli::exposed_name(&xml).unwrap();
    assert!(std::fs::read(m.file(name.to_str().unwrap())).unwrap() == expected);
    m.unmount();
    // Refusals: snapshots, a missing file, a gap between storages.
    let two = "  <Snapshots>\n    <Shot><GUID>{a}</GUID><ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID></Shot>\n    \
               <Shot><GUID>{b}</GUID><ParentGUID>{a}</ParentGUID></Shot>\n  </Snapshots>\n";
    let cases: Vec<(Vec<StorageRow>, &str, ErrorKind, &str)> = vec![
        (
            vec![(0, 4096, "Compressed", "harddisk.hdd.0.hds")],
            two,
            ErrorKind::Unsupported,
            "snapshots",
        ),
        (
            vec![(0, 4096, "Compressed", "gone.hds")],
            "",
            ErrorKind::NotFound,
            "gone.hds",
        ),
        (
            vec![
                (0, 2048, "Plain", "harddisk.hdd.1.raw"),
                (4096, 8192, "Compressed", "harddisk.hdd.0.hds"),
            ],
            "",
            ErrorKind::Corrupt,
            "does not continue",
        ),
        (
            vec![(0, 4096, "Plain", "harddisk.hdd.1.raw")],
            "",
            ErrorKind::Corrupt,
            "holds",
        ),
    ];
    for (storages, snaps, kind, words) in cases {
        let end = storages.last().unwrap().1;
        let xml = descriptor(d.path(), end, &storages, snaps);
        let e = common::open_chain(&xml).err().expect("refused");
        assert_eq!(e.kind(), kind, "{e}");
        let msg = e.to_string();
        assert!(msg.contains(words) && !msg.contains('\n'), "{msg}");
    }
    std::fs::write(&xml, "<?xml version='1.0'?>\n<Parallels_disk_image><oops").unwrap();
    let e = common::open_chain(&xml).err().expect("refused");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

#[test]
fn damaged_parallels_is_refused_or_fails_only_the_damaged_cluster() {
    let d = scratch();
    let base = hds(d.path(), "base.hds", 4 * MIB, "1M", 0, 1);
    qemu_io("parallels", &base, &["write -P 0x44 0 4M"]);
    use ErrorKind::{Corrupt, Unsupported};
    let cases = Damages {
        base: &base,
        dir: d.path(),
        format: Some(Format::Parallels),
    };
    cases.cut("trunc.hds", 40, Corrupt, "truncated");
    // Version 3 is not detected as Parallels; forced, it is refused.
    cases.refused_on_open("v3.hds", 16, &3u32.to_le_bytes(), Unsupported, "version 3");
    #[rustfmt::skip]
    let rows: [Refusal; 2] = [
        ("tracks0.hds", 28, &0u32.to_le_bytes(), Corrupt, "cluster size"),
        ("hugebat.hds", 32, &0xffff_fff0u32.to_le_bytes(), Corrupt, "BAT"),
    ];
    cases.refused(&rows);
    let dmg = |name: &str, at: u64, bytes: &[u8]| cases.patched(name, at, bytes);
    // A huge disk size over a small BAT opens: clusters past the BAT are zeros.
    let p = dmg("hugesize.hds", 36, &(1u64 << 40).to_le_bytes());
    let chain = common::open_chain(&p).unwrap();
    let mut buf = vec![1u8; 4096];
    chain.read_at(&mut buf, 1 << 38).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // A BAT entry past the end of the file: EIO on that cluster only.
    let p = dmg("past.hds", 64 + 2 * 4, &0x00ff_ffffu32.to_le_bytes());
    let chain = common::open_chain(&p).unwrap();
    assert_fails_only_at(&chain, 2 * MIB + 4096, &[MIB, 3 * MIB], 0x44);
    // A zeroed BAT entry: that cluster is no longer allocated, reads zeros.
    let p = dmg("zeroed.hds", 64 + 4, &0u32.to_le_bytes());
    let chain = common::open_chain(&p).unwrap();
    chain.read_at(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "a zero entry reads as zeros");
}

#[test]
fn random_header_and_bat_mutations_never_panic() {
    let d = scratch();
    let p = hds(d.path(), "seed.hds", 2 * MIB, "64k", 20, 4);
    let seed = std::fs::read(&p).unwrap();
    mutations_never_panic(&seed, 64 + 32 * 4, 78, Format::Parallels);
}
