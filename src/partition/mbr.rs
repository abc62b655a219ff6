//! DOS/MBR partition tables: the four primary slots and the chain of
//! extended boot records (EBRs) holding logical partitions, bounded and
//! loop-checked.

use std::collections::HashSet;

use super::{push_checked, read_sector, Partition, ReadAt, Scheme, Table, MAX_LOGICAL};
use crate::endian::{le16, le32};
use crate::error::Result;

/// One 16-byte MBR entry.
#[derive(Debug, Clone, Copy)]
pub(super) struct MbrEntry {
    /// 0x00, or 0x80 for the boot partition.
    pub(super) status: u8,
    /// The partition type byte.
    pub(super) kind: u8,
    lba: u32,
    sectors: u32,
}

/// The four slots of a table sector (an MBR or an EBR).
pub(super) fn slots(sector: &[u8]) -> [MbrEntry; 4] {
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

/// The MBR table whose primary slots are `entries`.
pub(super) fn read(read: ReadAt<'_>, size: u64, entries: &[MbrEntry; 4]) -> Result<Table> {
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
            let [data, link, ..] = slots(&sector);
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
