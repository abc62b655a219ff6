//! The one error type of vdiskfs.
//!
//! Every failure carries a small, stable [`ErrorKind`] to match on, plus the
//! context a user needs to act on it: which file, which offset, and what went
//! wrong. `Display` renders all of that on one line; [`Error::errno`] maps it
//! to the errno a FUSE reply should carry.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, independent of where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The host failed an I/O request (read, write, open, flush).
    Io,
    /// A file named by the user or by an image does not exist.
    NotFound,
    /// A bad option or argument from the user.
    InvalidInput,
    /// The image uses a format or feature vdiskfs does not implement.
    Unsupported,
    /// The image's metadata is inconsistent, out of range or truncated.
    Corrupt,
    /// The image is encrypted; vdiskfs does not decrypt.
    Encrypted,
    /// A backing chain names an image that is already part of it.
    ChainLoop,
    /// A backing chain is deeper than the configured limit.
    ChainTooDeep,
    /// A guest offset or length beyond the virtual disk.
    OutOfRange,
    /// A write was attempted on something opened read-only.
    ReadOnly,
    /// A file named inside an image was refused by the open policy.
    Policy,
    /// Another process holds a lock on the image.
    Locked,
    /// A parent is not the image its child was made against (VMDK CID,
    /// VHDX DataWriteGuid).
    CidMismatch,
}

impl ErrorKind {
    /// A short lowercase name, used in logs and tests.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::NotFound => "not found",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "corrupt image",
            ErrorKind::Encrypted => "encrypted image",
            ErrorKind::ChainLoop => "backing chain loop",
            ErrorKind::ChainTooDeep => "backing chain too deep",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::Policy => "refused by policy",
            ErrorKind::Locked => "locked",
            ErrorKind::CidMismatch => "CID mismatch",
        }
    }
}

/// An error with its kind and context.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    offset: Option<u64>,
    message: String,
    source: Option<io::Error>,
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with a human-readable `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            path: None,
            offset: None,
            message: message.into(),
            source: None,
        }
    }

    /// Shorthand for [`ErrorKind::Corrupt`].
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for [`ErrorKind::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// An I/O error from the host, with what we were doing.
    pub fn io(message: impl Into<String>, source: io::Error) -> Self {
        let kind = if source.kind() == io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Io
        };
        Error {
            kind,
            path: None,
            offset: None,
            message: message.into(),
            source: Some(source),
        }
    }

    /// Attaches the file the error concerns (kept if one is already set:
    /// the innermost file is the most precise).
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// Attaches the offset the error concerns (kept if already set).
    pub fn at(mut self, offset: u64) -> Self {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    /// The kind, for matching.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The file this error concerns, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The offset this error concerns, if known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The message without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The errno a FUSE reply (or a process exit) should carry.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io => self
                .source
                .as_ref()
                .and_then(io::Error::raw_os_error)
                .unwrap_or(libc::EIO),
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::InvalidInput => libc::EINVAL,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            ErrorKind::OutOfRange => libc::EFBIG,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::Policy => libc::EACCES,
            ErrorKind::Locked => libc::EBUSY,
            ErrorKind::Corrupt
            | ErrorKind::Encrypted
            | ErrorKind::ChainLoop
            | ErrorKind::ChainTooDeep
            | ErrorKind::CidMismatch => libc::EIO,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        write!(f, "{}", self.message)?;
        if let Some(offset) = self.offset {
            write!(f, " (at offset {offset:#x})")?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Adds context to a `Result` on its way up.
pub trait ResultExt<T> {
    /// See [`Error::with_path`].
    fn with_path(self, path: impl AsRef<Path>) -> Result<T>;
    /// See [`Error::at`].
    fn at(self, offset: u64) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| e.with_path(path))
    }
    fn at(self, offset: u64) -> Result<T> {
        self.map_err(|e| e.at(offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line_with_context() {
        let e = Error::corrupt("L2 table offset past end of file")
            .at(0x30000)
            .with_path("/img/a.qcow2");
        assert_eq!(
            e.to_string(),
            "/img/a.qcow2: L2 table offset past end of file (at offset 0x30000)"
        );
        assert_eq!(e.errno(), libc::EIO);
    }

    #[test]
    fn innermost_context_wins() {
        let e = Error::corrupt("x").with_path("inner").with_path("outer");
        assert_eq!(e.path(), Some(Path::new("inner")));
    }

    #[test]
    fn missing_file_maps_to_enoent() {
        let e = Error::io("open", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.errno(), libc::ENOENT);
    }
}
