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
use crate::cli::config::DiskConfig;
use crate::cli::options::MountOptions;
use crate::cli::DiskArgs;
use crate::daemon::{self, Notifier};
use crate::error::{Error, Result};
use crate::overlay::{self, WriteMode};

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
    /// How the disks open and where writes go (as for `mount`).
    #[command(flatten)]
    pub disk: DiskArgs,
    /// Clients served at once.
    #[arg(long, default_value_t = 16)]
    pub max_connections: usize,
    /// Internal: set in the detached copy.
    #[arg(skip)]
    pub foreground: bool,
    /// Internal: the pipe to report readiness on when started detached
    /// (from the environment, see [`daemon::NOTIFY_ENV`]).
    #[arg(skip)]
    pub notify_fd: Option<i32>,
}

impl ServeArgs {
    /// The disk settings, validated as `mount`'s are (`serve` has no `-o`).
    fn disk_config(&self) -> Result<DiskConfig> {
        let cfg = DiskConfig::new(&self.disk, &mut MountOptions::default(), false)?;
        if matches!(cfg.mode, WriteMode::Overlay(_)) && self.images.len() != 1 {
            return Err(Error::invalid("--overlay takes exactly one image"));
        }
        Ok(cfg)
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
fn open_exports(args: &ServeArgs, disk: &DiskConfig) -> Result<Vec<Export>> {
    let budget = usize::try_from(disk.cache_size).unwrap_or(usize::MAX);
    let budget = disk
        .chain
        .remote
        .apply(budget, args.images.iter().map(PathBuf::as_path))?;
    let caches: Arc<Caches> = Caches::new(budget);
    let opts = disk.chain_options();
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
        let chain = overlay::open(img, &disk.mode, &opts, &caches, disk.force_lock)?;
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
            on_write: None,
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
    let disk = args.disk_config()?;
    let exports = Arc::new(open_exports(args, &disk)?);
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
        mode: disk.mode.name().into(),
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
/// (one cache, one lock set); writes over NBD are shown through the
/// mount's files ([`crate::fs::VdiskFs::changed_around`]). `None` when no
/// listener was asked for.
pub fn serve_mount(
    listen: &[Listen],
    net: &NetArgs,
    fs: &Arc<crate::fs::VdiskFs>,
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
        let Some(d) = fs.tree.disks().iter().find(|d| d.name == *file) else {
            continue;
        };
        let (mount, chain) = (fs.clone(), d.chain.clone());
        exports.push(Export {
            name: super::export_name(path)?,
            description: format!("{} (mounted as {})", path.display(), file.to_string_lossy()),
            chain: d.chain.clone(),
            on_write: Some(Arc::new(move |offset, len| {
                mount.changed_around(&chain, offset, len);
            })),
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
