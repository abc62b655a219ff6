//! The VHD driver (Microsoft Virtual Hard Disk, qemu's `vpc`): fixed,
//! dynamic and differencing disks; writes in place are in [`write`](mod@write).
//!
//! - Fixed: the disk lies flat from offset 0; the footer ([`footer`]) is
//!   the last 512 bytes of the file.
//! - Dynamic: the footer copy at offset 0 points at the dynamic header,
//!   which locates the BAT: one big-endian 32-bit sector number per block
//!   (`0xffffffff`: not allocated, reads as zeros). Each allocated block
//!   starts with a sector bitmap, then the block's data. As qemu does, a
//!   dynamic disk's bitmap is not consulted on reads: an allocated block
//!   is read whole.
//! - Differencing: a dynamic disk whose bitmap decides, sector by sector,
//!   between this file (bit set) and the parent (bit clear, or block not
//!   allocated). The parent is named by locators ([`locator`]) and checked
//!   by unique id (see [`Layer::parent_unique_id`]).
//!
//! Which image sizes which way is in [`footer::Footer::virtual_size`] and
//! docs/vhd.md. The BAT is held in memory (bounded by [`MAX_BAT_BYTES`]);
//! sector bitmaps go through the shared metadata cache. A BAT entry or
//! bitmap that points outside the file fails the reads of that block only.

use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::Value;

use super::{BackingSpec, Format, Layer, LayerInfo, Mapping, OpenCtx};
use crate::cache::Caches;
use crate::endian::be32s;
use crate::error::{Error, Result};
use crate::host::HostFile;

pub mod footer;
pub mod locator;
pub mod write;

use footer::{uuid_string, DiskType, DynHeader, Footer, DYN_HEADER_LEN, FOOTER_COOKIE, FOOTER_LEN};
use locator::Candidate;

/// Largest BAT we hold in memory: 16 Mi blocks (2040 GiB at the smallest
/// block size Hyper-V and qemu write, 512 KiB, needs 16 MiB).
pub const MAX_BAT_BYTES: u64 = 64 << 20;

/// A BAT entry for a block that is not allocated.
const UNALLOCATED: u32 = u32::MAX;

/// True when `head` (the first bytes of a file) starts with the footer
/// copy of a dynamic or differencing VHD.
pub fn probe(head: &[u8]) -> bool {
    head.len() >= 8 && &head[..8] == FOOTER_COOKIE
}

/// True when `tail` (the last 512 bytes of a file) is the footer of a
/// fixed VHD. Only fixed disks are recognised by their tail, as qemu opens
/// them: a footer there cannot point at other files or tables.
pub fn probe_footer(tail: &[u8]) -> bool {
    tail.len() == FOOTER_LEN && &tail[..8] == FOOTER_COOKIE && tail[60..64] == [0, 0, 0, 2]
}

/// Opens a VHD image.
pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Arc<dyn Layer>> {
    let layer = Vhd::open(file.clone(), ctx).map_err(|e| e.with_path(file.path()))?;
    Ok(Arc::new(layer))
}

/// The tables of a dynamic or differencing disk.
struct Dynamic {
    header: DynHeader,
    /// BAT entries for the blocks the virtual size covers (changed only
    /// under the writer's allocation lock).
    bat: Vec<AtomicU32>,
    block_size: u64,
    bitmap_len: u64,
}

/// An open VHD image.
pub struct Vhd {
    file: Arc<HostFile>,
    footer: Footer,
    /// Whether the footer was read from the copy at offset 0.
    footer_at_head: bool,
    virtual_size: u64,
    dynamic: Option<Dynamic>,
    /// Differencing disks: the parent name chosen, and every candidate.
    parent: Option<(String, Vec<Candidate>)>,
    caches: Arc<Caches>,
    cache_id: u64,
    /// The end of the host file as the driver knows it: its length at
    /// open, grown by every allocation before an entry points there.
    end: AtomicU64,
    /// The write side, when opened writable.
    writer: Option<write::Writer>,
}

impl Vhd {
    /// Reads the footer (copy at offset 0 first, as qemu does, then the
    /// end of the file for fixed disks), the dynamic header and the BAT,
    /// and chooses the parent name of a differencing disk.
    pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Vhd> {
        let len = file.len();
        if len < FOOTER_LEN as u64 {
            return Err(Error::corrupt(format!(
                "file of {len} bytes is too short for a VHD footer"
            )));
        }
        let mut buf = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut buf, 0)?;
        let (footer, footer_at_head) = if probe(&buf) {
            let f = Footer::parse(&buf).map_err(|e| prefix(e, "footer copy at offset 0"))?;
            (f, true)
        } else {
            file.read_exact_at(&mut buf, len - FOOTER_LEN as u64)?;
            let f = Footer::parse(&buf)?;
            if f.disk_type != DiskType::Fixed {
                return Err(Error::corrupt(format!(
                    "VHD footer at the end says {} but the copy at offset 0 is missing",
                    f.disk_type.name()
                )));
            }
            (f, false)
        };
        let virtual_size = footer.virtual_size()?;
        let mut vhd = Vhd {
            cache_id: ctx.caches.new_layer_id(),
            caches: ctx.caches.clone(),
            file,
            footer,
            footer_at_head,
            virtual_size,
            dynamic: None,
            parent: None,
            end: AtomicU64::new(len),
            writer: None,
        };
        if vhd.footer.disk_type == DiskType::Fixed {
            let data_end = if footer_at_head {
                len
            } else {
                len - FOOTER_LEN as u64
            };
            if virtual_size > data_end {
                return Err(Error::corrupt(format!(
                    "fixed VHD of {virtual_size} bytes but only {data_end} bytes of data \
                     before its footer (truncated file?)"
                )));
            }
            if ctx.writable {
                vhd.writer = Some(write::Writer::new(&vhd)?);
            }
            return Ok(vhd);
        }
        let dynamic = vhd.load_dynamic()?;
        if vhd.footer.disk_type == DiskType::Differencing {
            let candidates = locator::candidates(&vhd.file, &dynamic.header)?;
            let chosen = candidates
                .iter()
                .find(|c| {
                    ctx.policy
                        .resolve(vhd.file.path(), &c.name)
                        .is_ok_and(|p| p.is_file())
                })
                .or(candidates.first())
                .ok_or_else(locator::no_parent_name)?
                .name
                .clone();
            vhd.parent = Some((chosen, candidates));
        }
        vhd.dynamic = Some(dynamic);
        if ctx.writable {
            vhd.writer = Some(write::Writer::new(&vhd)?);
        }
        Ok(vhd)
    }

    fn load_dynamic(&self) -> Result<Dynamic> {
        let len = self.file.len();
        let at = self.footer.data_offset;
        if at
            .checked_add(DYN_HEADER_LEN as u64)
            .is_none_or(|e| e > len)
        {
            return Err(Error::corrupt(format!(
                "VHD dynamic header offset {at:#x} lies past the end of the file ({len} bytes)"
            )));
        }
        let mut raw = vec![0u8; DYN_HEADER_LEN];
        self.file.read_exact_at(&mut raw, at)?;
        let header = DynHeader::parse(&raw).map_err(|e| e.at_host(at))?;
        let block_size = u64::from(header.block_size);
        let needed = self.virtual_size.div_ceil(block_size);
        if u64::from(header.max_table_entries) < needed {
            return Err(Error::corrupt(format!(
                "VHD BAT has {} entries but the disk needs {needed} blocks of {block_size} bytes",
                header.max_table_entries
            )));
        }
        let bat_bytes = needed * 4;
        if bat_bytes > MAX_BAT_BYTES {
            return Err(Error::unsupported(format!(
                "VHD BAT of {bat_bytes} bytes ({needed} blocks of {block_size} bytes) exceeds \
                 the {} MiB limit",
                MAX_BAT_BYTES >> 20
            )));
        }
        let t = header.table_offset;
        if t.checked_add(bat_bytes).is_none_or(|e| e > len) {
            return Err(Error::corrupt(format!(
                "VHD BAT at {t:#x} ({bat_bytes} bytes) lies past the end of the file ({len} bytes)"
            )));
        }
        let mut raw = vec![0u8; bat_bytes as usize];
        self.file.read_exact_at(&mut raw, t)?;
        let bat = be32s(&raw).map(AtomicU32::new).collect();
        Ok(Dynamic {
            bitmap_len: header.bitmap_len(),
            header,
            bat,
            block_size,
        })
    }

    /// The parsed footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// Host offset of block `idx`'s bitmap, checked against the file.
    fn block_start(&self, d: &Dynamic, idx: usize, entry: u32) -> Result<u64> {
        let start = u64::from(entry) * 512;
        let end = self.end.load(Ordering::Acquire);
        if start + d.bitmap_len >= end {
            return Err(Error::corrupt(format!(
                "BAT entry {idx} points at sector {entry} (host offset {start:#x}), past the \
                 end of the file ({end} bytes)"
            )));
        }
        Ok(start)
    }

    /// BAT entry `idx`.
    fn entry(d: &Dynamic, idx: usize) -> u32 {
        d.bat[idx].load(Ordering::Acquire)
    }

    /// The sector bitmap of a block starting at `start`, through the cache.
    fn bitmap(&self, d: &Dynamic, idx: usize, start: u64) -> Result<Arc<[u8]>> {
        let key = (self.cache_id, idx as u64);
        if let Some(b) = self.caches.meta.get(key) {
            return Ok(b);
        }
        let mut raw = vec![0u8; d.bitmap_len as usize];
        self.file.read_exact_at(&mut raw, start)?;
        let b: Arc<[u8]> = raw.into();
        self.caches.meta.insert(key, b.clone());
        Ok(b)
    }

    fn map_dynamic(&self, d: &Dynamic, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let end = offset + max_len;
        let idx = (offset / d.block_size) as usize;
        let in_block = offset % d.block_size;
        let block_end = (offset - in_block + d.block_size).min(end);
        let entry = Self::entry(d, idx);
        let differencing = self.parent.is_some();
        let hole = if differencing {
            Mapping::Backing
        } else {
            Mapping::Zero
        };
        if entry == UNALLOCATED {
            // One run over this and the following unallocated blocks.
            let mut run_end = block_end;
            let mut next = idx + 1;
            while run_end < end
                && d.bat.get(next).map(|e| e.load(Ordering::Acquire)) == Some(UNALLOCATED)
            {
                run_end = (run_end + d.block_size).min(end);
                next += 1;
            }
            return Ok((hole, run_end - offset));
        }
        let start = self.block_start(d, idx, entry)?;
        let data = Mapping::Data {
            file: self.file.clone(),
            offset: start + d.bitmap_len + in_block,
        };
        if !differencing {
            return Ok((data, block_end - offset));
        }
        let bitmap = self.bitmap(d, idx, start)?;
        let bit = |sector: u64| bitmap[(sector / 8) as usize] & (0x80 >> (sector % 8)) != 0;
        let first = in_block / 512;
        let here = bit(first);
        let mut run_end = ((first + 1) * 512).min(block_end - (offset - in_block));
        let block_rel_end = block_end - (offset - in_block);
        while run_end < block_rel_end && bit(run_end / 512) == here {
            run_end = (run_end + 512).min(block_rel_end);
        }
        let n = run_end - in_block;
        Ok((if here { data } else { hole }, n))
    }
}

/// Prefixes an error message with where it was found.
fn prefix(e: Error, what: &str) -> Error {
    e.context(what)
}

impl Layer for Vhd {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn format(&self) -> Format {
        Format::Vhd
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let Some(d) = &self.dynamic else {
            let data = Mapping::Data {
                file: self.file.clone(),
                offset,
            };
            return Ok((data, max_len));
        };
        self.map_dynamic(d, offset, max_len)
            .map_err(|e| e.at_guest(offset).with_path(self.file.path()))
    }

    fn backing(&self) -> Option<BackingSpec> {
        self.parent.as_ref().map(|(name, _)| BackingSpec {
            name: name.clone(),
            // A VHD's parent is a VHD (fixed, dynamic or differencing).
            format: Some(Format::Vhd),
            parent_cid: None,
        })
    }

    fn unique_id(&self) -> Option<[u8; 16]> {
        Some(self.footer.unique_id)
    }

    fn parent_unique_id(&self) -> Option<[u8; 16]> {
        self.parent.as_ref()?;
        self.dynamic.as_ref().map(|d| d.header.parent_uuid)
    }

    fn info(&self) -> LayerInfo {
        let f = &self.footer;
        let mut info = LayerInfo::new(Format::Vhd, self.virtual_size);
        info.subformat = Some(f.disk_type.name().into());
        let d = &mut info.details;
        d.insert("disk_type".into(), Value::from(f.disk_type.name()));
        d.insert("creator_app".into(), Value::from(f.creator_app_text()));
        d.insert(
            "creator_version".into(),
            Value::from(f.creator_version_text()),
        );
        d.insert("creator_host_os".into(), Value::from(f.creator_os_text()));
        d.insert("uuid".into(), Value::from(uuid_string(&f.unique_id)));
        d.insert("timestamp".into(), Value::from(f.timestamp));
        d.insert("current_size".into(), Value::from(f.current_size));
        d.insert("original_size".into(), Value::from(f.original_size));
        let (c, h, s) = f.geometry;
        let mut geo = serde_json::Map::new();
        geo.insert("cylinders".into(), Value::from(c));
        geo.insert("heads".into(), Value::from(h));
        geo.insert("sectors".into(), Value::from(s));
        d.insert("geometry".into(), Value::Object(geo));
        let rule = if f.sized_by_chs() {
            "chs"
        } else {
            "current_size"
        };
        d.insert("size_from".into(), Value::from(rule));
        d.insert("saved_state".into(), Value::from(f.saved_state));
        d.insert(
            "footer_copy_at_start".into(),
            Value::from(self.footer_at_head),
        );
        if f.saved_state {
            info.features.push("saved_state".into());
        }
        if let Some(dy) = &self.dynamic {
            info.cluster_size = Some(dy.block_size);
            let d = &mut info.details;
            d.insert("block_size".into(), Value::from(dy.block_size));
            d.insert(
                "max_table_entries".into(),
                Value::from(dy.header.max_table_entries),
            );
            let used = dy
                .bat
                .iter()
                .filter(|e| e.load(Ordering::Relaxed) != UNALLOCATED)
                .count();
            d.insert("allocated_blocks".into(), Value::from(used));
        }
        if let (Some((name, candidates)), Some(dy)) = (&self.parent, &self.dynamic) {
            let d = &mut info.details;
            d.insert(
                "parent_uuid".into(),
                Value::from(uuid_string(&dy.header.parent_uuid)),
            );
            d.insert(
                "parent_name".into(),
                Value::from(dy.header.parent_name.clone()),
            );
            d.insert(
                "parent_timestamp".into(),
                Value::from(dy.header.parent_timestamp),
            );
            d.insert("parent_chosen".into(), Value::from(name.clone()));
            let locs: Vec<Value> = candidates
                .iter()
                .map(|c| Value::from(format!("{}: {}", c.source, c.written)))
                .collect();
            d.insert("parent_locators".into(), Value::Array(locs));
        }
        info
    }

    fn host_files(&self) -> Vec<Arc<HostFile>> {
        vec![self.file.clone()]
    }

    fn cache_id(&self) -> u64 {
        self.cache_id
    }

    fn as_write(&self) -> Option<&dyn super::WriteLayer> {
        match &self.writer {
            Some(_) if self.file.writable() => Some(self as &dyn super::WriteLayer),
            _ => None,
        }
    }
}
