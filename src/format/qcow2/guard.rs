//! The metadata map of a writable qcow2 image (see
//! [`crate::engine::overlap`]): which host ranges of the image file hold
//! metadata, built at open; the allocator and the table code keep it up
//! to date as they add and free tables.
//!
//! Recorded: the header cluster, the active L1 table and every L2 table it
//! names, the refcount table and every refcount block (added by
//! [`super::alloc::Alloc::open`]), the snapshot table, each snapshot's L1
//! table and the L2 tables those name (read up to [`SNAPSHOT_L1_BUDGET`]
//! bytes of snapshot L1 tables in all), the bitmaps directory, every
//! bitmap's table and the bitmap data clusters those name.
//! Guest data in an external data file is never checked: no metadata
//! lives there.

use std::sync::Arc;

use crate::endian::{be16, be32, be64, be64_bytes, be64s};
use crate::engine::overlap::{MetadataMap, Structure};
use crate::error::Result;
use crate::host::HostFile;

use super::header::{Header, INCOMPAT_CORRUPT};
use super::snapshot::snapshot_metadata;
use super::tables::{MAX_L1_BYTES, OFFSET_MASK};

/// Bytes of snapshot L1 tables read at open to find their L2 tables.
pub const SNAPSHOT_L1_BUDGET: u64 = 64 << 20;

/// Bytes of the bitmap directory and of bitmap tables read at open.
pub const BITMAP_BUDGET: u64 = 64 << 20;

/// Reads the table of `bytes` bytes at `off` (big-endian u64 entries) and
/// marks the cluster each nonzero entry points at as `kind`.
fn add_pointed_clusters(
    map: &mut MetadataMap,
    file: &HostFile,
    off: u64,
    bytes: u64,
    cs: u64,
    kind: Structure,
) -> Result<()> {
    let mut raw = vec![0u8; bytes as usize];
    file.read_exact_at(&mut raw, off)?;
    for e in be64s(&raw).map(|e| e & OFFSET_MASK).filter(|&e| e != 0) {
        map.add(e, cs, kind);
    }
    Ok(())
}

/// Records the table of every bitmap of the directory at `off` (`len`
/// bytes) and the data clusters the tables name. A directory or table out
/// of the file is skipped (qemu refuses such an image's bitmaps; reading
/// ignores them), entries are parsed as far as they are well formed, and
/// at most [`BITMAP_BUDGET`] bytes of tables are read.
fn add_bitmaps(map: &mut MetadataMap, file: &HostFile, off: u64, len: u64, cs: u64) -> Result<()> {
    if off.checked_add(len).is_none_or(|e| e > file.len()) {
        return Ok(());
    }
    let mut dir = vec![0u8; len as usize];
    file.read_exact_at(&mut dir, off)?;
    let mut budget = BITMAP_BUDGET;
    let mut at = 0usize;
    // Entry: table offset (8), table entries (4), flags (4), type (1),
    // granularity (1), name size (2), extra data size (4), extra, name,
    // padded to 8 bytes.
    while let Some(fixed) = dir.get(at..at + 24) {
        let table = be64(fixed, 0);
        let entries = u64::from(be32(fixed, 8));
        let name = u64::from(be16(fixed, 18));
        let extra = u64::from(be32(fixed, 20));
        let bytes = entries * 8;
        if bytes > 0 {
            map.add(table, bytes, Structure::BitmapTable);
        }
        if bytes <= budget && table.checked_add(bytes).is_some_and(|e| e <= file.len()) {
            budget -= bytes;
            add_pointed_clusters(map, file, table, bytes, cs, Structure::BitmapData)?;
        }
        let Some(next) = (24 + extra + name)
            .checked_next_multiple_of(8)
            .and_then(|n| u64::try_from(at).ok()?.checked_add(n))
            .and_then(|n| usize::try_from(n).ok())
        else {
            break;
        };
        at = next;
    }
    Ok(())
}

/// The metadata map of `file` (header `h`, active L1 entries `l1`),
/// marking a v3 image corrupt when a write trips it.
pub fn build(file: &Arc<HostFile>, h: &Header, l1: &[u64]) -> Result<MetadataMap> {
    let cs = h.cluster_size();
    let mut map = MetadataMap::new(file.path());
    map.add(0, cs, Structure::Header);
    map.add(
        h.l1_table_offset,
        u64::from(h.l1_size) * 8,
        Structure::L1Table,
    );
    for &e in l1.iter().filter(|&&e| e & OFFSET_MASK != 0) {
        map.add(e & OFFSET_MASK, cs, Structure::L2Table);
    }
    if h.nb_snapshots > 0 {
        let (len, l1s) = snapshot_metadata(file, h)?;
        map.add(h.snapshots_offset, len, Structure::SnapshotTable);
        let mut budget = SNAPSHOT_L1_BUDGET;
        for (off, n) in l1s {
            let bytes = (u64::from(n) * 8).min(MAX_L1_BYTES);
            map.add(off, bytes, Structure::SnapshotL1Table);
            if bytes > budget || off.checked_add(bytes).is_none_or(|e| e > file.len()) {
                continue;
            }
            budget -= bytes;
            add_pointed_clusters(&mut map, file, off, bytes, cs, Structure::SnapshotL2Table)?;
        }
    }
    if let Some((off, len)) = h.bitmap_directory {
        let len = len.min(BITMAP_BUDGET);
        map.add(off, len, Structure::BitmapDirectory);
        add_bitmaps(&mut map, file, off, len, cs)?;
    }
    if h.version >= 3 {
        let f = file.clone();
        let bits = h.incompatible | INCOMPAT_CORRUPT;
        map.set_on_trip(Box::new(move || {
            // As qemu does: the image is unusable until repaired.
            f.write_all_at(&be64_bytes(bits), 72)?;
            f.sync_data()
        }));
    }
    Ok(map)
}
