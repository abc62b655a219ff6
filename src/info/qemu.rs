//! `vdiskfs info --output=json`: the report in qemu-img's own JSON schema
//! (QAPI `ImageInfo`), so that tools written for `qemu-img info
//! --output=json` parse ours unchanged.
//!
//! One object per layer: `filename`, `format`, `virtual-size`,
//! `actual-size`, `cluster-size`, `dirty-flag`, `format-specific` (qcow2,
//! vmdk), `snapshots`, the `backing-filename` trio, and `children` (the
//! host files under the layer, `file` and VMDK `extents.N`). Without
//! `--backing-chain` the top layer's object alone, as qemu-img prints it;
//! with it a list, top first. What qemu prints and we do not, and why, is
//! listed in `tests/suite/info_qemu.rs`.

use serde_json::{json, Map, Value};

use crate::chain::Chain;
use crate::format::{Format, Layer, SnapshotInfo};
use crate::host::HostFile;

/// The top layer's object, or with `backing_chain` the list of every
/// layer's object, top first.
pub fn to_qemu_json(chain: &Chain, backing_chain: bool) -> Value {
    let layers = chain.layers();
    let objs = layers
        .iter()
        .enumerate()
        .map(|(i, l)| layer_object(l.as_ref(), layers.get(i + 1).map(|b| b.path())));
    if backing_chain {
        Value::Array(objs.collect())
    } else {
        objs.take(1).next().unwrap_or(Value::Null)
    }
}

/// One layer; `below` is the path its backing file was opened from.
fn layer_object(layer: &dyn Layer, below: Option<&std::path::Path>) -> Value {
    let info = layer.info();
    let files = layer.host_files();
    let mut m = Map::new();
    m.insert("children".into(), Value::Array(children(layer, &files)));
    m.insert("virtual-size".into(), json!(layer.virtual_size()));
    m.insert("filename".into(), json!(layer.path().display().to_string()));
    // qemu's parallels driver answers no block-driver info, so qemu-img
    // prints neither cluster size nor dirty flag for it.
    let block_info = info.format != Format::Parallels;
    if let Some(c) = info.cluster_size.filter(|_| block_info) {
        m.insert("cluster-size".into(), json!(c));
    }
    m.insert("format".into(), json!(info.format.name()));
    let actual: u64 = files.iter().map(|f| f.host_allocated()).sum();
    m.insert("actual-size".into(), json!(actual));
    if let Some(data) = info.qemu_specific {
        m.insert(
            "format-specific".into(),
            json!({"type": info.format.name(), "data": data}),
        );
    }
    if !info.snapshots.is_empty() {
        let list: Vec<Value> = info.snapshots.iter().map(snapshot).collect();
        m.insert("snapshots".into(), Value::Array(list));
    }
    if let Some(b) = layer.backing() {
        if let Some(f) = b.format {
            m.insert("backing-filename-format".into(), json!(f.name()));
        }
        let full = below.map_or_else(|| b.name.clone(), |p| p.display().to_string());
        m.insert("full-backing-filename".into(), json!(full));
        m.insert("backing-filename".into(), json!(b.name));
    }
    if block_info {
        let dirty = info.format == Format::Qcow2 && info.features.iter().any(|f| f == "dirty");
        m.insert("dirty-flag".into(), json!(dirty));
    }
    Value::Object(m)
}

/// The host files under a layer as qemu names its children: VMDK extents
/// in their own files as `extents.N`, then the image file as `file`.
fn children(layer: &dyn Layer, files: &[std::sync::Arc<HostFile>]) -> Vec<Value> {
    let mut out = Vec::new();
    let Some(main) = files.first() else {
        return out;
    };
    if layer.format() == Format::Vmdk {
        for (i, f) in files.iter().skip(1).enumerate() {
            out.push(json!({"name": format!("extents.{i}"), "info": file_object(f)}));
        }
    }
    out.push(json!({"name": "file", "info": file_object(main)}));
    out
}

/// A host file as qemu's `file` protocol layer describes it.
fn file_object(f: &HostFile) -> Value {
    json!({
        "children": [],
        // qemu counts a file's length in whole 512-byte sectors.
        "virtual-size": f.len().next_multiple_of(512),
        "filename": f.path().display().to_string(),
        "format": "file",
        "actual-size": f.host_allocated(),
        "format-specific": {"type": "file", "data": {}},
        "dirty-flag": false,
    })
}

/// One internal snapshot as qemu's `SnapshotInfo`.
fn snapshot(s: &SnapshotInfo) -> Value {
    let mut m = Map::new();
    if let Some(c) = s.icount {
        m.insert("icount".into(), json!(c));
    }
    m.insert(
        "vm-clock-nsec".into(),
        json!(s.vm_clock_nsec % 1_000_000_000),
    );
    m.insert("name".into(), json!(s.name));
    m.insert("date-sec".into(), json!(s.date_sec));
    m.insert("date-nsec".into(), json!(s.date_nsec));
    m.insert(
        "vm-clock-sec".into(),
        json!(s.vm_clock_nsec / 1_000_000_000),
    );
    m.insert("id".into(), json!(s.id));
    m.insert("vm-state-size".into(), json!(s.vm_state_size));
    Value::Object(m)
}
