//! A top image and its backing files, seen as one disk.
//!
//! [`Chain::open`] opens the top image, then follows each layer's
//! [`crate::format::BackingSpec`] down: names resolved by the [`OpenPolicy`] against the
//! naming image's directory, format from the image or detected, loops and
//! absurd depths refused, VMDK parentCID checked against the parent's CID.
//!
//! [`Chain::read_at`] is the one place where bytes move on the read path: it
//! asks each layer's driver for the mapping of a run and then reads host
//! files, fills zeros, decodes compressed blocks through the shared block
//! cache, or descends to the backing layer. Reads past the end of a shorter
//! backing layer are zeros.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use crate::cache::Caches;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{self, Below, CompressedBlock, Format, Layer, Mapping, OpenCtx, WriteLayer};
use crate::host::HostFile;
use crate::policy::OpenPolicy;

/// Default bound on the number of layers in a chain.
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// Largest decompressed block a driver may describe (qcow2's 2 MiB clusters
/// are the largest real case).
const MAX_BLOCK: u64 = 16 << 20;

/// Reads at least this large may be split over threads (compressed chains).
const PARALLEL_MIN: usize = 256 << 10;

/// Parallel pieces start on this boundary (a common cluster size).
const PARALLEL_ALIGN: usize = 64 << 10;

/// How to open a chain.
#[derive(Debug, Clone)]
pub struct ChainOptions {
    /// Force the top image's format instead of detecting it.
    pub format: Option<Format>,
    /// Policy for backing, extent and data files.
    pub policy: OpenPolicy,
    /// Refuse chains with more layers than this.
    pub max_depth: usize,
    /// Open only the top layer; unallocated ranges read as zeros.
    pub single_link: bool,
    /// Accept a VMDK parent whose CID differs from the child's parentCID.
    pub ignore_cid: bool,
    /// Open the top layer for writing.
    pub writable: bool,
    /// Read this internal snapshot of the top image (qcow2 only, read-only)
    /// instead of its active state: qemu-nbd's `-l`.
    pub load_snapshot: Option<format::qcow2::snapshot::SnapshotSel>,
}

impl Default for ChainOptions {
    fn default() -> Self {
        ChainOptions {
            format: None,
            policy: OpenPolicy::default(),
            max_depth: DEFAULT_MAX_DEPTH,
            single_link: false,
            ignore_cid: false,
            writable: false,
            load_snapshot: None,
        }
    }
}

/// Whether a run of the disk holds data or reads as zeros without being stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Some layer stores data for the run (possibly compressed).
    Data,
    /// No layer stores data; the run reads as zeros.
    Hole,
}

/// A chain of layers, top first.
pub struct Chain {
    layers: Vec<Arc<dyn Layer>>,
    caches: Arc<Caches>,
    /// Set once a compressed block was decoded: large reads then go parallel.
    seen_compressed: std::sync::atomic::AtomicBool,
}

impl Chain {
    /// Opens the image at `path` and its whole backing chain.
    pub fn open(path: &Path, opts: &ChainOptions, caches: &Arc<Caches>) -> Result<Chain> {
        let top_file = opts.policy.open_path(path, opts.writable)?;
        Self::open_on(top_file, opts, caches)
    }

    /// Opens a chain whose top image is the already open `top_file` (a
    /// temporary overlay, say) and whose backing files are named inside it.
    pub fn open_on(
        top_file: Arc<HostFile>,
        opts: &ChainOptions,
        caches: &Arc<Caches>,
    ) -> Result<Chain> {
        let path = top_file.path().to_path_buf();
        let path = path.as_path();
        // Drivers may start opening remote backing files early, when the
        // chain will follow them (see crate::remote::ahead).
        let _ahead = crate::remote::ahead::scope(!opts.single_link);
        let mut policy = opts.policy.clone();
        if policy.untrusted && policy.root.is_none() {
            policy.root = Some(path.parent().unwrap_or(Path::new(".")).to_path_buf());
        }
        let top_format = match opts.format {
            Some(f) => f,
            None => format::detect(&top_file)?,
        };
        let top_ctx = OpenCtx {
            caches,
            policy: &policy,
            writable: opts.writable,
        };
        let top: Arc<dyn Layer> = if let Some(sel) = &opts.load_snapshot {
            if top_format != Format::Qcow2 {
                return Err(Error::unsupported(format!(
                    "--load-snapshot needs a qcow2 image; this one is {top_format}"
                ))
                .with_path(path));
            }
            Arc::new(format::qcow2::Qcow2::open_snapshot(
                top_file, &top_ctx, sel,
            )?)
        } else if opts.format.is_none() && top_format == Format::Raw {
            // Probed raw: guard writes that would turn it into another format.
            Arc::new(format::raw::Raw::open_probed(top_file, &top_ctx)?)
        } else {
            format::open_layer_on(top_file, top_format, &top_ctx)?
        };
        if opts.writable && top.as_write().is_none() {
            return Err(Error::unsupported(format!(
                "{} images of this kind cannot be written in place; use --overlay FILE or --snapshot",
                top.format()
            ))
            .with_path(path));
        }
        let mut seen = HashSet::new();
        let mut layers = vec![top];
        record_identity(&layers[0], &mut seen)?;
        let ro_ctx = OpenCtx {
            caches,
            policy: &policy,
            writable: false,
        };
        loop {
            let child = layers.last().expect("chain has a top layer").clone();
            let Some(spec) = child.backing().filter(|_| !opts.single_link) else {
                break;
            };
            if layers.len() >= opts.max_depth {
                return Err(Error::new(
                    ErrorKind::ChainTooDeep,
                    format!("backing chain is deeper than {} layers", opts.max_depth),
                )
                .with_path(path));
            }
            let parent = open_backing(&child, &spec, &policy, &ro_ctx)?;
            if !record_identity(&parent, &mut seen)? {
                return Err(Error::new(
                    ErrorKind::ChainLoop,
                    format!(
                        "backing file {:?} is already part of the chain (loop)",
                        spec.name
                    ),
                )
                .with_path(child.path()));
            }
            if let (Some(expected), Some(actual)) = (spec.parent_cid, parent.cid()) {
                if expected != actual && !opts.ignore_cid {
                    return Err(Error::new(
                        ErrorKind::CidMismatch,
                        format!(
                            "parentCID {expected:08x} does not match CID {actual:08x} of parent {:?} \
                             (the parent changed after the snapshot; --ignore-cid overrides)",
                            spec.name
                        ),
                    )
                    .with_path(child.path()));
                }
            }
            check_parent_id(&child, &parent, &spec.name, opts.ignore_cid)?;
            if !opts.ignore_cid {
                child
                    .check_parent(parent.as_ref())
                    .map_err(|e| e.with_path(child.path()))?;
            }
            layers.push(parent);
        }
        Ok(Chain {
            layers,
            caches: caches.clone(),
            seen_compressed: Default::default(),
        })
    }

    /// The guest size: the top layer's virtual size.
    pub fn size(&self) -> u64 {
        self.layers[0].virtual_size()
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[Arc<dyn Layer>] {
        &self.layers
    }

    /// The shared caches.
    pub fn caches(&self) -> &Arc<Caches> {
        &self.caches
    }

    /// Reads `buf.len()` bytes at guest `offset`. The range must lie inside the disk.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| {
                Error::new(ErrorKind::OutOfRange, "read beyond the end of the disk")
                    .at_guest(offset)
            })?;
        let _ = end;
        let parts = self.parallel_parts(buf.len());
        if parts <= 1 {
            return self.read_layer(0, buf, offset);
        }
        // Decoding compressed blocks is CPU-bound: spread a large request
        // over the threads of rayon's pool, created once (the kernel sends
        // sequential reads as one or two large requests at a time, so there
        // is nothing else to overlap).
        let chunk = buf.len().div_ceil(parts).next_multiple_of(PARALLEL_ALIGN);
        buf.par_chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(i, piece)| {
                let off = offset + (i * chunk) as u64;
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.read_layer(0, piece, off)
                }))
                .unwrap_or_else(|_| Err(Error::internal("a read worker panicked").at_guest(off)))
            })
    }

    /// How many threads a read of `len` bytes should use: more than one only
    /// for large reads of a chain that has served compressed blocks.
    fn parallel_parts(&self, len: usize) -> usize {
        if len < PARALLEL_MIN
            || !self
                .seen_compressed
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return 1;
        }
        rayon::current_num_threads()
            .min(4)
            .min(len / (PARALLEL_MIN / 2))
    }

    fn read_layer(&self, idx: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(layer) = self.layers.get(idx) else {
            buf.fill(0);
            return Ok(());
        };
        let size = layer.virtual_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            if pos >= size {
                // A backing layer shorter than the one above reads as zeros.
                buf[done..].fill(0);
                break;
            }
            let want = ((buf.len() - done) as u64).min(size - pos);
            // Held until the run's bytes are read: a cluster freed
            // meanwhile is not reused before (see engine::reclaim).
            let pin = layer.pin_reads();
            let (mapping, n) = layer
                .map(pos, want)
                .map_err(|e| e.with_path(layer.path()))?;
            if n == 0 || n > want {
                return Err(Error::internal(format!(
                    "driver mapped a run of {n} bytes where 1..={want} were asked"
                ))
                .at_guest(pos)
                .with_path(layer.path()));
            }
            let chunk = &mut buf[done..done + n as usize];
            match mapping {
                Mapping::Data { file, offset } => file.read_zero_fill_at(chunk, offset)?,
                Mapping::Zero => chunk.fill(0),
                Mapping::Backing => {
                    drop(pin);
                    self.read_layer(idx + 1, chunk, pos)?
                }
                Mapping::Compressed(block) => self.read_compressed(layer, &block, chunk, pos)?,
            }
            done += n as usize;
        }
        Ok(())
    }

    fn read_compressed(
        &self,
        layer: &Arc<dyn Layer>,
        block: &CompressedBlock,
        out: &mut [u8],
        pos: u64,
    ) -> Result<()> {
        let bad = |what: &str| {
            Err(Error::corrupt(format!("compressed block {what}"))
                .at_guest(pos)
                .with_path(layer.path()))
        };
        if block.len == 0 || block.len > MAX_BLOCK {
            return bad("has an impossible size");
        }
        let start = match pos.checked_sub(block.guest_start) {
            Some(s) if s + out.len() as u64 <= block.len => s as usize,
            _ => return bad("does not cover the mapped range"),
        };
        self.seen_compressed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let key = (layer.cache_id(), block.key);
        if start == 0 && out.len() as u64 == block.len {
            // The whole block: decode straight into the reply. Whoever reads
            // a block whole (sequential streams) has the kernel's page cache
            // behind it; keeping a second copy here would only evict blocks
            // that partial reads share.
            if let Some(d) = self.caches.blocks.get(key).filter(|d| d.len() == out.len()) {
                out.copy_from_slice(&d);
                return Ok(());
            }
            return layer
                .decompress(block, out)
                .map_err(|e| e.at_host(block.host_offset).with_path(layer.path()));
        }
        let need = start + out.len();
        let data = match self.caches.blocks.get(key) {
            Some(d) if d.len() >= need && d.len() as u64 <= block.len => d,
            cached => {
                // A first miss decodes only as far as this read needs (a
                // random read lands in the middle of a block on average, so
                // this halves the work); a later read past that prefix
                // decodes the whole block, and the cache keeps it.
                let len = if cached.is_some() {
                    block.len as usize
                } else {
                    need
                };
                let mut d = vec![0u8; len];
                layer
                    .decompress(block, &mut d)
                    .map_err(|e| e.at_host(block.host_offset).with_path(layer.path()))?;
                let d: Arc<[u8]> = d.into();
                self.caches.blocks.insert(key, d.clone());
                d
            }
        };
        out.copy_from_slice(&data[start..start + out.len()]);
        Ok(())
    }

    /// The host file holding the whole disk byte for byte, when the chain
    /// is a single layer that has one (a raw image): FUSE passthrough.
    pub fn passthrough_file(&self) -> Option<Arc<HostFile>> {
        match self.layers.as_slice() {
            // A remote object has no local descriptor to pass through.
            [only] if only.virtual_size() == self.size() => {
                only.passthrough_file().filter(|f| f.remote().is_none())
            }
            _ => None,
        }
    }

    /// True when the top layer was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.layers[0].as_write().is_some()
    }

    fn writer(&self) -> Result<&dyn WriteLayer> {
        self.layers[0].as_write().ok_or_else(|| {
            Error::new(ErrorKind::ReadOnly, "the disk is mounted read-only")
                .with_path(self.layers[0].path())
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(
                Error::new(ErrorKind::OutOfRange, "beyond the end of the disk").at_guest(offset),
            ),
        }
    }

    /// Writes `buf` at guest `offset` into the top layer; partial
    /// allocation units are completed from the layers below.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let below = LayersBelow { chain: self };
        self.writer()?
            .write_at(buf, offset, &below)
            .map_err(|e| e.with_path(self.layers[0].path()))
    }

    /// Makes a range read as zeros (discard, punch hole, zero range).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let below = LayersBelow { chain: self };
        self.writer()?
            .write_zeroes(offset, len, &below)
            .map_err(|e| e.with_path(self.layers[0].path()))
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        match self.layers[0].as_write() {
            Some(w) => w.flush().map_err(|e| e.with_path(self.layers[0].path())),
            None => Ok(()),
        }
    }

    /// Whether the run at `offset` (at most `max_len` bytes) holds data in
    /// any layer, and the run's length.
    pub fn status(&self, offset: u64, max_len: u64) -> Result<(Status, u64)> {
        self.status_layer(0, offset, max_len)
    }

    fn status_layer(&self, idx: usize, offset: u64, max_len: u64) -> Result<(Status, u64)> {
        let Some(layer) = self.layers.get(idx) else {
            return Ok((Status::Hole, max_len));
        };
        let size = layer.virtual_size();
        if offset >= size {
            return Ok((Status::Hole, max_len));
        }
        let want = max_len.min(size - offset);
        let (mapping, n) = layer
            .map(offset, want)
            .map_err(|e| e.with_path(layer.path()))?;
        let n = n.clamp(1, want);
        Ok(match mapping {
            // A raw file (or a flat VMDK extent) has no allocation map of
            // its own: the host file's holes are the disk's, as qemu reports
            // them (`qemu-img map`) by asking the host.
            Mapping::Data { file, offset: host } if host_sparse(layer.as_ref()) => {
                match file.host_run(host, n) {
                    Some((false, run)) => (Status::Hole, run),
                    Some((true, run)) => (Status::Data, run),
                    None => (Status::Data, n),
                }
            }
            Mapping::Data { .. } | Mapping::Compressed(_) => (Status::Data, n),
            Mapping::Zero => (Status::Hole, n),
            Mapping::Backing => self.status_layer(idx + 1, offset, n)?,
        })
    }

    /// Guest bytes that layer `idx` itself stores (data or compressed), and
    /// the first mapping error met on the way, if any. Damaged ranges are
    /// skipped a cluster at a time and counted as not stored, so one bad
    /// table entry does not hide the rest of the report.
    pub fn layer_allocated(&self, idx: usize) -> (u64, Option<Error>) {
        let layer = &self.layers[idx];
        let size = layer.virtual_size();
        let step = layer.info().cluster_size.unwrap_or(65536).max(512);
        let mut pos = 0;
        let mut total = 0;
        let mut first_error = None;
        let mut errors = 0u32;
        // Raw files and flat extents store what the host file stores: their
        // holes are counted out, as `du` and qemu-img's map see them.
        let sparse = host_sparse(layer.as_ref());
        while pos < size {
            match layer.map(pos, size - pos) {
                Ok((m, n)) => {
                    let n = n.clamp(1, size - pos);
                    match m {
                        Mapping::Data { file, offset } if sparse => {
                            total += host_data_bytes(&file, offset, n);
                        }
                        Mapping::Data { .. } | Mapping::Compressed(_) => total += n,
                        Mapping::Zero | Mapping::Backing => {}
                    }
                    pos += n;
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(e.with_path(layer.path()));
                    if errors > 4096 {
                        // Give up counting on a thoroughly damaged image.
                        break;
                    }
                    pos = (pos / step + 1).saturating_mul(step);
                }
            }
        }
        (total, first_error)
    }
}

/// Checks a differencing VHD's parent UUID against the parent's unique
/// id, as the VMDK parentCID check does (`--ignore-cid` overrides both).
fn check_parent_id(
    child: &Arc<dyn Layer>,
    parent: &Arc<dyn Layer>,
    name: &str,
    ignore: bool,
) -> Result<()> {
    let (Some(expected), Some(actual)) = (child.parent_unique_id(), parent.unique_id()) else {
        return Ok(());
    };
    if expected == actual || ignore {
        return Ok(());
    }
    let hex = |id: [u8; 16]| crate::format::vhd::footer::uuid_string(&id);
    Err(Error::new(
        ErrorKind::CidMismatch,
        format!(
            "parent UUID {} does not match unique id {} of parent {name:?} \
             (not the parent this disk was made from; --ignore-cid overrides)",
            hex(expected),
            hex(actual)
        ),
    )
    .with_path(child.path()))
}

/// What the layers under the top one hold, for copy-on-write.
struct LayersBelow<'a> {
    chain: &'a Chain,
}

impl Below for LayersBelow<'_> {
    fn read_below(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.chain.read_layer(1, buf, offset)
    }
}

/// Records the (device, inode) of each host file of `layer`; false if one
/// was already seen.
fn record_identity(layer: &Arc<dyn Layer>, seen: &mut HashSet<(u64, u64)>) -> Result<bool> {
    let mut fresh = true;
    for f in layer.host_files().iter().take(1) {
        if let Some(r) = f.remote() {
            // A remote object is known by its URL (device u64::MAX: no local file's).
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            r.url().hash(&mut h);
            fresh &= seen.insert((u64::MAX, h.finish()));
            continue;
        }
        let m = f
            .file()
            .metadata()
            .map_err(|e| Error::io("cannot stat", e).with_path(f.path()))?;
        fresh &= seen.insert((m.dev(), m.ino()));
    }
    Ok(fresh)
}

/// True for layers whose data runs are plain byte ranges of a host file
/// without an allocation map: raw images and flat VMDKs.
/// Bytes of `len` at host `offset` that the host file stores (all of
/// them when the host cannot tell).
fn host_data_bytes(file: &HostFile, offset: u64, len: u64) -> u64 {
    let mut done = 0;
    let mut data = 0;
    while done < len {
        match file.host_run(offset + done, len - done) {
            Some((is_data, run)) => {
                let run = run.clamp(1, len - done);
                if is_data {
                    data += run;
                }
                done += run;
            }
            None => return data + (len - done),
        }
    }
    data
}

/// Whether the layer has no allocation map of its own (raw, flat VMDK): the
/// host file's holes are its holes.
pub(crate) fn host_sparse(layer: &dyn Layer) -> bool {
    match layer.format() {
        Format::Raw => true,
        Format::Vmdk => layer.info().subformat.is_some_and(|s| {
            matches!(
                s.as_str(),
                "monolithicFlat" | "twoGbMaxExtentFlat" | "vmfs" | "vmfsRaw" | "vmfsPreallocated"
            )
        }),
        _ => false,
    }
}

fn open_backing(
    child: &Arc<dyn Layer>,
    spec: &crate::format::BackingSpec,
    policy: &OpenPolicy,
    ctx: &OpenCtx<'_>,
) -> Result<Arc<dyn Layer>> {
    let path: PathBuf = policy.resolve(child.path(), &spec.name)?;
    let wrap = |e: Error| {
        e.context(format!("backing file {:?} cannot be opened", spec.name))
            .with_path(child.path())
    };
    let file = policy.open_path(&path, false).map_err(wrap)?;
    let fmt = match spec.format {
        Some(f) => f,
        None if policy.untrusted => {
            return Err(Error::new(
                ErrorKind::Policy,
                format!(
                    "backing file {:?} has no recorded format and untrusted mode does not probe",
                    spec.name
                ),
            )
            .with_path(child.path()))
        }
        None => format::detect(&file).map_err(wrap)?,
    };
    format::open_layer_on(file, fmt, ctx).map_err(wrap)
}
