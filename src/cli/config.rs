//! The validated configuration: the flags (clap's [`MountArgs`],
//! [`DiskArgs`], [`ChainArgs`]) and the `-o` options ([`MountOptions`])
//! are checked against each other and turned, once, into the settings the
//! rest of the program uses ([`MountConfig`], [`DiskConfig`],
//! [`ChainConfig`]). Every value was already parsed by one parser per
//! value ([`super::parse`]); what is checked here is what involves more
//! than one option: a flag and its `-o` spelling must agree, write modes
//! exclude each other, `--unbuffered` and `--partitions` refuse what they
//! cannot do. Defaults are applied here, after both spellings are known.
//! Nothing here does I/O: the image and mount point paths are resolved
//! later ([`super::mountpoint`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::options::{self, MountOptions, Raw};
use super::parse;
use super::{ChainArgs, DiskArgs, MountArgs, RemoteArgs};
use crate::chain::{ChainOptions, DEFAULT_MAX_DEPTH};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::fs::Transport;
use crate::lock::ReadLock;
use crate::nbd::cmd::NetArgs;
use crate::nbd::server::Listen;
use crate::overlay::WriteMode;
use crate::policy::OpenPolicy;

/// How an image's chain opens (`info`, `map`, `mount`, `serve`).
#[derive(Debug, Clone)]
pub struct ChainConfig {
    /// Format of the top image, detected when `None`.
    pub format: Option<Format>,
    /// Confine named files, never probe their formats.
    pub untrusted: bool,
    /// Allow devices, FIFOs and /proc, /sys, /dev paths as named files.
    pub allow_devices: bool,
    /// Accept a parent whose CID or unique id differs from the child's record.
    pub ignore_cid: bool,
    /// Longest chain accepted.
    pub max_depth: usize,
    /// The internal qcow2 snapshot to expose instead of the current state.
    pub load_snapshot: Option<crate::format::qcow2::snapshot::SnapshotSel>,
    /// Remote images' settings.
    pub remote: RemoteConfig,
}

/// Remote images' settings (`docs/remote.md`).
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Chunk size: the unit of ranged GETs and of their cache.
    pub chunk: u64,
    /// Largest read-ahead window (0: no prefetch).
    pub readahead: u64,
    /// The on-disk chunk cache and its bound.
    pub cache: Option<(PathBuf, u64)>,
    /// S3 region, endpoint, profile.
    pub s3: crate::remote::S3Settings,
}

/// How `mount` and `serve` open and serve their disks.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// How each chain opens.
    pub chain: ChainConfig,
    /// Where writes go.
    pub mode: WriteMode,
    /// Open even if another process holds conflicting locks.
    pub force_lock: bool,
    /// Expose only the top layer.
    pub single_link: bool,
    /// Bytes of metadata and decoded-block cache (0 with `--unbuffered`).
    pub cache_size: u64,
    /// Image files opened with O_DIRECT, no cache.
    pub unbuffered: bool,
    /// Log file of the detached daemon.
    pub log_file: Option<PathBuf>,
}

/// `vdiskfs mount`, validated.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// The images, then the mount point, as given (at least two).
    pub paths: Vec<PathBuf>,
    /// How the disks open.
    pub disk: DiskConfig,
    /// Log level or libvirt outputs of the daemon, if given.
    pub log_level: Option<crate::logging::LogSpec>,
    /// libvirt log filters, if given.
    pub log_filters: Option<crate::logging::Filters>,
    /// File to write the daemon's pid into.
    pub pid_file: Option<PathBuf>,
    /// Let other users reach the mount.
    pub allow_other: bool,
    /// Owner of the exposed files (default: the mounting user).
    pub uid: Option<u32>,
    /// Group of the exposed files (default: the mounting user's group).
    pub gid: Option<u32>,
    /// Permission bits of the exposed files (default by write mode).
    pub file_mode: Option<u16>,
    /// No FUSE passthrough for raw images.
    pub no_passthrough: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// How requests reach the daemon.
    pub transport: Transport,
    /// Mount over a non-empty directory or another mount.
    pub nonempty: bool,
    /// Also expose each partition.
    pub partitions: bool,
    /// Also serve the disks over NBD here.
    pub nbd: Vec<Listen>,
    /// Who may connect to `nbd`.
    pub nbd_net: NetArgs,
    /// `-v` given after `mount` (more log output).
    pub verbose: u8,
    /// `-q` given after `mount` (only errors in the log).
    pub quiet: bool,
    /// Stay in the foreground (also set in the detached daemon).
    pub foreground: bool,
    /// The detached daemon's readiness pipe.
    pub notify_fd: Option<i32>,
}

/// The error for a flag and its `-o` spelling that disagree.
fn clash(raw: &str, flag: &str) -> Error {
    Error::invalid(format!(
        "-o {raw} conflicts with {flag} given on the command line"
    ))
}

/// The value given by the flag or by its `-o` spelling; both must agree.
fn pick<T: PartialEq>(flag: Option<T>, opt: Option<(T, Raw)>, name: &str) -> Result<Option<T>> {
    match (flag, opt) {
        (Some(f), Some((v, raw))) if f != v => Err(clash(&raw, name)),
        (Some(f), _) => Ok(Some(f)),
        (None, o) => Ok(o.map(|(v, _)| v)),
    }
}

/// A switch given as a flag or as an option.
fn switch(flag: bool, opt: &Option<Raw>) -> bool {
    flag || opt.is_some()
}

impl ChainConfig {
    /// The chain settings of `args`, with `o`'s spellings (empty for the
    /// commands without `-o`).
    pub fn new(args: &ChainArgs, o: &mut MountOptions) -> Result<Self> {
        Ok(ChainConfig {
            format: pick(args.format, o.format.take(), "--format")?,
            untrusted: switch(args.untrusted, &o.untrusted),
            allow_devices: switch(args.allow_devices, &o.allow_devices),
            ignore_cid: switch(args.ignore_cid, &o.ignore_cid),
            max_depth: pick(args.max_depth, o.max_depth.take(), "--max-depth")?
                .unwrap_or(DEFAULT_MAX_DEPTH),
            load_snapshot: pick(
                args.load_snapshot.clone(),
                o.load_snapshot.take(),
                "--load-snapshot",
            )?,
            remote: RemoteConfig::new(&args.remote, o)?,
        })
    }

    /// The chain options for opening images read-only through a cache
    /// (`info`, `map`).
    pub fn options(&self) -> ChainOptions {
        self.open_options(false, false, ReadLock::Share)
    }

    /// The chain options with the disk-side settings.
    pub fn open_options(&self, single_link: bool, direct: bool, lock: ReadLock) -> ChainOptions {
        ChainOptions {
            format: self.format,
            policy: OpenPolicy {
                untrusted: self.untrusted,
                root: None,
                allow_devices: self.allow_devices,
                direct,
                read_lock: lock,
            },
            max_depth: self.max_depth,
            single_link,
            ignore_cid: self.ignore_cid,
            writable: false,
            load_snapshot: self.load_snapshot.clone(),
        }
    }
}

impl RemoteConfig {
    fn new(a: &RemoteArgs, o: &mut MountOptions) -> Result<Self> {
        let cache_size = pick(
            a.remote_cache_size,
            o.remote_cache_size.take(),
            "--remote-cache-size",
        )?;
        Ok(RemoteConfig {
            chunk: pick(a.remote_chunk, o.remote_chunk.take(), "--remote-chunk")?
                .unwrap_or(parse::DEFAULT_REMOTE_CHUNK),
            readahead: pick(
                a.remote_readahead,
                o.remote_readahead.take(),
                "--remote-readahead",
            )?
            .unwrap_or(parse::DEFAULT_REMOTE_READAHEAD),
            cache: pick(
                a.remote_cache.clone(),
                o.remote_cache.take(),
                "--remote-cache",
            )?
            .map(|d| (d, cache_size.unwrap_or(parse::DEFAULT_REMOTE_CACHE_SIZE))),
            s3: crate::remote::S3Settings {
                region: pick(a.aws_region.clone(), o.aws_region.take(), "--aws-region")?,
                endpoint: pick(
                    a.aws_endpoint.clone(),
                    o.aws_endpoint.take(),
                    "--aws-endpoint",
                )?,
                allow_http: switch(a.aws_allow_http, &o.aws_allow_http),
                profile: pick(a.aws_profile.clone(), o.aws_profile.take(), "--aws-profile")?,
            },
        })
    }

    /// Sets up the remote layer when any of `images` is a URL, and returns
    /// what of the cache `budget` is left: remote chunks take half of it
    /// (see docs/remote.md).
    pub fn apply<'a>(
        &self,
        budget: usize,
        mut images: impl Iterator<Item = &'a Path>,
    ) -> Result<usize> {
        if !images.any(crate::remote::is_url) {
            return Ok(budget);
        }
        crate::remote::configure(crate::remote::Settings {
            chunk: self.chunk,
            cache_bytes: budget / 2,
            readahead: self.readahead,
            ..Default::default()
        });
        crate::remote::configure_s3(self.s3.clone());
        if let Some((dir, cap)) = &self.cache {
            crate::remote::set_disk_cache(dir, *cap)?;
        }
        Ok(budget - budget / 2)
    }
}

impl DiskConfig {
    /// The disk settings of `args` and `o` (empty for `serve`);
    /// `unbuffered` is mount's `--unbuffered`.
    pub fn new(args: &DiskArgs, o: &mut MountOptions, unbuffered: bool) -> Result<Self> {
        let unbuffered = switch(unbuffered, &o.unbuffered);
        let mode = write_mode(args, o)?;
        let cache_size = pick(args.cache_size, o.cache_size.take(), "--cache-size")?;
        if unbuffered {
            if cache_size.is_some() {
                return Err(Error::invalid(
                    "--unbuffered turns the cache off; drop --cache-size (cache_size=)",
                ));
            }
            if mode == WriteMode::InPlace {
                // O_DIRECT writes would need the same bounce buffering as reads.
                return Err(Error::invalid(
                    "--unbuffered is for reading: it cannot be combined with --rw (rw)",
                ));
            }
        }
        let chain = ChainConfig::new(&args.chain, o)?;
        if chain.load_snapshot.is_some() && mode.writable() {
            return Err(Error::new(
                crate::error::ErrorKind::ReadOnly,
                "--load-snapshot exposes a snapshot read-only (as qemu-nbd -l): \
                 it cannot be combined with --rw, --overlay or --snapshot",
            ));
        }
        Ok(DiskConfig {
            chain,
            mode,
            force_lock: switch(args.force_lock, &o.force_lock),
            single_link: switch(args.single_link, &o.single_link),
            cache_size: if unbuffered {
                0
            } else {
                cache_size.unwrap_or(parse::DEFAULT_CACHE)
            },
            unbuffered,
            log_file: pick(args.log_file.clone(), o.log_file.take(), "--log-file")?,
        })
    }

    /// The chain options of each disk.
    pub fn chain_options(&self) -> ChainOptions {
        let lock = if self.force_lock {
            ReadLock::Force
        } else {
            ReadLock::Share
        };
        self.chain
            .open_options(self.single_link, self.unbuffered, lock)
    }
}

/// The write mode of the flags, checked against `-o`'s.
fn write_mode(args: &DiskArgs, o: &mut MountOptions) -> Result<WriteMode> {
    // clap lets at most one of these through.
    let flag = if args.read_only {
        Some((WriteMode::ReadOnly, "--read-only"))
    } else if args.rw {
        Some((WriteMode::InPlace, "--rw"))
    } else if let Some(p) = &args.overlay {
        Some((WriteMode::Overlay(p.clone()), "--overlay"))
    } else if args.snapshot {
        Some((WriteMode::Snapshot, "--snapshot"))
    } else {
        None
    };
    if o.plain_rw.take().is_some() && flag.is_none() {
        notice(
            "\"rw\" (mount(8)'s default) does not write into the image: mounted read-only; \
             say -o inplace to write it in place, or overlay=FILE or snapshot \
             to keep it unchanged",
        );
    }
    match (flag, o.write.take()) {
        (Some((f, name)), Some((m, raw))) if f != m => Err(clash(&raw, name)),
        (Some((f, _)), _) => Ok(f),
        (None, Some((m, _))) => Ok(m),
        (None, None) => Ok(WriteMode::ReadOnly),
    }
}

/// Tells the user about an option that does something other than they may
/// expect. Goes to stderr, which is the user's terminal before detaching
/// (the logger is not set up yet while options are validated).
fn notice(msg: &str) {
    let _ = writeln!(std::io::stderr(), "vdiskfs: note: {msg}");
}

impl MountConfig {
    /// Validates `args` and its `-o` options (every `-o`, in order).
    pub fn new(args: &MountArgs) -> Result<Self> {
        if args.paths.len() < 2 {
            return Err(Error::invalid(
                "mount needs one or more images and a mount point \
                 (usage: vdiskfs mount [OPTIONS] IMAGE... MOUNTPOINT)",
            ));
        }
        let mut o = options::parse(&args.options.join(","), args.sloppy)?;
        if !o.dropped.is_empty() {
            log::debug!("mount options ignored: {}", o.dropped.join(","));
        }
        let disk = DiskConfig::new(&args.disk, &mut o, args.unbuffered)?;
        let partitions = switch(args.partitions, &o.partitions);
        if partitions && disk.mode.writable() {
            // The kernel would cache a partition file and the whole disk
            // separately, so writes through one would not show in the other.
            return Err(Error::invalid(
                "--partitions is read-only for now: it cannot be combined with \
                 --rw, --overlay or --snapshot",
            ));
        }
        let transport = match pick(args.transport, o.transport.take(), "--transport")? {
            Some(t) => t,
            None => transport_from_env()?,
        };
        let mut nbd = args.nbd.clone();
        for (l, _) in o.nbd.drain(..) {
            if !nbd.contains(&l) {
                nbd.push(l);
            }
        }
        Ok(MountConfig {
            paths: args.paths.clone(),
            log_level: pick(args.log_level.clone(), o.log_level.take(), "--log-level")?,
            log_filters: pick(
                args.log_filters.clone(),
                o.log_filters.take(),
                "--log-filters",
            )?,
            pid_file: pick(args.pid_file.clone(), o.pid_file.take(), "--pid-file")?,
            allow_other: switch(args.allow_other, &o.allow_other),
            uid: pick(args.uid, o.uid.take(), "--uid")?,
            gid: pick(args.gid, o.gid.take(), "--gid")?,
            file_mode: pick(args.mode, o.mode.take(), "--mode")?,
            no_passthrough: switch(args.no_passthrough, &o.no_passthrough),
            threads: pick(args.threads, o.threads.take(), "--threads")?
                .unwrap_or_else(parse::default_threads),
            transport,
            nonempty: switch(args.nonempty, &o.nonempty),
            partitions,
            nbd,
            nbd_net: args.nbd_net.clone(),
            verbose: args.verbose,
            quiet: args.quiet,
            foreground: args.foreground,
            notify_fd: None,
            disk,
        })
    }
}

/// `$VDISKFS_TRANSPORT`, the default of `--transport` (else `auto`).
fn transport_from_env() -> Result<Transport> {
    match std::env::var("VDISKFS_TRANSPORT") {
        Ok(v) if !v.is_empty() => parse::parse_transport(&v)
            .map_err(|e| Error::invalid(format!("VDISKFS_TRANSPORT={v:?}: {}", e.message()))),
        _ => Ok(Transport::Auto),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[derive(Debug, clap::Parser)]
    struct T {
        #[command(flatten)]
        m: MountArgs,
    }

    /// Parses a mount command line and validates it like `vdiskfs` does.
    fn config(argv: &[&str]) -> std::result::Result<MountConfig, String> {
        let mut full = vec!["t"];
        full.extend_from_slice(argv);
        full.extend_from_slice(&["img", "mp"]);
        let matches = T::command()
            .try_get_matches_from(full)
            .map_err(|e| e.to_string())?;
        let t = T::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        MountConfig::new(&t.m).map_err(|e| e.to_string())
    }

    #[test]
    fn options_and_flags_make_one_configuration() {
        let m = config(&[
            "-o",
            "allow_other,uid=7",
            "-o",
            "cache_size=1M,max_depth=3,threads=2",
        ])
        .unwrap();
        assert!(m.allow_other);
        assert_eq!(m.uid, Some(7));
        assert_eq!(m.disk.cache_size, 1 << 20);
        assert_eq!(m.disk.chain.max_depth, 3);
        assert_eq!(m.threads, 2);
        assert_eq!(m.disk.mode, WriteMode::ReadOnly);
        let m = config(&["-o", "rw"]).unwrap();
        assert_eq!(
            m.disk.mode,
            WriteMode::ReadOnly,
            "mount(8)'s plain rw must not write in place"
        );
        assert_eq!(
            config(&["-o", "inplace"]).unwrap().disk.mode,
            WriteMode::InPlace
        );
        let m = config(&["--snapshot", "-o", "rw"]).unwrap();
        assert_eq!(m.disk.mode, WriteMode::Snapshot);
        let m = config(&["-o", "overlay=/x.qcow2"]).unwrap();
        assert_eq!(m.disk.mode, WriteMode::Overlay("/x.qcow2".into()));
        assert_eq!(
            config(&["-o", "snapshot"]).unwrap().disk.mode,
            WriteMode::Snapshot
        );
        assert!(config(&["-o", "ro,partitions"]).unwrap().partitions);
        let m = config(&["-o", "unbuffered"]).unwrap();
        assert!(m.disk.unbuffered && m.disk.cache_size == 0);
        let m = config(&["-o", "remote_cache=/c,aws_region=r", "--remote-chunk", "1M"]).unwrap();
        assert_eq!(m.disk.chain.remote.cache, Some(("/c".into(), 1 << 30)));
        assert_eq!(m.disk.chain.remote.chunk, 1 << 20);
        assert_eq!(m.disk.chain.remote.s3.region.as_deref(), Some("r"));
    }

    #[test]
    fn defaults_apply_when_neither_spelling_is_given() {
        let m = config(&[]).unwrap();
        assert_eq!(m.disk.cache_size, parse::DEFAULT_CACHE);
        assert_eq!(m.disk.chain.max_depth, DEFAULT_MAX_DEPTH);
        assert_eq!(m.threads, parse::default_threads());
        assert_eq!(m.disk.chain.remote.chunk, parse::DEFAULT_REMOTE_CHUNK);
        assert_eq!(
            m.disk.chain.remote.readahead,
            parse::DEFAULT_REMOTE_READAHEAD
        );
        assert_eq!(m.disk.chain.remote.cache, None);
        assert_eq!(m.disk.mode, WriteMode::ReadOnly);
        assert!(m.uid.is_none() && m.file_mode.is_none() && m.log_level.is_none());
    }

    #[test]
    fn both_spellings_give_the_same_value_and_the_same_error() {
        let same: &[(&str, &str)] = &[
            ("--uid=root", "uid=root"),
            ("--gid=0", "gid=root"),
            ("--cache-size=1.5G", "cache_size=1536M"),
            ("--threads=7", "threads=7"),
            ("--mode=0640", "mode=640"),
            ("--log-level=debug", "log_level=debug"),
            ("--transport=uring", "transport=io_uring"),
            ("--max-depth=5", "max_depth=5"),
            ("--remote-chunk=128K", "remote_chunk=128K"),
        ];
        for (flag, opt) in same {
            let a = config(&[flag]).unwrap();
            let b = config(&["-o", opt]).unwrap();
            let key = |m: &MountConfig| {
                format!(
                    "{:?} {:?} {} {} {:?} {:?} {:?} {} {}",
                    m.uid,
                    m.gid,
                    m.disk.cache_size,
                    m.threads,
                    m.file_mode,
                    m.log_level,
                    m.transport,
                    m.disk.chain.max_depth,
                    m.disk.chain.remote.chunk
                )
            };
            assert_eq!(key(&a), key(&b), "{flag} vs {opt}");
            // Given both ways with the same value: accepted.
            assert!(config(&[flag, "-o", opt]).is_ok(), "{flag} -o {opt}");
        }
        let differ: &[(&str, &str, &str)] = &[
            ("--threads=0", "threads=0", "at least 1"),
            ("--threads=100000", "threads=100000", "at most 256"),
            ("--cache-size=0", "cache_size=0", "at least 1M"),
            (
                "--cache-size=1.5X",
                "cache_size=1.5X",
                "bad size unit in \"1.5X\"",
            ),
            (
                "--uid=no-such-user-vdiskfs",
                "uid=no-such-user-vdiskfs",
                "no such user",
            ),
            (
                "--log-level=chatty",
                "log_level=chatty",
                "unknown log level \"chatty\"",
            ),
            (
                "--remote-chunk=1K",
                "remote_chunk=1K",
                "between 64K and 64M",
            ),
            (
                "--transport=fast",
                "transport=fast",
                "auto, uring or classic",
            ),
        ];
        for (flag, opt, needle) in differ {
            let a = config(&[flag]).unwrap_err();
            let b = config(&["-o", opt]).unwrap_err();
            // clap names the flag, the -o parser the option; the reason is
            // the same text.
            let (_, value) = flag.split_once('=').unwrap();
            assert!(a.contains(needle) && a.contains(value), "{a}");
            assert!(b.contains(needle) && b.contains(opt), "{b}");
            assert!(!a.contains("invalid digit"), "{a}");
        }
    }

    #[test]
    fn an_option_given_both_ways_must_agree() {
        assert!(config(&["--single-link", "-o", "single_link"]).is_ok());
        assert!(config(&["--cache-size", "1M", "-o", "cache_size=1024K"]).is_ok());
        assert!(config(&["--rw", "-o", "rw"]).is_ok());
        let cases: &[(&[&str], &str)] = &[
            (&["--uid", "7", "-o", "uid=8"], "--uid"),
            (&["--format", "raw", "-o", "format=qcow2"], "--format"),
            (
                &["--cache-size", "1M", "-o", "cache_size=2M"],
                "--cache-size",
            ),
            (
                &["--cache-size", "256M", "-o", "cache_size=2M"],
                "--cache-size",
            ),
            (&["--threads", "4", "-o", "threads=5"], "--threads"),
            (&["--max-depth", "4", "-o", "max_depth=5"], "--max-depth"),
            (&["--mode", "0444", "-o", "mode=0400"], "--mode"),
            (
                &["--log-level", "info", "-o", "log_level=debug"],
                "--log-level",
            ),
            (
                &["--transport", "classic", "-o", "transport=uring"],
                "--transport",
            ),
            (&["--rw", "-o", "ro"], "--rw"),
            (&["--snapshot", "-o", "inplace"], "--snapshot"),
            (&["-r", "-o", "inplace"], "--read-only"),
            (&["--overlay", "/a", "-o", "overlay=/b"], "--overlay"),
            (&["--unbuffered", "-o", "cache_size=1M"], "unbuffered"),
            (&["--cache-size", "1M", "-o", "unbuffered"], "unbuffered"),
            (&["--rw", "-o", "unbuffered"], "--rw"),
            (&["--snapshot", "-o", "partitions"], "--partitions"),
            (&["-o", "ro,nonsense"], "nonsense"),
        ];
        for (argv, needle) in cases {
            let e = config(argv).unwrap_err();
            assert!(e.contains(needle), "{argv:?}: {e}");
        }
    }

    #[test]
    fn sloppy_applies_to_the_options() {
        assert!(config(&["--sloppy", "-o", "ro,whatever"]).is_ok());
        assert!(config(&["-o", "ro,whatever"]).is_err());
    }

    #[test]
    fn a_mount_needs_an_image_and_a_mount_point() {
        let matches = T::command().try_get_matches_from(["t", "img"]).unwrap();
        let t = T::from_arg_matches(&matches).unwrap();
        let e = MountConfig::new(&t.m).unwrap_err().to_string();
        assert!(e.contains("IMAGE... MOUNTPOINT"), "{e}");
    }
}
