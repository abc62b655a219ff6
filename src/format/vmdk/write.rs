//! In-place writes into VMDK images: flat extents and hosted sparse
//! (`KDMV`, uncompressed) extents, as in monolithicFlat, twoGbMaxExtentFlat,
//! vmfs/vmfsThin, monolithicSparse and twoGbMaxExtentSparse images.
//!
//! Flat extents are written directly at their offset. Sparse extents work
//! like qemu's driver: VMDK has no refcounts, so new grains and new grain
//! tables are appended at the end of the extent file (grains aligned to
//! the grain size) and space is never reused; a crash or a failed write
//! leaves at most leaked space. Grain data and new (zeroed) grain tables
//! are written at once; grain-table and grain-directory entries (redundant
//! copy, then primary) are ordered writes ([`crate::engine::order`], stage
//! Map), written after a barrier: on disk, even after a power cut, an
//! entry never exists without the grain or table it points at.
//! [`WriteLayer::flush`] makes everything durable.
//!
//! Writes into allocated grains go straight to the host file, without a
//! lock. Everything else takes the extent's allocation lock: it reserves
//! host space for a run of grains and marks them *pending*, then, without
//! the lock, fills them (zeros for a zeroed grain, the layers below where
//! the write does not cover a grain) and writes them; then, under the lock
//! again, writes the table entries and republishes the table in the
//! metadata cache (see [`GrainTables::load_gt`] for why readers never
//! re-cache a stale table). Any other allocation or zeroing touching a
//! pending grain waits for it, so two first writes into one grain both
//! land.
//!
//! Zeroing: with the zeroed-grain flag (`zeroed_grain=on`), whole grains
//! get entry 1 (reads as zeros; the old grain's space is leaked, as
//! qemu does); without it, allocated grains are punched in place and
//! unallocated grains over a parent get new grains of zeros. Unallocated
//! grains without a parent already read as zeros. Partial grains go
//! through writes.
//!
//! Before the first write the descriptor gets a new random CID, as qemu
//! does, so delta children made earlier from this image no longer match
//! it; its hex digits are overwritten in place by as many digits (qemu
//! writes the CID without zero padding), so the descriptor never changes
//! size; a CID line without 1 to 8 hex digits is left alone.
//!
//! Refused at open (writable): streamOptimized or otherwise compressed
//! extents, COWD (vmfsSparse) and seSparse extents, images whose primary
//! grain directory is damaged. `RDONLY`, `NOACCESS` and `ZERO` extents
//! open, but writes into them fail.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::descriptor::{Access, ExtentType};
use super::extent::{Extent, ExtentData, Grain, GrainTables, GteCodec, GD_BAD, GD_NONE, GD_ZERO};
use super::Vmdk;
use crate::endian::{le32_bytes, put_le32};
use crate::engine::append::{round_up, AppendState, Appender};
use crate::engine::cow::{fill_from_below, write_new_run, NewRun};
use crate::engine::order::Stage;
use crate::engine::overlap::{MetadataMap, Structure};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{Below, Layer, WriteLayer};
use crate::host::HostFile;

/// Largest run of grains allocated (and written) at once.
const MAX_RUN_BYTES: u64 = 1 << 20;

/// Largest host byte offset a 32-bit sector number can point at.
const MAX_SECTOR_BYTES: u64 = (u32::MAX as u64) * 512;

const REFUSE_HINT: &str = "use --overlay FILE or --snapshot";

/// The write state of a writable image: one entry per extent, and the
/// content id (CID) update done before the first write.
pub struct Writer {
    extents: Vec<ExtentWriter>,
    /// Set once the CID was dealt with (changed, or found unchangeable).
    cid_done: AtomicBool,
    cid_lock: Mutex<()>,
    /// The new CID, once written (`u64::MAX`: unchanged).
    new_cid: AtomicU64,
    /// The descriptor was changed and not yet synced.
    desc_dirty: AtomicBool,
}

enum ExtentWriter {
    Flat {
        dirty: AtomicBool,
    },
    Sparse(SparseWriter),
    /// Writes into this extent fail with this error.
    Refused(ErrorKind, String),
}

struct SparseWriter {
    /// The allocation frontier and the grains being allocated
    /// (extent-relative grain numbers).
    alloc: Appender,
    /// Byte offsets of the primary and redundant (0: none) directories.
    gd_at: u64,
    rgd_at: u64,
    zeroed_grain: bool,
    dirty: AtomicBool,
    /// Metadata ranges of the extent file no grain write may touch: the
    /// header, the embedded descriptor, both directories, every table.
    map: MetadataMap,
}

/// What one allocation run reserved.
struct Run {
    gt: u64,
    gdi: u64,
    /// Index of the first entry in its table.
    idx: u64,
    /// Extent-relative offset of the first grain.
    rel: u64,
    old: Vec<Grain>,
    host: u64,
}

fn refuse(what: &str) -> Error {
    Error::unsupported(format!("{what} cannot be written in place; {REFUSE_HINT}"))
}

impl Writer {
    /// The write state for `v`; refuses what cannot be written in place.
    pub fn new(v: &Vmdk) -> Result<Writer> {
        let mut extents = Vec::new();
        for e in &v.extents {
            let access = e.line.as_ref().map_or(Access::ReadWrite, |l| l.access);
            let w = match &e.data {
                ExtentData::Zero => ExtentWriter::Refused(
                    ErrorKind::ReadOnly,
                    "a ZERO extent stores no data and cannot be written".into(),
                ),
                ExtentData::NoAccess => ExtentWriter::Refused(
                    ErrorKind::ReadOnly,
                    "the extent is NOACCESS and cannot be written".into(),
                ),
                ExtentData::Flat { file, .. } => {
                    if access != Access::ReadWrite || !file.writable() {
                        ExtentWriter::Refused(
                            ErrorKind::ReadOnly,
                            "the extent is RDONLY and cannot be written".into(),
                        )
                    } else {
                        ExtentWriter::Flat {
                            dirty: AtomicBool::new(false),
                        }
                    }
                }
                ExtentData::Sparse { tables, info } => {
                    let kind = e.line.as_ref().map(|l| l.kind);
                    if info.kind != "KDMV" || kind == Some(ExtentType::SeSparse) {
                        return Err(refuse(&format!("VMDK {} extents", info.kind)));
                    }
                    if info.compressed || info.markers || info.footer {
                        return Err(refuse("streamOptimized (compressed) VMDK extents"));
                    }
                    if tables.used_redundant.load(Ordering::Relaxed) {
                        return Err(Error::unsupported(format!(
                            "the primary grain directory of {} is damaged (repair it with \
                             qemu-img check -r all); {REFUSE_HINT}",
                            tables.file.path().display()
                        )));
                    }
                    if access != Access::ReadWrite || !tables.file.writable() {
                        ExtentWriter::Refused(
                            ErrorKind::ReadOnly,
                            "the extent is RDONLY and cannot be written".into(),
                        )
                    } else {
                        ExtentWriter::Sparse(SparseWriter::new(tables, info)?)
                    }
                }
            };
            extents.push(w);
        }
        Ok(Writer {
            extents,
            cid_done: AtomicBool::new(false),
            cid_lock: Mutex::new(()),
            new_cid: AtomicU64::new(u64::MAX),
            desc_dirty: AtomicBool::new(false),
        })
    }

    /// The CID written by this writer, if it changed it.
    pub fn new_cid(&self) -> Option<u32> {
        match self.new_cid.load(Ordering::Acquire) {
            u64::MAX => None,
            c => Some(c as u32),
        }
    }
}

/// Where the hex digits of the `CID=` value lie in descriptor text.
fn find_cid(text: &[u8]) -> Option<std::ops::Range<usize>> {
    let mut start = 0;
    for line in text.split(|&b| b == b'\n') {
        let here = start;
        start += line.len() + 1;
        let lead = line.iter().take_while(|b| b.is_ascii_whitespace()).count();
        let Some(rest) = line[lead..].strip_prefix(b"CID") else {
            continue;
        };
        let mut i = here + lead + 3;
        let mut r = rest;
        while let [b' ' | b'\t', tail @ ..] = r {
            r = tail;
            i += 1;
        }
        let [b'=', tail @ ..] = r else { continue };
        r = tail;
        i += 1;
        while let [b' ' | b'\t' | b'"', tail @ ..] = r {
            r = tail;
            i += 1;
        }
        let digits = r.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        return Some(i..i + digits);
    }
    None
}

/// A fresh random CID of at most `digits` hex digits, different from
/// `old` and from the reserved values.
fn random_cid(old: Option<u32>, digits: usize) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mask = if digits >= 8 {
        u32::MAX
    } else {
        (1u32 << (4 * digits)) - 1
    };
    let mut n = 0u64;
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        let c = h.finish() as u32 & mask;
        if Some(c) != old && c < 0xffff_fffe {
            return c;
        }
        n += 1;
    }
}

impl SparseWriter {
    fn new(t: &GrainTables, info: &super::extent::SparseInfo) -> Result<SparseWriter> {
        let file = &t.file;
        let meta = file
            .file()
            .metadata()
            .map_err(|e| Error::io("cannot stat", e).with_path(file.path()))?;
        if !meta.file_type().is_file() {
            return Err(refuse(
                "sparse VMDK extents on devices (new grains are appended at the end of the file)",
            ));
        }
        let zeroed_grain = matches!(
            t.codec,
            GteCodec::Kdmv {
                zeroed_grain: true,
                ..
            }
        );
        let (gd_at, rgd_at) = info.gd_at;
        let rgd_at = if t.rgd.is_some() { rgd_at } else { 0 };
        // New space starts past the end of the file and past any table the
        // end of the file cuts short, rounded up to a grain.
        let gt_bytes = t.gt_bytes();
        let mut end = file.len();
        let dirs = t.gd.iter().chain(t.rgd.iter().flatten());
        for e in dirs {
            let o = e.load(Ordering::Relaxed);
            if !matches!(o, GD_NONE | GD_ZERO | GD_BAD) && o < file.len() {
                end = end.max(o.saturating_add(gt_bytes));
            }
        }
        let frontier = round_up(end, t.grain_size)
            .ok_or_else(|| Error::corrupt("the extent file is too large to grow"))?;
        let map = MetadataMap::new(file.path());
        map.add(0, 512, Structure::Header);
        let (d_at, d_len) = info.descriptor_at;
        map.add(d_at, d_len, Structure::Descriptor);
        let gd_bytes = t.gd.len() as u64 * 4;
        map.add(gd_at, gd_bytes, Structure::GrainDirectory);
        if rgd_at != 0 {
            map.add(rgd_at, gd_bytes, Structure::RedundantGrainDirectory);
        }
        for e in t.gd.iter().chain(t.rgd.iter().flatten()) {
            let o = e.load(Ordering::Relaxed);
            if !matches!(o, GD_NONE | GD_ZERO | GD_BAD) {
                map.add(o, gt_bytes, Structure::GrainTable);
            }
        }
        Ok(SparseWriter {
            map,
            alloc: Appender::new(frontier, MAX_SECTOR_BYTES),
            gd_at,
            rgd_at,
            zeroed_grain,
            dirty: AtomicBool::new(false),
        })
    }

    /// Checks that an existing grain may be written in place: it must not
    /// straddle the start of the space this writer allocates from.
    fn check_data(&self, host: u64, gs: u64, t: &GrainTables) -> Result<()> {
        // As on reads: a grain past the end of the file is corrupt (writing
        // there would grow the file to wherever the entry says).
        let end = t.end.load(Ordering::Acquire);
        if host >= end {
            return Err(Error::corrupt(format!(
                "grain table entry points at host offset {host:#x}, past the end of the file \
                 ({end} bytes)"
            )));
        }
        let first_own = self.alloc.first_own();
        if host < first_own && host + gs > first_own {
            return Err(Error::corrupt(format!(
                "grain table entry points at host offset {host:#x}, a grain overlapping the end \
                 of the file"
            )));
        }
        Ok(())
    }

    /// Reserves `len` bytes at the frontier, aligned to `align`.
    fn reserve(&self, t: &GrainTables, st: &mut AppendState, len: u64, align: u64) -> Result<u64> {
        let host = st.reserve(len, align).ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "the extent file cannot grow any further (2 TiB limit of sparse extents)",
            )
        })?;
        t.end.fetch_max(host + len, Ordering::AcqRel);
        Ok(host)
    }

    /// The grain table for directory index `gdi`, allocating one (written
    /// filled, redundant copy first, then the directory entries) when the
    /// directory has none. Under the lock.
    fn ensure_gt(&self, v: &Vmdk, t: &GrainTables, st: &mut AppendState, gdi: u64) -> Result<u64> {
        let cur = t.gd_entry(gdi);
        match cur {
            GD_BAD => {
                return Err(Error::corrupt(format!(
                    "grain directory entry {gdi} is invalid"
                )))
            }
            GD_NONE | GD_ZERO => {}
            loc if t.gt_in_file(loc, gdi) => return Ok(loc),
            loc => {
                return Err(Error::corrupt(format!(
                    "grain table {gdi} at offset {loc:#x} lies past the end of the file"
                )))
            }
        }
        if gdi as usize >= t.gd.len() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "write beyond the grain directory the extent header describes",
            ));
        }
        // A zeroed directory entry: the table's grains all read as zeros.
        let fill: u32 = if cur == GD_ZERO { 1 } else { 0 };
        let table: Vec<u8> = (0..t.gt_entries).flat_map(|_| le32_bytes(fill)).collect();
        let space = round_up(table.len() as u64, 512).expect("tables are small");
        let redundant = self.rgd_at != 0 && t.rgd_entry(gdi).is_some();
        self.dirty.store(true, Ordering::Release);
        let rhost = if redundant {
            let h = self.reserve(t, st, space, 512)?;
            self.map.add(h, space, Structure::GrainTable);
            t.file.write_all_at(&table, h)?;
            Some(h)
        } else {
            None
        };
        let host = self.reserve(t, st, space, 512)?;
        self.map.add(host, space, Structure::GrainTable);
        t.file.write_all_at(&table, host)?;
        let entry_at = gdi * 4;
        if let Some(rh) = rhost {
            t.file.write_ordered_at(
                &le32_bytes((rh / 512) as u32),
                self.rgd_at + entry_at,
                Stage::Map,
            )?;
            if let Some(r) = &t.rgd {
                r[gdi as usize].store(rh, Ordering::Release);
            }
        }
        t.file.write_ordered_at(
            &le32_bytes((host / 512) as u32),
            self.gd_at + entry_at,
            Stage::Map,
        )?;
        t.publish_gt(&v.caches, host, Some(table.into()));
        t.gd[gdi as usize].store(host, Ordering::Release);
        Ok(host)
    }

    /// Writes entries `idx..idx + raw.len()` of table `gdi` (at `gt`):
    /// redundant copy first, then the primary, then the cache. Under the lock.
    fn set_entries(
        &self,
        v: &Vmdk,
        t: &GrainTables,
        gdi: u64,
        gt: u64,
        idx: u64,
        raw: &[u32],
    ) -> Result<()> {
        let table = t.load_gt(&v.caches, gt)?;
        let mut new = table.to_vec();
        for (k, r) in raw.iter().enumerate() {
            let at = (idx as usize + k) * 4;
            put_le32(&mut new, at, *r);
        }
        if new[..] == table[..] {
            return Ok(());
        }
        let span = idx as usize * 4..(idx as usize + raw.len()) * 4;
        self.dirty.store(true, Ordering::Release);
        if self.rgd_at != 0 {
            if let Some(rgt) = t.rgd_entry(gdi) {
                if !matches!(rgt, GD_NONE | GD_ZERO | GD_BAD) && t.gt_in_file(rgt, gdi) {
                    t.file.write_ordered_at(
                        &new[span.clone()],
                        rgt + span.start as u64,
                        Stage::Map,
                    )?;
                }
            }
        }
        match t
            .file
            .write_ordered_at(&new[span.clone()], gt + span.start as u64, Stage::Map)
        {
            Ok(()) => {
                t.publish_gt(&v.caches, gt, Some(new.into()));
                Ok(())
            }
            Err(e) => {
                t.publish_gt(&v.caches, gt, None);
                Err(e)
            }
        }
    }
}

/// The table location for `gdi` if it exists and is usable.
fn existing_gt(t: &GrainTables, gdi: u64) -> Result<Option<u64>> {
    match t.gd_entry(gdi) {
        GD_NONE | GD_ZERO => Ok(None),
        GD_BAD => Err(Error::corrupt(format!(
            "grain directory entry {gdi} is invalid"
        ))),
        loc if t.gt_in_file(loc, gdi) => Ok(Some(loc)),
        loc => Err(Error::corrupt(format!(
            "grain table {gdi} at offset {loc:#x} lies past the end of the file"
        ))),
    }
}

/// What the table says about the grain holding extent-relative `rel`
/// (`GD_ZERO` tables read as zero grains).
fn grain_at(v: &Vmdk, t: &GrainTables, rel: u64) -> Result<Grain> {
    let cover = t.gt_cover();
    let gdi = rel / cover;
    if t.gd_entry(gdi) == GD_ZERO {
        return Ok(Grain::Zero);
    }
    match existing_gt(t, gdi)? {
        None => Ok(Grain::Unallocated),
        Some(loc) => {
            let gt = t.load_gt(&v.caches, loc)?;
            Ok(t.entry(&gt, (rel % cover) / t.grain_size))
        }
    }
}

fn bad_grain(g: Grain) -> Error {
    match g {
        Grain::Compressed(_) => Error::unsupported(format!(
            "compressed grains cannot be written in place; {REFUSE_HINT}"
        )),
        Grain::Bad(raw) => Error::corrupt(format!("grain table entry {raw:#x} is invalid")),
        g => Error::internal(format!("grain {g:?} reached the allocation path")),
    }
}

impl Vmdk {
    fn writer(&self) -> &Writer {
        self.writer
            .as_ref()
            .expect("write called on a VMDK layer opened read-only")
    }

    fn extent_index(&self, offset: u64) -> Result<usize> {
        let i = self.extents.partition_point(|e| e.start <= offset);
        i.checked_sub(1)
            .filter(|&i| offset - self.extents[i].start < self.extents[i].len)
            .ok_or_else(|| {
                Error::new(ErrorKind::OutOfRange, "offset beyond the last extent").at_guest(offset)
            })
    }

    /// Before the first write, gives the image a new CID as qemu does, so
    /// that delta children made from it earlier no longer match. The
    /// descriptor is rewritten in place, 8 hex digits over 8 hex digits;
    /// a descriptor whose CID has another width is left alone.
    fn update_cid_once(&self) {
        let w = self.writer();
        if w.cid_done.load(Ordering::Acquire) {
            return;
        }
        let _g = w.cid_lock.lock();
        if w.cid_done.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.update_cid(w) {
            log::warn!(
                "{}: the descriptor's CID was not updated: {e}",
                self.file.path().display()
            );
        }
        w.cid_done.store(true, Ordering::Release);
    }

    fn update_cid(&self, w: &Writer) -> Result<()> {
        let Some(d) = &self.desc else { return Ok(()) };
        let mut head = [0u8; 4];
        self.file.read_exact_at(&mut head, 0)?;
        let (at, len) = if &head == super::sparse::MAGIC {
            let h = super::sparse::Header::read(&self.file)?;
            if h.desc_offset == 0 || h.desc_size == 0 {
                return Ok(());
            }
            (
                h.desc_offset.saturating_mul(512),
                h.desc_size.saturating_mul(512),
            )
        } else if &head == super::cowd::MAGIC || super::sesparse::probe(&head) {
            return Ok(());
        } else {
            (0, self.file.len())
        };
        let len = len
            .min(super::descriptor::MAX_DESCRIPTOR)
            .min(self.file.len().saturating_sub(at));
        let mut text = vec![0u8; len as usize];
        self.file.read_exact_at(&mut text, at)?;
        let Some(r) = find_cid(&text) else {
            return Ok(());
        };
        let digits = r.len();
        if !(1..=8).contains(&digits) {
            log::info!(
                "{}: CID of {digits} digits left unchanged",
                self.file.path().display()
            );
            return Ok(());
        }
        // Same width, zero-padded: the text keeps its size.
        let cid = random_cid(d.cid, digits);
        w.desc_dirty.store(true, Ordering::Release);
        self.file
            .write_all_at(format!("{cid:0digits$x}").as_bytes(), at + r.start as u64)?;
        w.new_cid.store(u64::from(cid), Ordering::Release);
        Ok(())
    }

    fn has_parent(&self) -> bool {
        self.backing().is_some()
    }

    /// Writes the start of `buf` at extent-relative `rel` of sparse extent
    /// `e`; returns the bytes written (0: the state changed, try again).
    #[allow(clippy::too_many_arguments)]
    fn sparse_write(
        &self,
        e: &Extent,
        t: &GrainTables,
        w: &SparseWriter,
        buf: &[u8],
        rel: u64,
        below: &dyn Below,
        zeros: bool,
    ) -> Result<usize> {
        w.map.refuse_if_tripped()?;
        if rel >= t.capacity {
            return Err(Error::unsupported(
                "write beyond the capacity the sparse extent's header describes",
            ));
        }
        let buf = &buf[..(buf.len() as u64).min(t.capacity - rel) as usize];
        let gs = t.grain_size;
        let cover = t.gt_cover();
        let gdi = rel / cover;
        if let Some(loc) = existing_gt(t, gdi)? {
            let gt = t.load_gt(&self.caches, loc)?;
            let idx = (rel % cover) / gs;
            match t.entry(&gt, idx) {
                Grain::Data(host) => {
                    w.check_data(host, gs, t)?;
                    // Extend over following grains stored right after it.
                    let in_g = rel % gs;
                    let mut n = (gs - in_g).min(buf.len() as u64);
                    let mut k = 1;
                    while n < buf.len() as u64
                        && idx + k < t.gt_entries
                        && t.entry(&gt, idx + k) == Grain::Data(host + k * gs)
                        && w.check_data(host + k * gs, gs, t).is_ok()
                    {
                        n = (n + gs).min(buf.len() as u64);
                        k += 1;
                    }
                    w.map.guard(host + in_g, n, e.start + rel)?;
                    let n = n as usize;
                    w.dirty.store(true, Ordering::Release);
                    t.file.write_all_at(&buf[..n], host + in_g)?;
                    return Ok(n);
                }
                Grain::Unallocated | Grain::Zero => {}
                g => return Err(bad_grain(g)),
            }
        }
        self.allocate_and_write(e, t, w, buf, rel, below, zeros)
    }

    /// The allocation path: see the module documentation.
    #[allow(clippy::too_many_arguments)]
    fn allocate_and_write(
        &self,
        e: &Extent,
        t: &GrainTables,
        w: &SparseWriter,
        buf: &[u8],
        rel: u64,
        below: &dyn Below,
        zeros: bool,
    ) -> Result<usize> {
        let gs = t.grain_size;
        let cover = t.gt_cover();
        let gdi = rel / cover;
        let first_g = rel / gs;
        let grain_rel = first_g * gs;
        let buf_end = rel + buf.len() as u64;
        let run = {
            let mut st = w.alloc.lock();
            if st.is_pending(first_g) {
                w.alloc.wait(&mut st);
                return Ok(0);
            }
            let loc = w.ensure_gt(self, t, &mut st, gdi)?;
            let gt = t.load_gt(&self.caches, loc)?;
            let idx = (rel % cover) / gs;
            let first = t.entry(&gt, idx);
            match first {
                Grain::Data(_) => return Ok(0),
                Grain::Unallocated | Grain::Zero => {}
                g => return Err(bad_grain(g)),
            }
            let mut old = vec![first];
            let max = (MAX_RUN_BYTES / gs).max(1);
            while (old.len() as u64) < max
                && idx + (old.len() as u64) < t.gt_entries
                && grain_rel + (old.len() as u64) * gs < buf_end
            {
                let g = t.entry(&gt, idx + old.len() as u64);
                if !matches!(g, Grain::Unallocated | Grain::Zero)
                    || st.is_pending(first_g + old.len() as u64)
                {
                    break;
                }
                old.push(g);
            }
            let host = w.reserve(t, &mut st, old.len() as u64 * gs, gs)?;
            let claim = w.alloc.claim(&mut st, first_g..first_g + old.len() as u64);
            let run = Run {
                gt: loc,
                gdi,
                idx,
                rel: grain_rel,
                old,
                host,
            };
            (run, claim)
        };
        let (run, _claim) = run;
        self.fill_and_publish(e, t, w, &run, buf, rel, below, zeros)
    }

    /// Fills and writes the grains of a reserved run, then points their
    /// table entries at them. Returns the bytes of `buf` written.
    #[allow(clippy::too_many_arguments)]
    fn fill_and_publish(
        &self,
        e: &Extent,
        t: &GrainTables,
        w: &SparseWriter,
        run: &Run,
        buf: &[u8],
        rel: u64,
        below: &dyn Below,
        zeros: bool,
    ) -> Result<usize> {
        let gs = t.grain_size;
        let count = run.old.len() as u64;
        let cap = t.capacity;
        // In guest offsets (the extent starts at `e.start`), as the layers
        // below and the overlap log see them.
        let new_run = NewRun {
            guest: e.start + run.rel,
            host: run.host,
            count,
            unit: gs,
        };
        w.dirty.store(true, Ordering::Release);
        let end = e.start + cap;
        let n = write_new_run(
            &t.file,
            &w.map,
            new_run,
            end,
            buf,
            e.start + rel,
            zeros,
            &mut |k, c, out| match run.old[k] {
                Grain::Zero => Ok(()),
                _ => fill_from_below(below, c, out, end),
            },
        )?;
        let raw: Vec<u32> = (0..count)
            .map(|k| ((run.host + k * gs) / 512) as u32)
            .collect();
        let _st = w.alloc.lock();
        w.set_entries(self, t, run.gdi, run.gt, run.idx, &raw)?;
        Ok(n)
    }

    /// Marks the whole grains `[rel, end)` (inside one grain table) as
    /// zeroed grains (entry 1). Returns the bytes handled.
    fn zero_grains(&self, t: &GrainTables, w: &SparseWriter, rel: u64, end: u64) -> Result<u64> {
        let gs = t.grain_size;
        let cover = t.gt_cover();
        let gdi = rel / cover;
        let end = end.min((gdi + 1) * cover);
        let has_parent = self.has_parent();
        let mut st = w.alloc.lock();
        let first_g = rel / gs;
        let count = (end - rel).div_ceil(gs);
        w.alloc.wait_for(&mut st, first_g..first_g + count);
        let cur = t.gd_entry(gdi);
        if cur == GD_ZERO || (cur == GD_NONE && !has_parent) {
            return Ok(end - rel);
        }
        let loc = w.ensure_gt(self, t, &mut st, gdi)?;
        let gt = t.load_gt(&self.caches, loc)?;
        let idx = (rel % cover) / gs;
        let mut raw = Vec::with_capacity(count as usize);
        for k in 0..count {
            let r = match t.entry(&gt, idx + k) {
                Grain::Unallocated if !has_parent => 0,
                Grain::Bad(x) => {
                    return Err(Error::corrupt(format!(
                        "grain table entry {x:#x} is invalid"
                    )))
                }
                _ => 1,
            };
            raw.push(r);
        }
        w.set_entries(self, t, gdi, loc, idx, &raw)?;
        Ok(end - rel)
    }

    /// `write_zeroes` inside sparse extent `e`, extent-relative.
    fn sparse_zeroes(
        &self,
        e: &Extent,
        t: &GrainTables,
        w: &SparseWriter,
        rel: u64,
        end: u64,
        below: &dyn Below,
    ) -> Result<()> {
        w.map.refuse_if_tripped()?;
        let gs = t.grain_size;
        let has_parent = self.has_parent();
        let zeros = vec![0u8; MAX_RUN_BYTES.max(gs) as usize];
        let cap = t.capacity;
        let mut pos = rel;
        // Past the tables everything reads as unallocated: zeros without
        // a parent.
        if end > cap && has_parent {
            return Err(Error::unsupported(
                "zeroing beyond the capacity the sparse extent's header describes",
            ));
        }
        let end = end.min(cap);
        let cover = t.gt_cover();
        while pos < end {
            let gde = t.gd_entry(pos / cover);
            if gde == GD_ZERO || (gde == GD_NONE && !has_parent) {
                // The whole table reads as zeros already.
                pos = end.min((pos / cover + 1) * cover);
                continue;
            }
            let c = pos - pos % gs;
            let whole = pos == c && end >= (c + gs).min(cap);
            let grain = grain_at(self, t, pos)?;
            if matches!(grain, Grain::Zero) || (grain == Grain::Unallocated && !has_parent) {
                pos = (c + gs).min(end);
                continue;
            }
            if !whole {
                let piece_end = end.min(c + gs);
                let n = (piece_end - pos) as usize;
                let mut done = 0;
                while done < n {
                    done += self.sparse_write(
                        e,
                        t,
                        w,
                        &zeros[..n - done],
                        pos + done as u64,
                        below,
                        true,
                    )?;
                }
                pos = piece_end;
                continue;
            }
            // Whole grains: up to the last grain boundary (or the end of
            // the extent's tables) inside the range.
            let whole_end = if end >= cap { end } else { end - end % gs };
            if w.zeroed_grain {
                pos += self.zero_grains(t, w, pos, whole_end)?;
                continue;
            }
            if let Grain::Data(h) = grain {
                w.check_data(h, gs, t)?;
                w.map.guard(h, gs, e.start + pos)?;
                w.dirty.store(true, Ordering::Release);
                t.file.punch_hole(h, gs)?;
                pos += gs;
                continue;
            }
            let n = (whole_end - pos).min(zeros.len() as u64) as usize;
            pos += self.sparse_write(e, t, w, &zeros[..n], pos, below, true)? as u64;
        }
        Ok(())
    }
}

fn refused(kind: ErrorKind, msg: &str, e: &Extent) -> Error {
    let err = Error::new(
        kind,
        match &e.line {
            Some(l) => format!("{msg} ({l})"),
            None => msg.to_string(),
        },
    );
    match &e.file {
        Some(f) => err.with_path(f.path()),
        None => err,
    }
}

fn flat_file(e: &Extent) -> (&Arc<HostFile>, u64) {
    match &e.data {
        ExtentData::Flat { file, offset } => (file, *offset),
        _ => unreachable!("flat writer on a non-flat extent"),
    }
}

fn sparse_tables(e: &Extent) -> &GrainTables {
    match &e.data {
        ExtentData::Sparse { tables, .. } => tables,
        _ => unreachable!("sparse writer on a non-sparse extent"),
    }
}

impl WriteLayer for Vmdk {
    fn write_at(&self, buf: &[u8], offset: u64, below: &dyn Below) -> Result<()> {
        let w = self.writer();
        self.update_cid_once();
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let i = self.extent_index(pos)?;
            let e = &self.extents[i];
            let rel = pos - e.start;
            let n = ((buf.len() - done) as u64).min(e.len - rel) as usize;
            let piece = &buf[done..done + n];
            let wrote = match &w.extents[i] {
                ExtentWriter::Flat { dirty } => {
                    let (file, base) = flat_file(e);
                    dirty.store(true, Ordering::Release);
                    file.write_all_at(piece, base + rel)
                        .map_err(|err| err.at_guest(pos))?;
                    n
                }
                ExtentWriter::Sparse(sw) => {
                    let t = sparse_tables(e);
                    let n = self
                        .sparse_write(e, t, sw, piece, rel, below, false)
                        .map_err(|err| err.at_guest(pos))?;
                    t.file.flush_ordered_if_due()?;
                    n
                }
                ExtentWriter::Refused(kind, msg) => {
                    return Err(refused(*kind, msg, e).at_guest(pos));
                }
            };
            done += wrote;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn Below) -> Result<()> {
        let w = self.writer();
        self.update_cid_once();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let i = self.extent_index(pos)?;
            let e = &self.extents[i];
            let rel = pos - e.start;
            let n = (end - pos).min(e.len - rel);
            match &w.extents[i] {
                ExtentWriter::Flat { dirty } => {
                    let (file, base) = flat_file(e);
                    dirty.store(true, Ordering::Release);
                    file.punch_hole(base + rel, n)
                        .map_err(|err| err.at_guest(pos))?;
                }
                ExtentWriter::Sparse(sw) => {
                    let t = sparse_tables(e);
                    self.sparse_zeroes(e, t, sw, rel, rel + n, below)
                        .map_err(|err| err.at_guest(pos))?;
                    t.file.flush_ordered_if_due()?;
                }
                // A ZERO extent already reads as zeros.
                ExtentWriter::Refused(..) if matches!(e.data, ExtentData::Zero) => {}
                ExtentWriter::Refused(kind, msg) => {
                    return Err(refused(*kind, msg, e).at_guest(pos));
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn metadata_maps(&self) -> Vec<&MetadataMap> {
        let w = self.writer();
        w.extents
            .iter()
            .filter_map(|ew| match ew {
                ExtentWriter::Sparse(s) => Some(&s.map),
                _ => None,
            })
            .collect()
    }

    fn flush(&self) -> Result<()> {
        let w = self.writer();
        for (e, ew) in self.extents.iter().zip(&w.extents) {
            let (dirty, file) = match ew {
                ExtentWriter::Flat { dirty } => (dirty, flat_file(e).0),
                ExtentWriter::Sparse(sw) => (&sw.dirty, &sparse_tables(e).file),
                ExtentWriter::Refused(..) => continue,
            };
            // `dirty` is never cleared (it means "written since open"): a
            // write marks its extent before it lands, so a flush clearing
            // the flag could sync before that write while a concurrent
            // flush, which must cover it, found the flag clear and skipped
            // the extent (the power-cut test's concurrent writers found
            // it). Concurrent flushes of one file are serialised by its
            // queue, so a flush never returns before an earlier one ends.
            if dirty.load(Ordering::Acquire) {
                // Sparse extents: queued table updates after their grains.
                file.flush_ordered()?;
            }
        }
        if w.desc_dirty.swap(false, Ordering::AcqRel) {
            if let Err(err) = self.file.sync_data() {
                w.desc_dirty.store(true, Ordering::Release);
                return Err(err);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cid_digits() {
        let t = b"# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\nCID=79f443a\n";
        let r = find_cid(t).unwrap();
        assert_eq!(&t[r], b"79f443a");
        let t = b"version=1\n  CID = \"0a0b0c0d\"\nparentCID=ffffffff\n";
        let r = find_cid(t).unwrap();
        assert_eq!(&t[r], b"0a0b0c0d");
        assert!(find_cid(b"parentCID=ffffffff\n").is_none());
    }

    #[test]
    fn random_cids_keep_their_width() {
        for digits in 1..=8 {
            for _ in 0..20 {
                let c = random_cid(Some(3), digits);
                assert_ne!(c, 3);
                assert!(format!("{c:x}").len() <= digits);
                assert!(c < 0xffff_fffe);
            }
        }
    }
}
