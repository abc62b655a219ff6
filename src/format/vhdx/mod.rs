//! The VHDX driver (Hyper-V's virtual hard disk v2): reads, of fixed,
//! dynamic and differencing (`.avhdx`) disks.
//!
//! Opening goes: the file type identifier and the current header
//! ([`header`]); the log, replayed into an in-memory overlay when it is not
//! empty ([`log`]); the region table, the metadata ([`metadata`]) and the
//! BAT ([`bat`]), all read through that overlay. A writable open of a disk
//! without parent first replays the log in place ([`journal`]), then
//! writes go through [`write`](mod@write); differencing disks are refused by the
//! chain with the `--overlay` hint.
//!
//! [`Vhdx::map`] answers per payload block: stored blocks map to the host
//! file (runs extended over blocks stored back to back), zero blocks to
//! zeros, absent ones to the parent (differencing) or zeros, and partially
//! present blocks sector by sector from the chunk's sector bitmap. Host
//! ranges the replayed log rewrote are served from the overlay instead.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use serde_json::{json, Value};

use super::{BackingSpec, CompressedBlock, Format, Layer, LayerInfo, Mapping, OpenCtx};
use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;

pub mod bat;
pub mod header;
pub mod journal;
pub mod log;
pub mod metadata;
pub mod write;

use bat::{Bat, State};
use header::{Guid, Header, Regions};
use log::{Hit, LogState, Source};
use metadata::Metadata;

/// True when `head` starts with the VHDX file type identifier.
pub fn probe(head: &[u8]) -> bool {
    header::probe(head)
}

/// Opens a VHDX image.
pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Arc<dyn Layer>> {
    let layer = Vhdx::open(file.clone(), ctx).map_err(|e| e.with_path(file.path()))?;
    Ok(Arc::new(layer))
}

/// An open VHDX image.
pub struct Vhdx {
    src: Source,
    creator: String,
    /// The current header (replaced by the writer's header updates).
    header: RwLock<Header>,
    regions: Regions,
    md: Metadata,
    bat: Bat,
    /// The parent as resolved from the locator, when differencing.
    parent_name: Option<String>,
    cache_id: u64,
    /// The shared caches (the sector bitmaps of partial blocks).
    caches: Arc<crate::cache::Caches>,
    /// The file's length as the log leaves it, grown by allocations.
    end: AtomicU64,
    /// The write state, when opened writable.
    writer: Option<write::Writer>,
}

impl Vhdx {
    /// Parses the headers, replays the log, reads the metadata and the BAT.
    pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Vhdx> {
        let creator = header::read_creator(&file)?;
        let header = Header::read_current(&file)?;
        let src = Source::open(file, &header)?;
        let regions = Regions::read(&src)?;
        // Metadata and BAT in one round trip for a remote file.
        src.file.prefetch(&[
            (regions.metadata.offset, regions.metadata.length),
            (regions.bat.offset, regions.bat.length),
        ]);
        let md = Metadata::read(&src, &regions.metadata)?;
        let bat = Bat::read(&src, &regions.bat, &md)?;
        let in_place = ctx.writable && !md.has_parent;
        if in_place && !header.log_guid.is_zero() {
            // MS-VHDX: replay the log before any write; then open again,
            // with an empty log.
            let headers = journal::Headers::read(&src.file, &header)?;
            journal::replay_in_place(&src, &headers)?;
            return Vhdx::open(src.file.clone(), ctx);
        }
        let parent_name = md
            .parent
            .as_ref()
            .map(|loc| choose_parent(loc, src.file.path(), ctx))
            .transpose()?;
        let mut v = Vhdx {
            cache_id: ctx.caches.new_layer_id(),
            caches: ctx.caches.clone(),
            end: AtomicU64::new(src.end),
            src,
            creator,
            header: RwLock::new(header.clone()),
            regions: regions.clone(),
            md,
            bat,
            parent_name,
            writer: None,
        };
        if in_place {
            let headers = journal::Headers::read(&v.src.file, &header)?;
            v.writer = Some(write::Writer::new(&v, headers, &header, &regions)?);
        }
        Ok(v)
    }

    /// The file's length as the log leaves it, grown by allocations.
    fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// The DataWriteGuid: changes whenever guest data changes; children
    /// record their parent's in `parent_linkage`.
    pub fn data_write_guid(&self) -> Guid {
        self.header.read().data_write_guid
    }

    /// What an unstored block reads as: the parent's data in a
    /// differencing disk, zeros otherwise.
    fn absent(&self) -> Mapping {
        if self.md.has_parent {
            Mapping::Backing
        } else {
            Mapping::Zero
        }
    }

    /// The mapping of a payload block's state, before sector bitmaps and
    /// the overlay are looked at; `Data` carries the block's host start.
    fn block_mapping(&self, state: State) -> Mapping {
        match state {
            State::NotPresent => self.absent(),
            // MS-VHDX lets both read as zeros (or stale bytes, which we
            // never serve), in differencing disks too.
            State::Undefined | State::Zero | State::Unmapped => Mapping::Zero,
            State::Full(host) | State::Partial(host) => Mapping::Data {
                file: self.src.file.clone(),
                offset: host,
            },
        }
    }

    fn map_inner(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let bs = self.bat.block_size;
        let end = offset.saturating_add(max_len);
        let block = offset / bs;
        let in_block = offset % bs;
        let state = self.bat.payload(block, self.end())?;
        if let State::Partial(host) = state {
            let limit = end.min((block + 1) * bs);
            return self.map_partial(block, host, offset, limit);
        }
        // Extend the run over following blocks of the same kind.
        let first = self.block_mapping(state);
        let mut run_end = (block + 1) * bs;
        let mut b = block + 1;
        while run_end < end {
            let Ok(next) = self.bat.payload(b, self.end()) else {
                break;
            };
            let same = match (&first, self.block_mapping(next)) {
                (Mapping::Zero, Mapping::Zero) | (Mapping::Backing, Mapping::Backing) => {
                    !matches!(next, State::Partial(_))
                }
                (Mapping::Data { offset: h0, .. }, Mapping::Data { offset: h, .. }) => {
                    matches!(next, State::Full(_)) && h0 + (b - block) * bs == h
                }
                _ => false,
            };
            if !same {
                break;
            }
            run_end += bs;
            b += 1;
        }
        let n = run_end.min(end) - offset;
        match first {
            Mapping::Data { offset: host, .. } => self.data(offset, host + in_block, n),
            other => Ok((other, n)),
        }
    }

    /// A partially present block: the sector bitmap says, sector by
    /// sector, whether this disk or its parent holds the data.
    fn map_partial(
        &self,
        block: u64,
        host: u64,
        offset: u64,
        limit: u64,
    ) -> Result<(Mapping, u64)> {
        let sector = self.bat.sector;
        let bs = self.bat.block_size;
        let (bits, shift) = self.block_bitmap(block)?;
        let block_start = block * bs;
        let s0 = (offset - block_start) / sector;
        let s1 = (limit - block_start).div_ceil(sector);
        let bit = |s: u64| {
            let i = shift + s;
            bits[(i / 8) as usize] & (1 << (i % 8)) != 0
        };
        let set = bit(s0);
        let mut s = s0 + 1;
        while s < s1 && bit(s) == set {
            s += 1;
        }
        let n = (block_start + s * sector).min(limit) - offset;
        if set {
            self.data(offset, host + (offset - block_start), n)
        } else {
            Ok((Mapping::Backing, n))
        }
    }

    /// The sector bitmap bits of partial block `block`: the bytes holding
    /// them and the position of the block's first bit in the first byte.
    /// Read once and kept in the metadata cache: only a differencing disk
    /// has partial blocks, and vdiskfs never writes one (writes go to an
    /// overlay), so the bits never change under a reader.
    fn block_bitmap(&self, block: u64) -> Result<(Arc<[u8]>, u64)> {
        let first_bit = self.bat.bitmap_bit(block);
        let shift = first_bit % 8;
        let key = (self.cache_id, block);
        if let Some(b) = self.caches.meta.get(key) {
            return Ok((b, shift));
        }
        let at = self.bat.bitmap(block, self.end())?;
        let sectors = self.bat.block_size / self.bat.sector;
        let mut bits = vec![0u8; (shift + sectors).div_ceil(8) as usize];
        self.src.read_at(&mut bits, at + first_bit / 8)?;
        let bits: Arc<[u8]> = bits.into();
        self.caches.meta.insert(key, bits.clone());
        Ok((bits, shift))
    }

    /// Maps `n` guest bytes at `offset` stored at `host`, unless the
    /// replayed log rewrote part of that host range.
    fn data(&self, offset: u64, host: u64, n: u64) -> Result<(Mapping, u64)> {
        if host >= self.end() {
            return Err(Error::corrupt(format!(
                "VHDX payload at {host:#x} lies past the end of the file ({} bytes)",
                self.end()
            )));
        }
        Ok(match self.src.overlay.at(host) {
            Hit::File { next } => (
                Mapping::Data {
                    file: self.src.file.clone(),
                    offset: host,
                },
                n.min(next - host),
            ),
            Hit::Zero { end } => (Mapping::Zero, n.min(end - host)),
            Hit::Data { start, data } => {
                // Served through the block path: `decompress` copies the
                // logged page out of the overlay.
                let block = CompressedBlock {
                    guest_start: offset - (host - start),
                    len: data.len() as u64,
                    key: start,
                    host_offset: start,
                    host_len: data.len() as u64,
                };
                (
                    Mapping::Compressed(block),
                    n.min(start + data.len() as u64 - host),
                )
            }
        })
    }
}

/// Picks the parent's file name from the locator: the first of
/// relative_path, absolute_win32_path and volume_path that exists once
/// turned into a local path (through the open policy), or relative_path
/// when none does, so that the error names it.
fn choose_parent(
    loc: &BTreeMap<String, String>,
    child: &Path,
    ctx: &OpenCtx<'_>,
) -> Result<String> {
    let mut names = Vec::new();
    for key in ["relative_path", "absolute_win32_path", "volume_path"] {
        if let Some(v) = loc.get(key) {
            names.push(local_path(key, v));
        }
    }
    let Some(fallback) = names.first().cloned() else {
        return Err(Error::corrupt(
            "VHDX parent locator has no relative_path, absolute_win32_path or volume_path",
        ));
    };
    for n in names {
        if let Ok(p) = ctx.policy.resolve(child, &n) {
            if p.exists() {
                return Ok(n);
            }
        }
    }
    Ok(fallback)
}

/// Turns a Windows locator path into a local one: backslashes become
/// slashes, a drive letter or `\\?\Volume{…}` prefix is dropped.
fn local_path(key: &str, v: &str) -> String {
    let mut s = v.replace('\\', "/");
    if key == "volume_path" {
        if let Some(rest) = s.strip_prefix("//?/") {
            s = rest
                .find('/')
                .map_or(String::new(), |i| rest[i..].to_string());
        }
    } else if s.len() >= 2 && s.as_bytes()[1] == b':' && s.as_bytes()[0].is_ascii_alphabetic() {
        s = s[2..].to_string();
    }
    match s.strip_prefix("./") {
        Some(rest) => rest.to_string(),
        None => s,
    }
}

impl Layer for Vhdx {
    fn path(&self) -> &Path {
        self.src.file.path()
    }

    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn virtual_size(&self) -> u64 {
        self.md.virtual_size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        self.map_inner(offset, max_len)
            .map_err(|e| e.at_guest(offset).with_path(self.path()))
    }

    fn decompress(&self, block: &CompressedBlock, out: &mut [u8]) -> Result<()> {
        match self.src.overlay.at(block.host_offset) {
            Hit::Data { start, data } if start == block.host_offset && out.len() <= data.len() => {
                out.copy_from_slice(&data[..out.len()]);
                Ok(())
            }
            _ => Err(
                Error::corrupt("VHDX logged page not found in the replayed log")
                    .at_host(block.host_offset)
                    .with_path(self.path()),
            ),
        }
    }

    fn backing(&self) -> Option<BackingSpec> {
        self.parent_name.as_ref().map(|name| BackingSpec {
            name: name.clone(),
            format: Some(Format::Vhdx),
            parent_cid: None,
        })
    }

    fn data_guid(&self) -> Option<[u8; 16]> {
        Some(self.header.read().data_write_guid.0)
    }

    fn check_parent(&self, parent: &dyn Layer) -> Result<()> {
        let Some(loc) = &self.md.parent else {
            return Ok(());
        };
        let expected: Vec<Guid> = ["parent_linkage", "parent_linkage2"]
            .iter()
            .filter_map(|k| loc.get(*k).and_then(|v| Guid::parse(v)))
            .collect();
        if expected.is_empty() {
            return Err(Error::corrupt(
                "VHDX parent locator has no valid parent_linkage GUID",
            ));
        }
        let actual = parent.data_guid().map(Guid);
        if actual.is_some_and(|a| expected.contains(&a)) {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::CidMismatch,
            format!(
                "parent_linkage {} does not match the DataWriteGuid {} of parent {} \
                 (the parent changed after the child was made; --ignore-cid overrides)",
                expected[0],
                actual.map_or("(none: not a VHDX)".to_string(), |g| g.to_string()),
                parent.path().display()
            ),
        ))
    }

    fn info(&self) -> LayerInfo {
        let md = &self.md;
        let mut info = LayerInfo::new(Format::Vhdx, md.virtual_size);
        info.subformat = Some(
            if md.has_parent {
                "differencing"
            } else if md.leave_blocks_allocated {
                "fixed"
            } else {
                "dynamic"
            }
            .into(),
        );
        info.cluster_size = Some(self.bat.block_size);
        match self.src.log {
            Some(LogState::Replayed { head, entries }) => info.features.push(format!(
                "log replayed in memory ({entries} entries, head sequence {head})"
            )),
            Some(LogState::NoValidSequence) => info
                .features
                .push("log GUID set but no valid log sequence (nothing replayed)".into()),
            None => {}
        }
        let census = self.bat.census(self.end());
        let header = self.header.read().clone();
        let d = &mut info.details;
        d.insert("creator".into(), Value::from(self.creator.clone()));
        d.insert("block_size".into(), json!(self.bat.block_size));
        d.insert("logical_sector_size".into(), json!(md.logical_sector));
        d.insert("physical_sector_size".into(), json!(md.physical_sector));
        d.insert("has_parent".into(), json!(md.has_parent));
        d.insert(
            "leave_blocks_allocated".into(),
            json!(md.leave_blocks_allocated),
        );
        d.insert("virtual_disk_id".into(), json!(md.disk_id.to_string()));
        d.insert(
            "data_write_guid".into(),
            json!(header.data_write_guid.to_string()),
        );
        d.insert(
            "file_write_guid".into(),
            json!(header.file_write_guid.to_string()),
        );
        d.insert("log_guid".into(), json!(header.log_guid.to_string()));
        d.insert("header_sequence".into(), json!(header.sequence));
        d.insert("current_header".into(), json!(header.copy));
        d.insert("chunk_ratio".into(), json!(self.bat.chunk_ratio));
        d.insert(
            "blocks".into(),
            json!({
                "total": self.bat.blocks,
                "absent_or_zero": census[0],
                "fully_present": census[1],
                "partially_present": census[2],
                "damaged": census[3],
                "sector_bitmaps": census[4],
            }),
        );
        if let Some(loc) = &md.parent {
            d.insert("parent_locator".into(), json!(loc));
        }
        if !md.unknown.is_empty() {
            let ids: Vec<String> = md.unknown.iter().map(|g| g.to_string()).collect();
            d.insert("unknown_optional_metadata".into(), json!(ids));
        }
        let regions: Vec<Value> = self
            .regions
            .all
            .iter()
            .map(|r| json!({"guid": r.guid.to_string(), "offset": r.offset, "length": r.length, "required": r.required}))
            .collect();
        d.insert("regions".into(), Value::from(regions));
        info
    }

    fn as_write(&self) -> Option<&dyn super::WriteLayer> {
        match &self.writer {
            Some(_) => Some(self),
            None => None,
        }
    }

    fn host_files(&self) -> Vec<Arc<HostFile>> {
        vec![self.src.file.clone()]
    }

    fn cache_id(&self) -> u64 {
        self.cache_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_locator_paths_become_local() {
        assert_eq!(local_path("relative_path", ".\\base.vhdx"), "base.vhdx");
        assert_eq!(local_path("relative_path", "..\\d\\b.vhdx"), "../d/b.vhdx");
        assert_eq!(
            local_path("absolute_win32_path", "C:\\vms\\b.vhdx"),
            "/vms/b.vhdx"
        );
        assert_eq!(
            local_path(
                "volume_path",
                "\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\vms\\b.vhdx"
            ),
            "/vms/b.vhdx"
        );
    }
}
