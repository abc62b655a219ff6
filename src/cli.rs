//! The command line: `mount`, `unmount`, `info`, `list`, and `serve`
//! (whose flags and logic live in `nbd::cmd`).
//!
//! Flags are parsed by clap into plain structs, then turned into validated
//! settings (image names, the mount point's kind, chain options) before
//! anything is opened. Errors travel up as [`Error`] and are printed once,
//! on one line, by [`main`].

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use log::{info, LevelFilter};

use crate::cache::Caches;
use crate::chain::{Chain, ChainOptions, DEFAULT_MAX_DEPTH};
use crate::daemon::{self, MountState, Notifier, StateFile};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::fs::{Access, Disk, VdiskFs};
use crate::info;
use crate::overlay::{self, WriteMode};
use crate::policy::OpenPolicy;

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
    /// Mount images: each IMAGE appears in MOUNTPOINT as <name>.raw.
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
    /// Format of the top image(s) (raw, qcow2, qcow, vmdk, vpc, vdi, parallels); detected from content if absent.
    #[arg(long, value_parser = parse_format)]
    pub format: Option<Format>,
    /// Cache size for metadata and decompressed blocks (e.g. 64M, 1G).
    #[arg(long, default_value = "256M", value_parser = crate::options::parse_cache_size)]
    pub cache_size: u64,
    /// Log level of the daemon: error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", value_parser = crate::options::parse_log_level)]
    pub log_level: Option<LevelFilter>,
    /// Log file of the detached daemon (default: syslog).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Write the daemon's process id to FILE once the mount is live (removed at exit).
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Read-only (the default; the spelling of qemu-nbd and guestmount).
    #[arg(short = 'r', long, conflicts_with_all = ["rw", "overlay", "snapshot"])]
    pub read_only: bool,
    /// Write into the top image in place (qcow2, sparse VMDK, qcow, raw).
    #[arg(long, conflicts_with_all = ["overlay", "snapshot"])]
    pub rw: bool,
    /// Send writes to a qcow2 overlay FILE backed by the image (created if missing); the image is never written.
    #[arg(long, value_name = "FILE", conflicts_with = "snapshot")]
    pub overlay: Option<PathBuf>,
    /// Send writes to a temporary overlay that disappears at unmount (and after a crash).
    #[arg(long)]
    pub snapshot: bool,
    /// Mount even if another process (a VM, qemu-img) holds locks that conflict with ours
    /// (writing, or reading an image someone writes: the view may go stale).
    #[arg(long)]
    pub force_lock: bool,
    /// Let other users reach the mount (needs user_allow_other in /etc/fuse.conf for non-root).
    #[arg(long)]
    pub allow_other: bool,
    /// Owner of the exposed files (default: the mounting user).
    #[arg(long, value_name = "USER", value_parser = crate::options::parse_uid)]
    pub uid: Option<u32>,
    /// Group of the exposed files (default: the mounting user's group).
    #[arg(long, value_name = "GROUP", value_parser = crate::options::parse_gid)]
    pub gid: Option<u32>,
    /// Permission bits of the exposed files, in octal (default 0400, 0600 when writable).
    #[arg(long, value_parser = crate::options::parse_mode)]
    pub mode: Option<u16>,
    /// Expose only the top layer: unallocated ranges read as zeros.
    #[arg(long)]
    pub single_link: bool,
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
    /// Refuse backing chains longer than this.
    #[arg(long, default_value_t = DEFAULT_MAX_DEPTH)]
    pub max_depth: usize,
    /// Serve raw images through vdiskfs instead of the kernel's FUSE passthrough.
    #[arg(long)]
    pub no_passthrough: bool,
    /// FUSE worker threads (1 to 256).
    #[arg(long, default_value_t = default_threads(), value_parser = crate::options::parse_threads)]
    pub threads: usize,
    /// How requests reach the daemon: auto, uring (FUSE over io_uring, Linux
    /// 6.14+ with the fuse module's enable_uring on; falls back to classic),
    /// or classic (/dev/fuse). Default from $VDISKFS_TRANSPORT, else auto.
    #[arg(long, env = "VDISKFS_TRANSPORT", default_value = "auto", value_parser = crate::options::parse_transport)]
    pub transport: crate::fs::Transport,
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
    /// Also expose each MBR/GPT partition as <name>-pN.raw (a window onto the disk).
    #[arg(long)]
    pub partitions: bool,
    /// Bypass caching: no vdiskfs cache, image files opened with O_DIRECT.
    #[arg(long)]
    pub unbuffered: bool,
    /// Chunk size of remote (s3://, http(s)://) images: the unit of ranged GETs and of their cache.
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub remote_chunk: u64,
    /// Largest read-ahead window of a sequential reader of a remote image (0: no prefetch).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub remote_readahead: u64,
    /// Also keep remote images' chunks in DIR, shared by mounts of the same object (by ETag).
    #[arg(long, value_name = "DIR")]
    pub remote_cache: Option<PathBuf>,
    /// Bound of the --remote-cache directory (least recently used chunks are deleted).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub remote_cache_size: u64,
    /// Region of s3:// images (overrides AWS_REGION and the profile's).
    #[arg(long, value_name = "REGION")]
    pub aws_region: Option<String>,
    /// Endpoint of an S3-compatible store for s3:// images (overrides AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub aws_endpoint: Option<String>,
    /// Allow a plain-http S3 endpoint (as AWS_ALLOW_HTTP=true).
    #[arg(long)]
    pub aws_allow_http: bool,
    /// Profile of ~/.aws/credentials and ~/.aws/config for s3:// images (overrides AWS_PROFILE).
    #[arg(long, value_name = "NAME")]
    pub aws_profile: Option<String>,
    /// Also serve the disks over NBD at ADDR (unix:PATH or tcp:HOST:PORT; repeatable).
    #[arg(long, value_name = "ADDR", value_parser = crate::nbd::server::Listen::parse)]
    pub nbd: Vec<crate::nbd::server::Listen>,
    /// Who may connect to --nbd: the TCP allow-list and TLS.
    #[command(flatten)]
    pub nbd_net: crate::nbd::cmd::NetArgs,
    /// Internal: the pipe to report readiness on when started detached
    /// (from the environment, see [`daemon::NOTIFY_ENV`]).
    #[arg(skip)]
    pub notify_fd: Option<i32>,
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
    /// Format of the image; detected from content if absent.
    #[arg(long, value_parser = parse_format)]
    pub format: Option<Format>,
    /// Confine backing and extent files as for an untrusted mount.
    #[arg(long)]
    pub untrusted: bool,
    /// Accept a VMDK parent whose CID differs from the child's parentCID (or a
    /// VHD parent whose unique id differs from the child's parent UUID).
    #[arg(long)]
    pub ignore_cid: bool,
    /// Allow backing/extent files that are devices, FIFOs or under /proc, /sys, /dev.
    #[arg(long)]
    pub allow_devices: bool,
    /// Refuse backing chains longer than this.
    #[arg(long, default_value_t = DEFAULT_MAX_DEPTH)]
    pub max_depth: usize,
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
    /// Format of the image; detected from content if absent.
    #[arg(long, value_parser = parse_format)]
    pub format: Option<Format>,
    /// Confine backing and extent files as for an untrusted mount.
    #[arg(long)]
    pub untrusted: bool,
    /// Accept a parent whose CID or unique id differs from the child's record.
    #[arg(long)]
    pub ignore_cid: bool,
    /// Allow backing/extent files that are devices, FIFOs or under /proc, /sys, /dev.
    #[arg(long)]
    pub allow_devices: bool,
    /// Refuse backing chains longer than this.
    #[arg(long, default_value_t = DEFAULT_MAX_DEPTH)]
    pub max_depth: usize,
}

/// `vdiskfs list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// FUSE workers: a worker blocks in the host `pread` of a cold read, so
/// the disk sees at most this many reads at once. 32 keeps a QD32 client's
/// queue on the device (random 4 KiB reads of a cold 4 GiB qcow2 on 2
/// cores: 34k IOPS with 8 workers, 41–47k with 32, no gain at 64; see
/// docs/performance.md) and bounds the per-worker read buffers to 32 MiB.
impl MountArgs {
    /// The FUSE workers actually started: `--threads 0` means one.
    fn workers(&self) -> usize {
        self.threads.max(1)
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| (n.get() * 16).clamp(16, 32))
        .unwrap_or(32)
}

fn parse_format(s: &str) -> std::result::Result<Format, String> {
    Format::from_name(s).map_err(|e| e.message().to_string())
}

/// Parses sizes such as `512`, `64K`, `256M`, `1.5G`, `1GiB` (binary
/// units; a fraction is rounded down to whole bytes).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let bad = || format!("bad size {s:?} (e.g. 512M, 1.5G)");
    let dangling = num.ends_with('.');
    if int.is_empty() || dangling || frac.contains('.') || frac.len() > 9 {
        return Err(bad());
    }
    let n: u64 = int.parse().map_err(|_| bad())?;
    let f: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    let mult: u64 = match unit
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("bad size unit in {s:?} (use K, M, G or T)")),
    };
    // 10^9 * 2^40 fits in a u64 many times over: no overflow in the fraction.
    let frac_bytes = u128::from(f) * u128::from(mult) / 10u128.pow(frac.len() as u32);
    n.checked_mul(mult)
        .and_then(|b| b.checked_add(frac_bytes as u64))
        .ok_or_else(|| format!("size {s:?} is too large"))
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

/// Entry point: parses arguments, runs the command, prints any error on one line.
pub fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let notify_fd = daemon::take_notify_fd();
    let cli = match parsed {
        Ok((mut cli, matches)) => {
            if let Command::Mount(args) = &cli.command {
                if args.paths.len() < 2 {
                    let _ = writeln!(
                        std::io::stderr(),
                        "vdiskfs: mount needs one or more images and a mount point \
                         (usage: vdiskfs mount [OPTIONS] IMAGE... MOUNTPOINT)"
                    );
                    return ExitCode::from(2);
                }
            }
            match (&mut cli.command, notify_fd) {
                // This is the detached daemon.
                (Command::Mount(args), Some(fd)) => {
                    args.foreground = true;
                    args.notify_fd = Some(fd);
                }
                (Command::Serve(args), Some(fd)) => {
                    args.foreground = true;
                    args.notify_fd = Some(fd);
                }
                _ => {}
            }
            if let (Command::Mount(args), Some(sub)) =
                (&mut cli.command, matches.subcommand_matches("mount"))
            {
                let given =
                    |id: &str| sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
                if let Err(msg) = crate::options::merge(args, &given) {
                    let _ = writeln!(std::io::stderr(), "vdiskfs: {msg}");
                    return ExitCode::from(2);
                }
            }
            cli
        }
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "vdiskfs: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    init_logging(&cli, detached_log_target(&cli));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "vdiskfs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A clap error on one line, like every other error: its first paragraph
/// (which names the missing or bad argument on its following lines) joined.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let msg = first.join(" ");
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
    let msg = if msg.is_empty() {
        "invalid arguments"
    } else {
        msg
    };
    format!("{msg} (see vdiskfs --help)")
}

fn level(cli: &Cli, explicit: Option<LevelFilter>) -> LevelFilter {
    if let Some(l) = explicit {
        return l;
    }
    let (verbose, quiet) = match &cli.command {
        Command::Mount(m) => (cli.verbose.saturating_add(m.verbose), cli.quiet || m.quiet),
        _ => (cli.verbose, cli.quiet),
    };
    if quiet {
        return LevelFilter::Error;
    }
    match verbose {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Where a detached daemon with a `--log-file` logs. `None` for everything
/// else: stderr, or syslog for a detached daemon (see [`init_logging`]).
fn detached_log_target(cli: &Cli) -> Option<env_logger::Target> {
    let (notify_fd, log_file) = match &cli.command {
        Command::Mount(m) => (m.notify_fd, &m.log_file),
        Command::Serve(s) => (s.notify_fd, &s.log_file),
        _ => return None,
    };
    notify_fd?;
    if let Some(p) = log_file {
        match daemon::open_log_file(p) {
            Ok(f) => return Some(env_logger::Target::Pipe(Box::new(f))),
            Err(e) => crate::daemon::Syslog::new().line(&format!(
                "cannot open log file {}: {e}; logging to syslog",
                p.display()
            )),
        }
    }
    None
}

fn init_logging(cli: &Cli, target: Option<env_logger::Target>) {
    let explicit = match &cli.command {
        Command::Mount(m) => m.log_level,
        _ => None,
    };
    let mut b = env_logger::Builder::new();
    b.filter_level(level(cli, explicit));
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    let detached = matches!(&cli.command, Command::Mount(m) if m.notify_fd.is_some());
    match target {
        Some(t) => {
            b.target(t);
        }
        // A detached daemon without a log file: syslog, its terminal is gone.
        None if detached => return daemon::SyslogLogger::install(b.build()),
        None => {}
    }
    let _ = b.try_init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Mount(m) => mount(m),
        Command::Unmount(u) => daemon::unmount(
            &u.mountpoint,
            u.lazy,
            std::time::Duration::from_secs(u.timeout),
        ),
        Command::Info(i) => info_cmd(&i),
        Command::List(l) => list_cmd(&l),
        Command::Map(m) => map_cmd(&m),
        Command::Serve(s) => crate::nbd::cmd::run(s),
        Command::Generate(g) => crate::generate::run(&g),
    }
}

fn info_cmd(args: &InfoArgs) -> Result<()> {
    let opts = ChainOptions {
        format: args.format,
        policy: OpenPolicy {
            untrusted: args.untrusted,
            allow_devices: args.allow_devices,
            ..Default::default()
        },
        ignore_cid: args.ignore_cid,
        max_depth: args.max_depth,
        ..Default::default()
    };
    let chain = Chain::open(&args.image, &opts, &Caches::new(64 << 20))?;
    let report = info::gather(&chain)?;
    let text = if args.json {
        info::to_json(&report) + "\n"
    } else if args.output.as_deref() == Some("json") {
        let v = info::qemu::to_qemu_json(&chain, args.backing_chain);
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
    } else {
        info::to_text(&report, args.verbose)
    };
    let _ = std::io::stdout().write_all(text.as_bytes());
    // The report is printed whole; the exit status still says the image is
    // damaged, so that `vdiskfs info IMG && use IMG` stops there.
    // The damage names its file (any link of the chain) already.
    if let Some(damage) = report.chain.iter().find_map(|l| l.damage.as_ref()) {
        return Err(Error::corrupt(format!("damaged: {damage}")));
    }
    Ok(())
}

fn map_cmd(args: &MapArgs) -> Result<()> {
    let opts = ChainOptions {
        format: args.format,
        policy: OpenPolicy {
            untrusted: args.untrusted,
            allow_devices: args.allow_devices,
            ..Default::default()
        },
        ignore_cid: args.ignore_cid,
        max_depth: args.max_depth,
        ..Default::default()
    };
    let chain = Chain::open(&args.image, &opts, &Caches::new(64 << 20))?;
    let entries = crate::map::map(&chain)?;
    let text = if args.output == "json" {
        crate::map::to_json(&entries)
    } else {
        crate::map::to_human(&entries)
    };
    let _ = std::io::stdout().write_all(text.as_bytes());
    Ok(())
}

fn list_cmd(args: &ListArgs) -> Result<()> {
    let entries = daemon::list_states();
    if args.json {
        let v: Vec<serde_json::Value> = entries
            .iter()
            .map(|(m, st)| {
                serde_json::json!({
                    "mountpoint": m.mountpoint,
                    "images": st.as_ref().map(|s| s.images.clone()).unwrap_or_else(|| vec![PathBuf::from(&m.source)]),
                    "mode": st.as_ref().map(|s| s.mode.clone()).unwrap_or_else(|| "unknown".into()),
                    "pid": st.as_ref().map(|s| s.pid),
                    "transport": st.as_ref().and_then(|s| s.transport.clone()),
                    "nbd": st.as_ref().map(|s| s.nbd.clone()).unwrap_or_default(),
                })
            })
            .chain(daemon::serve_states().iter().map(|s| {
                serde_json::json!({
                    "mountpoint": null,
                    "images": s.images,
                    "mode": s.mode,
                    "pid": s.pid,
                    "nbd": s.nbd,
                })
            }))
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    println!(
        "{:<30} {:<8} {:>8}  {:<9} IMAGES",
        "MOUNTPOINT", "MODE", "PID", "TRANSPORT"
    );
    for (m, st) in entries {
        let nbd = st.as_ref().map(|s| s.nbd.clone()).unwrap_or_default();
        let transport = st
            .as_ref()
            .and_then(|s| s.transport.clone())
            .unwrap_or_else(|| "?".into());
        let (mode, pid, images) = match st {
            Some(s) => (
                s.mode,
                s.pid.to_string(),
                s.images
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            None => ("?".into(), "-".into(), m.source.clone()),
        };
        println!(
            "{:<30} {:<8} {:>8}  {:<9} {}",
            m.mountpoint.display(),
            mode,
            pid,
            transport,
            images
        );
        for u in nbd {
            println!("{:<30} {:<8} {:>8}  nbd: {u}", "", "", "");
        }
    }
    for s in daemon::serve_states() {
        let images: Vec<String> = s.images.iter().map(|p| p.display().to_string()).collect();
        println!(
            "{:<30} {:<8} {:>8}  {}",
            "(nbd serve)",
            s.mode,
            s.pid,
            images.join(" ")
        );
        for u in s.nbd {
            println!("{:<30} {:<8} {:>8}  nbd: {u}", "", "", "");
        }
    }
    Ok(())
}

/// Validated mount settings.
struct MountPlan {
    images: Vec<(PathBuf, OsString)>,
    mountpoint: PathBuf,
    single_file: bool,
    chain_opts: ChainOptions,
    mode: WriteMode,
    force_lock: bool,
    partitions: bool,
    remote_chunk: u64,
    remote_readahead: u64,
    remote_cache: Option<(PathBuf, u64)>,
    s3: crate::remote::S3Settings,
}

fn plan(args: &MountArgs) -> Result<MountPlan> {
    let (mountpoint, images) = args
        .paths
        .split_last()
        .ok_or_else(|| Error::invalid("give at least one image and a mount point"))?;
    if images.is_empty() {
        return Err(Error::invalid("give at least one image and a mount point"));
    }
    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|e| dead_mount(e, mountpoint))?;
    let meta = std::fs::metadata(&mountpoint).map_err(|e| dead_mount(e, &mountpoint))?;
    if !args.nonempty {
        check_vacant(&mountpoint, meta.is_dir())?;
    }
    let single_file = if meta.is_file() {
        if images.len() != 1 {
            return Err(
                Error::invalid("a regular file as mount point takes exactly one image")
                    .with_path(&mountpoint),
            );
        }
        true
    } else if meta.is_dir() {
        false
    } else {
        return Err(
            Error::invalid("mount point must be a directory or a regular file")
                .with_path(&mountpoint),
        );
    };
    let mut named: Vec<(PathBuf, OsString)> = Vec::new();
    for img in images {
        let abs = if crate::remote::is_url(img) {
            if args.rw {
                return Err(Error::new(
                    crate::error::ErrorKind::ReadOnly,
                    "remote images are read-only; send writes to a local --overlay FILE or --snapshot",
                )
                .with_path(img));
            }
            img.clone()
        } else {
            img.canonicalize()
                .map_err(|e| Error::io("cannot open", e).with_path(img))?
        };
        let name = exposed_name(img)?;
        if let Some((other, _)) = named.iter().find(|(_, n)| *n == name) {
            return Err(Error::invalid(format!(
                "{} and {} would both appear as {}",
                other.display(),
                img.display(),
                name.to_string_lossy()
            )));
        }
        named.push((abs, name));
    }
    let mode = if args.rw {
        WriteMode::InPlace
    } else if let Some(o) = &args.overlay {
        if named.len() != 1 {
            return Err(Error::invalid("--overlay takes exactly one image"));
        }
        WriteMode::Overlay(o.clone())
    } else if args.snapshot {
        WriteMode::Snapshot
    } else {
        WriteMode::ReadOnly
    };
    let chain_opts = ChainOptions {
        format: args.format,
        policy: OpenPolicy {
            untrusted: args.untrusted,
            root: None,
            allow_devices: args.allow_devices,
            direct: args.unbuffered,
            read_lock: if args.force_lock {
                crate::lock::ReadLock::Force
            } else {
                crate::lock::ReadLock::Share
            },
        },
        max_depth: args.max_depth,
        single_link: args.single_link,
        ignore_cid: args.ignore_cid,
        writable: false,
    };
    if single_file && args.partitions {
        return Err(
            Error::invalid("--partitions needs a directory as mount point").with_path(&mountpoint),
        );
    }
    Ok(MountPlan {
        images: named,
        mountpoint,
        single_file,
        chain_opts,
        mode,
        force_lock: args.force_lock,
        partitions: args.partitions,
        remote_chunk: args.remote_chunk,
        remote_readahead: args.remote_readahead,
        remote_cache: args
            .remote_cache
            .clone()
            .map(|d| (d, args.remote_cache_size)),
        s3: crate::remote::S3Settings {
            region: args.aws_region.clone(),
            endpoint: args.aws_endpoint.clone(),
            allow_http: args.aws_allow_http,
            profile: args.aws_profile.clone(),
        },
    })
}

/// The error for a mount point that cannot be resolved: a dead FUSE mount
/// (its daemon killed) answers ENOTCONN, which says nothing to a user; or,
/// while the kernel is still tearing the connection down, ECONNABORTED or
/// ECANCELED (a FUSE-over-io_uring mount: its rings are cancelled after the
/// daemon is gone; a request queued meanwhile ends aborted, or cancelled
/// when it was handed to a ring entry of the dead task).
fn dead_mount(e: std::io::Error, mountpoint: &Path) -> Error {
    if matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED)
    ) {
        let what = if daemon::mounts()
            .iter()
            .any(|m| mountpoint.is_absolute() && m.mountpoint == mountpoint)
        {
            "a dead vdiskfs mount"
        } else {
            "a dead mount"
        };
        return Error::invalid(format!(
            "is {what} (its daemon is gone); `vdiskfs unmount {}` clears it",
            mountpoint.display()
        ))
        .with_path(mountpoint);
    }
    Error::io("mount point", e).with_path(mountpoint)
}

/// Refuses a mount point that is already a mount (of any filesystem: a
/// second mount would hide the first, and its daemon with it), and a
/// directory that is not empty (its files would be hidden), as FUSE does.
/// `--nonempty` skips both checks.
fn check_vacant(mountpoint: &Path, is_dir: bool) -> Result<()> {
    if let Some((fstype, source)) = mount_at(mountpoint) {
        return Err(Error::invalid(format!(
            "is already a mount point ({fstype} from {source}); unmount it first, \
             or give --nonempty (-o nonempty) to mount over it"
        ))
        .with_path(mountpoint));
    }
    if !is_dir {
        return Ok(());
    }
    let entries = std::fs::read_dir(mountpoint)
        .map_err(|e| Error::io("cannot list the mount point", e).with_path(mountpoint))?;
    let mut names: Vec<String> = entries
        .take(4)
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    let shown = if names.len() > 3 {
        format!("{}, ...", names[..3].join(", "))
    } else {
        names.join(", ")
    };
    Err(Error::invalid(format!(
        "mount point is not empty (it holds {shown}); use an empty directory, \
         or give --nonempty (-o nonempty) to hide its contents"
    ))
    .with_path(mountpoint))
}

/// The type and source of the mount whose mount point is exactly `path`
/// (the last one, if several are stacked), from /proc/self/mountinfo.
fn mount_at(path: &Path) -> Option<(String, String)> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_str()?;
    table.lines().rev().find_map(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        if f.len() < sep + 3 || f.len() < 5 {
            return None;
        }
        let mp = daemon::unescape(f[4]);
        (mp == want).then(|| (f[sep + 1].to_string(), f[sep + 2].to_string()))
    })
}

/// Memory each FUSE worker may hold beyond the caches: its request buffer
/// and its read-reply buffer, one full request each.
const WORKER_BUFFERS: u64 = 2 * crate::fs::MAX_REQUEST as u64;

/// The caches' share of `--cache-size`: what the workers' buffers leave,
/// and at least half, so that the daemon stays within the cache size plus
/// a fixed margin whatever the number of workers.
fn cache_budget(cache_size: u64, threads: usize) -> usize {
    let workers = WORKER_BUFFERS.saturating_mul(threads as u64);
    let bytes = cache_size - workers.min(cache_size / 2);
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

fn open_disks(plan: &MountPlan, cache_size: u64, threads: usize) -> Result<Vec<Disk>> {
    let mut budget = cache_budget(cache_size, threads);
    if plan.images.iter().any(|(p, _)| crate::remote::is_url(p)) {
        // Remote chunks take half of the cache (see docs/remote.md).
        crate::remote::configure(crate::remote::Settings {
            chunk: plan.remote_chunk,
            cache_bytes: budget / 2,
            readahead: plan.remote_readahead,
            ..Default::default()
        });
        budget -= budget / 2;
        crate::remote::configure_s3(plan.s3.clone());
        if let Some((dir, cap)) = &plan.remote_cache {
            crate::remote::set_disk_cache(dir, *cap)?;
        }
    }
    let caches: Arc<Caches> = Caches::new(budget);
    let mut disks = Vec::new();
    for (path, name) in &plan.images {
        let chain = overlay::open(path, &plan.mode, &plan.chain_opts, &caches, plan.force_lock)?;
        let xattrs = disk_xattrs(&chain);
        let chain = Arc::new(chain);
        let parts = if plan.partitions {
            crate::fs::partitions::partition_disks(name, &chain, &xattrs)?
        } else {
            Vec::new()
        };
        disks.push(Disk::new(name.clone(), chain, xattrs));
        disks.extend(parts);
    }
    crate::fs::partitions::check_unique_names(&disks)?;
    Ok(disks)
}

/// `user.vdiskfs.*` attributes describing a disk.
fn disk_xattrs(chain: &Chain) -> Vec<(String, Vec<u8>)> {
    let top = &chain.layers()[0];
    let li = top.info();
    let mut x = vec![
        (
            "user.vdiskfs.format".to_string(),
            li.format.name().as_bytes().to_vec(),
        ),
        (
            "user.vdiskfs.virtual_size".to_string(),
            chain.size().to_string().into_bytes(),
        ),
        (
            "user.vdiskfs.chain".to_string(),
            chain
                .layers()
                .iter()
                .map(|l| format!("{}:{}", l.format(), l.path().display()))
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes(),
        ),
    ];
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (k, v) in &li.details {
        match v {
            // One attribute per member (`user.vdiskfs.geometry.heads`); the
            // VMDK ddb map's keys already start with `ddb.`.
            serde_json::Value::Object(m) => {
                for (sub, sv) in m {
                    let name = if sub.starts_with(&format!("{k}.")) {
                        format!("user.vdiskfs.{sub}")
                    } else {
                        format!("user.vdiskfs.{k}.{sub}")
                    };
                    x.push((name, text(sv).into_bytes()));
                }
            }
            other => x.push((format!("user.vdiskfs.{k}"), text(other).into_bytes())),
        }
    }
    x
}

fn mount(args: MountArgs) -> Result<()> {
    let plan = plan(&args)?;
    if !args.foreground {
        // Validate everything we can before detaching, so errors reach the user.
        if let Some(p) = &args.log_file {
            // Opened (created) here too: the daemon has no terminal to say it cannot.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::io("cannot open the log file", e).with_path(p))?;
        }
        drop(open_disks(&plan, args.cache_size, args.workers())?);
        return daemon::spawn_detached(&[]);
    }
    let mut notifier = Notifier::new(args.notify_fd);
    let result = serve(&args, &plan, &mut notifier);
    if let Err(e) = &result {
        notifier.failed(e);
    }
    result
}

fn serve(args: &MountArgs, plan: &MountPlan, notifier: &mut Notifier) -> Result<()> {
    // Before any thread starts (the write queue's flusher, the remote
    // runtime, the NBD server), so that they all inherit the mask and the
    // signals reach only the signal thread.
    let sigset = daemon::block_signals();
    let disks = open_disks(plan, args.cache_size, args.workers())?;
    if args.notify_fd.is_some() {
        // Detached: every path is open or absolute by now (the log file's
        // too), so stop pinning the caller's working directory's filesystem.
        let _ = std::env::set_current_dir("/");
    }
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let access = Access {
        uid: args.uid.unwrap_or(uid),
        gid: args.gid.unwrap_or(gid),
        mode: args
            .mode
            .unwrap_or(if plan.mode.writable() { 0o600 } else { 0o400 }),
    };
    let fsname = plan
        .images
        .iter()
        .map(|(p, _)| p.display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let nbd = crate::nbd::cmd::serve_mount(&args.nbd, &args.nbd_net, &disks, &plan.images)?;
    let mut fs = VdiskFs::new(disks, plan.single_file, access);
    if args.no_passthrough {
        fs = fs.without_passthrough();
    }
    // Before mounting: a failure here must not leave a mount behind.
    let _pid_file = match &args.pid_file {
        Some(p) => Some(daemon::PidFile::create(p)?),
        None => None,
    };
    let mut session = crate::fs::mount(
        fs,
        &plan.mountpoint,
        &crate::fs::MountConfig {
            fsname,
            read_only: !plan.mode.writable(),
            allow_other: args.allow_other,
            threads: args.workers(),
            transport: args.transport,
        },
    )
    .map_err(|e| Error::io("cannot mount", e).with_path(&plan.mountpoint))?;
    let _state = StateFile::create(&MountState {
        mountpoint: plan.mountpoint.clone(),
        images: plan.images.iter().map(|(p, _)| p.clone()).collect(),
        mode: plan.mode.name().into(),
        pid: std::process::id(),
        transport: Some(session.transport.name().into()),
        nbd: nbd.as_ref().map_or(Vec::new(), |s| s.endpoints().to_vec()),
    })
    .map_err(|e| log::warn!("{e}; vdiskfs list will not show this mount"))
    .ok();
    let mut unmounter = session.unmounter();
    daemon::on_signal(sigset, move || {
        if let Err(e) = unmounter.unmount() {
            log::error!("unmount on signal failed: {e}");
        }
    });
    info!("mounted on {}", plan.mountpoint.display());
    notifier.ready();
    let ran = session
        .run()
        .map_err(|e| Error::io("FUSE session failed", e).with_path(&plan.mountpoint));
    if let Some(server) = nbd {
        // Unmounted: NBD clients finish their in-flight requests and go.
        server.stopper().stop();
        server.wait();
    }
    ran?;
    info!("unmounted {}", plan.mountpoint.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_buffers_come_out_of_the_cache_size_up_to_half() {
        const M: u64 = 1 << 20;
        assert_eq!(cache_budget(256 * M, 32), (256 - 64) as usize * M as usize);
        assert_eq!(cache_budget(256 * M, 8), (256 - 16) as usize * M as usize);
        assert_eq!(cache_budget(64 * M, 32), 32 * M as usize);
        assert_eq!(cache_budget(0, 32), 0);
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

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5k").unwrap(), 512);
        for bad in ["1.", ".5G", "1.2.3M", "G", "", "-1M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
