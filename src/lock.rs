//! Image locks compatible with qemu's, so a running VM (or qemu-img, or
//! qemu-storage-daemon) and vdiskfs never write one image at once.
//!
//! qemu describes its use of an image with open-file-description (OFD)
//! byte-range locks: a shared lock on byte `100 + n` means "I hold
//! permission n", a shared lock on byte `200 + n` means "nobody else may
//! take permission n". Permissions: 0 consistent read, 1 write, 2 write
//! unchanged, 3 resize. A writer such as a running VM locks 201 (it does
//! not share writing). We take the same bytes for a writable open and test
//! for conflicts first, as qemu does; OFD locks vanish with the file
//! descriptor, so a killed daemon leaves none behind.
//!
//! Read-only layers of a mount (a read-only top image, every backing file,
//! the base of an overlay or snapshot) are locked as qemu locks a backing
//! file and as `qemu-nbd -r` locks its image: we hold consistent read and
//! share it, but do not share write or resize. So a VM cannot start writing
//! an image under a live mount, and a mount of an image a VM writes is
//! refused instead of serving a view that goes stale.

use std::os::unix::fs::MetadataExt;

use nix::fcntl::{fcntl, FcntlArg};

use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const CONSISTENT_READ: u32 = 0;
const WRITE: u32 = 1;
const WRITE_UNCHANGED: u32 = 2;
const RESIZE: u32 = 3;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// Locks `file` for writing as qemu would (we use read and write; we let
/// others read, but not write or resize). Refuses with
/// [`ErrorKind::Locked`], naming the holder, when someone else writes the
/// image or refuses to share what we need; `force` skips the check.
pub fn lock_for_write(file: &HostFile, force: bool) -> Result<()> {
    let used = [CONSISTENT_READ, WRITE, WRITE_UNCHANGED];
    let not_shared = [WRITE, RESIZE];
    if !force {
        // What we use must be shared by everyone; what we do not share
        // must be held by no one.
        let checks = used
            .iter()
            .map(|&p| (SHARED_BASE, p, "does not share"))
            .chain(not_shared.iter().map(|&p| (PERM_BASE, p, "holds")));
        for (base, p, what) in checks {
            let byte = base + p as i64;
            if held_by_other(file, byte)? {
                return Err(conflict(
                    file,
                    &format!(
                        "another process {what} the {} permission",
                        PERM_NAMES[p as usize]
                    ),
                    byte,
                ));
            }
        }
    }
    for byte in used
        .iter()
        .map(|&p| PERM_BASE + p as i64)
        .chain(not_shared.iter().map(|&p| SHARED_BASE + p as i64))
    {
        set_lock(file, byte).or_else(|e| if force { Ok(()) } else { Err(e) })?;
    }
    Ok(())
}

/// How read-only opens lock their files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReadLock {
    /// No locks (`vdiskfs info`, which like `qemu-img info -U` only reads
    /// headers).
    #[default]
    Off,
    /// Take qemu's backing-file locks; refuse when someone writes the file.
    Share,
    /// `--force-lock`: take no locks; warn when someone writes the file.
    Force,
}

/// Locks the read-only `file` as `how` says: consistent read held, write
/// and resize not shared. A writer of the file (a running VM, a `--rw`
/// mount) makes this fail with [`ErrorKind::Locked`] naming it, or with
/// [`ReadLock::Force`] only log a warning.
pub fn lock_for_read(file: &HostFile, how: ReadLock) -> Result<()> {
    if how == ReadLock::Off {
        return Ok(());
    }
    let checks = [
        (
            SHARED_BASE + CONSISTENT_READ as i64,
            "another process does not share the consistent read permission",
        ),
        (PERM_BASE + WRITE as i64, "another process is writing it"),
        (PERM_BASE + RESIZE as i64, "another process may resize it"),
    ];
    for (byte, what) in checks {
        if held_by_other(file, byte)? {
            let e = conflict(file, what, byte);
            if how == ReadLock::Force {
                log::warn!("{e}; reading anyway (--force-lock): the view may go stale");
                return Ok(());
            }
            return Err(e);
        }
    }
    for byte in [
        PERM_BASE + CONSISTENT_READ as i64,
        SHARED_BASE + WRITE as i64,
        SHARED_BASE + RESIZE as i64,
    ] {
        set_lock(file, byte)?;
    }
    Ok(())
}

fn flock(kind: i32, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: byte,
        l_len: 1,
        // OFD locks require 0 here.
        l_pid: 0,
    }
}

/// True when another open file description holds a lock on `byte` that
/// would conflict with an exclusive lock.
fn held_by_other(file: &HostFile, byte: i64) -> Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    if let Err(e) = fcntl(file.file(), FcntlArg::F_OFD_GETLK(&mut fl)) {
        return Err(Error::io("cannot test image lock", e.into()).with_path(file.path()));
    }
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

fn set_lock(file: &HostFile, byte: i64) -> Result<()> {
    let fl = flock(libc::F_RDLCK, byte);
    if let Err(e) = fcntl(file.file(), FcntlArg::F_OFD_SETLK(&fl)) {
        let e = std::io::Error::from(e);
        return Err(conflict(
            file,
            &format!("cannot lock byte {byte}: {e}"),
            byte,
        ));
    }
    Ok(())
}

fn conflict(file: &HostFile, what: &str, byte: i64) -> Error {
    let who = holders(file, byte);
    let who = if who.is_empty() {
        String::new()
    } else {
        format!(" (held by {})", who.join(", "))
    };
    Error::new(
        ErrorKind::Locked,
        format!(
            "image is in use: {what}{who}; is a VM or qemu-img using it? (--force-lock overrides)"
        ),
    )
    .with_path(file.path())
}

/// Processes holding an OFD lock on `byte` of `file`, found through
/// /proc/PID/fdinfo (OFD locks carry no owner pid of their own).
fn holders(file: &HostFile, byte: i64) -> Vec<String> {
    let Ok(meta) = file.file().metadata() else {
        return Vec::new();
    };
    let (dev, ino) = (meta.dev(), meta.ino());
    let major = libc::major(dev);
    let minor = libc::minor(dev);
    let needle = format!("{major:02x}:{minor:02x}:{ino} ");
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().take(4096).any(|fd| {
            std::fs::read_to_string(fd.path())
                .map(|t| {
                    t.lines().any(|l| {
                        l.starts_with("lock:") && l.contains(&needle) && {
                            let f: Vec<&str> = l.split_whitespace().collect();
                            let (s, e) = (f[f.len() - 2], f[f.len() - 1]);
                            let s: i64 = s.parse().unwrap_or(-1);
                            let e: i64 = if e == "EOF" {
                                i64::MAX
                            } else {
                                e.parse().unwrap_or(-1)
                            };
                            s <= byte && byte <= e
                        }
                    })
                })
                .unwrap_or(false)
        });
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn open_rw(path: &std::path::Path) -> Arc<HostFile> {
        HostFile::open_with(
            path,
            crate::host::HostOpen {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn a_second_writer_is_refused_and_force_overrides() {
        let t = tempfile::NamedTempFile::new().unwrap();
        t.as_file().set_len(4096).unwrap();
        let a = open_rw(t.path());
        lock_for_write(&a, false).unwrap();
        let b = open_rw(t.path());
        let e = lock_for_write(&b, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        lock_for_write(&b, true).unwrap();
        drop(a);
        drop(b);
        let c = open_rw(t.path());
        lock_for_write(&c, false).unwrap();
    }

    fn open_ro(path: &std::path::Path) -> Arc<HostFile> {
        HostFile::open(path).unwrap()
    }

    #[test]
    fn readers_share_and_exclude_writers_both_ways() {
        let t = tempfile::NamedTempFile::new().unwrap();
        t.as_file().set_len(4096).unwrap();
        let r1 = open_ro(t.path());
        lock_for_read(&r1, ReadLock::Share).unwrap();
        let r2 = open_ro(t.path());
        lock_for_read(&r2, ReadLock::Share).unwrap();
        let w = open_rw(t.path());
        let e = lock_for_write(&w, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        assert!(e.to_string().contains("write"), "{e}");
        drop((r1, r2));
        lock_for_write(&w, false).unwrap();
        let r3 = open_ro(t.path());
        let e = lock_for_read(&r3, ReadLock::Share).unwrap_err();
        assert!(
            e.to_string().contains("another process is writing it"),
            "{e}"
        );
        lock_for_read(&r3, ReadLock::Force).unwrap();
        lock_for_read(&r3, ReadLock::Off).unwrap();
    }
}
