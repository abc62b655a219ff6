//! TLS for NBD (`NBD_OPT_STARTTLS`): the server's credentials from PEM
//! files (`--tls-cert/--tls-key`, or a qemu-style `--tls-creds DIR`), the
//! optional client-certificate check against a CA, and [`TlsStream`], one
//! TLS session over a blocking socket that a reader thread and the reply
//! writers share.
//!
//! rustls does the TLS; this module only drives it. The session's state is
//! behind one lock held while records are decrypted or encrypted, never
//! while waiting on the socket: the reader waits for ciphertext without
//! it, so replies keep flowing while the next request is awaited.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use crate::error::{Error, Result};

/// Where the server's credentials are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM), the server's certificate first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate this CA (PEM) signed.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files of a qemu-style credentials directory: `server-cert.pem`,
    /// `server-key.pem`, and `ca-cert.pem` when client certificates are
    /// required (`verify_peer`).
    pub fn from_dir(dir: &Path, verify_peer: bool) -> TlsFiles {
        TlsFiles {
            cert: dir.join("server-cert.pem"),
            key: dir.join("server-key.pem"),
            client_ca: verify_peer.then(|| dir.join("ca-cert.pem")),
        }
    }

    /// Loads the files into a server configuration; a missing or
    /// unreadable file, or one with nothing usable in it, is a one-line
    /// error naming it.
    pub fn load(&self) -> Result<Arc<ServerConfig>> {
        let bad = |p: &Path, what: String| Error::invalid(format!("TLS: {what}")).with_path(p);
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| Error::io("TLS: cannot read the file", e).with_path(p))
        };
        let certs = pem_certs(&read(&self.cert)?)
            .map_err(|m| bad(&self.cert, format!("not a PEM certificate file ({m})")))?;
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|e| bad(&self.key, format!("no PEM private key in it ({e})")))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::invalid(format!("TLS: {e}")))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                let cas = pem_certs(&read(ca)?)
                    .map_err(|m| bad(ca, format!("not a PEM CA certificate file ({m})")))?;
                for c in cas {
                    roots
                        .add(c)
                        .map_err(|e| bad(ca, format!("unusable CA certificate ({e})")))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| bad(ca, format!("unusable CA ({e})")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad(&self.cert, format!("certificate and key unusable ({e})")))?;
        Ok(Arc::new(config))
    }
}

/// Every certificate of a PEM file; none at all is an error.
fn pem_certs(pem: &[u8]) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no CERTIFICATE section".into());
    }
    Ok(certs)
}

/// A socket both sides of a connection use through shared references (a
/// `TcpStream` or `UnixStream`).
pub trait Socket: Send + Sync {
    /// Reads ciphertext.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes all of `buf`.
    fn send(&self, buf: &[u8]) -> io::Result<()>;
}

impl Socket for std::net::TcpStream {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
    fn send(&self, buf: &[u8]) -> io::Result<()> {
        (&*self).write_all(buf)
    }
}

impl Socket for std::os::unix::net::UnixStream {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
    fn send(&self, buf: &[u8]) -> io::Result<()> {
        (&*self).write_all(buf)
    }
}

/// Adapts a [`Socket`] to `Read + Write` for the handshake.
struct Io<'a, S>(&'a S);

impl<S: Socket> Read for Io<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

impl<S: Socket> Write for Io<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf).map(|()| buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Plaintext handed to rustls at once when writing: bounds the ciphertext
/// buffered per write to about this much.
const WRITE_CHUNK: usize = 64 << 10;

/// Ciphertext read from the socket at once (a full TLS record and more).
const READ_CHUNK: usize = 18 << 10;

struct Inner<S: Socket> {
    sock: S,
    conn: Mutex<ServerConnection>,
    /// Held while ciphertext goes to the socket, so records leave in order.
    send: Mutex<()>,
    /// Ciphertext received and not yet handed to rustls, and how much of
    /// it was (the reader's alone).
    pending: Mutex<(Vec<u8>, usize)>,
}

/// One TLS session over `S`; clones share it (one reads, others write).
pub struct TlsStream<S: Socket>(Arc<Inner<S>>);

impl<S: Socket> Clone for TlsStream<S> {
    fn clone(&self) -> Self {
        TlsStream(self.0.clone())
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl<S: Socket> TlsStream<S> {
    /// Runs the server side of the TLS handshake on `sock` (whose timeouts
    /// bound it). A client that fails it (no TLS, a bad certificate) is an
    /// error.
    pub fn accept(sock: S, config: Arc<ServerConfig>) -> io::Result<TlsStream<S>> {
        let mut conn = ServerConnection::new(config).map_err(invalid)?;
        while conn.is_handshaking() {
            let (rd, wr) = conn.complete_io(&mut Io(&sock))?;
            if rd == 0 && wr == 0 && conn.is_handshaking() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(TlsStream(Arc::new(Inner {
            sock,
            conn: Mutex::new(conn),
            send: Mutex::new(()),
            pending: Mutex::new((Vec::new(), 0)),
        })))
    }

    /// The socket under the session (for timeouts and shutdown).
    pub fn socket(&self) -> &S {
        &self.0.sock
    }

    /// Sends whatever TLS records rustls has queued (handshake replies,
    /// alerts).
    fn drain(&self) -> io::Result<()> {
        let _order = self.0.send.lock();
        let mut out = Vec::new();
        {
            let mut c = self.0.conn.lock();
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
        }
        if out.is_empty() {
            return Ok(());
        }
        self.0.sock.send(&out)
    }
}

impl<S: Socket> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut pending = self.0.pending.lock();
        loop {
            let mut c = self.0.conn.lock();
            match c.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            let (data, at) = &mut *pending;
            if *at < data.len() {
                let mut rest = &data[*at..];
                let n = c.read_tls(&mut rest)?;
                if n == 0 {
                    return Err(invalid("records the session cannot take"));
                }
                *at += n;
                c.process_new_packets().map_err(invalid)?;
                let reply = c.wants_write();
                drop(c);
                if reply {
                    self.drain()?;
                }
                continue;
            }
            drop(c);
            // Nothing buffered: wait for the socket, without the session lock.
            data.resize(READ_CHUNK, 0);
            *at = 0;
            let n = match self.0.sock.recv(data) {
                Ok(n) => n,
                Err(e) => {
                    data.clear();
                    return Err(e);
                }
            };
            data.truncate(n);
            if n == 0 {
                // End of the stream: rustls tells a clean close (Ok(0))
                // from a truncation (UnexpectedEof).
                let mut c = self.0.conn.lock();
                c.read_tls(&mut &[][..])?;
                c.process_new_packets().map_err(invalid)?;
                return match c.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                    r => r,
                };
            }
        }
    }
}

impl<S: Socket> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(WRITE_CHUNK);
        let _order = self.0.send.lock();
        let mut out = Vec::with_capacity(n + 1024);
        let mut done = 0;
        {
            let mut c = self.0.conn.lock();
            while done < n {
                let k = c.writer().write(&buf[done..n])?;
                while c.wants_write() {
                    c.write_tls(&mut out)?;
                }
                if k == 0 {
                    break;
                }
                done += k;
            }
        }
        if done == 0 && n > 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.0.sock.send(&out)?;
        Ok(done)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: Socket> Drop for Inner<S> {
    fn drop(&mut self) {
        // The protocol ends a session with close_notify before the socket.
        let c = self.conn.get_mut();
        c.send_close_notify();
        let mut out = Vec::new();
        while c.wants_write() {
            if c.write_tls(&mut out).is_err() {
                break;
            }
        }
        let _ = self.sock.send(&out);
    }
}
