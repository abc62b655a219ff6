//! Which files an image may make us open, and how names inside images are
//! resolved.
//!
//! Backing files (qcow2, qcow, VMDK and VHD parents), VMDK extent files and qcow2
//! external data files are named *inside* an image, so a crafted image could
//! name `/etc/shadow`, `/dev/sda` or `../../secret`. Every such name goes
//! through [`OpenPolicy::resolve`], which:
//! - resolves relative names against the directory of the image that names
//!   them (not the current directory);
//! - in untrusted mode, refuses absolute names and anything that leaves the
//!   top image's directory tree (after following symlinks);
//! - refuses `/proc` and `/sys` paths unless devices are explicitly allowed;
//!   [`HostFile::open_with`] then refuses anything but regular files.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::host::{HostFile, HostOpen};

/// The open policy for files named inside images.
#[derive(Debug, Clone, Default)]
pub struct OpenPolicy {
    /// Confine named files to `root` (the top image's directory), refuse
    /// absolute names and `..` escapes, and do not probe backing formats.
    pub untrusted: bool,
    /// The directory tree named files must stay inside when `untrusted`.
    pub root: Option<PathBuf>,
    /// Allow block/character devices, FIFOs and /proc, /sys paths.
    pub allow_devices: bool,
    /// Open files with O_DIRECT.
    pub direct: bool,
    /// The qemu-compatible locks taken on files opened read-only.
    pub read_lock: crate::lock::ReadLock,
}

impl OpenPolicy {
    /// Resolves `name`, found inside the image at `naming_image`, to a path.
    pub fn resolve(&self, naming_image: &Path, name: &str) -> Result<PathBuf> {
        let refuse = |why: &str| {
            Err(Error::new(
                ErrorKind::Policy,
                format!("refusing file name {name:?}: {why}"),
            )
            .with_path(naming_image))
        };
        if name.is_empty() {
            return refuse("empty name");
        }
        if name.contains('\0') {
            return refuse("name contains a NUL byte");
        }
        if crate::remote::is_url_str(name) {
            if self.untrusted {
                return refuse("URLs are not allowed in untrusted mode");
            }
            return Ok(PathBuf::from(name));
        }
        let named = Path::new(name);
        if self.untrusted {
            if named.is_absolute() {
                return refuse("absolute names are not allowed in untrusted mode");
            }
            if named
                .components()
                .any(|c| matches!(c, Component::ParentDir))
            {
                return refuse("'..' is not allowed in untrusted mode");
            }
        }
        if crate::remote::is_url(naming_image) {
            return self
                .resolve_remote(naming_image, name)
                .or_else(|why| refuse(&why));
        }
        let dir = naming_image.parent().unwrap_or(Path::new("."));
        let path = if named.is_absolute() {
            named.to_path_buf()
        } else {
            dir.join(named)
        };
        if !self.allow_devices {
            if let Ok(canon) = path.canonicalize() {
                if canon.starts_with("/proc")
                    || canon.starts_with("/sys")
                    || canon.starts_with("/dev")
                {
                    return refuse("/proc, /sys and /dev paths need --allow-devices");
                }
            }
        }
        if self.untrusted {
            if let (Some(root), Ok(canon)) = (&self.root, path.canonicalize()) {
                let root = root.canonicalize().unwrap_or_else(|_| root.clone());
                if !canon.starts_with(&root) {
                    return refuse("it leaves the top image's directory (untrusted mode)");
                }
            }
        }
        Ok(path)
    }

    /// Resolves the relative `name` found inside the remote image at the
    /// URL `naming_image` to a URL in the same bucket (or on the same
    /// server): `..` may climb the key but not out of the bucket, and in
    /// untrusted mode the result must lie under [`OpenPolicy::root`]. A
    /// remote image never names a local file.
    fn resolve_remote(
        &self,
        naming_image: &Path,
        name: &str,
    ) -> std::result::Result<PathBuf, String> {
        if name.starts_with('/') {
            return Err("a remote image may not name a local file".into());
        }
        let url = naming_image.to_str().unwrap_or_default();
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let mut parts: Vec<&str> = rest.split('/').collect();
        parts.pop(); // the naming image's own name
        for seg in name.split('/') {
            match seg {
                "" | "." => {}
                ".." if parts.len() > 1 => {
                    parts.pop();
                }
                ".." => return Err("it leaves the bucket (or server)".into()),
                s => parts.push(s),
            }
        }
        let resolved = format!("{scheme}://{}", parts.join("/"));
        if self.untrusted {
            if let Some(root) = self.root.as_ref().and_then(|r| r.to_str()) {
                let prefix = format!("{}/", root.trim_end_matches('/'));
                if !resolved.starts_with(&prefix) {
                    return Err(format!(
                        "it leaves the top image's prefix {prefix} (untrusted mode)"
                    ));
                }
            }
        }
        Ok(PathBuf::from(resolved))
    }

    /// Resolves and opens a file named inside `naming_image`, read-only unless `writable`.
    pub fn open_named(
        &self,
        naming_image: &Path,
        name: &str,
        writable: bool,
    ) -> Result<Arc<HostFile>> {
        let path = self.resolve(naming_image, name)?;
        self.open_path(&path, writable)
    }

    /// Opens a path chosen by the user (the top image) under this policy's
    /// device and O_DIRECT settings.
    /// Read-only opens take the locks [`OpenPolicy::read_lock`] asks for.
    pub fn open_path(&self, path: &Path, writable: bool) -> Result<Arc<HostFile>> {
        let file = HostFile::open_with(
            path,
            HostOpen {
                writable,
                allow_devices: self.allow_devices,
                direct: self.direct,
            },
        )?;
        if !writable {
            crate::lock::lock_for_read(&file, self.read_lock)?;
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_resolve_against_the_naming_image() {
        let p = OpenPolicy::default();
        assert_eq!(
            p.resolve(Path::new("/a/b/top.qcow2"), "base.raw").unwrap(),
            PathBuf::from("/a/b/base.raw")
        );
    }

    #[test]
    fn untrusted_refuses_absolute_and_dotdot() {
        let p = OpenPolicy {
            untrusted: true,
            ..Default::default()
        };
        let img = Path::new("/a/b/top.qcow2");
        assert_eq!(
            p.resolve(img, "/etc/passwd").unwrap_err().kind(),
            ErrorKind::Policy
        );
        assert_eq!(
            p.resolve(img, "../x.raw").unwrap_err().kind(),
            ErrorKind::Policy
        );
    }

    #[test]
    fn names_inside_remote_images_resolve_against_the_url() {
        let p = OpenPolicy::default();
        let img = Path::new("s3://bkt/vm/disks/top.qcow2");
        assert_eq!(
            p.resolve(img, "base.raw").unwrap(),
            PathBuf::from("s3://bkt/vm/disks/base.raw")
        );
        assert_eq!(
            p.resolve(img, "../shared/base.raw").unwrap(),
            PathBuf::from("s3://bkt/vm/shared/base.raw")
        );
        assert!(p.resolve(img, "../../../x.raw").is_err());
        assert_eq!(
            p.resolve(img, "/etc/passwd").unwrap_err().kind(),
            ErrorKind::Policy
        );
        let untrusted = OpenPolicy {
            untrusted: true,
            root: Some(PathBuf::from("s3://bkt/vm/disks")),
            ..Default::default()
        };
        assert!(untrusted.resolve(img, "sub/base.raw").is_ok());
        assert!(untrusted.resolve(img, "../x.raw").is_err());
        assert!(untrusted.resolve(img, "s3://other/x.raw").is_err());
        assert!(untrusted
            .resolve(Path::new("/a/top.qcow2"), "https://h/x.raw")
            .is_err());
    }

    #[test]
    fn proc_and_dev_are_refused_by_default() {
        let p = OpenPolicy::default();
        let img = Path::new("/a/top.qcow2");
        assert_eq!(
            p.resolve(img, "/proc/self/environ").unwrap_err().kind(),
            ErrorKind::Policy
        );
        assert_eq!(
            p.resolve(img, "/dev/null").unwrap_err().kind(),
            ErrorKind::Policy
        );
    }
}
