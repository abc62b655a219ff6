//! ESXi `COWD` sparse extents (createType `vmfsSparse`: ESX 3–6.x delta
//! disks, `-delta.vmdk`).
//!
//! The header (2048 bytes, little-endian) starts with `COWD`, then version,
//! flags, capacity in sectors, grain size in sectors, the grain directory's
//! sector and its number of entries (all 32-bit). Grain tables have 4096
//! 32-bit entries holding grain sector numbers (0 = not allocated).

use std::sync::Arc;

use super::extent::{
    GrainTables, GteCodec, SparseInfo, GD_NONE, MAX_GD_ENTRIES, MAX_GRAIN_SECTORS, MAX_HOST_OFFSET,
};
use crate::endian::{le32, le32s};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// `COWD` magic as the first four bytes.
pub const MAGIC: &[u8; 4] = b"COWD";
/// Grain-table entries per table, fixed by the format.
pub const GT_ENTRIES: u64 = 4096;

/// Opens the COWD extent in `file`; `capacity` is the descriptor's size in
/// bytes (`None` = the header's).
pub fn open(
    file: Arc<HostFile>,
    capacity: Option<u64>,
    cache_id: u64,
    key_base: u64,
) -> Result<(GrainTables, SparseInfo)> {
    let mut h = [0u8; 32];
    file.read_exact_at(&mut h, 0)?;
    if &h[0..4] != MAGIC {
        return Err(Error::corrupt("not a COWD sparse extent (no COWD magic)"));
    }
    let version = u64::from(le32(&h, 4));
    let flags = u64::from(le32(&h, 8));
    let sectors = u64::from(le32(&h, 12));
    let grain = u64::from(le32(&h, 16));
    let gd_sector = u64::from(le32(&h, 20));
    let gd_entries = u64::from(le32(&h, 24));
    if grain == 0 || !grain.is_power_of_two() || grain > MAX_GRAIN_SECTORS {
        return Err(Error::corrupt(format!(
            "COWD grain size of {grain} sectors is invalid (a power of two up to {MAX_GRAIN_SECTORS})"
        )));
    }
    let header_bytes = sectors * 512;
    let grain_size = grain * 512;
    let needed = header_bytes.div_ceil(GT_ENTRIES * grain_size);
    if gd_entries > MAX_GD_ENTRIES || gd_entries < needed {
        return Err(Error::corrupt(format!(
            "COWD grain directory has {gd_entries} entries; the capacity needs {needed}"
        )));
    }
    let gd_off = gd_sector * 512;
    let gd_bytes = needed * 4;
    if gd_off == 0 && needed > 0 || gd_off > MAX_HOST_OFFSET || gd_off + gd_bytes > file.len() {
        return Err(Error::corrupt(format!(
            "COWD grain directory at sector {gd_sector:#x} lies outside the file ({} bytes)",
            file.len()
        )));
    }
    let mut raw = vec![0u8; gd_bytes as usize];
    file.read_exact_at(&mut raw, gd_off)?;
    let gd = le32s(&raw)
        .map(|e| match u64::from(e) {
            0 => GD_NONE,
            s => s * 512,
        })
        .collect();
    let info = SparseInfo::plain("COWD", version, flags, sectors);
    let tables = GrainTables::new(
        file,
        gd,
        None,
        GT_ENTRIES,
        grain_size,
        capacity.unwrap_or(header_bytes).min(header_bytes),
        GteCodec::Cowd,
        cache_id,
        key_base,
        false,
    );
    Ok((tables, info))
}
