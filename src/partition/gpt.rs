//! GUID partition tables: the header at LBA 1 (for 512- or 4096-byte
//! sectors) and its entry array, bounded; CRC mismatches are warnings.

use super::{push_checked, read_sector, Partition, ReadAt, Scheme, Table};
use super::{MAX_GPT_ARRAY, MAX_GPT_ENTRIES};
use crate::endian::{le16, le32, le64};
use crate::error::Result;

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

/// The CRC-32 of GPT headers and entry arrays (zlib's, from flate2).
pub(super) fn crc32(data: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(data);
    c.sum()
}

/// What one look for a GPT found.
pub(super) enum Gpt {
    /// A usable header and its entries (with warnings for CRC mismatches).
    Found(Table),
    /// No usable header at this sector size, and why.
    Unusable(String),
}

/// The GPT of a disk with sectors of `ss` bytes.
pub(super) fn read(read: ReadAt<'_>, size: u64, ss: u64) -> Result<Gpt> {
    let Some(h) = read_sector(read, size, ss, ss as usize)? else {
        return Ok(Gpt::Unusable("disk too small for a GPT header".into()));
    };
    if &h[0..8] != b"EFI PART" {
        return Ok(Gpt::Unusable(format!("no GPT signature at byte {ss}")));
    }
    let mut warnings = Vec::new();
    let hsize = le32(&h, 12) as usize;
    if !(92..=ss as usize).contains(&hsize) {
        return Ok(Gpt::Unusable(format!("GPT header size {hsize} is invalid")));
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
        return Ok(Gpt::Unusable(format!(
            "GPT has {count} entries (more than {MAX_GPT_ENTRIES})"
        )));
    }
    if !(128..=4096).contains(&esize) || !esize.is_power_of_two() {
        return Ok(Gpt::Unusable(format!("GPT entry size {esize} is invalid")));
    }
    let array_len = u64::from(count) * u64::from(esize);
    if array_len > MAX_GPT_ARRAY {
        return Ok(Gpt::Unusable(format!(
            "GPT entry array of {array_len} bytes is too large"
        )));
    }
    let Some(array) = array_lba
        .checked_mul(ss)
        .map(|off| read_sector(read, size, off, array_len as usize))
        .transpose()?
        .flatten()
    else {
        return Ok(Gpt::Unusable(format!(
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
    Ok(Gpt::Found(Table {
        scheme: Scheme::Gpt,
        partitions: parts,
        warnings,
    }))
}
