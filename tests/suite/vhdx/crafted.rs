//! VHDX images qemu cannot make, crafted from ones it can: a non-empty log
//! (entries written here, CRC and all) and differencing disks.

use super::*;

/// A log entry to write: 4 KiB pages and zero ranges, in order.
pub enum Desc {
    Page(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Builds one log entry (header, descriptors, data sectors, CRC-32C).
pub fn log_entry(seq: u64, tail: u32, guid: &[u8; 16], descs: &[Desc], last: u64) -> Vec<u8> {
    let head_sectors = (64 + 32 * descs.len()).div_ceil(4096);
    let pages = descs.iter().filter(|d| matches!(d, Desc::Page(..))).count();
    let len = (head_sectors + pages) * 4096;
    let mut e = vec![0u8; len];
    e[0..4].copy_from_slice(b"loge");
    put32(&mut e, 8, len as u32);
    put32(&mut e, 12, tail);
    put64(&mut e, 16, seq);
    put32(&mut e, 24, descs.len() as u32);
    e[32..48].copy_from_slice(guid);
    put64(&mut e, 48, last);
    put64(&mut e, 56, last);
    let mut data = head_sectors * 4096;
    for (i, d) in descs.iter().enumerate() {
        let at = 64 + 32 * i as u64;
        match d {
            Desc::Zero(off, n) => {
                e[at as usize..at as usize + 4].copy_from_slice(b"zero");
                put64(&mut e, at + 8, *n);
                put64(&mut e, at + 16, *off);
            }
            Desc::Page(off, page) => {
                assert_eq!(page.len(), 4096);
                e[at as usize..at as usize + 4].copy_from_slice(b"desc");
                e[at as usize + 4..at as usize + 8].copy_from_slice(&page[4092..]);
                e[at as usize + 8..at as usize + 16].copy_from_slice(&page[..8]);
                put64(&mut e, at + 16, *off);
                let sec = &mut e[data..data + 4096];
                sec[0..4].copy_from_slice(b"data");
                sec[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                sec[8..4092].copy_from_slice(&page[8..4092]);
                sec[4092..].copy_from_slice(&(seq as u32).to_le_bytes());
                data += 4096;
            }
        }
        put64(&mut e, at + 24, seq);
    }
    fix_crc(&mut e, 0, len);
    e
}

const LOG_GUID: [u8; 16] = *b"vdiskfs-log-guid";

/// Writes `entries` (offset in the log, bytes) into the log of `b` and, if
/// `arm`, sets the current header's log GUID so that they count.
pub fn install_log(b: &mut [u8], entries: &[(u64, Vec<u8>)], arm: bool) {
    let h = current_header(b);
    let log = le64(b, h + 72);
    let log_len = u64::from(le32(b, h + 68));
    for (at, e) in entries {
        assert!(at + e.len() as u64 <= log_len);
        let start = (log + at) as usize;
        b[start..start + e.len()].copy_from_slice(e);
    }
    if arm {
        b[h as usize + 48..h as usize + 64].copy_from_slice(&LOG_GUID);
        fix_crc(b, h, 4096);
    }
}

/// Host offset of payload block `i` (1 MiB blocks, so BAT index = block).
fn block_host(b: &[u8], i: u64) -> u64 {
    (le64(b, bat_offset(b) + 8 * i) >> 20) << 20
}

/// The whole of `c`, read in 1 MiB pieces, equals what qemu-img reads from
/// `qemu_image` (`img` names the image in a failure).
fn reads_as_qemu_reads(c: &Chain, qemu_image: &Path, img: &Path) {
    assert_same(
        &read_all(c, 1 << 20).unwrap(),
        &qemu_raw(qemu_image, None),
        img,
        0,
    );
}

/// A 4 MiB VHDX of 1 MiB blocks with block 0 written: its path, its bytes
/// and block 0's host offset.
fn one_block_image(dir: &Path, name: &str) -> (PathBuf, Vec<u8>, u64) {
    let base = created(dir, name, "4M", "block_size=1M", &["write -P 5 0 1M"]);
    let orig = std::fs::read(&base).unwrap();
    let b0 = block_host(&orig, 0);
    (base, orig, b0)
}

fn page(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect()
}

#[test]
fn log_replay_overlays_pages_bat_entries_and_zeros() {
    let dir = scratch();
    let base = created(
        dir.path(),
        "log.vhdx",
        "8M",
        "block_size=1M",
        &["write -P 0x61 0 1M", "write -P 0x62 1M 1M"],
    );
    let mut expected = qemu_raw(&base, None);
    let orig = std::fs::read(&base).unwrap();
    let end = orig.len() as u64;
    let (b0, b1) = (block_host(&orig, 0), block_host(&orig, 1));
    // The new BAT page makes block 3 FULLY_PRESENT at block 1's host offset.
    let bat = bat_offset(&orig);
    let mut bat_page = orig[bat as usize..bat as usize + 4096].to_vec();
    put64(&mut bat_page, 3 * 8, b1 | 6);
    let active = log_entry(
        10,
        0,
        &LOG_GUID,
        &[
            Desc::Page(b0 + 4096, page(1)),
            Desc::Page(bat, bat_page),
            Desc::Zero(b1 + (64 << 10), 8192),
        ],
        end,
    );
    // The second entry of the sequence rewrites a page the first wrote.
    let second = log_entry(11, 0, &LOG_GUID, &[Desc::Page(b0 + 4096, page(2))], end);
    // An older sequence elsewhere in the log, and a newer entry whose CRC
    // is wrong: neither may be replayed.
    let stale = log_entry(3, 64 << 10, &LOG_GUID, &[Desc::Page(b0, page(3))], end);
    let mut broken = log_entry(20, 128 << 10, &LOG_GUID, &[Desc::Page(b0, page(4))], end);
    broken[100] ^= 1;
    let at2 = active.len() as u64;
    let entries = [
        (0, active),
        (at2, second),
        (64 << 10, stale),
        (128 << 10, broken),
    ];
    // The hand oracle.
    expected[4096..8192].copy_from_slice(&page(2));
    let z = (MIB + (64 << 10)) as usize;
    expected[z..z + 8192].fill(0);
    let block1 = expected[MIB as usize..2 * MIB as usize].to_vec();
    expected[3 * MIB as usize..4 * MIB as usize].copy_from_slice(&block1);

    let img = patched(&base, dir.path(), "dirty.vhdx", |b| {
        install_log(b, &entries, true)
    });
    let before = std::fs::read(&img).unwrap();
    let c = open_chain(&img).unwrap();
    assert_same(&read_all(&c, 1 << 20).unwrap(), &expected, &img, 1 << 20);
    assert_same(&read_all(&c, 4096 + 512).unwrap(), &expected, &img, 4608);
    let info = vdiskfs::info::gather(&c).unwrap();
    assert!(
        info.features
            .iter()
            .any(|f| f.contains("2 entries, head sequence 11")),
        "{:?}",
        info.features
    );
    drop(c);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "read-only open wrote"
    );

    // qemu replays the log in place when it opens the image writable: a
    // second oracle.
    let q = dir.path().join("qemu-replayed.vhdx");
    std::fs::copy(&img, &q).unwrap();
    qemu_io("vhdx", &q, &["read 0 512"]);
    assert_same(&qemu_raw(&q, None), &expected, &q, 0);

    // The same entries with the header's log GUID left zero are not a log.
    let unarmed = patched(&base, dir.path(), "unarmed.vhdx", |b| {
        install_log(b, &entries, false)
    });
    let c = open_chain(&unarmed).unwrap();
    reads_as_qemu_reads(&c, &base, &unarmed);
}

#[test]
fn log_entries_of_another_log_guid_are_ignored() {
    let dir = scratch();
    let (base, orig, b0) = one_block_image(dir.path(), "g.vhdx");
    let e = log_entry(
        7,
        0,
        b"another-log-guid",
        &[Desc::Page(b0, page(9))],
        orig.len() as u64,
    );
    let img = patched(&base, dir.path(), "other.vhdx", |b| {
        install_log(b, &[(0, e)], true)
    });
    let c = open_chain(&img).unwrap();
    reads_as_qemu_reads(&c, &base, &img);
    // Read as qemu reads it (nothing to replay), and said so.
    reads_as_qemu_reads(&c, &img, &img);
    let info = vdiskfs::info::gather(&c).unwrap();
    assert!(
        info.features
            .iter()
            .any(|f| f.contains("no valid log sequence")),
        "{:?}",
        info.features
    );
}

#[test]
fn a_log_from_a_longer_file_is_refused() {
    let dir = scratch();
    let (base, orig, b0) = one_block_image(dir.path(), "t.vhdx");
    // Written when the file was 1 MiB longer than it is now.
    let e = log_entry(
        7,
        0,
        &LOG_GUID,
        &[Desc::Page(b0, page(9))],
        orig.len() as u64 + MIB,
    );
    let img = patched(&base, dir.path(), "cut.vhdx", |b| {
        install_log(b, &[(0, e)], true)
    });
    let err = open_err(&img);
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert_one_line(&err, &img, "truncated");
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// The textual form of an on-disk GUID.
fn guid_text(g: &[u8]) -> String {
    format!(
        "{{{:08X}-{:04X}-{:04X}-{}-{}}}",
        le32(g, 0),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8..10]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>(),
        g[10..16]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    )
}

/// A parent locator item with these key/value pairs.
fn locator(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + 12 * pairs.len()];
    // B04AEFB7-D19E-4A81-B789-25B8E9445913
    b[..16].copy_from_slice(&[
        0xb7, 0xef, 0x4a, 0xb0, 0x9e, 0xd1, 0x81, 0x4a, 0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59,
        0x13,
    ]);
    b[18..20].copy_from_slice(&(pairs.len() as u16).to_le_bytes());
    for (i, (k, v)) in pairs.iter().enumerate() {
        let e = 20 + 12 * i as u64;
        let (k, v) = (utf16(k), utf16(v));
        let at = b.len() as u32;
        put32(&mut b, e, at);
        b[e as usize + 8..e as usize + 10].copy_from_slice(&(k.len() as u16).to_le_bytes());
        b.extend(&k);
        let at = b.len() as u32;
        put32(&mut b, e + 4, at);
        b[e as usize + 10..e as usize + 12].copy_from_slice(&(v.len() as u16).to_le_bytes());
        b.extend(&v);
    }
    b
}

/// Byte ranges of block 1 the child stores (the rest come from the
/// parent), whole 4 KiB sectors so that both sector sizes can express them.
const CHILD_RANGES: [std::ops::Range<u64>; 3] = [0..8192, 409600..614400, 1044480..1048576];

/// Turns qemu's dynamic VHDX `b` (8 MiB, 1 MiB blocks, blocks 0 and 1
/// written) into a differencing disk naming `linkage`, with `sector`-byte
/// logical sectors.
fn make_child(b: &mut Vec<u8>, linkage: &str, sector: u64) {
    make_child_of(b, linkage, sector, ".\\parent.vhdx")
}

/// [`make_child`] with the parent's relative path given.
fn make_child_of(b: &mut Vec<u8>, linkage: &str, sector: u64, rel: &str) {
    let lss = metadata_item(b, 0x8141_bf1d);
    put32(b, lss, sector as u32);
    let fp = metadata_item(b, 0xcaa1_6737);
    let flags = le32(b, fp + 4);
    put32(b, fp + 4, flags | 2);
    let m = metadata_offset(b);
    let n = u64::from(u16::from_le_bytes([b[m as usize + 10], b[m as usize + 11]]));
    let item = locator(&[
        ("parent_linkage", linkage),
        ("relative_path", rel),
        ("absolute_win32_path", "C:\\elsewhere\\parent.vhdx"),
    ]);
    let item_at = 512 << 10;
    b[(m + item_at) as usize..(m + item_at) as usize + item.len()].copy_from_slice(&item);
    let e = m + 32 + 32 * n;
    // A8D35F2D-B30B-454D-ABF7-D3D84834AB0C
    b[e as usize..e as usize + 16].copy_from_slice(&[
        0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab,
        0x0c,
    ]);
    put32(b, e + 16, item_at as u32);
    put32(b, e + 20, item.len() as u32);
    put32(b, e + 24, 4 | 2);
    b[m as usize + 10..m as usize + 12].copy_from_slice(&(n as u16 + 1).to_le_bytes());
    // The sector bitmap of chunk 0, appended at the next MiB.
    let bitmap = (b.len() as u64).next_multiple_of(MIB);
    b.resize((bitmap + MIB) as usize, 0);
    // Chunk ratio 2^23 * sector / 1 MiB; block 1's bits follow block 0's.
    let chunk_ratio = (1 << 23) * sector / MIB;
    let first_bit = MIB / sector;
    for r in CHILD_RANGES {
        for sct in r.start / sector..r.end / sector {
            let bit = first_bit + sct;
            b[(bitmap + bit / 8) as usize] |= 1 << (bit % 8);
        }
    }
    let bat = bat_offset(b);
    put64(b, bat + 8 * chunk_ratio, bitmap | 6);
    let b1 = le64(b, bat + 8);
    put64(b, bat + 8, (b1 & !7) | 7);
    // qemu leaves unwritten blocks ZERO (block_state_zero=on): make them absent.
    for (block, state) in [(2, 0), (3, 2), (4, 1), (5, 3), (6, 0), (7, 0)] {
        put64(b, bat + 8 * block, state);
    }
}

#[test]
fn differencing_disk_reads_through_its_parent() {
    let dir = scratch();
    let parent = created(
        dir.path(),
        "parent.vhdx",
        "8M",
        "block_size=1M",
        &["write -P 0x70 0 8M"],
    );
    let base = created(
        dir.path(),
        "base.vhdx",
        "8M",
        "block_size=1M",
        &["write -P 0x81 0 1M", "write -P 0x82 1M 1M"],
    );
    let pb = std::fs::read(&parent).unwrap();
    let h = current_header(&pb);
    let linkage = guid_text(&pb[h as usize + 32..h as usize + 48]);
    let child_own = qemu_raw(&base, None);
    let mut expected = qemu_raw(&parent, None);
    let mb = MIB as usize;
    expected[..mb].copy_from_slice(&child_own[..mb]);
    for r in CHILD_RANGES {
        let (a, z) = (mb + r.start as usize, mb + r.end as usize);
        expected[a..z].copy_from_slice(&child_own[a..z]);
    }
    // ZERO, UNDEFINED and UNMAPPED blocks read as zeros, hiding the parent.
    expected[3 * mb..6 * mb].fill(0);

    // 4096-byte sectors: the same data, a bitmap bit per 4 KiB and another chunk ratio.
    let child4k = patched(&base, dir.path(), "child4k.avhdx", |b| {
        make_child(b, &linkage, 4096)
    });
    let c = open_chain(&child4k).unwrap_or_else(|e| panic!("{e}"));
    assert_same(
        &read_all(&c, 4096 + 512).unwrap(),
        &expected,
        &child4k,
        4608,
    );
    let child = patched(&base, dir.path(), "child.avhdx", |b| {
        make_child(b, &linkage, 512)
    });
    let c = open_chain(&child).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.layers().len(), 2);
    // In place, refused with the hint (its sector bitmaps are not written).
    let rw = vdiskfs::chain::ChainOptions {
        writable: true,
        ..Default::default()
    };
    let before = std::fs::read(&child).unwrap();
    match vdiskfs::chain::Chain::open(&child, &rw, &vdiskfs::cache::Caches::new(1 << 20)) {
        Ok(_) => panic!("a differencing VHDX was opened writable"),
        Err(e) => assert!(e.to_string().contains("--overlay"), "{e}"),
    }
    assert!(
        std::fs::read(&child).unwrap() == before,
        "the refusal wrote"
    );
    for piece in [1 << 20, 4096 + 512, 777] {
        assert_same(&read_all(&c, piece).unwrap(), &expected, &child, piece);
    }
    let info = vdiskfs::info::gather(&c).unwrap();
    assert_eq!(
        info.chain[0].layer.subformat.as_deref(),
        Some("differencing")
    );
    assert_eq!(
        info.chain[0].backing_filename.as_deref(),
        Some("parent.vhdx")
    );

    // A qcow2 overlay over the differencing disk.
    let top = dir.path().join("top.qcow2");
    qemu_img_line(&format!(
        "create -u -f qcow2 -b child.avhdx -F vhdx {} 8M",
        s(&top)
    ));
    let c = open_chain(&top).unwrap();
    assert_eq!(c.layers().len(), 3);
    assert_same(&read_all(&c, 1 << 20).unwrap(), &expected, &top, 0);

    // Another DataWriteGuid: refused, unless --ignore-cid.
    let wrong = "{01234567-89AB-CDEF-0123-456789ABCDEF}";
    let stranger = patched(&base, dir.path(), "stranger.avhdx", |b| {
        make_child(b, wrong, 512)
    });
    let e = open_err(&stranger);
    assert_eq!(e.kind(), ErrorKind::CidMismatch, "{e}");
    assert_one_line(&e, &stranger, "DataWriteGuid");
    let opts = ChainOptions {
        ignore_cid: true,
        ..Default::default()
    };
    let c = Chain::open(&stranger, &opts, &Caches::new(16 << 20)).unwrap();
    assert_same(&read_all(&c, 1 << 20).unwrap(), &expected, &stranger, 0);

    // A child naming itself is a loop.
    let selfish = patched(&base, dir.path(), "selfish.avhdx", |b| {
        make_child_of(b, &linkage, 512, "selfish.avhdx")
    });
    assert_eq!(open_err(&selfish).kind(), ErrorKind::ChainLoop);

    // A sector bitmap entry that is not present fails the partially
    // present block only.
    let nobitmap = patched(&base, dir.path(), "nobitmap.avhdx", |b| {
        make_child(b, &linkage, 512);
        let bat = bat_offset(b);
        put64(b, bat + 8 * 4096, 0);
    });
    let c = open_chain(&nobitmap).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read_at(&mut buf, MIB + 8192).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    for at in [0, 2 * MIB, 7 * MIB] {
        c.read_at(&mut buf, at).unwrap();
        assert!(buf[..] == expected[at as usize..at as usize + 4096]);
    }

    // A missing parent is a clean error naming it.
    std::fs::rename(&parent, dir.path().join("moved.vhdx")).unwrap();
    let e = open_err(&child);
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_one_line(&e, &child, "parent.vhdx");
}
