//! The mount daemon's life: detaching, telling the parent the mount is live,
//! signals, the runtime state behind `vdiskfs list`, and unmounting.
//!
//! `vdiskfs mount` without `-f` validates everything it can, then starts a
//! copy of itself in its own session (`--foreground --notify-fd N`) and
//! waits until that copy writes `ok` (the mount is live) or an error line
//! on the pipe. So a script can use the mount on its next line, and a
//! failure is reported by the command the user ran, with a non-zero exit.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// What `vdiskfs list` knows about one daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountState {
    /// Where the disks are mounted.
    pub mountpoint: PathBuf,
    /// The top images, in order.
    pub images: Vec<PathBuf>,
    /// `ro`, `rw`, `overlay` or `snapshot`.
    pub mode: String,
    /// The daemon's process id.
    pub pid: u32,
    /// NBD endpoints the daemon serves the disks on (`vdiskfs serve`,
    /// `mount --nbd`); a `serve` daemon has an empty mount point.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nbd: Vec<String>,
}

/// The directory holding one state file per running daemon.
pub fn state_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/vdiskfs")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(d).join("vdiskfs")
    } else {
        PathBuf::from(format!("/tmp/vdiskfs-{uid}"))
    }
}

/// Records this daemon's state; removed again by [`StateFile`]'s drop.
pub struct StateFile(PathBuf);

impl StateFile {
    /// Writes the state file for `state`.
    pub fn create(state: &MountState) -> Result<StateFile> {
        let dir = state_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io("cannot create state directory", e).with_path(&dir))?;
        let path = dir.join(format!("{}.json", state.pid));
        let body = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::invalid(format!("cannot encode state: {e}")))?;
        std::fs::write(&path, body)
            .map_err(|e| Error::io("cannot write state file", e).with_path(&path))?;
        Ok(StateFile(path))
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A mount of type `fuse.vdiskfs` from the mount table.
#[derive(Debug, Clone)]
pub struct MountEntry {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// The source column (the images).
    pub source: String,
    /// Mount options.
    pub options: String,
}

/// Every `fuse.vdiskfs` mount in this mount namespace.
pub fn mounts() -> Vec<MountEntry> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < sep + 3 || fields.len() < 6 {
            continue;
        }
        if fields[sep + 1] != "fuse.vdiskfs" {
            continue;
        }
        out.push(MountEntry {
            mountpoint: PathBuf::from(unescape(fields[4])),
            source: unescape(fields[sep + 2]),
            options: fields[5].to_string(),
        });
    }
    out
}

/// Undoes the octal escapes (`\040`) of /proc/self/mountinfo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Daemon states whose mount is still present, stale files removed.
pub fn list_states() -> Vec<(MountEntry, Option<MountState>)> {
    let states = live_states();
    mounts()
        .into_iter()
        .map(|m| {
            let st = states
                .iter()
                .find(|s| s.mountpoint == m.mountpoint)
                .cloned();
            (m, st)
        })
        .collect()
}

/// Running `vdiskfs serve` daemons (NBD only, no mount).
pub fn serve_states() -> Vec<MountState> {
    live_states()
        .into_iter()
        .filter(|s| s.mountpoint.as_os_str().is_empty())
        .collect()
}

/// The state files of running daemons; those of dead ones are removed.
fn live_states() -> Vec<MountState> {
    let mut states = Vec::new();
    if let Ok(rd) = std::fs::read_dir(state_dir()) {
        for e in rd.flatten() {
            let Ok(body) = std::fs::read(e.path()) else {
                continue;
            };
            let Ok(st) = serde_json::from_slice::<MountState>(&body) else {
                continue;
            };
            if !process_alive(st.pid) {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            states.push(st);
        }
    }
    states
}

/// True while `pid` runs (a zombie waiting to be reaped counts as gone).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Starts the daemon (this program with `extra` arguments added) detached
/// and waits until it reports the mount live or fails.
pub fn spawn_detached(extra_args: &[OsString]) -> Result<()> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("pipe", std::io::Error::last_os_error()));
    }
    let (rfd, wfd) = (fds[0], fds[1]);
    // SAFETY: rfd is a fresh descriptor we own.
    let mut reader = unsafe { File::from_raw_fd(rfd) };
    let exe = std::env::current_exe().map_err(|e| Error::io("cannot find own executable", e))?;
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    args.extend_from_slice(extra_args);
    args.push("--foreground".into());
    args.push("--notify-fd".into());
    args.push(wfd.to_string().into());
    let mut cmd = Command::new(exe);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure only calls async-signal-safe functions (setsid, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::fcntl(wfd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // SAFETY: wfd is ours; the child has its own copy.
    unsafe { libc::close(wfd) };
    let mut child = spawned.map_err(|e| Error::io("cannot start the daemon", e))?;
    let mut msg = String::new();
    let _ = reader.read_to_string(&mut msg);
    let msg = msg.trim();
    if msg == "ok" {
        return Ok(());
    }
    let status = child.wait().ok();
    if let Some(err) = msg.strip_prefix("error: ") {
        return Err(Error::new(ErrorKind::Io, err.to_string()));
    }
    Err(Error::new(
        ErrorKind::Io,
        format!(
            "the daemon exited before the mount was live ({})",
            status.map(|s| s.to_string()).unwrap_or_default()
        ),
    ))
}

/// The write end of the parent's pipe, in the daemon.
pub struct Notifier(Option<File>);

impl Notifier {
    /// Wraps the inherited descriptor (or nothing, in plain foreground mode).
    pub fn new(fd: Option<RawFd>) -> Notifier {
        // SAFETY: the fd was passed to us by our parent for exactly this use.
        Notifier(fd.map(|fd| unsafe { File::from_raw_fd(fd) }))
    }

    /// Tells the parent the mount is live, and detaches stdio.
    pub fn ready(&mut self) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(b"ok\n");
        }
    }

    /// Tells the parent why the mount failed.
    pub fn failed(&mut self, e: &Error) {
        if let Some(mut f) = self.0.take() {
            let _ = writeln!(f, "error: {e}");
        }
    }
}

/// Blocks the signals the daemon handles, so that only the thread started
/// by [`on_signal`] receives them. Call before starting any thread.
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; the calls only touch it and the mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Runs `action` on a thread of its own when SIGTERM, SIGINT or SIGHUP arrives.
pub fn on_signal(set: libc::sigset_t, mut action: impl FnMut(i32) + Send + 'static) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: set is a valid signal set; sig is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                info!("signal {sig} received: unmounting");
                action(sig);
            }
        });
}

/// A log sink that sends each line to syslog (daemon facility), for a
/// detached daemon started without `--log-file`.
pub struct Syslog {
    pending: Vec<u8>,
}

impl Syslog {
    /// Opens the connection to syslog under the name `vdiskfs`.
    pub fn new() -> Syslog {
        // SAFETY: the ident is a static NUL-terminated string, as openlog requires.
        unsafe { libc::openlog(c"vdiskfs".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
        Syslog {
            pending: Vec::new(),
        }
    }

    /// Sends one line.
    pub fn line(&self, text: &str) {
        let level = if text.contains("ERROR") {
            libc::LOG_ERR
        } else if text.contains("WARN") {
            libc::LOG_WARNING
        } else {
            libc::LOG_INFO
        };
        if let Ok(c) = std::ffi::CString::new(text.replace('\0', "")) {
            // SAFETY: both strings are valid and NUL-terminated; "%s" consumes one.
            unsafe { libc::syslog(level, c"%s".as_ptr(), c.as_ptr()) };
        }
    }
}

impl Default for Syslog {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for Syslog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).collect();
            self.line(String::from_utf8_lossy(&line[..line.len() - 1]).as_ref());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Unmounts a vdiskfs mount and waits for its daemon to exit.
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<()> {
    let mp = mountpoint
        .canonicalize()
        .map_err(|e| Error::io("cannot resolve mount point", e).with_path(mountpoint))
        .or_else(|e| {
            // A dead daemon leaves a mount point that cannot be stat'ed.
            if mounts().iter().any(|m| m.mountpoint == mountpoint) {
                Ok(mountpoint.to_path_buf())
            } else {
                Err(e)
            }
        })?;
    if !mounts().iter().any(|m| m.mountpoint == mp) {
        return Err(Error::invalid("not a vdiskfs mount").with_path(&mp));
    }
    let pid = list_states()
        .into_iter()
        .find_map(|(m, st)| (m.mountpoint == mp).then_some(st).flatten())
        .map(|s| s.pid);
    let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::invalid("mount point contains a NUL byte"))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // A loop device detached just before (`losetup -d`) lets go of its
    // backing file asynchronously: give a busy mount a few seconds.
    let busy_until = Instant::now() + Duration::from_secs(5);
    let rc = loop {
        // SAFETY: c is a valid NUL-terminated path.
        let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
        let busy = rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY);
        if !busy || Instant::now() >= busy_until {
            break rc;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EPERM) {
            let status = Command::new("fusermount3")
                .arg("-u")
                .args(lazy.then_some("-z"))
                .arg(&mp)
                .status()
                .map_err(|e| Error::io("cannot run fusermount3", e))?;
            if !status.success() {
                return Err(Error::new(ErrorKind::Io, "fusermount3 -u failed").with_path(&mp));
            }
        } else if err.raw_os_error() == Some(libc::EBUSY) {
            return Err(Error::new(
                ErrorKind::Locked,
                "mount is busy (a file is open or a loop device uses it; --lazy detaches anyway)",
            )
            .with_path(&mp));
        } else {
            return Err(Error::io("unmount failed", err).with_path(&mp));
        }
    }
    if let Some(pid) = pid {
        let deadline = Instant::now() + Duration::from_secs(60);
        while process_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if process_alive(pid) {
            warn!("daemon {pid} still running 60 s after unmount");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"plain"), "plain");
        assert_eq!(unescape(r"tail\04"), r"tail\04");
    }
}
