//! What an operation on the exposed files can fail with, and the one place
//! where a failure becomes an errno: both transports (fuser's `/dev/fuse`
//! loop and the io_uring one) reply with [`FsError::errno`].

use std::fmt;

/// A refused or failed operation on the mount's files.
#[derive(Debug)]
pub enum FsError {
    /// No such file (or inode).
    NotFound,
    /// The inode is the mount directory, not a disk.
    IsDir,
    /// The inode is a disk, not the mount directory.
    NotDir,
    /// A write to a disk that is not writable.
    ReadOnly,
    /// A write past the end: a disk's size is fixed, like a block device's.
    NoSpace,
    /// A resize (truncate): refused, the size is the image's.
    NotPermitted,
    /// An argument out of range (a negative offset, an unknown whence).
    Invalid,
    /// lseek found no data after the offset, or the offset is past the end.
    NoData,
    /// A fallocate mode we do not serve.
    Unsupported,
    /// No extended attribute of that name.
    NoAttr,
    /// The caller's buffer is too small for the attribute.
    Range,
    /// The image I/O itself failed (its error keeps its own errno).
    Image(crate::error::Error),
}

impl FsError {
    /// The errno the kernel gets for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::IsDir => libc::EISDIR,
            FsError::NotDir => libc::ENOTDIR,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoSpace => libc::ENOSPC,
            FsError::NotPermitted => libc::EPERM,
            FsError::Invalid => libc::EINVAL,
            FsError::NoData => libc::ENXIO,
            FsError::Unsupported => libc::EOPNOTSUPP,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::Image(e) => e.errno(),
        }
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsError::Image(e) => write!(f, "{e}"),
            other => write!(f, "{}", std::io::Error::from_raw_os_error(other.errno())),
        }
    }
}

impl From<crate::error::Error> for FsError {
    fn from(e: crate::error::Error) -> FsError {
        FsError::Image(e)
    }
}
