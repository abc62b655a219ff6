//! The VDI driver (VirtualBox): static, dynamic and differencing images;
//! writes in place are in [`write`](mod@write).
//!
//! A VDI file starts with a text preamble, the signature `0xbeda107f` at
//! 0x40 and a version-1.1 header (all little-endian): image type, the
//! offsets of the block map and of the data area, the disk size, the block
//! size and the per-block "extra" bytes, and four UUIDs (this image, its
//! last modification, its parent, the parent's last modification). The
//! block map has one 32-bit entry per block: the index of the block in the
//! data area, `0xffffffff` for a block that is not allocated (zeros, or the
//! parent's data in a differencing image) or `0xfffffffe` for a block that
//! reads as zeros. Block `n` of the data area starts `extra` bytes into
//! `data_offset + n * (extra + block_size)`.
//!
//! A differencing image names its parent only by UUID: the parent is the
//! `.vdi` file beside it whose own UUID matches; it is then opened by the
//! chain through the same [`crate::policy::OpenPolicy`] as any backing file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::Value;

use super::blockmap::{map_blocks, Block};
use super::{BackingSpec, Format, Layer, LayerInfo, Mapping, OpenCtx};
use crate::endian::{le32, le32s, le64};
use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;

/// Size of the header we read (preamble, signature, version, v1.1 header).
const HEADER_LEN: usize = 0x1c8;
/// The v1.1 header's own length field must cover at least this much.
const MIN_HEADER_SIZE: u32 = (HEADER_LEN - 0x48) as u32;
/// The only header version we read: 1.1.
const VERSION_1_1: u32 = 0x0001_0001;
/// Block map entry: not allocated.
const BLOCK_FREE: u32 = 0xffff_ffff;
/// Block map entry: reads as zeros.
const BLOCK_ZERO: u32 = 0xffff_fffe;
/// Largest block size we accept (VirtualBox and qemu use 1 MiB).
const MAX_BLOCK: u32 = 256 << 20;
/// How many directory entries we look at when searching for a parent.
const MAX_SCAN: usize = 4096;

/// Offset of the image's own UUID.
const UUID_CREATE_AT: usize = 0x188;

#[path = "vdi_write.rs"]
pub mod write;

/// Opens a VDI image.
pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Arc<dyn Layer>> {
    let layer = Vdi::open(file.clone(), ctx).map_err(|e| e.with_path(file.path()))?;
    Ok(Arc::new(layer))
}

/// The image type field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageType {
    /// Dynamically allocated ("normal").
    Normal,
    /// Preallocated ("fixed", qemu's static).
    Fixed,
    /// Differencing image over a parent named by UUID.
    Diff,
}

/// Largest block map loaded into memory (256 MiB of entries).
const MAX_MAP_ENTRIES: u32 = 64 << 20;

impl ImageType {
    /// The name VirtualBox's headers use.
    pub fn name(self) -> &'static str {
        match self {
            ImageType::Normal => "normal",
            ImageType::Fixed => "fixed",
            ImageType::Diff => "diff",
        }
    }
}

/// The parsed header.
#[derive(Debug, Clone)]
pub struct Header {
    /// The image type.
    pub image_type: ImageType,
    /// The flags field (unused by readers, shown by `info`).
    pub flags: u32,
    /// The free-text comment.
    pub comment: String,
    /// Byte offset of the block map.
    pub blocks_offset: u64,
    /// Byte offset of the data area.
    pub data_offset: u64,
    /// The legacy geometry's sector size.
    pub sector_size: u32,
    /// Guest disk size in bytes.
    pub disk_size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Bytes before each block's data in the data area.
    pub block_extra: u32,
    /// Entries in the block map.
    pub blocks: u32,
    /// Blocks the header says are allocated.
    pub blocks_allocated: u32,
    /// This image's UUID.
    pub uuid: [u8; 16],
    /// The UUID of the last modification.
    pub modify_uuid: [u8; 16],
    /// The parent's UUID (differencing images).
    pub parent_uuid: [u8; 16],
    /// The parent's modification UUID when the child was made.
    pub parent_modify_uuid: [u8; 16],
}

fn uuid_at(b: &[u8], at: usize) -> [u8; 16] {
    let mut u = [0u8; 16];
    u.copy_from_slice(&b[at..at + 16]);
    u
}

/// Formats a UUID stored as VirtualBox stores it (the first three fields
/// little-endian, as a Windows GUID).
pub fn uuid_string(u: &[u8; 16]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u[3], u[2], u[1], u[0], u[5], u[4], u[7], u[6], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]
    )
}

impl Header {
    /// Parses and checks a header against the file length.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header> {
        if b.len() < HEADER_LEN {
            return Err(Error::corrupt(format!(
                "VDI header truncated: the file has {} bytes, the header needs {HEADER_LEN}",
                b.len()
            )));
        }
        if le32(b, 0x40) != 0xbeda_107f {
            return Err(Error::corrupt("no VDI signature at offset 0x40"));
        }
        let version = le32(b, 0x44);
        if version != VERSION_1_1 {
            return Err(Error::unsupported(format!(
                "VDI header version {}.{} is not supported (only 1.1)",
                version >> 16,
                version & 0xffff
            )));
        }
        let size = le32(b, 0x48);
        if size < MIN_HEADER_SIZE {
            return Err(Error::corrupt(format!(
                "VDI header size {size} is smaller than the version 1.1 header ({MIN_HEADER_SIZE})"
            )));
        }
        let image_type = match le32(b, 0x4c) {
            1 => ImageType::Normal,
            2 => ImageType::Fixed,
            4 => ImageType::Diff,
            3 => {
                return Err(Error::unsupported(
                    "VDI undo images (type 3) are not supported",
                ))
            }
            t => return Err(Error::corrupt(format!("unknown VDI image type {t}"))),
        };
        let comment_raw = &b[0x54..0x154];
        let comment_end = comment_raw.iter().position(|&c| c == 0).unwrap_or(256);
        let h = Header {
            image_type,
            flags: le32(b, 0x50),
            comment: String::from_utf8_lossy(&comment_raw[..comment_end]).into_owned(),
            blocks_offset: u64::from(le32(b, 0x154)),
            data_offset: u64::from(le32(b, 0x158)),
            sector_size: le32(b, 0x168),
            disk_size: le64(b, 0x170),
            block_size: le32(b, 0x178),
            block_extra: le32(b, 0x17c),
            blocks: le32(b, 0x180),
            blocks_allocated: le32(b, 0x184),
            uuid: uuid_at(b, UUID_CREATE_AT),
            modify_uuid: uuid_at(b, 0x198),
            parent_uuid: uuid_at(b, 0x1a8),
            parent_modify_uuid: uuid_at(b, 0x1b8),
        };
        h.check(file_len)?;
        Ok(h)
    }

    fn check(&self, file_len: u64) -> Result<()> {
        let bad = |m: String| Err(Error::corrupt(m));
        if self.sector_size != 512 {
            return Err(Error::unsupported(format!(
                "VDI sector size {} is not supported (only 512)",
                self.sector_size
            )));
        }
        if !self.block_size.is_power_of_two() || !(512..=MAX_BLOCK).contains(&self.block_size) {
            return bad(format!(
                "VDI block size {} is not a power of two between 512 and {MAX_BLOCK}",
                self.block_size
            ));
        }
        if self.block_extra > MAX_BLOCK {
            return bad(format!(
                "VDI block extra data of {} bytes is absurd",
                self.block_extra
            ));
        }
        if self.disk_size % 512 != 0 {
            return bad(format!(
                "VDI disk size {} is not a multiple of 512",
                self.disk_size
            ));
        }
        let covered = u64::from(self.blocks) * u64::from(self.block_size);
        if covered < self.disk_size {
            return bad(format!(
                "VDI has {} blocks of {} bytes, too few for its disk size {}",
                self.blocks, self.block_size, self.disk_size
            ));
        }
        let map_end = self.blocks_offset + u64::from(self.blocks) * 4;
        if self.blocks_offset < HEADER_LEN as u64 || map_end > file_len {
            return bad(format!(
                "VDI block map ({} entries at {:#x}) lies outside the file ({file_len} bytes)",
                self.blocks, self.blocks_offset
            ));
        }
        if self.data_offset < HEADER_LEN as u64 {
            return bad(format!(
                "VDI data offset {:#x} lies inside the header",
                self.data_offset
            ));
        }
        if self.image_type == ImageType::Diff && self.parent_uuid == [0u8; 16] {
            return bad("differencing VDI has no parent UUID".into());
        }
        Ok(())
    }
}

/// An open VDI image.
pub struct Vdi {
    file: Arc<HostFile>,
    header: Header,
    /// The block map (changed only under the writer's allocation lock).
    map: Vec<AtomicU32>,
    /// The parent's file name (beside this image), for differencing images.
    parent: Option<String>,
    cache_id: u64,
    /// The end of the host file as the driver knows it: its length at
    /// open, grown by every allocation before an entry points there.
    end: AtomicU64,
    /// The write side, when opened writable.
    writer: Option<write::Writer>,
}

impl Vdi {
    /// Parses the header, loads the block map and finds a parent.
    pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Vdi> {
        let mut head = vec![0u8; HEADER_LEN];
        let n = file.read_at_most(&mut head, 0)?;
        head.truncate(n);
        let header = Header::parse(&head, file.len())?;
        // The map lies inside the file (checked), so its size is bounded by it.
        // A sparse hostile file can be huge without using disk: bound the
        // memory as well (64 Mi entries: many TiB at any common block size).
        if header.blocks > MAX_MAP_ENTRIES {
            return Err(Error::corrupt(format!(
                "block map of {} entries is larger than vdiskfs loads (at most {MAX_MAP_ENTRIES})",
                header.blocks
            ))
            .with_path(file.path()));
        }
        let mut raw = vec![0u8; header.blocks as usize * 4];
        file.read_exact_at(&mut raw, header.blocks_offset)?;
        let map = le32s(&raw).map(AtomicU32::new).collect();
        let parent = match header.image_type {
            ImageType::Diff => Some(find_parent(file.path(), &header.parent_uuid)?),
            _ => None,
        };
        let mut vdi = Vdi {
            end: AtomicU64::new(file.len()),
            file,
            header,
            map,
            parent,
            cache_id: ctx.caches.new_layer_id(),
            writer: None,
        };
        if ctx.writable {
            vdi.writer = Some(write::Writer::new(&vdi)?);
        }
        Ok(vdi)
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn block(&self, idx: u64) -> Result<Block> {
        let entry = self
            .map
            .get(idx as usize)
            .ok_or_else(|| Error::corrupt(format!("block {idx} is beyond the VDI block map")))?
            .load(Ordering::Acquire);
        match entry {
            BLOCK_FREE => Ok(Block::Unallocated),
            BLOCK_ZERO => Ok(Block::Zero),
            n => {
                let h = &self.header;
                let stride = u64::from(h.block_size) + u64::from(h.block_extra);
                let host = h.data_offset + u64::from(n) * stride + u64::from(h.block_extra);
                let end = self.end.load(Ordering::Acquire);
                if host >= end {
                    return Err(Error::corrupt(format!(
                        "VDI block {idx} points at data block {n} (offset {host:#x}), past the end of the file ({end} bytes)"
                    )));
                }
                Ok(Block::Data(host))
            }
        }
    }
}

/// Finds the `.vdi` file beside `child` whose own UUID is `uuid`.
fn find_parent(child: &Path, uuid: &[u8; 16]) -> Result<String> {
    let dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let not_found = || {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "differencing VDI: no .vdi file in {} has the parent UUID {}",
                dir.display(),
                uuid_string(uuid)
            ),
        )
    };
    let entries = std::fs::read_dir(&dir).map_err(|_| not_found())?;
    let own = child.file_name();
    for entry in entries.take(MAX_SCAN).flatten() {
        let name = entry.file_name();
        let Some(s) = name.to_str() else { continue };
        if Some(name.as_os_str()) == own || !s.to_ascii_lowercase().ends_with(".vdi") {
            continue;
        }
        let path = entry.path();
        // Only regular files: opening a FIFO would block.
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let Ok(f) = std::fs::File::open(&path) else {
            continue;
        };
        let mut head = [0u8; UUID_CREATE_AT + 16];
        if std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).is_err() {
            continue;
        }
        if le32(&head, 0x40) == 0xbeda_107f && head[UUID_CREATE_AT..] == uuid[..] {
            return Ok(s.to_string());
        }
    }
    Err(not_found())
}

impl Layer for Vdi {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn format(&self) -> Format {
        Format::Vdi
    }

    fn virtual_size(&self) -> u64 {
        self.header.disk_size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let bs = u64::from(self.header.block_size);
        let (m, n) = map_blocks(
            &self.file,
            bs,
            self.map.len() as u64,
            offset,
            max_len,
            |i| self.block(i),
        )
        .map_err(|e| e.at_guest(offset).with_path(self.file.path()))?;
        // A static or dynamic image has no parent: unallocated reads as zeros.
        let m = match (m, &self.parent) {
            (Mapping::Backing, None) => Mapping::Zero,
            (m, _) => m,
        };
        Ok((m, n))
    }

    fn backing(&self) -> Option<BackingSpec> {
        self.parent.as_ref().map(|name| BackingSpec {
            name: name.clone(),
            format: Some(Format::Vdi),
            parent_cid: None,
        })
    }

    fn info(&self) -> LayerInfo {
        let h = &self.header;
        let mut info = LayerInfo::new(Format::Vdi, h.disk_size);
        info.subformat = Some(h.image_type.name().into());
        info.cluster_size = Some(u64::from(h.block_size));
        let d = &mut info.details;
        d.insert("version".into(), Value::from("1.1"));
        d.insert("image_type".into(), Value::from(h.image_type.name()));
        d.insert("uuid".into(), Value::from(uuid_string(&h.uuid)));
        d.insert(
            "modify_uuid".into(),
            Value::from(uuid_string(&h.modify_uuid)),
        );
        if h.image_type == ImageType::Diff {
            d.insert(
                "parent_uuid".into(),
                Value::from(uuid_string(&h.parent_uuid)),
            );
            d.insert(
                "parent_modify_uuid".into(),
                Value::from(uuid_string(&h.parent_modify_uuid)),
            );
            d.insert(
                "parent_file".into(),
                self.parent.clone().map_or(Value::Null, Value::from),
            );
        }
        d.insert("block_size".into(), Value::from(h.block_size));
        d.insert("block_extra".into(), Value::from(h.block_extra));
        d.insert("sector_size".into(), Value::from(h.sector_size));
        d.insert("blocks".into(), Value::from(h.blocks));
        d.insert("blocks_allocated".into(), Value::from(h.blocks_allocated));
        d.insert("comment".into(), Value::from(h.comment.clone()));
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
