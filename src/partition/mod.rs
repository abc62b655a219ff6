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

//!
//! `mbr` parses DOS tables and EBR chains, `gpt` GUID tables; the
//! exposed partition files are built from a [`Table`] by
//! `crate::fs::partitions`.

use crate::endian::le16;
use crate::error::Result;

mod gpt;
mod mbr;

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

pub(crate) fn read_sector(
    read: ReadAt<'_>,
    size: u64,
    offset: u64,
    len: usize,
) -> Result<Option<Vec<u8>>> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => {
            let mut b = vec![0u8; len];
            read(&mut b, offset)?;
            Ok(Some(b))
        }
        _ => Ok(None),
    }
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
    let entries = mbr::slots(&mbr);
    // A filesystem boot sector (FAT, NTFS) also ends in 55 AA; a partition
    // table has only 0x00 or 0x80 as status bytes.
    if entries.iter().any(|e| e.status != 0 && e.status != 0x80) {
        return Ok(None);
    }
    if entries.iter().any(|e| e.kind == 0xee) {
        let mut warnings = Vec::new();
        for sector_size in [512u64, 4096] {
            match gpt::read(read, size, sector_size)? {
                gpt::Gpt::Found(t) => return Ok(Some(t)),
                gpt::Gpt::Unusable(why) => warnings.push(why),
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
    Ok(Some(mbr::read(read, size, &entries)?))
}

pub(crate) fn push_checked(
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

#[cfg(test)]
mod tests {
    use super::gpt::crc32;
    use super::*;
    use crate::endian::{put_le16, put_le32, put_le64};

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
        put_le32(e, 8, lba);
        put_le32(e, 12, sectors);
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
            put_le64(e, 32, *first);
            put_le64(e, 40, *last);
            for (k, c) in name.encode_utf16().enumerate() {
                put_le16(e, 56 + 2 * k, c);
            }
        }
        d[1024..1024 + array.len()].copy_from_slice(&array);
        let h = &mut d[512..1024];
        h[0..8].copy_from_slice(b"EFI PART");
        put_le32(h, 8, 0x0001_0000);
        put_le32(h, 12, 92);
        put_le64(h, 24, 1);
        put_le64(h, 40, 34);
        put_le64(h, 48, size / 512 - 34);
        put_le64(h, 72, 2);
        put_le32(h, 80, count);
        put_le32(h, 84, 128);
        put_le32(h, 88, crc32(&array));
        let c = crc32(&h[..92]);
        put_le32(h, 16, c);
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
        put_le32(&mut d, 512 + 88, crc);
        let mut h = d[512..512 + 92].to_vec();
        h[16..20].fill(0);
        let c = crc32(&h);
        put_le32(&mut d, 512 + 16, c);
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
        put_le32(&mut d, 512 + 84, 1000);
        assert!(parse(&d).unwrap().partitions.is_empty());
    }
}
