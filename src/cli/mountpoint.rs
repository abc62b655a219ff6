//! Where a mount goes: the images and the mount point resolved on the
//! host (absolute paths, exposed names, a directory or a single file), and
//! the mount point checked (vacant, empty, not a dead mount). This is the
//! I/O half of validating `vdiskfs mount`; the values were validated by
//! [`super::config`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::config::MountConfig;
use super::exposed_name;
use crate::daemon;
use crate::error::{Error, ErrorKind, Result};
use crate::overlay::WriteMode;

/// The images and the mount point of a mount, resolved.
#[derive(Debug)]
pub struct MountPlan {
    /// Each image's absolute path (or URL) and its exposed file name.
    pub images: Vec<(PathBuf, OsString)>,
    /// The mount point, absolute.
    pub mountpoint: PathBuf,
    /// The mount point is a regular file: the raw view itself.
    pub single_file: bool,
}

/// Resolves the paths of `cfg` and checks the mount point.
pub fn plan(cfg: &MountConfig) -> Result<MountPlan> {
    let (mountpoint, images) = cfg
        .paths
        .split_last()
        .ok_or_else(|| Error::invalid("give at least one image and a mount point"))?;
    if images.is_empty() {
        return Err(Error::invalid("give at least one image and a mount point"));
    }
    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|e| dead_mount(e, mountpoint))?;
    let meta = std::fs::metadata(&mountpoint).map_err(|e| dead_mount(e, &mountpoint))?;
    if !cfg.nonempty {
        check_vacant(&mountpoint, meta.is_dir())?;
    }
    let single_file = if meta.is_file() {
        if images.len() != 1 {
            return Err(
                Error::invalid("a regular file as mount point takes exactly one image")
                    .with_path(&mountpoint),
            );
        }
        true
    } else if meta.is_dir() {
        false
    } else {
        return Err(
            Error::invalid("mount point must be a directory or a regular file")
                .with_path(&mountpoint),
        );
    };
    let mut named: Vec<(PathBuf, OsString)> = Vec::new();
    for img in images {
        let abs = if crate::remote::is_url(img) {
            if cfg.disk.mode == WriteMode::InPlace {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    "remote images are read-only; send writes to a local --overlay FILE or --snapshot",
                )
                .with_path(img));
            }
            img.clone()
        } else {
            img.canonicalize()
                .map_err(|e| Error::io("cannot open", e).with_path(img))?
        };
        let name = exposed_name(img)?;
        if let Some((other, _)) = named.iter().find(|(_, n)| *n == name) {
            return Err(Error::invalid(format!(
                "{} and {} would both appear as {}",
                other.display(),
                img.display(),
                name.to_string_lossy()
            )));
        }
        named.push((abs, name));
    }
    if matches!(cfg.disk.mode, WriteMode::Overlay(_)) && named.len() != 1 {
        return Err(Error::invalid("--overlay takes exactly one image"));
    }
    if single_file && cfg.partitions {
        return Err(
            Error::invalid("--partitions needs a directory as mount point").with_path(&mountpoint),
        );
    }
    Ok(MountPlan {
        images: named,
        mountpoint,
        single_file,
    })
}

/// The error for a mount point that cannot be resolved: a dead FUSE mount
/// (its daemon killed) answers ENOTCONN, which says nothing to a user; or,
/// while the kernel is still tearing the connection down, ECONNABORTED or
/// ECANCELED (a FUSE-over-io_uring mount: its rings are cancelled after the
/// daemon is gone; a request queued meanwhile ends aborted, or cancelled
/// when it was handed to a ring entry of the dead task).
fn dead_mount(e: std::io::Error, mountpoint: &Path) -> Error {
    if matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED)
    ) {
        let what = if daemon::mounts()
            .iter()
            .any(|m| mountpoint.is_absolute() && m.mountpoint == mountpoint)
        {
            "a dead vdiskfs mount"
        } else {
            "a dead mount"
        };
        return Error::invalid(format!(
            "is {what} (its daemon is gone); `vdiskfs unmount {}` clears it",
            mountpoint.display()
        ))
        .with_path(mountpoint);
    }
    Error::io("mount point", e).with_path(mountpoint)
}

/// Refuses a mount point that is already a mount (of any filesystem: a
/// second mount would hide the first, and its daemon with it), and a
/// directory that is not empty (its files would be hidden), as FUSE does.
/// `--nonempty` skips both checks.
fn check_vacant(mountpoint: &Path, is_dir: bool) -> Result<()> {
    if let Some((fstype, source)) = mount_at(mountpoint) {
        return Err(Error::invalid(format!(
            "is already a mount point ({fstype} from {source}); unmount it first, \
             or give --nonempty (-o nonempty) to mount over it"
        ))
        .with_path(mountpoint));
    }
    if !is_dir {
        return Ok(());
    }
    let entries = std::fs::read_dir(mountpoint)
        .map_err(|e| Error::io("cannot list the mount point", e).with_path(mountpoint))?;
    let mut names: Vec<String> = entries
        .take(4)
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    let shown = if names.len() > 3 {
        format!("{}, ...", names[..3].join(", "))
    } else {
        names.join(", ")
    };
    Err(Error::invalid(format!(
        "mount point is not empty (it holds {shown}); use an empty directory, \
         or give --nonempty (-o nonempty) to hide its contents"
    ))
    .with_path(mountpoint))
}

/// The type and source of the mount whose mount point is exactly `path`
/// (the last one, if several are stacked), from /proc/self/mountinfo.
fn mount_at(path: &Path) -> Option<(String, String)> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_str()?;
    table.lines().rev().find_map(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        if f.len() < sep + 3 || f.len() < 5 {
            return None;
        }
        let mp = daemon::unescape(f[4]);
        (mp == want).then(|| (f[sep + 1].to_string(), f[sep + 2].to_string()))
    })
}
