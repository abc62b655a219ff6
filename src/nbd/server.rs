//! Sockets: the listeners (`unix:PATH`, `tcp:HOST:PORT`), the TCP client
//! allow-list, the connection limit and timeouts, and stopping — listeners
//! closed, every connection's read side shut so it drains its in-flight
//! requests, flushes and closes. With TLS configured every connection
//! must upgrade (`NBD_OPT_STARTTLS`) before anything else.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::negotiate::{Negotiator, Step, Tls};
use super::tls::TlsStream;
use super::transmit::{self, Limits};
use super::Export;
use crate::error::{Error, Result};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP address (`HOST:PORT`).
    Tcp(String),
}

impl Listen {
    /// Parses `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(s: &str) -> std::result::Result<Listen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("{s:?}: give a socket path (unix:PATH)"));
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            if a.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!("{s:?}: give tcp:HOST:PORT"));
            }
            return Ok(Listen::Tcp(a.to_string()));
        }
        Err(format!("{s:?}: give unix:PATH or tcp:HOST:PORT"))
    }

    /// The endpoint as an NBD URI (what `list` and the log show).
    pub fn uri(&self) -> String {
        match self {
            Listen::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
            Listen::Tcp(a) => format!("nbd://{a}"),
        }
    }
}

/// A client address range (`10.0.0.0/8`, `::1`, `192.168.1.7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR` or `ADDR/PREFIX`.
    pub fn parse(s: &str) -> std::result::Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?}: not an IP address"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= bits)
                .ok_or_else(|| format!("{s:?}: bad prefix length"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    /// True when `ip` lies in the range (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        let keep = |bits: u32, a: u128, b: u128| {
            let p = self.prefix as u32;
            p == 0 || (a ^ b) >> (bits - p) == 0
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => keep(32, u32::from(a) as u128, u32::from(b) as u128),
            (IpAddr::V6(a), IpAddr::V6(b)) => keep(128, u128::from(a), u128::from(b)),
            _ => false,
        }
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The listeners.
    pub listen: Vec<Listen>,
    /// TCP clients allowed (empty: all).
    pub allow: Vec<Cidr>,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Time a client has for each step of the handshake.
    pub handshake_timeout: Duration,
    /// Per-connection limits.
    pub limits: Limits,
    /// TLS credentials: when set, every client must start TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A connected socket of either family.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    TlsUnix(TlsStream<UnixStream>),
    TlsTcp(TlsStream<TcpStream>),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::TlsUnix(s) => Stream::TlsUnix(s.clone()),
            Stream::TlsTcp(s) => Stream::TlsTcp(s.clone()),
        })
    }
    fn shutdown_read(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Read),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Read),
            Stream::TlsUnix(s) => s.socket().shutdown(std::net::Shutdown::Read),
            Stream::TlsTcp(s) => s.socket().shutdown(std::net::Shutdown::Read),
        };
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::TlsUnix(s) => Stream::Unix(s.socket().try_clone()?).set_timeouts(read, write),
            Stream::TlsTcp(s) => Stream::Tcp(s.socket().try_clone()?).set_timeouts(read, write),
        }
    }
    /// Runs the TLS handshake on a plain stream.
    fn into_tls(self, config: Arc<rustls::ServerConfig>) -> io::Result<Stream> {
        match self {
            Stream::Unix(s) => Ok(Stream::TlsUnix(TlsStream::accept(s, config)?)),
            Stream::Tcp(s) => Ok(Stream::TlsTcp(TlsStream::accept(s, config)?)),
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, "TLS twice")),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::TlsUnix(s) => s.read(buf),
            Stream::TlsTcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::TlsUnix(s) => s.write(buf),
            Stream::TlsTcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// State shared by the acceptors and connections.
struct Shared {
    exports: Arc<Vec<Export>>,
    config: Config,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// A clone of every live connection's socket, to shut it at stop.
    conns: Mutex<HashMap<u64, Stream>>,
}

/// A running server; [`Stopper::stop`] (from [`Server::stopper`]) then
/// [`Server::wait`] end it.
pub struct Server {
    shared: Arc<Shared>,
    acceptors: Vec<JoinHandle<()>>,
    endpoints: Vec<String>,
}

/// A handle that stops the server from another thread (a signal handler).
#[derive(Clone)]
pub struct Stopper(Arc<Shared>);

impl Stopper {
    /// Stops accepting and ends every connection after its in-flight requests.
    pub fn stop(&self) {
        self.0.stopping.store(true, Ordering::SeqCst);
        for s in self.0.conns.lock().values() {
            s.shutdown_read();
        }
    }
}

impl Server {
    /// Binds every listener (any failure fails the whole start) and starts
    /// accepting.
    pub fn start(exports: Arc<Vec<Export>>, config: Config) -> Result<Server> {
        if config.listen.is_empty() {
            return Err(Error::invalid("nbd: nothing to listen on"));
        }
        let mut listeners = Vec::new();
        for l in &config.listen {
            listeners.push(bind(l)?);
        }
        let mut endpoints: Vec<String> = config.listen.iter().map(Listen::uri).collect();
        if config.tls.is_some() {
            // nbd:// → nbds://, nbd+unix:// → nbds+unix:// (libnbd's TLS schemes).
            for u in &mut endpoints {
                u.insert(3, 's');
            }
        }
        let shared = Arc::new(Shared {
            exports,
            config,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        });
        let mut acceptors = Vec::new();
        for l in listeners {
            let sh = shared.clone();
            let t = std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&sh, l))
                .map_err(|e| Error::io("cannot start the NBD acceptor", e))?;
            acceptors.push(t);
        }
        Ok(Server {
            shared,
            acceptors,
            endpoints,
        })
    }

    /// The endpoints, as NBD URIs.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A handle to stop the server.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.clone())
    }

    /// Waits until the server was stopped and every connection has ended.
    pub fn wait(self) {
        for t in self.acceptors {
            let _ = t.join();
        }
    }
}

fn bind(l: &Listen) -> Result<Listener> {
    match l {
        Listen::Unix(p) => {
            if let Ok(m) = std::fs::symlink_metadata(p) {
                // A socket nobody answers on is a leftover of a killed server.
                if m.file_type().is_socket() && UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
            }
            let s =
                UnixListener::bind(p).map_err(|e| Error::io("cannot listen", e).with_path(p))?;
            s.set_nonblocking(true)
                .map_err(|e| Error::io("cannot listen", e).with_path(p))?;
            Ok(Listener::Unix(s, p.clone()))
        }
        Listen::Tcp(a) => {
            let s = TcpListener::bind(a.as_str())
                .map_err(|e| Error::io(format!("cannot listen on tcp:{a}"), e))?;
            s.set_nonblocking(true)
                .map_err(|e| Error::io(format!("cannot listen on tcp:{a}"), e))?;
            Ok(Listener::Tcp(s))
        }
    }
}

/// Waits up to 200 ms for `fd` to become readable.
fn poll_readable(fd: BorrowedFd<'_>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let _ = poll(
        &mut [PollFd::new(fd, PollFlags::POLLIN)],
        PollTimeout::from(200u16),
    );
}

fn accept_loop(sh: &Arc<Shared>, l: Listener) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !sh.stopping.load(Ordering::SeqCst) {
        let fd = match &l {
            Listener::Unix(s, _) => s.as_fd(),
            Listener::Tcp(s) => s.as_fd(),
        };
        poll_readable(fd);
        conns.retain(|t| !t.is_finished());
        let accepted = match &l {
            Listener::Unix(s, _) => s.accept().map(|(c, _)| (Stream::Unix(c), None)),
            Listener::Tcp(s) => s.accept().map(|(c, a)| {
                let _ = c.set_nodelay(true);
                (Stream::Tcp(c), Some(a))
            }),
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                log::warn!("nbd: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Some(SocketAddr::V4(_) | SocketAddr::V6(_)) = peer {
            let ip = peer.map(|a| a.ip());
            let allowed = sh.config.allow.is_empty()
                || ip.is_some_and(|ip| sh.config.allow.iter().any(|c| c.contains(ip)));
            if !allowed {
                log::warn!("nbd: refused client {peer:?}: not in the allow-list");
                continue;
            }
        }
        if sh.conns.lock().len() >= sh.config.max_connections {
            log::warn!(
                "nbd: refused a client: {} connections already",
                sh.config.max_connections
            );
            continue;
        }
        let id = sh.next_id.fetch_add(1, Ordering::SeqCst);
        match stream.try_clone() {
            Ok(c) => {
                sh.conns.lock().insert(id, c);
            }
            Err(e) => {
                log::warn!("nbd: {e}");
                continue;
            }
        }
        let sh2 = sh.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                if let Err(e) = connection(&sh2, stream) {
                    log::info!("nbd: connection ended: {e}");
                }
                sh2.conns.lock().remove(&id);
            });
        match spawned {
            Ok(t) => conns.push(t),
            Err(e) => {
                log::warn!("nbd: cannot start a connection thread: {e}");
                sh.conns.lock().remove(&id);
            }
        }
    }
    if let Listener::Unix(_, p) = &l {
        let _ = std::fs::remove_file(p);
    }
    drop(l);
    for t in conns {
        let _ = t.join();
    }
}

fn connection(sh: &Shared, mut stream: Stream) -> io::Result<()> {
    let t = sh.config.handshake_timeout;
    stream.set_timeouts(Some(t), Some(t))?;
    if sh.stopping.load(Ordering::SeqCst) {
        return Ok(());
    }
    let mode = if sh.config.tls.is_some() {
        Tls::Required
    } else {
        Tls::Off
    };
    let mut n = Negotiator::greet(&mut stream, mode)?;
    let (stream, neg) = match n.options(&mut stream, &sh.exports)? {
        Step::Selected(neg) => (stream, neg),
        Step::Aborted => return Ok(()),
        Step::StartTls => {
            let Some(config) = sh.config.tls.clone() else {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS is off"));
            };
            let mut tls = stream.into_tls(config).inspect_err(|e| {
                log::warn!("nbd: a client failed the TLS handshake: {e}");
            })?;
            n.tls_started();
            match n.options(&mut tls, &sh.exports)? {
                Step::Selected(neg) => (tls, neg),
                Step::Aborted => return Ok(()),
                Step::StartTls => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS twice"))
                }
            }
        }
    };
    // Idle clients are fine once connected; a client that stops reading
    // its replies is dropped after a while instead of holding a worker.
    stream.set_timeouts(None, Some(Duration::from_secs(120)))?;
    let export = &sh.exports[neg.export];
    let output = stream.try_clone()?;
    transmit::serve(stream, output, export, &neg, &sh.config.limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            Listen::parse("unix:/tmp/s").unwrap(),
            Listen::Unix("/tmp/s".into())
        );
        assert_eq!(
            Listen::parse("tcp:127.0.0.1:10809").unwrap(),
            Listen::Tcp("127.0.0.1:10809".into())
        );
        assert_eq!(
            Listen::parse("tcp:[::1]:10809").unwrap(),
            Listen::Tcp("[::1]:10809".into())
        );
        assert!(Listen::parse("tcp:host").is_err());
        assert!(Listen::parse("tcp::10809").is_err());
        assert!(Listen::parse("unix:").is_err());
        assert!(Listen::parse("/tmp/s").is_err());
    }

    #[test]
    fn allow_list_matches() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.9.9".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nonsense").is_err());
    }
}
