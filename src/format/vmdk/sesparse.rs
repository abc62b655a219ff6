//! ESXi seSparse extents (createType `seSparse`: ESXi 5.5+ snapshots of
//! large disks, the default for snapshots since ESXi 6.5).
//!
//! The format is not officially documented; this reader accepts only the
//! layout seen in the wild and refuses anything else. A 512-byte constant
//! header (64-bit little-endian fields) gives the capacity, grain size
//! (8 sectors), grain-table size (64 sectors = 4096 entries) and the sector
//! offsets of the volatile header, journal, grain directory, grain tables
//! and grain area. Grain-directory entries are `0x1000_0000_xxxx_xxxx`
//! (table number xxxx_xxxx) or 0. Grain-table entries carry a type in the
//! top nibble: 0 unallocated, 1 unmapped and 2 zero (both read as zeros),
//! 3 allocated (a grain number split across the remaining bits).

use std::sync::Arc;

use super::extent::{
    GrainTables, GteCodec, SparseInfo, GD_BAD, GD_NONE, MAX_GD_ENTRIES, MAX_HOST_OFFSET,
};
use crate::endian::{le64, le64s};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// Constant-header magic (little-endian u64 `0xcafebabe`).
pub const CONST_MAGIC: u64 = 0xcafe_babe;
/// Volatile-header magic.
pub const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
/// The only version seen: 2.1.
pub const VERSION: u64 = 0x0000_0002_0000_0001;

/// True when `head` starts with a seSparse constant header.
pub fn probe(head: &[u8]) -> bool {
    head.len() >= 16 && le64(head, 0) == CONST_MAGIC && le64(head, 8) == VERSION
}

/// Opens the seSparse extent in `file`; `capacity` is the descriptor's size
/// in bytes (`None` = the header's).
pub fn open(
    file: Arc<HostFile>,
    capacity: Option<u64>,
    cache_id: u64,
    key_base: u64,
) -> Result<(GrainTables, SparseInfo)> {
    let mut h = [0u8; 512];
    file.read_exact_at(&mut h, 0)?;
    if le64(&h, 0) != CONST_MAGIC {
        return Err(Error::corrupt(
            "not a seSparse extent (bad constant-header magic)",
        ));
    }
    let f = |i: usize| le64(&h, i * 8);
    let (version, sectors, grain, gt_sectors, flags) = (f(1), f(2), f(3), f(4), f(5));
    if version != VERSION {
        return Err(Error::unsupported(format!(
            "seSparse version {version:#x} is not supported (only 2.1)"
        )));
    }
    if grain != 8 || gt_sectors != 64 {
        return Err(Error::unsupported(format!(
            "seSparse grain size {grain} / grain-table size {gt_sectors} sectors is not supported (8 / 64)"
        )));
    }
    if flags != 0 {
        return Err(Error::unsupported(format!(
            "seSparse flags {flags:#x} are not supported"
        )));
    }
    let (vol_off, gd_off, gd_size, gt_off, grains_off) = (f(10), f(16), f(17), f(18), f(24));
    let mut vol = [0u8; 32];
    let vol_at = vol_off
        .checked_mul(512)
        .ok_or_else(|| Error::corrupt("seSparse volatile header offset overflows"))?;
    file.read_exact_at(&mut vol, vol_at)?;
    if le64(&vol, 0) != VOLATILE_MAGIC {
        return Err(Error::corrupt("seSparse volatile header has a bad magic"));
    }
    if le64(&vol, 24) != 0 {
        return Err(Error::unsupported(
            "seSparse journal needs replaying (the image was not closed cleanly)",
        ));
    }
    let header_bytes = sectors
        .checked_mul(512)
        .ok_or_else(|| Error::corrupt("seSparse capacity overflows"))?;
    let grain_size = grain * 512;
    let gt_entries = gt_sectors * 512 / 8;
    let gt_bytes = gt_sectors * 512;
    let needed = header_bytes.div_ceil(gt_entries * grain_size);
    let have = gd_size.saturating_mul(512) / 8;
    if needed > MAX_GD_ENTRIES || have < needed {
        return Err(Error::corrupt(format!(
            "seSparse grain directory has {have} entries; the capacity needs {needed}"
        )));
    }
    let gd_at = gd_off.saturating_mul(512);
    if gd_at > MAX_HOST_OFFSET || gd_at + needed * 8 > file.len() {
        return Err(Error::corrupt(format!(
            "seSparse grain directory at sector {gd_off:#x} lies outside the file"
        )));
    }
    let tables_at = gt_off.saturating_mul(512);
    let grains_at = grains_off.saturating_mul(512);
    if tables_at > MAX_HOST_OFFSET || grains_at > MAX_HOST_OFFSET {
        return Err(Error::corrupt(
            "seSparse table or grain area offset is absurd",
        ));
    }
    let mut raw = vec![0u8; (needed * 8) as usize];
    file.read_exact_at(&mut raw, gd_at)?;
    let gd = le64s(&raw)
        .map(|e| {
            if e == 0 {
                GD_NONE
            } else if e >> 32 != 0x1000_0000 {
                GD_BAD
            } else {
                tables_at + (e & 0xffff_ffff) * gt_bytes
            }
        })
        .collect();
    let info = SparseInfo::plain("seSparse", version, flags, sectors);
    let tables = GrainTables::new(
        file,
        gd,
        None,
        gt_entries,
        grain_size,
        capacity.unwrap_or(header_bytes).min(header_bytes),
        GteCodec::SeSparse {
            grains_offset: grains_at,
        },
        cache_id,
        key_base,
        false,
    );
    Ok((tables, info))
}
