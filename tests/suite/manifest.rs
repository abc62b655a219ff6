//! Every row of ../shared/testdata/MANIFEST.tsv and MANIFEST-next.tsv:
//! images written by VMware, VirtualBox, Hyper-V, Virtual PC, ovftool,
//! OpenVZ ploop, old qemu and others. Checked through the library and
//! through a real FUSE mount.
//!
//! - A row of a format that has landed ([`LANDED`], qemu's driver names)
//!   must read with exactly the recorded sha256 and virtual size, or, where
//!   the manifest says `-`, fail to open with a one-line error naming the
//!   file and of the kind [`REFUSALS`] expects (the image itself must
//!   exist: a missing fixture is not a correct refusal). `~sha` means
//!   either.
//! - A row of a format not landed yet must be refused with an error naming
//!   the format: never read as raw.
//! - Disks larger than [`HASH_LIMIT`] are not pushed through sha256 in CI:
//!   they must be empty (no layer stores data anywhere, SEEK_DATA finds
//!   nothing, spot reads are zeros), which is what such rows hold; set
//!   `VDISKFS_FULL_MANIFEST=1` for the full hash (the documented long run).

use crate::common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::fuse::{vdiskfs, Mounted};
use common::manifest as shared;
use vdiskfs::chain::{Chain, Status};
use vdiskfs::ErrorKind;

/// Formats (qemu's driver names) vdiskfs reads; rows of any other format
/// must be refused by name. Add a format here when its driver lands.
const LANDED: &[&str] = &[
    "raw",
    "qcow2",
    "qcow",
    "vmdk",
    "vpc",
    "vhdx",
    "vdi",
    "parallels",
];

/// The error kind each "must refuse" row (`-`) must fail with.
const REFUSALS: &[(&str, ErrorKind)] = &[
    (
        "qcow2-virtnbdbackup-datafile-raw-missing.qcow2",
        ErrorKind::NotFound,
    ),
    (
        "qcow2-cdi-backing-chain-raw-base-missing/cirros-snapshot2.qcow2",
        ErrorKind::NotFound,
    ),
    (
        "hostile-binwalk-truncated-header-only.qcow2",
        ErrorKind::Corrupt,
    ),
    ("hostile-cdi-qcow1-huge-size.qcow", ErrorKind::Corrupt),
    (
        "vmdk-forklift-hostile-utf8mangled-monolithicSparse.vmdk",
        ErrorKind::Corrupt,
    ),
    (
        "hostile-cdi-qcow2-65536-snapshots-at-offset0.qcow2",
        ErrorKind::Corrupt,
    ),
    (
        "next/hostile-qemuiotests-afl9-vmdk-huge-capacity.vmdk",
        ErrorKind::Corrupt,
    ),
    (
        "next/vmdk-bwlp-monolithicFlat-extent-missing/image_t2.vmdk",
        ErrorKind::NotFound,
    ),
    (
        "next/vhd-dfvfs-diskpart-differencing-parent-missing/fat-differential.vhd",
        ErrorKind::NotFound,
    ),
    (
        "next/vhd-dfvfs-handedited-differencing/image-differential.vhd",
        ErrorKind::Corrupt,
    ),
];

/// Disks larger than this are checked as empty instead of hashed.
const HASH_LIMIT: u64 = 64 << 30;

struct Row {
    file: String,
    format: String,
    virtual_size: Option<u64>,
    want: Want,
}

enum Want {
    Sha(String),
    Refuse,
    Either(String),
    /// A format that has not landed: refused, the error naming it.
    RefuseByName(String),
}

/// The shared rows, with formats that have not landed turned into
/// "refused by name".
fn rows_of(manifest: &str) -> Vec<Row> {
    common::manifest::rows(manifest)
        .into_iter()
        .map(|r| {
            let landed = r.format == "-" || LANDED.contains(&r.format.as_str());
            let want = match r.want {
                _ if !landed => Want::RefuseByName(r.format.clone()),
                shared::Want::Refuse => Want::Refuse,
                shared::Want::Either(s) => Want::Either(s),
                shared::Want::Sha(s) => Want::Sha(s),
            };
            Row {
                file: r.file,
                format: r.format,
                virtual_size: r.virtual_size,
                want,
            }
        })
        .collect()
}

fn rows() -> Vec<Row> {
    let mut v = rows_of(shared::MANIFEST);
    v.extend(rows_of(shared::MANIFEST_NEXT));
    v
}

fn image(row: &Row) -> PathBuf {
    common::testdata().join("images").join(&row.file)
}

fn full_hash() -> bool {
    std::env::var_os("VDISKFS_FULL_MANIFEST").is_some()
}

/// Checks cheaply that `chain` is an empty disk of `size` bytes: no layer
/// stores data anywhere, and spot reads (both ends, 64 places between)
/// are zeros.
fn check_empty(chain: &Chain, size: u64) -> Result<(), String> {
    if chain.size() != size {
        return Err(format!("size {} != {size}", chain.size()));
    }
    let mut pos = 0;
    while pos < size {
        match chain.status(pos, size - pos) {
            Ok((Status::Hole, n)) => pos += n.max(1),
            Ok((Status::Data, _)) => return Err(format!("stores data at {pos:#x}")),
            Err(e) => return Err(format!("status at {pos:#x}: {e}")),
        }
    }
    let mut rng = common::rng::Rng::new(size);
    let mut buf = vec![0u8; 1 << 16];
    let len = buf.len() as u64;
    let spots = [0, size.saturating_sub(len)]
        .into_iter()
        .chain((0..64).map(|_| rng.below(size.saturating_sub(len) + 1)));
    for at in spots {
        let n = len.min(size - at) as usize;
        chain
            .read_at(&mut buf[..n], at)
            .map_err(|e| format!("read at {at:#x}: {e}"))?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Err(format!("non-zero bytes at {at:#x}"));
        }
    }
    Ok(())
}

/// Checks a refusal: one line naming a file, of the expected kind.
fn check_refusal(row: &Row, e: &vdiskfs::Error) -> Result<(), String> {
    let msg = e.to_string();
    if msg.contains('\n') || e.path().is_none() {
        return Err(format!(
            "refused, but the error is not one line naming a file: {msg}"
        ));
    }
    if let Want::RefuseByName(f) = &row.want {
        if !msg.contains(f.as_str()) {
            return Err(format!("refused without naming the format {f}: {msg}"));
        }
        return Ok(());
    }
    match REFUSALS.iter().find(|(f, _)| *f == row.file) {
        Some((_, kind)) if e.kind() == *kind => Ok(()),
        Some((_, kind)) => Err(format!(
            "refused as {:?}, expected {kind:?}: {msg}",
            e.kind()
        )),
        None if matches!(row.want, Want::Either(_)) => Ok(()),
        None => Err(format!(
            "refused ({:?}: {msg}); add the row's expected kind to REFUSALS",
            e.kind()
        )),
    }
}

#[test]
fn empty_disk_check_is_cheap_and_sees_data() {
    let d = common::scratch();
    let p = d.path().join("big.qcow2");
    common::qemu_img(&["create", "-f", "qcow2", p.to_str().unwrap(), "200G"]);
    let started = Instant::now();
    let chain = common::open_chain(&p).unwrap();
    check_empty(&chain, 200 << 30).unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        check_empty(&chain, 100 << 30).is_err(),
        "wrong size accepted"
    );
    common::qemu_io("qcow2", &p, &["write -P 1 150G 4k"]);
    let chain = common::open_chain(&p).unwrap();
    assert!(check_empty(&chain, 200 << 30).is_err(), "data not seen");
}

#[test]
fn every_manifest_row_through_the_library() {
    let rows = rows();
    assert!(rows.len() >= 30, "manifests have only {} rows", rows.len());
    let mut failures = Vec::new();
    for row in &rows {
        let path = image(row);
        if !path.is_file() {
            failures.push(format!("{}: the image file is missing", row.file));
            continue;
        }
        let started = Instant::now();
        let opened = common::open_chain(&path);
        let outcome = match (&row.want, opened) {
            (Want::Refuse | Want::RefuseByName(_), Ok(c)) => Err(format!(
                "opened as {}, but must be refused",
                c.layers()[0].format()
            )),
            (Want::Refuse | Want::Either(_) | Want::RefuseByName(_), Err(e)) => {
                check_refusal(row, &e)
            }
            (Want::Sha(sha) | Want::Either(sha), Ok(chain)) => {
                if let Some(vs) = row.virtual_size {
                    if chain.size() != vs {
                        failures.push(format!("{}: size {} != {vs}", row.file, chain.size()));
                    }
                }
                if chain.size() > HASH_LIMIT && !full_hash() {
                    check_empty(&chain, chain.size())
                } else {
                    match common::sha256_chain(&chain) {
                        Ok(got) if got == *sha => Ok(()),
                        Ok(got) => Err(format!("sha256 {got} != {sha}")),
                        Err(e) => Err(format!("read failed: {e}")),
                    }
                }
            }
            (Want::Sha(_), Err(e)) => Err(format!("cannot open: {e}")),
        };
        // A bound that catches hangs, not slow machines: hashing a big
        // sparse disk (16 GiB of streamOptimized VMDK) takes its time.
        let budget = 60 + row.virtual_size.unwrap_or(0).min(HASH_LIMIT) / (100 << 20);
        if started.elapsed() > Duration::from_secs(budget) && !full_hash() {
            failures.push(format!("{}: took {:?}", row.file, started.elapsed()));
        }
        if let Err(msg) = outcome {
            failures.push(format!("{} ({}): {msg}", row.file, row.format));
        }
    }
    assert!(
        failures.is_empty(),
        "manifest failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_manifest_row_through_fuse_and_the_cli() {
    let mut failures = Vec::new();
    for row in rows() {
        let path = image(&row);
        if !path.is_file() {
            failures.push(format!("{}: the image file is missing", row.file));
            continue;
        }
        let info = vdiskfs(&["info", "--json", path.to_str().unwrap()]);
        let mounted = Mounted::try_new(&[&path], &[]);
        match (&row.want, mounted) {
            (Want::Refuse | Want::RefuseByName(_), Ok(_)) => {
                failures.push(format!("{}: mounted but must be refused", row.file))
            }
            (Want::Refuse | Want::Either(_) | Want::RefuseByName(_), Err(msg)) => {
                if msg.trim().lines().count() != 1 {
                    failures.push(format!("{}: error is not one line: {msg}", row.file));
                }
                if let Want::RefuseByName(f) = &row.want {
                    if !msg.contains(f.as_str()) {
                        failures.push(format!("{}: error does not name {f}: {msg}", row.file));
                    }
                }
                if info.status.success() {
                    failures.push(format!("{}: info succeeded where mount failed", row.file));
                }
            }
            (Want::Sha(_), Err(msg)) => failures.push(format!("{}: mount failed: {msg}", row.file)),
            (Want::Sha(sha) | Want::Either(sha), Ok(m)) => {
                if !info.status.success() {
                    failures.push(format!(
                        "{}: info failed: {}",
                        row.file,
                        String::from_utf8_lossy(&info.stderr)
                    ));
                } else {
                    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
                    for key in ["format", "virtual_size", "chain"] {
                        if v.get(key).is_none() {
                            failures.push(format!("{}: info --json lacks {key}", row.file));
                        }
                    }
                }
                let name = vdiskfs::cli::exposed_name(&path).unwrap();
                let exposed = m.file(name.to_str().unwrap());
                let meta = std::fs::metadata(&exposed).unwrap();
                if Some(meta.len()) != row.virtual_size {
                    failures.push(format!("{}: exposed size {}", row.file, meta.len()));
                }
                // Big sparse disks are hashed through the library test; through
                // FUSE we hash everything up to 1 GiB, and check that disks
                // too large to hash are empty (SEEK_DATA finds nothing).
                if meta.len() <= 1 << 30 {
                    let got = common::sha256_file(&exposed);
                    if got != *sha {
                        failures.push(format!("{}: sha256 through FUSE {got} != {sha}", row.file));
                    }
                } else if meta.len() > HASH_LIMIT {
                    let f = std::fs::File::open(&exposed).unwrap();
                    if let Err(msg) = fuse_empty(&f, meta.len()) {
                        failures.push(format!("{}: through FUSE: {msg}", row.file));
                    }
                }
                m.unmount();
            }
        }
    }
    assert!(
        failures.is_empty(),
        "manifest failures:\n{}",
        failures.join("\n")
    );
}

/// Through FUSE: SEEK_DATA from 0 finds no data, and both ends read zeros.
fn fuse_empty(f: &std::fs::File, size: u64) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; lseek has no memory effects.
    let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    let err = std::io::Error::last_os_error();
    if r >= 0 || err.raw_os_error() != Some(libc::ENXIO) {
        return Err(format!("SEEK_DATA found data at {r} ({err})"));
    }
    let mut buf = vec![0u8; 1 << 16];
    for at in [0, size - buf.len() as u64, size / 2] {
        f.read_exact_at(&mut buf, at)
            .map_err(|e| format!("read at {at:#x}: {e}"))?;
        if buf.iter().any(|&b| b != 0) {
            return Err(format!("non-zero bytes at {at:#x}"));
        }
    }
    Ok(())
}
