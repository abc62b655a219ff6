//! The mount daemon's life: detaching, telling the parent the mount is live,
//! signals, the runtime state behind `vdiskfs list`, and unmounting.
//!
//! `vdiskfs mount` without `-f` validates everything it can, then starts a
//! copy of itself in its own session, with the same arguments and the
//! readiness pipe named in the environment ([`NOTIFY_ENV`], so nothing is
//! appended to the user's arguments, which may end in `--`), and
//! waits until that copy writes `ok` (the mount is live) or an error line
//! on the pipe. So a script can use the mount on its next line, and a
//! failure is reported by the command the user ran, with a non-zero exit.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use log::info;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::mount::MntFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::syslog::Severity;
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
    /// The FUSE transport that runs (`classic` or `io_uring`); none for
    /// `serve` daemons and for states written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// NBD endpoints the daemon serves the disks on (`vdiskfs serve`,
    /// `mount --nbd`); a `serve` daemon has an empty mount point.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nbd: Vec<String>,
}

/// The directory holding one state file per running daemon.
pub fn state_dir() -> PathBuf {
    let uid = nix::unistd::geteuid().as_raw();
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

/// The `--pid-file`: holds the daemon's pid while it serves; removed by drop.
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes this process's id to `path` (made absolute first: the
    /// detached daemon works in `/`).
    pub fn create(path: &Path) -> Result<PidFile> {
        let path = std::path::absolute(path)
            .map_err(|e| Error::io("cannot resolve the pid file", e).with_path(path))?;
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .map_err(|e| Error::io("cannot write the pid file", e).with_path(&path))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
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
pub(crate) fn unescape(s: &str) -> String {
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

/// True while any thread of process `pid` runs. A zombie waiting to be
/// reaped counts as gone: it has closed its files, image locks included,
/// and its /dev/fuse descriptor. A zombie *main thread* does not: when
/// `main` returns, the main thread can be a zombie while the others are
/// still exiting (the io_uring queue threads wait for their commands to be
/// cancelled), and the process's files stay open until the last of them
/// is gone.
pub fn process_alive(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .flatten()
        .any(|t| task_state(&t.path().join("stat")).is_some_and(|c| !matches!(c, 'Z' | 'X')))
}

/// The state letter (`R`, `S`, `D`, `T`, `Z`…) in the `/proc` `stat` file
/// at `path`, of a process or one of its threads; `None` once it is gone.
fn task_state(path: &Path) -> Option<char> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The state follows the parenthesised command name.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

/// The environment variable naming the readiness pipe of a detached
/// daemon; its presence makes `vdiskfs mount` the daemon (in the foreground).
pub const NOTIFY_ENV: &str = "VDISKFS_NOTIFY_FD";

/// Takes the readiness pipe out of the environment (so it is not passed on
/// to fusermount3 and the like). Call before any thread starts.
pub fn take_notify_fd() -> Option<RawFd> {
    let v = std::env::var_os(NOTIFY_ENV)?;
    std::env::remove_var(NOTIFY_ENV);
    v.to_str()?.parse().ok().filter(|fd| *fd > 2)
}

/// Starts the daemon (this program with `extra` arguments added) detached
/// and waits until it reports the mount live or fails.
pub fn spawn_detached(extra_args: &[OsString]) -> Result<()> {
    let (reader, writer) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::io("pipe", e.into()))?;
    let mut reader = File::from(reader);
    let exe = std::env::current_exe().map_err(|e| Error::io("cannot find own executable", e))?;
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    args.extend_from_slice(extra_args);
    let mut cmd = Command::new(exe);
    cmd.args(&args)
        .env(NOTIFY_ENV, writer.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Until it reports, the daemon's stderr comes to us: whatever it
        // says before failing (a panic, an error before the pipe is in
        // use) is the reason we give. [`Notifier::ready`] then points it
        // at /dev/null.
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls async-signal-safe functions (setsid,
    // fcntl), as code between fork and exec must.
    unsafe {
        cmd.pre_exec(move || {
            let _ = nix::unistd::setsid();
            // The write end is the one descriptor the daemon inherits.
            fcntl(&writer, FcntlArg::F_SETFD(FdFlag::empty()))?;
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // Our copy of the write end goes with the command: the pipe then ends
    // when the daemon's copy does.
    drop(cmd);
    let mut child = spawned.map_err(|e| Error::io("cannot start the daemon", e))?;
    let mut msg = String::new();
    let _ = reader.read_to_string(&mut msg);
    let msg = msg.trim();
    if msg == "ok" {
        return Ok(());
    }
    let mut said = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut said);
    }
    let status = child.wait().ok();
    if let Some(err) = msg.strip_prefix("error: ") {
        return Err(Error::new(ErrorKind::Io, err.to_string()));
    }
    // Its last words, one line, without our own "vdiskfs: " prefix.
    let said: Vec<&str> = said
        .lines()
        .map(|l| l.trim().trim_start_matches("vdiskfs: "))
        .filter(|l| !l.is_empty())
        .collect();
    let said = said.join("; ");
    Err(Error::new(
        ErrorKind::Io,
        format!(
            "the daemon exited before the mount was live ({}){}{}",
            status.map(|s| s.to_string()).unwrap_or_default(),
            if said.is_empty() { "" } else { ": " },
            said
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
            // The parent stops reading our stderr now: give it /dev/null, so
            // that a late write neither fails nor blocks.
            if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                let _ = nix::unistd::dup2_stderr(&null);
            }
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
/// SIGUSR1 and SIGUSR2 are in the set too: their default action would end
/// the daemon without unmounting, leaving a dead mount.
pub fn block_signals() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(sig);
    }
    if let Err(e) = set.thread_block() {
        log::warn!("cannot block the signals the daemon handles: {e}");
    }
    set
}

/// On a thread of its own, waits for the signals [`block_signals`] blocked:
/// SIGTERM and SIGINT run `unmount`; SIGHUP reopens the `--log-file` (so
/// logrotate can move it away); SIGUSR1 and SIGUSR2 are logged and ignored.
pub fn on_signal(set: SigSet, mut unmount: impl FnMut() + Send + 'static) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let Ok(sig) = set.wait() else {
                continue;
            };
            match sig {
                Signal::SIGHUP => match reopen_log() {
                    Some(Ok(path)) => info!("SIGHUP: reopened the log file {}", path.display()),
                    Some(Err(e)) => log::error!("SIGHUP: {e}; still logging to the old file"),
                    None => info!("SIGHUP: no log file to reopen (logging to syslog)"),
                },
                Signal::SIGUSR1 | Signal::SIGUSR2 => info!("signal {sig} received: ignored"),
                _ => {
                    info!("signal {sig} received: unmounting");
                    unmount();
                }
            }
        });
}

/// The detached daemon's `--log-file`, reopened by SIGHUP.
struct LogFile {
    path: PathBuf,
    file: std::sync::Mutex<File>,
}

static LOG_FILE: std::sync::OnceLock<std::sync::Arc<LogFile>> = std::sync::OnceLock::new();

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Opens `path` for appending, as the log sink a SIGHUP reopens (at the
/// same path, so after logrotate moved it away, a new file).
pub fn open_log_file(path: &Path) -> std::io::Result<LogWriter> {
    // Absolute, as the daemon changes to / once it runs.
    let path = &std::path::absolute(path)?;
    let file = open_append(path)?;
    let log = LOG_FILE.get_or_init(|| {
        std::sync::Arc::new(LogFile {
            path: path.clone(),
            file: std::sync::Mutex::new(file),
        })
    });
    Ok(LogWriter(log.clone()))
}

/// Reopens the log file: `None` without one, else the path or the error.
fn reopen_log() -> Option<Result<PathBuf>> {
    let log = LOG_FILE.get()?;
    Some(match open_append(&log.path) {
        Ok(f) => {
            let mut cur = log.file.lock().unwrap_or_else(|p| p.into_inner());
            *cur = f;
            Ok(log.path.clone())
        }
        Err(e) => Err(Error::io("cannot reopen the log file", e).with_path(&log.path)),
    })
}

/// Writes log lines to the current log file.
pub struct LogWriter(std::sync::Arc<LogFile>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut f = self.0.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A log sink that sends each line to syslog (daemon facility), for a
/// detached daemon started without `--log-file`.
pub struct Syslog {
    pending: Vec<u8>,
}

impl Syslog {
    /// Opens the connection to syslog under the name `vdiskfs`.
    pub fn new() -> Syslog {
        // The ident is static, as openlog requires (it keeps the pointer).
        let _ = nix::syslog::openlog(
            Some(c"vdiskfs"),
            nix::syslog::LogFlags::LOG_PID,
            nix::syslog::Facility::LOG_DAEMON,
        );
        Syslog {
            pending: Vec::new(),
        }
    }

    /// Sends one line at informational priority.
    pub fn line(&self, text: &str) {
        self.send(Severity::LOG_INFO, text);
    }

    /// Sends one line at syslog priority `level`.
    fn send(&self, level: Severity, text: &str) {
        let _ = nix::syslog::syslog(level, text.replace('\0', "").as_str());
    }
}

/// The detached daemon's logger without `--log-file`: each record goes to
/// syslog at the priority of its own level (never guessed from the text,
/// which may name an image called `ERROR.qcow2`), without a timestamp
/// (syslog adds its own), filtered as `--log-level`/`RUST_LOG` say.
pub struct SyslogLogger {
    filter: env_logger::Logger,
    syslog: Syslog,
}

impl SyslogLogger {
    /// Installs the logger; `filter` supplies the level filtering.
    pub fn install(filter: env_logger::Logger) {
        let max = filter.filter();
        let logger = SyslogLogger {
            filter,
            syslog: Syslog::new(),
        };
        if log::set_boxed_logger(Box::new(logger)).is_ok() {
            log::set_max_level(max);
        }
    }
}

impl log::Log for SyslogLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        log::Log::enabled(&self.filter, metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.filter.matches(record) {
            return;
        }
        let priority = match record.level() {
            log::Level::Error => Severity::LOG_ERR,
            log::Level::Warn => Severity::LOG_WARNING,
            log::Level::Info => Severity::LOG_INFO,
            log::Level::Debug | log::Level::Trace => Severity::LOG_DEBUG,
        };
        self.syslog.send(
            priority,
            &format!("{} {}: {}", record.level(), record.target(), record.args()),
        );
    }

    fn flush(&self) {}
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

/// Unmounts a vdiskfs mount and waits up to `timeout` for its daemon to
/// flush and exit; an error if it did not.
pub fn unmount(mountpoint: &Path, lazy: bool, timeout: Duration) -> Result<()> {
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
    if mp.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(Error::invalid("mount point contains a NUL byte"));
    }
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    // A loop device detached just before (`losetup -d`) lets go of its
    // backing file asynchronously: give a busy mount a few seconds.
    let busy_until = Instant::now() + Duration::from_secs(5);
    let done = loop {
        let done = nix::mount::umount2(mp.as_path(), flags);
        if done != Err(Errno::EBUSY) || Instant::now() >= busy_until {
            break done;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Err(err) = done {
        if err == Errno::EPERM {
            let status = Command::new("fusermount3")
                .arg("-u")
                .args(lazy.then_some("-z"))
                .arg(&mp)
                .status()
                .map_err(|e| Error::io("cannot run fusermount3", e))?;
            if !status.success() {
                return Err(Error::new(ErrorKind::Io, "fusermount3 -u failed").with_path(&mp));
            }
        } else if err == Errno::EBUSY {
            return Err(Error::new(
                ErrorKind::Locked,
                "mount is busy (a file is open or a loop device uses it; --lazy detaches anyway)",
            )
            .with_path(&mp));
        } else {
            return Err(Error::io("unmount failed", err.into()).with_path(&mp));
        }
    }
    match pid {
        Some(pid) => wait_for_daemon(pid, &mp, timeout),
        None => Ok(()),
    }
}

/// Waits until the daemon `pid` has flushed and exited after its mount is
/// gone, telling the user what it waits for once it takes a while. The
/// daemon removes its state file only after it has flushed and closed its
/// images, so a daemon gone with its state file left behind did not finish.
fn wait_for_daemon(pid: u32, mp: &Path, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let mut next_report = start + Duration::from_secs(1);
    while process_alive(pid) {
        let now = Instant::now();
        if now >= start + timeout {
            let why = if process_stopped(pid) {
                " (it is stopped: send it SIGCONT)"
            } else {
                ""
            };
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "unmounted, but daemon {pid} has not finished flushing its images after {} s{why}; \
                     its writes may be incomplete until it exits",
                    timeout.as_secs()
                ),
            )
            .with_path(mp));
        }
        if now >= next_report {
            let state = if process_stopped(pid) {
                ", which is stopped,"
            } else {
                ""
            };
            let _ = writeln!(
                std::io::stderr(),
                "vdiskfs: {}: waiting for daemon {pid}{state} to flush its images and exit ({} s of {} s)",
                mp.display(),
                (now - start).as_secs(),
                timeout.as_secs()
            );
            next_report = now + Duration::from_secs(5);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let state = state_dir().join(format!("{pid}.json"));
    if state.exists() {
        let _ = std::fs::remove_file(&state);
        return Err(Error::new(
            ErrorKind::Io,
            format!("daemon {pid} ended without finishing (killed?); its writes may be incomplete"),
        )
        .with_path(mp));
    }
    Ok(())
}

/// True when `pid` is stopped (SIGSTOP, a debugger).
fn process_stopped(pid: u32) -> bool {
    task_state(Path::new(&format!("/proc/{pid}/stat"))).is_some_and(|c| matches!(c, 'T' | 't'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state letter of `pid`'s main thread.
    fn main_thread_state(pid: u32) -> char {
        task_state(Path::new(&format!("/proc/{pid}/stat"))).unwrap()
    }

    #[test]
    fn a_process_is_alive_until_its_last_thread_exits() {
        // The main thread exits at 0.2 s; another thread runs for 3 s.
        let script = "import threading, time, ctypes\n\
                      threading.Thread(target=time.sleep, args=(3,)).start()\n\
                      time.sleep(0.2)\n\
                      ctypes.CDLL(None).pthread_exit(None)";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .spawn()
            .expect("python3 is missing: install it (apt-get install python3)");
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while main_thread_state(pid) != 'Z' {
            assert!(Instant::now() < deadline, "the main thread did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            process_alive(pid),
            "a process with a running thread is alive"
        );
        // All threads gone, not yet reaped: gone for us.
        while process_alive(pid) {
            assert!(Instant::now() < deadline, "the process did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(main_thread_state(pid), 'Z', "reaped too early");
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"plain"), "plain");
        assert_eq!(unescape(r"tail\04"), r"tail\04");
    }
}
