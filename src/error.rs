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
    /// A bug in vdiskfs itself (a state its own code should never reach),
    /// reported instead of a panic.
    Internal,
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
            ErrorKind::Internal => "internal error (a bug in vdiskfs)",
        }
    }
}

/// An error with its kind and context.
///
/// Offsets are labelled: a *guest* offset is a position on the virtual
/// disk (what the user read or wrote), a *host* offset a position in an
/// image file. Wrapping an error with [`Error::context`] keeps the inner
/// error whole (its kind, file, offsets and io source) as the cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    guest: Option<u64>,
    host: Option<u64>,
    message: String,
    source: Option<io::Error>,
    cause: Option<Box<Error>>,
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with a human-readable `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            path: None,
            guest: None,
            host: None,
            message: message.into(),
            source: None,
            cause: None,
        }
    }

    /// Shorthand for [`ErrorKind::Internal`]: a state vdiskfs's own code
    /// should never reach.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Wraps this error in an outer `message` (what was being done when it
    /// happened). The outer error has the same kind; this one stays whole
    /// as its cause, so its errno, file and offsets are not lost.
    pub fn context(self, message: impl Into<String>) -> Self {
        Error {
            kind: self.kind,
            path: None,
            guest: None,
            host: None,
            message: message.into(),
            source: None,
            cause: Some(Box::new(self)),
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
        let mut e = Error::new(kind, message);
        e.source = Some(source);
        e
    }

    /// Attaches the file the error concerns (kept if one is already set:
    /// the innermost file is the most precise).
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// Attaches the guest (virtual disk) offset the error concerns (kept
    /// if already set).
    pub fn at_guest(mut self, offset: u64) -> Self {
        self.guest.get_or_insert(offset);
        self
    }

    /// Attaches the host (image file) offset the error concerns (kept if
    /// already set).
    pub fn at_host(mut self, offset: u64) -> Self {
        self.host.get_or_insert(offset);
        self
    }

    /// The kind, for matching.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The file this error concerns, if known (the innermost one named).
    pub fn path(&self) -> Option<&Path> {
        self.cause
            .as_ref()
            .and_then(|c| c.path())
            .or(self.path.as_deref())
    }

    /// The guest offset this error concerns, if known.
    pub fn guest_offset(&self) -> Option<u64> {
        self.guest
            .or_else(|| self.cause.as_ref().and_then(|c| c.guest_offset()))
    }

    /// The host offset this error concerns, if known.
    pub fn host_offset(&self) -> Option<u64> {
        self.host
            .or_else(|| self.cause.as_ref().and_then(|c| c.host_offset()))
    }

    /// The error this one wraps, if any (see [`Error::context`]).
    pub fn cause(&self) -> Option<&Error> {
        self.cause.as_deref()
    }

    /// The message without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The errno a FUSE reply (or a process exit) should carry.
    pub fn errno(&self) -> i32 {
        if let Some(cause) = &self.cause {
            if cause.kind == self.kind {
                return cause.errno();
            }
        }
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
            | ErrorKind::CidMismatch
            | ErrorKind::Internal => libc::EIO,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        write!(f, "{}", self.message)?;
        match (self.guest, self.host) {
            (Some(g), Some(h)) => write!(f, " (guest offset {g:#x}, host offset {h:#x})")?,
            (Some(g), None) => write!(f, " (guest offset {g:#x})")?,
            (None, Some(h)) => write!(f, " (host offset {h:#x})")?,
            (None, None) => {}
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        if let Some(cause) = &self.cause {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match (&self.cause, &self.source) {
            (Some(c), _) => Some(c.as_ref() as _),
            (None, Some(s)) => Some(s as _),
            (None, None) => None,
        }
    }
}

/// Adds context to a `Result` on its way up.
pub trait ResultExt<T> {
    /// See [`Error::with_path`].
    fn with_path(self, path: impl AsRef<Path>) -> Result<T>;
    /// See [`Error::at_guest`].
    fn at_guest(self, offset: u64) -> Result<T>;
    /// See [`Error::at_host`].
    fn at_host(self, offset: u64) -> Result<T>;
    /// See [`Error::context`].
    fn context(self, message: impl Into<String>) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| e.with_path(path))
    }
    fn at_guest(self, offset: u64) -> Result<T> {
        self.map_err(|e| e.at_guest(offset))
    }
    fn at_host(self, offset: u64) -> Result<T> {
        self.map_err(|e| e.at_host(offset))
    }
    fn context(self, message: impl Into<String>) -> Result<T> {
        self.map_err(|e| e.context(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line_with_context() {
        let e = Error::corrupt("L2 table offset past end of file")
            .at_host(0x30000)
            .at_guest(0x1000)
            .with_path("/img/a.qcow2");
        assert_eq!(
            e.to_string(),
            "/img/a.qcow2: L2 table offset past end of file (guest offset 0x1000, host offset \
             0x30000)"
        );
        assert_eq!(e.errno(), libc::EIO);
    }

    #[test]
    fn innermost_context_wins() {
        let e = Error::corrupt("x").with_path("inner").with_path("outer");
        assert_eq!(e.path(), Some(Path::new("inner")));
    }

    #[test]
    fn context_keeps_the_cause_whole() {
        let inner = Error::io("read failed", io::Error::from_raw_os_error(libc::ENOSPC))
            .at_host(0x200)
            .with_path("base.vmdk");
        let e = inner
            .context("extent 1 cannot be read")
            .with_path("disk.vmdk");
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.errno(), libc::ENOSPC, "the io source survives wrapping");
        assert_eq!(e.host_offset(), Some(0x200));
        assert_eq!(e.path(), Some(Path::new("base.vmdk")));
        assert_eq!(
            e.to_string(),
            "disk.vmdk: extent 1 cannot be read: base.vmdk: read failed (host offset 0x200): \
             No space left on device (os error 28)"
        );
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.to_string().starts_with("base.vmdk: read failed"));
    }

    #[test]
    fn internal_bugs_have_their_own_kind() {
        let e = Error::internal("flat writer on a non-flat extent");
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.kind().as_str().contains("bug"));
    }

    #[test]
    fn missing_file_maps_to_enoent() {
        let e = Error::io("open", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.errno(), libc::ENOENT);
    }
}
