//! Hosted sparse extents (`KDMV`): monolithicSparse, twoGbMaxExtentSparse
//! and streamOptimized.
//!
//! The 512-byte header gives the capacity, grain size, grain-table size and
//! the sector numbers of the grain directory (GD) and its redundant copy.
//! Stream-optimized extents compress every grain (zlib, behind a 12-byte
//! grain marker: LBA u64, size u32) and may put the GD at the end of the
//! file, announced by `gdOffset == GD_AT_END` in the header: the real header
//! is then the footer in the second-to-last sector, after a footer marker
//! and before the end-of-stream marker.

use std::sync::Arc;

use super::extent::{
    GrainTables, GteCodec, SparseInfo, GD_BAD, GD_NONE, GD_ZERO, MAX_GD_ENTRIES, MAX_GRAIN_SECTORS,
    MAX_HOST_OFFSET,
};
use crate::compress::{self, Method};
use crate::endian::{le16, le32, le32s, le64};
use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;

/// `KDMV` magic as the first four bytes of a hosted sparse extent.
pub const MAGIC: &[u8; 4] = b"KDMV";
/// `gdOffset` value meaning "the grain directory is found via the footer".
pub const GD_AT_END: u64 = u64::MAX;

const FLAG_RGD: u32 = 1 << 1;
const FLAG_ZEROED_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESS_DEFLATE: u16 = 1;

const MARKER_EOS: u32 = 0;
const MARKER_FOOTER: u32 = 3;

/// Most grain-table entries accepted (512 is standard; COWD uses 4096).
pub const MAX_GT_ENTRIES: u64 = 4096;

/// A parsed `KDMV` header.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Version (1, 2 or 3).
    pub version: u32,
    /// Flags.
    pub flags: u32,
    /// Capacity in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain: u64,
    /// Embedded descriptor sector.
    pub desc_offset: u64,
    /// Embedded descriptor size in sectors.
    pub desc_size: u64,
    /// Grain-table entries per table.
    pub gt_entries: u32,
    /// Redundant GD sector.
    pub rgd_offset: u64,
    /// GD sector (or [`GD_AT_END`]).
    pub gd_offset: u64,
    /// Sectors before the first grain.
    pub overhead: u64,
    /// Compression algorithm (0 none, 1 deflate).
    pub compress: u16,
}

impl Header {
    /// Parses a 512-byte header sector; `None` without the magic.
    pub fn parse(b: &[u8; 512]) -> Option<Header> {
        if &b[0..4] != MAGIC {
            return None;
        }
        Some(Header {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            gt_entries: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
            compress: le16(b, 77),
        })
    }

    /// Reads and parses the header at the start of `file`.
    pub fn read(file: &HostFile) -> Result<Header> {
        let mut b = [0u8; 512];
        file.read_exact_at(&mut b, 0)?;
        Header::parse(&b).ok_or_else(|| Error::corrupt("not a VMDK sparse extent (no KDMV magic)"))
    }

    /// Whether grains are compressed.
    pub fn compressed(&self) -> bool {
        self.compress == COMPRESS_DEFLATE
    }
}

/// Reads the embedded descriptor of a sparse extent, if it has one.
pub fn embedded_descriptor(file: &HostFile, h: &Header) -> Result<Option<Vec<u8>>> {
    if h.desc_offset == 0 || h.desc_size == 0 {
        return Ok(None);
    }
    let off = h.desc_offset.checked_mul(512);
    let len = h.desc_size.checked_mul(512);
    let (Some(off), Some(len)) = (off, len) else {
        return Err(Error::corrupt("embedded descriptor location overflows"));
    };
    let len = len.min(super::descriptor::MAX_DESCRIPTOR);
    if off >= file.len() {
        return Err(Error::corrupt(format!(
            "embedded descriptor at {off:#x} lies past the end of the file"
        )));
    }
    let len = len.min(file.len() - off);
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, off)?;
    Ok(Some(buf))
}

/// Reads the footer header of a stream-optimized extent.
fn read_footer(file: &HostFile) -> Result<Header> {
    let missing = |why: &str| {
        Error::corrupt(format!(
            "streamOptimized footer not found ({why}); the file is probably truncated"
        ))
    };
    if file.len() < 1536 + 512 {
        return Err(missing("file too short"));
    }
    let mut b = [0u8; 1536];
    file.read_exact_at(&mut b, file.len() - 1536)?;
    let mut sector = [0u8; 512];
    sector.copy_from_slice(&b[512..1024]);
    let h = Header::parse(&sector)
        .ok_or_else(|| missing("no KDMV header copy before the last sector"))?;
    let marker_ok = le32(&b, 8) == 0 && le32(&b, 12) == MARKER_FOOTER;
    let eos_ok = le64(&b, 1024) == 0 && le32(&b, 1032) == 0 && le32(&b, 1036) == MARKER_EOS;
    if !marker_ok || !eos_ok {
        log::warn!(
            "{}: streamOptimized footer markers are not as expected; using the footer header anyway",
            file.path().display()
        );
    }
    if h.gd_offset == GD_AT_END {
        return Err(missing("the footer also says GD_AT_END"));
    }
    Ok(h)
}

/// Reads one grain directory of `entries` 32-bit sector numbers at sector
/// `sector`, decoded to byte offsets; `None` if it lies outside the file.
fn read_gd(file: &HostFile, sector: u64, entries: u64, zeroed: bool) -> Result<Option<Vec<u64>>> {
    let Some(off) = sector.checked_mul(512).filter(|&o| o <= MAX_HOST_OFFSET) else {
        return Ok(None);
    };
    let bytes = entries * 4;
    if sector == 0 || off.checked_add(bytes).is_none_or(|e| e > file.len()) {
        return Ok(None);
    }
    let mut raw = vec![0u8; bytes as usize];
    file.read_exact_at(&mut raw, off)?;
    Ok(Some(
        le32s(&raw)
            .map(|e| match e {
                0 => GD_NONE,
                1 if zeroed => GD_ZERO,
                s => u64::from(s) * 512,
            })
            .collect(),
    ))
}

/// Grain tables of at most this many bytes in all are fetched at open.
const PREFETCH_GT_BYTES: u64 = 4 << 20;

/// Hints the grain tables of `gd` (if they are few) to the host file: a
/// small image's first reads then find its tables already fetched.
fn prefetch_tables(file: &HostFile, gd: &[u64], gt_bytes: u64) {
    let tables: Vec<(u64, u64)> = gd
        .iter()
        .filter(|&&o| !matches!(o, GD_NONE | GD_ZERO | GD_BAD))
        .map(|&o| (o, gt_bytes))
        .collect();
    if (tables.len() as u64).saturating_mul(gt_bytes) <= PREFETCH_GT_BYTES {
        file.prefetch(&tables);
    }
}

/// True when every table of `gd` lies inside the file.
fn gd_sane(gd: &[u64], gt_bytes: u64, file_len: u64) -> bool {
    gd.iter().all(|&o| {
        matches!(o, GD_NONE | GD_ZERO)
            || (o != GD_BAD && o.checked_add(gt_bytes).is_some_and(|e| e <= file_len))
    })
}

/// Opens the hosted sparse extent in `file` covering `capacity` bytes
/// (from the descriptor; `None` = the header's capacity).
pub fn open(
    file: Arc<HostFile>,
    capacity: Option<u64>,
    cache_id: u64,
    key_base: u64,
) -> Result<(GrainTables, SparseInfo, Header)> {
    let first = Header::read(&file)?;
    let mut footer = false;
    let h = if first.gd_offset == GD_AT_END {
        footer = true;
        read_footer(&file)?
    } else {
        first
    };
    if !(1..=3).contains(&h.version) {
        return Err(Error::unsupported(format!(
            "VMDK sparse extent version {} is not supported (1, 2 and 3 are)",
            h.version
        )));
    }
    if h.grain == 0 || !h.grain.is_power_of_two() || h.grain > MAX_GRAIN_SECTORS {
        return Err(Error::corrupt(format!(
            "grain size of {} sectors is invalid (a power of two up to {MAX_GRAIN_SECTORS})",
            h.grain
        )));
    }
    let gt_entries = u64::from(h.gt_entries);
    if gt_entries == 0 || gt_entries > MAX_GT_ENTRIES {
        return Err(Error::corrupt(format!(
            "{gt_entries} grain-table entries per table is invalid (1..={MAX_GT_ENTRIES}; 512 is standard)"
        )));
    }
    if h.flags & FLAG_COMPRESSED != 0 && h.compress > COMPRESS_DEFLATE {
        return Err(Error::unsupported(format!(
            "compression algorithm {} is not supported (only deflate)",
            h.compress
        )));
    }
    let header_bytes = h
        .capacity
        .checked_mul(512)
        .ok_or_else(|| Error::corrupt("capacity overflows"))?;
    if let Some(c) = capacity {
        if c != header_bytes {
            log::warn!(
                "{}: extent header says {} sectors, the descriptor {}; using the descriptor",
                file.path().display(),
                h.capacity,
                c / 512
            );
        }
    }
    let cap = capacity.unwrap_or(header_bytes);
    let grain_size = h.grain * 512;
    let cover = gt_entries * grain_size;
    // The tables cover the header's capacity; a larger descriptor size
    // reads the rest as unallocated.
    let entries = header_bytes.div_ceil(cover);
    if entries > MAX_GD_ENTRIES {
        return Err(Error::corrupt(format!(
            "grain directory of {entries} entries is too large"
        )));
    }
    let zeroed = h.flags & FLAG_ZEROED_GRAIN != 0;
    let gt_bytes = gt_entries * 4;
    // Both directories at once (one round trip for a remote file).
    let mut gds = vec![(h.gd_offset.saturating_mul(512), entries * 4)];
    if h.flags & FLAG_RGD != 0 && h.rgd_offset != 0 {
        gds.push((h.rgd_offset.saturating_mul(512), entries * 4));
    }
    file.prefetch(&gds);
    let primary = read_gd(&file, h.gd_offset, entries, zeroed)?;
    let redundant = if h.flags & FLAG_RGD != 0 && h.rgd_offset != 0 {
        read_gd(&file, h.rgd_offset, entries, zeroed)?
    } else {
        None
    };
    let mut used_redundant = false;
    let (p_at, r_at) = (
        h.gd_offset.wrapping_mul(512),
        h.rgd_offset.wrapping_mul(512),
    );
    let (gd, rgd, gd_at) = match (primary, redundant) {
        (Some(p), None) => (p, None, (p_at, 0)),
        (Some(p), Some(r)) if gd_sane(&p, gt_bytes, file.len()) => (p, Some(r), (p_at, r_at)),
        (Some(p), Some(r)) => {
            if gd_sane(&r, gt_bytes, file.len()) {
                log::warn!(
                    "{}: primary grain directory points outside the file; using the redundant one",
                    file.path().display()
                );
                used_redundant = true;
                (r, Some(p), (r_at, p_at))
            } else {
                (p, Some(r), (p_at, r_at))
            }
        }
        (None, Some(r)) => {
            log::warn!(
                "{}: primary grain directory at sector {} is unreadable; using the redundant one",
                file.path().display(),
                h.gd_offset
            );
            used_redundant = true;
            (r, None, (r_at, 0))
        }
        (None, None) if entries == 0 => (Vec::new(), None, (0, 0)),
        (None, None) => {
            return Err(Error::corrupt(format!(
            "grain directory at sector {:#x} ({entries} entries) lies outside the file ({} bytes)",
            h.gd_offset,
            file.len()
        )))
        }
    };
    prefetch_tables(&file, &gd, gt_bytes);
    let info = SparseInfo {
        kind: "KDMV",
        version: u64::from(h.version),
        flags: u64::from(h.flags),
        capacity_sectors: h.capacity,
        compressed: h.compressed(),
        markers: h.flags & FLAG_MARKERS != 0,
        footer,
        gd_at,
        descriptor_at: (
            h.desc_offset.saturating_mul(512),
            h.desc_size.saturating_mul(512),
        ),
    };
    let tables = GrainTables::new(
        file,
        gd,
        rgd,
        gt_entries,
        grain_size,
        cap.min(header_bytes),
        GteCodec::Kdmv {
            zeroed_grain: zeroed,
            compressed: h.compressed(),
        },
        cache_id,
        key_base,
        used_redundant,
    );
    Ok((tables, info, h))
}

/// Decodes the compressed grain of `grain` bytes whose marker (or data) is
/// at `host` into `out` (the whole grain or a prefix). The marker's size is
/// checked against the grain size and the file length before anything is
/// allocated.
pub fn decompress_grain(
    file: &HostFile,
    host: u64,
    markers: bool,
    grain: u64,
    out: &mut [u8],
) -> Result<()> {
    // Deflate can expand incompressible data slightly; allow generous slack.
    let cap = grain * 2 + 4096;
    let left = file.len().saturating_sub(host);
    let (data_at, size) = if markers {
        let mut m = [0u8; 12];
        file.read_exact_at(&mut m, host)?;
        let size = u64::from(le32(&m, 8));
        if size == 0 {
            return Err(Error::corrupt(
                "grain table points at a metadata marker, not a grain",
            ));
        }
        if size > cap || size > left.saturating_sub(12) {
            return Err(Error::corrupt(format!(
                "grain marker claims {size} compressed bytes (grain is {grain}, {left} bytes left in file)"
            )));
        }
        (host + 12, size)
    } else {
        (host, cap.min(left))
    };
    if size == 0 {
        return Err(Error::corrupt(
            "compressed grain lies past the end of the file",
        ));
    }
    let mut buf = vec![0u8; size as usize];
    file.read_exact_at(&mut buf, data_at)?;
    compress::decompress(Method::Zlib, &buf, out, true).map_err(|e| {
        if e.kind() == ErrorKind::Corrupt {
            Error::corrupt(format!("compressed grain does not decode: {}", e.message()))
        } else {
            e
        }
    })
}
