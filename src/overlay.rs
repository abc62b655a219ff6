//! Where writes go: nowhere (read-only), into the top image in place, into
//! a qcow2 overlay file, or into a throw-away snapshot overlay.
//!
//! An overlay is a qcow2 image whose backing file is the user's image (its
//! format recorded, its name relative to the overlay where possible): the
//! base is only ever opened read-only. A snapshot is the same overlay in an
//! anonymous temporary file (`O_TMPFILE` through `tempfile`), so it
//! disappears at unmount and after a crash too.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::cache::Caches;
use crate::chain::{Chain, ChainOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::format::qcow2::create::{create, CreateOptions};
use crate::format::{self, Format};
use crate::host::{HostFile, HostOpen};
use crate::lock;

/// How a disk is opened for writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteMode {
    /// No writes.
    ReadOnly,
    /// Writes go into the top image itself.
    InPlace,
    /// Writes go into this qcow2 overlay (created if missing).
    Overlay(PathBuf),
    /// Writes go into a temporary overlay discarded at unmount.
    Snapshot,
}

impl WriteMode {
    /// The name `vdiskfs list` shows.
    pub fn name(&self) -> &'static str {
        match self {
            WriteMode::ReadOnly => "ro",
            WriteMode::InPlace => "rw",
            WriteMode::Overlay(_) => "overlay",
            WriteMode::Snapshot => "snapshot",
        }
    }

    /// True for every mode that accepts writes.
    pub fn writable(&self) -> bool {
        *self != WriteMode::ReadOnly
    }
}

/// Cluster size of overlays we create (qemu's default).
const OVERLAY_CLUSTER_BITS: u32 = 16;

/// Opens `image` as `mode` says. `force_lock` skips the check for other
/// writers (qemu-compatible locks).
pub fn open(
    image: &Path,
    mode: &WriteMode,
    opts: &ChainOptions,
    caches: &Arc<Caches>,
    force_lock: bool,
) -> Result<Chain> {
    if opts.load_snapshot.is_some() && mode.writable() {
        // A loaded snapshot shares its clusters with the active state; an
        // overlay on it would need a backing reference naming the snapshot.
        return Err(Error::new(
            ErrorKind::ReadOnly,
            "--load-snapshot exposes a snapshot read-only (as qemu-nbd -l): \
             it cannot be combined with --rw, --overlay or --snapshot",
        )
        .with_path(image));
    }
    let ro = ChainOptions {
        writable: false,
        ..opts.clone()
    };
    let rw = ChainOptions {
        writable: true,
        ..opts.clone()
    };
    match mode {
        WriteMode::ReadOnly => Chain::open(image, &ro, caches),
        WriteMode::InPlace => {
            let top = opts.policy.open_path(image, true)?;
            lock::lock_for_write(&top, force_lock)?;
            Chain::open_on(top, &rw, caches)
        }
        WriteMode::Overlay(file) => {
            let base = Chain::open(image, &ro, caches)?;
            let top = open_or_create_overlay(file, image, &base)?;
            lock::lock_for_write(&top, force_lock)?;
            let mut ov = ChainOptions {
                format: Some(Format::Qcow2),
                ..rw
            };
            if crate::remote::is_url(image) {
                // The overlay names the remote base by URL, which untrusted
                // mode refuses; the base chain passed the policy just above.
                ov.policy.untrusted = false;
            }
            Chain::open_on(top, &ov, caches)
        }
        WriteMode::Snapshot => {
            let base = Chain::open(image, &ro, caches)?;
            let tmp = tempfile::tempfile()
                .map_err(|e| Error::io("cannot create the temporary snapshot overlay", e))?;
            let name = format!(
                "{} (temporary snapshot overlay)",
                std::env::temp_dir().join("vdiskfs").display()
            );
            let top = HostFile::from_file(tmp, PathBuf::from(name), true)?;
            let abs = resolve_image(image)?;
            create(
                &top,
                &CreateOptions {
                    virtual_size: base.size(),
                    cluster_bits: OVERLAY_CLUSTER_BITS,
                    backing_file: Some(abs.display().to_string()),
                    backing_format: Some(base.layers()[0].format()),
                },
            )?;
            let top = HostFile::from_file(
                top.file()
                    .try_clone()
                    .map_err(|e| Error::io("cannot reopen the snapshot overlay", e))?,
                top.path().to_path_buf(),
                true,
            )?;
            let ov = ChainOptions {
                format: Some(Format::Qcow2),
                // The temporary overlay's backing name is absolute by construction.
                policy: crate::policy::OpenPolicy {
                    untrusted: false,
                    ..opts.policy.clone()
                },
                ..rw
            };
            Chain::open_on(top, &ov, caches)
        }
    }
}

/// Opens the overlay `file` for writing, creating it over `base` if it is
/// missing or empty; an existing overlay must name `image` as its backing file.
fn open_or_create_overlay(file: &Path, image: &Path, base: &Chain) -> Result<Arc<HostFile>> {
    let how = HostOpen {
        writable: true,
        ..Default::default()
    };
    let exists = std::fs::metadata(file)
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    if exists {
        let top = HostFile::open_with(file, how)?;
        let fmt = format::detect(&top)?;
        if fmt != Format::Qcow2 {
            return Err(Error::invalid(format!(
                "exists and is {fmt}, not a qcow2 overlay; refusing to overwrite it"
            ))
            .with_path(file));
        }
        check_backs(&top, image)?;
        return Ok(top);
    }
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::io("cannot resolve the overlay's directory", e).with_path(file))?;
    let name = if crate::remote::is_url(image) {
        // A remote base is recorded by its URL (see docs/remote.md).
        image.display().to_string()
    } else {
        relative_to(&resolve_image(image)?, &dir)
    };
    let created = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(file)
        .map_err(|e| Error::io("cannot create the overlay", e).with_path(file))?;
    drop(created);
    let top = HostFile::open_with(file, how)?;
    create(
        &top,
        &CreateOptions {
            virtual_size: base.size(),
            cluster_bits: OVERLAY_CLUSTER_BITS,
            backing_file: Some(name),
            backing_format: Some(base.layers()[0].format()),
        },
    )?;
    // Reopen so the file's length is current.
    HostFile::open_with(file, how)
}

/// Refuses an existing overlay whose backing file is not `image`.
fn check_backs(top: &Arc<HostFile>, image: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let caches = Caches::new(1 << 20);
    let opts = ChainOptions {
        format: Some(Format::Qcow2),
        single_link: true,
        ..Default::default()
    };
    let probe = HostFile::open(top.path())?;
    let chain = Chain::open_on(probe, &opts, &caches)?;
    let Some(spec) = chain.layers()[0].backing() else {
        return Err(Error::invalid(
            "is a qcow2 image without a backing file, not an overlay of the image",
        )
        .with_path(top.path()));
    };
    let named = opts.policy.resolve(top.path(), &spec.name)?;
    let same = if crate::remote::is_url(image) || crate::remote::is_url(&named) {
        named == image
    } else {
        match (std::fs::metadata(&named), std::fs::metadata(image)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    };
    if !same {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "is an overlay of {:?}, not of {}; refusing to mix them",
                spec.name,
                image.display()
            ),
        )
        .with_path(top.path()));
    }
    Ok(())
}

/// The absolute name of the user's image: a URL as given, a local path canonicalized.
fn resolve_image(image: &Path) -> Result<PathBuf> {
    if crate::remote::is_url(image) {
        return Ok(image.to_path_buf());
    }
    image
        .canonicalize()
        .map_err(|e| Error::io("cannot resolve", e).with_path(image))
}

/// `target` relative to the directory `from` (both absolute), e.g.
/// `../images/base.qcow2`; `target` itself when they share no prefix but `/`.
pub fn relative_to(target: &Path, from: &Path) -> String {
    let t: Vec<Component> = target.components().collect();
    let f: Vec<Component> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    if common <= 1 {
        return target.display().to_string();
    }
    let mut rel = PathBuf::new();
    for _ in common..f.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c.as_os_str());
    }
    rel.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names() {
        assert_eq!(
            relative_to(Path::new("/a/b/base.qcow2"), Path::new("/a/b")),
            "base.qcow2"
        );
        assert_eq!(
            relative_to(Path::new("/a/img/base.qcow2"), Path::new("/a/ov")),
            "../img/base.qcow2"
        );
        assert_eq!(
            relative_to(Path::new("/x/base"), Path::new("/y")),
            "/x/base"
        );
    }
}
