//! Extents and the two-level grain tables shared by every sparse flavour.
//!
//! All three sparse extent kinds (hosted `KDMV`, ESXi `COWD`, ESXi
//! seSparse) have the same shape: a grain directory (GD) whose entries
//! locate grain tables (GT), whose entries locate grains. They differ in
//! entry width and in how an entry is decoded; [`GrainTables`] holds the
//! common part and [`GteCodec`] the differences. Grain tables are read on
//! demand through the shared metadata cache as raw bytes.
//!
//! The limits and facts every flavour shares ([`SparseInfo`],
//! [`MAX_GRAIN_SECTORS`], [`MAX_GD_ENTRIES`]) live here too, so the flavour
//! parsers (`sparse`, `cowd`, `sesparse`) depend on this module and never
//! the other way round.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::descriptor::ExtentLine;
use crate::cache::Caches;
use crate::endian::{get_le32, get_le64};
use crate::engine::table_cache::TableCache;
use crate::error::{Error, Result};
use crate::host::HostFile;

/// Extent index bits are stored above this bit in cache keys.
pub const KEY_SHIFT: u32 = 52;

/// Largest host offset a table or grain may have (so it fits a cache key).
pub const MAX_HOST_OFFSET: u64 = (1 << KEY_SHIFT) - 1;

/// Decoded grain-directory entry: no grain table.
pub const GD_NONE: u64 = 0;
/// Decoded grain-directory entry: the whole table reads as zeros.
pub const GD_ZERO: u64 = u64::MAX - 1;
/// Decoded grain-directory entry: the entry is invalid.
pub const GD_BAD: u64 = u64::MAX;

/// Largest grain accepted: 2 MiB (real files use 64 KiB).
pub const MAX_GRAIN_SECTORS: u64 = 4096;
/// Most grain-directory entries accepted (enough for 64 TiB in 512-byte grains).
pub const MAX_GD_ENTRIES: u64 = 32 << 20;

/// Facts about a sparse extent kept for `info` and decompression.
#[derive(Debug, Clone)]
pub struct SparseInfo {
    /// `KDMV`, `COWD` or `seSparse`.
    pub kind: &'static str,
    /// Header version.
    pub version: u64,
    /// Header flags.
    pub flags: u64,
    /// Capacity in sectors as the header says.
    pub capacity_sectors: u64,
    /// Grains are zlib-compressed.
    pub compressed: bool,
    /// Grains carry markers.
    pub markers: bool,
    /// The GD was found through the footer.
    pub footer: bool,
    /// Byte offsets of the grain directories the tables hold (`gd`, then
    /// `rgd`), for the writer; 0 where there is none.
    pub gd_at: (u64, u64),
    /// Byte offset and length of the embedded descriptor ((0, 0): none).
    pub descriptor_at: (u64, u64),
}

impl SparseInfo {
    /// The facts of an uncompressed extent without markers, footer or
    /// embedded descriptor whose writer finds no directory offsets here
    /// (COWD, seSparse).
    pub fn plain(kind: &'static str, version: u64, flags: u64, capacity_sectors: u64) -> Self {
        SparseInfo {
            kind,
            version,
            flags,
            capacity_sectors,
            compressed: false,
            markers: false,
            footer: false,
            gd_at: (0, 0),
            descriptor_at: (0, 0),
        }
    }
}

/// What one grain-table entry says about its grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Not allocated here: the parent answers.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Stored uncompressed at this host byte offset.
    Data(u64),
    /// Stored compressed (with or without a marker) at this host byte offset.
    Compressed(u64),
    /// The entry cannot be decoded.
    Bad(u64),
}

/// How grain-table entries of one extent kind are decoded.
#[derive(Debug, Clone, Copy)]
pub enum GteCodec {
    /// Hosted sparse: 32-bit sector numbers; 1 is a zeroed grain when the
    /// zeroed-grain flag is set; grains are compressed in stream files.
    Kdmv {
        /// The zeroed-grain flag is set.
        zeroed_grain: bool,
        /// Grains are compressed.
        compressed: bool,
    },
    /// ESXi COWD: 32-bit sector numbers.
    Cowd,
    /// ESXi seSparse: 64-bit entries with a type nibble.
    SeSparse {
        /// Byte offset of the grain area.
        grains_offset: u64,
    },
}

impl GteCodec {
    /// Bytes per table entry.
    pub fn entry_size(self) -> usize {
        match self {
            GteCodec::SeSparse { .. } => 8,
            _ => 4,
        }
    }

    fn decode(self, raw: u64, grain_size: u64) -> Grain {
        match self {
            GteCodec::Kdmv {
                zeroed_grain,
                compressed,
            } => match raw {
                0 => Grain::Unallocated,
                1 if zeroed_grain => Grain::Zero,
                s if compressed => Grain::Compressed(s * 512),
                s => Grain::Data(s * 512),
            },
            GteCodec::Cowd => match raw {
                0 => Grain::Unallocated,
                s => Grain::Data(s * 512),
            },
            GteCodec::SeSparse { grains_offset } => match raw >> 60 {
                0 if raw == 0 => Grain::Unallocated,
                1 | 2 => Grain::Zero,
                3 => {
                    let index = ((raw & 0x0fff_0000_0000_0000) >> 48)
                        | ((raw & 0x0000_ffff_ffff_ffff) << 12);
                    match index
                        .checked_mul(grain_size)
                        .and_then(|o| o.checked_add(grains_offset))
                    {
                        Some(o) => Grain::Data(o),
                        None => Grain::Bad(raw),
                    }
                }
                _ => Grain::Bad(raw),
            },
        }
    }
}

/// Where an extent-relative run lives, before it is turned into a
/// [`crate::format::Mapping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// Not allocated: the parent answers.
    Backing,
    /// Reads as zeros.
    Zero,
    /// At this host byte offset.
    Data(u64),
    /// Inside the compressed grain starting at extent-relative `grain_start`
    /// whose marker or data is at host offset `host`.
    Compressed {
        /// Extent-relative offset of the grain's first byte.
        grain_start: u64,
        /// Host offset of the grain's marker (or data, without markers).
        host: u64,
    },
}

/// A grain directory and the means to read its grain tables.
pub struct GrainTables {
    /// The extent file.
    pub file: Arc<HostFile>,
    /// Primary grain directory, decoded to GT byte offsets (or `GD_*`).
    /// Entries only change (under the writer's lock) from `GD_NONE` or
    /// `GD_ZERO` to a table that was written before.
    pub gd: Vec<AtomicU64>,
    /// Redundant grain directory, when the extent has one.
    pub rgd: Option<Vec<AtomicU64>>,
    /// Entries per grain table.
    pub gt_entries: u64,
    /// Grain size in bytes.
    pub grain_size: u64,
    /// Extent size in bytes (the guest range the tables cover).
    pub capacity: u64,
    /// How entries are decoded.
    pub codec: GteCodec,
    /// Cache id of the layer and this extent's key prefix.
    pub cache_id: u64,
    /// Extent index shifted to [`KEY_SHIFT`].
    pub key_base: u64,
    /// Set once a table was taken from the redundant directory.
    pub used_redundant: AtomicBool,
    /// The end of the extent file as the driver knows it (the length at
    /// open, then grown by the writer).
    pub end: AtomicU64,
    /// Loads and republication of the tables; see [`GrainTables::load_gt`].
    pub published: TableCache,
}

/// A decoded grain directory as the table walker stores it.
pub fn atomic_gd(gd: Vec<u64>) -> Vec<AtomicU64> {
    gd.into_iter().map(AtomicU64::new).collect()
}

impl GrainTables {
    /// The tables of `file` with directories `gd` (and `rgd`) decoded to
    /// table byte offsets; the file's end starts at its length.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        file: Arc<HostFile>,
        gd: Vec<u64>,
        rgd: Option<Vec<u64>>,
        gt_entries: u64,
        grain_size: u64,
        capacity: u64,
        codec: GteCodec,
        cache_id: u64,
        key_base: u64,
        used_redundant: bool,
    ) -> Self {
        let end = AtomicU64::new(file.len());
        GrainTables {
            file,
            gd: atomic_gd(gd),
            rgd: rgd.map(atomic_gd),
            gt_entries,
            grain_size,
            capacity,
            codec,
            cache_id,
            key_base,
            used_redundant: AtomicBool::new(used_redundant),
            end,
            published: TableCache::default(),
        }
    }

    /// Bytes of guest data one grain table covers.
    pub fn gt_cover(&self) -> u64 {
        self.gt_entries * self.grain_size
    }

    /// Bytes of one grain table.
    pub fn gt_bytes(&self) -> u64 {
        self.gt_entries * self.codec.entry_size() as u64
    }

    /// The number of table entries the capacity needs in table `gdi`
    /// (the last table may be partly unused).
    fn needed_entries(&self, gdi: u64) -> u64 {
        let start = gdi * self.gt_cover();
        let left = self.capacity.saturating_sub(start);
        left.div_ceil(self.grain_size).min(self.gt_entries)
    }

    /// Whether the table at `off` for directory index `gdi` lies inside the file.
    pub fn gt_in_file(&self, off: u64, gdi: u64) -> bool {
        let need = self.needed_entries(gdi) * self.codec.entry_size() as u64;
        let end = self.end.load(Ordering::Acquire);
        off <= MAX_HOST_OFFSET && off.checked_add(need).is_some_and(|e| e <= end)
    }

    /// Primary directory entry `gdi` (`GD_NONE` past its end).
    pub fn gd_entry(&self, gdi: u64) -> u64 {
        self.gd
            .get(gdi as usize)
            .map_or(GD_NONE, |e| e.load(Ordering::Acquire))
    }

    /// Redundant directory entry `gdi`, when there is one.
    pub fn rgd_entry(&self, gdi: u64) -> Option<u64> {
        self.rgd
            .as_ref()
            .and_then(|r| r.get(gdi as usize))
            .map(|e| e.load(Ordering::Acquire))
    }

    /// The usable location of grain table `gdi`, falling back to the
    /// redundant directory when the primary entry is out of range.
    fn gt_location(&self, gdi: u64) -> Result<u64> {
        let primary = self.gd_entry(gdi);
        if matches!(primary, GD_NONE | GD_ZERO) || self.gt_in_file(primary, gdi) {
            return Ok(primary);
        }
        if let Some(alt) = self.rgd_entry(gdi) {
            if !matches!(alt, GD_NONE | GD_ZERO | GD_BAD) && self.gt_in_file(alt, gdi) {
                if !self.used_redundant.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "{}: grain table {gdi} of the primary grain directory is out of range; \
                         using the redundant grain directory",
                        self.file.path().display()
                    );
                }
                return Ok(alt);
            }
        }
        if primary == GD_BAD {
            return Err(Error::corrupt(format!(
                "grain directory entry {gdi} is invalid"
            )));
        }
        Err(Error::corrupt(format!(
            "grain table {gdi} at offset {primary:#x} lies past the end of the file ({} bytes)",
            self.end.load(Ordering::Acquire)
        )))
    }

    /// Reads (through the cache) the grain table at byte offset `off`.
    ///
    /// When the extent is written, tables change on disk; the cache must
    /// never keep a stale copy: loads and [`GrainTables::publish_gt`] go
    /// through one [`TableCache`] (see [`crate::engine::table_cache`]).
    pub fn load_gt(&self, caches: &Caches, off: u64) -> Result<Arc<[u8]>> {
        let key = (self.cache_id, self.key_base | off);
        // The last table may be cut short by the end of the file; what the
        // capacity needs was checked to be present.
        self.published
            .load(&caches.meta, key, self.gt_bytes() as usize, |buf| {
                self.file.read_zero_fill_at(buf, off)
            })
    }

    /// Replaces the cached copy of the table at `off` after it changed on
    /// disk (`None`: drop it, as after a failed write).
    pub fn publish_gt(&self, caches: &Caches, off: u64, table: Option<Arc<[u8]>>) {
        let key = (self.cache_id, self.key_base | off);
        self.published.publish(&caches.meta, key, table);
    }

    /// Decodes entry `i` of the raw table `gt`.
    pub fn entry(&self, gt: &[u8], i: u64) -> Grain {
        let es = self.codec.entry_size();
        let at = i as usize * es;
        let raw = if es == 4 {
            get_le32(gt, at).map(u64::from)
        } else {
            get_le64(gt, at)
        };
        let raw = raw.unwrap_or(0);
        self.codec.decode(raw, self.grain_size)
    }

    /// Maps the extent-relative run at `rel`, at most `max` bytes (the
    /// caller keeps `rel + max` inside the extent). Consecutive grains of
    /// one table that are all unallocated, all zero, or host-contiguous are
    /// merged; runs of missing tables are merged too.
    pub fn map(&self, caches: &Caches, rel: u64, max: u64) -> Result<(Run, u64)> {
        let cover = self.gt_cover();
        let gdi = rel / cover;
        let end = rel + max;
        let loc = self.gt_location(gdi)?;
        if loc == GD_NONE || loc == GD_ZERO {
            let mut stop = (gdi + 1) * cover;
            while stop < end {
                let next = self.gd_entry(stop / cover);
                if next != loc {
                    break;
                }
                stop += cover;
            }
            let run = if loc == GD_NONE {
                Run::Backing
            } else {
                Run::Zero
            };
            return Ok((run, stop.min(end) - rel));
        }
        let gt = self.load_gt(caches, loc)?;
        let first = (rel % cover) / self.grain_size;
        let in_grain = rel % self.grain_size;
        let g0 = self.entry(&gt, first);
        let mut len = self.grain_size - in_grain;
        let run = match g0 {
            Grain::Bad(raw) => {
                return Err(Error::corrupt(format!(
                    "grain table entry {first} of table {gdi} is invalid ({raw:#x})"
                )))
            }
            Grain::Compressed(host) => {
                if host > MAX_HOST_OFFSET {
                    return Err(Error::corrupt(format!("grain offset {host:#x} is absurd")));
                }
                let grain_start = rel - in_grain;
                return Ok((Run::Compressed { grain_start, host }, len.min(max)));
            }
            Grain::Unallocated => Run::Backing,
            Grain::Zero => Run::Zero,
            Grain::Data(host) => Run::Data(host + in_grain),
        };
        let mut i = first + 1;
        while rel + len < end && i < self.gt_entries {
            let g = self.entry(&gt, i);
            let same = match (g0, g) {
                (Grain::Unallocated, Grain::Unallocated) | (Grain::Zero, Grain::Zero) => true,
                (Grain::Data(a), Grain::Data(b)) => {
                    a.checked_add((i - first) * self.grain_size) == Some(b)
                }
                _ => false,
            };
            if !same {
                break;
            }
            len += self.grain_size;
            i += 1;
        }
        Ok((run, len.min(max)))
    }
}

/// How one extent stores its data.
// One per extent, built once at open: boxing the tables would only add a
// pointer chase to every lookup.
#[allow(clippy::large_enum_variant)]
pub enum ExtentData {
    /// Raw data in `file` from byte `offset`.
    Flat {
        /// The data file.
        file: Arc<HostFile>,
        /// Byte offset of the extent's first byte in `file`.
        offset: u64,
    },
    /// Reads as zeros.
    Zero,
    /// `NOACCESS`: reads fail.
    NoAccess,
    /// A grain-table extent (hosted sparse, stream, COWD or seSparse).
    Sparse {
        /// The tables.
        tables: GrainTables,
        /// Facts about the extent for `info` and decompression.
        info: SparseInfo,
    },
}

/// One extent placed in the guest disk.
pub struct Extent {
    /// Guest byte offset of the extent's first byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// The descriptor line it came from, if any.
    pub line: Option<ExtentLine>,
    /// The extent's file, if any.
    pub file: Option<Arc<HostFile>>,
    /// Its storage.
    pub data: ExtentData,
}
