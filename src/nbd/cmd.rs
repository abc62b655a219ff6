//! `vdiskfs serve IMAGE...`: each image (chain) an NBD export named after
//! its file stem, served in the foreground like qemu-nbd (`--fork` detaches
//! once listening) until SIGTERM/SIGINT, which drain in-flight requests,
//! flush and close.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::server::{Cidr, Config, Listen, Server};
use super::tls::TlsFiles;
use super::transmit::Limits;
use super::Export;
use crate::cache::Caches;
use crate::chain::{ChainOptions, DEFAULT_MAX_DEPTH};
use crate::cli::parse_size;
use crate::daemon::{self, Notifier};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::overlay::{self, WriteMode};
use crate::policy::OpenPolicy;

/// The default listener when no `--listen` is given: `nbd.sock` in the
/// state directory (`/run/vdiskfs/nbd.sock` for root).
pub fn default_listen() -> Listen {
    Listen::Unix(daemon::state_dir().join("nbd.sock"))
}

/// Who may connect: the TCP allow-list and TLS (shared by `serve` and
/// `mount --nbd`).
#[derive(Debug, Args, Clone, Default)]
pub struct NetArgs {
    /// NBD: TCP clients allowed, as ADDR or ADDR/PREFIX (repeatable; default: all).
    #[arg(long, value_name = "CIDR", value_parser = Cidr::parse)]
    pub allow: Vec<Cidr>,
    /// NBD: require TLS, with this certificate chain (PEM); needs --tls-key.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "tls_creds"
    )]
    pub tls_cert: Option<PathBuf>,
    /// NBD: the private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// NBD: require TLS, with server-cert.pem and server-key.pem (and
    /// ca-cert.pem for --tls-verify-peer) from DIR, as qemu's tls-creds-x509.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// NBD: require client certificates signed by the CA of --tls-ca (or
    /// the credentials directory's ca-cert.pem).
    #[arg(long)]
    pub tls_verify_peer: bool,
    /// NBD: the CA (PEM) client certificates must chain to (implies --tls-verify-peer).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

impl NetArgs {
    /// The TLS configuration, loaded (a bad file fails the start), or
    /// `None` when no TLS option was given.
    pub fn tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>> {
        let verify = self.tls_verify_peer || self.tls_ca.is_some();
        let mut files = match (&self.tls_creds, &self.tls_cert, &self.tls_key) {
            (Some(dir), _, _) => TlsFiles::from_dir(dir, verify),
            (None, Some(cert), Some(key)) => TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: None,
            },
            _ if verify => {
                return Err(Error::invalid(
                    "--tls-verify-peer and --tls-ca need --tls-cert/--tls-key or --tls-creds",
                ))
            }
            _ => return Ok(None),
        };
        if let Some(ca) = &self.tls_ca {
            files.client_ca = Some(ca.clone());
        } else if verify && files.client_ca.is_none() {
            return Err(Error::invalid(
                "--tls-verify-peer needs --tls-ca FILE (or --tls-creds DIR with ca-cert.pem)",
            ));
        }
        files.load().map(Some)
    }

    /// True when any option was given.
    pub fn any(&self) -> bool {
        !self.allow.is_empty()
            || self.tls_cert.is_some()
            || self.tls_creds.is_some()
            || self.tls_verify_peer
            || self.tls_ca.is_some()
    }
}

/// `vdiskfs serve`.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// The images; each becomes an export named after its file stem.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// Where to listen: unix:PATH or tcp:HOST:PORT (repeatable; default unix:/run/vdiskfs/nbd.sock as root).
    #[arg(long, value_name = "ADDR", value_parser = Listen::parse)]
    pub listen: Vec<Listen>,
    /// The allow-list and TLS.
    #[command(flatten)]
    pub net: NetArgs,
    /// Detach once listening.
    #[arg(long)]
    pub fork: bool,
    /// Format of the top image(s) (raw, qcow2, qcow, vmdk); detected from content if absent.
    #[arg(long, value_parser = |s: &str| Format::from_name(s).map_err(|e| e.message().to_string()))]
    pub format: Option<Format>,
    /// Cache size for metadata and decompressed blocks (e.g. 64M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub cache_size: u64,
    /// Expose this internal qcow2 snapshot, read-only, instead of the
    /// image's current state (qemu-nbd's -l): an ID or name (IDs are tried
    /// first), or snapshot.id=ID[,snapshot.name=NAME].
    #[arg(short = 'l', long, value_name = "SNAPSHOT", value_parser = crate::format::qcow2::snapshot::SnapshotSel::parse, conflicts_with_all = ["rw", "overlay", "snapshot"])]
    pub load_snapshot: Option<crate::format::qcow2::snapshot::SnapshotSel>,
    /// Write into the top image in place (qcow2, sparse VMDK, qcow, raw).
    #[arg(long, conflicts_with_all = ["overlay", "snapshot"])]
    pub rw: bool,
    /// Send writes to a qcow2 overlay FILE backed by the image (created if missing).
    #[arg(long, value_name = "FILE", conflicts_with = "snapshot")]
    pub overlay: Option<PathBuf>,
    /// Send writes to a temporary overlay that disappears when the server stops.
    #[arg(long)]
    pub snapshot: bool,
    /// Write even if another process holds the image's locks.
    #[arg(long)]
    pub force_lock: bool,
    /// Expose only the top layer: unallocated ranges read as zeros.
    #[arg(long)]
    pub single_link: bool,
    /// Treat the image as hostile: confine backing and extent files to its directory.
    #[arg(long)]
    pub untrusted: bool,
    /// Allow backing/extent files that are devices, FIFOs or under /proc, /sys, /dev.
    #[arg(long)]
    pub allow_devices: bool,
    /// Accept a VMDK parent whose CID differs from the child's parentCID.
    #[arg(long)]
    pub ignore_cid: bool,
    /// Refuse backing chains longer than this.
    #[arg(long, default_value_t = DEFAULT_MAX_DEPTH)]
    pub max_depth: usize,
    /// Clients served at once.
    #[arg(long, default_value_t = 16)]
    pub max_connections: usize,
    /// Log file of the detached server (default: syslog).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Internal: set in the detached copy.
    #[arg(skip)]
    pub foreground: bool,
    /// Internal: the pipe to report readiness on when started detached
    /// (from the environment, see [`daemon::NOTIFY_ENV`]).
    #[arg(skip)]
    pub notify_fd: Option<i32>,
}

impl ServeArgs {
    fn write_mode(&self) -> Result<WriteMode> {
        Ok(if self.rw {
            WriteMode::InPlace
        } else if let Some(o) = &self.overlay {
            if self.images.len() != 1 {
                return Err(Error::invalid("--overlay takes exactly one image"));
            }
            WriteMode::Overlay(o.clone())
        } else if self.snapshot {
            WriteMode::Snapshot
        } else {
            WriteMode::ReadOnly
        })
    }

    fn config(&self) -> Result<Config> {
        let listen = if self.listen.is_empty() {
            let l = default_listen();
            if let Listen::Unix(p) = &l {
                if let Some(dir) = p.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
            }
            vec![l]
        } else {
            self.listen.clone()
        };
        Ok(Config {
            listen,
            allow: self.net.allow.clone(),
            max_connections: self.max_connections.max(1),
            handshake_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            tls: self.net.tls()?,
        })
    }
}

/// Opens every image as an export.
fn open_exports(args: &ServeArgs) -> Result<Vec<Export>> {
    let mode = args.write_mode()?;
    let opts = ChainOptions {
        format: args.format,
        policy: OpenPolicy {
            untrusted: args.untrusted,
            root: None,
            allow_devices: args.allow_devices,
            direct: false,
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
        load_snapshot: args.load_snapshot.clone(),
    };
    let caches: Arc<Caches> = Caches::new(usize::try_from(args.cache_size).unwrap_or(usize::MAX));
    let mut exports: Vec<Export> = Vec::new();
    for img in &args.images {
        let name = super::export_name(img)?;
        if let Some(other) = exports.iter().find(|e| e.name == name) {
            return Err(Error::invalid(format!(
                "{} and {} would both be export {name:?}",
                other.description,
                img.display()
            )));
        }
        let chain = overlay::open(img, &mode, &opts, &caches, args.force_lock)?;
        let description = format!(
            "{} ({}, {} layer{}{})",
            img.display(),
            chain.layers()[0].format(),
            chain.layers().len(),
            if chain.layers().len() == 1 { "" } else { "s" },
            if chain.is_writable() {
                ", writable"
            } else {
                ""
            }
        );
        exports.push(Export {
            name,
            description,
            chain: Arc::new(chain),
        });
    }
    Ok(exports)
}

/// Runs `vdiskfs serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    if args.fork && args.notify_fd.is_none() {
        return daemon::spawn_detached(&[]);
    }
    let mut notifier = Notifier::new(args.notify_fd);
    let result = serve(&args, &mut notifier);
    if let Err(e) = &result {
        notifier.failed(e);
    }
    result
}

fn serve(args: &ServeArgs, notifier: &mut Notifier) -> Result<()> {
    // Before any thread starts (the write queue's flusher, the remote
    // runtime), so that signals reach only the signal thread.
    let sigset = daemon::block_signals();
    // The credentials first: a bad file fails before the images open.
    let config = args.config()?;
    let exports = Arc::new(open_exports(args)?);
    let server = Server::start(exports.clone(), config)?;
    let stopper = server.stopper();
    daemon::on_signal(sigset, move || stopper.stop());
    for e in exports.iter() {
        log::info!("serving export {:?}: {}", e.name, e.description);
    }
    for u in server.endpoints() {
        log::info!("listening on {u}");
    }
    let _state = daemon::StateFile::create(&daemon::MountState {
        mountpoint: PathBuf::new(),
        images: args
            .images
            .iter()
            .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
            .collect(),
        mode: args.write_mode()?.name().into(),
        pid: std::process::id(),
        transport: None,
        nbd: server.endpoints().to_vec(),
    })
    .map_err(|e| log::warn!("{e}; vdiskfs list will not show this server"))
    .ok();
    notifier.ready();
    server.wait();
    let mut failed = None;
    for e in exports.iter() {
        if let Err(err) = e.chain.flush() {
            log::error!("export {}: final flush failed: {err}", e.name);
            failed = Some(err);
        }
    }
    log::info!("NBD server stopped");
    failed.map_or(Ok(()), Err)
}

/// For `vdiskfs mount --nbd ADDR`: serves the mount's whole disks (not
/// its partition files) over NBD from the same daemon, on the same chains
/// (one cache, one lock set). `None` when no listener was asked for.
pub fn serve_mount(
    listen: &[Listen],
    net: &NetArgs,
    disks: &[crate::fs::Disk],
    images: &[(PathBuf, std::ffi::OsString)],
) -> Result<Option<Server>> {
    if listen.is_empty() {
        if net.any() {
            return Err(Error::invalid(
                "--allow and --tls-* apply to --nbd: give --nbd ADDR",
            ));
        }
        return Ok(None);
    }
    let tls = net.tls()?;
    let mut exports = Vec::new();
    for (path, file) in images {
        let Some(d) = disks.iter().find(|d| d.name == *file) else {
            continue;
        };
        exports.push(Export {
            name: super::export_name(path)?,
            description: format!("{} (mounted as {})", path.display(), file.to_string_lossy()),
            chain: d.chain.clone(),
        });
    }
    let config = Config {
        listen: listen.to_vec(),
        allow: net.allow.clone(),
        max_connections: 16,
        handshake_timeout: Duration::from_secs(10),
        limits: Limits::default(),
        tls,
    };
    let server = Server::start(Arc::new(exports), config)?;
    for u in server.endpoints() {
        log::info!("serving the disks over NBD at {u}");
    }
    Ok(Some(server))
}
