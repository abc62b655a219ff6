//! Partition tables (MBR with extended/logical partitions, GPT), so each
//! partition of a disk can be exposed as a file of its own
//! (`disk-p1.raw`, …): `mount -o loop disk-p1.raw /mnt` then works even
//! where the kernel cannot scan partitions of a loop device.
//!
//! Everything here treats the table as hostile: every offset and length is
//! checked against the disk size with checked arithmetic, the number of GPT
//! entries and logical MBR partitions is bounded, EBR chains cannot loop,
//! and a partition that does not lie wholly inside the disk is skipped with
//! a warning. GPT CRC mismatches are reported as warnings (the table is
//! still used, as `fdisk` would show it).
//!
//! Numbering follows Linux: MBR primaries are 1–4 by slot, logical
//! partitions count from 5 in chain order; GPT partitions are their entry
//! index + 1.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::sync::Arc;

use log::warn;

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::fs::Disk;

/// Most logical partitions followed in an MBR extended partition.
pub const MAX_LOGICAL: usize = 128;
/// Most GPT partition entries accepted.
pub const MAX_GPT_ENTRIES: u32 = 1024;
/// Largest GPT entry array accepted, in bytes.
const MAX_GPT_ARRAY: u64 = 1 << 20;

/// The kind of partition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// DOS/MBR.
    Mbr,
    /// GUID partition table.
    Gpt,
}

impl Scheme {
    /// `mbr` or `gpt`.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Mbr => "mbr",
            Scheme::Gpt => "gpt",
        }
    }
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Linux's partition number (`sda1` → 1).
    pub number: u32,
    /// Byte offset of the partition on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// MBR type byte (`0x83`) or GPT type GUID.
    pub type_id: String,
    /// GPT partition name (empty for MBR).
    pub name: String,
    /// GPT unique partition GUID (empty for MBR).
    pub uuid: String,
}

/// A parsed partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// MBR or GPT.
    pub scheme: Scheme,
    /// The usable partitions, in number order.
    pub partitions: Vec<Partition>,
    /// Problems found (bad CRCs, partitions outside the disk, EBR loops…).
    pub warnings: Vec<String>,
}

/// Reads `buf.len()` bytes at a disk offset.
pub type ReadAt<'a> = &'a dyn Fn(&mut [u8], u64) -> Result<()>;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn read_sector(read: ReadAt<'_>, size: u64, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => {
            let mut b = vec![0u8; len];
            read(&mut b, offset)?;
            Ok(Some(b))
        }
        _ => Ok(None),
    }
}

/// One 16-byte MBR entry.
#[derive(Debug, Clone, Copy)]
struct MbrEntry {
    status: u8,
    kind: u8,
    lba: u32,
    sectors: u32,
}

fn mbr_entries(sector: &[u8]) -> [MbrEntry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        MbrEntry {
            status: e[0],
            kind: e[4],
            lba: le32(e, 8),
            sectors: le32(e, 12),
        }
    })
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

/// Reads the partition table of a disk of `size` bytes, or `None` when the
/// disk has none.
pub fn read_table(read: ReadAt<'_>, size: u64) -> Result<Option<Table>> {
    let Some(mbr) = read_sector(read, size, 0, 512)? else {
        return Ok(None);
    };
    if le16(&mbr, 510) != 0xaa55 {
        return Ok(None);
    }
    let entries = mbr_entries(&mbr);
    // A filesystem boot sector (FAT, NTFS) also ends in 55 AA; a partition
    // table has only 0x00 or 0x80 as status bytes.
    if entries.iter().any(|e| e.status != 0 && e.status != 0x80) {
        return Ok(None);
    }
    if entries.iter().any(|e| e.kind == 0xee) {
        let mut warnings = Vec::new();
        for sector_size in [512u64, 4096] {
            match read_gpt(read, size, sector_size)? {
                Ok(t) => return Ok(Some(t)),
                Err(w) => warnings.push(w),
            }
        }
        warnings.dedup();
        return Ok(Some(Table {
            scheme: Scheme::Gpt,
            partitions: Vec::new(),
            warnings: std::iter::once("protective MBR but no usable GPT header".to_string())
                .chain(warnings)
                .collect(),
        }));
    }
    Ok(Some(read_mbr(read, size, &entries)?))
}

fn push_checked(
    parts: &mut Vec<Partition>,
    warnings: &mut Vec<String>,
    size: u64,
    p: Partition,
    sector_lo: u64,
    sector_count: u64,
    unit: u64,
) {
    let place = sector_lo
        .checked_mul(unit)
        .zip(sector_count.checked_mul(unit))
        .and_then(|(o, l)| o.checked_add(l).map(|e| (o, l, e)));
    match place {
        Some((offset, length, end)) if end <= size && length > 0 => parts.push(Partition {
            offset,
            length,
            ..p
        }),
        _ => warnings.push(format!(
            "partition {} (sectors {sector_lo}+{sector_count}) does not lie inside the disk \
             ({size} bytes): skipped",
            p.number
        )),
    }
}

fn read_mbr(read: ReadAt<'_>, size: u64, entries: &[MbrEntry; 4]) -> Result<Table> {
    let mut parts = Vec::new();
    let mut warnings = Vec::new();
    let mut next_logical = 5u32;
    let blank = |number: u32, kind: u8| Partition {
        number,
        offset: 0,
        length: 0,
        type_id: format!("0x{kind:02x}"),
        name: String::new(),
        uuid: String::new(),
    };
    for (i, e) in entries.iter().enumerate() {
        if e.kind == 0 || e.sectors == 0 {
            continue;
        }
        if !is_extended(e.kind) {
            let p = blank(i as u32 + 1, e.kind);
            push_checked(
                &mut parts,
                &mut warnings,
                size,
                p,
                e.lba.into(),
                e.sectors.into(),
                512,
            );
            continue;
        }
        // The extended partition: a chain of EBRs, each holding one logical
        // partition (relative to the EBR) and a link to the next EBR
        // (relative to the extended partition's start).
        let ext_start = u64::from(e.lba);
        let ext_end = ext_start + u64::from(e.sectors);
        let mut ebr = ext_start;
        let mut seen = HashSet::new();
        let mut count = 0usize;
        loop {
            if ebr < ext_start || ebr >= ext_end {
                warnings.push(format!(
                    "EBR at sector {ebr} lies outside the extended partition"
                ));
                break;
            }
            if !seen.insert(ebr) {
                warnings.push(format!("EBR chain loops back to sector {ebr}"));
                break;
            }
            if count >= MAX_LOGICAL {
                warnings.push(format!(
                    "more than {MAX_LOGICAL} logical partitions: rest ignored"
                ));
                break;
            }
            let Some(sector) = read_sector(read, size, ebr * 512, 512)? else {
                warnings.push(format!("EBR at sector {ebr} lies past the end of the disk"));
                break;
            };
            if le16(&sector, 510) != 0xaa55 {
                warnings.push(format!("EBR at sector {ebr} has no 55AA signature"));
                break;
            }
            let [data, link, ..] = mbr_entries(&sector);
            if data.kind != 0 && data.sectors != 0 {
                let start = ebr + u64::from(data.lba);
                let p = blank(next_logical, data.kind);
                if start + u64::from(data.sectors) > ext_end {
                    warnings.push(format!(
                        "logical partition {next_logical} extends past its extended partition"
                    ));
                }
                push_checked(
                    &mut parts,
                    &mut warnings,
                    size,
                    p,
                    start,
                    data.sectors.into(),
                    512,
                );
                next_logical += 1;
                count += 1;
            }
            if !is_extended(link.kind) || link.sectors == 0 {
                break;
            }
            ebr = ext_start + u64::from(link.lba);
        }
    }
    Ok(Table {
        scheme: Scheme::Mbr,
        partitions: parts,
        warnings,
    })
}

/// Formats a GPT GUID (first three fields little-endian).
fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        le32(b, 0),
        le16(b, 4),
        le16(b, 6),
        b[8],
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02X}"))
            .collect::<String>()
    )
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(data);
    c.sum()
}

/// The GPT at `sector_size`, `Err(why)` when there is no usable header.
fn read_gpt(read: ReadAt<'_>, size: u64, ss: u64) -> Result<std::result::Result<Table, String>> {
    let Some(h) = read_sector(read, size, ss, ss as usize)? else {
        return Ok(Err("disk too small for a GPT header".into()));
    };
    if &h[0..8] != b"EFI PART" {
        return Ok(Err(format!("no GPT signature at byte {ss}")));
    }
    let mut warnings = Vec::new();
    let hsize = le32(&h, 12) as usize;
    if !(92..=ss as usize).contains(&hsize) {
        return Ok(Err(format!("GPT header size {hsize} is invalid")));
    }
    let mut copy = h[..hsize].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != le32(&h, 16) {
        warnings.push("GPT header CRC mismatch".to_string());
    }
    let first_usable = le64(&h, 40);
    let last_usable = le64(&h, 48);
    let array_lba = le64(&h, 72);
    let count = le32(&h, 80);
    let esize = le32(&h, 84);
    if count > MAX_GPT_ENTRIES {
        return Ok(Err(format!(
            "GPT has {count} entries (more than {MAX_GPT_ENTRIES})"
        )));
    }
    if !(128..=4096).contains(&esize) || !esize.is_power_of_two() {
        return Ok(Err(format!("GPT entry size {esize} is invalid")));
    }
    let array_len = u64::from(count) * u64::from(esize);
    if array_len > MAX_GPT_ARRAY {
        return Ok(Err(format!(
            "GPT entry array of {array_len} bytes is too large"
        )));
    }
    let Some(array) = array_lba
        .checked_mul(ss)
        .map(|off| read_sector(read, size, off, array_len as usize))
        .transpose()?
        .flatten()
    else {
        return Ok(Err(format!(
            "GPT entry array at LBA {array_lba} lies outside the disk"
        )));
    };
    if crc32(&array) != le32(&h, 88) {
        warnings.push("GPT entry array CRC mismatch".to_string());
    }
    let mut parts = Vec::new();
    for i in 0..count as usize {
        let e = &array[i * esize as usize..(i + 1) * esize as usize];
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let number = i as u32 + 1;
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last < first {
            warnings.push(format!(
                "GPT partition {number} ends before it starts: skipped"
            ));
            continue;
        }
        if first < first_usable || last > last_usable {
            warnings.push(format!(
                "GPT partition {number} lies outside the usable LBA range"
            ));
        }
        let name: Vec<u16> = (0..36)
            .map(|k| le16(e, 56 + 2 * k))
            .take_while(|&c| c != 0)
            .collect();
        let p = Partition {
            number,
            offset: 0,
            length: 0,
            type_id: guid(&e[0..16]),
            name: String::from_utf16_lossy(&name),
            uuid: guid(&e[16..32]),
        };
        push_checked(
            &mut parts,
            &mut warnings,
            size,
            p,
            first,
            last - first + 1,
            ss,
        );
    }
    Ok(Ok(Table {
        scheme: Scheme::Gpt,
        partitions: parts,
        warnings,
    }))
}

/// The partition files of a disk exposed as `name` (`disk.raw` →
/// `disk-p1.raw`, …), each with the disk's attributes plus
/// `user.vdiskfs.partition.*`. Warnings are logged; a disk without a
/// partition table gets none.
pub fn partition_disks(
    name: &OsStr,
    chain: &Arc<Chain>,
    xattrs: &[(String, Vec<u8>)],
) -> Result<Vec<Disk>> {
    let size = chain.size();
    let read = |buf: &mut [u8], off: u64| chain.read_at(buf, off);
    let shown = name.to_string_lossy();
    let Some(table) = read_table(&read, size)? else {
        warn!("{shown}: no MBR or GPT partition table; no partition files");
        return Ok(Vec::new());
    };
    for w in &table.warnings {
        warn!("{shown}: {w}");
    }
    let stem = name
        .to_string_lossy()
        .strip_suffix(".raw")
        .map(str::to_string)
        .unwrap_or_else(|| shown.to_string());
    let mut out = Vec::new();
    for p in &table.partitions {
        let mut x = xattrs.to_vec();
        let mut add = |k: &str, v: String| {
            if !v.is_empty() {
                x.push((format!("user.vdiskfs.partition.{k}"), v.into_bytes()));
            }
        };
        add("scheme", table.scheme.name().into());
        add("number", p.number.to_string());
        add("offset", p.offset.to_string());
        add("length", p.length.to_string());
        add("type", p.type_id.clone());
        add("name", p.name.clone());
        add("uuid", p.uuid.clone());
        let file = OsString::from(format!("{stem}-p{}.raw", p.number));
        out.push(Disk::new(file, chain.clone(), x).with_window(p.offset, p.length));
    }
    Ok(out)
}

/// Refuses two exposed files with the same name (an image called
/// `disk-p1.qcow2` beside the partitions of `disk.qcow2`).
pub fn check_unique_names(disks: &[Disk]) -> Result<()> {
    let mut seen = HashSet::new();
    for d in disks {
        if !seen.insert(&d.name) {
            return Err(Error::invalid(format!(
                "two exposed files would be named {}",
                d.name.to_string_lossy()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn reader(disk: &[u8]) -> impl Fn(&mut [u8], u64) -> Result<()> + '_ {
        move |buf: &mut [u8], off: u64| {
            let o = off as usize;
            buf.copy_from_slice(&disk[o..o + buf.len()]);
            Ok(())
        }
    }

    fn put_entry(sector: &mut [u8], slot: usize, status: u8, kind: u8, lba: u32, sectors: u32) {
        let e = &mut sector[446 + 16 * slot..446 + 16 * (slot + 1)];
        e[0] = status;
        e[4] = kind;
        e[8..12].copy_from_slice(&lba.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
    }

    fn sign(disk: &mut [u8], sector: u64) {
        let o = (sector * 512) as usize;
        disk[o + 510] = 0x55;
        disk[o + 511] = 0xaa;
    }

    fn parse(disk: &[u8]) -> Option<Table> {
        read_table(&reader(disk), disk.len() as u64).unwrap()
    }

    fn places(t: &Table) -> Vec<(u32, u64, u64)> {
        t.partitions
            .iter()
            .map(|p| (p.number, p.offset, p.length))
            .collect()
    }

    #[test]
    fn no_signature_no_table() {
        assert!(parse(&vec![0u8; 4096]).is_none());
        assert!(parse(&[0u8; 100]).is_none());
    }

    #[test]
    fn boot_sector_is_not_a_table() {
        let mut d = vec![0u8; 4096];
        sign(&mut d, 0);
        d[446] = 0x12; // not a status byte
        assert!(parse(&d).is_none());
    }

    #[test]
    fn mbr_primaries_and_logicals_number_like_linux() {
        let mut d = vec![0u8; (8 * MIB) as usize];
        sign(&mut d, 0);
        put_entry(&mut d, 0, 0x80, 0x83, 2048, 2048); // p1: 1 MiB at 1 MiB
        put_entry(&mut d, 2, 0, 0x05, 4096, 8192); // extended, slot 3
                                                   // EBR 1 at 4096: logical at +2048, link to EBR 2 at ext+4096.
        sign(&mut d, 4096);
        let s = &mut d[4096 * 512..4097 * 512];
        put_entry(s, 0, 0, 0x83, 2048, 1024);
        put_entry(s, 1, 0, 0x05, 4096, 4096);
        // EBR 2 at 8192: logical at +1024.
        sign(&mut d, 8192);
        let s = &mut d[8192 * 512..8193 * 512];
        put_entry(s, 0, 0, 0x07, 1024, 2048);
        let t = parse(&d).unwrap();
        assert_eq!(t.scheme, Scheme::Mbr);
        assert_eq!(
            places(&t),
            [
                (1, MIB, MIB),
                (5, (4096 + 2048) * 512, 1024 * 512),
                (6, (8192 + 1024) * 512, 2048 * 512)
            ]
        );
        assert_eq!(t.partitions[0].type_id, "0x83");
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    }

    #[test]
    fn ebr_loops_and_escapes_are_bounded() {
        let mut d = vec![0u8; (8 * MIB) as usize];
        sign(&mut d, 0);
        put_entry(&mut d, 0, 0, 0x0f, 2048, 8192);
        sign(&mut d, 2048);
        let s = &mut d[2048 * 512..2049 * 512];
        put_entry(s, 0, 0, 0x83, 1, 100);
        put_entry(s, 1, 0, 0x05, 0, 10); // links back to itself
        let t = parse(&d).unwrap();
        assert_eq!(places(&t), [(5, 2049 * 512, 100 * 512)]);
        assert!(
            t.warnings.iter().any(|w| w.contains("loops")),
            "{:?}",
            t.warnings
        );
        // Link pointing outside the extended partition.
        put_entry(&mut d[2048 * 512..2049 * 512], 1, 0, 0x05, 1 << 30, 10);
        let t = parse(&d).unwrap();
        assert!(
            t.warnings.iter().any(|w| w.contains("outside")),
            "{:?}",
            t.warnings
        );
    }

    #[test]
    fn partitions_outside_the_disk_are_skipped() {
        let mut d = vec![0u8; MIB as usize];
        sign(&mut d, 0);
        put_entry(&mut d, 0, 0, 0x83, 1, 100);
        put_entry(&mut d, 1, 0, 0x83, 1000, 2048); // ends past 1 MiB
        put_entry(&mut d, 3, 0, 0x83, u32::MAX, u32::MAX);
        let t = parse(&d).unwrap();
        assert_eq!(places(&t), [(1, 512, 100 * 512)]);
        assert_eq!(t.warnings.len(), 2, "{:?}", t.warnings);
    }

    /// A GPT disk with `parts` as (first LBA, last LBA, name).
    fn gpt_disk(size: u64, parts: &[(u64, u64, &str)], count: u32) -> Vec<u8> {
        let mut d = vec![0u8; size as usize];
        sign(&mut d, 0);
        put_entry(
            &mut d,
            0,
            0,
            0xee,
            1,
            u32::try_from(size / 512 - 1).unwrap_or(u32::MAX),
        );
        let mut array = vec![0u8; count as usize * 128];
        for (i, (first, last, name)) in parts.iter().enumerate() {
            let e = &mut array[i * 128..(i + 1) * 128];
            e[0..16].copy_from_slice(&[
                0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47,
                0x7d, 0xe4,
            ]);
            e[16] = i as u8 + 1;
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            for (k, c) in name.encode_utf16().enumerate() {
                e[56 + 2 * k..58 + 2 * k].copy_from_slice(&c.to_le_bytes());
            }
        }
        d[1024..1024 + array.len()].copy_from_slice(&array);
        let h = &mut d[512..1024];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(size / 512 - 34).to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&count.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&array).to_le_bytes());
        let c = crc32(&h[..92]);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        d
    }

    #[test]
    fn gpt_entries_number_by_index() {
        let d = gpt_disk(
            4 * MIB,
            &[(2048, 4095, "root"), (0, 0, ""), (4096, 6143, "data")],
            128,
        );
        // Clear entry 2 (index 1) so numbering skips it.
        let mut d = d;
        d[1024 + 128..1024 + 256].fill(0);
        let crc = crc32(&d[1024..1024 + 128 * 128]);
        d[512 + 88..512 + 92].copy_from_slice(&crc.to_le_bytes());
        let mut h = d[512..512 + 92].to_vec();
        h[16..20].fill(0);
        let c = crc32(&h);
        d[512 + 16..512 + 20].copy_from_slice(&c.to_le_bytes());
        let t = parse(&d).unwrap();
        assert_eq!(t.scheme, Scheme::Gpt);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        assert_eq!(places(&t), [(1, MIB, MIB), (3, 2 * MIB, MIB)]);
        assert_eq!(t.partitions[0].name, "root");
        assert_eq!(
            t.partitions[0].type_id,
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
        );
    }

    #[test]
    fn gpt_crc_mismatch_is_a_warning() {
        let mut d = gpt_disk(4 * MIB, &[(2048, 4095, "a")], 128);
        d[1024 + 60] ^= 1; // change the name: entry array CRC now wrong
        let t = parse(&d).unwrap();
        assert_eq!(t.partitions.len(), 1);
        assert!(
            t.warnings.iter().any(|w| w.contains("array CRC")),
            "{:?}",
            t.warnings
        );
        d[512 + 40] ^= 1; // header CRC now wrong too
        let t = parse(&d).unwrap();
        assert!(
            t.warnings.iter().any(|w| w.contains("header CRC")),
            "{:?}",
            t.warnings
        );
    }

    #[test]
    fn hostile_gpt_headers_are_refused() {
        // Too many entries.
        let d = gpt_disk(4 * MIB, &[], 4096);
        let t = parse(&d).unwrap();
        assert!(t.partitions.is_empty());
        assert!(
            t.warnings.iter().any(|w| w.contains("entries")),
            "{:?}",
            t.warnings
        );
        // Entry outside the disk.
        let d = gpt_disk(
            4 * MIB,
            &[(2048, 1 << 40, "big"), (2048, 100, "backwards")],
            128,
        );
        let t = parse(&d).unwrap();
        assert!(t.partitions.is_empty());
        assert!(
            t.warnings.iter().any(|w| w.contains("inside the disk")),
            "{:?}",
            t.warnings
        );
        assert!(
            t.warnings.iter().any(|w| w.contains("ends before")),
            "{:?}",
            t.warnings
        );
        // Protective MBR without a GPT.
        let mut d = gpt_disk(4 * MIB, &[(2048, 4095, "a")], 128);
        d[512..520].fill(0);
        let t = parse(&d).unwrap();
        assert!(t.partitions.is_empty());
        assert!(t.warnings[0].contains("protective MBR"), "{:?}", t.warnings);
        // Absurd entry size.
        let mut d = gpt_disk(4 * MIB, &[], 128);
        d[512 + 84..512 + 88].copy_from_slice(&1000u32.to_le_bytes());
        assert!(parse(&d).unwrap().partitions.is_empty());
    }
}
