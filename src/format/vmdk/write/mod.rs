//! In-place writes into VMDK images: flat extents and hosted sparse
//! (`KDMV`, uncompressed) extents, as in monolithicFlat, twoGbMaxExtentFlat,
//! vmfs/vmfsThin, monolithicSparse and twoGbMaxExtentSparse images.
//!
//! Flat extents are written directly at their offset; hosted sparse
//! extents allocate grains and grain tables at the end of their file
//! (`grains`); before the first write the descriptor gets a new CID
//! (`cid`). [`WriteLayer::flush`] makes everything durable.
//!
//! Refused at open (writable): streamOptimized or otherwise compressed
//! extents, COWD (vmfsSparse) and seSparse extents, images whose primary
//! grain directory is damaged. `RDONLY`, `NOACCESS` and `ZERO` extents
//! open, but writes into them fail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::descriptor::{Access, ExtentType};
use super::extent::{Extent, ExtentData, GrainTables};
use super::Vmdk;
use crate::engine::overlap::MetadataMap;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{Below, Layer, WriteLayer};
use crate::host::HostFile;

mod cid;
mod grains;

use cid::CidUpdate;
use grains::SparseWriter;

const REFUSE_HINT: &str = "use --overlay FILE or --snapshot";

/// The write state of a writable image: one entry per extent, and the
/// content id (CID) update done before the first write.
pub struct Writer {
    extents: Vec<ExtentWriter>,
    cid: CidUpdate,
}

enum ExtentWriter {
    Flat {
        dirty: AtomicBool,
    },
    Sparse(SparseWriter),
    /// Writes into this extent fail with this error.
    Refused(ErrorKind, String),
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
            cid: CidUpdate::new(),
        })
    }

    /// The CID written by this writer, if it changed it.
    pub fn new_cid(&self) -> Option<u32> {
        self.cid.new_cid()
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

    fn has_parent(&self) -> bool {
        self.backing().is_some()
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
        w.cid.once(self);
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
        w.cid.once(self);
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
        w.cid.flush(&self.file)
    }
}
