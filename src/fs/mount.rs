//! Mounting: our own mount(2) as root (so the mount table says
//! `fuse.vdiskfs`), fusermount3 otherwise, the session handle, unmounting
//! from a signal handler, the readahead of the new mount, and the choice
//! of transport (classic /dev/fuse or io_uring, `fs/uring/`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fuser::MountOption;
use log::{debug, info};

use super::{uring, FuserFs, VdiskFs, MAX_REQUEST};

/// How requests travel between the kernel and us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// io_uring where it measured a win (`AUTO_URING`), classic otherwise.
    #[default]
    Auto,
    /// FUSE over io_uring, falling back to classic if the kernel refuses.
    Uring,
    /// read(2)/write(2) on /dev/fuse, through fuser.
    Classic,
}

/// Whether `auto` tries io_uring: only where the benchmark showed a win
/// (docs/performance.md, "Transports").
pub const AUTO_URING: bool = false;

impl Transport {
    /// The name `list` and `info` show for a running transport.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Uring => "io_uring",
            Transport::Classic => "classic",
        }
    }
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// The source column of the mount table (the images).
    pub fsname: String,
    /// Mount read-only.
    pub read_only: bool,
    /// Let other users in (`allow_other`).
    pub allow_other: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// Which transport to try.
    pub transport: Transport,
}

/// A live mount, not yet serving requests.
pub struct Session {
    inner: fuser::Session<FuserFs>,
    /// The transport that runs ([`Transport::Uring`] or [`Transport::Classic`]).
    pub transport: Transport,
    /// Set when we mounted with mount(2) ourselves (and so unmount ourselves).
    own_mount: Option<std::path::PathBuf>,
}

/// Unmounts a [`Session`] from another thread (signal handling).
pub enum Unmounter {
    /// fuser mounted it (through fusermount3).
    Fuser(fuser::SessionUnmounter),
    /// We mounted it with mount(2).
    Own(std::path::PathBuf),
}

impl Unmounter {
    /// Unmounts; the session's [`Session::run`] then returns once no file
    /// of the mount is in use any more.
    pub fn unmount(&mut self) -> std::io::Result<()> {
        match self {
            Unmounter::Fuser(u) => u.unmount(),
            Unmounter::Own(path) => umount_detach(path),
        }
    }
}

fn umount_detach(path: &std::path::Path) -> std::io::Result<()> {
    use nix::errno::Errno;
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        // Already unmounted (by umount(8) or `vdiskfs unmount`): nothing to do.
        Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Session {
    /// A handle to unmount from elsewhere.
    pub fn unmounter(&mut self) -> Unmounter {
        match &self.own_mount {
            Some(p) => Unmounter::Own(p.clone()),
            None => Unmounter::Fuser(self.inner.unmount_callable()),
        }
    }

    /// Serves requests until unmounted.
    pub fn run(self) -> std::io::Result<()> {
        let own = self.own_mount;
        let r = self.inner.run();
        if let Some(p) = own {
            let _ = umount_detach(&p);
        }
        r
    }
}

/// Mounts `fs` on `mountpoint`; the mount is live (the FUSE handshake done)
/// when this returns.
///
/// As root we call mount(2) ourselves so the mount table shows the type as
/// `fuse.vdiskfs` (fuser's own mount(2) path always says `fuse`); other
/// users go through fusermount3, which sets the subtype itself.
pub fn mount(
    fs: Arc<VdiskFs>,
    mountpoint: &std::path::Path,
    cfg: &MountConfig,
) -> std::io::Result<Session> {
    use MountOption as O;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        O::FSName(cfg.fsname.clone()),
        O::Subtype("vdiskfs".into()),
        O::NoDev,
        O::NoSuid,
        O::DefaultPermissions,
        if cfg.read_only { O::RO } else { O::RW },
    ];
    config.acl = if cfg.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = true;
    let root = nix::unistd::geteuid().is_root();
    let prepared = prepare_uring(cfg.transport, root);
    if prepared.is_some() {
        fs.uring_wanted.store(true, Ordering::Relaxed);
        // On the ring, fuser's loop only sees interrupts and forgets.
        config.n_threads = Some(1);
    }
    if !root {
        return fuser::Session::new(FuserFs(fs.clone()), mountpoint, &config).map(|inner| {
            let _ = fs.notifier.set(inner.notifier());
            Session {
                inner,
                transport: Transport::Classic,
                own_mount: None,
            }
        });
    }
    let fd = mount_sys(mountpoint, cfg)?;
    // The ring's commands go to the same /dev/fuse file fuser reads.
    let ring_fd = match prepared {
        Some(_) => Some(fd.try_clone()?),
        None => None,
    };
    match fuser::Session::from_fd(FuserFs(fs.clone()), fd, config.acl, config) {
        Ok(inner) => {
            let _ = fs.notifier.set(inner.notifier());
            raise_readahead(mountpoint);
            let transport = match (prepared, ring_fd) {
                (Some(p), Some(dev)) => start_uring(p, dev, &fs, cfg.threads),
                _ => Transport::Classic,
            };
            Ok(Session {
                inner,
                transport,
                own_mount: Some(mountpoint.to_path_buf()),
            })
        }
        Err(e) => {
            let _ = umount_detach(mountpoint);
            Err(e)
        }
    }
}

/// The rings for the io_uring transport, created before INIT (so that
/// `FUSE_OVER_IO_URING` is only asked for when they exist: once agreed, the
/// kernel holds every request until the rings register), or None with one
/// log line saying why when the transport is classic.
fn prepare_uring(transport: Transport, root: bool) -> Option<uring::Prepared> {
    match transport {
        Transport::Classic => return None,
        Transport::Auto if !AUTO_URING => return None,
        _ => {}
    }
    if !root {
        info!("FUSE over io_uring is used by root mounts only; serving over /dev/fuse");
        return None;
    }
    if !uring::enabled_in_kernel() {
        info!(
            "FUSE over io_uring is off in the kernel (/sys/module/fuse/parameters/enable_uring); \
             serving over /dev/fuse"
        );
        return None;
    }
    match uring::prepare() {
        Ok(p) => Some(p),
        Err(e) => {
            info!("cannot create io_urings ({e}); serving over /dev/fuse");
            None
        }
    }
}

/// Registers the rings once INIT is done; the transport that runs.
fn start_uring(
    prepared: uring::Prepared,
    dev: std::os::fd::OwnedFd,
    fs: &Arc<VdiskFs>,
    pool: usize,
) -> Transport {
    if !fs.uring_agreed.load(Ordering::Relaxed) {
        info!("the kernel did not offer FUSE over io_uring at INIT; serving over /dev/fuse");
        return Transport::Classic;
    }
    match uring::start(prepared, dev, fs.clone(), pool) {
        Ok(ring) => {
            *fs.ring.lock() = Some(ring);
            Transport::Uring
        }
        Err(errno) => {
            // A refused registration turns io_uring off for the connection:
            // the kernel serves it over /dev/fuse from then on.
            info!(
                "the kernel refused the io_uring registration ({}); serving over /dev/fuse",
                std::io::Error::from_raw_os_error(errno)
            );
            Transport::Classic
        }
    }
}

/// Readahead the kernel uses on our mount, in KiB: four full-size requests.
const READAHEAD_KB: u32 = 4 * MAX_REQUEST / 1024;

/// Raises the mount's readahead window from the kernel's 128 KiB to four
/// full requests, so sequential readers send 1 MiB requests (which
/// [`crate::chain::Chain::read_at`] can decode in parallel) and several are in flight
/// at once, served by different workers: decoding a compressed stream
/// overlaps with the reader consuming the previous window (measured on the
/// benchmark's compressed qcow2: 1 MiB → 4 MiB raised buffered sequential
/// reads by about a fifth). Best effort: needs root.
fn raise_readahead(mountpoint: &std::path::Path) {
    // Never stat the mount point here: the session does not serve requests
    // yet, so that would wait forever. The mount table has the device.
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let target = mountpoint.to_string_lossy().replace(' ', "\\040");
    let Some(dev) = table.lines().rev().find_map(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        (f.len() > 4 && f[4] == target).then(|| f[2].to_string())
    }) else {
        return;
    };
    let bdi = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&bdi, READAHEAD_KB.to_string()) {
        debug!("cannot raise readahead through {bdi}: {e}");
    }
}

/// Opens /dev/fuse and mounts it on `mountpoint` as `fuse.vdiskfs`.
fn mount_sys(
    mountpoint: &std::path::Path,
    cfg: &MountConfig,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot open /dev/fuse ({e}): is the fuse module loaded (modprobe fuse)?"),
            )
        })?;
    let rootmode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    let mut opts = format!(
        "fd={},rootmode={:o},user_id={uid},group_id={gid},default_permissions",
        dev.as_raw_fd(),
        rootmode
    );
    if cfg.allow_other {
        opts.push_str(",allow_other");
    }
    use nix::mount::MsFlags;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if cfg.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(
        Some(cfg.fsname.as_str()),
        mountpoint,
        Some("fuse.vdiskfs"),
        flags,
        Some(opts.as_str()),
    )?;
    Ok(OwnedFd::from(dev))
}
