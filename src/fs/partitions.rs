//! The partition files of an exposed disk (`disk-p1.raw`, …): windows
//! of the disk's chain at each partition of its table
//! ([`crate::partition`]).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::sync::Arc;

use log::warn;

use super::Disk;
use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::partition::read_table;

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
