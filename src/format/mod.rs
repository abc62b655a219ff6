//! Format drivers: one per image format, each answering one question —
//! *where does guest range X of this layer live?*
//!
//! A driver parses its headers and tables and implements [`Layer`]. It knows
//! nothing about the layers above or below it: when a range is not allocated
//! it answers [`Mapping::Backing`], and [`crate::chain`] asks the next layer.
//! Moving bytes (reads from host files, decompressed-block caching, zero
//! fill) happens in one place, [`crate::chain::Chain`].
//!
//! Format detection ([`detect()`]) is by content only, never by file name.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::cache::Caches;
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::policy::OpenPolicy;

pub mod blockmap;
pub mod detect;
pub mod parallels;
pub mod parallels_bundle;
pub mod qcow;
pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use detect::{detect, detect_bytes, detect_parts};

/// An image format vdiskfs can open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A plain raw image.
    Raw,
    /// qcow2, version 2 or 3.
    Qcow2,
    /// The original qcow (version 1).
    Qcow,
    /// VMDK, any subformat (descriptor file or sparse extent).
    Vmdk,
    /// Microsoft VHD (qemu's `vpc`): fixed, dynamic or differencing.
    #[serde(rename = "vpc")]
    Vhd,
    /// VHDX (Hyper-V), fixed, dynamic or differencing.
    Vhdx,
    /// VirtualBox VDI.
    Vdi,
    /// Parallels / OpenVZ ploop expanding or plain image.
    Parallels,
    /// QED (recognised so it is refused by name, never served as raw).
    Qed,
    /// LUKS-encrypted image (recognised and refused: we do not decrypt).
    Luks,
    /// Bochs growing image (recognised and refused).
    Bochs,
    /// cloop compressed loop image (recognised and refused).
    Cloop,
    /// Apple disk image with a `koly` trailer (recognised and refused).
    Dmg,
}

impl Format {
    /// The name used on the command line and in qcow2 backing-format fields.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Qcow => "qcow",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vpc",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
            Format::Parallels => "parallels",
            Format::Qed => "qed",
            Format::Luks => "luks",
            Format::Bochs => "bochs",
            Format::Cloop => "cloop",
            Format::Dmg => "dmg",
        }
    }

    /// Parses a format name as qemu spells it.
    pub fn from_name(name: &str) -> Result<Format> {
        match name {
            "raw" | "file" | "host_device" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "qcow" => Ok(Format::Qcow),
            "vmdk" => Ok(Format::Vmdk),
            "vpc" | "vhd" => Ok(Format::Vhd),
            "vhdx" => Ok(Format::Vhdx),
            "vdi" => Ok(Format::Vdi),
            "parallels" => Ok(Format::Parallels),
            "qed" => Ok(Format::Qed),
            "luks" => Ok(Format::Luks),
            "bochs" => Ok(Format::Bochs),
            "cloop" => Ok(Format::Cloop),
            "dmg" => Ok(Format::Dmg),
            other => Err(Error::unsupported(format!(
                "unsupported format '{other}' (supported: raw, qcow2, qcow, vmdk, vpc, vhdx, vdi, parallels)"
            ))),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a run of guest bytes lives in one layer.
#[derive(Debug, Clone)]
pub enum Mapping {
    /// The bytes are stored in `file` starting at `offset`.
    Data {
        /// The host file holding the data.
        file: Arc<HostFile>,
        /// Byte offset in `file` of the run's first byte.
        offset: u64,
    },
    /// The run reads as zeros (and hides anything below).
    Zero,
    /// Not allocated in this layer: the layer below answers (zeros if none).
    Backing,
    /// The run lies inside one compressed block; see [`Layer::decompress`].
    Compressed(CompressedBlock),
}

/// A compressed block as a driver describes it.
#[derive(Debug, Clone)]
pub struct CompressedBlock {
    /// Guest offset of the block's first decompressed byte.
    pub guest_start: u64,
    /// Decompressed length of the block.
    pub len: u64,
    /// Identifies the block within its layer (usually its host offset);
    /// the decompressed-block cache is keyed by `(layer id, key)`.
    pub key: u64,
    /// Host offset of the compressed bytes.
    pub host_offset: u64,
    /// Length of the compressed bytes (an upper bound for some formats).
    pub host_len: u64,
}

/// What a layer says about the image it is backed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingSpec {
    /// The name as written in the image (resolved by [`OpenPolicy::resolve`]).
    pub name: String,
    /// The backing format recorded in the image, if any.
    pub format: Option<Format>,
    /// For VMDK delta links: the parent's CID this child expects.
    pub parent_cid: Option<u32>,
}

/// One internal snapshot (qcow2).
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// Snapshot id string.
    pub id: String,
    /// Snapshot name.
    pub name: String,
    /// Guest disk size at the time of the snapshot.
    pub virtual_size: u64,
    /// Seconds since the epoch when it was taken.
    pub date_sec: u64,
    /// Nanoseconds within that second.
    pub date_nsec: u32,
    /// The guest clock (nanoseconds since the VM started) when it was taken.
    pub vm_clock_nsec: u64,
    /// Instructions executed under record/replay, when the image records it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
    /// VM state size saved with it.
    pub vm_state_size: u64,
}

/// Format-specific facts for `vdiskfs info`.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    /// The format.
    pub format: Format,
    /// The subformat or version: `v2`, `v3`, `monolithicSparse`, …
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subformat: Option<String>,
    /// Guest disk size in bytes.
    pub virtual_size: u64,
    /// Cluster or grain size in bytes, where the format has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Format features in use (`compression_type=zstd`, `extended_l2`, `dirty`, …).
    pub features: Vec<String>,
    /// Internal snapshots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    /// Further format-specific fields (VMDK: createType, CID, adapter type,
    /// geometry, extents, ddb keys…), shown under their own names.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
    /// The `data` of qemu-img's `format-specific` object for this format
    /// (qcow2, vmdk), for `info --output=json`; `None` where qemu prints none.
    #[serde(skip)]
    pub qemu_specific: Option<serde_json::Value>,
}

impl LayerInfo {
    /// A minimal info record; drivers fill in the rest.
    pub fn new(format: Format, virtual_size: u64) -> Self {
        LayerInfo {
            format,
            subformat: None,
            virtual_size,
            cluster_size: None,
            features: Vec::new(),
            snapshots: Vec::new(),
            details: serde_json::Map::new(),
            qemu_specific: None,
        }
    }
}

/// One layer of a chain: a format driver over its host file(s).
pub trait Layer: Send + Sync {
    /// The path the layer was opened from.
    fn path(&self) -> &Path;

    /// The layer's format.
    fn format(&self) -> Format;

    /// The guest size in bytes.
    fn virtual_size(&self) -> u64;

    /// Maps the run starting at guest `offset`, at most `max_len` bytes
    /// long. Returns the mapping and the run's length, which is at least 1
    /// and at most `max_len`. The caller guarantees `max_len >= 1` and
    /// `offset + max_len <= virtual_size()`. Errors concern only this run:
    /// a damaged table entry fails the reads that need it, nothing else.
    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)>;

    /// Decodes a block this layer returned as [`Mapping::Compressed`] into
    /// `out`: `block.len` bytes, or fewer to decode only that prefix of
    /// the block (decoding stops once `out` is full).
    fn decompress(&self, block: &CompressedBlock, out: &mut [u8]) -> Result<()> {
        let _ = (block, out);
        Err(Error::unsupported("this format has no compressed blocks").with_path(self.path()))
    }

    /// The backing file this layer names, if any.
    fn backing(&self) -> Option<BackingSpec>;

    /// The content id that VMDK children check against their parentCID.
    fn cid(&self) -> Option<u32> {
        None
    }

    /// The unique id a child names this layer by (VHD footer unique id).
    fn unique_id(&self) -> Option<[u8; 16]> {
        None
    }

    /// The unique id this layer expects of its parent (differencing VHD);
    /// the chain checks it against the parent's [`Layer::unique_id`].
    fn parent_unique_id(&self) -> Option<[u8; 16]> {
        None
    }

    /// The identity children record of their parent, beyond VMDK's CID
    /// (VHDX: the DataWriteGuid).
    fn data_guid(&self) -> Option<[u8; 16]> {
        None
    }

    /// Checks that `parent` is the image this layer was made against
    /// (VHDX: parent_linkage against the parent's DataWriteGuid). The chain
    /// skips it under `--ignore-cid`.
    fn check_parent(&self, parent: &dyn Layer) -> Result<()> {
        let _ = parent;
        Ok(())
    }

    /// Facts for `vdiskfs info`.
    fn info(&self) -> LayerInfo;

    /// Every host file the layer reads (image, extents, data file).
    fn host_files(&self) -> Vec<Arc<HostFile>>;

    /// The id this layer uses in the shared caches.
    fn cache_id(&self) -> u64;

    /// The host file that holds the whole guest disk byte for byte (a raw
    /// image, a single flat extent at offset 0), for kernel passthrough.
    fn passthrough_file(&self) -> Option<Arc<HostFile>> {
        None
    }

    /// Pins the layer's table state for one mapped run: held by a reader
    /// from [`Layer::map`] until the run's bytes are read, so that a
    /// cluster freed meanwhile is not reused under it (see
    /// [`crate::engine::reclaim`]). `None` for layers that never free.
    fn pin_reads(&self) -> Option<crate::engine::reclaim::ReadPin<'_>> {
        None
    }

    /// The write side, when the layer was opened writable and its format
    /// (or subformat) can be written in place.
    fn as_write(&self) -> Option<&dyn WriteLayer> {
        None
    }
}

/// Reads what the layers below a written layer hold: the source of
/// copy-on-write when only part of an allocation unit is written.
pub trait Below: Sync {
    /// Fills `buf` with the guest bytes at `offset` as seen through the
    /// layers below (zeros where none stores data or past their end).
    fn read_below(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// No layer below: everything reads as zeros.
pub struct NothingBelow;

impl Below for NothingBelow {
    fn read_below(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
}

/// Writing in place into one layer.
///
/// Contract, shared by every driver:
/// - Calls may come from several threads at once, on overlapping ranges;
///   the driver serialises what must be (allocation, table updates) and
///   does not hold a lock across data I/O it can do outside one.
/// - Ordering: data is written before the table entry that points to it;
///   a cluster's refcount (or allocation record) is raised before any
///   reference to it is written; table entries go through
///   [`crate::host::HostFile::write_ordered_at`], so that these orders hold
///   on disk too ([`crate::engine::order`]). A crash or a power cut at any
///   instant leaves an image whose checker finds at most leaked clusters.
/// - After [`WriteLayer::flush`] returns, every write that completed
///   before it was called is durable (fdatasync of every file written).
pub trait WriteLayer: Send + Sync {
    /// Writes `buf` at guest `offset` (the range lies inside the virtual
    /// size). Where `buf` covers only part of an allocation unit (cluster,
    /// subcluster, grain) that this layer does not store yet, the rest is
    /// filled from the current content: compressed data, zeros, or `below`.
    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()>;

    /// Makes `len` bytes at `offset` read as zeros, whatever lies below,
    /// releasing host space where the format allows (whole clusters marked
    /// zero or deallocated, host file holes punched). Used for
    /// fallocate(PUNCH_HOLE) and fallocate(ZERO_RANGE), so for discards.
    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()>;

    /// Makes every completed write durable, metadata after the data it
    /// points to.
    fn flush(&self) -> Result<()>;

    /// The metadata maps no data write may touch (one per host file with
    /// metadata), for checks by tests and fuzzing.
    fn metadata_maps(&self) -> Vec<&crate::engine::overlap::MetadataMap> {
        Vec::new()
    }
}

/// What a driver needs to open a layer.
#[derive(Clone)]
pub struct OpenCtx<'a> {
    /// Caches shared by every layer of the mount.
    pub caches: &'a Arc<Caches>,
    /// Policy for files named inside the image (extents, data files).
    pub policy: &'a OpenPolicy,
    /// Open for writing.
    pub writable: bool,
}

impl OpenCtx<'_> {
    /// Says that the image at `naming` names `name` (its backing file, an
    /// extent) as a file the chain will open, as soon as a driver knows it
    /// (before reading its tables): a remote one then starts opening while
    /// this layer's tables arrive (see [`crate::remote::ahead`]). Local
    /// files and names the policy refuses are left to the real open.
    pub fn open_ahead(&self, naming: &Path, name: &str) {
        if !crate::remote::ahead::enabled()
            || !(crate::remote::is_url(naming) || crate::remote::is_url_str(name))
        {
            return;
        }
        if let Ok(path) = self.policy.resolve(naming, name) {
            if let Some(url) = path.to_str().filter(|u| crate::remote::is_url_str(u)) {
                crate::remote::ahead::open_ahead(url);
            }
        }
    }
}

/// Opens `path` as a `format` layer.
pub fn open_layer(path: &Path, format: Format, ctx: &OpenCtx<'_>) -> Result<Arc<dyn Layer>> {
    let file = ctx.policy.open_path(path, ctx.writable)?;
    open_layer_on(file, format, ctx)
}

/// Opens an already open host file as a `format` layer.
pub fn open_layer_on(
    file: Arc<HostFile>,
    format: Format,
    ctx: &OpenCtx<'_>,
) -> Result<Arc<dyn Layer>> {
    let layer: Arc<dyn Layer> = match format {
        Format::Raw => Arc::new(raw::Raw::open(file, ctx)?),
        Format::Qcow2 => qcow2::open(file, ctx)?,
        Format::Qcow => qcow::open(file, ctx)?,
        Format::Vmdk => vmdk::open(file, ctx)?,
        Format::Vdi => vdi::open(file, ctx)?,
        Format::Parallels => parallels::open(file, ctx)?,
        Format::Vhd => vhd::open(file, ctx)?,
        Format::Vhdx => vhdx::open(file, ctx)?,
        Format::Qed | Format::Luks | Format::Bochs | Format::Cloop | Format::Dmg => {
            return Err(detect::refusal(format).with_path(file.path()))
        }
    };
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names_round_trip() {
        for f in [
            Format::Raw,
            Format::Qcow2,
            Format::Qcow,
            Format::Vmdk,
            Format::Vhd,
            Format::Vhdx,
            Format::Vdi,
            Format::Parallels,
            Format::Qed,
            Format::Luks,
            Format::Bochs,
            Format::Cloop,
            Format::Dmg,
        ] {
            assert_eq!(Format::from_name(f.name()).unwrap(), f);
        }
        assert_eq!(Format::from_name("vhd").unwrap(), Format::Vhd);
        assert!(Format::from_name("vvfat").is_err());
    }
}
