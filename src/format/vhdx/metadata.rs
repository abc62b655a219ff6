//! The VHDX metadata region: a table of items, each a GUID with an offset
//! and length inside the region, and the items a reader must understand:
//! file parameters (block size, leave-blocks-allocated, has-parent),
//! virtual disk size, virtual disk id (page 83 data), logical and physical
//! sector sizes, and the parent locator of a differencing disk.
//!
//! An unknown item marked required is refused (the disk may mean something
//! we would misread); unknown optional items are listed in `info` only.

use std::collections::BTreeMap;

use super::header::{utf16le, Guid, Region, MIB};
use super::log::Source;
use crate::endian::{le16, le32, le64};
use crate::error::{Error, Result};

const TABLE_LEN: usize = 64 << 10;
const MAX_ENTRIES: u16 = 2047;
/// Items larger than this are refused (the spec's limit is 1 MiB).
const MAX_ITEM: u32 = 1 << 20;
/// Largest virtual disk the spec allows: 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

const FILE_PARAMETERS: Guid = Guid::from_u128(0xcaa16737_fa36_4d43_b3b6_33f0aa44e76b);
const VIRTUAL_DISK_SIZE: Guid = Guid::from_u128(0x2fa54224_cd1b_4876_b211_5dbed83bf4b8);
const VIRTUAL_DISK_ID: Guid = Guid::from_u128(0xbeca12ab_b2e6_4523_93ef_c309e000c746);
const LOGICAL_SECTOR_SIZE: Guid = Guid::from_u128(0x8141bf1d_a96f_4709_ba47_f233a8faab5f);
const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_u128(0xcda348c7_445d_4471_9cc9_e9885251c556);
const PARENT_LOCATOR: Guid = Guid::from_u128(0xa8d35f2d_b30b_454d_abf7_d3d84834ab0c);
/// The locator type of a VHDX parent (the only one defined).
pub const VHDX_PARENT_LOCATOR_TYPE: Guid = Guid::from_u128(0xb04aefb7_d19e_4a81_b789_25b8e9445913);

/// What the metadata region says about the disk.
#[derive(Debug, Clone)]
pub struct Metadata {
    /// Payload block size in bytes (1 MiB to 256 MiB, a power of two).
    pub block_size: u32,
    /// The creator asked for blocks to stay allocated (fixed disks).
    pub leave_blocks_allocated: bool,
    /// A differencing disk.
    pub has_parent: bool,
    /// Guest disk size in bytes.
    pub virtual_size: u64,
    /// The page 83 virtual disk id.
    pub disk_id: Guid,
    /// Logical sector size (512 or 4096).
    pub logical_sector: u32,
    /// Physical sector size (512 or 4096).
    pub physical_sector: u32,
    /// Parent locator key/value pairs, when there is a parent.
    pub parent: Option<BTreeMap<String, String>>,
    /// Optional items we do not interpret.
    pub unknown: Vec<Guid>,
}

struct Entry {
    offset: u32,
    length: u32,
    required: bool,
}

impl Metadata {
    /// Reads and validates the metadata region.
    pub fn read(src: &Source, region: &Region) -> Result<Metadata> {
        let mut table = vec![0u8; TABLE_LEN];
        src.read_at(&mut table, region.offset)?;
        if &table[0..8] != b"metadata" {
            return Err(Error::corrupt(
                "VHDX metadata table has no 'metadata' signature",
            ));
        }
        let count = le16(&table, 10);
        if count > MAX_ENTRIES {
            return Err(Error::corrupt(format!(
                "VHDX metadata table has {count} entries (at most {MAX_ENTRIES})"
            )));
        }
        let mut items: BTreeMap<Guid, Entry> = BTreeMap::new();
        let mut unknown = Vec::new();
        for i in 0..count as usize {
            let e = 32 + 32 * i;
            let id = Guid::read(&table, e);
            let entry = Entry {
                offset: le32(&table, e + 16),
                length: le32(&table, e + 20),
                required: le32(&table, e + 24) & 4 != 0,
            };
            let known = [
                FILE_PARAMETERS,
                VIRTUAL_DISK_SIZE,
                VIRTUAL_DISK_ID,
                LOGICAL_SECTOR_SIZE,
                PHYSICAL_SECTOR_SIZE,
                PARENT_LOCATOR,
            ]
            .contains(&id);
            if !known {
                if entry.required {
                    return Err(Error::unsupported(format!(
                        "VHDX metadata item {id} is marked required but unknown"
                    )));
                }
                unknown.push(id);
                continue;
            }
            if items.insert(id, entry).is_some() {
                return Err(Error::corrupt(format!(
                    "VHDX metadata item {id} appears twice"
                )));
            }
        }
        let item = |id: Guid, name: &str, min: u32| -> Result<Option<Vec<u8>>> {
            let Some(e) = items.get(&id) else {
                return Ok(None);
            };
            if e.length < min || e.length > MAX_ITEM {
                return Err(Error::corrupt(format!(
                    "VHDX metadata item '{name}' has length {}",
                    e.length
                )));
            }
            let end = u64::from(e.offset) + u64::from(e.length);
            if u64::from(e.offset) < TABLE_LEN as u64 || end > region.length {
                return Err(Error::corrupt(format!(
                    "VHDX metadata item '{name}' at {:#x}+{} lies outside the metadata region",
                    e.offset, e.length
                )));
            }
            let mut b = vec![0u8; e.length as usize];
            src.read_at(&mut b, region.offset + u64::from(e.offset))?;
            Ok(Some(b))
        };
        let need = |v: Option<Vec<u8>>, name: &str| {
            v.ok_or_else(|| Error::corrupt(format!("VHDX metadata lacks the '{name}' item")))
        };
        let fp = need(
            item(FILE_PARAMETERS, "file parameters", 8)?,
            "file parameters",
        )?;
        let size = need(
            item(VIRTUAL_DISK_SIZE, "virtual disk size", 8)?,
            "virtual disk size",
        )?;
        let lss = need(
            item(LOGICAL_SECTOR_SIZE, "logical sector size", 4)?,
            "logical sector size",
        )?;
        let pss = need(
            item(PHYSICAL_SECTOR_SIZE, "physical sector size", 4)?,
            "physical sector size",
        )?;
        // Hyper-V always writes it; qemu too. Tolerate its absence (it only feeds `info`).
        let disk_id = item(VIRTUAL_DISK_ID, "virtual disk id", 16)?
            .map(|b| Guid::read(&b, 0))
            .unwrap_or_default();
        let flags = le32(&fp, 4);
        let md = Metadata {
            block_size: le32(&fp, 0),
            leave_blocks_allocated: flags & 1 != 0,
            has_parent: flags & 2 != 0,
            virtual_size: le64(&size, 0),
            disk_id,
            logical_sector: le32(&lss, 0),
            physical_sector: le32(&pss, 0),
            parent: None,
            unknown,
        };
        md.check()?;
        let parent = match (md.has_parent, item(PARENT_LOCATOR, "parent locator", 20)?) {
            (true, Some(b)) => Some(parse_locator(&b)?),
            (true, None) => {
                return Err(Error::corrupt(
                    "VHDX differencing disk has no parent locator",
                ))
            }
            (false, _) => None,
        };
        Ok(Metadata { parent, ..md })
    }

    fn check(&self) -> Result<()> {
        let bs = u64::from(self.block_size);
        if !bs.is_power_of_two() || !(MIB..=256 * MIB).contains(&bs) {
            return Err(Error::corrupt(format!(
                "VHDX block size {bs} is not a power of two between 1 MiB and 256 MiB"
            )));
        }
        for (name, s) in [
            ("logical", self.logical_sector),
            ("physical", self.physical_sector),
        ] {
            if s != 512 && s != 4096 {
                return Err(Error::corrupt(format!(
                    "VHDX {name} sector size {s} (512 or 4096 expected)"
                )));
            }
        }
        let v = self.virtual_size;
        if v == 0 || v > MAX_VIRTUAL_SIZE || v % u64::from(self.logical_sector) != 0 {
            return Err(Error::corrupt(format!(
                "VHDX virtual size {v} is not a multiple of the {}-byte sector up to 64 TiB",
                self.logical_sector
            )));
        }
        Ok(())
    }
}

/// Parses a parent locator item: a type GUID and UTF-16 key/value pairs.
fn parse_locator(b: &[u8]) -> Result<BTreeMap<String, String>> {
    let kind = Guid::read(b, 0);
    if kind != VHDX_PARENT_LOCATOR_TYPE {
        return Err(Error::unsupported(format!(
            "VHDX parent locator of unknown type {kind}"
        )));
    }
    let count = le16(b, 18) as usize;
    let entries_end = 20 + 12 * count;
    if entries_end > b.len() {
        return Err(Error::corrupt(format!(
            "VHDX parent locator lists {count} entries that do not fit its {} bytes",
            b.len()
        )));
    }
    let mut out = BTreeMap::new();
    for i in 0..count {
        let e = 20 + 12 * i;
        let key = locator_string(b, le32(b, e) as usize, le16(b, e + 8) as usize)?;
        let value = locator_string(b, le32(b, e + 4) as usize, le16(b, e + 10) as usize)?;
        if out.insert(key.clone(), value).is_some() {
            return Err(Error::corrupt(format!(
                "VHDX parent locator has key '{key}' twice"
            )));
        }
    }
    Ok(out)
}

fn locator_string(b: &[u8], offset: usize, len: usize) -> Result<String> {
    match offset.checked_add(len) {
        Some(end) if end <= b.len() && len % 2 == 0 && len > 0 => Ok(utf16le(&b[offset..end])),
        _ => Err(Error::corrupt(format!(
            "VHDX parent locator string at {offset:#x}+{len} is out of bounds"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endian::{le16_bytes, put_le16, put_le32};

    fn utf16(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(le16_bytes).collect()
    }

    #[test]
    fn locator_pairs_parse_and_bounds_are_checked() {
        let mut b = vec![0u8; 20 + 12];
        b[..16].copy_from_slice(&VHDX_PARENT_LOCATOR_TYPE.0);
        b[18] = 1;
        let k = utf16("relative_path");
        let v = utf16(".\\base.vhdx");
        let ko = b.len();
        b.extend(&k);
        let vo = b.len();
        b.extend(&v);
        put_le32(&mut b, 20, ko as u32);
        put_le32(&mut b, 24, vo as u32);
        put_le16(&mut b, 28, k.len() as u16);
        put_le16(&mut b, 30, v.len() as u16);
        let m = parse_locator(&b).unwrap();
        assert_eq!(m["relative_path"], ".\\base.vhdx");
        put_le16(&mut b, 30, 1000);
        assert!(parse_locator(&b).is_err());
        b[18] = 200;
        assert!(parse_locator(&b).is_err());
    }
}
