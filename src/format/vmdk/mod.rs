//! VMDK driver: reads every hosted and ESXi subformat qemu and VMware
//! write, through one extent list; writes flat and hosted sparse extents
//! in place (see [`write`](mod@write)).
//!
//! An image is a descriptor (a text file, or text embedded in a hosted
//! sparse extent) listing extents in guest order; each extent is flat
//! (raw data at an offset in a file), zero, or sparse with grain tables
//! (hosted `KDMV` sparse and stream-optimized, ESXi `COWD`, ESXi seSparse).
//! A top file that is itself a sparse extent without a separate descriptor
//! is a one-extent image. See `docs/vmdk.md` for the support matrix.
//!
//! - [`descriptor`]: descriptor text parsing.
//! - [`extent`]: the extent list entries, the shared grain-table walker and
//!   what every sparse flavour shares (`SparseInfo`, limits); the flavour
//!   modules below depend on it, never the reverse.
//! - [`sparse`]: hosted sparse and stream-optimized extents.
//! - [`cowd`]: ESXi `COWD` (vmfsSparse) extents.
//! - [`sesparse`]: ESXi seSparse extents.
//! - [`write`](mod@write): in-place writes (flat extents; hosted sparse
//!   grain allocation in `write/grains.rs`; the CID update in `write/cid.rs`).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::{BackingSpec, CompressedBlock, Format, Layer, LayerInfo, Mapping, OpenCtx, WriteLayer};
use crate::cache::Caches;
use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;

pub mod cowd;
pub mod descriptor;
pub mod extent;
pub mod sesparse;
pub mod sparse;
pub mod write;

use descriptor::{Access, Descriptor, ExtentLine, ExtentType, NO_PARENT_CID};
use extent::{Extent, ExtentData, Run, KEY_SHIFT};

/// True when `head` (an image's first bytes) looks like a VMDK: a hosted
/// sparse (`KDMV`), `COWD` or seSparse extent header, or a text descriptor.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(sparse::MAGIC)
        || head.starts_with(cowd::MAGIC)
        || sesparse::probe(head)
        || descriptor::looks_like_descriptor(head)
}

/// createTypes whose extents are physical devices: refused.
const DEVICE_TYPES: &[&str] = &[
    "fullDevice",
    "partitionedDevice",
    "vmfsRaw",
    "vmfsRDM",
    "vmfsRDMP",
    "vmfsRawDeviceMap",
    "vmfsPassthroughRawDeviceMap",
];

/// An open VMDK image.
pub struct Vmdk {
    file: Arc<HostFile>,
    extents: Vec<Extent>,
    size: u64,
    desc: Option<Descriptor>,
    create_type: String,
    caches: Arc<Caches>,
    cache_id: u64,
    writer: Option<write::Writer>,
}

/// Opens a VMDK image (descriptor or sparse extent).
pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Arc<dyn Layer>> {
    let path = file.path().to_path_buf();
    Ok(Arc::new(
        Vmdk::open(file, ctx).map_err(|e| e.with_path(&path))?,
    ))
}

impl Vmdk {
    /// Opens `file` as a VMDK layer.
    pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Vmdk> {
        let mut v = Vmdk::open_layout(file, ctx)?;
        if ctx.writable {
            v.writer = Some(write::Writer::new(&v)?);
        }
        Ok(v)
    }

    fn open_layout(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Vmdk> {
        let cache_id = ctx.caches.new_layer_id();
        let mut head = [0u8; 512];
        let n = file.read_at_most(&mut head, 0)?;
        let head = &head[..n];
        let mut v = Vmdk {
            file: file.clone(),
            extents: Vec::new(),
            size: 0,
            desc: None,
            create_type: String::new(),
            caches: ctx.caches.clone(),
            cache_id,
            writer: None,
        };
        if head.starts_with(sparse::MAGIC) {
            let h = sparse::Header::read(&file)?;
            let embedded = sparse::embedded_descriptor(&file, &h)?;
            let desc = match &embedded {
                Some(raw) => Some(descriptor::parse(raw).map_err(|e| {
                    Error::corrupt(format!("embedded descriptor: {}", e.message()))
                })?),
                None => None,
            };
            if let Some(name) = desc.as_ref().and_then(|d| d.parent_hint.as_deref()) {
                ctx.open_ahead(file.path(), name);
            }
            if h.capacity == 0 && h.gd_offset != sparse::GD_AT_END {
                // A sparse header carrying only a descriptor (ESXi hosted).
                if let Some(d) = desc {
                    v.open_descriptor(d, ctx)?;
                    return Ok(v);
                }
            }
            let (tables, info, hdr) = sparse::open(file.clone(), None, cache_id, 0)?;
            let default = if hdr.compressed() {
                "streamOptimized"
            } else {
                "monolithicSparse"
            };
            v.create_type = desc
                .as_ref()
                .and_then(|d| d.create_type.clone())
                .unwrap_or_else(|| default.to_string());
            let line = desc.as_ref().and_then(|d| d.extents.first().cloned());
            v.push_sparse(line, Some(file.clone()), tables, info);
            v.desc = desc;
        } else if head.starts_with(cowd::MAGIC) {
            let (tables, info) = cowd::open(file.clone(), None, cache_id, 0)?;
            v.create_type = "vmfsSparse".to_string();
            v.push_sparse(None, Some(file.clone()), tables, info);
        } else if sesparse::probe(head) {
            let (tables, info) = sesparse::open(file.clone(), None, cache_id, 0)?;
            v.create_type = "seSparse".to_string();
            v.push_sparse(None, Some(file.clone()), tables, info);
        } else {
            if file.len() > descriptor::MAX_DESCRIPTOR {
                return Err(Error::corrupt(format!(
                    "not a VMDK sparse extent, and too large ({} bytes) for a descriptor file",
                    file.len()
                )));
            }
            let mut raw = vec![0u8; file.len() as usize];
            file.read_exact_at(&mut raw, 0)?;
            let d = descriptor::parse(&raw)?;
            if let Some(name) = d.parent_hint.as_deref() {
                ctx.open_ahead(file.path(), name);
            }
            v.open_descriptor(d, ctx)?;
        }
        if v.size == 0 {
            return Err(Error::corrupt("VMDK image has no data extents (size 0)"));
        }
        Ok(v)
    }

    fn push_sparse(
        &mut self,
        line: Option<ExtentLine>,
        file: Option<Arc<HostFile>>,
        tables: extent::GrainTables,
        info: extent::SparseInfo,
    ) {
        let len = info.capacity_sectors * 512;
        self.push(Extent {
            start: 0,
            len,
            line,
            file,
            data: ExtentData::Sparse { tables, info },
        });
    }

    fn push(&mut self, mut e: Extent) {
        e.start = self.size;
        self.size += e.len;
        if e.len > 0 {
            self.extents.push(e);
        }
    }

    /// Opens every extent a standalone descriptor lists.
    fn open_descriptor(&mut self, d: Descriptor, ctx: &OpenCtx<'_>) -> Result<()> {
        let Some(ct) = d.create_type.clone() else {
            return Err(Error::corrupt("descriptor has no createType"));
        };
        if DEVICE_TYPES.iter().any(|t| t.eq_ignore_ascii_case(&ct)) {
            return Err(Error::unsupported(format!(
                "createType \"{ct}\" uses a physical device; raw devices are not opened"
            )));
        }
        if d.extents.is_empty() {
            return Err(Error::corrupt("descriptor lists no extents"));
        }
        self.create_type = ct;
        let desc_path = self.file.path().to_path_buf();
        // Remote extents open side by side rather than one after another.
        for line in &d.extents {
            if let Some(name) = line.file.as_deref() {
                ctx.open_ahead(&desc_path, name);
            }
        }
        let mut total: u64 = 0;
        for (idx, line) in d.extents.iter().enumerate() {
            total = line
                .sectors
                .checked_mul(512)
                .and_then(|b| total.checked_add(b))
                .filter(|&t| i64::try_from(t).is_ok())
                .ok_or_else(|| Error::corrupt(format!("disk size overflows at {line}")))?;
            let e = self
                .open_extent(&desc_path, idx, line, ctx)
                .map_err(|e| e.context(format!("extent of {line}")).with_path(&desc_path))?;
            self.push(e);
        }
        self.desc = Some(d);
        Ok(())
    }

    fn open_extent(
        &self,
        desc_path: &Path,
        idx: usize,
        line: &ExtentLine,
        ctx: &OpenCtx<'_>,
    ) -> Result<Extent> {
        let len = line.sectors * 512;
        let key_base = (idx as u64) << KEY_SHIFT;
        let mk = |file, data| Extent {
            start: 0,
            len,
            line: Some(line.clone()),
            file,
            data,
        };
        if line.kind == ExtentType::Zero {
            return Ok(mk(None, ExtentData::Zero));
        }
        if line.access == Access::NoAccess {
            return Ok(mk(None, ExtentData::NoAccess));
        }
        if matches!(line.kind, ExtentType::VmfsRdm | ExtentType::VmfsRaw) {
            return Err(Error::unsupported(
                "raw device mapping extents are not opened (the data is on a device)",
            ));
        }
        let name = line.file.as_deref().unwrap_or("");
        let writable = ctx.writable && line.access == Access::ReadWrite;
        let file = ctx.policy.open_named(desc_path, name, writable)?;
        let data = match line.kind {
            ExtentType::Flat | ExtentType::Vmfs => ExtentData::Flat {
                file: file.clone(),
                offset: line
                    .offset
                    .checked_mul(512)
                    .ok_or_else(|| Error::corrupt("flat extent offset overflows"))?,
            },
            ExtentType::Sparse | ExtentType::VmfsSparse => {
                let mut magic = [0u8; 4];
                file.read_exact_at(&mut magic, 0)?;
                let (tables, info) = if &magic == sparse::MAGIC {
                    let (t, i, _) = sparse::open(file.clone(), Some(len), self.cache_id, key_base)?;
                    (t, i)
                } else if &magic == cowd::MAGIC {
                    cowd::open(file.clone(), Some(len), self.cache_id, key_base)?
                } else {
                    return Err(Error::corrupt(format!(
                        "sparse extent file {name:?} has neither KDMV nor COWD magic"
                    ))
                    .with_path(file.path()));
                };
                ExtentData::Sparse { tables, info }
            }
            ExtentType::SeSparse => {
                let (tables, info) =
                    sesparse::open(file.clone(), Some(len), self.cache_id, key_base)?;
                ExtentData::Sparse { tables, info }
            }
            ExtentType::Zero | ExtentType::VmfsRdm | ExtentType::VmfsRaw => {
                return Err(Error::unsupported("unexpected extent type"))
            }
        };
        Ok(mk(Some(file), data))
    }

    fn extent_at(&self, offset: u64) -> Result<&Extent> {
        let i = self.extents.partition_point(|e| e.start <= offset);
        i.checked_sub(1)
            .and_then(|i| self.extents.get(i))
            .filter(|e| offset - e.start < e.len)
            .ok_or_else(|| {
                Error::new(ErrorKind::OutOfRange, "offset beyond the last extent").at_guest(offset)
            })
    }

    fn used_redundant_gd(&self) -> bool {
        self.extents.iter().any(|e| match &e.data {
            ExtentData::Sparse { tables, .. } => tables.used_redundant.load(Ordering::Relaxed),
            _ => false,
        })
    }

    fn first_sparse(&self) -> Option<(&extent::GrainTables, &extent::SparseInfo)> {
        self.extents.iter().find_map(|e| match &e.data {
            ExtentData::Sparse { tables, info } => Some((tables, info)),
            _ => None,
        })
    }
}

impl Vmdk {
    /// qemu-img's `format-specific` data (QAPI `ImageInfoSpecificVmdk`):
    /// CIDs as numbers, and per extent its size, file, descriptor type
    /// (empty for an extent that carries its own descriptor, which qemu
    /// opens without reading an extent line), grain size and compression.
    fn qemu_specific(&self) -> Value {
        let d = self.desc.as_ref();
        let extents: Vec<Value> =
            self.extents
                .iter()
                .map(|e| {
                    let own = e.file.as_ref().is_some_and(|f| {
                        Arc::ptr_eq(f, &self.file) || f.path() == self.file.path()
                    });
                    let kind = match &e.line {
                        Some(l) if !own => l.kind.as_str(),
                        _ => "",
                    };
                    let mut m = Map::new();
                    if let ExtentData::Sparse { info, .. } = &e.data {
                        if info.compressed {
                            m.insert("compressed".into(), json!(true));
                        }
                    }
                    m.insert("virtual-size".into(), json!(e.len));
                    let file = e.file.as_ref().map(|f| f.path().display().to_string());
                    m.insert("filename".into(), json!(file.unwrap_or_default()));
                    if let ExtentData::Sparse { tables, .. } = &e.data {
                        m.insert("cluster-size".into(), json!(tables.grain_size));
                    }
                    m.insert("format".into(), json!(kind));
                    Value::Object(m)
                })
                .collect();
        json!({
            "cid": d.and_then(|d| d.cid).unwrap_or(0),
            "parent-cid": d.and_then(|d| d.parent_cid).unwrap_or(u32::MAX),
            "create-type": self.create_type,
            "extents": extents,
        })
    }
}

fn ddb_num(d: &Descriptor, key: &str) -> Option<Value> {
    let v = d.ddb.get(key)?;
    Some(match v.trim().parse::<u64>() {
        Ok(n) => json!(n),
        Err(_) => json!(v),
    })
}

impl Layer for Vmdk {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let e = self.extent_at(offset)?;
        let rel = offset - e.start;
        let max = max_len.min(e.len - rel);
        let ctx = |err: Error| match &e.file {
            Some(f) => err.at_guest(offset).with_path(f.path()),
            None => err.at_guest(offset),
        };
        match &e.data {
            ExtentData::Flat { file, offset: base } => Ok((
                Mapping::Data {
                    file: file.clone(),
                    offset: base + rel,
                },
                max,
            )),
            ExtentData::Zero => Ok((Mapping::Zero, max)),
            ExtentData::NoAccess => Err(ctx(Error::new(
                ErrorKind::Unsupported,
                match &e.line {
                    Some(l) => format!("extent is NOACCESS ({l})"),
                    None => "extent is NOACCESS".to_string(),
                },
            ))),
            ExtentData::Sparse { tables, .. } => {
                let (run, n) = tables.map(&self.caches, rel, max).map_err(ctx)?;
                let m = match run {
                    Run::Backing => Mapping::Backing,
                    Run::Zero => Mapping::Zero,
                    Run::Data(host) => Mapping::Data {
                        file: tables.file.clone(),
                        offset: host,
                    },
                    Run::Compressed { grain_start, host } => {
                        let g = tables.grain_size;
                        Mapping::Compressed(CompressedBlock {
                            guest_start: e.start + grain_start,
                            len: g,
                            key: tables.key_base | host,
                            host_offset: host,
                            host_len: (g * 2 + 4096).min(tables.file.len().saturating_sub(host)),
                        })
                    }
                };
                Ok((m, n))
            }
        }
    }

    fn decompress(&self, block: &CompressedBlock, out: &mut [u8]) -> Result<()> {
        let idx = (block.key >> KEY_SHIFT) as usize;
        let Some(ExtentData::Sparse { tables, info }) =
            self.extents.iter().map(|e| &e.data).find(|d| match d {
                ExtentData::Sparse { tables, .. } => tables.key_base >> KEY_SHIFT == idx as u64,
                _ => false,
            })
        else {
            return Err(Error::corrupt("compressed block of an unknown extent"));
        };
        sparse::decompress_grain(
            &tables.file,
            block.host_offset,
            info.markers,
            block.len,
            out,
        )
        .map_err(|e| e.with_path(tables.file.path()))
    }

    fn backing(&self) -> Option<BackingSpec> {
        let d = self.desc.as_ref()?;
        let name = d.parent_hint.clone()?;
        Some(BackingSpec {
            name,
            format: Some(Format::Vmdk),
            parent_cid: d.parent_cid.filter(|&c| c != NO_PARENT_CID),
        })
    }

    fn cid(&self) -> Option<u32> {
        if let Some(c) = self.writer.as_ref().and_then(|w| w.new_cid()) {
            return Some(c);
        }
        self.desc.as_ref().and_then(|d| d.cid)
    }

    fn info(&self) -> LayerInfo {
        let mut info = LayerInfo::new(Format::Vmdk, self.size);
        info.subformat = Some(self.create_type.clone());
        let sparse = self.first_sparse();
        info.cluster_size = sparse.map(|(t, _)| t.grain_size);
        if let Some((_, si)) = sparse {
            if si.compressed {
                info.features.push("compressed_grains".into());
            }
            if si.markers {
                info.features.push("markers".into());
            }
            if si.footer {
                info.features.push("gd_at_end".into());
            }
        }
        let dt = &mut info.details;
        dt.insert("create_type".into(), json!(self.create_type));
        dt.insert("capacity_sectors".into(), json!(self.size / 512));
        dt.insert("capacity_bytes".into(), json!(self.size));
        if let Some((t, si)) = sparse {
            dt.insert("grain_size".into(), json!(t.grain_size));
            dt.insert("version".into(), json!(si.version));
            dt.insert("sparse_kind".into(), json!(si.kind));
        } else if let Some(v) = self.desc.as_ref().and_then(|d| d.version) {
            dt.insert("version".into(), json!(v));
        }
        dt.insert("used_redundant_gd".into(), json!(self.used_redundant_gd()));
        if let Some(d) = &self.desc {
            if let Some(a) = d.ddb.get("ddb.adapterType") {
                dt.insert("adapter_type".into(), json!(a));
            }
            let mut geo = Map::new();
            let mut bios = Map::new();
            for (k, key) in [
                ("cylinders", "Cylinders"),
                ("heads", "Heads"),
                ("sectors", "Sectors"),
            ] {
                if let Some(v) = ddb_num(d, &format!("ddb.geometry.{k}")) {
                    geo.insert(k.into(), v);
                }
                if let Some(v) = ddb_num(d, &format!("ddb.geometry.bios{key}")) {
                    bios.insert(k.into(), v);
                }
            }
            if !geo.is_empty() {
                dt.insert("geometry".into(), Value::Object(geo));
            }
            if !bios.is_empty() {
                dt.insert("bios_geometry".into(), Value::Object(bios));
            }
            if let Some(v) = ddb_num(d, "ddb.virtualHWVersion") {
                dt.insert("virtual_hw_version".into(), v);
            }
            if let Some(c) = d.cid {
                dt.insert("cid".into(), json!(format!("{c:08x}")));
            }
            if let Some(c) = d.parent_cid {
                dt.insert("parent_cid".into(), json!(format!("{c:08x}")));
            }
            if let Some(p) = &d.parent_hint {
                dt.insert("parent_file_name_hint".into(), json!(p));
            }
            if let Some(u) = d.ddb.get("ddb.uuid") {
                dt.insert("uuid".into(), json!(u));
            }
            let ddb: Map<String, Value> =
                d.ddb.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            dt.insert("ddb".into(), Value::Object(ddb));
        }
        let extents: Vec<Value> = self
            .extents
            .iter()
            .map(|e| {
                let (kind, offset) = match (&e.line, &e.data) {
                    (Some(l), _) => (l.kind.as_str(), l.offset),
                    (None, ExtentData::Sparse { .. }) => ("SPARSE", 0),
                    (None, _) => ("FLAT", 0),
                };
                let file = match (&e.line, &e.file) {
                    (Some(l), _) if l.file.is_some() => json!(l.file),
                    (_, Some(f)) => json!(f.path().file_name().map(|n| n.to_string_lossy())),
                    _ => Value::Null,
                };
                json!({
                    "access": e.line.as_ref().map_or("RW", |l| l.access.as_str()),
                    "kind": kind,
                    "sectors": e.len / 512,
                    "file": file,
                    "offset": offset,
                })
            })
            .collect();
        dt.insert("extents".into(), Value::Array(extents));
        info.qemu_specific = Some(self.qemu_specific());
        info
    }

    fn host_files(&self) -> Vec<Arc<HostFile>> {
        let mut v = vec![self.file.clone()];
        for e in &self.extents {
            if let Some(f) = &e.file {
                if !v.iter().any(|x| Arc::ptr_eq(x, f) || x.path() == f.path()) {
                    v.push(f.clone());
                }
            }
        }
        v
    }

    fn cache_id(&self) -> u64 {
        self.cache_id
    }

    fn as_write(&self) -> Option<&dyn WriteLayer> {
        match &self.writer {
            Some(_) => Some(self),
            None => None,
        }
    }
}
