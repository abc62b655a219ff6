//! qcow2 (versions 2 and 3) driver: reads, and in-place writes when opened writable.
//!
//! - [`header`]: header fields, extensions and feature bits.
//! - [`tables`]: geometry, the L1 table and L2 entry decoding.
//! - [`snapshot`]: the internal snapshot table (for `info` and
//!   `--load-snapshot`).
//! - `refcount`: refcount lookups and entry encoding.
//! - `alloc`: host cluster allocation and refcount updates (writes).
//! - `meta`: L1/L2 table updates and cache coherence (writes).
//! - `write`: the [`WriteLayer`] side: open checks, lock-free in-place
//!   writes, flush; its module documentation gives the ordering and
//!   locking rules. `first_write` (one cluster) and `batch` (whole
//!   clusters) are the first writes and copy-on-write, `zero` zeroing.
//! - `guard`: the map of metadata ranges no data write may touch.
//! - [`create`]: new empty images (overlays).
//!
//! Opening reads and validates the header, the extensions, the backing
//! file name and the active L1 table; L2 tables are read on demand through
//! the shared metadata cache. [`Layer::map`] answers with runs as long as
//! one L2 table allows: host-contiguous data, zeros or unallocated ranges
//! are merged.
//!
//! Choices worth knowing:
//! - An unknown backing format name fails the open (`Unsupported`, naming
//!   the format and the backing file), as the chain could not honour it.
//! - A damaged snapshot table does not fail the open (only the active
//!   state is exposed); `info` reports it under `snapshot_table_error`.
//! - A loaded internal snapshot ([`Qcow2::open_snapshot`], qemu-nbd's
//!   `-l`) is read-only and reads through the snapshot's L1 table at the
//!   snapshot's own virtual size (what `qemu-img snapshot -a` restores;
//!   qemu-nbd keeps the image's current size, padding or cutting the
//!   snapshot). Its L2 tables and data are shared with the active state,
//!   which is why nothing may write while it is open.
//! - With an external data file (`data_file_raw` or not) reads follow the
//!   L2 tables, as qemu does: allocated clusters are read from the data
//!   file at the entry's offset; zero flags and unallocated clusters keep
//!   their meaning.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use serde_json::json;

use super::{BackingSpec, CompressedBlock, Format, Layer, LayerInfo, Mapping, OpenCtx, WriteLayer};
use crate::cache::Caches;
use crate::compress::{self, Method};
use crate::engine::table_cache::TableCache;
use crate::error::{Error, Result};
use crate::format::SnapshotInfo;
use crate::host::HostFile;

mod alloc;
mod batch;
mod bitmaps;
pub mod create;
mod first_write;
mod guard;
pub mod header;
mod meta;
pub mod refcount;
pub mod snapshot;
pub mod tables;
mod write;
mod zero;

use header::{CompressionType, Header, MAX_CLUSTER_BITS};
use tables::{EntryRules, Geometry, HostOffset, Unit, OFFSET_MASK};

/// Opens a qcow2 image.
pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Arc<dyn Layer>> {
    Ok(Arc::new(Qcow2::open(file, ctx)?))
}

/// An open qcow2 image (the active state).
pub struct Qcow2 {
    file: Arc<HostFile>,
    data_file: Option<Arc<HostFile>>,
    header: Header,
    geo: Geometry,
    rules: EntryRules,
    l1: RwLock<Vec<u64>>,
    /// Host bytes of the image file that table entries may point into
    /// (grows as writes allocate clusters).
    file_end: AtomicU64,
    /// Loads and republication of L2 slices; see [`Qcow2::l2_slice`].
    published: TableCache,
    writer: Option<write::Writer>,
    backing: Option<BackingSpec>,
    snapshots: Vec<SnapshotInfo>,
    snapshot_error: Option<String>,
    /// The guest size: the header's, or the loaded snapshot's.
    size: u64,
    /// The internal snapshot read instead of the active state, if any.
    loaded: Option<SnapshotInfo>,
    caches: Arc<Caches>,
    cache_id: u64,
}

impl Qcow2 {
    /// Opens `file` as a qcow2 layer.
    pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Qcow2> {
        let path = file.path().to_path_buf();
        Self::open_inner(file, ctx, None).map_err(|e| e.with_path(&path))
    }

    /// Opens `file` read-only as the internal snapshot `sel` selects.
    pub fn open_snapshot(
        file: Arc<HostFile>,
        ctx: &OpenCtx<'_>,
        sel: &snapshot::SnapshotSel,
    ) -> Result<Qcow2> {
        let path = file.path().to_path_buf();
        if ctx.writable {
            return Err(Error::new(
                crate::error::ErrorKind::ReadOnly,
                "a loaded snapshot is read-only",
            )
            .with_path(&path));
        }
        Self::open_inner(file, ctx, Some(sel)).map_err(|e| e.with_path(&path))
    }

    fn open_inner(
        file: Arc<HostFile>,
        ctx: &OpenCtx<'_>,
        sel: Option<&snapshot::SnapshotSel>,
    ) -> Result<Qcow2> {
        // The header and its extensions fill at most the first cluster:
        // read that much, not the largest cluster size (a remote image
        // would fetch up to 2 MiB before its header is parsed).
        let mut bits = [0u8; 4];
        file.read_zero_fill_at(&mut bits, 20)?;
        let cluster_bits =
            crate::endian::be32(&bits, 0).clamp(header::MIN_CLUSTER_BITS, MAX_CLUSTER_BITS);
        let head_len = file.len().min(1 << cluster_bits) as usize;
        let mut head = vec![0u8; head_len];
        let n = file.read_at_most(&mut head, 0)?;
        head.truncate(n);
        let header = Header::parse(&head)?;
        drop(head);
        let geo = Geometry::new(&header);
        file.prefetch(&table_ranges(&header, ctx.writable));
        let backing = read_backing(&file, &header)?;
        if let Some(b) = &backing {
            ctx.open_ahead(file.path(), &b.name);
        }
        let (l1, size, loaded) = match sel {
            None => (tables::read_l1(&file, &header, &geo)?, header.size, None),
            Some(sel) => {
                let (snap, (off, entries)) = snapshot::find(&file, &header, sel)?;
                // Entries past the snapshot's table (if it is short for its
                // size) read as unallocated, as in qemu.
                let want = geo.l1_entries_for(snap.virtual_size);
                if want.saturating_mul(8) > tables::MAX_L1_BYTES {
                    // The bound the active size meets too (read_l1).
                    return Err(Error::corrupt(format!(
                        "snapshot {} {:?}: virtual size {} needs more than the {} MiB L1 limit",
                        snap.id,
                        snap.name,
                        snap.virtual_size,
                        tables::MAX_L1_BYTES >> 20
                    )));
                }
                let what = format!("L1 table of snapshot {} {:?}", snap.id, snap.name);
                let l1 = tables::read_l1_at(&file, &what, off, u64::from(entries), want, &geo)?;
                (l1, snap.virtual_size, Some(snap))
            }
        };
        let data_file = match &header.data_file {
            Some(name) if header.has_data_file() => Some(
                ctx.policy
                    .open_named(file.path(), name, ctx.writable)
                    .map_err(|e| {
                        e.context(format!("external data file {name:?} cannot be opened"))
                    })?,
            ),
            _ => None,
        };
        let (snapshots, snapshot_error) = snapshot::read_snapshots(&file, &header)?;
        let writer = if ctx.writable {
            Some(write::Writer::open(
                &file,
                data_file.as_deref(),
                &header,
                backing.is_some(),
                &l1,
            )?)
        } else {
            None
        };
        if let (Some(_), Some(d)) = (&writer, &data_file) {
            // L2 entries point at guest data in the data file: durable first.
            file.flush_first(d.clone());
        }
        let image_len = file.len();
        let rules = EntryRules {
            version: header.version,
            data_file: data_file.is_some(),
            data_len: if data_file.is_some() {
                None
            } else {
                Some(file.len())
            },
            image_len: file.len(),
        };
        Ok(Qcow2 {
            file,
            data_file,
            header,
            geo,
            rules,
            l1: RwLock::new(l1),
            file_end: AtomicU64::new(image_len),
            published: TableCache::new(),
            writer,
            backing,
            snapshots,
            snapshot_error,
            size,
            loaded,
            caches: ctx.caches.clone(),
            cache_id: ctx.caches.new_layer_id(),
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The reference count of the host cluster containing image offset
    /// `host` (not needed for reading; for checks and later writes).
    pub fn refcount(&self, host: u64) -> Result<u64> {
        if let Some(w) = &self.writer {
            return w.refcount(self, host);
        }
        refcount::RefcountLayout::new(&self.header)?.refcount(
            &self.file,
            &self.caches,
            self.cache_id,
            HostOffset(host),
        )
    }

    /// How entries are checked, with the current end of the image file.
    fn rules(&self) -> EntryRules {
        let end = self.file_end.load(Ordering::Acquire);
        EntryRules {
            data_len: self.rules.data_len.map(|_| end),
            image_len: end,
            ..self.rules
        }
    }

    /// Raw bytes of slice `idx` of the L2 table at `table`, via the cache.
    ///
    /// Loads and the writer's republication ([`Qcow2::cache_put`]) go
    /// through one [`TableCache`], so a slow reader never re-inserts a
    /// stale copy over a writer's fresh one.
    fn l2_slice(&self, table: u64, idx: u64) -> Result<Arc<[u8]>> {
        let bytes = self.geo.slice_entries() * self.geo.entry_bytes;
        let off = table + idx * bytes;
        // A table cut short by the end of the file reads as zeros (unallocated).
        self.published.load(
            &self.caches.meta,
            (self.cache_id, off),
            bytes as usize,
            |buf| self.file.read_zero_fill_at(buf, off),
        )
    }

    /// The host offset of the L2 table covering guest `offset` (0: none).
    fn l2_table(&self, offset: u64) -> Result<u64> {
        let idx = offset / self.geo.l2_coverage();
        let entry = usize::try_from(idx)
            .ok()
            .and_then(|i| self.l1.read().get(i).copied())
            .unwrap_or(0);
        let table = entry & OFFSET_MASK;
        if table == 0 {
            return Ok(0);
        }
        if table % self.geo.cluster_size() != 0 {
            return Err(Error::corrupt(format!(
                "L1 entry {idx} points to an L2 table at unaligned offset {table:#x}"
            )));
        }
        let end = self.file_end.load(Ordering::Acquire);
        if table >= end {
            return Err(Error::corrupt(format!(
                "L1 entry {idx} points to an L2 table at {table:#x}, past the end of the file ({end} bytes)"
            )));
        }
        Ok(table)
    }
}

/// Reads the backing file name and format, if the image has one.
/// The (offset, length) ranges an open reads beyond the header: the L1
/// table, the snapshot table, and, for writing, the refcount table
/// (unchecked: [`HostFile::prefetch`] only hints, the reads check).
fn table_ranges(h: &Header, writable: bool) -> Vec<(u64, u64)> {
    let cluster = 1u64 << h.cluster_bits.min(MAX_CLUSTER_BITS);
    let mut r = vec![(h.l1_table_offset, u64::from(h.l1_size) * 8)];
    if h.nb_snapshots > 0 {
        // Entries are variable-length: a cluster covers the usual table.
        r.push((h.snapshots_offset, cluster));
    }
    if writable {
        r.push((
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters).saturating_mul(cluster),
        ));
    }
    r
}

fn read_backing(file: &HostFile, h: &Header) -> Result<Option<BackingSpec>> {
    if h.backing_file_offset == 0 || h.backing_file_size == 0 {
        return Ok(None);
    }
    let len = u64::from(h.backing_file_size);
    match h.backing_file_offset.checked_add(len) {
        Some(end) if end <= file.len() => {}
        _ => {
            return Err(Error::corrupt(format!(
                "backing file name ({len} bytes at {:#x}) lies past the end of the file",
                h.backing_file_offset
            )))
        }
    }
    let mut raw = vec![0u8; len as usize];
    file.read_exact_at(&mut raw, h.backing_file_offset)?;
    let name = String::from_utf8(raw)
        .map_err(|_| Error::corrupt("backing file name is not valid UTF-8"))?;
    let format = match &h.backing_format {
        Some(f) => Some(Format::from_name(f).map_err(|_| {
            Error::unsupported(format!(
                "unsupported format '{f}' recorded for backing file {name:?} \
                 (supported: raw, qcow2, qcow, vmdk, vpc, vhdx, vdi, parallels)"
            ))
        })?),
        None => None,
    };
    Ok(Some(BackingSpec {
        name,
        format,
        parent_cid: None,
    }))
}

/// Walks the L2 entries of one table unit by unit, keeping the current slice.
struct Walker<'a> {
    q: &'a Qcow2,
    rules: EntryRules,
    table: u64,
    slice_idx: u64,
    slice: Option<Arc<[u8]>>,
}

impl Walker<'_> {
    /// The unit containing guest `offset` (which must lie in this table).
    fn unit(&mut self, offset: u64) -> Result<Unit> {
        let geo = &self.q.geo;
        let index = (offset >> geo.cluster_bits) % geo.l2_entries;
        let per = geo.slice_entries();
        let (sidx, within) = (index / per, (index % per) as usize);
        let slice = match &self.slice {
            Some(s) if self.slice_idx == sidx => s.clone(),
            _ => {
                let s = self.q.l2_slice(self.table, sidx)?;
                // The file's end as of this slice (read after it): an entry
                // is linked only after its cluster was allocated, so an end
                // loaded before the slice could miss a concurrent growth.
                self.rules = self.q.rules();
                self.slice = Some(s.clone());
                self.slice_idx = sidx;
                s
            }
        };
        let (entry, bitmap) = tables::entry_at(&slice, within, geo);
        let sub = ((offset % geo.cluster_size()) / geo.unit_size()) as u32;
        tables::classify(entry, bitmap, sub, geo, &self.rules)
    }
}

impl Qcow2 {
    /// qemu-img's `format-specific` data for this image (QAPI
    /// `ImageInfoSpecificQCow2`): version 2 images show only compat,
    /// compression type and refcount width, as qemu does.
    fn qemu_specific(&self) -> serde_json::Value {
        use header::{CompressionType, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT};
        let h = &self.header;
        let mut m = serde_json::Map::new();
        let compression = match h.compression {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        };
        if h.version < 3 {
            m.insert("compat".into(), json!("0.10"));
            m.insert("compression-type".into(), json!(compression));
            m.insert("refcount-bits".into(), json!(h.refcount_bits()));
            return serde_json::Value::Object(m);
        }
        m.insert("compat".into(), json!("1.1"));
        m.insert("compression-type".into(), json!(compression));
        m.insert(
            "lazy-refcounts".into(),
            json!(h.compatible & COMPAT_LAZY_REFCOUNTS != 0),
        );
        match bitmaps::read_bitmaps(&self.file, h) {
            Ok(list) if !list.is_empty() => {
                m.insert("bitmaps".into(), serde_json::Value::Array(list));
            }
            Ok(_) => {}
            Err(why) => log::warn!("{}: {why}", self.file.path().display()),
        }
        m.insert("refcount-bits".into(), json!(h.refcount_bits()));
        if let Some(name) = &h.data_file {
            m.insert("data-file".into(), json!(name));
            m.insert(
                "data-file-raw".into(),
                json!(h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0),
            );
        }
        m.insert(
            "corrupt".into(),
            json!(h.incompatible & INCOMPAT_CORRUPT != 0),
        );
        m.insert("extended-l2".into(), json!(h.extended_l2()));
        serde_json::Value::Object(m)
    }
}

impl Layer for Qcow2 {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let geo = &self.geo;
        let cov = geo.l2_coverage();
        let table_end = (offset / cov + 1).saturating_mul(cov);
        let limit = offset.saturating_add(max_len).min(table_end);
        let table = self.l2_table(offset).map_err(|e| e.at_guest(offset))?;
        if table == 0 {
            return Ok((Mapping::Backing, limit - offset));
        }
        let mut walk = Walker {
            q: self,
            rules: self.rules(),
            table,
            slice_idx: 0,
            slice: None,
        };
        let unit = geo.unit_size();
        let unit_start = offset - offset % unit;
        let first = walk.unit(offset).map_err(|e| e.at_guest(offset))?;
        let first_data = match first {
            Unit::Compressed { host, len } => {
                let cs = geo.cluster_size();
                let start = offset - offset % cs;
                let block = CompressedBlock {
                    guest_start: start,
                    len: cs,
                    key: host.0,
                    host_offset: host.0,
                    host_len: len,
                };
                return Ok((Mapping::Compressed(block), (start + cs).min(limit) - offset));
            }
            Unit::Data(HostOffset(h)) => Some(h),
            Unit::Backing | Unit::Zero => None,
        };
        let mut end = unit_start + unit;
        while end < limit {
            // A damaged entry ends the run; the read that needs it fails.
            let Ok(next) = walk.unit(end) else { break };
            let same = match (first, next) {
                (Unit::Backing, Unit::Backing) | (Unit::Zero, Unit::Zero) => true,
                (Unit::Data(a), Unit::Data(b)) => b.0 == a.0 + (end - unit_start),
                _ => false,
            };
            if !same {
                break;
            }
            end += unit;
        }
        let n = end.min(limit) - offset;
        let mapping = match (first_data, first) {
            (Some(h), _) => Mapping::Data {
                file: self.data_file.as_ref().unwrap_or(&self.file).clone(),
                offset: h + (offset - unit_start),
            },
            (None, Unit::Zero) => Mapping::Zero,
            (None, _) => Mapping::Backing,
        };
        Ok((mapping, n))
    }

    fn decompress(&self, block: &CompressedBlock, out: &mut [u8]) -> Result<()> {
        let avail = self.file.len().saturating_sub(block.host_offset);
        let want = block.host_len.min(avail).min(2 << MAX_CLUSTER_BITS);
        let mut input = vec![0u8; want as usize];
        let n = self.file.read_at_most(&mut input, block.host_offset)?;
        let method = match self.header.compression {
            CompressionType::Deflate => Method::Deflate,
            CompressionType::Zstd => Method::Zstd,
        };
        compress::decompress(method, &input[..n], out, false).map_err(|e| {
            Error::corrupt(format!(
                "compressed cluster for guest offset {:#x}: {}",
                block.guest_start,
                e.message()
            ))
            .at_host(block.host_offset)
            .with_path(self.file.path())
        })
    }

    fn backing(&self) -> Option<BackingSpec> {
        self.backing.clone()
    }

    fn info(&self) -> LayerInfo {
        let h = &self.header;
        let mut info = LayerInfo::new(Format::Qcow2, self.size);
        info.subformat = Some(format!("v{}", h.version));
        info.cluster_size = Some(h.cluster_size());
        info.features = h.feature_list();
        info.snapshots.clone_from(&self.snapshots);
        let d = &mut info.details;
        d.insert("refcount_bits".into(), json!(h.refcount_bits()));
        d.insert("header_length".into(), json!(h.header_length));
        d.insert("l1_size".into(), json!(h.l1_size));
        d.insert("l1_table_offset".into(), json!(h.l1_table_offset));
        let (rt_off, rt_clusters, autoclear) = match &self.writer {
            Some(w) => w.header_now(h),
            None => (
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters),
                h.autoclear,
            ),
        };
        d.insert("refcount_table_offset".into(), json!(rt_off));
        d.insert("refcount_table_clusters".into(), json!(rt_clusters));
        d.insert("nb_snapshots".into(), json!(h.nb_snapshots));
        d.insert("incompatible_features".into(), json!(h.incompatible));
        d.insert("compatible_features".into(), json!(h.compatible));
        d.insert("autoclear_features".into(), json!(autoclear));
        if let Some(name) = &h.data_file {
            d.insert("data_file".into(), json!(name));
        }
        if let Some(b) = &self.backing {
            d.insert("backing_file".into(), json!(b.name));
        }
        if let Some(f) = &h.backing_format {
            d.insert("backing_format".into(), json!(f));
        }
        if h.unknown_extensions > 0 {
            d.insert("unknown_extensions".into(), json!(h.unknown_extensions));
        }
        if let Some(e) = &self.snapshot_error {
            d.insert("snapshot_table_error".into(), json!(e));
        }
        if let Some(s) = &self.loaded {
            d.insert(
                "loaded_snapshot".into(),
                json!({"id": s.id, "name": s.name}),
            );
        }
        info.qemu_specific = Some(self.qemu_specific());
        info
    }

    fn host_files(&self) -> Vec<Arc<HostFile>> {
        let mut v = vec![self.file.clone()];
        v.extend(self.data_file.clone());
        v
    }

    fn cache_id(&self) -> u64 {
        self.cache_id
    }

    fn pin_reads(&self) -> Option<crate::engine::reclaim::ReadPin<'_>> {
        self.writer.as_ref().map(|w| w.gate.pin())
    }

    fn as_write(&self) -> Option<&dyn WriteLayer> {
        self.writer.as_ref().map(|_| self as &dyn WriteLayer)
    }
}
