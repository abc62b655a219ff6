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

/// Snapshot rows shown without `--verbose`: the first and last half of
/// this many; the rest are summarized in one line.
const SNAPSHOT_ROWS: usize = 20;

/// Renders the report for people, laid out as `qemu-img info
/// --backing-chain` prints it: one block per layer, top first. `verbose`
/// adds each layer's raw header fields and every snapshot row.
pub fn to_text(info: &ImageInfo, verbose: bool) -> String {
    let mut s = String::new();
    if info.chain_length > 1 {
        let names: Vec<&str> = info.chain.iter().map(|l| l.filename.as_str()).collect();
        let _ = writeln!(
            s,
            "chain: {} link(s): {}\n",
            info.chain_length,
            names.join(" -> ")
        );
    }
    for (i, link) in info.chain.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        link_text(&mut s, link, info.chain.get(i + 1), verbose);
    }
    s
}

/// One layer's block.
fn link_text(s: &mut String, link: &LinkInfo, below: Option<&LinkInfo>, verbose: bool) {
    let l = &link.layer;
    let _ = writeln!(s, "image: {}", link.filename);
    let _ = writeln!(s, "file format: {}", l.format);
    if let Some(v) = &l.subformat {
        let _ = writeln!(s, "subformat: {v}");
    }
    let _ = writeln!(
        s,
        "virtual size: {} ({} bytes)",
        qemu_size(l.virtual_size),
        l.virtual_size
    );
    let _ = writeln!(s, "disk size: {}", qemu_size(link.disk_size));
    let _ = writeln!(
        s,
        "allocated: {} ({} bytes of guest data stored in this image)",
        qemu_size(link.allocated_bytes),
        link.allocated_bytes
    );
    if let Some(c) = l.cluster_size {
        let _ = writeln!(s, "cluster_size: {c}");
    }
    if let Some(snap) = l.details.get("loaded_snapshot") {
        // --load-snapshot: the sizes and allocation above are the snapshot's.
        let field = |k: &str| {
            snap.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let _ = writeln!(
            s,
            "loaded snapshot: ID {}, name {:?} (read-only)",
            field("id"),
            field("name")
        );
    }
    if let Some(b) = &link.backing_filename {
        match below {
            Some(p) if p.filename != *b => {
                let _ = writeln!(s, "backing file: {b} (actual path: {})", p.filename);
            }
            _ => {
                let _ = writeln!(s, "backing file: {b}");
            }
        }
        if let Some(f) = l.details.get("backing_format").and_then(|v| v.as_str()) {
            let _ = writeln!(s, "backing file format: {f}");
        }
    }
    if !l.features.is_empty() {
        let _ = writeln!(s, "features: {}", l.features.join(", "));
    }
    if let Some(t) = &link.e_tag {
        let _ = writeln!(s, "etag: {t}");
    }
    if let Some(d) = &link.damage {
        let _ = writeln!(s, "DAMAGED (reads of that range fail): {d}");
    }
    if !l.snapshots.is_empty() {
        snapshot_table(s, &l.snapshots, verbose);
    }
    if let Some(e) = l.details.get("snapshot_table_error") {
        let _ = writeln!(s, "snapshot table: {}", render_value(e));
    }
    if let Some(spec) = &l.qemu_specific {
        let _ = writeln!(s, "Format specific information:");
        if let serde_json::Value::Object(m) = spec {
            for (k, v) in in_qemu_order(m) {
                tree(s, 1, k, v);
            }
        }
    }
    if verbose {
        if link.files.len() > 1 {
            let _ = writeln!(s, "files: {}", link.files.join(", "));
        }
        if !l.details.is_empty() {
            let _ = writeln!(s, "Header fields:");
            for (k, v) in &l.details {
                let _ = writeln!(s, "    {k}: {}", render_value(v));
            }
        }
    }
}

/// qemu-img's snapshot table. Beyond [`SNAPSHOT_ROWS`] entries (a
/// qcow2 may hold 65,536) only the first and last rows are printed unless
/// `verbose`, with a line saying how many are left out.
fn snapshot_table(s: &mut String, snaps: &[SnapshotInfo], verbose: bool) {
    let _ = writeln!(s, "Snapshot list:");
    let _ = writeln!(
        s,
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    let half = SNAPSHOT_ROWS / 2;
    let summarize = !verbose && snaps.len() > SNAPSHOT_ROWS;
    for (i, snap) in snaps.iter().enumerate() {
        if summarize && i == half {
            let _ = writeln!(
                s,
                "... {} more snapshots (--verbose lists them all) ...",
                snaps.len() - SNAPSHOT_ROWS
            );
        }
        if summarize && i >= half && i < snaps.len() - half {
            continue;
        }
        let clock_ms = snap.vm_clock_nsec / 1_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            clock_ms / 3_600_000,
            clock_ms / 60_000 % 60,
            clock_ms / 1000 % 60,
            clock_ms % 1000
        );
        let _ = writeln!(
            s,
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            snap.id,
            snap.name,
            qemu_size(snap.vm_state_size),
            utc_date(snap.date_sec),
            clock,
            snap.icount.map(|c| c.to_string()).unwrap_or_default()
        );
    }
}

/// A format-specific value as qemu-img prints it: `-` in keys becomes a
/// space, lists are numbered, nested objects indented.
fn tree(s: &mut String, depth: usize, key: &str, v: &serde_json::Value) {
    let pad = "    ".repeat(depth);
    let key = key.replace('-', " ");
    match v {
        serde_json::Value::Object(m) => {
            let _ = writeln!(s, "{pad}{key}:");
            for (k, v) in in_qemu_order(m) {
                tree(s, depth + 1, k, v);
            }
        }
        serde_json::Value::Array(a) => {
            let _ = writeln!(s, "{pad}{key}:");
            for (i, v) in a.iter().enumerate() {
                tree(s, depth + 1, &format!("[{i}]"), v);
            }
        }
        other => {
            let _ = writeln!(s, "{pad}{key}: {}", render_value(other));
        }
    }
}

/// Format-specific keys in the order qemu-img prints them (its QAPI
/// declaration order); the JSON map itself is sorted by name.
const QEMU_ORDER: [&str; 18] = [
    "compat",
    "compression-type",
    "lazy-refcounts",
    "bitmaps",
    "refcount-bits",
    "data-file",
    "data-file-raw",
    "corrupt",
    "extended-l2",
    "cid",
    "parent-cid",
    "create-type",
    "extents",
    "compressed",
    "virtual-size",
    "filename",
    "cluster-size",
    "format",
];

/// The entries of `m` in qemu's order, unknown keys (e.g. `flags`,
/// `name`, `granularity` of a bitmap, in that order) after the known.
fn in_qemu_order(
    m: &serde_json::Map<String, serde_json::Value>,
) -> Vec<(&String, &serde_json::Value)> {
    let rank = |k: &str| {
        QEMU_ORDER.iter().position(|o| *o == k).unwrap_or(match k {
            "flags" => 100,
            "name" => 101,
            _ => 102,
        })
    };
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by_key(|(k, _)| rank(k));
    v
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the epoch.
pub(crate) fn utc_date(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian), by
    // 400-year eras of 146,097 days.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Sizes as qemu-img prints them: three significant digits, the unit
/// switching once the value passes 1000 of the smaller one (`1.25 MiB`,
/// `64 MiB`, `0.977 GiB`).
pub fn qemu_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let scaled = bytes as f64 * 1024.0 / 1000.0;
    let mut i = 0;
    while i + 1 < UNITS.len() && scaled >= (1u64 << (10 * (i + 1))) as f64 {
        i += 1;
    }
    let v = bytes as f64 / (1u64 << (10 * i)) as f64;
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else if v >= 1.0 {
        2
    } else {
        3
    };
    let mut t = format!("{v:.digits$}");
    if t.contains('.') {
        t = t.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{t} {}", UNITS[i])
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
    fn qemu_sizes_and_dates() {
        assert_eq!(qemu_size(0), "0 B");
        assert_eq!(qemu_size(512), "512 B");
        assert_eq!(qemu_size(1314816), "1.25 MiB");
        assert_eq!(qemu_size(64 << 20), "64 MiB");
        assert_eq!(qemu_size(1000 << 20), "0.977 GiB");
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(1754957438), "2025-08-12 00:10:38");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(8 << 30), "8.0 GiB");
    }
}
