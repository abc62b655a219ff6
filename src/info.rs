//! `vdiskfs info`: what a chain is made of, as text or JSON.
//!
//! The JSON shape is stable: top-level `format`, `virtual_size`,
//! `cluster_size`, `allocated_bytes`, `disk_size`, `features`, the
//! format-specific fields of the top image, and `chain`, a list of
//! `{filename, format, virtual_size, …}` from the top image down.

use std::fmt::Write as _;

pub mod qemu;

use serde::Serialize;

use crate::chain::Chain;
use crate::error::Result;
use crate::format::{LayerInfo, SnapshotInfo};

/// One link of the chain.
#[derive(Debug, Serialize)]
pub struct LinkInfo {
    /// Path the layer was opened from.
    pub filename: String,
    /// Format and format-specific facts.
    #[serde(flatten)]
    pub layer: LayerInfo,
    /// Guest bytes this layer itself stores.
    pub allocated_bytes: u64,
    /// Host bytes the layer's files occupy.
    pub disk_size: u64,
    /// The backing file name as written in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Every host file the layer reads (image, extents, data file).
    pub files: Vec<String>,
    /// The ETag of a remote image (s3://, http(s)://) at open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
    /// The first damaged mapping found while counting allocation (reads of
    /// that range fail with EIO; the rest of the disk reads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damage: Option<String>,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct ImageInfo {
    /// The top image's path.
    pub filename: String,
    /// The top image's format.
    pub format: crate::format::Format,
    /// Guest disk size in bytes.
    pub virtual_size: u64,
    /// The top image's cluster or grain size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Guest bytes the top image stores.
    pub allocated_bytes: u64,
    /// Host bytes the top image occupies.
    pub disk_size: u64,
    /// Features of the top image in use.
    pub features: Vec<String>,
    /// Internal snapshots of the top image.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    /// Number of links in the chain.
    pub chain_length: usize,
    /// Every link, top first.
    pub chain: Vec<LinkInfo>,
}

/// Gathers the report for an open chain.
pub fn gather(chain: &Chain) -> Result<ImageInfo> {
    let mut links = Vec::new();
    for (idx, layer) in chain.layers().iter().enumerate() {
        let files = layer.host_files();
        let (allocated_bytes, damage) = chain.layer_allocated(idx);
        links.push(LinkInfo {
            filename: layer.path().display().to_string(),
            layer: layer.info(),
            allocated_bytes,
            damage: damage.map(|e| e.to_string()),
            disk_size: files.iter().map(|f| f.host_allocated()).sum(),
            backing_filename: layer.backing().map(|b| b.name),
            e_tag: files
                .first()
                .and_then(|f| f.remote())
                .and_then(|r| r.e_tag().map(str::to_string)),
            files: files
                .iter()
                .map(|f| f.path().display().to_string())
                .collect(),
        });
    }
    let top = &links[0];
    Ok(ImageInfo {
        filename: top.filename.clone(),
        format: top.layer.format,
        virtual_size: chain.size(),
        cluster_size: top.layer.cluster_size,
        allocated_bytes: top.allocated_bytes,
        disk_size: top.disk_size,
        features: top.layer.features.clone(),
        snapshots: top.layer.snapshots.clone(),
        chain_length: links.len(),
        chain: links,
    })
}

/// Renders the report as pretty JSON.
pub fn to_json(info: &ImageInfo) -> String {
    // Serializing plain data structures cannot fail.
    serde_json::to_string_pretty(info).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Renders the report for people.
pub fn to_text(info: &ImageInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "image: {}", info.filename);
    let _ = writeln!(s, "format: {}", info.format);
    let _ = writeln!(
        s,
        "virtual size: {} ({} bytes)",
        human(info.virtual_size),
        info.virtual_size
    );
    if let Some(c) = info.cluster_size {
        let _ = writeln!(s, "cluster size: {c}");
    }
    let _ = writeln!(
        s,
        "allocated: {} ({} bytes of guest data in this image)",
        human(info.allocated_bytes),
        info.allocated_bytes
    );
    let _ = writeln!(s, "disk size: {}", human(info.disk_size));
    if !info.features.is_empty() {
        let _ = writeln!(s, "features: {}", info.features.join(", "));
    }
    if !info.snapshots.is_empty() {
        let _ = writeln!(s, "snapshots:");
        let _ = writeln!(
            s,
            "  {:<6} {:<24} {:>12} {:>12}",
            "ID", "NAME", "DISK SIZE", "VM STATE"
        );
        for snap in &info.snapshots {
            let _ = writeln!(
                s,
                "  {:<6} {:<24} {:>12} {:>12}",
                snap.id,
                snap.name,
                human(snap.virtual_size),
                human(snap.vm_state_size)
            );
        }
    }
    let _ = writeln!(s, "chain: {} link(s)", info.chain_length);
    for (i, link) in info.chain.iter().enumerate() {
        let _ = writeln!(
            s,
            "  [{i}] {} ({}{}, {} bytes)",
            link.filename,
            link.layer.format,
            link.layer
                .subformat
                .as_deref()
                .map(|v| format!(" {v}"))
                .unwrap_or_default(),
            link.layer.virtual_size
        );
        if let Some(b) = &link.backing_filename {
            let _ = writeln!(s, "      backing file: {b}");
        }
        if let Some(t) = &link.e_tag {
            let _ = writeln!(s, "      etag: {t}");
        }
        if let Some(d) = &link.damage {
            let _ = writeln!(s, "      DAMAGED (reads of that range fail): {d}");
        }
        if i > 0 && !link.layer.features.is_empty() {
            let _ = writeln!(s, "      features: {}", link.layer.features.join(", "));
        }
        for (k, v) in &link.layer.details {
            let _ = writeln!(s, "      {k}: {}", render_value(v));
        }
    }
    s
}

fn render_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Sizes for people: `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(8 << 30), "8.0 GiB");
    }
}
