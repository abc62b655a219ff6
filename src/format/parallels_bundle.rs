//! Parallels bundles: a `DiskDescriptor.xml` describing one disk made of
//! several storages (the disk split across `.hds` files, each covering a
//! range of sectors), each holding an expanding Parallels image
//! (`Compressed`) or a plain raw one (`Plain`). Read-only.
//!
//! The XML is parsed with `roxmltree` (see docs/dependencies.md). Each
//! storage's image is named relative to the descriptor and opened through
//! the [`crate::policy::OpenPolicy`], like any file named inside an image.
//! Bundles with snapshots (a storage holding more than one image, or a
//! snapshot whose parent is not the empty GUID) are refused by name: only
//! the plain, unsnapshotted layout is read.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use super::parallels::Parallels;
use super::raw::Raw;
use super::{BackingSpec, Format, Layer, LayerInfo, Mapping, OpenCtx};
use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;

/// Largest descriptor we parse.
const MAX_XML: u64 = 1 << 20;
/// Most XML nodes we accept in a descriptor.
const MAX_NODES: u32 = 200_000;
/// Most storages a bundle may have.
const MAX_STORAGES: usize = 4096;
/// The GUID Parallels writes for "no parent".
const NO_PARENT: &str = "{00000000-0000-0000-0000-000000000000}";

/// One storage: guest sectors `[start, end)` served by `layer` from its 0.
struct Storage {
    start: u64,
    end: u64,
    kind: String,
    layer: Arc<dyn Layer>,
}

/// An open bundle.
pub struct Bundle {
    file: Arc<HostFile>,
    size: u64,
    storages: Vec<Storage>,
    cache_id: u64,
}

fn child_text<'a>(node: roxmltree::Node<'a, 'a>, name: &str) -> Option<&'a str> {
    node.children()
        .find(|c| c.has_tag_name(name))
        .and_then(|c| c.text())
        .map(str::trim)
}

fn number(node: roxmltree::Node<'_, '_>, name: &str) -> Result<u64> {
    let text = child_text(node, name)
        .ok_or_else(|| Error::corrupt(format!("DiskDescriptor.xml: <{name}> is missing")))?;
    text.parse().map_err(|_| {
        Error::corrupt(format!(
            "DiskDescriptor.xml: <{name}> {text:?} is not a number"
        ))
    })
}

impl Bundle {
    /// Parses the descriptor in `file` and opens every storage's image.
    pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Bundle> {
        if file.len() > MAX_XML {
            return Err(Error::corrupt(format!(
                "DiskDescriptor.xml of {} bytes is larger than {MAX_XML}",
                file.len()
            )));
        }
        let mut raw = vec![0u8; file.len() as usize];
        file.read_exact_at(&mut raw, 0)?;
        let text = String::from_utf8(raw)
            .map_err(|_| Error::corrupt("DiskDescriptor.xml is not valid UTF-8"))?;
        // DTDs (so entities) are refused, and the node count is bounded.
        let opts = roxmltree::ParsingOptions {
            allow_dtd: false,
            nodes_limit: MAX_NODES,
        };
        let doc = roxmltree::Document::parse_with_options(&text, opts).map_err(|e| {
            Error::corrupt(format!("DiskDescriptor.xml is not well-formed XML: {e}"))
        })?;
        let root = doc.root_element();
        if !root.has_tag_name("Parallels_disk_image") {
            return Err(Error::corrupt(
                "DiskDescriptor.xml: the root is not <Parallels_disk_image>",
            ));
        }
        let params = root
            .children()
            .find(|c| c.has_tag_name("Disk_Parameters"))
            .ok_or_else(|| Error::corrupt("DiskDescriptor.xml: <Disk_Parameters> is missing"))?;
        let sectors = number(params, "Disk_size")?;
        let size = sectors
            .checked_mul(512)
            .ok_or_else(|| Error::corrupt("DiskDescriptor.xml: <Disk_size> overflows"))?;
        if let Some(snaps) = root.children().find(|c| c.has_tag_name("Snapshots")) {
            let shots: Vec<_> = snaps
                .children()
                .filter(|c| c.has_tag_name("Shot"))
                .collect();
            let chained = shots
                .iter()
                .any(|s| child_text(*s, "ParentGUID").is_some_and(|p| p != NO_PARENT));
            if shots.len() > 1 || chained {
                return Err(Error::unsupported(
                    "Parallels bundle with snapshots is not supported (only unsnapshotted bundles are read)",
                ));
            }
        }
        let data = root
            .children()
            .find(|c| c.has_tag_name("StorageData"))
            .ok_or_else(|| Error::corrupt("DiskDescriptor.xml: <StorageData> is missing"))?;
        let mut storages = Vec::new();
        let mut expect_start = 0u64;
        for st in data.children().filter(|c| c.has_tag_name("Storage")) {
            if storages.len() >= MAX_STORAGES {
                return Err(Error::corrupt(format!(
                    "DiskDescriptor.xml has more than {MAX_STORAGES} storages"
                )));
            }
            let (start, end) = (number(st, "Start")?, number(st, "End")?);
            if start != expect_start || end <= start || end > sectors {
                return Err(Error::corrupt(format!(
                    "DiskDescriptor.xml: storage [{start}, {end}) does not continue at sector {expect_start} inside the disk of {sectors} sectors"
                )));
            }
            expect_start = end;
            let images: Vec<_> = st.children().filter(|c| c.has_tag_name("Image")).collect();
            let [image] = images.as_slice() else {
                return Err(Error::unsupported(format!(
                    "Parallels bundle storage [{start}, {end}) has {} images (snapshots are not supported)",
                    images.len()
                )));
            };
            let kind = child_text(*image, "Type")
                .unwrap_or("Compressed")
                .to_string();
            let name = child_text(*image, "File")
                .ok_or_else(|| Error::corrupt("DiskDescriptor.xml: an <Image> has no <File>"))?;
            let path = ctx.policy.resolve(file.path(), name)?;
            let inner = ctx.policy.open_path(&path, false)?;
            let layer: Arc<dyn Layer> = match kind.as_str() {
                "Compressed" => Arc::new(
                    Parallels::open(inner.clone(), ctx).map_err(|e| e.with_path(inner.path()))?,
                ),
                "Plain" => Arc::new(Raw::open(inner, ctx)?),
                other => {
                    return Err(Error::unsupported(format!(
                        "Parallels bundle image type {other:?} is not supported (Compressed, Plain)"
                    )))
                }
            };
            let need = (end - start) * 512;
            if layer.virtual_size() < need {
                return Err(Error::corrupt(format!(
                    "{name:?} holds {} bytes, its storage needs {need}",
                    layer.virtual_size()
                )));
            }
            storages.push(Storage {
                start,
                end,
                kind,
                layer,
            });
        }
        if expect_start != sectors {
            return Err(Error::corrupt(format!(
                "DiskDescriptor.xml: the storages cover {expect_start} of {sectors} sectors"
            )));
        }
        Ok(Bundle {
            file,
            size,
            storages,
            cache_id: ctx.caches.new_layer_id(),
        })
    }
}

impl Layer for Bundle {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn format(&self) -> Format {
        Format::Parallels
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let sector = offset / 512;
        let idx = self.storages.partition_point(|s| s.end <= sector);
        let s = self.storages.get(idx).ok_or_else(|| {
            Error::new(ErrorKind::OutOfRange, "beyond the last storage")
                .at_guest(offset)
                .with_path(self.file.path())
        })?;
        let inner = offset - s.start * 512;
        let len = max_len.min(s.end * 512 - offset);
        s.layer.map(inner, len)
    }

    fn backing(&self) -> Option<BackingSpec> {
        None
    }

    fn info(&self) -> LayerInfo {
        let mut info = LayerInfo::new(Format::Parallels, self.size);
        info.subformat = Some("DiskDescriptor.xml".into());
        let list: Vec<Value> = self
            .storages
            .iter()
            .map(|s| {
                json!({
                    "start_sector": s.start,
                    "end_sector": s.end,
                    "type": s.kind,
                    "file": s.layer.path().display().to_string(),
                })
            })
            .collect();
        info.details.insert("storages".into(), Value::from(list));
        info
    }

    fn host_files(&self) -> Vec<Arc<HostFile>> {
        let mut v = vec![self.file.clone()];
        for s in &self.storages {
            v.extend(s.layer.host_files());
        }
        v
    }

    fn cache_id(&self) -> u64 {
        self.cache_id
    }
}
