//! The one reader of the shared test images' manifests,
//! `../shared/testdata/MANIFEST.tsv` and `MANIFEST-next.tsv`: columns found
//! by their header names, one [`Row`] per non-empty line. Every test that
//! walks the shared images takes its rows from here.

use std::path::PathBuf;

/// The first manifest (the images every release is checked against).
pub const MANIFEST: &str = "MANIFEST.tsv";
/// The second manifest (formats added later: VHD, VHDX, VDI, ...).
pub const MANIFEST_NEXT: &str = "MANIFEST-next.tsv";

/// One image of a manifest.
#[derive(Clone, Debug)]
pub struct Row {
    /// Path under `testdata/images/`, as the manifest writes it.
    pub file: String,
    /// qemu's format name, or `-` for an image qemu cannot read either.
    pub format: String,
    /// The subformat column (`v3`, `dynamic`, `monolithicSparse`, ...).
    pub subformat: String,
    /// Virtual size in bytes, when the row gives one.
    pub virtual_size: Option<u64>,
    /// What reading the image must give.
    pub want: Want,
}

/// The `raw_sha256` column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// The raw disk's sha256.
    Sha(String),
    /// `~HASH`: either refused, or read with this sha256.
    Either(String),
    /// `-`: must be refused.
    Refuse,
}

impl Want {
    /// The hash the disk must read as, if it is read at all.
    pub fn sha(&self) -> Option<&str> {
        match self {
            Want::Sha(s) | Want::Either(s) => Some(s),
            Want::Refuse => None,
        }
    }
}

impl Row {
    /// The image's path on this machine.
    pub fn path(&self) -> PathBuf {
        super::testdata().join("images").join(&self.file)
    }
}

/// Every row of `manifest` ([`MANIFEST`] or [`MANIFEST_NEXT`]); panics
/// naming the file and line when a row lacks a column.
pub fn rows(manifest: &str) -> Vec<Row> {
    let path = super::testdata().join(manifest);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = match lines.next() {
        Some((_, h)) => h.split('\t').collect(),
        None => panic!("{}: empty", path.display()),
    };
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("{}: no column {name}", path.display()))
    };
    let (file, format, subformat, size, sha) = (
        col("file"),
        col("format"),
        col("subformat"),
        col("virtual_size"),
        col("raw_sha256"),
    );
    lines
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            let c: Vec<&str> = l.split('\t').collect();
            let get = |i: usize| {
                *c.get(i)
                    .unwrap_or_else(|| panic!("{}:{}: too few columns", path.display(), n + 1))
            };
            Row {
                file: get(file).to_string(),
                format: get(format).to_string(),
                subformat: get(subformat).to_string(),
                virtual_size: get(size).parse().ok(),
                want: match get(sha) {
                    "-" => Want::Refuse,
                    s => match s.strip_prefix('~') {
                        Some(h) => Want::Either(h.to_string()),
                        None => Want::Sha(s.to_string()),
                    },
                },
            }
        })
        .collect()
}

/// The rows of both manifests.
pub fn all_rows() -> Vec<Row> {
    let mut v = rows(MANIFEST);
    v.extend(rows(MANIFEST_NEXT));
    v
}
