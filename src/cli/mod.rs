//! The command line: `mount`, `unmount`, `info`, `list`, `map` and
//! `serve` (whose own flags live in `nbd::cmd`), as clap definitions.
//!
//! How a command line travels (ripgrep's shape): clap parses the flags
//! into the plain structs below, each value through its one parser
//! ([`parse`]); `vdiskfs mount -o` strings are parsed into the same values
//! ([`options`]); both are then validated once into the configuration the
//! rest of the program uses ([`config`]). [`run::main`] is the edge that
//! prints errors, once, on one line.
//!
//! The flags two commands share are declared once and flattened:
//! [`ChainArgs`] (how an image's chain opens: `mount`, `serve`, `info`,
//! `map`) and [`DiskArgs`] (how a disk is opened and written: `mount`,
//! `serve`). Adding a chain option is one field in [`ChainArgs`] with its
//! parser in [`parse`] (plus, for its `-o` spelling, one line in
//! [`options::parse`] and one in [`config::ChainConfig::new`]).

pub mod config;
mod mount;
pub mod mountpoint;
pub mod options;
pub mod parse;
mod report;
mod run;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::format::Format;
use crate::nbd::server::Listen;

pub use run::main;

/// Mount virtual-disk images (qcow2, qcow, VMDK, raw, and chains of them) as raw files.
#[derive(Debug, Parser)]
#[command(
    name = "vdiskfs",
    version = env!("VDISKFS_VERSION"),
    about,
    propagate_version = true
)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    // Not global: only `mount` logs anything worth a level, so only `mount`
    // (and the top level, `vdiskfs -v mount`) offers these.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors in the log.
    #[arg(short, long)]
    pub quiet: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount images: each IMAGE appears in MOUNTPOINT as NAME.raw (its file name, extension dropped).
    #[command(override_usage = "vdiskfs mount [OPTIONS] IMAGE... MOUNTPOINT")]
    Mount(MountArgs),
    /// Flush and unmount a vdiskfs mount; its daemon exits.
    #[command(alias = "umount")]
    Unmount(UnmountArgs),
    /// Show an image's format, size, features and backing chain.
    Info(InfoArgs),
    /// List active vdiskfs mounts.
    List(ListArgs),
    /// Show where each run of the disk lives in the chain (as `qemu-img map`).
    Map(MapArgs),
    /// Serve images over NBD: each IMAGE is an export named after its file stem.
    Serve(crate::nbd::cmd::ServeArgs),
    /// Write the man pages or a shell's completions (for packagers and
    /// mount-helper/install.sh).
    #[command(hide = true)]
    Generate(crate::generate::GenerateArgs),
}

/// How an image's chain opens: shared by `mount`, `serve`, `info` and `map`.
#[derive(Debug, Args, Clone, Default)]
pub struct ChainArgs {
    /// Format of the top image(s) (raw, qcow2, qcow, vmdk, vpc, vdi, parallels); detected from content if absent.
    #[arg(long, value_parser = parse::parse_format)]
    pub format: Option<Format>,
    /// Treat the image as hostile: confine backing and extent files to its directory, never probe their formats.
    #[arg(long)]
    pub untrusted: bool,
    /// Allow backing/extent files that are devices, FIFOs or under /proc, /sys, /dev.
    #[arg(long)]
    pub allow_devices: bool,
    /// Accept a VMDK parent whose CID differs from the child's parentCID (or a
    /// VHD parent whose unique id differs from the child's parent UUID).
    #[arg(long)]
    pub ignore_cid: bool,
    /// Refuse backing chains longer than this [default: 64].
    #[arg(long, value_name = "N", value_parser = parse::parse_count)]
    pub max_depth: Option<usize>,
    /// Expose this internal qcow2 snapshot, read-only, instead of the
    /// image's current state (qemu-nbd's -l): an ID or name (IDs are tried
    /// first), or snapshot.id=ID[,snapshot.name=NAME].
    #[arg(short = 'l', long, value_name = "SNAPSHOT", value_parser = parse::parse_snapshot)]
    pub load_snapshot: Option<crate::format::qcow2::snapshot::SnapshotSel>,
    /// Remote images.
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Remote images (s3://, http(s)://), part of [`ChainArgs`].
#[derive(Debug, Args, Clone, Default)]
pub struct RemoteArgs {
    /// Chunk size of remote (s3://, http(s)://) images: the unit of ranged GETs and of their cache (64K to 64M) [default: 4M].
    #[arg(long, value_name = "SIZE", value_parser = parse::parse_remote_chunk)]
    pub remote_chunk: Option<u64>,
    /// Largest read-ahead window of a sequential reader of a remote image (0: no prefetch) [default: 64M].
    #[arg(long, value_name = "SIZE", value_parser = parse::parse_size)]
    pub remote_readahead: Option<u64>,
    /// Also keep remote images' chunks in DIR, shared by mounts of the same object (by ETag).
    #[arg(long, value_name = "DIR", value_parser = parse::parse_path)]
    pub remote_cache: Option<PathBuf>,
    /// Bound of the --remote-cache directory (least recently used chunks are deleted) [default: 1G].
    #[arg(long, value_name = "SIZE", value_parser = parse::parse_size)]
    pub remote_cache_size: Option<u64>,
    /// Region of s3:// images (overrides AWS_REGION and the profile's).
    #[arg(long, value_name = "REGION", value_parser = parse::parse_name)]
    pub aws_region: Option<String>,
    /// Endpoint of an S3-compatible store for s3:// images (overrides AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL", value_parser = parse::parse_name)]
    pub aws_endpoint: Option<String>,
    /// Allow a plain-http S3 endpoint (as AWS_ALLOW_HTTP=true).
    #[arg(long)]
    pub aws_allow_http: bool,
    /// Profile of ~/.aws/credentials and ~/.aws/config for s3:// images (overrides AWS_PROFILE).
    #[arg(long, value_name = "NAME", value_parser = parse::parse_name)]
    pub aws_profile: Option<String>,
}

/// How a disk is opened, cached and written: shared by `mount` and `serve`.
#[derive(Debug, Args, Clone, Default)]
pub struct DiskArgs {
    /// How the chain opens.
    #[command(flatten)]
    pub chain: ChainArgs,
    /// Read-only (the default; the spelling of qemu-nbd and guestmount).
    #[arg(short = 'r', long, conflicts_with_all = ["rw", "overlay", "snapshot"])]
    pub read_only: bool,
    /// Write into the top image in place (qcow2, sparse VMDK, qcow, raw).
    #[arg(long, conflicts_with_all = ["overlay", "snapshot", "load_snapshot"])]
    pub rw: bool,
    /// Send writes to a qcow2 overlay FILE backed by the image (created if missing); the image is never written.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["snapshot", "load_snapshot"], value_parser = parse::parse_path)]
    pub overlay: Option<PathBuf>,
    /// Send writes to a temporary overlay that disappears at unmount or when the server stops (and after a crash).
    #[arg(long, conflicts_with = "load_snapshot")]
    pub snapshot: bool,
    /// Open even if another process (a VM, qemu-img) holds locks that conflict with ours
    /// (writing, or reading an image someone writes: the view may go stale).
    #[arg(long)]
    pub force_lock: bool,
    /// Expose only the top layer: unallocated ranges read as zeros.
    #[arg(long)]
    pub single_link: bool,
    /// Cache size for metadata and decompressed blocks (e.g. 64M, 1G; at least 1M) [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = parse::parse_cache_size)]
    pub cache_size: Option<u64>,
    /// Log file of the detached daemon (default: syslog).
    #[arg(long, value_name = "FILE", value_parser = parse::parse_path)]
    pub log_file: Option<PathBuf>,
}

/// `vdiskfs mount`.
#[derive(Debug, Args, Clone)]
pub struct MountArgs {
    /// The images, then the mount point (a directory; or, with one image, a
    /// regular file that becomes the raw view itself).
    // At least two are checked after parsing: clap's own message would
    // repeat the value name.
    #[arg(value_name = "PATHS")]
    pub paths: Vec<PathBuf>,
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors in the log.
    #[arg(short, long)]
    pub quiet: bool,
    /// Stay in the foreground instead of detaching.
    #[arg(short, long)]
    pub foreground: bool,
    /// How the disks open and where writes go.
    #[command(flatten)]
    pub disk: DiskArgs,
    /// Log level of the daemon: off, error, warn, info, debug, trace; or
    /// libvirt log outputs separated by spaces, each with its own level
    /// (1 debug, 2 info, 3 warning, 4 error): LEVEL:stderr,
    /// LEVEL:syslog:IDENT, LEVEL:file:/PATH, e.g. "1:file:/var/log/vd.log 3:stderr".
    #[arg(long, value_name = "LEVEL|OUTPUTS", value_parser = parse::parse_log_level)]
    pub log_level: Option<crate::logging::LogSpec>,
    /// libvirt log filters separated by spaces: LEVEL:MODULE keeps records of
    /// matching modules at LEVEL or above (e.g. "1:format.qcow2 3:fs"; * wildcards).
    #[arg(long, value_name = "FILTERS", value_parser = parse::parse_log_filters)]
    pub log_filters: Option<crate::logging::Filters>,
    /// Write the daemon's process id to FILE once the mount is live (removed at exit).
    #[arg(long, value_name = "FILE", value_parser = parse::parse_path)]
    pub pid_file: Option<PathBuf>,
    /// Let other users reach the mount (needs user_allow_other in /etc/fuse.conf for non-root).
    #[arg(long)]
    pub allow_other: bool,
    /// Owner of the exposed files (default: the mounting user).
    #[arg(long, value_name = "USER", value_parser = parse::parse_uid)]
    pub uid: Option<u32>,
    /// Group of the exposed files (default: the mounting user's group).
    #[arg(long, value_name = "GROUP", value_parser = parse::parse_gid)]
    pub gid: Option<u32>,
    /// Permission bits of the exposed files, in octal (default 0400, 0600 when writable).
    #[arg(long, value_parser = parse::parse_file_mode)]
    pub mode: Option<u16>,
    /// Serve raw images through vdiskfs instead of the kernel's FUSE passthrough.
    #[arg(long)]
    pub no_passthrough: bool,
    /// FUSE worker threads (1 to 256) [default: 16 per CPU, 16 to 32].
    #[arg(long, value_name = "N", value_parser = parse::parse_threads)]
    pub threads: Option<usize>,
    /// How requests reach the daemon: auto, uring (FUSE over io_uring, Linux
    /// 6.14+ with the fuse module's enable_uring on; falls back to classic),
    /// or classic (/dev/fuse). Default from $VDISKFS_TRANSPORT, else auto.
    #[arg(long, value_parser = parse::parse_transport)]
    pub transport: Option<crate::fs::Transport>,
    /// Mount options, mount(8) style: every flag has a -o spelling
    /// (ro, allow_other, cache_size=64M, partitions, ...); repeatable.
    #[arg(short = 'o', long = "options", value_name = "OPTS")]
    pub options: Vec<String>,
    /// Mount even on a non-empty directory or on top of another mount (hiding what is there).
    #[arg(long)]
    pub nonempty: bool,
    /// Ignore unknown -o options instead of refusing them (mount -s).
    #[arg(long)]
    pub sloppy: bool,
    /// Also expose each MBR/GPT partition as NAME-pN.raw (a window onto the disk).
    #[arg(long)]
    pub partitions: bool,
    /// Bypass caching: no vdiskfs cache, image files opened with O_DIRECT.
    #[arg(long)]
    pub unbuffered: bool,
    /// Also serve the disks over NBD at ADDR (unix:PATH or tcp:HOST:PORT; repeatable).
    #[arg(long, value_name = "ADDR", value_parser = parse::parse_listen)]
    pub nbd: Vec<Listen>,
    /// Who may connect to --nbd: the TCP allow-list and TLS.
    #[command(flatten)]
    pub nbd_net: crate::nbd::cmd::NetArgs,
}

/// `vdiskfs unmount`.
#[derive(Debug, Args)]
pub struct UnmountArgs {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// Detach now even if busy; the daemon exits once the last user is gone.
    #[arg(short = 'l', long)]
    pub lazy: bool,
    /// Seconds to wait for the daemon to flush and exit; exit status 1 if it has not.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
}

/// `vdiskfs info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The image.
    pub image: PathBuf,
    /// Print JSON (vdiskfs's own schema, see README).
    #[arg(long, conflicts_with = "output")]
    pub json: bool,
    /// `json`: qemu-img's own JSON schema (as `qemu-img info --output=json`);
    /// `human`: the text report (the default).
    #[arg(long, value_name = "FMT", value_parser = ["human", "json"])]
    pub output: Option<String>,
    /// With --output=json: a list with every layer of the chain, top first
    /// (as `qemu-img info --backing-chain`).
    #[arg(long)]
    pub backing_chain: bool,
    /// Text report: add each layer's raw header fields and every snapshot row.
    #[arg(short, long)]
    pub verbose: bool,
    /// How the chain opens.
    #[command(flatten)]
    pub chain: ChainArgs,
}

/// `vdiskfs map`.
#[derive(Debug, Args)]
pub struct MapArgs {
    /// The image.
    pub image: PathBuf,
    /// `human`: the runs holding data and their files (the default);
    /// `json`: every run, in `qemu-img map --output=json`'s shape.
    #[arg(long, value_name = "FMT", value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
    /// How the chain opens.
    #[command(flatten)]
    pub chain: ChainArgs,
}

/// `vdiskfs list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The exposed name of an image: its file name without its last extension, plus `.raw`.
pub fn exposed_name(image: &Path) -> Result<OsString> {
    let stem = image
        .file_stem()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Error::invalid("has no file name").with_path(image))?;
    let mut name = stem.to_os_string();
    name.push(".raw");
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    fn cli(argv: &[&str]) -> std::result::Result<Cli, String> {
        let mut full = vec!["vdiskfs"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).map_err(|e| e.to_string())
    }

    #[test]
    fn the_shared_options_mean_the_same_in_every_command() {
        let chain = |c: Cli| match c.command {
            Command::Mount(m) => m.disk.chain,
            Command::Serve(s) => s.disk.chain,
            Command::Info(i) => i.chain,
            Command::Map(m) => m.chain,
            other => panic!("{other:?}"),
        };
        let opts = [
            "--format=qcow2",
            "--untrusted",
            "--allow-devices",
            "--ignore-cid",
            "--max-depth=3",
            "--remote-chunk=1M",
            "--aws-region=r",
        ];
        for (cmd, paths) in [
            ("mount", &["i", "m"][..]),
            ("serve", &["i"]),
            ("info", &["i"]),
            ("map", &["i"]),
        ] {
            let mut argv = vec![cmd];
            argv.extend_from_slice(&opts);
            argv.extend_from_slice(paths);
            let c = chain(cli(&argv).unwrap());
            assert_eq!(c.format, Some(Format::Qcow2), "{cmd}");
            assert!(c.untrusted && c.allow_devices && c.ignore_cid, "{cmd}");
            assert_eq!(c.max_depth, Some(3), "{cmd}");
            assert_eq!(c.remote.remote_chunk, Some(1 << 20), "{cmd}");
            assert_eq!(c.remote.aws_region.as_deref(), Some("r"), "{cmd}");
            // The same parser, so the same limit and message everywhere.
            let mut argv = vec![cmd, "--max-depth=x", "--remote-chunk=1K"];
            argv.extend_from_slice(paths);
            let e = cli(&argv).unwrap_err();
            assert!(
                e.contains("--max-depth") && e.contains("not a number"),
                "{cmd}: {e}"
            );
        }
        for cmd in ["mount", "serve"] {
            let e = cli(&[cmd, "--cache-size=0", "i", "m"]).unwrap_err();
            assert!(
                e.contains("--cache-size") && e.contains("at least 1M"),
                "{e}"
            );
            assert!(cli(&[cmd, "-r", "--rw", "i", "m"]).is_err(), "{cmd}");
        }
    }

    #[test]
    fn exposed_names_drop_the_last_extension() {
        assert_eq!(
            exposed_name(Path::new("/a/disk.qcow2")).unwrap(),
            "disk.raw"
        );
        assert_eq!(
            exposed_name(Path::new("win10-000001.vmdk")).unwrap(),
            "win10-000001.raw"
        );
        assert_eq!(exposed_name(Path::new("a.b.c")).unwrap(), "a.b.raw");
        assert_eq!(exposed_name(Path::new("noext")).unwrap(), "noext.raw");
    }
}
