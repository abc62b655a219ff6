//! The Parallels driver (Parallels Desktop / Virtuozzo / OpenVZ ploop
//! expanding images, `.hds`), read-only.
//!
//! A 64-byte little-endian header (magic `WithoutFreeSpace` or
//! `WithouFreSpacExt`, version 2, cluster size in sectors, BAT length, disk
//! size in sectors, the in-use marker, data offset, flags, extension
//! offset) is followed by the BAT: one 32-bit entry per cluster, zero for
//! a cluster that is not allocated (reads as zeros), otherwise the host
//! offset of the cluster — in sectors for `WithoutFreeSpace` images, in
//! clusters for `WithouFreSpacExt` ones (the variant for disks of 2 TB and
//! more). As in qemu: the old magic uses only the low 32 bits of the sector
//! count; clusters past the BAT read as zeros; an image left "in use" (not
//! closed cleanly) and the "empty" flag do not change what is read, they
//! are reported by `info`; the format extension (dirty bitmaps) is ignored.
//!
//! A bundle's `DiskDescriptor.xml` is recognised and refused with a hint
//! to open the `.hds` image it names: split bundles are not read yet.
//! Writing in place is not implemented: `--overlay` and `--snapshot` work.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::blockmap::{map_blocks, Block};
use super::detect::is_parallels_descriptor;
use super::parallels_bundle::Bundle;
use super::{BackingSpec, Format, Layer, LayerInfo, Mapping, OpenCtx};
use crate::endian::{le32, le32s, le64};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// Header length; the BAT follows it.
const HEADER_LEN: u64 = 64;
/// The in-use marker of an image open for writing (or not closed cleanly).
const INUSE_MAGIC: u32 = 0x746f_6e59;
/// Header flag: the image should be considered empty.
const FLAG_EMPTY: u32 = 1;
/// Largest cluster we accept, in sectors (qemu's bound: INT32_MAX / 513).
const MAX_TRACKS: u32 = i32::MAX as u32 / 513;

/// Opens a Parallels image.
pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Arc<dyn Layer>> {
    let mut head = vec![0u8; 1024];
    let n = file.read_at_most(&mut head, 0)?;
    if is_parallels_descriptor(&head[..n]) {
        let bundle = Bundle::open(file.clone(), ctx).map_err(|e| e.with_path(file.path()))?;
        return Ok(Arc::new(bundle));
    }
    let layer = Parallels::open(file.clone(), ctx).map_err(|e| e.with_path(file.path()))?;
    Ok(Arc::new(layer))
}

/// The parsed header.
#[derive(Debug, Clone)]
pub struct Header {
    /// True for `WithouFreSpacExt` (BAT in clusters).
    pub ext: bool,
    /// Geometry: heads.
    pub heads: u32,
    /// Geometry: cylinders.
    pub cylinders: u32,
    /// Cluster size in sectors.
    pub tracks: u32,
    /// BAT entries.
    pub bat_entries: u32,
    /// Disk size in sectors (after the old magic's 32-bit cut).
    pub sectors: u64,
    /// The in-use field.
    pub inuse: u32,
    /// Data area offset in sectors (0: after the BAT).
    pub data_off: u32,
    /// Flags.
    pub flags: u32,
    /// Format extension offset in sectors (0: none).
    pub ext_off: u64,
}

/// Largest block map loaded into memory (256 MiB of entries).
const MAX_MAP_ENTRIES: u32 = 64 << 20;

impl Header {
    /// Parses and checks a header against the file length.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header> {
        if b.len() < HEADER_LEN as usize {
            return Err(Error::corrupt(format!(
                "Parallels header truncated: the file has {} bytes, the header needs {HEADER_LEN}",
                b.len()
            )));
        }
        let ext = match &b[..16] {
            b"WithoutFreeSpace" => false,
            b"WithouFreSpacExt" => true,
            _ => return Err(Error::corrupt("no Parallels header magic")),
        };
        let version = le32(b, 16);
        if version != 2 {
            return Err(Error::unsupported(format!(
                "Parallels header version {version} is not supported (only 2)"
            )));
        }
        let raw_sectors = le64(b, 36);
        let h = Header {
            ext,
            heads: le32(b, 20),
            cylinders: le32(b, 24),
            tracks: le32(b, 28),
            bat_entries: le32(b, 32),
            sectors: if ext {
                raw_sectors
            } else {
                raw_sectors & 0xffff_ffff
            },
            inuse: le32(b, 44),
            data_off: le32(b, 48),
            flags: le32(b, 52),
            ext_off: le64(b, 56),
        };
        if h.tracks == 0 || h.tracks > MAX_TRACKS {
            return Err(Error::corrupt(format!(
                "Parallels cluster size of {} sectors is invalid",
                h.tracks
            )));
        }
        if h.sectors > u64::MAX / 512 {
            return Err(Error::corrupt(format!(
                "Parallels disk size of {} sectors overflows",
                h.sectors
            )));
        }
        if h.bat_end() > file_len {
            return Err(Error::corrupt(format!(
                "Parallels BAT of {} entries ends past the end of the file ({file_len} bytes)",
                h.bat_entries
            )));
        }
        Ok(h)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        u64::from(self.tracks) * 512
    }

    /// Where the BAT ends (the first byte a cluster may use).
    fn bat_end(&self) -> u64 {
        HEADER_LEN + u64::from(self.bat_entries) * 4
    }

    /// Guest disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.sectors * 512
    }
}

/// An open Parallels image.
pub struct Parallels {
    file: Arc<HostFile>,
    header: Header,
    bat: Vec<u32>,
    cache_id: u64,
}

impl Parallels {
    /// Parses the header and loads the BAT.
    pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Parallels> {
        let mut head = vec![0u8; 1024];
        let n = file.read_at_most(&mut head, 0)?;
        head.truncate(n);
        let header = Header::parse(&head, file.len())?;
        // The BAT lies inside the file (checked), so its size is bounded by it.
        // A sparse hostile file can be huge without using disk: bound the
        // memory as well (64 Mi entries: many TiB at any common block size).
        if header.bat_entries > MAX_MAP_ENTRIES {
            return Err(Error::corrupt(format!(
                "BAT of {} entries is larger than vdiskfs loads (at most {MAX_MAP_ENTRIES})",
                header.bat_entries
            ))
            .with_path(file.path()));
        }
        let mut raw = vec![0u8; header.bat_entries as usize * 4];
        file.read_exact_at(&mut raw, HEADER_LEN)?;
        let bat = le32s(&raw).collect();
        Ok(Parallels {
            file,
            header,
            bat,
            cache_id: ctx.caches.new_layer_id(),
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn block(&self, idx: u64) -> Result<Block> {
        let Some(&entry) = self.bat.get(idx as usize) else {
            // Past the BAT: qemu reads zeros.
            return Ok(Block::Zero);
        };
        if entry == 0 {
            return Ok(Block::Zero);
        }
        let unit = if self.header.ext {
            self.header.cluster_size()
        } else {
            512
        };
        let host = u64::from(entry) * unit;
        if host < self.header.bat_end() || host >= self.file.len() {
            return Err(Error::corrupt(format!(
                "Parallels BAT entry {idx} points at {host:#x}, outside the data area (file of {} bytes)",
                self.file.len()
            )));
        }
        Ok(Block::Data(host))
    }
}

impl Layer for Parallels {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn format(&self) -> Format {
        Format::Parallels
    }

    fn virtual_size(&self) -> u64 {
        self.header.disk_size()
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let cs = self.header.cluster_size();
        map_blocks(
            &self.file,
            cs,
            self.bat.len() as u64,
            offset,
            max_len,
            |i| self.block(i),
        )
        .map_err(|e| e.at_guest(offset).with_path(self.file.path()))
    }

    fn backing(&self) -> Option<BackingSpec> {
        None
    }

    fn info(&self) -> LayerInfo {
        let h = &self.header;
        let mut info = LayerInfo::new(Format::Parallels, h.disk_size());
        let magic = if h.ext {
            "WithouFreSpacExt"
        } else {
            "WithoutFreeSpace"
        };
        info.subformat = Some(magic.into());
        info.cluster_size = Some(h.cluster_size());
        if h.inuse == INUSE_MAGIC {
            info.features.push("dirty".into());
        }
        if h.flags & FLAG_EMPTY != 0 {
            info.features.push("empty_flag".into());
        }
        if h.ext_off != 0 {
            info.features.push("format_extension".into());
        }
        let d = &mut info.details;
        d.insert("heads".into(), Value::from(h.heads));
        d.insert("cylinders".into(), Value::from(h.cylinders));
        d.insert("cluster_sectors".into(), Value::from(h.tracks));
        d.insert("bat_entries".into(), Value::from(h.bat_entries));
        d.insert("data_off".into(), Value::from(h.data_off));
        d.insert("flags".into(), Value::from(h.flags));
        d.insert("inuse".into(), Value::from(format!("{:#010x}", h.inuse)));
        info
    }

    fn host_files(&self) -> Vec<Arc<HostFile>> {
        vec![self.file.clone()]
    }

    fn cache_id(&self) -> u64 {
        self.cache_id
    }
}
